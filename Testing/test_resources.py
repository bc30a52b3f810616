"""Package data: the shipped weights and sample pair are found through ``resources`` wherever the
package is installed, and the one rule for new weights keeps the shipped ones as shipped."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import LiquidRegLib
from LiquidRegLib import io, resources
from LiquidRegLib.errors import InputError

PACKAGE = Path(LiquidRegLib.__file__).resolve().parent


def test_shipped_files_live_in_the_package():
    weights = resources.default_weights()
    assert weights.is_file() and weights.parent == PACKAGE / "resources" / "weights"
    assert weights.name == resources.DEFAULT_WEIGHTS_FILE
    for key, path in resources.sample_paths().items():
        assert path.is_file() and path.parent == PACKAGE / "resources" / "sample", key
    assert io.read_grid(resources.sample_paths()["fixed_t1"]).shape


def test_no_module_computes_a_path_to_the_resources():
    """Only resources.py knows where the package data is: nothing else builds a path from
    ``__file__`` to it."""
    folders = {"resources", "weights", "sample"}
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "resources.py":
            continue
        for statement in ast.walk(ast.parse(path.read_text())):
            if not isinstance(statement, ast.stmt):
                continue
            nodes = list(ast.walk(statement))
            uses_file = any(getattr(n, "id", None) == "__file__" for n in nodes)
            strings = {n.value.lower() for n in nodes
                       if isinstance(n, ast.Constant) and isinstance(n.value, str)}
            if uses_file and strings & folders:
                offenders.append(f"{path.name}:{statement.lineno}")
    assert not offenders, offenders


@pytest.mark.parametrize("name, overwrite, expected", [
    ("", False, "no file"),
    ("w.pth", False, ".pt"),
    ("existing.pt", False, "already exists"),
    ("folder.pt", True, "folder"),
])
def test_new_weights_rule(tmp_path, name, overwrite, expected):
    (tmp_path / "existing.pt").write_bytes(b"x")
    (tmp_path / "folder.pt").mkdir()
    with pytest.raises(InputError, match=expected):
        resources.check_new_weights_path(str(tmp_path / name) if name else "",
                                         overwrite=overwrite)


@pytest.mark.parametrize("where", ["weights/liquidreg_brain_v3.pt", "weights/mine.pt",
                                   "sample/new.pt", "mine.pt"])
def test_nothing_is_ever_written_among_the_shipped_files(where):
    """Whatever the name, and even with overwriting allowed: the shipped folder is off limits."""
    with pytest.raises(InputError, match="shipped"):
        resources.check_new_weights_path(resources.folder() / where, overwrite=True)


def test_existing_file_is_kept_and_new_one_allowed(tmp_path):
    assert resources.check_new_weights_path(tmp_path / "new.pt") == tmp_path / "new.pt"
    (tmp_path / "old.pt").write_bytes(b"x")
    assert resources.check_new_weights_path(tmp_path / "old.pt", overwrite=True) == \
        tmp_path / "old.pt"


def test_publishing_without_replace_never_replaces(tmp_path):
    """A file that appears while new weights are being written is kept (the last check and the
    publication are one atomic step)."""
    target = tmp_path / "w.pt"
    with pytest.raises(InputError, match="already exists"):
        with io.atomic_output(target, replace=False) as tmp:
            tmp.write_bytes(b"new")
            target.write_bytes(b"appeared meanwhile")
    assert target.read_bytes() == b"appeared meanwhile"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.pt"]
    other = tmp_path / "v.pt"
    with io.atomic_output(other, replace=False) as tmp:
        tmp.write_bytes(b"new")
    assert other.read_bytes() == b"new"


def test_missing_shipped_weights_say_the_installation_is_broken(monkeypatch, tmp_path):
    from LiquidRegLib import checkpoint
    from LiquidRegLib.errors import WeightsError
    monkeypatch.setattr(checkpoint, "default_weights", lambda: tmp_path / "gone.pt")
    with pytest.raises(WeightsError, match="missing from this installation"):
        checkpoint.load_model()
    with pytest.raises(WeightsError, match="does not exist; check the path"):
        checkpoint.load_model(tmp_path / "typo.pt")
