"""Stage `ode`: initialise the causal few-step student by regression on teacher ODE trajectories.

1. Once (rank 0, stored in OUT/trajectories.safetensors): sample `trajectories`
   clips with the teacher, `teacher_steps` Euler steps with CFG, on a schedule
   that contains the student's few-step sigmas exactly; keep the states at
   those sigmas and the clean end.
2. Train: the student streams the clip chunk by chunk with its KV cache as at
   inference; chunk j starts from the trajectory's state at a random one of
   the student's sigmas (drawn per sample and chunk) and regresses the clean
   end. The finished chunk is then written into the cache by the clean
   re-encode of the trajectory's clean end (no gradient), so every chunk is
   conditioned on clean context, as when streaming.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from distill.build import (
    NO_FILE_DIGEST,
    export_model,
    load_frozen_and_digest,
    load_vae,
    new_dit,
    weights_digest,
)
from distill.config import ConfigError
from distill.data import check_teacher_autoencoder, load_bank
from distill.distributed import broadcast_module, broadcast_text, others_wait_for_main
from distill.flow import Conditions, audio_windows
from distill.rng import SampleRandom, generator
from distill.rollout import reencode, start_stream
from distill.updater import Updater
from streamgen.conditioning import guided_velocity
from streamgen.model.files import save_safetensors
from streamgen.sampling import euler_sigmas, student_sigmas


def trajectory_schedule(teacher_steps: int, student: torch.Tensor, shift: float) -> torch.Tensor:
    """Teacher Euler sigmas (1 -> 0) with the student's sigmas inserted where missing."""
    grid = torch.cat([euler_sigmas(teacher_steps, shift), student.float()]).unique()
    return grid.sort(descending=True).values


