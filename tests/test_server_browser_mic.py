"""The web page's microphone in real headless Chromium (as test_server_browser.py; skipped without
it): one the browser refuses, one that stops, and its box ticked and unticked while the browser asks."""

from __future__ import annotations

import pytest
from test_server_browser import HELD, held_page, metric, wait_for
from test_server_browser_hangup import wait_in_page

pytestmark = [pytest.mark.browser, pytest.mark.timeout(180)]

# How long a check that no microphone was heard waits: a microphone sent by mistake reaches the
# server in its first audio packets (tens of milliseconds each, and the server counts each as it
# comes), so 1 s is many of them, on a loaded machine too
NOT_HEARD_MS = 1000

# getUserMedia refused as a user's "Block" (or a missing device) refuses it, until `__refuse` is false
REFUSED = """
window.__refuse = true;
const givenMic = navigator.mediaDevices.getUserMedia.bind(navigator.mediaDevices);
navigator.mediaDevices.getUserMedia = async (c) => {
  if (window.__refuse) throw new DOMException("Permission denied", "NotAllowedError");
  return givenMic(c);
};
"""
# a page over plain http from another machine's address: no navigator.mediaDevices at all
INSECURE = "Object.defineProperty(Navigator.prototype, 'mediaDevices', {get: () => undefined});"
# getUserMedia answers only when the test says (`__answer()`), as a permission prompt waits for its user
ASKING = """
window.__asked = [];
const grantedMic = navigator.mediaDevices.getUserMedia.bind(navigator.mediaDevices);
navigator.mediaDevices.getUserMedia = (c) => new Promise((resolve) => __asked.push(() => resolve(grantedMic(c))));
window.__answer = () => __asked.splice(0).forEach((answer) => answer());
"""


def page_with(context, url: str, script: str):
    page = context.new_page()
    page.add_init_script(script + HELD)  # (HELD after: it counts the microphones the browser gives)
    page.goto(url)
    return page


@pytest.mark.parametrize("transport", ["webrtc", "ws"])
def test_a_microphone_the_browser_refuses_is_said_beside_its_box(browser_page, transport, served):
    """Refused, the microphone left the page streaming with its box ticked, the reason on the console
    only: the user talked to an avatar that heard nothing. The page says why beside the box and
    unticks it; ticked again while connected, the box asks again."""
    with served(max_sessions=2) as (url, app):
        page = page_with(browser_page, f"{url}/?autostart=1&transport={transport}", REFUSED)
        try:
            page.wait_for_function("window.streamgenStats.framesDecoded >= 3", timeout=60_000)
            expected = "websocket" if transport == "ws" else "webrtc"
            assert page.evaluate("window.streamgenStats.state") == f"streaming ({expected})"
            assert not page.is_checked("#mic")
            assert page.text_content("#mic-note") == "no microphone: Permission denied"
            page.evaluate("window.__refuse = false")
            page.check("#mic")
            wait_for(lambda: page.evaluate("held()")["mics"] == 1, 10, "the ticked box took no microphone")
            assert page.text_content("#mic-note") == ""
            page.click("#hangup")
            wait_for(lambda: page.evaluate("held()")["mics"] == 0, 10, "the hang-up left the microphone on")
        finally:
            page.close()


def test_a_refused_microphones_note_goes_as_its_box_is_ticked_again_while_idle(browser_page, served):
    """The note of a microphone refused ("no microphone: Permission denied") stayed after the hang-up
    beside the box ticked again, as though that choice were refused too; the next connect asks the
    browser anew. The note goes as the box is ticked, and the next connect's refusal says it again."""
    with served(max_sessions=2) as (url, app):
        page = page_with(browser_page, f"{url}/?transport=ws", REFUSED)
        try:
            page.wait_for_selector("#avatars button")
            page.click("#connect")
            page.wait_for_function("window.streamgenStats.framesDecoded >= 3", timeout=60_000)
            assert page.text_content("#mic-note") == "no microphone: Permission denied"
            page.click("#hangup")
            assert page.text_content("#mic-note") == "no microphone: Permission denied"  # (the last connect's)
            page.check("#mic")
            assert page.text_content("#mic-note") == ""
            page.click("#connect")
            page.wait_for_function("window.streamgenStats.framesDecoded >= 3", timeout=60_000)
            assert not page.is_checked("#mic")
            assert page.text_content("#mic-note") == "no microphone: Permission denied"
            page.click("#hangup")
        finally:
            page.close()


