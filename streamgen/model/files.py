"""Writing weight files whole or not at all."""

from __future__ import annotations

import os
from pathlib import Path

import torch


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
