"""`streamgen bench wan-decoder --json`: the Wan VAE decoder (its real architecture, random
weights) decoding a stream's chunks each way `WanVAE` can run it, on any device; TAEHV's
tiny decoder of the same latents (streamgen/model/tiny_decoder.py, random weights); and the
Wan encoder's reference encode (a stream's start) with and without `WanVAE.single_frame_2d`.

`bench gpu` times these ways at 832x480 on the GPU inside its run (`decoder`, and the stream
with the fastest of them); this runs them alone, at any size and dtype, e.g. on this CPU:

    streamgen bench wan-decoder --json --device cpu --height 64 --width 96 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import numpy as np
import torch

from bench.ceilings import synchronize
from bench.rounds import balanced_order, ratio_rounds
from streamgen.cli import MAX_FRAME_SIZE, positive_int, thread_count

_PLAIN_DECODER = {
    "frames_per_call": 1, "fused_norms": False, "pad_in_conv": False, "channels_last": False,
    "compiled_decoder": None, "single_frame_2d": False, "upsample_phases": False,
}  # fmt: skip
# the other ways run a stream's first latent frame as the default does (WanVAE.single_frame_2d)
_CHUNK = {**_PLAIN_DECODER, "frames_per_call": None, "single_frame_2d": True}
DECODER_WAYS = {  # WanVAE's switches; the first is diffusers' way, the reference of the others
    "frame_per_call": _PLAIN_DECODER,
    "chunk_per_call": _CHUNK,
    "chunk_per_call+fused_norms": {**_CHUNK, "fused_norms": True},
    "chunk_per_call+fused_norms+pad_in_conv": {**_CHUNK, "fused_norms": True, "pad_in_conv": True},
    "chunk_per_call+channels_last": {**_CHUNK, "channels_last": True},
    "chunk_per_call+fused_norms+pad_in_conv+channels_last": {
        **_CHUNK,
        "fused_norms": True,
        "pad_in_conv": True,
        "channels_last": True,
    },
    "chunk_per_call+upsample_phases": {**_CHUNK, "upsample_phases": True},
    "chunk_per_call+fused_norms+pad_in_conv+channels_last+upsample_phases": {
        **_CHUNK,
        "fused_norms": True,
        "pad_in_conv": True,
        "channels_last": True,
        "upsample_phases": True,
    },
    "chunk_per_call+compiled": {**_CHUNK, "compiled_decoder": "inductor"},
}
# compiling takes longest: timed with the variants slowest to prepare (`decoder_compiled`)
SLOW_DECODER_WAYS = ("chunk_per_call+compiled",)
# not a way of the Wan decoder but another decoder of its latents (streamgen/model/tiny_decoder.py):
# timed beside the ways, never picked as the fastest of them (its frames are not the Wan decoder's)
TINY_DECODER = "tiny_decoder"


def tiny_decoder_vae(vae, checkpoint=None):
    """`vae` decoding through TAEHV's decoder: `checkpoint`'s weights (taew2_1.pth), else seeded
    random ones of its shape for these latents, on the autoencoder's device and in its dtype."""
    from streamgen.model.tiny_decoder import TinyDecoder, TinyDecoderConfig, TinyDecoderVAE

    weight = next(vae.parameters())
    if checkpoint is not None:
        decoder = TinyDecoder.from_checkpoint(checkpoint)
    else:
        torch.manual_seed(0)
        with torch.device(weight.device):
            decoder = TinyDecoder(TinyDecoderConfig(latent_channels=vae.latent_channels))
    return TinyDecoderVAE(vae, decoder.to(weight.device, weight.dtype).eval())


