"""Every bad input ends in one line that names the problem, a non-zero exit and no partial output."""
from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import SimpleITK as sitk

from LiquidRegLib import io
from LiquidRegLib.grid import Grid

from conftest import ORIENTATIONS, build_grid, stored_as, world_image

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
    elif kind == "nan":
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
    (out / "summary.json").write_text("{}")  # a previous result
    code, stdout, err = run_cli("register", bad, good["moving"], "-o", out, "--quiet",
                                "--overwrite", *extra)
    assert "fixed image" in _assert_one_line_error(code, stdout, err, expected)
    assert sorted(p.name for p in out.iterdir()) == ["summary.json"]
    assert (out / "summary.json").read_text() == "{}"


@pytest.mark.parametrize("content, flags, expected", [
    (["summary.json", "overview.png"], [], "is not empty"),
    (["notes.txt"], ["--overwrite"], "did not write (notes.txt)"),
])
def test_register_refuses_an_output_folder_it_would_mix_or_lose(run_cli, good, content, flags,
                                                                 expected):
    out = good["folder"] / "OUT"
    out.mkdir()
    for name in content:
        (out / name).write_text("before")
    code, stdout, err = run_cli("register", good["fixed"], good["moving"], "-o", out, "--quiet",
                                *flags)
    _assert_one_line_error(code, stdout, err, expected)
    assert sorted(p.name for p in out.iterdir()) == sorted(content)


