"""torchrun data parallel on gloo: 2 processes take the same step as 1 process with the doubled batch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from test_distill_helpers import final_tensors, max_difference

pytestmark = pytest.mark.distributed

CONFIG = """stage: teacher
run: {{out: {out}, steps: 1, seed: 3, checkpoint_every: 1, threads: 1, progress: false, fsdp: {fsdp}}}
data: {{source: synthetic, batch_size: 4, latent_frames: 4, synthetic_clips: 6, synthetic_clip_latents: 8}}
model: {{flavor: debug, vae_widths: [8, 16], height: 16, width: 16}}
optim: {{lr: 1.0e-3, grad_clip: 0.5, ema: 0.9, eps: 1.0e-4}}
teacher: {{p_motion_prefix: 0.5, p_drop_reference: 0.5}}
"""


# Adam's eps is raised from 1e-8: parameters whose gradient is mathematically zero (the key bias
# of a one-token cross-attention) get rounding noise of ~1e-12, which Adam with eps = 1e-8 would
# scale up to a full step of +-lr in either run; the comparison is about the gradient arithmetic.


def launch(tmp_path, name: str, procs: int, fsdp: bool = False, extra=()):
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(CONFIG.format(out=tmp_path / name, fsdp=str(fsdp).lower()))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
           "-m", "streamgen", "distill", "teacher", "--config", str(cfg), *extra]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return final_tensors(tmp_path / name)


def test_two_gloo_processes_equal_one_with_the_doubled_batch(tmp_path):
    one = launch(tmp_path, "one", 1)  # global batch 4 in one process
    two = launch(tmp_path, "two", 2)  # 2 per rank, gradients all-reduced
    assert max_difference(one, two) <= 1e-6
    # and the step moved the weights by much more than the tolerance
    from distill.build import new_dit
    from distill.config import load_config

    initial = new_dit(load_config(tmp_path / "one.yaml", "teacher").model, seed=3).state_dict()
    moved = max(float((one[f"module/teacher/{k}"] - v).abs().max()) for k, v in initial.items())
    assert moved > 1e-4


def test_fsdp2_shards_take_the_same_steps_and_resume_exactly(tmp_path):
    """run.fsdp: 2 sharded processes = 1 process with the whole batch; killed + resumed = uninterrupted."""
    one = launch(tmp_path, "one", 1, extra=["--steps", "2"])
    whole = launch(tmp_path, "whole", 2, fsdp=True, extra=["--steps", "2"])
    launch(tmp_path, "split", 2, fsdp=True)  # stops after step 1 with its checkpoint
    split = launch(tmp_path, "split", 2, fsdp=True, extra=["--steps", "2", "--resume"])
    assert max_difference(one, whole) <= 1e-6
    assert max_difference(whole, split) <= 1e-6
    # the exported model is the gathered EMA, loadable without any process group
    from streamgen.models import load_model

    assert load_model(str(tmp_path / "whole" / "model")).trained
