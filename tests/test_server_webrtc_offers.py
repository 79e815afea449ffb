"""The checks an SDP offer passes before the server makes its peer connection (server/offers.py's
check_offer): what aiortc would refuse or fail on only after the session's peer connection was made."""

from __future__ import annotations

import asyncio

import pytest
from aiortc import RTCConfiguration, RTCPeerConnection


def _offer_lines() -> list[str]:
    async def offer():
        pc = RTCPeerConnection()
        pc.addTransceiver("video", direction="recvonly")
        description = await pc.createOffer()
        await pc.close()
        return description.sdp

    return asyncio.run(offer()).splitlines()


def test_offers_are_checked_for_what_the_transports_assert_on_later():
    """An offer without a=fingerprint was answered 201 and its session streamed to a peer connection
    whose connect task had died on an assertion; one without a direction attribute (sendrecv, by
    the SDP rules) was refused."""
    from server.offers import OfferError, check_offer

    lines = _offer_lines()

    def without(prefix):
        return "\r\n".join(line for line in lines if not line.startswith(prefix)) + "\r\n"

    for prefix, says in (("a=fingerprint", "no a=fingerprint"), ("a=ice-ufrag", "no a=ice-ufrag")):
        with pytest.raises(OfferError, match=says):
            check_offer(without(prefix))
    assert check_offer(without("a=recvonly")) == {"video"}
    # Firefox puts the fingerprint and ICE credentials at the session level
    moved = [line for line in lines if line.startswith(("a=fingerprint", "a=ice-ufrag", "a=ice-pwd"))]
    rest = [line for line in lines if line not in moved]
    first_media = next(i for i, line in enumerate(rest) if line.startswith("m="))
    assert check_offer("\r\n".join(rest[:first_media] + moved + rest[first_media:]) + "\r\n") == {"video"}


def test_offers_that_could_never_connect_are_refused_before_the_answer():
    """An offer whose fingerprint's hash aiortc does not check (md9), or whose ICE username
    fragment is longer than RFC 8839's 256 characters, was answered 201: its DTLS or ICE failed,
    and the session ended 20 s later as never_connected."""
    import re

    from server.offers import OfferError, check_offer

    sdp = "\r\n".join(_offer_lines()) + "\r\n"
    for spoil, says in (
        (lambda t: re.sub(r"a=fingerprint:sha-\d+", "a=fingerprint:md9", t), "uses no hash the server checks"),
        (lambda t: re.sub(r"a=ice-ufrag:(\S+)", "a=ice-ufrag:" + "u" * 3000, t), "4 to 256 characters"),
        (lambda t: re.sub(r"a=ice-ufrag:(\S+)", "a=ice-ufrag:abc", t), "4 to 256 characters"),
        (lambda t: re.sub(r"a=ice-pwd:(\S+)", "a=ice-pwd:short", t), "a=ice-pwd 22 to 256"),
    ):
        spoilt = spoil(sdp)
        assert spoilt != sdp
        with pytest.raises(OfferError, match=says):
            check_offer(spoilt)
    # another hash beside a checked one is fine (aiortc checks those it knows)
    fingerprint = next(line for line in sdp.split("\r\n") if line.startswith("a=fingerprint:"))
    assert check_offer(sdp.replace(fingerprint, "a=fingerprint:md9 00:11\r\n" + fingerprint)) == {"video"}


@pytest.mark.parametrize(
    "fmtp", ["packetization-mode=0;profile-level-id=42e01f", "packetization-mode=1;profile-level-id=640032"]
)
def test_an_offer_of_h264_the_server_cannot_send_says_what_it_needs(fmtp):
    """H264 only, without packetization-mode=1 or in the High profile: aiortc's "OperationError:
    Failed to set remote video description send parameters", after the session was made."""
    from server.offers import OfferError, check_offer

    lines = [line.replace("VP8/90000", "VP9/90000") for line in _offer_lines()]  # (H264 alone left)
    h264_only = "\r\n".join(lines) + "\r\n"
    assert check_offer(h264_only) == {"video"}  # aiortc's own H264 offer: what the server sends
    h264 = [line.split(":")[1].split()[0] for line in lines if "H264/90000" in line]
    fmtps = tuple(f"a=fmtp:{p} " for p in h264)
    other = [line.split(" ")[0] + f" {fmtp}" if line.startswith(fmtps) else line for line in lines]
    with pytest.raises(OfferError, match="its H264 is not one the server sends .packetization-mode=1"):
        check_offer("\r\n".join(other) + "\r\n")


