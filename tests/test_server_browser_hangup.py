"""The web client's hang-up in its races: while it connects, while a stats read is in flight, with
a DELETE that fails; and what the stage shows after it. (A WebSocket's before the server's ready:
test_server_browser_hangup_websocket.py.)

Chromium as in test_server_browser.py (skipped without it). Playwright runs a route's handler
only while this thread is in one of its calls: the waits on routed pages go through the page
(`wait_in_page`), not time.sleep.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import pytest
from test_server_browser import HELD

pytestmark = [pytest.mark.browser, pytest.mark.timeout(180)]

IDLE = {"mics": 0, "contexts": 0, "state": "idle", "connect": True, "hangup": False}


def wait_in_page(page, check, timeout: float = 20.0, failed: str = "timed out"):
    """wait_for, waiting in the page's calls: the page's routes are answered meanwhile."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(failed)
        page.wait_for_timeout(100)


def connects_and_streams(page, transport: str) -> None:
    """Connect clicked (after a hang-up or a failure: the page connects again), the page (HELD)
    streams over `transport`, "webrtc" or "websocket"."""
    page.click("#connect")
    page.wait_for_function("window.streamgenStats.framesDecoded >= 5", timeout=60_000)
    assert page.evaluate("held()")["state"] == f"streaming ({transport})"


def console_and_deletes(page) -> tuple[list[str], list[str]]:
    """What the page says on the console (errors, warnings, uncaught errors) and the URLs it
    DELETEs, as they come."""
    logs: list[str] = []
    deletes: list[str] = []
    said = {"error", "warning"}
    page.on("console", lambda m: logs.append(f"{m.type}: {m.text}") if m.type in said else None)
    page.on("pageerror", lambda e: logs.append(f"pageerror: {e}"))
    page.on("request", lambda r: deletes.append(r.url) if r.method == "DELETE" else None)
    return logs, deletes


def test_a_webrtc_connect_hung_up_while_its_offer_waits_leaves_nothing(browser_page, served):
    """Hung up while the server has not answered the WHEP offer: the page is idle at once, the
    session deleted; the offer is cut off with the connection (its answer, a 404 since the session
    is gone, was on the console as Chromium's "Failed to load resource"), and the next connect
    streams."""
    with served(max_sessions=2) as (url, app):
        sessions = app.state.registry.sessions
        page = browser_page.new_page()
        offers = []
        # the first offer held (answered below), the next connect's let through
        page.route("**/whep", lambda route: route.continue_() if offers else offers.append(route))
        logs, _ = console_and_deletes(page)
        page.add_init_script(HELD)
        try:
            page.goto(f"{url}/?autostart=1&mic=0")
            wait_in_page(page, lambda: offers, 20, "no WHEP offer came")
            assert len(sessions) == 1 and page.evaluate("held()")["hangup"] is True
            page.click("#hangup")
            wait_in_page(page, lambda: not sessions, 10, "the hung-up attempt left its session on the server")
            offers[0].continue_()
            # nothing of it to come: the offer let go meets its session gone, a 404 from this local
            # server within milliseconds (what was on the console); 0.5 s is that many times over
            page.wait_for_timeout(500)
            assert page.evaluate("held()") == IDLE and not sessions
            assert logs == []  # (the offer cut off at the hang-up: before, its 404 was on the console)
            connects_and_streams(page, "webrtc")
            assert logs == []
        finally:
            page.close()


# What the stage shows: the <video>'s picture, whether it holds a stream, whether the canvas has
# anything drawn on it.
STAGE = """() => {
  const video = document.getElementById("video"), canvas = document.getElementById("canvas");
  const drawn = canvas.width > 0 && canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data.some((x) => x);
  return {videoWidth: video.videoWidth, stream: video.srcObject !== null, drawn: drawn};
}"""


