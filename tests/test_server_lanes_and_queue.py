"""The inference worker's capacity, its lanes (`serve --lanes`) and its queue's depth."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from server_helpers import auth, block_lane, make_app, new_session, wait_ready

pytestmark = pytest.mark.timeout(120)


def test_capacity_from_measured_chunk_time():
    from server.metrics import ServerMetrics
    from server.scheduler import InferenceWorker

    worker = InferenceWorker(ServerMetrics())
    assert worker.capacity(0.32, limit=8) == 8  # nothing measured yet: the limit
    worker.chunk_time_ema = 0.1
    assert worker.capacity(0.32, limit=8) == 2  # 0.85 * 0.32 / 0.1 = 2.7
    worker.chunk_time_ema = 1.0
    assert worker.capacity(0.32, limit=8) == 1  # never below one
    worker.chunk_time_ema = 0.01
    assert worker.capacity(0.32, limit=8) == 8


def test_sessions_spread_over_the_lanes_and_give_theirs_back(monkeypatch):
    """`serve --lanes 2`: the warm-up runs a stream on each lane at once (the capacity counts what
    they take from each other), each new session goes on the lane with the fewest, and its lane
    is free again once it is torn down (its first chunk and its teardown ran there)."""
    import threading
    import time

    from streamgen.stream import StreamSession

    warmed_on = set()
    next_chunk = StreamSession.next_chunk

    def recording(self, observe=None):
        warmed_on.add(threading.current_thread().name)
        return next_chunk(self, observe)

    monkeypatch.setattr(StreamSession, "next_chunk", recording)
    app = make_app(lanes=2)
    with TestClient(app) as c:
        wait_ready(c)
        assert warmed_on == {"inference-worker-0", "inference-worker-1"}
        registry = app.state.registry
        assert registry.worker.lanes == 2
        made = [new_session(c) for _ in range(3)]
        assert sorted(registry.get(s["id"]).lane for s in made) == [0, 0, 1]
        for s in made:
            assert c.delete(s["resource"], headers=auth(s["token"])).status_code in (200, 204)
        deadline = time.monotonic() + 10
        while registry.worker._lane_load != [0, 0] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert registry.worker._lane_load == [0, 0]


def test_the_queue_depth_counts_every_lane_and_the_fps_falls_when_streams_stop(monkeypatch):
    import time

    from server import metrics as metrics_module
    from server.metrics import ServerMetrics
    from server.scheduler import InferenceWorker

    metrics = ServerMetrics()

    def gauge(name: str) -> float:
        line = next(x for x in metrics.render().decode().splitlines() if x.startswith(name + " "))
        return float(line.split()[-1])

    worker = InferenceWorker(metrics, lanes=2)
    worker.start()
    try:
        release = block_lane(worker, lane=0)
        for _ in range(3):
            worker.submit(lambda: None, lane=0)
        # wakes lane 1, which set the gauge to its own 0; waited for (after a 0.2 s sleep, a lane
        # held off the cores 0.3 s had not taken it yet, and the gauge said 4)
        worker.submit(lambda: None, lane=1).result(timeout=10)
        assert gauge("streamgen_queue_depth") == 3
        release.set()
    finally:
        worker.stop()
    metrics.chunk_done(0.1, 12)
    assert gauge("streamgen_generated_fps") == 12 / 5
    later = time.monotonic() + 10
    monkeypatch.setattr(metrics_module.time, "monotonic", lambda: later)
    assert gauge("streamgen_generated_fps") == 0  # it kept the last rate for good
