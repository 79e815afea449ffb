"""StreamSession.decode_beside_reencode on the CPU (alone and in a batch, stream_batch.next_chunks), its CUDA streams stood in for by fakes that
record which stream each piece of work was queued on. The path has run on no GPU yet
(tests/test_gpu_check.py has the CUDA test, bench gpu the variant): here its frames, the streams
its work goes to, and a chunk that fails on it (tests/test_stream_atomic.py's faults) are
checked before a GPU run spends its minutes on them."""

import threading
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from stream_helpers import face, speech
from test_stream_atomic import (
    FAULTS,
    InjectedFault,
    assert_a_failed_chunk_is_undone,
    assert_makes_the_chunks,
    assert_same_state,
    fault_at,
    session_state,
)
from torch.utils._pytree import tree_leaves

from streamgen.models import load_model
from streamgen.stream import StreamSession
from streamgen.stream_batch import next_chunks, write_pending_chunks


class FakeStream:
    """What the path asks of a torch.cuda.Stream: wait_stream (recorded)."""

    def __init__(self, name: str, log: list):
        self.name, self.log = name, log

    def wait_stream(self, other: "FakeStream") -> None:
        self.log.append(("wait", self.name, other.name))


@pytest.fixture
def streams(monkeypatch):
    """(log, the current stream stack): torch.cuda's current_stream and stream context, and
    Tensor.record_stream, on fake streams. The log holds ("wait", waiter, waited) and ("record",
    stream, shape)."""
    log: list = []
    current = [FakeStream("main", log)]

    @contextmanager
    def stream(s):
        current.append(s)
        try:
            yield
        finally:
            current.pop()

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current[-1])
    monkeypatch.setattr(torch.cuda, "stream", stream)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda t, s: log.append(("record", s.name, t.shape)))
    return log, current


@pytest.fixture(scope="module")
def model():
    return load_model("debug")


def started(model, cache_from="reencode", side=None) -> StreamSession:
    s = StreamSession(model, cache_from=cache_from)
    s.start(face(), seed=5)
    s.push_audio(speech(6.0))
    if side is not None:  # (the setter makes a torch.cuda.Stream, which needs a CUDA device)
        s._decode_stream = side
    return s


@contextmanager
def on_stream_of(module: torch.nn.Module, seen: list, current: list):
    """Record the name of the current stream at each of `module`'s forwards."""
    handle = module.register_forward_pre_hook(lambda *_: seen.append(current[-1].name))
    try:
        yield
    finally:
        handle.remove()


@pytest.mark.parametrize("cache_from", ["reencode", "last_step"])
def test_a_stream_decoded_beside_its_reencode_makes_the_same_frames(model, streams, cache_from):
    """Each chunk decodes on the second stream after waiting for the first (the denoised latents),
    its latents and decoder state recorded there before the decode reads them; the re-encode runs
    on the first stream, and is written before next_chunk returns; the frames are the same."""
    log, current = streams
    alone = started(model, cache_from)
    want = [alone.next_chunk() for _ in range(alone.chunks_to_full_ring + 1)]

    s = started(model, cache_from, side=FakeStream("side", log))
    decodes, forwards = [], []
    with on_stream_of(s.vae.dec, decodes, current), on_stream_of(s.dit, forwards, current):
        for i, (frames, pts) in enumerate(want):
            log.clear()
            got_frames, got_pts = s.next_chunk()
            np.testing.assert_array_equal(got_frames, frames)
            assert got_pts == pts
            assert not s.chunk_pending  # written on the first stream, beside the decode
            assert log[0] == ("wait", "side", "main"), log
            recorded = [entry[2] for entry in log[1:]]
            assert all(entry[:2] == ("record", "side") for entry in log[1:]) and recorded, log
            assert recorded[0][2] == s.cfg.frames_per_chunk  # the chunk's latents [1, C, F, h, w]
            if i:  # the decoder's state from the chunk before (none before the first)
                assert len(recorded) > 1, log
    assert set(decodes) == {"side"} and len(decodes) >= len(want)
    assert set(forwards) == {"main"}


# the faults of test_stream_atomic whose work this path moves: the re-encode, now after the
# decode inside the chunk, and the decode itself, now on the second stream
BESIDE_FAULTS = {
    "decode": FAULTS["decode"],
    # the last layer of this chunk's clean re-encode, after its 4 denoising steps (the debug model's)
    "re-encode's last layer": lambda s: (s.dit.blocks[-1].self_attn, s.steps + 1),
    "re-encode's first layer": lambda s: (s.dit.blocks[0].self_attn, s.steps + 1),
    "denoise step 2 of 4": FAULTS["denoise step 2 of 4"],
}
CASES = [(where, cache_from) for where in BESIDE_FAULTS for cache_from in ("reencode", "last_step")
         if not (where.startswith("re-encode") and cache_from == "last_step")]  # fmt: skip


