"""The server's warm-up: what it runs and imports before it is ready, what /readyz says meanwhile,
a model that fails to load, and the heap it leaves frozen."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from server_helpers import make_app, wait_ready

pytestmark = pytest.mark.timeout(120)


def test_the_warm_up_runs_past_the_first_chunk_that_attends_to_a_full_ring(monkeypatch):
    """Every attention length of a stream runs before the server is ready, so that no served
    stream meets one first (on a GPU: cuDNN's plans, the autotuner's timings)."""
    from streamgen.stream import StreamSession

    made, ring_seen = [], []
    next_chunk = StreamSession.next_chunk

    def counting(self, observe=None):
        made.append(self)

        def seeing(stage, fn):
            if stage == "denoise":  # after the last chunk's re-encode: what this chunk attends to
                ring_seen.append(self.cache.ring_tokens_filled())
            return fn()

        return next_chunk(self, seeing)

    monkeypatch.setattr(StreamSession, "next_chunk", counting)
    with TestClient(make_app(warmup_chunks=None)) as c:
        wait_ready(c)
    (stream,) = set(made)
    cfg = stream.cfg
    first_full = stream.chunks_to_full_ring
    assert first_full == -(-cfg.window_frames // cfg.frames_per_chunk) + 1 > 1
    assert len(made) == first_full + 2  # and two more at the steady length: the capacity's chunks
    hp, wp = stream.dit.grid(stream.latent_hw)
    full = cfg.window_frames * hp * wp
    assert ring_seen[first_full - 1] == full and ring_seen[first_full - 2] < full
    assert ring_seen[first_full:] == [full, full]


def test_the_warm_up_imports_the_webrtc_stack_before_the_server_is_ready(monkeypatch):
    """aiortc and PyAV take ~0.25 s to import: the warm-up, not the first viewer's offer, pays it
    (the first WHEP answer measured 190 ms then, 10 ms now)."""
    import importlib

    import server.app

    imported = []
    import_module = importlib.import_module

    def recording(name, *args):
        imported.append(name)
        return import_module(name, *args)

    monkeypatch.setattr(server.app.importlib, "import_module", recording)
    with TestClient(make_app()) as c:
        wait_ready(c)
    assert "server.webrtc" in imported


def test_a_failed_warm_up_reports_its_first_line(monkeypatch):
    """/readyz says why the model is not ready in a line, however long the error (a compiler's
    output runs to pages; the log keeps all of it)."""
    import time

    from streamgen.stream import StreamSession

    def failing(self, observe=None):
        raise RuntimeError("C++ compile error\n" + "g++: fatal error\n" * 500)

    monkeypatch.setattr(StreamSession, "next_chunk", failing)
    with TestClient(make_app()) as c:
        deadline = time.monotonic() + 30
        while "error" not in (ready := c.get("/readyz")).json() and time.monotonic() < deadline:
            time.sleep(0.05)
        # it was healthy to a supervisor, and told clients it was still loading, for ever
        health, created = c.get("/healthz"), c.post("/v1/sessions", json={})
    assert ready.status_code == 503 and ready.json()["error"] == "RuntimeError: C++ compile error"
    assert health.status_code == 503
    assert health.json()["error"] == "the model failed to load: RuntimeError: C++ compile error"
    assert created.status_code == 503
    assert "the model failed to load: RuntimeError" in created.json()["message"]


def test_serve_ends_when_its_model_cannot_load(tmp_path):
    """A model whose weights were cut short: serve kept running, /healthz 200, every session "model
    is still loading", until someone killed it. It ends now, exit code 2, saying why."""
    import shutil
    import subprocess
    import sys

    from streamgen.models import MODELS_DIR

    broken = tmp_path / "broken"
    shutil.copytree(MODELS_DIR / "tiny-avatar", broken)
    weights = broken / "dit.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    served = subprocess.run(
        [sys.executable, "-m", "streamgen", "serve", "--model", str(broken), "--port", "0"],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert served.returncode == 2, served.stderr[-2000:]
    last = served.stderr.strip().splitlines()[-1]
    assert last.startswith("streamgen serve: error: the model did not load: ValueError:"), last


def test_what_the_warm_up_loaded_is_kept_out_of_the_collector_while_serving():
    """A full collection over torch, the model and the WebRTC stack took 50-60 ms with the GIL
    held (every thread stalls): frozen at ready, given back at shutdown."""
    import gc

    with TestClient(make_app()) as c:
        wait_ready(c)
        assert gc.get_freeze_count() > 10_000
    assert gc.get_freeze_count() == 0


def test_readyz_says_what_the_warm_up_is_doing(monkeypatch):
    import threading

    from streamgen.stream import StreamSession

    release = threading.Event()
    next_chunk = StreamSession.next_chunk

    def held(self, observe=None):
        release.wait(30)
        return next_chunk(self, observe)

    monkeypatch.setattr(StreamSession, "next_chunk", held)
    with TestClient(make_app()) as c:
        try:
            ready = c.get("/readyz")
            while ready.json().get("stage") == "loading the model":
                ready = c.get("/readyz")
            assert ready.status_code == 503 and ready.json()["stage"] == "warming up a stream"
        finally:
            release.set()
        assert "stage" not in wait_ready(c)
