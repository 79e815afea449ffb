"""HTTP routes: sessions (create, inspect, end), WHEP signalling, avatars, health and metrics."""

from __future__ import annotations

import asyncio
import json
import re
import secrets

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from streamgen.session_limits import (
    MAX_CAPTION_CHARS,
    SEED_END,
    SEED_RANGE,
    CaptionError,
    CaptionsUnavailable,
    caption_problem,
)

from .app import (
    ApiError,
    decode_upload,
    ended_reason,
    json_text,
    offered_tokens,
    read_body,
    refuse_other_charset,
    require_session,
)
from .avatars import avatar_image, avatar_png, list_avatars
from .ice import for_peer, link_header
from .protocol import RepeatedField, once_each
from .registry import SessionEnded, SessionRegistry

router = APIRouter()
MAX_SDP_BYTES = 64 * 1024

_SDP_OFFER = {"requestBody": {"content": {"application/sdp": {"schema": {"type": "string"}}}}}

def _request_key_header(required: bool) -> dict:
    return {"name": "Streamgen-Request-Key", "in": "header", "required": required,
            "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]{16,128}$"},
            "description": "chosen at random by the client: DELETE /v1/sessions with it ends the session "
                           "that request made, before its answer is read"}  # fmt: skip


_CREATE_BODY = {
    "parameters": [_request_key_header(required=False)],
    "requestBody": {
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "avatar": {"type": "string", "description": "id from GET /v1/avatars (default 'sample')"},
                        "caption": {"type": "string", "description": "optional text conditioning, e.g. 'smiling'"},
                        "seed": {"type": "integer", "minimum": 0, "maximum": SEED_END - 1},
                    },
                    "additionalProperties": False,
                }
            },
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "reference": {"type": "string", "format": "binary", "description": "PNG/JPEG face"},
                        "caption": {"type": "string"},
                        "seed": {"type": "integer", "minimum": 0, "maximum": SEED_END - 1},
                    },
                    "additionalProperties": False,
                }
            },
        }
    }
}


@router.post("/v1/sessions", status_code=201, openapi_extra=_CREATE_BODY, tags=["sessions"])
async def create_session(request: Request):
    """Create a session from a built-in avatar or an uploaded reference image -> id and session token.

    503 with Retry-After and a JSON reason when the server is at capacity or still loading.
    """
    registry: SessionRegistry = request.app.state.registry
    _require_server_token(request, registry.config.token)
    # (`POST /v1/sessions?avatar=nobody&seed=x`, as /v1/whep takes them, made a session of the sample
    # avatar: its query was never read)
    misplaced = [name for name in request.query_params if name != "token"]
    if misplaced:
        raise ApiError(422, "unknown_field", f"query parameter {misplaced[0][:40]!r}: a session's avatar, caption and "
                       "seed go in the body (JSON or multipart/form-data); only POST /v1/whep takes them in the URL")  # fmt: skip
    key = _request_key(request)
    if key is not None and not registry.begin_request(key):
        raise ApiError(409, "conflict", f"{REQUEST_KEY} is another request's: send a new random one with each")
    try:
        session = await _create(request, registry)
    except BaseException:
        if key is not None:
            registry.forget_request(key)
        raise
    # its client gone: while its stream was made (a page reloaded: its connection closed), or after,
    # before it had the answer (that connection may live on, for another page: its key's DELETE
    # says it). Nobody would hear of this session, which held a place for the unclaimed limit
    abandoned = key is not None and not registry.made_for_request(key, session)
    if abandoned or await request.is_disconnected():
        await registry.close(session, "client left before the answer")
        raise ApiError(400, "client_gone", "the client left before its session was made")
    base = f"/v1/sessions/{session.id}"
    body = {
        "id": session.id, "token": session.token, "width": session.width, "height": session.height,
        "fps": session.fps, "resource": base, "whep": f"{base}/whep", "stream": f"{base}/stream",
        # for the client's RTCPeerConnection (serve --ice-servers; a TURN secret: its own credential)
        "ice_servers": for_peer(registry.config.ice_servers, session.id),
    }  # fmt: skip
    return JSONResponse(body, status_code=201, headers={"Location": base})


