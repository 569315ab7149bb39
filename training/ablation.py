"""``videollm bench ablation``: the paper's pretraining claims in miniature, on a CPU.

    videollm bench ablation --out runs/ablation [--seeds 3] [--budget default|smoke] [--jobs 2]

Eight encoders (`ARMS`) of one shrunk nano-family architecture are pretrained on the same budget
(an unlabelled pool of synthetic clips), then fine-tuned and linear-probed on 1 %, 10 % and 100 %
of the labels of the 8-way synthetic ``motion`` task, per seed, and tested on clips of seeds
3,000,000+ (settings were chosen on seeds 2,000,000+, docs/ablation_pilot.json). ``--out`` gets
``ablation.json`` (``summary``: per arm and label fraction, mean ± std of top-1 with the per-seed
runs; rewritten as each run lands), ``ablation.md`` and one folder per run; finished runs are
reused, so a cut run resumes. Teacher targets are computed once into ``--out/teacher_cache``.
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
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from encoder.errors import UserError, is_quiet, quiet, run_cli
from encoder.files import atomic_write_text
from encoder.teacher import DEFAULT_TEACHER
from training.classify import ClassifyConfig
from training.classify import train as classify
from training.config import load_config
from training.pretrain import PretrainConfig
from training.pretrain import train as pretrain

# arm → (objective or None for scratch, the semantic teacher's loss weight (0: none), block layout:
# attn_every or "hybrid")
ARMS = {
    "videomap": ("videomap", 1.0, "hybrid"),  # pixels + teacher features of future frames (the paper's)
    # The teacher's weight chosen on the validation clips after weight 1 hurt (docs/ablation_validation.json).
    "videomap_tw01": ("videomap", 0.1, "hybrid"),
    "videomap_pixels": ("videomap", 0, "hybrid"),
    "mae": ("mae", 0, "hybrid"),
    "umt": ("umt", 1.0, "hybrid"),  # visible tokens aligned with the teacher's features
    "scratch": (None, 0, "hybrid"),
    # The architecture arms use the VideoMAP target that won on the validation clips (pixels against the
    # teacher at weight 1; docs/ablation_validation.json).
    "videomap_pixels_mamba": ("videomap", 0, 0),  # pure Mamba
    "videomap_pixels_attention": ("videomap", 0, 1),  # pure attention
}
FRACTIONS = (0.01, 0.1, 1.0)
TEST_SEED = 3_000_000

BUDGETS: dict[str, dict] = {
    "default": dict(
        encoder=dict(embed_dim=64, depth_mamba=4, num_heads=4, patch_size=8), hybrid_attn_every=4,
        num_frames=8, size=32, pool=10_000, pretrain_steps=1500, pretrain_batch=16, pretrain_lr=1e-3,
        warmup=50, decoder=dict(decoder_dim=64, decoder_depth=2, decoder_heads=4), teacher_size=64,
        num_train=2000, num_test=500, steps=500, batch_size=8, lr=1e-3, full_steps=1250, full_batch=16),
    "smoke": dict(
        encoder=dict(embed_dim=32, depth_mamba=2, num_heads=2, patch_size=8), hybrid_attn_every=2,
        num_frames=4, size=32, pool=32, pretrain_steps=3, pretrain_batch=4, pretrain_lr=1e-3,
        warmup=1, decoder=dict(decoder_dim=32, decoder_depth=1, decoder_heads=2), teacher_size=32,
        num_train=400, num_test=8, steps=3, batch_size=4, lr=1e-3, full_steps=3, full_batch=4),
}


def _kv(prefix: str, d: dict) -> list[str]:
    return [f"{prefix}{k}={v}" for k, v in d.items()]


def _encoder_config(arm: str, b: dict) -> list[str]:
    layout = ARMS[arm][2]
    return _kv("encoder_config.", {**b["encoder"], "attn_every": b["hybrid_attn_every"] if layout == "hybrid" else layout})


def _scene(b: dict, seed: int, threads: int, out: Path) -> list[str]:
    """The overrides of both recipes: the synthetic scene (plain backgrounds, no distractors: the
    pool's too), clip shape, seed, threads and the run folder (resume=true reuses a finished run)."""
    return ["data.task=motion", f"data.num_frames={b['num_frames']}", f"data.size={b['size']}",
            "data.background=plain", "data.distractors=0", f"seed={seed}", f"threads={threads}",
            f"output_dir={out}", "resume=true"]


def pretrain_arm(arm: str, seed: int, b: dict, threads: int, run_dir: Path, cache: Path) -> dict:
    done = run_dir / "summary.json"
    if done.is_file():
        return json.loads(done.read_text())
    objective, teacher, _ = ARMS[arm]
    steps = b["pretrain_steps"]
    cfg = load_config(PretrainConfig, None, [
        "encoder=nano", *_encoder_config(arm, b), *_kv("objective.", b["decoder"]), f"objective.name={objective}",
        *([f"objective.teacher={DEFAULT_TEACHER}", f"objective.teacher_size={b['teacher_size']}",
           f"objective.teacher_weight={teacher}", f"objective.teacher_cache={cache}"] if teacher else []),
        f"data.synth_pool={b['pool']}", f"batch_size={b['pretrain_batch']}", f"steps={steps}",
        f"optim.lr={b['pretrain_lr']}", f"optim.warmup_steps={b['warmup']}", f"save_every={max(1, steps // 5)}",
        f"log_every={max(1, steps // 50)}", *_scene(b, seed, threads, run_dir)])
    t0 = time.time()
    summary = {"loss": pretrain(cfg).get("loss"), "seconds": round(time.time() - t0, 1),
               "clips_seen": steps * b["pretrain_batch"]}
    atomic_write_text(done, json.dumps(summary))
    return summary


def classify_arm(arm: str, seed: int, b: dict, threads: int, init: Path | None, mode: str, fraction: float,
                 out: Path) -> dict:
    """Fine-tune or linear-probe on `fraction` of the labels (the same steps, batch and learning rate
    for every arm), then test on the held-out clips."""
    if (out / "results.json").is_file():
        return json.loads((out / "results.json").read_text())
    steps, bs = (b["full_steps"], b["full_batch"]) if fraction == 1.0 else (b["steps"], b["batch_size"])
    cfg = load_config(ClassifyConfig, None, [
        *([f"encoder={init}"] if init else ["encoder=nano", *_encoder_config(arm, b)]), f"mode={mode}",
        f"data.num_train={b['num_train']}", f"data.num_val={b['num_test']}", f"data.val_seed={TEST_SEED}",
        f"data.label_fraction={fraction}", f"steps={steps}", f"optim.lr={b['lr']}", f"batch_size={bs}",
        f"save_every={steps}", f"log_every={max(1, steps // 10)}", "pool=time", *_scene(b, seed, threads, out)])
    return classify(cfg)


def run_arm(out: Path, arm: str, seed: int, budget: str, threads: int, fractions: tuple[float, ...]) -> list[dict]:
    """One arm and seed: pretraining (reused when done), then each label fraction × {fine-tune, probe}."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    b, run_dir = BUDGETS[budget], out / arm / f"seed{seed}"
    pre = None if ARMS[arm][0] is None else pretrain_arm(arm, seed, b, threads, run_dir / "pretrain",
                                                         out / "teacher_cache")
    init = None if pre is None else run_dir / "pretrain" / "encoder"
    rows = []
    for fraction in fractions:
        res = {mode: classify_arm(arm, seed, b, threads, init, mode, fraction,
                                  run_dir / f"{mode}_{round(100 * fraction)}pct") for mode in ("finetune", "linear")}
        rows.append({"arm": arm, "seed": seed, "fraction": fraction,
                     "pretrain_loss": pre and pre["loss"], "pretrain_seconds": pre and pre["seconds"],
                     "finetune_top1": res["finetune"]["top1"], "linear_top1": res["linear"]["top1"],
                     "num_test": res["finetune"]["num_test"], "num_labeled": res["finetune"]["num_train_labeled"]})
    return rows


def _stat(xs: list[float]) -> dict:
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}


def summarize(runs: list[dict]) -> dict:
    """{arm: {"<pct>%": {finetune_top1, linear_top1: mean/std/n, "runs": per-seed rows}}}."""
    out: dict = {}
    for r in sorted(runs, key=lambda r: (r["fraction"], r["seed"])):
        out.setdefault(r["arm"], {}).setdefault(f"{round(100 * r['fraction'])}%", {"runs": []})["runs"].append(r)
    for per_fraction in out.values():
        for entry in per_fraction.values():
            for key in ("finetune_top1", "linear_top1"):
                entry[key] = _stat([r[key] for r in entry["runs"]])
    return out


def compare(summary: dict, arm: str, base: str, fraction: str = "10%") -> dict:
    """arm − base per mode: the difference of means (points) and how many pooled stds it is."""
    out = {}
    for key in ("finetune_top1", "linear_top1"):
        a, c = summary.get(arm, {}).get(fraction, {}).get(key), summary.get(base, {}).get(fraction, {}).get(key)
        if a and c:
            pooled = ((a["std"] ** 2 + c["std"] ** 2) / 2) ** 0.5
            diff = 100 * (a["mean"] - c["mean"])
            out[key] = {"points": round(diff, 2), "pooled_std": round(100 * pooled, 2),
                        "in_pooled_stds": round(diff / (100 * pooled), 2) if pooled else None}
    return out


CLAIMS = (("videomap", "scratch"), ("videomap_pixels", "scratch"), ("videomap_pixels", "mae"),
          ("videomap_pixels", "umt"), ("videomap_pixels", "videomap_pixels_mamba"),
          ("videomap_pixels", "videomap_pixels_attention"), ("videomap", "videomap_pixels"), ("videomap", "mae"),
          ("videomap", "umt"), ("videomap_tw01", "scratch"), ("videomap_tw01", "videomap_pixels"),
          ("videomap_tw01", "mae"), ("videomap_tw01", "umt"))


def to_markdown(result: dict) -> str:
    b, s = result["budget"], result["summary"]
    fr = [f"{round(100 * f)}%" for f in FRACTIONS]
    lines = [f"# Pretraining ablation — synthetic motion (8 classes), {len(result['seeds'])} seed(s)", "",
             f"D={b['encoder']['embed_dim']}, {b['encoder']['depth_mamba']} Mamba blocks (+1 attention per "
             f"{b['hybrid_attn_every']} in the hybrid), {b['num_frames']} frames × {b['size']} px, patch "
             f"{b['encoder']['patch_size']}; pretraining {b['pretrain_steps']} steps × {b['pretrain_batch']} clips "
             f"from a pool of {b['pool']}; test on {b['num_test']} clips (seeds {TEST_SEED:,}+). Chance 12.5 %.", "",
             "| arm | " + " | ".join(f"fine-tune {f}" for f in fr) + " | " + " | ".join(f"probe {f}" for f in fr) + " |",
             "|---|" + "---|" * (2 * len(fr))]
    for arm, per in s.items():
        cells = [f"{100 * per[f][k]['mean']:.1f} ± {100 * per[f][k]['std']:.1f} (n={per[f][k]['n']})" if f in per else "—"
                 for k in ("finetune_top1", "linear_top1") for f in fr]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += ["", "At 10 % labels (difference of means in points; pooled stds):", ""]
    for name, d in result["comparisons"].items():
        lines += [f"- {name.replace('-', ' − ')}: " + "; ".join(f"{k.split('_')[0]} {v['points']:+.1f} ({v['in_pooled_stds']} σ)"
                                                for k, v in d.items())]
    return "\n".join(lines + ["", f"Total time: {result['seconds'] / 60:.1f} min.", ""])


def plot(summary: dict, path: Path) -> None:
    """Top-1 (mean ± std over seeds) against the label fraction, one line per arm; fine-tune | probe."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, key in zip(axes, ("finetune_top1", "linear_top1")):
        for arm, per in summary.items():
            fs = [f for f in FRACTIONS if f"{round(100 * f)}%" in per]
            stats = [per[f"{round(100 * f)}%"][key] for f in fs]
            ax.errorbar([100 * f for f in fs], [100 * s["mean"] for s in stats], [100 * s["std"] for s in stats],
                        marker="o", capsize=3, label=arm)
        ax.set(xscale="log", xlabel="labelled clips (% of 2000)", title={"finetune_top1": "fine-tune", "linear_top1": "linear probe"}[key])
        ax.axhline(12.5, color="gray", lw=0.5)
    axes[0].set_ylabel("test top-1 (%)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(out: Path, runs: list[dict], budget: str, seeds: int, t0: float) -> dict:
    summary = summarize(runs)
    result = {"task": "motion", "num_classes": 8, "seeds": list(range(seeds)), "budget_name": budget,
              "budget": BUDGETS[budget], "test_seed": TEST_SEED, "summary": summary,
              "comparisons": {f"{a}-{c}": compare(summary, a, c) for a, c in CLAIMS},
              "seconds": round(time.time() - t0, 1)}
    atomic_write_text(out / "ablation.json", json.dumps(result, indent=1))
    atomic_write_text(out / "ablation.md", to_markdown(result))
    plot(summary, out / "ablation.png")
    return result


def run(out: Path, seeds: int, budget: str, threads: int, jobs: int = 1, arms: list[str] | None = None) -> dict:
    """Every (arm, seed) as one job, seed by seed, the 100 % runs last (the costliest, least needed)."""
    out.mkdir(parents=True, exist_ok=True)
    t0, runs = time.time(), []
    tasks = [(arm, seed, FRACTIONS[:-1]) for seed in range(seeds) for arm in arms or ARMS]
    tasks += [(arm, seed, FRACTIONS[-1:]) for seed in range(seeds) for arm in arms or ARMS]
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=quiet if is_quiet() else None) as pool:  # workers as quiet as this command
        futures = [pool.submit(run_arm, out, arm, seed, budget, threads, fr) for arm, seed, fr in tasks]
        for future in as_completed(futures):
            runs += future.result()
            result = write(out, runs, budget, seeds, t0)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="videollm bench ablation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder (finished runs are reused)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--budget", default="default", choices=sorted(BUDGETS))
    parser.add_argument("--arms", help=f"comma-separated subset of {', '.join(ARMS)}")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per process (1 is fastest on a shared CPU)")
    parser.add_argument("--jobs", type=int, default=1, help="(arm, seed) jobs in parallel processes (2 on a 2-core machine)")
    args = parser.parse_args(argv)
    arms = args.arms.split(",") if args.arms else None
    if args.seeds < 1 or (arms and set(arms) - set(ARMS)):
        raise UserError(f"--seeds must be >= 1 and --arms a subset of {', '.join(ARMS)}")
    result = run(Path(args.out), args.seeds, args.budget, args.threads, args.jobs, arms)
    print(json.dumps({"comparisons": result["comparisons"], "seconds": result["seconds"], "out": args.out}))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
