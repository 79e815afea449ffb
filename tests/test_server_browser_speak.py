"""The page's speak requests and the server's errors, said in the page's words, in real headless
Chromium (as test_server_browser.py; skipped without it)."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
from test_server_browser import held_page

pytestmark = [pytest.mark.browser, pytest.mark.timeout(180)]


@pytest.mark.parametrize("refused", ["avatars", "session", "speak", "unreachable"])
def test_a_server_error_the_page_meets_is_shown_in_its_words(browser_page, refused, served):
    """An error answer that is not the API's JSON (a proxy's 502 page, a server restarting): from
    /v1/avatars it left an ?autostart=1 page 'idle', never connecting, the error on the console
    only; from POST /v1/sessions the page showed JSON.parse's complaint about the body; from a
    WebRTC page's speak request, nothing at all (an unhandled rejection). Each now says the status.
    A server that does not answer at all (down, restarting) was the browser's 'failed: Failed to
    fetch' (Firefox: 'NetworkError when attempting to fetch resource.'); it is said as such now."""
    gateway = {"status": 502, "content_type": "text/html", "body": "<html><h1>502 Bad Gateway</h1></html>"}
    fails = {"avatars": "**/v1/avatars", "session": "**/v1/sessions", "speak": "**/control",
             "unreachable": "**/v1/sessions"}[refused]  # fmt: skip
    with served(max_sessions=2) as (url, app):
        page = held_page(browser_page, "about:blank")
        logs: list[str] = []
        page.on("console", lambda m: logs.append(f"{m.type}: {m.text}"))
        if refused == "unreachable":
            page.route(fails, lambda route: route.abort("connectionrefused"))
        else:
            page.route(fails, lambda route: route.fulfill(**gateway))
        try:
            page.goto(f"{url}/?autostart=1" + ("&transport=ws" if refused != "speak" else "&mic=0"))
            if refused in ("session", "unreachable"):
                page.wait_for_function("window.streamgenStats.state.startsWith('failed')", timeout=20_000)
                said = {"session": "failed: 502: Bad Gateway",
                        "unreachable": "failed: the server does not answer (Failed to fetch)"}[refused]  # fmt: skip
                assert page.evaluate("window.streamgenStats.state") == said, logs
                assert page.evaluate("held()")["mics"] == 0
                return
            page.wait_for_function("window.streamgenStats.framesDecoded >= 5", timeout=60_000)
            if refused == "avatars":  # said in the list's place; the default avatar streams
                assert page.text_content("#avatars") == "no avatars to choose from (502: Bad Gateway)", logs
            else:
                page.fill("#speak-text", "hello there")
                page.click("#speak")
                page.wait_for_function("window.streamgenStats.notice.startsWith('speak')", timeout=10_000)
                assert page.text_content("#notice") == "speak: 502: Bad Gateway", logs
                assert page.evaluate("window.streamgenStats.state") == "streaming (webrtc)"  # it goes on
                assert page.input_value("#speak-text") == "hello there"  # kept, to be sent again
        finally:
            page.close()


def test_a_websocket_pages_refused_speak_is_said_beside_the_status(browser_page, served):
    """The server's in-band error (a speak too long for the speech queue) replaced the status:
    'error: ...' stood where 'streaming (websocket)' had been while the stream went on. And a text
    blank only to the server (separators and NEL, which Python's strip() takes away and JS's trim()
    keeps) was sent, and the server closed the stream for an empty speak (4400)."""
    with served(max_sessions=2) as (url, app):
        page = held_page(browser_page, "about:blank")
        try:
            page.goto(f"{url}/?autostart=1&transport=ws&mic=0")
            page.wait_for_function("window.streamgenStats.framesDecoded >= 3", timeout=60_000)
            page.evaluate("document.getElementById('speak-text').value = ' \\x1f\\x85 '")
            page.click("#speak")
            frames = page.evaluate("window.streamgenStats.framesDecoded")
            page.wait_for_function(f"window.streamgenStats.framesDecoded > {frames} + 10 "
                                   "|| !window.streamgenStats.state.startsWith('streaming')", timeout=20_000)  # fmt: skip
            assert page.text_content("#status") == "streaming (websocket)"
            page.fill("#speak-text", "hello there, " * 76)  # 988 characters: a minute of speech
            page.click("#speak")
            page.wait_for_function("window.streamgenStats.notice !== ''", timeout=20_000)
            assert page.text_content("#notice").startswith("speak: text too long"), page.text_content("#notice")
            # kept, to be sent again in parts (it was emptied as it was sent, whatever the answer)
            assert page.input_value("#speak-text") == "hello there, " * 76
            assert page.is_enabled("#speak")  # (disabled while it waited for the answer)
            assert page.text_content("#status") == "streaming (websocket)"
            frames = page.evaluate("window.streamgenStats.framesDecoded")
            page.wait_for_function(f"window.streamgenStats.framesDecoded > {frames}", timeout=20_000)
            page.click("#hangup")
            assert page.text_content("#notice") == "" and page.text_content("#status") == "idle"
        finally:
            page.close()


