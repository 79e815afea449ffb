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
