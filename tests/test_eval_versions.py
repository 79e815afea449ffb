"""The versions eval keeps beside its results, each pinned to a digest of the code it versions.

`EVAL_VERSION` (streamgen/eval/report.py) is in every report.json's settings: a report, or an
unfinished run's clips, of another version is measured again. It was bumped by hand alone, so a
metric changed without a bump left the reports measured before taken for the new code's, without a
word. Here it is pinned to the code its numbers depend on (the metrics, the scoring in report.py, what a
clip keeps in partial/, the code that makes the clips): changing that code without looking at the
version fails the suite, with a message saying what to do. So is `TRAINING_VERSION`
(streamgen/eval/train.py), in the evaluators' checkpoints, to the code that trains them and makes their
clips. Every module of streamgen.data and streamgen.eval a version's module imports is pinned, or said
to change no number (NOT_NUMBERS). The digest is of the modules' syntax trees, not their text: a
comment, a docstring or a line wrapped otherwise is no change.
"""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# (the module that holds the version, its name, the modules whose code it versions (path::name: that
# definition of the module alone), the version and their digest when it was last checked against them)
CLIPS = (  # the code the world's clips are made by (world.make_clip), that eval scores and trains on
    "streamgen/data/__init__.py", "streamgen/data/world.py", "streamgen/data/motion.py",
    "streamgen/data/render.py", "streamgen/data/sentences.py", "streamgen/data/speech.py",
    "streamgen/data/espeak_view.py",  # (the espeak-ng data the voices are read from)
)
PINS = [
    (
        "streamgen/eval/report.py", "EVAL_VERSION",
        ("streamgen/eval/metrics.py", "streamgen/eval/evaluators.py", "streamgen/eval/drift.py",
         "streamgen/eval/report.py", "streamgen/eval/sessions.py", "streamgen/eval/outputs.py",
         "streamgen/eval/partial.py", *CLIPS,
         "streamgen/media.py::from_time_zero"),  # (a stream's frames lined up with its audio, for sync)
        3, "982f245b57bd1f64",
    ),
    (
        "streamgen/eval/train.py", "TRAINING_VERSION",
        ("streamgen/eval/train.py", "streamgen/eval/evaluators.py", *CLIPS),
        1, "5ba9173c0c540334",
    ),
]  # fmt: skip
# where the modules a version depends on are looked for (`depended_on`); the rest of streamgen is the
# model's side (what is measured, not how), but for the pieces named in PINS as path::name
WATCHED_PACKAGES = ("streamgen/data/", "streamgen/eval/")
# modules of those that a version's code imports but that change none of its numbers, and why
NOT_NUMBERS = {
    "streamgen/data/media.py": "the pictures' (samples.png, drift.png, sync.png): no number of report.json",
    **dict.fromkeys(
        ("streamgen/data/shards.py", "streamgen/data/manifest.py", "streamgen/data/unfinished_make.py",
         "streamgen/data/pool.py"),
        "a dataset's making and reading (--data): its clips are the dataset's, which the settings record",
    ),
}


def _canonical(node) -> str:
    """`node` written out whole but for where it is in the file; fields that are None or empty left
    out (Python 3.12 added `type_params`, 3.13's ast.dump leaves such fields out: one digest for all)."""
    if isinstance(node, list):
        return "[" + ",".join(_canonical(item) for item in node) + "]"
    if not isinstance(node, ast.AST):
        return repr(node)
    fields = []
    for name, value in ast.iter_fields(node):
        if name == "body" and isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            value = _without_docstring(value)
        if value is not None and value != []:
            fields.append(f"{name}={_canonical(value)}")
    return f"{type(node).__name__}({','.join(fields)})"


def _without_docstring(body: list) -> list:
    first = body[0] if body else None
    is_docstring = (
        isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str)
    )
    return body[1:] if is_docstring else body


