"""The teacher's session (`streamgen.teacher`): it takes a DiT without audio, and refuses what a
stream refuses (a bad window, device, frame size, schedule, start) as a stream does
(StreamSession's own: test_stream)."""

import dataclasses

import numpy as np
import pytest
from stream_helpers import face, speech

from streamgen.model.audio import SAMPLES_PER_FRAME
from streamgen.models import load_model
from streamgen.stream import StreamSession


@pytest.fixture(scope="module")
def model():
    return load_model("debug")


def test_a_teacher_model_refuses_to_stream(model):
    import dataclasses

    teacher = dataclasses.replace(model, meta={"kind": "teacher"})
    with pytest.raises(ValueError, match="teacher"):
        StreamSession(teacher)


def test_the_teacher_session_takes_a_dit_without_audio_and_places_late_audio_at_the_video_to_come():
    """It called the missing audio encoder; and audio pushed after a window went to time 0, under
    the windows already made, never heard (StreamSession starts late audio at the present)."""
    from streamgen.teacher import TeacherSession

    silent = load_model("debug", audio=False)
    teacher = TeacherSession(silent, steps=2, window=2, motion=1)
    teacher.start(face())
    frames, _ = teacher.next_chunk()  # was a TypeError: 'NoneType' object is not callable
    assert frames.shape == (8, 64, 64, 3)

    teacher = TeacherSession(load_model("debug"), steps=2, window=2, motion=1)
    teacher.start(face())
    teacher.next_chunk()  # video frames 0-7 made, without audio
    teacher.push_audio(np.ones(1600, np.float32))
    assert not teacher.pcm[: 8 * SAMPLES_PER_FRAME].any() and teacher.pcm[8 * SAMPLES_PER_FRAME :].all()


def test_the_teacher_session_refuses_a_schedule_of_no_steps_and_runs_odd_ones():
    from streamgen.teacher import TeacherSession

    model = load_model("debug")
    for steps in (0, -1):  # 0 steps returned the starting noise as the video
        with pytest.raises(ValueError, match="num_steps"):
            TeacherSession(model, steps=steps, window=2, motion=1)
    with pytest.raises(ValueError, match="motion"):
        TeacherSession(model, steps=2, window=2, motion=-1)
    with pytest.raises(ValueError, match="cfg_scale"):
        TeacherSession(model, steps=2, cfg_scale=float("nan"))
    for steps, scale in ((1, 0.0), (3, 1.0)):
        teacher = TeacherSession(model, steps=steps, cfg_scale=scale, window=2, motion=1)
        teacher.start(face(), seed=1)
        a, _ = teacher.next_chunk()
        teacher.start(face(), seed=1)
        assert np.array_equal(teacher.next_chunk()[0], a)  # a seed gives the same window
    # no seed draws one, as StreamSession's start does (it was seed 0, so unseeded streams were alike)
    seeds = set()
    for _ in range(3):
        teacher.start(face())
        seeds.add(teacher.seed)
    assert len(seeds) > 1 and 0 not in seeds


def test_the_teacher_session_checks_its_window_and_device_as_a_stream_does(model):
    """A window of 2.5 frames was a TypeError from torch.randn at the first window; a model on
    one device with a session on another failed in the DiT."""
    from streamgen.teacher import TeacherSession

    with pytest.raises(TypeError, match="window must be a whole number"):
        TeacherSession(model, steps=2, window=2.5, motion=1)
    with pytest.raises(TypeError):
        TeacherSession(model, steps=2, window=3, motion=1.5)
    with pytest.raises(ValueError, match="unknown device 'bogus'"):
        TeacherSession(model, steps=2, device="bogus")
    with pytest.raises(ValueError, match="debug is loaded on cpu, the session asked for meta"):
        TeacherSession(model, steps=2, device="meta")
    assert TeacherSession(model, steps=2, device="cpu:0").device.type == "cpu"


