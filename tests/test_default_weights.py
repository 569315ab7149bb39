"""The shipped default model (videollm/weights/default): what `load_videollm()`, `videollm chat` and
the demo use when no model is given. It must load as trained weights and answer as its recorded
evaluation says it does."""
import json

import pytest

from videollm.modeling_videollm import DEFAULT_WEIGHTS


@pytest.fixture(scope="module")
def shipped():
    from videollm.modeling_videollm import load_videollm

    model, processor = load_videollm()
    return model, processor, json.loads((DEFAULT_WEIGHTS / "metrics.json").read_text())


def test_the_default_model_is_shipped():
    """The repo carries its default model: a checkout must answer out of the box, with no network."""
    assert (DEFAULT_WEIGHTS / "model.safetensors").is_file()
    assert (DEFAULT_WEIGHTS / "llm_adapter" / "adapter_model.safetensors").is_file()


def test_shipped_metrics_meet_the_targets(shipped):
    from training.config import load_config
    from training.pipeline import MAX_SHIP_BYTES, REPO, PipelineConfig, dir_bytes, missed_targets

    *_, metrics = shipped
    targets = load_config(PipelineConfig, REPO / "training" / "configs" / "default_model.yaml").targets
    assert missed_targets(metrics, targets) == []
    assert dir_bytes(DEFAULT_WEIGHTS) <= MAX_SHIP_BYTES
    card = (DEFAULT_WEIGHTS / "MODEL_CARD.md").read_text()
    assert "python -m training.pipeline" in card and (DEFAULT_WEIGHTS / "curves.png").is_file()


def test_shipped_model_gives_its_recorded_answers(shipped):
    """The default loads as trained weights (not the random fallback) and replies to the first
    held-out open-ended questions and the text question exactly as the shipped evaluation recorded."""
    from eval.open_ended import open_samples

    import yaml

    model, processor, _ = shipped
    assert model.has_lora
    recorded = json.loads((DEFAULT_WEIGHTS / "eval_open_text.json").read_text())["open_samples"][:12]
    # the shipped eval's own settings: its held-out seed, frame count, frame size and reply length
    run = yaml.safe_load((DEFAULT_WEIGHTS / "pipeline_config.yaml").read_text())
    samples = open_samples(run["eval"]["qa_seed"], len(recorded), run["eval"]["frames"], run["data"]["size"])

    replies = [_ask(model, processor, s["frames"], s["question"], run["eval"]["max_new_tokens"]) for s in samples]
    assert [s["question"] for s in samples] == [r["question"] for r in recorded]
    assert replies == [r["reply"] for r in recorded]
    assert sum(r["correct"] for r in recorded) >= 8
    assert "Paris" in _ask(model, processor, None, "What is the capital of France?", 32)


def test_needle_readout_reads_the_needle_frame(shipped):
    """`eval.niah.needle_readout` reads the needle's own tokens: at the first and the last frame of
    a 64-frame haystack they name the needle's colour and shape (the shipped model's V-NIAH is
    100% there), and the sample records where the needle went."""
    from eval.niah import needle_readout

    model, processor, _ = shipped
    out = needle_readout(model, processor, [64], [0.0, 1.0], 2, size=processor.image_size, seed=5000, log=lambda m: None)
    assert [(c["color_named"], c["shape_named"]) for c in out["cells"]] == [(2, 2), (2, 2)]
    assert [s["needle_index"] for s in out["samples"]] == [[0, 1], [0, 1], [63, 64], [63, 64]]
    for s in out["samples"]:
        assert set(s["needle"].split()) <= set(s["read"])


