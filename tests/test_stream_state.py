"""A StreamSession's state saved between two chunks and put back into another session of the same
model makes the very frames the first session makes next (streamgen/stream_state.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streamgen.data.world import make_clip
from streamgen.stream import StreamSession
from streamgen.stream_state import SessionStateError, restore_session_state, save_session_state


def chunks(session, n: int) -> np.ndarray:
    return np.concatenate([session.next_chunk()[0] for _ in range(n)])


@pytest.fixture(scope="module")
def clip():
    return make_clip(5, 0, "test", 64, 64)


@pytest.mark.parametrize("cache_from", ["reencode", "last_step"])
def test_a_restored_session_makes_the_frames_the_saved_one_makes_next(tmp_path, clip, cache_from):
    half = len(clip.audio) // 2
    first = StreamSession("tiny-avatar", 64, 64, cache_from=cache_from)
    first.start(clip.reference, text=clip.caption, seed=3)
    first.push_audio(clip.audio[:half])  # (some of it still buffered, ahead of the video, at the save)
    chunks(first, 3)  # (the ring wrapped: tiny-avatar's window is one chunk)
    assert first.chunk_pending == (cache_from == "reencode")
    save_session_state(first, tmp_path / "state.pt", extra={"frames": 24, "note": "mine"})
    first.push_audio(clip.audio[half:])
    expected = chunks(first, 3)

    other = StreamSession("tiny-avatar", 64, 64, cache_from=cache_from)
    other.start(make_clip(6, 1, "test", 64, 64).reference, seed=9)  # (another stream, replaced)
    chunks(other, 1)
    assert restore_session_state(other, tmp_path / "state.pt") == {"frames": 24, "note": "mine"}
    other.push_audio(clip.audio[half:])
    np.testing.assert_array_equal(chunks(other, 3), expected)
    assert other.chunk_index == first.chunk_index and other.seed == 3

    fresh = StreamSession("tiny-avatar", 64, 64, cache_from=cache_from)  # (never started)
    restore_session_state(fresh, tmp_path / "state.pt")
    fresh.push_audio(clip.audio[half:])
    np.testing.assert_array_equal(chunks(fresh, 3), expected)


@torch.no_grad()
def test_a_wan_autoencoder_through_a_tiny_decoder_goes_on_as_it_was(tmp_path):
    """The decoder's state is a pytree of its own per autoencoder (Wan's feature cache; the tiny
    decoder's memory, in channels_last)."""
    from bench.gpu import build_model, start_stream
    from streamgen.model.tiny_decoder import TinyDecoder, TinyDecoderConfig, TinyDecoderVAE

    model = build_model("wan2.1-1.3b", 32, 32, "cpu", torch.float32, True, "sdpa")
    model.vae = TinyDecoderVAE(
        model.vae, TinyDecoder(TinyDecoderConfig(latent_channels=4, widths=(8, 8, 8, 8)))
    )
    first = StreamSession(model, 32, 32, device="cpu", dtype=torch.float32)
    start_stream(first, speech_s=3.0)
    chunks(first, 1)
    save_session_state(first, tmp_path / "state.pt")
    expected = chunks(first, 2)
    second = StreamSession(model, 32, 32, device="cpu", dtype=torch.float32)
    restore_session_state(second, tmp_path / "state.pt")
    np.testing.assert_array_equal(chunks(second, 2), expected)


def test_a_state_that_does_not_fit_is_refused_and_the_session_goes_on(tmp_path, clip):
    saved = StreamSession("tiny-avatar", 64, 64)
    with pytest.raises(RuntimeError, match="start"):
        save_session_state(saved, tmp_path / "none.pt")  # (not started: nothing to save)
    saved.start(clip.reference, seed=1)
    chunks(saved, 1)
    save_session_state(saved, tmp_path / "state.pt")

    running = StreamSession("tiny-avatar", 32, 32)
    running.start(clip.reference[::2, ::2], seed=2)
    twin = StreamSession("tiny-avatar", 32, 32)
    twin.start(clip.reference[::2, ::2], seed=2)
    (tmp_path / "junk.pt").write_bytes(b"not a state")
    torch.save({"version": 0}, tmp_path / "old.pt")
    for path, match in [
        (tmp_path / "state.pt", "another size or dtype"),
        (tmp_path / "junk.pt", "not a saved stream state"),
        (tmp_path / "old.pt", "not a stream state of this version"),
        (tmp_path / "missing.pt", "not a saved stream state"),
    ]:
        with pytest.raises(SessionStateError, match=match):
            restore_session_state(running, path)
    np.testing.assert_array_equal(chunks(running, 2), chunks(twin, 2))  # (as if nothing was tried)


def test_a_sequence_parallel_session_neither_saves_nor_takes_a_state(tmp_path, clip):
    """Its cache holds one process's shard of every frame's tokens (and of the heads): a state of it
    would be one rank's, and a whole state put into it would be rotated with the shard's grid. Both
    are refused before anything is read or written (here over a world of one process, which shards
    the cache all the same: a ShardedStreamCache)."""
    import torch.distributed as dist

    from streamgen.parallel.apply import ShardedStreamCache, apply_sequence_parallel
    from streamgen.parallel.launch import join_process_group

    whole = StreamSession("tiny-avatar", 64, 64)
    whole.start(clip.reference, seed=1)
    chunks(whole, 1)
    save_session_state(whole, tmp_path / "state.pt")
    # (a store in memory: a port chosen and let go for a tcp:// rendezvous could be taken by another
    # test process (-n 2) before the group's store bound it)
    join_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        sharded = StreamSession("tiny-avatar", 64, 64)
        apply_sequence_parallel(sharded.dit, None, "ring")
        sharded.start(clip.reference, seed=1)
        assert isinstance(sharded.cache, ShardedStreamCache)
        with pytest.raises(SessionStateError, match="sequence-parallel"):
            save_session_state(sharded, tmp_path / "sharded.pt")
        assert not (tmp_path / "sharded.pt").exists()
        cache = sharded.cache
        with pytest.raises(SessionStateError, match="sequence-parallel"):
            restore_session_state(sharded, tmp_path / "state.pt")
        assert sharded.cache is cache and sharded.seed == 1
    finally:
        dist.destroy_process_group()
