"""Synthetic videos with exact ground truth, deterministic from a seed.

Coloured shapes move, grow, shrink, bounce, appear, disappear and change colour on plain or
textured backgrounds. Every clip comes with its ground truth, so one generator feeds:

- encoder pretraining and classification (`SynthClip.label`, `NUM_CLASSES`), through
  `SynthVideoDataset` (rendered on the fly, no files) or `write_synth_dataset` (mp4 + ``index.csv``),
- VideoLLM instruction tuning: a caption and open / multiple-choice QA per clip (``instruct.json``
  in the LLaVA-video layout, prompts from `videollm.data.prompts`; `conversations` and
  `short_conversations` are the two record layouts),
- evaluation: held-out QA sets are just other seeds; `make_needle` is the needle that
  `videollm.data.haystack` hides in long real clips (V-NIAH, LongVA's visual needle-in-a-haystack).

Pipeline: ``rng → sample_spec → SynthSpec → render → frames (T, H, W, 3) uint8`` and
``SynthSpec → label / caption / QA``. The spec is the whole truth: `render` reads nothing else, so
``make_clip(seed)`` is bit-identical on every call, and editing one spec field (say the motion
direction) changes exactly what it says.

Classification tasks (``NUM_CLASSES[task]`` classes, names in ``CLASS_NAMES[task]``):

- ``"motion"`` (8): the direction the main object moves in. Its shape, colour, size, speed and
  start position are drawn before, and independently of, the direction, from a start box that
  keeps every direction inside the frame, so frame 0 carries no information about the label
  (``make_clip(seed, label=k).frames[0]`` is the same for all k). A bag of frames carries almost
  none either: the set of positions a leftward path visits is that of some rightward path.
- ``"order"`` (2): a left and a right object each have one brief event of the same length — it
  flashes another colour, or it appears only briefly — and the label says whose event comes first
  (``"left first"`` / ``"right first"``). Events start after frame 0 and last equally long, so
  neither frame 0 nor the set of frames (a frame-averaging model) determines the label; only their
  order does.
- ``"count"`` (4): a scene of 1–4 objects with random motions and events; label = count − 1. It
  is not temporal (one frame mostly answers it); its value is the varied captions and QA.

Coordinates are in pixels, x to the right and y down; an object's ``(x, y)`` is its centre at frame
0. ``objects[0]`` is in front (drawn last); in the motion task it is the moving main object.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from encoder.errors import UserError
from encoder.files import atomic_write_text
from encoder.video_io import write_video
from videollm.data.prompts import CAPTION_PROMPT, LETTERS, format_mc

# Saturated and far apart in hue or brightness, so H.264 (4:2:0 chroma) keeps them apart.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 200, 50),
    "blue": (30, 70, 240),
    "yellow": (245, 225, 30),
    "purple": (160, 50, 220),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
    "cyan": (30, 220, 230),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star")
DIRECTIONS = ("left", "right", "up", "down", "up-left", "up-right", "down-left", "down-right")
MOTIONS = DIRECTIONS + ("static", "bounce", "grow", "shrink")
# Object radius as a fraction of the frame side.
SIZES: dict[str, float] = {"small": 0.08, "large": 0.14}
# name → (pattern, base RGB). Dark and low-contrast so every colour in COLORS stands out.
BACKGROUNDS: dict[str, tuple[str, tuple[int, int, int]]] = {
    "gray": ("plain", (110, 110, 110)),
    "black": ("plain", (20, 20, 20)),
    "noisy gray": ("noise", (100, 100, 100)),
    "checkered": ("checker", (75, 75, 75)),
    "striped": ("stripes", (80, 80, 80)),
}
PLAIN_BACKGROUNDS = tuple(name for name, (pattern, _) in BACKGROUNDS.items() if pattern == "plain")

TASKS = ("motion", "order", "count")
CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "motion": DIRECTIONS,
    "order": ("left first", "right first"),
    "count": ("1", "2", "3", "4"),
}
NUM_CLASSES: dict[str, int] = {task: len(names) for task, names in CLASS_NAMES.items()}

DEFAULT_FPS = 8.0

# Unit vectors (x right, y down); diagonals are normalised so every direction covers the same
# distance per frame.
_R2 = 1 / math.sqrt(2)
_DIRECTION_VECTORS = {
    "left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0),
    "up-left": (-_R2, -_R2), "up-right": (_R2, -_R2), "down-left": (-_R2, _R2), "down-right": (_R2, _R2),
}
# End-of-clip radius scale for grow / shrink; number of hops of a bounce.
_GROW, _SHRINK, _BOUNCES = 1.7, 0.5, 2
# Total distance travelled over a clip, as a fraction of the frame side.
_TRAVEL = (0.18, 0.3)


# --------------------------------------------------------------------------- Spec: what to render


@dataclass
class SynthObject:
    """One shape. Frames are 0-based; ``disappear`` is the first frame it is gone (None: never).

    ``speed`` is in pixels per frame along the motion (directions and bounce: the bounce height is
    ``speed * (T - 1)``); grow/shrink scale the radius linearly to `_GROW` / `_SHRINK` by the last
    frame. ``color_changes`` are ``(frame, new colour)`` pairs in frame order.
    """

    shape: str
    color: str
    size: str
    x: float
    y: float
    motion: str = "static"
    speed: float = 0.0
    appear: int = 0
    disappear: int | None = None
    color_changes: list[tuple[int, str]] = field(default_factory=list)

    def name(self) -> str:
        """How captions and questions refer to it: its colour at frame 0 and its shape."""
        return f"the {self.color} {self.shape}"

    def color_at(self, t: int) -> str:
        return next((new for frame, new in reversed(self.color_changes) if frame <= t), self.color)

    def visible(self, t: int) -> bool:
        return self.appear <= t and (self.disappear is None or t < self.disappear)


@dataclass
class SynthSpec:
    """Everything `render` needs. ``bg_seed`` fixes the texture of textured backgrounds."""

    num_frames: int
    size: int
    background: str
    objects: list[SynthObject]
    task: str = "count"
    bg_seed: int = 0


@dataclass
class SynthClip:
    """A rendered clip and its ground truth.

    ``qa`` items: ``{"type": "open"|"mc", "category": "color"|"shape"|"motion"|"count"|"order"|
    "event"|"needle", "question", "answer"}``, and for ``"mc"`` also ``"options"`` (4 distinct
    strings, one of them the answer) and ``"answer_letter"`` ("A"–"D").
    """

    frames: np.ndarray  # (T, H, W, 3) uint8
    fps: float
    spec: SynthSpec
    label: int
    label_name: str
    caption: str
    qa: list[dict]
    seed: int | None = None


def trajectory(obj: SynthObject, num_frames: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centre x, centre y and radius of `obj` at every frame: three float arrays of shape (T,)."""
    t = np.arange(num_frames, dtype=np.float64)
    span = max(num_frames - 1, 1)
    radius = np.full(num_frames, SIZES[obj.size] * size)
    x = np.full(num_frames, float(obj.x))
    y = np.full(num_frames, float(obj.y))
    if obj.motion in _DIRECTION_VECTORS:
        ux, uy = _DIRECTION_VECTORS[obj.motion]
        x += ux * obj.speed * t
        y += uy * obj.speed * t
    elif obj.motion == "bounce":  # a ball hopping up from its rest position (x, y)
        y -= obj.speed * span * np.abs(np.sin(np.pi * _BOUNCES * t / span))
    elif obj.motion in ("grow", "shrink"):
        end = _GROW if obj.motion == "grow" else _SHRINK
        radius *= 1 + (end - 1) * t / span
    elif obj.motion != "static":
        raise ValueError(f"unknown motion '{obj.motion}'; choose one of {MOTIONS}")
    return x, y, radius


