"""streamgen.model.tiny_decoder: TAEHV's decoder, streamed by chunks, loading TAEHV's checkpoints.

The reference here is TAEHV's layout written out literally (`_taehv_layout`): one nn.Sequential
indexed as its published checkpoints are, run over the whole clip with an nn.Upsample before
each time upsample and plain 3x3 convolutions. Our decoder reorders and folds those layers and
decodes chunk by chunk; loading the reference's state dict through the adapter, it must give the
same frames.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from streamgen.model.tiny_decoder import (
    TinyDecoder,
    TinyDecoderConfig,
    TinyDecoderVAE,
    config_from_state_dict,
    from_taehv,
)

SMALL = TinyDecoderConfig(latent_channels=4, widths=(16, 12, 8, 8), blocks_per_stage=2)


class _Mem(nn.Module):  # TAEHV's memory block: parameters under conv.0/2/4, no skip (n_in == n_out)
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(2 * c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c, c, 3, padding=1),
        )  # fmt: skip


class _TGrow(nn.Module):
    def __init__(self, c, stride):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(c, c * stride, 1, bias=False)


def _taehv_layout(cfg: TinyDecoderConfig, time_strides=None) -> nn.Sequential:
    w = cfg.widths
    layers = [nn.Identity(), nn.Conv2d(cfg.latent_channels, w[0], 3, padding=1), nn.ReLU()]
    for i in range(len(w) - 1):
        stride = (time_strides or [2 if up else 1 for up in cfg.time_upscale])[i]
        layers += [_Mem(w[i]) for _ in range(cfg.blocks_per_stage)]
        layers += [nn.Upsample(scale_factor=2 if cfg.space_upscale[i] else 1), _TGrow(w[i], stride)]
        layers += [nn.Conv2d(w[i], w[i + 1], 3, padding=1, bias=False)]
    layers += [nn.ReLU(), nn.Conv2d(w[-1], cfg.image_channels * cfg.patch_size**2, 3, padding=1)]
    torch.manual_seed(1)
    seq = nn.Sequential(*layers)
    for p in seq.parameters():  # larger than the default init, so every layer moves the output
        nn.init.normal_(p, std=0.6 / p[0].numel() ** 0.5)
    return seq


def _reference_decode(seq: nn.Sequential, latents: torch.Tensor, patch_size: int = 1) -> torch.Tensor:
    """The whole clip [N, T, C, h, w] at once, layer by layer as the Sequential lists them."""
    n, t = latents.shape[:2]
    x = latents.flatten(0, 1)
    x = torch.tanh(x / 3) * 3
    for layer in list(seq)[1:]:
        if isinstance(layer, _Mem):
            frames = x.unflatten(0, (n, -1))
            past = torch.cat([torch.zeros_like(frames[:, :1]), frames[:, :-1]], 1).flatten(0, 1)
            x = F.relu(layer.conv(torch.cat([x, past], 1)) + x)
        elif isinstance(layer, _TGrow):
            c = x.shape[1]
            x = layer.conv(x).reshape(-1, c, *x.shape[2:])
        else:
            x = layer(x)
    if patch_size > 1:
        x = F.pixel_shuffle(x, patch_size)
    return x.clamp(0, 1).unflatten(0, (n, -1))


def _checkpoint(seq: nn.Sequential) -> dict:
    """The state dict as TAEHV publishes it: the decoder's, and an encoder's beside it."""
    return {f"decoder.{k}": v for k, v in seq.state_dict().items()} | {
        "encoder.0.weight": torch.zeros(4, 3, 3, 3)
    }


def _decode_in_chunks(decoder, latents, sizes):
    out, memory, i = [], None, 0
    for size in sizes:
        frames, memory = decoder(latents[:, i : i + size], memory)
        out.append(frames)
        i += size
    return torch.cat(out, 1)


@torch.no_grad()
def test_chunks_equal_taehvs_layout_over_the_whole_clip():
    seq = _taehv_layout(SMALL)
    decoder = TinyDecoder(SMALL).eval()
    decoder.load_state_dict(from_taehv(_checkpoint(seq)))  # strict: every key placed
    torch.manual_seed(0)
    latents = torch.randn(2, 7, 4, 5, 6) * 2
    expected = _reference_decode(seq, latents)
    assert expected.shape == (2, 28, 3, 40, 48)
    assert expected.std() > 0.05  # the frames are not all clamped to one value
    got = _decode_in_chunks(decoder, latents, [1, 3, 3])
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=0)
    # and one frame at a time, as TAEHV's streaming decoder runs
    torch.testing.assert_close(_decode_in_chunks(decoder, latents, [1] * 7), expected, atol=2e-5, rtol=0)


@torch.no_grad()
def test_from_checkpoint_reads_the_config_off_the_weights(tmp_path):
    from safetensors.torch import save_file

    cfg = TinyDecoderConfig(latent_channels=4, widths=(16, 12, 8, 8), blocks_per_stage=2, patch_size=2)
    seq = _taehv_layout(cfg)
    torch.save(_checkpoint(seq), tmp_path / "taew.pth")
    save_file(_checkpoint(seq), str(tmp_path / "taew.safetensors"))
    latents = torch.randn(1, 3, 4, 4, 5)
    expected = _reference_decode(seq, latents, patch_size=2)
    for name in ("taew.pth", "taew.safetensors"):
        decoder = TinyDecoder.from_checkpoint(tmp_path / name).eval()
        assert decoder.cfg == cfg
        torch.testing.assert_close(decoder(latents)[0], expected, atol=2e-5, rtol=0)
    # ours round-trips through `save`
    decoder.save(tmp_path / "ours.safetensors")
    again = TinyDecoder.from_checkpoint(tmp_path / "ours.safetensors").eval()
    torch.testing.assert_close(again(latents)[0], expected, atol=2e-5, rtol=0)


def test_from_checkpoint_expands_a_leading_tilde(tmp_path, monkeypatch):
    # (--tiny-decoder=~/x, of generate, serve and bench, reaches it as the shell left it)
    TinyDecoder(SMALL).save(tmp_path / "tiny.safetensors")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert TinyDecoder.from_checkpoint("~/tiny.safetensors").cfg == SMALL


@torch.no_grad()
def test_time_upsampling_turned_off_keeps_each_latents_last_frame(tmp_path):
    seq = _taehv_layout(SMALL)
    torch.save(_checkpoint(seq), tmp_path / "taew.pth")
    decoder = TinyDecoder.from_checkpoint(tmp_path / "taew.pth", time_upscale=(False, False, False)).eval()
    assert decoder.cfg.time_factor == 1
    # the reference with stride-1 time upsamples holding the last frame's rows of the stride-2 ones
    cheap = _taehv_layout(SMALL, time_strides=[1, 1, 1])
    state = seq.state_dict()
    for k, v in cheap.state_dict().items():
        state[k] = state[k][-v.shape[0] :]
    cheap.load_state_dict(state)
    latents = torch.randn(1, 4, 4, 5, 6)
    got = decoder(latents)[0]
    assert got.shape[1] == 4
    torch.testing.assert_close(got, _reference_decode(cheap, latents), atol=2e-5, rtol=0)


def test_bad_checkpoints_say_what_is_wrong(tmp_path):
    from streamgen.models import MODELS_DIR

    with pytest.raises(FileNotFoundError, match="no tiny decoder checkpoint"):
        TinyDecoder.from_checkpoint(tmp_path / "missing.pth")
    # a model's weights given for it: "ValueError: max() arg is an empty sequence"
    dit = MODELS_DIR / "tiny-avatar" / "dit.safetensors"
    with pytest.raises(
        ValueError, match=f"{dit} is not a tiny decoder checkpoint: none of a tiny decoder's weights"
    ):
        TinyDecoder.from_checkpoint(dit)
    with pytest.raises(ValueError, match="not a TAEHV checkpoint key"):
        from_taehv({"decoder.1.weight": torch.zeros(1), "vae.decoder.conv_in.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="without a decoder"):
        from_taehv({"encoder.0.weight": torch.zeros(1)})
    state = _checkpoint(_taehv_layout(SMALL))
    last = max(int(k.split(".")[1]) for k in state if k.startswith("decoder."))
    state = {k: v for k, v in state.items() if not k.startswith(f"decoder.{last}.")}  # no output conv
    with pytest.raises(ValueError, match="unknown layout"):
        from_taehv(state)


def test_config_from_state_dict_of_the_published_wan_decoder():
    """taew2_1's shapes (on meta): Wan2.1's 16 latent channels, widths 256/128/64/64, 3 blocks a
    stage, frames x4 in the last two stages, 8x the latent's height and width."""
    with torch.device("meta"):
        state = from_taehv(_checkpoint(_taehv_layout(TinyDecoderConfig())))
    cfg = config_from_state_dict(state)
    assert cfg == TinyDecoderConfig()
    assert (cfg.time_factor, cfg.space_factor) == (4, 8)


