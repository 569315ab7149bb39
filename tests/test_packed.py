"""Decoding on packed GGUF weights (videollm.packed, csrc/packed_linear.cpp) and the packed decoder
(videollm.decoding): the blocks give back the weights bit for bit, the kernel matches the dense
reference, and ``generate()`` through the decoder gives transformers' own tokens.

A tiny Llama whose weights are exact GGUF dequantizations (Q4_1 layers, Q8_0 embedding, as the
default LLM's GGUF) stands in for SmolLM2; the shipped model's own replies are pinned by
test_shipped_replies.py, which runs through the same decoder."""

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, TextIteratorStreamer

from videollm.decoding import PackedDecoder
from videollm import packed
from videollm.packed import Q4_1, Q8_0, PackedLinear, load_kernel, pack_language_model, pack_weight, pack_weight_ref

EXT = load_kernel()
pytestmark = pytest.mark.skipif(EXT is None, reason="no C++ compiler for the packed-weight kernel")


def gguf_weight(rows: int, cols: int, kind: int, gen: torch.Generator) -> torch.Tensor:
    """fp32 weights as transformers dequantizes GGUF blocks: d·q + m (Q4_1) or q·d (Q8_0), per 32."""
    nb = cols // 32
    d = (torch.rand(rows, nb, 1, generator=gen) * 0.01 + 1e-3).half().float()
    if kind == Q4_1:
        m = (-torch.rand(rows, nb, 1, generator=gen) * 0.08).half().float()
        q = torch.randint(0, 16, (rows, nb, 32), generator=gen).float()
        q[..., 0], q[..., 1] = 0, 15  # the quantizer puts the block's min at 0 and its max at 15
        w = d * q + m
    else:
        q = torch.randint(-127, 128, (rows, nb, 32), generator=gen).float()
        q[..., 0] = 127
        w = q * d
    return w.reshape(rows, cols)


def gguf_llama(seed: int = 0) -> LlamaForCausalLM:
    """2 layers, width 64, 4 query / 2 key-value heads; every weight an exact GGUF block dequantization."""
    gen = torch.Generator().manual_seed(seed)
    llm = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                                       tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2))
    with torch.no_grad():
        for module in llm.modules():
            if isinstance(module, torch.nn.Linear) and module is not llm.lm_head:
                module.weight.copy_(gguf_weight(*module.weight.shape, Q4_1, gen))
            elif isinstance(module, torch.nn.Embedding):
                module.weight.copy_(gguf_weight(*module.weight.shape, Q8_0, gen))
            elif "RMSNorm" in type(module).__name__:
                module.weight.copy_(1 + 0.1 * torch.randn(module.weight.shape, generator=gen))
    return llm.eval()


@pytest.mark.parametrize("kind", [Q4_1, Q8_0])
def test_blocks_give_back_the_weights_exactly(kind):
    gen = torch.Generator().manual_seed(1)
    w = gguf_weight(200, 96, kind, gen)  # one dense row in 200: under MAX_DENSE_ROWS
    w[7, 5] += 1e-4  # one weight that is no block's dequantization: its row stays dense
    blocks, exact = EXT.pack(w, kind)
    ref_blocks, ref_exact = pack_weight_ref(w, kind)
    assert torch.equal(blocks, ref_blocks) and torch.equal(exact, ref_exact)  # kernel = PyTorch reference
    assert exact.sum() == 199 and not exact[7] and not blocks[7].any()
    packed = pack_weight(w, EXT)
    assert packed.kind == kind and packed.dense_rows.tolist() == [7]
    assert pack_weight(torch.randn(40, 96), EXT) is None  # trained fp32 weights are not blocks
    assert pack_weight(torch.randn(40, 50), EXT) is None  # width not a multiple of 32


@pytest.mark.parametrize("kind", [Q4_1, Q8_0])
def test_packed_linear_matches_the_dense_layer_with_lora(kind, monkeypatch):
    monkeypatch.setattr(packed, "MAX_DENSE_ROWS", 0.05)
    gen = torch.Generator().manual_seed(2)
    w = gguf_weight(37, 64, kind, gen)  # 37 rows: the last group of four is partly padding
    w[3] = torch.randn(64, generator=gen)  # a dense row
    lora_a, lora_b = torch.randn(4, 64, generator=gen), torch.randn(37, 4, generator=gen)
    bias = torch.randn(37, generator=gen)
    layer = PackedLinear(torch.nn.Parameter(w.clone()), torch.nn.Parameter(bias), pack_weight(w, EXT), EXT, lora_a, lora_b,
                         0.5)  # the adapter is merged into its weight in place
    dense = torch.nn.functional.linear
    for rows in (1, 3, 4, 9):  # the kernel up to 4 rows (decoding), the dense path beyond
        x = torch.randn(1, rows, 64, generator=gen)
        with torch.no_grad():
            expected = dense(x, w, bias) + 0.5 * dense(dense(x, lora_a), lora_b)
            got = layer(x)
        assert got.shape == (1, rows, 37)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.forward_ref(x), expected, rtol=1e-5, atol=1e-5)


