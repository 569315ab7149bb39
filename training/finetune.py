"""VideoLLM fine-tuning recipe: stage 1 alignment and stage 2 instruction tuning (LoRA / QLoRA).

    videollm finetune --config training/configs/finetune_stage2_smoke.yaml [key=value …]
    videollm finetune --config training/configs/finetune_stage2_smoke.yaml init_from=default data.source=my.json
    torchrun --nproc_per_node 8 -m training.finetune --config … deepspeed=training/configs/zero2.json

- ``stage=1`` (alignment): only the projector trains. ``stage=2`` (instruction tuning): a LoRA
  adapter on the LLM plus the projector; ``train_encoder=true`` also trains the encoder.
- ``init_from``: a saved VideoLLM (a stage-1 or grounding ``final/``, or ``default``, the shipped
  model) to start from exactly: encoder, projector and any LoRA adapter, which stage 2 continues.
- ``word_anchor`` (stage 1 from grounding): the projector becomes a word anchor over these groups
  of `training.ground.WORD_GROUPS`, keys centred over all of grounding's words as its scorer was.
- ``quant=4bit`` (QLoRA, stage 2): the base LLM in 4-bit nf4 (bitsandbytes, double quantization).
- ``precision=bf16``: autocast (stage 2 also stores the frozen linears in bf16, `frozen_linears_to`).
- ``deepspeed=<json>``: a ZeRO config through accelerate; checkpoints leave the frozen weights out.
- A record may set its own ``num_frames``; a batch never mixes frame counts.

The eval loss is on a held-out split; the final model goes to ``<output_dir>/final``
(`save_videollm`: with LoRA, base-LLM reference + adapter + encoder/projector).
"""

from __future__ import annotations

import json
import logging
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import BitsAndBytesConfig

from encoder.errors import UserError, run_cli
from encoder.teacher import imagenet_class_names
from training.config import check, config_from_argv, in_range, one_of
from training.ground import WORD_GROUPS, WORDS, word_embeddings
from training.recipe import Engine, Micro, OptimConfig, Recipe, RecipeConfig, param_groups, print_summary, run
from videollm.configuration_videollm import SPATIAL_MERGES, VideoLLMConfig
from videollm.data.instruct import InstructDataset, collate, load_records, split_eval
from videollm.data.synth import write_synth_dataset
from videollm.modeling_videollm import build_videollm, resolve_model_dir, save_videollm
from videollm.processing_videollm import VideoInputs

logger = logging.getLogger("training.finetune")

@dataclass
class FinetuneData:
    # "synth" (the synthetic instruction set, written to <output_dir>/synth if absent), a JSON /
    # JSONL file in the LLaVA-video layout, or a data-mix YAML.
    source: str = "synth"
    root: str | None = None  # where the records' videos resolve (default: the data file's folder)
    num_frames: int = 8  # frames sampled per video (uniformly, within start/end)
    size: int = 224  # frames are resized + centre-cropped to this square
    max_length: int = 2048  # tokens per example (video placeholders included); longer is truncated
    time_line: bool = True  # "The video lasts …" after the video tokens (as at inference)
    system_prompt: str | None = None  # None: the chat template's default system turn; "": an empty one
    eval_fraction: float = 0.05  # held-out share of the distinct record ids (0: no eval)
    max_bad_videos: int = 10  # undecodable videos skipped before the run stops
    num_workers: int = 0
    group_by_length: bool = False  # batches of records of similar length (less padding), as HF's
    synth_samples: int = 256
    synth_num_frames: int = 16
    synth_size: int = 64
    synth_task: str = "motion"


@dataclass
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


@dataclass
class FinetuneOptim(OptimConfig):
    lr: float = 2e-4
    min_lr_ratio: float = 0.1
    projector_lr: float | None = None  # the projector's own peak lr (default: lr)
    encoder_lr: float | None = None  # the encoder's, with train_encoder=true (default: lr)


