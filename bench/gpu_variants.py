"""The streams `streamgen bench gpu` times, each a measurement(prepare) -> dict: the attention
backends and the fused kernels or their references (`stream_variants`), and the levers on the
default configuration (`lever_variants`): FP8 linears and attention, TAEHV's tiny decoder, the
cache kept from the last step, the Wan decoder's ways, the decode beside the re-encode, and
every lever at once. Each undoes what it changed, so the variants run one after another on one
model (bench/gpu.py runs them, in order, within its time budget)."""

from __future__ import annotations

import copy
import statistics

import torch

from bench.wan_decoder import (
    DECODER_WAYS,
    SLOW_DECODER_WAYS,
    TINY_DECODER,
    decoder_variants,
    fastest_decoder_way,
    reference_encode_ways,
    tiny_decoder_vae,
    with_attributes,
)
from streamgen import kernels
from streamgen.model.float8 import float8_layers, float8_linears


def stream_variants(model, measure, backends, compile_blocks, new=None, measured=None) -> tuple[dict, dict]:
    """name -> measurement, two groups in the order they run. Before the kernel micro-benchmarks:
    the default (SDPA, fused kernels; every other variant's reference), the `new` (name ->
    measurement(prepare) of the default configuration, in their order: what has never run on a
    GPU, what this run is for), then the `measured` (likewise: what earlier runs measured), the
    other attention backends with the fused kernels, the PyTorch references. After them:
    FlexAttention and Inductor, which take longest to prepare."""

    def with_backend(backend, fused=True, measurement=measure):
        def fn(prepare=None):
            saved = kernels._FORCE_REFERENCE
            kernels._FORCE_REFERENCE = not fused
            for attn in attention_modules(model.dit):
                attn.backend = backend
            try:
                return measurement(prepare)
            finally:
                kernels._FORCE_REFERENCE = saved

        return fn

    first = {"sdpa+fused_kernels": with_backend("sdpa")}
    for name, measurement in {**(new or {}), **(measured or {})}.items():
        first[name] = with_backend("sdpa", measurement=measurement)
    first.update(
        {f"{b}+fused_kernels": with_backend(b) for b in backends if b not in ("sdpa", "flex", "cudnn")}
    )
    first["sdpa+reference_ops"] = with_backend("sdpa", fused=False)
    if "cudnn" in backends:  # after the default's figures: a fault in a newer kernel must not cost them
        first["cudnn+fused_kernels"] = with_backend("cudnn")
    last = {}
    if "flex" in backends:
        last["flex+fused_kernels"] = with_backend("flex")
    if compile_blocks:  # Inductor, as `serve --compile` runs it
        last["sdpa+compiled_blocks"] = compiled_blocks(model, with_backend("sdpa"))
    return first, last


# What a part is expected to take, in units of a stream variant's wall time in this run (about
# 20 s on the H200 on 2026-11-30: warm-up 10 s, timed 9 s). FlexAttention took 134 s there (6.9
# units, compiling); stages, kernels and the default's figures together took 65 s. The rest
# never ran whole on a GPU: guesses on the safe side (compiling Inductor's graphs takes minutes).
# tests/test_gpu_check_budget.py holds them against every committed H200 run's wall times.
PART_COST = {
    "stages": 1.5,
    "decoder": 1.5,
    "reference_encode": 0.5,
    "decoder_compiled": 4.0,
    "kernels": 3.0,
    "flex+fused_kernels": 7.0,
    "sdpa+compiled_blocks": 10.0,
}
# a stream variant over the median one so far: the slowest on 2026-11-30 (triton's autotuning)
# took 1.11 times the default's
STREAM_COST = 1.25


def expected_seconds(name: str, variants: dict) -> float:
    """How long `name` is expected to run, from the wall time (`wall_s`) of the stream variants
    this run has timed so far: their median times `PART_COST[name]`, or `STREAM_COST` for
    another stream. 0 before any has run (nothing to go by: the first always starts)."""
    walls = [v["wall_s"] for v in variants.values() if "fps_steady" in v and "wall_s" in v]
    return PART_COST.get(name, STREAM_COST) * statistics.median(walls) if walls else 0.0


def attention_modules(dit) -> list:
    """Every attention of the DiT's blocks (each has its own `backend`)."""
    return [a for blk in dit.blocks for a in (blk.self_attn, blk.cross_attn, blk.audio_attn) if a is not None]


# the attention variants of the stream, by backend (`fastest_attention` picks among those timed)
ATTENTION_VARIANTS = {
    "sdpa": "sdpa+fused_kernels",
    "fp8_qk": "sdpa+fused_kernels, fp8_qk attention",
    "fp8": "sdpa+fused_kernels, fp8 attention",
}


