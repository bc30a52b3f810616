"""The stabilised loop: honest short runs, adversarial inputs, skipped steps, checkpoints, resume, DDP."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from LiquidRegLib import checkpoint, diffeo, losses, train
from LiquidRegLib.errors import Cancelled, InputError, TrainingDiverged, WeightsError
from LiquidRegLib.model import LiquidReg, ModelConfig
from LiquidRegLib.resources import default_weights

SHAPE = (32, 32, 32)


def small_model(seed=0):
    torch.manual_seed(seed)
    return LiquidReg(ModelConfig())


def synthetic_batch(step, seed=0, shift=2):
    """Smooth random blobs and a shifted, slightly deformed copy, with 4 labels."""
    g = torch.Generator().manual_seed(seed * 100003 + step)
    f = F.avg_pool3d(torch.rand(1, 1, *SHAPE, generator=g), 5, 1, 2)
    f = (f - f.min()) / (f.max() - f.min())
    m = torch.roll(f, shift, dims=2)
    labels = (f * 4).long().clamp(0, 3)
    return {"fixed": f, "moving": m, "fixed_labels": labels,
            "moving_labels": torch.roll(labels, shift, dims=2), "num_labels": 4}


def params_finite(model):
    return all(torch.isfinite(p).all() for p in model.parameters())


def test_five_iterations_on_synthetic_patches_are_honest():
    model = small_model()
    events = []
    state = train.run(model, synthetic_batch, train.TrainConfig(steps=5, checkpoint_every=0),
                      progress=events.append)
    assert state.step == 5 and state.skipped == 0
    assert len(events) == 5
    for e in events:
        assert torch.isfinite(torch.tensor(e.metrics["loss"]))
        assert e.metrics["grad_norm"] > 0 and torch.isfinite(torch.tensor(e.metrics["grad_norm"]))
        assert 0.0 <= e.metrics["lncc"] <= 2.0  # 1 - mean LNCC with LNCC in [-1, 1]
    assert params_finite(model)
    batch = synthetic_batch(99)
    with torch.no_grad():
        v = model(batch["fixed"], batch["moving"])
        disp = diffeo.exp_velocity(v, SHAPE)
        cc = losses.local_ncc(batch["fixed"], diffeo.warp(batch["moving"], disp))
        jac = diffeo.jacobian_determinant(disp)
    for t in (v, disp, cc, jac):
        assert torch.isfinite(t).all()
    assert cc.min() >= -1 and cc.max() <= 1
    assert jac.min() > 0.5 and jac.max() < 1.5


@pytest.mark.parametrize("case", ["constant", "spike", "zero_moving", "large_head"])
def test_adversarial_inputs_never_put_nan_in_weights(case):
    model = small_model()

    def batch(step):
        b = synthetic_batch(step)
        if case == "constant":
            b["fixed"] = torch.full_like(b["fixed"], 0.3)
            b["moving"] = torch.full_like(b["moving"], 0.3)
        elif case == "spike":
            b["moving"] = b["moving"].clone()
            b["moving"][0, 0, 16, 16, 16] = 1e6
        elif case == "zero_moving":
            b["moving"] = torch.zeros_like(b["moving"])
        return b

    if case == "large_head":
        for head in model.heads:
            torch.nn.init.normal_(head.weight, std=10.0)
    state = train.run(model, batch, train.TrainConfig(steps=4, checkpoint_every=0))
    assert state.step == 4
    assert state.skipped + len(state.history) == 4  # every step is either applied or counted
    assert params_finite(model)


def test_non_finite_steps_are_skipped_counted_and_stop_the_run():
    model = small_model()
    good = {k: v.clone() for k, v in model.state_dict().items()}

    def poisoned(step):
        b = synthetic_batch(step)
        b["fixed"] = b["fixed"].clone()
        b["fixed"][0, 0, 3, 3, 3] = float("nan")
        return b

    with pytest.raises(TrainingDiverged, match="consecutive"):
        train.run(model, poisoned, train.TrainConfig(steps=20, max_consecutive_skips=3,
                                                     checkpoint_every=0))
    for k, v in model.state_dict().items():
        assert torch.equal(v, good[k]), f"{k} changed although every step was skipped"

    # Isolated bad steps are skipped and counted, and training carries on.
    def sometimes(step):
        return poisoned(step) if step in (1, 3) else synthetic_batch(step)

    state = train.run(model, sometimes, train.TrainConfig(steps=5, checkpoint_every=0))
    assert state.skipped == 2 and len(state.history) == 3
    assert params_finite(model)


def test_a_divergence_read_back_late_keeps_exactly_the_last_good_weights():
    """Steps are skipped on the device and read back every ``log_every`` steps.  Three bad
    batches in a row (steps 3-5) stop the run at step 5 even though that is only seen at the
    read-back of step 8; the good batches after them were not applied, so the weights are
    exactly those after step 2, without any copy of the weights per step."""
    def batches(step):  # batches 2, 3, 4 (steps 3, 4, 5) are poisoned, the rest are good
        if step not in (2, 3, 4):
            return synthetic_batch(step)
        b = synthetic_batch(step)
        b["fixed"] = b["fixed"].clone()
        b["fixed"][0, 0, 3, 3, 3] = float("nan")
        return b

    model = small_model()
    events = []
    with pytest.raises(TrainingDiverged, match=r"3 consecutive .*\(step 5\)"):
        train.run(model, batches, train.TrainConfig(steps=12, log_every=4, max_consecutive_skips=3,
                                                    checkpoint_every=0), progress=events.append)
    assert [e.step for e in events] == [1, 2, 3, 4]  # every step before the one that stopped it
    assert [e.metrics["skipped"] for e in events] == [0, 0, 1, 2]
    reference = small_model()
    train.run(reference, synthetic_batch, train.TrainConfig(steps=2, checkpoint_every=0))
    for k, v in reference.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k


def test_weights_that_turn_non_finite_are_never_kept():
    """Finite, clipped gradients cannot make a weight non-finite with a sane learning rate; an
    infinite one can, and the read-back finds it and restores the weights it last checked."""
    model = small_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TrainingDiverged, match="non-finite by step 2"):
        train.run(model, synthetic_batch, train.TrainConfig(steps=4, lr=float("inf"), log_every=2,
                                                            checkpoint_every=0))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_the_loop_reads_the_device_once_per_logging_interval(monkeypatch):
    """No value goes from the device to the host inside a step (a GPU would wait each time):
    losses, gradient norms and skips are read back together, once per ``log_every`` steps,
    and still reported one event per step."""
    reads = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, _name=name, **kwargs):
            reads.append(_name)
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counting)
    events = []
    state = train.run(small_model(), synthetic_batch, train.TrainConfig(
        steps=6, log_every=3, checkpoint_every=0), progress=events.append)
    monkeypatch.undo()
    assert reads == ["tolist", "tolist"]
    assert [e.step for e in events] == list(range(1, 7))
    assert all(e.metrics["loss"] > 0 and e.metrics["grad_norm"] > 0 for e in events)
    assert state.skipped == 0 and [step for step, *_ in state.history] == list(range(1, 7))


def test_resume_continues_with_identical_results(tmp_path):
    config = train.TrainConfig(steps=6, checkpoint_every=3)
    straight = small_model()
    train.run(straight, synthetic_batch, config, checkpoint_path=tmp_path / "a.ckpt")

    interrupted = small_model()
    calls = []

    def cancel_after_three():
        calls.append(1)
        return len(calls) > 3

    with pytest.raises(Cancelled):
        train.run(interrupted, synthetic_batch, config, checkpoint_path=tmp_path / "b.ckpt",
                  cancel=cancel_after_three)
    resumed = small_model(seed=123)  # different init: everything must come from the checkpoint
    state = train.run(resumed, synthetic_batch, config, checkpoint_path=tmp_path / "b.ckpt",
                      resume=True)
    assert state.step == 6
    for k, v in straight.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_resume_takes_the_learning_rate_of_the_new_config(tmp_path):
    """Everything else resumes from the checkpoint; the learning rate is the caller's (a run can
    finish at a lower rate).  With lr 0 the resumed steps must leave the weights unchanged."""
    path = tmp_path / "run.ckpt"
    model = small_model()
    train.run(model, synthetic_batch, train.TrainConfig(steps=3, checkpoint_every=3),
              checkpoint_path=path)
    at_three = {k: v.clone() for k, v in model.state_dict().items()}
    resumed = small_model(seed=123)
    state = train.run(resumed, synthetic_batch, train.TrainConfig(steps=6, lr=0.0),
                      checkpoint_path=path, resume=True)
    assert state.step == 6
    for k, v in at_three.items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_checkpoint_killed_mid_write_leaves_previous_loadable(tmp_path):
    """A process SIGKILLed while writing checkpoints never leaves a half-written file."""
    target = tmp_path / "run.ckpt"
    script = textwrap.dedent(f"""
        import torch
        from LiquidRegLib import checkpoint
        i = 0
        while True:
            checkpoint.save({str(target)!r}, {{"i": i, "big": torch.full((4_000_000,), float(i))}},
                            kind="checkpoint")
            print(i, flush=True)
            i += 1
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(3):
            proc.stdout.readline()  # a few complete checkpoints exist, the next is being written
        time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    content, _ = checkpoint.load(target, kind="checkpoint")
    assert content["i"] >= 2
    assert torch.all(content["big"] == float(content["i"]))


