"""The web page's WebSocket stream when the network between it and the server fails, in real
headless Chromium (as test_server_browser.py; skipped without it): the stream goes through a TCP
relay the test cuts (the connection reset) or stalls (nothing more comes through, nothing closes)."""

from __future__ import annotations

import os
import signal
import socket
import threading
from contextlib import contextmanager

import pytest
from server_helpers import live_server, relay_listener
from test_server_browser import HELD, metric, wait_for
from test_server_browser_hangup import wait_in_page
from test_server_browser_hangup_websocket import STREAM_ELSEWHERE

pytestmark = [pytest.mark.browser, pytest.mark.timeout(180)]


@contextmanager
def relay(port: int):
    """A TCP relay on 127.0.0.1 to `port`; yields (its port, cut, stall): `cut()` closes its
    connections, `stall()` drops everything they carry from then on, both ways, and closes nothing
    (as a network that went away: a laptop's Wi-Fi dropped, a NAT that forgot the connection)."""
    stalled, connections = threading.Event(), []

    def pump(source, sink):
        try:
            while data := source.recv(65536):
                if not stalled.is_set():
                    sink.sendall(data)
        except OSError:  # cut
            pass

    def connect(client):
        upstream = socket.create_connection(("127.0.0.1", port))
        connections.extend([client, upstream])
        for source, sink in ((client, upstream), (upstream, client)):
            threading.Thread(target=pump, args=(source, sink), daemon=True).start()

    def cut():
        while connections:
            c = connections.pop()
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # a reset
            c.close()

    with relay_listener(connect) as relay_port:
        try:
            yield relay_port, cut, stalled.set
        finally:
            cut()


def streaming_through_a_relay(context, url: str, relay_port: int, silent_s: int):
    page = context.new_page()
    page.add_init_script(HELD + STREAM_ELSEWHERE + f"window.streamAt = 'http://127.0.0.1:{relay_port}';")
    page.goto(f"{url}/?autostart=1&transport=ws&silent_s={silent_s}")
    page.wait_for_function("window.streamgenStats.framesDecoded >= 3", timeout=60_000)
    return page


@pytest.mark.parametrize(
    "fault, says",
    [
        # closed without a close frame (1006), the socket said 'closed: 1006 ' and nothing more
        ("cut", "closed: 1006 the connection was lost"),
        # a network that went away closes no socket: the page said 'streaming' on its last frame, the
        # microphone on, for as long as TCP took to give up (minutes; here, for good). A stream hears
        # its server 25 times a second (frames) and at least once (the pong to its ping): after 10 s
        # of nothing (3 s here: ?silent_s=3) the page gives the connection up and says so
        ("stall", "closed: 1006 the server sent nothing for 3 s"),
    ],
)
def test_a_websocket_whose_connection_fails_says_how(browser_page, fault, says, served):
    with served(max_sessions=2) as (url, app), relay(int(url.rsplit(":", 1)[1])) as (port, cut, stall):
        page = streaming_through_a_relay(browser_page, url, port, silent_s=3)
        try:
            if fault == "stall":
                # nothing is to happen: 4 s outlast the page's silence limit (3 s, ?silent_s=3) by 1 s, in
                # which a page that counted a playing stream as silent would have given it up (waited
                # for once: the cut's page streams through the same relay, as this one up to its stall)
                page.wait_for_timeout(4000)
            assert page.evaluate("window.streamgenStats.state") == "streaming (websocket)"
            {"cut": cut, "stall": stall}[fault]()
            page.wait_for_function("window.streamgenStats.state.startsWith('closed')", timeout=30_000)
            assert page.evaluate("held()") == {
                "mics": 0, "contexts": 0, "state": says, "connect": True, "hangup": False
            }  # fmt: skip
        finally:
            page.close()


# a page's interval timers run once a minute, as Chromium runs a hidden tab's after 5 minutes
# (intensive wake-up throttling: a page that plays nothing audible and holds no WebRTC connection)
TIMERS_HELD = """
const intervalAsAsked = window.setInterval;
window.setInterval = (f, ms, ...args) => intervalAsAsked(f, 60000, ...args);
"""


