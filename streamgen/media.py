"""Reading user media (any audio file, any image) and writing MP4 incrementally.

Errors a user can cause raise `MediaError` with one line that names the file
and the problem; callers turn it into a clean CLI error or a 4xx.
"""

from __future__ import annotations

import errno
import warnings
from pathlib import Path

import numpy as np

from streamgen.files import new_file_beside, put_in_place

SAMPLE_RATE = 16000
MAX_IMAGE_PIXELS = 40_000_000  # refuse decompression bombs long before they hurt


class MediaError(ValueError):
    pass


# below it a file holds no speech to lip-sync (telephone speech is 8 kHz): a mistake, named as one
# (a 7 Hz file resampled to nothing and was called empty)
MIN_AUDIO_RATE = 4000


def _check_input_file(path: Path, kind: str) -> None:
    """A file to read: a folder is named as one ("not found" sent people looking for a typo). A
    pipe is read as it comes (`--reference /dev/stdin`, `--audio <(...)`: they were "not found")."""
    try:
        is_dir, exists = path.is_dir(), path.exists()
    except OSError as e:  # a name the file system cannot hold (ENAMETOOLONG: a traceback)
        raise MediaError(f"cannot read {kind} file {path}: {e.strerror or e}") from None
    if is_dir:
        raise MediaError(f"{path} is a directory, not an {kind} file")
    if not exists and str(path) == "-":  # (the usual name of standard input, which a path is not)
        raise MediaError(f"{kind} file not found: -; to read it from a pipe, give /dev/stdin")
    if not exists:
        raise MediaError(f"{kind} file not found: {path}")


# float audio louder than this is on another scale (int16's), not a hot recording's overs
MAX_FLOAT_PEAK = 2.0


def read_audio(path, rate: int = SAMPLE_RATE, max_seconds: float = 3600.0) -> np.ndarray:
    """Decode any audio file PyAV reads, resampled once to `rate` Hz mono float32 in [-1, 1]."""
    import av

    path = Path(path)
    _check_input_file(path, "audio")
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise MediaError(f"{path} has no audio stream")
            source_rate = container.streams.audio[0].codec_context.sample_rate
            if source_rate and source_rate < MIN_AUDIO_RATE:
                raise MediaError(f"{path}: a sample rate of {source_rate} Hz is too low for speech "
                                 f"(at least {MIN_AUDIO_RATE} Hz)")  # fmt: skip
            # the channels kept and mixed here (`to_mono`): FFmpeg's mono downmix adds a stereo
            # file's two channels at -3 dB each, 3 dB louder than either, and clipped its peaks
            # packed, not planar: PyAV reads a planar frame's planes past the eighth from memory
            # that is not theirs (a WAV of ten channels crashed the process)
            resampler = av.AudioResampler(format="flt", rate=rate)
            parts, total, surround = [], 0, False
            for frame in container.decode(audio=0):
                for out in resampler.resample(frame):
                    a, surround = to_mono(out), surround or len(out.layout.channels) > 2
                    parts.append(a)
                    total += a.size
                if total > max_seconds * rate:
                    raise MediaError(f"{path} is longer than {max_seconds:.0f} s")
            parts.extend(to_mono(out) for out in resampler.resample(None))
    except MediaError:
        raise
    except av.error.FFmpegError as e:  # (its str: "[Errno 1094995529] ...: '<the path again>'")
        if e.errno == errno.EINTR:  # Ctrl-C while FFmpeg waited (a FIFO with no writer yet): PyAV said
            # it as its own error, "cannot read audio ...: Interrupted system call", exit 2 not 130
            raise KeyboardInterrupt from None
        empty = path.is_file() and path.stat().st_size == 0
        raise MediaError(
            f"{path} is empty (0 bytes)" if empty else f"cannot read audio from {path}: {e.strerror or e}"
        ) from None
    except (UnicodeDecodeError, ValueError) as e:
        raise MediaError(f"cannot read audio from {path}: {e}") from None
    pcm = np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)
    if pcm.size == 0:
        raise MediaError(f"{path} contains no audio samples")
    bad = int(np.isnan(pcm).sum())
    if bad:  # (a float WAV's; infinities are clipped like any sample past full scale)
        raise MediaError(f"{path} holds {bad} NaN sample{'s' * (bad != 1)} (from {bad / rate:.3f} s of {pcm.size / rate:.1f}): "
                         "not audio; write it again from its source")  # fmt: skip
    peak = float(np.abs(pcm[np.isfinite(pcm)]).max(initial=0.0))
    if surround and peak > 1.0:  # (its mix can pass full scale where its channels did not)
        pcm /= peak
    elif peak > MAX_FLOAT_PEAK:  # (a float file of int16's scale was clipped into a square wave)
        raise MediaError(f"{path}: its samples peak at {peak:.4g}, where a float file's are in [-1, 1] "
                         "(integer samples stored as floats?): write it again scaled to [-1, 1]")  # fmt: skip
    return np.clip(pcm, -1.0, 1.0)


