"""Video clips for the encoder recipes (pretraining, classification).

Two sources with one interface, ``source.load(i, rng) -> (clip (3, T, S, S) float, label)``:

- `VideoListSource`: a Kinetics-style list file, one video per line, ``path[,label]`` (a space also
  separates, as in Kinetics/SSv2 lists; a ``path,label`` header line is ignored). Relative paths
  resolve against ``root`` if given, else against the list file's folder. Frames are decoded with
  `encoder.video_io.read_video` (random segment sampling when training, uniform when testing).
- `SynthSource`: the synthetic generator (`videollm.data.synth.make_clip`) rendered on the fly — a
  clip is a pure function of its seed, so nothing is stored.

Sampling is a pure function of (seed, step, micro-batch): `step_rng` makes the generators, so a
resumed run draws exactly the clips the uninterrupted run would have drawn.

A video that fails to decode is skipped by `load_batch`, counted in `SkipTracker` (which warns once
per file, naming it) and replaced by another draw; more than ``max_skipped`` distinct bad files is
a `UserError` naming the cap, since then the list itself is probably wrong.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from encoder.errors import UserError, VideoReadError
from encoder.transforms import frames_to_tensor

logger = logging.getLogger(__name__)


def step_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed from integer keys, e.g. (seed, step, micro)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32).astype(np.uint64)
               .dot(np.array([1 << 31, 1], dtype=np.uint64)))


def step_rng(*keys: int) -> tuple[torch.Generator, np.random.Generator]:
    """Torch and NumPy generators for one (seed, step, micro, …) key."""
    s = step_seed(*keys)
    return torch.Generator().manual_seed(s), np.random.default_rng(s)


@dataclass
class VideoItem:
    path: Path
    label: int | None
    line: int


def read_list_file(list_file: str | Path, root: str | Path | None = None) -> list[VideoItem]:
    """Parse ``path[,label]`` lines (see the module docstring). Errors name the file and line."""
    list_file = Path(list_file)
    if not list_file.is_file():
        raise UserError(f"video list '{list_file}' not found")
    base = Path(root) if root else list_file.parent
    items = []
    for n, raw in enumerate(list_file.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = [p.strip() for p in (line.rsplit(",", 1) if "," in line else line.rsplit(None, 1))]
        if n == 1 and parts[0].lower() == "path":
            continue  # header
        label = None
        if len(parts) == 2:
            try:
                label = int(parts[1])
            except ValueError:
                if "," in line:
                    raise UserError(f"{list_file}:{n}: label '{parts[1]}' is not an integer "
                                    "(expected 'path,label' with a class index)") from None
                parts = [line]  # a path with a space in it and no label
        path = Path(parts[0])
        items.append(VideoItem(path if path.is_absolute() else base / path, label, n))
    if not items:
        raise UserError(f"video list '{list_file}' has no entries")
    return items


class VideoListSource:
    """Clips decoded from the videos of a list file."""

    def __init__(self, list_file: str | Path, num_frames: int, size: int, root: str | Path | None = None,
                 train: bool = True):
        self.list_file = Path(list_file)
        self.items = read_list_file(list_file, root)
        self.num_frames, self.size, self.train = num_frames, size, train

    def __len__(self) -> int:
        return len(self.items)

    def describe(self, i: int) -> str:
        item = self.items[i]
        return f"{item.path} ({self.list_file.name} line {item.line})"

    def load(self, i: int, rng: np.random.Generator | None = None) -> tuple[torch.Tensor, int]:
        """Clip i: (3, T, S, S), random segments when training. Raises `VideoReadError`."""
        from encoder.video_io import read_video

        item = self.items[i]
        mode = "random_segment" if self.train else "uniform"
        clip = read_video(item.path, self.num_frames, mode=mode, rng=rng)
        return frames_to_tensor(clip.frames, self.size), -1 if item.label is None else item.label

    def load_clips(self, i: int, num_clips: int) -> tuple[torch.Tensor, int]:
        """Multi-clip test: the video is split into `num_clips` equal segments and each is sampled
        uniformly with T frames → (K, 3, T, S, S)."""
        from encoder.video_io import read_video

        item = self.items[i]
        T = self.num_frames
        frames = read_video(item.path, T * num_clips, mode="uniform").frames  # (K·T, H, W, 3)
        clips = torch.stack([frames_to_tensor(frames[k * T:(k + 1) * T], self.size) for k in range(num_clips)])
        return clips, -1 if item.label is None else item.label


class SynthSource:
    """Synthetic clips on the fly: item i is ``make_clip(base_seed + i)`` (index = seed offset)."""

    def __init__(self, num_frames: int, size: int, task: str = "motion", base_seed: int = 0, size_hint: int = 0):
        from videollm.data.synth import check_clip_args

        check_clip_args(num_frames, size, task)
        self.num_frames, self.size, self.task, self.base_seed = num_frames, size, task, base_seed
        self._len = size_hint  # 0 = unbounded (samplers draw fresh seeds)

    def __len__(self) -> int:
        return self._len

    def describe(self, i: int) -> str:
        return f"synthetic clip seed {self.base_seed + i}"

    def load(self, i: int, rng=None) -> tuple[torch.Tensor, int]:
        from videollm.data.synth import make_clip

        clip = make_clip(self.base_seed + int(i), self.num_frames, self.size, self.task)
        return frames_to_tensor(clip.frames, self.size), clip.label

    def load_clips(self, i: int, num_clips: int) -> tuple[torch.Tensor, int]:
        # A synthetic clip is exactly one clip long; the K "views" are the same clip.
        x, y = self.load(i)
        return x[None].expand(num_clips, *x.shape), y


class SkipTracker:
    """Counts videos that failed to decode; warns once per file; enforces ``max_skipped``."""

    def __init__(self, max_skipped: int, bad: dict[str, str] | None = None, events: int = 0):
        self.max_skipped = max_skipped
        self.bad: dict[str, str] = dict(bad or {})  # description → reason
        self.events = events

    def record(self, what: str, err: Exception) -> None:
        self.events += 1
        if what not in self.bad:
            self.bad[what] = str(err)
            logger.warning("skipping undecodable video %s: %s", what, err)
            if len(self.bad) > self.max_skipped:
                raise UserError(f"{len(self.bad)} videos failed to decode, more than data.max_skipped="
                                f"{self.max_skipped} (last: {what}); fix or remove them from the list, or "
                                "raise data.max_skipped")

    def state(self) -> dict:
        return {"bad": dict(self.bad), "events": self.events}


def load_batch(source, indices: list[int], rng: np.random.Generator, skips: SkipTracker,
               draw=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Load clips `indices`, skipping undecodable ones; if every clip of the batch failed, keep
    drawing replacements with ``draw()`` (a deterministic function of the step's generators).

    Returns (pixel_values (B', 3, T, S, S), labels (B',)), 1 ≤ B' ≤ len(indices).
    """
    clips, labels = [], []
    queue = list(indices)
    while queue or not clips:
        if not queue:
            if draw is None:
                raise UserError("every video of the batch failed to decode")
            queue = [draw()]
        i = queue.pop(0)
        try:
            x, y = source.load(i, rng)
        except VideoReadError as err:
            skips.record(source.describe(i), err)
            continue
        clips.append(x)
        labels.append(y)
    return torch.stack(clips), torch.tensor(labels, dtype=torch.long)