def _tiny_wan_vae():
    diffusers = pytest.importorskip("diffusers")
    from streamgen.model.wan_vae import WanVAE

    torch.manual_seed(0)
    kwargs = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1)
    return WanVAE(diffusers.AutoencoderKLWan(**kwargs, latents_mean=[0.0] * 4, latents_std=[1.0] * 4).eval())


@torch.no_grad()
def test_on_a_wan_vae_a_stream_keeps_wans_frame_count():
    wan = _tiny_wan_vae()
    decoder = TinyDecoder(SMALL).eval()
    vae = TinyDecoderVAE(wan, decoder)
    latents = torch.randn(1, 4, 7, 5, 6)
    state, chunks = vae.init_state(1), []
    for i, size in ((0, 1), (1, 3), (4, 3)):
        frames, state = vae.decode_stream(latents[:, :, i : i + size], state)
        chunks.append(frames)
    # Wan's layout: the first latent frame is one video frame, every later one four
    assert [c.shape[2] for c in chunks] == [1, 12, 12]
    frames = torch.cat(chunks, 2)
    assert frames.shape == (1, 3, 25, 40, 48) and frames.min() >= -1 and frames.max() <= 1
    whole = decoder(latents.transpose(1, 2))[0][:, 3:].transpose(1, 2) * 2 - 1
    torch.testing.assert_close(frames, whole, atol=2e-5, rtol=0)
    torch.testing.assert_close(vae.decode(latents), whole, atol=2e-5, rtol=0)
    # the encoder is the Wan VAE's
    image = torch.rand(1, 3, 40, 48) * 2 - 1
    torch.testing.assert_close(vae.encode_reference(image), wan.encode_reference(image))