@dataclass
class FinetuneConfig(RecipeConfig):
    output_dir: str = "runs/finetune"
    steps: int = 1000
    batch_size: int = 4
    eval_every: int = 100
    save_every: int = 500
    stage: int = 2  # 1: alignment (projector only); 2: instruction tuning (LoRA + projector)
    llm: str = "smollm2"  # alias, Hub id, local dir or .gguf (see videollm.llm.load_llm)
    llm_cache_dir: str | None = None  # where GGUF → dense copies are cached (default ~/.cache/…)
    encoder: str = "nano"  # VideoMAP preset (random init) or a pretrained encoder dir
    init_from: str | None = None  # a saved VideoLLM dir or "default": start from it exactly
    spatial_pool: int = 2
    spatial_merge: str = "avg"  # avg | concat: how a pooled window is merged (an init_from keeps its own)
    stem_skip: bool = False  # the projector also reads the patch stem (an init_from keeps its own)
    max_video_tokens: int | None = None
    train_encoder: bool = False
    word_anchor: list[str] = field(default_factory=list)  # word groups to anchor the tokens in: colors, shapes, motions
    anchor_none_logit: float = 0.0  # the anchor's "none" logit (grounding's none_logit)
    anchor_select: int | None = None  # the anchor keeps each frame's k tokens that name an object most (select_tokens)
    anchor_temporal_merge: str = "avg"  # avg | named: how max_video_tokens pools a long clip's frames (temporal_merge)
    quant: str = "none"  # none | 4bit
    gradient_checkpointing: bool = False
    loss_logits_only: bool = False  # LM-head logits only at labelled positions (same loss, less compute)
    deepspeed: str | None = None  # a DeepSpeed JSON, e.g. training/configs/zero2.json
    eval_batches: int = 8
    data: FinetuneData = field(default_factory=FinetuneData)
    lora: LoraSettings = field(default_factory=LoraSettings)
    optim: FinetuneOptim = field(default_factory=FinetuneOptim)

    def validate(self) -> None:
        super().validate()
        check(self, {"stage": one_of(1, 2), "quant": one_of("none", "4bit"), "spatial_merge": one_of(*SPATIAL_MERGES),
                     "eval_batches": in_range(1), "data.eval_fraction": in_range(0, 1, high_open=True)})
        if self.stage == 1 and (self.quant != "none" or self.train_encoder):
            raise UserError("stage 1 trains the projector only; quant=4bit and train_encoder=true are stage-2 options")
        unknown = [g for g in self.word_anchor if g not in WORD_GROUPS]
        if unknown or len(set(self.word_anchor)) != len(self.word_anchor):
            raise UserError(f"word_anchor must list distinct word groups out of {', '.join(WORD_GROUPS)}; "
                            f"got {self.word_anchor}")
        if self.deepspeed is not None:
            if not Path(self.deepspeed).is_file():
                raise UserError(f"deepspeed config '{self.deepspeed}' not found")
            try:
                stage = json.loads(Path(self.deepspeed).read_text()).get("zero_optimization", {}).get("stage", 0)
            except json.JSONDecodeError as err:
                raise UserError(f"deepspeed config '{self.deepspeed}' is not valid JSON: {err}") from None
            if self.quant == "4bit" and stage == 3:
                raise UserError("quant=4bit with ZeRO-3 is not supported; use zero2.json or no DeepSpeed")


