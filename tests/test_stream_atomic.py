"""A next_chunk that fails part way (the model raising in a denoising step, a CUDA OOM, a Ctrl-C)
leaves its session as it was before the call: its audio timeline, its generator, its KV cache and
its counters (but for the last chunk's clean re-encode, which the chunk writes first: it stays
written, the same keys and values a retry would write). A retry then makes the very chunk a first
success would have made."""

from contextlib import contextmanager

import numpy as np
import pytest
import torch
from stream_helpers import face, speech

from streamgen.models import load_model
from streamgen.stream import StreamSession


class InjectedFault(RuntimeError):
    pass


@pytest.fixture(scope="module")
def model():
    return load_model("debug")


def started(model, cache_from: str) -> StreamSession:
    s = StreamSession(model, cache_from=cache_from)
    s.start(face(), seed=5)
    s.push_audio(speech(6.0))
    return s


def at_a_full_ring(model, cache_from: str) -> StreamSession:
    """A started session past a full ring's worth of chunks (the chunk the FAULTS below fail)."""
    s = started(model, cache_from)
    for _ in range(s.chunks_to_full_ring):
        s.next_chunk()
    return s


def assert_makes_the_chunks(s: StreamSession, want: list) -> None:
    """`s`'s next chunks (a failed chunk's retry, and the chunk after it) are `want`'s, bit for bit."""
    for frames, pts in want:
        got_frames, got_pts = s.next_chunk()
        np.testing.assert_array_equal(got_frames, frames)
        assert got_pts == pts


def assert_a_failed_chunk_is_undone(s: StreamSession, fault, error=InjectedFault) -> None:
    """`s`'s next chunk, made under `fault` (a context that injects `error`), fails and leaves
    `s` as it was before it."""
    state = session_state(s)
    with fault, pytest.raises(error, match="injected"):
        s.next_chunk()
    assert_same_state(session_state(s), state)


@contextmanager
def fault_at(module: torch.nn.Module, call: int, error=InjectedFault):
    """`module`'s `call`-th forward (from 1) inside the block raises `error` before it runs."""
    calls = []

    def hook(*_):
        calls.append(1)
        if len(calls) == call:
            raise error("injected")

    handle = module.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def session_state(s: StreamSession) -> dict:
    """What a chunk reads of a session, copied (the cache's chunk region is rewritten by each step)."""
    layers = [
        [t.clone() for t in (layer.k[:, : layer.sink_end], layer.k[:, layer.chunk_end :],
                             layer.v[:, : layer.sink_end], layer.v[:, layer.chunk_end :], layer.k_ring_raw)]
        for layer in s.cache.layers
    ]  # fmt: skip
    return {
        "chunk_index": s.chunk_index,
        "video_time": s.video_time,
        "buffered": s.audio_buffered_seconds,
        "pending": s.chunk_pending,
        "generator": s.generator.get_state(),
        "frames_written": s.cache.frames_written,
        "layers": layers,
    }


def assert_same_state(got: dict, want: dict) -> None:
    for key in want:
        if key == "layers":
            for got_layer, want_layer in zip(got[key], want[key]):
                for a, b in zip(got_layer, want_layer):
                    assert torch.equal(a, b)
        elif key == "generator":
            assert torch.equal(got[key], want[key])
        else:
            assert got[key] == want[key], key


# where the fault is: which module's forward raises, at its how-many-th call in the chunk. The chunk
# follows a full ring's worth of chunks: its re-encode overwrites the ring slots it attends to
FAULTS = {
    "denoise step 2 of 4": lambda s: (s.dit, 2),
    # the last layer of the last step, which under "last_step" writes the ring (layer 0 has written)
    "last step's last layer": lambda s: (s.dit.blocks[-1].self_attn, 4),
    # the last layer of the last chunk's clean re-encode, at the chunk's start (layer 0 has written)
    "re-encode's last layer": lambda s: (s.dit.blocks[-1].self_attn, 1),
    "decode": lambda s: (s.vae.dec, 1),
}


# (under "last_step" a chunk's keys are written by its last step: it has no re-encode)
CASES = [(where, cache_from) for where in FAULTS for cache_from in ("reencode", "last_step")
         if (where, cache_from) != ("re-encode's last layer", "last_step")]  # fmt: skip


@pytest.mark.parametrize(("where", "cache_from"), CASES)
@pytest.mark.parametrize("error", [InjectedFault, KeyboardInterrupt])
def test_a_chunk_that_fails_leaves_the_session_as_it_was_and_its_retry_makes_the_same_chunk(
    model, cache_from, where, error
):
    alone = at_a_full_ring(model, cache_from)
    want = [alone.next_chunk() for _ in range(2)]

    s = at_a_full_ring(model, cache_from)
    if where != "re-encode's last layer":
        # the last chunk's clean re-encode, which a chunk writes first, written as a server's
        # worker writes it while the frames travel: a chunk that fails later leaves it written
        s.write_pending_chunk()
    assert_a_failed_chunk_is_undone(s, fault_at(*FAULTS[where](s), error), error)
    assert_makes_the_chunks(s, want)


# after the opening re-encode (the DiT's first forward in the chunk): its second denoising step, the decode
AFTER_REENCODE = {"denoise step 2 of 4": lambda s: (s.dit, 3), "decode": FAULTS["decode"]}


