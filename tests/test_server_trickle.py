"""WHEP trickle ICE: a player's candidates PATCHed after its offer (server/trickle.py)."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription
from server_helpers import client_peer, created_session, first_track, live_server, post_sdp

from server.trickle import FragmentError, parse_fragment

pytestmark = pytest.mark.timeout(120)

FRAGMENT = """a=ice-options:trickle
a=group:BUNDLE 0 1
a=ice-ufrag:EsAw
a=ice-pwd:P2uYro0UCOQ4zxjKXaWCBui1
m=video 9 UDP/TLS/RTP/SAVPF 0
a=mid:0
a=candidate:1387637174 1 udp 2122260223 192.0.2.1 61764 typ host generation 0
a=candidate:3471623853 1 udp 2122194687 198.51.100.2 61765 typ srflx raddr 10.0.0.2 rport 61765
m=audio 9 UDP/TLS/RTP/SAVPF 0
a=mid:1
a=candidate:2 1 udp 2122260223 192.0.2.1 61766 typ host
a=end-of-candidates
"""


def test_a_fragment_gives_its_credentials_and_each_candidate_under_its_mid():
    frag = parse_fragment(FRAGMENT)
    assert (frag.ufrag, frag.pwd, frag.end) == ("EsAw", "P2uYro0UCOQ4zxjKXaWCBui1", True)
    assert [(mid, value.split()[4]) for mid, value in frag.candidates] == [
        ("0", "192.0.2.1"),
        ("0", "198.51.100.2"),
        ("1", "192.0.2.1"),
    ]
    assert parse_fragment("a=end-of-candidates\r\n").end and not parse_fragment("").candidates
    # what browsers and players send: IPv4, IPv6, a browser's mDNS name, TCP, a relay
    for candidate in ("1 1 udp 2122260223 192.0.2.1 54321 typ host",
                      "2 1 UDP 2122262783 2001:db8::1 54322 typ host",
                      "3 1 udp 2122260223 4f1c7a52-1d3b-4c0e-9a86-0f3d1e2b6c7d.local 54323 typ host",
                      "4 1 tcp 1518280447 192.0.2.1 9 typ host tcptype active",
                      "5 1 udp 41885439 203.0.113.7 3478 typ relay raddr 192.0.2.1 rport 54321"):  # fmt: skip
        assert parse_fragment(f"a=candidate:{candidate}").candidates == [(None, candidate)]


@pytest.mark.parametrize(
    "text, says",
    [
        ("a=candidate:garbage", "line 1: not an ICE candidate"),
        ("a=mid:0\na=candidate:1 1 udp x 192.0.2.1 1 typ host", "line 2: not an ICE candidate"),
        ("hello", "line 1: not an SDP line"),
        ("a=ice-ufrag:a\na=ice-ufrag:b", "two different a=ice-ufrag in one fragment"),
        ("a=mid:0\na=ice-pwd:a\na=ice-pwd:b", "two different a=ice-pwd in one media section"),
        ("m=audio 9 RTP/AVP 0\na=ice-ufrag:a\nm=video 9 RTP/AVP 0\na=mid:1", "media section without a=mid:"),
        ("m=audio 9 RTP/AVP 0\na=ice-ufrag:a", "media section without a=mid:"),
        # candidates aiortc reads but no ICE agent can use: they got a 204 and counted against the
        # session's 64, and the agent dropped them with a line at INFO or ran checks to port 99999
        (
            "a=candidate:1 1 udp 1 999.1.1.1 5000 typ host",
            "999.1.1.1 is neither an IP address nor an mDNS name",
        ),
        (
            "a=candidate:1 1 udp 1 localhost 5000 typ host",
            "localhost is neither an IP address nor an mDNS name",
        ),
        ("a=candidate:1 1 udp 1 zz::zz::zz 5000 typ host", "neither an IP address"),
        ("a=candidate:1 1 udp 1 192.0.2.1 99999 typ host", "port 99999 is not in 1-65535"),
        ("a=candidate:1 1 udp 1 192.0.2.1 -5 typ host", "port -5 is not in 1-65535"),
        ("a=candidate:1 1 udp 1 192.0.2.1 5000 typ foo", "type 'foo' is not host, srflx, prflx or relay"),
        ("a=candidate:1 1 sctp 1 192.0.2.1 5000 typ host", "transport 'sctp' is not udp or tcp"),
        ("a=candidate:1 0 udp 1 192.0.2.1 5000 typ host", "component 0 is not in 1-256"),
    ],
)
def test_a_fragment_that_cannot_be_read_says_which_line(text, says):
    with pytest.raises(FragmentError, match=says):
        parse_fragment(text)


def split_candidates(sdp: str) -> tuple[str, str]:
    """An offer without its candidates (as a player sends it before gathering is done), and the
    fragment that trickles them: the credentials, the first media section's candidates, the end."""
    lines = sdp.splitlines()
    offer = [line for line in lines if not line.startswith(("a=candidate:", "a=end-of-candidates"))]
    section = sdp.split("\nm=")[1].splitlines()  # the first media section's lines
    fragment = [line for line in lines if line.startswith(("a=ice-ufrag:", "a=ice-pwd:"))][:2]
    fragment += ["m=video 9 UDP/TLS/RTP/SAVPF 0", "a=mid:0"]
    fragment += [line for line in section if line.startswith("a=candidate:")] + ["a=end-of-candidates"]
    return "\r\n".join(offer) + "\r\n", "\r\n".join(fragment) + "\r\n"


