"""The shape of the code: no import cycles in the engine, and the runtime apart from tooling."""
from __future__ import annotations

import ast
from pathlib import Path

import LiquidRegLib

PACKAGE = Path(LiquidRegLib.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Every LiquidRegLib module -> the LiquidRegLib modules it imports (at any depth of the
    file: function-level imports count, they are cycles all the same)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets.add(base)
                targets |= {f"{base}.{alias.name}" for alias in node.names}
        graph[name] = {t for t in targets if t in modules and t != name
                       and t != "LiquidRegLib"}
    return graph


def cycles(graph) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                found.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_engine_has_no_import_cycles():
    graph = import_graph()
    assert "LiquidRegLib.io" in graph and "LiquidRegLib.grid" in graph["LiquidRegLib.io"]
    assert cycles(graph) == []


def _raised_texts(path: Path):
    """(line, text) of the string parts of every ``raise X(...)`` in a module."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
            parts = [n.value for n in ast.walk(node.exc)
                     if isinstance(n, ast.Constant) and isinstance(n.value, str)]
            yield node.lineno, " ".join(parts)


def test_engine_errors_speak_the_api_not_command_line_flags():
    """Slicer and Python users see the engine's errors too: options are named as the API names
    them, never as flags (only the command line itself speaks of flags)."""
    import re
    flag = re.compile(r"(^|\s)--?[a-z]")
    command_line = {"cli.py", "slicer_tests.py"}
    found = [f"{path.name}:{line}: {text}"
             for path in PACKAGE.rglob("*.py") if path.name not in command_line
             for line, text in _raised_texts(path) if flag.search(text)]
    assert not found, found
    assert any(flag.search(text) for _, text in _raised_texts(PACKAGE / "cli.py"))


def test_test_output_is_not_buried_in_third_party_warnings(tmp_path):
    """ITK's SWIG wrappers raise over a thousand deprecation warnings per run; the test
    configuration filters exactly those, so a run's summary stays readable."""
    import subprocess
    import sys

    import pytest
    pytest.importorskip("itk")
    root = PACKAGE.parents[1]
    test = tmp_path / "test_swig.py"
    test.write_text("import itk\n\n\ndef test_swig():\n    assert itk.ParameterObject\n")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c",
                          str(root / "pyproject.toml"), "--rootdir", str(root), str(test)],
                         capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "warning" not in (run.stdout + run.stderr).lower(), run.stdout + run.stderr