# The page's WebSocket tries counted as each closes; its WEBSOCKET_TRIES and WEBSOCKET_RETRY_MS
SOCKETS_CLOSED = """
window.__socketsClosed = 0;
window.WebSocket = class extends window.WebSocket {
  constructor(...a) { super(...a); this.addEventListener("close", () => __socketsClosed++); }
};
"""
WEBSOCKET_TRIES, WEBSOCKET_RETRY_MS = 5, 1000


@contextmanager
def requests_never_answered(page, pattern: str):
    """The page's requests to `pattern` taken from the block on and never answered, as by a server
    or a proxy that holds them; the block's end waits for the first to have been sent."""
    taken = []  # (kept, never continued, fulfilled nor aborted: each request waits)
    page.route(pattern, lambda route: taken.append(route))
    with page.expect_request(pattern):
        yield


def websocket_tries_run_at_once(page) -> None:
    """A page (SOCKETS_CLOSED, its clock installed) whose WebSockets never reach their server: each
    second between its tries is run as soon as the try has closed (they took 4 s of the test's
    time), and all of them were made."""
    for tries in range(1, WEBSOCKET_TRIES):
        page.wait_for_function(f"window.__socketsClosed >= {tries}", timeout=20_000)
        page.clock.run_for(WEBSOCKET_RETRY_MS)
    page.wait_for_function(f"window.__socketsClosed >= {WEBSOCKET_TRIES}", timeout=20_000)


def test_a_websocket_that_never_reaches_the_server_says_so_and_ends_its_session(browser_page, served):
    """A WebSocket closed without a word before its stream started (the server gone since the
    session was made, or a proxy that does not pass WebSockets on: no close frame, 1006) failed as
    'failed: WebSocket failed', which said nothing a user could act on. It says what it was now, and
    the session its socket never reached is DELETEd."""
    from server_helpers import a_port_nobody_answers_on

    with served(max_sessions=1) as (url, app), a_port_nobody_answers_on() as nobody:
        page = browser_page.new_page()
        page.add_init_script(HELD + STREAM_ELSEWHERE + SOCKETS_CLOSED + f"window.streamAt = 'http://127.0.0.1:{nobody}';")
        page.clock.install()  # (websocket_tries_run_at_once)
        try:
            page.goto(f"{url}/?autostart=1&transport=ws&mic=0")
            websocket_tries_run_at_once(page)
            page.wait_for_function("window.streamgenStats.state.startsWith('failed')", timeout=20_000)
            assert page.evaluate("held()") == {
                "mics": 0, "contexts": 0, "connect": True, "hangup": False,
                "state": "failed: the WebSocket stream could not connect to the server (it is gone, or a proxy "
                         "between does not pass WebSockets on)",
            }  # fmt: skip
            wait_for(lambda: not app.state.registry.sessions, 5, "the session its socket never reached was left")
        finally:
            page.close()


def test_a_fallback_that_fails_too_says_why_webrtc_failed_first(browser_page, served):
    """WebRTC failed (here its offer refused), and the WebSocket it fell back to failed too: the page
    said the WebSocket's reason alone, as though it were the only way tried, and WebRTC's only on the
    console (its refusal as the body's raw JSON). Both are said now, each in its server's words."""
    import json

    from server_helpers import a_port_nobody_answers_on

    refusal = json.dumps({"error": "bad_offer", "message": "the offer has no video"})
    with served(max_sessions=1) as (url, app), a_port_nobody_answers_on() as nobody:
        page = browser_page.new_page()
        page.add_init_script(HELD + STREAM_ELSEWHERE + SOCKETS_CLOSED + f"window.streamAt = 'http://127.0.0.1:{nobody}';")
        page.clock.install()  # (websocket_tries_run_at_once)
        try:
            page.route("**/whep", lambda route: route.fulfill(status=400, body=refusal, content_type="application/json"))
            page.goto(f"{url}/?autostart=1&mic=0")
            websocket_tries_run_at_once(page)
            page.wait_for_function("window.streamgenStats.state.startsWith('failed')", timeout=20_000)
            assert page.evaluate("held()")["state"] == (
                "failed: the WebSocket stream could not connect to the server (it is gone, or a proxy between does "
                "not pass WebSockets on); tried first: WHEP 400: the offer has no video"
            )
        finally:
            page.close()