@pytest.mark.parametrize("transport", ["webrtc", "ws"])
def test_a_hung_up_page_shows_no_last_frame(browser_page, transport, served):
    """After a hang-up the <video> kept its ended stream, its last frame on screen as if the avatar
    had frozen (and the WebSocket page's canvas its last drawn frame): the stage is cleared now, on
    both transports."""
    with served(max_sessions=2) as (url, _):
        page = browser_page.new_page()
        try:
            page.goto(f"{url}/?autostart=1&mic=0" + ("&transport=ws" if transport == "ws" else ""))
            page.wait_for_function("window.streamgenStats.framesDecoded >= 10", timeout=60_000)
            streaming = page.evaluate(STAGE)
            assert (streaming["videoWidth"] > 0) if transport == "webrtc" else streaming["drawn"], streaming
            page.click("#hangup")
            cleared = {"videoWidth": 0, "stream": False, "drawn": False}
            wait_in_page(page, lambda: page.evaluate(STAGE) == cleared, 10, "the hang-up left the last frame shown")
        finally:
            page.close()


def test_connect_and_hang_up_from_the_keyboard_keep_the_focus(browser_page, served):
    """Connect pressed from the keyboard is disabled at once, and its focus went to the page's start
    (the same for Hang up): a keyboard user had to find the control again. The focus goes to the
    button that takes over now, Hang up and then Connect again."""
    focused = "document.activeElement.id"
    with served(max_sessions=2) as (url, _):
        page = browser_page.new_page()
        try:
            page.goto(f"{url}/?mic=0&transport=ws")
            page.focus("#connect")
            page.keyboard.press("Enter")
            page.wait_for_function("window.streamgenStats.state.startsWith('streaming')", timeout=60_000)
            assert page.evaluate(focused) == "hangup"
            page.keyboard.press("Space")
            page.wait_for_function("window.streamgenStats.state === 'idle'", timeout=10_000)
            assert page.evaluate(focused) == "connect"
        finally:
            page.close()


def test_a_delete_that_fails_at_hang_up_is_said_on_the_console_and_the_session_ends(browser_page, served):
    """A hang-up's DELETE that fails (here the network's failure) was swallowed. The session ends on
    the server all the same, through the closed peer connection; the page says the failure on the
    console, and nothing on the page. (An open WebSocket's hang-up sends no DELETE: its stop
    message ends the session, test_a_hang_up_leaves_nothing_on_the_console.)"""
    with served(max_sessions=2) as (url, app):
        sessions = app.state.registry.sessions
        page = browser_page.new_page()
        deletes = []
        page.route("**/v1/sessions/*", lambda route: (
            (deletes.append(route.request.url), route.abort()) if route.request.method == "DELETE" else route.continue_()
        ))  # fmt: skip
        logs: list[str] = []
        page.on("console", lambda m: logs.append(f"{m.type}: {m.text}"))
        try:
            page.goto(f"{url}/?autostart=1&mic=0")
            page.wait_for_function("window.streamgenStats.framesDecoded >= 10", timeout=60_000)
            assert len(sessions) == 1
            page.click("#hangup")
            wait_in_page(page, lambda: not sessions, 10, "the session outlived the hang-up")
            wait_in_page(page, lambda: any("ending the session" in line for line in logs), 5,
                         f"the failed DELETE was not said: {logs}")  # fmt: skip
            assert len(deletes) == 1
            said = [line for line in logs if "ending the session" in line]
            assert len(said) == 1 and said[0].startswith(
                "warning: ending the session: DELETE failed: TypeError"
            ), logs
            assert page.evaluate("window.streamgenStats.state") == "idle"
        finally:
            page.close()


# The first stats read after window.hangUpOnStats is set hangs up and connects again while it is
# in flight; window.afterStaleRead: the overlay's figures once the page has taken the read's answer.
STATS_READ_AS_IT_HANGS_UP = """
const realGetStats = RTCPeerConnection.prototype.getStats;
window.afterStaleRead = null;
RTCPeerConnection.prototype.getStats = function (...args) {
  const report = realGetStats.apply(this, args);
  if (window.hangUpOnStats) {
    window.hangUpOnStats = false;
    document.getElementById("hangup").click();
    document.getElementById("connect").click();
    // (a timer: after the page's own continuation of the read)
    report.then(() => setTimeout(() => { window.afterStaleRead = {...window.streamgenStats}; }, 0));
  }
  return report;
};
"""


