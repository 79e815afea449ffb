"""Lining sessions up so that the worker generates their chunks together (server/batching.py)."""

import asyncio
import concurrent.futures

import numpy as np
import pytest
from server_helpers import server_config

from server.batching import (
    SAME_SCHEDULE,
    BatchTimes,
    Due,
    Schedule,
    join_schedule,
    phase_groups,
    plan_batch,
    playout_delay,
    pull_into_batch,
)

CS = 0.32  # chunk period


def in_group(next_due: float, group_due: float, chunk_seconds: float) -> bool:
    """Whether a chunk due at `next_due` falls due on the schedule of a group due at `group_due`
    (this period or another)."""
    off = (next_due - group_due) % chunk_seconds
    return min(off, chunk_seconds - off) <= SAME_SCHEDULE


def lane_of(*dues: float, delay: float = 0.2) -> list[Due]:
    """A lane's clocks: sessions due at these times, each with this delay."""
    return [Due(due, due + delay) for due in dues]


def times(**per_k):
    """A batch-time function with these measured times (k1=0.03, k2=0.04, ...)."""
    bt = BatchTimes()
    for key, seconds in per_k.items():
        bt.observe(int(key[1:]), seconds)
    return bt.estimate


class Stream:
    """What a Session reads of its stream, for sessions whose chunks are never generated."""

    width = height = 64
    frames_per_chunk, chunk_seconds, audio_lookahead_seconds = 8, CS, 0.0

    def close(self):
        pass


def timed_worker(clock=None, **per_k):
    """A worker (not started) whose batch times, in all and to publish, are these (k1=0.06, ...),
    on `clock` (default the machine's)."""
    from server.metrics import ServerMetrics
    from server.scheduler import InferenceWorker

    worker = InferenceWorker(ServerMetrics(), **({} if clock is None else {"clock": clock}))
    for times_of in (worker.batch_times, worker.ready_times):
        for key, seconds in per_k.items():
            times_of.observe(int(key[1:]), seconds)
    return worker


def test_batch_times_average_per_size_and_estimate_the_sizes_not_seen():
    bt = BatchTimes(weight=0.5)
    assert bt.estimate(3) is None
    bt.observe(1, 0.030)
    assert bt.estimate(1) == 0.030
    assert bt.estimate(4) == pytest.approx(0.120)  # above the largest seen: its time per session
    bt.observe(1, 0.040)
    assert bt.estimate(1) == pytest.approx(0.035)
    bt.observe(4, 0.080)
    assert bt.estimate(2) == pytest.approx(0.035 + (0.080 - 0.035) / 3)  # between two: linear
    assert bt.estimate(8) == pytest.approx(0.160)
    bt2 = BatchTimes()
    bt2.observe(4, 0.080)
    assert bt2.estimate(2) == 0.080  # below the smallest seen: no longer than it


def test_a_size_not_timed_for_a_while_is_taken_no_slower_than_the_sizes_timed_since():
    bt = BatchTimes(weight=0.5, stale_after=10)
    bt.observe(6, 0.60)  # slow (a slowdown, or a bigger batch costing more a session)
    bt.observe(8, 0.16)  # fast (a pass's fixed cost shared)
    for _ in range(8):
        bt.observe(2, 0.06)
    assert bt.estimate(6) == pytest.approx(0.60)  # 9 batches timed since: as timed
    bt.observe(2, 0.06)
    bt.observe(2, 0.06)
    assert bt.estimate(6) == pytest.approx(0.18)  # at the time per session of 2, timed since
    assert bt.estimate(8) == pytest.approx(0.16)  # faster than that: kept (timed again once admitted)
    assert bt.estimate(7) == pytest.approx(0.17)


def test_plan_generates_what_is_due_and_waits_for_chunks_due_soon_that_fit_before_the_play_times():
    estimate = times(k1=0.03, k2=0.04)
    assert plan_batch(10.0, [], estimate) == ([], None)
    # nothing due: sleep until the first is
    assert plan_batch(10.0, [Due(10.05, 10.3), Due(10.02, 10.3)], estimate) == ([], pytest.approx(0.02))
    # due, and another due 30 ms later whose batch (40 ms, x1.2) still ends before 10.2: wait for it
    sessions = [Due(10.0, 10.2), Due(10.03, 10.5)]
    batch, wait = plan_batch(10.0, sessions, estimate)
    assert batch == [] and wait == pytest.approx(0.03)
    assert plan_batch(10.03, sessions, estimate) == ([0, 1], None)
    # the first plays too soon to wait for the second: it goes alone, now
    assert plan_batch(10.0, [Due(10.0, 10.06), Due(10.03, 10.5)], estimate) == ([0], None)
    # the later one's own play time is too close to the hold as well
    assert plan_batch(10.0, [Due(10.0, 10.5), Due(10.03, 10.06)], estimate) == ([0], None)
    # several due already go together, in the order they fell due; one far off is not waited for
    assert plan_batch(10.0, [Due(9.99, 10.2), Due(9.95, 10.2), Due(10.25, 10.6)], estimate) == ([1, 0], None)
    # no batch timed yet: nothing to go by, no waiting
    assert plan_batch(10.0, [Due(10.0, 10.9), Due(10.01, 10.9)], BatchTimes().estimate) == ([0], None)


