"""Built-in avatars and uploaded reference images.

Built-ins are the project's sample face and a few identities of the avatar world
(rendered, not downloaded). Uploads are checked before they are decoded: size on
the wire, then the pixel count from the header (a decompression bomb is refused
without allocating it), then a full decode.
"""

from __future__ import annotations

import io
from functools import lru_cache
from pathlib import Path

import numpy as np

from streamgen.media import upright_rgb

SAMPLE_FACE = Path(__file__).resolve().parent.parent / "streamgen" / "assets" / "sample_face.png"
WORLD_IDENTITIES = {"ada": 3, "bo": 7, "cleo": 11, "dev": 19}  # avatar-world identity ids
AVATAR_SIZE = 256


class ReferenceImageError(ValueError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def list_avatars() -> list[dict]:
    names = ["sample"] + list(WORLD_IDENTITIES)
    return [{"id": n, "name": n.capitalize(), "image": f"/v1/avatars/{n}.png"} for n in names]


@lru_cache(maxsize=16)
def avatar_image(avatar_id: str) -> np.ndarray:
    """The avatar's reference picture, uint8 [H, W, 3]; KeyError for unknown names."""
    if avatar_id == "sample":
        from PIL import Image

        with Image.open(SAMPLE_FACE) as im:
            return np.asarray(im.convert("RGB"))
    if avatar_id not in WORLD_IDENTITIES:
        raise KeyError(avatar_id)
    from streamgen.data.render import Identity, render_reference

    return render_reference(Identity.from_id(WORLD_IDENTITIES[avatar_id]), AVATAR_SIZE, AVATAR_SIZE)


@lru_cache(maxsize=16)
def avatar_png(avatar_id: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(avatar_image(avatar_id)).save(buf, format="PNG")
    return buf.getvalue()


def decode_reference(data: bytes, max_pixels: int) -> np.ndarray:
    """Uploaded bytes -> uint8 [H, W, 3], or ReferenceImageError with the HTTP status to answer."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ReferenceImageError(422, "reference image is empty")
    try:
        with Image.open(io.BytesIO(data)) as im:
            # MPO: a JPEG with more pictures after the first (cameras' and phones' portrait shots)
            if im.format not in ("PNG", "JPEG", "MPO", "WEBP", "BMP", "GIF"):
                raise ReferenceImageError(415, f"reference image format {im.format} is not supported")
            w, h = im.size
            if w * h > max_pixels:
                raise ReferenceImageError(
                    413, f"reference image is {w}x{h} pixels; at most {max_pixels} pixels are accepted"
                )
            if min(w, h) < 8:
                raise ReferenceImageError(422, f"reference image is {w}x{h}; it must be at least 8x8")
            im.load()
            return upright_rgb(im)
    except ReferenceImageError:
        raise
    except UnidentifiedImageError:
        raise ReferenceImageError(415, "reference is not an image (PNG, JPEG, WebP, BMP or GIF)") from None
    except Image.DecompressionBombError:  # PIL's own limit (twice its MAX_IMAGE_PIXELS), met before ours
        # its words were "... exceeds limit of 178956970 pixels, could be decompression bomb DOS
        # attack": neither this server's limit nor anything its user did
        raise ReferenceImageError(413, f"reference image has too many pixels; at most {max_pixels} pixels are accepted") from None
    except (OSError, ValueError, SyntaxError) as e:  # truncated or corrupt files
        raise ReferenceImageError(422, f"reference image could not be decoded: {e}") from None
