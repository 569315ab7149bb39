"""``videollm bench chat``: one JSON line with the cost of answering about a video on this machine
(time to first token, tokens/s, decode and encode time, peak RSS) for a saved VideoLLM, and, in the
same run, the decoding speed of its bare base LLM in plain transformers ``generate`` (the anchor).

The anchor decodes the same number of tokens after a prompt of the same length (the video's
placeholders as ordinary tokens), greedy, without a streamer, with SDPA and with eager attention;
the faster of the two is the anchor. Both speeds are measured ``--repeats`` times, ours and the
anchor's in turn, and their medians compared: a shared machine's speed drifts from minute to minute,
and one measurement each can land on either side of a drift. Each of ours is a whole first answer (the
video read from its file, nothing kept from the last answer), so time to first token, decode and
encode times are medians over the same runs. peak_rss_mb is ours alone, read before the anchor's LLM
loads.

``next_turn``: a follow-up question about the same clip (decoded once, as `videollm chat` and the
demo keep it), with the answer in the conversation: the start of its prompt comes from the last
answer's cache (`videollm.decoding.PrefixCache`)."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from encoder.errors import run_cli
from videollm.chat import ChatTiming, generate_stream
from videollm.frame_budget import add_arguments as add_frame_arguments
from videollm.frame_budget import auto_frames, frame_cost, peak_rss_mb
from videollm.llm import load_llm
from videollm.modeling_videollm import DEFAULT_ALIAS, load_videollm


def parse_args(argv):
    p = argparse.ArgumentParser(prog="videollm bench chat", description=__doc__.split("\n\n")[0])
    p.add_argument("--video", default="bigbuckbunny", help="video file or bundled clip name")
    add_frame_arguments(p, 32)
    p.add_argument("--model", default=DEFAULT_ALIAS, help="a saved VideoLLM directory (default: the shipped model)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--question", default="Describe the video.")
    p.add_argument("--follow-up", default="What happens next?",
                   help="a second turn after the answer, timed as next_turn ('' to skip)")
    p.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                   help="answer once before measuring (first-call costs: kernel load, allocator)")
    p.add_argument("--anchor", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the bare base LLM's own generate (the speed-up's anchor)")
    p.add_argument("--repeats", type=int, default=3,
                   help="first answers (ours) and decoding speeds (the bare LLM's) measured this many times each, "
                        "in turn; medians reported (a shared machine's speed drifts from minute to minute)")
    p.add_argument("--cache-dir", default=None, help="LLM cache (default: $VIDEOMAP_LLM_CACHE or ~/.cache/…)")
    return p.parse_args(argv)


def bare_tokens_per_second(llm, input_ids: torch.Tensor, new_tokens: int) -> float:
    """Greedy decoding speed of a plain transformers model: (n − 1) tokens over the time the n-token
    answer takes beyond the 1-token one (which is the prefill)."""
    def run(n):
        start = time.perf_counter()
        with torch.inference_mode():
            llm.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, pad_token_id=llm.generation_config.eos_token_id)
        return time.perf_counter() - start

    run(2)  # warm-up
    first = run(1)
    return (new_tokens - 1) / max(run(new_tokens) - first, 1e-9)


def bare_speeds(llm, ids: torch.Tensor, new_tokens: int) -> dict:
    """The bare LLM's tokens/s with SDPA and with eager attention."""
    runs = {}
    for attention in ("sdpa", "eager"):
        llm.set_attn_implementation(attention)
        runs[attention] = round(bare_tokens_per_second(llm, ids, new_tokens), 2)
    return runs


def anchor_prompt(llm, tokenizer, input_ids: torch.Tensor) -> torch.Tensor:
    """Our prompt for the bare LLM: the video's placeholder rows (ours only) become an ordinary token."""
    filler = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(" the"))[0]
    return input_ids.masked_fill(input_ids >= llm.config.vocab_size, filler)


