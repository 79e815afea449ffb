"""One writer at a time in a folder: an export into a folder written in place (`streamgen.folders`)
waits for the one before it; a job that writes a folder of outputs (`data make`, `eval`) is refused
while another such job writes there (`no_other_writer`).

Two exports of one host that both read the folder's old export stamp before either wrote its own
each found its own "writing" stamp at some point, and the first to end wrote "done" while the
other still renamed its files in: a reader took the mix as whole until that one ended "cut short".
The folder's lock (flock) keeps them apart; the kernel releases it where the writer dies.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

# how long an export into a folder in place waits for another export's lock on it before it gives
# up (`ExportLocked`): several times what writing the largest model exported here takes (Wan-14B's
# 56 GB at 100 MB/s, ~10 min), so that only a writer that is stuck (stopped, hung on its disk) is
# given up on, and a script that exports is told so rather than left waiting for ever
LOCK_WAIT_S = 30 * 60
# how often a waiting export says again that it waits, and for whom
LOCK_WAIT_NOTICE_S = 60.0
# the first pause between two tries for the lock (doubled each time, to at most 1 s)
_LOCK_POLL_S = 0.05


class ExportLocked(TimeoutError):
    """An export into a folder in place gave up waiting for another export's lock on it."""


@contextlib.contextmanager
def one_export_at_a_time(path: Path, holder: Callable[[], str]):
    """The folder `path` locked against the other exports into it in place; gives whether the
    lock is held. `holder()` says who holds it (for the messages).

    Where another export holds it, this one waits: a WARNING names the holder, again each
    `LOCK_WAIT_NOTICE_S`; after `LOCK_WAIT_S` it gives up (`ExportLocked`), the folder as it was.

    What is locked is the folder itself (a read-only descriptor of it). Where it cannot be (not
    POSIX, a system that opens no folder, a file system that refuses the lock: ENOLCK, EOPNOTSUPP)
    the export stamps alone tell. On NFS, Linux takes a file's flock to the server as a
    byte-range lock (since 2.6.12), but NFS has no lock of a folder: a folder's flock is the
    client's own, and keeps out the exports of this host only; those of another host sharing the
    folder are told apart by the stamps alone."""
    fd = _folder_locked(path, holder)
    try:
        yield fd is not None
    finally:
        if fd is not None:
            os.close(fd)  # (the lock with it)


@contextlib.contextmanager
def no_other_writer(path: Path, busy: Callable[[], Exception]):
    """The folder `path` locked for this job alone, or `busy()` raised where another job holds it
    (refused, not made to wait: two jobs into one folder wrote over each other's outputs, one's
    clean-up removed the other's, and both said they were done). The lock is the folder's flock
    (no file left in it), gone with the process however it ends; where the folder cannot be
    locked (as for `one_export_at_a_time`), jobs are not kept apart."""
    try:
        import fcntl

        fd = os.open(path, os.O_RDONLY)
    except (ImportError, OSError):  # (not POSIX; a system that opens no folder)
        fd = None
    if fd is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise busy() from None
        except OSError:  # (a file system that refuses the lock: ENOLCK, EOPNOTSUPP)
            pass
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # (the lock with it)


def _folder_locked(path: Path, holder: Callable[[], str]) -> int | None:
    """A descriptor of the folder `path` that holds its lock, once it is free; None where the
    folder cannot be locked. (Not a context manager that yields in its except blocks: the caller's
    error was chained to the lock's.)"""
    try:
        import fcntl
    except ImportError:  # (not POSIX)
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # (a system that opens no folder)
        return None
    locked = False
    try:
        locked = _wait_for_lock(path, fd, fcntl, holder)
    finally:
        if not locked:
            os.close(fd)
    return fd if locked else None


def _wait_for_lock(path: Path, fd: int, fcntl, holder: Callable[[], str]) -> bool:
    """Whether the lock on the folder `path` (open as `fd`) is held, tried without blocking until
    it is free (a blocking flock can neither be given up on nor say whom it waits for); False
    where the file system refuses it; `ExportLocked` after `LOCK_WAIT_S`."""
    started, noticed, pause = time.monotonic(), None, _LOCK_POLL_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            pass
        except OSError as e:
            log.info("%s: cannot be locked (%s); the export stamps alone tell", path, e.strerror)
            return False
        now = time.monotonic()
        if now - started >= LOCK_WAIT_S:
            raise ExportLocked(
                f"{path}: gave up after {now - started:.0f} s waiting for another export into it "
                f"({holder()}), which still holds its lock; the folder is as it was: "
                "export again once that one is done (or stop it, where it is stuck)"
            )
        if noticed is None or now - noticed >= LOCK_WAIT_NOTICE_S:
            log.warning(
                "%s: another export into it (%s) holds its lock; this export waits for it "
                "(%.0f s so far, at most %.0f s)", path, holder(), now - started, LOCK_WAIT_S,
            )  # fmt: skip
            noticed = now
        time.sleep(pause)
        pause = min(pause * 2, 1.0)
