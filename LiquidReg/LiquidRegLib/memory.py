"""How much memory a registration needs, how much the machine (or container) has, and a clear
refusal before starting when it would not fit, instead of a process killed without a word.

The estimate is a model of ``register`` on the CPU, fitted to measured peaks: a fixed part
(Python, torch, the network), the two images, the four full-resolution outputs, the bounded
slabs of the output stage, and the work on the network's working grid.
"""
from __future__ import annotations

import errno
import re
from pathlib import Path

import numpy as np

from .errors import LiquidRegError

#: A model fitted to the peaks (ru_maxrss) of ``liquidreg register`` on the CPU with 2 threads:
#: 128^3, 160^3, a 193x229x193 brain and 256^3 at 1 mm, 400^3 at 0.5 mm, network only and with
#: instance optimisation (README, "Speed and memory").  Repeated runs of one pair vary by up to
#: ~130 MB (thread scheduling decides how the allocator's arenas fill): the base and the margin
#: cover that; the estimate lies 10-50 % above the measured peaks, the most for small images.
BASE_BYTES = 750 * 2 ** 20          # Python, torch, SimpleITK, the network, reading the files
FIXED_BYTES_PER_VOXEL = 26          # the image (float32) + displacement (3) + warped + Jacobian
MOVING_BYTES_PER_VOXEL = 16         # the image + the inverse displacement (3)
SLAB_BYTES_PER_VOXEL = 40           # the output stage's slabs (register.SLAB_VOXELS) ...
SLAB_BYTES = 250 * 2 ** 20          # ... at most
WORKING_BYTES_PER_VOXEL = 420       # network on the working grid (v2: 2 mm refinement)
INSTANCE_BYTES_PER_VOXEL = 700      # network + instance optimisation
MARGIN = 1.1
#: Address space a run maps beyond its resident memory (thread stacks, allocator reserves,
#: memory mapped and never touched), for an RLIMIT_AS: the virtual size grew 170-240 MB more than
#: the resident size from the check to the peak (the sample pair, a 400^3 pair; 2 and 16
#: threads).  ``scripts/measure_plausibility.py address-space`` measures the whole margin.
ADDRESS_SPACE_EXTRA = 256 * 2 ** 20


class NotEnoughMemory(LiquidRegError):
    """The registration would need more memory than the machine can give it."""


