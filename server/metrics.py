"""Prometheus metrics, in a registry of their own so several apps (tests) can live in one process."""

from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    ProcessCollector,
    generate_latest,
)

CHUNK_BUCKETS = (0.01, 0.02, 0.05, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)


class ServerMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.sessions_active = Gauge("streamgen_sessions_active", "sessions open now", registry=r)
        self.sessions_streaming = Gauge("streamgen_sessions_streaming", "sessions generating video", registry=r)
        self.websockets_open = Gauge("streamgen_websockets_open", "WebSocket connections being served", registry=r)
        self.sessions_created = Counter("streamgen_sessions_created", "sessions created", registry=r)
        self.sessions_rejected = Counter(
            "streamgen_sessions_rejected", "session requests refused", ["reason"], registry=r
        )
        self.sessions_closed = Counter("streamgen_sessions_closed", "sessions ended", ["reason"], registry=r)
        self.chunk_latency = Histogram(
            "streamgen_chunk_latency_seconds", "time to generate one chunk", buckets=CHUNK_BUCKETS, registry=r
        )
        self.fps = Gauge("streamgen_generated_fps", "video frames generated per second (last 5 s)", registry=r)
        self.dropped_chunks = Counter(
            "streamgen_dropped_chunks", "chunks replaced before a client took them", registry=r
        )
        self.late_chunks = Counter("streamgen_late_chunks", "chunks generated after their play time", registry=r)
        self.queue_depth = Gauge(
            "streamgen_queue_depth", "chunks and jobs waiting for the inference worker", registry=r
        )
        self.audio_received = Counter(
            "streamgen_audio_received_seconds", "audio received, by source (mic, client, speech)", ["source"],
            registry=r,
        )
        self.capacity = Gauge("streamgen_capacity_sessions", "sessions the server admits now", registry=r)
        self.worker_busy = Counter(
            "streamgen_worker_busy_seconds",
            "seconds the inference worker spent generating and writing chunks, summed over its lanes",
            registry=r,
        )
        self.batch_sessions = Histogram(
            "streamgen_batch_sessions", "sessions whose chunks the worker generated together, per batch",
            buckets=BATCH_BUCKETS, registry=r,
        )
        # the process's CPU seconds, memory and open files (process_*), and Python's collections
        # (python_gc_*): what an operator watches beside the streams
        ProcessCollector(registry=r)
        GCCollector(registry=r)
        self._frames = deque(maxlen=4096)  # (time, frames) of recent chunks, for the fps gauge
        self._lock = threading.Lock()
        # read when scraped, so that it falls to 0 when the streams stop (set per chunk, it kept
        # the last rate for good)
        self.fps.set_function(self.generated_fps)

    def watch_model_process(self, pid) -> None:
        """The model process's (`serve --model-process`) CPU seconds, memory and open files, as
        streamgen_model_process_*: it holds the model and every stream's cache, where process_* is
        this server's alone (a model process growing to the out-of-memory killer showed nowhere).
        pid(): its process id, or None while there is none (nothing is reported then)."""
        ProcessCollector(namespace="streamgen_model", pid=lambda: pid() or "none", registry=self.registry)

    def chunk_done(self, seconds: float, frames: int) -> None:
        self.chunk_latency.observe(seconds)
        with self._lock:
            self._frames.append((time.monotonic(), frames))

    def generated_fps(self, window: float = 5.0) -> float:
        now = time.monotonic()
        with self._lock:
            while self._frames and self._frames[0][0] < now - window:
                self._frames.popleft()
            return sum(n for _, n in self._frames) / window

    def render(self) -> bytes:
        return generate_latest(self.registry)
