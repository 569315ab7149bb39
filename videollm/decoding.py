"""Decoding without the per-token Python of a transformers forward: a Llama-family LLM's step on its
packed weights (`videollm.packed`) and a static KV cache, run inside ``generate()``.

A decoding step of a 135M-parameter LLM is a few milliseconds of weight streaming once the weights
are packed; the transformers forward around it (decoder-layer modules, a growing cache concatenated
at every step, masks, hooks) costs several times that on a CPU. `PackedDecoder.step` is the same
computation written out for one token: RMSNorm → q/k/v → RoPE → the cache → attention (grouped
query heads) → o → residual → RMSNorm → SiLU-gated MLP → residual, then the final norm and LM head,
each linear layer a `PackedLinear` (LoRA kept as its side path). The norms, RoPE with the cache write
and attention, and the gated MLP's middle are the packed kernel's own functions (`rms_norm`,
`attend`, `silu_mul`): one call each where torch needs a dozen small operators per layer, each a few
microseconds of dispatch for a few hundred numbers.

`generate_packed` is handed to transformers' ``generate(custom_generate=…)``, so generation config,
logits processors (temperature, top-k, top-p, min_new_tokens …), stopping criteria and streamers
are transformers' own; only the forward steps are ours. The prompt (and the video in it) is
prefilled by the model's own forward; its cache is copied into the static one. A request this loop
does not cover (a batch, beams, returned scores or caches, padding) runs transformers' method.

`PrefixCache` keeps the last conversation's keys and values for its next turn: a chat turn re-sends
the whole conversation, and its prompt starts with what the last answer's cache already holds (the
video, the earlier turns). Only the new tokens are prefilled and the encoder does not run again.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.generation.utils import GENERATION_MODES_MAPPING

from videollm.packed import PackedLinear

ARCHITECTURES = ("llama",)  # Llama's layer: pre-norm attention with RoPE and GQA, SiLU-gated MLP, no biases


@dataclass
class DecodeCache:
    """One generation's static cache: per layer keys, transposed (KV, hd, capacity), and values
    (KV, capacity, hd), and the RoPE tables (capacity, hd) for keys (cos, sin) and for queries (× the
    attention scale)."""

    keys_t: list[torch.Tensor]
    values: list[torch.Tensor]
    cos: torch.Tensor
    sin: torch.Tensor
    cos_q: torch.Tensor
    sin_q: torch.Tensor


MIN_REUSE = 64  # tokens: a shorter shared start (a system prompt) is prefilled again


@dataclass
class _Kept:
    tokens: torch.Tensor  # (P,) the tokens whose keys and values `cache` holds, positions 0 … P−1
    pixel_values: torch.Tensor | None  # the video they were computed with
    cache: DecodeCache


class PrefixCache:
    """The keys and values of the last answer, kept for the next request that starts with the same
    tokens and the same video (the next turn of a chat, through the CLI, the demo or the API). One
    entry: a request takes it (so concurrent generations never share buffers) and leaves its own."""

    def __init__(self):
        self._lock = threading.Lock()
        self._kept: _Kept | None = None

    def take(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
             video_token_id: int) -> tuple[DecodeCache, int] | None:
        """(cache, P): positions 0 … P−1 of `input_ids` (1, L) are in `cache` (P ≤ L − 1, ≥ `MIN_REUSE`),
        and none of the video's tokens is after P (the video would have to be encoded again)."""
        with self._lock:
            kept, self._kept = self._kept, None
        if kept is None or not _same_video(kept.pixel_values, pixel_values):
            return None
        n = min(len(kept.tokens), input_ids.shape[1] - 1)
        differ = (kept.tokens[:n] != input_ids[0, :n]).nonzero()
        p = int(differ[0]) if len(differ) else n
        if p < MIN_REUSE or bool((input_ids[0, p:] == video_token_id).any()):
            return None
        return kept.cache, p

    def keep(self, tokens: torch.Tensor, pixel_values: torch.Tensor | None, cache: DecodeCache) -> None:
        with self._lock:
            self._kept = _Kept(tokens, pixel_values, cache)

    def clear(self) -> None:
        with self._lock:
            self._kept = None


