"""User media as `generate` reads and writes it: the files people actually have (stereo, float WAV,
16-bit greys, pipes) and the mistakes they make with the output (the input's own name, a full disk)."""

import errno
import os
import threading
import wave

import numpy as np
import pytest
from PIL import Image

from streamgen.cli import main
from streamgen.media import MediaError, read_audio, read_image


def write_wav(path, pcm: np.ndarray, rate: int = 16000, dtype=np.int16) -> None:
    """pcm: float [n] or [n, channels] in [-1, 1] (or past it for a float file)."""
    pcm = pcm.reshape(len(pcm), -1)
    if dtype == np.float32:
        import scipy.io.wavfile

        scipy.io.wavfile.write(str(path), rate, pcm.astype(np.float32))
        return
    with wave.open(str(path), "wb") as w:
        w.setnchannels(pcm.shape[1])
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((pcm * 32767).astype("<i2").tobytes())


def tone(seconds: float = 0.5, rate: int = 16000, peak: float = 0.9) -> np.ndarray:
    return peak * np.sin(2 * np.pi * 220 * np.arange(int(rate * seconds)) / rate)


def png_of_size(width: int, height: int, rows: int = 200) -> bytes:
    """A grey PNG whose header says width x height, with data for only `rows` rows: a picture that
    big by its header, a few hundred KB at most."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    return png + chunk(b"IDAT", zlib.compress(b"\x00" * (width + 1) * rows, 9)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [7000, 10000])  # 49 and 100 Mpixels: past our 40 and Pillow's 89
def test_a_picture_too_large_is_one_line_without_pillows_warning(tmp_path, side, capsys):
    """Between our 40-Mpixel limit and Pillow's own error, Pillow's three-line DecompressionBombWarning
    was printed before our one-line refusal."""
    import warnings

    (tmp_path / "big.png").write_bytes(png_of_size(side, side))
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        with pytest.raises(MediaError, match="big.png is too large"):
            read_image(tmp_path / "big.png")
    assert not [w for w in warned if w.category is Image.DecompressionBombWarning]
    write_wav(tmp_path / "a.wav", tone(0.3))
    argv = ["--model", "debug", "--reference", str(tmp_path / "big.png"), "--audio", str(tmp_path / "a.wav")]
    assert main(["generate", *argv, "--out", str(tmp_path / "o.mp4"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "big.png is too large" in err and "Warning" not in err and len(err.strip().splitlines()) == 1


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


@pytest.mark.parametrize("channels", [2, 6])
def test_the_same_speech_in_every_channel_keeps_its_level(tmp_path, channels):
    """FFmpeg's mono downmix added a stereo file's channels at -3 dB: 1.41x as loud as either,
    with its peaks clipped, in the output's sound and in what drives the lips."""
    mono = tone()
    write_wav(tmp_path / "mono.wav", mono)
    write_wav(tmp_path / "many.wav", np.repeat(mono[:, None], channels, axis=1))
    one, many = read_audio(tmp_path / "mono.wav"), read_audio(tmp_path / "many.wav")
    assert rms(many) == pytest.approx(rms(one), rel=0.01)
    assert np.abs(many).max() < 0.95  # none clipped at full scale
    # two different channels: their mean
    left, right = tone(peak=0.6), np.zeros_like(mono)
    write_wav(tmp_path / "lr.wav", np.stack([left, right], axis=1))
    assert rms(read_audio(tmp_path / "lr.wav")) == pytest.approx(rms(left) / 2, rel=0.02)


