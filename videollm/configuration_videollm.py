"""Configuration of `VideoLLMForCausalLM`: a video encoder config, a causal-LM config, a projector config.

The projector config, chosen by ``projector_type``, holds the token arithmetic, so the processor can
expand ``<video>`` to exactly as many placeholders as the projector makes features::

    encoder grid (T, h, w)          h = H / P, w = W / P
    spatial pooling per frame   →   k tokens per frame:  ceil(h / s) · ceil(w / s)   (spatial_pool = s)
                                                          or tokens_per_frame        (adaptive, a square)
    salient tokens (word anchor) →  k' = min(k, select_tokens): the k' tokens of each frame that name
                                    an object most, in raster order (all k without select_tokens)
    temporal pooling            →   T' = min(T, max_video_tokens // k')  (only when T·k' exceeds the budget)
    + 1 if use_cls_token        →   K = T'·k' (+ 1)
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
TEMPORAL_MERGES = ("avg", "named")  # the word anchor's ways to pool frames to a token budget


def _is_int(value) -> bool:  # an integer >= 1
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check(rules) -> None:  # (ok, message) pairs
    for ok, message in rules:
        if not ok:
            raise ValueError(message)


@dataclass
class VideoProjectorConfig:
    """The general projector ("mlp"): encoder tokens → pooled → 2-layer MLP → LLM width.

    spatial_pool: s×s average pooling per frame (ceil mode); tokens_per_frame: adaptive pooling instead.
    spatial_merge "concat": a window's patches side by side (D·s² wide), as Qwen2-VL's patch merger and
        InternVL's pixel shuffle do, so a token keeps which patch showed what.
    max_video_tokens: frame-token budget; above it frames are average-pooled in time.
    stem_skip: the encoder's stem features (``stem_states``), max-pooled per token, through a linear
        layer of their own into the first layer's output: what the stem tells apart reaches the tokens
        even where the blocks lose it.
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
        t, budget = self.tokens_per_frame, self.max_video_tokens
        _check([
            (_is_int(self.spatial_pool), f"spatial_pool must be an integer >= 1; got {self.spatial_pool!r}"),
            (t is None or _is_int(t) and math.isqrt(t) ** 2 == t,
             f"tokens_per_frame must be a perfect square >= 1 (1, 4, 9, …); got {t!r}"),
            (self.spatial_merge in SPATIAL_MERGES,
             f"spatial_merge must be one of {SPATIAL_MERGES}; got {self.spatial_merge!r}"),
            (self.spatial_merge != "concat" or (t is None and not self.use_cls_token),
             "spatial_merge='concat' merges spatial_pool's s×s windows; it does not combine with "
             "tokens_per_frame (adaptive pooling) or use_cls_token (the cls token is D wide, not D·s²)"),
            (budget is None or _is_int(budget), f"max_video_tokens must be an integer >= 1 or None; got {budget!r}"),
            (self.hidden_act in ACT2FN, f"unknown projector hidden_act {self.hidden_act!r}; e.g. 'gelu', 'silu'"),
            (isinstance(self.stem_skip, bool), f"stem_skip must be true or false; got {self.stem_skip!r}"),
        ])

    def tokens_per_frame_for(self, h: int, w: int) -> tuple[int, int]:
        """(kh, kw): the pooled grid of one frame whose patch grid is (h, w)."""
        if self.tokens_per_frame is not None:
            side = math.isqrt(self.tokens_per_frame)
            return min(side, h), min(side, w)
        s = self.spatial_pool
        return math.ceil(h / s), math.ceil(w / s)

    def kept_per_frame(self, k: int) -> int:
        """How many of a frame's k pooled tokens reach the LLM (all of them here)."""
        return k

    def pooled_frames(self, num_frames: int, k: int) -> int:
        """T': the frame count after temporal pooling to the ``max_video_tokens`` budget, for k pooled
        tokens a frame (the budget counts those that reach the LLM, `kept_per_frame`)."""
        k = self.kept_per_frame(k)
        if self.max_video_tokens is None or num_frames * k <= self.max_video_tokens:
            return num_frames
        if k > self.max_video_tokens:
            raise ValueError(f"one frame gives {k} video tokens, more than max_video_tokens={self.max_video_tokens}; "
                             "raise the budget or pool harder (spatial_pool / tokens_per_frame)")
        return self.max_video_tokens // k

    def num_tokens(self, num_frames: int, h: int, w: int) -> int:
        """K: the projector's output tokens for an encoder grid (num_frames, h, w)."""
        kh, kw = self.tokens_per_frame_for(h, w)
        return self.pooled_frames(num_frames, kh * kw) * self.kept_per_frame(kh * kw) + int(self.use_cls_token)


