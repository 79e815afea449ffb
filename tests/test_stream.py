"""StreamSession: reproducible, bounded, audio-driven, and strict about bad input (the teacher's
session: test_stream_teacher)."""

import dataclasses

import numpy as np
import pytest
import torch
from stream_helpers import face, run, speech

from streamgen.model.audio import SAMPLES_PER_FRAME, AudioEncoder
from streamgen.model.config import get_config
from streamgen.models import load_model
from streamgen.stream import CHUNK_STAGES, StreamSession


@pytest.fixture(scope="module")
def model():
    return load_model("debug")


def recorder():
    """(the stages seen, an `observe` hook that records each and runs it)."""
    seen = []

    def observe(stage, fn):
        seen.append(stage)
        return fn()

    return seen, observe


def test_frames_shape_pts_and_reproducibility(model):
    s, a = run(model, [speech(2.0)], 3, seed=7)
    _, b = run(model, [speech(2.0)], 3, seed=7)
    _, c = run(model, [speech(2.0)], 3, seed=8)
    frames, pts = a[1]
    assert frames.dtype == np.uint8 and frames.shape == (s.frames_per_chunk, 64, 64, 3)
    assert pts == pytest.approx(s.chunk_seconds)
    assert all(np.array_equal(x[0], y[0]) for x, y in zip(a, b))
    assert not np.array_equal(a[2][0], c[2][0])


def test_audio_in_one_piece_or_in_pieces_gives_the_same_video(model):
    audio = speech(2.0)
    _, whole = run(model, [audio], 4)
    pieces = np.array_split(audio, 4)
    _, streamed = run(model, pieces, 4)
    # pieces arrive ahead of when they are needed, so the timeline is the same
    s = StreamSession(model)
    assert len(pieces[0]) / 16000 > s.chunk_seconds + s.audio_lookahead_seconds
    assert all(np.array_equal(x[0], y[0]) for x, y in zip(whole, streamed))


def test_audio_changes_the_video(model):
    _, silent = run(model, [], 2)
    _, spoken = run(model, [speech(2.0, seed=3) * 3], 2)
    assert not np.array_equal(silent[1][0], spoken[1][0])


def test_audio_encoder_streaming_equals_whole_clip():
    torch.manual_seed(0)
    enc = AudioEncoder(get_config("debug")).eval()
    pcm = torch.randn(1, 40 * SAMPLES_PER_FRAME)
    with torch.no_grad():
        whole = enc(pcm)
        rf = enc.receptive_field_frames
        start = 25  # recompute frames >= 25 from only rf frames of left context
        part = enc(pcm[:, (start - rf) * SAMPLES_PER_FRAME :])[:, rf:]
    assert torch.allclose(part, whole[:, start:], atol=1e-5)


def test_memory_is_bounded_over_a_long_stream(model):
    s = StreamSession(model)
    s.start(face())
    sizes = []
    for i in range(60):
        s.push_audio(speech(s.chunk_seconds, seed=i))
        s.next_chunk()
        sizes.append(s._pcm.size)
    assert max(sizes[20:]) <= max(sizes[:20])
    assert s.cache.memory_bytes() == s.dit.new_cache(1, s.latent_hw).memory_bytes()


def test_late_audio_never_accumulates_latency(model):
    s = StreamSession(model)
    s.start(face())
    for _ in range(5):
        s.next_chunk()  # no audio arrived: silence
    s.push_audio(speech(0.5))
    # the late audio starts at the current position, not in the past
    assert s.audio_buffered_seconds == pytest.approx(0.5, abs=1e-3)


