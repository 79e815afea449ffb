"""`--sp N`: re-executing a streamgen command under torchrun, and choosing the mesh."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from spawn_helpers import launcher_env

from streamgen.parallel import torchrun
from streamgen.parallel.launch import (
    choose_degrees,
    relaunch_under_torchrun,
    torchrun_command,
)

ROOT = Path(__file__).resolve().parents[1]


class Relaunched(Exception):
    """What `launch_as_raise` raises in place of the launcher (its args: the launcher's arguments)."""


def launch_as_raise(argv):
    raise Relaunched(argv)


def test_torchrun_command_reruns_the_same_arguments_as_a_module():
    cmd = torchrun_command(4, ["generate", "--sp", "4", "--out", "a.mp4"])
    assert cmd[:3] == [sys.executable, "-m", "streamgen.parallel.torchrun"]
    assert "--nproc-per-node=4" in cmd and "--standalone" in cmd
    assert cmd[-7:] == ["-m", "streamgen", "generate", "--sp", "4", "--out", "a.mp4"]


@pytest.mark.parametrize(
    "heads, world, expected",
    [(12, 8, (4, 2)), (12, 4, (4, 1)), (3, 2, (1, 2)), (40, 8, (8, 1)), (2, 4, (2, 2))],
)
def test_choose_degrees_prefers_ulysses_within_the_heads(heads, world, expected):
    assert choose_degrees(heads, world) == expected


def test_relaunch_returns_for_one_process_and_inside_a_worker(monkeypatch):
    relaunch_under_torchrun(1, ["--version"])  # would not return if it re-executed
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    relaunch_under_torchrun(2, ["--version"])


def test_a_cpu_run_on_a_machine_with_gpus_uses_gloo_and_needs_no_gpus(monkeypatch):
    """--sp N --device cpu where CUDA is available: no GPU count to meet, gloo, the model on the CPU;
    --device cuda: NCCL, and each rank's own GPU (a model loaded onto "cuda" was on GPU 0 on every rank)."""
    import torch.distributed as dist

    from streamgen.parallel import launch

    calls = []
    monkeypatch.setattr(launch.torch.cuda, "is_available", lambda: True)
    gpus = [1]
    monkeypatch.setattr(launch.torch.cuda, "device_count", lambda: gpus[0])
    monkeypatch.setattr(launch.torch.cuda, "set_device", lambda i: calls.append(("set_device", i)))
    monkeypatch.setattr(launch.torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend: calls.append(("init", backend)))
    monkeypatch.setattr(torchrun, "main", lambda argv: calls.append(("launch",)))
    monkeypatch.setenv("LOCAL_RANK", "1")

    with pytest.raises(SystemExit):
        launch.relaunch_under_torchrun(2, ["--version"], device="cpu")
    with pytest.raises(ValueError, match="--sp 2 needs 2 GPUs, this machine has 1"):
        launch.relaunch_under_torchrun(2, ["--version"], device="cuda")
    assert calls == [("launch",)]
    calls.clear()
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    assert launch.init_process_group("cpu") == "cpu" and calls == [("init", "gloo")]
    calls.clear()
    gpus[0] = 2  # (LOCAL_RANK 1's)
    assert launch.init_process_group("cuda") == "cuda:1" and calls == [("set_device", 1), ("init", "nccl")]


def test_generate_sp_on_gpus_it_lacks_is_one_line(capsys, monkeypatch):
    from streamgen import cli
    from streamgen.parallel import launch

    monkeypatch.setattr(cli, "check_device", lambda name: None)  # as on a machine with one GPU
    monkeypatch.setattr(launch.torch.cuda, "device_count", lambda: 1)
    face, speech = ROOT / "streamgen/assets/sample_face.png", ROOT / "streamgen/assets/sample_speech.wav"
    argv = ["generate", "--audio", str(speech), "--reference", str(face), "--sp", "2", "--device", "cuda"]
    assert cli.main(argv) == 2
    assert "--sp 2 needs 2 GPUs, this machine has 1" in capsys.readouterr().err


def test_a_rank_without_a_gpu_or_a_gpu_index_is_one_line(monkeypatch, capsys):
    """More ranks than GPUs under plain torchrun: set_device's CUDA error, a traceback from the
    rank; `--device cuda:2 --sp 2`: the index was ignored, and the ranks ran on GPUs 0 and 1."""
    from streamgen import cli
    from streamgen.parallel import launch

    calls = []
    monkeypatch.setattr(cli, "check_device", lambda name: None)  # as on a machine with two GPUs
    monkeypatch.setattr(launch.torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(launch.torch.cuda, "set_device", lambda i: calls.append(("set_device", i)))
    monkeypatch.setattr(torchrun, "main", lambda argv: calls.append(("launch",)))
    for name in ("TORCHELASTIC_RUN_ID", "LOCAL_RANK", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)
    face, speech = ROOT / "streamgen/assets/sample_face.png", ROOT / "streamgen/assets/sample_speech.wav"
    argv = ["generate", "--audio", str(speech), "--reference", str(face), "--sp", "2", "--device", "cuda:1"]
    assert cli.main(argv) == 2
    assert "--device cuda:1 with --sp 2: each process takes the GPU of its rank" in capsys.readouterr().err
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")  # a rank of plain torchrun, started 3 to a machine
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(ValueError, match="the rank with LOCAL_RANK 2 has no GPU: this machine has 2"):
        launch.init_process_group("cuda")
    with pytest.raises(ValueError, match="--device cuda:0 with --sp 3"):
        launch.init_process_group("cuda:0")
    assert calls == []


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_main_given_arguments_runs_those_on_every_process(command, monkeypatch, tmp_path):
    """`streamgen.cli.main(argv)` called by a program: `--sp 2` re-ran the program's own command line
    (sys.argv) under torchrun, where every rank failed ('the following arguments are required')."""
    from streamgen import cli

    monkeypatch.setattr(torchrun, "main", launch_as_raise)
    monkeypatch.setattr(sys, "argv", ["my_program.py", "--verbose"])
    for name in ("TORCHELASTIC_RUN_ID", "LOCAL_RANK", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)
    # (port 0: serve's check of the address binds any free one; a port chosen before and let go could be
    # taken by then by another test process, and serve refused it: 'cannot listen on')
    options = ["--out", str(tmp_path / "a.mp4")] if command == "generate" else ["--port", "0"]
    argv = [command, "--model", "debug", "--sp", "2", *options]
    with pytest.raises(Relaunched) as relaunched:
        cli.main(argv)
    cmd = relaunched.value.args[0]
    assert cmd[cmd.index("streamgen") + 1 :] == argv


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_a_torchrun_world_other_than_sp_is_one_line(command, monkeypatch, capsys, tmp_path):
    """`torchrun --nproc-per-node 2 -m streamgen.cli generate` without --sp: every rank made the
    whole video by itself (the same file, twice); `serve`: every rank loaded the model."""
    from streamgen import cli

    def started(*args, **kwargs):
        raise AssertionError("the command went on")

    monkeypatch.setattr("streamgen.teacher.open_session", started)
    monkeypatch.setattr("server.uvicorn_server.SessionClosingServer.run", started)
    torchrun_rank_1 = {"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "RANK": "1"}
    for name, value in torchrun_rank_1.items():
        monkeypatch.setenv(name, value)
    options = ["--out", str(tmp_path / "a.mp4")] if command == "generate" else ["--port", "0"]
    assert cli.main([command, "--model", "debug", *options]) == 2
    assert "torchrun started 2 processes, but --sp is 1: give --sp 2" in capsys.readouterr().err


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_relaunch_runs_the_command_on_n_processes_from_this_one():
    """The process that relaunches is the launcher, ending with its exit code: it had re-executed Python
    for the launcher, which imported torch all over again before any rank started."""
    env = launcher_env()
    code = (
        "from streamgen.parallel.launch import relaunch_under_torchrun\n"
        "try:\n    relaunch_under_torchrun(2, ['--version'])\n"
        "except SystemExit as e:\n    print('the launcher ended with', e.code)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=110, check=True
    )
    assert out.stdout.count("streamgen 0.1.0") == 2, out.stdout + out.stderr
    assert "the launcher ended with 0" in out.stdout, out.stdout + out.stderr


def _streamgen(*args: str) -> subprocess.CompletedProcess:
    env = launcher_env()
    return subprocess.run(
        [sys.executable, "-m", "streamgen", *args], env=env, capture_output=True, text=True, timeout=110
    )


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_a_failing_rank_ends_the_launcher_with_its_code_and_one_line(tmp_path):
    # a model the ranks find wrong only as they load it (an unknown one is refused before the relaunch)
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.json").write_text("{}")
    r = _streamgen("generate", "--sp", "2", "--model", str(model), "--quiet", "--out", str(tmp_path / "a.mp4"))
    assert r.returncode == 2, r.stderr  # a usage error, as with --sp 1
    assert r.stderr.count("no 'config' in it") == 1, r.stderr  # not once per rank
    assert "failed (exit code 2); the other ranks were stopped" in r.stderr
    assert "Traceback" not in r.stderr and "ChildFailedError" not in r.stderr, r.stderr
    assert "Sending process" not in r.stderr and "exitcode" not in r.stderr, r.stderr  # torchrun's logs


@pytest.mark.timeout(60)
def test_a_bad_input_file_fails_before_any_process_starts(tmp_path):
    r = _streamgen(
        "generate", "--sp", "2", "--audio", str(tmp_path / "none.wav"), "--out", str(tmp_path / "a.mp4")
    )
    assert r.returncode == 2
    assert r.stderr.count("audio file not found") == 1 and "OMP_NUM_THREADS" not in r.stderr, r.stderr


@pytest.mark.parametrize("sp, device, warned", [(4, "cpu", True), (2, "cpu", False), (4, "cuda", False)])
def test_more_cpu_processes_than_cpus_are_warned_of(sp, device, warned, monkeypatch, capsys):
    """`--sp 64` on a 2-core machine started 64 processes, each loading torch and the model, without a
    word (`--sp 16` of tiny-avatar: 2.8 frames/s against one process's 32)."""
    from streamgen.parallel import launch

    monkeypatch.setattr(torchrun, "main", launch_as_raise)
    monkeypatch.setattr("streamgen.cli.usable_cpus", lambda: 2)
    monkeypatch.setattr(launch.torch.cuda, "device_count", lambda: 8)
    for name in ("TORCHELASTIC_RUN_ID", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(Relaunched):
        relaunch_under_torchrun(sp, ["--version"], device=device)
    err = capsys.readouterr().err
    line = f"streamgen: warning: --sp {sp} runs {sp} processes on 2 CPUs"
    assert (line in err and err.count("\n") == 1) if warned else err == "", err


@pytest.mark.parametrize(
    "sp, model, free_gib, refused",
    [
        (8, None, 1.0, True),  # 8 x torch's 0.25 GiB
        (2, None, 1.0, False),
        (2, "wan2.1-1.3b", 4.0, True),  # each process its own 1.3 B weights: 2.6 GB at the least
        (2, "tiny-avatar", 4.0, False),
    ],
)
def test_more_cpu_processes_than_fit_in_memory_are_refused(sp, model, free_gib, refused, monkeypatch, capsys):
    """`--sp 64` on a 2-core machine started 64 processes, each holding torch and the whole model, with
    a warning only: only the kernel's OOM killer stopped them."""
    from streamgen.parallel import launch

    monkeypatch.setattr(torchrun, "main", launch_as_raise)
    monkeypatch.setattr("streamgen.cli.usable_cpus", lambda: 8)
    monkeypatch.setattr("streamgen.models.free_memory", lambda: int(free_gib * 2**30))
    for name in ("TORCHELASTIC_RUN_ID", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    if refused:
        with pytest.raises(ValueError, match=rf"--sp {sp} needs at least .* GiB free$") as e:
            relaunch_under_torchrun(sp, ["--version"], device="cpu", model=model)
        assert f"this machine has {free_gib:.1f} GiB free" in str(e.value)
    else:
        with pytest.raises(Relaunched):
            relaunch_under_torchrun(sp, ["--version"], device="cpu", model=model)
    with pytest.raises(Relaunched):  # a CUDA run's weights are on its GPUs, one to each process
        monkeypatch.setattr(launch.torch.cuda, "device_count", lambda: 8)
        relaunch_under_torchrun(sp, ["--version"], device="cuda", model=model)


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_an_sp_that_cannot_fit_in_memory_is_one_line(command, monkeypatch, capsys, tmp_path):
    from streamgen import cli

    monkeypatch.setattr(torchrun, "main", lambda argv: pytest.fail("relaunched"))
    monkeypatch.setattr("streamgen.models.free_memory", lambda: 2**28)  # 0.25 GiB: not even 2 x torch
    for name in ("TORCHELASTIC_RUN_ID", "LOCAL_RANK", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)
    options = ["--out", str(tmp_path / "a.mp4")] if command == "generate" else ["--port", "0"]
    assert cli.main([command, "--model", "debug", "--sp", "2", *options]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"streamgen {command}: error: --sp 2 needs at least 0.5 GiB") and err.count("\n") == 1, err
