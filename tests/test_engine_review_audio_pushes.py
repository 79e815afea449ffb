"""A StreamSession's audio timeline taking many small pushes ahead of the video (a live
microphone's 20 ms frames while the video runs behind, up to `max_audio_ahead_s`): its buffer
grows by doubling, not by a copy of everything buffered at every push, and holds the samples
pushed, in order, as one push of them all would."""

import numpy as np
from stream_helpers import face, speech

from streamgen.models import load_model
from streamgen.stream import StreamSession


def test_small_pushes_far_ahead_grow_the_buffer_a_few_times_and_keep_every_sample():
    s = StreamSession(load_model("debug"))
    s.start(face(), seed=0)
    audio = speech(1.0)
    pieces = np.array_split(audio, 250)  # 64 samples each: 4 ms frames
    buffers = []  # (each held, so that no buffer's id is taken again by a later one)
    for piece in pieces:
        s.push_audio(piece)
        if not buffers or buffers[-1] is not s._pcm:
            buffers.append(s._pcm)
    # every push copied all of the audio buffered before it: 250 buffers, 125x the audio copied
    assert len(buffers) <= 2 * np.log2(len(pieces)), len(buffers)
    np.testing.assert_array_equal(s._audio_samples(0, audio.size), audio)
    assert s.audio_buffered_seconds == audio.size / 16000
    # and the chunks read it as they read one push of it
    one = StreamSession(s.model)
    one.start(face(), seed=0)
    one.push_audio(audio)
    for _ in range(3):
        np.testing.assert_array_equal(s.next_chunk()[0], one.next_chunk()[0])


def test_chunks_reading_audio_pushed_far_ahead_copy_the_buffer_a_few_times_and_read_every_sample():
    """Each chunk dropped the samples it alone had read by copying the rest of the buffer: audio
    pushed minutes ahead (up to `max_audio_ahead_s`, 600 s: 38 MB) was copied whole at every chunk,
    under the audio lock. The samples a chunk lets go now stay until they are over half of the
    buffer; the chunks read what they read before, and what is buffered is what was pushed."""
    model = load_model("debug")
    audio = speech(60.0)
    s = StreamSession(model)
    s.start(face(), seed=0)
    s.push_audio(audio)
    piecewise = StreamSession(model)  # (fed as the chunks use it: its buffer is never far ahead)
    piecewise.start(face(), seed=0)
    step = round(piecewise.chunk_seconds * 16000)
    ahead = int(np.ceil(piecewise.audio_lookahead_seconds / piecewise.chunk_seconds)) + 1  # (chunks)
    piecewise.push_audio(audio[: ahead * step])
    buffers = [s._pcm]
    chunks = 90
    for i in range(chunks):
        piecewise.push_audio(audio[(i + ahead) * step : (i + ahead + 1) * step])
        np.testing.assert_array_equal(s.next_chunk()[0], piecewise.next_chunk()[0])
        if s._pcm is not buffers[-1]:
            buffers.append(s._pcm)
        np.testing.assert_array_equal(s._audio_samples(s._consumed, audio.size), audio[s._consumed :])
    assert len(buffers) <= 2 * np.log2(chunks), len(buffers)
