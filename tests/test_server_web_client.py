"""The web client as the server serves it: its page, its scripts, and the page's fields and elements."""

from __future__ import annotations

import io
import re

import pytest
from PIL import Image
from server_helpers import ready_client

from server.config import WEB_DIR

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def client():
    with ready_client(max_sessions=3) as c:
        yield c


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
