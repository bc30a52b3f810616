"""``liquidreg batch`` and ``batch.register_many``: many pairs, local workers, a Dask cluster,
resume after a kill, bad files among good ones, the cohort table.

The engine runs for real on small volumes (the sample brains at 2.5 mm, about 32^3 voxels), so
each pair takes a second or two.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from LiquidRegLib import batch, io
from LiquidRegLib.errors import InputError
from LiquidRegLib.results import RESULT_FILES

from conftest import small_brain

#: What every pair's folder holds: the files of ``register`` (no overview: --no-png).
FILES = sorted(set(RESULT_FILES.values()) - {"overview.png"})


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Four small images (two brains and flipped copies) and a truncated one."""
    folder = tmp_path_factory.mktemp("cohort")
    for kind in ("fixed", "moving"):
        t1, _ = small_brain(kind, extent_mm=(80, 96, 80), spacing=2.5)
        io.write_volume(folder / f"{kind}.nii.gz", t1.array, t1.grid)
        io.write_volume(folder / f"{kind}_flip.nii.gz", t1.array[::-1].copy(), t1.grid)
    data = (folder / "fixed.nii.gz").read_bytes()
    (folder / "corrupt.nii.gz").write_bytes(data[:len(data) // 3])
    return folder


def write_csv(path: Path, rows) -> Path:
    path.write_text("\n".join(",".join(r) for r in rows) + "\n")
    return path


def table(out: Path) -> tuple[list[dict], dict]:
    with open(out / batch.TABLE_CSV, newline="") as f:
        rows = list(csv.DictReader(f))
    return rows, json.loads((out / batch.TABLE_JSON).read_text())


def assert_loaded_once_per_worker(rows) -> None:
    """Each worker loaded the network for its first pair and reused it for the others."""
    ran = [r for r in rows if r["status"] == "ok"]
    for worker in {r["worker"] for r in ran}:
        mine = [r for r in ran if r["worker"] == worker]
        assert sum(r["model_loaded"] in (True, "True") for r in mine) == 1, mine
    assert len({r["worker"] for r in ran}) < len(ran)  # so some worker did reuse it


# ---- the pairs file --------------------------------------------------------------------------
def test_read_pairs_paths_masks_and_names(tmp_path):
    sub = tmp_path / "data"
    sub.mkdir()
    csv_path = write_csv(sub / "pairs.csv", [
        ("fixed", "moving", "fixed_mask", "output"),
        ("t/a.nii.gz", "b.nrrd", "a_mask.nii.gz", ""),
        (str(tmp_path / "c.mha"), "b.nrrd", "", "third"),
    ])
    pairs = batch.read_pairs(csv_path)
    assert pairs[0] == batch.Pair(sub / "t" / "a.nii.gz", sub / "b.nrrd", "b_to_a",
                                  sub / "a_mask.nii.gz", None)
    assert pairs[1].name == "third" and pairs[1].fixed == tmp_path / "c.mha"
    assert pairs[1].fixed_mask is None


@pytest.mark.parametrize("rows, problem", [
    ([("fixed", "moving"), ("a.nii.gz", "b.nii.gz"), ("a.nii.gz", "b.nii.gz")], "same result"),
    ([("fixed", "moving", "output"), ("a.nii.gz", "b.nii.gz", "../up")], "plain folder name"),
    ([("fixed", "moving"), ("a.nii.gz", "")], "line 2: the 'moving' column is empty"),
    ([("fixed", "mov"), ("a.nii.gz", "b.nii.gz")], "'fixed' and 'moving'"),
    ([("fixed", "moving")], "no rows"),
])
def test_pairs_file_errors_are_one_line_before_any_work(run_cli, tmp_path, rows, problem):
    csv_path = write_csv(tmp_path / "pairs.csv", rows)
    code, _, err = run_cli("batch", csv_path, "-o", tmp_path / "out", "-q")
    assert code == 2 and problem in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_workers_and_scheduler_are_exclusive(run_cli, cohort, tmp_path):
    csv_path = write_csv(tmp_path / "p.csv", [("fixed", "moving"),
                                              (str(cohort / "fixed.nii.gz"),
                                               str(cohort / "moving.nii.gz"))])
    code, _, err = run_cli("batch", csv_path, "-o", tmp_path / "out", "--workers", "2",
                           "--scheduler", "tcp://127.0.0.1:1", "-q")
    assert code == 2 and "not both" in err
    with pytest.raises(InputError, match="1 or more"):
        list(batch.register_many(batch.read_pairs(csv_path), tmp_path / "out", workers=0))


# ---- in this process: bad files among good ones, the table, resume ---------------------------
def test_bad_pairs_are_recorded_and_the_batch_goes_on(run_cli, cohort, tmp_path):
    csv_path = write_csv(tmp_path / "pairs.csv", [
        ("fixed", "moving", "output"),
        (str(cohort / "fixed.nii.gz"), str(cohort / "moving.nii.gz"), "good"),
        (str(cohort / "fixed.nii.gz"), str(cohort / "corrupt.nii.gz"), "corrupt"),
        (str(cohort / "fixed.nii.gz"), str(cohort / "missing.nii.gz"), ""),
        (str(cohort / "moving.nii.gz"), str(cohort / "fixed.nii.gz"), "good2"),
    ])
    out = tmp_path / "out"
    code, stdout, err = run_cli("batch", csv_path, "-o", out, "--no-affine", "--no-png",
                                "--device", "cpu", "--progress", "json")
    assert code == 4, err
    assert err.count("\n") == 1 and "2 of 4 pairs failed" in err
    events = [json.loads(line) for line in stdout.splitlines()]
    done = [e for e in events if e.get("stage") == "pairs"]
    assert [e["step"] for e in done] == [0, 1, 2, 3, 4] and done[-1]["total"] == 4
    assert events[-1]["event"] == "error"

    rows, content = table(out)
    assert [r["name"] for r in rows] == ["good", "corrupt", "missing_to_fixed", "good2"]
    assert [r["status"] for r in rows] == ["ok", "failed", "failed", "ok"]
    assert "corrupt or truncated" in rows[1]["error"] and "does not exist" in rows[2]["error"]
    assert content["counts"] == {"ok": 2, "resumed": 0, "failed": 2, "cancelled": 0}
    assert [r["name"] for r in content["results"]] == [r["name"] for r in rows]
    pair_events = {e["name"]: e for e in events if e.get("event") == "pair"}
    for row, stored in zip(rows, content["results"]):
        assert pair_events[row["name"]]["status"] == row["status"] == stored["status"]
        if row["status"] == "failed":
            assert not (out / row["name"]).exists()
            continue
        # the table holds what each pair's summary.json says
        assert sorted(os.listdir(out / row["name"])) == FILES
        summary = json.loads((out / row["name"] / "summary.json").read_text())
        assert stored["pct_folding"] == summary["pct_folding"] == float(row["pct_folding"])
        assert stored["std_log_jac"] == pytest.approx(float(row["std_log_jac"]))
        assert stored["std_log_jac"] == summary["std_log_jac"] > 0
        assert stored["similarity_before"] == summary["similarity"]["before"]
        assert stored["similarity_after"] == summary["similarity"]["after"]
        assert stored["time_s"] >= stored["registration_s"] == summary["timings_s"]["total"] > 0
    assert sum(r["model_loaded"] for r in content["results"]) == 1  # one process, one load

    # The corrupt file is replaced by a good one: only the two failed pairs run again.
    shutil.copy(cohort / "moving_flip.nii.gz", tmp_path / "fixed_copy.nii.gz")
    shutil.copy(cohort / "fixed.nii.gz", cohort / "missing.nii.gz")
    shutil.copy(cohort / "moving_flip.nii.gz", tmp_path / "corrupt_fixed.nii.gz")
    text = csv_path.read_text().replace(str(cohort / "corrupt.nii.gz"),
                                        str(tmp_path / "corrupt_fixed.nii.gz"))
    csv_path.write_text(text)
    before = {n: (out / n / "summary.json").stat().st_mtime_ns for n in ("good", "good2")}
    code, _, err = run_cli("batch", csv_path, "-o", out, "--no-affine", "--no-png",
                           "--device", "cpu", "-q")
    (cohort / "missing.nii.gz").unlink()
    assert code == 0, err
    rows, content = table(out)
    assert [r["status"] for r in rows] == ["resumed", "ok", "ok", "resumed"]
    assert before == {n: (out / n / "summary.json").stat().st_mtime_ns for n in before}
    assert rows[0]["pct_folding"] != "" and rows[0]["time_s"] == ""


def test_a_result_of_other_settings_or_a_foreign_folder_is_not_touched(cohort, tmp_path):
    pair = batch.Pair(cohort / "fixed.nii.gz", cohort / "moving.nii.gz", "p")
    out = tmp_path / "out"
    (out / "p").mkdir(parents=True)
    (out / "p" / "notes.txt").write_text("mine")
    [result] = batch.register_many([pair], out, affine=False, device="cpu", png=False)
    assert result.status == "failed" and "did not write (notes.txt)" in result.error
    assert os.listdir(out / "p") == ["notes.txt"]
    (out / "p" / "notes.txt").unlink()
    [result] = batch.register_many([pair], out, affine=False, device="cpu", png=False)
    assert result.status == "ok"
    [result] = batch.register_many([pair], out, affine=False, device="cpu", png=False,
                                   iterations=2)
    assert result.status == "failed" and "other inputs or settings" in result.error
    [result] = batch.register_many([pair], out, affine=False, device="cpu", png=False,
                                   iterations=2, overwrite=True)
    assert result.status == "ok"
    summary = json.loads((out / "p" / "summary.json").read_text())
    assert summary["iterations"] == 2 and summary["request"]["inputs"]["moving"] == str(
        cohort / "moving.nii.gz")


# ---- local worker processes ------------------------------------------------------------------
def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_killed_batch_resumes_and_its_workers_die_with_it(run_cli, cohort, tmp_path):
    names = ["a", "b", "c", "d", "e"]
    images = ["fixed", "moving", "fixed_flip", "moving_flip", "fixed"]
    movings = ["moving", "fixed", "moving_flip", "fixed", "moving_flip"]
    csv_path = write_csv(tmp_path / "pairs.csv", [("fixed", "moving", "output")] + [
        (str(cohort / f"{f}.nii.gz"), str(cohort / f"{m}.nii.gz"), n)
        for f, m, n in zip(images, movings, names)])
    out = tmp_path / "out"
    options = ["--no-affine", "--no-png", "--device", "cpu", "--workers", "2"]
    process = subprocess.Popen(
        [sys.executable, "-m", "LiquidRegLib.cli", "batch", str(csv_path), "-o", str(out),
         *options, "--progress", "json"], stdout=subprocess.PIPE, text=True)
    finished = []
    deadline = time.monotonic() + 240
    for line in process.stdout:
        event = json.loads(line)
        if event.get("event") == "pair" and event["status"] == "ok":
            finished.append(event["name"])
            break
        assert time.monotonic() < deadline
    workers = _children(process.pid)  # the 2 workers (and multiprocessing's resource tracker)
    assert len(workers) >= 2
    process.send_signal(signal.SIGKILL)  # no chance to clean up
    process.wait(30)
    process.stdout.close()
    deadline = time.monotonic() + 1.0  # not after finishing their pairs (a second or two)
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in workers), "workers outlived the killed batch"

    complete = sorted(n for n in names if (out / n / "summary.json").exists())
    assert finished[0] in complete and len(complete) <= 2  # so 3 or more pairs are left
    stamps = {n: (out / n / "summary.json").stat().st_mtime_ns for n in complete}
    code, _, err = run_cli("batch", csv_path, "-o", out, *options, "-q")
    assert code == 0, err
    rows, content = table(out)
    assert [r["name"] for r in rows] == names
    assert {r["name"] for r in rows if r["status"] == "resumed"} == set(complete)
    assert all(r["status"] == "ok" for r in rows if r["name"] not in complete)
    assert stamps == {n: (out / n / "summary.json").stat().st_mtime_ns for n in complete}
    for name in names:
        assert sorted(n for n in os.listdir(out / name) if not n.startswith(".")) == FILES
    assert len({r["worker"] for r in rows if r["status"] == "ok"}) == 2
    assert_loaded_once_per_worker(rows)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_cancel_stops_the_workers_and_keeps_finished_pairs(cohort, tmp_path):
    """SIGTERM (Slicer's Cancel, or Ctrl-C) mid-batch: exit 130, workers gone, nothing half
    written, the table lists what finished and, as cancelled, the rest."""
    csv_path = write_csv(tmp_path / "pairs.csv", [("fixed", "moving", "output")] + [
        (str(cohort / f"{f}.nii.gz"), str(cohort / f"{m}.nii.gz"), n) for f, m, n in
        [("fixed", "moving", "a"), ("moving", "fixed", "b"), ("fixed_flip", "moving", "c"),
         ("moving_flip", "fixed", "d"), ("fixed", "moving_flip", "e")]])
    out = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, "-m", "LiquidRegLib.cli", "batch", str(csv_path), "-o", str(out),
         "--no-affine", "--no-png", "--device", "cpu", "--workers", "2", "--progress", "json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stdout:
        if json.loads(line).get("event") == "pair":
            break
    workers = _children(process.pid)
    process.terminate()
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and "rerun the same command" in stderr
    assert json.loads(stdout.splitlines()[-1])["event"] == "error"
    deadline = time.monotonic() + 2.0
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [Path(f"/proc/{pid}/cmdline").read_text() for pid in workers if _alive(pid)]
    complete = set()
    for name in "abcde":  # a pair is either complete or absent: nothing half written
        folder = out / name
        if folder.exists() and os.listdir(folder):
            assert sorted(os.listdir(folder)) == FILES
            complete.add(name)
    rows, _ = table(out)  # every pair has its row: finished, or cancelled (running or waiting)
    assert [r["name"] for r in rows] == list("abcde")
    assert {r["name"] for r in rows if r["status"] == "ok"} == complete
    assert {r["status"] for r in rows if r["name"] not in complete} == {"cancelled"}
    assert complete and len(complete) < 5


def test_a_worker_that_dies_costs_only_its_pair(cohort, tmp_path):
    import multiprocessing
    pairs = [batch.Pair(cohort / f"{f}.nii.gz", cohort / f"{m}.nii.gz", f"p{i}")
             for i, (f, m) in enumerate([("fixed", "moving"), ("moving", "fixed"),
                                         ("fixed_flip", "moving"), ("moving_flip", "fixed")])]
    results = []
    for result in batch.register_many(pairs, tmp_path / "out", workers=2, affine=False,
                                      device="cpu", png=False):
        if not results:  # kill the other worker: it is busy with (or about to get) a pair
            ran = int(result.worker.rsplit(":", 1)[1])
            [other] = [p for p in multiprocessing.active_children()
                       if p.name.startswith("liquidreg-worker") and p.pid != ran]
            os.kill(other.pid, signal.SIGKILL)
        results.append(result)
    assert sorted(r.name for r in results) == ["p0", "p1", "p2", "p3"]
    failed = [r for r in results if not r.ok]
    assert len(failed) == 1 and "worker process died (exit code -9" in failed[0].error
    assert not (tmp_path / "out" / failed[0].name / "summary.json").exists()
    assert not [p for p in multiprocessing.active_children() if p.name.startswith("liquidreg")]


# ---- Dask --------------------------------------------------------------------------------------
def test_dask_local_cluster_with_two_workers(cohort, tmp_path):
    distributed = pytest.importorskip("distributed")
    pairs = [batch.Pair(cohort / "fixed.nii.gz", cohort / "moving.nii.gz", "a"),
             batch.Pair(cohort / "moving.nii.gz", cohort / "fixed.nii.gz", "b"),
             batch.Pair(cohort / "fixed.nii.gz", cohort / "corrupt.nii.gz", "bad"),
             batch.Pair(cohort / "fixed_flip.nii.gz", cohort / "moving.nii.gz", "c"),
             batch.Pair(cohort / "moving_flip.nii.gz", cohort / "fixed.nii.gz", "d")]
    out = tmp_path / "out"
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        results = list(batch.register_many(pairs, out, scheduler=cluster.scheduler_address,
                                           affine=False, device="cpu", png=False))
    assert sorted(r.name for r in results) == ["a", "b", "bad", "c", "d"]
    by_name = {r.name: r for r in results}
    assert by_name["bad"].status == "failed" and "corrupt" in by_name["bad"].error
    ok = [r for r in results if r.ok]
    assert len(ok) == 4 and all(sorted(os.listdir(out / r.name)) == FILES for r in ok)
    pids = {int(r.worker.rsplit(":", 1)[1]) for r in results}
    assert len(pids) == 2 and os.getpid() not in pids  # both workers of the cluster took pairs
    assert_loaded_once_per_worker([r.row() for r in results])
    # the same pairs again: everything is complete, so nothing is sent to a cluster at all
    again = list(batch.register_many(pairs[:2], out, scheduler="tcp://127.0.0.1:9",
                                     affine=False, device="cpu", png=False))
    assert [r.status for r in again] == ["resumed", "resumed"]


# ---- rough edges: the pairs file, arguments, the disk, Ctrl-C, an unreachable cluster --------
def test_pairs_file_saved_by_excel_with_a_bom_and_spaces_around_names(tmp_path):
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_bytes("\ufefffixed , moving,  output\r\na.nii.gz, b.nii.gz , first\r\n"
                         .encode("utf-8"))
    [pair] = batch.read_pairs(csv_path)
    assert pair == batch.Pair(tmp_path / "a.nii.gz", tmp_path / "b.nii.gz", "first")


def test_workers_zero_is_refused_before_anything_is_made(run_cli, cohort, tmp_path):
    csv_path = write_csv(tmp_path / "p.csv", [("fixed", "moving"), (str(cohort / "fixed.nii.gz"),
                                                                  str(cohort / "moving.nii.gz"))])
    code, _, err = run_cli("batch", csv_path, "-o", tmp_path / "out", "--workers", "0", "-q")
    assert code == 2 and err.count("\n") == 1 and "1 or more, not 0" in err
    assert sorted(os.listdir(tmp_path)) == ["p.csv"]


def test_the_disk_is_checked_for_the_whole_cohort_before_the_work(run_cli, cohort, tmp_path,
                                                                 monkeypatch):
    """Room for one result, not three: refused before the first pair runs, nothing made."""
    from LiquidRegLib import results
    from LiquidRegLib.grid import Grid
    ran = []
    monkeypatch.setattr(batch, "run_pair", lambda *a, **k: ran.append(a))
    grid = io.read_grid(cohort / "fixed.nii.gz")
    one = results.bytes_needed(grid, io.read_grid(cohort / "moving.nii.gz"))
    assert isinstance(grid, Grid)
    free = int(1.5 * one)
    monkeypatch.setattr(results.shutil, "disk_usage",
                        lambda path: shutil._ntuple_diskusage(10 ** 12, 10 ** 12 - free, free))
    csv_path = write_csv(tmp_path / "pairs.csv", [("fixed", "moving", "output")] + [
        (str(cohort / "fixed.nii.gz"), str(cohort / "moving.nii.gz"), name)
        for name in ("a", "b", "c")] + [(str(cohort / "fixed.nii.gz"),
                                         str(cohort / "missing.nii.gz"), "d")])
    code, _, err = run_cli("batch", csv_path, "-o", tmp_path / "out", "-q")
    assert code == 2 and err.count("\n") == 1, err
    assert "not enough free disk space for the results of 4 pairs" in err
    assert f"{3 * one / 2 ** 20:.0f} MB needed" in err  # the missing file counts for nothing
    assert not ran and sorted(os.listdir(tmp_path)) == ["pairs.csv"]


def test_ctrl_c_gives_every_unfinished_pair_its_row(run_cli, cohort, tmp_path, monkeypatch):
    """In this process (--workers 1): the pair running at Ctrl-C and those after it are
    "cancelled" in the table, next to the finished one."""
    real = batch.run_pair

    def run_pair(pair, out, settings, device=None):
        if pair.name == "b":
            raise KeyboardInterrupt
        return real(pair, out, settings, device)
    monkeypatch.setattr(batch, "run_pair", run_pair)
    csv_path = write_csv(tmp_path / "pairs.csv", [("fixed", "moving", "output")] + [
        (str(cohort / "fixed.nii.gz"), str(cohort / "moving.nii.gz"), name)
        for name in ("a", "b", "c")])
    out = tmp_path / "out"
    code, _, err = run_cli("batch", csv_path, "-o", out, "--no-affine", "--no-png", "--device",
                           "cpu", "-q")
    assert code == 130 and "the 1 finished pairs are kept" in err
    rows, content = table(out)
    assert [(r["name"], r["status"]) for r in rows] == [("a", "ok"), ("b", "cancelled"),
                                                        ("c", "cancelled")]
    assert "rerun the same command" in rows[1]["error"]
    assert content["counts"] == {"ok": 1, "resumed": 0, "failed": 0, "cancelled": 2}
    assert sorted(os.listdir(out)) == ["a", batch.TABLE_CSV, batch.TABLE_JSON]
    # interrupted before any pair finished: the folder it made is gone again
    monkeypatch.setattr(batch, "run_pair", lambda *a, **k: (_ for _ in ()).throw(
        KeyboardInterrupt))
    code, _, err = run_cli("batch", csv_path, "-o", tmp_path / "out2", "-q", "--device", "cpu")
    assert code == 130 and not (tmp_path / "out2").exists()


def test_an_unreachable_scheduler_leaves_nothing_behind(run_cli, cohort, tmp_path):
    pytest.importorskip("distributed")
    csv_path = write_csv(tmp_path / "p.csv", [("fixed", "moving"), (str(cohort / "fixed.nii.gz"),
                                                                  str(cohort / "moving.nii.gz"))])
    code, _, err = run_cli("batch", csv_path, "-o", tmp_path / "new" / "out", "--scheduler",
                           "tcp://127.0.0.1:9", "-q")
    assert code == 2 and err.count("\n") == 1 and "cannot reach the Dask scheduler" in err
    assert sorted(os.listdir(tmp_path)) == ["p.csv"]


def test_a_failed_allocation_in_a_pair_is_the_memory_line(cohort, tmp_path, monkeypatch):
    from LiquidRegLib import register

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not "
                           "enough memory: you tried to allocate 3221225472 bytes.")
    monkeypatch.setattr(register, "register", out_of_memory)
    [result] = batch.register_many([(cohort / "fixed.nii.gz", cohort / "moving.nii.gz")],
                                   tmp_path / "out", device="cpu")
    assert result.status == "failed" and "unexpected" not in result.error
    assert result.error.startswith("ran out of memory (3.00 GB more could not be allocated)")


def test_a_label_map_in_a_cohort_fails_its_pair_only(cohort, tmp_path):
    labels = io.read_volume(cohort / "fixed.nii.gz")
    labels.array = (labels.array > labels.array.mean()).astype("uint8") * 3
    io.write_volume(tmp_path / "labels.nii.gz", labels.array, labels.grid)
    results = list(batch.register_many(
        [batch.Pair(cohort / "fixed.nii.gz", tmp_path / "labels.nii.gz", "labels"),
         batch.Pair(cohort / "fixed.nii.gz", cohort / "moving.nii.gz", "images")],
        tmp_path / "out", affine=False, device="cpu", png=False))
    assert [(r.name, r.status) for r in results] == [("labels", "failed"), ("images", "ok")]
    assert "looks like a label map" in results[0].error
