"""Both autoencoders decode a stream chunk by chunk exactly as the whole clip."""

import pytest
import torch
from diffusers import AutoencoderKLWan
from torch.nn.functional import pad as F_pad

from streamgen.folders import EXPORT_STAMP
from streamgen.model.upsample import UpsampleConv2d
from streamgen.model.vae import ResBlock2d, TinyCausalVAE
from streamgen.model.wan_vae import WanVAE


def decode_in_chunks(vae, z, sizes):
    state, parts, i = vae.init_state(z.shape[0]), [], 0
    for n in sizes:
        frames, state = vae.decode_stream(z[:, :, i : i + n], state)
        parts.append(frames)
        i += n
    return torch.cat(parts, dim=2)


@pytest.mark.parametrize("decoder_widths", [None, (4, 8, 16, 32)], ids=["decoder_as_encoder", "own_decoder_widths"])
@pytest.mark.parametrize("res_blocks", [0, 1])
@torch.no_grad()
def test_tiny_vae_chunked_decode_equals_full_decode(res_blocks, decoder_widths):
    torch.manual_seed(0)
    vae = TinyCausalVAE(8, (8, 16, 16, 24), res_blocks=res_blocks, decoder_widths=decoder_widths).eval()
    video = torch.rand(1, 3, 24, 32, 32) * 2 - 1
    z = vae.encode(video)
    assert z.shape == (1, 8, 6, 4, 4)
    full = vae.decode(z)
    assert full.shape == video.shape
    assert torch.allclose(decode_in_chunks(vae, z, [2, 1, 3]), full, atol=1e-6)
    # causal: changing the last latent frame leaves earlier frames alone
    z2 = z.clone()
    z2[:, :, -1] += 1
    assert torch.equal(vae.decode(z2)[:, :, :-4], full[:, :, :-4])
    assert not torch.equal(vae.decode(z2)[:, :, -4:], full[:, :, -4:])


@pytest.mark.parametrize("threads", [2, 3, 8])
@torch.no_grad()
def test_tiny_vae_decodes_its_frames_side_by_side_with_the_same_frames_and_state(threads):
    """frame_threads: the latent frames of every stream decoded on threads of their own (each
    convolution on one thread) give the frames and the state that one batch does (to 1e-5)."""
    torch.manual_seed(0)
    vae = TinyCausalVAE(8, (8, 16, 16, 24), res_blocks=1).eval()
    z = torch.randn(2, 8, 3, 4, 4)
    state = torch.randn(2, 1, 24, 4, 4)
    frames, last = vae.decode_stream(z, state)
    apart, last_apart = vae.decode_stream(z, state, frame_threads=threads)
    assert apart.shape == frames.shape == (2, 3, 12, 32, 32)
    assert (apart - frames).abs().max() <= 1e-5 and torch.equal(last_apart, last)
    # a batch of streams, states and none
    for states in ([None, None], list(state.split(1)), [None, state[:1]]):
        frames, last = vae.decode_streams(z, states)
        apart, last_apart = vae.decode_streams(z, states, frame_threads=threads)
        assert (apart - frames).abs().max() <= 1e-5
        assert all(torch.equal(a, b) for a, b in zip(last_apart, last))


@pytest.mark.parametrize("res_blocks", [0, 2])
@torch.no_grad()
def test_tiny_vae_save_load(tmp_path, res_blocks):
    vae = TinyCausalVAE(latent_channels=4, widths=(8, 8, 8, 8), res_blocks=res_blocks).eval()
    vae.latent_std.fill_(2.0)
    vae.save(tmp_path)
    again = TinyCausalVAE.load(tmp_path).eval()
    z = torch.randn(1, 4, 2, 4, 4)
    assert torch.equal(vae.decode(z), again.decode(z))
    assert ("res_blocks" in vae.config) == bool(res_blocks)  # configs saved before the option load as before
    assert "decoder_widths" not in vae.config


