"""`serve --ice-servers`: STUN/TURN for the server's peer connections and its clients."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection
from server_helpers import live_server

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
    ],
)
def test_a_list_the_server_cannot_use_is_refused_with_its_reason(text, says):
    with pytest.raises(IceConfigError, match=says):
        parse_ice_servers(text)


def test_serve_refuses_a_bad_list_before_starting():
    from streamgen.cli import main

    assert main(["serve", "--ice-servers", '[{"urls": "turn:x"}]']) == 2


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


async def post_offer(http: httpx.AsyncClient, path: str, token: str | None = None) -> httpx.Response:
    """A receive-only WHEP offer from an aiortc client, posted to `path`: the server's answer."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("video", direction="recvonly")
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
    from server.ice import stun_answers, warn_if_stun_is_silent

    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(StunServer, local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    try:
        assert await stun_answers(f"stun:127.0.0.1:{port}")
        with caplog.at_level("WARNING", logger="streamgen.server"):
            await warn_if_stun_is_silent([{"urls": [f"stun:127.0.0.1:{port}"]}])
            assert caplog.records == []
    finally:
        transport.close()
    # the port is closed now: nobody answers
    assert not await stun_answers(f"stun:127.0.0.1:{port}", timeout=0.5)
    assert not await stun_answers("stun:name.that.does.not.resolve.invalid", timeout=0.5)
    with caplog.at_level("WARNING", logger="streamgen.server"):
        await warn_if_stun_is_silent([{"urls": [f"stun:127.0.0.1:{port}"]}])
    assert "did not answer" in caplog.text


async def test_the_server_relays_through_a_turn_server_with_its_credentials():
    """With a TURN server in the list, the answer offers a relay candidate: the server allocated
    one with the configured username and credential (coturn on 127.0.0.1)."""
    from server_helpers import turn_server

    with turn_server() as turn, live_server(ice_servers=[turn]) as (url, _):
        async with httpx.AsyncClient(base_url=url, timeout=20) as http:
            r = await post_offer(http, "/v1/whep")
    assert r.status_code == 201, r.text
    assert [line for line in r.text.splitlines() if "typ relay" in line], r.text
