"""Write the bundled sample assets used by `streamgen generate` by default.

    python -m streamgen.data.make_assets [--out streamgen/assets]

sample_speech.wav: ~4 s of espeak-ng speech, 16 kHz mono int16.
sample_face.png:   a 128x128 reference face from the avatar-world renderer.
Both are deterministic, so re-running this reproduces the committed files.
"""

from __future__ import annotations

import argparse
import sys
import wave
from pathlib import Path

import numpy as np

from streamgen.files import write_atomically

SAMPLE_SENTENCE = "Hello, I am a streaming avatar. I move my lips in time with what you say."
SAMPLE_IDENTITY = 9


def write_wav(path: Path, audio: np.ndarray, rate: int = 16000) -> None:
    """float32 mono in [-1, 1] -> 16-bit PCM WAV, put in place whole (`write_atomically`)."""
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2")

    def write(tmp: Path) -> None:
        with wave.open(str(tmp), "wb") as f:
            f.setnchannels(1)
            f.setsampwidth(2)
            f.setframerate(rate)
            f.writeframes(pcm.tobytes())

    write_atomically(path, write)


def make_assets(out: Path) -> list[Path]:
    from PIL import Image

    from .render import Identity, render_reference
    from .speech import Voice, synthesize

    out.mkdir(parents=True, exist_ok=True)
    speech = synthesize(SAMPLE_SENTENCE, Voice("en-us", "m3", pitch=45, rate=175))
    wav_path, png_path = out / "sample_speech.wav", out / "sample_face.png"
    write_wav(wav_path, speech.audio)
    face = render_reference(Identity.from_id(SAMPLE_IDENTITY), 128, 128)
    # (each written to a temp file and put in place: one stopped while written was left cut short
    # under its own name, the sample `generate` reads by default)
    write_atomically(png_path, lambda tmp: Image.fromarray(face).save(tmp, format="PNG", optimize=True))
    return [wav_path, png_path]


def main(argv: list[str] | None = None) -> None:
    # (named as it is run: it said "usage: make_assets.py", a file no one types)
    parser = argparse.ArgumentParser(
        prog="python -m streamgen.data.make_assets", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parents[1] / "assets",
        help="folder to write them into (default: streamgen/assets, the bundled ones)",
    )
    args = parser.parse_args(argv)
    try:
        paths = make_assets(args.out)
    except OSError as e:  # (a file in the way of --out, a folder not writable: was a traceback)
        print(f"make_assets: error: cannot write into --out {args.out}: {e.strerror or e}", file=sys.stderr)
        raise SystemExit(2) from None
    for path in paths:
        print(path, path.stat().st_size, "bytes")


if __name__ == "__main__":
    main()
