"""Behaviour kept: the shipped default model's greedy replies to 20 fixed prompts (synthetic clips,
the bundled real clips, text only), recorded before the redesign in
tests/fixtures/shipped_replies.json, come out identical through today's one inference path
(processor → ``model.generate``)."""

import json
from pathlib import Path

import pytest

from videollm.chat import generate_stream
from videollm.data.synth import make_clip
from videollm.modeling_videollm import load_videollm

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "shipped_replies.json").read_text())


@pytest.fixture(scope="module")
def shipped():
    return load_videollm("default")


def _video(spec):
    """(video, num_frames) for a fixture's video spec."""
    if spec is None:
        return None, None
    if "synth" in spec:
        s = spec["synth"]
        return make_clip(s["seed"], s["frames"], s["size"], s["task"]).frames, None
    return spec["clip"], spec["frames"]


@pytest.mark.parametrize("prompt", FIXTURE["prompts"], ids=lambda p: p["question"][:40])
def test_the_shipped_model_replies_as_recorded(shipped, prompt):
    model, processor = shipped
    video, num_frames = _video(prompt["video"])
    reply = "".join(generate_stream(model, processor, video, [{"role": "user", "content": prompt["question"]}],
                                    max_new_tokens=FIXTURE["max_new_tokens"], temperature=0.0,
                                    num_frames=num_frames)).strip()
    assert reply == prompt["reply"]
