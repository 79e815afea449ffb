"""The web page's smaller matters in real headless Chromium (as test_server_browser.py; skipped
without it): what it holds of a WebSocket stream's frames, and what it says."""

from __future__ import annotations

import os
import shutil
import socket
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest
from server_helpers import live_server, relay_listener

pytestmark = [pytest.mark.browser, pytest.mark.timeout(180)]

# Every ImageBitmap the page decodes, kept: a closed one is 0 x 0.
BITMAPS = """
window.__bitmaps = [];
const realCreateImageBitmap = window.createImageBitmap;
window.createImageBitmap = async (...a) => { const b = await realCreateImageBitmap(...a); __bitmaps.push(b); return b; };
window.openBitmaps = () => __bitmaps.filter((b) => b.width > 0).length;
"""


def test_a_websocket_streams_decoded_frames_are_closed(browser_page, served):
    """Each JPEG frame of a WebSocket stream is decoded into an ImageBitmap, which holds its pixels
    until closed: none was, and at 25 fps they waited for the garbage collector. Each is closed once
    drawn now, and those still waiting for their play time as the page hangs up."""
    with served(max_sessions=1) as (url, app):
        page = browser_page.new_page()
        page.add_init_script(BITMAPS)
        try:
            page.goto(f"{url}/?autostart=1&transport=ws&mic=0")
            page.wait_for_function("window.streamgenStats.framesDecoded >= 20", timeout=60_000)
            # those drawn are closed; those waiting for their play time, not yet
            drawn = page.evaluate("[window.__bitmaps.length - openBitmaps(), window.streamgenStats.framesDecoded]")
            assert drawn[0] == drawn[1], drawn
            page.click("#hangup")
            # (a frame decoding at the hang-up comes after it)
            page.wait_for_function("openBitmaps() === 0", timeout=5_000)
        finally:
            page.close()


def test_a_full_server_is_said_with_when_to_try_again(browser_page, served):
    """A server at capacity answers 503 with Retry-After (docs/api.md): the page said 'failed: 503:
    server is at capacity (1 of 1 ...)' and not when a connect would find room. It says so now."""
    import httpx

    with served(max_sessions=1) as (url, app):
        taken = httpx.post(f"{url}/v1/sessions", json={}).json()
        wait = httpx.post(f"{url}/v1/sessions", json={}).headers["retry-after"]
        page = browser_page.new_page()
        try:
            page.goto(f"{url}/?autostart=1&transport=ws&mic=0")
            page.wait_for_function("window.streamgenStats.state.startsWith('failed')", timeout=20_000)
            said = page.text_content("#status")
            assert said.startswith("failed: 503: server is at capacity (1 of 1"), said
            assert said.endswith(f"; try again in {wait} s"), said
        finally:
            page.close()
            httpx.delete(url + taken["resource"], headers={"Authorization": f"Bearer {taken['token']}"})


def test_a_speak_too_long_is_refused_in_the_same_words_on_both_transports(browser_page, served):
    """The same refusal read 'speak: 422: text too long ...' on a WebRTC page (its speak a POST of
    /control) and 'error: text too long ...' on a WebSocket page (an in-band error): one said it as
    an HTTP status, the other as if the stream had failed. Both say the server's words for the speak
    now."""
    said = {}
    with served(max_sessions=2) as (url, app):
        for transport in ("webrtc", "ws"):
            page = browser_page.new_page()
            try:
                page.goto(f"{url}/?autostart=1&mic=0&transport={transport}")
                page.wait_for_function("window.streamgenStats.framesDecoded >= 3", timeout=60_000)
                page.fill("#speak-text", "hello there, " * 76)  # 988 characters: a minute of speech
                page.click("#speak")
                page.wait_for_function("window.streamgenStats.notice !== ''", timeout=20_000)
                said[transport] = page.text_content("#notice")
                assert page.text_content("#status").startswith("streaming"), transport
                page.click("#hangup")
            finally:
                page.close()
    assert said["webrtc"] == said["ws"], said
    assert said["ws"].startswith("speak: text too long: at least "), said


