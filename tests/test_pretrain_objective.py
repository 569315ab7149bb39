"""The pretraining objective (encoder/pretrain.py): masking, decoder mask, loss terms, teacher,
baselines, and shapes for every preset at tiny sizes."""

import pytest
import torch

from encoder.pretrain import (
    VideoMAPPretrainer,
    build_pretrainer,
    decoder_attn_mask,
    feature_loss,
    norm_pix_target,
    patchify,
    pixel_loss,
    random_masking,
    sample_mask_ratio,
    unpatchify,
)
from encoder.teacher import CLIPTeacher
from encoder.videomap import PRESETS, VideoMAPConfig, VideoMAPModel
from encoder.vit import ViTVideoConfig, ViTVideoModel


def tiny_encoder(**overrides) -> VideoMAPModel:
    kw = dict(img_size=32, patch_size=8, num_frames=4, embed_dim=32, depth_mamba=2, attn_every=2,
              num_heads=2)
    torch.manual_seed(0)
    return VideoMAPModel(VideoMAPConfig.from_preset("nano", **{**kw, **overrides}))


def tiny_pretrainer(**kw) -> VideoMAPPretrainer:
    kw = {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2, **kw}
    return VideoMAPPretrainer(tiny_encoder(), **kw)


@pytest.fixture(scope="module")
def clip_dirs(tmp_path_factory):
    """Tiny random CLIP vision towers saved to disk: with and without a visual projection."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8, projection_dim=16)
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("clip")
    CLIPVisionModelWithProjection(cfg).save_pretrained(root / "proj")
    CLIPVisionModel(cfg).save_pretrained(root / "noproj")
    return root / "proj", root / "noproj"


def test_patchify_roundtrip():
    x = torch.randn(2, 3, 4, 32, 16)
    p = patchify(x, 8)
    assert p.shape == (2, 4, 8, 8 * 8 * 3)
    assert torch.equal(unpatchify(p, 8, (4, 2)), x)
    # patch n of frame t is the n-th row-major P×P square, as the encoder's Conv3d sees it
    assert torch.equal(p[1, 2, 3].reshape(8, 8, 3), x[1, :, 2, 8:16, 8:16].permute(1, 2, 0))


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.5, 0.75])
def test_masking_equal_counts_per_frame(ratio):
    g = torch.Generator().manual_seed(0)
    mask = random_masking(3, 5, 16, ratio, g)
    assert mask.dtype == torch.bool and mask.shape == (3, 5, 16)
    counts = mask.sum(-1)
    assert (counts == round(ratio * 16)).all()
    # different frames get different patterns
    if 0 < ratio:
        assert not all(torch.equal(mask[0, 0], mask[0, t]) for t in range(1, 5))


def test_masking_is_reproducible_and_ratio_sampling_in_range():
    a = random_masking(2, 3, 9, 0.5, torch.Generator().manual_seed(7))
    b = random_masking(2, 3, 9, 0.5, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    g = torch.Generator().manual_seed(0)
    ratios = [sample_mask_ratio(g) for _ in range(200)]
    assert all(0.3 <= r <= 0.7 for r in ratios) and len(set(ratios)) == 200


def test_encoder_receives_only_visible_tokens():
    model = tiny_pretrainer()
    x = torch.randn(2, 3, 4, 32, 32)
    mask = model.random_masking(x, torch.Generator().manual_seed(0))
    n_vis = 16 - int(mask[0, 0].sum())
    assert n_vis == 8
    latent, grid = model.forward_encoder(x, mask)
    assert latent.shape == (2, 1 + 4 * n_vis, 32) and tuple(grid) == (4, 4, 4)


def test_frame_causal_mask_matrix():
    T, N = 4, 3
    m = decoder_attn_mask(T, N, "frame")
    assert m.shape == (T * N, T * N) and m.dtype == torch.bool
    for q in range(T * N):
        for k in range(T * N):
            assert bool(m[q, k]) == (k // N <= q // N), (q, k)
    # within a frame every token sees every other token of that frame
    assert m[N:2 * N, N:2 * N].all()
    tok = decoder_attn_mask(T, N, "token")
    assert torch.equal(tok, torch.ones(T * N, T * N, dtype=torch.bool).tril())
    assert decoder_attn_mask(T, N, None) is None


def test_decoder_is_frame_causal_in_effect():
    """Changing frame 3's input must not change the decoder outputs at frames 0..2."""
    model = tiny_pretrainer().eval()
    B, T, N = 1, 4, 16
    mask = random_masking(B, T, N, 0.5, torch.Generator().manual_seed(1))
    latent = torch.randn(B, 1 + T * 8, 32)
    latent2 = latent.clone()
    latent2[:, 1 + 3 * 8:] += 1.0  # frame 3's visible tokens
    a = model.forward_decoder(latent, mask, (T, 4, 4))["next_pix"]
    b = model.forward_decoder(latent2, mask, (T, 4, 4))["next_pix"]
    assert torch.allclose(a[:, :3], b[:, :3], atol=1e-6)
    assert not torch.allclose(a[:, 3], b[:, 3])