def test_a_page_the_browser_gives_no_microphone_at_all_says_why(browser_page, served):
    with served(max_sessions=2) as (url, app):
        page = page_with(browser_page, f"{url}/?autostart=1", INSECURE)
        try:
            page.wait_for_function("window.streamgenStats.framesDecoded >= 3", timeout=60_000)
            note = "no microphone: the browser gives a page the microphone only over HTTPS or on localhost"
            assert not page.is_checked("#mic")
            assert page.text_content("#mic-note") == note
        finally:
            page.close()


@pytest.mark.parametrize("transport", ["webrtc", "ws"])
def test_a_microphone_that_stops_is_said_and_given_back(browser_page, transport, served):
    """A microphone unplugged (or its permission taken back) while connected ends its track: the
    avatar heard nothing more, and the page said nothing, its box ticked. It says so beside the box
    and unticks it; ticked again, the box takes the microphone there is now."""
    with served(max_sessions=2) as (url, app):
        page = page_with(browser_page, f"{url}/?autostart=1&transport={transport}", "")
        try:
            page.wait_for_function("window.streamgenStats.framesDecoded >= 3", timeout=60_000)
            assert page.evaluate("held()")["mics"] == 1
            page.evaluate("__mics[0].getAudioTracks()[0].dispatchEvent(new Event('ended'))")
            wait_for(lambda: page.evaluate("held()")["mics"] == 0, 10, "the stopped microphone was kept")
            assert not page.is_checked("#mic")
            note = "no microphone: it stopped (unplugged, or its permission taken back)"
            assert page.text_content("#mic-note") == note
            assert page.evaluate("window.streamgenStats.state").startswith("streaming")
            page.check("#mic")
            wait_for(lambda: page.evaluate("held()")["mics"] == 1, 10, "the ticked box took no microphone")
            assert page.text_content("#mic-note") == ""
            received = heard(url)
            wait_for(lambda: heard(url) > received + 0.5, 20, "the microphone taken again was not heard")
        finally:
            page.close()


@pytest.mark.parametrize("transport", ["webrtc", "ws"])
def test_a_microphone_box_flipped_while_the_browser_asks_leaves_no_microphone_on(browser_page, transport, served):
    """Ticked, unticked, ticked and unticked while the browser asked (its permission prompt up), the
    box left two microphones taken, its box unticked: one went to a WebRTC avatar, and one stayed
    on after the hang-up, for good. Unticked while a connect's request waits, the same."""
    with served(max_sessions=2) as (url, app):
        before = heard(url)  # (the server's counters go on from the file's earlier tests)
        page = page_with(browser_page, f"{url}/?autostart=1&mic=0&transport={transport}", ASKING)
        try:
            page.wait_for_function("window.streamgenStats.framesDecoded >= 3", timeout=60_000)
            for flip in ("check", "uncheck", "check", "uncheck"):
                getattr(page, flip)("#mic")
            assert page.evaluate("__asked.length") == 2
            page.evaluate("__answer()")
            wait_for(lambda: page.evaluate("__mics.length") == 2, 10, "the browser gave no microphones")
            wait_for(lambda: page.evaluate("held()")["mics"] == 0, 10, "a microphone given stayed on")
            page.wait_for_timeout(NOT_HEARD_MS)
            assert heard(url) == before  # (a WebRTC avatar heard one)
            page.click("#hangup")
            wait_for(lambda: page.evaluate("held()")["mics"] == 0, 10, "the hang-up left a microphone on")

            # unticked while the connect's request waits: not taken, not sent
            page.check("#mic")
            page.click("#connect")
            wait_for(lambda: page.evaluate("__asked.length") == 1, 10, "the connect asked for no microphone")
            page.uncheck("#mic")
            page.evaluate("__answer()")
            page.wait_for_function("window.streamgenStats.framesDecoded >= 3", timeout=60_000)
            wait_for(lambda: page.evaluate("__mics.length") == 3, 10, "the browser gave no microphone")
            wait_for(lambda: page.evaluate("held()")["mics"] == 0, 10, "the microphone unticked stayed on")
            page.wait_for_timeout(NOT_HEARD_MS)
            assert heard(url) == before
        finally:
            page.close()


