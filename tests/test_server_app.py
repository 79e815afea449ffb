"""HTTP API: sessions, avatars, uploads, health, metrics, auth, CORS and bad input."""

from __future__ import annotations

import io
import re

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from server_helpers import auth, free_port, make_app, new_session, png_bytes, ready_client, wait_ready

from server.config import WEB_DIR

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def client():
    with ready_client(max_sessions=3) as c:
        yield c


def test_health_ready_docs_and_avatars(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["ready"] is True and ready["capacity"] >= 1 and ready["real_time"] is True
    assert 0 < ready["alone_chunk_ms"] <= ready["chunk_play_ms"]
    paths = client.get("/openapi.json").json()["paths"]
    assert "/v1/sessions" in paths and "/v1/sessions/{session_id}/whep" in paths
    # (a header the route reads itself: OpenAPI said nothing of it, nor of DELETE /v1/sessions' need of it)
    for method, required in (("post", False), ("delete", True)):
        assert {"name": "Streamgen-Request-Key", "in": "header", "required": required} in [
            {k: p[k] for k in ("name", "in", "required")} for p in paths["/v1/sessions"][method]["parameters"]]  # fmt: skip
    assert client.get("/docs").status_code == 200
    avatars = client.get("/v1/avatars").json()["avatars"]
    assert {"sample", "ada"} <= {a["id"] for a in avatars}
    png = client.get(avatars[1]["image"])
    assert png.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(png.content)).size == (256, 256)
    assert client.get("/v1/avatars/nobody.png").status_code == 404


def test_the_avatars_answer_says_whether_a_caption_is_taken(client):
    """A client offered a caption to a model that takes none (the web page's field): each session
    asked with one was a 422. GET /v1/avatars says whether the model takes captions."""
    from types import SimpleNamespace

    from server.routes import _model_takes_captions

    assert client.get("/v1/avatars").json()["captions"] is False  # (the debug model's 16-d text features)
    # a model loaded elsewhere (a model process, the --sp ranks): as its files or flavor say
    for model, takes in (("tiny-avatar", True), ("debug", False), ("wan2.1-1.3b", False)):
        assert _model_takes_captions(SimpleNamespace(model=None, config=SimpleNamespace(model=model))) is takes


def test_a_server_too_slow_for_one_session_says_so(monkeypatch, caplog):
    """A size the machine cannot make in real time said "capacity 1", and its one session played
    at a third of its speed without a word."""
    import logging
    import time

    from streamgen.stream import StreamSession

    made = StreamSession.next_chunk

    def slow(self, observe=None):
        time.sleep(self.chunk_seconds * 1.2)  # (slower than the chunk plays)
        return made(self, observe)

    monkeypatch.setattr(StreamSession, "next_chunk", slow)
    caplog.set_level(logging.WARNING, "streamgen.server")
    with ready_client(max_sessions=2) as c:
        ready = c.get("/readyz").json()
        assert ready["ready"] is True and ready["real_time"] is False
        chunk_play_ms = pytest.approx(1000 * c.app.state.registry.chunk_seconds, abs=0.05)
        assert ready["alone_chunk_ms"] > ready["chunk_play_ms"] == chunk_play_ms
        # batches share a pass's cost among their sessions: the worker's time per session falls
        # (`chunk_ms`), and /readyz said real_time true where one session alone still played slower
        c.app.state.registry.worker.chunk_time_ema = 0.01
        ready = c.get("/readyz").json()
        assert ready["chunk_ms"] == 10.0 and ready["real_time"] is False
    assert any("not one session can stream in real time" in r.getMessage() for r in caplog.records)


def test_web_client_is_served(client):
    r = client.get("/")
    assert r.status_code == 200 and "<video" in r.text
    # revalidated at each use (test_server_browser: a browser kept an upgraded server's old files)
    for path in ("/", "/app.js"):
        r = client.get(path)
        assert r.headers["cache-control"] == "no-cache", path
        again = client.get(path, headers={"if-none-match": r.headers["etag"]})
        assert again.status_code == 304 and again.headers["cache-control"] == "no-cache", path


def test_web_client_modules_are_served_as_javascript(client):
    """The page is ES modules (index.html's `type="module"`, importing one another), which a browser
    runs only when they come with a JavaScript MIME type; and each module a page module imports is
    one of the served files."""
    r = client.get("/")
    assert '<script type="module" src="app.js">' in r.text
    names = sorted(path.name for path in WEB_DIR.glob("*.js"))
    imported = set()
    for name in names:
        r = client.get(f"/{name}")
        assert r.status_code == 200, name
        assert r.headers["content-type"].split(";")[0] in ("text/javascript", "application/javascript"), (
            name, r.headers["content-type"],
        )  # fmt: skip
        imported |= set(re.findall(r'^import [^;]* from "\./([\w.-]+)";', r.text, re.M))
    assert {"app.js", "page.js", "websocket.js"} <= set(names)
    assert {"page.js", "resample.js"} <= imported <= set(names), imported


def page_elements(html: str) -> dict[str, dict]:
    """The page's elements with an id -> their attributes."""
    from html.parser import HTMLParser

    found: dict[str, dict] = {}

    class Ids(HTMLParser):
        def handle_starttag(self, tag, attrs):
            attributes = dict(attrs, tag=tag)
            if "id" in attributes:
                found[attributes["id"]] = attributes

    Ids().feed(html)
    return found


def live(element: dict) -> bool:
    return element.get("role") in ("status", "alert", "log") or element.get("aria-live") in ("polite", "assertive")


def test_the_page_says_its_state_to_a_screen_reader_and_not_its_figures(client):
    """The status line ('connecting', 'failed: 503: server is at capacity', 'ended: ...') was no live
    region: a screen reader said nothing of a connect failing or a stream ending. The overlay's
    figures, rewritten twice a second, were one: it would read them out over and over."""
    elements = page_elements(client.get("/").text)
    assert live(elements["status"]) and live(elements["notice"])
    assert not live(elements["overlay"])


def test_the_pages_picture_chooser_offers_each_format_the_server_takes(client):
    """The chooser offered PNG, JPEG and WebP only: a BMP or GIF, which the server takes, was
    hidden by the browser's file dialog."""
    from server.avatars import decode_reference

    takes = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP", "image/bmp": "BMP", "image/gif": "GIF"}
    assert set(page_elements(client.get("/").text)["upload"]["accept"].split(",")) == set(takes)
    for name in takes.values():
        buf = io.BytesIO()
        Image.new("RGB", (16, 16), (200, 150, 120)).save(buf, format=name)
        assert decode_reference(buf.getvalue(), 1 << 24).shape == (16, 16, 3), name


def test_each_element_of_the_page_is_one_its_scripts_or_style_use(client):
    """An `<audio id="audio" autoplay>` stood on the page that nothing used (a WebRTC stream's sound
    plays from the <video>, a WebSocket stream's from an AudioContext): an element a reader of the
    page looked for a use of. Each element with an id is one a script takes or the style names."""
    used = "\n".join(path.read_text() for path in WEB_DIR.glob("*.js"))
    style = (WEB_DIR / "style.css").read_text()
    unused = [
        name for name in page_elements(client.get("/").text)
        if f'$("{name}")' not in used and not re.search(rf"#{re.escape(name)}\b", style)
    ]  # fmt: skip
    assert unused == []


