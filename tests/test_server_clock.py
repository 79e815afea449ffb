"""The session's playout clock: the delay grows when chunks come late, comes back down when they
come early, and the WebRTC tracks follow the clock both ways (skipping what it jumped over)."""

import asyncio
import time
from types import SimpleNamespace

import numpy as np
import pytest

from server.session import Chunk, Session
from server.webrtc import AUDIO_FRAME_SAMPLES, AvatarVideoTrack, SpeechAudioTrack

FPS, PER_CHUNK, CHUNK_S = 25, 8, 0.32


def make_session(delay=0.1) -> Session:
    stream = SimpleNamespace(width=32, height=32, frames_per_chunk=PER_CHUNK, chunk_seconds=CHUNK_S,
                             audio_lookahead_seconds=0.0)  # fmt: skip
    session = Session("s", stream, asyncio.new_event_loop(), max_audio_ahead_s=30.0)
    session.loop.close()  # only its identity is kept; these tests drive the clock by hand
    session.attach("whep", delay, first_delay=0.0)
    return session


def chunk(index: int) -> Chunk:
    """Frame i of the stream is a picture filled with the value i (mod 256)."""
    values = np.arange(index * PER_CHUNK, (index + 1) * PER_CHUNK) % 256
    frames = np.broadcast_to(values[:, None, None, None], (PER_CHUNK, 32, 32, 3)).astype(np.uint8)
    return Chunk(frames, index * CHUNK_S, np.zeros(5120, np.int16), FPS, index, time.time())


def test_late_chunk_grows_the_delay_and_keeps_the_generation_schedule():
    s = make_session(delay=0.1)
    base, due = s.base, s.next_due
    s.late_by(0.04)
    assert s.delay == pytest.approx(0.14) and s.base == pytest.approx(base + 0.04)
    assert s.next_due == pytest.approx(due)  # generated as before, played later: the next chunk is on time
    s.late_by(5.0)  # far beyond MAX_DELAY: grows to the cap, the rest moves generation too
    assert s.delay == pytest.approx(Session.MAX_DELAY)
    assert s.next_due == pytest.approx(due + 5.0 - (Session.MAX_DELAY - 0.14))
    assert s.base - s.delay + s.chunk_index * CHUNK_S == pytest.approx(s.next_due)


def test_late_transport_moves_the_clock_without_growing_the_delay():
    s = make_session(delay=0.1)
    base, due = s.base, s.next_due
    s.move_clock(0.5)
    assert s.delay == 0.1 and s.base == pytest.approx(base + 0.5) and s.next_due == pytest.approx(due + 0.5)


def test_early_chunks_bring_a_grown_delay_back_down_in_whole_frames_never_below_the_start():
    s = make_session(delay=0.1)
    late = []
    s.on_late = lambda: late.append(1)
    s.late_by(0.4)  # delay 0.5
    s.base = time.monotonic() - CHUNK_S  # chunk 1 plays now: published now, it is (just) late
    s.publish(chunk(1))
    assert late == [1]
    s._slack.clear()
    delays = [s.delay]
    for k in range(2, 2 + 6 * Session.SLACK_WINDOW):
        s.base = time.monotonic() - k * CHUNK_S + s.delay  # every chunk arrives `delay` ahead of play
        due, base, rewound = s.next_due, s.base, s.rewound
        s.publish(chunk(k))
        if s.delay != delays[-1]:
            step = delays[-1] - s.delay
            assert step > 0 and round(step * FPS, 6).is_integer()
            assert s.base == pytest.approx(base - step) and s.rewound == pytest.approx(rewound + step)
            assert s.next_due == pytest.approx(due)  # generation keeps its pace
            delays.append(s.delay)
    assert len(late) == 1
    assert len(delays) > 2 and all(a > b for a, b in zip(delays, delays[1:]))
    assert 0.1 <= s.delay < 0.1 + 2 / FPS + Session.SLACK_KEEP  # back near where it started, not below


def test_a_late_chunk_in_the_window_keeps_the_delay_up():
    s = make_session(delay=0.1)
    s.late_by(0.4)
    for k in range(1, 1 + 2 * Session.SLACK_WINDOW):
        s.base = time.monotonic() - k * CHUNK_S + s.delay
        if k % Session.SLACK_WINDOW == 3:  # one chunk in every window misses its play time
            s.late_by(0.04)
            s.base = time.monotonic() - k * CHUNK_S - 0.01  # and arrives 10 ms after it
        s.publish(chunk(k))
    assert s.delay == pytest.approx(0.58)  # nothing given back


async def test_video_track_skips_the_frames_the_clock_jumped_back_over():
    s = make_session()
    slot = s.add_slot()
    track = AvatarVideoTrack(s, slot)
    s.base = time.monotonic()  # frame 0 plays now
    slot.put(chunk(0))
    first = await track.recv()
    assert first.to_ndarray(format="rgb24")[0, 0, 0] == 0
    s.base -= 5 / FPS  # the delay came down by five frames: frame 6 is the one due now
    s.rewound += 5 / FPS
    frame = await track.recv()
    assert frame.to_ndarray(format="rgb24")[0, 0, 0] == 6
    assert frame.pts == round(90000 / FPS)  # one frame later on the wire: nothing sent twice as fast
    frame = await track.recv()
    assert frame.to_ndarray(format="rgb24")[0, 0, 0] == 7


async def test_audio_track_skips_ahead_when_the_clock_moves_back_and_waits_when_it_moves_forward():
    s = make_session()
    ramp = (np.arange(16000 * 4) / 64000).astype(np.float32)  # sample m has the value m / 64000
    s.timeline.append(ramp)
    s.timeline.take_until(len(ramp))
    s.generated_until = len(ramp)
    track = SpeechAudioTrack(s)
    s.base = time.monotonic() - 1.0  # stream second 1 plays now

    def first_sample(frame):  # to within the int16 rounding (2 samples)
        return round(frame.to_ndarray()[0, 0] / 32767 * 64000 / 4) * 4

    assert first_sample(await track.recv()) == 16000
    s.base -= 0.1  # moved back 100 ms: five 20 ms frames are skipped
    assert first_sample(await track.recv()) == 16000 + AUDIO_FRAME_SAMPLES + 1600
    s.base += 0.1  # moved forward again (a late chunk): silence until the stream catches up
    silent = await track.recv()
    assert not silent.to_ndarray().any()