@torch.no_grad()
def test_tiny_vae_with_its_own_decoder_widths_saves_loads_and_decodes_batched_streams(tmp_path):
    vae = TinyCausalVAE(4, (8, 8, 8, 8), res_blocks=1, decoder_widths=(4, 8, 12, 16)).eval()
    assert vae.dec_in.out_channels == 16 and vae.dec[-1].in_channels == 4
    vae.save(tmp_path)
    again = TinyCausalVAE.load(tmp_path).eval()
    assert again.config["decoder_widths"] == [4, 8, 12, 16]
    z = torch.randn(2, 4, 3, 4, 4)
    assert torch.equal(vae.decode(z), again.decode(z))
    # two streams as one batch, with their states stacked, give each stream's own frames
    first, states = vae.decode_streams(z[:, :, :2], [None, None])
    frames, _ = vae.decode_streams(z[:, :, 2:], states)
    alone = vae.decode(z[1:])
    assert torch.allclose(torch.cat([first, frames], 2)[1:], alone, atol=1e-6)
    with pytest.raises(ValueError, match="as many scales"):
        TinyCausalVAE(4, (8, 8, 8, 8), decoder_widths=(4, 8, 8))


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_upsample_conv_equals_upsample_then_conv(channels_last, bias):
    """The low-resolution phase computation is nearest 2x upsampling then the 3x3 conv, values and grads."""
    torch.manual_seed(0)
    fused = UpsampleConv2d(5, 7)
    if not bias:
        fused.bias = None
    plain = torch.nn.Conv2d(5, 7, 3, padding=1, bias=bias)
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(2, 5, 7, 4)  # odd height, non-square
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1 = fused(x1)
    y2 = plain(torch.nn.functional.interpolate(x2, scale_factor=2, mode="nearest"))
    assert y1.shape == (2, 7, 14, 8)
    assert torch.allclose(y1, y2, atol=1e-5)
    g = torch.randn_like(y2)
    y1.backward(g)
    y2.backward(g)
    assert torch.allclose(x1.grad, x2.grad, atol=1e-5)
    assert torch.allclose(fused.weight.grad, plain.weight.grad, atol=1e-4)
    if bias:
        assert torch.allclose(fused.bias.grad, plain.bias.grad, atol=1e-4)


