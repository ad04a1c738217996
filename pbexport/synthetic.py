"""Built-in procedurally generated image tasks, so the demo and tests need no downloads.

One BASE task (coloured shapes) pretrains a network; the NEW tasks share its low-level
statistics (edges, blobs, colour, noise) but shift the domain (gratings, counting, glyphs,
outlines on texture), so reusing frozen features helps yet a linear head alone falls short.

Every image is a pure function of (task, split, seed, n, size): the random stream is a
PCG64 seeded from crc32 of the task and split names, and rendering uses only uniform and
integer draws and IEEE-exact arithmetic (+, -, *, /, sqrt, floor, min/max), never
sin/exp/log, whose last bit varies by platform and could flip a rounded uint8.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable

import numpy as np

from pbexport.errors import PbexportError

BASE_TASK = "base"

# Images are rendered this many at a time to bound memory; it is part of the random-stream
# layout, so changing it changes the generated data.
_CHUNK = 1024
_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_SQRT3_2 = math.sqrt(3.0) / 2.0

# Where the label depends on every part of the content (counts, digit segments), the content
# stays this far (unit coords; 1/8 of the image) from the border, so a shifted-crop
# augmentation with size/8 padding cannot push a blob or segment out and change the label.
_SAFE = 0.75

_F = np.float32
_Grid = tuple[np.ndarray, np.ndarray, float]  # X (1,H,W), Y (1,H,W), pixel width; coords in [-1, 1]


# --------------------------------------------------------------------------- helpers


def _col(a: np.ndarray) -> np.ndarray:
    """Per-image values (m,) as float32 (m,1,1) so they broadcast over the pixel grid."""
    return np.asarray(a, dtype=_F)[:, None, None]


def _uniform(rng: np.random.Generator, lo: float, hi: float, m: int) -> np.ndarray:
    return lo + (hi - lo) * rng.random(m)


def _coverage(d: np.ndarray, px: float) -> np.ndarray:
    """Anti-aliased fill from a signed distance (unit coords, <0 inside): ~1 pixel ramp."""
    return np.clip(_F(0.5) - d * _F(1.0 / px), _F(0.0), _F(1.0))


def _two_tones(rng: np.random.Generator, m: int, channels: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Random (ink, paper) colours, one light and one dark, so ink is always visible.

    Which one is light is a coin flip, so both polarities occur in every task.
    """
    dark = 0.42 * rng.random((m, channels))
    light = 0.58 + 0.42 * rng.random((m, channels))
    ink_light = rng.random(m) < 0.5
    ink = np.where(ink_light[:, None], light, dark)
    paper = np.where(ink_light[:, None], dark, light)
    if channels == 1:  # grayscale: same value on R, G and B
        ink, paper = np.repeat(ink, 3, axis=1), np.repeat(paper, 3, axis=1)
    return ink.astype(_F), paper.astype(_F)


def _gradient_background(rng: np.random.Generator, paper: np.ndarray, grid: _Grid) -> np.ndarray:
    """Paper colour with a gentle random linear shading, (m,H,W,3)."""
    X, Y, _ = grid
    m = len(paper)
    gx = _col(_uniform(rng, -0.08, 0.08, m))[..., None]
    gy = _col(_uniform(rng, -0.08, 0.08, m))[..., None]
    return paper[:, None, None, :] + gx * X[..., None] + gy * Y[..., None]


def _add_noise(rng: np.random.Generator, img: np.ndarray, amp: float, gray: bool = False) -> np.ndarray:
    """Uniform per-pixel noise in [-amp, amp]; gray noise keeps grayscale images gray."""
    shape = img.shape[:3] + ((1,) if gray else (3,))
    noise = rng.random(shape, dtype=_F)
    return img + (noise - _F(0.5)) * _F(2.0 * amp)


