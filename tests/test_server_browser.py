"""The web client in real headless Chromium (Debian's chromium + Playwright), fake mic from a WAV file.

Needs /usr/bin/chromium (`apt-get install -y chromium`, see scripts/ci_browser.sh); skipped
with a message where it is missing. Numbers are read from getStats() and reported, never
compared with wall-clock targets.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest
from server_helpers import live_server

CHROMIUM = os.environ.get("STREAMGEN_CHROMIUM", "/usr/bin/chromium")
SPEECH_WAV = Path(__file__).resolve().parent.parent / "streamgen" / "assets" / "sample_speech.wav"

pytestmark = [pytest.mark.browser, pytest.mark.timeout(180)]


def chromium_args(wav: Path) -> list[str]:
    return [
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={wav}",
        "--allow-loopback-in-peer-connection",
        "--disable-features=WebRtcHideLocalIpsWithMdns",
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--autoplay-policy=no-user-gesture-required",
    ]  # fmt: skip


@contextmanager
def playwright_with_chromium():
    """Playwright, where Debian's chromium is there (the test skips otherwise, saying how to get it)."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"chromium not found at {CHROMIUM}: run scripts/ci_browser.sh (apt-get install -y chromium)")
    playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with playwright_api.sync_playwright() as p:
        yield p


@contextmanager
def chromium(p, args: list[str]):
    profile = tempfile.mkdtemp(prefix="streamgen-chromium-")
    try:
        context = p.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True, args=args)
        try:
            yield context
        finally:
            context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def run_page(context, url: str, frames: int = 50) -> dict:
    page = context.new_page()
    logs: list[str] = []
    page.on("console", lambda m: logs.append(f"{m.type}: {m.text}"))
    try:
        page.goto(url)
        page.wait_for_function(f"window.streamgenStats && window.streamgenStats.framesDecoded >= {frames}",
                               timeout=60_000)  # fmt: skip
        page.wait_for_timeout(1200)  # let fps and A/V estimates settle over a few stats reads
        stats = page.evaluate("window.streamgenStats")
        page.click("#hangup")
        page.wait_for_timeout(300)
    except Exception as e:
        raise AssertionError(f"page did not stream: {e}\nconsole:\n" + "\n".join(logs[-20:])) from None
    finally:
        page.close()
    return stats


def test_browser_webrtc(browser_page):
    with live_server(max_sessions=2, playout_delay_s=0.15) as (url, app):
        stats = run_page(browser_page, f"{url}/?autostart=1&avatar=ada")
        print("browser WebRTC stats:", stats)
        assert stats["transport"] == "webrtc", stats
        assert stats["framesDecoded"] >= 50
        assert stats["firstFrameMs"] is not None and stats["firstFrameMs"] > 0
        assert stats["fps"] > 0
        # the offer went before gathering was done: the page's candidates followed it (trickle ICE)
        assert stats["trickled"] >= 1, stats
        # the fake microphone (a WAV file) reached the avatar through Opus and the resampler
        import httpx

        metrics = httpx.get(f"{url}/metrics").text
        mic = [line for line in metrics.splitlines() if line.startswith('streamgen_audio_received_seconds_total{source="mic"}')]
        assert mic and float(mic[0].split()[-1]) > 1.0, metrics
        for _ in range(50):
            if not app.state.registry.sessions:
                break
            import time

            time.sleep(0.1)
        assert not app.state.registry.sessions, "hang up did not end the session"


def test_browser_page_on_a_server_with_a_token(browser_page):
    """`serve --token T`: the page takes the server token from its URL (`?token=T`), and says so
    when it has none."""
    with live_server(max_sessions=2, token="server-secret") as (url, _):
        stats = run_page(browser_page, f"{url}/?autostart=1&mic=0&token=server-secret", frames=25)
        assert stats["framesDecoded"] >= 25
        # opened without it, the page said the server's words for programs: "this server needs
        # 'Authorization: Bearer <server token>'", a header a browser's user cannot send
        page = browser_page.new_page()
        try:
            page.goto(f"{url}/?autostart=1&mic=0")
            page.wait_for_function("window.streamgenStats.state.startsWith('failed')", timeout=20_000)
            said = "failed: 401: this server needs its token: open the page as /?token=<server token>"
            assert page.evaluate("window.streamgenStats.state") == said
            page.goto(f"{url}/?autostart=1&mic=0&token=another")
            page.wait_for_function("window.streamgenStats.state.startsWith('failed')", timeout=20_000)
            assert page.evaluate("window.streamgenStats.state") == "failed: 403: wrong server token"
        finally:
            page.close()