def test_upsample_conv_keeps_its_folded_weights_only_while_the_weight_is_unchanged():
    torch.manual_seed(0)
    conv = UpsampleConv2d(3, 4)
    plain = torch.nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(1, 3, 5, 6)

    def check():
        plain.load_state_dict(conv.state_dict())
        with torch.no_grad():
            want = plain(torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest"))
            assert torch.allclose(conv(x), want, atol=1e-5)

    with torch.no_grad():
        assert conv.phase_weights() is conv.phase_weights()  # folded once while nothing changes
        check()
        conv.weight.mul_(-2)  # in place (an optimizer step, load_state_dict): folded again
    check()
    conv.load_state_dict({"weight": torch.randn(4, 3, 3, 3), "bias": torch.zeros(4)})
    check()
    conv.double()  # a new tensor
    x = x.double()
    plain.double()
    check()
    assert conv.phase_weights().requires_grad  # with autograd: folded per call, gradients flow


@torch.no_grad()
def test_tiny_vae_loads_checkpoints_of_the_upsample_layer_layout():
    """Checkpoints with an nn.Upsample before each upsampling conv (the shipped autoencoder's) load unchanged."""
    torch.manual_seed(0)
    vae = TinyCausalVAE(latent_channels=4, widths=(8, 12, 16), res_blocks=1).eval()
    # the decoder as it was built before UpsampleConv2d, with its own random weights
    legacy = [ResBlock2d(16), ResBlock2d(16)]
    for a, b in [(16, 12), (12, 8)]:
        legacy += [torch.nn.Upsample(scale_factor=2), torch.nn.Conv2d(a, b, 3, padding=1), torch.nn.SiLU()]
        legacy += [ResBlock2d(b)]
    legacy += [torch.nn.Conv2d(8, 12, 3, padding=1)]
    legacy = torch.nn.Sequential(*legacy)
    state = {k: v for k, v in vae.state_dict().items() if not k.startswith("dec.")}
    state.update({f"dec.{k}": v for k, v in legacy.state_dict().items()})
    vae.load_state_dict(state)  # strict: every key finds its layer
    x = torch.randn(2, 16, 5, 6)
    assert torch.allclose(vae.dec(x), legacy(x), atol=1e-5)
    # and our own layout round-trips untouched
    again = TinyCausalVAE(latent_channels=4, widths=(8, 12, 16), res_blocks=1)
    again.load_state_dict(vae.state_dict())
    assert torch.equal(again.dec(x), vae.dec(x))


@pytest.mark.parametrize("frames_per_call", [None, 1])
@torch.no_grad()
def test_wan_vae_chunked_decode_equals_full_decode(frames_per_call):
    """Whole chunks through the decoder in one call (the default) or one latent frame per call
    (diffusers' way): the same frames as diffusers' own decode."""
    torch.manual_seed(0)
    wan = AutoencoderKLWan(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 2, 2, 2],
        num_res_blocks=1,
        latents_mean=[0.1, -0.2, 0.0, 0.3],
        latents_std=[1.5, 0.5, 1.0, 2.0],
    ).eval()
    vae = WanVAE(wan, frames_per_call=frames_per_call)
    assert (vae.temporal_factor, vae.spatial_factor) == (4, 8)
    video = torch.rand(1, 3, 21, 32, 32) * 2 - 1
    z = vae.encode(video)
    assert z.shape == (1, 4, 6, 4, 4)
    full = vae.decode(z)
    # diffusers' own decode of the de-normalised latents is the reference
    mean = torch.tensor(wan.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(wan.config.latents_std).view(1, -1, 1, 1, 1)
    assert torch.allclose(full, wan.decode(z * std + mean).sample, atol=1e-5)
    assert full.shape[2] == 21
    for sizes in ([1, 2, 3], [3, 3], [2, 1, 3]):  # a stream's first chunk starts with the 1-frame latent
        assert torch.allclose(decode_in_chunks(vae, z, sizes), full, atol=1e-5), sizes
    assert full.abs().max() <= 1.0


def tiny_wan_vae() -> WanVAE:
    torch.manual_seed(0)
    wan = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                           latents_mean=[0.0] * 4, latents_std=[1.0] * 4)  # fmt: skip
    return WanVAE(wan.eval())


