"""The chat CLI end to end with smollm2 (+ the random nano encoder), run as a subprocess."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def llm_cache(tmp_path_factory):
    from videollm.llm import load_llm

    # Shared with test_llm_loading: one GGUF dequantization per session.
    cache = tmp_path_factory.getbasetemp() / "videomap-llm-cache"
    load_llm("smollm2", cache_dir=cache)
    return cache


def chat(args, cache, stdin=None):
    # A user's shell: without the quiet settings an in-process CLI test of this session put in os.environ.
    env = {k: v for k, v in os.environ.items() if k not in ("TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS")}
    env.update(VIDEOMAP_LLM_CACHE=str(cache), PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "videollm.chat", *args], capture_output=True, text=True,
                          env=env, input=stdin, timeout=600, cwd=REPO)


def test_no_video_question_is_answered_by_smollm2_and_nothing_else_is_printed(llm_cache):
    r = chat(["--no-video", "What is the capital of France?", "--max-new-tokens", "16"], llm_cache)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    # one line, once: what the default model knows (its config's scope); no library warnings, progress
    # bars or notices
    import json

    from videollm.modeling_videollm import DEFAULT_WEIGHTS

    scope = json.loads((DEFAULT_WEIGHTS / "config.json").read_text())["scope"]
    # (besides, on a machine's first run, the one-time notice of each kernel the load builds)
    said = [line for line in r.stderr.splitlines() if not re.fullmatch(r"building .+ once \(later runs reuse it\) …", line)]
    assert "synthetic" in scope and "--model" in scope and said == [f"note: {scope}"]
    r = chat(["--verbose", "--no-video", "What is the capital of France?", "--max-new-tokens", "4"], llm_cache)
    assert r.returncode == 0 and "Loading weights" in r.stderr  # --verbose lets the libraries talk


def test_a_question_decodes_the_video_once_and_times_it(llm_cache, monkeypatch, capsys):
    """The file is probed before the model loads (a bad file or window fails at once) and decoded
    once; the reported decode time is that read + resize, the encode time the encoder's."""
    import json

    import encoder.video_io as video_io
    from videollm.chat import main

    opened = []
    with_reader = video_io._with_reader

    def counting(path, *args, **kwargs):
        opened.append(str(path))
        return with_reader(path, *args, **kwargs)

    monkeypatch.setattr(video_io, "_with_reader", counting)
    monkeypatch.setenv("VIDEOMAP_LLM_CACHE", str(llm_cache))
    assert main(["bikes", "What moves?", "--frames", "8", "--max-new-tokens", "3", "--timing"]) == 0
    assert opened == ["bikes", "bikes"]  # the probe, the read
    timing = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert timing["decode_seconds"] > 0.005 and timing["encode_seconds"] > 0
    assert timing["time_to_first_token"] > timing["decode_seconds"] + timing["encode_seconds"]


def test_video_question_streams_text(llm_cache):
    r = chat(["bigbuckbunny", "Describe the video.", "--frames", "8", "--max-new-tokens", "8", "--timing"], llm_cache)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    # the shipped default model answers (not the random-encoder fallback, which warns)
    assert "untrained" not in r.stderr and "randomly initialised" not in r.stderr
    import json

    from videollm.configuration_videollm import VideoLLMConfig
    from videollm.modeling_videollm import DEFAULT_WEIGHTS

    size = json.loads((DEFAULT_WEIGHTS / "videollm_processor.json").read_text())["image_size"]
    per_clip = VideoLLMConfig.from_pretrained(str(DEFAULT_WEIGHTS)).num_video_tokens(8, size, size)
    timing = json.loads([line for line in r.stderr.splitlines() if line.startswith("{")][-1])
    assert timing["num_frames"] == 8 and timing["video_tokens"] == per_clip == 8 * 4 and timing["new_tokens"] >= 1


def test_interactive_multi_turn_with_reset(llm_cache):
    r = chat(["--no-video", "--max-new-tokens", "6"], llm_cache,
             stdin="What is the capital of France?\n/reset\nAnd of Italy?\n/quit\nnever asked\n")
    assert r.returncode == 0, r.stderr
    before, sep, after = r.stdout.partition("(history cleared)")
    assert sep and before.strip() and after.strip()  # one answer before the reset, one after, none after /quit


def test_bad_video_exits_2_with_one_line(tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video at all")
    r = chat([str(bad), "What happens?"], tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "broken.mp4" in lines[0]
