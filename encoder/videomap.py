"""VideoMAP: a hybrid Mamba-Transformer video backbone (bidirectional Mamba blocks with one
attention block after every ``attn_every`` of them).

Data flow (shapes for the default 224 px, P=16 → N=196 patches per frame)::

    pixel_values (B, 3, T, H, W)
      → Conv3d patch embed, kernel (1, P, P)           (B, T, N, D)
      → + spatial table (cls + N, shared by frames) + temporal table (T)
      → drop masked tokens (token_mask, same count per frame)   (B, T, N_vis, D)
      → [cls, frame 1 patches, frame 2 patches, …]     (B, 1 + T·N_vis, D)   spatial-first
      → blocks: M M M M A  M M M M A  …  (pre-norm RMSNorm residual, stochastic depth)
      → final RMSNorm                                   last_hidden_state, pooler_output

The Mamba block is VideoMamba's bidirectional B-Mamba (Li et al., 2024): one shared ``in_proj``
and ``out_proj``; the forward and backward directions each have their own causal depthwise conv,
``x_proj``, ``dt_proj``, ``A_log`` and ``D``; the backward direction scans the sequence from the
last token to the first (an anti-causal conv and a reversed scan, which equal VideoMamba's
flip → scan → flip without the flipped copies); the two are gated by SiLU(z) and averaged. The
direction is `encoder.scan.selective_ssm` (conv → Δ, B, C → scan; on CPU fused, with a backward
that recomputes what it needs instead of keeping per-step tensors), and the block's norm, in_proj,
both directions and out_proj are `encoder.scan.bimamba`: a training step on CPU keeps the block's
input and one state per 64 steps, and recomputes the rest in the backward.

Block layout (``attn_every``; ``depth_mamba`` Mamba blocks in all hybrid cases)::

    attn_every = k ≥ 2   depth_mamba Mamba blocks, one attention block after every k of them
                         (depth_mamba // k attention blocks; a remainder of Mamba blocks ends the stack)
    attn_every = 1       pure attention: depth_mamba attention blocks (each Mamba block replaced)
    attn_every = 0       pure Mamba: depth_mamba Mamba blocks

Presets (``VideoMAPConfig.from_preset``): widths and depths follow VideoMamba, and 4:1 adds one
attention block per 4 Mamba blocks; `PRESET_PARAMS` holds their parameter counts (224 px, 8 frames,
patch 16), checked by a test.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer

from encoder.layers import (
    AttentionBlock,
    DropPath,
    NoWeightDecayTagsMixin,
    RMSNorm,
    VideoEmbeddings,
    VideoEncoderOutput,
    check_int,
    drop_path_schedule,
    frame_causal_mask,
    init_video_weights,
    rms_norm,
)
from encoder.concepts import ConceptStem
from encoder.scan import bimamba, selective_ssm

PRESETS: dict[str, dict] = {
    "nano": dict(embed_dim=128, depth_mamba=8, num_heads=4),
    "tiny": dict(embed_dim=192, depth_mamba=24, num_heads=3),
    "small": dict(embed_dim=384, depth_mamba=24, num_heads=6),
    "middle": dict(embed_dim=576, depth_mamba=32, num_heads=9),
    "base": dict(embed_dim=768, depth_mamba=24, num_heads=12),
}

# Built at the defaults (224 px, 8 frames, patch 16, attn_every 4); see the table above.
PRESET_PARAMS: dict[str, int] = {
    "nano": 1_599_232,
    "tiny": 9_623_424,
    "small": 36_056_832,
    "middle": 105_546_240,
    "base": 139_353_600,
}


class VideoMAPConfig(PretrainedConfig):
    """Configuration of `VideoMAPModel`. The defaults are the ``nano`` preset.

    Args:
        img_size: frame side the spatial position table is built for (inputs of other sizes
            interpolate it). patch_size: P, the side of a square patch. num_frames: frame count the
            temporal table is built for (interpolated likewise). in_chans: input channels.
        embed_dim: D. depth_mamba: number of Mamba blocks (see ``attn_every``).
        attn_every: one attention block after every ``attn_every`` Mamba blocks; 0 = pure Mamba,
            1 = pure attention (``depth_mamba`` attention blocks). See `block_types`.
        num_heads, mlp_ratio, qkv_bias: the attention blocks.
        d_state, d_conv, expand, dt_rank ("auto" = ceil(D/16)), dt_min, dt_max, dt_init_floor: the
            Mamba mixer, with Mamba's names and meanings.
        drop_path_rate: stochastic depth of the last block (linear from 0 over the blocks).
        pool: "cls" (pooler_output = cls token) or "mean" (mean of the patch tokens).
        patch_stem: "linear" (one P×P patchify, as VideoMAP) or "conv" (a convolutional stem
            ending at the same grid; see `encoder.layers.PatchEmbed3D`).
        motion_gap: g > 0 adds a motion stem that reads each frame minus the frame g before it
            (`encoder.layers.PatchEmbed3D`); 0 = none.
        concept_frames: m > 0 adds the concept stem (`encoder.concepts`): m frames per clip go through a
            frozen ImageNet classifier at ``concept_size`` px and each frame's tokens get the code of
            what it shows (weight ``concept_scale``); the outputs carry ``concept_logits``. Frames then
            come at ``concept_size`` px and the patch stems see them resized to ``img_size``. 0 = none.
        frame_causal: the default of ``forward(frame_causal=…)``: the outputs of frame t see frames
            ≤ t only (see `frame_causal_mask`). Frame-wise autoregressive pretraining needs it: with
            a bidirectional encoder the outputs of frame t already carry frame t+1, and predicting
            frame t+1 from them is copying.
        lean_backward: a training step on the CPU kernel keeps only each Mamba block's input and
            the scans' tile-start states, and recomputes the norm, in_proj, conv, Δ and out_proj's
            input in the backward (`encoder.scan.bimamba`; measured in docs/eval.md); gradients equal
            up to float rounding (false: the parts' backward, as models trained before it; their
            recipes set it to rebuild bit for bit).
        norm_eps: RMSNorm epsilon. initializer_range: std of the truncated-normal init.
        gradient_checkpointing: pass True to build the model with activation checkpointing on
            (Hugging Face consumes this flag in ``post_init``); or call
            ``model.activation_checkpointing_enable()``.
    """

    model_type = "videomap"

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        num_frames: int = 8,
        in_chans: int = 3,
        embed_dim: int = 128,
        depth_mamba: int = 8,
        attn_every: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        dt_init_floor: float = 1e-4,
        drop_path_rate: float = 0.0,
        pool: str = "cls",
        norm_eps: float = 1e-5,
        initializer_range: float = 0.02,
        patch_stem: str = "linear",
        motion_gap: int = 0,
        frame_causal: bool = False,
        concept_frames: int = 0,
        concept_size: int = 128,
        concept_scale: float = 5.0,
        lean_backward: bool = True,
        **kwargs,
    ):
        for name, value, minimum in (("img_size", img_size, 1), ("patch_size", patch_size, 1),
                                     ("num_frames", num_frames, 1), ("in_chans", in_chans, 1),
                                     ("embed_dim", embed_dim, 1), ("depth_mamba", depth_mamba, 1),
                                     ("attn_every", attn_every, 0), ("num_heads", num_heads, 1),
                                     ("d_state", d_state, 1), ("d_conv", d_conv, 1), ("expand", expand, 1)):
            check_int(name, value, minimum)
        if img_size % patch_size:
            raise ValueError(f"img_size={img_size} must be a multiple of patch_size={patch_size}")
        if attn_every != 0 and embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        if dt_rank != "auto":
            check_int("dt_rank", dt_rank, 1)
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max; got dt_min={dt_min}, dt_max={dt_max}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1); got {drop_path_rate}")
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean'; got {pool!r}")
        if mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be > 0; got {mlp_ratio}")
        if patch_stem not in ("linear", "conv"):
            raise ValueError(f"patch_stem must be 'linear' or 'conv'; got {patch_stem!r}")
        if patch_stem == "conv" and (patch_size < 2 or patch_size & (patch_size - 1)):
            raise ValueError(f"patch_stem='conv' needs a patch_size that is a power of two >= 2; got {patch_size}")
        check_int("motion_gap", motion_gap, 0)
        check_int("concept_frames", concept_frames, 0)
        check_int("concept_size", concept_size, 32)
        if not concept_scale > 0:
            raise ValueError(f"concept_scale must be > 0; got {concept_scale!r}")
        self.concept_frames, self.concept_size, self.concept_scale = concept_frames, concept_size, float(concept_scale)
        if not isinstance(frame_causal, bool):
            raise ValueError(f"frame_causal must be true or false; got {frame_causal!r}")
        self.frame_causal = frame_causal
        if not isinstance(lean_backward, bool):
            raise ValueError(f"lean_backward must be true or false; got {lean_backward!r}")
        self.lean_backward = lean_backward
        self.patch_stem = patch_stem
        self.motion_gap = motion_gap
        self.img_size = img_size
        self.patch_size = patch_size
        self.num_frames = num_frames
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.depth_mamba = depth_mamba
        self.attn_every = attn_every
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.qkv_bias = qkv_bias
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.dt_rank = dt_rank
        self.dt_min = dt_min
        self.dt_max = dt_max
        self.dt_init_floor = dt_init_floor
        self.drop_path_rate = drop_path_rate
        self.pool = pool
        self.norm_eps = norm_eps
        self.initializer_range = initializer_range
        super().__init__(**kwargs)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "VideoMAPConfig":
        """A preset (nano, tiny, small, middle, base) with any field overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown VideoMAP preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @property
    def resolved_dt_rank(self) -> int:
        return math.ceil(self.embed_dim / 16) if self.dt_rank == "auto" else self.dt_rank

    @property
    def block_types(self) -> list[str]:
        """The stack in order, e.g. ['mamba'] * 4 + ['attn'] + … for attn_every=4."""
        if self.attn_every == 0:
            return ["mamba"] * self.depth_mamba
        if self.attn_every == 1:
            return ["attn"] * self.depth_mamba
        types = []
        for i in range(1, self.depth_mamba + 1):
            types.append("mamba")
            if i % self.attn_every == 0:
                types.append("attn")
        return types


