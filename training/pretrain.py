"""Recipe: pretrain a VideoMAP encoder with frame-wise masked autoregressive pretraining.

    videollm pretrain --config training/configs/pretrain_smoke.yaml [key=value …]
    python -m training.pretrain --config training/configs/pretrain_nano_synth.yaml output_dir=runs/x
    accelerate launch -m training.pretrain --config training/configs/pretrain_nano_synth.yaml   # multi-GPU

The objective (VideoMAP, or the MAE / UMT baselines) is `encoder.pretrain.VideoMAPPretrainer`; this
file is the loop around it: data (a ``path[,label]`` list file, or synthetic clips generated on
the fly), AdamW without weight decay on norms, biases, position tables and tagged parameters, linear
warmup + cosine, gradient accumulation and clipping, `accelerate` for device / mixed precision /
data parallelism, a JSONL metrics log, atomic checkpoints and exact resume.

Exact resume: every random draw of step s (which clips, which frames, which tokens are masked) comes
from generators seeded by (seed, s, micro-batch, process), and the global RNG state (stochastic
depth) is in the checkpoint, so ``resume=true`` continues with the losses the uninterrupted run
would have had. Outputs in ``output_dir``: ``metrics.jsonl``, ``config.yaml``,
``checkpoint-<step>/`` (the full objective state: encoder, decoder, heads, optimizer, scheduler,
RNG) and, at the end, ``encoder/`` (`save_pretrained`, loadable by ``VideoMAPModel.from_pretrained``
and by the VideoLLM).
"""

from __future__ import annotations

import json
import logging
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from encoder.errors import UserError, run_cli
from training.config import config_from_argv, save_config
from videollm.data.video_sources import SkipTracker, SynthSource, VideoListSource, load_batch, step_rng, step_seed

logger = logging.getLogger("training.pretrain")


@dataclass
class ModelConfig:
    preset: str = "nano"
    # Any `VideoMAPConfig` field (embed_dim, depth_mamba, attn_every, patch_size, drop_path_rate, …).
    # img_size and num_frames default to data.size and data.num_frames.
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class ObjectiveConfig:
    name: str = "videomap"  # videomap | mae | umt
    order: str = "frame"  # frame (block-causal, the paper's default) | token
    mask_ratio: float | None = 0.5  # null = sampled per step from a normal truncated to [0.3, 0.7]
    decoder_dim: int = 256
    decoder_depth: int = 4
    decoder_heads: int = 8
    norm_pix: bool = True
    next_weight: float = 1.0  # term (a): frame t predicts frame t+1
    masked_weight: float = 1.0  # term (b): masked tokens at their own positions
    pixel_weight: float = 1.0
    teacher: str | None = None  # CLIP Hub id or local path; null = pixel targets only
    teacher_weight: float = 1.0


@dataclass
class DataConfig:
    source: str = "synth"  # synth | list
    list_file: str | None = None
    root: str | None = None  # relative paths in list_file resolve here (default: its folder)
    task: str = "motion"  # synthetic generator task (the label is unused by pretraining)
    synth_pool: int = 0  # 0 = a fresh synthetic clip for every sample; n = draw from seeds 0..n-1
    num_frames: int = 16
    size: int = 64
    max_skipped: int = 10  # distinct undecodable videos tolerated before giving up


