"""The worker's sessions under churn, failures and closes: what a closed session still costs it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("closed, chunk_index, generated", [(True, 0, False), (False, 0, True), (False, 1, False)])
def test_the_first_chunk_of_a_session_closed_before_its_turn_is_not_generated(closed, chunk_index, generated):
    """Created and deleted at once (a page reloaded, a client's retry): its first chunk's job still
    waited on its lane, ahead of its stream's close, and the worker generated a chunk no one would
    see, a whole chunk's time taken from the streaming sessions' next chunks."""
    from server.registry import SessionRegistry

    made = []
    registry = SimpleNamespace(worker=SimpleNamespace(run_chunk=lambda s: made.append(s) or "chunk 0"))
    session = SimpleNamespace(id="s1", closed=closed, chunk_index=chunk_index)
    chunk = SessionRegistry._make_first_chunk(registry, session)
    assert (made == [session]) == generated
    assert (chunk == "chunk 0") == generated
