"""The inference worker batches sessions that are due together; each gets the chunk it would get alone."""

import asyncio
import time
from types import SimpleNamespace

import numpy as np
import pytest
from server_helpers import small_model

from server.batching import BatchTimes
from server.metrics import ServerMetrics
from server.registry import SessionRegistry
from server.scheduler import InferenceWorker
from server.session import Session
from streamgen.stream import StreamSession


def make_sessions(loop, seeds):
    sessions = []
    for seed in seeds:
        stream = StreamSession(small_model())
        face = (np.random.default_rng(seed).random((64, 64, 3)) * 255).astype(np.uint8)
        stream.start(face, seed=seed)
        session = Session(f"s{seed}", stream, loop, max_audio_ahead_s=30.0)
        t = np.arange(16000 * 3) / 16000
        session.timeline.append((0.3 * np.sin(2 * np.pi * (150 + 40 * seed) * t)).astype(np.float32))
        sessions.append(session)
    return sessions


def test_due_sessions_share_forward_passes_and_get_their_own_chunks():
    loop = asyncio.new_event_loop()
    try:
        worker = InferenceWorker(ServerMetrics())
        batched = make_sessions(loop, [1, 2, 3])
        alone = make_sessions(loop, [1, 2, 3])
        for _ in range(5):  # past the cache window, so all three sit at the same fill level
            together = worker.run_chunks(batched)
            one_by_one = [worker.run_chunk(s) for s in alone]
            for a, b in zip(together, one_by_one):
                assert a.index == b.index and a.pts == b.pts
                assert np.abs(a.frames.astype(int) - b.frames.astype(int)).max() <= 1
                assert np.array_equal(a.audio, b.audio)
        assert not np.array_equal(together[0].frames, together[1].frames)
        assert worker.chunk_time_ema > 0
    finally:
        loop.close()


def test_the_worker_publishes_each_chunk_before_writing_it_into_the_cache():
    """The clean re-encode of a chunk runs once its frames are on their way, not on the next
    chunk's latency; the worker's time per chunk (capacity) still counts it."""
    loop = asyncio.new_event_loop()
    try:
        worker = InferenceWorker(ServerMetrics())
        for group in (make_sessions(loop, [1]), make_sessions(loop, [2, 3])):  # alone and batched
            pending_at_publish = []

            def publish(session, chunk, seen=pending_at_publish):
                seen.append(session.stream.chunk_pending)

            worker.run_chunks(group, publish=publish)
            assert pending_at_publish == [True] * len(group)
            assert not any(s.stream.chunk_pending for s in group)
            assert all(s.stream.cache.filled == s.stream.cfg.frames_per_chunk for s in group)
    finally:
        loop.close()


