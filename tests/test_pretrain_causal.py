"""The frame-wise autoregressive objective cannot be solved by copying: the prediction for frame
t+1 is made from frames ≤ t of the input clip, through the encoder as well as the decoder."""

import pytest
import torch

from encoder.pretrain import VideoMAPPretrainer, random_masking, tube_masking
from encoder.videomap import VideoMAPConfig, VideoMAPModel
from encoder.vit import ViTVideoConfig, ViTVideoModel

T, SIZE, PATCH = 4, 32, 8  # 16 patches per frame


def _encoder(attn_every: int = 4):
    torch.manual_seed(0)
    cfg = VideoMAPConfig(img_size=SIZE, patch_size=PATCH, num_frames=T, embed_dim=32, depth_mamba=4,
                         attn_every=attn_every, num_heads=2)
    return VideoMAPModel(cfg)


def _next_predictions(pretrainer, clip, token_mask):
    with torch.no_grad():
        latent, grid = pretrainer.forward_encoder(clip, token_mask)
        return pretrainer.forward_decoder(latent, token_mask, grid)["next_pix"]  # (B, T, N, K)


def _leak(pretrainer) -> list[float]:
    """For each t < T-1: how much the next-frame predictions made at frames ≤ t move when only
    frames > t of the input clip change."""
    pretrainer.eval()
    g = torch.Generator().manual_seed(1)
    clip = torch.randn(2, 3, T, SIZE, SIZE, generator=g)
    token_mask = random_masking(2, T, (SIZE // PATCH) ** 2, 0.5, g)
    base = _next_predictions(pretrainer, clip, token_mask)
    moved = []
    for t in range(T - 1):
        changed = clip.clone()
        changed[:, :, t + 1:] = torch.randn(2, 3, T - t - 1, SIZE, SIZE, generator=g)
        after = _next_predictions(pretrainer, changed, token_mask)
        moved.append(float((after[:, : t + 1] - base[:, : t + 1]).abs().max()))
    return moved


@pytest.mark.parametrize("attn_every", [4, 0, 1])  # hybrid 4:1, pure Mamba, pure attention
def test_prediction_of_the_next_frame_cannot_see_it(attn_every):
    pretrainer = VideoMAPPretrainer(_encoder(attn_every), objective="videomap", decoder_dim=32,
                                    decoder_depth=1, decoder_heads=2)
    assert max(_leak(pretrainer)) < 1e-6


def test_a_bidirectional_encoder_would_leak():
    """The check above can fail: with the encoder run bidirectionally (the earlier reading), the
    outputs of frame t carry frame t+1."""
    pretrainer = VideoMAPPretrainer(_encoder(), objective="videomap", decoder_dim=32, decoder_depth=1,
                                    decoder_heads=2, frame_causal=False)
    assert min(_leak(pretrainer)) > 1e-4


def test_frame_causal_encoder_outputs():
    """The encoder alone: changing frame 3 leaves the cls token and frames 0–2 as they were, in the
    VideoMAP encoder and the joint ViT; bidirectionally, every output moves."""
    torch.manual_seed(0)
    vit = ViTVideoModel(ViTVideoConfig(img_size=SIZE, patch_size=PATCH, num_frames=T, embed_dim=32, depth=2,
                                       num_heads=2, attention="joint")).eval()
    clip = torch.randn(1, 3, T, SIZE, SIZE)
    changed = clip.clone()
    changed[:, :, 3] += 1.0
    n = 1 + 3 * (SIZE // PATCH) ** 2  # cls + frames 0..2
    for model in (_encoder().eval(), vit):
        with torch.no_grad():
            a = model(clip, frame_causal=True).last_hidden_state
            b = model(changed, frame_causal=True).last_hidden_state
            c = model(clip, frame_causal=False).last_hidden_state
            d = model(changed, frame_causal=False).last_hidden_state
        assert torch.equal(a[:, :n], b[:, :n]) and not torch.allclose(a[:, n:], b[:, n:])
        assert not torch.allclose(c[:, :n], d[:, :n])


def test_frame_causal_is_a_config_default_and_saved(tmp_path):
    model = _encoder()
    model.config.frame_causal = True
    model.save_pretrained(tmp_path)
    again = VideoMAPModel.from_pretrained(tmp_path).eval()
    assert again.config.frame_causal is True
    clip = torch.randn(1, 3, T, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(again(clip).last_hidden_state, again(clip, frame_causal=True).last_hidden_state)


def test_tube_masking_masks_the_same_places_in_every_frame():
    g = torch.Generator().manual_seed(0)
    mask = tube_masking(3, 5, 16, 0.75, g)
    assert mask.shape == (3, 5, 16)
    assert (mask == mask[:, :1]).all()  # one pattern per clip
    assert (mask.sum(-1) == 12).all()
    assert not (mask[0] == mask[1]).all()  # clips differ


def test_pretrainer_with_tube_masking_trains():
    pretrainer = VideoMAPPretrainer(_encoder(), objective="videomap", decoder_dim=32, decoder_depth=1,
                                    decoder_heads=2, masking="tube", mask_ratio=0.75)
    out = pretrainer(torch.randn(2, 3, T, SIZE, SIZE), generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    assert torch.isfinite(out.loss) and (out.token_mask == out.token_mask[:, :1]).all()
    assert pretrainer.encoder.embeddings.patch_embed.proj.weight.grad.abs().sum() > 0