def _same_video(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    return a is b or (a.shape == b.shape and torch.equal(a, b))


class PackedDecoder:
    """One-token steps of `llm` (a ``LlamaForCausalLM``, its linear layers `PackedLinear`) over a
    static cache of `capacity` positions. Build with `PackedDecoder.build`, which says why not."""

    def __init__(self, llm: nn.Module):
        config = llm.config
        self.llm = llm
        self.embed = llm.get_input_embeddings()
        self.layers = llm.model.layers
        self.norm = llm.model.norm
        self.rotary = llm.model.rotary_emb
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.eps = config.rms_norm_eps
        self.scaling = self.layers[0].self_attn.scaling
        self.ext = llm.get_output_embeddings().ext  # the packed-weight kernel: also the step's norm and attention
        self.prefix = PrefixCache()

    @classmethod
    def build(cls, llm: nn.Module) -> tuple[PackedDecoder | None, str | None]:
        """(decoder, None), or (None, why this LLM has no packed decoder)."""
        config = llm.config
        if config.model_type not in ARCHITECTURES:
            return None, f"the packed decoder covers {', '.join(ARCHITECTURES)}; this LLM is {config.model_type}"
        if getattr(config, "hidden_act", "silu") != "silu" or getattr(config, "attention_bias", False) \
                or getattr(config, "mlp_bias", False):
            return None, "the LLM's layers differ from Llama's (activation or biases)"
        parts = [getattr(layer.self_attn, n) for layer in llm.model.layers for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        parts += [getattr(layer.mlp, n) for layer in llm.model.layers for n in ("gate_proj", "up_proj", "down_proj")]
        parts.append(llm.get_output_embeddings())
        if not all(isinstance(p, PackedLinear) for p in parts):
            return None, "some of the LLM's weights are not GGUF blocks"
        return cls(llm), None

    def start(self, cache, length: int, capacity: int) -> DecodeCache:
        """A static cache of `capacity` positions holding a prefilled transformers cache (`length`
        positions). Each ``generate`` call has its own, so concurrent calls never share buffers."""
        keys_t, values = [], []
        for layer in cache.layers:
            k, v = layer.keys[0], layer.values[0]  # (KV, length, hd)
            kb = k.new_empty(self.kv_heads, self.head_dim, capacity)
            vb = v.new_empty(self.kv_heads, capacity, self.head_dim)
            kb[:, :, :length], vb[:, :length] = k.transpose(1, 2), v
            keys_t.append(kb)
            values.append(vb)
        positions = torch.arange(capacity)[None]  # (1, capacity)
        cos, sin = self.rotary(vb, positions)  # (1, capacity, hd): transformers' own RoPE (type, scaling)
        # rotate_half(x)·sin = swap_halves(x)·(−sin₁, sin₂): the sign goes into the table. The query's
        # tables carry the attention scale too, so scores need no extra pass.
        half = self.head_dim // 2
        sin = torch.cat([-sin[0, :, :half], sin[0, :, half:]], -1)  # (capacity, hd)
        return DecodeCache(keys_t, values, cos[0], sin, cos[0] * self.scaling, sin * self.scaling)

    @torch.inference_mode()
    def step(self, cache: DecodeCache, token: torch.Tensor, pos: int) -> torch.Tensor:
        """Logits (1, V) for `token` (1,) at position `pos`; writes its keys and values to `cache`."""
        ext, eps = self.ext, self.eps
        h = self.embed(token)  # (1, D)
        for i, layer in enumerate(self.layers):
            attn, mlp = layer.self_attn, layer.mlp
            a = ext.rms_norm(h, layer.input_layernorm.weight, eps)
            # RoPE, the cache write at pos and grouped-query attention over positions 0 … pos
            out = ext.attend(attn.q_proj(a), attn.k_proj(a), attn.v_proj(a), cache.keys_t[i], cache.values[i], pos,
                             cache.cos, cache.sin, cache.cos_q, cache.sin_q)  # (1, H·hd)
            h = h + attn.o_proj(out)
            m = ext.rms_norm(h, layer.post_attention_layernorm.weight, eps)
            h = h + mlp.down_proj(ext.silu_mul(mlp.gate_proj(m), mlp.up_proj(m)))
        return self.llm.get_output_embeddings()(ext.rms_norm(h, self.norm.weight, eps))  # (1, V)


def _covered(input_ids, generation_config, model_kwargs) -> bool:
    mask, cache = model_kwargs.get("attention_mask"), model_kwargs.get("past_key_values")
    return (input_ids.shape[0] == 1 and (cache is None or cache.get_seq_length() == 0)
            and generation_config.get_generation_mode() in ("greedy_search", "sample")
            and not generation_config.return_dict_in_generate and model_kwargs.get("use_cache", True)
            and (mask is None or bool(mask.all())) and not getattr(generation_config, "is_assistant", False))


def generate_packed(model, input_ids, logits_processor, stopping_criteria, generation_config, packed_streamer=None,
                    **model_kwargs):
    """transformers' ``custom_generate`` for a model with a `PackedDecoder` (``model.packed_decoder``):
    greedy or sampled decoding of one sequence, the same tokens as transformers' sampling loop.
    packed_streamer: the ``streamer`` given to ``generate`` (transformers does not pass it on)."""
    decoder, streamer = model.packed_decoder, packed_streamer
    if streamer is not None:
        streamer.put(input_ids.cpu())  # what generate() does before its decoding method
    if decoder is None or not _covered(input_ids, generation_config, model_kwargs):
        method = getattr(type(model), GENERATION_MODES_MAPPING[generation_config.get_generation_mode()])
        return method(model, input_ids, logits_processor=logits_processor, stopping_criteria=stopping_criteria,
                      generation_config=generation_config, streamer=streamer, **model_kwargs)
    length = input_ids.shape[1]
    pixel_values = model_kwargs.get("pixel_values")
    reuse = decoder.prefix.take(input_ids, pixel_values, model.config.video_token_id)
    if reuse is not None:  # the start of the prompt is in the last answer's cache: prefill the rest
        kept, p = reuse
        past = DynamicCache()
        for i, (k, v) in enumerate(zip(kept.keys_t, kept.values)):
            past.update(k[None, :, :, :p].transpose(2, 3), v[None, :, :p], i)  # (1, KV, p, hd)
        model_kwargs.update(past_key_values=past, pixel_values=None, next_sequence_length=length - p)
    inputs = model.prepare_inputs_for_generation(input_ids, is_first_iteration=True, **model_kwargs)
    with torch.inference_mode():
        outputs = model(**inputs, return_dict=True)
    logits = outputs.logits[:, -1].float()  # (1, V)
    capacity = max(length + 1, generation_config.max_length)
    cache = decoder.start(outputs.past_key_values, length, capacity)
    del outputs, inputs
    while True:
        scores = logits_processor(input_ids, logits)
        if generation_config.do_sample:
            token = torch.multinomial(F.softmax(scores, dim=-1), num_samples=1).squeeze(1)  # (1,)
        else:
            token = scores.argmax(-1)  # (1,)
        input_ids = torch.cat([input_ids, token[:, None]], dim=-1)
        if streamer is not None:
            streamer.put(token.cpu())
        if bool(stopping_criteria(input_ids, scores).all()) or input_ids.shape[1] >= capacity:
            break
        logits = decoder.step(cache, token, input_ids.shape[1] - 1).float()
    decoder.prefix.keep(input_ids[0, :-1].clone(), pixel_values, cache)  # the last token has no keys yet
    if streamer is not None:
        streamer.end()
    return input_ids