def test_the_pages_text_fields_take_as_much_as_the_server(client):
    """The caption field took 200 characters, where the server takes 500: a longer caption pasted
    was cut to 200 by the browser without a word. Then its maxlength of 500 counted UTF-16 units
    where the server counts characters, cutting 300 emoji at 250. Neither text field cuts a text
    short now: one too long is refused by the server, in its words."""
    elements = page_elements(client.get("/").text)
    assert "maxlength" not in elements["caption"] and "maxlength" not in elements["speak-text"]


def test_each_field_of_the_page_has_a_name_to_read_out(client):
    """The speak box had a placeholder only, which a screen reader reads as its name at best and
    which goes once something is typed: each field is in a <label> or has an aria-label."""
    from html.parser import HTMLParser

    unnamed = []

    class Fields(HTMLParser):
        labels = 0

        def handle_starttag(self, tag, attrs):
            attributes = dict(attrs)
            if tag == "label":
                self.labels += 1
            elif tag in ("input", "textarea", "select") and not self.labels and not attributes.get("aria-label"):
                unnamed.append(attributes.get("id"))

        def handle_endtag(self, tag):
            if tag == "label":
                self.labels -= 1

    Fields().feed(client.get("/").text)
    assert unnamed == []


def test_create_inspect_delete(client):
    s = new_session(client, avatar="ada", seed=3)
    assert s["width"] == 64 and s["fps"] == 25.0 and s["whep"].endswith("/whep")
    status = client.get(s["resource"], headers=auth(s["token"]))
    assert status.status_code == 200 and status.json()["streaming"] is False
    assert client.delete(s["resource"], headers=auth(s["token"])).status_code == 204
    assert client.get(s["resource"], headers=auth(s["token"])).status_code == 404


def test_deleting_an_ended_session_is_not_an_error(client):
    """A page hanging up DELETEs its session and closes its peer connection at once; when the
    server saw the peer close first, the DELETE was a 404, an error in the browser's console (a
    race the hang-up browser test lost now and then). DELETE is idempotent: its client gets 204,
    by the session's token or by ?token= (the WHEP resource); anyone else, still, 404."""
    s = new_session(client)
    registry = client.app.state.registry
    client.portal.call(registry.close, registry.get(s["id"]), "peer connection closed")  # (the server's own close)
    for _ in range(2):
        assert client.delete(s["resource"], headers=auth(s["token"])).status_code == 204
    assert client.delete(f"{s['resource']}?token={s['token']}").status_code == 204
    assert client.delete(s["resource"], headers=auth("someone-else")).status_code == 404
    r = client.get(s["resource"], headers=auth(s["token"]))
    assert (r.status_code, r.json()["message"]) == (404, "session ended: peer connection closed")


def test_an_ended_session_says_why_to_its_client(client, monkeypatch):
    """An ended session was 'unknown session' (404), whatever ended it: the web page's WebRTC
    check could only say that the server had ended it, not that a limit had. Its client (its
    token) is told why now; anyone else, as before, that it is unknown. The last 1024 are kept."""
    s = new_session(client)
    assert client.delete(s["resource"], headers=auth(s["token"])).status_code == 204
    r = client.get(s["resource"], headers=auth(s["token"]))
    assert (r.status_code, r.json()["message"]) == (404, "session ended: deleted by client")
    for headers in (auth("someone-else"), {}):
        for method in ("get", "delete"):
            r = getattr(client, method)(s["resource"], headers=headers)
            assert (r.status_code, r.json()["message"]) == (404, f"unknown session {s['id']!r}")
    registry = client.app.state.registry
    monkeypatch.setattr(registry, "ENDED_KEPT", 2)
    later = [new_session(client) for _ in range(2)]
    for t in later:
        client.delete(t["resource"], headers=auth(t["token"]))
    assert list(registry.ended) == [t["id"] for t in later]  # (only the last: a server runs for months)


def test_upload_reference(client):
    r = client.post("/v1/sessions", files={"reference": ("face.png", png_bytes(), "image/png")},
                    data={"seed": "5"})  # fmt: skip
    assert r.status_code == 201, r.text
    client.delete(r.json()["resource"], headers=auth(r.json()["token"]))


@pytest.mark.parametrize(
    "payload, status, error",
    [
        (b"this is not an image", 415, "bad_image"),
        (png_bytes()[:60], 422, "bad_image"),  # truncated PNG
        (png_bytes(4, 4), 422, "bad_image"),  # too small
    ],
)
def test_bad_reference_images(client, payload, status, error):
    r = client.post("/v1/sessions", files={"reference": ("x.png", payload, "image/png")})
    assert r.status_code == status, r.text
    assert r.json()["error"] == error and r.json()["message"]


def test_decompression_bomb_is_refused_before_decoding(client):
    from test_media_inputs import png_of_size

    png = png_of_size(20000, 20000)  # a few hundred KB; the header alone must refuse it
    r = client.post("/v1/sessions", files={"reference": ("bomb.png", png, "image/png")})
    # the server's limit, not PIL's ("exceeds limit of 178956970 pixels, could be decompression bomb DOS attack")
    assert r.status_code == 413, r.text
    assert r.json()["message"].endswith(f"at most {client.app.state.registry.config.max_image_pixels} pixels are accepted"), r.text


def test_an_upload_is_decoded_off_the_event_loop(client, monkeypatch):
    """A 16-Mpixel PNG is 60 KB on the wire and took 290 ms to decode, every stream's frames waiting."""
    import asyncio

    from server import routes

    decode, where = routes.decode_upload, []

    def decode_and_look(*args):
        try:
            asyncio.get_running_loop()
            where.append("event loop")
        except RuntimeError:
            where.append("a thread of its own")
        return decode(*args)

    monkeypatch.setattr(routes, "decode_upload", decode_and_look)
    r = client.post("/v1/sessions", files={"reference": ("f.png", png_bytes(), "image/png")})
    assert r.status_code == 201 and where == ["a thread of its own"]
    client.delete(r.json()["resource"], headers=auth(r.json()["token"]))


def test_oversized_upload(client):
    big = b"\x00" * (6 * 1024 * 1024)
    r = client.post("/v1/sessions", files={"reference": ("big.png", big, "image/png")})
    assert r.status_code == 413 and r.json()["error"] == "too_large"
    # in words a person reads (it was "request body of 6291648 bytes; the limit is 4194304")
    assert re.fullmatch(r"request body of 6 MiB; the limit is 4 MiB", r.json()["message"]), r.json()["message"]


@pytest.mark.parametrize(
    "kwargs, status",
    [
        ({"json": {"avatar": "nobody"}}, 404),
        ({"json": {"seed": "x"}}, 422),
        ({"json": {"seed": -1}}, 422),
        ({"json": {"seed": 1.5}}, 422),
        ({"json": {"seed": True}}, 422),
        ({"json": {"caption": 5}}, 422),  # was a 500 (len() of an int)
        ({"json": {"caption": ["smiling"]}}, 422),
        ({"json": {"caption": "x" * 501}}, 422),  # MAX_CAPTION_CHARS, as the commands' --text
        ({"json": {"seed": 2**31}}, 422),  # SEED_END, as the commands' --seed
        ({"json": {"avatar": {"id": "ada"}}}, 422),
        ({"json": {"reference": "aGVsbG8="}}, 422),  # images go as multipart files: not silently ignored
        ({"json": {"avatar": "ada", "sed": 3}}, 422),
        ({"data": {"seed": "7.5"}, "files": {"reference": ("f.png", png_bytes(), "image/png")}}, 422),
        ({"data": {"avatar": "ada"}, "files": {"reference": ("f.png", png_bytes(), "image/png")}}, 422),
        ({"json": {"seed": "--5"}}, 422),  # these two were 500s: int() of what passed for digits
        ({"data": {"seed": "\u00b2"}, "files": {"reference": ("f.png", png_bytes(), "image/png")}}, 422),
        ({"json": {"seed": "9" * 5000}}, 422),  # a 500: int() refuses 4300 digits and more
        ({"content": b"[" * 100_000 + b"]" * 100_000, "headers": {"content-type": "application/json"}}, 400),
        ({"json": [1, 2]}, 400),
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400),
        ({"content": b"avatar=ada", "headers": {"content-type": "text/plain"}}, 415),
    ],
)
def test_bad_session_requests(client, kwargs, status):
    r = client.post("/v1/sessions", **kwargs)
    assert r.status_code == status, r.text
    assert "message" in r.json()


