"""Files in and out: images, displacement fields, affine matrices and registration results.

SimpleITK does all reading and writing so NIfTI, NRRD and MetaImage behave identically; geometry
crosses the ITK (LPS) boundary only through :meth:`Grid.from_itk` / :meth:`Grid.to_itk`.
Every write is atomic: files are made in a hidden folder next to the target and moved into place
only once complete, so an interrupted run never leaves a half-written file under the final name.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import os
import shutil
import struct
import tempfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .grid import LPS_FLIP, GeometryError, Grid
from .progress import report

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


def _nifti_complete(path, data_bytes: int) -> bool:
    """Whether a NIfTI file holds all its voxels.

    ITK's NIfTI reader silently zero-fills a truncated file (an interrupted copy or download),
    which would register garbage; NRRD and MetaImage readers report it themselves.  The header
    gives where the voxels start; gzip's trailer gives the uncompressed length (mod 2^32).
    """
    compressed = str(path).lower().endswith(".gz")
    with (gzip.open(path, "rb") if compressed else open(path, "rb")) as f:
        header = f.read(176)
    endian = "<" if int.from_bytes(header[:4], "little") in (348, 540) else ">"
    (header_size,) = struct.unpack(endian + "i", header[:4])
    if header_size == 348:
        offset = int(struct.unpack(endian + "f", header[108:112])[0])
    elif header_size == 540:
        offset = int(struct.unpack(endian + "q", header[168:176])[0])
    else:
        return True
    expected = offset + data_bytes
    if not compressed:
        return os.path.getsize(path) >= expected
    with open(path, "rb") as f:
        f.seek(-4, os.SEEK_END)
        return int.from_bytes(f.read(4), "little") == expected % (1 << 32)


def _execute(reader: sitk.ImageFileReader, path, name: str) -> sitk.Image:
    problem = (f"{name} '{path}' cannot be read: its voxel data is corrupt or truncated; "
               "re-export or copy it again")
    try:
        image = reader.Execute()
        data_bytes = sitk.GetArrayViewFromImage(image).nbytes
        if image_extension(path) in (".nii", ".nii.gz") and not _nifti_complete(path, data_bytes):
            raise InputError(problem)
    except (RuntimeError, OSError, EOFError, struct.error):
        raise InputError(problem) from None
    return image


def read_grid(path, *, name: str = "image") -> Grid:
    """Only the geometry of a 3-D image file (reads the header, not the voxels)."""
    reader = _open_reader(path, name)
    label = describe(path, name)
    _check_scalar_3d(reader, label)
    return _grid_of(reader, label)


def read_volume(path, *, name: str = "image", dtype=np.float32) -> Volume:
    """Read a scalar 3-D image as a :class:`Volume` indexed [i, j, k].

    ``dtype=None`` keeps the file's voxel type (label maps); the default converts to float32.
    """
    reader = _open_reader(path, name)
    label = describe(path, name)
    _check_scalar_3d(reader, label)
    grid = _grid_of(reader, label)
    image = _execute(reader, path, name)
    view = sitk.GetArrayViewFromImage(image)  # [k, j, i]
    if np.iscomplexobj(view):
        raise InputError(f"{label} has complex voxels; pass the magnitude image")
    array = np.ascontiguousarray(view.transpose(2, 1, 0), dtype=dtype)
    return Volume(array, grid, label)


def read_displacement(path, *, name: str = "transform") -> tuple[np.ndarray, Grid]:
    """Read an ITK/ANTs displacement field: (I, J, K, 3) RAS mm vectors and the field's grid."""
    reader = _open_reader(path, name)
    label = describe(path, name)
    size = reader.GetSize()
    if len(size) != 3 or reader.GetNumberOfComponents() != 3:
        raise InputError(f"{label} is not a 3-D displacement field (it has {len(size)} dimensions "
                         f"and {reader.GetNumberOfComponents()} values per voxel); pass an ITK/ANTs "
                         "warp, e.g. warp.nii.gz written by 'liquidreg register'")
    grid = _grid_of(reader, label)
    image = _execute(reader, path, name)
    view = sitk.GetArrayViewFromImage(image)  # [k, j, i, c], LPS
    field = np.ascontiguousarray(view.transpose(2, 1, 0, 3), dtype=np.float32)
    field *= _VECTOR_FLIP
    if not np.all(np.isfinite(field)):
        raise InputError(f"{label} contains NaN/Inf vectors; re-create the transform")
    return field, grid


