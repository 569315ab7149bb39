"""Projectors: encoder tokens → LLM-width video tokens. Chosen by `VideoLLMConfig.projector_type`.

    hidden_states (B, 1 + T·h·w, D) spatial-first, grid (T, h, w)
      → spatial pooling per frame                 (B, T, kh, kw, D)   (D·s² wide with "concat")
      → temporal pooling to the token budget      (B, T', k, D)
      → [cls] + frames                            (B, K, D)
      → linear_1 (+ stem_proj of the stem, max-pooled)  → act → linear_2      (B, K, D_llm)
      → "word_anchor" only: Σ_groups softmax(τ·cos(x, keys) ∪ {none}) · values + gate · x
                            [+ softmax(the encoder's concept logits, pooled alike ∪ {none}) · concept values]
                            [→ select_tokens: each frame's k' tokens with the least "none" weight]  (B, T'·k', D_llm)
"""

from __future__ import annotations

import math
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.activations import ACT2FN

from videollm.configuration_videollm import VideoProjectorConfig, WordAnchorProjectorConfig


class VideoProjector(nn.Module):
    """Pooling + 2-layer MLP. ``stem_proj`` exists with ``config.stem_skip``."""

    def __init__(self, config: VideoProjectorConfig, vision_dim: int, text_dim: int):
        super().__init__()
        self.config = config
        d_in = vision_dim * config.spatial_pool ** 2 if config.spatial_merge == "concat" else vision_dim
        self.linear_1 = nn.Linear(d_in, text_dim)
        if config.stem_skip:
            self.stem_proj = nn.Linear(vision_dim, text_dim)
        self.act = ACT2FN[config.hidden_act]
        self.linear_2 = nn.Linear(text_dim, text_dim)

    def pool(self, hidden_states: torch.Tensor, grid: tuple[int, int, int], reduce: str = "merge",
             temporal: bool = True) -> torch.Tensor:
        """(B, 1 + T·h·w, D) → (B, K, D) (D·s² wide with "concat"); ``reduce="max"``: max-pool each
        token's window instead (the stem skip's readout); ``"mean"``: average it even with "concat".
        temporal=False: no pooling over time (every frame's tokens, whatever the budget)."""
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
        elif cfg.spatial_pool > 1 and cfg.spatial_merge == "concat" and reduce != "mean":
            s = cfg.spatial_pool
            x = F.pad(x, (0, kw * s - w, 0, kh * s - h))  # zeros on a ragged right/bottom edge
            x = F.pixel_unshuffle(x, s)  # (B·T, D·s², kh, kw): each window's patches side by side
            D = x.shape[1]
        elif cfg.spatial_pool > 1:
            s = cfg.spatial_pool
            x = F.avg_pool2d(x, s, s, ceil_mode=True, count_include_pad=False)  # (B·T, D, kh, kw)
        k = kh * kw
        x = x.reshape(B, T, D, k).permute(0, 1, 3, 2)  # (B, T, k, D)
        T_out = cfg.pooled_frames(T, k) if temporal else T
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
                stem_states: torch.Tensor | None = None, concept_logits: torch.Tensor | None = None,
                temporal: bool = True) -> torch.Tensor:
        """hidden_states, stem_states (with ``stem_skip``): (B, 1 + T·h·w, D) → (B, K, D_llm).
        concept_logits: the encoder's (a concept stem's); the word anchor reads them, the MLP does not.
        temporal=False: every frame's tokens (see `pool`)."""
        x = self.linear_1(self.pool(hidden_states, grid, temporal=temporal))  # (B, K, D_llm)
        if self.config.stem_skip:
            if stem_states is None:
                raise ValueError("a projector with stem_skip needs stem_states (the encoder's stem features)")
            x = x + self.stem_proj(self.pool(stem_states, grid, reduce="max", temporal=temporal))
        return self.linear_2(self.act(x))  # (B, K, D_llm)


