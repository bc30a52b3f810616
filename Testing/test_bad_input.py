"""Every bad input ends in one line that names the problem, a non-zero exit and no partial output."""
from __future__ import annotations

import gzip

import numpy as np
import pytest
import SimpleITK as sitk

from LiquidRegLib import io

from conftest import ORIENTATIONS, build_grid, world_image

SHAPE = (24, 24, 20)


@pytest.fixture
def good(tmp_path):
    grid = build_grid(SHAPE, (1.5, 1.5, 2.0), ORIENTATIONS["LPS"])
    paths = {"fixed": tmp_path / "fixed.nii.gz", "moving": tmp_path / "moving.nii.gz"}
    io.write_volume(paths["fixed"], world_image(grid), grid)
    io.write_volume(paths["moving"], world_image(grid) * 0.9, grid)
    return dict(grid=grid, folder=tmp_path, **paths)


def _bad_image(kind, folder, grid):
    """Write one kind of bad image; returns (path, extra CLI arguments)."""
    path = folder / f"bad_{kind}.nii.gz"
    image = world_image(grid)
    if kind == "2d":
        sitk.WriteImage(sitk.Image(32, 32, sitk.sitkFloat32), str(path))
    elif kind == "4d":
        sitk.WriteImage(sitk.Image([16, 16, 16, 4], sitk.sitkFloat32), str(path))
    elif kind == "empty":
        io.write_volume(path, np.zeros(grid.shape, np.float32), grid)
    elif kind == "constant":
        io.write_volume(path, np.full(grid.shape, 7.0, np.float32), grid)
    elif kind == "nan":  # NRRD: ITK's NIfTI reader would already have zeroed them (see below)
        path = folder / "bad_nan.nrrd"
        image[3:5, 3:5, 3:5] = np.nan
        image[0, 0, 0] = np.inf
        io.write_volume(path, image, grid)
    elif kind == "tiny":
        small = build_grid((24, 24, 4), (1.0, 1.0, 1.0), np.eye(3))
        io.write_volume(path, world_image(small), small)
    elif kind == "far_away":
        far = build_grid(grid.shape, grid.spacing, grid.direction, (500.0, 0.0, 0.0))
        io.write_volume(path, world_image(far), far)
        return path, ["--no-affine"]
    elif kind == "missing":
        pass
    elif kind == "corrupt":
        path.write_bytes(np.random.default_rng(3).bytes(20000))
    elif kind == "truncated":  # an interrupted copy: the gzip stream stops half-way
        io.write_volume(path, np.random.default_rng(4).random(grid.shape).astype(np.float32), grid)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "short_nifti":  # complete gzip stream of an incomplete NIfTI
        io.write_volume(path, world_image(grid), grid)
        data = gzip.decompress(path.read_bytes())
        path.write_bytes(gzip.compress(data[: len(data) * 3 // 4]))
    elif kind == "truncated_nrrd":
        path = folder / "bad.nrrd"
        io.write_volume(path, world_image(grid), grid)
        path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    elif kind == "not_gzip":
        path.write_bytes(b"\x1f\x8b" + b"definitely not deflate data" * 100)
    return path, []


CASES = [
    ("2d", "2-D"),
    ("4d", "4-D"),
    ("empty", "empty"),
    ("constant", "constant"),
    ("nan", "NaN/Inf"),
    ("tiny", "too small"),
    ("far_away", "do not overlap"),
    ("missing", "does not exist"),
    ("corrupt", "cannot be read"),
    ("truncated", "cannot be read"),
    ("short_nifti", "truncated"),
    ("truncated_nrrd", "cannot be read"),
    ("not_gzip", "cannot be read"),
]


def _assert_one_line_error(code, out, err, expected):
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("liquidreg: error: ")
    assert expected in lines[0]
    return lines[0]


@pytest.mark.parametrize("kind, expected", CASES)
def test_register_rejects_bad_moving_image(run_cli, good, kind, expected):
    bad, extra = _bad_image(kind, good["folder"], good["grid"])
    out = good["folder"] / "OUT"
    code, stdout, err = run_cli("register", good["fixed"], bad, "-o", out, "--quiet", *extra)
    line = _assert_one_line_error(code, stdout, err, expected)
    assert "moving image" in line
    assert not out.exists()


@pytest.mark.parametrize("kind, expected", [("nan", "NaN/Inf"), ("4d", "4-D")])
def test_register_rejects_bad_fixed_image_and_keeps_existing_output(run_cli, good, kind, expected):
    bad, extra = _bad_image(kind, good["folder"], good["grid"])
    out = good["folder"] / "OUT"
    out.mkdir()
    (out / "keep.txt").write_text("user file")
    code, stdout, err = run_cli("register", bad, good["moving"], "-o", out, "--quiet", *extra)
    assert "fixed image" in _assert_one_line_error(code, stdout, err, expected)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_nan_in_nifti_never_reaches_the_engine(good):
    """ITK's NIfTI reader turns NaN/Inf into 0; whichever way, the engine only sees finite values
    (NRRD/MetaImage keep them and the validation above reports them)."""
    from LiquidRegLib.errors import InputError
    from LiquidRegLib.validate import check_image
    image = world_image(good["grid"])
    image[2:4, 2:4, 2:4] = np.nan
    path = good["folder"] / "nan.nii.gz"
    io.write_volume(path, image, good["grid"])
    volume = io.read_volume(path)
    if np.all(np.isfinite(volume.array)):
        check_image(volume)
    else:
        with pytest.raises(InputError, match="NaN/Inf"):
            check_image(volume)


def test_register_rejects_empty_mask(run_cli, good):
    mask = good["folder"] / "mask.nii.gz"
    io.write_volume(mask, np.zeros(good["grid"].shape, np.uint8), good["grid"])
    out = good["folder"] / "OUT"
    code, stdout, err = run_cli("register", good["fixed"], good["moving"], "-o", out,
                                "--fixed-mask", mask, "--quiet")
    _assert_one_line_error(code, stdout, err, "fixed mask")
    assert not out.exists()


def test_register_rejects_corrupt_weights(run_cli, good):
    """Needs the real engine (register.py / checkpoint.py): the weights are read before any work."""
    weights = good["folder"] / "weights.pt"
    weights.write_bytes(np.random.default_rng(5).bytes(4096))
    out = good["folder"] / "OUT"
    code, stdout, err = run_cli("register", good["fixed"], good["moving"], "-o", out,
                                "--weights", weights, "--device", "cpu", "--quiet")
    line = _assert_one_line_error(code, stdout, err, "weights.pt")
    assert "corrupt" in line or "not a" in line
    assert not out.exists()


@pytest.mark.parametrize("kind, expected", [("scalar", "not a 3-D displacement field"),
                                            ("missing", "does not exist"),
                                            ("corrupt", "cannot be read")])
def test_apply_rejects_bad_transform(run_cli, good, kind, expected):
    warp = good["folder"] / "warp.nii.gz"
    if kind == "scalar":
        io.write_volume(warp, world_image(good["grid"]), good["grid"])
    elif kind == "corrupt":
        warp.write_bytes(np.random.default_rng(6).bytes(3000))
    out = good["folder"] / "applied.nii.gz"
    code, stdout, err = run_cli("apply", "--reference", good["fixed"], "--transform", warp,
                                good["moving"], "-o", out, "--quiet")
    _assert_one_line_error(code, stdout, err, expected)
    assert not out.exists()
    assert not [p for p in good["folder"].iterdir() if p.name.startswith(".")]


def test_finetune_rejects_bad_pairs_file(run_cli, good):
    csv = good["folder"] / "pairs.csv"
    csv.write_text("fixed,moving\nfixed.nii.gz,missing.nii.gz\n")
    out = good["folder"] / "w.pt"
    code, stdout, err = run_cli("finetune", "--pairs", csv, "-o", out, "--quiet")
    _assert_one_line_error(code, stdout, err, "missing.nii.gz")
    csv.write_text("a,b\nfixed.nii.gz,moving.nii.gz\n")
    code, stdout, err = run_cli("finetune", "--pairs", csv, "-o", out, "--quiet")
    _assert_one_line_error(code, stdout, err, "'fixed' and 'moving'")
    assert not out.exists()
