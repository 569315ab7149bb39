"""VideoLLM fine-tuning recipe: stage 1 alignment and stage 2 instruction tuning (LoRA / QLoRA).

    videollm finetune --config training/configs/finetune_stage2_smoke.yaml [key=value …]
    accelerate launch --num_processes 8 -m training.finetune --config … deepspeed=training/configs/zero2.json

- ``stage=1`` (alignment): only the projector trains; the encoder and the LLM are frozen.
- ``stage=2`` (instruction tuning): a peft LoRA adapter on the LLM (``lora.target_modules``) plus
  the projector; ``train_encoder=true`` also trains the encoder. ``init_from=<stage-1 final dir>``
  starts from a stage-1 encoder + projector.
- ``quant=4bit`` (QLoRA): the base LLM is loaded 4-bit nf4 (bitsandbytes, double quantization) and
  prepared with ``peft.prepare_model_for_kbit_training``; stage 2 only.
- ``precision=bf16`` autocasts through accelerate; ``gradient_checkpointing=true`` checkpoints the
  encoder and the LLM.
- Distributed through accelerate; ``deepspeed=<json>`` wraps a DeepSpeed ZeRO config in an
  accelerate ``DeepSpeedPlugin`` ("auto" values are filled from this config). The same code runs
  single-process on CPU.
- A record may set its own ``num_frames`` (e.g. 64 for a long clip; default ``data.num_frames``);
  batches are grouped by it, so a batch never mixes frame counts.

The loop is explicit (torchtune style): AdamW over the trainable parameters, linear warmup then
cosine decay, gradient accumulation and clipping, eval loss on a held-out split every
``eval_every`` steps, ``metrics.jsonl`` (step, loss, lr, grad_norm, eval_loss), atomic
checkpoints every ``save_every`` steps, ``resume=true`` continuing from the latest one exactly
(trainable weights, optimizer, scheduler, RNG, data position), and the final model written with
the VideoLLM ``save_pretrained`` to ``<output_dir>/final`` (with LoRA: base-LLM reference +
adapter + encoder/projector; with the tokenizer that knows ``<video>``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from encoder.errors import UserError, run_cli
from training.config import load_config, to_dict

logger = logging.getLogger(__name__)

DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TRAINABLE_WEIGHTS = "trainable.safetensors"


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    # "synth" (generate the synthetic instruction set into <output_dir>/synth if absent), a
    # JSON / JSONL file in the LLaVA-video layout, or a data-mix YAML.
    source: str = "synth"
    video_root: str | None = None  # default: the data file's folder
    num_frames: int = 8  # frames sampled per video (uniformly, within start/end)
    image_size: int = 224  # frames are resized + centre-cropped to this square
    max_length: int = 2048  # tokens per example (video placeholders included); longer is truncated
    time_line: bool = True  # "The video lasts …" after the video tokens (as at inference)
    system_prompt: str | None = None  # None: the chat template's default system turn; "": an empty one
    eval_fraction: float = 0.05  # held-out share of the distinct record ids (0: no eval)
    max_bad_videos: int = 10  # undecodable videos skipped before the run stops
    num_workers: int = 0
    # Batches of records of similar length (as HF's group_by_length): each group's shuffled records
    # are sorted by token count within windows of `LENGTH_WINDOW` batches, then the batches are
    # shuffled. Less padding (the default model's stage 2: 19% of the tokens it computed), other
    # batch mates.
    group_by_length: bool = False
    synth_samples: int = 256
    synth_num_frames: int = 16
    synth_size: int = 64
    synth_task: str = "motion"


@dataclass
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))


@dataclass
class OptimConfig:
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0  # 0: no clipping
    projector_lr: float | None = None  # the projector's own peak lr (default: lr)
    encoder_lr: float | None = None  # the encoder's, with train_encoder=true (default: lr)


@dataclass
class FinetuneConfig:
    output_dir: str = "runs/finetune"
    stage: int = 2
    llm: str = "smollm2"  # alias, Hub id, local dir or .gguf (see videollm.llm.load_llm)
    llm_cache_dir: str | None = None  # where GGUF → dense copies are cached (default ~/.cache/…)
    encoder: str = "nano"  # VideoMAP preset (random init) or a pretrained encoder dir
    init_from: str | None = None  # a saved VideoLLM (e.g. stage-1 final/): its encoder + projector
    spatial_pool: int = 2
    spatial_merge: str = "avg"  # avg | concat (VideoLLMConfig.spatial_merge); an init_from keeps its own
    stem_skip: bool = False  # the projector also reads the patch stem (VideoLLMConfig.stem_skip); likewise
    max_video_tokens: int | None = None
    train_encoder: bool = False
    # Anchor the video tokens in the LLM's vocabulary (`VideoProjector.anchor`) with these word
    # groups of the synthetic clips (training.ground.WORD_GROUPS: colors, shapes, motions), compared
    # with the tokens as `training.ground` scored them. An init_from that has an anchor keeps it.
    word_anchor: list[str] = field(default_factory=list)
    quant: str = "none"  # none | 4bit
    precision: str = "fp32"  # fp32 | bf16
    gradient_checkpointing: bool = False
    loss_logits_only: bool = False  # LM-head logits only at labelled positions (same loss, less compute)
    deepspeed: str | None = None  # a DeepSpeed JSON, e.g. training/configs/zero2.json
    steps: int = 1000
    batch_size: int = 4  # per process
    grad_accum: int = 1
    eval_every: int = 100
    eval_batches: int = 8
    save_every: int = 500
    keep: int = 2
    log_every: int = 1
    seed: int = 0
    resume: bool = False
    stop_after: int | None = None  # end this invocation after this step (time-limited jobs)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def validate(self) -> None:
        if self.stage not in (1, 2):
            raise UserError(f"stage must be 1 (alignment) or 2 (instruction tuning), got {self.stage}")
        if self.quant not in ("none", "4bit"):
            raise UserError(f"quant must be 'none' or '4bit', got {self.quant!r}")
        if self.precision not in ("fp32", "bf16"):
            raise UserError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")
        from videollm.configuration_videollm import SPATIAL_MERGES

        if self.spatial_merge not in SPATIAL_MERGES:
            raise UserError(f"spatial_merge must be one of {SPATIAL_MERGES}, got {self.spatial_merge!r}")
        if self.stage == 1 and (self.quant != "none" or self.train_encoder):
            raise UserError("stage 1 trains the projector only; quant=4bit and train_encoder=true are stage-2 options")
        for name in ("steps", "batch_size", "grad_accum", "eval_every", "save_every", "log_every"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")
        from training.ground import WORD_GROUPS

        unknown = [g for g in self.word_anchor if g not in WORD_GROUPS]
        if unknown or len(set(self.word_anchor)) != len(self.word_anchor):
            raise UserError(f"word_anchor must list distinct word groups out of {', '.join(WORD_GROUPS)}; "
                            f"got {self.word_anchor}")
        if not 0 <= self.data.eval_fraction < 1:
            raise UserError(f"data.eval_fraction must be in [0, 1), got {self.data.eval_fraction}")
        if self.deepspeed is not None:
            if not Path(self.deepspeed).is_file():
                raise UserError(f"deepspeed config '{self.deepspeed}' not found")
            try:
                stage = json.loads(Path(self.deepspeed).read_text()).get("zero_optimization", {}).get("stage", 0)
            except json.JSONDecodeError as err:
                raise UserError(f"deepspeed config '{self.deepspeed}' is not valid JSON: {err}") from None
            if self.quant == "4bit" and stage == 3:
                raise UserError("quant=4bit with ZeRO-3 is not supported; use zero2.json or no DeepSpeed")


# ---------------------------------------------------------------------------------------------
# Builders (config → plain arguments → objects)
# ---------------------------------------------------------------------------------------------


def build_encoder(name: str, image_size: int, num_frames: int, seed: int):
    """A VideoMAP preset (random init, seeded) or a pretrained encoder directory."""
    from transformers import AutoModel

    from encoder.videomap import PRESETS, VideoMAPConfig, VideoMAPModel

    if name in PRESETS:
        torch.manual_seed(seed)
        return VideoMAPModel(VideoMAPConfig.from_preset(name, img_size=image_size, num_frames=num_frames))
    path = Path(name)
    if not (path / "config.json").is_file():
        raise UserError(f"encoder '{name}' is neither a VideoMAP preset ({', '.join(PRESETS)}) nor a "
                        "directory written by save_pretrained (with config.json)")
    return AutoModel.from_pretrained(str(path))


def _read_safetensors_dir(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise UserError(f"'{path}' holds no model*.safetensors")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def build_model(cfg: FinetuneConfig):
    """(VideoLLMForCausalLM, tokenizer) with the trainable parameters of `cfg.stage` set.

    Thin adapter over videollm: `load_llm` + `add_video_token` + `VideoLLMForCausalLM`.
    """
    from transformers import AutoModel

    from videollm.configuration_videollm import VideoLLMConfig
    from videollm.llm import default_cache_dir, load_llm
    from videollm.modeling_videollm import VideoLLMForCausalLM, add_video_token

    compute_dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    quantization_config = None
    if cfg.quant == "4bit":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise UserError("quant=4bit needs bitsandbytes: pip install bitsandbytes") from None
        from transformers import BitsAndBytesConfig

        quantization_config = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype)

    init = None
    llm_name = cfg.llm
    if cfg.init_from:
        path = Path(cfg.init_from)
        if not (path / "config.json").is_file():
            raise UserError(f"init_from '{path}' is not a saved VideoLLM (no config.json)")
        init = VideoLLMConfig.from_pretrained(str(path))
        if init.base_llm and init.base_llm != cfg.llm:
            logger.warning("init_from %s was trained on LLM '%s'; using it instead of llm=%s",
                           path, init.base_llm, cfg.llm)
            llm_name = init.base_llm
    cache_dir = Path(cfg.llm_cache_dir) if cfg.llm_cache_dir else default_cache_dir()
    llm, tokenizer = load_llm(llm_name, cache_dir=cache_dir, dtype=torch.float32,
                              quantization_config=quantization_config)
    video_token_id = add_video_token(llm, tokenizer)
    if init is not None:
        torch.manual_seed(cfg.seed)
        encoder = AutoModel.from_config(init.vision_config)
        config = init.for_llm(llm.config, video_token_id=video_token_id, base_llm=llm_name)
    else:
        encoder = build_encoder(cfg.encoder, cfg.data.image_size, cfg.data.num_frames, cfg.seed)
        config = VideoLLMConfig(vision_config=encoder.config, text_config=llm.config,
                                spatial_pool=cfg.spatial_pool, spatial_merge=cfg.spatial_merge,
                                stem_skip=cfg.stem_skip, max_video_tokens=cfg.max_video_tokens,
                                video_token_id=video_token_id, base_llm=llm_name)
    torch.manual_seed(cfg.seed)  # the projector's init
    model = VideoLLMForCausalLM(config, vision_tower=encoder, language_model=llm)
    if init is not None:
        state = {k: v for k, v in _read_safetensors_dir(Path(cfg.init_from)).items()
                 if k.startswith(("vision_tower.", "projector."))}
        missing, _ = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if k.startswith(("vision_tower.", "projector."))]
        if missing:
            raise UserError(f"init_from '{cfg.init_from}' lacks weights {missing[:4]}…")
    if cfg.word_anchor and not model.config.word_anchor:
        from training.ground import WORD_GROUPS, WORDS, word_embeddings

        model.config.word_anchor = [list(WORD_GROUPS[g]) for g in cfg.word_anchor]
        rows = word_embeddings(llm.get_input_embeddings().weight, tokenizer)  # (W, D): every word ground scores
        idx = [WORDS.index(w) for g in model.config.word_anchor for w in g]
        # Centred over all of ground's words, as its scorer was, whichever groups are anchored.
        model.projector.set_word_anchor(rows[idx], centre=rows.mean(0))

    model.requires_grad_(False)
    if cfg.stage == 2:
        from peft import LoraConfig

        if cfg.quant == "4bit":
            from peft import prepare_model_for_kbit_training

            model.language_model = prepare_model_for_kbit_training(
                model.language_model, use_gradient_checkpointing=cfg.gradient_checkpointing)
        elif cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        model.add_lora(LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                  target_modules=list(cfg.lora.target_modules), task_type="CAUSAL_LM"))
        if cfg.train_encoder:
            model.vision_tower.requires_grad_(True)
        if cfg.precision == "bf16" and cfg.quant != "4bit":
            n = frozen_linears_to(model.language_model, torch.bfloat16)
            logger.info("stage 2: %d frozen linear layers of the LLM stored in bf16", n)
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.projector.requires_grad_(True)
    return model, tokenizer


def frozen_linears_to(llm: torch.nn.Module, dtype: torch.dtype) -> int:
    """Store the frozen linear layers of `llm` in `dtype` (the autocast dtype); returns how many.

    Autocast casts a weight to bf16 on every call and caches the cast only for weights that need
    grad, so a frozen fp32 base layer is re-cast in each forward (~135M values per step for
    smollm2). Stored in bf16 it is the same bf16 tensor, cast once: the same matmuls, less memory
    traffic. LoRA weights (trained) stay fp32, and so do the embedding, the norms and the output
    layer: tied to the embedding, or saved with the adapter when the vocabulary grew (the video
    token), where a bf16 copy would round the base LLM's weights."""
    output = llm.get_output_embeddings()
    n = 0
    for module in llm.modules():
        if type(module) is torch.nn.Linear and not module.weight.requires_grad and module is not output:
            module.to(dtype)
            n += 1
    return n


