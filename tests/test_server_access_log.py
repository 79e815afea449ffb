"""The server's log holds no session token: uvicorn's access lines and WebSocket lines."""

from __future__ import annotations

import logging

import pytest
from server_helpers import make_app

pytestmark = pytest.mark.timeout(120)


def test_the_access_log_holds_no_session_token():
    """uvicorn logged each request line as it came: every WebSocket's and WHEP resource's
    `?token=` was in the log, for whoever reads it."""
    import logging

    import uvicorn
    from uvicorn.logging import AccessFormatter

    from server.uvicorn_server import SessionClosingServer

    SessionClosingServer(uvicorn.Config(make_app(), log_level="info"))  # (as serve runs it)
    access = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:5", "DELETE", "/v1/sessions/ab?token=Se-cr_et&x=1", "1.1", 204),
                               None)  # fmt: skip
    socket = logging.LogRecord("uvicorn.error", logging.INFO, __file__, 1, '%s - "WebSocket %s" [accepted]',
                               ("127.0.0.1:5", "/v1/sessions/ab/stream?token=Se-cr_et"), None)  # fmt: skip
    for record in (access, socket):
        logger = logging.getLogger(record.name)
        assert all(f.filter(record) for f in logger.filters)
    line = AccessFormatter('%(client_addr)s - "%(request_line)s" %(status_code)s').format(access)
    assert line == '127.0.0.1:5 - "DELETE /v1/sessions/ab?token=...&x=1 HTTP/1.1" 204 No Content'
    assert socket.getMessage() == '127.0.0.1:5 - "WebSocket /v1/sessions/ab/stream?token=..." [accepted]'


def test_a_token_whose_name_is_percent_encoded_is_not_in_the_log_either():
    """`?%74oken=` is read as `token` (the query's names are decoded): it was logged as it came."""
    from starlette.datastructures import QueryParams

    from server.uvicorn_server import TokenRedactingLog

    for query in ("%74oken=Se-cr_et", "to%6Ben=Se-cr_et", "%74%6F%6B%65%6E=Se-cr_et"):
        assert QueryParams(query).get("token") == "Se-cr_et"
        record = logging.LogRecord("uvicorn.error", logging.INFO, __file__, 1, '%s - "WebSocket %s" [accepted]',
                                   ("127.0.0.1:5", f"/v1/sessions/ab/stream?{query}"), None)  # fmt: skip
        assert TokenRedactingLog().filter(record)
        assert "Se-cr_et" not in record.getMessage() and "=..." in record.getMessage(), record.getMessage()
