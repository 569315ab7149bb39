"""``videollm serve``: the model behind an OpenAI-compatible HTTP API (FastAPI + uvicorn).

    videollm serve [--model DIR] [--host 127.0.0.1] [--port 8000] [--api-key KEY]

- ``GET /v1/models``: the one model served.
- ``POST /v1/chat/completions``: OpenAI's chat format. A message's content is a string or a list of
  parts, ``{"type": "text", "text": …}`` and ``{"type": "video_url", "video_url": {"url": …}}``
  whose url is a local path, a ``file://`` URL or a ``data:video/…;base64,`` URL (nothing is
  downloaded: http(s) URLs are refused), or ``image_url`` parts, which are the frames of one clip
  in order (how lmms-eval's OpenAI-compatible model sends a video). One video per conversation; earlier turns are the history
  (multi-turn is sending it again, as the protocol does). ``max_tokens`` (or
  ``max_completion_tokens``), ``temperature``, ``top_p``, ``seed``, ``stream`` (server-sent events
  ending in ``data: [DONE]``, with ``stream_options.include_usage``) and our own ``num_frames``.
  ``usage`` counts prompt tokens (video placeholders included) and completion tokens.

Requests queue on the one model (one generation at a time); a streaming client that goes away
ends its generation at the next token and frees the model. Errors come in OpenAI's shape with the
status a client expects: 400 a bad request or an unreadable video (the reason named), 401 a missing
or wrong key when ``--api-key`` is set, 404 an unknown model, 413 a body over ``--max-upload-mb``.
The server binds 127.0.0.1 unless told; another address needs ``--api-key`` (or ``--insecure``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import io
import ipaddress
import json
import os
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from PIL import Image

from encoder.errors import UserError, VideoReadError, run_cli
from encoder.native import release_thread_pool
from videollm.chat import ChatTiming, generate_stream
from videollm.configuration_videollm import VIDEO_TOKEN
from videollm.modeling_videollm import DEFAULT_ALIAS, load_videollm


class ApiError(Exception):
    """An error for the client, in OpenAI's shape, with its HTTP status."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             413: "request_too_large", 500: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.TYPES.get(self.status, "error"),
                                       "param": self.param, "code": None}}, status_code=self.status)


def _number(body: dict, key: str, default, *, low: float, high: float | None = None, integer: bool = False):
    value = body.get(key)
    if value is None:
        return default
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok or isinstance(value, bool) or value < low or (high is not None and value > high):
        span = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ApiError(400, f"'{key}' must be {'an integer' if integer else 'a number'} {span}; got {value!r}", key)
    return value


def _data_url(url: str, kind: str, max_bytes: int) -> tuple[str, bytes]:
    """A ``data:<type>;base64,…`` URL → (its media type, its bytes); `kind` names it in errors."""
    head, _, payload = url.partition(",")
    if not head.endswith(";base64") or not payload:
        raise ApiError(400, f"a data: {kind} URL must be base64 (data:{kind}/…;base64,…)", "messages")
    if len(payload) * 3 // 4 > max_bytes:
        raise ApiError(413, f"the {kind} is over the server's {max_bytes // 2**20} MB limit", "messages")
    try:
        return head[5:].split(";")[0], base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"the data: {kind} URL is not valid base64", "messages") from None


def _local_path(url: str, kind: str) -> Path:
    """A local path or ``file://`` URL → the path; anything remote is refused (nothing is downloaded)."""
    parsed = urlparse(url)
    if parsed.scheme in ("http", "https", "ftp", "s3", "gs"):
        raise ApiError(400, f"remote {kind} URLs are not fetched (this server downloads nothing): '{url}'; "
                            f"send a local path, a file:// URL or a data: base64 URL", "messages")
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme and len(parsed.scheme) > 1:  # "c:" is a Windows drive, not a scheme
        raise ApiError(400, f"unsupported {kind} URL scheme '{parsed.scheme}:'", "messages")
    return Path(url).expanduser()


def _video_file(url: str, scratch: Path, max_bytes: int) -> Path:
    """A video_url's url → a local file (data: URLs are written to `scratch`)."""
    if not url.startswith("data:"):
        return _local_path(url, "video")
    media, data = _data_url(url, "video", max_bytes)
    suffix = media.split("/")[-1] if "/" in media else "mp4"
    path = scratch / f"upload.{suffix if suffix.isalnum() else 'mp4'}"
    path.write_bytes(data)
    return path


def _image_bytes(url: str, max_bytes: int) -> bytes:
    """An image_url's url (a data: URL, a local path or a file:// URL) → its bytes."""
    if url.startswith("data:"):
        return _data_url(url, "image", max_bytes)[1]
    path = _local_path(url, "image")
    try:
        return path.read_bytes()
    except OSError as err:
        raise ApiError(400, f"cannot read image '{path}': {err.strerror or err}", "messages") from None


