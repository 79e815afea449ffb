"""ICE servers (STUN, TURN) for a server that browsers reach through NATs (`serve --ice-servers`).

Without them the server offers only its interfaces' own addresses (host candidates). That
serves a LAN, a machine with a public address on its interface, or 127.0.0.1. A server
behind a NAT (most cloud machines: a private interface address, 1:1 NAT to a public one)
needs a STUN server to learn its public address, and clients behind symmetric NATs or
firewalls that drop UDP need a TURN server to relay through.

The list is given in the browser's `RTCIceServer` form, so the same JSON configures both
ends: the server's own peer connections (aiortc gathers with the first STUN and the first
TURN URL, UDP or TCP, and `turns:` over TCP), and every client. Clients get it in the
session's JSON (`ice_servers`) and, for any WHEP player, as `Link: <url>; rel="ice-server"`
headers on the WHEP answer (RFC 9725, 4.6).

A TURN entry may carry a shared `secret` instead of a username and credential (coturn's
`--use-auth-secret --static-auth-secret`, the "TURN REST API" scheme): then nobody outside the
server sees a lasting credential. Each session, and the server's own peer connection for it,
gets its own, good for `ttl` seconds (a day by default): the username is the expiry's Unix
time and a name, `"1733270400:s-3f2a"`, the credential the base64 of the HMAC-SHA1 of that
username under the secret, which the TURN server recomputes. A static credential given to
every client lets anyone who opens the page use the relay for as long as it stands.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import re
import time
from pathlib import Path

log = logging.getLogger("streamgen.server")

# what aiortc can gather with: stun:host[:port], turn:host[:port][?transport=udp|tcp],
# turns:host[:port]?transport=tcp (aioice has no STUN over TLS)
_URL = re.compile(
    r"^(?P<scheme>stun|turns?):(?P<host>[^?:/@\s]+)(?::(?P<port>\d{1,5}))?(?:\?transport=(?P<transport>udp|tcp))?$"
)


DEFAULT_TTL = 86400  # seconds an ephemeral TURN credential is good for; a session's allocation
# is refreshed with it, so it must outlast the longest session


class IceConfigError(ValueError):
    """The ICE server list cannot be used; the message says which entry and why."""


def parse_ice_servers(text: str) -> list[dict]:
    """`--ice-servers`: a JSON list of RTCIceServer objects (or one object), inline or in a
    file, or a bare `stun:` URL. Returns the list, each entry with `urls` as a list."""
    text = text.strip()
    if not text:
        return []
    if text.startswith("stun:"):
        raw = [{"urls": [text]}]
    else:
        if not text.startswith(("[", "{", '"')):
            path = Path(text)
            if not path.is_file():
                raise IceConfigError(f"not JSON, a stun: URL or a file: {text[:80]!r}")
            text = _read_text(path)
        try:
            raw = json.loads(text)
        except (ValueError, RecursionError) as e:  # (lists nested thousands deep: a traceback)
            raise IceConfigError(f"not valid JSON: {str(e)[:200]}") from None
        raw = [raw] if isinstance(raw, dict) else raw
        if not isinstance(raw, list):
            raise IceConfigError('expected a JSON list of {"urls": ..., "username": ..., "credential": ...}')
    return [_checked(i, entry) for i, entry in enumerate(raw)]


def _read_text(path: Path) -> str:
    """A file's text in UTF-8 (a byte-order mark allowed) or UTF-16 with its mark, as PowerShell's `>`
    writes it (its 0xff 0xfe was a UnicodeDecodeError's traceback)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise IceConfigError(f"cannot read {path}: {e.strerror or e}") from None
    encoding = "utf-16" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig"
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        raise IceConfigError(f"{path}: not UTF-8 or UTF-16 text ({e.reason} at byte {e.start})") from None


def _checked(i: int, entry) -> dict:
    where = f"ICE server {i + 1}"
    if not isinstance(entry, dict) or "urls" not in entry:
        raise IceConfigError(f"{where}: expected an object with 'urls'")
    unknown = set(entry) - {"urls", "username", "credential", "secret", "ttl"}
    if unknown:
        raise IceConfigError(
            f"{where}: unknown key {sorted(unknown)[0]!r} (urls, username, credential, secret, ttl)"
        )
    urls = entry["urls"] if isinstance(entry["urls"], list) else [entry["urls"]]
    if not urls or not all(isinstance(u, str) for u in urls):
        raise IceConfigError(f"{where}: 'urls' must be a URL or a non-empty list of them")
    for url in urls:
        m = _URL.match(url)
        if m is None and "@" in url:  # (RFC 7065 has no user part: its host was taken as "user@host")
            raise IceConfigError(
                f"{where}: {url[:80]!r}: a stun:/turn: URL names no user; give 'username' and "
                "'credential' beside 'urls'"
            )
        if m is None:
            raise IceConfigError(
                f"{where}: {url[:80]!r} is not a stun:, turn: or turns: URL the server can use"
            )
        if m["scheme"] == "stun" and m["transport"]:
            raise IceConfigError(f"{where}: {url!r}: a stun: URL takes no transport")
        if m["scheme"] == "turns" and m["transport"] == "udp":
            raise IceConfigError(f"{where}: {url!r}: turns: runs over TCP only")
        if m["port"] and not 0 < int(m["port"]) < 65536:
            raise IceConfigError(f"{where}: {url!r}: port out of range")
    out = {"urls": list(urls)}
    if "secret" in entry or "ttl" in entry:
        return out | _checked_secret(where, entry, urls)
    if any(u.startswith("turn") for u in urls):
        for key in ("username", "credential"):
            if not isinstance(entry.get(key), str) or not entry[key]:
                raise IceConfigError(f"{where}: a TURN server needs a '{key}'")
    given = [key for key in ("username", "credential") if key in entry]
    for key in given:  # (a username alone, or a number, was a 500 for every WHEP offer)
        if not isinstance(entry[key], str):
            raise IceConfigError(f"{where}: its '{key}' must be a string, not {entry[key]!r}")
        out[key] = entry[key]
    if len(given) == 1:
        other = "credential" if given == ["username"] else "username"
        raise IceConfigError(f"{where}: a '{given[0]}' needs its '{other}'")
    return out


def _checked_secret(where: str, entry: dict, urls: list[str]) -> dict:
    """A TURN entry with a shared secret: its `secret` and `ttl`, which stay in the server."""
    if not isinstance(entry.get("secret"), str) or not entry["secret"]:
        raise IceConfigError(
            f"{where}: 'secret' must be a non-empty string (the TURN server's shared secret)"
        )
    if "username" in entry or "credential" in entry:
        raise IceConfigError(
            f"{where}: a 'secret' makes each session's username and credential: give one or the other"
        )
    if not all(u.startswith("turn") for u in urls):
        raise IceConfigError(
            f"{where}: a 'secret' is for TURN URLs only: give the STUN URLs an entry of their own"
        )
    ttl = entry.get("ttl", DEFAULT_TTL)
    if not isinstance(ttl, int) or isinstance(ttl, bool) or ttl <= 0:
        raise IceConfigError(f"{where}: 'ttl' must be a whole number of seconds > 0")
    return {"secret": entry["secret"], "ttl": ttl}


def turn_rest_credential(secret: str, name: str, ttl: int, now: float | None = None) -> tuple[str, str]:
    """(username, credential) of the TURN REST API scheme: good until now + ttl for `name`."""
    expires = int(time.time() if now is None else now) + ttl
    username = f"{expires}:{name}"
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return username, base64.b64encode(digest).decode()


def for_peer(servers: list[dict], name: str, now: float | None = None) -> list[dict]:
    """The list as one peer gets it (a session's client, or the server's peer connection for
    it): each entry with a secret in its place gets a credential of its own for `name`; no
    secret is in what comes back."""
    out = []
    for server in servers:
        if "secret" in server:
            ttl = server.get("ttl", DEFAULT_TTL)  # a list not made by parse_ice_servers may lack it
            username, credential = turn_rest_credential(server["secret"], name, ttl, now)
            server = {"urls": server["urls"], "username": username, "credential": credential}
        out.append(server)
    return out


def server_side(servers: list[dict]) -> list[dict]:
    """What the server's own peer connections gather with: aiortc uses one STUN and one TURN
    URL, the first of each (the clients get the whole list)."""
    picked, schemes = [], set()
    for server in servers:
        for url in server["urls"]:
            kind = "stun" if url.startswith("stun") else "turn"
            if kind not in schemes:
                schemes.add(kind)
                picked.append({**server, "urls": [url]})
    return picked


def link_header(servers: list[dict]) -> str | None:
    """The WHEP answer's `Link` header value: one link-value per URL (RFC 9725, 4.6)."""

    def quoted(value: str) -> str:
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'

    links = []
    for server in servers:
        for url in server["urls"]:
            link = f'<{url}>; rel="ice-server"'
            if "username" in server:
                link += f"; username={quoted(server['username'])}; credential={quoted(server['credential'])}"
                link += '; credential-type="password"'
            links.append(link)
    return ", ".join(links) or None


async def stun_answers(url: str, timeout: float = 2.0) -> bool:
    """Whether the STUN server at `url` answers a binding request within `timeout` seconds."""
    from aioice import stun

    m = _URL.match(url)
    loop = asyncio.get_running_loop()
    reply: asyncio.Future = loop.create_future()

    class Client(asyncio.DatagramProtocol):
        def datagram_received(self, data, addr):
            if not reply.done():
                reply.set_result(data)

        def error_received(self, exc):  # e.g. ICMP port unreachable
            if not reply.done():
                reply.set_exception(exc)

    try:
        transport, _ = await loop.create_datagram_endpoint(
            Client, remote_addr=(m["host"], int(m["port"] or 3478))
        )
    except OSError:  # a name that does not resolve, no route
        return False
    try:
        request = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
        transport.sendto(bytes(request))
        answer = stun.parse_message(await asyncio.wait_for(reply, timeout))
        return answer.transaction_id == request.transaction_id
    except (TimeoutError, OSError, ValueError):
        return False
    finally:
        transport.close()


async def warn_if_ice_servers_fail(servers: list[dict]) -> None:
    """At startup: a STUN or TURN server that does not answer holds every WebRTC answer up by 5 s
    (aioice waits that long for it while gathering), and a TURN server that refuses the
    credential gives no relay (a peer that needs one cannot connect): say so once, in the log.
    TURN's went unsaid: each answer took 5 s, or had no relay, with nothing logged."""
    for server in server_side(for_peer(servers, "startup-check")):
        url = server["urls"][0]
        if url.startswith("stun:") and not await stun_answers(url):
            log.warning("STUN server %s did not answer: every WebRTC answer will wait 5 s for it "
                        "(check --ice-servers)", url)  # fmt: skip
        elif url.startswith("turn") and (problem := await turn_problem(server)):
            log.warning("TURN server %s gives no relay (%s): a peer that needs one cannot connect%s "
                        "(check --ice-servers)", url, problem,
                        ", and every WebRTC answer will wait 5 s for it" if "no answer" in problem else "")  # fmt: skip


async def turn_problem(server: dict, timeout: float = 5.0) -> str | None:
    """Why the TURN server of `server` (its first URL, with its username and credential) allocates
    no relay, or None where it does."""
    from aioice import stun
    from aioice.turn import create_turn_endpoint

    m = _URL.match(server["urls"][0])
    transport = m["transport"] or ("tcp" if m["scheme"] == "turns" else "udp")
    address = (m["host"], int(m["port"] or (5349 if m["scheme"] == "turns" else 3478)))
    try:
        relay, _ = await asyncio.wait_for(
            create_turn_endpoint(asyncio.DatagramProtocol, address, server.get("username"), server.get("credential"),
                                 transport=transport, ssl=m["scheme"] == "turns"),
            timeout,
        )  # fmt: skip
    except (TimeoutError, stun.TransactionTimeout):
        return f"no answer within {timeout:g} s"
    except stun.TransactionFailed as e:  # (401: the username or credential)
        return f"it refused the allocation: {e}"
    except (OSError, ValueError) as e:  # a name that does not resolve, a connection refused
        return f"no answer: {e}"
    relay.close()
    return None