def test_a_stream_ended_shows_no_live_rates_beside_idle(browser_page, served):
    """Hung up (or ended), the overlay went on showing the stream's last fps and A/V offset (and RTT,
    over WebRTC) beside 'idle', as if something still streamed at that rate. The rates go; what the
    stream came to (its transport, startup, frames) stays."""
    with served(max_sessions=1) as (url, app):
        page = browser_page.new_page()
        try:
            page.goto(f"{url}/?autostart=1&transport=ws&mic=0")
            page.wait_for_function("window.streamgenStats.framesDecoded >= 10", timeout=60_000)
            page.wait_for_function("!document.getElementById('overlay').textContent.includes('fps        –')")
            page.click("#hangup")
            overlay = page.text_content("#overlay").splitlines()
            assert overlay[2:5] == ["fps        –", "A/V offset –", "RTT        –"], overlay
            assert overlay[0] == "transport  websocket" and int(overlay[5].split()[1]) >= 10, overlay
            assert page.evaluate("[window.streamgenStats.fps, window.streamgenStats.avOffsetMs]") == [0, None]
        finally:
            page.close()


@pytest.mark.parametrize("width", [320, 280])
def test_a_phones_narrow_page_fits_its_width(browser_page, width, served):
    """On a phone (320 px wide), the row of Connect, Hang up and the microphone's box did not wrap:
    with the note of a microphone not given beside it, it ran past the screen's edge (the page
    scrolled sideways, the note cut off), and Hang up was squeezed onto two lines. Narrower still
    (280 px, a folded phone's), the controls were 280 px wide beside the page's margins."""
    from test_server_browser_mic import INSECURE

    with served(max_sessions=1) as (url, app):
        page = browser_page.new_page()
        page.set_viewport_size({"width": width, "height": 640})
        page.add_init_script(INSECURE)
        try:
            page.goto(f"{url}/?autostart=1&transport=ws")
            page.wait_for_function("window.streamgenStats.framesDecoded >= 1", timeout=60_000)
            assert page.text_content("#mic-note").startswith("no microphone: the browser gives")
            past_the_edge = """[...document.querySelectorAll('body *')].filter((e) => {
              const r = e.getBoundingClientRect();
              return r.width > 0 && r.right > innerWidth + 0.5;
            }).map((e) => e.id || e.tagName)"""
            assert page.evaluate(past_the_edge) == []
            assert page.evaluate("document.documentElement.scrollWidth") <= width
            height = "document.getElementById('%s').getBoundingClientRect().height"
            assert page.evaluate(height % "hangup") == page.evaluate(height % "connect")  # (one line each)
            page.click("#hangup")
        finally:
            page.close()


