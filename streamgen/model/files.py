"""Writing weight files whole or not at all; reading them (and their JSON) with errors that name
the file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch


def load_safetensors(path) -> dict[str, torch.Tensor]:
    """safetensors' load_file; a file it cannot read (truncated, not safetensors) is a ValueError
    naming it (safetensors' own error named no file and escaped every command's handling)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except SafetensorError as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


def read_json(path, required: tuple[str, ...] = ()) -> dict:
    """A JSON object from `path`, with the keys in `required`, or a ValueError naming the file."""
    try:
        value = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object")
    missing = [key for key in required if key not in value]
    if missing:
        raise ValueError(f"{path}: no {missing[0]!r} in it")
    return value


def save_safetensors(tensors: dict[str, torch.Tensor], path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file into a temporary file beside `path`, renamed over it when written:
    a kill or a full disk during a re-export leaves the previous file as it was, not a truncated
    one that the directory's model.json still points to."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
