"""A stream's start kept for the next start of the same reference and text
(streamgen/start_memo.py): the same frames, no encoder or sink forward, never stale."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import streamgen.stream as stream_module
from streamgen.models import load_model
from streamgen.stream import StreamSession


@pytest.fixture
def model():
    return load_model("debug")


def face(seed=0):
    return (np.random.default_rng(seed).random((64, 64, 3)) * 255).astype(np.uint8)


@pytest.fixture
def sink_forwards(monkeypatch):
    """How many times a start ran the DiT over its reference."""
    calls = []
    real = stream_module.encode_sink

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(stream_module, "encode_sink", counted)
    return calls


def frames(model, reference=None, context=None, seed=0, chunks=3):
    session = StreamSession(model)
    session.start(face() if reference is None else reference, context=context, seed=seed)
    session.push_audio(np.sin(np.arange(16000 * 2) / 9.0).astype(np.float32) * 0.3)
    out = np.stack([session.next_chunk()[0] for _ in range(chunks)])
    session.close()
    return out


def test_a_known_avatar_starts_from_the_kept_sink_with_the_same_frames(model, sink_forwards):
    first = frames(model, seed=3)
    again = frames(model, seed=3)  # another session of the same model
    assert np.array_equal(first, again)
    assert len(sink_forwards) == 1 and (model.start_memo.hits, model.start_memo.misses) == (1, 1)
    # the seed draws the noise, not the sink: a known avatar with a new seed is still known
    other_seed = frames(model, seed=4)
    assert len(sink_forwards) == 1 and not np.array_equal(other_seed, first)
    model.start_memo.clear()
    assert np.array_equal(frames(model, seed=4), other_seed)  # and it equals a computed start
    assert len(sink_forwards) == 2


def test_another_reference_text_or_weights_computes_its_own_start(model, sink_forwards):
    base = frames(model)
    assert not np.array_equal(frames(model, reference=face(1)), base)
    text = torch.randn(1, 2, model.cfg.text_dim, generator=torch.Generator().manual_seed(0))
    assert not np.array_equal(frames(model, context=text), base)
    assert len(sink_forwards) == 3
    with torch.no_grad():  # an in-place change, as an optimizer step makes
        model.dit.blocks[0].self_attn.k.weight.mul_(1.5)
    changed = frames(model)
    assert len(sink_forwards) == 4 and not np.array_equal(changed, base)
    with torch.no_grad():
        model.dit.blocks[0].self_attn.k.weight.div_(1.5)  # back to the old values: a new version still
    frames(model)
    assert len(sink_forwards) == 5
    with torch.no_grad():  # the autoencoder's latent statistics (buffers) make the reference's latent
        StreamSession(model).vae.latent_std.mul_(2.0)  # (the sessions' autoencoder: a dtype copy)
    assert not np.array_equal(frames(model), base) and len(sink_forwards) == 6


def test_the_least_recently_used_start_goes_first(model, sink_forwards):
    model.start_memo.capacity = 2
    for seed in (0, 1, 0, 2):  # 0 is used again before 2 comes: 1 goes
        frames(model, reference=face(seed), chunks=1)
    assert len(sink_forwards) == 3 and len(model.start_memo) == 2
    frames(model, reference=face(0), chunks=1)
    assert len(sink_forwards) == 3
    frames(model, reference=face(1), chunks=1)
    assert len(sink_forwards) == 4
    model.start_memo.capacity = 0  # off
    model.start_memo.clear()
    frames(model, chunks=1)
    frames(model, chunks=1)
    assert len(sink_forwards) == 6 and len(model.start_memo) == 0


def test_a_sequence_parallel_dit_computes_every_start(model, sink_forwards):
    # every rank must run the sink's forward together: a memo hit on one rank would hang the others
    model.dit.sequence_parallel_groups = object()
    frames(model, chunks=1)
    frames(model, chunks=1)
    assert len(sink_forwards) == 2 and len(model.start_memo) == 0


def test_a_start_shows_its_stages_to_an_observer(model, sink_forwards):
    """bench's first-chunk timing splits the start (stream.START_STAGES): a new avatar's runs all
    three, a known one's copies its kept sink instead of encoding."""
    session, seen = StreamSession(model), []

    def observe(stage, fn):
        seen.append(stage)
        return fn()

    session.start(face(), seed=0, observe=observe)
    assert seen == list(stream_module.START_STAGES) and len(sink_forwards) == 1
    seen.clear()
    session.start(face(), seed=0, observe=observe)
    assert seen == ["prepare", "sink"] and len(sink_forwards) == 1
