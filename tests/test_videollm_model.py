"""VideoLLM model + processor on a tiny encoder, a tiny random Llama and a character tokenizer."""

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from encoder.videomap import VideoMAPConfig
from videollm.configuration_videollm import VIDEO_TOKEN, VideoLLMConfig
from videollm.modeling_videollm import VideoLLMForCausalLM, build_videollm, load_videollm, save_videollm
from videollm.processing_videollm import IGNORE_INDEX

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_tokenizer():
    """One token per character (printable ASCII + newline) plus ChatML markers: 99 ids."""
    specials = ["<unk>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + [chr(c) for c in range(32, 127)] + ["\n"])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<|im_start|>",
                                  eos_token="<|im_end|>", pad_token="<|im_end|>")
    tok.chat_template = CHATML
    return tok


def tiny_llm():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def tiny_encoder_config(**overrides):
    return VideoMAPConfig.from_preset("nano", embed_dim=32, depth_mamba=2, attn_every=2, num_heads=2,
                                      img_size=32, num_frames=2, **overrides)


def tiny_videollm(**projector):
    """A tiny VideoLLM; keyword arguments are projector settings (spatial_pool 1 unless given)."""
    return build_videollm((tiny_llm(), tiny_tokenizer()), tiny_encoder_config(), num_frames=2,
                          projector={"spatial_pool": 1, **projector})


def video_frames(T=2, H=40, W=48, seed=0):
    import numpy as np

    return np.random.default_rng(seed).integers(0, 256, (T, H, W, 3), dtype=np.uint8)


def test_num_video_tokens_matches_projector():
    cfg = VideoLLMConfig(vision_config=tiny_encoder_config(), text_config=tiny_llm().config,
                         projector_config={"spatial_pool": 2})
    assert cfg.num_video_tokens(2, 32, 32) == 2  # 2×2 grid pooled 2×2 → 1 per frame
    cfg = VideoLLMConfig(vision_config=VideoMAPConfig(),
                         projector_config={"spatial_pool": 2, "max_video_tokens": 100, "use_cls_token": True})
    assert cfg.num_video_tokens(8, 224, 224) == 2 * 49 + 1  # 7×7 per frame, budget keeps 2 frames
    model, _ = tiny_videollm(spatial_pool=1, max_video_tokens=5, use_cls_token=True)
    x = torch.randn(1, 3, 6, 32, 32)
    assert model.get_video_features(x).shape == (1, model.config.num_video_tokens(6, 32, 32), 32)  # 1 + 1·4
    with pytest.raises(ValueError, match="tokens_per_frame"):
        VideoLLMConfig(projector_config={"tokens_per_frame": 3})


def test_forward_loss_and_mismatch():
    model, proc = tiny_videollm()
    conv = [{"from": "human", "value": "<video>\nWhat?"}, {"from": "gpt", "value": "A dog."}]
    ex = proc.build_training_example(conv, video=video_frames())
    ids = torch.tensor([ex["input_ids"]])
    assert (ids == model.config.video_token_id).sum() == model.config.num_video_tokens(2, 32, 32) == 8
    out = model(input_ids=ids, pixel_values=ex["pixel_values"], labels=torch.tensor([ex["labels"]]))
    assert torch.isfinite(out.loss) and out.logits.shape[:2] == ids.shape
    out.loss.backward()
    assert model.projector.linear_1.weight.grad.abs().sum() > 0
    assert next(model.vision_tower.parameters()).grad is not None
    no_placeholders = ids.masked_fill(ids == model.config.video_token_id, 5)
    with pytest.raises(ValueError, match="Video features and video tokens do not match"):
        model(input_ids=no_placeholders, pixel_values=ex["pixel_values"])
    extra = torch.cat([ids, torch.tensor([[model.config.video_token_id]])], dim=1)
    with pytest.raises(ValueError, match="Video features and video tokens do not match"):
        model(input_ids=extra, pixel_values=ex["pixel_values"])