def test_browser_websocket_fallback(browser_page):
    with live_server(max_sessions=2) as (url, _):
        stats = run_page(browser_page, f"{url}/?autostart=1&transport=ws", frames=25)
        print("browser WebSocket stats:", stats)
        assert stats["transport"] == "websocket" and stats["framesDecoded"] >= 25


# A page of another origin (an app builder's site) that streams an avatar over WHEP, as any
# browser WHEP player would: create a session, post the offer with the session's bearer token,
# read the answer's Location, play. `api` is the streamgen server's base URL.
PLAYER_PAGE = """<!doctype html><video id="v" autoplay muted playsinline></video><script>
async function play(api, policy = "all", trickle = false) {
  // trickle: post the offer at once and PATCH the candidates as they come (WHEP trickle ICE)
  const created = await fetch(api + "/v1/sessions", {method: "POST", body: "{}",
                              headers: {"Content-Type": "application/json"}});
  const s = await created.json();
  const auth = {"Authorization": "Bearer " + s.token};
  const pc = new RTCPeerConnection({iceServers: s.ice_servers, iceTransportPolicy: policy});
  pc.addTransceiver("video", {direction: "recvonly"});
  pc.ontrack = (e) => { document.getElementById("v").srcObject = new MediaStream([e.track]); };
  const gathered = [];  // candidate lines, then null at the end of gathering
  let sendCandidate = (line) => gathered.push(line);
  pc.onicecandidate = (e) => sendCandidate(e.candidate ? "a=" + e.candidate.candidate : null);
  await pc.setLocalDescription(await pc.createOffer());
  if (!trickle) await new Promise((done) => {
    if (pc.iceGatheringState === "complete") return done();
    pc.onicegatheringstatechange = () => pc.iceGatheringState === "complete" && done();
  });
  const offer = pc.localDescription.sdp;
  const r = await fetch(api + s.whep, {method: "POST", body: offer,
                        headers: {"Content-Type": "application/sdp", ...auth}});
  if (r.status !== 201) throw new Error("WHEP " + r.status);
  let patched = 0;
  if (trickle) {
    const head = [offer.match(/a=ice-ufrag:.*/)[0], offer.match(/a=ice-pwd:.*/)[0], "m=video 9 UDP/TLS/RTP/SAVPF 0",
                  "a=mid:0"];
    const patch = async (line) => {
      const body = head.concat([line === null ? "a=end-of-candidates" : line]).join("\\r\\n") + "\\r\\n";
      const p = await fetch(api + r.headers.get("Location"), {method: "PATCH", body: body, headers:
        {"Content-Type": "application/trickle-ice-sdpfrag", "If-Match": r.headers.get("ETag"), ...auth}});
      if (p.status !== 204) throw new Error("PATCH " + p.status + " " + (await p.text()));
      if (line !== null) patched++;
    };
    // one PATCH at a time, in the order gathered: a candidate found while an earlier one was being
    // sent went at once beside it, and the end of gathering could reach the server before it (400)
    let queue = Promise.resolve();
    sendCandidate = (line) => (queue = queue.then(() => patch(line)));
    for (const line of gathered) sendCandidate(line);
    await queue;
  }
  await pc.setRemoteDescription({type: "answer", sdp: await r.text()});
  for (let i = 0; i < 200; i++) {
    for (const st of (await pc.getStats()).values())
      if (st.type === "inbound-rtp" && st.kind === "video" && st.framesDecoded >= 10) {
        const stats = await pc.getStats();  // the path the media took: the selected pair's local end
        const transport = [...stats.values()].find((x) => x.type === "transport");
        const pair = transport && stats.get(transport.selectedCandidatePairId);
        const local = pair && stats.get(pair.localCandidateId);
        await fetch(api + r.headers.get("Location"), {method: "DELETE", headers: auth});
        pc.close();
        return {location: r.headers.get("Location"), frames: st.framesDecoded, via: local && local.candidateType,
                patched: patched, offered: (offer.match(/a=candidate:/g) || []).length};
      }
    await new Promise((t) => setTimeout(t, 100));
  }
  throw new Error("no frames");
}
</script>"""