@dataclass
class OptimConfig:
    lr: float = 1.5e-4
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 20
    grad_clip: float = 1.0  # 0 = no clipping


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch_size: int = 8  # per process and micro-batch
    grad_accum: int = 1
    max_steps: int = 1000  # optimizer steps; the schedule spans these
    stop_at_step: int | None = None  # stop early after this step (as if interrupted); for tests
    log_every: int = 1
    save_every: int = 100
    keep_checkpoints: int = 2
    seed: int = 0
    output_dir: str = "runs/pretrain"
    resume: bool = False
    mixed_precision: str = "no"  # no | fp16 | bf16 (accelerate)
    num_threads: int = 0  # torch CPU threads; 0 = torch's default (1 is fastest on a busy CPU)

    def validate(self) -> None:
        if self.data.source not in ("synth", "list"):
            raise UserError(f"data.source must be 'synth' or 'list'; got {self.data.source!r}")
        if self.data.source == "list" and not self.data.list_file:
            raise UserError("data.source=list needs data.list_file (a 'path[,label]' file)")
        for name in ("batch_size", "grad_accum", "max_steps", "log_every", "save_every"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1; got {getattr(self, name)}")


# ---------------------------------------------------------------------------------------------
# Builders: config → plain arguments
# ---------------------------------------------------------------------------------------------


def build_encoder(model: ModelConfig, data: DataConfig):
    from encoder.videomap import VideoMAPConfig, VideoMAPModel

    kw = {"img_size": data.size, "num_frames": data.num_frames, **model.overrides}
    try:
        return VideoMAPModel(VideoMAPConfig.from_preset(model.preset, **kw))
    except (ValueError, TypeError) as err:
        raise UserError(f"model: {err}") from None


def build_model(cfg: PretrainConfig):
    from encoder.pretrain import build_pretrainer

    o = cfg.objective
    return build_pretrainer(
        build_encoder(cfg.model, cfg.data), teacher=o.teacher, objective=o.name, order=o.order,
        mask_ratio=o.mask_ratio, decoder_dim=o.decoder_dim, decoder_depth=o.decoder_depth,
        decoder_heads=o.decoder_heads, norm_pix=o.norm_pix, next_weight=o.next_weight,
        masked_weight=o.masked_weight, pixel_weight=o.pixel_weight, teacher_weight=o.teacher_weight)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: no decay for tagged parameters (``_no_weight_decay``), 1-D tensors
    (norms, biases) and position/mask/cls tables; decay for the rest."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = (getattr(p, "_no_weight_decay", False) or p.ndim <= 1
                or any(k in name for k in ("pos_embed", "mask_token", "cls_token")))
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(warmup: int, total: int, min_ratio: float = 0.0):
    """LR multiplier: linear from ~0 to 1 over `warmup` steps, then cosine down to `min_ratio`."""

    def fn(step: int) -> float:  # step = number of scheduler steps taken so far (0-based)
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


def build_source(data: DataConfig, train: bool = True):
    if data.source == "list":
        return VideoListSource(data.list_file, data.num_frames, data.size, data.root, train=train)
    return SynthSource(data.num_frames, data.size, data.task, base_seed=0, size_hint=data.synth_pool)


