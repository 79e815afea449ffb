"""Rectified-flow sampling: schedules, the teacher's Euler loop with CFG, the
student's few-step loop, and one streaming chunk against the KV cache.

Conventions: sigma in [0, 1] (the model sees t = 1000 * sigma);
x_sigma = (1 - sigma) * x0 + sigma * noise; the model predicts the velocity
v = noise - x0, so x0 = x_sigma - sigma * v.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_sigma, sigma [B]) -> v


def shift_sigma(sigma, shift: float):
    """Timestep shift: sigma' = s*sigma / (1 + (s - 1)*sigma); pushes steps towards high noise.
    Any finite s > 0 keeps 0 at 0, 1 at 1 and the order of the levels (s = 1: the identity)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def _check_schedule(num_steps, shift) -> int:
    """num_steps a whole number >= 1 and shift a finite number > 0, or a ValueError: 0 steps
    returned the noise itself as a sample, 2.5 steps a list of 3 levels, shift 0 a first level of
    NaN and a negative shift levels outside [0, 1]."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int | np.integer) or num_steps < 1:
        raise ValueError(f"num_steps must be a whole number >= 1, got {num_steps!r}")
    if isinstance(shift, bool) or not isinstance(shift, int | float | np.number) or not 0 < shift < math.inf:
        raise ValueError(f"shift must be a finite number > 0, got {shift!r}")
    return int(num_steps)


def euler_sigmas(num_steps: int, shift: float = 5.0) -> torch.Tensor:
    """num_steps + 1 shifted sigmas from 1 down to 0 (teacher schedule)."""
    num_steps = _check_schedule(num_steps, shift)
    return shift_sigma(torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64), shift).float()


def student_sigmas(num_steps: int, shift: float = 5.0) -> torch.Tensor:
    """The student's few-step list: [1000, 750, 500, 250] / 1000 for 4 steps, warped by shift.

    1, 2 and 4 steps give [1.0], [1.0, 0.833], [1.0, 0.938, 0.833, 0.625] at shift 5.
    """
    num_steps = _check_schedule(num_steps, shift)
    base = torch.arange(num_steps, 0, -1, dtype=torch.float64) / num_steps
    return shift_sigma(base, shift).float()


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma) -> torch.Tensor:
    """x_sigma in x0's dtype, mixed in float32 at least (`_bcast`)."""
    sigma = _bcast(sigma, x0)
    return ((1 - sigma) * x0.to(sigma.dtype) + sigma * noise.to(sigma.dtype)).to(x0.dtype)


def x0_from_velocity(x: torch.Tensor, v: torch.Tensor, sigma) -> torch.Tensor:
    """x0 in x's dtype, computed in float32 at least (`_bcast`)."""
    sigma = _bcast(sigma, x)
    return (x.to(sigma.dtype) - sigma * v.to(sigma.dtype)).to(x.dtype)


def _bcast(sigma, like: torch.Tensor) -> torch.Tensor:
    """sigma shaped to broadcast over `like`, in float32 or `like`'s wider dtype: a bf16 DiT's
    latents were mixed at their dtype's rounding of the level (0.8333 of 4 steps at shift 5 as
    0.8320), the schedule's levels moved by up to 0.2% (the network sees its own dtype)."""
    dtype = torch.promote_types(like.dtype, torch.float32)
    sigma = torch.as_tensor(sigma, dtype=dtype, device=like.device)
    if sigma.ndim == 0:
        return sigma
    return sigma.reshape(sigma.shape + (1,) * (like.ndim - sigma.ndim))


def guided(cond: Velocity, uncond: Velocity, scale: float) -> Velocity:
    """Classifier-free guidance: v_u + scale * (v_c - v_u). Scales 1 and 0 run one branch only."""
    if scale == 1.0:
        return cond
    if scale == 0.0:
        return uncond

    def velocity(x, sigma):
        vu = uncond(x, sigma)
        return vu + scale * (cond(x, sigma) - vu)

    return velocity


@torch.no_grad()
def sample_euler(
    velocity: Velocity, noise: torch.Tensor, sigmas: torch.Tensor, progress=None
) -> torch.Tensor:
    """Teacher sampling: Euler steps of dx/dsigma = v along the schedule, each step computed in
    float32 at least and rounded to the latents' dtype once (`_bcast`: a bf16 teacher's step size
    was rounded to bf16, ~2^-9 off the schedule's, and its product and sum rounded again)."""
    x = noise
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        v = velocity(x, s.expand(x.shape[0]).to(x.device))
        step = _bcast(s_next - s, x)
        x = (x.to(step.dtype) + step * v.to(step.dtype)).to(x.dtype)
        if progress is not None:
            progress(i + 1, len(sigmas) - 1)
    return x


