"""The web client's WebSocket before the server's ready: hung up against a server slow to accept it
or silent, between its socket and ready, or before a conflict's refusal; refused before ready.

Chromium as in test_server_browser.py (skipped without it). Playwright runs a route's handler
only while this thread is in one of its calls: the waits on routed pages go through the page
(`wait_in_page`), not time.sleep.
"""

from __future__ import annotations

import base64
import hashlib
import re
import socket
import threading
from contextlib import contextmanager

import pytest
from test_server_browser import HELD, metric, wait_for
from test_server_browser_hangup import IDLE, connects_and_streams, console_and_deletes, wait_in_page

pytestmark = [pytest.mark.browser, pytest.mark.timeout(180)]


def websocket_accept(request: bytes) -> bytes:
    """The 101 answer to a WebSocket upgrade request (RFC 6455 4.2.2)."""
    key = re.search(rb"(?im)^sec-websocket-key:\s*(\S+)", request).group(1)
    accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
    return b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" \
        b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"  # fmt: skip


def client_frames(data: bytes) -> tuple[list[int], bytes]:
    """The opcodes of the whole client frames `data` begins with (masked, RFC 6455 5.2), and the
    bytes after them."""
    opcodes = []
    while len(data) >= 2:
        length, at = data[1] & 0x7F, 2
        if length >= 126:
            size = 2 if length == 126 else 8
            if len(data) < at + size:
                break
            length, at = int.from_bytes(data[at : at + size], "big"), at + size
        end = at + 4 + length  # the mask, then the payload
        if len(data) < end:
            break
        opcodes.append(data[0] & 0x0F)
        data = data[end:]
    return opcodes, data


@contextmanager
def unanswering_listener(upgrade: bool = False):
    """A server slow to accept a WebSocket: a TCP listener on 127.0.0.1 that takes one connection,
    reads its upgrade request and never answers (with `upgrade`, answers the upgrade and then says
    nothing, not even to the start message). Yields (port, events): "request" as its bytes come,
    on an upgraded socket "frames" as the client's come and "close frame" as they close it,
    "closed" once the client closed the connection."""
    events: list[str] = []
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(60)

        def serve():
            try:
                connection, _ = listener.accept()
            except OSError:  # none came (the test failed before), or the listener was closed
                return
            with connection:
                connection.settimeout(60)
                try:
                    frames = b""  # what came after the upgrade, in frames
                    while received := connection.recv(4096):
                        if upgrade and "request" in events:  # upgraded: the client's frames
                            # (its close frame, opcode 8, may come in one read with the frame before
                            # it, the stop message; the connection stays until the server's answer,
                            # which never comes, or the browser's own time limit)
                            opcodes, frames = client_frames(frames + received)
                            events.append("close frame" if 8 in opcodes else "frames")
                            continue
                        if upgrade:
                            connection.sendall(websocket_accept(received))
                        events.append("request")
                    events.append("closed")
                except OSError:
                    events.append("timed out")

        threading.Thread(target=serve, daemon=True).start()
        yield listener.getsockname()[1], events


# The session's stream address moved to window.streamAt's origin, while that is set (the page
# builds its WebSocket's URL from the session's `stream`).
STREAM_ELSEWHERE = """
const realFetch = window.fetch;
window.fetch = async (url, init) => {
  const res = await realFetch(url, init);
  if (!window.streamAt || !init || init.method !== "POST" || !String(url).endsWith("/v1/sessions")) return res;
  const made = await res.json();
  made.stream = window.streamAt + made.stream;
  return new Response(JSON.stringify(made), {status: res.status, headers: res.headers});
};
"""



def page_streaming_to(context, port: int):
    """A new page (HELD) whose sessions stream from 127.0.0.1:`port` (the listener's), until the
    test sets window.streamAt = null."""
    page = context.new_page()
    page.add_init_script(HELD + f"window.streamAt = 'http://127.0.0.1:{port}';" + STREAM_ELSEWHERE)
    return page


def watched_page(context, script: str):
    """A new page (HELD, then `script`) and what it does: (page, what it says on the console, the
    URLs it DELETEs)."""
    page = context.new_page()
    logs, deletes = console_and_deletes(page)
    page.add_init_script(HELD + script)
    return page, logs, deletes

