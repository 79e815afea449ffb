"""The models a stage reads (model.init, the teacher, model.vae): what it says of a folder that is none."""

from __future__ import annotations

import shutil

import pytest
from test_distill_helpers import debug_config, run

from distill.build import ModelSourceError, load_dit, load_vae


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """The autoencoder's and the tiny decoder's exports, each a finished run of one step."""
    root = tmp_path_factory.mktemp("exports")
    for stage in ("autoencoder", "tiny_decoder"):
        run(debug_config(stage, root / stage, **{"run.steps": 1}))
    return root


@pytest.mark.parametrize("moved", [False, True])
def test_an_autoencoder_given_as_a_model_is_said_to_be_one(exports, tmp_path, moved):
    """A finished autoencoder run's model/ given as model.init (or a teacher) was "a run that has
    exported no model yet ...: finish it with --resume", which only exported it again; copied away
    from its run, "train the stage that makes it first"."""
    folder = exports / "autoencoder" / "model"
    if moved:
        folder = shutil.copytree(folder, tmp_path / "vae")
    with pytest.raises(ModelSourceError) as refused:
        load_dit(str(folder))
    assert str(refused.value) == (
        f"{str(folder)!r} is not a model directory (no model.json); it is an autoencoder (the autoencoder "
        "stage's export), not a model: an autoencoder is model.vae"
    )


@pytest.mark.parametrize("key", ["model.init", "model.vae"])
def test_a_tiny_decoder_given_as_a_model_or_autoencoder_is_said_to_be_one(exports, key):
    folder = exports / "tiny_decoder" / "model"
    cfg = debug_config("teacher", exports / "unused", **{key: str(folder)})
    with pytest.raises(ModelSourceError) as refused:
        load_dit(cfg.model.init) if key == "model.init" else load_vae(cfg.model, 4, 4, 0)
    said = str(refused.value)
    assert said.endswith(
        "; it holds a tiny decoder (the tiny_decoder stage's export), not a model: a tiny decoder decodes "
        "a model's latents, from that model's directory (docs/distill.md)"
    ), said
    assert "--resume" not in said
