"""Distribution matching distillation (DMD), shared by Self-Forcing and chunk distillation.

Generator loss: noise the student's sample x0 to a random level sigma, ask
the frozen teacher (with CFG: the "real" score) and the critic (the "fake"
score, trained on student samples) for their x0 predictions, and push x0
along (fake - real), normalised per sample by mean |x0 - real| (DMD's
weighting). Implemented as 0.5 * ||x0 - stopgrad(x0 - grad)||^2, whose
gradient with respect to x0 is exactly `grad`.

Critic loss: plain flow matching on detached student samples, so the critic
tracks the student's current distribution; it is updated `critic_updates`
times per generator update.

The networks: generator (the student, from `model.init`), critic (from
`critic_init`, default the teacher), teacher (frozen, `teacher:`).
"""

from __future__ import annotations

import copy
import sys

import torch

from distill.build import export_model, load_critic, load_frozen_and_digest, load_vae, new_dit
from distill.config import ConfigError
from distill.data import check_teacher_autoencoder, load_bank
from distill.distributed import broadcast_module, broadcast_text, mean_across
from distill.flow import Conditions, audio_windows, flow_loss
from distill.rng import SampleRandom
from distill.updater import Updater
from streamgen.conditioning import guided_velocity, sequence_velocity
from streamgen.sampling import shift_sigma, student_sigmas


def score_sigmas(rnd: SampleRandom, tag: str, opts) -> torch.Tensor:
    u = opts.score_t_min + (opts.score_t_max - opts.score_t_min) * rnd.rand(f"{tag}/sigma")
    return shift_sigma(u, opts.shift)


def _noised(x0, prefix, sigma, noise):
    s = sigma.view(-1, 1, 1, 1, 1)
    xt = (1 - s) * x0 + s * noise
    b, f = x0.shape[0], x0.shape[2]
    t = (sigma * 1000)[:, None].expand(b, f)
    if prefix is not None:
        xt = torch.cat([prefix, xt], dim=2)
        t = torch.cat([torch.zeros(b, prefix.shape[2], device=t.device), t], dim=1)
    return xt, t


def generator_loss(teacher, critic, x0, cond_teacher, cond_critic, rnd, tag, opts, prefix=None, world=None):
    """DMD loss of the student's sample x0 [B, C, F, h, w] (with gradient); cond covers prefix + frames.
    world: the ranks the logged DMD gradient norm is averaged over (the global batch's, as the loss)."""
    sigma = score_sigmas(rnd, tag, opts)
    noise = rnd.randn(f"{tag}/noise", *x0.shape[1:])
    p = 0 if prefix is None else prefix.shape[2]
    with torch.no_grad():
        xt, t = _noised(x0.detach(), prefix, sigma, noise)
        s = sigma.view(-1, 1, 1, 1, 1)
        real = xt[:, :, p:] - s * guided_velocity(teacher, xt, t, cond_teacher, opts.cfg_scale)[:, :, p:]
        fake = xt[:, :, p:] - s * sequence_velocity(critic, xt, t, cond_critic)[:, :, p:]
        weight = 1.0 / (x0.detach() - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True).clamp(min=1e-4)
        grad = (fake - real) * weight
        target = x0.detach() - grad
    loss = 0.5 * (x0 - target).square().flatten(1).mean(1).mean()
    # (rank 0's slice alone was logged: under torchrun another number than one process's)
    mean_square = grad.square().mean() if world is None else mean_across(grad.square().mean(), world)
    return loss, {"dmd_grad_norm": float(mean_square.sqrt())}


def critic_loss(critic, x0, cond_critic, rnd, tag, opts, prefix=None):
    sigma = score_sigmas(rnd, tag, opts)
    noise = rnd.randn(f"{tag}/noise", *x0.shape[1:])
    return flow_loss(critic, x0.detach(), noise, sigma, cond_critic, prefix).mean()


def _warn_of_another_schedule(cfg) -> None:
    """A warning where model.init is a student (the ode stage's, or another's) exported for other
    noise levels than this run's (its model.json's steps and shift): the stages' configs keep them
    the same by hand ("shift: 1.0  # as the ODE init"), and one changed alone started the run from
    a student of other levels, without a word. (A teacher as the init has no few-step levels.)"""
    from streamgen.model.files import read_json
    from streamgen.models import resolve_model_dir

    init, o = cfg.model.init, cfg.options
    folder = resolve_model_dir(init) if init and not init.startswith("wan:") else None
    try:
        meta = read_json(folder / "model.json") if folder else {}
    except (OSError, ValueError):
        return
    steps, shift = meta.get("steps"), meta.get("shift")
    if not str(meta.get("kind", "")).startswith("student") or (steps, shift) == (o.student_steps, o.shift):
        return
    print(f"warning: model.init {init} is a student of {steps} step{'s' * (steps != 1)} at shift {shift} (its "
          f"model.json), and this run's takes {o.student_steps} at shift {o.shift} ({cfg.stage}.student_steps, "
          f"{cfg.stage}.shift): it starts from a student of other noise levels", file=sys.stderr)  # fmt: skip


