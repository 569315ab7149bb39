"""Behaviour kept: the shipped default model's greedy replies to 20 fixed prompts (synthetic clips,
the bundled real clips, text only), recorded in tests/fixtures/shipped_replies.json when the model
was shipped, come out identical through today's one inference path (processor → ``model.generate``).
A newly shipped default re-records them: ``python tests/test_shipped_replies.py --record``."""

import json
import sys
from pathlib import Path

import pytest

from videollm.chat import generate_stream
from videollm.data.synth import make_clip
from videollm.modeling_videollm import load_videollm

FIXTURE_FILE = Path(__file__).parent / "fixtures" / "shipped_replies.json"
FIXTURE = json.loads(FIXTURE_FILE.read_text())


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


def _reply(model, processor, prompt) -> str:
    video, num_frames = _video(prompt["video"])
    return "".join(generate_stream(model, processor, video, [{"role": "user", "content": prompt["question"]}],
                                   max_new_tokens=FIXTURE["max_new_tokens"], temperature=0.0,
                                   num_frames=num_frames)).strip()


@pytest.mark.parametrize("prompt", FIXTURE["prompts"], ids=lambda p: p["question"][:40])
def test_the_shipped_model_replies_as_recorded(shipped, prompt):
    assert _reply(*shipped, prompt) == prompt["reply"]


def test_inference_loads_resize_frames_natively_and_training_loads_do_not(shipped):
    """The replies above go through the C++ resize (`frames_to_tensor(native=True)`); a training load keeps
    torch's path, the one the model was trained with."""
    assert shipped[1].native_resize
    assert not load_videollm("default", is_trainable=True)[1].native_resize


if __name__ == "__main__" and sys.argv[1:] == ["--record"]:  # a newly shipped default: record its replies
    model, processor = load_videollm("default")
    FIXTURE["prompts"] = [{**p, "reply": _reply(model, processor, p)} for p in FIXTURE["prompts"]]
    FIXTURE_FILE.write_text(json.dumps(FIXTURE, indent=1) + "\n")