def _extent(motion: str, travel: float, radius: float) -> tuple[float, float, float, float, float]:
    """(min dx, max dx, min dy, max dy, max radius) of a path relative to its start."""
    if motion in _DIRECTION_VECTORS:
        ux, uy = _DIRECTION_VECTORS[motion]
        dx, dy = ux * travel, uy * travel
        return min(0, dx), max(0, dx), min(0, dy), max(0, dy), radius
    if motion == "bounce":
        return 0.0, 0.0, -travel, 0.0, radius
    return 0.0, 0.0, 0.0, 0.0, radius * (_GROW if motion == "grow" else 1)


# --------------------------------------------------------------------------- Rendering (numpy only)


def _sdf(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Approximate signed distance in pixels (< 0 inside) of `shape` with radius r at the origin.

    The constants give the shapes similar areas, so size does not betray the shape.
    """
    if shape == "circle":
        return np.sqrt(dx * dx + dy * dy) - r
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) - 0.88 * r
    if shape == "diamond":
        return (np.abs(dx) + np.abs(dy) - 1.25 * r) * _R2
    if shape == "triangle":  # pointing up, circumradius R = 1.3 r, bounding box centred
        R = 1.3 * r
        dyc = dy - 0.25 * R  # centroid sits R/4 below the box centre
        return np.maximum(dyc - 0.5 * R, np.abs(dx) * (math.sqrt(3) / 2) - 0.5 * dyc - 0.5 * R)
    if shape == "cross":
        adx, ady = np.abs(dx), np.abs(dy)
        arm, half = 1.05 * r, 0.38 * r
        return np.minimum(np.maximum(adx - arm, ady - half), np.maximum(adx - half, ady - arm))
    if shape == "star":  # five points, one straight up
        rho = np.sqrt(dx * dx + dy * dy)
        phi = np.arctan2(dx, -dy)  # 0 straight up
        tip = np.abs((phi * (5 / (2 * np.pi)) + 0.5) % 1.0 - 0.5) * 2  # 0 at a point, 1 between
        return (rho - r * (1.3 - 0.75 * tip)) * 0.8
    raise ValueError(f"unknown shape '{shape}'; choose one of {SHAPES}")


def _background(name: str, size: int, bg_seed: int) -> np.ndarray:
    """(size, size, 3) float32 background; textures are static over time."""
    if name not in BACKGROUNDS:
        raise ValueError(f"unknown background '{name}'; choose one of {tuple(BACKGROUNDS)}")
    pattern, base = BACKGROUNDS[name]
    bg = np.full((size, size, 3), base, np.float32)
    if pattern == "noise":
        noise = np.random.default_rng(bg_seed).normal(0.0, 14.0, (size, size, 1))
        bg += noise.astype(np.float32)
    elif pattern in ("checker", "stripes"):
        cell = max(2, size // 8)
        i = np.arange(size) // cell
        mask = (i[:, None] + i[None, :]) % 2 if pattern == "checker" else np.broadcast_to(i % 2, (size, size))
        bg += (mask[..., None] * 35.0).astype(np.float32)
    return bg


def _alphas(spec: SynthSpec, frames):
    """Each object's coverage, back to front (objects[0] last): yields ``(i, j, (y0, y1, x0, x1),
    alpha)`` with alpha (h, w) in [0, 1] over the object's bounding box in frame ``frames[j]``,
    anti-aliased (1 px ramp). Each object touches only its bounding box in each frame."""
    T, S = spec.num_frames, spec.size
    coords = np.arange(S, dtype=np.float32)
    for i in range(len(spec.objects) - 1, -1, -1):
        obj = spec.objects[i]
        xs, ys, rs = trajectory(obj, T, S)
        for j, t in enumerate(frames):
            if not obj.visible(t):
                continue
            cx, cy, r = xs[t], ys[t], rs[t]
            reach = 1.35 * r + 1.5  # every shape fits in this box around its centre
            x0, x1 = max(0, int(cx - reach)), min(S, int(cx + reach) + 2)
            y0, y1 = max(0, int(cy - reach)), min(S, int(cy + reach) + 2)
            if x0 >= x1 or y0 >= y1:
                continue
            dx = coords[None, x0:x1] - np.float32(cx)  # (1, w)
            dy = coords[y0:y1, None] - np.float32(cy)  # (h, 1)
            yield i, j, (y0, y1, x0, x1), np.clip(0.5 - _sdf(obj.shape, dx, dy, np.float32(r)), 0.0, 1.0)


def _frame_list(spec: SynthSpec, frames) -> list[int]:
    if frames is None:
        return list(range(spec.num_frames))
    frames = [int(t) for t in frames]
    if any(not 0 <= t < spec.num_frames for t in frames):
        raise ValueError(f"frames must be in [0, {spec.num_frames}); got {frames}")
    return frames


def render(spec: SynthSpec, frames=None) -> np.ndarray:
    """Draw `spec`: uint8 (T, H, W, 3) with H = W = spec.size, or only the frames listed in
    ``frames`` (len(frames), H, W, 3). Edges are anti-aliased (1 px ramp)."""
    frames = _frame_list(spec, frames)
    S = spec.size
    out = np.empty((len(frames), S, S, 3), np.float32)
    out[:] = _background(spec.background, S, spec.bg_seed)  # (T, S, S, 3)
    for i, j, (y0, y1, x0, x1), alpha in _alphas(spec, frames):  # objects[0] ends up in front
        region = out[j, y0:y1, x0:x1]  # (h, w, 3) view
        color = np.asarray(COLORS[spec.objects[i].color_at(frames[j])], np.float32)
        region += alpha[..., None] * (color - region)
    np.clip(out, 0, 255, out=out)
    return np.rint(out).astype(np.uint8)


def visible_coverage(spec: SynthSpec, frames=None) -> np.ndarray:
    """How much of each pixel shows each object: float32 (N, T, H, W) in [0, 1] (T: the frames
    listed in ``frames``, default all), objects in ``spec.objects`` order, after occlusion (what
    `render` draws in front hides what is behind). Per pixel the objects' coverages sum to at most
    1; the rest is background."""
    frames = _frame_list(spec, frames)
    S = spec.size
    cover = np.zeros((len(spec.objects), len(frames), S, S), np.float32)
    for i, j, (y0, y1, x0, x1), alpha in _alphas(spec, frames):  # back to front: a later one covers
        cover[:, j, y0:y1, x0:x1] *= 1.0 - alpha
        cover[i, j, y0:y1, x0:x1] += alpha
    return cover


def resize_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of uint8 (T, h, w, 3) frames to (T, height, width, 3) (pixel-centre aligned)."""
    frames = np.asarray(frames)
    T, h, w, _ = frames.shape
    if (h, w) == (height, width):
        return frames.copy()

    def axis(n_out: int, n_in: int):
        pos = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0, n_in - 1)
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, (pos - lo).astype(np.float32)

    y_lo, y_hi, wy = axis(height, h)
    x_lo, x_hi, wx = axis(width, w)
    f = frames.astype(np.float32)
    rows = f[:, y_lo] * (1 - wy)[None, :, None, None] + f[:, y_hi] * wy[None, :, None, None]  # (T, height, w, 3)
    out = rows[:, :, x_lo] * (1 - wx)[None, None, :, None] + rows[:, :, x_hi] * wx[None, None, :, None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)  # (T, height, width, 3)


