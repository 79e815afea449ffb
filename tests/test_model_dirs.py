"""Model directories with the Wan VAE (and TAEHV's tiny decoder) behind the DiT: what a
distillation that trains with `model.vae: wan:DIR` exports, and every command loads
(`streamgen.models.load_model`). They stream the frames of the model they were saved from."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch
from file_steps import check_after_each_file_step
from server_helpers import free_port

pytest.importorskip("diffusers")

from distill.build import export_model  # noqa: E402
from streamgen.model import DiT, get_config  # noqa: E402
from streamgen.model.tiny_decoder import TinyDecoder, TinyDecoderConfig, TinyDecoderVAE  # noqa: E402
from streamgen.model.wan_vae import WanVAE  # noqa: E402
from streamgen.models import AvatarModel, load_autoencoder, load_model  # noqa: E402
from streamgen.stream import StreamSession  # noqa: E402

HEIGHT, WIDTH = 32, 48


def wan_based_model(tiny_decoder: bool = False) -> AvatarModel:
    """A debug DiT over a small random Wan VAE (latent statistics that are not 0 and 1, so that a
    lost config would show), optionally decoding through a tiny decoder whose config the weights'
    shapes do not tell (its last stage does not upsample; a pixel shuffle does)."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    dit = DiT(get_config("debug", frames_per_chunk=3, window_frames=6, in_channels=4)).eval()
    wan = AutoencoderKLWan(
        base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
        latents_mean=[0.1, -0.2, 0.0, 0.3], latents_std=[1.5, 0.5, 1.0, 2.0],
    )  # fmt: skip
    vae = WanVAE(wan.eval())
    if tiny_decoder:
        cfg = TinyDecoderConfig(
            latent_channels=4, widths=(16, 12, 8, 8), blocks_per_stage=1,
            space_upscale=(True, True, False), patch_size=2,
        )  # fmt: skip
        vae = TinyDecoderVAE(vae, TinyDecoder(cfg).eval())
    return AvatarModel("wan-debug", dit, vae, HEIGHT, WIDTH, shift=5.0, steps=2)


@torch.no_grad()
def stream(model: AvatarModel, chunks: int = 2) -> np.ndarray:
    session = StreamSession(model, steps=2, dtype=torch.float32)
    rng = np.random.default_rng(0)
    session.start((rng.random((HEIGHT, WIDTH, 3)) * 255).astype(np.uint8), seed=0)
    session.push_audio((rng.standard_normal(16000 * 4) * 0.1).astype(np.float32))
    return np.concatenate([session.next_chunk()[0] for _ in range(chunks)])


def export(model: AvatarModel, directory, compact: bool = False):
    return export_model(
        model.dit, model.vae, directory, model.name, model.height, model.width, model.shift, model.steps,
        compact=compact,
    )  # fmt: skip


@pytest.mark.parametrize("tiny_decoder", [False, True], ids=["wan_vae", "tiny_decoder"])
def test_a_wan_based_model_directory_streams_the_frames_of_its_model(tmp_path, tiny_decoder):
    model = wan_based_model(tiny_decoder)
    expected = stream(model)
    loaded = load_model(str(export(model, tmp_path / "model")))
    assert type(loaded.vae) is type(model.vae)
    if tiny_decoder:
        assert isinstance(loaded.vae.vae, WanVAE) and loaded.vae.decoder.cfg == model.vae.decoder.cfg
    wan = loaded.vae.vae if tiny_decoder else loaded.vae
    assert torch.equal(wan.latent_std, (model.vae.vae if tiny_decoder else model.vae).latent_std)
    got = stream(loaded)
    assert got.shape == expected.shape and got.shape[1:] == (HEIGHT, WIDTH, 3)
    assert np.array_equal(got, expected)


def test_a_wan_based_stream_and_its_teacher_time_their_chunks_on_the_audios_timeline():
    """Latent frame l spans video frames [4l, 4l + 4), whose audio it is made from; Wan's first
    latent frame decodes to one frame, the span's last: the stream's first chunk starts at frame
    3, and a file of the chunks holds that frame from time 0 (`from_time_zero`)."""
    from streamgen.media import from_time_zero
    from streamgen.teacher import TeacherSession

    model = wan_based_model()
    assert model.vae.first_frame_index == 3
    session = StreamSession(model, steps=2, dtype=torch.float32)
    session.start(np.zeros((HEIGHT, WIDTH, 3), np.uint8), seed=0)
    session.push_audio(np.zeros(16000, np.float32))
    chunks = [session.next_chunk() for _ in range(3)]
    assert [(len(frames), round(pts * 25)) for frames, pts in chunks] == [(9, 3), (12, 12), (12, 24)]
    whole = from_time_zero(*chunks[0])
    assert len(whole) == 12 and (whole[:4] == chunks[0][0][0]).all()

    teacher = TeacherSession(model, steps=2, window=3, motion=1)
    teacher.start(np.zeros((HEIGHT, WIDTH, 3), np.uint8))
    teacher.push_audio(np.zeros(16000, np.float32))
    first, second = teacher.next_chunk(), teacher.next_chunk()
    assert [(len(frames), round(pts * 25)) for frames, pts in (first, second)] == [(9, 3), (12, 12)]


def test_a_compact_export_loads_in_float32_within_float16s_rounding(tmp_path):
    model = wan_based_model()
    d = export(model, tmp_path / "compact", compact=True)
    vae = load_autoencoder(d)
    assert isinstance(vae, WanVAE) and {p.dtype for p in vae.parameters()} == {torch.float32}
    for (name, got), want in zip(vae.state_dict().items(), model.vae.state_dict().values()):
        torch.testing.assert_close(got, want, atol=2**-24, rtol=2**-11, msg=name)  # fp16: 10 bits


def test_a_directory_without_an_autoencoder_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no autoencoder"):
        load_autoencoder(tmp_path)


def test_distillation_takes_the_autoencoder_of_a_wan_based_model_directory(tmp_path):
    from distill.build import load_vae
    from distill.config import ModelConfigSection

    d = export(wan_based_model(tiny_decoder=True), tmp_path / "model")
    vae = load_vae(ModelConfigSection(vae=str(d)), latent_channels=4, temporal=4, seed=0)
    assert isinstance(vae, TinyDecoderVAE) and not any(p.requires_grad for p in vae.parameters())


