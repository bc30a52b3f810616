"""Which torch device to run on: "auto" takes CUDA when PyTorch sees a GPU."""
from __future__ import annotations

import torch

from .errors import InputError


def resolve_device(device="auto") -> torch.device:
    """"auto" picks CUDA when available; asking for CUDA without one is a clear error."""
    name = str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda was requested but no CUDA GPU is available to PyTorch; "
                         "use --device cpu (or auto), or install a CUDA build of PyTorch")
    if name != "cpu" and not name.startswith("cuda"):
        raise InputError(f"unknown device {name!r}; use auto, cpu or cuda")
    return torch.device(name)


def describe(device: torch.device) -> str:
    """Human name of a device, e.g. for the Slicer device choice and summary.json."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return "cpu"
