"""`streamgen bench decoder`'s refusals."""


def test_a_decoder_of_other_latents_is_refused_in_one_line(capsys):
    # --against a model whose decoder takes other latents was a SystemExit: exit 1, the line
    # without the command's name
    from streamgen.cli import main

    argv = ["bench", "decoder", "--json", "--model", "debug", "--against", "tiny-avatar", "--sizes", "32"]
    assert main(argv) == 2
    (line,) = [x for x in capsys.readouterr().err.strip().splitlines() if "no trained weights" not in x]
    assert line.startswith(
        "streamgen bench decoder: error: --against tiny-avatar: its decoder takes 16 latent channels"
    )


def test_a_flavors_decoder_is_timed_without_building_its_dit(monkeypatch):
    # `--model wan2.1-1.3b` built the whole random 1.3B-parameter DiT only to time the decoder
    import streamgen.models
    from bench.decoder import run

    def no_dit(*args, **kwargs):
        raise AssertionError("the DiT was built")

    monkeypatch.setattr(streamgen.models, "DiT", no_dit)
    result = run("wan2.1-1.3b", sizes=(32,), rounds=1)
    (size,) = result["sizes"]
    assert size["latent_frames"] == 3 and size["frames"] == 12  # the flavor's chunk
    assert size["phase_conv"]["ms_median"] > 0


def test_a_trained_models_decoder_is_read_from_its_directory(monkeypatch):
    import streamgen.models
    from bench.decoder import _load_tiny_vae
    from streamgen.model.vae import TinyCausalVAE
    from streamgen.models import load_model, resolve_model_dir

    if resolve_model_dir("tiny-avatar") is None:
        import pytest

        pytest.skip("no trained tiny-avatar here")
    trained = load_model("tiny-avatar").vae
    monkeypatch.setattr(streamgen.models, "DiT", None)  # (not built)
    vae, frames_per_chunk = _load_tiny_vae("tiny-avatar")
    assert isinstance(vae, TinyCausalVAE) and frames_per_chunk == 2
    assert all((a == b).all() for a, b in zip(vae.state_dict().values(), trained.state_dict().values()))
