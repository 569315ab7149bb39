"""VideoLLM: video encoder → projector → any Hugging Face causal LM, in the manner of Llava.

    pixel_values (B, 3, T, H, W)
      → vision_tower (VideoMAP / ViT)            last_hidden_state (B, 1 + T·h·w, D), grid (T, h, w)
      → projector (`videollm.projectors`, chosen by config.projector_type)      (B, K, D_llm)
      → masked_scatter into the LLM's inputs_embeds where input_ids == video_token_id
      → language_model (HF causal LM)            logits, loss, past_key_values

Placeholder and feature counts must match exactly. A saved directory holds the LLM whole, or only
``config.base_llm`` (the frozen base, rebuilt on load) plus maybe a LoRA adapter in ``llm_adapter/``.
"""

from __future__ import annotations

import inspect
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import (AutoModel, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PretrainedConfig,
                          PreTrainedModel)
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import ModelOutput

from encoder.build import build_encoder
from encoder.errors import UserError
from encoder.scan import load_cpu_kernel
from encoder.transforms import resize_kernel
from videollm.configuration_videollm import PROJECTOR_CONFIGS, VIDEO_TOKEN, VideoLLMConfig, make_projector_config
from videollm.decoding import PackedDecoder, generate_packed
from videollm.llm import load_llm
from videollm.packed import pack_language_model
from videollm.processing_videollm import VideoLLMProcessor
from videollm.projectors import WordAnchorProjector, build_projector

logger = logging.getLogger(__name__)

ADAPTER_DIR = "llm_adapter"
NON_LLM_WEIGHTS = "model.safetensors"
# The shipped model, written by `python -m training.pipeline`.
DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "weights" / "default"
DEFAULT_ALIAS = "default"


@dataclass
class VideoLLMOutput(ModelOutput):
    """loss: (1,) with labels. logits: (B, L, V). video_hidden_states: (B_v, K, D_llm) with pixel_values."""

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    past_key_values: object | None = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None
    video_hidden_states: torch.FloatTensor | None = None


class VideoLLMForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = VideoLLMConfig
    # No checkpoint key carries this prefix, so Hugging Face never strips or adds one.
    base_model_prefix = "videollm"
    main_input_name = "input_ids"
    input_modalities = ("video", "text")
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module):
        # Only the projector is ours; the encoder and the LLM bring their own _init_weights.
        if isinstance(module, nn.Linear):
            std = getattr(self.config.text_config, "initializer_range", 0.02)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def __init__(self, config: VideoLLMConfig, *, vision_tower: nn.Module | None = None,
                 language_model: nn.Module | None = None):
        """vision_tower / language_model: already-built modules to use instead of fresh ones."""
        super().__init__(config)
        self.vision_tower = vision_tower if vision_tower is not None else AutoModel.from_config(config.vision_config)
        self.projector = build_projector(config.projector_type, config.projector_config,
                                         config.vision_config.embed_dim, config.text_config.hidden_size)
        self.language_model = (language_model if language_model is not None
                               else AutoModelForCausalLM.from_config(config.text_config))
        self.post_init()
        # Not saved. loss_logits_only: with labels, logits at labelled positions only.
        # language_model_is_base: the LLM is config.base_llm's (+ the <video> row); saving stores the reference.
        self.loss_logits_only = False
        self.language_model_is_base = False
        self.video_encode_seconds = 0.0
        self.packed = False  # set by pack_for_inference
        self.packed_decoder: PackedDecoder | None = None

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        for module in (self.vision_tower, self.language_model):  # both the encoder and the LLM
            if hasattr(module, "gradient_checkpointing_enable"):
                module.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)
        if hasattr(self.language_model, "enable_input_require_grads"):
            # A frozen embedding (LoRA) otherwise cuts the graph before the checkpointed blocks.
            self.language_model.enable_input_require_grads()

    @property
    def has_lora(self) -> bool:
        from peft import PeftModel  # heavy, so imported when asked

        return isinstance(self.language_model, PeftModel)

    def get_video_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (B, 3, T, H, W) → (B, K, D_llm), timed in ``video_encode_seconds``."""
        return self.encode_video(pixel_values)[0]

    @torch.no_grad()
    def video_concepts(self, pixel_values: torch.Tensor, k: int = 3) -> list[list[list[tuple[str, float]]]] | None:
        """What the video tokens say they show, per clip and frame: the `k` concepts with the largest
        word-anchor weight (averaged over the frame's tokens; "none" takes the rest). None for a model
        without concepts."""
        words = getattr(self.config.projector_config, "concepts", None)
        if not words:
            return None
        _, out = self.encode_video(pixel_values)
        w = self.projector.concept_weights(out.concept_logits, tuple(out.grid))  # (B, K, C)
        if self.config.projector_config.use_cls_token:
            w = w[:, 1:]
        B, K, C = w.shape
        kh, kw = self.projector.config.tokens_per_frame_for(*out.grid[1:])
        frames = self.projector.config.pooled_frames(out.grid[0], kh * kw)
        per_frame = w.reshape(B, frames, K // frames, C).mean(2)  # (B, T', C)
        top = per_frame.topk(k, dim=-1)
        return [[[(words[int(i)], round(float(v), 3)) for v, i in zip(vs, ids)] for vs, ids in zip(clip_v, clip_i)]
                for clip_v, clip_i in zip(top.values, top.indices)]

    def encode_video(self, pixel_values: torch.Tensor, concept_probs: torch.Tensor | None = None):
        """(video features (B, K, D_llm), the encoder's output). concept_probs (B, T, C): an encoder with
        a concept stem takes these concepts instead of classifying the frames."""
        start = time.perf_counter()
        given = {} if concept_probs is None else {"concept_probs": concept_probs}
        out = self.vision_tower(pixel_values, **given)  # last_hidden_state (B, 1 + T·h·w, D)
        features = self.projector(out.last_hidden_state, tuple(out.grid), out.stem_states,
                                  concept_logits=getattr(out, "concept_logits", None))  # (B, K, D_llm)
        self.video_encode_seconds = time.perf_counter() - start
        return features, out

    def forward(self, input_ids: torch.LongTensor | None = None, pixel_values: torch.FloatTensor | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.LongTensor | None = None,
                past_key_values=None, inputs_embeds: torch.FloatTensor | None = None,
                labels: torch.LongTensor | None = None, use_cache: bool | None = None,
                logits_to_keep: int | torch.Tensor = 0, concept_probs: torch.Tensor | None = None,
                **kwargs) -> VideoLLMOutput:
        """input_ids (B, L) with K ``<video>`` placeholders per video; pixel_values (B_v, 3, T, H, W);
        labels (B, L) with -100 where no loss is taken (the LLM shifts them). concept_probs (B_v, T, C):
        concepts given to a concept stem instead of what the frames show (NaN rows: classified).
        num_items_in_batch (a keyword, as in transformers): the loss is the sum over answer tokens
        divided by it instead of their mean (the token mean of a batch spread over processes)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if pixel_values is not None and input_ids is None:
            raise ValueError("pixel_values need input_ids to find the <video> placeholders")
        video_features = None
        if inputs_embeds is None:
            video_id = self.config.video_token_id
            mask = input_ids == (-1 if video_id is None else video_id)  # (B, L)
            # Placeholders look up a valid row; their embeddings are replaced below.
            inputs_embeds = self.get_input_embeddings()(input_ids.masked_fill(mask, 0))  # (B, L, D_llm)
            if pixel_values is not None:
                video_features = self.encode_video(pixel_values.to(inputs_embeds.device), None if concept_probs is None
                                                   else concept_probs.to(inputs_embeds.device))[0]
                video_features = video_features.to(inputs_embeds.device, inputs_embeds.dtype)  # (B_v, K, D_llm)
            n_tokens = int(mask.sum())
            n_features = 0 if video_features is None else video_features.shape[0] * video_features.shape[1]
            if n_tokens != n_features and (video_features is not None or past_key_values is None):
                raise ValueError(f"Video features and video tokens do not match: {n_tokens} {VIDEO_TOKEN} tokens in "
                                 f"input_ids, {n_features} video features. Expand <video> with num_video_tokens("
                                 "frames, height, width) (VideoLLMProcessor does this).")
            if video_features is not None:
                inputs_embeds = inputs_embeds.masked_scatter(mask.unsqueeze(-1), video_features)  # (B, L, D_llm)
        answers_only = (labels is not None and self.loss_logits_only and isinstance(logits_to_keep, int)
                        and logits_to_keep == 0)
        if answers_only:
            # Logits only where a label is predicted (position p predicts token p + 1; union over the
            # batch), so the LM head runs on a few answer tokens, not the whole prompt. Same loss as
            # the LLM's own; ``logits`` is then (B, n_kept, V).
            logits_to_keep = (labels[:, 1:] != -100).any(dim=0).nonzero().flatten()  # (n,)
        items = kwargs.pop("num_items_in_batch", None) if answers_only else None
        out = self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                                  past_key_values=past_key_values, labels=None if answers_only else labels,
                                  use_cache=use_cache, logits_to_keep=logits_to_keep, **kwargs)
        loss = out.loss
        if answers_only:
            targets = labels[:, logits_to_keep + 1]  # (B, n)
            loss = F.cross_entropy(out.logits.float().reshape(-1, out.logits.shape[-1]), targets.reshape(-1),
                                   ignore_index=-100, reduction="mean" if items is None else "sum")
            if items is not None:
                loss = loss / items
        return VideoLLMOutput(loss=loss, logits=out.logits, past_key_values=out.past_key_values,
                              hidden_states=out.hidden_states, attentions=out.attentions,
                              video_hidden_states=video_features)

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, pixel_values=None,
                                      is_first_iteration=False, **kwargs):
        # The video is consumed by the prefill; decoding steps read it from the KV cache.
        inputs = super().prepare_inputs_for_generation(input_ids, past_key_values=past_key_values,
                                                       is_first_iteration=is_first_iteration, **kwargs)
        if is_first_iteration or not kwargs.get("use_cache", True):
            inputs["pixel_values"] = pixel_values
        return inputs

    def pack_for_inference(self) -> dict:
        """Keep the LLM's GGUF weights as their blocks for decoding (`videollm.packed`) and decode
        with `PackedDecoder` inside ``generate()`` where the LLM's architecture allows; for inference
        only (training keeps the dense modules). Returns what was packed and why not more."""
        stats = pack_language_model(self.language_model)
        self.packed = stats["packed"] > 0
        llm = self.language_model.get_base_model() if self.has_lora else self.language_model
        self.packed_decoder, why = PackedDecoder.build(llm) if stats["packed"] else (None, "no packed weights")
        return {**stats, "decoder": self.packed_decoder is not None, **({"why_not": why} if why else {})}

    def generate(self, *args, **kwargs):
        """transformers' ``generate``; with a `PackedDecoder` its steps run there (same tokens, faster)."""
        if self.packed_decoder is not None and kwargs.get("custom_generate") is None:
            # transformers hands a custom_generate callable only the arguments _sample does not take,
            # so the streamer travels under another name (and generate_packed streams the prompt).
            kwargs.update(custom_generate=generate_packed, packed_streamer=kwargs.pop("streamer", None))
        return super().generate(*args, **kwargs)

    def add_lora(self, lora_config) -> None:
        """Wrap the LLM in a peft LoRA adapter (``peft.LoraConfig``); the base LLM is frozen by peft."""
        from peft import get_peft_model

        if self.has_lora:
            raise ValueError("the LLM already has a LoRA adapter")
        self.language_model = get_peft_model(self.language_model, lora_config)

    def merge_lora(self) -> None:
        """Fold the LoRA adapter into the LLM weights (for a standalone checkpoint)."""
        if self.packed:
            raise ValueError("this model was packed for inference; load it with pack=False to merge its adapter")
        if self.has_lora:
            self.language_model = self.language_model.merge_and_unload()
            self.language_model_is_base = False

    def save_pretrained(self, save_directory, **kwargs):
        """The whole model, or encoder + projector + ``config.base_llm`` (+ adapter in ``llm_adapter/``)
        with a LoRA adapter or while the LLM is the frozen base (trained LLM weights are saved whole)."""
        if self.packed:
            raise ValueError("this model was packed for inference (load_videollm's default); load it with "
                             "pack=False to save, merge or train it")
        if not (self.has_lora or self.language_model_is_base
                and not any(p.requires_grad for p in self.language_model.parameters())):
            return super().save_pretrained(save_directory, **kwargs)
        if self.has_lora and not (self.language_model_is_base and self.config.base_llm):
            raise ValueError("this LoRA adapter sits on an LLM that is not config.base_llm; "
                             "call merge_lora() first to save a standalone model")
        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(save_directory)
        if self.generation_config is not None:
            self.generation_config.save_pretrained(save_directory)
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()
                 if not k.startswith("language_model.")}
        save_file(state, str(save_directory / NON_LLM_WEIGHTS), metadata={"format": "pt"})
        if self.has_lora:
            # peft would name the base by where it was loaded from (smollm2: a local cache path).
            base = self.language_model.get_base_model()
            base.name_or_path = base.config.name_or_path = self.config.base_llm
            for peft_config in self.language_model.peft_config.values():
                peft_config.base_model_name_or_path = self.config.base_llm
            # The embeddings are the base's (+ the deterministic <video> row); saying so spares peft
            # a Hub lookup of base_llm's config.
            self.language_model.save_pretrained(str(save_directory / ADAPTER_DIR), save_embedding_layers=False)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        path = Path(str(pretrained_model_name_or_path))
        if (path / "config.json").is_file() and not _holds_llm_weights(path):
            return _load_by_reference(path, **kwargs)
        kwargs.pop("is_trainable", None), kwargs.pop("seed", None)
        if kwargs.get("quantization_config") is not None:
            raise UserError(f"'{path}' holds the whole LLM; quantization_config applies to a base-LLM "
                            "reference only (load it unquantized, or start from the base LLM)")
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        model.language_model_is_base = False
        return model