# ---------------------------------------------------------------------------------------------
# Examples: record → input_ids / labels (loss on assistant turns only) / pixel_values
# ---------------------------------------------------------------------------------------------


def make_processor(model, tokenizer, cfg: FinetuneConfig):
    from videollm.processing_videollm import VideoLLMProcessor

    return VideoLLMProcessor(tokenizer, model.config, num_frames=cfg.data.num_frames,
                             image_size=cfg.data.image_size, use_time_line=cfg.data.time_line,
                             system_prompt=cfg.data.system_prompt)


def make_encode(processor, max_length: int):
    """The `InstructDataset` hook: record → model inputs, through the same `VideoLLMProcessor`
    that chat and eval use, so training prompts look exactly like inference prompts."""

    def encode(record):
        video = None if record.video is None else processor.load_video(
            record.video, num_frames=record.num_frames, start=record.start, end=record.end)
        try:
            ex = processor.build_training_example(record.conversations, video, max_length=max_length)
        except UserError as err:
            raise UserError(f"record {record.source}: {err}") from None
        if all(label == -100 for label in ex["labels"]):
            raise UserError(f"record {record.source}: no answer token survives truncation to "
                            f"data.max_length={max_length}")
        out = {"input_ids": torch.tensor(ex["input_ids"]), "labels": torch.tensor(ex["labels"])}
        if video is not None:
            out["pixel_values"] = ex["pixel_values"][0]  # (3, T, S, S)
        return out

    return encode


