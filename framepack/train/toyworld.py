"""The toy world: seeded procedural videos of simple moving shapes, their captions and ground truth.

Contract:
  * `sample_scene(rng)` draws a scene: a plain or two-colour gradient background and one or two
    shapes (circle, square, triangle) of distinct vivid colours, each moving with constant velocity
    in one of 8 compass directions (or standing still), optionally rotating or growing/shrinking.
  * `simulate(scene, frames)` steps the physics at 30 fps: constant velocity, mirror bounces off the
    walls (the shape's extent never leaves the frame), size clamped to [SIZE_MIN, SIZE_MAX].
  * `render(scene, truth)` draws the frames as (T, H, W, 3) uint8 with 1-pixel anti-aliasing
    (coverage = clip(0.5 - signed distance, 0, 1)), so the coverage-weighted centroid of a shape is
    its stated centre to a small fraction of a pixel.
  * `describe(scene, truth, rng)` writes a caption from a small grammar ("a red circle moves right and
    bounces off the wall"); every word it can produce is in `VOCAB`.
  * `make_clip(seed, sections)` does all of the above for a clip of 36 * sections + 1 frames (latent
    window 9), deterministically from the seed.
  * `first_frame("a red circle on the left")` draws a single start frame from a caption-like text,
    for the demo.

Coordinates are in pixels, x to the right and y down, with pixel (row i, column j) centred at
(j + 0.5, i + 0.5). Sizes: circle radius = size, square half-side = 0.9 size, triangle circumradius =
1.3 size (about equal areas). Everything is plain numpy: a 217-frame clip renders in milliseconds.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace

import numpy as np

DEFAULT_SIZE = 64

# Vivid object colours, far (> 100 in RGB distance) from every background colour, so that colour
# segmentation against the known object colour is a reliable tracker.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (225, 40, 40),
    "green": (40, 200, 70),
    "blue": (50, 100, 240),
    "yellow": (240, 215, 40),
    "white": (245, 245, 245),
    "orange": (250, 140, 30),
    "purple": (160, 60, 215),
    "cyan": (40, 215, 225),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (15, 15, 15),
    "gray": (100, 100, 100),
    "navy": (20, 30, 75),
    "brown": (85, 55, 35),
    "olive": (70, 70, 25),
}
SHAPES = ("circle", "square", "triangle")
_SHAPE_SCALE = {"circle": 1.0, "square": 0.9, "triangle": 1.3}  # size -> radius / half-side / circumradius

# The 8 directions, as (dx, dy) unit vectors with y down, and how captions name them.
DIRECTIONS: dict[str, tuple[float, float]] = {
    "right": (1.0, 0.0),
    "left": (-1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
    "upper right": (math.sqrt(0.5), -math.sqrt(0.5)),
    "upper left": (-math.sqrt(0.5), -math.sqrt(0.5)),
    "lower right": (math.sqrt(0.5), math.sqrt(0.5)),
    "lower left": (-math.sqrt(0.5), math.sqrt(0.5)),
}
SPEEDS = {"slowly": 0.4, "": 0.75, "quickly": 1.1}  # pixels per frame at 64 px (scaled with the frame size)
SIZE_RANGE = (5.0, 9.0)  # initial size at 64 px
SIZE_MIN, SIZE_MAX = 3.5, 12.0
GROWTH = 0.04  # pixels per frame
SPIN_RANGE = (2.0, 5.0)  # degrees per frame

VOCAB = sorted(
    set(
        " ".join(
            [*COLORS, *BACKGROUNDS, *SHAPES, *DIRECTIONS, *SPEEDS]
            + "a the and moves to stays still in place rotates bounces off wall walls while rotating grows shrinks "
            "on background gradient from of frame center centre middle top bottom left right upper lower".split()
        ).split()
    )
)


@dataclass(frozen=True)
class ObjectSpec:
    shape: str
    color: str
    x: float  # centre, pixels
    y: float
    vx: float  # pixels per frame
    vy: float
    size: float
    angle: float = 0.0  # degrees
    spin: float = 0.0  # degrees per frame
    growth: float = 0.0  # size change per frame
    direction: str | None = None  # caption name of the initial direction; None = still
    speed_word: str = ""

    @property
    def rgb(self) -> tuple[int, int, int]:
        return COLORS[self.color]


@dataclass(frozen=True)
class SceneSpec:
    size: int  # frame height = width, pixels
    background: tuple[str, ...]  # one colour name, or two for a gradient
    gradient: str | None = None  # "horizontal" | "vertical" | "diagonal"
    objects: tuple[ObjectSpec, ...] = ()


@dataclass
class GroundTruth:
    """Per-frame state of every object (arrays indexed [frame, object])."""

    centers: np.ndarray  # (T, K, 2) float: x, y in pixels
    sizes: np.ndarray  # (T, K)
    angles: np.ndarray  # (T, K) degrees
    bounced: np.ndarray  # (T, K) bool: a wall bounce happened on the step into this frame
    colors: np.ndarray  # (K, 3) uint8 object colours
    background: np.ndarray  # (2, 3) uint8: gradient end colours (equal for a plain background)

    @property
    def frames(self) -> int:
        return self.centers.shape[0]

    def bounce_count(self, k: int) -> int:
        return int(self.bounced[:, k].sum())


@dataclass
class Clip:
    frames: np.ndarray  # (T, H, W, 3) uint8
    caption: str
    scene: SceneSpec
    truth: GroundTruth
    seed: int | tuple = field(default=0)


# ------------------------------------------------------------------------------------------ sampling
def sample_scene(
    rng: np.random.Generator, size: int = DEFAULT_SIZE, *, max_objects: int = 2, still_probability: float = 0.1
) -> SceneSpec:
    """A random scene; one object with probability 0.7 (when max_objects >= 2), else two."""
    scale = size / DEFAULT_SIZE
    n = 1 if max_objects < 2 or rng.random() < 0.7 else 2
    if rng.random() < 0.6:
        background, gradient = (str(rng.choice(list(BACKGROUNDS))),), None
    else:
        a, b = rng.choice(list(BACKGROUNDS), size=2, replace=False)
        background, gradient = (str(a), str(b)), str(rng.choice(["horizontal", "vertical", "diagonal"]))
    colors = rng.choice(list(COLORS), size=n, replace=False)
    objects = []
    for color in colors:
        shape = str(rng.choice(SHAPES))
        s = float(rng.uniform(*SIZE_RANGE)) * scale
        spin = 0.0
        if shape != "circle" and rng.random() < 0.25:
            spin = float(rng.uniform(*SPIN_RANGE)) * float(rng.choice([-1.0, 1.0]))
        growth = float(rng.choice([-1.0, 1.0])) * GROWTH * scale if rng.random() < 0.15 else 0.0
        reach = circumradius(shape, SIZE_MAX * scale if growth > 0 else s) + 1  # fully inside at any angle
        x, y = (float(rng.uniform(reach, size - reach)) for _ in range(2))
        if rng.random() < still_probability:
            direction, speed_word, vx, vy = None, "", 0.0, 0.0
        else:
            direction = str(rng.choice(list(DIRECTIONS)))
            speed_word = str(rng.choice(list(SPEEDS)))
            speed = SPEEDS[speed_word] * scale * float(rng.uniform(0.9, 1.1))
            vx, vy = (speed * c for c in DIRECTIONS[direction])
        angle = float(rng.uniform(0, 360)) if shape != "circle" else 0.0
        objects.append(ObjectSpec(shape, str(color), x, y, vx, vy, s, angle, spin, growth, direction, speed_word))
    return SceneSpec(size, background, gradient, tuple(objects))


# ------------------------------------------------------------------------------------------ physics
def circumradius(shape: str, size: float) -> float:
    """Radius of the smallest circle around the shape centred on its centre."""
    return _SHAPE_SCALE[shape] * size * (math.sqrt(2) if shape == "square" else 1.0)


def _vertices(shape: str, x: float, y: float, size: float, angle: float) -> np.ndarray:
    """Polygon vertices (n, 2) of a square or triangle, counter-clockwise on screen."""
    n = 4 if shape == "square" else 3
    r = circumradius(shape, size)
    base = math.radians(angle) + (math.pi / 4 if shape == "square" else -math.pi / 2)  # triangle points up
    a = base + 2 * math.pi * np.arange(n) / n
    return np.stack([x + r * np.cos(a), y + r * np.sin(a)], axis=1)


def _extent(obj_shape: str, x: float, y: float, size: float, angle: float) -> tuple[float, float, float, float]:
    """Distances from the centre to the shape's left, right, top and bottom edges."""
    if obj_shape == "circle":
        return (size, size, size, size)
    v = _vertices(obj_shape, x, y, size, angle)
    return (x - v[:, 0].min(), v[:, 0].max() - x, y - v[:, 1].min(), v[:, 1].max() - y)