def _holds_llm_weights(path: Path) -> bool:
    if not (path / NON_LLM_WEIGHTS).is_file():
        return (path / "model.safetensors.index.json").is_file()  # sharded: too big to be without the LLM
    with safe_open(str(path / NON_LLM_WEIGHTS), "pt") as f:
        return any(k.startswith("language_model.") for k in f.keys())


def _load_by_reference(path: Path, *, dtype=torch.float32, cache_dir=None, quantization_config=None,
                       is_trainable: bool = False, seed: int = 0, **unused) -> VideoLLMForCausalLM:
    """The base LLM from ``config.base_llm`` + ``<video>``, the saved encoder + projector, the adapter."""
    config = VideoLLMConfig.from_pretrained(path)
    llm, tokenizer = load_llm(config.base_llm, cache_dir=cache_dir, dtype=dtype, quantization_config=quantization_config)
    video_token_id = add_video_token(llm, tokenizer)
    if video_token_id != config.video_token_id or llm.config.vocab_size != config.text_config.vocab_size:
        raise UserError(f"{path}: the base LLM '{config.base_llm}' does not match the checkpoint (video token id "
                        f"{video_token_id} vs {config.video_token_id}, vocab {llm.config.vocab_size} vs "
                        f"{config.text_config.vocab_size})")
    model = _assemble(config, AutoModel.from_config(config.vision_config), llm, seed)
    model.language_model_is_base = True
    missing, unexpected = model.load_state_dict(load_file(str(path / NON_LLM_WEIGHTS)), strict=False)
    missing = [k for k in missing if not k.startswith("language_model.")]
    if missing or unexpected:
        raise UserError(f"{path / NON_LLM_WEIGHTS}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    if (path / ADAPTER_DIR).is_dir():
        from peft import PeftModel  # optional: only checkpoints with an adapter need it

        model.language_model = PeftModel.from_pretrained(llm, str(path / ADAPTER_DIR), is_trainable=is_trainable)
    model.generation_config = (GenerationConfig.from_pretrained(path) if (path / "generation_config.json").is_file()
                               else _generation_config(llm, tokenizer))
    _to_dtype(model, dtype, quantization_config)
    return model.eval()


def _assemble(config: VideoLLMConfig, vision_tower: nn.Module, language_model: nn.Module, seed: int):
    # Seeded right before the projector is made, so a recipe's run depends on its seed alone.
    torch.manual_seed(seed)
    return VideoLLMForCausalLM(config, vision_tower=vision_tower, language_model=language_model)


def _to_dtype(model: VideoLLMForCausalLM, dtype: torch.dtype, quantization_config) -> None:
    if quantization_config is None:
        model.to(dtype)
    else:  # a quantized LLM keeps its own dtypes
        model.vision_tower.to(dtype)
        model.projector.to(dtype)


def add_video_token(llm: PreTrainedModel, tokenizer) -> int:
    """Add ``<video>`` and grow the LLM's embeddings if needed; returns its id. New rows are the mean of
    the old ones: deterministic, so a base LLM reloaded from its reference gets the same rows back."""
    accepts_replace = "replace_extra_special_tokens" in inspect.signature(tokenizer.add_special_tokens).parameters
    extra = {"replace_extra_special_tokens": False} if accepts_replace else {}
    if VIDEO_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [VIDEO_TOKEN]}, **extra)
    token_id = tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)
    old = llm.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > old:
        llm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            emb = llm.get_input_embeddings().weight
            emb[old:] = emb[:old].mean(dim=0, keepdim=True)
            out = llm.get_output_embeddings()
            if out is not None and out.weight.data_ptr() != emb.data_ptr():
                out.weight[old:] = out.weight[:old].mean(dim=0, keepdim=True)
    return token_id


