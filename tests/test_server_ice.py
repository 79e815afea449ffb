"""`serve --ice-servers`: STUN/TURN for the server's peer connections and its clients."""

from __future__ import annotations

import asyncio
import json
import socket

import httpx
import pytest
from server_helpers import a_port_nobody_answers_on, client_peer, live_server

from server.ice import IceConfigError, link_header, parse_ice_servers, server_side

TURN = {"urls": ["turn:turn.example.org:3478?transport=udp", "turns:turn.example.org:443"], "username": "u",
        "credential": 'p"w'}  # fmt: skip


def test_the_forms_an_operator_can_give(tmp_path):
    assert parse_ice_servers("") == []
    assert parse_ice_servers("stun:stun.example.org:3478") == [{"urls": ["stun:stun.example.org:3478"]}]
    inline = json.dumps([{"urls": "stun:stun.example.org"}, TURN])
    assert parse_ice_servers(inline) == [{"urls": ["stun:stun.example.org"]}, TURN]
    assert parse_ice_servers(json.dumps(TURN)) == [TURN]  # one object
    path = tmp_path / "ice.json"
    path.write_text(inline)
    assert parse_ice_servers(str(path)) == parse_ice_servers(inline)
    # as PowerShell's `>` writes it (UTF-16, a UnicodeDecodeError's traceback), and with a UTF-8 mark
    for encoding in ("utf-16", "utf-8-sig"):
        path.write_text(inline, encoding=encoding)
        assert parse_ice_servers(str(path)) == parse_ice_servers(inline), encoding
    path.write_bytes(b"\x81[]")
    with pytest.raises(IceConfigError, match="not UTF-8 or UTF-16 text"):
        parse_ice_servers(str(path))


@pytest.mark.parametrize(
    "text, says",
    [
        ("nope.json", "not JSON, a stun: URL or a file"),
        ("[{", "not valid JSON"),
        ('"stun:x"', "expected a JSON list"),
        ('[{"url": "stun:x"}]', "ICE server 1: expected an object with 'urls'"),
        ('[{"urls": []}]', "non-empty list"),
        ('[{"urls": "http://x"}]', "not a stun:, turn: or turns: URL"),
        ('[{"urls": "stun:x?transport=tcp"}]', "takes no transport"),
        ('[{"urls": "turns:x?transport=udp", "username": "u", "credential": "p"}]', "TCP only"),
        ('[{"urls": "stun:x:70000"}]', "port out of range"),
        ('[{"urls": "stun:x"}, {"urls": "turn:x"}]', "ICE server 2: a TURN server needs a 'username'"),
        ('[{"urls": "stun:x", "credentialType": "oauth"}]', "unknown key 'credentialType'"),
        ('[{"urls": "turn:x", "secret": ""}]', "'secret' must be a non-empty string"),
        ('[{"urls": "turn:x", "ttl": 60}]', "'secret' must be a non-empty string"),
        ('[{"urls": "turn:x", "secret": "s", "username": "u"}]', "give one or the other"),
        ('[{"urls": ["turn:x", "stun:x"], "secret": "s"}]', "for TURN URLs only"),
        ('[{"urls": "turn:x", "secret": "s", "ttl": 0}]', "'ttl' must be a whole number"),
        ('[{"urls": "turn:x", "secret": "s", "ttl": "1d"}]', "'ttl' must be a whole number"),
        # every WHEP answer was a 500 (a KeyError, an AttributeError), its session left open
        ('[{"urls": "stun:x", "username": "u"}]', "ICE server 1: a 'username' needs its 'credential'"),
        ('[{"urls": "stun:x", "username": 1, "credential": "p"}]', "its 'username' must be a string, not 1"),
        ("[" * 100_000, "not valid JSON"),  # (a RecursionError's traceback)
        # (its host was taken as "u@relay.example.org": the start-up's check warned of that name)
        ('[{"urls": "turn:u@relay.example.org", "username": "u", "credential": "p"}]', "names no user"),
        ("stun:u@relay.example.org", "names no user"),
    ],
)
def test_a_list_the_server_cannot_use_is_refused_with_its_reason(text, says):
    with pytest.raises(IceConfigError, match=says):
        parse_ice_servers(text)


