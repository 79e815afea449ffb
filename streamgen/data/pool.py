"""A multiprocessing pool's work given as it is done, and its workers watched: `data make`'s shards
(and `eval train-evaluators`' clips) made in worker processes that a kill or the out-of-memory
killer may end."""

from __future__ import annotations

import itertools
import queue
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

# how often a make waiting for its pool's next shard looks whether a worker is gone
WORKER_CHECK_S = 1.0


def pool_processes() -> set[int]:
    """The pids of this process's live multiprocessing children (a Pool's workers among them)."""
    import multiprocessing

    return {p.pid for p in multiprocessing.active_children()}


def results_as_done(
    pool, func: Callable, jobs: Iterable, ahead: int, processes: set[int] = frozenset()
) -> Iterator:
    """`func(job)` of each of `jobs` in the processes of `pool` (a multiprocessing Pool), each result
    as soon as it is done, with no more than `ahead` jobs taken from `jobs` before their results are
    given: jobs that are a plan's, made as it is walked, are not all made first. A DataError if one
    of `processes` (the pool's, by pid: `pool_processes`) ends (killed: the out-of-memory killer, a
    kill -9): the pool starts another, and the job it had is never done, which was waited for for ever."""
    done: queue.SimpleQueue = queue.SimpleQueue()

    def done_badly(e: BaseException) -> None:
        done.put((False, e))

    jobs = iter(jobs)
    running = 0
    while True:
        for job in itertools.islice(jobs, max(0, ahead - running)):
            pool.apply_async(func, (job,), callback=lambda r: done.put((True, r)), error_callback=done_badly)
            running += 1
        if not running:
            return
        try:
            ok, result = done.get(timeout=WORKER_CHECK_S)
        except queue.Empty:
            gone = processes - pool_processes()
            if gone:
                from .shards import DataError

                raise DataError(
                    f"a worker process (pid {min(gone)}) ended before its shard was finished (killed? "
                    "out of memory?); run the same command again to go on from the shards finished"
                ) from None
            continue
        running -= 1
        if not ok:
            raise result
        yield result


@contextmanager
def worker_pool(workers: int, prefix: str):
    """A spawn Pool of `workers` whose temp files go to a folder of the caller's, removed after them
    (a worker ended by the pool's terminate, as an interrupted run's are, runs no clean-up: each
    left its espeak-ng data view, 244 files, in the system's temp folder), and whose workers leave
    interrupts to the parent. Left without an error, the workers end on their own (close and join),
    not terminated."""
    import multiprocessing as mp
    import tempfile

    with tempfile.TemporaryDirectory(prefix=prefix, ignore_cleanup_errors=True) as temp:
        with stops_held() as stops:
            pool = mp.get_context("spawn").Pool(workers, initializer=_start_worker, initargs=(temp,))
        with pool:  # (left by an error or a stop: its workers terminated)
            act_on(stops)  # a stop that came as they started: now that they all have
            yield pool
            pool.close()
            pool.join()


@contextmanager
def stops_held():
    """Within: a Ctrl-C, SIGTERM or SIGHUP is held, not acted on (in the main thread; elsewhere
    nothing is held); gives the list of those that came, for `act_on` after. One that came as a spawn
    Pool started its workers stopped the parent between a worker's start and the pickled start it
    writes to it: the worker, reading it, printed "EOFError: Ran out of input" and its traceback
    under the command's "terminated"."""
    import signal
    import threading

    came: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield came
        return
    stops = [s for s in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, s)]
    before = {name: signal.signal(getattr(signal, name), lambda signum, _: came.append(signum)) for name in stops}
    try:
        yield came
    finally:
        for name, handler in before.items():
            if handler is not None:  # (None: a handler not set from Python, left as it is)
                signal.signal(getattr(signal, name), handler)


def act_on(stops: list[int]) -> None:
    """The first of the stops `stops_held` held, given to its own handler now (an exception, or the
    default's end)."""
    import signal

    if stops:
        signal.raise_signal(stops[0])


def _start_worker(temp: str) -> None:
    """A pool worker's start: its temp files in `temp`, interrupts left to the parent."""
    import tempfile

    tempfile.tempdir = temp
    leave_interrupts_to_the_parent()


def leave_interrupts_to_the_parent() -> None:
    """A pool worker's start. A Ctrl-C goes to the terminal's whole process group: each worker
    printed its KeyboardInterrupt's traceback over what the command said; the parent, interrupted,
    stops them (the pool's terminate)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
