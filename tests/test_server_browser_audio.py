"""The web client's sound: autoplay policies (a click for sound), and the microphone over the
WebSocket API at the device's sample rate (Firefox refuses a 16 kHz AudioContext for it).

Chromium as in test_server_browser.py (skipped without it); the Firefox test runs Debian's
firefox-esr where it is installed (`apt-get install -y firefox-esr`; Playwright's own Firefox
build cannot be downloaded here), driven over WebDriver BiDi (tests/firefox_pages.py).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from firefox_pages import FIREFOX
from server_helpers import live_server
from test_server_browser import CHROMIUM, HELD, SPEECH_WAV, chromium_args, wait_for
from test_server_browser_hangup import wait_in_page

pytestmark = [pytest.mark.browser, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def chromium_that_waits_for_a_click(playwright):
    """Chromium with its own autoplay policy: sound (an unmuted <video>, a running AudioContext)
    only after the user has interacted with the page. (Playwright's evaluate calls count as
    such: pages here report through the console until they are clicked.) One for the file."""
    args = [a for a in chromium_args(SPEECH_WAV) if not a.startswith("--autoplay-policy")]
    browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
    try:
        yield browser
    finally:
        browser.close()


@pytest.fixture
def browser_that_waits_for_a_click(chromium_that_waits_for_a_click):
    """A context of its own per test, in the file's Chromium: what the user did in one test's pages
    (the interaction the autoplay policy counts) is not there in the next's."""
    context = chromium_that_waits_for_a_click.new_context()
    try:
        yield context
    finally:
        context.close()

WEB = Path(__file__).resolve().parent.parent / "web"

# What the page does with its sound, reported on the console every 200 ms: an evaluate() from
# the test would count as a user's gesture and let the page's sound start by itself.
REPORT = """
window.__contexts = []; window.__sounds = 0; let lag = 0;
const RealAudioContext = window.AudioContext;
window.AudioContext = function (...a) { const c = new RealAudioContext(...a); __contexts.push(c); return c; };
const realStart = AudioBufferSourceNode.prototype.start;
AudioBufferSourceNode.prototype.start = function (...a) { __sounds++; return realStart.apply(this, a); };
const realSetTimeout = window.setTimeout;  // the page draws each WebSocket frame from a timer
window.setTimeout = (f, ms, ...a) => { lag = Math.max(lag, ms || 0); return realSetTimeout(f, ms, ...a); };
setInterval(() => {
  const video = document.getElementById("video");
  console.log("report " + JSON.stringify({contexts: __contexts.filter((c) => c.state !== "closed").map((c) => c.state),
    sounds: __sounds, lagMs: Math.round(lag), frames: window.streamgenStats ? window.streamgenStats.framesDecoded : 0,
    notice: Boolean(document.getElementById("sound") && !document.getElementById("sound").hidden), muted: video.muted, state: window.streamgenStats.state}));
  lag = 0;
}, 200);
"""


def reports_of(page) -> list[dict]:
    reports: list[dict] = []
    page.on("console", lambda m: m.text.startswith("report ") and reports.append(json.loads(m.text[7:])))
    return reports


def report_until(page, reports: list[dict], check, seconds: float) -> None:
    """Waits for a report the `check` takes (the page's console is read only while Playwright waits)."""
    for _ in range(int(seconds * 5)):
        if reports and check(reports[-1]):
            return
        page.wait_for_timeout(200)
    raise AssertionError(f"no such report in {seconds} s: {reports[-1:]}")


