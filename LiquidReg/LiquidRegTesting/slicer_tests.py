"""Checks of the Slicer integration, shared by pytest and the Slicer module's self-test.

The same bodies run in CI against the real MRML libraries of the ``slicer-core`` wheel
(``Testing/test_slicer_logic.py``) and inside the Slicer application (``LiquidRegTest``, run by
ctest), so what passes in CI is what users get.  Each body works on ``slicer.mrmlScene`` (the
caller provides an empty scene), writes only into ``workdir`` and raises AssertionError on
failure.  Geometry is checked with MRML/VTK/ITK machinery, never with the engine's own resampler.
"""
from __future__ import annotations


import numpy as np
import slicer
import slicer.util
import vtk
from vtk.util import numpy_support

from LiquidRegLib import jobs, logic
from LiquidRegLib.errors import InputError
from LiquidRegLib.grid import LPS_FLIP, Grid
from LiquidRegLib.io import read_volume
from LiquidRegLib.options import RegistrationOptions
from LiquidRegLib.resources import folder
from LiquidRegLib.results import RESULT_FILES

SAMPLE_DIR = folder("sample")


# ---- helpers: geometry and scene access through Slicer's own machinery ----------------------
def rotation(axis, degrees: float) -> np.ndarray:
    axis = np.asarray(axis, dtype=np.float64)
    axis /= np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    a = np.radians(degrees)
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


def oblique_lps_affine(spacing, origin, degrees=17.0) -> np.ndarray:
    """IJK->RAS of an LPS-stored (i to the left, j to the back), obliquely tilted volume."""
    m = np.eye(4)
    m[:3, :3] = rotation((1.0, 2.0, 3.0), degrees) @ np.diag([-1.0, -1.0, 1.0]) @ np.diag(spacing)
    m[:3, 3] = origin
    return m