def test_sessions_due_soon_after_a_batch_are_pulled_into_it_while_the_batch_fits():
    estimate = times(k1=0.03, k2=0.04, k3=0.05)

    def pulled(sessions, estimate=estimate, batch=(0,)):
        return [(i, round(sooner, 6)) for i, sooner in pull_into_batch(list(batch), sessions, estimate, CS, 1.0)]

    # 40 ms after the batch's due time (a repeated frame): pulled; 150 ms after: left to its own time
    assert pulled([Due(10.0, 10.1), Due(10.04, 10.14), Due(10.15, 10.25)]) == [(1, 0.04)]
    # several, in the order they fall due; the batch's latest due time is the schedule they join
    sessions = [Due(10.0, 10.1), Due(10.08, 10.2), Due(10.02, 10.12), Due(9.99, 10.09)]
    assert pulled(sessions, batch=(0, 3)) == [(2, 0.02), (1, 0.08)]
    # no bigger batch than 85% of the chunk period: a group that is full stays apart
    assert pulled(sessions, times(k1=0.2, k2=0.28, k3=0.3), batch=(0, 3)) == []
    assert pulled(sessions, times(k1=0.03, k2=0.04, k3=0.26), batch=(0, 3)) == [(2, 0.02)]
    # one whose delay would grow past its most (1 s): left to wait for the group's next batch,
    # which is published before it plays (nothing skipped) ...
    assert pulled([Due(10.0, 10.1), Due(10.04, 11.2)]) == []
    # ... pulled where that batch would come too late (`Session.generate_sooner` stops it at 1 s)
    over = [Due(10.0, 10.5), Due(10.08, 11.03)]
    assert pull_into_batch([0], over, times(k1=0.35, k2=0.4), 0.64, 1.0) == [(1, pytest.approx(0.08))]


def test_the_worker_generates_a_session_whose_clock_moved_with_its_group_and_sooner_from_then_on():
    """A repeated frame moved one session's clock 40 ms: holding its group's batch for it does not
    fit their 100 ms delay, so it is generated with them, 40 ms sooner from then on. (On the
    machine's clock, a worker that planned 40 ms after the clocks were set found both due, and
    generated them together without moving the one: 7 runs in 2000 under load.)"""
    from server.session import Session

    now = 100.0
    worker = timed_worker(lambda: now, k1=0.06, k2=0.07)
    loop = asyncio.new_event_loop()
    try:
        group = [Session(f"s{i}", Stream(), loop, 30.0) for i in range(2)]
        base = now + 0.1 - 0.001  # chunk 0 due 1 ms ago, with a delay of 0.1 s
        for s in group:
            s.streaming = True
            s.reschedule(base, 0.1)
            worker.add(s)
        moved = group[1]
        moved.move_clock(0.04)
        plays_at = moved.base
        _, batch, _ = worker._next(0)
        assert batch == group
        assert moved.next_due == pytest.approx(group[0].next_due, abs=1e-9) and moved.delay == pytest.approx(0.14)
        assert moved.base == plays_at  # its viewer sees nothing of it
    finally:
        loop.close()


def test_a_starting_session_takes_the_schedule_of_its_lanes_group():
    estimate = times(k1=0.03, k2=0.04)
    # alone on its lane: its own schedule
    assert join_schedule(100.0, 0.2, 1, CS, [], estimate) == Schedule(100.0, 0.2)
    joined = join_schedule(100.0, 0.2, 1, CS, lane_of(100.1), estimate)
    assert joined.joins == 100.1
    assert joined.delay == pytest.approx(playout_delay(0.04))  # sized for the batch of 2 it joins
    assert 100.0 <= joined.base < 100.0 + CS
    assert in_group(joined.base - joined.delay + 1 * CS, 100.1, CS)
    # a delay the operator fixed stays; the start still moves onto the schedule
    fixed = join_schedule(100.0, 0.3, 1, CS, lane_of(100.1), estimate, fixed_delay=True)
    assert fixed.delay == 0.3 and in_group(fixed.base - 0.3 + CS, 100.1, CS)
    # a smaller delay than the batch would need is kept (it covers less, but was asked for)
    assert join_schedule(100.0, 0.05, 1, CS, lane_of(100.1), estimate).delay == 0.05
    # the delay waits for the batch to be published; the group is full by the worker's whole time
    assert join_schedule(100.0, 0.5, 1, CS, lane_of(100.1), times(k2=0.2), times(k2=0.15)).delay == playout_delay(0.15)
    assert join_schedule(100.0, 0.5, 1, CS, lane_of(100.1), times(k2=0.3), times(k2=0.15)).joins is None


