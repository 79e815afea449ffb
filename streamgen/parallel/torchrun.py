"""torchrun, where Ctrl-C (or SIGTERM) is a stop and a failed rank is one line, not a crash.

`--sp N` commands restart themselves under this instead of plain torchrun.
When a signal arrives, torchrun's agent stops every rank and then raises
`SignalException` out of its `main`, which Python prints as a traceback and
exit code 1. Here that exception ends the launcher with the shell's code for
the signal (130 for SIGINT, 143 for SIGTERM) and one line. A rank that fails
has already printed its own error; torchrun's report of it (a traceback of
the launcher and a table) is cut to one line naming the rank, and the
launcher ends with that rank's exit code, so `--sp 2` fails the way `--sp 1`
does (2 for a usage error). A rank whose collective broke because another rank
had ended says so in one line and exits with `ANOTHER_RANK_FAILED` (distill's
and generate's ranks do: `another_rank_failed`), so the rank named is the one that failed.
Anything else is raised as usual. The ranks of `-m streamgen` start with SIGINT
blocked (`_ranks_start_with_sigint_held`): a Ctrl-C torchrun passes on to them while
their Python starts waits for streamgen/__main__.py's catch.

A usage error (bad size, unknown model) is the same on every rank: each rank
hands its error line to the launcher (`report_error`, through torchrun's error
file) instead of printing it, and the launcher prints each distinct line once.
torchrun's own log lines about stopping the ranks are left out unless $LOGLEVEL
asks for them.

    python -m streamgen.parallel.torchrun --standalone --nproc-per-node=2 -m streamgen ...
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import logging
import os
import signal
import sys
import tempfile
import time
from functools import partial

# The exit code of a rank whose collective failed because another rank had ended (`another_rank_failed`):
# not the run's error, which the launcher looks for among the other ranks
ANOTHER_RANK_FAILED = 3
# What gloo (and NCCL) say in a collective whose peer process has ended
PEER_GONE = (
    "Connection closed by peer",
    "Connection reset by peer",
    "remote worker crashing",
    "remote process exited",
)
# In a rank's error file: the rank ended because another had (`report_error`)
ANOTHER_RANK_FAILED_KEY = "another_rank_failed"
# In a rank's error file: the rank is ending on an error of its own, its traceback printed (`report_own_failure`)
OWN_FAILURE_KEY = "failed_of_its_own"
ERROR_FILE_ENV = "TORCHELASTIC_ERROR_FILE"  # torchrun gives each worker a file for its error
LAUNCHER_ENV = "STREAMGEN_LAUNCHER"  # this launcher's process id: its ranks hand it their errors, end with it


def report_error(line: str, another_rank_failed: bool = False) -> None:
    """A command's error line: to stderr, or in a worker of this launcher to the launcher (which
    prints each distinct one once, instead of once per rank). Under plain torchrun (distill on
    several processes) each rank prints its own, as torchrun shows no error file's line by itself.
    `another_rank_failed`: the line of a rank that ended because another had (`ANOTHER_RANK_FAILED`),
    marked so for the launcher, as its exit code may not say it: torchrun stops it by SIGTERM too."""
    key = ANOTHER_RANK_FAILED_KEY if another_rank_failed else None
    if not (os.environ.get(LAUNCHER_ENV) and _write_error_file(line, key)):
        print(line, file=sys.stderr)


def stopped_by_another_rank(command: str, rank: int | str) -> int:
    """In a rank of `command` whose collective failed because another rank had ended (`another_rank_failed`):
    its one line, marked for the launcher (`report_error`), and the exit code to end with,
    `ANOTHER_RANK_FAILED`. (Its gloo traceback, ending "GLHF", came below the failed rank's own error.)"""
    report_error(f"streamgen {command}: rank {rank} stopped: another rank failed (see its error above)",
                 another_rank_failed=True)  # fmt: skip
    return ANOTHER_RANK_FAILED


def report_own_failure(e: BaseException) -> None:
    """In a rank of this launcher ending on an error of its own (an uncaught exception, whose traceback
    Python prints): tell the launcher so. Its peers' collectives then fail, they end first, and
    torchrun stops this rank by SIGTERM as it ends (exit code -15, not 1): the launcher named it
    'stopped by SIGTERM' and ended with 143, as though the run had been stopped."""
    if is_launcher_rank() and not another_rank_failed(e):
        _write_error_file("", OWN_FAILURE_KEY)  # (no line: the traceback is the rank's own)


def _write_error_file(line: str, key: str | None) -> bool:
    """Write `line` (and `key`: True) to torchrun's error file of this rank; whether it was."""
    path = os.environ.get(ERROR_FILE_ENV)
    if not path:
        return False
    from streamgen.files import write_text_atomically

    message = {"message": line, "timestamp": int(time.time()), "streamgen": True}
    if key:
        message[key] = True
    try:  # whole or not at all: the launcher fails on a half-written file (a rank killed meanwhile)
        write_text_atomically(path, json.dumps(message))
    except OSError:
        return False
    return True


def another_rank_failed(e: BaseException) -> bool:
    """Whether `e` (or an error it was raised from, or while handling) is a collective's failure
    because a peer process has ended: an error of that rank's own, printed by it. (Rank 0 printed a
    gloo traceback of its own below the failed rank's, ending "GLHF", and was named as the failed one.)"""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, RuntimeError) and any(text in str(e) for text in PEER_GONE):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def is_launcher_rank() -> bool:
    """Whether this process is a rank this launcher started (not a process a rank started, which
    inherits the variable too)."""
    return os.environ.get(LAUNCHER_ENV, "") == str(os.getppid())


