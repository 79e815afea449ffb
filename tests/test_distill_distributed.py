"""torchrun data parallel on gloo: 2 processes take the same step as 1 process with the doubled batch."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
from rendezvous import a_held_rendezvous_store, at_the_held_store
from test_distill_helpers import checkpoint_tensors, final_tensors, max_difference

from streamgen.checkpoint import list_checkpoints
from streamgen.parallel.launch import join_process_group

pytestmark = pytest.mark.distributed

CONFIG = """stage: teacher
run: {{out: {out}, steps: 1, seed: {seed}, checkpoint_every: 1, threads: 1, progress: false, fsdp: {fsdp}}}
data: {{source: synthetic, batch_size: 4, latent_frames: 4, synthetic_clips: 6, synthetic_clip_latents: 8}}
model: {{flavor: debug, vae_widths: [8, 16], height: 16, width: 16}}
optim: {{lr: 1.0e-3, grad_clip: 0.5, ema: 0.9, eps: 1.0e-4}}
teacher: {{p_motion_prefix: 0.5, p_drop_reference: 0.5}}
"""


# Seed 7's first step has one rank of two keep every sample's reference while the other mixes (what
# test_fsdp2_ranks_of_which_one_keeps_every_reference_take_the_step_of_one_process is about): the
# sharded run that test checks is then the one test_fsdp2_shards_take_the_same_steps_and_resume_
# exactly checks, started once.
SEED = 7

# Adam's eps is raised from 1e-8: parameters whose gradient is mathematically zero (the key bias
# of a one-token cross-attention) get rounding noise of ~1e-12, which Adam with eps = 1e-8 would
# scale up to a full step of +-lr in either run; the comparison is about the gradient arithmetic.


def write_config(root, name: str, fsdp: bool = False, seed: int = SEED):
    cfg = root / f"{name}.yaml"
    cfg.write_text(CONFIG.format(out=root / name, fsdp=str(fsdp).lower(), seed=seed))
    return cfg


def launch(root, name: str, procs: int, fsdp: bool = False, extra=()):
    """The config's run as `torchrun ... streamgen distill teacher`: ranks whose interpreters shut
    down as a user's do (`spawn`'s processes end with os._exit), with nothing on stderr of a gloo
    thread ended there."""
    cfg = write_config(root, name, fsdp)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
           "-m", "streamgen", "distill", "teacher", "--config", str(cfg), *extra]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    # (a gloo thread still running as a rank's interpreter shuts down can abort it after its work:
    # "terminate called without an active exception")
    assert "terminate called" not in done.stderr, done.stderr[-3000:]
    # (the DiT's output was a view of the head's, which FSDP2 warns of on every sharded forward)
    assert "returned a view tensor" not in done.stderr, done.stderr[-3000:]
    assert done.stdout.count("teacher: finished") == 1  # (rank 0's: every rank's ran together)
    return final_tensors(root / name)


def _command_on_two_ranks(rank: int, port: int, argv: list[str]) -> None:
    """`streamgen <argv>` as torchrun's rank `rank` of 2 runs it (its environment, one thread)."""
    from streamgen.cli import main

    os.environ.update(**at_the_held_store(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")  # fmt: skip
    torch.set_num_threads(1)
    code = main(argv)
    if code:
        raise RuntimeError(f"rank {rank}: streamgen {' '.join(argv)} exited {code}")


def run_on_two_ranks(argv: list[str]) -> None:
    """`streamgen <argv>` on 2 gloo ranks forked from spawn's server, which imported torch and
    distill once: a torchrun started a launcher and 2 interpreters that each imported them again.
    What torchrun itself adds is `launch`'s tests'."""
    from spawn_helpers import spawn

    with a_held_rendezvous_store() as port:
        spawn(_command_on_two_ranks, (port, argv), nprocs=2, preload=RANK_IMPORTS)


def run_here(root, name: str, steps: int, resume: bool = False):
    """The same config's run in this process (one process, the whole batch): the reference the
    launched ranks are compared with, where a torchrun of one process would only add its start-up."""
    from distill.config import load_config
    from distill.trainer import Trainer

    cfg = load_config(write_config(root, name), "teacher")
    cfg.run.steps = steps
    Trainer(cfg, resume=resume).run()
    return final_tensors(root / name)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The runs several tests compare (each made once, on first use): "one_2" (1 process, 2 steps),
    "two" (2 gloo processes, 1 step), "fsdp" (2 sharded processes, 2 steps); "one" and "fsdp_1" are
    the step-1 checkpoints of "one_2" and "fsdp", which a run of 1 step would end with (the learning
    rate does not depend on run.steps): those runs were started again for them."""
    root = tmp_path_factory.mktemp("runs")

    def first_step(name: str):
        get(name)
        return checkpoint_tensors(list_checkpoints(root / name)[0])

    makers = {
        "one": lambda: first_step("one_2"),
        "one_2": lambda: run_here(root, "one_2", steps=2),
        "two": lambda: launch(root, "two", 2),
        "fsdp": lambda: launch(root, "fsdp", 2, fsdp=True, extra=["--steps", "2"]),
        "fsdp_1": lambda: first_step("fsdp"),
    }
    made = {}

    def get(name: str):
        if name not in made:
            made[name] = makers[name]()
        return made[name]

    get.root = root
    return get


def test_two_gloo_processes_equal_one_with_the_doubled_batch(runs):
    one = runs("one")  # global batch 4 in one process
    two = runs("two")  # 2 per rank, gradients all-reduced
    assert max_difference(one, two) <= 1e-6
    # and the step moved the weights by much more than the tolerance
    from distill.build import new_dit
    from distill.config import load_config

    initial = new_dit(load_config(runs.root / "one_2.yaml", "teacher").model, seed=SEED).state_dict()
    moved = max(float((one[f"module/teacher/{k}"] - v).abs().max()) for k, v in initial.items())
    assert moved > 1e-4


def test_fsdp2_shards_take_the_same_steps_and_resume_exactly(runs, tmp_path):
    """run.fsdp: 2 sharded processes = 1 process with the whole batch; killed + resumed = uninterrupted."""
    one = runs("one_2")
    whole = runs("fsdp")
    # killed after step 1's checkpoint: what that run left is the uninterrupted run's, up to there
    shutil.copytree(runs.root / "fsdp", tmp_path / "split")
    shutil.rmtree(tmp_path / "split" / "model")
    list_checkpoints(tmp_path / "split")[-1].unlink()
    assert len(list_checkpoints(tmp_path / "split")) == 1
    split = launch(tmp_path, "split", 2, fsdp=True, extra=["--steps", "2", "--resume"])
    assert max_difference(one, whole) <= 1e-6
    assert max_difference(whole, split) <= 1e-6
    # the exported model is the gathered EMA, loadable without any process group
    from streamgen.models import load_model

    assert load_model(str(runs.root / "fsdp" / "model")).trained


def test_fsdp2_ranks_of_which_one_keeps_every_reference_take_the_step_of_one_process(runs, tmp_path):
    """A teacher's samples that keep the reference and those that drop it run as two forwards
    (their sequences differ in length). Seed 7's step: rank 0's two samples are one of each, rank
    1's both keep it. Sharded, rank 1's one forward to rank 0's two was a collective mismatch:
    gloo aborted the run ("Received data size doesn't match expected size"), NCCL waits."""
    from distill.config import load_config
    from distill.rng import SampleRandom
    from distill.teacher import kept_references

    opts = load_config(write_config(tmp_path, "draws"), "teacher").options
    keep = kept_references(SampleRandom(SEED, 0, [0, 1, 2, 3]), opts).tolist()
    assert keep == [True, False, True, True]  # (what the test is about: one rank mixes, one does not)
    assert max_difference(runs("one"), runs("fsdp_1")) <= 1e-6


def _fsdp_run_then_its_threads(rank: int, port: int, root: str, nan_loss: bool) -> None:
    """A 1-step `run.fsdp` run as rank `rank` of 2 runs it (stopped at a NaN loss on both ranks where
    `nan_loss`), then its exit code and how many gloo threads this process still runs, counted as
    the command returns (no collection first), saved for the test."""
    import math

    from spawn_helpers import gloo_threads

    import distill.teacher
    from distill.updater import NonFiniteLoss
    from streamgen.cli import main

    def nan(self, step):
        raise NonFiniteLoss("teacher", math.nan)

    if nan_loss:
        distill.teacher.Stage.train_step = nan
    os.environ.update(**at_the_held_store(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")  # fmt: skip
    torch.set_num_threads(1)
    code = main(["distill", "teacher", "--config", f"{root}/sharded.yaml"])
    with open(f"{root}/rank{rank}.txt", "w") as f:
        f.write(f"{code} {gloo_threads()}")


@pytest.mark.parametrize("nan_loss", [False, True], ids=["finished", "stopped"])
def test_an_fsdp_run_leaves_no_thread_of_its_process_group(tmp_path, nan_loss):
    """torch's DTensor caches (the sharding propagation's, the redistribution planner's) kept the
    run's device mesh, and the mesh the destroyed group: its 2 gloo threads ran on after the run's
    teardown, into the interpreter's shutdown (where one still freeing a collective's tensors aborts
    the process: "terminate called without an active exception"), and a process that ran several
    runs kept one more group each time. The run now lets go of the group before it destroys it;
    and so does a run that stopped, whose error's traceback held the sharded modules."""
    from spawn_helpers import spawn

    write_config(tmp_path, "sharded", fsdp=True)
    with a_held_rendezvous_store() as port:
        spawn(_fsdp_run_then_its_threads, (port, str(tmp_path), nan_loss), nprocs=2, preload=RANK_IMPORTS)
    for rank in (0, 1):
        code, threads = (tmp_path / f"rank{rank}.txt").read_text().split()
        assert code == ("2" if nan_loss else "0")  # (2: the run stopped, saying why in one line)
        assert threads in ("0", "None"), f"rank {rank}: {threads} gloo threads left"  # (None: no /proc)
    assert (tmp_path / "sharded" / "model").is_dir() != nan_loss


@pytest.mark.slow
def test_a_run_resumed_on_another_number_of_ranks_equals_one_never_interrupted(runs, tmp_path):
    """docs/distill.md: sample i of the global batch draws the same numbers on whichever rank holds it."""
    one = runs("one_2")
    runs("two")  # step 1 on 2 ranks, then step 2 on 1 (a copy: "two" is another test's too)
    shutil.copytree(runs.root / "two", tmp_path / "moved")
    moved = run_here(tmp_path, "moved", steps=2, resume=True)
    assert max_difference(one, moved) <= 1e-6
    # (resumed, not started again: the first step is still the 2 ranks' checkpoint)
    from streamgen.checkpoint import load_checkpoint

    first, last = (load_checkpoint(path)[1] for path in list_checkpoints(tmp_path / "moved"))
    assert (first["world_size"], last["world_size"]) == (2, 1)


# what the spawned ranks import: once, in the process they are forked from (spawn_helpers.spawn)
RANK_IMPORTS = ("distill.trainer", "distill.ode", "distill.dmd", __name__)


def _average_on_two_ranks(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from distill.distributed import World, average_gradients

    os.environ.update(**at_the_held_store(port))
    join_process_group("gloo", rank=rank, world_size=2)
    try:
        both, first_only, neither = (torch.nn.Parameter(torch.ones(3)) for _ in range(3))
        both.grad = torch.full((3,), float(rank + 1))  # 1 and 2: mean 1.5
        if rank == 0:
            first_only.grad = torch.full((3,), 4.0)  # 4 and nothing: mean 2
        average_gradients([both, first_only, neither], World(rank=rank, size=2))
        torch.save({"both": both.grad, "first_only": first_only.grad, "neither": neither.grad},
                   f"{out}/rank{rank}.pt")  # fmt: skip
    finally:
        dist.destroy_process_group()


def test_average_gradients_keeps_none_where_no_rank_has_a_gradient(tmp_path):
    """Unused everywhere stays None (Adam skips it, as in one process); unused on one rank is 0 there."""
    from spawn_helpers import spawn

    with a_held_rendezvous_store() as port:
        spawn(_average_on_two_ranks, (port, str(tmp_path)), nprocs=2, preload=RANK_IMPORTS)
    for rank in (0, 1):
        grads = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.equal(grads["both"], torch.full((3,), 1.5))
        assert torch.equal(grads["first_only"], torch.full((3,), 2.0))
        assert grads["neither"] is None


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    """A 1-step debug teacher's model: the student stages' teacher and model.init (their runs read
    it, none writes beside it), trained once for the module rather than by each test."""
    from test_distill_helpers import debug_config, run

    out = tmp_path_factory.mktemp("teacher")
    run(debug_config("teacher", out, **{"run.steps": 1}))
    return str(out / "model")


def _dmd_stage_on_two_ranks(rank: int, port: int, root: str, teacher: str) -> None:
    """Rank 1 reads another export of the teacher than rank 0 (one put in place between the two
    ranks' reads): each rank's teacher and its digest are saved."""
    import torch.distributed as dist
    from test_distill_helpers import debug_config

    import distill.dmd
    from distill.distributed import World
    from distill.trainer import build_stage

    os.environ.update(**at_the_held_store(port))
    join_process_group("gloo", rank=rank, world_size=2)
    try:
        if rank == 1:
            real_load = distill.dmd.load_frozen_and_digest

            def retrained(source):
                net, _ = real_load(source)
                with torch.no_grad():
                    for p in net.parameters():
                        p.mul_(1.01)
                return net, "0123456789abcdef"

            distill.dmd.load_frozen_and_digest = retrained
        torch.set_num_threads(1)
        cfg = debug_config(
            "self_forcing", f"{root}/sf{rank}", teacher=teacher, init=teacher
        )
        stage = build_stage(cfg, World(rank=rank, size=2))
        torch.save(
            {"teacher": stage.teacher.state_dict(), "digest": stage.teacher_digest}, f"{root}/rank{rank}.pt"
        )
    finally:
        dist.destroy_process_group()


def test_every_rank_of_a_dmd_stage_holds_rank_0s_teacher_and_its_digest(tmp_path, teacher):
    """Each rank read the teacher itself: a teacher exported between two ranks' reads gave them
    different teachers and digests, so a resume's check could refuse on one rank only and leave
    the others waiting in their next collective."""
    from spawn_helpers import spawn

    with a_held_rendezvous_store() as port:
        spawn(_dmd_stage_on_two_ranks, (port, str(tmp_path), teacher), nprocs=2, preload=RANK_IMPORTS)
    first, second = (torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1))
    assert second["digest"] == first["digest"] != "0123456789abcdef"
    assert first["teacher"].keys() == second["teacher"].keys()
    assert all(torch.equal(first["teacher"][k], second["teacher"][k]) for k in first["teacher"])


def _join_with_short_timeout(rank: int, root: str, seconds: float) -> None:
    """Join the 2-rank gloo group with a timeout of `seconds` (as NCCL's 10 minutes, shortened),
    both ranks first started: the rendezvous waits under the same timeout, and a rank that took
    longer to start on a loaded machine failed it."""
    import time
    from datetime import timedelta
    from pathlib import Path

    Path(root, f"started{rank}").touch()
    deadline = time.monotonic() + 120
    while not Path(root, f"started{1 - rank}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    join_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=seconds))


def _ode_stage_on_two_ranks(rank: int, port: int, root: str, teacher: str) -> None:
    """Both ranks build one ode stage in one run.out (rank 0 samples the trajectories); rank 1's
    reading of the teacher's digest is of another export (one put in place after rank 0 read it).
    Each rank saves the trajectories it holds."""
    import torch.distributed as dist
    from test_distill_helpers import debug_config

    import distill.ode
    from distill.distributed import World
    from distill.trainer import build_stage

    os.environ.update(**at_the_held_store(port))
    join_process_group("gloo", rank=rank, world_size=2)
    try:
        if rank == 1:
            distill.ode.weights_digest = lambda source: "0123456789abcdef"
        torch.set_num_threads(1)
        cfg = debug_config("ode", f"{root}/ode", teacher=teacher, init=teacher)
        stage = build_stage(cfg, World(rank=rank, size=2))
        torch.save(stage.trajectories, f"{root}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(240)
def test_every_rank_of_an_ode_stage_checks_the_trajectories_against_rank_0s_digest(tmp_path, teacher):
    """Each rank took the teacher's digest itself: a teacher exported between rank 0's read and
    another rank's refused the trajectories rank 0 had just sampled on that rank only, the others
    left waiting in their next collective."""
    from spawn_helpers import spawn

    with a_held_rendezvous_store() as port:
        spawn(_ode_stage_on_two_ranks, (port, str(tmp_path), teacher), nprocs=2, preload=RANK_IMPORTS)
    first, second = (torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1))
    assert first.keys() == second.keys() == {"states", "clean", "clips", "starts"}
    assert all(torch.equal(first[k], second[k]) for k in first)


def _slow_rank_0_work(rank: int, port: int, root: str, teacher: str) -> None:
    """A 1-step ode run on two ranks whose group gives up waiting after 3 s, where rank 0's work
    alone takes 4 s each time (the others wait a second longer than the timeout): the teacher's
    trajectories, the checkpoint and the export (a large model's, or an export waiting for
    another's lock)."""
    import time

    import torch.distributed as dist
    from test_distill_helpers import debug_config

    import distill.ode
    from distill.trainer import Trainer
    from streamgen import checkpoint

    os.environ.update(**at_the_held_store(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))  # fmt: skip
    _join_with_short_timeout(rank, root, 3.0)
    try:
        torch.set_num_threads(1)
        if rank == 0:
            slow = lambda work: lambda *a, **k: time.sleep(4) or work(*a, **k)  # noqa: E731
            checkpoint.save_checkpoint = slow(checkpoint.save_checkpoint)
            distill.ode.Stage.export = slow(distill.ode.Stage.export)
            distill.ode.Stage._sample_trajectories = slow(distill.ode.Stage._sample_trajectories)
        Trainer(debug_config("ode", f"{root}/ode", teacher=teacher, init=teacher, **{"run.steps": 1})).run()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.timeout(240)
def test_the_other_ranks_wait_for_rank_0s_own_work_longer_than_the_groups_timeout(tmp_path, teacher):
    """Rank 0 samples the ode stage's trajectories (hours for a large teacher), writes the
    checkpoints and the export (minutes for a 14B model; an export may wait 30 minutes for
    another's lock) alone, while the others waited in the process group's barrier: NCCL's gives up
    after 10 minutes, and the run died there."""
    from spawn_helpers import spawn

    with a_held_rendezvous_store() as port:
        spawn(_slow_rank_0_work, (port, str(tmp_path), teacher), nprocs=2, preload=RANK_IMPORTS)
    assert (tmp_path / "ode" / "model").is_dir()


def _logged(tmp_path, stage: str, procs: int, sets=()) -> dict:
    """The scalars rank 0 logged at step 0 of `stage`'s debug config on `procs` gloo processes
    (1: in this process)."""
    import json

    out = tmp_path / f"{stage}-{procs}"
    if procs == 1:
        from distill.config import find_config, load_config
        from distill.trainer import Trainer

        cfg = load_config(find_config("debug", stage), stage, sets)
        cfg.run.out, cfg.run.steps = str(out), 1
        Trainer(cfg).run()
    else:
        assert procs == 2
        argv = ["distill", stage, "--config", "debug", "--out", str(out), "--steps", "1"]
        run_on_two_ranks(argv + [arg for s in sets for arg in ("--set", s)])
    return json.loads((out / "scalars.jsonl").read_text().splitlines()[0])


@pytest.mark.slow
@pytest.mark.parametrize("stage, key", [("autoencoder", "psnr"), ("self_forcing", "dmd_grad_norm")])
def test_scalars_logged_on_two_ranks_are_of_the_whole_batch(request, tmp_path, stage, key):
    """A stage's own scalars (a PSNR, the DMD gradient norm) were of rank 0's slice alone: on 2 ranks
    scalars.jsonl and TensorBoard showed another number than 1 process with the same batch."""
    sets = []
    if stage == "self_forcing":
        teacher = request.getfixturevalue("teacher")  # (the autoencoder's run needs none)
        sets = [f"self_forcing.teacher={teacher}", f"model.init={teacher}"]
    one, two = (_logged(tmp_path, stage, procs, sets) for procs in (1, 2))
    loss = next(k for k in one if k.startswith("loss_"))
    assert two[loss] == pytest.approx(one[loss], rel=1e-5)  # (the loss was averaged already)
    assert two[key] == pytest.approx(one[key], rel=1e-5)


# A rank that fails of its own error at its first step (rank 1), run as the streamgen command
FAILING_RANK = """import os, sys
import distill.teacher
def fail(self, step):
    raise RuntimeError("the failing rank's own error")
if os.environ["RANK"] == "1":
    distill.teacher.Stage.train_step = fail
from streamgen.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.timeout(200)
def test_a_rank_that_fails_is_the_one_named_and_the_others_add_no_traceback(tmp_path):
    """Rank 0, in a collective with rank 1 when rank 1 died of its own error, printed a gloo
    traceback below rank 1's ("Connection closed by peer ... GLHF"), and the launcher named it as
    the failed rank ("rank 0 failed (exit code 1)"): now rank 1 is named, its error the one traceback."""
    script = tmp_path / "failing_rank.py"
    script.write_text(FAILING_RANK)
    cfg = write_config(tmp_path, "run")
    cmd = [sys.executable, "-m", "streamgen.parallel.torchrun", "--standalone", "--nproc_per_node=2",
           str(script), "distill", "teacher", "--config", str(cfg)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    err = done.stderr
    assert done.returncode == 1, err[-3000:]
    assert "the failing rank's own error" in err and err.count("Traceback") == 1, err[-3000:]
    assert "Connection closed" not in err and "[rank0]" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == "streamgen: rank 1 failed (exit code 1); the other ranks were stopped"


def test_a_rank_whose_peer_ended_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    """What rank 0 does where gloo's collective finds its peer gone (under plain torchrun too)."""
    from distill.trainer import Trainer
    from streamgen.cli import main
    from streamgen.parallel import torchrun

    def peer_gone(self):
        raise RuntimeError(
            "[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:20371. This is typically "
            "caused by a remote worker crashing. Check the logs of the remote worker before reporting an error."
        )

    monkeypatch.setattr(Trainer, "run", peer_gone)
    monkeypatch.delenv(torchrun.LAUNCHER_ENV, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    argv = ["distill", "teacher", "--config", "debug", "--out", str(tmp_path / "run")]
    assert main(argv) == torchrun.ANOTHER_RANK_FAILED
    err = capsys.readouterr().err
    assert err == "streamgen distill: rank 0 stopped: another rank failed (see its error above)\n"
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: no other rank, the error is its own
    with pytest.raises(RuntimeError, match="Connection closed by peer"):
        main(argv)


def test_a_rank_whose_peer_ended_under_the_launcher_marks_its_line_so(tmp_path, monkeypatch):
    """Under `python -m streamgen.parallel.torchrun` the line goes to the launcher marked as a rank
    that ended because another had (as generate's is): torchrun's SIGTERM reaching it as it ends
    (exit code 143, not 3) named it as the rank that failed, its line printed above the real one's."""
    import json

    from distill.trainer import Trainer
    from streamgen.cli import main
    from streamgen.parallel import torchrun

    def peer_gone(self):
        raise RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:20371.")

    monkeypatch.setattr(Trainer, "run", peer_gone)
    error_file = tmp_path / "error-0.json"
    monkeypatch.setenv(torchrun.LAUNCHER_ENV, "1")
    monkeypatch.setenv(torchrun.ERROR_FILE_ENV, str(error_file))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    argv = ["distill", "teacher", "--config", "debug", "--out", str(tmp_path / "run")]
    assert main(argv) == torchrun.ANOTHER_RANK_FAILED
    reported = json.loads(error_file.read_text())
    assert reported["message"] == "streamgen distill: rank 0 stopped: another rank failed (see its error above)"
    assert reported.get(torchrun.ANOTHER_RANK_FAILED_KEY) is True, reported


def test_the_launcher_names_the_rank_that_failed_not_one_whose_peer_ended(monkeypatch, capsys, tmp_path):
    import torch.distributed.run
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from streamgen.parallel import torchrun

    peer_line = tmp_path / "error-0.json"
    monkeypatch.setenv(torchrun.LAUNCHER_ENV, "1")
    monkeypatch.setenv(torchrun.ERROR_FILE_ENV, str(peer_line))
    torchrun.report_error("streamgen distill: rank 0 stopped: another rank failed (see its error above)")
    failures = {  # (torchrun's times are whole seconds: both failed in the same one)
        0: ProcessFailure(0, 40, torchrun.ANOTHER_RANK_FAILED, str(peer_line)),
        1: ProcessFailure(1, 41, 1, "<N/A>"),
    }

    def fake_main(argv):
        raise ChildFailedError("failing_rank.py", failures)

    monkeypatch.setattr(torch.distributed.run, "main", fake_main)
    assert torchrun.main([]) == 1
    assert capsys.readouterr().err == "streamgen: rank 1 failed (exit code 1); the other ranks were stopped\n"


def _two_runs_on_two_ranks(rank: int, port: int, root: str) -> None:
    """Two 1-step teacher runs, one after the other, as rank `rank` of 2 (one MASTER_PORT, as
    torchrun gives a rank), rank 0 slower to leave the first run than rank 1 (3 s), as a rank
    whose collection or export takes longer is."""
    import time

    import distill.trainer
    from streamgen.cli import main

    if rank == 0:
        close_world = distill.trainer.close_world
        distill.trainer.close_world = lambda world: time.sleep(3) or close_world(world)

    os.environ.update(**at_the_held_store(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")  # fmt: skip
    torch.set_num_threads(1)
    for name in ("first", "second"):
        code = main(["distill", "teacher", "--config", f"{root}/{name}.yaml"])
        if code:
            raise RuntimeError(f"rank {rank}: the {name} run exited {code}")


@pytest.mark.timeout(240)
def test_two_runs_one_after_the_other_in_the_ranks_processes(tmp_path):
    """A process that runs two stages' runs (a pipeline's driver, a notebook) joined the second
    run's group through the first's rendezvous: one rank left the first run and asked rank 0's
    store for the second's group while rank 0 still held the first's, whose keys said the first
    run's addresses."""
    from spawn_helpers import spawn

    for name in ("first", "second"):
        write_config(tmp_path, name)
    with a_held_rendezvous_store() as port:
        spawn(_two_runs_on_two_ranks, (port, str(tmp_path)), nprocs=2, preload=RANK_IMPORTS)
    for name in ("first", "second"):
        assert (tmp_path / name / "model").is_dir()
