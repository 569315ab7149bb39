"""Fine-tuning recipe smoke tests: the real ``videollm finetune`` CLI, a few CPU steps each, on a
tiny Llama (byte-level tokenizer, hidden 32) + VideoMAP nano at 32 px, 64 synthetic clips."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from encoder.errors import UserError
from training.config import load_config
from training.finetune import FinetuneConfig, build_model
from videollm.cli import main as cli

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "training" / "configs"
STAGE1 = CONFIGS / "finetune_stage1_smoke.yaml"
STAGE2 = CONFIGS / "finetune_stage2_smoke.yaml"


def make_tiny_llm(out: Path, hidden: int = 32) -> Path:
    """A tiny Llama + a byte-level tokenizer (256 bytes + 3 specials) with a chat template, saved
    as a local LLM directory (no Hub access)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                          "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(fast), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id))
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from videollm.data.synth import write_synth_dataset

    root = tmp_path_factory.mktemp("finetune")
    write_synth_dataset(root / "synth", 64, seed=0, num_frames=8, size=32)
    return {"llm": make_tiny_llm(root / "llm32"), "data": root / "synth" / "instruct.json", "root": root}


def _overrides(assets, out: Path, **kw) -> list[str]:
    base = {"llm": assets["llm"], "output_dir": out, "data.source": assets["data"]}
    return [f"{k}={v}" for k, v in {**base, **kw}.items()]


def _finetune(config: Path, overrides: list[str], capsys=None) -> dict:
    code = cli(["finetune", "--config", str(config), *overrides])
    out = capsys.readouterr().out if capsys is not None else ""
    assert code == 0
    return json.loads(out.strip().splitlines()[-1]) if out else {}