class SelectiveSSM(nn.Module):
    """One direction of the B-Mamba mixer: causal conv → SiLU → input-dependent (Δ, B, C) → scan.

    forward: x (B, E, L), z (B, E, L) or None → y (B, E, L), gated by silu(z) when z is given.
    ``reverse`` is the backward direction: an anti-causal conv and a scan from the last step to the
    first, equal to running the forward direction on the flipped sequence and flipping the result,
    without the flipped copies. Everything stays in the (B, E, L) layout, so no activation is
    transposed or copied on the way; x and z may be strided views.
    """

    no_weight_decay_params = ("A_log", "D")

    def __init__(self, d_inner: int, d_state: int, d_conv: int, dt_rank: int):
        super().__init__()
        self.d_state = d_state
        self.dt_rank = dt_rank
        # Padding is applied in the scan's conv, so the module itself only holds the weights.
        self.conv1d = nn.Conv1d(d_inner, d_inner, kernel_size=d_conv, groups=d_inner, bias=True)
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(d_inner, d_state))
        self.D = nn.Parameter(torch.empty(d_inner))
        self.A_log._no_weight_decay = True
        self.D._no_weight_decay = True

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None, reverse: bool = False) -> torch.Tensor:
        # dt_proj's bias is applied inside the scan (delta_bias), as Mamba does. On CPU the fused
        # `selective_ssm` recomputes the conv output and Δ in its backward instead of keeping them.
        conv_w, conv_b, x_proj_w, dt_proj_w, A, D, bias = self.parameters_for_scan()
        return selective_ssm(x, conv_w, conv_b, x_proj_w, dt_proj_w, A, D=D, z=z, delta_bias=bias,
                             delta_softplus=True, reverse=reverse)  # (B, E, L)

    def parameters_for_scan(self) -> tuple[torch.Tensor, ...]:
        """(conv weight (E, k), conv bias, x_proj weight, dt_proj weight, A = -exp(A_log), D, delta_bias)."""
        return (self.conv1d.weight.squeeze(1), self.conv1d.bias, self.x_proj.weight, self.dt_proj.weight,
                -torch.exp(self.A_log.float()), self.D.float(), self.dt_proj.bias.float())