def test_a_page_of_another_origin_plays_over_whep_when_allowed(browser_page):
    """`serve --cors-origin`: the browser's own CORS checks (preflight for the bearer token and
    application/sdp, the Location header read by the page) pass for an allowed origin, and
    refuse the same page where the server allows none."""
    import functools
    import http.server
    import threading

    # the page's own server, on 127.0.0.1 too (a page of a public address would first need
    # Chrome's permission to reach the loopback address space: not what is tested here)
    site = tempfile.mkdtemp(prefix="streamgen-player-")
    Path(site, "player.html").write_text(PLAYER_PAGE)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=site)
    pages = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=pages.serve_forever, daemon=True).start()
    origin = f"http://127.0.0.1:{pages.server_address[1]}"
    page = browser_page.new_page()
    try:
        page.goto(f"{origin}/player.html")
        with live_server(max_sessions=2, cors_origins=[origin]) as (url, app):
            played = page.evaluate("(api) => play(api)", url)
            assert played["frames"] >= 10 and played["location"].startswith("/v1/sessions/")
            # trickle ICE from that origin: PATCH with If-Match granted, the answer's ETag readable
            played = page.evaluate("(api) => play(api, 'all', true)", url)
            assert played["frames"] >= 10 and played["patched"] >= 1, played
        with live_server(max_sessions=2) as (url, app):
            outcome = "(api) => play(api).then(() => 'played', (e) => e.name + ': ' + e.message)"
            refused = page.evaluate(outcome, url)
            assert refused.startswith("TypeError"), refused  # the browser's "Failed to fetch"
            # a JSON POST needs the browser's preflight, which this server does not grant
            assert app.state.registry.sessions == {}
            # requests a page sends without asking (a form's POST, a no-cors fetch) reach the
            # server all the same: refused for their Origin, they make no session either
            page.evaluate("""async (api) => {
                const form = new FormData(); form.append('seed', '7');
                await fetch(api + '/v1/sessions', {method: 'POST', mode: 'no-cors', body: form});
                await fetch(api + '/v1/sessions', {method: 'POST', mode: 'no-cors'});
            }""", url)
            assert app.state.registry.sessions == {}
    finally:
        page.close()
        pages.shutdown()
        shutil.rmtree(site, ignore_errors=True)


@pytest.mark.parametrize("secret", [None, "north-wind"], ids=["static-credential", "turn-secret"])
def test_a_browser_behind_a_relay_streams_through_turn(browser_page, secret):
    """`serve --ice-servers` with a TURN server: a browser allowed no other path than the relay
    (iceTransportPolicy "relay") gets the list from the session and streams through it, with
    the static credential, or with the one the server made for its session from a secret; the
    second one trickles: its offer goes before the relay is allocated, the relay candidate in a
    PATCH after it."""
    from server_helpers import turn_server

    page = browser_page.new_page()
    try:
        with turn_server(secret) as turn, live_server(max_sessions=2, ice_servers=[turn]) as (url, _):
            page.goto(url + "/")  # the server's own origin
            page.add_script_tag(content=PLAYER_PAGE.split("<script>")[1].split("</script>")[0])
            trickle = secret is not None
            played = page.evaluate("([api, trickle]) => play(api, 'relay', trickle)", [url, trickle])
        assert played["frames"] >= 10 and played["via"] == "relay", played
        if trickle:
            assert played["offered"] == 0 and played["patched"] >= 1, played
    finally:
        page.close()


# What the page holds, counted from outside app.js: the microphones it was given and its
# AudioContexts (tests of the connection's life cycle read them).
HELD = """
window.__mics = []; window.__contexts = [];
const realGetUserMedia = navigator.mediaDevices.getUserMedia.bind(navigator.mediaDevices);
navigator.mediaDevices.getUserMedia = async (c) => { const s = await realGetUserMedia(c); __mics.push(s); return s; };
const RealAudioContext = window.AudioContext;
window.AudioContext = function (...a) { const c = new RealAudioContext(...a); __contexts.push(c); return c; };
window.held = () => ({
  mics: __mics.filter((s) => s.getAudioTracks().some((t) => t.readyState === "live")).length,
  contexts: __contexts.filter((c) => c.state !== "closed").length,
  state: window.streamgenStats.state,
  connect: !document.getElementById("connect").disabled,
  hangup: !document.getElementById("hangup").disabled,
});
"""