async def _create(request: Request, registry: SessionRegistry):
    config = registry.config
    fields, upload = await _session_fields(request, config)
    avatar, caption, seed = _session_params(fields, upload is not None)
    reference = None if upload is not None else _avatar_reference(avatar)
    # after the checks that cost nothing: a full server's 503 sent a request that can never succeed
    # (an unknown avatar, a bad seed) to be retried after Retry-After, for good. Before the upload's
    # decoding, which a full server is spared
    registry.admit()
    # a small file can hold 16 Mpixels: decoded off the event loop, which every stream's frames wait on
    if upload is not None:
        reference = await asyncio.to_thread(decode_upload, upload, config)
    return await _new_session(registry, reference, caption, seed)


# A key of the client's choosing for the session a POST /v1/sessions makes, by which it can end
# that session before it knows its id (the web page, gone as its answer came: DELETE /v1/sessions)
REQUEST_KEY = "Streamgen-Request-Key"


def _request_key(request: Request) -> str | None:
    key = request.headers.get(REQUEST_KEY)
    if key is not None and not re.fullmatch(r"[A-Za-z0-9_-]{16,128}", key):
        # (a short one could be guessed, and anyone holding it ends the session)
        raise ApiError(400, "bad_request_key", f"{REQUEST_KEY} must be 16 to 128 letters, digits, '-' or '_', "
                       "chosen at random")  # fmt: skip
    return key


@router.delete("/v1/sessions", status_code=204, tags=["sessions"],
               openapi_extra={"parameters": [_request_key_header(required=True)]})
async def end_requested_session(request: Request):
    """End the session that a POST /v1/sessions with this `Streamgen-Request-Key` header made, or is
    making, for a client that left before it had the answer (the web page, on `pagehide`): the
    session's id and token are in that answer. 204 whether or not the key is known."""
    registry: SessionRegistry = request.app.state.registry
    key = _request_key(request)
    if key is None:
        raise ApiError(400, "bad_request_key", f"send the {REQUEST_KEY} header of the POST /v1/sessions to end")
    session = registry.abandon_request(key)
    if session is not None:
        reason = "client left before the answer" if session.transport is None else "deleted by client"
        await registry.close(session, reason)
    return Response(status_code=204)