def test_serve_refuses_a_bad_list_before_starting():
    from streamgen.cli import main

    assert main(["serve", "--port", "0", "--ice-servers", '[{"urls": "turn:x"}]']) == 2  # (refused before it binds)


def test_serve_refuses_a_turn_secrets_ttl_shorter_than_a_session(capsys):
    from streamgen.cli import main

    short = '[{"urls": "turn:x", "secret": "s", "ttl": 600}]'
    assert main(["serve", "--port", "0", "--ice-servers", short, "--max-duration", "900"]) == 2
    assert "'ttl' 600 s is shorter than --max-duration 900 s" in capsys.readouterr().err


def test_the_server_gathers_with_one_stun_and_one_turn_url_and_clients_get_them_all():
    servers = parse_ice_servers(json.dumps([{"urls": ["stun:a", "stun:b"]}, TURN]))
    assert server_side(servers) == [{"urls": ["stun:a"]}, {**TURN, "urls": [TURN["urls"][0]]}]
    assert link_header(servers) == (
        '<stun:a>; rel="ice-server", <stun:b>; rel="ice-server", '
        '<turn:turn.example.org:3478?transport=udp>; rel="ice-server"; username="u"; credential="p\\"w"; '
        'credential-type="password", <turns:turn.example.org:443>; rel="ice-server"; username="u"; '
        'credential="p\\"w"; credential-type="password"'
    )
    assert link_header([]) is None


def test_a_turn_secret_gives_each_peer_a_credential_of_its_own_and_stays_in_the_server():
    from server.ice import DEFAULT_TTL, for_peer, turn_rest_credential

    # the scheme coturn checks (--use-auth-secret); the expected value from openssl:
    # echo -n "1733270400:s-3f2a" | openssl dgst -sha1 -hmac north-wind -binary | base64
    assert turn_rest_credential("north-wind", "s-3f2a", ttl=600, now=1733269800.7) == (
        "1733270400:s-3f2a",
        "3CksuX5UTE02VjBTjiXL/zXoo94=",
    )
    stun = {"urls": ["stun:a"]}
    servers = parse_ice_servers(json.dumps([stun, {"urls": "turn:t:3478", "secret": "north-wind"}, TURN]))
    assert servers[1] == {"urls": ["turn:t:3478"], "secret": "north-wind", "ttl": DEFAULT_TTL}
    one, other = for_peer(servers, "s-1", now=1000), for_peer(servers, "s-2", now=1000)
    assert one[0] == stun and one[2] == TURN  # the others as they were
    assert one[1]["username"] == f"{1000 + DEFAULT_TTL}:s-1"
    assert one[1]["credential"] != other[1]["credential"]
    assert "north-wind" not in json.dumps(one) + link_header(one)
    assert set(one[1]) == {"urls", "username", "credential"}


async def post_offer(http: httpx.AsyncClient, path: str, token: str | None = None) -> httpx.Response:
    """A receive-only WHEP offer from an aiortc client, posted to `path`: the server's answer."""
    pc = client_peer("video")
    await pc.setLocalDescription(await pc.createOffer())
    headers = {"content-type": "application/sdp"} | ({"authorization": f"Bearer {token}"} if token else {})
    try:
        return await http.post(path, content=pc.localDescription.sdp, headers=headers)
    finally:
        await pc.close()