def simulate(scene: SceneSpec, frames: int) -> GroundTruth:
    """Positions, sizes and angles for `frames` frames; bounces mirror the velocity at the walls."""
    k = len(scene.objects)
    centers, sizes = np.zeros((frames, k, 2)), np.zeros((frames, k))
    angles, bounced = np.zeros((frames, k)), np.zeros((frames, k), dtype=bool)
    lo, hi = SIZE_MIN * scene.size / DEFAULT_SIZE, SIZE_MAX * scene.size / DEFAULT_SIZE
    for j, o in enumerate(scene.objects):
        x, y, vx, vy, s, a = o.x, o.y, o.vx, o.vy, o.size, o.angle
        for t in range(frames):
            if t > 0:
                x, y, a = x + vx, y + vy, a + o.spin
                s = float(np.clip(s + o.growth, lo, hi))
                left, right, top, bottom = _extent(o.shape, x, y, s, a)
                hit = False
                if x - left < 0:
                    x, vx, hit = 2 * left - x, abs(vx), True
                elif x + right > scene.size:
                    x, vx, hit = 2 * (scene.size - right) - x, -abs(vx), True
                if y - top < 0:
                    y, vy, hit = 2 * top - y, abs(vy), True
                elif y + bottom > scene.size:
                    y, vy, hit = 2 * (scene.size - bottom) - y, -abs(vy), True
                bounced[t, j] = hit
            centers[t, j], sizes[t, j], angles[t, j] = (x, y), s, a
    colors = np.array([o.rgb for o in scene.objects], dtype=np.uint8).reshape(k, 3)
    bg = [BACKGROUNDS[c] for c in scene.background]
    background = np.array([bg[0], bg[-1]], dtype=np.uint8)
    return GroundTruth(centers, sizes, angles, bounced, colors, background)