def test_lanes_serve_their_own_sessions_on_their_own_threads():
    """With two lanes, a session is generated, and its jobs run, only on its lane's thread; one
    lane's work never waits for the other's (server --lanes)."""
    import threading
    import time

    loop = asyncio.new_event_loop()
    worker = InferenceWorker(ServerMetrics(), lanes=2, torch_threads=1)
    try:
        sessions = make_sessions(loop, [1, 2])
        assert [worker.take_lane() for _ in sessions] == [0, 1]  # the least loaded lane each
        threads = {s.id: set() for s in sessions}
        for lane, s in enumerate(sessions):
            s.lane = lane
            generate = s.stream.next_chunk

            def recording(*args, s=s, generate=generate):
                threads[s.id].add(threading.current_thread().name)
                return generate(*args)

            s.stream.next_chunk = recording
        worker.start()
        # lane 1 busy with a job of its session: lane 0 keeps working meanwhile
        release = threading.Event()
        blocked = worker.submit(release.wait, 10, lane=1)
        on_lane_0 = worker.submit(threading.current_thread, lane=0).result(timeout=10)
        assert on_lane_0.name == "inference-worker-0" and not blocked.done()
        release.set()
        assert blocked.result(timeout=10) is True
        on_lane_1 = worker.submit(threading.current_thread, lane=1).result(timeout=10)
        assert on_lane_1.name == "inference-worker-1"
        for s in sessions:  # stream: due now, every chunk period
            s.attach("websocket", 0.2, 0.0)
            worker.add(s)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not all(s.chunk_index >= 3 for s in sessions):
            time.sleep(0.05)
        assert all(s.chunk_index >= 3 for s in sessions)
        assert threads == {"s1": {"inference-worker-0"}, "s2": {"inference-worker-1"}}
        assert worker.metrics.registry.get_sample_value("streamgen_worker_busy_seconds_total") > 0
        worker.stop()  # (its lanes would go on measuring their batches' times)
        worker.batch_times = BatchTimes()
        worker.batch_times.observe(1, 0.1)  # 2 sessions a lane in real time at 0.32 s a chunk, with headroom
        assert worker.capacity(0.32, limit=8) == 4 and worker.capacity(0.32, limit=3) == 3
        worker.batch_times = BatchTimes()
        worker.batch_times.observe(1, 0.25)  # 30% headroom with lanes: under one session a lane, one each
        assert worker.capacity(0.32, limit=8) == 2
        # a session joining a lane waits for that lane's round only: the other lane runs beside it
        from server.config import ServerConfig
        from server.registry import SessionRegistry

        registry = SessionRegistry(ServerConfig(), worker, ServerMetrics())
        worker.chunk_time_ema = 0.1
        alone = registry.playout_delay(0)
        s3 = make_sessions(loop, [3])[0]
        s3.lane = 1
        worker.add(s3)
        assert [worker.streaming_on(lane) for lane in (0, 1)] == [1, 2]
        assert registry.playout_delay(0) == alone == pytest.approx(1.3 * 0.1 * 2 + 0.02)
        assert registry.playout_delay(1) == pytest.approx(1.3 * 0.1 * 3 + 0.02)
    finally:
        worker.stop()
        loop.close()


async def test_sessions_past_their_limits_are_closed_together_and_one_failure_stops_none(monkeypatch):
    """Closed one after another, each teardown (which waits for its lane's chunk in progress) held
    the next session past its limit; an exception in one ended the limits task for good."""
    import time
    from types import SimpleNamespace

    from server.config import ServerConfig
    from server.registry import SessionRegistry

    registry = SessionRegistry(ServerConfig(idle_timeout_s=1.0, max_duration_s=60.0), None, None)
    now = time.monotonic()
    for i, idle in enumerate((5.0, 0.0, 5.0, 5.0)):
        registry.sessions[f"s{i}"] = SimpleNamespace(
            id=f"s{i}", created=now - 10, last_input=now - idle, transport="websocket", streaming=True,
            clock=time.monotonic,
        )  # (streaming: a socket's idle reason says what it had no more of, `idle_reason`)
    running, most, closed = set(), [0], []

    async def close(session, reason):
        running.add(session.id)
        most[0] = max(most[0], len(running))
        await asyncio.sleep(0.05)
        running.discard(session.id)
        if session.id == "s2":
            raise RuntimeError("a teardown that failed")
        closed.append((session.id, reason.split(":")[0]))

    monkeypatch.setattr(registry, "close", close)
    await registry.enforce_limits()
    assert most[0] == 3  # together
    assert sorted(closed) == [("s0", "idle"), ("s3", "idle")]  # s1 is not idle; s2 failed alone
    # the model process died: the sessions left, streaming or not, can never stream again
    registry.host = SimpleNamespace(down="the model process exited (code -9)")
    closed.clear()
    await registry.enforce_limits()
    assert sorted(closed) == [(f"s{i}", "host_down") for i in (0, 1, 3)]



def fail_each_on_its_own(sessions, worker):
    """Stream `sessions` on `worker`; returns what the worker fails each with, by id (as the
    registry's fail handler sees it), and each session's latest-chunk slot."""
    failed = {}
    for s in sessions:
        worker.add(s)
        s.attach("websocket", 0.3, 0.0)
        s.fail_handler = lambda session, reason: failed.setdefault(session.id, reason)
    return failed, [s.add_slot() for s in sessions]


