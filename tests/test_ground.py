"""Grounding stage (training/ground.py): word targets from the synthetic ground truth, the loss,
and a short run whose output stage 1 can start from."""

import json

import torch
from safetensors.torch import load_file

from training.ground import (COLOR_WORDS, GROUPS, WORDS, ClipSource, GroundConfig, GroundData, WordScorer,
                             batch_seeds, clip_words, eval_seeds, group_loss, train)
from training.synth import make_clip, make_needle


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


def test_seeds_are_deterministic_and_disjoint():
    assert batch_seeds(0, 4, 8) == batch_seeds(0, 4, 8) != batch_seeds(0, 5, 8)
    assert not set(eval_seeds(0, 64)) & {s for step in range(50) for s in batch_seeds(0, step, 16)}


def test_needle_haystack_is_real_video_with_one_needle_frame():
    source = ClipSource(GroundData(clip_frames=8, size=32, haystack_frames=24))
    frames, words, needle = source.needle(11)
    assert frames.shape == (24, 32, 32, 3)
    assert words == {needle.spec.objects[0].color, needle.spec.objects[0].shape}
    match = [(abs(frames[t].astype(int) - needle.frames[0].astype(int)).mean() < 1.0) for t in range(24)]
    assert sum(match) == 1


def test_short_run_writes_an_init_for_stage1_and_resumes(tmp_path):
    cfg = GroundConfig(output_dir=str(tmp_path / "g"), encoder="nano", steps=2, batch_size=4, eval_clips=2,
                       save_every=1, log_every=1, data=GroundData(clip_frames=8, size=32, haystack_frames=8,
                                                                  needle_fraction=0.5))
    last = train(cfg)
    final = tmp_path / "g" / "final"
    state = load_file(str(final / "model.safetensors"))
    assert state and all(k.startswith(("vision_tower.", "projector.")) for k in state)
    assert json.loads((final / "config.json").read_text())["model_type"] == "videomap_llm"
    assert "acc_color" in last and 0.0 <= last["acc_color"] <= 1.0
    lines = (tmp_path / "g" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2]

    # stage 1 starts from it: the projector weights are the grounded ones
    from training.finetune import FinetuneConfig, build_model

    ft = FinetuneConfig(stage=1, init_from=str(final))
    ft.data.image_size, ft.data.num_frames = 32, 8
    model, _ = build_model(ft)
    assert torch.equal(model.projector.linear_1.weight, state["projector.linear_1.weight"])

    # a resumed run with more steps continues from the checkpoint, not from scratch
    cfg.steps, cfg.resume = 3, True
    train(cfg)
    lines = (tmp_path / "g" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3]
