"""``videollm chat VIDEO ["question"]``: ask about a video, the answer streamed to stdout; without a
question an interactive multi-turn chat (``/reset``, ``/quit``); ``--no-video``: the LLM alone.

The one inference path for chat, demo, eval and bench: the video is decoded once, the processor builds
the inputs, ``model.generate(**inputs, streamer=…)`` answers; each cost is timed where it happens.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from dataclasses import asdict, dataclass

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from encoder.errors import run_cli
from encoder.native import release_thread_pool
from encoder.video_io import probe_video
from videollm.frame_budget import add_arguments as add_frame_arguments
from videollm.frame_budget import auto_frames, frame_cost
from videollm.modeling_videollm import load_videollm
from videollm.processing_videollm import VideoInputs


@dataclass
class ChatTiming:
    """What one answer cost, filled in by `generate_stream` (a caller that decoded the clip sets decode_seconds)."""

    num_frames: int = 0
    video_tokens: int = 0
    prompt_tokens: int = 0
    new_tokens: int = 0
    decode_seconds: float = 0.0  # reading + resizing the video (0: a decoded clip re-used)
    encode_seconds: float = 0.0  # encoder + projector (timed in get_video_features)
    time_to_first_token: float = 0.0
    tokens_per_second: float = 0.0  # new tokens after the first / time after the first
    total_seconds: float = 0.0


class _TimedStreamer(TextIteratorStreamer):
    """Records when the first generated token arrives, even if it decodes to no text (e.g. EOS)."""

    first_token_at = None

    def put(self, value):
        if not self.next_tokens_are_prompt and self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        super().put(value)


class _StopWhenSet(StoppingCriteria):
    """Ends generation at the next token once `event` is set (a client that went away)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool)


def generate_stream(model, processor, video, conversation, *, timing: ChatTiming | None = None,
                    max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                    num_frames: int | None = None, min_new_tokens: int | None = None,
                    stop: threading.Event | None = None):
    """Yield the answer as text pieces while ``model.generate`` runs. video: what `processor.load_video`
    takes, or None. conversation: turns ending with the user's question, or a string (one user turn).
    temperature 0 is greedy. min_new_tokens: no end-of-sequence before that many tokens (benchmarks).
    stop: generation ends at the next token once it is set."""
    timing = timing if timing is not None else ChatTiming()
    t0 = time.perf_counter()
    decoded_before = timing.decode_seconds if isinstance(video, VideoInputs) else 0.0
    clip = None
    if video is not None:
        clip = processor.load_video(video, num_frames=num_frames)
        timing.decode_seconds = decoded_before or (0.0 if clip is video else clip.decode_seconds)
        T, H, W = clip.pixel_values.shape[2:]  # (1, 3, T, S, S)
        timing.num_frames, timing.video_tokens = T, processor.config.num_video_tokens(T, H, W)
    inputs = processor(conversation, video=clip)
    timing.prompt_tokens = inputs["input_ids"].shape[1]

    streamer = _TimedStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    gen = dict(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, streamer=streamer,
               pad_token_id=model.generation_config.pad_token_id)
    if stop is not None:
        gen["stopping_criteria"] = StoppingCriteriaList([_StopWhenSet(stop)])
    if temperature and temperature > 0:
        gen.update(do_sample=True, temperature=temperature, top_p=top_p)
    else:
        gen.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    result: dict = {}
    model.video_encode_seconds = 0.0

    def run():
        try:
            with torch.inference_mode():
                result["ids"] = model.generate(**inputs, **gen)
        except BaseException as err:  # surfaced in the caller's thread below
            result["error"] = err
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    release_thread_pool()  # the answer's thread gets the cores' OpenMP workers to itself
    thread.start()
    for piece in streamer:
        if piece:
            yield piece
    thread.join()
    if "error" in result:
        raise result["error"]
    end_t = time.perf_counter()
    timing.encode_seconds = model.video_encode_seconds if clip is not None else 0.0
    timing.new_tokens = result["ids"].shape[1] - inputs["input_ids"].shape[1]  # (1, L + new)
    timing.total_seconds = end_t - t0 + decoded_before
    first = streamer.first_token_at
    if first is not None:
        timing.time_to_first_token = first - t0 + decoded_before
        if timing.new_tokens > 1 and end_t > first:
            timing.tokens_per_second = (timing.new_tokens - 1) / (end_t - first)