@dataclass
class WordAnchorProjectorConfig(VideoProjectorConfig):
    """The word-anchor projector ("word_anchor", `WordAnchorProjector`). words: groups of words (colours,
    shapes, …). temperature: τ in τ·cos(token, centred word embedding). none_logit: each group's "none"
    logit b; with b > 0 a word needs τ·cos > b to take much of a token, so weak matches carry almost none.
    concepts: the words of the encoder's concept stem, in its class order (e.g. the 1000 ImageNet
    lemmas); each token also becomes the mix of their embeddings its concept logits give. [] = none.
    select_tokens: keep only this many tokens of each frame, those that name an object most (the
        least "none" weight over the word groups), in raster order. With ``spatial_pool: 1`` each
        object keeps a token of its own at the token cost of 2×2 pooling, where a pooled token mixes
        the words of every object in its window ("red", "blue", "circle", "left", …: whose motion?).
    temporal_merge: how ``max_video_tokens`` pools frames. "avg": average neighbouring frames' encoder
        features (the general projector's way); "named": each token position keeps the frame of its
        run that names an object most, so a brief event (a needle frame) is kept whole instead of
        averaged with the footage around it into "none".
    """

    projector_type = "word_anchor"

    words: list[list[str]] = field(default_factory=list)
    temperature: float = 15.0
    none_logit: float = 0.0
    concepts: list[str] = field(default_factory=list)
    select_tokens: int | None = None
    temporal_merge: str = "avg"

    def kept_per_frame(self, k: int) -> int:
        return k if self.select_tokens is None else min(k, self.select_tokens)

    def __post_init__(self):
        super().__post_init__()
        w = self.words
        _check([
            (isinstance(w, (list, tuple)) and w and all(
                isinstance(g, (list, tuple)) and g and all(isinstance(x, str) and x for x in g) for g in w),
             f"words must be a non-empty list of non-empty lists of words; got {w!r}"),
            (_is_number(self.temperature) and self.temperature > 0,
             f"temperature must be > 0; got {self.temperature!r}"),
            (_is_number(self.none_logit) and math.isfinite(self.none_logit),
             f"none_logit must be a finite number; got {self.none_logit!r}"),
            (self.select_tokens is None or _is_int(self.select_tokens),
             f"select_tokens must be an integer >= 1 or None; got {self.select_tokens!r}"),
            (self.temporal_merge in TEMPORAL_MERGES,
             f"temporal_merge must be one of {TEMPORAL_MERGES}; got {self.temporal_merge!r}"),
        ])
        _check([(isinstance(self.concepts, (list, tuple)) and all(isinstance(x, str) and x for x in self.concepts),
                 f"concepts must be a list of words; got {self.concepts!r}")])
        self.words, self.concepts = [list(g) for g in w], list(self.concepts)
        self.temperature, self.none_logit = float(self.temperature), float(self.none_logit)


PROJECTOR_CONFIGS = {c.projector_type: c for c in (VideoProjectorConfig, WordAnchorProjectorConfig)}


def make_projector_config(projector_type: str = "mlp", settings=None) -> VideoProjectorConfig:
    """A projector config from its type name and a dict of settings (unknown keys are an error)."""
    settings = asdict(settings) if isinstance(settings, VideoProjectorConfig) else dict(settings or {})
    if projector_type not in PROJECTOR_CONFIGS:
        raise ValueError(f"unknown projector type {projector_type!r}; choose one of {', '.join(PROJECTOR_CONFIGS)}")
    cls = PROJECTOR_CONFIGS[projector_type]
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"unknown {projector_type!r} projector setting(s) {', '.join(unknown)}; "
                         f"known: {', '.join(sorted(known))}")
    return cls(**settings)


