"""The ``liquidreg`` command: help, apply, evaluate, register/finetune plumbing, JSON progress."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from LiquidRegLib import io
from LiquidRegLib.metrics import dice_per_label, hd95_per_label, jacobian_stats, surface
from LiquidRegLib.options import RegistrationOptions
from LiquidRegLib.results import RESULT_FILES

from conftest import ORIENTATIONS, build_grid, rotation, world_image, world_labels

COMMANDS = ("register", "apply", "evaluate", "finetune", "batch")


# ---- help ------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", COMMANDS)
def test_help_teaches(run_cli, command):
    with pytest.raises(SystemExit) as info:
        run_cli(command, "--help")
    assert info.value.code == 0


@pytest.mark.parametrize("command", COMMANDS)
def test_help_has_description_and_examples(capsys, command):
    from LiquidRegLib.cli import build_parser
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    text = capsys.readouterr().out
    assert "examples:" in text and f"liquidreg {command}" in text
    assert "--progress" in text and "--quiet" in text


def test_module_and_console_script_entry_points():
    out = subprocess.run([sys.executable, "-m", "LiquidRegLib.cli", "--help"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "register" in out.stdout
    out = subprocess.run([sys.executable, "-m", "LiquidRegLib", "--version"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "liquidreg" in out.stdout
    script = shutil.which("liquidreg") or str(Path(sys.executable).parent / "liquidreg")
    if not os.path.exists(script):
        pytest.skip("liquidreg console script not installed in this environment")
    out = subprocess.run([script, "apply", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--interpolation" in out.stdout


# ---- apply -----------------------------------------------------------------------------------
@pytest.fixture
def pair(tmp_path):
    """Fixed (oblique, anisotropic) and moving (LPS) grids with a labelled ball in world space."""
    fixed = build_grid((36, 32, 28), (1.3, 1.0, 1.6), rotation(10, 0, -20), (0.0, 0.0, 0.0))
    moving = build_grid((40, 40, 40), (1.0, 1.2, 1.1), ORIENTATIONS["LPS"], (2.0, -1.0, 0.5))
    paths = {"fixed": tmp_path / "fixed.nii.gz", "moving": tmp_path / "moving.nrrd",
             "moving_labels": tmp_path / "moving_labels.nii.gz"}
    io.write_volume(paths["fixed"], world_image(fixed), fixed)
    io.write_volume(paths["moving"], world_image(moving), moving)
    io.write_volume(paths["moving_labels"], world_labels(moving, (0, 0, 0), 11.0), moving)
    return dict(fixed=fixed, moving=moving, paths=paths, folder=tmp_path)


def test_apply_translation_moves_labels_the_right_way(run_cli, pair):
    """A constant warp u = (+4, 0, 0) mm R reads the moving image 4 mm to the right, so the ball
    (centred at the origin in the moving image) appears centred at x = -4 mm in the output."""
    fixed = pair["fixed"]
    warp = pair["folder"] / "shift.nii.gz"
    io.write_displacement(warp, np.broadcast_to(np.float32([4, 0, 0]), (*fixed.shape, 3)), fixed)
    out = pair["folder"] / "warped_labels.nii.gz"
    code, _, err = run_cli("apply", "--reference", pair["paths"]["fixed"], "--transform", warp,
                           pair["paths"]["moving_labels"], "-o", out, "--interpolation", "nearest",
                           "-q")
    assert code == 0, err
    result = io.read_volume(out, dtype=None)
    assert result.grid == fixed and result.array.dtype == np.int16
    expected = world_labels(fixed, (-4.0, 0.0, 0.0), 11.0)
    assert set(np.unique(result.array)) <= set(range(9))
    assert np.mean(result.array == expected) > 0.98  # misses only boundary voxels
    ras = fixed.voxel_to_ras(np.argwhere(result.array > 0))
    assert np.allclose(ras.mean(0), (-4.0, 0.0, 0.0), atol=0.3)


def test_apply_linear_and_affine_text(run_cli, pair):
    fixed, moving = pair["fixed"], pair["moving"]
    io.write_volume(pair["paths"]["moving"], world_image(moving, (0, 0, 0)), moving)
    shift = np.eye(4)
    shift[:3, 3] = (0.0, 3.0, 0.0)  # fixed point x -> moving point x + 3 mm anterior
    matrix = pair["folder"] / "shift.txt"
    np.savetxt(matrix, shift)
    out = pair["folder"] / "warped.mha"
    code, _, err = run_cli("apply", "--reference", pair["paths"]["fixed"], "--transform", matrix,
                           pair["paths"]["moving"], "-o", out, "--quiet")
    assert code == 0, err
    result = io.read_volume(out)
    assert result.array.dtype == np.float32 and result.grid == fixed
    source = fixed.voxel_to_ras(np.indices(fixed.shape).reshape(3, -1).T) + (0.0, 3.0, 0.0)
    ijk = moving.ras_to_voxel(source).reshape(*fixed.shape, 3)
    interior = np.all((ijk > 1) & (ijk < np.array(moving.shape) - 2), axis=-1)
    assert interior.mean() > 0.5
    expected = world_image(fixed, (0.0, -3.0, 0.0))  # f(x + 3 mm A)
    wrong_way = world_image(fixed, (0.0, 3.0, 0.0))
    assert np.abs(result.array - expected)[interior].max() < 1.0  # linear interpolation error
    assert np.abs(result.array - wrong_way)[interior].max() > 5.0


# ---- metrics and evaluate --------------------------------------------------------------------
def test_dice_known_value():
    a = np.zeros((20, 20, 20), np.int16)
    b = np.zeros_like(a)
    a[0:10, 0:10, 0:10] = 3
    b[5:15, 0:10, 0:10] = 3
    a[15:20, 15:20, 15:20] = 7          # label 7 only in a: not scored
    assert dice_per_label(a, b) == {3: pytest.approx(0.5)}


def test_hd95_matches_brute_force_on_anisotropic_oblique_grid():
    grid = build_grid((22, 18, 14), (0.8, 1.3, 2.1), rotation(15, 25, -10))
    a = world_labels(grid, (0.0, 0.0, 0.0), 8.0) > 0
    b = world_labels(grid, (2.5, -1.0, 1.5), 6.5) > 0
    ras = grid.voxel_to_ras(np.indices(grid.shape).reshape(3, -1).T).reshape(*grid.shape, 3)
    pa, pb = ras[surface(a)], ras[surface(b)]
    d = np.linalg.norm(pa[:, None] - pb[None], axis=-1)
    brute = np.percentile(np.concatenate([d.min(1), d.min(0)]), 95)
    labels_a, labels_b = a.astype(np.int16), b.astype(np.int16)
    assert hd95_per_label(labels_a, labels_b, grid)[1] == pytest.approx(brute, rel=1e-6)
    assert brute > 2.0  # the two balls really differ


def test_jacobian_stats_known_values():
    j = np.array([2.0, 0.5, -1.0, 0.0, 1.0]).reshape(5, 1, 1)
    stats = jacobian_stats(j)
    assert stats["pct_folding"] == pytest.approx(40.0)
    assert stats["std_log_jac"] == pytest.approx(np.std(np.log([2.0, 0.5, 1.0])))
    assert (stats["min"], stats["max"]) == (-1.0, 2.0)


def _shifted_cubes(folder, extra_fixed_label=None):
    """f.nii.gz and m.nii.gz: label 5 as a cube, moved by 5 voxels along i in the moving map;
    ``extra_fixed_label`` adds a small cube of that label to the fixed map only.  Returns the grid."""
    grid = build_grid((24, 24, 24), (1.0, 1.0, 2.0), ORIENTATIONS["LPS"])
    fixed = np.zeros(grid.shape, np.int16)
    moving = np.zeros(grid.shape, np.int16)
    fixed[4:14, 4:14, 4:14] = 5
    moving[9:19, 4:14, 4:14] = 5
    if extra_fixed_label is not None:
        fixed[16:20, 16:20, 16:20] = extra_fixed_label
    io.write_volume(folder / "f.nii.gz", fixed, grid)
    io.write_volume(folder / "m.nii.gz", moving, grid)
    return grid


def test_evaluate_reports_dice_hd95_and_jacobian(run_cli, tmp_path):
    grid = _shifted_cubes(tmp_path)
    zero = tmp_path / "zero_warp.nii.gz"
    io.write_displacement(zero, np.zeros((*grid.shape, 3), np.float32), grid)
    report = tmp_path / "report.json"
    code, out, err = run_cli("evaluate", tmp_path / "f.nii.gz", tmp_path / "m.nii.gz",
                             "--transform", zero, "-o", report)
    assert code == 0, err
    content = json.loads(report.read_text())
    assert content["dice"] == {"5": pytest.approx(0.5)}
    assert content["mean_dice"] == pytest.approx(0.5)
    assert content["hd95_mm"]["5"] == pytest.approx(5.0)  # the box moved 5 voxels of 1 mm
    assert content["jacobian"]["pct_folding"] == 0.0
    assert content["jacobian"]["min"] == pytest.approx(1.0)
    assert "0.5000" in out
    # A warp that undoes the shift: fixed point x reads the moving box 5 mm further along i.
    undo = np.broadcast_to((grid.direction[:, 0] * 5.0).astype(np.float32), (*grid.shape, 3))
    io.write_displacement(tmp_path / "undo.nii.gz", undo, grid)
    code, out, err = run_cli("evaluate", tmp_path / "f.nii.gz", tmp_path / "m.nii.gz",
                             "--transform", tmp_path / "undo.nii.gz", "--progress", "json")
    assert code == 0, err
    done = json.loads(out.strip().splitlines()[-1])
    assert done["event"] == "done" and done["metrics"]["dice"]["5"] == pytest.approx(1.0)


# ---- register / finetune plumbing (engine replaced by stand-ins) -------------------------------
def test_register_writes_results_and_json_progress(run_cli, pair, fake_engine):
    out = pair["folder"] / "out"
    code, stdout, err = run_cli("register", pair["paths"]["fixed"], pair["paths"]["moving"],
                                "-o", out, "--progress", "json", "--iterations", "5",
                                "--device", "cpu", "--regularisation", "2.5", "--no-png")
    assert code == 0, err
    events = [json.loads(line) for line in stdout.strip().splitlines()]
    assert all(isinstance(e, dict) for e in events)
    network = [e for e in events if e.get("stage") == "network"]
    assert [e["step"] for e in network] == [1, 2, 3] and network[0]["total"] == 3
    assert network[-1]["metrics"]["loss"] == pytest.approx(0.3)
    assert any(e.get("stage") == "write" for e in events)
    assert events[-1]["event"] == "done" and events[-1]["output"] == str(out)
    assert sorted(os.listdir(out)) == sorted(set(RESULT_FILES.values()) - {"overview.png"})
    call = fake_engine["register"]
    assert call["options"] == RegistrationOptions(iterations=5, device="cpu", regularisation=2.5)
    assert call["fixed"].grid == pair["fixed"] and call["moving"].grid == pair["moving"]


def test_register_error_is_one_json_line_and_one_stderr_line(run_cli, pair, fake_engine, tmp_path):
    code, stdout, err = run_cli("register", tmp_path / "nope.nii.gz", pair["paths"]["moving"],
                                "-o", tmp_path / "out", "--progress", "json")
    assert code != 0
    assert json.loads(stdout.strip())["event"] == "error"
    assert err.count("\n") == 1 and err.startswith("liquidreg: error: ")


def test_register_masks_and_initial_affine_are_passed(run_cli, pair, fake_engine):
    fixed = pair["fixed"]
    mask = np.zeros(fixed.shape, np.uint8)
    mask[5:30, 5:25, 5:20] = 1
    io.write_volume(pair["folder"] / "mask.nii.gz", mask, fixed)
    np.savetxt(pair["folder"] / "init.txt", np.eye(4))
    code, _, err = run_cli("register", pair["paths"]["fixed"], pair["paths"]["moving"], "-o",
                           pair["folder"] / "out", "--fixed-mask", pair["folder"] / "mask.nii.gz",
                           "--initial-affine", pair["folder"] / "init.txt", "--no-affine", "-q",
                           "--no-png")
    assert code == 0, err
    call = fake_engine["register"]
    assert call["options"] == RegistrationOptions(affine=False, initial_affine=np.eye(4))
    assert np.array_equal(call["fixed_mask"].array, mask) and call["moving_mask"] is None


def test_ctrl_c_exits_130_without_output(run_cli, pair, fake_engine):
    def interrupt():
        raise KeyboardInterrupt
    fake_engine["register_behaviour"] = interrupt
    out = pair["folder"] / "out"
    code, _, err = run_cli("register", pair["paths"]["fixed"], pair["paths"]["moving"], "-o", out)
    assert code == 130 and "cancelled" in err
    assert not out.exists()


def test_no_inverse_skips_the_inverse_warp(run_cli, pair, fake_engine):
    """The Slicer panel asks for --no-png --no-inverse: the engine skips the inverse and no
    inverse_warp.nii.gz is written; by default both are there."""
    for flags, inverse in (((), True), (("--no-inverse",), False)):
        out = pair["folder"] / f"out{inverse}"
        code, _, err = run_cli("register", pair["paths"]["fixed"], pair["paths"]["moving"],
                               "-o", out, "--no-png", "-q", *flags)
        assert code == 0, err
        assert fake_engine["register"]["inverse"] is inverse
        assert (out / "inverse_warp.nii.gz").exists() is inverse
        assert (out / "warp.nii.gz").exists() and (out / "summary.json").exists()


def test_cancel_file_stops_register_before_anything_is_written(run_cli, pair, fake_engine):
    """The cancel hook (``--cancel-file``) is honoured even after the last engine step."""
    cancel = pair["folder"] / "job.cancel"
    cancel.touch()
    out = pair["folder"] / "out"
    code, stdout, err = run_cli("register", pair["paths"]["fixed"], pair["paths"]["moving"],
                                "-o", out, "--progress", "json", "--cancel-file", cancel)
    assert code == 130 and "cancelled" in err
    assert json.loads(stdout.strip().splitlines()[-1])["event"] == "error"
    assert not out.exists()


def test_unexpected_error_for_a_program_has_no_debug_advice(run_cli, pair, fake_engine):
    """A program (the Slicer panel) gets the traceback on stderr, which it logs, and a message
    its user can act on; a terminal user is told about --debug."""
    def bug():
        raise ZeroDivisionError("division by zero")
    fake_engine["register_behaviour"] = bug
    arguments = ["register", pair["paths"]["fixed"], pair["paths"]["moving"], "-o",
                 pair["folder"] / "out"]
    code, stdout, err = run_cli(*arguments, "--progress", "json")
    message = json.loads(stdout.strip().splitlines()[-1])["message"]
    assert code == 1 and "ZeroDivisionError: division by zero" in message
    assert "--debug" not in message and "--debug" not in err and "log" in message
    assert "Traceback (most recent call last)" in err and ", in bug" in err
    code, _, err = run_cli(*arguments)
    assert code == 1 and "--debug" in err and "Traceback" not in err


def test_finetune_pairs_csv_relative_paths(run_cli, pair, fake_engine, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("a.nii.gz", "b.nii.gz", "a_seg.nii.gz"):
        shutil.copy(pair["paths"]["fixed"], data / name)
    (data / "pairs.csv").write_text("fixed,moving,fixed_labels,moving_labels\n"
                                    "a.nii.gz,b.nii.gz,a_seg.nii.gz,\n"
                                    f"{data / 'b.nii.gz'},a.nii.gz,,\n")
    out = tmp_path / "w.pt"
    code, _, err = run_cli("finetune", "--pairs", data / "pairs.csv", "-o", out, "--steps", "7",
                           "-q")
    assert code == 0, err
    call = fake_engine["finetune"]
    assert call["pairs"] == [(data / "a.nii.gz", data / "b.nii.gz", data / "a_seg.nii.gz", None),
                             (data / "b.nii.gz", data / "a.nii.gz", None, None)]
    assert call["steps"] == 7 and Path(call["output"]) == out


def test_finetune_images_folder_and_output_guards(run_cli, pair, fake_engine, tmp_path):
    from LiquidRegLib.resources import default_weights
    images = tmp_path / "images"
    images.mkdir()
    for name in ("s1.nii.gz", "s2.nrrd", "s3.mha"):
        volume = io.read_volume(pair["paths"]["fixed" if name.endswith("gz") else "moving"])
        io.write_volume(images / name, volume.array, volume.grid)
    (images / "notes.txt").write_text("not an image")
    out = tmp_path / "w.pt"
    code, _, err = run_cli("finetune", "--images", images, "-o", out, "-q")
    assert code == 0, err
    assert len(fake_engine["finetune"]["pairs"]) == 6
    out.write_bytes(b"existing")
    code, _, err = run_cli("finetune", "--images", images, "-o", out, "-q")
    assert code != 0 and "already exists" in err and "allow overwriting" in err
    code, _, err = run_cli("finetune", "--images", images, "-o", out, "-q", "--overwrite")
    assert code == 0, err
    code, _, err = run_cli("finetune", "--images", images, "-o", default_weights(),
                           "--overwrite", "-q")
    assert code != 0 and "shipped" in err


def test_register_defaults_to_the_bundled_sample_pair(run_cli, fake_engine, tmp_path):
    from LiquidRegLib.resources import sample_paths
    paths = sample_paths()
    code, _, err = run_cli("register", "-o", tmp_path / "demo", "--no-png", "-q")
    assert code == 0, err
    call = fake_engine["register"]
    assert call["fixed"].grid == io.read_grid(paths["fixed_t1"])
    assert call["moving"].grid == io.read_grid(paths["moving_t1"])
    code, _, err = run_cli("register", paths["fixed_t1"], "-o", tmp_path / "demo2", "-q")
    assert code != 0 and "both FIXED and MOVING" in err


def test_jacobian_stats_in_chunks_equal_the_direct_formula(monkeypatch):
    """The chunked statistics (bounded memory) equal the textbook ones, on an [i, j, k] view of
    [k, j, i] memory with a mask and non-finite values, whatever the chunk size."""
    from LiquidRegLib import metrics
    rng = np.random.default_rng(0)
    kji = np.exp(rng.normal(0.0, 0.3, (12, 9, 7))).astype(np.float32)
    kji[rng.random(kji.shape) < 0.05] *= -1.0
    kji[0, 0, 0], kji[3, 4, 5] = np.nan, np.inf
    jacobian = kji.transpose(2, 1, 0)
    mask = rng.random(jacobian.shape) < 0.7
    j = jacobian[mask & np.isfinite(jacobian)].astype(np.float64)
    expected = {"pct_folding": 100.0 * np.mean(j <= 0), "std_log_jac": np.log(j[j > 0]).std(),
                "min": j.min(), "max": j.max(), "mean": j.mean()}
    for chunk in (1, 50, 10 ** 6):
        monkeypatch.setattr(metrics, "_STATS_CHUNK", chunk)
        stats = jacobian_stats(jacobian, mask)
        assert stats == pytest.approx(expected, rel=1e-9)


# ---- the smaller bad inputs -------------------------------------------------------------------
def test_apply_refuses_a_singular_matrix(run_cli, pair, tmp_path):
    squash = np.eye(4)
    squash[2, 2] = 0.0  # every point to the plane z = 0: a constant image
    np.savetxt(tmp_path / "squash.txt", squash)
    code, _, err = run_cli("apply", "--reference", pair["paths"]["fixed"], "--transform",
                           tmp_path / "squash.txt", pair["paths"]["moving"], "-o",
                           tmp_path / "out.nii.gz", "-q")
    assert code != 0 and err.count("\n") == 1 and "singular" in err
    assert not (tmp_path / "out.nii.gz").exists()


def test_apply_warns_about_a_label_map_with_linear_interpolation(run_cli, tmp_path):
    grid = build_grid((24, 22, 20), (1.5, 1.5, 1.5), ORIENTATIONS["LPS"])
    io.write_volume(tmp_path / "labels.nii.gz", world_labels(grid, (0.0, 0.0, 0.0), 12.0), grid)
    io.write_volume(tmp_path / "image.nii.gz", world_image(grid), grid)
    np.savetxt(tmp_path / "identity.txt", np.eye(4))
    common = ["--reference", tmp_path / "image.nii.gz", "--transform", tmp_path / "identity.txt"]
    code, _, err = run_cli("apply", *common, tmp_path / "labels.nii.gz", "-o",
                           tmp_path / "a.nii.gz", "-q")
    assert code == 0 and "warning" in err and "--interpolation nearest" in err
    assert err.count("\n") == 1
    for moving, flags in (("labels", ["--interpolation", "nearest"]), ("image", [])):
        code, _, err = run_cli("apply", *common, tmp_path / f"{moving}.nii.gz", "-o",
                               tmp_path / f"b_{moving}.nii.gz", "-q", *flags)
        assert code == 0 and err == "", err


def test_label_maps_and_masks_look_like_labels_and_images_do_not(small_brain_pair):
    from LiquidRegLib.resources import sample_paths
    from LiquidRegLib.validate import looks_like_labels
    for key, path in sample_paths().items():
        assert looks_like_labels(io.read_volume(path, dtype=None).array) == ("labels" in key), key
    fixed, fixed_labels, _, _ = small_brain_pair  # 2 mm: coarser, the labels' regions smaller
    assert looks_like_labels(fixed_labels.array) and not looks_like_labels(fixed.array)
    assert looks_like_labels((fixed_labels.array > 0).astype(np.float32))  # a mask
    assert not looks_like_labels(np.round(fixed.array))  # whole-numbered intensities


def test_finetune_images_leaves_out_label_maps(run_cli, fake_engine, tmp_path):
    from LiquidRegLib.resources import sample_paths
    images = tmp_path / "images"
    images.mkdir()
    for key, path in sample_paths().items():
        shutil.copy(path, images / path.name)
    code, _, err = run_cli("finetune", "--images", images, "-o", tmp_path / "w.pt", "-q")
    assert code == 0, err
    used = {p for pair in fake_engine["finetune"]["pairs"] for p in pair[:2]}
    assert used == {images / "fixed_t1.nii.gz", images / "moving_t1.nii.gz"}
    assert "left out 2 label map(s)" in err and "fixed_labels.nii.gz" in err


def test_evaluate_labels_in_neither_map_one_map_and_quiet(run_cli, tmp_path):
    _shifted_cubes(tmp_path, extra_fixed_label=7)  # 7: only in the fixed map
    files = [tmp_path / "f.nii.gz", tmp_path / "m.nii.gz"]
    code, _, err = run_cli("evaluate", *files, "--labels", "5,99", "-q")
    assert code != 0 and "99" in err and "neither" in err and err.count("\n") == 1
    code, out, err = run_cli("evaluate", *files, "--labels", "5,7", "-q", "-o",
                             tmp_path / "report.json")
    assert code == 0, err
    assert "mean" in out and "      5" in out  # -q hides progress, not the results
    report = json.loads((tmp_path / "report.json").read_text(),
                        parse_constant=lambda name: pytest.fail(f"{name} in the JSON"))
    assert report["dice"]["7"] == 0.0 and report["hd95_mm"]["7"] is None


def test_readme_commands_parse():
    """Every ``liquidreg`` command the README shows is valid syntax for the command line (its
    optional parts included, the first of each a|b choice)."""
    import re
    import shlex

    from LiquidRegLib.cli import build_parser
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        lines = []
        for line in block.splitlines():
            if line.startswith(" ") and line.strip().startswith("[") and lines:
                lines[-1] += " " + line.strip()
            else:
                lines.append(line)
        commands += [line.split("#")[0] for line in lines if line.startswith("liquidreg ")]
    assert len(commands) >= 4, commands
    for command in commands:
        words = [{"N": "3"}.get(w, w.split("|")[0])  # N: a number of steps
                 for w in shlex.split(command.replace("[", " ").replace("]", " "))]
        try:
            build_parser().parse_args(words[1:])
        except SystemExit:
            pytest.fail(f"README command does not parse: {command}")
