"""The overview PNG shows each plane as Slicer does, whatever the file's orientation."""
from __future__ import annotations

import types

import numpy as np
import pytest
from conftest import ORIENTATIONS, build_grid

from LiquidRegLib import figures
from LiquidRegLib.io import Volume

PIL = pytest.importorskip("PIL.Image")

#: (plane, world axis that is split, screen half where its positive side must appear)
EXPECTED = [
    ("axial", 0, "left"),      # patient right on the screen's left (radiological)
    ("axial", 1, "top"),       # anterior up
    ("coronal", 0, "left"),
    ("coronal", 2, "top"),     # superior up
    ("sagittal", 1, "left"),   # anterior on the left, as in Slicer's sagittal view
    ("sagittal", 2, "top"),
]


@pytest.mark.parametrize("orientation", ["LIP", "oblique"])
@pytest.mark.parametrize("plane, axis, where", EXPECTED)
def test_planes_are_shown_in_slicer_screen_directions(orientation, plane, axis, where):
    grid = build_grid((40, 36, 44), (1.5, 2.0, 1.2), ORIENTATIONS[orientation], (5.0, -10.0, 20.0))
    ras = grid.ras_coordinates().numpy()
    image = 1.0 + (ras[..., axis] > grid.center[axis]).astype(np.float32)  # 2 on the + side
    result = types.SimpleNamespace(fixed_grid=grid, warped=image, affine=np.eye(4),
                                   jacobian=np.ones(grid.shape, np.float32))
    target = figures.plane_grid(grid, plane)
    panels = dict(figures._panels(result, Volume(image, grid, "fixed"), None, target))
    shown = np.where(figures._inside(grid, target), panels["fixed"][..., 0], np.nan)
    h, w = shown.shape
    margin = 4  # pixels: linear interpolation blurs the edge over about one source voxel
    if where == "left":
        positive, negative = shown[:, : w // 2 - margin], shown[:, w // 2 + margin:]
    else:
        positive, negative = shown[: h // 2 - margin], shown[h // 2 + margin:]
    # inside the volume, the + side holds the bright half
    bright, dark = np.nanmedian(positive), np.nanmedian(negative)
    assert bright == pytest.approx(1.0) and dark < 0.6


def test_jacobian_colours_are_blue_for_compression_and_red_for_expansion():
    shrink, same, grow = figures.jacobian_colours(np.array([0.3, 1.0, 1.8]))
    assert np.all(same > 0.95)
    assert shrink[2] > shrink[0] + 0.3 and grow[0] > grow[2] + 0.3


def test_overview_png_has_every_panel(tmp_path):
    grid = build_grid((30, 34, 28), (2.0, 2.0, 2.0), ORIENTATIONS["LPS"])
    image = np.random.default_rng(0).random(grid.shape).astype(np.float32)
    result = types.SimpleNamespace(fixed_grid=grid, warped=image, affine=np.eye(4),
                                   jacobian=np.ones(grid.shape, np.float32),
                                   summary={"pct_folding": 0.0})
    path = tmp_path / "overview.png"
    figures.save_overview(path, result, fixed=Volume(image, grid, "f"),
                          moving=Volume(image, grid, "m"))
    with PIL.open(path) as png:
        assert png.mode == "RGB"
        pixels = np.asarray(png)
    cell = max(figures.plane_grid(grid, p).shape[0] for p in figures.PLANES)
    assert pixels.shape[1] >= 5 * cell and pixels.shape[0] >= 3 * cell
    assert list(tmp_path.iterdir()) == [path]  # written atomically, nothing left beside it