def ijk_to_ras(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return slicer.util.arrayFromVTKMatrix(m)


def add_volume(array_ijk, affine, name, labels=False):
    """A volume node made by Slicer's own helper (it takes [k, j, i] arrays)."""
    return slicer.util.addVolumeFromArray(
        np.ascontiguousarray(np.asarray(array_ijk).transpose(2, 1, 0)), affine, name,
        "vtkMRMLLabelMapVolumeNode" if labels else "vtkMRMLScalarVolumeNode")


def transform_points(transform, points_ras) -> np.ndarray:
    """Map (N, 3) RAS points through a VTK transform in one call."""
    source, target = vtk.vtkPoints(), vtk.vtkPoints()
    source.SetData(numpy_support.numpy_to_vtk(np.ascontiguousarray(points_ras, dtype=np.float64),
                                              deep=True))
    transform.TransformPoints(source, target)
    return numpy_support.vtk_to_numpy(target.GetData()).astype(np.float64)


def voxel_centres_ras(node) -> np.ndarray:
    """RAS centre of every voxel of ``node`` in arrayFromVolume ([k, j, i]) order, (N, 3)."""
    i, j, k = node.GetImageData().GetDimensions()
    kk, jj, ii = np.meshgrid(np.arange(k), np.arange(j), np.arange(i), indexing="ij")
    ijk1 = np.stack([ii.ravel(), jj.ravel(), kk.ravel(), np.ones(ii.size)], axis=1)
    return (ijk1 @ ijk_to_ras(node).T)[:, :3]


def resample_labels_through(transform, labels_node, reference_node, stride=1) -> np.ndarray:
    """Nearest-neighbour resampling of ``labels_node`` onto ``reference_node``'s voxels (every
    ``stride``-th along each axis), reading each reference point x at ``transform``(x): VTK's
    own point mapping, not the engine's resampler.  Returns a [k, j, i] array."""
    shape_kji = reference_node.GetImageData().GetDimensions()[::-1]
    centres = voxel_centres_ras(reference_node).reshape(*shape_kji, 3)
    centres = centres[::stride, ::stride, ::stride]
    mapped = transform_points(transform, centres.reshape(-1, 3))
    ras_to_ijk = np.linalg.inv(ijk_to_ras(labels_node))
    ijk = np.rint(mapped @ ras_to_ijk[:3, :3].T + ras_to_ijk[:3, 3]).astype(np.int64)
    labels = slicer.util.arrayFromVolume(labels_node)  # [k, j, i]
    size = np.array(labels.shape[::-1])
    inside = np.all((ijk >= 0) & (ijk < size), axis=1)
    out = np.zeros(len(ijk), dtype=labels.dtype)
    out[inside] = labels[ijk[inside, 2], ijk[inside, 1], ijk[inside, 0]]
    return out.reshape(centres.shape[:3])


def scene_state() -> list:
    """Every node's ID and modification time: equal states mean nothing was touched."""
    scene = slicer.mrmlScene
    nodes = [scene.GetNthNode(n) for n in range(scene.GetNumberOfNodes())]
    return sorted((node.GetID(), node.GetMTime()) for node in nodes)


def itk_transform_points(path, points_ras) -> np.ndarray:
    """Map RAS points through a transform file as SimpleITK reads it (LPS inside)."""
    import SimpleITK as sitk

    transform = sitk.ReadTransform(str(path))
    flip = LPS_FLIP[:3, :3].diagonal()
    return np.array([transform.TransformPoint((p * flip).tolist()) for p in points_ras]) * flip


def refusal(call, expected: str) -> str:
    """The one-line InputError ``call()`` must raise, checked to mention ``expected``."""
    try:
        call()
    except InputError as error:
        message = str(error)
        assert expected in message, f"{expected!r} not in {message!r}"
        assert "\n" not in message and ";" in message, f"not a one-line problem; fix: {message}"
        return message
    raise AssertionError(f"accepted; expected a refusal mentioning {expected!r}")


# ---- conversions, with analytic data ---------------------------------------------------------
def test_volume_from_node_oblique_lps(workdir):
    """[k, j, i] node arrays become [i, j, k] Volumes placed exactly where MRML and ITK put them."""
    shape = (9, 11, 13)
    affine = oblique_lps_affine((1.2, 0.9, 2.5), (31.0, -12.0, 7.5))
    i, j, k = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    array = (10000 * i + 100 * j + k).astype(np.int32)  # each voxel encodes its own index
    node = add_volume(array, affine, "oblique")

    volume = logic.volume_from_node(node, "fixed")
    assert volume.array.shape == shape and volume.array.dtype == np.float32
    assert np.array_equal(volume.array, array.astype(np.float32))
    assert np.allclose(volume.grid.affine, ijk_to_ras(node), atol=1e-9)
    labels = logic.volume_from_node(node, "mask", labels=True)
    assert labels.array.dtype == np.int32 and np.array_equal(labels.array, array)
    for kind in (False, True):  # the panel's copy in VTK's memory order: the same voxels
        ordered = logic.volume_from_node(node, "mask", labels=kind, vtk_order=True)
        assert ordered.array.transpose(2, 1, 0).flags.c_contiguous
        assert np.array_equal(ordered.array, array) and ordered.grid == volume.grid
        assert not np.shares_memory(ordered.array, slicer.util.arrayFromVolume(node))

    # MRML writes the node, ITK (through the engine's reader) reads the file: same placement.
    from_file = read_volume(logic.write_node(node, workdir / "oblique.nrrd"), dtype=None)
    assert from_file.grid == volume.grid, (from_file.grid.affine, volume.grid.affine)
    assert np.array_equal(from_file.array, array)

    # A linear parent transform moves the volume in the world, and so its grid.
    parent = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "tilt")
    to_parent = np.eye(4)
    to_parent[:3, :3] = rotation((0.0, 1.0, 1.0), 9.0)
    to_parent[:3, 3] = (4.0, -3.0, 2.0)
    parent.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(to_parent))
    node.SetAndObserveTransformNodeID(parent.GetID())
    moved = logic.volume_from_node(node, "fixed")
    assert np.allclose(moved.grid.affine, to_parent @ affine, atol=1e-9)


def _linear_field(grid: Grid, seed=0):
    """An affine displacement u(x) = M x + c: trilinear interpolation reproduces it exactly."""
    rng = np.random.default_rng(seed)
    matrix = rng.uniform(-0.04, 0.04, (3, 3))
    offset = rng.uniform(-3.0, 3.0, 3)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in grid.shape], indexing="ij"), axis=-1)
    ras = grid.voxel_to_ras(ijk)
    return (ras @ matrix.T + offset).astype(np.float32), (lambda p: p + p @ matrix.T + offset)


def _pair_on(grid: Grid, seed=0):
    rng = np.random.default_rng(seed)
    fixed = add_volume(rng.random(grid.shape).astype(np.float32), grid.affine, "fixed")
    moving_affine = grid.affine.copy()
    moving_affine[:3, 3] += (2.0, 1.0, -1.0)
    moving = add_volume(rng.random(grid.shape).astype(np.float32), moving_affine, "moving")
    return fixed, moving