def test_init_from_default_starts_from_exactly_the_shipped_model(shipped, tmp_path):
    """`build_videollm(init_from="default")`, what `videollm finetune init_from=default` builds on:
    the shipped model's outputs, its LoRA adapter trainable, saved again as base reference + adapter;
    and a word anchor built afresh from the LLM's embeddings equals the shipped one."""
    import torch
    import torch.nn.functional as F

    from videollm.data.synth import make_clip
    from videollm.modeling_videollm import build_videollm, save_videollm, word_embedding_rows

    model, processor, _ = shipped
    continued, proc = build_videollm(init_from="default", num_frames=16, image_size=processor.image_size,
                                     use_time_line=False, system_prompt="")
    assert continued.has_lora and any(p.requires_grad for n, p in continued.named_parameters() if "lora_" in n)
    inputs = processor([{"role": "user", "content": "What colour is the moving object?"}],
                       video=make_clip(1, 16, 64, "motion").frames)
    with torch.no_grad():
        # The shipped model is loaded for inference: its prefill runs the adapter merged (float rounding).
        torch.testing.assert_close(model(**inputs).logits, continued(**inputs).logits, rtol=1e-5, atol=1e-3)
    adapters = {n: m for n, m in model.named_modules() if isinstance(getattr(m, "lora_a", None), torch.Tensor)}
    trained = dict(continued.named_parameters())
    assert len(adapters) > 100
    for name, layer in adapters.items():  # the very same adapter weights
        assert torch.equal(trained[f"{name}.lora_A.default.weight"], layer.lora_a)
        assert torch.equal(trained[f"{name}.lora_B.default.weight"], layer.lora_b)
    words = [w for group in model.config.projector_config.words for w in group]
    rows = word_embedding_rows(model.get_input_embeddings().weight, processor.tokenizer, words)
    assert torch.equal(F.normalize(rows - rows.mean(0), dim=-1), model.projector.anchor_keys)
    save_videollm(continued, proc, tmp_path / "again")
    size = sum(f.stat().st_size for f in (tmp_path / "again").rglob("*") if f.is_file())
    assert (tmp_path / "again" / "llm_adapter").is_dir() and size < 40 * 2**20  # no 500 MB LLM


def _ask(model, processor, video, question, max_new_tokens=24):
    from videollm.chat import generate_stream

    return "".join(generate_stream(model, processor, video, [{"role": "user", "content": question}],
                                   max_new_tokens=max_new_tokens, temperature=0.0)).strip()


def test_a_real_clip_gets_no_synthetic_world_words(shipped):
    """Honesty on real footage never trained on (our held-out split: the bikes clip and china.jpg):
    asked what it shows, and asked about shapes that are not there, the shipped model names no
    synthetic colour, shape or "background"; asked what it shows, it names the subject or hedges."""
    from eval.real_footage import HEDGE_MARKERS, SUBJECT_QUESTION, heldout_inputs, synthetic_words
    from videollm.data.real import SHAPE_QUESTIONS

    model, processor, _ = shipped
    for name, frames in heldout_inputs(1, 16):
        subject = _ask(model, processor, frames, SUBJECT_QUESTION)
        assert synthetic_words(subject) == [], (name, subject)
        assert subject.startswith("It shows") or any(m in subject.lower() for m in HEDGE_MARKERS), (name, subject)
        for question in SHAPE_QUESTIONS[:2]:
            reply = _ask(model, processor, frames, question)
            assert synthetic_words(reply) == [], (name, question, reply)


def test_a_synthetic_clip_gets_its_shapes_named(shipped):
    """The synthetic skills stay: on held-out synthetic clips the shipped model names the shape it is
    asked about (the first 6 shape questions of the shipped open-ended evaluation's seed)."""
    import yaml

    from eval.open_ended import open_correct, open_samples
    from videollm.data.synth import SHAPES

    model, processor, _ = shipped
    run = yaml.safe_load((DEFAULT_WEIGHTS / "pipeline_config.yaml").read_text())
    samples = [s for s in open_samples(run["eval"]["qa_seed"], 60, run["eval"]["frames"], run["data"]["size"])
               if s["category"] == "shape"][:6]
    replies = [_ask(model, processor, s["frames"], s["question"], run["eval"]["max_new_tokens"]) for s in samples]
    assert sum(open_correct(r, s["answer"], SHAPES) for r, s in zip(replies, samples)) >= 5, replies


def test_the_model_card_and_config_state_the_domain():
    """What the default was trained on, what it can and cannot recognise and how to load another
    model: its config's `scope` (the chat's note, the demo's header) and its card."""
    scope = json.loads((DEFAULT_WEIGHTS / "config.json").read_text())["scope"]
    assert "synthetic" in scope and "ImageNet" in scope and "--model" in scope
    assert f"## What it knows\n\n{scope}\n" in (DEFAULT_WEIGHTS / "MODEL_CARD.md").read_text()


def test_an_inference_load_builds_the_kernels_an_answer_runs():
    """`load_videollm` (chat, demo, API) has the frame resize and scan kernels ready, so the first
    question after a fresh install does not wait for them (a fresh process: nothing built before)."""
    import subprocess
    import sys

    code = ("import json; from encoder import native; from videollm.modeling_videollm import load_videollm; "
            "load_videollm(); print(json.dumps(sorted(p.name for p, (ext, _) in native._LOADED.items() "
            "if ext is not None)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert {"resize_crop.cpp", "selective_scan.cpp", "packed_linear.cpp"} <= set(json.loads(out.stdout.splitlines()[-1]))
