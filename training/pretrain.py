"""Recipe: pretrain a VideoMAP encoder with frame-wise masked autoregressive pretraining.

    videollm pretrain --config training/configs/pretrain_smoke.yaml [key=value …]
    videollm pretrain --config training/configs/pretrain_nano_synth.yaml data.source=my_videos/ output_dir=runs/x
    accelerate launch -m training.pretrain --config training/configs/pretrain_nano_synth.yaml   # multi-GPU

The objective (VideoMAP, or the MAE / UMT baselines) is `encoder.pretrain.VideoMAPPretrainer`.
Every random draw of step s (clips, frames, masked tokens) comes from generators seeded by (seed, s,
micro-batch, process), so a resumed run has the losses of the uninterrupted one. The encoder goes
to ``output_dir/encoder`` (`save_pretrained`: ``VideoMAPModel.from_pretrained`` and the VideoLLM load it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from encoder.build import build_encoder
from encoder.errors import run_cli
from encoder.pretrain import build_pretrainer
from encoder.teacher import TeacherCache
from training.config import config_from_argv
from training.recipe import (Engine, Micro, OptimConfig, Recipe, RecipeConfig, VideoDataConfig,
                             print_summary, run)
from videollm.data.video_sources import SkipTracker, load_batch, step_rng, step_seed

logger = logging.getLogger("training.pretrain")


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
    teacher: str | None = None  # efficientnet_lite0 (embedded), a CLIP/SigLIP id or path; null = pixels only
    teacher_weight: float = 1.0
    teacher_size: int | None = None  # the teacher's input side in px; null = its own (224 for EfficientNet-Lite0)
    teacher_cache: str | None = None  # a folder: targets computed once per clip (and frames); null = every step
    masking: str = "frame"  # frame (random per frame, the same count in each) | tube (the same positions in every frame)
    frame_causal: bool = True  # videomap: the encoder runs frame-causally, so frame t+1 is unseen when predicted


@dataclass
class PretrainData(VideoDataConfig):
    synth_pool: int = 0  # synth: 0 = a fresh clip for every sample; n = draw from seeds 0..n-1


@dataclass
class PretrainOptim(OptimConfig):
    lr: float = 1.5e-4
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 20


@dataclass
class PretrainConfig(RecipeConfig):
    output_dir: str = "runs/pretrain"
    save_every: int = 100
    encoder: str = "nano"  # a preset (random init; nano…, vit-<preset>) or an encoder directory to continue from
    # `VideoMAPConfig` fields for a preset (embed_dim, depth_mamba, attn_every, patch_size,
    # drop_path_rate, patch_stem, motion_gap, …); img_size and num_frames come from data.
    encoder_config: dict = field(default_factory=dict)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: PretrainData = field(default_factory=PretrainData)
    optim: PretrainOptim = field(default_factory=PretrainOptim)


def build_model(cfg: PretrainConfig):
    """The pretrainer (encoder + decoder + heads [+ frozen teacher])."""
    encoder = build_encoder(cfg.encoder, num_frames=cfg.data.num_frames, img_size=cfg.data.size, **cfg.encoder_config)
    options = dataclasses.asdict(cfg.objective)  # the objective's keys are build_pretrainer's arguments
    options.pop("teacher_cache")
    return build_pretrainer(encoder, objective=options.pop("name"), **options)


def sample_batch(source, batch_size: int, keys: tuple[int, ...], skips: SkipTracker) -> tuple[torch.Tensor, list]:
    """The micro-batch of `keys` = (seed, step, micro, process), a pure function of the keys:
    (pixels, the source's indices of the clips; shorter than the batch when some failed to decode)."""
    g, rng = step_rng(*keys)
    n = len(source)
    if n:
        indices = torch.randint(n, (batch_size,), generator=g).tolist()
        draw = lambda: int(torch.randint(n, (1,), generator=g))
    else:  # unbounded synthetic stream: seeds derived from the keys
        indices = [step_seed(*keys, j) % (2 ** 62) for j in range(batch_size)]
        extra = iter(range(batch_size, 10 ** 9))
        draw = lambda: step_seed(*keys, next(extra)) % (2 ** 62)
    pixels, _ = load_batch(source, indices, rng, skips, draw=draw)
    return pixels, indices  # (B', 3, T, S, S)


class Pretrain(Recipe):
    name = "pretrain"
    final_name = "encoder"

    def setup(self, engine: Engine):
        self.source = self.cfg.data.open(size_hint=self.cfg.data.synth_pool)
        self.skips = SkipTracker(self.cfg.data.max_skipped)
        model = build_model(self.cfg)
        self.cache = None
        if self.cfg.objective.teacher_cache and model.teacher is not None:
            self.cache = TeacherCache(self.cfg.objective.teacher_cache, model.teacher)
        return model

    def loss(self, model, step: int, micro: int) -> Micro:
        model.train()
        keys = (self.cfg.seed, step, micro, self.engine.rank)
        pixels, indices = sample_batch(self.source, self.cfg.batch_size, keys, self.skips)
        feats = None
        if self.cache is not None and len(indices) == pixels.shape[0]:
            grid = (pixels.shape[-2] // model.patch_size, pixels.shape[-1] // model.patch_size)
            feats = self.cache.features([self.clip_key(i, clip) for i, clip in zip(indices, pixels)],
                                        list(range(pixels.shape[2])), pixels, grid)
        mask_gen, _ = step_rng(*keys, 1)
        result = model(pixels.to(self.engine.device), generator=mask_gen, teacher_features=feats)
        return Micro(result.loss, {k: float(v) for k, v in result.terms.items()}, samples=pixels.shape[0])

    def clip_key(self, index, clip: torch.Tensor) -> str:
        """The cache key of a loaded clip: its seed and render settings for a synthetic source; else what
        its pixels are (a video file's clip is a random segment, so its path alone does not name it)."""
        if hasattr(self.source, "clip_key"):
            return self.source.clip_key(index)
        return f"pixels:{tuple(clip.shape)}:{hashlib.sha1(clip.numpy().tobytes()).hexdigest()}"

    def status(self) -> dict:
        cache = {"teacher_cache_hits": self.cache.hits, "teacher_cache_misses": self.cache.misses} if self.cache else {}
        return {"skipped": self.skips.events, "skipped_files": len(self.skips.bad), **cache}

    def save_final(self, model, directory: Path) -> None:
        model.encoder.save_pretrained(directory)
        if self.skips.bad:
            logger.warning("%d undecodable video(s) skipped %d time(s): %s", len(self.skips.bad), self.skips.events,
                           ", ".join(self.skips.bad))


def train(cfg: PretrainConfig) -> dict:
    """Run (or resume) pretraining: the last metrics record with ``encoder``, the saved encoder's folder."""
    summary = run(Pretrain(cfg))
    return {**summary, "encoder": summary["final"]}


def main(argv: list[str] | None = None) -> int:
    cfg = config_from_argv(PretrainConfig, "videollm pretrain", __doc__, argv, "optim.lr=3e-4 data.source=videos/")
    return print_summary(train(cfg), ("step", "loss", "skipped", "output_dir", "encoder"))


if __name__ == "__main__":
    sys.exit(run_cli(main))