def _composite(bg: np.ndarray, ink: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Blend per-image ink colour (m,3) over bg (m,H,W,3) with coverage alpha (m,H,W)."""
    a = alpha[..., None]
    return bg + (ink[:, None, None, :] - bg) * a


def _to_uint8(img: np.ndarray) -> np.ndarray:
    # explicit clip + floor(x + 0.5): no reliance on platform rounding of float->int casts
    return np.floor(np.clip(img, _F(0.0), _F(1.0)) * _F(255.0) + _F(0.5)).astype(np.uint8)


def _small_rotation(rng: np.random.Generator, m: int, max_sin: float) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin) of a random small angle, via sqrt so no trig is involved."""
    s = _uniform(rng, -max_sin, max_sin, m)
    return np.sqrt(1.0 - s * s), s


def _local_coords(grid: _Grid, cx, cy, c, s, r) -> tuple[np.ndarray, np.ndarray]:
    """Pixel grid in each image's shape frame: centred, rotated, divided by scale r."""
    X, Y, _ = grid
    dx, dy = X - _col(cx), Y - _col(cy)
    c, s, inv_r = _col(c), _col(s), _col(1.0 / r)
    return (dx * c + dy * s) * inv_r, (dy * c - dx * s) * inv_r


# --------------------------------------------------------------------------- shape SDFs
# Signed distances in shape units (radius ~1, <0 inside, y points down). Only small
# rotations are applied, so square/diamond and cross/x stay distinct classes.


def _box(u, v, a: float, b: float):
    return np.maximum(np.abs(u) - _F(a), np.abs(v) - _F(b))


def _tri_up(u, v, inradius: float):
    # max over the three edge half-planes of an equilateral triangle with its apex up
    su, hv = _F(_SQRT3_2) * u, _F(0.5) * v
    return np.maximum(np.maximum(v, -su - hv), su - hv) - _F(inradius)


def _cross(u, v):
    return np.minimum(_box(u, v, 0.95, 0.3), _box(u, v, 0.3, 0.95))


def _disc(u, v, r: float):
    return np.sqrt(u * u + v * v) - _F(r)


_SHAPES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "disc": lambda u, v: _disc(u, v, 0.95),
    "ring": lambda u, v: np.abs(_disc(u, v, 0.7)) - _F(0.27),
    "square": lambda u, v: _box(u, v, 0.8, 0.8),
    "diamond": lambda u, v: (np.abs(u) + np.abs(v) - _F(1.05)) * _F(_INV_SQRT2),
    "triangle": lambda u, v: _tri_up(u, v - _F(0.29), 0.58),  # centroid moved down: bbox centred
    "star": lambda u, v: np.minimum(_tri_up(u, v, 0.5), _tri_up(u, -v, 0.5)),
    "cross": _cross,
    "x": lambda u, v: _cross((u + v) * _F(_INV_SQRT2), (v - u) * _F(_INV_SQRT2)),
    "crescent": lambda u, v: np.maximum(_disc(u, v, 0.95), _F(0.8) - _disc(u - _F(0.45), v, 0.0)),
    "bar": lambda u, v: _box(u, v, 0.95, 0.3),
}
_SHAPE_NAMES = list(_SHAPES)