def test_the_teacher_session_checks_its_frame_size_as_a_stream_does(model):
    """TeacherSession took a height of 0 as the model's, a float failed at the first window in
    torch.randn, and a size the DiT's 2x2 patches do not tile failed in the DiT on a tensor mismatch."""
    from streamgen.teacher import TeacherSession

    with pytest.raises(ValueError, match="height must be positive, got 0"):
        TeacherSession(model, height=0, steps=2, window=2, motion=1)
    with pytest.raises(TypeError, match="width must be a whole number, got float"):
        TeacherSession(model, width=32.0, steps=2, window=2, motion=1)
    unit = model.vae.spatial_factor * model.cfg.patch_size[1]
    with pytest.raises(ValueError, match=f"height and width must be multiples of {unit}, got {unit + 8}x"):
        TeacherSession(model, height=unit + 8, steps=2, window=2, motion=1)
    teacher = TeacherSession(model, height=2 * unit, width=unit, steps=1, window=2, motion=1)
    teacher.start(face())
    assert teacher.next_chunk()[0].shape[1:] == (2 * unit, unit, 3)


def test_the_teacher_session_refuses_audio_and_chunks_outside_a_stream_as_a_stream_does(model):
    """Before a start, push_audio and next_chunk were AttributeErrors; after a close, next_chunk
    went on from where the stream was, its motion frames dropped."""
    from streamgen.teacher import TeacherSession

    teacher = TeacherSession(model, steps=1, window=2, motion=1)
    for call in (lambda: teacher.push_audio(speech(0.1)), teacher.next_chunk):
        with pytest.raises(RuntimeError, match=r"call start\(reference\) first"):
            call()
    teacher.start(face())
    teacher.push_audio(speech(0.1))
    teacher.next_chunk()
    teacher.close()
    with pytest.raises(RuntimeError, match=r"call start\(reference\) first"):
        teacher.next_chunk()
    teacher.start(face())
    assert teacher.next_chunk()[1] == 0.0


def test_a_teacher_refuses_fp8_linears_as_it_refuses_bfloat16(monkeypatch):
    """--fp8 (or $STREAMGEN_FP8) put a teacher's block linears in FP8 and it sampled so, without a
    word, where a bfloat16 asked for is refused: its patch embedding, the dtype checked, stays float32."""
    from streamgen.model.float8 import float8_layers
    from streamgen.teacher import open_session

    monkeypatch.setenv("STREAMGEN_FP8", "1")
    with pytest.raises(ValueError, match="a teacher runs in float32 only: its block linears are in FP8"):
        open_session("tiny-avatar-teacher")
    assert float8_layers(open_session("tiny-avatar").dit) > 0  # a student runs them


def test_a_teacher_opened_with_0_steps_is_refused_as_a_student_is(model):
    """open_session took steps=0 for a teacher as its default 50 (`steps or 50`), without a word,
    where a student's 0 steps is refused."""
    from streamgen.teacher import TeacherSession, open_session

    teacher = dataclasses.replace(model, meta={**model.meta, "kind": "teacher"})
    for steps, expect in ((None, 50), (3, 3)):
        opened = open_session(teacher, steps=steps)
        assert isinstance(opened, TeacherSession) and len(opened.sigmas) == expect + 1
    with pytest.raises(ValueError, match="num_steps must be a whole number >= 1, got 0"):
        open_session(teacher, steps=0)


def test_a_refused_teacher_start_leaves_its_stream_as_it_was(model):
    """A start refused for its caption (a model without sentence-embedding width) had put its
    reference in already: the running stream went on with the other face."""
    from streamgen.teacher import TeacherSession

    teacher = TeacherSession(model, steps=1, window=2, motion=1)
    teacher.start(face(0), seed=1)
    teacher.next_chunk()
    unbroken = teacher.next_chunk()[0]
    teacher.start(face(0), seed=1)
    teacher.next_chunk()
    with pytest.raises(ValueError, match="text features"):
        teacher.start(face(1), text="smiling")
    assert np.array_equal(teacher.next_chunk()[0], unbroken)


def test_a_teacher_predicting_other_channels_than_it_takes_is_refused_as_it_is_made():
    """As StreamSession: TeacherSession took it and failed with a tensor size error at its first
    window."""
    from streamgen.teacher import TeacherSession

    with pytest.raises(ValueError, match="its DiT predicts 8 latent channels of 4: "):
        TeacherSession(load_model("debug", out_channels=8))