def test_packing_replaces_block_layers_and_keeps_lora_unmerged():
    from peft import LoraConfig, get_peft_model

    llm = get_peft_model(gguf_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
    for name, p in llm.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # a trained adapter, not peft's zero start
    x = torch.randint(3, 96, (1, 6))
    with torch.no_grad():
        before = llm(input_ids=x).logits
    stats = pack_language_model(llm)
    assert stats == {"packed": 2 * 7 + 1, "dense": 0, "bytes": stats["bytes"]}
    layer = llm.base_model.model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, PackedLinear) and layer.self_attn.q_proj.lora_a.shape == (4, 64)
    assert isinstance(layer.mlp.up_proj, PackedLinear) and layer.mlp.up_proj.lora_a is None
    with torch.no_grad():
        after = llm(input_ids=x).logits  # a prefill: dense path
        last = llm(input_ids=x[:, -1:], past_key_values=llm(input_ids=x[:, :-1], use_cache=True).past_key_values).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last[:, -1], before[:, -1], rtol=1e-4, atol=1e-4)  # a decoding step: the kernel


def test_merging_the_adapter_leaves_tied_weights_and_the_weights_file_alone(tmp_path):
    """The adapter is merged into the dense weight for the prefill: in place, but never into a weight
    another module reads (the LM head tied to the embedding), nor into the file the LLM was loaded from."""
    from peft import LoraConfig, get_peft_model

    gguf_llama().save_pretrained(tmp_path / "llm")
    base = LlamaForCausalLM.from_pretrained(tmp_path / "llm").eval()
    original = {n: p.detach().clone() for n, p in base.named_parameters()}
    llm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"]))
    for name, p in llm.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    x = torch.randint(3, 96, (1, 6))
    with torch.no_grad():
        before = llm(input_ids=x).logits
    pack_language_model(llm)
    model = llm.base_model.model
    assert isinstance(model.lm_head, PackedLinear) and model.lm_head.lora_a is not None
    assert torch.equal(model.model.embed_tokens.weight, original["model.embed_tokens.weight"])  # the tied input side
    q = model.model.layers[0].self_attn.q_proj
    assert not torch.equal(q.weight, original["model.layers.0.self_attn.q_proj.weight"])  # merged
    with torch.no_grad():
        torch.testing.assert_close(llm(input_ids=x).logits, before, rtol=1e-5, atol=1e-4)
    again = LlamaForCausalLM.from_pretrained(tmp_path / "llm")
    for name, p in again.named_parameters():
        assert torch.equal(p, original[name]), name


def test_decoder_steps_match_the_transformers_forward():
    llm = gguf_llama()
    ref = copy.deepcopy(llm)
    pack_language_model(llm)
    decoder, why = PackedDecoder.build(llm)
    assert why is None
    prompt = torch.randint(3, 96, (1, 7))
    with torch.no_grad():
        out = ref(input_ids=prompt, use_cache=True)
        static = decoder.start(out.past_key_values, 7, 16)
        cache = out.past_key_values
        for pos in range(7, 12):
            token = torch.tensor([[(pos * 11) % 90 + 3]])
            expected = ref(input_ids=token, past_key_values=cache, use_cache=True)
            cache = expected.past_key_values
            torch.testing.assert_close(decoder.step(static, token[0], pos), expected.logits[:, -1], rtol=1e-4,
                                       atol=1e-4)