def build_model(cfg: FinetuneConfig):
    """(model, processor) through `build_videollm`, with what `cfg.stage` trains trainable (+ LoRA)."""
    quantization_config = None
    if cfg.quant == "4bit":
        try:
            import bitsandbytes  # noqa: F401  (optional: only QLoRA needs it)
        except ImportError:
            raise UserError("quant=4bit needs bitsandbytes: pip install bitsandbytes") from None
        quantization_config = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if cfg.precision == "bf16" else torch.float32)
    # The projector keys for a new model; with init_from, only a word anchor to add (when asked for
    # and the saved model has none).
    anchor = {"type": "word_anchor", "words": [list(WORD_GROUPS[g]) for g in cfg.word_anchor],
              "none_logit": cfg.anchor_none_logit, "select_tokens": cfg.anchor_select,
              "temporal_merge": cfg.anchor_temporal_merge,
              **({"max_video_tokens": cfg.max_video_tokens} if cfg.max_video_tokens else {})} if cfg.word_anchor else {}
    if cfg.init_from is None:
        projector = {"type": "mlp", "spatial_pool": cfg.spatial_pool, "spatial_merge": cfg.spatial_merge,
                     "stem_skip": cfg.stem_skip, "max_video_tokens": cfg.max_video_tokens, **anchor}
    else:
        saved = VideoLLMConfig.from_pretrained(resolve_model_dir(cfg.init_from))
        projector = anchor if anchor and saved.projector_type != "word_anchor" else None
        if projector and getattr(saved.vision_config, "concept_frames", 0):
            projector["concepts"] = imagenet_class_names()  # the words of the encoder's concept stem
    model, processor = build_videollm(
        cfg.llm, cfg.encoder, init_from=cfg.init_from, num_frames=cfg.data.num_frames, image_size=cfg.data.size,
        projector=projector, use_time_line=cfg.data.time_line, system_prompt=cfg.data.system_prompt,
        cache_dir=cfg.llm_cache_dir, quantization_config=quantization_config, seed=cfg.seed)
    if projector and projector["type"] == "word_anchor" and len(cfg.word_anchor) < len(WORD_GROUPS):
        # Keys centred over all of grounding's words, as its scorer was, whichever groups are anchored.
        rows = word_embeddings(model.get_input_embeddings().weight, processor.tokenizer)  # (W, D_llm)
        idx = [WORDS.index(w) for g in cfg.word_anchor for w in WORD_GROUPS[g]]
        model.projector.set_word_anchor(rows[idx], centre=rows.mean(0))

    model.config.scope = None  # what a model started from knows is not what this training makes of it
    model.requires_grad_(False)
    if cfg.gradient_checkpointing and cfg.quant != "4bit":  # 4-bit: prepare_model_for_kbit_training does it
        model.gradient_checkpointing_enable()
    if cfg.stage == 2:
        from peft import LoraConfig, prepare_model_for_kbit_training  # optional heavy import: stage 2 only

        if model.has_lora:  # init_from brought an adapter: continue it
            if cfg.quant == "4bit":
                raise UserError("quant=4bit starts a new adapter on a 4-bit base; init_from has one already "
                                "(merge it first with `videollm merge-lora`, or leave quant=none)")
            for name, p in model.language_model.named_parameters():
                p.requires_grad_("lora_" in name)
        else:
            if cfg.quant == "4bit":
                model.language_model = prepare_model_for_kbit_training(
                    model.language_model, use_gradient_checkpointing=cfg.gradient_checkpointing)
            model.add_lora(LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                      target_modules=list(cfg.lora.target_modules), task_type="CAUSAL_LM"))
        if cfg.train_encoder:
            model.vision_tower.requires_grad_(True)
        if cfg.precision == "bf16" and cfg.quant != "4bit":
            n = frozen_linears_to(model.language_model, torch.bfloat16)
            logger.info("stage 2: %d frozen linear layers of the LLM stored in bf16", n)
    model.projector.requires_grad_(True)
    model.loss_logits_only = cfg.loss_logits_only
    return model, processor


def frozen_linears_to(llm: torch.nn.Module, dtype: torch.dtype) -> int:
    """Store the frozen linear layers of `llm` in `dtype` (the autocast dtype); returns how many.
    Autocast re-casts a frozen fp32 weight in every forward (it caches casts of trained weights only);
    stored in bf16 it is cast once. LoRA weights, the embedding, the norms and the output layer (tied,
    or saved with the adapter when the vocabulary grew: a bf16 copy would round it) stay fp32."""
    output = llm.get_output_embeddings()
    n = 0
    for module in llm.modules():
        if type(module) is torch.nn.Linear and not module.weight.requires_grad and module is not output:
            module.to(dtype)
            n += 1
    return n


def make_encode(processor, max_length: int, concept_words: list[str] | None = None):
    """The `InstructDataset` hook: record → model inputs, through the same `VideoLLMProcessor`
    that chat and eval use, so training prompts look exactly like inference prompts. concept_words:
    the model's concept classes, by which a record's made-up ``concepts`` are read."""
    index = {w: i for i, w in reversed(list(enumerate(concept_words or [])))}  # a repeated name: its first class

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
        if record.concepts:
            unknown = [k for k in record.concepts if k not in index]
            if unknown:
                raise UserError(f"record {record.source}: 'concepts' names {unknown[:3]}, which "
                                + ("are not classes of this model's concept stem" if index else
                                   "this model cannot take: it has no concept stem"))
            C = len(concept_words)
            probs = torch.full((C,), (1 - sum(record.concepts.values())) / C)
            for name, share in record.concepts.items():
                probs[index[name]] += share
            out["concept_probs"] = probs.expand(out["pixel_values"].shape[1], -1).contiguous()  # (T, C)
        return out

    return encode


def record_lengths(records, processor) -> list[int]:
    """Each record's token count as `make_encode` builds it, before truncation, without decoding a
    video (a stand-in of its shape: exact without the time line, within a few tokens with it)."""
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


def batch_group(record) -> Any:
    """The batch group of a record (`epoch_batches`): its ``num_frames``, or "text" if it has no video."""
    return "text" if record.video is None else record.num_frames


LENGTH_WINDOW = 50  # batches per window sorted by length (`DataConfig.group_by_length`)


