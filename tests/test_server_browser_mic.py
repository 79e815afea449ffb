"""The web page's microphone in real headless Chromium (as test_server_browser.py; skipped without
it): one the browser refuses."""

from __future__ import annotations

import pytest
from server_helpers import live_server
from test_server_browser import HELD, wait_for

pytestmark = [pytest.mark.browser, pytest.mark.timeout(180)]

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


def page_with(context, url: str, script: str):
    page = context.new_page()
    page.add_init_script(script + HELD)  # (HELD after: it counts the microphones the browser gives)
    page.goto(url)
    return page


@pytest.mark.parametrize("transport", ["webrtc", "ws"])
def test_a_microphone_the_browser_refuses_is_said_beside_its_box(browser_page, transport):
    """Refused, the microphone left the page streaming with its box ticked, the reason on the console
    only: the user talked to an avatar that heard nothing. The page says why beside the box and
    unticks it; ticked again while connected, the box asks again."""
    with live_server(max_sessions=2) as (url, app):
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


def test_a_page_the_browser_gives_no_microphone_at_all_says_why(browser_page):
    with live_server(max_sessions=2) as (url, app):
        page = page_with(browser_page, f"{url}/?autostart=1", INSECURE)
        try:
            page.wait_for_function("window.streamgenStats.framesDecoded >= 3", timeout=60_000)
            note = "no microphone: the browser gives a page the microphone only over HTTPS or on localhost"
            assert not page.is_checked("#mic")
            assert page.text_content("#mic-note") == note
        finally:
            page.close()
