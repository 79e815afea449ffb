"""The updates of a stage's trainable modules: their learning rate and EMA, and what a run says when
one cannot be taken."""

from __future__ import annotations

import pytest
import torch
from test_distill_helpers import debug_config, final_tensors, run

from distill.trainer import TrainingError
from streamgen import checkpoint as ckpt


def test_a_nan_gradient_is_said_to_be_its_norm_not_the_loss():
    """A NaN gradient behind a finite loss said "student gradient loss is nan"."""
    from distill.config import OptimConfig
    from distill.distributed import World
    from distill.updater import NonFiniteLoss, Updater

    module = torch.nn.Linear(2, 1)
    updater = Updater("student", module, OptimConfig(), World())
    y = module(torch.tensor([[-1.0, 0.5]])).sum()
    loss = torch.where(torch.tensor(False), (-y.abs() - 1).sqrt(), torch.zeros(()))  # finite, NaN gradient
    with pytest.raises(NonFiniteLoss) as stopped:
        updater.update(loss)
    assert str(stopped.value) == "student gradient's norm is nan"


def test_a_nan_critic_loss_names_the_critics_optimizer_settings(tmp_path, monkeypatch):
    """A DMD stage's critic steps with STAGE.critic_optim; its NaN loss said to lower optim.lr, the
    generator's rate, which changed nothing of what made the critic's loss NaN."""
    import distill.self_forcing

    teacher = tmp_path / "teacher"
    run(debug_config("teacher", teacher, **{"run.steps": 1}))
    real = distill.self_forcing.critic_loss
    calls = []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 5 else loss  # step 2's first (2 a step)

    monkeypatch.setattr(distill.self_forcing, "critic_loss", poisoned)
    out = tmp_path / "sf"
    cfg = debug_config("self_forcing", out, teacher=teacher / "model", init=teacher / "model")
    with pytest.raises(TrainingError) as stopped:
        run(cfg)
    said = str(stopped.value)
    assert said.startswith("critic loss is nan at step 2; stopped. Last good checkpoint: "), said
    assert ckpt.latest_checkpoint(out).name == "step-00000002.safetensors"
    lower = "(a lower self_forcing.critic_optim.lr, a tighter self_forcing.critic_optim.grad_clip: "
    assert lower in said, said
    assert "--set self_forcing.critic_optim.lr=..." in said, said


def test_a_resume_that_turns_the_ema_off_says_the_average_is_dropped(tmp_path, capsys):
    """A checkpoint's EMA weights were dropped without a word by a resume with optim.ema 0: the export,
    the trained weights, was no longer the average the run had kept until then."""
    out = tmp_path / "t"
    run(debug_config("teacher", out), stop_after=2)  # (the debug config's optim.ema 0.9)
    capsys.readouterr()
    run(debug_config("teacher", out, **{"optim.ema": 0.0, "run.steps": 3}), resume=True)
    err = capsys.readouterr().err
    assert (
        "warning: step-00000002.safetensors holds the EMA weights of teacher, which optim.ema 0 drops: its "
        "export is the trained weights, not their average" in err
    ), err
    assert not any(k.startswith("ema/") for k in final_tensors(out))
    run(debug_config("teacher", out, **{"optim.ema": 0.0, "run.steps": 4}), resume=True)
    assert "EMA" not in capsys.readouterr().err  # (none to drop)


def test_learning_rate_warms_up_then_decays_on_a_cosine():
    from distill.config import OptimConfig
    from distill.trainer import learning_rate

    constant = OptimConfig(lr=1e-3, warmup=10)
    assert learning_rate(constant, 0) == pytest.approx(1e-4) and learning_rate(constant, 9) == 1e-3
    assert learning_rate(constant, 10_000) == 1e-3
    cosine = OptimConfig(lr=1e-3, warmup=10, decay_steps=100, min_lr=1e-5)
    assert learning_rate(cosine, 10) == pytest.approx(1e-3)
    assert learning_rate(cosine, 60) == pytest.approx((1e-3 + 1e-5) / 2)  # half way down
    assert learning_rate(cosine, 110) == pytest.approx(1e-5) and learning_rate(cosine, 500) == pytest.approx(
        1e-5
    )
    rates = [learning_rate(cosine, u) for u in range(10, 111)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))


@pytest.mark.parametrize("grad_clip", [0.0, 1.0])
def test_a_nan_gradient_behind_a_finite_loss_stops_the_update(grad_clip):
    """With grad_clip 0 the gradient's norm was not looked at: a NaN gradient went into the weights."""
    from distill.config import OptimConfig
    from distill.distributed import World
    from distill.trainer import NonFiniteLoss, Updater

    module = torch.nn.Linear(2, 1)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    updater = Updater("student", module, OptimConfig(grad_clip=grad_clip), World())
    y = module(torch.tensor([[-1.0, 0.5]])).sum()
    # 0, whose gradient is NaN: where's unchosen branch still sends 0 * d sqrt(-1) back
    loss = torch.where(torch.tensor(False), (-y.abs() - 1).sqrt(), torch.zeros(()))
    assert torch.isfinite(loss)
    with pytest.raises(NonFiniteLoss, match="gradient"):
        updater.update(loss)
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_a_resumed_ema_lives_where_its_module_does():
    """A checkpoint's tensors load on the CPU; the EMA stayed there, and a resumed GPU run's first
    update failed (the meta device stands in for the GPU here)."""
    from distill.config import OptimConfig
    from distill.distributed import World
    from distill.trainer import Updater

    cfg = OptimConfig(lr=1e-3, ema=0.9)
    saved = Updater("m", torch.nn.Linear(3, 3), cfg, World())
    saved.update(saved.module(torch.ones(2, 3)).square().mean())
    tensors, meta = saved.state()
    resumed = Updater("m", torch.nn.Linear(3, 3, device="meta"), cfg, World())
    resumed.load_state({k: v.cpu() for k, v in tensors.items()}, meta, "ckpt")
    assert {v.device.type for v in resumed.ema.values()} == {"meta"}
