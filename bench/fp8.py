"""`streamgen bench fp8 --json`: what FP8 linear layers and attention do to a stream's frames.

The same stream (the sample face and speech, one seed) is generated with the
DiT in float32 (the reference), in bfloat16, and with its block linears in FP8
(`streamgen.model.float8`, as it converts by default) over float32 and over
bfloat16, and with every block linear in FP8; with attention's QK^T in FP8 (the
`fp8_qk` backend), and its PV too (`fp8`), alone and with the FP8 linears.
Each variant's frames are compared with the reference's chunk by chunk, in 8-bit
levels (mean, 99th percentile, max) and PSNR: a stream feeds its own output back through the KV
cache, so what matters is whether the difference grows along the stream, not
only its size after one layer. The decoder is float32 in every variant, so the
differences are the DiT's.

On a CPU the FP8 products are exact products of the e4m3 values (torch's CPU
`_scaled_mm`; the attention backends' emulation of the kernel,
`reference.fp8_attention`), as a GPU's are up to the order of the sums: the
accuracy measured here is the accuracy the GPU path has. (The speed is the GPU's:
`bench gpu`'s FP8 variants; on a CPU float32 products are faster.)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time

import numpy as np
import torch

from streamgen.cli import positive_int
from streamgen.kernels import reference as kernel_references
from streamgen.model.float8 import KEEP_IN_DTYPE, float8_layers, float8_linears
from streamgen.models import FP8_ENV, load_model
from streamgen.stream import StreamSession

VARIANTS = {  # name -> (DiT dtype, the layers FP8 keeps in that dtype or None: no FP8 linears, attention)
    "float32": (torch.float32, None, "sdpa"),
    "bfloat16": (torch.bfloat16, None, "sdpa"),
    "float32+fp8_linears": (torch.float32, KEEP_IN_DTYPE, "sdpa"),
    "bfloat16+fp8_linears": (torch.bfloat16, KEEP_IN_DTYPE, "sdpa"),
    # every block linear, the self-attention's values and output too: why they are kept
    "float32+fp8_every_linear": (torch.float32, (), "sdpa"),
    # attention with QK^T in FP8 (the `fp8_qk` backend), and with PV too (`fp8`)
    "float32+fp8_qk_attention": (torch.float32, None, "fp8_qk"),
    "bfloat16+fp8_qk_attention": (torch.bfloat16, None, "fp8_qk"),
    "float32+fp8_attention": (torch.float32, None, "fp8"),
    "bfloat16+fp8_attention": (torch.bfloat16, None, "fp8"),
    "bfloat16+fp8_linears+fp8_qk_attention": (torch.bfloat16, KEEP_IN_DTYPE, "fp8_qk"),
    "bfloat16+fp8_linears+fp8_attention": (torch.bfloat16, KEEP_IN_DTYPE, "fp8"),
}


def stream_frames(model, dtype, chunks: int, seed: int = 0) -> tuple[list[np.ndarray], float]:
    """The frames of `chunks` chunks of the sample stream with the DiT in `dtype` (uint8, one
    array per chunk), and the median seconds per chunk."""
    from streamgen.media import read_audio, read_image
    from streamgen.models import ASSETS

    session = StreamSession(model, dtype=dtype, decode_dtype=torch.float32)
    session.start(read_image(ASSETS / "sample_face.png"), seed=seed)
    session.push_audio(read_audio(ASSETS / "sample_speech.wav"))
    frames, seconds = [], []
    for _ in range(chunks):
        t = time.perf_counter()
        out, _ = session.next_chunk()
        seconds.append(time.perf_counter() - t)
        frames.append(out)
    session.close()
    return frames, float(np.median(seconds))


@contextlib.contextmanager
def requantized_value_channels():
    """Within: at each read of the KV cache's e4m3 values (`KVCache.fp8_values`, the `fp8`
    backend; the CPU's emulation), the share of the sink's and ring's value channels quantized
    again: those whose scale the chunk moved, every one after a full rebuild."""
    shares, quantize = [], kernel_references.quantize_fp8_values

    def counted(v, scale=None, out=None, applied=None):
        if applied is not None:
            shares.append(float((scale != applied).float().mean()))
        return quantize(v, scale, out, applied)

    kernel_references.quantize_fp8_values = counted
    try:
        yield shares
    finally:
        kernel_references.quantize_fp8_values = quantize


def difference(frames: list[np.ndarray], reference: list[np.ndarray]) -> dict:
    """Per chunk and overall: |difference| in levels of 255, and PSNR (dB)."""

    def levels(a, b):
        return np.abs(a.astype(np.float32) - b.astype(np.float32))

    per_chunk = [levels(a, b) for a, b in zip(frames, reference)]
    every = np.concatenate([d.ravel() for d in per_chunk])
    mse = float(np.mean(every**2))
    return {
        "mean_levels": round(float(every.mean()), 3),
        "p99_levels": round(float(np.percentile(every, 99)), 1),
        "max_levels": round(float(every.max()), 1),
        "psnr_db": round(10 * np.log10(255.0**2 / mse), 2) if mse > 0 else None,
        "mean_levels_by_chunk": [round(float(d.mean()), 3) for d in per_chunk],
    }


@contextlib.contextmanager
def _without_environment(name: str):
    """Within: `name` unset in this process. $STREAMGEN_FP8, exported for a shell, put every
    variant's linears in FP8, the float32 reference's too: each differed from it by about 0."""
    was = os.environ.pop(name, None)
    try:
        yield
    finally:
        if was is not None:
            os.environ[name] = was


def run(model_name: str = "tiny-avatar", chunks: int = 12, variants=tuple(VARIANTS)) -> dict:
    torch.manual_seed(0)
    result = {"model": model_name, "chunks": chunks, "device": "cpu", "variants": {}}
    reference = None
    for name in ("float32", *[v for v in variants if v != "float32"]):
        dtype, keep, attention = VARIANTS[name]
        with _without_environment(FP8_ENV):  # each variant's linears as it says, the reference's float32
            model = load_model(model_name, dtype=dtype, attn_backend=attention)
        if keep is not None:
            float8_linears(model.dit, keep)
        with requantized_value_channels() as shares:
            frames, chunk_s = stream_frames(model, dtype, chunks)
        entry = {
            "chunk_ms_p50": round(chunk_s * 1e3, 1),
            "fp8_layers": float8_layers(model.dit),
            "attention": attention,
        }
        if shares:  # how much the cache's kept e4m3 values spare a call (docs/kernels.md)
            entry["value_channels_requantized_per_read"] = round(float(np.mean(shares)), 3)
        if reference is None:
            reference = frames
            result["frames_per_chunk"] = len(frames[0])
        else:
            entry.update(difference(frames, reference))
        result["variants"][name] = entry
    return result


def plot(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(10, 4.5))
    for name, v in result["variants"].items():
        if "mean_levels_by_chunk" in v:
            ax.plot(range(1, len(v["mean_levels_by_chunk"]) + 1), v["mean_levels_by_chunk"], "o-", label=name)
    ax.set_xlabel("chunk of the stream")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # (a few chunks: ticks at 1.2, 1.4, ...)
    ax.set_ylabel("mean |difference| to float32, levels of 255")
    ax.set_title(f"{result['model']}: the DiT's precision along a stream")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the curves, not on them
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny-avatar", help="model name or directory (default: %(default)s)")
    p.add_argument("--chunks", type=positive_int, default=12, help="chunks to stream (default: %(default)s)")
    p.add_argument(
        "--variants",
        nargs="+",
        choices=list(VARIANTS),
        default=list(VARIANTS),
        metavar="VARIANT",
        help="the variants compared with float32, which always runs as the reference (default: all): "
        + ", ".join(VARIANTS),
    )
    p.add_argument("--plot", help="write the difference per chunk to this PNG")


def main(args) -> dict:
    from streamgen.cli import UserError

    if args.plot and set(args.variants) == {"float32"}:  # (an empty plot, and matplotlib's warning on stderr)
        raise UserError("--plot draws each variant's difference to float32: give --variants another than float32 too")
    try:
        result = run(args.model, args.chunks, tuple(args.variants))
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e)) from None
    if args.plot:
        plot(result, args.plot)
    return result