def word_embedding_rows(embeddings: torch.Tensor, tokenizer, words) -> torch.Tensor:
    """(n, D): for each word, the mean of the LLM's input-embedding rows of its sub-tokens, written
    with a leading space as it appears mid-sentence (" red")."""
    rows = []
    for w in words:
        ids = tokenizer(" " + w, add_special_tokens=False).input_ids
        if not ids:
            raise ValueError(f"the tokenizer gives no token for the word {w!r}")
        rows.append(embeddings[ids].detach().float().mean(0))
    return torch.stack(rows)


def resolve_model_dir(path=None) -> Path:
    """A saved VideoLLM directory; None or "default" is the shipped default model."""
    default = path is None or str(path) == DEFAULT_ALIAS
    path = DEFAULT_WEIGHTS if default else Path(str(path)).expanduser()
    if not (path / "config.json").is_file():
        raise UserError(f"the default model is not installed ({path} has no config.json); reinstall the package"
                        if default else f"'{path}' is not a saved VideoLLM (no config.json); give a directory "
                        "written by `videollm finetune` or save_videollm, or 'default'")
    return path


def build_videollm(llm="smollm2", encoder="nano", *, init_from=None, num_frames: int = 8,
                   image_size: int | None = None, projector: dict | None = None, use_time_line: bool = True,
                   system_prompt: str | None = None, cache_dir=None, dtype: torch.dtype = torch.float32,
                   quantization_config=None, seed: int = 0):
    """(model, processor): the one way a VideoLLM is made, for every recipe and tool.

    llm: "smollm2", a Hub id, a local dir, a .gguf file, or a loaded ``(model, tokenizer)``. encoder: a
        VideoMAP preset (random init), an encoder directory, config or module. init_from: a saved
        VideoLLM or "default", continued exactly (LoRA trainable); llm and encoder are then not used.
    projector: {"type": "mlp" | "word_anchor", …settings}; with init_from they change the saved
        projector's settings, keeping its weights. seed: set before the encoder and before the projector.
    """
    settings = dict(projector or {})
    projector_type = settings.pop("type", None)
    if init_from is not None:
        path = resolve_model_dir(init_from)
        if not (path / "tokenizer_config.json").is_file():
            raise UserError(f"init_from '{path}' has no tokenizer; save models with save_videollm")
        model = VideoLLMForCausalLM.from_pretrained(path, dtype=dtype, cache_dir=cache_dir, is_trainable=True,
                                                    quantization_config=quantization_config, seed=seed)
        if not isinstance(llm, tuple) and str(llm) != model.config.base_llm:
            logger.info("init_from %s: its LLM is '%s' (llm=%s is not used)", init_from, model.config.base_llm, llm)
        tokenizer = AutoTokenizer.from_pretrained(path)
        if projector_type is not None or settings:
            with torch.random.fork_rng():  # the seeded state stays that of the saved model's build
                _change_projector(model, tokenizer, projector_type or model.config.projector_type, settings)
    else:
        if isinstance(llm, tuple):
            language_model, tokenizer = llm
            base_llm = getattr(language_model.config, "name_or_path", None) or None
        else:
            language_model, tokenizer = load_llm(llm, cache_dir=cache_dir, dtype=dtype,
                                                 quantization_config=quantization_config)
            base_llm = str(llm)
        video_token_id = add_video_token(language_model, tokenizer)
        torch.manual_seed(seed)
        if isinstance(encoder, nn.Module):
            vision_tower = encoder
        elif isinstance(encoder, PretrainedConfig):
            vision_tower = AutoModel.from_config(encoder)
        else:  # a preset (random init) or a directory
            vision_tower = build_encoder(str(encoder), num_frames=num_frames, img_size=image_size, dtype=dtype)
        config = VideoLLMConfig(vision_config=vision_tower.config, text_config=language_model.config,
                                projector_type=projector_type or "mlp", projector_config=settings,
                                video_token_id=video_token_id, base_llm=base_llm)
        model = _assemble(config, vision_tower, language_model, seed)
        model.language_model_is_base = not isinstance(llm, tuple)
        if isinstance(model.projector, WordAnchorProjector):
            _fill_word_anchor(model, tokenizer)
        model.generation_config = _generation_config(language_model, tokenizer)
        _to_dtype(model, dtype, quantization_config)
    model.eval()
    processor = VideoLLMProcessor(tokenizer, model.config, num_frames=num_frames, image_size=image_size,
                                  use_time_line=use_time_line, system_prompt=system_prompt)
    return model, processor


