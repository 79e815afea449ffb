"""Stage `self_forcing`: DMD on the student's own autoregressive rollouts.

Each step the student streams `data.latent_frames` frames chunk by chunk from
noise with its KV cache, exactly as `StreamSession` does at inference (sink,
ring, clean re-encode); the context every chunk sees is therefore the
student's own earlier output, not ground truth, which is what removes the
train/test gap behind drift. One denoising step index per rollout carries
gradient (stochastic truncation, see `rollout`). The critic takes
`critic_updates` flow-matching updates on fresh no-gradient rollouts, then the
generator one DMD update on a rollout with gradient.
"""

from __future__ import annotations

import torch

from distill.dmd import DmdStage, critic_loss, generator_loss
from distill.rollout import rollout


class Stage(DmdStage):
    kind = "student"

    def __init__(self, cfg, world):
        super().__init__(cfg, world)
        c = self.student.cfg.frames_per_chunk
        if cfg.data.latent_frames % c:
            raise ValueError(f"data.latent_frames must be a multiple of frames_per_chunk ({c})")
        self.num_chunks = cfg.data.latent_frames // c

    def train_step(self, step: int) -> dict:
        f = self.cfg.data.latent_frames
        batch, rnd = self.batch(step, f)
        cond_student = self.conditions(self.student, batch, f)
        cond_teacher = self.conditions(self.teacher, batch, f)
        out = {}
        for k in range(self.opts.critic_updates):
            exit_k = rnd.shared_randint(f"critic{k}/exit", len(self.sigmas))
            with torch.no_grad():
                video, _ = rollout(
                    self.student, cond_student, self.latent_hw, self.num_chunks, self.sigmas,
                    rnd, f"critic{k}", exit_step=exit_k,
                )  # fmt: skip
            cond_critic = self.conditions(self.critic, batch, f)
            loss = critic_loss(self.critic, video, cond_critic, rnd, f"critic{k}/score", self.opts)
            out.update(self.updaters["critic"].update(loss))
        exit_step = rnd.shared_randint("generator/exit", len(self.sigmas))
        video, _ = rollout(
            self.student, cond_student, self.latent_hw, self.num_chunks, self.sigmas,
            rnd, "generator", exit_step=exit_step, grad=True,
        )  # fmt: skip
        with torch.no_grad():
            cond_critic = self.conditions(self.critic, batch, f)
        loss, extra = generator_loss(
            self.teacher, self.critic, video, cond_teacher, cond_critic, rnd, "dmd", self.opts
        )
        out.update(self.updaters["generator"].update(loss))
        out.update(extra, exit_step=exit_step)
        return out
