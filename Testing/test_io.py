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
from LiquidRegLib.grid import LPS_FLIP, Grid

from conftest import smooth_field, world_image

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
