"""`--sp N` that cannot shard the model: refused before the relaunch, from the model's settings.

Each of N processes used to load the model before one said so (20-30 s for tiny-avatar's --sp 3).
No test here starts a process: the relaunch fails the test where it must not come.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from streamgen.models import MODELS_DIR, model_shape
from streamgen.parallel import launch

ROOT = Path(__file__).resolve().parents[1]
TOKENS_NOT_DIVISIBLE = "sequence parallelism over {n} processes needs the tokens per latent frame ({s}) to be divisible by {n}"  # noqa: E501


class Relaunched(Exception):
    pass


@pytest.fixture
def launcher(monkeypatch):
    """This process as a user's shell starts it; a relaunch raises Relaunched, a model load fails."""

    def relaunch(nproc, argv=None, module="streamgen.cli", device="cpu", model=None):
        raise Relaunched(nproc)

    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(launch, "relaunch_under_torchrun", relaunch)
    monkeypatch.setattr("streamgen.models.load_model", load_model)
    monkeypatch.setattr(sys, "argv", ["streamgen"])
    for name in ("TORCHELASTIC_RUN_ID", "LOCAL_RANK", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)


def _argv(command, tmp_path, *options):
    where = ["--out", str(tmp_path / "a.mp4")] if command == "generate" else ["--port", "0"]
    return [command, *where, *options]


def _size(command, size):
    return ["--height", str(size), "--width", str(size)] if command == "generate" else ["--size", str(size)]


@pytest.mark.parametrize("command", ["generate", "serve"])
@pytest.mark.parametrize(
    "model, size, tokens",
    [("tiny-avatar", None, 16), ("tiny-avatar", 128, 64), ("debug", None, 16), ("wan2.1-1.3b", None, 64)],
)
def test_an_sp_that_does_not_divide_a_frame_is_refused_before_the_relaunch(
    command, model, size, tokens, launcher, tmp_path, capsys
):
    options = ["--model", model, "--sp", "3", *(_size(command, size) if size else [])]
    from streamgen import cli

    assert cli.main(_argv(command, tmp_path, *options)) == 2
    err = capsys.readouterr().err
    assert TOKENS_NOT_DIVISIBLE.format(n=3, s=tokens) in err and err.count("\n") == 1, err


@pytest.mark.parametrize("command", ["generate", "serve"])
@pytest.mark.parametrize("sp, size", [(2, None), (4, 128), (3, 96)])
def test_an_sp_that_divides_a_frame_still_relaunches(command, sp, size, launcher, tmp_path):
    from streamgen import cli

    options = ["--model", "tiny-avatar", "--sp", str(sp), *(_size(command, size) if size else [])]
    with pytest.raises(Relaunched):
        cli.main(_argv(command, tmp_path, *options))


def test_generate_takes_height_and_width_apart(launcher, tmp_path, capsys):
    """48x128: 3 x 8 patches of 16 pixels, 24 tokens: --sp 2 divides them, --sp 16 does not."""
    from streamgen import cli

    with pytest.raises(Relaunched):
        cli.main(_argv("generate", tmp_path, "--sp", "2", "--height", "48", "--width", "128"))
    assert cli.main(_argv("generate", tmp_path, "--sp", "16", "--height", "48", "--width", "128")) == 2
    assert TOKENS_NOT_DIVISIBLE.format(n=16, s=24) in capsys.readouterr().err


def test_heads_a_forced_ulysses_split_cannot_make_are_refused():
    with pytest.raises(ValueError, match=r"number of attention heads \(2\) to be divisible by the Ulysses degree \(4\)"):
        launch.check_sequence_parallel(4, "tiny-avatar", None, None, mode="ulysses")
    launch.check_sequence_parallel(4, "tiny-avatar", None, None)  # auto: Ulysses 2 x ring 2


def _model_dir(tmp_path, vae_config: dict | None = None, wan_config: dict | None = None) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    shutil.copy(MODELS_DIR / "tiny-avatar" / "model.json", d / "model.json")
    save_file({"x": torch.zeros(1)}, str(d / "vae.safetensors"))  # an older export's: no config inside
    if vae_config is not None:
        (d / "vae_config.json").write_text(json.dumps(vae_config))
    if wan_config is not None:
        (d / "wan_vae").mkdir()
        (d / "wan_vae" / "config.json").write_text(json.dumps(wan_config))
    return d


def test_the_spatial_factor_is_the_model_directorys_autoencoders(tmp_path):
    """tiny-avatar's DiT at 64x64 behind an autoencoder of 3 scales (/4): 8 x 8 tokens, not 4 x 4."""
    d = _model_dir(tmp_path, vae_config={"widths": [32, 64, 96]})
    assert model_shape(str(d))[1] == 4
    with pytest.raises(ValueError, match=r"latent frame \(64\) to be divisible by 3"):
        launch.check_sequence_parallel(3, str(d), None, None)
    assert model_shape(str(MODELS_DIR / "tiny-avatar"))[1] == 8  # from the weights' own config


