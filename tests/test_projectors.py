"""The projectors (`videollm.projectors`): the general pooler + MLP and the word-anchor type."""

import math

import pytest
import torch
import torch.nn.functional as F

from tests.test_videollm_model import _logits, tiny_encoder_config, tiny_videollm, video_frames
from videollm.configuration_videollm import VideoLLMConfig, VideoProjectorConfig, WordAnchorProjectorConfig
from videollm.modeling_videollm import build_videollm, load_videollm, save_videollm, word_embedding_rows
from videollm.projectors import VideoProjector, WordAnchorProjector

WORDS = [["red", "blue"], ["circle", "square", "star"]]


def _anchored(**settings):
    model, proc = tiny_videollm(type="word_anchor", words=WORDS, **settings)
    rows = word_embedding_rows(model.get_input_embeddings().weight, proc.tokenizer,
                               [w for g in WORDS for w in g])
    return model, proc, rows


def test_the_general_projector_has_no_words():
    model, _ = tiny_videollm()
    assert type(model.projector) is VideoProjector and model.config.projector_type == "mlp"
    assert not [n for n, _ in model.projector.named_buffers()] and not hasattr(model.projector, "anchor")
    assert not any(hasattr(VideoProjectorConfig(), k) for k in ("words", "temperature", "none_logit"))


def test_word_anchor_turns_tokens_into_the_words_they_match():
    model, _, rows = _anchored(temperature=200.0)
    proj = model.projector
    assert isinstance(proj, WordAnchorProjector)
    keys = F.normalize(rows - rows.mean(0), dim=-1)  # centred over the anchored words
    assert torch.allclose(proj.anchor_keys, keys) and torch.equal(proj.anchor_values, rows)
    # A token pointing along "blue"'s key, at a high temperature, becomes "blue"'s own embedding in
    # the colour group; the gate starts closed, so nothing else of the token passes.
    x = keys[1].expand(1, 1, -1).clone()
    out = proj.anchor(x)[0][0, 0]
    shape_part = out - rows[1]
    scores = 200.0 * keys[2:] @ F.normalize(x[0, 0], dim=-1)
    p = torch.softmax(torch.cat([scores, torch.zeros(1)]), 0)[:-1]
    assert torch.allclose(shape_part, p @ rows[2:], atol=1e-4)
    # A token orthogonal to every key is the mean of each group's words with "none" (1/(n+1) each).
    orth = torch.linalg.svd(keys, full_matrices=True).Vh[-1]
    out = proj.anchor(orth.expand(1, 1, -1))[0][0, 0]
    assert torch.allclose(out, rows[:2].sum(0) / 3 + rows[2:].sum(0) / 4, atol=1e-4)
    with torch.no_grad():
        proj.anchor_gate.fill_(0.5)
    assert torch.allclose(proj.anchor(orth.expand(1, 1, -1))[0][0, 0], out + 0.5 * orth, atol=1e-4)
    # forward = the general projector's output, anchored
    h = torch.randn(1, 1 + 2 * 2 * 2, 32)
    with torch.no_grad():
        assert torch.equal(proj(h, (2, 2, 2)), proj.anchor(VideoProjector.forward(proj, h, (2, 2, 2)))[0])