def test_the_server_streams_a_wan_based_model_directory(tmp_path):
    """`serve --model DIR` loads it as every command does: a session streams its frames."""
    import json

    from fastapi.testclient import TestClient
    from server_helpers import server_config, wait_ready

    from server.app import create_app
    from server.protocol import HEADER, MsgType

    d = str(export(wan_based_model(tiny_decoder=True), tmp_path / "model"))
    with TestClient(create_app(server_config(model=d), model=load_model(d))) as client:
        wait_ready(client)
        r = client.post("/v1/sessions", json={"avatar": "bo", "seed": 1})
        assert r.status_code == 201, r.text
        s = r.json()
        with client.websocket_connect(f"{s['stream']}?token={s['token']}") as ws:
            ws.send_text(json.dumps({"type": "start", "format": "rgb"}))
            ready = json.loads(ws.receive_text())
            assert (ready["width"], ready["height"]) == (WIDTH, HEIGHT), ready
            frames, video_pts, audio = [], [], []
            while len(frames) < 12:  # the first chunk (9 frames: Wan's 1 + 4k) and more
                data = ws.receive().get("bytes")
                if data is None:
                    continue
                kind, _, _, _, pts_us = HEADER.unpack_from(data)
                if kind == MsgType.VIDEO_RGB:
                    frames.append(np.frombuffer(data[HEADER.size :], np.uint8).reshape(HEIGHT, WIDTH, 3))
                    video_pts.append(pts_us)
                elif kind == MsgType.AUDIO_OUT:
                    audio.append((pts_us, (len(data) - HEADER.size) // 2))
            ws.send_text(json.dumps({"type": "stop"}))
    assert np.stack(frames).std() > 1  # pictures, not a constant
    # the first frame is the last of its latent frame's span (frame 3, 120 ms); from there on the
    # frames follow each other at 25 fps across chunks, and each chunk's audio spans its frames
    assert video_pts == [(3 + i) * 40_000 for i in range(12)]
    assert audio[:2] == [(120_000, 9 * 640), (480_000, 12 * 640)]


def test_the_latent_bank_of_a_wan_based_autoencoder_starts_at_the_last_frame_of_the_first_span(tmp_path):
    """Latent frame l is made from the clip's frames [4l, 4l + 4) and their audio; Wan's first latent
    frame holds one frame, so the bank encodes the clip from its frame 3 on."""
    from safetensors.torch import load_file

    from distill.autoencoder import video_to_input
    from distill.config import ConfigError, find_config, load_config
    from distill.data import load_bank
    from distill.latents import build_latents
    from streamgen.data.dataset import AvatarWorldDataset
    from streamgen.data.shards import make_dataset

    world = tmp_path / "world"
    make_dataset(world, 2, 0, HEIGHT, WIDTH, 1.0, 2, 50, 1)  # 25 frames: 24 usable, 21 from frame 3
    model = export(wan_based_model(), tmp_path / "model")
    cfg = load_config(find_config("tiny-avatar", "latents"), "latents")
    cfg.data.root, cfg.data.latents, cfg.model.flavor, cfg.model.vae = str(world), "wan", "debug", str(model)
    cfg.options.splits = ["train"]  # two clips: one in val, one in test
    from distill.data import DataMissing

    with pytest.raises(DataMissing, match="no train clips"):  # was min() of an empty sequence
        build_latents(cfg)
    cfg.options.splits = ["test"]
    bank = load_file(str(build_latents(cfg)[0]))
    assert bank["latents"].shape[2] == 6 and bank["audio"].shape[1] == 6 * 4 * 640
    vae = load_autoencoder(model)
    clip = AvatarWorldDataset(world, "test")[0]["video"]
    with torch.no_grad():  # causal: the first latent frame is its first frame's alone
        alone = vae.encode(video_to_input(torch.from_numpy(clip[3:4].copy())[None]))[0, :, 0]
    torch.testing.assert_close(bank["latents"][0, :, 0], alone, atol=1e-5, rtol=1e-5)

    # the name's latents are this autoencoder's: another one is refused, not skipped over
    other = wan_based_model()
    with torch.no_grad():
        other.vae.vae.decoder.conv_out.weight.mul_(2.0)
    cfg.model.vae = str(export(other, tmp_path / "other"))
    with pytest.raises(ConfigError, match="holds the latents of another autoencoder"):
        build_latents(cfg)
    # a stage whose frame size is not the bank's is told so (it trained, then the next stage failed)
    teacher = load_config(find_config("debug", "teacher"), "teacher")
    teacher.data.source, teacher.data.root, teacher.data.latents = "world", str(world), "wan"
    teacher.data.split = "test"
    teacher.model.height = teacher.model.width = 64
    with pytest.raises(ConfigError, match="holds latents of 4x6, while model.height x model.width"):
        load_bank(teacher, None, (8, 8))


def test_a_re_export_cut_short_leaves_the_previous_weights_whole(tmp_path, monkeypatch):
    """save_file wrote over dit.safetensors in place: a kill or a full disk during a re-export left
    a truncated file beside the old model.json, a directory that no longer loads."""
    import safetensors.torch

    from streamgen.model_export import save_model

    model = load_model("debug")
    save_model(model, tmp_path / "m")
    before = (tmp_path / "m" / "dit.safetensors").read_bytes()
    real = safetensors.torch.save_file

    def cut_short(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", cut_short)
    with pytest.raises(OSError, match="No space left"):
        save_model(model, tmp_path / "m")
    assert (tmp_path / "m" / "dit.safetensors").read_bytes() == before
    assert not list((tmp_path / "m").glob(".*.tmp"))
    monkeypatch.undo()
    assert load_model(str(tmp_path / "m")).cfg == model.cfg


def _a_vae_weight_dropped(d):
    """d's vae.safetensors without one of its weights (load_state_dict's two lines, naming no file)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(d / "vae.safetensors"), framework="pt") as f:
        metadata, weights = f.metadata(), {k: f.get_tensor(k) for k in f.keys() if k != "dec.0.conv1.bias"}
    save_file(weights, d / "vae.safetensors", metadata=metadata)


def _an_integer_weight(d):
    """d's dit.safetensors with one weight turned to integers (it was copied into the float
    parameter as it was, and the model streamed without a word)."""
    from safetensors.torch import load_file, save_file

    weights = load_file(d / "dit.safetensors")
    weights["head.proj.bias"] = weights["head.proj.bias"].round().to(torch.int32)
    save_file(weights, d / "dit.safetensors")


@pytest.mark.parametrize(
    "spoil, says",
    [
        (
            lambda d: (d / "dit.safetensors").write_bytes(b"\x10\x00"),
            "dit.safetensors: not a readable safetensors",
        ),
        (lambda d: (d / "vae.safetensors").write_bytes(b"garbage!" * 4), "vae.safetensors: not a readable"),
        (lambda d: (d / "model.json").write_text('{"name": "x"}'), "model.json: no 'config' in it"),
        (lambda d: (d / "vae_config.json").write_text("{not json"), "vae_config.json: not valid JSON"),
        (_an_integer_weight, "dit.safetensors does not match the model config in model.json: 1 not "
         "floating-point, e.g. head.proj.bias (int32)"),  # fmt: skip
        (_a_vae_weight_dropped, 'vae.safetensors: its weights do not fit its config: Missing key(s) in '
         'state_dict: "dec.0.conv1.bias".'),  # fmt: skip
    ],
)
def test_a_spoilt_model_directory_names_its_file(tmp_path, spoil, says, capsys):
    """Were safetensors' or json's own errors (naming no file) or KeyError: 'config', tracebacks."""
    import shutil

    from streamgen.cli import main
    from streamgen.models import MODELS_DIR

    model = tmp_path / "model"
    shutil.copytree(MODELS_DIR / "tiny-avatar", model)
    spoil(model)
    with pytest.raises(ValueError, match=re.escape(says)):
        load_model(str(model))
    assert main(["generate", "--model", str(model), "--out", str(tmp_path / "x.mp4"), "--quiet"]) == 2
    assert says in capsys.readouterr().err


@pytest.mark.parametrize("missing", ["vae.safetensors", "dit.safetensors"])
def test_a_model_directory_missing_a_file_says_which(tmp_path, missing, capsys):
    """A model copied without one of its files said "[Errno 2] No such file or directory:
    '.../vae.safetensors'", as if the command had been given a wrong path."""
    import shutil

    from streamgen.cli import main
    from streamgen.models import MODELS_DIR

    model = tmp_path / "model"
    shutil.copytree(MODELS_DIR / "tiny-avatar", model)
    (model / missing).unlink()
    says = f"{model}: the model directory has no {missing}: copy or export the whole model again"
    with pytest.raises(FileNotFoundError) as e:
        load_model(str(model))
    assert str(e.value) == says
    assert main(["generate", "--model", str(model), "--out", str(tmp_path / "x.mp4"), "--quiet"]) == 2
    assert says in capsys.readouterr().err


def test_the_precision_switches_of_the_environment_are_read_as_meant(monkeypatch, tmp_path):
    """STREAMGEN_FP8=0 turned FP8 on; STREAMGEN_DTYPE=bf16 was an AttributeError and float16 a
    dtype no option offers; a teacher took it and ran in bfloat16; a STREAMGEN_MODELS entry that
    is a file broke the unknown-model message."""
    from streamgen.model.float8 import float8_layers
    from streamgen.teacher import open_session

    monkeypatch.setenv("STREAMGEN_FP8", "0")
    assert float8_layers(load_model("debug").dit) == 0
    monkeypatch.delenv("STREAMGEN_FP8")
    for wrong in ("bf16", "float16"):
        monkeypatch.setenv("STREAMGEN_DTYPE", wrong)
        with pytest.raises(ValueError, match=rf"\$STREAMGEN_DTYPE: dtype must be one of .*got '{wrong}'"):
            load_model("debug")
    monkeypatch.setenv("STREAMGEN_DTYPE", "bfloat16")
    with pytest.raises(ValueError, match="a teacher runs in float32 only"):
        open_session("tiny-avatar-teacher")
    monkeypatch.delenv("STREAMGEN_DTYPE")
    # (ignored without a word: the teacher decoded and encoded in float32 all the same)
    with pytest.raises(ValueError, match="a teacher decodes as loaded, in float32 only .*--decode-dtype"):
        open_session("tiny-avatar-teacher", decode_dtype="bfloat16")
    with pytest.raises(ValueError, match="a teacher encodes as loaded, in float32 only .*--encode-dtype"):
        open_session("tiny-avatar-teacher", encode_dtype=torch.bfloat16)
    assert open_session("tiny-avatar-teacher", decode_dtype="float32", encode_dtype=None).height > 0
    a_file = tmp_path / "afile"
    a_file.write_text("")
    monkeypatch.setenv("STREAMGEN_MODELS", str(a_file))
    with pytest.raises(FileNotFoundError, match="unknown model 'nothing'"):
        load_model("nothing")


def test_a_folder_that_is_no_model_is_named_for_what_it_is(tmp_path, capsys):
    """A Wan checkpoint's folder, a run's folder and an empty one were all "unknown model ...: not
    a model directory", the first though the README said such a folder loads."""
    import json

    from streamgen.cli import main
    from streamgen.models import require_model

    wan = tmp_path / "Wan2.1-T2V-1.3B-Diffusers"
    (wan / "transformer").mkdir(parents=True)
    (wan / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    (wan / "transformer" / "config.json").write_text(json.dumps({"_class_name": "WanTransformer3DModel"}))
    run = tmp_path / "runs" / "teacher"
    (run / "model").mkdir(parents=True)
    (run / "model" / "model.json").write_text("{}")
    empty = tmp_path / "empty"
    empty.mkdir()
    for folder, says in [
        (wan, f"is a diffusers Wan2.1 checkpoint, not a streamgen model: distill it into one first "
              f"(a distill config's model.init: wan:{wan}"),
        (wan / "transformer", "is a diffusers Wan2.1 checkpoint"),
        (run, f"{run} is a run's folder: its model is {run / 'model'}"),
        (empty, f"{empty} is a folder without model.json: not a streamgen model"),
    ]:  # fmt: skip
        with pytest.raises(FileNotFoundError) as refused:
            require_model(str(folder))
        assert says in str(refused.value)
    assert main(["serve", "--port", str(free_port()), "--model", str(empty)]) == 2  # (its own message, that said less)
    assert f"{empty} is a folder without model.json" in capsys.readouterr().err
    # distill's wan:DIR given as the model was "unknown model 'wan:...'"
    with pytest.raises(FileNotFoundError, match=re.escape(f"wan:{wan}: wan:DIR names a diffusers Wan2.1 checkpoint")):
        require_model(f"wan:{wan}")


def test_an_export_over_a_model_directory_replaces_its_whole_autoencoder(tmp_path):
    """A re-export (or ship) into a directory that held another autoencoder left that one's files:
    a tiny decoder, or a Wan VAE, that load_autoencoder then took over the new one."""
    from streamgen.model.vae import TinyCausalVAE

    d = tmp_path / "model"
    export(wan_based_model(tiny_decoder=True), d)
    assert isinstance(load_autoencoder(d), TinyDecoderVAE)
    plain = AvatarModel(
        "plain", DiT(get_config("debug")).eval(), TinyCausalVAE(latent_channels=4), HEIGHT, WIDTH
    )
    export(plain, d)
    assert type(load_autoencoder(d)) is TinyCausalVAE
    assert not (d / "wan_vae").exists() and not (d / "tiny_decoder.safetensors").exists()
    export(wan_based_model(), d)  # and back: the TinyCausalVAE's files go
    assert type(load_autoencoder(d)) is WanVAE and not (d / "vae_config.json").exists()


def _autoencoder(name: str):
    """`tiny`, `tiny-other-config`, `wan`, `wan-other-weights`, `wan-other-config`, and `+td` /
    `+other-td`: behind a tiny decoder (of other weights)."""
    from diffusers import AutoencoderKLWan

    from streamgen.model.vae import TinyCausalVAE

    base, _, decoder = name.partition("+")
    torch.manual_seed(len(base))
    if base.startswith("wan"):
        # (another config.json: the latent statistics of a VAE tuned again)
        stats = {"latents_mean": [0.1, -0.2, 0.0, 0.3], "latents_std": [1.5, 0.5, 1.0, 2.0]}
        config = stats if base == "wan-other-config" else {"latents_mean": [0.0] * 4, "latents_std": [1.0] * 4}
        vae = WanVAE(
            AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, **config).eval()
        )
    else:
        vae = TinyCausalVAE(4, (16, 32, 48, 64) if base == "tiny-other-config" else (8, 16, 24, 32))
    if decoder:
        torch.manual_seed(len(decoder))
        cfg = TinyDecoderConfig(latent_channels=4, widths=(16, 12, 8, 8), blocks_per_stage=1)
        vae = TinyDecoderVAE(vae, TinyDecoder(cfg).eval())
    return vae.eval()


def _parts(vae) -> tuple:
    """What a reader loaded: its base autoencoder and its tiny decoder (None), as (class, tensors)."""
    base, decoder = (vae.vae, vae.decoder) if isinstance(vae, TinyDecoderVAE) else (vae, None)
    return tuple(None if m is None else (type(m).__name__, m.state_dict()) for m in (base, decoder))


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is b
    return a[0] == b[0] and a[1].keys() == b[1].keys() and all(torch.equal(a[1][k], b[1][k]) for k in a[1])


@pytest.mark.parametrize(
    "old, new, whole",
    [
        ("tiny", "tiny-other-config", True),
        ("tiny", "wan", True),
        ("wan", "tiny", True),
        ("wan", "wan-other-weights", True),
        ("wan", "wan-other-config", True),  # its weights were renamed in before its config.json
        ("wan+td", "wan+other-td", True),
        ("wan+td", "wan", True),
        ("wan", "wan+td", True),
        ("tiny+td", "tiny", True),
        # the tiny decoder and the base both change: a tiny decoder is never over a base it was
        # not saved with; the base meanwhile decodes with its own decoder
        ("wan+td", "tiny", False),
        ("tiny", "wan+td", False),
    ],
)
def test_a_reader_finds_the_whole_old_or_the_whole_new_autoencoder_at_every_step(
    tmp_path, monkeypatch, old, new, whole
):
    """The old autoencoder's files were deleted before the new ones were moved in, a Wan VAE's
    folder file by file: a server loading the model meanwhile found no autoencoder, half a Wan VAE,
    or one autoencoder's config beside another's weights. Every rename and removal of the swap is
    followed here by a load of the directory."""

    from streamgen.model_export import _replace_autoencoder

    expected = {}
    for which, name in (("old", old), ("new", new)):
        _autoencoder(name).save(tmp_path / which)
        expected[which] = _parts(load_autoencoder(tmp_path / which))
    d = tmp_path / "model"
    d.mkdir()
    _autoencoder(old).save(d)
    allowed = [expected["old"], expected["new"]]
    if not whole:
        allowed += [(expected["old"][0], None), (expected["new"][0], None)]
    def whole_one(after):
        try:
            found = _parts(load_autoencoder(d))
        except Exception as e:
            found = f"{type(e).__name__}: {e}"
        what = found if isinstance(found, str) else [part and part[0] for part in found]
        whole = not isinstance(found, str) and any(
            _same(found[0], a[0]) and _same(found[1], a[1]) for a in allowed
        )
        assert whole, f"{after}: a reader found {what}"

    seen = check_after_each_file_step(monkeypatch, whole_one)
    _replace_autoencoder(_autoencoder(new), d)
    monkeypatch.undo()
    assert seen and all(_same(a, b) for a, b in zip(_parts(load_autoencoder(d)), expected["new"]))
    assert not [p for p in d.iterdir() if p.name.startswith(".")]


def _model(name: str, autoencoder: str, seed: int) -> AvatarModel:
    """A debug DiT of its own weights (one config: the other's weights load without an error) over
    `_autoencoder(autoencoder)`, named `name`."""
    torch.manual_seed(seed)
    dit = DiT(get_config("debug", frames_per_chunk=3, window_frames=6, in_channels=4)).eval()
    return AvatarModel(name, dit, _autoencoder(autoencoder), HEIGHT, WIDTH, steps=seed + 2)


def _whole(d, models: list[AvatarModel]) -> str | None:
    """None where loading `d` gives one of `models` whole (model.json, DiT weights, autoencoder and
    tiny decoder all of one export), else what it gave."""
    try:
        found = load_model(str(d))
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    parts = _parts(found.vae)
    dit = found.dit.state_dict()
    for m in models:
        same_dit = all(torch.equal(v, dit[k]) for k, v in m.dit.state_dict().items())
        expected = _parts(m.vae)
        if same_dit and all(_same(a, b) for a, b in zip(parts, expected)) and found.name == m.name:
            return None
    return f"model.json of {found.name!r}, autoencoder {[p and p[0] for p in parts]}, DiT of neither"


@pytest.mark.parametrize(
    "old, new", [("tiny", "tiny"), ("wan+td", "tiny"), ("tiny", "wan+td"), ("wan", "wan-other-config")]
)
def test_a_reader_finds_the_whole_old_or_the_whole_new_model_at_every_step_of_an_export(
    tmp_path, monkeypatch, old, new
):
    """save_model renamed dit.safetensors in before model.json, and the autoencoder's files one by
    one: a reader in between paired the new DiT weights with the old model.json (another name,
    steps, size; another config failed to load), and where the tiny decoder and the base both
    changed, found the base decoding without its tiny decoder. The export is a whole folder put in
    the directory's place in one step; every rename, removal and exchange here is followed by a
    load. (A listing of models meanwhile shows no staging folder.)"""

    from streamgen.model_export import save_model
    from streamgen.models import available_models

    models = [_model("old", old, 0), _model("new", new, 1)]
    d = tmp_path / "model"
    save_model(models[0], d)
    (d / "notes.txt").write_text("kept")  # not the export's: stays
    monkeypatch.setenv("STREAMGEN_MODELS", str(tmp_path))
    def whole_one(after):
        wrong = _whole(d, models)
        listed = [n for n in available_models() if n.startswith(".")]
        assert wrong is None, f"{after}: a reader found {wrong}"
        assert listed == [], f"{after}: listed {listed}"

    seen = check_after_each_file_step(monkeypatch, whole_one)
    save_model(models[1], d)
    monkeypatch.undo()
    assert seen and _whole(d, models[1:]) is None
    assert (d / "notes.txt").read_text() == "kept"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # (no staging folder left)
    assert not [p for p in d.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("old, new", [("tiny", "tiny"), ("wan+td", "tiny"), ("tiny", "wan+td")])
def test_a_reader_of_a_folder_written_file_by_file_finds_one_export_or_is_told(
    tmp_path, monkeypatch, old, new
):
    """Where the system cannot exchange folders (not Linux, overlayfs' lower layers), the export
    goes into the directory file by file: a reader between two renames loaded the new DiT weights
    with the old model.json (its name and steps). At every step a reader finds one whole export,
    or is told that one is being written (`ExportUnderWay`)."""
    from streamgen import folders
    from streamgen.model_export import save_model

    models = [_model("old", old, 0), _model("new", new, 1)]
    d = tmp_path / "model"
    save_model(models[0], d)
    monkeypatch.setattr(folders, "exchange", lambda a, b: False)
    monkeypatch.setattr(folders, "READ_AGAIN_AFTER_S", 0.0)  # (no waits between reads)
    told = []

    def whole_one(after):
        wrong = _whole(d, models)
        if wrong is not None and wrong.startswith("ExportUnderWay:"):
            told.append(after)
            return
        assert wrong is None, f"{after}: a reader found {wrong}"

    seen = check_after_each_file_step(monkeypatch, whole_one)
    save_model(models[1], d)
    monkeypatch.undo()
    assert seen and told and _whole(d, models[1:]) is None


@pytest.mark.parametrize("can_exchange", [True, False], ids=["exchanged", "file_by_file"])
def test_a_reader_whose_load_straddles_an_export_reads_again(tmp_path, monkeypatch, can_exchange):
    """A load reads model.json, then dit.safetensors, then the autoencoder: an export that put the
    new folder in place between those reads gave it the old model.json with the new weights. The
    reader reads again where the folder it started in is no longer there, or where an export went
    into it file by file meanwhile (no exchange: its stamp is another)."""
    from streamgen import folders
    from streamgen.model import files as model_files
    from streamgen.model_export import save_model

    models = [_model("old", "wan+td", 0), _model("new", "tiny", 1)]
    d = tmp_path / "model"
    save_model(models[0], d)
    if not can_exchange:
        monkeypatch.setattr(folders, "exchange", lambda a, b: False)
    real, exported = model_files.load_safetensors, []

    def export_meanwhile(path):
        if not exported:
            exported.append(path)
            save_model(models[1], d)
        return real(path)

    monkeypatch.setattr(model_files, "load_safetensors", export_meanwhile)
    assert _whole(d, models) is None and exported
    assert load_model(str(d)).name == "new"


def test_a_distill_stage_loads_its_dit_from_one_export(tmp_path, monkeypatch):
    """distill's load_dit (a stage's teacher or student) reads model.json, then dit.safetensors:
    an export between the two paired the old config with the new weights, which failed to load
    where their sizes differ. It reads again from the folder now there."""
    import dataclasses

    from distill.build import load_dit
    from streamgen.model import files as model_files
    from streamgen.model_export import save_model

    old = _model("old", "tiny", 0)
    torch.manual_seed(1)
    new = _model("new", "tiny", 1)
    new.dit = DiT(dataclasses.replace(old.cfg, num_layers=old.cfg.num_layers + 1)).eval()
    d = tmp_path / "model"
    save_model(old, d)
    real, exported = model_files.load_safetensors, []

    def export_meanwhile(path):
        if not exported:
            exported.append(path)
            save_model(new, d)
        return real(path)

    monkeypatch.setattr(model_files, "load_safetensors", export_meanwhile)
    dit = load_dit(str(d))
    assert exported and dit.cfg.num_layers == new.cfg.num_layers
    assert all(torch.equal(v, dit.state_dict()[k]) for k, v in new.dit.state_dict().items())


@pytest.mark.parametrize("can_exchange", [True, False], ids=["exchanged", "file_by_file"])
def test_a_re_export_keeps_what_else_the_directory_holds_and_a_symlink_to_it(
    tmp_path, monkeypatch, can_exchange
):
    """What is not the export's in a model directory (a report, a folder of samples) stays; a
    symlink at the directory's path stays a symlink to the new model. Where the system cannot
    exchange folders (not Linux, overlayfs' lower layers), the export is written into the
    directory in place, file by file, model.json last."""
    from streamgen import folders
    from streamgen.model_export import save_model

    models = [_model("old", "wan+td", 0), _model("new", "tiny", 1)]
    real = tmp_path / "store" / "model"
    save_model(models[0], real)
    (real / "notes.txt").write_text("kept")
    (real / "samples").mkdir()
    (real / "samples" / "a.png").write_bytes(b"png")
    (tmp_path / "link").symlink_to(real)
    if not can_exchange:
        monkeypatch.setattr(folders, "exchange", lambda a, b: False)
    save_model(models[1], tmp_path / "link")
    assert (tmp_path / "link").is_symlink()
    assert _whole(tmp_path / "link", models[1:]) is None
    assert (real / "notes.txt").read_text() == "kept" and (real / "samples" / "a.png").read_bytes() == b"png"
    assert sorted(p.name for p in real.parent.iterdir()) == ["model"]
    export = ["dit.safetensors", "model.json", "vae.safetensors", "vae_config.json"]
    if not can_exchange:
        export.append(folders.EXPORT_STAMP)  # (written into the directory file by file)
    assert sorted(p.name for p in real.iterdir()) == sorted([*export, "notes.txt", "samples"])


def test_ship_takes_one_export_of_its_source(tmp_path, monkeypatch):
    """ship read the source's model.json, then its DiT weights, then its autoencoder, each on its
    own: a re-export of the source meanwhile shipped one export's model.json with the other's
    weights. It reads the source through one load, read again where the folder changed."""
    from distill.ship import ship
    from streamgen.model import files as model_files
    from streamgen.model_export import save_model

    models = [_model("old", "wan+td", 0), _model("new", "tiny", 1)]
    save_model(models[0], tmp_path / "source")
    real, exported = model_files.load_safetensors, []

    def export_meanwhile(path):
        if not exported:
            exported.append(path)
            save_model(models[1], tmp_path / "source")
        return real(path)

    monkeypatch.setattr(model_files, "load_safetensors", export_meanwhile)
    shipped = ship(str(tmp_path / "source"), "shipped", assets=tmp_path / "assets")
    monkeypatch.undo()
    found = load_model(str(shipped))
    new = models[1]
    dit = found.dit.state_dict()
    assert found.meta["steps"] == new.steps and type(found.vae) is type(new.vae)
    assert all(torch.allclose(v, dit[k].float(), atol=1e-2) for k, v in new.dit.state_dict().items())


def test_distillation_refuses_a_wan_vae_folder_whose_save_was_cut_short(tmp_path, monkeypatch):
    """`model.vae: wan:DIR` over a folder WanVAE.save wrote into file by file (no exchange): a save
    cut short after the new weights went in left them beside the old config.json, which
    diffusers' from_pretrained loaded as one autoencoder. load_vae reads it as every other model
    source is read (`read_folder`): told that the save was cut short."""
    import errno
    import os
    from pathlib import Path

    from distill.build import ModelSourceError, load_vae
    from distill.config import ModelConfigSection
    from streamgen import folders

    folder = tmp_path / "model" / WanVAE.DIRECTORY
    old = wan_based_model().vae
    old.save(folder.parent)
    assert load_vae(ModelConfigSection(vae=f"wan:{folder}"), latent_channels=4, temporal=4, seed=0)
    real_replace = os.replace

    def cut_short_after_weights(src, dst):
        real_replace(src, dst)
        if os.fspath(dst).endswith(".safetensors") and Path(dst).parent == folder:
            raise OSError(errno.EIO, "an I/O error")

    from diffusers import AutoencoderKLWan

    new = WanVAE(AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                  latents_mean=[0.0] * 4, latents_std=[1.0] * 4).eval())  # fmt: skip
    monkeypatch.setattr(folders, "exchange", lambda a, b: False)
    monkeypatch.setattr(os, "replace", cut_short_after_weights)
    with pytest.raises(OSError, match="I/O error"):
        new.save(folder.parent)
    monkeypatch.undo()
    with pytest.raises(ModelSourceError, match="cut short"):
        load_vae(ModelConfigSection(vae=f"wan:{folder}"), latent_channels=4, temporal=4, seed=0)


@pytest.mark.parametrize("name", ["", "../evaluators", "tiny-avatar/sub", "/tmp/x", ".hidden"])
def test_ship_takes_a_plain_name(tmp_path, name, capsys):
    """'' wrote a model's files into the models folder itself, '../evaluators' into the evaluators'."""
    from distill.ship import main

    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path / "no-matter"), name])
    assert exit_.value.code == 2 and "is not a model name" in capsys.readouterr().err


