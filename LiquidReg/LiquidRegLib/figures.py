"""The overview PNG: one glance to judge a registration.

Columns: fixed, moving after the affine only, warped moving, a fixed/warped checkerboard and the
Jacobian determinant (blue = compression, red = expansion, white = 1).  Rows: axial, coronal and
sagittal planes through the centre of the fixed image, shown as Slicer shows them (radiological:
patient right on the left of the screen; anterior up in axial, superior up otherwise).  Each plane
is resampled from world coordinates, so any orientation or obliquity of the files displays right.

The panels are composed into one RGB mosaic drawn on a single matplotlib Agg canvas (no pyplot:
safe in a worker thread, and ~1 s cheaper than a grid of axes).
"""
from __future__ import annotations

import numpy as np

from .grid import Grid, resample

#: Plane name -> (screen-right direction, screen-up direction, normal), unit RAS vectors.
PLANES = {
    "axial": ((-1, 0, 0), (0, 1, 0), (0, 0, 1)),
    "coronal": ((-1, 0, 0), (0, 0, 1), (0, 1, 0)),
    "sagittal": ((0, -1, 0), (0, 0, 1), (1, 0, 0)),
}
_LETTERS = {(1, 0, 0): "R", (-1, 0, 0): "L", (0, 1, 0): "A", (0, -1, 0): "P",
            (0, 0, 1): "S", (0, 0, -1): "I"}
JACOBIAN_RANGE = (0.0, 2.0)  # colour scale, centred at 1 (no change in volume)
_GAP = 6  # pixels between panels


def plane_grid(grid: Grid, plane: str, max_pixels: int = 256) -> Grid:
    """A one-voxel-thick, square-pixel grid spanning ``grid``'s field of view through its centre."""
    right, up, normal = (np.array(v, dtype=float) for v in PLANES[plane])
    corners = grid.corners_ras()
    lo_u, hi_u = (corners @ right).min(), (corners @ right).max()
    lo_v, hi_v = (corners @ up).min(), (corners @ up).max()
    step = max(float(grid.spacing.min()), max(hi_u - lo_u, hi_v - lo_v) / (max_pixels - 1))
    shape = (int((hi_u - lo_u) / step) + 1, int((hi_v - lo_v) / step) + 1, 1)
    m = np.eye(4)
    m[:3, 0], m[:3, 1], m[:3, 2] = right * step, up * step, normal
    m[:3, 3] = lo_u * right + lo_v * up + (grid.center @ normal) * normal
    return Grid(shape, m)


def _slice(array, source: Grid, target: Grid, world_map=None) -> np.ndarray:
    """The plane as a screen image: rows top to bottom, columns left to right."""
    plane = resample(np.asarray(array, dtype=np.float32), source, target, world_map=world_map)
    return plane[:, :, 0].T[::-1]


def _inside(source: Grid, target: Grid) -> np.ndarray:
    """Which pixels of the plane ``target`` fall inside ``source``'s field of view (screen layout)."""
    ijk = source.ras_to_voxel(target.voxel_to_ras(np.indices(target.shape).reshape(3, -1).T))
    ok = np.all((ijk > -0.5) & (ijk < np.array(source.shape) - 0.5), axis=1)
    return ok.reshape(target.shape)[:, :, 0].T[::-1]


def _gray(image: np.ndarray) -> np.ndarray:
    """Robust [0, 1] display scaling of one slice, as RGB."""
    values = image[image != 0]
    lo, hi = np.percentile(values, [1, 99.5]) if values.size else (0.0, 1.0)
    scaled = np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1)
    return np.repeat(scaled[..., None], 3, axis=-1)


