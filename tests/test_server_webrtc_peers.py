"""WebRTC (WHEP) peers that go away without a word, stall or reconnect: the silence watch
(--peer-timeout) that frees a killed tab's session, and keeps a live player's."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from aiortc import RTCPeerConnection
from server_helpers import client_peer, live_server, streaming_peer

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def server():
    with live_server(max_sessions=4) as (url, app):
        yield url, app


def client_sockets(pc: RTCPeerConnection) -> list:
    """The UDP sockets of a client's ICE agent (every transceiver's: bundled, they share one)."""
    sockets = {}
    for transceiver in pc.getTransceivers():
        connection = transceiver.receiver.transport.transport.iceGatherer._connection
        sockets |= {id(p.transport): p.transport for p in connection._protocols if p.transport is not None}
    return list(sockets.values())


async def streaming_client(http: httpx.AsyncClient, mic: bool = False):
    """A WHEP client that has decoded a frame: (session id, its peer connection, its video track)."""
    pc = client_peer("video")
    if mic:  # a microphone that is on: 50 RTP packets a second towards the server
        from aiortc.mediastreams import AudioStreamTrack

        pc.addTrack(AudioStreamTrack())
    created, _, pc, track = await streaming_peer(http, pc)
    return created["id"], pc, track


async def until_closed(session, seconds: float = 10.0) -> None:
    """Waits (bounded: `seconds`) for the server to close `session`."""
    for _ in range(int(seconds * 10)):
        if session.closed:
            return
        await asyncio.sleep(0.1)


@pytest.fixture
async def watch_on_the_clients_time(monkeypatch):
    """The silence watch sleeps between its reads on the test's event loop, the client's, where the
    client's RTCP timer runs: a client there that the loaded machine holds up (a loop busy
    decoding, a thread not run) holds up the reads as much as its reports, as its own machine
    would. On the server's loop, the reports (0.5 to 1.5 s apart) came more than the 2 s timeout
    apart in the server's time when the client's loop lagged, and a live peer was called silent."""
    import functools

    import server.webrtc as webrtc

    client_loop = asyncio.get_running_loop()

    async def sleep(seconds: float) -> None:  # (on the server's loop)
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(asyncio.sleep(seconds), client_loop))

    monkeypatch.setattr(webrtc, "watch_peer", functools.partial(webrtc.watch_peer, sleep=sleep))


async def test_a_peer_killed_without_a_word_frees_its_session_once_it_falls_silent(server, watch_on_the_clients_time):
    """A killed tab sends no DELETE and no DTLS close: its session held a slot until aioice's ICE
    consent checks gave up, about 30 s (measured 29.8 and 31.3 s after a client was SIGKILLed).
    Now a peer that sent packets (its RTCP receiver reports, its microphone) and then nothing
    for --peer-timeout seconds is closed. The client here stops as a killed process does: its
    sockets close, with nothing sent."""
    url, app = server
    registry = app.state.registry
    registry.config.peer_timeout_s = 2.0  # read by each offer
    try:
        async with httpx.AsyncClient(base_url=url, timeout=20) as http:
            session_id, pc, track = await streaming_client(http)
            session = registry.sessions[session_id]
            for _ in range(30):  # a while of healthy streaming, past the timeout: it stays
                await asyncio.wait_for(track.recv(), 10)
            await asyncio.sleep(2.5)
            assert not session.closed, session.close_reason
            for sock in client_sockets(pc):
                sock.abort()  # no DTLS close_notify, no consent answers, no RTCP from here on
            await until_closed(session, 20.0)  # (aioice's consent checks would take 24-36 s)
            assert session.closed and session.close_reason.startswith("peer_silent"), session.close_reason
            assert session_id not in registry.sessions
            await pc.close()
    finally:
        registry.config.peer_timeout_s = 10.0


async def test_a_peer_that_stalls_for_less_than_the_timeout_keeps_its_session(server, watch_on_the_clients_time):
    """A network hiccup is not a killed tab: a client whose packets stop for a second, then flow
    again, keeps streaming with a 3 s --peer-timeout."""
    url, app = server
    registry = app.state.registry
    registry.config.peer_timeout_s = 3.0
    try:
        async with httpx.AsyncClient(base_url=url, timeout=20) as http:
            session_id, pc, track = await streaming_client(http, mic=True)
            session = registry.sessions[session_id]
            sockets = client_sockets(pc)
            for sock in sockets:  # every packet the client sends is lost for a second
                sock.sendto = lambda *args, **kwargs: None
            await asyncio.sleep(1.0)
            for sock in sockets:
                del sock.sendto  # (the instance's, over its class's)
            for _ in range(100):  # 4 s of video: past the timeout, counted from the stall
                await asyncio.wait_for(track.recv(), 10)
            assert not session.closed, session.close_reason
            await pc.close()  # (DTLS close: the server closes the session)
            await until_closed(session)
    finally:
        registry.config.peer_timeout_s = 10.0


async def test_a_live_player_that_sends_no_rtcp_is_not_taken_for_a_silent_one(server, monkeypatch):
    """A player with no RTCP and no microphone sends the server nothing but STUN, which the count
    does not hold: the watch is never armed for it (it stays with ICE consent), so it keeps
    streaming past --peer-timeout. Armed at `connected`, it would be closed while it watches."""
    from aiortc.rtcrtpreceiver import RTCRtpReceiver

    from server.webrtc import packets_received

    async def send_no_rtcp(receiver, packet):
        return None

    url, app = server
    registry = app.state.registry
    registry.config.peer_timeout_s = 1.0
    monkeypatch.setattr(RTCRtpReceiver, "_send_rtcp", send_no_rtcp)  # the client's: no receiver reports
    try:
        async with httpx.AsyncClient(base_url=url, timeout=20) as http:
            session_id, pc, track = await streaming_client(http)
            session = registry.sessions[session_id]
            counted = await packets_received(session.trickle.pc)
            for _ in range(75):  # 3 s of video: three times the timeout
                await asyncio.wait_for(track.recv(), 10)
            assert await packets_received(session.trickle.pc) == counted  # nothing that arms it
            assert not session.closed, session.close_reason
            await pc.close()
            await until_closed(session)
    finally:
        registry.config.peer_timeout_s = 10.0


def test_silence_is_counted_in_reads_once_the_peer_has_sent():
    from server.webrtc import SilenceWatch

    watch = SilenceWatch(timeout=3.0, period=1.0)
    # a peer that sends nothing once connected is left to ICE consent
    assert not any(watch.observe(5) for _ in range(10))
    assert not watch.observe(6)  # its first packet arms the watch
    assert [watch.observe(6) for _ in range(3)] == [False, False, True]
    watch = SilenceWatch(timeout=3.0, period=1.0)
    counts = [1, 2, 2, 2, 3, 3, 3, 4]  # still for two reads at a time: never three
    assert not any(watch.observe(c) for c in counts)
    assert SilenceWatch(timeout=2.0, period=0.5).reads_needed == 4


async def test_a_peer_that_reconnects_keeps_one_silence_watch(server, monkeypatch):
    """connected -> disconnected -> connected (a network change ICE recovers from) started a second
    watch while the first, asleep between its reads, had not yet seen the disconnect: two stats
    pollers and two timers for one peer. The watch running then goes on watching."""
    import server.webrtc as webrtc

    started = []

    async def counted_watch(*args):
        started.append(args)
        await original(*args)

    original = webrtc.watch_peer
    monkeypatch.setattr(webrtc, "watch_peer", counted_watch)
    url, app = server
    registry = app.state.registry
    registry.config.peer_timeout_s = 10.0  # (a read a second: the first watch sleeps through the flip)
    async with httpx.AsyncClient(base_url=url, timeout=20) as http:
        session_id, pc, track = await streaming_client(http)
        session = registry.sessions[session_id]
        server_pc = session.trickle.pc
        assert len(started) == 1

        async def flip() -> int:  # on the server's event loop
            for state in ("disconnected", "connected"):
                server_pc._RTCPeerConnection__connectionState = state
                server_pc.emit("connectionstatechange")
                for _ in range(5):  # (the handler is a coroutine: it runs on the loop's next turns)
                    await asyncio.sleep(0)
            return sum(t.get_coro().__name__ == "counted_watch" for t in asyncio.all_tasks() if not t.done())

        running = await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(flip(), session.loop))
        assert (running, len(started)) == (1, 1)
        assert not session.closed, session.close_reason
        await pc.close()  # (DTLS close: the server closes the session)
        await until_closed(session)


async def test_a_peer_is_waited_for_while_its_first_chunk_is_slow(server, monkeypatch):
    """streaming_peer (the tests' WHEP client) gave a peer 10 s to decode its first frame: on the
    loaded CI machine it came later, and the test failed (TimeoutError). Here the peer's first
    chunk takes longer than that: it is waited for, its connection up all along."""
    import threading
    import time

    from streamgen.stream import StreamSession

    next_chunk, slowed = StreamSession.next_chunk, threading.Event()

    def first_chunk_slow(self, *args, **kwargs):
        if not slowed.is_set():
            slowed.set()
            time.sleep(12)
        return next_chunk(self, *args, **kwargs)

    monkeypatch.setattr(StreamSession, "next_chunk", first_chunk_slow)
    url, _ = server
    async with httpx.AsyncClient(base_url=url, timeout=20) as http:
        _, pc, _ = await streaming_client(http)
        await pc.close()
    assert slowed.is_set()


async def test_a_first_chunk_ready_after_its_play_time_is_played_when_generation_is_slow(server, monkeypatch):
    """A first chunk ready after its play time (the lane busy, the machine loaded) was skipped by
    the video, which starts at the present, as was every chunk after it until generation caught
    up: where a chunk took longer than it plays, never. The viewer saw no frame, and the session
    was closed as idle ('no input') with its player waiting (this file's tests, on a loaded
    machine). The first chunk plays when it is ready, the clock moved to it."""
    import threading
    import time

    from streamgen.stream import StreamSession

    next_chunk, first = StreamSession.next_chunk, threading.Event()

    def late_then_slower_than_played(self, *args, **kwargs):
        time.sleep(0.5 if first.is_set() else 3.0)  # (a chunk plays 0.32 s)
        first.set()
        return next_chunk(self, *args, **kwargs)

    monkeypatch.setattr(StreamSession, "next_chunk", late_then_slower_than_played)
    url, app = server
    registry = app.state.registry
    registry.config.idle_timeout_s = 8.0  # (read by each check of the limits)
    try:
        async with httpx.AsyncClient(base_url=url, timeout=20) as http:
            session_id, pc, _ = await streaming_client(http)
            session = registry.sessions[session_id]
            assert not session.closed, session.close_reason
            await pc.close()
            await until_closed(session)
    finally:
        registry.config.idle_timeout_s = 30.0