def heard(url: str) -> float:
    """The seconds of microphone the server received, over both transports."""
    import httpx

    lines = httpx.get(f"{url}/metrics").text.splitlines()
    received = [line for line in lines if line.startswith("streamgen_audio_received_seconds_total")]
    return sum(float(line.split()[-1]) for line in received)


@pytest.mark.parametrize("transport", ["webrtc", "ws"])
def test_a_microphone_box_flipped_while_the_session_is_requested_is_followed(browser_page, transport, served):
    """Flipped while a connect's session request waited (after the microphone was asked for, before
    the transport existed), the box did nothing: unticked, the microphone stayed on (and a WebRTC
    avatar heard it); ticked, none was taken and the box said it was on."""
    with served(max_sessions=2) as (url, app):
        before = heard(url)  # (the server's counters go on from the file's earlier tests)
        page = page_with(browser_page, f"{url}/?transport={transport}", "")
        requests = []  # the session requests, held until the box is flipped
        page.route(
            "**/v1/sessions", lambda r: requests.append(r) if r.request.method == "POST" else r.continue_()
        )
        try:
            for ticked, flip in ((True, "uncheck"), (False, "check")):
                page.set_checked("#mic", ticked)
                page.click("#connect")
                wait_in_page(page, lambda: len(requests) == 1, failed="the connect requested no session")
                getattr(page, flip)("#mic")
                requests.pop().continue_()
                page.wait_for_function("window.streamgenStats.framesDecoded >= 3", timeout=60_000)
                mics = 0 if flip == "uncheck" else 1
                wait_in_page(
                    page,
                    lambda mics=mics: page.evaluate("held()")["mics"] == mics,
                    failed=f"{flip}ed: not {mics} microphones",
                )
                if flip == "uncheck":
                    page.wait_for_timeout(NOT_HEARD_MS)
                    assert heard(url) == before
                else:
                    wait_in_page(page, lambda: heard(url) > before + 0.5, failed="the microphone ticked was not heard")
                page.click("#hangup")
                wait_in_page(
                    page,
                    lambda: page.evaluate("held()")["mics"] == 0,
                    failed="the hang-up kept the microphone",
                )
        finally:
            page.close()


# The WebSocket's messages to the listeners added with addEventListener (the page's wait for the
# server's "ready") held while __heldMessages is an array; the microphone sources the page made
HELD_READY = """
window.__heldMessages = null;
const addListener = WebSocket.prototype.addEventListener;
WebSocket.prototype.addEventListener = function (type, listener, ...rest) {
  if (type !== "message") return addListener.call(this, type, listener, ...rest);
  const held = (e) => (window.__heldMessages ? __heldMessages.push(() => listener(e)) : listener(e));
  return addListener.call(this, type, held, ...rest);
};
window.__sources = 0;
const createSource = AudioContext.prototype.createMediaStreamSource;
AudioContext.prototype.createMediaStreamSource = function (s) { __sources++; return createSource.call(this, s); };
"""


def test_a_microphone_ticked_while_the_websocket_starts_is_sent_through_one_path(browser_page, served):
    """Ticked while the socket waited for the server's "ready", the box started the microphone's
    path to it, and the connect's end started a second one: the first stayed connected, its
    worklet running, until the hang-up."""
    with served(max_sessions=2) as (url, app):
        before = heard(url)  # (the server's counters go on from the file's earlier tests)
        page = page_with(browser_page, f"{url}/?transport=ws&mic=0", HELD_READY)
        try:
            page.evaluate("window.__heldMessages = []")
            page.click("#connect")
            wait_for(lambda: page.evaluate("__heldMessages.length") >= 1, 20, "no ready came")
            page.check("#mic")
            wait_for(lambda: page.evaluate("__sources") == 1, 10, "the ticked box took no microphone")
            page.evaluate("const m = __heldMessages; __heldMessages = null; m.forEach((f) => f())")
            page.wait_for_function("window.streamgenStats.framesDecoded >= 3", timeout=60_000)
            wait_for(lambda: heard(url) > before + 0.5, 20, "the microphone was not heard")
            assert page.evaluate("__sources") == 1
        finally:
            page.close()


