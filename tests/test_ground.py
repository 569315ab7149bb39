"""Grounding stage (training/ground.py): word targets from the synthetic ground truth, the loss,
and a short run whose output stage 1 can start from."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from encoder.errors import UserError
from training.ground import (COLOR_WORDS, GROUPS, SHAPE_WORDS, WORDS, ClipSource, GroundConfig, GroundData,
                             WordScorer, _stem_frames, batch_seeds, clip_words, dense_loss, eval_seeds, group_loss, stem_groups,
                             token_targets, train)
from videollm.data.synth import SynthObject, SynthSpec, make_clip, make_needle, render, visible_coverage


def test_clip_words_name_colour_shape_and_motion():
    clip = make_clip(3, 8, 32, "motion", distractors=0)
    obj = clip.spec.objects[0]
    words = clip_words(clip.spec)
    assert obj.color in words and obj.shape in words
    assert set(obj.motion.split("-")) <= words  # "up-left" names both "up" and "left"
    needle = make_needle(5, num_frames=1, size=32)
    assert clip_words(needle.spec) == {needle.spec.objects[0].color, needle.spec.objects[0].shape}
    assert set(WORDS) == {w for g in GROUPS for w in g}


def test_group_loss_prefers_the_present_words():
    scores = torch.zeros(1, len(WORDS))
    base = float(group_loss(scores, [{"red", "circle"}]))
    scores[0, WORDS.index("red")] = 5.0
    assert float(group_loss(scores, [{"red", "circle"}])) < base
    scores[0, WORDS.index("red")], scores[0, WORDS.index("blue")] = 0.0, 5.0
    assert float(group_loss(scores, [{"red", "circle"}])) > base


def test_scorer_reads_a_word_embedding_as_that_word():
    torch.manual_seed(0)
    emb = torch.randn(len(WORDS), 16)
    scorer = WordScorer(emb, embed_norm=float(emb.norm(dim=-1).mean()), temperature=10.0)
    z = emb[[WORDS.index("green"), WORDS.index("star")]].unsqueeze(0) - emb.mean(0)  # (1, 2, 16)
    scores, _ = scorer(z)
    colours = [WORDS.index(w) for w in COLOR_WORDS]
    assert WORDS[colours[int(scores[0, colours].argmax())]] == "green"


def test_coverage_is_what_render_draws_in_front():
    back = SynthObject("square", "blue", "large", 20, 20)
    front = SynthObject("circle", "red", "small", 24, 24)
    spec = SynthSpec(2, 64, "black", [front, back])
    cover = visible_coverage(spec)  # (2, 2, 64, 64)
    frame = render(spec)[0].astype(int)
    assert cover.shape == (2, 2, 64, 64) and cover.sum(0).max() <= 1.0 + 1e-6
    assert cover[0, 0, 24, 24] == 1.0 and cover[1, 0, 24, 24] == 0.0  # the circle hides the square there
    assert tuple(frame[24, 24]) == (230, 30, 30) and tuple(frame[14, 14]) == (30, 70, 240)
    assert cover[1, 0, 14, 14] == 1.0 and cover[:, 0, 60, 60].sum() == 0.0


def test_dense_targets_name_the_object_in_the_cell_of_its_centre():
    obj = SynthObject("star", "green", "large", 16, 16, "right", speed=2.0)  # starts in the top-left cell
    spec = SynthSpec(16, 64, "gray", [obj])
    targets, about = token_targets(spec, 0, 16, (2, 2), min_cover=12)
    assert targets.shape == (64, len(WORDS)) and about.shape == (64,)
    named = {WORDS[i] for i in targets[0].nonzero().flatten().tolist()}
    assert named == {"green", "star", "right"} and about[0] == 1
    assert about[3] == 0 and targets[3].sum() == 0  # bottom-right cell of frame 0: background
    assert about[15 * 4 + 1] == 1 and about[15 * 4] == 0  # by the last frame (x = 46) it is in the top-right cell
    # a needle (centred, so its centre is in the top-left cell and it shows in all four) in frame 5
    # of a 9-frame haystack: only that frame is about it, with no motion word; the cells that show
    # only part of it get no target
    needle = make_needle(2, num_frames=1, size=64)
    targets, about = token_targets(needle.spec, 5, 9, (2, 2), min_cover=12)
    assert about[20] == 1 and about[21:24].tolist() == [-1, -1, -1] and (about[:20] == 0).all()
    o = needle.spec.objects[0]
    assert {WORDS[i] for i in targets[20].nonzero().flatten().tolist()} == {o.color, o.shape}
    # the frames= form gives the same rows
    t5, a5 = token_targets(needle.spec, 0, 1, (2, 2), min_cover=12, frames=[0])
    assert torch.equal(t5, targets[20:24]) and torch.equal(a5, about[20:24])


def test_dense_loss_rewards_the_named_words_and_silence_on_background():
    targets = torch.zeros(1, 2, len(WORDS))
    for w in ("red", "circle", "left"):
        targets[0, 0, WORDS.index(w)] = 1.0
    about = torch.tensor([[1, 0]], dtype=torch.int8)
    scores = torch.zeros(1, 2, len(WORDS))
    obj0, null0 = dense_loss(scores, targets, about)
    scores[0, 0, [WORDS.index("red"), WORDS.index("circle")]] = 5.0
    obj1, _ = dense_loss(scores, targets, about)
    scores[0, 1, WORDS.index("blue")] = 5.0  # a background token that names a colour
    _, null1 = dense_loss(scores, targets, about)
    assert obj1 < obj0 and null1 > null0


def test_dense_loss_none_logit_lets_background_tokens_be_silent():
    # A background token that matches no word (every score 0): with "none" at 0 it is as far from
    # "none" as uniform over the group and "none" (log(n + 1)); with "none" at b it is log(n + e^b) − b.
    targets, about = torch.zeros(1, 1, len(WORDS)), torch.zeros(1, 1, dtype=torch.int8)
    scores = torch.zeros(1, 1, len(WORDS))
    for b in (0.0, 4.0):
        _, null = dense_loss(scores, targets, about, none_logit=b)
        expected = sum(math.log(len(g) + math.exp(b)) - b for g in GROUPS) / len(GROUPS)
        assert float(null) == pytest.approx(expected, rel=1e-5)
    assert float(dense_loss(scores, targets, about, none_logit=4.0)[1]) < 0.2 < float(dense_loss(scores, targets, about)[1])
    for bad in (float("nan"), float("inf"), True):
        with pytest.raises(UserError, match="none_logit"):
            GroundConfig(none_logit=bad).validate()


def test_seeds_are_deterministic_and_disjoint():
    assert batch_seeds(0, 4, 8) == batch_seeds(0, 4, 8) != batch_seeds(0, 5, 8)
    assert not set(eval_seeds(0, 64)) & {s for step in range(50) for s in batch_seeds(0, step, 16)}


def test_needle_haystack_is_real_video_with_one_needle_frame():
    source = ClipSource(GroundData(num_frames=8, size=32, haystack_frames=24))
    frames, words, needle, start = source.needle(11)
    assert frames.shape == (24, 32, 32, 3)
    assert words == {needle.spec.objects[0].color, needle.spec.objects[0].shape}
    match = [(abs(frames[t].astype(int) - needle.frames[0].astype(int)).mean() < 1.0) for t in range(24)]
    assert sum(match) == 1


def test_stem_warm_up_trains_shape_alone_first_then_colour_too():
    cfg = GroundConfig(stem_steps=10, stem_shape_first=0.8)
    assert [stem_groups(cfg, i) for i in range(10)] == [(SHAPE_WORDS,)] * 8 + [(COLOR_WORDS, SHAPE_WORDS)] * 2
    cfg.stem_shape_first = 0.0
    assert stem_groups(cfg, 0) == (COLOR_WORDS, SHAPE_WORDS)
    cfg.stem_shape_first = 1.5
    with pytest.raises(UserError, match="stem_shape_first"):
        cfg.validate()


def test_motion_stem_warms_up_on_frame_pairs_and_reaches_stage1(tmp_path):
    from encoder.videomap import VideoMAPConfig, VideoMAPModel

    torch.manual_seed(0)
    enc = VideoMAPModel(VideoMAPConfig(img_size=32, patch_size=16, num_frames=8, embed_dim=32, depth_mamba=2,
                                       attn_every=2, num_heads=2, patch_stem="conv", motion_gap=2))
    enc.save_pretrained(tmp_path / "enc")
    source = ClipSource(GroundData(num_frames=8, size=32))
    pixels, targets, about = _stem_frames(source, [1, 2, 3, 4], (1, 1), 12.0, gap=2)
    assert pixels.shape == (4, 3, 2, 32, 32)
    assert _stem_frames(source, [1, 2, 3, 4], (1, 1), 12.0)[0].shape == (4, 3, 1, 32, 32)  # no motion stem: a frame
    assert targets.shape == (4, 1, len(WORDS)) and (pixels[:, :, 0] != pixels[:, :, 1]).any()  # targets: the pair's last
    cfg = GroundConfig(output_dir=str(tmp_path / "g"), encoder=str(tmp_path / "enc"), steps=1, batch_size=2,
                       eval_clips=2, stem_steps=3, stem_batch=4, data=GroundData(num_frames=8, size=32,
                                                                                  haystack_frames=8))
    before = {k: v.clone() for k, v in enc.embeddings.patch_embed.motion_stem.state_dict().items()}
    train(cfg)
    stem = json.loads((tmp_path / "g" / "stem.json").read_text())
    assert 0.0 <= stem["stem_acc_motion"] <= 1.0 and "stem_acc_shape" in stem
    state = load_file(str(tmp_path / "g" / "final" / "model.safetensors"))
    trained = {k.rsplit("motion_stem.", 1)[1]: v for k, v in state.items() if ".motion_stem." in k}
    assert trained.keys() == before.keys() and any(not torch.equal(trained[k], before[k]) for k in before)

    from training.finetune import FinetuneConfig, build_model

    ft = FinetuneConfig(stage=1, init_from=str(tmp_path / "g" / "final"))
    ft.data.size, ft.data.num_frames = 32, 8
    model, _ = build_model(ft)
    assert model.config.vision_config.motion_gap == 2
    assert all(torch.equal(model.vision_tower.embeddings.patch_embed.motion_stem.state_dict()[k], trained[k])
               for k in trained)


def test_token_readout_scores_each_object_token_by_its_own_targets():
    from training.ground import MOTION_WORDS, _token_hits

    scores = torch.zeros(3, len(WORDS))
    scores[0, WORDS.index("left")] = 5.0  # says left, is left
    scores[1, WORDS.index("up")] = 5.0  # says up, is left
    scores[2, WORDS.index("down")] = 5.0  # background: not scored
    targets = torch.zeros(3, len(WORDS))
    targets[:2, WORDS.index("left")] = 1.0
    about = torch.tensor([1, 1, 0], dtype=torch.int8)
    assert _token_hits(scores, targets, about, MOTION_WORDS) == [True, False]


def test_short_run_writes_an_init_for_stage1_and_resumes(tmp_path):
    cfg = GroundConfig(output_dir=str(tmp_path / "g"), encoder="nano", steps=2, batch_size=4, eval_clips=2,
                       save_every=1, log_every=1, stem_steps=2, stem_batch=4, stem_shape_first=0.5, none_logit=3.0,
                       data=GroundData(num_frames=8, size=32, haystack_frames=8, needle_fraction=0.5))
    last = train(cfg)
    stem = json.loads((tmp_path / "g" / "stem.json").read_text())  # the warm-up ran and was scored
    assert 0.0 <= stem["stem_acc_color"] <= 1.0 and stem["stem_seconds"] >= 0
    final = tmp_path / "g" / "final"
    state = load_file(str(final / "model.safetensors"))
    assert state and all(k.startswith(("vision_tower.", "projector.")) for k in state)
    assert json.loads((final / "config.json").read_text())["model_type"] == "videomap_llm"
    assert "acc_color" in last and 0.0 <= last["acc_color"] <= 1.0 and 0.0 <= last["acc_bind_color"] <= 1.0
    assert 0.0 <= last["acc_motion_token"] <= 1.0
    lines = (tmp_path / "g" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2]

    # stage 1 starts from it: the projector weights are the grounded ones, and the word anchor it
    # adds reads the tokens as grounding trained them (its "none" at grounding's none_logit)
    from training.finetune import FinetuneConfig, build_model

    ft = FinetuneConfig(stage=1, init_from=str(final), word_anchor=["colors", "shapes", "motions"],
                        anchor_none_logit=cfg.none_logit)
    ft.data.size, ft.data.num_frames = 32, 8
    model, _ = build_model(ft)
    assert torch.equal(model.projector.linear_1.weight, state["projector.linear_1.weight"])
    assert model.config.projector_type == "word_anchor" and model.config.projector_config.none_logit == 3.0
    assert model.config.projector_config.temperature == cfg.temperature

    # a resumed run with more steps continues from the checkpoint, not from scratch
    cfg.steps, cfg.resume = 3, True
    train(cfg)
    lines = (tmp_path / "g" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3]


def test_concat_merge_reaches_stage_one(tmp_path):
    from training.finetune import FinetuneConfig, build_model

    cfg = GroundConfig(output_dir=str(tmp_path / "g"), encoder="nano", steps=1, batch_size=2, eval_clips=1,
                       save_every=1, log_every=1, spatial_merge="concat",
                       data=GroundData(num_frames=4, size=32, haystack_frames=4, needle_fraction=0.5))
    train(cfg)
    final = tmp_path / "g" / "final"
    assert json.loads((final / "config.json").read_text())["projector_config"]["spatial_merge"] == "concat"
    ft = FinetuneConfig(stage=1, init_from=str(final))  # its own spatial_merge is "avg": the init's wins
    ft.data.size, ft.data.num_frames = 32, 4
    model, _ = build_model(ft)
    state = load_file(str(final / "model.safetensors"))
    assert model.projector.linear_1.in_features == 4 * model.config.vision_config.embed_dim
    assert torch.equal(model.projector.linear_1.weight, state["projector.linear_1.weight"])
    with pytest.raises(UserError, match="spatial_merge"):
        GroundConfig(spatial_merge="sum").validate()


def test_grounding_with_concepts_adds_a_stem_and_reaches_stage_one(tmp_path):
    """concepts: the encoder gets a concept stem, real camera clips join the batch, every kind of clip
    has a concept loss and the evaluation reads concepts; stage 1's word anchor then carries the
    stem's class names, and the processor feeds frames at the stem's size."""
    cfg = GroundConfig(output_dir=str(tmp_path / "g"), encoder="nano", steps=2, batch_size=4, eval_clips=2,
                       save_every=2, log_every=1, concepts=True, concept_frames=2, concept_size=64,
                       data=GroundData(num_frames=8, size=32, haystack_frames=8, needle_fraction=0.25,
                                       real_fraction=0.5))
    last = train(cfg)
    assert {"ce_concept_short", "ce_concept_needle", "ce_concept_real"} <= set(last)
    assert 0.0 <= last["acc_concept_top1"] <= 1.0 and 0.0 <= last["concept_none_synthetic"] <= 1.0
    final = tmp_path / "g" / "final"
    config = json.loads((final / "config.json").read_text())
    assert config["vision_config"]["concept_frames"] == 2 and config["vision_config"]["concept_size"] == 64
    assert "vision_tower.concepts.codes" in load_file(str(final / "model.safetensors"))

    from training.finetune import FinetuneConfig, build_model

    ft = FinetuneConfig(stage=1, init_from=str(final), word_anchor=["colors", "shapes"])
    ft.data.size, ft.data.num_frames = 64, 8
    model, processor = build_model(ft)
    assert model.config.projector_config.concepts[281] == "tabby" and len(model.config.projector_config.concepts) == 1000
    assert processor.image_size == 64
    assert model.get_video_features(torch.randn(1, 3, 8, 64, 64)).shape == (1, 8, model.config.text_config.hidden_size)
    with pytest.raises(UserError, match="needle_fraction \\+ data.real_fraction"):
        GroundConfig(concepts=True, data=GroundData(needle_fraction=0.6, real_fraction=0.6)).validate()
