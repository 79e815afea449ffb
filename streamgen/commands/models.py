"""`streamgen models [--json]`: the models a `--model NAME` can name, where each is from, and its
flavor and size, read from the model directories' files (no weights loaded)."""

from __future__ import annotations

import argparse
import json
import struct
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the list as JSON (one object per model)")


def run(args: argparse.Namespace) -> int:
    from streamgen.model_names import listed_model_folders

    found, unreadable = listed_model_folders()
    entries = [_entry(name, folder, source) for name, folder, source in found]
    entries += [_stand_in(name) for name in _stand_ins({entry["name"] for entry in entries})]
    for problem in unreadable:  # (the models that folder holds are not listed: said, not hidden)
        print(f"streamgen models: warning: {problem}", file=sys.stderr)
    if args.json:
        print(json.dumps(entries, indent=1))
        return 0
    print(_table(entries))
    return 0


def _stand_ins(listed: set[str]) -> list[str]:
    """The flavors a name loads on seeded random weights, and their teachers (FLAVOR-teacher), where
    no model directory of that name comes first (`load_model`); debug is the tests' own."""
    from streamgen.model.config import FLAVORS

    names = [name + teacher for name in FLAVORS if name != "debug" for teacher in ("", "-teacher")]
    return sorted(name for name in names if name not in listed)


def _entry(name: str, folder: Path, source: str) -> dict:
    """A model directory as model.json and its weights' header say it; `problem` where they do not read."""
    from streamgen.model.files import read_json
    from streamgen.models import MODEL_META_DEFAULTS

    entry = {"name": name, "path": str(folder), "from": source, "flavor": None, "kind": None,
             "height": None, "width": None, "steps": None, "parameters": None,
             "weights_bytes": _bytes_of(folder), "problem": None}  # fmt: skip
    try:
        meta = read_json(folder / "model.json")
        config = meta["config"]
        entry.update(
            flavor=config.get("name"), kind=meta.get("kind"),
            **{key: meta.get(key, MODEL_META_DEFAULTS[key]) for key in ("height", "width", "steps")},
            parameters=_parameters_in(folder / "dit.safetensors"),
        )  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        entry["problem"] = f"its files do not read: {e}"
    return entry


def _stand_in(name: str) -> dict:
    import torch

    from streamgen.model.model import DiT
    from streamgen.models import get_config, model_kind, model_settings

    settings, kind, flavor = model_settings(name), model_kind(name), name.removesuffix("-teacher")
    with torch.device("meta"):  # (its shapes alone: 14B parameters are not made to be counted)
        parameters = sum(p.numel() for p in DiT(get_config(flavor)).parameters())
    what = "a flavor's teacher" if kind == "teacher" else "a flavor"
    return {"name": name, "path": None, "from": f"{what} on seeded random weights (no trained model)",
            "flavor": flavor, "kind": kind, "height": settings["height"], "width": settings["width"],
            "steps": settings["steps"], "parameters": parameters, "weights_bytes": None,
            "problem": None}  # fmt: skip


def _parameters_in(weights: Path) -> int:
    """The number of values in a safetensors file, from its header alone (a model of 14B
    parameters is not read to count them)."""
    with open(weights, "rb") as f:
        start = f.read(8)
        if len(start) < 8:  # (struct.error, no ValueError: a traceback where its file was cut short)
            raise ValueError(f"{weights}: {len(start)} bytes is no safetensors header")
        (length,) = struct.unpack("<Q", start)
        if length > 100 * 2**20:
            raise ValueError(f"{weights}: a header of {length} bytes is no safetensors header")
        header = json.loads(f.read(length))
    total = 0
    for key, tensor in header.items():
        if key != "__metadata__":
            count = 1
            for n in tensor["shape"]:
                count *= n
            total += count
    return total


def _bytes_of(folder: Path) -> int | None:
    try:
        return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    except OSError:
        return None


def _table(entries: list[dict]) -> str:
    head = ("MODEL", "FLAVOR", "KIND", "SIZE", "STEPS", "PARAMETERS", "ON DISK", "FROM")
    rows = [head]
    for e in entries:
        size = f"{e['height']}x{e['width']}" if e["height"] else "-"
        where = e["from"] + (f": {e['path']}" if e["path"] else "")
        if e["problem"]:
            rows.append((e["name"], "-", "-", "-", "-", "-", _amount(e["weights_bytes"], "B"), f"{where} ({e['problem']})"))
            continue
        rows.append((e["name"], e["flavor"] or "-", e["kind"] or "-", size, str(e["steps"]),
                     _amount(e["parameters"], ""), _amount(e["weights_bytes"], "B"), where))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(head) - 1)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[-1]
                     for row in rows)  # fmt: skip


def _amount(n: int | None, unit: str) -> str:
    """`n` bytes ("8.7 MB") or parameters ("1.6B", unit "") in a few digits."""
    if n is None:
        return "-"
    prefixes = ((1e9, "G"), (1e6, "M"), (1e3, "k")) if unit else ((1e9, "B"), (1e6, "M"), (1e3, "k"))
    for scale, prefix in prefixes:
        if n >= scale:
            return f"{n / scale:.1f} {prefix}{unit}" if unit else f"{n / scale:.1f}{prefix}"
    return f"{n} {unit}" if unit else str(n)