@pytest.mark.parametrize("extension", [".nii.gz", ".nii", ".nrrd", ".mha"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nan_or_inf_is_refused_in_every_format(run_cli, good, extension, dtype):
    """ITK's NIfTI library turns NaN/Inf into 0 while reading; LiquidReg reads float NIfTI voxels
    itself, so they are refused like in NRRD and MetaImage, not registered as zeros."""
    image = world_image(good["grid"]).astype(dtype)
    image[2:4, 2:4, 2:4] = np.nan
    image[7, 1, 3] = -np.inf
    path = good["folder"] / f"nan{extension}"
    io.write_volume(path, image, good["grid"])
    assert np.count_nonzero(~np.isfinite(io.read_volume(path).array)) == 9
    out = good["folder"] / "OUT"
    code, stdout, err = run_cli("register", good["fixed"], path, "-o", out, "--quiet")
    assert "moving image" in _assert_one_line_error(code, stdout, err, "9 NaN/Inf")
    assert not out.exists()


def test_float_nifti_read_like_nibabel_with_scaling(tmp_path):
    """The float NIfTI reader applies the header's scl_slope/scl_inter and big-endian storage as
    nibabel does (an independent reader)."""
    nib = pytest.importorskip("nibabel")
    rng = np.random.default_rng(8)
    data = rng.normal(size=(9, 11, 7)).astype(np.float32)
    affine = np.diag([1.5, -2.0, 2.5, 1.0])
    image = nib.Nifti1Image(data.astype(">f4"), affine)
    image.header.set_slope_inter(2.0, -3.0)
    nib.save(image, tmp_path / "scaled.nii.gz")
    volume = io.read_volume(tmp_path / "scaled.nii.gz")
    expected = np.asarray(nib.load(tmp_path / "scaled.nii.gz").get_fdata(), np.float32)
    np.testing.assert_allclose(volume.array, expected, rtol=1e-6, atol=1e-6)
    assert np.allclose(volume.grid.affine, affine)


def test_nan_in_nifti_displacement_is_refused(tmp_path, good):
    from LiquidRegLib.errors import InputError
    field = np.zeros((*good["grid"].shape, 3), np.float32)
    field[1, 2, 3, 1] = np.nan
    io.write_displacement(tmp_path / "warp.nii.gz", field, good["grid"])
    with pytest.raises(InputError, match="NaN/Inf"):
        io.read_displacement(tmp_path / "warp.nii.gz")


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


def test_mask_on_its_own_grid_is_resampled_once_for_every_caller(run_cli, small_brain_pair,
                                                                  tmp_path):
    """A brain mask cropped to the brain and stored LIP (its own grid) registers like the same
    mask on the image's grid, from the command line and from Python (no IndexError)."""
    from LiquidRegLib import register
    from LiquidRegLib.grid import resample

    fixed, fixed_labels, moving, _ = small_brain_pair
    brain = (fixed_labels.array > 0).astype(np.uint8)
    inside = np.argwhere(brain)
    window = tuple(slice(lo, hi + 1) for lo, hi in zip(inside.min(0), inside.max(0)))
    start = np.eye(4)
    start[:3, 3] = [w.start for w in window]
    lip, lip_grid = stored_as(brain[window], Grid(brain[window].shape, fixed.grid.affine @ start),
                              "LIP")
    assert lip.shape != brain.shape
    # the crop really holds the same voxels: back on the image grid (independent nearest lookup)
    assert np.array_equal(resample(lip, lip_grid, fixed.grid, order="nearest"), brain)

    own = io.Volume(lip, lip_grid, "fixed mask")
    on_image = io.Volume(brain, fixed.grid, "fixed mask")
    options = dict(device="cpu", affine=False)
    a = register.register(fixed, moving, fixed_mask=own, **options)
    b = register.register(fixed, moving, fixed_mask=on_image, **options)
    assert np.array_equal(a.displacement, b.displacement)

    for name, volume in (("fixed", fixed), ("moving", moving)):
        io.write_volume(tmp_path / f"{name}.nii.gz", volume.array, volume.grid)
    io.write_volume(tmp_path / "mask.nrrd", lip, lip_grid)
    code, _, err = run_cli("register", tmp_path / "fixed.nii.gz", tmp_path / "moving.nii.gz",
                           "-o", tmp_path / "out", "--fixed-mask", tmp_path / "mask.nrrd",
                           "--moving-mask", tmp_path / "mask.nrrd", "--device", "cpu",
                           "--no-png", "-q")
    assert code == 0, err


def test_too_little_disk_space_is_refused_before_any_work(run_cli, good, fake_engine, monkeypatch):
    import shutil
    from LiquidRegLib import results
    monkeypatch.setattr(results.shutil, "disk_usage",
                        lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 50_000, 50_000))
    out = good["folder"] / "OUT"
    code, stdout, err = run_cli("register", good["fixed"], good["moving"], "-o", out, "--quiet")
    _assert_one_line_error(code, stdout, err, "not enough free disk space")
    assert "register" not in fake_engine and not out.exists()


# ---- inputs that look wrong: refused or flagged before they give a plausible wrong answer -------
def _write_pair(folder, fixed, moving):
    paths = [folder / "fixed.nii.gz", folder / "moving.nii.gz"]
    for path, volume in zip(paths, (fixed, moving)):
        io.write_volume(path, volume.array, volume.grid)
    return paths


@pytest.mark.parametrize("role", ["fixed", "moving"])
def test_a_label_map_given_as_an_image_is_refused(run_cli, tmp_path, small_brain_pair, role):
    """From the command line and from Python, before any work: the message says how labels are
    carried through a registration."""
    from LiquidRegLib import register
    from LiquidRegLib.errors import InputError

    fixed, fixed_labels, moving, moving_labels = small_brain_pair
    volumes = {"fixed": fixed, "moving": moving}
    volumes[role] = fixed_labels if role == "fixed" else moving_labels
    paths = _write_pair(tmp_path, volumes["fixed"], volumes["moving"])
    out = tmp_path / "OUT"
    code, stdout, err = run_cli("register", *paths, "-o", out, "--device", "cpu", "--quiet")
    line = _assert_one_line_error(code, stdout, err, "looks like a label map")
    assert f"{role} image" in line and "'liquidreg apply' with nearest interpolation" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fixed.nii.gz", "moving.nii.gz"]
    with pytest.raises(InputError, match="looks like a label map"):
        register.register(volumes["fixed"], volumes["moving"], device="cpu")


def test_images_stored_as_integers_are_never_taken_for_labels():
    """uint8 and int16 brains, a CT-like image (HU with air clipped flat at -1024 and padding
    at -3024, which make much of it constant) and a brain upsampled by nearest neighbour (blocks
    of equal voxels, not aligned with the array) are images; label maps at 1-3 mm, also
    upsampled, and masks are labels (the margins: scripts/measure_plausibility.py labels)."""
    from measure_plausibility import ct_like

    from LiquidRegLib.grid import resample
    from LiquidRegLib.resources import sample_paths
    from LiquidRegLib.validate import looks_like_labels
    rng = np.random.default_rng(0)
    for role in ("fixed", "moving"):
        t1 = io.read_volume(sample_paths()[f"{role}_t1"], dtype=None)
        labels = io.read_volume(sample_paths()[f"{role}_labels"], dtype=None)
        assert t1.array.dtype == np.uint8
        blocks = t1.array[::2, ::2, ::2].repeat(2, 0).repeat(2, 1).repeat(2, 2)  # upsampled
        for image in (t1.array, t1.array.astype(np.int16) * 16, ct_like(labels.array, rng),
                      blocks[1:, :-1, 3:]):
            assert not looks_like_labels(image), (role, image.dtype)
        for factor in (1, 2, 3):
            grid = Grid(tuple(s // factor for s in labels.grid.shape),
                        labels.grid.affine @ np.diag([factor, factor, factor, 1.0]))
            coarse = resample(labels.array, labels.grid, grid, order="nearest")
            assert looks_like_labels(coarse) and looks_like_labels(coarse > 0), (role, factor)
        assert looks_like_labels(labels.array[::2, ::2, ::2].repeat(3, 0).repeat(3, 1).repeat(3, 2))


def test_evaluate_refuses_intensity_images(run_cli, tmp_path):
    """Two T1s stored as uint8 hold whole numbers, but their Dice would mean nothing."""
    from LiquidRegLib.resources import sample_paths
    paths = sample_paths()
    report = tmp_path / "report.json"
    code, stdout, err = run_cli("evaluate", paths["fixed_t1"], paths["moving_t1"], "-o", report,
                                "--quiet")
    line = _assert_one_line_error(code, stdout, err, "looks like an intensity image")
    assert "fixed label map 'fixed_t1.nii.gz'" in line and code == 2
    assert not report.exists()


def _cut(volume, keep):
    """``volume`` cut to the voxel box ``keep``, on the matching sub-grid."""
    start = np.eye(4)
    start[:3, 3] = [s.start or 0 for s in keep]
    return io.Volume(np.ascontiguousarray(volume.array[keep]),
                     Grid(volume.array[keep].shape, volume.grid.affine @ start))


def test_a_partial_field_of_view_is_flagged_and_recorded(run_cli, tmp_path, small_brain_pair):
    """A moving slab covering part of the fixed brain: the result is written, with one warning
    line and the coverage, the warning and the masks used in summary.json."""
    fixed, fixed_labels, moving, _ = small_brain_pair
    depth = moving.grid.shape[2]
    slab = _cut(moving, (slice(None), slice(None), slice(depth // 4, 3 * depth // 4)))
    paths = _write_pair(tmp_path, fixed, slab)
    mask = tmp_path / "brain.nii.gz"
    io.write_volume(mask, (fixed_labels.array > 0).astype(np.uint8), fixed.grid)
    out = tmp_path / "OUT"
    code, _, err = run_cli("register", *paths, "-o", out, "--fixed-mask", mask, "--no-affine",
                           "--device", "cpu", "--no-png", "--quiet")
    assert code == 0, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("liquidreg: warning: only "), err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["warnings"] == [lines[0].split("warning: ", 1)[1]]
    # independently: the share of the mask's voxels within the slab's extent along S
    z = fixed.grid.voxel_to_ras(np.argwhere(fixed_labels.array > 0))[:, 2]
    low, high = sorted(slab.grid.voxel_to_ras(np.array([[0, 0, -0.5],
                                                        [0, 0, slab.grid.shape[2] - 0.5]]))[:, 2])
    share = np.mean((z >= low) & (z <= high))
    assert 0.3 < share < 0.8
    assert summary["overlap"]["fixed_covered"] == pytest.approx(share, abs=0.04)
    assert summary["overlap"]["moving_covered"] > 0.9
    assert f"{summary['overlap']['fixed_covered']:.0%}" in lines[0]
    assert summary["masks"] == {"fixed": "fixed mask 'brain.nii.gz'", "moving": None}
    assert summary["inputs"] == {"fixed": str(paths[0]), "moving": str(paths[1]),
                                 "fixed_mask": str(mask), "moving_mask": None}


def test_a_field_of_view_too_small_to_mean_anything_is_refused(run_cli, tmp_path,
                                                                small_brain_pair):
    """A 32 mm cube of a brain as the moving image of a whole brain: refused after the affine,
    nothing written."""
    fixed, _, moving, _ = small_brain_pair
    centre = [s // 2 for s in moving.grid.shape]
    cube = _cut(moving, tuple(slice(c - 8, c + 8) for c in centre))  # 16 voxels of 2 mm
    paths = _write_pair(tmp_path, fixed, cube)
    out = tmp_path / "OUT"
    code, stdout, err = run_cli("register", *paths, "-o", out, "--no-affine", "--device", "cpu",
                                "--quiet")
    line = _assert_one_line_error(code, stdout, err, "too little is shared")
    assert "register the partial image as the fixed image" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fixed.nii.gz", "moving.nii.gz"]
    # the other way round (the cube as the fixed image) is a registration of the cube's region
    code, _, err = run_cli("register", paths[1], paths[0], "-o", out, "--no-affine", "--device",
                           "cpu", "--no-png", "--quiet")
    assert code == 0 and err == "", err


def test_apply_follows_the_overwrite_rule_of_register(run_cli, good):
    np.savetxt(good["folder"] / "identity.txt", np.eye(4))
    out = good["folder"] / "warped.nii.gz"
    out.write_bytes(b"mine")
    arguments = ["apply", "--reference", good["fixed"], "--transform",
                 good["folder"] / "identity.txt", good["moving"], "-o", out, "--quiet"]
    code, stdout, err = run_cli(*arguments)
    assert "--overwrite" in _assert_one_line_error(code, stdout, err, "already exists")
    assert out.read_bytes() == b"mine"
    code, _, err = run_cli(*arguments, "--overwrite")
    assert code == 0, err
    assert io.read_volume(out).grid == good["grid"]


@pytest.mark.parametrize("command", ["register", "batch", "apply", "evaluate"])
def test_an_output_inside_a_file_names_the_file(run_cli, good, command):
    """``-o afile/sub`` where afile is a file: the message says so (not "permission denied")."""
    afile = good["folder"] / "afile"
    afile.write_text("mine")
    (good["folder"] / "pairs.csv").write_text("fixed,moving\nfixed.nii.gz,moving.nii.gz\n")
    arguments = {
        "register": ["register", good["fixed"], good["moving"], "-o", afile / "sub"],
        "batch": ["batch", good["folder"] / "pairs.csv", "-o", afile / "sub"],
        "apply": ["apply", "--reference", good["fixed"], "--transform", good["fixed"],
                  good["moving"], "-o", afile / "sub" / "out.nii.gz"],
        "evaluate": ["evaluate", good["fixed"], good["moving"], "-o", afile / "report.json"],
    }[command]
    code, stdout, err = run_cli(*arguments, "--quiet")
    line = _assert_one_line_error(code, stdout, err, f"'{afile}' is a file, not a folder")
    assert "permission" not in line and code == 2
    assert afile.read_text() == "mine"
