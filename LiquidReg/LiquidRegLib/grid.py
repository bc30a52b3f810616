"""The one home for geometry: a volume's grid, world coordinates, and resampling between grids.

Conventions used everywhere in LiquidReg (and nowhere redefined):

* Arrays are indexed ``[i, j, k]`` (nibabel order, *not* SimpleITK's ``[k, j, i]``).
* A :class:`Grid` is the array shape plus the 4x4 voxel(ijk) -> RAS millimetre matrix.
* Torch volumes are ``(N, C, I, J, K)``; ``grid_sample`` wants its last-axis coordinates in
  ``(k, j, i)`` order, normalised with ``align_corners=True`` (voxel centre 0 -> -1, n-1 -> +1).
* A displacement field lives on the *fixed* grid, holds RAS mm vectors and maps each fixed point
  ``x`` to the moving point ``x + u(x)`` (the resampling direction).
* RAS <-> LPS happens only through :data:`LPS_FLIP` in this module.

:class:`Grid` needs only numpy; the sampling functions import torch when called.  Slicer's own
process describes and checks volumes with :class:`Grid` when it prepares a job, and importing
torch there would freeze the application for seconds (the work itself runs in another process).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    import torch

#: Diagonal that maps LPS to RAS and back (its own inverse).
LPS_FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])
#: Voxel index (k, j, i) -> (i, j, k) (its own inverse).
_REVERSE_AXES = np.eye(4)[[2, 1, 0, 3]]


class GeometryError(ValueError):
    """A volume's geometry cannot be used (degenerate matrix, wrong dimensionality, ...)."""


