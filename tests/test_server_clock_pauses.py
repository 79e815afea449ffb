"""A grown playout delay comes back down in the pauses of the sound: the WebRTC audio track applies
the lowering where its playhead is at silence, so neither track skips speech; with no audio track
to wait for, or no pause for long, it comes down at once (tests/test_server_clock.py has the rest
of the clock)."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
from test_server_clock import CHUNK_S, FPS, PER_CHUNK, RunningClock

from server.session import SAMPLE_RATE, Chunk, Session
from server.webrtc import AUDIO_FRAME_SAMPLES, AvatarVideoTrack, SpeechAudioTrack

FRAME_SAMPLES = SAMPLE_RATE // FPS  # 640: one video frame of audio


class FakeClock(RunningClock):
    """time.monotonic for the session and the tracks; the tracks' sleeps move it on (no real waits),
    their readings do not."""

    TICK_S = 0.0


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def speech(seconds: float) -> np.ndarray:
    """Sound that tells its own stream sample: sample m is 0.25 + m / 128000 (loud throughout; up to 6 s)."""
    return (0.25 + np.arange(round(seconds * SAMPLE_RATE)) / 128000).astype(np.float32)


def sample_of(frame) -> int:
    """The stream sample an audio frame starts at (the track's frames start at whole 20 ms of the
    stream; the int16 rounding is a few samples); None for silence."""
    value = frame.to_ndarray()[0, 0] / 32767
    return None if value < 0.2 else round((value - 0.25) * 128000 / AUDIO_FRAME_SAMPLES) * AUDIO_FRAME_SAMPLES


def chunk(index: int) -> Chunk:
    """Frame i of the stream is a picture filled with the value i (mod 256)."""
    values = np.arange(index * PER_CHUNK, (index + 1) * PER_CHUNK) % 256
    frames = np.broadcast_to(values[:, None, None, None], (PER_CHUNK, 8, 8, 3)).astype(np.uint8)
    return Chunk(frames, index * CHUNK_S, np.zeros(PER_CHUNK * FRAME_SAMPLES, np.int16), FPS, index, 0.0)


def grown_session(clock: FakeClock, sound: np.ndarray, transport: str = "whep") -> Session:
    """A session whose delay grew from 0.1 s to 0.5 s (three late chunks in a row), stream time 0
    playing now, `sound` on its timeline and all of it generated."""
    stream = SimpleNamespace(width=8, height=8, frames_per_chunk=PER_CHUNK, chunk_seconds=CHUNK_S,
                             audio_lookahead_seconds=0.0)  # fmt: skip
    s = Session("s", stream, None, max_audio_ahead_s=30.0, clock=clock.monotonic, sleep=clock.sleep)
    s.attach(transport, 0.1, first_delay=0.0)
    s._chunk_was_late(1, 0.2)
    s._chunk_was_late(2, 0.2)
    s._chunk_was_late(3, 0.2)
    assert s.delay == pytest.approx(0.5) and s.start_delay == pytest.approx(0.1)
    s.base = clock.now
    s.timeline.history = len(sound)  # all of it stays readable, however far the tracks play
    s.timeline.append(sound)
    s.timeline.take_until(len(sound))
    s.generated_until = len(sound)
    return s


def chunks_come_early(s: Session, clock: FakeClock) -> None:
    """SLACK_WINDOW chunks weighed as `publish` weighs them, each arriving a delay ahead
    of its play time (the worker generates them that far ahead)."""
    first = math.ceil((clock.now - s.base + s.delay) / CHUNK_S)
    for k in range(first, first + Session.SLACK_WINDOW):
        with s.clock_lock:
            head_start = s.base + k * CHUNK_S - clock.now
        s._lower_delay_when_early(head_start)


async def test_a_grown_delay_comes_down_in_a_pause_skipping_no_speech_in_either_track(clock):
    """Chunks keep arriving early while the user speaks: the delay came down at once, and the audio
    track skipped the 0.4 s the clock jumped over in the middle of the words (the video as many
    frames). Now it waits for the pause and skips there, audio and video the same time."""
    pause = (1.0, 1.8)  # seconds of the stream
    sound = np.concatenate([speech(4.0)[: round(pause[0] * SAMPLE_RATE)], np.zeros(round(0.8 * SAMPLE_RATE), np.float32),
                            speech(4.0)[round(pause[1] * SAMPLE_RATE):]])  # fmt: skip
    s = grown_session(clock, sound)
    slot = s.add_slot()
    audio, video = SpeechAudioTrack(s), AvatarVideoTrack(s, slot)
    played, shown, next_chunk = [], [], 0

    async def play(seconds: float) -> None:  # both tracks, on one clock: two audio frames a video frame
        nonlocal next_chunk
        for _ in range(round(seconds * FPS)):
            slot.put(chunk(next_chunk))  # (the chunks come well ahead: the video never waits)
            next_chunk += 1
            shown.append(int((await video.recv()).to_ndarray(format="rgb24")[0, 0, 0]))
            for _ in range(2):
                played.append(sample_of(await audio.recv()))

    await play(0.2)  # the user is speaking ...
    chunks_come_early(s, clock)  # ... when the delay may come down by 0.4 s
    assert s.delay == pytest.approx(0.5) and s.rewind_pending == pytest.approx(0.4)
    await play(2.0)
    assert s.delay == pytest.approx(0.1) and s.rewound == pytest.approx(0.4) and s.rewind_pending == 0

    loud = [m for m in played if m is not None]
    speech_blocks = [m for m in range(0, loud[-1] + 1, AUDIO_FRAME_SAMPLES) if sound[m] > 0]
    assert loud == speech_blocks  # every 20 ms of speech played, in order, none twice
    jumps = [
        (a, b)
        for a, b in zip(played, played[1:])
        if a is not None and b is not None and b - a != AUDIO_FRAME_SAMPLES
    ]
    assert jumps == [] and played.count(None) == round(
        (pause[1] - pause[0] - 0.4) * SAMPLE_RATE / AUDIO_FRAME_SAMPLES
    )
    # the video skipped the same 10 frames, in the pause (the frames of 1.0-1.8 s are 25-44), at
    # its first frame after the audio's skip (audio frames 2j and 2j + 1 play with video frame j)
    skips = [(a, b) for a, b in zip(shown, shown[1:]) if b != a + 1]
    assert len(skips) == 1 and skips[0][1] - skips[0][0] == 1 + 10, skips
    assert pause[0] * FPS <= skips[0][0] + 1 and skips[0][1] - 1 < pause[1] * FPS, skips
    assert shown.index(skips[0][1]) == played.index(None) // 2 + 1


async def test_a_pause_shorter_than_a_video_frame_brings_nothing_down(clock):
    """20 ms of silence between words (a stop consonant, a breath) is not a pause to skip."""
    sound = speech(3.0)
    sound[round(0.6 * SAMPLE_RATE) : round(0.6 * SAMPLE_RATE) + AUDIO_FRAME_SAMPLES] = 0
    s = grown_session(clock, sound)
    audio = SpeechAudioTrack(s)
    await audio.recv()
    chunks_come_early(s, clock)
    played = [sample_of(await audio.recv()) for _ in range(50)]  # 1 s, past the short gap
    assert s.rewind_pending == pytest.approx(0.4) and s.delay == pytest.approx(0.5) and s.rewound == 0
    assert None in played and all(
        b - a == AUDIO_FRAME_SAMPLES for a, b in zip(played, played[1:]) if None not in (a, b)
    )


@pytest.mark.parametrize("off_frame", [0.0, 0.009, -0.009])
async def test_a_pause_shorter_than_the_lowering_takes_what_it_covers_and_the_next_pause_the_rest(
    clock, off_frame
):
    """Pauses of 0.2 s (at 0.5 s) and 0.3 s (at 1.5 s) against 0.4 s to come down: the first takes
    0.2 s (all of it is skipped, the words after it play whole), the second the other 0.2 s. The
    same with the clock up to half an audio frame off the track's frames (off_frame, seconds)."""
    sound = speech(3.0)
    for start, seconds in ((0.5, 0.2), (1.5, 0.3)):
        sound[round(start * SAMPLE_RATE) : round((start + seconds) * SAMPLE_RATE)] = 0
    s = grown_session(clock, sound)
    s.base += off_frame
    audio = SpeechAudioTrack(s)
    played = [sample_of(await audio.recv())]
    chunks_come_early(s, clock)
    delays = []
    for _ in range(100):  # 2 s
        played.append(sample_of(await audio.recv()))
        delays.append(round(s.delay, 3))
    assert sorted(set(delays), reverse=True) == [0.5, 0.3, 0.1] and s.rewind_pending == 0
    loud = [m for m in played if m is not None]
    assert loud == [m for m in range(0, loud[-1] + 1, AUDIO_FRAME_SAMPLES) if sound[m] > 0]
    assert played.count(None) == round(0.1 * SAMPLE_RATE / AUDIO_FRAME_SAMPLES)  # 0.5 s of pauses less 0.4