def test_an_offer_whose_first_video_m_line_only_sends_is_refused():
    """The avatar's track goes on the first video m-line: an offer with a sendonly one before the
    receiving one got a 201, a session counted as streaming, and no video."""
    from server.offers import OfferError, check_offer

    async def offer():
        pc = RTCPeerConnection()
        pc.addTransceiver("video", direction="sendonly")
        pc.addTransceiver("video", direction="recvonly")
        description = await pc.createOffer()
        await pc.close()
        return description.sdp

    with pytest.raises(OfferError, match="the first video m-line does not receive"):
        check_offer(asyncio.run(offer()))


def _offer_with(*transceivers: tuple[str, str]) -> str:
    async def offer():
        pc = RTCPeerConnection()
        for kind, direction in transceivers:
            pc.addTransceiver(kind, direction=direction)
        description = await pc.createOffer()
        await pc.close()
        return description.sdp

    return asyncio.run(offer())


def _only_codec(sdp: str, kind: str, rtpmap: str) -> str:
    """`sdp` with the codecs of its `kind` m-lines replaced by one, payload type 103: `rtpmap`."""
    lines, inside = [], False
    for line in sdp.splitlines():
        if line.startswith("m="):
            inside = line.startswith(f"m={kind} ")
            if inside:
                lines += [" ".join(line.split()[:3] + ["103"]), f"a=rtpmap:103 {rtpmap}"]
                continue
        if not (inside and line.startswith(("a=rtpmap:", "a=fmtp:", "a=rtcp-fb:"))):
            lines.append(line)
    return "\r\n".join(lines) + "\r\n"


def test_an_offer_with_media_the_server_has_no_codec_for_is_refused_before_the_answer():
    """An audio m-line of codecs aiortc has none of (ISAC alone), or a second video m-line of VP9
    alone, passed the checks: aiortc's "OperationError: Failed to set remote audio description
    send parameters" came after the peer connection was made, which ended the session."""
    from server.offers import OfferError, check_offer

    offer = _offer_with(("video", "recvonly"), ("audio", "sendrecv"))
    assert check_offer(_only_codec(offer, "audio", "G722/8000")) == {"video", "audio"}  # (aiortc's too)
    with pytest.raises(OfferError, match=r"the audio m-line \(mid 1\) offers no codec the server takes "
                                         r"\(opus, G722, PCMU, PCMA\): got \['ISAC'\]"):  # fmt: skip
        check_offer(_only_codec(offer, "audio", "ISAC/16000"))
    two = _offer_with(("video", "recvonly"), ("video", "recvonly"))
    second_vp9 = two.replace("\r\nm=video", "\r\nm=audio", 1)  # (the first stays as it was)
    second_vp9 = _only_codec(second_vp9, "video", "VP9/90000").replace("m=audio", "m=video", 1)
    with pytest.raises(OfferError, match=r"the video m-line \(mid 1\) offers no codec"):
        check_offer(second_vp9)