def end_with_the_launcher() -> None:
    """In a rank of this launcher (Linux): be sent SIGTERM when the launcher ends. torchrun stops
    its ranks when it is stopped, but starts each in a session of its own, so a launcher killed
    outright (SIGKILL: the OOM killer, a supervisor's last resort) left them running: `serve --sp`'s
    rank 0 served on, holding its port against the restarted service, with nothing to stop it.

    A rank whose launcher had ended before it asked (killed while the ranks' Python started) is its
    child no longer: it took itself for a process a rank had started, and ran on, waiting to join its
    group, whose store was the launcher's, for the group's timeout (30 minutes on gloo). It is sent
    SIGTERM now, as it would have been."""
    launcher = os.environ.get(LAUNCHER_ENV, "")
    if not sys.platform.startswith("linux") or not launcher.isdigit():
        return
    if is_launcher_rank():
        import ctypes

        pr_set_pdeathsig = 1  # <sys/prctl.h>
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
        if is_launcher_rank():  # (asked while the launcher ran: its end sends it)
            return
    elif _running(int(launcher)):
        return  # a process a rank started (it inherits the variable), the launcher running
    os.kill(os.getpid(), signal.SIGTERM)


def _running(pid: int) -> bool:
    """Whether process `pid` runs (Linux): not gone, and not a zombie, which has ended."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _reported_errors(failures: dict) -> list[str]:
    """The distinct error lines the failed ranks reported (`report_error`), in rank order."""
    lines: list[str] = []
    for _, failure in sorted(_own_failures(failures).items()):
        data = failure.error_file_data
        if data.get("streamgen") and data.get("message") and data["message"] not in lines:
            lines.append(data["message"])
    return lines


def _first_failure(failures: dict):
    """(rank, failure) of the rank that failed first of its own accord. Once one has failed, torchrun
    stops the others with SIGTERM, and its failures' times are whole seconds: one it stopped came
    first by torchrun's own choice ('rank 0 failed (signal 15)' where rank 1 could not load the model).
    In the same second, the one torchrun found first: it lists the ranks that had ended when it
    looked before those it then stopped (by rank, the lower one was named: `serve --sp 2`'s rank 1
    sent SIGTERM alone, both ending on it, read 'rank 0 was stopped by SIGTERM')."""
    own = _own_failures(failures)
    found = list(failures)  # (in the order torchrun found them)
    rank = min(own, key=lambda r: (own[r].timestamp, found.index(r)))
    return rank, own[rank]


def _own_failures(failures: dict) -> dict:
    """The ranks that failed of their own accord: not stopped by torchrun (SIGTERM: by it, or by the
    exit code 143 of a command that ends on it as on Ctrl-C) once another had failed, nor ended because
    another had (`ANOTHER_RANK_FAILED`, or its error file says so: torchrun's SIGTERM may have come
    while it ended, for an exit code 143). A rank whose error file says it failed of its own
    (`report_own_failure`) did, whatever its exit code: torchrun's SIGTERM may have come as it ended.
    Where none did (one rank alone sent SIGTERM), those that did not say another rank had failed:
    the one sent SIGTERM was named 'rank 0', and the rank 0 that had seen it go said 'another rank
    failed' above it."""
    others = (-int(signal.SIGTERM), 128 + int(signal.SIGTERM), ANOTHER_RANK_FAILED)
    not_after_another = {
        rank: f for rank, f in failures.items() if not f.error_file_data.get(ANOTHER_RANK_FAILED_KEY)
    }
    return (
        {
            rank: f
            for rank, f in not_after_another.items()
            if f.exitcode not in others or f.error_file_data.get(OWN_FAILURE_KEY)
        }
        or not_after_another
        or failures
    )


