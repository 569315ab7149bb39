"""``videollm demo``: chat with a video in the browser (Gradio Blocks).

One shared model; a queue concurrency group ("model") caps the answers running at once, chat and API
together. Each session keeps its history and decoded clip. API (``gradio_client``)::

    Client(url).predict(handle_file("clip.mp4"), "What happens?", 8, api_name="/answer")  # → str
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from demo.examples import example_clips
from encoder.errors import UserError, VideoReadError, run_cli
from encoder.native import release_thread_pool
from videollm.chat import ChatTiming, generate_stream
from videollm.llm import default_cache_dir
from videollm.modeling_videollm import load_videollm

if TYPE_CHECKING:  # gradio is imported when the app is built, so `videollm demo --help` is instant
    import gradio as gr

logger = logging.getLogger(__name__)

MIN_FRAMES, MAX_FRAMES = 8, 256
THUMBNAIL_SIDE = 192  # a model with larger frames: 256 of them would be slow to send


def error_text(err: BaseException) -> str:
    """What the chat shows for a failed answer (an upload's long temp path shortened to its name)."""
    if isinstance(err, VideoReadError):
        return f"⚠️ cannot read video '{Path(err.path).name}': {err.reason}. Try another file."
    if isinstance(err, UserError):
        return f"⚠️ {err}"
    return f"⚠️ the model failed on this request ({type(err).__name__}: {err}); the demo is still running."


def info_text(timing) -> str:
    return (f"{timing.num_frames} frames · {timing.video_tokens} video tokens · "
            f"decode {timing.decode_seconds:.2f} s · encode {timing.encode_seconds:.2f} s · "
            f"first token {timing.time_to_first_token:.2f} s · {timing.tokens_per_second:.1f} tokens/s · "
            f"{timing.new_tokens} tokens in {timing.total_seconds:.2f} s")


def thumbnails(frames, timestamps: list[float], side: int = THUMBNAIL_SIDE, concepts=None) -> list[tuple]:
    """Gallery items ``(image (h, w, 3) uint8, "#1 · 1.2 s")`` from frames (T, H, W, 3); with
    `concepts` (per frame, [(word, weight), …]: `VideoLLMForCausalLM.video_concepts`) the caption adds
    what the model's tokens say the frame shows ("#1 · 1.2 s · tabby 81%")."""
    images = [Image.fromarray(frame) for frame in frames]  # frame (H, W, 3)
    for image in images:
        image.thumbnail((side, side))
    seen = [""] * len(images)
    if concepts is not None and len(concepts) == len(images):
        seen = [" · " + ", ".join(f"{w} {100 * p:.0f}%" for w, p in frame if p >= 0.05) if frame else ""
                for frame in concepts]
    return [(np.asarray(im), f"#{i + 1} · {t:.1f} s{s.rstrip(' ·')}")
            for i, (im, t, s) in enumerate(zip(images, timestamps, seen))]


def check_frames(num_frames) -> int:
    try:
        if int(num_frames) == num_frames and 1 <= num_frames <= MAX_FRAMES:
            return int(num_frames)
    except (TypeError, ValueError):
        pass
    raise UserError(f"number of frames must be an integer in 1..{MAX_FRAMES}; got {num_frames!r}")


def build_app(model, processor, *, examples=(), default_frames: int = MIN_FRAMES, max_new_tokens: int = 128,
              concurrency: int = 2, queue_size: int = 64, title: str = "VideoMAP-LLM") -> gr.Blocks:
    """The demo around a loaded (model, processor). default_frames / max_new_tokens: initial slider
    values; concurrency: answers generated at once; queue_size: requests waiting beyond that."""
    import gradio as gr

    def respond(video, question, chat, history, cache, num_frames, temperature, top_p, new_tokens):
        """Chat turn: yields (chatbot, question box, gallery, info, chat, history, cache)."""
        question = (question or "").strip()
        chat, history = list(chat or []), list(history or [])
        if not question:
            yield chat, "", gr.skip(), gr.skip(), chat, history, cache
            return
        chat.append({"role": "user", "content": question})
        yield chat, "", gr.skip(), "", chat, history, cache  # echo the question before decoding
        if not video:
            chat.append({"role": "assistant", "content": "Please upload a video or pick an example first."})
            yield chat, "", gr.skip(), "", chat, history, cache
            return
        key = (video, int(num_frames))
        decoded = not (cache and cache.get("key") == key)  # else the session's clip is re-used
        try:
            if decoded:
                loaded = processor.load_video(video, num_frames=key[1])
                # the model's own top concepts per frame (a model with a concept stem)
                concepts = model.video_concepts(loaded.pixel_values.to(model.device), k=2) \
                    if hasattr(model, "video_concepts") else None
                cache = {"key": key, "clip": loaded, "concepts": concepts and concepts[0]}
        except UserError as err:
            chat.append({"role": "assistant", "content": error_text(err)})
            yield chat, "", [], "", chat, history, None
            return
        clip = cache["clip"]
        gallery = thumbnails(processor.frames_seen(clip), clip.timestamps, concepts=cache.get("concepts"))
        release_thread_pool()  # gradio may run the answer in another thread: this one's OpenMP workers would slow it
        yield chat, "", gallery, "", chat, history, cache

        conversation = history + [{"role": "user", "content": question}]
        # The answer that needed the clip decoded carries its cost; later turns re-use the clip.
        timing = ChatTiming(decode_seconds=clip.decode_seconds if decoded else 0.0)
        answer = ""
        try:
            for piece in generate_stream(model, processor, clip, conversation, timing=timing,
                                         max_new_tokens=int(new_tokens), temperature=float(temperature),
                                         top_p=float(top_p)):
                answer += piece
                yield chat + [{"role": "assistant", "content": answer}], gr.skip(), gr.skip(), gr.skip(), \
                    chat, history, cache
        except Exception as err:  # noqa: BLE001 — one failed answer must not take the demo down
            logger.exception("generation failed")
            chat.append({"role": "assistant", "content": (answer + "\n\n" if answer else "") + error_text(err)})
            yield chat, gr.skip(), gr.skip(), "", chat, history, cache
            return
        if not answer:
            answer = "(the model ended its answer without any text)"
        chat.append({"role": "assistant", "content": answer})
        history = conversation + [{"role": "assistant", "content": answer}]
        yield chat, gr.skip(), gr.skip(), info_text(timing), chat, history, cache

    def answer_api(video_file, question, num_frames) -> str:
        """Stateless: one question about one video → the whole answer; errors as `gr.Error`."""
        try:
            if not video_file:
                raise UserError("no video file was given")
            if not (question or "").strip():
                raise UserError("the question is empty")
            return "".join(generate_stream(model, processor, video_file, question.strip(),
                                           num_frames=check_frames(num_frames), max_new_tokens=max_new_tokens,
                                           temperature=0.0))
        except UserError as err:
            raise gr.Error(error_text(err).removeprefix("⚠️ "), print_exception=False) from None

    with gr.Blocks(title=title, analytics_enabled=False) as app:
        scope = getattr(model.config, "scope", None)
        concept_model = bool(getattr(model.config.projector_config, "concepts", None))
        gr.Markdown(f"# {title}\n" + (f"**This model:** {scope}\n\n" if scope else "")
                    + "Ask questions about a video. The answer streams in as it is generated.", elem_id="header")
        chat_state = gr.State([])  # what the chatbot shows (errors included)
        history_state = gr.State([])  # what the model sees: user/assistant turns only
        clip_state = gr.State(None)  # {"key": (path, frames), "clip": VideoInputs}
        with gr.Row():
            with gr.Column(scale=2):
                video = gr.Video(label="Video", sources=["upload"], include_audio=True, elem_id="video")
                question = gr.Textbox(placeholder="Ask about the video and press Enter", show_label=False,
                                      scale=5, elem_id="question", submit_btn=False, render=False)
                if examples:
                    gr.Examples([[str(e.path), e.question] for e in examples], inputs=[video, question],
                                example_labels=[e.name for e in examples], label="Example clips")
                frames = gr.Slider(MIN_FRAMES, MAX_FRAMES, value=max(MIN_FRAMES, min(MAX_FRAMES, default_frames)),
                                   step=1, label="Frames sampled (uniformly)", elem_id="frames")
                with gr.Accordion("Generation", open=False):
                    temperature = gr.Slider(0.0, 1.5, value=0.0, step=0.05, label="Temperature (0 = greedy)")
                    top_p = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="Top-p (with temperature > 0)")
                    new_tokens = gr.Slider(1, 1024, value=max_new_tokens, step=1, label="Max new tokens")
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="Chat", height=420, elem_id="chatbot", buttons=["copy"])
                with gr.Row():
                    question.render()
                    send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
                with gr.Row():
                    clear_btn = gr.Button("Clear chat", elem_id="clear")
                info = gr.Markdown("", elem_id="info")
        gallery = gr.Gallery(label="Sampled frames as the model sees them (timestamp in the caption"
                             + ("; what the model sees in each, with its weight)" if concept_model else ")"),
                             columns=8, height=260,
                             elem_id="gallery", interactive=False)

        turn = dict(fn=respond,
                    inputs=[video, question, chat_state, history_state, clip_state, frames, temperature, top_p,
                            new_tokens],
                    outputs=[chatbot, question, gallery, info, chat_state, history_state, clip_state],
                    concurrency_limit=concurrency, concurrency_id="model", api_visibility="private")
        turns = [question.submit(**turn), send.click(**turn)]
        # Clearing stops an answer still streaming, or it would refill the chat.
        cleared = [chatbot, question, gallery, info, chat_state, history_state, clip_state]
        for clearing in (clear_btn.click, chatbot.clear):  # the button and the chatbot's trash icon
            clearing(lambda: ([], "", [], "", [], [], None), outputs=cleared, queue=False, api_visibility="private",
                     cancels=turns)
        # A conversation is about one video: a new one starts afresh (an example's question is kept).
        video.change(lambda: ([], [], "", [], [], None), queue=False, api_visibility="private",
                     outputs=[chatbot, gallery, info, chat_state, history_state, clip_state])

        # The stateless API: hidden components, no UI.
        api_inputs = [gr.File(visible=False, file_types=None), gr.Textbox(visible=False),
                      gr.Number(value=default_frames, precision=0, visible=False)]
        gr.Button(visible=False).click(answer_api, inputs=api_inputs, outputs=gr.Textbox(visible=False),
                                       api_name="answer", concurrency_limit=concurrency, concurrency_id="model")
    app.queue(max_size=queue_size, default_concurrency_limit=concurrency)
    app.allowed_example_paths = sorted({str(Path(e.path).resolve().parent) for e in examples})
    return app


