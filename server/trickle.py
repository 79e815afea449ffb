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
trickles but does not restart; a player starts a new session instead. Credentials are a media
section's (RFC 8839: session level, or each m-line its own, as an offer without BUNDLE may
have them): a fragment's are compared with those of the section they belong to in the offer.
"""

from __future__ import annotations

import asyncio
import ipaddress
import secrets
from dataclasses import dataclass, field

from aioice import mdns
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


class NotAnswered(Exception):
    """The offer's answer is still being made: its peer connection has no media sections to add
    candidates to yet (aiortc's addIceCandidate dropped them without a word)."""


Credentials = tuple[str | None, str | None]  # (ice-ufrag, ice-pwd), None where not given


@dataclass
class Fragment:
    ufrag: str | None = None  # session level: of every media section without its own
    pwd: str | None = None
    candidates: list[tuple[str | None, str]] = field(default_factory=list)  # (mid, candidate value)
    end: bool = False
    sections: dict[str, dict[str, str]] = field(default_factory=dict)  # mid -> its own ufrag/pwd

    def credentials_of(self, mid: str | None) -> Credentials:
        """The credentials a media section's candidates are sent with (None: those before any
        `a=mid:`): its own, else the fragment's session-level ones, each attribute on its own."""
        own = self.sections.get(mid, {}) if mid is not None else {}
        return own.get("ufrag", self.ufrag), own.get("pwd", self.pwd)


def parse_fragment(text: str) -> Fragment:
    """The credentials (session level and each media section's), each candidate with the
    `a=mid:` it falls under, and end-of-candidates."""
    frag, mid = Fragment(), None
    in_media = False  # past an m= or a=mid: line: credentials are that section's (media level)
    unnamed: dict[str, str] = {}  # credentials of a media section whose a=mid: has not come yet
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if line.startswith("m="):
            _named(unnamed)
            mid, in_media = None, True
        elif line.startswith("a=mid:"):
            mid, in_media = line[len("a=mid:") :], True
            frag.sections.setdefault(mid, {}).update(unnamed)
            unnamed = {}
        elif line.startswith(("a=ice-ufrag:", "a=ice-pwd:")):
            name, value = line[len("a=ice-") :].split(":", 1)
            if in_media:
                own = unnamed if mid is None else frag.sections[mid]
                own[name] = _same(own.get(name), value, f"ice-{name}", "media section")
            else:
                setattr(frag, name, _same(getattr(frag, name), value, f"ice-{name}", "fragment"))
        elif line.startswith("a=candidate:"):
            value = line[len("a=candidate:") :]
            try:
                candidate = candidate_from_sdp(value)
            except (ValueError, IndexError, AssertionError):  # aiortc's parser raises each
                raise FragmentError(f"line {number}: not an ICE candidate: {line[:100]!r}") from None
            problem = unusable(candidate)
            if problem:
                raise FragmentError(f"line {number}: {problem}: {line[:100]!r}")
            frag.candidates.append((mid, value))
        elif line == "a=end-of-candidates":
            frag.end = True
        elif not (len(line) >= 2 and line[0].isalpha() and line[1] == "="):  # others are ignored
            raise FragmentError(f"line {number}: not an SDP line: {line[:100]!r}")
    _named(unnamed)
    return frag


CANDIDATE_TYPES = ("host", "srflx", "prflx", "relay")


def unusable(candidate) -> str | None:
    """Why an ICE agent could not use a candidate aiortc reads, or None. aiortc reads any text as
    the address and any integer as the port: such a candidate got a 204, counted against the
    session's MAX_CANDIDATES, and aioice dropped it with a line at INFO, or checked port 99999."""
    host = candidate.ip
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not mdns.is_mdns_hostname(host):  # (a browser's `<uuid>.local`: the names aioice resolves)
            return f"{host[:60]} is neither an IP address nor an mDNS name (NAME.local)"
    if not 1 <= candidate.port <= 65535:
        return f"port {candidate.port} is not in 1-65535"
    if not 1 <= candidate.component <= 256:
        return f"component {candidate.component} is not in 1-256"
    if candidate.protocol.lower() not in ("udp", "tcp"):
        return f"transport {candidate.protocol[:20]!r} is not udp or tcp"
    if candidate.type not in CANDIDATE_TYPES:
        return (
            f"type {candidate.type[:20]!r} is not {', '.join(CANDIDATE_TYPES[:-1])} or {CANDIDATE_TYPES[-1]}"
        )
    return None


def _named(unnamed: dict[str, str]) -> None:
    if unnamed:  # (which section's they are is what makes them a restart or not)
        raise FragmentError("ICE credentials in a media section without a=mid:")


def _same(old: str | None, new: str, name: str, where: str) -> str:
    if old is not None and old != new:
        raise FragmentError(f"two different a={name} in one {where}")
    return new


def offer_credentials(sdp: str) -> dict[str, Credentials]:
    """Each media section's ICE credentials in an offer, by mid: its own (`a=ice-ufrag:`,
    `a=ice-pwd:` under its m= line), else the session level's."""
    session: dict[str, str] = {}
    sections: list[tuple[str | None, dict[str, str]]] = []  # (mid, its own), in order
    for line in sdp.splitlines():
        line = line.strip()
        if line.startswith("m="):
            sections.append((None, {}))
        elif line.startswith("a=mid:") and sections:
            sections[-1] = (line[len("a=mid:") :], sections[-1][1])
        elif line.startswith(("a=ice-ufrag:", "a=ice-pwd:")):
            name, value = line[len("a=ice-") :].split(":", 1)
            (sections[-1][1] if sections else session).setdefault(name, value)
    return {
        mid: (own.get("ufrag", session.get("ufrag")), own.get("pwd", session.get("pwd")))
        for mid, own in sections
        if mid is not None
    }


def ended_sections(sdp: str) -> set[str]:
    """The mids of the offer's media sections that carry their own `a=end-of-candidates` (an offer
    made after gathering): aiortc ends the remote candidates of each one's transport."""
    ended, mid = set(), None
    for line in sdp.splitlines():
        line = line.strip()
        if line.startswith("m="):
            mid = None
        elif line.startswith("a=mid:"):
            mid = line[len("a=mid:") :]
        elif line == "a=end-of-candidates" and mid is not None:
            ended.add(mid)
    return ended


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
        self._bundle = bundle_tag(offer_sdp)
        sections = offer_credentials(offer_sdp)
        # a bundled section's candidates are its transport's, the bundle's first section's: so are
        # the credentials they are checked against
        self._credentials = {mid: sections.get(self._bundle.get(mid, mid), own)
                             for mid, own in sections.items()}  # fmt: skip
        self._mids = set(self._credentials)
        self._first_mid = next(iter(self._credentials), None)  # where candidates without a mid go
        self.candidates = offer_sdp.count("a=candidate:")  # the offer's and those added since
        # the addresses fragments added, by transport: a PATCH sent again (its answer lost, a
        # player's retry) adds none of them twice, and they count once against MAX_CANDIDATES
        self._added: set[tuple] = set()
        self.ended = False  # the player sent a=end-of-candidates
        # the transports (their sections' mids) whose candidates the offer ended: a bundled section's
        # own end ends nothing, aiortc discards its transport for the bundle's
        self._ended_in_offer = {mid for mid in ended_sections(offer_sdp) if self._bundle.get(mid, mid) == mid}

    def matches(self, if_match: str) -> bool:
        """Whether an `If-Match` header names this ICE session (or any: `*`)."""
        tags = [tag.strip() for tag in if_match.split(",")]
        return "*" in tags or self.etag in tags or self.etag in (t.removeprefix("W/") for t in tags)

    async def add(self, frag: Fragment) -> int:
        """Hand the fragment's candidates to the ICE agent; IceRestart for new credentials.
        Returns how many it added. NotAnswered before the offer's answer is made: a PATCH of
        `If-Match: *` that came meanwhile (one naming the ETag cannot: the answer brings it) was a
        204 whose candidates went nowhere, counted as added, so that the player's retry added none
        of them, and its end-of-candidates refused every later one."""
        if self.pc.localDescription is None:
            raise NotAnswered
        self._check_credentials(frag)
        # refused, not dropped: the ICE agent takes neither without a word (and they were counted)
        ended = self.ended or bool(self._ended_in_offer & set(map(self._transport_of, frag.candidates)))
        if ended and frag.candidates:
            raise FragmentError(
                "candidates after a=end-of-candidates: the player said there would be no more"
            )
        unknown = sorted({mid for mid, _ in frag.candidates if mid is not None and mid not in self._mids})
        if unknown:
            raise FragmentError(f"a=mid:{unknown[0]} is not a media section of the offer")
        fresh, keys = [], set()
        for mid, value in frag.candidates:
            key = self._address_of((mid, value))
            if key not in self._added and key not in keys:
                fresh.append((mid, value))
                keys.add(key)
        if self.candidates + len(fresh) > MAX_CANDIDATES:
            raise FragmentError(f"a session takes at most {MAX_CANDIDATES} ICE candidates, offer included "
                                f"({self.candidates} so far, {len(fresh)} more sent)")  # fmt: skip
        self.candidates += len(fresh)
        self._added |= keys
        candidates = []
        for mid, value in fresh:
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
        for (_, value), result in zip(fresh, added):
            if isinstance(result, ValueError):  # e.g. a candidate after end-of-candidates
                raise FragmentError(f"the ICE agent refused {value[:80]!r}: {result}") from None
            if isinstance(result, BaseException):
                raise result
        if frag.end:
            await self.pc.addIceCandidate(None)
            self.ended = True
        return len(fresh)

    def _address_of(self, candidate: tuple[str | None, str]) -> tuple:
        """What makes a fragment's (mid, candidate) one address to check: its transport, component,
        protocol, address, port and type (not its foundation or priority, which a player may
        compute anew when it sends the candidate again)."""
        c = candidate_from_sdp(candidate[1])
        return self._transport_of(candidate), c.component, c.protocol.lower(), c.ip, c.port, c.type

    def _transport_of(self, candidate: tuple[str | None, str]) -> str | None:
        """The mid of the section whose transport a fragment's (mid, candidate) goes to."""
        mid = candidate[0] if candidate[0] is not None else self._first_mid
        return self._bundle.get(mid, mid)

    def _check_credentials(self, frag: Fragment) -> None:
        """IceRestart where the fragment gives a media section credentials other than the offer's
        for it: either of them changed is a restart (RFC 8839), not candidates for this ICE session."""

        def same(sent: Credentials, offered: Credentials) -> bool:
            return all(s is None or o is None or s == o for s, o in zip(sent, offered))

        for mid in frag.sections.keys() & self._credentials.keys():  # (an unknown mid is refused after)
            if not same(frag.credentials_of(mid), self._credentials[mid]):
                raise IceRestart(mid)
        if self._first_mid is not None and any(mid is None for mid, _ in frag.candidates):
            if not same(frag.credentials_of(None), self._credentials[self._first_mid]):
                raise IceRestart(self._first_mid)
        # session-level ones for no section in particular (with end-of-candidates, or alone) name an
        # ICE session: one of the offer's, or a new one
        if (frag.ufrag, frag.pwd) != (None, None) and self._credentials:
            if not any(same((frag.ufrag, frag.pwd), offered) for offered in self._credentials.values()):
                raise IceRestart("session level")
