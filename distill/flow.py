"""Flow matching with the avatar's conditions, as the score networks see them.

The conditioning itself (Conditions, sequence_velocity, guided_velocity) lives
in `streamgen.conditioning`, since the teacher samples with it at inference
too; this adds the training side: audio windows of a batch, noise levels, the
flow-matching loss.
"""

from __future__ import annotations

import torch

from streamgen.conditioning import Conditions, sequence_velocity
from streamgen.model.audio import frame_windows
from streamgen.sampling import shift_sigma


def audio_windows(model, pcm: torch.Tensor, latent_starts: list[int], num: int) -> torch.Tensor | None:
    """Windows of the audio tokens for latent frames [start, start + num) of each sample's clip."""
    if model.audio_encoder is None:
        return None
    tokens = model.audio_encoder(pcm)  # [B, T, Da], one token per video frame of the whole clip
    return torch.cat(
        [frame_windows(tokens[i : i + 1], 0, s, num, model.cfg) for i, s in enumerate(latent_starts)]
    )


def training_sigmas(u: torch.Tensor, shift: float, logit_normal: bool) -> torch.Tensor:
    """Map uniform draws u in (0, 1) to training noise levels."""
    if logit_normal:
        u = torch.sigmoid(torch.special.ndtri(u.clamp(1e-5, 1 - 1e-5)))
    return shift_sigma(u, shift)


def flow_loss(model, x0, noise, sigma, cond: Conditions, prefix: torch.Tensor | None = None):
    """Per-sample flow-matching loss [B]: predict v = noise - x0 at x_sigma.

    prefix: clean leading frames [B, C, P, h, w] (motion frames) seen at t = 0, not scored.
    sigma: [B] or per-frame [B, F].
    """
    b, f = x0.shape[0], x0.shape[2]
    s = sigma if sigma.ndim == 2 else sigma[:, None].expand(b, f)
    xt = (1 - s)[:, None, :, None, None] * x0 + s[:, None, :, None, None] * noise
    t = s * 1000
    if prefix is not None:
        p = prefix.shape[2]
        xt = torch.cat([prefix, xt], dim=2)
        t = torch.cat([torch.zeros(b, p, device=t.device), t], dim=1)
    v = sequence_velocity(model, xt, t, cond)
    if prefix is not None:
        v = v[:, :, prefix.shape[2] :]
    return (v - (noise - x0)).square().flatten(1).mean(1)