async def test_with_no_pause_for_long_the_delay_comes_down_at_once(clock):
    """Continuous sound (music, a noisy microphone): after REWIND_WAIT chunks the lowering is
    applied as before, the tracks skipping what the clock jumps over, so the delay comes down."""
    s = grown_session(clock, speech(6.0))
    audio = SpeechAudioTrack(s)
    await audio.recv()
    chunks_come_early(s, clock)
    assert s.rewind_pending == pytest.approx(0.4)
    for i in range(Session.REWIND_WAIT):
        assert s.delay == pytest.approx(0.5) and s.rewind_pending == pytest.approx(0.4)  # not yet
        for _ in range(round(CHUNK_S * SAMPLE_RATE / AUDIO_FRAME_SAMPLES)):  # a chunk's time of sound
            last = sample_of(await audio.recv())
        s.publish(chunk(100 + i))  # the chunks keep coming well ahead of their play time
    assert s.delay == pytest.approx(0.1) and s.rewind_pending == 0 and s.rewound == pytest.approx(0.4)
    assert (
        sample_of(await audio.recv()) - last == AUDIO_FRAME_SAMPLES + 0.4 * SAMPLE_RATE
    )  # skipped, as before


def test_a_websocket_session_brings_the_delay_down_at_once(clock):
    """Its client plays the chunks by their pts: there is no playhead on the server to wait for."""
    s = grown_session(clock, speech(2.0), transport="websocket")
    base = s.base
    chunks_come_early(s, clock)
    assert s.delay == pytest.approx(0.1) and s.rewind_pending == 0
    assert s.base == pytest.approx(base - 0.4) and s.rewound == pytest.approx(0.4)