def launch(app: gr.Blocks, *, host: str = "127.0.0.1", port: int | None = None, share: bool = False,
           max_file_size: str | int | None = "200mb", block: bool = True):
    """Start serving; returns ``(local_url, share_url)``. ``block=False`` returns at once (tests)."""
    _, local_url, share_url = app.launch(
        server_name=host, server_port=port, share=share, max_file_size=max_file_size,
        allowed_paths=getattr(app, "allowed_example_paths", []), prevent_thread_lock=True,
        quiet=True, ssr_mode=False, show_error=True, footer_links=["api"])
    print(f"VideoMAP-LLM demo running on {local_url}" + (f" (public: {share_url})" if share_url else ""), flush=True)
    if block:
        try:
            app.block_thread()
        finally:
            app.close()
    return local_url, share_url


def check_port(host: str, port: int) -> None:
    """UserError when ``host:port`` cannot be bound (taken, or not an address of this machine)."""
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as err:
        raise UserError(f"cannot serve on {host}:{port}: {err.strerror or err}; pick another --port "
                        "(or --host)") from None


def parse_args(argv):
    p = argparse.ArgumentParser(prog="videollm demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default", help="a saved VideoLLM directory, or 'default' (the shipped model)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (needs network)")
    p.add_argument("--max-file-size", default="200mb", help="largest accepted upload, e.g. 200mb, 1gb (default 200mb)")
    p.add_argument("--concurrency", type=int, default=2, help="answers generated at the same time (default 2)")
    p.add_argument("--frames", type=int, default=MIN_FRAMES,
                   help=f"initial frame count, {MIN_FRAMES}..{MAX_FRAMES} (default {MIN_FRAMES})")
    p.add_argument("--max-new-tokens", type=int, default=128, help="initial answer length limit (default 128)")
    p.add_argument("--no-examples", action="store_true", help="do not list example clips")
    p.add_argument("--cache-dir", help="LLM cache (default: $VIDEOMAP_LLM_CACHE or ~/.cache/videomap-llm/llm); "
                   "the synthetic example clips go to its sibling 'demo_examples'")
    args = p.parse_args(argv)
    for ok, message in ((args.concurrency >= 1, "--concurrency must be >= 1"),
                        (MIN_FRAMES <= args.frames <= MAX_FRAMES, f"--frames must be in {MIN_FRAMES}..{MAX_FRAMES}"),
                        (1 <= args.port <= 65535, "--port must be in 1..65535")):
        if not ok:
            p.error(message)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    t0 = time.perf_counter()
    check_port(args.host, args.port)  # fail in a second, not after loading the model
    cache_dir = Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir()
    examples = [] if args.no_examples else example_clips(cache_dir.parent / "demo_examples")
    print("loading the model…", flush=True)
    model, processor = load_videollm(args.model, num_frames=args.frames, cache_dir=cache_dir)
    app = build_app(model, processor, examples=examples, default_frames=args.frames,
                    max_new_tokens=args.max_new_tokens, concurrency=args.concurrency)
    try:
        launch(app, host=args.host, port=args.port, share=args.share, max_file_size=args.max_file_size,
               block=False)
    except OSError as err:  # the port is taken, or the host is not an address of this machine
        raise UserError(f"cannot serve on {args.host}:{args.port}: {err}; pick another --port") from None
    print(f"ready in {time.perf_counter() - t0:.1f} s; Ctrl+C stops it", flush=True)
    try:
        app.block_thread()
    finally:
        app.close()
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