def test_a_watch_only_websocket_whose_timers_are_held_keeps_its_session(browser_page):
    """A WebSocket page without its microphone keeps its session with a ping each second (the
    idle limit counts the client's messages), sent from a timer: in a tab hidden for long, that
    timer ran once a minute, and the session was closed as idle (4408) while it was watched. The
    stream's own messages (25 a second) send the pings too now."""
    with live_server(max_sessions=2, idle_timeout_s=3.0) as (url, app):
        page = browser_page.new_page()
        page.add_init_script(HELD + TIMERS_HELD)
        try:
            page.goto(f"{url}/?autostart=1&transport=ws&mic=0")
            page.wait_for_function("window.streamgenStats.framesDecoded >= 3", timeout=60_000)
            # nothing is to happen: 6 s are twice the server's idle limit (3 s), and the held timers
            # run once a minute, so a session kept by the timer's pings alone would have been closed
            page.wait_for_timeout(6000)
            assert page.evaluate("window.streamgenStats.state") == "streaming (websocket)"
            assert len(app.state.registry.sessions) == 1
        finally:
            page.close()


@contextmanager
def server_in_a_child_process(**overrides):
    """live_server in a child forked from this process, which has imported the server, torch and
    the model already (a `streamgen serve` took ~6 CPU s to start, most of it importing them and
    warming up), to be killed outright; yields (its base URL, its pid). The child serves until it
    is killed, 120 s at the most."""
    import time
    import weakref

    from server_helpers import small_model

    small_model()  # (loaded before the fork, for the child and for the file's other tests)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: serves, says its URL once ready, never returns into pytest
        try:
            os.close(read)
            # none of this process's finalizers run in the child: the speech engine, made again in
            # a new process, dropped its copy of the parent's, whose cleanup deleted the parent's
            # espeak-ng data folder (each later speak: "espeak-ng makes no sound")
            for finalizer in list(weakref.finalize._registry):
                finalizer.detach()
            with live_server(**overrides) as (url, _):
                os.write(write, url.encode())
                time.sleep(120)
        finally:
            os._exit(0)
    os.close(write)
    try:
        url = os.read(read, 100).decode()  # (nothing, at its end: the child ended without a URL)
        assert url, "the child's server did not start"
        yield url, pid
    finally:
        os.close(read)
        os.kill(pid, signal.SIGKILL)  # (killed already, it is there to be waited for)
        os.waitpid(pid, 0)


def test_a_webrtc_page_whose_server_is_killed_says_so(browser_page):
    """A server killed outright (SIGKILL, its machine gone) sends no DTLS close and answers no
    session check: the page said 'ended: the connection was lost' once ICE gave the connection up,
    about 11 s later. Two unanswered checks with no frame between them now say what happened."""
    page = browser_page.new_page()
    page.add_init_script(HELD)
    try:
        with server_in_a_child_process(max_sessions=2) as (url, pid):
            page.goto(f"{url}/?autostart=1&avatar=ada&mic=0")
            page.wait_for_function("window.streamgenStats.framesDecoded >= 10", timeout=60_000)
            assert page.evaluate("window.streamgenStats.transport") == "webrtc"
            os.kill(pid, signal.SIGKILL)
            page.wait_for_function("window.streamgenStats.state.startsWith('ended')", timeout=30_000)
            assert page.evaluate("held()") == {
                "mics": 0, "contexts": 0, "state": "ended: the server is not answering", "connect": True, "hangup": False,
            }  # fmt: skip
    finally:
        page.close()


