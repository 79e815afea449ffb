"""One trainable module of a stage and its optimizer: AdamW on the learning-rate schedule
(`learning_rate`), grad-norm clipping, EMA, the gradients averaged over the ranks (or the module
sharded with FSDP2), and its state in checkpoints. A non-finite loss or gradient stops the update
before it steps (`NonFiniteLoss`)."""

from __future__ import annotations

import copy
import math
import sys

import torch

from distill.config import OptimConfig
from distill.distributed import World, average_gradients, mean_across
from streamgen import checkpoint as ckpt


class NonFiniteLoss(ArithmeticError):
    """A non-finite loss, or gradient behind a finite loss (`gradient`). `settings`: the config
    section of the optimizer that would have stepped (`optim`, or a DMD stage's critic_optim),
    where a lower rate is set."""

    def __init__(self, name: str, value: float, settings: str = "optim", gradient: bool = False):
        # (a NaN gradient said "teacher gradient loss is nan", a loss that was finite)
        what = f"{name} gradient's norm" if gradient else f"{name} loss"
        super().__init__(f"{what} is {value}")
        self.name, self.value, self.settings = name, value, settings


def learning_rate(cfg: OptimConfig, updates: int) -> float:
    """Linear warm-up to cfg.lr, then constant, or a cosine down to cfg.min_lr over cfg.decay_steps."""
    if cfg.warmup and updates < cfg.warmup:
        return cfg.lr * (updates + 1) / cfg.warmup
    if not cfg.decay_steps:
        return cfg.lr
    done = min(1.0, (updates - cfg.warmup) / cfg.decay_steps)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * done))