def square_frames(frames: np.ndarray, size: int) -> np.ndarray:
    """The centre square of uint8 (T, h, w, 3) frames, resized to (T, size, size, 3): how real clips
    become haystack frames (V-NIAH, the pipeline's needle clips, grounding)."""
    frames = np.asarray(frames)
    h, w = frames.shape[1:3]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return resize_frames(frames[:, top:top + side, left:left + side], size, size)


# --------------------------------------------------------------------------- Sampling specs


def check_clip_args(num_frames: int, size: int, task: str) -> None:
    """Raise `UserError` unless `task` is known and `num_frames` / `size` suit it."""
    if task not in TASKS:
        raise UserError(f"unknown synthetic task '{task}'; choose one of: {', '.join(TASKS)}")
    minimum = 8 if task == "order" else 2
    if int(num_frames) < minimum:
        raise UserError(f"task '{task}' needs at least {minimum} frames; got {num_frames}")
    if int(size) < 16:
        raise UserError(f"frame size must be at least 16 px; got {size}")


def _uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi)) if hi > lo else float((lo + hi) / 2)


def sample_spec(
    rng: np.random.Generator,
    num_frames: int = 16,
    size: int = 64,
    task: str = "motion",
    *,
    label: int | None = None,
    distractors: int | None = None,
    background: str | None = None,
) -> SynthSpec:
    """Draw a random spec for `task` (see the module docstring).

    ``label`` forces the class. The class is always drawn last and from the same stream, so
    ``label=k`` changes only what the label controls: the same rng state gives the same scene with
    a different direction (motion) or event order (order). ``distractors`` is the number of static
    extra objects in the motion task (default: 0–2 at random). ``background`` is a `BACKGROUNDS`
    name (default: random).
    """
    check_clip_args(num_frames, size, task)
    if label is not None and not 0 <= int(label) < NUM_CLASSES[task]:
        raise UserError(f"label for task '{task}' must be in [0, {NUM_CLASSES[task]}); got {label}")
    if distractors is not None and task != "motion":
        raise UserError(f"distractors are for task 'motion' only; task is '{task}'")
    if background is not None and background not in BACKGROUNDS:
        raise UserError(f"unknown background '{background}'; choose one of: {', '.join(BACKGROUNDS)}")
    T, S = int(num_frames), int(size)
    bg = background or str(rng.choice(list(BACKGROUNDS)))
    bg_seed = int(rng.integers(2**31))
    spec = SynthSpec(num_frames=T, size=S, background=bg, objects=[], task=task, bg_seed=bg_seed)
    if task == "motion":
        _sample_motion(rng, spec, distractors, label)
    elif task == "order":
        _sample_order(rng, spec, label)
    else:
        _sample_count(rng, spec, label)
    return spec