@pytest.mark.parametrize("transport", ["webrtc", "ws"])
def test_a_session_the_server_never_answers_is_given_up(browser_page, transport, served):
    """A server (or proxy) that took the connection of a connect's POST /v1/sessions and never
    answered left the page 'connecting' for good, Connect disabled and the microphone on. The page
    gives it up after 10 s now, says so, and gives the controls and the microphone back."""
    with served(max_sessions=1) as (url, app):
        page = browser_page.new_page()
        page.add_init_script(HELD)
        page.clock.install()  # (the page's 10 s run at once)
        try:
            page.goto(f"{url}/?transport={transport}")
            page.wait_for_selector("#avatars button")
            with requests_never_answered(page, "**/v1/sessions"):
                page.click("#connect")
            assert page.evaluate("held().state") == "connecting"
            page.clock.run_for(9_000)
            assert page.evaluate("held().state") == "connecting"
            page.clock.run_for(2_000)
            page.wait_for_function("window.streamgenStats.state !== 'connecting'", timeout=5_000)
            assert page.evaluate("held()") == {
                "mics": 0, "contexts": 0, "state": "failed: the server does not answer (no answer in 10 s)",
                "connect": True, "hangup": False,
            }  # fmt: skip
            assert page.evaluate("document.getElementById('face').disabled") is False
        finally:
            page.close()


@pytest.mark.parametrize("transport", ["webrtc", "ws"])
def test_a_session_answered_after_the_page_gave_up_is_deleted(browser_page, transport):
    """A session's creation the page gave up (no answer in 10 s) was cut off: a server that had the
    request made the session all the same, and it stayed until the server's unclaimed timeout (20 s;
    here a minute), a server of one session refusing the next connect meanwhile. The page waits on
    for the answer now, and ends the session by its request's key as the answer's headers come (the
    server has the request then), using it for nothing."""
    with live_server(max_sessions=1, unclaimed_timeout_s=60.0) as (url, app):
        page = browser_page.new_page()
        page.clock.install()  # (the page's 10 s run at once)
        held, requests = [], []
        page.on("request", lambda r: requests.append(f"{r.method} {r.url}"))
        try:
            page.goto(f"{url}/?transport={transport}&mic=0")
            page.wait_for_selector("#avatars button")
            # (answered once given up; the DELETE by its key, as the page gives up, goes: it finds no key)
            page.route("**/v1/sessions",
                       lambda route: held.append(route) if route.request.method == "POST" else route.continue_())
            with page.expect_request("**/v1/sessions"):
                page.click("#connect")
            page.clock.run_for(11_000)
            page.wait_for_function("window.streamgenStats.state !== 'connecting'", timeout=5_000)
            assert page.evaluate("window.streamgenStats.state") == "failed: the server does not answer (no answer in 10 s)"
            route = held.pop()
            made = route.fetch()  # the server makes the session, and its answer comes late
            assert made.status == 201 and len(app.state.registry.sessions) == 1
            with page.expect_request(lambda r: r.method == "DELETE", timeout=10_000) as deleted:
                route.fulfill(response=made)
            key = "streamgen-request-key"
            assert deleted.value.url == f"{url}/v1/sessions"
            assert deleted.value.headers[key] == route.request.headers[key]
            # (waited in the page's calls: its route passes the DELETE on)
            gone = lambda: not app.state.registry.sessions  # noqa: E731
            wait_in_page(page, gone, 5, "the late session was left to the server's timeout")
            assert [r for r in requests if "/whep" in r or "/stream" in r] == []  # (not used)
            assert page.evaluate("window.streamgenStats.state") == "failed: the server does not answer (no answer in 10 s)"
        finally:
            page.close()


def test_a_whep_offer_the_server_never_answers_falls_back_to_the_websocket(browser_page, served):
    """A WHEP offer (POST .../whep) the server or a proxy took and never answered left the page
    'connecting' for good: the 5 s limit to connect started only with the answer. The offer is
    given up after 10 s now, and the page streams over the WebSocket, as for any WebRTC failure."""
    with served(max_sessions=2) as (url, app):
        page = browser_page.new_page()
        page.clock.install()  # (the page's 10 s run at once)
        try:
            page.goto(f"{url}/?mic=0")
            page.wait_for_selector("#avatars button")
            with requests_never_answered(page, "**/whep"):
                page.click("#connect")
            page.clock.run_for(11_000)
            page.wait_for_function("window.streamgenStats.state !== 'connecting'", timeout=10_000)
            assert page.evaluate("window.streamgenStats.state") == "streaming (websocket)"
            page.click("#hangup")
        finally:
            page.close()


