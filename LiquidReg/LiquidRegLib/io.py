"""Files in and out: images, displacement fields, affine matrices and registration results.

SimpleITK does all reading and writing so NIfTI, NRRD and MetaImage behave identically; geometry
crosses the ITK (LPS) boundary only through :meth:`Grid.from_itk` / :meth:`Grid.to_itk`.
Every write is atomic: files are made in a hidden staging folder next to the target and moved
into place only once complete, so an interrupted run never leaves a half-written file under the
final name; a staging folder left by a killed run is removed by the next write to that target.
"""
from __future__ import annotations

import errno
import glob
import gzip
import json
import math
import os
import shutil
import struct
import tempfile
import time
import uuid
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError, OutputError
from .grid import LPS_FLIP, GeometryError, Grid

#: Extensions SimpleITK reads and writes for us, longest first so ".nii.gz" wins over ".gz".
IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
_SUPPORTED = "NIfTI (.nii/.nii.gz), NRRD (.nrrd/.nhdr) or MetaImage (.mha/.mhd)"
_VECTOR_FLIP = LPS_FLIP[:3, :3].diagonal().astype(np.float32)  # RAS <-> LPS for vectors


@dataclass
class Volume:
    """An array indexed [i, j, k] placed in the world by its grid."""

    array: np.ndarray   # float32 for images, integer dtype for label maps
    grid: Grid
    name: str = "image"  # how error messages refer to it, e.g. "moving image 'sub-02.nii.gz'"


def image_extension(path) -> str:
    """The image-format extension of ``path`` (".nii.gz", ".nrrd", ...) or "" if unsupported."""
    lower = str(path).lower()
    return next((ext for ext in IMAGE_EXTENSIONS if lower.endswith(ext)), "")


def is_image_file(path) -> bool:
    return Path(path).is_file() and bool(image_extension(path))


def describe(path, name: str) -> str:
    return f"{name} '{Path(path).name}'"


# ---- reading ---------------------------------------------------------------------------------
def _open_reader(path, name: str) -> sitk.ImageFileReader:
    """A reader with the header already parsed; InputError for anything that is not an image file."""
    path = Path(path)
    label = describe(path, name)
    if not path.exists():
        raise InputError(f"{name} '{path}' does not exist; check the path")
    if path.is_dir():
        raise InputError(f"{name} '{path}' is a folder; pass an image file ({_SUPPORTED})")
    if not image_extension(path):
        raise InputError(f"{label} is not a supported image type; convert it to {_SUPPORTED}")
    if not os.access(path, os.R_OK):
        raise InputError(f"{name} '{path}' cannot be opened (permission denied); "
                         "check the file's permissions")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise InputError(f"{name} '{path}' cannot be read: the file is corrupt or not a "
                         f"{_SUPPORTED} image; re-export it") from None
    return reader


def _check_scalar_3d(reader: sitk.ImageFileReader, label: str) -> None:
    size = reader.GetSize()
    shape = "x".join(str(s) for s in size)
    if reader.GetNumberOfComponents() != 1:
        raise InputError(f"{label} has {reader.GetNumberOfComponents()} values per voxel (a colour, "
                         "vector or displacement image); pass a single-channel 3-D image")
    if len(size) == 2 or (len(size) == 3 and min(size) == 1):
        raise InputError(f"{label} is 2-D ({shape}); pass a 3-D volume")
    if len(size) >= 4:
        raise InputError(f"{label} is {len(size)}-D ({shape}), e.g. a time series; extract one "
                         "3-D volume first (e.g. the first time point)")
    if len(size) != 3:
        raise InputError(f"{label} has {len(size)} dimensions; pass a 3-D volume")


def _grid_of(image_or_reader, label: str) -> Grid:
    src = image_or_reader
    try:
        return Grid.from_itk(src.GetSize(), src.GetSpacing(), src.GetOrigin(), src.GetDirection())
    except GeometryError as exc:
        raise InputError(f"{label} has unusable geometry ({exc}); fix the spacing/orientation in "
                         "the file header") from None