def _require_server_token(request: Request, token: str | None) -> None:
    """Creating a session on a server started with --token needs that token: 401 / 403."""
    if token is None:
        return
    # either way it may come, as a session's calls take theirs: a stale header beside the right
    # ?token= (or the reverse) was a 403 here and accepted on the session it made
    offered = offered_tokens(request)
    if not offered:
        # (with the challenge a 401 must carry, RFC 9110 11.6.1, as a session's calls send it)
        raise ApiError(401, "unauthorized", "this server needs 'Authorization: Bearer <server token>'",
                       headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
    if not any(secrets.compare_digest(given.encode(), token.encode()) for given in offered):
        raise ApiError(403, "forbidden", "wrong server token")


SESSION_FIELDS = ("avatar", "caption", "seed")  # and, in a multipart body, the `reference` file


def _repeated(name: str) -> ApiError:
    return ApiError(422, "repeated_field", f"field {str(name)[:40]!r} is given more than once: give each once")


def _session_params(fields: dict, has_reference: bool) -> tuple[str, str | None, int | None]:
    """A session request's fields -> (avatar, caption, seed), or a 422 naming what is wrong: a
    misspelt or misplaced field is refused rather than ignored (the stream would silently use the
    sample avatar, or no caption)."""
    for name in fields:
        if name not in SESSION_FIELDS:
            raise ApiError(422, "unknown_field", f"unknown field {str(name)[:40]!r}: a session takes avatar, caption "
                           "and seed; a reference image goes as the 'reference' file of a multipart/form-data body")  # fmt: skip
    avatar, caption, seed = (fields.get(name) for name in SESSION_FIELDS)
    for name, value in (("avatar", avatar), ("caption", caption)):
        if value is not None and not isinstance(value, str):
            raise ApiError(422, f"bad_{name}", f"{name} must be a string")
    if avatar and has_reference:
        raise ApiError(422, "bad_avatar", "send either an avatar or a reference image, not both")
    if caption is not None and len(caption) > MAX_CAPTION_CHARS:
        raise ApiError(422, "bad_caption", f"caption longer than {MAX_CAPTION_CHARS} characters")
    problem = None if caption is None else caption_problem(caption)
    if problem:
        raise ApiError(422, "bad_caption", f"caption: {problem}")
    if isinstance(seed, str) and not seed.strip():  # a form's or a URL template's field left blank:
        seed = None  # none, as an empty avatar or caption (it was a 422, "seed must be an integer")
    if seed is not None:
        # an integer, or its decimal digits (form fields are text); not 1.5, not true
        if isinstance(seed, str) and re.fullmatch(r"-?[0-9]+", seed.strip()):
            # (int() of 4300 digits or more raises)
            if len(seed.strip().lstrip("-").lstrip("0")) > len(str(SEED_END)):
                raise ApiError(422, "bad_seed", f"seed must be in {SEED_RANGE}")
            seed = int(seed)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ApiError(422, "bad_seed", "seed must be an integer")
        if not 0 <= seed < SEED_END:
            raise ApiError(422, "bad_seed", f"seed must be in {SEED_RANGE}")
    return avatar or "sample", caption or None, seed


def _avatar_reference(name: str):
    try:
        return avatar_image(name)
    except KeyError:
        raise ApiError(404, "unknown_avatar", f"unknown avatar {name[:40]!r}; see GET /v1/avatars") from None


async def _new_session(registry: SessionRegistry, reference, caption: str | None, seed: int | None):
    try:
        return await registry.create(reference, caption, seed)
    except CaptionError as e:  # a caption the model cannot take; a stream's other errors are not the
        # caption's (any ValueError was a 422 bad_caption, a server's fault among them)
        raise ApiError(422, "bad_caption", str(e)) from None
    except CaptionsUnavailable as e:  # (a RuntimeError: a 500, a traceback in the log)
        raise ApiError(503, "captions_unavailable", str(e)) from None


async def _session_fields(request: Request, config) -> tuple[dict, bytes | None]:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await read_body(request, config.max_upload_bytes)
    if not body:
        return {}, None
    if content_type == "application/json":
        refuse_other_charset(request.headers.get("content-type", ""))
        text = json_text(body, "bad_json")
        try:
            fields = json.loads(text, object_pairs_hook=once_each)
        except (ValueError, RecursionError):  # (an array nested 100,000 deep)
            raise ApiError(400, "bad_json", "request body is not valid JSON") from None
        except RepeatedField as e:
            raise _repeated(e.args[0]) from None
        if not isinstance(fields, dict):
            raise ApiError(400, "bad_json", "request body must be a JSON object")
        return fields, None
    if content_type == "multipart/form-data":
        if not _multipart_closed(request.headers.get("content-type", ""), body):
            # starlette's parser drops a part cut short: a reference upload cut off mid-file made
            # a session of the sample avatar, which the client took for its own face
            raise ApiError(400, "bad_form", "multipart body is incomplete (no closing boundary): "
                           "the upload was cut short; send it again")  # fmt: skip
        try:
            # (more files than one let in, to be named below: "Too many files" for a caption sent as a file)
            form = await request.form(max_files=len(SESSION_FIELDS) + 1, max_fields=8)
        except Exception as e:  # starlette raises its own parse errors
            raise ApiError(400, "bad_form", f"multipart body could not be parsed: {e}") from None
        fields, upload = {}, None
        for key, value in form.multi_items():
            if hasattr(value, "read"):
                if key != "reference":
                    raise ApiError(400, "bad_form", f"unexpected file field {key[:40]!r}: the reference image "
                                   "goes as the 'reference' file, avatar, caption and seed as text fields")  # fmt: skip
                data = await value.read()
                if not data and not value.filename:  # a form's file input left blank, sent as HTML sends
                    # it (an empty part, its filename ""): no file, as an empty avatar is none. It was a
                    # 422 "reference image is empty", or "not both" beside the form's avatar
                    continue
                if upload is not None:  # (the last one was taken, the others ignored)
                    raise ApiError(400, "bad_form", "two 'reference' files: send one image")
                upload = data
            elif key in fields:
                raise _repeated(key)
            else:
                fields[key] = value
        return fields, upload
    raise ApiError(415, "unsupported_media_type", "send application/json or multipart/form-data")


def _multipart_closed(content_type: str, body: bytes) -> bool:
    """Whether a multipart body holds its closing delimiter (`--BOUNDARY--`), as every whole one
    does (RFC 2046); one without a boundary parameter is left to the parser to refuse."""
    match = re.search(r'boundary=(?:"([^"]+)"|([^;\s]+))', content_type, flags=re.IGNORECASE)
    if match is None:
        return True
    boundary = (match.group(1) or match.group(2)).encode("latin-1", "replace")
    return b"--" + boundary + b"--" in body


@router.get("/v1/sessions/{session_id}", tags=["sessions"])
async def session_status(session_id: str, request: Request):
    s = require_session(request, session_id)
    return {
        "id": s.id, "transport": s.transport, "streaming": s.streaming, "width": s.width, "height": s.height,
        "fps": s.fps, "chunks": s.chunk_index, "audio_queued_s": round(s.timeline.queued_seconds, 3),
        "playout_delay": round(s.delay, 3),
    }  # fmt: skip


@router.delete("/v1/sessions/{session_id}", status_code=204, tags=["sessions"])
async def end_session(session_id: str, request: Request):
    """End the session: closes its peer connection or socket and frees its model state.

    Idempotent: a session that has already ended answers 204 to its own token as well (its GET
    says why). A page hanging up sends this DELETE and closes its peer connection at once, and the
    server may see the peer's close first: a 404 there was an error in the browser's console."""
    if request.app.state.registry.get(session_id) is None and ended_reason(request, session_id) is not None:
        return Response(status_code=204)
    session = require_session(request, session_id)
    await request.app.state.registry.close(session, "deleted by client")
    return Response(status_code=204)


@router.post(
    "/v1/sessions/{session_id}/whep",
    status_code=201,
    tags=["webrtc"],
    openapi_extra=_SDP_OFFER,
    responses={201: {"content": {"application/sdp": {}}, "description": "SDP answer; Location = session"}},
)
async def whep(session_id: str, request: Request):
    """WHEP: post an SDP offer (ICE candidates included) -> 201 with the SDP answer."""
    session = require_session(request, session_id)
    sdp = await _read_offer(request)  # a bad offer leaves the session as it was: the client may try again
    if session.closed:  # while the offer came in
        raise ApiError(404, "not_found", f"session ended: {session.close_reason}")
    if session.transport == "whep":  # a player's ICE restart or renegotiation: aiortc does neither
        raise ApiError(409, "conflict", "session is already streaming over whep: a second offer (an ICE restart, "
                                        "a renegotiation) is not supported; start a new session")  # fmt: skip
    if session.transport is not None:
        raise ApiError(409, "conflict", f"session is already streaming over {session.transport}")
    return await _answer(request.app.state.registry, session, sdp, f"/v1/sessions/{session.id}")


@router.patch(
    "/v1/sessions/{session_id}",
    status_code=204,
    tags=["webrtc"],
    openapi_extra={"requestBody": {"content": {"application/trickle-ice-sdpfrag": {"schema": {"type": "string"}}}}},
)
async def whep_trickle(session_id: str, request: Request):
    """WHEP trickle ICE: the player's candidates gathered after its offer, as an SDP fragment
    (`application/trickle-ice-sdpfrag`, `If-Match`: the answer's ETag) -> 204. An ICE restart
    (new credentials) -> 422: start a new session."""
    from .trickle import FRAGMENT_TYPE, FragmentError, IceRestart, NotAnswered, parse_fragment

    session = require_session(request, session_id)
    if session.trickle is None:
        raise ApiError(409, "conflict", "the session has no WHEP peer connection to add ICE candidates to")
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != FRAGMENT_TYPE:
        raise ApiError(415, "unsupported_media_type", f"ICE candidates must be sent as {FRAGMENT_TYPE}")
    if_match = request.headers.get("if-match")
    if if_match is None:
        raise ApiError(428, "precondition_required", "send 'If-Match' with the ETag of the WHEP answer")
    if not session.trickle.matches(if_match):
        raise ApiError(412, "precondition_failed", "If-Match names another ICE session than this one's")
    try:
        fragment = parse_fragment((await read_body(request, MAX_SDP_BYTES)).decode("utf-8"))
    except UnicodeDecodeError:
        raise ApiError(400, "bad_fragment", "malformed SDP fragment: not UTF-8 text") from None
    except FragmentError as e:
        raise ApiError(400, "bad_fragment", f"malformed SDP fragment: {e}") from None
    # (the session may end while the body comes, or while the candidates' mDNS names resolve: the
    # closed ICE agent ignored them, and the PATCH was a 204 for a session that had ended)
    if session.closed:
        raise ApiError(404, "not_found", f"session ended: {session.close_reason}")
    try:
        await session.trickle.add(fragment)
    except FragmentError as e:  # read whole, and its candidates refused: not "malformed"
        raise ApiError(400, "bad_fragment", f"SDP fragment refused: {e}") from None
    except IceRestart:
        raise ApiError(422, "unsupported", "ICE restarts are not supported: start a new session") from None
    except NotAnswered:
        raise ApiError(409, "conflict", "the offer's answer is still being made: send the candidates with "
                                        "its ETag once it has come") from None  # fmt: skip
    if session.closed:
        raise ApiError(404, "not_found", f"session ended: {session.close_reason}")
    return Response(status_code=204)


@router.post(
    "/v1/whep",
    status_code=201,
    tags=["webrtc"],
    openapi_extra=_SDP_OFFER,
    responses={201: {"content": {"application/sdp": {}}, "description": "SDP answer; Location = the session"}},
)
async def whep_new_session(request: Request, avatar: str | None = None, caption: str | None = None,
                           seed: str | None = None):  # fmt: skip
    """WHEP for any player, from one URL: the offer creates a session (`?avatar=ada&caption=...&seed=7`,
    all optional) and gets its answer. The answer's Location, the WHEP resource a player DELETEs to
    hang up, carries the session's token, so a player that knows only this URL (and the server
    token, on a server started with --token) can end what it started. No Streamgen-Request-Key
    (POST /v1/sessions's, for a page reloaded before its answer): WHEP players are programs that
    send no such header, a player gone before its answer is closed here, and an answer that no
    peer connection follows is closed after webrtc.CONNECT_DEADLINE_S (never_connected)."""
    # (the parameters above describe the query for OpenAPI; `_session_params` reads the query
    # string itself, so that a misspelt parameter is refused rather than ignored)
    registry: SessionRegistry = request.app.state.registry
    _require_server_token(request, registry.config.token)
    sdp = await _read_offer(request)  # before a session exists: a bad offer leaves nothing behind
    try:
        fields = once_each((k, v) for k, v in request.query_params.multi_items() if k != "token")
    except RepeatedField as e:  # (`?avatar=ada&avatar=sample` streamed the sample avatar)
        raise _repeated(e.args[0]) from None
    name, caption, seed = _session_params(fields, has_reference=False)
    reference = _avatar_reference(name)
    # (admitted only now, as POST /v1/sessions: a full server's 503 sent a player to retry an offer
    # or an avatar that can never work)
    session = await _new_session(registry, reference, caption, seed)
    answered = await _answer(registry, session, sdp, f"/v1/sessions/{session.id}?token={session.token}")
    if await request.is_disconnected():  # nobody has its answer, nor the Location to end it with
        await registry.close(session, "client left before the answer")
        raise ApiError(400, "client_gone", "the client left before its answer")
    return answered


async def _read_offer(request: Request) -> str:
    """A WHEP request's SDP offer, checked: 415 / 413 / 400."""
    from .offers import OfferError, check_offer

    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/sdp":
        raise ApiError(415, "unsupported_media_type", "the offer must be sent as application/sdp")
    body = await read_body(request, MAX_SDP_BYTES)
    try:
        sdp = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "bad_sdp", "malformed SDP: not UTF-8 text") from None
    try:
        check_offer(sdp)
    except OfferError as e:
        raise ApiError(400, "bad_sdp", str(e)) from None
    return sdp


