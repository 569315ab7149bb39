"""``--frames auto``: the frames that fit a memory budget, the LLM's context and the model's checked length."""

import argparse
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

from encoder.errors import UserError
from videollm import frame_budget
from videollm.frame_budget import FrameCost, auto_frames, parse_frames, parse_memory
from videollm.modeling_videollm import DEFAULT_WEIGHTS, load_videollm

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def llm_cache(tmp_path_factory):
    from videollm.llm import load_llm

    cache = tmp_path_factory.getbasetemp() / "videomap-llm-cache"  # shared with the other LLM tests
    load_llm("smollm2", cache_dir=cache)
    return cache


@pytest.fixture(scope="module")
def default_model(llm_cache):
    return load_videollm(None, cache_dir=llm_cache)


def test_frames_and_memory_arguments():
    assert parse_frames("auto") == "auto" and parse_frames("AUTO") == "auto" and parse_frames("12") == 12
    for bad in ("0", "-3", "many"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_frames(bad)
    assert parse_memory("8GB") == 8192 and parse_memory("1.5 GiB") == 1536 and parse_memory("6000MB") == 6000
    assert parse_memory("700") == 700
    for bad in ("", "lots", "8TB", "0GB"):
        with pytest.raises(UserError, match="--max-memory"):
            parse_memory(bad)


def test_auto_frames_takes_the_tightest_of_memory_context_and_the_checked_length(default_model):
    model, processor = default_model
    cost = FrameCost(base_mb=1000.0, per_frame_mb=2.0, frames=[16, 128], peak_mb=[1032.0, 1256.0])
    per_frame = processor.config.num_video_tokens(1, processor.image_size, processor.image_size)
    context = model.config.text_config.max_position_embeddings
    checked = model.config.max_frames
    # Memory: (1100 − 1000) / 2 = 50 frames.
    frames, why = auto_frames(model, processor, cost, 1100)
    assert frames == 50 and why["by_memory"] == 50
    assert cost.peak(frames) <= 1100 < cost.peak(frames + 1)
    # Plenty of memory: the model's checked length, or the LLM's context where the model states none.
    frames, why = auto_frames(model, processor, cost, 10**6, max_new_tokens=64)
    assert why["by_context"] * per_frame + why["prompt_tokens"] + 64 <= context
    assert (why["by_context"] + 1) * per_frame + why["prompt_tokens"] + 64 > context
    assert checked and frames == checked < why["by_context"]
    model.config.max_frames = None
    try:
        assert auto_frames(model, processor, cost, 10**6, max_new_tokens=64)[0] == why["by_context"]
    finally:
        model.config.max_frames = checked
    with pytest.raises(UserError, match="not even one frame"):
        auto_frames(model, processor, cost, 900)


def test_the_shipped_model_states_the_longest_clip_it_was_checked_on():
    config = json.loads((DEFAULT_WEIGHTS / "config.json").read_text())
    pipeline = yaml.safe_load((DEFAULT_WEIGHTS / "pipeline_config.yaml").read_text())
    assert config["max_frames"] == max([pipeline["eval"]["frames"], *pipeline["eval"]["niah_frames"]])


def test_measured_cost_grows_with_frames_and_is_kept(llm_cache, monkeypatch, tmp_path):
    monkeypatch.setenv("VIDEOMAP_LLM_CACHE", str(llm_cache))
    monkeypatch.setattr(frame_budget, "CALIBRATION_FRAMES", (4, 256))
    monkeypatch.setattr(frame_budget, "default_cache_dir", lambda: tmp_path / "llm")
    cost = frame_budget.frame_cost(None)
    assert cost.frames == [4, 256] and cost.per_frame_mb > 0 and cost.peak_mb[1] > cost.peak_mb[0]
    assert all(cost.peak(n) >= p - 1e-6 for n, p in zip(cost.frames, cost.peak_mb))  # never under a measurement
    assert cost.base_mb > 100  # the loaded model itself
    kept = list((tmp_path / "frame_cost").glob("*.json"))
    assert len(kept) == 1

    def measure_again(*a, **k):
        raise AssertionError("measured again")

    monkeypatch.setattr(frame_budget, "measure_frame_cost", measure_again)
    assert frame_budget.frame_cost(None) == cost  # the kept fit, for the same files on this machine


def test_chat_with_frames_auto_says_how_many_and_answers(llm_cache, tmp_path):
    # A kept fit (as a first run measures it) with 2 MB a frame: 1100 MB leaves room for 50 frames.
    cost = FrameCost(base_mb=1000.0, per_frame_mb=2.0, frames=[16, 128], peak_mb=[1032.0, 1256.0])
    key = frame_budget._fingerprint(DEFAULT_WEIGHTS)
    kept = llm_cache.parent / "frame_cost" / f"{key}.json"
    kept.parent.mkdir(parents=True, exist_ok=True)
    kept.write_text(json.dumps({**asdict(cost), "fingerprint": key}))
    env = {**os.environ, "VIDEOMAP_LLM_CACHE": str(llm_cache), "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "videollm.chat", "bikes", "What is in this video?", "--frames", "auto",
                        "--max-memory", "1100MB", "--max-new-tokens", "8"], capture_output=True, text=True,
                       env=env, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert "note: --frames auto: 50 frames (1100 MB of memory)" in r.stderr.splitlines()
    assert r.stdout.strip()
    r = subprocess.run([sys.executable, "-m", "videollm.chat", "bikes", "hi", "--frames", "8", "--max-memory", "1GB"],
                       capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    assert r.returncode == 2 and "--max-memory goes with --frames auto" in r.stderr
