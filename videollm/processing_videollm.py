"""Video + conversation → model inputs, with the LLM's own chat template.

    video path ──read_video──► each frame (H, W, 3) uint8 ──frames_to_tensor──► pixel_values (1, 3, T, S, S)
    conversation ──"<video>" → K placeholders (+ time line)──apply_chat_template──► text ──► input_ids

Turns are LLaVA-video (``{"from", "value"}``) or chat messages (``{"role", "content"}``); ``<video>``
marks where the clip goes in a user turn (at most once).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer

from encoder.errors import UserError
from encoder.transforms import CLIP_MEAN, CLIP_STD, frames_to_tensor
from encoder.video_io import VideoClip, read_video
from videollm.configuration_videollm import VIDEO_TOKEN, VideoLLMConfig

PROCESSOR_FILE = "videollm_processor.json"
IGNORE_INDEX = -100
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class VideoInputs:  # one decoded clip ready for the model
    pixel_values: torch.Tensor  # (1, 3, T, S, S) float
    timestamps: list[float]  # (T,) seconds
    duration: float | None  # seconds, None when unknown (raw frames)
    decode_seconds: float = 0.0  # reading (when `load_video` read the file) + resizing


def to_messages(conversation: list[dict] | str) -> list[dict]:
    """LLaVA layout or chat messages (a string: one user turn) → ``[{"role", "content"}]``."""
    if isinstance(conversation, str):
        conversation = [{"role": "user", "content": conversation}]
    messages = []
    for i, turn in enumerate(conversation):
        if not isinstance(turn, dict):
            raise UserError(f"turn {i} is not an object: {turn!r}")
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if role not in _ROLES:
            raise UserError(f"turn {i}: unknown role {role!r}; use human/user, gpt/assistant or system")
        if not isinstance(content, str):
            raise UserError(f"turn {i}: the text must be a string; got {type(content).__name__}")
        messages.append({"role": _ROLES[role], "content": content})
    return messages


def time_line(timestamps: list[float], duration: float | None) -> str:
    """"The video lasts 42.0 s; 16 frames sampled at 0.0 s, 2.8 s, …." (every timestamp listed)."""
    stamps = ", ".join(f"{t:.1f} s" for t in timestamps)
    head = f"The video lasts {duration:.1f} s; " if duration is not None else ""
    return f"{head}{len(timestamps)} frames sampled at {stamps}."


class VideoLLMProcessor:
    """Turns (video, conversation) into ``input_ids``/``attention_mask``/``pixel_values``.

    image_size: square side S (default: the encoder's, its concept stem's with one). use_time_line: "The video lasts …" after the
    video tokens. system_prompt: put first when a conversation has none; None leaves it to the chat
    template (SmolLM2's adds a ~20-token default), "" gives an empty one (shorter prompts).
    """

    def __init__(self, tokenizer, config: VideoLLMConfig, num_frames: int = 8, image_size: int | None = None,
                 use_time_line: bool = True, mean=None, std=None, system_prompt: str | None = None):
        if VIDEO_TOKEN not in tokenizer.get_vocab():
            raise ValueError(f"the tokenizer has no {VIDEO_TOKEN} token; build the model with build_videollm "
                             "or call add_video_token(llm, tokenizer)")
        if num_frames < 1:
            raise UserError(f"num_frames must be >= 1; got {num_frames}")
        self.tokenizer, self.config, self.num_frames = tokenizer, config, num_frames
        self.image_size = image_size or config.input_size
        config.frame_grid(self.image_size, self.image_size)  # validates against the patch size
        self.use_time_line = use_time_line
        self.mean = tuple(mean or CLIP_MEAN)
        self.std = tuple(std or CLIP_STD)
        # Frames resized by the C++ kernel (`frames_to_tensor(native=True)`): set by inference loads;
        # training keeps torch's path, so a rebuilt model has the same bits.
        self.native_resize = False
        self.video_token_id = tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)
        self.system_prompt = system_prompt

    def load_video(self, video, num_frames: int | None = None, start: float | None = None,
                   end: float | None = None) -> VideoInputs:
        """A path or bundled clip name (read here), a `VideoClip`, or uint8 frames (T, H, W, 3) →
        `VideoInputs` (returned as is). `VideoReadError` for an unreadable file."""
        if isinstance(video, VideoInputs):
            return video
        start_time = time.perf_counter()
        if isinstance(video, np.ndarray):
            pixel_values, frame_of = self._pixels(video), None  # (3, T, S, S)
            timestamps, duration = [float(i) for i in range(len(video))], None
        else:
            if isinstance(video, VideoClip):
                clip, pixel_values = video, self._pixels(video.frames)  # (3, U, S, S)
            else:  # resized frame by frame as it is decoded: no frame is kept at full resolution
                clip = read_video(video, num_frames or self.num_frames, start=start, end=end, distinct=True,
                                  frame_fn=lambda frame: self._pixels(frame[None]))  # each (3, 1, S, S)
                pixel_values = torch.cat(clip.frames, 1)  # (3, U, S, S)
            timestamps, duration, frame_of = clip.timestamps, clip.info.duration, clip.frame_of
        # Each distinct frame is resized once, with the same numbers as resizing every repeat (the time
        # to first token at 1,024 frames: docs/eval.md).
        if frame_of is not None and len(frame_of) > pixel_values.shape[1]:
            pixel_values = pixel_values[:, frame_of]  # (3, T, S, S)
        return VideoInputs(pixel_values.unsqueeze(0), list(timestamps), duration, time.perf_counter() - start_time)

    def frames_seen(self, video: VideoInputs) -> np.ndarray:
        """The frames as the encoder gets them (resized, centre-cropped), uint8 (T, S, S, 3): what a
        gallery shows, so a user sees what the model could not (the sides of a wide frame)."""
        x = video.pixel_values[0].permute(1, 2, 3, 0)  # (T, S, S, 3)
        x = x * torch.tensor(self.std) + torch.tensor(self.mean)
        return (x * 255).round().clamp(0, 255).to(torch.uint8).numpy()

    def _pixels(self, frames: np.ndarray) -> torch.Tensor:
        """uint8 frames (T, H, W, 3) → (3, T, S, S), the encoder's input."""
        return frames_to_tensor(frames, self.image_size, self.mean, self.std, native=self.native_resize)

    def _expand(self, messages: list[dict], video: VideoInputs | None) -> list[dict]:
        if self.system_prompt is not None and not any(m["role"] == "system" for m in messages[:1]):
            messages = [{"role": "system", "content": self.system_prompt}] + messages
        count = sum(m["content"].count(VIDEO_TOKEN) for m in messages)
        if count > 1:
            raise UserError(f"the conversation has {count} {VIDEO_TOKEN} markers; one video per conversation")
        if video is None:
            if count:
                raise UserError(f"the conversation has a {VIDEO_TOKEN} marker but no video was given")
            return messages
        messages = [dict(m) for m in messages]
        # K placeholders for pixel_values (1, 3, T, S, S), then the optional time line
        video_text = VIDEO_TOKEN * self.config.num_video_tokens(*video.pixel_values.shape[2:]) + (
            "\n" + time_line(video.timestamps, video.duration) if self.use_time_line else "")
        if count == 0:  # no marker: the video goes before the first user text
            first_user = next((m for m in messages if m["role"] == "user"), None)
            if first_user is None:
                raise UserError("a video needs a user turn to attach to")
            first_user["content"] = f"{VIDEO_TOKEN}\n{first_user['content']}"
        for m in messages:
            if VIDEO_TOKEN in m["content"]:
                if m["role"] != "user":
                    raise UserError(f"{VIDEO_TOKEN} must be in a user turn, not a {m['role']} turn")
                m["content"] = m["content"].replace(VIDEO_TOKEN, video_text)
        return messages

    def render(self, conversation: list[dict], video: VideoInputs | None = None,
               add_generation_prompt: bool = True) -> str:
        """The prompt text: chat template applied, ``<video>`` expanded to K placeholders."""
        messages = self._expand(to_messages(conversation), video)
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def __call__(self, conversation: list[dict], video=None, add_generation_prompt: bool = True) -> dict:
        """Inputs for ``model(**inputs)`` / ``model.generate(**inputs)``: input_ids (1, L), attention_mask
        (1, L), pixel_values (1, 3, T, S, S) or None. ``video`` as `load_video` takes it."""
        video = self.load_video(video) if video is not None else None
        text = self.render(conversation, video, add_generation_prompt)
        ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]  # (1, L)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "pixel_values": video.pixel_values if video is not None else None}

    def build_training_example(self, conversation: list[dict], video=None, max_length: int | None = None) -> dict:
        """input_ids, labels (-100 except on assistant answers + their end-of-turn token) and, with a
        video, pixel_values (1, 3, T, S, S). An answer's span starts where the template's generation
        prompt for the turns before ends, so any template that renders a conversation's prefix as a
        prefix of the whole works. max_length: truncate the tail (not the video)."""
        video = self.load_video(video) if video is not None else None
        messages = self._expand(to_messages(conversation), video)
        if not any(m["role"] == "assistant" for m in messages):
            raise UserError("the conversation has no assistant turn, so nothing to learn from")
        apply = self.tokenizer.apply_chat_template
        text = apply(messages, tokenize=False)
        eot = self.tokenizer.eos_token
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prefix = apply(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
            if not text.startswith(prefix):
                raise ValueError("this chat template does not render a conversation's prefix as a prefix of the "
                                 "whole, so assistant turns cannot be located; use another template")
            start = text.find(m["content"], len(prefix))
            if start < 0:
                raise ValueError(f"assistant turn {i} is not found verbatim in the rendered conversation")
            end = start + len(m["content"])
            # The end-of-turn token that closes this answer (e.g. <|im_end|>) is learned too.
            close = text.find(eot, end) if eot else -1
            if close >= 0 and close + len(eot) <= len(apply(messages[:i + 1], tokenize=False)):
                end = close + len(eot)
            spans.append((start, end))
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        input_ids, offsets = enc["input_ids"], enc["offset_mapping"]
        labels = [t if b > a and any(s <= a and b <= e for s, e in spans) else IGNORE_INDEX
                  for t, (a, b) in zip(input_ids, offsets)]
        if max_length is not None and len(input_ids) > max_length:
            placeholders = input_ids.count(self.video_token_id)
            input_ids, labels = input_ids[:max_length], labels[:max_length]
            if input_ids.count(self.video_token_id) != placeholders:
                raise UserError(f"max_length={max_length} would cut the video's {placeholders} tokens; "
                                "raise it or use fewer frames")
        return {"input_ids": input_ids, "labels": labels} | (
            {"pixel_values": video.pixel_values} if video is not None else {})

    def to_dict(self) -> dict:
        return {"num_frames": self.num_frames, "image_size": self.image_size, "use_time_line": self.use_time_line,
                "mean": list(self.mean), "std": list(self.std), "system_prompt": self.system_prompt}

    def save_pretrained(self, directory) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(directory)
        (directory / PROCESSOR_FILE).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory, config: VideoLLMConfig | None = None, **overrides) -> "VideoLLMProcessor":
        directory = Path(directory)
        config = config or VideoLLMConfig.from_pretrained(directory)
        settings = json.loads((directory / PROCESSOR_FILE).read_text()) if (directory / PROCESSOR_FILE).is_file() else {}
        settings.update({k: v for k, v in overrides.items() if v is not None})
        return cls(AutoTokenizer.from_pretrained(directory), config, **settings)
