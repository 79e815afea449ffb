"""Flow matching with the avatar's conditions, as the score networks see them.

A sequence is [reference latent at t = 0 | frames]. Conditions drop per sample
(classifier-free guidance): the reference by leaving its frame out of the
sequence (the frames keep their rotary positions), audio by `audio_mask` = 0,
the caption by a zero context. The unconditional branch of CFG drops all three.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from streamgen.model.audio import frame_windows
from streamgen.sampling import shift_sigma


@dataclass
class Conditions:
    reference: torch.Tensor  # [B, C, 1, h, w]
    audio: torch.Tensor | None  # windows for the frames [B, F, W, Da] (None: no audio branch)
    context: torch.Tensor  # [B, Lt, Dt]
    keep_reference: torch.Tensor  # bool [B]
    keep_audio: torch.Tensor  # float [B]
    keep_text: torch.Tensor  # float [B]

    @classmethod
    def full(cls, reference, audio, context) -> Conditions:
        b = reference.shape[0]
        ones = torch.ones(b, device=reference.device)
        return cls(reference, audio, context, ones.bool(), ones, ones)

    def unconditional(self) -> Conditions:
        zeros = torch.zeros_like(self.keep_audio)
        return Conditions(self.reference, self.audio, self.context, zeros.bool(), zeros, zeros)

    def frames(self, start: int, end: int) -> Conditions:
        """The same conditions for frames [start, end) of the sequence."""
        audio = None if self.audio is None else self.audio[:, start:end]
        return Conditions(
            self.reference, audio, self.context, self.keep_reference, self.keep_audio, self.keep_text
        )

    def select(self, idx: torch.Tensor) -> Conditions:
        audio = None if self.audio is None else self.audio[idx]
        return Conditions(
            self.reference[idx], audio, self.context[idx], self.keep_reference[idx],
            self.keep_audio[idx], self.keep_text[idx],
        )  # fmt: skip


def audio_windows(model, pcm: torch.Tensor, latent_starts: list[int], num: int) -> torch.Tensor | None:
    """Windows of the audio tokens for latent frames [start, start + num) of each sample's clip."""
    if model.audio_encoder is None:
        return None
    tokens = model.audio_encoder(pcm)  # [B, T, Da], one token per video frame of the whole clip
    return torch.cat(
        [frame_windows(tokens[i : i + 1], 0, s, num, model.cfg) for i, s in enumerate(latent_starts)]
    )


def sequence_velocity(model, x, t, cond: Conditions, mode: str = "bidirectional") -> torch.Tensor:
    """Velocity for frames x [B, C, F, h, w] at timesteps t [B, F] (0..1000), per-sample dropout.

    Samples keeping the reference and samples dropping it run as two forwards
    (their sequences differ in length); the outputs are put back in order.
    """
    keep = cond.keep_reference
    if bool(keep.all()) or not bool(keep.any()):
        return _velocity(model, x, t, cond, with_reference=bool(keep.all()), mode=mode)
    out = torch.empty_like(x)
    for flag in (True, False):
        idx = (keep == flag).nonzero().squeeze(1)
        out[idx] = _velocity(model, x[idx], t[idx], cond.select(idx), with_reference=flag, mode=mode)
    return out


def _velocity(model, x, t, cond: Conditions, with_reference: bool, mode: str):
    cfg = model.cfg
    b, _, f = x.shape[:3]
    sink = cfg.sink_frames
    context = cond.context * cond.keep_text.view(b, 1, 1).to(cond.context.dtype)
    audio, mask = cond.audio, None
    if audio is not None:
        mask = cond.keep_audio.view(b, 1).expand(b, f).to(x.dtype)
    if not with_reference:
        pos = torch.arange(sink, sink + f, device=x.device)
        return model(x, t, context, audio, mask, mode=mode, frame_pos=pos)
    ref = cond.reference.expand(-1, -1, sink, -1, -1) if cond.reference.shape[2] != sink else cond.reference
    seq = torch.cat([ref.to(x.dtype), x], dim=2)
    ts = torch.cat([torch.zeros(b, sink, device=x.device, dtype=t.dtype), t], dim=1)
    if audio is not None:
        # the reference frame has no audio (as when it is written into the cache's sink)
        audio = torch.cat([audio.new_zeros(b, sink, *audio.shape[2:]), audio], dim=1)
        mask = torch.cat([mask.new_zeros(b, sink), mask], dim=1)
    v = model(seq, ts, context, audio, mask, mode=mode)
    return v[:, :, sink:]


def guided_velocity(model, x, t, cond: Conditions, scale: float) -> torch.Tensor:
    """Classifier-free guidance over all conditions: v_u + scale * (v_c - v_u)."""
    vc = sequence_velocity(model, x, t, cond)
    if scale == 1.0:
        return vc
    vu = sequence_velocity(model, x, t, cond.unconditional())
    return vu + scale * (vc - vu)


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
