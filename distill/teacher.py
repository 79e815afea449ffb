"""Stage `teacher`: bidirectional flow matching on the avatar world.

The teacher sees [reference | frames] with full attention, conditioned on the
audio windows of each frame, the reference latent and the caption, and learns
the velocity noise - x0 at shifted noise levels. Conditions drop out per
sample so that CFG works at sampling time (audio, reference, caption each
alone, and all together for the unconditional branch). With probability
`p_motion_prefix` the first 1..max_motion_frames frames stay clean at t = 0 and
are not scored: the teacher then also knows how to continue given motion
frames, which the chunk-distillation stage's real score needs.

`model.init: wan:DIR` starts from a Wan2.1 checkpoint (through the adapter).
"""

from __future__ import annotations

import torch

from distill.build import export_model, load_vae, new_dit
from distill.data import load_bank
from distill.distributed import broadcast_module
from distill.flow import Conditions, audio_windows, flow_loss, training_sigmas
from distill.rng import SampleRandom
from distill.updater import Updater


def kept_references(rnd: SampleRandom, opts) -> torch.Tensor:
    """Which of `rnd`'s samples keep the reference (bool [B]), as `dropout_conditions` draws it."""
    drop_all = rnd.rand("drop_all") < opts.p_drop_all
    return ~((rnd.rand("drop_ref") < opts.p_drop_reference) | drop_all)


def dropout_conditions(rnd: SampleRandom, opts, reference, audio, context) -> Conditions:
    drop_all = rnd.rand("drop_all") < opts.p_drop_all
    keep_ref = kept_references(rnd, opts)
    keep_audio = (~((rnd.rand("drop_audio") < opts.p_drop_audio) | drop_all)).float()
    keep_text = (~((rnd.rand("drop_text") < opts.p_drop_text) | drop_all)).float()
    dev = reference.device
    return Conditions(reference, audio, context, keep_ref.to(dev), keep_audio.to(dev), keep_text.to(dev))


class Stage:
    def __init__(self, cfg, world):
        self.cfg, self.world, self.opts = cfg, world, cfg.options
        self.model = new_dit(cfg.model, cfg.run.seed).to(world.device).train()
        broadcast_module(self.model, world)
        mcfg = self.model.cfg
        self.vae = load_vae(cfg.model, mcfg.in_channels, mcfg.temporal_compression, cfg.run.seed)
        self.latent_hw = self.vae.latent_hw(cfg.model.height, cfg.model.width)
        self.bank = load_bank(cfg, mcfg, self.latent_hw, self.vae)
        self.updaters = {"teacher": Updater("teacher", self.model, cfg.optim, world)}

    def model_configs(self) -> dict:
        return {"teacher": self.model.cfg.to_dict()}

    def train_step(self, step: int) -> dict:
        cfg, opts, dev = self.cfg, self.opts, self.world.device
        f = cfg.data.latent_frames
        batch = self.bank.batch(
            cfg.run.seed, step, cfg.data.batch_size, f, self.world.rank, self.world.size
        ).to(dev)
        rnd = SampleRandom(cfg.run.seed, step, batch.ids, dev)
        b = len(batch.ids)
        noise = rnd.randn("noise", *batch.x0.shape[1:])
        sigma = training_sigmas(rnd.rand("sigma"), opts.train_shift, opts.logit_normal)
        # motion prefix: the first p frames clean and unscored (p = 0 for most samples)
        use_prefix = rnd.rand("prefix") < opts.p_motion_prefix
        p_len = 1 + rnd.randint("prefix_len", max(1, min(opts.max_motion_frames, f - 1)))
        sig = sigma[:, None].expand(b, f).clone()
        scored = torch.ones(b, f, device=dev)
        for i in range(b):
            if use_prefix[i] and f > 1:
                sig[i, : int(p_len[i])] = 0.0
                scored[i, : int(p_len[i])] = 0.0
        audio = audio_windows(self.model, batch.audio, batch.latent_start, f)
        cond = dropout_conditions(rnd, opts, batch.reference, audio, batch.context)
        # sharded, every rank runs the forwards of the global batch's kinds of sample (each can
        # tell them: the draws are a function of the sample's index), whatever its own slice holds
        both = self.updaters["teacher"].sharded and self._global_batch_mixes_references(step)
        per_frame = _per_frame_flow_loss(self.model, batch.x0, noise, sig, cond, both)
        loss = ((per_frame * scored).sum(1) / scored.sum(1)).mean()
        return self.updaters["teacher"].update(loss)

    def _global_batch_mixes_references(self, step: int) -> bool:
        """Whether step `step`'s global batch holds samples that keep the reference and samples
        that drop it."""
        every = SampleRandom(self.cfg.run.seed, step, list(range(self.cfg.data.batch_size)))
        keep = kept_references(every, self.opts)
        return bool(keep.any()) and not bool(keep.all())

    def motion_prefix_frames(self) -> int:
        """The longest clean prefix the teacher trained with (0: none), which the chunk stage's real
        score gives it: the chunk before, whole (distill/chunk.py)."""
        f, o = self.cfg.data.latent_frames, self.opts
        return min(o.max_motion_frames, f - 1) if o.p_motion_prefix > 0 and f > 1 else 0

    def export(self, directory, name=None, compact=False):
        o = self.opts
        export_model(
            self.updaters["teacher"].averaged_module(), self.vae, directory, name,
            self.cfg.model.height, self.cfg.model.width, o.shift, o.sample_steps,
            {"kind": "teacher", "cfg_scale": o.cfg_scale, "stage": "teacher",
             "trained_steps": self.cfg.run.steps, "motion_prefix_frames": self.motion_prefix_frames()},
            compact,
        )  # fmt: skip


def _per_frame_flow_loss(model, x0, noise, sigma, cond, both_kinds=False):
    """Flow loss per frame [B, F] (sigma per frame; clean frames act as context). both_kinds:
    `sequence_velocity`'s."""
    from streamgen.conditioning import sequence_velocity

    s = sigma[:, None, :, None, None]
    xt = (1 - s) * x0 + s * noise
    v = sequence_velocity(model, xt, sigma * 1000, cond, both_kinds=both_kinds)
    return (v - (noise - x0)).square().mean(dim=(1, 3, 4))


__all__ = ["Stage", "dropout_conditions", "flow_loss"]