def test_a_stats_read_in_flight_at_a_hang_up_does_not_reach_the_next_connection(browser_page, served):
    """The WebRTC page reads getStats every 500 ms; a read in flight when the user hung up and
    connected again wrote the old connection's figures (26 frames, 25 fps, its startup time) into
    the new one's overlay while it was still connecting. (Chromium answers a read, a replaceTrack
    or a session check of a closed connection without an error: no unhandled rejection seen.)"""
    with served(max_sessions=2) as (url, _):
        page = browser_page.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.add_init_script(STATS_READ_AS_IT_HANGS_UP)
        try:
            page.goto(f"{url}/?autostart=1&mic=0")
            page.wait_for_function("window.streamgenStats.framesDecoded >= 10", timeout=60_000)
            page.evaluate("window.hangUpOnStats = true")
            page.wait_for_function("window.afterStaleRead !== null", timeout=10_000)
            after = page.evaluate("window.afterStaleRead")
            assert after["state"] == "connecting", after  # (the premise: the read came back first)
            assert (after["framesDecoded"], after["fps"], after["firstFrameMs"]) == (0, 0, None), after
            page.wait_for_function("window.streamgenStats.framesDecoded >= 5", timeout=60_000)
            assert errors == []
        finally:
            page.close()


@pytest.mark.parametrize("transport", ["webrtc", "ws"])
def test_a_hang_up_leaves_nothing_on_the_console(browser_page, transport, served):
    """A WebSocket hang-up sent the stop message and a DELETE: the stop had ended the session by the
    time the DELETE came, whose 404 Chromium logs as an error ("Failed to load resource"). A normal
    hang-up, on either transport, ends the session and says nothing on the console; a few connect
    and hang-up rounds, as the race went either way."""
    with served(max_sessions=2) as (url, app):
        sessions = app.state.registry.sessions
        page = browser_page.new_page()
        logs, deletes = console_and_deletes(page)
        try:
            page.goto(f"{url}/?mic=0" + ("&transport=ws" if transport == "ws" else ""))
            for _ in range(3):
                page.click("#connect")
                page.wait_for_function("window.streamgenStats.framesDecoded >= 3", timeout=60_000)
                page.click("#hangup")
                wait_in_page(page, lambda: not sessions, 10, "the session outlived the hang-up")
                page.wait_for_timeout(500)  # (a DELETE's answer, and what the console says of it)
                assert page.evaluate("window.streamgenStats.state") == "idle"
            assert logs == []
            # the WHEP resource is DELETEd (RFC 9725); an open WebSocket's stop message is its end
            assert len(deletes) == (3 if transport == "webrtc" else 0), deletes
        finally:
            page.close()


# holdFetches(url, method) -> true: that fetch of the page waits in window.heldFetches until let
# go, as on a slow network where it is still on its way (or queued behind one) at the hang-up.
HOLD_FETCHES = """
window.heldFetches = [];
window.holdFetches = null;
const fetchAsItCame = window.fetch;
window.fetch = function (url, options) {
  if (window.holdFetches && window.holdFetches(String(url), (options && options.method) || "GET")) {
    return new Promise((resolve, reject) => window.heldFetches.push(() => fetchAsItCame(url, options).then(resolve, reject)));
  }
  return fetchAsItCame(url, options);
};
"""


def hold_fetches(page, which: str) -> None:
    """From now on the page's fetches that `which` (a JS function of url and method) picks wait."""
    page.evaluate(f"() => {{ window.holdFetches = {which}; }}")  # (a function value alone would be called)


@contextmanager
def page_with_held_fetches(browser_page, url: str):
    """A page (HELD, HOLD_FETCHES) and what it did: (page, console logs, DELETE urls, requests as
    (method, path))."""
    page = browser_page.new_page()
    logs, deletes = console_and_deletes(page)
    requests: list[tuple[str, str]] = []
    page.on("request", lambda r: requests.append((r.method, r.url.removeprefix(url))))
    page.add_init_script(HELD)
    page.add_init_script(HOLD_FETCHES)
    try:
        page.goto(f"{url}/?mic=0")
        yield page, logs, deletes, requests
    finally:
        page.close()