@pytest.mark.parametrize("where", AFTER_REENCODE)
def test_a_chunk_that_fails_after_its_opening_reencode_keeps_it_and_its_retry_makes_the_same_chunk(model, where):
    """A chunk whose last chunk's clean re-encode is still pending writes it first; where the chunk
    fails after that, the re-encode stays written: the session is as it was with that chunk written
    (as `write_pending_chunk` writes it), bit for bit, and the retry makes the chunks of a session that
    never failed. (The re-encode reads what the last chunk left alone: written at the failed call or
    at the retry, it writes the same keys and values.)"""
    alone = at_a_full_ring(model, "reencode")
    want = [alone.next_chunk() for _ in range(2)]

    written = at_a_full_ring(model, "reencode")
    written.write_pending_chunk()
    state = session_state(written)

    s = at_a_full_ring(model, "reencode")
    assert s.chunk_pending  # (the failed call writes it first)
    module, call = AFTER_REENCODE[where](s)
    with fault_at(module, call), pytest.raises(InjectedFault, match="injected"):
        s.next_chunk()
    assert_same_state(session_state(s), state)
    assert_makes_the_chunks(s, want)


def test_a_failed_chunk_keeps_the_audio_pushed_while_it_ran(model):
    """Audio another thread pushes while a chunk runs (here: from inside its denoising, the video
    ahead of the audio) starts after the audio that chunk takes, as after a first success: the
    retry is that chunk, and the chunks after it read the audio as after a success."""
    late = speech(1.0, seed=7)

    def silent_start() -> StreamSession:
        s = StreamSession(model)
        s.start(face(), seed=5)
        s.next_chunk()
        s.write_pending_chunk()  # (the next forward is the next chunk's first step, after its audio)
        return s

    alone = silent_start()
    want = [alone.next_chunk()[0]]
    alone.push_audio(late)  # (after the chunk that was running: at the position it took up to)
    want += [alone.next_chunk()[0] for _ in range(3)]

    s = silent_start()
    pushed = []

    def push_then_fail(*_):
        if not pushed:
            pushed.append(1)
            s.push_audio(late)
        raise InjectedFault("injected")

    handle = s.dit.register_forward_pre_hook(push_then_fail)
    try:
        with pytest.raises(InjectedFault):
            s.next_chunk()
    finally:
        handle.remove()
    assert s.audio_buffered_seconds > alone.audio_buffered_seconds  # (pushed, not yet read)
    for frames in want:
        np.testing.assert_array_equal(s.next_chunk()[0], frames)


@torch.no_grad()
def test_a_failed_decode_leaves_wans_feature_cache_as_it_was():
    """Wan's autoencoder kept its stream state, the feature cache, in a list its decoder rewrote in
    place: a decode that failed after its first convolutions left some of them a chunk on, and
    the retry's frames were decoded against them."""
    from bench.gpu import build_model

    model = build_model("wan2.1-1.3b", 32, 32, "cpu", torch.float32, True, "sdpa")

    def started_wan() -> StreamSession:
        s = StreamSession(model, 32, 32, device="cpu", dtype=torch.float32)
        s.start(face(h=32, w=32), seed=2)
        s.push_audio(speech(3.0))
        s.next_chunk()
        return s

    alone = started_wan()
    want = [alone.next_chunk()[0] for _ in range(2)]
    s = started_wan()
    with fault_at(s.vae.vae.decoder.up_blocks[-1], 1), pytest.raises(InjectedFault):
        s.next_chunk()
    for frames in want:
        np.testing.assert_array_equal(s.next_chunk()[0], frames)


@pytest.mark.parametrize("cache_from", ["reencode", "last_step"])
def test_a_batchs_failed_chunk_leaves_its_sessions_as_they_were(model, cache_from):
    """next_chunks: a shared denoising forward that fails (with on_error: each session's failure)
    puts each session back as it was, as a session's own next_chunk does; the retry's chunks are
    those an unfaulted batch makes."""
    from streamgen.stream_batch import next_chunks

    def pair() -> list[StreamSession]:
        sessions = [started(model, cache_from), started(model, cache_from)]
        sessions[1].start(face(seed=1), seed=6)
        sessions[1].push_audio(speech(6.0, seed=1))
        for _ in range(sessions[0].chunks_to_full_ring):
            next_chunks(sessions)
        for s in sessions:
            s.write_pending_chunk()
        return sessions

    alone = pair()
    want = [next_chunks(alone) for _ in range(2)]
    sessions = pair()
    states = [session_state(s) for s in sessions]
    failures = []
    with fault_at(model.dit, 2):
        assert next_chunks(sessions, on_error=lambda i, e: failures.append(i)) == [None, None]
    assert failures == [0, 1]
    for s, state in zip(sessions, states):
        assert_same_state(session_state(s), state)
    for chunks in want:
        for (frames, pts), (got_frames, got_pts) in zip(chunks, next_chunks(sessions)):
            np.testing.assert_array_equal(got_frames, frames)
            assert got_pts == pts


@pytest.mark.parametrize(
    ("where", "cache_from"), [("re-encode's last layer", "reencode"), ("last step's last layer", "last_step")]
)
def test_a_chunk_that_fails_under_fp8_attention_is_undone_with_the_caches_e4m3_copies(where, cache_from):
    """The FP8 backends read the cache's keys and values through e4m3 copies that it makes again
    only where they changed (`KVCache.fp8_keys`, `fp8_values`): a ring write counted as such and
    then put back by the failed chunk's undo must leave no copy of the chunk it took back. The
    retry and the chunks after it are a session's that never failed, bit for bit (a GPU's FP8
    path, here on the reference quantization; "fp8" quantizes the keys and the values)."""
    model = load_model("debug", attn_backend="fp8")
    alone = started(model, cache_from)
    before = alone.chunks_to_full_ring
    want = [alone.next_chunk() for _ in range(before + 3)][before:]

    s = started(model, cache_from)
    for _ in range(before):
        s.next_chunk()
    assert_a_failed_chunk_is_undone(s, fault_at(*FAULTS[where](s)))
    assert_makes_the_chunks(s, want)
