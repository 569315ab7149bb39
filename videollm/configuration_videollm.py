"""Configuration of `VideoLLMForCausalLM`: a video encoder config, a causal-LM config, a projector config.

The projector is chosen by name (``projector_type``) and has its own small config:

    "mlp"          `VideoProjectorConfig`: per-frame spatial pooling, optional temporal pooling to a
                   token budget, a 2-layer MLP (transformers' LlavaNextVideo pooler + projector)
    "word_anchor"  `WordAnchorProjectorConfig`: the same, then each token re-expressed in the LLM's
                   own embeddings of a few groups of words (`videollm.projectors.WordAnchorProjector`)

Token arithmetic lives on the projector config, not in the model, so the processor can expand
``<video>`` to exactly the number of features the projector will produce without building it::

    encoder grid (T, h, w)          h = H / P, w = W / P
    spatial pooling per frame   →   k tokens per frame:  ceil(h / s) · ceil(w / s)   (spatial_pool = s)
                                                          or tokens_per_frame        (adaptive, a square)
    temporal pooling            →   T' = min(T, max_video_tokens // k)   (only when T·k exceeds the budget)
    + 1 if use_cls_token        →   K = T'·k (+ 1)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from transformers import AutoConfig, PretrainedConfig
from transformers.activations import ACT2FN
from transformers.configuration_utils import SubConfigSpec

import encoder.videomap  # noqa: F401  (registers "videomap" with AutoConfig/AutoModel)
import encoder.vit  # noqa: F401  (registers "vit_video")

VIDEO_TOKEN = "<video>"
SPATIAL_MERGES = ("avg", "concat")


def _is_int(value, low: int = 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


@dataclass
class VideoProjectorConfig:
    """The general projector ("mlp"): encoder tokens → pooled → 2-layer MLP → LLM width.

    spatial_pool: s, average pooling of each frame's (h, w) patch grid with an s×s window (ceil
        mode: a ragged edge forms smaller windows). 1 keeps every patch.
    tokens_per_frame: instead of ``spatial_pool``, adaptive average pooling of each frame to this
        many tokens (a perfect square: 1, 4, 9, 16, …).
    spatial_merge: how ``spatial_pool``'s s×s window becomes one token. "avg": the mean of its
        patches. "concat": its patches side by side (D·s² wide; a ragged edge is padded with zeros)
        into the first layer, as Qwen2-VL's patch merger and InternVL's pixel shuffle do, so the
        token keeps which patch showed what. Not with ``tokens_per_frame`` or ``use_cls_token``.
    max_video_tokens: a budget for the number of frame tokens; when T·k exceeds it, frames are
        average-pooled in time down to ``max_video_tokens // k``. None: no budget.
    hidden_act: the activation between the two linear layers.
    use_cls_token: prepend the encoder's cls token to the video tokens (one extra token).
    stem_skip: the projector also reads the encoder's stem features (``stem_states``: the patch
        stem's output plus positions, the first block's input), max-pooled over each token's
        window, through a linear layer of its own added to the first layer's output, so what the
        stem tells apart reaches the tokens even where the blocks lose it.
    """

    projector_type = "mlp"

    spatial_pool: int = 2
    tokens_per_frame: int | None = None
    spatial_merge: str = "avg"
    max_video_tokens: int | None = None
    hidden_act: str = "gelu"
    use_cls_token: bool = False
    stem_skip: bool = False

    def __post_init__(self):
        if not _is_int(self.spatial_pool):
            raise ValueError(f"spatial_pool must be an integer >= 1; got {self.spatial_pool!r}")
        t = self.tokens_per_frame
        if t is not None and not (_is_int(t) and math.isqrt(t) ** 2 == t):
            raise ValueError(f"tokens_per_frame must be a perfect square >= 1 (1, 4, 9, …); got {t!r}")
        if self.spatial_merge not in SPATIAL_MERGES:
            raise ValueError(f"spatial_merge must be one of {SPATIAL_MERGES}; got {self.spatial_merge!r}")
        if self.spatial_merge == "concat" and (t is not None or self.use_cls_token):
            raise ValueError("spatial_merge='concat' merges spatial_pool's s×s windows; it does not combine with "
                             "tokens_per_frame (adaptive pooling) or use_cls_token (the cls token is D wide, not D·s²)")
        if self.max_video_tokens is not None and not _is_int(self.max_video_tokens):
            raise ValueError(f"max_video_tokens must be an integer >= 1 or None; got {self.max_video_tokens!r}")
        if self.hidden_act not in ACT2FN:
            raise ValueError(f"unknown projector hidden_act {self.hidden_act!r}; e.g. 'gelu', 'silu'")
        if not isinstance(self.stem_skip, bool):
            raise ValueError(f"stem_skip must be true or false; got {self.stem_skip!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    # ---- token arithmetic (shared by the projector and the processor) -----------------------

    def tokens_per_frame_for(self, h: int, w: int) -> tuple[int, int]:
        """(kh, kw): the pooled grid of one frame whose patch grid is (h, w)."""
        if self.tokens_per_frame is not None:
            side = math.isqrt(self.tokens_per_frame)
            return min(side, h), min(side, w)
        s = self.spatial_pool
        return math.ceil(h / s), math.ceil(w / s)

    def pooled_frames(self, num_frames: int, k: int) -> int:
        """T': the frame count after temporal pooling to the ``max_video_tokens`` budget."""
        if self.max_video_tokens is None or num_frames * k <= self.max_video_tokens:
            return num_frames
        if k > self.max_video_tokens:
            raise ValueError(
                f"one frame gives {k} video tokens, more than max_video_tokens={self.max_video_tokens}; "
                "raise the budget or pool harder (spatial_pool / tokens_per_frame)"
            )
        return self.max_video_tokens // k

    def num_tokens(self, num_frames: int, h: int, w: int) -> int:
        """K: the projector's output tokens for an encoder grid (num_frames, h, w)."""
        kh, kw = self.tokens_per_frame_for(h, w)
        k = kh * kw
        return self.pooled_frames(num_frames, k) * k + int(self.use_cls_token)


