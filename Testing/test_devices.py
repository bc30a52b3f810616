"""Devices: CUDA out of memory falls back to the CPU; CPU and CUDA results agree.

CUDA tolerance (stated in the README): displacements agree within 0.05 mm everywhere and warped
intensities on average within 0.5 % of the image range.  The agreement test needs a GPU and is
skipped without one (it has not run on the project's CPU-only machines).
"""
import warnings

import numpy as np
import pytest
import torch

from LiquidRegLib import affine, checkpoint, register


def test_cuda_out_of_memory_falls_back_to_the_cpu(small_brain_pair, monkeypatch):
    fixed, _, moving, _ = small_brain_pair
    real_affine, real_load = affine.affine_register, checkpoint.load_model
    devices = []

    def affine_register(*args, device, **kwargs):
        devices.append(torch.device(device).type)
        if torch.device(device).type == "cuda":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_affine(*args, device=device, **kwargs)

    # Pretend a GPU was chosen; the model itself stays on the CPU (this machine may have none).
    monkeypatch.setattr(register, "resolve_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(register.checkpoint, "load_model", lambda w, d: real_load(w, "cpu"))
    monkeypatch.setattr(affine, "affine_register", affine_register)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = register.register(fixed, moving, device="cuda")
    assert devices == ["cuda", "cpu"]
    assert any("falling back to the CPU" in str(w.message) for w in caught)
    assert result.summary["device"] == "cpu"
    assert result.displacement.shape == (*fixed.grid.shape, 3)
    assert np.isfinite(result.displacement).all() and result.jacobian.min() > 0


def test_other_errors_are_not_retried(small_brain_pair, monkeypatch):
    fixed, _, moving, _ = small_brain_pair

    def broken(*args, **kwargs):
        raise RuntimeError("not a memory problem")

    monkeypatch.setattr(affine, "affine_register", broken)
    with pytest.raises(RuntimeError, match="not a memory problem"):
        register.register(fixed, moving, device="cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cpu_and_cuda_agree(small_brain_pair):
    fixed, _, moving, _ = small_brain_pair
    on_cpu = register.register(fixed, moving, device="cpu")
    on_gpu = register.register(fixed, moving, device="cuda")
    assert on_gpu.summary["device"].startswith("cuda")
    assert np.abs(on_cpu.displacement - on_gpu.displacement).max() < 0.05
    span = np.ptp(on_cpu.warped)
    assert np.abs(on_cpu.warped - on_gpu.warped).mean() < 0.005 * span