def estimate(fixed_grid, moving_grid, working_grid, steps: int) -> int:
    """Peak bytes of ``register`` for images on these grids (an upper estimate); ``steps``
    instance-optimisation steps."""
    fixed, moving = (int(np.prod(g.shape)) for g in (fixed_grid, moving_grid))
    work = int(np.prod(working_grid.shape)) * (INSTANCE_BYTES_PER_VOXEL if steps else
                                               WORKING_BYTES_PER_VOXEL)
    model = (BASE_BYTES + FIXED_BYTES_PER_VOXEL * fixed + MOVING_BYTES_PER_VOXEL * moving + work
             + min(SLAB_BYTES, SLAB_BYTES_PER_VOXEL * max(fixed, moving)))
    return int(MARGIN * model)


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup_room(root: Path = Path("/")) -> int | None:
    """Bytes the process's cgroup (a container, a systemd or Slurm limit) still lets it use:
    limit minus what is in use, page cache excluded (the kernel reclaims it first); the
    tightest of the cgroup and its ancestors."""
    rooms = []
    try:
        lines = (root / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0":  # cgroup v2
            base = root / "sys/fs/cgroup"
            names = ("memory.max", "memory.current", "memory.stat", "file")
        elif "memory" in controllers.split(","):
            base = root / "sys/fs/cgroup/memory"
            names = ("memory.limit_in_bytes", "memory.usage_in_bytes", "memory.stat",
                     "total_inactive_file")
        else:
            continue
        steps = [p for p in path.split("/") if p]
        for depth in range(len(steps) + 1):  # the cgroup and every ancestor: each limit applies
            folder = base.joinpath(*steps[:depth])
            limit, used = _read_int(folder / names[0]), _read_int(folder / names[1])
            if limit is None or used is None or limit >= 2 ** 60:
                continue
            cache = 0
            try:
                for entry in (folder / names[2]).read_text().splitlines():
                    key, _, value = entry.partition(" ")
                    if key == names[3]:
                        cache = int(value)
            except (OSError, ValueError):
                pass
            rooms.append(limit - max(0, used - cache))
    return min(rooms) if rooms else None


def _proc_bytes(path: str, key: str) -> int | None:
    """A "Key:  N kB" entry of a /proc file, in bytes (None where the system has no /proc)."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def resident() -> int:
    """This process's resident memory now (0 where the system does not say)."""
    return _proc_bytes("/proc/self/status", "VmRSS") or 0


def available() -> int | None:
    """Bytes this process can still allocate: the smaller of the system's available memory and
    the room its cgroup leaves (None where neither is known, e.g. not Linux)."""
    known = [v for v in (_proc_bytes("/proc/meminfo", "MemAvailable"), _cgroup_room())
             if v is not None]
    return min(known) if known else None


def address_space_room() -> int | None:
    """Bytes of address space this process may still map under its RLIMIT_AS (``ulimit -v``,
    ``prlimit --as``, set by many HPC schedulers); None without such a limit.  Every allocation
    counts against it whether or not it is ever touched, so it can stop a run that the free
    memory would allow."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    mapped = _proc_bytes("/proc/self/status", "VmSize")
    if soft == resource.RLIM_INFINITY or mapped is None:
        return None
    return soft - mapped


def check(fixed_grid, moving_grid, working_grid, steps: int) -> None:
    """Refuse a registration that would not fit in memory, with what to do about it.

    Part of the estimate is already resident when this runs (the libraries, the images); in a
    larger process (Slicer) the rest of its memory is not part of it, hence the bound.  An
    address-space limit must also hold what the allocators and threads reserve beyond what is
    resident (:data:`ADDRESS_SPACE_EXTRA`).
    """
    need = estimate(fixed_grid, moving_grid, working_grid, steps)
    loaded = BASE_BYTES + 4 * sum(int(np.prod(g.shape)) for g in (fixed_grid, moving_grid))
    have = min(resident(), loaded)
    gb = 2 ** 30
    room = available()
    if room is not None and need - have > room:
        raise NotEnoughMemory(
            f"registering these images needs about {need / gb:.1f} GB of memory but only "
            f"{(room + have) / gb:.1f} GB is available; {FIXES}")
    mappable = address_space_room()
    if mappable is not None and need - have + ADDRESS_SPACE_EXTRA > mappable:
        raise NotEnoughMemory(
            f"registering these images needs about {(need - have + ADDRESS_SPACE_EXTRA) / gb:.1f}"
            f" GB more address space but this process may map only {max(mappable, 0) / gb:.1f} "
            "GB more (its address-space limit, set by the shell's ulimit or a cluster job); "
            "raise the limit, ask the scheduler for more memory, or resample the images to a "
            "coarser voxel size (e.g. 1 mm)")


#: What to do when memory runs short (the end of every such message).
FIXES = ("close other programs, use a machine with more memory, or resample the images to a "
         "coarser voxel size (e.g. 1 mm)")

#: Words of the errors that report a failed allocation: numpy's MemoryError, torch's CPU and
#: CUDA allocators, ITK, the C++ runtime, the system (ENOMEM), a thread whose stack or a library
#: that cannot be mapped (a module imported late, under an address-space limit).
_ALLOCATION_FAILURES = ("can't allocate memory", "cannot allocate memory", "defaultcpuallocator",
                        "out of memory", "bad_alloc", "failed to allocate", "unable to allocate",
                        "memoryallocationerror", "can't start new thread", "failed to map segment")


def allocation_failure(error: BaseException) -> NotEnoughMemory | None:
    """The one-line error for ``error`` if it is a failed allocation (anywhere: reading,
    registering, writing), else None."""
    text = " ".join(str(error).split())
    if not (isinstance(error, MemoryError) or getattr(error, "errno", None) == errno.ENOMEM
            or (isinstance(error, (RuntimeError, OSError, ImportError))
                and any(words in text.lower() for words in _ALLOCATION_FAILURES))):
        return None
    asked = re.search(r"(?:tried|unable) to allocate ([\d.]+) ?(bytes|[KMGTP]i?B)", text, re.I)
    if asked and asked.group(2) == "bytes":
        size = f"{int(float(asked.group(1))) / 2 ** 30:.2f} GB"
    else:
        size = asked and f"{asked.group(1)} {asked.group(2)}"
    what = f"{size} more could not be allocated" if size else type(error).__name__
    return NotEnoughMemory(f"ran out of memory ({what}); {FIXES}; under a memory limit "
                           "(the shell's ulimit, a container, a cluster job) ask for more")
