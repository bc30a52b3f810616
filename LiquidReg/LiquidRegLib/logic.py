"""MRML nodes <-> the engine: everything LiquidReg does in 3D Slicer that does not need Qt.

Three users share it: the Slicer module's logic (which runs the ``liquidreg`` command as a
background job, ``jobs.py``, and loads its files back through here), scripts in Slicer's Python
console, and plain Python with the ``slicer-core`` wheel (``slicer.mrmlScene =
slicer.vtkMRMLScene()`` first).  Preparing a job never imports torch: the Slicer process only
checks nodes and writes files.

Frames.  The fixed volume is read in world coordinates (a linear parent transform is folded into
its grid).  The moving volume is read in its own local coordinates, and a linear parent transform
on it becomes the initial affine (the user's manual pre-alignment).  The resulting displacement
therefore maps fixed world points to moving *local* points, which is exactly what a transform
placed as the moving volume's parent must do.

Registering again.  A result shown on the moving volume replaces its parent transform.  The
result transform remembers the pre-alignment it started from (node reference
``PRE_ALIGNMENT_ROLE``), so the next registration of that moving volume starts again from its own
voxels and the user's pre-alignment, never from the previous warp.

This is the only place where the engine's displacement field becomes a Slicer grid transform.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import slicer
import slicer.util
import vtk
from vtk.util import numpy_support

from . import validate
from .cli import option_arguments
from .errors import InputError
from .grid import GeometryError, Grid
from .io import Volume, read_displacement, read_volume, write_volume
from .options import RegistrationOptions
from .results import RESULT_FILES
from .resources import check_new_weights_path  # noqa: F401  (the panel's fine-tune output)

DEVICES = {"Auto": "auto", "CPU": "cpu", "GPU": "cuda"}
JACOBIAN_COLOR_NODE_NAME = "LiquidReg Jacobian"
#: Slicer's diverging colour table (Base/Logic/Resources/ColorFiles), loaded by the application.
SLICER_DIVERGING_COLORS = "DivergingBlueRed.txt"
SUMMARY_ATTRIBUTE = "LiquidReg.Summary"
#: Node references LiquidReg writes: on the result transform, the user's linear transform the
#: registration started from; on every output, the fixed and moving volumes it was made for.
PRE_ALIGNMENT_ROLE = "LiquidReg.preAlignment"
FIXED_ROLE, MOVING_ROLE = "LiquidReg.fixedVolume", "LiquidReg.movingVolume"


# ---- nodes -> engine volumes ------------------------------------------------------------------
def _matrix(vtk_matrix_getter) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    vtk_matrix_getter(m)
    return slicer.util.arrayFromVTKMatrix(m)


def _check_volume_node(node, name: str) -> None:
    if node is None:
        raise InputError(f"no {name} volume is selected; choose one in the '{name}' selector")
    if node.GetScene() is None:
        raise InputError(f"the {name} volume '{node.GetName()}' is no longer in the scene; "
                         "select a volume that is loaded")
    if not node.IsA("vtkMRMLScalarVolumeNode"):
        raise InputError(f"'{node.GetName()}' ({node.GetClassName()}) is not a scalar volume; "
                         f"select a scalar volume as the {name} volume")
    image = node.GetImageData()
    if image is None or image.GetNumberOfPoints() == 0:
        raise InputError(f"the {name} volume '{node.GetName()}' has no voxels; load the image "
                         "again or select another volume")
    if image.GetNumberOfScalarComponents() != 1:
        raise InputError(f"the {name} volume '{node.GetName()}' has "
                         f"{image.GetNumberOfScalarComponents()} values per voxel (colour or "
                         "vector); convert it with the 'Vector to Scalar Volume' module first")


def node_to_world(node, name: str, parent=False) -> np.ndarray:
    """The 4x4 matrix of the node's parent transforms (identity without one); ``parent``, when
    given (a transform node or None), stands for the node's own parent.

    A non-linear parent cannot be folded into a grid, so it is refused with the fix.
    """
    parent = node.GetParentTransformNode() if parent is False else parent
    if parent is None:
        return np.eye(4)
    if not parent.IsTransformToWorldLinear():
        raise InputError(f"the {name} volume '{node.GetName()}' is under the non-linear transform "
                         f"'{parent.GetName()}'; harden it (Data module: right-click the volume > "
                         "Harden transform) or remove it, then register again")
    return _matrix(parent.GetMatrixTransformToWorld)


def plain_scalar_volumes(scene) -> list:
    """The scene's plain scalar volumes: what may be registered (not label maps, vector, tensor
    or diffusion volumes, which all derive from vtkMRMLScalarVolumeNode)."""
    return [node for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode", scene)
            if node.GetClassName() == "vtkMRMLScalarVolumeNode"]


def volume_from_node(node, name: str, *, node_to_frame=None, labels: bool = False,
                     vtk_order: bool = False) -> Volume:
    """Read a volume node as an engine :class:`Volume` (a copy of its voxels).

    Its grid is placed in world coordinates unless ``node_to_frame`` (the 4x4 matrix from the
    node's parent space to the wanted frame) says otherwise.  ``arrayFromVolume`` is indexed
    [k, j, i]; the engine's arrays are [i, j, k].  Images become float32; ``labels=True`` keeps
    the stored integer type (masks, label maps).  ``vtk_order``: the copy keeps VTK's memory
    order (an [i, j, k] view of [k, j, i] memory), which files take without transposing.
    """
    _check_volume_node(node, name)
    to_frame = node_to_world(node, name) if node_to_frame is None else np.asarray(node_to_frame)
    affine = to_frame @ _matrix(node.GetIJKToRASMatrix)
    kji = slicer.util.arrayFromVolume(node)
    dtype = kji.dtype if labels and np.issubdtype(kji.dtype, np.integer) else np.float32
    array = (np.array(kji, dtype=dtype).transpose(2, 1, 0) if vtk_order
             else np.ascontiguousarray(kji.transpose(2, 1, 0), dtype=dtype))
    try:
        grid = Grid(array.shape, affine)
    except GeometryError as error:
        raise InputError(f"the {name} volume '{node.GetName()}' has unusable geometry ({error}); "
                         "fix its spacing and directions in the Volumes module") from None
    return Volume(array, grid, f"{name} volume '{node.GetName()}'")


def read_volume_node(path, name: str | None = None, *, labels: bool = False):
    """Load an image file into a new volume node with MRML's own reader (for plain Python, where
    ``slicer.util.loadVolume`` needs the application)."""
    path = Path(path)
    scene = slicer.mrmlScene
    node = scene.AddNewNodeByClass(
        "vtkMRMLLabelMapVolumeNode" if labels else "vtkMRMLScalarVolumeNode",
        name or path.name.split(".")[0])
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    if not storage.ReadData(node):
        scene.RemoveNode(storage)
        scene.RemoveNode(node)
        raise InputError(f"'{path}' could not be read as a volume; check the path and format")
    node.SetAndObserveStorageNodeID(storage.GetID())
    node.CreateDefaultDisplayNodes()
    return node


def write_node(node, path) -> Path:
    """Save a volume or transform node with MRML's own writer (the format follows the extension)."""
    path = Path(path)
    scene = node.GetScene()
    storage = scene.AddNewNodeByClass("vtkMRMLTransformStorageNode"
                                      if node.IsA("vtkMRMLTransformNode")
                                      else "vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    try:
        if not storage.WriteData(node):
            raise InputError(f"'{node.GetName()}' could not be written to '{path}'; choose a "
                             "writable location and a .nrrd/.nii.gz (or .h5 for transforms) name")
    finally:
        scene.RemoveNode(storage)
    return path


# ---- engine results -> nodes ------------------------------------------------------------------
def grid_transform_from_displacement(displacement, grid: Grid):
    """The engine's displacement (I, J, K, 3 RAS mm on ``grid``) as a vtkOrientedGridTransform.

    Used as a FromParent transform it maps each fixed point x to x + u(x), the resampling
    direction, with the same trilinear interpolation the engine uses.
    """
    field_ijk = np.asarray(displacement, dtype=np.float32)
    if field_ijk.shape != (*grid.shape, 3):
        raise ValueError(f"displacement shape {field_ijk.shape} does not match {grid.shape} x 3")
    image = vtk.vtkImageData()
    image.SetDimensions(*grid.shape)
    image.SetOrigin(*grid.origin)
    image.SetSpacing(*grid.spacing)
    vectors = numpy_support.numpy_to_vtk(
        np.ascontiguousarray(field_ijk.transpose(2, 1, 0, 3)).reshape(-1, 3), deep=True)
    vectors.SetName("DisplacementRAS")
    image.GetPointData().SetScalars(vectors)
    direction = np.eye(4)
    direction[:3, :3] = grid.direction
    transform = slicer.vtkOrientedGridTransform()
    transform.SetDisplacementGridData(image)
    transform.SetGridDirectionMatrix(slicer.util.vtkMatrixFromArray(direction))
    transform.SetInterpolationModeToLinear()
    return transform


def set_volume_node(node, array_ijk, grid: Grid) -> None:
    """Put an [i, j, k] array on ``grid`` into an existing volume node, replacing its voxels."""
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(grid.affine))
    kji = np.ascontiguousarray(np.asarray(array_ijk).transpose(2, 1, 0))
    slicer.util.updateVolumeFromArray(node, kji)