@dataclass(frozen=True)
class _NiftiHeader:
    endian: str
    datatype: int
    shape: tuple            # numpy shape of the stored voxels (slowest axis first)
    offset: int             # where the voxels start
    slope: float
    inter: float
    compressed: bool


#: NIfTI float datatypes.  ITK's NIfTI library turns NaN/Inf in them into 0 while reading
#: (``nifti_read_buffer``), so they are read here and the values kept for validation to refuse.
_NIFTI_FLOATS = {16: "f4", 64: "f8"}


def _nifti_header(path) -> _NiftiHeader | None:
    """The fields of a NIfTI-1/-2 header needed to read or size its voxels (None: not NIfTI)."""
    compressed = str(path).lower().endswith(".gz")
    with (gzip.open(path, "rb") if compressed else open(path, "rb")) as f:
        header = f.read(540)
    endian = "<" if int.from_bytes(header[:4], "little") in (348, 540) else ">"
    (size,) = struct.unpack(endian + "i", header[:4])
    if size == 348:
        dims = struct.unpack(endian + "8h", header[40:56])
        datatype = struct.unpack(endian + "h", header[70:72])[0]
        offset = int(struct.unpack(endian + "f", header[108:112])[0])
        slope, inter = struct.unpack(endian + "2f", header[112:120])
    elif size == 540:
        datatype = struct.unpack(endian + "h", header[12:14])[0]
        dims = struct.unpack(endian + "8q", header[16:80])
        offset = struct.unpack(endian + "q", header[168:176])[0]
        slope, inter = struct.unpack(endian + "2d", header[176:192])
    else:
        return None
    shape = tuple(int(n) for n in reversed(dims[1:1 + max(int(dims[0]), 1)]))
    return _NiftiHeader(endian, int(datatype), shape, offset, float(slope), float(inter),
                        compressed)


def _nifti_complete(path, header: _NiftiHeader, data_bytes: int) -> bool:
    """Whether a NIfTI file holds all its voxels.

    ITK's NIfTI reader silently zero-fills a truncated file (an interrupted copy or download),
    which would register garbage; NRRD and MetaImage readers report it themselves.  The header
    gives where the voxels start; gzip's trailer gives the uncompressed length (mod 2^32).
    """
    expected = header.offset + data_bytes
    if not header.compressed:
        return os.path.getsize(path) >= expected
    with open(path, "rb") as f:
        f.seek(-4, os.SEEK_END)
        return int.from_bytes(f.read(4), "little") == expected % (1 << 32)


def _gzip_content(f, block: int = 1 << 22):
    """The uncompressed content of an open gzip file (every member), in large blocks.

    One zlib call per 4 MB read: the gzip module inflates in 8 KB steps, a Python loop that
    made reading a 100 MB warp take 0.5 s.  zlib checks each member's CRC and length at its
    end (zlib.error)."""
    inflater = zlib.decompressobj(31)
    while data := f.read(block):
        while data:
            yield inflater.decompress(data)
            data = b""
            if inflater.eof:  # another member may follow
                data, inflater = inflater.unused_data, zlib.decompressobj(31)
                if data[:2] not in (b"", b"\x1f\x8b"):
                    return  # trailing bytes that are no gzip member (padding): ignored


def _read_into(path, offset: int, compressed: bool, target: memoryview) -> None:
    """Fill ``target`` with the file's bytes (its uncompressed bytes for gzip) from ``offset``;
    EOFError if the file ends first."""
    filled = 0
    with open(path, "rb") as f:
        if not compressed:
            f.seek(offset)
            while filled < len(target) and (count := f.readinto(target[filled:])):
                filled += count
        else:  # read to the end, so that zlib checks the CRC of every byte it gave
            for data in _gzip_content(f):
                data = memoryview(data)[offset:]
                offset = max(0, offset - len(data.obj))
                count = min(len(data), len(target) - filled)
                target[filled:filled + count] = data[:count]
                filled += count
    if filled < len(target):
        raise EOFError("truncated")


