"""The checks an SDP offer passes before the server makes its peer connection (server/webrtc.py):
what aiortc would refuse, or fail on, only once the session's peer connection was made (which
ended the session), or would answer 201 and never connect."""

from __future__ import annotations

from aiortc.rtcdtlstransport import X509_DIGEST_ALGORITHMS
from aiortc.sdp import SessionDescription

from .trickle import MAX_CANDIDATES, unusable

SUPPORTED_VIDEO = {"vp8", "h264"}


class OfferError(ValueError):
    """The offer cannot be answered: malformed, or no media the server can use (-> 400)."""


def check_offer(sdp: str) -> set[str]:
    """Validate an offer before touching a peer connection; returns the media kinds it carries."""
    if not sdp.lstrip().startswith("v=0"):
        raise OfferError("malformed SDP: an offer starts with 'v=0'")
    try:
        parsed = SessionDescription.parse(sdp)
    except Exception as e:  # the SDP parser raises whatever the bad line provokes
        raise OfferError(f"malformed SDP: {type(e).__name__}: {e}"[:200]) from None
    video = [m for m in parsed.media if m.kind == "video"]
    if not video:
        raise OfferError("offer has no usable media: it needs a video m-line the server can send on")
    # port 0: rejected, but for a bundle-only m-line's (RFC 8843: bundled), which aiortc's parser drops
    rejected = {id(m) for m, only in zip(parsed.media, _bundle_only(sdp)) if m.port == 0 and not only}
    # (no direction attribute: sendrecv, RFC 8866 6.7)
    if not any((m.direction or "sendrecv") in ("recvonly", "sendrecv") and id(m) not in rejected for m in video):
        raise OfferError("offer has no usable media: the video m-line does not receive (recvonly/sendrecv)")
    if (video[0].direction or "sendrecv") not in ("recvonly", "sendrecv") or id(video[0]) in rejected:
        # (the avatar's track goes on the first: a receiving one after it got a 201 and no video)
        raise OfferError("the first video m-line does not receive (recvonly/sendrecv): the avatar is sent on "
                         "the first; put the receiving one first")  # fmt: skip
    codecs = {c.name.lower() for m in video for c in m.rtp.codecs}
    if not codecs & SUPPORTED_VIDEO:
        raise OfferError(f"offer has no usable media: no VP8 or H264 video codec (got {sorted(codecs)})")
    if not any(_sendable(c) for m in video for c in m.rtp.codecs):  # (aiortc's OperationError, later)
        raise OfferError(
            "offer has no usable media: its H264 is not one the server sends (packetization-mode=1, the "
            "constrained baseline profile: profile-level-id 42e01f or 42001f); offer VP8, or such H264"
        )
    for m in parsed.media:  # (aiortc answers these alone: its answer failed on another, an AttributeError)
        if m.kind not in ("audio", "video", "application"):
            raise OfferError(f"the {m.kind[:20]} m-line (mid {str(m.rtp.muxId)[:20]}) is of a kind the server "
                             "does not answer (audio, video, application)")  # fmt: skip
    # what aiortc's transports assert on only once the answer is sent (the session would then
    # stream to a peer connection that can never connect), on every m-line with a transport of its
    # own (the first of a bundle, or one outside any: an audio one's DTLS failed, and neither the
    # microphone nor the speech came) and every video one; ICE credentials on every m-line
    # (aiortc's ValueError, for an audio or a data channel's too, once the session's peer connection was made)
    bundled = {mid: group.items[0] for group in parsed.group if group.semantic == "BUNDLE" for mid in group.items}
    for m in parsed.media:
        name = f"the {m.kind} m-line (mid {str(m.rtp.muxId)[:20]})"
        if m.kind == "video" or bundled.get(m.rtp.muxId, m.rtp.muxId) == m.rtp.muxId:
            if not m.dtls or not m.dtls.fingerprints:
                raise OfferError(f"malformed SDP: {name} has no a=fingerprint (DTLS-SRTP is required)")
            if not any(f.algorithm.lower() in X509_DIGEST_ALGORITHMS for f in m.dtls.fingerprints):
                # (answered 201, its DTLS handshake failed: the session ended 20 s later, never connected)
                got = ", ".join(f.algorithm[:20] for f in m.dtls.fingerprints[:4])
                raise OfferError(f"{name}'s a=fingerprint uses no hash the server checks "
                                 f"({', '.join(X509_DIGEST_ALGORITHMS)}): got {got}")  # fmt: skip
        if not m.ice or not m.ice.usernameFragment or not m.ice.password:
            raise OfferError(f"malformed SDP: {name} has no a=ice-ufrag / a=ice-pwd")
        # RFC 8839's lengths: a longer ufrag made STUN usernames no check could carry (201, never connected)
        if not 4 <= len(m.ice.usernameFragment) <= 256 or not 22 <= len(m.ice.password) <= 256:
            raise OfferError("malformed SDP: a=ice-ufrag must be 4 to 256 characters and a=ice-pwd 22 to 256 "
                             f"(got {len(m.ice.usernameFragment)} and {len(m.ice.password)})")  # fmt: skip
    for m in parsed.media:  # (aiortc's OperationError for any m-line, after the session's peer connection)
        if m.kind in ("audio", "video") and not _common_codecs(m):
            from aiortc.codecs import CODECS

            ours = ", ".join(dict.fromkeys(c.name for c in CODECS[m.kind] if c.name.lower() != "rtx"))
            got = sorted({c.name[:20] for c in m.rtp.codecs})[:8]
            raise OfferError(f"offer has no usable media: the {m.kind} m-line (mid {str(m.rtp.muxId)[:20]}) offers "
                             f"no codec the server takes ({ours}): got {got}")  # fmt: skip
    numbers: dict[str, int] = {}  # mid -> its m-line's number
    for number, m in enumerate(parsed.media, 1):  # (WebRTC's SDP has one on each: JSEP 5.2.1)
        if not m.rtp.muxId:  # (none at all: aiortc's answer failed its own check, a ValueError)
            raise OfferError(f"malformed SDP: m-line {number} ({m.kind[:20]}) has no a=mid, "
                             "which WebRTC puts on every m-line")  # fmt: skip
        if m.rtp.muxId in numbers:  # (aiortc's answer failed on the second: a ValueError, or an AttributeError)
            raise OfferError(f"malformed SDP: m-lines {numbers[m.rtp.muxId]} and {number} ({m.kind[:20]}) both "
                             f"have a=mid:{m.rtp.muxId[:20]}")  # fmt: skip
        numbers[m.rtp.muxId] = number
    mids = {m.rtp.muxId for m in parsed.media}
    for group in parsed.group:  # (aiortc failed on a BUNDLE of a mid no m-line has: an AttributeError)
        unknown = [mid for mid in group.items if mid not in mids]
        if group.semantic == "BUNDLE" and unknown:
            mid = unknown[0][:20]
            raise OfferError(f"malformed SDP: a=group:BUNDLE names mid {mid!r}, which no m-line has")
    for m in parsed.media:  # (as a trickled one is: aioice dropped such a candidate, or checked port 99999)
        for number, candidate in enumerate(m.ice_candidates, 1):
            problem = unusable(candidate)
            if problem:
                raise OfferError(f"the {m.kind} m-line (mid {str(m.rtp.muxId)[:20]})'s candidate {number}: {problem}")
    candidates = sum(len(m.ice_candidates) for m in parsed.media)
    if candidates > MAX_CANDIDATES:
        raise OfferError(f"offer has {candidates} ICE candidates: a session takes at most {MAX_CANDIDATES}")
    return {m.kind for m in parsed.media}


def _bundle_only(sdp: str) -> list[bool]:
    """Whether each m-line of `sdp`, in order, has a=bundle-only."""
    flags: list[bool] = []
    for line in sdp.splitlines():
        if line.startswith("m="):
            flags.append(False)
        elif line.strip() == "a=bundle-only" and flags:
            flags[-1] = True
    return flags


def _common_codecs(media) -> list:
    """The codecs of an m-line that aiortc negotiates: none, and it refuses the offer."""
    from aiortc.codecs import CODECS
    from aiortc.rtcpeerconnection import find_common_codecs

    return find_common_codecs(CODECS[media.kind], media.rtp.codecs)


def _sendable(codec) -> bool:
    """Whether the server's video encoders can send `codec` as offered (aiortc's own test)."""
    from aiortc.codecs import CODECS
    from aiortc.rtcpeerconnection import is_codec_compatible

    return any(is_codec_compatible(codec, ours) for ours in CODECS["video"] if ours.name.lower() in SUPPORTED_VIDEO)