def _exit_code(failure) -> int:
    """A failed rank's exit code; 1 (Python's, for an uncaught exception) for one that failed of its
    own, but that torchrun's SIGTERM reached as it ended."""
    if failure.error_file_data.get(OWN_FAILURE_KEY) and _stopped_by(failure.exitcode) is not None:
        return 1
    return failure.exitcode


def _quiet_torchrun_logs() -> None:
    """torchrun's warnings and errors about stopping ranks after one failed say what the launcher's
    one line says; $LOGLEVEL (torchrun's own switch) brings them back."""
    if "LOGLEVEL" in os.environ:
        return
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(
            ("torch.distributed.elastic", "torch.distributed.run", "torch.distributed.launcher")
        ):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def main(argv: list[str] | None = None) -> int:
    # Loading torchrun takes seconds. A Ctrl-C meanwhile would interrupt some import
    # with a long traceback (or be swallowed by one that catches everything), so
    # signals are noted while it loads and honoured once it has.
    noted: list[int] = []
    stops = (signal.SIGINT, signal.SIGTERM)
    before = {s: signal.signal(s, lambda signum, frame: noted.append(signum)) for s in stops}
    try:
        from torch.distributed.elastic.multiprocessing.api import SignalException
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
        from torch.distributed.elastic.multiprocessing.subprocess_handler import subprocess_handler
        from torch.distributed.elastic.rendezvous import registry as rendezvous_registry
        from torch.distributed.run import main as torchrun_main
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
    if noted:
        sig = signal.Signals(noted[0])
        print(f"streamgen: stopped by {sig.name} before any rank started", file=sys.stderr)
        return 128 + int(sig)

    _quiet_torchrun_logs()
    argv = sys.argv[1:] if argv is None else list(argv)
    logs = None
    os.environ[LAUNCHER_ENV] = str(os.getpid())  # (the workers inherit it)
    stopped = False
    try:
        with (
            _signal_handlers_given_back(),
            _ranks_start_with_sigint_held(subprocess_handler.SubprocessHandler, argv),
            _rendezvous_shut_down_as_torchrun_ends(rendezvous_registry),
        ):
            _stops_raise_as_torchrun_will(SignalException)
            logs = _log_folder_of_its_own(argv)
            torchrun_main(argv if logs is None else [f"--log-dir={logs.name}", *argv])
    except ChildFailedError as e:
        if _cut_off_mid_line(e.failures):
            print(file=sys.stderr)
        for line in _reported_errors(e.failures):
            print(line, file=sys.stderr)
        rank, failure = _first_failure(e.failures)
        code = _exit_code(failure)
        print(f"streamgen: rank {rank} {_how_it_ended(code)}; the other ranks were stopped", file=sys.stderr)
        if code > 0:
            return code
        stopped_by = _stopped_by(code)  # (a shell's code for it, as for the launcher's own Ctrl-C)
        return 128 + int(stopped_by) if stopped_by is not None else 1
    except KeyboardInterrupt:  # Ctrl-C before the agent had its own handlers; it stops the ranks it started
        print("streamgen: stopped by SIGINT; every rank has ended", file=sys.stderr)
        stopped = True
        return 128 + int(signal.SIGINT)
    except Exception as e:
        sigval = getattr(_signal_behind(e, SignalException), "sigval", None)  # (not the exception: see below)
        if sigval is None:
            raise
        print(f"streamgen: stopped by {sigval.name}; every rank has ended", file=sys.stderr)
        stopped = True
        return 128 + int(sigval)
    finally:
        os.environ.pop(LAUNCHER_ENV, None)
        if logs is not None:
            logs.cleanup()
        if stopped:
            # torchrun's agent, ended by the stop, is left in a reference cycle with the exception's
            # frames, and holds the rendezvous store, whose server's threads (pt_tcpstore_uv) ran on
            # into the interpreter's shutdown, to end there or not at all. Collected now, the store's
            # destructor joins them while Python still runs
            gc.collect()
    return 0