def _nifti_float_voxels(path, header: _NiftiHeader) -> np.ndarray:
    """The voxels of a float NIfTI as stored, NaN/Inf included, laid out as SimpleITK's array
    view ([k, j, i] plus a trailing component axis for vector images); EOFError if truncated."""
    dtype = np.dtype(header.endian + _NIFTI_FLOATS[header.datatype])
    voxels = np.empty(int(np.prod(header.shape)), dtype=dtype)
    _read_into(path, header.offset, header.compressed, memoryview(voxels).cast("B"))
    voxels = voxels.astype(dtype.newbyteorder("="), copy=False).reshape(header.shape)
    if header.slope not in (0.0, 1.0) or (header.slope and header.inter):
        voxels = voxels * voxels.dtype.type(header.slope) + voxels.dtype.type(header.inter)
    if voxels.ndim == 5:  # a vector image: NIfTI stores (component, t=1, k, j, i)
        return np.moveaxis(voxels.reshape(voxels.shape[0], *voxels.shape[2:]), 0, -1)
    return voxels.reshape(voxels.shape[-3:])  # 3-D, possibly stored with trailing 1-sized dims


def _voxels(reader: sitk.ImageFileReader, path, name: str) -> tuple[np.ndarray, object]:
    """The image's voxels as SimpleITK lays them out, and the object that owns their memory."""
    problem = (f"{name} '{path}' cannot be read: its voxel data is corrupt or truncated; "
               "re-export or copy it again")
    try:
        header = _nifti_header(path) if image_extension(path) in (".nii", ".nii.gz") else None
        if header is not None and header.datatype in _NIFTI_FLOATS:
            voxels = _nifti_float_voxels(path, header)
            components = reader.GetNumberOfComponents()
            expected = tuple(reversed(reader.GetSize())) + ((components,) if components > 1 else ())
            if voxels.shape != expected:
                raise InputError(problem)
            return voxels, voxels
        image = reader.Execute()
        view = sitk.GetArrayViewFromImage(image)
        if header is not None and not _nifti_complete(path, header, view.nbytes):
            raise InputError(problem)
    except (RuntimeError, OSError, EOFError, struct.error, zlib.error, ValueError):
        raise InputError(problem) from None
    return view, image


def read_grid(path, *, name: str = "image") -> Grid:
    """Only the geometry of a 3-D image file (reads the header, not the voxels)."""
    reader = _open_reader(path, name)
    label = describe(path, name)
    _check_scalar_3d(reader, label)
    return _grid_of(reader, label)


def read_volume(path, *, name: str = "image", dtype=np.float32,
                itk_order: bool = False) -> Volume:
    """Read a scalar 3-D image as a :class:`Volume` indexed [i, j, k].

    ``dtype=None`` keeps the file's voxel type (label maps); the default converts to float32.
    ``itk_order``: the array is an [i, j, k] view of memory in the file's (ITK's, VTK's)
    [k, j, i] order instead of a contiguous copy, for callers that hand it to Slicer's nodes.
    """
    reader = _open_reader(path, name)
    label = describe(path, name)
    _check_scalar_3d(reader, label)
    grid = _grid_of(reader, label)
    view, owner = _voxels(reader, path, name)  # [k, j, i]
    if np.iscomplexobj(view):
        raise InputError(f"{label} has complex voxels; pass the magnitude image")
    if itk_order:  # our own voxels as they are; ITK's image memory copied out
        kji = np.asarray(view, dtype) if owner is view else np.array(view, dtype)
        return Volume(kji.transpose(2, 1, 0), grid, label)
    array = np.ascontiguousarray(view.transpose(2, 1, 0), dtype=dtype)
    return Volume(array, grid, label)


