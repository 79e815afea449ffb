"""The worker's batches played out on a fake clock: which sessions it generates together, which
come late, and the groups a starting session joins and the capacity counts (server/batching.py,
server/scheduler.py). Split from test_server_alignment, whose helpers these share."""

import asyncio
import contextlib

import numpy as np
import pytest
from server_helpers import server_config
from test_server_alignment import CS, Stream, timed_worker, times

from server.batching import Due, plan_batch, playout_delay, pull_into_batch


def test_the_capacity_counts_the_batches_the_worker_runs_for_sessions_due_either_side_of_one():
    """Three sessions due 80 ms apart, the first to fall due 80 ms before the next (a clock moved:
    a late transport). The worker generates the first and pulls the second (80 ms later) into its
    batch, not the third (160 ms later): two batches a period from then on, 0.285 s of the lane's
    0.272 s (a pass's fixed cost twice). Grouped around the middle one's phase, 80 ms either side,
    the capacity counted one batch of 3 (0.165 s) and admitted 6 sessions more."""
    from types import SimpleNamespace

    import numpy as np

    from server.session import Session

    def batch_seconds(k):  # a pass's fixed cost and a little per session (a GPU's)
        return 0.12 + 0.015 * k

    clock = SimpleNamespace(now=100.0)
    worker = timed_worker(lambda: clock.now, **{f"k{k}": batch_seconds(k) for k in range(1, 9)})
    loop = asyncio.new_event_loop()
    try:
        sessions = [Session(f"s{i}", Stream(), loop, 30.0) for i in range(3)]
        for s, due in zip(sessions, (100.42, 100.5, 100.58)):
            s.streaming = True
            s.reschedule(due + 0.2, 0.2)
            worker.add(s)
        capacity = worker.capacity(CS, limit=16)
        batches, frames = [], np.zeros((Stream.frames_per_chunk, 8, 8, 3), np.uint8)
        while clock.now < 100.42 + 4 * CS and len(batches) < 50:
            _, batch, wait = worker._next(0)
            if not batch:
                clock.now += wait
                continue
            batches.append((clock.now, len(batch)))
            for s in batch:
                s.finish_chunk(frames, s.chunk_index * CS, 0.0, False)
            clock.now += batch_seconds(len(batch))
    finally:
        loop.close()
    last_period = [k for at, k in batches if at >= 100.42 + 3 * CS - 1e-9]
    assert sorted(last_period) == [1, 2]  # a pass's fixed cost twice: past the room
    assert sum(batch_seconds(k) for k in last_period) > 0.85 * CS
    assert capacity == 3  # the sessions streaming; none more


def run_lane(worker, clock, until: float, batch_seconds, ready_seconds=None) -> list[tuple[float, list, list]]:
    """Drive lane 0 of `worker` on the fake `clock` until `until`: each batch it plans is generated
    at once, published `ready_seconds(k)` after it starts (default `batch_seconds`) and done
    `batch_seconds(k)` after. Returns (start, sessions, the ones whose chunk came after its
    play time) for each batch."""
    ready_seconds = ready_seconds or batch_seconds
    batches = []
    while clock.now < until and len(batches) < 100:
        _, batch, wait = worker._next(0)
        if not batch:
            clock.now += wait
            continue
        published = clock.now + ready_seconds(len(batch))
        frames = np.zeros((batch[0].frames_per_chunk, 8, 8, 3), np.uint8)
        late = [s for s in batch if published > s.base + s.chunk_index * s.chunk_seconds + 1e-9]
        batches.append((clock.now, batch, late))
        for s in batch:
            s.finish_chunk(frames, s.chunk_index * s.chunk_seconds, 0.0, False)
        clock.now += batch_seconds(len(batch))
    return batches


class LongStream(Stream):
    """A stream of 16 frames a chunk: a 0.64 s chunk period."""

    frames_per_chunk, chunk_seconds = 16, 0.64