@dataclass
class WordAnchorProjectorConfig(VideoProjectorConfig):
    """The word-anchor projector ("word_anchor"): the general projector, then each token becomes,
    per group of ``words``, a softmax-weighted sum of the LLM's input embeddings of the group's
    words (plus an implicit "none" at ``none_logit``), plus a gated copy of the MLP's output.

    words: groups of words (e.g. the colours, the shapes, the motions).
    temperature: τ of the scores, τ·cos(token, centred word embedding).
    none_logit: b, the logit of each group's "none". With b > 0 a word needs τ·cos > b to take
        much of a token's mass, so tokens that match every word a little carry almost none while
        tokens that match one word well keep it.
    """

    projector_type = "word_anchor"

    words: list[list[str]] = field(default_factory=list)
    temperature: float = 15.0
    none_logit: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        w = self.words
        if (not isinstance(w, (list, tuple)) or not w or not all(
                isinstance(g, (list, tuple)) and g and all(isinstance(x, str) and x for x in g) for g in w)):
            raise ValueError(f"words must be a non-empty list of non-empty lists of words; got {w!r}")
        self.words = [list(g) for g in w]
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not self.temperature > 0:
            raise ValueError(f"temperature must be > 0; got {self.temperature!r}")
        if isinstance(self.none_logit, bool) or not isinstance(self.none_logit, (int, float)) \
                or not math.isfinite(self.none_logit):
            raise ValueError(f"none_logit must be a finite number; got {self.none_logit!r}")
        self.temperature, self.none_logit = float(self.temperature), float(self.none_logit)


PROJECTOR_CONFIGS = {c.projector_type: c for c in (VideoProjectorConfig, WordAnchorProjectorConfig)}


def make_projector_config(projector_type: str = "mlp", settings=None) -> VideoProjectorConfig:
    """A projector config from its type name and a dict of settings (unknown keys are an error)."""
    if isinstance(settings, VideoProjectorConfig):
        settings = settings.to_dict()
    if projector_type not in PROJECTOR_CONFIGS:
        raise ValueError(f"unknown projector type {projector_type!r}; choose one of {', '.join(PROJECTOR_CONFIGS)}")
    cls = PROJECTOR_CONFIGS[projector_type]
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(settings or {}) - known)
    if unknown:
        raise ValueError(f"unknown {projector_type!r} projector setting(s) {', '.join(unknown)}; "
                         f"known: {', '.join(sorted(known))}")
    return cls(**(settings or {}))


def _sub_config(value, default_type: str, name: str) -> PretrainedConfig:
    """A config object from None (the default type), a dict with ``model_type``, or a config."""
    if isinstance(value, PretrainedConfig):
        return value
    if value is None:
        return AutoConfig.for_model(default_type)
    if isinstance(value, dict):
        value = dict(value)
        model_type = value.pop("model_type", default_type)
        value.pop("transformers_version", None)
        return AutoConfig.for_model(model_type, **value)
    raise ValueError(f"{name} must be a config, a dict with 'model_type', or None; got {type(value).__name__}")


# Checkpoints written before the projector had its own config kept its settings at the top level.
_LEGACY_KEYS = {"spatial_pool": "spatial_pool", "tokens_per_frame": "tokens_per_frame",
                "spatial_merge": "spatial_merge", "max_video_tokens": "max_video_tokens",
                "projector_hidden_act": "hidden_act", "use_cls_token": "use_cls_token", "stem_skip": "stem_skip",
                "word_anchor": "words", "anchor_temperature": "temperature", "anchor_none_logit": "none_logit"}


