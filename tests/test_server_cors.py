"""HTTP API and CORS: which origins' pages may call the API, preflights, and the server's own origin."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from server_helpers import auth, make_app, ready_client, wait_ready

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def client():
    with ready_client(max_sessions=3) as c:
        yield c


def test_other_origins_may_call_the_api_only_when_allowed():
    """`serve --cors-origin`: a page on another origin creates a session and posts its WHEP offer
    (a preflighted request: bearer token, application/sdp), and can read the answer's Location."""
    page = "https://app.example.org"
    preflight = {"origin": page, "access-control-request-method": "POST",
                 "access-control-request-headers": "authorization,content-type"}  # fmt: skip
    with TestClient(make_app(cors_origins=[page])) as allowed, TestClient(make_app()) as same_origin_only:
        wait_ready(allowed)
        wait_ready(same_origin_only)
        r = allowed.options("/v1/sessions/abc/whep", headers=preflight)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == page
        assert {"authorization", "content-type"} <= set(r.headers["access-control-allow-headers"].lower().split(", "))
        r = allowed.post("/v1/sessions", json={}, headers={"origin": page})
        assert r.status_code == 201 and r.headers["access-control-allow-origin"] == page
        assert "location" in r.headers["access-control-expose-headers"].lower()
        s = r.json()
        allowed.delete(s["resource"], headers={**auth(s["token"]), "origin": page})
        # a page that leaves before its answer ends the session by its request key (docs/api.md)
        by_key = {"origin": page, "access-control-request-method": "DELETE",
                  "access-control-request-headers": "streamgen-request-key"}  # fmt: skip
        r = allowed.options("/v1/sessions", headers=by_key)
        assert r.status_code == 200 and "streamgen-request-key" in r.headers["access-control-allow-headers"].lower()
        other = allowed.options("/v1/sessions", headers={**preflight, "origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers
        r = same_origin_only.options("/v1/sessions/abc/whep", headers=preflight)
        assert "access-control-allow-origin" not in r.headers
        r = same_origin_only.post("/v1/sessions", json={}, headers={"origin": page})
        assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
        assert same_origin_only.app.state.registry.sessions == {}


def test_a_preflight_cors_refuses_is_answered_in_the_apis_json():
    """It was starlette's text/plain 400 'Disallowed CORS origin', where every other error is JSON."""
    page = "https://app.example.org"
    with TestClient(make_app(cors_origins=[page])) as c:
        r = c.options("/v1/sessions", headers={"origin": "https://evil.example", "access-control-request-method": "PUT"})
        assert r.status_code == 400 and r.headers["content-type"] == "application/json", r.text
        assert r.json() == {"error": "cross_origin", "message": "CORS does not let a page of 'https://evil.example' "
                            "make this request (its origin, method); serve --cors-origin ORIGIN allows the pages "
                            "of ORIGIN"}  # fmt: skip
        request_headers = {"origin": page, "access-control-request-method": "POST", "access-control-request-headers": "x-y"}
        r = c.options("/v1/sessions", headers=request_headers)
        assert r.status_code == 400 and r.json()["message"].endswith("make this request (its headers)"), r.text
        assert r.headers["access-control-allow-origin"] == page  # (the page can read why)


def test_an_allowed_origin_given_in_capitals_or_with_its_default_port_is_the_browser_s():
    """`--cors-origin https://App.Example.org:443` was let past the origin guard, but CORS compared
    the string as given with the browser's 'https://app.example.org': no CORS headers, the page
    blocked."""
    page = "https://app.example.org"
    preflight = {"origin": page, "access-control-request-method": "POST"}
    with TestClient(make_app(cors_origins=["https://App.Example.org:443"])) as c:
        r = c.options("/v1/sessions", headers=preflight)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == page


# What a page of any origin can send another site without asking it first (no preflight): a
# form's POST (multipart, urlencoded, text/plain), or a fetch in no-cors mode with no body.
SIMPLE_REQUESTS = {
    "multipart form": {"files": {"seed": (None, "7")}},
    "empty text/plain": {"content": b"", "headers": {"content-type": "text/plain"}},
    "no body": {},
}


@pytest.mark.parametrize("request_kwargs", SIMPLE_REQUESTS.values(), ids=SIMPLE_REQUESTS.keys())
def test_a_page_of_another_origin_cannot_make_sessions_on_a_server_without_a_token(client, request_kwargs):
    """A page the server's user visits elsewhere could post forms to it and fill its places (the
    browser does not let the page read the answer, but the session is made all the same). A
    state-changing request from a page of a foreign origin is refused with a 403 before it does
    anything; programs (no Origin header) and the server's own page are unaffected."""
    registry = client.app.state.registry
    before = set(registry.sessions)
    headers = {**request_kwargs.get("headers", {}), "origin": "https://evil.example"}
    kwargs = {**request_kwargs, "headers": headers}
    r = client.post("/v1/sessions", **kwargs)
    assert r.status_code == 403 and r.json()["error"] == "cross_origin", r.text
    assert "https://evil.example" in r.json()["message"] and "--cors-origin" in r.json()["message"]
    assert set(registry.sessions) == before
    # a sandboxed frame or a file:// page sends "null"
    r = client.post("/v1/sessions", **{**kwargs, "headers": {**kwargs["headers"], "origin": "null"}})
    assert r.status_code == 403 and set(registry.sessions) == before


@pytest.mark.parametrize(
    "headers",
    [
        {},  # a program
        {"origin": "http://testserver"},  # the server's own page
        {"origin": "http://Testserver:80"},  # its default port, written out; case
        # behind a TLS proxy
        {"origin": "https://avatar.example.org", "x-forwarded-host": "avatar.example.org"},
    ],
    ids=["no-origin", "same-origin", "same-origin-default-port", "forwarded-host"],
)
def test_requests_of_the_servers_own_origin_or_none_are_served(client, headers):
    r = client.post("/v1/sessions", json={}, headers=headers)
    assert r.status_code == 201, r.text
    s = r.json()
    assert client.delete(s["resource"], headers={**auth(s["token"]), **headers}).status_code == 204


@pytest.mark.parametrize(
    "host, origin",
    [("avatar.example:443", "http://avatar.example:443"), ("avatar.example:80", "https://avatar.example:80")],
    ids=["http-at-443", "https-at-80"],
)
def test_a_server_at_the_other_scheme_s_default_port_serves_its_own_page(client, host, origin):
    """':80' and ':443' were taken off the Host header whatever the page's scheme: a server on plain
    HTTP at port 443 refused its own page's POSTs as cross_origin. Only the scheme's own default
    port is left out."""
    headers = {"host": host, "origin": origin}
    r = client.post("/v1/sessions", json={}, headers=headers)
    assert r.status_code == 201, r.text
    assert client.delete(r.json()["resource"], headers={**auth(r.json()["token"]), **headers}).status_code == 204
    # a page on the scheme's default port is another server
    r = client.post("/v1/sessions", json={}, headers={**headers, "origin": origin.rsplit(":", 1)[0]})
    assert r.status_code == 403 and r.json()["error"] == "cross_origin", r.text


def test_a_server_allowing_any_origin_serves_every_page():
    with ready_client(cors_origins=["*"]) as any_origin:
        page = {"origin": "https://a.example"}
        r = any_origin.post("/v1/sessions", files={"seed": (None, "7")}, headers=page)
        assert r.status_code == 201, r.text
        any_origin.delete(r.json()["resource"], headers=auth(r.json()["token"]))


@pytest.mark.parametrize(
    "origin, host",
    [
        ("https://Example.org", "example.org"),
        ("https://example.org:443", "example.org"),
        ("http://example.org:8443", "example.org:8443"),
        ("http://[::1]:8000", "[::1]:8000"),
        ("null", None),
        ("file://", None),
        ("http://example.org:port", None),
    ],
)
def test_origin_host(origin, host):
    from server.origins import origin_host

    assert origin_host(origin) == host
