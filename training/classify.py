"""Recipe: evaluate a video encoder by classification — fine-tuning or linear probing.

    videollm classify --config training/configs/classify_synth_motion.yaml encoder=runs/pretrain/encoder
    videollm classify --config … mode=linear data.label_fraction=0.1 encoder=nano     # a scratch encoder
    videollm classify --config training/configs/classify_list.yaml data.source=k400/train/ data.val_source=k400/val/

Data: a folder with one sub-folder per class (``data.val_source`` is numbered by the training
folder's classes), ``path,label`` list files, or ``synth`` (seeds ``train_seed + i`` / ``val_seed +
i``). ``mode=finetune`` trains everything; ``mode=linear`` freezes the encoder, extracts features
once and trains a BatchNorm (no affine) + linear head without weight decay or clipping, as MAE's
linear probe. The test averages the logits of ``test_clips`` clips per video; top-1 / top-5 go to
the metrics and ``output_dir/results.json``, the classifier to ``output_dir/final`` (`load_classifier`).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from encoder.build import build_encoder
from encoder.errors import UserError, VideoReadError, run_cli
from encoder.videomap import VideoMAPModel
from training.config import check, config_from_argv, in_range, one_of
from training.recipe import (Engine, Micro, OptimConfig, Recipe, RecipeConfig, VideoDataConfig,
                             print_summary, run)
from videollm.data.synth import NUM_CLASSES
from videollm.data.video_sources import SkipTracker, load_batch, step_rng

logger = logging.getLogger("training.classify")


@dataclass
class ClassifyData(VideoDataConfig):
    val_source: str | None = None  # test videos: a folder or list file (synth: seeds from val_seed)
    num_frames: int = 8
    size: int = 32
    num_train: int = 1000  # synth: clips available for training (before label_fraction)
    num_val: int = 300  # synth: test clips
    train_seed: int = 0
    val_seed: int = 1_000_000  # disjoint from the training (and pretraining pool) seeds
    label_fraction: float = 1.0  # a fixed, seeded subset of the training labels


@dataclass
class ClassifyOptim(OptimConfig):
    lr: float = 5e-4
    weight_decay: float = 0.05
    warmup_steps: int = 50
    min_lr_ratio: float = 0.002


@dataclass
class ClassifyConfig(RecipeConfig):
    output_dir: str = "runs/classify"
    steps: int = 500
    batch_size: int = 16
    encoder: str = "nano"  # an encoder dir (save_pretrained), a pretrain run dir, or a preset (random init)
    encoder_config: dict = field(default_factory=dict)  # `VideoMAPConfig` fields for a preset encoder
    num_classes: int | None = None  # default: the synthetic task's, the folder's classes, or max label + 1
    mode: str = "finetune"  # finetune | linear
    pool: str = "mean"  # mean (of patch tokens) | cls | time (per-frame means, concatenated over time)
    eval_batch_size: int = 32
    test_clips: int = 1  # clips per test video whose logits are averaged
    data: ClassifyData = field(default_factory=ClassifyData)
    optim: ClassifyOptim = field(default_factory=ClassifyOptim)

    def validate(self) -> None:
        super().validate()
        check(self, {"mode": one_of("finetune", "linear"), "pool": one_of("mean", "cls", "time"),
                     "data.label_fraction": in_range(0, 1, low_open=True), "test_clips": in_range(1),
                     "eval_batch_size": in_range(1)})
        if self.data.source != "synth" and not self.data.val_source:
            raise UserError("data.val_source is needed with a folder or list file: the test videos (a folder with "
                            "the training folder's class sub-folders, or a 'path,label' list)")


class VideoClassifier(nn.Module):
    """encoder → pooled features (B, F) → [BatchNorm] → Linear → logits (B, C). ``pool``: ``mean`` /
    ``cls`` (F = D), or ``time``: each frame's mean patch token in order (F = T·D), to keep *when*."""

    def __init__(self, encoder: nn.Module, num_classes: int, pool: str = "mean", probe_norm: bool = False):
        super().__init__()
        self.encoder = encoder
        self.pool = pool
        self.probe_norm = probe_norm
        D = encoder.config.embed_dim
        F_ = D * encoder.config.num_frames if pool == "time" else D
        self.norm = nn.BatchNorm1d(F_, affine=False) if probe_norm else nn.Identity()
        self.head = nn.Linear(F_, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        h = self.encoder(pixel_values).last_hidden_state  # (B, 1 + T·N, D)
        if self.pool == "time":
            T = pixel_values.shape[2]
            if T != self.encoder.config.num_frames:
                raise UserError(f"pool=time needs clips of exactly {self.encoder.config.num_frames} frames; got {T}")
            return h[:, 1:].reshape(h.shape[0], T, -1, h.shape[-1]).mean(dim=2).flatten(1)  # (B, T·D)
        return h[:, 1:].mean(dim=1) if self.pool == "mean" else h[:, 0]  # (B, D)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.features(pixel_values)))  # (B, C)

    def save(self, directory: Path, classes: list[str] | None = None) -> None:
        """``encoder/``, ``classifier.safetensors`` (norm + head), ``classifier.json`` (its settings)."""
        directory = Path(directory)
        self.encoder.save_pretrained(directory / "encoder")
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items() if not k.startswith("encoder.")}
        save_file(state, str(directory / "classifier.safetensors"))
        (directory / "classifier.json").write_text(json.dumps(
            {"num_classes": self.head.out_features, "pool": self.pool, "probe_norm": self.probe_norm,
             "classes": classes}, indent=1) + "\n")


