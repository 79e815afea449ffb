"""Batched sessions run each stage of a chunk once for the batch: the denoising steps, the
audio encoder, the decoder and the clean re-encode, each giving what the sessions get alone."""

from contextlib import contextmanager

import pytest
import torch
from stream_helpers import face, speech

from streamgen.models import load_model
from streamgen.stream import StreamSession
from streamgen.stream_batch import prepare_chunks, write_pending_chunks


@pytest.fixture(scope="module")
def model():
    return load_model("debug")


def started(model, seed):
    s = StreamSession(model)
    s.start(face(seed), seed=seed)
    s.push_audio(speech(6.0, seed=seed))
    return s


def full_ring_chunks(s: StreamSession) -> int:
    return s.cfg.window_frames // s.cfg.frames_per_chunk + 1


@contextmanager
def calls(module: torch.nn.Module):
    """A list that grows by one at each forward of `module` inside the block."""
    seen = []
    hook = module.register_forward_pre_hook(lambda *_: seen.append(1))
    try:
        yield seen
    finally:
        hook.remove()


def test_pending_chunks_are_reencoded_in_one_forward_with_the_keys_of_each_alone(model):
    def sessions():
        ready = [started(model, seed) for seed in (1, 2, 3)]
        for s in ready:
            for _ in range(full_ring_chunks(s) + 1):  # past the window, the last chunk pending
                s.next_chunk()
        late = started(model, 4)  # its first chunk pending, at another fill level
        late.next_chunk()
        return [*ready, late]

    alone, batched = sessions(), sessions()
    for s in alone:
        s.write_pending_chunk()
    with calls(model.dit) as forwards:
        write_pending_chunks(batched)
    assert len(forwards) == 2  # the three at the full level together, the late one alone
    for a, b in zip(alone, batched):
        assert not b.chunk_pending and b.cache.frames_written == a.cache.frames_written
        for mine, theirs in zip(b.cache.layers, a.cache.layers):
            kept = [*range(mine.sink_end), *range(mine.chunk_end, mine.k.shape[1])]  # not the chunk's scratch
            for name in ("k", "v"):
                torch.testing.assert_close(
                    getattr(mine, name)[:, kept], getattr(theirs, name)[:, kept], atol=1e-5, rtol=1e-4
                )
            torch.testing.assert_close(mine.k_ring_raw, theirs.k_ring_raw, atol=1e-5, rtol=1e-4)
    assert not torch.equal(batched[0].cache.layers[0].k, batched[1].cache.layers[0].k)  # rows kept apart