def jacobian_color_node(scene):
    """A diverging blue-white-red table for Jacobian determinants: Slicer's own
    ``DivergingBlueRed`` where the application loaded it, else one made here (one per scene)."""
    node = (scene.GetNodeByID(slicer.vtkMRMLColorLogic.GetFileColorNodeID(SLICER_DIVERGING_COLORS))
            or scene.GetFirstNode(JACOBIAN_COLOR_NODE_NAME, "vtkMRMLColorTableNode"))
    if node is not None:
        return node
    node = scene.AddNewNodeByClass("vtkMRMLColorTableNode", JACOBIAN_COLOR_NODE_NAME)
    node.SetTypeToUser()
    node.SetNumberOfColors(256)
    shrink, neutral, grow = np.array([0.1, 0.25, 0.75]), np.ones(3), np.array([0.75, 0.1, 0.1])
    for index, t in enumerate(np.linspace(-1.0, 1.0, 256)):
        rgb = neutral + (abs(t) * ((grow if t > 0 else shrink) - neutral))
        node.SetColor(index, *rgb.tolist(), 1.0)
    node.SetAttribute("Category", "LiquidReg")
    return node


def show_jacobian_colors(volume_node) -> None:
    """Diverging colours centred at 1: blue where tissue shrinks, red where it grows, 0..2 shown."""
    volume_node.CreateDefaultDisplayNodes()
    display = volume_node.GetDisplayNode()
    display.SetAndObserveColorNodeID(jacobian_color_node(volume_node.GetScene()).GetID())
    display.AutoWindowLevelOff()
    display.SetWindowLevel(2.0, 1.0)


