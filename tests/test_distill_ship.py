"""distill.ship: a trained model made compact and found by name, and the folders it refuses."""

from __future__ import annotations

import os

import pytest
import torch
from distill_pipeline import train_pipeline
from test_distill_helpers import debug_config, run


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A debug teacher and its ODE-initialised student (each a few steps), shared by the tests."""
    return train_pipeline(tmp_path_factory.mktemp("pipeline"))


def test_ship_writes_a_compact_model_found_by_name(tmp_path, pipeline, monkeypatch):
    from distill.ship import ship
    from streamgen.models import load_model

    dst = ship(str(pipeline["student"]), "tiny-test", assets=tmp_path)
    monkeypatch.setenv("STREAMGEN_MODELS", str(tmp_path))
    model = load_model("tiny-test")
    assert (
        model.trained
        and model.meta["kind"] == "student-ode"
        and model.dit.blocks[0].ffn.up.weight.dtype == torch.float32
    )
    from safetensors.torch import load_file

    assert load_file(str(dst / "dit.safetensors"))["head.proj.weight"].dtype == torch.float16
    shipped_vae = load_file(str(dst / "vae.safetensors"))
    assert (
        shipped_vae["dec_in.weight"].dtype == torch.float16
        and shipped_vae["latent_std"].dtype == torch.float32
    )
    trained = load_model(str(pipeline["student"])).vae
    assert model.vae.dec_in.weight.dtype == torch.float32  # upcast on load
    assert torch.allclose(model.vae.dec_in.weight, trained.dec_in.weight, rtol=1e-3, atol=1e-4)
    assert torch.equal(model.vae.latent_std, trained.latent_std)


def test_ship_keeps_the_tiny_decoder_a_model_decodes_through(tmp_path, pipeline, capsys):
    """Ship loaded TinyCausalVAE alone: a tiny decoder beside it was left behind without a word
    (the shipped model decoded with the full decoder)."""
    import shutil

    from distill.ship import main, ship
    from streamgen.model.tiny_decoder import TinyDecoder, TinyDecoderConfig
    from streamgen.models import load_model

    src = tmp_path / "src"
    shutil.copytree(pipeline["student"], src)
    decoder_cfg = TinyDecoderConfig(latent_channels=4, widths=(16, 8, 8, 8), blocks_per_stage=1,
                                    time_upscale=(False, True, True), space_upscale=(True, False, False))  # fmt: skip
    TinyDecoder(decoder_cfg).save(src / "tiny_decoder.safetensors")
    dst = ship(str(src), "with-tiny-decoder", assets=tmp_path / "assets")
    assert (dst / "tiny_decoder.safetensors").exists()
    assert type(load_model(str(dst)).vae) is type(load_model(str(src)).vae)
    with pytest.raises(SystemExit) as exited:  # one line, not a traceback
        main([str(tmp_path / "nothing"), "x"])
    err = capsys.readouterr().err  # (named as it is run: it said 'ship.py: error')
    assert exited.value.code == 2 and "is not a model directory" in err and err.startswith("python -m distill.ship:")


def test_ship_of_an_unfinished_run_or_a_run_folder_says_what_to_do(tmp_path, pipeline, capsys):
    """A run killed before its export (or still training) has no model.json: ship said "not a
    model directory" and no more, for a run's folder given in place of its model/ too."""
    from distill.ship import main

    run(debug_config("teacher", tmp_path / "t"), stop_after=2)
    for given in (tmp_path / "t", tmp_path / "t" / "model"):
        with pytest.raises(SystemExit) as exited:
            main([str(given), "tiny-test"])
        err = capsys.readouterr().err
        assert exited.value.code == 2 and len(err.strip().splitlines()) == 1, err
        assert f"{tmp_path / 't'} holds a teacher run that has exported no model yet" in err
        assert "step-00000002.safetensors" in err and f"--out {tmp_path / 't'} --resume" in err
    with pytest.raises(SystemExit):
        main([str(pipeline["root"] / "ode"), "tiny-test"])
    assert f"the model of the run in {pipeline['root'] / 'ode'} is " in capsys.readouterr().err
    run(debug_config("autoencoder", tmp_path / "ae"))  # (finished: its export is an autoencoder)
    with pytest.raises(SystemExit):
        main([str(tmp_path / "ae" / "model"), "tiny-test"])
    assert "is the autoencoder stage's export, not a model to ship" in capsys.readouterr().err


def test_ship_onto_a_full_disk_is_one_line(tmp_path, pipeline, monkeypatch, capsys):
    import errno

    from distill.ship import main
    from streamgen import model_export, models

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(models, "MODELS_DIR", tmp_path)
    monkeypatch.setattr(model_export, "write_model_dir", full_disk)
    with pytest.raises(SystemExit) as exited:
        main([str(pipeline["student"]), "tiny-test"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "cannot write the model tiny-test: No space left on device" in err
    assert len(err.strip().splitlines()) == 1, err


def test_ship_of_a_run_trained_on_past_its_export_says_so(tmp_path, monkeypatch, capsys):
    """A finished run resumed with more --steps and killed (or training still) keeps its earlier
    export in model/: shipped without a word, it was taken for the newest weights."""
    import json

    from distill.ship import main
    from streamgen import models

    monkeypatch.setattr(models, "MODELS_DIR", tmp_path / "assets")
    out = tmp_path / "t"
    run(debug_config("teacher", out))  # 4 steps, exported
    run(debug_config("teacher", out, **{"run.steps": 8}), resume=True, stop_after=6)
    assert main([str(out / "model"), "tiny-test"]) == 0
    err = capsys.readouterr().err
    assert f"warning: {out / 'model'} holds the model of step 4, while its run trained on to step 6 " in err
    assert "finish the run with --resume" in err
    run(debug_config("teacher", out, **{"run.steps": 8}), resume=True)
    assert main([str(out / "model"), "tiny-test"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert json.loads((tmp_path / "assets" / "tiny-test" / "model.json").read_text())["trained_steps"] == 8


def test_ship_of_a_wan_checkpoint_says_to_distill_it_first(tmp_path, capsys):
    """A diffusers Wan2.1 folder given to ship said "not a model directory (no model.json)" and no
    more, as if the folder were wrong, where `streamgen generate` says to distill a model from it."""
    from distill.ship import main

    wan = tmp_path / "Wan2.1-T2V-1.3B-Diffusers"
    (wan / "transformer").mkdir(parents=True)
    (wan / "model_index.json").write_text('{"_class_name": "WanPipeline"}')
    (wan / "transformer" / "config.json").write_text('{"_class_name": "WanTransformer3DModel"}')
    for given in (wan, wan / "transformer"):
        with pytest.raises(SystemExit) as exited:
            main([str(given), "tiny-test"])
        err = capsys.readouterr().err
        assert exited.value.code == 2 and len(err.strip().splitlines()) == 1, err
        assert "is a diffusers Wan2.1 checkpoint: distill a model from it first" in err
        assert f"model.init: wan:{given}" in err