class BiMambaMixer(nn.Module):
    """VideoMamba's bidirectional Mamba mixer: (B, L, D) → (B, L, D)."""

    def __init__(self, dim: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, dt_rank: int = 8):
        super().__init__()
        d_inner = expand * dim
        self.in_proj = nn.Linear(dim, 2 * d_inner, bias=False)
        self.ssm_fwd = SelectiveSSM(d_inner, d_state, d_conv, dt_rank)
        self.ssm_bwd = SelectiveSSM(d_inner, d_state, d_conv, dt_rank)
        self.out_proj = nn.Linear(d_inner, dim, bias=False)

    def forward(self, hidden_states: torch.Tensor, frames: int | None = None,
                norm: RMSNorm | None = None, lean: bool = True) -> torch.Tensor:
        """hidden_states (B, L, D): normalised, or the block's input with ``norm`` (the block's
        pre-norm, then applied here, so a training step on the CPU kernel can recompute it in its
        backward: `encoder.scan.bimamba`). frames: with T
        given, the sequence is [cls, frame 1, …, frame T] (equal frame lengths) and the backward
        direction scans each frame on its own (and the cls token alone), so no output sees a later
        frame; the forward direction is causal already. lean=False: the parts' backward (see
        `VideoMAPConfig.lean_backward`)."""
        # Gating is elementwise, so gating each direction inside its scan and averaging equals
        # gating the average; the scans apply it in their fused epilogue.
        return bimamba(hidden_states, self.in_proj.weight, self.out_proj.weight, self.ssm_fwd.parameters_for_scan(),
                       self.ssm_bwd.parameters_for_scan(), frames=frames,
                       norm=None if norm is None else (lambda t, w: rms_norm(t, w, norm.eps)),
                       norm_weight=None if norm is None else norm.weight, lean=lean)  # (B, L, D)


