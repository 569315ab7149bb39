"""V-NIAH: real-video haystack, needle at the right depth, grid and heatmap, with fake models."""

import json

import numpy as np

from eval import niah
from videollm.data.haystack import vniah_haystack
from videollm.data.synth import resize_frames

SIZE = 32


def test_haystack_is_real_video_of_f_frames():
    hay = vniah_haystack(10, SIZE)
    assert hay.shape == (10, SIZE, SIZE, 3) and hay.dtype == np.uint8
    assert hay.std() > 10  # real content, not a blank
    assert not np.array_equal(hay[0], hay[-1])  # first clip vs last clip


def _looking_model(seeds, window):
    """A fake model that answers right only if the needle is among the frames it looks at
    (window(frames) selects them); otherwise it says it does not know."""
    needles = {}
    for s in seeds:
        needle, sample = niah.needle_sample(s, SIZE)
        needles[s] = (resize_frames(needle.frames, SIZE, SIZE)[0], sample)

    def answer(frames, prompt):
        for frame0, sample in needles.values():
            if sample.question in prompt and all(o in prompt for o in sample.options):
                if any(np.array_equal(f, frame0) for f in window(frames)):
                    return f"Answer: {sample.answer}"
        return "I cannot tell."

    return answer


def test_grid_follows_where_the_needle_is(tmp_path):
    first_half = _looking_model(range(3), lambda frames: frames[: len(frames) // 2])
    result = niah.run_niah(first_half, [8, 12], [0.0, 0.5, 1.0], needles=3, size=SIZE, log=lambda m: None)
    acc = np.asarray(result["accuracy"])
    assert acc.shape == (2, 3)
    assert (acc[:, 0] == 1).all() and (acc[:, 2] == 0).all()  # depth 0 seen, depth 1 not
    for s in result["samples"]:
        start, end = s["needle_index"]
        assert start == round(s["depth"] * (s["frames"] - 1)) and end == start + 1
    everywhere = _looking_model(range(3), lambda frames: frames)
    full = niah.run_niah(everywhere, [8], [0.0, 0.5, 1.0], needles=3, size=SIZE, log=lambda m: None)
    assert full["mean_accuracy"] == 1.0
    niah.heatmap(result, tmp_path / "niah.png")
    assert (tmp_path / "niah.png").stat().st_size > 1000
    json.dumps(result)  # serialisable as niah.json


def test_likelihood_scoring_grid(tmp_path):
    # a fake ScoreFn: the right option scores best only when the needle is in the first half
    needles = [niah.needle_sample(s, SIZE) for s in range(2)]

    def scores(frames, question, options):
        assert "\n" not in question  # the bare question, no option lines
        for needle, sample in needles:
            if sample.options == options and any(np.array_equal(f, resize_frames(needle.frames, SIZE, SIZE)[0])
                                                 for f in frames[: len(frames) // 2]):
                return [0.0 if "ABCD"[i] == sample.answer else -1.0 for i in range(len(options))]
        return [0.0] + [-1.0] * (len(options) - 1)  # otherwise always the first option

    result = niah.run_niah(scores, [8], [0.0, 1.0], needles=2, size=SIZE, log=lambda m: None, scoring="likelihood")
    assert result["scoring"] == "likelihood" and result["accuracy"][0][0] == 1.0
    late = [s for s in result["samples"] if s["depth"] == 1.0]
    assert all(s["pred"] == "A" and len(s["option_scores"]) == 4 for s in late)
    assert result["accuracy"][0][1] == sum(s["answer"] == "A" for s in late) / 2
