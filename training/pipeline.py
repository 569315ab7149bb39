"""The embedded default model, end to end: one command from nothing to shipped weights.

    python -m training.pipeline --config training/configs/default_model.yaml [--out DIR] [--ship DIR] [key=value …]
    videollm train-default --config training/configs/default_model.yaml

Orchestration only: stage data → stage configs and commands → run → eval → ship. Each stage writes
one output and is skipped when that output exists, so a rerun resumes (the training stages also
resume from their own checkpoints). Stages run as subprocesses of their real CLIs, as a user would
type them; each training stage reads a resolved YAML, ``configs/<stage>.yaml`` in the run folder:
its recipe's YAML with this file's overrides and the run's paths, every key written out.

1. ``data``      `videollm.data`: synthetic clips of the three tasks (`write_synth_dataset`) and
                 long needle clips (`videollm.data.haystack.write_needle_clips`) →
                 ``data/instruct.json``; the pretraining list (every synthetic clip + the bundled
                 real clips) → ``data/pretrain_list.csv``.
   ``replay``    (``data.text_replay``) `videollm.data.text_replay` → ``data/text_replay.json``;
                 stage 2 reads it with the instruction set through ``data/stage2_mix.yaml``.
2. ``pretrain``  `training.pretrain` → ``pretrain/encoder``.
   ``ground``    (optional) `training.ground` → ``ground/final``, which stage 1 starts from.
   ``ground_scratch`` (``encoder_gain``) the same grounding from the untrained encoder (the
                 pretrained one's architecture and seed, ``scratch/encoder``) → ``ground_scratch/final``;
                 ``encoder_gain`` in the metrics: grounding's held-out accuracies of both and the gain.
3. ``stage1``    `training.finetune` stage 1 (alignment) → ``stage1/final``.
4. ``stage2``    `training.finetune` stage 2 (LoRA) → ``stage2/final``.
5. ``eval``      held-out multiple-choice QA (`eval.qa`, synthqa), V-NIAH (`eval.niah`), open-ended
                 and text-only answers (`eval.open_ended`); with ``eval.likelihood`` MC and V-NIAH
                 again by option likelihood (reported, no target) → ``eval/metrics.json``.
6. ``ship``      ``stage2/final`` + ``configs/`` + ``MODEL_CARD.md`` (``model_card.md.tmpl`` filled
                 from the model's config.json, metrics.json and this config) + ``curves.png`` +
                 ``metrics.json`` + ``eval_open_text.json`` → ``--ship``, replaced atomically; with
                 ``require_targets`` only when the metrics meet ``targets``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from accelerate.utils import set_seed

from encoder.concepts import clip_concepts
from encoder.errors import UserError, run_cli
from encoder.files import atomic_dir, atomic_write_text
from encoder.teacher import imagenet_class_names
from encoder.video_io import SAMPLE_CLIPS, sample_clip_path
from training.config import load_config, save_config, to_dict
from training.finetune import FinetuneConfig
from training.ground import WORD_GROUPS, GroundConfig
from training.pretrain import PretrainConfig, build_model
from videollm.data.haystack import write_needle_clips
from videollm.data.real import HELDOUT as REAL_HELDOUT
from videollm.data.real import TRAIN as REAL_TRAIN
from videollm.data.real import write_real_clips
from videollm.data.synth import TASKS, conversations, short_conversations, write_synth_dataset
from videollm.data.text_replay import TEXT_CHECKS

logger = logging.getLogger("training.pipeline")

REPO = Path(__file__).resolve().parents[1]
CARD_TEMPLATE = Path(__file__).with_name("model_card.md.tmpl")
MAX_SHIP_BYTES = 30 * 1024 * 1024


@dataclass
class DataSpec:
    size: int = 64  # frame side of every written clip
    clip_frames: int = 16  # frames of a short synthetic clip
    clips_per_task: int = 200  # short clips of each task (motion, order, count)
    needle_clips: int = 200  # long haystack clips with a needle
    haystack_frames: int = 64
    needle_span: int = 5  # needle frames; > haystack_frames / num_frames so uniform sampling sees it
    # "mixed": haystacks of real and synthetic segments; "real": the bundled real clips only, as
    # V-NIAH's (synthetic segments hold shapes too, which a long clip seen whole would show).
    needle_haystack: str = "mixed"
    # Frames the model sees of a needle clip (a record field, e.g. haystack_frames: every frame, as
    # V-NIAH feeds them); None: the training default (the recipe's data.num_frames).
    needle_num_frames: int | None = None
    real_repeats: int = 8  # each bundled real clip is listed this many times for pretraining
    fps: float = 8.0
    # Instruction records: "llava" (`synth.conversations`: caption, open, MC conversations per clip)
    # or "short" (`synth.short_conversations`: each question once, `qa_turns` per record, a caption
    # for `caption_fraction` of the clips; fewer tokens per answer, which on a CPU is the budget).
    records: str = "llava"
    qa_turns: int = 3
    caption_fraction: float = 0.2
    mc_reply: str = "letter"  # "short" records' MC answer: "letter" or "option" (its text; see synth)
    # Text-only prompts answered by the base LLM itself (`videollm.data.text_replay`), mixed into
    # stage 2 `text_replay_repeat` times each, so its short video answers do not become the reply
    # to every question; 0: none.
    text_replay: int = 0
    text_replay_repeat: float = 1.0
    text_replay_tokens: int = 64  # the longest reply generated (a cut reply keeps its full sentences)
    # Stage 2 sees each needle record this many times (≥ 1; the extra copies through
    # ``data/needle.json`` in its mix): they alone teach finding one frame among many.
    needle_repeat: float = 1.0
    # Real footage (a model with a concept stem): camera clips of our training split of real sources
    # (`videollm.data.real.write_real_clips`) at `real_size` px, asked what they show (the concept
    # stem's classifier names it, or the reply hedges below `real_confident`) and about shapes (none);
    # `concept_records` more over those clips with made-up concepts of random classes.
    real_clips: int = 0
    real_size: int = 128
    real_confident: float = 0.25
    concept_records: int = 0


@dataclass
class StageSpec:
    config: str  # the recipe's YAML (repo-relative)
    overrides: dict[str, Any] = field(default_factory=dict)  # recipe keys (nested or dotted) over that YAML


@dataclass
class EvalSpec:
    qa_seed: int = 1001  # held-out: training clips use small consecutive seeds
    mc_n: int = 120
    open_n: int = 120
    frames: int = 16
    niah_frames: list[int] = field(default_factory=lambda: [64, 128, 256])
    niah_depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    niah_needles: int = 4
    niah_seed: int = 5000
    max_new_tokens: int = 12
    # Also score MC and V-NIAH by option likelihood (reported, no target): what the model knows
    # apart from producing the letter.
    likelihood: bool = True


@dataclass
class Targets:
    """What the shipped model must reach on the held-out evaluation (fractions)."""
    mc_accuracy: float = 0.80
    open_accuracy: float = 0.70
    niah_accuracy: float = 0.70  # at every haystack length
    text_ok: bool = True  # the first text check (`TEXT_CHECKS`: "What is the capital of France?") is answered
    real_no_synthetic: bool = False  # no reply on our held-out real footage names the synthetic world (needs data.real_clips)


@dataclass
class PipelineConfig:
    seed: int = 0
    out: str = "runs/default_model"
    ship: str | None = "videollm/weights/default"  # null: do not ship
    # Ship only when the metrics meet `targets`; false ships whatever came out (toy runs).
    require_targets: bool = False
    targets: Targets = field(default_factory=Targets)
    data: DataSpec = field(default_factory=DataSpec)
    pretrain: StageSpec = field(default_factory=lambda: StageSpec("training/configs/pretrain_nano_synth.yaml"))
    ground: StageSpec | None = None  # e.g. training/configs/ground_nano.yaml; null: skipped
    stage1: StageSpec = field(default_factory=lambda: StageSpec("training/configs/finetune_stage1.yaml"))
    stage2: StageSpec = field(default_factory=lambda: StageSpec("training/configs/finetune_stage2.yaml"))
    eval: EvalSpec = field(default_factory=EvalSpec)
    # What the shipped model was trained on and can and cannot recognise (its config's `scope`: the
    # chat and the demo show it; the model card's "What it knows").
    scope: str | None = None
    # Also ground an untrained encoder the same way: what pretraining pays on grounding's held-out
    # accuracies (metrics `encoder_gain`). Needs `ground`.
    encoder_gain: bool = False


# The training stages: their recipe module and config class, in the order they run.
RECIPES = {"pretrain": ("training.pretrain", PretrainConfig), "ground": ("training.ground", GroundConfig),
           "ground_scratch": ("training.ground", GroundConfig), "stage1": ("training.finetune", FinetuneConfig), "stage2": ("training.finetune", FinetuneConfig)}


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1) + "\n")


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def shown_command(cmd: list[str]) -> str:
    """The command as the log and the model card show it: ``python -m …``, quoted for a POSIX shell,
    so pasting it runs the same stage (an empty ``--system-prompt ""`` keeps its quotes)."""
    return shlex.join(["python" if c == sys.executable else c for c in cmd])


def _run(cmd: list[str], log: list[str]) -> None:
    """Run a stage's CLI from the repo root; a failure stops the pipeline naming the command."""
    shown = shown_command(cmd)
    log.append(shown)
    logger.info("$ %s", shown)
    rc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
    if rc != 0:
        raise UserError(f"stage command failed (exit {rc}): {shown}; fix and rerun the pipeline "
                        "(finished stages are skipped)")


