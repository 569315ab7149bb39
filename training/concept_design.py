"""``videollm bench concepts``: which design carries real-world concepts into the video tokens, for
sources never trained on?

    videollm bench concepts --out runs/concepts [--seeds 3] [--steps 400] [--jobs 2]

Each arm starts from the shipped default model's encoder and projector and is trained for ``--steps``
on 4-frame clips of our `videollm.data.real.TRAIN` sources (camera moves) plus synthetic clips: every
token of a real frame should carry the concepts the frozen ImageNet classifier gives that frame (its
top 5, the rest as "none"), every token of a synthetic frame "none". Then, on clips of
`videollm.data.real.HELDOUT` (a video and a photo never trained on) and of the training sources: does
the clip's strongest concept agree with the classifier's top-1 (``top1``), is it among its top 5
(``top5``)? Arms:

- ``pixels``: no concept stem; the projector's MLP output is scored against the LLM's embeddings of the
  1000 class names (as grounding scores colour and shape words): concepts learned from the pixels.
- ``stem_word_space``: the concept stem (`encoder.concepts`), read the same way in word space.
- ``stem_code_space``: the stem, read in its own code space (`ConceptStem.logits`).
- ``stem_code_space_random``: that, with half of the real clips given random concept mixtures
  (`encoder.concepts.random_concepts`) so the pass-through is trained for every class: the design the
  default model uses.

``--out`` gets ``concepts.json`` (per arm: mean ± std over seeds and the per-seed runs; rewritten as runs
land, finished runs reused).
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from encoder.concepts import classify_frames, random_concepts
from encoder.errors import is_quiet, quiet, run_cli
from encoder.files import atomic_write_text
from encoder.teacher import imagenet_class_names
from encoder.transforms import frames_to_tensor
from encoder.videomap import VideoMAPConfig, VideoMAPModel
from training.ground import concept_targets
from videollm.data.real import HELDOUT, TRAIN, camera_clip, load_source
from videollm.data.synth import make_clip
from videollm.modeling_videollm import load_videollm, word_embedding_rows
from videollm.projectors import VideoProjector

ARMS = {"pixels": (False, "word", 0.0), "stem_word_space": (True, "word", 0.5),
        "stem_code_space": (True, "code", 0.0), "stem_code_space_random": (True, "code", 0.5)}
FRAMES, SIZE, CONCEPT_SIZE = 4, 64, 128
NONE_LOGIT, TAU = 4.0, 15.0


def pool(sources: tuple[str, ...], n: int, seed: int) -> dict:
    """n clips cycling over `sources`: pixels at concept size, the classifier's probabilities, names."""
    rng = np.random.default_rng(seed)
    frames = np.stack([camera_clip(load_source(sources[i % len(sources)]), FRAMES, rng, CONCEPT_SIZE)
                       for i in range(n)])  # (n, T, 128, 128, 3) uint8
    probs = torch.cat([classify_frames(pixels(frames[i:i + 32]), FRAMES, CONCEPT_SIZE) for i in range(0, n, 32)])
    return {"frames": frames, "probs": probs, "source": [sources[i % len(sources)] for i in range(n)]}


def pixels(frames: np.ndarray) -> torch.Tensor:
    """(B, T, H, W, 3) uint8 → (B, 3, T, H, W), normalised as the encoder reads them."""
    return torch.stack([frames_to_tensor(f, f.shape[1]) for f in frames])


def build(arm: str):
    """(encoder, projector, lemma keys) from the shipped default; the stem arms get a concept stem."""
    model, processor = load_videollm(None, num_frames=FRAMES, pack=False)
    encoder = model.vision_tower
    if ARMS[arm][0]:
        cfg = VideoMAPConfig(**{**encoder.config.to_dict(), "concept_frames": FRAMES, "concept_size": CONCEPT_SIZE})
        stem = VideoMAPModel(cfg)
        missing, unexpected = stem.load_state_dict(encoder.state_dict(), strict=False)
        assert not unexpected and all(k.startswith("concepts.") for k in missing), missing
        encoder = stem
    rows = word_embedding_rows(model.get_input_embeddings().weight, processor.tokenizer, imagenet_class_names())
    return encoder, model.projector, F.normalize(rows - rows.mean(0), dim=-1).detach()


def scores(arm: str, encoder, projector, keys, x: torch.Tensor, probs: torch.Tensor | None) -> torch.Tensor:
    """(B, K, 1001) per video token: the 1000 concepts' logits and "none"."""
    if not ARMS[arm][0]:
        x = F.interpolate(x.transpose(1, 2).flatten(0, 1), size=(SIZE, SIZE), mode="bilinear", antialias=True,
                          align_corners=False).unflatten(0, (x.shape[0], FRAMES)).transpose(1, 2)
    out = encoder(x, **({"concept_probs": probs} if ARMS[arm][0] else {}))
    grid = tuple(out.grid)
    if ARMS[arm][1] == "code":
        s = projector.pool(out.concept_logits, grid, reduce="mean")
    else:
        z = VideoProjector.forward(projector, out.last_hidden_state, grid, out.stem_states)
        s = TAU * F.normalize(z, dim=-1) @ keys.T
    return torch.cat([s, s.new_full((*s.shape[:-1], 1), NONE_LOGIT)], -1)


