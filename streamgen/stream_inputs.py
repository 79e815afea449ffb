"""What a caller hands a StreamSession, checked and made ready: the reference image, the audio,
the seed, the caption, the frame size, the device. A mistake is a TypeError or ValueError that
says what was wrong, raised before the stream changes, not a failure frames deep in the model."""

from __future__ import annotations

import operator
import os

import numpy as np
import torch

from streamgen.media import MAX_FLOAT_PEAK
from streamgen.model.audio import SAMPLE_RATE
from streamgen.session_limits import MAX_CAPTION_CHARS, SEED_END, SEED_RANGE, CaptionError, text_problem


def prepare_reference(image, height: int, width: int) -> np.ndarray:
    """Any RGB/RGBA/grey uint8 image, a PIL image or an image file's path -> [height, width, 3]
    uint8, centre-cropped to the aspect, transparency on white. A file or a PIL image is turned upright as its EXIF says,
    its 16-bit or float greys scaled (`streamgen.media.upright_rgb`), as `generate` reads it."""
    from PIL import Image

    from streamgen.media import on_white, read_image, upright_rgb

    if isinstance(image, str | os.PathLike):
        image = read_image(image)  # (a path was "must be uint8, got <U17")
    elif isinstance(image, Image.Image):
        image = upright_rgb(image)  # (a phone's photo lay on its side; a 16-bit grey was white)
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ValueError(f"reference image must be uint8, got {arr.dtype}")
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4) or min(arr.shape[:2]) < 8:
        raise ValueError(
            f"reference image must be [H, W, 3] (or RGBA / grey) and at least 8x8, got {arr.shape}"
        )
    arr = on_white(arr) if arr.shape[2] == 4 else arr
    h, w = arr.shape[:2]
    target = width / height
    if abs(w / h - target) > 1e-3:  # centre crop to the output aspect
        # (a pixel at least: a small image cropped to a frame far narrower or wider than it, 12x12
        # to 16x512, kept none of it, and the stream's face was black)
        if w / h > target:
            cw = max(1, round(h * target))
            arr = arr[:, (w - cw) // 2 : (w - cw) // 2 + cw]
        else:
            ch = max(1, round(w / target))
            arr = arr[(h - ch) // 2 : (h - ch) // 2 + ch]
    if arr.shape[:2] != (height, width):
        arr = np.asarray(Image.fromarray(np.ascontiguousarray(arr)).resize((width, height), Image.BICUBIC))
    return np.array(arr, dtype=np.uint8, copy=True)  # writable and contiguous


def to_pcm_float(pcm) -> np.ndarray:
    """int16 or float PCM (mono, 16 kHz) -> float32 in [-1, 1]."""
    a = np.asarray(pcm)
    if a.ndim != 1:
        raise ValueError(f"audio must be mono 1-D samples at {SAMPLE_RATE} Hz, got shape {a.shape}")
    if a.dtype.kind == "i" and a.dtype.itemsize == 2:  # (int16 of either byte order: a WAV's '>i2' too)
        return a.astype(np.float32) / 32768.0
    if not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"audio must be int16 or float samples, got {a.dtype}")
    # (checked before the cast to float32: float64 samples beyond its range became infinite there,
    # refused as "NaN or infinite" with numpy's overflow warning)
    if not np.isfinite(a).all():
        raise ValueError("audio contains NaN or infinite samples")
    peak = float(np.abs(a).max(initial=0.0))
    if peak > MAX_FLOAT_PEAK:  # (int16 samples as floats were clipped into a square wave)
        raise ValueError(
            f"float audio peaks at {peak:.4g}: float samples are in [-1, 1]; pass int16 samples as "
            "int16, or divide them by 32768"
        )
    return np.clip(a.astype(np.float32), -1.0, 1.0)


def check_seed(seed) -> int:
    """A stream's seed: a whole number (a numpy one too) in [0, SEED_END)."""
    try:
        value = _whole_number(seed)
    except TypeError:
        raise TypeError(f"seed must be a whole number, got {type(seed).__name__}") from None
    if not 0 <= value < SEED_END:
        raise ValueError(f"seed {value} is outside {SEED_RANGE}")
    return value


def check_caption(text) -> None:
    """A caption the API takes (None or blank: none), or a TypeError / ValueError that says why."""
    if text is None:
        return
    if not isinstance(text, str):
        raise TypeError(f"text must be a string, got {type(text).__name__}")
    if len(text) > MAX_CAPTION_CHARS:  # (the text encoder kept its first 128 tokens, without a word)
        raise CaptionError(f"caption longer than {MAX_CAPTION_CHARS} characters")
    if problem := text_problem(text):
        raise CaptionError(problem)


def _whole_number(value) -> int:
    """operator.index, less bool: True is an int to Python, and a JSON `true` became 1 without a word."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError
    return operator.index(value)


def positive_size(value, what: str) -> int:
    try:
        n = _whole_number(value)
    except TypeError:  # (a float height failed ten frames down, in the cache's torch.zeros)
        raise TypeError(f"{what} must be a whole number, got {type(value).__name__}") from None
    if n <= 0:
        raise ValueError(f"{what} must be positive, got {n}")
    return n


def session_frame_size(height, width, model, vae) -> tuple[int, int]:
    """A session's (height, width): as given (None: the model's own), whole, positive, and
    multiples of what the autoencoder and the DiT's patches tile, or a TypeError / ValueError."""
    height = model.height if height is None else positive_size(height, "height")
    width = model.width if width is None else positive_size(width, "width")
    unit = vae.spatial_factor * model.cfg.patch_size[1]
    if height % unit or width % unit:
        raise ValueError(f"height and width must be multiples of {unit}, got {height}x{width}")
    return height, width


def session_device(device) -> torch.device:
    """A session's device as a torch.device, or a ValueError that says why it cannot be (an unknown
    name, a CUDA device this torch or machine lacks), before any model loads onto it."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"unknown device {device!r} (cpu, cuda, cuda:N, ...)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r}: no CUDA device here (device='cpu' runs on this CPU)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"no device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    return device


def check_predicted_channels(model) -> None:
    """A ValueError where `model`'s DiT predicts other latent channels than it takes (a Wan config
    field; a model.json may say it): a session denoises its latents with its predictions, a tensor
    size error at its first chunk or window."""
    cfg = model.cfg
    if cfg.out_channels != cfg.in_channels:
        raise ValueError(f"{model.name}: its DiT predicts {cfg.out_channels} latent channels of "
                         f"{cfg.in_channels}: a session denoises its latents with them (a model.json's "
                         "out_channels must equal its in_channels)")  # fmt: skip


def check_model_device(model, device: torch.device) -> None:
    """A ValueError unless `model` is loaded on `device` (a session on another device failed at
    start() on a device mismatch deep in the DiT)."""
    on = next(model.dit.parameters()).device
    if on.type != device.type or None not in (on.index, device.index) and on.index != device.index:
        raise ValueError(
            f"{model.name} is loaded on {on}, the session asked for {device}: load it there "
            f"(load_model(..., device={str(device)!r})) or give the session device={str(on)!r}"
        )