async def trickling_player() -> tuple[RTCPeerConnection, str, str]:
    """An aiortc peer that receives video: its offer without candidates, and their fragment."""
    pc = client_peer("video")
    await pc.setLocalDescription(await pc.createOffer())
    return pc, *split_candidates(pc.localDescription.sdp)


def remote_candidates(session) -> list:
    """What the server's ICE agent knows of the player's addresses (the bundle's transport)."""
    return session.trickle.pc.getTransceivers()[0].receiver.transport.transport.getRemoteCandidates()


async def test_a_player_that_trickles_its_candidates_streams():
    """The offer goes without candidates; the PATCH brings them to the server's ICE agent (its
    remote candidates are the ones trickled) and the session streams."""
    with live_server(max_sessions=2) as (url, app):
        async with httpx.AsyncClient(base_url=url, timeout=20) as http:
            created, auth = await created_session(http, avatar="ada")
            pc, offer, fragment = await trickling_player()
            video = first_track(pc)
            assert "a=candidate" not in offer and "a=candidate" in fragment
            try:
                r = await post_sdp(http, created, auth, offer)
                assert r.status_code == 201, r.text
                etag = r.headers["etag"]
                session = app.state.registry.get(created["id"])
                assert remote_candidates(session) == []
                patch = await http.patch(created["resource"], content=fragment,
                                         headers={"content-type": "application/trickle-ice-sdpfrag",
                                                  "if-match": etag, **auth})  # fmt: skip
                assert patch.status_code == 204, patch.text
                trickled = {(c.ip, c.port) for c in remote_candidates(session)}
                sent = {
                    (line.split()[4], int(line.split()[5]))
                    for line in fragment.splitlines()
                    if line.startswith("a=candidate:")
                }
                assert trickled == sent
                await pc.setRemoteDescription(RTCSessionDescription(sdp=r.text, type="answer"))
                track = await asyncio.wait_for(video, 20)
                frames = [await asyncio.wait_for(track.recv(), 20) for _ in range(5)]
                assert all(f.width == created["width"] for f in frames)
            finally:
                await pc.close()