def test_a_decoder_for_other_latents_is_refused():
    wan = _tiny_wan_vae()
    with pytest.raises(ValueError, match="latent channels 16 != 4"):
        TinyDecoderVAE(wan, TinyDecoder(TinyDecoderConfig(widths=(8, 8, 8, 8), blocks_per_stage=1)))


def test_taehv_s_published_decoder_reads_the_wan_vae_s_latents_only(tmp_path):
    """The debug and tiny-avatar autoencoders' latents can have the Wan VAE's shape (tiny-avatar's
    do: 16 channels, 8x, 4x), and TAEHV's decoder made a near-constant grey of them, without a word.
    Fine-tuned to another autoencoder (distill tiny_decoder's init), it is that one's."""
    from streamgen.model.vae import TinyCausalVAE

    torch.save(_checkpoint(_taehv_layout(SMALL)), tmp_path / "taew.pth")
    published = TinyDecoder.from_checkpoint(tmp_path / "taew.pth")
    assert published.made_for == "wan2.1"
    TinyDecoderVAE(_tiny_wan_vae(), published)
    own = TinyCausalVAE(latent_channels=4, temporal_factor=4)
    with pytest.raises(ValueError, match="made for the wan2.1 VAE's latents; this autoencoder's are its own"):
        TinyDecoderVAE(own, published)
    published.made_for = None  # as distill's tiny_decoder.init leaves it, to fine-tune
    TinyDecoderVAE(own, published)
    published.save(tmp_path / "fine-tuned.safetensors")  # (ours: made for what it is exported with)
    assert TinyDecoder.from_checkpoint(tmp_path / "fine-tuned.safetensors").made_for is None


@torch.no_grad()
def test_a_stream_session_streams_through_it():
    from bench.gpu import build_model, start_stream
    from streamgen.stream import StreamSession

    model = build_model("wan2.1-1.3b", 64, 96, "cpu", torch.float32, True, "sdpa")
    model.vae = TinyDecoderVAE(model.vae, TinyDecoder(SMALL).eval())
    session = StreamSession(model, 64, 96, device="cpu", dtype=torch.float32)
    start_stream(session, speech_s=3.0)
    first, _ = session.next_chunk()
    second, _ = session.next_chunk()
    assert first.shape == (9, 64, 96, 3) and second.shape == (12, 64, 96, 3)  # 1 + 4 + 4, then 3 x 4
    assert first.std() > 0


