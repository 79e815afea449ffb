"""The inference worker batches sessions that are due together; each gets the chunk it would get alone."""

import asyncio

import numpy as np
from server_helpers import small_model

from server.metrics import ServerMetrics
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
