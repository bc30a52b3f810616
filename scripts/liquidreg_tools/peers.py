"""Thin adapters for the peer methods the benchmark compares against: ANTs SyN (``antspyx``) and
elastix affine + B-spline (``itk-elastix``), each run with its library defaults.

Each peer is split in two so the benchmark can time and measure the registration alone:
``*_register`` runs the method and returns its native transform, ``*_displacement`` turns that
into LiquidReg's convention: an (I, J, K, 3) RAS mm displacement on the fixed grid mapping fixed
point ``x`` to moving point ``x + u(x)``.  Both peers produce ITK displacement fields (LPS mm,
same direction), so the conversion is :func:`LiquidRegLib.io.read_displacement`: the RAS/LPS flip
stays at the io boundary.  ``ants``, ``itk`` and ``torch`` are imported inside the functions so a
benchmark subprocess that runs one peer carries only that peer's libraries.
"""
from __future__ import annotations

from pathlib import Path

from LiquidRegLib.errors import InputError, LiquidRegError

#: itk-elastix default parameter maps, in order, for "elastix affine + B-spline".
ELASTIX_MAPS = ("affine", "bspline")


def _need(module: str, package: str):
    try:
        return __import__(module)
    except ImportError:
        raise InputError(f"the '{package}' package is needed for this peer method; "
                         f"pip install {package}") from None


def _read_field(path, fixed_path):
    """An ITK displacement file as (RAS field, grid), checked to lie on the fixed image's grid."""
    from LiquidRegLib.io import read_displacement, read_grid

    field, grid = read_displacement(path, name="peer displacement")
    fixed_grid = read_grid(fixed_path, name="fixed image")
    if grid != fixed_grid:
        raise LiquidRegError(f"peer displacement {grid} is not on the fixed grid {fixed_grid}")
    return field, grid


# ---- ANTs ----------------------------------------------------------------------------------
def ants_register(fixed_path, moving_path, workdir, *, type_of_transform: str = "SyN",
                  **options) -> list[str]:
    """``ants.registration`` with its defaults; returns the forward transforms (files), which
    resample the moving image onto the fixed one (``fwdtransforms``: warp then affine .mat)."""
    ants = _need("ants", "antspyx")
    fixed = ants.image_read(str(fixed_path))
    moving = ants.image_read(str(moving_path))
    prefix = str(Path(workdir) / "ants_")
    result = ants.registration(fixed, moving, type_of_transform=type_of_transform,
                               outprefix=prefix, **options)
    return [str(t) for t in result["fwdtransforms"]]


def ants_displacement(fixed_path, transforms, workdir):
    """Compose ANTs forward transforms into one field on the fixed grid (antsApplyTransforms'
    composite output, as ANTs itself would apply them to an image); returns (RAS field, Grid)."""
    ants = _need("ants", "antspyx")
    fixed = ants.image_read(str(fixed_path))
    transforms = [str(t) for t in transforms]
    composite = ants.apply_transforms(fixed, fixed, transforms, whichtoinvert=[False] * len(transforms),
                                      compose=str(Path(workdir) / "ants_forward_"))
    if composite is None:
        raise LiquidRegError(f"ANTs could not compose the transforms {transforms}")
    return _read_field(composite, fixed_path)


def ants_apply(fixed_path, moving_path, transforms, *, interpolator: str = "linear"):
    """The moving image resampled onto the fixed grid by ANTs itself, [i, j, k] (tests use it to
    check :func:`ants_displacement` against ANTs' own resampling)."""
    ants = _need("ants", "antspyx")
    fixed = ants.image_read(str(fixed_path))
    moving = ants.image_read(str(moving_path))
    transforms = [str(t) for t in transforms]
    warped = ants.apply_transforms(fixed, moving, transforms, interpolator=interpolator,
                                   whichtoinvert=[False] * len(transforms))
    return warped.numpy()  # ANTsImage.numpy() is already x, y, z = i, j, k order


# ---- elastix -------------------------------------------------------------------------------
def elastix_parameters(maps=ELASTIX_MAPS, overrides: dict | None = None):
    """An itk ParameterObject holding elastix's default maps (``overrides``: {key: value} set in
    every map, e.g. fewer iterations for quick tests)."""
    itk = _need("itk", "itk-elastix")
    parameters = itk.ParameterObject.New()
    for name in maps:
        parameter_map = parameters.GetDefaultParameterMap(name)
        for key, value in (overrides or {}).items():
            parameter_map[key] = [str(v) for v in value] if isinstance(value, (list, tuple)) \
                else [str(value)]
        parameters.AddParameterMap(parameter_map)
    return parameters


def elastix_register(fixed_path, moving_path, workdir, *, parameters=None, threads: int | None = None):
    """Run elastix (default affine then B-spline maps); returns the result transform parameter
    object (fixed -> moving points, as transformix applies it).

    ``threads`` goes through ITK's global default: the filter's own SetNumberOfThreads crashes
    itk-elastix 0.25 with the B-spline map."""
    itk = _need("itk", "itk-elastix")
    if threads:
        itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(int(threads))
    fixed = itk.imread(str(fixed_path), itk.F)
    moving = itk.imread(str(moving_path), itk.F)
    method = itk.ElastixRegistrationMethod.New(fixed, moving)
    method.SetParameterObject(parameters if parameters is not None else elastix_parameters())
    method.SetOutputDirectory(str(workdir))
    method.SetLogToConsole(False)
    method.UpdateLargestPossibleRegion()
    return method.GetTransformParameterObject()


def elastix_displacement(fixed_path, transform_parameters, workdir):
    """transformix's deformation field of ``transform_parameters`` (on the fixed grid the maps
    record) as (RAS field, Grid).  transformix writes it into ``workdir`` as deformationField.nii
    (given no folder it would write into the current directory)."""
    itk = _need("itk", "itk-elastix")
    transformix = itk.TransformixFilter.New(itk.imread(str(fixed_path), itk.F))
    transformix.SetTransformParameterObject(transform_parameters)
    transformix.SetComputeDeformationField(True)
    transformix.SetOutputDirectory(str(workdir))
    transformix.SetLogToConsole(False)
    transformix.Update()
    return _read_field(Path(workdir) / "deformationField.nii", fixed_path)