class VideoLLMConfig(PretrainedConfig):
    """Configuration of `VideoLLMForCausalLM`.

    Args:
        vision_config: the video encoder (`VideoMAPConfig`, `ViTVideoConfig`, or a dict with their
            ``model_type``); default: the VideoMAP ``nano`` preset.
        text_config: any Hugging Face causal-LM config (or a dict with ``model_type``); default Llama.
        projector_type: "mlp" (`VideoProjectorConfig`) or "word_anchor" (`WordAnchorProjectorConfig`).
        projector_config: that type's settings (a dict or the config object); default: its defaults.
        video_token_id: id of ``<video>`` in the tokenizer; placeholders with this id are replaced by
            video features.
        base_llm: where the LLM came from ("smollm2", a Hub id or a path). A checkpoint whose LLM is
            the base (plus, maybe, a LoRA adapter) stores only this reference and loads the base from it.
    """

    model_type = "videomap_llm"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="videomap"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }

    def __init__(self, vision_config=None, text_config=None, projector_type: str = "mlp",
                 projector_config: dict | VideoProjectorConfig | None = None, video_token_id: int | None = None,
                 base_llm: str | None = None, **kwargs):
        legacy = {new: kwargs.pop(old) for old, new in _LEGACY_KEYS.items() if old in kwargs}
        if legacy and projector_config is None:
            if legacy.get("words") is not None:
                projector_type = "word_anchor"
            else:
                legacy = {k: v for k, v in legacy.items() if k not in ("words", "temperature", "none_logit")}
            projector_config = legacy
        self.vision_config = _sub_config(vision_config, "videomap", "vision_config")
        self.text_config = _sub_config(text_config, "llama", "text_config")
        if not hasattr(self.vision_config, "patch_size") or not hasattr(self.vision_config, "embed_dim"):
            raise ValueError(
                f"vision_config must be a video encoder config with patch_size and embed_dim "
                f"(videomap or vit_video); got model_type {self.vision_config.model_type!r}"
            )
        self.projector_config = make_projector_config(projector_type, projector_config)
        self.projector_type = projector_type
        if video_token_id is not None and not 0 <= video_token_id < self.text_config.vocab_size:
            raise ValueError(
                f"video_token_id={video_token_id} is outside the LLM vocabulary "
                f"(vocab_size={self.text_config.vocab_size}); resize the embeddings after adding {VIDEO_TOKEN}"
            )
        self.video_token_id = video_token_id
        self.base_llm = base_llm
        # The LLM decides tying (SmolLM2 ties lm_head to the embeddings; it lives inside the LLM).
        kwargs.setdefault("tie_word_embeddings", False)
        # The base __init__ pushes its (unset) attention implementation down into the sub-configs,
        # which may be the live configs of already-built models: keep theirs.
        sub_attn = {k: getattr(getattr(self, k), "_attn_implementation_internal", None)
                    for k in ("vision_config", "text_config")}
        super().__init__(**kwargs)
        for key, attn in sub_attn.items():
            if attn is not None and "attn_implementation" not in kwargs:
                getattr(self, key)._attn_implementation_internal = attn

    def to_dict(self) -> dict:
        # A sub-config's `_name_or_path` is where that part was loaded from while this model was
        # built (the encoder's run directory, the LLM's local cache): a path on the machine that
        # built it, meaningless where the model is loaded next. `base_llm` is the LLM's reference.
        out = super().to_dict()
        for key in ("vision_config", "text_config"):
            if isinstance(out.get(key), dict):
                out[key].pop("_name_or_path", None)
        out["projector_config"] = self.projector_config.to_dict()
        return out

    def for_llm(self, text_config, video_token_id: int | None, base_llm: str | None) -> "VideoLLMConfig":
        """This config's encoder and projector on another (or a freshly loaded) LLM."""
        return type(self)(vision_config=self.vision_config, text_config=text_config,
                          projector_type=self.projector_type, projector_config=self.projector_config.to_dict(),
                          video_token_id=video_token_id, base_llm=base_llm)

    def frame_grid(self, height: int, width: int) -> tuple[int, int]:
        """(h, w): the patch grid of one frame of height × width pixels."""
        P = self.vision_config.patch_size
        if height % P or width % P:
            raise ValueError(f"frame size {height}x{width} must be a multiple of the patch size {P}")
        return height // P, width // P

    def num_video_tokens(self, num_frames: int, height: int, width: int) -> int:
        """K: how many ``<video>`` placeholders a (num_frames, height, width) clip fills."""
        return self.projector_config.num_tokens(num_frames, *self.frame_grid(height, width))


AutoConfig.register("videomap_llm", VideoLLMConfig, exist_ok=True)