def _checkerboard(a: np.ndarray, b: np.ndarray, tiles: int = 8) -> np.ndarray:
    size = max(1, max(a.shape[:2]) // tiles)
    ii, jj = np.indices(a.shape[:2])
    return np.where((((ii // size) + (jj // size)) % 2 == 0)[..., None], a, b)


def _panels(result, fixed, moving, target: Grid):
    """(title, RGB image) for each column of one plane."""
    from matplotlib import colormaps
    from matplotlib.colors import TwoSlopeNorm

    grid = result.fixed_grid
    warped = _gray(_slice(result.warped, grid, target))
    panels = []
    if fixed is not None:
        fixed_rgb = _gray(_slice(fixed.array, fixed.grid, target))
        panels.append(("fixed", fixed_rgb))
    if moving is not None:
        panels.append(("moving (affine only)",
                       _gray(_slice(moving.array, moving.grid, target, world_map=result.affine))))
    panels.append(("warped", warped))
    if fixed is not None:
        panels.append(("checkerboard fixed / warped", _checkerboard(fixed_rgb, warped)))
    low, high = JACOBIAN_RANGE
    norm = TwoSlopeNorm(vmin=low, vcenter=1.0, vmax=high)
    jacobian = colormaps["RdBu_r"](norm(_slice(result.jacobian, grid, target)))[..., :3]
    panels.append(("Jacobian determinant", jacobian))
    outside = ~_inside(grid, target)
    return [(title, np.where(outside[..., None], 0.0, image)) for title, image in panels]


def save_overview(path, result, *, fixed=None, moving=None, dpi: int = 100) -> None:
    """Render the overview of a RegistrationResult to ``path`` (PNG, written atomically)."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure

    from .io import atomic_output

    planes = {name: plane_grid(result.fixed_grid, name) for name in PLANES}
    rows = {name: _panels(result, fixed, moving, target) for name, target in planes.items()}
    cell_h = max(p[0][1].shape[0] for p in rows.values())
    cell_w = max(p[0][1].shape[1] for p in rows.values())
    columns = [title for title, _ in next(iter(rows.values()))]
    top, left = 52, 70  # room for the caption, titles and row names
    height = top + len(rows) * (cell_h + _GAP)
    width = left + len(columns) * (cell_w + _GAP) + 70  # + colour bar
    canvas = np.zeros((height, width, 3))
    labels = []
    for r, (name, panels) in enumerate(rows.items()):
        right, up, _ = PLANES[name]
        for c, (_, image) in enumerate(panels):
            h, w = image.shape[:2]
            y0 = top + r * (cell_h + _GAP) + (cell_h - h) // 2
            x0 = left + c * (cell_w + _GAP) + (cell_w - w) // 2
            canvas[y0:y0 + h, x0:x0 + w] = image
            labels += [(x0 + 3, y0 + h / 2, _LETTERS[tuple(-v for v in right)], "left"),
                       (x0 + w - 3, y0 + h / 2, _LETTERS[right], "right"),
                       (x0 + w / 2, y0 + 8, _LETTERS[up], "center")]

    figure = Figure(figsize=(width / dpi, height / dpi), dpi=dpi, facecolor="black")
    FigureCanvasAgg(figure)
    ax = figure.add_axes((0, 0, 1, 1))
    ax.imshow(canvas, interpolation="nearest")
    ax.set_axis_off()
    for x, y, letter, align in labels:
        ax.text(x, y, letter, color="yellow", fontsize=7, ha=align, va="center")
    for c, title in enumerate(columns):
        ax.text(left + c * (cell_w + _GAP) + cell_w / 2, top - 8, title, color="white",
                fontsize=9, ha="center")
    for r, name in enumerate(rows):
        ax.text(left - 10, top + r * (cell_h + _GAP) + cell_h / 2, name, color="white",
                fontsize=9, ha="right", va="center", rotation=90)
    summary = getattr(result, "summary", None) or {}
    folding = summary.get("pct_folding")
    caption = "LiquidReg" + (f"   folding (J <= 0): {folding:.3f} % of voxels"
                             if isinstance(folding, (int, float)) else "")
    ax.text(8, 14, caption, color="white", fontsize=9)
    bar_axes = figure.add_axes((1 - 45 / width, 0.15, 12 / width, 0.7))
    low, high = JACOBIAN_RANGE
    bar = figure.colorbar(ScalarMappable(TwoSlopeNorm(vmin=low, vcenter=1.0, vmax=high),
                                         colormaps["RdBu_r"]), cax=bar_axes)
    bar.ax.tick_params(colors="white", labelsize=7)
    bar.set_label("Jacobian", color="white", fontsize=8)
    with atomic_output(path) as tmp:
        figure.savefig(tmp, format="png", facecolor="black", dpi=dpi)