def _finetune_process(overrides: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    """`videollm finetune` stage 2 in its own process: accelerate fixes mixed precision and the
    distributed setup once per process, as the pipeline's separate stage processes have them."""
    proc = subprocess.run([sys.executable, "-m", "videollm", "finetune", "--config", str(STAGE2), *overrides],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_every_shipped_config_loads():
    for path in sorted(CONFIGS.glob("finetune_*.yaml")):
        cfg = load_config(FinetuneConfig, path)
        assert cfg.stage in (1, 2), path
    for path in sorted(CONFIGS.glob("zero*.json")):
        ds = json.loads(path.read_text())
        assert ds["zero_optimization"]["stage"] in (2, 3) and ds["train_micro_batch_size_per_gpu"] == "auto"


def test_stage1_trains_only_the_projector(assets, tmp_path):
    out = tmp_path / "s1"
    over = _overrides(assets, out, steps=3, save_every=100, eval_every=3)
    _finetune(STAGE1, over)
    # The same builder with the same seed gives the starting weights.
    initial = build_model(load_config(FinetuneConfig, STAGE1, over))[0].state_dict()
    final = load_file(str(out / "final" / "model.safetensors"))
    changed = {k for k in final if k in initial and not torch.equal(final[k], initial[k])}
    assert changed and all(k.startswith("projector.") for k in changed), sorted(changed)[:5]
    assert {k for k in initial if k.startswith("projector.")} <= changed
    # The frozen LLM is saved by reference (config.base_llm), not as weights; so are checkpoints.
    assert any(k.startswith("vision_tower.") for k in final) and not any(k.startswith("language_model.") for k in final)
    ckpt = load_file(str(out / "checkpoint-3" / "trainable.safetensors"))
    assert ckpt and all(k.startswith("projector.") for k in ckpt if k.endswith((".weight", ".bias")))
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3] and "eval_loss" in rows[-1]


def test_stage2_lora_loss_falls(assets, tmp_path, capsys):
    out = tmp_path / "s2"
    summary = _finetune(STAGE2, _overrides(assets, out, steps=16, grad_accum=1, eval_every=8, save_every=8,
                                           **{"optim.lr": 5e-3}), capsys)
    rows = _metrics(out)
    losses = [r["loss"] for r in rows]
    early, late = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    print(f"stage 2 loss {losses[0]:.3f} → {losses[-1]:.3f} (mean of first/last 4: {early:.3f} → {late:.3f})")
    assert late < early - 0.1, losses
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert len(evals) == 2 and evals[1] < evals[0]
    final = out / "final"
    assert (final / "llm_adapter" / "adapter_config.json").is_file() and (final / "model.safetensors").is_file()
    assert summary["steps"] == 16 and summary["linear4bit_layers"] == 0
    adapter_cfg = json.loads((final / "llm_adapter" / "adapter_config.json").read_text())
    assert set(adapter_cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_stage2_bf16_autocasts_and_keeps_fp32_weights(assets, tmp_path):
    """precision=bf16 (the default model's stage 2 on CPU): the forward runs in bf16 (its losses
    differ from fp32's), training still works, and the trained weights stay fp32."""
    kw = dict(steps=8, grad_accum=1, eval_every=100, save_every=100, **{"optim.lr": 5e-3})
    fp32, bf16 = tmp_path / "fp32", tmp_path / "bf16"
    _finetune(STAGE2, _overrides(assets, fp32, **kw))
    _finetune_process(_overrides(assets, bf16, precision="bf16", **kw))
    a, b = [r["loss"] for r in _metrics(fp32)], [r["loss"] for r in _metrics(bf16)]
    assert a[0] != b[0] and b[0] == pytest.approx(a[0], rel=0.05), (a[0], b[0])
    assert sum(b[-3:]) / 3 < sum(b[:3]) / 3 - 0.1, b
    adapter = load_file(str(bf16 / "final" / "llm_adapter" / "adapter_model.safetensors"))
    assert adapter and all(t.dtype == torch.float32 for t in adapter.values())
    full = load_file(str(bf16 / "final" / "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in full.values() if t.is_floating_point())


def test_word_anchor_is_installed_in_stage1_and_kept_in_stage2(assets, tmp_path):
    from training.ground import COLOR_WORDS, SHAPE_WORDS, WORDS, WordScorer, word_embeddings
    from videollm.modeling_videollm import load_videollm

    s1, s2 = tmp_path / "s1", tmp_path / "s2"
    _finetune(STAGE1, _overrides(assets, s1, steps=2, save_every=100, eval_every=100, word_anchor="[colors, shapes]",
                                 max_video_tokens=4096, anchor_temporal_merge="named"))
    m1, proc = load_videollm(s1 / "final")
    assert m1.config.projector_config.words == [list(COLOR_WORDS), list(SHAPE_WORDS)]
    assert (m1.config.projector_config.max_video_tokens, m1.config.projector_config.temporal_merge) == (4096, "named")
    rows = word_embeddings(m1.get_input_embeddings().weight, proc.tokenizer)  # every word ground scores
    n = len(COLOR_WORDS) + len(SHAPE_WORDS)
    assert rows.shape[0] == len(WORDS) and torch.equal(m1.projector.anchor_values, rows[:n])
    # The anchor compares tokens with words exactly as the grounding scorer did (centred over all words).
    scorer = WordScorer(rows, 1.0, 1.0)
    assert torch.allclose(m1.projector.anchor_keys, scorer.words[:n], atol=1e-6)
    # Stage 2 starts from stage 1 and keeps the anchor (without asking for it again); it trains the gate.
    _finetune(STAGE2, _overrides(assets, s2, steps=2, grad_accum=1, save_every=100, eval_every=100,
                                 init_from=s1 / "final", **{"optim.lr": 5e-3}))
    m2, _ = load_videollm(s2 / "final")
    assert m2.has_lora and m2.config.projector_config == m1.config.projector_config
    assert torch.equal(m2.projector.anchor_values, rows[:n])
    assert float(m2.projector.anchor_gate) != float(m1.projector.anchor_gate)


def test_word_anchor_names_known_groups():
    with pytest.raises(UserError, match="word_anchor"):
        FinetuneConfig(word_anchor=["colours"]).validate()
    with pytest.raises(UserError, match="word_anchor"):
        FinetuneConfig(word_anchor=["colors", "colors"]).validate()


def test_a_run_folder_is_never_overwritten(assets, tmp_path, capsys):
    out = tmp_path / "run"
    kw = dict(steps=2, grad_accum=1, eval_every=100, save_every=100)
    _finetune(STAGE2, _overrides(assets, out, **kw))
    before = (out / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert cli(["finetune", "--config", str(STAGE2), *_overrides(assets, out, **kw)]) == 2
    assert f"'{out}' already holds a run" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_text() == before


def test_resume_continues_exactly(assets, tmp_path):
    kw = dict(steps=6, save_every=3, eval_every=100, grad_accum=2, **{"lora.dropout": 0.1})
    full, part = tmp_path / "full", tmp_path / "part"
    _finetune(STAGE2, _overrides(assets, full, **kw))
    _finetune(STAGE2, _overrides(assets, part, stop_after=3, **kw))
    assert (part / "checkpoint-3").is_dir() and not (part / "final").exists()
    assert [r["step"] for r in _metrics(part)] == [1, 2, 3]
    _finetune(STAGE2, _overrides(assets, part, resume="true", **kw))
    a, b = _metrics(full), _metrics(part)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-5), (ra, rb)
        assert rb["lr"] == pytest.approx(ra["lr"], rel=1e-9)
    fa = load_file(str(full / "final" / "llm_adapter" / "adapter_model.safetensors"))
    fb = load_file(str(part / "final" / "llm_adapter" / "adapter_model.safetensors"))
    assert max((fa[k] - fb[k]).abs().max().item() for k in fa) < 1e-5


def test_qlora_4bit(assets, tmp_path, capsys):
    pytest.importorskip("bitsandbytes", reason="quant=4bit needs bitsandbytes (pip install bitsandbytes)")
    # bitsandbytes' CPU 4-bit kernels need in_features >= its block size (64).
    llm = make_tiny_llm(tmp_path / "llm64", hidden=64)
    out = tmp_path / "q"
    summary = _finetune(STAGE2, _overrides(assets, out, llm=llm, quant="4bit", steps=2, eval_every=2,
                                           save_every=100), capsys)
    assert summary["linear4bit_layers"] == 14  # 2 layers × (q, k, v, o, gate, up, down)
    rows = _metrics(out)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows) and "eval_loss" in rows[-1]
    assert (out / "final" / "llm_adapter").is_dir()


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_deepspeed_single_process(assets, tmp_path, zero):
    pytest.importorskip("deepspeed", reason="deepspeed=… needs the deepspeed package (pip install deepspeed)")
    out = tmp_path / zero
    # No launcher variables and no DS_ACCELERATOR: the recipe sets up a one-process group on DeepSpeed's
    # CPU accelerator itself (DeepSpeed alone would look for MPI and stop on a missing mpi4py).
    launcher = ("DS_ACCELERATOR", "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    kw = dict(steps=3, save_every=2, eval_every=3, deepspeed=CONFIGS / f"{zero}.json")

    _finetune_process([*_overrides(assets, out, **kw), "stop_after=2"], env)  # checkpoint-2 via DeepSpeed save_state
    assert (out / "checkpoint-2" / "accelerate").is_dir()
    # The checkpoint holds the trainable weights (LoRA, projector), not the frozen LLM.
    states = next((out / "checkpoint-2" / "accelerate").rglob("*mp_rank_00_model_states.pt"))
    saved = torch.load(states, map_location="cpu", weights_only=False)["module"]
    assert saved and all("lora_" in k or k.startswith("projector.") for k in saved), sorted(saved)[:3]
    _finetune_process([*_overrides(assets, out, **kw), "resume=true"], env)
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3] and "eval_loss" in rows[-1]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    final = load_file(str(out / "final" / "model.safetensors"))  # gathered, not ZeRO-3 shards
    assert final["projector.linear_1.weight"].numel() > 0
    assert (out / "final" / "llm_adapter" / "adapter_model.safetensors").is_file()


def _old_epoch_batches(n, batch_size, epoch, seed, rank, world):
    """The ungrouped batching as it was before groups existed (resume exactness depends on it)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    per_step = batch_size * world
    return [perm[b * per_step + rank * batch_size: b * per_step + (rank + 1) * batch_size]
            for b in range(n // per_step)]


def test_epoch_batches_group_by_frame_count():
    from training.finetune import epoch_batches

    n, bs, world = 41, 2, 2
    groups = [64 if i % 3 == 0 else (128 if i % 7 == 0 else None) for i in range(n)]
    sizes = {g: groups.count(g) for g in set(groups)}  # None: 23, 64: 14, 128: 4
    for epoch in (0, 1):
        per_rank = [epoch_batches(n, bs, epoch, 5, rank, world, groups=groups) for rank in range(world)]
        assert len(per_rank[0]) == len(per_rank[1]) == sum(s // (bs * world) for s in sizes.values())
        for step in zip(*per_rank):  # one global batch: every rank's part is of one group
            assert all(len(b) == bs for b in step)
            assert len({groups[i] for b in step for i in b}) == 1, step
        seen = [i for batches in per_rank for b in batches for i in b]
        assert len(seen) == len(set(seen))  # each record at most once
        perm = _old_epoch_batches(n, n, epoch, 5, 0, 1)[0]  # the epoch's permutation
        for g, size in sizes.items():  # each group: the first whole global batches of it, in perm order
            in_perm = [i for i in perm if groups[i] == g]
            assert {i for i in seen if groups[i] == g} == set(in_perm[:size // (bs * world) * (bs * world)])
        assert per_rank[0] == epoch_batches(n, bs, epoch, 5, 0, world, groups=list(groups))  # deterministic
        kinds = [groups[b[0]] for b in per_rank[0]]
        assert sum(a != b for a, b in zip(kinds, kinds[1:])) > len(sizes) - 1  # the groups interleave
    assert epoch_batches(n, bs, 0, 5, 0, world, groups=groups) != epoch_batches(n, bs, 1, 5, 0, world, groups=groups)
    assert epoch_batches(n, bs, 0, 5, 0, world, groups=groups) != epoch_batches(n, bs, 0, 6, 0, world, groups=groups)
    for rank in range(world):  # no groups, or one: exactly the ungrouped batches
        for epoch in (0, 3):
            old = _old_epoch_batches(n, bs, epoch, 5, rank, world)
            assert epoch_batches(n, bs, epoch, 5, rank, world) == old
            assert epoch_batches(n, bs, epoch, 5, rank, world, groups=[None] * n) == old
            assert epoch_batches(n, bs, epoch, 5, rank, world, groups=[64] * n) == old
    with pytest.raises(ValueError, match="groups"):
        epoch_batches(n, bs, 0, 5, 0, world, groups=groups[:-1])


def test_epoch_batches_group_by_length():
    """lengths: the same records per group and epoch as without (drop_last aside), batches that pad
    little, still shuffled and deterministic in (seed, epoch)."""
    import random

    from training.finetune import LENGTH_WINDOW, epoch_batches

    rng = random.Random(0)
    n, bs = 3 * LENGTH_WINDOW * 4 + 10, 4
    groups = [64 if i % 5 == 0 else None for i in range(n)]
    lengths = [rng.randint(20, 400) for _ in range(n)]

    def waste(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    for g in (groups, None):
        plain = epoch_batches(n, bs, 1, 5, 0, 1, groups=g)
        by_length = epoch_batches(n, bs, 1, 5, 0, 1, groups=g, lengths=lengths)
        assert by_length == epoch_batches(n, bs, 1, 5, 0, 1, groups=g, lengths=list(lengths))
        assert by_length != epoch_batches(n, bs, 2, 5, 0, 1, groups=g, lengths=lengths)
        assert len(by_length) == len(plain) and all(len(b) == bs for b in by_length)
        if g is not None:
            assert all(len({groups[i] for i in b}) == 1 for b in by_length)
        assert waste(by_length) < waste(plain) / 5
        firsts = [max(lengths[i] for i in b) for b in by_length]
        assert firsts != sorted(firsts, reverse=True)  # the batches are shuffled, not longest first
    # each group's records: those of its first windows, as the epoch's permutation orders them
    perm = _old_epoch_batches(n, n, 1, 5, 0, 1)[0]
    seen = {i for b in epoch_batches(n, bs, 1, 5, 0, 1, groups=groups, lengths=lengths) for i in b}
    for key in (64, None):
        in_perm = [i for i in perm if groups[i] == key]
        whole = len(in_perm) // bs * bs
        assert {i for i in in_perm[:whole - whole % (LENGTH_WINDOW * bs)]} <= seen
        assert len({i for i in in_perm} & seen) == whole
    with pytest.raises(ValueError, match="lengths"):
        epoch_batches(n, bs, 0, 5, 0, 1, lengths=lengths[:-1])


def test_record_lengths_are_the_encoded_lengths(assets, tmp_path):
    """group_by_length sorts by `record_lengths`, counted without decoding a video: it must equal
    what `make_encode` builds, video records (of two frame counts) and text-only ones."""
    from training.finetune import make_encode, record_lengths
    from videollm.data.instruct import load_records

    records = load_records(assets["data"])[:6]
    records[1].num_frames = 6
    records[2].video = None
    records[2].conversations = [{"from": "human", "value": "Hello there"}, {"from": "gpt", "value": "Hi! How can I help?"}]
    for time_line in (False, True):
        cfg = load_config(FinetuneConfig, STAGE1, _overrides(assets, tmp_path / "len", **{"data.time_line": time_line}))
        model, processor = build_model(cfg)
        encode = make_encode(processor, max_length=10_000)
        counted, encoded = record_lengths(records, processor), [len(encode(r)["input_ids"]) for r in records]
        if time_line:  # the stamps are stood in for: within a few tokens
            assert all(abs(a - b) <= 8 for a, b in zip(counted, encoded)), (counted, encoded)
        else:
            assert counted == encoded
            assert encoded[1] > encoded[0] > encoded[2]  # 6 frames, 4 frames, text only


def test_make_encode_samples_the_records_frame_count(assets, tmp_path):
    from training.finetune import make_encode
    from videollm.data.instruct import collate, load_records

    cfg = load_config(FinetuneConfig, STAGE1, _overrides(assets, tmp_path / "enc"))
    assert cfg.data.num_frames == 4
    model, processor = build_model(cfg)
    tokenizer = processor.tokenizer
    encode = make_encode(processor, cfg.data.max_length)
    records = load_records(assets["data"])[:2]
    records[1].num_frames = 6
    short, long = encode(records[0]), encode(records[1])
    assert short["pixel_values"].shape[1] == 4 and long["pixel_values"].shape[1] == 6
    # More frames, more <video> placeholders (and a longer time line) in the prompt.
    assert len(long["input_ids"]) > len(short["input_ids"])
    with torch.no_grad():  # the model takes the longer clip (temporal positions interpolated)
        out = model(**collate([long], tokenizer.pad_token_id))
    assert torch.isfinite(out.loss)


def test_spatial_merge_is_avg_or_concat():
    with pytest.raises(UserError, match="spatial_merge"):
        FinetuneConfig(spatial_merge="max").validate()
    FinetuneConfig(spatial_merge="concat").validate()


def test_stage2_trains_on_text_only_records_in_a_data_mix(assets, tmp_path):
    """Text-only records (no video) mixed with video records: batches of their own, no pixel
    values, gradients into the LoRA only, and a stage-2 run through them (the default model's
    text replay relies on all of it)."""
    from training.finetune import batch_group, epoch_batches, make_encode
    from videollm.data.instruct import collate, load_records, split_eval

    texts = [("Name a fruit.", "An apple is a fruit."), ("Say hello.", "Hello there, friend."),
             ("What is ice?", "Ice is frozen water.")]
    (tmp_path / "text.json").write_text(json.dumps(
        [{"id": f"t{i}", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
         for i, (q, a) in enumerate(texts)]))
    mix = tmp_path / "mix.yaml"
    mix.write_text(f"datasets:\n  - {{path: {assets['data']}}}\n  - {{path: text.json, sampling: 48}}\n")
    records = load_records(mix, seed=0)
    text_records = [r for r in records if r.video is None]
    assert len(text_records) == 144 and {batch_group(r) for r in text_records} == {"text"}
    out = tmp_path / "s2"
    over = _overrides(assets, out, steps=6, grad_accum=1, eval_every=6, save_every=6, **{"data.source": mix})
    cfg = load_config(FinetuneConfig, STAGE2, over)
    model, processor = build_model(cfg)
    encode = make_encode(processor, cfg.data.max_length)
    batch = collate([encode(r) for r in text_records[:3]], processor.tokenizer.pad_token_id)
    assert batch["pixel_values"] is None and (batch["labels"] != -100).sum() > 3 * len("Hello there")
    model(**batch).loss.backward()
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora and all(p.grad is not None for p in lora) and sum(p.grad.abs().sum() for p in lora) > 0
    assert all(p.grad is None for p in model.vision_tower.parameters())
    # The run's first steps hold text batches (the trainer's own batching), and it goes through them.
    train, _ = split_eval(records, cfg.data.eval_fraction, cfg.seed)
    batches = epoch_batches(len(train), cfg.batch_size, 0, cfg.seed, 0, 1, groups=[batch_group(r) for r in train])
    assert any(train[b[0]].video is None for b in batches[:6])
    _finetune(STAGE2, over)
    assert [r["step"] for r in _metrics(out)] == list(range(1, 7))
    assert (out / "final" / "llm_adapter" / "adapter_config.json").is_file()


@pytest.mark.parametrize("tied", [True, False])
def test_frozen_linears_in_bf16_give_the_same_bf16_step(tied):
    """Stage 2 in bf16 stores the frozen base layers in bf16 (autocast would re-cast them in every
    forward): the loss and the LoRA gradients must be bit-identical to autocasting fp32 weights,
    with the LoRA weights, the embedding and the output layer left in fp32."""
    import copy

    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from training.finetune import frozen_linears_to

    torch.manual_seed(0)
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied))
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], task_type="CAUSAL_LM")
    fp32 = get_peft_model(llm, lora)
    stored = copy.deepcopy(fp32)
    n = frozen_linears_to(stored, torch.bfloat16)
    assert n == 2 * 7  # 7 linear layers per block; the output layer stays fp32, tied or not
    dtypes = {name: p.dtype for name, p in stored.named_parameters()}
    assert all(d == torch.float32 for k, d in dtypes.items() if "lora_" in k or "embed_tokens" in k or "norm" in k)
    assert dtypes[next(k for k in dtypes if "q_proj.base_layer" in k)] == torch.bfloat16
    assert stored.base_model.model.lm_head.weight.dtype == torch.float32

    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    grads = []
    for model in (fp32, stored):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads.append((loss.detach(), {k: p.grad for k, p in model.named_parameters() if p.requires_grad}))
    (loss_a, grad_a), (loss_b, grad_b) = grads
    assert torch.equal(loss_a, loss_b)
    assert grad_a.keys() == grad_b.keys() and all(torch.equal(grad_a[k], grad_b[k]) for k in grad_a)


def test_finetune_the_shipped_model_on_own_data_then_chat(tmp_path):
    """The README's path for a user: continue the shipped model (init_from=default) on a small
    LLaVA-video file of one's own, then chat with the result; neither command shows a library
    warning."""
    from encoder.video_io import sample_clip_path

    clip = str(sample_clip_path("bigbuckbunny"))
    answers = ["A big rabbit in a meadow.", "A rabbit stands on the grass.", "A large white rabbit."]
    records = [{"id": f"own{i}", "video": clip,
                "conversations": [{"from": "human", "value": "<video>\nWhat animal is in the video?"},
                                  {"from": "gpt", "value": answers[i % 3]}]} for i in range(6)]
    (tmp_path / "my.json").write_text(json.dumps(records))
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "videollm", "finetune", "--config", str(STAGE2), "init_from=default",
                           f"data.source={tmp_path / 'my.json'}", "steps=2", f"output_dir={out}"],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = ("training.", "encoder.", "videollm.")
    foreign = [line for line in proc.stderr.splitlines()
               if line.strip() and not (line[9:].split(" ", 1)[-1].startswith(ours))]
    assert not foreign, foreign[:5]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["final"] == str(out / "final")
    assert (out / "final" / "llm_adapter" / "adapter_model.safetensors").is_file()
    chat = subprocess.run([sys.executable, "-m", "videollm", "chat", "--model", str(out / "final"), clip,
                           "What animal is in the video?", "--max-new-tokens", "12"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert chat.returncode == 0, chat.stderr[-3000:]
    assert chat.stdout.strip() and not chat.stderr.strip(), (chat.stdout, chat.stderr)
