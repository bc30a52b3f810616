"""The overview PNG: one glance to judge a registration.

Columns: fixed, moving after the affine only, warped moving, a fixed/warped checkerboard and the
Jacobian determinant (blue = compression, red = expansion, centred at 1).  Rows: axial, coronal and
sagittal planes through the centre of the fixed image, shown as Slicer shows them (radiological:
patient right on the left of the screen; anterior up in axial, superior up otherwise).  Each plane
is resampled from world coordinates, so any orientation or obliquity of the files displays right.
Rendering uses matplotlib's Agg canvas directly (no pyplot), which is safe in a worker thread.
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


def _slice(array, source: Grid, target: Grid, world_map=None, order="linear") -> np.ndarray:
    return resample(np.asarray(array, dtype=np.float32), source, target, world_map=world_map,
                    order=order)[:, :, 0]


def _inside(source: Grid, target: Grid) -> np.ndarray:
    """Which pixels of ``target`` fall inside ``source``'s field of view."""
    ijk = source.ras_to_voxel(target.voxel_to_ras(np.indices(target.shape).reshape(3, -1).T))
    ok = np.all((ijk > -0.5) & (ijk < np.array(source.shape) - 0.5), axis=1)
    return ok.reshape(target.shape)[:, :, 0]


def _window(image: np.ndarray) -> np.ndarray:
    """Robust [0, 1] display scaling of one slice."""
    values = image[np.isfinite(image) & (image != 0)]
    if values.size == 0:
        return np.zeros_like(image)
    lo, hi = np.percentile(values, [1, 99.5])
    return np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1)


def _checkerboard(a: np.ndarray, b: np.ndarray, tiles: int = 8) -> np.ndarray:
    size = max(1, max(a.shape) // tiles)
    ii, jj = np.indices(a.shape)
    return np.where(((ii // size) + (jj // size)) % 2 == 0, a, b)


def save_overview(path, result, *, fixed=None, moving=None, dpi: int = 90) -> None:
    """Render the overview of a RegistrationResult to ``path`` (PNG, written atomically)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure

    from .io import atomic_output

    grid = result.fixed_grid
    columns = []
    if fixed is not None:
        columns.append(("fixed", lambda g: _window(_slice(fixed.array, fixed.grid, g))))
    if moving is not None:
        columns.append(("moving (affine only)", lambda g: _window(
            _slice(moving.array, moving.grid, g, world_map=result.affine))))
    columns.append(("warped", lambda g: _window(_slice(result.warped, grid, g))))
    if fixed is not None:
        columns.append(("checkerboard fixed / warped", lambda g: _checkerboard(
            _window(_slice(fixed.array, fixed.grid, g)), _window(_slice(result.warped, grid, g)))))
    columns.append(("Jacobian determinant", lambda g: _slice(result.jacobian, grid, g)))

    figure = Figure(figsize=(2.6 * len(columns) + 0.6, 2.7 * len(PLANES)), dpi=dpi,
                    facecolor="black")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(PLANES), len(columns), squeeze=False)
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=2.0)
    for row, plane in enumerate(PLANES):
        target = plane_grid(grid, plane)
        outside = ~_inside(grid, target)
        right, up, _ = PLANES[plane]
        for col, (title, render) in enumerate(columns):
            ax = axes[row, col]
            image = render(target)
            image = np.where(outside, np.nan, image)
            if title.startswith("Jacobian"):
                shown = ax.imshow(image.T, origin="lower", cmap="RdBu_r", norm=norm,
                                  interpolation="nearest")
            else:
                ax.imshow(image.T, origin="lower", cmap="gray", vmin=0, vmax=1,
                          interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_facecolor("black")
            if row == 0:
                ax.set_title(title, color="white", fontsize=9)
            if col == 0:
                ax.set_ylabel(plane, color="white", fontsize=9)
            opposite = _LETTERS[tuple(-v for v in right)]
            for x, letter in ((0.02, opposite), (0.98, _LETTERS[right])):
                ax.text(x, 0.5, letter, transform=ax.transAxes, color="yellow", fontsize=7,
                        ha="left" if x < 0.5 else "right", va="center")
            ax.text(0.5, 0.97, _LETTERS[up], transform=ax.transAxes, color="yellow", fontsize=7,
                    ha="center", va="top")
        if row == 0:
            bar = figure.colorbar(shown, ax=axes[:, -1].tolist(), fraction=0.05, pad=0.02)
            bar.ax.tick_params(colors="white", labelsize=7)
    summary = getattr(result, "summary", None) or {}
    folding = summary.get("pct_folding")
    caption = "LiquidReg" + (f"   folding: {folding:.3f} % of voxels"
                             if isinstance(folding, (int, float)) else "")
    figure.suptitle(caption, color="white", fontsize=10)
    with atomic_output(path) as tmp:
        figure.savefig(tmp, format="png", facecolor="black")
