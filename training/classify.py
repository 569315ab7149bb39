"""Recipe: evaluate a video encoder by classification — fine-tuning or linear probing.

    videollm classify --config training/configs/classify_synth_motion.yaml init=runs/pretrain/encoder
    videollm classify --config … mode=linear data.label_fraction=0.1 init=null      # from scratch
    videollm classify --config … data.source=list data.train_list=k400/train.csv data.val_list=k400/val.csv

Data: Kinetics-style list files (``path,label``; see `videollm.data.video_sources`) or the synthetic
generator (``data.source=synth``: clips of seeds ``train_seed + i`` for training and
``val_seed + i`` for testing; the time-dependent tasks are ``motion`` and ``order``).
``data.label_fraction`` keeps only that fraction of the training labels (a fixed, seeded subset).

Model: the encoder (``init``: a ``save_pretrained`` dir such as ``<pretrain run>/encoder``, a
pretrain run dir, or ``null`` for a randomly initialised ``model`` preset) + mean-pooled patch
tokens (``pool=mean``; the pretext never trains the cls token) + a linear head.
``mode=finetune`` trains everything (AdamW, warmup + cosine); ``mode=linear`` freezes the encoder,
extracts features once and trains a BatchNorm (no affine, as MAE's linear probe) + linear head.

Test: the logits of ``test_clips`` uniformly spaced clips per video are averaged; top-1 / top-5 are
printed as JSON and written to ``output_dir/results.json``.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from encoder.errors import UserError, VideoReadError, run_cli
from training.config import config_from_argv, save_config
from videollm.data.video_sources import SkipTracker, SynthSource, VideoListSource, load_batch, step_rng
from training.pretrain import ModelConfig, build_encoder, seed_everything, warmup_cosine

logger = logging.getLogger("training.classify")


@dataclass
class ClassifyDataConfig:
    source: str = "synth"  # synth | list
    train_list: str | None = None
    val_list: str | None = None
    root: str | None = None
    task: str = "motion"  # synthetic task
    num_train: int = 1000  # synthetic clips available for training (before label_fraction)
    num_val: int = 300
    train_seed: int = 0
    val_seed: int = 1_000_000  # disjoint from the training (and pretraining pool) seeds
    label_fraction: float = 1.0
    num_frames: int = 8
    size: int = 32
    max_skipped: int = 10
    # Synthetic scene options (motion task), for both training and test clips. background: null =
    # the generator's random mix (plain, noisy, checkered, striped); "plain" = a plain background
    # (gray or black, alternating by seed); or one `videollm.data.synth.BACKGROUNDS` name.
    # distractors: null = 0–2 static extra objects at random; n = exactly n.
    background: str | None = None
    distractors: int | None = None


@dataclass
class ClassifyConfig:
    data: ClassifyDataConfig = field(default_factory=ClassifyDataConfig)
    init: str | None = None  # encoder dir (save_pretrained), a pretrain run dir, or null = scratch
    model: ModelConfig = field(default_factory=ModelConfig)  # used when init is null
    num_classes: int | None = None  # default: the synthetic task's, or max label + 1 of the list
    mode: str = "finetune"  # finetune | linear
    pool: str = "mean"  # mean (of patch tokens) | cls | time (per-frame means, concatenated over time)
    epochs: int = 10
    batch_size: int = 16
    eval_batch_size: int = 32
    lr: float = 5e-4
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    grad_clip: float = 1.0
    test_clips: int = 1
    seed: int = 0
    output_dir: str = "runs/classify"
    num_threads: int = 0

    def validate(self) -> None:
        if self.mode not in ("finetune", "linear"):
            raise UserError(f"mode must be 'finetune' or 'linear'; got {self.mode!r}")
        if self.pool not in ("mean", "cls", "time"):
            raise UserError(f"pool must be 'mean', 'cls' or 'time'; got {self.pool!r}")
        if self.data.background is not None:
            from videollm.data.synth import BACKGROUNDS

            if self.data.background != "plain" and self.data.background not in BACKGROUNDS:
                raise UserError(f"data.background must be null, 'plain' or one of {', '.join(BACKGROUNDS)}; "
                                f"got {self.data.background!r}")
        if self.data.distractors is not None and not 0 <= self.data.distractors <= 3:
            raise UserError(f"data.distractors must be null or in 0..3; got {self.data.distractors}")
        if (self.data.background is not None or self.data.distractors is not None) and (
                self.data.source != "synth" or self.data.task != "motion"):
            raise UserError("data.background / data.distractors apply to the synthetic motion task only")
        if not 0 < self.data.label_fraction <= 1:
            raise UserError(f"data.label_fraction must be in (0, 1]; got {self.data.label_fraction}")
        if self.data.source == "list" and not (self.data.train_list and self.data.val_list):
            raise UserError("data.source=list needs data.train_list and data.val_list ('path,label' files)")
        if self.data.source not in ("synth", "list"):
            raise UserError(f"data.source must be 'synth' or 'list'; got {self.data.source!r}")
        if self.test_clips < 1 or self.epochs < 1 or self.batch_size < 1:
            raise UserError("test_clips, epochs and batch_size must be >= 1")


class VideoClassifier(nn.Module):
    """encoder → pooled features (B, F) → [BatchNorm] → Linear → logits (B, C).

    ``pool``: ``mean`` of all patch tokens (F = D), the ``cls`` token (F = D), or ``time``: the
    mean patch token of each frame, concatenated in frame order (F = T·D), so the head itself sees
    *when* something is where — a mean over all tokens discards the order of the frames.
    """

    def __init__(self, encoder: nn.Module, num_classes: int, pool: str = "mean", probe_norm: bool = False):
        super().__init__()
        self.encoder = encoder
        self.pool = pool
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


def load_encoder(cfg: ClassifyConfig):
    from encoder.videomap import VideoMAPModel

    if cfg.init is None:
        from training.pretrain import DataConfig

        return build_encoder(cfg.model, DataConfig(num_frames=cfg.data.num_frames, size=cfg.data.size))
    path = Path(cfg.init)
    if (path / "encoder" / "config.json").is_file():
        path = path / "encoder"  # a pretrain run dir
    if not (path / "config.json").is_file():
        raise UserError(f"init '{cfg.init}' is not an encoder directory (no config.json); pass the "
                        "'encoder/' folder a pretrain run writes, or init=null for a scratch encoder")
    return VideoMAPModel.from_pretrained(path)


def build_sources(cfg: ClassifyConfig):
    d = cfg.data
    if d.source == "list":
        train = VideoListSource(d.train_list, d.num_frames, d.size, d.root, train=True)
        val = VideoListSource(d.val_list, d.num_frames, d.size, d.root, train=False)
        labels = [it.label for it in train.items + val.items]
        if any(lab is None for lab in labels):
            raise UserError("classification lists need a label on every line ('path,label')")
        num_classes = cfg.num_classes or max(labels) + 1
        n_train = len(train)
    else:
        from videollm.data.synth import NUM_CLASSES

        src = SynthSource if d.background is None and d.distractors is None else SceneSynthSource
        kw = {} if src is SynthSource else {"background": d.background, "distractors": d.distractors}
        train = src(d.num_frames, d.size, d.task, base_seed=d.train_seed, size_hint=d.num_train, **kw)
        val = src(d.num_frames, d.size, d.task, base_seed=d.val_seed, size_hint=d.num_val, **kw)
        num_classes = cfg.num_classes or NUM_CLASSES[d.task]
        n_train = d.num_train
    # A fixed, seeded subset of the training labels.
    k = max(1, round(d.label_fraction * n_train))
    subset = torch.randperm(n_train, generator=torch.Generator().manual_seed(cfg.seed))[:k].tolist()
    return train, val, sorted(subset), num_classes


class SceneSynthSource(SynthSource):
    """`SynthSource` with fixed scene options: ``background`` (None, "plain" or a `BACKGROUNDS`
    name) and ``distractors`` (None or 0..3), passed to `videollm.data.synth.make_clip`."""

    def __init__(self, num_frames: int, size: int, task: str = "motion", base_seed: int = 0, size_hint: int = 0,
                 background: str | None = None, distractors: int | None = None):
        super().__init__(num_frames, size, task, base_seed, size_hint)
        self.background, self.distractors = background, distractors

    def spec_kw(self, seed: int) -> dict:
        from videollm.data.synth import PLAIN_BACKGROUNDS

        kw = {}
        if self.background is not None:
            kw["background"] = (PLAIN_BACKGROUNDS[seed % len(PLAIN_BACKGROUNDS)] if self.background == "plain"
                                else self.background)
        if self.distractors is not None:
            kw["distractors"] = self.distractors
        return kw

    def load(self, i: int, rng=None) -> tuple[torch.Tensor, int]:
        from encoder.transforms import frames_to_tensor
        from videollm.data.synth import make_clip

        seed = self.base_seed + int(i)
        clip = make_clip(seed, self.num_frames, self.size, self.task, **self.spec_kw(seed))
        return frames_to_tensor(clip.frames, self.size), clip.label


class _Cached:
    """Synthetic clips do not change between epochs: render each once."""

    def __init__(self, source):
        self.source, self.cache = source, {}

    def __len__(self):
        return len(self.source)

    def describe(self, i):
        return self.source.describe(i)

    def load(self, i, rng=None):
        if i not in self.cache:
            self.cache[i] = self.source.load(i, rng)
        return self.cache[i]


@torch.no_grad()
def evaluate(predict, val, test_clips: int, batch_size: int, skips: SkipTracker) -> dict:
    """Average the logits of `test_clips` clips per video; top-1 / top-5 over decodable videos."""
    correct1 = correct5 = total = 0
    pending_x, pending_y = [], []

    def flush():
        nonlocal correct1, correct5, total
        x = torch.cat(pending_x)  # (n·K, 3, T, S, S)
        logits = predict(x).reshape(len(pending_y), test_clips, -1).mean(dim=1)  # (n, C)
        y = torch.tensor(pending_y)
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices  # (n, ≤5)
        correct1 += int((top[:, 0] == y).sum())
        correct5 += int((top == y[:, None]).any(dim=1).sum())
        total += len(pending_y)
        pending_x.clear()
        pending_y.clear()

    per_batch = max(1, batch_size // test_clips)
    for i in range(len(val)):
        try:
            clips, y = val.load_clips(i, test_clips)  # (K, 3, T, S, S)
        except VideoReadError as err:
            skips.record(val.describe(i), err)
            continue
        pending_x.append(clips)
        pending_y.append(y)
        if len(pending_y) == per_batch:
            flush()
    if pending_y:
        flush()
    if total == 0:
        raise UserError("no test video could be decoded")
    return {"top1": correct1 / total, "top5": correct5 / total, "num_test": total}


def _features(model: VideoClassifier, source, indices, batch_size, skips) -> tuple[torch.Tensor, torch.Tensor]:
    feats, labels = [], []
    for s in range(0, len(indices), batch_size):
        x, y = load_batch(source, indices[s:s + batch_size], None, skips)
        feats.append(model.features(x))
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def train(cfg: ClassifyConfig) -> dict:
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    t_start = time.time()
    seed_everything(cfg.seed)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    train_src, val_src, subset, num_classes = build_sources(cfg)
    if cfg.data.source == "synth":
        train_src = _Cached(train_src)
    skips = SkipTracker(cfg.data.max_skipped)
    model = VideoClassifier(load_encoder(cfg), num_classes, cfg.pool, probe_norm=cfg.mode == "linear")
    steps_per_epoch = math.ceil(len(subset) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    history = []

    if cfg.mode == "linear":
        model.encoder.requires_grad_(False)
        model.encoder.eval()
        with torch.no_grad():
            feats, labels = _features(model, train_src, subset, cfg.eval_batch_size, skips)  # (n, D), (n,)
        params = list(model.norm.parameters()) + list(model.head.parameters())
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_cosine(round(cfg.warmup_epochs * steps_per_epoch), total, cfg.min_lr / cfg.lr))
        for epoch in range(cfg.epochs):
            model.norm.train()
            g, _ = step_rng(cfg.seed, epoch)
            order = torch.randperm(len(labels), generator=g)
            losses = []
            for s in range(0, len(order), cfg.batch_size):
                idx = order[s:s + cfg.batch_size]
                if len(idx) < 2 and isinstance(model.norm, nn.BatchNorm1d):
                    continue  # BatchNorm needs 2 samples
                loss = F.cross_entropy(model.head(model.norm(feats[idx])), labels[idx])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                scheduler.step()
                losses.append(loss.item())
            history.append(sum(losses) / max(1, len(losses)))
    else:
        decay = [p for n, p in model.named_parameters() if p.ndim > 1 and not getattr(p, "_no_weight_decay", False)]
        no_decay = [p for n, p in model.named_parameters() if not (p.ndim > 1 and not getattr(p, "_no_weight_decay", False))]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.999))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_cosine(round(cfg.warmup_epochs * steps_per_epoch), total, cfg.min_lr / cfg.lr))
        for epoch in range(cfg.epochs):
            model.train()
            g, rng = step_rng(cfg.seed, epoch)
            order = [subset[j] for j in torch.randperm(len(subset), generator=g).tolist()]
            losses = []
            for s in range(0, len(order), cfg.batch_size):
                x, y = load_batch(train_src, order[s:s + cfg.batch_size], rng, skips)
                loss = F.cross_entropy(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                scheduler.step()
                losses.append(loss.item())
            history.append(sum(losses) / len(losses))
            logger.info("epoch %d/%d: train loss %.4f", epoch + 1, cfg.epochs, history[-1])

    model.eval()
    result = evaluate(model, val_src, cfg.test_clips, cfg.eval_batch_size, skips)
    result.update({"mode": cfg.mode, "init": cfg.init, "num_classes": num_classes,
                   "num_train_labeled": len(subset), "test_clips": cfg.test_clips, "epochs": cfg.epochs,
                   "train_loss": history, "skipped": skips.events, "seconds": round(time.time() - t_start, 1)})
    (out / "results.json").write_text(json.dumps(result, indent=1))
    return result


def main(argv: list[str] | None = None) -> int:
    cfg = config_from_argv(ClassifyConfig, "videollm classify", __doc__, argv, "mode=linear init=null")
    result = train(cfg)
    print(json.dumps({k: result[k] for k in ("top1", "top5", "num_test", "mode", "num_train_labeled")}))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
