"""Writing what a person looks at: MP4 with sound (PyAV) and PNG contact sheets."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from streamgen.files import write_atomically


def upscale(frames: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour upscaling of [..., H, W, 3] (small frames are unreadable otherwise)."""
    if factor <= 1:
        return frames
    return frames.repeat(factor, axis=-3).repeat(factor, axis=-2)


def write_mp4(
    path: Path, pieces: Iterable[tuple[np.ndarray, np.ndarray | None]], fps: int = 25, rate: int = 16000,
    comment: str | None = None,
) -> None:  # fmt: skip
    """H.264 video + AAC audio to `path`, written to a temporary name first, of `pieces`: (frames
    [T, H, W, 3], their audio or None), one after the other, each written as it comes (clips, all held
    to be written at once, were a preview of many clips' memory). The size is the first piece's.
    Each piece's audio starts with its first frame and lasts as long as its frames: cut where it runs
    longer, silence where it runs short or is None (written one after the other, a short piece's
    audio moved every later piece's sound earlier than its frames)."""
    from streamgen.media import Mp4Writer

    writer = None
    try:
        pending = np.zeros(0, np.float32)  # (audio is muxed in frames of 1024 samples: the rest waits)
        frames_so_far = samples_so_far = 0
        for frames, audio in pieces:
            if writer is None:
                writer = Mp4Writer(path, frames.shape[2], frames.shape[1], fps=fps, audio_rate=rate, comment=comment)
            writer.write_frames(frames)
            frames_so_far += len(frames)
            # (from the count of all frames, not each piece's: no rounding adds up over many pieces)
            due = round(frames_so_far * rate / fps) - samples_so_far
            fitted = np.zeros(due, np.float32)
            if audio is not None:
                fitted[: min(due, len(audio))] = audio[:due]
            samples_so_far += due
            pending = np.concatenate([pending, fitted])
            whole = len(pending) - len(pending) % 1024
            writer.write_audio(pending[:whole])
            pending = pending[whole:]
        if writer is None:
            raise ValueError("no frames to write")
        if len(pending):
            writer.write_audio(pending)
        writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise


def contact_row(frames: np.ndarray, columns: int = 8, gap: int = 2) -> np.ndarray:
    """`columns` evenly spaced frames of [T, H, W, 3] side by side: a contact sheet's row."""
    picks = np.linspace(0, len(frames) - 1, columns).round().astype(int)
    h, w = frames.shape[1:3]
    row = np.full((h, columns * (w + gap) - gap, 3), 255, np.uint8)
    for c, t in enumerate(picks):
        row[:, c * (w + gap) : c * (w + gap) + w] = frames[t]
    return row


def stack_rows(rows: list[np.ndarray], gap: int = 2) -> np.ndarray:
    """Contact sheet rows (`contact_row`) one under the other: one RGB image."""
    width = max(r.shape[1] for r in rows)
    sheet = np.full((sum(r.shape[0] + gap for r in rows) - gap, width, 3), 255, np.uint8)
    y = 0
    for r in rows:
        sheet[y : y + r.shape[0], : r.shape[1]] = r
        y += r.shape[0] + gap
    return sheet


def contact_sheet(rows: list[np.ndarray], columns: int = 8, gap: int = 2) -> np.ndarray:
    """One row per clip: `columns` evenly spaced frames of each [T, H, W, 3] -> one RGB image."""
    return stack_rows([contact_row(frames, columns, gap) for frames in rows], gap)


def save_png(path: Path, image: np.ndarray, software: str | None = None) -> None:
    """`image` as a PNG at `path`; `software`, what wrote it, in its Software text chunk (`written_by`)."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if software:
        info.add_text("Software", software)
    write_atomically(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG", pnginfo=info))


def written_by(path: Path) -> str | None:
    """What wrote the MP4 or PNG at `path`, as `write_mp4`'s comment or `save_png`'s software said
    it; None for a file that says nothing, or that is no video or image."""
    try:
        if path.suffix == ".png":
            from PIL import Image

            with Image.open(path) as image:
                return getattr(image, "text", {}).get("Software")
        import av

        with av.open(str(path)) as container:
            return container.metadata.get("comment")
    except Exception:  # (not a video or image, unreadable: a file of the user's, said to be none of ours)
        return None