def test_files_other_than_one_reference_are_named(client):
    """A caption sent as a file was "Too many files. Maximum number of files is 1."; of two
    references the second was taken without a word."""
    face = ("f.png", png_bytes(), "image/png")
    r = client.post("/v1/sessions", files={"reference": face, "caption": ("c.txt", b"hi", "text/plain")})
    assert r.status_code == 400 and "unexpected file field 'caption'" in r.json()["message"], r.text
    r = client.post("/v1/sessions", files=[("reference", face), ("reference", face)])
    assert r.status_code == 400 and "two 'reference' files" in r.json()["message"], r.text


def test_a_field_given_twice_is_a_422(client):
    """The last one was taken without a word: `{"avatar": "ada", "avatar": "sample"}` (and a form's
    two `seed` fields) made a session of the sample avatar (of the second seed)."""
    registry = client.app.state.registry
    before = set(registry.sessions)
    r = client.post("/v1/sessions", content=b'{"avatar": "ada", "avatar": "sample"}',
                    headers={"content-type": "application/json"})  # fmt: skip
    assert r.status_code == 422 and r.json()["error"] == "repeated_field", r.text
    assert "'avatar' is given more than once" in r.json()["message"]
    seeds = b"".join(b'--XyZ\r\nContent-Disposition: form-data; name="seed"\r\n\r\n%d\r\n' % n for n in (1, 2))
    r = client.post("/v1/sessions", content=seeds + _multipart("XyZ", png_bytes()),
                    headers={"content-type": "multipart/form-data; boundary=XyZ"})  # fmt: skip
    assert r.status_code == 422 and r.json()["error"] == "repeated_field", r.text
    assert set(registry.sessions) == before


def test_a_caption_that_is_not_unicode_text_is_a_422(client):
    """JSON may spell a lone surrogate ("\\ud800"): the caption encoder's tokenizer raised a
    TypeError on it, a 500 with a traceback (here and in control messages)."""
    r = client.post("/v1/sessions", content=b'{"caption": "smiling \\ud800"}',
                    headers={"content-type": "application/json"})  # fmt: skip
    assert r.status_code == 422 and r.json()["error"] == "bad_caption", r.text
    assert "lone surrogate" in r.json()["message"]
    s = new_session(client)
    for kind in ("caption", "speak"):
        body = b'{"type": "%s", "text": "hi \\udc80 there"}' % kind.encode()
        r = client.post(s["resource"] + "/control", content=body, headers=auth(s["token"]))
        assert r.status_code == 400 and "lone surrogate" in r.json()["message"], r.text
    client.delete(s["resource"], headers=auth(s["token"]))


def test_a_json_body_that_is_not_utf8_is_a_400_as_over_control(client):
    """json.loads took the bytes of UTF-16 and UTF-32 (with or without a byte order mark): a
    session was made of a body that /control refused as not UTF-8 (JSON's encoding, RFC 8259)."""
    registry = client.app.state.registry
    before = set(registry.sessions)
    json_type = {"content-type": "application/json"}
    for encoding in ("utf-16", "utf-16-le", "utf-32", "utf-32-be"):
        r = client.post("/v1/sessions", content='{"seed": 7}'.encode(encoding), headers=json_type)
        assert (r.status_code, r.json()["error"]) == (400, "bad_json"), (encoding, r.text)
        assert "not UTF-8 text" in r.json()["message"], r.text
    assert set(registry.sessions) == before
    # (a UTF-8 byte order mark is let pass, as before: RFC 8259 lets a parser ignore it)
    r = client.post("/v1/sessions", content=b'\xef\xbb\xbf{"seed": 7}', headers=json_type)
    assert r.status_code == 201, r.text
    client.delete(r.json()["resource"], headers=auth(r.json()["token"]))


@pytest.mark.parametrize("charset, status", [("utf-16", 415), ('"UTF-16LE"', 415), ("latin-1", 415),
                                             ("UTF-8", 201), ('"utf-8"', 201)])  # fmt: skip
def test_a_json_body_labelled_with_another_charset_is_a_415(client, charset, status):
    """`application/json; charset=utf-16` was ignored: its body read as UTF-8 all the same, a session
    made of what the client said was UTF-16. JSON is UTF-8 (RFC 8259): another charset is refused."""
    before = set(client.app.state.registry.sessions)
    labelled = {"content-type": f"application/json; charset={charset}"}
    r = client.post("/v1/sessions", content=b'{"seed": 7}', headers=labelled)
    if r.status_code == 201:  # (given back whether it should have been made or not)
        client.delete(r.json()["resource"], headers=auth(r.json()["token"]))
    assert r.status_code == status, r.text
    if status == 415:
        assert r.json()["error"] == "unsupported_media_type", r.text
        assert "JSON is sent as UTF-8" in r.json()["message"], r.text
        assert set(client.app.state.registry.sessions) == before


def _multipart(boundary: str, png: bytes) -> bytes:
    return (f"--{boundary}\r\nContent-Disposition: form-data; name=\"reference\"; filename=\"me.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + png + f"\r\n--{boundary}--\r\n".encode()  # fmt: skip


def test_an_upload_cut_short_is_refused_not_replaced_by_the_sample_avatar(client):
    """starlette's parser drops a part without its closing boundary: a 201 with the sample avatar
    for a client that sent its own face."""
    registry = client.app.state.registry
    before = set(registry.sessions)
    whole = _multipart("XyZ", png_bytes())
    headers = {"content-type": "multipart/form-data; boundary=XyZ"}
    for cut in (whole[:-9], whole[: len(whole) // 2], whole[:40]):
        r = client.post("/v1/sessions", content=cut, headers=headers)
        assert r.status_code == 400 and r.json()["error"] == "bad_form", r.text
        assert "cut short" in r.json()["message"]
    assert set(registry.sessions) == before
    quoted = 'multipart/form-data; boundary="XyZ"; charset=utf-8'
    for content_type in ("multipart/form-data; boundary=XyZ", quoted):
        r = client.post("/v1/sessions", content=whole, headers={"content-type": content_type})
        assert r.status_code == 201, r.text
        client.delete(r.json()["resource"], headers=auth(r.json()["token"]))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"json": {"avatar": "ada", "caption": None, "seed": 7}},
        {"json": {"seed": "7"}},
        {"data": {"seed": "7", "caption": ""}, "files": {"reference": ("f.png", png_bytes(), "image/png")}},
    ],
)
def test_session_fields_that_are_accepted(client, kwargs):
    r = client.post("/v1/sessions", **kwargs)
    assert r.status_code == 201, r.text
    s = r.json()
    client.delete(s["resource"], headers=auth(s["token"]))