def _sub_config(value, default_type: str, name: str) -> PretrainedConfig:
    if isinstance(value, PretrainedConfig):
        return value
    if value is not None and not isinstance(value, dict):
        raise ValueError(f"{name} must be a config, a dict with 'model_type', or None; got {type(value).__name__}")
    value = {k: v for k, v in (value or {}).items() if k != "transformers_version"}
    return AutoConfig.for_model(value.pop("model_type", default_type), **value)


class VideoLLMConfig(PretrainedConfig):
    """Configuration of `VideoLLMForCausalLM`.

    vision_config: `VideoMAPConfig` / `ViTVideoConfig` (or a dict with ``model_type``; default VideoMAP).
    text_config: any Hugging Face causal-LM config (or a dict with ``model_type``; default Llama).
    projector_type, projector_config: "mlp" or "word_anchor", and that type's settings.
    base_llm: where the LLM came from ("smollm2", a Hub id or a path); a checkpoint whose LLM is the
        base (+ maybe a LoRA adapter) stores only this reference.
    scope: what the model was trained on and can and cannot recognise, in a sentence or two for its
        users (the chat and the demo show it); None: not stated.
    max_frames: the most frames the model was checked to read well (its longest evaluation);
        ``--frames auto`` stays at or below it. None: not stated (the LLM's context is the limit).
    """

    model_type = "videomap_llm"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="videomap"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }

    def __init__(self, vision_config=None, text_config=None, projector_type: str = "mlp",
                 projector_config: dict | VideoProjectorConfig | None = None, video_token_id: int | None = None,
                 base_llm: str | None = None, scope: str | None = None, max_frames: int | None = None, **kwargs):
        self.vision_config = _sub_config(vision_config, "videomap", "vision_config")
        self.text_config = _sub_config(text_config, "llama", "text_config")
        if not hasattr(self.vision_config, "patch_size") or not hasattr(self.vision_config, "embed_dim"):
            raise ValueError(f"vision_config must be a video encoder config with patch_size and embed_dim "
                             f"(videomap or vit_video); got model_type {self.vision_config.model_type!r}")
        self.projector_config = make_projector_config(projector_type, projector_config)
        self.projector_type = projector_type
        if video_token_id is not None and not 0 <= video_token_id < self.text_config.vocab_size:
            raise ValueError(f"video_token_id={video_token_id} is outside the LLM vocabulary (vocab_size="
                             f"{self.text_config.vocab_size}); resize the embeddings after adding {VIDEO_TOKEN}")
        self.video_token_id = video_token_id
        self.base_llm = base_llm
        self.scope = scope
        if max_frames is not None and (isinstance(max_frames, bool) or not isinstance(max_frames, int) or max_frames < 1):
            raise ValueError(f"max_frames must be a positive integer or null; got {max_frames!r}")
        self.max_frames = max_frames
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
        # A sub-config's `_name_or_path` is a path on the machine that built it; `base_llm` is the reference.
        out = super().to_dict()
        for key in ("vision_config", "text_config"):
            if isinstance(out.get(key), dict):
                out[key].pop("_name_or_path", None)
        out["projector_config"] = asdict(self.projector_config)
        return out

    @property
    def input_size(self) -> int:
        """The side frames are fed at by default: the concept stem's (``concept_size``) when the encoder
        has one, since its classifier reads them there, else the encoder's ``img_size``."""
        vision = self.vision_config
        return vision.concept_size if getattr(vision, "concept_frames", 0) else vision.img_size

    def frame_grid(self, height: int, width: int) -> tuple[int, int]:
        """(h, w): the patch grid of one frame of height × width pixels. With a concept stem the patch
        stems see every frame resized to ``img_size``, whatever the input's size."""
        P = self.vision_config.patch_size
        if getattr(self.vision_config, "concept_frames", 0):
            height = width = self.vision_config.img_size
        if height % P or width % P:
            raise ValueError(f"frame size {height}x{width} must be a multiple of the patch size {P}")
        return height // P, width // P

    def num_video_tokens(self, num_frames: int, height: int, width: int) -> int:
        """K: how many ``<video>`` placeholders a (num_frames, height, width) clip fills."""
        return self.projector_config.num_tokens(num_frames, *self.frame_grid(height, width))


AutoConfig.register("videomap_llm", VideoLLMConfig, exist_ok=True)
