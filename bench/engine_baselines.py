"""The student against its baselines, for `streamgen bench engine` (bench/engine.py).

- `cache_speedup`: cached streaming against recomputing the whole context at every
  denoising step (the two give the same latents: reported);
- `teacher_speedup`: the same network run bidirectionally over the clip with Euler
  steps and CFG against the cached student generating the same frames.

Each DiT forward runs on the threads a session would give it (streamgen/cpu_threads.py),
by the size of its own forward, unless `cpu_threads` is "all".
"""

from __future__ import annotations

import contextlib
import time

import torch

from bench.rounds import balanced_order, ratio_rounds
from streamgen.cpu_threads import dit_threads
from streamgen.sampling import (
    encode_sink,
    euler_sigmas,
    generate_chunk,
    guided,
    sample_euler,
    sample_few_step,
    student_sigmas,
)


def session_dit_threads(dit, cpu_threads: str, latent_hw, frames: int, key_frames: int | None = None):
    """The threads a DiT forward over `frames` latent frames runs on, as a session would run it;
    key_frames: the latent frames it attends to (default: a chunk's in a stream, the sink, the
    full ring and itself)."""
    if cpu_threads == "all":
        return contextlib.nullcontext()
    return dit_threads(dit, latent_hw, frames, key_frames)


