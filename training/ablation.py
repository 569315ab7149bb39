"""``videollm bench ablation``: the paper's pretraining claims in miniature, on a CPU.

    videollm bench ablation --out runs/ablation [--seeds 3] [--budget default|smoke] [--task motion]

Four encoders of one shrunk nano-family architecture (`ARMS`: hybrid + VideoMAP, hybrid from
scratch, hybrid + MAE, pure Mamba + VideoMAP), pretrained on the same budget, are fine-tuned and
linear-probed on 10 % of the labels of a synthetic time-dependent task (``motion`` or ``order``),
per seed; the table reports mean ± std of top-1. ``--out`` gets ``ablation.json``, ``ablation.md``
and one folder per run; finished runs are reused. The task-setting flags (`LEVERS`) override the
budget, whose default (plain backgrounds, no distractors, ``time`` pooling) is where the arms are
not all at chance (docs/ablation.md). Budgets fit a 2-core CPU; ``smoke`` checks the machinery.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import multiprocessing
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from encoder.errors import UserError, run_cli
from training.classify import ClassifyConfig
from training.classify import train as classify
from training.config import load_config
from training.pretrain import PretrainConfig
from training.pretrain import train as pretrain
from videollm.data.synth import BACKGROUNDS, NUM_CLASSES

ARMS = ("videomap", "scratch", "mae", "videomap_mamba")

# Shared by every arm: the nano preset's family, shrunk to what a CPU trains in minutes.
BUDGETS: dict[str, dict] = {
    "default": dict(
        encoder=dict(embed_dim=64, depth_mamba=4, num_heads=4, patch_size=8), hybrid_attn_every=4,
        num_frames=8, size=32, pool=2000, pretrain_steps=150, pretrain_batch=16, pretrain_lr=1e-3,
        decoder=dict(decoder_dim=64, decoder_depth=2, decoder_heads=4),
        num_train=2000, num_val=300, label_fraction=0.1, finetune_epochs=20, finetune_lr=1e-3,
        linear_epochs=30, linear_lr=1e-2, batch_size=8,
        background="plain", distractors=0, feature_pool="time"),
    "smoke": dict(
        encoder=dict(embed_dim=32, depth_mamba=2, num_heads=2, patch_size=8), hybrid_attn_every=2,
        num_frames=8, size=32, pool=64, pretrain_steps=5, pretrain_batch=8, pretrain_lr=1e-3,
        decoder=dict(decoder_dim=32, decoder_depth=1, decoder_heads=2),
        num_train=80, num_val=16, label_fraction=0.1, finetune_epochs=2, finetune_lr=1e-3,
        linear_epochs=5, linear_lr=1e-2, batch_size=8,
        background=None, distractors=None, feature_pool="mean"),
}

# Task-setting levers: CLI flag → budget key (feature_pool: `training.classify.VideoClassifier`'s pool).
LEVERS = {"size": "size", "frames": "num_frames", "patch": "patch_size", "epochs": "finetune_epochs",
          "batch": "batch_size", "background": "background", "distractors": "distractors", "pool": "feature_pool"}


def resolve_budget(budget: str, overrides: dict | None = None) -> dict:
    """The named budget with the task-setting overrides applied (a new dict)."""
    if budget not in BUDGETS:
        raise UserError(f"unknown budget {budget!r}; choose one of {', '.join(BUDGETS)}")
    b = copy.deepcopy(BUDGETS[budget])
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key == "patch_size":
            b["encoder"]["patch_size"] = int(value)
        elif key not in b:
            raise UserError(f"unknown ablation setting {key!r}")
        elif key == "distractors":
            if str(value) != "random" and not (str(value).isdigit() and int(value) <= 3):
                raise UserError(f"distractors must be 0..3 or 'random'; got {value!r}")
            b[key] = None if str(value) == "random" else int(value)
        else:
            b[key] = value
    if b["size"] % b["encoder"]["patch_size"]:
        raise UserError(f"size {b['size']} is not a multiple of patch {b['encoder']['patch_size']}")
    if b["feature_pool"] not in ("mean", "cls", "time"):
        raise UserError(f"pool must be mean, cls or time; got {b['feature_pool']!r}")
    if b["background"] == "mixed":
        b["background"] = None
    if b["background"] not in (None, "plain", *BACKGROUNDS):
        raise UserError(f"background must be mixed, plain or one of {', '.join(BACKGROUNDS)}; got {b['background']!r}")
    return b


def _kv(prefix: str, d: dict) -> list[str]:
    return [f"{prefix}{k}={v}" for k, v in d.items()]


def _encoder_config(arm: str, b: dict) -> list[str]:
    attn_every = 0 if arm == "videomap_mamba" else b["hybrid_attn_every"]
    return _kv("encoder_config.", {**b["encoder"], "attn_every": attn_every})


def _common(b: dict, task: str, seed: int, threads: int, out: Path) -> list[str]:
    """The overrides of both recipes: task, synthetic scene (the unlabelled pool's too), clip shape,
    seed, threads and the run folder (resume=true: a finished run is reused)."""
    return [f"data.task={task}", f"data.num_frames={b['num_frames']}", f"data.size={b['size']}",
            f"data.background={b.get('background') or 'null'}",
            f"data.distractors={'null' if b.get('distractors') is None else b['distractors']}",
            f"seed={seed}", f"threads={threads}", f"output_dir={out}", "resume=true"]


def pretrain_arm(arm: str, seed: int, b: dict, task: str, threads: int, run_dir: Path) -> dict:
    if (run_dir / "encoder" / "config.json").is_file() and (run_dir / "summary.json").is_file():
        return json.loads((run_dir / "summary.json").read_text())
    cfg = load_config(PretrainConfig, None, [
        *_encoder_config(arm, b), *_kv("objective.", b["decoder"]),
        f"objective.name={'mae' if arm == 'mae' else 'videomap'}",
        f"data.synth_pool={b['pool']}", f"batch_size={b['pretrain_batch']}", f"steps={b['pretrain_steps']}",
        f"optim.lr={b['pretrain_lr']}", f"optim.warmup_steps={max(1, b['pretrain_steps'] // 10)}",
        f"save_every={max(1, b['pretrain_steps'] // 2)}", f"log_every={max(1, b['pretrain_steps'] // 50)}",
        *_common(b, task, seed, threads, run_dir)])
    t0 = time.time()
    summary = pretrain(cfg)
    summary = {"loss": summary.get("loss"), "seconds": round(time.time() - t0, 1),
               "clips_seen": b["pretrain_steps"] * b["pretrain_batch"]}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return summary


def classify_arm(arm: str, seed: int, b: dict, task: str, threads: int, init: Path | None, mode: str,
                 out: Path) -> dict:
    """Fine-tune or linear-probe for the budget's epochs (passes over the labelled clips; the probe
    leaves out a last batch of one, which BatchNorm cannot take), one of warm-up, a cosine to 1e-6."""
    if (out / "results.json").is_file():
        return json.loads((out / "results.json").read_text())
    epochs, lr = (b["finetune_epochs"], b["finetune_lr"]) if mode == "finetune" else (b["linear_epochs"], b["linear_lr"])
    labelled, bs = max(1, round(b["label_fraction"] * b["num_train"])), b["batch_size"]
    per_epoch = -(-labelled // bs) if mode == "finetune" else labelled // bs + (labelled % bs >= 2)
    cfg = load_config(ClassifyConfig, None, [
        *([f"encoder={init}"] if init else ["encoder=nano", *_encoder_config(arm, b)]), f"mode={mode}",
        f"data.num_train={b['num_train']}", f"data.num_val={b['num_val']}",
        f"data.label_fraction={b['label_fraction']}", f"steps={epochs * per_epoch}", f"optim.lr={lr}",
        f"optim.warmup_steps={per_epoch}", f"optim.min_lr_ratio={1e-6 / lr!r}", f"batch_size={bs}",
        f"save_every={per_epoch * epochs}", f"log_every={per_epoch}", f"pool={b.get('feature_pool', 'mean')}",
        *_common(b, task, seed, threads, out)])
    return classify(cfg)


def summarize(runs: list[dict]) -> dict:
    out = {}
    for arm in ARMS:
        rows = [r for r in runs if r["arm"] == arm]
        if not rows:
            continue
        entry = {"n": len(rows)}
        for key in ("finetune_top1", "linear_top1", "finetune_top5"):
            xs = [r[key] for r in rows]
            entry[key] = {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0}
        losses = [r["pretrain_loss"] for r in rows if r["pretrain_loss"] is not None]
        entry["pretrain_loss"] = statistics.fmean(losses) if losses else None
        out[arm] = entry
    return out


def to_markdown(result: dict) -> str:
    b, s = result["budget"], result["summary"]
    lines = [
        f"# Pretraining ablation — synthetic `{result['task']}` ({result['num_classes']} classes), "
        f"{int(b['label_fraction'] * 100)} % labels, {len(result['seeds'])} seeds",
        "",
        f"Encoder: nano family shrunk to D={b['encoder']['embed_dim']}, {b['encoder']['depth_mamba']} Mamba "
        f"blocks (+{b['encoder']['depth_mamba'] // b['hybrid_attn_every']} attention block(s) in the hybrid), {b['num_frames']} frames × {b['size']} px, patch "
        f"{b['encoder']['patch_size']}. Pretraining: {b['pretrain_steps']} steps × {b['pretrain_batch']} clips "
        f"= {b['pretrain_steps'] * b['pretrain_batch']} clips seen from a pool of {b['pool']} unlabeled "
        f"training clips. Supervised: {round(b['num_train'] * b['label_fraction'])} labeled clips, "
        f"fine-tune {b['finetune_epochs']} epochs / linear probe {b['linear_epochs']} epochs, batch {b['batch_size']}; "
        f"test on {b['num_val']} held-out clips. Chance = {100 / result['num_classes']:.1f} %.",
        f"Scene: background {b.get('background') or 'random mix'}, distractors "
        f"{'0–2 at random' if b.get('distractors') is None else b['distractors']} (pretraining pool too); "
        f"classifier pooling: {b.get('feature_pool', 'mean')}.",
        "",
        "| arm | encoder | pretraining | fine-tune top-1 (%) | linear-probe top-1 (%) | final pretrain loss |",
        "|---|---|---|---|---|---|",
    ]
    hybrid = f"hybrid {b['hybrid_attn_every']}:1"
    desc = {"videomap": (hybrid, "VideoMAP"), "scratch": (hybrid, "none"),
            "mae": (hybrid, "MAE"), "videomap_mamba": ("pure Mamba", "VideoMAP")}
    for arm, e in s.items():
        ft, lp = e["finetune_top1"], e["linear_top1"]
        loss = f"{e['pretrain_loss']:.3f}" if e["pretrain_loss"] is not None else "—"
        lines.append(f"| {arm} | {desc[arm][0]} | {desc[arm][1]} | {100 * ft['mean']:.1f} ± {100 * ft['std']:.1f} "
                     f"| {100 * lp['mean']:.1f} ± {100 * lp['std']:.1f} | {loss} |")
    lines += ["", f"Total time: {result['seconds'] / 60:.1f} min.", ""]
    return "\n".join(lines)


def run_seed(out: Path, seed: int, budget: str, task: str, threads: int, overrides: dict | None = None) -> list[dict]:
    """Every arm for one seed (runs in a worker process when --jobs > 1)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    b = resolve_budget(budget, overrides)
    runs = []
    for arm in ARMS:
        run_dir = out / arm / f"seed{seed}"
        pre = None if arm == "scratch" else pretrain_arm(arm, seed, b, task, threads, run_dir / "pretrain")
        init = None if arm == "scratch" else run_dir / "pretrain" / "encoder"
        ft = classify_arm(arm, seed, b, task, threads, init, "finetune", run_dir / "finetune")
        lp = classify_arm(arm, seed, b, task, threads, init, "linear", run_dir / "linear")
        row = {"arm": arm, "seed": seed, "pretrain_loss": pre["loss"] if pre else None,
               "pretrain_seconds": pre["seconds"] if pre else 0.0,
               "finetune_top1": ft["top1"], "finetune_top5": ft["top5"], "linear_top1": lp["top1"],
               "finetune_seconds": ft["seconds"], "linear_seconds": lp["seconds"]}
        runs.append(row)
        logging.getLogger("training.ablation").info("%s", json.dumps(row))
    return runs