def worker_on_a_fake_clock(batch_seconds, largest: int, now: float):
    """A worker timed by `batch_seconds` for batches up to `largest`, and the clock the scheduler
    reads, set to `now` (its `now` is moved by `run_lane`): its sessions are made on it
    (`Session(..., clock=worker.clock)`, as the registry makes them)."""
    from types import SimpleNamespace

    clock = SimpleNamespace(now=now)
    return clock, timed_worker(lambda: clock.now, **{f"k{k}": batch_seconds(k) for k in range(1, largest + 1)})


def near_its_most(stream, batch_seconds, steady_batch: int, periods: int):
    """Two sessions on one schedule, both due at 100.0 (fake clock): one at the delay a batch of
    `steady_batch` needs, the other's delay grown to 0.95 s from there (its chunks came late),
    then its clock moved 80 ms (a late transport: it falls due at 100.08). The lane run for
    `periods` chunk periods: (the grown session, its play time before the run, the batches)."""
    from server.session import Session

    clock, worker = worker_on_a_fake_clock(batch_seconds, 4, 100.0)
    loop = asyncio.new_event_loop()
    try:
        steady, grown = (Session(f"s{i}", stream(), loop, 30.0, clock=worker.clock) for i in range(2))
        for s, delay in ((steady, playout_delay(batch_seconds(steady_batch))), (grown, 0.95)):
            s.streaming = True
            s.reschedule(100.0 + delay, delay)
            worker.add(s)
        grown.start_delay = steady.delay
        grown.move_clock(0.08)
        plays_at = grown.base
        batches = run_lane(worker, clock, 100.0 + periods * stream.chunk_seconds, batch_seconds)
    finally:
        loop.close()
    return grown, plays_at, batches


def test_a_session_whose_delay_is_near_its_most_is_still_generated_with_its_group():
    """A 0.64 s chunk period and a pass's fixed cost. The other's delay (0.54 s, for their batch)
    leaves no time to hold their batch for the grown one, and pulling it 80 ms sooner grows its
    delay past the most (1 s); due, it cannot wait for the other's next chunk either (0.56 s on,
    then the batch's time). The worker generated the two as a batch each, every period from then
    on: 0.7 s of work in a 0.64 s period, where one batch of both takes 0.4 s. Pulled, its delay
    stops at the most and the 30 ms over it play sooner (skipped, as when a grown delay comes
    down)."""
    from server.session import Session

    grown, plays_at, batches = near_its_most(LongStream, lambda k: 0.3 + 0.05 * k, 2, 4)
    assert [len(batch) for _, batch, _ in batches] == [2, 2, 2, 2]
    assert not any(late for _, _, late in batches)
    assert grown.delay == pytest.approx(Session.MAX_DELAY)
    assert grown.base == pytest.approx(plays_at - 0.03) and grown.rewound == pytest.approx(0.03)


def test_a_session_near_its_most_delay_that_can_wait_for_its_group_skips_nothing():
    """As above with a 0.32 s period: its batch can wait for the other's next chunk (published
    before its play time), so it is not pulled, and no speech is skipped to keep its delay at
    the most; it is generated with the other from then on, none late."""
    grown, plays_at, batches = near_its_most(Stream, lambda k: 0.1 + 0.02 * k, 2, 6)
    assert not any(late for _, _, late in batches)
    assert [len(batch) for _, batch, _ in batches][1:] == [2] * (len(batches) - 1)
    assert grown.base == pytest.approx(plays_at) and grown.rewound == 0


def test_a_session_near_its_most_delay_whose_group_cannot_hold_its_batch_is_pulled():
    """As above (0.32 s), but the other session's delay is its floor for a batch of its own (it
    streamed alone on its schedule): its play time leaves no room to hold the late one's batch
    for its next chunk (0.19 s of delay, 1.2 x 0.16 s needed), so the late one cannot wait for
    the group's next batch. Left out for its own play time alone, it ran a batch of its own every
    period (two batches of one, none of two, until its grown delay came down); pulled, the
    two are one batch from the first period on, its delay at its most and 30 ms skipped."""
    from server.session import Session

    grown, plays_at, batches = near_its_most(Stream, lambda k: 0.1 + 0.03 * k, 1, 6)
    assert not any(late for _, _, late in batches)
    assert [len(batch) for _, batch, _ in batches] == [2] * 6
    assert grown.delay == pytest.approx(Session.MAX_DELAY)
    assert grown.base == pytest.approx(plays_at - 0.03) and grown.rewound == pytest.approx(0.03)