def fastest_attention(variants: dict) -> str:
    """The backend of the attention variant with the highest steady rate (sdpa when none ran)."""
    timed = {
        b: variants[n]["fps_steady"]
        for b, n in ATTENTION_VARIANTS.items()
        if "fps_steady" in variants.get(n, {})
    }
    return max(timed, key=timed.get) if timed else "sdpa"


def on_attention(model, backend, measurement):
    """A variant: `measurement(prepare)` with every attention of the DiT on `backend()` (asked when
    the variant runs, so it may depend on what ran before), restored afterwards."""

    def fn(prepare):
        name = backend()
        saved = [(attn, attn.backend) for attn in attention_modules(model.dit)]
        for attn, _ in saved:
            attn.backend = name
        try:
            if name in ("triton", "fp8_qk", "fp8") and torch.cuda.is_available():
                return {**_with_attention_tiles(measurement, prepare), "attention": name}
            return {**measurement(prepare), "attention": name}
        finally:
            for attn, previous in saved:
                attn.backend = previous

    return fn


def _with_attention_tiles(measurement, prepare) -> dict:
    """`measurement(prepare)` on our attention kernel, with the tile its autotuner chose at each
    length the stream met (and any before it), and each tile's time where it tuned meanwhile."""
    from bench.kernels import attention_tiles, recording_tunings

    try:
        from streamgen.kernels import triton_attention
    except Exception:  # no Triton: the backend falls back, nothing is tuned
        return measurement(prepare)
    tuner = triton_attention._attention_kernel
    with recording_tunings(tuner) as tunings:
        result = measurement(prepare)
    try:  # a report that fails must not cost the measurement
        result["attention_tiles"] = attention_tiles(tuner, tunings)
    except Exception as e:
        result["attention_tiles"] = {"error": f"{type(e).__name__}: {e}"[:200]}
    return result


def compiled_blocks(model, measure, backend: str = "inductor"):
    """`measure` with the DiT's blocks compiled as `serve --compile` runs them on a CPU
    (streamgen/model/compile.py: the self-attention's cache step and attention eager, so a stream
    compiles a few graphs whatever the ring's fill level, here with static shapes; under compile the
    kernel dispatch hands inductor the references to fuse), undone afterwards.

    No CUDA graphs: the profile (`stages`) finds the GPU busy 95% of the denoising and 96% of
    the re-encode on an H200, so graphs could win back ~3% of a chunk; and graphs of each block
    do not survive CUDA graph trees, which hand every replay of one block's graph the same output
    memory, overwriting the block before's (bench/results/h200-2026-11-30-followup.json)."""

    def fn():
        import torch._dynamo as dynamo
        from torch._dynamo.utils import counters

        from streamgen.model.compile import compile_blocks

        saved_limit = dynamo.config.recompile_limit
        graphs = counters["stats"]["unique_graphs"]
        compile_blocks(model.dit, backend, dynamic=False)  # one stream: every shape static
        try:
            result = measure(prepare=None)
            result["graphs_compiled"] = counters["stats"]["unique_graphs"] - graphs
            return result
        finally:
            compile_blocks(model.dit, None)
            dynamo.config.recompile_limit = saved_limit
            dynamo.reset()

    return fn


