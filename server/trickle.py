"""Trickle ICE for WHEP sessions: a player's candidates after its offer (RFC 9725, 4.3.1).

A player that sends its offer before it has gathered every candidate (most WHEP players do:
it saves the gathering time) PATCHes the rest to the session resource as an SDP fragment
(`application/trickle-ice-sdpfrag`, RFC 8840): the ICE credentials they belong to, a
`a=mid:` per media section and `a=candidate:` lines, and `a=end-of-candidates` when done.
Without them the server can learn the player's addresses only from the checks the player
sends it (peer-reflexive candidates), which a NAT or firewall between them may stop.

The 201 answer carries an entity tag for the ICE session; a PATCH must name it in `If-Match`
(412 when it names another). ICE restarts (a fragment with new credentials: a new ufrag or
a new password, either one) are not supported: 422, as RFC 9725 asks of a server that
trickles but does not restart; a player starts a new session instead.
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass, field

from aiortc import RTCPeerConnection
from aiortc.sdp import candidate_from_sdp

FRAGMENT_TYPE = "application/trickle-ice-sdpfrag"
# Each remote candidate is an address the server's ICE agent sends connectivity checks to: a
# bound on them (offer and fragments together) keeps a session from aiming the server's
# STUN traffic at many addresses. A browser offers a few per network interface.
MAX_CANDIDATES = 64


class FragmentError(ValueError):
    """A fragment that cannot be read; the message says which line and why."""


class IceRestart(Exception):
    """The fragment carries new ICE credentials: a restart, which this server does not do."""


@dataclass
class Fragment:
    ufrag: str | None = None
    pwd: str | None = None
    candidates: list[tuple[str | None, str]] = field(default_factory=list)  # (mid, candidate value)
    end: bool = False


def parse_fragment(text: str) -> Fragment:
    """The credentials, each candidate with the `a=mid:` it falls under, and end-of-candidates."""
    frag, mid = Fragment(), None
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if line.startswith("m="):
            mid = None
        elif line.startswith("a=mid:"):
            mid = line[len("a=mid:") :]
        elif line.startswith("a=ice-ufrag:"):
            frag.ufrag = _same(frag.ufrag, line[len("a=ice-ufrag:") :], "ice-ufrag")
        elif line.startswith("a=ice-pwd:"):
            frag.pwd = _same(frag.pwd, line[len("a=ice-pwd:") :], "ice-pwd")
        elif line.startswith("a=candidate:"):
            value = line[len("a=candidate:") :]
            try:
                candidate_from_sdp(value)
            except (ValueError, IndexError, AssertionError):  # aiortc's parser raises each
                raise FragmentError(f"line {number}: not an ICE candidate: {line[:100]!r}") from None
            frag.candidates.append((mid, value))
        elif line == "a=end-of-candidates":
            frag.end = True
        elif not (len(line) >= 2 and line[0].isalpha() and line[1] == "="):  # others are ignored
            raise FragmentError(f"line {number}: not an SDP line: {line[:100]!r}")
    return frag


def _same(old: str | None, new: str, name: str) -> str:
    if old is not None and old != new:
        raise FragmentError(f"two different a={name} in one fragment")
    return new


def ice_credential(sdp: str, name: str) -> str | None:
    """The first `a=<name>:` of an SDP: `ice-ufrag` or `ice-pwd` (the offer's ICE credentials)."""
    for line in sdp.splitlines():
        if line.startswith(f"a={name}:"):
            return line[len(f"a={name}:") :].strip()
    return None


def bundle_tag(sdp: str) -> dict[str, str]:
    """Each bundled mid -> the group's first mid, whose transport the answer uses for them all
    (aiortc hands a candidate of a bundled section to no transport)."""
    for line in sdp.splitlines():
        if line.startswith("a=group:BUNDLE "):
            mids = line.split()[1:]
            return {mid: mids[0] for mid in mids}
    return {}


class TrickleIce:
    """A WHEP session's peer connection as a PATCH sees it: its entity tag, and the offer's ICE
    credentials and bundle, against which a fragment's candidates are added."""

    def __init__(self, pc: RTCPeerConnection, offer_sdp: str):
        self.pc = pc
        self.etag = f'"{secrets.token_urlsafe(12)}"'
        self._credentials = {name: ice_credential(offer_sdp, f"ice-{name}") for name in ("ufrag", "pwd")}
        self._bundle = bundle_tag(offer_sdp)
        self._mids = {
            line[len("a=mid:") :].strip() for line in offer_sdp.splitlines() if line.startswith("a=mid:")
        }
        self.candidates = offer_sdp.count("a=candidate:")  # the offer's and those added since
        self.ended = False  # the player sent a=end-of-candidates

    def matches(self, if_match: str) -> bool:
        """Whether an `If-Match` header names this ICE session (or any: `*`)."""
        tags = [tag.strip() for tag in if_match.split(",")]
        return "*" in tags or self.etag in tags or self.etag in (t.removeprefix("W/") for t in tags)

    async def add(self, frag: Fragment) -> int:
        """Hand the fragment's candidates to the ICE agent; IceRestart for new credentials.
        Returns how many it added."""
        # either credential changed is a restart (RFC 8839), not candidates for this one
        for name, sent in (("ufrag", frag.ufrag), ("pwd", frag.pwd)):
            if sent is not None and self._credentials[name] is not None and sent != self._credentials[name]:
                raise IceRestart(name)
        # refused, not dropped: the ICE agent takes neither without a word (and they were counted)
        if self.ended and frag.candidates:
            raise FragmentError(
                "candidates after a=end-of-candidates: the player said there would be no more"
            )
        unknown = sorted({mid for mid, _ in frag.candidates if mid is not None and mid not in self._mids})
        if unknown:
            raise FragmentError(f"a=mid:{unknown[0]} is not a media section of the offer")
        if self.candidates + len(frag.candidates) > MAX_CANDIDATES:
            raise FragmentError(f"a session takes at most {MAX_CANDIDATES} ICE candidates, offer included "
                                f"({self.candidates} so far, {len(frag.candidates)} more sent)")  # fmt: skip
        self.candidates += len(frag.candidates)
        candidates = []
        for mid, value in frag.candidates:
            candidate = candidate_from_sdp(value)
            if mid is None:  # before any a=mid: the first media section's
                candidate.sdpMLineIndex = 0
            else:
                candidate.sdpMid = self._bundle.get(mid, mid)
            candidates.append(candidate)
        # added together, as aiortc adds an offer's: a browser's host candidates are mDNS names
        # (`<uuid>.local`), each resolved with a timeout of a second, and one after another a
        # fragment of names that do not resolve held the PATCH that many seconds
        added = await asyncio.gather(*map(self.pc.addIceCandidate, candidates), return_exceptions=True)
        for (_, value), result in zip(frag.candidates, added):
            if isinstance(result, ValueError):  # e.g. a candidate after end-of-candidates
                raise FragmentError(f"the ICE agent refused {value[:80]!r}: {result}") from None
            if isinstance(result, BaseException):
                raise result
        if frag.end:
            await self.pc.addIceCandidate(None)
            self.ended = True
        return len(frag.candidates)
