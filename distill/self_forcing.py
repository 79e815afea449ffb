"""Stage `self_forcing`: DMD on the student's own autoregressive rollouts.

Each step the student streams `data.latent_frames` frames chunk by chunk from
noise with its KV cache, exactly as `StreamSession` does at inference (sink,
ring, clean re-encode); the context every chunk sees is therefore the
student's own earlier output, not ground truth, which is what removes the
train/test gap behind drift. One denoising step index per rollout carries
gradient (stochastic truncation, see `rollout`). The critic takes
`critic_updates` flow-matching updates on fresh no-gradient rollouts, then the
generator one DMD update on a rollout with gradient.

Long streams (`rollout_frames`): the rollout may run further than the window
the score networks judge (`data.latent_frames`, the teacher's training
length); the chunks in front of that window run as plain inference, so the
scored chunks see a cache full of the student's own, possibly drifted,
output, as they will minutes into a stream.
"""

from __future__ import annotations

import torch

from distill.config import ConfigError
from distill.dmd import DmdStage, critic_loss, generator_loss
from distill.rng import generator
from distill.rollout import rollout
from streamgen.sampling import check_cache_from


class Stage(DmdStage):
    kind = "student"

    def __init__(self, cfg, world):
        super().__init__(cfg, world)
        c = self.student.cfg.frames_per_chunk
        f, longest = cfg.data.latent_frames, self.opts.rollout_frames or cfg.data.latent_frames
        if f % c or longest % c:
            raise ConfigError(
                f"data.latent_frames and self_forcing.rollout_frames must be multiples of frames_per_chunk ({c})"
            )
        if longest < f:
            raise ConfigError("self_forcing.rollout_frames must be 0 or at least data.latent_frames")
        # (the length is drawn per step: a rollout longer than the clips stopped the run at the
        # first step that drew it, any number of steps in)
        if longest > self.bank.frames:
            key = "self_forcing.rollout_frames" if self.opts.rollout_frames else "data.latent_frames"
            raise ConfigError(
                f"{key} {longest}: rollouts that long do not fit the clips, of {self.bank.frames} "
                f"latent frames: set it to at most {self.bank.frames - self.bank.frames % c}"
            )
        self.window_chunks, self.max_chunks = f // c, longest // c
        check_cache_from(self.opts.cache_from)

    def export_meta(self) -> dict:
        # a student trained to keep its last step's keys/values streams that way by default
        return {**super().export_meta(), "cache_from": self.opts.cache_from}

    def train_step(self, step: int) -> dict:
        c = self.student.cfg.frames_per_chunk
        # drawn before the batch (whose crop length it sets), the same on every rank
        g = generator(self.cfg.run.seed, step, "shared", "rollout_chunks")
        chunks = self.window_chunks + int(
            torch.randint(self.max_chunks - self.window_chunks + 1, (), generator=g)
        )
        frames = chunks * c
        batch, rnd = self.batch(step, frames)
        lead = chunks - self.window_chunks  # chunks in front of the scored window, plain inference
        scored = slice(lead * c, frames)
        cond_student = self.conditions(self.student, batch, frames)
        cond_teacher = self.conditions(self.teacher, batch, frames).frames(scored.start, scored.stop)
        out = {}
        for k in range(self.opts.critic_updates):
            exit_k = rnd.shared_randint(f"critic{k}/exit", len(self.sigmas))
            with torch.no_grad():
                video, _ = rollout(
                    self.student, cond_student, self.latent_hw, chunks, self.sigmas,
                    rnd, f"critic{k}", exit_step=exit_k, first_free_chunk=lead,
                    cache_from=self.opts.cache_from,
                )  # fmt: skip
            cond_critic = self.conditions(self.critic, batch, frames).frames(scored.start, scored.stop)
            loss = critic_loss(
                self.critic, video[:, :, scored], cond_critic, rnd, f"critic{k}/score", self.opts
            )
            out.update(self.updaters["critic"].update(loss))
        exit_step = rnd.shared_randint("generator/exit", len(self.sigmas))
        video, _ = rollout(
            self.student, cond_student, self.latent_hw, chunks, self.sigmas,
            rnd, "generator", exit_step=exit_step, grad=True, first_free_chunk=lead,
            cache_from=self.opts.cache_from,
        )  # fmt: skip
        with torch.no_grad():
            cond_critic = self.conditions(self.critic, batch, frames).frames(scored.start, scored.stop)
        loss, extra = generator_loss(
            self.teacher, self.critic, video[:, :, scored], cond_teacher, cond_critic, rnd, "dmd", self.opts,
            world=self.world,
        )  # fmt: skip
        out.update(self.updaters["generator"].update(loss))
        out.update(extra, exit_step=exit_step, rollout_frames=frames)
        return out