def test_a_websocket_a_slow_server_has_not_accepted_can_be_hung_up(browser_page, served):
    """A WebSocket the server does not accept left the page 'connecting' for good, Hang up and
    Connect both disabled, an AudioContext and a session on the server held (20 s measured; the
    browser sets no limit). Hang up is there while connecting now: it closes the socket, deletes
    the session and leaves the page idle, and the page connects again."""
    with served(max_sessions=2) as (url, app), unanswering_listener() as (port, events):
        sessions = app.state.registry.sessions
        page = page_streaming_to(browser_page, port)
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        try:
            page.goto(f"{url}/?autostart=1&transport=ws&mic=0")
            wait_for(lambda: "request" in events, 20, "the page's WebSocket did not reach the listener")
            assert len(sessions) == 1
            connecting = {"mics": 0, "contexts": 1, "state": "connecting", "connect": False, "hangup": True}
            assert page.evaluate("held()") == connecting
            page.click("#hangup")
            wait_for(lambda: "closed" in events, 10, "the hung-up page kept its WebSocket")
            wait_for(lambda: not sessions, 10, "the hung-up attempt left its session on the server")
            # nothing more is to happen: the socket's close and the session's end are in (waited for
            # above), and an attempt the hang-up missed would say 'failed' or stream within 300 ms of
            # them (its close's handler runs as the close comes; its frames come 25 a second)
            page.wait_for_timeout(300)
            assert page.evaluate("held()") == IDLE
            page.evaluate("window.streamAt = null")
            connects_and_streams(page, "websocket")
            assert errors == []
        finally:
            page.close()


@pytest.mark.parametrize("upgrade", [False, True], ids=["no-upgrade", "no-ready"])
def test_a_websocket_a_server_never_answers_fails_with_a_reason(browser_page, upgrade, served):
    """A server that takes the TCP connection and never answers the WebSocket upgrade (or answers
    it and never the start message) left the page 'connecting' for good: the browser sets no limit
    on either. The page has a limit of its own now (the page's clock is moved past it): it says
    why it failed, gives back the socket and the session, and can connect again."""
    with served(max_sessions=2) as (url, app), unanswering_listener(upgrade) as (port, events):
        sessions = app.state.registry.sessions
        page = page_streaming_to(browser_page, port)
        page.clock.install()
        try:
            page.goto(f"{url}/?autostart=1&transport=ws&mic=0")
            wait_for(lambda: "request" in events, 20, "the page's WebSocket did not reach the listener")
            page.clock.fast_forward(60_000)
            still = "the page is still connecting"
            wait_for(lambda: page.evaluate("held()")["state"] != "connecting", 10, still)
            state = page.evaluate("held()")
            assert state["state"].startswith("failed: the WebSocket stream did not start within"), state
            assert state == {**IDLE, "state": state["state"]}
            closed = "close frame" if upgrade else "closed"
            wait_for(lambda: closed in events, 10, "the page kept its WebSocket")
            wait_for(lambda: not sessions, 10, "the failed attempt left its session on the server")
            page.evaluate("window.streamAt = null")
            connects_and_streams(page, "websocket")
        finally:
            page.close()


# window.hangUpAtStart: the page hangs up as its WebSocket's start message goes, before the server's
# ready can come (a microtask: after the page's own code, before any message is read).
HANG_UP_AT_START = """
const realSend = WebSocket.prototype.send;
WebSocket.prototype.send = function (data) {
  realSend.call(this, data);
  if (window.hangUpAtStart && typeof data === "string" && JSON.parse(data).type === "start") {
    window.hangUpAtStart = false;
    queueMicrotask(() => document.getElementById("hangup").click());
  }
};
"""