def epoch_batches(n: int, batch_size: int, epoch: int, seed: int, rank: int, world: int,
                  groups: list | None = None, lengths: list[int] | None = None) -> list[list[int]]:
    """This process's batches of epoch `epoch`: a permutation seeded by (seed, epoch) cut into global
    batches of ``batch_size · world``, split by rank (drop_last: every process steps equally).
    groups (a key per record, e.g. ``num_frames``): each group is cut apart and the batches shuffled
    so groups interleave. lengths (tokens per record): each group is sorted by it, longest first,
    within windows of `LENGTH_WINDOW` global batches before the cut."""
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


class Finetune(Recipe):
    name = "finetune"

    def setup(self, engine: Engine):
        cfg, d = self.cfg, self.cfg.data
        data_path, root = Path(d.source), d.root
        if d.source == "synth":  # the synthetic instruction set, written once
            data_path, root = Path(cfg.output_dir) / "synth" / "instruct.json", None
            if engine.is_main and not data_path.is_file():
                logger.warning("writing %d synthetic clips to %s", d.synth_samples, data_path.parent)
                write_synth_dataset(data_path.parent, d.synth_samples, seed=cfg.seed, num_frames=d.synth_num_frames,
                                    size=d.synth_size, task=d.synth_task)
            engine.wait()
        records = load_records(data_path, root, seed=cfg.seed)
        train_records, eval_records = split_eval(records, cfg.data.eval_fraction, cfg.seed)
        if len(train_records) < cfg.batch_size * engine.world:
            raise UserError(f"{len(train_records)} training records cannot fill one batch of "
                            f"batch_size={cfg.batch_size} × {engine.world} process(es)")
        self.text_only = any(r.video is None for r in records)

        model, self.processor = build_model(cfg)
        # bitsandbytes' own layers (peft's LoRA wrapper around each is also called Linear4bit).
        self.n_4bit = sum(type(m).__name__ == "Linear4bit" and type(m).__module__.startswith("bitsandbytes")
                          for m in model.modules())
        if cfg.quant == "4bit":
            logger.info("QLoRA: %d bitsandbytes Linear4bit layers in the base LLM", self.n_4bit)
        self.n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        n_total = sum(p.numel() for p in model.parameters())
        logger.info("stage %d: %d trainable / %d parameters (%.2f%%)", cfg.stage, self.n_train, n_total,
                    100 * self.n_train / n_total)
        encode = make_encode(self.processor, cfg.data.max_length,
                             getattr(model.config.projector_config, "concepts", None))
        self.train_ds = InstructDataset(train_records, encode, max_bad_videos=cfg.data.max_bad_videos)
        self.eval_ds = InstructDataset(eval_records, encode, max_bad_videos=cfg.data.max_bad_videos) \
            if eval_records else None
        # A batch holds one frame count, or text-only records (short: not padded to a video's length).
        self.train_groups = [batch_group(r) for r in train_records]
        self.eval_groups = [batch_group(r) for r in eval_records]
        self.train_lengths = record_lengths(train_records, self.processor) if cfg.data.group_by_length else None
        self.steps_per_epoch = len(self._epoch_batches(0)) // cfg.grad_accum
        if self.steps_per_epoch == 0:
            counts = ", ".join(f"{'default' if g is None else g}: {c}" for g, c in Counter(self.train_groups).items())
            raise UserError(f"one optimizer step needs {cfg.batch_size * engine.world * cfg.grad_accum} training "
                            f"records (batch_size × processes × grad_accum) of one frame count (or text-only); the "
                            f"data has {len(self.train_ds)} (records per frame count: {counts})")
        self._loader = None  # (epoch, next batch index in the epoch, iterator)
        self._train_mode(model)
        return model

    def _train_mode(self, model) -> None:
        """Train mode, with the frozen parts in eval mode (no stochastic depth / dropout in them)."""
        model.train()
        model = self.engine.unwrap(model)
        if not self.cfg.train_encoder:
            model.vision_tower.eval()
        if self.cfg.stage == 1:
            model.language_model.eval()

    def engine_options(self) -> dict:
        # Text-only batches leave the encoder and projector out of the graph, which DDP must be told
        # (not DeepSpeed: every rank gets the same kind of batch at a step, see `epoch_batches`).
        return {"deepspeed": self.cfg.deepspeed, "find_unused_parameters": self.text_only}

    def param_groups(self, model):
        return param_groups(model, self.optim.lr, self.optim.weight_decay,
                            {"projector.": self.optim.projector_lr, "vision_tower.": self.optim.encoder_lr})

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        return epoch_batches(len(self.train_ds), self.cfg.batch_size, epoch, self.cfg.seed, self.engine.rank,
                             self.engine.world, groups=self.train_groups, lengths=self.train_lengths)

    def _batch(self, step: int, micro: int) -> dict:
        """Micro-batch `micro` of step `step`, from a DataLoader started at this position if needed."""
        cfg = self.cfg
        epoch, k = divmod(step - 1, self.steps_per_epoch)
        index = k * cfg.grad_accum + micro
        if self._loader is None or self._loader[:2] != (epoch, index):
            batches = self._epoch_batches(epoch)[index:self.steps_per_epoch * cfg.grad_accum]
            loader = torch.utils.data.DataLoader(
                self.train_ds, batch_sampler=batches, collate_fn=self._collate, num_workers=cfg.data.num_workers,
                # Its own generator: a new iterator otherwise draws from the global RNG, and a resumed
                # run (which starts a fresh iterator mid-epoch) would see different dropout masks.
                generator=torch.Generator().manual_seed(cfg.seed + epoch))
            self._loader = (epoch, index, iter(loader))
        batch = next(self._loader[2])
        self._loader = (epoch, index + 1, self._loader[2])
        return {k: v.to(self.engine.device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def _collate(self, batch):
        return collate(batch, self.processor.tokenizer.pad_token_id)

    def loss(self, model, step: int, micro: int) -> Micro:
        """The step's loss is the mean over the answer tokens of its whole global batch (every micro-batch
        of every process), as one process with the whole batch computes it: each micro-batch's token sum
        divided by the step's token count, times processes × grad_accum (DDP / DeepSpeed average over the
        processes, the skeleton divides by grad_accum). So the micro-batches of a step are read at its
        first one. A step of one micro-batch in one process takes the plain mean: the same number."""
        cfg, engine = self.cfg, self.engine
        if micro == 0:
            self._step = [self._batch(step, m) for m in range(cfg.grad_accum)]
            local = sum(int((b["labels"][:, 1:] != -100).sum()) for b in self._step)
            self._items = round(engine.sum(local)) if engine.world * cfg.grad_accum > 1 else None
        batch = self._step[micro]
        if self._items is None:
            return Micro(model(**batch).loss, samples=len(batch["input_ids"]))
        loss = model(**batch, num_items_in_batch=self._items).loss * (engine.world * cfg.grad_accum)
        return Micro(loss, samples=len(batch["input_ids"]))

    @torch.no_grad()
    def evaluate(self, model, step: int) -> dict:
        if self.eval_ds is None:
            return {}
        cfg, engine = self.cfg, self.engine
        model.eval()
        batches = epoch_batches(len(self.eval_ds), cfg.batch_size, 0, cfg.seed, engine.rank, engine.world,
                                groups=self.eval_groups)
        if not batches:  # fewer eval records than one global batch: take what there is (of one frame count)
            most = Counter(self.eval_groups).most_common(1)[0][0]
            idx = [i for i, g in enumerate(self.eval_groups) if g == most]
            batches = [idx[engine.rank::engine.world] or idx[:1]]
        total, batches = torch.zeros(()), batches[:cfg.eval_batches]
        for idx in batches:
            batch = self._collate([self.eval_ds[i] for i in idx])
            batch = {k: v.to(engine.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            with engine.accelerator.autocast():
                total += model(**batch).loss.float().cpu()
        self._train_mode(model)
        return {"eval_loss": engine.mean(float(total / len(batches)))}

    def extra_state(self) -> dict:
        return {"bad_videos": self.train_ds.bad_videos}

    def save_final(self, model, directory: Path) -> None:
        save_videollm(model, self.processor, directory)


def train(cfg: FinetuneConfig) -> dict:
    """Run (or resume) fine-tuning: the last metrics record with ``final`` (None when stop_after
    ended the run early) and the trainable-parameter and 4-bit layer counts."""
    recipe = Finetune(cfg)
    summary = run(recipe)
    return {**summary, "steps": summary["step"], "bad_videos": recipe.train_ds.bad_videos,
            "trainable_params": recipe.n_train, "linear4bit_layers": recipe.n_4bit}


def main(argv: list[str] | None = None) -> int:
    cfg = config_from_argv(FinetuneConfig, "videollm finetune", __doc__, argv, "steps=100 lora.r=8 init_from=default")
    return print_summary(train(cfg), ("steps", "loss", "final", "bad_videos", "trainable_params",
                                      "linear4bit_layers"))


if __name__ == "__main__":
    sys.exit(run_cli(main))
