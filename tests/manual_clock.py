"""A clock that a test moves, for the inference worker to plan, time its batches and sleep by.

`InferenceWorker(clock=clock, wait=clock.wait)`: the worker's lanes sleep on it, and the test
moves it from one of their wake-ups to the next (`run_until`) once they are all asleep, so what
the worker does depends on its planning alone, never on how fast the machine runs it (under load,
a test on the machine's clock saw its sessions' schedules drift apart as chunks came late).
Work takes the time the test gives it (`pass_time`, from a stream's chunk)."""

from __future__ import annotations

import asyncio
import math
import threading
import time

SLEEP_BOUND_S = 1.0  # real seconds a lane sleeps at most before it plans again (a wake-up missed)
SETTLE_TIMEOUT_S = 30.0  # real seconds the lanes have to go back to sleep after a wake-up
MOST_WAKE_UPS = 10_000  # wake-ups `run_until` moves the clock through at most


class ManualClock:
    def __init__(self, now: float = 100.0):
        self.now = now
        self._lock = threading.Lock()
        # the lanes asleep: thread id -> (the condition it sleeps on, the clock's time it wakes at)
        self._asleep: dict[int, tuple[threading.Condition, float]] = {}

    def __call__(self) -> float:
        return self.now

    def pass_time(self, seconds: float) -> None:
        """Work that takes `seconds` (a lane's chunk): the clock moves on, no one is woken."""
        self.now += seconds

    def wait(self, condition: threading.Condition, seconds: float | None) -> None:
        """A lane's sleep, `condition` held: until notified, or until the test moves the clock
        (`settle`), which wakes it to plan again at the time it has come to."""
        wakes = math.inf if seconds is None else self.now + seconds
        me = threading.get_ident()
        with self._lock:
            self._asleep[me] = (condition, wakes)
        try:
            condition.wait(SLEEP_BOUND_S)
        finally:
            with self._lock:
                self._asleep.pop(me, None)

    async def settle(self, lanes: int = 1) -> float:
        """Wake every lane asleep to plan again at the clock's time, wait until `lanes` of them are
        asleep again and the event loop has run what they handed it (their chunks' publishing):
        the earliest time one of them is to wake (inf: none has anything to wait for)."""
        with self._lock:
            sleepers, self._asleep = list(self._asleep.values()), {}
        for condition, _ in sleepers:
            with condition:
                condition.notify_all()
        give_up = time.monotonic() + SETTLE_TIMEOUT_S
        while True:
            with self._lock:
                if len(self._asleep) >= lanes:
                    wakes = min(at for _, at in self._asleep.values())
                    break
            if time.monotonic() > give_up:
                raise AssertionError(f"the worker's lanes did not go back to sleep in {SETTLE_TIMEOUT_S} s")
            await asyncio.sleep(0.001)
        await asyncio.sleep(0)  # (the callbacks the lanes queued on the loop run before this task)
        return wakes

    async def run_until(self, until: float, lanes: int = 1) -> None:
        """Move the clock to `until` as the machine's would pass: to each time a lane is to wake,
        where it plans again (and generates what is due, the clock passing as it works)."""
        for _ in range(MOST_WAKE_UPS):
            wakes = await self.settle(lanes)
            if wakes > until:
                break
            self.now = max(self.now, wakes)
        else:
            raise AssertionError(f"the worker woke more than {MOST_WAKE_UPS} times before {until}")
        self.now = max(self.now, until)
        await self.settle(lanes)