def check_data_spec(spec: DataSpec) -> None:
    for key, (a, b) in {"needle_haystack": ("mixed", "real"), "records": ("llava", "short"),
                        "mc_reply": ("letter", "option")}.items():
        if getattr(spec, key) not in (a, b):
            raise UserError(f"data.{key} must be '{a}' or '{b}'; got '{getattr(spec, key)}'")
    if spec.mc_reply == "option" and spec.records != "short":
        raise UserError("data.mc_reply: 'option' needs data.records: 'short' (the 'llava' layout answers "
                        "with the letter, as the generator writes it)")
    if spec.needle_num_frames is not None and not 1 <= spec.needle_num_frames <= spec.haystack_frames:
        raise UserError(f"data.needle_num_frames must be in [1, haystack_frames={spec.haystack_frames}]; "
                        f"got {spec.needle_num_frames}")
    if not spec.needle_repeat >= 1:
        raise UserError(f"data.needle_repeat must be a number ≥ 1 (how many times stage 2 sees each needle "
                        f"record); got {spec.needle_repeat}")
    if spec.concept_records and not spec.real_clips:
        raise UserError("data.concept_records give made-up concepts over the real clips: they need data.real_clips")
    if not 0 < spec.real_confident <= 1:
        raise UserError(f"data.real_confident must be in (0, 1]; got {spec.real_confident}")


