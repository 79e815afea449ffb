"""The distillation stages over a real (tiny) avatar world: the latents stage, and resumes that
would read other data than the checkpoint's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distill.config import find_config, load_config


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from streamgen.data.shards import make_dataset

    root = tmp_path_factory.mktemp("world") / "world"
    make_dataset(root, 4, 0, 32, 32, 1.0, 4, 50, 1)  # 4 clips of 1 s at 32x32: one shard per split
    return root


@pytest.fixture(scope="module")
def autoencoder(tmp_path_factory):
    from streamgen.model.vae import TinyCausalVAE

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("autoencoder")
    TinyCausalVAE(4, (8, 16), 4).save(folder)
    return folder


def latents_config(root, vae, name="dbg", splits=("train", "test")):
    cfg = load_config(find_config("tiny-avatar", "latents"), "latents")
    cfg.data.root, cfg.data.latents, cfg.model.flavor, cfg.model.vae = str(root), name, "debug", str(vae)
    cfg.run.threads = 0
    cfg.options.splits = list(splits)
    return cfg


def test_the_latents_stage_hashes_each_shard_once(world, autoencoder, tmp_path, monkeypatch):
    """build_latents made the split's dataset twice (to encode it, then to read its latents), and
    each hashed every shard: 7 ms per 9 MB shard, twice."""
    import shutil

    from distill.latents import build_latents
    from streamgen.data import shards

    root = tmp_path / "world"
    shutil.copytree(world, root)
    hashed = []
    real = shards._sha256
    monkeypatch.setattr(shards, "_sha256", lambda path: hashed.append(Path(path).name) or real(path))
    banks = build_latents(latents_config(root, autoencoder))
    assert len(banks) == 2
    assert sorted(hashed) == ["shard-00000.npz", "shard-00000.npz"]  # train's and test's, once each
    hashed.clear()
    assert build_latents(latents_config(root, autoencoder)) == banks  # all cached: still checked, once
    assert len(hashed) == 2
