"""ViT video baseline: presets, joint vs per-frame attention, masking, checkpoints."""

import pytest
import torch

from encoder.vit import PRESET_PARAMS, PRESETS, ViTVideoConfig, ViTVideoModel


def tiny_model(**overrides) -> ViTVideoModel:
    kw = dict(img_size=32, num_frames=2, embed_dim=16, depth=2, num_heads=2)
    torch.manual_seed(0)
    return ViTVideoModel(ViTVideoConfig(**{**kw, **overrides})).eval()


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds_with_its_documented_parameter_count(name):
    with torch.device("meta"):
        model = ViTVideoModel(ViTVideoConfig.from_preset(name))
    n = sum(p.numel() for p in model.parameters())
    assert n == PRESET_PARAMS[name]


def test_presets_and_validation():
    assert [(c.embed_dim, c.depth, c.num_heads) for c in map(ViTVideoConfig.from_preset, PRESETS)] == [
        (128, 10, 4), (192, 12, 3), (384, 12, 6), (768, 12, 12)]
    with pytest.raises(ValueError, match="attention"):
        ViTVideoConfig(attention="window")
    with pytest.raises(ValueError, match="unknown ViT preset"):
        ViTVideoConfig.from_preset("middle")


@pytest.mark.parametrize("attention", ["joint", "frame"])
def test_output_layout_is_the_same_in_both_modes(attention):
    out = tiny_model(attention=attention)(torch.randn(2, 3, 3, 32, 48))
    assert out.grid == (3, 2, 3)
    assert out.last_hidden_state.shape == (2, 1 + 3 * 6, 16)
    assert torch.equal(out.pooler_output, out.last_hidden_state[:, 0])


def _frame1_tokens_change_when_frame2_changes(model) -> bool:
    x = torch.randn(1, 3, 2, 32, 32)  # N = 4 per frame
    x2 = x.clone()
    x2[:, :, 1] = torch.randn(3, 32, 32)
    with torch.no_grad():
        a, b = model(x).last_hidden_state, model(x2).last_hidden_state
    assert not torch.equal(a[:, 5:], b[:, 5:])  # frame 2's own tokens always change
    return not torch.equal(a[:, 1:5], b[:, 1:5])


def test_frame_mode_keeps_frames_apart_and_joint_mode_mixes_them():
    assert not _frame1_tokens_change_when_frame2_changes(tiny_model(attention="frame"))
    assert _frame1_tokens_change_when_frame2_changes(tiny_model(attention="joint"))


def test_modes_agree_on_a_single_frame():
    joint, frame = tiny_model(attention="joint"), tiny_model(attention="frame")
    frame.load_state_dict(joint.state_dict())  # the same weights serve both modes
    x = torch.randn(1, 3, 1, 32, 32)
    torch.testing.assert_close(frame(x).last_hidden_state, joint(x).last_hidden_state)


def test_frame_mode_is_the_model_applied_per_frame_with_cls_averaged():
    model = tiny_model(attention="frame")
    with torch.no_grad():
        model.embeddings.temporal_pos_embed.zero_()  # frames then differ only by their pixels
        clip = torch.randn(1, 3, 3, 32, 32)
        out = model(clip).last_hidden_state  # (1, 1 + 3·4, D)
        singles = [model(clip[:, :, t:t + 1]).last_hidden_state for t in range(3)]  # 3 × (1, 1 + 4, D)
    torch.testing.assert_close(out[:, 0], torch.stack([s[:, 0] for s in singles]).mean(0))
    for t, single in enumerate(singles):
        torch.testing.assert_close(out[:, 1 + 4 * t:1 + 4 * (t + 1)], single[:, 1:])


def test_token_mask_drops_tokens_in_both_modes():
    mask = torch.zeros(1, 2, 4, dtype=torch.bool)
    mask[0, 0, [0, 2]] = True
    mask[0, 1, [1, 3]] = True
    for attention in ("joint", "frame"):
        out = tiny_model(attention=attention)(torch.randn(1, 3, 2, 32, 32), token_mask=mask)
        assert out.last_hidden_state.shape == (1, 1 + 2 * 2, 16)
    bad = mask.clone()
    bad[0, 1, 0] = True
    with pytest.raises(ValueError, match="same number"):
        tiny_model()(torch.randn(1, 3, 2, 32, 32), token_mask=bad)


def test_checkpoint_round_trip_and_larger_input(tmp_path):
    model = tiny_model(attention="frame")
    x = torch.randn(1, 3, 2, 32, 32)
    model.save_pretrained(tmp_path)
    loaded = ViTVideoModel.from_pretrained(tmp_path).eval()
    assert loaded.config.attention == "frame"
    assert torch.equal(loaded(x).last_hidden_state, model(x).last_hidden_state)
    out = loaded(torch.randn(1, 3, 6, 64, 48))
    assert out.last_hidden_state.shape == (1, 1 + 6 * 12, 16)
    assert loaded.embeddings.pos_embed._no_weight_decay
    assert ViTVideoModel.from_pretrained(tmp_path, attention="joint").config.attention == "joint"


@pytest.mark.parametrize("attention", ["joint", "frame"])
def test_gradient_checkpointing_gives_the_same_grads(attention):
    model = tiny_model(attention=attention, drop_path_rate=0.2).train()
    x = torch.randn(2, 3, 2, 32, 32)

    def run():
        model.zero_grad()
        torch.manual_seed(7)
        model(x).last_hidden_state.pow(2).mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    ref = run()
    model.activation_checkpointing_enable()
    for a, b in zip(run(), ref):
        torch.testing.assert_close(a, b)