async def test_a_patch_the_server_cannot_take_gets_its_reason():
    """415 / 428 / 412 / 400 / 422 / 409 / 401, each with a message, and the session goes on."""
    with live_server(max_sessions=3) as (url, app):
        async with httpx.AsyncClient(base_url=url, timeout=20) as http:
            created, auth = await created_session(http, avatar="ada")
            pc, offer, fragment = await trickling_player()
            try:
                r = await post_sdp(http, created, auth, offer)
                etag = r.headers["etag"]
                kind = {"content-type": "application/trickle-ice-sdpfrag"}

                async def patch(body=fragment, **headers):
                    return await http.patch(created["resource"], content=body, headers=headers)

                restart = fragment.replace("a=ice-ufrag:", "a=ice-ufrag:new")
                # a new password alone is a restart too (RFC 8839, ICE restarts)
                new_password = fragment.replace("a=ice-pwd:", "a=ice-pwd:new")
                for response, status, says in [
                    (await patch(**auth, **kind), 428, "If-Match"),
                    (await patch(**auth, **kind, **{"if-match": '"other"'}), 412, "another ICE session"),
                    (
                        await patch(**auth, **{"content-type": "application/sdp", "if-match": etag}),
                        415,
                        "trickle-ice",
                    ),
                    (
                        await patch("a=candidate:x", **auth, **kind, **{"if-match": etag}),
                        400,
                        "not an ICE candidate",
                    ),
                    (await patch(restart, **auth, **kind, **{"if-match": etag}), 422, "start a new session"),
                    (await patch(new_password, **auth, **kind, **{"if-match": etag}), 422, "new session"),
                    (await patch(**kind, **{"if-match": etag}), 401, "token"),
                ]:
                    assert response.status_code == status and says in response.json()["message"], (
                        response.text
                    )
                session = app.state.registry.get(created["id"])
                assert remote_candidates(session) == []  # none of those added anything
                assert (await patch(**auth, **kind, **{"if-match": "*"})).status_code == 204
                assert remote_candidates(session)

                other = (await http.post("/v1/sessions", json={"avatar": "ada"})).json()  # no WHEP offer yet
                r = await http.patch(other["resource"], content=fragment,
                                     headers={**kind, "if-match": "*", "authorization": f"Bearer {other['token']}"})  # fmt: skip
                assert r.status_code == 409 and "no WHEP peer connection" in r.json()["message"]
            finally:
                await pc.close()


async def test_a_player_of_the_one_url_trickles_to_the_location_it_was_given():
    """`POST /v1/whep`: the answer's Location carries the session token, so a player that knows
    only that URL PATCHes its candidates there, with the ETag, and no header of its own."""
    with live_server(max_sessions=2) as (url, app):
        async with httpx.AsyncClient(base_url=url, timeout=20) as http:
            pc, offer, fragment = await trickling_player()
            try:
                r = await http.post(
                    "/v1/whep?avatar=ada", content=offer, headers={"content-type": "application/sdp"}
                )
                assert r.status_code == 201 and "?token=" in r.headers["location"], r.text
                headers = {"content-type": "application/trickle-ice-sdpfrag", "if-match": r.headers["etag"]}
                patch = await http.patch(r.headers["location"], content=fragment, headers=headers)
                assert patch.status_code == 204, patch.text
                (session,) = app.state.registry.sessions.values()
                assert remote_candidates(session)
            finally:
                await pc.close()


async def test_a_session_takes_a_bounded_number_of_candidates():
    """Each candidate is an address the server sends checks to: past MAX_CANDIDATES, offer and
    fragments together, an offer is refused (400) and a fragment adds none of its own."""
    from server.trickle import MAX_CANDIDATES

    many = [
        f"a=candidate:{i} 1 udp 2122260223 192.0.2.{1 + i // 200} {10000 + i} typ host" for i in range(65)
    ]
    assert len(many) > MAX_CANDIDATES
    with live_server(max_sessions=2) as (url, app):
        async with httpx.AsyncClient(base_url=url, timeout=20) as http:
            created, headers = await created_session(http, avatar="ada")
            pc, offer, fragment = await trickling_player()
            try:
                crowded = offer.replace("a=mid:0\r\n", "a=mid:0\r\n" + "\r\n".join(many) + "\r\n")
                r = await post_sdp(http, created, headers, crowded)
                assert r.status_code == 400 and "65 ICE candidates" in r.json()["message"], r.text
                r = await post_sdp(http, created, headers, offer)
                assert r.status_code == 201, r.text
                headers |= {"content-type": "application/trickle-ice-sdpfrag", "if-match": r.headers["etag"]}
                crowded = fragment.replace("a=end-of-candidates", "\r\n".join(many))
                r = await http.patch(created["resource"], content=crowded, headers=headers)
                assert r.status_code == 400 and f"at most {MAX_CANDIDATES}" in r.json()["message"], r.text
                # a fragment read whole and refused is not said to be malformed (the player would look
                # for a syntax error in it)
                assert r.json()["message"].startswith("SDP fragment refused: a session takes"), r.text
                assert remote_candidates(app.state.registry.get(created["id"])) == []
                assert (
                    await http.patch(created["resource"], content=fragment, headers=headers)
                ).status_code == 204
            finally:
                await pc.close()