def held_page(context, url: str):
    page = context.new_page()
    page.add_init_script(HELD)
    page.goto(url)
    return page


def wait_for(check, timeout: float = 20.0, failed: str = "timed out"):
    import time

    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(failed)
        time.sleep(0.1)


def metric(url: str, name: str) -> float:
    import httpx

    lines = [line for line in httpx.get(f"{url}/metrics").text.splitlines() if line.startswith(name)]
    return float(lines[0].split()[-1]) if lines else 0.0


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


def test_a_webrtc_page_closed_or_left_ends_its_session_at_once(browser_page):
    """A closed tab, or a page left for another, must not hold its session (and a model slot) until
    ICE consent expires (about 30 s, aioice's checks; the waits here are 10 s): the page's pagehide
    sends the DELETE, and where that is lost, the peer connection's closing ends it on the server."""
    with live_server(max_sessions=2) as (url, app):
        sessions = app.state.registry.sessions
        closed = 'streamgen_sessions_closed_total{reason="%s"}'
        page = browser_page.new_page()
        page.goto(f"{url}/?autostart=1&avatar=ada&mic=0")
        page.wait_for_function("window.streamgenStats.framesDecoded >= 10", timeout=60_000)
        page.close(run_before_unload=True)
        wait_for(lambda: not sessions, 10, "closing the tab left its session on the server")
        assert metric(url, closed % "deleted by client") == 1

        page = browser_page.new_page()
        page.add_init_script(NO_DELETE)
        try:
            page.goto(f"{url}/?autostart=1&avatar=ada&mic=0")
            page.wait_for_function("window.streamgenStats.framesDecoded >= 10", timeout=60_000)
            page.goto("about:blank")
            wait_for(lambda: not sessions, 10, "leaving the page left its session on the server")
            assert metric(url, closed % "peer connection closed") == 1
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
            page.wait_for_timeout(5000)  # longer than the timeout: a streaming tab is not silent
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
        page = held_page(browser_page, f"{url}/?autostart=1&transport=ws")
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
            page.wait_for_timeout(1500)  # the first socket's close has long arrived
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


def test_the_microphone_follows_its_box_only_while_connected(browser_page):
    """Ticked after a WebSocket connect made without it, the microphone now reaches the avatar (it
    did nothing); ticked while idle, it is not taken (it was, and stayed on for good)."""
    with live_server(max_sessions=2) as (url, app):
        page = held_page(browser_page, f"{url}/?autostart=1&transport=ws&mic=0")
        try:
            page.wait_for_function("window.streamgenStats.framesDecoded >= 5", timeout=60_000)
            heard = 'streamgen_audio_received_seconds_total{source="client"}'
            assert metric(url, heard) == 0
            page.check("#mic")
            wait_for(lambda: metric(url, heard) > 1.0)
            page.click("#hangup")
            page.uncheck("#mic")
            page.check("#mic")
            page.wait_for_timeout(500)
            assert page.evaluate("held()")["mics"] == 0
            assert page.evaluate("window.__mics.length") == 1  # taken once, while connected
        finally:
            page.close()


def test_a_connect_clicked_before_autostart_and_an_unticked_mic_leave_no_microphone_on(browser_page):
    """Clicked before the avatar list loaded on an ?autostart=1 page, connect ran twice and the
    first call's microphone stayed on for good; unticked while connected, the box stopped the
    audio but left the capture device live (the browser's recording indicator on)."""
    with live_server(max_sessions=3) as (url, app):
        page = browser_page.new_page()
        click_at_once = "document.addEventListener('DOMContentLoaded', () => document.getElementById('connect').click());"
        page.add_init_script(HELD + click_at_once)
        page.goto(f"{url}/?autostart=1&transport=ws")
        try:
            page.wait_for_function("window.streamgenStats.framesDecoded >= 5", timeout=60_000)
            assert page.evaluate("held()")["mics"] == 1
            page.uncheck("#mic")
            page.wait_for_timeout(300)
            assert page.evaluate("held()")["mics"] == 0  # given back, not only muted
            page.check("#mic")
            wait_for(lambda: page.evaluate("held()")["mics"] == 1)  # taken again while connected
            page.click("#hangup")
            page.wait_for_timeout(500)
            assert page.evaluate("held()")["mics"] == 0
            wait_for(lambda: not app.state.registry.sessions)  # no session left behind either
        finally:
            page.close()