@pytest.mark.parametrize("fn", [pixel_loss, feature_loss])
def test_loss_zero_for_perfect_prediction(fn):
    target = torch.nn.functional.normalize(torch.randn(2, 3, 5, 8), dim=-1)
    weight = torch.rand(2, 3, 5) > 0.5
    assert float(fn(target.clone(), target)) == pytest.approx(0.0, abs=1e-6)
    assert float(fn(target.clone(), target, weight)) == pytest.approx(0.0, abs=1e-6)
    assert float(fn(target + 0.3 * torch.randn_like(target), target)) > 1e-3


def test_forward_loss_terms_zero_when_predictions_equal_targets(clip_dirs):
    """Build predictions from the targets exactly as each term defines them."""
    model = build_pretrainer(tiny_encoder(), teacher=str(clip_dirs[0]), decoder_dim=32, decoder_depth=1,
                             decoder_heads=2)
    x = torch.randn(2, 3, 4, 32, 32)
    mask = model.random_masking(x, torch.Generator().manual_seed(0))
    targets = model.targets(x, (4, 4, 4))
    assert set(targets) == {"pix", "feat"}
    perfect = {}
    for kind in ("pix", "feat"):
        perfect[f"masked_{kind}"] = targets[kind].clone()  # own positions
        nxt = torch.zeros_like(targets[kind])
        nxt[:, :-1] = targets[kind][:, 1:]  # frame t predicts frame t+1
        perfect[f"next_{kind}"] = nxt
    out = model.forward_loss(perfect, targets, mask)
    assert set(out.terms) == {"masked_pix", "next_pix", "masked_feat", "next_feat"}
    for name, value in out.terms.items():
        assert float(value) == pytest.approx(0.0, abs=1e-5), name
    assert float(out.loss) == pytest.approx(0.0, abs=1e-5)
    # wrong by one frame (predicting frame t instead of t+1) is penalised
    shifted = dict(perfect, next_pix=targets["pix"].clone())
    bad = model.forward_loss(shifted, targets, mask)
    assert float(bad.terms["next_pix"]) > 0.1 and float(bad.terms["masked_pix"]) == pytest.approx(0.0, abs=1e-5)
    # masked term only counts masked tokens: corrupting visible positions changes nothing
    vis_noise = perfect["masked_pix"] + (~mask)[..., None] * 5.0
    out2 = model.forward_loss(dict(perfect, masked_pix=vis_noise), targets, mask)
    assert float(out2.terms["masked_pix"]) == pytest.approx(0.0, abs=1e-5)


def test_norm_pix_target_per_patch():
    t = norm_pix_target(torch.randn(2, 3, 4, 48) * 3 + 2)
    assert torch.allclose(t.mean(-1), torch.zeros(2, 3, 4), atol=1e-5)
    assert torch.allclose(t.var(-1), torch.ones(2, 3, 4), atol=1e-3)