@dataclass
class RegistrationNodes:
    """What a registration leaves in the scene (also returned to scripts)."""

    transformNode: object
    jacobianVolumeNode: object
    warpedVolumeNode: object
    summary: dict = field(default_factory=dict)


@dataclass
class RegistrationRequest:
    """The user's selection: inputs, optional masks, and output nodes to update (None = create)."""

    fixedVolumeNode: object
    movingVolumeNode: object
    fixedMaskNode: object = None
    movingMaskNode: object = None
    transformNode: object = None
    jacobianVolumeNode: object = None
    warpedVolumeNode: object = None
    applyToMoving: bool = False


@dataclass
class RegistrationInputs:
    """A request read into engine volumes, in the frames described in the module docstring."""

    fixed: Volume
    moving: Volume
    fixedMask: Volume | None
    movingMask: Volume | None
    initialAffine: np.ndarray | None
    preAlignmentNode: object = None  # the user's linear transform the initial affine came from
    #                                  (kept even while it is the identity: the user may edit it)


def _name(node) -> str:
    return f"'{node.GetName()}'"


def _check_outputs(request: RegistrationRequest) -> None:
    """Refuse output selections that would overwrite an input or land somewhere unexpected."""
    inputs = {"fixed volume": request.fixedVolumeNode, "moving volume": request.movingVolumeNode,
              "fixed mask": request.fixedMaskNode, "moving mask": request.movingMaskNode}
    outputs = {"Jacobian output": request.jacobianVolumeNode,
               "warped output": request.warpedVolumeNode}
    for out_name, out in outputs.items():
        if out is None:
            continue
        for in_name, node in inputs.items():
            if node is not None and out is node:
                raise InputError(f"the {out_name} is the {in_name} {_name(node)}; choose another "
                                 "node (or leave it empty to create one) so the input is kept")
        if not out.IsA("vtkMRMLScalarVolumeNode") or out.IsA("vtkMRMLLabelMapVolumeNode"):
            raise InputError(f"the {out_name} {_name(out)} is not a scalar volume; choose a scalar "
                             "volume or leave it empty to create one")
    if (request.jacobianVolumeNode is not None
            and request.jacobianVolumeNode is request.warpedVolumeNode):
        raise InputError("the Jacobian and warped outputs are the same node; choose two different "
                         "nodes or leave them empty to create new ones")
    transform = request.transformNode
    for out_name, out in [("output transform", transform), *outputs.items()]:
        if out is not None and out.GetParentTransformNode() is not None:
            raise InputError(f"the {out_name} {_name(out)} is under the transform "
                             f"{_name(out.GetParentTransformNode())}; choose one that is not, or "
                             "leave it empty to create one")
    if transform is not None:
        if not transform.IsA("vtkMRMLTransformNode"):
            raise InputError(f"the output transform {_name(transform)} is not a transform node; "
                             "choose a transform or leave it empty to create one")
        for in_name in ("fixed volume", "fixed mask"):
            node = inputs[in_name]
            if node is not None and node.GetParentTransformNode() is transform:
                raise InputError(f"the {in_name} {_name(node)} is under the output transform "
                                 f"{_name(transform)}; choose another output transform")
        moving = request.movingVolumeNode
        if (moving.GetParentTransformNode() is transform
                and transform.GetAttribute(SUMMARY_ATTRIBUTE) is None):
            raise InputError(f"the output transform {_name(transform)} is the moving volume's own "
                             "starting alignment, which would be lost; choose another output "
                             "transform or leave it empty to create one")


