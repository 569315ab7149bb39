"""Text replay: the prompts (held-out checks never among them) and the base LLM's own answers."""

import json

import pytest

from encoder.errors import UserError
from videollm.data.text_replay import TEXT_CHECKS, _trim, base_answers, main, replay_prompts


def test_prompts_are_distinct_deterministic_and_never_a_held_out_check():
    prompts = replay_prompts(200, seed=0)
    assert len(prompts) == len(set(prompts)) == 200
    assert prompts == replay_prompts(200, seed=0) and prompts != replay_prompts(200, seed=1)
    held = {q.lower() for q, _ in TEXT_CHECKS}
    assert not held & {p.lower() for p in prompts}
    # nor anything on the checks' topics: capitals, authors, painters
    assert not [p for p in prompts if any(w in p.lower() for w in ("capital", "wrote", "painted", "author"))]
    assert sum("plus" in p or "times" in p for p in prompts) <= 200 // 4  # arithmetic fills up, at most a quarter
    assert not any("{}" in p for p in prompts)
    with pytest.raises(UserError, match="data.text_replay"):
        replay_prompts(1000, seed=0)


def test_a_cut_reply_keeps_its_full_sentences():
    assert _trim("Ice is frozen water. It floats because it is less") == "Ice is frozen water."
    assert _trim("Really? Yes! And then") == "Really? Yes!"
    assert _trim("no sentence ends here") is None
    assert _trim("It covers 149.6 million km. Its depth is 10.9") == "It covers 149.6 million km."


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from videollm.llm import load_llm

    # Shared with test_llm_loading and test_chat_cli: one GGUF dequantization per session.
    return load_llm("smollm2", cache_dir=tmp_path_factory.getbasetemp() / "videomap-llm-cache")


def test_base_answers_are_the_llms_own_greedy_replies_batched_or_not(smollm2):
    model, tok = smollm2
    prompts = ["What is the opposite of 'hot'?", "Hello!"]
    side = tok.padding_side
    batched = base_answers(model, tok, prompts, max_new_tokens=16, batch_size=2)
    single = [base_answers(model, tok, [p], max_new_tokens=16, batch_size=1)[0] for p in prompts]
    assert batched == single  # left padding leaves each reply as it is alone
    assert "cold" in batched[0].lower()
    assert tok.padding_side == side  # the tokenizer is left as it was
    for a in batched:
        assert a is None or (a and not a.endswith(" ") and "<|im_end|>" not in a)


def test_cli_writes_text_only_records(smollm2, tmp_path, tmp_path_factory, capsys):
    from videollm.data.instruct import load_records

    out = tmp_path / "replay.json"
    assert main(["--n", "3", "--seed", "3", "--max-new-tokens", "32", "--out", str(out),
                 "--cache-dir", str(tmp_path_factory.getbasetemp() / "videomap-llm-cache")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["records"] == len(json.loads(out.read_text()))
    records = load_records(out)
    assert 1 <= len(records) <= 3 and all(r.video is None for r in records)
    assert [r.conversations[0]["value"] for r in records] == [
        p for p in replay_prompts(3, seed=3) if p in {r.conversations[0]["value"] for r in records}]
