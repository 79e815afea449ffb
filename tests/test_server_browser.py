"""The web client streaming in real headless Chromium (Debian's chromium + Playwright), fake mic from a
WAV file: over WebRTC and the WebSocket fallback, with a server token, from a page of another origin
over WHEP, through a TURN relay. Its helpers (the browser, what a page holds) serve every browser test.

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
def chromium(p, args: list[str], back_forward_cache: bool = False):
    """A Chromium profile launched with `args`; `back_forward_cache`: with the cache of pages left
    (a page gone back to is the one left, as it was, not loaded again), which Playwright turns off."""
    profile = tempfile.mkdtemp(prefix="streamgen-chromium-")
    ignored = ["--disable-back-forward-cache"] if back_forward_cache else None
    try:
        context = p.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True, args=args,
                                                       ignore_default_args=ignored)  # fmt: skip
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
        # the frame rate measured over the frames decoded (a stats read: every 0.5 s over WebRTC, 1 s
        # over the WebSocket)
        page.wait_for_function("window.streamgenStats.fps > 0", timeout=20_000)
        stats = page.evaluate("window.streamgenStats")
        page.click("#hangup")  # (its DELETE is a keepalive request: it outlives the page's close)
        page.wait_for_function("window.streamgenStats.state === 'idle'", timeout=10_000)
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

        mic = 'streamgen_audio_received_seconds_total{source="mic"}'
        wait_for(lambda: metric(url, mic) > 1.0, 20, f"the microphone was not heard: {httpx.get(f'{url}/metrics').text}")
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