def test_transform_node_reproduces_displacement(workdir):
    """The grid transform node maps x to x + u(x) (FromParent), reads back with
    arrayFromGridTransform, and survives Slicer's writer and SimpleITK's reader."""
    grid = Grid((12, 10, 14), oblique_lps_affine((2.0, 1.5, 1.8), (-20.0, 15.0, -8.0)))
    displacement, expected_map = _linear_field(grid)
    fixed, moving = _pair_on(grid)
    jacobian = np.full(grid.shape, 1.25, np.float32)
    warped = np.arange(np.prod(grid.shape), dtype=np.float32).reshape(grid.shape)
    nodes = logic.apply_result(logic.RegistrationRequest(fixed, moving), displacement, grid,
                               jacobian, warped, {"pct_folding": 0.0})

    transform_node = nodes.transformNode
    from_parent = transform_node.GetTransformFromParent()
    assert from_parent.IsA("vtkOrientedGridTransform"), from_parent.GetClassName()
    rng = np.random.default_rng(1)
    inside = grid.voxel_to_ras(rng.uniform(0, np.array(grid.shape) - 1, (200, 3)))
    error = np.abs(transform_points(from_parent, inside) - expected_map(inside)).max()
    assert error < 1e-3, f"FromParent transform is off by {error} mm"

    array = slicer.util.arrayFromGridTransform(transform_node)
    assert array.shape == (14, 10, 12, 3)
    assert np.allclose(array, displacement.transpose(2, 1, 0, 3), atol=1e-6)

    fixed_role = transform_node.GetFixedNodeReferenceRole()
    moving_role = transform_node.GetMovingNodeReferenceRole()
    assert transform_node.GetNodeReference(fixed_role).GetID() == fixed.GetID()
    assert transform_node.GetNodeReference(moving_role).GetID() == moving.GetID()

    for node, values in ((nodes.jacobianVolumeNode, jacobian), (nodes.warpedVolumeNode, warped)):
        assert np.allclose(ijk_to_ras(node), grid.affine, atol=1e-9)
        assert np.array_equal(slicer.util.arrayFromVolume(node), values.transpose(2, 1, 0))
    display = nodes.jacobianVolumeNode.GetDisplayNode()
    assert display.GetColorNode().GetName() == logic.JACOBIAN_COLOR_NODE_NAME
    assert display.GetLevel() == 1.0 and not display.GetAutoWindowLevel()

    path = logic.write_node(transform_node, workdir / "transform.h5")
    error = np.abs(itk_transform_points(path, inside) - expected_map(inside)).max()
    assert error < 1e-3, f"the transform written by Slicer reads back {error} mm off in SimpleITK"

    view = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
    logic.show_result(fixed, nodes)
    assert view.GetBackgroundVolumeID() == fixed.GetID()
    assert view.GetForegroundVolumeID() == nodes.jacobianVolumeNode.GetID()
    assert 0 < view.GetForegroundOpacity() < 1


def test_outputs_updated_in_place(workdir):
    """Selected output nodes keep their identity, run after run; the user's nodes all stay."""
    grid = Grid((8, 9, 10), oblique_lps_affine((2.0, 2.0, 2.0), (0.0, 0.0, 0.0), degrees=5.0))
    fixed, moving = _pair_on(grid)
    scene = slicer.mrmlScene
    manual = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "manual alignment")
    moving.SetAndObserveTransformNodeID(manual.GetID())
    mine = {"transformNode": scene.AddNewNodeByClass("vtkMRMLTransformNode", "my transform"),
            "jacobianVolumeNode": scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "my jac"),
            "warpedVolumeNode": scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "my warped")}
    request = logic.RegistrationRequest(fixed, moving, applyToMoving=True, **mine)
    runs = []
    for seed in (0, 1):
        displacement, _ = _linear_field(grid, seed)
        warped = np.full(grid.shape, seed + 7.0, np.float32)
        nodes = logic.apply_result(request, displacement, grid, np.ones(grid.shape, np.float32),
                                   warped, {"run": seed})
        runs.append((scene.GetNumberOfNodes(), displacement))
        for key, node in mine.items():
            assert getattr(nodes, key) is node, f"{key} was replaced"
        transform_node = mine["transformNode"]
        assert np.allclose(slicer.util.arrayFromGridTransform(transform_node),
                           displacement.transpose(2, 1, 0, 3))
        assert np.all(slicer.util.arrayFromVolume(mine["warpedVolumeNode"]) == seed + 7.0)
        assert moving.GetParentTransformNode() is transform_node
    assert runs[0][0] == runs[1][0], "the second run added nodes instead of updating"
    assert scene.GetNodeByID(manual.GetID()) is manual, "the user's transform was removed"


