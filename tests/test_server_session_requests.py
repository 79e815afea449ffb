"""HTTP API: a session request's body: reference uploads, fields, JSON and multipart encodings, and the
bad ones refused with a 4xx."""

from __future__ import annotations

import io
import re

import pytest
from PIL import Image
from server_helpers import auth, new_session, png_bytes, ready_client

from server.config import WEB_DIR

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def client():
    with ready_client(max_sessions=3) as c:
        yield c


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


def test_session_fields_in_the_url_are_refused_not_ignored(client):
    """`POST /v1/sessions?avatar=nobody&seed=x` (as /v1/whep takes them) made a session of the
    sample avatar: the query was never read. Only the server token may come there."""
    sessions = set(client.app.state.registry.sessions)
    for query in ("avatar=ada", "avatar=nobody&seed=x", "caption=smiling", "tokn=abc"):
        r = client.post(f"/v1/sessions?{query}", json={})
        assert r.status_code == 422 and r.json()["error"] == "unknown_field", (query, r.text)
        assert "only POST /v1/whep takes them in the URL" in r.json()["message"], r.text
    assert set(client.app.state.registry.sessions) == sessions


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