class SlowResolvingPeer:
    """Stands in for a peer connection whose ICE agent takes a while per candidate, as it does
    resolving a browser's mDNS names: records how many additions run at once, and the order."""

    localDescription = "its answer"  # (answered: TrickleIce takes no candidates before)

    def __init__(self):
        self.in_flight = self.most_in_flight = 0
        self.added = []

    async def addIceCandidate(self, candidate):
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        for _ in range(3):  # the resolution's round trips
            await asyncio.sleep(0)
        self.in_flight -= 1
        self.added.append(None if candidate is None else (candidate.sdpMid, candidate.ip))


async def test_a_fragments_candidates_are_resolved_together_then_ended():
    """Names that do not resolve cost a second each in aioice: one after another, a fragment of
    Chrome's `.local` host candidates held its PATCH that many seconds."""
    from server.trickle import TrickleIce

    names = [f"a=candidate:{i} 1 udp 2122260223 {i:08x}-feed-4bad-8c1e-0123456789ab.local {50000 + i} typ host"
             for i in range(5)]  # fmt: skip
    peer = SlowResolvingPeer()
    trickle = TrickleIce(peer, FRAGMENT)
    fragment = FRAGMENT.replace("a=end-of-candidates", "\n".join(names) + "\na=end-of-candidates")
    assert await trickle.add(parse_fragment(fragment)) == 3 + 5
    assert peer.most_in_flight == 8
    assert peer.added[-1] is None  # end-of-candidates after every candidate was added
    assert sorted(peer.added[:-1]) == sorted([("0", "192.0.2.1"), ("0", "198.51.100.2"), ("0", "192.0.2.1")]
                                             + [("0", n.split()[4]) for n in names])  # fmt: skip


async def test_a_fragment_sent_again_adds_and_counts_its_candidates_once():
    """A player that sends a PATCH again (its answer lost, a retry) added each candidate again, and
    each counted again against MAX_CANDIDATES: 64 retries of one candidate filled the session."""
    from server.trickle import MAX_CANDIDATES, TrickleIce

    peer = SlowResolvingPeer()
    trickle = TrickleIce(peer, FRAGMENT)  # the offer: 3 candidates
    one = "a=mid:0\na=candidate:9 1 udp 2122260223 192.0.2.9 50009 typ host\n"
    assert await trickle.add(parse_fragment(one)) == 1
    for _ in range(MAX_CANDIDATES):
        assert await trickle.add(parse_fragment(one)) == 0
    # the same address with another foundation and priority, twice in one fragment, and under the
    # bundled section 1 (its transport is section 0's): still the one address
    again = one.replace("9 1 udp 2122260223", "17 1 UDP 1686052607") + "a=mid:1\n" + one.split("\n")[1] + "\n"
    assert await trickle.add(parse_fragment(again)) == 0
    assert trickle.candidates == 4 and peer.added == [("0", "192.0.2.9")]
    other_port = one.replace("50009", "50010")
    assert await trickle.add(parse_fragment(other_port)) == 1 and trickle.candidates == 5


