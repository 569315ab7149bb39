"""``videollm bench chat``: one JSON line with the cost of answering about a video on this machine
(time to first token, tokens/s, decode and encode time, peak RSS) for a saved VideoLLM."""

from __future__ import annotations

import argparse
import json
import sys

import torch

from encoder.errors import run_cli
from videollm.chat import ChatTiming, generate_stream
from videollm.frame_budget import add_arguments as add_frame_arguments
from videollm.frame_budget import auto_frames, frame_cost, peak_rss_mb
from videollm.modeling_videollm import DEFAULT_ALIAS, load_videollm


def parse_args(argv):
    p = argparse.ArgumentParser(prog="videollm bench chat", description=__doc__.split("\n\n")[0])
    p.add_argument("--video", default="bigbuckbunny", help="video file or bundled clip name")
    add_frame_arguments(p, 32)
    p.add_argument("--model", default=DEFAULT_ALIAS, help="a saved VideoLLM directory (default: the shipped model)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--question", default="Describe the video.")
    p.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                   help="answer once before measuring (first-call costs: kernel load, allocator)")
    p.add_argument("--cache-dir", default=None, help="LLM cache (default: $VIDEOMAP_LLM_CACHE or ~/.cache/…)")
    return p.parse_args(argv)


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

    def answer(max_new_tokens) -> ChatTiming:
        timing = ChatTiming()
        for _ in generate_stream(model, processor, args.video, args.question, timing=timing, num_frames=args.frames,
                                 max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens):
            pass
        return timing

    if args.warmup:
        answer(2)
    timing = answer(args.max_new_tokens)
    print(json.dumps({
        "bench": "chat", "model": str(args.model), **model_label(model, processor), "video": args.video,
        "frames": timing.num_frames, "video_tokens": timing.video_tokens, "prompt_tokens": timing.prompt_tokens,
        "new_tokens": timing.new_tokens, "decode_s": round(timing.decode_seconds, 3),
        "encode_s": round(timing.encode_seconds, 3), "time_to_first_token_s": round(timing.time_to_first_token, 3),
        "tokens_per_s": round(timing.tokens_per_second, 2), "peak_rss_mb": round(peak_rss_mb(), 1),
        "threads": torch.get_num_threads(), **({"frames_auto": budget} if budget else {}),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
