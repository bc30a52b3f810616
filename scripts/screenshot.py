"""Render the Extension Index screenshot from a real MRML scene.

The bundled sample pair is registered by the Slicer module's own logic
(``logic.register_nodes``: Accurate mode, the shipped weights, CPU) on the MRML of the slicer-core
wheel, and shown with the panel's own display settings (``logic.show_result``: the Jacobian map
over the fixed volume at 40 % opacity).  Each axial slice is then computed offscreen by MRML's
slice pipeline (``vtkMRMLSliceLogic``: reslicing, window/level, colour table and layer blending in
VTK, what a Slicer slice view displays, without OpenGL).  Titles and the colour bar are drawn with
Pillow.  It is not a capture of the Slicer application window, and its caption says so.

    python scripts/screenshot.py [-o Screenshots/LiquidReg_sample.png]

(About 1.5 minutes on 2 CPU cores; needs the [test] extra: slicer-core and Pillow.)
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "Screenshots" / "LiquidReg_sample.png"
PANEL = 360  # pixels per slice view


def slice_view(scene, background, foreground=None, opacity=0.0, fit=None, size=PANEL):
    """The RGB image (rows top to bottom) a Slicer axial slice view shows for these layers,
    computed by vtkMRMLSliceLogic, fitted to ``fit`` (default: ``background``)."""
    import slicer
    from vtk.util import numpy_support

    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)  # Slicer's own presets
    view = scene.CreateNodeByClass("vtkMRMLSliceNode")
    view.UnRegister(None)
    view.SetName("Red")
    view.SetLayoutName("Red")
    view.SetSingletonTag("Red")
    scene.AddNode(view)
    view.SetOrientation("Axial")  # radiological: the patient's right on the screen's left
    view.SetDimensions(size, size, 1)
    slices = slicer.vtkMRMLSliceLogic()
    slices.SetMRMLScene(scene)
    slices.SetSliceNode(view)
    layers = slices.GetSliceCompositeNode()
    layers.SetBackgroundVolumeID(background.GetID())
    layers.SetForegroundVolumeID(foreground.GetID() if foreground is not None else None)
    layers.SetForegroundOpacity(opacity)
    slices.FitSliceToVolume(fit or background, size, size)
    slices.UpdateImageData()
    producer = slices.GetImageDataConnection().GetProducer()
    producer.Update()
    image = producer.GetOutputDataObject(0)
    width, height, _ = image.GetDimensions()
    rgba = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    pixels = rgba.reshape(height, width, -1)[::-1, :, :3].copy()
    for node in (layers, view):
        scene.RemoveNode(node)
    return pixels


def colour_bar(colour_node, window: float, level: float, height: int) -> np.ndarray:
    """The colour node's table as the display maps it, high values at the top (RGB, 18 wide)."""
    import vtk

    table = vtk.vtkLookupTable()
    table.DeepCopy(colour_node.GetLookupTable())
    table.SetRange(level - window / 2, level + window / 2)
    rows = []
    for value in np.linspace(level + window / 2, level - window / 2, height):
        rgb = [0.0, 0.0, 0.0]
        table.GetColor(value, rgb)
        rows.append(rgb)
    return np.repeat(np.round(np.array(rows) * 255).astype(np.uint8)[:, None], 18, axis=1)


def compose(panels, titles, caption, bar, bar_labels):
    """Panels side by side with titles, a colour bar and a caption."""
    from PIL import Image, ImageDraw, ImageFont

    gap, top, bottom, right = 8, 30, 52, 70
    height, width = panels[0].shape[:2]
    canvas = Image.new("RGB", (len(panels) * (width + gap) + gap + right, top + height + bottom))
    draw = ImageDraw.Draw(canvas)
    title_font, small = ImageFont.load_default(14), ImageFont.load_default(11)
    for index, (panel, title) in enumerate(zip(panels, titles)):
        x = gap + index * (width + gap)
        canvas.paste(Image.fromarray(panel), (x, top))
        draw.text((x + width / 2, top - 8), title, fill="white", font=title_font, anchor="md")
    x0, y0 = canvas.width - right + 12, top + 20
    bar_image = Image.fromarray(np.ascontiguousarray(bar)).resize((18, height - 40))
    canvas.paste(bar_image, (x0, y0))
    for fraction, label in bar_labels:
        y = y0 + (1 - fraction) * (bar_image.height - 1)
        draw.line([(x0 + 18, y), (x0 + 22, y)], fill="white")
        draw.text((x0 + 25, y), label, fill="white", font=small, anchor="lm")
    draw.text((x0 + 9, y0 - 6), "Jacobian", fill="white", font=small, anchor="md")
    for line, text in enumerate(caption):
        draw.text((gap, top + height + 10 + 16 * line), text, fill="white", font=small)
    return canvas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--output", type=Path, default=OUTPUT)
    args = parser.parse_args()

    import slicer

    from LiquidRegLib import logic
    from LiquidRegLib.resources import sample_paths

    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    colours = slicer.vtkMRMLColorLogic()  # the default tables (Grey...) the application adds
    colours.SetMRMLScene(scene)
    colours.AddDefaultColorNodes()
    paths = sample_paths()
    fixed = logic.read_volume_node(paths["fixed_t1"], "fixed")
    moving = logic.read_volume_node(paths["moving_t1"], "moving")
    started = time.perf_counter()
    nodes = logic.register_nodes(fixed, moving, mode="accurate", device="cpu")
    seconds = time.perf_counter() - started
    for node in (fixed, moving, nodes.warpedVolumeNode):
        node.CreateDefaultDisplayNodes()
    logic.show_result(fixed, nodes)  # the panel's display: Jacobian over fixed, 40 %
    composite = scene.GetFirstNodeByClass("vtkMRMLSliceCompositeNode")
    opacity = composite.GetForegroundOpacity() if composite else 0.4
    panels = [slice_view(scene, moving, fit=fixed),
              slice_view(scene, nodes.warpedVolumeNode, fit=fixed),
              slice_view(scene, fixed, nodes.jacobianVolumeNode, opacity)]
    display = nodes.jacobianVolumeNode.GetDisplayNode()
    window, level = display.GetWindow(), display.GetLevel()
    bar = colour_bar(display.GetColorNode(), window, level, 256)
    low = level - window / 2
    labels = [((v - low) / window, f"{v:g}") for v in np.linspace(low, low + window, 5)]
    summary = nodes.summary
    steps = summary.get("instance_optimisation", {}).get("steps", "?")
    caption = [
        f"LiquidReg on the bundled sample pair (Accurate mode: network + {steps} "
        f"instance-optimisation steps; folding {summary['pct_folding']:.3f} % of voxels). Axial "
        "slices of the MRML scene's result nodes,",
        "rendered offscreen by MRML's slice pipeline (vtkMRMLSliceLogic) with the panel's "
        "display settings; not a capture of the Slicer window.",
    ]
    figure = compose(panels, ["Moving volume (input)", "Warped moving volume (output)",
                              f"Fixed + Jacobian map ({opacity:.0%})"], caption, bar, labels)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    figure.save(args.output, optimize=True)
    print(f"wrote {args.output} ({args.output.stat().st_size / 1e3:.0f} kB) in {seconds:.0f} s")


if __name__ == "__main__":
    main()
