"""The default-model pipeline end to end through its real CLI, at toy budget
(training/configs/default_model_smoke.yaml): data → pretrain → ground → stage 1 → stage 2 → eval → ship.

Slow (~8–14 min on 2 cores: the pipeline runs twice, to check that a rerun from scratch is bit-exact;
far more under heavy load: six stage processes each load smollm2), hence ``-m slow``. The parts
that need no training (configs, commands, the data mix, the model card, acceptance) run fast."""

import json
import math
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from encoder.errors import UserError
from training.config import load_config, save_config
from training.pipeline import (DataSpec, PipelineConfig, Targets, config_path, eval_commands, main, missed_targets,
                               model_card, shown_command, stage_commands, stage_configs, stage_data, write_stage2_mix)
from videollm.chat import generate_stream
from videollm.data.instruct import load_records
from videollm.modeling_videollm import DEFAULT_WEIGHTS, load_videollm

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "training" / "configs"


@pytest.mark.parametrize("name", ["default_model.yaml", "default_model_smoke.yaml"])
def test_configs_load_and_build_commands(name, tmp_path):
    cfg = load_config(PipelineConfig, CONFIGS / name)
    configs = stage_configs(cfg, tmp_path)
    cmds = stage_commands(cfg, tmp_path, configs)
    assert list(cmds) == ["replay", "pretrain", "ground", "stage1", "stage2"]  # the order they run in
    for stage in ("pretrain", "ground", "stage1", "stage2"):  # each recipe reads its resolved YAML
        assert cmds[stage][-2:] == ["--config", str(config_path(tmp_path, stage))]
        assert configs[stage].seed == cfg.seed and configs[stage].resume
        assert configs[stage].output_dir == str(tmp_path / stage)
    # stage 2 reads the mix of the instruction set and the text replay; stage 1 the set alone
    assert configs["stage2"].data.source == str(tmp_path / "data" / "stage2_mix.yaml")
    assert configs["stage1"].data.source == str(tmp_path / "data" / "instruct.json")
    assert configs["stage2"].init_from == str(tmp_path / "stage1" / "final")
    assert configs["stage1"].init_from == str(tmp_path / "ground" / "final")
    assert configs["stage2"].steps == cfg.stage2.overrides["steps"]  # the file's overrides over the recipe's YAML
    # the anchor stage 1 adds reads tokens with grounding's "none" class; the shipped encoder is bidirectional
    assert configs["stage1"].anchor_none_logit == configs["ground"].none_logit == cfg.ground.overrides.get("none_logit", 0)
    assert configs["pretrain"].objective.frame_causal is False
    assert cmds["replay"][cmds["replay"].index("--n") + 1] == str(cfg.data.text_replay)
    assert "--system-prompt" not in cmds["replay"]  # both stage 2s render an empty system turn, the CLI's default
    cfg.ground = None  # without grounding, stage 1 starts from the pretrained encoder
    configs = stage_configs(cfg, tmp_path)
    assert list(stage_commands(cfg, tmp_path, configs)) == ["replay", "pretrain", "stage1", "stage2"]
    assert configs["stage1"].init_from is None
    cfg.data.text_replay, cfg.data.needle_repeat = 0, 2  # no replay stage; stage 2 reads the mix for the needles
    configs = stage_configs(cfg, tmp_path)
    assert list(stage_commands(cfg, tmp_path, configs)) == ["pretrain", "stage1", "stage2"]
    assert configs["stage2"].data.source == str(tmp_path / "data" / "stage2_mix.yaml")
    cfg.data.needle_repeat = 1
    assert stage_configs(cfg, tmp_path)["stage2"].data.source == str(tmp_path / "data" / "instruct.json")


def test_resolved_stage_configs_read_back_as_the_same_config(tmp_path):
    """What a stage runs with is its YAML in configs/: written out in full, it reads back equal."""
    cfg = load_config(PipelineConfig, CONFIGS / "default_model.yaml")
    for name, config in stage_configs(cfg, tmp_path).items():
        save_config(config, config_path(tmp_path, name))
        assert load_config(type(config), config_path(tmp_path, name)) == config, name


def test_stage2_mix_repeats_the_needles_and_the_text_replay(tmp_path):
    cfg = load_config(PipelineConfig, CONFIGS / "default_model.yaml")
    assert stage_configs(cfg, tmp_path)["stage2"].data.system_prompt == ""
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


def test_the_data_stage_writes_real_footage_records(tmp_path):
    """data.real_clips / concept_records: camera clips of the real training sources, named by the
    concept stem's classifier (or hedged), and made-up-concept records, in the instruction set."""
    cfg = load_config(PipelineConfig, CONFIGS / "default_model_smoke.yaml",
                      ["data.real_clips=2", "data.concept_records=2", "data.real_size=64"])
    stage_data(cfg, tmp_path)
    records = load_records(tmp_path / "data" / "instruct.json")
    real = [r for r in records if r.id.startswith("real_")]
    made_up = [r for r in records if r.id.startswith("concepts_")]
    assert len(real) == 2 and len(made_up) == 2 and all(r.concepts for r in made_up)
    assert all(any(t["value"] == "I don't see any shapes in this video." for t in r.conversations) for r in real)
    with pytest.raises(UserError, match="concept_records .* need data.real_clips"):
        stage_data(load_config(PipelineConfig, CONFIGS / "default_model_smoke.yaml", ["data.concept_records=2"]),
                   tmp_path / "other")


