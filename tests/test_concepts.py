"""The concept stem (`encoder.concepts`): real-world concepts carried through VideoMAP's tokens, and
the word anchor that turns them into the LLM's own words (`WordAnchorProjector.concepts`)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from encoder.concepts import (ConceptStem, classify_frames, concept_frame_ids, nearest_concept_frame,
                              random_concepts)
from encoder.teacher import imagenet_class_names
from encoder.transforms import frames_to_tensor
from encoder.videomap import VideoMAPConfig, VideoMAPModel
from videollm.configuration_videollm import WordAnchorProjectorConfig
from videollm.data.real import load_source
from videollm.projectors import WordAnchorProjector


def tiny_encoder(concept_frames=2, **kw) -> VideoMAPModel:
    torch.manual_seed(0)
    cfg = VideoMAPConfig(img_size=32, patch_size=8, num_frames=4, embed_dim=32, depth_mamba=2, attn_every=2,
                         num_heads=2, concept_frames=concept_frames, concept_size=64, **kw)
    return VideoMAPModel(cfg).eval()


def test_concept_frames_are_evenly_spaced_and_each_frame_takes_its_nearest():
    assert concept_frame_ids(16, 4).tolist() == [0, 5, 10, 15]
    assert concept_frame_ids(3, 4).tolist() == [0, 1, 2]  # fewer frames than concept frames: all of them
    assert nearest_concept_frame(8, 2).tolist() == [0, 0, 0, 0, 1, 1, 1, 1]


def test_the_classifier_names_a_real_photo():
    """The frozen ImageNet classifier inside the stem reads the encoder's own input normalisation."""
    clip = frames_to_tensor(np.stack([load_source("flower.jpg")[0]] * 3), 224)[None]  # (1, 3, 3, 224, 224)
    probs = classify_frames(clip, frames=2, size=224)
    assert probs.shape == (1, 2, 1000) and torch.allclose(probs.sum(-1), torch.ones(1, 2), atol=1e-4)
    names = imagenet_class_names()
    assert "daisy" in {names[i] for i in probs[0, 0].topk(3).indices}


def test_random_concepts_are_seeded_distributions():
    a = random_concepts(3, 4, torch.Generator().manual_seed(1))
    b = random_concepts(3, 4, torch.Generator().manual_seed(1))
    assert a.shape == (3, 4, 1000) and torch.equal(a, b)
    assert torch.allclose(a.sum(-1), torch.ones(3, 4), atol=1e-5) and (a[:, 0] == a[:, 1]).all()
    assert (a.max(-1).values > 0.05).all()  # some class stands out in every clip


def test_the_stem_starts_as_a_pass_through_and_keeps_the_classifier_out_of_the_weights(tmp_path):
    enc = tiny_encoder()
    stem = enc.concepts
    assert torch.equal(stem.gain.weight, torch.eye(32)) and torch.equal(stem.readout.weight, torch.eye(32))
    assert torch.allclose(stem.codes.norm(dim=-1), torch.ones(1000))
    assert not [k for k in enc.state_dict() if k.startswith("concepts.") and k.split(".")[1] not in
                ("codes", "gain", "readout")]  # no classifier weights saved with the model
    # a code read straight back names its class
    assert torch.equal(stem.logits(stem.codes[[3, 777]]).argmax(-1), torch.tensor([3, 777]))
    enc.save_pretrained(tmp_path)
    again = VideoMAPModel.from_pretrained(tmp_path).eval()
    x = torch.randn(1, 3, 4, 64, 64)
    assert torch.allclose(again(x).concept_logits, enc(x).concept_logits, atol=1e-5)


