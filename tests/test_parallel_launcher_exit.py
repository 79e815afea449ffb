"""The `--sp N` launcher's own end: nothing torchrun started in it runs on into the interpreter's shutdown."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from spawn_helpers import process_running

ROOT = Path(__file__).resolve().parents[1]

# The launcher, its rendezvous's keep-alive thread sending heartbeats back to back, each read from the
# store: in the store's C++ call (the GIL let go) nearly all the time, where torch's is once in 5 s, for
# a moment, which a loaded machine stretches. torchrun.main, then the interpreter's shutdown.
_LAUNCHER = """
import sys
from torch.distributed.elastic.rendezvous import dynamic_rendezvous, utils
from streamgen.parallel import torchrun

def back_to_back(ctx):
    while not ctx.stop_event.is_set():
        ctx.function(*ctx.args, **ctx.kwargs)

def heartbeat_read_from_the_store(self):
    self._state_holder._backend.get_state()

utils._PeriodicTimer._run = staticmethod(back_to_back)
dynamic_rendezvous.DynamicRendezvousHandler._keep_alive = heartbeat_read_from_the_store
sys.exit(torchrun.main(["--standalone", "--nproc-per-node=1", sys.argv[1]]))
"""

# The rank: a Ctrl-C of its launcher while it runs, which torchrun passes on to it (it ends quietly)
_RANK = """
import os, signal, sys, time
signal.signal(signal.SIGINT, lambda signum, frame: sys.exit(0))
os.kill(os.getppid(), signal.SIGINT)
time.sleep(30)
"""


@pytest.mark.distributed
@pytest.mark.timeout(150)
def test_a_launcher_stopped_by_a_signal_ends_without_its_rendezvous_heartbeats(tmp_path):
    """torchrun leaves its rendezvous open when a signal stops it, and with it the thread that sends
    its heartbeats through the store (in this process). One inside the store's call as the interpreter
    shut down was ended there by Python, in a C++ destructor: "terminate called without an active
    exception", exit -6, after the launcher's "stopped by SIGINT; every rank has ended" (`serve --sp 2`
    Ctrl-C'd, once, under load). The launcher shuts the rendezvous down, its thread joined, first."""
    rank = tmp_path / "rank.py"
    rank.write_text(_RANK)
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHELASTIC_RUN_ID", "LOCAL_RANK", "WORLD_SIZE")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    ended = subprocess.run([sys.executable, "-c", _LAUNCHER, str(rank)], env=env, capture_output=True, text=True,
                           timeout=120)  # fmt: skip
    assert (ended.returncode, ended.stderr) == (
        128 + signal.SIGINT,
        "streamgen: stopped by SIGINT; every rank has ended\n",
    ), ended.stderr[-2000:]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("code", [0, 2])
def test_a_launch_leaves_no_folder_of_its_own_behind(code, tmp_path, monkeypatch, capfd):
    """torchrun keeps each launch's error files (a rank's error line for the launcher) in a folder it
    makes in the temporary directory, torchelastic_*, and never removes: one more at each `--sp N`
    run, its ranks' errors in it (130 of them in a test machine's /tmp after a day). The launcher's folder goes as it ends,
    the ranks' error lines read first."""
    import tempfile

    from streamgen.parallel import torchrun

    rank = tmp_path / "rank.py"
    rank.write_text(
        "import sys\n"
        "from streamgen.parallel.torchrun import report_error\n"
        f"if {code}:\n"
        "    report_error('streamgen test: error: a rank failed')\n"
        f"sys.exit({code})\n"
    )
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.delenv("PET_LOG_DIR", raising=False)
    assert torchrun.main(["--standalone", "--nproc-per-node=1", str(rank)]) == code
    assert ("streamgen test: error: a rank failed" in capfd.readouterr().err) == bool(code)
    assert os.listdir(temporary) == []


@pytest.mark.parametrize(
    "options, environment, folder",
    [
        (["--log-dir", "given"], {}, "given"),
        ([], {"PET_LOG_DIR": "given"}, "given"),
        (["--tee", "3"], {}, None),  # (the ranks' output, kept in torchrun's own folder)
        (["--redirects", "0:1"], {}, None),
        ([], {}, "its own"),
    ],
)
def test_a_log_folder_the_caller_names_or_keeps_output_in_is_torchrun_s(options, environment, folder, monkeypatch):
    """A folder the caller names (--log-dir, torchrun's $PET_LOG_DIR) is torchrun's, as under plain
    torchrun; and so is its own where the ranks' output is kept there (--tee, --redirects): the
    launcher's would have been removed with that output in it."""
    import torch.distributed.run

    from streamgen.parallel import torchrun

    given = []
    monkeypatch.setattr(torch.distributed.run, "main", lambda argv: given.append(torch.distributed.run.parse_args(argv)))
    monkeypatch.delenv("PET_LOG_DIR", raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert torchrun.main(["--standalone", *options, "-m", "streamgen", "--version"]) == 0
    [parsed] = given
    if folder == "its own":
        assert os.path.basename(parsed.log_dir).startswith("streamgen-sp-") and not os.path.exists(parsed.log_dir)
    else:
        assert parsed.log_dir == folder
    assert parsed.training_script_args == ["--version"]


# The launcher, then the names of the threads it still runs (a joined thread may be listed for a
# moment: see spawn_helpers.gloo_threads), as its interpreter's shutdown begins
_LAUNCHER_THEN_ITS_THREADS = """
import os, sys, time
from streamgen.parallel import torchrun

code = torchrun.main(["--standalone", "--nproc-per-node=1", sys.argv[1]])
deadline = time.monotonic() + 5
while True:
    names = []
    for task in os.listdir("/proc/self/task"):
        try:
            names.append(open(f"/proc/self/task/{task}/comm").read().strip())
        except OSError:
            pass
    if "pt_tcpstore_uv" not in names or time.monotonic() > deadline:
        break
    time.sleep(0.05)
print(code, *sorted(names))
"""


@pytest.mark.distributed
@pytest.mark.timeout(150)
@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="no /proc/self/task to list threads in")
def test_a_launcher_stopped_by_a_signal_ends_its_rendezvous_store_s_threads_first(tmp_path):
    """Ended by a signal, torchrun's agent was left in a reference cycle with the exception's frames,
    holding the rendezvous store (in this process), whose server's threads ran on into the
    interpreter's shutdown, to end in the store's destructor there, or not at all. The launcher
    collects it before it returns: its threads are joined while Python runs."""
    rank = tmp_path / "rank.py"
    rank.write_text(_RANK)
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHELASTIC_RUN_ID", "LOCAL_RANK", "WORLD_SIZE")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    ended = subprocess.run([sys.executable, "-c", _LAUNCHER_THEN_ITS_THREADS, str(rank)], env=env,
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert ended.returncode == 0, ended.stderr[-2000:]
    code, *threads = ended.stdout.split()
    assert code == "130" and "pt_tcpstore_uv" not in threads, ended.stdout


