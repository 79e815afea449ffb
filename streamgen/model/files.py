"""Writing weight files whole or not at all; reading them (and their JSON) with errors that name
the file."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable
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


def write_atomically(path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` writes the file to the path `tmp`, a new file beside `path`, which is then
    fsynced and renamed over `path`: a kill, a full disk or a power cut during a re-export leaves
    the previous file as it was, not a truncated one that the directory's model.json still points
    to. Each call has a temp file of its own: two exports into one directory wrote (and renamed
    away) each other's. On any error the temp file is removed and `path` is untouched."""
    path = Path(path)
    tmp = _new_file_beside(path)
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDWR)  # (fsync needs a writable descriptor on some systems)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_folder(path.parent)


def write_text_atomically(path, text: str) -> None:
    write_atomically(path, lambda tmp: tmp.write_text(text))


def _new_file_beside(path: Path) -> Path:
    """A new empty file of a name no other writer has, in `path`'s folder (a rename is atomic
    within one file system only). mkstemp's way (O_EXCL), but with open()'s permissions, by the
    umask: mkstemp's 0600 would make an exported model unreadable to a server run as another user."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


def _fsync_folder(folder: Path) -> None:
    """Makes the rename itself durable; skipped where a folder cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_safetensors(tensors: dict[str, torch.Tensor], path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file, whole or not at all (`write_atomically`)."""
    from safetensors.torch import save_file

    write_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