def is_result_for(transform, movingNode) -> bool:
    """True if ``transform`` is a LiquidReg result made for ``movingNode``."""
    return (transform is not None and transform.GetAttribute(SUMMARY_ATTRIBUTE) is not None
            and transform.GetNodeReferenceID(MOVING_ROLE) == movingNode.GetID())


def made_for_another_pair(node, fixedNode, movingNode) -> bool:
    """True for an output LiquidReg wrote for another fixed/moving pair: the panel never writes
    one pair's result over another's."""
    pair = node.GetNodeReferenceID(FIXED_ROLE), node.GetNodeReferenceID(MOVING_ROLE)
    return pair != (None, None) and pair != (fixedNode.GetID(), movingNode.GetID())


def _pre_alignment(node, request: RegistrationRequest):
    """The transform that places ``node`` (the moving volume or its mask) before registration:
    its parent, unless that is a LiquidReg result for this moving volume (or the output being
    recomputed), whose remembered pre-alignment then takes its place."""
    parent = node.GetParentTransformNode()
    if parent is not None and (parent is request.transformNode
                               or is_result_for(parent, request.movingVolumeNode)):
        return parent.GetNodeReference(PRE_ALIGNMENT_ROLE)
    return parent


def read_request(request: RegistrationRequest, *, vtk_order: bool = False) -> RegistrationInputs:
    """Validate a selection and read it; raises InputError before anything is changed.

    Images are checked here (numpy only); masks are checked by the engine, which resamples them.
    ``vtk_order``: the voxels in VTK's memory order (see :func:`volume_from_node`), for
    :func:`write_cli_inputs`.
    """
    fixed_node, moving_node = request.fixedVolumeNode, request.movingVolumeNode
    _check_volume_node(fixed_node, "fixed")
    _check_volume_node(moving_node, "moving")
    if fixed_node is moving_node:
        raise InputError(f"the fixed and moving volumes are the same volume {_name(fixed_node)}; "
                         "choose two different volumes")
    _check_outputs(request)
    pre_alignment = _pre_alignment(moving_node, request)
    world_to_moving = np.linalg.inv(node_to_world(moving_node, "moving", pre_alignment))
    fixed = volume_from_node(fixed_node, "fixed", vtk_order=vtk_order)
    moving = volume_from_node(moving_node, "moving", node_to_frame=np.eye(4), vtk_order=vtk_order)
    validate.check_image(fixed, fixed.name)
    validate.check_image(moving, moving.name)
    fixed_mask = moving_mask = None
    if request.fixedMaskNode is not None:
        fixed_mask = volume_from_node(request.fixedMaskNode, "fixed mask", labels=True,
                                      vtk_order=vtk_order)
    if request.movingMaskNode is not None:
        mask_node = request.movingMaskNode
        mask_to_world = node_to_world(mask_node, "moving mask", _pre_alignment(mask_node, request))
        moving_mask = volume_from_node(mask_node, "moving mask", labels=True,
                                       node_to_frame=world_to_moving @ mask_to_world,
                                       vtk_order=vtk_order)
    initial = None if np.allclose(world_to_moving, np.eye(4)) else world_to_moving
    return RegistrationInputs(fixed, moving, fixed_mask, moving_mask, initial, pre_alignment)