def test_arguments_torchrun_refuses_are_its_usage_error_once(capfd):
    """The launcher reads torchrun's arguments for its log folder as torchrun does: where torchrun
    refuses them, its usage error comes once, from torchrun."""
    from streamgen.parallel import torchrun

    with pytest.raises(SystemExit) as exited:
        torchrun.main(["--nproc-per-node"])
    err = capfd.readouterr().err
    assert exited.value.code == 2 and err.count("error: argument --nproc-per-node") == 1, err


# a launcher that ends as soon as it has started its rank (a session of its own, as torchrun starts
# them), and the rank, which asks to end with its launcher only once that has ended: a launcher killed
# while its ranks' Python was still starting (a second or more under load), before they could ask
_LAUNCHER_GONE_FIRST = """
import os, subprocess, sys
env = {**os.environ, "STREAMGEN_LAUNCHER": str(os.getpid())}
rank = subprocess.Popen([sys.executable, "-c", sys.argv[1]], env=env, start_new_session=True,
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(rank.pid, flush=True)
"""
_RANK_ASKING_LATE = """
import os, time
launcher = int(os.environ["STREAMGEN_LAUNCHER"])
deadline = time.monotonic() + 30
while os.getppid() == launcher and time.monotonic() < deadline:
    time.sleep(0.02)
from streamgen.parallel.torchrun import end_with_the_launcher
end_with_the_launcher()
time.sleep(60)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
@pytest.mark.timeout(90)
def test_a_rank_whose_launcher_ended_before_it_asked_to_end_with_it_ends():
    """A rank asks to be sent SIGTERM when its launcher ends (`end_with_the_launcher`) as its command
    line loads. One whose launcher was killed before then was no longer its child, took itself for a
    process a rank had started, and ran on: waiting to join its group, whose store (the launcher's)
    was gone, for the group's timeout (30 minutes on gloo). It ends as the signal would have ended it."""
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHELASTIC_RUN_ID", "LOCAL_RANK", "WORLD_SIZE")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    launcher = subprocess.run([sys.executable, "-c", _LAUNCHER_GONE_FIRST, _RANK_ASKING_LATE], env=env,
                              capture_output=True, text=True, timeout=60)  # fmt: skip
    rank = int(launcher.stdout)
    try:
        deadline = time.monotonic() + 45
        while process_running(rank) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not process_running(rank)
    finally:
        if process_running(rank):
            os.kill(rank, signal.SIGKILL)


def test_a_process_a_rank_started_does_not_end_with_the_launcher(monkeypatch):
    """A process a rank starts inherits the launcher's variable, its parent not the launcher: while
    the launcher runs, it is nobody's rank, and goes on (not sent SIGTERM: this test's process)."""
    from streamgen.parallel import torchrun

    monkeypatch.setenv(torchrun.LAUNCHER_ENV, str(os.getpid()))  # (running, and not this process's parent)
    torchrun.end_with_the_launcher()


def test_a_signal_as_the_launcher_reports_a_failed_rank_is_its_caller_s(monkeypatch, capsys):
    """torchrun's handlers (a SignalException) stayed in place while the launcher printed how a rank
    had failed, and were given back only after: a Ctrl-C then (a second one, or one as a rank failed)
    was a SignalException's traceback, exit 1. They are given back as torchrun ends: the caller's
    handler has it (the command line's: a KeyboardInterrupt, 'interrupted', 130)."""
    import torch.distributed.run
    from torch.distributed.elastic.multiprocessing.api import _terminate_process_handler
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from streamgen.parallel import torchrun

    def fake_main(argv):  # (torchrun's agent takes the signals, and a rank fails)
        signal.signal(signal.SIGINT, _terminate_process_handler)
        raise ChildFailedError("streamgen", {0: ProcessFailure(0, 40, 2, "<N/A>")})

    def reported_as_a_ctrl_c_comes(failures):
        os.kill(os.getpid(), signal.SIGINT)
        return ["streamgen generate: error: a rank's"]

    monkeypatch.setattr(torch.distributed.run, "main", fake_main)
    monkeypatch.setattr(torchrun, "_reported_errors", reported_as_a_ctrl_c_comes)
    caught = []
    before = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        assert torchrun.main(["--standalone", "-m", "streamgen", "--version"]) == 2
    finally:
        signal.signal(signal.SIGINT, before)
    assert caught == [signal.SIGINT]
    assert "streamgen: rank 0 failed (exit code 2)" in capsys.readouterr().err
