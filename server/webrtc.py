"""WebRTC in the WHEP style: POST an SDP offer, get the answer; DELETE the session resource to end.

Signalling is one round trip (the offer carries its candidates), or more with trickle ICE
(the player PATCHes the candidates it gathers later: server/trickle.py). The browser's microphone track drives the avatar; the server
sends back a video track of generated frames and an audio track with the speech
the lips were made from, both paced on the session's playout clock so they
leave together (the browser lines them up from the senders' RTCP reports).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fractions
import logging
import math

import av
import numpy as np
from aiortc import MediaStreamTrack, RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from aiortc.rtcconfiguration import RTCBundlePolicy
from aiortc.sdp import SessionDescription

from .ice import for_peer, server_side
from .offers import OfferError, check_offer
from .session import SAMPLE_RATE, Chunk, ChunkSlot, Session
from .trickle import TrickleIce

log = logging.getLogger("streamgen.server")

VIDEO_CLOCK = 90000
AUDIO_FRAME_SAMPLES = 320  # 20 ms at 16 kHz


async def answer_offer(session: Session, registry, sdp: str) -> str:
    """Create the peer connection for `session`, answer `sdp`, start streaming. OfferError on bad offers."""
    check_offer(sdp)
    # no STUN/TURN unless configured: aiortc's default (a public STUN server) would hold every
    # answer up for seconds where it cannot be reached
    servers = for_peer(registry.config.ice_servers, f"server-{session.id}")  # a TURN secret: a credential of its own
    ice = [RTCIceServer(**server) for server in server_side(servers)]
    # a transport for each m-line, then one for those the offer bundles: aiortc's default ("balanced")
    # made a second audio m-line share the first's transport, which the bundling then discarded
    # for the first alone (the second's sender never started: a speech m-line after a microphone's)
    pc = RTCPeerConnection(RTCConfiguration(iceServers=ice, bundlePolicy=RTCBundlePolicy.MAX_COMPAT))
    session.trickle = TrickleIce(pc, sdp)  # the player's later candidates (PATCH)
    slot = session.add_slot(on_drop=registry.metrics.dropped_chunks.inc)
    tasks: list[asyncio.Task] = []  # the microphone's reader, the silence watch, the connect deadline
    peer_timeout = registry.config.peer_timeout_s
    connected, negotiated = asyncio.Event(), asyncio.Event()
    microphones: list[MediaStreamTrack] = []  # the one the avatar hears
    watcher: asyncio.Task | None = None  # the silence watch: one per peer, however often it reconnects

    async def close_peer() -> None:
        for task in tasks:
            if task is not asyncio.current_task():  # (the silence watch closes the session itself)
                task.cancel()
        # after the answer is made: closed during it (a DELETE racing the offer), ICE opened its
        # socket after the close, which nothing closed again, and the offer was told its SDP was bad
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(negotiated.wait(), 10)
        await pc.close()

    session.on_close(close_peer)

    @pc.on("track")
    def on_track(track: MediaStreamTrack) -> None:
        # (in m-line order: the first is the one `take_no_media_but_one_microphone` keeps receiving)
        if track.kind == "audio" and not microphones:
            microphones.append(track)
            tasks.append(asyncio.ensure_future(consume_microphone(track, session)))

    @pc.on("connectionstatechange")
    async def on_state() -> None:
        nonlocal watcher
        log.debug("session %s: peer connection %s", session.id, pc.connectionState)
        if pc.connectionState == "connected":
            connected.set()
        live = watcher is not None and not watcher.done()  # (back from `disconnected` before it saw it)
        if pc.connectionState == "connected" and (peer_timeout or 0) > 0 and not session.closed and not live:
            watcher = asyncio.ensure_future(watch_peer(pc, session, registry, peer_timeout))
            tasks.append(watcher)
        if pc.connectionState in ("failed", "closed"):
            await registry.close(session, f"peer connection {pc.connectionState}")

    try:
        await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        pc.addTrack(AvatarVideoTrack(session, slot))
        speech = speech_m_line(sdp)
        if speech is not None:
            send_on(pc, speech, SpeechAudioTrack(session))
        take_no_media_but_one_microphone(pc, sdp)
        await pc.setLocalDescription(await pc.createAnswer())
    except Exception as e:  # aiortc rejects offers it cannot negotiate with assorted exceptions
        raise OfferError(f"offer could not be negotiated: {type(e).__name__}: {e}"[:200]) from None
    finally:
        negotiated.set()
    registry.start_streaming(session, "whep")  # (SessionEnded where it was closed meanwhile: a 404)
    deadline = close_unless_connected(connected, session, registry, CONNECT_DEADLINE_S)
    tasks.append(asyncio.ensure_future(deadline))
    return pc.localDescription.sdp


def speech_m_line(sdp: str) -> str | None:
    """The mid of the offer's first audio m-line the player receives on (recvonly, sendrecv), where
    the speech goes; None where it receives on none. aiortc's addTrack took the first audio m-line:
    a microphone's sendonly one before the player's recvonly one, answered recvonly, carried the
    speech nowhere, and the player heard none."""
    # (port 0 is no sign of a rejected m-line here: a bundle-only one has it, RFC 8843, and aiortc
    # answers every m-line whatever its port)
    for m in SessionDescription.parse(sdp).media:
        if m.kind == "audio" and (m.direction or "sendrecv") in ("recvonly", "sendrecv"):
            return m.rtp.muxId
    return None


def send_on(pc: RTCPeerConnection, mid: str, track: MediaStreamTrack) -> None:
    """Send `track` on the transceiver of m-line `mid` (as addTrack does on the first of its kind)."""
    transceiver = next(t for t in pc.getTransceivers() if t.mid == mid)
    transceiver.sender.replaceTrack(track)
    transceiver.direction = "sendrecv"  # (take_no_media_but_one_microphone takes back what it receives)


def take_no_media_but_one_microphone(pc: RTCPeerConnection, sdp: str) -> None:
    """Answer every m-line of the offer `sdp` as not receiving, but the first audio one that sends
    (the microphone). A camera the player offered was received, and aiortc decoded its every frame
    into a queue nothing read, for as long as the session lasted; a second microphone was read
    into the first's place on the timeline, each putting its samples after the other's."""
    sending = [m.rtp.muxId for m in SessionDescription.parse(sdp).media
               if m.kind == "audio" and (m.direction or "sendrecv") in ("sendrecv", "sendonly")]  # fmt: skip
    for transceiver in pc.getTransceivers():
        if sending and transceiver.mid == sending[0]:
            continue
        transceiver.direction = "sendonly" if transceiver.sender.track is not None else "inactive"


# a peer that has not connected by then never will: ICE's checks are over in seconds (through a
# TURN relay too), and aioice does not always call them failed
CONNECT_DEADLINE_S = 20.0


async def close_unless_connected(connected: asyncio.Event, session: Session, registry, deadline: float):
    """Close the session of a peer that has not connected `deadline` seconds after its answer: a
    tab closed right after its offer, a player that never applied the answer, UDP blocked (a
    container's TCP port alone published) held the session's place until the idle limit."""
    try:
        await asyncio.wait_for(connected.wait(), deadline)
    except TimeoutError:
        if not session.closed:
            await registry.close(session, f"never_connected: the peer did not connect within {deadline:g} s")


class SilenceWatch:
    """Whether a peer has gone silent, from the count of packets its transports received, read
    every `period` seconds: silent once the count has stood still for `timeout` seconds' worth
    of reads. Armed by the first packets after the first read (the connection is up by then):
    a peer that sends nothing once connected is left to the ICE consent checks. Its STUN (its
    consent checks, its answers to ours) is all that comes from such a peer, and aiortc and
    aioice count it nowhere a caller can read; armed at `connected`, a live player that sends
    no RTCP would be closed (docs/serving.md). Counted in
    reads, not wall time, so an event loop that stalls (the reads and the packets' handling
    wait alike) does not make a peer look silent."""

    def __init__(self, timeout: float, period: float):
        self.reads_needed = max(1, math.ceil(timeout / period - 1e-9))
        self.count: int | None = None
        self.armed = False
        self.still = 0  # reads since the count last moved

    def observe(self, count: int) -> bool:
        moved = self.count is not None and count > self.count
        self.armed = self.armed or moved
        self.still = 0 if moved or not self.armed else self.still + 1
        self.count = count
        return self.still >= self.reads_needed


async def packets_received(pc: RTCPeerConnection) -> int:
    """Every datagram the peer connection's DTLS transports took from ICE: DTLS, SRTP (the
    peer's microphone) and SRTCP (its receiver reports, sent every second or so by a player)."""
    return sum(s.packetsReceived for s in (await pc.getStats()).values() if s.type == "transport")


async def watch_peer(pc: RTCPeerConnection, session: Session, registry, timeout: float, sleep=asyncio.sleep) -> None:
    """Close the session of a peer that has gone silent for `timeout` seconds (`--peer-timeout`).

    A killed tab sends no DELETE and no DTLS close: ICE consent checks end its connection only
    after about 30 s (6 unanswered checks, 5 s apart), and the session held its slot until then.
    A connected player sends RTCP receiver reports about every second (and its microphone 50
    packets a second), so a few seconds without a packet is a peer that has gone. `sleep`: what
    it waits between its reads with (a test's peer in the server's process: on the peer's time)."""
    period = min(1.0, timeout / 4)
    watch = SilenceWatch(timeout, period)
    while not session.closed and pc.connectionState == "connected":
        if watch.observe(await packets_received(pc)):
            await registry.close(session, f"peer_silent: nothing from the peer for {timeout:g} s")
            return
        await sleep(period)


async def consume_microphone(track: MediaStreamTrack, session: Session) -> None:
    """Browser mic (Opus -> s16 48 kHz stereo, 20 ms frames) -> 16 kHz mono on the session timeline.

    A frame that cannot be converted is skipped (logged once), and a track that fails is logged:
    an exception that ended this task was reported by asyncio only once the task was collected,
    after its session, while the avatar stopped hearing the microphone."""
    to_timeline = MicResampler()
    failed = False
    while not session.closed:
        try:
            frame = await track.recv()
        except MediaStreamError:
            return  # the track ended: the peer connection closed
        except Exception:
            log.exception("session %s: microphone track failed; the avatar no longer hears it", session.id)
            return
        try:
            pcm = to_timeline.resample(frame)
        except Exception:
            if not failed:
                log.exception("session %s: a microphone frame could not be converted; skipping such frames",
                              session.id)  # fmt: skip
                failed = True
            continue
        for samples in pcm:
            session.timeline.append(samples, source="mic", live=True)
        session.touch()


class MicResampler:
    """Audio frames of any format -> float32 16 kHz mono, through a PyAV resampler made for the
    format of the frames it gets, and made again when that changes (a codec renegotiated mid-call,
    Opus's 48 kHz stereo to PCMU's 8 kHz mono). PyAV's resampler is set up by its first frame: it
    raises on a frame unlike that one, or, where the first needed no conversion, passes every
    later frame through unconverted."""

    def __init__(self):
        self.resampler: av.AudioResampler | None = None
        self.converts: tuple | None = None  # (format, layout, rate) of the frames it was made for

    def resample(self, frame: av.AudioFrame) -> list[np.ndarray]:
        out = []
        converts = (frame.format.name, frame.layout.name, frame.sample_rate)
        if converts != self.converts:
            if self.resampler is not None:
                out += self.resampler.resample(None)  # what the old one still holds (its filter's delay)
            self.resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
            self.converts = converts
        try:
            out += self.resampler.resample(frame)
        except Exception:  # a setup that failed leaves it broken: the next frame gets a new one
            self.resampler = self.converts = None
            raise
        return [o.to_ndarray().reshape(-1).astype(np.float32) / 32768.0 for o in out]


class AvatarVideoTrack(MediaStreamTrack):
    """Generated frames, frame n at `session.base + n / fps`, taken from the latest-chunk slot.

    Each call moves what the slot holds into the track's own queue, where chunks wait for
    their play time: with a playout delay longer than a chunk, the next chunk comes while
    this one plays (the slot alone replaced it unseen, and every other chunk was dropped).
    When the chunk for frame n is not there at its play time (the worker is
    behind) the last picture is shown again and the session clock moves by one
    frame: latency never accumulates. When frame n is not due for longer than a
    frame (the clock moved forward), the last picture is shown again on the frame
    clock, as the audio track sends silence: both RTP clocks keep the wall clock's
    pace. The first picture is the one due when the
    transport asks for it (frames it connected too late for are skipped). recv()
    never raises: aiortc ends a track for good on the first exception, so any
    failure repeats the last picture instead (and is logged once).
    """

    kind = "video"

    def __init__(self, session: Session, slot: ChunkSlot):
        super().__init__()
        self.session = session
        self.slot = slot
        self.chunk: Chunk | None = None
        self.queued: collections.deque[Chunk] = collections.deque()  # taken from the slot, not yet due
        self.n = 0  # next frame index on the stream
        self.sent = 0  # frames returned so far: their pts, always increasing
        self.last: np.ndarray | None = None
        self.rewound = session.rewound  # the session's `rewound` when the track last looked
        self.failed = False

    async def recv(self) -> av.VideoFrame:
        try:
            picture = await self._next_picture()
        except asyncio.CancelledError:
            raise
        except Exception:
            if not self.failed:
                log.exception("session %s: video track failed; repeating the last frame", self.session.id)
                self.failed = True
            await self.session.sleep(1 / self.session.fps)
            picture = self._last_picture()
        self.last = picture
        frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
        frame.pts = round(self.sent * VIDEO_CLOCK / self.session.fps)
        frame.time_base = fractions.Fraction(1, VIDEO_CLOCK)
        self.sent += 1
        return frame

    def _last_picture(self) -> np.ndarray:
        if self.last is None:
            return np.zeros((self.session.height, self.session.width, 3), np.uint8)
        return self.last

    def _covers(self, n: int) -> bool:
        return self.chunk is not None and n < self.chunk.end_frame

    async def _next_picture(self) -> np.ndarray:
        s = self.session
        period = 1 / s.fps
        skip = int((s.rewound - self.rewound) * s.fps + 1e-6)
        if skip > 0:  # the clock moved back (the delay came down) by whole frames: skip them
            self.n += skip
            self.rewound += skip / s.fps  # a part of a frame stays: those frames just play that much sooner
        first_from = self.n  # (the first picture's earliest, the clock aside)
        while True:
            if self.last is None:
                # the first picture is the one due now (or less than half a frame ago): a transport
                # that connected after the stream's first play time skips what it missed (as the
                # audio track starts at the present position) rather than moving the clock, which
                # would move the session's chunks off the schedule of the sessions they are
                # generated with (server/batching.py). Read again at each wake, not kept: a first
                # chunk ready after its play time moves the clock to it (Session.publish)
                present = math.floor((s.clock() - s.base) * s.fps + 0.5)
                self.n = max(first_from, present, self.chunk.first_frame if self.chunk is not None else 0)
            newer = self.slot.take_nowait()
            if newer is not None:
                self.queued.append(newer)
            if self._covers(self.n):
                break
            while self.queued and self.queued[0].end_frame <= self.n:  # its play time has passed
                self.queued.popleft()
            if self.queued:
                self.chunk = self.queued.popleft()
                # past chunks dropped in the slot, and the frames before a 1 + 4k stream's first
                self.n = max(self.n, self.chunk.first_frame)
                continue
            if self.slot.closed:  # the session is ending; the peer connection closes next
                await s.sleep(period)
                return self._last_picture()
            wait = s.base + self.n / s.fps - s.clock()
            if self.last is None:
                await self.slot.wait(wait if wait > 0 else 1.0)
                continue
            if wait > 0:
                if await self.slot.wait(min(wait, period)) or wait <= period:
                    continue
                return self.last  # not due for longer than a frame: hold the picture for one
            await s.sleep(period)  # late: repeat the last picture for one frame period
            s.late_by(period, self.n // s.frames_per_chunk)
            return self.last
        delay = s.base + self.n / s.fps - s.clock()
        if delay > period and self.last is not None:  # the clock moved forward: hold the picture
            await s.sleep(period)
            return self.last
        if delay > 0:
            await s.sleep(delay)
        picture = self.chunk.frames[self.n - self.chunk.first_frame]
        self.n += 1
        s.touch()  # a connected viewer keeps the session alive
        return picture


class SpeechAudioTrack(MediaStreamTrack):
    """The audio the lips were generated from, 20 ms per frame, stream sample m at `session.base + m / 16000`.

    Frames leave on the wall clock without gaps, like the video (whose late frames are
    repeats): when the session clock moves forward the track sends silence until the
    stream catches up, so both tracks' RTP clocks follow the wall clock and the
    browser's A/V sync (from the RTCP sender reports) stays put. When it moves back (the
    delay came down) the track skips ahead; it is the track that brings a lowered delay
    down (`session.rewind_pending`), where its playhead is at a pause, by no more than the
    pause: brought down wherever the playhead was, the whole step was skipped in the middle of
    the user's words (test_server_clock_pauses).
    """

    kind = "audio"

    def __init__(self, session: Session):
        super().__init__()
        self.session = session
        self.start: float | None = None  # wall time of the first frame
        self.sent = 0  # frames returned: their pts, always increasing
        self.m = 0  # next stream sample to play
        self.failed = False

    async def recv(self) -> av.AudioFrame:
        try:
            pcm = await self._next_samples()
        except asyncio.CancelledError:
            raise
        except Exception:
            if not self.failed:
                log.exception("session %s: audio track failed; sending silence", self.session.id)
                self.failed = True
            await self.session.sleep(AUDIO_FRAME_SAMPLES / SAMPLE_RATE)
            pcm = np.zeros(AUDIO_FRAME_SAMPLES, np.int16)
        frame = av.AudioFrame(format="s16", layout="mono", samples=AUDIO_FRAME_SAMPLES)
        frame.planes[0].update(pcm.tobytes())
        frame.sample_rate = SAMPLE_RATE
        frame.pts = self.sent * AUDIO_FRAME_SAMPLES
        frame.time_base = fractions.Fraction(1, SAMPLE_RATE)
        self.sent += 1
        return frame

    async def _next_samples(self) -> np.ndarray:
        s = self.session
        if self.start is None:  # start at the present stream position, not at stream time 0
            self.start = s.clock()
            now_samples = (self.start - s.base) * SAMPLE_RATE
            self.m = max(0, round(now_samples / AUDIO_FRAME_SAMPLES) * AUDIO_FRAME_SAMPLES)
            s.rewinds_in_pauses = True  # a playhead now: a lowered delay waits for it to be at a pause
        at = self.start + self.sent * AUDIO_FRAME_SAMPLES / SAMPLE_RATE
        delay = at - s.clock()
        if delay > 0:
            await s.sleep(delay)
        silence = np.zeros(AUDIO_FRAME_SAMPLES, np.int16)
        if self.m + AUDIO_FRAME_SAMPLES > s.generated_until:
            # no video for this time yet (a late chunk, which the video waits for, moving the
            # clock): no sound either, and these samples stay to come with their frames (passed
            # over, the chunk's first words were lost while its lips moved)
            return silence
        if s.rewind_pending > 0:
            self._rewind_in_pause(at)
        position = (at - s.base) * SAMPLE_RATE  # the stream sample that should be playing now
        if position < self.m - AUDIO_FRAME_SAMPLES / 2:
            return silence  # the clock moved forward (late video): fill the gap
        self.m += self._skip(position - self.m)
        start, self.m = self.m, self.m + AUDIO_FRAME_SAMPLES
        if start + AUDIO_FRAME_SAMPLES > s.generated_until:
            return silence  # (skipped ahead past what is generated)
        pcm = s.timeline.read(start, AUDIO_FRAME_SAMPLES)
        return (pcm * 32767).astype(np.int16)

    @staticmethod
    def _skip(ahead: float) -> int:
        """Samples to skip when the clock is `ahead` samples past the playhead: whole frames, once
        it is half a frame past (the clock moved back: the delay came down)."""
        if ahead < AUDIO_FRAME_SAMPLES / 2:
            return 0
        return round(ahead / AUDIO_FRAME_SAMPLES) * AUDIO_FRAME_SAMPLES

    def _rewind_in_pause(self, at: float) -> None:
        """Apply as much of the session's pending rewind as the pause at the playhead takes: whole
        video frames (the video skips those), and no more than the track then skips in silence.
        A pause shorter than a frame takes nothing, nor does sound (the session applies it anyway
        after a while, `Session.REWIND_WAIT`)."""
        s = self.session
        frame = SAMPLE_RATE / s.fps  # samples
        ahead = (at - s.base) * SAMPLE_RATE - self.m  # where the clock is from the playhead now
        end = min(s.generated_until, self.m + math.ceil(s.rewind_pending * SAMPLE_RATE + ahead + 2 * frame))
        pause = s.timeline.silent_run(self.m, end)
        for frames in range(math.floor(pause / frame), 0, -1):  # the most that fits, from the longest
            seconds = min(s.rewind_pending, frames / s.fps)
            if self._skip(ahead + seconds * SAMPLE_RATE) <= pause:
                s.rewind(seconds)
                return
