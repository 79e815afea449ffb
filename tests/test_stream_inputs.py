"""What a programmer hands a StreamSession: each mistake is a clear error before the stream
changes, and what `generate` reads well (a phone's photo, a 16-bit grey, a file's path) the
Python API reads as well."""

import threading

import numpy as np
import pytest
import torch
from PIL import Image
from stream_helpers import face, run, speech

from streamgen.media import read_image
from streamgen.models import load_model
from streamgen.stream import StreamSession
from streamgen.stream_batch import next_chunks
from streamgen.stream_inputs import prepare_reference


@pytest.fixture(scope="module")
def model():
    return load_model("debug")


def test_a_numpy_seed_is_a_seed_and_a_refused_one_leaves_the_stream_running(model):
    """A numpy integer seed (what a numpy generator draws) was torch's "an integer is required",
    raised after the running stream was gone; a negative seed or one past 2**31 was taken."""
    _, whole = run(model, [speech(2.0)], 4, seed=3)
    s, first = run(model, [speech(2.0)], 2, seed=3)
    for seed, error, says in [
        (1.5, TypeError, "seed must be a whole number, got float"),
        ("7", TypeError, "got str"),
        (True, TypeError, "got bool"),  # (was seed 1)
        (-1, ValueError, r"seed -1 is outside \[0, 2\*\*31\)"),
        (2**31, ValueError, "outside"),
    ]:
        with pytest.raises(error, match=says):
            s.start(face(1), seed=seed)
    rest = [s.next_chunk() for _ in range(2)]
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(whole, first + rest))
    numpy_seed = StreamSession(model)
    numpy_seed.start(face(), seed=np.int64(3))
    numpy_seed.push_audio(speech(2.0))
    assert np.array_equal(numpy_seed.next_chunk()[0], whole[0][0])


def test_float_audio_on_int16_s_scale_is_refused_not_clipped(model):
    """int16 samples handed over as floats (np.frombuffer(..., np.int16).astype(np.float32)) were
    clipped to +-1: a square wave, 97% of it at full scale, without a word."""
    s = StreamSession(model)
    s.start(face())
    pcm16 = (np.sin(np.arange(16000) / 16000 * 2 * np.pi * 200) * 10000).astype(np.int16)
    with pytest.raises(ValueError, match="float audio peaks at 1e\\+04.*divide them by 32768"):
        s.push_audio(pcm16.astype(np.float32))
    assert s.audio_buffered_seconds == 0
    s.push_audio(pcm16)  # as int16 it is taken
    s.push_audio(np.full(100, 1.5, np.float32))  # a hot recording's overs are clipped, as before
    assert s.audio_buffered_seconds == pytest.approx((16000 + 100) / 16000)


def test_a_photo_or_a_16_bit_grey_is_read_as_generate_reads_it(model, tmp_path):
    """A PIL image skipped what `generate` does to a file: a phone's portrait (stored sideways,
    with an EXIF tag to turn it) lay on its side, a 16-bit grey came out white, a float one black.
    A file's path was "must be uint8, got <U17"."""
    stored = np.zeros((64, 96, 3), np.uint8)  # landscape as stored; the tag turns it a quarter
    stored[:, :40] = 255  # the face's top, once turned (and cropped to a square)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 clockwise to view
    photo = tmp_path / "phone.jpg"
    Image.fromarray(stored).save(photo, exif=exif, quality=95)
    upright = prepare_reference(read_image(photo), 64, 64)
    assert upright[:8].mean() > 200 and upright[-8:].mean() < 50  # the white band on top
    for given in (Image.open(photo), photo, str(photo)):
        assert np.abs(prepare_reference(given, 64, 64).astype(int) - upright).max() <= 1, given
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    assert prepare_reference(Image.fromarray(ramp), 64, 64).mean() == pytest.approx(127.5, abs=2)
    floats = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    assert prepare_reference(Image.fromarray(floats), 64, 64).mean() == pytest.approx(127.5, abs=5)


def test_a_caption_or_context_the_stream_cannot_use_is_refused(model):
    s = StreamSession(model)
    with pytest.raises(TypeError, match="text must be a string, got int"):  # 'int' has no 'strip'
        s.start(face(), text=123)
    with pytest.raises(ValueError, match="lone surrogate"):  # the tokenizer's TypeError
        s.start(face(), text="caf\udce9")
    with pytest.raises(ValueError, match="context holds NaN"):  # every frame came out black
        s.start(face(), context=torch.full((1, 2, model.cfg.text_dim), float("nan")))
    s.start(face())
    with pytest.raises(ValueError, match="caption longer than 500 characters"):  # cut at 128 tokens
        s.set_text("smile " * 2000)
    with pytest.raises(TypeError, match="text must be a string"):
        s.set_text(5)
    s.next_chunk()  # the stream runs on