class WordAnchorProjector(VideoProjector):
    """`VideoProjector`, then the word anchor: each token becomes a mixture of the LLM's own input
    embeddings of the words it matches ("red" + "circle" + "left"), which the LLM reads like those
    words, or near zero where it matches none; a gated copy of the MLP output (gate 0 at the start)
    passes on what the words do not name. ``anchor_keys`` / ``anchor_values`` (n, D_llm), one row
    per word of ``config.words``, are filled by `set_word_anchor` and saved with the projector.

    With ``config.concepts`` (the words of an encoder's concept stem, `encoder.concepts`), each token
    also becomes the mix of those words' embeddings (``concept_values``) that the encoder's concept
    logits give it, pooled like the token, with the same "none" logit: what the frame shows in words.
    """

    def __init__(self, config: WordAnchorProjectorConfig, vision_dim: int, text_dim: int):
        super().__init__(config, vision_dim, text_dim)
        n = sum(len(g) for g in config.words)
        like = self.linear_2.weight
        self.register_buffer("anchor_keys", like.new_zeros(n, text_dim))
        self.register_buffer("anchor_values", like.new_zeros(n, text_dim))
        self.anchor_gate = nn.Parameter(like.new_zeros(()))
        # a model without concepts has no such weights (None is not saved)
        self.register_buffer("concept_values", like.new_zeros(len(config.concepts), text_dim) if config.concepts
                             else None)

    @torch.no_grad()
    def set_word_anchor(self, word_embeddings: torch.Tensor, centre: torch.Tensor | None = None) -> None:
        """word_embeddings (n, D_llm), one row per word. Keys: rows − centre (default: their mean),
        normalised; values: the rows."""
        if tuple(word_embeddings.shape) != tuple(self.anchor_values.shape):
            raise ValueError(f"word_embeddings must be {tuple(self.anchor_values.shape)} (one row per anchor word); "
                             f"got {tuple(word_embeddings.shape)}")
        rows = word_embeddings.detach().float()
        centre = rows.mean(0) if centre is None else centre.detach().float()
        self.anchor_keys.copy_(F.normalize(rows - centre, dim=-1))
        self.anchor_values.copy_(rows)

    @torch.no_grad()
    def set_concept_anchor(self, word_embeddings: torch.Tensor) -> None:
        """word_embeddings (C, D_llm): one row per word of ``config.concepts``."""
        if self.concept_values is None or tuple(word_embeddings.shape) != tuple(self.concept_values.shape):
            raise ValueError(f"concept word embeddings must be one row per word of config.concepts "
                             f"({len(self.config.concepts)}); "
                             f"got {tuple(word_embeddings.shape)}")
        self.concept_values.copy_(word_embeddings.detach().float())

    def concept_weights(self, concept_logits: torch.Tensor, grid: tuple[int, int, int],
                        temporal: bool = True) -> torch.Tensor:
        """(B, 1 + T·h·w, C) encoder concept logits → (B, K, C) each video token's concept weights
        (softmax with the "none" class, whose share is left out)."""
        s = self.pool(concept_logits, grid, reduce="mean", temporal=temporal)  # (B, K, C)
        none = s.new_full((*s.shape[:-1], 1), self.config.none_logit)
        return torch.softmax(torch.cat([s, none], dim=-1), dim=-1)[..., :-1]

    def anchor_scores(self, x: torch.Tensor) -> torch.Tensor:
        """τ·cos(token, key): x (…, D_llm) → (…, n), words in ``config.words``' order."""
        return self.config.temperature * F.normalize(x, dim=-1) @ self.anchor_keys.to(x.dtype).T

    def word_scores(self, hidden_states: torch.Tensor, grid: tuple[int, int, int],
                    stem_states: torch.Tensor | None = None) -> torch.Tensor:
        """(B, K, n): which words a video's tokens name, read without the LLM."""
        return self.anchor_scores(super().forward(hidden_states, grid, stem_states))

    def anchor(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, K, D_llm) → (Σ_groups softmax(τ·cos(x, keys_g) ∪ {none: b})·values_g + gate·x,
        how much each token names an object (B, K): the word weight summed over groups, none left out)."""
        scores = self.anchor_scores(x)  # (B, K, n)
        out = self.anchor_gate.to(x.dtype) * x
        named = x.new_zeros(x.shape[:-1])
        start = 0
        for group in self.config.words:
            s = scores[..., start:start + len(group)]  # (B, K, |g|)
            none = s.new_full((*s.shape[:-1], 1), self.config.none_logit)
            p = torch.softmax(torch.cat([s, none], dim=-1), dim=-1)[..., :-1]  # (B, K, |g|)
            out = out + p @ self.anchor_values[start:start + len(group)].to(x.dtype)
            named = named + p.sum(-1)
            start += len(group)
        return out, named

    def select(self, tokens: torch.Tensor, named: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """tokens (B, [1 +] T'·k, D), named (B, [1 +] T'·k) → (B, [1 +] T'·k', D): each frame's
        ``select_tokens`` tokens that name an object most, in raster order (ties: the earlier one)."""
        cfg = self.config
        kh, kw = cfg.tokens_per_frame_for(*grid[1:])
        k, kept = kh * kw, cfg.kept_per_frame(kh * kw)
        if kept == k:
            return tokens
        cls = int(cfg.use_cls_token)
        B, K, D = tokens.shape
        frames = (K - cls) // k
        order = torch.sort(-named[:, cls:].reshape(B, frames, k).float(), dim=-1, stable=True).indices
        keep = order[..., :kept].sort(dim=-1).values  # (B, T', k'): raster order
        keep = (keep + torch.arange(frames, device=keep.device)[:, None] * k).reshape(B, frames * kept) + cls
        picked = tokens.gather(1, keep[..., None].expand(-1, -1, D))  # (B, T'·k', D)
        return torch.cat([tokens[:, :cls], picked], dim=1)

    def merge_named(self, tokens: torch.Tensor, named: torch.Tensor, grid: tuple[int, int, int]):
        """tokens (B, [1 +] T·k, D), named (B, [1 +] T·k) of every frame → the same at T' frames (the
        budget's `pooled_frames`): T is cut into T' runs of consecutive frames, and each token
        position keeps the run's frame whose token there names an object most (ties: the earlier)."""
        cfg = self.config
        T = grid[0]
        kh, kw = cfg.tokens_per_frame_for(*grid[1:])
        k = kh * kw
        T_out, cls = cfg.pooled_frames(T, k), int(cfg.use_cls_token)
        B, _, D = tokens.shape
        x, n = tokens[:, cls:].reshape(B, T, k, D), named[:, cls:].reshape(B, T, k)
        bounds = [i * T // T_out for i in range(T_out + 1)]
        best = torch.stack([n[:, a:b].argmax(1) + a for a, b in zip(bounds, bounds[1:])], 1)  # (B, T', k)
        picked = x.gather(1, best[..., None].expand(-1, -1, -1, D)).reshape(B, T_out * k, D)  # (B, T'·k, D)
        picked_named = n.gather(1, best).reshape(B, T_out * k)
        return torch.cat([tokens[:, :cls], picked], 1), torch.cat([named[:, :cls], picked_named], 1)

    def forward(self, hidden_states: torch.Tensor, grid: tuple[int, int, int],
                stem_states: torch.Tensor | None = None, concept_logits: torch.Tensor | None = None) -> torch.Tensor:
        cfg = self.config
        by_name = (cfg.temporal_merge == "named"
                   and cfg.pooled_frames(grid[0], math.prod(cfg.tokens_per_frame_for(*grid[1:]))) != grid[0])
        out, named = self.anchor(super().forward(hidden_states, grid, stem_states, temporal=not by_name))
        if cfg.concepts:
            if concept_logits is None:
                raise ValueError("this projector anchors concepts: it needs the encoder's concept_logits "
                                 "(an encoder with a concept stem, config.concept_frames > 0)")
            out = out + self.concept_weights(concept_logits, grid, temporal=not by_name) @ self.concept_values.to(out.dtype)
        if by_name:
            out, named = self.merge_named(out, named, grid)
        return self.select(out, named, grid) if cfg.select_tokens else out


PROJECTORS = {"mlp": VideoProjector, "word_anchor": WordAnchorProjector}


def build_projector(projector_type: str, config: VideoProjectorConfig, vision_dim: int, text_dim: int) -> VideoProjector:
    return PROJECTORS[projector_type](config, vision_dim, text_dim)