@contextmanager
def speaking_page(context, url: str):
    """A WebRTC page (HELD, HOLD_FETCHES) streaming, whose speak of "hello there" is on its way, its
    /control fetch held (let go with `window.heldFetches`); yields (page, what it says on the
    console)."""
    from test_server_browser_hangup import HOLD_FETCHES, hold_fetches

    page = held_page(context, "about:blank")
    page.add_init_script(HOLD_FETCHES)
    logs: list[str] = []
    page.on("console", lambda m: logs.append(f"{m.type}: {m.text}"))
    try:
        page.goto(f"{url}/?autostart=1&mic=0")
        page.wait_for_function("window.streamgenStats.framesDecoded >= 3", timeout=60_000)
        hold_fetches(page, '(url, method) => url.endsWith("/control")')
        page.fill("#speak-text", "hello there")
        page.click("#speak")
        page.wait_for_function("window.heldFetches.length === 1", timeout=10_000)
        yield page, logs
    finally:
        page.close()


def test_a_speak_answered_after_a_hang_up_is_not_the_next_connections(browser_page, served):
    """A WebRTC page's speak is answered once its speech is made (seconds). Hung up and connected
    again meanwhile, the page showed the old session's 404 ('speak: 404: ...') over the new
    connection's status. The hang-up cuts the request off now: nothing more comes of it."""
    with served(max_sessions=2) as (url, app), speaking_page(browser_page, url) as (page, logs):
        page.click("#hangup")
        page.click("#connect")
        page.wait_for_function("window.streamgenStats.framesDecoded >= 3", timeout=60_000)
        page.evaluate("window.holdFetches = null; window.heldFetches.splice(0).forEach((go) => go())")
        # nothing of it to come: the hang-up cut the speak off, and its answer (a 404 from this local
        # server, or the cut-off's error) would be here within milliseconds; 1 s is that many times over
        page.wait_for_timeout(1000)
        assert page.evaluate("window.streamgenStats.state") == "streaming (webrtc)"
        assert page.input_value("#speak-text") == "hello there"
        assert logs == []


def test_a_sentence_typed_while_a_speak_is_answered_stays(browser_page, served):
    """A WebRTC page's speak is answered once its speech is made (seconds): the answer emptied the
    field, taking with it the next sentence typed meanwhile. It empties only the text it sent now;
    and Speak waits for the answer, the text being still there to be sent twice."""
    with served(max_sessions=2) as (url, app), speaking_page(browser_page, url) as (page, _):
        # not to be sent twice: pressed again meanwhile, it went again (and was refused, 429)
        assert page.is_disabled("#speak")
        assert page.evaluate("document.activeElement.id") == "speak-text"  # (a disabled button drops it)
        page.fill("#speak-text", "and the next one")
        # (let go, and answered: the first speech takes a second or two)
        page.evaluate("window.holdFetches = null; Promise.all(window.heldFetches.splice(0).map((go) => go()))")
        # Speak enabled again once the answer has come: then the field is what the answer left of it
        page.wait_for_function("!document.getElementById('speak').disabled", timeout=30_000)
        assert page.input_value("#speak-text") == "and the next one"
        page.click("#speak")  # one not typed over goes as it went
        page.wait_for_function("document.getElementById('speak-text').value === ''", timeout=10_000)
        assert page.text_content("#notice") == ""