def stage_data(cfg: PipelineConfig, out: Path) -> Path:
    """Instruction set + pretraining list in ``out/data``; ``instruct.json`` is written last."""
    data, spec = out / "data", cfg.data
    if (data / "instruct.json").is_file():
        logger.info("data: %s exists, skipping", data / "instruct.json")
        return data
    check_data_spec(spec)

    def layout(caption: str, qa: list[dict], rng: np.random.Generator) -> dict[str, list[dict]]:
        return short_conversations(caption, qa, rng, qa_turns=spec.qa_turns, caption_fraction=spec.caption_fraction,
                                   mc_reply=spec.mc_reply)

    records, pretrain_lines = [], []
    for k, task in enumerate(TASKS):
        # Seeds of task k: seed + k·10⁴ …; the held-out QA draws 32-bit seeds from SeedSequence.
        write_synth_dataset(data / task, spec.clips_per_task, seed=cfg.seed + k * 10 ** 4,
                            num_frames=spec.clip_frames, size=spec.size, task=task, fps=spec.fps)
        if spec.records == "short":
            rng = np.random.default_rng([cfg.seed, 11, k])
            for line in (data / task / "annotations.jsonl").read_text().splitlines():
                a = json.loads(line)
                records += [{"id": f"{a['id']}_{kind}", "video": f"{task}/{a['video']}", "conversations": turns}
                            for kind, turns in layout(a["caption"], a["qa"], rng).items()]
        else:
            records += [{**r, "video": f"{task}/{r['video']}"}
                        for r in json.loads((data / task / "instruct.json").read_text())]
        pretrain_lines += [f"{task}/{line.split(',')[0]}" for line in
                           (data / task / "index.csv").read_text().splitlines() if line]

    def needle_conversations(needle, rng):  # the needle's questions; its caption would name only the needle
        if spec.records == "short":
            return layout("", needle.qa, rng)
        return {k: v for k, v in conversations(needle).items() if k != "caption"}

    records += write_needle_clips(data, spec.needle_clips, cfg.seed, size=spec.size,
                                  haystack_frames=spec.haystack_frames, needle_span=spec.needle_span,
                                  real_only=spec.needle_haystack == "real", conversations_of=needle_conversations,
                                  num_frames=spec.needle_num_frames, fps=spec.fps)
    if spec.real_clips:
        records += write_real_clips(data, spec.real_clips, cfg.seed, num_frames=spec.clip_frames,
                                    size=spec.real_size, names=imagenet_class_names(),
                                    classify=lambda frames: clip_concepts(frames, spec.real_size).numpy(),
                                    confident=spec.real_confident, made_up=spec.concept_records, fps=spec.fps)
    pretrain_lines += [str(sample_clip_path(name)) for name in SAMPLE_CLIPS] * spec.real_repeats
    (data / "pretrain_list.csv").write_text("".join(line + "\n" for line in pretrain_lines))
    order = np.random.default_rng(cfg.seed).permutation(len(records))
    _write_json(data / "instruct.json", [records[i] for i in order])
    logger.info("data: %d instruction records, %d pretraining videos", len(records), len(pretrain_lines))
    return data


def uses_mix(cfg: PipelineConfig) -> bool:
    """Whether stage 2 reads ``data/stage2_mix.yaml`` rather than the instruction set alone."""
    return bool(cfg.data.text_replay) or cfg.data.needle_repeat != 1


def write_stage2_mix(cfg: PipelineConfig, data: Path) -> None:
    """Stage 2's data mix: the instruction set, `needle_repeat` − 1 more copies of its needle records
    (``needle.json``, taken from ``instruct.json`` by their ids) and `text_replay_repeat` copies of
    the text replay."""
    text = f"seed: {cfg.seed}\ndatasets:\n  - {{path: instruct.json}}\n"
    if cfg.data.needle_repeat != 1:
        records = json.loads((data / "instruct.json").read_text())
        needles = [r for r in records if r["id"].startswith("needle_")]  # write_needle_clips' ids
        if not (data / "needle.json").is_file() or json.loads((data / "needle.json").read_text()) != needles:
            _write_json(data / "needle.json", needles)
        text += f"  - {{path: needle.json, sampling: {cfg.data.needle_repeat - 1:g}}}\n"
    if cfg.data.text_replay:
        text += f"  - {{path: text_replay.json, sampling: {cfg.data.text_replay_repeat:g}}}\n"
    path = data / "stage2_mix.yaml"
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)


