"""Building blocks shared by the VideoMAP backbone (`encoder/videomap.py`) and the ViT baseline
(`encoder/vit.py`): norms, drop-path, MLP, attention, the 3-D patch embedding, position tables
and their interpolation, token masking and the common output type.

Shape letters: B batch, C channels, T frames, H/W pixels, h/w patches per side, N = h·w patches
per frame, L sequence length, D width, nh heads, hd head width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput


@dataclass
class VideoEncoderOutput(ModelOutput):
    """What both video encoders return.

    last_hidden_state: (B, 1 + T·N_visible, D), after the final norm; token 0 is the cls token,
        then frame 1's visible patches, frame 2's, … (spatial-first).
    pooler_output: (B, D), the cls token, or the mean of the patch tokens when ``pool="mean"``.
    grid: (T, h, w), the token grid of the input before masking (h = H/P, w = W/P).
    hidden_states: with ``output_hidden_states=True``, the input of every block plus the output of
        the last one (before the final norm), each (B, 1 + T·N_visible, D).
    stem_states: (B, 1 + T·N_visible, D), patch embedding + positions (the first block's input);
        always returned (it costs nothing), e.g. for the projector's ``stem_skip``.
    concept_logits: (B, 1 + T·N_visible, C) with a concept stem (`encoder.concepts`): the concepts
        each token carries. concept_probs: (B, T, C), the concepts that went in (the classifier's).
    """

    last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    grid: tuple[int, int, int] | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    stem_states: torch.FloatTensor | None = None
    concept_logits: torch.FloatTensor | None = None
    concept_probs: torch.FloatTensor | None = None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """`RMSNorm` as a function (the Mamba block's lean backward recomputes it): fp32 inside, x's dtype out."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * weight.float()).to(x.dtype)


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale (no bias, no mean subtraction), computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a whole residual branch per sample with probability p and
    scale the kept ones by 1/(1-p); the identity in eval mode or when p == 0."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)  # (B, 1, …)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class MLP(nn.Module):
    """Linear → GELU → Linear."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention through `F.scaled_dot_product_attention`. ``attn_mask`` follows
    SDPA: bool with True = "may attend" (the opposite sense of a token mask, where True = dropped),
    or a float tensor added to the scores; it must broadcast to (B, nh, L, L)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, L, D = x.shape
        qkv = self.qkv(x).reshape(B, L, 3, self.num_heads, D // self.num_heads)  # (B, L, 3, nh, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 × (B, nh, L, hd)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, nh, L, hd)
        out = out.transpose(1, 2).reshape(B, L, D)  # (B, L, D)
        return self.proj(out)


class AttentionBlock(GradientCheckpointingLayer):
    """Pre-norm transformer block: x + DropPath(MHSA(RMSNorm(x))), then x + DropPath(MLP(RMSNorm(x)))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0,
                 qkv_bias: bool = True, norm_eps: float = 1e-5):
        super().__init__()
        self.norm1 = RMSNorm(dim, norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.norm2 = RMSNorm(dim, norm_eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, hidden_states: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        # hidden_states stays positional: HF's checkpoint wrapper only tracks gradients of *args.
        h = hidden_states + self.drop_path(self.attn(self.norm1(hidden_states), attn_mask=attn_mask))
        return h + self.drop_path(self.mlp(self.norm2(h)))


class PatchEmbed3D(nn.Module):
    """Frame-wise patchify: each frame is cut into non-overlapping P×P patches independently (no
    temporal tubelets), so the token count per frame is N = (H/P)·(W/P) for any frame count.

    ``stem="linear"``: one ``Conv3d(C, D, kernel=(1, P, P), stride=(1, P, P))``, as ViT and VideoMAP.
    ``stem="conv"`` (Xiao et al. 2021, "Early convolutions help transformers see better"): 3×3
    stride-2 convolutions with GELU halve the frame log2(P) − 1 times, widening C → D/2^(k-1) … →
    D/2, and a (1, 2, 2) stride-2 ``proj`` ends at the linear patchify's grid and width. Small shapes
    straddling patch borders survive it; a linear 16×16 patchify of 64 px frames trained briefly
    tells them apart no better than chance. P must be a power of two ≥ 2.

    ``motion_gap`` = g > 0 adds a motion stem: a second stem of the same kind reads each frame's
    difference from the frame g before it, ``x_t − x_{max(t−g, 0)}`` (zero for the first g
    frames), and its patch features are added to the frame's. A small object moving a pixel or two
    leaves a signed rim in the difference (bright where it arrives, dark where it left) that a
    convolution reads the direction off in one frame; the blocks alone, from 16 px patch tokens,
    learn it slowly if at all. Only earlier frames enter, so frame-wise autoregressive pretraining
    stays causal.
    """

    def __init__(self, in_chans: int, dim: int, patch_size: int, stem: str = "linear", motion_gap: int = 0):
        super().__init__()
        self.in_chans = in_chans
        self.patch_size = patch_size
        if motion_gap < 0:
            raise ValueError(f"motion_gap must be >= 0 (0: no motion stem); got {motion_gap}")
        self.motion_gap = motion_gap
        self.stem, self.proj = _patch_stem(in_chans, dim, patch_size, stem)
        if motion_gap:
            self.motion_stem, self.motion_proj = _patch_stem(in_chans, dim, patch_size, stem)

    @staticmethod
    def _embed(x: torch.Tensor, stem: nn.Module | None, proj: nn.Module) -> torch.Tensor:
        """(B, C, T, H, W) → (B, D, T, h, w)."""
        if stem is not None:  # per frame: (B·T, C, H, W) → (B, C', T, H·2/P, W·2/P)
            B, _, T, H, W = x.shape
            x = stem(x.transpose(1, 2).reshape(B * T, -1, H, W))
            x = x.reshape(B, T, *x.shape[1:]).transpose(1, 2)
        return proj(x)

    def appearance_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) → (B, D, T, h, w)."""
        return self._embed(pixel_values, self.stem, self.proj)

    def motion_features(self, frame_difference: torch.Tensor) -> torch.Tensor:
        """Frame differences ``x_t − x_{t−g}`` (B, C, T, H, W) → (B, D, T, h, w)."""
        if not self.motion_gap:
            raise ValueError("this patch embedding has no motion stem (motion_gap=0)")
        return self._embed(frame_difference, self.motion_stem, self.motion_proj)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        if pixel_values.dim() != 5 or pixel_values.shape[1] != self.in_chans:
            raise ValueError(f"pixel_values must be (B, {self.in_chans}, T, H, W); got {tuple(pixel_values.shape)}")
        B, _, T, H, W = pixel_values.shape
        P = self.patch_size
        if H % P or W % P:
            raise ValueError(f"frame size {H}x{W} is not divisible by the patch size {P}; resize or crop the "
                             f"frames to a multiple of {P} (e.g. {max(P, H // P * P)}x{max(P, W // P * P)})")
        x = self.appearance_features(pixel_values)  # (B, D, T, h, w)
        if self.motion_gap:
            g = self.motion_gap
            before = torch.cat([pixel_values[:, :, :1].expand(-1, -1, min(g, T), -1, -1), pixel_values[:, :, :-g]], 2)
            x = x + self.motion_features(pixel_values - before)  # frame t − frame t−g
        grid = tuple(x.shape[2:])  # (T, h, w)
        x = x.flatten(3).permute(0, 2, 3, 1)  # (B, T, N, D)
        return x, grid


def _patch_stem(in_chans: int, dim: int, patch_size: int, stem: str) -> tuple[nn.Module | None, nn.Module]:
    """(stem, proj) of `PatchEmbed3D`: stem None and a P×P patchify, or the convolutional stem."""
    if stem == "linear":
        kernel = (1, patch_size, patch_size)
        return None, nn.Conv3d(in_chans, dim, kernel_size=kernel, stride=kernel)
    if stem != "conv":
        raise ValueError(f"patch_stem must be 'linear' or 'conv'; got {stem!r}")
    n = patch_size.bit_length() - 1
    if patch_size < 2 or 1 << n != patch_size:
        raise ValueError(f"patch_stem='conv' needs a patch size that is a power of two >= 2; got {patch_size}")
    widths = [max(8, dim >> (n - i)) for i in range(1, n)]  # D/2^(n-1) … D/2
    layers, prev = [], in_chans
    for w in widths:
        layers += [nn.Conv2d(prev, w, 3, stride=2, padding=1), nn.GELU()]
        prev = w
    return nn.Sequential(*layers), nn.Conv3d(prev, dim, kernel_size=(1, 2, 2), stride=(1, 2, 2))


def interpolate_spatial_pos(table: torch.Tensor, src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> torch.Tensor:
    """Resize a (1, c + h0·w0, D) table of [c leading entries (the cls token's, or none), patch
    positions] to (1, c + h·w, D); ``table`` itself when the size already matches.

    The leading entries are kept; the patch entries are treated as an h0×w0 image with D channels
    and resized by 2-D bicubic interpolation (as ViT/DeiT do for fine-tuning at another resolution).
    """
    if tuple(src_hw) == tuple(dst_hw):
        return table
    (h0, w0), (h, w) = src_hw, dst_hw
    D = table.shape[-1]
    c = table.shape[1] - h0 * w0
    patches = table[:, c:].reshape(1, h0, w0, D).permute(0, 3, 1, 2)  # (1, D, h0, w0)
    patches = F.interpolate(patches.float(), size=(h, w), mode="bicubic", align_corners=False)  # (1, D, h, w)
    patches = patches.permute(0, 2, 3, 1).reshape(1, h * w, D).to(table.dtype)  # (1, h·w, D)
    return torch.cat([table[:, :c], patches], dim=1)  # (1, c + h·w, D)


def interpolate_temporal_pos(table: torch.Tensor, num_frames: int) -> torch.Tensor:
    """Resize a (1, T0, D) frame-position table to (1, T, D) by 1-D linear interpolation (``table``
    itself when T == T0)."""
    if table.shape[1] == num_frames:
        return table
    x = F.interpolate(table.transpose(1, 2).float(), size=num_frames, mode="linear", align_corners=False)  # (1, D, T)
    return x.transpose(1, 2).to(table.dtype)  # (1, T, D)


def apply_token_mask(x: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """Drop the masked patch tokens: (B, T, N, D) → (B, T, N_visible, D), order kept.

    token_mask: bool (B, T, N), True = masked (removed). Every frame of every sample must mask the
    same number of tokens so the result stays a dense tensor (the VideoMAP/MAE masking scheme).
    """
    if token_mask is None:
        return x
    B, T, N, D = x.shape
    if token_mask.dtype != torch.bool:
        raise ValueError(f"token_mask must be a bool tensor (True = masked); got dtype {token_mask.dtype}")
    if tuple(token_mask.shape) != (B, T, N):
        raise ValueError(f"token_mask must have shape (B, T, N) = {(B, T, N)}; got {tuple(token_mask.shape)}")
    counts = token_mask.sum(-1)  # (B, T)
    if (counts != counts.flatten()[0]).any():
        raise ValueError("token_mask must mask the same number of tokens in every frame of every sample; "
                         f"got per-frame counts ranging from {int(counts.min())} to {int(counts.max())}")
    n_visible = N - int(counts.flatten()[0])
    if n_visible == 0:
        raise ValueError(f"token_mask masks all {N} tokens of every frame; keep at least one per frame")
    # Boolean indexing walks (B, T, N) in row-major order, so the kept tokens keep their order.
    return x[~token_mask].reshape(B, T, n_visible, D)  # (B, T, N_visible, D)


class VideoEmbeddings(nn.Module):
    """Patch embedding + cls token + position tables.

    Positions: a learnable spatial table for [cls, N patches] shared by all frames, plus a learnable
    temporal table (one row per frame) added to every patch of that frame; the cls token gets only
    its spatial entry. Both tables are interpolated on the fly when the input's grid differs from
    the one they were built for (``img_size``/``num_frames``), so a checkpoint trained on short,
    small clips runs on long, large ones. Masked tokens are dropped after the positions are added.
    """

    no_weight_decay_params = ("cls_token", "pos_embed", "temporal_pos_embed")

    def __init__(self, img_size: int, patch_size: int, num_frames: int, in_chans: int, dim: int,
                 patch_stem: str = "linear", motion_gap: int = 0):
        super().__init__()
        self.patch_embed = PatchEmbed3D(in_chans, dim, patch_size, patch_stem, motion_gap)
        self.grid_hw = (img_size // patch_size, img_size // patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid_hw[0] * self.grid_hw[1], dim))
        self.temporal_pos_embed = nn.Parameter(torch.zeros(1, num_frames, dim))
        for name in self.no_weight_decay_params:
            getattr(self, name)._no_weight_decay = True

    def forward(self, pixel_values: torch.Tensor, token_mask: torch.Tensor | None = None):
        """Returns cls (B, 1, D), patches (B, T, N_visible, D), grid (T, h, w)."""
        x, grid = self.patch_embed(pixel_values)  # (B, T, N, D)
        T, h, w = grid
        pos = interpolate_spatial_pos(self.pos_embed, self.grid_hw, (h, w))  # (1, 1 + N, D)
        tpos = interpolate_temporal_pos(self.temporal_pos_embed, T)  # (1, T, D)
        x = x + pos[:, None, 1:] + tpos[:, :, None]  # (B, T, N, D)
        x = apply_token_mask(x, token_mask)  # (B, T, N_visible, D)
        cls = (self.cls_token + pos[:, :1]).expand(x.shape[0], -1, -1)  # (B, 1, D)
        return cls, x, grid


def drop_path_schedule(rate: float, n: int) -> list[float]:
    """Linearly increasing drop-path probabilities, 0 for the first block and ``rate`` for the last."""
    return [rate * i / max(n - 1, 1) for i in range(n)]


def init_video_weights(module: nn.Module, std: float) -> None:
    """Both encoders' `_init_weights`: Linear/Conv3d weights and the cls/position tables truncated
    normal(0, std), biases 0, norm scales 1. The guarded `transformers.initialization` functions leave
    tensors loaded from a checkpoint untouched."""
    if isinstance(module, (nn.Linear, nn.Conv3d)):
        init.trunc_normal_(module.weight, std=std)
        if module.bias is not None:
            init.zeros_(module.bias)
    elif isinstance(module, RMSNorm):
        init.ones_(module.weight)
    elif isinstance(module, VideoEmbeddings):
        for table in (module.cls_token, module.pos_embed, module.temporal_pos_embed):
            init.trunc_normal_(table, std=std)


class NoWeightDecayTagsMixin:
    """For the encoders' `PreTrainedModel`s. Modules tag (``_no_weight_decay = True``) the parameters
    they list in ``no_weight_decay_params`` when built; loading with ``from_pretrained`` creates new
    Parameter objects without the tag, so it re-tags them."""

    def no_weight_decay(self) -> set[str]:
        """(Re)tag the listed parameters and return the names of all tagged ones."""
        for module in self.modules():
            for name in getattr(module, "no_weight_decay_params", ()):
                getattr(module, name)._no_weight_decay = True
        return {name for name, p in self.named_parameters() if getattr(p, "_no_weight_decay", False)}

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        model = super().from_pretrained(*args, **kwargs)
        model.no_weight_decay()
        return model


def check_int(name: str, value, minimum: int) -> None:
    """Config validation: `value` must be an int (not a bool) of at least `minimum`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")


def frame_causal_mask(frames: int, tokens: int, device=None) -> torch.Tensor:
    """Attention mask (SDPA sense, True = may attend) over [cls, frame 1 (n tokens), …, frame T]:
    a token of frame t attends the cls token and frames ≤ t; the cls token attends itself only
    (it belongs to no frame, so it carries nothing to earlier frames). (1 + T·n, 1 + T·n) bool."""
    frame_of = torch.cat([torch.full((1,), -1, device=device),
                          torch.arange(frames, device=device).repeat_interleave(tokens)])  # (L,)
    return frame_of[None, :] <= frame_of[:, None]  # (L, L): [query, key]
