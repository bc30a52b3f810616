"""What ``LiquidReg.py`` needs from the Slicer application beyond the slicer-core wheel, as small
as possible, so the module's own logic runs in tests on real MRML.

Stand-ins: the ``qt`` module (never touched by the logic), the scripted-module base classes, the
parameter node wrapper (pure Python in Slicer, but absent from slicer-core: the parameter class
stays a plain class and tests use :func:`parameters`), translations, and ``slicer.app`` (only its
``connect``, recorded).  ``ScriptedLoadableModuleTest`` is ``unittest.TestCase``, as in Slicer.
MRML, ``slicer.util`` and the engine are real.
"""
from __future__ import annotations

import pathlib
import sys
import types
import typing
import unittest

MODULE_DIR = pathlib.Path(__file__).resolve().parents[2] / "LiquidReg"


class App:
    """``slicer.app``: records signal connections."""

    def __init__(self):
        self.connections = []

    def connect(self, signal, slot):
        self.connections.append((signal, slot))


def stand_ins() -> dict:
    """Module name -> stand-in module."""
    class Base:
        def __init__(self, parent=None):
            self.parent = parent

    scripted = types.ModuleType("slicer.ScriptedLoadableModule")
    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleWidget",
                 "ScriptedLoadableModuleLogic"):
        setattr(scripted, name, type(name, (Base,), {}))
    scripted.ScriptedLoadableModuleTest = unittest.TestCase
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper = lambda cls: cls
    wrapper.Choice = wrapper.WithinRange = lambda *args: args
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text
    return {"qt": types.ModuleType("qt"), "slicer.ScriptedLoadableModule": scripted,
            "slicer.parameterNodeWrapper": wrapper, "slicer.i18n": i18n}


def install() -> App:
    """Install the stand-ins for good (a subprocess of its own); returns ``slicer.app``."""
    import slicer

    sys.modules.update(stand_ins())
    slicer.app = App()
    sys.path.insert(0, str(MODULE_DIR))
    return slicer.app


def parameters(module, **values):
    """A parameter node as the panel's logic sees it: every field of
    ``LiquidRegParameterNode`` with its default (as the wrapper gives it), then ``values``."""
    node = types.SimpleNamespace()
    cls = module.LiquidRegParameterNode
    for name, annotation in cls.__annotations__.items():
        default = getattr(cls, name, None)
        if default is None and typing.get_origin(annotation) is list:
            default = []
        elif default is None and annotation is pathlib.Path:
            default = pathlib.Path()
        setattr(node, name, default)
    for name, value in values.items():
        assert hasattr(node, name), f"LiquidRegParameterNode has no field {name}"
        setattr(node, name, value)
    return node