def test_parent_transforms_define_frames(workdir):
    """Fixed parents fold into the fixed grid; a moving parent becomes the initial affine; a
    moving volume under the transform being recomputed starts from scratch."""
    scene = slicer.mrmlScene
    grid = Grid((8, 8, 8), oblique_lps_affine((2.0, 2.0, 2.0), (1.0, 2.0, 3.0)))
    fixed, moving = _pair_on(grid)
    fixed_parent = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    moving_parent = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    pf, pm = np.eye(4), np.eye(4)
    pf[:3, 3] = (5.0, 0.0, -2.0)
    pm[:3, :3] = rotation((1.0, 0.0, 0.0), 12.0)
    pm[:3, 3] = (0.0, 3.0, 1.0)
    fixed_parent.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(pf))
    moving_parent.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(pm))
    fixed.SetAndObserveTransformNodeID(fixed_parent.GetID())
    moving.SetAndObserveTransformNodeID(moving_parent.GetID())

    inputs = logic.read_request(logic.RegistrationRequest(fixed, moving))
    assert np.allclose(inputs.fixed.grid.affine, pf @ ijk_to_ras(fixed), atol=1e-9)
    assert np.allclose(inputs.moving.grid.affine, ijk_to_ras(moving), atol=1e-9)
    assert np.allclose(inputs.initialAffine, np.linalg.inv(pm), atol=1e-9)

    own = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "the user's own warp")
    displacement, _ = _linear_field(grid)
    own.SetAndObserveTransformFromParent(logic.grid_transform_from_displacement(displacement, grid))
    moving.SetAndObserveTransformNodeID(own.GetID())
    refusal(lambda: logic.read_request(logic.RegistrationRequest(fixed, moving)), "harden")


def test_register_again_starts_from_the_pre_alignment(workdir):
    """After a result is shown on the moving volume, registering again (from a script, or from
    the panel into the same outputs) reads the moving volume's own voxels in the frame of the
    user's linear pre-alignment, not through the previous warp; nothing of the user's is lost."""
    scene = slicer.mrmlScene
    grid = Grid((8, 9, 10), oblique_lps_affine((2.0, 2.0, 2.0), (1.0, 2.0, 3.0)))
    fixed, moving = _pair_on(grid)
    voxels = slicer.util.arrayFromVolume(moving).copy()
    mask = add_volume(np.ones(grid.shape, np.uint8), ijk_to_ras(moving), "moving mask",
                      labels=True)
    prealign = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "pre-alignment")
    p = np.eye(4)
    p[:3, :3] = rotation((1.0, 2.0, 0.5), 10.0)
    p[:3, 3] = (3.0, -2.0, 1.0)
    prealign.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(p))
    for node in (moving, mask):
        node.SetAndObserveTransformNodeID(prealign.GetID())

    first = logic.RegistrationRequest(fixed, moving, movingMaskNode=mask, applyToMoving=True)
    inputs = logic.read_request(first)
    assert inputs.preAlignmentNode is prealign
    assert np.allclose(inputs.initialAffine, np.linalg.inv(p), atol=1e-9)
    displacement, _ = _linear_field(grid)
    result = logic.apply_result(first, displacement, grid, np.ones(grid.shape, np.float32),
                                np.zeros(grid.shape, np.float32), {"run": 1},
                                inputs.preAlignmentNode)
    transform = result.transformNode
    assert moving.GetParentTransformNode() is transform
    assert transform.GetNodeReference(logic.PRE_ALIGNMENT_ROLE) is prealign
    mask.SetAndObserveTransformNodeID(transform.GetID())  # the mask may follow the volume

    # Fast, then Accurate: from a script (new outputs) or the panel (the same outputs).
    again = {"script": logic.RegistrationRequest(fixed, moving, movingMaskNode=mask),
             "panel": logic.RegistrationRequest(fixed, moving, movingMaskNode=mask,
                                                transformNode=transform,
                                                jacobianVolumeNode=result.jacobianVolumeNode,
                                                warpedVolumeNode=result.warpedVolumeNode,
                                                applyToMoving=True)}
    for name, request in again.items():
        inputs = logic.read_request(request)
        assert inputs.preAlignmentNode is prealign, name
        assert np.allclose(inputs.initialAffine, np.linalg.inv(p), atol=1e-9), name
        assert np.array_equal(inputs.moving.array, voxels.transpose(2, 1, 0)), name
        assert np.allclose(inputs.moving.grid.affine, ijk_to_ras(moving), atol=1e-9), name
        assert np.allclose(inputs.movingMask.grid.affine, ijk_to_ras(mask), atol=1e-9), name
    count = scene.GetNumberOfNodes()
    second = logic.apply_result(again["panel"], 2 * displacement, grid,
                                np.ones(grid.shape, np.float32), np.ones(grid.shape, np.float32),
                                {"run": 2}, inputs.preAlignmentNode)
    assert scene.GetNumberOfNodes() == count, "the second run added nodes"
    assert second.transformNode is transform and moving.GetParentTransformNode() is transform
    assert np.allclose(slicer.util.arrayFromGridTransform(transform),
                       2 * displacement.transpose(2, 1, 0, 3))
    assert transform.GetNodeReference(logic.PRE_ALIGNMENT_ROLE) is prealign
    assert scene.GetNodeByID(prealign.GetID()) is prealign

    # The pre-alignment is the user's node, remembered even while it is the identity, and an
    # edit of it is what the next run starts from.
    identity = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "not moved yet")
    third = add_volume(voxels.transpose(2, 1, 0), ijk_to_ras(moving), "a third moving")
    third.SetAndObserveTransformNodeID(identity.GetID())
    inputs = logic.read_request(logic.RegistrationRequest(fixed, third))
    assert inputs.initialAffine is None and inputs.preAlignmentNode is identity
    p[:3, 3] = (0.0, 5.0, 0.0)
    prealign.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(p))
    assert np.allclose(logic.read_request(again["script"]).initialAffine, np.linalg.inv(p))

    # A result made for another volume is nobody's pre-alignment, and the user's own linear
    # transform is never chosen as an output to overwrite.
    other = add_volume(voxels.transpose(2, 1, 0), ijk_to_ras(moving), "another moving")
    other.SetAndObserveTransformNodeID(transform.GetID())
    third.SetAndObserveTransformNodeID(prealign.GetID())
    for request, expected in ((logic.RegistrationRequest(fixed, other), "harden"),
                              (logic.RegistrationRequest(fixed, third, transformNode=prealign),
                               "starting alignment")):
        refusal(lambda: logic.read_request(request), expected)

    # The panel keeps one pair's outputs away from another pair's registration.
    for node in (transform, result.jacobianVolumeNode, result.warpedVolumeNode):
        assert not logic.made_for_another_pair(node, fixed, moving)
        assert logic.made_for_another_pair(node, fixed, other)
    assert not logic.made_for_another_pair(
        scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "the user's own output"), fixed, other)


