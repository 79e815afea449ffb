"""The server's ready line says its capacity in words that fit the count ("capacity 1 sessions")."""

import logging

import pytest
from server_helpers import ready_client


@pytest.mark.parametrize("sessions, said", [(1, "capacity 1 session"), (2, "capacity 2 sessions")])
def test_the_ready_line_says_one_session_or_sessions(caplog, sessions, said):
    with caplog.at_level(logging.INFO, logger="streamgen.server"), ready_client(max_sessions=sessions):
        pass
    ready = [r.getMessage() for r in caplog.records if " ready: " in r.getMessage()]
    assert len(ready) == 1 and ready[0].endswith(said), ready
