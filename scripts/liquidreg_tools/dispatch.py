"""What torch dispatches while some work runs: aten operators, CUDA kernels, copies and the host's
waits for the GPU, counted by stage.

A stage is a ``torch.profiler.record_function`` range whose name starts with a prefix
(``register`` marks ``liquidreg.affine``, ``liquidreg.network``, ``liquidreg.outputs`` and
``liquidreg.reports``); an event belongs to the innermost such range around it, or to "other".

* ``aten_ops``: every ``aten::`` operator, nested ones included (an operator that calls others
  counts each of them: what the dispatcher handles).
* ``aten_calls``: only the outermost ``aten::`` operators (what Python code called).
* On CUDA: ``kernel_launches`` (CUDA runtime launches), ``copies`` (memcpy calls), ``host_waits``
  (stream, event and device synchronisations: the host idles until the GPU catches up), and over
  the whole run ``kernels`` and ``gpu_busy_s`` (the kernels' summed device time).
"""
from __future__ import annotations

from collections import Counter, defaultdict
from contextlib import contextmanager

_LAUNCH = ("LaunchKernel", "LaunchCooperativeKernel", "cuLaunch")
_COPY = ("Memcpy",)
_WAIT = ("StreamSynchronize", "DeviceSynchronize", "EventSynchronize", "StreamWaitEvent")


@contextmanager
def profiled(device):
    """``torch.profiler`` over the CPU, and CUDA when ``device`` is a GPU; yields the profiler."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if torch.device(device).type == "cuda":
        activities.append(ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        yield prof
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()


def _stage(event, prefix: str) -> str:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith(prefix):
            return parent.name[len(prefix):]
        parent = parent.cpu_parent
    return "other"


def _nested_in_aten(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return True
        parent = parent.cpu_parent
    return False


def count(prof, prefix: str = "liquidreg.") -> dict:
    """Counts by stage and in total from a finished profiler: {"stages": {name: {...}},
    "total": {...}, "stage_seconds": {name: wall seconds of its ranges}}."""
    from torch.autograd import DeviceType

    stages = defaultdict(Counter)
    seconds = Counter()
    kernels, busy_us = 0, 0.0
    for event in prof.events():
        name = event.name
        if event.device_type == DeviceType.CUDA:
            if not any(word in name for word in ("Memcpy", "Memset")):
                kernels += 1
                busy_us += event.time_range.elapsed_us()
            continue
        if name.startswith(prefix):
            seconds[name[len(prefix):]] += event.time_range.elapsed_us() / 1e6
            continue
        stage = stages[_stage(event, prefix)]
        if name.startswith("aten::"):
            stage["aten_ops"] += 1
            stage["aten_calls"] += not _nested_in_aten(event)
        elif any(word in name for word in _LAUNCH):
            stage["kernel_launches"] += 1
        elif any(word in name for word in _COPY):
            stage["copies"] += 1
        elif any(word in name for word in _WAIT):
            stage["host_waits"] += 1
    total = Counter()
    for counts in stages.values():
        total.update(counts)
    result = {"stages": {name: dict(counts) for name, counts in sorted(stages.items())},
              "total": dict(total), "stage_seconds": {k: round(v, 3) for k, v in seconds.items()}}
    if kernels:
        result["total"].update(kernels=kernels, gpu_busy_s=round(busy_us / 1e6, 4))
    return result