def test_a_starting_session_joins_the_group_it_can_start_with_soonest_and_never_a_full_one():
    estimate = times(k1=0.03, k2=0.04, k3=0.05)
    # groups due at 100.10 (two sessions, 3 ms apart count as one) and at 100.25
    lane = lane_of(100.10, 100.103, 100.25)
    joined = join_schedule(100.0, 0.2, 1, CS, lane, estimate)
    # either batch needs the 0.1 s floor of a delay; unaligned, its next chunk would fall due at
    # 100.22: the group at 100.25 is 30 ms away, the one at 100.10 200 ms
    assert joined == Schedule(pytest.approx(100.03), pytest.approx(0.1), 100.25)
    assert in_group(joined.base - joined.delay + CS, joined.joins, CS)
    # a group whose batch would outgrow 85% of the chunk period takes nobody more
    slow = times(k1=0.2, k2=0.3)
    assert join_schedule(100.0, 0.2, 1, CS, lane_of(100.1), slow) == Schedule(100.0, 0.2)
    assert in_group(100.1 + 3 * CS, 100.1, CS) and in_group(100.098, 100.1, CS) and not in_group(100.2, 100.1, CS)


def two_sessions_for_one_lane():
    """A registry over a worker (not started) whose batches of 1 and 2 take 0.06 and 0.09 s, and
    two sessions not yet streaming, each past its first chunk: (worker, registry, their event
    loop, first, second). The caller closes the loop."""
    from server.registry import SessionRegistry
    from server.session import Session

    worker = timed_worker(k1=0.06, k2=0.09)
    worker.chunk_time_ema = 0.06
    registry = SessionRegistry(server_config(playout_delay_s=None), worker, worker.metrics)
    loop = asyncio.new_event_loop()
    first, second = (Session(f"s{i}", Stream(), loop, 30.0) for i in range(2))
    first.chunk_index = second.chunk_index = 1
    return worker, registry, loop, first, second


def test_joining_holds_back_the_group_sessions_whose_delay_the_bigger_batch_outgrows():
    """They play later by the difference, once, and keep generating on the group's schedule; when
    the group shrinks again, they may come back down."""
    from server.session import Session

    worker, registry, loop, first, second = two_sessions_for_one_lane()
    try:
        registry.start_streaming(first, "websocket")
        assert first.delay == pytest.approx(playout_delay(0.06)) == 0.1  # alone: a batch of one
        due, base = first.next_due, first.base
        registry.start_streaming(second, "websocket")
        assert in_group(second.next_due, due, CS) and second.delay == pytest.approx(playout_delay(0.09))
        assert first.next_due == due  # the same schedule ...
        assert first.delay == pytest.approx(second.delay) and first.start_delay == first.delay
        assert first.base == pytest.approx(base + playout_delay(0.09) - 0.1)  # ... played later
        # the second leaves: the first may come back down to what a batch of one needs, once its
        # chunks keep arriving early (the floor moves; the delay itself comes down with them)
        held = first.delay
        worker.submit = lambda fn, *args, lane=0, force=False: done(fn(*args))
        loop.run_until_complete(registry.close(second, "test"))
        assert first.start_delay == pytest.approx(0.1) and first.delay == held
        for _ in range(Session.SLACK_WINDOW):
            first._lower_delay_when_early(0.2)
        assert first.delay == pytest.approx(0.1) and first.next_due == due
    finally:
        loop.close()