def test_a_starting_session_joins_the_batch_the_worker_makes_of_sessions_due_close_together():
    """A lane's session due at 100.3 and two whose clocks moved 50 ms (due at 100.35): the worker
    makes one batch of the three (it pulls the two into the first one's), and their delays are
    sized for it. A session starting to stream there joined by groups 5 ms wide: the one at
    100.3 alone, a batch of 2 (so its delay was 0.15 s, what a batch of 2 needs), while the worker
    made a batch of 4 of it with the other three, published 0.2 s after it fell due: each of its
    chunks came after its play time. Grouped as the worker batches (and the capacity counts), it
    joins the batch of 4 with the delay that batch needs, and holds the three back to it."""
    from server.registry import SessionRegistry
    from server.session import Session

    def batch_seconds(k):
        return 0.05 * k

    clock, worker = worker_on_a_fake_clock(batch_seconds, 5, 100.0)
    worker.chunk_time_ema = batch_seconds(1)
    registry = SessionRegistry(server_config(playout_delay_s=None), worker, worker.metrics)
    loop = asyncio.new_event_loop()
    try:
        lane = [Session(f"s{i}", Stream(), loop, 30.0, clock=worker.clock) for i in range(3)]
        delay = playout_delay(batch_seconds(3))
        for s, due in zip(lane, (100.3, 100.35, 100.35)):
            s.streaming = True
            s.reschedule(due + delay, delay)
            worker.add(s)
        joiner = Session("joiner", Stream(), loop, 30.0, clock=worker.clock)
        joiner.chunk_index = 1  # its first chunk was made at its creation
        registry.start_streaming(joiner, "websocket")
        assert joiner.delay == pytest.approx(playout_delay(batch_seconds(4)))
        assert all(s.delay >= joiner.delay for s in lane)
        batches = run_lane(worker, clock, 100.3 + 3 * CS, batch_seconds)
    finally:
        loop.close()
    assert [len(batch) for _, batch, _ in batches] == [4, 4, 4]
    assert not any(late for _, _, late in batches)


@contextlib.contextmanager
def a_lane_and_a_joiner(batch_seconds, phases, delays):
    """A worker on a fake clock at a period's start (99.84) with sessions due at these phases of
    the period with these delays, and a session started on the lane there by
    `SessionRegistry.start_streaming`: (the period's start, the clock, the worker, the lane's
    sessions, the joiner)."""
    from server.registry import SessionRegistry
    from server.session import Session

    start = 312 * CS
    clock, worker = worker_on_a_fake_clock(batch_seconds, 8, start)
    worker.chunk_time_ema = batch_seconds(1)
    registry = SessionRegistry(server_config(playout_delay_s=None), worker, worker.metrics)
    loop = asyncio.new_event_loop()
    try:
        lane = [Session(f"s{i}", Stream(), loop, 30.0, clock=worker.clock) for i in range(len(phases))]
        for s, phase, delay in zip(lane, phases, delays):
            s.streaming = True
            s.reschedule(start + phase + delay, delay)
            worker.add(s)
        joiner = Session("joiner", Stream(), loop, 30.0, clock=worker.clock)
        joiner.chunk_index = 1  # its first chunk was made at its creation
        registry.start_streaming(joiner, "websocket")
        yield start, clock, worker, lane, joiner
    finally:
        loop.close()


def joiners_batches(batches, joiner) -> list[set[str]]:
    """The sessions generated with `joiner`, batch by batch (`run_lane`'s batches)."""
    return [{s.id for s in batch} for _, batch, _ in batches if joiner in batch]