def test_an_offer_whose_m_lines_have_no_mid_is_refused_before_the_answer():
    """An offer without a=mid lines (SDP as before WebRTC, which puts one on every m-line) passed
    the checks: aiortc's answer then failed its own check ("ValueError: Media sections in answer do
    not match offer") once the peer connection was made, which ended the session. One m-line without
    it is refused too: WebRTC's SDP has one on each, and an m-line is named by it (trickle ICE)."""
    import re

    from server.offers import OfferError, check_offer

    offer = _offer_with(("video", "recvonly"), ("audio", "sendrecv"))
    unbundled = re.sub(r"a=group:BUNDLE[^\r\n]*\r\n", "", offer)
    assert check_offer(unbundled) == {"video", "audio"}
    with pytest.raises(OfferError, match=r"malformed SDP: m-line 1 \(video\) has no a=mid"):
        check_offer(re.sub(r"a=mid:[^\r\n]*\r\n", "", unbundled))
    with pytest.raises(OfferError, match=r"malformed SDP: m-line 2 \(audio\) has no a=mid"):
        check_offer(re.sub(r"a=mid:1\r\n", "", unbundled))


def _spoilt_audio(sdp: str, prefix: str) -> str:
    """`sdp` without the lines starting with `prefix` under its audio m-line."""
    lines, kind = [], None
    for line in sdp.splitlines():
        if line.startswith("m="):
            kind = line[2:].split()[0]
        if not (kind == "audio" and line.startswith(prefix)):
            lines.append(line)
    return "\r\n".join(lines) + "\r\n"


def test_an_audio_m_line_without_what_its_transport_needs_is_refused_before_the_answer():
    """The checks of ICE credentials and DTLS fingerprints looked at the video m-lines alone. An
    audio m-line without a=ice-ufrag (bundled or not) passed them: aiortc's "ValueError: ICE
    username fragment or password is missing" came once the peer connection was made, which ended
    the session. One outside any bundle without a=fingerprint was answered 201: its own transport's
    DTLS could not start, and the microphone and the speech never came. A bundled one without a
    fingerprint takes the bundle's transport (the first m-line's), and stays answered."""
    import re

    from server.offers import OfferError, check_offer

    offer = _offer_with(("video", "recvonly"), ("audio", "sendrecv"))
    unbundled = re.sub(r"a=group:BUNDLE[^\r\n]*\r\n", "", offer)
    for sdp in (offer, unbundled):
        with pytest.raises(OfferError, match=r"the audio m-line \(mid 1\) has no a=ice-ufrag / a=ice-pwd"):
            check_offer(_spoilt_audio(sdp, "a=ice-ufrag"))
        spoilt = re.sub(r"(m=audio[\s\S]*a=ice-pwd:)\S+", r"\g<1>short", sdp)
        assert spoilt != sdp
        with pytest.raises(OfferError, match="a=ice-pwd 22 to 256"):
            check_offer(spoilt)
    with pytest.raises(OfferError, match=r"the audio m-line \(mid 1\) has no a=fingerprint"):
        check_offer(_spoilt_audio(unbundled, "a=fingerprint"))
    assert check_offer(_spoilt_audio(offer, "a=fingerprint")) == {"video", "audio"}


def test_an_m_line_of_a_kind_the_server_cannot_answer_is_refused_before_the_answer():
    """An offer with an m-line of real-time text (m=text, RFC 4103) passed the checks: aiortc's
    answer failed on it with "AttributeError: 'NoneType' object has no attribute 'mid'" once the
    session's peer connection was made, which ended the session. A data channel's m-line without
    ICE credentials did too ("ValueError: ICE username fragment or password is missing"); one with
    them is answered (the server sends nothing on it)."""
    from server.offers import OfferError, check_offer

    offer = _offer_with(("video", "recvonly"))
    credentials = "".join(line + "\r\n" for line in offer.splitlines()
                          if line.startswith(("a=ice-ufrag", "a=ice-pwd", "a=fingerprint", "a=setup")))  # fmt: skip

    def with_section(section: str) -> str:
        return offer.replace("a=group:BUNDLE 0", "a=group:BUNDLE 0 9") + section + "c=IN IP4 0.0.0.0\r\na=mid:9\r\n"

    text = with_section("m=text 9 UDP/TLS/RTP/SAVPF 98\r\na=rtpmap:98 t140/1000\r\n") + credentials
    with pytest.raises(OfferError, match=r"the text m-line \(mid 9\) is of a kind the server does not answer"):
        check_offer(text)
    data = with_section("m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\na=sctp-port:5000\r\n")
    with pytest.raises(OfferError, match=r"the application m-line \(mid 9\) has no a=ice-ufrag / a=ice-pwd"):
        check_offer(data)
    assert check_offer(data + credentials) == {"video", "application"}