@dataclass(frozen=True)
class Grid:
    """Shape plus voxel -> RAS (mm) matrix: everything needed to place an array in the world."""

    shape: tuple[int, int, int]
    affine: np.ndarray  # 4x4 float64, voxel (i, j, k, 1) -> RAS (x, y, z, 1)

    def __post_init__(self):
        shape = tuple(int(s) for s in self.shape)
        affine = np.array(self.affine, dtype=np.float64)
        if len(shape) != 3:
            raise GeometryError(f"a grid needs 3 dimensions, got shape {shape}")
        if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
            raise GeometryError("voxel-to-RAS matrix must be a finite 4x4 matrix")
        if abs(np.linalg.det(affine[:3, :3])) < 1e-9:
            raise GeometryError("voxel-to-RAS matrix is singular (zero spacing or collinear axes)")
        affine[3] = (0.0, 0.0, 0.0, 1.0)
        affine.setflags(write=False)
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "affine", affine)

    # ---- description ------------------------------------------------------------------------
    @property
    def spacing(self) -> np.ndarray:
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    @property
    def direction(self) -> np.ndarray:
        """Unit column vectors of the i, j, k axes in RAS."""
        return self.affine[:3, :3] / self.spacing

    @property
    def origin(self) -> np.ndarray:
        """RAS position of voxel (0, 0, 0)."""
        return self.affine[:3, 3].copy()

    @property
    def inverse(self) -> np.ndarray:
        return np.linalg.inv(self.affine)

    @property
    def center(self) -> np.ndarray:
        return self.voxel_to_ras((np.array(self.shape) - 1) / 2.0)

    def __eq__(self, other) -> bool:
        return (isinstance(other, Grid) and self.shape == other.shape
                and np.allclose(self.affine, other.affine, atol=1e-6))

    def __hash__(self):
        return hash(self.shape)

    def __repr__(self) -> str:
        sp = ", ".join(f"{s:.3g}" for s in self.spacing)
        return f"Grid(shape={self.shape}, spacing=({sp}) mm, orientation={self.orientation})"

    @property
    def orientation(self) -> str:
        """Three-letter code of the anatomical direction each array axis increases towards."""
        letters = (("L", "R"), ("P", "A"), ("I", "S"))
        code = ""
        for col in self.direction.T:
            axis = int(np.argmax(np.abs(col)))
            code += letters[axis][int(col[axis] > 0)]
        return code

    # ---- point maps -----------------------------------------------------------------------
    def voxel_to_ras(self, ijk) -> np.ndarray:
        ijk = np.asarray(ijk, dtype=np.float64)
        return ijk @ self.affine[:3, :3].T + self.affine[:3, 3]

    def ras_to_voxel(self, ras) -> np.ndarray:
        inv = self.inverse
        ras = np.asarray(ras, dtype=np.float64)
        return ras @ inv[:3, :3].T + inv[:3, 3]

    def ras_coordinates(self, device=None, dtype=None) -> torch.Tensor:
        """RAS position of every voxel, shape (I, J, K, 3) (float32 unless ``dtype``)."""
        return mapped_voxels(self.shape, self.affine, device, dtype)

    def corners_ras(self) -> np.ndarray:
        n = np.array(self.shape) - 1
        corners = np.array([[a, b, c] for a in (0, n[0]) for b in (0, n[1]) for c in (0, n[2])])
        return self.voxel_to_ras(corners)

    # ---- ITK (LPS) boundary: the only place RAS and LPS meet -------------------------------
    @classmethod
    def from_itk(cls, size_xyz: Sequence[int], spacing, origin_lps, direction_lps) -> "Grid":
        """Build from ITK's (size, spacing, origin, direction) in LPS; array index order i=x."""
        direction = np.asarray(direction_lps, dtype=np.float64).reshape(3, 3)
        m = np.eye(4)
        m[:3, :3] = direction * np.asarray(spacing, dtype=np.float64)
        m[:3, 3] = np.asarray(origin_lps, dtype=np.float64)
        return cls(tuple(int(s) for s in size_xyz), LPS_FLIP @ m)

    def to_itk(self) -> dict:
        """ITK geometry (LPS): size, spacing, origin and row-major flattened direction."""
        m = LPS_FLIP @ self.affine
        spacing = np.linalg.norm(m[:3, :3], axis=0)
        return {"size": list(self.shape), "spacing": spacing.tolist(),
                "origin": m[:3, 3].tolist(), "direction": (m[:3, :3] / spacing).ravel().tolist()}

    # ---- derived grids -------------------------------------------------------------------
    def transposed(self) -> "Grid":
        """The same voxels indexed [k, j, i].  A C-ordered array on this grid is in ITK/VTK memory
        order (i fastest), so results computed on it are written without a transposing copy."""
        return Grid(self.shape[::-1], self.affine @ _REVERSE_AXES)

    def pooled(self, factors) -> "Grid":
        """Grid of this grid's array averaged over blocks of ``factors`` voxels (block centres,
        partial blocks at the far edges kept, as ``avg_pool3d(..., ceil_mode=True)``)."""
        block = np.diag([*map(float, factors), 1.0])
        block[:3, 3] = (np.asarray(factors, dtype=np.float64) - 1) / 2.0
        shape = [int(np.ceil(n / f)) for n, f in zip(self.shape, factors)]
        return Grid(tuple(shape), self.affine @ block)

    def ras_axes(self):
        """(perm, flips): array axis ``perm[r]`` points most nearly along RAS axis ``r`` (towards
        R, A, S unless ``flips[r]``).  None for a strongly oblique grid (no unique answer)."""
        direction = self.direction
        perm = np.argmax(np.abs(direction), axis=1)  # for each RAS axis, the array axis nearest
        if len(set(perm.tolist())) != 3:
            return None
        return tuple(int(p) for p in perm), tuple(bool(f) for f in direction[np.arange(3), perm] < 0)

    def ras_ordered(self) -> "Grid":
        """The grid of the same voxels stored in RAS axis order (see :meth:`ras_axes`): the same
        image stored LPS, LIP or RAS has one and the same RAS-ordered array and grid."""
        order = self.ras_axes()
        if order is None:
            return self
        perm, flips = order
        index = np.zeros((4, 4))  # RAS-ordered voxel index -> this grid's voxel index
        index[3, 3] = 1.0
        for r, (axis, flip) in enumerate(zip(perm, flips)):
            index[axis, r] = -1.0 if flip else 1.0
            index[axis, 3] = self.shape[axis] - 1 if flip else 0.0
        return Grid(tuple(self.shape[axis] for axis in perm), self.affine @ index)

    def canonical_working_grid(self, spacing_mm: float, multiple: int = 8,
                               max_size: int = 160) -> "Grid":
        """An isotropic RAS-ordered grid covering this grid's field of view.

        The network always sees the brain in (roughly) RAS axis order whatever the file's
        orientation, which is what it was trained on.  The size is a multiple of ``multiple`` so the
        feature pyramid divides evenly, and spacing grows if the field of view would exceed
        ``max_size`` voxels along any axis.
        """
        corners = self.corners_ras()
        # Closest permutation/flip of this grid's axes to R, A, S (strongly oblique: pure RAS).
        rot = self.ras_ordered().direction if self.ras_axes() is not None else np.eye(3)
        # Extent of the field of view (voxel centres +- half a voxel) in the rotated frame.
        local = corners @ rot
        half = 0.5 * np.abs(rot.T @ self.affine[:3, :3]).sum(axis=1)
        lo, hi = local.min(0) - half, local.max(0) + half
        extent = hi - lo
        spacing = max(float(spacing_mm), float(extent.max()) / max_size)
        shape = np.maximum(multiple, np.ceil(extent / spacing / multiple) * multiple).astype(int)
        centre_local = (lo + hi) / 2
        m = np.eye(4)
        m[:3, :3] = rot * spacing
        m[:3, 3] = rot @ centre_local - m[:3, :3] @ ((shape - 1) / 2.0)
        return Grid(tuple(shape.tolist()), m)


