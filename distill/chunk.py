"""Stage `chunk`: bidirectional chunk distillation, with the self-correcting variant.

The student attends fully inside its chunk and conditions only on the
reference and the previous chunk's last frames ("motion frames"). That is the
cached streaming path with a ring of `window_frames = motion_frames`, so the
trained model streams through `StreamSession` unchanged; the config sets
`model.overrides.window_frames` to `chunk.motion_frames`.

Each step generates one chunk, chunk k of a crop (k drawn per step, 0..max_chunks_back),
with DMD (the same machinery as Self-Forcing: the teacher, which was trained
with clean motion-frame prefixes, gives the real score of [reference | motion
frames at t = 0 | chunk]). Its motion frames come from
  - the data (the ground-truth chunk k-1), or
  - with probability p_self_correct, the student's own rollout of chunks
    0..k-1 (no gradient): contexts that carry its own accumulated errors,
    several chunks back, so it learns to recover from them.
"""

from __future__ import annotations

import sys

import torch

from distill.config import ConfigError
from distill.dmd import DmdStage, critic_loss, generator_loss
from distill.rollout import denoise_chunk, reencode, start_stream


def teacher_motion_prefix(source: str) -> int | None:
    """The longest motion prefix the teacher model at `source` trained with (its model.json's
    motion_prefix_frames), or None where it does not say (a Wan checkpoint, an older export)."""
    from streamgen.model.files import read_json
    from streamgen.models import resolve_model_dir

    folder = None if source.startswith("wan:") else resolve_model_dir(source)
    try:
        frames = read_json(folder / "model.json").get("motion_prefix_frames") if folder else None
    except (OSError, ValueError):
        return None
    return frames if isinstance(frames, int) and not isinstance(frames, bool) else None


class Stage(DmdStage):
    kind = "student-chunk"

    def __init__(self, cfg, world):
        super().__init__(cfg, world)
        mcfg, o = self.student.cfg, self.opts
        if mcfg.window_frames != o.motion_frames:
            raise ConfigError(
                f"chunk.motion_frames ({o.motion_frames}) must equal the student's window_frames "
                f"({mcfg.window_frames}); set model.overrides.window_frames"
            )
        c = mcfg.frames_per_chunk
        if o.motion_frames != c:  # the teacher's motion prefix is the chunk before, whole
            raise ConfigError(
                f"chunk.motion_frames ({o.motion_frames}) must equal the student's frames_per_chunk ({c}): "
                "the teacher sees the previous chunk as its motion prefix"
            )
        if cfg.data.latent_frames < (o.max_chunks_back + 1) * c:
            raise ConfigError(
                f"data.latent_frames must hold max_chunks_back + 1 = {o.max_chunks_back + 1} chunks"
            )
        trained = teacher_motion_prefix(o.teacher)
        if world.is_main and trained is not None and trained < o.motion_frames and o.max_chunks_back > 0:
            # (scored all the same, without a word: the real score of a context the teacher never saw)
            frames = f"{trained} frame{'s' * (trained != 1)}"
            what = f"clean motion prefixes of at most {frames}" if trained else "no clean motion prefix"
            print(f"warning: the teacher {o.teacher} trained with {what} (its "
                  f"teacher.max_motion_frames, p_motion_prefix), and the chunk stage gives it the chunk before, "
                  f"{o.motion_frames} frames, as its prefix: chunks after the first are scored on contexts it "
                  "never saw", file=sys.stderr)  # fmt: skip

    def _context(self, batch, cond, rnd, tag, k, own: bool):
        """Cache and motion frames for chunk k: the student's own chunks 0..k-1, or the data's."""
        c = self.student.cfg.frames_per_chunk
        cache = start_stream(self.student, cond, self.latent_hw)
        last = None
        for j in range(k):
            cond_j = cond.frames(j * c, (j + 1) * c)
            if own:
                noise = rnd.randn(f"{tag}/noise{j}", self.student.cfg.in_channels, c, *self.latent_hw)
                with torch.no_grad():
                    last = denoise_chunk(
                        self.student, cache, noise, cond_j, self.sigmas, rnd, f"{tag}/chunk{j}"
                    )
            else:
                last = batch.x0[:, :, j * c : (j + 1) * c]
            reencode(self.student, cache, last, cond_j)
        motion = None if last is None else last[:, :, -self.opts.motion_frames :].detach()
        return cache, motion

    def _chunk(self, batch, cond, rnd, tag, k, own, exit_step, grad):
        c = self.student.cfg.frames_per_chunk
        cache, motion = self._context(batch, cond, rnd, tag, k, own)
        noise = rnd.randn(f"{tag}/noise{k}", self.student.cfg.in_channels, c, *self.latent_hw)
        x0 = denoise_chunk(
            self.student, cache, noise, cond.frames(k * c, (k + 1) * c), self.sigmas, rnd,
            f"{tag}/chunk{k}", exit_step, grad,
        )  # fmt: skip
        return x0, motion

    def train_step(self, step: int) -> dict:
        o, c = self.opts, self.student.cfg.frames_per_chunk
        f = self.cfg.data.latent_frames
        batch, rnd = self.batch(step, f)
        k = rnd.shared_randint("chunk_index", o.max_chunks_back + 1)
        own = rnd.shared_chance("self_correct", o.p_self_correct)
        lo = k * c - (o.motion_frames if k > 0 else 0)  # frames the score networks see: motion + chunk
        window = slice(lo, (k + 1) * c)
        cond_student = self.conditions(self.student, batch, f)
        cond_teacher = self.conditions(self.teacher, batch, f).frames(window.start, window.stop)
        out = {}
        for u in range(o.critic_updates):
            exit_u = rnd.shared_randint(f"critic{u}/exit", len(self.sigmas))
            with torch.no_grad():
                x0, motion = self._chunk(batch, cond_student, rnd, f"critic{u}", k, own, exit_u, False)
            cond_critic = self.conditions(self.critic, batch, f).frames(window.start, window.stop)
            loss = critic_loss(self.critic, x0, cond_critic, rnd, f"critic{u}/score", o, motion)
            out.update(self.updaters["critic"].update(loss))
        exit_step = rnd.shared_randint("generator/exit", len(self.sigmas))
        x0, motion = self._chunk(batch, cond_student, rnd, "generator", k, own, exit_step, True)
        with torch.no_grad():
            cond_critic = self.conditions(self.critic, batch, f).frames(window.start, window.stop)
        loss, extra = generator_loss(
            self.teacher, self.critic, x0, cond_teacher, cond_critic, rnd, "dmd", o, motion, world=self.world
        )
        out.update(self.updaters["generator"].update(loss))
        out.update(extra, chunk_index=k, self_correct=float(own))
        return out