def read_displacement(path, *, name: str = "transform") -> tuple[np.ndarray, Grid]:
    """Read an ITK/ANTs displacement field: (I, J, K, 3) RAS mm vectors and the field's grid.

    The array is an [i, j, k] view of memory in ITK's [k, j, i] order, like ``register``'s
    outputs, so Slicer's grid transform (``logic``) and the writers take it without a copy."""
    reader = _open_reader(path, name)
    label = describe(path, name)
    size = reader.GetSize()
    if len(size) != 3 or reader.GetNumberOfComponents() != 3:
        raise InputError(f"{label} is not a 3-D displacement field (it has {len(size)} dimensions "
                         f"and {reader.GetNumberOfComponents()} values per voxel); pass an ITK/ANTs "
                         "warp, e.g. warp.nii.gz written by 'liquidreg register'")
    grid = _grid_of(reader, label)
    view, _owner = _voxels(reader, path, name)  # [k, j, i, c], LPS
    field = np.empty(view.shape, np.float32)  # ITK's (and VTK's) memory order
    for c in range(3):  # one component at a time: 4x faster than one broadcast multiply
        np.multiply(view[..., c], _VECTOR_FLIP[c], out=field[..., c])
    if not np.all(np.isfinite(field)):
        raise InputError(f"{label} contains NaN/Inf vectors; re-create the transform")
    return field.transpose(2, 1, 0, 3), grid