def test_an_avatar_list_the_server_never_answers_is_given_up(browser_page, served):
    """`?autostart=1` connects once the avatar list came (or failed): a list the server (or a proxy)
    never answered left the page idle for good, with no list and nothing said. It is given up after
    10 s now, said in the list's place, and the page connects."""
    with served(max_sessions=1) as (url, app):
        page = browser_page.new_page()
        page.clock.install()  # (the page's 10 s run at once)
        try:
            with requests_never_answered(page, "**/v1/avatars"):
                page.goto(f"{url}/?autostart=1&transport=ws&mic=0")
            page.clock.run_for(11_000)
            page.wait_for_function("window.streamgenStats.state.startsWith('streaming')", timeout=20_000)
            said = page.text_content("#avatars")
            assert said == "no avatars to choose from (the server does not answer (no answer in 10 s))", said
            page.click("#hangup")
        finally:
            page.close()


def test_a_webrtc_attempt_that_fails_frees_its_session_before_the_websocket_asks(browser_page, served):
    """On a server of one session, a WebRTC attempt that failed (here its offer refused) DELETEd
    its session as the WebSocket fallback POSTed its own: the POST, first there, was refused ('503:
    server is at capacity (1 of 1 ...)'), as often as not. The fallback waits for the DELETE now
    (held 1 s here, as on a slow network)."""
    import time

    def refused_offer_slow_delete(route):
        if route.request.url.endswith("/whep"):
            return route.fulfill(status=500, body="refused")
        if route.request.method == "DELETE":
            time.sleep(1.0)
        route.continue_()

    with served(max_sessions=1) as (url, app):
        page = browser_page.new_page()
        try:
            page.route(lambda address: "/v1/sessions/" in address, refused_offer_slow_delete)
            page.goto(f"{url}/?autostart=1&mic=0")
            page.wait_for_function("!['idle', 'connecting'].includes(window.streamgenStats.state)", timeout=30_000)
            assert page.evaluate("window.streamgenStats.state") == "streaming (websocket)"
            page.click("#hangup")
        finally:
            page.close()


def test_a_pictures_upload_counts_in_the_wait_for_the_sessions_answer(browser_page, tmp_path, served):
    """A session's creation is given up 10 s after its request: with a picture, that counted its
    upload too, and a phone on a slow uplink (64 KiB/s) sending a picture of 640 KiB was told the
    server did not answer while it still sent it. The wait is 10 s and a second per 64 KiB now."""
    picture = tmp_path / "face.png"
    picture.write_bytes(b"\0" * (640 * 1024))  # (not sent: the test holds the request)
    with served(max_sessions=1) as (url, app):
        page = browser_page.new_page()
        page.clock.install()  # (the page's 20 s run at once)
        try:
            page.goto(f"{url}/?transport=ws&mic=0")
            page.wait_for_selector("#avatars button")
            page.set_input_files("#upload", str(picture))
            with requests_never_answered(page, "**/v1/sessions"):
                page.click("#connect")
            page.clock.run_for(19_000)
            assert page.evaluate("window.streamgenStats.state") == "connecting"
            page.clock.run_for(2_000)
            page.wait_for_function("window.streamgenStats.state !== 'connecting'", timeout=5_000)
            assert page.evaluate("window.streamgenStats.state") == "failed: the server does not answer (no answer in 20 s)"
        finally:
            page.close()