def stage_configs(cfg: PipelineConfig, out: Path) -> dict[str, Any]:
    """The resolved config of each training stage (recipe YAML < the stage's overrides < the run's
    seed, paths and stage links), in the order they run."""
    data = out / "data"
    encoder = str(out / "pretrain" / "encoder")
    run = {"pretrain": {"data.source": str(data / "pretrain_list.csv")},
           "ground": {"llm": "smollm2", "encoder": encoder},
           "stage1": {"stage": 1, "llm": "smollm2", "encoder": encoder, "data.source": str(data / "instruct.json")},
           "stage2": {"stage": 2, "llm": "smollm2", "init_from": str(out / "stage1" / "final"),
                      "data.source": str(data / ("stage2_mix.yaml" if uses_mix(cfg) else "instruct.json"))}}
    if cfg.ground is not None:
        run["stage1"]["init_from"] = str(out / "ground" / "final")
    if cfg.encoder_gain:
        if cfg.ground is None:
            raise UserError("encoder_gain compares two groundings: it needs a `ground` stage")
        run["ground_scratch"] = {**run["ground"], "encoder": str(out / "scratch" / "encoder")}
    configs = {}
    for name, (_, cls) in RECIPES.items():
        spec = getattr(cfg, name.removesuffix("_scratch"), None)
        if spec is None or name not in run:
            continue
        keys = {**spec.overrides, **run[name], "seed": cfg.seed, "output_dir": str(out / name), "resume": True}
        given = _flatten(spec.overrides)
        if name == "pretrain" and given.get("objective.teacher") and "objective.teacher_cache" not in given:
            keys["objective.teacher_cache"] = str(out / "teacher_cache")  # the teacher's targets computed once
        if name == "stage1" and "ground" in configs and "anchor_none_logit" not in _flatten(spec.overrides):
            # the anchor reads tokens with the "none" class grounding trained them with
            keys["anchor_none_logit"] = configs["ground"].none_logit
        # {"optim.lr": 1e-3, "lora": {"r": 8}} → ["optim.lr=0.001", "lora.r=8"] (YAML-parsable values)
        kv = [f"{k}={json.dumps(v)}" for k, v in _flatten(keys).items()]
        configs[name] = load_config(cls, REPO / spec.config, kv)
    return configs


def config_path(out: Path, name: str) -> Path:
    return out / "configs" / f"{name}.yaml"


def stage_commands(cfg: PipelineConfig, out: Path, configs: dict[str, Any]) -> dict[str, list[str]]:
    """The command of each stage before the evaluation, in the order they run: [replay,] pretrain,
    [ground,] stage1, stage2. A training stage reads its resolved YAML (`config_path`)."""
    py = [sys.executable, "-m"]
    commands = {}
    if cfg.data.text_replay:  # first: it is data, and the base LLM's replies do not depend on training
        system = configs["stage2"].data.system_prompt  # the system turn stage 2 renders
        commands["replay"] = py + [
            "videollm.data.text_replay", "--llm", "smollm2", "--n", str(cfg.data.text_replay), "--seed", str(cfg.seed),
            "--max-new-tokens", str(cfg.data.text_replay_tokens), "--out", str(out / "data" / "text_replay.json"),
            *(["--default-system"] if system is None else ["--system-prompt", system] if system else [])]
    for name in configs:
        commands[name] = py + [RECIPES[name][0], "--config", str(config_path(out, name))]
    return commands


def write_scratch_encoder(pretrain: PretrainConfig, directory: Path) -> None:
    """The encoder pretraining starts from (its architecture, seeded as the run seeds it), untrained."""
    set_seed(pretrain.seed)
    with atomic_dir(directory) as tmp:
        build_model(pretrain).encoder.save_pretrained(tmp)


def run_training(cfg: PipelineConfig, out: Path, timings: dict, log: list[str], until: str | None = None) -> None:
    """The training stages in order, each skipped when its output exists; `until`: stop after that one."""
    configs = stage_configs(cfg, out)
    commands = stage_commands(cfg, out, configs)
    if until is not None and until not in commands:
        raise UserError(f"--until {until}: this pipeline's stages are {', '.join(commands)}")
    outputs = {"replay": out / "data" / "text_replay.json", "pretrain": out / "pretrain" / "DONE",
               **{name: out / name / "final" for name in ("ground", "ground_scratch", "stage1", "stage2")}}
    if uses_mix(cfg):
        write_stage2_mix(cfg, out / "data")
    for name, cmd in commands.items():
        if name == "ground_scratch" and not (out / "scratch" / "encoder").is_dir():
            write_scratch_encoder(configs["pretrain"], out / "scratch" / "encoder")
        if name in configs and (not outputs[name].exists() or not config_path(out, name).is_file()):
            config_path(out, name).parent.mkdir(parents=True, exist_ok=True)
            save_config(configs[name], config_path(out, name))  # a finished stage keeps the one it ran with
        if outputs[name].exists():
            logger.info("%s: %s exists, skipping", name, outputs[name])
            log.append(shown_command(cmd))
            continue
        t0 = time.perf_counter()
        try:
            _run(cmd, log)
        finally:  # a failed or Ctrl-C'd stage's time counts too: the rerun adds to it
            timings[name] = round(timings.get(name, 0.0) + time.perf_counter() - t0, 1)
            _write_json(out / "timings.json", timings)
        if name == "pretrain":  # the encoder dir is not written atomically; the marker is
            if not (out / "pretrain" / "encoder" / "config.json").is_file():
                raise UserError(f"pretraining finished without {out / 'pretrain' / 'encoder'}")
            outputs[name].write_text("ok\n")
        logger.info("%s done (%.0f s in total)", name, timings[name])
        if name == until:
            return