def lever_variants(
    model, measure, variants, device, dtype, steps, height, width, fp8, compile_blocks, decoder_chunks=5
) -> tuple[dict, dict]:
    """(new, measured): name -> measurement(prepare), each in the order they run. `new`: the levers
    one by one on the default configuration, then together, none of which has run on a GPU yet
    (FP8, the tiny decoder, the Wan decoder's fused kernels, the last step's cache first: within
    the time budget before anything else); `measured`: what the H200 runs of 2026-11-30
    measured (bench/results/h200-2026-11-30*.json). `variants` is the run's result so far, read as
    they run (the fastest attention and decoder way are those timed before). The decoder's ways
    are each timed over `decoder_chunks` chunks (`decoder_variants`)."""
    dev = torch.device(device)
    extras = {}

    def with_fp8_linears(prepare):  # on a copy of the DiT: the other variants keep theirs
        dit = float8_linears(copy.deepcopy(model.dit))
        return {
            **with_attributes(model, {"dit": dit}, lambda: measure(prepare)),
            "fp8_layers": float8_layers(dit),
        }

    if fp8:  # the block linears in FP8 (streamgen.model.float8); attention in FP8 (kernels)
        extras["sdpa+fused_kernels, fp8 linears"] = with_fp8_linears
        for backend in ("fp8_qk", "fp8"):
            extras[ATTENTION_VARIANTS[backend]] = on_attention(model, lambda b=backend: b, measure)

    def on_session(measurement, **attributes):  # set on the session after each (re)start
        def fn(prepare):
            def both(session):
                if prepare is not None:
                    prepare(session)
                for name, value in attributes.items():
                    setattr(session, name, value)

            return {**measurement(both), **attributes}

        return fn

    def beside_reencode(measurement):  # the decode on a second CUDA stream beside the re-encode
        return on_session(measurement, decode_beside_reencode=True)

    # the levers beside the decoder: FP8 linears, the fastest attention timed, on CUDA the decode
    # beside the re-encode
    levers = with_fp8_linears if fp8 else measure
    levers = beside_reencode(levers) if dev.type == "cuda" else levers
    fastest = on_attention(model, lambda: fastest_attention(variants), levers)
    # TAEHV's tiny decoder in place of the Wan decoder (streamgen/model/tiny_decoder.py; random
    # weights, so its frames say nothing: only its speed). A third of a steady chunk was decoding.
    tiny_vae = tiny_decoder_vae(model.vae)

    def with_tiny_decoder(measurement):  # (its decoder_way names it: bench/variant_floor.py counts it)
        return lambda prepare: {
            **with_attributes(model, {"vae": tiny_vae}, lambda: measurement(prepare)),
            "decoder_way": TINY_DECODER,
        }

    extras["sdpa+fused_kernels, tiny decoder"] = with_tiny_decoder(measure)
    # and with the other levers (early: the likeliest to reach the target, a cut run keeps it)
    extras["sdpa+fused_kernels, every lever, tiny decoder"] = with_tiny_decoder(fastest)
    # the decoder's ways (and the tiny decoder beside them), then every lever with the fastest:
    # the likeliest to reach the target with the Wan decoder, before what is never the headline
    fast_ways = [name for name in DECODER_WAYS if name not in SLOW_DECODER_WAYS] + [TINY_DECODER]
    extras["decoder"] = lambda _prepare: decoder_variants(model, device, dtype, fast_ways, decoder_chunks)

    def with_fastest_decoder(measurement, required=True):
        def fn(prepare):
            best = fastest_decoder_way(variants.get("decoder", {}))
            if best is None and required:
                return {"skipped": "no decoder way was timed"}
            attributes = DECODER_WAYS[best] if best is not None else {}
            return {
                **with_attributes(model.vae, attributes, lambda: measurement(prepare)),
                "decoder_way": best,
            }

        return fn

    # every lever at once, with the Wan decoder its fastest way (without a timed way, the
    # others: a short run may leave `decoder` out)
    extras["sdpa+fused_kernels, every lever"] = with_fastest_decoder(fastest, required=False)
    # each chunk's keys/values from its last denoising step, no clean re-encode (one forward
    # of five fewer; docs/results.md measures what it costs the shipped student): reported,
    # never the headline, which stays Self-Forcing's way
    extras["sdpa+fused_kernels, cache from last step"] = on_session(measure, cache_from="last_step")
    extras["sdpa+fused_kernels, every lever, cache from last step"] = on_session(
        fastest, cache_from="last_step"
    )
    # all of it: the tiny decoder and the last step's cache with every other lever (the most
    # this model can stream at; reported, never the headline, as the last step alone)
    extras["sdpa+fused_kernels, every lever, tiny decoder, cache from last step"] = with_tiny_decoder(
        on_session(fastest, cache_from="last_step")
    )
    # the levers of `every lever` alone: the fastest decoder way, the decode beside the re-encode
    extras["sdpa+fused_kernels, fastest decoder way"] = with_fastest_decoder(measure)
    if dev.type == "cuda":
        extras["sdpa+fused_kernels, decode beside re-encode"] = beside_reencode(measure)
    # the start's reference encode, 3D as diffusers' or 2D (WanVAE.single_frame_2d, the default)
    extras["reference_encode"] = lambda _prepare: reference_encode_ways(
        model.vae, height, width, device, dtype
    )
    if compile_blocks:  # the decoder under Inductor: a minute of compiling
        extras["decoder_compiled"] = lambda _prepare: decoder_variants(
            model, device, dtype, SLOW_DECODER_WAYS, decoder_chunks
        )
    measured = {}
    if steps > 2:  # what the 2-step student would stream at (docs/results.md: it loses little)
        measured["sdpa+fused_kernels, 2 steps"] = lambda prepare: {**measure(prepare, steps=2), "steps": 2}
    # the Wan decoder one latent frame per call, diffusers' way (WanVAE.frames_per_call; on
    # a GPU the default decodes a chunk per call)
    measured["sdpa+fused_kernels, decoder frame_per_call"] = lambda prepare: with_attributes(
        model.vae, {"frames_per_call": 1}, lambda: measure(prepare)
    )
    return extras, measured