def _change_projector(model: VideoLLMForCausalLM, tokenizer, projector_type: str, settings: dict) -> None:
    """Another projector type / settings, keeping the old weights; a new word anchor is filled from the LLM."""
    known = PROJECTOR_CONFIGS[projector_type].__dataclass_fields__ if projector_type in PROJECTOR_CONFIGS else {}
    merged = {k: v for k, v in asdict(model.config.projector_config).items() if k in known} | settings
    config = model.config
    config.projector_config = make_projector_config(projector_type, merged)
    config.projector_type = projector_type
    new = build_projector(projector_type, config.projector_config, config.vision_config.embed_dim,
                          config.text_config.hidden_size).to(model.projector.linear_1.weight.dtype)
    kept = {k: v for k, v in model.projector.state_dict().items() if k in new.state_dict()}
    try:
        missing, _ = new.load_state_dict(kept, strict=False)
    except RuntimeError as err:
        raise UserError(f"the saved projector's weights do not fit the projector settings {settings}: "
                        f"{str(err).splitlines()[-1].strip()}") from None
    model.projector = new
    lacking = sorted("projector." + k for k in set(missing) - {"anchor_keys", "anchor_values", "anchor_gate",
                                                                "concept_values"})
    if lacking:
        raise UserError(f"the projector settings {settings} need weights the saved projector lacks: {lacking[:4]}")
    if missing and isinstance(new, WordAnchorProjector):
        _fill_word_anchor(model, tokenizer)