def _edited_tiny_avatar(tmp_path, **changes):
    """A copy of the shipped tiny-avatar with model.json's values changed (config.KEY for its config's)."""
    import json
    import shutil

    from streamgen.models import MODELS_DIR

    d = tmp_path / "edited"
    shutil.copytree(MODELS_DIR / "tiny-avatar", d)
    meta = json.loads((d / "model.json").read_text())
    for key, value in changes.items():
        if key.startswith("config."):
            meta["config"][key.removeprefix("config.")] = value
        else:
            meta[key] = value
    (d / "model.json").write_text(json.dumps(meta))
    return d


@pytest.mark.parametrize(
    "changes, says",
    [
        ({"config": None}, "its config is not a JSON object"),  # 'NoneType' object is not a mapping
        ({"config.dim": "192"}, "model config dim: expected int, got '192'"),  # '<' not supported ...
        ({"config.patch_size": 2}, "model config patch_size: expected tuple, got 2"),
        ({"config.num_heads": 3.0}, "model config num_heads: expected int, got 3.0"),  # torch.zeros'
        # values of the right kind the model cannot run with: a tensor's or torch.arange's error at
        # the first chunk, a traceback, or a video made of NaN rotary angles without a word
        ({"config.sink_frames": 0}, "model.json: sink_frames must be at least 1, not 0"),
        ({"config.audio_context_frames": -9}, "audio_context_frames must be at least 0, not -9"),
        # (a stream's first chunk said it, once the model had loaded, naming no file)
        ({"config.window_frames": 1}, "model.json: frames_per_chunk (2) must not exceed window_frames (1)"),
        ({"config.rope_theta": 0.0}, "rope_theta must be a positive number, not 0.0"),
        ({"config.eps": -1.0}, "eps must be a positive number, not -1.0"),
        ({"config.patch_size": [1, 2]}, "patch_size must be 3 positive sizes (t, h, w), not (1, 2)"),
        # (the audio windows cut for 3 video frames a latent frame, the video decoded 4: out of step)
        ({"config.temporal_compression": 3}, "model.json: its temporal_compression is 3, its autoencoder "
         "makes 4 video frames of each latent frame"),  # fmt: skip
        ({"height": "64"}, "its height is '64', not a positive whole number"),  # a log line's TypeError
        ({"height": 56}, "model.json: its height and width (56x64) must be multiples of 16"),  # no file named
        ({"shift": "x"}, "its shift is 'x', not a positive number"),  # the sigma schedule's
        ({"steps": 0}, "its steps is 0, not a positive whole number"),
        ({"kind": "Teacher"}, "its kind 'Teacher' is none of teacher, student-ode"),  # streamed as a student
        # a config larger than its weights: the whole random model was built (6.5 GB for 1.3B's), then
        # a page of missing keys
        ({"config.num_layers": 8}, "dit.safetensors does not match the model config in model.json: "),
        ({"config.num_layers": 8}, " missing, e.g. blocks."),
        ({"config.dim": 96, "config.ffn_dim": 384}, "of other shapes, e.g."),
    ],
)
def test_a_model_json_with_values_of_the_wrong_kind_is_one_line(tmp_path, changes, says, capsys):
    from streamgen.cli import main

    model = _edited_tiny_avatar(tmp_path, **changes)
    out = tmp_path / "x.mp4"
    assert main(["generate", "--model", str(model), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_a_dit_and_autoencoder_of_other_latents_in_one_folder_are_refused(tmp_path):
    """A convolution's error at the first chunk ("expected input[1, 4, 1, 8, 8] to have 16 channels")."""
    import shutil

    from streamgen.model_export import save_model
    from streamgen.models import MODELS_DIR, load_model

    save_model(load_model("debug"), tmp_path / "mixed")  # a DiT of 4 latent channels
    for name in ("vae.safetensors", "vae_config.json"):  # tiny-avatar's autoencoder: 16
        shutil.copy(MODELS_DIR / "tiny-avatar" / name, tmp_path / "mixed" / name)
    with pytest.raises(ValueError, match="the DiT takes 4 latent channels, its autoencoder gives 16"):
        load_model(str(tmp_path / "mixed"))


def test_a_model_larger_than_the_free_memory_is_refused_before_it_is_built(monkeypatch):
    """wan2.1-14b's stand-in took 15 GB and 53 s here before the allocator's error; with less free
    memory the kernel would kill the process."""
    from streamgen import models

    monkeypatch.setattr(models, "free_memory", lambda: 2 * 2**30)
    with pytest.raises(ValueError, match=r"wan2.1-1.3b: its DiT takes 6.\d GiB in float32 as it loads; this "
                                         r"machine has 2.0 GiB free"):  # fmt: skip
        models.load_model("wan2.1-1.3b")
    models.load_model("debug")  # (what fits is built)


def test_a_model_path_under_the_home_folder_is_found_by_its_tilde(tmp_path, monkeypatch):
    """`~` reaches the loaders unexpanded where no shell expands it (`--model=~/m`, a distill
    config's `model.init: ~/m` or `wan:~/w`, `model.vae: ~/m`): "unknown model '~/m'", of a model
    that was there. It is the home folder, as in a shell."""
    from distill.build import load_dit, load_vae
    from distill.config import ModelConfigSection
    from streamgen.model.wan import save_pretrained
    from streamgen.models import require_model, resolve_model_dir

    monkeypatch.setenv("HOME", str(tmp_path))
    model = wan_based_model()
    export(model, tmp_path / "m")
    assert resolve_model_dir("~/m") == tmp_path / "m"
    assert load_model("~/m").trained
    vae = load_vae(ModelConfigSection(vae="~/m"), latent_channels=model.vae.latent_channels, temporal=4, seed=0)
    assert type(vae) is type(model.vae)
    save_pretrained(model.dit, tmp_path / "wan")
    assert load_dit("wan:~/wan").cfg.num_layers == model.cfg.num_layers
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="is a folder without model.json"):
        require_model("~/empty")


def test_a_path_under_the_home_of_no_such_user_says_it_is_not_there(tmp_path, capsys):
    """`--set model.init=~someone/m`, `--model ~someone/m`, `--config ~someone/c.yaml` (a config or
    a command line from another machine, whose user this one has not) was pathlib's RuntimeError
    "Could not determine home directory.", a traceback. It is a folder that is not there."""
    from distill.build import ModelSourceError, load_dit, load_vae
    from distill.config import ConfigError, ModelConfigSection, find_config
    from distill.ship import _run_hint
    from streamgen.cli import main
    from streamgen.models import require_model, resolve_model_dir

    path = "~no-such-user-of-streamgen/m"
    assert resolve_model_dir(path) is None
    with pytest.raises(FileNotFoundError, match=re.escape(f"no model directory {path}: there is no such folder")):
        require_model(path)
    with pytest.raises(FileNotFoundError, match=re.escape(f"no model directory {path}")):
        load_model(path)
    with pytest.raises(ModelSourceError, match=re.escape(f"'{path}' is not a model directory")):
        load_dit(path)
    with pytest.raises(ModelSourceError, match=re.escape(f"'{path}' is not a model directory")):
        load_vae(ModelConfigSection(vae=path), latent_channels=4, temporal=4, seed=0)
    with pytest.raises(ConfigError, match=re.escape(f"config '{path}.yaml' not found")):
        find_config(f"{path}.yaml", "teacher")
    assert _run_hint(path) == ""
    out = str(tmp_path / "run")
    assert main(["distill", "teacher", "--config", "debug", "--set", f"model.init={path}", "--out", out]) == 2
    assert f"'{path}' is not a model directory" in capsys.readouterr().err


def test_a_folder_here_named_as_a_shipped_model_is_not_passed_over_unsaid(tmp_path, monkeypatch, caplog):
    """`--model tiny-avatar` beside a run's folder ./tiny-avatar (its model in tiny-avatar/model)
    loaded the shipped tiny-avatar without a word: the run's model was taken to be streaming. The
    shipped one still loads (the name is the shipped model's), and the folder passed over is said."""
    run = tmp_path / "tiny-avatar"
    export(wan_based_model(), run / "model")
    monkeypatch.chdir(tmp_path)
    with caplog.at_level("WARNING", logger="streamgen.models"):
        model = load_model("tiny-avatar")
    assert model.meta.get("name") == "tiny-avatar"  # (the shipped one)
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "tiny-avatar is a run's folder: its model is tiny-avatar/model" in said
    assert "loading the model named tiny-avatar in " in said
    caplog.clear()
    with caplog.at_level("WARNING", logger="streamgen.models"):
        load_model("tiny-avatar/model")
    assert not caplog.records


def test_a_path_to_no_model_is_not_taken_for_a_shipped_models_name(tmp_path, monkeypatch):
    """`--model ./tiny-avatar` with no such folder loaded the shipped tiny-avatar without a word
    (the search path was tried with the path as a name); a path is only ever that path."""
    monkeypatch.chdir(tmp_path)
    for path in ("./tiny-avatar", f"{tmp_path}/tiny-avatar"):
        with pytest.raises(FileNotFoundError, match=f"no model directory {re.escape(path)}: there is no such folder"):
            load_model(path)
    export(wan_based_model(), tmp_path / "tiny-avatar" / "model")  # a run's folder there
    with pytest.raises(FileNotFoundError, match=r"\./tiny-avatar is a run's folder: its model is"):
        load_model("./tiny-avatar")
    assert load_model("./tiny-avatar/model").meta.get("name") != "tiny-avatar"


@pytest.mark.parametrize(
    "meta, says",
    [
        ({"kind": "teacher", "cfg_scale": "3"}, "its cfg_scale is '3', not a number of at least 0"),
        ({"kind": "teacher", "cfg_scale": -1}, "its cfg_scale is -1, not a number of at least 0"),
        ({"cache_from": "re-encode"}, "its cache_from is 're-encode', not one of reencode, last_step"),
    ],
    ids=["string_cfg_scale", "negative_cfg_scale", "unknown_cache_from"],
)
def test_a_model_json_of_a_wrong_cfg_scale_or_cache_from_names_it(tmp_path, meta, says, capsys):
    """A teacher's model.json of a string cfg_scale was a TypeError traceback at its first guided
    step; a cache_from none knows said "cache_from must be one of ..." as if of --cache-from,
    naming no file. Both name model.json and exit 2."""
    import json
    import shutil

    from streamgen.cli import main
    from streamgen.models import MODELS_DIR

    model = tmp_path / "model"
    shutil.copytree(MODELS_DIR / "tiny-avatar", model)
    (model / "model.json").write_text(json.dumps({**json.loads((model / "model.json").read_text()), **meta}))
    with pytest.raises(ValueError, match=re.escape(f"{model / 'model.json'}: {says}")):
        load_model(str(model))
    out = str(tmp_path / "x.mp4")
    assert main(["generate", "--model", str(model), "--out", out, "--quiet", "--height", "64", "--width", "64"]) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err


def test_distillation_takes_the_wan_vae_of_a_pipeline_folder(tmp_path):
    """`model.init: wan:DIR` takes a pipeline's folder (its transformer in transformer/), while
    `model.vae: wan:DIR` of the same folder said "no config.json in it": its autoencoder is in vae/."""
    from distill.build import ModelSourceError, load_vae
    from distill.config import ModelConfigSection

    model = wan_based_model()
    pipeline = tmp_path / "Wan2.1-T2V-1.3B-Diffusers"
    model.vae.vae.save_pretrained(pipeline / "vae")
    (pipeline / "model_index.json").write_text('{"_class_name": "WanPipeline"}')
    vae = load_vae(ModelConfigSection(vae=f"wan:{pipeline}"), latent_channels=4, temporal=4, seed=0)
    theirs = model.vae.state_dict()
    assert vae.state_dict().keys() == theirs.keys()
    assert all(torch.equal(v, theirs[k]) for k, v in vae.state_dict().items())
    # a pipeline's vae/ without its config (a download cut short) is the folder named
    (pipeline / "vae" / "config.json").unlink()
    with pytest.raises(ModelSourceError, match=re.escape(f"{pipeline / 'vae'}: no config.json in it")):
        load_vae(ModelConfigSection(vae=f"wan:{pipeline}"), latent_channels=4, temporal=4, seed=0)


def test_an_empty_model_name_is_said_to_be_empty(tmp_path, monkeypatch, capsys):
    """`--model "$MODEL"` of an unset variable: Path("") is the current folder, so the error began
    " is a folder without model.json", and in a model's folder that model loaded unasked."""
    from streamgen.cli import main
    from streamgen.models import resolve_model_dir

    export(wan_based_model(), tmp_path)
    monkeypatch.chdir(tmp_path)
    assert resolve_model_dir("") is None
    with pytest.raises(FileNotFoundError, match=re.escape("the model's name is empty ('')")):
        load_model("")
    assert main(["generate", "--model", "", "--out", str(tmp_path / "x.mp4"), "--quiet"]) == 2
    assert "the model's name is empty" in capsys.readouterr().err


def test_a_file_of_a_model_directory_given_as_the_model_names_the_directory(tmp_path, capsys):
    """`--model DIR/model.json` (or its dit.safetensors) was "unknown model ...: not a model
    directory and not one of tiny-avatar, ...", not saying that its folder is the model."""
    from streamgen.cli import main

    export(wan_based_model(), tmp_path / "m")
    for given in (tmp_path / "m" / "model.json", tmp_path / "m" / "dit.safetensors"):
        with pytest.raises(FileNotFoundError, match=re.escape(f"{given} is a file of the model directory {tmp_path / 'm'}: give the directory")):  # fmt: skip
            load_model(str(given))
    assert main(["generate", "--model", str(given), "--out", str(tmp_path / "x.mp4"), "--quiet"]) == 2
    assert "give the directory" in capsys.readouterr().err


def test_a_model_name_too_long_for_the_file_system_is_an_unknown_model(tmp_path, capsys):
    """A --model longer than a file name may be was exists()' OSError (ENAMETOOLONG): a traceback
    from generate, and "cannot write the model" from distill.ship, which had written nothing."""
    from distill.ship import main as ship
    from streamgen.cli import main

    name = "a" * 300
    with pytest.raises(FileNotFoundError, match=re.escape(f"unknown model {name!r}")):
        load_model(name)
    assert main(["generate", "--model", name, "--out", str(tmp_path / "x.mp4"), "--quiet"]) == 2
    assert "unknown model" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        ship([name, "x"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "is not a model directory" in err and "cannot write" not in err


def test_a_flavors_stand_in_teacher_runs_as_a_teacher(capsys):
    """FLAVOR-teacher without trained weights (debug-teacher) ran as a student: 4 steps with a KV
    cache and no guidance, served as a stream, its --steps held to a student's schedule."""
    from streamgen.cli import check_steps, main
    from streamgen.models import model_kind, model_settings
    from streamgen.teacher import TeacherSession, open_session

    assert (model_kind("debug-teacher"), model_kind("debug")) == ("teacher", None)
    assert (model_settings("debug-teacher")["steps"], model_settings("debug")["steps"]) == (50, 4)
    session = open_session("debug-teacher", steps=2)
    assert isinstance(session, TeacherSession) and session.cfg_scale == 3.0
    session.close()
    check_steps(3, "debug-teacher")  # (a teacher takes any number)
    assert main(["serve", "--model", "debug-teacher", "--port", str(free_port())]) == 2
    assert "debug-teacher is a bidirectional teacher" in capsys.readouterr().err


def test_a_teacher_samples_the_steps_its_model_json_names(tmp_path):
    """Without --steps a teacher took 50 Euler steps whatever its model.json said ("default: the
    model's"); 50 where it names none, the count given where one is."""
    import json
    import shutil

    from streamgen.models import resolve_model_dir
    from streamgen.teacher import open_session

    shipped = resolve_model_dir("tiny-avatar-teacher")
    for steps in (8, None):
        d = tmp_path / f"teacher-{steps}"
        shutil.copytree(shipped, d)
        meta = json.loads((d / "model.json").read_text())
        meta.pop("steps")
        (d / "model.json").write_text(json.dumps({**meta, **({"steps": steps} if steps else {})}))
        session = open_session(str(d))
        assert (session.steps, len(session.sigmas)) == (steps or 50, (steps or 50) + 1)
        assert open_session(str(d), steps=3).steps == 3


def test_a_relative_path_that_is_not_there_is_said_to_be_no_folder(tmp_path, monkeypatch):
    # `--model runs/tiny-avatar/ode/model` before that stage ran: "unknown model '...': not a model
    # directory and not one of tiny-avatar, ...", as if a model's name had been mistyped
    from streamgen.models import MODELS_DIR, require_model

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("STREAMGEN_MODELS", raising=False)
    with pytest.raises(FileNotFoundError) as refused:
        require_model("runs/ode/model")
    assert str(refused.value) == (
        f"no model directory runs/ode/model: there is no such folder in {tmp_path}, nor under the shipped "
        f"models ({MODELS_DIR}; STREAMGEN_MODELS names more folders to look under)"
    )


@pytest.mark.parametrize("listed", [True, False], ids=["STREAMGEN_MODELS", "shipped_only"])
def test_a_nested_model_name_that_is_not_there_says_where_it_was_looked_for(tmp_path, monkeypatch, listed):
    # `--model org/avatar`, looked for under every model folder (STREAMGEN_MODELS's, then the shipped
    # models'), was "there is no such folder in <the current folder>", as if no other had been looked in
    from streamgen import models

    shipped, extra = tmp_path / "shipped", [tmp_path / "mine", tmp_path / "theirs"]
    monkeypatch.setattr(models, "MODELS_DIR", shipped)
    monkeypatch.setenv("STREAMGEN_MODELS", os.pathsep.join(map(str, extra)) if listed else "")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as refused:
        models.require_model("org/avatar")
    looked_under = f"STREAMGEN_MODELS ({extra[0]}, {extra[1]}) or the shipped models ({shipped})"
    if not listed:
        looked_under = f"the shipped models ({shipped}; STREAMGEN_MODELS names more folders to look under)"
    assert str(refused.value) == (
        f"no model directory org/avatar: there is no such folder in {tmp_path}, nor under {looked_under}"
    )


def test_a_model_name_whose_folder_under_streamgen_models_is_no_model_is_named_for_what_it_is(
    tmp_path, monkeypatch
):
    # a name found as a folder under STREAMGEN_MODELS without model.json (a copy cut short, a run's
    # folder) was "unknown model" or, nested, "no such folder", though the folder was there
    from streamgen.models import require_model

    models_dir, here = tmp_path / "models", tmp_path / "here"
    (models_dir / "org" / "avatar").mkdir(parents=True)
    (models_dir / "run" / "model").mkdir(parents=True)
    (models_dir / "run" / "model" / "model.json").write_text("{}")
    here.mkdir()
    monkeypatch.setenv("STREAMGEN_MODELS", str(models_dir))
    monkeypatch.chdir(here)
    for name, says in [
        ("org/avatar", f"{models_dir / 'org' / 'avatar'} is a folder without model.json: not a streamgen model"),
        ("run", f"{models_dir / 'run'} is a run's folder: its model is {models_dir / 'run' / 'model'}"),
    ]:
        with pytest.raises(FileNotFoundError) as refused:
            require_model(name)
        assert str(refused.value).startswith(says), str(refused.value)
    require_model("run/model")