def test_a_wan_autoencoders_factor_and_files_that_do_not_say_it(tmp_path):
    (tmp_path / "wan").mkdir()
    d = _model_dir(tmp_path / "wan", vae_config={"widths": [32, 64]}, wan_config={"dim_mult": [1, 2, 4, 4]})
    assert model_shape(str(d))[1] == 8  # wan_vae/ decides, as the loader takes it
    (d / "wan_vae" / "config.json").write_text("{}")
    assert model_shape(str(d)) is None
    launch.check_sequence_parallel(3, str(d), None, None)  # unknown: the processes' own checks say
    d = _model_dir(tmp_path)  # no autoencoder config at all
    assert model_shape(str(d)) is None
    assert model_shape(str(tmp_path / "none")) is None


def test_generate_sp_of_a_teacher_is_refused_before_the_relaunch(launcher, tmp_path, capsys):
    """A teacher (model.json's kind) runs in one process: 2 processes each loaded it to say so."""
    from streamgen import cli

    assert cli.main(_argv("generate", tmp_path, "--model", "tiny-avatar-teacher", "--sp", "2")) == 2
    assert "--sp applies to streaming students; a teacher runs in one process" in capsys.readouterr().err
    from streamgen.models import model_kind

    assert model_kind("tiny-avatar") == "student" and model_kind("debug") is None


def test_generate_sp_of_an_unknown_model_is_refused_before_the_relaunch(launcher, tmp_path, capsys):
    from streamgen import cli

    assert cli.main(_argv("generate", tmp_path, "--model", str(tmp_path / "none"), "--sp", "2")) == 2
    assert "no model directory" in capsys.readouterr().err


def test_generate_sp_with_a_bad_tiny_decoder_is_refused_before_the_relaunch(launcher, tmp_path, capsys):
    from streamgen import cli

    missing, folder = tmp_path / "none.safetensors", tmp_path
    for checkpoint, line in ((missing, "no tiny decoder checkpoint at"), (folder, "is not a file")):
        assert cli.main(_argv("generate", tmp_path, "--sp", "2", "--tiny-decoder", str(checkpoint))) == 2
        assert line in capsys.readouterr().err
    from streamgen.model.tiny_decoder import TinyDecoder, TinyDecoderConfig

    # one that does not fit tiny-avatar's autoencoder (4 latent channels, not 16): each process said
    # so once it had loaded the whole model; its autoencoder alone is loaded to say it before
    small = dict(widths=(8, 8, 8, 8), blocks_per_stage=1)
    TinyDecoder(TinyDecoderConfig(latent_channels=4, **small)).save(tmp_path / "other.safetensors")
    assert cli.main(_argv("generate", tmp_path, "--sp", "2", "--tiny-decoder", str(tmp_path / "other.safetensors"))) == 2
    assert "does not fit the autoencoder's latents: latent channels 4 != 16" in capsys.readouterr().err
    TinyDecoder(TinyDecoderConfig(latent_channels=16, **small)).save(tmp_path / "good.safetensors")
    with pytest.raises(Relaunched):
        cli.main(_argv("generate", tmp_path, "--sp", "2", "--tiny-decoder", str(tmp_path / "good.safetensors")))


@pytest.mark.parametrize("sp", ["1", "2"])
def test_serve_of_a_teacher_is_refused_before_anything_starts(sp, launcher, monkeypatch, tmp_path, capsys):
    """uvicorn had started, and the model loaded (in each of --sp N's processes), before the warm-up's
    session said so, with a traceback in the log."""
    from streamgen import cli

    def served(self):
        raise AssertionError("the server started")

    monkeypatch.setattr("server.uvicorn_server.SessionClosingServer.run", served)
    assert cli.main(_argv("serve", tmp_path, "--model", "tiny-avatar-teacher", "--sp", sp)) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.endswith("tiny-avatar-teacher is a bidirectional teacher: it generates whole clips and cannot "
                         "stream; use a distilled student")  # fmt: skip


@pytest.mark.parametrize("sp", ["1", "2"])
def test_generate_of_last_step_with_one_step_is_refused_before_the_model_loads(sp, launcher, tmp_path, capsys):
    """It was said by the session, once the model had loaded (in each of --sp N's processes)."""
    from streamgen import cli

    argv = _argv("generate", tmp_path, "--model", "debug", "--sp", sp, "--cache-from", "last_step", "--steps", "1")
    assert cli.main(argv) == 2
    assert "--cache-from last_step needs 2 or more --steps" in capsys.readouterr().err


@pytest.mark.parametrize("flag, asset", [("--audio", "sample_speech.wav"), ("--reference", "sample_face.png")])
def test_generate_sp_of_an_input_from_a_pipe_is_refused_before_the_relaunch(flag, asset, launcher, tmp_path, capsys):
    """Each rank reads --audio and --reference again, after the launcher: from a pipe (stdin, `<(...)`)
    they got nothing ("Invalid data found", "audio file not found: /dev/fd/63"), from a FIFO they waited
    for ever. One process reads a pipe fine."""
    import os
    import threading

    from streamgen import cli

    read_end, write_end = os.pipe()
    data = (ROOT / "streamgen/assets" / asset).read_bytes()

    def write():
        with os.fdopen(write_end, "wb") as f:
            f.write(data)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
        pipe = f"/dev/fd/{read_end}"
        assert cli.main(_argv("generate", tmp_path, "--model", "debug", "--sp", "2", flag, pipe)) == 2
    finally:
        writer.join(10)
        os.close(read_end)
    err = capsys.readouterr().err
    assert f"{flag} {pipe} is not a file (a pipe?): --sp 2 starts 2 processes" in err and err.count("\n") == 1, err