def test_a_starting_session_joins_the_batch_the_worker_makes_of_a_chain_of_pulls():
    """Four sessions due apart in the period (fake clock): .28 and .30, .01 and .08, their delays
    sized for the pairs. Grouped from the period's start they are two pairs, but the worker made
    one batch of them: the batch at .01 pulled the one at .08, and the batch at .28 then both. A
    session starting to stream at .00 joined the .28 pair as a batch of 3, its delay sized for
    that, and was generated in a batch of 5: it and the .28 one were late in two of the four
    periods. The worker now pulls none that makes a batch in time late (`pull_into_batch`), so the
    batch at .28 takes the one at .01 alone; the joiner joins the one at .08, as the worker
    batches them, with the delay that batch needs, and holds the .08 one back to it; none is late."""

    def batch_seconds(k):
        return 0.05 + 0.02 * k

    delay = playout_delay(batch_seconds(2))
    with a_lane_and_a_joiner(batch_seconds, (0.28, 0.30, 0.01, 0.08), [delay] * 4) as (
        start, clock, worker, lane, joiner,
    ):  # fmt: skip
        joined = joiner.delay
        batches = run_lane(worker, clock, start + 4 * CS, batch_seconds)
    together = joiners_batches(batches, joiner)
    assert together[-3:] == [{"s3", "joiner"}] * 3
    assert joined >= playout_delay(batch_seconds(2)) and lane[3].delay >= joined
    assert not any(late for _, _, late in batches)


def random_lane(rng, start: float):
    """A lane as the worker may hold it: 1 to 8 sessions due anywhere in a period from `start`, each
    with a delay sized for a batch of 1 to 8 or grown (up to the most), and batch times of a pass's
    fixed cost and a cost per session."""
    n = int(rng.integers(1, 9))
    fixed, per_session = float(rng.uniform(0.0, 0.12)), float(rng.uniform(0.005, 0.04))

    def batch_seconds(k):
        return fixed + per_session * k

    dues = [start + float(rng.uniform(0, CS)) for _ in range(n)]
    sized = [playout_delay(batch_seconds(int(rng.integers(1, 9)))) for _ in range(n)]
    delays = [delay if rng.random() < 0.7 else float(rng.uniform(0.1, 1.0)) for delay in sized]
    return dues, delays, batch_seconds


def worker_groups_on_a_fake_clock(dues, delays, batch_seconds) -> list[set[int]]:
    """The sessions (indices into `dues`) the real worker last generated in one batch, each, over
    GROUPING_PERIODS chunk periods from the earliest due time (`run_lane`)."""
    from server.batching import GROUPING_PERIODS
    from server.session import Session

    first = min(dues)
    clock, worker = worker_on_a_fake_clock(batch_seconds, 16, first)
    loop = asyncio.new_event_loop()
    try:
        sessions = [Session(f"s{i}", Stream(), loop, 30.0, clock=worker.clock) for i in range(len(dues))]
        for s, due, delay in zip(sessions, dues, delays):
            s.streaming = True
            s.reschedule(due + delay, delay)
            worker.add(s)
        last_batch = {}
        batches = run_lane(worker, clock, first + GROUPING_PERIODS * CS, batch_seconds)
        for b, (_, batch, _) in enumerate(batches):
            for s in batch:
                last_batch[sessions.index(s)] = b
    finally:
        loop.close()
    groups = {}
    for i, b in last_batch.items():
        groups.setdefault(b, set()).add(i)
    return sorted(groups.values(), key=min)


def test_lane_groups_are_the_batches_the_worker_makes():
    """Random lanes (seeded): the groups a starting session joins and the capacity counts are the
    batches the worker makes of the lane's sessions, its holds (`plan_batch`), pulls, headroom and
    most delay (`pull_into_batch`) and all. Played out with the pull window alone, the groups
    differed from the worker's batches in 156 of 300 lanes (143 and 147 with seeds 8 and 9)."""
    from server.batching import lane_group_indices

    rng = np.random.default_rng(7)
    differ = []
    for lane_index in range(300):
        dues, delays, batch_seconds = random_lane(rng, 100.0 + lane_index)
        worker = worker_groups_on_a_fake_clock(dues, delays, batch_seconds)
        lane = [Due(due, due + delay) for due, delay in zip(dues, delays)]
        times_of = times(**{f"k{k}": batch_seconds(k) for k in range(1, 17)})
        played = lane_group_indices(lane, CS, times_of, times_of, 1.0)
        if sorted(map(set, played), key=min) != worker:
            differ.append((dues, delays, played, worker))
    assert not differ, (len(differ), differ[:3])


