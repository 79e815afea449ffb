"""The FastAPI app: sessions, avatars, health, metrics and the web client.

    app = create_app(ServerConfig(...))      # uvicorn.run(app) or TestClient(app)

The lifespan starts the inference worker, loads and warms the model in the
background (/readyz turns 200 when done) and, at shutdown, closes every session
with its peer connection or socket before stopping the worker.
"""

from __future__ import annotations

import asyncio
import gc
import importlib
import logging
import re
import secrets
import statistics
import time
from contextlib import asynccontextmanager
from urllib.parse import unquote

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Mount
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket

from .avatars import ReferenceImageError, avatar_image, decode_reference
from .config import ServerConfig
from .ice import warn_if_ice_servers_fail
from .metrics import ServerMetrics
from .model_host import HostDown, freeze_loaded_heap, load_error_line
from .origins import ApiCors, ForeignOriginGuard, cors_options
from .protocol import CloseCode, close_reason
from .registry import AdmissionError, SessionRegistry
from .scheduler import InferenceWorker, WorkerBusy
from .session import Session

log = logging.getLogger("streamgen.server")


class ApiError(Exception):
    """An error the client caused or must handle: JSON body {"error", "message"}, logged once."""

    def __init__(self, status: int, error: str, message: str, headers: dict | None = None, **extra):
        super().__init__(message)
        self.status, self.error, self.message, self.headers, self.extra = status, error, message, headers, extra