@contextmanager
def server_udp_cut(monkeypatch):
    """The server's ICE (aioice, in this process) cut off from the network on `cut.set()`: every
    datagram it would send or has received dropped, both ways, nothing closed (as a network path
    that went: a laptop moved to another Wi-Fi, a firewall that started dropping UDP). Its HTTP
    goes on. Yields `cut` (a threading.Event)."""
    from aioice import ice

    cut = threading.Event()
    received, send_data, send_stun = (ice.StunProtocol.datagram_received, ice.StunProtocol.send_data,
                                      ice.StunProtocol.send_stun)  # fmt: skip

    async def dropped_data(self, data, addr):
        if not cut.is_set():
            await send_data(self, data, addr)

    monkeypatch.setattr(ice.StunProtocol, "datagram_received",
                        lambda self, data, addr: None if cut.is_set() else received(self, data, addr))
    monkeypatch.setattr(ice.StunProtocol, "send_data", dropped_data)
    monkeypatch.setattr(ice.StunProtocol, "send_stun",
                        lambda self, message, addr: None if cut.is_set() else send_stun(self, message, addr))
    yield cut


def test_a_webrtc_page_whose_connection_is_lost_ends_its_session(browser_page, served, monkeypatch):
    """A connection whose network path went (ICE disconnected, the server still answering HTTP): the
    page gave itself back ('ended: the connection was lost') and sent no DELETE; its session stayed
    until the server's peer timeout (10 s; ICE consent's ~30 s with --peer-timeout 0), and a
    reconnect meanwhile on a one-session server met a 503. The page ends its session itself."""
    from page_clock import CONNECTION_LOST, BoundClock

    with served(max_sessions=1, peer_timeout_s=0) as (url, app), server_udp_cut(monkeypatch) as cut:
        sessions = app.state.registry.sessions
        deleted = 'streamgen_sessions_closed_total{reason="deleted by client"}'
        before = metric(url, deleted)
        page = browser_page.new_page()
        page.add_init_script(HELD)
        clock = BoundClock(page, CONNECTION_LOST)
        try:
            page.goto(f"{url}/?autostart=1&avatar=ada&mic=0")
            page.wait_for_function("window.streamgenStats.framesDecoded >= 5", timeout=60_000)
            assert page.evaluate("window.streamgenStats.transport") == "webrtc"
            cut.set()
            # ICE disconnected: the 5 s the page gives it to come back run at once (they were waited for)
            clock.wait_for_bound(timeout=30_000)
            clock.run_for(5_000)
            page.wait_for_function("window.streamgenStats.state.startsWith('ended')", timeout=30_000)
            assert page.evaluate("window.streamgenStats.state") == "ended: the connection was lost"
            wait_for(lambda: not sessions, 5, "the page whose connection was lost left its session on the server")
            assert metric(url, deleted) == before + 1
        finally:
            page.close()


# An answer whose headers come and whose body never ends (a proxy that stalls, a server that hangs
# as it writes): for the requests that `window.stallBodyOf` (a function of url and method) picks, the
# page gets the answer's status and headers, the first byte of its body, and nothing more; its body
# fails as a real one does once its request is cut off (its signal). `window.stalledStatuses`: theirs.
STALLED_BODIES = """
window.stallBodyOf = null;
window.stalledBodies = 0;
window.stalledStatuses = [];
const fetchWithWholeBodies = window.fetch;
window.fetch = async function (url, options) {
  const res = await fetchWithWholeBodies(url, options);
  if (!window.stallBodyOf || !window.stallBodyOf(String(url), (options && options.method) || "GET")) return res;
  const signal = options && options.signal;
  const body = new ReadableStream({ start(controller) {
    controller.enqueue(new TextEncoder().encode("{"));
    if (signal) signal.onabort = () => controller.error(new DOMException("cut off", "AbortError"));
  } });
  window.stalledBodies++;
  window.stalledStatuses.push(res.status);
  return new Response(body, { status: res.status, statusText: res.statusText, headers: res.headers });
};
"""