def _looks(rng: np.random.Generator, n: int) -> list[tuple[str, str]]:
    """n (shape, colour) pairs, every shape and every colour distinct: "the red X" and "the
    circle" each name one object."""
    shapes = rng.choice(SHAPES, size=n, replace=False)
    colors = rng.choice(list(COLORS), size=n, replace=False)
    return [(str(s), str(c)) for s, c in zip(shapes, colors)]


def _sample_motion(rng, spec: SynthSpec, distractors: int | None, label: int | None) -> None:
    T, S = spec.num_frames, spec.size
    n_extra = int(rng.integers(0, 3)) if distractors is None else int(distractors)
    if not 0 <= n_extra <= 3:
        raise UserError(f"distractors must be in 0..3; got {distractors}")
    looks = _looks(rng, 1 + n_extra)
    shape, color = looks[0]
    size_name = str(rng.choice(list(SIZES)))
    r = SIZES[size_name] * S
    travel = _uniform(rng, *_TRAVEL) * S
    # One start box for every direction: the label must not shift where the object starts.
    lo, hi = r + 1 + travel, S - 1 - r - travel
    x, y = _uniform(rng, lo, hi), _uniform(rng, lo, hi)
    main = SynthObject(shape, color, size_name, x, y, "static", travel / max(T - 1, 1))
    for shape_i, color_i in looks[1:]:
        size_i = str(rng.choice(list(SIZES)))
        ri = SIZES[size_i] * S
        xi, yi = _uniform(rng, ri + 1, S - 1 - ri), _uniform(rng, ri + 1, S - 1 - ri)
        spec.objects.append(SynthObject(shape_i, color_i, size_i, xi, yi))
    drawn = int(rng.integers(len(DIRECTIONS)))
    main.motion = DIRECTIONS[drawn if label is None else int(label)]
    spec.objects.insert(0, main)