def _output_volume(scene, node, base_name: str):
    if node is not None:
        return node
    return scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", scene.GenerateUniqueName(base_name))


def apply_result(request: RegistrationRequest, displacement, grid: Grid, jacobian, warped,
                 summary: dict, preAlignmentNode=None) -> RegistrationNodes:
    """Put a registration result into the scene: selected output nodes are updated in place,
    missing ones are created.  The transform is FromParent (fixed -> moving, RAS mm) and
    remembers ``preAlignmentNode`` (``RegistrationInputs.preAlignmentNode``) for the next run."""
    fixed_node, moving_node = request.fixedVolumeNode, request.movingVolumeNode
    for node, name in ((fixed_node, "fixed"), (moving_node, "moving")):
        if node.GetScene() is None:
            raise InputError(f"the {name} volume {_name(node)} was removed from the scene during "
                             "registration; load it again and register again")
    transform = grid_transform_from_displacement(displacement, grid)
    scene = fixed_node.GetScene()
    base = f"{moving_node.GetName()}_to_{fixed_node.GetName()}"
    created = []
    try:
        transform_node = request.transformNode
        if transform_node is None:
            transform_node = scene.AddNewNodeByClass("vtkMRMLGridTransformNode",
                                                     scene.GenerateUniqueName(f"{base}_transform"))
            created.append(transform_node)
        jacobian_node = _output_volume(scene, request.jacobianVolumeNode, f"{base}_jacobian")
        warped_node = _output_volume(scene, request.warpedVolumeNode, f"{base}_warped")
        created += [n for n, given in ((jacobian_node, request.jacobianVolumeNode),
                                       (warped_node, request.warpedVolumeNode)) if given is None]
        transform_node.SetAndObserveTransformFromParent(transform)
        transform_node.SetNodeReferenceID(transform_node.GetFixedNodeReferenceRole(),
                                          fixed_node.GetID())
        transform_node.SetNodeReferenceID(transform_node.GetMovingNodeReferenceRole(),
                                          moving_node.GetID())
        transform_node.SetAttribute(SUMMARY_ATTRIBUTE, json.dumps(summary, default=str))
        kept = preAlignmentNode is not None and preAlignmentNode.GetScene() is scene
        transform_node.SetNodeReferenceID(PRE_ALIGNMENT_ROLE,
                                          preAlignmentNode.GetID() if kept else None)
        for node in (transform_node, jacobian_node, warped_node):
            node.SetNodeReferenceID(FIXED_ROLE, fixed_node.GetID())
            node.SetNodeReferenceID(MOVING_ROLE, moving_node.GetID())
        set_volume_node(jacobian_node, np.asarray(jacobian, dtype=np.float32), grid)
        show_jacobian_colors(jacobian_node)
        set_volume_node(warped_node, np.asarray(warped, dtype=np.float32), grid)
        warped_node.CreateDefaultDisplayNodes()
        if request.applyToMoving:
            moving_node.SetAndObserveTransformNodeID(transform_node.GetID())
    except BaseException:
        for node in created:
            scene.RemoveNode(node)
        raise
    return RegistrationNodes(transform_node, jacobian_node, warped_node, dict(summary))