@torch.no_grad()
def test_wan_vae_single_frame_convolutions_run_2d_with_the_same_latents_and_frames():
    """A reference image, a clip's first frame and a stream's first latent frame meet zeros in
    every earlier temporal tap: as 2D convolutions they give the same values for a third of the
    3x3x3 convolutions' work, and turned off it is diffusers' forward again."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d
    from torch.utils.flop_counter import FlopCounterMode

    vae = tiny_wan_vae()
    image, video = torch.rand(1, 3, 32, 32) * 2 - 1, torch.rand(1, 3, 9, 32, 32) * 2 - 1
    z = torch.randn(1, 4, 5, 4, 4)

    def flops(fn):
        with FlopCounterMode(display=False) as counter:
            out = fn()
        return out, counter.get_total_flops()

    def run():
        reference, encode_flops = flops(lambda: vae.encode_reference(image))
        first, decode_flops = flops(lambda: vae.decode_stream(z[:, :, :1], vae.init_state(1))[0])
        return (
            reference,
            first,
            vae.encode(video),
            decode_in_chunks(vae, z, [1, 2, 2]),
            encode_flops,
            decode_flops,
        )

    assert vae.single_frame_2d  # the default
    fast = run()
    vae.single_frame_2d = False
    convs = [m for m in vae.modules() if isinstance(m, WanCausalConv3d)]
    assert not any("forward" in m.__dict__ for m in convs)  # diffusers' own forward
    plain = run()
    for a, b in zip(fast[:4], plain[:4]):
        assert a.shape == b.shape and (a - b).abs().max() <= 1e-5
    # the 2D path was taken: the convolutions' work falls by almost 3x where they are 3x3x3
    assert fast[4] < 0.45 * plain[4] and fast[5] < 0.6 * plain[5]
    vae.single_frame_2d = True
    assert all("forward" in m.__dict__ for m in convs)


@torch.no_grad()
def test_wan_vae_fused_norms_take_the_decoders_norms_through_the_kernel_dispatch(monkeypatch):
    from streamgen import kernels

    vae, z = tiny_wan_vae(), torch.randn(1, 4, 3, 4, 4)
    keys, plain = set(vae.state_dict()), vae.decode(z)
    calls, fused = [], kernels.rmsnorm_channels
    monkeypatch.setattr(
        kernels, "rmsnorm_channels", lambda *a, **k: calls.append((a[0].dim(), k["silu"])) or fused(*a, **k)
    )
    vae.fused_norms = True
    # on a CPU the dispatch runs diffusers' arithmetic: the same frames, bit for bit (a SiLU
    # applied twice, or lost, would change them)
    assert torch.equal(vae.decode(z), plain)
    # its attention's norm is 4D and feeds no SiLU; the residual blocks' and the head's do
    assert calls and set(calls) == {(4, False), (5, True)}
    n = len(calls)
    vae.encode(torch.rand(1, 3, 5, 32, 32))
    assert len(calls) == n and set(vae.state_dict()) == keys  # the encoder keeps diffusers' norms
    vae.fused_norms = False
    vae.decode(z)
    assert len(calls) == n


@torch.no_grad()
def test_wan_vae_pads_inside_its_convolutions_with_the_same_frames(monkeypatch):
    vae, z = tiny_wan_vae(), torch.randn(1, 4, 5, 4, 4)
    plain = decode_in_chunks(vae, z, [1, 2, 2])
    pads = []
    monkeypatch.setattr(
        torch.nn.functional, "pad", lambda x, p, *a, **k: pads.append(tuple(p)) or F_pad(x, p, *a, **k)
    )
    vae.pad_in_conv = True
    inside = decode_in_chunks(vae, z, [1, 2, 2])
    assert torch.allclose(inside, plain, atol=1e-5) and inside.shape == plain.shape
    assert all(p[:4] == (0, 0, 0, 0) for p in pads)  # only the causal zeros before a stream's first frame
    vae.pad_in_conv = False
    pads.clear()
    assert torch.equal(decode_in_chunks(vae, z, [1, 2, 2]), plain)
    assert any(p[:4] != (0, 0, 0, 0) for p in pads)  # padding every side again, as diffusers does


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wan_vae_channels_last_convolutions_give_the_same_frames(monkeypatch, dtype):
    # in bf16 this CPU's convolutions compute channels-last, as cuDNN's do on a GPU: the layout
    # then carries from layer to layer; in fp32 the CPU converts back, and only the values matter
    vae, z = tiny_wan_vae(), torch.randn(1, 4, 5, 4, 4)
    vae.vae.to(dtype)
    vae.frames_per_call = None
    plain = decode_in_chunks(vae, z.to(dtype), [1, 2, 2])
    seen, conv3d = [], torch.nn.functional.conv3d
    monkeypatch.setattr(
        torch.nn.functional,
        "conv3d",
        lambda x, w, *a: (
            seen.append((x.is_contiguous(memory_format=torch.channels_last_3d), w.dim())) or conv3d(x, w, *a)
        ),
    )
    for pad_in_conv in (False, True):
        vae.channels_last, vae.pad_in_conv = True, pad_in_conv
        fast = decode_in_chunks(vae, z.to(dtype), [1, 2, 2])
        assert fast.shape == plain.shape and fast.dtype == dtype
        tol = 1e-5 if dtype == torch.float32 else 0.05  # bf16: other kernels, other roundings
        assert (fast.float() - plain.float()).abs().max() <= tol
        assert seen and all(cl for cl, _ in seen)  # every 3D convolution's input channels-last
        seen.clear()
    weights = [
        m.weight for m in vae.vae.decoder.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))
    ]
    assert all(
        w.is_contiguous(memory_format=torch.channels_last_3d if w.dim() == 5 else torch.channels_last)
        for w in weights
    )
    vae.channels_last = vae.pad_in_conv = False
    assert all(w.is_contiguous() for w in weights)
    assert torch.equal(decode_in_chunks(vae, z.to(dtype), [1, 2, 2]), plain)  # diffusers' forward again


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wan_vae_upsamples_at_low_resolution_with_the_same_frames_and_fewer_flops(monkeypatch, dtype):
    """diffusers' upsamplers (nearest 2x in fp32, then a 3x3 convolution) as one 2x2 convolution
    per output phase: the same frames for 16/36 of those convolutions' work, in either layout,
    the state dict unchanged, and turned off diffusers' forward again."""
    import copy

    from diffusers.models.autoencoders.autoencoder_kl_wan import WanResample
    from torch.utils.flop_counter import FlopCounterMode

    vae, z = tiny_wan_vae(), torch.randn(1, 4, 5, 4, 4, dtype=dtype)
    vae.vae.to(dtype)
    keys = set(vae.state_dict())
    upsamplers = [m for m in vae.vae.decoder.modules() if isinstance(m, WanResample) and "up" in m.mode]
    assert len(upsamplers) == 3

    inputs = []  # the upsamplers' input shapes, decoding the chunks
    for m in upsamplers:
        m.resample.register_forward_pre_hook(
            lambda m, args: inputs.append((m[1].out_channels, *args[0].shape))
        )

    def decode():
        inputs.clear()
        with FlopCounterMode(display=False) as counter:
            frames = decode_in_chunks(vae, z, [1, 2, 2])
        return frames, counter.get_total_flops()

    plain, plain_flops = decode()
    interpolations = []
    interpolate = torch.nn.functional.interpolate
    monkeypatch.setattr(
        torch.nn.functional, "interpolate", lambda *a, **k: interpolations.append(1) or interpolate(*a, **k)
    )
    tol = 1e-5 if dtype == torch.float32 else 0.05  # bf16: other products, other roundings
    for channels_last in (False, True):
        vae.channels_last, vae.upsample_phases = channels_last, True
        fast, fast_flops = decode()
        assert fast.shape == plain.shape and fast.dtype == dtype
        assert (fast.float() - plain.float()).abs().max() <= tol
        assert not interpolations  # no upsampled copy
        # the upsamplers' convolutions: 4 phases of 2x2 taps over (h+1)x(w+1) (the border row and
        # column that the interleaving drops) where there were 3x3 taps over 2h x 2w
        saved = sum(2 * n * o * c * (9 * 4 * h * w - 4 * 4 * (h + 1) * (w + 1)) for o, n, c, h, w in inputs)
        assert saved > 0 and fast_flops == plain_flops - saved
        assert set(vae.state_dict()) == keys
    twin = copy.deepcopy(vae)  # a copy's upsamplers use its own weights
    with torch.no_grad():
        for m in twin.vae.decoder.modules():
            if isinstance(m, WanResample) and "up" in m.mode:
                m.resample[1].weight.zero_()
    assert torch.equal(decode_in_chunks(vae, z, [1, 2, 2]), fast)
    assert not torch.equal(decode_in_chunks(twin, z, [1, 2, 2]), fast)
    vae.channels_last = vae.upsample_phases = False
    again, again_flops = decode()
    assert torch.equal(again, plain) and again_flops == plain_flops and interpolations


