"""One haystack builder and one multiple-choice prompt (videollm/data/haystack.py, prompts.py): the
same frames and strings the three haystack copies and two prompt copies produced before they were
merged (recorded in tests/fixtures/haystacks_and_prompts.json), since the shipped model's figures
depend on them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from eval import niah, qa
from eval.benchmarks import load_synthqa
from videollm.data import haystack
from videollm.data.haystack import insert_needle, real_clips, segment_haystack, vniah_haystack, write_needle_clips
from videollm.data.prompts import format_mc
from videollm.data.synth import conversations, make_clip, make_needle, resize_frames, short_conversations

BEFORE = json.loads((Path(__file__).parent / "fixtures" / "haystacks_and_prompts.json").read_text())


def digest(frames: np.ndarray) -> str:
    frames = np.ascontiguousarray(frames)
    return hashlib.sha256(frames.tobytes() + str(frames.shape).encode()).hexdigest()[:16]


def test_format_mc():
    text = format_mc("What shape?", ["circle", "star", "cross", "square"])
    assert text.splitlines() == ["What shape?", "A. circle", "B. star", "C. cross", "D. square",
                                 "Answer with the option's letter from the given choices directly."]


def test_mc_prompts_are_the_ones_recorded():
    assert [qa.build_prompt(s) for s in load_synthqa(seed=1001, n=12)] == BEFORE["mc_prompts_eval"]
    assert [qa.build_prompt(niah.needle_sample(5000 + i, 64)[1]) for i in range(4)] == BEFORE["mc_prompts_needle"]
    clip = make_clip(**BEFORE["mc_prompts_synth_source"])
    assert [format_mc(q["question"], q["options"]) for q in clip.qa if q["type"] == "mc"] == BEFORE["mc_prompts_synth"]


def test_vniah_haystacks_are_the_ones_recorded():
    for F in (16, 64, 130):
        hay = vniah_haystack(F, 64)
        assert hay.shape == (F, 64, 64, 3) and digest(hay) == BEFORE["vniah"][str(F)]
        for d in (0.0, 0.5, 1.0):
            needle, _ = niah.needle_sample(5000 + F, 64, 1 if F != 130 else 3)
            video, idx = insert_needle(hay, needle.frames, d)
            assert [digest(video), list(idx)] == BEFORE["vniah"][f"{F}@{d:g}"]


@pytest.mark.parametrize("mode", ["mixed", "real", "llava"])
def test_pipeline_needle_clips_are_the_ones_recorded(mode, tmp_path, monkeypatch):
    written = []
    monkeypatch.setattr(haystack, "write_video", lambda path, frames, fps=None: written.append(digest(frames)))
    if mode == "llava":
        records = write_needle_clips(tmp_path, 3, 0, size=64, haystack_frames=24, needle_span=1, real_only=False,
                                     conversations_of=lambda clip, rng: {k: v for k, v in conversations(clip).items()
                                                                         if k != "caption"})
    else:
        records = write_needle_clips(
            tmp_path, 5, 7, size=64, haystack_frames=40, needle_span=2, real_only=mode == "real", num_frames=40,
            conversations_of=lambda clip, rng: short_conversations("", clip.qa, rng, qa_turns=3, mc_reply="option"))
    assert written == BEFORE["pipeline_needles"][mode]["frames"]
    assert records == BEFORE["pipeline_needles"][mode]["records"]


def test_grounding_needle_haystacks_are_the_ones_recorded():
    """training.ground's needle clips: real segments of 8-32 frames drawn clip first, a one-frame needle."""
    real = real_clips(64)
    for seed, (expected, expected_start) in BEFORE["ground_needles"].items():
        rng = np.random.default_rng([int(seed), 2])
        hay = segment_haystack(rng, 64, real, lengths=(8, 32), source_first=True)
        video, (start, _) = insert_needle(hay, make_needle(int(seed), num_frames=1, size=64).frames,
                                          float(rng.uniform(0, 1)))
        assert (digest(video), start) == (expected, expected_start)


def test_short_records_are_the_ones_recorded():
    rng = np.random.default_rng(0)
    got = [short_conversations(make_clip(s, 16, 64, t).caption, make_clip(s, 16, 64, t).qa, rng, qa_turns=3,
                               caption_fraction=0.5, mc_reply="option")
           for t, s in (("count", 3), ("motion", 4), ("order", 5))]
    assert got == BEFORE["short_conversations"]


@pytest.mark.parametrize("depth", [0.0, 0.37, 1.0])
def test_insert_needle_at_depth(depth):
    hay = np.zeros((40, 36, 52, 3), np.uint8)
    hay[..., 1] = np.arange(40, dtype=np.uint8)[:, None, None]  # frame index in green
    needle = make_needle(2, num_frames=3, size=64).frames
    out, (start, stop) = insert_needle(hay, needle, depth)
    assert out.shape == hay.shape and stop - start == 3
    assert start == round(depth * 37)
    assert np.array_equal(out[start:stop], resize_frames(needle, 36, 52))
    keep = np.r_[0:start, stop:40]
    assert np.array_equal(out[keep], hay[keep])
    with pytest.raises(ValueError):
        insert_needle(hay, needle, 1.5)


def test_segment_haystack_mixes_real_and_synthetic_segments():
    real = [np.full((64, 8, 8, 3), v, np.uint8) for v in (10, 20)]
    calls = []

    def synthetic(rng, k, part):
        calls.append((k, part))
        return np.full((k, 8, 8, 3), 200, np.uint8)

    hay = segment_haystack(np.random.default_rng(3), 100, real, synthetic=synthetic)
    assert hay.shape == (100, 8, 8, 3)
    values = set(np.unique(hay[:, 0, 0, 0]))
    assert values <= {10, 20, 200} and 200 in values and values & {10, 20}
    assert all(8 <= k <= 16 for k, _ in calls)
    with pytest.raises(ValueError):
        segment_haystack(np.random.default_rng(0), 10, real, synthetic=synthetic, source_first=True)
