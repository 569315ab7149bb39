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


def test_likelihood_scoring_takes_the_best_scored_option(tmp_path):
    samples = load_synthqa(seed=3, n=6)
    seen = []

    def scores(frames, question, options):
        # right answer best, except on the 2nd question, where the first wrong option wins
        assert frames.dtype == np.uint8 and "\n" not in question  # the bare question, no option lines
        sample = next(s for s in samples if s.question == question and s.options == options)
        seen.append(sample.id)
        right = "ABCD".index(sample.answer)
        out = [-2.0] * len(options)
        out[right] = -1.0
        if len(seen) == 2:
            out[(right + 1) % len(options)] = -0.5
        return out

    results = qa.run_qa(samples, scores, tmp_path, num_frames=4, log=lambda m: None, scoring="likelihood")
    assert results["scoring"] == "likelihood" and results["correct"] == 5 and results["unparsed"] == 0
    records = [json.loads(l) for l in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert records[0]["reply"] == samples[0].options["ABCD".index(samples[0].answer)]
    assert records[1]["correct"] is False and len(records[1]["option_scores"]) == len(samples[1].options)
    assert "scoring: likelihood" in (tmp_path / "summary.md").read_text()
    # a generate run cannot resume into a likelihood run's answers
    with pytest.raises(UserError, match="another --out"):
        qa.run_qa(samples, lambda f, p: "A", tmp_path, num_frames=4, log=lambda m: None)


def test_continuation_logprobs_match_the_models_own_forward():
    import torch
    from test_videollm_model import tiny_videollm

    from videollm.chat import continuation_logprobs

    model, processor = tiny_videollm()
    model.eval()
    frames = np.random.default_rng(0).integers(0, 255, (2, 32, 32, 3), dtype=np.uint8)
    conversation = [{"role": "user", "content": "What colour is it?"}]
    texts = ["red", "blue circle", "a green square"]  # the context's cache is reused and cropped between them
    got = continuation_logprobs(model, processor, frames, conversation, ["red", " blue circle", "a green square"])
    clip = processor.load_video(frames)
    ctx = processor(conversation, video=clip)["input_ids"]
    assert len(got) == 3
    for (logprob, greedy), text in zip(got, texts):
        cont = processor.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        ids = torch.cat([ctx, cont], 1)
        with torch.no_grad():
            logits = model(input_ids=ids, pixel_values=clip.pixel_values).logits[0].float()
        steps = torch.log_softmax(logits[ctx.shape[1] - 1:-1], -1)
        expected = steps.gather(1, cont[0, :, None]).sum()
        assert logprob == pytest.approx(float(expected), abs=1e-4) and logprob < 0
        assert greedy == bool((steps.argmax(-1) == cont[0]).all())


def test_cli_likelihood_scoring_with_a_tiny_saved_model(tmp_path):
    from test_videollm_model import tiny_videollm

    from videollm.modeling_videollm import save_videollm

    model, processor = tiny_videollm()
    save_videollm(model, processor, tmp_path / "m")
    assert qa.main(["--benchmark", "synthqa", "--seed", "5", "--n", "2", "--model", str(tmp_path / "m"),
                    "--out", str(tmp_path / "o"), "--frames", "2", "--scoring", "likelihood"]) == 0
    records = [json.loads(l) for l in (tmp_path / "o" / "samples.jsonl").read_text().splitlines()]
    for r in records:
        assert r["scoring"] == "likelihood" and r["pred"] == "ABCD"[int(np.argmax(r["option_scores"]))]
        assert all(s < 0 for s in r["option_scores"])
