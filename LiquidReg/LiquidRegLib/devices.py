"""Which torch device to run on ("auto" takes CUDA when PyTorch sees a GPU), and how a LiquidReg
process uses the CPU's memory."""
from __future__ import annotations

import sys
from contextlib import contextmanager

from .errors import InputError


def resolve_device(device="auto"):
    """"auto" picks CUDA when available; asking for CUDA without one is a clear error.  Returns a
    ``torch.device`` (torch is imported here, so ``liquidreg --help`` never loads it)."""
    import torch

    name = str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("device 'cuda' was requested but PyTorch sees no CUDA GPU; use device "
                         "'cpu' or 'auto', or install a CUDA build of PyTorch")
    if name != "cpu" and not name.startswith("cuda"):
        raise InputError(f"unknown device {name!r}; use auto, cpu or cuda")
    return torch.device(name)


def reuse_freed_memory() -> None:
    """Have glibc keep freed memory for reuse instead of returning it to the system.

    Registration and training allocate and free many large arrays (100 MB each for a 1 mm
    field); by default glibc maps each one afresh, and faulting in those pages costs ~5x the
    arithmetic of an element-wise pass.  Measured: ~1 s less per 1 mm registration, 8 % less per
    training step.  For short-lived processes only (``liquidreg``, the training script), never
    inside Slicer: peak memory grows a little (1.8 -> 2.2 GB on a 1 mm brain).
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4
        libc.mallopt(m_mmap_max, 0)
        libc.mallopt(m_trim_threshold, 2 ** 31 - 1)
    except (OSError, AttributeError):  # not glibc: keep the defaults
        pass


def release_freed_memory() -> None:
    """Give the memory freed so far back to the system (glibc's ``malloc_trim``).

    For a long-lived process that uses :func:`reuse_freed_memory`: the warm worker calls it
    between registrations, so it keeps the speed of reusing memory inside a registration without
    holding a registration's peak while it waits for the next one.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


@contextmanager
def ieee_float32():
    """Float32 convolutions and matrix products computed as float32 on GPUs too (no TF32).

    PyTorch runs cuDNN convolutions in TF32 by default (10-bit mantissa).  The network refines
    its estimate step by step, so those errors grow into visible differences between a GPU and
    the CPU; in full float32 a registration's network costs well under 1 % of the engine's time
    on a GPU.  Restores the caller's settings afterwards (Slicer's process may rely on them)."""
    import torch

    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = cudnn.allow_tf32, matmul.allow_tf32
    # the flags every torch version reads (torch 2.9's fp32_precision API, once set, makes the
    # old ones unreadable for code that still uses them)
    cudnn.allow_tf32 = matmul.allow_tf32 = False
    try:
        yield
    finally:
        cudnn.allow_tf32, matmul.allow_tf32 = saved