def test_labels_only_on_assistant_turns():
    _, proc = tiny_videollm()
    answers = ["A red ball rolls.", "Twice, at 1 s and 3 s."]
    conv = [{"from": "human", "value": "<video>\nWhat happens?"}, {"from": "gpt", "value": answers[0]},
            {"from": "human", "value": "How often? (red ball rolls)"}, {"from": "gpt", "value": answers[1]}]
    ex = proc.build_training_example(conv, video=video_frames())
    ids, labels = ex["input_ids"], ex["labels"]
    assert len(ids) == len(labels)
    spans, cur = [], []
    for i, (tok, lab) in enumerate(zip(ids, labels)):
        assert lab in (IGNORE_INDEX, tok), f"label at {i} is neither -100 nor the token"
        if lab != IGNORE_INDEX:
            cur.append(tok)
        elif cur:
            spans.append(cur)
            cur = []
    if cur:
        spans.append(cur)
    decoded = [proc.tokenizer.decode(s) for s in spans]
    assert decoded == [a + "<|im_end|>" for a in answers]
    assert all(labels[i] == IGNORE_INDEX for i, t in enumerate(ids) if t == proc.video_token_id)
    text = proc.tokenizer.decode(ids)
    assert "The video lasts" not in text and "2 frames sampled at 0.0 s, 1.0 s." in text  # raw frames: no duration


def test_generate_with_kv_cache():
    model, proc = tiny_videollm()
    inputs = proc([{"role": "user", "content": "<video>\nDescribe."}], video=video_frames())
    out = model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                         pixel_values=inputs["pixel_values"], max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 6
    # Decoding with the cache gives the same tokens as recomputing everything at every step.
    no_cache = model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                              pixel_values=inputs["pixel_values"], max_new_tokens=6, min_new_tokens=6,
                              do_sample=False, use_cache=False)
    assert torch.equal(out, no_cache)


def _logits(model, inputs):
    with torch.no_grad():
        return model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"]).logits


