"""`--sp N`: re-executing a streamgen command under torchrun, and choosing the mesh."""

from __future__ import annotations

import builtins
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed.run
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from streamgen.parallel import torchrun
from streamgen.parallel.launch import (
    choose_degrees,
    join_process_group,
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
    from tests.server_helpers import free_port

    monkeypatch.setattr(torchrun, "main", launch_as_raise)
    monkeypatch.setattr(sys, "argv", ["my_program.py", "--verbose"])
    for name in ("TORCHELASTIC_RUN_ID", "LOCAL_RANK", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)
    options = ["--out", str(tmp_path / "a.mp4")] if command == "generate" else ["--port", str(free_port())]
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
    from tests.server_helpers import free_port

    def started(*args, **kwargs):
        raise AssertionError("the command went on")

    monkeypatch.setattr("streamgen.teacher.open_session", started)
    monkeypatch.setattr("server.uvicorn_server.SessionClosingServer.run", started)
    torchrun_rank_1 = {"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "RANK": "1"}
    for name, value in torchrun_rank_1.items():
        monkeypatch.setenv(name, value)
    options = ["--out", str(tmp_path / "a.mp4")] if command == "generate" else ["--port", str(free_port())]
    assert cli.main([command, "--model", "debug", *options]) == 2
    assert "torchrun started 2 processes, but --sp is 1: give --sp 2" in capsys.readouterr().err


def _launcher_env() -> dict[str, str]:
    """This environment as a user's shell has it: not inside a torchrun worker, one thread per rank."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("TORCHELASTIC_RUN_ID", "LOCAL_RANK", "WORLD_SIZE")
    }
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_a_ctrl_c_as_a_rank_loads_the_command_line_is_the_launcher_s_to_say(tmp_path):
    """Ctrl-C as the ranks started (torchrun passes it on to them): each printed a KeyboardInterrupt's
    traceback, as `python -m streamgen.cli` imports the command line before anything can catch it."""
    module = torchrun_command(2, ["--help"])[-2]
    (tmp_path / "argparse.py").write_text(  # (one of streamgen.cli's imports, stood in for)
        "import os, signal\nos.kill(os.getpid(), signal.SIGINT)  # a Ctrl-C as it imports\n"
    )
    path = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    env = {**_launcher_env(), "PYTHONPATH": path, torchrun.LAUNCHER_ENV: str(os.getpid())}  # (a rank of it)
    ended = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True,
                           timeout=120, env=env, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    assert (ended.returncode, ended.stderr) == (130, ""), ended.stderr


@pytest.mark.parametrize("module, held", [("streamgen", True), ("streamgen.cli", False)])
def test_the_ranks_of_streamgen_start_with_sigint_held(tmp_path, monkeypatch, module, held):
    """The ranks torchrun starts for `-m streamgen` start with SIGINT blocked (held for its
    __main__ to take: `test_a_ctrl_c_as_the_ranks_start_python_is_one_line`); another module's do
    not, as nothing there would take it; and the launcher's own mask is as it was."""
    from torch.distributed.elastic.multiprocessing.subprocess_handler.subprocess_handler import (
        SubprocessHandler,
    )

    said = tmp_path / "mask"
    started = []

    def fake_main(argv):  # (as torchrun starts a rank)
        code = "import signal; print(signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, []))"
        handler = SubprocessHandler(sys.executable, ("-c", code), {}, str(said), None, 0, None)
        started.append(handler.proc.wait(60))

    monkeypatch.setattr(torch.distributed.run, "main", fake_main)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    assert torchrun.main(["--standalone", "--nproc-per-node=2", "-m", module, "--version"]) == 0
    assert started == [0] and said.read_text().strip() == str(held)
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == mask


def test_a_torch_whose_handler_has_no_popen_to_wrap_starts_the_ranks_as_before():
    """The wrap is of torch's own class's `_popen`: where another torch has none, the launch goes on
    unwrapped (an AttributeError's traceback otherwise, before any rank started)."""
    class Handler:  # (no _popen)
        pass

    with torchrun._ranks_start_with_sigint_held(Handler, ["--standalone", "-m", "streamgen", "--version"]):
        pass
    assert not hasattr(Handler, "_popen")


def test_a_rank_started_as_the_launchers_ctrl_c_came_does_not_outlive_the_launcher():
    """The launcher's own Ctrl-C, held while a rank was started, came as the mask was given back:
    its SignalException left `_popen` before torchrun had the rank, which torchrun never stopped,
    and which (deaf to SIGINT until streamgen's __main__) lived on, holding the launcher's stderr:
    its caller waited for the pipe's end (a --sp 2 launch Ctrl-C'd under load)."""
    class Handler:
        def _popen(self, args, env):
            return subprocess.Popen(args, env=env)

    with pytest.raises(KeyboardInterrupt):
        with torchrun._ranks_start_with_sigint_held(Handler, ["--standalone", "-m", "streamgen", "--version"]):
            lost = Handler._popen(Handler(), [sys.executable, "-c", "import time; time.sleep(60)"], dict(os.environ))
            raise KeyboardInterrupt  # (as the SignalException came: the rank is nobody's)
    assert lost.poll() == -signal.SIGKILL


def test_the_launcher_gives_back_the_signal_handlers_torchrun_took(monkeypatch):
    """torchrun's agent handles SIGINT, SIGTERM, SIGHUP and SIGQUIT (a SignalException) and left its
    handlers in place once it returned: a Ctrl-C as the launcher ended (its ranks done) was a
    SignalException's traceback from wherever the launcher was."""
    from torch.distributed.elastic.multiprocessing.api import _terminate_process_handler

    taken = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)

    def fake_main(argv):
        for s in taken:
            signal.signal(s, _terminate_process_handler)

    monkeypatch.setattr(torch.distributed.run, "main", fake_main)
    before = [signal.getsignal(s) for s in taken]
    assert torchrun.main(["--standalone", "--nproc-per-node=2", "-m", "streamgen", "--version"]) == 0
    assert [signal.getsignal(s) for s in taken] == before


@pytest.mark.parametrize("rank, ignored", [(True, False), (False, False), (False, True)],
                         ids=["a rank", "a command of its own", "a background job"])  # fmt: skip
def test_a_ctrl_c_as_a_rank_exits_ends_it_as_the_signal(tmp_path, rank, ignored):
    """A rank whose command had ended, sent the Ctrl-C its launcher passed on while Python exited,
    printed "Exception ignored in ..." and a KeyboardInterrupt's traceback below the launcher's line;
    it ends by the signal, without a word (the launcher says it). So does any `python -m streamgen`
    whose command has ended (a Ctrl-C as a slow exit goes on); one started with SIGINT ignored (a
    shell script's job in the background) ignores it still."""
    (tmp_path / "sitecustomize.py").write_text(  # (the last thing Python does as it exits)
        "import atexit, os, signal, time\n"
        "atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(3)))\n"
    )
    path = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    env = {**_launcher_env(), "PYTHONPATH": path}
    if rank:
        env[torchrun.LAUNCHER_ENV] = str(os.getpid())  # (a rank of this process)
    handler = signal.SIG_IGN if ignored else signal.SIG_DFL
    ended = subprocess.run([sys.executable, "-m", "streamgen", "--version"], capture_output=True, text=True,
                           timeout=120, env=env, preexec_fn=lambda: signal.signal(signal.SIGINT, handler))  # fmt: skip
    assert (ended.returncode, ended.stderr) == (0 if ignored else -signal.SIGINT, ""), ended.stderr
    assert ended.stdout.startswith("streamgen ")


# (each rank, as Python starts it: rank 0 sends its launcher the Ctrl-C a terminal would, and both
# wait for torchrun to pass it on to them while they are still starting, in `site`, before any of
# streamgen's code runs; 30 s at most)
CTRL_C_AS_THE_RANKS_START = """
import os, signal, time
if "TORCHELASTIC_RUN_ID" in os.environ:
    if os.environ.get("LOCAL_RANK") == "0":
        os.kill(os.getppid(), signal.SIGINT)
    deadline = time.monotonic() + 30
    while signal.SIGINT not in signal.sigpending() and time.monotonic() < deadline:
        time.sleep(0.05)
"""


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_a_ctrl_c_as_the_ranks_start_python_is_one_line(tmp_path):
    """torchrun passes a Ctrl-C on to the ranks (SIGINT): one that came while a rank's Python was
    still starting, before streamgen.__main__ could catch it, was a KeyboardInterrupt's traceback
    from that rank (Python's start-up, `site`, runpy). The ranks start with SIGINT blocked, held
    for streamgen.__main__ to take once it can: one line, the launcher's, exit 130."""
    (tmp_path / "sitecustomize.py").write_text(CTRL_C_AS_THE_RANKS_START)
    env = {**_launcher_env(), "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run(
        [sys.executable, "-m", "streamgen", "generate", "--sp", "2", "--model", "debug", "--out", str(tmp_path / "a.mp4")],
        env=env, capture_output=True, text=True, timeout=110,
    )  # fmt: skip
    assert (r.returncode, r.stderr) == (130, "streamgen: stopped by SIGINT; every rank has ended\n"), r.stderr


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_relaunch_runs_the_command_on_n_processes_from_this_one():
    """The process that relaunches is the launcher, ending with its exit code: it had re-executed Python
    for the launcher, which imported torch all over again before any rank started."""
    env = _launcher_env()
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
    env = _launcher_env()
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


@pytest.mark.parametrize(
    "raised, code, line",
    [
        (SignalException("got signal: 15", sigval=signal.SIGTERM), 143, "stopped by SIGTERM"),
        (
            ChildFailedError("streamgen.cli", {1: ProcessFailure(1, 42, 2, "<N/A>")}),
            2,
            "rank 1 failed (exit code 2)",
        ),
        (
            ChildFailedError("streamgen.cli", {0: ProcessFailure(0, 42, -6, "<N/A>")}),
            1,
            "rank 0 failed (killed by SIGABRT)",
        ),
        (  # rank 0 stopped by torchrun (SIGTERM) in the second rank 1 failed: rank 1 is named
            ChildFailedError(
                "streamgen.cli",
                {0: ProcessFailure(0, 42, -15, "<N/A>"), 1: ProcessFailure(1, 43, 2, "<N/A>")},
            ),
            2,
            "rank 1 failed (exit code 2)",
        ),
        (  # the same, rank 0 ending on SIGTERM as on Ctrl-C (generate: 143, its unfinished file removed)
            ChildFailedError(
                "streamgen.cli",
                {0: ProcessFailure(0, 42, 143, "<N/A>"), 1: ProcessFailure(1, 43, -9, "<N/A>")},
            ),
            1,  # (the kernel's out-of-memory killer's signal: "signal 9" did not say so)
            "rank 1 failed (killed by SIGKILL, as the kernel's out-of-memory killer does)",
        ),
        (  # one rank sent SIGINT by itself (`kill -INT`): stopped, not a crash ("failed (exit code 130)")
            ChildFailedError("streamgen.cli", {1: ProcessFailure(1, 42, 130, "<N/A>")}),
            130,
            "rank 1 was interrupted (SIGINT); the other ranks were stopped",
        ),
        (  # the same while it waited in the group's join (`serve --sp`'s follower while rank 0 loads):
            # the signal's default action there, which ended the launcher with 1
            ChildFailedError("streamgen.cli", {1: ProcessFailure(1, 42, -2, "<N/A>")}),
            130,
            "rank 1 was interrupted (SIGINT)",
        ),
        (  # one rank alone sent SIGTERM: the others are stopped by torchrun, by SIGTERM too
            ChildFailedError("streamgen.cli", {0: ProcessFailure(0, 42, 143, "<N/A>")}),
            143,
            "rank 0 was stopped by SIGTERM; the other ranks were stopped",
        ),
    ],
)
def test_the_launcher_ends_with_the_signal_or_the_failed_rank_code(monkeypatch, capsys, raised, code, line):
    def fake_main(argv):
        raise raised

    monkeypatch.setattr(torch.distributed.run, "main", fake_main)
    assert torchrun.main([]) == code
    assert line in capsys.readouterr().err


def test_of_ranks_ending_in_the_same_second_the_one_torchrun_found_first_is_named(monkeypatch, capsys):
    """`serve --sp 2`'s rank 1 sent SIGTERM alone, in its replay: it ends (no error file), torchrun
    finds it and stops rank 0 by SIGTERM too, and lists it after rank 1. Both 143, in the same whole
    second: rank 0 was named, by its rank."""
    failures = {1: ProcessFailure(1, 41, 143, "<N/A>"), 0: ProcessFailure(0, 40, 143, "<N/A>")}
    for failure in failures.values():
        failure.timestamp = 1000

    def fake_main(argv):
        raise ChildFailedError("streamgen.cli", failures)

    monkeypatch.setattr(torch.distributed.run, "main", fake_main)
    assert torchrun.main([]) == 143
    assert "streamgen: rank 1 was stopped by SIGTERM" in capsys.readouterr().err


@pytest.mark.parametrize(
    "codes, cut_off",
    [({0: -9, 1: -15}, True), ({0: -11}, True), ({0: 3, 1: -9}, False), ({0: -15, 1: 2}, False), ({0: 143}, False)],
)
def test_the_launcher_line_starts_on_a_line_of_its_own(codes, cut_off, monkeypatch, capsys):
    """Rank 0 killed (SIGKILL) mid-run left its progress bar without its newline: the launcher's line
    was printed at the bar's end. Where rank 0 closed its bar (stopped, or after another rank), no blank line."""
    failures = {rank: ProcessFailure(rank, 40 + rank, code, "<N/A>") for rank, code in codes.items()}

    def fake_main(argv):
        raise ChildFailedError("streamgen.cli", failures)

    monkeypatch.setattr(torch.distributed.run, "main", fake_main)
    torchrun.main([])
    err = capsys.readouterr().err
    assert err.startswith("\nstreamgen: rank ") == cut_off and err.lstrip("\n").startswith("streamgen: rank "), err


def test_a_signal_behind_another_error_is_still_a_stop(monkeypatch, capsys):
    def fake_main(argv):
        # what torchrun's metrics wrapper raises when SIGINT lands before it has read the clock
        try:
            raise SignalException("got signal: 2", sigval=signal.SIGINT)
        except SignalException:
            raise UnboundLocalError("cannot access local variable 'start'")  # noqa: B904

    monkeypatch.setattr(torch.distributed.run, "main", fake_main)
    assert torchrun.main([]) == 130
    assert "stopped by SIGINT" in capsys.readouterr().err
    monkeypatch.setattr(torch.distributed.run, "main", lambda argv: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        torchrun.main([])


def test_a_signal_while_torchrun_loads_is_honoured_once_it_has(monkeypatch, capsys):
    real_import = builtins.__import__

    def importing(name, *args, **kwargs):
        if name == "torch.distributed.run":
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while torchrun loads
        return real_import(name, *args, **kwargs)

    def must_not_start(argv):
        raise AssertionError("torchrun started after a Ctrl-C")

    monkeypatch.setattr(torch.distributed.run, "main", must_not_start)
    monkeypatch.setattr(builtins, "__import__", importing)
    # Python's own handler, or SIG_IGN where a shell started this in the background
    before = signal.getsignal(signal.SIGINT)
    assert torchrun.main([]) == 130
    assert "stopped by SIGINT before any rank started" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is before  # restored


def test_while_joining_the_group_a_signal_ends_the_process_at_once():
    # the join waits in C++, where a Python handler never runs: only the default action ends it
    code = (
        "import os, signal, time\n"
        "from streamgen.parallel.launch import signals_end_the_process\n"
        "with signals_end_the_process():\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(30)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == -signal.SIGINT, r.stderr
    from streamgen.parallel.launch import signals_end_the_process

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with signals_end_the_process():
        assert signal.getsignal(signal.SIGINT) == signal.SIG_DFL
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_ctrl_c_with_the_ranks_running_ends_every_one(tmp_path):
    import re
    import threading
    import time
    import wave

    speech = tmp_path / "long.wav"
    with wave.open(str(speech), "wb") as w:  # long enough that the run cannot end before its Ctrl-C
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(b"\x00\x00" * 16000 * 120)
    env = _launcher_env()
    cmd = [
        "generate",
        "--sp",
        "2",
        "--model",
        "debug",
        "--audio",
        str(speech),
        "--out",
        str(tmp_path / "a.mp4"),
    ]
    proc = subprocess.Popen(  # (not --quiet: rank 0's progress bar says when both ranks generate)
        [sys.executable, "-m", "streamgen", *cmd],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    chunks: list[bytes] = []  # (as written: the bar redraws itself with \r, not line by line)
    reader = threading.Thread(
        target=lambda: chunks.extend(iter(lambda: os.read(proc.stderr.fileno(), 4096), b"")), daemon=True
    )
    reader.start()
    try:
        deadline = time.monotonic() + 120
        # a chunk counted on rank 0's bar: both ranks have loaded and sharded their models and are
        # generating (each chunk is made by the two together)
        while not re.search(rb"generating: .*\| *[1-9][0-9]*/", b"".join(chunks)):
            assert proc.poll() is None and time.monotonic() < deadline, b"".join(chunks)[-3000:]
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        proc.wait(60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    reader.join(10)
    err = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 130 and "stopped by SIGINT" in err and "Traceback" not in err, err[-3000:]
    # no rank had to be killed (one waiting to join the group for a peer that had stopped used to be)
    assert "forcefully exiting" not in err, err[-3000:]
    assert not (tmp_path / "a.mp4").exists()  # no partial output
    deadline = time.monotonic() + 30
    while True:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, "a rank outlived the launcher"
        time.sleep(0.2)


def _leave_when_the_peer_is_gone(rank, port, result_dir):
    import torch.distributed as dist

    from streamgen.parallel.launch import leave_process_group

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    join_process_group("gloo", rank=rank, world_size=2)
    joined = os.path.join(result_dir, "rank0-joined")
    if rank == 1:
        # Rank 1's part of the join can end while rank 0 still finishes its own (a CI run's rank 0
        # failed inside ProcessGroupGloo's constructor): it leaves only once rank 0 has joined.
        deadline = time.monotonic() + 60
        while not os.path.exists(joined) and time.monotonic() < deadline:
            time.sleep(0.05)
        dist.destroy_process_group()  # leaves without the final barrier, as after its own error
        return
    open(joined, "w").close()
    leave_process_group(finished=True)  # returns, with one line, instead of a traceback or a hang
    with open(os.path.join(result_dir, "rank0"), "w") as f:
        f.write(str(dist.is_initialized()))


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_leaving_after_a_peer_has_gone_is_one_line(tmp_path, capfd):
    import socket

    from spawn_helpers import spawn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spawn(_leave_when_the_peer_is_gone, (port, str(tmp_path)), nprocs=2)
    assert (tmp_path / "rank0").read_text() == "False"  # the group was destroyed
    err = capfd.readouterr().err
    assert "rank 0: a peer left before the end" in err and "Traceback" not in err, err


def test_a_finished_rank_whose_peer_failed_leaves_the_word_to_the_launcher(monkeypatch, capsys, tmp_path):
    """Rank 0 failed writing the file (a full disk) after rank 1 had finished: rank 1's barrier found
    it gone, and rank 1 printed 'a peer left before the end (... GLHF!)' above rank 0's own error."""
    import torch.distributed as dist

    from streamgen.parallel.launch import leave_process_group

    def barrier():
        raise RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:25003. GLHF!")

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "barrier", barrier)
    monkeypatch.setattr(dist, "destroy_process_group", lambda: None)
    monkeypatch.setenv(torchrun.LAUNCHER_ENV, "1")
    monkeypatch.setenv(torchrun.ERROR_FILE_ENV, str(tmp_path / "error-1.json"))
    leave_process_group(finished=True)
    assert capsys.readouterr().err == ""
    failure = ProcessFailure(1, 41, -15, str(tmp_path / "error-1.json"))
    assert "a peer left before the end" in failure.message
    assert torchrun._own_failures({0: ProcessFailure(0, 40, 2, "<N/A>"), 1: failure}).keys() == {0}
    monkeypatch.delenv(torchrun.LAUNCHER_ENV)  # under plain torchrun: printed, as before
    leave_process_group(finished=True)
    assert "streamgen: rank 1: a peer left before the end" in capsys.readouterr().err


def test_each_distinct_error_the_ranks_report_is_printed_once(monkeypatch, capsys, tmp_path):
    """Ranks hand their error lines to the launcher (`report_error`): the same one from every rank
    is printed once, a different one too; a rank stopped by a signal reports none."""
    files = {rank: tmp_path / f"error-{rank}.json" for rank in range(4)}
    lines = {0: "streamgen generate: error: too small", 1: "streamgen generate: error: too small",
             2: "streamgen generate: error: out of memory"}  # fmt: skip
    monkeypatch.setenv(torchrun.LAUNCHER_ENV, "1")  # as in this launcher's workers
    for rank, line in lines.items():
        monkeypatch.setenv(torchrun.ERROR_FILE_ENV, str(files[rank]))
        torchrun.report_error(line)
    assert capsys.readouterr().err == ""  # in the files, not printed by the ranks
    failures = {
        rank: ProcessFailure(rank, 40 + rank, 2 if rank < 3 else -15, str(files[rank])) for rank in files
    }

    def fake_main(argv):
        raise ChildFailedError("streamgen.cli", failures)

    monkeypatch.setattr(torch.distributed.run, "main", fake_main)
    assert torchrun.main([]) == 2
    err = capsys.readouterr().err
    assert err.count("too small") == 1 and err.count("out of memory") == 1, err
    assert err.index("too small") < err.index("out of memory") < err.index("failed (exit code 2)")
    monkeypatch.delenv(torchrun.ERROR_FILE_ENV)
    torchrun.report_error("streamgen generate: error: alone")  # outside torchrun: printed
    assert capsys.readouterr().err == "streamgen generate: error: alone\n"
    monkeypatch.setenv(torchrun.ERROR_FILE_ENV, str(tmp_path / "plain.json"))
    monkeypatch.delenv(torchrun.LAUNCHER_ENV, raising=False)  # (main took it away after its run)
    torchrun.report_error("streamgen distill: error: plain")  # under plain torchrun: printed too
    assert capsys.readouterr().err == "streamgen distill: error: plain\n"
    assert not (tmp_path / "plain.json").exists()


@pytest.mark.parametrize("signalled", [0, 1])
@pytest.mark.parametrize("peer_code", [143, -15, torchrun.ANOTHER_RANK_FAILED])
def test_the_rank_sent_sigterm_alone_is_named_not_the_one_that_saw_it_go(
    signalled, peer_code, monkeypatch, capsys, tmp_path
):
    """`kill -TERM` to one rank: its peer's collective fails ('another rank failed', in its error file),
    and torchrun's SIGTERM may reach it as it ends (its exit code 143, not 3). Both ended on SIGTERM,
    in the same second: the peer was named, its 'another rank failed (see its error above)' printed."""
    peer = 1 - signalled
    monkeypatch.setenv(torchrun.LAUNCHER_ENV, "1")
    monkeypatch.setenv(torchrun.ERROR_FILE_ENV, str(tmp_path / f"error-{peer}.json"))
    monkeypatch.setenv("RANK", str(peer))
    from streamgen.commands.generate import _stopped_by_another_rank

    assert _stopped_by_another_rank() == torchrun.ANOTHER_RANK_FAILED
    failures = {
        signalled: ProcessFailure(signalled, 40, 143, str(tmp_path / "none.json")),
        peer: ProcessFailure(peer, 41, peer_code, str(tmp_path / f"error-{peer}.json")),
    }
    for failure in failures.values():
        failure.timestamp = 1000  # (whole seconds: the same)

    def fake_main(argv):
        raise ChildFailedError("streamgen.cli", failures)

    monkeypatch.setattr(torch.distributed.run, "main", fake_main)
    assert torchrun.main([]) == 143
    err = capsys.readouterr().err
    assert err == f"streamgen: rank {signalled} was stopped by SIGTERM; the other ranks were stopped\n", err


@pytest.mark.parametrize("own_code", [-15, 143, 1])
def test_a_rank_failing_of_its_own_is_named_even_when_torchrun_stops_it_as_it_ends(
    own_code, monkeypatch, capsys, tmp_path
):
    """Rank 1 raised an error of its own; rank 0's collective then failed ('another rank failed') and
    it ended first, so torchrun sent rank 1 SIGTERM while it ended (-15): the launcher named rank 1
    'stopped by SIGTERM' and ended with 143. Rank 1's uncaught error marks its error file (through
    `streamgen.cli.main`), so it is named as the rank that failed, with Python's exit code 1."""
    from distill.trainer import Trainer
    from streamgen.cli import main

    def own_error(self):
        raise RuntimeError("the failing rank's own error")

    monkeypatch.setattr(Trainer, "run", own_error)
    monkeypatch.setenv(torchrun.LAUNCHER_ENV, str(os.getppid()))  # (as a rank of this launcher)
    monkeypatch.setenv(torchrun.ERROR_FILE_ENV, str(tmp_path / "error-1.json"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(RuntimeError, match="own error"):
        main(["distill", "teacher", "--config", "debug", "--out", str(tmp_path / "run")])
    monkeypatch.setenv(torchrun.ERROR_FILE_ENV, str(tmp_path / "error-0.json"))
    torchrun.report_error("streamgen distill: rank 0 stopped: another rank failed", another_rank_failed=True)
    failures = {
        0: ProcessFailure(0, 40, torchrun.ANOTHER_RANK_FAILED, str(tmp_path / "error-0.json")),
        1: ProcessFailure(1, 41, own_code, str(tmp_path / "error-1.json")),
    }

    def fake_main(argv):
        raise ChildFailedError("streamgen.cli", failures)

    monkeypatch.setattr(torch.distributed.run, "main", fake_main)
    assert torchrun.main([]) == 1
    assert capsys.readouterr().err == "streamgen: rank 1 failed (exit code 1); the other ranks were stopped\n"


def test_an_error_a_rank_saw_because_another_ended_is_not_marked_its_own(monkeypatch, tmp_path):
    """A peer-gone error raised by a command that does not look for it is not the rank's own failure."""
    monkeypatch.setenv(torchrun.LAUNCHER_ENV, str(os.getppid()))
    monkeypatch.setenv(torchrun.ERROR_FILE_ENV, str(tmp_path / "error-0.json"))
    torchrun.report_own_failure(RuntimeError("[gloo] Connection closed by peer [127.0.0.1]:1"))
    assert not (tmp_path / "error-0.json").exists()
    monkeypatch.setenv(torchrun.LAUNCHER_ENV, "1")  # (not this process's launcher: a process a rank started)
    torchrun.report_own_failure(RuntimeError("its own"))
    assert not (tmp_path / "error-0.json").exists()


# a launcher (as torchrun starts its ranks: a session of their own), and one rank that waits
_LAUNCHER = """
import os, subprocess, sys
env = {**os.environ, "STREAMGEN_LAUNCHER": str(os.getpid())}
rank = subprocess.Popen([sys.executable, "-c", sys.argv[1]], env=env, start_new_session=True)
print(rank.pid, flush=True)
rank.wait()
"""
_RANK = """
import time
from streamgen.parallel.torchrun import end_with_the_launcher
end_with_the_launcher()
print("ready", flush=True)
time.sleep(60)
"""


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"  # (a zombie has ended: its parent, the init process here, reaps it)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
@pytest.mark.timeout(60)
def test_a_rank_ends_when_its_launcher_is_killed():
    """torchrun starts each rank in a session of its own, so a launcher killed outright (SIGKILL)
    left the ranks running: `serve --sp 2`'s rank 0 served on, holding its port."""
    launcher = subprocess.Popen([sys.executable, "-c", _LAUNCHER, _RANK], stdout=subprocess.PIPE, text=True)
    rank = None
    try:
        rank = int(launcher.stdout.readline())
        assert launcher.stdout.readline().strip() == "ready"
        launcher.kill()
        launcher.wait()
        deadline = time.monotonic() + 20
        while _running(rank) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _running(rank)
    finally:
        launcher.kill()
        launcher.wait()
        if rank is not None and _running(rank):
            os.kill(rank, signal.SIGKILL)


_THREADS_AFTER_DESTROY = """
import gc, socket, sys
import torch, torch.distributed as dist
from spawn_helpers import gloo_threads
from streamgen.parallel.launch import join_process_group
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
join_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
dist.all_reduce(torch.ones(2))
import torch._dynamo  # after the group: as torch.compile or diffusers import it
dist.destroy_process_group()
gc.collect()
print(gloo_threads())
"""


@pytest.mark.timeout(120)
def test_a_destroyed_process_group_leaves_no_gloo_threads_behind():
    """Imported after the group joined, torch._dynamo kept references to it past
    destroy_process_group: its two gloo threads ran on into the interpreter's shutdown, where one
    still freeing a finished all-to-all's tensors aborted a CI run (SIGABRT). A fresh interpreter:
    one that imported torch._dynamo before could not show it."""
    tests = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests), str(tests.parent)])}
    run = subprocess.run(
        [sys.executable, "-c", _THREADS_AFTER_DESTROY], env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-2000:]
    left = run.stdout.split()[-1]
    if left == "None":
        pytest.skip("no /proc/self/task to count threads in")
    assert left == "0"


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
    from tests.server_helpers import free_port

    monkeypatch.setattr(torchrun, "main", lambda argv: pytest.fail("relaunched"))
    monkeypatch.setattr("streamgen.models.free_memory", lambda: 2**28)  # 0.25 GiB: not even 2 x torch
    for name in ("TORCHELASTIC_RUN_ID", "LOCAL_RANK", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)
    options = ["--out", str(tmp_path / "a.mp4")] if command == "generate" else ["--port", str(free_port())]
    assert cli.main([command, "--model", "debug", "--sp", "2", *options]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"streamgen {command}: error: --sp 2 needs at least 0.5 GiB") and err.count("\n") == 1, err
