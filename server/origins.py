"""Refuse state-changing requests sent by web pages of foreign origins.

A browser sends some requests to any site without asking it first (no CORS preflight): a form's
POST (multipart, urlencoded or text/plain) and a `fetch` in no-cors mode. The page cannot read
the answer, but the request is served all the same, so any page a user of a server without
`--token` opens elsewhere could fill the server's places with sessions nobody watches. Browsers
name the page's origin in an `Origin` header on every such request; programs and native WHEP
players send none. So a POST, PATCH or DELETE whose Origin is neither this server's own (its
`Host`, or `X-Forwarded-Host` behind a proxy) nor one of `--cors-origin` is refused with a 403
before any route sees it. Requests that needed a preflight were already refused by the browser
unless CORS allowed them; WebSockets carry a session token that a foreign page does not have.
"""

from __future__ import annotations

import logging
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

log = logging.getLogger("streamgen.server")

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
DEFAULT_PORTS = {"http": 80, "https": 443}


def scheme_and_host(origin: str) -> tuple[str, str] | None:
    """'https://Example.org:443' -> ('https', 'example.org'): the host as a Host header writes it
    (host[:port], the scheme's default port left out); None for 'null' or anything that is not an
    origin."""
    try:
        parts = urlsplit(origin.strip().lower())
        port = parts.port
    except ValueError:  # a port that is not a number
        return None
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        return None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname  # (IPv6)
    return parts.scheme, host if port in (None, DEFAULT_PORTS[parts.scheme]) else f"{host}:{port}"


def as_browsers_send(origin: str) -> str:
    """An origin as a browser's Origin header writes it ('https://App.Example.org:443' ->
    'https://app.example.org'): CORSMiddleware compares the strings as they are, and an origin
    given otherwise was let past this guard but got no CORS headers, so its pages were blocked."""
    parsed = scheme_and_host(origin) if origin != "*" else None
    return f"{parsed[0]}://{parsed[1]}" if parsed else origin


def cors_options(cors_origins: list[str]) -> dict:
    """CORSMiddleware's arguments for `serve --cors-origin`: the API's calls carry a bearer token, not
    cookies; the WHEP answer's Location and Link headers, and a 503's Retry-After, must be readable."""
    return dict(
        allow_origins=[as_browsers_send(origin) for origin in cors_origins],
        allow_methods=["GET", "POST", "PATCH", "DELETE"], allow_headers=["Authorization", "Content-Type", "If-Match", "Streamgen-Request-Key"],
        expose_headers=["Location", "Link", "Retry-After", "ETag"], max_age=600,
    )  # fmt: skip


class ApiCors(CORSMiddleware):
    """CORSMiddleware whose refusal of a preflight is in the API's JSON (starlette's was a text/plain
    400 'Disallowed CORS origin', where docs/api.md has every error in JSON)."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response
        refused = response.body.decode().removeprefix("Disallowed CORS ")  # "origin, method", say
        message = f"CORS does not let a page of {request_headers['origin'][:80]!r} make this request (its {refused})"
        if "origin" in refused:
            message += "; serve --cors-origin ORIGIN allows the pages of ORIGIN"
        headers = {k: v for k, v in response.headers.items() if k not in ("content-type", "content-length")}
        return JSONResponse({"error": "cross_origin", "message": message}, status_code=400, headers=headers)


def origin_host(origin: str) -> str | None:
    """The host part of `scheme_and_host`."""
    parsed = scheme_and_host(origin)
    return parsed and parsed[1]


def _host_header(value: str, scheme: str) -> str:
    """A Host header as origin_host gives it for a page of `scheme`: lower case, without that
    scheme's default port (only its: a server on plain HTTP at port 443 is 'host:443' to its page)."""
    return value.strip().lower().removesuffix(f":{DEFAULT_PORTS[scheme]}")


class ForeignOriginGuard:
    """ASGI middleware: 403 `cross_origin` for a state-changing request from a foreign page."""

    def __init__(self, app: ASGIApp, allowed_origins: list[str]):
        self.app = app
        self.any_origin = "*" in allowed_origins
        # --cors-origin names a scheme too: its https pages are not its http ones
        self.allowed = {scheme_and_host(o) for o in allowed_origins} - {None}

    def foreign(self, origin: str, headers: dict[str, str]) -> bool:
        if self.any_origin:
            return False
        parsed = scheme_and_host(origin)
        if parsed is None:  # "null": a sandboxed frame, a file:// page
            return True
        scheme, host = parsed
        own = {_host_header(headers.get("host", ""), scheme)}
        forwarded = headers.get("x-forwarded-host")
        if forwarded:  # a proxy in front that rewrote Host (its first value: the client's)
            own.add(_host_header(forwarded.split(",")[0], scheme))
        return host not in own and parsed not in self.allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in SAFE_METHODS:
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        origin = headers.get("origin")
        if origin is None or not self.foreign(origin, headers):
            return await self.app(scope, receive, send)
        message = (f"a page of {origin[:80]!r} may not call this server's API; "
                   "serve --cors-origin ORIGIN allows the pages of ORIGIN")  # fmt: skip
        log.info("%s %s -> 403 cross_origin: %s", scope["method"], scope["path"], message)
        response = JSONResponse({"error": "cross_origin", "message": message}, status_code=403)
        await response(scope, receive, send)