def test_concepts_enter_the_frames_they_belong_to():
    """Frames at concept size: the patch path sees them at img_size; given concepts skip the
    classifier; changing the concepts of the second half of the clip changes what the patch tokens of
    those frames get, not the first half's."""
    enc = tiny_encoder(concept_frames=2)
    x = torch.randn(1, 3, 4, 64, 64)
    probs = torch.full((1, 4, 1000), 1e-4)
    probs[..., 7] = 1.0
    out = enc(x, concept_probs=probs, output_hidden_states=True)
    assert out.grid == (4, 4, 4) and out.last_hidden_state.shape == (1, 1 + 4 * 16, 32)
    assert out.concept_logits.shape == (1, 65, 1000) and torch.equal(out.concept_probs, probs)
    changed = probs.clone()
    changed[:, 2:, 7], changed[:, 2:, 9] = 1e-4, 1.0
    first = enc(x, concept_probs=changed, output_hidden_states=True).hidden_states[0]  # the blocks' input
    diff = (first - out.hidden_states[0]).abs().sum(-1)[0, 1:].reshape(4, 16)
    assert (diff[:2] == 0).all() and (diff[2:] > 0).all()
    without = enc(x)  # the classifier's concepts, one per concept frame
    assert without.concept_probs.shape == (1, 4, 1000)
    assert torch.equal(without.concept_probs[:, 0], without.concept_probs[:, 1])


def test_a_video_without_the_stem_is_unchanged():
    enc = tiny_encoder(concept_frames=0)
    out = enc(torch.randn(1, 3, 4, 32, 32))
    assert enc.concepts is None and out.concept_logits is None and out.concept_probs is None