def _sample_order(rng, spec: SynthSpec, label: int | None) -> None:
    T, S = spec.num_frames, spec.size
    duration = max(2, T // 8)  # same for both objects: time spent changed carries no label
    looks = _looks(rng, 2)
    objects = []
    for side, (shape, color) in zip(("left", "right"), looks):
        size_name = str(rng.choice(list(SIZES)))
        r = SIZES[size_name] * S
        # each object keeps to its own half, so they never overlap
        x = _uniform(rng, r + 1, S / 2 - r - 1) if side == "left" else _uniform(rng, S / 2 + r + 1, S - 1 - r)
        y = _uniform(rng, r + 1, S - 1 - r)
        objects.append(SynthObject(shape, color, size_name, x, y))
    new_colors = [c for c in COLORS if c not in {color for _, color in looks}]
    kinds = [str(rng.choice(("flash", "pop"))) for _ in objects]
    flashes = [str(rng.choice(new_colors)) for _ in objects]
    # Two non-overlapping events after frame 0: [first, first + d) then [second, second + d).
    first = int(rng.integers(1, T - 2 * duration + 1))
    second = int(rng.integers(first + duration, T - duration + 1))
    drawn = int(rng.integers(2))
    which = drawn if label is None else int(label)  # 0: left first, 1: right first
    starts = (first, second) if which == 0 else (second, first)
    for obj, kind, flash, start in zip(objects, kinds, flashes, starts):
        if kind == "flash":
            obj.color_changes = [(start, flash), (start + duration, obj.color)]
        else:
            obj.appear, obj.disappear = start, start + duration
    spec.objects.extend(objects)


def _sample_count(rng, spec: SynthSpec, label: int | None) -> None:
    T, S = spec.num_frames, spec.size
    drawn = int(rng.integers(NUM_CLASSES["count"]))
    n = 1 + (drawn if label is None else int(label))
    placed: list[tuple[float, float, float]] = []
    for shape, color in _looks(rng, n):
        size_name = str(rng.choice(list(SIZES)))
        r = SIZES[size_name] * S
        motion = str(rng.choice(MOTIONS))
        travel = _uniform(rng, *_TRAVEL) * S if motion in DIRECTIONS or motion == "bounce" else 0.0
        lo_x, hi_x, lo_y, hi_y, r_max = _extent(motion, travel, r)
        for _ in range(20):  # keep start positions apart so no object starts hidden
            x = _uniform(rng, r_max + 1 - lo_x, S - 1 - r_max - hi_x)
            y = _uniform(rng, r_max + 1 - lo_y, S - 1 - r_max - hi_y)
            if all(math.hypot(x - px, y - py) > r + pr for px, py, pr in placed):
                break
        placed.append((x, y, r))
        obj = SynthObject(shape, color, size_name, x, y, motion, travel / max(T - 1, 1))
        if rng.random() < 0.3:
            obj.appear = int(rng.integers(1, max(2, T // 2)))
        if rng.random() < 0.2 and obj.appear + T // 4 < T - 1:
            obj.disappear = int(rng.integers(obj.appear + T // 4 + 1, T))
        if rng.random() < 0.3:
            last = T if obj.disappear is None else obj.disappear
            if last - obj.appear >= 2:
                obj.color_changes = [(int(rng.integers(obj.appear + 1, last)), "")]
        spec.objects.append(obj)
    new_colors = [c for c in COLORS if c not in {o.color for o in spec.objects}]
    for obj in spec.objects:  # new colours never collide with another object's name
        if obj.color_changes:
            obj.color_changes = [(obj.color_changes[0][0], str(rng.choice(new_colors)))]


# --------------------------------------------------------------------------- Ground truth: label, caption, QA


def event_frame(obj: SynthObject) -> int | None:
    """First frame after 0 at which `obj` changes (appears, vanishes or changes colour)."""
    frames = [f for f in (obj.appear, obj.disappear) if f]
    frames += [f for f, _ in obj.color_changes]
    return min(frames) if frames else None


def label_of(spec: SynthSpec) -> tuple[int, str]:
    """Class index and name of `spec` for its task."""
    if spec.task == "motion":
        index = DIRECTIONS.index(spec.objects[0].motion)
    elif spec.task == "order":
        left, right = sorted(spec.objects[:2], key=lambda o: o.x)
        index = 0 if event_frame(left) < event_frame(right) else 1
    elif spec.task == "count":
        index = len(spec.objects) - 1
    elif spec.task == "needle":
        index = SHAPES.index(spec.objects[0].shape)
        return index, SHAPES[index]
    else:
        raise ValueError(f"unknown task '{spec.task}'")
    return index, CLASS_NAMES[spec.task][index]


def _seconds(frame: int, fps: float) -> str:
    return f"{frame / fps:.1f} s"


_MOTION_PHRASES = {
    **{d: f"moves {d}" for d in DIRECTIONS},
    "static": "stays still", "bounce": "bounces", "grow": "grows", "shrink": "shrinks",
}
# Every answer an open colour / shape / motion question can have (for scoring free replies).
OPEN_ANSWERS: dict[str, tuple[str, ...]] = {
    "color": tuple(COLORS), "shape": SHAPES, "motion": tuple(_MOTION_PHRASES.values()),
}


def _clause(obj: SynthObject, fps: float) -> str:
    """'a small red circle appears at 1.0 s, moves left and turns blue at 2.0 s'."""
    parts = []
    if obj.appear:
        parts.append(f"appears at {_seconds(obj.appear, fps)}")
    parts.append(_MOTION_PHRASES[obj.motion])
    for frame, new in obj.color_changes:
        back = "back to " if new == obj.color else ""
        parts.append(f"turns {back}{new} at {_seconds(frame, fps)}")
    if obj.disappear is not None:
        parts.append(f"disappears at {_seconds(obj.disappear, fps)}")
    verbs = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"a {obj.size} {obj.color} {obj.shape} {verbs}"


def caption_of(spec: SynthSpec, fps: float = DEFAULT_FPS) -> str:
    """One sentence: every object with its motion and timed events, and the background."""
    clauses = [_clause(o, fps) for o in spec.objects]
    if "," in clauses[0] or " and " in clauses[0]:  # a long first clause: background up front
        text = f"On a {spec.background} background, {clauses[0]}"
    else:
        text = f"{clauses[0][0].upper()}{clauses[0][1:]} on a {spec.background} background"
    return text + "".join(f"; {c}" for c in clauses[1:]) + "."


def _open(category: str, question: str, answer: str) -> dict:
    return {"type": "open", "category": category, "question": question, "answer": answer}


def _both(rng, category: str, question: str, answer: str, pool) -> list[dict]:
    """The open question and its multiple-choice form, whose 4 shuffled options are the answer and
    3 distinct distractors from `pool`."""
    others = sorted({str(p) for p in pool} - {answer})
    if len(others) < 3:
        raise ValueError(f"need 3 distractors for '{answer}', pool has {others}")
    options = [answer] + [others[i] for i in rng.choice(len(others), size=3, replace=False)]
    options = [options[i] for i in rng.permutation(4)]
    open_q = _open(category, question, answer)
    return [open_q, {**open_q, "type": "mc", "options": options, "answer_letter": LETTERS[options.index(answer)]}]


def qa_of(spec: SynthSpec, rng: np.random.Generator, fps: float = DEFAULT_FPS) -> list[dict]:
    """Open and multiple-choice questions with answers, from the spec alone."""
    qa: list[dict] = []
    count = _both(rng, "count", "How many objects appear in the video?", str(len(spec.objects)), range(1, 7))
    if spec.task == "motion":
        main = spec.objects[0]
        qa += _both(rng, "color", "What colour is the moving object?", main.color, COLORS)
        qa += _both(rng, "shape", "What shape is the moving object?", main.shape, SHAPES)
        qa += _both(rng, "motion", "Which direction does the moving object move?", main.motion, DIRECTIONS)
        return qa + count
    if spec.task == "needle":
        obj = spec.objects[0]
        return (_both(rng, "needle", "What shape appeared briefly in the video?", obj.shape, SHAPES)
                + _both(rng, "needle", "What colour was the shape that appeared briefly in the video?",
                        obj.color, COLORS))
    for obj in spec.objects:
        when = " at the start" if obj.color_changes else " when it first appears" if obj.appear else ""
        qa += _both(rng, "color", f"What colour is the {obj.shape}{when}?", obj.color, COLORS)
        qa += _both(rng, "shape", f"What shape is the {obj.color} object?", obj.shape, SHAPES)
        qa += _both(rng, "motion", f"How does {obj.name()} move?", _MOTION_PHRASES[obj.motion],
                    _MOTION_PHRASES.values())
        for frame, new in obj.color_changes[:1]:
            if new != obj.color:
                qa += _both(rng, "event", f"What colour does {obj.name()} turn into?", new,
                            [c for c in COLORS if c != obj.color])
        if obj.appear:
            qa.append(_open("event", f"When does {obj.name()} appear?", f"at {_seconds(obj.appear, fps)}"))
        if obj.disappear is not None:
            qa.append(_open("event", f"When does {obj.name()} disappear?", f"at {_seconds(obj.disappear, fps)}"))
    qa += count
    if spec.task == "order":
        left, right = pair = sorted(spec.objects[:2], key=lambda o: o.x)
        first = left if event_frame(left) < event_frame(right) else right
        ask = "Which object changes first (it flashes another colour or appears briefly), {} or {}?"
    else:
        by_appear = sorted(spec.objects, key=lambda o: o.appear)
        pairs = [(p, q) for i, p in enumerate(by_appear) for q in by_appear[i + 1:] if p.appear < q.appear]
        if not pairs:
            return qa
        pair = pairs[int(rng.integers(len(pairs)))]
        first, ask = pair[0], "Which appears first, {} or {}?"
    a, b = pair if rng.random() < 0.5 else pair[::-1]
    present = {o.name() for o in spec.objects}
    absent = sorted(f"the {c} {s}" for c in COLORS for s in SHAPES if f"the {c} {s}" not in present)
    options = [a.name(), b.name()] + [absent[i] for i in rng.choice(len(absent), size=2, replace=False)]
    return qa + _both(rng, "order", ask.format(a.name(), b.name()), first.name(), options)


# --------------------------------------------------------------------------- Clips, needles, datasets


def make_clip(
    seed: int,
    num_frames: int = 16,
    size: int = 64,
    task: str = "motion",
    *,
    fps: float = DEFAULT_FPS,
    label: int | None = None,
    **spec_kw,
) -> SynthClip:
    """The clip of `seed`: same seed, same frames (bit for bit) and ground truth.

    ``label`` forces the class (see `sample_spec`); ``spec_kw`` go to `sample_spec`
    (``distractors``, ``background``). ``fps`` only sets the times in captions and questions.
    """
    rng = np.random.default_rng(int(seed))
    spec = sample_spec(rng, num_frames, size, task, label=label, **spec_kw)
    return clip_from_spec(spec, rng, fps=fps, seed=int(seed))


def clip_from_spec(spec: SynthSpec, rng: np.random.Generator, fps: float = DEFAULT_FPS,
                   seed: int | None = None) -> SynthClip:
    """Render `spec` and derive its ground truth; `rng` shuffles the multiple-choice options."""
    index, name = label_of(spec)
    return SynthClip(frames=render(spec), fps=float(fps), spec=spec, label=index, label_name=name,
                     caption=caption_of(spec, fps), qa=qa_of(spec, rng, fps), seed=seed)


def make_needle(seed: int, num_frames: int = 4, size: int = 64, *, fps: float = DEFAULT_FPS) -> SynthClip:
    """A V-NIAH needle: one large shape, centred and still, on a plain background.

    Its QA (category ``"needle"``) asks for the shape and the colour; ``label`` is the shape's
    index in `SHAPES`. `videollm.data.haystack.insert_needle` puts its frames into a haystack.
    """
    if int(num_frames) < 1:
        raise UserError(f"a needle needs at least 1 frame; got {num_frames}")
    if int(size) < 16:
        raise UserError(f"frame size must be at least 16 px; got {size}")
    rng = np.random.default_rng(int(seed))
    (shape, color), = _looks(rng, 1)
    background = str(rng.choice(PLAIN_BACKGROUNDS))
    centre = (int(size) - 1) / 2
    obj = SynthObject(shape, color, "large", centre, centre)
    spec = SynthSpec(int(num_frames), int(size), background, [obj], task="needle")
    clip = clip_from_spec(spec, rng, fps=fps, seed=int(seed))
    clip.caption = f"A large {color} {shape} on a {background} background."
    return clip


class SynthVideoDataset(torch.utils.data.Dataset):
    """Map-style dataset rendered on the fly: item i is ``make_clip(base_seed + i, …)``.

    Items are ``{"frames": uint8 (T, H, W, 3), "label": int, "seed": int}``; callers apply
    their own transform (e.g. ``encoder.transforms.frames_to_tensor``). Held-out sets are other
    seed ranges (e.g. ``base_seed=10**6``).
    """

    def __init__(self, n: int, base_seed: int = 0, num_frames: int = 16, size: int = 64,
                 task: str = "motion", **clip_kw):
        if int(n) < 1:
            raise UserError(f"dataset size must be at least 1; got {n}")
        check_clip_args(num_frames, size, task)
        self.n, self.base_seed = int(n), int(base_seed)
        self.num_frames, self.size, self.task = int(num_frames), int(size), task
        self.clip_kw = clip_kw

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        if not -self.n <= i < self.n:
            raise IndexError(f"index {i} out of range for {self.n} clips")
        seed = self.base_seed + (i % self.n)
        clip = make_clip(seed, self.num_frames, self.size, self.task, **self.clip_kw)
        return {"frames": clip.frames, "label": clip.label, "seed": seed}


def _llava_turns(turns: list[tuple[str, str]]) -> list[dict]:
    """(question, answer) pairs → LLaVA-video turns, the video before the first question."""
    turns = [("<video>\n" + turns[0][0], turns[0][1])] + turns[1:]
    return [{"from": role, "value": text} for human, gpt in turns for role, text in (("human", human), ("gpt", gpt))]


def conversations(clip: SynthClip) -> dict[str, list[dict]]:
    """The "llava" record layout: a clip's LLaVA-video turns as three separate conversations,
    ``"caption"`` (one caption request), ``"open"`` (every open question) and ``"mc"`` (every
    multiple-choice question via `format_mc`, answered with its letter).

    Separate because in one conversation the history would give the answers away: the caption
    names every colour, shape and motion, and each MC question repeats an open one.
    """
    groups = {
        "caption": [(CAPTION_PROMPT, clip.caption)],
        "open": [(q["question"], q["answer"]) for q in clip.qa if q["type"] == "open"],
        "mc": [(format_mc(q["question"], q["options"]), q["answer_letter"])
               for q in clip.qa if q["type"] == "mc"],
    }
    return {name: _llava_turns(turns) for name, turns in groups.items() if turns}


def short_conversations(caption: str, qa: list[dict], rng: np.random.Generator, *, qa_turns: int = 3,
                        caption_fraction: float = 0.2, mc_reply: str = "letter") -> dict[str, list[dict]]:
    """The "short" record layout: every question of a clip once, open or multiple-choice at random,
    in conversations ``qa0, qa1, …`` of `qa_turns` turns each (never the same question twice in one
    conversation, so nothing gives an answer away), and a ``"caption"`` one for a share
    `caption_fraction` of the clips (none when `caption` is empty). No "When does … appear?"
    timing questions: they are long to learn and not what the model is asked.

    mc_reply: what a multiple-choice turn answers, ``"letter"`` (the lmms-eval convention, "C") or
    ``"option"``, the option's text as listed ("cross"), which `eval.answer.extract_letter` maps to
    its letter (a small LLM does not look up the letter of the answer it knows).
    """
    by_question: dict[str, list[dict]] = {}
    for q in qa:
        if q["type"] == "open" and q["answer"].startswith("at ") and q["question"].startswith("When "):
            continue
        by_question.setdefault(q["question"], []).append(q)
    turns = []
    for forms in by_question.values():
        q = forms[int(rng.integers(len(forms)))]
        if q["type"] == "mc":
            turns.append((format_mc(q["question"], q["options"]),
                          q["answer_letter"] if mc_reply == "letter" else q["answer"]))
        else:
            turns.append((q["question"], q["answer"]))
    turns = [turns[i] for i in rng.permutation(len(turns))]
    groups = {f"qa{k}": turns[i:i + qa_turns] for k, i in enumerate(range(0, len(turns), qa_turns))}
    if caption and rng.random() < caption_fraction:
        groups["caption"] = [(CAPTION_PROMPT, caption)]
    return {name: _llava_turns(group) for name, group in groups.items()}


_DATASET_FILES = {"index": "index.csv", "annotations": "annotations.jsonl", "instruct": "instruct.json"}


def write_synth_dataset(out_dir, n: int, seed: int = 0, num_frames: int = 16, size: int = 64,
                        task: str = "motion", fps: float = DEFAULT_FPS) -> dict:
    """Write n clips (seeds ``seed … seed + n - 1``) to `out_dir` through the real encoder.

    Files: ``videos/{i:06d}.mp4`` (H.264), ``index.csv`` (``path,label`` lines, no header; paths
    relative to `out_dir`; the Kinetics-style list the classification recipes read),
    ``annotations.jsonl`` (per clip: id, video, seed, label, label_name, caption, qa, spec) and
    ``instruct.json`` (LLaVA-video records ``{id}_caption``, ``{id}_open``, ``{id}_mc`` per clip,
    see `conversations`). Returns a summary dict. Existing files of these names are replaced;
    `clear_synth_dataset` removes a previous, larger set first.
    """
    if int(n) < 1:
        raise UserError(f"number of clips must be at least 1; got {n}")
    if not fps > 0:
        raise UserError(f"fps must be positive; got {fps}")
    check_clip_args(num_frames, size, task)
    out = Path(out_dir)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    index_lines, records, instruct = [], [], []
    for i in range(int(n)):
        clip = make_clip(int(seed) + i, num_frames, size, task, fps=fps)
        rel = f"videos/{i:06d}.mp4"
        write_video(out / rel, clip.frames, fps=fps)
        clip_id = f"synth_{task}_{int(seed) + i}"
        index_lines.append(f"{rel},{clip.label}\n")
        records.append({"id": clip_id, "video": rel, "seed": clip.seed, "task": task, "fps": fps,
                        "label": clip.label, "label_name": clip.label_name, "caption": clip.caption,
                        "qa": clip.qa, "spec": asdict(clip.spec)})
        instruct += [{"id": f"{clip_id}_{kind}", "video": rel, "conversations": turns}
                     for kind, turns in conversations(clip).items()]
    texts = ("".join(index_lines), "".join(json.dumps(r) + "\n" for r in records), json.dumps(instruct, indent=1))
    # instruct.json last and every file atomically: recipes take its presence to mean "complete".
    for name, text in zip(_DATASET_FILES.values(), texts):
        atomic_write_text(out / name, text)
    return {"n": int(n), "out": str(out), "task": task, "num_classes": NUM_CLASSES[task],
            "files": {**_DATASET_FILES, "videos": "videos/"}}


def clear_synth_dataset(out_dir) -> None:
    """Remove what `write_synth_dataset` writes in `out_dir` (and nothing else)."""
    out = Path(out_dir)
    shutil.rmtree(out / "videos", ignore_errors=True)
    for name in _DATASET_FILES.values():
        (out / name).unlink(missing_ok=True)
