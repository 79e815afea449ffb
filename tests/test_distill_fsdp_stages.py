"""run.fsdp on the student stages: 2 sharded gloo ranks take the same step as 1 process with the
whole batch (the teacher stage's is test_distill_distributed's)."""

from __future__ import annotations

import pytest
from test_distill_distributed import run_on_two_ranks
from test_distill_helpers import debug_config, final_tensors, max_difference, run

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A 1-step debug teacher: the stages' teacher and model.init."""
    out = tmp_path_factory.mktemp("teacher")
    run(debug_config("teacher", out, **{"run.steps": 1}))
    return out / "model"


# Adam's eps raised from 1e-8 in both optimizers, as test_distill_distributed's: a parameter whose
# gradient is mathematically zero (a one-token cross-attention's key bias, the critic's too) gets
# rounding noise of ~1e-12, another in each run, which eps = 1e-8 scales up to a step of +-lr
OPTIMIZERS = {
    "ode": ["optim.eps=1.0e-4"],
    "self_forcing": ["optim.eps=1.0e-4", "self_forcing.critic_optim={lr: 1.0e-4, betas: [0.0, 0.999], "
                     "grad_clip: 10.0, eps: 1.0e-4}"],
    "chunk": ["optim.eps=1.0e-4", "chunk.critic_optim={lr: 1.0e-4, betas: [0.0, 0.999], grad_clip: 10.0, "
              "eps: 1.0e-4}"],
}  # fmt: skip


@pytest.mark.timeout(240)
@pytest.mark.parametrize("stage", ["ode", "self_forcing", "chunk"])
def test_fsdp2_ranks_of_a_student_stage_take_the_step_of_one_process(tmp_path, teacher, stage):
    """One step of the stage's debug config (its global batch of 2: one sample a rank), sharded over
    2 gloo ranks and in this process: the same weights, EMA and optimizer state."""
    from distill.config import find_config, load_config
    from distill.trainer import Trainer

    sets = [f"{stage}.teacher={teacher}", f"model.init={teacher}", *OPTIMIZERS[stage]]
    cfg = load_config(find_config("debug", stage), stage, sets)
    cfg.run.out, cfg.run.steps = str(tmp_path / "one"), 1
    Trainer(cfg).run()
    argv = ["distill", stage, "--config", "debug", "--out", str(tmp_path / "two"), "--steps", "1"]
    run_on_two_ranks(argv + [arg for s in [*sets, "run.fsdp=true"] for arg in ("--set", s)])
    one, two = final_tensors(tmp_path / "one"), final_tensors(tmp_path / "two")
    assert max_difference(one, two) <= 1e-6