async def _answer(registry: SessionRegistry, session, sdp: str, location: str) -> Response:
    """Answer a checked offer for `session` and start it streaming: 201 with the SDP answer."""
    from .webrtc import OfferError, answer_offer

    session.transport = "whep"  # claimed before the first await: a second offer gets 409
    try:
        answer = await answer_offer(session, registry, sdp)
        headers = {"Location": location, "ETag": session.trickle.etag}  # the ICE session, for trickle PATCHes
        # the ICE servers, for the player (RFC 9725 4.6)
        links = link_header(for_peer(registry.config.ice_servers, session.id))
    except OfferError as e:
        # (its peer connection half made: the session ends with it, unlike an offer refused unread)
        await registry.close(session, f"bad offer: {e}")
        raise ApiError(400, "bad_sdp", f"{e}; the session has ended: create a new one") from None
    except SessionEnded as e:  # while the answer was made (its peer connection closed with it)
        raise ApiError(404, "not_found", str(e)) from None
    except Exception:  # the server's fault, a 500 (an ICE server list it could not write, say): its
        # session does not stream on to nobody until the idle limit
        await registry.close(session, "internal error: answering the offer failed")
        raise
    if links:
        headers["Link"] = links
    return Response(answer, status_code=201, media_type="application/sdp", headers=headers)


