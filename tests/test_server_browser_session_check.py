"""The WebRTC page's session check (web/webrtc.js checkSessionAlive) in real headless Chromium (as
test_server_browser.py; skipped without it)."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.timeout(180)]


def test_a_session_check_of_a_connection_cut_off_already_asks_nothing(browser_page, served):
    """The check has its own signal, cut off as the connection's fires: one begun after that had
    fired sent its GET all the same (up to its 5 s limit), and a 404 for the session its connection's
    end DELETEd said 'ended: the server ended the session'. It asks nothing, as it did while the
    connection's signal was the fetch's own."""
    with served() as (url, app):
        page = browser_page.new_page()
        asked = []

        def gone(route):
            asked.append(route.request.url)
            route.fulfill(status=404, json={"message": "session ended: deleted by client"})

        page.route("**/v1/sessions/cut-off", gone)
        try:
            page.goto(f"{url}/")
            checked = page.evaluate(
                "async () => { const webrtc = await import('./webrtc.js'); const { state } = await import('./page.js');"
                " const connection = new AbortController(); connection.abort(); const said = [];"
                " const s = { resource: '/v1/sessions/cut-off', token: 'a token' };"
                " const answered = await webrtc.checkSessionAlive(s, connection.signal, state.generation,"
                " (why) => said.push(why), true);"
                " return { answered, said }; }"
            )
            assert (checked, asked) == ({"answered": True, "said": []}, [])
        finally:
            page.close()
