"""One watchdog thread per model host, bounding each operation by `--model-timeout`.

A host runs one operation at a time; while one is bounded it is `armed` with its deadline and
what to do if it is still under way then (`overdue`), and `disarm`ed as it ends. A thread per
operation did this before (ModelHost's send in a thread of its own, SequenceParallelHost's
threading.Timer): 0.25 ms of CPU and 0.4-0.8 ms a call on the loaded 2-core machine, on every
chunk; arming and disarming take 2 us of CPU. The thread is started with the first bounded
operation and lives until the host stops; arming wakes it only where it would otherwise sleep
past the new deadline (at its first, and after it has found nothing armed), so most operations
cost it no thread switch at all."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable

log = logging.getLogger("streamgen.server")


class Bound:
    """One operation's deadline, as armed; `fired` once its `overdue` has run."""

    __slots__ = ("deadline", "overdue", "fired")

    def __init__(self, deadline: float, overdue: Callable[[], None]):
        self.deadline, self.overdue, self.fired = deadline, overdue, False


class DeadlineWatchdog:
    def __init__(self, name: str):
        self.name = name  # its thread's
        self._changed = threading.Condition()
        self._armed: Bound | None = None
        self._wakes_at = math.inf  # when the thread next looks (inf: only when woken)
        self._thread: threading.Thread | None = None
        self._stopped = False

    def arm(self, deadline: float, overdue: Callable[[], None]) -> Bound:
        """Run `overdue` on the watchdog's thread at `deadline` (time.monotonic()), unless the bound
        returned is disarmed first. One bound at a time: a host runs one operation at a time."""
        bound = Bound(deadline, overdue)
        with self._changed:
            if self._stopped:  # (the host's stop: nothing more is bounded, nor run)
                return bound
            self._armed = bound
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name=self.name, daemon=True)
                self._thread.start()
            elif deadline < self._wakes_at:  # (else it looks at it as it wakes for an earlier one)
                self._changed.notify()
        return bound

    def disarm(self, bound: Bound) -> bool:
        """End `bound` as its operation ends: whether its `overdue` ran. One that is running as this
        is called has run to its end when this returns (the two are under one lock): the caller
        sees what it did."""
        with self._changed:
            if self._armed is bound:
                self._armed = None
            return bound.fired

    def stop(self) -> None:
        """End the thread (with the host): an operation armed now is not taken for overdue."""
        with self._changed:
            self._stopped, self._armed = True, None
            self._changed.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5)

    def _watch(self) -> None:
        with self._changed:
            while not self._stopped:
                bound = self._armed
                left = math.inf if bound is None else bound.deadline - time.monotonic()
                if left > 0:
                    self._wakes_at = math.inf if bound is None else bound.deadline
                    self._changed.wait(None if bound is None else left)
                    continue
                # (held while it runs: `disarm` returns once it has, and no other bound is armed meanwhile)
                self._armed, bound.fired = None, True
                try:
                    bound.overdue()
                except Exception:  # (the watchdog watches on: the host says why it is down)
                    log.exception("%s: an overdue operation's handling failed", self.name)
