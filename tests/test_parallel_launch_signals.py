"""`--sp N`'s launcher and ranks under a Ctrl-C or another signal: as the ranks load, start, run
or join their group, each ends as the signal, in one line (the launcher itself: test_parallel_launch)."""

from __future__ import annotations

import builtins
import os
import signal
import subprocess
import sys

import pytest
import torch.distributed.run
from spawn_helpers import launcher_env
from torch.distributed.elastic.multiprocessing.api import SignalException

from streamgen.parallel import torchrun
from streamgen.parallel.launch import (
    torchrun_command,
)


def test_a_ctrl_c_as_a_rank_loads_the_command_line_is_the_launcher_s_to_say(tmp_path):
    """Ctrl-C as the ranks started (torchrun passes it on to them): each printed a KeyboardInterrupt's
    traceback, as `python -m streamgen.cli` imports the command line before anything can catch it."""
    module = torchrun_command(2, ["--help"])[-2]
    (tmp_path / "argparse.py").write_text(  # (one of streamgen.cli's imports, stood in for)
        "import os, signal\nos.kill(os.getpid(), signal.SIGINT)  # a Ctrl-C as it imports\n"
    )
    path = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    env = {**launcher_env(), "PYTHONPATH": path, torchrun.LAUNCHER_ENV: str(os.getpid())}  # (a rank of it)
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
    env = {**launcher_env(), "PYTHONPATH": path}
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
    env = {**launcher_env(), "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run(
        [sys.executable, "-m", "streamgen", "generate", "--sp", "2", "--model", "debug", "--out", str(tmp_path / "a.mp4")],
        env=env, capture_output=True, text=True, timeout=110,
    )  # fmt: skip
    assert (r.returncode, r.stderr) == (130, "streamgen: stopped by SIGINT; every rank has ended\n"), r.stderr


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
    env = launcher_env()
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