def test_corrupt_checkpoint_is_rejected_clearly(tmp_path):
    path = tmp_path / "w.pt"
    checkpoint.save_weights(path, small_model())
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="corrupt"):
        checkpoint.load_model(path)


DDP_WORKER = textwrap.dedent("""
    import os, sys, torch
    import torch.distributed as dist
    sys.path.insert(0, os.environ["TESTING_DIR"])
    from test_training import small_model, synthetic_batch
    from LiquidRegLib import train
    torch.set_num_threads(1)
    rank, world = train.distributed_setup()
    model = small_model()
    # each replica sees different data; DDP must keep the weights identical
    train.run(model, lambda step: synthetic_batch(step, seed=rank + 1, shift=1 + rank),
              train.TrainConfig(steps=3, checkpoint_every=0))
    torch.save(model.state_dict(), os.path.join(sys.argv[1], f"rank{rank}.pt"))
    dist.destroy_process_group()
""")


def test_ddp_two_cpu_processes_keep_replicas_identical(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(DDP_WORKER)
    env = dict(os.environ, TESTING_DIR=str(Path(__file__).parent), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", "--master_port=29517", str(worker), str(tmp_path)]
    subprocess.run(cmd, check=True, env=env, timeout=300, capture_output=True)
    a = torch.load(tmp_path / "rank0.pt")
    b = torch.load(tmp_path / "rank1.pt")
    init = small_model().state_dict()
    assert any(not torch.equal(a[k], init[k]) for k in a), "training did not change the weights"
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_finetune_writes_new_weights_and_never_the_shipped_ones(tmp_path, small_brain_pair):
    from LiquidRegLib import io
    start = tmp_path / "start.pt"
    checkpoint.save_weights(start, small_model())
    pair = tuple(tmp_path / f"{n}.nii.gz" for n in ("f", "m", "fl", "ml"))
    for path, volume in zip(pair, (small_brain_pair[0], small_brain_pair[2],
                                   small_brain_pair[1], small_brain_pair[3])):
        io.write_volume(path, volume.array, volume.grid)
    shipped = default_weights()
    shipped_bytes = shipped.read_bytes()
    with pytest.raises(InputError, match="shipped"):
        train.finetune([pair], shipped, steps=1, weights=start, device="cpu", overwrite=True)
    assert shipped.read_bytes() == shipped_bytes
    existing = tmp_path / "tuned.pt"
    existing.write_bytes(b"the user's file")
    with pytest.raises(InputError, match="already exists"):
        train.finetune([pair], existing, steps=1, weights=start, device="cpu")
    assert existing.read_bytes() == b"the user's file"
    events = []
    summary = train.finetune([pair], existing, steps=2, weights=start, device="cpu",
                             overwrite=True, progress=events.append)
    assert summary["steps"] == 2 and summary["skipped"] == 0
    tuned, info = checkpoint.load_model(existing)
    start_info = checkpoint.load_model(start)[1]
    assert info["meta"]["finetuned_from"]["sha256"] == checkpoint.load(start, "weights")[1]
    # summary.json of a registration with these weights says they are fine-tuned, and from what
    named = checkpoint.model_summary(info)
    assert named["name"] == f"{start_info['name']}-finetuned" != start_info["name"]
    assert named["finetuned_from"]["sha256"] == start_info["sha256"]
    original = small_model().state_dict()
    assert any(not torch.equal(v, original[k]) for k, v in tuned.state_dict().items())
    assert {e.stage for e in events} >= {"prepare", "finetune"}
    assert any("dice" in e.metrics for e in events if e.stage == "finetune")


def test_rng_state_is_data_never_code(tmp_path):
    """The random state round-trips through a checkpoint; an old checkpoint's repr string is
    read as a literal, and one holding code is refused without running it."""
    import random
    random.seed(7)
    saved = train._rng_state()
    expected = [random.random() for _ in range(3)]
    random.seed(99)
    train._set_rng_state(saved)
    assert [random.random() for _ in range(3)] == expected
    random.seed(7)
    old = dict(train._rng_state(), python=repr(random.getstate()))
    random.seed(99)
    train._set_rng_state(old)
    assert [random.random() for _ in range(3)] == expected
    marker = tmp_path / "ran"
    evil = dict(saved, python=f"__import__('pathlib').Path({str(marker)!r}).touch()")
    with pytest.raises(WeightsError, match="random state"):
        train._set_rng_state(evil)
    assert not marker.exists()