def test_volume_choices_and_jacobian_colours(workdir):
    """Only plain scalar volumes are offered for registration; the Jacobian map uses Slicer's
    DivergingBlueRed table where the application loaded it, else a table made here (white at
    J = 1, blue below, red above)."""
    scene = slicer.mrmlScene
    grid = Grid((8, 8, 8), np.eye(4))
    plain = [add_volume(np.ones(grid.shape, np.float32), grid.affine, f"scalar {i}")
             for i in range(2)]
    add_volume(np.ones(grid.shape, np.int16), grid.affine, "labels", labels=True)
    for cls in ("vtkMRMLVectorVolumeNode", "vtkMRMLDiffusionWeightedVolumeNode",
                "vtkMRMLDiffusionTensorVolumeNode"):
        scene.AddNewNodeByClass(cls, cls)
    assert [n for n in logic.plain_scalar_volumes(scene) if n.GetName().startswith("scalar")] \
        == plain
    assert all(n.GetClassName() == "vtkMRMLScalarVolumeNode"
               for n in logic.plain_scalar_volumes(scene))

    slicer_id = slicer.vtkMRMLColorLogic.GetFileColorNodeID(logic.SLICER_DIVERGING_COLORS)
    jacobian = add_volume(np.linspace(0, 2, 512, dtype=np.float32).reshape(grid.shape),
                          grid.affine, "jacobian")
    if scene.GetNodeByID(slicer_id) is None:  # slicer-core: no application colour logic
        logic.show_jacobian_colors(jacobian)
        own = jacobian.GetDisplayNode().GetColorNode()
        assert own.GetName() == logic.JACOBIAN_COLOR_NODE_NAME
        table = own.GetLookupTable()
        blue, white, red = (np.array(table.GetTableValue(i)[:3]) for i in (0, 128, 255))
        assert white.min() > 0.95 and blue[2] > blue[0] + 0.4 and red[0] > red[2] + 0.4
        # What the application's colour logic adds (vtkMRMLColorLogic names file tables so).
        table_node = slicer.vtkMRMLColorTableNode()
        table_node.SetSingletonTag(
            slicer.vtkMRMLColorLogic.GetFileColorNodeSingletonTag(logic.SLICER_DIVERGING_COLORS))
        table_node.SetTypeToCool1()
        scene.AddNode(table_node)
        assert scene.GetNodeByID(slicer_id) is table_node
    logic.show_jacobian_colors(jacobian)
    display = jacobian.GetDisplayNode()
    assert display.GetColorNodeID() == slicer_id
    assert display.GetWindow() == 2.0 and display.GetLevel() == 1.0