def _shape_distance(labels: np.ndarray, u: np.ndarray, v: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Signed distance in unit image coords for each image's shape class, (m,H,W)."""
    d = np.empty(u.shape, dtype=_F)
    for k, name in enumerate(_SHAPE_NAMES):
        sel = labels == k
        if sel.any():
            d[sel] = _SHAPES[name](u[sel], v[sel]) * _col(r[sel])
    return d


def _random_placement(rng: np.random.Generator, m: int, r_lo: float, r_hi: float):
    """Scale, centre and small rotation that keep a radius-r shape inside the frame."""
    r = _uniform(rng, r_lo, r_hi, m)
    room = 0.97 - 1.1 * r
    cx, cy = (2 * rng.random(m) - 1) * room, (2 * rng.random(m) - 1) * room
    c, s = _small_rotation(rng, m, 0.25)  # up to ~14 degrees
    return cx, cy, c, s, r


# --------------------------------------------------------------------------- tasks
# Each renderer maps (labels (m,), rng, grid) to float32 images (m,H,W,3) in about [0, 1].


def _render_base(labels, rng, grid):
    """Filled shapes, random colour/position/scale, on a shaded noisy coloured background."""
    m = len(labels)
    ink, paper = _two_tones(rng, m)
    cx, cy, c, s, r = _random_placement(rng, m, 0.38, 0.62)
    u, v = _local_coords(grid, cx, cy, c, s, r)
    alpha = _coverage(_shape_distance(labels, u, v, r), grid[2])
    img = _composite(_gradient_background(rng, paper, grid), ink, alpha)
    return _add_noise(rng, img, 0.1)


def _segment_distance(grid: _Grid, ax, ay, bx, by) -> np.ndarray:
    """Distance from each pixel to the segment a-b (per image), (m,H,W)."""
    X, Y, _ = grid
    ex, ey = _col(bx - ax), _col(by - ay)
    px_, py_ = X - _col(ax), Y - _col(ay)
    h = np.clip((px_ * ex + py_ * ey) / (ex * ex + ey * ey + _F(1e-12)), _F(0.0), _F(1.0))
    qx, qy = px_ - h * ex, py_ - h * ey
    return np.sqrt(qx * qx + qy * qy)


_OUTLINE_CLUTTER = 2  # distractor line segments per image


def _render_outline(labels, rng, grid):
    """The base shapes drawn as thin outlines over a checkerboard texture with clutter lines."""
    X, Y, px = grid
    m = len(labels)
    ink, paper = _two_tones(rng, m)
    cx, cy, c, s, r = _random_placement(rng, m, 0.42, 0.66)
    u, v = _local_coords(grid, cx, cy, c, s, r)
    width = _col(_uniform(rng, 0.7, 1.1, m) * px)  # stroke half-width: ~1.5-2 px strokes
    alpha = _coverage(np.abs(_shape_distance(labels, u, v, r)) - width, px)
    # checkerboard of random cell size/offset, tinted by its own random colour
    cell = _col(1.0 / _uniform(rng, 0.18, 0.4, m))
    ox, oy = _col(rng.random(m) * 4), _col(rng.random(m) * 4)
    checker = (np.floor(X * cell + ox) + np.floor(Y * cell + oy)) % _F(2.0)
    tint = (rng.random((m, 3)).astype(_F) - _F(0.5)) * _F(0.8)
    img = _gradient_background(rng, paper, grid) + (checker - _F(0.5))[..., None] * tint[:, None, None, :]
    # clutter: straight segments in a colour between paper and ink (lower contrast than the shape)
    for _ in range(_OUTLINE_CLUTTER):
        ax, ay, bx, by = (2 * rng.random((4, m)) - 1) * 0.95
        mix = _uniform(rng, 0.3, 0.7, m)[:, None].astype(_F)
        line_alpha = _coverage(_segment_distance(grid, ax, ay, bx, by) - width, px)
        img = _composite(img, paper + (ink - paper) * mix, line_alpha)
    img = _composite(img, ink, alpha)
    return _add_noise(rng, img, 0.08)


_ORIENTS = ((1.0, 0.0), (_INV_SQRT2, _INV_SQRT2), (0.0, 1.0), (-_INV_SQRT2, _INV_SQRT2))
_PERIODS = (0.55, 0.27)  # in unit coords: ~9 px and ~4.3 px at 32x32


def _render_stripes(labels, rng, grid):
    """Full-frame grating; class = orientation (4) x spatial frequency (2)."""
    X, Y, _ = grid
    m = len(labels)
    ink, paper = _two_tones(rng, m)
    orient, freq = labels // 2, labels % 2
    base = np.array(_ORIENTS)[orient]
    c, s = _small_rotation(rng, m, 0.14)  # ~8 degrees of orientation jitter
    ux, uy = c * base[:, 0] - s * base[:, 1], s * base[:, 0] + c * base[:, 1]
    inv_period = 1.0 / (np.array(_PERIODS)[freq] * _uniform(rng, 0.88, 1.12, m))
    t = (X * _col(ux) + Y * _col(uy)) * _col(inv_period) + _col(rng.random(m))
    tri = np.abs(_F(2.0) * (t - np.floor(t)) - _F(1.0))  # triangle wave in [0, 1]
    wave = tri * tri * (_F(3.0) - _F(2.0) * tri)  # smoothstep: sinusoid-like, trig-free
    img = _composite(_gradient_background(rng, paper, grid), ink, wave)
    return _add_noise(rng, img, 0.12)


_COUNT_GRID = 4  # blobs sit in distinct cells of a 4x4 grid (inside _SAFE), so they never overlap
_MAX_COUNT = 6


def _render_count(labels, rng, grid):
    """1..6 small blobs of one colour, non-overlapping; class = number of blobs - 1."""
    X, Y, px = grid
    m = len(labels)
    ink, paper = _two_tones(rng, m)
    img = _gradient_background(rng, paper, grid)
    cells = np.argsort(rng.random((m, _COUNT_GRID * _COUNT_GRID)), axis=1)  # random distinct cells
    half = _SAFE / _COUNT_GRID  # half a cell, in unit coords
    for slot in range(_MAX_COUNT):
        r = _uniform(rng, 0.09, 0.13, m)
        jitter = half - r - 0.02
        jx, jy = (2 * rng.random(m) - 1) * jitter, (2 * rng.random(m) - 1) * jitter
        cell = cells[:, slot]
        cx = -_SAFE + (2 * (cell % _COUNT_GRID) + 1) * half + jx
        cy = -_SAFE + (2 * (cell // _COUNT_GRID) + 1) * half + jy
        dx, dy = X - _col(cx), Y - _col(cy)
        alpha = _coverage(np.sqrt(dx * dx + dy * dy) - _col(r), px)
        alpha *= _col(slot <= labels)  # only the first label+1 slots are drawn
        img = _composite(img, ink, alpha)
    return _add_noise(rng, img, 0.1)


# Seven-segment glyphs: segment -> (centre u, centre v, is_horizontal) in glyph units,
# glyph half-width 0.5 and half-height 1.
_SEGMENTS = {
    "a": (0.0, -1.0, True),
    "g": (0.0, 0.0, True),
    "d": (0.0, 1.0, True),
    "f": (-0.5, -0.5, False),
    "b": (0.5, -0.5, False),
    "e": (-0.5, 0.5, False),
    "c": (0.5, 0.5, False),
}
_DIGITS = ("abcdef", "bc", "abged", "abgcd", "fgbc", "afgcd", "afgedc", "abc", "abcdefg", "abcdfg")
_DIGIT_SEGMENTS = np.array([[seg in digit for seg in _SEGMENTS] for digit in _DIGITS])  # (10, 7) bool


def _render_glyphs(labels, rng, grid):
    """Grayscale seven-segment digits 0-9 with random offset, scale, slant and stroke."""
    m = len(labels)
    ink, paper = _two_tones(rng, m, channels=1)
    r = _uniform(rng, 0.36, 0.52, m)
    t = _uniform(rng, 0.13, 0.19, m)  # stroke half-thickness, glyph units
    slant = _uniform(rng, -0.2, 0.2, m)
    room_x = _SAFE - r * (0.5 + t + np.abs(slant) * (1 + t))
    room_y = _SAFE - r * (1 + t)
    cx, cy = (2 * rng.random(m) - 1) * room_x, (2 * rng.random(m) - 1) * room_y
    u, v = _local_coords(grid, cx, cy, np.ones(m), np.zeros(m), r)
    u = u + _col(slant) * v  # italic shear
    t3 = _col(t)
    d = np.full(u.shape, np.inf, dtype=_F)
    for j, (su, sv, horizontal) in enumerate(_SEGMENTS.values()):
        on = _DIGIT_SEGMENTS[labels, j][:, None, None]
        du, dv = np.abs(u - _F(su)), np.abs(v - _F(sv))
        if horizontal:
            seg_d = np.maximum(du - _F(0.5), dv - t3)
        else:
            seg_d = np.maximum(du - t3, dv - _F(0.5))
        d = np.where(on, np.minimum(d, seg_d), d)
    alpha = _coverage(d * _col(r), grid[2])
    img = _composite(_gradient_background(rng, paper, grid), ink, alpha)
    return _add_noise(rng, img, 0.1, gray=True)


class _Task:
    def __init__(self, render, class_names, description, n_train, n_test):
        self.render, self.class_names, self.description = render, class_names, description
        self.n_train, self.n_test = n_train, n_test


_TASKS: dict[str, _Task] = {
    BASE_TASK: _Task(
        _render_base,
        _SHAPE_NAMES,
        "10 filled shapes at random position/scale/colour on a shaded noisy coloured background",
        6000,
        1000,
    ),
    "stripes": _Task(
        _render_stripes,
        [f"{deg}deg-{w}" for deg in (0, 45, 90, 135) for w in ("wide", "fine")],
        "full-frame two-colour gratings; class = orientation (4) x stripe frequency (2)",
        3000,
        1000,
    ),
    "count": _Task(
        _render_count,
        [str(k) for k in range(1, _MAX_COUNT + 1)],
        "1-6 small non-overlapping blobs of one colour; class = number of blobs",
        3000,
        1000,
    ),
    "glyphs": _Task(
        _render_glyphs,
        [str(k) for k in range(10)],
        "grayscale seven-segment digits 0-9, random offset/scale/slant/stroke width",
        3000,
        1000,
    ),
    "outline": _Task(
        _render_outline,
        _SHAPE_NAMES,
        "the 10 base shapes as thin outlines over a random checkerboard with clutter lines",
        3000,
        1000,
    ),
}


# --------------------------------------------------------------------------- public API


def synthetic_task_names() -> list[str]:
    """All built-in task names, the base (pretraining) task first."""
    return list(_TASKS)


def new_task_names() -> list[str]:
    """The tasks meant for transfer from the base task."""
    return [name for name in _TASKS if name != BASE_TASK]


def _check_int(value, what: str, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise PbexportError(f"synthetic data: {what} must be an integer, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        bound = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        raise PbexportError(f"synthetic data: {what} must be {bound}, got {value}")
    return int(value)


def _generate(task_name: str, split: str, n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    task = _TASKS[task_name]
    rng = np.random.Generator(
        np.random.PCG64(np.random.SeedSequence([zlib.crc32(task_name.encode()), zlib.crc32(split.encode()), seed]))
    )
    k = len(task.class_names)
    labels = rng.permutation(np.arange(n, dtype=np.int64) % k)  # exactly balanced (up to n % k)
    coords = ((np.arange(size) + 0.5) * (2.0 / size) - 1.0).astype(_F)
    grid = (coords[None, None, :], coords[None, :, None], 2.0 / size)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    for start in range(0, n, _CHUNK):
        stop = min(start + _CHUNK, n)
        images[start:stop] = _to_uint8(task.render(labels[start:stop], rng, grid))
    return images, labels


def make_synthetic(
    name: str,
    *,
    n_train: int | None = None,
    n_test: int | None = None,
    size: int = 32,
    seed: int = 0,
) -> dict:
    """Generate task `name`: uint8 NHWC RGB images and int64 labels for train and test.

    Deterministic in (name, split, n, size, seed); train and test use separate streams.
    """
    if not isinstance(name, str) or name not in _TASKS:
        known = ", ".join(_TASKS)
        raise PbexportError(f"unknown synthetic task {name!r}; known tasks: {known}")
    task = _TASKS[name]
    n_train = _check_int(task.n_train if n_train is None else n_train, "n_train", 1)
    n_test = _check_int(task.n_test if n_test is None else n_test, "n_test", 1)
    size = _check_int(size, "size", 16, 512)
    seed = _check_int(seed, "seed", 0, 2**32 - 1)
    train_images, train_labels = _generate(name, "train", n_train, size, seed)
    test_images, test_labels = _generate(name, "test", n_test, size, seed)
    return {
        "train_images": train_images,
        "train_labels": train_labels,
        "test_images": test_images,
        "test_labels": test_labels,
        "class_names": list(task.class_names),
        "description": task.description,
    }