def load_classifier(path: str | Path) -> tuple[VideoClassifier, list[str] | None]:
    """A saved classifier (``<classify run>/final``) in eval mode and its class names (or None)."""
    path = Path(path)
    if not (path / "classifier.json").is_file():
        raise UserError(f"'{path}' is not a saved classifier (no classifier.json); give <classify run>/final")
    meta = json.loads((path / "classifier.json").read_text())
    model = VideoClassifier(VideoMAPModel.from_pretrained(path / "encoder"), meta["num_classes"], meta["pool"],
                            meta["probe_norm"])
    missing, unexpected = model.load_state_dict(load_file(str(path / "classifier.safetensors")), strict=False)
    if unexpected or [k for k in missing if not k.startswith("encoder.")]:
        raise UserError(f"'{path / 'classifier.safetensors'}' does not match classifier.json")
    return model.eval(), meta["classes"]


class _Cached:
    """Synthetic clips do not change between epochs: render each once."""

    def __init__(self, source):
        self.source, self.cache, self.describe = source, {}, source.describe

    def load(self, i, rng=None):
        if i not in self.cache:
            self.cache[i] = self.source.load(i, rng)
        return self.cache[i]


def build_sources(cfg: ClassifyConfig):
    """(train source, test source, the labelled subset of training indices, num_classes, class names)."""
    d = cfg.data
    train = d.open(base_seed=d.train_seed, size_hint=d.num_train, train=True)
    val = d.open("synth" if d.source == "synth" else d.val_source, base_seed=d.val_seed, size_hint=d.num_val,
                 train=False, classes=train.classes)
    if d.source == "synth":
        num_classes, n_train = cfg.num_classes or NUM_CLASSES[d.task], d.num_train
    else:
        for src in (train, val):
            unlabelled = next((i for i, it in enumerate(src.items) if it.label is None), None)
            if unlabelled is not None:
                raise UserError(f"{src.describe(unlabelled)} has no label: classification needs one sub-folder per "
                                "class (<folder>/<class>/<video>) or a 'path,label' line for every video")
        num_classes = cfg.num_classes or (len(train.classes) if train.classes is not None
                                          else max(it.label for it in train.items + val.items) + 1)
        n_train = len(train)
    k = max(1, round(d.label_fraction * n_train))
    subset = torch.randperm(n_train, generator=torch.Generator().manual_seed(cfg.seed))[:k].tolist()
    return train, val, sorted(subset), num_classes, train.classes