def synthetic(rng: np.random.Generator, n: int) -> torch.Tensor:
    return torch.stack([frames_to_tensor(make_clip(int(rng.integers(1 << 30)), FRAMES, SIZE, "motion").frames,
                                         CONCEPT_SIZE) for _ in range(n)])


@torch.no_grad()
def evaluate(arm, encoder, projector, keys, data: dict) -> dict:
    hits1, hits5, per_source = [], [], {}
    for i in range(0, len(data["frames"]), 16):
        x, probs = pixels(data["frames"][i:i + 16]), data["probs"][i:i + 16]
        clip = scores(arm, encoder, projector, keys, x, probs).softmax(-1).mean(1)[:, :-1]  # (b, 1000)
        teacher = probs.mean(1)
        for j, top in enumerate(clip.argmax(-1)):
            h1, h5 = bool(top == teacher[j].argmax()), bool((teacher[j].topk(5).indices == top).any())
            hits1.append(h1), hits5.append(h5)
            per_source.setdefault(data["source"][i + j], []).append(h1)
    return {"top1": statistics.fmean(hits1), "top5": statistics.fmean(hits5),
            "top1_per_source": {k: statistics.fmean(v) for k, v in per_source.items()}}


def run_arm(out: Path, arm: str, seed: int, steps: int, pools: dict) -> dict:
    done = out / arm / f"seed{seed}.json"
    if done.is_file():
        return json.loads(done.read_text())
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    encoder, projector, keys = build(arm)
    fast = [p for n, p in encoder.named_parameters() if n.startswith("concepts.")] + list(projector.parameters())
    slow = [p for n, p in encoder.named_parameters() if not n.startswith("concepts.")]
    opt = torch.optim.AdamW([{"params": fast, "lr": 1e-3}, {"params": slow, "lr": 3e-4}], weight_decay=0.0)
    train, t0 = pools["train"], time.time()
    encoder.train()
    for _ in range(steps):
        idx = rng.choice(len(train["frames"]), 6, replace=False)
        x = torch.cat([pixels(train["frames"][idx]), synthetic(rng, 2)])
        synth = torch.tensor([False] * 6 + [True] * 2)
        probs = torch.cat([train["probs"][torch.from_numpy(idx)], classify_frames(x[6:], FRAMES, CONCEPT_SIZE)])
        for b in range(6):
            if ARMS[arm][2] and rng.random() < ARMS[arm][2]:
                probs[b] = random_concepts(1, FRAMES, gen)[0]
        s = scores(arm, encoder, projector, keys, x, probs)
        loss = -(concept_targets(probs, synth, s.shape[1] // FRAMES) * F.log_softmax(s, -1)).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    encoder.eval()
    result = {"arm": arm, "seed": seed, "steps": steps, "loss": loss.item(), "seconds": round(time.time() - t0),
              "train": evaluate(arm, encoder, projector, keys, pools["train_eval"]),
              "heldout": evaluate(arm, encoder, projector, keys, pools["heldout"])}
    done.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(done, json.dumps(result, indent=1))
    return result


def summarize(runs: list[dict]) -> dict:
    out = {}
    for arm in ARMS:
        rs = sorted((r for r in runs if r["arm"] == arm), key=lambda r: r["seed"])
        if not rs:
            continue
        entry = {"runs": rs}
        for split in ("train", "heldout"):
            for key in ("top1", "top5"):
                xs = [r[split][key] for r in rs]
                entry[f"{split}_{key}"] = {"mean": statistics.fmean(xs), "n": len(xs),
                                           "std": statistics.stdev(xs) if len(xs) > 1 else 0.0}
        out[arm] = entry
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="videollm bench concepts", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/concepts")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--jobs", type=int, default=2, help="runs at once (one thread each)")
    p.add_argument("--arms", default=",".join(ARMS))
    args = p.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    arms = args.arms.split(",")
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        p.error(f"unknown arm(s) {unknown}; choose from {', '.join(ARMS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    pools = {"train": pool(TRAIN, 480, 1), "train_eval": pool(TRAIN, 120, 3), "heldout": pool(HELDOUT, 120, 2)}
    jobs = [(arm, seed) for seed in range(args.seeds) for arm in arms]
    runs = []
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.jobs, mp_context=ctx, initializer=quiet if is_quiet() else None) as pool_:
        futures = [pool_.submit(run_arm, out, arm, seed, args.steps, pools) for arm, seed in jobs]
        for f in as_completed(futures):
            runs.append(f.result())
            summary = {"command": "videollm bench concepts " + " ".join(argv if argv is not None else sys.argv[1:]),
                       "split": {"train": TRAIN, "heldout": HELDOUT}, "summary": summarize(runs)}
            atomic_write_text(out / "concepts.json", json.dumps(summary, indent=1))
    print(json.dumps({arm: {k: round(v["mean"], 3) for k, v in e.items() if k != "runs"}
                      for arm, e in summarize(runs).items()}))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