def test_bad_selections_change_nothing(workdir):
    """Each bad selection gets a one-line message naming the problem and the fix; the scene is
    untouched."""
    grid = Grid((16, 16, 16), np.diag([2.0, 2.0, 2.0, 1.0]))
    fixed, moving = _pair_on(grid)
    flat = add_volume(np.random.default_rng(3).random((20, 24, 1)).astype(np.float32),
                      np.diag([1.0, 1.0, 1.0, 1.0]), "single slice")
    segmentation = np.zeros(grid.shape, np.int16)  # a label map loaded as a plain volume
    segmentation[2:9, 3:12, 4:14], segmentation[9:14, 3:12, 4:14] = 17, 53
    labels = add_volume(segmentation, grid.affine, "segmentation")
    cases = [
        ((fixed, fixed), {}, "same"),
        ((None, moving), {}, "no fixed volume"),
        ((fixed, None), {}, "no moving volume"),
        ((fixed, flat), {}, "2-D"),
        ((fixed, labels), {}, "looks like a label map"),
        ((labels, moving), {}, "looks like a label map"),
        ((fixed, moving), {"warpedVolumeNode": moving}, "moving volume"),
        ((fixed, moving), {"jacobianVolumeNode": fixed}, "fixed volume"),
    ]
    for (fixed_node, moving_node), options, expected in cases:
        before = scene_state()
        refusal(lambda: logic.register_nodes(fixed_node, moving_node, device="cpu", **options),
                expected)
        assert scene_state() == before, f"the scene changed after refusing '{expected}'"


def test_finetune_inputs(workdir):
    """Fine-tuning data reaches the command in its own formats, and new weights never replace
    existing or shipped ones."""
    from LiquidRegLib.cli import pairs_from_csv
    from LiquidRegLib.resources import default_weights

    grid = Grid((10, 10, 10), oblique_lps_affine((2.0, 2.0, 2.0), (0.0, 5.0, 0.0)))
    fixed, moving = _pair_on(grid)
    arguments = logic.finetune_source_arguments("pair", workdir / "pair", fixedNode=fixed,
                                                movingNode=moving)
    assert arguments[0] == "--pairs"
    (pair,) = pairs_from_csv(arguments[1])
    assert read_volume(pair[0]).grid == grid and pair[2:] == (None, None)

    files = [logic.write_node(node, workdir / f"{node.GetName()}.nrrd")
             for node in (fixed, moving)]
    files.append(logic.write_node(fixed, workdir / "third.nrrd"))
    arguments = logic.finetune_source_arguments("list", workdir / "list", files=files)
    assert len(pairs_from_csv(arguments[1])) == 6

    existing = workdir / "existing.pt"
    existing.write_bytes(b"")
    refused = {"": "no file", str(workdir / "w.pth"): ".pt", str(existing): "already exists",
               str(default_weights().parent / "mine.pt"): "shipped"}
    for path, expected in refused.items():
        refusal(lambda: logic.check_new_weights_path(path), expected)
    new = logic.default_weights_path(workdir)
    assert logic.check_new_weights_path(new) == new
    command = logic.finetune_arguments(["--images", str(workdir)], new, steps=7, device="cpu")
    assert command[:3] == ["finetune", "--images", str(workdir)] and "--steps" in command


# ---- end to end, on the bundled sample pair ---------------------------------------------------
def _reoriented_copy(node, name, world, *, step=2, swap_ik=False):
    """Every ``step``-th voxel of ``node`` stored LPS-first (and with i/k swapped if asked), the
    whole volume then moved by the rigid ``world`` matrix: same anatomy, new geometry."""
    kji = slicer.util.arrayFromVolume(node)[::step, ::step, ::step][:, ::-1, ::-1]
    nk, nj, ni = kji.shape
    affine = ijk_to_ras(node) @ np.diag([step, step, step, 1.0])
    flip_ij = np.array([[-1, 0, 0, ni - 1], [0, -1, 0, nj - 1], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    affine = affine @ flip_ij
    if swap_ik:
        kji = kji.transpose(2, 1, 0)
        affine = affine @ np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1.0]])
    labels = node.IsA("vtkMRMLLabelMapVolumeNode")
    return slicer.util.addVolumeFromArray(np.ascontiguousarray(kji), world @ affine, name,
                                          "vtkMRMLLabelMapVolumeNode" if labels else None)