@contextmanager
def fault_at_the_copy_to_the_host(current: list):
    """The frames' copy to the host on the second stream raises: where a GPU says that the decode
    failed (its asynchronous error), or a Ctrl-C lands while the copy waits for the decode. The
    re-encode has written the chunk into the ring by then."""
    cpu = torch.Tensor.cpu

    def failing(t, *args, **kwargs):
        if current[-1].name == "side":
            raise InjectedFault("injected")
        return cpu(t, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.Tensor, "cpu", failing)
        yield


@pytest.mark.parametrize(
    ("where", "cache_from"), CASES + [("copy to the host", c) for c in ("reencode", "last_step")]
)
def test_a_chunk_that_fails_beside_its_reencode_leaves_the_session_as_it_was(
    model, streams, where, cache_from
):
    """The re-encode runs inside the chunk here (after its decode is queued), so a failure in it,
    in the decode or in the copy of the frames after it must put back the ring's slots, the
    decoder state and the rest; the retry makes the chunk an unfaulted session makes."""
    log, current = streams
    alone = started(model, cache_from)
    before = alone.chunks_to_full_ring
    want = [alone.next_chunk() for _ in range(before + 2)][before:]

    s = started(model, cache_from, side=FakeStream("side", log))
    for _ in range(before):
        s.next_chunk()
    if where == "copy to the host":
        fault = fault_at_the_copy_to_the_host(current)
    else:
        fault = fault_at(*BESIDE_FAULTS[where](s))
    assert_a_failed_chunk_is_undone(s, fault)
    assert_makes_the_chunks(s, want)


def started_pair(model, cache_from: str, log: list | None = None) -> list[StreamSession]:
    """Two sessions of one batch key, another face and seed each (with `log`: decoding beside their
    re-encodes, on fake second streams that record into it)."""
    sessions = [started(model, cache_from), started(model, cache_from)]
    sessions[1].start(face(seed=1), seed=6)
    sessions[1].push_audio(speech(6.0, seed=1))
    if log is not None:
        for s in sessions:
            s._decode_stream = FakeStream("side", log)
    return sessions


@pytest.mark.parametrize("cache_from", ["reencode", "last_step"])
def test_a_batch_decoded_beside_its_reencode_makes_the_frames_of_a_plain_batch(model, streams, cache_from):
    """next_chunks of sessions that decode beside their re-encodes: the batch's decode waits for the
    first stream and runs on the second, its latents and decoder states recorded there, and its
    re-encode runs on the first before next_chunks returns; frames, pts and caches are those of the
    same batch made the plain way, bit for bit."""
    log, current = streams
    plain = started_pair(model, cache_from)
    want = [next_chunks(plain) for _ in range(plain[0].chunks_to_full_ring + 1)]
    write_pending_chunks(plain)

    sessions = started_pair(model, cache_from, log)
    decodes, forwards = [], []
    with on_stream_of(model.vae.dec, decodes, current), on_stream_of(model.dit, forwards, current):
        for i, chunks in enumerate(want):
            log.clear()
            forwards_before = len(forwards)
            got = next_chunks(sessions)
            # its denoising steps, then (under "reencode") its re-encode, one forward for the batch
            steps = sessions[0].steps
            assert len(forwards) - forwards_before == steps + (cache_from == "reencode")
            for (frames, pts), (got_frames, got_pts) in zip(chunks, got, strict=True):
                np.testing.assert_array_equal(got_frames, frames)
                assert got_pts == pts
            assert not any(s.chunk_pending for s in sessions)  # written beside the decode
            assert log and log[0] == ("wait", "side", "main"), log
            recorded = [entry[2] for entry in log[1:]]
            assert all(entry[:2] == ("record", "side") for entry in log[1:]) and recorded, log
            assert recorded[0][0] == 2 and recorded[0][2] == model.cfg.frames_per_chunk  # the batch's latents
            if i:  # each session's decoder state from the chunk before
                assert len(recorded) > 2, log
    assert set(decodes) == {"side"} and len(decodes) >= len(want)
    assert set(forwards) == {"main"}
    for s, p in zip(sessions, plain):
        assert_same_state(session_state(s), session_state(p))