def frames_from_images(images: list[bytes]) -> np.ndarray:
    """image_url parts → the frames of one clip (T, H, W, 3) uint8, in the order they came."""
    frames = []
    for i, data in enumerate(images):
        try:
            with Image.open(io.BytesIO(data)) as img:
                frames.append(np.asarray(img.convert("RGB")))
        except (OSError, ValueError) as err:
            raise ApiError(400, f"image {i + 1} of the clip is not an image ({err})", "messages") from None
    if len({f.shape for f in frames}) > 1:
        raise ApiError(400, "the images of one clip must share one size (they are its frames)", "messages")
    return np.stack(frames)


def parse_messages(messages, scratch: Path, max_bytes: int) -> tuple[list[dict], Path | list[bytes] | None]:
    """OpenAI messages → (our conversation: role + text with one ``<video>`` marker, the video: a file,
    or the bytes of image_url parts, which are the frames of one clip, as lmms-eval sends videos)."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", "messages")
    turns, video, images = [], None, []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise ApiError(400, f"messages[{i}] needs a role of system, user or assistant", "messages")
        content = message.get("content")
        if isinstance(content, str):
            text = content
        elif isinstance(content, list):
            pieces = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    pieces.append(part["text"])
                elif kind == "video_url" and isinstance(part.get("video_url"), dict) \
                        and isinstance(part["video_url"].get("url"), str):
                    if video is not None:
                        raise ApiError(400, "one video per conversation: this one has more than one video_url part",
                                       "messages")
                    video = _video_file(part["video_url"]["url"], scratch, max_bytes)
                    pieces.append(VIDEO_TOKEN)
                elif kind == "image_url" and isinstance(part.get("image_url"), dict) \
                        and isinstance(part["image_url"].get("url"), str):
                    if not images:
                        pieces.append(VIDEO_TOKEN)  # the clip's frames stand where its first image is
                    images.append(_image_bytes(part["image_url"]["url"], max_bytes))
                else:
                    raise ApiError(400, f"messages[{i}].content[{j}]: parts are {{'type': 'text', 'text': …}}, "
                                        "{'type': 'video_url', 'video_url': {'url': …}} or image_url frames",
                                   "messages")
            text = "\n".join(pieces)
        else:
            raise ApiError(400, f"messages[{i}].content must be a string or a list of parts", "messages")
        turns.append({"role": message["role"], "content": text})
    if turns[-1]["role"] != "user":
        raise ApiError(400, "the last message must be the user's", "messages")
    if video is not None and images:
        raise ApiError(400, "one video per conversation: send a video_url or image frames, not both", "messages")
    if sum(len(b) for b in images) > max_bytes:
        raise ApiError(413, f"the images are over the server's {max_bytes // 2**20} MB limit", "messages")
    return turns, images or video


class Server:
    """One model and its queue: `answer` runs one request at a time in a worker thread."""

    def __init__(self, model, processor, model_id: str, api_key: str | None = None, max_upload_mb: int = 100):
        self.model, self.processor, self.model_id = model, processor, model_id
        self.api_key, self.max_bytes = api_key, max_upload_mb * 2**20
        self.lock = threading.Lock()  # one generation at a time on the one model
        self.finished: list[int] = []  # new tokens of each finished generation, in order (tests read it)

    def check(self, request: Request, body: dict) -> None:
        if self.api_key is not None and request.headers.get("authorization") != f"Bearer {self.api_key}":
            raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')")
        name = body.get("model")
        if name is not None and name not in (self.model_id, DEFAULT_ALIAS):
            raise ApiError(404, f"model '{name}' does not exist here; GET /v1/models lists '{self.model_id}'", "model")

    def settings(self, body: dict) -> dict:
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        return {"max_new_tokens": _number({"max_tokens": max_tokens}, "max_tokens", 256, low=1, high=4096, integer=True),
                "temperature": float(_number(body, "temperature", 0.0, low=0, high=2)),
                "top_p": float(_number(body, "top_p", 1.0, low=0, high=1)),
                "num_frames": _number(body, "num_frames", None, low=1, high=4096, integer=True)}

    def prepare(self, body: dict, scratch: Path):
        """(conversation, decoded video or None, generation settings); the video is read here, so a
        bad one is a 400 before any answer starts."""
        conversation, path = parse_messages(body.get("messages"), scratch, self.max_bytes)
        settings = self.settings(body)
        clip = None
        try:
            if isinstance(path, list):
                clip = self.processor.load_video(frames_from_images(path))
            elif path is not None:
                try:
                    clip = self.processor.load_video(str(path), num_frames=settings["num_frames"])
                except VideoReadError as err:
                    raise ApiError(400, f"cannot read the video: {err.reason}", "messages") from None
        finally:
            release_thread_pool()  # the answer runs in another thread: this one's OpenMP workers would slow it
        return conversation, clip, settings

    def run(self, conversation, clip, settings, seed, stop: threading.Event, on_piece=None) -> tuple[str, ChatTiming]:
        timing, pieces = ChatTiming(), []
        with self.lock:
            if seed is not None:
                torch.manual_seed(seed)
            for piece in generate_stream(self.model, self.processor, clip, conversation, timing=timing, stop=stop,
                                         **{k: v for k, v in settings.items() if k != "num_frames"}):
                pieces.append(piece)
                if on_piece is not None:
                    on_piece(piece)
            self.finished.append(timing.new_tokens)
        return "".join(pieces), timing

    def usage(self, timing: ChatTiming) -> dict:
        return {"prompt_tokens": timing.prompt_tokens, "completion_tokens": timing.new_tokens,
                "total_tokens": timing.prompt_tokens + timing.new_tokens}

    @staticmethod
    def finish_reason(timing: ChatTiming, settings: dict) -> str:
        return "length" if timing.new_tokens >= settings["max_new_tokens"] else "stop"


def build_app(model, processor, model_id: str = DEFAULT_ALIAS, api_key: str | None = None,
              max_upload_mb: int = 100) -> FastAPI:
    server = Server(model, processor, model_id, api_key, max_upload_mb)
    app = FastAPI(title="VideoMAP-LLM", docs_url=None, redoc_url=None)
    app.state.server = server

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError):
        return err.response()

    @app.get("/")
    async def root():
        return {"object": "videollm.server", "model": model_id, "api": "/v1 (OpenAI chat completions)"}

    @app.get("/v1/models")
    async def models(request: Request):
        server.check(request, {})
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0,
                                            "owned_by": "videomap-llm"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        if int(request.headers.get("content-length") or 0) > server.max_bytes * 4 // 3 + 2**20:
            raise ApiError(413, f"the request is over the server's {max_upload_mb} MB upload limit")
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        server.check(request, body)
        seed = _number(body, "seed", None, low=0, integer=True)
        stream = bool(body.get("stream", False))
        include_usage = bool((body.get("stream_options") or {}).get("include_usage")) if stream else False
        with tempfile.TemporaryDirectory(prefix="videollm-serve-") as scratch:  # gone once the clip is decoded
            conversation, clip, settings = await asyncio.to_thread(server.prepare, body, Path(scratch))
        reply_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        stop = threading.Event()
        if not stream:
            try:
                text, timing = await asyncio.to_thread(server.run, conversation, clip, settings, seed, stop)
            finally:
                stop.set()
            return {"id": reply_id, "object": "chat.completion", "created": created, "model": model_id,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": server.finish_reason(timing, settings)}],
                    "usage": server.usage(timing)}

        def chunk(delta: dict, finish: str | None = None, usage: dict | None = None) -> str:
            data = {"id": reply_id, "object": "chat.completion.chunk", "created": created, "model": model_id,
                    "choices": [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish}]}
            if usage:
                data["usage"] = usage
            return f"data: {json.dumps(data)}\n\n"

        async def events():
            loop, queue = asyncio.get_running_loop(), asyncio.Queue()
            worker = loop.run_in_executor(None, lambda: server.run(
                conversation, clip, settings, seed, stop,
                on_piece=lambda p: loop.call_soon_threadsafe(queue.put_nowait, p)))
            worker.add_done_callback(lambda _: loop.call_soon_threadsafe(queue.put_nowait, None))
            try:
                yield chunk({"role": "assistant", "content": ""})
                while (piece := await queue.get()) is not None:
                    yield chunk({"content": piece})
                _, timing = await worker
                yield chunk({}, server.finish_reason(timing, settings))
                if include_usage:
                    yield chunk({}, usage=server.usage(timing))
                yield "data: [DONE]\n\n"
            finally:
                stop.set()  # a client that went away ends the generation at the next token

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_args(argv):
    p = argparse.ArgumentParser(prog="videollm serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_ALIAS, help="a saved VideoLLM directory, or 'default' (the shipped model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("VIDEOLLM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $VIDEOLLM_API_KEY, else none)")
    p.add_argument("--insecure", action="store_true", help="allow binding a non-loopback address without --api-key")
    p.add_argument("--max-upload-mb", type=int, default=100, help="largest video a request may carry (default 100)")
    p.add_argument("--cache-dir", help="LLM cache (default: $VIDEOMAP_LLM_CACHE or ~/.cache/videomap-llm/llm)")
    args = p.parse_args(argv)
    if not 1 <= args.port <= 65535:
        p.error("--port must be in 1..65535")
    if args.max_upload_mb < 1:
        p.error("--max-upload-mb must be >= 1")
    if not _is_loopback(args.host) and not args.api_key and not args.insecure:
        raise UserError(f"refusing to serve on {args.host} without --api-key: anyone who can reach it could use "
                        "the model; pass --api-key KEY (or --insecure to do it anyway)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    print("loading the model…", flush=True)
    model, processor = load_videollm(args.model, cache_dir=args.cache_dir)
    model_id = DEFAULT_ALIAS if args.model == DEFAULT_ALIAS else Path(args.model).name
    app = build_app(model, processor, model_id, args.api_key, args.max_upload_mb)
    print(f"serving '{model_id}' on http://{args.host}:{args.port}/v1 (OpenAI chat completions); Ctrl+C stops it",
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