class Updater:
    """One trainable module: AdamW, linear warm-up, grad-norm clipping, EMA, gradient all-reduce."""

    def __init__(
        self, name: str, module: torch.nn.Module, cfg: OptimConfig, world: World, settings: str = "optim"
    ):
        """settings: the config section `cfg` is (`optim`; a DMD stage's critic: STAGE.critic_optim)."""
        self.name, self.module, self.cfg, self.world, self.settings = name, module, cfg, world, settings
        self.updates = 0
        self.sharded, self.template, self.gathered = False, None, None
        self._build_optimizer_and_ema()

    def _build_optimizer_and_ema(self) -> None:
        cfg = self.cfg
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(
            self.params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, eps=cfg.eps
        )
        self.ema = None
        if cfg.ema > 0:
            self.ema = {k: v.detach().clone() for k, v in self.module.state_dict().items()}

    def shard(self) -> None:
        """FSDP2 (`run.fsdp`): shard the module, then build its optimizer and EMA on the shards.

        Called before any step or restore. An unsharded copy is kept as the template
        the gathered EMA weights are loaded into at export.
        """
        from distill import fsdp

        if not fsdp.can_shard(self.module):
            return
        self.template = copy.deepcopy(self.module).cpu()
        fsdp.shard(self.module, self.world.sharding_mesh())
        self.sharded = True
        self._build_optimizer_and_ema()  # on the shards

    def update(self, loss: torch.Tensor) -> dict[str, float]:
        """backward, average over ranks, clip, step, EMA. Stops on a non-finite loss before stepping."""
        value = float(mean_across(loss, self.world))
        if not math.isfinite(value):
            raise NonFiniteLoss(self.name, value, self.settings)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if not self.sharded:  # FSDP2 has averaged them already (reduce-scatter)
            average_gradients(self.params, self.world)
        # the norm is checked without clipping too (grad_clip 0): a NaN gradient can come with a
        # finite loss, and would be applied to the weights
        norm = torch.nn.utils.clip_grad_norm_(
            self.params, self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        )
        norm = float(norm.full_tensor() if self.sharded else norm)
        if not math.isfinite(norm):
            raise NonFiniteLoss(self.name, norm, self.settings, gradient=True)
        lr = learning_rate(self.cfg, self.updates)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        self.updates += 1
        if self.ema is not None:
            with torch.no_grad():
                for k, v in self.module.state_dict().items():
                    if v.dtype.is_floating_point:
                        self.ema[k].lerp_(v, 1 - self.cfg.ema)
                    else:
                        self.ema[k].copy_(v)
        return {f"loss_{self.name}": value, f"grad_norm_{self.name}": norm, f"lr_{self.name}": lr}

    def averaged_module(self) -> torch.nn.Module:
        """A copy of the module holding the EMA weights (or the weights when there is no EMA).

        Sharded: the copy `gather()` made (every rank calls that; rank 0 then exports).
        """
        if self.sharded:
            if self.gathered is None:
                raise RuntimeError("a sharded module is gathered (on every rank) before export")
            return self.gathered
        m = copy.deepcopy(self.module)
        if self.ema is not None:
            m.load_state_dict(self.ema)
        return m.eval().requires_grad_(False)

    def gather(self) -> None:
        """Sharded: assemble the full EMA (or current) weights into the template (collective)."""
        from distill import fsdp

        if not self.sharded:
            return
        if self.ema is not None:
            full = {k: fsdp.full_tensor(v).cpu() for k, v in self.ema.items()}
        else:
            full = fsdp.full_model_state(self.module)
        m = copy.deepcopy(self.template)
        m.load_state_dict(full)
        self.gathered = m.eval().requires_grad_(False)

    # --- checkpoint state ----------------------------------------------------------
    def state(self) -> tuple[dict, dict]:
        """Checkpoint tensors and metadata; sharded modules are gathered (every rank calls this)."""
        from distill import fsdp

        if self.sharded:
            full = fsdp.full_model_state(self.module)
            tensors = {f"module/{self.name}/{k}": v for k, v in full.items()}
            opt_tensors, opt_meta = fsdp.full_optimizer_state(self.name, self.module, self.opt)
        else:
            tensors = ckpt.module_tensors(f"module/{self.name}", self.module)
            opt_tensors, opt_meta = ckpt.optimizer_tensors(self.name, self.opt)
        if self.ema is not None:
            tensors.update({f"ema/{self.name}/{k}": fsdp.full_tensor(v).cpu() for k, v in self.ema.items()})
        tensors.update(opt_tensors)
        return tensors, {"updates": self.updates, "optimizer": opt_meta}

    def load_state(self, tensors: dict, meta: dict, path) -> None:
        from distill import fsdp

        if self.sharded:
            prefix = f"module/{self.name}/"
            fsdp.load_full_model_state(
                self.module, {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            )
        else:
            ckpt.load_module(f"module/{self.name}", self.module, tensors, path)
        if self.ema is not None:
            prefix = f"ema/{self.name}/"
            ema = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            if not ema:
                # trained without (optim.ema 0) until now: the average starts from the weights
                # resumed (it was refused, with no way on but the run's start over)
                self.ema = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
                if self.world.is_main:  # (each rank's line, run together)
                    print(f"warning: {path.name} has no EMA weights for {self.name} (trained with "
                          f"{self.settings}.ema 0): the EMA starts from its weights", file=sys.stderr)  # fmt: skip
            elif set(ema) != set(self.ema):
                raise ckpt.CheckpointError(f"checkpoint {path} has EMA weights for another {self.name}")
            else:
                self.ema = {k: fsdp.shard_like(v.clone(), self.ema[k]) for k, v in ema.items()}
        elif self.world.is_main and any(k.startswith(f"ema/{self.name}/") for k in tensors):
            # (dropped without a word: the export, the trained weights, was not the average of the
            # run's steps it had been until then, nor what the run's config had asked for)
            print(f"warning: {path.name} holds the EMA weights of {self.name}, which {self.settings}.ema 0 "
                  f"drops: its export is the trained weights, not their average (give {self.settings}.ema "
                  "the decay the run had to keep it)", file=sys.stderr)  # fmt: skip
        if self.sharded:
            fsdp.load_full_optimizer_state(self.name, self.module, self.opt, tensors, meta["optimizer"])
        else:
            ckpt.load_optimizer(self.name, self.opt, tensors, meta["optimizer"])
        # the settings are the config's, not the checkpoint's (loading the optimizer's state brought
        # back the ones it was saved with): a resume may change them; lr follows the schedule each step
        cfg = self.cfg
        for group in self.opt.param_groups:
            group.update(betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
        self.updates = meta["updates"]