async def test_candidates_the_ice_agent_would_drop_unsaid_are_refused():
    """After a=end-of-candidates, or under a mid the offer does not have, aiortc drops a candidate
    without a word: the PATCH was a 204, and the candidate counted against the session's limit."""
    from server.trickle import FragmentError, TrickleIce

    peer = SlowResolvingPeer()
    trickle = TrickleIce(peer, FRAGMENT)  # the offer: mids 0 and 1
    unknown_mid = "a=mid:7\na=candidate:9 1 udp 2122260223 192.0.2.9 50009 typ host\n"
    with pytest.raises(FragmentError, match="a=mid:7 is not a media section of the offer"):
        await trickle.add(parse_fragment(unknown_mid))
    assert peer.added == [] and trickle.candidates == 3
    await trickle.add(parse_fragment(FRAGMENT))  # ... then a=end-of-candidates
    late = "a=mid:0\na=candidate:9 1 udp 2122260223 192.0.2.9 50009 typ host\n"
    with pytest.raises(FragmentError, match="after a=end-of-candidates"):
        await trickle.add(parse_fragment(late))
    assert peer.added[-1] is None and trickle.candidates == 6


async def test_candidates_after_the_offers_own_end_of_candidates_are_refused():
    """An offer made after gathering (aiortc's, a non-trickling player's) ends its candidates with
    a=end-of-candidates, and aiortc then drops a PATCHed candidate of that transport unsaid: a 204,
    the candidate never checked. The end of a bundled section, whose transport aiortc discards,
    ends nothing: its candidates go to the bundle's first section's transport."""
    from server.trickle import FragmentError, TrickleIce

    ended_first = FRAGMENT.replace("a=mid:0\n", "a=mid:0\na=end-of-candidates\n", 1)
    late = "a=mid:{}\na=candidate:9 1 udp 2122260223 192.0.2.9 50009 typ host\n"
    for mid in ("0", "1"):  # (1 is bundled into 0's transport)
        peer = SlowResolvingPeer()
        trickle = TrickleIce(peer, ended_first)
        with pytest.raises(FragmentError, match="after a=end-of-candidates"):
            await trickle.add(parse_fragment(late.format(mid)))
        assert peer.added == [] and trickle.candidates == 3
    # the offer's end under its bundled section only (FRAGMENT's): candidates still come
    peer = SlowResolvingPeer()
    assert await TrickleIce(peer, FRAGMENT).add(parse_fragment(late.format("0"))) == 1


@pytest.mark.parametrize("changed", ["a=ice-ufrag:", "a=ice-pwd:", "both"])
async def test_new_credentials_are_a_restart_whichever_of_them_changed(changed):
    """A changed ufrag or a changed password is an ICE restart (RFC 8839): a fragment
    with the offer's ufrag but another password was taken as candidates for the old session."""
    from server.trickle import IceRestart, TrickleIce

    peer = SlowResolvingPeer()
    trickle = TrickleIce(peer, FRAGMENT)
    fragment = FRAGMENT
    for prefix in ("a=ice-ufrag:", "a=ice-pwd:") if changed == "both" else (changed,):
        fragment = fragment.replace(prefix, prefix + "re")
    with pytest.raises(IceRestart):
        await trickle.add(parse_fragment(fragment))
    assert peer.added == [] and trickle.candidates == 3
    without_password = FRAGMENT.replace("a=ice-pwd:P2uYro0UCOQ4zxjKXaWCBui1\n", "")
    assert await trickle.add(parse_fragment(without_password)) == 3  # the same ICE session's candidates