def test_an_autoencoder_decodes_streams_as_one_batch_with_the_frames_and_states_of_each(model):
    vae = model.vae
    torch.manual_seed(0)
    first, second = torch.randn(2, 3, vae.latent_channels, model.cfg.frames_per_chunk, 8, 8)

    def decode_streams(latents, states, forwards):
        with calls(vae.dec_in) as decoded:
            out = vae.decode_streams(latents, states)
        assert len(decoded) == forwards
        return out

    with torch.no_grad():
        alone = [vae.decode_stream(first[i : i + 1], None) for i in range(3)]
        frames, states = decode_streams(first, [None] * 3, forwards=1)  # the streams' first chunks
        for i, (want, state) in enumerate(alone):
            torch.testing.assert_close(frames[i : i + 1], want, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(states[i], state, atol=1e-5, rtol=1e-4)

        again = [vae.decode_stream(second[i : i + 1], alone[i][1])[0] for i in range(3)]
        frames, _ = decode_streams(second, states, forwards=1)  # every stream has decoded before
        for i, want in enumerate(again):
            torch.testing.assert_close(frames[i : i + 1], want, atol=1e-5, rtol=1e-4)

        # a stream just started beside two that had not: one by one
        frames, _ = decode_streams(second, [states[0], None, states[2]], forwards=3)
        torch.testing.assert_close(frames[0:1], again[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(frames[1:2], vae.decode_stream(second[1:2], None)[0], atol=1e-5, rtol=1e-4)


def test_the_audio_encoder_runs_once_for_sessions_whose_inputs_are_as_long(model):
    def sessions():
        ready = [started(model, seed) for seed in (1, 2, 3)]
        for s in ready:
            for _ in range(3):
                s.next_chunk()
        return [*ready, started(model, 4)]  # at its start: a shorter encoder input

    alone, batched = sessions(), sessions()
    want = [s._prepare_chunk() for s in alone]
    with calls(model.dit.audio_encoder) as encoded:
        got = prepare_chunks(batched)
    assert len(encoded) == 2
    for (audio, noise), (want_audio, want_noise) in zip(got, want):
        torch.testing.assert_close(audio, want_audio, atol=1e-5, rtol=1e-4)
        assert torch.equal(noise, want_noise)
    assert not torch.equal(got[0][0], got[1][0])  # each session's own speech
    assert [s._consumed for s in batched] == [s._consumed for s in alone]  # timelines advanced alike


def test_a_groups_failed_reencode_fails_its_members_only_with_on_error(model, monkeypatch):
    """next_chunks' re-encode of the chunks left pending, batched per group, raised for every
    session of the call; with on_error, a group's failure is its members' and the others' chunks are
    made. Without on_error it raises, as before."""
    from streamgen import stream_batch
    from streamgen.stream_batch import next_chunks

    def sessions():
        ahead = [started(model, seed) for seed in (1, 2)]
        for s in ahead:
            s.next_chunk()
            s.next_chunk()
        fresh = [started(model, seed) for seed in (3, 4)]
        for s in fresh:
            s.next_chunk()  # pending at fill level 0, where the others' is at one chunk
        return ahead + fresh

    reencode = stream_batch.reencode_chunk

    def broken_at_the_start(dit, cache, *args, **kwargs):
        if cache.filled == 0:
            raise RuntimeError("out of memory")
        return reencode(dit, cache, *args, **kwargs)

    alone, batched = sessions(), sessions()
    monkeypatch.setattr(stream_batch, "reencode_chunk", broken_at_the_start)
    with pytest.raises(RuntimeError, match="out of memory"):
        next_chunks(sessions())
    failed = []
    chunks = next_chunks(batched, on_error=lambda i, e: failed.append((i, str(e))))
    assert failed == [(2, "out of memory"), (3, "out of memory")] and chunks[2:] == [None, None]
    for (frames, pts), s in zip(chunks[:2], alone[:2]):
        want_frames, want_pts = s.next_chunk()
        assert pts == want_pts and abs(frames.astype(int) - want_frames.astype(int)).max() <= 1


@pytest.mark.parametrize("cache_from", ["reencode", "last_step"])
def test_sessions_of_different_lengths_batch_with_the_frames_and_caches_of_each_alone(model, cache_from):
    """Three sessions past the window by different numbers of chunks (their rings rolled to
    different slots) share each forward and still make, chunk after chunk, the frames and keep
    the keys and values they would alone; and two that have just started batch as well."""
    import numpy as np

    from streamgen.stream_batch import next_chunks

    def started_at(seed, chunks):
        s = StreamSession(model, cache_from=cache_from)
        s.start(face(seed), seed=seed)
        s.push_audio(speech(8.0, seed=seed))
        for _ in range(chunks):
            s.next_chunk()
        return s

    full = full_ring_chunks(started_at(0, 0))
    lengths = [full, full + 1, full + 2, 0, 0]
    alone = [started_at(i, n) for i, n in enumerate(lengths)]
    batched = [started_at(i, n) for i, n in enumerate(lengths)]
    assert len({s.cache.frames_written % s.cfg.window_frames for s in batched[:3]}) == 3
    for _ in range(full + 1):
        got = next_chunks(batched)
        want = [s.next_chunk() for s in alone]
        for (frames, pts), (ref, ref_pts) in zip(got, want):
            assert pts == ref_pts
            assert np.abs(frames.astype(int) - ref.astype(int)).max() <= 1
    write_pending_chunks(batched)
    for s in alone:
        s.write_pending_chunk()
    for a, b in zip(alone, batched):
        assert a.cache.frames_written == b.cache.frames_written
        for la, lb in zip(a.cache.layers, b.cache.layers):
            # the sink and the ring (the chunk region is scratch: each denoising step's keys)
            for kept in (slice(0, la.sink_end), slice(la.chunk_end, None)):
                torch.testing.assert_close(lb.k[:, kept], la.k[:, kept], atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(lb.v[:, kept], la.v[:, kept], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(lb.k_ring_raw, la.k_ring_raw, atol=1e-5, rtol=1e-5)


def test_sessions_on_one_device_named_two_ways_share_a_batch(model):
    """"cpu" and "cpu:0" are one CPU: their sessions were never batched (the key was str(device))."""
    from streamgen.stream_batch import next_chunks

    sessions = []
    for seed, device in enumerate(("cpu", "cpu:0")):
        s = StreamSession(model, device=device)
        s.start(face(seed), seed=seed)
        s.push_audio(speech(2.0, seed=seed))
        sessions.append(s)
    one = StreamSession(model)
    one.start(face(0), seed=0)
    one.push_audio(speech(2.0, seed=0))
    with calls(model.dit) as alone:
        one.next_chunk()
    with calls(model.dit) as together:
        next_chunks(sessions)
    assert len(together) == len(alone)  # each step's forward once, for both