def run(out: Path, seeds: int, budget: str, task: str, threads: int, jobs: int = 1,
        overrides: dict | None = None) -> dict:
    b = resolve_budget(budget, overrides)
    if (b.get("background") is not None or b.get("distractors") is not None) and task != "motion":
        raise UserError("--background / --distractors apply to the motion task only")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if jobs > 1:  # seeds are independent: one process per seed, `jobs` at a time
        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            per_seed = list(pool.map(run_seed, [out] * seeds, range(seeds), [budget] * seeds, [task] * seeds,
                                     [threads] * seeds, [overrides] * seeds))
    else:
        per_seed = [run_seed(out, seed, budget, task, threads, overrides) for seed in range(seeds)]
    runs = [row for rows in per_seed for row in rows]
    result = {"task": task, "num_classes": NUM_CLASSES[task], "seeds": list(range(seeds)), "budget_name": budget,
              "overrides": {k: v for k, v in (overrides or {}).items() if v is not None}, "budget": b, "runs": runs, "summary": summarize(runs), "seconds": round(time.time() - t0, 1)}
    (out / "ablation.json").write_text(json.dumps(result, indent=1))
    (out / "ablation.md").write_text(to_markdown(result))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="videollm bench ablation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder (reused runs are skipped)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--budget", default="default", choices=sorted(BUDGETS))
    parser.add_argument("--task", default="motion", choices=("motion", "order"))
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per process (1 is fastest on a shared CPU)")
    parser.add_argument("--jobs", type=int, default=1, help="seeds run in parallel processes (2 on a 2-core machine)")
    g = parser.add_argument_group("task setting (default: the budget's; recorded in ablation.json)")
    g.add_argument("--size", type=int, help="frame side in px (the object travels 18–30 %% of it per clip)")
    g.add_argument("--frames", type=int, help="frames per clip")
    g.add_argument("--patch", type=int, help="patch side in px")
    g.add_argument("--epochs", type=int, help="fine-tuning epochs")
    g.add_argument("--batch", type=int, help="fine-tuning / probing batch size (smaller = more updates per epoch)")
    g.add_argument("--background", help="mixed (the generator's random mix), plain, or a videollm.data.synth.BACKGROUNDS name")
    g.add_argument("--distractors", help="static extra objects per motion clip: 0..3, or random (0–2 at random)")
    g.add_argument("--pool", choices=("mean", "cls", "time"), help="classifier pooling (time: per-frame means, concatenated)")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        raise UserError(f"--seeds must be >= 1; got {args.seeds}")
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    overrides = {key: getattr(args, flag) for flag, key in LEVERS.items()}
    result = run(Path(args.out), args.seeds, args.budget, args.task, args.threads, args.jobs, overrides)
    print(json.dumps({"summary": result["summary"], "seconds": result["seconds"], "out": args.out}))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
