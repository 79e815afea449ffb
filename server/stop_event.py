"""The server's stop, as an event both its threads and its coroutines wait on.

Whether the stop has begun is asked one way: this event is set. The signal's handler and the
shutdown set it (server/uvicorn_server.py, app.py), and so does a model host's own `stop`, which
is handed it; the hosts ask it (`StopsWithTheServer.stop_begun`, which both inherit), and
the registry too, with its worker's stop (`SessionRegistry.stop_begun`, `ended_with_the_stop`,
which the refusals of creates, captions and speaks give their answer by). A host that kept its own
flag besides took its own stop for the stop where the other host did not."""

from __future__ import annotations

import asyncio
import threading


class StopBegun(threading.Event):
    """Set as the server begins to stop: an Event the hosts' threads read, which also wakes the
    coroutines that wait for something else meanwhile (`wake_at_set`)."""

    def __init__(self):
        super().__init__()
        # the Event's own lock, re-entrant too: a second signal (Ctrl-C pressed again, a SIGTERM after
        # it) runs the handler's set() again on the main thread, which may be inside the first set()
        # (or the shutdown's, on the event loop) holding it; a plain lock hung the server there
        self._cond = threading.Condition(threading.RLock())
        self._waiters: dict[asyncio.Future, object] = {}  # -> its waker
        # re-entrant: uvicorn's signal handler sets it on the main thread between two bytecodes,
        # which may be inside this bookkeeping on the event loop (a plain lock: a hang at Ctrl-C)
        self._waiters_lock = threading.RLock()

    def set(self) -> None:
        super().set()
        with self._waiters_lock:
            wakes = list(self._waiters.values())
        for wake in wakes:
            wake(None)

    def wake_at_set(self, waiter: asyncio.Future) -> None:
        """End `waiter` (on its loop) once this is set, or at once if it is."""
        wake = waker(waiter)
        with self._waiters_lock:
            self._waiters[waiter] = wake
        if self.is_set():  # (set before it was held: set() may not have seen it)
            wake(None)

    def forget(self, waiter: asyncio.Future) -> None:
        with self._waiters_lock:
            self._waiters.pop(waiter, None)


class StopsWithTheServer:
    """A model host's part in the server's stop (ModelHost, SequenceParallelHost: each wrote it out,
    each saying it asked as the other did). `stopping` is the server's StopBegun, handed in, or the
    host's own where it has no server (a test's, a bench's); the host's own `stop` sets it, so that
    what ends from then on, whoever began the stop, ends with it, not as a failure."""

    stopping: threading.Event

    def share_the_stop(self, stopping: threading.Event | None) -> None:
        self.stopping = stopping if stopping is not None else threading.Event()

    def stop_begun(self) -> bool:
        """Whether the server's stop (or this host's own) has begun."""
        return self.stopping.is_set()


def waker(waiter: asyncio.Future):
    """A concurrent future's done callback (on whichever thread finishes it) that ends `waiter`, on
    its loop, unless it is done (ended by another, or cancelled with its caller)."""
    loop = waiter.get_loop()

    def end() -> None:
        if not waiter.done():
            waiter.set_result(None)

    def wake(_done) -> None:
        try:
            loop.call_soon_threadsafe(end)
        except RuntimeError:  # the event loop is closed: the server is gone
            pass

    return wake