def test_the_steps_norm_attention_and_mlp_functions_match_torch():
    """The kernel's `rms_norm`, `attend` and `silu_mul` against torch on sizes that are no multiple of
    the SIMD width and a context long enough to split heads over threads: RoPE'd keys and values
    land in the cache at pos, and grouped-query attention reads positions 0 … pos only."""
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 70, generator=gen), torch.randn(70, generator=gen)
    torch.testing.assert_close(EXT.rms_norm(x, w, 1e-5), F.rms_norm(x, (70,), w, 1e-5), rtol=1e-5, atol=1e-6)
    g, u = torch.randn(1, 200, generator=gen), torch.randn(1, 200, generator=gen)
    torch.testing.assert_close(EXT.silu_mul(g, u), F.silu(g) * u, rtol=1e-5, atol=1e-6)
    for hd, pos in [(64, 1500), (24, 5)]:
        H, KV, capacity = 6, 2, pos + 9
        cos, sin = torch.randn(capacity, hd, generator=gen), torch.randn(capacity, hd, generator=gen)
        cos_q, sin_q = cos * 0.125, sin * 0.125
        keys, values = torch.randn(KV, capacity, hd, generator=gen), torch.randn(KV, capacity, hd, generator=gen)
        q, k, v = (torch.randn(1, n * hd, generator=gen) for n in (H, KV, KV))
        out_keys, out_values = keys.transpose(1, 2).contiguous(), values.clone()  # keys kept (KV, hd, capacity)
        got = EXT.attend(q, k, v, out_keys, out_values, pos, cos, sin, cos_q, sin_q)

        def rope(t, c, s_):  # x·cos + (halves swapped)·sin, the sign already in sin
            return t * c + torch.cat([t[:, hd // 2:], t[:, :hd // 2]], -1) * s_

        keys[:, pos], values[:, pos] = rope(k.view(KV, hd), cos[pos], sin[pos]), v.view(KV, hd)
        torch.testing.assert_close(out_keys, keys.transpose(1, 2))
        torch.testing.assert_close(out_values, values)
        qr = rope(q.view(H, hd), cos_q[pos], sin_q[pos]).view(KV, H // KV, hd)
        scores = torch.softmax(qr @ keys[:, :pos + 1].transpose(1, 2), -1)  # (KV, g, pos + 1)
        torch.testing.assert_close(got, (scores @ values[:, :pos + 1]).reshape(1, H * hd), rtol=1e-4, atol=1e-5)


def test_decoder_refuses_what_it_does_not_cover():
    llm = gguf_llama()
    assert PackedDecoder.build(llm)[1] == "some of the LLM's weights are not GGUF blocks"  # not packed
    llm.config.model_type = "qwen2"
    assert "covers llama" in PackedDecoder.build(llm)[1]


@pytest.fixture(scope="module")
def videollms():
    """(packed, reference, processor): one tiny VideoLLM on the GGUF-exact Llama with a LoRA adapter."""
    from peft import LoraConfig

    from encoder.videomap import VideoMAPConfig
    from test_demo import tiny_tokenizer
    from videollm.modeling_videollm import build_videollm

    torch.manual_seed(0)
    encoder = VideoMAPConfig.from_preset("nano", embed_dim=32, depth_mamba=2, attn_every=2, num_heads=2,
                                         img_size=32, num_frames=8)
    tokenizer = tiny_tokenizer()
    llm = gguf_llama()
    model, processor = build_videollm((llm, tokenizer), encoder, num_frames=8, projector={"spatial_pool": 2})
    model.add_lora(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.3)
    model.eval()
    model.generation_config.eos_token_id = None  # never stops early: every answer is max_new_tokens long
    ref = copy.deepcopy(model)
    stats = model.pack_for_inference()
    assert stats["decoder"] and stats["packed"] == 2 * 7 + 1
    return model, ref, processor


def _inputs(processor):
    video = torch.randint(0, 255, (8, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    return processor("what moves left", video=processor.load_video(video.numpy()))


def test_generate_through_the_decoder_gives_transformers_tokens(videollms, monkeypatch):
    model, ref, processor = videollms
    inputs = _inputs(processor)
    greedy = dict(max_new_tokens=12, do_sample=False)
    steps = []
    step = model.packed_decoder.step
    monkeypatch.setattr(model.packed_decoder, "step", lambda *a: steps.append(a[2]) or step(*a))
    with torch.no_grad():
        expected = ref.generate(**inputs, **greedy)
        streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True)
        got = model.generate(**inputs, **greedy, streamer=streamer)
    assert torch.equal(got, expected) and got.shape[1] == inputs["input_ids"].shape[1] + 12
    assert steps == list(range(inputs["input_ids"].shape[1], got.shape[1] - 1))  # the decoder made the tokens
    assert "".join(streamer).split() == processor.tokenizer.decode(got[0, inputs["input_ids"].shape[1]:]).split()
    sampled = dict(max_new_tokens=12, do_sample=True, temperature=0.8, top_k=20, top_p=0.9)
    with torch.no_grad():
        torch.manual_seed(5)
        expected = ref.generate(**inputs, **sampled)
        torch.manual_seed(5)
        got = model.generate(**inputs, **sampled)
    assert torch.equal(got, expected)


def test_requests_the_decoder_does_not_cover_run_transformers_own_loop(videollms):
    model, ref, processor = videollms
    inputs = _inputs(processor)
    beams = dict(max_new_tokens=6, do_sample=False, num_beams=2)
    with torch.no_grad():
        assert torch.equal(model.generate(**inputs, **beams), ref.generate(**inputs, **beams))
        scored = model.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                                output_scores=True)
    assert len(scored.scores) == 4


def test_a_packed_model_refuses_to_be_saved_or_merged(videollms, tmp_path):
    model, ref, _ = videollms
    assert model.packed and not ref.packed
    with pytest.raises(ValueError, match="pack=False"):
        model.save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="pack=False"):
        model.merge_lora()


def test_concurrent_generations_keep_their_own_caches(videollms):
    """The demo answers two questions at once: each generate() has its own static cache."""
    import threading

    model, ref, processor = videollms
    inputs = [_inputs(processor), processor("what moves right", video=processor.load_video(
        torch.randint(0, 255, (8, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(4)).numpy()))]
    with torch.no_grad():
        expected = [ref.generate(**x, max_new_tokens=16, do_sample=False) for x in inputs]
    got = [None, None]

    def run(i):
        with torch.no_grad():
            got[i] = model.generate(**inputs[i], max_new_tokens=16, do_sample=False,
                                    streamer=TextIteratorStreamer(processor.tokenizer))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(g, e) for g, e in zip(got, expected))


def test_a_streamed_answer_frees_the_callers_openmp_workers_before_it_starts(videollms, monkeypatch):
    """`generate_stream` answers in a thread of its own: the caller's OpenMP pool is released first
    (`encoder.native.release_thread_pool`), so the answer's thread has the cores' workers to itself."""
    import threading

    from videollm import chat

    model, ref, processor = videollms
    events = []
    generate = model.generate
    monkeypatch.setattr(chat, "release_thread_pool", lambda: events.append(("release", threading.get_ident())))
    monkeypatch.setattr(model, "generate", lambda **kw: events.append(("generate", threading.get_ident()))
                        or generate(**kw))
    list(chat.generate_stream(model, processor, None, "what moves left", max_new_tokens=4))
    (what, caller), (then, answerer) = events
    assert (what, then) == ("release", "generate")
    assert caller == threading.get_ident() and answerer != caller


def test_without_the_kernel_nothing_is_packed_and_generate_is_transformers_own(monkeypatch):
    monkeypatch.setattr(packed, "load_kernel", lambda: None)  # a machine without a C++ compiler
    llm = gguf_llama()
    assert pack_language_model(llm) == {"packed": 0, "dense": 0, "bytes": 0}
    assert not any(isinstance(m, PackedLinear) for m in llm.modules())


def test_the_next_turn_prefills_only_its_new_tokens(videollms, monkeypatch):
    """A chat turn re-sends the conversation: the prompt's start (the video, the last turn) is taken from
    the last answer's cache, only the new tokens run through the model and the encoder does not run;
    the answer is transformers' own on the whole prompt. Another video is never taken from the cache."""
    from videollm import decoding

    model, ref, processor = videollms
    monkeypatch.setattr(decoding, "MIN_REUSE", 8)  # the tiny model's prompts are short
    model.packed_decoder.prefix.clear()
    video = processor.load_video(torch.randint(0, 255, (8, 32, 32, 3), dtype=torch.uint8,
                                               generator=torch.Generator().manual_seed(3)).numpy())
    greedy = dict(max_new_tokens=8, do_sample=False)
    first = processor("what moves left", video=video)
    with torch.no_grad():
        answer = model.generate(**first, **greedy)[0, first["input_ids"].shape[1]:]
    turn2 = [{"role": "user", "content": "what moves left"},
             {"role": "assistant", "content": processor.tokenizer.decode(answer, skip_special_tokens=True)},
             {"role": "user", "content": "and then?"}]
    prefilled, encoded = [], []
    forward, encode = model.forward, model.encode_video
    monkeypatch.setattr(model, "forward", functools.wraps(forward)(
        lambda **kw: prefilled.append(kw["input_ids"].shape[1]) or forward(**kw)))  # generate reads the signature
    monkeypatch.setattr(model, "encode_video", lambda *a, **kw: encoded.append(1) or encode(*a, **kw))
    other = processor.load_video(torch.randint(0, 255, (8, 32, 32, 3), dtype=torch.uint8,
                                               generator=torch.Generator().manual_seed(4)).numpy())
    words = "what moves left what moves left what moves"
    before_video = [{"role": "user", "content": f"{words} left <video> what moves left"}]
    for case, conversation, clip in (("next turn", turn2, video), ("another video", turn2, other),
                                     ("same start", before_video, other),  # cached, then a prompt that differs
                                     ("differs before the video", [{"role": "user", "content": f"{words} right "
                                                                    "<video> what moves left"}], other)):
        inputs = processor(conversation, video=clip)
        prefilled.clear(), encoded.clear()
        with torch.no_grad():
            got = model.generate(**inputs, **greedy)
            expected = ref.generate(**inputs, **greedy)
        assert torch.equal(got, expected), case
        length = inputs["input_ids"].shape[1]
        if case == "next turn":
            assert prefilled[0] < length - first["input_ids"].shape[1] + len(answer) and not encoded, case
        elif case != "same start":
            assert prefilled[0] == length and encoded, case