class DmdStage:
    """What Self-Forcing and chunk distillation share: networks, data, updaters, export."""

    kind = "student"

    def __init__(self, cfg, world):
        self.cfg, self.world, self.opts = cfg, world, cfg.options
        dev = world.device
        self.student = new_dit(cfg.model, cfg.run.seed).to(dev).train()
        teacher, digest = load_frozen_and_digest(self.opts.teacher)
        self.teacher = teacher.to(dev)
        # every rank rank 0's teacher: an export put in place between two ranks' reads would
        # score their students against different teachers (and fail a resume's check on one rank)
        broadcast_module(self.teacher, world)
        self.teacher_digest = broadcast_text(digest, world)
        critic_key = f"{cfg.stage}.critic_init"
        if self.opts.critic_init:
            self.critic = self._critic_start(critic_key).to(dev).train()
        else:  # a copy of the teacher loaded above: read again, the path may hold another export
            self.critic = copy.deepcopy(self.teacher).requires_grad_(True).train()
        critic = f"{critic_key} {self.opts.critic_init}" if self.opts.critic_init else "critic"
        for name, net in ((f"{cfg.stage}.teacher {self.opts.teacher}", self.teacher), (critic, self.critic)):
            for key in ("in_channels", "out_channels", "patch_size", "text_dim", "temporal_compression"):
                theirs, ours = getattr(net.cfg, key), getattr(self.student.cfg, key)
                if theirs != ours:  # (said without the values or which path: "the critic and the student differ")
                    raise ConfigError(f"the {name} and the student differ in {key}: {theirs!r} and {ours!r}")
        if self.teacher.cfg.audio and not self.critic.cfg.audio:
            # (it trained: a fake score blind to the audio the real score is conditioned on, every
            # DMD step pushing the student by their difference)
            raise ConfigError(
                f"{critic} has no audio branch (its model config's audio: "
                "false) and the teacher has one: the critic could not follow the audio the teacher scores "
                "the student's samples by; give a model with audio, or leave it out to start from the teacher"
            )
        broadcast_module(self.student, world)
        broadcast_module(self.critic, world)
        mcfg = self.student.cfg
        self.vae = load_vae(cfg.model, mcfg.in_channels, mcfg.temporal_compression, cfg.run.seed)
        self.latent_hw = self.vae.latent_hw(cfg.model.height, cfg.model.width)
        self.bank = load_bank(cfg, mcfg, self.latent_hw, self.vae)
        check_teacher_autoencoder(cfg, f"{cfg.stage}.teacher")
        if self.opts.critic_init:  # (its fake score started in another latent space than the teacher's)
            check_teacher_autoencoder(cfg, critic_key)
        self.sigmas = student_sigmas(self.opts.student_steps, self.opts.shift).to(dev)
        if world.is_main:
            _warn_of_another_schedule(cfg)
        self.updaters = {
            "generator": Updater("generator", self.student, cfg.optim, world),
            "critic": Updater(
                "critic", self.critic, self.opts.critic_optim, world, f"{cfg.stage}.critic_optim"
            ),
        }

    def _critic_start(self, key: str):
        """critic_init's DiT; where its folder is gone (moved, deleted) and run.out has a checkpoint
        (the Trainer builds a stage over checkpoints only to resume them), one of the checkpoint's
        critic config, whose weights the resume loads: the resume stopped on a folder it needs
        nothing of ("... is not a model directory (no model.json); train the stage that makes it
        first")."""
        from pathlib import Path

        from streamgen import checkpoint as ckpt
        from streamgen.model.config import ModelConfig
        from streamgen.model.model import DiT
        from streamgen.models import resolve_model_dir

        source = self.opts.critic_init
        if source.startswith("wan:") or resolve_model_dir(source) is not None:
            return load_critic(source, key)
        latest = ckpt.latest_checkpoint(Path(self.cfg.run.out))
        config = ckpt.checkpoint_header(latest).get("model_configs", {}).get("critic") if latest else None
        if not isinstance(config, dict):
            return load_critic(source, key)  # (its message: what the path is instead)
        if self.world.is_main:
            print(f"warning: {key} {source} is not there: the critic is built from {latest.name}'s config, and "
                  "its weights are the checkpoint's, as they are on any resume", file=sys.stderr)  # fmt: skip
        return DiT(ModelConfig.from_dict(config))

    def model_configs(self) -> dict:
        return {"generator": self.student.cfg.to_dict(), "critic": self.critic.cfg.to_dict()}

    def input_identity(self) -> dict[str, str]:
        """The frozen teacher's weights digest, by its setting: every step scores against it, and a
        resume refuses another (a teacher retrained at the same path: trainer.Trainer._check_inputs)."""
        return {f"{self.cfg.stage}.teacher": self.teacher_digest}

    def batch(self, step: int, frames: int):
        cfg = self.cfg
        batch = self.bank.batch(
            cfg.run.seed, step, cfg.data.batch_size, frames, self.world.rank, self.world.size
        )
        return batch.to(self.world.device), SampleRandom(cfg.run.seed, step, batch.ids, self.world.device)

    def conditions(self, net, batch, frames: int) -> Conditions:
        audio = audio_windows(net, batch.audio, batch.latent_start, frames)
        return Conditions.full(batch.reference, audio, batch.context)

    def export_meta(self) -> dict:
        """What the exported student's model.json says of how it streams (and how far it trained)."""
        return {"kind": self.kind, "stage": self.cfg.stage, "trained_steps": self.cfg.run.steps}

    def export(self, directory, name=None, compact=False):
        export_model(
            self.updaters["generator"].averaged_module(), self.vae, directory, name,
            self.cfg.model.height, self.cfg.model.width, self.opts.shift, self.opts.student_steps,
            self.export_meta(), compact,
        )  # fmt: skip