def write_with_layout(path, pcm: np.ndarray, layout: str, rate: int = 16000) -> None:
    """pcm [n, channels] in [-1, 1] as a WAV whose header names each channel's position."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=rate, layout=layout)
        packed = (pcm * 32767).astype(np.int16).reshape(1, -1)  # (channels interleaved)
        frame = av.AudioFrame.from_ndarray(packed, format="s16", layout=layout)
        frame.sample_rate = rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)


def test_a_surround_file_s_dialogue_keeps_its_level(tmp_path):
    """A film's speech is in its centre channel. Averaged, 5.1's six channels gave it a sixth of
    its level (-15.6 dB): a near-silent track in the output, and lips that hardly moved. Mixed by
    position, as a stereo downmix does it, it is at -3 dB, and no channel's sound is clipped."""
    speech = tone(peak=0.5)
    centre_only = np.zeros((len(speech), 6))
    centre_only[:, 2] = speech  # 5.1: FL FR FC LFE BL BR
    write_with_layout(tmp_path / "film.wav", centre_only, "5.1")
    assert rms(read_audio(tmp_path / "film.wav")) == pytest.approx(rms(speech) / 2**0.5, rel=0.02)
    # every channel at full scale: the mix is scaled back under it, not clipped
    loud = tone(peak=0.99)
    write_with_layout(tmp_path / "loud.wav", np.repeat(loud[:, None], 6, axis=1), "5.1")
    mixed = read_audio(tmp_path / "loud.wav")
    assert np.abs(mixed).max() <= 1.0
    assert rms(mixed) / np.abs(mixed).max() == pytest.approx(rms(loud) / np.abs(loud).max(), rel=0.01)
    # the low-frequency channel is not speech
    lfe_only = np.zeros((len(speech), 6))
    lfe_only[:, 3] = speech
    write_with_layout(tmp_path / "lfe.wav", lfe_only, "5.1")
    assert rms(read_audio(tmp_path / "lfe.wav")) < 1e-3


def test_a_file_of_more_than_eight_channels_is_read(tmp_path):
    """PyAV reads a planar frame's planes past the eighth from memory not theirs: a WAV of ten
    channels crashed the process (a segmentation fault, no message)."""
    speech = tone(peak=0.5)
    write_wav(tmp_path / "ten.wav", np.repeat(speech[:, None], 10, axis=1))  # (no positions named)
    assert rms(read_audio(tmp_path / "ten.wav")) == pytest.approx(rms(speech), rel=0.01)


