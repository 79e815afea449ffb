"""The end of a page's session in real headless Chromium (as test_server_browser.py; skipped without
it): ended by the server or its shutdown, the tab closed, left or killed, hung up and connected again."""

from __future__ import annotations

import os

import pytest
from server_helpers import live_server
from test_server_browser import HELD, held_page, metric, wait_for
from test_server_browser_network import SOCKETS_CLOSED

pytestmark = [pytest.mark.browser, pytest.mark.timeout(180)]


def test_the_page_says_when_the_server_ends_its_webrtc_session(browser_page):
    """A session ended by the server (here its maximum duration) froze the page on its last frame,
    'streaming', with the microphone on and Connect disabled: the peer connection lingers until
    ICE gives up. The page checks its session and frees what it holds, and says why it ended (it
    said only that the server had ended it)."""
    with live_server(max_sessions=2, max_duration_s=4.0) as (url, app):
        page = held_page(browser_page, f"{url}/?autostart=1&avatar=ada")
        try:
            page.wait_for_function("window.streamgenStats.framesDecoded >= 10", timeout=60_000)
            assert page.evaluate("held()")["mics"] == 1
            page.fill("#speak-text", "hello there, " * 76)  # refused: a minute of speech
            page.click("#speak")
            page.wait_for_function("window.streamgenStats.notice.startsWith('speak: text too long')", timeout=10_000)
            page.wait_for_function("window.streamgenStats.state.startsWith('ended')", timeout=30_000)
            assert page.evaluate("held()") == {
                "mics": 0, "contexts": 0, "connect": True, "hangup": False,
                "state": "ended: the session reached this server's time limit (4 s)",
            }  # fmt: skip
            # the refusal was the ended session's: it stayed beside 'ended: ...' until a connect
            assert page.text_content("#notice") == ""
        finally:
            page.close()


def test_a_websocket_page_says_the_server_ended_its_session_as_a_webrtc_page_does(browser_page):
    """A WebSocket session closed at its limit said 'closed: 4410 max_duration: ...', a code where
    the WebRTC page says the server ended the session, and why."""
    with live_server(max_sessions=2, max_duration_s=3.0) as (url, app):
        page = held_page(browser_page, f"{url}/?autostart=1&transport=ws&mic=0")
        try:
            page.wait_for_function("window.streamgenStats.state.startsWith('ended')", timeout=30_000)
            assert page.evaluate("window.streamgenStats.state") == (
                "ended: the session reached this server's time limit (3 s)"
            )
            assert page.evaluate("held()")["connect"] is True
        finally:
            page.close()


def test_a_webrtc_page_says_at_once_that_the_server_shut_down(browser_page):
    """A server shut down closes its peer connections (DTLS's close_notify) and answers no session
    check: the page went on 'streaming' a frozen frame until ICE gave up, ~10 s, then said only
    that the connection was lost. It now takes the transport's close as the server's."""
    page = held_page(browser_page, "about:blank")
    try:
        with live_server(max_sessions=2) as (url, app):
            page.goto(f"{url}/?autostart=1&mic=0")
            page.wait_for_function("window.streamgenStats.framesDecoded >= 10", timeout=60_000)
        page.wait_for_function("window.streamgenStats.state.startsWith('ended')", timeout=30_000)
        held = page.evaluate("held()")
        # (a check that went out on a connection kept alive may still find the session closed)
        assert held.pop("state") in (
            "ended: the server closed the connection and is not answering",
            "ended: the server shut down",
        )
        assert held == {"mics": 0, "contexts": 0, "connect": True, "hangup": False}
    finally:
        page.close()


# a page whose DELETEs never leave it (answered in the page, as if the request were lost)
NO_DELETE = """
const realFetch = window.fetch;
window.fetch = (url, init) => (init && init.method === "DELETE" ? Promise.resolve(new Response(null, {status: 204}))
                                                                 : realFetch(url, init));
"""


