"""`encoder.build.build_encoder`: the one way a name becomes an encoder (presets of both families,
saved encoders, pretrain run folders), with one clear error for anything else."""

import pytest
import torch

from encoder.build import build_encoder, parse_encoder_name
from encoder.errors import UserError
from encoder.videomap import VideoMAPModel
from encoder.vit import ViTVideoModel


@pytest.mark.parametrize("name,expected", [
    ("nano", ("videomap", "nano", None)), ("videomap-tiny", ("videomap", "tiny", None)),
    ("vit-tiny", ("vit", "tiny", "joint")), ("vit-nano-frame", ("vit", "nano", "frame")),
    ("runs/x", None), ("vit-huge", None), ("resnet-50", None),
])
def test_names(name, expected):
    assert parse_encoder_name(name) == expected


def test_presets_with_sizes_and_fields():
    torch.manual_seed(0)
    m = build_encoder("nano", num_frames=4, img_size=32, attn_every=0, frame_causal=True)
    assert isinstance(m, VideoMAPModel)
    assert (m.config.num_frames, m.config.img_size, m.config.attn_every, m.config.frame_causal) == (4, 32, 0, True)
    v = build_encoder("vit-nano-frame", num_frames=2, img_size=32)
    assert isinstance(v, ViTVideoModel) and v.config.attention == "frame"
    with pytest.raises(UserError, match="encoder 'nano'"):
        build_encoder("nano", img_size=30)  # not a multiple of the patch size


def test_saved_encoder_and_pretrain_run_folder(tmp_path):
    torch.manual_seed(0)
    m = build_encoder("nano", num_frames=2, img_size=32)
    m.save_pretrained(tmp_path / "run" / "encoder")
    for where in (tmp_path / "run" / "encoder", tmp_path / "run"):
        again = build_encoder(str(where))
        assert torch.equal(again.embeddings.patch_embed.proj.weight, m.embeddings.patch_embed.proj.weight)
    with pytest.raises(UserError, match="neither a preset"):
        build_encoder(str(tmp_path / "missing"))