class MambaBlock(GradientCheckpointingLayer):
    """Pre-norm residual Mamba block: x + DropPath(BiMamba(RMSNorm(x))). ``lean_backward``: see
    `VideoMAPConfig` (the mixer applies the norm, so the lean backward can recompute it)."""

    def __init__(self, dim: int, d_state: int, d_conv: int, expand: int, dt_rank: int,
                 drop_path: float = 0.0, norm_eps: float = 1e-5, lean_backward: bool = True):
        super().__init__()
        self.norm = RMSNorm(dim, norm_eps)
        self.mixer = BiMambaMixer(dim, d_state=d_state, d_conv=d_conv, expand=expand, dt_rank=dt_rank)
        self.drop_path = DropPath(drop_path)
        self.lean_backward = lean_backward

    def forward(self, hidden_states: torch.Tensor, frames: int | None = None) -> torch.Tensor:
        return hidden_states + self.drop_path(self.mixer(hidden_states, frames, norm=self.norm,
                                                         lean=self.lean_backward))


class VideoMAPPreTrainedModel(NoWeightDecayTagsMixin, PreTrainedModel):
    config_class = VideoMAPConfig
    base_model_prefix = "videomap"
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MambaBlock", "AttentionBlock"]

    @torch.no_grad()
    def _init_weights(self, module):
        # `init.*` skip tensors that were loaded from a checkpoint, so from_pretrained keeps them.
        # Hugging Face applies this children-first, so the SelectiveSSM/BiMambaMixer branches below
        # override the generic Linear init of their dt_proj/out_proj.
        cfg = self.config
        if isinstance(module, SelectiveSSM):
            self._init_ssm(module)
        elif isinstance(module, ConceptStem):  # after its Linears' generic init: identity, seeded codes
            init.copy_(module.codes, module.initial_codes())
            for layer in (module.gain, module.readout):
                init.eye_(layer.weight)
                init.zeros_(layer.bias)
        elif isinstance(module, BiMambaMixer):
            # Mamba's rescaled pre-norm residual init: shrink the residual write by 1/sqrt(#blocks).
            init.trunc_normal_(module.out_proj.weight, std=cfg.initializer_range / math.sqrt(len(cfg.block_types)))
        elif isinstance(module, nn.Conv1d):
            # PyTorch's default conv init, which Mamba keeps for its depthwise conv.
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            bound = 1.0 / math.sqrt(module.weight.shape[1] * module.weight.shape[2])
            init.uniform_(module.bias, -bound, bound)
        else:
            init_video_weights(module, cfg.initializer_range)

    def _init_ssm(self, ssm: SelectiveSSM) -> None:
        """Mamba's S6 init: Δ log-uniform in [dt_min, dt_max] through the dt_proj bias (inverse
        softplus), dt_proj weight uniform ±R^-0.5, A = -[1..d_state] (S4D-real), D = 1."""
        cfg = self.config
        d_inner = ssm.D.shape[0]
        init.uniform_(ssm.dt_proj.weight, -ssm.dt_rank ** -0.5, ssm.dt_rank ** -0.5)
        dt = torch.exp(torch.rand(d_inner) * (math.log(cfg.dt_max) - math.log(cfg.dt_min)) + math.log(cfg.dt_min))
        dt = dt.clamp(min=cfg.dt_init_floor)
        inv_softplus_dt = dt + torch.log(-torch.expm1(-dt))  # softplus(inv_softplus_dt) == dt
        init.copy_(ssm.dt_proj.bias, inv_softplus_dt)
        A = torch.arange(1, ssm.d_state + 1, dtype=torch.float32).repeat(d_inner, 1)  # (E, S)
        init.copy_(ssm.A_log, torch.log(A))
        init.ones_(ssm.D)


