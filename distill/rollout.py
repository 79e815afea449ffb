"""The student's autoregressive rollout with its KV cache, exactly as at inference.

Per chunk (compare `streamgen.sampling.generate_chunk`): few-step denoising
against the cache (predict x0, re-noise with fresh noise to the next level),
then one clean re-encode at t = 0 writes the chunk into the ring (or, with
cache_from "last_step", the keys/values of the last step's input). The
reference is written once into the sink first.

Stochastic gradient truncation (Self-Forcing): one denoising step index per
rollout, the exit step, is drawn; every chunk stops at that step and returns its
x0 prediction, and only that step runs with gradient. The earlier steps and
the clean re-encode run without gradient, so memory does not grow with the
number of steps, and the cache's buffers are never part of the graph (a
gradient-carrying step attends to a concatenation, see `StreamCache`).
"""

from __future__ import annotations

import torch

from distill.flow import Conditions
from distill.rng import SampleRandom
from streamgen.sampling import add_noise, check_cache_from, encode_sink


@torch.no_grad()
def start_stream(student, cond: Conditions, latent_hw):
    """A fresh cache with the reference written into its sink (and the caption's K/V cached)."""
    b = cond.reference.shape[0]
    p = next(student.parameters())
    cache = student.new_cache(b, latent_hw, p.dtype, p.device)
    encode_sink(student, cache, cond.reference.to(p.dtype), cond.context)
    return cache


def denoise_chunk(
    student,
    cache,
    noise,
    cond: Conditions,
    sigmas,
    rnd: SampleRandom,
    tag: str,
    exit_step=None,
    grad=False,
    with_input=False,
):
    """Few-step denoising of one chunk, stopping after `exit_step` (None: all steps, as at inference).

    grad: the exit step runs with gradient (all others never do). with_input: return
    (x0, the exit step's input) instead of x0.
    """
    b, f = noise.shape[0], noise.shape[2]
    last = len(sigmas) - 1 if exit_step is None else exit_step
    x = noise
    x0 = None
    for i in range(last + 1):
        sigma = sigmas[i].to(noise.device).expand(b)
        with torch.set_grad_enabled(grad and i == last):
            t = (sigma * 1000)[:, None].expand(b, f)
            v = student(x, t, cond.context, cond.audio, mode="cached", cache=cache)
            x0 = x - sigma.view(b, 1, 1, 1, 1) * v
        if i < last:
            fresh = rnd.randn(f"{tag}/renoise{i}", *noise.shape[1:])
            x = add_noise(x0.detach(), fresh, sigmas[i + 1])
    return (x0, x) if with_input else x0


@torch.no_grad()
def reencode(student, cache, x0, cond: Conditions, sigma=0.0) -> None:
    """The clean re-encode: run the finished chunk at t = 0 and write it into the ring (sigma:
    at another noise level, for the keys/values of a last step's input)."""
    t = torch.full((x0.shape[0], x0.shape[2]), float(sigma) * 1000, device=x0.device)
    student(x0.detach(), t, cond.context, cond.audio, mode="cached", cache=cache, cache_write="ring")
    cache.advance()


def rollout(
    student,
    cond: Conditions,
    latent_hw,
    num_chunks: int,
    sigmas,
    rnd: SampleRandom,
    tag: str,
    exit_step: int | None,
    grad: bool = False,
    first_free_chunk: int = 0,
    cache=None,
    start_chunk: int = 0,
    cache_from: str = "reencode",
):
    """Roll the student out for chunks [start_chunk, start_chunk + num_chunks) of `cond`'s frames.

    Chunks before `first_free_chunk` run all steps without gradient (plain
    inference, e.g. the self-correcting context); later chunks exit at
    `exit_step`, with gradient when `grad`. Returns (video [B, C, num_chunks * c, h, w], cache).

    cache_from "last_step": each chunk's keys/values are those of its last step's input, as
    `StreamSession` keeps them then: the input itself for a chunk that ran every step, else
    the chunk's x0 re-noised to the last level (as the chunk's x0 stands for its finished output).
    """
    last_step = check_cache_from(cache_from) == "last_step"
    c = student.cfg.frames_per_chunk
    if cache is None:
        cache = start_stream(student, cond, latent_hw)
    chunks = []
    for j in range(start_chunk, start_chunk + num_chunks):
        cond_j = cond.frames(j * c, (j + 1) * c)
        noise = rnd.randn(f"{tag}/noise{j}", student.cfg.in_channels, c, *latent_hw)
        free = j >= first_free_chunk
        exit_j = exit_step if free else None
        x0, x_in = denoise_chunk(
            student,
            cache,
            noise,
            cond_j,
            sigmas,
            rnd,
            f"{tag}/chunk{j}",
            exit_j,
            grad and free,
            with_input=True,
        )
        if not last_step:
            reencode(student, cache, x0, cond_j)
        else:
            if exit_j is not None and exit_j + 1 < len(sigmas):  # stopped early: x0 stands for the rest
                fresh = rnd.randn(f"{tag}/chunk{j}/last_input", *noise.shape[1:])
                x_in = add_noise(x0.detach(), fresh, sigmas[-1])
            reencode(student, cache, x_in, cond_j, sigma=sigmas[-1])
        chunks.append(x0)
    return torch.cat(chunks, dim=2), cache
