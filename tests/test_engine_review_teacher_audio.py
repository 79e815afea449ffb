"""The teacher's session over a long stream: each window's audio is encoded from the samples its
tokens can depend on (the encoder's receptive field before the window's motion frames), not from
the stream's first sample, and the samples no later window can reach are let go: the same audio
windows as encoding the whole stream, in memory and time that do not grow with its length."""

import torch
from stream_helpers import face, speech

from streamgen.model.audio import SAMPLES_PER_FRAME, frame_windows
from streamgen.models import load_model
from streamgen.teacher import TeacherSession


def test_a_long_teacher_stream_encodes_a_bounded_span_of_audio_with_the_whole_streams_windows(monkeypatch):
    import streamgen.teacher as teacher_module

    model = load_model("debug")
    cfg, enc = model.cfg, model.dit.audio_encoder
    window, motion, windows = 2, 1, 12
    teacher = TeacherSession(model, steps=1, window=window, motion=motion)
    teacher.start(face(), seed=0)
    piece = window * cfg.temporal_compression * SAMPLES_PER_FRAME  # a window's audio
    audio = speech((windows + 2) * piece / 16000, seed=4)
    teacher.push_audio(audio[: 2 * piece])  # fed a window ahead, as a live stream is
    lengths, given, kept = [], [], []
    encode = enc.forward
    monkeypatch.setattr(enc, "forward", lambda pcm: lengths.append(pcm.shape[-1]) or encode(pcm))
    full = teacher_module.Conditions.full
    monkeypatch.setattr(teacher_module.Conditions, "full", lambda *a: given.append(a[1]) or full(*a))
    for k in range(windows):
        teacher.push_audio(audio[(k + 2) * piece : (k + 3) * piece])
        teacher.next_chunk()
        kept.append(teacher.pcm.size)
    # the encoder's input and the audio kept stop growing once the receptive field is behind
    assert len(set(lengths[-4:])) == 1, lengths
    assert len(set(kept[-4:])) == 1, kept
    # and each window's audio is that of the whole stream's encoding
    with torch.no_grad():
        whole = encode(torch.from_numpy(audio)[None])  # (audio past the last window's look-ahead)
    for k, got in enumerate(given):
        first = k * window - (motion if k else 0)
        want = frame_windows(whole, 0, first, got.shape[1], cfg)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
