"""The text of a config: the --set options over its YAML, and what YAML made of a value.

A --set is SECTION.KEY=VALUE, the value read as YAML (`run.out=runs/x`, `optim.lr=1e-4`,
`model.overrides.window_frames=6`); `yaml_reading` says why a value the user meant as text was
read as something else, and `yaml_problem` says a YAML error in one line.
"""

from __future__ import annotations

import datetime
import re

from distill.config_schema import ConfigError


def apply_sets(raw: dict, sets) -> None:
    import yaml

    for item in sets:
        key, sep, value = item.partition("=")
        # (`run.out = x`, as a YAML file spaces it: "unknown config key(s): run.out  (did you mean run.out?)")
        names = [name.strip() for name in key.split(".")]
        if not sep or len(names) < 2 or not all(names):
            raise ConfigError(f"--set {item!r}: expected SECTION.KEY=VALUE, e.g. run.out=runs/mine")
        node = raw
        for depth, name in enumerate(names[:-1]):
            if node.get(name) is None:  # (a section the file leaves empty: `optim:`)
                node[name] = {}
            node = node[name]
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {'.'.join(names[: depth + 1])} is not a section")
        try:
            node[names[-1]] = value.strip() if _ends_in_comment(value) else _number_or(yaml.safe_load(value), value)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML: {yaml_problem(e)}") from None


def _ends_in_comment(text: str) -> bool:
    """Whether YAML reads the end of a --set's `text` as a comment. A shell drops its own comments,
    so a ` #` that reaches a --set was quoted on purpose: part of the value (`run.out=runs/a #1` was
    read as runs/a, the rest dropped without a word)."""
    import yaml

    node = yaml.compose(text)  # (the value as YAML reads it, with where it ends)
    rest = text[node.end_mark.index :] if node is not None else text
    return rest.strip().startswith("#")


def yaml_reading(text: str) -> str:
    """Why YAML read a --set's `text` as other than the text it looks like, or ''."""
    import yaml

    text = text.strip()
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return ""
    if text.startswith("wan:") and isinstance(value, dict):  # (`wan:`, `wan: DIR`: a mapping)
        return " (YAML reads it as a mapping: give the Wan checkpoint's folder right after wan:, as in wan:DIR)"
    if isinstance(value, bool) or (value is None and text):  # (`~`, the home folder: null to YAML)
        read = "null" if value is None else str(value).lower()
        return f" (YAML reads {text} as {read}: quote it for text, as in '{text}')"
    if isinstance(value, dict) and ":" in text:
        return f" (YAML reads {text} as a mapping: quote it for text, as in '{text}')"
    if isinstance(value, int) and ":" in text:
        return f" (YAML reads {text} as the base-60 number {value}: quote it for text, as in '{text}')"
    if isinstance(value, datetime.date):
        return f" (YAML reads {text} as a date: quote it for text, as in '{text}')"
    return ""


def yaml_problem(e) -> str:
    """A YAML error in one line: where, what, and in what ("line 2, column 6: expected ',' or '}',
    but got '<stream end>' (while parsing a flow mapping)"). PyYAML's own text was six lines, with
    the line quoted, a caret under it, and "<unicode string>" for the file."""
    mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
    if not problem:
        return " ".join(str(e).split())
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    context, opened = getattr(e, "context", None), getattr(e, "context_mark", None)
    if context and opened is not None and (mark is None or (opened.line, opened.column) != (mark.line, mark.column)):
        context += f" from line {opened.line + 1}, column {opened.column + 1}"  # (the `{` left open)
    return where + " ".join(problem.split()) + (f" ({' '.join(context.split())})" if context else "")


def _number_or(value, text: str):
    """A command line's 1e-4 is a number (YAML 1.1 reads it as text without a decimal point);
    quoted ("1e4"), or not written as a number (nan, a path), it stays text."""
    if isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", text.strip()):
        return float(text)
    return value

