"""`--sp N`'s ranks ending: the launcher's exit code and its one line naming the rank that failed of
its own, a rank leaving after its peer has gone, and a rank's end with its launcher's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed.run
from spawn_helpers import process_running
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from streamgen.parallel import torchrun
from streamgen.parallel.launch import (
    join_process_group,
)


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


def _leave_when_the_peer_is_gone(rank, rendezvous, result_dir):
    import torch.distributed as dist

    from streamgen.parallel.launch import leave_process_group

    # (they meet at a file, new for each spawn: a port chosen and let go before rank 0's store
    # bound it could be taken by another test process (-n 2), and the group failed to form)
    join_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
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
    from spawn_helpers import spawn

    spawn(_leave_when_the_peer_is_gone, (str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2)
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
        while process_running(rank) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not process_running(rank)
    finally:
        launcher.kill()
        launcher.wait()
        if rank is not None and process_running(rank):
            os.kill(rank, signal.SIGKILL)


_THREADS_AFTER_DESTROY = """
import gc, sys
import torch, torch.distributed as dist
from spawn_helpers import gloo_threads
from streamgen.parallel.launch import join_process_group
# (a store in memory: a port chosen and let go for a tcp:// rendezvous could be taken by another
# test process (-n 2) before the group's store bound it)
join_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
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