def test_a_float_wav_with_nan_samples_is_one_line(tmp_path, capsys):
    """It was a traceback from the stream (exit 1), part way through a long file."""
    pcm = tone(1.0, peak=0.3)
    pcm[9000:9010] = np.nan
    wav = tmp_path / "nan.wav"
    write_wav(wav, pcm, dtype=np.float32)
    with pytest.raises(MediaError, match="10 NaN samples"):
        read_audio(wav)
    out = tmp_path / "x.mp4"
    assert main(["generate", "--model", "debug", "--audio", str(wav), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "NaN samples" in err and len(err.strip().splitlines()) == 1 and not out.exists()
    # a little past full scale (a float file's overs) is clipped, as before
    write_wav(wav, np.full(1600, 1.5), dtype=np.float32)
    assert read_audio(wav).max() == 1.0
    pcm[9001:9010] = 0.0  # (one of them: it said "1 NaN samples")
    write_wav(wav, pcm, dtype=np.float32)
    with pytest.raises(MediaError, match="holds 1 NaN sample "):
        read_audio(wav)
    # on int16's scale it was clipped into a square wave, without a word (as StreamSession refuses it)
    write_wav(wav, tone(1.0, peak=20000.0), dtype=np.float32)
    with pytest.raises(MediaError, match="its samples peak at 2e[+]04, where a float file's are in"):
        read_audio(wav)


@pytest.mark.parametrize(
    "mode, values, expect",
    [
        ("I;16", np.array([[0, 32896, 65535]], np.uint16), [0, 128, 255]),  # a 16-bit PNG
        ("I", np.array([[0, 32896, 65535]], np.int32), [0, 128, 255]),  # 16-bit samples as 32-bit
        ("I", np.array([[0, 128, 255]], np.int32), [0, 128, 255]),  # 8-bit ones
        ("F", np.array([[0.0, 0.5, 1.0]], np.float32), [0, 128, 255]),  # floats in [0, 1]
        ("F", np.array([[0.0, 128.0, 300.0]], np.float32), [0, 128, 255]),  # in [0, 255]: clipped past it
    ],
)
def test_a_grey_image_of_more_than_8_bits_keeps_its_tones(tmp_path, mode, values, expect):
    """PIL's convert("RGB") clips a 16-bit or float grey's values to 255: a white face, no error."""
    path = tmp_path / ("face.png" if mode == "I;16" else "face.tif")
    Image.fromarray(np.repeat(values, 4, axis=0)).save(path)
    assert Image.open(path).mode == mode
    rgb = read_image(path)
    assert rgb.dtype == np.uint8 and rgb.shape == (4, 3, 3)
    assert rgb[0, :, 0].tolist() == expect and (rgb[..., 0] == rgb[..., 2]).all()


def _through_a_pipe(pipe, data: bytes):
    os.mkfifo(pipe)

    def feed():
        with open(pipe, "wb") as f:
            f.write(data)

    threading.Thread(target=feed, daemon=True).start()
    return pipe


@pytest.mark.parametrize("kind", ["RGBA", "LA", "P"])
def test_a_transparent_image_is_read_on_white(tmp_path, kind):
    """A face cut out of its background came out on the colour stored under the transparent
    pixels (black from most editors), which no viewer shows; half-transparent pixels blend."""
    from streamgen.stream_inputs import prepare_reference

    rgba = np.zeros((16, 16, 4), np.uint8)  # transparent black
    rgba[:, 8:] = (200, 100, 50, 255)  # an opaque half
    rgba[0, 0] = (0, 0, 0, 128)  # a half-transparent black pixel
    im = Image.fromarray(rgba)
    if kind == "LA":
        im = im.convert("LA")
    elif kind == "P":
        rgba[0, 0, 3] = 0  # (a palette's transparency is all or nothing)
        im = Image.fromarray(rgba[..., :3]).convert("P")  # black: one palette index
        im.info["transparency"] = im.getpixel((1, 1))
    im.save(tmp_path / "cutout.png")
    rgb = read_image(str(tmp_path / "cutout.png"))
    assert (rgb[1:, :8] == 255).all(), rgb[1:, :8]
    assert (rgb[:, 8:] == np.asarray(im.convert("RGB"))[:, 8:]).all()  # the opaque half as it was
    if kind != "P":
        assert (rgb[0, 0] == 127).all(), rgb[0, 0]
    # an RGBA array handed to a stream the same (its alpha was dropped)
    assert (prepare_reference(rgba, 16, 16)[1:, :8] == 255).all()


def test_an_image_or_audio_from_a_pipe_is_read(tmp_path):
    """`--reference /dev/stdin` or `--audio <(...)` were "file not found": the path is a pipe."""
    face = tmp_path / "face.png"
    Image.new("RGB", (32, 24), (200, 150, 120)).save(face)
    assert read_image(_through_a_pipe(tmp_path / "image-pipe", face.read_bytes())).shape == (24, 32, 3)
    wav = tmp_path / "a.wav"
    write_wav(wav, tone(0.25))
    pcm = read_audio(_through_a_pipe(tmp_path / "audio-pipe", wav.read_bytes()))
    assert abs(len(pcm) - 4000) <= 1


@pytest.mark.parametrize("flag, kind", [("--audio", "audio"), ("--reference", "image")])
def test_a_dash_for_standard_input_names_dev_stdin(tmp_path, monkeypatch, flag, kind, capsys):
    """`--audio -` (standard input's usual name) was "audio file not found: -", nothing said of how
    a pipe is read."""
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "--model", "debug", flag, "-", "--out", "x.mp4", "--quiet"]) == 2
    assert f"{kind} file not found: -; to read it from a pipe, give /dev/stdin" in capsys.readouterr().err


