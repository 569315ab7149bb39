"""VideoLLM: video encoder → projector → any Hugging Face causal LM, in the manner of Llava.

    pixel_values (B, 3, T, H, W)
      → vision_tower (VideoMAP / ViT)            last_hidden_state (B, 1 + T·h·w, D), grid (T, h, w)
      → VideoProjector
          spatial pooling per frame              (B, T, kh, kw, D)
          temporal pooling to the token budget   (B, T', k, D)
          [cls] + frames, 2-layer MLP            (B, K, D_llm)
      → masked_scatter into the LLM's inputs_embeds where input_ids == video_token_id
      → language_model (HF causal LM)            logits, loss, past_key_values

The placeholder count must equal the feature count exactly (the processor expands ``<video>``
with `VideoLLMConfig.num_video_tokens`); a mismatch is an error, never a silent truncation.

Saving: without LoRA, `save_pretrained` writes the whole model (encoder, projector, LLM) as
safetensors. With a peft LoRA adapter on the LLM it writes the encoder and projector weights, the
adapter (``llm_adapter/``) and the base-LLM reference ``config.base_llm``; `from_pretrained` loads
the base with `videollm.llm.load_llm`, adds ``<video>`` and re-attaches the adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AutoModel, AutoModelForCausalLM, GenerationConfig, PretrainedConfig, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import ModelOutput

from encoder.errors import UserError
from videollm.configuration_videollm import VIDEO_TOKEN, VideoLLMConfig

ADAPTER_DIR = "llm_adapter"
NON_LLM_WEIGHTS = "model.safetensors"
# The embedded default model, written by `python -m training.pipeline` (see its MODEL_CARD.md).
DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "weights" / "default"


@dataclass
class VideoLLMOutput(ModelOutput):
    """loss: (1,) with labels. logits: (B, L, V). video_hidden_states: (B_v, K, D_llm) projected
    video features, when pixel_values were given."""

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    past_key_values: object | None = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None
    video_hidden_states: torch.FloatTensor | None = None


class VideoProjector(nn.Module):
    """Encoder tokens → LLM-width video tokens: per-frame spatial pooling, temporal pooling to the
    budget, optional cls token, 2-layer MLP, and with ``config.word_anchor`` the vocabulary anchor
    (`anchor`). Token counts follow `VideoLLMConfig.num_video_tokens`."""

    def __init__(self, config: VideoLLMConfig):
        super().__init__()
        self.config = config
        d_vis, d_llm = config.vision_config.embed_dim, config.text_config.hidden_size
        if config.spatial_merge == "concat":
            d_vis *= config.spatial_pool ** 2
        self.linear_1 = nn.Linear(d_vis, d_llm)
        if config.stem_skip:
            self.stem_proj = nn.Linear(config.vision_config.embed_dim, d_llm)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(d_llm, d_llm)
        if config.word_anchor:
            self._add_anchor_slots()

    def _add_anchor_slots(self) -> None:
        # Filled by set_word_anchor from the LLM's embeddings; saved with the projector.
        n, d_llm = sum(len(g) for g in self.config.word_anchor), self.linear_2.out_features
        like = self.linear_2.weight
        self.register_buffer("anchor_keys", like.new_zeros(n, d_llm))
        self.register_buffer("anchor_values", like.new_zeros(n, d_llm))
        self.anchor_gate = nn.Parameter(like.new_zeros(()))

    @torch.no_grad()
    def set_word_anchor(self, word_embeddings: torch.Tensor, centre: torch.Tensor | None = None) -> None:
        """word_embeddings (n, D_llm): the LLM's input embedding of each word of ``config.word_anchor``
        (groups concatenated, in order). Keys are the rows minus ``centre`` (default: their mean),
        normalised, as `training.ground`'s scorer compares tokens with words; values are the raw rows.
        A projector built before ``config.word_anchor`` was set gets its anchor (gate 0) here."""
        if not self.config.word_anchor:
            raise ValueError("set_word_anchor needs config.word_anchor")
        if not hasattr(self, "anchor_values"):
            self._add_anchor_slots()
        if tuple(word_embeddings.shape) != tuple(self.anchor_values.shape):
            raise ValueError(f"word_embeddings must be {tuple(self.anchor_values.shape)} (one row per anchor word); "
                             f"got {tuple(word_embeddings.shape)}")
        rows = word_embeddings.detach().float()
        centre = rows.mean(0) if centre is None else centre.detach().float()
        self.anchor_keys.copy_(F.normalize(rows - centre, dim=-1))
        self.anchor_values.copy_(rows)

    def anchor(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, K, D_llm) → Σ_groups softmax(τ·cos(x, keys_g) ∪ {none: b})·values_g + gate·x, with
        b = ``config.anchor_none_logit`` (0 by default).

        Each token becomes a mixture of the LLM's own embeddings of the words it matches (e.g.
        "red" + "circle" + "left"), which the LLM reads like those words, or near zero where it
        matches none; the gated copy of x (gate 0 at the start) lets training pass on what the
        words do not name."""
        scores = self.anchor_scores(x)  # (B, K, n)
        out = self.anchor_gate.to(x.dtype) * x
        start = 0
        for group in self.config.word_anchor:
            s = scores[..., start:start + len(group)]
            none = s.new_full((*s.shape[:-1], 1), self.config.anchor_none_logit)
            p = torch.softmax(torch.cat([s, none], dim=-1), dim=-1)[..., :-1]
            out = out + p @ self.anchor_values[start:start + len(group)].to(x.dtype)
            start += len(group)
        return out

    def anchor_scores(self, x: torch.Tensor) -> torch.Tensor:
        """τ·cos(token, anchor key) of each token (…, D_llm) and anchor word, in ``config.word_anchor``'s
        order (…, n): what `anchor` mixes the words by (and `eval.niah.needle_readout` reads)."""
        return self.config.anchor_temperature * F.normalize(x, dim=-1) @ self.anchor_keys.to(x.dtype).T

    def pool(self, hidden_states: torch.Tensor, grid: tuple[int, int, int], reduce: str = "merge") -> torch.Tensor:
        """hidden_states (B, 1 + T·h·w, D) spatial-first, grid (T, h, w) → (B, K, D) (D·s² wide with
        ``spatial_merge="concat"``). ``reduce="max"``: each token's window is max-pooled instead
        (the stem skip's readout, as the stem warm-up reads a cell)."""
        cfg = self.config
        T, h, w = grid
        B, L, D = hidden_states.shape
        if L != 1 + T * h * w:
            raise ValueError(f"encoder returned {L} tokens for grid {tuple(grid)}; expected 1 + T·h·w = {1 + T * h * w} "
                             "(the projector needs unmasked encoder output)")
        cls, patches = hidden_states[:, :1], hidden_states[:, 1:]  # (B, 1, D), (B, T·h·w, D)
        x = patches.reshape(B * T, h, w, D).permute(0, 3, 1, 2)  # (B·T, D, h, w)
        kh, kw = cfg.tokens_per_frame_for(h, w)
        if reduce == "max":
            x = F.adaptive_max_pool2d(x, (kh, kw))  # (B·T, D, kh, kw)
        elif cfg.tokens_per_frame is not None:
            x = F.adaptive_avg_pool2d(x, (kh, kw))  # (B·T, D, kh, kw)
        elif cfg.spatial_pool > 1 and cfg.spatial_merge == "concat":
            s = cfg.spatial_pool
            x = F.pad(x, (0, kw * s - w, 0, kh * s - h))  # zeros on a ragged right/bottom edge
            x = F.pixel_unshuffle(x, s)  # (B·T, D·s², kh, kw): each window's patches side by side
            D = x.shape[1]
        elif cfg.spatial_pool > 1:
            s = cfg.spatial_pool
            x = F.avg_pool2d(x, s, s, ceil_mode=True, count_include_pad=False)  # (B·T, D, kh, kw)
        k = kh * kw
        x = x.reshape(B, T, D, k).permute(0, 1, 3, 2)  # (B, T, k, D)
        T_out = cfg.pooled_frames(T, k)
        if T_out != T:
            # Average neighbouring frames (adaptive windows) so every frame still contributes.
            x = x.permute(0, 2, 3, 1).reshape(B, k * D, T)  # (B, k·D, T)
            x = F.adaptive_avg_pool1d(x, T_out)  # (B, k·D, T')
            x = x.reshape(B, k, D, T_out).permute(0, 3, 1, 2)  # (B, T', k, D)
        x = x.reshape(B, T_out * k, D)  # (B, T'·k, D), frame-major like the encoder
        if cfg.use_cls_token:
            x = torch.cat([cls, x], dim=1)  # (B, 1 + T'·k, D)
        return x

    def forward(self, hidden_states: torch.Tensor, grid: tuple[int, int, int],
                stem_states: torch.Tensor | None = None) -> torch.Tensor:
        """hidden_states: the encoder's output (B, 1 + T·h·w, D); stem_states: its first block's
        input, same shape, needed with ``config.stem_skip``."""
        x = self.linear_1(self.pool(hidden_states, grid))  # (B, K, D_llm)
        if self.config.stem_skip:
            if stem_states is None:
                raise ValueError("a projector with stem_skip needs stem_states (the encoder's first block input)")
            x = x + self.stem_proj(self.pool(stem_states, grid, reduce="max"))
        x = self.linear_2(self.act(x))  # (B, K, D_llm)
        return self.anchor(x) if self.config.word_anchor else x


