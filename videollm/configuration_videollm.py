"""Configuration of `VideoLLMForCausalLM`: a video encoder config, a causal-LM config, the projector.

Token arithmetic (`VideoLLMConfig.num_video_tokens`) lives here, not in the model, so the processor
can expand ``<video>`` to exactly the number of features the projector will produce without
building the model::

    encoder grid (T, h, w)          h = H / P, w = W / P
    spatial pooling per frame   →   k tokens per frame:  ceil(h / s) · ceil(w / s)   (spatial_pool = s)
                                                          or tokens_per_frame        (adaptive, a square)
    temporal pooling            →   T' = min(T, max_video_tokens // k)   (only when T·k exceeds the budget)
    + 1 if use_cls_token        →   K = T'·k (+ 1)
"""

from __future__ import annotations

import math

from transformers import AutoConfig, PretrainedConfig
from transformers.configuration_utils import SubConfigSpec

import encoder.videomap  # noqa: F401  (registers "videomap" with AutoConfig/AutoModel)
import encoder.vit  # noqa: F401  (registers "vit_video")

VIDEO_TOKEN = "<video>"


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


SPATIAL_MERGES = ("avg", "concat")  # VideoLLMConfig.spatial_merge


class VideoLLMConfig(PretrainedConfig):
    """Configuration of `VideoLLMForCausalLM`.

    Args:
        vision_config: the video encoder (`VideoMAPConfig`, `ViTVideoConfig`, or a dict with their
            ``model_type``); default: the VideoMAP ``nano`` preset.
        text_config: any Hugging Face causal-LM config (or a dict with ``model_type``); default Llama.
        spatial_pool: s, average pooling of each frame's (h, w) patch grid with an s×s window
            (ceil mode: a ragged edge forms smaller windows). 1 keeps every patch.
        tokens_per_frame: instead of ``spatial_pool``, adaptive average pooling of each frame to
            this many tokens (a perfect square: 1, 4, 9, 16, …).
        spatial_merge: how ``spatial_pool``'s s×s window becomes one token. "avg": the mean of its
            patches. "concat": its patches side by side (D·s² wide; a ragged edge is padded with
            zeros) into the projector's first layer, as Qwen2-VL's patch merger and InternVL's pixel
            shuffle do, so the token keeps which patch showed what (an average mixes a small object's
            patch with its empty neighbours). Not with ``tokens_per_frame`` or ``use_cls_token``.
        max_video_tokens: a budget for the number of frame tokens; when T·k exceeds it, frames are
            average-pooled in time down to ``max_video_tokens // k``. None: no budget.
        projector_hidden_act: activation between the projector's two linear layers.
        video_token_id: id of ``<video>`` in the tokenizer; placeholders with this id are replaced by
            video features.
        use_cls_token: prepend the encoder's cls token to the video tokens (one extra token).
        base_llm: where the LLM came from ("smollm2", a Hub id or a path). A checkpoint saved with a
            LoRA adapter stores only this reference plus the adapter, and loads the base from it.
        word_anchor: groups of words (e.g. the colours, the shapes, the motions) that anchor the
            video tokens in the LLM's vocabulary: each token becomes, per group, a softmax-weighted
            sum of the LLM's input embeddings of the group's words (plus an implicit "none" at
            ``anchor_none_logit``), plus a gated copy of the projector's output (gate starts at 0). See
            `VideoProjector.anchor`. None: plain projector.
        anchor_temperature: τ of the anchor's scores, τ·cos(token, centred word embedding).
        anchor_none_logit: the logit of each group's "none" (default 0). With b > 0 a word needs
            τ·cos > b to take much of a token's mass, so tokens that match every word a little
            (real video, background) carry almost none, while tokens that match one word well keep
            it: at b = 4, a 256-frame V-NIAH haystack's tokens carry 0.03 shape-word mass each
            instead of 0.6, the needle's token 0.91 instead of 0.99 (run23's projector).
        stem_skip: the projector also reads the encoder's first block input (the patch stem's
            output plus positions), max-pooled over each token's window, through a linear layer of
            its own added to its first layer's output. What the stem tells apart (the conv stem's
            warm-up teaches it shape) then reaches the tokens even where the blocks lose it.
    """

    model_type = "videomap_llm"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="videomap"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }

    def __init__(
        self,
        vision_config=None,
        text_config=None,
        spatial_pool: int = 2,
        tokens_per_frame: int | None = None,
        spatial_merge: str = "avg",
        max_video_tokens: int | None = None,
        projector_hidden_act: str = "gelu",
        video_token_id: int | None = None,
        use_cls_token: bool = False,
        base_llm: str | None = None,
        word_anchor: list[list[str]] | None = None,
        anchor_temperature: float = 15.0,
        anchor_none_logit: float = 0.0,
        stem_skip: bool = False,
        **kwargs,
    ):
        self.vision_config = _sub_config(vision_config, "videomap", "vision_config")
        self.text_config = _sub_config(text_config, "llama", "text_config")
        if not hasattr(self.vision_config, "patch_size") or not hasattr(self.vision_config, "embed_dim"):
            raise ValueError(
                f"vision_config must be a video encoder config with patch_size and embed_dim "
                f"(videomap or vit_video); got model_type {self.vision_config.model_type!r}"
            )
        if isinstance(spatial_pool, bool) or not isinstance(spatial_pool, int) or spatial_pool < 1:
            raise ValueError(f"spatial_pool must be an integer >= 1; got {spatial_pool!r}")
        if tokens_per_frame is not None:
            side = math.isqrt(tokens_per_frame) if isinstance(tokens_per_frame, int) and tokens_per_frame > 0 else 0
            if isinstance(tokens_per_frame, bool) or side * side != tokens_per_frame:
                raise ValueError(f"tokens_per_frame must be a perfect square >= 1 (1, 4, 9, …); got {tokens_per_frame!r}")
        if spatial_merge not in SPATIAL_MERGES:
            raise ValueError(f"spatial_merge must be one of {SPATIAL_MERGES}; got {spatial_merge!r}")
        if spatial_merge == "concat" and (tokens_per_frame is not None or use_cls_token):
            raise ValueError("spatial_merge='concat' merges spatial_pool's s×s windows; it does not combine with "
                             "tokens_per_frame (adaptive pooling) or use_cls_token (the cls token is D wide, not D·s²)")
        if max_video_tokens is not None and (
            isinstance(max_video_tokens, bool) or not isinstance(max_video_tokens, int) or max_video_tokens < 1
        ):
            raise ValueError(f"max_video_tokens must be an integer >= 1 or None; got {max_video_tokens!r}")
        from transformers.activations import ACT2FN

        if projector_hidden_act not in ACT2FN:
            raise ValueError(f"unknown projector_hidden_act {projector_hidden_act!r}; e.g. 'gelu', 'silu'")
        if video_token_id is not None and not 0 <= video_token_id < self.text_config.vocab_size:
            raise ValueError(
                f"video_token_id={video_token_id} is outside the LLM vocabulary "
                f"(vocab_size={self.text_config.vocab_size}); resize the embeddings after adding {VIDEO_TOKEN}"
            )
        if word_anchor is not None:
            if (not isinstance(word_anchor, (list, tuple)) or not word_anchor
                    or not all(isinstance(g, (list, tuple)) and g and all(isinstance(w, str) and w for w in g)
                               for g in word_anchor)):
                raise ValueError(f"word_anchor must be a non-empty list of non-empty lists of words; got {word_anchor!r}")
            word_anchor = [list(g) for g in word_anchor]
        if not isinstance(anchor_temperature, (int, float)) or anchor_temperature <= 0:
            raise ValueError(f"anchor_temperature must be > 0; got {anchor_temperature!r}")
        if (isinstance(anchor_none_logit, bool) or not isinstance(anchor_none_logit, (int, float))
                or not math.isfinite(anchor_none_logit)):
            raise ValueError(f"anchor_none_logit must be a finite number; got {anchor_none_logit!r}")
        if not isinstance(stem_skip, bool):
            raise ValueError(f"stem_skip must be true or false; got {stem_skip!r}")
        self.stem_skip = stem_skip
        self.word_anchor = word_anchor
        self.anchor_temperature = float(anchor_temperature)
        self.anchor_none_logit = float(anchor_none_logit)
        self.spatial_pool = spatial_pool
        self.tokens_per_frame = tokens_per_frame
        self.spatial_merge = spatial_merge
        self.max_video_tokens = max_video_tokens
        self.projector_hidden_act = projector_hidden_act
        self.video_token_id = video_token_id
        self.use_cls_token = use_cls_token
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
        return out

    def for_llm(self, text_config, video_token_id: int | None, base_llm: str | None) -> "VideoLLMConfig":
        """This config's encoder and projector settings on another (or a freshly loaded) LLM: every
        constructor argument but the LLM's three is carried over, so a setting added to
        ``__init__`` later is carried too (finetune's ``init_from``)."""
        import inspect

        llm_side = {"self", "vision_config", "text_config", "video_token_id", "base_llm", "kwargs"}
        carried = {name: getattr(self, name) for name in inspect.signature(type(self).__init__).parameters
                   if name not in llm_side}
        return type(self)(vision_config=self.vision_config, text_config=text_config,
                          video_token_id=video_token_id, base_llm=base_llm, **carried)

    # ---- token arithmetic (shared by the projector and the processor) -----------------------

    def frame_grid(self, height: int, width: int) -> tuple[int, int]:
        """(h, w): the patch grid of one frame of height × width pixels."""
        P = self.vision_config.patch_size
        if height % P or width % P:
            raise ValueError(f"frame size {height}x{width} must be a multiple of the patch size {P}")
        return height // P, width // P

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

    def num_video_tokens(self, num_frames: int, height: int, width: int) -> int:
        """K: how many ``<video>`` placeholders a (num_frames, height, width) clip fills."""
        h, w = self.frame_grid(height, width)
        kh, kw = self.tokens_per_frame_for(h, w)
        k = kh * kw
        return self.pooled_frames(num_frames, k) * k + int(self.use_cls_token)


AutoConfig.register("videomap_llm", VideoLLMConfig, exist_ok=True)