def test_needle_repeat_below_one_is_refused(tmp_path):
    cfg = load_config(PipelineConfig, CONFIGS / "default_model_smoke.yaml")
    cfg.data.needle_repeat = 0.5
    with pytest.raises(UserError, match="needle_repeat must be a number ≥ 1"):
        stage_data(cfg, tmp_path)


def test_option_replies_need_short_records(tmp_path):
    for data, match in [(DataSpec(records="llava", mc_reply="option"), "records"),
                        (DataSpec(records="short", mc_reply="text"), "mc_reply")]:
        with pytest.raises(UserError, match=match):
            stage_data(PipelineConfig(data=data), tmp_path)


def test_shown_command_pastes_back_into_the_same_arguments():
    """The log and the model card show each stage's command; pasted into a shell it must give the
    stage the same arguments (an empty system prompt must stay an argument)."""
    cmd = [sys.executable, "-m", "videollm.data.text_replay", "--system-prompt", "", "--out", "/tmp/my out/x.json"]
    shown = shown_command(cmd)
    assert shown.startswith("python -m videollm.data.text_replay ")
    assert shlex.split(shown) == ["python", *cmd[1:]]


def test_eval_commands_score_by_likelihood_only_when_asked(tmp_path):
    cfg = load_config(PipelineConfig, CONFIGS / "default_model_smoke.yaml")
    both = eval_commands(cfg, tmp_path / "model", tmp_path / "eval")
    assert set(both) == {"mc", "mc_likelihood", "niah", "niah_likelihood", "open_text"}
    assert "likelihood" in both["niah_likelihood"] and "likelihood" not in both["niah"]
    assert both["open_text"][2] == "eval.open_ended"
    cfg.eval.likelihood = False
    assert set(eval_commands(cfg, tmp_path / "model", tmp_path / "eval")) == {"mc", "niah", "open_text"}
    cfg.data.real_clips = 8  # trained on real footage: our held-out real sources are evaluated too
    assert set(eval_commands(cfg, tmp_path / "model", tmp_path / "eval")) == {"mc", "niah", "open_text", "real"}


def test_missed_targets():
    good = {"mc_accuracy": 0.9, "open_accuracy": 0.75, "niah_accuracy": {"64": 0.8, "256": 0.7},
            "text_ok": True, "text_reply": "Paris"}
    assert missed_targets(good, Targets()) == []
    bad = {**good, "niah_accuracy": {"64": 0.8, "256": 0.5}, "text_ok": False}
    assert len(missed_targets(bad, Targets())) == 2
    assert missed_targets(good, Targets(mc_accuracy=0.95)) == ["mc_accuracy 0.900 < 0.95"]
    # honesty on our held-out real footage: no reply with synthetic-world words, and it must be measured
    real = Targets(real_no_synthetic=True)
    assert missed_targets(good, real) == ["real_no_synthetic needs the real-footage evaluation (data.real_clips > 0)"]
    assert missed_targets({**good, "real_with_synthetic_words": 0, "real_n": 8}, real) == []
    assert missed_targets({**good, "real_with_synthetic_words": 1, "real_n": 8}, real) == [
        "1 of 8 held-out real clips got replies with synthetic-world words (eval.real_footage)"]


