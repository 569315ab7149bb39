"""The Gradio demo served in-process around a tiny VideoLLM, driven through gradio_client.

The model is tiny and random (a 2-block VideoMAP, a 2-layer Llama, a word-level tokenizer with a
ChatML template), so answers are gibberish but cost milliseconds; what is tested is the serving:
concurrency, the `/answer` API, bad uploads answered with a message while the app stays up.
The real default model (smollm2 + nano) is exercised by ``test_real_default_model`` (marked slow).
"""

from __future__ import annotations

import re
import socket

import pytest

gr = pytest.importorskip("gradio", reason="the demo needs gradio: pip install -c constraints.txt gradio")
gradio_client = pytest.importorskip("gradio_client", reason="pip install -c constraints.txt gradio_client")

import torch  # noqa: E402
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from encoder.video_io import sample_clip_path  # noqa: E402
from training.recipe import free_port  # noqa: E402

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


WORDS = ("a the video shows red green blue yellow circle square car bike person road tree sky moves "
         "left right up down fast slow then and stops turns appears leaves frame scene").split()


def tiny_tokenizer():
    """One token per whitespace-separated word from `WORDS` (anything else is <unk>) plus ChatML
    markers. Decoding joins words with spaces, so TextIteratorStreamer (which holds text back until
    a space) releases the answer word by word, as it does for a real LLM."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<unk>", "<|im_start|>", "<|im_end|>"] + list(WORDS))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<|im_start|>",
                                  eos_token="<|im_end|>", pad_token="<|im_end|>")
    tok.chat_template = CHATML
    return tok


def tiny_videollm():
    """(model, processor): random tiny encoder + Llama. The LLM never stops early (no EOS), so every
    answer is exactly max_new_tokens tokens long and never empty."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from encoder.videomap import VideoMAPConfig
    from videollm.modeling_videollm import build_videollm

    torch.manual_seed(0)
    llm = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                       bos_token_id=1, eos_token_id=2, pad_token_id=2,
                                       tie_word_embeddings=True)).eval()
    encoder = VideoMAPConfig.from_preset("nano", embed_dim=32, depth_mamba=2, attn_every=2, num_heads=2,
                                         img_size=32, num_frames=8)
    model, processor = build_videollm((llm, tiny_tokenizer()), encoder, num_frames=8, projector={"spatial_pool": 2})
    # Only words (ids 3 .. 3 + len(WORDS) - 1): the text grows with every token.
    gen = model.generation_config  # what model.generate() reads
    gen.eos_token_id = None
    gen.suppress_tokens = [0, 1, 2] + list(range(3 + len(WORDS), 128))
    return model, processor


def serve(model, processor, max_file_size="200mb", **build_kw):
    """Build and launch the demo in this process; returns (app, url)."""
    from demo.app import build_app, launch

    app = build_app(model, processor, **build_kw)
    url, _ = launch(app, port=free_port(), max_file_size=max_file_size, block=False)
    return app, url


@pytest.fixture(scope="module")
def tiny_model():
    return tiny_videollm()


@pytest.fixture(scope="module")
def served(tiny_model):
    model, processor = tiny_model
    app, url = serve(model, processor, max_new_tokens=12, concurrency=2)
    yield url
    app.close()


@pytest.fixture(scope="module")
def client(served):
    return Client(served, verbose=False)


def test_gallery_captions_carry_the_models_own_concepts():
    """A model with concepts shows, per sampled frame, what its tokens say the frame shows."""
    import numpy as np

    from demo.app import thumbnails

    frames = np.zeros((2, 32, 32, 3), np.uint8)
    plain = thumbnails(frames, [0.0, 0.5])
    assert [c for _, c in plain] == ["#1 · 0.0 s", "#2 · 0.5 s"]
    seen = thumbnails(frames, [0.0, 0.5], concepts=[[("tabby", 0.81), ("tiger cat", 0.02)], [("espresso", 0.6)]])
    assert [c for _, c in seen] == ["#1 · 0.0 s · tabby 81%", "#2 · 0.5 s · espresso 60%"]
    assert [c for _, c in thumbnails(frames, [0.0, 0.5], concepts=[[("tabby", 0.01)], []])] == \
        ["#1 · 0.0 s", "#2 · 0.5 s"]  # nothing recognised: nothing claimed


def test_the_header_says_what_the_model_knows(tiny_model):
    """The header states the model's `scope` (what it was trained on, what it can and cannot
    recognise) when its config has one, and nothing made up when it has none."""
    from demo.app import build_app

    model, processor = tiny_model

    def header() -> str:
        app = build_app(model, processor)
        return next(b for b in app.blocks.values() if getattr(b, "elem_id", None) == "header").value

    assert "This model" not in header()
    model.config.scope = "Knows red circles only; load another model with --model DIR."
    try:
        assert "**This model:** Knows red circles only; load another model with --model DIR." in header()
    finally:
        model.config.scope = None


def test_answer_api_concurrent(client):
    clip = handle_file(str(sample_clip_path("bikes")))
    jobs = [client.submit(clip, f"What happens in the video? ({i})", 8, api_name="/answer") for i in range(5)]
    answers = [job.result(timeout=120) for job in jobs]
    assert len(answers) == 5
    assert all(isinstance(a, str) and a.strip() for a in answers), answers