def model_label(model, processor) -> dict:
    vision = model.config.vision_config
    return {"llm": model.config.base_llm or model.config.text_config.model_type, "lora": model.has_lora,
            "encoder": f"{vision.model_type} (D={vision.embed_dim})", "projector": model.config.projector_type,
            "image_size": processor.image_size}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    model, processor = load_videollm(args.model, num_frames=None if args.frames == "auto" else args.frames,
                                     cache_dir=args.cache_dir)
    budget = None
    if args.frames == "auto":
        args.frames, budget = auto_frames(model, processor, frame_cost(args.model), args.max_memory,
                                          max_new_tokens=args.max_new_tokens, question=args.question)

    def answer(max_new_tokens, video=args.video, conversation=args.question) -> tuple[ChatTiming, str]:
        timing = ChatTiming()
        text = "".join(generate_stream(model, processor, video, conversation, timing=timing, num_frames=args.frames,
                                       max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens))
        return timing, text

    def new_conversation():
        if model.packed_decoder is not None:
            model.packed_decoder.prefix.clear()  # nothing kept from the last answer

    if args.warmup:
        answer(2)
        new_conversation()
    timing, text = answer(args.max_new_tokens)
    with_anchor = args.anchor and model.config.base_llm
    # Decoded once for the next turn (as the chat keeps it) and the anchor's prompt.
    clip = processor.load_video(args.video, num_frames=args.frames) if args.follow_up or with_anchor else None
    next_turn = None
    if args.follow_up:
        turn, _ = answer(args.max_new_tokens, clip, [{"role": "user", "content": args.question},
                                                      {"role": "assistant", "content": text},
                                                      {"role": "user", "content": args.follow_up}])
        next_turn = {"prompt_tokens": turn.prompt_tokens, "encode_s": round(turn.encode_seconds, 3),
                     "time_to_first_token_s": round(turn.time_to_first_token, 3)}
    peak = peak_rss_mb()  # ours alone: the anchor's LLM loads next
    runs = [timing]
    bare = None
    llm = tokenizer = ids = None
    if with_anchor:
        llm, tokenizer = load_llm(model.config.base_llm, cache_dir=args.cache_dir)
        ids = anchor_prompt(llm, tokenizer, processor(args.question, video=clip)["input_ids"])
    by_attention = []
    for r in range(max(1, args.repeats)):
        if r:  # ours again, the first question of a new conversation read from the file, between the anchor's runs
            new_conversation()
            runs.append(answer(args.max_new_tokens)[0])
        if with_anchor:
            by_attention.append(bare_speeds(llm, ids, args.max_new_tokens))
    if with_anchor:
        medians = {a: round(statistics.median(run[a] for run in by_attention), 2) for a in by_attention[0]}
        bare = {"llm": model.config.base_llm, "tokens_per_s": max(medians.values()), "by_attention": medians,
                "runs": by_attention}

    def median(field: str, digits: int = 3) -> float:
        return round(statistics.median(getattr(run, field) for run in runs), digits)

    tokens_per_s = median("tokens_per_second", 2)
    print(json.dumps({
        "bench": "chat", "model": str(args.model), **model_label(model, processor), "video": args.video,
        "frames": timing.num_frames, "video_tokens": timing.video_tokens, "prompt_tokens": timing.prompt_tokens,
        "new_tokens": timing.new_tokens, "decode_s": median("decode_seconds"), "encode_s": median("encode_seconds"),
        "time_to_first_token_s": median("time_to_first_token"),
        "time_to_first_token_runs_s": [round(run.time_to_first_token, 3) for run in runs],
        "tokens_per_s": tokens_per_s, "tokens_per_s_runs": [round(run.tokens_per_second, 2) for run in runs],
        "peak_rss_mb": round(peak, 1),
        "threads": torch.get_num_threads(), "packed_decoder": model.packed_decoder is not None,
        **({"frames_auto": budget} if budget else {}), **({"next_turn": next_turn} if next_turn else {}),
        **({"bare": bare, "decode_speedup": round(tokens_per_s / bare["tokens_per_s"], 2)} if bare else {}),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