# The abort listeners the page adds to its signals from now on and has not removed: window.abortListeners()
# counts those whose signal has not fired (a listener of a signal fired is gone with it).
ABORT_LISTENERS = """
window.__abortListeners = [];
const addListener = EventTarget.prototype.addEventListener, removeListener = EventTarget.prototype.removeEventListener;
EventTarget.prototype.addEventListener = function (type, listener, options) {
  if (this instanceof AbortSignal && type === "abort") window.__abortListeners.push([this, listener]);
  return addListener.call(this, type, listener, options);
};
EventTarget.prototype.removeEventListener = function (type, listener, options) {
  const i = window.__abortListeners.findIndex(([signal, l]) => signal === this && l === listener);
  if (type === "abort" && i >= 0) window.__abortListeners.splice(i, 1);
  return removeListener.call(this, type, listener, options);
};
window.abortListeners = () => window.__abortListeners.filter(([signal]) => !signal.aborted).length;
"""


def test_a_webrtc_pages_speaks_leave_no_listener_on_its_connection(browser_page, served):
    """Each speak of a WebRTC page is cut off with the connection (its signal, which lives as long as
    the connection): each added a listener to that signal that stayed once the speak was answered, one
    more per speak for as long as the connection lasted. It is removed as its request settles now."""
    with served(max_sessions=2) as (url, app), speaking_page(browser_page, url) as (page, logs):
        page.evaluate(ABORT_LISTENERS)  # (from the next speak on)
        page.evaluate("window.holdFetches = null; window.heldFetches.splice(0).forEach((go) => go())")
        for _ in range(3):
            page.wait_for_function("document.getElementById('speak-text').value === ''", timeout=20_000)
            page.fill("#speak-text", "hello")
            page.click("#speak")
        page.wait_for_function("document.getElementById('speak-text').value === ''", timeout=20_000)
        assert page.evaluate("window.abortListeners()") == 0
        assert page.text_content("#notice") == "" and logs == []


# A WebSocket page's speaks held back from the server while `window.holdSpeaks` is true, its messages
# kept in `window.heldSpeaks` ([socket, message]) to be sent later.
HOLD_SPEAKS = """
window.holdSpeaks = false;
window.heldSpeaks = [];
const sendAtOnce = WebSocket.prototype.send;
WebSocket.prototype.send = function (data) {
  if (window.holdSpeaks && typeof data === "string" && JSON.parse(data).type === "speak") {
    window.heldSpeaks.push([this, data]);
    return;
  }
  return sendAtOnce.call(this, data);
};
"""


def test_a_websocket_speak_the_server_never_answers_is_given_up(each_browser, served):
    """A WebSocket page's speak waited for its answer without a limit: a server that never answered
    left Speak disabled for the rest of the stream. It gives up after 20 s as a WebRTC page's speak
    does (said, Speak usable again, the text kept); its answer coming later is still its own."""
    from page_clock import SPEAK_ANSWER, BoundClock

    with served(max_sessions=2) as (url, app):
        page = held_page(each_browser, "about:blank")
        page.add_init_script(HOLD_SPEAKS)
        # the speak's 20 s run at once (they were waited for); the stream's own timers keep real time
        clock = BoundClock(page, SPEAK_ANSWER)
        errors: list[str] = []
        page.on("console", lambda m: errors.append(f"{m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
        try:
            page.goto(f"{url}/?autostart=1&transport=ws&mic=0")
            page.wait_for_function("window.streamgenStats.framesDecoded >= 3", timeout=60_000)
            page.evaluate("window.holdSpeaks = true")
            page.fill("#speak-text", "hello there")
            page.click("#speak")
            assert page.is_disabled("#speak")
            clock.run_for(20_000)
            page.wait_for_function("window.streamgenStats.notice !== ''", timeout=30_000)
            assert page.text_content("#notice") == "speak: no answer from the server in 20 s; it may still be said"
            assert page.is_enabled("#speak") and page.input_value("#speak-text") == "hello there"
            assert page.text_content("#status") == "streaming (websocket)"
            # sent at last, it is answered: its text taken, as any speak the server takes
            page.evaluate("window.holdSpeaks = false; window.heldSpeaks.splice(0).forEach(([s, m]) => s.send(m))")
            page.wait_for_function("document.getElementById('speak-text').value === ''", timeout=20_000)
            assert page.text_content("#notice") == "" and page.is_enabled("#speak")
            assert errors == []
        finally:
            page.close()