def test_session_tokens(client):
    s = new_session(client)
    url = s["resource"]
    assert client.get(url).status_code == 401
    assert client.get(url, headers=auth("wrong")).status_code == 403
    assert client.delete(url, headers=auth("wrong")).status_code == 403
    assert client.get("/v1/sessions/nope", headers=auth(s["token"])).status_code == 404
    assert client.post(s["whep"], content=b"v=0", headers={"content-type": "application/sdp"}).status_code == 401
    client.delete(url, headers=auth(s["token"]))


def test_server_token():
    with TestClient(make_app(token="sekrit")) as c:
        wait_ready(c)
        assert c.post("/v1/sessions", json={}).status_code == 401
        # with the challenge a 401 must carry (RFC 9110), as a session's calls' 401s have it
        for path in ("/v1/sessions", "/v1/whep"):
            refused = c.post(path, content=b"")
            assert refused.status_code == 401 and refused.headers.get("www-authenticate") == "Bearer", path
        assert c.post("/v1/sessions", json={}, headers=auth("nope")).status_code == 403
        r = c.post("/v1/sessions", json={}, headers=auth("sekrit"))
        assert r.status_code == 201
        # or in the URL, as docs/api.md says (a WHEP player given only a URL; the web page's ?token=)
        assert c.post("/v1/sessions?token=nope", json={}).status_code == 403
        made = c.post("/v1/sessions?token=sekrit", json={})
        assert made.status_code == 201, made.text
        c.delete(made.json()["resource"], headers=auth("sekrit"))
        # either way, as a session's calls take theirs: a stale one beside the right one was a 403
        for url, headers in (("/v1/sessions?token=sekrit", auth("stale")), ("/v1/sessions?token=stale", auth("sekrit"))):
            made = c.post(url, json={}, headers=headers)
            assert made.status_code == 201, (url, made.text)
            c.delete(made.json()["resource"], headers=auth("sekrit"))
        # accepted for any session on the WebSocket too, as over HTTP (it was refused: 4403)
        with c.websocket_connect(f"{r.json()['stream']}?token=sekrit") as ws:
            ws.send_text('{"type": "start"}')
            assert '"ready"' in ws.receive_text()
            ws.send_text('{"type": "stop"}')
        # a stale ?token= beside the right header, as over HTTP (it was 4403)
        s = c.post("/v1/sessions", json={}, headers=auth("sekrit")).json()
        with c.websocket_connect(f"{s['stream']}?token=stale", headers=auth(s["token"])) as ws:
            ws.send_text('{"type": "start"}')
            assert '"ready"' in ws.receive_text()
            ws.send_text('{"type": "stop"}')


@pytest.mark.parametrize("host, says", [("127.0.0.1", "Address already in use"), ("no-such-host.invalid", "")])
def test_a_port_in_use_or_an_unknown_host_is_refused_before_the_model_loads(host, says, capsys, monkeypatch):
    """A port in use or a host that does not resolve was uvicorn's own error (exit 3), after the
    model had loaded, warmed and measured its capacity: minutes for a large one."""
    import socket

    from streamgen.cli import main

    def serve(*args, **kwargs):
        raise AssertionError("the server started")

    monkeypatch.setattr("server.uvicorn_server.SessionClosingServer.run", serve)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--model", "debug", "--host", host, "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on {host}:{port}: " in err and says in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_an_empty_host_is_refused_not_taken_for_every_interface(capsys, monkeypatch):
    """`--host "$UNSET"` listened on every interface (0.0.0.0 and ::, uvicorn's reading of ""),
    serving the network where the default serves this machine alone."""
    from streamgen.cli import main

    def serve(*args, **kwargs):
        raise AssertionError("the server started")

    monkeypatch.setattr("server.uvicorn_server.SessionClosingServer.run", serve)
    assert main(["serve", "--model", "debug", "--host", "", "--port", str(free_port())]) == 2
    err = capsys.readouterr().err
    assert err == "streamgen serve: error: --host '' names no address: give 127.0.0.1 (this machine only, " \
        "the default) or 0.0.0.0 (every interface)\n", err


@pytest.mark.parametrize("no_color, colours", [("1", False), ("", None)])
def test_no_color_turns_off_the_colours_of_the_servers_log(no_color, colours, monkeypatch):
    """uvicorn coloured its log lines on a terminal whatever NO_COLOR said (None: where a terminal)."""
    from streamgen.cli import main

    used = []
    monkeypatch.setattr("server.uvicorn_server.SessionClosingServer.run", lambda server: used.append(server.config.use_colors))
    monkeypatch.setenv("NO_COLOR", no_color)
    main(["serve", "--model", "debug", "--port", str(free_port())])  # (2: "did not start", not having run)
    assert used == [colours]