class VideoLLMPreTrainedModel(PreTrainedModel):
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


class VideoLLMForCausalLM(VideoLLMPreTrainedModel, GenerationMixin):
    """Video encoder + projector + causal LM. See the module docstring."""

    def __init__(self, config: VideoLLMConfig, *, vision_tower: nn.Module | None = None,
                 language_model: nn.Module | None = None):
        """``vision_tower``/``language_model``: already-built (e.g. pretrained) modules to use instead
        of fresh ones from the sub-configs; their weights are kept as they are."""
        super().__init__(config)
        self.vision_tower = vision_tower if vision_tower is not None else AutoModel.from_config(config.vision_config)
        self.projector = VideoProjector(config)
        self.language_model = (language_model if language_model is not None
                               else AutoModelForCausalLM.from_config(config.text_config))
        self.post_init()
        # Training switch (not saved): with labels, compute logits at labelled positions only.
        self.loss_logits_only = False

    # ---- plumbing the LLM's embeddings / cache / checkpointing through ----------------------

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        """Checkpoint activations in both the encoder and the LLM."""
        for module in (self.vision_tower, self.language_model):
            if getattr(module, "supports_gradient_checkpointing", False) or hasattr(module, "gradient_checkpointing_enable"):
                module.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)
        if hasattr(self.language_model, "enable_input_require_grads"):
            # A frozen embedding (LoRA) otherwise cuts the graph before the checkpointed blocks.
            self.language_model.enable_input_require_grads()

    def gradient_checkpointing_disable(self):
        for module in (self.vision_tower, self.language_model):
            if hasattr(module, "gradient_checkpointing_disable"):
                module.gradient_checkpointing_disable()

    @property
    def has_lora(self) -> bool:
        try:
            from peft import PeftModel
        except ImportError:  # peft is a dependency, but the model works without it
            return False
        return isinstance(self.language_model, PeftModel)

    def num_video_tokens(self, num_frames: int, height: int, width: int) -> int:
        """K: the number of ``<video>`` placeholders one clip of this size needs."""
        return self.config.num_video_tokens(num_frames, height, width)

    # ---- forward ------------------------------------------------------------------------------

    def get_video_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (B, 3, T, H, W) → projected video tokens (B, K, D_llm)."""
        skip = self.config.stem_skip
        out = self.vision_tower(pixel_values, output_hidden_states=skip)  # last_hidden_state (B, 1 + T·h·w, D)
        return self.projector(out.last_hidden_state, tuple(out.grid),
                              out.hidden_states[0] if skip else None)  # (B, K, D_llm)

    def get_placeholder_mask(self, input_ids: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Bool (B, L): where the video features go; checks that counts match."""
        mask = input_ids == self.config.video_token_id  # (B, L)
        n_tokens, n_features = int(mask.sum()), features.shape[0] * features.shape[1]
        if n_tokens != n_features:
            raise ValueError(
                f"Video features and video tokens do not match: {n_tokens} {VIDEO_TOKEN} tokens in input_ids, "
                f"{n_features} features ({features.shape[0]} video(s) × {features.shape[1]} tokens). "
                "Expand <video> with num_video_tokens(frames, height, width) (VideoLLMProcessor does this)."
            )
        return mask

    def embed_inputs(self, input_ids: torch.Tensor,
                     pixel_values: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The LLM's input embeddings for input_ids (B, L), with the encoded and projected video
        pixel_values (B_v, 3, T, H, W) in place of the ``<video>`` placeholders: (inputs_embeds
        (B, L, D_llm), video features (B_v, K, D_llm) or None). `forward`, streaming generation and
        option scoring all assemble their inputs here."""
        ids = input_ids
        if self.config.video_token_id is not None:
            # Placeholder ids are replaced below; look up a valid row meanwhile.
            ids = input_ids.masked_fill(input_ids == self.config.video_token_id, 0)
        inputs_embeds = self.get_input_embeddings()(ids)  # (B, L, D_llm)
        if pixel_values is None:
            return inputs_embeds, None
        features = self.get_video_features(pixel_values.to(inputs_embeds.device))  # (B_v, K, D_llm)
        features = features.to(inputs_embeds.device, inputs_embeds.dtype)
        mask = self.get_placeholder_mask(input_ids, features)  # (B, L)
        return inputs_embeds.masked_scatter(mask.unsqueeze(-1), features), features  # (B, L, D_llm)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> VideoLLMOutput:
        """input_ids (B, L) with K ``<video>`` placeholders per video; pixel_values (B_v, 3, T, H, W);
        labels (B, L) with -100 where no loss is taken (the LLM shifts them)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if pixel_values is not None and input_ids is None:
            raise ValueError("pixel_values need input_ids to find the <video> placeholders")
        video_features = None
        if inputs_embeds is None:
            inputs_embeds, video_features = self.embed_inputs(input_ids, pixel_values)
        if pixel_values is None and input_ids is not None and self.config.video_token_id is not None and past_key_values is None:
            n = int((input_ids == self.config.video_token_id).sum())
            if n:
                raise ValueError(f"Video features and video tokens do not match: {n} {VIDEO_TOKEN} tokens "
                                 "in input_ids but no pixel_values")
        answers_only = (labels is not None and self.loss_logits_only and isinstance(logits_to_keep, int)
                        and logits_to_keep == 0)
        if answers_only:
            # Logits only where a label is predicted: position p predicts token p + 1, so keep the
            # positions before a label (union over the batch). The 49k-row LM head is then applied
            # to a few answer tokens instead of the whole prompt. Same loss as the LLM's own (mean
            # cross-entropy over the labelled tokens); ``logits`` is then (B, n_kept, V).
            logits_to_keep = (labels[:, 1:] != -100).any(dim=0).nonzero().flatten()  # (n,)
        out = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            labels=None if answers_only else labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )
        loss = out.loss
        if answers_only:
            targets = labels[:, logits_to_keep + 1]  # (B, n)
            loss = F.cross_entropy(out.logits.float().reshape(-1, out.logits.shape[-1]), targets.reshape(-1),
                                   ignore_index=-100)
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

    # ---- LoRA ---------------------------------------------------------------------------------

    def add_lora(self, lora_config) -> None:
        """Wrap the LLM in a peft LoRA adapter (``peft.LoraConfig``); the base LLM is frozen by peft."""
        from peft import get_peft_model

        if self.has_lora:
            raise ValueError("the LLM already has a LoRA adapter")
        self.language_model = get_peft_model(self.language_model, lora_config)

    def merge_lora(self) -> None:
        """Fold the LoRA adapter into the LLM weights (for a standalone checkpoint)."""
        if self.has_lora:
            self.language_model = self.language_model.merge_and_unload()

    # ---- save / load --------------------------------------------------------------------------

    def save_pretrained(self, save_directory, **kwargs):
        """Whole model as safetensors; with LoRA: encoder + projector + adapter + base-LLM reference."""
        if not self.has_lora:
            return super().save_pretrained(save_directory, **kwargs)
        if not self.config.base_llm:
            raise ValueError("saving a LoRA model needs config.base_llm (where to load the base LLM from); "
                             "set it, or call merge_lora() first to save a standalone model")
        from safetensors.torch import save_file

        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(save_directory)
        if self.generation_config is not None:
            self.generation_config.save_pretrained(save_directory)
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()
                 if not k.startswith("language_model.")}
        save_file(state, str(save_directory / NON_LLM_WEIGHTS), metadata={"format": "pt"})
        # peft names the base model in adapter_config.json and its README by where the LLM was
        # loaded from (for smollm2, a local cache path); the reference loading uses is base_llm.
        base = self.language_model.get_base_model()
        base.name_or_path = base.config.name_or_path = self.config.base_llm
        for peft_config in self.language_model.peft_config.values():
            peft_config.base_model_name_or_path = self.config.base_llm
        self.language_model.save_pretrained(str(save_directory / ADAPTER_DIR))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        path = Path(str(pretrained_model_name_or_path))
        if (path / ADAPTER_DIR).is_dir():
            return cls._from_lora_checkpoint(path, **kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    @classmethod
    def _from_lora_checkpoint(cls, path: Path, *, dtype=torch.float32, cache_dir=None, is_trainable: bool = False,
                              **unused) -> "VideoLLMForCausalLM":
        from peft import PeftModel
        from safetensors.torch import load_file

        from videollm.llm import load_llm

        config = VideoLLMConfig.from_pretrained(path)
        llm, tokenizer = load_llm(config.base_llm, cache_dir=cache_dir, dtype=dtype)
        video_token_id = add_video_token(llm, tokenizer)
        if video_token_id != config.video_token_id or llm.config.vocab_size != config.text_config.vocab_size:
            raise ValueError(
                f"{path}: the base LLM '{config.base_llm}' does not match the checkpoint "
                f"(video token id {video_token_id} vs {config.video_token_id}, vocab {llm.config.vocab_size} "
                f"vs {config.text_config.vocab_size})"
            )
        vision_tower = AutoModel.from_config(config.vision_config)
        model = cls(config, vision_tower=vision_tower, language_model=llm)
        state = load_file(str(path / NON_LLM_WEIGHTS))
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("language_model.")]
        if missing or unexpected:
            raise ValueError(f"{path / NON_LLM_WEIGHTS}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
        model.language_model = PeftModel.from_pretrained(llm, str(path / ADAPTER_DIR), is_trainable=is_trainable)
        if (path / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(path)
        model.to(dtype)
        return model.eval()


def add_video_token(llm: PreTrainedModel, tokenizer) -> int:
    """Add ``<video>`` as a special token and grow the LLM's embeddings if needed; returns its id.

    New embedding rows are set to the mean of the existing rows — deterministic, so a base LLM
    reloaded from its reference (LoRA checkpoints) gets exactly the same rows back.
    """
    extra = {"replace_extra_special_tokens": False} if _accepts_replace_kw(tokenizer) else {}
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


def _accepts_replace_kw(tokenizer) -> bool:
    import inspect

    return "replace_extra_special_tokens" in inspect.signature(tokenizer.add_special_tokens).parameters


# ---- building and loading ------------------------------------------------------------------------


def build_videollm(llm="smollm2", encoder="nano", *, num_frames: int = 8, image_size: int | None = None,
                   spatial_pool: int = 2, tokens_per_frame: int | None = None, spatial_merge: str = "avg",
                   max_video_tokens: int | None = 2048,
                   use_cls_token: bool = False, use_time_line: bool = True, cache_dir=None,
                   dtype: torch.dtype = torch.float32, seed: int = 0,
                   word_anchor: list[list[str]] | None = None, stem_skip: bool = False):
    """(model, processor): an encoder, a fresh projector and an LLM, with ``<video>`` added.

    llm: "smollm2", a Hub id, a local dir, a .gguf file, or an already-loaded ``(model, tokenizer)``.
    encoder: a VideoMAP preset name ("nano", …; randomly initialised from ``seed``), a checkpoint
        directory (VideoMAP or ViT, via AutoModel), an encoder config, or an encoder module.
    The remaining arguments are the projector's (see `VideoLLMConfig`; a ``word_anchor`` is filled
    from the LLM's embeddings, `word_embedding_rows`) and the processor's.
    ``model.vision_untrained`` is True when the encoder was randomly initialised.
    """
    from encoder.videomap import PRESETS, VideoMAPConfig
    from videollm.llm import load_llm
    from videollm.processing_videollm import VideoLLMProcessor

    if isinstance(llm, tuple):
        language_model, tokenizer = llm
        base_llm = getattr(language_model.config, "name_or_path", None) or None
    else:
        language_model, tokenizer = load_llm(llm, cache_dir=cache_dir, dtype=dtype)
        base_llm = str(llm)
    video_token_id = add_video_token(language_model, tokenizer)

    untrained = False
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if isinstance(encoder, nn.Module):
            vision_tower = encoder
        elif isinstance(encoder, PretrainedConfig):
            vision_tower, untrained = AutoModel.from_config(encoder), True
        elif isinstance(encoder, str) and encoder in PRESETS:
            vision_tower = AutoModel.from_config(VideoMAPConfig.from_preset(encoder, num_frames=num_frames))
            untrained = True
        else:
            path = Path(str(encoder)).expanduser()
            if not path.is_dir():
                raise UserError(f"encoder '{encoder}' is neither a VideoMAP preset ({', '.join(PRESETS)}) "
                                "nor a checkpoint directory")
            vision_tower = AutoModel.from_pretrained(str(path), dtype=dtype)
        config = VideoLLMConfig(vision_config=vision_tower.config, text_config=language_model.config,
                                spatial_pool=spatial_pool, tokens_per_frame=tokens_per_frame,
                                spatial_merge=spatial_merge, max_video_tokens=max_video_tokens,
                                use_cls_token=use_cls_token, video_token_id=video_token_id, base_llm=base_llm,
                                word_anchor=word_anchor, stem_skip=stem_skip)
        model = VideoLLMForCausalLM(config, vision_tower=vision_tower, language_model=language_model)
    if word_anchor:
        words = [w for group in config.word_anchor for w in group]
        model.projector.set_word_anchor(word_embedding_rows(language_model.get_input_embeddings().weight, tokenizer, words))
    model.generation_config = _generation_config(language_model, tokenizer)
    model.vision_untrained = untrained
    model.to(dtype).eval()
    processor = VideoLLMProcessor(tokenizer, config, num_frames=num_frames, image_size=image_size,
                                  use_time_line=use_time_line)
    return model, processor


def _generation_config(language_model, tokenizer) -> GenerationConfig:
    gen = GenerationConfig.from_dict(language_model.generation_config.to_dict()) \
        if getattr(language_model, "generation_config", None) is not None else GenerationConfig()
    if gen.eos_token_id is None:
        gen.eos_token_id = tokenizer.eos_token_id
    if gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return gen


def save_videollm(model: VideoLLMForCausalLM, processor, directory) -> None:
    """Model (whole, or encoder + projector + LoRA adapter + base reference) and processor."""
    model.save_pretrained(directory)
    processor.save_pretrained(directory)


def load_videollm(path=None, *, num_frames: int | None = None, use_time_line: bool | None = None,
                  cache_dir=None, dtype: torch.dtype = torch.float32, is_trainable: bool = False):
    """(model, processor) from a directory written by `save_videollm` / merge-lora; None: the default
    model, `DEFAULT_WEIGHTS` (shipped in the package), or — when that folder is absent — a random
    ``nano`` encoder + projector on smollm2 with ``model.vision_untrained = True``."""
    from videollm.processing_videollm import VideoLLMProcessor

    if path is None and (DEFAULT_WEIGHTS / "config.json").is_file():
        path = DEFAULT_WEIGHTS
    if path is None:
        return build_videollm("smollm2", "nano", num_frames=num_frames or 8, cache_dir=cache_dir, dtype=dtype,
                              use_time_line=True if use_time_line is None else use_time_line)
    path = Path(str(path)).expanduser()
    if not (path / "config.json").is_file():
        raise UserError(f"'{path}' is not a VideoLLM checkpoint directory (no config.json)")
    if (path / ADAPTER_DIR).is_dir():
        model = VideoLLMForCausalLM.from_pretrained(path, dtype=dtype, cache_dir=cache_dir, is_trainable=is_trainable)
    else:
        model = VideoLLMForCausalLM.from_pretrained(path, dtype=dtype).eval()
    model.vision_untrained = False
    processor = VideoLLMProcessor.from_pretrained(path, model.config, num_frames=num_frames,
                                                  use_time_line=use_time_line)
    return model, processor


AutoModelForCausalLM.register(VideoLLMConfig, VideoLLMForCausalLM, exist_ok=True)
