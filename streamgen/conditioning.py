"""How the DiT is conditioned outside the cached streaming path: whole sequences.

A sequence is [reference latent at t = 0 | frames]. Conditions drop per sample
(classifier-free guidance): the reference by leaving its frame out of the
sequence (the frames keep their rotary positions), audio by `audio_mask` = 0,
the caption by a zero context. The unconditional branch of CFG drops all three.
The teacher samples this way (`streamgen.teacher`), and the distillation
stages score and train with it (`distill.flow`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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


def sequence_velocity(
    model, x, t, cond: Conditions, mode: str = "bidirectional", both_kinds: bool = False
) -> torch.Tensor:
    """Velocity for frames x [B, C, F, h, w] at timesteps t [B, F] (0..1000), per-sample dropout.

    Samples keeping the reference and samples dropping it run as two forwards
    (their sequences differ in length); the outputs are put back in order.
    both_kinds: run both forwards where the batch holds one kind only too, the missing kind's on
    the first sample, weighted by zero (the same values and gradients): FSDP's ranks must run the
    same forwards, and a rank whose samples all kept the reference, beside one whose samples
    mixed, ran one forward to its two (a collective mismatch).
    """
    keep = cond.keep_reference
    if not both_kinds and (bool(keep.all()) or not bool(keep.any())):
        return _velocity(model, x, t, cond, with_reference=bool(keep.all()), mode=mode)
    out = x.new_empty(x.shape[0], model.cfg.out_channels, *x.shape[2:])  # (channels: the model's)
    idle = None
    for flag in (True, False):
        idx = (keep == flag).nonzero().squeeze(1)
        if len(idx):
            out[idx] = _velocity(model, x[idx], t[idx], cond.select(idx), with_reference=flag, mode=mode)
        else:
            first = torch.zeros(1, dtype=torch.long, device=keep.device)
            idle = _velocity(model, x[first], t[first], cond.select(first), with_reference=flag, mode=mode)
    # (in the graph, so that its backward runs as the other ranks' does)
    return out if idle is None else out + 0 * idle.sum()


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
    """Classifier-free guidance over all conditions: v_u + scale * (v_c - v_u). Scales 1 and 0
    run one branch only."""
    if scale == 0.0:
        return sequence_velocity(model, x, t, cond.unconditional())
    vc = sequence_velocity(model, x, t, cond)
    if scale == 1.0:
        return vc
    vu = sequence_velocity(model, x, t, cond.unconditional())
    return vu + scale * (vc - vu)