def show_result(fixedNode, nodes: RegistrationNodes, opacity: float = 0.4) -> None:
    """Show the Jacobian map over the fixed volume in every slice view of the scene."""
    slicer.util.setSliceViewerLayers(background=fixedNode, foreground=nodes.jacobianVolumeNode,
                                     foregroundOpacity=opacity)


def load_cli_result(request: RegistrationRequest, out_dir, preAlignmentNode=None) \
        -> RegistrationNodes:
    """Bring the files written by ``liquidreg register -o out_dir`` into the scene."""
    out_dir = Path(out_dir)
    displacement, grid = read_displacement(out_dir / RESULT_FILES["warp"], name="result warp")
    jacobian = read_volume(out_dir / RESULT_FILES["jacobian"], name="result Jacobian",
                           itk_order=True)  # VTK's order: the nodes take them without a copy
    warped = read_volume(out_dir / RESULT_FILES["warped"], name="result warped image",
                         itk_order=True)
    summary = json.loads((out_dir / RESULT_FILES["summary"]).read_text())
    return apply_result(request, displacement, grid, jacobian.array, warped.array, summary,
                        preAlignmentNode)


# ---- files and command lines for background jobs ----------------------------------------------
def write_cli_inputs(inputs: RegistrationInputs, folder) -> list[str]:
    """Write a read request (best read with ``vtk_order=True``) as files for ``liquidreg
    register``; returns the input arguments.

    Uncompressed NIfTI: the files live for one job, so compressing them (and inflating them in
    the worker) would only cost time; NIfTI is streamed without ITK's copies."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arguments = []
    for volume, file_name in ((inputs.fixed, "fixed.nii"), (inputs.moving, "moving.nii")):
        write_volume(folder / file_name, volume.array, volume.grid)
        arguments.append(str(folder / file_name))
    for volume, file_name, flag in ((inputs.fixedMask, "fixed_mask.nii", "--fixed-mask"),
                                    (inputs.movingMask, "moving_mask.nii", "--moving-mask")):
        if volume is not None:
            write_volume(folder / file_name, volume.array, volume.grid)
            arguments += [flag, str(folder / file_name)]
    if inputs.initialAffine is not None:
        np.savetxt(folder / "initial_affine.txt", inputs.initialAffine)
        arguments += ["--initial-affine", str(folder / "initial_affine.txt")]
    return arguments


def register_arguments(input_arguments, out_dir, options: RegistrationOptions,
                       panel: bool = False) -> list[str]:
    """The full ``liquidreg register`` command line for the background process; ``panel``: only
    the files the panel reads (no overview PNG, no inverse warp)."""
    return ["register", *input_arguments, "-o", str(out_dir), *option_arguments(options),
            *(["--no-png", "--no-inverse"] if panel else [])]


def default_weights_path(folder) -> Path:
    """A new, dated file name for fine-tuned weights in ``folder``."""
    return Path(folder) / f"liquidreg_finetuned_{time.strftime('%Y%m%d-%H%M%S')}.pt"


def write_pairs_csv(pairs, path) -> Path:
    """A ``liquidreg finetune --pairs`` file (fixed,moving columns) for (fixed, moving) paths."""
    lines = ["fixed,moving"] + [f"{Path(a).resolve()},{Path(b).resolve()}" for a, b in pairs]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def finetune_source_arguments(source: str, folder, *, fixedNode=None, movingNode=None,
                              files=()) -> list[str]:
    """Command-line arguments naming the fine-tuning data: "pair" (the two selected volumes,
    written to ``folder`` in world coordinates), "folder" (``files[0]``) or "list" (``files``)."""
    folder = Path(folder)
    files = [str(f) for f in files if str(f).strip()]
    if source == "pair":
        fixed = volume_from_node(fixedNode, "fixed")
        moving = volume_from_node(movingNode, "moving")
        if fixedNode is movingNode:
            raise InputError("the fixed and moving volumes are the same volume; choose two "
                             "different volumes to fine-tune on")
        for volume, name in ((fixed, "fixed.nrrd"), (moving, "moving.nrrd")):
            validate.check_image(volume, volume.name)
            write_volume(folder / name, volume.array, volume.grid)
        return ["--pairs", str(write_pairs_csv([(folder / "fixed.nrrd", folder / "moving.nrrd")],
                                               folder / "pairs.csv"))]
    if source == "folder":
        if not files or not Path(files[0]).is_dir():
            raise InputError("no folder of images is chosen; choose the folder that holds the "
                             "volumes to fine-tune on")
        return ["--images", files[0]]
    if source == "list":
        if len(files) < 2:
            raise InputError(f"{len(files)} volume file(s) are listed; add at least two to "
                             "fine-tune on")
        pairs = [(a, b) for a in files for b in files if a != b]
        return ["--pairs", str(write_pairs_csv(pairs, folder / "pairs.csv"))]
    raise ValueError(f"unknown fine-tuning source {source!r}")


def finetune_arguments(source_arguments, output, *, steps=200, device="auto",
                       weights=None) -> list[str]:
    """The full ``liquidreg finetune`` command line for the background process."""
    arguments = ["finetune", *source_arguments, "-o", str(output), "--steps", str(int(steps)),
                 "--device", device]
    if weights:
        arguments += ["--weights", str(weights)]
    return arguments


# ---- registering in this process (scripts) -------------------------------------------------
def register_nodes(fixedNode, movingNode, options: RegistrationOptions | None = None, *,
                   fixedMaskNode=None, movingMaskNode=None, transformNode=None,
                   jacobianVolumeNode=None, warpedVolumeNode=None, applyToMoving: bool = False,
                   progress=None, cancel=None, **settings) -> RegistrationNodes:
    """Register two volume nodes in this process and put the transform, Jacobian and warped
    volume in the scene; blocks.  Nothing in the scene changes unless it succeeds.

    ``options`` (or ``settings``, its fields by name) as for ``register.register``; the device
    may also be named as in the panel ("Auto", "CPU", "GPU").  The initial affine comes from the
    moving volume's linear parent transform.
    """
    from .register import register

    if "device" in settings:
        settings["device"] = DEVICES.get(settings["device"], settings["device"])
    options = RegistrationOptions.of(options, **settings)
    request = RegistrationRequest(fixedNode, movingNode, fixedMaskNode, movingMaskNode,
                                  transformNode, jacobianVolumeNode, warpedVolumeNode,
                                  applyToMoving)
    inputs = read_request(request)
    if inputs.initialAffine is not None:
        if options.initial_affine is not None:
            raise InputError("an initial affine was given and the moving volume is under a "
                             "linear transform; pass one of the two")
        options = RegistrationOptions.of(options, initial_affine=inputs.initialAffine)
    result = register(inputs.fixed, inputs.moving, options, fixed_mask=inputs.fixedMask,
                      moving_mask=inputs.movingMask, progress=progress, cancel=cancel)
    for warning in result.summary.get("warnings", []):  # e.g. a partial field of view
        logging.warning("LiquidReg: %s", warning)
    return apply_result(request, result.displacement, result.fixed_grid, result.jacobian,
                        result.warped, result.summary, inputs.preAlignmentNode)