def create_app(config: ServerConfig | None = None, model=None) -> FastAPI:
    """Build the app; `model` (an AvatarModel) skips loading, e.g. when tests share one."""
    config = config or ServerConfig()
    metrics = ServerMetrics()
    lanes = config.lanes if config.host_in_process else 1  # a model process or ranks: one pipe, one lane
    worker = InferenceWorker(metrics, stamp_frames=config.stamp_frames, lanes=lanes, torch_threads=config.torch_threads,
                             align_batches=config.align_batches and config.host_in_process)  # fmt: skip
    registry = SessionRegistry(config, worker, metrics)
    metrics.capacity.set_function(registry.admitting)
    if config.inference_process:
        metrics.watch_model_process(registry.model_process_pid)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if config.loopback:
            from .loopback import use_loopback_ice

            use_loopback_ice()
        app.state.loop = asyncio.get_running_loop()  # for diagnostics and tests (task counts)
        worker.start()
        loading = asyncio.create_task(load_and_warm(app, registry, model))
        limits = asyncio.create_task(registry.enforce_limits_forever())
        checking_stun = asyncio.create_task(warn_if_ice_servers_fail(config.ice_servers))
        try:
            yield
        finally:
            registry.stopping.set()
            checking_stun.cancel()
            limits.cancel()
            loading.cancel()
            await registry.close_all("server shutting down")
            await asyncio.to_thread(worker.stop)
            gc.unfreeze()  # what this app kept may be collected again (apps made one after another)
            # (after: an SP host collects the model it lets go of)
            await asyncio.to_thread(registry.stop_host)

    app = FastAPI(
        title="streamgen",
        version="0.1.0",
        summary="Real-time talking-avatar video over WebRTC (WHEP) and WebSocket.",
        lifespan=lifespan,
    )
    app.state.config, app.state.registry, app.state.metrics = config, registry, metrics
    # (inside the guard below: a foreign page's PUT is refused as its POST is)
    app.add_middleware(ApiMethods, routes=app.router.routes)
    # a foreign page's form POST is refused (server/origins.py); CORS, added after, runs outside it
    app.add_middleware(ForeignOriginGuard, allowed_origins=config.cors_origins)
    if config.cors_origins:
        # web apps on other origins (an app builder's page, a browser WHEP player). (WebSockets are
        # not subject to CORS.)
        app.add_middleware(ApiCors, **cors_options(config.cors_origins))
    app.state.warm_stage = "loading the model"  # what /readyz says while not ready

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        log.info("%s %s -> %d %s: %s", request.method, request.url.path, e.status, e.error, e.message)
        body = {"error": e.error, "message": e.message, **e.extra}
        return JSONResponse(body, status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        """Routing's own errors in the API's shape (they were FastAPI's {"detail": "Not Found"})."""
        error, message = {
            404: ("not_found", f"nothing at {request.url.path[:80]}"),
            405: ("method_not_allowed", f"{request.method} is not allowed on {request.url.path[:80]}"),
        }.get(e.status_code, ("http_error", str(e.detail)))
        return JSONResponse({"error": error, "message": message}, status_code=e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def server_fault(request: Request, e: Exception):
        """A fault of the server's own, in the API's shape: it was starlette's text/plain "Internal
        Server Error", which a client reading the error's JSON (web/api.js, a WHEP player) could not
        parse. Starlette logs the traceback after this answer, as before."""
        message = f"{request.method} {request.url.path[:80]} failed in the server (its log has why)"
        return JSONResponse({"error": "internal_error", "message": message}, status_code=500)

    @app.exception_handler(AdmissionError)
    async def refused(request: Request, e: AdmissionError):
        log.info("%s %s -> 503: %s", request.method, request.url.path, e.reason)
        body = {"error": "unavailable", "message": e.reason, "reason": e.reason, **e.details}
        return JSONResponse(body, status_code=503, headers={"Retry-After": str(e.retry_after)})

    from . import routes, websocket

    app.include_router(routes.router)
    app.include_router(websocket.router)
    if config.web_dir.is_dir():
        app.mount("/", WebFiles(directory=config.web_dir, html=True), name="web")
    else:  # the API serves on; the page is what a person would miss
        log.warning("no web client at %s: / has no page (the API is unchanged)", config.web_dir)
    return app


class ApiMethods:
    """ASGI middleware: an API path answers for itself whatever the method. The web page's files,
    mounted at /, took every request no route took whole: a HEAD of an API GET route (FastAPI's
    take none) was a 404 `nothing at /healthz`, a path that is there; a GET of /v1/sessions a 404
    too, and a PUT of it a 405 whose Allow header named the files' methods, `GET, HEAD`.
    Now a HEAD is answered as the GET, without the body (the server sends none to a HEAD), an
    OPTIONS with a 204 naming the methods the path takes (it was a 405 naming them), and
    another method the path does not take is a 405 naming those it does; any method of a /v1/ path
    no route has is a 404 (the files' 405 to a POST of one sent a client looking for a wrong method).
    A WebSocket to a path that has none is closed 4404 saying so (starlette's bare 403 before the
    handshake read as a token problem)."""

    METHODS = ("GET", "POST", "PATCH", "DELETE")
    # the absolute form of a request target (RFC 9112 3.2.2), as to a proxy: its scheme and authority
    ABSOLUTE_FORM = re.compile(rb"https?://[^/?#]*", re.IGNORECASE)

    def __init__(self, app: ASGIApp, routes: list):
        self.app = app
        self.routes = routes  # the app's, filled in as its routers are included

    def takes(self, scope: Scope, method: str) -> bool:
        as_method = {**scope, "method": method}  # a copy: the server reads the method it got from its own
        # (the mount of the page's files, at /, takes any path)
        return any(not isinstance(r, Mount) and r.matches(as_method)[0] == Match.FULL for r in self.routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and b"#" in scope["raw_path"] + scope["query_string"]:
            # a fragment is the client's, not the server's (RFC 9110 4.2.5): httptools drops one sent
            # all the same, h11 kept it in the path ('nothing at /healthz%23frag') or the query
            raw_path, cut, _ = scope["raw_path"].partition(b"#")
            query = b"" if cut else scope["query_string"].partition(b"#")[0]
            scope = {**scope, "raw_path": raw_path, "path": unquote(raw_path.decode("latin-1")), "query_string": query}
        if scope["type"] in ("http", "websocket") and (absolute := self.ABSOLUTE_FORM.match(scope["raw_path"])):
            # a server must take it (RFC 9112 3.2.2): h11 gave the whole target as the path, a 404
            # 'nothing at /http://host/healthz' of a path httptools served; the path is its own
            # (the decoded path is cut by the decoded authority's length: its escapes, as in
            # 'http://127.0.0.%31/x', are longer raw)
            authority = len(unquote(absolute[0].decode("latin-1")))
            scope = {**scope, "raw_path": scope["raw_path"][absolute.end() :] or b"/",
                     "path": scope["path"][authority:] or "/"}  # fmt: skip
        if scope["type"] == "http" and scope["path"] == "*":  # (the asterisk form: no route's, nor a file's)
            return await self.server_wide(scope, receive, send)
        if scope["type"] == "websocket" and not self.takes(scope, "GET"):
            return await self.no_websocket_at(scope, receive, send)
        if scope["type"] == "http" and not self.takes(scope, scope["method"]):
            allowed = [method for method in self.METHODS if self.takes(scope, method)]
            # (HEAD where GET is, and OPTIONS: each is answered below on any API path, so each is allowed)
            allow = ", ".join(allowed + ["HEAD"] * ("GET" in allowed) + ["OPTIONS"])
            if scope["method"] == "HEAD" and "GET" in allowed:
                scope = {**scope, "method": "GET"}
            elif scope["method"] == "OPTIONS" and allowed:  # (RFC 9110 9.3.7; a CORS preflight is
                # answered before this, by CORSMiddleware, where --cors-origin allows the page)
                return await Response(status_code=204, headers={"Allow": allow})(scope, receive, send)
            elif allowed:  # an API path: not the page's files' answer
                message = f"{scope['method'][:20]} is not allowed on {scope['path'][:80]}"
                response = JSONResponse({"error": "method_not_allowed", "message": message}, status_code=405,
                                        headers={"Allow": allow})  # fmt: skip
                return await response(scope, receive, send)
            elif self.takes({**scope, "type": "websocket"}, "GET"):  # (a 404 `nothing at` a path that is there)
                message = f"{scope['path'][:80]} is a WebSocket: connect to it with ws:// (Upgrade: websocket)"
                response = JSONResponse({"error": "upgrade_required", "message": message}, status_code=426,
                                        headers={"Upgrade": "websocket"})  # fmt: skip
                return await response(scope, receive, send)
            elif scope["path"].startswith("/v1/"):  # the API's, and no file's: nothing there, whatever the method
                message = f"nothing at {scope['path'][:80]}"
                bare = scope["path"].rstrip("/")
                if bare != scope["path"] and any(self.takes({**scope, "path": bare}, m) for m in self.METHODS):
                    message += f": the path is {bare[:80]}, without the trailing slash"
                response = JSONResponse({"error": "not_found", "message": message}, status_code=404)
                return await response(scope, receive, send)
        await self.app(scope, receive, send)

    async def server_wide(self, scope: Scope, receive: Receive, send: Send) -> None:
        """`OPTIONS * HTTP/1.1` asks what the server as a whole takes (RFC 9110 9.3.7): it was a 404
        'nothing at /*'. The target `*` is OPTIONS' alone (RFC 9112 3.2.4): with any other method, a 400."""
        if scope["method"] == "OPTIONS":
            allow = ", ".join([*self.METHODS, "HEAD", "OPTIONS"])
            return await Response(status_code=204, headers={"Allow": allow})(scope, receive, send)
        message = f"the request target '*' is for OPTIONS alone, not {scope['method'][:20]}: a path begins with /"
        response = JSONResponse({"error": "bad_request", "message": message}, status_code=400)
        await response(scope, receive, send)

    @staticmethod
    async def no_websocket_at(scope: Scope, receive: Receive, send: Send) -> None:
        # accepted first, as the stream's refusals are: a close code with a reason needs an open socket
        reason = f"no WebSocket at {scope['path'][:60]}: a session's is /v1/sessions/<id>/stream"
        log.info("websocket refused: %d %s", CloseCode.NOT_FOUND, reason)
        websocket = WebSocket(scope, receive, send)
        await websocket.accept()
        await websocket.close(int(CloseCode.NOT_FOUND), close_reason(reason))


class WebFiles(StaticFiles):
    """The web page's files, revalidated at each use (their ETag: a 304 while unchanged). Without
    Cache-Control a browser kept them by its own rule, a tenth of their age since modified (days,
    for an installed package's): after an upgrade it ran the old page, or an old module with a new
    one, whose imports then named nothing (a dead page)."""

    async def get_response(self, path: str, scope) -> Response:
        if scope["method"] not in ("GET", "HEAD"):
            # a file's other methods are a 405, as starlette answers; but a path no file has is a
            # 404 whatever the method (`POST /nope` was a 405: the client looked for a wrong method)
            found = await super().get_response(path, {**scope, "method": "GET"})  # (raises its 404)
            if found.status_code == 404:
                raise StarletteHTTPException(status_code=404)
            raise StarletteHTTPException(status_code=405, headers={"Allow": "GET, HEAD"})
        response = await super().get_response(path, scope)
        response.headers["Cache-Control"] = "no-cache"
        return response


async def load_and_warm(app: FastAPI, registry: SessionRegistry, model) -> None:
    """Load the model on the worker, run a few chunks to measure capacity, then report ready."""
    config = registry.config

    def load():
        import torch

        from streamgen.models import load_model

        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)

        return load_model(config.model, device=config.device)

    def start_host():
        if config.sp > 1:
            from .sp_host import SequenceParallelHost

            return SequenceParallelHost.start(config.model, config.device, config.torch_threads, config.sp, config.height,
                                              config.decode_dtype, registry.stopping)  # fmt: skip
        from .model_host import ModelHost

        return ModelHost(config.model, config.device, config.torch_threads, config.decode_dtype, registry.stopping)

    def warm():
        stream = registry._new_stream(avatar_image("sample"), None, 0)
        times = []
        # past the first chunk with a full ring (every attention length has run) and two more,
        # which measure the capacity at the stream's steady length without one-off costs
        full = stream.chunks_to_full_ring
        chunks = config.warmup_chunks or full + 2
        for _ in range(max(1, chunks)):
            t = time.perf_counter()
            stream.next_chunk()
            times.append(time.perf_counter() - t)
        if config.warm_text_encoder:
            if registry.host is not None:
                registry.host.call("warm_text")
            elif stream.cfg.text_dim == 384:
                from streamgen.model.text import text_context

                text_context("warm up", stream.cfg.text_dim)
        stream.close()
        return stream.chunk_seconds, times[full:] or times[1:] or times  # (the first pays one-off costs)

    def warm_batches(per_lane: int) -> int:
        """Compiled DiT blocks (`serve --compile`): compile the graphs of sessions batched together,
        in batches of up to `per_lane`, now rather than on live streams. Returns the graphs compiled.

        After a single session's, a batch's graphs are compiled with the batch size symbolic, for
        the thread count the batch's forwards run on (streamgen/model/compile.py). That count only
        grows with the batch, so the smallest batch and the largest compile every graph a batch
        in between runs."""
        from torch._dynamo.utils import counters

        from streamgen.stream_batch import next_chunks, write_pending_chunks

        graphs = counters["stats"]["unique_graphs"]
        for batch in sorted({2, per_lane}):
            streams = [registry._new_stream(avatar_image("sample"), None, seed) for seed in range(batch)]
            # a fresh batch's first chunk up to the first with a full ring, as a stream's warm-up
            for _ in range(streams[0].chunks_to_full_ring):
                next_chunks(streams)
                write_pending_chunks(streams)  # the batch's re-encode, as the worker runs it
            for stream in streams:
                stream.close()
        return counters["stats"]["unique_graphs"] - graphs

    try:
        # the WebRTC stack (aiortc, PyAV) takes a quarter of a second to import: here, not in the
        # first viewer's offer
        await asyncio.to_thread(importlib.import_module, f"{__package__}.webrtc")
        # as the model loads, and done before the warm-up's chunks, which it would slow (the
        # capacity is measured from their times)
        from .speech import warm_speech

        speech_warmed = asyncio.ensure_future(asyncio.to_thread(warm_speech))
        if model is not None and config.torch_threads:
            import torch

            torch.set_num_threads(config.torch_threads)
        if model is None and (config.inference_process or config.sp > 1):
            # (kept: a shutdown during the start cancels this wait, not the start; `stop_host`)
            registry.host_start = registry.worker.submit(start_host)
            registry.host = await asyncio.wrap_future(registry.host_start)
        else:
            registry.model = model or await asyncio.wrap_future(registry.worker.submit(load))
        await speech_warmed
        compiling = registry.host is None and registry.model.compile_backend
        app.state.warm_stage = "compiling and warming up a stream" if compiling else "warming up a stream"
        # every lane warms a stream at once: the chunk times then count what the lanes take from
        # each other (cores, the GIL), so the capacity does not assume they run as fast side by side
        warming = [registry.worker.submit(warm, lane=lane) for lane in range(registry.worker.lanes)]
        warmed = [await asyncio.wrap_future(job) for job in warming]
        chunk_seconds = warmed[0][0]
        steady_times = [t for _, times in warmed for t in times]
        # every batch a lane can make, not only those the measured capacity admits now: it changes
        # with the chunk times, and a live stream must not wait for a compile
        per_lane = -(-config.max_sessions // registry.worker.lanes)
        if compiling and per_lane > 1:
            app.state.warm_stage = f"compiling batches of up to {per_lane} sessions"
            t = time.perf_counter()
            graphs = await asyncio.wrap_future(registry.worker.submit(warm_batches, per_lane))
            log.info("compiled the DiT blocks of batches of up to %d sessions: %d graphs in %.1f s",
                     per_lane, graphs, time.perf_counter() - t)  # fmt: skip
    except (WorkerBusy, asyncio.CancelledError):
        return
    except HostDown as e:  # the model process died loading (the OOM killer): it said why, and the
        # traceback of the pipe it died on said nothing more
        registry.load_error = load_error_line(e)
        log.error("model failed to load: %s", e)
        return
    except Exception as e:
        registry.load_error = load_error_line(e)
        log.exception("model failed to load")
        return
    registry.chunk_seconds = chunk_seconds
    # a model process's answers, or the follower ranks' (not before: the warm-up may take minutes)
    if (config.inference_process or config.sp > 1) and config.model_timeout_s:
        registry.host.answer_timeout = config.model_timeout_s
    registry.worker.chunk_time_ema = registry.alone_chunk_seconds = statistics.median(steady_times)
    # (a warm-up chunk re-encodes the one before it first: to publish, the batches soon say)
    registry.worker.batch_times.observe(1, registry.worker.chunk_time_ema)
    registry.worker.ready_times.observe(1, registry.worker.chunk_time_ema)
    # what is loaded by now (torch, the model, the WebRTC stack: ~200k objects) lives as long as
    # the server. A full collection of it holds the GIL (every thread waits, the generating lanes
    # too); the first viewer's offer set one off.
    freeze_loaded_heap()
    registry.ready = True
    capacity = registry.capacity()
    log.info(
        "model %s ready: %.0f ms per %.2f s chunk, capacity %d session%s",
        config.model, 1000 * registry.worker.chunk_time_ema, chunk_seconds, capacity, "s" * (capacity != 1),
    )  # fmt: skip
    if not registry.real_time:  # (it said "capacity 1", and the one session played at a third of its speed)
        log.warning(
            "a %.2f s chunk takes %.0f ms here: not one session can stream in real time (each plays "
            "slower, stalling); a smaller --size, fewer --steps or a faster device would",
            chunk_seconds, 1000 * registry.worker.chunk_time_ema,
        )  # fmt: skip


# --- helpers shared by the route modules ------------------------------------------------------------
def offered_tokens(request: Request) -> list[str]:
    """The tokens a request carries: `Authorization: Bearer`, then `?token=` (WebSockets, whose
    browsers cannot set headers, and the Location of `POST /v1/whep`)."""
    header = request.headers.get("authorization", "")
    bearer = header[7:].strip() if header.lower().startswith("bearer ") else ""
    return [t for t in (bearer, request.query_params.get("token")) if t]


def require_session(request: Request, session_id: str) -> Session:
    """The session, if the request carries its token: 404 / 401 / 403 otherwise (the 404 of one
    that closed lately says why it ended, to a request with its token: `SessionRegistry.ended`).

    The token may come as `Authorization: Bearer` or as `?token=` (WebSockets, and the Location
    of `POST /v1/whep`, which a WHEP player DELETEs with the header it used to create it: on a
    server with --token, that server token, which is accepted for any session too)."""
    registry = request.app.state.registry
    session = registry.get(session_id)
    offered = offered_tokens(request)
    server_token = [registry.config.token] if registry.config.token else []
    if session is None:
        reason = ended_reason(request, session_id)
        if reason is not None:  # (told only its client)
            raise ApiError(404, "not_found", f"session ended: {reason}")
        raise ApiError(404, "not_found", f"unknown session {session_id[:40]!r}")
    if not offered:
        raise ApiError(401, "unauthorized", "missing session token: send 'Authorization: Bearer <token>'",
                       headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
    if not _token_accepted(offered, [session.token] + server_token):
        raise ApiError(403, "forbidden", "wrong session token")
    return session


def ended_reason(request: Request, session_id: str) -> str | None:
    """Why the session ended, if it ended lately (`SessionRegistry.ended`) and the request carries
    its token or the server's; None otherwise (unknown, long gone, or asked by someone else)."""
    registry = request.app.state.registry
    token, reason = registry.ended.get(session_id, (None, None))
    accepted = [token] + ([registry.config.token] if registry.config.token else [])
    return reason if token is not None and _token_accepted(offered_tokens(request), accepted) else None


def _token_accepted(offered: list[str], accepted: list[str]) -> bool:
    return any(secrets.compare_digest(t.encode(), a.encode()) for t in offered for a in accepted)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) more than `limit` bytes before reading them where possible."""
    coding = request.headers.get("content-encoding", "identity").strip().lower()
    if coding not in ("identity", ""):  # (a gzipped JSON was read as it came: 'not UTF-8', or a form that did not parse)
        raise ApiError(415, "unsupported_media_type", f"Content-Encoding {coding[:40]!r}: send the body as it is, "
                       "without a content coding", headers={"Accept-Encoding": "identity"})  # fmt: skip
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "bad_request", "invalid Content-Length")
        if int(declared) > limit:
            raise ApiError(413, "too_large", f"request body of {size_text(int(declared))}; the limit is {size_text(limit)}")
    from starlette.requests import ClientDisconnect

    # (a body sent chunked declares no size: given the time of one of the largest taken)
    deadline_s = body_deadline_s(request.app.state.config, int(declared) if declared is not None else limit)
    body = bytearray()
    try:
        async with asyncio.timeout(deadline_s):
            async for part in request.stream():
                body += part
                if len(body) > limit:
                    raise ApiError(413, "too_large", f"request body larger than the limit of {size_text(limit)}")
    except TimeoutError:
        # (the rest of the body is not read: the connection closes after the answer)
        raise ApiError(408, "body_timeout", f"request body not received within {deadline_s:.0f} s "
                       f"({size_text(len(body))} of it arrived)", headers={"Connection": "close"}) from None
    except ClientDisconnect:  # (its upload cut short: an ERROR and a page of traceback in the log)
        log.info("%s %s: the client left during its upload", request.method, request.url.path)
        raise ApiError(400, "client_gone", "the client left before its request was read") from None
    request._body = bytes(body)  # starlette re-reads this for form parsing
    return request._body


BODY_BYTES_PER_S = 64 * 1024  # a slow uplink's (a phone's on a poor signal), as web/api.js assumes


def body_deadline_s(config: ServerConfig, size: int) -> float:
    """How long a request body of `size` bytes may take to arrive: `body_timeout_s`, plus 1 s per 64 KiB."""
    return config.body_timeout_s + size / BODY_BYTES_PER_S


def refuse_other_charset(content_type: str) -> None:
    """415 for a Content-Type that names a charset other than UTF-8: JSON is UTF-8 (RFC 8259), and a
    body sent as `application/json; charset=utf-16` was read as UTF-8 all the same, its label ignored."""
    for param in content_type.split(";")[1:]:
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"').lower() != "utf-8":
            said = f"charset {value.strip()[:40]!r} in Content-Type"
            raise ApiError(415, "unsupported_media_type", f"{said}: JSON is sent as UTF-8")


def json_text(body: bytes, code: str) -> str:
    """`body` as the UTF-8 text a JSON body is (RFC 8259), else a 400 `code`: json.loads took the bytes
    of UTF-16 and UTF-32 too, so POST /v1/sessions made a session of a body that /control refused.
    A UTF-8 byte order mark is let pass (RFC 8259 lets a parser ignore it; json.loads' bytes did)."""
    unmarked = body.removeprefix(b"\xef\xbb\xbf")
    try:
        text = unmarked.decode("utf-8")
    except UnicodeDecodeError as e:
        at = e.start + len(body) - len(unmarked)
        raise ApiError(400, code, f"request body is not UTF-8 text (byte {at}): JSON is sent as UTF-8") from None
    if "\x00" in text:  # (UTF-16 or UTF-32 without a byte order mark: ASCII's are UTF-8 with NULs)
        raise ApiError(400, code, "request body is not UTF-8 text (it holds NUL bytes: UTF-16 or UTF-32?): "
                       "JSON is sent as UTF-8")  # fmt: skip
    return text


def size_text(n: int) -> str:
    """A byte count as a person reads it: the page showed "request body of 75039349 bytes; the limit
    is 4194304" to whoever had picked too large a picture."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} bytes"


def decode_upload(data: bytes, config: ServerConfig):
    try:
        return decode_reference(data, config.max_image_pixels)
    except ReferenceImageError as e:
        raise ApiError(e.status, "bad_image", str(e)) from None


__all__ = ["ApiError", "create_app", "require_session", "read_body", "json_text", "refuse_other_charset",
           "decode_upload", "offered_tokens"]  # fmt: skip
