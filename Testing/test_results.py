"""The result folder: every file, strict JSON, and a folder replaced whole or not at all."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest

from LiquidRegLib import io, results
from LiquidRegLib.errors import InputError

from conftest import smooth_field, world_image

RESULT_NAMES = sorted(results.RESULT_FILES.values())


def _files(folder):
    return sorted(p.name for p in folder.iterdir())


def _fake_result(grid_fixed, grid_moving, **summary):
    image = world_image(grid_fixed)
    return types.SimpleNamespace(
        fixed_grid=grid_fixed, moving_grid=grid_moving,
        displacement=smooth_field(grid_fixed), inverse_displacement=-smooth_field(grid_moving),
        jacobian=np.full(grid_fixed.shape, 1.1, np.float32), warped=image, affine=np.eye(4),
        summary={"device": "cpu", "pct_folding": 0.0, "timings_s": {"network": np.float32(0.5)},
                 **summary})


def test_save_result_writes_everything(tmp_path, grids):
    fixed, moving = grids["oblique_aniso"], grids["LIP_aniso"]
    result = _fake_result(fixed, moving)
    out = tmp_path / "out"
    paths = results.save_result(result, out, png=True,
                                fixed=io.Volume(world_image(fixed), fixed, "fixed"),
                                moving=io.Volume(world_image(moving), moving, "moving"))
    assert _files(out) == RESULT_NAMES
    assert set(paths) == set(results.RESULT_FILES)
    warp, warp_grid = io.read_displacement(paths["warp"])
    assert warp_grid == fixed and np.allclose(warp, result.displacement, atol=1e-6)
    inverse, inverse_grid = io.read_displacement(paths["inverse_warp"])
    assert inverse_grid == moving and np.allclose(inverse, result.inverse_displacement, atol=1e-6)
    assert io.read_volume(paths["jacobian"]).grid == fixed
    summary = json.loads(paths["summary"].read_text())
    assert summary["pct_folding"] == 0.0 and summary["device"] == "cpu"
    assert np.allclose(summary["affine_ras_fixed_to_moving"], np.eye(4))
    assert np.allclose(summary["fixed_grid"]["voxel_to_ras"], fixed.affine)
    assert summary["timings_s"]["network"] == 0.5
    assert paths["overview"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "plain.txt").write_text("")
    usual = (tmp_path / "plain.txt").stat().st_mode
    assert {p.stat().st_mode for p in paths.values()} == {usual}  # not private temp-file modes
    assert _files(tmp_path) == ["out", "plain.txt"]  # no staging folder left beside it


def test_summary_is_strict_json(tmp_path, grids):
    """NaN/Inf (e.g. a metric of an empty region) are written as null: the file stays JSON."""
    result = _fake_result(grids["RAS_aniso"], grids["LPS"], similarity={"before": float("nan")},
                          extent=np.float32("inf"))
    paths = results.save_result(result, tmp_path / "out", png=False)
    text = paths["summary"].read_text()
    assert "NaN" not in text and "Infinity" not in text
    summary = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in JSON"))
    assert summary["similarity"]["before"] is None and summary["extent"] is None


def test_save_result_leaves_nothing_on_failure(tmp_path, grids, monkeypatch):
    fixed = grids["RAS_aniso"]
    result = _fake_result(fixed, fixed)
    previous = tmp_path / "previous"
    results.save_result(_fake_result(fixed, fixed), previous, png=False)
    before = {name: (previous / name).read_bytes() for name in _files(previous)}
    original = io.write_volume

    def failing_write(path, array, grid, **options):
        if "jacobian" in str(path):
            raise OSError("disk full")
        original(path, array, grid, **options)

    monkeypatch.setattr(results, "write_volume", failing_write)
    with pytest.raises(OSError):
        results.save_result(result, previous, overwrite=True, png=False)
    assert {name: (previous / name).read_bytes() for name in _files(previous)} == before
    new = tmp_path / "deep" / "new"
    with pytest.raises(OSError):
        results.save_result(result, new, png=False)
    assert _files(tmp_path) == ["previous"]  # nor the folders it would have created


def test_non_empty_folder_needs_overwrite_and_is_replaced_whole(tmp_path, grids):
    """A rerun without the overview does not leave the previous pair's overview.png behind."""
    fixed = grids["RAS_aniso"]
    out = tmp_path / "out"
    results.save_result(_fake_result(fixed, fixed), out, png=True)
    assert "overview.png" in _files(out)
    with pytest.raises(InputError, match="not empty.*overwrit"):
        results.save_result(_fake_result(fixed, fixed), out, png=False)
    second = _fake_result(fixed, fixed)
    second.jacobian = np.full(fixed.shape, 0.9, np.float32)
    results.save_result(second, out, png=False, overwrite=True)
    assert _files(out) == sorted(set(RESULT_NAMES) - {"overview.png"})
    assert np.allclose(io.read_volume(out / "jacobian.nii.gz").array, 0.9)
    assert _files(tmp_path) == ["out"]


def test_a_folder_with_other_files_is_never_replaced(tmp_path, grids):
    fixed = grids["RAS_aniso"]
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="did not write \\(notes.txt\\)"):
        results.check_output_folder(out, overwrite=True)
    with pytest.raises(InputError, match="notes.txt"):
        results.save_result(_fake_result(fixed, fixed), out, png=False, overwrite=True)
    assert _files(out) == ["notes.txt"]


