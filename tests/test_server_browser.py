"""The web client in real headless Chromium (Debian's chromium + Playwright), fake mic from a WAV file.

Needs /usr/bin/chromium (`apt-get install -y chromium`, see scripts/ci_browser.sh); skipped
with a message where it is missing. Numbers are read from getStats() and reported, never
compared with wall-clock targets.
"""

from __future__ import annotations

import os
import shutil
import tempfile
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


@pytest.fixture(scope="module")
def browser_page():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"chromium not found at {CHROMIUM}: run scripts/ci_browser.sh (apt-get install -y chromium)")
    playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    profile = tempfile.mkdtemp(prefix="streamgen-chromium-")
    try:
        with playwright_api.sync_playwright() as p:
            context = p.chromium.launch_persistent_context(
                profile, executable_path=CHROMIUM, headless=True, args=chromium_args(SPEECH_WAV)
            )
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


def test_browser_websocket_fallback(browser_page):
    with live_server(max_sessions=2) as (url, _):
        stats = run_page(browser_page, f"{url}/?autostart=1&transport=ws", frames=25)
        print("browser WebSocket stats:", stats)
        assert stats["transport"] == "websocket" and stats["framesDecoded"] >= 25