async def test_an_ice_restart_is_refused_with_a_reason_and_the_stream_goes_on():
    """aiortc cannot restart ICE. A player's restart, a fragment with new credentials (`If-Match:
    *`, RFC 9725 4.3.2) or a new offer with them posted again, gets a 4xx saying to start a new
    session; the session is left as it was and its video keeps coming."""
    with live_server(max_sessions=2) as (url, app):
        async with httpx.AsyncClient(base_url=url, timeout=20) as http:
            created, auth = await created_session(http, avatar="ada")
            pc, offer, fragment = await trickling_player()
            video = first_track(pc)
            try:
                r = await post_sdp(http, created, auth, offer)
                assert r.status_code == 201, r.text
                trickle = {"content-type": "application/trickle-ice-sdpfrag", **auth}
                patched = await http.patch(created["resource"], content=fragment,
                                           headers={**trickle, "if-match": r.headers["etag"]})  # fmt: skip
                assert patched.status_code == 204, patched.text
                await pc.setRemoteDescription(RTCSessionDescription(sdp=r.text, type="answer"))
                track = await asyncio.wait_for(video, 20)
                before = [await asyncio.wait_for(track.recv(), 20) for _ in range(3)]

                def new_credentials(sdp: str) -> str:
                    return sdp.replace("a=ice-ufrag:", "a=ice-ufrag:re").replace("a=ice-pwd:", "a=ice-pwd:re")

                restart = await http.patch(created["resource"], content=new_credentials(fragment),
                                           headers={**trickle, "if-match": "*"})  # fmt: skip
                again = await post_sdp(http, created, auth, new_credentials(offer))
                for response, status in ((restart, 422), (again, 409)):
                    assert response.status_code == status, response.text
                    assert "start a new session" in response.json()["message"], response.text
                session = app.state.registry.get(created["id"])
                assert session is not None and session.streaming and not session.closed
                after = [await asyncio.wait_for(track.recv(), 20) for _ in range(10)]
                assert after[-1].pts > before[-1].pts
                assert pc.connectionState == "connected"
            finally:
                await pc.close()


# An offer without BUNDLE whose media sections each have their ICE credentials (RFC 8839 allows
# them per m-line): two ICE sessions, one per transport, each with its own ufrag and password.
UNBUNDLED_OFFER = """v=0
o=- 1 1 IN IP4 0.0.0.0
s=-
t=0 0
m=video 9 UDP/TLS/RTP/SAVPF 97
a=mid:0
a=ice-ufrag:VidA
a=ice-pwd:videopasswordvideopassword
a=candidate:1 1 udp 2122260223 192.0.2.1 50000 typ host
m=audio 9 UDP/TLS/RTP/SAVPF 96
a=mid:1
a=ice-ufrag:AudB
a=ice-pwd:audiopasswordaudiopassword
a=candidate:2 1 udp 2122260223 192.0.2.1 50001 typ host
"""


def unbundled_fragment(mid: str, ufrag: str, pwd: str, port: int) -> str:
    """A fragment that trickles one candidate of media section `mid` under its own credentials."""
    return (f"m=audio 9 UDP/TLS/RTP/SAVPF 0\na=mid:{mid}\na=ice-ufrag:{ufrag}\na=ice-pwd:{pwd}\n"
            f"a=candidate:9 1 udp 2122260223 192.0.2.9 {port} typ host\n")  # fmt: skip


def test_a_fragment_gives_each_media_sections_own_credentials():
    """Credentials in a media section are that section's (media level, RFC 8840 9): a fragment
    with a section per transport, each with its ufrag, was refused as 'two different a=ice-ufrag'."""
    both = unbundled_fragment("0", "VidA", "videopasswordvideopassword", 50010) + unbundled_fragment(
        "1", "AudB", "audiopasswordaudiopassword", 50011
    )
    frag = parse_fragment(both)
    assert frag.credentials_of("0") == ("VidA", "videopasswordvideopassword")
    assert frag.credentials_of("1") == ("AudB", "audiopasswordaudiopassword")
    # session level: every section without its own, and the candidates before any a=mid:
    frag = parse_fragment("a=ice-ufrag:S\na=ice-pwd:P\na=mid:0\na=ice-pwd:Q\n")
    assert (frag.credentials_of(None), frag.credentials_of("0")) == (("S", "P"), ("S", "Q"))