def test_the_swap_falls_back_to_two_renames(tmp_path, grids, monkeypatch):
    """Where the system cannot exchange two folders atomically, the result still replaces the
    previous one whole."""
    fixed = grids["RAS_aniso"]
    out = tmp_path / "out"
    results.save_result(_fake_result(fixed, fixed), out, png=True)
    monkeypatch.setattr(results, "_exchange", lambda a, b: False)
    results.save_result(_fake_result(fixed, fixed), out, png=False, overwrite=True)
    assert _files(out) == sorted(set(RESULT_NAMES) - {"overview.png"})
    assert _files(tmp_path) == ["out"]


KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys, types
    import numpy as np
    from LiquidRegLib import results
    from LiquidRegLib.grid import Grid
    grid = Grid((12, 10, 8), np.eye(4))
    field = np.zeros((12, 10, 8, 3), np.float32)
    result = types.SimpleNamespace(fixed_grid=grid, moving_grid=grid, displacement=field,
        inverse_displacement=field, jacobian=np.ones(grid.shape, np.float32),
        warped=np.ones(grid.shape, np.float32), affine=np.eye(4), summary={})
    def progress(event):
        if event.stage == "write" and event.step == 2:
            os.kill(os.getpid(), signal.SIGKILL)  # a kill in the middle of writing
    results.save_result(result, sys.argv[1], overwrite=True, png=False, progress=progress)
""")


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL")
def test_a_killed_run_leaves_the_previous_result_and_its_staging_is_cleaned(tmp_path, grids):
    fixed = grids["RAS_aniso"]
    out = tmp_path / "out"
    results.save_result(_fake_result(fixed, fixed), out, png=False)
    before = {name: (out / name).read_bytes() for name in _files(out)}
    run = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(out)])
    assert run.returncode == -9
    stale = [p for p in tmp_path.iterdir() if p.name.startswith(".out.liquidreg-")]
    assert stale, "the kill left no staging folder: the test does not test anything"
    assert {name: (out / name).read_bytes() for name in _files(out)} == before
    # a staging folder of a live writer (this test's own process) is left alone
    live = io.staging_folder(tmp_path / "out")
    results.save_result(_fake_result(fixed, fixed), out, png=False, overwrite=True)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [live.name]


def test_save_result_without_pillow_skips_only_the_figure(tmp_path, grids, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "PIL" else real(name, *a))
    paths = results.save_result(_fake_result(grids["RAS_aniso"], grids["LPS"]), tmp_path / "out")
    assert "overview" not in paths
    assert _files(tmp_path / "out") == sorted(set(RESULT_NAMES) - {"overview.png"})


# ---- shared results: permissions, one run per output ------------------------------------------
@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
@pytest.mark.parametrize("umask", [0o002, 0o022, 0o077])
def test_result_folders_and_files_follow_the_umask(tmp_path, grids, umask):
    """A colleague's group (umask 002) or everyone (022) can read a result as they can read any
    folder the user makes; a private umask (077) keeps it private."""
    previous = os.umask(umask)
    try:
        paths = results.save_result(_fake_result(grids["RAS_aniso"], grids["LPS"]),
                                    tmp_path / "deep" / "out", png=True)
    finally:
        os.umask(previous)
    assert (tmp_path / "deep" / "out").stat().st_mode & 0o777 == 0o777 & ~umask
    assert (tmp_path / "deep").stat().st_mode & 0o777 == 0o777 & ~umask
    assert {p.stat().st_mode & 0o777 for p in paths.values()} == {0o666 & ~umask}


HOLDER = textwrap.dedent("""
    import sys
    from LiquidRegLib.results import claim
    with claim(sys.argv[1]):
        print("held", flush=True)
        sys.stdin.read()
""")


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL")
def test_one_run_per_output_and_a_killed_run_does_not_block(run_cli, tmp_path, grids,
                                                            fake_engine):
    """While another process holds OUT, register and batch into it are refused at once with one
    line naming that process; once it is killed (its lock file left behind), OUT is free."""
    fixed = grids["RAS_aniso"]
    for name in ("fixed", "moving"):
        io.write_volume(tmp_path / f"{name}.nii.gz", world_image(fixed), fixed)
    (tmp_path / "pairs.csv").write_text("fixed,moving\nfixed.nii.gz,moving.nii.gz\n")
    out = tmp_path / "shared" / "OUT"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        for command in (["register", tmp_path / "fixed.nii.gz", tmp_path / "moving.nii.gz"],
                        ["batch", tmp_path / "pairs.csv", "--no-affine"]):
            code, _, err = run_cli(*command, "-o", out, "--quiet", "--device", "cpu")
            assert code == 2 and err.count("\n") == 1, err
            assert "is being written by another liquidreg run (process " \
                   f"{holder.pid} on " in err and "choose another output" in err
            assert not out.exists() and "register" not in fake_engine
    finally:
        holder.kill()
        holder.wait()
    assert (tmp_path / "shared" / ".OUT.liquidreg-lock").exists()  # what the kill left
    code, _, err = run_cli("register", tmp_path / "fixed.nii.gz", tmp_path / "moving.nii.gz",
                           "-o", out, "--quiet", "--no-png")
    assert code == 0, err
    assert os.listdir(tmp_path / "shared") == ["OUT"]  # the lock file is gone with the run


def test_a_second_claim_in_the_same_program_is_refused_and_its_folders_are_left_clean(
        tmp_path):
    """Two threads of one program cannot write the same output either; a refused or finished
    claim removes the folders it made for its lock file."""
    import threading
    out = tmp_path / "a" / "b" / "OUT"
    errors = []
    with results.claim(out):
        with results.claim(out):  # the same thread: re-entrant (save_result inside register)
            pass
        thread = threading.Thread(target=lambda: errors.append(
            pytest.raises(InputError, results.claim(out).__enter__)))
        thread.start()
        thread.join()
        assert "another registration in this program" in str(errors[0].value)
    assert os.listdir(tmp_path) == []