@router.post("/v1/sessions/{session_id}/control", tags=["sessions"])
async def control(session_id: str, request: Request):
    """Control a streaming session over HTTP (WebRTC clients): the WebSocket's JSON messages
    `speak`, `caption`, `interrupt` / `clear`."""
    from . import speech
    from .protocol import ProtocolError, parse_control
    from .speech import CAPTION_REFUSALS, SpeechError, caption_refusal, set_caption, speak, speak_refusal

    registry: SessionRegistry = request.app.state.registry
    session = require_session(request, session_id)
    body = await read_body(request, 16 * 1024)
    if not body:  # (parse_control's "text message is not valid JSON" is the WebSocket's wording)
        raise ApiError(400, "bad_message", 'empty body: send a JSON object, such as {"type": "interrupt"}')
    refuse_other_charset(request.headers.get("content-type", ""))  # (whatever the type: as the body's)
    try:
        # strictly: a text in another encoding, its bytes replaced, was spoken garbled (JSON is UTF-8)
        msg = parse_control(json_text(body, "bad_message"))
    except ProtocolError as e:
        if e.too_long:  # a speak's or caption's text: 422, as POST /v1/sessions refuses a caption over 500
            raise ApiError(422, "bad_speech" if e.too_long == "speak" else "bad_caption", e.reason) from None
        # (in the WebSocket's words, of a "text message": "text message is not valid JSON" of a body)
        reason = e.reason.replace("text message", "request body")
        raise ApiError(413 if e.code == 4413 else 400, "bad_message", reason) from None
    kind = msg["type"]
    if kind not in ("speak", "caption", "interrupt", "clear"):  # (before the touch: refused, not activity)
        raise ApiError(400, "bad_message", f"{kind!r} is a WebSocket message; use speak, caption or interrupt here")
    session.touch()
    if kind == "speak":
        clears = session.timeline.clears  # an interrupt posted during the synthesis drops the speech
        try:
            language, variant = msg.get("language", "en-us"), msg.get("variant")
            speaking = speak(session, msg["text"], language, variant, clears)
            duration = await asyncio.wait_for(speaking, timeout=speech.SPEAK_ANSWER_S)
        except (TimeoutError, SpeechError) as e:  # (a timeout cancelled it: none queued, its turn given back)
            status, error, retry_after = speak_refusal(e)  # (the socket's error carries the same)
            message = speech.not_ready_in_time() if isinstance(e, TimeoutError) else str(e)
            headers = None if retry_after is None else {"Retry-After": str(retry_after)}
            raise ApiError(status, error, message, headers=headers) from None
        return {"type": "speaking", "duration": round(duration, 3), **({"id": msg["id"]} if "id" in msg else {})}
    if kind == "caption":
        try:
            await set_caption(registry, session, msg["text"])
        except CAPTION_REFUSALS as e:  # (the stop's answer, Retry-After 5, where the stop refused it)
            status, error, retry_after = caption_refusal(registry, e)
            message = str(e) if status == 422 else f"caption not changed: {e}"
            headers = None if retry_after is None else {"Retry-After": str(retry_after)}
            raise ApiError(status, error, message, headers=headers) from None
        if session.closed:  # while it waited for the worker: its job found no stream to change
            raise ApiError(404, "not_found", f"session ended: {session.close_reason}")
        return {"type": "caption", "text": msg["text"], **({"id": msg["id"]} if "id" in msg else {})}
    session.timeline.clear_ahead()  # interrupt, clear
    return {"type": kind}