def test_an_sp_follower_rank_does_not_check_the_port_rank_0_listens_on(capsys, monkeypatch):
    """Under `serve --sp N` only rank 0 listens. A follower that checked the address raced rank
    0's listening socket: on a loaded machine it got there after rank 0 listened, said 'Address
    already in use' and stopped every rank (CI, test_serve_with_sp_streams_and_shuts_down)."""
    import socket

    import server.sp_host
    from streamgen.cli import main

    followed = []
    monkeypatch.setattr(server.sp_host, "follow", lambda *args: followed.append(args) or 0)
    for name, value in {"TORCHELASTIC_RUN_ID": "test", "RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    with socket.socket() as rank_0:  # rank 0's server, listening already
        rank_0.bind(("127.0.0.1", 0))
        rank_0.listen()
        port = rank_0.getsockname()[1]
        assert main(["serve", "--sp", "2", "--model", "debug", "--port", str(port)]) == 0, capsys.readouterr().err
    assert len(followed) == 1


@pytest.mark.parametrize("token", ["", " sekrit", "se krit", "sekr\u00eft", "sekrit\n"])
def test_a_server_token_no_request_can_carry_is_refused_at_start(token, capsys, monkeypatch):
    """`--token ""` (an unset variable: `--token "$TOKEN"`) started a server no session could be
    made on: an empty bearer counts as none (401 for every request), and a token with white space
    or a character outside ASCII cannot be sent in `Authorization: Bearer` as it is. Refused in
    one line before the model loads."""
    from streamgen.cli import main

    def serve(*args, **kwargs):  # (it would serve until stopped)
        raise AssertionError("the server started")

    monkeypatch.setattr("server.uvicorn_server.SessionClosingServer.run", serve)
    assert main(["serve", "--port", str(free_port()), "--model", "debug", "--token", token]) == 2
    err = capsys.readouterr().err
    assert "--token" in err and "printable ASCII" in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("token", ["ab+c/d=", "a&b", "a#b", "a%2Bb", "a?b"])
def test_a_server_token_a_url_would_change_is_refused_at_start(token, capsys, monkeypatch):
    """The web page and WHEP players send it as ?token=, where '+' reads as a space (openssl rand
    -base64 makes them): every such request was a 403 "wrong server token"."""
    from streamgen.cli import main

    def serve(*args, **kwargs):
        raise AssertionError("the server started")

    monkeypatch.setattr("server.uvicorn_server.SessionClosingServer.run", serve)
    assert main(["serve", "--port", str(free_port()), "--model", "debug", "--token", token]) == 2
    err = capsys.readouterr().err
    assert "changes meaning in a URL's ?token=" in err and len(err.strip().splitlines()) == 1, err


def test_a_ctrl_c_ends_serve_with_130_as_any_command(monkeypatch, capsys):
    """uvicorn shuts down on a Ctrl-C and then raises it again: serve took that for a clean end
    (exit code 0), where a SIGTERM, raised again as the signal, ended it with 143."""
    from streamgen.cli import main

    def interrupted(server):
        server.started = True
        raise KeyboardInterrupt

    monkeypatch.setattr("server.uvicorn_server.SessionClosingServer.run", interrupted)
    assert main(["serve", "--model", "debug", "--port", str(free_port())]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "interrupted"


@pytest.mark.parametrize("token, problem", [("a b", "printable ASCII"), ("ab+c", "changes meaning in a URL")])
def test_a_bad_token_from_the_environment_is_said_to_come_from_it(token, problem, capsys, monkeypatch):
    """It was said to be --token's, which the command line did not have."""
    from streamgen.cli import main

    def serve(*args, **kwargs):
        raise AssertionError("the server started")

    monkeypatch.setattr("server.uvicorn_server.SessionClosingServer.run", serve)
    monkeypatch.setenv("STREAMGEN_TOKEN", token)
    assert main(["serve", "--port", str(free_port()), "--model", "debug"]) == 2
    err = capsys.readouterr().err
    assert "error: $STREAMGEN_TOKEN" in err and problem in err and "--token" not in err, err


@pytest.mark.parametrize(
    "sdp, content_type, status",
    [
        ("v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\nm=video", "application/sdp", 400),  # truncated
        ("hello", "application/sdp", 400),
        ("v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n", "application/sdp", 400),  # no media
        ("v=0\r\n", "text/plain", 415),
    ],
)
def test_bad_offers(client, sdp, content_type, status):
    s = new_session(client)
    r = client.post(s["whep"], content=sdp.encode(), headers={"content-type": content_type, **auth(s["token"])})
    assert r.status_code == status, r.text
    assert r.json()["error"] in ("bad_sdp", "unsupported_media_type")
    # the session survives a bad offer: the client can send a good one
    assert client.delete(s["resource"], headers=auth(s["token"])).status_code == 204


def _offer(bundle: str, media: str, rtpmap: str) -> str:
    """A one-section offer, whole but for what a test changes."""
    return (
        f"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=group:BUNDLE {bundle}\r\n"
        f"{media}\r\nc=IN IP4 127.0.0.1\r\na=mid:0\r\n{rtpmap}\r\n"
        "a=ice-ufrag:abcd\r\na=ice-pwd:abcdefghijklmnopqrstuvwx\r\n"
        "a=fingerprint:sha-256 " + ":".join(["AB"] * 32) + "\r\na=setup:actpass\r\n"
    )


@pytest.mark.parametrize(
    "sdp, says",
    [
        (
            _offer("0", "m=audio 9 UDP/TLS/RTP/SAVPF 111", "a=sendrecv\r\na=rtpmap:111 opus/48000/2"),
            "no usable media",
        ),
        # aiortc failed on it with an AttributeError, which was the 400's message, and its task's
        # exception was logged at ERROR as never retrieved
        (
            _offer("7 0", "m=video 9 UDP/TLS/RTP/SAVPF 96", "a=recvonly\r\na=rtpmap:96 VP8/90000"),
            "BUNDLE names mid '7', which no m-line has",
        ),
    ],
    ids=["audio-only", "bundle-of-a-missing-mid"],
)
def test_an_offer_the_server_cannot_answer_is_named(client, sdp, says):
    s = new_session(client)
    headers = {"content-type": "application/sdp", **auth(s["token"])}
    r = client.post(s["whep"], content=sdp.encode(), headers=headers)
    assert r.status_code == 400 and says in r.json()["message"], r.text
    client.delete(s["resource"], headers=auth(s["token"]))


def test_admission_control_503(client):
    sessions = []
    for _ in range(10):
        r = client.post("/v1/sessions", json={})
        if r.status_code == 503:
            break
        assert r.status_code == 201
        sessions.append(r.json())
    assert len(sessions) == 3  # max_sessions of this app
    assert r.headers["retry-after"].isdigit()
    assert "capacity" in r.json()["reason"]
    metrics = client.get("/metrics").text
    assert 'streamgen_sessions_rejected_total{reason="capacity"}' in metrics
    for s in sessions:
        client.delete(s["resource"], headers=auth(s["token"]))
    assert client.post("/v1/sessions", json={}).status_code == 201


def test_a_full_server_refuses_a_request_that_can_never_work_with_its_4xx(client):
    """An unknown avatar, a bad seed, a misspelt field or a bad offer got the full server's 503 with
    Retry-After, which sent a client (a WHEP player) to retry for good what could never work."""
    registry = client.app.state.registry
    held = [new_session(client) for _ in range(registry.admitting() - len(registry.sessions))]
    offer = _offer("0", "m=video 9 UDP/TLS/RTP/SAVPF 96", "a=recvonly\r\na=rtpmap:96 VP8/90000")
    sdp = {"content-type": "application/sdp"}
    try:
        assert client.post("/v1/sessions", json={}).status_code == 503  # full
        for r, status, error in (
            (client.post("/v1/sessions", json={"avatar": "nobody"}), 404, "unknown_avatar"),
            (client.post("/v1/sessions", json={"seed": -1}), 422, "bad_seed"),
            (client.post("/v1/sessions", json={"avatr": "ada"}), 422, "unknown_field"),
            (client.post("/v1/sessions", content=b"{", headers={"content-type": "application/json"}), 400, "bad_json"),
            (client.post("/v1/sessions", content=b"x", headers={"content-type": "text/plain"}), 415,
             "unsupported_media_type"),
            (client.post("/v1/whep?avatar=nobody", content=offer.encode(), headers=sdp), 404, "unknown_avatar"),
            (client.post("/v1/whep?seed=x", content=offer.encode(), headers=sdp), 422, "bad_seed"),
            (client.post("/v1/whep", content=b"v=0 garbage", headers=sdp), 400, "bad_sdp"),
        ):  # fmt: skip
            assert (r.status_code, r.json()["error"]) == (status, error), r.text
        # what passes the checks is refused for the room it needs (an upload before its decoding)
        assert client.post("/v1/whep?avatar=ada", content=offer.encode(), headers=sdp).status_code == 503
        upload = client.post("/v1/sessions", files={"reference": ("a.png", b"not a picture", "image/png")})
        assert upload.status_code == 503, upload.text
    finally:
        for s in held:
            client.delete(s["resource"], headers=auth(s["token"]))


def test_session_fields_in_the_url_are_refused_not_ignored(client):
    """`POST /v1/sessions?avatar=nobody&seed=x` (as /v1/whep takes them) made a session of the
    sample avatar: the query was never read. Only the server token may come there."""
    sessions = set(client.app.state.registry.sessions)
    for query in ("avatar=ada", "avatar=nobody&seed=x", "caption=smiling", "tokn=abc"):
        r = client.post(f"/v1/sessions?{query}", json={})
        assert r.status_code == 422 and r.json()["error"] == "unknown_field", (query, r.text)
        assert "only POST /v1/whep takes them in the URL" in r.json()["message"], r.text
    assert set(client.app.state.registry.sessions) == sessions


def test_metrics_names(client):
    text = client.get("/metrics").text
    for name in ("streamgen_sessions_active", "streamgen_chunk_latency_seconds_bucket", "streamgen_generated_fps",
                 "streamgen_dropped_chunks_total", "streamgen_queue_depth"):  # fmt: skip
        assert name in text


def test_the_capacity_gauge_says_what_the_server_admits_now(client, monkeypatch):
    """Set at each admission, it kept the last capacity once the model process had died, while
    every session was refused and /readyz said capacity 0."""
    from types import SimpleNamespace

    def capacity_gauge() -> float:
        lines = client.get("/metrics").text.splitlines()
        return float(next(x for x in lines if x.startswith("streamgen_capacity_sessions ")).split()[1])

    assert capacity_gauge() == client.get("/readyz").json()["capacity"] == 3
    registry = client.app.state.registry
    monkeypatch.setattr(registry, "host", SimpleNamespace(down="the model process exited (code -9)"))
    assert client.post("/v1/sessions", json={}).status_code == 503
    assert capacity_gauge() == client.get("/readyz").json()["capacity"] == 0


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


def test_an_api_path_with_a_trailing_slash_says_the_path_without(client):
    """It was a 404 'nothing at /v1/sessions/', a path one slash from the one meant."""
    r = client.post("/v1/sessions/", json={})
    assert r.status_code == 404, r.text
    assert r.json()["message"] == "nothing at /v1/sessions/: the path is /v1/sessions, without the trailing slash"
    assert client.get("/v1/nope/").json()["message"] == "nothing at /v1/nope/"


def test_a_body_with_a_content_coding_is_refused_saying_so(client):
    """Content-Encoding was not looked at: a gzipped JSON body was read as it came ('not UTF-8'), and
    a body marked gzip that was not made a session."""
    import gzip

    before = set(client.app.state.registry.sessions)
    for body in (gzip.compress(b'{"seed": 7}'), b'{"seed": 7}'):
        r = client.post("/v1/sessions", content=body, headers={"content-type": "application/json",
                                                               "content-encoding": "gzip"})  # fmt: skip
        assert r.status_code == 415 and r.headers["accept-encoding"] == "identity", r.text
        assert r.json()["message"] == "Content-Encoding 'gzip': send the body as it is, without a content coding"
    assert set(client.app.state.registry.sessions) == before
    r = client.post("/v1/sessions", json={}, headers={"content-encoding": "identity"})
    assert r.status_code == 201, r.text
    client.delete(r.json()["resource"], headers=auth(r.json()["token"]))


def test_a_server_allowing_any_origin_serves_every_page():
    with ready_client(cors_origins=["*"]) as any_origin:
        page = {"origin": "https://a.example"}
        r = any_origin.post("/v1/sessions", files={"seed": (None, "7")}, headers=page)
        assert r.status_code == 201, r.text
        any_origin.delete(r.json()["resource"], headers=auth(r.json()["token"]))


def test_cors_origin_must_be_an_origin():
    from streamgen.cli import main

    assert main(["serve", "--port", str(free_port()), "--cors-origin", "app.example.org/path"]) == 2


def test_phone_photos_are_taken_upright_and_multi_picture_jpegs_accepted(tmp_path):
    """A portrait stored sideways with an EXIF orientation came out lying down; an MPO (a JPEG
    with a second picture: cameras' and phones' portrait shots) was refused with 415."""
    from server.avatars import decode_reference
    from streamgen.media import read_image

    stored = Image.new("RGB", (80, 40), "white")  # stored 80 wide and 40 high, shown 40 x 80
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees to view
    buf = io.BytesIO()
    stored.save(buf, format="JPEG", exif=exif)
    (tmp_path / "portrait.jpg").write_bytes(buf.getvalue())
    assert decode_reference(buf.getvalue(), 1 << 24).shape == (80, 40, 3)
    assert read_image(tmp_path / "portrait.jpg").shape == (80, 40, 3)  # (generate --reference)
    mpo = io.BytesIO()
    Image.new("RGB", (64, 48), "red").save(mpo, format="MPO", save_all=True, append_images=[Image.new("RGB", (64, 48))])
    assert Image.open(io.BytesIO(mpo.getvalue())).format == "MPO"
    picture = decode_reference(mpo.getvalue(), 1 << 24)
    assert picture.shape == (48, 64, 3) and picture[..., 0].mean() > 200  # the first picture


def test_routing_errors_have_the_api_error_shape(client):
    """docs/api.md: every error is {"error", "message"}; unknown paths and methods were FastAPI's
    {"detail": "Not Found"}."""
    for r, status, error in (
        (client.get("/v1/nothing"), 404, "not_found"),
        (client.get("/no-such-page.html"), 404, "not_found"),  # (the web client's static files)
        (client.delete("/v1/avatars"), 405, "method_not_allowed"),
    ):
        assert r.status_code == status and r.json()["error"] == error and r.json()["message"], r.text
    assert "GET" in client.delete("/v1/avatars").headers["allow"]


def test_a_fault_of_the_servers_own_is_a_500_in_the_apis_json(client, monkeypatch):
    """It was starlette's text/plain 'Internal Server Error', which a client reading the error's JSON could not parse."""
    def broken():
        raise RuntimeError("a bug")

    monkeypatch.setattr("server.routes.list_avatars", broken)
    # (not entered: the app's lifespan is the module client's)
    r = TestClient(client.app, raise_server_exceptions=False).get("/v1/avatars")
    assert r.status_code == 500 and r.json() == {
        "error": "internal_error", "message": "GET /v1/avatars failed in the server (its log has why)"}


def test_a_head_of_an_api_get_route_is_answered_as_its_get(client):
    """A monitor's HEAD of /healthz (or an avatar's picture) was answered by the web page's files,
    mounted at /: 404 `nothing at /healthz`, a path that is there."""
    s = new_session(client)
    for path, headers in (("/healthz", {}), ("/readyz", {}), ("/v1/avatars", {}), ("/v1/avatars/ada.png", {}),
                          (f"/v1/sessions/{s['id']}", auth(s["token"]))):  # fmt: skip
        got, head = client.get(path, headers=headers), client.head(path, headers=headers)
        assert head.status_code == got.status_code == 200, (path, head.text)
        assert head.headers["content-type"] == got.headers["content-type"], path
    assert client.head("/v1/avatars/nobody.png").status_code == 404
    assert client.head(f"/v1/sessions/{s['id']}").status_code == 401  # (its token, as its GET)
    assert client.head("/").status_code == 200  # (the page, as before)
    client.delete(f"/v1/sessions/{s['id']}", headers=auth(s["token"]))


def test_a_method_an_api_path_does_not_take_is_a_405_naming_those_it_does(client):
    """The web page's files, mounted at /, answered them: a GET of /v1/sessions was a 404 `nothing
    at /v1/sessions`, and a PUT a 405 whose Allow said `GET, HEAD`, the files' methods."""
    for method, path, allow in (
        ("GET", "/v1/sessions", "POST, DELETE"),
        ("PUT", "/v1/sessions", "POST, DELETE"),
        ("HEAD", "/v1/sessions", "POST, DELETE"),
        ("PUT", "/v1/sessions/abc", "GET, PATCH, DELETE, HEAD"),
        ("GET", "/v1/sessions/abc/control", "POST"),
        ("POST", "/healthz", "GET, HEAD"),
    ):
        r = client.request(method, path)
        assert r.status_code == 405 and r.headers["allow"] == allow, (method, path, r.status_code, r.headers)
        if method != "HEAD":
            assert r.json()["error"] == "method_not_allowed" and method in r.json()["message"], r.text
    assert client.put("/index.html").status_code == 405  # (the page's files: their own answer)
    assert client.get("/v1/nothing").json()["error"] == "not_found"


def test_an_options_of_an_api_path_names_the_methods_it_takes(client):
    """It was a 405 'OPTIONS is not allowed on /v1/sessions', whose Allow named them all the same."""
    for path, allow in (("/v1/sessions", "POST, DELETE"), ("/v1/sessions/abc", "GET, PATCH, DELETE, HEAD"),
                        ("/v1/whep", "POST"), ("/healthz", "GET, HEAD")):  # fmt: skip
        r = client.options(path)
        assert (r.status_code, r.headers.get("allow"), r.content) == (204, allow, b""), (path, r.text)


def test_an_unknown_api_path_is_a_404_whatever_the_method(client):
    """The page's files answered a POST of one with their 405 (Allow: GET, HEAD): a client given
    the server's URL with /v1 on its end heard `POST is not allowed on /v1/v1/sessions`."""
    for method in ("GET", "POST", "PUT", "DELETE", "PATCH"):
        r = client.request(method, "/v1/v1/sessions")
        assert r.status_code == 404 and r.json() == {"error": "not_found", "message": "nothing at /v1/v1/sessions"}, r.text


def test_a_plain_http_request_of_the_websocket_path_says_it_is_one(client):
    """`GET /v1/sessions/{id}/stream` without the upgrade (a client given the `stream` path) was
    a 404 `nothing at`, a path that is there: now 426, naming what to do."""
    for method in ("GET", "POST"):
        r = client.request(method, "/v1/sessions/abc/stream?token=x")
        assert r.status_code == 426 and r.json()["error"] == "upgrade_required", r.text
        assert r.headers["upgrade"] == "websocket" and "ws://" in r.json()["message"], r.headers
    assert client.get("/v1/sessions/abc/stream/x").status_code == 404


def test_any_request_a_client_can_make_is_answered_in_json_without_a_5xx(client):
    """Random methods, routes, bodies and content types, with and without the session's token: a
    refusal (4xx, or 503 at capacity) with a JSON body naming the error, never a 500."""
    import json

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    s = new_session(client)
    sessions = set(client.app.state.registry.sessions)  # this one, and those earlier tests left
    base = f"/v1/sessions/{s['id']}"
    paths = ["/v1/sessions", base, f"{base}/control", f"{base}/whep", f"{base}/whep/x", "/v1/whep",
             "/v1/avatars", "/v1/avatars/sample.png", "/v1/avatars/..%2f.png", "/metrics", "/readyz"]  # fmt: skip
    values = st.recursive(
        st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=30),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
        max_leaves=10,
    )
    fields = st.sampled_from(["avatar", "caption", "seed", "text", "language", "variant", "type", "x"])
    bodies = st.one_of(
        values.map(json.dumps), st.text(max_size=100), st.dictionaries(fields, values, max_size=4).map(json.dumps)
    )
    content_types = st.sampled_from(["application/json", "text/plain", "multipart/form-data",
                                     "multipart/form-data; boundary=xx", "application/sdp", "",
                                     "application/json; charset=utf-16"])  # fmt: skip
    methods = st.sampled_from(["GET", "POST", "DELETE", "PATCH", "PUT", "OPTIONS"])

    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
    @given(methods, st.sampled_from(paths), bodies, content_types, st.booleans())
    def request(method, path, body, content_type, with_token):
        if method == "DELETE" and path == base:
            return  # the session the other requests use
        headers = {"content-type": content_type} if content_type else {}
        if with_token:
            headers.update(auth(s["token"]))
        r = client.request(method, path, content=body.encode(), headers=headers)
        assert r.status_code < 500 or r.status_code == 503, (method, path, body, r.status_code, r.text)
        if r.status_code >= 400:
            assert {"error", "message"} & set(r.json()), (method, path, r.text)
        if r.status_code == 201 and path == "/v1/sessions":  # a session made: given back at once
            made = r.json()
            client.delete(made["resource"], headers=auth(made["token"]))

    request()
    # none made and left behind (one an earlier test left may have reached its unclaimed limit meanwhile)
    assert set(client.app.state.registry.sessions) <= sessions and s["id"] in client.app.state.registry.sessions
    client.delete(base, headers=auth(s["token"]))


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


@pytest.mark.parametrize("level", ["bogus", "trace"])
def test_a_log_level_that_logging_does_not_know_is_refused_by_the_parser(level, capsys):
    """It was `logging.basicConfig`'s ValueError traceback, after every other check had passed."""
    from streamgen.cli import main

    with pytest.raises(SystemExit) as exit:
        main(["serve", "--model", "debug", "--port", "0", "--log-level", level])
    assert exit.value.code == 2 and "argument --log-level: invalid choice" in capsys.readouterr().err


def test_the_server_token_may_come_from_the_environment(monkeypatch):
    """Given only as --token it was in the command line, which any user of the machine reads (ps)."""
    import server.app
    from streamgen.cli import main

    configs = []
    monkeypatch.setattr(server.app, "create_app", lambda config: configs.append(config))
    monkeypatch.setattr("server.uvicorn_server.SessionClosingServer.run", lambda s: setattr(s, "started", True))
    monkeypatch.setenv("STREAMGEN_TOKEN", "from-the-environment")
    assert main(["serve", "--model", "debug", "--port", str(free_port())]) == 0
    assert main(["serve", "--model", "debug", "--port", str(free_port()), "--token", "given"]) == 0
    monkeypatch.setenv("STREAMGEN_TOKEN", "")  # (an empty variable: no token, as without it)
    assert main(["serve", "--model", "debug", "--port", str(free_port())]) == 0
    assert [c.token for c in configs] == ["from-the-environment", "given", None]


def test_a_host_of_this_machine_alone_makes_webrtc_offer_loopback(monkeypatch):
    """Only 127.0.0.1 did: `--host localhost` served the page, and WebRTC offered only the other
    interfaces, where a container without a network has none."""
    import server.app
    from streamgen.cli import main

    configs, checked = [], []
    monkeypatch.setattr(server.app, "create_app", lambda config: configs.append(config))
    monkeypatch.setattr("server.uvicorn_server.SessionClosingServer.run", lambda s: setattr(s, "started", True))
    # (the port check binds its host: a test binds loopback only, never 0.0.0.0's every interface)
    monkeypatch.setattr("server.cli._check_address", lambda host, port: checked.append(host))
    hosts = ("127.0.0.1", "localhost", "127.0.0.2", "0.0.0.0")
    for host in hosts:
        assert main(["serve", "--model", "debug", "--host", host, "--port", str(free_port())]) == 0
    assert [c.loopback for c in configs] == [True, True, True, False]
    assert checked == list(hosts)


@pytest.mark.parametrize("origin", ["https://app.example.org:99999", "http://app.example.org:http"])
def test_a_cors_origin_with_a_port_no_page_can_have_is_refused(origin, capsys, monkeypatch):
    """It was taken, and matched no page's Origin header: each page's calls were blocked."""
    import server.app
    from streamgen.cli import main

    monkeypatch.setattr(server.app, "create_app", lambda config: None)
    monkeypatch.setattr("server.uvicorn_server.SessionClosingServer.run", lambda s: setattr(s, "started", True))
    assert main(["serve", "--port", str(free_port()), "--model", "debug", "--cors-origin", origin]) == 2
    assert f"--cors-origin {origin!r}: an origin is scheme://host[:port]" in capsys.readouterr().err


@pytest.mark.parametrize("origin", ["https://*.example.org", "http://app.*.example.org:8080"])
def test_a_cors_origin_with_a_wildcard_in_it_is_refused_not_taken_for_a_host(origin, capsys, monkeypatch):
    """It was taken for a host of that name, which no page's Origin is: every page's calls were blocked."""
    import server.app
    from streamgen.cli import main

    monkeypatch.setattr(server.app, "create_app", lambda config: None)
    monkeypatch.setattr("server.uvicorn_server.SessionClosingServer.run", lambda s: setattr(s, "started", True))
    assert main(["serve", "--port", str(free_port()), "--model", "debug", "--cors-origin", origin]) == 2
    assert capsys.readouterr().err == (f"streamgen serve: error: --cors-origin {origin!r}: a '*' in an origin "
                                       "matches nothing: give each origin (--cors-origin is repeatable), or '*' alone for any\n")


def test_a_path_no_file_has_is_a_404_whatever_the_method(client):
    """docs/api.md: unknown paths are `not_found`. Outside /v1/ the page's files answered any
    method but GET and HEAD with their 405 before looking: `POST /nope` was `method_not_allowed`."""
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        r = client.request(method, "/nope")
        assert r.status_code == 404 and r.json() == {"error": "not_found", "message": "nothing at /nope"}, r.text
        r = client.request(method, "/index.html")  # a file: its methods are GET and HEAD
        assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD", (method, r.status_code, r.text)
    assert client.post("/").status_code == 405  # (the page itself)


def test_serve_refuses_steps_off_the_students_schedule(capsys, monkeypatch):
    """--steps 3 of the 4-step tiny-avatar was taken (generate refused it): every session then ran
    noise levels the student never learned."""
    from streamgen.cli import main

    def serve(*args, **kwargs):
        raise AssertionError("the server started")

    monkeypatch.setattr("server.uvicorn_server.SessionClosingServer.run", serve)
    assert main(["serve", "--port", str(free_port()), "--model", "tiny-avatar", "--steps", "3"]) == 2
    assert capsys.readouterr().err == (
        "streamgen serve: error: --steps 3: tiny-avatar runs 1, 2 or 4 steps, the levels of the 4-step "
        "schedule it was distilled for (a teacher takes any number)\n"
    )


def test_an_empty_avatar_is_the_sample_avatar_as_api_md_says():
    """docs/api.md: an empty avatar (JSON "", /v1/whep's ?avatar=) counts as none, the sample avatar,
    in both endpoints (each reads its fields with _session_params); beside a reference, no conflict."""
    from server.routes import _session_params

    assert _session_params({"avatar": ""}, has_reference=False) == ("sample", None, None)
    assert _session_params({"avatar": "", "caption": ""}, has_reference=True)[1] is None
    assert "an empty\n`avatar`" in (WEB_DIR.parent / "docs" / "api.md").read_text()


def test_an_empty_seed_is_none_as_an_empty_avatar_or_caption(client):
    """A form's seed field left blank (or `/v1/whep?seed=`, a player's URL template) was a 422
    "seed must be an integer", where a blank avatar or caption beside it counts as none."""
    from server.routes import _session_params

    for blank in ("", " "):
        assert _session_params({"avatar": "", "caption": "", "seed": blank}, has_reference=False) == ("sample", None, None)
    face = ("f.png", png_bytes(), "image/png")
    for kwargs in ({"json": {"seed": ""}}, {"data": {"seed": "", "caption": ""}, "files": {"reference": face}}):
        r = client.post("/v1/sessions", **kwargs)
        assert r.status_code == 201, r.text
        client.delete(r.json()["resource"], headers=auth(r.json()["token"]))


def test_a_file_input_left_blank_is_no_reference(client):
    """An HTML form's file input with no file chosen is sent as an empty part whose filename is "":
    a 422 "reference image is empty" (and, beside the form's avatar, "not both"), where an empty
    avatar or caption counts as none. An empty file that has a name is still refused."""

    def form(filename: str, **fields) -> bytes:  # as a browser sends it
        parts = [f'--XyZ\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n' for name, value in fields.items()]
        parts.append(f'--XyZ\r\nContent-Disposition: form-data; name="reference"; filename="{filename}"\r\n'
                     "Content-Type: application/octet-stream\r\n\r\n\r\n--XyZ--\r\n")  # fmt: skip
        return "".join(parts).encode()

    headers = {"content-type": "multipart/form-data; boundary=XyZ"}
    for fields in ({}, {"avatar": "ada", "caption": "", "seed": ""}):
        r = client.post("/v1/sessions", content=form("", **fields), headers=headers)
        assert r.status_code == 201, r.text
        client.delete(r.json()["resource"], headers=auth(r.json()["token"]))
    r = client.post("/v1/sessions", content=form("me.png"), headers=headers)
    assert r.status_code == 422 and "reference image is empty" in r.json()["message"], r.text


def test_a_model_timeout_without_a_model_process_is_refused_not_ignored(capsys, monkeypatch):
    """docs/serving.md: --model-timeout is "with --model-process"; without it, it was taken and timed nothing."""
    import server.app
    from streamgen.cli import main

    configs = []
    monkeypatch.setattr(server.app, "create_app", lambda config: configs.append(config))
    monkeypatch.setattr("server.uvicorn_server.SessionClosingServer.run", lambda s: setattr(s, "started", True))
    assert main(["serve", "--port", str(free_port()), "--model", "debug", "--model-timeout", "30"]) == 2
    assert capsys.readouterr().err == (
        "streamgen serve: error: --model-timeout 30 applies with --model-process only (a model in this process "
        "cannot be killed apart from the server): add --model-process or leave it out\n"
    )
    assert main(["serve", "--port", str(free_port()), "--model", "debug"]) == 0
    argv = ["serve", "--port", str(free_port()), "--model", "debug", "--model-process", "--model-timeout", "5"]
    assert main(argv) == 0
    assert [(c.inference_process, c.model_timeout_s) for c in configs] == [(False, 60.0), (True, 5.0)]


def _raw_answer(sock) -> bytes:
    """All a server sends on `sock` until it closes it (bounded by the socket's timeout)."""
    answer = b""
    while part := sock.recv(65536):
        answer += part
    return answer


@pytest.mark.parametrize("path, content_type", [("/v1/sessions", "application/json"), ("/v1/whep", "application/sdp")])
def test_a_body_that_stops_coming_is_answered_408_not_waited_for_for_good(path, content_type):
    """A client that sent its headers and part of its body, then nothing, held its socket and up
    to 4 MiB of buffered body for as long as it liked (a slowloris): now the body has a deadline."""
    import json
    import socket

    from server_helpers import live_server

    with live_server(body_timeout_s=0.3) as (url, app):
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
            sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
                         "Content-Length: 100\r\n\r\n{\"avatar\": ".encode())  # fmt: skip
            answer = _raw_answer(sock)  # (the server closes the connection: the body's rest is unread)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), answer
    assert b"connection: close" in head.lower(), head
    said = json.loads(body)
    assert said["error"] == "body_timeout" and "11 bytes of it arrived" in said["message"], said
