"""VideoMAP pretraining objective: frame-wise masked autoregressive pretraining, with the MAE and
UMT baselines in the same module so a comparison changes one config value.

Reads like MAE's ``models_mae.py``::

    forward(pixel_values)
      random_masking      token_mask (B, T, N) bool, True = masked; the same count in every frame
      forward_encoder     VideoMAP on the visible tokens only        (B, 1 + T·N_vis, D)
      forward_decoder     full grid: visible outputs + mask tokens   (B, T, N, D_dec)
                          + decoder pos tables, block-causal by frame, → prediction heads
      forward_loss        next-frame term + masked-reconstruction term, pixels and teacher features

Objectives (``objective=``):

- ``"videomap"`` (default). The decoder's attention is **block-causal by frame** (``order="frame"``:
  a token of frame t sees frames ≤ t; the paper's frame-by-frame strategy) or token-causal
  (``order="token"``). **(our reading)** of the paper's targets, two terms each weighted by config:
  (a) *next-frame*: the decoder outputs at frame t predict all tokens of frame t+1 at the same
  positions; (b) *masked reconstruction* (MAP): the masked tokens of frame t at their own positions.
  Each term has a pixel part (MAE's per-patch normalised pixels, MSE) and, with a teacher, a
  semantic part (the teacher's per-frame features at the student's grid, L2-normalised, loss
  2 − 2·cos as in UMT; `encoder.teacher`). The encoder runs frame-causally too (``frame_causal``):
  a bidirectional encoder would carry frame t+1 into frame t's outputs, and copying would solve the
  next-frame term. ``masking="tube"`` keeps a masked token from being read off the same place in an
  earlier frame.
- ``"mae"``: non-causal decoder, masked-reconstruction of pixels only (VideoMAE with frame-wise
  random masking instead of tubes).
- ``"umt"``: no decoder; the visible encoder tokens are aligned with the teacher's features at
  their positions through a linear head (UMT's unmasked-token alignment). Needs a teacher.

Shapes: B batch, T frames, h×w patch grid, N = h·w patches per frame, P patch side,
D encoder width, E decoder width, F teacher feature width.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from encoder.errors import UserError
from encoder.layers import (AttentionBlock, RMSNorm, frame_causal_mask, interpolate_spatial_pos,
                            interpolate_temporal_pos)
from encoder.teacher import Teacher, build_teacher

OBJECTIVES = ("videomap", "mae", "umt")
ORDERS = ("frame", "token")
MASKINGS = ("frame", "tube")


def patchify(pixel_values: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, T, H, W) → (B, T, N, P·P·C), patches in the encoder's row-major order."""
    B, C, T, H, W = pixel_values.shape
    P = patch_size
    h, w = H // P, W // P
    x = pixel_values.reshape(B, C, T, h, P, w, P)
    x = x.permute(0, 2, 3, 5, 4, 6, 1)  # (B, T, h, w, P, P, C)
    return x.reshape(B, T, h * w, P * P * C)  # (B, T, N, P·P·C)


def unpatchify(patches: torch.Tensor, patch_size: int, grid_hw: tuple[int, int], channels: int = 3) -> torch.Tensor:
    """Inverse of `patchify`: (B, T, N, P·P·C) → (B, C, T, H, W)."""
    B, T, N, _ = patches.shape
    P, (h, w), C = patch_size, grid_hw, channels
    x = patches.reshape(B, T, h, w, P, P, C)
    x = x.permute(0, 6, 1, 2, 4, 3, 5)  # (B, C, T, h, P, w, P)
    return x.reshape(B, C, T, h * P, w * P)


def sample_mask_ratio(generator: torch.Generator | None = None, low: float = 0.3, high: float = 0.7,
                      mean: float = 0.5, std: float = 0.25) -> float:
    """A mask ratio from a normal(mean, std) truncated to [low, high] (MAP), by rejection."""
    while True:
        r = mean + std * float(torch.randn((), generator=generator))
        if low <= r <= high:
            return r