def test_joining_raises_the_floor_of_a_group_session_whose_delay_grew_past_the_bigger_batchs():
    """A session streaming alone (a 0.1 s delay) had chunks come late, which grew its delay to
    0.2 s; a second joins it, their batch needing 0.137 s. Its delay was longer already, so it was
    not held back, and its floor stayed at 0.1 s: with its chunks published 0.09 s after they fall
    due, the delay came down to 0.11 s, 20 ms (SLACK_KEEP) over that batch's time, where the other
    stays at the 0.137 s the batch needs; a late chunk then moves its clock off the group's
    schedule. Its floor is what the batch needs, as for the others."""
    from server.session import Session

    worker, registry, loop, first, second = two_sessions_for_one_lane()
    try:
        registry.start_streaming(first, "websocket")
        assert first.delay == pytest.approx(0.1)
        first._chunk_was_late(1, 0.1)
        first._chunk_was_late(2, 0.1)  # twice in a row: the load, the delay grows by as much
        assert first.delay == pytest.approx(0.2) and first.start_delay == pytest.approx(0.1)
        registry.start_streaming(second, "websocket")
        joined = playout_delay(0.09)
        assert second.delay == pytest.approx(joined) and joined < first.delay
        assert first.start_delay == pytest.approx(joined)
        for _ in range(Session.SLACK_WINDOW):  # published 0.09 s after falling due: early
            first._lower_delay_when_early(first.delay - 0.09)
        assert first.delay == pytest.approx(joined)
    finally:
        loop.close()


def done(result):
    future = concurrent.futures.Future()
    future.set_result(result)
    return future


class TimedStream(Stream):
    """A stream whose chunk takes the worker CHUNK_WORK seconds of a ManualClock."""

    CHUNK_WORK = 0.03

    def __init__(self, clock):
        self.clock, self.chunks = clock, 0

    def push_audio(self, pcm):
        pass

    def next_chunk(self):
        self.clock.pass_time(self.CHUNK_WORK)
        self.chunks += 1
        return np.zeros((self.frames_per_chunk, 8, 8, 3), np.uint8), (self.chunks - 1) * self.chunk_seconds

    def write_pending_chunk(self):
        pass


async def stream_two_on_a_manual_clock(monkeypatch, align_batches: bool):
    """Two sessions created and started streaming 100 ms apart, as WebSocket clients start them
    (`SessionRegistry.start_streaming`), then streamed for 2 s, the worker's lane and the sessions
    on a ManualClock: (the sessions, the worker's batch sizes counted by the batch_sessions metric)."""
    from manual_clock import ManualClock

    from server.metrics import ServerMetrics
    from server.registry import SessionRegistry
    from server.scheduler import InferenceWorker

    clock = ManualClock(100.0)
    worker = InferenceWorker(ServerMetrics(), align_batches=align_batches, clock=clock, wait=clock.wait)
    # the warm-up's one chunk (server/app.py)
    worker.chunk_time_ema = TimedStream.CHUNK_WORK
    for times_of in (worker.batch_times, worker.ready_times):
        times_of.observe(1, TimedStream.CHUNK_WORK)
    registry = SessionRegistry(server_config(), worker, worker.metrics)  # as `live_server` serves
    registry.ready, registry.chunk_seconds = True, CS
    monkeypatch.setattr(registry, "_new_stream", lambda *args: TimedStream(clock))
    worker.start()
    try:
        sessions = []
        for seed in range(2):
            session = await registry.create(np.zeros((64, 64, 3), np.uint8), None, seed)
            await session.preroll  # its first chunk, made while its client connects
            registry.start_streaming(session, "websocket")
            sessions.append(session)
            await clock.run_until(clock.now + 0.1)
        await clock.run_until(clock.now + 2.0)
    finally:
        worker.stop()
    counted = worker.metrics.registry.get_sample_value
    sizes = {k: counted("streamgen_batch_sessions_bucket", {"le": f"{k}.0"}) for k in (1, 2)}
    return sessions, {"1": sizes[1], "2": sizes[2] - sizes[1]}


async def test_sessions_streaming_together_have_their_chunks_generated_together(monkeypatch):
    """Two sessions started 100 ms apart: with alignment the second takes the first's schedule
    and the worker makes batches of both, of every chunk after its first; without it, their
    chunks fall due apart and the worker makes none. (On the machine's clock, on a live server,
    this failed 2 runs in 3 under load: chunks came late and the sessions' schedules drifted
    apart. On a ManualClock it checks the planning, not the machine's speed.)"""
    (first, second), batches = await stream_two_on_a_manual_clock(monkeypatch, align_batches=True)
    assert (first.next_due - second.next_due) % CS in (pytest.approx(0, abs=1e-6), pytest.approx(CS))
    assert second.chunk_index >= 6  # 2 s of chunks, and its first
    assert batches["2"] == second.chunk_index - 1, batches  # all but its first (made alone at its creation)

    (first, second), batches = await stream_two_on_a_manual_clock(monkeypatch, align_batches=False)
    assert second.chunk_index >= 6 and batches["2"] == 0, batches
    assert not in_group(first.next_due, second.next_due, CS)