def decoder_variants(model, device, dtype, names=None, chunks: int = 5) -> dict:
    """The Wan decoder on a stream's steady chunks (3 latent frames each, after its first chunk),
    each way it can run (`DECODER_WAYS`, or `names` of them): one latent frame per decoder call
    (diffusers') or the whole chunk in one; then with its RMSNorms (and their SiLUs) fused
    (`kernels.rmsnorm_channels`), with those and its convolutions padding inside, channels-last,
    all three, its upsamplers at low resolution (`WanVAE.upsample_phases`), all four, and under
    torch.compile. Per way: ms per chunk (median; the first two chunks, untimed, search
    or compile), `first_chunk_ms`, and how far its last chunk's frames are from diffusers' way's;
    or the error that stopped it. `TINY_DECODER` among `names` times TAEHV's decoder (random
    weights) on the same latents; its `max_abs_diff` is None (asked alone, diffusers' way is not
    run: nothing to compare with it)."""
    wan, sync = model.vae, synchronize(device)
    z = torch.randn(1, wan.latent_channels, 3 * (chunks + 2), model.height // wan.spatial_factor,
                    model.width // wan.spatial_factor, device=device, dtype=dtype)  # fmt: skip
    reference_way = next(iter(DECODER_WAYS))
    names = list(names or DECODER_WAYS)
    if any(n != TINY_DECODER for n in names):  # the Wan ways' frames are compared with diffusers'
        names = [reference_way] + [n for n in names if n != reference_way]

    @torch.no_grad()
    def decode_chunks(vae=wan):
        state, times = vae.init_state(1), []
        for i in range(chunks + 2):
            sync()
            t = time.perf_counter()
            frames, state = vae.decode_stream(z[:, :, 3 * i : 3 * i + 3], state)
            sync()
            times.append(time.perf_counter() - t)
        return frames, times

    result, reference = {}, None
    for name in names:
        try:
            if name == TINY_DECODER:
                frames, times = decode_chunks(tiny_decoder_vae(wan))
            else:
                frames, times = with_attributes(wan, DECODER_WAYS[name], decode_chunks)
        except Exception as e:  # a new kernel's fault must not cost the other ways
            result[name] = {"error": f"{type(e).__name__}: {e}"[:400]}
            continue
        if name != TINY_DECODER:
            reference = frames if reference is None else reference
        result[name] = {
            "ms_p50": round(float(np.median(times[2:])) * 1000, 2),
            "first_chunk_ms": round(times[0] * 1000, 1),
            "max_abs_diff": None
            if name == TINY_DECODER
            else float(f"{(frames.float() - reference.float()).abs().max().item():.3g}"),
        }
    return result


def reference_encode_ways(vae, height: int, width: int, device, dtype, rounds: int = 4) -> dict:
    """A stream's start encodes its reference image with the Wan encoder: diffusers' way (3D
    convolutions over the image and the zeros before it) and as `WanVAE.single_frame_2d` does
    it, in alternating rounds after one untimed each, the order reversed every other round
    (bench/rounds.py; an even number of rounds balances the medians). Per way: ms (median), TFLOP
    counted; for the 2D way how far its latents are from diffusers', and its `speedup` over them
    (the medians' ratio; `speedup_rounds`: each round's, their median, min and max)."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    image = torch.rand(1, 3, height, width, device=device, dtype=dtype) * 2 - 1
    sync, ways = synchronize(device), {"diffusers": False, "single_frame_2d": True}
    times, latents, flops = {name: [] for name in ways}, {}, {}

    @torch.no_grad()
    def encode(name):
        return with_attributes(vae, {"single_frame_2d": ways[name]}, lambda: vae.encode_reference(image))

    for name in ways:
        with FlopCounterMode(display=False) as counter:
            latents[name] = encode(name)
        flops[name] = counter.get_total_flops()
    for _, name in balanced_order(ways, rounds):
        sync()
        t = time.perf_counter()
        encode(name)
        sync()
        times[name].append(time.perf_counter() - t)
    result = {
        name: {
            "ms_p50": round(float(np.median(times[name])) * 1000, 2),
            "tflop": float(f"{flops[name] / 1e12:.4g}"),
        }
        for name in ways
    }
    diff = (latents["single_frame_2d"].float() - latents["diffusers"].float()).abs().max().item()
    result["single_frame_2d"]["max_abs_diff"] = float(f"{diff:.3g}")
    ms = {name: float(np.median(t)) for name, t in times.items()}
    result["single_frame_2d"]["speedup"] = round(ms["diffusers"] / ms["single_frame_2d"], 3)
    result["single_frame_2d"]["speedup_rounds"] = ratio_rounds(times["diffusers"], times["single_frame_2d"])
    return result


def fastest_decoder_way(ways: dict, max_abs_diff: float = 0.1) -> str | None:
    """The fastest of `decoder_variants`' ways of the Wan decoder whose frames stay within
    `max_abs_diff` of diffusers' way (frames in [-1, 1]; bf16 kernels differ by a few hundredths),
    or None."""
    timed = {
        n: w["ms_p50"]
        for n, w in ways.items()
        if "ms_p50" in w and w["max_abs_diff"] is not None and w["max_abs_diff"] <= max_abs_diff
    }
    return min(timed, key=timed.get) if timed else None


def with_attributes(obj, values: dict, fn):
    """fn() with obj's attributes set to `values`, restored afterwards."""
    saved = {name: getattr(obj, name) for name in values}
    for name, value in values.items():
        setattr(obj, name, value)
    try:
        return fn()
    finally:
        for name, value in saved.items():
            setattr(obj, name, value)


# the Wan2.1 VAE's channel multipliers, one per scale (AutoencoderKLWan's default, which
# `build_wan_vae` builds): its spatial factor, 8
WAN21_DIM_MULT = (1, 2, 4, 4)


def build_wan_vae(device, dtype):
    """The Wan2.1 VAE's architecture (diffusers' defaults), seeded random weights."""
    from diffusers import AutoencoderKLWan

    from streamgen.model.wan_vae import WanVAE

    torch.manual_seed(0)
    with torch.device(device):
        return WanVAE(in_dtype(AutoencoderKLWan(), dtype).eval())


def in_dtype(vae, dtype: torch.dtype):
    """diffusers' `vae` (a random one: a loaded one comes in its dtype) cast to `dtype`, without
    diffusers' warning: it warns at every cast of a model whose class names modules to keep in
    float32, and AutoencoderKLWan names none ("...should be kept in float32: []", on stderr at
    each run of bench floor, gpu and wan-decoder, saying nothing)."""
    return torch.nn.Module.to(vae, dtype)


def wan_frame_side(text: str) -> int:
    """An argparse type: a frame height or width the Wan2.1 VAE takes, a positive multiple of its
    spatial factor, at most MAX_FRAME_SIZE (checked in main, it said "frame size 17x832 ..." without
    naming the option)."""
    from streamgen.model.wan_vae import WanVAE

    side, factor = positive_int(text), WanVAE.spatial_factor_of(WAN21_DIM_MULT)
    if side % factor:
        raise argparse.ArgumentTypeError(f"{side} is not a multiple of {factor} (the Wan2.1 VAE's spatial factor)")
    if side > MAX_FRAME_SIZE:  # (as every other frame size: beyond it the allocator's traceback)
        raise argparse.ArgumentTypeError(f"{side} is larger than {MAX_FRAME_SIZE} pixels")
    return side


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device (default: cuda where there is one, else cpu)",
    )
    p.add_argument("--height", type=wan_frame_side, default=480, help="frame height (default: %(default)s)")
    p.add_argument("--width", type=wan_frame_side, default=832, help="frame width (default: %(default)s)")
    p.add_argument(
        "--dtype", choices=["float32", "bfloat16"], default=None, help="default: bf16 on CUDA, else fp32"
    )
    p.add_argument(
        "--chunks",
        type=positive_int,
        default=5,
        help="timed chunks of 3 latent frames, after 2 untimed (default: %(default)s)",
    )
    p.add_argument(
        "--ways",
        nargs="+",  # (`--ways` and no name took zero values: every default way, as if not given)
        choices=[*DECODER_WAYS, TINY_DECODER],
        help=f"default: all but the compiled one, and {TINY_DECODER} (TAEHV's decoder, random weights)",
    )
    p.add_argument("--threads", type=thread_count, help="torch intra-op threads (default: torch's)")


def main(args) -> dict:
    from streamgen.cli import UserError, check_device

    check_device(args.device)
    # (the frame size is checked as it is parsed, wan_frame_side, before the VAE's build: seconds of
    # diffusers' import and 127M random weights; the built one's check below stays the word on it)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    vae = build_wan_vae(device, dtype)
    try:
        vae.latent_hw(args.height, args.width)
    except ValueError as e:
        raise UserError(str(e)) from None
    model = SimpleNamespace(vae=vae, height=args.height, width=args.width)
    ways = args.ways or [*(name for name in DECODER_WAYS if name not in SLOW_DECODER_WAYS), TINY_DECODER]
    return {
        "device": str(device),
        "height": args.height,
        "width": args.width,
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "ways": decoder_variants(model, device, dtype, ways, chunks=args.chunks),
        "reference_encode": reference_encode_ways(vae, args.height, args.width, device, dtype),
    }
