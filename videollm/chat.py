"""``videollm chat VIDEO ["question"]``: ask a question about a video, tokens streamed to stdout.

Without a question: an interactive multi-turn chat (history kept; ``/reset`` clears it, ``/quit``
or end of input leaves). ``--no-video`` talks to the LLM alone. `generate_stream` is the engine,
shared with the Gradio demo: it yields text pieces and fills a `ChatTiming`.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from dataclasses import asdict, dataclass

from encoder.errors import run_cli

UNTRAINED_NOTICE = ("note: no trained VideoLLM weights are installed; using a randomly initialised nano "
                    "encoder + projector on smollm2, so answers do not reflect the video")


@dataclass
class ChatTiming:
    """What one answer cost. Filled in while `generate_stream` runs; complete when it ends."""

    num_frames: int = 0
    video_tokens: int = 0
    prompt_tokens: int = 0
    new_tokens: int = 0
    decode_seconds: float = 0.0  # reading + resizing the video
    encode_seconds: float = 0.0  # encoder + projector
    time_to_first_token: float = 0.0  # from the call to the first generated token, all of the above included
    tokens_per_second: float = 0.0  # new tokens after the first / time after the first
    total_seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def generate_stream(model, processor, video, conversation, *, timing: ChatTiming | None = None,
                    max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                    num_frames: int | None = None, start: float | None = None, end: float | None = None,
                    min_new_tokens: int | None = None):
    """Yield the answer to ``conversation`` as text pieces, streamed while the model generates.

    video: a path, a bundled clip name, uint8 frames (T, H, W, 3), a `VideoInputs` (re-use a decoded
        clip across turns), or None for text only.
    conversation: chat messages or LLaVA-layout turns ending with the user's question; a string is
        one user turn. The video attaches to the ``<video>`` marker, or before the first user turn.
    temperature 0 is greedy decoding. ``timing`` (a `ChatTiming`) is filled in as it goes.
    min_new_tokens: suppress end-of-sequence before that many tokens (benchmarks).
    """
    import torch
    from transformers import TextIteratorStreamer

    timing = timing if timing is not None else ChatTiming()
    t0 = time.perf_counter()
    if isinstance(conversation, str):
        conversation = [{"role": "user", "content": conversation}]
    clip = None
    if video is not None:
        clip = processor.load_video(video, num_frames=num_frames, start=start, end=end)
        timing.num_frames = clip.num_frames
        timing.video_tokens = processor.num_video_tokens(clip)
    timing.decode_seconds = time.perf_counter() - t0
    inputs = processor(conversation, video=clip)
    input_ids = inputs["input_ids"]  # (1, L)
    timing.prompt_tokens = input_ids.shape[1]

    embeds_kwargs = {"input_ids": input_ids}
    if clip is not None:
        # Encode here rather than inside generate() so the encoder's cost is measured on its own;
        # the LLM then prefills from inputs_embeds and decodes with its KV cache.
        t = time.perf_counter()
        with torch.inference_mode():
            embeds, _ = model.embed_inputs(input_ids, clip.pixel_values)  # (1, L, D_llm)
        timing.encode_seconds = time.perf_counter() - t
        embeds_kwargs = {"input_ids": input_ids, "inputs_embeds": embeds}

    class _TimedStreamer(TextIteratorStreamer):
        # Records when the first generated token arrives, even if it decodes to no text (e.g. EOS).
        first_token_at = None

        def put(self, value):
            if not self.next_tokens_are_prompt and self.first_token_at is None:
                self.first_token_at = time.perf_counter()
            super().put(value)

    streamer = _TimedStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    gen = dict(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, streamer=streamer, attention_mask=inputs["attention_mask"],
               pad_token_id=model.generation_config.pad_token_id)
    if temperature and temperature > 0:
        gen.update(do_sample=True, temperature=temperature, top_p=top_p)
    else:
        gen.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    result: dict = {}

    def run():
        try:
            with torch.inference_mode():
                result["ids"] = model.language_model.generate(**embeds_kwargs, **gen)
        except BaseException as err:  # surfaced in the caller's thread below
            result["error"] = err
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    for piece in streamer:
        if piece:
            yield piece
    thread.join()
    if "error" in result:
        raise result["error"]
    end_t = time.perf_counter()
    ids = result["ids"]
    timing.new_tokens = ids.shape[1] - (input_ids.shape[1] if ids.shape[1] > input_ids.shape[1]
                                        and torch.equal(ids[0, :input_ids.shape[1]], input_ids[0]) else 0)
    timing.total_seconds = end_t - t0
    first = streamer.first_token_at
    if first is not None:
        timing.time_to_first_token = first - t0
    if first is not None and timing.new_tokens > 1 and end_t > first:
        timing.tokens_per_second = (timing.new_tokens - 1) / (end_t - first)


def continuation_logprobs(model, processor, video, conversation, continuations: list[str]) -> list[tuple[float, bool]]:
    """How likely the model finds each of ``continuations`` as the start of its reply to
    ``conversation``: per continuation, (sum of its tokens' log-probabilities, whether greedy
    decoding would produce exactly those tokens). The video is read and encoded, and the context
    run through the LLM, once.

    video and conversation as in `generate_stream`. A continuation is tokenised on its own, without
    leading whitespace (the reply starts right after the template's assistant prefix).
    """
    import torch

    if isinstance(conversation, str):
        conversation = [{"role": "user", "content": conversation}]
    clip = processor.load_video(video) if video is not None else None
    ctx_ids = processor(conversation, video=clip)["input_ids"]  # (1, L), ends with the assistant prefix
    with torch.inference_mode():
        ctx, _ = model.embed_inputs(ctx_ids, clip.pixel_values if clip is not None else None)  # (1, L, D_llm)
        # The context runs once; each continuation runs on its KV cache, cropped back after it.
        out = model.language_model(inputs_embeds=ctx, use_cache=True, logits_to_keep=1)
        cache, first = out.past_key_values, out.logits[0, -1:]  # first: (1, V), predicts the reply's first token
        results = []
        for text in continuations:
            cont = processor.tokenizer(text.lstrip(), add_special_tokens=False, return_tensors="pt")["input_ids"]  # (1, C)
            if cont.shape[1] == 0:
                raise ValueError(f"continuation {text!r} has no tokens")
            logits = first
            if cont.shape[1] > 1:
                rest = model.language_model(inputs_embeds=model.get_input_embeddings()(cont[:, :-1]),
                                            past_key_values=cache, use_cache=True).logits[0]  # (C-1, V)
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
    p.add_argument("--model", default=None, help="a VideoLLM checkpoint directory (default: the embedded default)")
    p.add_argument("--frames", type=int, default=8, help="frames sampled uniformly from the video (default 8)")
    p.add_argument("--start", type=float, default=None, help="first second of the video to use")
    p.add_argument("--end", type=float, default=None, help="last second of the video to use")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--time-line", action=argparse.BooleanOptionalAction, default=True,
                   help="tell the model the video length and frame timestamps (default on)")
    p.add_argument("--timing", action="store_true", help="print timing as JSON on stderr after each answer")
    p.add_argument("--cache-dir", default=None,
                   help="LLM cache (default: $VIDEOMAP_LLM_CACHE or ~/.cache/videomap-llm/llm)")
    args = p.parse_args(argv)
    if args.no_video:
        if args.question is not None:
            p.error("with --no-video give only the question")
        args.question, args.video = args.video, None
    elif args.video is None:
        p.error("give a VIDEO (or --no-video)")
    if args.frames < 1:
        p.error("--frames must be >= 1")
    return args


def _answer(model, processor, video, conversation, args, out) -> str:
    import json

    timing = ChatTiming()
    pieces = []
    for piece in generate_stream(model, processor, video, conversation, timing=timing,
                                 max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                 top_p=args.top_p, num_frames=args.frames):
        pieces.append(piece)
        out.write(piece)
        out.flush()
    out.write("\n")
    out.flush()
    if args.timing:
        print(json.dumps(timing.to_dict()), file=sys.stderr)
    return "".join(pieces)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from pathlib import Path

    from videollm.llm import default_cache_dir
    from videollm.modeling_videollm import load_videollm

    video = None
    if args.video is not None:
        # Decode first: a bad path fails in a second, before the model loads.
        from encoder.video_io import probe_video

        probe_video(args.video)
        video = args.video
    cache_dir = Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir()
    model, processor = load_videollm(args.model, num_frames=args.frames, use_time_line=args.time_line,
                                     cache_dir=cache_dir)
    processor.use_time_line = args.time_line
    if getattr(model, "vision_untrained", False) and video is not None:
        print(UNTRAINED_NOTICE, file=sys.stderr)
    clip = processor.load_video(video, num_frames=args.frames, start=args.start, end=args.end) if video else None

    if args.question is not None:
        _answer(model, processor, clip, [{"role": "user", "content": args.question}], args, sys.stdout)
        return 0

    interactive = sys.stdin.isatty()
    history: list[dict] = []
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        line = line.strip()
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
        answer = _answer(model, processor, clip, history, args, sys.stdout)
        history.append({"role": "assistant", "content": answer})
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