def test_the_microphone_follows_its_box_only_while_connected(browser_page, served):
    """Ticked after a WebSocket connect made without it, the microphone now reaches the avatar (it
    did nothing); ticked while idle, it is not taken (it was, and stayed on for good)."""
    heard = 'streamgen_audio_received_seconds_total{source="client"}'
    with served(max_sessions=2) as (url, app):
        before = metric(url, heard)  # (the server's counters go on from the file's earlier tests)
        page = held_page(browser_page, f"{url}/?autostart=1&transport=ws&mic=0")
        try:
            page.wait_for_function("window.streamgenStats.framesDecoded >= 5", timeout=60_000)
            assert metric(url, heard) == before
            page.check("#mic")
            wait_for(lambda: metric(url, heard) > before + 1.0)
            page.click("#hangup")
            page.uncheck("#mic")
            page.check("#mic")
            # nothing to come of the box ticked while idle: a microphone it took is asked for in the
            # box's change handler, at once; 0.5 s is that, and the browser's answer, many times over
            page.wait_for_timeout(500)
            assert page.evaluate("held()")["mics"] == 0
            assert page.evaluate("window.__mics.length") == 1  # taken once, while connected
        finally:
            page.close()


def test_a_connect_clicked_before_autostart_and_an_unticked_mic_leave_no_microphone_on(browser_page, served):
    """Clicked before the avatar list loaded on an ?autostart=1 page, connect ran twice and the
    first call's microphone stayed on for good; unticked while connected, the box stopped the
    audio but left the capture device live (the browser's recording indicator on)."""
    with served(max_sessions=3) as (url, app):
        page = browser_page.new_page()
        click_at_once = "document.addEventListener('DOMContentLoaded', () => document.getElementById('connect').click());"
        page.add_init_script(HELD + click_at_once)
        page.goto(f"{url}/?autostart=1&transport=ws")
        try:
            page.wait_for_function("window.streamgenStats.framesDecoded >= 5", timeout=60_000)
            assert page.evaluate("held()")["mics"] == 1
            page.uncheck("#mic")
            # given back, not only muted
            wait_for(lambda: page.evaluate("held()")["mics"] == 0, 10, "the unticked box kept the microphone")
            page.check("#mic")
            wait_for(lambda: page.evaluate("held()")["mics"] == 1)  # taken again while connected
            page.click("#hangup")
            wait_for(lambda: page.evaluate("held()")["mics"] == 0, 10, "the hang-up left the microphone on")
            wait_for(lambda: not app.state.registry.sessions)  # no session left behind either
        finally:
            page.close()


# The page's peer connections, as it makes them (window.peers)
PEERS = """
window.peers = [];
window.RTCPeerConnection = class extends RTCPeerConnection {
  constructor(...args) {
    super(...args);
    window.peers.push(this);
  }
};
"""


def test_a_microphone_box_flipped_as_its_connection_closes_says_nothing_on_the_console(each_browser, served):
    """Flipped as the WebRTC connection closed (a hang-up, the server's end), the box changed the
    closed connection's track: it refused, an unhandled rejection on the console. There is nothing to
    change on a closed connection: the microphone is given back all the same, and nothing is said."""
    with served(max_sessions=2) as (url, app):
        page = each_browser.new_page()
        page.add_init_script(PEERS + HELD)
        # (the browser's own logs are not the page's: the session check's 404, the connection closed)
        uncaught: list[str] = []
        page.on("pageerror", lambda e: uncaught.append(str(e)))
        try:
            page.goto(f"{url}/?autostart=1")
            page.wait_for_function("window.streamgenStats.framesDecoded >= 3", timeout=60_000)
            assert page.evaluate("held()")["mics"] == 1
            page.evaluate("window.peers.at(-1).close()")  # (closed behind the page: it fires no event)
            page.uncheck("#mic")
            wait_for(lambda: page.evaluate("held()")["mics"] == 0, 10, "the microphone was kept")
            # nothing is to come: the closed connection refuses the track at once, before the microphone
            # is given back (waited for above); 500 ms more outlast the refusal's report many times
            page.wait_for_timeout(500)
            assert uncaught == []
            page.click("#hangup")
        finally:
            page.close()
