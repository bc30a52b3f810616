"""Image, displacement and result files: geometry and voxels must survive every format.

Independent references: nibabel's affine for NIfTI, the NRRD and MetaImage text headers parsed
here by hand, and files written by nibabel rather than by us.
"""
from __future__ import annotations

import gzip
import os
import re

import numpy as np
import pytest
import SimpleITK as sitk

from LiquidRegLib import io
from LiquidRegLib.errors import InputError
from LiquidRegLib.grid import LPS_FLIP

from conftest import build_grid, smooth_field, world_image

FORMATS = (".nii.gz", ".nii", ".nrrd", ".mha")
GRID_NAMES = ("oblique_aniso", "LPS", "LIP_aniso", "RAS_aniso")


def _files(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("ext", FORMATS)
@pytest.mark.parametrize("grid_name", GRID_NAMES)
def test_volume_round_trip(tmp_path, grids, ext, grid_name):
    grid = grids[grid_name]
    image = world_image(grid)
    labels = (image // 17).astype(np.int16)
    io.write_volume(tmp_path / f"image{ext}", image, grid)
    io.write_volume(tmp_path / f"labels{ext}", labels, grid)
    back = io.read_volume(tmp_path / f"image{ext}")
    back_labels = io.read_volume(tmp_path / f"labels{ext}", dtype=None)
    assert back.grid == grid
    assert np.allclose(back.grid.affine, grid.affine, atol=1e-5)
    assert back.grid.orientation == grid.orientation
    assert back.array.dtype == np.float32 and np.array_equal(back.array, image)
    assert back_labels.array.dtype == np.int16 and np.array_equal(back_labels.array, labels)
    assert not [n for n in _files(tmp_path) if n.startswith(".")], "temporary files left behind"


@pytest.mark.parametrize("grid_name", GRID_NAMES)
def test_nifti_affine_matches_nibabel(tmp_path, grids, grid_name):
    nib = pytest.importorskip("nibabel")
    grid = grids[grid_name]
    image = world_image(grid)
    path = tmp_path / "image.nii.gz"
    io.write_volume(path, image, grid)
    loaded = nib.load(str(path))
    assert np.allclose(loaded.affine, grid.affine, atol=1e-4)
    assert np.array_equal(np.asarray(loaded.dataobj), image)  # same [i, j, k] order


@pytest.mark.parametrize("grid_name", GRID_NAMES)
def test_reads_nifti_written_by_nibabel(tmp_path, grids, grid_name):
    nib = pytest.importorskip("nibabel")
    grid = grids[grid_name]
    image = world_image(grid)
    path = tmp_path / "nib.nii.gz"
    nifti = nib.Nifti1Image(image, grid.affine)
    nifti.set_qform(grid.affine, code=1)
    nifti.set_sform(grid.affine, code=1)
    nib.save(nifti, str(path))
    volume = io.read_volume(path)
    assert np.allclose(volume.grid.affine, grid.affine, atol=1e-4)
    assert np.array_equal(volume.array, image)


def _nrrd_header_affine(path) -> tuple[np.ndarray, tuple]:
    """voxel -> RAS from an NRRD header, parsed from its text (independent of ITK)."""
    header = {}
    with open(path, "rb") as f:
        for raw in f:
            line = raw.decode("ascii").strip()
            if not line:
                break
            if ":" in line and not line.startswith("#"):
                key, value = line.split(":", 1)
                header[key.strip()] = value.strip()
    vectors = [[float(v) for v in vec.split(",")]
               for vec in re.findall(r"\(([^)]*)\)", header["space directions"])]
    origin = [float(v) for v in re.findall(r"\(([^)]*)\)", header["space origin"])[0].split(",")]
    m = np.eye(4)
    m[:3, :3] = np.array(vectors).T  # one vector per array axis -> columns
    m[:3, 3] = origin
    space = header["space"]
    assert space in ("left-posterior-superior", "right-anterior-superior")
    if space == "left-posterior-superior":
        m = np.diag([-1.0, -1.0, 1.0, 1.0]) @ m
    sizes = tuple(int(v) for v in header["sizes"].split())
    return m, sizes


@pytest.mark.parametrize("grid_name", GRID_NAMES)
def test_nrrd_header_matches_grid(tmp_path, grids, grid_name):
    grid = grids[grid_name]
    path = tmp_path / "image.nrrd"
    io.write_volume(path, world_image(grid), grid)
    affine, sizes = _nrrd_header_affine(path)
    assert sizes == grid.shape
    assert np.allclose(affine, grid.affine, atol=1e-5)


def _metaimage_header_affine(path) -> np.ndarray:
    """voxel -> RAS from a MetaImage header (LPS; TransformMatrix lists the axis vectors)."""
    header = {}
    with open(path, "rb") as f:
        for raw in f:
            key, _, value = raw.decode("latin-1").partition("=")
            header[key.strip()] = value.strip()
            if key.strip() == "ElementDataFile":
                break
    matrix = np.array([float(v) for v in header["TransformMatrix"].split()]).reshape(3, 3)
    spacing = np.array([float(v) for v in header["ElementSpacing"].split()])
    m = np.eye(4)
    m[:3, :3] = matrix.T * spacing  # MetaIO stores the direction column-major (axis vectors)
    m[:3, 3] = [float(v) for v in header["Offset"].split()]
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ m


@pytest.mark.parametrize("grid_name", GRID_NAMES)
def test_metaimage_header_matches_grid(tmp_path, grids, grid_name):
    grid = grids[grid_name]
    path = tmp_path / "image.mha"
    io.write_volume(path, world_image(grid), grid)
    assert np.allclose(_metaimage_header_affine(path), grid.affine, atol=1e-5)


def test_detached_headers_round_trip(tmp_path, grids):
    grid = grids["oblique_aniso"]
    image = world_image(grid)
    for name in ("image.mhd", "image.nhdr"):
        io.write_volume(tmp_path / name, image, grid)
        back = io.read_volume(tmp_path / name)
        assert back.grid == grid and np.array_equal(back.array, image)
    assert not [n for n in _files(tmp_path) if n.startswith(".")]


@pytest.mark.parametrize("grid_name", ("oblique_aniso", "LIP_aniso"))
def test_displacement_round_trip_and_itk_layout(tmp_path, grids, grid_name):
    nib = pytest.importorskip("nibabel")
    grid = grids[grid_name]
    field = smooth_field(grid)
    path = tmp_path / "warp.nii.gz"
    io.write_displacement(path, field, grid)
    back, back_grid = io.read_displacement(path)
    assert back_grid == grid and np.allclose(back, field, atol=1e-6)
    # ITK/ANTs layout: 5-D (X, Y, Z, 1, 3), vector intent, LPS vectors, same voxel->RAS.
    loaded = nib.load(str(path))
    assert loaded.shape == (*grid.shape, 1, 3)
    assert loaded.header.get_intent()[0] == "vector"
    assert np.allclose(loaded.affine, grid.affine, atol=1e-4)
    stored = np.asarray(loaded.dataobj)[:, :, :, 0, :]
    assert np.allclose(stored, field * LPS_FLIP.diagonal()[:3], atol=1e-6)


def test_displacement_is_read_in_itk_memory_order(tmp_path, grids):
    """The field read back is an [i, j, k] view of [k, j, i] memory (what VTK's grid and the
    writers take without copying), holding the same vectors."""
    grid = grids["oblique_aniso"]
    field = smooth_field(grid)
    io.write_displacement(tmp_path / "warp.nii.gz", field, grid)
    back, _ = io.read_displacement(tmp_path / "warp.nii.gz")
    assert back.transpose(2, 1, 0, 3).flags.c_contiguous
    assert np.allclose(back, field, atol=1e-6)


@pytest.mark.parametrize("ext", [".nii.gz", ".nrrd"])
@pytest.mark.parametrize("dtype", [np.float32, np.int16])
def test_volume_read_in_itk_memory_order(tmp_path, grids, ext, dtype):
    """``itk_order=True`` gives the same voxels as an [i, j, k] view of [k, j, i] memory (the
    voxels of an ITK-read file copied out of ITK's image, which may go away)."""
    grid = grids["LIP_aniso"]
    image = (np.random.default_rng(2).random(grid.shape) * 100).astype(dtype)
    io.write_volume(tmp_path / f"image{ext}", image, grid)
    for keep in (None, np.float32):
        plain = io.read_volume(tmp_path / f"image{ext}", dtype=keep)
        ordered = io.read_volume(tmp_path / f"image{ext}", dtype=keep, itk_order=True)
        assert ordered.grid == plain.grid and ordered.array.dtype == plain.array.dtype
        assert np.array_equal(ordered.array, plain.array)
        assert ordered.array.transpose(2, 1, 0).flags.c_contiguous


def test_gzip_members_and_damage(tmp_path, grids):
    """NIfTI voxels are inflated in large blocks: a file of several gzip members (concatenated
    streams, as some tools write) reads whole, and a flipped byte in stored (level 0) data is
    caught by gzip's CRC, not read as a wrong vector."""
    grid = grids["LPS"]
    field = smooth_field(grid)
    io.write_displacement(tmp_path / "warp.nii.gz", field, grid)
    raw = gzip.decompress((tmp_path / "warp.nii.gz").read_bytes())
    middle = len(raw) // 2
    (tmp_path / "members.nii.gz").write_bytes(gzip.compress(raw[:middle], 1) +
                                               gzip.compress(raw[middle:], 6))
    back, _ = io.read_displacement(tmp_path / "members.nii.gz")
    assert np.allclose(back, field, atol=1e-6)
    stored = bytearray(gzip.compress(raw, 0))
    stored[len(stored) // 2] ^= 0xFF
    (tmp_path / "damaged.nii.gz").write_bytes(bytes(stored))
    with pytest.raises(InputError, match="corrupt"):
        io.read_displacement(tmp_path / "damaged.nii.gz")


def test_gzip_only_when_it_pays(tmp_path, grids):
    grid = grids["RAS_aniso"]
    sparse = np.zeros(grid.shape, np.float32)
    sparse[4:8, 4:8, 4:8] = 1
    noise = np.random.default_rng(0).random(grid.shape).astype(np.float32)
    io.write_volume(tmp_path / "sparse.nii.gz", sparse, grid)
    io.write_volume(tmp_path / "noise.nii.gz", noise, grid)
    raw = sparse.nbytes
    assert os.path.getsize(tmp_path / "sparse.nii.gz") < 0.2 * raw
    assert os.path.getsize(tmp_path / "noise.nii.gz") > raw  # stored: gzip without deflating
    with gzip.open(tmp_path / "noise.nii.gz") as f:  # still a valid gzip file
        assert len(f.read()) > raw
    assert np.array_equal(io.read_volume(tmp_path / "noise.nii.gz").array, noise)
    io.write_volume(tmp_path / "kept.nii.gz", sparse, grid, compress=False)  # read once, deleted
    assert os.path.getsize(tmp_path / "kept.nii.gz") > raw
    assert np.array_equal(io.read_volume(tmp_path / "kept.nii.gz").array, sparse)


def test_read_affine_text_and_itk(tmp_path):
    ras = np.array([[0.98, -0.17, 0.0, 4.0], [0.17, 0.98, 0.05, -2.0],
                    [0.0, -0.05, 1.02, 7.5], [0, 0, 0, 1]])
    np.savetxt(tmp_path / "m.txt", ras)
    assert np.allclose(io.read_affine(tmp_path / "m.txt"), ras)
    # An ITK affine (LPS, with a centre of rotation) must map points exactly as ITK does.
    itk = sitk.AffineTransform(3)
    itk.SetMatrix([1.01, 0.1, 0.0, -0.08, 0.97, 0.02, 0.0, 0.03, 1.05])
    itk.SetTranslation([3.0, -4.0, 2.5])
    itk.SetCenter([10.0, 20.0, -5.0])
    sitk.WriteTransform(itk, str(tmp_path / "a.tfm"))
    matrix = io.read_affine(tmp_path / "a.tfm")
    point_ras = np.array([12.0, -31.0, 44.0])
    expected_lps = itk.TransformPoint((LPS_FLIP[:3, :3] @ point_ras).tolist())
    assert np.allclose(matrix[:3, :3] @ point_ras + matrix[:3, 3],
                       LPS_FLIP[:3, :3] @ np.array(expected_lps), atol=1e-6)


@pytest.mark.parametrize("case, expected", [
    ("missing", "does not exist"),
    ("corrupt", "corrupt"),
    ("2d", "2-D"),
    ("slice", "2-D"),
    ("4d", "4-D"),
    ("vector", "values per voxel"),
    ("folder", "folder"),
    ("extension", "not a supported image type"),
])
def test_read_volume_rejects(tmp_path, case, expected):
    path = tmp_path / "bad.nii.gz"
    if case == "corrupt":
        path.write_bytes(np.random.default_rng(1).bytes(5000))
    elif case == "2d":
        sitk.WriteImage(sitk.Image(20, 20, sitk.sitkFloat32), str(path))
    elif case == "slice":
        sitk.WriteImage(sitk.Image(20, 20, 1, sitk.sitkFloat32), str(path))
    elif case == "4d":
        sitk.WriteImage(sitk.Image([12, 12, 12, 3], sitk.sitkFloat32), str(path))
    elif case == "vector":
        sitk.WriteImage(sitk.Image([12, 12, 12], sitk.sitkVectorFloat32, 3), str(path))
    elif case == "folder":
        path = tmp_path / "dir.nii.gz"
        path.mkdir()
    elif case == "extension":
        path = tmp_path / "image.png"
        path.write_bytes(b"\x89PNG")
    with pytest.raises(InputError) as info:
        io.read_volume(path, name="moving image")
    message = str(info.value)
    assert expected in message and "\n" not in message and "moving image" in message


@pytest.mark.parametrize("dtype", [np.float32, np.int16, np.uint8])
@pytest.mark.parametrize("grid_name", GRID_NAMES)
def test_streamed_nifti_is_the_file_itk_writes(tmp_path, grids, grid_name, dtype, monkeypatch):
    """LiquidReg streams NIfTI voxels itself (no copies of a whole image); the file is byte for
    byte the one ITK writes, header included, scalar and vector, in several chunks."""
    grid = grids[grid_name]
    monkeypatch.setattr(io, "_CHUNK_BYTES", 1000)  # many chunks even for a small image
    image = (world_image(grid) * (1 if dtype == np.float32 else 0.5)).astype(dtype)
    io.write_volume(tmp_path / "ours.nii", image, grid)
    kji = np.ascontiguousarray(image.transpose(2, 1, 0))
    sitk.WriteImage(io._itk_image(kji, grid), str(tmp_path / "itk.nii"))
    assert (tmp_path / "ours.nii").read_bytes() == (tmp_path / "itk.nii").read_bytes()
    if dtype != np.float32:
        return
    field = smooth_field(grid)
    io.write_displacement(tmp_path / "ours_warp.nii", field, grid)
    lps = np.ascontiguousarray((field * LPS_FLIP[:3, :3].diagonal()).transpose(2, 1, 0, 3))
    sitk.WriteImage(io._itk_image(lps.astype(np.float32), grid, vector=True),
                    str(tmp_path / "itk_warp.nii"))
    assert (tmp_path / "ours_warp.nii").read_bytes() == (tmp_path / "itk_warp.nii").read_bytes()


DISK_LIMITED = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)       # a write past the limit fails (EFBIG)
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
from LiquidRegLib.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.skipif(os.name != "posix", reason="RLIMIT_FSIZE")
@pytest.mark.parametrize("extension, expected", [(".nii.gz", "the disk is full"),
                                                 (".nii", "the disk is full"),
                                                 (".nrrd", "cannot write")])
def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, grids, extension, expected):
    """Writes that fail for lack of space end in one line naming the problem and the fix, with
    no raw library output, no 'please report' and no partial file."""
    import subprocess
    import sys
    grid = build_grid((64, 64, 64), (1.0, 1.0, 1.0), np.eye(3))
    rng = np.random.default_rng(0)
    io.write_volume(tmp_path / "moving.nii.gz", rng.random(grid.shape).astype(np.float32), grid)
    out = tmp_path / f"applied{extension}"
    np.savetxt(tmp_path / "identity.txt", np.eye(4))
    run = subprocess.run([sys.executable, "-c", DISK_LIMITED, "apply", "--reference",
                          str(tmp_path / "moving.nii.gz"), "--transform",
                          str(tmp_path / "identity.txt"), str(tmp_path / "moving.nii.gz"),
                          "-o", str(out), "--quiet"], capture_output=True, text=True)
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and "report" not in lines[0], run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["identity.txt", "moving.nii.gz"]
