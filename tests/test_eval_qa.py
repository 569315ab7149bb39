"""The QA runner with a fake answering function: scoring, outputs, resume, unreadable videos."""

import json

import numpy as np
import pytest

from encoder.errors import UserError
from eval import qa
from eval.benchmarks import MCSample, load_synthqa


def _oracle(samples, wrong_every=3):
    """A fake model: right letter, except every `wrong_every`-th question gets an unparseable reply."""
    by_question = {s.question + "|" + "|".join(s.options): s for s in samples}
    calls = []

    def answer(frames, prompt):
        assert frames.dtype == np.uint8 and frames.ndim == 4
        key = prompt.split("\n")[0] + "|" + "|".join(line[3:] for line in prompt.split("\n")[1:-1])
        sample = by_question[key]
        calls.append(sample.id)
        if len(calls) % wrong_every == 0:
            return "I am not sure."
        return f"The answer is ({sample.answer})."

    return answer, calls


def test_prompt_layout():
    s = MCSample(id="x", question="What shape?", options=["circle", "star"], answer="B")
    assert qa.build_prompt(s) == ("What shape?\nA. circle\nB. star\n"
                                  "Answer with the option's letter from the given choices directly.")


def test_run_scores_writes_outputs_and_resumes(tmp_path):
    samples = load_synthqa(seed=3, n=6)
    answer, calls = _oracle(samples)
    results = qa.run_qa(samples, answer, tmp_path, num_frames=8,
                        meta={"benchmark": "synthqa", "model": "fake"}, log=lambda m: None)
    # every third reply is unparseable → wrong (never a random letter)
    assert results["n"] == 6 and results["correct"] == 4 and results["unparsed"] == 2
    assert results["accuracy"] == pytest.approx(4 / 6)
    assert results["frames"] == 8 and results["model"] == "fake"
    cats = results["per_category"]["task"]
    assert sum(c["n"] for c in cats.values()) == 6 and set(cats) <= {"motion", "order", "count"}
    lines = (tmp_path / "samples.jsonl").read_text().splitlines()
    assert [json.loads(l)["id"] for l in lines] == [s.id for s in samples]
    assert json.loads((tmp_path / "results.json").read_text())["accuracy"] == pytest.approx(4 / 6)
    assert "accuracy: 66.7%" in (tmp_path / "summary.md").read_text()

    # interrupt: keep the first half and a torn line, then rerun
    (tmp_path / "samples.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:20])
    calls.clear()
    again = qa.run_qa(samples, answer, tmp_path, num_frames=8, meta={"benchmark": "synthqa", "model": "fake"},
                      log=lambda m: None)
    assert calls == [s.id for s in samples[3:]]  # only the missing half was answered
    assert again["n"] == 6
    lines = (tmp_path / "samples.jsonl").read_text().splitlines()
    assert sorted(json.loads(l)["id"] for l in lines) == sorted(s.id for s in samples)


def test_unreadable_video_is_wrong_not_fatal(tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video")
    s = MCSample(id="v1", question="q?", options=["a", "b", "c", "d"], answer="A", video=str(bad))
    results = qa.run_qa([s], lambda f, p: "A", tmp_path / "out", num_frames=4, log=lambda m: None)
    assert results["correct"] == 0 and results["errors"] == 1
    record = json.loads((tmp_path / "out" / "samples.jsonl").read_text())
    assert "broken.mp4" in record["error"] and record["correct"] is False


def test_real_video_frames_and_cli_checks_missing_videos(tmp_path):
    from encoder.video_io import write_video

    frames = np.zeros((10, 32, 32, 3), np.uint8)
    frames[:, :, :, 0] = np.arange(10)[:, None, None] * 20
    write_video(tmp_path / "clip.mp4", frames, fps=5)
    s = MCSample(id="v", question="q", options=["a", "b"], answer="A", video=str(tmp_path / "clip.mp4"))
    got = qa.load_frames(s, 4)
    assert got.shape == (4, 32, 32, 3)
    assert got[0, 0, 0, 0] < got[-1, 0, 0, 0]  # first and last frames, in order

    with pytest.raises(UserError, match="videos are missing"):
        qa.main(["--benchmark", "egoschema", "--data", "tests/fixtures/egoschema", "--model", str(tmp_path),
                 "--out", str(tmp_path / "o")])


def test_cli_end_to_end_with_a_tiny_saved_model(tmp_path):
    from test_videollm_model import tiny_videollm  # tests/ is on sys.path under pytest

    from videollm.modeling_videollm import save_videollm

    model, processor = tiny_videollm()
    save_videollm(model, processor, tmp_path / "m")
    rc = qa.main(["--benchmark", "synthqa", "--seed", "5", "--n", "2", "--model", str(tmp_path / "m"),
                  "--out", str(tmp_path / "o"), "--frames", "2", "--max-new-tokens", "3"])
    assert rc == 0
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert results["n"] == 2 and results["benchmark"] == "synthqa" and results["seed"] == 5
    assert 0.0 <= results["accuracy"] <= 1.0 and results["frames"] == 2
    assert len((tmp_path / "o" / "samples.jsonl").read_text().splitlines()) == 2
