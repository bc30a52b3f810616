"""Measuring a run the same way in every benchmark: wall time and peak memory of a child
process, the machine it ran on, and the report files."""
from __future__ import annotations

import os
import platform
import subprocess
import threading
import time
from pathlib import Path

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                    "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")


def memory_mb(key: str = "VmHWM") -> float:
    """This process's peak (VmHWM) or current (VmRSS) resident memory, MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def machine() -> dict:
    """What the numbers were measured on."""
    import torch

    model = next((line.split(":", 1)[1].strip() for line in
                  Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for module, attribute in (("ants", "__version__"), ("numpy", "__version__")):
        try:
            versions[module] = getattr(__import__(module), attribute)
        except ImportError:
            pass
    try:
        from importlib.metadata import version
        versions["itk-elastix"] = version("itk-elastix")
    except Exception:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "platform": platform.platform(),
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "load_average_at_start": os.getloadavg(), "versions": versions}


def machine_line(m: dict, *details: str) -> str:
    """A report's first line: the machine of :func:`machine`, ``details`` of the run, and how
    busy the machine was when it started (the figures mean little on a loaded one)."""
    return "; ".join([f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB; torch "
                      f"{m['versions'].get('torch')}", *details, "load average at start "
                      + ", ".join(f"{v:.1f}" for v in m["load_average_at_start"])]) + "."


def run_measured(command: list[str], env: dict, log_path: Path, timeout: float) -> dict:
    """Run a child to completion; its wall time and peak RSS (from the kernel's rusage)."""
    with open(log_path, "wb") as log:
        start = time.perf_counter()
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        timer = threading.Timer(timeout, process.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(process.pid, 0)
        finally:
            timer.cancel()
        process.returncode = os.waitstatus_to_exitcode(status)
    return {"process_seconds": time.perf_counter() - start,
            "process_peak_rss_mb": usage.ru_maxrss / 1024.0,
            "exit_code": process.returncode, "timed_out": process.returncode == -9}


def write_report(out: Path, name: str, report: dict, text: str) -> None:
    """``name``.json and ``name``.md in ``out`` (atomically), and the table on stdout."""
    from LiquidRegLib import io

    out.mkdir(parents=True, exist_ok=True)
    io.write_json(out / f"{name}.json", report)
    with io.atomic_output(out / f"{name}.md") as tmp:
        tmp.write_text(text)
    print(text)
