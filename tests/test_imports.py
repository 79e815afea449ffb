"""Every import of one of the project's own names resolves, the ones inside functions included.

Imports made only when a function runs (to keep a module's import light, or to break a cycle) are
not checked by importing the module: a name moved to another module broke `bench/gpu.py`'s Wan
path, which runs only on a GPU, and nothing on this machine would have said so."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OURS = ("streamgen", "server", "distill", "bench")


def own_imports() -> list[tuple[str, int, str, str]]:
    """(file, line, module, name) for each `from <ours> import name` under the project's packages."""
    found = []
    for package in OURS:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    if node.module.split(".")[0] in OURS:
                        found += [
                            (str(path.relative_to(ROOT)), node.lineno, node.module, a.name)
                            for a in node.names
                        ]
    return found


def test_the_walk_finds_imports_inside_functions():
    inside = [i for i in own_imports() if i[0] == "bench/gpu.py" and i[2] == "streamgen.model.wan_vae"]
    assert inside and len(own_imports()) > 200


def test_every_import_of_our_own_names_resolves():
    missing = []
    for file, line, module, name in own_imports():
        try:
            imported = importlib.import_module(module)
        except ImportError as e:
            if e.name and e.name.split(".")[0] in OURS:
                missing.append(f"{file}:{line}: {module} ({e})")
            continue  # an optional dependency this machine lacks (triton, flash-attn): not ours to check
        if name != "*" and not hasattr(imported, name):
            try:  # a submodule not imported yet
                importlib.import_module(f"{module}.{name}")
            except ModuleNotFoundError:
                missing.append(f"{file}:{line}: {module} has no {name}")
    assert not missing, "\n".join(missing)


def test_streamgen_imports_neither_distill_nor_server():
    """DESIGN's one way: distill/ and server/ import streamgen, never the reverse (eval's
    train-evaluators reached into distill's checkpoints, inside a function, where no import of the
    module would have shown it)."""
    wrong = []
    for path in sorted((ROOT / "streamgen").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            wrong += [f"{path.relative_to(ROOT)}:{node.lineno}: {n}" for n in names if n.split(".")[0] in ("distill", "server")]
    assert not wrong, "\n".join(wrong)