def test_none_logit_silences_weak_matches_and_keeps_strong_ones(tmp_path):
    model, proc, rows = _anchored(none_logit=4.0)
    plain, _, _ = _anchored()
    proj = model.projector
    keys = F.normalize(rows - rows.mean(0), dim=-1)
    orth = torch.linalg.svd(keys, full_matrices=True).Vh[-1].expand(1, 1, -1)
    strong = keys[1].expand(1, 1, -1).clone()  # along "blue"'s key: τ·cos(·, blue) = 15
    # A token that matches no word (every score 0) keeps 1 / (n + e^4) of each word, not 1 / (n + 1) …
    e4 = math.exp(4.0)
    assert torch.allclose(proj.anchor(orth)[0][0, 0], rows[:2].sum(0) / (2 + e4) + rows[2:].sum(0) / (3 + e4), atol=1e-4)
    # … while one that matches "blue" well stays "blue" in its group (softmax with "none" at 4).
    parts = []
    for group in (slice(0, 2), slice(2, 5)):
        scores = 15.0 * keys[group] @ keys[1]
        parts.append(torch.softmax(torch.cat([scores, torch.tensor([4.0])]), 0)[:-1])
    assert parts[0][1] > 0.99
    after = proj.anchor(strong)[0]
    assert torch.allclose(after[0, 0], parts[0] @ rows[:2] + parts[1] @ rows[2:], atol=1e-4)
    assert not torch.allclose(after, plain.projector.anchor(strong)[0])
    save_videollm(model, proc, tmp_path / "m")
    loaded, _ = load_videollm(tmp_path / "m")
    assert loaded.config.projector_config.none_logit == 4.0
    assert torch.allclose(loaded.projector.anchor(strong)[0], after)


def test_word_anchor_saves_and_loads_with_the_projector(tmp_path):
    model, proc, _ = _anchored()
    with torch.no_grad():
        model.projector.anchor_gate.fill_(0.25)
    inputs = proc([{"role": "user", "content": "<video>\nWhat?"}], video=video_frames())
    save_videollm(model, proc, tmp_path / "m")
    loaded, _ = load_videollm(tmp_path / "m")
    assert loaded.config.projector_type == "word_anchor" and loaded.config.projector_config.words == WORDS
    assert float(loaded.projector.anchor_gate) == 0.25
    assert torch.equal(loaded.projector.anchor_values, model.projector.anchor_values)
    assert torch.equal(_logits(model, inputs), _logits(loaded, inputs))


def test_init_from_adds_an_anchor_to_a_saved_general_projector_and_keeps_its_weights(tmp_path):
    model, proc = tiny_videollm(stem_skip=True)
    with torch.no_grad():
        model.projector.linear_2.bias.normal_()
    save_videollm(model, proc, tmp_path / "plain")
    anchored, _ = build_videollm(init_from=tmp_path / "plain", num_frames=2,
                                 projector={"type": "word_anchor", "words": WORDS, "none_logit": 2.0})
    proj = anchored.projector
    assert isinstance(proj, WordAnchorProjector) and proj.config.stem_skip and proj.config.none_logit == 2.0
    for name, value in model.projector.state_dict().items():
        assert torch.equal(proj.state_dict()[name], value), name
    rows = word_embedding_rows(anchored.get_input_embeddings().weight, proc.tokenizer, [w for g in WORDS for w in g])
    assert torch.allclose(proj.anchor_keys, F.normalize(rows - rows.mean(0), dim=-1))
    assert float(proj.anchor_gate) == 0.0
    with pytest.raises(Exception, match="do not fit"):
        build_videollm(init_from=tmp_path / "plain", num_frames=2, projector={"spatial_merge": "concat", "spatial_pool": 2})


def test_select_tokens_keeps_each_frames_most_named_tokens_in_raster_order(tmp_path):
    model, proc, _ = _anchored(select_tokens=2)  # spatial_pool 1: every patch a token
    proj = model.projector
    with torch.no_grad():
        proj.linear_2.bias.normal_()
    inputs = proc([{"role": "user", "content": "<video>\nWhat?"}], video=video_frames())
    pixels = inputs["pixel_values"]
    out = model.vision_tower(pixels)
    grid = tuple(out.grid)
    with torch.no_grad():
        full, named = proj.anchor(VideoProjector.forward(proj, out.last_hidden_state, grid, out.stem_states))
        picked = proj(out.last_hidden_state, grid, out.stem_states)
    T, k = grid[0], grid[1] * grid[2]
    assert k > 2 and picked.shape == (1, T * 2, full.shape[-1])
    assert picked.shape[1] == model.config.num_video_tokens(T, *pixels.shape[-2:]) == int(inputs["input_ids"].eq(
        model.config.video_token_id).sum())
    for t in range(T):
        frame = named[0, t * k:(t + 1) * k].tolist()
        top = sorted(sorted(range(k), key=lambda i: -frame[i])[:2])
        assert torch.equal(picked[0, t * 2:(t + 1) * 2], full[0, [t * k + i for i in top]])
    # The processor expands <video> to as many placeholders as the projector gives, so a forward runs,
    # and the setting round-trips.
    save_videollm(model, proc, tmp_path / "m")
    loaded, _ = load_videollm(tmp_path / "m")
    assert loaded.config.projector_config.select_tokens == 2
    assert torch.equal(_logits(model, inputs), _logits(loaded, inputs))
    with pytest.raises(ValueError, match="select_tokens"):
        WordAnchorProjectorConfig(words=[["red"]], select_tokens=0)