@router.get("/v1/avatars", tags=["avatars"])
async def avatars(request: Request):
    # `captions`: whether a session's caption is taken, for a client to offer one only then (the web
    # page showed its caption field to a model that takes none, and each connect with one was a 422)
    return {"avatars": list_avatars(), "captions": _model_takes_captions(request.app.state.registry)}


def _model_takes_captions(registry: SessionRegistry) -> bool:
    from streamgen.model.text import takes_captions
    from streamgen.models import model_shape

    if registry.model is not None:
        return takes_captions(registry.model.cfg.text_dim)
    shape = model_shape(registry.config.model)  # (a model process's or the --sp ranks': its files say)
    return shape is None or takes_captions(shape[0].text_dim)  # (not said: a caption is refused in words)


@router.get("/v1/avatars/{avatar_id}.png", tags=["avatars"], response_class=Response)
async def avatar_picture(avatar_id: str):
    try:
        return Response(avatar_png(avatar_id), media_type="image/png")
    except KeyError:
        raise ApiError(404, "unknown_avatar", f"unknown avatar {avatar_id[:40]!r}") from None


@router.get("/healthz", tags=["health"])
async def healthz(request: Request):
    down = request.app.state.registry.down  # the model can never run here: restart me, or see why
    if down:
        return JSONResponse({"status": "down", "error": down}, status_code=503)
    return {"status": "ok"}