# ------------------------------------------------------------------------------------------ drawing
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = np.arange(size, dtype=np.float32) + 0.5
    return c[None, :], c[:, None]  # x (1, W), y (H, 1)


def coverage(shape: str, x: float, y: float, size: float, angle: float, frame_size: int) -> np.ndarray:
    """(H, W) float32 in [0, 1]: how much of each pixel the shape covers (1-pixel linear ramp)."""
    px, py = _pixel_grid(frame_size)
    if shape == "circle":
        sdf = np.sqrt((px - x) ** 2 + (py - y) ** 2) - size
    else:
        # Convex polygon: the signed distance is the max over edges of the distance to each edge's
        # line (exact inside and along edges; near corners it only sharpens the 1-pixel ramp).
        v = _vertices(shape, x, y, size, angle)
        sdf = np.full((frame_size, frame_size), -np.inf, dtype=np.float32)
        for p, q in zip(v, np.roll(v, -1, axis=0)):
            ex, ey = q - p
            n = math.hypot(ex, ey)
            nx, ny = ey / n, -ex / n  # outward normal for counter-clockwise (on screen) vertices
            sdf = np.maximum(sdf, (px - p[0]) * nx + (py - p[1]) * ny)
    return np.clip(0.5 - sdf, 0.0, 1.0).astype(np.float32)


def background_image(scene: SceneSpec) -> np.ndarray:
    """(H, W, 3) float32 background: plain, or a linear gradient between the two colours."""
    s = scene.size
    a = np.array(BACKGROUNDS[scene.background[0]], dtype=np.float32)
    b = np.array(BACKGROUNDS[scene.background[-1]], dtype=np.float32)
    px, py = _pixel_grid(s)
    if scene.gradient is None:
        w = np.zeros((s, s), np.float32)
    elif scene.gradient == "horizontal":
        w = np.broadcast_to(px / s, (s, s))
    elif scene.gradient == "vertical":
        w = np.broadcast_to(py / s, (s, s))
    else:
        w = (px + py) / (2 * s)
    return a + (b - a) * w[..., None]  # (H, W, 3)


def render(scene: SceneSpec, truth: GroundTruth) -> np.ndarray:
    """(T, H, W, 3) uint8 frames; objects drawn in order (the second over the first)."""
    bg = background_image(scene)
    out = np.empty((truth.frames, scene.size, scene.size, 3), np.uint8)
    for t in range(truth.frames):
        img = bg.copy()
        for j, o in enumerate(scene.objects):
            (x, y), s, a = truth.centers[t, j], truth.sizes[t, j], truth.angles[t, j]
            alpha = coverage(o.shape, x, y, s, a, scene.size)[..., None]  # (H, W, 1)
            img = img * (1 - alpha) + np.array(o.rgb, np.float32) * alpha
        out[t] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return out


# ------------------------------------------------------------------------------------------ captions
def _object_clause(o: ObjectSpec, bounces: int, article: str, long_form: bool) -> str:
    words = [article, o.color, o.shape]
    if o.direction is None:
        words += ["rotates in place"] if o.spin else ["stays still"]
    else:
        words.append("moves")
        if o.speed_word:
            words.append(o.speed_word)
        d = o.direction
        words.append(f"to the {d}" if (" " in d or long_form) else d)
        if bounces:
            words.append("and bounces off the " + ("wall" if bounces == 1 else "walls"))
        if o.spin:
            words.append("while rotating")
    if o.growth:
        words.append("and " + ("grows" if o.growth > 0 else "shrinks"))
    return " ".join(words)


