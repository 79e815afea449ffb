"""What a model's name says where it names no model: the models there are (`available_models`),
and what the name is instead (`not_a_model`: a run's folder, a Wan checkpoint, a folder without
model.json, ...). Looked up in `streamgen.models`' model folders (`model_search_path`) at each call."""

from __future__ import annotations

import os
from pathlib import Path

from streamgen import models


def available_models() -> list[str]:
    return _listed_models()[0]


def _listed_models() -> tuple[list[str], list[str]]:
    """The models' names, and the model folders that cannot be read, each said with why (a
    STREAMGEN_MODELS folder of another user's: iterdir's PermissionError was a traceback)."""
    found, unreadable = listed_model_folders()
    # each flavor's stand-in and its teacher's (FLAVOR-teacher), as `streamgen models` lists them
    stand_ins = {name + teacher for name in models.FLAVORS if name != "debug" for teacher in ("", "-teacher")}
    return sorted(stand_ins | {name for name, _, _ in found}), unreadable


def listed_model_folders() -> tuple[list[tuple[str, Path, str]], list[str]]:
    """The model directories a name loads, as (name, folder, where from: "STREAMGEN_MODELS" or
    "shipped"), the first folder's of a name found in two (`resolve_model_dir`'s order); and the
    model folders that cannot be read, each said with why."""
    found, seen, unreadable = [], set(), []
    for root in models.model_search_path():
        whose = "shipped" if root == models.MODELS_DIR else "STREAMGEN_MODELS"
        said = "the shipped models'" if whose == "shipped" else "STREAMGEN_MODELS's"
        try:
            names, locked = _models_in(root)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as e:
            unreadable.append(f"{said} {root} cannot be read: {e.strerror or e}")
            continue
        unreadable += [f"{said} {folder} cannot be read: {e.strerror or e}" for folder, e in locked]
        found += [(name, root / name, whose) for name in sorted(names - seen)]
        seen |= names
    return found, unreadable


def _models_in(root: Path) -> tuple[set[str], list[tuple[Path, OSError]]]:
    """The names of the model directories in `root`, and one folder down as `org/model`: `--model
    org/avatar` loads those (`resolve_model_dir`), and they were left out of the list. Not deeper
    (a model folder may hold a home folder's worth); a name starting with "." is an export's
    staging folder. And the folders in it that cannot be looked into, with why (another user's,
    mode 700: whether a model's or an org's cannot be told): they were left out without a word."""
    names, locked = set(), []
    for d in (d for d in root.iterdir() if d.name[0] != "."):
        try:
            if _holds_model(d):
                names.add(d.name)
                continue
            inner = [m for m in d.iterdir() if m.name[0] != "."] if d.is_dir() else []
        except OSError as e:
            locked.append((d, e))
            continue
        for m in inner:
            try:
                if _holds_model(m):
                    names.add(f"{d.name}/{m.name}")
            except OSError as e:
                locked.append((m, e))
    return names, locked


def _holds_model(folder: Path) -> bool:
    """Whether `folder` holds a model.json; OSError where it cannot be looked into (EACCES), which
    `models._is_there` takes for none."""
    try:
        (folder / "model.json").stat()
    except (FileNotFoundError, NotADirectoryError):  # (no such file; `folder` a file)
        return False
    return True


def _unknown_model(name: str) -> str:
    names, unreadable = _listed_models()
    return (f"unknown model {name!r}: not a model directory and not one of {', '.join(names)}"
            + "".join(f" ({problem})" for problem in unreadable))  # fmt: skip


def not_a_model(name: str) -> str:
    """What `name` is instead of a model, said so that its user knows what to give instead (a Wan
    checkpoint's folder, a run's folder and an empty one were all "unknown model")."""
    if not name.strip():  # (was " is a folder without model.json", of the current folder)
        return f"the model's name is empty ({name!r}): give a model name or a model directory"
    if name.startswith("wan:"):  # (distill's name of a Wan checkpoint: "unknown model 'wan:...'")
        return (f"{name}: wan:DIR names a diffusers Wan2.1 checkpoint to distill a model from (a distill "
                "config's model.init, docs/distill.md), not a streamgen model: give the distilled model's directory")  # fmt: skip
    folder = models.home_expanded(name)
    if not models._is_there(folder) and models._is_a_path(name):
        return f"no model directory {name}: there is no such folder"
    # the folder under the model folders a name is (a copy cut short, a run's): it was "unknown model"
    here = models._is_there(folder) or models._is_a_path(name)
    under = [] if here else [root / name for root in models.model_search_path() if models._is_there(root / name)]
    name, folder = (str(under[0]), under[0]) if under else (name, folder)
    if not models._is_there(folder) and "/" in name.replace(os.sep, "/"):  # (a relative path, or a nested model's name)
        return f"no model directory {name}: there is no such folder in {Path.cwd()}, nor under {_model_folders()}"
    if not models._is_there(folder):
        return _unknown_model(name)
    try:
        _holds_model(folder)
    except OSError as e:  # (another user's, mode 700: the looks inside it below raised it, a traceback)
        return f"{name} is a folder that cannot be read: {e.strerror or e}"
    if folder.is_file() and (folder.parent / "model.json").is_file():  # (its model.json, its weights)
        return f"{name} is a file of the model directory {folder.parent}: give the directory"
    if (folder / "model" / "model.json").is_file():
        return f"{name} is a run's folder: its model is {folder / 'model'}"
    if is_diffusers_wan(folder):
        return (f"{name} is a diffusers Wan2.1 checkpoint, not a streamgen model: distill it into one first "
                f"(a distill config's model.init: wan:{name}, docs/distill.md)")  # fmt: skip
    if folder.is_dir():
        return f"{name} is a folder without model.json: not a streamgen model (docs/distill.md says how one is made)"
    return _unknown_model(name)


def _model_folders() -> str:
    """The folders a model's name is looked for under (`model_search_path`), said with where each is from
    (an `org/model` not found under STREAMGEN_MODELS was said to be no folder in the current one alone)."""
    *extra, shipped = models.model_search_path()
    if not extra:
        return f"the shipped models ({shipped}; STREAMGEN_MODELS names more folders to look under)"
    return f"STREAMGEN_MODELS ({', '.join(map(str, extra))}) or the shipped models ({shipped})"


def is_diffusers_wan(folder: Path) -> bool:
    """A diffusers Wan2.1 pipeline's folder, or its transformer's."""
    import json

    for config in (folder / "config.json", folder / "transformer" / "config.json", folder / "model_index.json"):  # fmt: skip
        try:
            meta = json.loads(config.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(meta, dict) and str(meta.get("_class_name", "")).startswith("Wan"):
            return True
    return False