def test_sizes_and_steps_are_whole_positive_numbers(model):
    """A float height failed ten frames down in the cache's torch.zeros; 0 was taken as the
    model's own size or steps, silently."""
    with pytest.raises(TypeError, match="height must be a whole number, got float"):
        StreamSession(model, height=128 / 2, width=64)
    with pytest.raises(ValueError, match="height must be positive, got 0"):
        StreamSession(model, height=0)
    with pytest.raises(ValueError, match="steps must be positive, got 0"):
        StreamSession(model, steps=0)
    with pytest.raises(TypeError, match="steps must be a whole number, got bool"):  # (was 1 step)
        StreamSession(model, steps=True)
    assert StreamSession(model, height=np.int64(64), width=64).height == 64


def test_a_path_to_no_model_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model directory .*nothing-here: there is no such folder"):  # 'PosixPath' has no 'removesuffix'
        load_model(tmp_path / "nothing-here")


def test_a_session_is_one_thread_s_at_a_time(model):
    """Two threads' chunks interleaved drew from one generator and cache: other frames than one
    after the other, without a word; a close during a chunk broke it frames deep. Now a second
    thread's chunk is refused, its close waits for the chunk, and its audio is taken meanwhile."""
    s = StreamSession(model)
    s.start(face())
    outcome = {}

    def in_thread(name, fn):
        try:
            outcome[name] = fn()
        except Exception as e:
            outcome[name] = e

    with s.in_use():  # this thread is making a chunk
        for name, fn in [("chunk", s.next_chunk), ("caption", lambda: s.set_text("smiling"))]:
            other = threading.Thread(target=in_thread, args=(name, fn))
            other.start()
            other.join(timeout=60)
            refused = outcome[name]
            assert isinstance(refused, RuntimeError) and "in use by another thread" in str(refused)
        pusher = threading.Thread(target=in_thread, args=("audio", lambda: s.push_audio(speech(0.5))))
        pusher.start()
        pusher.join(timeout=60)
        assert outcome["audio"] is None and s.audio_buffered_seconds == pytest.approx(0.5)
        closer = threading.Thread(target=in_thread, args=("close", s.close))
        closer.start()
        closer.join(timeout=0.5)
        assert closer.is_alive() and s.started  # it waits for this thread's chunk
        s.next_chunk()  # (the same thread may go on)
    closer.join(timeout=60)
    assert not closer.is_alive() and not s.started


def test_one_session_twice_in_a_batch_is_refused(model):
    """Both its chunks were made from the same cache, their noise drawn in turns."""
    s = StreamSession(model)
    s.start(face())
    with pytest.raises(ValueError, match="listed more than once"):
        next_chunks([s, s])
    assert s.chunk_index == 0


def test_audio_pushed_to_a_model_without_an_audio_encoder_is_used_up():
    """Its audio was never taken from the timeline: after ten minutes of a stream pushing in real
    time, a BufferError ended it."""
    silent = load_model("debug", audio=False)
    s = StreamSession(silent, max_audio_ahead_s=2.0)
    s.start(face())
    chunk = speech(s.chunk_seconds)
    for _ in range(3 * round(2.0 / s.chunk_seconds)):  # three times the buffer's room
        s.push_audio(chunk)
        s.next_chunk()
    assert s.audio_buffered_seconds <= 2 * s.chunk_seconds
    assert s._pcm.size <= 2 * chunk.size


def test_a_small_reference_cropped_to_a_far_narrower_or_wider_frame_keeps_its_centre():
    """A 12x12 image cropped to a 16x512 frame kept a strip of round(0.375) = 0 pixels of it:
    the reference came out black, without a word."""
    grey = np.full((12, 12, 3), 200, np.uint8)
    for height, width in ((16, 512), (512, 16)):
        ref = prepare_reference(grey, height, width)
        assert ref.shape == (height, width, 3) and (ref == 200).all()


def test_int16_audio_of_either_byte_order_is_int16():
    """Big-endian int16 ('>i2', as numpy reads an AIFF's or a network's samples) was refused:
    "audio must be int16 or float samples, got >i2"."""
    from streamgen.stream_inputs import to_pcm_float

    samples = np.array([0, 16384, -32768, 32767], np.int16)
    expected = samples.astype(np.float32) / 32768
    np.testing.assert_array_equal(to_pcm_float(samples.astype(">i2")), expected)
    np.testing.assert_array_equal(to_pcm_float(samples), expected)
    with pytest.raises(ValueError, match="int16 or float samples, got uint16"):
        to_pcm_float(samples.view(np.uint16))


def test_float64_audio_beyond_float32s_range_is_said_to_peak_there():
    """float64 samples too large for float32 (1e40) were cast first: infinite, and refused as 'NaN or
    infinite samples' (with numpy's overflow warning), which they were not. Their peak is said."""
    import warnings

    from streamgen.stream_inputs import to_pcm_float

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (numpy's "overflow encountered in cast")
        with pytest.raises(ValueError, match="float audio peaks at 1e\\+40"):
            to_pcm_float(np.array([0.1, 1e40]))
        with pytest.raises(ValueError, match="NaN or infinite"):
            to_pcm_float(np.array([0.1, np.inf]))
        assert to_pcm_float(np.array([0.25, -0.5])).dtype == np.float32
