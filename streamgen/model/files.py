"""Writing weight files whole or not at all; reading them (and their JSON) with errors that name
the file."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

# (written whole or not at all by streamgen.files, which the dataset code uses without torch;
# imported from here by the model code and older callers)
from streamgen.files import write_atomically as write_atomically
from streamgen.files import write_text_atomically as write_text_atomically


def check_readable(path) -> None:
    """FileNotFoundError where `path` is not there; a ValueError saying why where it is but cannot be
    read (safetensors said "No such file or directory" of a file it may not read, a folder, a
    symbolic link's loop; a JSON file's PermissionError was a traceback)."""
    try:
        with open(path, "rb"):
            pass
    except FileNotFoundError:
        raise
    except OSError as e:
        raise ValueError(f"{path}: cannot read it ({e.strerror or e})") from None


# who is shown the bytes of the weight files loaded while it watches (`watching_loads`): the
# distillation trainer's digests of its model sources, which read a Wan checkpoint's GBs a second time
_LOAD_WATCHERS: list = []


@contextlib.contextmanager
def watching_loads(watcher):
    """While inside, `watcher.saw(path, data)` is called with the bytes of each weight file
    `watcher.wants(path)` that `load_safetensors` (or another loader through `show_loaded`) loads:
    those files are read whole into memory once, their tensors made from those bytes."""
    _LOAD_WATCHERS.append(watcher)
    try:
        yield watcher
    finally:
        _LOAD_WATCHERS.remove(watcher)


def load_watched(path) -> bool:
    """Whether a watcher wants the bytes of the weight file `path` as it is loaded."""
    return any(w.wants(Path(path)) for w in _LOAD_WATCHERS)


def show_loaded(path, data: bytes) -> None:
    """Show the bytes `data` a weight file `path` was loaded from to the watchers that want them."""
    for watcher in _LOAD_WATCHERS:
        if watcher.wants(Path(path)):
            watcher.saw(Path(path), data)


def load_safetensors(path) -> dict[str, torch.Tensor]:
    """safetensors' load_file; a file it cannot read (truncated, not safetensors) is a ValueError
    naming it (safetensors' own error named no file and escaped every command's handling)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    check_readable(path)
    if load_watched(path):  # (from the bytes the watchers are shown: one read of the file)
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise ValueError(f"{path}: cannot read it ({e.strerror or e})") from None
        show_loaded(path, data)
        return load_safetensors_from_bytes(data, path)
    try:
        return load_file(str(path))
    except SafetensorError as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


def load_safetensors_from_bytes(data: bytes, path) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file `path` from its bytes `data` (read once: for a digest
    of the very bytes loaded), or a ValueError naming it, as `load_safetensors`."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        return load(data)
    except SafetensorError as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


def load_safetensors_and_metadata(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and the metadata of one safetensors file, read through one open of it: a file
    renamed over it meanwhile (a re-export) cannot give the tensors of one and the metadata of the
    other. A file it cannot read is a ValueError naming it, as `load_safetensors`."""
    from safetensors import SafetensorError, safe_open

    check_readable(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except SafetensorError as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


def read_safetensors_metadata(path) -> dict[str, str]:
    """The metadata of a safetensors file, from its header alone (no tensor is read); a ValueError
    naming a file it cannot read, as `load_safetensors`."""
    from safetensors import SafetensorError, safe_open

    check_readable(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except SafetensorError as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


def non_finite_tensor(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor in `tensors` holding a NaN or an infinity, or None.
    One min/max pass per tensor (both are NaN where it holds one): about a nanosecond a weight on a
    CPU core, a tenth of isfinite's pass, with no sum to overflow float16 (which read as infinite)."""
    for name, t in tensors.items():
        if not t.is_floating_point() or t.numel() == 0:
            continue
        low, high = torch.aminmax(t.float() if t.element_size() == 1 else t)  # (float8 has no aminmax)
        if not (torch.isfinite(low) and torch.isfinite(high)):
            return name
    return None


def read_json(path, required: tuple[str, ...] = ()) -> dict:
    """A JSON object from `path`, with the keys in `required`, or a ValueError naming the file."""
    check_readable(path)
    value = json_object(Path(path).read_bytes(), f"{path}:")
    missing = [key for key in required if key not in value]
    if missing:
        raise ValueError(f"{path}: no {missing[0]!r} in it")
    return value


def json_object(text: str | bytes, where: str) -> dict:
    """`text` as a JSON object, or a ValueError that begins with `where` (what holds it: "FILE:",
    "FILE: its KEY is"). Valid JSON of another kind was a TypeError further on, naming nothing."""
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{where} not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{where} not a JSON object")
    return value


def save_safetensors(tensors: dict[str, torch.Tensor], path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file, whole or not at all (`write_atomically`)."""
    from safetensors.torch import save_file

    write_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