@pytest.mark.parametrize("stalled", ["session", "whep"])
def test_an_answer_whose_body_never_ends_is_given_up(each_browser, stalled, served):
    """An answer whose headers came and whose body never ended left the page 'connecting' for good:
    the 10 s a request may wait for its answer ended with the headers. They count to the body's end
    now: a session's creation so answered is given up (said, Connect given back to try again, and the
    session it made ended by its request's key: it was left to the server's unclaimed limit); a WHEP
    offer's, as any WebRTC failure, goes on over the WebSocket."""
    from page_clock import SESSION_ANSWER, WHEP_ANSWER, installed_clock

    with served(max_sessions=2) as (url, app):
        page = each_browser.new_page()
        page.add_init_script(STALLED_BODIES)
        # (the page's 10 s run at once; in Firefox, those of the answer under test)
        clock = installed_clock(page, {"session": SESSION_ANSWER, "whep": WHEP_ANSWER}[stalled])
        try:
            page.goto(f"{url}/?mic=0")
            page.wait_for_selector("#avatars button")
            path = {"session": "/v1/sessions", "whep": "/whep"}[stalled]
            page.evaluate(f"() => {{ window.stallBodyOf = (url, method) => method === 'POST' && url.endsWith('{path}'); }}")
            page.click("#connect")
            page.wait_for_function("window.stalledBodies === 1", timeout=20_000)
            clock.run_for(11_000)
            page.wait_for_function("window.streamgenStats.state !== 'connecting'", timeout=10_000)
            if stalled == "whep":
                assert page.evaluate("window.streamgenStats.state") == "streaming (websocket)"
                page.click("#hangup")
                return
            assert page.evaluate("window.streamgenStats.state") == "failed: the server does not answer (no answer in 10 s)"
            assert page.is_enabled("#connect")
            # the session it made, whose answer never came whole, is ended (by its request's key)
            wait_for(lambda: not app.state.registry.sessions, 5, "the session given up was left to the server's timeout")
            page.evaluate("window.stallBodyOf = null")
            page.click("#connect")  # tried again, it connects
            clock.run_for(1_000)
            page.wait_for_function("window.streamgenStats.state.startsWith('streaming')", timeout=30_000)
            page.click("#hangup")
        finally:
            page.close()


# The page's POST /v1/sessions held in the page while `window.holdPosts` is true (not yet at the
# server), let go with `window.heldPosts` (functions)
HOLD_SESSION_POSTS = """
window.holdPosts = false;
window.heldPosts = [];
const fetchNow = window.fetch;
window.fetch = (url, options) => (window.holdPosts && options && options.method === "POST" && String(url).endsWith("/v1/sessions")
  ? new Promise((resolve) => window.heldPosts.push(() => resolve(fetchNow(url, options))))
  : fetchNow(url, options));
"""


def test_a_session_asked_after_the_page_gave_up_and_answered_without_an_end_is_ended(each_browser, served):
    """A session's creation given up before its request reached the server (the give-up's DELETE by
    its key found nothing), then made, its answer's body never ending: the page waited on that body
    to DELETE the session, which was left to the server's unclaimed limit (20 s). The answer's headers
    say the server has the request: the page ends the session by its key then."""
    from page_clock import SESSION_ANSWER, installed_clock

    with served(max_sessions=2) as (url, app):
        page = each_browser.new_page()
        page.add_init_script(STALLED_BODIES + HOLD_SESSION_POSTS)
        clock = installed_clock(page, SESSION_ANSWER)  # (the page's 10 s run at once; in Firefox, the creation's)
        try:
            page.goto(f"{url}/?mic=0")
            page.wait_for_selector("#avatars button")
            page.evaluate("window.holdPosts = true; "
                          "window.stallBodyOf = (url, method) => method === 'POST' && url.endsWith('/v1/sessions')")  # fmt: skip
            page.click("#connect")
            page.wait_for_function("window.heldPosts.length === 1", timeout=10_000)
            clock.run_for(11_000)
            page.wait_for_function("window.streamgenStats.state !== 'connecting'", timeout=10_000)
            assert page.evaluate("window.streamgenStats.state") == "failed: the server does not answer (no answer in 10 s)"
            page.evaluate("window.holdPosts = false; window.heldPosts.splice(0).forEach((go) => go())")
            page.wait_for_function("window.stalledBodies === 1", timeout=20_000)
            wait_for(lambda: not app.state.registry.sessions, 5, "the late session was left to the server's timeout")
        finally:
            page.close()