def test_corrupt_uploads_get_a_message_and_the_app_stays_up(client, tmp_path):
    not_video = tmp_path / "notes.mp4"
    not_video.write_text("this is a text file, not a video\n")
    good = sample_clip_path("carphone_pristine")
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(good.read_bytes()[:2000])
    for bad in (not_video, truncated):
        with pytest.raises(AppError, match=rf"cannot read video '{bad.name}'"):
            client.predict(handle_file(str(bad)), "What is this?", 8, api_name="/answer")
    answer = client.predict(handle_file(str(good)), "And this one?", 8, api_name="/answer")
    assert isinstance(answer, str) and answer.strip()


def test_answer_api_rejects_bad_arguments(client):
    clip = handle_file(str(sample_clip_path("bikes")))
    with pytest.raises(AppError, match="number of frames"):
        client.predict(clip, "q", 0, api_name="/answer")
    with pytest.raises(AppError, match="question is empty"):
        client.predict(clip, "  ", 8, api_name="/answer")


def test_upload_size_limit(tiny_model):
    model, processor = tiny_model
    app, url = serve(model, processor, max_file_size="100kb", max_new_tokens=4)
    try:
        big = sample_clip_path("bikes")
        assert big.stat().st_size > 100_000
        # gradio_client reads the server's limit from its config and refuses before uploading.
        with pytest.raises(ValueError, match="exceeds the maximum file size of 102400 bytes"):
            Client(url, verbose=False).predict(handle_file(str(big)), "q", 8, api_name="/answer")
    finally:
        app.close()


def test_chat_endpoints_are_private(client):
    """Programs get exactly one documented endpoint; the chat handlers hold per-session state."""
    api = client.view_api(print_info=False, return_format="dict")
    assert list(api["named_endpoints"]) == ["/answer"]


def test_respond_streams_and_errors_in_chat(tiny_model, tmp_path):
    """The chat handler itself (no server): the answer grows piece by piece, the gallery has one
    captioned thumbnail per sampled frame, a bad video becomes a chat message, history is kept."""
    from demo.app import build_app

    model, processor = tiny_model
    app = build_app(model, processor, max_new_tokens=8)
    respond = next(fn.fn for fn in app.fns.values() if fn.fn.__name__ == "respond")
    video = str(sample_clip_path("bikes"))

    outs = list(respond(video, "What happens?", [], [], None, 8, 0.0, 1.0, 8))
    gallery = outs[1][2]
    assert len(gallery) == 8 and re.fullmatch(r"#1 · \d+\.\d s", gallery[0][1])
    streamed = [o[0][-1]["content"] for o in outs[2:-1]]
    assert len(streamed) >= 2 and all(len(a) < len(b) for a, b in zip(streamed, streamed[1:]))
    chat, history, cache = outs[-1][4], outs[-1][5], outs[-1][6]
    assert [m["role"] for m in history] == ["user", "assistant"]
    assert "frames" in outs[-1][3] and "tokens/s" in outs[-1][3]

    # Second turn re-uses the decoded clip and sends the whole history to the model.
    outs2 = list(respond(video, "And then?", chat, history, cache, 8, 0.0, 1.0, 8))
    assert outs2[-1][6] is cache and len(outs2[-1][5]) == 4
    # the first answer paid for decoding the clip (read + resize), the second did not
    decode = [float(re.search(r"decode (\d+\.\d+) s", o[-1][3]).group(1)) for o in (outs, outs2)]
    assert decode[0] > 0 and decode[1] == 0

    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00" * 100)
    outs3 = list(respond(str(bad), "What is this?", chat, history, cache, 8, 0.0, 1.0, 8))
    last = outs3[-1][0][-1]
    assert last["role"] == "assistant" and "cannot read video 'bad.mp4'" in last["content"]
    assert outs3[-1][5] == history  # the failed turn is not part of what the model sees


def test_main_rejects_bad_options():
    from demo.app import main

    for argv in (["--concurrency", "0"], ["--frames", "4"], ["--port", "0"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2


def test_main_refuses_a_taken_port_before_loading_the_model():
    from demo.app import main
    from encoder.errors import UserError

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(UserError, match=f"cannot serve on 127.0.0.1:{s.getsockname()[1]}"):
            main(["--port", str(s.getsockname()[1]), "--no-examples"])


@pytest.mark.slow
def test_real_default_model():
    """smollm2 + nano, served and asked about a bundled clip (about a minute on 2 CPU cores)."""
    from videollm.modeling_videollm import load_videollm

    model, processor = load_videollm(None, num_frames=8)
    app, url = serve(model, processor, max_new_tokens=8)
    try:
        answer = Client(url, verbose=False).predict(handle_file(str(sample_clip_path("bikes"))),
                                                    "What is happening in the video?", 8, api_name="/answer")
        assert isinstance(answer, str) and answer.strip()
    finally:
        app.close()


def test_examples_are_written_once(tmp_path):
    from demo.examples import example_clips, synthetic_examples
    from encoder.video_io import read_video

    first = synthetic_examples(tmp_path)
    stamp = [p.path.stat().st_mtime_ns for p in first]
    again = synthetic_examples(tmp_path)
    assert [p.path.stat().st_mtime_ns for p in again] == stamp
    clip = read_video(first[0].path, 4)
    assert clip.frames.shape[0] == 4 and first[0].answer
    names = [e.name for e in example_clips(tmp_path)]
    assert names[:4] == ["bigbuckbunny", "bikes", "carphone_pristine", "carphone_distorted"]