def continuation_logprobs(model, processor, video, conversation, continuations: list[str]) -> list[tuple[float, bool]]:
    """Per continuation (e.g. an option), as the start of the reply to ``conversation``: (sum of its
    tokens' log-probabilities, whether greedy decoding gives exactly those tokens). Same inputs as
    `generate_stream`; the context runs once. A continuation is tokenised alone, leading space stripped."""
    clip = processor.load_video(video) if video is not None else None
    inputs = processor(conversation, video=clip)  # ends with the assistant prefix
    with torch.inference_mode():
        # The context runs once; each continuation runs on its KV cache, cropped back after it.
        out = model(**inputs, use_cache=True, logits_to_keep=1)
        cache, first = out.past_key_values, out.logits[0, -1:]  # first: (1, V), predicts the reply's first token
        results = []
        for text in continuations:
            cont = processor.tokenizer(text.lstrip(), add_special_tokens=False, return_tensors="pt")["input_ids"]  # (1, C)
            if cont.shape[1] == 0:
                raise ValueError(f"continuation {text!r} has no tokens")
            logits = first
            if cont.shape[1] > 1:
                rest = model(input_ids=cont[:, :-1], past_key_values=cache, use_cache=True).logits[0]  # (C-1, V)
                cache.crop(-(cont.shape[1] - 1))  # negative: drop that many tokens (back to L)
                logits = torch.cat([first, rest])
            logprobs = torch.log_softmax(logits.float(), dim=-1)  # (C, V): row i predicts cont[i]
            picked = logprobs.gather(1, cont[0, :, None])[:, 0]  # (C,)
            results.append((float(picked.sum()), bool((logprobs.argmax(-1) == cont[0]).all())))
    return results


def parse_args(argv):
    p = argparse.ArgumentParser(prog="videollm chat", description=__doc__.split("\n\n")[0])
    p.add_argument("video", nargs="?", help="video file or a bundled clip name (bigbuckbunny, bikes, …)")
    p.add_argument("question", nargs="?", help="a question; omit it for an interactive chat")
    p.add_argument("--no-video", action="store_true", help="talk to the LLM alone (the positional is the question)")
    p.add_argument("--model", default="default", help="a saved VideoLLM directory, or 'default' (the shipped model)")
    add_frame_arguments(p, 8)
    p.add_argument("--start", type=float, default=None, help="first second of the video to use")
    p.add_argument("--end", type=float, default=None, help="last second of the video to use")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--time-line", action=argparse.BooleanOptionalAction, default=True,
                   help="tell the model the video length and frame timestamps (default on)")
    p.add_argument("--timing", action="store_true", help="print timing as JSON on stderr after each answer")
    p.add_argument("--cache-dir", help="LLM cache (default: $VIDEOMAP_LLM_CACHE or ~/.cache/videomap-llm/llm)")
    args = p.parse_args(argv)
    if args.no_video:
        if args.question is not None:
            p.error("with --no-video give only the question")
        args.question, args.video = args.video, None
    elif args.video is None:
        p.error("give a VIDEO (or --no-video)")
    if args.max_memory is not None and args.frames != "auto":
        p.error("--max-memory goes with --frames auto")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    auto = args.frames == "auto" and args.video is not None
    if args.video is not None:  # a bad file or window fails before the model loads (auto: any count checks it)
        probe_video(args.video, num_frames=1 if auto else args.frames, start=args.start, end=args.end)
    model, processor = load_videollm(args.model, num_frames=None if args.frames == "auto" else args.frames,
                                     use_time_line=args.time_line, cache_dir=args.cache_dir)
    frames = args.frames
    if auto:  # the most frames that fit the memory budget and the LLM's context
        frames, why = auto_frames(model, processor, frame_cost(args.model), args.max_memory,
                                  max_new_tokens=args.max_new_tokens)
        limit = min(((why["by_memory"], f"{why['max_memory_mb']} MB of memory"), (why["by_context"], "the LLM's context"),
                     (why["by_model"] or 10**9, "the longest clip the model was checked on")))[1]
        print(f"note: --frames auto: {frames} frames ({limit})", file=sys.stderr, flush=True)
    if getattr(model.config, "scope", None):  # what this model can see, once, apart from the answers
        print(f"note: {model.config.scope}", file=sys.stderr, flush=True)
    clip = None  # decoded and resized once, re-used by every turn
    if args.video is not None:
        clip = processor.load_video(args.video, num_frames=frames, start=args.start, end=args.end)
    decode_cost = clip.decode_seconds if clip is not None else 0.0  # the first answer's

    def answer(conversation) -> str:
        nonlocal decode_cost
        timing, decode_cost = ChatTiming(decode_seconds=decode_cost), 0.0
        pieces = []
        for piece in generate_stream(model, processor, clip, conversation, timing=timing,
                                     max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                     top_p=args.top_p):
            pieces.append(piece)
            print(piece, end="", flush=True)
        print(flush=True)
        if args.timing:
            print(json.dumps(asdict(timing)), file=sys.stderr)
        return "".join(pieces)

    if args.question is not None:
        answer([{"role": "user", "content": args.question}])
        return 0
    interactive = sys.stdin.isatty()
    history: list[dict] = []
    while True:
        try:
            line = input("you> " if interactive else "").strip()
        except EOFError:
            break
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            history = []
            print("(history cleared)")
            continue
        history.append({"role": "user", "content": line})
        if interactive:
            sys.stdout.write("assistant> ")
        history.append({"role": "assistant", "content": answer(history)})
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
