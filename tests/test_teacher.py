"""The semantic teachers (encoder/teacher.py): the embedded EfficientNet-Lite0 loads its shipped
ImageNet weights exactly, sees real photos as ImageNet does, gives unit features at the student's
grid, and its targets are cached per (clip, frame, transform)."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from encoder.efficientnet_lite import EfficientNetLite
from encoder.pretrain import VideoMAPPretrainer
from encoder.teacher import (
    DEFAULT_TEACHER,
    EfficientNetTeacher,
    TeacherCache,
    build_teacher,
    efficientnet_lite0_weights,
    imagenet_class_names,
)
from encoder.transforms import CLIP_MEAN, CLIP_STD, frames_to_tensor
from encoder.videomap import VideoMAPConfig, VideoMAPModel
from videollm.cli import main as cli


def sklearn_photo(name: str) -> np.ndarray:
    """A scikit-learn sample photo (a training-side real source), (H, W, 3) uint8, read without
    importing scikit-learn (installed --no-deps: only its data files are used)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None:
        pytest.skip("scikit-learn's sample photos are not installed (make setup installs them)")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "images" / name
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def teacher():
    return EfficientNetTeacher()


def clip_of(photo: np.ndarray, frames: int = 2, size: int = 224) -> torch.Tensor:
    """A still clip of the photo, as the student sees it: (1, 3, T, S, S), CLIP-normalised."""
    return frames_to_tensor(np.stack([photo] * frames), size).unsqueeze(0)


def test_weights_load_strictly_into_our_network():
    net = EfficientNetLite()
    state = torch.load(efficientnet_lite0_weights(), map_location="cpu", weights_only=True)
    result = net.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert sum(p.numel() for p in net.parameters()) == 4_652_008


def test_class_names():
    names = imagenet_class_names()
    assert len(names) == 1000 and len(set(names)) > 990
    assert names[281] == "tabby" and names[967] == "espresso" and names[0] == "tench"


def test_normalisation_is_tf_style(teacher):
    """Student-normalised input → [0, 1] → (x·255 − 127)/128, the range the weights were trained on."""
    x01 = torch.tensor([0.0, 0.5, 1.0]).view(1, 3, 1, 1, 1).expand(1, 3, 1, 8, 8)
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1, 1)
    images = teacher.images((x01 - mean) / std)  # (1, 3, 224, 224) in [0, 1]
    assert torch.allclose(images[0, :, 0, 0], torch.tensor([0.0, 0.5, 1.0]), atol=1e-5)
    tf = EfficientNetTeacher.normalise(images)[0, :, 0, 0]
    assert torch.allclose(tf, torch.tensor([-127 / 128, 0.5 / 128, 1.0]), atol=1e-4)


@pytest.mark.parametrize("photo,expected", [("china.jpg", {"palace", "monastery", "bell cote", "pagoda", "stupa"}),
                                            ("flower.jpg", {"daisy"})])
def test_real_photos_are_named_as_imagenet_would(teacher, photo, expected):
    probs = teacher.probs(clip_of(sklearn_photo(photo)))  # (1, T, 1000)
    assert probs.shape == (1, 2, 1000) and torch.allclose(probs.sum(-1), torch.ones(1, 2), atol=1e-4)
    top5 = {teacher.class_names[i] for i in probs[0, 0].topk(5).indices}
    assert top5 & expected, top5


def test_features_at_the_student_grid(teacher):
    clip = clip_of(sklearn_photo("flower.jpg"), frames=3, size=64)  # the student's 64 px frames
    feats = teacher(clip, (4, 4))  # (B, T, h·w, F)
    assert feats.shape == (1, 3, 16, 1280)
    assert torch.allclose(feats.norm(dim=-1), torch.ones(1, 3, 16), atol=1e-4)
    assert torch.allclose(feats[0, 0], feats[0, 2], atol=1e-5)  # a still clip: the same every frame
    assert not torch.allclose(feats[0, 0, 0], feats[0, 0, 15], atol=1e-2)  # but not the same everywhere


def test_cache_hit_equals_a_fresh_computation(teacher, tmp_path):
    clip = clip_of(sklearn_photo("china.jpg"), frames=2, size=64)
    cache = TeacherCache(tmp_path, teacher)
    first = cache.features(["synth:seed=1"], [0, 5], clip, (4, 4))[0]
    assert (cache.misses, cache.hits) == (1, 0)
    again = TeacherCache(tmp_path, teacher).features(["synth:seed=1"], [0, 5], clip, (4, 4))[0]  # from disk
    assert torch.allclose(first, again) and first.shape == (2, 16, 1280)
    fresh = teacher(clip, (4, 4))[0]
    assert torch.allclose(again, fresh, atol=2e-3)  # stored in fp16
    # a new frame of the same clip is computed and added; the stored ones are read
    more = TeacherCache(tmp_path, teacher)
    out = more.features(["synth:seed=1"], [5, 7], clip, (4, 4))[0]
    assert more.misses == 1 and torch.allclose(out[0], first[1])


