"""Decoded frames → encoder input.

`frames_to_tensor` is the whole eval-time transform: resize the shorter side to ``size``
(bilinear, antialiased), centre-crop ``size × size``, scale to [0, 1], normalise per channel, and
lay the result out as (3, T, size, size) for the encoders' (B, 3, T, H, W) input.

``native=True`` computes the same in one C++ pass per frame (csrc/resize_crop.cpp: only the
cropped pixels, straight from uint8), equal to torch's interpolate to float rounding. Inference
loads use it; training keeps the reference, so a rebuild of a model gives the same bits.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from encoder.native import load_kernel

# CLIP's statistics are the default: the pretraining teacher and most VideoLLM encoders use them.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Frames are resized this many at a time so a long, high-resolution video never exists in float32
# at full resolution all at once (512 frames of 1080p would be ~12 GB).
_CHUNK = 32

def resize_kernel():
    """The C++ resize-and-crop kernel, or None (logged once) if it cannot be built here."""
    return load_kernel(Path(__file__).with_name("csrc") / "resize_crop.cpp", "encoder_resize_crop",
                       "the frame resize kernel (about 20 s)",
                       "resize kernel unavailable ({why}); frames are resized with torch's interpolate")


def frames_to_tensor(frames: np.ndarray, size: int = 224, mean=CLIP_MEAN, std=CLIP_STD, *,
                     native: bool = False) -> torch.Tensor:
    """frames: uint8 (T, H, W, 3) RGB → float32 (3, T, size, size), normalised.

    The shorter side is resized to ``size`` keeping the aspect ratio, then the centre square is
    cropped. ``mean``/``std`` are per-channel in [0, 1] units (`CLIP_MEAN`/`CLIP_STD` by default,
    `IMAGENET_MEAN`/`IMAGENET_STD` for ImageNet-trained encoders). ``native``: the C++ kernel
    when it builds here (the same numbers to float rounding), else this function's PyTorch path.
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 (T, H, W, 3); got {frames.dtype} {frames.shape}")
    if frames.shape[0] == 0:
        raise ValueError("frames is empty (T = 0)")
    if size < 1:
        raise ValueError(f"size must be >= 1; got {size}")
    T, H, W, _ = frames.shape
    scale = size / min(H, W)
    # max(size, …): rounding must never leave the shorter side below the crop.
    new_h, new_w = max(size, round(H * scale)), max(size, round(W * scale))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    kernel = resize_kernel() if native else None
    if kernel is not None:
        return kernel.resize_crop(torch.from_numpy(np.ascontiguousarray(frames)), new_h, new_w, top, left, size,
                                  [float(m) for m in mean], [float(s) for s in std])
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)  # (1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)  # (1, 3, 1, 1)
    out = torch.empty(3, T, size, size)
    for start in range(0, T, _CHUNK):
        x = torch.from_numpy(np.ascontiguousarray(frames[start:start + _CHUNK]))  # (t, H, W, 3) uint8
        x = x.permute(0, 3, 1, 2).float().div_(255.0)  # (t, 3, H, W)
        if (new_h, new_w) != (H, W):
            x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
        x = x[:, :, top:top + size, left:left + size]  # (t, 3, size, size)
        x = (x - mean_t) / std_t
        out[:, start:start + x.shape[0]] = x.transpose(0, 1)  # (3, t, size, size)
    return out
