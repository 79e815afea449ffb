"""A tiny avatar world with the latent banks of two autoencoders and a 1-step teacher trained on
each: what test_distill_data's and test_distill_review3's refusals of a teacher (or critic) of
another latent space read (tests/conftest.py's `teachers_of_two_banks`)."""

from __future__ import annotations

from pathlib import Path

# the teachers' runs (and the stage runs of the tests that read them): one sample a rank, one step
EDITS = {"data.batch_size": 2, "run.steps": 1}


def world_config(stage: str, out: Path, root: Path, **edits):
    """The stage's debug config on the avatar world at `root` (its 32x32 frames)."""
    from test_distill_helpers import debug_config

    return debug_config(stage, out, **{"data.source": "world", "data.root": str(root), "model.height": 32,
                                       "model.width": 32, **edits})  # fmt: skip


def latents_config(root: Path, vae: Path, name="dbg", splits=("train", "test")):
    """The latents stage's config: `vae`'s latents of the world at `root`, named `name`."""
    from distill.config import find_config, load_config

    cfg = load_config(find_config("tiny-avatar", "latents"), "latents")
    cfg.data.root, cfg.data.latents, cfg.model.flavor, cfg.model.vae = str(root), name, "debug", str(vae)
    cfg.run.threads = 0
    cfg.options.splits = list(splits)
    return cfg


def make_teachers_of_two_banks(folder: Path) -> Path:
    """Under `folder`: world/ (4 clips of 1 s at 32x32, one shard per split), autoencoder-dbg (seed
    0) and autoencoder-other (seed 1), the train split's latents of each (named 'dbg' and 'other'),
    and teacher-dbg/model, teacher-other/model trained on them."""
    import torch
    from test_distill_helpers import run

    from distill.latents import build_latents
    from streamgen.data.shards import make_dataset
    from streamgen.model.vae import TinyCausalVAE

    root = folder / "world"
    make_dataset(root, 4, 0, 32, 32, 1.0, 4, 50, 1)
    for seed, latents in enumerate(("dbg", "other")):
        torch.manual_seed(seed)
        autoencoder = folder / f"autoencoder-{latents}"
        TinyCausalVAE(4, (8, 16), 4).save(autoencoder)
        build_latents(latents_config(root, autoencoder, latents, ["train"]))
        run(world_config("teacher", folder / f"teacher-{latents}", root,
                         **{**EDITS, "data.latents": latents, "model.vae": str(autoencoder)}))  # fmt: skip
    return folder