def test_cache_misses_when_the_transform_changes(teacher, tmp_path):
    clip = clip_of(sklearn_photo("china.jpg"), frames=1, size=64)
    TeacherCache(tmp_path, teacher).features(["c"], [0], clip, (4, 4))
    other = EfficientNetTeacher(image_size=128)
    assert other.transform_id != teacher.transform_id
    cache = TeacherCache(tmp_path, other)
    batch = torch.cat([clip, clip.flip(-1)])  # a second clip, mirrored
    assert cache.features(["c", "d"], [0], batch, (4, 4)).shape == (2, 1, 16, 1280)
    assert (cache.misses, cache.hits) == (2, 0)
    assert (cache.features(["d", "c"], [0], batch.flip(0), (4, 4)).shape, cache.hits) == ((2, 1, 16, 1280), 2)


def test_build_teacher_by_name(teacher):
    assert build_teacher(None) is None
    built = build_teacher(DEFAULT_TEACHER)
    assert isinstance(built, EfficientNetTeacher) and built.feature_dim == 1280
    assert all(not p.requires_grad for p in built.parameters())
    built.train()
    assert not built.training  # always frozen, always in eval mode


def test_pretraining_with_the_embedded_teacher_and_cached_targets(teacher):
    """The objective's semantic half runs on the embedded teacher, from cached targets too."""
    torch.manual_seed(0)
    enc = VideoMAPModel(VideoMAPConfig(img_size=32, patch_size=8, num_frames=2, embed_dim=32, depth_mamba=2,
                                       attn_every=2, num_heads=2))
    model = VideoMAPPretrainer(enc, teacher=teacher, decoder_dim=32, decoder_depth=1, decoder_heads=2)
    clip = clip_of(sklearn_photo("flower.jpg"), frames=2, size=32)
    g = torch.Generator().manual_seed(0)
    out = model(clip, generator=g)
    out.loss.backward()
    assert {"next_feat", "masked_feat"} <= set(out.terms) and torch.isfinite(out.loss)
    assert model.heads["next_feat"].weight.grad.abs().sum() > 0
    cached = teacher(clip, (4, 4))
    again = model(clip, token_mask=out.token_mask, teacher_features=cached)
    assert torch.allclose(again.terms["next_feat"], out.terms["next_feat"], atol=1e-5)


def test_the_pretrain_recipe_runs_with_the_embedded_teacher(tmp_path):
    """The semantic half of the objective through the real command: both feature terms are logged;
    with a cache folder, a second run over the same clips reads every target from it and gets the
    losses of the first."""
    args = ["pretrain", "--config", "training/configs/pretrain_smoke.yaml", "objective.teacher=efficientnet_lite0",
            "objective.teacher_size=64", f"objective.teacher_cache={tmp_path / 'cache'}", "steps=2"]
    records = []
    for run in ("a", "b"):
        assert cli([*args, f"output_dir={tmp_path / run}"]) == 0
        records.append([json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()][-1])
    a, b = records
    assert a["next_feat"] > 0 and a["masked_feat"] > 0 and (tmp_path / "a" / "encoder" / "config.json").is_file()
    assert a["teacher_cache_misses"] > 0 and b["teacher_cache_misses"] == 0 and b["teacher_cache_hits"] == 16
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)


def test_the_cache_serves_clips_read_from_video_files(tmp_path):
    """A folder of videos has no synthetic seeds: its clips are keyed by their pixels, so a second run
    over the same (whole-video) clips reads every target from the cache."""
    from encoder.video_io import write_video

    rng = np.random.default_rng(0)
    for k in range(3):
        write_video(tmp_path / "videos" / f"v{k}.mp4", rng.integers(0, 255, (4, 32, 32, 3), dtype=np.uint8))
    args = ["pretrain", "--config", "training/configs/pretrain_smoke.yaml", f"data.source={tmp_path / 'videos'}",
            "objective.teacher=efficientnet_lite0", "objective.teacher_size=32",
            f"objective.teacher_cache={tmp_path / 'cache'}", "steps=1"]
    records = []
    for run in ("a", "b"):
        assert cli([*args, f"output_dir={tmp_path / run}"]) == 0
        records.append([json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()][-1])
    a, b = records
    assert a["teacher_cache_misses"] > 0
    assert b["teacher_cache_misses"] == 0 and b["teacher_cache_hits"] == 8


def test_a_clip_teacher_by_path(tmp_path):
    """The full-scale option: a (tiny, random) CLIP vision tower saved locally, at its own size and
    at another (position table interpolated); unit features at the student's grid, no classes."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8, projection_dim=24)
    CLIPVisionModelWithProjection(cfg).save_pretrained(tmp_path / "clip")
    clip = clip_of(sklearn_photo("flower.jpg"), frames=2, size=32)
    for size, grid in ((None, (4, 4)), (64, (2, 2))):
        t = build_teacher(str(tmp_path / "clip"), **({"image_size": size} if size else {}))
        feats = t(clip, grid)
        assert t.feature_dim == 24 and t.probs(clip) is None and feats.shape == (1, 2, grid[0] * grid[1], 24)
        assert torch.allclose(feats.norm(dim=-1), torch.ones(1, 2, grid[0] * grid[1]), atol=1e-5)
