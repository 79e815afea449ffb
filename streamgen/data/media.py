"""Writing what a person looks at: MP4 with sound (PyAV) and PNG contact sheets."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from streamgen.files import write_atomically


def upscale(frames: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour upscaling of [..., H, W, 3] (small frames are unreadable otherwise)."""
    if factor <= 1:
        return frames
    return frames.repeat(factor, axis=-3).repeat(factor, axis=-2)


def write_mp4(
    path: Path, frames: np.ndarray, audio: np.ndarray | None, fps: int = 25, rate: int = 16000
) -> None:
    """H.264 video (+ AAC audio when given) to `path`, written to a temporary name first."""
    from streamgen.media import Mp4Writer

    writer = Mp4Writer(path, frames.shape[2], frames.shape[1], fps=fps, audio_rate=rate if audio is not None else None)
    try:
        writer.write_frames(frames)
        if audio is not None:
            writer.write_audio(audio)
        writer.close()
    except BaseException:
        writer.abort()
        raise


def contact_sheet(rows: list[np.ndarray], columns: int = 8, gap: int = 2) -> np.ndarray:
    """One row per clip: `columns` evenly spaced frames of each [T, H, W, 3] -> one RGB image."""
    tiles = []
    for frames in rows:
        picks = np.linspace(0, len(frames) - 1, columns).round().astype(int)
        h, w = frames.shape[1:3]
        row = np.full((h, columns * (w + gap) - gap, 3), 255, np.uint8)
        for c, t in enumerate(picks):
            row[:, c * (w + gap) : c * (w + gap) + w] = frames[t]
        tiles.append(row)
    width = max(r.shape[1] for r in tiles)
    sheet = np.full((sum(r.shape[0] + gap for r in tiles) - gap, width, 3), 255, np.uint8)
    y = 0
    for r in tiles:
        sheet[y : y + r.shape[0], : r.shape[1]] = r
        y += r.shape[0] + gap
    return sheet


def save_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    write_atomically(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG"))