def test_save_load_roundtrip(tmp_path):
    model, proc = tiny_videollm()
    with torch.no_grad():  # make the projector non-trivial and distinct from a fresh init
        model.projector.linear_2.bias.normal_()
    inputs = proc([{"role": "user", "content": "<video>\nWhat?"}], video=video_frames())
    save_videollm(model, proc, tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").is_file()
    assert isinstance(AutoConfig.from_pretrained(tmp_path / "m"), VideoLLMConfig)
    loaded, proc2 = load_videollm(tmp_path / "m")
    assert torch.equal(_logits(model, inputs), _logits(loaded, inputs))
    auto = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert isinstance(auto, VideoLLMForCausalLM)
    assert proc2.num_frames == 2 and proc2.tokenizer.convert_tokens_to_ids(VIDEO_TOKEN) == proc.video_token_id


def test_save_load_roundtrip_with_lora(tmp_path):
    from peft import LoraConfig

    # The base LLM is referenced by path, so it must exist on disk (as "smollm2" would in the cache).
    base = tmp_path / "base"
    tiny_llm().save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    model, proc = build_videollm(str(base), tiny_encoder_config(), num_frames=2, projector={"spatial_pool": 1})
    model.add_lora(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    assert model.has_lora
    inputs = proc([{"role": "user", "content": "<video>\nWhat?"}], video=video_frames())
    save_videollm(model, proc, tmp_path / "lora")
    saved = {p.name for p in (tmp_path / "lora").iterdir()}
    assert {"model.safetensors", "llm_adapter", "config.json"} <= saved
    from safetensors import safe_open

    with safe_open(str(tmp_path / "lora" / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if k.startswith("language_model.")]  # base LLM by reference only
    loaded, _ = load_videollm(tmp_path / "lora")
    assert loaded.has_lora
    ref = _logits(model, inputs)
    assert torch.allclose(ref, _logits(loaded, inputs), atol=1e-5)

    # init_from continues the saved model: same outputs, the adapter trainable
    continued, _ = build_videollm(init_from=tmp_path / "lora", num_frames=2)
    assert continued.has_lora and any(p.requires_grad for n, p in continued.named_parameters() if "lora_" in n)
    assert torch.allclose(ref, _logits(continued, inputs), atol=1e-5)

    from videollm.merge import main as merge_main

    assert merge_main(["--model", str(tmp_path / "lora"), "--out", str(tmp_path / "merged")]) == 0
    merged, _ = load_videollm(tmp_path / "merged")
    assert not merged.has_lora and not (tmp_path / "merged" / "llm_adapter").exists()
    assert torch.allclose(ref, _logits(merged, inputs), atol=1e-5)


def test_a_frozen_base_llm_is_saved_by_reference(tmp_path):
    """Stage 1 trains the projector only: its checkpoint holds encoder + projector and the base
    LLM's name, not the LLM (whose <video> row add_video_token makes the same again)."""
    from safetensors import safe_open

    base = tmp_path / "base"
    tiny_llm().save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    model, proc = build_videollm(str(base), tiny_encoder_config(), num_frames=2, projector={"spatial_pool": 1})
    model.requires_grad_(False)
    model.projector.requires_grad_(True)
    with torch.no_grad():
        model.projector.linear_2.bias.normal_()
    inputs = proc([{"role": "user", "content": "<video>\nWhat?"}], video=video_frames())
    save_videollm(model, proc, tmp_path / "s1")
    with safe_open(str(tmp_path / "s1" / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if k.startswith("language_model.")]
    loaded, _ = load_videollm(tmp_path / "s1")
    assert loaded.language_model_is_base and torch.equal(_logits(model, inputs), _logits(loaded, inputs))
    model.language_model.requires_grad_(True)  # a recipe training the LLM's own weights: saved whole
    save_videollm(model, proc, tmp_path / "whole")
    size = {d: (tmp_path / d / "model.safetensors").stat().st_size for d in ("s1", "whole")}
    llm_bytes = sum(p.numel() * 4 for p in tiny_llm().parameters())
    assert size["whole"] - size["s1"] >= llm_bytes * 0.9


def test_default_is_an_alias_and_an_unknown_directory_is_one_clear_error(tmp_path):
    from encoder.errors import UserError
    from videollm.modeling_videollm import DEFAULT_WEIGHTS, resolve_model_dir

    assert resolve_model_dir(None) == resolve_model_dir("default") == DEFAULT_WEIGHTS
    with pytest.raises(UserError, match="not a saved VideoLLM") as err:
        load_videollm(tmp_path / "nope")
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="not a saved VideoLLM"):
        build_videollm(init_from=tmp_path / "nope")


def test_saved_model_names_no_path_it_was_built_from(tmp_path):
    """A saved VideoLLM (as shipped in the repo) names its base LLM by ``base_llm`` only: not by the
    directories its encoder and LLM were loaded from while it was built (a run directory, the LLM's
    local cache), which peft and the sub-configs would otherwise record."""
    import json

    from encoder.videomap import VideoMAPModel
    from peft import LoraConfig

    build = tmp_path / "build"
    VideoMAPModel(tiny_encoder_config()).save_pretrained(build / "encoder")
    tiny_llm().save_pretrained(build / "llm-cache")
    tiny_tokenizer().save_pretrained(build / "llm-cache")
    model, proc = build_videollm(str(build / "llm-cache"), str(build / "encoder"), num_frames=2,
                                 projector={"spatial_pool": 1})
    model.config.base_llm = "tiny-llm"  # as smollm2 is loaded from a cache directory but named "smollm2"
    model.add_lora(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    save_videollm(model, proc, tmp_path / "m")
    texts = {f: f.read_text() for f in (tmp_path / "m").rglob("*") if f.suffix in (".json", ".md", ".yaml")}
    assert tmp_path / "m" / "config.json" in texts and tmp_path / "m" / "llm_adapter" / "adapter_config.json" in texts
    assert [f for f, t in texts.items() if str(build) in t] == []
    adapter = json.loads((tmp_path / "m" / "llm_adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "tiny-llm"


def test_loss_logits_only_gives_the_same_loss_and_gradients():
    model, proc = tiny_videollm()
    convs = [[{"from": "human", "value": "<video>\nWhat?"}, {"from": "gpt", "value": "A dog."}],
             [{"from": "human", "value": "<video>\nColour?"}, {"from": "gpt", "value": "Red"},
              {"from": "human", "value": "Shape?"}, {"from": "gpt", "value": "A star."}]]
    exs = [proc.build_training_example(c, video=video_frames(seed=i)) for i, c in enumerate(convs)]
    L = max(len(e["input_ids"]) for e in exs)
    ids = torch.tensor([e["input_ids"] + [2] * (L - len(e["input_ids"])) for e in exs])
    labels = torch.tensor([e["labels"] + [IGNORE_INDEX] * (L - len(e["labels"])) for e in exs])
    pv = torch.cat([e["pixel_values"] for e in exs])
    results = []
    for sparse in (False, True):
        model.zero_grad()
        model.loss_logits_only = sparse
        out = model(input_ids=ids, pixel_values=pv, labels=labels)
        out.loss.backward()
        results.append((out.loss.detach(), model.projector.linear_1.weight.grad.clone(), out.logits.shape[1]))
    (full, g_full, n_full), (sparse, g_sparse, n_sparse) = results
    assert torch.allclose(full, sparse, atol=1e-6) and torch.allclose(g_full, g_sparse, atol=1e-6)
    assert n_full == L and n_sparse == int((labels[:, 1:] != IGNORE_INDEX).any(0).sum()) < L


def test_system_prompt_replaces_the_template_default():
    from videollm.processing_videollm import VideoLLMProcessor

    _, proc = tiny_videollm()
    conv = [{"role": "user", "content": "Hi"}]
    assert "system" not in proc.render(conv)  # None: whatever the template does
    empty = VideoLLMProcessor(proc.tokenizer, proc.config, num_frames=2, system_prompt="")
    assert empty.render(conv).startswith("<|im_start|>system\n<|im_end|>\n<|im_start|>user\nHi")
    own = [{"role": "system", "content": "Be brief."}] + conv
    assert empty.render(own).count("system") == 1  # a conversation's own system turn wins
    ex = empty.build_training_example(conv + [{"role": "assistant", "content": "Hello"}])
    assert empty.tokenizer.decode([t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE_INDEX]) \
        == "Hello<|im_end|>"
    assert empty.to_dict()["system_prompt"] == ""


def test_a_batch_mixing_text_only_and_video_examples_gives_each_its_own_logits():
    from videollm.data.instruct import collate

    model, proc = tiny_videollm()
    video = [{"from": "human", "value": "<video>\nWhat?"}, {"from": "gpt", "value": "A dog."}]
    text = [{"from": "human", "value": "Name a fruit."}, {"from": "gpt", "value": "An apple."}]
    examples = []
    for conv, frames in ((text, None), (video, video_frames(seed=1)), (text, None), (video, video_frames(seed=2))):
        ex = proc.build_training_example(conv, video=frames)
        item = {"input_ids": torch.tensor(ex["input_ids"]), "labels": torch.tensor(ex["labels"])}
        if frames is not None:
            item["pixel_values"] = ex["pixel_values"][0]
        examples.append(item)
    batch = collate(examples, proc.tokenizer.pad_token_id)
    assert batch["pixel_values"].shape[0] == 2
    with torch.no_grad():
        mixed = model(**batch).logits
        for i, ex in enumerate(examples):
            pv = ex["pixel_values"][None] if "pixel_values" in ex else None
            alone = model(input_ids=ex["input_ids"][None], pixel_values=pv).logits[0]
            assert torch.allclose(mixed[i, :len(ex["input_ids"])], alone, atol=1e-5), i
    # the two videos differ, so swapping them would show
    assert not torch.allclose(examples[1]["pixel_values"], examples[3]["pixel_values"])


def test_bench_chat_labels_the_model_it_measured():
    from videollm.bench_chat import model_label

    model, proc = tiny_videollm()
    assert model_label(model, proc) == {"llm": "llama", "lora": False, "encoder": "videomap (D=32)",
                                        "projector": "mlp", "image_size": 32}


def test_a_video_file_is_resized_as_it_is_decoded(monkeypatch, tmp_path):
    """load_video on a file never holds its frames at full resolution (a long HD video's would take
    gigabytes), and gives the numbers of resizing the decoded clip, repeats included."""
    from encoder import video_io
    from encoder.transforms import frames_to_tensor

    _, proc = tiny_videollm()
    path = video_io.write_video(tmp_path / "clip.mp4", video_frames(T=6, H=48, W=64), fps=6)
    clips = {n: video_io.read_video(path, n) for n in (4, 9)}  # 9: more frames than the clip has

    def no_full_clip(*args):
        raise AssertionError("the whole clip was kept at full resolution")

    monkeypatch.setattr(video_io, "_frame_buffer", no_full_clip)
    for n, clip in clips.items():
        inputs = proc.load_video(str(path), num_frames=n)
        assert inputs.pixel_values.shape == (1, 3, n, proc.image_size, proc.image_size)
        assert torch.equal(inputs.pixel_values[0], frames_to_tensor(clip.frames, proc.image_size, proc.mean, proc.std))
        assert inputs.timestamps == clip.timestamps


def test_frames_seen_are_the_encoders_input_as_uint8():
    _, proc = tiny_videollm()
    S = proc.image_size
    frames = video_frames(T=3, H=S, W=S)  # no resize, no crop: the round trip gives the frames back
    assert (proc.frames_seen(proc.load_video(frames)) == frames).all()
    wide = proc.frames_seen(proc.load_video(video_frames(T=2, H=S, W=2 * S)))
    assert wide.shape == (2, S, S, 3) and wide.dtype.name == "uint8"  # the centre square only
