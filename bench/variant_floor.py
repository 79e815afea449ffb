"""Each `bench gpu` variant against the floor of its own configuration (bench/floor.py).

A variant that does less work than the default (FP8 products at twice the rate, TAEHV's tiny
decoder, no re-encode when its cache comes from the last step, 2 steps) set against the
default's floor comes out closer to it than it is. So the work is counted for each configuration
a lever makes (`CONFIGURATIONS`), and a variant's work takes each stage from the one that
changes it: the DiT's stages and the start from the FP8 count when its block linears are FP8, the
decode from its decoder's count, the re-encode dropped under the last step's cache, its attention
moved to the FP8 rate with an FP8 backend (`floor.attention_in_fp8`); with the decode beside the
re-encode, those two take the floor of their summed work (`floor.floor`'s `overlapped`: the same
device's rates, shared). A decoder way other than the upsamplers' is the same work as the
default's.

`python -m bench.variant_floor --out FILE` counts them on the meta device (shapes only, one block
and two, extrapolated; ~1 min on one CPU core). scripts/gpu_check.sh runs it beside the GPU
tests, and `bench gpu --floor-work FILE` reads it; with `--quick`, `bench gpu` counts its tiny
model itself.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from bench import floor
from streamgen.files import write_text_atomically

# name -> what differs from the default configuration
CONFIGURATIONS = {
    "default": {},
    "fp8_linears": {"fp8_linears": True},
    "tiny_decoder": {"decoder": "tiny"},
    "upsample_phases": {"decoder": "upsample_phases"},
    "2_steps": {"steps": 2},
}


def count_configurations(quick: bool, steps: int = 4, names=None) -> dict:
    """name -> `floor.chunk_work` of `bench gpu`'s model in that configuration (`CONFIGURATIONS`,
    or `names` of them): wan2.1-1.3b at 832x480 on the meta device, extrapolated from one block
    and two; `quick`: its tiny model on the CPU, every block. The configurations of one decoder
    share its decodes (`floor.KeptDecodes`: the same latents' shapes whatever the DiT does with
    them), run and counted in the first of them only: with the CPU's real values, the decodes
    were most of a count. A configuration that differs from the default in its decoder alone,
    counted after it, is the default's count with its own decoder's decodes of the same latents
    (`with_decodes`): the transformer's work is the default's (it was counted again for each)."""
    decodes = {}  # decoder -> its kept decodes
    counts = {}
    for name in names or CONFIGURATIONS:
        configuration = {"steps": steps, **CONFIGURATIONS[name]}
        decoder = configuration.pop("decoder", None)
        if decoder is not None and configuration == {"steps": steps} and "default" in counts:
            if decoder not in decodes:
                decodes[decoder] = decodes[None].decoded_by(decoder_model(quick, decoder).vae)
            counts[name] = with_decodes(counts["default"], decodes[decoder])
            continue
        kept = decodes.setdefault(decoder, floor.KeptDecodes())
        counts[name] = counted_work(quick, **configuration, decoder=decoder, decodes=kept)
    return counts


def with_decodes(work: dict, decodes: floor.KeptDecodes) -> dict:
    """A copy of `work` (`floor.chunk_work`'s) with each chunk's decode, and its frames, from
    `decodes` (those of another decoder, of the same chunks' latents)."""
    work = copy.deepcopy(work)
    chunks = [*work["clip"], work["steady_chunk"]]
    counted = decodes.counted()
    if len(counted) != len(chunks):
        raise ValueError(f"{len(counted)} decodes counted for {len(chunks)} chunks")
    # the first chunk is the clip's first: the same dict in a count, a copy of it once
    # extrapolated (`layer_extrapolated`) or read from JSON
    for chunk, (frames, decode) in [(work["first_chunk"], counted[0]), *zip(chunks, counted)]:
        chunk["frames"], chunk["stages"]["decode"] = frames.shape[0], copy.deepcopy(decode)
    return work


def decoder_model(quick: bool, decoder=None):
    """`bench gpu`'s model (see `count_configurations`) with `decoder` "tiny" or "upsample_phases"
    (None: the Wan decoder as it is)."""
    from bench.gpu import QUICK_SIZE, build_model
    from bench.wan_decoder import tiny_decoder_vae

    device, dtype = ("cpu", torch.float32) if quick else ("meta", torch.bfloat16)
    height, width = QUICK_SIZE if quick else (480, 832)
    model = build_model("wan2.1-1.3b", height, width, device, dtype, quick, "sdpa")
    if decoder == "tiny":
        model.vae = tiny_decoder_vae(model.vae)
    elif decoder == "upsample_phases":
        model.vae.upsample_phases = True
    return model


def counted_work(
    quick: bool, steps: int = 4, fp8_linears=False, decoder=None, cache_from=None, decodes=None
) -> dict:
    """`floor.chunk_work` of `bench gpu`'s model (see `count_configurations`) with its block
    linears in FP8, `decoder` "tiny" or "upsample_phases", its cache from `cache_from`.
    `decodes`: a `floor.KeptDecodes` of another count with the same decoder, to take its decodes
    from (None: its own)."""
    from bench.gpu import start_stream
    from streamgen.model.float8 import float8_linears
    from streamgen.stream import StreamSession

    device, dtype = ("cpu", torch.float32) if quick else ("meta", torch.bfloat16)
    model = decoder_model(quick, decoder)
    clip_frames, text_tokens = (33, 8) if quick else (floor.CLIP_FRAMES, 512)  # as bench gpu's
    context = torch.zeros(1, text_tokens, model.cfg.text_dim, device=device, dtype=dtype)

    if decodes is None:  # (extrapolated: the decoder runs in the one-block count only)
        decodes = floor.KeptDecodes()

    def work(m):
        if fp8_linears:
            float8_linears(m.dit)
        session = StreamSession(m, steps=steps, device=device, dtype=dtype, cache_from=cache_from)
        start = lambda observe=None: start_stream(session, context, observe=observe)  # noqa: E731
        return floor.chunk_work(session, start, session.steps, clip_frames, decodes)

    if quick:
        return work(model)
    return floor.layer_extrapolated(
        lambda layers: work(floor.with_layers(model, layers)), model.cfg.num_layers
    )


def decoder_configuration(way: str | None) -> str | None:
    """The configuration whose decode a variant's decoder way counts as (None: the default's)."""
    from bench.wan_decoder import DECODER_WAYS, TINY_DECODER

    if way == TINY_DECODER:
        return "tiny_decoder"
    return "upsample_phases" if DECODER_WAYS.get(way, {}).get("upsample_phases") else None


def does_default_work(variant: dict, steps: int) -> bool:
    """Whether a variant's stream does the default configuration's work: another attention
    backend, kernel or Wan decoder way computes the same products."""
    return (
        not variant.get("fp8_layers")
        and variant.get("attention") not in floor.FP8_ATTENTION_SHARE
        and decoder_configuration(variant.get("decoder_way")) is None
        and variant.get("cache_from", "reencode") == "reencode"
        and variant.get("steps", steps) == steps
    )


def variant_work(counts: dict, variant: dict, steps: int) -> dict | None:
    """The work of a variant's stream (its result: `fp8_layers`, `attention`, `decoder_way`,
    `cache_from`, `steps` say its levers) from `count_configurations`' counts; None where they do
    not hold what it needs."""
    variant_steps = variant.get("steps", steps)
    decoder = decoder_configuration(variant.get("decoder_way"))
    if variant_steps != steps:  # fewer steps: counted alone, with no other lever
        base = "2_steps" if variant_steps == 2 and not variant.get("fp8_layers") and decoder is None else None
    else:
        base = "fp8_linears" if variant.get("fp8_layers") else "default"
    if base not in counts or (decoder is not None and decoder not in counts):
        return None
    work = copy.deepcopy(counts[base])

    def chunks(w):
        return [w["first_chunk"], w["steady_chunk"], *w["clip"]]

    if decoder is not None:  # the decode alone changes: the same latents, another decoder's work
        for chunk, other in zip(chunks(work), chunks(counts[decoder])):
            chunk["stages"]["decode"] = copy.deepcopy(other["stages"]["decode"])
    if variant.get("cache_from") == "last_step":  # the last step writes the cache: no re-encode
        for chunk in chunks(work):
            chunk["stages"]["reencode"] = _no_work(chunk["stages"]["reencode"])
    if variant.get("attention") in floor.FP8_ATTENTION_SHARE:
        floor.attention_in_fp8(work, variant["attention"])
    return work


def _no_work(stage: dict) -> dict:
    return {
        key: dict.fromkeys(value, 0.0) if isinstance(value, dict) else 0.0 for key, value in stage.items()
    }


def own_ceilings(counts: dict, variant: dict, ceilings: dict, steps: int) -> dict:
    """The frame rates a variant's own floor allows under the run's measured `ceilings`
    (`fps_ceiling` for its steady chunks, `clip_fps_ceiling` over a fresh clip); {} where it has
    no count or the ceilings failed. FP8 products run at the measured FP8 rate (without it, at
    the matrix rate, as `floor.floor`)."""
    work = variant_work(counts, variant, steps) if "fps_steady" in variant else None
    if work is None or "matmul_tflop_per_s" not in ceilings or "copy_gb_per_s" not in ceilings:
        return {}
    fl = floor.floor(
        work,
        ceilings["matmul_tflop_per_s"],
        ceilings["copy_gb_per_s"],
        fp8_tflops=ceilings.get("matmul_tflop_per_s_float8"),
        overlapped=floor.DECODE_BESIDE_REENCODE if variant.get("decode_beside_reencode") else (),
    )
    return floor.rounded(
        {"fps_ceiling": fl["steady_chunk"]["fps_ceiling"], "clip_fps_ceiling": fl["clip"]["fps_ceiling"]}
    )


def counts_for_run(path: str | None, quick: bool, steps: int) -> tuple[dict | None, str]:
    """(the counts for a `bench gpu` run, where they came from): read from `path` (written by
    `main` for the same model and steps), else counted here for `quick`'s tiny model (seconds),
    else none."""
    if path is not None:
        try:
            written = json.loads(open(path).read())
        except (OSError, ValueError) as e:
            return None, f"none: {path} unreadable ({type(e).__name__}: {e})"[:300]
        if (written.get("quick"), written.get("steps")) != (quick, steps):
            return None, f"none: {path} counts quick={written.get('quick')}, steps={written.get('steps')}"
        return written["counts"], f"{path}: {', '.join(written['counts'])}"
    if quick:
        started = time.perf_counter()
        counts = count_configurations(True, steps)
        return counts, f"counted in this run ({time.perf_counter() - started:.0f} s): {', '.join(counts)}"
    return None, "none: a variant that does other work than the default gets no of_floor (--floor-work)"


def main(argv=None) -> None:
    from pathlib import Path

    from streamgen.cli import positive_int

    parser = argparse.ArgumentParser(
        prog="python -m bench.variant_floor", description="count bench gpu's configurations' work (bench/floor.py)"
    )
    parser.add_argument("--out", required=True, help="the JSON to write, for bench gpu --floor-work")
    parser.add_argument("--quick", action="store_true", help="bench gpu --quick's tiny model, on the CPU")
    parser.add_argument(
        "--steps", type=positive_int, default=4,
        help="denoising steps of a configuration that sets none (default: 4)",
    )  # fmt: skip
    parser.add_argument("--only", nargs="+", choices=list(CONFIGURATIONS), help="these configurations alone")
    args = parser.parse_args(argv)
    # (--steps 0 was a traceback, and a file that could not be written one after the counts: a minute)
    out = Path(args.out)
    if out.is_dir() or not out.parent.is_dir():
        parser.error(f"--out {out}: {'a directory' if out.is_dir() else 'its folder does not exist'}")
    started = time.perf_counter()
    counts = count_configurations(args.quick, args.steps, names=args.only)
    write_text_atomically(args.out, json.dumps({"quick": args.quick, "steps": args.steps, "counts": counts}))
    print(f"bench.variant_floor: {', '.join(counts)} counted in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