def test_a_starting_session_joining_a_batch_the_worker_holds_has_its_delay_cover_the_hold():
    """Four sessions due at .03, .078, .16 and .274 of a period (fake clock), their delays sized
    for batches of 8, 4, 3 and 4. The worker batches the first three at .078, then holds the one
    at .274 for the first's next chunk (.35). (It pulled the other two into that batch too, a
    batch of 4: a session starting to stream there joined it with the delay a batch of 5 needs
    once due, and it and the .274 one were late every period; it now pulls none that makes a
    batch in time late.) The .078 one's batch then waits for the worker, busy with that batch
    till .452: a session joining it needs the delay of its batch of 2 and that wait, 54 ms.
    Sized for the batch alone, its chunks would be late; none is."""

    def batch_seconds(k):
        return 0.012 + 0.03 * k

    phases, sized_for = (0.274, 0.03, 0.16, 0.078), (4, 8, 3, 4)
    delays = [playout_delay(batch_seconds(k)) for k in sized_for]
    with a_lane_and_a_joiner(batch_seconds, phases, delays) as (start, clock, worker, lane, joiner):
        joined = joiner.delay
        batches = run_lane(worker, clock, start + 5 * CS, batch_seconds)
    together = joiners_batches(batches, joiner)
    assert together[-3:] == [{"s3", "joiner"}] * 3
    assert joined == pytest.approx(playout_delay(batch_seconds(2)) + 0.054, abs=1e-3)
    assert not any(late for _, _, late in batches)


def test_a_pull_does_not_make_a_batch_that_was_in_time_late():
    """One session due at 100.0 that plays 0.1 s later (fake clock), another due 30 ms after it
    with a long delay: a batch of 1 is published in 0.08 s, of 2 in 0.12 s. `plan_batch` does not
    hold the first's batch for the second (a batch of 2 would be late), but `pull_into_batch`
    grew it by the second all the same (it fits the period's headroom, and it is due within the
    window), and the first's chunk came 20 ms late. Told what publishing takes, it pulls none
    that makes a batch in time late: the first is generated alone, in time, and the second when
    it falls due."""
    from server.session import Session

    def batch_seconds(k):
        return 0.04 + 0.04 * k

    lane = [Due(100.0, 100.1), Due(100.03, 100.53)]
    estimate = times(k1=batch_seconds(1), k2=batch_seconds(2))
    assert plan_batch(100.0, lane, estimate) == ([0], None)
    assert pull_into_batch([0], lane, estimate, CS, 1.0) == [(1, pytest.approx(0.03))]  # as before
    assert pull_into_batch([0], lane, estimate, CS, 1.0, ready_time=estimate, now=100.0) == []
    # a batch that is late already may still grow (left out, the session would cost a pass alone)
    assert pull_into_batch([0], lane, estimate, CS, 1.0, ready_time=estimate, now=100.03) == [(1, pytest.approx(0.03))]

    clock, worker = worker_on_a_fake_clock(batch_seconds, 2, 100.0)
    loop = asyncio.new_event_loop()
    try:
        sessions = [Session(f"s{i}", Stream(), loop, 30.0, clock=worker.clock) for i in range(2)]
        for s, due in zip(sessions, lane):
            s.streaming = True
            s.reschedule(due.plays_at, due.plays_at - due.next_due)
            worker.add(s)
        batches = run_lane(worker, clock, 100.0 + CS, batch_seconds)
    finally:
        loop.close()
    assert [[s.id for s in batch] for _, batch, _ in batches[:2]] == [["s0"], ["s1"]]
    assert not any(late for _, _, late in batches)