# a channel's share of the mono mix of more than two: half the usual stereo downmix (ITU-R BS.775:
# the centre and the surrounds at -3 dB, no LFE). Averaged, a film's dialogue, in the centre
# channel alone, came out at a sixth of its level from 5.1
FRONT_CHANNELS = {"FL": 0.5, "FR": 0.5, "FLC": 0.5, "FRC": 0.5, "FC": 0.5 * 2**0.5}
SURROUND_CHANNELS = {"BL", "BR", "BC", "SL", "SR", "TC", "TFL", "TFC", "TFR", "TBL", "TBC", "TBR",
                     "WL", "WR", "SDL", "SDR", "TSL", "TSR", "BFC", "BFL", "BFR"}  # fmt: skip
SURROUND_SHARE = 0.25 * 2**0.5


def to_mono(frame) -> np.ndarray:
    """One decoded audio frame's channels as one: a mono or stereo frame's averaged, more by
    their positions (averaged where a channel has none known: a WAV's "NONE")."""
    names = [c.name for c in frame.layout.channels]
    samples = frame.to_ndarray().reshape(-1, len(names)).T  # (a packed frame's samples interleaved)
    known = FRONT_CHANNELS.keys() | SURROUND_CHANNELS | {"LFE", "LFE2"}
    if len(names) <= 2 or not set(names) <= known:
        return samples.mean(axis=0)
    shares = [FRONT_CHANNELS.get(n, SURROUND_SHARE if n in SURROUND_CHANNELS else 0.0) for n in names]
    return np.asarray(shares, samples.dtype) @ samples


def read_image(path_or_bytes) -> np.ndarray:
    """Decode an image file (or bytes) to uint8 RGB [H, W, 3]."""
    import io

    from PIL import Image, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    # Pillow warns of a picture past that limit (three lines on stderr) and refuses one past twice
    # it; the size is checked below in one line, so its warning only said the same thing first
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    # a damaged EXIF block (a tag past the file's end) is skipped by Pillow with a warning, two lines
    # naming TiffImagePlugin.py above `generate`'s "wrote ...": the picture itself reads whole
    warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.TiffImagePlugin")
    name = "image" if isinstance(path_or_bytes, bytes | bytearray) else str(path_or_bytes)
    src = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes | bytearray) else path_or_bytes
    if not isinstance(src, io.BytesIO):
        _check_input_file(Path(src), "image")
        if not Path(src).is_file():  # a pipe: PIL seeks back after reading the header
            src = io.BytesIO(_read_pipe(Path(src), MAX_PIPED_IMAGE_BYTES))
    try:
        with Image.open(src) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise MediaError(f"{name} is too large ({im.width}x{im.height} pixels)")
            return upright_rgb(im)
    except MediaError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise MediaError(f"{name} is too large to decode safely: {e}") from None
    except UnidentifiedImageError:
        # (Pillow's own words name what it read from: a pipe's or an upload's buffer as
        # "<_io.BytesIO object at 0x7f...>", not the path given)
        raise MediaError(f"cannot read image {name}: not an image file of a format Pillow reads") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise MediaError(f"cannot read image {name}: {e}") from None


MAX_PIPED_IMAGE_BYTES = 64 * 1024 * 1024


def _read_pipe(path: Path, limit: int) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise MediaError(f"cannot read {path}: {e.strerror or e}") from None
    if len(data) > limit:
        raise MediaError(f"{path} holds more than {limit // 2**20} MiB: too large for an image")
    return data


def upright_rgb(im) -> np.ndarray:
    """A PIL image as uint8 RGB [H, W, 3], turned as its EXIF orientation says (a phone's portrait
    is stored sideways with a tag to turn it: without it the face came out lying down)."""
    from PIL import ImageOps

    im = ImageOps.exif_transpose(im)
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        return _grey_to_rgb8(im)
    if im.has_transparency_data:  # RGBA, LA, a palette's or a colour's transparency
        return on_white(np.asarray(im.convert("RGBA")))
    return np.asarray(im.convert("RGB"))


def on_white(rgba: np.ndarray) -> np.ndarray:
    """uint8 RGBA [..., 4] as uint8 RGB on white, as a viewer shows it: the colours under its
    transparent pixels are not seen (a face cut out of its background came out on the black that
    most editors store there)."""
    alpha = rgba[..., 3:].astype(np.float32) / 255
    rgb = rgba[..., :3].astype(np.float32) * alpha + 255 * (1 - alpha)
    return np.rint(rgb).astype(np.uint8)


def _grey_to_rgb8(im) -> np.ndarray:
    """A 16-bit, 32-bit or float grey image as 8-bit RGB: PIL's convert("RGB") clips its values
    to 255, which turned a 16-bit PNG's face white."""
    grey = np.asarray(im, dtype=np.float64)
    peak = float(grey.max()) if grey.size else 0.0
    if im.mode.startswith("I;16") or (im.mode == "I" and peak > 255):
        grey = grey * (255 / 65535)  # 16-bit samples (a 32-bit "I" image holds them too)
    elif im.mode == "F" and peak <= 1.0:
        grey = grey * 255  # floats in [0, 1]
    grey = np.clip(np.nan_to_num(grey), 0, 255).round().astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)