def test_a_websocket_stream_wider_than_high_keeps_its_shape(browser_page):
    """The square stage's canvas was stretched to it: a WebSocket stream of 128x64 (Wan's 832x480)
    was drawn squeezed into a square, the face twice as tall as it is. It keeps its shape now,
    with bands above and below (as the <video> of a WebRTC stream has always shown it)."""
    from io import BytesIO

    from PIL import Image

    with live_server(max_sessions=1, width=128, height=64) as (url, app):
        page = browser_page.new_page()
        try:
            page.goto(f"{url}/?autostart=1&transport=ws&mic=0")
            page.wait_for_function("window.streamgenStats.framesDecoded >= 5", timeout=60_000)
            page.evaluate("document.getElementById('overlay').hidden = true")
            shot = Image.open(BytesIO(page.locator("#canvas").screenshot())).convert("L")
            width, height = shot.size
            band = shot.crop((0, 0, width, height // 5))  # a fifth: the band is a quarter of the square
            middle = shot.crop((0, 2 * height // 5, width, 3 * height // 5))
            assert band.getextrema()[1] <= 8, band.getextrema()  # black: nothing drawn there
            assert middle.getextrema()[1] > 8, middle.getextrema()  # the stream
            page.click("#hangup")
        finally:
            page.close()


def test_a_phones_status_and_notice_read_as_lines(browser_page, served):
    """On a phone (320 px wide) the header set the title, the status and the notice side by side:
    a speak refused was said in a column a word or two wide, twenty lines down the screen. The
    status and the notice wrap under the title now, as wide as the screen."""
    with served(max_sessions=1) as (url, app):
        page = browser_page.new_page()
        page.set_viewport_size({"width": 320, "height": 640})
        try:
            page.goto(f"{url}/?autostart=1&transport=ws&mic=0")
            page.wait_for_function("window.streamgenStats.framesDecoded >= 3", timeout=60_000)
            page.fill("#speak-text", "hello there, " * 76)  # refused: a minute of speech
            page.click("#speak")
            page.wait_for_function("window.streamgenStats.notice !== ''", timeout=20_000)
            width = "document.getElementById('%s').getBoundingClientRect().width"
            assert page.evaluate(width % "notice") > 0.7 * 320, page.evaluate(width % "notice")
            assert page.evaluate("document.documentElement.scrollWidth") <= 320
            page.click("#hangup")
        finally:
            page.close()


def test_a_silent_limit_asked_below_two_seconds_is_two(browser_page, served):
    """`?silent_s=0` (or 1) gave 10 s, not the 2 s the page's comment and docs/serving.md name as the
    least (`Number("0") || 10`)."""
    with served() as (url, app):
        page = browser_page.new_page()
        try:
            page.goto(f"{url}/")
            asked = ["0", "1", "3", "2.5", None, "", "x", "-4"]
            got = page.evaluate(
                "async (asked) => { const ws = await import('./websocket.js');"
                " return asked.map((a) => ws.silentLimitMs(a)); }",
                asked,
            )
            assert got == [2000, 2000, 3000, 2500, 10000, 10000, 10000, 2000]
        finally:
            page.close()


def test_a_speak_the_server_never_answers_gives_speak_back(browser_page, served):
    """A speak over WebRTC (a POST of /control) had no limit on its answer: a server that never
    answered left Speak disabled until a hang-up. Past its limit (the page's clock moved on) Speak
    is enabled again, the text kept, the speak not sent again, and the page says it may still be said."""
    with served(max_sessions=1) as (url, app):
        page = browser_page.new_page()
        page.clock.install()
        unanswered = []
        page.route("**/control", lambda route: unanswered.append(route))  # (never answered)
        try:
            page.goto(f"{url}/?autostart=1&mic=0")
            page.wait_for_function("window.streamgenStats.framesDecoded >= 3", timeout=60_000)
            page.fill("#speak-text", "hello")
            page.click("#speak")
            page.wait_for_function("document.getElementById('speak').disabled")
            page.clock.fast_forward(30_000)
            page.wait_for_function("!document.getElementById('speak').disabled", timeout=10_000)
            assert page.text_content("#notice") == "speak: no answer from the server in 20 s; it may still be said"
            assert page.input_value("#speak-text") == "hello" and len(unanswered) == 1
            assert page.text_content("#status") == "streaming (webrtc)"
            page.click("#hangup")
        finally:
            page.close()


def test_why_the_server_ended_a_session_is_said_in_a_users_words(browser_page, served):
    """The page said the server's reasons as they came, codes for programs: 'ended: the server ended
    the session (max_duration: session reached 3 s)', '(idle: no input for 30 s)', '(peer_silent:
    ...)'. It says them in a user's words now, and one it does not know as the server said it."""
    with served() as (url, app):
        page = browser_page.new_page()
        try:
            page.goto(f"{url}/")
            reasons = ["max_duration: session reached 3 s", "idle: no input for 30 s",
                       "peer_silent: nothing from the peer for 10 s", "server shutting down",
                       "host_down: the model process died (exit code -9)", "something new: x"]  # fmt: skip
            said = page.evaluate(
                "async (reasons) => { const p = await import('./page.js');"
                " return reasons.map((r) => p.serverEndedInWords(r)); }",
                reasons,
            )
            assert said == [
                "the session reached this server's time limit (3 s)",
                "the server ended the session: it heard and read nothing from you for 30 s",
                "the server ended the session: it received nothing from this page for 10 s (the connection stalled)",
                "the server shut down",
                "the server's model stopped working: the server needs a restart",
                "the server ended the session (something new: x)",
            ]
        finally:
            page.close()


@pytest.mark.parametrize("width,height", [(844, 390), (667, 375)])
def test_a_landscape_phones_stage_fits_its_height(browser_page, width, height, served):
    """On a phone held sideways (844x390, 667x375) the square stage was 512 px (as wide as the
    screen allowed), taller than the screen: the face's lower half was under its edge. The stage
    fits the screen's height now, square, with the controls beside it."""
    box = "(s) => { const r = document.querySelector(s).getBoundingClientRect(); return [r.width, r.height, r.right, r.bottom]; }"
    with served(max_sessions=1) as (url, app):
        page = browser_page.new_page()
        page.set_viewport_size({"width": width, "height": height})
        try:
            page.goto(f"{url}/?autostart=1&transport=ws&mic=0")
            page.wait_for_function("window.streamgenStats.framesDecoded >= 1", timeout=60_000)
            stage_width, stage_height, _, stage_bottom = page.evaluate(box, ".stage")
            assert stage_bottom <= height and stage_width >= 200, (stage_width, stage_height, stage_bottom)
            assert abs(stage_width - stage_height) < 0.5, (stage_width, stage_height)  # square
            assert page.evaluate(box, "#canvas")[3] <= height
            # the controls beside the stage, not under it, nor past the screen's edge
            stage_right = page.evaluate(box, ".stage")[2]
            hangup_width, _, hangup_right, _ = page.evaluate(box, "#hangup")
            assert stage_right <= hangup_right - hangup_width and hangup_right <= width, (stage_right, hangup_right)
            assert page.evaluate("document.documentElement.scrollWidth") <= width
            page.click("#hangup")
        finally:
            page.close()


@pytest.mark.parametrize("width,height", [(844, 390), (667, 375)])
def test_a_landscape_phones_stage_fits_under_a_header_of_two_lines(browser_page, width, height, served):
    """The stage's height allowed for a header of one line (2.5rem): a notice beside the status (a
    speak refused) wrapped the header to two lines on a phone held sideways, and the stage's lower
    edge went ~20 px past the screen's. It fits under the header whatever its height now."""
    # (the bottom in the page's coordinates: the click on Speak may scroll it)
    box = "(s) => { const r = document.querySelector(s).getBoundingClientRect(); return [r.width, r.height, r.bottom + scrollY]; }"
    with served(max_sessions=1) as (url, app):
        page = browser_page.new_page()
        page.set_viewport_size({"width": width, "height": height})
        try:
            page.goto(f"{url}/?autostart=1&transport=ws&mic=0")
            page.wait_for_function("window.streamgenStats.framesDecoded >= 1", timeout=60_000)
            page.fill("#speak-text", "hello there, " * 76)  # refused: a minute of speech
            page.click("#speak")
            page.wait_for_function("window.streamgenStats.notice !== ''", timeout=20_000)
            one_line = page.evaluate(box, "header h1")[1]
            assert page.evaluate(box, "header")[1] > 2 * one_line  # (wrapped: what this is about)
            page.evaluate("new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)))")  # (laid out)
            stage_width, stage_height, stage_bottom = page.evaluate(box, ".stage")
            assert stage_bottom <= height + 0.5 and stage_width >= 200, (stage_width, stage_height, stage_bottom)
            assert abs(stage_width - stage_height) < 0.5, (stage_width, stage_height)  # square
            page.click("#hangup")
        finally:
            page.close()


def test_a_phones_status_with_a_word_longer_than_the_screen_fits_its_width(browser_page, served):
    """A status or notice holding a word wider than a phone's screen (an `?avatar=` of 75 letters,
    said back in both) was not broken: the page was 727 px wide on a 320 px screen, scrolled
    sideways, the rest of the words past its edge. The word breaks now."""
    past_the_edge = """[...document.querySelectorAll('body *')].filter((e) => {
      const r = e.getBoundingClientRect();
      return r.width > 0 && r.right > innerWidth + 0.5;
    }).map((e) => e.id || e.tagName)"""
    with served(max_sessions=1) as (url, app):
        page = browser_page.new_page()
        page.set_viewport_size({"width": 320, "height": 640})
        try:
            page.goto(f"{url}/?transport=ws&mic=0&avatar=" + "a_long_avatar_name_" * 4)
            page.wait_for_function("window.streamgenStats.notice.startsWith('no avatar')")
            assert page.evaluate(past_the_edge) == []
            assert page.evaluate("document.documentElement.scrollWidth") <= 320
            page.click("#connect")
            page.wait_for_function("window.streamgenStats.state.startsWith('failed: no avatar')")
            assert page.evaluate(past_the_edge) == []
            assert page.evaluate("document.documentElement.scrollWidth") <= 320
        finally:
            page.close()


def as_a_server_that_takes_captions(route):
    """The avatars' answer of a server whose model takes captions (this test server's takes none)."""
    answer = route.fetch().json()
    route.fulfill(json={**answer, "captions": True})


def test_a_caption_is_offered_only_by_a_server_that_takes_one(browser_page, served):
    """The caption's field was there for a model that takes no captions (`--model debug`): each
    connect with a caption failed, '422: this model takes no captions'. The server says whether
    its model takes one (GET /v1/avatars), and the page offers the field only then, saying why not."""
    with served(max_sessions=1) as (url, app):
        page = browser_page.new_page()
        try:
            page.goto(f"{url}/?transport=ws&mic=0")
            page.wait_for_selector("#avatars button")
            assert page.is_disabled("#caption")
            assert page.text_content("#caption-note") == "(this server's model takes none)"
            page.route("**/v1/avatars", as_a_server_that_takes_captions)
            page.reload()
            page.wait_for_selector("#avatars button")
            assert page.is_enabled("#caption") and page.text_content("#caption-note") == ""
        finally:
            page.close()


def test_a_caption_is_sent_whole_and_counted_as_the_server_counts_it(browser_page, served):
    """The caption's field had maxlength=500, which counts UTF-16 code units: a caption of 300 emoji
    (300 characters, the server's count, under its 500) was cut at 250 without a word. It is sent
    whole now, and one over the server's limit is refused in its words, which count characters."""
    import json

    caption = "\N{GRINNING FACE}" * 300
    with served(max_sessions=1) as (url, app):
        page = browser_page.new_page()
        try:
            page.route("**/v1/avatars", as_a_server_that_takes_captions)
            page.goto(f"{url}/?transport=ws&mic=0")
            page.wait_for_selector("#avatars button")
            page.fill("#caption", caption)
            with page.expect_request(lambda r: r.url.endswith("/v1/sessions") and r.method == "POST") as sent:
                page.click("#connect")
            assert json.loads(sent.value.post_data)["caption"] == caption
            # (this test server's model takes no captions: it is the length that is to be said here)
            page.wait_for_function("window.streamgenStats.state.startsWith('failed')", timeout=20_000)
            page.fill("#caption", "\N{GRINNING FACE}" * 501)
            page.click("#connect")
            page.wait_for_function("document.getElementById('status').textContent.includes('longer')", timeout=20_000)
            assert page.text_content("#status") == "failed: 422: caption longer than 500 characters"
        finally:
            page.close()


def test_a_speak_of_emoji_is_not_cut_at_half_the_servers_limit(browser_page, served):
    """The speak field had maxlength=1000, which counts UTF-16 code units where the server counts
    characters (server/protocol.py MAX_SPEAK_CHARS): 600 emoji were cut to 500 without a word."""
    with served(max_sessions=1) as (url, app):
        page = browser_page.new_page()
        try:
            page.goto(f"{url}/?transport=ws&mic=0")
            page.fill("#speak-text", "\N{GRINNING FACE}" * 600)
            assert page.evaluate("[...document.getElementById('speak-text').value].length") == 600
        finally:
            page.close()


@contextmanager
def refusing_websockets(port: int, refusals: int):
    """A TCP relay on 127.0.0.1 to `port` that answers the first `refusals` WebSocket upgrades as a
    server at its --max-connections does (503, Retry-After: 1, the connection closed) and passes
    everything else on; yields (its port, the upgrades refused so far)."""
    refused = []

    def pump(source, sink):
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:  # the other side closed
            pass
        finally:
            sink.close()

    def serve(client):
        head = b""
        while b"\r\n\r\n" not in head and len(head) < 65536 and (data := client.recv(65536)):
            head += data
        if b"upgrade: websocket" in head.lower() and len(refused) < refusals:
            refused.append(head.split(b"\r\n")[0])
            body = b'{"error": "unavailable", "message": "too many connections", "reason": "too many connections"}'
            client.sendall(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Type: application/json\r\n"
                           b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            client.close()
            return
        upstream = socket.create_connection(("127.0.0.1", port))
        upstream.sendall(head)
        threading.Thread(target=pump, args=(upstream, client), daemon=True).start()
        pump(client, upstream)

    with relay_listener(serve) as relay_port:
        yield relay_port, refused


def test_a_websocket_refused_at_the_servers_connection_limit_is_tried_again(browser_page, served):
    """A server at --max-connections answers a WebSocket's upgrade 503 with Retry-After: 1, which a
    browser does not show a page: its socket closes as one that never reached the server (1006). The
    page said 'failed: the WebSocket stream could not connect to the server' at once, and DELETEd the
    session it had made. It tries the socket again a second apart (a few times, within the connect's
    time limit), and streams once the server has room."""
    from test_server_browser_hangup_websocket import STREAM_ELSEWHERE

    with served(max_sessions=1) as (url, app), refusing_websockets(int(url.rsplit(":", 1)[1]), 2) as (port, refused):
        page = browser_page.new_page()
        page.add_init_script(STREAM_ELSEWHERE + f"window.streamAt = 'http://127.0.0.1:{port}';")
        try:
            page.goto(f"{url}/?autostart=1&transport=ws&mic=0")
            page.wait_for_function("/^(streaming|failed|closed)/.test(window.streamgenStats.state)", timeout=60_000)
            assert page.evaluate("window.streamgenStats.state") == "streaming (websocket)"
            assert len(refused) == 2, refused
            page.wait_for_function("window.streamgenStats.framesDecoded >= 3", timeout=60_000)
        finally:
            page.close()


def test_a_page_whose_files_changed_on_the_server_runs_the_new_ones(browser_page, tmp_path):
    """The page's files came without Cache-Control, which lets a browser keep them by its own rule
    (a tenth of their age since modified: days, for an installed package's): after an upgrade it
    ran the old modules, or an old one with a new one (an import that names nothing: a dead page).
    They are revalidated at each use now (their ETag: 304 while unchanged)."""
    import time

    web = tmp_path / "web"
    shutil.copytree(Path(__file__).resolve().parent.parent / "web", web)
    month_ago = time.time() - 30 * 86400

    def age(path: Path) -> None:
        os.utime(path, (month_ago, month_ago))

    for path in web.iterdir():
        age(path)
    with live_server(max_sessions=2, web_dir=web) as (url, app):
        page = browser_page.new_page()
        try:
            page.goto(f"{url}/")
            page.wait_for_function("window.streamgenStats !== undefined")
            page.goto("about:blank")
            page_js = web / "page.js"
            page_js.write_text(page_js.read_text() + "\nwindow.upgraded = true;\n")
            age(page_js)
            page.goto(f"{url}/")
            page.wait_for_function("window.streamgenStats !== undefined")
            assert page.evaluate("window.upgraded") is True
        finally:
            page.close()