@pytest.mark.parametrize("flag, suffix", [("--audio", ".wav"), ("--reference", ".png")])
def test_an_input_name_too_long_for_the_file_system_is_one_line(tmp_path, flag, suffix, capsys):
    """A name past the file system's limit (ENAMETOOLONG) was a traceback from Path.is_dir."""
    too_long = tmp_path / ("a" * 300 + suffix)
    argv = ["generate", "--model", "debug", flag, str(too_long), "--out", str(tmp_path / "x.mp4"), "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "File name too long" in err and len(err.strip().splitlines()) == 1, err


def test_the_output_may_not_be_an_input(tmp_path, capsys):
    """`--out` naming the --audio file (a video whose speech is to be used) replaced it, exit 0."""
    wav = tmp_path / "speech.wav"
    write_wav(wav, tone(0.3))
    before = wav.read_bytes()
    face = tmp_path / "face.png"
    Image.new("RGB", (64, 64), (200, 150, 120)).save(face)
    for flag, path in (("--audio", wav), ("--reference", face)):
        link = tmp_path / "same.mp4"  # the same file under another name
        link.unlink(missing_ok=True)
        os.link(path, link)
        argv = ["generate", "--model", "debug", "--audio", str(wav), "--reference", str(face), "--quiet"]
        assert main([*argv, "--out", str(link)]) == 2
        err = capsys.readouterr().err
        assert f"is the {flag} file" in err and len(err.strip().splitlines()) == 1, err
    assert wav.read_bytes() == before


@pytest.mark.parametrize(
    "out, says",
    [
        (lambda tmp: f"{tmp}/new/", "names a folder, which does not exist"),  # wrote a file named 'new'
        (lambda tmp: tmp / "file.mp4" / "x.mp4", "file.mp4 is a file, not a folder"),  # "does not exist"
        # (ENAMETOOLONG: a traceback from Path.is_dir)
        (lambda tmp: tmp / ("a" * 300 + ".mp4"), "File name too long"),
        (lambda tmp: f"{tmp}/{'a' * 300}/", "File name too long"),
        # (a RuntimeError from Path.resolve: a traceback)
        (
            lambda tmp: _symlink_loop(tmp / "loop.mp4"),
            "loop.mp4 is a symbolic link that leads back to itself",
        ),
    ],
)
def test_an_output_path_through_a_file_or_to_a_folder_is_named(tmp_path, out, says, capsys):
    (tmp_path / "file.mp4").write_bytes(b"a video")
    out = str(out(tmp_path))
    assert main(["generate", "--model", "debug", "--out", out, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1, err
    made = {"file.mp4"} | ({os.path.basename(out)} if os.path.islink(out) else set())
    assert {p.name for p in tmp_path.iterdir()} == made


def _symlink_loop(path):
    path.symlink_to(path.name)
    return path


def test_a_full_disk_while_writing_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    """FFmpeg's OSError came up as a traceback (exit 1)."""
    from streamgen.media import Mp4Writer

    def full(self, *args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Mp4Writer, "_write_audio", full)
    wav = tmp_path / "speech.wav"
    write_wav(wav, tone(0.3))
    out = tmp_path / "x.mp4"
    assert main(["generate", "--model", "debug", "--audio", str(wav), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"cannot write {out}: No space left on device" in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["speech.wav"]  # no temp file either


def test_a_full_disk_under_any_command_is_one_line(tmp_path, monkeypatch, capsys):
    """`data preview` and `eval` write PNGs, plots and reports: a full disk was a traceback."""
    import streamgen.data.media as data_media

    def full(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(data_media, "save_png", full)
    out = tmp_path / "p"
    assert main(["data", "preview", "--clips", "1", "--size", "32", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"streamgen data: error: No space left on device: {out / 'contact_sheet.png'}", err


@pytest.mark.parametrize("stop, code, said", [("SIGTERM", 143, "terminated"), ("SIGHUP", 129, "hung up")])
def test_a_run_ended_by_sigterm_leaves_no_file(tmp_path, stop, code, said):
    """`timeout`, `kill` or a scheduler's SIGTERM, or SIGHUP (the terminal closed), left the
    unfinished MP4 beside --out (a hidden temp file as big as the video so far); it ends as Ctrl-C
    does now, exit code 128 + the signal's."""
    import signal
    import subprocess
    import sys
    import time

    wav = tmp_path / "long.wav"
    write_wav(wav, 0.3 * np.sin(np.arange(16000 * 600) / 16000 * 2 * np.pi * 200))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    argv = ["generate", "--model", "debug", "--audio", str(wav), "--out", str(out_dir / "a.mp4"), "--quiet"]
    p = subprocess.Popen([sys.executable, "-m", "streamgen", *argv], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list(out_dir.iterdir()) and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)  # until the writer has made its file
        time.sleep(0.5)
        p.send_signal(getattr(signal, stop))
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == code, err
    # (the handler says the signal at once; generate says what became of --out as it ends)
    said_last = err.strip().splitlines()[-2:]
    assert list(out_dir.iterdir()) == [] and said_last[0] == said, err
    assert said_last[1].startswith(f"streamgen generate: stopped: {out_dir / 'a.mp4'} not written, "), err


def test_a_ctrl_c_that_came_through_a_dataclass_made_ends_with_exit_code_130(tmp_path):
    """About one Ctrl-C in 16 ended `python -m streamgen generate` by SIGINT (exit -2) after its
    "interrupted": the KeyboardInterrupt had come up through an exec (a dataclass made as a module
    imported), which set CPython's unhandled-interrupt flag though the command caught it."""
    import subprocess
    import sys

    (tmp_path / "runs_streamgen").mkdir()
    (tmp_path / "runs_streamgen" / "__main__.py").write_text(
        "import sys\n"
        "from streamgen import cli\n"
        "from streamgen.commands import generate\n"
        "generate.run = lambda args: exec('raise KeyboardInterrupt')\n"
        "sys.exit(cli.main(['generate']))\n"
    )  # (run with -m, as `python -m streamgen`: a script or -c exits at once on SystemExit)
    path = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    ended = subprocess.run([sys.executable, "-m", "runs_streamgen"], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "PYTHONPATH": path})  # fmt: skip
    assert (ended.returncode, ended.stderr) == (130, "interrupted\n")


def test_a_ctrl_c_while_torch_imports_waits_for_the_import(tmp_path, monkeypatch, capsys):
    """A Ctrl-C inside torch's C++ import aborted generate (pybind11's "terminate called", exit -6),
    inside numpy's it was an ImportError's traceback: it is raised once they are in."""
    import signal
    import sys

    from streamgen.commands import generate

    (tmp_path / "slow_to_import.py").write_text(
        "import os, signal\nos.kill(os.getpid(), signal.SIGINT)  # a Ctrl-C as it imports\nwhole = True\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(generate, "HEAVY_IMPORTS", ("slow_to_import",))
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert main(["generate", "--model", "debug", "--out", str(tmp_path / "a.mp4"), "--quiet"]) == 130
        assert sys.modules["slow_to_import"].whole  # (imported whole, then interrupted)
    finally:
        signal.signal(signal.SIGINT, before)
        sys.modules.pop("slow_to_import", None)
    assert capsys.readouterr().err.splitlines()[-1] == "interrupted"
    assert not (tmp_path / "a.mp4").exists()


def test_the_extensions_generate_imports_are_imported_with_ctrl_c_held():
    """A Ctrl-C inside av's (Cython) import was an ImportError, "Failed to import 'zlib.decompress' -
    cannot initialise module strings", and generate's traceback."""
    from streamgen.commands import generate

    assert {"numpy", "torch", "av"} <= set(generate.HEAVY_IMPORTS)


def test_a_hang_up_whose_terminal_is_gone_ends_with_its_exit_code(tmp_path, monkeypatch):
    """SIGHUP: its terminal closed, the line saying that --out was not written cannot be written
    (EIO); the run ends by the signal's exit code all the same, not by that OSError."""
    import signal
    import sys

    from streamgen.stream import StreamSession

    class Gone:
        def write(self, text):
            raise OSError(errno.EIO, "Input/output error")

        def flush(self):
            pass

    def next_chunk(self):
        sys.stderr = Gone()  # (as the terminal goes)
        raise SystemExit(128 + signal.SIGHUP)

    monkeypatch.setattr(StreamSession, "next_chunk", next_chunk)
    monkeypatch.setattr(sys, "stderr", sys.stderr)  # (put back after)
    with pytest.raises(SystemExit) as ended:
        main(["generate", "--model", "debug", "--out", str(tmp_path / "a.mp4"), "--quiet"])
    assert ended.value.code == 129 and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("there_before", [False, True])
def test_a_ctrl_c_says_that_out_was_not_written(tmp_path, monkeypatch, capsys, there_before):
    """All it said was "interrupted": whether --out was made, whole or in part, or an older file
    replaced, was left to its user to find out."""
    from streamgen.stream import StreamSession

    made = StreamSession.next_chunk
    chunks = []

    def next_chunk(self):
        if len(chunks) == 2:
            raise KeyboardInterrupt
        chunks.append(1)
        return made(self)

    monkeypatch.setattr(StreamSession, "next_chunk", next_chunk)
    out = tmp_path / "a.mp4"
    if there_before:
        out.write_bytes(b"an older video")
    assert main(["generate", "--model", "debug", "--out", str(out), "--quiet"]) == 130
    before = " (the file there is the one from before)" if there_before else ""
    assert capsys.readouterr().err.splitlines()[-2:] == [
        f"streamgen generate: stopped: {out} not written, 0.64 s of 4.12 s of video made{before}",
        "interrupted",
    ]
    assert [p.name for p in tmp_path.iterdir()] == (["a.mp4"] if there_before else [])


def test_a_stop_that_failed_an_import_says_that_out_was_not_written(tmp_path, monkeypatch, capsys):
    """A Ctrl-C that came while a chunk imported an extension failed that import (an ImportError
    caused by it): the command ended as the stop, 130, but without its line saying --out was not written."""
    from streamgen.stream import StreamSession

    made = StreamSession.next_chunk
    chunks = []

    def next_chunk(self):
        if len(chunks) == 2:
            raise ImportError("initialization failed") from KeyboardInterrupt()
        chunks.append(1)
        return made(self)

    monkeypatch.setattr(StreamSession, "next_chunk", next_chunk)
    out = tmp_path / "a.mp4"
    assert main(["generate", "--model", "debug", "--out", str(out), "--quiet"]) == 130
    assert capsys.readouterr().err.splitlines()[-2:] == [
        f"streamgen generate: stopped: {out} not written, 0.64 s of 4.12 s of video made",
        "interrupted",
    ]
    assert list(tmp_path.iterdir()) == []


def test_a_pictures_damaged_exif_is_read_without_pillows_warning(tmp_path):
    """An EXIF tag past the file's end: Pillow skips it with a UserWarning, two lines naming
    TiffImagePlugin.py on stderr, where the picture itself reads whole."""
    import struct
    import warnings

    from PIL import Image

    from streamgen.media import read_image

    tiff = struct.pack("<2sHIH", b"II", 42, 8, 1) + struct.pack("<HHII", 0x010E, 2, 100, 9999) + bytes(4)
    path = tmp_path / "face.jpg"
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(path, exif=b"Exif\x00\x00" + tiff)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert read_image(path).shape == (32, 32, 3)
    assert [str(w.message) for w in caught] == []


@pytest.mark.parametrize(
    "command",
    [["serve", "--model", "debug", "--port", "70000"], ["eval", "--model", "debug"], ["distill", "teacher", "--config", "nonesuch"]],
)
def test_serve_eval_and_distill_hold_a_ctrl_c_while_torch_imports(command, tmp_path, monkeypatch, capsys):
    """As generate: a Ctrl-C inside torch's C++ import aborted them (exit -6); it is raised once the
    extensions are in, "interrupted" and 130."""
    import signal
    import sys

    import streamgen.cli

    (tmp_path / "slow_to_import.py").write_text(
        "import os, signal\nos.kill(os.getpid(), signal.SIGINT)  # a Ctrl-C as it imports\nwhole = True\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(streamgen.cli, "HEAVY_IMPORTS", ("slow_to_import",))
    if command[0] == "eval":  # (its checks that need no torch come first: a command they pass)
        command = [*command, "--out", str(tmp_path / "e")]
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:  # (the commands as given would be refused, in one line, were the Ctrl-C not raised first)
        assert main(command) == 130
        assert sys.modules["slow_to_import"].whole
    finally:
        signal.signal(signal.SIGINT, before)
        sys.modules.pop("slow_to_import", None)
    assert capsys.readouterr().err.splitlines()[-1] == "interrupted"


@pytest.mark.parametrize("stop", ["ctrl_c", "sigterm"])
def test_a_stop_that_failed_an_extensions_import_ends_the_command_as_the_stop(stop, monkeypatch, capsys):
    """A stop while an extension module initialised (matplotlib's, at a run's first plot) failed
    that import: an ImportError "initialization failed" caused by it, which ended the command in a
    traceback and exit 1 (a CI run's SIGTERM of distill) where the stop's 130 or 143 was due."""
    import streamgen.cli
    from streamgen.commands import generate

    cause = KeyboardInterrupt() if stop == "ctrl_c" else streamgen.cli.Terminated(15)

    def run(args):
        raise ImportError("initialization failed") from cause

    monkeypatch.setattr(generate, "run", run)
    if stop == "ctrl_c":
        assert main(["generate"]) == 130
        assert capsys.readouterr().err.splitlines()[-1] == "interrupted"
    else:
        with pytest.raises(SystemExit) as ended:
            main(["generate"])
        assert ended.value.code == 143
    # an error of its own, not a stop's, is still the traceback it is
    monkeypatch.setattr(generate, "run", lambda args: (_ for _ in ()).throw(ImportError("no such module")))
    with pytest.raises(ImportError, match="no such module"):
        main(["generate"])


def test_a_ctrl_c_while_the_command_line_loads_is_interrupted_and_130(tmp_path):
    """`python -m streamgen` interrupted in its first moments, while streamgen/__main__.py imported
    streamgen.cli (before main() handles a Ctrl-C), printed a traceback and ended by SIGINT (-2)."""
    import signal
    import subprocess
    import sys

    (tmp_path / "argparse.py").write_text(  # (one of streamgen.cli's imports, stood in for)
        "import os, signal\nos.kill(os.getpid(), signal.SIGINT)  # a Ctrl-C as it imports\n"
    )
    path = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    ended = subprocess.run([sys.executable, "-m", "streamgen", "--help"], capture_output=True, text=True,
                           timeout=120, env={**os.environ, "PYTHONPATH": path},
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    assert (ended.returncode, ended.stderr) == (130, "interrupted\n")


def test_a_ctrl_c_while_the_installed_command_loads_is_interrupted_and_130(tmp_path):
    """The installed `streamgen` script (pip writes it from pyproject's [project.scripts]: it imports
    the entry's module, then calls it) printed a traceback for a Ctrl-C inside `import streamgen.cli`:
    its entry was cli.main, whose module that import is."""
    import signal
    import subprocess
    import sys
    import tomllib
    from pathlib import Path

    entry = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    module, function = entry["project"]["scripts"]["streamgen"].split(":")
    script = tmp_path / "streamgen"  # as pip's console script has it
    script.write_text(f"import sys\nfrom {module} import {function}\nif __name__ == '__main__':\n"
                      f"    sys.exit({function}())\n")  # fmt: skip
    (tmp_path / "stand_in").mkdir()
    (tmp_path / "stand_in" / "argparse.py").write_text(  # (one of streamgen.cli's imports, stood in for)
        "import os, signal\nos.kill(os.getpid(), signal.SIGINT)  # a Ctrl-C as it imports\n"
    )
    path = os.pathsep.join([str(tmp_path / "stand_in"), os.environ.get("PYTHONPATH", "")])
    ended = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True,
                           timeout=120, env={**os.environ, "PYTHONPATH": path},
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    assert (ended.returncode, ended.stderr) == (130, "interrupted\n")


def test_ctrl_c_while_the_audio_fifo_has_no_writer_is_an_interrupt(tmp_path):
    """FFmpeg waiting to open a FIFO nothing writes to: Ctrl-C was said by PyAV as its own error,
    "cannot read audio from ...: Interrupted system call" with exit 2, not "interrupted" and 130."""
    import signal
    import subprocess
    import sys
    import time

    fifo = tmp_path / "speech.wav"
    os.mkfifo(fifo)
    argv = [sys.executable, "-m", "streamgen", "generate", "--model", "debug", "--audio", str(fifo),
            "--out", str(tmp_path / "x.mp4"), "--quiet"]  # fmt: skip
    # (a child of a shell started in the background ignores SIGINT: as a terminal's would, it takes it)
    with subprocess.Popen(argv, stderr=subprocess.PIPE, text=True,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)) as p:  # fmt: skip
        try:
            wchan = f"/proc/{p.pid}/wchan"
            for _ in range(600):  # until it waits in the FIFO's open (Linux: wait_for_partner)
                if p.poll() is not None or "partner" in open(wchan).read():
                    break
                time.sleep(0.05)
            p.send_signal(signal.SIGINT)
            err = p.communicate(timeout=60)[1]
        finally:
            p.kill()
    assert (p.returncode, err) == (130, "interrupted\n")