def test_phase_groups_gather_sessions_due_together_in_any_period():
    # 100.10 and 100.42 are one period apart (a joiner's first due time); 100.318 and 100.001
    # sit 3 ms apart across the period's end (grouped 5 ms wide; by default as the worker batches,
    # REGROUP_WINDOW after a group's first)
    groups = phase_groups([100.10, 100.25, 100.42, 100.318, 100.001], CS, SAME_SCHEDULE)
    assert sorted(sorted(g) for g in groups) == [[100.001, 100.318], [100.10, 100.42], [100.25]]
    assert join_schedule(100.0, 0.3, 1, CS, lane_of(100.10, 100.42), times(k1=0.03)).joins in (100.10, 100.42)


def test_due_chunks_go_before_jobs_that_have_not_waited_long():
    """A new session's setup waits for the chunks that are due (its first chunk is not on any
    client's clock yet; theirs are); a job that has waited JOB_PATIENCE goes first regardless.
    (On a clock of its own: on the machine's, a worker that planned 0.2 s late found the chunk due
    again.)"""
    from types import SimpleNamespace

    from server.metrics import ServerMetrics
    from server.scheduler import JOB_PATIENCE, InferenceWorker

    now = 100.0
    worker = InferenceWorker(ServerMetrics(), clock=lambda: now)
    worker.batch_times.observe(1, 0.03)
    streaming = SimpleNamespace(id="s", lane=0, streaming=True, closed=False, next_due=now - 0.01, delay=0.2)
    streaming.due_and_delay = lambda: (streaming.next_due, streaming.delay)
    worker.add(streaming)
    job = worker.submit(print)
    assert worker._next(0)[1] == [streaming]  # the due chunk first
    streaming.next_due = now + 0.2
    assert worker._next(0)[0][0] is job  # nothing due: the job
    streaming.next_due = now - 0.01
    worker.submit(print)
    worker._jobs[0][0] = (*worker._jobs[0][0][:3], now - JOB_PATIENCE - 0.1)
    assert worker._next(0)[0] is not None  # waited long enough: before the due chunk


def served(server) -> None:
    """SessionClosingServer.run, as if it had served until stopped."""
    server.started = True


def test_serve_no_align_batches_reaches_the_server_config(monkeypatch):
    import server.app
    from streamgen.cli import main

    configs = []
    monkeypatch.setattr(server.app, "create_app", lambda config: configs.append(config))
    monkeypatch.setattr("server.uvicorn_server.SessionClosingServer.run", served)
    # (--port 0: serve binds before uvicorn's run; a port from free_port, let go, could be taken by
    # another test process meanwhile, and serve refused it)
    assert main(["serve", "--port", "0", "--model", "debug"]) == 0
    assert main(["serve", "--port", "0", "--model", "debug", "--no-align-batches"]) == 0
    assert [c.align_batches for c in configs] == [True, False]


def test_serve_offers_websocket_compression_only_when_asked(monkeypatch):
    """Every frame would be deflated in the event loop's thread: off unless --ws-compression."""
    from streamgen.cli import main

    configs = []
    run = "server.uvicorn_server.SessionClosingServer.run"
    monkeypatch.setattr(run, lambda server: configs.append(server.config) or served(server))
    assert main(["serve", "--port", "0", "--model", "debug"]) == 0
    assert main(["serve", "--port", "0", "--model", "debug", "--ws-compression"]) == 0
    assert [c.ws_per_message_deflate for c in configs] == [False, True]


@pytest.mark.timeout(20)
@pytest.mark.parametrize(
    ("dues", "chunk_seconds", "window"),
    [
        ([100.0, 100.1], CS, -0.01),  # took nothing: looped forever
        ([100.0, 100.1], CS, float("nan")),
        ([100.0, 100.1], CS, float("inf")),
        ([100.0, 100.1], 0.0, 0.09),  # divided by it
        ([100.0, 100.1], -CS, 0.09),  # one group of both
        ([100.0, 100.1], float("inf"), 0.09),
        ([100.0, 100.1], float("nan"), 0.09),
        ([100.0, float("nan")], CS, 0.09),
    ],
)
def test_phase_groups_refuse_a_window_chunk_period_or_due_time_out_of_range(dues, chunk_seconds, window):
    with pytest.raises(ValueError, match="chunk_seconds|window|due times"):
        phase_groups(dues, chunk_seconds, window)


def test_join_schedule_refuses_a_chunk_period_out_of_range():
    with pytest.raises(ValueError, match="chunk_seconds"):
        join_schedule(100.0, 0.2, 1, 0.0, lane_of(100.1), times(k1=0.03))