def record_lengths(records, processor) -> list[int]:
    """Each record's token count as `make_encode` builds it (video placeholders included, before
    truncation), without decoding a video: what ``group_by_length`` sorts by. A record's video is
    stood in for by its shape, so the count is exact without the time line, and within a few
    tokens with it (whole-second stand-in stamps and duration)."""
    from videollm.processing_videollm import VideoInputs

    S = processor.image_size
    lengths = []
    for r in records:
        video = None
        if r.video is not None:
            T = r.num_frames or processor.num_frames
            video = VideoInputs(torch.zeros(1).expand(1, 3, T, S, S), [float(t) for t in range(T)], float(T))
        try:
            text = processor.render(r.conversations, video, add_generation_prompt=False)
        except UserError as err:
            raise UserError(f"record {r.source}: {err}") from None
        lengths.append(len(processor.tokenizer(text, add_special_tokens=False)["input_ids"]))
    return lengths


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def resolve_data(cfg: FinetuneConfig, is_main: bool, wait) -> tuple[Path, str | None]:
    """(data file, video_root); for ``source=synth`` writes the synthetic set once."""
    if cfg.data.source != "synth":
        return Path(cfg.data.source), cfg.data.video_root
    out = Path(cfg.output_dir) / "synth"
    if is_main and not (out / "instruct.json").is_file():
        from videollm.data.synth import write_synth_dataset

        logger.warning("writing %d synthetic clips to %s", cfg.data.synth_samples, out)
        write_synth_dataset(out, cfg.data.synth_samples, seed=cfg.seed, num_frames=cfg.data.synth_num_frames,
                            size=cfg.data.synth_size, task=cfg.data.synth_task)
    wait()
    return out / "instruct.json", None