@pytest.mark.parametrize("transport", ["ws", "webrtc"])
def test_an_autostarted_page_asks_for_a_click_and_turns_the_sound_on_with_it(browser_that_waits_for_a_click,
                                                                             transport, served):  # fmt: skip
    """A page that connects by itself (?autostart=1) gets no sound from the browser until the user
    interacts with it. Over WebRTC the video played muted, with a tooltip on the video as the only
    sign, and only a click on the video unmuted it; over the WebSocket API the AudioContext stayed
    suspended, its clock at 0, and the frames timed on it fell further behind every second (a draw
    timer 7.8 s long after 8 s of streaming, and for good once the context ran). Now the page says
    a click is needed, times the frames on its own clock meanwhile, and the first click anywhere
    turns the sound on. (No microphone: a page that captures one may start its sound at once.)"""
    with served(max_sessions=2) as (url, _):
        page = browser_that_waits_for_a_click.new_page()
        page.add_init_script(REPORT)
        reports = reports_of(page)
        try:
            page.goto(f"{url}/?autostart=1&avatar=ada&mic=0&transport={transport}")
            # until it has streamed a few seconds: 100 frames at 25 a second
            report_until(page, reports, lambda report: report["frames"] >= 100, 30)
            waiting = reports[-1]
            assert waiting["state"] == f"streaming ({'websocket' if transport == 'ws' else 'webrtc'})", waiting
            assert waiting["notice"], waiting  # "Click or press a key for sound"
            if transport == "ws":
                assert waiting["contexts"] == ["suspended"] and waiting["sounds"] == 0, waiting
                # frames drawn on time: timers no longer than a chunk and the playout buffer
                assert max(r["lagMs"] for r in reports[-5:]) < 2000, reports[-5:]
            else:
                assert waiting["muted"], waiting
            page.mouse.click(300, 300)  # on the stage; anywhere on the page will do
            page.wait_for_function("document.getElementById('sound').hidden", timeout=10_000)
            # (evaluate is harmless from here on)
            if transport == "ws":
                page.wait_for_function("__contexts.some((c) => c.state === 'running') && __sounds > 0", timeout=10_000)
            else:
                assert page.evaluate("document.getElementById('video').muted") is False
            frames = page.evaluate("window.streamgenStats.framesDecoded")
            page.wait_for_function(f"window.streamgenStats.framesDecoded >= {frames + 25}", timeout=20_000)
        finally:
            page.close()


def test_a_key_pressed_turns_the_sound_on_as_the_note_says(browser_that_waits_for_a_click, served):
    """The note said "Click anywhere for sound", where a key pressed turns it on too; and Escape,
    which the browser does not count as the user's interaction, took the note away and left the
    sound off. The note says a key will do, and Escape leaves it waiting."""
    with served(max_sessions=1) as (url, _):
        page = browser_that_waits_for_a_click.new_page()
        page.add_init_script(REPORT)
        reports = reports_of(page)
        try:
            page.goto(f"{url}/?autostart=1&mic=0&transport=ws")
            report_until(page, reports, lambda r: r["notice"] and r["frames"] >= 5, 60)
            assert reports[-1]["notice"] and reports[-1]["contexts"] == ["suspended"], reports[-1]
            page.keyboard.press("Escape")
            seen = len(reports)
            report_until(page, reports, lambda r: len(reports) >= seen + 2, 10)  # (one every 200 ms)
            assert reports[-1]["notice"] and reports[-1]["contexts"] == ["suspended"], reports[-1]
            page.keyboard.press("a")
            report_until(page, reports, lambda r: not r["notice"] and r["contexts"] == ["running"], 10)
            assert page.text_content("#sound") == "Click or press a key for sound"
        finally:
            page.close()


def test_the_microphone_resampler_keeps_speech_and_stops_aliases(browser_page):
    """web/resample.js, which takes the microphone from the device's rate (48 or 44.1 kHz) to the
    16 kHz the WebSocket API takes, in the browser: a 1 kHz tone comes through at its level, a
    10 kHz one (above 16 kHz's Nyquist frequency) does not fold back into the speech band, and
    the blocks a ScriptProcessor hands it give what the whole signal gives."""
    page = browser_page.new_page()
    try:
        page.set_content("<!doctype html><title>resample</title>")
        source = (WEB / "resample.js").read_text().replace("export ", "")
        page.add_script_tag(content=source + "\nwindow.Resampler = Resampler;")
        result = page.evaluate("""([from]) => {
          const tone = (hz, n) => Float32Array.from({length: n}, (_, i) => 0.5 * Math.sin(2 * Math.PI * hz * i / from));
          const blocks = (x, size) => {
            const r = new Resampler(from, 16000), out = [];
            for (let i = 0; i < x.length; i += size) out.push(...r.push(x.subarray(i, i + size)));
            return out;
          };
          const n = from;  // one second
          const speech = blocks(tone(1000, n), 1024);
          const whole = Array.from(new Resampler(from, 16000).push(tone(1000, n)));
          let error = 0, alias = 0, same = 0;
          for (let k = 20; k < speech.length - 20; k++)
            error = Math.max(error, Math.abs(speech[k] - 0.5 * Math.sin(2 * Math.PI * 1000 * k / 16000)));
          const high = blocks(tone(10000, n), 1024);
          for (let k = 20; k < high.length - 20; k++) alias = Math.max(alias, Math.abs(high[k]));
          for (let k = 0; k < whole.length; k++) same = Math.max(same, Math.abs(whole[k] - speech[k]));
          return {length: speech.length, wholeLength: whole.length, error, alias, same};
        }""", [48000])  # fmt: skip
        print("resampler:", result)  # measured: error 0.0002 (of 0.5), alias 0.0008
        assert abs(result["length"] - 16000) < 40 and result["length"] == result["wholeLength"], result
        assert result["error"] < 0.01 and result["alias"] < 0.01 and result["same"] < 1e-6, result
        at_44k = page.evaluate("() => new Resampler(44100, 16000).push(new Float32Array(44100)).length")
        assert abs(at_44k - 16000) < 40
    finally:
        page.close()