def _stops_raise_as_torchrun_will(signal_exception: type) -> None:
    """Until torchrun's agent takes them (as it starts the ranks, after its rendezvous), SIGTERM and
    SIGHUP raise `signal_exception` as they will then (a Ctrl-C is a KeyboardInterrupt meanwhile): by
    their default action they ended the launcher without a word (exit -15, not 143), and left its
    folder of logs behind. Not where they are ignored (`nohup`), nor where a caller handles them."""
    for name in ("SIGTERM", "SIGHUP"):
        signum = getattr(signal, name, None)
        if signum is not None and signal.getsignal(signum) is signal.SIG_DFL:
            signal.signal(signum, partial(_raise_signal_exception, signal_exception))


def _raise_signal_exception(signal_exception: type, signum: int, frame) -> None:
    sigval = signal.Signals(signum)
    raise signal_exception(f"Process {os.getpid()} got signal: {sigval}", sigval=sigval)


def _log_folder_of_its_own(argv: list[str]):
    """A temporary folder (`tempfile.TemporaryDirectory`) for torchrun's logs of the launch of `argv`,
    for the launcher to remove as it ends; None where the launch keeps logs for the caller to read.

    torchrun's own is a new folder in the temporary directory at each launch (torchelastic_*), never
    removed; an `--sp N` launch keeps only its ranks' error files there, which torchrun reads as it
    finds each rank ended. Where the caller names a folder (--log-dir, or torchrun's $PET_LOG_DIR),
    or keeps the ranks' output in one (--redirects, --tee, --duplicate-*-filters, --logs-specs), it
    is torchrun's as before."""
    from torch.distributed.run import parse_args

    try:  # (as torchrun parses them)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            options = vars(parse_args(argv))
    except SystemExit:  # --help, or arguments torchrun refuses: it says so itself, next
        return None
    kept = ("log_dir", "logs_specs", "duplicate_stdout_filters", "duplicate_stderr_filters")
    if any(options.get(name) for name in kept) or any(options.get(name, "0") != "0" for name in ("redirects", "tee")):
        return None
    return tempfile.TemporaryDirectory(prefix="streamgen-sp-", ignore_cleanup_errors=True)


# the signals torchrun's agent handles (its TORCHELASTIC_SIGNALS_TO_HANDLE's default)
TORCHRUN_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")


@contextlib.contextmanager
def _signal_handlers_given_back():
    """Within: torchrun's agent may take the signals it handles (`TORCHRUN_SIGNALS`, raising its
    SignalException), which it leaves in place once it returns; they are given back as it ends, before
    the launcher says how the run ended. (Left in place, a Ctrl-C as the launcher ended was a
    SignalException's traceback from wherever it was; given back only after the launcher's words, one
    as it said how a rank had failed was too.)"""
    handled = [getattr(signal, s) for s in TORCHRUN_SIGNALS if hasattr(signal, s)]
    handlers = {s: signal.getsignal(s) for s in handled}
    try:
        yield
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def _ranks_start_with_sigint_held(handler_class, argv: list[str] | None):
    """Within: the ranks torchrun starts (`python -m streamgen`) start with SIGINT blocked. torchrun
    passes a Ctrl-C on to its ranks as SIGINT, and one that reached a rank while its Python was still
    starting (`site`, runpy), before streamgen/__main__.py could catch it, was a KeyboardInterrupt's
    traceback, or "Fatal Python error: init_import_site". Blocked, it is held, not lost: streamgen's
    __main__ unblocks it inside its catch, where it ends the rank at once. (Only `-m streamgen`, whose
    __main__ does so: another module would never hear a Ctrl-C, and be killed 30 s later.)"""
    argv = sys.argv[1:] if argv is None else argv
    runs_streamgen = "-m" in argv and argv[argv.index("-m") + 1 :][:1] == ["streamgen"]
    # (torch's own class: one that has no `_popen` to wrap, in another torch, starts them as before)
    if not (runs_streamgen and hasattr(signal, "pthread_sigmask") and hasattr(handler_class, "_popen")):
        yield
        return
    popen = handler_class._popen
    started = []

    def popen_with_sigint_held(self, *args, **kwargs):
        held = signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGINT])  # (the child inherits the mask)
        try:
            process = popen(self, *args, **kwargs)
            started.append(process)
            return process
        finally:  # (the launcher's own Ctrl-C meanwhile comes now)
            signal.pthread_sigmask(signal.SIG_SETMASK, held)

    handler_class._popen = popen_with_sigint_held
    try:
        yield
    finally:
        handler_class._popen = popen
        # torchrun has ended every rank it knows of. A Ctrl-C held while a rank was started comes
        # as its mask is given back, above, before torchrun has the rank: that rank, never told to
        # stop and deaf to SIGINT, lived on after the launcher (a rank waiting for its peers, for
        # the process group's timeout, holding the launcher's stderr for its caller)
        for process in started:
            if process.poll() is None:
                process.kill()
                process.wait()