def test_bad_input_is_rejected_clearly(model):
    s = StreamSession(model)
    with pytest.raises(RuntimeError, match="start"):
        s.next_chunk()
    with pytest.raises(ValueError, match="uint8"):
        s.start(np.zeros((64, 64, 3), np.float32))
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        s.start(np.zeros((64, 64, 5), np.uint8))
    s.start(face(h=100, w=80))  # other sizes are cropped and resized
    with pytest.raises(ValueError, match="mono"):
        s.push_audio(np.zeros((2, 100), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        s.push_audio(np.array([np.nan], np.float32))
    small = StreamSession(model, max_audio_ahead_s=1.0)
    small.start(face())
    with pytest.raises(BufferError, match="full"):
        small.push_audio(np.zeros(20000, np.int16))
    with pytest.raises(ValueError, match="multiples"):
        StreamSession(model, height=60, width=64)


def test_silence_never_gives_black_or_frozen_frames(model):
    s = StreamSession(model)
    s.start(face(), seed=0)
    previous = None
    for _ in range(4):  # no audio at all
        frames, _ = s.next_chunk()
        assert frames.reshape(len(frames), -1).max(axis=1).min() > 16  # no black frame
        if previous is not None:
            assert not np.array_equal(frames[0], previous[-1])  # the stream moves on
        assert all(not np.array_equal(a, b) for a, b in zip(frames[:-1], frames[1:]))
        previous = frames


def test_the_caption_encoder_loads_without_a_progress_bar():
    """`generate --text ... --quiet` showed transformers' "Loading weights" bar."""
    import subprocess
    import sys

    code = "from streamgen.model.text import embed_sentences; embed_sentences(['smiling'])"
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert "Loading weights" not in run.stderr + run.stdout


def test_caption_conditions_through_minilm():
    from streamgen.model.text import TEXT_DIM, embed_sentences, text_context

    e = embed_sentences(["a smiling person", "a smiling face", "quarterly tax report"])
    assert e.shape == (3, TEXT_DIM)
    assert (e[0] @ e[1]) > (e[0] @ e[2]) + 0.2  # real sentence embeddings, not noise
    assert torch.equal(text_context(None, TEXT_DIM), torch.zeros(1, 1, TEXT_DIM))
    tiny = load_model("tiny-avatar")
    s = StreamSession(tiny, height=64, width=64)
    s.start(face(), text="smiling", seed=0)
    with_text, _ = s.next_chunk()
    s.start(face(), seed=0)
    without, _ = s.next_chunk()
    assert not np.array_equal(with_text, without)


def test_changing_the_caption_mid_stream_takes_effect():
    tiny = load_model("tiny-avatar")

    def second_chunk(caption_after_first):
        s = StreamSession(tiny, height=64, width=64)
        s.start(face(), seed=0)
        s.next_chunk()
        if caption_after_first:
            s.set_text(caption_after_first)
        return s.next_chunk()[0]

    assert not np.array_equal(second_chunk(None), second_chunk("surprised"))


def test_a_model_predicting_other_channels_than_it_takes_refuses_to_stream():
    """out_channels != in_channels (a Wan config field; a model.json may say it): a tensor size error
    at the first chunk, a traceback from generate."""
    with pytest.raises(ValueError, match="its DiT predicts 8 latent channels of 4: "):
        StreamSession(load_model("debug", out_channels=8))


@pytest.mark.parametrize("cache_from", ["reencode", "last_step"])
def test_batched_sessions_make_the_frames_they_would_make_alone(model, cache_from):
    from streamgen.stream_batch import next_chunks

    def started(seed, **kw):
        s = StreamSession(model, cache_from=cache_from, **kw)
        s.start(face(seed), seed=seed)
        s.push_audio(speech(4.0, seed=seed))
        return s

    alone = [started(1), started(2), started(3)]
    batched = [started(1), started(2), started(3)]
    n_fill = alone[0].cfg.window_frames // alone[0].cfg.frames_per_chunk + 1
    for _ in range(n_fill):  # past the window: every session at the full fill level
        for a, b in zip(alone, batched):
            a.next_chunk()
            b.next_chunk()
    late = started(4)  # still filling its window: served on its own
    for _ in range(2):
        got = next_chunks([*batched, late])
        want = [a.next_chunk() for a in alone]
        for (frames, pts), (ref, ref_pts) in zip(got, want):
            assert pts == ref_pts
            assert np.abs(frames.astype(int) - ref.astype(int)).max() <= 1
        assert got[3][1] < got[0][1]  # the late session's own timeline
    assert not np.array_equal(got[0][0], got[1][0])  # rows are not mixed up


def test_autoencoder_dtypes_auto_follow_the_cpu_and_sessions_share_one_copy(monkeypatch):
    """auto: a bf16 decoder and reference encoder where the CPU has native bf16, float32 elsewhere;
    one copy per pair of dtypes and model."""
    model = load_model("debug")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert StreamSession(model).vae is model.vae
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    a = StreamSession(model)
    assert a.vae is StreamSession(model, decode_dtype=torch.bfloat16, encode_dtype="bfloat16").vae
    assert a.vae.dec_in.weight.dtype == torch.bfloat16 and a.vae.enc[0].weight.dtype == torch.bfloat16
    assert model.vae.dec_in.weight.dtype == model.vae.enc[0].weight.dtype == torch.float32
    for kept in (torch.float32, None, "float32"):  # the command-line names too
        assert StreamSession(model, decode_dtype=kept, encode_dtype=kept).vae is model.vae
    decoder_only = StreamSession(model, encode_dtype=torch.float32).vae
    assert decoder_only.dec_in.weight.dtype == torch.bfloat16 and decoder_only.enc is model.vae.enc
    encoder_only = StreamSession(model, decode_dtype=None).vae
    assert encoder_only.enc[0].weight.dtype == torch.bfloat16 and encoder_only.dec is model.vae.dec
    with pytest.raises(ValueError, match="decode dtype must be one of"):
        StreamSession(model, decode_dtype="float16")
    with pytest.raises(ValueError, match="encode dtype must be one of"):
        StreamSession(model, encode_dtype="float16")
    other = dataclasses.replace(model, vae=torch.nn.Identity())  # an autoencoder without a separable decoder
    assert other.session_vae(None) is other.vae
    with pytest.raises(ValueError, match="applies to TinyCausalVAE"):
        other.session_vae(torch.bfloat16)


def test_a_bfloat16_reference_encode_starts_the_stream_near_float32(model):
    """The reference latent from the bf16 encoder: within bf16's rounding of the fp32 one, and the
    frames of the stream it starts within a few levels."""
    latents, frames = {}, {}
    for dtype in (torch.float32, torch.bfloat16):
        s = StreamSession(model, decode_dtype=torch.float32, encode_dtype=dtype)
        s.start(face(), seed=3)
        s.push_audio(speech(1.0))
        latents[dtype] = s.reference_latent.float()
        frames[dtype] = np.concatenate([s.next_chunk()[0] for _ in range(2)]).astype(int)
    assert s.reference_latent.dtype == s.dtype  # the DiT's, whatever the encoder's
    rel = (latents[torch.bfloat16] - latents[torch.float32]).norm() / latents[torch.float32].norm()
    assert 0 < rel < 0.02
    diff = np.abs(frames[torch.float32] - frames[torch.bfloat16])
    assert diff.max() <= 4 and diff.mean() < 0.5


def test_bfloat16_decoder_frames_are_within_two_levels(model):
    frames = {}
    for dtype in (torch.float32, torch.bfloat16):
        s = StreamSession(model, decode_dtype=dtype)
        s.start(face(), seed=3)
        s.push_audio(speech(1.0))
        frames[dtype] = np.concatenate([s.next_chunk()[0] for _ in range(2)])
    diff = np.abs(frames[torch.float32].astype(int) - frames[torch.bfloat16].astype(int))
    assert frames[torch.bfloat16].dtype == np.uint8 and 0 < diff.max() <= 2


def test_an_observer_sees_every_stage_in_order_and_changes_nothing(model):
    _, plain = run(model, [speech(2.0)], 2)
    s = StreamSession(model)
    s.start(face(), seed=0)
    s.push_audio(speech(2.0))
    seen, observe = recorder()
    observed = [s.next_chunk(observe=observe) for _ in range(2)]
    assert seen == list(CHUNK_STAGES) * 2
    assert all(np.array_equal(x[0], y[0]) and x[1] == y[1] for x, y in zip(plain, observed))


def test_a_context_tensor_stands_for_the_text(model):
    s = StreamSession(model)
    context = torch.randn(1, 5, model.cfg.text_dim)
    s.start(face(), seed=0, context=context)
    assert torch.equal(s.context, context)
    frames, _ = s.next_chunk()
    assert frames.shape[0] == s.frames_per_chunk
    with pytest.raises(ValueError, match="a text or a context, not both"):
        s.start(face(), text="smiling", context=context)


def test_a_refused_start_leaves_the_running_stream_as_it_was(model):
    """A start refused for its arguments took the running stream's seed first (its next chunks
    changed); one whose context had the wrong width emptied its cache and left it 'started'."""
    _, whole = run(model, [speech(2.0)], 4, seed=3)
    s, first = run(model, [speech(2.0)], 2, seed=3)
    with pytest.raises(ValueError, match="a text or a context, not both"):
        s.start(face(1), text="x", context=torch.zeros(1, 2, model.cfg.text_dim), seed=5)
    with pytest.raises(ValueError, match=rf"context must be \[1, tokens, {model.cfg.text_dim}\]"):
        s.start(face(1), context=torch.zeros(1, 2, model.cfg.text_dim + 1), seed=5)
    rest = [s.next_chunk() for _ in range(2)]
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(whole, first + rest))


def test_a_start_that_fails_on_the_way_leaves_no_stream_started(model, monkeypatch):
    import streamgen.stream as stream_module

    s, _ = run(model, [speech(1.0)], 1)

    def fails(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(stream_module, "encode_sink", fails)
    model.start_memo.clear()
    with pytest.raises(RuntimeError, match="out of memory"):
        s.start(face(2), seed=1)
    with pytest.raises(RuntimeError, match="call start"):  # not chunks of an emptied cache
        s.next_chunk()


def test_a_chunk_is_written_into_the_cache_by_the_next_one_with_the_same_frames(model):
    """next_chunk returns its frames before its clean re-encode, which the next chunk runs first."""
    _, lazy = run(model, [speech(3.0)], 4)
    s = StreamSession(model)
    s.start(face(), seed=0)
    s.push_audio(speech(3.0))
    assert not s.chunk_pending
    eager = []
    for _ in range(4):  # the chunk written as soon as its frames are out, as before
        filled = s.cache.filled
        eager.append(s.next_chunk())
        assert s.chunk_pending and s.cache.filled == filled
        s.write_pending_chunk()
        assert not s.chunk_pending and s.cache.filled == min(
            filled + s.cfg.frames_per_chunk, s.cfg.window_frames
        )
    assert all(np.array_equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(lazy, eager))


def test_a_session_may_keep_each_chunk_from_its_last_step_instead_of_a_reencode(model):
    _, reencoded = run(model, [speech(3.0)], 3)
    s = StreamSession(model, cache_from="last_step")
    s.start(face(), seed=0)
    s.push_audio(speech(3.0))
    seen, observe = recorder()
    frames = []
    for _ in range(3):
        filled = s.cache.filled
        frames.append(s.next_chunk(observe=observe))  # written by its last step, nothing pending
        assert not s.chunk_pending and s.cache.filled == min(
            filled + s.cfg.frames_per_chunk, s.cfg.window_frames
        )
    assert seen == list(CHUNK_STAGES) * 3  # the "reencode" stage runs and has nothing to do
    assert np.array_equal(frames[0][0], reencoded[0][0])  # the same first chunk; the later ones
    assert not np.array_equal(frames[2][0], reencoded[2][0])  # read a cache made another way
    trained = dataclasses.replace(model, meta={**model.meta, "cache_from": "last_step"})
    assert StreamSession(trained).cache_from == "last_step"  # a model trained so streams so
    assert StreamSession(trained, cache_from="reencode").cache_from == "reencode"
    with pytest.raises(ValueError, match="cache_from must be one of"):
        StreamSession(model, cache_from="sometimes")
    # one step: its input is pure noise, whose keys/values say nothing of the chunk
    with pytest.raises(ValueError, match="needs 2 or more steps"):
        StreamSession(model, steps=1, cache_from="last_step")
    assert StreamSession(trained, steps=1).cache_from == "reencode"
    assert StreamSession(trained, steps=2).cache_from == "last_step"


def test_a_new_caption_finds_the_last_chunk_written_with_the_old_one():
    tiny = load_model("tiny-avatar")

    def second_chunk(write_first: bool):
        s = StreamSession(tiny, height=64, width=64)
        s.start(face(), seed=0)
        s.next_chunk()
        if write_first:
            s.write_pending_chunk()
        s.set_text("surprised")
        assert not s.chunk_pending
        return s.next_chunk()[0]

    assert np.array_equal(second_chunk(False), second_chunk(True))


def test_decoding_beside_the_reencode_needs_cuda(model):
    # two CUDA streams; on a GPU the frames are those of the sequential chunk (test_gpu_check.py)
    s = StreamSession(model)
    assert not s.decode_beside_reencode
    with pytest.raises(ValueError, match="needs a CUDA device"):
        s.decode_beside_reencode = True
    s.decode_beside_reencode = False
    assert not s.decode_beside_reencode


def test_decoding_beside_the_reencode_orders_its_work_by_stream(model, monkeypatch):
    # its CUDA calls stood in for on the CPU: the decode and the copy to the host go to the
    # second stream, after it waits for the denoising; the re-encode to the first, in between
    import contextlib

    events, current = [], ["main"]

    class FakeStream:
        def wait_stream(self, other):
            events.append(("side waits for", other))

    @contextlib.contextmanager
    def on_stream(stream):
        current.append("side")
        yield
        current.pop()

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: "main")
    monkeypatch.setattr(torch.cuda, "stream", on_stream)
    monkeypatch.setattr(
        torch.Tensor, "record_stream", lambda t, stream: events.append(("record", t.shape[0]))
    )
    monkeypatch.setattr(
        StreamSession,
        "_decode",
        lambda self, x, f=StreamSession._decode: events.append(("decode", current[-1])) or f(self, x),
    )
    monkeypatch.setattr(
        StreamSession,
        "write_pending_chunk",
        lambda self, f=StreamSession.write_pending_chunk: (
            (self._pending is not None and events.append(("reencode", current[-1]))) or f(self)
        ),
    )

    _, expected = run(model, [speech(2.0)], 3)
    s = StreamSession(model)
    s._decode_stream = FakeStream()  # what the switch makes on CUDA
    s.start(face(), seed=0)
    s.push_audio(speech(2.0))
    for frames, pts in expected:
        events.clear()
        got, got_pts = s.next_chunk()
        assert np.array_equal(got, frames) and got_pts == pts and not s.chunk_pending
        assert events[0] == ("side waits for", "main") and events[1][0] == "record"
        assert [e for e in events if e[0] in ("decode", "reencode")] == [
            ("decode", "side"),
            ("reencode", "main"),
        ]


def test_a_device_the_session_cannot_use_is_a_value_error_before_anything_loads(model):
    """An unknown name was torch's RuntimeError, "cuda" without CUDA an AssertionError from
    inside the model's load, and a model loaded on one device with a session on another failed
    at start() on a device mismatch deep in the DiT."""
    with pytest.raises(ValueError, match="unknown device 'bogus'"):
        StreamSession(model, device="bogus")
    if not torch.cuda.is_available():
        for cuda in ("cuda", "cuda:1"):
            with pytest.raises(ValueError, match="no CUDA device here"):
                StreamSession("debug", device=cuda)
    with pytest.raises(ValueError, match="debug is loaded on cpu, the session asked for meta"):
        StreamSession(model, device="meta")
    for same in ("cpu", "cpu:0", torch.device("cpu")):
        assert StreamSession(model, device=same).device.type == "cpu"


def test_an_audio_limit_that_takes_no_audio_or_never_ends_is_refused(model):
    """max_audio_ahead_s 0 or below refused every push (a BufferError at the first word); NaN and
    infinity were a raw ValueError and OverflowError from int()."""
    for wrong in (0, -1.0, float("nan"), float("inf"), "30"):
        with pytest.raises(ValueError, match="max_audio_ahead_s must be a finite number of seconds > 0"):
            StreamSession(model, max_audio_ahead_s=wrong)
    s = StreamSession(model, max_audio_ahead_s=0.5)
    s.start(face())
    s.push_audio(speech(0.5))
    with pytest.raises(BufferError):
        s.push_audio(speech(0.1))