def metric(url: str, name: str) -> float:
    import httpx

    lines = [line for line in httpx.get(f"{url}/metrics").text.splitlines() if line.startswith(name)]
    return sum(float(line.split()[-1]) for line in lines)


@pytest.mark.skipif(FIREFOX is None, reason="firefox not installed (apt-get install -y firefox-esr)")
@pytest.mark.parametrize("transport", ["ws", "webrtc"])
def test_the_page_streams_in_firefox_with_its_microphone(transport, firefox):
    """Firefox: the WebSocket fallback made a 16 kHz AudioContext and connected the microphone to
    it, which Firefox refuses ("Connecting AudioNodes from AudioContexts with different sample-rate
    is currently not supported"): the page failed and hung up at once. It now takes the device's
    rate and resamples itself. (WebRTC, which never used the AudioContext, checks the harness.
    Firefox without an audio device, as here, neither runs an AudioContext nor reliably feeds its
    fake microphone, so the microphone's samples are checked in Chromium only.) The page streams over
    the transport asked for: Firefox without its loopback preference (firefox_pages.FIREFOX_PREFS)
    never connected WebRTC here, and the page fell back to the WebSocket unseen."""
    streaming = {"ws": "streaming (websocket)", "webrtc": "streaming (webrtc)"}[transport]
    # (a server of its own: the tab closed at the end may leave its WebRTC session to the peer timeout)
    with live_server(max_sessions=2) as (url, _):
        page = firefox.new_page()
        try:
            page.add_init_script(HELD)
            page.goto(f"{url}/?autostart=1&transport={transport}")
            page.wait_for_function("window.streamgenStats.framesDecoded >= 5", timeout=60_000)
            assert page.evaluate("window.streamgenStats.state") == streaming
            assert page.evaluate("held()")["mics"] == 1
            # nothing is to happen: the old page hung up as soon as it took the microphone (at once); 3 s of
            # streaming (75 frames) outlast that many times
            page.wait_for_timeout(3000)
            assert metric(url, "streamgen_sessions_closed_total") == 0, "the page hung up"
            assert page.evaluate("window.streamgenStats.state") == streaming
            page.click("#hangup")
        finally:
            page.close()


# Which node the page's microphone goes through, counted from outside app.js; and, for the
# fallback, a context without audioWorklet (as on a page of http://<LAN IP>, not a secure context).
MIC_PATH = """
window.__micNodes = []; window.__contexts = [];
const RealAudioContext = window.AudioContext;
window.AudioContext = function (...a) { const c = new RealAudioContext(...a); __contexts.push(c); return c; };
const realCreateScriptProcessor = BaseAudioContext.prototype.createScriptProcessor;
BaseAudioContext.prototype.createScriptProcessor = function (...a) {
  __micNodes.push("script-processor"); return realCreateScriptProcessor.apply(this, a);
};
const RealAudioWorkletNode = window.AudioWorkletNode;
window.AudioWorkletNode = function (...a) {
  __micNodes.push("worklet"); return new RealAudioWorkletNode(...a);
};
"""
NO_AUDIO_WORKLET = "delete BaseAudioContext.prototype.audioWorklet;"
# a worklet module that does not load (Playwright's routes do not see a worklet's requests)
UNLOADABLE = "AudioWorklet.prototype.addModule = () => Promise.reject(new DOMException('no', 'AbortError'));"
FORCED = {"secure": "", "insecure": NO_AUDIO_WORKLET, "worklet-unloadable": UNLOADABLE}