@router.get("/readyz", tags=["health"])
async def readyz(request: Request):
    registry: SessionRegistry = request.app.state.registry
    error = registry.load_error or registry.host_down or registry.worker.down
    # (stopping: a load balancer that still sent here while the sessions close got "ready" with a
    # capacity of 0, and the sessions it sent were refused; a 503 drains it)
    stopping = registry.stopping.is_set()
    ready = registry.ready and not error and not stopping
    body = {
        "ready": ready, "model": registry.config.model, "sessions": len(registry.sessions),
        "capacity": registry.admitting(),
        # the worker's time per session's chunk now: a batch's time over its sessions (moving average)
        "chunk_ms": round(1000 * (registry.worker.chunk_time_ema or 0), 1),
        # how long a chunk plays, and one session's chunk made alone at the warm-up: `real_time`
        # (false: even one session alone plays slower) is the second no longer than the first
        "chunk_play_ms": round(1000 * registry.chunk_seconds, 1) if ready else None,
        "alone_chunk_ms": round(1000 * (registry.alone_chunk_seconds or 0), 1) if ready else None,
        "real_time": registry.real_time if ready else None,
    }  # fmt: skip
    if error:
        body["error"] = error
    elif stopping:
        body["stage"] = "stopping"
    elif not ready:
        body["stage"] = request.app.state.warm_stage
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get("/metrics", tags=["health"], response_class=PlainTextResponse)
async def metrics(request: Request):
    return Response(request.app.state.metrics.render(), media_type="text/plain; version=0.0.4")
