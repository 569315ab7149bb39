"""The default-model pipeline end to end through its real CLI, at toy budget
(training/configs/default_model_smoke.yaml): data → pretrain → stage 1 → stage 2 → eval → ship.

Slow (~8–14 min on 2 cores: the pipeline runs twice, to check that a rerun from scratch is bit-exact;
far more under heavy load: six stage processes each load smollm2), hence ``-m slow``. The parts
that need no training (config loading, open-ended scoring, embedding stripping) run fast."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from encoder.errors import UserError
from training.config import load_config
from training.pipeline import (PipelineConfig, eval_commands, mismatched_clip, open_correct, open_samples, shown_command,
                               stage_commands)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "training" / "configs"


@pytest.mark.parametrize("name", ["default_model.yaml", "default_model_smoke.yaml"])
def test_configs_load_and_build_commands(name, tmp_path):
    cfg = load_config(PipelineConfig, CONFIGS / name)
    cmds = stage_commands(cfg, tmp_path)
    assert list(cmds) == ["replay", "pretrain", "ground", "stage1", "stage2"]  # the order they run in
    # stage 2 reads the mix of the instruction set and the text replay; stage 1 the set alone
    assert f'data.source="{tmp_path / "data" / "stage2_mix.yaml"}"' in cmds["stage2"]
    assert f'data.source="{tmp_path / "data" / "instruct.json"}"' in cmds["stage1"]
    assert cmds["replay"][cmds["replay"].index("--n") + 1] == str(cfg.data.text_replay)
    assert "--system-prompt" not in cmds["replay"]  # both stage 2s render an empty system turn, the CLI's default
    for cmd in cmds.values():
        assert all((REPO / c).is_file() for c in cmd if c.endswith(".yaml"))
    assert any(c.startswith("init_from=") and "stage1" in c for c in cmds["stage2"])
    assert any(c.startswith("init_from=") and "ground" in c for c in cmds["stage1"])
    cfg.ground = None  # without grounding, stage 1 starts from the pretrained encoder
    cmds = stage_commands(cfg, tmp_path)
    assert list(cmds) == ["replay", "pretrain", "stage1", "stage2"]
    assert not any(c.startswith("init_from=") for c in cmds["stage1"])
    cfg.data.text_replay, cfg.data.needle_repeat = 0, 2  # no replay stage; stage 2 reads the mix for the needles
    cmds = stage_commands(cfg, tmp_path)
    assert list(cmds) == ["pretrain", "stage1", "stage2"]
    assert f'data.source="{tmp_path / "data" / "stage2_mix.yaml"}"' in cmds["stage2"]
    cfg.data.needle_repeat = 1
    cmds = stage_commands(cfg, tmp_path)
    assert f'data.source="{tmp_path / "data" / "instruct.json"}"' in cmds["stage2"]


def test_stage2_mix_repeats_the_needles_and_the_text_replay(tmp_path):
    from videollm.data.instruct import load_records
    from training.pipeline import stage2_system_prompt, write_stage2_mix

    cfg = load_config(PipelineConfig, CONFIGS / "default_model.yaml")
    assert stage2_system_prompt(cfg) == ""
    cfg.data.text_replay_repeat, cfg.data.needle_repeat = 2, 3

    def video(i):
        return {"id": i, "video": "v.mp4", "conversations": [{"from": "human", "value": "<video>\nHi?"},
                                                             {"from": "gpt", "value": "red"}]}

    ids = ["synth_0_a", "needle_0_4_qa0", "synth_1_b", "needle_0_1_qa0", "synth_2_c"]
    text = [{"id": f"t{i}", "conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]}
            for i in range(3)]
    (tmp_path / "instruct.json").write_text(json.dumps([video(i) for i in ids]))
    (tmp_path / "text_replay.json").write_text(json.dumps(text))
    write_stage2_mix(cfg, tmp_path)
    records = load_records(tmp_path / "stage2_mix.yaml", check_files=False)
    # the set once, its needle records twice more (3 in all), the replay twice
    assert [r.id for r in records] == ids + ["needle_0_4_qa0", "needle_0_1_qa0"] * 2 + [f"t{i}" for i in range(3)] * 2
    cfg.data.needle_repeat, cfg.data.text_replay = 1, 0
    write_stage2_mix(cfg, tmp_path)
    assert [r.id for r in load_records(tmp_path / "stage2_mix.yaml", check_files=False)] == ids


def test_needle_repeat_below_one_is_refused(tmp_path):
    from training.pipeline import stage_data

    cfg = load_config(PipelineConfig, CONFIGS / "default_model_smoke.yaml")
    cfg.data.needle_repeat = 0.5
    with pytest.raises(UserError, match="needle_repeat must be a number ≥ 1"):
        stage_data(cfg, tmp_path)


def test_open_scoring():
    assert open_correct("The moving object moves up-left.", "up-left")
    assert open_correct("It moves up left", "up-left")
    assert open_correct("RED", "red")
    assert not open_correct("It is blue.", "red")
    motions = ("moves up", "moves up-right", "moves left", "stays still")
    assert open_correct("It moves up.", "moves up", motions)
    assert not open_correct("It moves up-right.", "moves up", motions)  # the longer phrase wins
    assert open_correct("It moves up-right.", "moves up-right", motions)
    assert not open_correct("It moves up or left... it moves left", "moves up", motions)
    assert not open_correct("red or blue", "red", ("red", "blue"))
    assert not open_correct("It is reddish.", "red", ("red", "blue"))  # whole words only
    samples = open_samples(1001, 6, 8, 32)
    assert len(samples) == 6 and {s["category"] for s in samples} <= {"color", "shape", "motion"}
    assert open_samples(1001, 6, 8, 32)[0]["answer"] == samples[0]["answer"]  # deterministic


def test_shown_command_pastes_back_into_the_same_arguments(tmp_path):
    """The log and the model card show each stage's command; pasted into a shell it must give the
    stage the same arguments (an unquoted data.system_prompt="" would become null: another run)."""
    import shlex

    cmd = stage_commands(load_config(PipelineConfig, CONFIGS / "default_model.yaml"), tmp_path / "my out")["stage2"]
    assert 'data.system_prompt=""' in cmd
    shown = shown_command(cmd)
    assert shown.startswith("python -m training.finetune ")
    assert shlex.split(shown) == ["python", *cmd[1:]]


def test_eval_commands_score_by_likelihood_only_when_asked(tmp_path):
    cfg = load_config(PipelineConfig, CONFIGS / "default_model_smoke.yaml")
    both = eval_commands(cfg, tmp_path / "model", tmp_path / "eval")
    assert set(both) == {"mc", "mc_likelihood", "niah", "niah_likelihood"}
    assert "likelihood" in both["niah_likelihood"] and "likelihood" not in both["niah"]
    cfg.eval.likelihood = False
    assert set(eval_commands(cfg, tmp_path / "model", tmp_path / "eval")) == {"mc", "niah"}


def test_blind_baseline_asks_about_another_clip_of_the_same_task():
    samples = open_samples(1001, 7, 8, 32)
    for i, s in enumerate(samples):
        j = mismatched_clip(i, len(samples))
        assert j is not None and j != i
        assert samples[j]["task"] == s["task"]  # also at the end, where the partner is the previous clip
        assert (samples[j]["frames"] != s["frames"]).any()
    assert [mismatched_clip(i, 3) for i in range(3)] == [None] * 3  # three samples: no second clip of a task


@pytest.mark.slow
def test_pipeline_smoke_end_to_end(tmp_path):
    out, ship = tmp_path / "run", tmp_path / "ship"
    cmd = [sys.executable, "-m", "training.pipeline", "--config", str(CONFIGS / "default_model_smoke.yaml"),
           "--out", str(out), "--ship", str(ship)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=2400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])

    # every stage's output
    assert (out / "data" / "instruct.json").is_file() and (out / "data" / "pretrain_list.csv").is_file()
    assert (out / "pretrain" / "encoder" / "config.json").is_file()
    for stage in ("ground", "stage1", "stage2"):
        assert (out / stage / "final" / "config.json").is_file()
        assert (out / stage / "metrics.jsonl").is_file()
    assert (out / "eval" / "mc" / "results.json").is_file() and (out / "eval" / "niah" / "niah.json").is_file()
    # multiple-choice turns are answered with the option's text (mc_reply: option), never a bare letter
    turns = [t for r in json.loads((out / "data" / "instruct.json").read_text()) for t in r["conversations"]]
    mc = [(q["value"], a["value"]) for q, a in zip(turns[::2], turns[1::2]) if "option's letter" in q["value"]]
    assert mc and all(f". {a}\n" in q and a not in "ABCD" for q, a in mc)
    # the text replay: text-only records answered by smollm2, in stage 2's mix only
    replay = json.loads((out / "data" / "text_replay.json").read_text())
    assert replay and all("video" not in r and r["conversations"][1]["value"] for r in replay)
    assert "text_replay.json" in (out / "data" / "stage2_mix.yaml").read_text()
    # the needle records again (needle_repeat: 2), taken from the instruction set
    needles = json.loads((out / "data" / "needle.json").read_text())
    assert needles and all(r["id"].startswith("needle_") and r["num_frames"] == 16 for r in needles)
    assert "{path: needle.json, sampling: 1}" in (out / "data" / "stage2_mix.yaml").read_text()

    # metrics are fractions
    m = json.loads((ship / "metrics.json").read_text())
    values = [m["mc_accuracy"], m["mc_likelihood_accuracy"], m["open_accuracy"], *m["niah_accuracy"].values(),
              *m["niah_likelihood_accuracy"].values()]
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 and math.isfinite(v) for v in values)
    assert isinstance(m["text_ok"], bool)
    # the held-out text checks, asked of the model and of its base LLM (the adapter off)
    assert m["text_n"] == 12 and 0.0 <= m["text_accuracy"] <= 1.0 and 0.0 <= m["text_base_accuracy"] <= 1.0
    text = json.loads((ship / "eval_open_text.json").read_text())["text_samples"]
    assert len(text) == 12 and all(t["reply"] and t["base_reply"] for t in text)
    assert "paris" in text[0]["base_reply"].lower()
    assert 0.0 <= m["open_blind_accuracy"] <= 1.0
    assert summary["metrics"]["mc_accuracy"] == m["mc_accuracy"]

    # model card, curves, size cap, no frozen embedding copies in the adapter
    card = (ship / "MODEL_CARD.md").read_text()
    assert "python -m training.pipeline" in card and "| metric |" in card and "curves.png" in card
    assert "answered with the option's text" in card and "text replay (stage 2 only)" in card
    assert (ship / "curves.png").stat().st_size > 1000
    assert not (ship / "llm_adapter" / "README.md").exists()  # peft's empty template card
    assert sum(p.stat().st_size for p in ship.rglob("*") if p.is_file()) < 30 * 2 ** 20
    # what goes into the repo names no path of the machine that built it
    texts = {p: p.read_text(encoding="utf-8") for p in ship.rglob("*") if p.suffix in (".md", ".json", ".yaml")}
    assert ship / "llm_adapter" / "adapter_config.json" in texts
    assert [p for p, t in texts.items() if str(tmp_path) in t or str(REPO) in t or str(Path.home()) in t] == []
    assert "$OUT/stage2/final" in card

    # a rerun skips every finished stage
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "pretrain: " in again.stderr and "exists, skipping" in again.stderr
    # re-shipped from the finished stages: the card lists the same (shell-quoted) stage commands
    assert (ship / "MODEL_CARD.md").read_text() == card

    # the shipped folder loads and answers
    from videollm.chat import generate_stream
    from videollm.modeling_videollm import load_videollm

    model, processor = load_videollm(ship)
    reply = "".join(generate_stream(model, processor, None, "What is the capital of France?", max_new_tokens=8))
    assert reply.strip()
    # stage 1's word anchor reaches the shipped model, with its word rows
    assert [len(g) for g in model.config.word_anchor] == [8, 6]
    assert model.projector.anchor_values.abs().sum() > 0
    # and the ground stage's stem skip, with the weights stage 2 ended with
    import torch
    from safetensors.torch import load_file

    assert model.config.stem_skip
    final = load_file(str(out / "stage2" / "final" / "model.safetensors"))
    assert torch.equal(model.projector.stem_proj.weight, final["projector.stem_proj.weight"])

    # a rerun from scratch, in another directory, gives the same clips, weights and metrics bit for bit
    out2 = tmp_path / "run2"
    rerun = subprocess.run(cmd[:-4] + ["--out", str(out2), "--ship", "none"], cwd=REPO, capture_output=True,
                           text=True, timeout=2400)
    assert rerun.returncode == 0, rerun.stderr[-3000:]

    def files(root: Path, pattern: str) -> dict:
        return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob(pattern))}

    for pattern in ("*.mp4", "*.safetensors", "text_replay.json"):
        assert files(out, pattern) and files(out2, pattern) == files(out, pattern), pattern
    assert json.loads(rerun.stdout.strip().splitlines()[-1])["metrics"] == summary["metrics"]


def test_short_records_ask_each_question_once():
    import numpy as np

    from training.pipeline import DataSpec, short_conversations
    from videollm.data.synth import make_clip

    clip = make_clip(3, 16, 64, "count")
    spec = DataSpec(records="short", qa_turns=2, caption_fraction=1.0)
    groups = short_conversations(clip.caption, clip.qa, np.random.default_rng(0), spec)
    assert groups["caption"][1]["value"] == clip.caption
    questions = []
    for name, turns in groups.items():
        assert turns[0]["value"].startswith("<video>\n") and sum("<video>" in t["value"] for t in turns) == 1
        assert len(turns) <= 2 * spec.qa_turns and [t["from"] for t in turns[:2]] == ["human", "gpt"]
        if name != "caption":
            questions += [t["value"].replace("<video>\n", "").split("\n")[0] for t in turns[::2]]
    assert len(questions) == len(set(questions))  # the open and MC forms never share a record
    assert not any(q.startswith("When ") for q in questions)
    expected = {q["question"] for q in clip.qa if not q["question"].startswith("When ")}
    assert set(questions) == expected


@pytest.mark.parametrize("mc_reply", ["letter", "option"])
def test_short_records_answer_multiple_choice_as_configured(mc_reply):
    import numpy as np

    from eval.answer import extract_letter
    from training.pipeline import DataSpec, short_conversations
    from videollm.data.synth import make_clip

    clip = make_clip(3, 16, 64, "count")
    by_prompt = {}
    for q in clip.qa:
        if q["type"] == "mc":
            by_prompt[q["question"]] = q
    groups = short_conversations(clip.caption, clip.qa, np.random.default_rng(1),
                                 DataSpec(records="short", qa_turns=2, mc_reply=mc_reply))
    replies = 0
    for turns in groups.values():
        for human, gpt in zip(turns[::2], turns[1::2]):
            lines = human["value"].replace("<video>\n", "").split("\n")
            if len(lines) == 1:
                continue  # an open question
            q = by_prompt[lines[0]]
            expected = q["answer_letter"] if mc_reply == "letter" else q["answer"]
            assert gpt["value"] == expected
            assert extract_letter(gpt["value"], q["options"]) == q["answer_letter"]
            replies += 1
    assert replies > 0


def test_option_replies_need_short_records(tmp_path):
    from training.pipeline import DataSpec, PipelineConfig, stage_data

    for data, match in [(DataSpec(records="llava", mc_reply="option"), "records"),
                        (DataSpec(records="short", mc_reply="text"), "mc_reply")]:
        with pytest.raises(UserError, match=match):
            stage_data(PipelineConfig(data=data), tmp_path)


def test_missed_targets():
    from training.pipeline import missed_targets

    good = {"mc_accuracy": 0.9, "open_accuracy": 0.75, "niah_accuracy": {"64": 0.8, "256": 0.7},
            "text_ok": True, "text_reply": "Paris"}
    assert missed_targets(good) == []
    bad = {**good, "niah_accuracy": {"64": 0.8, "256": 0.5}, "text_ok": False}
    assert len(missed_targets(bad)) == 2


def test_model_card_describes_the_none_logit():
    from training.pipeline import model_card

    cfg = load_config(PipelineConfig, CONFIGS / "default_model.yaml")
    metrics = {"niah_accuracy": {"64": 1.0}, "niah_depths": [0.0], "niah_needles": 8, "mc_n": 200,
               "mc_accuracy": 0.5, "open_n": 180, "open_accuracy": 0.5, "text_ok": True,
               "text_reply": "Paris.", "open_per_category": {"color": 0.5}, "mc_per_category": {"color": 0.5}}

    def card():
        return model_card(cfg, "cmd", [], metrics, {}, 10)

    line = next(x for x in card().splitlines() if x.startswith("- projector:"))
    assert f'"none" class at logit {cfg.ground.overrides["none_logit"]:g}' in line
    cfg.ground.overrides["none_logit"] = 0
    line = next(x for x in card().splitlines() if x.startswith("- projector:"))
    assert '"none"' not in line and "word_anchor" in line
    # likelihood rows only when eval scored by likelihood (eval.likelihood)
    assert "option likelihood" not in card()
    metrics.update(mc_likelihood_accuracy=0.6, niah_likelihood_accuracy={"64": 0.9})
    assert "| the same questions scored by option likelihood (no letter to produce) | 60.0% |" in card()