def random_masking(batch: int, frames: int, tokens: int, ratio: float,
                   generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Per-frame random masking: token_mask bool (B, T, N), True = masked (removed before the
    encoder), like MAE's ``mask: 0 is keep, 1 is remove``; ``round(ratio·N)`` tokens in every frame,
    at least one kept."""
    n_mask = min(tokens - 1, max(0, round(ratio * tokens)))
    noise = torch.rand(batch, frames, tokens, generator=generator)  # (B, T, N)
    rank = noise.argsort(dim=-1).argsort(dim=-1)  # (B, T, N): each token's rank within its frame
    return (rank < n_mask).to(device)  # (B, T, N), exactly n_mask True per frame


def tube_masking(batch: int, frames: int, tokens: int, ratio: float,
                 generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Tube masking (VideoMAE): the same positions masked in every frame, so a masked token cannot
    be read off the same place in a neighbouring frame (a static background shows it ~always).
    token_mask: bool (B, T, N), True = masked, ``round(ratio·N)`` per frame, at least one kept."""
    return random_masking(batch, 1, tokens, ratio, generator, device).expand(batch, frames, tokens)


def decoder_attn_mask(frames: int, tokens: int, order: str | None, device=None) -> torch.Tensor | None:
    """The decoder's attention mask over the T·N grid tokens (SDPA sense: True = may attend).

    ``"frame"``: block-causal, query in frame t attends keys in frames ≤ t (the encoder's
    `frame_causal_mask` without its cls token). ``"token"``: causal in the spatial-first token order.
    ``None``: no mask (MAE). Returns (T·N, T·N) bool or None.
    """
    if order is None:
        return None
    if order == "frame":
        return frame_causal_mask(frames, tokens, device)[1:, 1:]  # (L, L): [query, key]
    if order == "token":
        return torch.ones(frames * tokens, frames * tokens, dtype=torch.bool, device=device).tril()
    raise ValueError(f"order must be one of {ORDERS} or None; got {order!r}")


def norm_pix_target(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """MAE's norm-pix: each patch normalised by its own mean and variance. (…, K) → (…, K)."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps) ** 0.5


def pixel_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """MSE per token averaged over tokens (only where ``weight`` is 1 if given). (…, K) → scalar."""
    return _token_mean((pred - target).pow(2).mean(dim=-1), weight)


def feature_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """UMT's 2 − 2·cos(pred, target) per token, averaged (over ``weight`` = 1 if given); ``target``
    is expected L2-normalised, ``pred`` is normalised here. (…, F) → scalar."""
    per_token = 2.0 - 2.0 * (F.normalize(pred.float(), dim=-1) * target.float()).sum(dim=-1)  # (…)
    return _token_mean(per_token, weight)


def _token_mean(per_token: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """The mean of per-token losses (…), over the tokens where ``weight`` is 1 if given."""
    if weight is None:
        return per_token.mean()
    weight = weight.to(per_token.dtype)
    return (per_token * weight).sum() / weight.sum().clamp(min=1.0)


class MaskedAutoregressiveDecoder(nn.Module):
    """A light Transformer over the full (T, h, w) token grid.

    Visible positions carry the (projected) encoder outputs, masked ones a learned mask token; a
    spatial table (h·w) and a temporal table (T) are added, both interpolated to the input's grid.
    forward: visible (B, T, N_vis, D), token_mask (B, T, N) → (B, T, N, E).
    """

    no_weight_decay_params = ("mask_token", "pos_embed", "temporal_pos_embed")

    def __init__(self, encoder_dim: int, grid_hw: tuple[int, int], num_frames: int, dim: int = 256,
                 depth: int = 4, num_heads: int = 8, mlp_ratio: float = 4.0):
        super().__init__()
        self.grid_hw = tuple(grid_hw)
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid_hw[0] * grid_hw[1], dim))
        self.temporal_pos_embed = nn.Parameter(torch.zeros(1, num_frames, dim))
        self.blocks = nn.ModuleList(AttentionBlock(dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = RMSNorm(dim)
        for p in (self.mask_token, self.pos_embed, self.temporal_pos_embed):
            nn.init.trunc_normal_(p, std=0.02)
            p._no_weight_decay = True

    def forward(self, visible: torch.Tensor, token_mask: torch.Tensor, grid: tuple[int, int, int],
                attn_mask: torch.Tensor | None) -> torch.Tensor:
        T, h, w = grid
        B, _, N = token_mask.shape
        x = self.embed(visible)  # (B, T, N_vis, E)
        E = x.shape[-1]
        full = self.mask_token.expand(B, T, N, E).to(x.dtype).clone()  # (B, T, N, E)
        # Boolean indexing walks (B, T, N) row-major, the order the encoder dropped tokens in.
        full[~token_mask] = x.reshape(-1, E)
        pos = interpolate_spatial_pos(self.pos_embed, self.grid_hw, (h, w))  # (1, h·w, E)
        full = full + pos[:, None] + interpolate_temporal_pos(self.temporal_pos_embed, T)[:, :, None]
        z = full.reshape(B, T * N, E)  # (B, T·N, E), spatial-first like the encoder
        for block in self.blocks:
            z = block(z, attn_mask=attn_mask)
        return self.norm(z).reshape(B, T, N, E)  # (B, T, N, E)


@dataclass
class PretrainOutput:
    loss: torch.Tensor  # scalar, the weighted total
    terms: dict[str, torch.Tensor] = field(default_factory=dict)  # unweighted parts, detached
    token_mask: torch.Tensor | None = None  # (B, T, N)
    predictions: dict[str, torch.Tensor] = field(default_factory=dict)  # head outputs, (B, T, N, K)


class VideoMAPPretrainer(nn.Module):
    """Encoder + (decoder, heads) + optional frozen teacher; ``forward(pixel_values)`` → loss.

    Args (plain values; the recipe's config reaches this class through `build_pretrainer`):
        encoder: a `VideoMAPModel` (or `ViTVideoModel`): ``forward(pixel_values, token_mask)``.
        objective: "videomap" | "mae" | "umt".  order: "frame" | "token" (videomap only).
        mask_ratio: fixed ratio, or None to sample one per step from a normal truncated to [0.3, 0.7].
        decoder_dim, decoder_depth, decoder_heads: the decoder (not built for "umt").
        norm_pix: MAE's per-patch normalised pixel targets.
        next_weight, masked_weight: weights of term (a) next-frame and (b) masked reconstruction.
        pixel_weight, teacher_weight: weights of the pixel and the teacher-feature parts.
        teacher: a frozen `encoder.teacher.Teacher` (EfficientNet-Lite0, CLIP or SigLIP), or None.
        masking: "frame" (random per frame, the same count in each) or "tube" (`tube_masking`).
        frame_causal: run the encoder frame-causally for the videomap objective (its outputs at
            frame t see frames ≤ t only), so the next-frame term predicts a frame the encoder has
            not seen. False reproduces the earlier reading (a bidirectional encoder; copying).
    """

    def __init__(self, encoder: nn.Module, *, objective: str = "videomap", order: str = "frame",
                 mask_ratio: float | None = 0.5, decoder_dim: int = 256, decoder_depth: int = 4,
                 decoder_heads: int = 8, norm_pix: bool = True, next_weight: float = 1.0,
                 masked_weight: float = 1.0, pixel_weight: float = 1.0, teacher_weight: float = 1.0,
                 teacher: Teacher | None = None, masking: str = "frame", frame_causal: bool = True):
        super().__init__()
        for name, value, choices in (("masking", masking, MASKINGS), ("objective", objective, OBJECTIVES),
                                     ("order", order, ORDERS)):
            if value not in choices:
                raise UserError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
        if objective == "umt" and teacher is None:
            raise UserError("objective 'umt' aligns encoder tokens with teacher features; set a teacher "
                            "(efficientnet_lite0, or a CLIP/SigLIP id or local path)")
        if mask_ratio is not None and not 0.0 <= mask_ratio < 1.0:
            raise UserError(f"mask_ratio must be in [0, 1) or null (sampled); got {mask_ratio}")
        cfg = encoder.config
        self.encoder = encoder
        self.objective = objective
        self.order = order
        self.masking = masking
        self.frame_causal = frame_causal and objective == "videomap"
        self.patch_size = cfg.patch_size
        self.mask_ratio = mask_ratio
        self.norm_pix = norm_pix
        self.next_weight = next_weight if objective == "videomap" else 0.0
        self.masked_weight = masked_weight
        self.pixel_weight = pixel_weight if objective != "umt" else 0.0
        self.teacher_weight = teacher_weight if (teacher is not None and objective != "mae") else 0.0
        # Held outside the module tree on purpose: the frozen teacher is not trained, not saved in
        # checkpoints (it is reloaded from its id/path) and not handed to the optimizer.
        self._teacher = (teacher,)
        pix_dim = cfg.patch_size ** 2 * cfg.in_chans
        feat_dim = teacher.feature_dim if teacher is not None else 0
        D = cfg.embed_dim
        self.heads = nn.ModuleDict()
        if objective == "umt":
            self.decoder = None
            self.heads["visible_feat"] = nn.Linear(D, feat_dim)
        else:
            grid_hw = (cfg.img_size // cfg.patch_size,) * 2
            self.decoder = MaskedAutoregressiveDecoder(D, grid_hw, cfg.num_frames, decoder_dim,
                                                       decoder_depth, decoder_heads)
            # Separate heads: the output at (t, n) predicts both (t+1, n) and, when masked, (t, n).
            for term in (["next", "masked"] if objective == "videomap" else ["masked"]):
                self.heads[f"{term}_pix"] = nn.Linear(decoder_dim, pix_dim)
                if self.teacher_weight > 0:
                    self.heads[f"{term}_feat"] = nn.Linear(decoder_dim, feat_dim)
        # Heads first, then the decoder's linears: the order of the xavier draws is the recorded one.
        for m in (*self.heads.values(), *(self.decoder.modules() if self.decoder is not None else ())):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def random_masking(self, pixel_values: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """token_mask (B, T, N), True = masked, same count per frame (see `random_masking`)."""
        B, _, T, H, W = pixel_values.shape
        N = (H // self.patch_size) * (W // self.patch_size)
        ratio = self.mask_ratio if self.mask_ratio is not None else sample_mask_ratio(generator)
        masking = tube_masking if self.masking == "tube" else random_masking
        return masking(B, T, N, ratio, generator, device=pixel_values.device)

    def forward_encoder(self, pixel_values: torch.Tensor, token_mask: torch.Tensor):
        """The encoder sees the visible tokens only: (B, 1 + T·N_vis, D)."""
        out = self.encoder(pixel_values, token_mask=token_mask, frame_causal=self.frame_causal)
        return out.last_hidden_state, out.grid

    def forward_decoder(self, latent: torch.Tensor, token_mask: torch.Tensor, grid) -> dict[str, torch.Tensor]:
        """Encoder tokens → predictions {head name: (B, T, N, K)}."""
        B, T, N = token_mask.shape
        visible = latent[:, 1:].reshape(B, T, -1, latent.shape[-1])  # (B, T, N_vis, D), cls dropped
        if self.decoder is None:  # umt: align the visible tokens directly
            return {"visible_feat": self.heads["visible_feat"](visible)}  # (B, T, N_vis, F)
        order = self.order if self.objective == "videomap" else None
        attn_mask = decoder_attn_mask(T, N, order, device=latent.device)
        z = self.decoder(visible, token_mask, grid, attn_mask)  # (B, T, N, E)
        return {name: head(z) for name, head in self.heads.items()}  # (B, T, N, K) each

    def targets(self, pixel_values: torch.Tensor, grid,
                teacher_features: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Per-patch targets {kind: (B, T, N, K)}; ``teacher_features`` (B, T, N, F) are the
        teacher's targets when the caller has them already (`encoder.teacher.TeacherCache`)."""
        out = {}
        if self.pixel_weight > 0:
            pix = patchify(pixel_values.float(), self.patch_size)  # (B, T, N, P·P·3)
            out["pix"] = norm_pix_target(pix) if self.norm_pix else pix
        if self.teacher_weight > 0 and teacher_features is not None:
            out["feat"] = F.normalize(teacher_features.to(pixel_values.device).float(), dim=-1)  # (B, T, N, F)
        elif self.teacher_weight > 0:
            teacher = self.teacher.to(pixel_values.device)
            out["feat"] = teacher(pixel_values, grid[1:])  # (B, T, N, F), unit norm
        return out

    def forward_loss(self, preds: dict[str, torch.Tensor], targets: dict[str, torch.Tensor],
                     token_mask: torch.Tensor) -> PretrainOutput:
        """Weighted sum of the terms; every term is 0 for a perfect prediction."""
        terms: dict[str, torch.Tensor] = {}
        T = token_mask.shape[1]
        if "visible_feat" in preds:  # umt
            tgt = targets["feat"][~token_mask].reshape(preds["visible_feat"].shape)  # (B, T, N_vis, F)
            terms["visible_feat"] = feature_loss(preds["visible_feat"], tgt)
        for kind, loss_fn in (("pix", pixel_loss), ("feat", feature_loss)):
            if f"masked_{kind}" in preds:
                terms[f"masked_{kind}"] = loss_fn(preds[f"masked_{kind}"], targets[kind], token_mask)
            if f"next_{kind}" in preds and T > 1:
                # outputs at frames 0..T-2 predict all tokens of frames 1..T-1
                terms[f"next_{kind}"] = loss_fn(preds[f"next_{kind}"][:, :-1], targets[kind][:, 1:])
        weights = {"pix": self.pixel_weight, "feat": self.teacher_weight}
        loss = torch.zeros((), device=token_mask.device)
        for name, value in terms.items():
            term, kind = name.split("_")
            w_term = self.next_weight if term == "next" else self.masked_weight if term == "masked" else 1.0
            loss = loss + w_term * weights[kind] * value
        return PretrainOutput(loss=loss, terms={k: v.detach() for k, v in terms.items()},
                              token_mask=token_mask, predictions=preds)

    def forward(self, pixel_values: torch.Tensor, token_mask: torch.Tensor | None = None,
                generator: torch.Generator | None = None,
                teacher_features: torch.Tensor | None = None) -> PretrainOutput:
        """pixel_values (B, 3, T, H, W) → `PretrainOutput`. Pass ``generator`` (or a ready
        ``token_mask``) for reproducible masking, and ``teacher_features`` (B, T, N, F) to use
        cached teacher targets instead of running the teacher."""
        if token_mask is None:
            token_mask = self.random_masking(pixel_values, generator)  # (B, T, N)
        latent, grid = self.forward_encoder(pixel_values, token_mask)  # (B, 1 + T·N_vis, D)
        preds = self.forward_decoder(latent, token_mask, grid)
        return self.forward_loss(preds, self.targets(pixel_values, grid, teacher_features), token_mask)

    @property
    def teacher(self) -> Teacher | None:
        return self._teacher[0]


def build_pretrainer(encoder: nn.Module, *, teacher: str | Path | None = None, teacher_size: int | None = None,
                     **kwargs) -> VideoMAPPretrainer:
    """The one place a recipe's objective options become a module (the teacher built by name:
    ``efficientnet_lite0`` or a CLIP/SigLIP id or path, `encoder.teacher.build_teacher`, at input
    side ``teacher_size`` px when given)."""
    size = {"image_size": teacher_size} if teacher_size else {}
    return VideoMAPPretrainer(encoder, teacher=build_teacher(str(teacher) if teacher else None, **size), **kwargs)