@torch.no_grad()
def test_wan_vae_compiled_decoder_is_captured_whole_and_undone():
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    dynamo.reset()  # no graphs of an earlier test's decoder to reuse
    vae, z = tiny_wan_vae(), torch.randn(1, 4, 7, 4, 4)
    vae.frames_per_call = None
    plain = decode_in_chunks(vae, z, [1, 3, 3])
    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    vae.compiled_decoder = "aot_eager"  # dynamo's capture without Inductor's compile: seconds on a CPU
    assert torch.equal(decode_in_chunks(vae, z, [1, 3, 3]), plain)
    # the first latent frame, the rest of the first chunk, a steady chunk; the caches go through
    assert (
        counters["stats"]["unique_graphs"] - graphs == 3 and sum(counters["graph_break"].values()) == breaks
    )
    vae.compiled_decoder = None
    assert vae.vae.decoder._compiled_call_impl is None
    assert torch.equal(decode_in_chunks(vae, z, [1, 3, 3]), plain)


@torch.no_grad()
def test_bfloat16_decoder_shares_the_encoder_and_stays_close():
    """A bf16 decoder copy: the encoder is the same modules, frames come back fp32, near the fp32 decode."""
    torch.manual_seed(0)
    vae = TinyCausalVAE(latent_channels=4, widths=(8, 12, 16), res_blocks=1).eval()
    assert vae.with_dtypes(decoder=torch.float32) is vae
    half = vae.with_dtypes(decoder=torch.bfloat16)
    assert half.enc is vae.enc and half.enc_out is vae.enc_out
    assert half.dec_in.weight.dtype == torch.bfloat16 and vae.dec_in.weight.dtype == torch.float32
    assert half.dec[-1].weight.is_contiguous(memory_format=torch.channels_last)
    z = vae.encode(torch.rand(1, 3, 12, 16, 16) * 2 - 1)
    full, half_full = vae.decode(z), half.decode(z)
    assert half_full.dtype == torch.float32
    assert 0 < (half_full - full).abs().max() < 0.05  # bf16 rounding, a few 8-bit levels at most
    assert torch.equal(decode_in_chunks(half, z, [1, 2]), half_full)  # the stream state is bf16 too