def read_affine(path, *, name: str = "initial affine") -> np.ndarray:
    """A 4x4 RAS matrix mapping fixed points to moving points.

    Accepts a plain-text 4x4 matrix (RAS, fixed -> moving, as written in summary.json) or any
    linear ITK transform file (.txt/.tfm/.mat/.h5, LPS, same direction as ANTs/Elastix output).
    A singular matrix (which would send the whole image to a plane, a line or a point) is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{name} '{path}' does not exist; check the path")
    matrix = _affine_from(path, name)
    if not np.allclose(matrix[3], (0.0, 0.0, 0.0, 1.0)):
        raise InputError(f"{name} '{path}' has last row {matrix[3].tolist()}, not 0 0 0 1; pass an "
                         "affine matrix")
    if abs(np.linalg.det(matrix[:3, :3])) < 1e-6:
        raise InputError(f"{name} '{path}' is singular (it squashes space onto a plane, a line or "
                         "a point); pass an invertible affine")
    return matrix


def _affine_from(path: Path, name: str) -> np.ndarray:
    try:
        matrix = np.loadtxt(path, ndmin=2)
        if matrix.shape == (4, 4) and np.all(np.isfinite(matrix)):
            return matrix
    except ValueError:
        pass
    try:
        transform = sitk.ReadTransform(str(path))
    except RuntimeError:
        raise InputError(f"{name} '{path}' is neither a 4x4 text matrix nor an ITK transform file; "
                         "pass a 4x4 RAS matrix or an ITK .txt/.tfm/.mat transform") from None
    # Recover the matrix from where the transform sends the origin and unit points (LPS).
    probes = np.vstack([np.zeros(3), np.eye(3), [[3.0, -7.0, 11.0]]])
    mapped = np.array([transform.TransformPoint(p.tolist()) for p in probes])
    lps = np.eye(4)
    lps[:3, 3] = mapped[0]
    lps[:3, :3] = (mapped[1:4] - mapped[0]).T
    if not np.allclose(lps[:3, :3] @ probes[4] + lps[:3, 3], mapped[4], atol=1e-4):
        raise InputError(f"{name} '{path}' is not a linear transform; pass an affine/rigid "
                         "transform (deformable warps go to 'liquidreg apply')")
    return LPS_FLIP @ lps @ LPS_FLIP


def read_csv_table(csv_path, *, required, optional=(), paths=()) -> list[tuple[int, dict]]:
    """Rows of a CSV of image lists (pairs files): [(line number, {column: value})].

    Empty cells become None; every row needs the ``required`` columns.  Values of the ``paths``
    columns become Paths, relative ones taken relative to the CSV's folder so a data set can be
    moved as a whole.  Whether those files exist is for the caller to decide.
    """
    import csv
    csv_path = Path(csv_path)
    header = ",".join((*required, *optional))
    if not csv_path.is_file():
        raise InputError(f"pairs file '{csv_path}' does not exist; check the path")
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:  # Excel's UTF-8 has a BOM
            reader = csv.DictReader(f)
            reader.fieldnames = [name.strip() for name in reader.fieldnames or []]
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error):
        raise InputError(f"pairs file '{csv_path}' is not a readable CSV; write it as text with a "
                         f"header line '{header}'") from None
    if not rows:
        raise InputError(f"pairs file '{csv_path}' has no rows; add a header line '{header}' and "
                         "one line per image pair")
    if not set(required) <= set(rows[0]):
        raise InputError(f"pairs file '{csv_path}' needs a header with the columns "
                         f"{' and '.join(repr(c) for c in required)} (optional: "
                         f"{', '.join(optional)})")
    table = []
    for line, row in enumerate(rows, start=2):
        values = {}
        for column in (*required, *optional):
            value = (row.get(column) or "").strip() or None
            if value is None and column in required:
                raise InputError(f"{csv_path.name} line {line}: the '{column}' column is empty; "
                                 "give a value in every row")
            if value is not None and column in paths:
                value = Path(value).expanduser()
                value = value if value.is_absolute() else csv_path.parent / value
            values[column] = value
        table.append((line, values))
    return table


# ---- writing ---------------------------------------------------------------------------------
#: Bytes handed to the compressor or the disk at once when an image is streamed to a file.
_CHUNK_BYTES = 1 << 22
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _rows_per_chunk(kji: np.ndarray) -> int:
    return max(1, _CHUNK_BYTES // max(1, kji[:1].nbytes // (kji.shape[-1] if kji.ndim == 4 else 1)))


def _worth_compressing(kji: np.ndarray, probe: int = 1 << 18, chunks: int = 4) -> bool:
    """Whether fast deflate shrinks the voxels by at least 40 %.

    Float displacement and Jacobian fields barely compress (~7 %) yet deflating 100 MB of them
    costs ~4 s; images with background compress well and quickly.  A few samples decide.
    """
    rows = max(1, probe // max(1, kji[:1].nbytes))
    starts = np.linspace(0, max(0, len(kji) - rows), chunks).astype(int)
    sample = b"".join(np.ascontiguousarray(kji[start:start + rows]).tobytes()[:probe]
                      for start in sorted(set(starts.tolist())))
    return len(zlib.compress(sample, 1)) < 0.6 * len(sample)


def _nifti_header_bytes(kji: np.ndarray, grid: Grid, vector: bool) -> bytes:
    """The NIfTI header (with its extension flag) ITK writes for this grid and voxel type.

    ITK writes it for a 2x2x2 image of the same geometry and type; only the size differs from
    the full image's header, and it is set here.  So ITK stays the authority on the header
    (orientation codes, intent, units) while the voxels are streamed without ITK's copies.
    """
    sample = np.zeros((2, 2, 2) + kji.shape[3:], dtype=kji.dtype)
    with tempfile.TemporaryDirectory(prefix=".liquidreg-header-") as folder:
        small = Path(folder) / "header.nii"
        sitk.WriteImage(_itk_image(sample, Grid((2, 2, 2), grid.affine), vector), str(small))
        data = small.read_bytes()
    endian = "<" if int.from_bytes(data[:4], "little") == 348 else ">"
    offset = int(struct.unpack(endian + "f", data[108:112])[0])
    return data[:40 + 2] + struct.pack(endian + "3h", *grid.shape) + data[48:offset]


def _stream_nifti(target: Path, kji: np.ndarray, grid: Grid, vector: bool, flip=None,
                  level: int | None = None) -> None:
    """Write a NIfTI file chunk by chunk from an array in ITK memory layout ([k, j, i] or
    [k, j, i, c]): no copy of the whole image.  Vector components are stored one after another
    (NIfTI's layout), each multiplied by ``flip[c]`` on the way (RAS -> LPS)."""
    header = _nifti_header_bytes(kji, grid, vector)
    opener = ((lambda: gzip.GzipFile(target, "wb", compresslevel=level, mtime=0))
              if level is not None else (lambda: open(target, "wb")))
    rows = _rows_per_chunk(kji)
    with opener() as f:
        f.write(header)
        for component in (range(kji.shape[3]) if vector else [None]):
            for first in range(0, kji.shape[0], rows):
                chunk = kji[first:first + rows]
                if component is not None:
                    chunk = chunk[..., component] * kji.dtype.type(flip[component])
                f.write(memoryview(np.ascontiguousarray(chunk)).cast("B"))


def _write_image(path, kji: np.ndarray, grid: Grid, *, vector: bool = False, flip=None,
                 compress: bool | None = None) -> None:
    """Write an array in ITK memory layout atomically: into a hidden folder beside ``path``, then
    move into place.

    NIfTI is streamed (see :func:`_stream_nifti`; ``.nii.gz`` at level 0 when the data barely
    compresses, e.g. float fields, which saves seconds, or when ``compress`` is False; None:
    deflate when it pays, :func:`_worth_compressing`).  Other formats go through ITK; detached
    headers (.mhd/.nhdr) name their data file, so files keep their final names inside the
    temporary folder and the header moves last.  A full disk is one clear error.
    """
    path = Path(path)
    ext = image_extension(path)
    if not ext:
        raise InputError(f"cannot write '{path}': unknown image type; use a {_SUPPORTED} "
                         "file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    if ext == ".nii":
        compress = False
    elif compress is None:
        compress = _worth_compressing(kji)
    staging = staging_folder(path)
    try:
        target = staging / path.name
        if ext in (".nii", ".nii.gz") and max(grid.shape) < 2 ** 15:
            _stream_nifti(target, kji, grid, vector, flip,
                          None if ext == ".nii" else (1 if compress else 0))
        else:
            if flip is not None:
                kji = kji * np.asarray(flip, dtype=kji.dtype)
            sitk.WriteImage(_itk_image(kji, grid, vector), str(target), compress and ext != ".nii",
                            1)
        for part in sorted(staging.iterdir(), key=lambda p: p.name == path.name):
            os.replace(part, path.parent / part.name)
    except OSError as error:
        if error.errno in _DISK_FULL:
            raise OutputError(f"cannot write '{path}': the disk is full ({error.strerror}); free "
                              "some space or choose another output location") from None
        raise
    except RuntimeError as error:  # ITK
        if shutil.disk_usage(path.parent).free < kji.nbytes:
            raise OutputError(f"cannot write '{path}': the disk is full; free some space or "
                              "choose another output location") from None
        raise OutputError(f"cannot write '{path}' ({str(error).strip().splitlines()[-1]}); "
                          "choose another output location") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _itk_image(array_kji: np.ndarray, grid: Grid, vector: bool = False) -> sitk.Image:
    image = sitk.GetImageFromArray(array_kji, isVector=vector)
    geometry = grid.to_itk()
    image.SetSpacing(geometry["spacing"])
    image.SetOrigin(geometry["origin"])
    image.SetDirection(geometry["direction"])
    return image


def write_volume(path, array, grid: Grid, *, compress: bool | None = None) -> None:
    """Write a 3-D [i, j, k] array on ``grid``; the format follows the extension.  ``compress``
    (compressed formats): None deflates when it pays, False never (files read once and
    deleted, such as the Slicer panel's results)."""
    array = np.asarray(array)
    if array.shape != grid.shape:
        raise ValueError(f"array shape {array.shape} does not match grid shape {grid.shape}")
    if array.dtype == bool:
        array = array.view(np.uint8)
    _write_image(path, array.transpose(2, 1, 0), grid, compress=compress)


def write_displacement(path, displacement_ras, grid: Grid) -> None:
    """Write an (I, J, K, 3) RAS mm field as an ITK/ANTs displacement field.

    ITK stores it as a 5-D NIfTI (X, Y, Z, 1, 3) with vector intent holding LPS vectors; ANTs,
    SimpleITK/ITK and Slicer read it as a fixed -> moving ("forward", resampling) warp.
    """
    field = np.asarray(displacement_ras, dtype=np.float32)
    if field.shape != (*grid.shape, 3):
        raise ValueError(f"displacement shape {field.shape} does not match grid {grid.shape} x 3")
    _write_image(path, field.transpose(2, 1, 0, 3), grid, vector=True, flip=_VECTOR_FLIP)


# ---- atomic writes -----------------------------------------------------------------------------
_STAGING = ".liquidreg-"  # hidden folders beside a target: ".<target name>.liquidreg-<pid>-..."
_STALE_AFTER_S = 24 * 3600  # where a writer's process cannot be asked whether it still runs


def _writer_gone(folder: Path, pid: int) -> bool:
    if os.name != "posix":
        return time.time() - folder.stat().st_mtime > _STALE_AFTER_S
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's live process
        return False
    return False


def check_writable(path) -> None:
    """Fail before any long work if ``path`` cannot be created where it is asked for."""
    existing = Path(path).absolute().parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"cannot write '{path}': '{existing}' is a file, not a folder; choose "
                         "an output location inside a folder")
    if not os.access(existing, os.W_OK):
        raise InputError(f"cannot write into '{existing}' (permission denied); choose another "
                         "location for the output")


def staging_folder(target) -> Path:
    """A new hidden folder beside ``target`` in which to make it before it takes its place.

    Staging folders that killed runs left for the same target (their process is gone) are
    removed first, so they never pile up.
    """
    target = Path(target)
    prefix = f".{target.name}{_STAGING}"
    for stale in target.parent.glob(glob.escape(prefix) + "*"):
        pid = stale.name[len(prefix):].split("-", 1)[0]
        try:
            gone = pid.isdigit() and stale.is_dir() and _writer_gone(stale, int(pid))
        except OSError:
            continue
        if gone:
            shutil.rmtree(stale, ignore_errors=True)
    while True:  # not tempfile.mkdtemp: its folders are private (0700), and a result folder
        #          is this folder renamed; mkdir gives the permissions the user's umask asks for
        folder = target.parent / f"{prefix}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue


@contextmanager
def atomic_output(path, *, replace: bool = True):
    """Yield a temporary path with ``path``'s name, in a hidden folder beside it; on success the
    file takes ``path``'s place (created normally, so it gets the usual permissions).

    ``replace=False`` never replaces an existing file, even one that appeared meanwhile: the file
    is published with a hard link, which fails if the name is taken.
    """
    path = Path(path)
    staging = staging_folder(path)
    try:
        yield staging / path.name
        if replace:
            os.replace(staging / path.name, path)
        else:
            _publish_new(staging / path.name, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _publish_new(source: Path, path: Path) -> None:
    try:
        os.link(source, path)
        return
    except FileExistsError:
        pass
    except OSError:  # no hard links on this file system: the check and the rename are two steps
        if not path.exists():
            os.rename(source, path)
            return
    raise InputError(f"'{path}' already exists; choose a new file name, or allow overwriting it")


def _plain(value):
    """``value`` with numpy/torch values, paths and non-finite floats made JSON-safe (NaN and
    infinity become null: JSON has no such numbers, and a file holding them is invalid)."""
    if isinstance(value, dict):
        return {str(k) if not isinstance(k, str) else k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (np.ndarray, np.generic)) or hasattr(value, "tolist"):
        return _plain(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"cannot store {type(value).__name__} as JSON")


def to_json(content, indent: int | None = None) -> str:
    """Strict JSON text (what every JSON reader accepts) of ``content``."""
    return json.dumps(_plain(content), indent=indent, allow_nan=False)


def write_json(path, content: dict) -> None:
    """Atomically write ``content`` as indented, strict JSON (see :func:`to_json`)."""
    text = to_json(content, indent=2)
    with atomic_output(path) as tmp:
        tmp.write_text(text + "\n")