def batch_group(record) -> Any:
    """The batch group of a record (`epoch_batches`): its ``num_frames``, or "text" if it has no video."""
    return "text" if record.video is None else record.num_frames


LENGTH_WINDOW = 50  # batches per window sorted by length (`DataConfig.group_by_length`)


def epoch_batches(n: int, batch_size: int, epoch: int, seed: int, rank: int, world: int,
                  groups: list | None = None, lengths: list[int] | None = None) -> list[list[int]]:
    """This process's batches of epoch `epoch`: a seeded permutation cut into global batches of
    ``batch_size · world``, each split by rank (drop_last, so every process steps equally).

    groups: one key per record (e.g. its ``num_frames``); a batch then holds one group only. The
    permutation is split by group (order kept), each group is cut into global batches (drop_last
    per group), and the global batches are shuffled so the groups interleave. A single group (or
    None) gives exactly the ungrouped batches. Deterministic in (seed, epoch).

    lengths: one token count per record; each group's records are then sorted by it (longest
    first, ties in permutation order) within windows of `LENGTH_WINDOW` global batches before the
    cut, so a batch pads little, and the batches are shuffled (a single group too).
    """
    if groups is not None and len(groups) != n:
        raise ValueError(f"groups has {len(groups)} keys for {n} records")
    if lengths is not None and len(lengths) != n:
        raise ValueError(f"lengths has {len(lengths)} counts for {n} records")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    per_step = batch_size * world
    if lengths is None and (groups is None or len(set(groups)) <= 1):
        steps = [perm[b * per_step:(b + 1) * per_step] for b in range(n // per_step)]
    else:
        by_group: dict[Any, list[int]] = {}
        for i in perm:
            by_group.setdefault(None if groups is None else groups[i], []).append(i)
        if lengths is not None:
            window = LENGTH_WINDOW * per_step
            by_group = {g: [i for w in range(0, len(idx), window)
                            for i in sorted(idx[w:w + window], key=lambda i: -lengths[i])]
                        for g, idx in by_group.items()}
        steps = [idx[b * per_step:(b + 1) * per_step] for idx in by_group.values()
                 for b in range(len(idx) // per_step)]
        # The order of the global batches: a second stream seeded from (seed, epoch).
        order = torch.randperm(len(steps), generator=torch.Generator().manual_seed(
            seed * 100_003 + epoch + 0x9E3779B9)).tolist()
        steps = [steps[j] for j in order]
    return [step[rank * batch_size:(rank + 1) * batch_size] for step in steps]


def param_groups(model, optim: OptimConfig) -> list[dict]:
    """AdamW groups over the trainable parameters: weight decay on matrices only, and the
    projector / encoder at their own peak lr when set (the schedule scales every group alike)."""
    groups: dict[tuple[float, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lr = optim.lr
        if name.startswith("projector.") and optim.projector_lr is not None:
            lr = optim.projector_lr
        elif name.startswith("vision_tower.") and optim.encoder_lr is not None:
            lr = optim.encoder_lr
        groups.setdefault((lr, optim.weight_decay if p.ndim >= 2 else 0.0), []).append(p)
    return [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]


def lr_lambda(warmup: int, total: int, min_ratio: float):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def _trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def _zero3_gather(model, enabled: bool):
    """Inside: full parameters on every rank (ZeRO-3 partitions them); a no-op otherwise."""
    import contextlib

    if not enabled:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)


# ---------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="videollm finetune", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="YAML config (training/configs/finetune_*.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. steps=100 lora.r=8")
    return p


def _make_accelerator(cfg: FinetuneConfig, text_only: bool = False):
    """text_only: the data has text-only records, whose batches leave the encoder and projector
    out of the graph, which multi-process DDP must be told about (DeepSpeed needs nothing: every
    rank gets the same kind of batch at a step, see `epoch_batches`)."""
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, DistributedDataParallelKwargs

    plugin = None
    if cfg.deepspeed:
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise UserError("deepspeed=… needs the deepspeed package: pip install deepspeed") from None
        # The model is built whole on each rank before this plugin exists and is partitioned when
        # DeepSpeed initialises (no zero.Init): once the plugin is selected, transformers loads
        # weights the ZeRO-3 way and the in-place edits after loading (adding <video> rows) would
        # hit unmaterialised shards. Fine for models that fit in one host's RAM (7B fp32: 28 GB).
        plugin = DeepSpeedPlugin(hf_ds_config=str(cfg.deepspeed), gradient_accumulation_steps=cfg.grad_accum,
                                 gradient_clipping=cfg.optim.grad_clip or None, zero3_init_flag=False)
        # We build our own loader (exact resume), so accelerate cannot read the micro-batch off it.
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.batch_size
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)] if text_only else []
    return Accelerator(gradient_accumulation_steps=cfg.grad_accum, deepspeed_plugin=plugin,
                       mixed_precision="bf16" if cfg.precision == "bf16" else "no", kwargs_handlers=handlers)


def _fill_ds_auto(accelerator, hidden: int) -> None:
    """Fill the bucket-size "auto" values accelerate derives from ``model.config.hidden_size``
    (a VideoLLM config keeps it in ``text_config``), with accelerate's own formulas."""
    ds = accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
    for key, value in (("reduce_bucket_size", hidden * hidden),
                       ("stage3_prefetch_bucket_size", int(0.9 * hidden * hidden)),
                       ("stage3_param_persistence_threshold", 10 * hidden)):
        if ds.get(key) == "auto":
            ds[key] = value


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    cfg = load_config(FinetuneConfig, args.config, args.overrides)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return train(cfg)


def train(cfg: FinetuneConfig) -> int:
    from training.checkpoint import (MetricsLog, atomic_dir, latest_checkpoint, load_checkpoint,
                                     save_checkpoint)
    from videollm.data.instruct import InstructDataset, collate, load_records, split_eval

    from accelerate import PartialState

    # The Accelerator (and with it DeepSpeed's global config that transformers consults while
    # loading) is created after the model is built; see `_make_accelerator`.
    state = PartialState()
    is_main, rank, world = state.is_main_process, state.process_index, state.num_processes
    use_ds = cfg.deepspeed is not None
    run_dir = Path(cfg.output_dir)
    config_yaml = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(config_yaml)

    # ---- data ----
    data_path, video_root = resolve_data(cfg, is_main, state.wait_for_everyone)
    records = load_records(data_path, video_root, seed=cfg.seed)
    train_records, eval_records = split_eval(records, cfg.data.eval_fraction, cfg.seed)
    if len(train_records) < cfg.batch_size * world:
        raise UserError(f"{len(train_records)} training records cannot fill one batch of "
                        f"batch_size={cfg.batch_size} × {world} process(es)")

    # ---- model ----
    model, tokenizer = build_model(cfg)
    # bitsandbytes' own layers (peft's LoRA wrapper around each is also called Linear4bit).
    n_4bit = sum(type(m).__name__ == "Linear4bit" and type(m).__module__.startswith("bitsandbytes")
                 for m in model.modules())
    if cfg.quant == "4bit":
        logger.info("QLoRA: %d bitsandbytes Linear4bit layers in the base LLM", n_4bit)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_train, n_total = sum(p.numel() for p in trainable), sum(p.numel() for p in model.parameters())
    logger.info("stage %d: %d trainable / %d parameters (%.2f%%)", cfg.stage, n_train, n_total, 100 * n_train / n_total)
    processor = make_processor(model, tokenizer, cfg)
    encode = make_encode(processor, cfg.data.max_length)
    train_ds = InstructDataset(train_records, encode, max_bad_videos=cfg.data.max_bad_videos)
    eval_ds = InstructDataset(eval_records, encode, max_bad_videos=cfg.data.max_bad_videos) if eval_records else None
    # Batches never mix frame counts (a record's num_frames; None: data.num_frames), and text-only
    # records make batches of their own (short, so not padded to a video record's length).
    train_groups = [batch_group(r) for r in train_records]
    eval_groups = [batch_group(r) for r in eval_records]
    train_lengths = record_lengths(train_records, processor) if cfg.data.group_by_length else None

    def collate_fn(batch):
        return collate(batch, tokenizer.pad_token_id)

    model.loss_logits_only = cfg.loss_logits_only
    optimizer = torch.optim.AdamW(param_groups(model, cfg.optim), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas))
    # Stepped by us once per optimizer step (not prepared: accelerate would step it per process).
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg.optim.warmup_steps, cfg.steps, cfg.optim.min_lr_ratio))
    accelerator = _make_accelerator(cfg, text_only=any(r.video is None for r in records))
    zero3 = use_ds and accelerator.state.deepspeed_plugin.zero_stage == 3
    if use_ds:
        _fill_ds_auto(accelerator, model.config.text_config.hidden_size)
    model, optimizer = accelerator.prepare(model, optimizer)

    # ---- resume ----
    step = 0
    ckpt = latest_checkpoint(run_dir) if cfg.resume else None
    if ckpt is not None:
        if use_ds:
            accelerator.load_state(str(ckpt / "accelerate"))
        else:
            from safetensors.torch import load_file

            state = load_file(str(ckpt / TRAINABLE_WEIGHTS))
            missing, unexpected = accelerator.unwrap_model(model).load_state_dict(state, strict=False)
            if unexpected:
                raise UserError(f"checkpoint '{ckpt}' does not match this model (unexpected {unexpected[:3]})")
        info = load_checkpoint(ckpt, optimizer=None if use_ds else optimizer, scheduler=scheduler)
        step = info["step"]
        logger.info("resumed from %s at step %d", ckpt, step)
    elif cfg.resume:
        logger.info("resume=true but no checkpoint in %s; starting from step 0", run_dir)
    metrics = MetricsLog(run_dir / "metrics.jsonl", resume_step=step if ckpt is not None else None) if is_main else None

    def save(step: int) -> Path | None:
        extra = {"bad_videos": train_ds.bad_videos}
        if use_ds:
            # DeepSpeed writes every rank's shard; build it in a shared temp dir, then move it into
            # the atomic checkpoint dir on the main process.
            staging = run_dir / f".staging-{step}"
            if is_main:
                shutil.rmtree(staging, ignore_errors=True)
            accelerator.wait_for_everyone()
            accelerator.save_state(str(staging / "accelerate"))
            accelerator.wait_for_everyone()
            path = None
            if is_main:
                path = save_checkpoint(run_dir, step, scheduler=scheduler, config_yaml=config_yaml, extra=extra,
                                       keep=cfg.keep, write_files=lambda d: shutil.move(str(staging / "accelerate"), d))
                shutil.rmtree(staging, ignore_errors=True)
            accelerator.wait_for_everyone()
            return path
        if not is_main:
            return None
        from safetensors.torch import save_file

        state = _trainable_state(accelerator.unwrap_model(model))
        return save_checkpoint(run_dir, step, optimizer=optimizer, scheduler=scheduler, config_yaml=config_yaml,
                               extra=extra, keep=cfg.keep,
                               write_files=lambda d: save_file(state, str(d / TRAINABLE_WEIGHTS)))

    @torch.no_grad()
    def evaluate() -> float | None:
        if eval_ds is None:
            return None
        model.eval()
        batches = epoch_batches(len(eval_ds), cfg.batch_size, 0, cfg.seed, rank, world, groups=eval_groups)
        if not batches:  # fewer eval records than one global batch: take what there is (of one frame count)
            most = Counter(eval_groups).most_common(1)[0][0]
            idx = [i for i, g in enumerate(eval_groups) if g == most]
            batches = [idx[rank::world] or idx[:1]]
        total, count = torch.zeros(()), torch.zeros(())
        for idx in batches[:cfg.eval_batches]:
            batch = collate_fn([eval_ds[i] for i in idx])
            with accelerator.autocast():
                loss = model(**batch).loss
            total += loss.float().cpu()
            count += 1
        model.train()
        _set_frozen_eval(accelerator.unwrap_model(model), cfg)
        total, count = accelerator.reduce(total.to(accelerator.device), "sum"), accelerator.reduce(count.to(accelerator.device), "sum")
        return float(total / count)

    # ---- loop ----
    model.train()
    _set_frozen_eval(accelerator.unwrap_model(model), cfg)
    steps_per_epoch = len(epoch_batches(len(train_ds), cfg.batch_size, 0, cfg.seed, rank, world,
                                        groups=train_groups, lengths=train_lengths)) // cfg.grad_accum
    if steps_per_epoch == 0:
        per_group = ""
        if len(set(train_groups)) > 1:
            counts = ", ".join(f"{'default' if g is None else g}: {c}" for g, c in Counter(train_groups).items())
            per_group = (f" (a batch holds one frame count, or text-only records only; records per group: "
                         f"{counts})")
        raise UserError(f"one optimizer step needs {cfg.batch_size * world * cfg.grad_accum} training records "
                        f"(batch_size × processes × grad_accum); the data has {len(train_ds)}{per_group}")
    stop = min(cfg.steps, cfg.stop_after) if cfg.stop_after is not None else cfg.steps
    t_last = time.perf_counter()
    while step < stop:
        epoch, in_epoch = divmod(step, steps_per_epoch)
        batches = epoch_batches(len(train_ds), cfg.batch_size, epoch, cfg.seed, rank, world, groups=train_groups,
                                lengths=train_lengths)
        loader = torch.utils.data.DataLoader(
            train_ds, batch_sampler=batches[in_epoch * cfg.grad_accum: steps_per_epoch * cfg.grad_accum],
            collate_fn=collate_fn, num_workers=cfg.data.num_workers,
            # Its own generator: a new iterator otherwise draws from the global RNG, and a resumed
            # run (which starts a fresh iterator mid-epoch) would see different dropout masks.
            generator=torch.Generator().manual_seed(cfg.seed + epoch))
        it = iter(loader)
        while step < stop and in_epoch < steps_per_epoch:
            losses = []
            for _ in range(cfg.grad_accum):
                batch = next(it)
                with accelerator.accumulate(model), accelerator.autocast():
                    loss = model(**batch).loss
                    accelerator.backward(loss)
                    grad_norm = None
                    if accelerator.sync_gradients and cfg.optim.grad_clip > 0:
                        grad_norm = accelerator.clip_grad_norm_(trainable if not use_ds else model.parameters(),
                                                                cfg.optim.grad_clip)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                losses.append(loss.detach().float())
            lr_used = max(scheduler.get_last_lr())  # the first group may be a frozen projector's (lr 0)
            scheduler.step()
            step += 1
            in_epoch += 1
            loss_val = float(accelerator.reduce(torch.stack(losses).mean().to(accelerator.device), "mean"))
            if not math.isfinite(loss_val):
                raise RuntimeError(f"loss is {loss_val} at step {step}; lower optim.lr or check the data")
            record: dict[str, Any] = {"step": step, "loss": loss_val, "lr": lr_used}
            if grad_norm is not None:
                record["grad_norm"] = float(grad_norm)
            if step % cfg.eval_every == 0 or step == cfg.steps:
                record["eval_loss"] = evaluate()
            now = time.perf_counter()
            record["sec_per_step"] = round(now - t_last, 4)
            t_last = now
            if is_main and (step % cfg.log_every == 0 or "eval_loss" in record):
                metrics.log(record)
                logger.info("step %d  %s", step, "  ".join(f"{k}={v:.4g}" for k, v in record.items()
                                                           if k != "step" and isinstance(v, float)))
            if step % cfg.save_every == 0 and step < cfg.steps:
                save(step)
    if step < cfg.steps:
        if step % cfg.save_every:
            save(step)
        logger.info("stopped after step %d of %d (stop_after); resume=true continues", step, cfg.steps)
        return 0

    # ---- final model ----
    unwrapped = accelerator.unwrap_model(model)
    with _zero3_gather(unwrapped, zero3):
        if is_main:
            with atomic_dir(run_dir / "final") as tmp:
                unwrapped.save_pretrained(str(tmp))
                processor.save_pretrained(str(tmp))  # tokenizer with <video> + frame settings
                (tmp / "finetune_config.yaml").write_text(config_yaml)
    accelerator.wait_for_everyone()
    if is_main:
        summary = {"steps": step, "final": str(run_dir / "final"), "bad_videos": train_ds.bad_videos,
                   "trainable_params": n_train, "linear4bit_layers": n_4bit}
        print(json.dumps(summary))
    accelerator.end_training()
    return 0


def _set_frozen_eval(model, cfg: FinetuneConfig) -> None:
    """Frozen parts run in eval mode (no stochastic depth / dropout in what is not trained)."""
    if not cfg.train_encoder:
        model.vision_tower.eval()
    if cfg.stage == 1:
        model.language_model.eval()


if __name__ == "__main__":
    sys.exit(run_cli(main))