class VideoMAPModel(VideoMAPPreTrainedModel):
    """The VideoMAP encoder. See the module docstring for the architecture."""

    def __init__(self, config: VideoMAPConfig):
        super().__init__(config)
        D = config.embed_dim
        self.embeddings = VideoEmbeddings(config.img_size, config.patch_size, config.num_frames,
                                          config.in_chans, D, config.patch_stem, config.motion_gap)
        types = config.block_types
        dpr = drop_path_schedule(config.drop_path_rate, len(types))
        blocks = []
        for kind, p in zip(types, dpr):
            if kind == "mamba":
                blocks.append(MambaBlock(D, config.d_state, config.d_conv, config.expand,
                                         config.resolved_dt_rank, drop_path=p, norm_eps=config.norm_eps,
                                         lean_backward=config.lean_backward))
            else:
                blocks.append(AttentionBlock(D, config.num_heads, config.mlp_ratio, drop_path=p,
                                             qkv_bias=config.qkv_bias, norm_eps=config.norm_eps))
        self.blocks = nn.ModuleList(blocks)
        self.norm = RMSNorm(D, config.norm_eps)
        self.concepts = ConceptStem(D, frames=config.concept_frames, size=config.concept_size,
                                    scale=config.concept_scale) if config.concept_frames else None
        self.post_init()

    def forward(self, pixel_values: torch.Tensor, token_mask: torch.Tensor | None = None,
                output_hidden_states: bool = False, frame_causal: bool | None = None,
                concept_probs: torch.Tensor | None = None) -> VideoEncoderOutput:
        """pixel_values: (B, C, T, H, W) float; token_mask: optional bool (B, T, N), True = dropped
        before the blocks (same count in every frame). frame_causal (default: the config's): the
        outputs of frame t see frames ≤ t only. concept_probs (B, T, 1000), with the concept stem:
        the concepts given instead of classifying the frames."""
        causal = self.config.frame_causal if frame_causal is None else frame_causal
        pixel_values = pixel_values.to(self.embeddings.patch_embed.proj.weight.dtype)
        concept_add = None
        if self.concepts is not None:
            concept_add, concept_probs = self.concepts(pixel_values, concept_probs)  # (B, T, 1, D), (B, T, C)
            S = self.config.img_size
            if pixel_values.shape[-2:] != (S, S):  # the patch stems see the frames at their own size
                B_, C_, T_ = pixel_values.shape[:3]
                frames = pixel_values.transpose(1, 2).reshape(B_ * T_, C_, *pixel_values.shape[-2:])
                frames = F.interpolate(frames, size=(S, S), mode="bilinear", align_corners=False, antialias=True)
                pixel_values = frames.reshape(B_, T_, C_, S, S).transpose(1, 2)
        cls, x, grid = self.embeddings(pixel_values, token_mask)  # (B, 1, D), (B, T, N_vis, D)
        if concept_add is not None:
            x = x + concept_add.to(x.dtype)
        B, T, Nv, D = x.shape
        h = stem = torch.cat([cls, x.reshape(B, T * Nv, D)], dim=1)  # (B, 1 + T·N_vis, D), spatial-first
        attn_mask = frame_causal_mask(T, Nv, device=h.device) if causal else None  # (L, L)
        hidden_states = []
        for block in self.blocks:
            if output_hidden_states:
                hidden_states.append(h)
            if isinstance(block, MambaBlock):
                h = block(h, T if causal else None)  # (B, 1 + T·N_vis, D)
            else:
                h = block(h, attn_mask=attn_mask)
        if output_hidden_states:
            hidden_states.append(h)
        h = self.norm(h)
        pooled = h[:, 0] if self.config.pool == "cls" else h[:, 1:].mean(dim=1)  # (B, D)
        concept_logits = self.concepts.logits(h) if self.concepts is not None else None  # (B, 1 + T·N_vis, C)
        return VideoEncoderOutput(last_hidden_state=h, pooler_output=pooled, grid=grid, stem_states=stem,
                                  hidden_states=tuple(hidden_states) if output_hidden_states else None,
                                  concept_logits=concept_logits, concept_probs=concept_probs)


AutoConfig.register("videomap", VideoMAPConfig, exist_ok=True)
AutoModel.register(VideoMAPConfig, VideoMAPModel, exist_ok=True)
