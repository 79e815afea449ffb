"""A WHEP trickle PATCH that races its session (server/routes.py's whep_trickle): one that comes
while the offer's answer is being made, and one that the session's end overtakes."""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest
from server_helpers import live_server
from test_server_trickle import remote_candidates, trickling_player

pytestmark = pytest.mark.timeout(120)
FRAGMENT_TYPE = "application/trickle-ice-sdpfrag"


def sent_addresses(fragment: str) -> set[tuple[str, int]]:
    return {(line.split()[4], int(line.split()[5])) for line in fragment.splitlines() if line.startswith("a=candidate:")}


async def test_a_patch_before_the_answer_is_made_is_a_409_and_its_candidates_count_after_it(monkeypatch):
    """The session's resource is known before its offer (POST /v1/sessions), and `If-Match: *`
    matches any ICE session: a PATCH while the server made the answer was a 204 whose candidates
    aiortc dropped (no media sections yet), counted as added, so the same PATCH sent with the
    answer's ETag added none of them, and its end-of-candidates refused it."""
    import server.webrtc as webrtc

    answering, go_on = threading.Event(), threading.Event()
    set_remote = webrtc.RTCPeerConnection.setRemoteDescription

    async def held_set_remote(pc, description):  # (the server's: the player's own comes after)
        answering.set()
        for _ in range(400):  # bounded: 20 s
            if go_on.is_set():
                break
            await asyncio.sleep(0.05)
        return await set_remote(pc, description)

    with live_server(max_sessions=2) as (url, app):
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            created = (await http.post("/v1/sessions", json={})).json()
            auth = {"Authorization": f"Bearer {created['token']}"}
            pc, offer, fragment = await trickling_player()
            monkeypatch.setattr(webrtc.RTCPeerConnection, "setRemoteDescription", held_set_remote)
            try:
                offered = asyncio.ensure_future(
                    http.post(created["whep"], content=offer, headers={"content-type": "application/sdp", **auth})
                )
                for _ in range(400):  # bounded: 20 s for the server to begin the answer
                    if answering.is_set():
                        break
                    await asyncio.sleep(0.05)
                assert answering.is_set()
                early = await http.patch(created["resource"], content=fragment,
                                         headers={"content-type": FRAGMENT_TYPE, "if-match": "*", **auth})  # fmt: skip
                go_on.set()
                answer = await offered
                monkeypatch.undo()
                assert answer.status_code == 201, answer.text
                assert early.status_code == 409 and early.json()["error"] == "conflict", early.text
                assert "answer" in early.json()["message"], early.text
                patch = await http.patch(created["resource"], content=fragment,
                                         headers={"content-type": FRAGMENT_TYPE, "if-match": answer.headers["etag"],
                                                  **auth})  # fmt: skip
                assert patch.status_code == 204, patch.text
                session = app.state.registry.get(created["id"])
                assert {(c.ip, c.port) for c in remote_candidates(session)} == sent_addresses(fragment)
            finally:
                go_on.set()
                await pc.close()
                await http.delete(created["resource"], headers=auth)


async def test_a_patch_whose_session_ends_as_its_body_comes_is_a_404(monkeypatch):
    """A PATCH past its session's lookup, its fragment still coming (or its mDNS names resolving),
    when the session ended (a DELETE, the peer gone): the closed ICE agent ignored its candidates,
    and it was a 204 for a session that was no more. It says the session ended, as its GET would."""
    import server.routes as routes

    with live_server(max_sessions=2) as (url, app):
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            created = (await http.post("/v1/sessions", json={})).json()
            auth = {"Authorization": f"Bearer {created['token']}"}
            pc, offer, fragment = await trickling_player()
            try:
                answer = await http.post(created["whep"], content=offer,
                                         headers={"content-type": "application/sdp", **auth})  # fmt: skip
                assert answer.status_code == 201, answer.text
                registry, read_body = app.state.registry, routes.read_body
                session = registry.get(created["id"])

                async def body_then_the_end(request, limit):
                    body = await read_body(request, limit)
                    await registry.close(session, "deleted by client")  # (as a DELETE meanwhile)
                    return body

                monkeypatch.setattr(routes, "read_body", body_then_the_end)
                patch = await http.patch(created["resource"], content=fragment,
                                         headers={"content-type": FRAGMENT_TYPE, "if-match": answer.headers["etag"],
                                                  **auth})  # fmt: skip
                assert patch.status_code == 404, patch.text
                assert patch.json() == {"error": "not_found", "message": "session ended: deleted by client"}
            finally:
                await pc.close()