@torch.no_grad()
def test_bfloat16_encoder_copy_shares_the_decoder_and_stays_close():
    torch.manual_seed(0)
    vae = TinyCausalVAE(latent_channels=4, widths=(8, 12, 16), res_blocks=1).eval()
    assert vae.with_dtypes() is vae and vae.with_dtypes(torch.float32, torch.float32) is vae
    enc = vae.with_dtypes(encoder=torch.bfloat16)
    assert enc.dec is vae.dec and enc.dec_in is vae.dec_in and enc.dec_mix is vae.dec_mix
    assert enc.enc[0].weight.dtype == enc.enc_mix.weight.dtype == enc.enc_out.weight.dtype == torch.bfloat16
    assert vae.enc[0].weight.dtype == torch.float32
    both = vae.with_dtypes(torch.bfloat16, torch.bfloat16)
    assert both.dec_in.weight.dtype == both.enc_out.weight.dtype == torch.bfloat16
    image = torch.rand(1, 3, 16, 16) * 2 - 1
    full, half = vae.encode_reference(image), enc.encode_reference(image.bfloat16())
    assert half.dtype == torch.float32  # normalised by the fp32 latent statistics
    assert 0 < (half - full).abs().max() < 0.05 * full.abs().max()


@pytest.mark.parametrize(
    "config, says",
    [
        ("[4, 8]", "not a JSON object"),
        ('"tiny"', "not a JSON object"),
        ('{"latent_channels": 4, "wings": 2}', "does not fit TinyCausalVAE"),
    ],
)
def test_a_vae_config_of_another_shape_in_the_weights_names_their_file(tmp_path, config, says):
    """Valid JSON that is not an object (or not TinyCausalVAE's arguments) was a TypeError from
    TinyCausalVAE(**config), which named no file and escaped every command's handling of a spoilt
    model directory (a ValueError naming its file)."""
    from safetensors.torch import save_file

    vae = TinyCausalVAE(latent_channels=4)
    vae.save(tmp_path)
    state = {k: v.contiguous() for k, v in vae.state_dict().items()}
    save_file(state, str(tmp_path / "vae.safetensors"), metadata={"vae_config": config})
    with pytest.raises(ValueError, match=f"vae.safetensors: its vae_config is {says}"):
        TinyCausalVAE.load(tmp_path)
    (tmp_path / "vae.safetensors").unlink()
    save_file(state, str(tmp_path / "vae.safetensors"))  # (weights saved before they carried it)
    (tmp_path / "vae_config.json").write_text(config)
    with pytest.raises(ValueError, match=f"vae_config.json: {says}"):
        TinyCausalVAE.load(tmp_path)