class Stage:
    def __init__(self, cfg, world):
        self.cfg, self.world, self.opts = cfg, world, cfg.options
        dev = world.device
        self.student = new_dit(cfg.model, cfg.run.seed).to(dev).train()
        broadcast_module(self.student, world)
        mcfg = self.student.cfg
        self.vae = load_vae(cfg.model, mcfg.in_channels, mcfg.temporal_compression, cfg.run.seed)
        self.latent_hw = self.vae.latent_hw(cfg.model.height, cfg.model.width)
        self.bank = load_bank(cfg, mcfg, self.latent_hw, self.vae)
        check_teacher_autoencoder(cfg, "ode.teacher")
        self.sigmas = student_sigmas(self.opts.student_steps, self.opts.shift)
        c = mcfg.frames_per_chunk
        if cfg.data.latent_frames % c:
            raise ConfigError(f"data.latent_frames must be a multiple of frames_per_chunk ({c})")
        self.trajectories = self._trajectories()
        self.updaters = {"student": Updater("student", self.student, cfg.optim, world)}

    def model_configs(self) -> dict:
        return {"student": self.student.cfg.to_dict()}

    # --- 1. teacher trajectories, sampled once ----------------------------------------------
    def _trajectories(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        path = Path(self.cfg.run.out) / "trajectories.safetensors"
        made_with = None
        # (the sampling takes rank 0 longer than NCCL waits in a plain barrier for a large teacher)
        with others_wait_for_main(self.world):
            if self.world.is_main and not path.exists():
                # the digest of the teacher that samples them, from its one read of the weights
                teacher, digest = load_frozen_and_digest(self.opts.teacher)
                made_with = self._trajectory_settings(digest)
                tensors = self._sample_trajectories(teacher.to(self.world.device))
                path.parent.mkdir(parents=True, exist_ok=True)
                save_safetensors(tensors, path, metadata=made_with)
                # (not held while the file is loaded below: a second copy of the trajectories beside
                # them, and the teacher, through the other ranks' wait too)
                del teacher, tensors
        if made_with is None:
            made_with = self._trajectory_settings(
                weights_digest(self.opts.teacher) if self.world.is_main else ""
            )
        # every rank checks rank 0's reading: an export put in place between two ranks' reads
        # would refuse the trajectories on one rank only, the others left waiting
        made_with["teacher_weights"] = broadcast_text(made_with["teacher_weights"], self.world)
        self._check_trajectories(path, made_with)
        return load_file(str(path))

    def _trajectory_settings(self, teacher_weights: str) -> dict[str, str]:
        """What the sampled trajectories depend on, kept in their file's metadata (teacher_weights:
        the teacher's `weights_digest`)."""
        o, cfg = self.opts, self.cfg
        return {
            "teacher": str(o.teacher), "trajectories": str(o.trajectories), "teacher_steps": str(o.teacher_steps),
            "cfg_scale": repr(float(o.cfg_scale)), "student_steps": str(o.student_steps),
            "shift": repr(float(o.shift)), "trajectory_batch": str(o.trajectory_batch),
            "latent_frames": str(cfg.data.latent_frames), "seed": str(cfg.run.seed),
            # the clips the stored indices point into: another bank (other data, another split, a
            # rebuilt one) would pair the states with other clips' conditions, or none
            "bank": self.bank.digest(),
            "teacher_weights": teacher_weights,  # a teacher retrained at the same path
        }  # fmt: skip

    @staticmethod
    def _check_trajectories(path: Path, made_with: dict[str, str]) -> None:
        """A file sampled with other settings (a rerun in the same folder, `--resume` after an
        `ode:` option changed) would be trained on silently: its states labelled with this run's
        noise levels. A file from before the settings were kept is taken as it is."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                kept = f.metadata() or {}
        except Exception as e:  # (safetensors' own error type: a copy cut short was a traceback)
            raise ConfigError(
                f"cannot read {path} ({e}): delete it to sample the trajectories again, or choose another run.out"
            ) from None
        unknown = {"teacher_weights": NO_FILE_DIGEST}  # (a record that says nothing)
        weights = kept.get("teacher_weights")
        # the teacher by its weights where both know them: the same one spelt otherwise (absolute,
        # with a trailing slash, as `make model RUNS=...` may give it) sent people deleting these
        same_teacher = weights not in (None, NO_FILE_DIGEST) and weights == made_with.get("teacher_weights")
        differ = [
            f"{k}: {kept[k]} there, {v} here"
            for k, v in made_with.items()
            if k in kept
            and kept[k] != v
            and kept[k] != unknown.get(k)
            and not (k == "teacher" and same_teacher)
        ]
        if differ:
            raise ConfigError(
                f"{path} was sampled with other settings ({'; '.join(differ)}): delete it to sample "
                "trajectories for these, or choose another run.out"
            )

    @torch.no_grad()
    def _sample_trajectories(self, teacher) -> dict[str, torch.Tensor]:
        o, f = self.opts, self.cfg.data.latent_frames
        schedule = trajectory_schedule(o.teacher_steps, self.sigmas, o.shift)
        keep = [int((schedule - s).abs().argmin()) for s in self.sigmas]
        states, ends, clips, starts = [], [], [], []
        seed = self.cfg.run.seed + 7919  # trajectories draw apart from the training batches
        # (tiny-avatar's 256 trajectories of 48 guided steps took minutes before the first training
        # step, and nothing was shown meanwhile; rank 0 alone samples them)
        shown = self.cfg.run.progress and self.world.is_main
        with tqdm(total=o.trajectories, desc="ode: teacher trajectories", unit="trajectory", disable=not shown,
                  dynamic_ncols=True) as bar:  # fmt: skip
            for n in range(-(-o.trajectories // o.trajectory_batch)):
                # (the last batch cut to what is left: a whole one was sampled and cut off after, and a
                # trajectory_batch above trajectories sampled all of it; each sample draws by its own
                # index, so those kept are the same)
                size = min(o.trajectory_batch, o.trajectories - n * o.trajectory_batch)
                batch = self.bank.batch(seed, n, size, f, 0, 1).to(self.world.device)
                rnd = SampleRandom(seed, n, batch.ids, self.world.device)
                audio = audio_windows(teacher, batch.audio, batch.latent_start, f)
                cond = Conditions.full(batch.reference, audio, batch.context)
                x = rnd.randn("trajectory", *batch.x0.shape[1:])
                kept = {}
                for i in range(len(schedule) - 1):
                    if i in keep:
                        kept[i] = x.clone()
                    t = (schedule[i] * 1000).expand(x.shape[0], f).to(x.device)
                    x = x + (schedule[i + 1] - schedule[i]).item() * guided_velocity(
                        teacher, x, t, cond, o.cfg_scale
                    )
                states.append(torch.stack([kept[i] for i in keep], dim=1).cpu())
                ends.append(x.cpu())
                clips += batch.clips
                starts += batch.latent_start
                bar.update(size)
        return {
            "states": torch.cat(states)[: o.trajectories],  # [N, S, C, F, h, w]
            "clean": torch.cat(ends)[: o.trajectories],  # [N, C, F, h, w]
            "clips": torch.tensor(clips[: o.trajectories]),
            "starts": torch.tensor(starts[: o.trajectories]),
        }

    # --- 2. regression of the causal student ------------------------------------------------
    def train_step(self, step: int) -> dict:
        cfg, dev = self.cfg, self.world.device
        n_traj = len(self.trajectories["clips"])
        per_rank = cfg.data.batch_size // self.world.size
        ids = list(range(self.world.rank * per_rank, (self.world.rank + 1) * per_rank))
        picks = [
            int(torch.randint(n_traj, (), generator=generator(cfg.run.seed, step, i, "traj"))) for i in ids
        ]
        f, c, s_count = cfg.data.latent_frames, self.student.cfg.frames_per_chunk, len(self.sigmas)
        batch = self.bank.select(
            ids, [int(self.trajectories["clips"][p]) for p in picks],
            [int(self.trajectories["starts"][p]) for p in picks], f,
        ).to(dev)  # fmt: skip
        states = self.trajectories["states"][picks].to(dev)
        clean = self.trajectories["clean"][picks].to(dev)
        rnd = SampleRandom(cfg.run.seed, step, ids, dev)
        audio = audio_windows(self.student, batch.audio, batch.latent_start, f)
        cond = Conditions.full(batch.reference, audio, batch.context)
        cache = start_stream(self.student, cond, self.latent_hw)
        losses = []
        b = len(ids)
        for j in range(f // c):
            cond_j = cond.frames(j * c, (j + 1) * c)
            k = rnd.randint(f"level{j}", s_count)  # [b] which of the student's sigmas
            x = states[torch.arange(b), k][:, :, j * c : (j + 1) * c]
            sigma = self.sigmas.to(dev)[k]
            t = (sigma * 1000)[:, None].expand(b, c)
            v = self.student(x, t, cond_j.context, cond_j.audio, mode="cached", cache=cache)
            x0 = x - sigma.view(b, 1, 1, 1, 1) * v
            target = clean[:, :, j * c : (j + 1) * c]
            losses.append((x0 - target).square().flatten(1).mean(1))
            reencode(self.student, cache, target, cond_j)
        loss = torch.stack(losses).mean()
        return self.updaters["student"].update(loss)

    def export(self, directory, name=None, compact=False):
        export_model(
            self.updaters["student"].averaged_module(), self.vae, directory, name,
            self.cfg.model.height, self.cfg.model.width, self.opts.shift, self.opts.student_steps,
            {"kind": "student-ode", "stage": "ode", "trained_steps": self.cfg.run.steps}, compact,
        )  # fmt: skip