@pytest.mark.parametrize("broken", ["take_input", "_audio_span"])
def test_one_sessions_failed_input_fails_it_alone_and_the_batch_keeps_its_chunks(monkeypatch, broken):
    """A session whose own step raised before the batch's forward (its take_input, or its audio span
    in the batch's preparation) failed every session of its batch, as one broken forward would,
    where generated one by one it failed alone (run_chunks' one-by-one path)."""
    loop = asyncio.new_event_loop()
    try:
        worker = InferenceWorker(ServerMetrics())
        batched = make_sessions(loop, [1, 2, 3])
        alone = make_sessions(loop, [1, 3])
        failed, slots = fail_each_on_its_own(batched, worker)
        for _ in range(2):
            worker.run_chunks(batched)
            for s in alone:
                worker.run_chunk(s)

        def broken_step(*args):
            raise BufferError("audio buffer full")

        owner = batched[1] if broken == "take_input" else batched[1].stream
        monkeypatch.setattr(owner, broken, broken_step)
        worker._generate(batched)  # as the worker's lane runs a batch
        loop.run_until_complete(asyncio.sleep(0))  # the chunks and the failure reach the event loop
        assert failed == {"s2": "generation failed: audio buffer full"}
        assert [s.streaming for s in batched] == [True, False, True] and worker.streaming == 2
        assert slots[1].take_nowait() is None
        for slot, s in zip((slots[0], slots[2]), alone):  # each the chunk it gets alone
            chunk, expected = slot.take_nowait(), worker.run_chunk(s)
            assert chunk is not None and chunk.index == expected.index == 2
            assert np.abs(chunk.frames.astype(int) - expected.frames.astype(int)).max() <= 1
        assert not any(s.stream.chunk_pending for s in (batched[0], batched[2]))
    finally:
        loop.close()


def test_streaming_sessions_whose_model_process_died_end_as_host_down(monkeypatch):
    """They ended as "generation failed", counted (streamgen_sessions_closed_total) with the model's
    own errors, while the sessions of that host not streaming ended as host_down (enforce_limits)."""
    from server.model_host import HostDown

    loop = asyncio.new_event_loop()
    try:
        worker = InferenceWorker(ServerMetrics())
        sessions = make_sessions(loop, [1, 2])
        failed, _ = fail_each_on_its_own(sessions, worker)

        def host_gone(stamp_frames):
            raise HostDown("the model process exited (code -9)")

        for s in sessions:  # as streams in the model process are generated: one by one
            s.stream = SimpleNamespace(close=lambda: None)
            monkeypatch.setattr(s, "generate", host_gone)
        worker._generate(sessions)
        loop.run_until_complete(asyncio.sleep(0))
        gone = "host_down: the model process exited (code -9)"
        assert failed == {"s1": gone, "s2": gone} and worker.streaming == 0
    finally:
        loop.close()


def a_registry_of_one_session_on_a_host(monkeypatch, **host):
    """A SessionRegistry whose model host is a stand-in with `host`'s attributes, holding one
    WebSocket session (id "s1") within every time limit, its close faked to record the reason only:
    (the registry, [the reasons of its closes])."""
    from server.config import ServerConfig

    registry = SessionRegistry(ServerConfig(), None, None)
    registry.host = SimpleNamespace(**host)
    registry.sessions["s1"] = SimpleNamespace(id="s1", created=1e18, last_input=1e18, transport="websocket",
                                              clock=time.monotonic)  # fmt: skip
    closed = []

    async def close(session, reason):
        closed.append(reason)

    monkeypatch.setattr(registry, "close", close)
    return registry, closed


