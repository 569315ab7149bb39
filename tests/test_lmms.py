"""lmms-eval wrapper: the real lmms-eval CLI on our offline task, and loglikelihood's arithmetic."""

import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("lmms_eval.api.model", reason="lmms-eval is not installed (see docs/eval.md)")

from test_videollm_model import tiny_videollm  # noqa: E402  (tests/ is on sys.path under pytest)

from eval import lmms_wrapper  # noqa: E402
from videollm.modeling_videollm import save_videollm  # noqa: E402


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tinyvlm")
    model, processor = tiny_videollm()
    save_videollm(model, processor, path)
    return path


def test_prepare_writes_an_offline_task(tmp_path):
    out = lmms_wrapper.prepare_task(tmp_path / "tasks", n=3, seed=0, num_frames=8, size=32)
    docs = [json.loads(l) for l in (out / "synthqa" / "docs.jsonl").read_text().splitlines()]
    assert len(docs) == 3 and all((out / d["video"]).is_file() for d in docs)
    assert (out / "videomap_synthqa.yaml").is_file() and (out / "utils.py").is_file()
    assert docs[0]["answer"] in "ABCD" and len(docs[0]["options"]) == 4


@pytest.mark.slow
def test_lmms_eval_cli_runs_our_model_on_the_local_task(tmp_path, tiny_model_dir):
    tasks = lmms_wrapper.prepare_task(tmp_path / "tasks", n=6, seed=0, num_frames=8, size=32)
    cmd = [sys.executable, "-m", "eval.lmms_wrapper", "run", "--model", "videomap_llm",
           "--model_args", f"pretrained={tiny_model_dir},max_frames_num=2,max_new_tokens=4",
           "--tasks", "videomap_synthqa", "--include_path", str(tasks), "--batch_size", "1",
           "--limit", "4", "--log_samples", "--output_path", str(tmp_path / "out")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path,
                          env={**__import__("os").environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = list((tmp_path / "out").rglob("*_results.json"))
    assert results, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads(results[0].read_text())
    acc = data["results"]["videomap_synthqa"]["accuracy,none"]
    assert 0.0 <= acc <= 1.0
    samples = list((tmp_path / "out").rglob("*_samples_videomap_synthqa.jsonl"))
    assert len(samples[0].read_text().splitlines()) == 4  # --limit 4


class _Req:
    def __init__(self, *args):
        self.args = args


def test_loglikelihood_is_a_distribution_and_greedy_flag(tiny_model_dir):
    lm = lmms_wrapper.VideoMAPLLM(pretrained=str(tiny_model_dir), max_frames_num=2)
    frames = np.random.default_rng(0).integers(0, 255, (2, 32, 32, 3), dtype=np.uint8)
    lm.task_dict = {"t": {"test": [{"frames": frames}]}}
    visual = lambda doc: [doc["frames"]]  # noqa: E731
    letters = [chr(c) for c in range(65, 91)]  # every single-character continuation A–Z
    reqs = [_Req("Which?", " " + x, visual, 0, "t", "test") for x in letters]
    out = lm.loglikelihood(reqs)
    logps = np.array([lp for lp, _ in out])
    assert (logps < 0).all() and np.exp(logps).sum() < 1.0 + 1e-5
    # exactly the most likely letter is greedy, unless some non-letter token beats them all
    greedy = [g for _, g in out]
    assert sum(greedy) <= 1 and (not any(greedy) or greedy[int(np.argmax(logps))])
    # generate_until goes through the same model and honours `until`
    reply = lm.generate_until([_Req("Which?", {"max_new_tokens": 3, "until": ["\n\n"]}, visual, 0, "t", "test")])
    assert isinstance(reply[0], str) and "\n\n" not in reply[0]
