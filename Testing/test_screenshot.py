"""The Extension Index screenshot is rendered by MRML's own slice pipeline (scripts/screenshot.py):
checked here on a small synthetic scene, orientation and layer blending included."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")  # the slicer-core wheel
pytest.importorskip("PIL")

from LiquidRegLib import logic  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def screenshot():
    spec = importlib.util.spec_from_file_location("screenshot", ROOT / "scripts" / "screenshot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def scene():
    slicer.mrmlScene = slicer.vtkMRMLScene()
    colours = slicer.vtkMRMLColorLogic()
    colours.SetMRMLScene(slicer.mrmlScene)
    colours.AddDefaultColorNodes()
    yield slicer.mrmlScene
    slicer.mrmlScene.Clear(1)


def test_slice_view_is_what_a_slicer_axial_view_shows(screenshot, scene):
    """Radiological axial view: the patient's right on the screen's left, anterior at the top; the
    Jacobian layer is blended over the background at the panel's opacity with its colour table."""
    shape = (40, 40, 10)  # i, j, k along R, A, S (1 mm)
    image = np.zeros(shape, np.float32)
    image[30:38, 30:38, :] = 100.0  # right (+R) and anterior (+A)
    volume = slicer.util.addVolumeFromArray(np.ascontiguousarray(image.transpose(2, 1, 0)),
                                            np.eye(4), "marker")
    volume.CreateDefaultDisplayNodes()
    volume.GetDisplayNode().AutoWindowLevelOff()
    volume.GetDisplayNode().SetWindowLevel(100.0, 50.0)
    pixels = screenshot.slice_view(scene, volume, size=100)
    bright = np.argwhere(pixels[..., 0] > 128)
    assert bright.size, "the marker is not in the view"
    rows, columns = bright.mean(axis=0)
    assert rows < 50 and columns < 50, (rows, columns)  # top left: anterior, patient's right

    background = slicer.util.addVolumeFromArray(np.zeros(shape[::-1], np.float32), np.eye(4),
                                                "black")
    background.CreateDefaultDisplayNodes()
    jacobian = slicer.util.addVolumeFromArray(np.full(shape[::-1], 2.0, np.float32), np.eye(4),
                                              "jacobian")
    logic.show_jacobian_colors(jacobian)
    pixels = screenshot.slice_view(scene, background, jacobian, 0.4, size=60)
    table = jacobian.GetDisplayNode().GetColorNode().GetLookupTable()
    expected = 0.4 * 255 * np.array(table.GetTableValue(table.GetNumberOfTableValues() - 1)[:3])
    assert np.abs(pixels[30, 30].astype(float) - expected).max() <= 3, (pixels[30, 30], expected)
