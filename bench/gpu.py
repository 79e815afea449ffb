"""`streamgen bench gpu --json`: wan2.1-1.3b streaming on one GPU.

The published reference is Self-Forcing: Wan2.1-1.3B, 4 steps, 832x480, 17 FPS
and ~0.7-0.8 s to the first frames on one H100. Our target on one H200 with the
same architecture: >= 34 FPS and first chunk <= 0.35 s.

What runs: the `wan2.1-1.3b` flavor (30 layers, 1536 wide, audio branch on)
with random weights in bf16, the real Wan VAE architecture (random weights)
decoding chunk by chunk, 3 latent frames per chunk, a window of 21 latent
frames, 4 denoising steps + the clean re-encode, text context of 512 tokens.
All through `StreamSession`, the object the server uses, so the numbers
include the audio encoder, cache bookkeeping, VAE decode and the copy of the
frames to the host. Each variant warms up past the first chunk that sees a
full ring (every attention length compiled or autotuned), then restarts the
stream and times it: `fps_steady` once the ring is full (the streaming
product), and `fps_clip` over the first 81 frames from the first chunk on, as
Self-Forcing's 17 FPS was measured (its cache grows from empty over a clip of
Wan's length, so its chunks attend to fewer frames; `first_chunk_ms` includes
the start: reference encode and sink).

First it measures this device's ceilings (a large bf16 matrix product, the same
in FP8 with row-wise scales where the device has it, a device-to-device copy). In the order they
run (`--budget` starts no part expected to end past it, by the wall time of the streams timed so
far: `gpu_variants.expected_seconds`; `--out` keeps what finished if the run is killed): the
default, SDPA with the fused Triton kernels; then what has never run on a GPU: the DiT's block linears in FP8 (`streamgen.model.float8`, on
sm_89+, on a copy of the DiT); attention with QK^T in FP8 (`fp8_qk`), then with
PV too (`fp8`: our Triton kernel, `kernels.attention`); the stream decoding with TAEHV's tiny
decoder (streamgen/model/tiny_decoder.py; random weights: its speed, not its frames), alone and
with every other lever (FP8 linears, the fastest attention, the decode beside the re-encode); the
Wan decoder each way it can run (`decoder`, bench/wan_decoder.py; and TAEHV's tiny decoder of the
same latents beside them); every lever at once with the Wan decoder (FP8 linears, the fastest
attention and decoder way, the decode beside the re-encode): the likeliest to reach the target
run before the budget can cut them; each chunk's keys/values kept from its last denoising step
instead of a clean re-encode (`StreamSession.cache_from`), alone, with every lever, and with every
lever and the tiny decoder (reported, never the headline); the stream with the fastest decoder
way alone; on CUDA the stream decoding on a second CUDA stream beside the re-encode
(`StreamSession.decode_beside_reencode`); the reference encode each way; the Wan decoder under
Inductor (`decoder_compiled`); then what the H200 runs of 2026-11-30 measured: `stages`, the
default configuration stage by stage (audio, denoise, re-encode, decode, copy to the host; and a
fresh stream's first chunk), each against the floor its counted work sets under those ceilings
(bench/floor.py; every variant also gets `of_floor` and `of_clip_floor`, its rate over the
floor of its own configuration: FP8, the tiny decoder, the last step's cache, 2 steps each do
other work, counted by bench/variant_floor.py, `--floor-work`); 2 steps (reported, never
the headline), the decoder one latent frame per call (diffusers' way), our
Triton attention kernel, the PyTorch references (same model code, `kernels`
dispatch), SDPA with its cuDNN kernel first (`cudnn`); the kernel
micro-benchmarks (`bench/kernels.py`); then what is slowest to prepare:
FlexAttention and Inductor-compiled blocks (as `serve --compile` runs them,
the self-attention's cache step and attention eager; static shapes, for one stream). No CUDA graphs: the profile of the stages
says why (`bench.gpu_variants.compiled_blocks`).

Built to finish within ~8 minutes on one H200 with only PyTorch and Triton;
`--quick` runs the same code on CPU at tiny sizes (tests).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
import traceback

import numpy as np
import torch

from bench import ceilings as device_ceilings
from bench import floor, gpu_variants, stage_timing, variant_floor
from bench.gpu_plot import plot
from streamgen.cli import positive_int, positive_number
from streamgen.files import write_text_atomically
from streamgen.kernels import ATTENTION_BACKENDS
from streamgen.model.config import get_config
from streamgen.model.model import DiT
from streamgen.models import AvatarModel
from streamgen.stream import StreamSession

# `--quick`'s frame size: its tiny Wan VAE's convolutions at 64x96 were most of a --quick run on
# a CPU (the decoder's ways, every stream's decodes, the floors' counts); at a quarter of the
# pixels they run the same code, 8x the VAE's spatial factor and 2x the DiT's patch as before
QUICK_SIZE = (32, 48)


def build_model(
    flavor, height, width, device, dtype, quick, backend, window_frames: int | None = None
) -> AvatarModel:
    """`window_frames`: the ring's latent frames (default: 21, Wan's; `quick`, 6: two chunks)."""
    from diffusers import AutoencoderKLWan

    from bench.wan_decoder import in_dtype
    from streamgen.model.wan_vae import WanVAE

    torch.manual_seed(0)
    if quick:
        window = 6 if window_frames is None else window_frames
        cfg = get_config("debug", frames_per_chunk=3, window_frames=window, attn_backend=backend, in_channels=4)
    else:
        window = 21 if window_frames is None else window_frames
        cfg = get_config(flavor, frames_per_chunk=3, window_frames=window, attn_backend=backend)
    if torch.device(device).type == "cpu":  # (wan2.1-14b's, 56 GB in float32, was the kernel's to kill)
        from streamgen.models import check_memory_for

        with torch.device("meta"):
            check_memory_for(sum(p.numel() for p in DiT(cfg).parameters()), flavor)
    with torch.device(device):
        dit = DiT(cfg).to(dtype).eval()
        vae_kwargs = (
            dict(
                base_dim=8,
                z_dim=4,
                dim_mult=[1, 2, 2, 2],
                num_res_blocks=1,
                latents_mean=[0.0] * 4,
                latents_std=[1.0] * 4,
            )
            if quick
            else {}
        )
        vae = WanVAE(in_dtype(AutoencoderKLWan(**vae_kwargs), dtype).eval())
    return AvatarModel(flavor, dit, vae, height, width, shift=5.0, steps=4)


def start_stream(
    session: StreamSession,
    context: torch.Tensor | None = None,
    speech_s: float = 30.0,
    known_avatar=False,
    observe=None,
) -> None:
    """(Re)start `session` on a seeded random face and `speech_s` of noise for speech, with `context` as
    its text tokens (a long one, as T5's 512 in Wan: its cross-attention K/V are cached per stream).
    A new avatar each time (its start computed, as counted and timed), unless `known_avatar`: then
    the start the model kept from the last one (streamgen/start_memo.py). `observe`: as
    StreamSession.start's."""
    rng = np.random.default_rng(0)
    face = (rng.random((session.height, session.width, 3)) * 255).astype(np.uint8)
    if not known_avatar:
        session.model.start_memo.clear()
    session.start(face, seed=0, context=context, observe=observe)
    session.push_audio((rng.standard_normal(int(16000 * speech_s)) * 0.1).astype(np.float32))


def stream_speed(
    model,
    steps,
    chunks,
    warmup_chunks,
    device,
    dtype,
    text_tokens,
    prepare=None,
    clip_frames=floor.CLIP_FRAMES,
) -> dict:
    """Time one stream; `prepare(session)` runs after each (re)start, before any chunk. `fps_clip`
    is the rate of its first `clip_frames` frames, from the first chunk on (Self-Forcing's
    setting; bench/floor.py); without enough chunks for them it is None."""
    cfg = model.cfg
    session = StreamSession(model, steps=steps, device=device, dtype=dtype)
    context = torch.randn(1, text_tokens, cfg.text_dim, device=device, dtype=dtype)

    def start(known_avatar=False):
        start_stream(session, context, known_avatar=known_avatar)
        if prepare is not None:
            prepare(session)

    sync = device_ceilings.synchronize(device)
    cuda = torch.device(device).type == "cuda"
    if cuda:  # this variant's peak, not the run's (the ceilings' copy buffers, earlier variants)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    start()
    # past the chunk that first sees a full ring: every attention length has run (and been
    # compiled or autotuned) before anything is timed
    for _ in range(warmup_chunks):
        session.next_chunk()
    sync()
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    start()
    sync()
    start_s = time.perf_counter() - t0
    times, chunk_frames = [], []
    # the first chunk, then `chunks` more, at least to the first that attends to a full ring (a
    # stream's chunk `full`, its first being 0): fps_steady times those from it on
    full = session.chunks_to_full_ring - 1
    for _ in range(1 + max(chunks, full)):
        t = time.perf_counter()
        frames, _ = session.next_chunk()  # next_chunk copies frames to the host: it has synchronised
        if sum(chunk_frames) < clip_frames <= sum(chunk_frames) + len(frames):
            # the clip's last chunk: a chunk that decodes beside its re-encode returns with the
            # re-encode still queued, which the next chunk pays; the clip's time includes it
            sync()
        times.append(time.perf_counter() - t)
        chunk_frames.append(len(frames))
    # a start of the same avatar again, from what the model kept of the last: what a server's
    # built-in avatars get after their first stream
    sync()  # a chunk that decodes beside its re-encode returns with the re-encode still queued
    t = time.perf_counter()
    start(known_avatar=True)
    session.next_chunk()
    known_avatar_s = time.perf_counter() - t
    session.close()
    # the clip: its first chunks up to clip_frames frames
    clip_chunks = int(np.searchsorted(np.cumsum(chunk_frames), clip_frames)) + 1
    fps_clip = None
    if clip_chunks <= len(times):
        fps_clip = sum(chunk_frames[:clip_chunks]) / sum(times[:clip_chunks])
    (first_s, *times), (first_frames, *chunk_frames) = times, chunk_frames
    n_frames = sum(chunk_frames)
    # (the second half of the chunks held ring-filling ones, quicker, wherever fewer were timed
    # than twice the ring's: `--chunks 8` at Wan's window of 21)
    steady, steady_frames = times[full - 1 :], chunk_frames[full - 1 :]
    return {
        "fps": round(n_frames / sum(times), 2),
        "fps_steady": round(sum(steady_frames) / sum(steady), 2),
        "steady_chunks": len(steady),
        "fps_clip": None if fps_clip is None else round(fps_clip, 2),
        "clip_frames": clip_frames,
        "first_chunk_ms": round((start_s + first_s) * 1000, 1),
        "start_ms": round(start_s * 1000, 1),
        "first_chunk_ms_known_avatar": round(known_avatar_s * 1000, 1),
        "first_chunk_frames": first_frames,
        "chunk_ms": [round(t * 1000, 1) for t in times],
        "chunk_ms_p50": round(float(np.percentile(times, 50)) * 1000, 1),
        "chunk_ms_p95": round(float(np.percentile(times, 95)) * 1000, 1),
        "frames_per_chunk": int(round(n_frames / len(times))),
        "chunks": len(times),
        "warmup_chunks": warmup_chunks,
        "warmup_s": round(warmup_s, 1),
        "max_memory_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if cuda else None,
    }


# the fresh streams whose first chunk `stages` times, stage by stage (medians): the GPU run's
STAGE_RESTARTS = 3


def stage_breakdown(
    model, steps, chunks, device, dtype, text_tokens, ceilings, clip_frames, restarts=STAGE_RESTARTS
) -> dict:
    """Where a chunk's time goes: each stage's work counted once the ring is full, then timed over
    `chunks` chunks against its floor under the ceilings measured in this run (bench/floor.py);
    and where a fresh stream's first chunk goes (`first_chunk`: the start, then each stage, medians
    of `restarts` restarts)."""
    session = StreamSession(model, steps=steps, device=device, dtype=dtype)
    context = torch.randn(1, text_tokens, model.cfg.text_dim, device=device, dtype=dtype)
    restart = lambda observe=None: start_stream(session, context, observe=observe)  # noqa: E731
    work = floor.chunk_work(session, restart, steps, clip_frames)
    try:
        return stage_timing.timed_report(session, work, ceilings, chunks, restart=restart, first_chunks=restarts)
    finally:
        session.close()


def write_partial(result: dict, path: str | None) -> None:
    """Write what has been measured so far (atomically), so that a run killed by an outer
    timeout still leaves every finished variant on disk."""
    if path:
        write_text_atomically(path, json.dumps(result))


def _variant(name, fn, budget_s, started, result, out=None, expected_s=0.0):
    """Run part `name` (fn() -> its figures) into result["variants"], unless it is expected
    (`expected_s`) to end past `budget_s` from `started`: then it is skipped, saying why. The
    JSON at `out` is rewritten before and after, so a run killed meanwhile leaves it valid, with
    this part marked `running`; one interrupted (SIGINT: gpu_check.sh's timeout) marks it so and
    stops the run."""
    elapsed = time.perf_counter() - started
    if elapsed + expected_s > budget_s:
        result["variants"][name] = {
            "skipped": f"time budget of {budget_s:.0f} s: {budget_s - elapsed:.0f} s left, "
            f"expected to take {expected_s:.0f} s"
        }
        return
    result["variants"][name] = {"running": True}  # what a killed run was doing
    write_partial(result, out)
    t0 = time.perf_counter()
    try:
        figures = fn()
        wall_s = round(time.perf_counter() - t0, 1)  # for what the budget expects of the next parts
        if "fps" in figures:  # a stream
            figures["wall_s"] = wall_s
        else:  # a part of its own (its figures a dict of ways, stages...)
            result.setdefault("parts_wall_s", {})[name] = wall_s
        result["variants"][name] = figures
    except KeyboardInterrupt:
        result["variants"][name] = {"interrupted": f"after {time.perf_counter() - t0:.0f} s (SIGINT)"}
        raise
    except Exception as e:  # report and go on: one failing variant must not lose the others
        result["variants"][name] = {
            "error": f"{type(e).__name__}: {e}"[:400],
            "trace": traceback.format_exc()[-800:],
            "wall_s": round(time.perf_counter() - t0, 1),
        }
    finally:
        summarize(result)  # the headline as it stands: a run killed later keeps it
        result["seconds"] = round(time.perf_counter() - started, 1)
        write_partial(result, out)
        if torch.cuda.is_available():
            try:  # after a sticky CUDA error (an illegal access) this raises too
                torch.cuda.empty_cache()
            except Exception as e:
                result.setdefault("cuda_errors", []).append(f"after {name}: {type(e).__name__}: {e}"[:300])
                write_partial(result, out)


def summarize(result: dict) -> None:
    """The headline from the variants measured so far: the best at the benchmark's step count
    with the cache from the re-encode, the fastest however its cache was made, the quickest
    first chunk, and each variant against the floor (`stages`)."""
    steps = result.get("steps")
    # the variants that timed a stream at the benchmark's step count (one with fewer says so in "steps")
    timed = {
        k: v
        for k, v in result["variants"].items()
        if "fps_steady" in v and "first_chunk_ms" in v and v.get("steps", steps) == steps
    }
    ok = {k: v for k, v in timed.items() if v.get("cache_from", "reencode") == "reencode"}
    if ok:
        best = max(ok, key=lambda k: ok[k]["fps_steady"])
        result["best_variant"] = best
        for key in ("fps", "fps_steady", "fps_clip", "first_chunk_ms", "chunk_ms_p50", "chunk_ms_p95"):
            result[key] = ok[best].get(key)
        result["target_fps"], result["target_first_chunk_ms"] = floor.TARGET_FPS, 350
    # beside the headline: the fastest at the benchmark's steps however its cache was made (the
    # last step's too), and the quickest first chunk
    if timed:
        fastest = max(timed, key=lambda k: timed[k]["fps_steady"])
        quickest = min(timed, key=lambda k: timed[k]["first_chunk_ms"])
        result["fastest_any_cache"] = {"variant": fastest, "fps_steady": timed[fastest]["fps_steady"]}
        result["quickest_first_chunk"] = {
            "variant": quickest,
            "first_chunk_ms": timed[quickest]["first_chunk_ms"],
        }
    stages = result.get("stages") or result["variants"].get("stages") or {}
    if "floor" in stages:  # the default configuration's
        result["fps_ceiling"], result["clip_fps_ceiling"] = stages["fps_ceiling"], stages["clip_fps_ceiling"]
    # how close each variant comes to its own floor (its `fps_ceiling`, bench/variant_floor.py),
    # steady and over the clip; without one, to the default's if it does the default's work
    for v in result["variants"].values():
        if "fps_steady" not in v:
            continue
        ceilings = {}
        if "floor" in stages and variant_floor.does_default_work(v, steps):
            ceilings = {"fps_ceiling": stages["fps_ceiling"], "clip_fps_ceiling": stages["clip_fps_ceiling"]}
        ceilings.update({k: v[k] for k in ("fps_ceiling", "clip_fps_ceiling") if k in v})
        if ceilings:  # the same frames in the floor and the measurement: a ratio of rates
            v["of_floor"] = floor.rounded(v["fps_steady"] / ceilings["fps_ceiling"])
            if v.get("fps_clip") is not None:
                v["of_clip_floor"] = floor.rounded(v["fps_clip"] / ceilings["clip_fps_ceiling"])


def run(
    device="cuda",
    quick=False,
    steps=4,
    chunks=12,
    warmup_chunks=None,
    budget_s=420.0,
    compile_blocks=True,
    kernel_bench=True,
    backends=("sdpa", "cudnn", "triton", "flex"),
    out=None,
    only=None,
    floor_work=None,
    stage_restarts=STAGE_RESTARTS,
) -> dict:
    """`only`: the names of the parts to run (variants, "stages", "decoder", "reference_encode",
    "kernels", "decoder_compiled"); None: all. `floor_work`: the counts of `bench.variant_floor`
    for this model, which set each variant against its own floor (--quick counts its own).
    `stage_restarts`: the fresh streams `stages` times its first chunk over."""
    started = time.perf_counter()
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        return {"error": "CUDA requested but not available"}
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    height, width = QUICK_SIZE if quick else (480, 832)
    text_tokens = 8 if quick else 512
    clip_frames = 33 if quick else floor.CLIP_FRAMES  # --quick: 3 chunks
    chunks_asked = chunks
    if quick:  # (capped without a word before: the JSON's chunks_asked and chunks say it)
        chunks = min(chunks, 4)
    result = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "flavor": "debug" if quick else "wan2.1-1.3b",
        "height": height,
        "width": width,
        "steps": steps,
        "frames_per_chunk_latent": 3,
        "window_frames": 21,
        "clip_frames": clip_frames,
        "chunks": chunks,  # each stream variant's, past its first (--quick: at most 4)
        "chunks_asked": chunks_asked,
        "dtype": str(dtype).removeprefix("torch."),
        "weights": "random",
        "variants": {},
    }
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # this device's matrix rates (its dtype's, FP8's where it has them) and copy bandwidth: the
    # ceilings of the floor below
    fp8 = dev.type == "cpu" or torch.cuda.get_device_capability(dev) >= (8, 9)
    # --quick on a CPU: products of 256 and a 32 MiB copy, rates for its tiny streams' floors (the
    # CPU's 1024 and 256 MiB, FP8's emulated product too, took seconds of each quick run: tests')
    sizes = {"size": 256, "copy_mib": 32} if quick and dev.type == "cpu" else {}
    try:  # a failure here (a first FP8 product on this GPU) must not cost the variants
        result["ceilings"] = floor.rounded(device_ceilings.measure_ceilings(device, [dtype], float8=fp8, **sizes))
    except Exception as e:
        result["ceilings"] = {"error": f"{type(e).__name__}: {e}"[:400]}
    write_partial(result, out)
    try:
        model = build_model("wan2.1-1.3b", height, width, device, dtype, quick, "sdpa")
    except Exception as e:  # e.g. diffusers missing on a bare GPU image: say so, and still time the kernels
        model, result["error"] = None, f"building the model failed: {type(e).__name__}: {e}"[:400]
        write_partial(result, out)
    if model is not None:
        result["window_frames"] = model.cfg.window_frames  # --quick: the debug model's
    floor_counts = {}  # bench.variant_floor's: read, or counted, once a stream needs them

    def counts():
        if not floor_counts:
            floor_counts["work"], result["floor_counts"] = variant_floor.counts_for_run(
                floor_work, quick, steps
            )
        return floor_counts["work"]

    plan = variant_plan(
        model, result, device, dtype, quick=quick, steps=steps, chunks=chunks,
        warmup_chunks=warmup_chunks, text_tokens=text_tokens, clip_frames=clip_frames, fp8=fp8,
        compile_blocks=compile_blocks, kernel_bench=kernel_bench, backends=backends,
        stage_restarts=stage_restarts,
    )  # fmt: skip
    # `only` names outside the parts this run can run are typos: said before the run (they were
    # said after it, minutes later), and a run with none of its parts named is refused
    unknown = sorted((only or set()) - set(plan))
    if unknown and model is not None and not only & set(plan):
        from streamgen.cli import UserError

        # (each name quoted: a variant's name holds ", " itself, "sdpa+fused_kernels, fp8 linears", and
        # the names joined with ", " read as a list of one name over and over)
        parts = ", ".join(f"'{name}'" for name in plan)
        raise UserError(f"--only {' '.join(unknown)}: no part of this run; its parts are {parts}")
    if unknown:
        result["only_unknown"] = unknown
        print(f"bench gpu: --only names no part of this run: {unknown}", file=sys.stderr, flush=True)
    try:
        for name, fn in plan.items():
            if only is None or name in only:
                expected = gpu_variants.expected_seconds(name, result["variants"])
                _variant(name, fn, budget_s, started, result, out, expected)
                figures = result["variants"].get(name, {})
                # its own floor's rates; without the ceilings there are none, so no counts either
                # (--quick counts five configurations here: half a minute on a CPU)
                measured_rates = "error" not in result["ceilings"]
                if "fps_steady" in figures and measured_rates and counts() is not None:
                    figures.update(variant_floor.own_ceilings(counts(), figures, result["ceilings"], steps))
                    summarize(result)
                    write_partial(result, out)
    finally:  # interrupted too: the parts beside the variants, where a reader looks for them
        # (what it reached in order, the parts too: the streams timed before each set its budget)
        result["order"] = list(result["variants"])
        for part in PARTS:
            if part in result["variants"]:
                result[part] = result["variants"].pop(part)
        summarize(result)
        result["seconds"] = round(time.perf_counter() - started, 1)
        write_partial(result, out)
    return result