@torch.no_grad()
def cache_speedup(model, latent_hw, steps, chunks, context, cpu_threads="auto", dit=None) -> dict:
    """Cached streaming vs recomputing the whole context at every denoising step.

    The timed chunks (an even number, at least `chunks`) see at least `context` clean frames. The ring is sized so
    nothing is evicted while timing: then the two paths must agree exactly
    (after eviction a rolling cache keeps keys computed against frames that
    have left the window, which no recomputation can reproduce). dit: the DiT both sides run
    (default: the model's, as loaded).
    """
    import dataclasses

    dit = dit or model.dit
    c = dit.cfg.frames_per_chunk
    context = -(-context // c) * c  # whole chunks
    chunks += chunks % 2  # an even number: the two ways' sums, each first in half the chunks, balanced
    cfg = dataclasses.replace(dit.cfg, window_frames=context + c * chunks)
    saved_cfg, dit.cfg = dit.cfg, cfg
    try:
        sink = cfg.sink_frames
        gen = torch.Generator().manual_seed(0)
        dt = next(dit.parameters()).dtype
        ctx = torch.zeros(1, 1, cfg.text_dim, dtype=dt)
        ref = torch.randn(1, cfg.in_channels, sink, *latent_hw, generator=gen).to(dt)
        sigmas = student_sigmas(steps, model.shift)
        cache = dit.new_cache(1, latent_hw)
        encode_sink(dit, cache, ref, ctx)
        noises = [
            torch.randn(1, cfg.in_channels, c, *latent_hw, generator=gen).to(dt)
            for _ in range(context // c + chunks)
        ]
        history = []
        for k in range(context // c):  # build the context (not timed)
            history.append(
                generate_chunk(dit, cache, noises[k], ctx, None, sigmas, torch.Generator().manual_seed(k))
            )

        times, max_diff = {"cached": [], "full": []}, 0.0
        first = context // c
        for r, way in balanced_order(times, chunks):  # each chunk both ways, which first alternating
            k = first + r
            prefix = torch.cat([ref, *history], dim=2)
            n_prefix = prefix.shape[2]

            def velocity(x, sigma, prefix=prefix, n_prefix=n_prefix):
                seq = torch.cat([prefix, x], dim=2)
                tt = torch.cat([torch.zeros(1, n_prefix), (sigma * 1000)[:, None].expand(1, c)], dim=1)
                return dit(seq, tt, ctx, mode="block_causal")[:, :, n_prefix:]

            t = time.perf_counter()
            if way == "cached":
                with session_dit_threads(dit, cpu_threads, latent_hw, c, n_prefix + c):
                    x_cached = generate_chunk(
                        dit, cache, noises[k], ctx, None, sigmas, torch.Generator().manual_seed(k)
                    )
            else:  # (the whole context again: the cache is neither read nor written)
                with session_dit_threads(dit, cpu_threads, latent_hw, n_prefix + c, n_prefix + c):
                    x_full = sample_few_step(velocity, noises[k], sigmas, torch.Generator().manual_seed(k))
            times[way].append(time.perf_counter() - t)
            if len(times["cached"]) == len(times["full"]) == r + 1:  # the chunk's second way
                max_diff = max(max_diff, (x_full - x_cached).abs().max().item())
                history.append(x_cached)
    finally:
        dit.cfg = saved_cfg
    return {
        "cache_speedup": round(sum(times["full"]) / sum(times["cached"]), 2),
        "cache_speedup_rounds": ratio_rounds(times["full"], times["cached"]),
        "cache_context_frames": context,
        "cache_max_abs_diff": max_diff,
    }


@torch.no_grad()
def teacher_speedup(
    model, latent_hw, latent_frames, steps_list, teacher_steps=50, cfg_scale=5.0, cpu_threads="auto", dit=None
) -> dict:
    """Teacher: bidirectional over the clip, Euler + CFG. Student: cached chunks, few steps.
    dit: the DiT both sides run (default: the model's, as loaded)."""
    dit = dit or model.dit
    cfg = dit.cfg
    c = cfg.frames_per_chunk
    latent_frames = -(-latent_frames // c) * c
    gen = torch.Generator().manual_seed(0)
    dt = next(dit.parameters()).dtype
    ref = torch.randn(1, cfg.in_channels, cfg.sink_frames, *latent_hw, generator=gen).to(dt)
    ctx = torch.zeros(1, 1, cfg.text_dim, dtype=dt)
    audio = torch.randn(
        1, cfg.sink_frames + latent_frames, cfg.audio_window, cfg.audio_dim, generator=gen
    ).to(dt)
    noise = torch.randn(1, cfg.in_channels, latent_frames, *latent_hw, generator=gen).to(dt)
    sink = cfg.sink_frames

    def make_velocity(with_conditions):
        def velocity(x, sigma):
            seq = torch.cat([ref, x], dim=2) if with_conditions else x
            n_ref = sink if with_conditions else 0
            tt = torch.cat([torch.zeros(1, n_ref), (sigma * 1000)[:, None].expand(1, latent_frames)], dim=1)
            a = audio if with_conditions else None
            mask = torch.ones(1, seq.shape[2])
            mask[:, :n_ref] = 0
            return dit(seq, tt, ctx, a if a is None else a[:, -seq.shape[2] :], mask, mode="bidirectional")[
                :, :, n_ref:
            ]

        return velocity

    teacher = guided(make_velocity(True), make_velocity(False), cfg_scale)

    def student_seconds(steps):
        cache = dit.new_cache(1, latent_hw)
        t = time.perf_counter()
        with session_dit_threads(dit, cpu_threads, latent_hw, sink, sink):
            encode_sink(dit, cache, ref, ctx)
        with session_dit_threads(dit, cpu_threads, latent_hw, c):
            for k in range(latent_frames // c):
                a = audio[:, sink + k * c : sink + (k + 1) * c]
                chunk_noise = noise[:, :, k * c : (k + 1) * c]
                generate_chunk(dit, cache, chunk_noise, ctx, a, student_sigmas(steps, model.shift))
        return time.perf_counter() - t

    # the student is timed before and after the (long) teacher run and averaged, the step counts
    # after it in the reverse order, so a steady change in the machine's load during the run
    # biases neither side nor any step count (each one's two runs as far from the teacher's)
    student_seconds(steps_list[0])  # warm-up: first-use allocations for every cache fill level
    teacher(noise, torch.ones(1))  # and one teacher evaluation (first use of its shapes)
    before = {steps: student_seconds(steps) for steps in steps_list}
    t = time.perf_counter()
    with session_dit_threads(dit, cpu_threads, latent_hw, sink + latent_frames, sink + latent_frames):
        sample_euler(teacher, noise, euler_sigmas(teacher_steps, model.shift))
    t_teacher = time.perf_counter() - t
    out = {
        "teacher_evals": 2 * teacher_steps,
        "teacher_seconds": round(t_teacher, 3),
        "teacher_frames": latent_frames,
    }
    after = {steps: student_seconds(steps) for steps in reversed(steps_list)}
    for steps in steps_list:
        key = "teacher_speedup" if steps == 4 else f"teacher_speedup_{steps}step"
        out[key] = round(t_teacher / ((before[steps] + after[steps]) / 2), 2)
        # against the student's run before the teacher's and after it
        out[f"{key}_rounds"] = ratio_rounds([t_teacher] * 2, [before[steps], after[steps]])
        out[f"student_evals_per_chunk_{steps}step"] = steps + 1  # + the clean re-encode
    return out
