"""Haystacks with a needle: long clips that hide one short event, written once.

A needle is a synthetic clip (`videollm.data.synth.make_needle`: one large shape on a plain
background, with its shape and colour questions); a haystack is real video around it. Three users
build them here:

- V-NIAH (LongVA's visual needle-in-a-haystack, `eval.niah`): `vniah_haystack`, the four bundled
  real clips in order, each sampled uniformly to a quarter of the frames;
- the release pipeline's needle training clips: `write_needle_clips`, random segments of the real
  clips (and, optionally, of short synthetic clips) with a needle at a random depth;
- grounding's needle haystacks (`training.ground`): `segment_haystack` over the same real clips.

`insert_needle` puts a needle's frames into any haystack at a relative depth.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from encoder.video_io import SAMPLE_CLIPS, read_video, write_video
from videollm.data.synth import DEFAULT_FPS, TASKS, SynthClip, make_clip, make_needle, resize_frames, square_frames


def real_clips(size: int, num_frames: int = 64) -> list[np.ndarray]:
    """The bundled real clips (`encoder.video_io.SAMPLE_CLIPS`), each sampled uniformly to
    `num_frames` frames, centre square resized to `size`: a list of uint8 (num_frames, S, S, 3)."""
    return [square_frames(read_video(name, num_frames).frames, size) for name in SAMPLE_CLIPS]


def vniah_haystack(num_frames: int, size: int) -> np.ndarray:
    """V-NIAH's haystack, uint8 (num_frames, size, size, 3): the bundled real clips in order, each
    sampled uniformly to num_frames / 4 frames (the remainder goes to the first clips)."""
    n = len(SAMPLE_CLIPS)
    counts = [num_frames // n + (i < num_frames % n) for i in range(n)]
    parts = [square_frames(read_video(name, k).frames, size) for name, k in zip(SAMPLE_CLIPS, counts) if k]
    return np.concatenate(parts)  # (num_frames, S, S, 3)


def segment_haystack(rng: np.random.Generator, num_frames: int, real: list[np.ndarray], *,
                     lengths: tuple[int, int] = (8, 16),
                     synthetic: Callable[[np.random.Generator, int, int], np.ndarray] | None = None,
                     source_first: bool = False) -> np.ndarray:
    """uint8 (num_frames, S, S, 3) of random segments, cut to length.

    Per segment `rng` draws its length k in ``[lengths[0], lengths[1]]``; with `synthetic`, whether
    it is real (probability 1/2) or ``synthetic(rng, k, segment_index)`` frames; then which of the
    `real` clips and where in it the segment starts. ``source_first`` draws the clip before the
    length (grounding's order: its haystacks stay the ones it was trained on).
    """
    if source_first and synthetic is not None:
        raise ValueError("source_first draws real segments only; it takes no synthetic segments")
    lo, hi = lengths
    parts, total = [], 0
    while total < num_frames:
        src = real[int(rng.integers(len(real)))] if source_first else None
        k = int(rng.integers(lo, hi + 1))
        if synthetic is not None and rng.random() >= 0.5:
            parts.append(synthetic(rng, k, len(parts)))
        else:
            if src is None:
                src = real[int(rng.integers(len(real)))]
            a = int(rng.integers(0, len(src) - min(k, len(src)) + 1))
            parts.append(src[a:a + k])
        total += len(parts[-1])
    return np.concatenate(parts)[:num_frames]


def insert_needle(haystack: np.ndarray, needle_frames: np.ndarray, depth: float) -> tuple[np.ndarray, tuple[int, int]]:
    """Replace frames of `haystack` (T, H, W, 3) by the needle at relative depth ``depth``.

    The needle (n, h, w, 3) is resized to (H, W) bilinearly; it occupies frames
    ``[start, start + n)`` with ``start = round(depth * (T - n))``, so depth 0 is the first frames
    and depth 1 the last. Returns a new array of the same length and ``(start, start + n)``.
    """
    haystack = np.asarray(haystack)
    needle_frames = np.asarray(needle_frames)
    if haystack.ndim != 4 or needle_frames.ndim != 4 or haystack.shape[-1] != 3 or needle_frames.shape[-1] != 3:
        raise ValueError(f"haystack and needle must be (T, H, W, 3); got {haystack.shape} and {needle_frames.shape}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1]; got {depth}")
    T, H, W, _ = haystack.shape
    n = needle_frames.shape[0]
    if not 1 <= n <= T:
        raise ValueError(f"needle has {n} frames; the haystack holds {T}")
    start = int(round(depth * (T - n)))
    out = haystack.copy()
    out[start:start + n] = resize_frames(needle_frames, H, W).astype(haystack.dtype)
    return out, (start, start + n)


def write_needle_clips(out_dir: str | Path, n: int, seed: int, *, size: int, haystack_frames: int,
                       needle_span: int, real_only: bool,
                       conversations_of: Callable[[SynthClip, np.random.Generator], dict[str, list[dict]]],
                       num_frames: int | None = None, fps: float = DEFAULT_FPS) -> list[dict]:
    """n long clips ``needle/videos/{i:06d}.mp4`` under `out_dir`: a haystack of random real (and,
    unless `real_only`, synthetic) segments with a `needle_span`-frame needle at a random depth.

    Returns their LLaVA-video records ``needle_{seed}_{i}_{kind}``, one per conversation that
    ``conversations_of(needle, rng)`` makes of the needle's questions (the caller's record layout;
    `rng` continues clip i's draws). ``num_frames``: frames the model is to see of each clip (a
    record field; None: the reader's default).
    """
    out = Path(out_dir)
    real = real_clips(size)  # each (64, S, S, 3)
    (out / "needle" / "videos").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(int(n)):

        def synthetic(rng: np.random.Generator, k: int, part: int) -> np.ndarray:
            task = TASKS[int(rng.integers(len(TASKS)))]
            return make_clip(10 ** 7 + seed * 10 ** 5 + i * 8 + part, k, size, task).frames

        rng = np.random.default_rng([seed, 7, i])
        haystack = segment_haystack(rng, haystack_frames, real, synthetic=None if real_only else synthetic)
        needle = make_needle(10 ** 6 + seed * 10 ** 5 + i, num_frames=needle_span, size=size)
        video, _ = insert_needle(haystack, needle.frames, float(rng.uniform(0, 1)))
        rel = f"needle/videos/{i:06d}.mp4"
        write_video(out / rel, video, fps=fps)
        for kind, turns in conversations_of(needle, rng).items():
            record = {"id": f"needle_{seed}_{i}_{kind}", "video": rel, "conversations": turns}
            if num_frames is not None:
                record["num_frames"] = num_frames
            records.append(record)
    return records