def test_a_webrtc_page_closed_or_left_ends_its_session_at_once(browser_page, monkeypatch, served):
    """A closed tab, or a page left for another, must not hold its session (and a model slot) until
    ICE consent expires (about 30 s, aioice's checks; the waits here are 10 s): the page's pagehide
    sends the DELETE, and where that is lost, the peer connection's closing ends it on the server.
    The page sends the DELETE and closes its peer connection at once: which of the two the server
    sees first, and so the session's close reason, is the network's (the DELETE that comes second
    finds the session ended, answered 204 all the same: `end_session`). The test read the reason
    the DELETE gives, and failed where the peer's close came first."""
    from server import routes

    deletes = []  # the sessions a DELETE reached the server for, ended already or not
    for name in ("require_session", "ended_reason"):  # (what end_session looks the session up with)
        def noted(request, session_id, look_up=getattr(routes, name)):
            if request.method == "DELETE":
                deletes.append(session_id)
            return look_up(request, session_id)

        monkeypatch.setattr(routes, name, noted)
    with served(max_sessions=2) as (url, app):
        sessions = app.state.registry.sessions
        closed = 'streamgen_sessions_closed_total{reason="%s"}'
        # (a shared server's counters go on from the tests before)
        ended_before = metric(url, closed % "deleted by client") + metric(url, closed % "peer connection closed")
        page = browser_page.new_page()
        page.goto(f"{url}/?autostart=1&avatar=ada&mic=0")
        page.wait_for_function("window.streamgenStats.framesDecoded >= 10", timeout=60_000)
        (closing,) = sessions
        page.close(run_before_unload=True)
        wait_for(lambda: not sessions, 10, "closing the tab left its session on the server")
        wait_for(lambda: deletes, 10, "closing the tab sent no DELETE")
        peer_closed = metric(url, closed % "peer connection closed")
        assert (metric(url, closed % "deleted by client") + peer_closed - ended_before, deletes) == (1, [closing])

        page = browser_page.new_page()
        page.add_init_script(NO_DELETE)
        try:
            page.goto(f"{url}/?autostart=1&avatar=ada&mic=0")
            page.wait_for_function("window.streamgenStats.framesDecoded >= 10", timeout=60_000)
            page.goto("about:blank")
            wait_for(lambda: not sessions, 10, "leaving the page left its session on the server")
            assert metric(url, closed % "peer connection closed") == peer_closed + 1
            assert deletes == [closing]  # (the second page's never left it)
        finally:
            page.close()


def our_renderers() -> set[int]:
    """The pids of the Chromium renderers this process started (through Playwright's driver)."""
    parents, renderers = {}, set()
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if b"--type=renderer" in f.read():
                    renderers.add(int(entry))
        except (ValueError, OSError):  # not a process, or gone
            continue

    def ours(pid: int) -> bool:
        for _ in range(10):
            pid = parents.get(pid, 0)
            if pid == os.getpid():
                return True
        return False

    return {pid for pid in renderers if ours(pid)}


def test_a_webrtc_tab_whose_renderer_is_killed_frees_its_session(browser_page):
    """A killed renderer sends nothing more: no DELETE, no pagehide, no DTLS close, no consent
    answers. Its session held its slot until ICE consent gave up (about 30 s); now the server
    closes it once the peer has sent nothing for --peer-timeout seconds (2 here; the wait is 15 s)."""
    import signal

    with live_server(max_sessions=2, peer_timeout_s=2.0) as (url, app):
        sessions = app.state.registry.sessions
        page = browser_page.new_page()
        try:
            # no microphone: the page's RTCP receiver reports are all it sends
            page.goto(f"{url}/?autostart=1&avatar=ada&mic=0")
            page.wait_for_function("window.streamgenStats.framesDecoded >= 10", timeout=60_000)
            # nothing is to happen: 5 s outlast the peer timeout (2 s) 2.5 times, in which a server that
            # did not count a streaming tab's RTCP reports as hearing it would have closed its session
            page.wait_for_timeout(5000)
            assert len(sessions) == 1
            # every renderer of the browser (the page's may be the spare one Chromium keeps started;
            # the other pages of the context crash too, and the next tests open pages of their own)
            with page.expect_event("crash", timeout=10_000):
                for pid in our_renderers():
                    os.kill(pid, signal.SIGKILL)
            wait_for(lambda: not sessions, 15, "a killed tab held its session")
            assert metric(url, 'streamgen_sessions_closed_total{reason="peer_silent"}') == 1
        finally:
            page.close()


def test_a_websocket_page_hung_up_and_connected_again_at_once_keeps_the_new_connection(browser_page):
    """The old socket's close (it comes after the new connection began) ended the new one's UI and
    re-enabled Connect while it streamed; every connect made and deleted a spare session; the
    AudioContexts were never closed; the overlay kept the last connection's figures."""
    with live_server(max_sessions=3) as (url, app):
        sessions = app.state.registry.sessions
        page = browser_page.new_page()
        page.add_init_script(HELD + SOCKETS_CLOSED)
        page.goto(f"{url}/?autostart=1&transport=ws")
        try:
            page.wait_for_function("window.streamgenStats.framesDecoded >= 10", timeout=60_000)
            assert metric(url, "streamgen_sessions_created_total") == 1
            fresh = page.evaluate("""() => {
                document.getElementById('hangup').click();
                document.getElementById('connect').click();
                return [window.streamgenStats.framesDecoded, window.streamgenStats.firstFrameMs];
            }""")
            assert fresh == [0, None]  # the new connection's figures start from nothing
            page.wait_for_function("window.streamgenStats.framesDecoded >= 10", timeout=60_000)
            # the first socket's close has come to the page (counted before the page's own handler runs)
            page.wait_for_function("window.__socketsClosed >= 1", timeout=10_000)
            wait_for(lambda: len(sessions) == 1)
            assert page.evaluate("held()") == {
                "mics": 1, "contexts": 1, "state": "streaming (websocket)", "connect": False, "hangup": True,
            }  # fmt: skip
            assert metric(url, "streamgen_sessions_created_total") == 2
            page.click("#hangup")
            wait_for(lambda: not sessions)
            assert page.evaluate("held()") == {
                "mics": 0, "contexts": 0, "state": "idle", "connect": True, "hangup": False,
            }  # fmt: skip
        finally:
            page.close()