def describe(scene: SceneSpec, truth: GroundTruth, rng: np.random.Generator) -> str:
    """A caption from the grammar; `rng` picks the phrasing (articles, long forms, background mention)."""
    clauses = []
    for j, o in enumerate(scene.objects):
        article = "a" if rng.random() < 0.6 else "the"
        clauses.append(_object_clause(o, truth.bounce_count(j), article, long_form=rng.random() < 0.5))
    text = ", and ".join(clauses)
    if rng.random() < 0.4:
        if scene.gradient is None:
            text += f" on a {scene.background[0]} background"
        else:
            text += f" on a gradient background from {scene.background[0]} to {scene.background[1]}"
    return text


# ------------------------------------------------------------------------------------------ clips
def clip_frames(sections: int, window: int = 9) -> int:
    """Pixel frames of a clip of `sections` sections: 4 * (window * sections + 1) - 3."""
    return 4 * (window * sections + 1) - 3


def make_clip(
    seed: int | tuple[int, ...], sections: int = 1, *, window: int = 9, size: int = DEFAULT_SIZE, max_objects: int = 2
) -> Clip:
    """A clip of `sections` sections (36 * sections + 1 frames at window 9), fully determined by `seed`."""
    rng = np.random.default_rng(seed)
    scene = sample_scene(rng, size, max_objects=max_objects)
    truth = simulate(scene, clip_frames(sections, window))
    return Clip(render(scene, truth), describe(scene, truth, rng), scene, truth, seed)


# ------------------------------------------------------------------------------------------ demo frame
_PLACES = {  # word -> (x, y) as fractions of the frame
    "left": (0.25, None),
    "right": (0.75, None),
    "top": (None, 0.25),
    "upper": (None, 0.25),
    "bottom": (None, 0.75),
    "lower": (None, 0.75),
}


def parse_spec(text: str, size: int = DEFAULT_SIZE) -> SceneSpec:
    """A still scene from a caption-like text: 'a red circle on the left', 'a big blue square at the top
    right on a navy background'. Unnamed parts default to a red circle in the centre on gray."""
    words = re.findall(r"[a-z]+", text.lower())
    color = next((w for w in words if w in COLORS), "red")
    shape = next((w for w in words if w in SHAPES), "circle")
    bg_words = words[words.index("background") - 3 : words.index("background")] if "background" in words else []
    background = next((w for w in bg_words if w in BACKGROUNDS), "gray")
    fx, fy = 0.5, 0.5
    for w in words:
        px, py = _PLACES.get(w, (None, None))
        fx, fy = px if px is not None else fx, py if py is not None else fy
    scale = size / DEFAULT_SIZE
    s = 7.0 * scale
    if "big" in words or "large" in words:
        s = 9.0 * scale
    elif "small" in words:
        s = 5.0 * scale
    obj = ObjectSpec(shape, color, fx * size, fy * size, 0.0, 0.0, s)
    return SceneSpec(size, (background,), None, (obj,))


def first_frame(text: str, size: int = DEFAULT_SIZE) -> np.ndarray:
    """(H, W, 3) uint8 start frame drawn from a caption-like text (see `parse_spec`)."""
    scene = parse_spec(text, size)
    return render(scene, simulate(scene, 1))[0]


def with_motion(scene: SceneSpec, direction: str, speed_word: str = "") -> SceneSpec:
    """The same scene with its first object moving in `direction` (for demos and benchmarks)."""
    o = scene.objects[0]
    speed = SPEEDS[speed_word] * scene.size / DEFAULT_SIZE
    vx, vy = (speed * c for c in DIRECTIONS[direction])
    moved = replace(o, vx=vx, vy=vy, direction=direction, speed_word=speed_word)
    return replace(scene, objects=(moved, *scene.objects[1:]))


# ------------------------------------------------------------------------------------------ tracking
def track(frames: np.ndarray, color: tuple[int, int, int] | np.ndarray, threshold: float = 70.0, min_pixels: int = 3):
    """Colour-segmentation tracker: per frame the centroid (x, y) of the pixels within `threshold` (RGB
    distance) of `color`, and the pixel count. Frames with fewer than `min_pixels` such pixels get NaN.

    Returns (centroids (T, 2) float, counts (T,) int). Used by the tests and the quality benchmark.
    """
    diff = frames.astype(np.float32) - np.asarray(color, np.float32)  # (T, H, W, 3)
    mask = (diff**2).sum(-1) < threshold**2  # (T, H, W)
    counts = mask.sum((1, 2))
    px, py = _pixel_grid(frames.shape[1])
    with np.errstate(invalid="ignore", divide="ignore"):
        cx = (mask * px).sum((1, 2)) / counts
        cy = (mask * py).sum((1, 2)) / counts
    cent = np.stack([cx, cy], axis=1)
    cent[counts < min_pixels] = np.nan
    return cent, counts