def test_teacher_from_saved_dir(clip_dirs):
    proj, noproj = clip_dirs
    t = CLIPTeacher.from_pretrained(str(proj))
    assert t.projection is not None and t.feature_dim == 16
    x = torch.randn(2, 3, 3, 64, 64)
    feats = t(x, (8, 8))  # teacher grid 4×4 resized to the student's 8×8
    assert feats.shape == (2, 3, 64, 16)
    assert torch.allclose(feats.norm(dim=-1), torch.ones(2, 3, 64), atol=1e-5)
    assert all(not p.requires_grad for p in t.parameters())
    t2 = CLIPTeacher.from_pretrained(str(noproj))
    assert t2.projection is None and t2.feature_dim == 32
    assert t2(x, (4, 4)).shape == (2, 3, 16, 32)


def test_teacher_path_trains_and_is_not_saved(clip_dirs):
    model = build_pretrainer(tiny_encoder(), teacher=str(clip_dirs[0]), decoder_dim=32, decoder_depth=1,
                             decoder_heads=2, teacher_weight=0.5)
    out = model(torch.randn(2, 3, 4, 32, 32), generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    assert {"next_feat", "masked_feat"} <= set(out.terms)
    assert model.heads["next_feat"].weight.grad is not None
    assert not any(k.startswith("teacher") or "_teacher" in k for k in model.state_dict())


def test_baselines(clip_dirs):
    x = torch.randn(2, 3, 4, 32, 32)
    g = torch.Generator().manual_seed(0)
    mae = tiny_pretrainer(objective="mae")
    out = mae(x, generator=g)
    assert set(out.terms) == {"masked_pix"} and out.loss.requires_grad
    umt = build_pretrainer(tiny_encoder(), objective="umt", teacher=str(clip_dirs[0]))
    assert umt.decoder is None
    out = umt(x, generator=g)
    assert set(out.terms) == {"visible_feat"} and out.predictions["visible_feat"].shape == (2, 4, 8, 16)
    with pytest.raises(Exception, match="teacher"):
        tiny_pretrainer(objective="umt")


def test_token_order_and_sampled_ratio_run():
    model = tiny_pretrainer(order="token", mask_ratio=None)
    out = model(torch.randn(1, 3, 4, 32, 32), generator=torch.Generator().manual_seed(3))
    out.loss.backward()
    assert out.loss.item() > 0
    counts = out.token_mask.sum(-1)
    assert (counts == counts.flatten()[0]).all() and 4 <= int(counts[0, 0]) <= 12


@pytest.mark.parametrize("preset", list(PRESETS))
def test_shapes_every_preset(preset):
    """Every preset's width/heads at a tiny grid and reduced depth (the width is the preset's)."""
    cfg = VideoMAPConfig.from_preset(preset, img_size=32, patch_size=16, num_frames=2, depth_mamba=2, attn_every=2)
    torch.manual_seed(0)
    model = VideoMAPPretrainer(VideoMAPModel(cfg), decoder_dim=32, decoder_depth=1, decoder_heads=2)
    x = torch.randn(1, 3, 2, 32, 32)
    out = model(x, generator=torch.Generator().manual_seed(0))
    assert out.predictions["next_pix"].shape == (1, 2, 4, 16 * 16 * 3)
    assert out.predictions["masked_pix"].shape == (1, 2, 4, 16 * 16 * 3)
    assert torch.isfinite(out.loss)


def test_vit_encoder_works_too():
    cfg = ViTVideoConfig.from_preset("nano", img_size=32, patch_size=8, num_frames=4, depth=1)
    model = VideoMAPPretrainer(ViTVideoModel(cfg), decoder_dim=32, decoder_depth=1, decoder_heads=2)
    assert torch.isfinite(model(torch.randn(1, 3, 4, 32, 32)).loss)