def test_a_webrtc_session_whose_audio_track_is_not_playing_brings_the_delay_down_at_once(clock):
    """No audio m-line in the offer, or the track not started yet: nothing would apply it."""
    s = grown_session(clock, speech(2.0))
    SpeechAudioTrack(s)  # made, never asked for a frame
    chunks_come_early(s, clock)
    assert s.delay == pytest.approx(0.1) and s.rewound == pytest.approx(0.4)


async def test_a_pending_lowering_is_counted_when_the_next_one_is_weighed(clock):
    """Chunks still arriving with the head start the pending lowering will take away have no more
    spare: weighed without it, the delay was lowered twice, and the chunks then came late."""
    s = grown_session(clock, speech(6.0))
    audio = SpeechAudioTrack(s)
    await audio.recv()
    for window in range(2):
        for _ in range(Session.SLACK_WINDOW):  # each arrives 0.22 s before its play time (base stays)
            s._lower_delay_when_early(0.22)
        assert s.rewind_pending == pytest.approx(0.2), window  # 0.22 - SLACK_KEEP, once


async def test_a_late_chunk_drops_a_pending_lowering(clock):
    """It came late with the delay not yet lowered: lowered, it would have been later still."""
    s = grown_session(clock, speech(6.0))
    audio = SpeechAudioTrack(s)
    await audio.recv()
    chunks_come_early(s, clock)
    assert s.rewind_pending == pytest.approx(0.4)
    s._chunk_was_late(60, 0.01)
    assert s.rewind_pending == 0 and s.delay == pytest.approx(0.5)


