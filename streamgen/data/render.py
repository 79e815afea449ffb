"""An anti-aliased 2D renderer of a frontal talking head (numpy only).

Every shape is a signed distance field evaluated on the pixel grid; a pixel's
coverage is `clip(0.5 - distance_in_pixels, 0, 1)`, which gives one-pixel
anti-aliased edges at any resolution. Shapes are evaluated only inside their
bounding box, so the cost grows with the face's pixel area, not the number of
shapes times the frame.

Coordinates: the frame's shorter side spans [-1, 1]; x to the right, y down.
Head pose is pseudo-3D: features sit on a sphere and slide with yaw and pitch
by their depth; roll rotates the whole head about its centre.

`Identity` holds everything that stays fixed for a person (face shape, skin,
hair style and colour, eyes, brows, lips, glasses, background); `Identity.from_id`
makes the same person for the same integer everywhere. `render_frame` draws one
frame from an identity and a dict of motion parameters (see `motion.Motion`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

HAIR_STYLES = ("bald", "short", "long", "bob", "fringe", "curly", "bun")

_SKIN = np.array(
    [[255, 224, 196], [241, 194, 160], [224, 172, 130], [198, 134, 96], [141, 85, 52], [92, 58, 38]]
)
_HAIR = np.array(
    [[20, 17, 15], [60, 40, 28], [110, 70, 40], [180, 130, 70], [230, 200, 130],
     [160, 60, 30], [150, 150, 155], [235, 235, 235], [40, 60, 140], [150, 40, 120]]
)  # fmt: skip
_EYES = np.array([[60, 40, 25], [110, 75, 40], [70, 120, 170], [80, 130, 80], [120, 120, 130], [30, 25, 20]])


@dataclass(frozen=True)
class Identity:
    head_w: float  # half-width of the head, frame units
    head_h: float
    jaw: float  # 0: round, 1: narrow chin
    skin: tuple[int, int, int]
    hair_style: str
    hair_color: tuple[int, int, int]
    hair_volume: float
    eye_color: tuple[int, int, int]
    eye_size: float
    eye_spacing: float
    eye_height: float
    brow_thickness: float
    brow_color: tuple[int, int, int]
    lip_color: tuple[int, int, int]
    mouth_size: float
    nose_length: float
    glasses: bool
    shirt_color: tuple[int, int, int]
    background_top: tuple[int, int, int]
    background_bottom: tuple[int, int, int]
    liveliness: float

    @classmethod
    def sample(cls, rng: np.random.Generator) -> Identity:
        def mix(palette, jitter):
            i = rng.integers(len(palette))
            j = min(i + 1, len(palette) - 1)
            c = palette[i] + rng.random() * (palette[j] - palette[i]) + rng.normal(0, jitter, 3)
            return tuple(int(v) for v in np.clip(c, 0, 255))

        skin = mix(_SKIN, 6)
        hair = mix(_HAIR, 10)
        lip_base = np.array(skin) * np.array([0.85, 0.55, 0.55]) + np.array([30, 0, 5])
        brow = tuple(int(v) for v in np.clip(np.array(hair) * 0.7, 0, 255))
        bg = rng.uniform(30, 230, 3)
        return cls(
            head_w=float(rng.uniform(0.38, 0.48)),
            head_h=float(rng.uniform(0.5, 0.6)),
            jaw=float(rng.uniform(0.0, 0.9)),
            skin=skin,
            hair_style=HAIR_STYLES[int(rng.integers(len(HAIR_STYLES)))],
            hair_color=hair,
            hair_volume=float(rng.uniform(0.9, 1.15)),
            eye_color=mix(_EYES, 8),
            eye_size=float(rng.uniform(0.8, 1.25)),
            eye_spacing=float(rng.uniform(0.36, 0.46)),
            eye_height=float(rng.uniform(-0.18, -0.05)),
            brow_thickness=float(rng.uniform(0.6, 1.5)),
            brow_color=brow,
            lip_color=tuple(int(v) for v in np.clip(lip_base + rng.normal(0, 8, 3), 0, 255)),
            mouth_size=float(rng.uniform(0.85, 1.2)),
            nose_length=float(rng.uniform(0.8, 1.3)),
            glasses=bool(rng.random() < 0.2),
            shirt_color=tuple(int(v) for v in rng.uniform(20, 235, 3)),
            background_top=tuple(int(v) for v in bg),
            background_bottom=tuple(int(v) for v in np.clip(bg + rng.normal(0, 40, 3), 0, 255)),
            liveliness=float(rng.uniform(0.6, 1.4)),
        )

    @classmethod
    def from_id(cls, identity_id: int) -> Identity:
        return cls.sample(np.random.default_rng([0x1D, int(identity_id)]))

    def to_dict(self) -> dict:
        return asdict(self)


class _Canvas:
    """A float image plus the pixel grid in frame units."""

    def __init__(self, height: int, width: int):
        self.h, self.w = height, width
        self.scale = min(height, width) / 2.0  # pixels per frame unit
        self.img = np.zeros((height, width, 3), np.float32)
        self.xs = (np.arange(width) + 0.5 - width / 2) / self.scale
        self.ys = (np.arange(height) + 0.5 - height / 2) / self.scale

    def grid(self, cx: float, cy: float, radius: float):
        """Pixel coordinates (relative to cx, cy) of the box of `radius` around the point, or None."""
        r = radius + 2 / self.scale
        j0 = max(int((cx - r) * self.scale + self.w / 2), 0)
        j1 = min(int((cx + r) * self.scale + self.w / 2) + 2, self.w)
        i0 = max(int((cy - r) * self.scale + self.h / 2), 0)
        i1 = min(int((cy + r) * self.scale + self.h / 2) + 2, self.h)
        if j0 >= j1 or i0 >= i1:
            return None
        x = self.xs[None, j0:j1] - cx
        y = self.ys[i0:i1, None] - cy
        return (slice(i0, i1), slice(j0, j1)), x, y

    def coverage(self, distance: np.ndarray) -> np.ndarray:
        return np.clip(0.5 - distance * self.scale, 0.0, 1.0)

    def paint(self, box, alpha: np.ndarray, color) -> None:
        region = self.img[box]
        a = alpha[..., None]
        region *= 1 - a
        region += a * (np.asarray(color, np.float32) / 255.0)


def _rotate(x, y, angle):
    c, s = np.cos(angle), np.sin(angle)
    return c * x + s * y, -s * x + c * y


def _ellipse_distance(x, y, rx, ry, bend=0.0, taper=0.0):
    """Approximate signed distance to an ellipse in local coordinates.

    bend curves the ellipse (y shifted by bend * x^2, a smile or an arched brow);
    taper narrows it towards +y (a chin).
    """
    if bend:
        y = y - bend * x * x
    if taper:
        rx = rx * (1 - taper * np.clip(y / ry, 0, 1) ** 2)
    rx = np.maximum(rx, 1e-4)
    ry = max(ry, 1e-4)
    k0 = np.sqrt((x / rx) ** 2 + (y / ry) ** 2)
    k1 = np.sqrt((x / rx**2) ** 2 + (y / ry**2) ** 2)
    return k0 * (k0 - 1) / np.maximum(k1, 1e-6)


def _ellipse(canvas, cx, cy, rx, ry, angle, color, bend=0.0, taper=0.0, opacity=1.0, clip=None):
    """Draw an ellipse; clip(x, y) -> extra distance field intersected with it (same local frame)."""
    g = canvas.grid(cx, cy, max(rx, ry) * (1 + abs(bend)) + abs(bend) * rx * rx)
    if g is None:
        return
    box, x, y = g
    lx, ly = _rotate(x, y, angle)
    d = _ellipse_distance(lx, ly, rx, ry, bend, taper)
    if clip is not None:
        d = np.maximum(d, clip(lx, ly))
    canvas.paint(box, canvas.coverage(d) * opacity, color)


def _shade(color, factor):
    return tuple(float(np.clip(c * factor, 0, 255)) for c in color)


def _background(canvas, ident: Identity):
    t = np.linspace(0, 1, canvas.h, dtype=np.float32)[:, None, None]
    top = np.asarray(ident.background_top, np.float32) / 255
    bottom = np.asarray(ident.background_bottom, np.float32) / 255
    canvas.img[:] = top * (1 - t) + bottom * t


def render_frame(ident: Identity, params: dict, height: int, width: int) -> np.ndarray:
    """One RGB uint8 frame [H, W, 3] of `ident` with the motion parameters `params`."""
    cv = _Canvas(height, width)
    _background(cv, ident)
    yaw, pitch, roll = params["yaw"], params["pitch"], params["roll"]
    hw, hh = ident.head_w, ident.head_h
    # the head centre sways with pose (the neck is the pivot)
    hx = 0.25 * np.sin(yaw) * hh + 0.3 * np.sin(roll) * hh
    hy = -0.12 + 0.15 * np.sin(pitch) * hh

    def place(u, v, depth=1.0):
        """Face point (u, v in head radii, on a sphere) -> frame position."""
        z = depth * np.sqrt(max(1.0 - 0.6 * u * u - 0.6 * v * v, 0.05))
        u2, v2 = u + np.sin(yaw) * z, v + np.sin(pitch) * z * 0.8
        px, py = u2 * hw, v2 * hh
        c, s = np.cos(roll), np.sin(roll)
        return hx + c * px - s * py, hy + s * px + c * py

    hair = ident.hair_color
    style = ident.hair_style
    vol = ident.hair_volume
    # body and neck
    _ellipse(cv, hx * 0.3, 1.15, 0.95, 0.45, 0.0, ident.shirt_color)
    _ellipse(cv, hx * 0.6, hy + hh * 0.95, hw * 0.45, hh * 0.55, roll * 0.5, _shade(ident.skin, 0.85))
    # hair behind the head
    if style == "long":
        bx, by = place(0, 0.25, 0.0)
        _ellipse(cv, bx, by, hw * 1.25 * vol, hh * 1.3, roll, _shade(hair, 0.9), taper=-0.1)
    elif style == "bob":
        bx, by = place(0, -0.05, 0.0)
        _ellipse(cv, bx, by, hw * 1.2 * vol, hh * 1.05, roll, _shade(hair, 0.9))
    elif style == "curly":
        bx, by = place(0, -0.25, 0.0)
        _ellipse(cv, bx, by, hw * 1.45 * vol, hh * 1.15 * vol, roll, hair)
    elif style == "bun":
        bx, by = place(0, -1.15, 0.3)
        _ellipse(cv, bx, by, hw * 0.4, hh * 0.3, roll, hair)
    # ears
    for side in (-1, 1):
        ex, ey = place(side * 0.98, 0.02, 0.0)
        _ellipse(cv, ex, ey, hw * 0.16, hh * 0.2, roll, _shade(ident.skin, 0.9))
    # head
    _ellipse(cv, hx, hy, hw, hh, roll, ident.skin, taper=0.45 * ident.jaw)
    # hair on top: the head shape, a little larger, above a hairline curve
    if style != "bald":
        cap_x, cap_y = place(0, -0.05, 0.25)
        hairline = {
            "fringe": -0.25,
            "short": -0.5,
            "curly": -0.45,
            "long": -0.45,
            "bob": -0.35,
            "bun": -0.55,
        }[style]
        bend_line = 0.9 if style != "fringe" else 0.2

        def above_hairline(lx, ly, hairline=hairline, bend_line=bend_line):
            # distance (frame units) to the region above y = hairline + bend * x^2 (head radii)
            return (ly / hh - (hairline + bend_line * (lx / hw) ** 2)) * hh

        _ellipse(cv, cap_x, cap_y, hw * 1.06 * vol, hh * 1.04, roll, hair, clip=above_hairline)
    skin_dark = _shade(ident.skin, 0.8)
    # cheeks blush when smiling
    smile = params["smile"]
    if smile > 0.2:
        for side in (-1, 1):
            cx_, cy_ = place(side * 0.5, 0.3)
            _ellipse(cv, cx_, cy_, hw * 0.18, hh * 0.1, roll, (230, 120, 120), opacity=0.25 * min(smile, 1.0))
    # eyes
    es = ident.eye_size
    blink = float(np.clip(params["blink"], 0, 1))
    wide = 1.0 + 0.25 * max(params["brow"], 0) - 0.12 * max(smile, 0)
    for side in (-1, 1):
        ex, ey = place(side * ident.eye_spacing, ident.eye_height)
        rx, ry = hw * 0.15 * es, hh * 0.085 * es * wide
        open_ry = max(ry * (1 - blink), 1e-4)
        oy = ey + (ry - open_ry) * 0.6  # the upper lid comes down
        lash = 0.012 * es
        _ellipse(cv, ex, oy, rx + lash, open_ry + lash, roll, (30, 25, 25))
        if open_ry > 1e-3:
            _ellipse(cv, ex, oy, rx, open_ry, roll, (245, 245, 240))
            gx = ex + params["gaze_x"] * rx * 0.5
            gy = ey + params["gaze_y"] * ry * 0.5

            def inside_eye(lx, ly, dx=gx - ex, dy=gy - oy, rx=rx, open_ry=open_ry):
                # the iris is seen only through the open eyelids
                return _ellipse_distance(lx + dx, ly + dy, rx, open_ry)

            _ellipse(cv, gx, gy, ry * 0.85, ry * 0.85, roll, ident.eye_color, clip=inside_eye)
            _ellipse(cv, gx, gy, ry * 0.4, ry * 0.4, roll, (10, 10, 10), clip=inside_eye)
        # brows: raised by brow > 0, inner ends lowered when serious
        brow = params["brow"]
        bx, by = place(side * ident.eye_spacing, ident.eye_height - 0.22 - 0.08 * brow)
        tilt = side * (0.12 * min(brow, 0) - 0.05)
        _ellipse(
            cv, bx, by, hw * 0.2, hh * 0.022 * ident.brow_thickness, roll + tilt, ident.brow_color, bend=-2.0
        )
    if ident.glasses:
        for side in (-1, 1):
            ex, ey = place(side * ident.eye_spacing, ident.eye_height)
            r = hw * 0.26 * es
            ring = lambda lx, ly, r=r: -_ellipse_distance(lx, ly, r - 0.02, r * 0.8 - 0.02)
            _ellipse(cv, ex, ey, r, r * 0.8, roll, (25, 25, 30), clip=ring)
        bx, by = place(0, ident.eye_height - 0.03)
        _ellipse(cv, bx, by, hw * 0.14, 0.01, roll, (25, 25, 30))
    # nose: a soft shadow and two nostrils
    nl = ident.nose_length
    nx, ny = place(0, 0.12 * nl, 1.15)
    _ellipse(cv, nx, ny, hw * 0.09, hh * 0.13 * nl, roll, skin_dark, opacity=0.45)
    for side in (-1, 1):
        sx, sy = place(side * 0.08, 0.22 + 0.06 * nl, 1.15)
        _ellipse(cv, sx, sy, hw * 0.04, hh * 0.02, roll, _shade(ident.skin, 0.5), opacity=0.8)
    # mouth
    ms = ident.mouth_size
    open_ = float(np.clip(params["mouth_open"], 0, 1))
    width = float(params["mouth_width"])
    rnd = float(params["mouth_round"])
    mx, my = place(0, 0.52 + 0.05 * open_, 1.0)
    mrx = hw * ms * (0.22 + 0.22 * width) * (1 - 0.3 * rnd)
    inner_ry = hh * 0.15 * open_ * (1 + 0.3 * rnd)
    lip = hh * 0.035 * ms * (1 + 0.4 * rnd)
    bend = -(0.9 * smile) / max(mrx * 6, 0.3)  # corners up when smiling (y grows downwards)
    _ellipse(cv, mx, my, mrx + lip * 0.6, inner_ry + lip, roll, ident.lip_color, bend=bend)
    if inner_ry * cv.scale > 0.15:
        _ellipse(cv, mx, my, mrx * 0.9, inner_ry, roll, (60, 15, 20), bend=bend)
        teeth_top = lambda lx, ly, r=inner_ry: ly - bend * lx * lx + r * 0.35
        _ellipse(cv, mx, my, mrx * 0.8, inner_ry * 0.9, roll, (240, 238, 230), bend=bend, clip=teeth_top)
        tongue_ry = inner_ry * 0.45
        _ellipse(
            cv,
            mx,
            my + inner_ry * 0.6,
            mrx * 0.5,
            tongue_ry,
            roll,
            (190, 80, 90),
            bend=bend,
            clip=lambda lx, ly, r=inner_ry: _ellipse_distance(lx, ly + r * 0.6, mrx * 0.9, r, bend),
        )
    else:
        # closed lips: a thin dark seam, curved with the smile
        _ellipse(cv, mx, my, mrx * 0.95, 0.006, roll, _shade(ident.lip_color, 0.45), bend=bend)
    return (np.clip(cv.img, 0, 1) * 255 + 0.5).astype(np.uint8)


def render_clip(ident: Identity, motion, height: int, width: int) -> np.ndarray:
    """All frames of a `Motion` -> uint8 [T, H, W, 3]."""
    frames = np.empty((len(motion), height, width, 3), np.uint8)
    for t in range(len(motion)):
        frames[t] = render_frame(ident, motion.frame(t), height, width)
    return frames


def render_reference(ident: Identity, height: int, width: int) -> np.ndarray:
    """The identity's reference image: frontal, neutral, eyes open, mouth closed."""
    from .motion import neutral_motion

    return render_frame(ident, neutral_motion(1).frame(0), height, width)