def read_affine(path, *, name: str = "initial affine") -> np.ndarray:
    """A 4x4 RAS matrix mapping fixed points to moving points.

    Accepts a plain-text 4x4 matrix (RAS, fixed -> moving, as written in summary.json) or any
    linear ITK transform file (.txt/.tfm/.mat/.h5, LPS, same direction as ANTs/Elastix output).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{name} '{path}' does not exist; check the path")
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
        with open(csv_path, newline="") as f:
            rows = list(csv.DictReader(f))
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
def _worth_compressing(data: memoryview, probe: int = 1 << 18, chunks: int = 4) -> bool:
    """Whether fast deflate shrinks the data by at least 40 %.

    Float displacement and Jacobian fields barely compress (~7 %) yet deflating 100 MB of them
    costs ~4 s; images with background compress well and quickly.  A few samples decide.
    """
    n = len(data)
    if n <= probe * chunks:
        sample = bytes(data)
    else:
        step = n // chunks
        sample = b"".join(bytes(data[i * step:i * step + probe]) for i in range(chunks))
    return len(zlib.compress(sample, 1)) < 0.6 * len(sample)


def _gzip_file(src: Path, dst: Path, level: int) -> None:
    with open(src, "rb") as fin, gzip.GzipFile(dst, "wb", compresslevel=level, mtime=0) as fout:
        shutil.copyfileobj(fin, fout, 1 << 24)


def _write_image(path, image: sitk.Image, raw: np.ndarray) -> None:
    """Write atomically: into a hidden folder beside ``path``, then move into place.

    Detached headers (.mhd/.nhdr) name their data file, so files keep their final names inside the
    temporary folder and the header moves last.  ``.nii.gz`` is gzipped here rather than by ITK
    so incompressible float fields can be stored at level 0 in a fraction of the time.
    """
    path = Path(path)
    ext = image_extension(path)
    if not ext:
        raise InputError(f"cannot write '{path}': unknown image type; use a {_SUPPORTED} "
                         "file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    compress = _worth_compressing(memoryview(raw).cast("B"))
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        target = staging / path.name
        if ext == ".nii.gz":
            plain = staging / (path.name[:-3])
            sitk.WriteImage(image, str(plain), False)
            _gzip_file(plain, target, 1 if compress else 0)
            plain.unlink()
        else:
            sitk.WriteImage(image, str(target), compress and ext != ".nii", 1)
        for part in sorted(staging.iterdir(), key=lambda p: p.name == path.name):
            os.replace(part, path.parent / part.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _itk_image(array_kji: np.ndarray, grid: Grid, vector: bool = False) -> sitk.Image:
    image = sitk.GetImageFromArray(array_kji, isVector=vector)
    geometry = grid.to_itk()
    image.SetSpacing(geometry["spacing"])
    image.SetOrigin(geometry["origin"])
    image.SetDirection(geometry["direction"])
    return image


def write_volume(path, array, grid: Grid) -> None:
    """Write a 3-D [i, j, k] array on ``grid``; the format follows the extension."""
    array = np.asarray(array)
    if array.shape != grid.shape:
        raise ValueError(f"array shape {array.shape} does not match grid shape {grid.shape}")
    if array.dtype == bool:
        array = array.astype(np.uint8)
    kji = np.ascontiguousarray(array.transpose(2, 1, 0))
    _write_image(path, _itk_image(kji, grid), kji)


def write_displacement(path, displacement_ras, grid: Grid) -> None:
    """Write an (I, J, K, 3) RAS mm field as an ITK/ANTs displacement field.

    ITK stores it as a 5-D NIfTI (X, Y, Z, 1, 3) with vector intent holding LPS vectors; ANTs,
    SimpleITK/ITK and Slicer read it as a fixed -> moving ("forward", resampling) warp.
    """
    field = np.asarray(displacement_ras, dtype=np.float32)
    if field.shape != (*grid.shape, 3):
        raise ValueError(f"displacement shape {field.shape} does not match grid {grid.shape} x 3")
    kji = np.empty(field.shape[2::-1] + (3,), dtype=np.float32)
    np.multiply(field.transpose(2, 1, 0, 3), _VECTOR_FLIP, out=kji)  # one pass: reorder + to LPS
    _write_image(path, _itk_image(kji, grid, vector=True), kji)


# ---- registration results --------------------------------------------------------------------
RESULT_FILES = {"warped": "warped.nii.gz", "warp": "warp.nii.gz",
                "inverse_warp": "inverse_warp.nii.gz", "jacobian": "jacobian.nii.gz",
                "summary": "summary.json", "overview": "overview.png"}


def to_jsonable(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):  # torch tensors
        return value.tolist()
    raise TypeError(f"cannot store {type(value).__name__} in summary.json")


@contextmanager
def atomic_output(path, *, replace: bool = True):
    """Yield a temporary path with ``path``'s name, in a hidden folder beside it; on success the
    file takes ``path``'s place (created normally, so it gets the usual permissions).

    ``replace=False`` never replaces an existing file, even one that appeared meanwhile: the file
    is published with a hard link, which fails if the name is taken.
    """
    path = Path(path)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
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


def write_json(path, content: dict) -> None:
    """Atomically write ``content`` as indented JSON (numpy values converted)."""
    text = json.dumps(content, indent=2, default=to_jsonable)
    with atomic_output(path) as tmp:
        tmp.write_text(text + "\n")


def _grid_summary(grid: Grid) -> dict:
    return {"shape": list(grid.shape), "spacing_mm": grid.spacing.tolist(),
            "orientation": grid.orientation, "voxel_to_ras": grid.affine.tolist()}


def _summary(result) -> dict:
    from . import __version__
    content = dict(result.summary or {})
    content.setdefault("liquidreg_version", __version__)
    content["affine_ras_fixed_to_moving"] = np.asarray(result.affine).tolist()
    content["fixed_grid"] = _grid_summary(result.fixed_grid)
    content["moving_grid"] = _grid_summary(result.moving_grid)
    content["conventions"] = ("warp.nii.gz: ITK/ANTs displacement field on the fixed grid (LPS mm), "
                              "fixed point x -> moving point x + u(x); inverse_warp.nii.gz: the "
                              "same on the moving grid, moving -> fixed")
    return content


def _render_overview(path, result, fixed, moving) -> None:
    """Runs in a writer thread.  Its torch work is a few tiny slice resamplings, for which
    OpenMP's fork/join across the cores the other writers are using costs ~20x: one thread here
    (the setting is per OpenMP thread, so the caller's own torch threads are untouched)."""
    import torch

    from .figures import save_overview
    torch.set_num_threads(1)
    save_overview(path, result, fixed=fixed, moving=moving)


def save_result(result, out_dir, *, png: bool = True, fixed: Volume | None = None,
                moving: Volume | None = None, progress=None) -> dict:
    """Write a registration result into ``out_dir``; returns {kind: path}.

    Everything is written into a hidden staging folder inside ``out_dir`` (in parallel threads:
    zlib and file I/O release the GIL) and moved into place only when all files succeeded, so a
    failure or Ctrl-C leaves ``out_dir`` as it was.  ``fixed``/``moving`` feed the overview figure
    (skipped when Pillow is not installed).
    """
    out_dir = Path(out_dir)
    created = not out_dir.exists()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create output folder '{out_dir}' ({exc.strerror}); choose a "
                         "writable location") from None
    staging = Path(tempfile.mkdtemp(prefix=".liquidreg-staging-", dir=out_dir))
    staged = {k: staging / name for k, name in RESULT_FILES.items()}
    # Longest jobs first so the threads finish together.
    jobs = {"warp": lambda: write_displacement(staged["warp"], result.displacement,
                                               result.fixed_grid)}
    if png and importlib.util.find_spec("PIL") is not None:  # optional: [figures] extra
        jobs["overview"] = lambda: _render_overview(staged["overview"], result, fixed, moving)
    jobs.update({
        "inverse_warp": lambda: write_displacement(staged["inverse_warp"],
                                                   result.inverse_displacement, result.moving_grid),
        "warped": lambda: write_volume(staged["warped"], result.warped, result.fixed_grid),
        "jacobian": lambda: write_volume(staged["jacobian"], result.jacobian, result.fixed_grid),
        "summary": lambda: write_json(staged["summary"], _summary(result)),
    })
    start = time.perf_counter()
    pool = ThreadPoolExecutor(max_workers=3, thread_name_prefix="liquidreg-write")
    moved = []
    try:
        report(progress, "write", 0, len(jobs), "writing results")
        futures = [pool.submit(job) for job in jobs.values()]
        for done, future in enumerate(futures, 1):
            future.result()
            report(progress, "write", done, len(jobs), "writing results")
        pool.shutdown(wait=True)
        # summary.json last: its presence means the result is complete.
        for kind in sorted(jobs, key=lambda k: k == "summary"):
            os.replace(staged[kind], out_dir / RESULT_FILES[kind])
            moved.append(out_dir / RESULT_FILES[kind])
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        for path in moved:
            path.unlink(missing_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    shutil.rmtree(staging, ignore_errors=True)
    report(progress, "write", len(jobs), len(jobs), "results written",
           seconds=round(time.perf_counter() - start, 2))
    return {kind: out_dir / RESULT_FILES[kind] for kind in jobs}