def test_a_bundle_only_video_m_line_is_one_that_receives():
    """An offer that bundles at most, its audio first, has its video m-line bundle-only: port 0 and
    a=bundle-only (RFC 8843), bundled, not rejected. It was refused as "the video m-line does not
    receive"; a video m-line with port 0 and no a=bundle-only (rejected) still is."""
    import re

    from server.offers import OfferError, check_offer

    offer = _offer_with(("audio", "recvonly"), ("video", "recvonly"))
    bundle_only = re.sub(r"m=video \d+ ([^\r\n]*)\r\n", r"m=video 0 \1\r\na=bundle-only\r\n", offer)
    assert "m=video 0 " in bundle_only
    assert check_offer(bundle_only) == {"audio", "video"}
    with pytest.raises(OfferError, match="the video m-line does not receive"):
        check_offer(bundle_only.replace("a=bundle-only\r\n", ""))


def test_an_offer_with_two_m_lines_of_one_mid_is_refused_before_the_answer():
    """Two m-lines with the same a=mid passed the checks: aiortc's answer failed on them ("ValueError:
    Media sections in answer do not match offer", or an AttributeError for two video ones) once
    the session's peer connection was made, which ended the session."""
    from server.offers import OfferError, check_offer

    for kinds in (("video", "audio"), ("video", "video")):
        offer = _offer_with((kinds[0], "recvonly"), (kinds[1], "sendrecv"))
        twice = offer.replace("a=mid:1", "a=mid:0").replace("a=group:BUNDLE 0 1", "a=group:BUNDLE 0")
        assert twice.count("a=mid:0") == 2
        with pytest.raises(OfferError, match=rf"malformed SDP: m-lines 1 and 2 \({kinds[1]}\) both have a=mid:0"):
            check_offer(twice)


def test_an_offer_with_a_candidate_no_ice_agent_can_use_is_refused_before_the_answer():
    """A trickled candidate the ICE agent cannot use (a host name that is not an mDNS one, port
    99999, component 0, transport sctp) is refused (server/trickle.py's `unusable`); the same
    candidate in the offer was answered 201, and aioice dropped it with a line at INFO or checked
    port 99999: a player whose every candidate was such a one never connected, its session ended
    20 s later. The offer's candidates are held to the same rules."""
    import re

    from server.offers import OfferError, check_offer

    async def gathered_offer():  # (with its candidates: those of setLocalDescription's gathering)
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))  # (no STUN server to reach)
        pc.addTransceiver("video", direction="recvonly")
        await pc.setLocalDescription(await pc.createOffer())
        await pc.close()
        return pc.localDescription.sdp

    offer = asyncio.run(gathered_offer())
    candidate = re.search(r"a=candidate:[^\r\n]*", offer).group(0)
    for spoil, says in (
        (lambda c: re.sub(r"(udp \d+ )\S+ (\d+)", r"\1example.com \2", c), "example.com is neither an IP address nor an mDNS name"),
        (lambda c: re.sub(r"(udp \d+ \S+ )\d+", r"\g<1>99999", c), "port 99999 is not in 1-65535"),
        (lambda c: c.replace(" 1 udp ", " 0 udp "), "component 0 is not in 1-256"),
        (lambda c: c.replace(" udp ", " sctp "), "transport 'sctp' is not udp or tcp"),
    ):
        spoilt = spoil(candidate)
        assert spoilt != candidate
        with pytest.raises(OfferError, match=rf"the video m-line \(mid 0\)'s candidate 1: {says}"):
            check_offer(offer.replace(candidate, spoilt))
