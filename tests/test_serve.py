"""``videollm serve``: the OpenAI-compatible API, driven by the real ``openai`` client against a running
server (uvicorn in a thread): the shipped default answers a video_url, plain and streamed, with usage;
multi-turn, bad videos, keys, unknown models, size limits, concurrent clients, a client that leaves."""

import base64
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import uvicorn

from demo.serve import build_app, main as serve_main
from encoder.errors import UserError
from encoder.video_io import resolve_video
from test_demo import tiny_videollm
from training.recipe import free_port

CLIP = resolve_video("carphone_distorted")  # 7 kB: small enough for a data: URL


def _video_part(url: str) -> dict:
    return {"type": "video_url", "video_url": {"url": url}}


def _ask(text: str, url: str | None = None) -> list[dict]:
    parts = ([_video_part(url)] if url else []) + [{"type": "text", "text": text}]
    return [{"role": "user", "content": parts}]


class Running:
    """A uvicorn server for `app` on a free port, in a thread, until `stop`."""

    def __init__(self, app):
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def client(self, key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key=key, max_retries=0, timeout=300)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def shipped():
    from videollm.modeling_videollm import load_videollm

    model, processor = load_videollm("default", num_frames=8)
    running = Running(build_app(model, processor))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def tiny():
    model, processor = tiny_videollm()
    running = Running(build_app(model, processor, model_id="tiny", api_key="sekret", max_upload_mb=1))
    yield running
    running.stop()


def test_the_shipped_model_answers_a_video_plain_and_streamed(shipped):
    client = shipped.client()
    assert [m.id for m in client.models.list()] == ["default"]
    data_url = "data:video/mp4;base64," + base64.b64encode(CLIP.read_bytes()).decode()
    reply = client.chat.completions.create(model="default", messages=_ask("What is in the video?", data_url),
                                           max_tokens=24, temperature=0)
    text = reply.choices[0].message.content
    assert text.strip() and reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens > 32 and 0 < reply.usage.completion_tokens <= 24  # 8 frames' video tokens
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    stream = client.chat.completions.create(model="default", messages=_ask("What is in the video?", str(CLIP)),
                                            max_tokens=24, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text  # greedy: the same answer, whether the video came as a path or a data: URL
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reply.choices[0].finish_reason


def test_multi_turn_sends_the_history(shipped):
    client = shipped.client()
    first = _ask("What is in the video?", CLIP.as_uri())
    answer = client.chat.completions.create(model="default", messages=first, max_tokens=16).choices[0].message.content
    history = first + [{"role": "assistant", "content": answer}, {"role": "user", "content": "Say it in one word."}]
    reply = client.chat.completions.create(model="default", messages=history, max_tokens=8)
    assert reply.choices[0].message.content.strip()
    assert reply.usage.prompt_tokens > client.chat.completions.create(
        model="default", messages=first, max_tokens=1).usage.prompt_tokens  # the history is in the prompt


def test_bad_requests_get_400_with_the_reason_and_the_server_keeps_serving(tiny, tmp_path):
    client = tiny.client("sekret")
    not_video = tmp_path / "notes.mp4"
    not_video.write_text("this is not a video")
    cases = [(_ask("what?", str(not_video)), "cannot read the video"),
             (_ask("what?", "https://example.com/a.mp4"), "not fetched"),
             (_ask("what?", "data:video/mp4;base64,@@@"), "base64"),
             ([{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "x"}}]}], "parts are"),
             ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "nowhere.png"}}]}],
              "cannot read image"),
             ([{"role": "assistant", "content": "hi"}], "last message")]
    for messages, reason in cases:
        with pytest.raises(openai.BadRequestError, match=reason) as err:
            client.chat.completions.create(model="tiny", messages=messages, max_tokens=4)
        assert err.value.status_code == 400 and err.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model="tiny", messages=_ask("what?"), max_tokens=0)
    reply = client.chat.completions.create(model="tiny", messages=_ask("what moves?", str(CLIP)), max_tokens=4)
    assert reply.usage.completion_tokens == 4  # still serving


def test_keys_models_and_size_limits(tiny):
    with pytest.raises(openai.AuthenticationError) as err:
        tiny.client("wrong").chat.completions.create(model="tiny", messages=_ask("what?"), max_tokens=2)
    assert err.value.status_code == 401
    with pytest.raises(openai.AuthenticationError):
        tiny.client("wrong").models.list()
    client = tiny.client("sekret")
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4o", messages=_ask("what?"), max_tokens=2)
    assert err.value.status_code == 404 and "GET /v1/models" in err.value.message
    big = "data:video/mp4;base64," + base64.b64encode(b"\0" * (2 * 2**20)).decode()  # 2 MB > the 1 MB limit
    with pytest.raises(openai.APIStatusError) as err:
        client.chat.completions.create(model="tiny", messages=_ask("what?", big), max_tokens=2)
    assert err.value.status_code == 413


def test_five_concurrent_clients_are_all_answered(tiny):
    def ask(i):
        client = tiny.client("sekret")
        return client.chat.completions.create(model="tiny", messages=_ask(f"what moves {i}?", str(CLIP)),
                                              max_tokens=6, seed=i, temperature=0.7)

    with ThreadPoolExecutor(5) as pool:
        replies = list(pool.map(ask, range(5)))
    assert all(r.usage.completion_tokens == 6 and r.choices[0].message.content for r in replies)


def test_a_client_that_leaves_mid_stream_frees_the_model(tiny):
    body = {"model": "tiny", "messages": _ask("what moves?", str(CLIP)), "max_tokens": 4000, "stream": True}
    headers = {"Authorization": "Bearer sekret"}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{tiny.url}/chat/completions", json=body, headers=headers) as response:
            lines = response.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert json.loads(first[6:])["choices"][0]["delta"]["role"] == "assistant"
        # the client is gone: its generation ends at the next token and the next request is answered
        reply = tiny.client("sekret").chat.completions.create(model="tiny", messages=_ask("what?"), max_tokens=3)
    assert reply.usage.completion_tokens == 3
    left, answered = tiny.server.config.app.state.server.finished[-2:]
    assert answered == 3 and left < 4000  # the abandoned answer stopped early


def test_serve_refuses_an_open_address_without_a_key():
    with pytest.raises(UserError, match="--api-key"):
        serve_main(["--host", "0.0.0.0"])


def test_image_frames_are_one_clip_as_lmms_eval_sends_videos(tiny):
    """lmms-eval's OpenAI-compatible model sends a video as PNG frames (image_url parts)."""
    import io

    import numpy as np
    from PIL import Image

    from encoder.video_io import read_video

    def png(frame) -> str:
        out = io.BytesIO()
        Image.fromarray(frame).save(out, format="PNG")
        return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()

    frames = read_video(CLIP, 4).frames  # (4, H, W, 3)
    parts = [{"type": "text", "text": "what moves?"}] + [{"type": "image_url", "image_url": {"url": png(f)}}
                                                          for f in frames]
    client = tiny.client("sekret")
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": parts}], max_tokens=3)
    processor = tiny.server.config.app.state.server.processor
    video_tokens = processor.config.num_video_tokens(4, processor.image_size, processor.image_size)
    assert reply.usage.completion_tokens == 3 and reply.usage.prompt_tokens > video_tokens  # the 4 frames are in
    odd = parts + [{"type": "image_url", "image_url": {"url": png(np.zeros((8, 8, 3), np.uint8))}}]
    with pytest.raises(openai.BadRequestError, match="one size"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": odd}], max_tokens=2)