def hang_up_and_let_go(page, sessions, deletes, requests) -> list[tuple[str, str]]:
    """Hangs up once a held fetch waits, lets those held go after the hang-up's DELETE, and gives
    the requests the page made after it."""
    page.wait_for_function("window.heldFetches.length >= 1", timeout=60_000)
    page.click("#hangup")
    wait_in_page(page, lambda: not sessions and deletes, 10, "the hang-up ended no session")
    hung_up = len(requests)
    page.evaluate("window.holdFetches = null; window.heldFetches.splice(0).forEach((go) => go())")
    page.wait_for_timeout(1000)  # (what a request let go would meet, and the console say of it)
    return requests[hung_up:]


def test_a_hang_up_cuts_off_the_trickle_ice_patches_still_to_go(browser_page, served):
    """Hung up while trickle ICE PATCHes were still to go: they went after the hang-up's DELETE,
    found the session gone, and the page logged their 404s ("trickle ICE: PATCH 404", and
    Chromium's own "Failed to load resource"). The hang-up cuts them off now: none goes after it,
    nothing on the console."""
    with served(max_sessions=2) as (url, app), page_with_held_fetches(browser_page, url) as held:
        page, logs, deletes, requests = held
        hold_fetches(page, '(url, method) => method === "PATCH"')
        page.click("#connect")
        assert hang_up_and_let_go(page, app.state.registry.sessions, deletes, requests) == []
        assert logs == []
        assert page.evaluate("held()") == IDLE


def test_a_hang_up_cuts_off_the_webrtc_offer_still_to_go(browser_page, served):
    """Hung up while the WHEP offer was still to go: it went after the hang-up's DELETE, found the
    session gone, and Chromium logged its 404 ("Failed to load resource"). It is cut off with the
    connection now (as the PATCHes are): no request after the hang-up, nothing on the console, no
    session left on the server, and the next connect streams."""
    with served(max_sessions=2) as (url, app), page_with_held_fetches(browser_page, url) as held:
        page, logs, deletes, requests = held
        sessions = app.state.registry.sessions
        hold_fetches(page, '(url, method) => method === "POST" && url.endsWith("/whep")')
        page.click("#connect")
        assert hang_up_and_let_go(page, sessions, deletes, requests) == []
        assert logs == []
        assert page.evaluate("held()") == IDLE and not sessions
        connects_and_streams(page, "webrtc")


def test_a_hang_up_cuts_off_the_session_check_in_flight(browser_page, served):
    """Hung up while a check that the session lives (a GET of it, every 2 s of a WebRTC stream) was
    on its way: it went after the hang-up's DELETE and Chromium logged its 404. It is cut off with
    the connection now, and its abort is not said on the console either."""
    with served(max_sessions=2) as (url, app), page_with_held_fetches(browser_page, url) as held:
        page, logs, deletes, requests = held
        page.click("#connect")
        page.wait_for_function("window.streamgenStats.framesDecoded >= 5", timeout=60_000)
        hold_fetches(page, '(url, method) => method === "GET" && url.includes("/v1/sessions/")')
        assert hang_up_and_let_go(page, app.state.registry.sessions, deletes, requests) == []
        assert logs == []
        assert page.evaluate("held()") == IDLE


def test_a_connect_shows_no_figures_of_the_connection_before(browser_page, served):
    """The overlay is drawn by a stream's stats timer only: connecting again after a hang-up, and
    failed (refused: 503), the page showed the last stream's figures (its fps, its frames) beside
    'failed: ...'."""
    with served(max_sessions=2) as (url, _):
        page = browser_page.new_page()
        try:
            page.goto(f"{url}/?autostart=1&mic=0")
            page.wait_for_function("window.streamgenStats.framesDecoded >= 10", timeout=60_000)
            page.wait_for_function("document.getElementById('overlay').textContent.includes('webrtc')")
            page.click("#hangup")
            full = {"status": 503, "json": {"error": "unavailable", "message": "server is at capacity"}}
            page.route(
                "**/v1/sessions", lambda r: r.fulfill(**full) if r.request.method == "POST" else r.continue_()
            )
            page.click("#connect")
            page.wait_for_function("window.streamgenStats.state.startsWith('failed')", timeout=20_000)
            assert page.text_content("#overlay").splitlines() == [
                "transport  –", "startup    –", "fps        –", "A/V offset –", "RTT        –", "frames     0",
            ]  # fmt: skip
        finally:
            page.close()