def _fill_word_anchor(model: VideoLLMForCausalLM, tokenizer) -> None:
    words = [w for group in model.config.projector_config.words for w in group]
    rows = word_embedding_rows(model.get_input_embeddings().weight, tokenizer, words)  # (n, D_llm)
    model.projector.set_word_anchor(rows)  # keys centred over the anchored words
    if model.config.projector_config.concepts:
        model.projector.set_concept_anchor(word_embedding_rows(model.get_input_embeddings().weight, tokenizer,
                                                               model.config.projector_config.concepts))


def _generation_config(language_model, tokenizer) -> GenerationConfig:
    gen = GenerationConfig.from_dict(language_model.generation_config.to_dict()) \
        if getattr(language_model, "generation_config", None) is not None else GenerationConfig()
    if gen.eos_token_id is None:
        gen.eos_token_id = tokenizer.eos_token_id
    if gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return gen


def save_videollm(model: VideoLLMForCausalLM, processor, directory) -> None:
    model.save_pretrained(directory)
    processor.save_pretrained(directory)


def load_videollm(path=None, *, num_frames: int | None = None, use_time_line: bool | None = None,
                  max_video_tokens: int | None = None, cache_dir=None, dtype: torch.dtype = torch.float32,
                  is_trainable: bool = False, pack: bool = True):
    """(model, processor) from a saved directory or "default" (None); num_frames / use_time_line /
    max_video_tokens (the projector's token budget: longer clips are pooled over time) override.
    pack: an inference load (not `is_trainable`) uses the inference kernels: decoding on the LLM's packed
    GGUF weights where it has them, frames resized in one C++ pass (`frames_to_tensor(native=True)`)."""
    path = resolve_model_dir(path)
    model = VideoLLMForCausalLM.from_pretrained(path, dtype=dtype, cache_dir=cache_dir, is_trainable=is_trainable)
    if max_video_tokens is not None:
        model.config.projector_config.max_video_tokens = int(max_video_tokens)  # the projector reads the same object
    if pack and not is_trainable:
        model.pack_for_inference()
    processor = VideoLLMProcessor.from_pretrained(path, model.config, num_frames=num_frames,
                                                  use_time_line=use_time_line)
    processor.native_resize = pack and not is_trainable
    if processor.native_resize:
        build_answer_kernels(model)
    return model.eval(), processor


def build_answer_kernels(model) -> None:
    """Build the C++ kernels an answer runs (the frame resize; the scan of a VideoMAP encoder on the
    CPU) while the model loads: built once per machine and cached, they would otherwise be built
    while the first question after a fresh install waits for its first token."""
    resize_kernel()
    if model.config.vision_config.model_type == "videomap" and model.device.type == "cpu":
        load_cpu_kernel()


AutoModelForCausalLM.register(VideoLLMConfig, VideoLLMForCausalLM, exist_ok=True)