def fresh_noise(like: torch.Tensor, generator=None) -> torch.Tensor:
    """Noise shaped like `like`, drawn on the CPU so a seed gives the same stream on any device.

    generator may be a list with one generator per batch row: streams batched
    together then draw exactly the noise they would have drawn alone.
    """
    if isinstance(generator, list | tuple):
        rows = [
            torch.randn((1, *like.shape[1:]), generator=g, dtype=like.dtype, device="cpu") for g in generator
        ]
        return torch.cat(rows).to(like.device)
    return torch.randn(like.shape, generator=generator, dtype=like.dtype, device="cpu").to(like.device)


def sample_few_step(
    velocity: Velocity,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    generator=None,
    last_velocity: Velocity | None = None,
) -> torch.Tensor:
    """Student sampling: predict x0 at each level, re-noise with fresh noise to the next level.
    last_velocity, if given, runs the last step instead of `velocity`."""
    x = noise
    x0 = noise
    for i, s in enumerate(sigmas):
        sigma = s.expand(x.shape[0]).to(x.device)
        step = last_velocity if last_velocity is not None and i + 1 == len(sigmas) else velocity
        x0 = x0_from_velocity(x, step(x, sigma), sigma)
        if i + 1 < len(sigmas):
            x = add_noise(x0, fresh_noise(x, generator), sigmas[i + 1])
    return x0


# --- streaming ---------------------------------------------------------------


@torch.no_grad()
def encode_sink(model, cache, reference_latent: torch.Tensor, context: torch.Tensor) -> None:
    """Write the reference latent frame(s) into the cache's permanent sink at t = 0 (one
    reference frame fills every sink frame, as the block-causal and bidirectional paths see it)."""
    if reference_latent.shape[2] == 1 and cache.sink_frames > 1:
        reference_latent = reference_latent.expand(-1, -1, cache.sink_frames, -1, -1)
    b, f = reference_latent.shape[0], reference_latent.shape[2]
    t = torch.zeros(b, f, device=reference_latent.device)
    model(reference_latent, t, context, mode="cached", cache=cache, cache_write="sink")
    cache.sink_ready = True


@torch.no_grad()
def reencode_chunk(
    model, cache, x0: torch.Tensor, context: torch.Tensor, audio: torch.Tensor | None, advance: bool = True
) -> None:
    """The clean re-encode: run the finished chunk at t = 0 and keep its keys/values in the ring.
    advance=False leaves the ring where it was (a stacked batch's copy, whose rows each stream
    takes into its own ring: `StreamCache.take_chunk_from`)."""
    t0 = torch.zeros(x0.shape[0], x0.shape[2], device=x0.device)
    model(x0, t0, context, audio, mode="cached", cache=cache, cache_write="ring")
    if advance:
        cache.advance()


# where a chunk's keys/values in the ring come from: its clean re-encode at t = 0 (Self-Forcing's
# way, one more forward per chunk), or the forward of its last denoising step (at that step's
# noise level; no re-encode). Measured on the shipped student in docs/results.md.
CACHE_FROM = ("reencode", "last_step")


def check_cache_from(cache_from: str) -> str:
    if cache_from not in CACHE_FROM:
        raise ValueError(f"cache_from must be one of {CACHE_FROM}, got {cache_from!r}")
    return cache_from


def cached_velocity(model, cache, context, audio, write: bool = False) -> Velocity:
    """The velocity of a chunk against the cache; write: the step also writes the chunk's K/V
    into the ring, as the last step does under cache_from="last_step" (the caller then moves the
    ring on: `cache.advance()`)."""

    def velocity(x, sigma):
        t = (sigma * 1000)[:, None].expand(x.shape[0], x.shape[2])
        return model(
            x, t, context, audio, mode="cached", cache=cache,
            cache_write="ring" if write else None, with_velocity=write,
        )  # fmt: skip

    return velocity


@torch.no_grad()
def generate_chunk(
    model,
    cache,
    noise: torch.Tensor,
    context: torch.Tensor,
    audio: torch.Tensor | None,
    sigmas: torch.Tensor,
    generator=None,
    reencode: bool = True,
    cache_from: str = "reencode",
) -> torch.Tensor:
    """One chunk of the stream: few-step denoise against the cache, then the clean re-encode at
    t = 0 writes the chunk into the ring (reencode=False: the caller runs it later). With
    cache_from="last_step" the last step's forward writes the chunk instead and nothing is left
    to re-encode.

    noise: [B, C, frames_per_chunk, h, w]; audio: windows [B, F, W, Da] or None.
    Returns the clean latents of the chunk.
    """
    if not cache.sink_ready:
        raise RuntimeError("encode the reference into the cache first (encode_sink)")
    last_step = check_cache_from(cache_from) == "last_step"
    velocity = cached_velocity(model, cache, context, audio)
    last = cached_velocity(model, cache, context, audio, write=True) if last_step else None
    x0 = sample_few_step(velocity, noise, sigmas, generator, last)
    if last_step:
        cache.advance()  # the last step wrote the chunk
    elif reencode:
        reencode_chunk(model, cache, x0, context, audio)
    return x0
