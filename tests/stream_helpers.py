"""A face and speech to start and drive a stream with, for the stream's tests."""

import numpy as np


def face(seed=0, h=64, w=64):
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


def speech(seconds, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * 220 * t) * (rng.random(t.size) > 0.3)).astype(np.float32)