@pytest.mark.parametrize("refused", ["avatars", "session", "speak", "unreachable"])
def test_a_server_error_the_page_meets_is_shown_in_its_words(browser_page, refused):
    """An error answer that is not the API's JSON (a proxy's 502 page, a server restarting): from
    /v1/avatars it left an ?autostart=1 page 'idle', never connecting, the error on the console
    only; from POST /v1/sessions the page showed JSON.parse's complaint about the body; from a
    WebRTC page's speak request, nothing at all (an unhandled rejection). Each now says the status.
    A server that does not answer at all (down, restarting) was the browser's 'failed: Failed to
    fetch' (Firefox: 'NetworkError when attempting to fetch resource.'); it is said as such now."""
    gateway = {"status": 502, "content_type": "text/html", "body": "<html><h1>502 Bad Gateway</h1></html>"}
    fails = {"avatars": "**/v1/avatars", "session": "**/v1/sessions", "speak": "**/control",
             "unreachable": "**/v1/sessions"}[refused]  # fmt: skip
    with live_server(max_sessions=2) as (url, app):
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


def test_a_websocket_pages_refused_speak_is_said_beside_the_status(browser_page):
    """The server's in-band error (a speak too long for the speech queue) replaced the status:
    'error: ...' stood where 'streaming (websocket)' had been while the stream went on. And a text
    blank only to the server (separators and NEL, which Python's strip() takes away and JS's trim()
    keeps) was sent, and the server closed the stream for an empty speak (4400)."""
    with live_server(max_sessions=2) as (url, app):
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


def test_a_speak_answered_after_a_hang_up_is_not_the_next_connections(browser_page):
    """A WebRTC page's speak is answered once its speech is made (seconds). Hung up and connected
    again meanwhile, the page showed the old session's 404 ('speak: 404: ...') over the new
    connection's status. The hang-up cuts the request off now: nothing more comes of it."""
    from test_server_browser_hangup import HOLD_FETCHES, hold_fetches

    with live_server(max_sessions=2) as (url, app):
        page = held_page(browser_page, "about:blank")
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
            page.click("#hangup")
            page.click("#connect")
            page.wait_for_function("window.streamgenStats.framesDecoded >= 3", timeout=60_000)
            page.evaluate("window.holdFetches = null; window.heldFetches.splice(0).forEach((go) => go())")
            page.wait_for_timeout(1000)
            assert page.evaluate("window.streamgenStats.state") == "streaming (webrtc)"
            assert page.input_value("#speak-text") == "hello there"
            assert logs == []
        finally:
            page.close()


def test_a_sentence_typed_while_a_speak_is_answered_stays(browser_page):
    """A WebRTC page's speak is answered once its speech is made (seconds): the answer emptied the
    field, taking with it the next sentence typed meanwhile. It empties only the text it sent now;
    and Speak waits for the answer, the text being still there to be sent twice."""
    from test_server_browser_hangup import HOLD_FETCHES, hold_fetches

    with live_server(max_sessions=2) as (url, app):
        page = held_page(browser_page, "about:blank")
        page.add_init_script(HOLD_FETCHES)
        try:
            page.goto(f"{url}/?autostart=1&mic=0")
            page.wait_for_function("window.streamgenStats.framesDecoded >= 3", timeout=60_000)
            hold_fetches(page, '(url, method) => url.endsWith("/control")')
            page.fill("#speak-text", "hello there")
            page.click("#speak")
            page.wait_for_function("window.heldFetches.length === 1", timeout=10_000)
            # not to be sent twice: pressed again meanwhile, it went again (and was refused, 429)
            assert page.is_disabled("#speak")
            assert page.evaluate("document.activeElement.id") == "speak-text"  # (a disabled button drops it)
            page.fill("#speak-text", "and the next one")
            # (let go, and answered: the first speech takes a second or two)
            page.evaluate("window.holdFetches = null; Promise.all(window.heldFetches.splice(0).map((go) => go()))")
            page.wait_for_timeout(300)
            assert page.input_value("#speak-text") == "and the next one"
            assert page.is_enabled("#speak")
            page.click("#speak")  # one not typed over goes as it went
            page.wait_for_function("document.getElementById('speak-text').value === ''", timeout=10_000)
            assert page.text_content("#notice") == ""
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
