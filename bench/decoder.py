"""`streamgen bench decoder --json`: ways to run the tiny autoencoder's decoder, per chunk.

The decoder is about half of a chunk's time at 192x192 and up on the 2-core
CPU. Every variant decodes the same latents (the sample face encoded at each
size, plus noise, `--latent-frames` per chunk as a stream would) with the same
weights, in rounds in this process whose order reverses every other round
(bench/rounds.py), so the ratios compare like with like on a noisy machine:

- `upsample_then_conv`: nn.Upsample + 3x3 Conv2d, how the decoder ran before
  `UpsampleConv2d` (the reference for speed and for values);
- `phase_conv`: the shipped decoder (`UpsampleConv2d`: the conv at low
  resolution, four 2x2 phase kernels);
- `compiled`, `compiled_bfloat16` (`--compile`): `phase_conv` and `bfloat16`
  with the decoder's layers under `torch.compile` (static shapes);
  `compile_seconds` is their warm-up (a compile that fails, e.g. without a C++
  compiler, is the variant's `error`, the others timed);
- `bfloat16`: `phase_conv` with its weights in bfloat16 (`with_dtypes`, what
  StreamSession decodes with on CPUs with AMX or AVX512-BF16);
- `autocast_bfloat16`: `phase_conv` under CPU autocast to bfloat16, for comparison;
- `against`, `against_bfloat16` (`--against MODEL`): another model's decoder for the same
  latents, in float32 and bfloat16, e.g. a narrower one distilled from this model's
  (`streamgen distill tiny_decoder --config tiny-avatar-narrow`); its distances are to this
  model's frames, and `against_speedup` is its speed over `phase_conv` / `bfloat16`.

`--batch N` decodes N streams' chunks in one call, as a server's batch of N sessions does.

Per size, `reference_encode` times a session's other use of the autoencoder, the
reference image's encode at the start of a stream, with the encoder in float32 and in
bfloat16 (`with_dtypes(encoder=)`, what StreamSession encodes with on such CPUs), each
on one thread and on all, in alternating rounds; `session_threads` is what a session
gives it (streamgen/cpu_threads.py), `bfloat16_speedup` the ratio there, and
`latent_relative_difference` how far the bfloat16 latent is from the float32 one.

Per variant: ms per chunk (median, min), speedup against `upsample_then_conv`
(the ratio of their medians; `speedup_rounds`: each round's ratio, their median, min and
max, as `against_speedup_rounds` and `bfloat16_speedup_rounds` are), and how far its frames are from the reference's in 8-bit levels (max, mean,
before rounding to uint8; `uint8_changed` is the fraction of uint8 values that
rounding to uint8 then sets differently).
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bench.machine import cpu_description
from bench.rounds import balanced_order, ratio_rounds
from streamgen.cli import frame_size, positive_int, thread_count
from streamgen.cpu_threads import codec_threads, cpu_has_native_bfloat16, intra_op_threads
from streamgen.media import read_image
from streamgen.model.config import ModelConfig, get_config
from streamgen.model.upsample import UpsampleConv2d
from streamgen.model.vae import TinyCausalVAE
from streamgen.models import load_autoencoder, resolve_model_dir
from streamgen.stream import encode_reference
from streamgen.stream_inputs import prepare_reference

log = logging.getLogger(__name__)
SAMPLE_FACE = Path(__file__).resolve().parent.parent / "streamgen" / "assets" / "sample_face.png"


def upsample_then_conv(vae: TinyCausalVAE) -> TinyCausalVAE:
    """A copy of `vae` whose upsampling layers upsample first and convolve at the high resolution."""
    ref = copy.deepcopy(vae)
    for i, layer in enumerate(ref.dec):
        if isinstance(layer, UpsampleConv2d):
            conv = nn.Conv2d(layer.in_channels, layer.out_channels, 3, padding=1, bias=layer.bias is not None)
            conv.load_state_dict(layer.state_dict())
            ref.dec[i] = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), conv)
    return ref.to(memory_format=torch.channels_last)


def chunk_latents(
    vae: TinyCausalVAE, size: int, latent_frames: int, seed: int = 0, batch: int = 1
) -> torch.Tensor:
    face = prepare_reference(read_image(SAMPLE_FACE), size, size)
    z = encode_reference(vae, face, "cpu").expand(batch, -1, latent_frames, -1, -1)
    g = torch.Generator().manual_seed(seed)
    return z + 0.3 * torch.randn(z.shape, generator=g)  # frames that differ, as a talking face's do


def _levels(a: torch.Tensor, b: torch.Tensor) -> dict:
    d = (a.float() - b.float()).abs() * 127.5  # [-1, 1] -> 8-bit levels

    def u8(x):
        return ((x.float() + 1) * 127.5).round().clamp(0, 255)

    return {
        "max_levels": float(f"{d.max().item():.3g}"),
        "mean_levels": float(f"{d.mean().item():.3g}"),
        "uint8_changed": float(f"{(u8(a) != u8(b)).float().mean().item():.3g}"),
    }


def compiled_decode(vae: TinyCausalVAE):
    """vae.decode with its `dec` layers under torch.compile (static shapes); compiles on first call."""
    eager_dec, compiled_dec = vae.dec, torch.compile(vae.dec, dynamic=False)

    def decode(latents):
        vae.dec = compiled_dec
        try:
            return vae.decode(latents)
        finally:
            vae.dec = eager_dec

    return decode


@torch.no_grad()
def measure_size(
    vae: TinyCausalVAE,
    size: int,
    latent_frames: int,
    rounds: int,
    compile: bool,
    against: TinyCausalVAE | None = None,
    batch: int = 1,
) -> dict:
    z = chunk_latents(vae, size, latent_frames, batch=batch)
    reference = upsample_then_conv(vae).eval()

    def autocast(latents):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return vae.decode(latents)

    bf16 = vae.with_dtypes(decoder=torch.bfloat16)
    variants = {
        "upsample_then_conv": reference.decode,
        "phase_conv": vae.decode,
        "bfloat16": bf16.decode,
        "autocast_bfloat16": autocast,
    }
    if against is not None:
        variants["against"] = against.decode
        variants["against_bfloat16"] = against.with_dtypes(decoder=torch.bfloat16).decode
    out = {
        "size": size,
        "batch": batch,
        "latent_frames": latent_frames,
        "frames": latent_frames * vae.temporal_factor,
    }
    if compile:
        out["compile_seconds"] = {}
        for name, v in (("compiled", vae), ("compiled_bfloat16", bf16)):
            decode = compiled_decode(v)
            t = time.perf_counter()
            try:
                decode(z)
            except Exception as e:  # (no C++ compiler for inductor, say): said, and the rest timed
                out[name] = {"error": f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"[:400]}
                continue
            variants[name] = decode
            out["compile_seconds"][name] = round(time.perf_counter() - t, 1)

    frames = {name: fn(z) for name, fn in variants.items()}  # also the warm-up
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _, name in balanced_order(variants, rounds):
        t = time.perf_counter()
        variants[name](z)
        times[name].append(time.perf_counter() - t)
    base = times["upsample_then_conv"]
    for name in variants:
        med = float(np.median(times[name]))
        out[name] = {
            "ms_median": round(med * 1000, 1),
            "ms_min": round(min(times[name]) * 1000, 1),
            "speedup": round(float(np.median(base)) / med, 3),
            "speedup_rounds": ratio_rounds(base, times[name]),
            **_levels(frames[name], frames["upsample_then_conv"]),
        }
    if against is not None:
        pairs = (("float32", "phase_conv", "against"), ("bfloat16", "bfloat16", "against_bfloat16"))
        out["against_speedup"] = {  # (of the medians, not of their rounded ms: 0.6 / 0.4 for 0.625 / 0.445)
            dtype: round(float(np.median(times[own]) / np.median(times[theirs])), 3) for dtype, own, theirs in pairs
        }
        out["against_speedup_rounds"] = {
            dtype: ratio_rounds(times[own], times[theirs]) for dtype, own, theirs in pairs
        }
    out["reference_encode"] = reference_encode(vae, size, rounds)
    return out


THREADS = {"one": "one_thread", "all": "all_threads"}


def reference_encode(vae: TinyCausalVAE, size: int, rounds: int) -> dict:
    face = prepare_reference(read_image(SAMPLE_FACE), size, size)
    encoders = {"float32": vae, "bfloat16": vae.with_dtypes(encoder=torch.bfloat16)}
    latents = {name: encode_reference(e, face, "cpu").float() for name, e in encoders.items()}  # + warm-up
    ways = [(name, threads) for name in encoders for threads in ("one", "all")]
    times: dict[tuple, list[float]] = {way: [] for way in ways}
    for _, (name, threads) in balanced_order(ways, rounds):
        with intra_op_threads(threads == "all"):
            t = time.perf_counter()
            encode_reference(encoders[name], face, "cpu")
            times[name, threads].append(time.perf_counter() - t)
    ms = {way: float(np.median(t)) * 1000 for way, t in times.items()}
    with codec_threads(vae.first_latent_frames, size, size) as n:  # as a session's start runs it
        session = "one" if n == 1 else "all"
    f32, bf16 = latents["float32"], latents["bfloat16"]
    return {
        **{f"{name}_ms_{THREADS[threads]}": round(ms[name, threads], 1) for name, threads in ways},
        "session_threads": session,
        "bfloat16_speedup": round(ms["float32", session] / ms["bfloat16", session], 3),
        "bfloat16_speedup_rounds": ratio_rounds(times["float32", session], times["bfloat16", session]),
        "latent_relative_difference": float(f"{((bf16 - f32).norm() / f32.norm()).item():.3g}"),
    }


def _load_tiny_vae(model: str) -> tuple[TinyCausalVAE, int]:
    """The model's autoencoder and its latent frames per chunk, and nothing else: the whole model
    was loaded, a flavor's random DiT too (wan2.1-1.3b's 1.3B parameters), only to be dropped."""
    from streamgen.cli import UserError
    from streamgen.model.files import read_json

    directory = resolve_model_dir(model)
    try:
        if directory is None:  # a flavor (`require_models` has refused the rest): its stand-in's autoencoder
            cfg = get_config(model.removesuffix("-teacher"))
            log.warning("no trained weights for %r; using a randomly initialised autoencoder (seed 0)", model)
            torch.manual_seed(0)
            vae = TinyCausalVAE(latent_channels=cfg.in_channels, temporal_factor=cfg.temporal_compression).eval()
        else:
            meta = read_json(directory / "model.json", required=("config",))
            try:
                cfg = ModelConfig.from_dict(meta["config"])
            except (TypeError, ValueError) as e:
                raise ValueError(f"{directory / 'model.json'}: {e}") from None
            vae = load_autoencoder(directory)
    except (FileNotFoundError, ValueError) as e:  # (an unreadable model.json or autoencoder)
        raise UserError(str(e)) from None
    if not isinstance(vae, TinyCausalVAE):
        raise UserError(f"{model}: this benchmark is for TinyCausalVAE decoders, not {type(vae).__name__}")
    return vae, cfg.frames_per_chunk


def run(
    model="tiny-avatar",
    sizes=(128, 192, 256),
    latent_frames=None,
    rounds=8,
    threads=None,
    compile=False,
    against=None,
    batch=1,
):
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    vae, frames_per_chunk = _load_tiny_vae(model)
    other = _load_tiny_vae(against)[0] if against else None
    if other is not None and (other.latent_channels, other.temporal_factor) != (
        vae.latent_channels,
        vae.temporal_factor,
    ):
        from streamgen.cli import UserError

        raise UserError(  # (a SystemExit: exit 1, without the command's name)
            f"--against {against}: its decoder takes {other.latent_channels} latent channels at "
            f"{other.temporal_factor} frames each, {model}'s gives {vae.latent_channels} at {vae.temporal_factor}"
        )
    latent_frames = latent_frames or frames_per_chunk
    return {
        "model": model,
        **({"against": against} if against else {}),
        "native_bfloat16": cpu_has_native_bfloat16(),
        "cpu": cpu_description(),
        "threads": torch.get_num_threads(),
        "rounds": rounds,
        "sizes": [measure_size(vae, s, latent_frames, rounds, compile, other, batch) for s in sizes],
    }


def plot(result: dict, path) -> None:
    """ms per chunk of every variant per size (log scale), and the bf16 variants' distance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["sizes"]
    names = [k for k, v in rows[0].items() if isinstance(v, dict) and "ms_median" in v]
    labels = [f"{r['size']}x{r['size']}" for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    width = 0.8 / len(names)
    colours = dict(zip(names, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for i, name in enumerate(names):
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(rows))]
        left.bar(xs, [r[name]["ms_median"] for r in rows], width, label=name, color=colours[name])
    left.set_xticks(range(len(rows)), labels)
    left.set_yscale("log")
    # plain numbers on the log axis, 1, 2, 3 and 5 of each decade (its default minor labels read
    # "2x10^0", "3x10^0", ...)
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}" if f"{v:e}"[0] in "1235" else "")
    left.yaxis.set_major_formatter(plain)
    left.yaxis.set_minor_formatter(plain)
    streams = f" x {rows[0]['batch']} streams" if rows[0]["batch"] > 1 else ""
    left.set_ylabel(f"ms per chunk ({rows[0]['frames']} frames{streams}), median", fontsize=8)
    against = f" (against: {result['against']})" if "against" in result else ""
    fig.suptitle(f"{result['model']} decoder{against}, {result['threads']} threads", fontsize=9)
    left.legend(fontsize=7)
    for name in (n for n in names if "bfloat16" in n):
        c = colours[name]
        right.plot(labels, [r[name]["mean_levels"] for r in rows], "o-", color=c, label=f"{name}: mean")
        right.plot(labels, [r[name]["max_levels"] for r in rows], "o--", color=c, label=f"{name}: max")
    right.set_ylabel("|difference| to the model's fp32, levels of 255", fontsize=8)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny-avatar", help="the model of the decoder (default: %(default)s)")
    p.add_argument(
        "--sizes",
        type=frame_size,
        nargs="+",
        default=[128, 192, 256],
        help="square frame sizes (default: 128 192 256)",
    )
    p.add_argument("--latent-frames", type=positive_int, help="per chunk (default: the model's)")
    p.add_argument(
        "--rounds", type=positive_int, default=8,
        help="timed decodes per variant, the order reversed every other round: an even number balances "
        "it (default: %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--threads", type=thread_count, default=None, help="torch intra-op threads (default: torch's)"
    )
    p.add_argument(
        "--compile", action="store_true", help="also time the fp32 and bf16 decoders under torch.compile"
    )
    p.add_argument("--plot", default=None, help="write the times and distances to this PNG")
    p.add_argument(
        "--against",
        default=None,
        help="also time this model's decoder on the same latents (e.g. a narrower one)",
    )
    p.add_argument(
        "--batch",
        type=positive_int,
        default=1,
        help="streams decoded together, as a server's batch (default: 1)",
    )


def main(args) -> dict:
    from streamgen.cli import require_models

    require_models(args.model, args.against)  # before anything is measured
    result = run(
        args.model, args.sizes, args.latent_frames, args.rounds, args.threads, args.compile, args.against,
        args.batch,
    )  # fmt: skip
    if args.plot:
        plot(result, args.plot)
    return result
