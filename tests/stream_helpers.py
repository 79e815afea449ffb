"""A face and speech to start and drive a stream with, and a stream run on them, for the stream's tests."""

import numpy as np

from streamgen.stream import StreamSession


def face(seed=0, h=64, w=64):
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


def speech(seconds, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * 220 * t) * (rng.random(t.size) > 0.3)).astype(np.float32)


def run(model, audio_pushes, chunks, seed=0):
    s = StreamSession(model)
    s.start(face(), seed=seed)
    out = []
    for i in range(chunks):
        if i < len(audio_pushes):
            s.push_audio(audio_pushes[i])
        out.append(s.next_chunk())
    return s, out