def test_a_shared_server_is_handed_on_only_without_sessions(served, monkeypatch):
    """conftest's `served` (the server the browser files' tests of one configuration share) hands
    the next test the same server where no session is left on it, and a fresh one where a session
    stays past SESSIONS_GONE_S (here one made and never claimed, which the server keeps for 20 s)."""
    import conftest
    import httpx
    from server_helpers import auth, new_session

    monkeypatch.setattr(conftest, "SESSIONS_GONE_S", 0.5)
    # (the configuration of the file's other tests on `served`: the server it takes and the one it leaves are theirs)
    with served(max_sessions=2) as (url, app), httpx.Client(base_url=url) as client:
        new_session(client)
    with served(max_sessions=2) as (fresh_url, fresh_app), httpx.Client(base_url=fresh_url) as client:
        assert fresh_url != url and fresh_app is not app and not fresh_app.state.registry.sessions
        made = new_session(client)
        assert client.delete(made["resource"], headers=auth(made["token"])).status_code == 204
    with served(max_sessions=2) as (same_url, same_app):
        assert same_url == fresh_url and same_app is fresh_app


@pytest.fixture(scope="module")
def browser_that_keeps_pages_left(playwright):
    """Chromium as a user's is: a page left for another is kept, as it was, and a Back to it shows
    it again without loading it (the back/forward cache, which Playwright turns off)."""
    from test_server_browser import SPEECH_WAV, chromium, chromium_args

    with chromium(playwright, chromium_args(SPEECH_WAV), back_forward_cache=True) as context:
        yield context


@pytest.mark.parametrize("transport", ["webrtc", "ws"])
def test_a_page_left_mid_call_and_gone_back_to_says_its_call_ended(browser_that_keeps_pages_left, transport, served):
    """A page left while it streamed ends its connection (pagehide), and the browser keeps it: Back
    showed it 'streaming (webrtc)' beside an enabled Connect, nothing streaming and nothing said. It
    says the call ended as the page was left, with nothing held."""
    with served(max_sessions=2) as (url, app):
        sessions = app.state.registry.sessions
        page = browser_that_keeps_pages_left.new_page()
        page.add_init_script(HELD + "window.addEventListener('pageshow', (e) => { window.__restored = e.persisted; });")
        try:
            page.goto(f"{url}/?autostart=1" + ("&transport=ws" if transport == "ws" else ""))
            page.wait_for_function("window.streamgenStats.framesDecoded >= 5", timeout=60_000)
            page.goto(f"{url}/v1/avatars")
            wait_for(lambda: not sessions, 10, "leaving the page left its session on the server")
            page.go_back(wait_until="commit")  # (a page the cache shows again has no load event)
            page.wait_for_function("window.__restored !== undefined", timeout=10_000)
            assert page.evaluate("window.__restored") is True, "the browser loaded the page anew: nothing tested"
            assert page.evaluate("held()") == {
                "mics": 0, "contexts": 0, "connect": True, "hangup": False, "state": "ended: the page was left",
            }  # fmt: skip
            assert page.text_content("#status") == "ended: the page was left"
        finally:
            page.close()


def test_a_session_check_whose_body_never_ends_still_says_the_session_ended(each_browser):
    """A WebRTC page checks its session as the server closes the connection: a 404 whose body never
    ended (a proxy that stalls after the headers) hung the check, which read it without a time limit,
    and the page said 'streaming' over a frozen frame until ICE gave up. The check's answer, its body
    included, has a limit now: the 404 alone says the server ended the session."""
    from page_clock import SESSION_CHECK, BoundClock
    from test_server_browser_network import STALLED_BODIES

    stall_session_checks = "window.stallBodyOf = (url, method) => method === 'GET' && /\\/v1\\/sessions\\/[^/]+$/.test(url);"
    with live_server(max_sessions=2, max_duration_s=4.0) as (url, app):
        page = each_browser.new_page()
        page.add_init_script(HELD + STALLED_BODIES + stall_session_checks)
        clock = BoundClock(page, SESSION_CHECK)
        try:
            page.goto(f"{url}/?autostart=1&mic=0")
            # the 404's body stalled: the check's 5 s run at once (they were waited for)
            page.wait_for_function("window.stalledStatuses.includes(404)", timeout=60_000)
            clock.run_for(5_000)
            page.wait_for_function("window.streamgenStats.state.startsWith('ended')", timeout=60_000)
            assert page.evaluate("window.stalledBodies") > 0 and page.evaluate("window.streamgenStats.transport") == "webrtc"
            assert page.evaluate("held()") == {
                "mics": 0, "contexts": 0, "connect": True, "hangup": False, "state": "ended: the server ended the session",
            }  # fmt: skip
        finally:
            page.close()