@pytest.mark.parametrize("with_on_error", [False, True])
@pytest.mark.parametrize(
    ("where", "cache_from"), CASES + [("copy to the host", c) for c in ("reencode", "last_step")]
)
def test_a_batchs_chunk_that_fails_beside_its_reencode_leaves_its_sessions_as_they_were(
    model, streams, where, cache_from, with_on_error
):
    """As one session's: a batch's re-encode runs inside its chunk beside the decode, so a failure
    in it, in the decode or in the copy of the frames puts each session back as it was (its ring's
    slots among the rest), reported as each session's failure with on_error; the retry makes the
    chunks of a plain batch that never failed."""
    log, current = streams
    plain = started_pair(model, cache_from)
    before = plain[0].chunks_to_full_ring
    want = [next_chunks(plain) for _ in range(before + 2)][before:]

    sessions = started_pair(model, cache_from, log)
    for _ in range(before):
        next_chunks(sessions)
    states = [session_state(s) for s in sessions]
    if where == "copy to the host":
        fault = fault_at_the_copy_to_the_host(current)
    else:
        fault = fault_at(*BESIDE_FAULTS[where](sessions[0]))
    failures = []
    with fault:
        if with_on_error:
            assert next_chunks(sessions, on_error=lambda i, e: failures.append((i, str(e)))) == [None, None]
        else:
            with pytest.raises(InjectedFault, match="injected"):
                next_chunks(sessions)
    assert failures == ([(0, "injected"), (1, "injected")] if with_on_error else [])
    for s, state in zip(sessions, states):
        assert_same_state(session_state(s), state)
    for chunks in want:
        for (frames, pts), (got_frames, got_pts) in zip(chunks, next_chunks(sessions), strict=True):
            np.testing.assert_array_equal(got_frames, frames)
            assert got_pts == pts


def test_a_stream_that_stops_decoding_beside_records_its_decoder_state_on_the_first_stream(model, streams):
    """The decoder state a chunk decoded beside its re-encode was made on the second stream; once
    the switch goes off the next decode reads it on the first, and then lets it go. Recorded on the
    first stream as the switch goes off, its memory is not handed to another tensor of the
    second stream's (a stream of torch's pool a later switch may get again) before that read is done."""
    log, _ = streams
    s = started(model, side=FakeStream("side", log))
    s.next_chunk()
    state = [t for t in tree_leaves(s.decoder_state) if isinstance(t, torch.Tensor)]
    assert state
    log.clear()
    s.decode_beside_reencode = False
    assert log == [("record", "main", t.shape) for t in state]
    log.clear()
    s.next_chunk()  # on the first stream alone now
    assert log == []


@pytest.mark.parametrize("batched", [False, True], ids=["alone", "in a batch"])
def test_switching_decode_beside_off_waits_for_the_chunk_another_thread_is_making(model, streams, batched):
    """The switch turned off by another thread while a chunk that began on the beside path runs: it
    waits for that chunk (the session's lock, as close does), which decodes on the second stream it
    began with, and the next chunk runs on the first stream alone. Unlocked, the switch went off in
    the middle of the chunk: the chunk found no second stream at its decode (an AttributeError), or
    in a batch decoded the plain way and left the re-encode it had undertaken pending."""
    log, _ = streams
    sessions = started_pair(model, "reencode", log) if batched else [started(model, side=FakeStream("side", log))]
    s = sessions[0]
    switching, switched = threading.Event(), threading.Event()

    def switch_off():
        switching.set()
        s.decode_beside_reencode = False
        switched.set()

    switcher = threading.Thread(target=switch_off)
    waits = []

    def at_the_chunks_first_forward(*_):  # the chunk has chosen its path and holds the session
        if not switcher.is_alive() and not waits:
            switcher.start()
            waits.append(switching.wait(10))
            waits.append(switched.wait(1))  # bounded: a switch that waits for the chunk is not done

    handle = model.dit.register_forward_pre_hook(at_the_chunks_first_forward)
    try:
        next_chunks(sessions) if batched else s.next_chunk()
    finally:
        handle.remove()
        switcher.join(10)
    assert not switcher.is_alive() and switched.is_set()
    assert waits == [True, False]  # the switch was under way, and waited for the chunk
    assert log[0] == ("wait", "side", "main") and not any(x.chunk_pending for x in sessions), log
    assert not s.decode_beside_reencode
    log.clear()
    s.next_chunk()  # on the first stream alone now
    assert log == []
