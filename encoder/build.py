"""The one way to make a video encoder from a name: every recipe, the VideoLLM builder, the
profiler and ``videollm encode`` call `build_encoder`.

    build_encoder("nano", num_frames=16, img_size=64)          # VideoMAP preset, random init
    build_encoder("videomap-tiny", attn_every=0)                # a field of VideoMAPConfig changed
    build_encoder("vit-tiny-frame", num_frames=64)              # ViT baseline, per-frame attention
    build_encoder("runs/pretrain")                              # a saved encoder dir, or a pretrain run
"""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn
from transformers import AutoModel

from encoder.errors import UserError
from encoder.videomap import PRESETS as VIDEOMAP_PRESETS
from encoder.videomap import VideoMAPConfig, VideoMAPModel
from encoder.vit import PRESETS as VIT_PRESETS
from encoder.vit import ViTVideoConfig, ViTVideoModel

ATTENTIONS = ("joint", "frame")


def parse_encoder_name(name: str) -> tuple[str, str, str | None] | None:
    """``nano`` / ``videomap-nano`` → ("videomap", "nano", None); ``vit-tiny`` → ("vit", "tiny",
    "joint"); ``vit-tiny-frame`` → ("vit", "tiny", "frame"); anything else → None (a path)."""
    parts = str(name).split("-")
    if len(parts) == 1 and parts[0] in VIDEOMAP_PRESETS:
        return "videomap", parts[0], None
    if parts[0] == "videomap" and len(parts) == 2 and parts[1] in VIDEOMAP_PRESETS:
        return "videomap", parts[1], None
    if parts[0] == "vit" and len(parts) in (2, 3) and parts[1] in VIT_PRESETS and (len(parts) == 2 or parts[2] in ATTENTIONS):
        return "vit", parts[1], parts[2] if len(parts) == 3 else "joint"
    return None


def build_encoder(name: str, *, num_frames: int | None = None, img_size: int | None = None, dtype=None,
                  **config_fields) -> nn.Module:
    """A preset name (random init from torch's global RNG; ``num_frames``, ``img_size`` and
    ``config_fields`` set the config), or a directory written by ``save_pretrained`` — an encoder,
    or a pretrain run folder holding one in ``encoder/`` — which keeps its own config."""
    parsed = parse_encoder_name(name)
    sizes = {k: v for k, v in (("num_frames", num_frames), ("img_size", img_size)) if v is not None}
    if parsed is not None:
        family, preset, attention = parsed
        try:
            if family == "videomap":
                model = VideoMAPModel(VideoMAPConfig.from_preset(preset, **sizes, **config_fields))
            else:
                model = ViTVideoModel(ViTVideoConfig.from_preset(preset, attention=attention, **sizes, **config_fields))
        except (ValueError, TypeError) as err:
            raise UserError(f"encoder '{name}': {err}") from None
        return model if dtype is None else model.to(dtype)
    path = Path(str(name)).expanduser()
    if (path / "encoder" / "config.json").is_file():
        path = path / "encoder"  # a pretrain run folder
    if not (path / "config.json").is_file():
        raise UserError(f"encoder '{name}' is neither a preset (VideoMAP: {', '.join(VIDEOMAP_PRESETS)}; "
                        f"videomap-<preset>, vit-<preset>[-frame]) nor an encoder directory (config.json, as "
                        "pretraining writes to <run>/encoder)")
    return AutoModel.from_pretrained(str(path), **({"dtype": dtype} if dtype is not None else {}))


def add_concept_stem(encoder: nn.Module, frames: int = 4, size: int = 128) -> nn.Module:
    """The VideoMAP `encoder` with a concept stem (`encoder.concepts`) of `frames` frames at `size` px
    added, its own weights kept (the stem starts as a pass-through); unchanged if it has one."""
    if not isinstance(encoder, VideoMAPModel):
        raise UserError(f"a concept stem needs a VideoMAP encoder; got {type(encoder).__name__}")
    if encoder.concepts is not None:
        return encoder
    config = VideoMAPConfig(**{**encoder.config.to_dict(), "concept_frames": frames, "concept_size": size})
    model = VideoMAPModel(config).to(next(encoder.parameters()).dtype)
    missing, unexpected = model.load_state_dict(encoder.state_dict(), strict=False)
    if unexpected or any(not k.startswith("concepts.") for k in missing):
        raise RuntimeError(f"adding a concept stem moved weights: missing {missing}, unexpected {unexpected}")
    return model