@pytest.mark.parametrize("bad", [[], [[]], [["red", ""]], "red", [["red"], "blue"]])
def test_word_anchor_config_errors(bad):
    with pytest.raises(ValueError, match="words"):
        WordAnchorProjectorConfig(words=bad)
    with pytest.raises(ValueError, match="temperature"):
        WordAnchorProjectorConfig(words=[["red"]], temperature=0)
    for none_logit in (float("nan"), float("inf"), True, "4"):
        with pytest.raises(ValueError, match="none_logit"):
            WordAnchorProjectorConfig(words=[["red"]], none_logit=none_logit)
    with pytest.raises(ValueError, match="unknown 'mlp' projector setting"):
        VideoLLMConfig(vision_config=tiny_encoder_config(), projector_config={"words": [["red"]]})
    with pytest.raises(ValueError, match="unknown projector type"):
        VideoLLMConfig(vision_config=tiny_encoder_config(), projector_type="qformer")


def test_concat_merge_keeps_which_patch_showed_what_and_round_trips(tmp_path):
    model, proc = tiny_videollm(spatial_pool=2, spatial_merge="concat")
    assert model.projector.linear_1.in_features == 4 * 32  # a 2×2 window's patches side by side
    h = torch.randn(1, 1 + 2 * 3 * 3, 32)  # 2 frames of a 3×3 patch grid: a ragged edge, padded
    assert model.projector(h, (2, 3, 3)).shape == (1, model.config.num_video_tokens(2, 48, 48), 32) == (1, 8, 32)
    # swap two patches inside the first window: an average cannot tell, the concatenation can
    grid = h[:, 1:].reshape(1, 2, 3, 3, 32)
    swapped = grid.clone()
    swapped[:, 0, 0, 0], swapped[:, 0, 1, 1] = grid[:, 0, 1, 1], grid[:, 0, 0, 0]
    h2 = torch.cat([h[:, :1], swapped.reshape(1, -1, 32)], 1)
    with torch.no_grad():
        out, out2 = model.projector(h, (2, 3, 3)), model.projector(h2, (2, 3, 3))
        assert not torch.allclose(out[:, 0], out2[:, 0]) and torch.equal(out[:, 1:], out2[:, 1:])
        avg, _ = tiny_videollm(spatial_pool=2)
        assert torch.allclose(avg.projector(h, (2, 3, 3)), avg.projector(h2, (2, 3, 3)), atol=1e-6)
    inputs = proc([{"role": "user", "content": "<video>\nWhat?"}], video=video_frames(H=32, W=32))
    save_videollm(model, proc, tmp_path / "m")
    loaded, _ = load_videollm(tmp_path / "m")
    assert loaded.config.projector_config.spatial_merge == "concat"
    assert torch.equal(_logits(model, inputs), _logits(loaded, inputs))