def test_streaming_sessions_of_a_host_ended_by_the_servers_stop_end_as_shut_down(monkeypatch, caplog):
    """`serve --sp`: the signal that stops the server ends the follower ranks too, and a chunk in
    progress then finds them gone: its sessions ended as host_down, with an ERROR line, and the
    limits closed the others as host_down too, before the shutdown closed them."""
    from server.model_host import HostStopped

    loop = asyncio.new_event_loop()
    try:
        worker = InferenceWorker(ServerMetrics())
        sessions = make_sessions(loop, [1])
        failed, _ = fail_each_on_its_own(sessions, worker)

        def stopped(stamp_frames):
            raise HostStopped("the sequence-parallel host has stopped (chunk: rank 1 is gone, as the server stops)")

        sessions[0].stream = SimpleNamespace(close=lambda: None)
        monkeypatch.setattr(sessions[0], "generate", stopped)
        with caplog.at_level("INFO", "streamgen.server"):
            worker._generate(sessions)
        loop.run_until_complete(asyncio.sleep(0))
        assert failed == {"s1": "server shutting down"}
        assert [r.levelname for r in caplog.records if r.name == "streamgen.server"] == ["INFO"], caplog.text
        registry, closed = a_registry_of_one_session_on_a_host(monkeypatch, down="the sequence-parallel host has stopped")
        registry.stopping.set()
        loop.run_until_complete(registry.enforce_limits())
        assert closed == [] and not registry.down_logged
    finally:
        loop.close()


def test_the_limits_leave_the_sessions_of_a_host_that_waits_to_know_whether_the_stop_took_its_rank(monkeypatch):
    """`serve --sp`: a host that found a follower gone is down at once (/healthz, admission) while it
    waits for the server's stop to be known (SequenceParallelHost._gone): the limits' check closed
    its sessions meanwhile as host_down, an ERROR logged, where that rank had ended with the stop."""
    loop = asyncio.new_event_loop()
    try:
        registry, closed = a_registry_of_one_session_on_a_host(
            monkeypatch, down="the sequence-parallel host lost a rank (chunk: rank 1 is gone)", awaiting_stop=True
        )
        loop.run_until_complete(registry.enforce_limits())
        assert closed == [] and not registry.down_logged and registry.down  # (/healthz says it)
        registry.host.awaiting_stop = False  # no stop came: a failure
        loop.run_until_complete(registry.enforce_limits())
        assert closed == ["host_down: the sequence-parallel host lost a rank (chunk: rank 1 is gone)"]
    finally:
        loop.close()


@pytest.mark.parametrize("broken", ["cached_velocity", "_finish_chunks", "reencode_chunk"])
def test_a_groups_failed_pass_fails_its_sessions_and_the_other_groups_keep_their_chunks(monkeypatch, broken):
    """A pass that one group of a batch shares (its forward, its decode, its re-encode once the chunks
    were published) raised out of the whole batch: the sessions of every other group failed with it,
    their chunks made, and published, already."""
    from streamgen import stream_batch

    loop = asyncio.new_event_loop()
    try:
        worker = InferenceWorker(ServerMetrics())
        ahead, fresh = make_sessions(loop, [1, 2]), make_sessions(loop, [3, 4])
        alone, batched = make_sessions(loop, [1, 2]), ahead + fresh
        failed, slots = fail_each_on_its_own(batched, worker)
        for _ in range(2):  # two chunks ahead of the fresh ones: another fill level, another group
            worker.run_chunks(ahead)
            for s in alone:
                worker.run_chunk(s)
        original = getattr(stream_batch, broken)

        def broken_for_the_fresh(*args, **kwargs):
            cache = args[0][0].cache if broken == "_finish_chunks" else args[1]  # the group's, or its stack
            if cache.filled == 0:
                raise RuntimeError("out of memory")
            return original(*args, **kwargs)

        monkeypatch.setattr(stream_batch, broken, broken_for_the_fresh)
        worker._generate(batched)  # as the worker's lane runs a batch
        loop.run_until_complete(asyncio.sleep(0))  # the chunks and the failures reach the event loop
        assert failed == {"s3": "generation failed: out of memory", "s4": "generation failed: out of memory"}
        assert [s.streaming for s in batched] == [True, True, False, False] and worker.streaming == 2
        for slot, s in zip(slots[:2], alone):  # each the chunk it gets alone, its cache written
            chunk, expected = slot.take_nowait(), worker.run_chunk(s)
            assert chunk is not None and chunk.index == expected.index == 2
            assert np.abs(chunk.frames.astype(int) - expected.frames.astype(int)).max() <= 1
        assert not any(s.stream.chunk_pending for s in ahead)
    finally:
        loop.close()