def test_the_word_anchor_turns_concepts_into_their_words():
    """A token whose concept logits favour class c becomes ≈ the embedding of c's word; flat logits
    (nothing recognised) add almost nothing; a concept projector without concept logits says why."""
    words = ["tench", "goldfish", "shark"]
    cfg = WordAnchorProjectorConfig(spatial_pool=1, words=[["red", "blue"]], concepts=words, none_logit=4.0)
    proj = WordAnchorProjector(cfg, vision_dim=8, text_dim=6)
    values = torch.randn(3, 6)
    proj.set_concept_anchor(values)
    grid = (1, 1, 2)
    hidden = torch.zeros(1, 3, 8)
    logits = torch.tensor([[[0.0, 0.0, 0.0], [15.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])  # cls, token 1, token 2
    w = proj.concept_weights(logits, grid)
    assert w.shape == (1, 2, 3) and w[0, 0, 0] > 0.99 and w[0, 1].sum() < 0.2
    out = proj(hidden, grid, concept_logits=logits) - proj(hidden, grid, concept_logits=torch.full_like(logits, -50))
    assert torch.allclose(out[0, 0], values[0], atol=0.02)
    with pytest.raises(ValueError, match="needs the encoder's concept_logits"):
        proj(hidden, grid)
    with pytest.raises(ValueError, match="concepts must be a list of words"):
        WordAnchorProjectorConfig(words=[["red"]], concepts=[""])


def test_a_videollm_with_concepts_saves_and_loads(tmp_path):
    """The word anchor's concept words are the classifier's class names, filled from the LLM's
    embeddings; the model round-trips through save/load with the same video features."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    from videollm.modeling_videollm import build_videollm, load_videollm, save_videollm

    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", "red", "blue", "cat", "cup"])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="</s>")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    torch.manual_seed(0)
    llm = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       num_key_value_heads=1, vocab_size=16, bos_token_id=1, eos_token_id=2,
                                       pad_token_id=2))
    enc = tiny_encoder()
    model, processor = build_videollm((llm, tok), enc, num_frames=4, image_size=64, projector={
        "type": "word_anchor", "words": [["red", "blue"]], "concepts": ["cat", "cup"] * 500})
    emb = model.get_input_embeddings().weight
    assert torch.allclose(model.projector.concept_values[0], emb[vocab["cat"]])
    x = torch.randn(1, 3, 4, 64, 64)
    feats = model.get_video_features(x)
    assert feats.shape == (1, 4 * 4, 16)
    # frames are fed at the stem's size by default and the patch stems see them at img_size, so the
    # prompt holds as many <video> placeholders as the tokens the encoder gives at any input size
    assert model.config.input_size == 64 and model.config.frame_grid(64, 64) == (4, 4) == model.config.frame_grid(96, 96)
    assert model.config.num_video_tokens(4, 64, 64) == feats.shape[1]
    inputs = processor([{"role": "user", "content": "<video> cat"}], video=np.zeros((4, 80, 80, 3), np.uint8))
    assert inputs["pixel_values"].shape[-1] == 64 and int((inputs["input_ids"] == processor.video_token_id).sum()) == 16
    save_videollm(model, processor, tmp_path)
    again, _ = load_videollm(tmp_path, num_frames=4)
    assert again.config.projector_config.concepts[:2] == ["cat", "cup"]
    assert torch.allclose(again.get_video_features(x), feats, atol=1e-5)


def test_given_concepts_with_nan_rows_classify_only_those_clips():
    enc = tiny_encoder(concept_frames=2)
    x = torch.randn(2, 3, 4, 64, 64)
    given = torch.full((2, 4, 1000), float("nan"))
    given[0] = 1e-4
    given[0, :, 5] = 1.0
    out = enc(x, concept_probs=given)
    assert torch.equal(out.concept_probs[0], given[0])
    assert torch.allclose(out.concept_probs[1], enc(x[1:]).concept_probs[0], atol=1e-6)


def test_records_can_give_made_up_concepts_and_a_batch_carries_them():
    """A record's ``concepts`` ({class name: share}) are checked, become (T, C) probabilities through
    the model's class names (the rest spread evenly), and the collated batch has NaN rows (their
    frames' own concepts) for the other videos."""
    from encoder.errors import UserError
    from training.finetune import make_encode
    from videollm.data.instruct import collate, parse_record

    turns = [{"from": "human", "value": "<video>\nWhat is it?"}, {"from": "gpt", "value": "A tabby."}]
    record, problems = parse_record({"video": "a.mp4", "conversations": turns, "concepts": {"tabby": 0.8}},
                                    Path("."), 1, "f.json")
    assert not problems and record.concepts == {"tabby": 0.8}
    for bad in ({"tabby": 1.5}, {"": 0.5}, {}, ["tabby"]):
        _, problems = parse_record({"video": "a.mp4", "conversations": turns, "concepts": bad}, Path("."), 1, "f.json")
        assert problems and "'concepts' must map class names" in problems[0]

    class Processor:  # what make_encode needs of a VideoLLMProcessor
        def load_video(self, path, **kw):
            return "clip"

        def build_training_example(self, conversations, video, max_length):
            return {"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "pixel_values": torch.zeros(1, 3, 4, 8, 8)}

    names = imagenet_class_names()
    ex = make_encode(Processor(), 64, names)(record)
    assert ex["concept_probs"].shape == (4, 1000) and torch.allclose(ex["concept_probs"].sum(-1), torch.ones(4))
    assert int(ex["concept_probs"][0].argmax()) == names.index("tabby") and ex["concept_probs"][0, 281] > 0.8
    with pytest.raises(UserError, match="f.json:1.*no concept stem"):
        make_encode(Processor(), 64, None)(record)
    plain = {k: v for k, v in ex.items() if k != "concept_probs"}
    batch = collate([ex, plain, {"input_ids": torch.tensor([1]), "labels": torch.tensor([1])}], pad_token_id=0)
    assert batch["concept_probs"].shape == (2, 4, 1000) and batch["concept_probs"][1].isnan().all()
    assert "concept_probs" not in collate([plain], pad_token_id=0)


def test_real_clip_records_name_the_subject_hedge_when_unsure_and_see_no_shapes(tmp_path):
    """The pipeline's real-footage records: camera clips of the training sources (never the held-out
    split), the subject named by the classifier or a hedge below the confidence line, shape questions
    answered with "no shapes"; records with made-up concepts name (or hedge on) those."""
    from encoder.video_io import read_video
    from videollm.data.real import HEDGE, HELDOUT, NO_SHAPES, TRAIN, name_reply, write_real_clips

    names = imagenet_class_names()
    sure, unsure = np.zeros(1000), np.full(1000, 1e-3)
    sure[281] = 0.9

    calls = []

    def classify(frames):
        calls.append(frames.shape)
        return sure if len(calls) % 2 else unsure

    records = write_real_clips(tmp_path, 4, 0, num_frames=4, size=32, names=names, classify=classify, made_up=6)
    real, made_up = records[:4], records[4:]
    assert calls == [(4, 32, 32, 3)] * 4 and not set(HELDOUT) & set(TRAIN)
    assert read_video(tmp_path / real[0]["video"], 4).frames.shape == (4, 32, 32, 3)
    replies = [[t["value"] for t in r["conversations"][1::2]] for r in real]
    assert [sorted(r) for r in replies] == [sorted([name_reply("tabby"), NO_SHAPES]), sorted([HEDGE, NO_SHAPES])] * 2
    assert name_reply("espresso") == "It shows an espresso." and name_reply("tabby") == "It shows a tabby."
    for r in made_up:
        top = max(r["concepts"], key=r["concepts"].get)
        expected = name_reply(top) if r["concepts"][top] >= 0.25 else HEDGE
        assert r["conversations"][1]["value"] == expected and (tmp_path / r["video"]).is_file()


def test_the_real_footage_check_reads_replies_as_a_user_would():
    from eval.real_footage import names_subject, photo_clip, reference_subject, synthetic_words

    assert synthetic_words("A red circle moves left on a gray background.") == ["red", "gray", "circle", "background"]
    assert synthetic_words("Two squares.") == ["square"] and synthetic_words("It shows a tabby.") == []
    assert names_subject("It shows a tabby cat.", ["cat"]) and names_subject("Cats!", ["cat"])
    assert names_subject("A space shuttle.", ["space shuttle"]) and not names_subject("Space.", ["space shuttle"])
    assert not names_subject("I can't make out what this is.", ["tabby", "cat"])
    clip = photo_clip(load_source("flower.jpg")[0], 5, size=64)
    assert clip.shape == (5, 64, 64, 3) and not np.array_equal(clip[0], clip[-1])  # a slow zoom
    assert "daisy" in reference_subject(photo_clip(load_source("flower.jpg")[0], 4))


@pytest.mark.slow
def test_the_real_footage_check_runs_on_the_shipped_model(tmp_path):
    """The command end to end on our held-out split (one clip per source)."""
    import json

    from eval.real_footage import main

    assert main(["--clips", "1", "--frames", "8", "--max-new-tokens", "8", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "real.json").read_text())
    assert result["n"] == 2 and result["named_of"] == 2 and all(r["subject_words"] for r in result["samples"])


def test_the_model_tells_its_top_concepts_per_frame():
    """video_concepts: per clip and frame the k strongest concept words (what the demo shows); the
    frames whose concepts were given say them; a model without concepts returns None."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from videollm.modeling_videollm import build_videollm

    torch.manual_seed(0)
    llm = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       num_key_value_heads=1, vocab_size=300, bos_token_id=1, eos_token_id=2,
                                       pad_token_id=2))
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    names = imagenet_class_names()
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", "red", "blue"])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="</s>")
    model, _ = build_videollm((llm, tok), tiny_encoder(concept_frames=2), num_frames=4, image_size=64, projector={
        "type": "word_anchor", "words": [["red", "blue"]], "concepts": names, "none_logit": -10.0})
    enc = model.vision_tower
    with torch.no_grad():  # a strong pass-through: the concept that goes in comes out
        enc.concepts.scale = 50.0
    probs = torch.full((1, 4, 1000), 1e-4)
    probs[0, :2, 281], probs[0, 2:, 967] = 1.0, 1.0
    real_forward = enc.forward
    enc.forward = lambda x, **kw: real_forward(x, concept_probs=probs)
    concepts = model.video_concepts(torch.randn(1, 3, 4, 64, 64), k=2)
    assert len(concepts) == 1 and len(concepts[0]) == 4 and len(concepts[0][0]) == 2
    assert [frame[0][0] for frame in concepts[0]] == ["tabby", "tabby", "espresso", "espresso"]
    model.config.projector_config.concepts = []
    assert model.video_concepts(torch.randn(1, 3, 4, 64, 64)) is None
