"""RegistrationOptions: one object from the command line, Slicer and Python into ``register``."""
from __future__ import annotations

import numpy as np
import pytest

from LiquidRegLib.cli import build_parser, option_arguments, registration_options
from LiquidRegLib.errors import InputError
from LiquidRegLib.options import ACCURATE_ITERATIONS, RegistrationOptions


def test_modes_and_the_expert_override():
    assert RegistrationOptions().steps == 0
    assert RegistrationOptions(mode="accurate").steps == ACCURATE_ITERATIONS > 0
    assert RegistrationOptions(mode="accurate", iterations=7).steps == 7
    assert RegistrationOptions(mode="accurate", iterations=0).steps == 0
    assert RegistrationOptions(iterations=np.int64(3)).iterations == 3


@pytest.mark.parametrize("settings, expected", [
    ({"mode": "slow"}, "unknown mode"),
    ({"iterations": -1}, "iterations"),
    ({"iterations": 2.5}, "iterations"),
    ({"iterations": "5"}, "iterations"),
    ({"refinement_steps": 0}, "refinement_steps"),
    ({"refinement_steps": 1.5}, "refinement_steps"),
    ({"regularisation": float("nan")}, "regularisation"),
    ({"regularisation": -1.0}, "regularisation"),
    ({"initial_affine": np.zeros((4, 4))}, "invertible"),
    ({"initial_affine": np.eye(3)}, "4x4"),
    ({"device": "tpu"}, "unknown device"),
])
def test_bad_options_name_the_option_in_api_terms(settings, expected):
    """Slicer and Python users see these too: no command-line flags in the message."""
    with pytest.raises(InputError, match=expected) as info:
        RegistrationOptions(**settings)
    assert "--" not in str(info.value) and "\n" not in str(info.value)


def test_unknown_field_is_a_type_error():
    with pytest.raises(TypeError):
        RegistrationOptions.of(None, smoothness=2.0)


def test_of_keeps_the_given_options_and_sets_fields_by_name():
    base = RegistrationOptions(mode="accurate", device="cpu")
    assert RegistrationOptions.of(base) is base
    assert RegistrationOptions.of(base, affine=False) == RegistrationOptions(
        mode="accurate", device="cpu", affine=False)
    assert RegistrationOptions.of(None) == RegistrationOptions()


@pytest.mark.parametrize("options", [
    RegistrationOptions(),
    RegistrationOptions(mode="accurate", regularisation=2.5, device="cpu"),
    RegistrationOptions(iterations=0, affine=False, weights="my_weights.pt"),
    RegistrationOptions(mode="fast", iterations=12, regularisation=0.25),
    RegistrationOptions(refinement_steps=3),
])
def test_command_line_round_trip(options, tmp_path):
    """What Slicer puts on the background command line is read back as the same options."""
    args = build_parser().parse_args(["register", "a.nii.gz", "b.nii.gz", "-o", str(tmp_path),
                                      *option_arguments(options)])
    assert registration_options(args) == options


def test_initial_affine_travels_as_a_file(tmp_path):
    matrix = np.eye(4)
    matrix[:3, 3] = (1.0, -2.0, 3.5)
    with pytest.raises(ValueError, match="file"):
        option_arguments(RegistrationOptions(initial_affine=matrix))
    np.savetxt(tmp_path / "init.txt", matrix)
    args = build_parser().parse_args(["register", "a.nii.gz", "b.nii.gz", "-o", str(tmp_path),
                                      "--initial-affine", str(tmp_path / "init.txt")])
    assert registration_options(args) == RegistrationOptions(initial_affine=matrix)


def test_mode_accurate_reaches_the_engine(run_cli, fake_engine, tmp_path):
    from LiquidRegLib import io
    from conftest import build_grid, world_image

    grid = build_grid((16, 16, 16), (2.0, 2.0, 2.0), np.eye(3))
    for name in ("f", "m"):
        io.write_volume(tmp_path / f"{name}.nii.gz", world_image(grid), grid)
    code, _, err = run_cli("register", tmp_path / "f.nii.gz", tmp_path / "m.nii.gz", "-o",
                           tmp_path / "out", "--mode", "accurate", "-q", "--no-png")
    assert code == 0, err
    options = fake_engine["register"]["options"]
    assert options.mode == "accurate" and options.steps == ACCURATE_ITERATIONS


def test_python_api_short_call_runs_what_it_says(small_brain_pair):
    """``register(fixed, moving, mode=..., iterations=...)``: summary.json records the options and
    the instance optimisation ran exactly that many steps."""
    from LiquidRegLib import register

    fixed, _, moving, _ = small_brain_pair
    result = register.register(fixed, moving, mode="accurate", iterations=2, affine=False,
                               device="cpu", regularisation=2.0)
    summary = result.summary
    assert summary["mode"] == "accurate" and summary["iterations"] == 2
    assert summary["regularisation"] == 2.0 and summary["affine"] is False
    assert summary["instance_optimisation"]["steps"] == 2
    assert summary["device"] == "cpu"


def test_more_refinement_steps_change_the_network_answer(small_brain_pair):
    """``refinement_steps`` reaches the network: its answer changes, and stays diffeomorphic."""
    from LiquidRegLib import register

    fixed, _, moving, _ = small_brain_pair
    default = register.register(fixed, moving, affine=False, device="cpu", inverse=False)
    more = register.register(fixed, moving, affine=False, device="cpu", inverse=False,
                             refinement_steps=3)
    assert more.summary["refinement_steps"] == 3 and default.summary["refinement_steps"] is None
    assert np.abs(more.displacement - default.displacement).max() > 0.1  # mm
    assert more.summary["pct_folding"] == 0.0