def encoder_gain(out: Path) -> dict[str, dict[str, float]] | None:
    """Grounding's held-out accuracies (its last evaluation) from the pretrained and the untrained
    encoder, and the gain in points: {metric: {pretrained, scratch, gain}}; None without both runs."""
    last = {}
    for name in ("ground", "ground_scratch"):
        path = out / name / "metrics.jsonl"
        records = [r for r in _read_jsonl(path) if any(k.startswith("acc_") for k in r)] if path.is_file() else []
        if not records:
            return None
        last[name] = records[-1]
    a, b = last["ground"], last["ground_scratch"]
    return {k: {"pretrained": a[k], "scratch": b[k], "gain": round(100 * (a[k] - b[k]), 1)}
            for k in a if k.startswith("acc_") and k in b}


EVAL_RESULTS = {"mc": "results.json", "mc_likelihood": "results.json", "niah": "niah.json",
                "niah_likelihood": "niah.json", "open_text": "open_text.json", "real": "real.json"}


def eval_commands(cfg: PipelineConfig, model_dir: Path, ev: Path) -> dict[str, list[str]]:
    """The evaluation's commands; each writes `EVAL_RESULTS[name]` into ``ev/name``."""
    e, py = cfg.eval, [sys.executable, "-m"]
    generate = ["--max-new-tokens", str(e.max_new_tokens)]
    likelihood = ["--scoring", "likelihood"]

    def mc(name: str, scoring: list[str]) -> list[str]:
        return py + ["eval.qa", "--benchmark", "synthqa", "--seed", str(e.qa_seed), "--n", str(e.mc_n),
                     "--model", str(model_dir), "--out", str(ev / name), "--frames", str(e.frames), *scoring]

    def niah(name: str, scoring: list[str]) -> list[str]:
        return py + ["eval.niah", "--model", str(model_dir), "--frames", ",".join(map(str, e.niah_frames)),
                     "--depths", ",".join(f"{d:g}" for d in e.niah_depths), "--needles", str(e.niah_needles),
                     "--seed", str(e.niah_seed), "--out", str(ev / name), *scoring]

    cmds = {"mc": mc("mc", generate), "niah": niah("niah", generate)}
    if e.likelihood:
        cmds |= {"mc_likelihood": mc("mc_likelihood", likelihood), "niah_likelihood": niah("niah_likelihood", likelihood)}
    cmds["open_text"] = py + ["eval.open_ended", "--model", str(model_dir), "--seed", str(e.qa_seed),
                              "--n", str(e.open_n), "--frames", str(e.frames),
                              *generate, "--out", str(ev / "open_text")]
    if cfg.data.real_clips:  # trained on real footage: our held-out real sources too
        cmds["real"] = py + ["eval.real_footage", "--model", str(model_dir), "--frames", str(e.frames),
                             "--out", str(ev / "real")]
    return cmds


def collect_metrics(runs: dict[str, dict]) -> dict:
    """metrics.json from the evaluation's result files (`EVAL_RESULTS`, by command name)."""
    mc, niah, opn = runs["mc"], runs["niah"], runs["open_text"]

    def per_category(results: dict) -> dict:
        return {k: v["accuracy"] for k, v in results["per_category"].get("category", {}).items()}

    def by_frames(results: dict) -> dict:
        return {str(f): float(np.mean(row)) for f, row in zip(results["frames"], results["accuracy"])}

    metrics = {
        "mc_accuracy": mc["accuracy"], "mc_n": mc["n"], "mc_per_category": per_category(mc),
        "open_accuracy": opn["open_accuracy"], "open_n": opn["open_n"],
        "open_per_category": {k: v["accuracy"] for k, v in opn["open_per_category"].items()},
        "open_blind_accuracy": opn["open_blind_accuracy"],
        "niah_accuracy": by_frames(niah), "niah_mean": niah["mean_accuracy"], "niah_depths": niah["depths"],
        "niah_needles": niah["needles"],
        "text_ok": opn["text_ok"], "text_reply": opn["text_reply"],
        "text_accuracy": opn["text_accuracy"], "text_n": opn["text_n"], "text_base_accuracy": opn["text_base_accuracy"],
    }
    if "real" in runs:
        real = runs["real"]
        metrics |= {f"real_{k}": real[k] for k in ("n", "with_synthetic_words", "named", "named_of", "hedged")}
    if "mc_likelihood" in runs:
        metrics |= {"mc_likelihood_accuracy": runs["mc_likelihood"]["accuracy"],
                    "mc_likelihood_per_category": per_category(runs["mc_likelihood"]),
                    "niah_likelihood_accuracy": by_frames(runs["niah_likelihood"])}
    return metrics


def stage_eval(cfg: PipelineConfig, out: Path, timings: dict, log: list[str]) -> dict:
    ev = out / "eval"
    cmds = eval_commands(cfg, out / "stage2" / "final", ev)
    if (ev / "metrics.json").is_file():
        logger.info("eval: %s exists, skipping", ev / "metrics.json")
        log.extend(shown_command(c) for c in cmds.values())
        return json.loads((ev / "metrics.json").read_text())
    runs = {}
    for name, cmd in cmds.items():  # a finished one is skipped; an MC run resumes from its samples.jsonl
        result = ev / name / EVAL_RESULTS[name]
        if result.is_file():
            log.append(shown_command(cmd))
        else:
            t0 = time.perf_counter()
            _run(cmd, log)
            timings[f"eval_{name}"] = round(time.perf_counter() - t0, 1)
        runs[name] = json.loads(result.read_text())
    metrics = collect_metrics(runs)
    _write_json(ev / "metrics.json", metrics)
    return metrics


