"""The overview PNG: one glance to judge a registration.

Columns: fixed, moving after the affine only, warped moving, a fixed/warped checkerboard and the
Jacobian determinant (blue = compression, red = expansion, white = 1).  Rows: axial, coronal and
sagittal planes through the centre of the fixed image, shown as Slicer shows them (radiological:
patient right on the left of the screen; anterior up in axial, superior up otherwise).  Each plane
is resampled from world coordinates, so any orientation or obliquity of the files displays right.

The panels are composed into one RGB mosaic with numpy and labelled with Pillow: no matplotlib,
whose import and canvas cost more than the rest of the figure (it renders in a writer thread
while the result files are written).
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
#: Diverging blue - white - red (ColorBrewer RdBu) at 0, 0.5, 1, 1.5 and 2.
_JACOBIAN_COLOURS = np.array([[33, 102, 172], [146, 197, 222], [247, 247, 247], [244, 165, 130],
                              [178, 24, 43]], dtype=np.float64) / 255.0
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


def jacobian_colours(values: np.ndarray) -> np.ndarray:
    """RGB in [0, 1] for Jacobian determinants: blue below 1 (compression), red above."""
    low, high = JACOBIAN_RANGE
    stops = np.linspace(low, high, len(_JACOBIAN_COLOURS))
    values = np.asarray(values, dtype=np.float64)
    return np.stack([np.interp(values, stops, _JACOBIAN_COLOURS[:, c]) for c in range(3)], -1)


def _panels(result, fixed, moving, target: Grid):
    """(title, RGB image) for each column of one plane."""
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
    panels.append(("Jacobian determinant", jacobian_colours(_slice(result.jacobian, grid, target))))
    outside = ~_inside(grid, target)
    return [(title, np.where(outside[..., None], 0.0, image)) for title, image in panels]


def _colour_bar(draw, font, x0: int, y0: int, height: int, width: int = 12) -> None:
    """A vertical Jacobian colour bar with ticks, high values at the top."""
    low, high = JACOBIAN_RANGE
    column = jacobian_colours(np.linspace(high, low, height))
    for row, colour in enumerate((column * 255).astype(np.uint8)):
        draw.line([(x0, y0 + row), (x0 + width - 1, y0 + row)], fill=tuple(int(c) for c in colour))
    for value in np.linspace(low, high, 5):
        y = y0 + (high - value) / (high - low) * (height - 1)
        draw.line([(x0 + width, y), (x0 + width + 3, y)], fill="white")
        draw.text((x0 + width + 5, y), f"{value:g}", fill="white", font=font, anchor="lm")
    draw.text((x0 + width / 2, y0 - 6), "Jacobian", fill="white", font=font, anchor="md")


def save_overview(path, result, *, fixed=None, moving=None) -> None:
    """Render the overview of a RegistrationResult to ``path`` (PNG, written atomically)."""
    from PIL import Image, ImageDraw, ImageFont

    from .io import atomic_output

    planes = {name: plane_grid(result.fixed_grid, name) for name in PLANES}
    rows = {name: _panels(result, fixed, moving, target) for name, target in planes.items()}
    cell_h = max(p[0][1].shape[0] for p in rows.values())
    cell_w = max(p[0][1].shape[1] for p in rows.values())
    columns = [title for title, _ in next(iter(rows.values()))]
    top, left = 52, 30  # room for the caption, titles and row names
    height = top + len(rows) * (cell_h + _GAP)
    width = left + len(columns) * (cell_w + _GAP) + 70  # + colour bar
    canvas = np.zeros((height, width, 3))
    letters = []
    for r, (name, panels) in enumerate(rows.items()):
        right, up, _ = PLANES[name]
        for c, (_, image) in enumerate(panels):
            h, w = image.shape[:2]
            y0 = top + r * (cell_h + _GAP) + (cell_h - h) // 2
            x0 = left + c * (cell_w + _GAP) + (cell_w - w) // 2
            canvas[y0:y0 + h, x0:x0 + w] = image
            letters += [((x0 + 3, y0 + h / 2), _LETTERS[tuple(-v for v in right)], "lm"),
                        ((x0 + w - 3, y0 + h / 2), _LETTERS[right], "rm"),
                        ((x0 + w / 2, y0 + 3), _LETTERS[up], "mt")]
    figure = Image.fromarray(np.round(canvas * 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(figure)
    small, normal = ImageFont.load_default(10), ImageFont.load_default(12)
    for xy, letter, anchor in letters:
        draw.text(xy, letter, fill="yellow", font=small, anchor=anchor)
    for c, title in enumerate(columns):
        draw.text((left + c * (cell_w + _GAP) + cell_w / 2, top - 8), title, fill="white",
                  font=normal, anchor="md")
    for r, name in enumerate(rows):  # row names read bottom to top, beside the row
        label = Image.new("RGB", (cell_h, 16))
        ImageDraw.Draw(label).text((cell_h / 2, 8), name, fill="white", font=normal, anchor="mm")
        figure.paste(label.rotate(90, expand=True), (left - 20, top + r * (cell_h + _GAP)))
    summary = getattr(result, "summary", None) or {}
    folding = summary.get("pct_folding")
    caption = "LiquidReg" + (f"   folding (J <= 0): {folding:.3f} % of voxels"
                             if isinstance(folding, (int, float)) else "")
    draw.text((8, 8), caption, fill="white", font=normal)
    _colour_bar(draw, small, width - 55, top + 10, max(height - top - 30, 20))
    with atomic_output(path) as tmp:
        figure.save(tmp, format="PNG")
