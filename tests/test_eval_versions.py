"""The versions eval keeps beside its results, each pinned to a digest of the code it versions.

`EVAL_VERSION` (streamgen/eval/report.py) is in every report.json's settings: a report, or an
unfinished run's clips, of another version is measured again. It was bumped by hand alone, so a
metric changed without a bump left the reports measured before taken for the new code's, without a
word. Here it is pinned to the code of the metrics: changing that code without looking at the
version fails the suite, with a message saying what to do. So is `TRAINING_VERSION`
(streamgen/eval/train.py), in the evaluators' checkpoints, to the code that trains them. The digest is of the modules' syntax
trees, not their text: a comment, a docstring or a line wrapped otherwise is no change.
"""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# (the module that holds the version, its name, the modules whose code it versions, the version and
# their digest when it was last checked against them)
PINS = [
    (
        "streamgen/eval/report.py", "EVAL_VERSION",
        ("streamgen/eval/metrics.py", "streamgen/eval/evaluators.py", "streamgen/eval/drift.py"),
        1, "9cb1546f7616054d",
    ),
    (
        "streamgen/eval/train.py", "TRAINING_VERSION",
        ("streamgen/eval/train.py", "streamgen/eval/evaluators.py"),
        1, "dc346c8f19904a9f",
    ),
]  # fmt: skip


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


def code_digest(paths, leave_out: str = "") -> str:
    """A digest of the code of the modules at `paths`, as their syntax trees say it (comments,
    docstrings and layout aside); an assignment to `leave_out` (the version itself) left out."""
    digest = hashlib.sha256()
    for path in paths:
        tree = ast.parse(Path(path).read_text())
        tree.body = [
            statement
            for statement in tree.body
            if not (
                isinstance(statement, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == leave_out for t in statement.targets)
            )
        ]
        digest.update(Path(path).name.encode() + b"\0" + _canonical(tree).encode() + b"\0")
    return digest.hexdigest()[:16]


@pytest.mark.parametrize("holder, name, modules, pinned_version, pinned_digest", PINS, ids=[p[1] for p in PINS])
def test_a_version_is_pinned_to_the_code_it_versions(holder, name, modules, pinned_version, pinned_digest):
    import importlib

    version = getattr(importlib.import_module(holder.removesuffix(".py").replace("/", ".")), name)
    digest = code_digest([ROOT / m for m in modules], leave_out=name)
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
