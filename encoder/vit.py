"""ViT video encoder: the attention-only baseline VideoMAP is compared against (memory at long
frame counts, accuracy). Same interface, embeddings and block as `encoder/videomap.py`.

Two attention layouts (``ViTVideoConfig.attention``):

- ``"joint"``: joint space-time attention over all 1 + T·N tokens (cost grows as (T·N)²).
- ``"frame"``: each frame is its own sequence ``[cls, N patches]`` through the same blocks, like a
  CLIP ViT applied frame by frame (cost grows as T·N²). Every frame gets its own copy of the cls
  token; at the output the T per-frame cls tokens are **averaged** into the single cls token, so
  the output has the same layout as joint mode: (B, 1 + T·N, D), patches spatial-first. Frames never
  exchange information, except through that average.

Both modes use VideoMAP's position tables, RMSNorm pre-norm blocks and stochastic depth, so a
comparison isolates the token mixer.

Presets: `PRESETS`, with their parameter counts (224 px, 8 frames, patch 16) in `PRESET_PARAMS`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel

from encoder.layers import (AttentionBlock, NoWeightDecayTagsMixin, RMSNorm, VideoEmbeddings, VideoEncoderOutput,
                            check_int, drop_path_schedule, frame_causal_mask, init_video_weights)

PRESETS: dict[str, dict] = {
    "nano": dict(embed_dim=128, depth=10, num_heads=4),
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
}

PRESET_PARAMS: dict[str, int] = {
    "nano": 2_105_088,
    "tiny": 5_521_152,
    "small": 21_659_136,
    "base": 85_785_600,
}


class ViTVideoConfig(PretrainedConfig):
    """Configuration of `ViTVideoModel`; the defaults are the ``nano`` preset in joint mode.

    Fields as in `VideoMAPConfig` (img_size, patch_size, num_frames, in_chans, embed_dim, num_heads,
    mlp_ratio, qkv_bias, drop_path_rate, pool, norm_eps, initializer_range), plus ``depth`` (number
    of attention blocks) and ``attention``: "joint" (space-time) or "frame" (per frame).
    """

    model_type = "vit_video"

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        num_frames: int = 8,
        in_chans: int = 3,
        embed_dim: int = 128,
        depth: int = 10,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        attention: str = "joint",
        drop_path_rate: float = 0.0,
        pool: str = "cls",
        norm_eps: float = 1e-5,
        initializer_range: float = 0.02,
        **kwargs,
    ):
        for name, value in (("img_size", img_size), ("patch_size", patch_size), ("num_frames", num_frames),
                            ("in_chans", in_chans), ("embed_dim", embed_dim), ("depth", depth),
                            ("num_heads", num_heads)):
            check_int(name, value, 1)
        if img_size % patch_size:
            raise ValueError(f"img_size={img_size} must be a multiple of patch_size={patch_size}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        for name, value, choices in (("attention", attention, ("joint", "frame")), ("pool", pool, ("cls", "mean"))):
            if value not in choices:
                raise ValueError(f"{name} must be {' or '.join(map(repr, choices))}; got {value!r}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1); got {drop_path_rate}")
        if mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be > 0; got {mlp_ratio}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.num_frames = num_frames
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.depth = depth
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.qkv_bias = qkv_bias
        self.attention = attention
        self.drop_path_rate = drop_path_rate
        self.pool = pool
        self.norm_eps = norm_eps
        self.initializer_range = initializer_range
        super().__init__(**kwargs)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ViTVideoConfig":
        """A preset (nano, tiny, small, base) with any field overridden (e.g. attention="frame")."""
        if name not in PRESETS:
            raise ValueError(f"unknown ViT preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


class ViTVideoPreTrainedModel(NoWeightDecayTagsMixin, PreTrainedModel):
    config_class = ViTVideoConfig
    base_model_prefix = "vit_video"
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = True
    _no_split_modules = ["AttentionBlock"]

    @torch.no_grad()
    def _init_weights(self, module):
        init_video_weights(module, self.config.initializer_range)


class ViTVideoModel(ViTVideoPreTrainedModel):
    """ViT over video tokens, joint space-time or per-frame attention (see the module docstring)."""

    def __init__(self, config: ViTVideoConfig):
        super().__init__(config)
        D = config.embed_dim
        self.embeddings = VideoEmbeddings(config.img_size, config.patch_size, config.num_frames,
                                          config.in_chans, D)
        self.blocks = nn.ModuleList(
            AttentionBlock(D, config.num_heads, config.mlp_ratio, drop_path=p, qkv_bias=config.qkv_bias,
                           norm_eps=config.norm_eps)
            for p in drop_path_schedule(config.drop_path_rate, config.depth)
        )
        self.norm = RMSNorm(D, config.norm_eps)
        self.post_init()

    def forward(self, pixel_values: torch.Tensor, token_mask: torch.Tensor | None = None,
                output_hidden_states: bool = False, frame_causal: bool = False) -> VideoEncoderOutput:
        """pixel_values: (B, C, T, H, W) float; token_mask: optional bool (B, T, N), True = dropped
        before the blocks (same count in every frame). frame_causal: joint attention sees frames
        ≤ t only (per-frame attention is causal in time already)."""
        pixel_values = pixel_values.to(self.embeddings.patch_embed.proj.weight.dtype)
        cls, x, grid = self.embeddings(pixel_values, token_mask)  # (B, 1, D), (B, T, N_vis, D)
        B, T, Nv, D = x.shape
        if self.config.attention == "joint":
            h = torch.cat([cls, x.reshape(B, T * Nv, D)], dim=1)  # (B, 1 + T·N_vis, D)
        else:
            h = torch.cat([cls[:, None].expand(B, T, 1, D), x], dim=2)  # (B, T, 1 + N_vis, D)
            h = h.reshape(B * T, 1 + Nv, D)  # (B·T, 1 + N_vis, D): each frame is its own sequence
        stem = self._to_video_layout(h, B, T)  # (B, 1 + T·N_vis, D)
        causal = frame_causal and self.config.attention == "joint"
        attn_mask = frame_causal_mask(T, Nv, device=h.device) if causal else None  # (L, L)
        hidden_states = [stem]  # each block's input, then the last block's output
        for block in self.blocks:
            h = block(h, attn_mask=attn_mask)
            if output_hidden_states:
                hidden_states.append(self._to_video_layout(h, B, T))
        h = self._to_video_layout(self.norm(h), B, T)  # (B, 1 + T·N_vis, D)
        pooled = h[:, 0] if self.config.pool == "cls" else h[:, 1:].mean(dim=1)  # (B, D)
        return VideoEncoderOutput(last_hidden_state=h, pooler_output=pooled, grid=grid, stem_states=stem,
                                  hidden_states=tuple(hidden_states) if output_hidden_states else None)

    def _to_video_layout(self, h: torch.Tensor, B: int, T: int) -> torch.Tensor:
        """Block activations → (B, 1 + T·N, D). Joint mode already has that layout; frame mode has
        (B·T, 1 + N, D), whose T per-frame cls tokens are averaged into one."""
        if self.config.attention == "joint":
            return h
        _, L, D = h.shape
        h = h.reshape(B, T, L, D)  # (B, T, 1 + N, D)
        cls = h[:, :, 0].mean(dim=1, keepdim=True)  # (B, 1, D)
        return torch.cat([cls, h[:, :, 1:].reshape(B, T * (L - 1), D)], dim=1)  # (B, 1 + T·N, D)


AutoConfig.register("vit_video", ViTVideoConfig, exist_ok=True)
AutoModel.register(ViTVideoConfig, ViTVideoModel, exist_ok=True)