@torch.no_grad()
def evaluate(predict, val, test_clips: int, batch_size: int, skips: SkipTracker, device=None) -> dict:
    """Average the logits of `test_clips` clips per video; top-1 / top-5 over decodable videos."""
    correct1 = correct5 = total = 0
    xs, ys = [], []
    per_batch = max(1, batch_size // test_clips)
    for i in range(len(val)):
        try:
            clips, y = val.load_clips(i, test_clips)  # (K, 3, T, S, S)
            xs.append(clips)
            ys.append(y)
        except VideoReadError as err:
            skips.record(val.describe(i), err)
        if ys and (len(ys) == per_batch or i == len(val) - 1):
            x = torch.cat(xs).to(device)  # (n·K, 3, T, S, S)
            logits = predict(x).float().cpu().reshape(len(ys), test_clips, -1).mean(dim=1)  # (n, C)
            top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices  # (n, ≤5)
            y = torch.tensor(ys)
            correct1 += int((top[:, 0] == y).sum())
            correct5 += int((top == y[:, None]).any(dim=1).sum())
            total += len(ys)
            xs, ys = [], []
    if total == 0:
        raise UserError("no test video could be decoded")
    return {"top1": correct1 / total, "top5": correct5 / total, "num_test": total}


class Classify(Recipe):
    name = "classify"

    def setup(self, engine: Engine):
        cfg = self.cfg
        self.train_src, self.val_src, self.subset, self.num_classes, self.classes = build_sources(cfg)
        if cfg.data.source == "synth":
            self.train_src = _Cached(self.train_src)
        self.skips = SkipTracker(cfg.data.max_skipped)
        encoder = build_encoder(cfg.encoder, num_frames=cfg.data.num_frames, img_size=cfg.data.size, **cfg.encoder_config)
        model = VideoClassifier(encoder, self.num_classes, cfg.pool, probe_norm=cfg.mode == "linear")
        self.linear = cfg.mode == "linear"
        if self.linear:
            # The linear probe as MAE's: no weight decay, no clipping.
            self.optim = replace(cfg.optim, weight_decay=0.0, grad_clip=0.0)
            model.encoder.requires_grad_(False)
            model.encoder.eval()
            feats, labels, bs = [], [], cfg.eval_batch_size
            with torch.no_grad():  # the frozen encoder's features, extracted once
                for s in range(0, len(self.subset), bs):
                    x, y = load_batch(self.train_src, self.subset[s:s + bs], None, self.skips)
                    feats.append(model.features(x))
                    labels.append(y)
            self.feats, self.labels = torch.cat(feats), torch.cat(labels)  # (n, F), (n,)
            n = len(self.labels)  # BatchNorm needs 2 samples: a last batch of 1 is left out
            batches = n // cfg.batch_size + (n % cfg.batch_size >= 2)
        else:
            batches = -(-len(self.subset) // cfg.batch_size)
        # Process r of `world` takes batch k·world + r of the epoch's order: each reads its own share.
        self.steps_per_epoch = batches // (cfg.grad_accum * engine.world)
        if self.steps_per_epoch == 0:
            raise UserError(f"{len(self.subset)} labelled clip(s) make no optimizer step of batch_size="
                            f"{cfg.batch_size} × grad_accum={cfg.grad_accum} × {engine.world} process(es)")
        self._order_epoch, self._order = None, None
        self._train_mode(model)
        return model

    def _train_mode(self, model) -> None:
        (model.norm if self.linear else model).train()

    def _epoch_order(self, epoch: int) -> list[int]:
        """The order in which epoch `epoch` visits the labelled clips (a pure function of seed and epoch)."""
        if self._order_epoch != epoch:
            g, _ = step_rng(self.cfg.seed, epoch)
            n = len(self.labels) if self.linear else len(self.subset)
            self._order, self._order_epoch = torch.randperm(n, generator=g).tolist(), epoch
        return self._order

    def loss(self, model, step: int, micro: int) -> Micro:
        cfg = self.cfg
        epoch, k = divmod(step - 1, self.steps_per_epoch)
        k = (k * cfg.grad_accum + micro) * self.engine.world + self.engine.rank
        idx = self._epoch_order(epoch)[k * cfg.batch_size:(k + 1) * cfg.batch_size]
        if self.linear:
            x, y = self.feats[idx].to(self.engine.device), self.labels[idx].to(self.engine.device)
            return Micro(F.cross_entropy(model.head(model.norm(x)), y), samples=len(idx))
        _, rng = step_rng(cfg.seed, epoch, k)
        x, y = load_batch(self.train_src, [self.subset[j] for j in idx], rng, self.skips)
        return Micro(F.cross_entropy(model(x.to(self.engine.device)), y.to(self.engine.device)), samples=len(y))

    def status(self) -> dict:
        return {"epoch": (self._order_epoch or 0) + 1, "skipped": self.skips.events}

    def evaluate(self, model, step: int) -> dict:
        model.eval()
        result = evaluate(model, self.val_src, self.cfg.test_clips, self.cfg.eval_batch_size, self.skips,
                          self.engine.device)
        self._train_mode(model)
        return result

    def save_final(self, model, directory: Path) -> None:
        model.save(directory, self.classes)


def train(cfg: ClassifyConfig) -> dict:
    """Train (or resume) and test; returns the results also written to ``output_dir/results.json``."""
    t_start, recipe = time.time(), Classify(cfg)
    summary = run(recipe)
    results_file = Path(cfg.output_dir) / "results.json"
    if "top1" not in summary:
        if summary["final"] is None:
            return summary  # stopped early (stop_after): no test yet
        if results_file.is_file():  # resumed a finished run: nothing new was trained or tested
            return json.loads(results_file.read_text())
        raise UserError(f"'{cfg.output_dir}' finished training but holds no results.json; choose another output_dir")
    result = {**{k: summary[k] for k in ("top1", "top5", "num_test")}, "mode": cfg.mode, "encoder": cfg.encoder,
              "num_classes": recipe.num_classes, "classes": recipe.classes, "num_train_labeled": len(recipe.subset),
              "test_clips": cfg.test_clips, "steps": summary["step"], "train_loss": summary["loss"],
              "skipped": summary["skipped"], "final": summary["final"], "seconds": round(time.time() - t_start, 1)}
    if recipe.engine.is_main:
        results_file.write_text(json.dumps(result, indent=1) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    cfg = config_from_argv(ClassifyConfig, "videollm classify", __doc__, argv, "mode=linear encoder=runs/x/encoder")
    result = train(cfg)
    return print_summary(result, ("top1", "top5", "num_test", "mode", "num_train_labeled", "final"))


if __name__ == "__main__":
    sys.exit(run_cli(main))