async def test_a_candidate_under_its_own_sections_credentials_is_no_restart():
    """Without BUNDLE, each media section may have its own ICE credentials: a candidate of the
    second section sent with that section's credentials was compared with the first section's and
    refused as an ICE restart (a 422). Each section's credentials are compared with that section's
    in the offer now; new credentials for either section are still a restart."""
    from server.trickle import IceRestart, TrickleIce

    peer = SlowResolvingPeer()
    trickle = TrickleIce(peer, UNBUNDLED_OFFER)
    audio = unbundled_fragment("1", "AudB", "audiopasswordaudiopassword", 50011)
    assert await trickle.add(parse_fragment(audio)) == 1
    video = unbundled_fragment("0", "VidA", "videopasswordvideopassword", 50010)
    assert await trickle.add(parse_fragment(video)) == 1
    assert peer.added == [("1", "192.0.2.9"), ("0", "192.0.2.9")]  # each to its own transport
    for restart in (
        unbundled_fragment("1", "AudB", "newpasswordnewpasswordnew", 50012),  # the audio section's, new
        unbundled_fragment("1", "VidA", "videopasswordvideopassword", 50012),  # the video's, for audio
        unbundled_fragment("0", "AudB", "audiopasswordaudiopassword", 50012),  # the audio's, for video
        "a=ice-ufrag:New\na=ice-pwd:newpasswordnewpasswordnew\na=end-of-candidates\n",  # new, at session level
    ):
        with pytest.raises(IceRestart):
            await trickle.add(parse_fragment(restart))
    assert len(peer.added) == 2 and trickle.candidates == 4 and not trickle.ended


async def test_a_player_without_bundle_trickles_each_sections_candidates_under_its_credentials():
    """Through the server: an offer without BUNDLE whose audio section has ICE credentials of its
    own (two transports); the audio section's candidate, PATCHed with its section's credentials,
    was a 422 (an ICE restart). It reaches the audio transport's ICE agent now, and the same
    fragment with new credentials is still a 422."""
    with live_server(max_sessions=2) as (url, app):
        async with httpx.AsyncClient(base_url=url, timeout=20) as http:
            created, auth = await created_session(http, avatar="ada")
            pc = client_peer("video", "audio")
            try:
                await pc.setLocalDescription(await pc.createOffer())
                offer, _ = split_candidates(pc.localDescription.sdp)
                video, audio = offer.split("\r\nm=")[1:]
                assert "a=mid:1" in audio and "a=ice-ufrag:" in audio
                own = audio.replace("a=ice-ufrag:", "a=ice-ufrag:aud").replace("a=ice-pwd:", "a=ice-pwd:aud")
                offer = offer.replace(audio, own).replace("a=group:BUNDLE 0 1\r\n", "")
                r = await post_sdp(http, created, auth, offer)
                assert r.status_code == 201, r.text
                credentials = [line for line in own.splitlines() if line.startswith("a=ice-")]
                fragment = "\r\n".join(["m=audio 9 UDP/TLS/RTP/SAVPF 0", "a=mid:1", *credentials,
                                        "a=candidate:9 1 udp 2122260223 127.0.0.1 50009 typ host", ""])  # fmt: skip
                trickle = {"content-type": "application/trickle-ice-sdpfrag", "if-match": r.headers["etag"]}
                trickle.update(auth)
                patched = await http.patch(created["resource"], content=fragment, headers=trickle)
                assert patched.status_code == 204, patched.text
                peer = app.state.registry.get(created["id"]).trickle.pc
                transports = [t.receiver.transport.transport for t in peer.getTransceivers()]
                assert transports[0] is not transports[1]
                assert [(c.ip, c.port) for c in transports[1].getRemoteCandidates()] == [("127.0.0.1", 50009)]
                assert transports[0].getRemoteCandidates() == []
                restart = fragment.replace("a=ice-ufrag:aud", "a=ice-ufrag:new")
                refused = await http.patch(created["resource"], content=restart, headers=trickle)
                assert refused.status_code == 422 and "start a new session" in refused.json()["message"]
            finally:
                await pc.close()
