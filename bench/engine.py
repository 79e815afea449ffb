"""`streamgen bench engine --json`: the streaming engine on this machine.

Measured in one process, so the ratios compare like with like on a noisy,
shared machine; the arms of each ratio take turns in an order reversed every other round
(bench/rounds.py), and its `*_rounds` gives each round's ratio, their median, min and max:
- fps, first_chunk_ms, chunk_ms_p50/p95: StreamSession end to end (audio
  encoder, few-step denoise against the cache, clean re-encode, VAE decode).
  first_chunk_ms starts a new avatar; first_chunk_ms_known_avatar starts the
  same one again, its reference latent and sink as the model kept them
  (streamgen/start_memo.py), as a server's built-in avatars start.
  frames_ms_p50: of those, the time to a chunk's frames, its clean re-encode
  left until they are out (as the server runs it).
- cache_from_last_step: the session keeping each chunk's keys/values from its
  last denoising step (no clean re-encode, `StreamSession.cache_from`) against
  the same with the re-encode, in alternating rounds; and the transformer's
  part of a chunk alone (denoising and cache write), the two ways interleaved.
  At `--steps 1` it is `skipped` (a 1-step chunk's last step sees only noise).
- cache_speedup (bench/engine_baselines.py, as teacher_speedup): per chunk, cached streaming vs recomputing the whole context
  (block-causal forward over sink + context + chunk at every step) with >= 21
  latent frames of context; the two produce the same latents (reported).
- teacher_speedup: the same architecture run bidirectionally over the same
  clip with 50 Euler steps and CFG (100 evaluations) vs the cached student
  generating the same number of frames, at 4 (and 2, 1) steps.

`--sweep 64 192 256 ...` measures all of these again at each size, and
`largest_realtime` names the largest measured size that streams at >= 25
frames/s (null where none does): on a small CPU the ratios depend on the size (the student's small
per-chunk matrices are dominated by per-op overhead; the teacher's attention
grows with the square of the clip's tokens). `--compile` adds `compile`: the
session with its DiT's blocks compiled as `serve --compile` runs them
(streamgen/model/compile.py) against the same session eager, in alternating
rounds; `compile_seconds` is the warm-up that compiled them (a compile that fails,
e.g. without a C++ compiler, is its `error`, the rest printed). Everything else
is measured eager.

The decoder runs as a session's does (`--decode-dtype`, default auto: bf16 on
CPUs with native bf16, AMX or AVX512-BF16); when that is bf16, every size also gets
`decode_float32`: the session with an fp32 decoder against the bf16 one, in alternating
rounds. Likewise the reference image's encoder (auto: bf16 on such CPUs; `encode_float32`,
which compares a new avatar's first chunk) and the DiT (`--dtype`, default auto: bf16 on CPUs
with AMX where a chunk's forward reaches 1.5 GFLOP; `dit_float32`, `dit_dtype`). On a CPU
with AVX512-BF16 and no AMX, which keeps the DiT in fp32, the sizes AMX would run in bf16 get
`dit_bfloat16`: the same two timed the other way round, the figure behind that choice.

Each stage runs on the threads a session gives it (`--cpu-threads`, default auto:
one thread unless its work gains from all, streamgen/cpu_threads.py; the DiT
forwards of cache_speedup and teacher_speedup by the same rule, each side by the
size of its own forward). Under auto every size also gets `cpu_threads_all`: the
session with every stage on all threads (as before auto) against auto, in
alternating rounds.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from bench.engine_baselines import cache_speedup, session_dit_threads, teacher_speedup
from bench.machine import cpu_description, model_settings
from bench.rounds import balanced_order, ratio_rounds
from streamgen.cli import add_dtype_option, frame_size, positive_int, thread_count
from streamgen.cpu_threads import cpu_has_amx
from streamgen.models import load_model
from streamgen.precision import autoencoder_dtype, default_dit_dtype
from streamgen.sampling import (
    encode_sink,
    generate_chunk,
    student_sigmas,
)
from streamgen.stream import StreamSession


def _percentile(xs, q):
    return float(np.percentile(np.asarray(xs), q))


def session_speed(
    model,
    height,
    width,
    steps,
    chunks,
    seed=0,
    decode_dtype="auto",
    cache_from=None,
    cpu_threads="auto",
    dtype="auto",
    encode_dtype="auto",
) -> dict:
    rng = np.random.default_rng(seed)
    face = (rng.random((height, width, 3)) * 255).astype(np.uint8)
    speech = (rng.standard_normal(16000 * 60) * 0.1).astype(np.float32)
    session = StreamSession(
        model, height=height, width=width, steps=steps, dtype=dtype, decode_dtype=decode_dtype,
        cache_from=cache_from, cpu_threads=cpu_threads, encode_dtype=encode_dtype,
    )  # fmt: skip
    # warm-up session: first-call allocations and kernel selection, as a warmed server has done
    session.start(face, seed=seed)
    session.push_audio(speech[:16000])
    session.next_chunk()
    model.start_memo.clear()  # a new avatar: its start computed (`first_chunk_ms_known_avatar`: kept)
    t0 = time.perf_counter()
    session.start(face, seed=seed)
    session.push_audio(speech)
    session.next_chunk()
    first_ms = (time.perf_counter() - t0) * 1000
    times, to_frames = [], []
    for _ in range(chunks):
        # as the server's worker runs it: the last chunk's re-encode once its frames are out, then
        # this chunk's, whose frames come that much sooner (`frames_ms`)
        t = time.perf_counter()
        session.write_pending_chunk()
        t_frames = time.perf_counter()
        session.next_chunk()
        times.append(time.perf_counter() - t)
        to_frames.append(time.perf_counter() - t_frames)
    # the same avatar again: its start as the model kept it (streamgen/start_memo.py)
    t0 = time.perf_counter()
    session.start(face, seed=seed)
    session.push_audio(speech)
    session.next_chunk()
    known_ms = (time.perf_counter() - t0) * 1000
    session.close()
    return {
        "fps": round(chunks * session.frames_per_chunk / sum(times), 2),
        "first_chunk_ms": round(first_ms, 1),
        "first_chunk_ms_known_avatar": round(known_ms, 1),
        "chunk_ms_p50": round(_percentile(times, 50) * 1000, 1),
        "chunk_ms_p95": round(_percentile(times, 95) * 1000, 1),
        "frames_ms_p50": round(_percentile(to_frames, 50) * 1000, 1),
        "frames_per_chunk": session.frames_per_chunk,
    }


def batch_throughput(
    model, height, width, steps, sessions=3, chunks=6, decode_dtype="auto", cpu_threads="auto", dtype="auto"
) -> dict:
    """Aggregate frames/s of several streams at full windows: one batched forward per step
    (`next_chunks`) vs the same streams one after another, each way warmed by a chunk untimed."""
    from streamgen.stream_batch import next_chunks

    rng = np.random.default_rng(1)

    def started():
        out = []
        for i in range(sessions):
            s = StreamSession(
                model, height=height, width=width, steps=steps, dtype=dtype, decode_dtype=decode_dtype,
                cpu_threads=cpu_threads,
            )  # fmt: skip
            s.start((rng.random((height, width, 3)) * 255).astype(np.uint8), seed=i)
            s.push_audio((rng.standard_normal(16000 * 60) * 0.1).astype(np.float32))
            for _ in range(s.cfg.window_frames // s.cfg.frames_per_chunk + 1):
                s.next_chunk()
            out.append(s)
        return out

    batched, alone = started(), started()
    # the streams alone have run their shapes (their rings filled one by one), the batch not yet:
    # its first forward at this batch size, with its first-call allocations, untimed as theirs were
    next_chunks(batched)
    for s in alone:
        s.next_chunk()
    times = {"batched": [], "alone": []}
    for _, way in balanced_order(times, chunks):  # interleaved, so load changes hit both alike
        t = time.perf_counter()
        if way == "batched":
            next_chunks(batched)
        else:
            for s in alone:
                s.next_chunk()
        times[way].append(time.perf_counter() - t)
    t_batched, t_alone = sum(times["batched"]), sum(times["alone"])
    frames = chunks * sessions * batched[0].frames_per_chunk
    return {
        "batch_sessions": sessions,
        "batched_fps_total": round(frames / t_batched, 2),
        "sequential_fps_total": round(frames / t_alone, 2),
        "batch_speedup": round(t_alone / t_batched, 2),
        "batch_speedup_rounds": ratio_rounds(times["alone"], times["batched"]),
    }


REALTIME_FPS = 25.0


def measure_size(
    model, height, width, steps, chunks, context, teacher_frames, decode_dtype="auto", cpu_threads="auto",
    ratio_chunks=None,
) -> dict:  # fmt: skip
    """Every per-size figure: the session end to end, cache_speedup and teacher_speedup (on the DiT
    the session runs); when the session's DiT runs in bfloat16, the session against the same with
    its DiT in float32 too, and likewise for the decoder and (a new avatar's first chunk) the
    reference image's encoder; under cpu_threads "auto", the session
    against the same with every stage on all threads."""
    latent_hw = model.vae.latent_hw(height, width)
    dit = session_dit(model, latent_hw)
    few = ratio_chunks or max(5, chunks // 2)  # each arm of a ratio (as `run` times each --sweep size)
    session = {"decode_dtype": decode_dtype, "cpu_threads": cpu_threads}
    out = {"height": height, "width": width, "dit_dtype": _name(next(dit.parameters()).dtype)}
    out.update(timed_chunks=chunks, ratio_chunks=few)  # (the JSON said neither)
    out.update(session_speed(model, height, width, steps, chunks, **session))
    if cpu_threads == "auto":
        out["cpu_threads_all"] = cpu_threads_speedup(model, height, width, steps, few, **session)
    if dit is not model.dit:
        out["dit_float32"] = float32_speedup(model, height, width, steps, few, "dtype", **session)
    elif not cpu_has_amx() and default_dit_dtype(model, "cpu", latent_hw, amx=True) == torch.bfloat16:
        # a size where AMX runs a bfloat16 DiT, on a CPU without: the other way timed too
        out["dit_bfloat16"] = float32_speedup(
            model, height, width, steps, few, "dtype", asked=torch.bfloat16, **session
        )
    if autoencoder_dtype(decode_dtype, model.vae, "cpu") == torch.bfloat16:
        out["decode_float32"] = float32_speedup(model, height, width, steps, few, "decode_dtype", **session)
    if (
        autoencoder_dtype("auto", model.vae, "cpu") == torch.bfloat16
    ):  # the reference encoder: a new avatar's first chunk
        out["encode_float32"] = float32_speedup(
            model, height, width, steps, few, "encode_dtype", key="first_chunk_ms", **session
        )
    if steps > 1:
        out["cache_from_last_step"] = cache_from_speedup(model, height, width, steps, few, dit=dit, **session)
    else:  # (a session refuses it: a 1-step chunk's last step sees only noise)
        out["cache_from_last_step"] = {"skipped": "a 1-step chunk has no last step to keep: it re-encodes"}
    out.update(cache_speedup(model, latent_hw, steps, max(3, chunks // 4), context, cpu_threads, dit=dit))
    out.update(teacher_speedup(model, latent_hw, teacher_frames, [4, 2, 1], cpu_threads=cpu_threads, dit=dit))
    return out


def session_dit(model, latent_hw):
    """The DiT a session of `model` at `latent_hw` runs on this CPU (dtype "auto")."""
    return model.dit_in(default_dit_dtype(model, "cpu", latent_hw))


def _name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def alternating_fps(
    model, height, width, steps, chunks, variants: dict, rounds=2, key="fps", **session
) -> dict:
    """name -> the session's fps (or another `session_speed` figure, `key`) with those
    `session_speed` keyword arguments (over `session`'s), one per round, the rounds running every
    variant in turn, in an order reversed every other round (the machine's load hits them alike)."""
    runs = {name: [] for name in variants}
    for _, name in balanced_order(variants, rounds):
        kwargs = {**session, **variants[name]}
        runs[name].append(session_speed(model, height, width, steps, chunks, **kwargs)[key])
    return runs


def _medians(runs: dict) -> dict:
    return {name: float(np.median(v)) for name, v in runs.items()}


def cpu_threads_speedup(model, height, width, steps, chunks, rounds=2, **session) -> dict:
    """The session with each stage on its threads (cpu_threads "auto") against the same with every
    stage on all of them ("all", as sessions ran before "auto"), alternating rounds."""
    variants = {way: {"cpu_threads": way} for way in ("all", "auto")}
    runs = alternating_fps(model, height, width, steps, chunks, variants, rounds, **session)
    fps = _medians(runs)
    return {
        "fps": round(fps["all"], 2),
        "auto_fps": round(fps["auto"], 2),
        "auto_speedup": round(fps["auto"] / fps["all"], 3),
        "auto_speedup_rounds": ratio_rounds(runs["auto"], runs["all"]),
        "threads": torch.get_num_threads(),
    }


def float32_speedup(
    model, height, width, steps, chunks, setting: str, rounds=2, key="fps", asked=torch.float32, **session
) -> dict:
    """The session as configured, whose DiT (`setting` "dtype"), decoder ("decode_dtype") or
    reference encoder ("encode_dtype") runs in bfloat16, against the same with that part in
    float32 (`asked`; or, where it runs in float32, bfloat16 asked for), alternating rounds: their
    fps, or their `key` ("first_chunk_ms": a new avatar's)."""
    variants = {"float32": {setting: torch.float32}, "bfloat16": {}}
    if asked == torch.bfloat16:
        variants = {"float32": {}, "bfloat16": {setting: torch.bfloat16}}
    runs = alternating_fps(model, height, width, steps, chunks, variants, rounds, key, **session)
    got = _medians(runs)
    faster, slower = ("bfloat16", "float32") if key == "fps" else ("float32", "bfloat16")  # (a rate, a time)
    return {
        key: round(got["float32"], 2),
        f"bfloat16_{key}": round(got["bfloat16"], 2),
        "bfloat16_speedup": round(got[faster] / got[slower], 3),
        "bfloat16_speedup_rounds": ratio_rounds(runs[faster], runs[slower]),
    }


def cache_from_speedup(model, height, width, steps, chunks, rounds=2, reps=20, dit=None, **session) -> dict:
    """Each chunk's keys/values from its last denoising step against the clean re-encode
    (`StreamSession.cache_from`): the session end to end in alternating rounds, and the part
    that differs alone, a chunk's denoising and cache write (`generate_chunk`, on `dit`: the
    session's), the two ways interleaved `reps` times (the decode and the audio encoder, the
    same both ways, are much of a small model's chunk on a CPU, and of its noise)."""
    ways = ("reencode", "last_step")
    variants = {way: {"cache_from": way} for way in ways}
    runs = alternating_fps(model, height, width, steps, chunks, variants, rounds, **session)
    fps = _medians(runs)
    dit = dit or model.dit
    cfg = dit.cfg
    cpu_threads = session.get("cpu_threads", "auto")
    hw = model.vae.latent_hw(height, width)
    dtype = next(dit.parameters()).dtype
    gen = torch.Generator().manual_seed(0)
    context = torch.randn(1, 4, cfg.text_dim, generator=gen).to(dtype)
    audio = None
    if dit.audio_encoder is not None:
        audio = torch.randn(1, cfg.frames_per_chunk, cfg.audio_window, cfg.audio_dim, generator=gen).to(dtype)
    sigmas = student_sigmas(steps, model.shift)
    caches = {way: dit.new_cache(1, hw, dtype) for way in ways}
    for cache in caches.values():
        encode_sink(
            dit,
            cache,
            torch.randn(1, cfg.in_channels, cfg.sink_frames, *hw, generator=gen).to(dtype),
            context,
        )
    shape = (1, cfg.in_channels, cfg.frames_per_chunk, *hw)
    noises = [torch.randn(shape, generator=gen).to(dtype) for _ in range(reps)]
    times = {way: [] for way in ways}
    for r, way in balanced_order(ways, reps):
        t = time.perf_counter()
        with session_dit_threads(dit, cpu_threads, hw, cfg.frames_per_chunk):
            generate_chunk(dit, caches[way], noises[r], context, audio, sigmas, cache_from=way)
        times[way].append(time.perf_counter() - t)
    # past the first quarter (the ring filled, as in a stream), an even number of reps: the middle
    # two, whose mean is the median, ran in reverse orders
    kept = (reps - reps // 4) // 2 * 2 or reps
    filled = {way: t[reps - kept :] for way, t in times.items()}
    dit_ms = {way: _percentile(t, 50) * 1000 for way, t in filled.items()}
    return {
        "reencode_fps": round(fps["reencode"], 2),
        "last_step_fps": round(fps["last_step"], 2),
        "last_step_speedup": round(fps["last_step"] / fps["reencode"], 3),
        "last_step_speedup_rounds": ratio_rounds(runs["last_step"], runs["reencode"]),
        "reencode_dit_ms": round(dit_ms["reencode"], 2),
        "last_step_dit_ms": round(dit_ms["last_step"], 2),
        "last_step_dit_speedup": round(dit_ms["reencode"] / dit_ms["last_step"], 3),
        "last_step_dit_speedup_rounds": ratio_rounds(filled["reencode"], filled["last_step"]),
    }


def compile_speedup(
    model, height, width, steps, chunks, rounds=4, decode_dtype="auto", cpu_threads="auto"
) -> dict:
    """StreamSession with its DiT's blocks compiled as `serve --compile` runs them
    (streamgen/model/compile.py) vs eager.

    The two run in alternating rounds in this process (the machine's load hits
    both alike; an even number, whose middle two run in reverse orders), on the DiT the sessions run (`session_dit`); `graphs` counts
    what the warm-up compiled, and `graphs_after_warmup` what the timed rounds
    did (0: no stream meets a shape first).
    """
    from torch._dynamo.utils import counters

    from streamgen.model.compile import compile_blocks, compiled_backend

    dit = session_dit(model, model.vae.latent_hw(height, width))
    was = compiled_backend(dit)
    runs = {"eager": [], "compiled": []}
    kwargs = {"decode_dtype": decode_dtype, "cpu_threads": cpu_threads}
    try:
        compile_blocks(dit)
        graphs = counters["stats"]["unique_graphs"]
        t = time.perf_counter()
        session_speed(model, height, width, steps, 2, **kwargs)  # a stream's every shape
        compile_seconds = time.perf_counter() - t
        warmed = counters["stats"]["unique_graphs"]
        for _, name in balanced_order(runs, rounds):
            compile_blocks(dit, "inductor" if name == "compiled" else None)
            runs[name].append(session_speed(model, height, width, steps, chunks, **kwargs))
        after_warmup = counters["stats"]["unique_graphs"] - warmed
    except Exception as e:  # (no C++ compiler for inductor, say): said, and the eager figures measured stand
        return {"error": f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"[:400]}
    finally:
        compile_blocks(dit, was)

    def median(name, key):
        return float(np.median([r[key] for r in runs[name]]))

    return {
        "compile_seconds": round(compile_seconds, 1),
        "graphs": warmed - graphs,
        "graphs_after_warmup": after_warmup,
        "rounds": rounds,
        "eager_fps": round(median("eager", "fps"), 2),
        "compiled_fps": round(median("compiled", "fps"), 2),
        "speedup": round(median("compiled", "fps") / median("eager", "fps"), 3),
        "speedup_rounds": ratio_rounds(*([r["fps"] for r in runs[name]] for name in ("compiled", "eager"))),
        "eager_first_chunk_ms": round(median("eager", "first_chunk_ms"), 1),
        "compiled_first_chunk_ms": round(median("compiled", "first_chunk_ms"), 1),
    }


def run(
    flavor="tiny-avatar",
    height=128,
    width=128,
    steps=4,
    chunks=20,
    context=21,
    teacher_frames=21,
    sweep=(),
    threads=None,
    dtype="auto",
    compile=False,
    decode_dtype="auto",
    cpu_threads="auto",
    batch_sessions=3,
    ratio_chunks=None,
) -> dict:
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    # "auto": loaded in float32, each size's sessions in bfloat16 where that is faster (default_dit_dtype)
    from streamgen.cli import UserError

    try:
        model = load_model(flavor, dtype=dtype)
    except (FileNotFoundError, ValueError) as e:  # (more than the memory, an unreadable model: a traceback)
        raise UserError(str(e)) from None
    if model.meta.get("kind") == "teacher":  # (StreamSession's ValueError at the first session: a traceback)
        raise UserError(
            f"{flavor} is a bidirectional teacher, which cannot stream: bench engine times a student "
            "(its teacher_speedup runs the student's DiT as a teacher)"
        )
    result = {
        "flavor": flavor,
        "height": height,
        "width": width,
        "steps": steps,
        # "auto" unless asked for, by --dtype or $STREAMGEN_DTYPE (each size's dit_dtype: what ran)
        "dtype": _name(next(model.dit.parameters()).dtype) if model.dtype_asked else "auto",
        "trained": model.trained,
        "cpu_threads": cpu_threads,
        "cpu": cpu_description(),
        **model_settings(model),
    }
    resolved = autoencoder_dtype(decode_dtype, model.vae, "cpu")
    result["decode_dtype"] = _name(resolved or next(model.vae.parameters()).dtype)
    per_size = {"decode_dtype": decode_dtype, "cpu_threads": cpu_threads}
    few = ratio_chunks or max(5, chunks // 2)  # each --sweep size, --compile and each ratio's arm
    sizes = {**per_size, "ratio_chunks": ratio_chunks}
    main_size = measure_size(model, height, width, steps, chunks, context, teacher_frames, **sizes)
    result.update({k: v for k, v in main_size.items() if k not in ("height", "width")})
    result.update(batch_throughput(model, height, width, steps, batch_sessions, **per_size))
    result["threads"] = torch.get_num_threads()
    if compile:
        result["compile"] = compile_speedup(model, height, width, steps, few, **per_size)
    if sweep:
        result["resolution_sweep"] = [
            measure_size(model, s, s, steps, few, context, teacher_frames, **sizes) for s in sweep
        ]
        measured = [main_size, *result["resolution_sweep"]]
        realtime = [m for m in measured if m["fps"] >= REALTIME_FPS]
        result["largest_realtime"] = None  # (none in real time: the key was left out, unsaid)
        if realtime:
            best = max(realtime, key=lambda m: m["height"] * m["width"])
            result["largest_realtime"] = {
                k: best[k]
                for k in ("height", "width", "fps", "first_chunk_ms", "cache_speedup", "teacher_speedup")
            }
    return result


def plot_sizes(result: dict, path) -> None:
    """The size trade-off as a PNG: frames/s (with the real-time line) and the speedups."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted([result, *result.get("resolution_sweep", [])], key=lambda r: r["height"])
    sizes = [f"{r['height']}x{r['width']}" for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    left.plot(sizes, [r["fps"] for r in rows], "o-", label="StreamSession fps")
    left.axhline(REALTIME_FPS, color="grey", ls="--", label=f"{REALTIME_FPS:g} fps")
    left.set_ylabel("frames/s")
    left.set_title(f"{result['flavor']}, {result['steps']} steps, {result['threads']} threads")
    left.legend()
    for key, label in (
        ("teacher_speedup", "vs teacher, 4 steps"),
        ("teacher_speedup_2step", "vs teacher, 2 steps"),
        ("teacher_speedup_1step", "vs teacher, 1 step"),
        ("cache_speedup", "cache vs recompute"),
    ):
        right.plot(sizes, [r[key] for r in rows], "o-", label=label)
    right.axhline(20, color="grey", ls="--", lw=0.8)
    right.set_yscale("log")
    # plain numbers on the log axis, 1, 2, 3 and 5 of each decade (its default minor labels read
    # "2x10^0", "3x10^0", ...)
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}" if f"{v:e}"[0] in "1235" else "")
    right.yaxis.set_major_formatter(plain)
    right.yaxis.set_minor_formatter(plain)
    right.set_ylabel("speedup (wall time, same run)")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny-avatar", help="model name or directory (default: %(default)s)")
    p.add_argument("--height", type=frame_size, default=128, help="frame height (default: %(default)s)")
    p.add_argument("--width", type=frame_size, default=128, help="frame width (default: %(default)s)")
    p.add_argument("--steps", type=positive_int, default=4, help="denoising steps (default: %(default)s)")
    p.add_argument("--chunks", type=positive_int, default=20,
                   help="chunks the session times at --height x --width (default: %(default)s); each --sweep size, "
                   "--compile and each arm of a ratio (float32 or all threads against the default, the last "
                   "step's cache) time half as many, at least 5 (each size's timed_chunks, ratio_chunks), or "
                   "--ratio-chunks")  # fmt: skip
    p.add_argument("--ratio-chunks", type=positive_int, default=None,
                   help="chunks each --sweep size, --compile and each arm of a ratio time (default: half of "
                   "--chunks, at least 5)")  # fmt: skip
    p.add_argument(
        "--context",
        type=positive_int,
        default=21,
        help="latent frames of context, for cache_speedup (default 21)",
    )
    p.add_argument(
        "--teacher-frames",
        type=positive_int,
        default=21,
        help="latent frames of the clip (default: 21, as Wan's 81 frames)",
    )
    p.add_argument(
        "--sweep",
        type=frame_size,
        nargs="+",
        default=(),
        help="also measure everything at these square sizes",
    )
    p.add_argument(
        "--threads", type=thread_count, default=None, help="torch intra-op threads (default: torch's)"
    )
    p.add_argument(
        "--batch-sessions",
        type=positive_int,
        default=3,
        help="sessions of the batched-throughput measure (a server batches up to ~16 at 64x64; default: 3)",
    )
    add_dtype_option(
        p,
        "--dtype",
        "DiT weights and cache (auto: a session's default, bfloat16 where faster on CPUs with AMX, "
        "also timed against float32; on CPUs without, float32, also timed against bfloat16)",
    )
    add_dtype_option(
        p,
        "--decode-dtype",
        "the autoencoder's decoder (auto: bfloat16 on CPUs with AMX or AVX512-BF16); a bfloat16 decoder is also "
        "timed against float32",
    )
    p.add_argument(
        "--cpu-threads",
        choices=["auto", "all"],
        default="auto",
        help="threads per stage (auto: one unless the stage's work gains from all, also timed against all; "
        "all: every stage on all threads)",
    )
    p.add_argument("--plot", default=None, help="write the size trade-off (main size + sweep) to this PNG")
    p.add_argument(
        "--compile",
        action="store_true",
        help="also time the session with its DiT's blocks compiled as `serve --compile` runs them, against eager",
    )


def main(args) -> dict:
    from streamgen.cli import require_models

    require_models(args.model)  # a name or directory that is no model: one line, before measuring
    result = run(
        args.model,
        args.height,
        args.width,
        args.steps,
        args.chunks,
        args.context,
        args.teacher_frames,
        args.sweep,
        args.threads,
        args.dtype,
        args.compile,
        args.decode_dtype,
        args.cpu_threads,
        args.batch_sessions,
        args.ratio_chunks,
    )
    if args.plot:
        plot_sizes(result, args.plot)
    return result


if __name__ == "__main__":
    import json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    print(json.dumps(main(parser.parse_args())))
