"""Training checkpoints (the distill stages', `eval train-evaluators`'): one safetensors file per
saved step, written atomically.

    OUT/checkpoints/step-00000500.safetensors

A file holds every tensor needed to continue exactly where training stopped:
module weights (`module/<name>/...`), EMA weights (`ema/<name>/...`), optimizer
state (`optim/<name>/<param index>/<key>`) and the torch RNG states
(`rng/...`); the rest (step, optimizer hyper-parameters, Python and NumPy RNG,
the model configs, the config file) is JSON in the safetensors metadata.

Atomic: the bytes go to a hidden temp file of this save's own in the same folder,
are fsynced, and only then renamed over the final name
(`streamgen.files.write_atomically`), so a crash or a full disk mid-save leaves
the previous checkpoint as the newest complete one.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from streamgen.files import write_atomically

PREFIX = "step-"
SUFFIX = ".safetensors"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written, read, or does not match the config."""


def checkpoint_dir(out) -> Path:
    return Path(out) / "checkpoints"


def checkpoint_path(out, step: int) -> Path:
    return checkpoint_dir(out) / f"{PREFIX}{step:08d}{SUFFIX}"


def checkpoint_step(path) -> int | None:
    """The step in a checkpoint's file name (None: not a checkpoint's name)."""
    digits = Path(path).name.removeprefix(PREFIX).removesuffix(SUFFIX)
    return int(digits) if digits.isascii() and digits.isdigit() else None


def list_checkpoints(out) -> list[Path]:
    """The checkpoints in `out`, oldest first: by step, not by name (8 digits of zero padding
    stop sorting by name at step 10^8, where the names grow a digit)."""
    d = checkpoint_dir(out)
    if not d.exists():
        return []
    found = [p for p in d.glob(f"{PREFIX}*{SUFFIX}") if checkpoint_step(p) is not None]
    return sorted(found, key=lambda p: (checkpoint_step(p), p.name))


def latest_checkpoint(out) -> Path | None:
    found = list_checkpoints(out)
    return found[-1] if found else None


def newest_readable_checkpoint(out) -> tuple[Path | None, dict, list[tuple[Path, str]]]:
    """The newest checkpoint in `out` whose header reads, its metadata, and the newer ones that do
    not, each with why. A save is atomic, so an unreadable file is one damaged later (a disk
    error, a copy cut short); the step before it is the run's newest state. (None, {}, damaged)
    when none reads; (None, {}, []) when there is none."""
    damaged = []
    for path in reversed(list_checkpoints(out)):
        try:
            return path, checkpoint_header(path), damaged
        except CheckpointError as e:
            damaged.append((path, str(e)))
    return None, {}, damaged


DAMAGED_SUFFIX = ".damaged"


def set_aside(path: Path) -> Path:
    """Rename a damaged checkpoint out of the run's list (kept to be looked at, never resumed or
    counted by the pruning); another rank may have done it already."""
    aside = path.with_name(path.name + DAMAGED_SUFFIX)
    try:
        path.replace(aside)
    except FileNotFoundError:
        pass
    return aside


# --- packing state into tensors + metadata ------------------------------------------


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng/cuda"] = torch.cuda.get_rng_state()
    py = random.getstate()
    np_state = np.random.get_state()
    meta = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["rng/torch"])
    if "rng/cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng/cuda"])
    py = meta["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npy = meta["numpy"]
    np.random.set_state((npy[0], np.array(npy[1], dtype=np.uint32), *npy[2:]))


def optimizer_tensors(name: str, opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim/{name}/{idx}/{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}/{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer(name: str, opt: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict[int, dict] = {}
    prefix = f"optim/{name}/"
    for key, value in tensors.items():
        if key.startswith(prefix):
            idx, k = key[len(prefix) :].split("/", 1)
            state.setdefault(int(idx), {})[k] = value
    for key, value in meta["scalars"].items():
        idx, k = key.split("/", 1)
        state.setdefault(int(idx), {})[k] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


# --- writing and reading ------------------------------------------------------------------


def _write_bytes(path: Path, data: bytes) -> None:
    """(A seam for tests that simulate a full disk.)"""
    with open(path, "wb") as f:
        f.write(data)


def save_checkpoint(out, step: int, tensors: dict[str, torch.Tensor], meta: dict, keep: int = 3) -> Path:
    """Write step's checkpoint atomically and prune all but the newest `keep`."""
    from safetensors.torch import save

    final = checkpoint_path(out, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    previous = latest_checkpoint(out)
    try:
        data = save(
            {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
            metadata={"streamgen": json.dumps({**meta, "step": step})},
        )
        # a temp file of this save's own, removed on any error: its fixed name was shared by two
        # saves of one step, and a KeyboardInterrupt mid-save left it behind
        write_atomically(final, lambda tmp: _write_bytes(tmp, data))
    except OSError as e:
        kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
        raise CheckpointError(
            f"could not save the checkpoint of step {step} ({e.strerror or e}); {kept}"
        ) from None
    for old in list_checkpoints(out)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return final


def load_checkpoint(path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("streamgen", "null"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from None
    except Exception as e:  # safetensors raises its own error type for corrupt headers
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} is not a streamgen training checkpoint (no metadata)")
    return tensors, meta


def checkpoint_header(path) -> dict:
    """A checkpoint's metadata (stage, step, settings, ...) from its header alone, no tensors read;
    {} for a safetensors file that is not a streamgen training checkpoint."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("streamgen", "null"))
    except Exception as e:  # safetensors raises its own error type for corrupt headers
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from None
    return meta if isinstance(meta, dict) else {}


def module_tensors(prefix: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {f"{prefix}/{k}": v for k, v in module.state_dict().items()}


def load_module(prefix: str, module: torch.nn.Module, tensors: dict, path) -> None:
    sd = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + "/")}
    try:
        module.load_state_dict(sd)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise CheckpointError(f"checkpoint {path} does not match the model of this config: {first}") from None


def config_mismatch(saved: dict, current: dict) -> list[str]:
    """Model-config keys whose values differ between a checkpoint and the config."""
    diffs = []
    for name in sorted(set(saved) | set(current)):
        a, b = saved.get(name), current.get(name)
        if a is None or b is None:
            diffs.append(f"{name}: {'missing in checkpoint' if a is None else 'not in this config'}")
            continue
        for key in sorted(set(a) | set(b)):
            if key == "name":
                continue
            va, vb = a.get(key), b.get(key)
            if isinstance(va, list | tuple) and isinstance(vb, list | tuple):
                va, vb = list(va), list(vb)
            if va != vb:
                diffs.append(f"{name}.{key}: checkpoint {va!r}, config {vb!r}")
    return diffs


def overrides_to_match(saved: dict, current: dict, names) -> list[str]:
    """`model.overrides.KEY=VALUE` items (for --set) that give the config's model the checkpoint's
    value of each key that differs, for the models of `names` (those built from the config's
    `model` section); e.g. a Wan checkpoint's audio width, whose default changed since the run began."""
    items = {}
    for name in names:
        a, b = saved.get(name), current.get(name)
        if a is None or b is None:
            continue
        for key in sorted(set(a) & set(b) - {"name"}):
            va, vb = a[key], b[key]
            if isinstance(va, list | tuple) and isinstance(vb, list | tuple):
                va, vb = list(va), list(vb)
            if va != vb:
                items[key] = f"model.overrides.{key}={json.dumps(va)}"
    return list(items.values())