class StunServer(asyncio.DatagramProtocol):
    """Answers STUN binding requests on 127.0.0.1 with a public address, as a NAT's would be."""

    PUBLIC = "203.0.113.7"

    def connection_made(self, transport):
        self.transport, self.requests = transport, 0

    def datagram_received(self, data, addr):
        from aioice import stun

        request = stun.parse_message(data)
        self.requests += 1
        response = stun.Message(request.message_method, stun.Class.RESPONSE, request.transaction_id)
        response.attributes["XOR-MAPPED-ADDRESS"] = (self.PUBLIC, addr[1])
        self.transport.sendto(bytes(response), addr)


async def test_the_answer_carries_the_servers_public_address_and_the_clients_get_the_list():
    loop = asyncio.get_running_loop()
    transport, stun_server = await loop.create_datagram_endpoint(StunServer, local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    stun = {"urls": [f"stun:127.0.0.1:{port}"]}
    try:
        with live_server(ice_servers=[stun]) as (url, _):
            async with httpx.AsyncClient(base_url=url, timeout=20) as http:
                created = (await http.post("/v1/sessions", json={})).json()
                assert created["ice_servers"] == [stun]
                r = await post_offer(http, created["whep"], created["token"])
        assert r.status_code == 201, r.text
        assert r.headers["link"] == f'<stun:127.0.0.1:{port}>; rel="ice-server"'
        assert stun_server.requests >= 1
        srflx = [line for line in r.text.splitlines() if "typ srflx" in line]
        assert srflx and StunServer.PUBLIC in srflx[0] and "raddr 127.0.0.1" in srflx[0]
    finally:
        transport.close()


async def test_without_ice_servers_nothing_changes():
    with live_server() as (url, _):
        async with httpx.AsyncClient(base_url=url, timeout=20) as http:
            created = (await http.post("/v1/sessions", json={})).json()
            assert created["ice_servers"] == []
            r = await post_offer(http, created["whep"], created["token"])
    assert r.status_code == 201 and "link" not in r.headers and "typ srflx" not in r.text


async def test_a_silent_stun_server_is_reported_at_startup(caplog):
    from server.ice import stun_answers, warn_if_ice_servers_fail

    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(StunServer, local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    try:
        assert await stun_answers(f"stun:127.0.0.1:{port}")
        with caplog.at_level("WARNING", logger="streamgen.server"):
            await warn_if_ice_servers_fail([{"urls": [f"stun:127.0.0.1:{port}"]}])
            assert caplog.records == []
    finally:
        transport.close()
    # the port is closed now: nobody answers
    assert not await stun_answers(f"stun:127.0.0.1:{port}", timeout=0.5)
    assert not await stun_answers("stun:name.that.does.not.resolve.invalid", timeout=0.5)
    with caplog.at_level("WARNING", logger="streamgen.server"):
        await warn_if_ice_servers_fail([{"urls": [f"stun:127.0.0.1:{port}"]}])
    assert "did not answer" in caplog.text


async def test_a_turn_server_that_gives_no_relay_is_reported_at_startup(caplog):
    """Only STUN was checked: an unreachable TURN server added 5 s to every WebRTC answer, and a
    wrong credential left every answer without a relay, with nothing in the log."""
    from server_helpers import turn_server

    from server.ice import for_peer, turn_problem, warn_if_ice_servers_fail

    with turn_server() as turn, turn_server(secret="s3cret") as by_secret:
        assert await turn_problem(turn) is None
        assert await turn_problem(for_peer([by_secret], "check")[0]) is None
        with caplog.at_level("WARNING", logger="streamgen.server"):
            await warn_if_ice_servers_fail([turn, by_secret])
        assert caplog.records == []
        wrong = {**turn, "credential": "not-it"}
        assert "it refused the allocation" in await turn_problem(wrong)
        with caplog.at_level("WARNING", logger="streamgen.server"):
            await warn_if_ice_servers_fail([wrong])
        assert "gives no relay (it refused the allocation" in caplog.text
    with a_port_nobody_answers_on(socket.SOCK_DGRAM) as port:
        nobody = {**turn, "urls": [f"turn:127.0.0.1:{port}?transport=udp"]}
        assert (await turn_problem(nobody, timeout=1.0)).startswith("no answer")


async def test_the_server_relays_through_a_turn_server_with_its_credentials():
    """With a TURN server in the list, the answer offers a relay candidate: the server allocated
    one with the configured username and credential (coturn on 127.0.0.1)."""
    from server_helpers import turn_server

    with turn_server() as turn, live_server(ice_servers=[turn]) as (url, _):
        async with httpx.AsyncClient(base_url=url, timeout=20) as http:
            r = await post_offer(http, "/v1/whep")
    assert r.status_code == 201, r.text
    assert [line for line in r.text.splitlines() if "typ relay" in line], r.text


async def test_the_server_relays_with_a_credential_made_from_the_turn_secret():
    """coturn with a shared secret (--use-auth-secret): the server's peer connection allocates a
    relay with the credential it made for the session, and none where its secret is not the TURN
    server's; the client gets a credential of its own, never the secret."""
    from server_helpers import turn_server

    with turn_server(secret="north-wind") as turn:
        for secret, relays in (("north-wind", True), ("south-wind", False)):
            with live_server(ice_servers=[{**turn, "secret": secret, "ttl": 600}]) as (url, _):
                async with httpx.AsyncClient(base_url=url, timeout=20) as http:
                    created = (await http.post("/v1/sessions", json={})).json()
                    r = await post_offer(http, created["whep"], created["token"])
            assert r.status_code == 201, r.text
            relay = [line for line in r.text.splitlines() if "typ relay" in line]
            assert bool(relay) == relays, (secret, r.text)
            (given,) = created["ice_servers"]
            assert given["urls"] == turn["urls"] and given["username"].endswith(f":{created['id']}")
            assert secret not in json.dumps(created) + r.headers["link"]


async def test_a_turn_server_whose_port_was_taken_before_it_listened_starts_on_another(monkeypatch):
    """turn_server (the tests' coturn) chose a free TCP port and let it go for coturn to listen on
    (UDP and TCP): a socket of another test process that held the port by then, or took it
    meanwhile (aioice's UDP candidates, on a loaded CI machine), left coturn retrying its bind for
    good, and the test failed ('coturn did not start'). Here a UDP socket takes the port just
    before coturn starts: it starts on another, and allocates a relay there."""
    import socket
    import subprocess

    from server_helpers import TURNSERVER, turn_server

    from server.ice import turn_problem

    taken, popen = [], subprocess.Popen

    def popen_after_another_took_the_port(args, *rest, **options):
        if args[0] == TURNSERVER and not taken:
            port = int(next(a for a in args if a.startswith("--listening-port=")).split("=")[1])
            other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            other.bind(("127.0.0.1", port))
            taken.append(other)
        return popen(args, *rest, **options)

    monkeypatch.setattr(subprocess, "Popen", popen_after_another_took_the_port)
    try:
        with turn_server() as turn:
            assert f":{taken[0].getsockname()[1]}?" not in turn["urls"][0]
            assert await turn_problem(turn) is None
    finally:
        for other in taken:
            other.close()


@pytest.mark.parametrize("kind", [socket.SOCK_STREAM, socket.SOCK_DGRAM], ids=["tcp", "udp"])
def test_a_port_nobody_answers_on_is_held_from_other_sockets(kind):
    """The tests' port of no server (a TURN server nobody runs, a stream URL nothing listens at) came
    from free_port, let go at once: a server of another test process could take it and answer.
    a_port_nobody_answers_on holds it: another socket cannot bind it, with SO_REUSEADDR (as uvicorn
    and coturn bind) or without, and a TCP connection to it is refused."""
    with a_port_nobody_answers_on(kind) as port:
        for reuse in (0, 1):
            with socket.socket(socket.AF_INET, kind) as other:
                other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, reuse)
                with pytest.raises(OSError, match="in use"):
                    other.bind(("127.0.0.1", port))
        if kind == socket.SOCK_STREAM:
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", port), timeout=10).close()