def test_model_card_reads_the_model_config_and_the_metrics():
    cfg = load_config(PipelineConfig, CONFIGS / "default_model.yaml")
    model_config = json.loads((DEFAULT_WEIGHTS / "config.json").read_text())
    metrics = {"niah_accuracy": {"64": 1.0}, "niah_depths": [0.0], "niah_needles": 8, "mc_n": 200,
               "mc_accuracy": 0.5, "open_n": 180, "open_accuracy": 0.5, "text_ok": True,
               "text_reply": "Paris.", "open_per_category": {"color": 0.5}, "mc_per_category": {"color": 0.5},
               "timings_s": {"stage2": 12.5}}

    def card():
        return model_card(model_config, metrics, cfg, "python -m training.pipeline", ["cmd1", "cmd2"], 10)

    line = next(x for x in card().splitlines() if x.startswith("- projector:"))
    assert '"none" class at logit 4' in line and "colors, shapes, motions" in line
    model_config["projector_config"]["none_logit"] = 0.0
    line = next(x for x in card().splitlines() if x.startswith("- projector:"))
    assert '"none"' not in line and "word_anchor" in line
    # how tokens are made: 2×2 pooling, or a token per patch and the k that name an object most
    model_config["projector_config"].update(spatial_pool=2, select_tokens=None)
    line = next(x for x in card().splitlines() if x.startswith("- projector:"))
    assert line.startswith("- projector: 2×2 average pooling per frame") and "select_tokens" not in line
    model_config["projector_config"].update(spatial_pool=1, select_tokens=4)
    line = next(x for x in card().splitlines() if x.startswith("- projector: a token per patch"))
    assert "the 4 that name an object most reach the LLM (`select_tokens`)" in line
    assert "motion stem" in next(x for x in card().splitlines() if x.startswith("- encoder:"))
    # what the model knows (the config's `scope`, set from the pipeline's `scope`), under its own heading
    assert f"## What it knows\n\n{cfg.scope}\n" in card() and "synthetic" in cfg.scope and "--model" in cfg.scope
    assert model_config["scope"] == cfg.scope  # the shipped config says what the pipeline file says
    del model_config["scope"]
    assert "## What it knows\n\nNot stated.\n" in card()
    # the concept stem and the real footage are described when the model and the data have them
    model_config["vision_config"]["concept_frames"] = 0
    model_config["projector_config"].pop("concepts", None)
    cfg.data.real_clips = cfg.data.concept_records = 0
    assert "concept stem" not in card() and "real footage" not in card()
    model_config["vision_config"].update(concept_frames=4, concept_size=128)
    model_config["projector_config"]["concepts"] = ["tench"] * 1000
    cfg.data.real_clips, cfg.data.concept_records = 300, 200
    assert "a frozen ImageNet classifier (EfficientNet-Lite0) reads 4 frames per clip at 128 px" in card()
    assert "the 1000 ImageNet class names its concept logits point at" in card()
    assert "- real footage: 300 camera clips (128 px)" in card() and "200 records with made-up concepts" in card()
    assert "held out: bikes, china.jpg" in card()
    assert "cmd1\ncmd2" in card() and "- stage2: 12.5" in card() and "(10 records)" in card()
    assert "| multiple-choice QA, held-out synthqa seed 1001 (n=200) | 50.0% | ≥ 80% |" in card()
    # likelihood rows only when eval scored by likelihood (eval.likelihood)
    assert "option likelihood" not in card()
    metrics.update(mc_likelihood_accuracy=0.6, niah_likelihood_accuracy={"64": 0.9})
    assert "| the same questions scored by option likelihood (no letter to produce) | 60.0% |" in card()


def test_encoder_gain_grounds_an_untrained_encoder_too(tmp_path):
    """encoder_gain: after grounding, the same grounding from the untrained encoder (the pretrained
    one's architecture), and grounding's held-out accuracies of both with the gain; --until stops
    there (no stage 1, no eval)."""
    out = tmp_path / "run"
    argv = ["--config", str(CONFIGS / "default_model_smoke.yaml"), "--out", str(out), "--until", "ground_scratch",
            "encoder_gain=true", "data.text_replay=0", "ground.overrides.stem_steps=0"]
    assert main(argv) == 0
    configs = stage_configs(load_config(PipelineConfig, CONFIGS / "default_model_smoke.yaml", ["encoder_gain=true"]), out)
    assert configs["ground_scratch"].encoder == str(out / "scratch" / "encoder")
    assert {k: v for k, v in vars(configs["ground_scratch"]).items() if k not in ("encoder", "output_dir")} == \
        {k: v for k, v in vars(configs["ground"]).items() if k not in ("encoder", "output_dir")}
    scratch = load_file(out / "scratch" / "encoder" / "model.safetensors")
    trained = load_file(out / "pretrain" / "encoder" / "model.safetensors")
    assert scratch.keys() == trained.keys() and any(not torch.equal(scratch[k], trained[k]) for k in scratch)
    gain = json.loads((out / "encoder_gain.json").read_text())
    assert "acc_shape" in gain and all(0 <= g["pretrained"] <= 1 and 0 <= g["scratch"] <= 1 for g in gain.values())
    assert all(g["gain"] == round(100 * (g["pretrained"] - g["scratch"]), 1) for g in gain.values())
    assert (out / "ground_scratch" / "final" / "config.json").is_file() and not (out / "stage1").exists()
    with pytest.raises(UserError, match="encoder_gain compares two groundings"):
        stage_configs(load_config(PipelineConfig, CONFIGS / "default_model_smoke.yaml",
                                  ["encoder_gain=true", "ground=null"]), out)
    with pytest.raises(UserError, match="--until eval: this pipeline's stages are"):
        main([*argv, "--until", "eval"])


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
    # each training stage ran with its resolved YAML, shipped with the model
    for stage in ("pretrain", "ground", "stage1", "stage2"):
        assert (out / "configs" / f"{stage}.yaml").is_file() and (ship / "configs" / f"{stage}.yaml").is_file()
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

    # model card, curves, size cap (no frozen embedding copies in the adapter)
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
    model, processor = load_videollm(ship)
    reply = "".join(generate_stream(model, processor, None, "What is the capital of France?", max_new_tokens=8))
    assert reply.strip()
    # stage 1's word anchor reaches the shipped model, with its word rows
    assert model.config.projector_type == "word_anchor"
    assert [len(g) for g in model.config.projector_config.words] == [8, 6]
    assert model.projector.anchor_values.abs().sum() > 0
    # and the ground stage's stem skip, with the weights stage 2 ended with
    assert model.config.projector_config.stem_skip
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


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and "--ship" in capsys.readouterr().out