def test_a_hang_up_between_the_socket_and_ready_leaves_nothing_on_the_console(browser_page, served):
    """Hung up with the WebSocket open and its start message sent, before the server's ready: the
    page sent the stop message and a DELETE, which found the session the stop had ended (a 404,
    logged by Chromium as an error) or raced it. The server's clean answer to the close is the
    session's end now: no DELETE, nothing on the console, the session gone; a few rounds."""
    with served(max_sessions=2) as (url, app):
        sessions = app.state.registry.sessions
        page, logs, deletes = watched_page(browser_page, HANG_UP_AT_START)
        page.clock.install()  # (the page's wait for the close's answer runs at once)
        try:
            page.goto(f"{url}/?mic=0&transport=ws")
            for _ in range(3):
                page.evaluate("window.hangUpAtStart = true")
                page.click("#connect")
                started = lambda: page.evaluate("window.hangUpAtStart") is False  # noqa: E731
                wait_in_page(page, started, 20, "the page sent no start message")
                wait_in_page(page, lambda: not sessions, 10, "the session outlived the hang-up")
                # past the page's wait for the close's answer (2 s): a DELETE it sent has come back
                page.clock.run_for(2500)
                idle = lambda: page.evaluate("held()") == IDLE  # noqa: E731
                wait_in_page(page, idle, 10, "the page was not idle after its hang-up")
                # nothing more is to come: 500 ms outlast a DELETE's round trip to this machine's server
                # (milliseconds), which `deletes` would hold by then
                page.wait_for_timeout(500)
            assert (logs, deletes) == ([], [])
        finally:
            page.close()


def started_on_a_silent_socket(browser_page, url: str, port: int, events):
    """A page of `url` whose WebSocket goes to the silent listener on `port` (`unanswering_listener`),
    once its start message has reached it (bounded: 20 s)."""
    page = page_streaming_to(browser_page, port)
    try:
        page.goto(f"{url}/?autostart=1&transport=ws&mic=0")
        wait_for(lambda: "frames" in events, 20, "the page's start message did not reach the listener")
    except BaseException:
        page.close()
        raise
    return page

def test_a_hang_up_before_a_silent_servers_ready_deletes_the_session(browser_page, served):
    """The same hang-up where the socket's server answers nothing (not the API: a proxy that took the
    upgrade): the page's close is never answered, and the session is DELETEd all the same."""
    with served(max_sessions=2) as (url, app), unanswering_listener(upgrade=True) as (port, events):
        sessions = app.state.registry.sessions
        page = started_on_a_silent_socket(browser_page, url, port, events)
        try:
            assert len(sessions) == 1
            page.click("#hangup")
            wait_for(lambda: "close frame" in events, 10, "the hung-up page kept its WebSocket")
            wait_in_page(page, lambda: not sessions, 10, "the hung-up attempt left its session on the server")
            assert page.evaluate("held()") == IDLE
        finally:
            page.close()


def test_a_tab_left_while_its_hang_up_waits_for_the_sockets_close_deletes_the_session(browser_page, served):
    """The same hang-up, the page left at once (the tab closed, another address opened): the page's
    DELETE waited for the socket's close, up to 2 s, and a page gone before then never sent it; the
    session stayed until the server's unclaimed limit (20 s), a one-session server refusing the next
    page. The pending DELETE goes at pagehide, a keepalive request that outlives the page."""
    with served(max_sessions=2) as (url, app), unanswering_listener(upgrade=True) as (port, events):
        sessions = app.state.registry.sessions
        deleted = 'streamgen_sessions_closed_total{reason="deleted by client"}'
        before = metric(url, deleted)
        page = started_on_a_silent_socket(browser_page, url, port, events)
        try:
            assert len(sessions) == 1
            page.click("#hangup")
            page.goto("about:blank")  # (the page's 2 s wait has not run out: its timer goes with it)
            wait_for(lambda: not sessions, 10, "the page left during its hang-up left its session on the server")
            assert metric(url, deleted) == before + 1
        finally:
            page.close()


