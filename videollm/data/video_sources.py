"""Video clips for the encoder recipes (pretraining, classification).

`open_video_source` opens ``data.source`` as an object with ``load(i, rng) -> (clip (3, T, S, S),
label)``: ``synth`` (`SynthSource`, rendered from seeds), a folder (every video under it, labelled
by its first sub-folder, Kinetics-style) or a ``path[,label]`` list file (`VideoFileSource`).
Sampling is a pure function of (seed, step, micro-batch) through `step_rng`, so a resumed run draws
the same clips. `load_batch` skips undecodable videos; `SkipTracker` stops the run past
``max_skipped`` distinct bad files (the list itself is then probably wrong).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from encoder.errors import UserError, VideoReadError
from encoder.transforms import frames_to_tensor
from encoder.video_io import read_video
from videollm.data.synth import BACKGROUNDS, PLAIN_BACKGROUNDS, check_clip_args, make_clip

logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".3gp",
                    ".ts", ".gif")
SOURCE_HELP = "'synth', a folder of videos, or a list file ('path[,label]' per line)"


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
    where: str  # how to find it again: "list.csv line 3", or the path itself for a folder


def read_list_file(list_file: str | Path, root: str | Path | None = None) -> list[VideoItem]:
    """Parse ``path[,label]`` lines (see the module docstring). Errors name the file and line."""
    list_file = Path(list_file)
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
        items.append(VideoItem(path if path.is_absolute() else base / path, label, f"{list_file.name} line {n}"))
    if not items:
        raise UserError(f"video list '{list_file}' has no entries; write one video per line ('path[,label]')")
    return items


def scan_folder(folder: str | Path, classes: list[str] | None = None) -> tuple[list[VideoItem], list[str]]:
    """Every video under `folder` (sorted), labelled by the first sub-folder it sits in (none directly
    in `folder`), and the class names (sorted, or `classes`: e.g. the training folder's)."""
    folder = Path(folder)
    videos = sorted(p for p in folder.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file())
    if not videos:
        raise UserError(f"folder '{folder}' holds no videos ({', '.join(VIDEO_EXTENSIONS[:6])}, …); put videos in "
                        f"it (any depth; for classification one sub-folder per class) or give data.source "
                        f"{SOURCE_HELP}")
    names = {p.relative_to(folder).parts[0] for p in videos if len(p.relative_to(folder).parts) > 1}
    classes = sorted(names) if classes is None else list(classes)
    index = {name: i for i, name in enumerate(classes)}
    items = []
    for p in videos:
        parts = p.relative_to(folder).parts
        if len(parts) > 1 and parts[0] not in index:
            raise UserError(f"'{p}': class '{parts[0]}' is not one of the training classes ({', '.join(classes)})")
        items.append(VideoItem(p, index[parts[0]] if len(parts) > 1 else None, str(p)))
    return items, classes


class VideoFileSource:
    """Clips decoded from video files; ``classes``: a folder's class names (None for a list file)."""

    def __init__(self, items: list[VideoItem], num_frames: int, size: int, train: bool = True,
                 classes: list[str] | None = None):
        self.items, self.classes = items, classes
        self.num_frames, self.size, self.train = num_frames, size, train

    def __len__(self) -> int:
        return len(self.items)

    def describe(self, i: int) -> str:
        item = self.items[i]
        return str(item.path) if item.where == str(item.path) else f"{item.path} ({item.where})"

    def load(self, i: int, rng: np.random.Generator | None = None) -> tuple[torch.Tensor, int]:
        """Clip i: (3, T, S, S), random segments when training. Raises `VideoReadError`."""
        item = self.items[i]
        mode = "random_segment" if self.train else "uniform"
        clip = read_video(item.path, self.num_frames, mode=mode, rng=rng)
        return frames_to_tensor(clip.frames, self.size), -1 if item.label is None else item.label

    def load_clips(self, i: int, num_clips: int) -> tuple[torch.Tensor, int]:
        """`num_clips` equal segments of the video, T uniform frames each → (K, 3, T, S, S)."""
        item = self.items[i]
        T = self.num_frames
        frames = read_video(item.path, T * num_clips, mode="uniform").frames  # (K·T, H, W, 3)
        clips = torch.stack([frames_to_tensor(frames[k * T:(k + 1) * T], self.size) for k in range(num_clips)])
        return clips, -1 if item.label is None else item.label


class SynthSource:
    """Item i is ``make_clip(base_seed + i)``. Motion scene: ``background`` (None: random mix; "plain":
    plain ones by seed; a `BACKGROUNDS` name), ``distractors`` (None: 0–2 at random; n: exactly n)."""

    def __init__(self, num_frames: int, size: int, task: str = "motion", base_seed: int = 0, size_hint: int = 0,
                 background: str | None = None, distractors: int | None = None):
        check_clip_args(num_frames, size, task)
        self.num_frames, self.size, self.task, self.base_seed = num_frames, size, task, base_seed
        self.size_hint = size_hint  # 0 = unbounded (samplers draw fresh seeds)
        self.background, self.distractors = background, distractors
        self.classes = None

    def __len__(self) -> int:
        return self.size_hint

    def describe(self, i: int) -> str:
        return f"synthetic clip seed {self.base_seed + i}"

    def clip_key(self, i: int) -> str:
        """What names item i's pixels (for `encoder.teacher.TeacherCache`)."""
        seed = self.base_seed + int(i)
        return f"synth:{self.task}:{self.num_frames}x{self.size}:{sorted(self.spec_kw(seed).items())}:{seed}"

    def spec_kw(self, seed: int) -> dict:
        kw = {}
        if self.background is not None:
            kw["background"] = (PLAIN_BACKGROUNDS[seed % len(PLAIN_BACKGROUNDS)] if self.background == "plain"
                                else self.background)
        if self.distractors is not None:
            kw["distractors"] = self.distractors
        return kw

    def load(self, i: int, rng=None) -> tuple[torch.Tensor, int]:
        seed = self.base_seed + int(i)
        clip = make_clip(seed, self.num_frames, self.size, self.task, **self.spec_kw(seed))
        return frames_to_tensor(clip.frames, self.size), clip.label

    def load_clips(self, i: int, num_clips: int) -> tuple[torch.Tensor, int]:
        # A synthetic clip is exactly one clip long; the K "views" are the same clip.
        x, y = self.load(i)
        return x[None].expand(num_clips, *x.shape), y


def check_scene(background: str | None, distractors: int | None, task: str) -> None:
    """UserError unless the synthetic scene options are valid for `task`."""
    if background is not None and background != "plain" and background not in BACKGROUNDS:
        raise UserError(f"data.background must be null, 'plain' or one of {', '.join(BACKGROUNDS)}; got {background!r}")
    if distractors is not None and not 0 <= distractors <= 3:
        raise UserError(f"data.distractors must be null or in 0..3; got {distractors}")
    if (background is not None or distractors is not None) and task != "motion":
        raise UserError("data.background / data.distractors apply to the synthetic motion task only")


def open_video_source(source: str, num_frames: int, size: int, *, root: str | None = None, train: bool = True,
                      task: str = "motion", base_seed: int = 0, size_hint: int = 0, background: str | None = None,
                      distractors: int | None = None, classes: list[str] | None = None):
    """The clips of ``data.source``: "synth" (`SynthSource`), a folder or a list file (`VideoFileSource`;
    `root` resolves a list's relative paths; `classes` numbers a folder's sub-folders)."""
    if source == "synth":
        return SynthSource(num_frames, size, task, base_seed=base_seed, size_hint=size_hint,
                           background=background, distractors=distractors)
    path = Path(source).expanduser()
    if path.is_dir():
        items, names = scan_folder(path, classes)
        return VideoFileSource(items, num_frames, size, train, classes=names)
    if path.is_file():
        return VideoFileSource(read_list_file(path, root), num_frames, size, train)
    raise UserError(f"data.source '{source}' not found; give {SOURCE_HELP}")


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
    """Clips `indices` as (pixel_values (B', 3, T, S, S), labels (B',)), skipping undecodable ones; if
    all fail, replacements from ``draw()`` (deterministic in the step's generators) until one loads."""
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