def test_generate_decodes_through_a_tiny_decoder_in_one_process_or_several_and_refuses_a_wrong_one(
    tmp_path, capsys
):
    import av
    from cli_helpers import streamgen

    from streamgen.cli import main

    torch.manual_seed(0)
    TinyDecoder(SMALL).save(tmp_path / "tiny.safetensors")  # the debug model's 4 latent channels
    TinyDecoder(TinyDecoderConfig(widths=(8, 8, 8, 8), blocks_per_stage=1)).save(tmp_path / "wan.safetensors")
    videos = {}
    tiny = ["--tiny-decoder", str(tmp_path / "tiny.safetensors")]
    for name, extra in (("plain", []), ("tiny", tiny)):
        out = tmp_path / f"{name}.mp4"
        assert main(["generate", "--model", "debug", "--out", str(out), "--quiet", *extra]) == 0
        with av.open(str(out)) as c:
            videos[name] = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    assert len(videos["tiny"]) == len(videos["plain"]) >= 25
    assert videos["tiny"][0].shape == (64, 64, 3)
    assert any(abs(a.astype(int) - b).mean() > 5 for a, b in zip(videos["tiny"], videos["plain"]))
    # sequence-parallel, every process decoding whole frames with it: the same video (up to
    # float rounding, which can flip a pixel's rounding before H.264)
    r = streamgen(
        "generate", "--model", "debug", "--sp", "2", *tiny, "--out", str(tmp_path / "sp.mp4"), "--quiet"
    )
    assert r.returncode == 0, r.stderr[-3000:]
    with av.open(str(tmp_path / "sp.mp4")) as c:
        sp = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    assert sp.shape == videos["tiny"].shape
    diff = np.abs(sp.astype(int) - videos["tiny"])
    assert diff.max() <= 3 and diff.mean() < 0.05
    for checkpoint, message in (
        (tmp_path / "missing.pth", "no tiny decoder checkpoint"),
        (
            tmp_path / "wan.safetensors",
            "this tiny decoder does not fit the autoencoder's latents: latent channels 16 != 4",
        ),
    ):
        # in this process: the command's error, not a fresh process's start, is what is checked
        capsys.readouterr()
        code = main(["generate", "--model", "debug", "--tiny-decoder", str(checkpoint),
                     "--out", str(tmp_path / "x.mp4"), "--quiet"])  # fmt: skip
        stderr = capsys.readouterr().err
        assert code == 2 and "Traceback" not in stderr, stderr
        assert stderr.strip().splitlines()[-1].startswith(f"streamgen generate: error: {message}"), stderr


@torch.no_grad()
def test_receptive_radius_bounds_how_far_a_latent_row_reaches():
    """`decoder_receptive_radius` of TAEHV's layout (3 stages of 3 memory blocks): 17.75 latent
    rows, which is why sequence-parallel decoding does not cut it into bands (a halo would be
    most of a frame). Changing one latent row changes output rows up to that far and no further
    (observed 16.25 up, 15.5 down: nearest upsampling makes the reach discrete)."""
    from streamgen.parallel.vae import decoder_receptive_radius, parallel_decoder

    torch.manual_seed(0)
    decoder = TinyDecoder(TinyDecoderConfig(latent_channels=4, widths=(8, 8, 8, 8))).eval()  # TAEHV's depth
    vae = TinyDecoderVAE(_tiny_wan_vae(), decoder)
    radius = decoder_receptive_radius(vae)
    assert radius == 17.75
    z = torch.randn(1, 2, 4, 48, 3)
    moved = z.clone()
    moved[:, :, :, 24] += 1.0  # latent row 24: output rows 192-199
    a, _ = decoder(z, clamp=False)
    b, _ = decoder(moved, clamp=False)
    rows = ((a - b).abs().amax(dim=(0, 1, 2, 4)) > 0).nonzero().flatten()
    reach = max(192 - rows.min().item(), rows.max().item() - 199) / 8
    assert radius - 2 <= reach <= radius
    # so every process decodes whole frames (the group is not consulted for it)
    assert parallel_decoder(vae, 60, group=object()) is vae


@pytest.mark.gpu_first
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@torch.no_grad()
def test_on_cuda_in_bf16_chunk_by_chunk_it_decodes_as_fp32_on_the_cpu():
    """TAEHV's shape (random weights) at 416x240's latents: cuDNN's bf16 convolutions, streamed in
    chunks, against the CPU's float32 over the whole clip (unclamped, relative to the output's
    spread; bf16 on this CPU: 1.7% at most, 0.25% on average)."""
    torch.manual_seed(0)
    decoder = TinyDecoder().eval()
    latents = torch.randn(1, 3, 16, 30, 52)
    expected, _ = decoder(latents, clamp=False)
    cuda = TinyDecoder().eval()
    cuda.load_state_dict(decoder.state_dict())
    cuda = cuda.to("cuda", torch.bfloat16)
    z = latents.to("cuda", torch.bfloat16)
    first, memory = cuda(z[:, :1], clamp=False)
    rest, _ = cuda(z[:, 1:], memory, clamp=False)
    got = torch.cat([first, rest], 1).float().cpu()
    assert got.shape == expected.shape == (1, 12, 3, 240, 416)
    spread = expected.std()
    assert (got - expected).abs().max() < 0.08 * spread and (got - expected).abs().mean() < 0.01 * spread