@pytest.mark.parametrize("context", ["secure", "insecure", "worklet-unloadable"])
def test_the_microphone_reaches_the_websocket_through_an_audio_worklet(browser_page, context, served):
    """The WebSocket fallback's microphone went through a ScriptProcessorNode, deprecated (Chromium
    warns on the console) and run on the page's main thread. It goes through an AudioWorklet now,
    and through the ScriptProcessorNode only where the context has no audioWorklet (an insecure
    context) or the worklet's module does not load, both at 16 kHz: the server hears one second of
    microphone per second of the page's audio clock (a wrong rate would be 3 s, or 1/3). The rate
    per second of wall time is printed."""
    heard = 'streamgen_audio_received_seconds_total{source="client"}'
    with served(max_sessions=2) as (url, _):
        before = metric(url, heard)  # (counted from the file's earlier tests on)
        page = browser_page.new_page()
        page.add_init_script(MIC_PATH + FORCED[context])
        path = "worklet" if context == "secure" else "script-processor"
        logs: list[str] = []
        page.on("console", lambda m: logs.append(f"{m.type}: {m.text}"))
        try:
            page.goto(f"{url}/?autostart=1&transport=ws")
            page.wait_for_function("window.streamgenStats.framesDecoded >= 5", timeout=60_000)
            wait_for(lambda: metric(url, heard) > before + 0.5, 20, "no microphone audio reached the server")
            assert page.evaluate("window.__micNodes") == [path], logs
            clock = "__contexts.find((c) => c.state === 'running').currentTime"
            received, audio_clock, wall_clock = metric(url, heard), page.evaluate(clock), time.monotonic()
            # a window to measure in, not a wait for an event: 2 s of the page's audio clock hold 31 to
            # 250 of the microphone's blocks (64 or 8 ms), and a wrong rate is 3 or 1/3, far outside
            page.wait_for_timeout(2000)
            received = metric(url, heard) - received
            per_audio_s = received / (page.evaluate(clock) - audio_clock)
            per_wall_s = received / (time.monotonic() - wall_clock)
            print(f"microphone via {path}: {per_audio_s:.3f} s received per s of audio clock,",
                  f"{per_wall_s:.3f} per s of wall time")  # fmt: skip
            assert 0.5 < per_audio_s < 1.5, per_audio_s
            deprecated = [line for line in logs if "ScriptProcessorNode" in line]
            if path == "worklet":  # (the fallback's warning: "The ScriptProcessorNode is deprecated. ...")
                assert not deprecated, deprecated
            # unticked and ticked again while connected: a new microphone through a new node (the
            # worklet's module loaded into the same context a second time)
            page.uncheck("#mic")
            page.check("#mic")
            page.wait_for_function("window.__micNodes.length === 2", timeout=10_000)
            assert page.evaluate("window.__micNodes") == [path, path]
            received = metric(url, heard)
            wait_for(lambda: metric(url, heard) > received + 0.5, 20, "the ticked microphone was not heard again")
        finally:
            page.close()


def test_each_websocket_connection_numbers_its_microphone_messages_from_zero(browser_page, served):
    """The API numbers each direction's messages of a type per connection (docs/api.md); the page's
    microphone messages went on from the previous connection's count after a hang-up."""
    sockets: list[list[int]] = []

    def watch(socket):
        seqs: list[int] = []
        sockets.append(seqs)
        socket.on("framesent", lambda data: isinstance(data, bytes) and data[0] == 1 and seqs.append(
            int.from_bytes(data[4:8], "little")))  # fmt: skip

    heard = 'streamgen_audio_received_seconds_total{source="client"}'
    with served(max_sessions=2) as (url, _):
        before = metric(url, heard)  # (counted from the file's earlier tests on)
        page = browser_page.new_page()
        page.on("websocket", watch)
        try:
            page.goto(f"{url}/?autostart=1&transport=ws")
            wait_for(lambda: metric(url, heard) > before + 0.5, 30, "no microphone audio reached the server")
            page.click("#hangup")
            page.click("#connect")
            # (waited in the page's calls: Playwright delivers the frames' events only inside them)
            second_heard = lambda: len(sockets) == 2 and len(sockets[1]) >= 5  # noqa: E731
            wait_in_page(page, second_heard, 30, "the second connection sent no 5 microphone messages")
        finally:
            page.close()
    assert len(sockets) == 2, sockets
    first, second = sockets
    assert first[:3] == [0, 1, 2] and second[:3] == [0, 1, 2], (first[:3], second[:3])
