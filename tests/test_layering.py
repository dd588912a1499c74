"""Serving never imports training: what a detector is and how it runs must not depend on how it was trained.

A static scan of every import statement (top level or inside functions, where the lazy ones hide) in the
modules that score images, load detectors or build Triton models. Training may import serving, not the
other way round.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "streamguard"
SERVING = ["builtin", "backbone", "triton", "backends", "detectors", "scoring.py"]
FORBIDDEN = "streamguard.training"


def _modules() -> list[Path]:
    files: list[Path] = []
    for entry in SERVING:
        path = PACKAGE / entry
        files.extend(sorted(path.rglob("*.py")) if path.is_dir() else [path])
    return files


def _package(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])


def _imports(path: Path, package: str) -> list[tuple[int, str]]:
    """(line, module) of every import in ``path`` (of ``package``), relative ones resolved, and of
    ``import_module("...")``."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join([*parts[: len(parts) - node.level + 1], *([base] if base else [])])
            found.extend((node.lineno, f"{base}.{alias.name}") for alias in node.names)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.append((node.lineno, node.args[0].value))
    return found


def test_the_scan_sees_every_serving_package() -> None:
    modules = _modules()
    assert len(modules) > 20
    assert {p.relative_to(PACKAGE).parts[0] for p in modules} == set(SERVING)


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_serving_never_imports_training(path: Path) -> None:
    bad = [f"{path.relative_to(PACKAGE.parent)}:{line}: {name}" for line, name in _imports(path, _package(path))
           if name == FORBIDDEN or name.startswith(FORBIDDEN + ".")]
    assert not bad, "serving imports training:\n" + "\n".join(bad)


def test_the_scan_catches_lazy_and_relative_imports(tmp_path: Path) -> None:
    module = tmp_path / "probe.py"
    module.write_text("def f():\n    from streamguard.training.recipe import Recipe\n"
                      "from ..training import lora\nimport importlib\nimportlib.import_module('streamguard.training.data')\n")
    names = sorted(name for _, name in _imports(module, "streamguard.builtin"))
    assert names == ["importlib", "streamguard.training.data", "streamguard.training.lora",
                     "streamguard.training.recipe.Recipe"]