def _as_a_mount_point(monkeypatch, folder: str):
    """`folder` as a volume mounted there looks to a writer: os.path.ismount says so, no exchange
    with it (EBUSY), and no rename across its edge (EXDEV)."""
    import errno
    import os

    from streamgen import folders

    def inside(path) -> bool:
        path = os.path.realpath(path)
        return path == folder or path.startswith(f"{folder}/")

    def across(real):
        def rename(src, dst, *args, **kwargs):
            if inside(src) != inside(dst):
                raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), str(src), None, str(dst))
            return real(src, dst, *args, **kwargs)

        return rename

    def exchange(a, b) -> bool:
        if inside(a) != inside(b) or folder in (os.path.realpath(a), os.path.realpath(b)):
            return False
        return real_exchange(a, b)

    real_ismount, real_exchange = os.path.ismount, folders.exchange
    monkeypatch.setattr(os.path, "ismount", lambda p: os.path.realpath(p) == folder or real_ismount(p))
    monkeypatch.setattr(folders, "exchange", exchange)
    monkeypatch.setattr(os, "replace", across(os.replace))
    monkeypatch.setattr(os, "rename", across(os.rename))


@pytest.mark.parametrize("mount", ["simulated", "tmpfs"])
@torch.no_grad()
def test_wan_vae_saves_into_a_wan_vae_folder_that_is_a_mount_point(tmp_path, monkeypatch, mount):
    """A wan_vae/ that is a volume of its own: its new folder, staged beside it, could not be put in
    its place (EBUSY), nor its files moved into it (EXDEV), and the save failed. It is written
    into the folder itself, file by file; the old export's other files go."""
    import os
    import subprocess

    folder = tmp_path / WanVAE.DIRECTORY
    folder.mkdir()
    if mount == "tmpfs":
        if not hasattr(os, "geteuid") or os.geteuid() != 0:
            pytest.skip("needs root, to mount a file system")
        if subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(folder)], capture_output=True).returncode:
            pytest.skip("cannot mount a tmpfs here")
    else:
        _as_a_mount_point(monkeypatch, os.path.realpath(folder))
    try:
        (folder / "left_by_an_older_export.safetensors").write_bytes(b"old")
        vae = tiny_wan_vae()
        vae.save(tmp_path)
        written = sorted(p.name for p in folder.iterdir())
        assert written == [EXPORT_STAMP, "config.json", "diffusion_pytorch_model.safetensors"]
        assert sorted(p.name for p in tmp_path.iterdir()) == [WanVAE.DIRECTORY]
        monkeypatch.undo()
        z = torch.randn(1, 4, 2, 4, 4)
        assert torch.equal(vae.decode(z), WanVAE.load(tmp_path).decode(z))
    finally:
        if mount == "tmpfs":
            import gc

            gc.collect()  # (the loaded weights map their file: the volume is busy while they live)
            subprocess.run(["umount", "--lazy", str(folder)], check=True)


@pytest.mark.parametrize("mount", [False, True])
@torch.no_grad()
def test_wan_vae_files_have_the_umasks_mode(tmp_path, monkeypatch, mount):
    """save_pretrained's weights (safetensors' save_file, a file of its own renamed into place) are
    0600, the writer's alone: a server run as another user could not load the model's autoencoder.
    Put in place whole or written into a mount point, they have the mode open() gives (the umask's)."""
    import os
    import stat

    folder = tmp_path / WanVAE.DIRECTORY
    folder.mkdir()
    if mount:
        _as_a_mount_point(monkeypatch, os.path.realpath(folder))
    umask = os.umask(0o022)
    try:
        tiny_wan_vae().save(tmp_path)
    finally:
        os.umask(umask)
    modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in folder.iterdir()}
    stamp = {EXPORT_STAMP: oct(0o644)} if mount else {}  # (written in place)
    assert modes == {**stamp, "config.json": oct(0o644), "diffusion_pytorch_model.safetensors": oct(0o644)}