def missed_targets(metrics: dict, targets: Targets) -> list[str]:
    """The targets `metrics` misses (empty: all met)."""
    missed = [f"{k} {metrics[k]:.3f} < {getattr(targets, k)}" for k in ("mc_accuracy", "open_accuracy")
              if metrics[k] < getattr(targets, k)]
    missed += [f"V-NIAH {f} frames {a:.3f} < {targets.niah_accuracy}"
               for f, a in metrics["niah_accuracy"].items() if a < targets.niah_accuracy]
    if targets.text_ok and not metrics["text_ok"]:
        missed.append(f"text-only answer {metrics['text_reply']!r} does not mention {TEXT_CHECKS[0][1]!r}")
    if targets.real_no_synthetic and "real_with_synthetic_words" not in metrics:
        missed.append("real_no_synthetic needs the real-footage evaluation (data.real_clips > 0)")
    elif targets.real_no_synthetic and metrics["real_with_synthetic_words"]:
        missed.append(f"{metrics['real_with_synthetic_words']} of {metrics['real_n']} held-out real clips got "
                      "replies with synthetic-world words (eval.real_footage)")
    return missed


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(out: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = {"pretrain": "VideoMAP pretraining", "ground": "grounding", "stage1": "stage 1: alignment",
              "stage2": "stage 2: LoRA"}
    # The stages that ran more than one step (the default's stage 1 is a single step).
    curves = {name: rows for name in titles if len(rows := _read_jsonl(out / name / "metrics.jsonl")) > 1}
    fig, axes = plt.subplots(1, len(curves), figsize=(4.4 * len(curves), 3.6), squeeze=False)
    for ax, (name, rows) in zip(axes[0], curves.items()):
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train loss", lw=1)
        ev = [r for r in rows if r.get("eval_loss") is not None]
        if ev:
            ax.plot([r["step"] for r in ev], [r["eval_loss"] for r in ev], "o-", label="eval loss", ms=3)
        ax.set_title(titles[name])
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def model_card(model_config: dict, metrics: dict, cfg: PipelineConfig, command: str, commands: list[str],
               n_records: int) -> str:
    """MODEL_CARD.md: `CARD_TEMPLATE` filled from the shipped model's config.json (architecture),
    metrics.json (results, timings) and the pipeline config (data, evaluation, targets)."""
    d, e, t = cfg.data, cfg.eval, cfg.targets
    vision, proj = model_config.get("vision_config", {}), model_config.get("projector_config", {})
    encoder_notes = ", with a convolutional patch stem" if vision.get("patch_stem") == "conv" else ""
    if vision.get("motion_gap"):
        encoder_notes += (f" and a motion stem that reads each frame minus the frame {vision['motion_gap']} before it"
                          " (`motion_gap`)")
    if vision.get("concept_frames"):
        encoder_notes += (f", and a concept stem: a frozen ImageNet classifier (EfficientNet-Lite0) reads "
                          f"{vision['concept_frames']} frames per clip at {vision['concept_size']} px and each frame's "
                          "tokens carry the code of what it shows (`encoder.concepts`)")
    pool = int(proj.get("spatial_pool", 1))
    pooling = f"{pool}×{pool} average pooling per frame" if pool > 1 else "a token per patch"
    projector_notes = ", which also reads the encoder's conv stem (`stem_skip`)" if proj.get("stem_skip") else ""
    if model_config.get("projector_type") == "word_anchor":
        group_names = {tuple(v): k for k, v in WORD_GROUPS.items()}  # a group named where it is grounding's
        groups = ", ".join(group_names.get(tuple(g), "/".join(g)) for g in proj["words"])
        projector_notes += f"; tokens anchored to the LLM's own word embeddings of {groups} (projector `word_anchor`)"
        if proj.get("concepts"):
            projector_notes += f", and the {len(proj['concepts'])} ImageNet class names its concept logits point at"
        if proj.get("none_logit"):
            projector_notes += (f", with a \"none\" class at logit {proj['none_logit']:g} for tokens about no object"
                                " (`none_logit`)")
        if proj.get("select_tokens"):
            projector_notes += (f"; of each frame's tokens the {proj['select_tokens']} that name an object most reach "
                                "the LLM (`select_tokens`)")
    if all(_flatten(s.overrides).get("optim.projector_lr") == 0 for s in (cfg.stage1, cfg.stage2)):
        projector_notes += "; trained in grounding only (frozen in stages 1 and 2)"

    niah_cells = f"{len(metrics['niah_depths'])} depths × {metrics['niah_needles']} needles"
    rows = [(f"multiple-choice QA, held-out synthqa seed {e.qa_seed} (n={metrics['mc_n']})",
             _pct(metrics["mc_accuracy"]), f"≥ {100 * t.mc_accuracy:g}%")]
    if metrics.get("mc_likelihood_accuracy") is not None:
        rows.append(("the same questions scored by option likelihood (no letter to produce)",
                     _pct(metrics["mc_likelihood_accuracy"]), "reported, no target"))
    rows.append((f"open-ended colour/shape/motion, held-out (n={metrics['open_n']})", _pct(metrics["open_accuracy"]),
                 f"≥ {100 * t.open_accuracy:g}%"))
    if metrics.get("open_blind_accuracy") is not None:
        rows.append(("the same open questions about another clip (blind baseline)",
                     _pct(metrics["open_blind_accuracy"]), "far below the line above"))
    rows += [(f"V-NIAH {f} frames ({niah_cells})", _pct(a), f"≥ {100 * t.niah_accuracy:g}%")
             for f, a in metrics["niah_accuracy"].items()]
    rows += [(f"V-NIAH {f} frames, scored by option likelihood", _pct(a), "reported, no target")
             for f, a in metrics.get("niah_likelihood_accuracy", {}).items()]
    (text_question, text_word), *_ = TEXT_CHECKS
    rows.append((f'text only: "{text_question}"', "pass" if metrics["text_ok"] else "FAIL",
                 f"mentions {text_word.capitalize()}"))
    if metrics.get("text_accuracy") is not None:
        rows.append((f"text only: {metrics['text_n']} held-out factual questions (capitals, authors, …)",
                     _pct(metrics["text_accuracy"]), f"the base LLM's {_pct(metrics.get('text_base_accuracy'))}"))
    if "real_n" in metrics:  # `eval.real_footage` on our held-out real sources
        n = metrics["real_n"]
        rows += [(f"real footage held out ({', '.join(REAL_HELDOUT)}; {n} clips): replies with synthetic-world words",
                  f"{metrics['real_with_synthetic_words']} of {n}", "0"),
                 ("… subject named (an ImageNet top-5 word)", f"{metrics['real_named']} of {metrics['real_named_of']}",
                  "reported"),
                 ("… hedged in words", f"{metrics['real_hedged']} of {n}", "reported")]

    if d.records == "short":
        records = (f"per synthetic clip every question once, open or multiple-choice at random, {d.qa_turns} per "
                   "record (no timing questions), multiple-choice answered with "
                   + ("the option's letter" if d.mc_reply == "letter" else
                      "the option's text (read as its letter by `eval.answer.extract_letter`)")
                   + f", and a caption for {100 * d.caption_fraction:.0f}% of the clips; ")
    else:
        records = ("per synthetic clip a caption, its open questions and its multiple-choice questions (separate "
                   "conversations); ")
    seen = "whole" if d.needle_num_frames == d.haystack_frames else f"as {d.needle_num_frames or d.clip_frames} frames"
    records += (f"{d.needle_clips} long clips ({d.haystack_frames} frames of "
                + ("the real clips" if d.needle_haystack == "real" else "real + synthetic video")
                + f", seen {seen}) with a {d.needle_span}-frame needle (a large shape) at a random depth, with its "
                "open and multiple-choice questions"
                + (f" (stage 2 sees each {d.needle_repeat:g}×)" if d.needle_repeat != 1 else ""))
    replay = (f"- text replay (stage 2 only): {d.text_replay} text prompts (explanations, tips, lists, arithmetic, "
              "small talk; no capital, author or painter question) answered by smollm2 itself, greedy, "
              f"{d.text_replay_repeat:g}× each, in text-only batches\n") if d.text_replay else ""
    real = (f"- real footage: {d.real_clips} camera clips ({d.real_size} px) of the training split of real sources "
            f"({', '.join(REAL_TRAIN)}), asked what they show (the concept stem's classifier names it, or the reply "
            f"hedges below {100 * d.real_confident:g}%) and about shapes (there are none)"
            + (f"; {d.concept_records} records with made-up concepts of random classes" if d.concept_records else "")
            + f"; held out: {', '.join(REAL_HELDOUT)}\n") if d.real_clips else ""
    mc_lik = metrics.get("mc_likelihood_per_category")
    fields = {
        "base_llm": model_config.get("base_llm", "smollm2"), "encoder_notes": encoder_notes,
        "projector_notes": projector_notes, "pooling": pooling, "size": d.size, "clip_frames": d.clip_frames,
        "haystack_frames": d.haystack_frames, "command": command, "seed": cfg.seed, "commands": "\n".join(commands),
        "pretrain_clips": len(TASKS) * d.clips_per_task, "real_repeats": d.real_repeats, "n_records": n_records,
        "records": records, "replay": replay + real, "qa_seed": e.qa_seed, "niah_seed": e.niah_seed,
        "metric_rows": "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows),
        "mc_per_category": ", ".join(f"{k} {_pct(v)}" for k, v in metrics["mc_per_category"].items()),
        "open_per_category": ", ".join(f"{k} {_pct(v)}" for k, v in metrics["open_per_category"].items()),
        "mc_likelihood_per_category": (" MC by option likelihood per category: "
                                       + ", ".join(f"{k} {_pct(v)}" for k, v in mc_lik.items()) + ".") if mc_lik else "",
        "text_reply": metrics["text_reply"], "scope": model_config.get("scope") or "Not stated.",
        "timings": "\n".join(f"- {k}: {v}" for k, v in metrics.get("timings_s", {}).items()),
    }
    return CARD_TEMPLATE.read_text(encoding="utf-8").format(**fields)


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def stage_ship(cfg: PipelineConfig, out: Path, ship: Path, command: str, log: list[str], metrics: dict) -> Path:
    final = out / "stage2" / "final"
    n_records = len(json.loads((out / "data" / "instruct.json").read_text()))
    with atomic_dir(ship) as tmp:
        for p in final.iterdir():
            if p.suffix != ".yaml":  # the recipe's own copy of its config: configs/ has every stage's
                (shutil.copytree if p.is_dir() else shutil.copy2)(p, tmp / p.name)
        shutil.copytree(out / "configs", tmp / "configs")
        # peft's generated card is an empty template; MODEL_CARD.md is this model's card
        (tmp / "llm_adapter" / "README.md").unlink(missing_ok=True)
        plot_curves(out, tmp / "curves.png")
        if (out / "eval" / "niah" / "niah.png").is_file():
            shutil.copy2(out / "eval" / "niah" / "niah.png", tmp / "niah.png")
        # Every open-ended and text-only reply the metrics count: a user can read what the model
        # said, and the tests check the shipped weights still say it.
        shutil.copy2(out / "eval" / "open_text" / "open_text.json", tmp / "eval_open_text.json")
        _write_json(tmp / "metrics.json", metrics)
        (tmp / "pipeline_config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        model_config = json.loads((tmp / "config.json").read_text())
        if cfg.scope:
            model_config["scope"] = cfg.scope
        # The longest clip the evaluation checked: `--frames auto` goes no further.
        model_config["max_frames"] = max([cfg.eval.frames, *cfg.eval.niah_frames])
        (tmp / "config.json").write_text(json.dumps(model_config, indent=2, sort_keys=True) + "\n")  # as transformers writes it
        (tmp / "MODEL_CARD.md").write_text(model_card(model_config, metrics, cfg, command, log, n_records))
        # The paths of the machine that ran the pipeline, replaced for the repo: the run folder by
        # "$OUT", the checkout by ".", a ship folder outside it by "$SHIP", the home folder by "~".
        for f in tmp.rglob("*"):  # the tokenizer's vocabulary is data, never a path: left as it is
            if f.suffix in (".md", ".json", ".yaml", ".jinja") and f.name != "tokenizer.json":
                text = f.read_text(encoding="utf-8")
                for path, name in ((out, "$OUT"), (REPO, "."), (ship, "$SHIP"), (Path.home(), "~")):
                    text = text.replace(str(path), name)
                f.write_text(text, encoding="utf-8")
        size = dir_bytes(tmp)
        if size > MAX_SHIP_BYTES:
            raise UserError(f"shipped model would be {size / 2 ** 20:.1f} MB, over the {MAX_SHIP_BYTES / 2 ** 20:.0f} "
                            "MB cap; lower lora.r or the encoder size")
    logger.info("shipped %s (%.1f MB)", ship, dir_bytes(ship) / 2 ** 20)
    return ship


def run(cfg: PipelineConfig, command: str, until: str | None = None) -> dict:
    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    # The C++ scan kernel is JIT-built into TORCH_EXTENSIONS_DIR; a private one per run builds it
    # once here, not once per stage when other checkouts share ~/.cache.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(out / "torch_extensions"))
    (out / "pipeline_config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    timings_path = out / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    log: list[str] = []
    if not (out / "data" / "instruct.json").is_file():
        t0 = time.perf_counter()
        stage_data(cfg, out)
        timings["data"] = round(time.perf_counter() - t0, 1)
        _write_json(timings_path, timings)
    run_training(cfg, out, timings, log, until)
    gain = encoder_gain(out) if cfg.encoder_gain else None
    if gain:
        _write_json(out / "encoder_gain.json", gain)
    if until is not None:
        return {"out": str(out), "until": until, "timings_s": timings, **({"encoder_gain": gain} if gain else {})}
    metrics = stage_eval(cfg, out, timings, log)
    if gain:
        metrics["encoder_gain"] = gain
    _write_json(timings_path, timings)
    missed = missed_targets(metrics, cfg.targets)
    summary = {"out": str(out), "metrics": {k: v for k, v in metrics.items() if not isinstance(v, list)},
               "timings_s": timings, "targets_met": not missed}
    if missed:
        logger.warning("targets missed: %s", "; ".join(missed))
    if cfg.ship and missed and cfg.require_targets:
        logger.warning("not shipping (require_targets=true); the run is in %s", out)
    elif cfg.ship:
        ship = Path(cfg.ship)
        summary["ship"] = str(stage_ship(cfg, out, ship if ship.is_absolute() else REPO / ship, command, log,
                                         {**metrics, "timings_s": timings, "seed": cfg.seed}))
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="videollm train-default", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "training" / "configs" / "default_model.yaml"))
    p.add_argument("--out", help="run directory (overrides `out`)")
    p.add_argument("--ship", help="where the final model goes (overrides `ship`; 'none' = do not ship)")
    p.add_argument("--until", metavar="STAGE", help="stop after this training stage (e.g. ground); no eval, no ship")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. stage2.overrides.steps=10")
    args = p.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    extra = list(args.overrides)
    if args.out:
        extra.append(f"out={args.out}")
    if args.ship:
        extra.append("ship=null" if args.ship.lower() == "none" else f"ship={args.ship}")
    cfg = load_config(PipelineConfig, args.config, extra)
    command = shlex.join(["python", "-m", "training.pipeline"] + (argv if argv is not None else sys.argv[1:]))
    print(json.dumps(run(cfg, command, args.until)))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