def test_stem_skip_reads_the_encoders_stem_features_max_pooled_and_round_trips(tmp_path):
    model, proc = tiny_videollm(spatial_pool=2, stem_skip=True)
    plain, _ = tiny_videollm(spatial_pool=2)
    assert model.projector.stem_proj.in_features == 32 and not hasattr(plain.projector, "stem_proj")
    h, stem = torch.randn(1, 1 + 2 * 4 * 4, 32), torch.randn(1, 1 + 2 * 4 * 4, 32)
    with torch.no_grad():
        out = model.projector(h, (2, 4, 4), stem)
        assert out.shape == (1, 8, 32)  # 2 frames × a 4×4 grid pooled 2×2
        # the skip is read: a change to one stem patch moves its token only, and not through an
        # average: lowering a patch that is not its window's maximum changes nothing
        grid = stem[:, 1:].reshape(1, 2, 4, 4, 32)
        up, down = grid.clone(), grid.clone()
        up[0, 0, 0, 0] += 10.0
        window = grid[0, 0, :2, :2]  # (2, 2, 32): frame 0's first window
        below = window.reshape(4, 32) < window.reshape(4, 32).amax(0)  # (4, 32): not the channel's max
        down[0, 0, :2, :2] -= 5.0 * below.reshape(2, 2, 32)
        moved = model.projector(h, (2, 4, 4), torch.cat([stem[:, :1], up.reshape(1, -1, 32)], 1))
        same = model.projector(h, (2, 4, 4), torch.cat([stem[:, :1], down.reshape(1, -1, 32)], 1))
        assert not torch.allclose(moved[:, 0], out[:, 0]) and torch.equal(moved[:, 1:], out[:, 1:])
        assert torch.allclose(same, out)
        # the model feeds the encoder's public stem features (the first block's input)
        x = torch.randn(1, 3, 2, 32, 32)
        enc = model.vision_tower(x, output_hidden_states=True)
        assert torch.equal(enc.stem_states, enc.hidden_states[0])
        assert torch.equal(model.get_video_features(x),
                           model.projector(enc.last_hidden_state, tuple(enc.grid), enc.stem_states))
    with pytest.raises(ValueError, match="stem_states"):
        model.projector(h, (2, 4, 4))
    inputs = proc([{"role": "user", "content": "<video>\nWhat?"}], video=video_frames(H=32, W=32))
    save_videollm(model, proc, tmp_path / "m")
    loaded, _ = load_videollm(tmp_path / "m")
    assert loaded.config.projector_config.stem_skip is True
    assert torch.equal(_logits(model, inputs), _logits(loaded, inputs))
    with pytest.raises(ValueError, match="stem_skip"):
        VideoProjectorConfig(stem_skip="yes")


@pytest.mark.parametrize("kw", [{"spatial_merge": "max"}, {"spatial_merge": "concat", "tokens_per_frame": 4},
                                {"spatial_merge": "concat", "use_cls_token": True}])
def test_spatial_merge_config_errors(kw):
    with pytest.raises(ValueError, match="spatial_merge"):
        VideoProjectorConfig(**kw)


def test_named_temporal_merge_keeps_each_runs_most_named_frame_token():
    """With a token budget, "named" keeps per token position the frame of each run of frames that names
    an object most (a one-frame event survives whole); "avg" averages the run's features."""
    model, _, _ = _anchored(max_video_tokens=8, temporal_merge="named")  # spatial_pool 1
    proj = model.projector
    with torch.no_grad():
        proj.linear_2.bias.normal_()
    grid = (6, 2, 2)  # 6 frames of 4 tokens; a budget of 8 tokens keeps 2 frames: runs 0-2 and 3-5
    h = torch.randn(1, 1 + 6 * 4, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full, named = proj.anchor(VideoProjector.forward(proj, h, grid, temporal=False))  # (1, 24, D), (1, 24)
        merged = proj(h, grid)
    assert merged.shape == (1, 8, full.shape[-1]) == (1, model.config.num_video_tokens(6, 32, 32), full.shape[-1])
    for run, frames in enumerate(([0, 1, 2], [3, 4, 5])):
        for pos in range(4):
            best = max(frames, key=lambda t: named[0, t * 4 + pos].item())
            assert torch.equal(merged[0, run * 4 + pos], full[0, best * 4 + pos])
    proj.config.temporal_merge = "avg"
    with torch.no_grad():
        averaged = proj(h, grid)
    assert averaged.shape == merged.shape and not torch.allclose(averaged, merged)
    with pytest.raises(ValueError, match="temporal_merge"):
        WordAnchorProjectorConfig(words=[["red"]], temporal_merge="max")
