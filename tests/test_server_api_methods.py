"""server.app.ApiMethods, the ASGI middleware in front of the routes, given scopes directly: what
another ASGI server (or a test client) hands the app, which our own connection code no longer
does for absolute-form targets (it takes them apart before either parser, request_heads)."""

import asyncio
from urllib.parse import unquote

import pytest

from server.app import ApiMethods


def scope_seen_by_the_app(raw_path: bytes) -> dict:
    """The scope the wrapped app (every route's stand-in) gets for a GET of `raw_path`."""
    seen = {}

    async def app(scope, receive, send):
        seen.update(scope)

    middleware = ApiMethods(app, routes=[])
    middleware.takes = lambda scope, method: True  # every path is a route's: the app is called
    scope = {"type": "http", "method": "GET", "raw_path": raw_path, "path": unquote(raw_path.decode("latin-1")),
             "query_string": b"", "headers": []}  # fmt: skip
    asyncio.run(middleware(scope, None, None))
    return seen


@pytest.mark.parametrize(
    "raw_path",
    [b"http://127.0.0.1/healthz", b"http://127.0.0.%31/healthz", b"http://[fe80::1%25eth0]:8000/healthz",
     b"HTTPS://h%41st/healthz"],
)  # fmt: skip
def test_an_absolute_target_reaches_the_app_as_its_path(raw_path):
    """The path after the authority, whatever the authority's percent-escapes: the decoded path
    was cut by the raw authority's length, so 'http://127.0.0.%31/healthz' reached the routes as
    '/ealthz' (two characters of the escape)."""
    seen = scope_seen_by_the_app(raw_path)
    assert (seen["raw_path"], seen["path"]) == (b"/healthz", "/healthz")


def test_an_absolute_target_without_a_path_reaches_the_app_as_the_root():
    seen = scope_seen_by_the_app(b"http://h%41st")
    assert (seen["raw_path"], seen["path"]) == (b"/", "/")