# ---- coordinate helpers shared by the engine --------------------------------------------------
def identity_voxels(shape, device=None, dtype=None) -> torch.Tensor:
    """Voxel index of every voxel, shape (I, J, K, 3) (float32 unless ``dtype``)."""
    import torch

    dtype = dtype or torch.float32
    axes = [torch.arange(n, device=device, dtype=dtype) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)


def to_device(host: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on ``device`` without making the host wait: on CUDA through pinned memory
    and an asynchronous copy (a plain copy from pageable memory blocks until the GPU is idle)."""
    import torch

    device = torch.device("cpu") if device is None else torch.device(device)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def mapped_voxels(shape, affine: np.ndarray, device=None, dtype=None) -> torch.Tensor:
    """``affine`` applied to every voxel index of ``shape``: (I, J, K, 3) (float32 unless
    ``dtype``).

    Built as a broadcast sum of three 1-D axes, several times faster than a matmul over all
    voxels of a 1 mm brain.  The axes are made in float64 on the host and sent in one copy.
    """
    import torch

    dtype = dtype or torch.float32
    m = np.asarray(affine, dtype=np.float64)
    host = np.concatenate([np.arange(n, dtype=np.float64)[:, None] * m[:3, axis]
                           for axis, n in enumerate(shape)] + [m[None, :3, 3]])
    terms = to_device(torch.from_numpy(host).to(dtype), device).split([*shape, 1])
    out = None
    for axis, (n, term) in enumerate(zip(shape, terms)):
        view = [1, 1, 1, 3]
        view[axis] = n
        out = term.view(view) if out is None else out + term.view(view)
    return out + terms[3][0]


def voxel_to_world(points: torch.Tensor, affine: np.ndarray) -> torch.Tensor:
    """Apply a 4x4 matrix to (..., 3) points."""
    import torch

    m = to_device(torch.tensor(np.asarray(affine)[:3], dtype=points.dtype), points.device)
    return points @ m[:, :3].T + m[:, 3]


def normalising_scale(shape) -> list[float]:
    """Voxel (i, j, k) units -> ``grid_sample`` units, per axis in (i, j, k) order."""
    return [2.0 / max(int(n) - 1, 1) for n in shape]


def normalized_coordinates(shape) -> np.ndarray:
    """4x4 from voxel (i, j, k) of a volume of ``shape`` to ``grid_sample``'s (x=k, y=j, z=i) with
    align_corners=True (voxel centre 0 -> -1, n-1 -> +1).  Folded into a point map, it saves the
    scale, shift and axis-flip passes over every point of a large grid."""
    m = np.zeros((4, 4))
    for row, (axis, scale) in enumerate(reversed(list(enumerate(normalising_scale(shape))))):
        m[row, axis], m[row, 3] = scale, -1.0
    m[3, 3] = 1.0
    return m


@functools.lru_cache(maxsize=64)
def constant(values: tuple, device, dtype) -> torch.Tensor:
    """A small constant tensor on ``device``, made once per process.

    Creating ``torch.tensor(list, device="cuda")`` copies from the host and waits for it; inside
    loops (every sampling, every squaring) those waits starve the GPU.  Constants are therefore
    made once and reused (they must never be modified in place)."""
    import torch

    return to_device(torch.tensor(values, dtype=dtype), device)


def voxel_to_normalized(points: torch.Tensor, shape) -> torch.Tensor:
    """Voxel (i, j, k) -> ``grid_sample`` coordinates, as :func:`normalized_coordinates` but
    elementwise (cheaper than a matrix product for arbitrary points)."""
    scale = constant(tuple(normalising_scale(shape)), points.device, points.dtype)
    return (points * scale - 1.0).flip(-1)


def sampling_grid(target_shape, voxel_map: np.ndarray, source_shape, device=None) -> torch.Tensor:
    """``grid_sample`` coordinates in a ``source_shape`` volume of every voxel of ``target_shape``
    under ``voxel_map`` (4x4, target voxel -> source voxel): (I, J, K, 3), one broadcast sum."""
    return mapped_voxels(target_shape, normalized_coordinates(source_shape) @ voxel_map, device)


#: Below this many points one call is fast enough; above it, CPU sampling is split into slabs.
_PARALLEL_POINTS = 1 << 16


def sample_at(volume: torch.Tensor, grid: torch.Tensor, mode: str = "bilinear",
              padding_mode: str = "zeros") -> torch.Tensor:
    """Sample an (N, C, I, J, K) volume at ``grid_sample`` coordinates (N, ..., 3).

    Points outside the volume get ``padding_mode`` ("zeros" for images: outside is background,
    "border" for displacement fields); coordinates are never clamped.

    PyTorch's 3-D CPU sampler parallelises over the batch only, forward and backward.  So a large
    single-volume grid is cut into one slab per thread, given to the sampler as a batch over the
    same (expanded, not copied) volume: ~2x on 2 cores for registration outputs, instance
    optimisation and training alike, with autograd intact.
    """
    import torch
    import torch.nn.functional as F

    if grid.dtype != volume.dtype:
        grid = grid.to(volume.dtype)
    slabs = min(torch.get_num_threads(), grid.shape[1])
    if (volume.device.type != "cpu" or volume.shape[0] != 1 or grid.dim() != 5 or slabs < 2
            or grid[..., 0].numel() < _PARALLEL_POINTS):
        return F.grid_sample(volume, grid, mode=mode, padding_mode=padding_mode,
                             align_corners=True)
    depth = grid.shape[1]
    pad = -depth % slabs  # rows repeated so the slabs are equal; their samples are dropped
    if pad:
        grid = torch.cat([grid, grid[:, -1:].expand(1, pad, *grid.shape[2:])], dim=1)
    out = F.grid_sample(volume.expand(slabs, *volume.shape[1:]),
                        grid.reshape(slabs, -1, *grid.shape[2:]), mode=mode,
                        padding_mode=padding_mode, align_corners=True)
    out = out.transpose(0, 1).reshape(1, volume.shape[1], depth + pad, *grid.shape[2:4])
    return out[:, :, :depth]


def sample(volume: torch.Tensor, voxel_points: torch.Tensor, mode: str = "bilinear",
           padding_mode: str = "zeros") -> torch.Tensor:
    """Sample an (N, C, I, J, K) volume at voxel positions (N, ..., 3) of that volume
    (padding as :func:`sample_at`)."""
    return sample_at(volume, voxel_to_normalized(voxel_points, volume.shape[2:]), mode,
                     padding_mode)


def resample(array, source: Grid, target: Grid, *, world_map: np.ndarray | None = None,
             displacement: torch.Tensor | None = None, order: str = "linear",
             device=None) -> np.ndarray:
    """Resample ``array`` (on ``source``) onto ``target`` through world coordinates.

    Each target point ``x`` (RAS) is taken to ``x' = x + displacement(x)`` (displacement: RAS mm on
    ``target``, shape (I, J, K, 3)) and then to ``world_map @ x'`` (4x4 RAS -> RAS), where the source
    is read.  Both default to identity.  ``order`` is "linear" or "nearest" (labels keep their
    integer values).  Outside the source's field of view the result is 0.
    """
    if order not in ("linear", "nearest"):
        raise ValueError(f"interpolation must be 'linear' or 'nearest', not {order!r}")
    import torch

    array, source = c_ordered(array, source)
    src = torch.as_tensor(np.ascontiguousarray(array), device=device)
    integer = not torch.is_floating_point(src)
    # float32 holds every integer label below 2^24 exactly; beyond that, sample in float64
    exact = integer and src.numel() and int(src.abs().max()) >= 2 ** 24
    out = resampled(src.to(torch.float64 if exact else torch.float32), source, target,
                    world_map=world_map, displacement=displacement, order=order)
    if integer:
        out = out.round()
    return out.cpu().numpy().astype(np.asarray(array).dtype, copy=False)


def c_ordered(array, grid: Grid):
    """``(array, grid)`` with the array's memory in C order, without copying: an [i, j, k] view
    of [k, j, i] memory (how ITK and VTK store volumes) becomes that memory on the transposed grid.
    """
    array = np.asarray(array)
    if not array.flags.c_contiguous and array.T.flags.c_contiguous:
        return array.T, grid.transposed()
    return array, grid


def resampled(volume: torch.Tensor, source: Grid, target: Grid, *,
              world_map: np.ndarray | None = None, displacement: torch.Tensor | None = None,
              order: str = "linear") -> torch.Tensor:
    """:func:`resample` of a floating-point (I, J, K) tensor, on its own device: the result stays
    there, so images that are worked on in the GPU make no round trip through the host."""
    import torch

    if not volume.is_contiguous() and volume.permute(2, 1, 0).is_contiguous():
        volume, source = volume.permute(2, 1, 0), source.transposed()  # [k, j, i] memory
    device = volume.device
    to_source = source.inverse @ (np.eye(4) if world_map is None
                                  else np.asarray(world_map, dtype=np.float64))
    if displacement is None:
        pts = mapped_voxels(target.shape, to_source @ target.affine, device)
    else:
        ras = mapped_voxels(target.shape, target.affine, device) + displacement.to(device, torch.float32)
        pts = voxel_to_world(ras, to_source)
    out = sample(volume[None, None], pts[None].to(volume.dtype),
                 mode="nearest" if order == "nearest" else "bilinear")
    return out[0, 0]