def from_time_zero(frames: np.ndarray, pts: float, fps: int = 25) -> np.ndarray:
    """A stream's first chunk (uint8 [T, H, W, 3] at stream time `pts`) with its first frame held
    from time 0, so that a file of the chunks starts with its audio. Only Wan's 1 + 4k layout
    starts later than 0: by three frames, which its first latent frame does not decode."""
    lead = round(pts * fps)
    if lead <= 0:
        return frames
    return np.concatenate([np.repeat(frames[:1], lead, axis=0), frames])


def output_path(path) -> Path:
    """Where a file written to `path` goes: the file a symlink names (a rename over the link
    replaced the link), refused where something other than a regular file is there (a rename
    over /dev/null replaced the device with an MP4)."""
    path = Path(path)
    if path.exists() and not path.is_file():  # (through links: /dev/stdout was a path in /proc
        # to its pipe, "pipe:[23303]", that no file could be written beside: No such file or directory)
        raise MediaError(
            f"{path} is not a regular file (a directory, a device, a pipe): give a file to write"
        )
    if path.is_symlink():
        try:
            path = path.resolve()
        except (RuntimeError, OSError):  # (3.11's RuntimeError for a loop was a traceback)
            raise MediaError(
                f"{path} is a symbolic link that leads back to itself: give a file to write"
            ) from None
    return path


class Mp4Writer:
    """H.264 (yuv420p) + AAC, written to a temp file of its own beside `path` and renamed on close
    (`streamgen.files`), so a crashed or interrupted run never leaves a file that looks complete,
    and two runs writing one file do not mux into one temp file."""

    def __init__(
        self, path, width: int, height: int, fps: int = 25, audio_rate: int | None = SAMPLE_RATE,
        comment: str | None = None,
    ):  # fmt: skip
        import av

        self.path = output_path(path)
        self.tmp = new_file_beside(self.path)
        try:
            self.container = av.open(str(self.tmp), mode="w", format="mp4")
            if comment:  # (the file's comment tag: what wrote it, `data preview`'s `written_by`)
                self.container.metadata["comment"] = comment
            self.video = self.container.add_stream("libx264", rate=fps)
            self.video.width, self.video.height = width + width % 2, height + height % 2
            self.video.pix_fmt = "yuv420p"
            self.video.options = {"crf": "18", "preset": "veryfast"}
            self.audio = None
            self.audio_rate = audio_rate
            self.audio_pts = 0
            if audio_rate:
                self.audio = self.container.add_stream("aac", rate=audio_rate)
                self.audio.layout = "mono"
        except BaseException:  # (no writer to abort: its caller never gets one)
            self.tmp.unlink(missing_ok=True)
            raise

    def _cannot_write(self, e: OSError) -> MediaError:
        """A full disk, a quota, a vanished folder: one line naming the file, not FFmpeg's error."""
        return MediaError(f"cannot write {self.path}: {e.strerror or e}")

    def write_frames(self, frames: np.ndarray) -> None:
        try:
            self._write_frames(frames)
        except OSError as e:
            raise self._cannot_write(e) from None

    def _write_frames(self, frames: np.ndarray) -> None:
        import av

        for frame in frames:
            if frame.shape[0] % 2 or frame.shape[1] % 2:  # yuv420p needs even sizes
                frame = np.pad(frame, ((0, frame.shape[0] % 2), (0, frame.shape[1] % 2), (0, 0)), mode="edge")
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            self.container.mux(self.video.encode(vf))

    def write_audio(self, pcm: np.ndarray) -> None:
        try:
            self._write_audio(pcm)
        except OSError as e:
            raise self._cannot_write(e) from None

    def _write_audio(self, pcm: np.ndarray) -> None:
        import av

        s16 = (np.clip(pcm, -1, 1) * 32767).astype(np.int16)
        for k in range(0, len(s16), 1024):
            af = av.AudioFrame.from_ndarray(s16[None, k : k + 1024], format="s16", layout="mono")
            af.sample_rate = self.audio_rate
            af.pts = self.audio_pts
            self.audio_pts += af.samples
            self.container.mux(self.audio.encode(af))

    def close(self) -> Path:
        try:
            self.container.mux(self.video.encode())
            if self.audio is not None:
                self.container.mux(self.audio.encode())
            self.container.close()
            put_in_place(self.tmp, self.path)
        except OSError as e:
            raise self._cannot_write(e) from None
        finally:
            self.tmp.unlink(missing_ok=True)
        return self.path

    def abort(self) -> None:
        try:
            self.container.close()
        except (
            OSError
        ):  # (a full disk fails the close too: the error that stopped the run is the one to show)
            pass
        finally:
            self.tmp.unlink(missing_ok=True)