def sample_batch(source, data: DataConfig, batch_size: int, keys: tuple[int, ...], skips: SkipTracker):
    """The micro-batch of `keys` = (seed, step, micro, process): a pure function of the keys."""
    g, rng = step_rng(*keys)
    n = len(source)
    if n:
        def draw():
            return int(torch.randint(n, (1,), generator=g))
        indices = torch.randint(n, (batch_size,), generator=g).tolist()
    else:  # unbounded synthetic stream: seeds derived from the keys
        extra = iter(range(batch_size, 10 ** 9))

        def draw():
            return step_seed(*keys, next(extra)) % (2 ** 62)
        indices = [step_seed(*keys, j) % (2 ** 62) for j in range(batch_size)]
    pixels, _ = load_batch(source, indices, rng, skips, draw=draw)
    return pixels  # (B', 3, T, S, S)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def train(cfg: PretrainConfig) -> dict:
    """Run (or resume) pretraining; returns a summary dict (also the last metrics record)."""
    from accelerate import Accelerator
    from tqdm import tqdm

    from training.checkpoint import MetricsLog, latest_checkpoint, load_checkpoint, save_checkpoint

    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    out = Path(cfg.output_dir)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
    seed_everything(cfg.seed)
    model = build_model(cfg)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr,
                                  betas=tuple(cfg.optim.betas))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(cfg.optim.warmup_steps, cfg.max_steps, cfg.optim.min_lr / cfg.optim.lr))
    source = build_source(cfg.data)
    skips = SkipTracker(cfg.data.max_skipped)

    start = 0
    ckpt = latest_checkpoint(out) if out.exists() else None
    if cfg.resume and ckpt is not None:
        info = load_checkpoint(ckpt, model=model, optimizer=optimizer, scheduler=scheduler)
        start = info["step"]
        skips = SkipTracker(cfg.data.max_skipped, **info["extra"].get("skips", {}))
        logger.info("resumed from %s (step %d)", ckpt, start)
    elif ckpt is not None:
        raise UserError(f"'{out}' already holds checkpoints ({ckpt.name}); pass resume=true to continue, "
                        "or choose another output_dir")
    model, optimizer = accelerator.prepare(model, optimizer)
    metrics = MetricsLog(out / "metrics.jsonl", resume_step=start if start else None)
    config_yaml = None
    if accelerator.is_main_process:
        save_config(cfg, out / "config.yaml")
        config_yaml = (out / "config.yaml").read_text()

    stop = min(cfg.max_steps, cfg.stop_at_step or cfg.max_steps)
    params = [p for p in model.parameters() if p.requires_grad]
    bar = tqdm(total=cfg.max_steps, initial=start, desc="pretrain", disable=not sys.stderr.isatty(),
               dynamic_ncols=True)
    record: dict = {}
    for step in range(start + 1, stop + 1):
        model.train()
        t0 = time.perf_counter()
        loss_sum, terms_sum, clips = 0.0, {}, 0
        for micro in range(cfg.grad_accum):
            keys = (cfg.seed, step, micro, accelerator.process_index)
            pixels = sample_batch(source, cfg.data, cfg.batch_size, keys, skips).to(accelerator.device)
            mask_gen, _ = step_rng(*keys, 1)
            with accelerator.autocast():
                result = model(pixels, generator=mask_gen)
            accelerator.backward(result.loss / cfg.grad_accum)
            loss_sum += result.loss.item() / cfg.grad_accum
            for k, v in result.terms.items():
                terms_sum[k] = terms_sum.get(k, 0.0) + float(v) / cfg.grad_accum
            clips += pixels.shape[0]
        grad_norm = None
        if cfg.optim.grad_clip > 0:
            grad_norm = float(accelerator.clip_grad_norm_(params, cfg.optim.grad_clip))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        if not math.isfinite(loss_sum):
            raise RuntimeError(f"loss is {loss_sum} at step {step}; lower optim.lr or check the data")
        record = {"step": step, "loss": loss_sum, **terms_sum, "lr": scheduler.get_last_lr()[0],
                  "grad_norm": grad_norm, "clips_per_s": clips * accelerator.num_processes / dt,
                  "skipped": skips.events, "skipped_files": len(skips.bad)}
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum:.4f}", clips_s=f"{record['clips_per_s']:.1f}")
        if accelerator.is_main_process and (step % cfg.log_every == 0 or step == stop):
            metrics.log(record)
        if step % cfg.save_every == 0 or step == cfg.max_steps:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                save_checkpoint(out, step, model=accelerator.unwrap_model(model), optimizer=optimizer,
                                scheduler=scheduler, config_yaml=config_yaml, keep=cfg.keep_checkpoints,
                                extra={"skips": skips.state()})
    bar.close()
    accelerator.wait_for_everyone()
    if stop == cfg.max_steps and accelerator.is_main_process:
        encoder = accelerator.unwrap_model(model).encoder
        encoder.save_pretrained(out / "encoder")
        logger.info("encoder saved to %s", out / "encoder")
    if skips.bad:
        logger.warning("%d undecodable video(s) skipped %d time(s): %s", len(skips.bad), skips.events,
                       ", ".join(skips.bad))
    return {**record, "output_dir": str(out), "encoder": str(out / "encoder") if stop == cfg.max_steps else None}


def main(argv: list[str] | None = None) -> int:
    cfg = config_from_argv(PretrainConfig, "videollm pretrain", __doc__, argv, "optim.lr=3e-4 output_dir=runs/x")
    summary = train(cfg)
    print(json.dumps({k: summary.get(k) for k in ("step", "loss", "skipped", "output_dir", "encoder")}))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