def _defines(statement, name: str) -> bool:
    """Whether the module-level `statement` is the definition of `name` (a function, a class, an assignment)."""
    if isinstance(statement, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return statement.name == name
    return isinstance(statement, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in statement.targets)


def code_digest(paths, leave_out: str = "") -> str:
    """A digest of the code of the modules at `paths`, as their syntax trees say it (comments,
    docstrings and layout aside); an assignment to `leave_out` (the version itself) left out."""
    digest = hashlib.sha256()
    for path in paths:
        path, _, definition = str(path).partition("::")
        tree = ast.parse(Path(path).read_text())
        if definition:
            tree.body = [statement for statement in tree.body if _defines(statement, definition)]
            assert tree.body, f"{path} defines no {definition}"
        tree.body = [
            statement
            for statement in tree.body
            if not (
                isinstance(statement, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == leave_out for t in statement.targets)
            )
        ]
        named = Path(path).name + (f"::{definition}" if definition else "")
        digest.update(named.encode() + b"\0" + _canonical(tree).encode() + b"\0")
    return digest.hexdigest()[:16]


@pytest.mark.parametrize("holder, name, modules, pinned_version, pinned_digest", PINS, ids=[p[1] for p in PINS])
def test_a_version_is_pinned_to_the_code_it_versions(holder, name, modules, pinned_version, pinned_digest):
    import importlib

    version = getattr(importlib.import_module(holder.removesuffix(".py").replace("/", ".")), name)
    digest = code_digest([f"{ROOT}/{m}" for m in modules], leave_out=name)
    pin = f"pin ({version}, {digest!r}) as {name}'s in {Path(__file__).relative_to(ROOT)} PINS"
    assert version == pinned_version or digest != pinned_digest, (
        f"{name} is {version} in {holder}, the code pinned as version {pinned_version}'s: {pin}"
    )
    assert digest == pinned_digest, (
        f"the code {name} versions ({', '.join(modules)}) changed since {name} {pinned_version} "
        f"was pinned to it: if the change alters any number they give for the same inputs, bump {name} in "
        f"{holder} (what was measured or trained by the code before is then done again, not taken for "
        f"this code's); either way, {pin}"
    )


def _imported(path: Path) -> set[Path]:
    """The files of the modules `path` imports (anywhere in it, a function's own imports too)."""

    def file_of(module: str) -> Path | None:
        for candidate in (ROOT / (module.replace(".", "/") + ".py"), ROOT / module.replace(".", "/") / "__init__.py"):
            if candidate.is_file():
                return candidate
        return None

    package = list(path.relative_to(ROOT).parent.parts)
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found |= {file_of(f"{module}.{alias.name}") or file_of(module) for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {file_of(alias.name) for alias in node.names}
    return found - {None}


def depended_on(holder: str) -> set[str]:
    """The modules of streamgen.data and streamgen.eval that `holder` imports, and those they import
    (its own among them): the clips made, how they are scored, what a clip keeps."""
    seen, todo = set(), [ROOT / holder]
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo += [p for p in _imported(path) if str(p.relative_to(ROOT)).startswith(WATCHED_PACKAGES)]
    return {str(p.relative_to(ROOT)) for p in seen}


@pytest.mark.parametrize("holder, name, modules", [p[:3] for p in PINS], ids=[p[1] for p in PINS])
def test_every_module_a_version_depends_on_is_pinned(holder, name, modules):
    """EVAL_VERSION was pinned to the metrics alone: report.py's scoring, and the code that makes the
    clips the numbers are of (world.py, render.py, speech.py, ...), changed them unwatched."""
    pinned = {m for m in modules if "::" not in m}
    wanted = depended_on(holder) - set(NOT_NUMBERS)
    assert not wanted - pinned, (
        f"{name} versions numbers that {', '.join(sorted(wanted - pinned))} can change, which its pin leaves "
        f"out: add them to its modules in PINS (or, where they change no number, to NOT_NUMBERS, saying why)"
    )
    assert not pinned - wanted, f"{name}'s pin holds {', '.join(sorted(pinned - wanted))}, which {holder} does not import"


def test_the_digest_is_of_the_code_not_its_comments_docstrings_or_layout(tmp_path):
    code = tmp_path / "metric.py"
    base = 'VERSION = 1\n\n\ndef score(x):\n    """How good."""\n    return x * 2  # doubled\n'
    same = [
        'VERSION = 1\n\n\ndef score(x):\n    """How good, said otherwise."""\n    return x * 2\n',
        "VERSION = 2\n# a comment\n\ndef score(\n    x,\n):\n    return (x\n            * 2)\n",
    ]
    other = [
        'VERSION = 1\n\n\ndef score(x):\n    """How good."""\n    return x * 3  # doubled\n',
        'VERSION = 1\n\n\ndef score(y):\n    """How good."""\n    return y * 2  # doubled\n',
        'VERSION = 1\n\n\ndef score(x):\n    """How good."""\n    return x * 2.0  # doubled\n',
    ]
    digests = []
    for text in [base, *same, *other]:
        code.write_text(text)
        digests.append(code_digest([code], leave_out="VERSION"))
    assert digests[0] == digests[1] == digests[2]
    assert len(set(digests[2:])) == 1 + len(other)


def test_a_definition_pinned_alone_is_digested_without_the_rest_of_its_module(tmp_path):
    code = tmp_path / "media.py"
    texts = [
        "def line_up(x):\n    return x[1:]\n\n\ndef read(p):\n    return open(p)\n",
        "def line_up(x):\n    return x[1:]\n\n\ndef read(p):\n    return open(p, 'rb')\n",
        "def line_up(x):\n    return x[2:]\n\n\ndef read(p):\n    return open(p)\n",
    ]
    digests = []
    for text in texts:
        code.write_text(text)
        digests.append(code_digest([f"{code}::line_up"]))
    assert digests[0] == digests[1] != digests[2]
    with pytest.raises(AssertionError, match="defines no lineup"):
        code_digest([f"{code}::lineup"])