async def test_a_floor_raised_while_a_lowering_waits_caps_it(clock):
    """A bigger batch held the session back meanwhile (hold_back: 0.3 s is what it needs): the
    pending lowering, decided against the old floor, brings the delay down to 0.3 s, not below."""
    sound = speech(3.0)
    sound[round(1.0 * SAMPLE_RATE) : round(1.8 * SAMPLE_RATE)] = 0
    s = grown_session(clock, sound)
    audio = SpeechAudioTrack(s)
    await audio.recv()
    chunks_come_early(s, clock)
    s.hold_back(0.3)
    assert s.delay == pytest.approx(0.5) and s.start_delay == pytest.approx(0.3)
    for _ in range(100):  # 2 s, past the pause
        await audio.recv()
    assert s.delay == pytest.approx(0.3) and s.rewound == pytest.approx(0.2) and s.rewind_pending == 0


PAUSED_TEXT = (
    "The quick brown fox jumps over the lazy dog. Then it runs along the river. The old mill stands there."
)
UNPAUSED_TEXT = (
    "the quick brown fox jumps over the lazy dog and then it runs along the river bank towards the old mill"
)


def noisy_speech(text: str, noise_dbfs: float, gain_db: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """espeak-ng's speech of `text`, `gain_db` louder, with white noise at `noise_dbfs` (a
    microphone's noise floor, seeded), and the speech without it."""
    from streamgen.data.speech import Voice, synthesize

    clean = synthesize(text, Voice(language="en-us")).audio * np.float32(10 ** (gain_db / 20))
    noise = np.random.default_rng(7).standard_normal(len(clean)) * 10 ** (noise_dbfs / 20)
    return (clean + noise).astype(np.float32), clean


def pauses_in(clean: np.ndarray) -> list[tuple[int, int]]:
    """The spans [start, end) of espeak-ng's pauses (exact zeros) of 0.2 s or more."""
    zero = np.concatenate([[False], clean == 0, [False]])
    edges = np.flatnonzero(np.diff(zero.astype(np.int8)))
    return [(a, b) for a, b in zip(edges[::2], edges[1::2]) if b - a >= 0.2 * SAMPLE_RATE]


async def skips_while_playing(s: Session, audio: SpeechAudioTrack, samples: int) -> list[tuple[int, int]]:
    """Play the track up to stream sample `samples`; the stream samples [from, to) it skipped."""
    skips = []
    for _ in range(samples // AUDIO_FRAME_SAMPLES):
        before = audio.m
        await audio.recv()
        if audio.m - before > AUDIO_FRAME_SAMPLES:
            skips.append((before, audio.m - AUDIO_FRAME_SAMPLES))
    return skips


@pytest.mark.parametrize("noise_dbfs", [-40.0, -30.0])
async def test_over_a_noisy_microphone_the_delay_comes_down_in_the_pauses_between_sentences(
    clock, noise_dbfs
):
    """A microphone's noise above -50 dBFS: no pause was found, and the lowering waited REWIND_WAIT
    chunks and then skipped in the middle of the words. The pauses are found over the sound's own
    noise floor: the 0.4 s come down in the pauses between the sentences, skipping nothing of the
    words that is not quieter than the noise (the fading end of "dog" at -34 to -43 dBFS, under
    noise at -30)."""
    sound, clean = noisy_speech(PAUSED_TEXT, noise_dbfs)
    pauses = pauses_in(clean)
    assert len(pauses) == 2
    s = grown_session(clock, sound)
    audio = SpeechAudioTrack(s)
    await audio.recv()
    chunks_come_early(s, clock)
    skips = await skips_while_playing(s, audio, len(sound) - SAMPLE_RATE // 2)
    assert s.rewound == pytest.approx(0.4) and s.rewind_pending == 0 and s.delay == pytest.approx(0.1)
    for start, end in skips:
        assert any(a < end and start < b for a, b in pauses), (skips, pauses)
        skipped = clean[start:end].astype(np.float64).reshape(-1, AUDIO_FRAME_SAMPLES)
        assert np.sqrt(np.mean(skipped**2, axis=1)).max() < 10 ** (noise_dbfs / 20), (skips, pauses)


@pytest.mark.parametrize("noise_dbfs, gain_db", [(-40.0, 0.0), (-30.0, 0.0), (-35.0, -10.0)])
async def test_over_a_noisy_microphone_speech_without_pauses_has_none_to_bring_the_delay_down_in(
    clock, noise_dbfs, gain_db
):
    """The pause level follows the noise floor, not the speech: in a sentence without pauses the
    quiet parts of words, as quiet as the noise there, are not taken for a pause (the lowering
    waits for REWIND_WAIT chunks instead), nor are they in speech only ~10 dB above the noise."""
    sound, clean = noisy_speech(UNPAUSED_TEXT, noise_dbfs, gain_db)
    assert pauses_in(clean) == []
    s = grown_session(clock, sound)
    audio = SpeechAudioTrack(s)
    await audio.recv()
    chunks_come_early(s, clock)
    assert await skips_while_playing(s, audio, len(sound) - SAMPLE_RATE // 2) == []
    assert s.rewound == 0 and s.rewind_pending == pytest.approx(0.4)


def pause_blocks_found(sound: np.ndarray) -> set[int]:
    """The SILENCE_BLOCKs of `sound` (placed on a timeline, all of it taken by the model) that
    `silent_run` counts as a pause, looking one block on from each."""
    from server.pauses import SILENCE_BLOCK
    from server.session import AudioTimeline

    timeline = AudioTimeline(max_ahead_s=30.0, history_s=30.0)
    timeline.append(sound, "mic")
    timeline.take_until(len(sound))
    starts = range(0, len(sound) - SILENCE_BLOCK + 1, SILENCE_BLOCK)
    return {m // SILENCE_BLOCK for m in starts if timeline.silent_run(m, m + SILENCE_BLOCK)}


def test_zeros_for_a_microphone_that_fell_behind_find_pauses_only_in_the_zeros():
    """Where the microphone's audio did not come in time the timeline holds zeros (0.1 s at each
    restart): once they are 5 % of the window they pull the noise floor to 0, the safe way: no
    pause is found over the noise any more, only the zeros themselves, never a block of speech."""
    from server.pauses import SILENCE_BLOCK, SILENCE_RMS, block_rms, noise_level

    sound, clean = noisy_speech(PAUSED_TEXT, -40.0)
    sound = sound[: len(sound) // SILENCE_BLOCK * SILENCE_BLOCK]
    between_sentences = {m // SILENCE_BLOCK for a, b in pauses_in(clean) for m in range(a, b - SILENCE_BLOCK)}
    assert pause_blocks_found(sound) & between_sentences  # over the noise alone, its floor finds them
    gappy = sound.copy()
    for second in range(len(gappy) // SAMPLE_RATE):  # 0.1 s of zeros a second: 10 % of the window
        gappy[second * SAMPLE_RATE : second * SAMPLE_RATE + SAMPLE_RATE // 10] = 0
    assert noise_level(block_rms(gappy[: 150 * SILENCE_BLOCK])) == 0  # the floor pulled to 0
    zeros = set(np.flatnonzero(block_rms(gappy) < SILENCE_RMS))
    found = pause_blocks_found(gappy)
    assert found and found <= zeros, sorted(found - zeros)
