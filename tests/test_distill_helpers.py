"""Shared helpers for the distill tests: run a stage's debug config in-process."""

from __future__ import annotations

from pathlib import Path

import torch

from distill.config import find_config, load_config
from distill.trainer import Trainer
from streamgen.checkpoint import latest_checkpoint, load_checkpoint


def debug_config(stage: str, out: Path, teacher: Path | None = None, init: Path | None = None, **edits):
    """The stage's debug config with its paths pointed into a test folder.

    edits: "section.key" -> value, e.g. {"run.steps": 2}.
    """
    cfg = load_config(find_config("debug", stage), stage)
    cfg.run.out = str(out)
    if teacher is not None:
        cfg.options.teacher = str(teacher)
    if init is not None:
        cfg.model.init = str(init)
    for key, value in edits.items():
        section, name = key.split(".")
        target = cfg.options if section == stage else getattr(cfg, section)
        setattr(target, name, value)
    return cfg


def run(cfg, resume: bool = False, stop_after: int | None = None) -> dict:
    return Trainer(cfg, resume=resume, stop_after=stop_after).run()


def final_tensors(out: Path) -> dict[str, torch.Tensor]:
    return checkpoint_tensors(latest_checkpoint(out))


def checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The weights, EMA and optimizer state a checkpoint file holds."""
    tensors, _ = load_checkpoint(path)
    return {k: v for k, v in tensors.items() if k.startswith(("module/", "ema/", "optim/"))}


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in a)