def _sample_pair(workdir):
    """The bundled pair, halved in resolution, stored LPS and obliquely tilted, saved by MRML."""
    raw = {name: logic.read_volume_node(SAMPLE_DIR / f"{name}.nii.gz", f"raw {name}",
                                        labels="labels" in name)
           for name in ("fixed_t1", "moving_t1", "moving_labels")}
    world = np.eye(4)
    world[:3, :3] = rotation((1.0, -1.0, 2.0), 11.0)
    world[:3, 3] = (3.0, -4.0, 6.0)
    nodes = {"fixed": _reoriented_copy(raw["fixed_t1"], "fixed", world),
             "moving": _reoriented_copy(raw["moving_t1"], "moving", world, swap_ik=True),
             "labels": _reoriented_copy(raw["moving_labels"], "moving labels", world,
                                        swap_ik=True)}
    for node in raw.values():
        slicer.mrmlScene.RemoveNode(node)
    files = {key: logic.write_node(node, workdir / f"{key}.nrrd") for key, node in nodes.items()}
    return nodes, files


def _run_cli(workdir, arguments):
    job = jobs.Job(jobs.liquidreg_command(arguments, workdir / "never-cancelled"))
    job.wait(timeout=600)
    status, detail = job.outcome()
    assert status == "done", f"liquidreg {arguments[0]} failed: {detail}"
    return job


def _itk_displacement_kji(path) -> np.ndarray:
    """A displacement file as SimpleITK reads it, in RAS, indexed [k, j, i, c]."""
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path))) * LPS_FLIP[:3, :3].diagonal()


