"""Writing what a person looks at: MP4 with sound (PyAV) and PNG contact sheets."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def upscale(frames: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour upscaling of [..., H, W, 3] (small frames are unreadable otherwise)."""
    if factor <= 1:
        return frames
    return frames.repeat(factor, axis=-3).repeat(factor, axis=-2)


def write_mp4(
    path: Path, frames: np.ndarray, audio: np.ndarray | None, fps: int = 25, rate: int = 16000
) -> None:
    """H.264 video (+ AAC audio when given) to `path`, written to a temporary name first."""
    import av

    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    t, h, w, _ = frames.shape
    if h % 2 or w % 2:  # yuv420p needs even sizes
        frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    with av.open(str(tmp), mode="w", format="mp4") as container:
        video = container.add_stream("libx264", rate=fps)
        video.width, video.height = frames.shape[2], frames.shape[1]
        video.pix_fmt = "yuv420p"
        video.options = {"crf": "18", "preset": "veryfast"}
        sound = None
        if audio is not None:
            sound = container.add_stream("aac", rate=rate)
            sound.layout = "mono"
        for frame in frames:
            for packet in video.encode(
                av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            ):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
        if sound is not None:
            pcm = (np.clip(audio, -1, 1) * 32767).astype(np.int16)
            step = 1024
            for k in range(0, len(pcm), step):
                chunk = av.AudioFrame.from_ndarray(pcm[None, k : k + step], format="s16", layout="mono")
                chunk.sample_rate = rate
                chunk.pts = k
                for packet in sound.encode(chunk):
                    container.mux(packet)
            for packet in sound.encode():
                container.mux(packet)
    tmp.replace(path)


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

    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    Image.fromarray(image).save(tmp, format="PNG")
    tmp.replace(path)
