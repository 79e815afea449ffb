"""Shared pieces of the server tests: a small model, an app, a real uvicorn server on 127.0.0.1."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager
from functools import lru_cache

import torch

from server.app import create_app
from server.config import ServerConfig


@lru_cache(maxsize=1)
def small_model():
    """The `debug` flavor (64x64, milliseconds per chunk) with audio attention switched on.

    Random weights initialise the audio cross-attention output to zero (as training
    does), so untrained frames would ignore the audio; a small random projection
    lets the tests check that speech changes the picture.
    """
    from streamgen.models import load_model

    model = load_model("debug")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for block in model.dit.blocks:
            if block.audio_attn is not None:
                w = block.audio_attn.o.weight
                w.copy_(torch.randn(w.shape, generator=gen) * 0.5)
    return model


def server_config(**overrides) -> ServerConfig:
    settings = dict(
        model="debug", warm_text_encoder=False, warmup_chunks=2, max_sessions=4, playout_delay_s=0.3,
        loopback=True, idle_timeout_s=30.0, measure_capacity=False, torch_threads=1,
    )  # fmt: skip
    settings.update(overrides)
    return ServerConfig(**settings)


def make_app(**overrides):
    config = server_config(**overrides)
    # a model in a child process loads there (the plain `debug` flavor); otherwise share one
    return create_app(config, model=None if config.inference_process else small_model())


def wait_ready(client, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = client.get("/readyz")
        if r.status_code == 200:
            return r.json()
        time.sleep(0.05)
    raise AssertionError(f"server not ready: {r.json()}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def live_server(**overrides):
    """A real uvicorn server on 127.0.0.1 in a background thread; yields (base_url, app)."""
    import httpx
    import uvicorn

    app = make_app(**overrides)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=3)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or not thread.is_alive():
                raise AssertionError("live server did not become ready")
            time.sleep(0.05)
        yield url, app
    finally:
        server.should_exit = True
        thread.join(15)
