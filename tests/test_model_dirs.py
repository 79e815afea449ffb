"""Model directories with the Wan VAE (and TAEHV's tiny decoder) behind the DiT: what a
distillation that trains with `model.vae: wan:DIR` exports, and every command loads
(`streamgen.models.load_model`). They stream the frames of the model they were saved from."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

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
    assert main(["serve", "--model", "debug-teacher", "--port", "0"]) == 2  # (refused before it binds)
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


def test_a_switch_of_the_environment_that_is_neither_on_nor_off_is_refused_by_its_name(monkeypatch):
    """STREAMGEN_FP8=maybe (or a typo of true) turned FP8 on without a word, and a STREAMGEN_CACHE_FROM
    or STREAMGEN_COMPILE of no known value was refused in words that named neither variable
    ("cache_from must be one of ...", torch's "Invalid backend: ..."): a user who gave no
    --cache-from could not tell what was meant. Each is now refused as an option is, by its name."""
    from streamgen.model.float8 import float8_layers

    for on in ("1", "true", "Yes", " on "):
        monkeypatch.setenv("STREAMGEN_FP8", on)
        assert float8_layers(load_model("debug").dit) > 0
    for wrong in ("maybe", "ture", "2"):
        monkeypatch.setenv("STREAMGEN_FP8", wrong)
        with pytest.raises(ValueError, match=rf"^\$STREAMGEN_FP8: '{wrong}' is neither on .* nor off "):
            load_model("debug")
    monkeypatch.delenv("STREAMGEN_FP8")
    monkeypatch.setenv("STREAMGEN_CACHE_FROM", "x")
    with pytest.raises(ValueError, match=r"^\$STREAMGEN_CACHE_FROM: cache_from must be one of .*got 'x'"):
        load_model("debug")
    monkeypatch.delenv("STREAMGEN_CACHE_FROM")
    monkeypatch.setenv("STREAMGEN_COMPILE", "nosuch")
    with pytest.raises(ValueError, match=r"^\$STREAMGEN_COMPILE: .*'nosuch'"):
        load_model("debug")
