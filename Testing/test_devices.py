"""Devices: CUDA out of memory falls back to the CPU; CPU and CUDA results agree.

CUDA tolerance (stated in the README), on the bundled 1 mm pair over the fixed brain:
displacements agree within 0.1 mm on average, the affine stage within 0.05 mm on average (a
1e-6 relative change of the moving image moves it by less than 0.01 mm on the CPU, and the two
devices differ by rounding only), and warped intensities on average within 0.5 % of the image
range.  ``scripts/cuda_agreement.py`` measures the same quantities (``brain_agreement``).  The
agreement test needs a GPU and is skipped without one.
"""
import warnings

import numpy as np
import pytest
import torch

from cuda_agreement import brain_agreement
from LiquidRegLib import affine, checkpoint, io, register
from LiquidRegLib.resources import sample_paths


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
def test_cpu_and_cuda_agree_on_the_bundled_1mm_pair():
    paths = sample_paths()
    fixed, moving = io.read_volume(paths["fixed_t1"]), io.read_volume(paths["moving_t1"])
    labels = io.read_volume(paths["fixed_labels"], dtype=None)
    on_cpu = register.register(fixed, moving, device="cpu")
    on_gpu = register.register(fixed, moving, device="cuda")
    assert on_gpu.summary["device"].startswith("cuda")
    agreement = brain_agreement(labels, on_cpu, on_gpu)
    assert agreement["mean_affine_difference_mm"] < 0.05, agreement
    assert agreement["mean_displacement_difference_mm"] < 0.1, agreement
    assert agreement["mean_abs_warped_difference_fraction_of_range"] < 0.005, agreement