def test_slicer_paths_match_command_line(workdir, weights=None):
    """Registering MRML nodes from a script, and through the panel's background process, gives
    the command line's result on the same files; the moving labels resampled through the node's
    own FromParent transform by VTK match the CLI's.

    The moving volume sits under a linear "manual pre-alignment" transform, which the module
    uses as the initial affine; the CLI gets the same matrix with --initial-affine.  (The affine
    search is skipped on all sides to keep the test fast; it is the engine's to test.)
    """
    nodes, files = _sample_pair(workdir)
    prealign = np.eye(4)
    prealign[:3, :3] = rotation((0.0, 1.0, 0.2), 6.0)
    prealign[:3, 3] = (2.0, -3.0, 4.0)
    manual = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "pre-alignment")
    manual.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(prealign))
    nodes["moving"].SetAndObserveTransformNodeID(manual.GetID())
    # The moving volume's local point for world point x is prealign^-1 x.
    np.savetxt(workdir / "initial.txt", np.linalg.inv(prealign))

    common = ["--device", "cpu", "--iterations", "0", "--no-affine",
              "--initial-affine", workdir / "initial.txt"]
    out = workdir / "cli"
    job = _run_cli(workdir, ["register", files["fixed"], files["moving"], "-o", out, "--no-png",
                             *common] + (["--weights", weights] if weights else []))
    stages = {event.get("stage") for event in job.events}
    assert "network" in stages and job.events[-1].get("event") == "done", job.events[-3:]
    warped_labels_path = workdir / "cli_labels.nrrd"
    _run_cli(workdir, ["apply", "--reference", files["fixed"], "--transform", out / RESULT_FILES["warp"],
              files["labels"], "-o", warped_labels_path, "--interpolation", "nearest"])

    result = logic.register_nodes(nodes["fixed"], nodes["moving"], iterations=0,
                                  device="cpu", affine=False, weights=weights,
                                             applyToMoving=True)
    transform_node = result.transformNode
    assert nodes["moving"].GetParentTransformNode() is transform_node
    assert slicer.mrmlScene.GetNodeByID(manual.GetID()) is manual

    # Same mapping as the command line's warp file, voxel for voxel.
    array = slicer.util.arrayFromGridTransform(transform_node)
    cli_field = _itk_displacement_kji(out / RESULT_FILES["warp"])
    assert array.shape == cli_field.shape
    difference = np.abs(array - cli_field).max()
    assert difference < 0.05, f"node and CLI displacements differ by {difference} mm"
    assert np.abs(cli_field).max() > 2.0, "the registration did not move anything"

    # VTK resampling through the node's FromParent transform reproduces the CLI's labels.
    cli_labels = slicer.util.arrayFromVolume(
        logic.read_volume_node(warped_labels_path, "cli labels", labels=True))
    ours = resample_labels_through(transform_node.GetTransformFromParent(), nodes["labels"],
                                   nodes["fixed"])
    agreement = float(np.mean(ours == cli_labels))
    assert agreement > 0.995, f"only {agreement:.4f} of voxels agree with the CLI's labels"
    wrong_way = resample_labels_through(transform_node.GetTransformToParent(), nodes["labels"],
                                        nodes["fixed"], stride=3)
    wrong_agreement = float(np.mean(wrong_way == cli_labels[::3, ::3, ::3]))
    assert wrong_agreement < agreement - 0.02, "the check cannot tell the transform's direction"

    # Outputs live on the fixed grid.
    fixed_matrix = ijk_to_ras(nodes["fixed"])
    for node in (result.jacobianVolumeNode, result.warpedVolumeNode):
        assert np.allclose(ijk_to_ras(node), fixed_matrix, atol=1e-4)
    cli_warped = read_volume(out / RESULT_FILES["warped"]).array.transpose(2, 1, 0)
    warped = slicer.util.arrayFromVolume(result.warpedVolumeNode)
    assert np.abs(warped - cli_warped).max() < 0.01 * np.ptp(cli_warped)

    # Slicer's transform writer, SimpleITK's reader: the same mapping.
    rng = np.random.default_rng(0)
    centres = voxel_centres_ras(nodes["fixed"])
    points = centres[rng.choice(len(centres), 300, replace=False)]
    path = logic.write_node(transform_node, workdir / "result.h5")
    ours = transform_points(transform_node.GetTransformFromParent(), points)
    error = np.abs(itk_transform_points(path, points) - ours).max()
    assert error < 1e-3, f"SimpleITK reads the saved transform {error} mm away"

    # The panel's path: nodes -> files -> the warm worker (background `liquidreg register`)
    # -> nodes, into the user's own output nodes, which are updated in place.
    scene = slicer.mrmlScene
    mine = logic.RegistrationRequest(
        nodes["fixed"], nodes["moving"],
        transformNode=scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "my transform"),
        warpedVolumeNode=scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "my warped"))
    nodes["moving"].SetAndObserveTransformNodeID(manual.GetID())
    inputs = logic.read_request(mine, vtk_order=True)
    arguments = logic.register_arguments(
        logic.write_cli_inputs(inputs, workdir / "panel"), workdir / "panel" / "result",
        RegistrationOptions(device="cpu", affine=False, weights=weights), panel=True)
    worker = jobs.Worker(jobs.worker_command())
    try:
        request = worker.submit(arguments)
        request.wait(timeout=600)
        assert request.outcome()[0] == "done", request.outcome()
    finally:
        worker.stop()
    panel = logic.load_cli_result(mine, workdir / "panel" / "result")
    assert panel.transformNode is mine.transformNode
    assert panel.warpedVolumeNode is mine.warpedVolumeNode
    difference = np.abs(slicer.util.arrayFromGridTransform(panel.transformNode) - array).max()
    assert difference < 0.05, f"the panel's result differs from the script's by {difference} mm"
    assert np.allclose(ijk_to_ras(panel.jacobianVolumeNode), fixed_matrix, atol=1e-4)


def test_cancel_stops_the_command(workdir, weights=None, python=None):
    """Cancel stops the real worker itself, promptly, even through a launcher that forwards no
    signals (``python``: the interpreter command, PythonSlicer inside Slicer): exit code 130, no
    kill needed, no result left behind."""
    out, cancel_file = workdir / "cancelled", workdir / "job.cancel"
    arguments = ["register", SAMPLE_DIR / "fixed_t1.nii.gz", SAMPLE_DIR / "moving_t1.nii.gz",
                 "-o", out, "--device", "cpu", "--iterations", "500"]
    arguments += ["--weights", weights] if weights else []
    job = jobs.Job(jobs.liquidreg_command(arguments, cancel_file, python=python),
                   cancel_file=cancel_file, kill_after_s=120)
    job.wait(timeout=600, on_event=lambda event: job.cancel())
    status, detail = job.outcome()
    assert status == "cancelled", (status, detail)
    assert job.events, "no progress event arrived before cancelling"
    assert not job.killed and job.process.returncode == 130, job.process.returncode
    assert not (out / RESULT_FILES["summary"]).exists()


ALL_TESTS = [test_volume_from_node_oblique_lps, test_transform_node_reproduces_displacement,
             test_outputs_updated_in_place, test_parent_transforms_define_frames,
             test_register_again_starts_from_the_pre_alignment,
             test_volume_choices_and_jacobian_colours,
             test_bad_selections_change_nothing, test_finetune_inputs,
             test_slicer_paths_match_command_line, test_cancel_stops_the_command]