# what runs among the variants but reports beside them (no stream of its own)
PARTS = ("stages", "decoder", "reference_encode", "decoder_compiled", "kernels")


def variant_plan(
    model, result, device, dtype, *, quick, steps, chunks, warmup_chunks, text_tokens, clip_frames,
    fp8, compile_blocks, kernel_bench, backends, stage_restarts=STAGE_RESTARTS,
) -> dict:  # fmt: skip
    """name -> fn() -> its figures, in the order they run: the default's figures, what has never
    run on a GPU, what earlier runs measured (`lever_variants`, `stream_variants`), the kernel
    micro-benchmarks, then what is slowest to prepare. Without a model, the kernels alone."""
    plan = {}
    if model is not None:
        cfg = model.cfg
        warmup = warmup_chunks if warmup_chunks is not None else cfg.window_frames // cfg.frames_per_chunk + 2

        def measure(prepare=None, steps=steps):
            return stream_speed(
                model, steps, chunks, warmup, device, dtype, text_tokens, prepare, clip_frames
            )

        # the decoder's ways each over as many chunks as a stream times, at most 5 (the GPU run's
        # 12: 5; a short --chunks on a CPU, as few as it)
        new, measured = gpu_variants.lever_variants(
            model, measure, result["variants"], device, dtype, steps, model.height, model.width, fp8,
            compile_blocks, decoder_chunks=min(chunks, 5),
        )  # fmt: skip
        # the default configuration stage by stage against its floor: measured on 2026-11-30
        measured = {
            "stages": lambda _prepare: stage_breakdown(
                model, steps, min(chunks, 6), device, dtype, text_tokens, result["ceilings"], clip_frames,
                stage_restarts,
            ),
            **measured,
        }
        first, last = gpu_variants.stream_variants(model, measure, backends, compile_blocks, new, measured)
        plan.update(first)
    if kernel_bench:  # the model stays loaded: 3 GB of 141

        def kernel_numbers():
            from bench import kernels as kernel_bench_module

            cuda = torch.device(device).type == "cuda"
            return kernel_bench_module.run(device, quick=quick, compile=not quick and cuda)

        plan["kernels"] = kernel_numbers
    if model is not None:  # the slowest to prepare, which the budget cuts first: Flex, compiled blocks
        plan.update(last)
    return plan


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cuda", help="default cuda (`--device cpu --quick`: the same code at tiny sizes)")
    p.add_argument("--quick", action="store_true", help="tiny sizes on any device (tests)")
    p.add_argument("--steps", type=positive_int, default=4, help="denoising steps (default 4)")
    p.add_argument("--chunks", type=positive_int, default=12,
                   help="chunks each variant times, at least to the first on a full ring "
                   "(default 12; --quick: at most 4)")  # fmt: skip
    p.add_argument("--warmup-chunks", type=int, default=None,
                   help="chunks before each variant's timing (default: past the first with a full ring)")  # fmt: skip
    # (0 or less ran no part, after the ceilings and the model were built; an unknown backend's
    # variants each failed, after their stream was built)
    p.add_argument("--budget", type=positive_number, default=420.0,
                   help="seconds by which the run ends: no part starts that is expected to end past it "
                   "(default: %(default)g)")  # fmt: skip
    p.add_argument("--no-compile", action="store_true",
                   help="skip what runs under Inductor: the DiT's compiled blocks and the compiled decoder")  # fmt: skip
    p.add_argument("--no-kernels", action="store_true", help="skip the kernel micro-benchmarks")
    p.add_argument("--stage-restarts", type=positive_int, default=STAGE_RESTARTS,
                   help="fresh streams `stages` times its first chunk over, each stage's median "
                   "(default: %(default)s)")  # fmt: skip
    p.add_argument("--backends", nargs="+", choices=ATTENTION_BACKENDS, default=["sdpa", "cudnn", "triton", "flex"],
                   help="attention backends timed with the fused kernels (default: sdpa cudnn triton flex; "
                   "sdpa's variants run whatever this says)")  # fmt: skip
    p.add_argument(
        "--only",
        nargs="+",  # (`--only` and no name ran no part, after the ceilings and the model were built)
        help="run only these parts: variant names, stages, decoder, reference_encode, kernels, decoder_compiled",
    )
    p.add_argument("--out", help="also write the JSON here, rewritten after each variant (survives a kill)")
    p.add_argument("--floor-work", help="bench.variant_floor's counts: each variant against its own floor")
    p.add_argument("--plot", help="write fps per variant and chunk times to this PNG")


