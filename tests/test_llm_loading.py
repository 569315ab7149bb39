"""load_llm: the smollm2 alias (GGUF dequantized once, then read from the safetensors cache), local dirs."""

import time
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from encoder.errors import UserError
from videollm.llm import load_llm


def shared_llm_cache(tmp_path_factory) -> Path:
    # One dequantized smollm2 per test session, shared with test_chat_cli (same base temp dir).
    return tmp_path_factory.getbasetemp() / "videomap-llm-cache"


def test_smollm2_alias_is_cached_and_reloads_fast(tmp_path_factory):
    cache = shared_llm_cache(tmp_path_factory)
    model, tok = load_llm("smollm2", cache_dir=cache)  # dequantizes the GGUF unless already cached
    entry = cache / "SmolLM2-135M-Instruct.Q4_1"
    assert (entry / "model.safetensors").is_file() and (entry / "config.json").is_file()
    assert not [p for p in cache.iterdir() if p.name.startswith(".")], "temporary cache dirs left behind"
    assert getattr(model, "hf_quantizer", None) is None
    assert "quantization_config" not in model.config.to_dict()
    del model
    t = time.perf_counter()
    model, tok = load_llm("smollm2", cache_dir=cache)
    seconds = time.perf_counter() - t
    assert seconds < 5, f"cached smollm2 load took {seconds:.1f} s"
    assert model.config.hidden_size == 576 and tok.chat_template and tok.eos_token == "<|im_end|>"
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])


def test_local_dir_and_errors(tmp_path):
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llm")
    from test_videollm_model import tiny_tokenizer  # pytest puts tests/ on sys.path

    tiny_tokenizer().save_pretrained(tmp_path / "llm")
    model, tok = load_llm(tmp_path / "llm", dtype=torch.float32, cache_dir=tmp_path / "cache")
    assert isinstance(model, LlamaForCausalLM) and not model.training
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False).startswith("<|im_start|>user")
    with pytest.raises(UserError, match="does not exist"):
        load_llm(tmp_path / "missing.gguf", cache_dir=tmp_path / "cache")
    with pytest.raises(UserError, match="does not exist"):
        load_llm(str(tmp_path / "nope"), cache_dir=tmp_path / "cache")
