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


@pytest.mark.parametrize("through", ["file", "pipe", "bytes"])
def test_what_is_no_image_is_named_as_given_whatever_it_came_through(tmp_path, through):
    """A pipe's non-image was "cannot identify image file <_io.BytesIO object at 0x7f...>":
    Pillow names the buffer the pipe was read into, not the path the user gave."""
    junk = b"not a picture\n"
    path = tmp_path / "face.png"
    if through == "file":
        path.write_bytes(junk)
        source, name = path, str(path)
    elif through == "pipe":
        source = name = str(_through_a_pipe(tmp_path / "image-pipe", junk))
    else:
        source, name = junk, "image"
    with pytest.raises(MediaError) as refused:
        read_image(source)
    assert str(refused.value) == f"cannot read image {name}: not an image file of a format Pillow reads"


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
    assert err.strip() == f"streamgen data preview: error: No space left on device: {out / 'contact_sheet.png'}", err


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