def main(args) -> dict:
    from streamgen.cli import UserError, check_device

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("no CUDA device here; `--device cpu --quick` runs the same code at tiny sizes")
    check_device(args.device)  # (an unknown one was torch's RuntimeError from deep inside)
    if args.warmup_chunks is not None and args.warmup_chunks < 0:
        raise UserError("--warmup-chunks must be 0 or more")
    if args.floor_work is not None:  # (a file not there, or another run's, was said in the JSON after the run)
        work, said = variant_floor.counts_for_run(args.floor_work, args.quick, args.steps)
        if work is None:
            raise UserError(f"--floor-work {said.removeprefix('none: ')}: write it with `python -m "
                            "bench.variant_floor --out FILE` and this run's --quick and --steps")  # fmt: skip
    result = run(
        args.device,
        args.quick,
        args.steps,
        args.chunks,
        budget_s=args.budget,
        compile_blocks=not args.no_compile,
        kernel_bench=not args.no_kernels,
        backends=tuple(args.backends),
        out=args.out,
        only=None if args.only is None else set(args.only),
        warmup_chunks=args.warmup_chunks,
        floor_work=args.floor_work,
        stage_restarts=args.stage_restarts,
    )
    if args.plot and any("fps" in v for v in result["variants"].values()):
        plot(result, args.plot)
    elif args.plot:  # (the plot is of the streams' fps: asked for, and left unwritten without a word)
        print(f"bench gpu: --plot {args.plot} not written: no stream variant was timed", file=sys.stderr)
    return result


if __name__ == "__main__":
    # (named as it is run: it said "usage: gpu.py", a file no one types)
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.splitlines()[0])
    add_arguments(parser)
    print(json.dumps(main(parser.parse_args())))