@contextlib.contextmanager
def _rendezvous_shut_down_as_torchrun_ends(registry):
    """Within: each rendezvous torchrun's agent makes (`registry.get_rendezvous_handler`) is shut down
    as torchrun ends, however it ends. torchrun leaves it open when it is stopped by a signal (for
    the agents of other machines to rejoin), and with it its keep-alive thread, which sends a
    heartbeat through the store every 5 s. One that was inside the store's C++ call (the GIL let go)
    as the interpreter shut down found the GIL gone as it came back, was ended by Python there, in a
    destructor that may not be left so: "terminate called without an active exception", SIGABRT
    (exit -6), after the launcher's "stopped by SIGINT; every rank has ended" (`serve --sp 2` Ctrl-C'd
    under load). `shutdown` stops that thread, and waits for it, first. (--standalone: the rendezvous
    is this launcher's alone, its store in this process; nothing rejoins it.)"""
    get_handler = registry.get_rendezvous_handler
    handlers = []

    def get_handler_kept(params):
        handler = get_handler(params)
        handlers.append(handler)
        return handler

    registry.get_rendezvous_handler = get_handler_kept
    try:
        yield
    finally:
        registry.get_rendezvous_handler = get_handler
        for handler in handlers:
            # (a second shutdown, where torchrun made one, finds the rendezvous closed and does nothing.
            # An error closing it is not the run's: its heartbeats were stopped before anything could fail)
            with contextlib.suppress(Exception):
                handler.shutdown()


def _cut_off_mid_line(failures: dict) -> bool:
    """Whether rank 0, which draws the progress bar (`generate`), ended by a signal it could not
    act on (SIGKILL, a crash): its bar was cut off without its newline, and the launcher's line was
    glued to its end. (Stopped by SIGINT, SIGTERM or SIGHUP, or after another rank failed, it closes
    its bar.)"""
    rank_0 = failures.get(0)
    return rank_0 is not None and rank_0.exitcode < 0 and _stopped_by(rank_0.exitcode) is None


def _stopped_by(code: int) -> signal.Signals | None:
    """The stop (SIGINT, SIGTERM, SIGHUP) a rank that ended with exit code `code` was sent by itself
    (not by the launcher, which stops them all): it ends with 128 + the signal (`streamgen.cli`), or
    by the signal itself where it waits for the group (joining it; `serve --sp`'s followers while
    rank 0 loads the model), where `signals_end_the_process` leaves the signal its default action."""
    stops = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    return next((s for s in stops if code in (128 + int(s), -int(s))), None)


def _how_it_ended(code: int) -> str:
    """How a failed rank ended, in words: a rank stopped (`_stopped_by`) was not a crash, which
    "failed (exit code 130)" read as; one killed by a signal names it ("signal 9" said nothing of
    the out-of-memory killer, which sends SIGKILL)."""
    stopped_by = _stopped_by(code)
    if stopped_by == signal.SIGINT:
        return "was interrupted (SIGINT)"
    if stopped_by is not None:
        return f"was stopped by {stopped_by.name}"
    if code >= 0:
        return f"failed (exit code {code})"
    return f"failed ({killed_by(-code)})"


def killed_by(signum: int) -> str:
    """'killed by SIGNAL' of a process a signal ended: SIGKILL's likely sender named (a bare "signal 9"
    said nothing of the out-of-memory killer)."""
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    return f"killed by {name}" + (", as the kernel's out-of-memory killer does" if signum == signal.SIGKILL else "")


def _signal_behind(e: BaseException | None, signal_exception: type) -> BaseException | None:
    """The SignalException that `e` is, or that was being handled when `e` was raised.

    A signal that lands inside torchrun's metrics wrapper before it has read
    the clock comes out as an UnboundLocalError raised while handling the
    SignalException; the agent has stopped the ranks either way.
    """
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, signal_exception):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


if __name__ == "__main__":
    sys.exit(main())
