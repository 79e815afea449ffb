"""The server tests' bounded waits fail, saying what they waited for, when their bound runs out: one
that fell through instead let its test go on as if what it waited for had happened, to fail later
for another reason, or pass having checked less than it says."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
from server_helpers import sessions_gone
from test_server_sp_host import stop_begun
from test_server_worker_lanes import a_job_waits_on, worker_stopping


async def test_sessions_gone_fails_naming_the_sessions_left():
    app = SimpleNamespace(state=SimpleNamespace(registry=SimpleNamespace(sessions={"a": 1, "b": 2})))
    with pytest.raises(AssertionError, match=r"sessions not gone after 0.1 s: \['a'\]"):
        await sessions_gone(app, "a", "c", seconds=0.1)
    with pytest.raises(AssertionError, match=r"\['a', 'b'\]"):
        await sessions_gone(app, seconds=0.1)
    app.state.registry.sessions.clear()
    await sessions_gone(app, seconds=0.1)


async def test_waiting_on_a_lane_fails_when_no_job_comes():
    with pytest.raises(AssertionError, match="no job came to wait on lane 1"):
        await a_job_waits_on(SimpleNamespace(_jobs=[[], []]), lane=1, seconds=0.1)


async def test_a_worker_stop_that_does_not_begin_fails():
    stopped = threading.Event()
    worker = SimpleNamespace(_stopping=False, stop=stopped.set)  # (a stop that never raises its flag)
    with pytest.raises(AssertionError, match="the worker's stop did not begin"):
        await worker_stopping(worker, seconds=0.1)
    assert stopped.is_set()


def test_a_host_stop_that_does_not_begin_fails():
    stopped = threading.Event()
    host = SimpleNamespace(down=None, stop=stopped.set)
    with pytest.raises(AssertionError, match="the host's stop did not begin"):
        stop_begun(host, seconds=0.1)
    assert stopped.is_set()