def test_a_websocket_refused_before_ready_fails_with_the_servers_reason(browser_page, served):
    """A socket the server refuses (here the session was ended between its creation and the socket:
    4404) closes before the ready message with a code and a reason. The page said only 'WebSocket
    failed'; it says the server's code and reason now, gives back what it held and connects again."""
    ended_meanwhile = """
const realFetch = window.fetch;
window.fetch = async (url, init) => {
  const res = await realFetch(url, init);
  if (!window.endMeanwhile || !init || init.method !== "POST" || !String(url).endsWith("/v1/sessions")) return res;
  window.endMeanwhile = false;
  const made = await res.clone().json();
  await realFetch(made.resource, {method: "DELETE", headers: {Authorization: `Bearer ${made.token}`}});
  return res;
};
window.endMeanwhile = true;
"""
    with served(max_sessions=2) as (url, app):
        sessions = app.state.registry.sessions
        page = browser_page.new_page()
        page.add_init_script(HELD + ended_meanwhile)
        try:
            page.goto(f"{url}/?autostart=1&transport=ws&mic=0")
            failed = lambda: page.evaluate("held()")["state"].startswith("failed")  # noqa: E731
            wait_in_page(page, failed, 20, "the refused page did not fail")
            state = page.evaluate("held()")
            # (to its own token, the server says why the session it knows of ended)
            said = "failed: WebSocket closed: 4404 session ended: deleted by client"
            assert state == {**IDLE, "state": said}, state
            assert not sessions
            connects_and_streams(page, "websocket")
        finally:
            page.close()


# window.endAt: where the page's session is DELETEd behind its back (the test's own DELETE, as
# another client's would be): "socket", between its creation and its WebSocket (refused: 4404);
# "start", in place of its start message, with the socket holding it (ended by the DELETE: 4410)
END_BEHIND_THE_PAGE = """
const realFetch = window.fetch;
window.endedBehind = [];
const endBehind = (made) => realFetch(made.resource, {
  method: "DELETE", headers: {Authorization: `Bearer ${made.token}`},
}).then((res) => window.endedBehind.push(res.status));
window.fetch = async (url, init) => {
  const res = await realFetch(url, init);
  if (!init || init.method !== "POST" || !String(url).endsWith("/v1/sessions")) return res;
  window.made = await res.clone().json();
  if (window.endAt === "socket") await endBehind(window.made);
  return res;
};
const realSend = WebSocket.prototype.send;
WebSocket.prototype.send = function (data) {
  if (window.endAt === "start" && typeof data === "string" && JSON.parse(data).type === "start") {
    endBehind(window.made);
    return;
  }
  realSend.call(this, data);
};
"""


@pytest.mark.parametrize("end_at, code", [("socket", 4404), ("start", 4410)])
def test_a_websocket_the_server_refused_sends_no_delete(browser_page, end_at, code, served):
    """A failed connect whose socket the server closed before its ready message because the session
    is gone (4404 unknown session, 4410 ended) DELETEd it all the same: a 404, which Chromium logs
    as an error. The server's close says the session is gone: the page sends no DELETE (the test's
    own is the only one), and nothing is on the console."""
    with served(max_sessions=2) as (url, app):
        sessions = app.state.registry.sessions
        page, logs, deletes = watched_page(browser_page, f"window.endAt = {end_at!r};" + END_BEHIND_THE_PAGE)
        try:
            page.goto(f"{url}/?autostart=1&transport=ws&mic=0")
            failed = lambda: page.evaluate("held()")["state"].startswith("failed")  # noqa: E731
            wait_in_page(page, failed, 20, "the refused page did not fail")
            state = page.evaluate("held()")["state"]
            assert state.startswith(f"failed: WebSocket closed: {code} "), state
            ended_behind = lambda: page.evaluate("window.endedBehind") == [204]  # noqa: E731
            wait_in_page(page, ended_behind, 10, "the test's own DELETE was not answered 204")
            # nothing more is to come: 1 s outlasts a DELETE's round trip to this machine's server
            # (milliseconds) many times, which `deletes` would hold by then
            page.wait_for_timeout(1000)
            made = page.evaluate("window.made")
            assert (len(deletes), logs) == (1, []), (deletes, logs)
            assert deletes[0].endswith(made["resource"])
            assert not sessions
        finally:
            page.close()


# The page's new session is claimed by another WebSocket (another client with its token) before the
# page's own socket comes, which the server then refuses: 4409, the session living on. The page hangs
# up as its socket opens, before that refusal is read; window.pageClose: the code it then closed with.
CLAIMED_ELSEWHERE = """
const realFetch = window.fetch;
const RealWebSocket = window.WebSocket;
window.fetch = async (url, init) => {
  const res = await realFetch(url, init);
  if (!init || init.method !== "POST" || !String(url).endsWith("/v1/sessions")) return res;
  const made = window.made = await res.clone().json();
  const at = new URL(`${made.stream}?token=${encodeURIComponent(made.token)}`, location.href);
  at.protocol = at.protocol.replace("http", "ws");
  window.otherSocket = new RealWebSocket(at);
  for (let i = 0; i < 100; i++) {  // (claimed once the server's handler is past its checks)
    const status = await realFetch(made.resource, {headers: {Authorization: `Bearer ${made.token}`}});
    if ((await status.json()).transport === "websocket") break;
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  return res;
};
window.pageClose = null;
window.WebSocket = class extends RealWebSocket {
  constructor(...args) {
    super(...args);
    this.addEventListener("open", () => document.getElementById("hangup").click());
    this.addEventListener("close", (e) => { window.pageClose = [e.code, e.wasClean]; });
  }
};
"""


def test_a_hang_up_before_a_conflict_refusal_deletes_the_session(browser_page, served):
    """Hung up with the WebSocket open, before the server's refusal of it: the page waited for the
    close's answer and took any clean close for the session's end. A 4409 (the session streams
    elsewhere) is a clean close that leaves the session living: the page sent no DELETE, and the
    session it made stayed on the server. The page DELETEs it now."""
    with served(max_sessions=2) as (url, app):
        sessions = app.state.registry.sessions
        page, logs, deletes = watched_page(browser_page, CLAIMED_ELSEWHERE)
        try:
            page.goto(f"{url}/?autostart=1&transport=ws&mic=0")
            closed = lambda: page.evaluate("window.pageClose") is not None  # noqa: E731
            wait_in_page(page, closed, 20, "the page's WebSocket did not close")
            assert page.evaluate("window.pageClose") == [4409, True]  # (the premise: refused after it)
            wait_in_page(page, lambda: not sessions, 10, "the hung-up page left its session on the server")
            made = page.evaluate("window.made")
            assert len(deletes) == 1 and deletes[0].endswith(made["resource"]), deletes
            assert page.evaluate("held()") == IDLE
            assert logs == []
        finally:
            page.evaluate("window.otherSocket && window.otherSocket.close()")
            page.close()


# Each WebSocket the page opens (window.sockets) hears, once its start message is sent (before the
# server's ready), a text message that is not JSON (a proxy's or a broken server's), as if its server
# had sent it.
NOT_JSON_AT_START = """
window.sockets = [];
window.WebSocket = class extends WebSocket {
  constructor(...args) {
    super(...args);
    window.sockets.push(this);
  }
  send(data) {
    super.send(data);
    if (typeof data === "string" && JSON.parse(data).type === "start") {
      setTimeout(() => this.dispatchEvent(new MessageEvent("message", { data: "<html>" })));
    }
  }
};
"""


def test_a_server_message_that_is_not_json_is_ignored_with_a_warning(each_browser, served):
    """A text message that is not JSON threw in the page's message handlers (an uncaught error on the
    console, twice once streaming: the ready's handler stayed). Before ready and while streaming, it
    is said on the console as a warning and ignored: the stream starts and goes on."""
    with served(max_sessions=2) as (url, app):
        page = each_browser.new_page()
        page.add_init_script(HELD + NOT_JSON_AT_START)
        logs: list[str] = []
        page.on("console", lambda m: logs.append(f"{m.type}: {m.text}"))
        page.on("pageerror", lambda e: logs.append(f"pageerror: {e}"))
        try:
            page.goto(f"{url}/?autostart=1&transport=ws&mic=0")
            page.wait_for_function("window.streamgenStats.framesDecoded >= 3", timeout=60_000)
            page.evaluate("window.sockets.at(-1).dispatchEvent(new MessageEvent('message', { data: 'null' }))")
            frames = page.evaluate("window.streamgenStats.framesDecoded")
            page.wait_for_function(f"window.streamgenStats.framesDecoded > {frames} + 5", timeout=20_000)
            assert page.text_content("#status") == "streaming (websocket)"
            not_json = "warning: the server sent a message the page cannot read, ignored: "
            assert logs == [not_json + "<html>", not_json + "null"]
            page.click("#hangup")
        finally:
            page.close()
