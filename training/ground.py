"""Grounding: align the video tokens with the LLM's own word embeddings, without running the LLM.

    python -m training.ground --config training/configs/ground_nano.yaml \\
        encoder=runs/x/pretrain/encoder output_dir=runs/x/ground
    → output_dir/final (a VideoLLM config + encoder and projector weights: stage 1's ``init_from``)

Why: in stages 1 and 2 every example costs a forward and a backward pass through the whole LLM
(about 5 ms a token on two CPU cores), and a fresh projector's tokens mean nothing to the LLM, so
most of that budget goes to discovering which direction of the embedding space is "red". This
stage learns that from the synthetic clips' ground truth at the cost of the encoder alone: the
encoder and the projector are trained so that each video token points where the LLM's input
embeddings of the words for what it shows point (the colour, shape and motion words of the objects
in its region). Pointing the right way is not enough for the LLM to read a token as a word (the
tokens keep their own norm and off-word directions); finetune's ``word_anchor`` turns each token
into the mix of the words it scores (`videollm.modeling_videollm.VideoProjector.anchor`).

Objective (``objective: dense``, the default). The generator knows where every object is in
every frame (`videollm.data.synth.visible_coverage`), so each video token gets its own target:

    z_k  = projector(encoder(clip))_k                 video tokens, k = 1…K      (K, D_llm)
    e_w  = mean input embedding of " w"'s sub-tokens, minus the mean over WORDS   (W, D_llm)
    s_kw = τ · cos(z_k, e_w)                           token k's score for word w
    loss = Σ_groups mean_k CE(softmax(s_k,group ∪ {none: 0}), target_k,group)
           + λ · mean_k (‖z_k‖ / ē − 1)²

A token (a frame × a cell of the pooled grid) whose cell holds an object's centre targets that
object's colour in that frame, its shape and its motion words (`token_targets`); an empty cell
targets "none" (every word scored below 0; weighted by ``null_weight``); a cell that shows only
part of an object has no target. So a token says what the object in its place is: "what colour
is the diamond?" is read where "diamond" is. ``objective: mil`` is the earlier per-clip
multiple-instance loss (each word of the clip scored by its best token, s_w = max_k s_kw): it
does not say which token shows what, and left the moving object's colour at 75% and its shape at
chance (150 steps, nano, 64 px).

Groups are colours, shapes and motions. Word embeddings are centred first: the raw rows of words
of one kind are close to one another (every colour is near "colour"), and what has to be told
apart is the difference. ē is the mean norm of the LLM's embedding rows, so video tokens sit at
the scale of words.
Clips: the three synthetic tasks (`videollm.data.synth`, ``clip_frames`` frames) and, for
``needle_fraction`` of each batch, a V-NIAH-style haystack (``haystack_frames`` frames of the
bundled real clips, which name no word) with a one-frame `make_needle` shape at a random depth, so
a brief shape in long real video is singled out as well. Clips are rendered on the fly from seeds
(step, index), so a resumed run sees exactly the clips it would have seen.

Before the main steps, ``stem_steps`` > 0 warms up the encoder's patch stem alone on single frames
(`warm_stem`), which is about 25× cheaper a step than the whole encoder on a clip; an encoder's
motion stem (``motion_gap``), on pairs of frames, to name motion.

Logged: loss, and on ``eval_clips`` held-out clips (seeds never used in training) the top-1
accuracy, read off the token scores, of the colour, shape and direction of a lone moving object and
of the needle's shape and colour, and the binding accuracies of `binding` (an attribute read at
the token that best matches another, as a question about "the diamond" needs) — how much of the
video the tokens already name; ``stem.json``: the warm-up's held-out cell accuracies.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from encoder.errors import UserError, run_cli
from training.config import config_from_argv, to_dict
from videollm.data.synth import COLORS, DIRECTIONS, SHAPES

logger = logging.getLogger("training.ground")

# The generator's own vocabulary. A motion names its words: "up-left" is both "up" and "left";
# the non-directional motions are named as in the captions ("stays still", "bounces", …).
_MOTION_TO_WORDS = {"static": ("still",), "bounce": ("bounces",), "grow": ("grows",), "shrink": ("shrinks",)}
COLOR_WORDS = tuple(COLORS)
SHAPE_WORDS = tuple(SHAPES)
MOTION_WORDS = tuple(d for d in DIRECTIONS if "-" not in d) + tuple(w for ws in _MOTION_TO_WORDS.values() for w in ws)
WORDS = COLOR_WORDS + SHAPE_WORDS + MOTION_WORDS


@dataclass
class GroundData:
    clip_frames: int = 16
    size: int = 64
    needle_fraction: float = 0.25  # share of each batch that is a real-video haystack with a needle
    haystack_frames: int = 64


@dataclass
class GroundConfig:
    output_dir: str = "runs/ground"
    encoder: str = "nano"  # a pretrained encoder dir (or a preset: random init)
    llm: str = "smollm2"  # only its input embeddings are used
    llm_cache_dir: str | None = None
    spatial_pool: int = 2
    spatial_merge: str = "avg"  # how the projector merges a pooled window: avg | concat (VideoLLMConfig)
    stem_skip: bool = False  # the projector also reads the patch stem (VideoLLMConfig.stem_skip)
    steps: int = 300
    batch_size: int = 16  # clips per step (short clips + needle haystacks)
    lr: float = 1.0e-3  # projector
    encoder_lr: float = 5.0e-4
    warmup_steps: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    objective: str = "dense"  # "dense": per-token targets from the rendered objects; "mil": per-clip words
    temperature: float = 15.0  # τ: cosine → logit scale
    norm_weight: float = 0.1  # λ
    null_weight: float = 0.5  # dense: weight of the background tokens' "nothing" loss
    # dense: the logit of each group's "none" class (0: a background token must score every word
    # below 0, which centred word keys barely allow: run23's null loss stayed at ~2.0, near uniform).
    # Saved as the projector's anchor_none_logit, so the anchor reads tokens as they were trained.
    none_logit: float = 0.0
    min_cover: float = 12.0  # dense: pixels of an object a token's cell must show to be about it
    stem_steps: int = 0  # appearance warm-up of the encoder's patch stem before the main steps (0: none)
    stem_batch: int = 64  # frames per warm-up step
    stem_lr: float = 1.0e-3
    stem_shape_first: float = 0.0  # share of the warm-up steps that train shape alone before colour joins
    eval_clips: int = 48
    save_every: int = 100
    log_every: int = 10
    seed: int = 0
    resume: bool = False
    data: GroundData = field(default_factory=GroundData)

    def validate(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise UserError(f"steps and batch_size must be >= 1; got steps={self.steps}, batch_size={self.batch_size}")
        if not 0.0 <= self.data.needle_fraction <= 1.0:
            raise UserError(f"data.needle_fraction must be in [0, 1]; got {self.data.needle_fraction}")
        if self.stem_steps < 0 or self.stem_batch < 1:
            raise UserError(f"stem_steps must be >= 0 and stem_batch >= 1; got {self.stem_steps}, {self.stem_batch}")
        if not 0.0 <= self.stem_shape_first <= 1.0:
            raise UserError(f"stem_shape_first must be in [0, 1] (a share of stem_steps); got {self.stem_shape_first}")
        from videollm.configuration_videollm import SPATIAL_MERGES

        if self.spatial_merge not in SPATIAL_MERGES:
            raise UserError(f"spatial_merge must be one of {SPATIAL_MERGES}; got {self.spatial_merge!r}")
        if self.objective not in ("dense", "mil"):
            raise UserError(f"objective must be 'dense' or 'mil'; got {self.objective!r}")
        if self.data.haystack_frames < 2:
            raise UserError(f"data.haystack_frames must be >= 2; got {self.data.haystack_frames}")
        if isinstance(self.none_logit, bool) or not isinstance(self.none_logit, (int, float)) \
                or not math.isfinite(self.none_logit):
            raise UserError(f"none_logit must be a finite number; got {self.none_logit!r}")


# ---------------------------------------------------------------------------------------------
# Words and clips
# ---------------------------------------------------------------------------------------------


def word_embeddings(llm_embeddings: torch.Tensor, tokenizer) -> torch.Tensor:
    """(W, D): the LLM's embedding of each of `WORDS` (`videollm.modeling_videollm.word_embedding_rows`)."""
    from videollm.modeling_videollm import word_embedding_rows

    return word_embedding_rows(llm_embeddings, tokenizer, WORDS)


def clip_words(spec) -> set[str]:
    """The words that name something in a `videollm.data.synth.SynthSpec`: every object's colours
    (including those it turns into), shape and motion."""
    words = set()
    for obj in spec.objects:
        words.add(obj.color)
        words.update(new for _, new in obj.color_changes)
        words.add(obj.shape)
        if spec.task != "needle":
            words.update(_MOTION_TO_WORDS.get(obj.motion, tuple(obj.motion.split("-"))))
    unknown = words - set(WORDS)
    if unknown:
        raise ValueError(f"no grounding word for {sorted(unknown)}; extend training.ground.WORDS")
    return words


GROUPS = (COLOR_WORDS, SHAPE_WORDS, MOTION_WORDS)
WORD_GROUPS = {"colors": COLOR_WORDS, "shapes": SHAPE_WORDS, "motions": MOTION_WORDS}


def group_loss(scores: torch.Tensor, word_sets: list[set[str]]) -> torch.Tensor:
    """Mean over clips and word groups of the cross-entropy between the softmax of the group's clip
    scores and the uniform distribution over the group's words present in the clip (a group with
    no word in the clip, e.g. motion for a needle, is skipped)."""
    losses = []
    for group in GROUPS:
        idx = [WORDS.index(w) for w in group]
        logp = scores[:, idx].log_softmax(-1)  # (B, |group|)
        for b, words in enumerate(word_sets):
            present = [i for i, w in enumerate(group) if w in words]
            if present:
                losses.append(-logp[b, present].mean())
    return torch.stack(losses).mean()


def object_words(obj, t: int, needle: bool) -> list[str]:
    """The words for `obj` as frame t shows it: its colour then, its shape, its motion's words
    (none for a needle, which does not move)."""
    words = [obj.color_at(t), obj.shape]
    if not needle:
        words += _MOTION_TO_WORDS.get(obj.motion, tuple(obj.motion.split("-")))
    return words


def token_targets(spec, at: int, num_frames: int, cells: tuple[int, int], min_cover: float,
                  frames: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense targets for the video tokens of a video of `num_frames` frames whose frames
    ``[at, at + spec.num_frames)`` are `spec` rendered (the rest shows no object): one token per
    frame and cell of a ``cells`` = (kh, kw) grid, frame-major as the projector orders them.
    With ``frames`` (spec frame indices), only those frames, in that order (``at`` and
    ``num_frames`` are then ignored).

    A token is about an object when the object's centre is in the token's cell in that frame and
    at least ``min_cover`` of its pixels show there (after occlusion); of two such objects, the one
    that shows more. A cell that shows ``min_cover`` pixels of some object without holding its
    centre sees only part of it (which shape a corner belongs to is not knowable there): no target.
    Any other cell is background. Returns ``(targets, about)``: float (K, W), 1 at the words
    (`object_words`) of the token's object, and int8 (K,): 1 about an object, 0 background (target
    "no word"), -1 no target."""
    from videollm.data.synth import trajectory, visible_coverage

    kh, kw = cells
    S = spec.size
    if S % kh or S % kw:
        raise ValueError(f"frame size {S} is not a multiple of the token grid {kh}×{kw}")
    if frames is not None:
        at, num_frames = 0, len(frames)
    else:
        frames = list(range(min(spec.num_frames, num_frames - at)))
    targets = torch.zeros(num_frames, kh * kw, len(WORDS))
    about = torch.zeros(num_frames, kh * kw, dtype=torch.int8)
    if spec.objects and frames:
        cover = visible_coverage(spec, frames)  # (N, F, S, S)
        N, n = cover.shape[:2]
        area = cover.reshape(N, n, kh, S // kh, kw, S // kw).sum((3, 5)).reshape(N, n, kh * kw)  # (N, F, k)
        about[at:at + n][area.max(0) >= min_cover] = -1
        paths = [trajectory(obj, spec.num_frames, S) for obj in spec.objects]
        needle = spec.task == "needle"
        for j, t in enumerate(frames):
            home: dict[int, int] = {}
            for i, (xs, ys, _) in enumerate(paths):
                cy, cx = int(ys[t] // (S // kh)), int(xs[t] // (S // kw))
                if not (0 <= cy < kh and 0 <= cx < kw):
                    continue
                c = cy * kw + cx
                if area[i, j, c] >= min_cover and (c not in home or area[i, j, c] > area[home[c], j, c]):
                    home[c] = i
            for c, i in home.items():
                about[at + j, c] = 1
                for w in object_words(spec.objects[i], t, needle):
                    targets[at + j, c, WORDS.index(w)] = 1.0
    return targets.reshape(-1, len(WORDS)), about.reshape(-1)


def dense_loss(token_scores: torch.Tensor, targets: torch.Tensor, about: torch.Tensor,
               groups=GROUPS, none_logit: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy within each word group, with a "no word" class of logit
    ``none_logit``: tokens about an object → uniform over its words in the group (a group it has no
    word in, a needle's motion, is skipped); background tokens → "no word", i.e. every word's score
    below ``none_logit``.

    token_scores, targets (B, K, W); about (B, K): 1 object, 0 background, -1 no target (see
    `token_targets`). Returns (object-token CE, background CE)."""
    obj_terms, null_terms = [], []
    for group in groups:
        idx = [WORDS.index(w) for w in group]
        logits = torch.cat([token_scores[..., idx], token_scores.new_full((*token_scores.shape[:2], 1), none_logit)], -1)
        logp = logits.log_softmax(-1)  # (B, K, |group| + 1)
        t = targets[..., idx]
        n = t.sum(-1)
        has = (about == 1) & (n > 0)
        obj_terms.append((-(logp[..., :-1] * t).sum(-1) / n.clamp(min=1))[has])
        null_terms.append(-logp[..., -1][about == 0])
    obj, null = torch.cat(obj_terms), torch.cat(null_terms)
    zero = token_scores.sum() * 0.0
    return (obj.mean() if obj.numel() else zero), (null.mean() if null.numel() else zero)


class ClipSource:
    """Seeded clips: ``short(seed)`` is a synthetic clip of a random task, ``needle(seed)`` a
    real-video haystack with a one-frame needle. Both return (frames uint8 (T, S, S, 3), words,
    the `SynthClip` drawn, the frame of the video where that clip's first frame is)."""

    def __init__(self, data: GroundData):
        from encoder.video_io import SAMPLE_CLIPS, read_video
        from videollm.data.synth import square_frames

        self.data = data
        self.real = [square_frames(read_video(name, 64).frames, data.size) for name in SAMPLE_CLIPS]

    def short(self, seed: int):
        from videollm.data.synth import make_clip

        clip = make_clip(seed, self.data.clip_frames, self.data.size, self._task(seed))
        return clip.frames, clip_words(clip.spec), clip, 0

    def short_spec(self, seed: int):
        """The spec of ``short(seed)``'s clip, not rendered."""
        from videollm.data.synth import sample_spec

        return sample_spec(np.random.default_rng(int(seed)), self.data.clip_frames, self.data.size, self._task(seed))

    @staticmethod
    def _task(seed: int) -> str:
        from videollm.data.synth import TASKS

        return TASKS[int(np.random.default_rng([seed, 1]).integers(len(TASKS)))]

    def needle(self, seed: int):
        from videollm.data.synth import insert_needle, make_needle

        rng = np.random.default_rng([seed, 2])
        parts, total = [], 0
        while total < self.data.haystack_frames:
            src = self.real[int(rng.integers(len(self.real)))]
            k = int(rng.integers(8, 33))
            a = int(rng.integers(0, len(src) - min(k, len(src)) + 1))
            parts.append(src[a:a + k])
            total += len(parts[-1])
        haystack = np.concatenate(parts)[:self.data.haystack_frames]
        needle = make_needle(seed, num_frames=1, size=self.data.size)
        video, (start, _) = insert_needle(haystack, needle.frames, float(rng.uniform(0, 1)))
        return video, clip_words(needle.spec), needle, start


def batch_seeds(seed: int, step: int, n: int) -> list[int]:
    """Clip seeds of training step `step` (eval clips use `eval_seeds`, which never collide:
    training seeds are drawn from a different SeedSequence)."""
    return [int(s) for s in np.random.SeedSequence([seed, 31, step]).generate_state(n)]


def eval_seeds(seed: int, n: int) -> list[int]:
    return [int(s) for s in np.random.SeedSequence([seed, 37]).generate_state(n)]


# ---------------------------------------------------------------------------------------------
# Objective
# ---------------------------------------------------------------------------------------------


class WordScorer(torch.nn.Module):
    """Video tokens (B, K, D) → per-word clip scores (B, W) and the norm penalty (see module doc)."""

    def __init__(self, word_emb: torch.Tensor, embed_norm: float, temperature: float):
        super().__init__()
        centred = word_emb.detach().float() - word_emb.detach().float().mean(0)
        self.register_buffer("words", F.normalize(centred, dim=-1), persistent=False)
        self.embed_norm = float(embed_norm)
        self.temperature = float(temperature)

    def token_scores(self, z: torch.Tensor) -> torch.Tensor:
        return self.temperature * F.normalize(z, dim=-1) @ self.words.T  # (B, K, W)

    def norm_penalty(self, z: torch.Tensor) -> torch.Tensor:
        return ((z.norm(dim=-1) / self.embed_norm - 1.0) ** 2).mean()

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.token_scores(z).amax(dim=1), self.norm_penalty(z)  # (B, W), ()


def _pixels(frames: list[np.ndarray], size: int) -> torch.Tensor:
    from encoder.transforms import frames_to_tensor

    return torch.stack([frames_to_tensor(f, size) for f in frames])  # (B, 3, T, S, S)


@torch.no_grad()
def evaluate(model, scorer: WordScorer, source: ClipSource, seeds: list[int], size: int,
             cells: tuple[int, int], min_cover: float = 12.0) -> dict[str, float]:
    """Top-1 word accuracy, within each word group, for the motion task's moving object and for the
    needle (its shape and colour), read off the best token of the clip; and per token about the
    moving object (`token_targets`), its motion words (``motion_token``) and, for the four plain
    directions, its direction (``direction_token``)."""
    from videollm.data.synth import make_clip

    model.eval()
    hits: dict[str, list[bool]] = {"color": [], "shape": [], "direction": [], "needle_shape": [], "needle_color": [],
                                   "motion_token": [], "direction_token": []}
    groups = {"color": COLOR_WORDS, "shape": SHAPE_WORDS}
    for i, s in enumerate(seeds):
        if i % 2 == 0:
            clip = make_clip(s, source.data.clip_frames, size, "motion", distractors=0)
            frames, obj = clip.frames, clip.spec.objects[0]
        else:
            frames, _, needle, _ = source.needle(s)
            obj = needle.spec.objects[0]
        scores = scorer.token_scores(model.get_video_features(_pixels([frames], size)))[0]  # (K, W)
        if i % 2 == 0:  # per token about the object: its motion words, and its plain direction
            targets, about = token_targets(clip.spec, 0, len(frames), cells, min_cover)
            hits["motion_token"] += _token_hits(scores, targets, about, MOTION_WORDS)
            if "-" not in obj.motion and obj.motion in MOTION_WORDS:
                hits["direction_token"] += _token_hits(scores, targets, about, ("left", "right", "up", "down"))
        tok = scores.amax(dim=0)  # (W,): the clip's best token for each word

        def best(words):
            return words[int(tok[[WORDS.index(w) for w in words]].argmax())]

        if i % 2 == 0:
            hits["color"].append(best(groups["color"]) == obj.color)
            hits["shape"].append(best(groups["shape"]) == obj.shape)
            if "-" not in obj.motion:  # the four plain directions: one word each
                hits["direction"].append(best(("left", "right", "up", "down")) == obj.motion)
        else:
            hits["needle_shape"].append(best(groups["shape"]) == obj.shape)
            hits["needle_color"].append(best(groups["color"]) == obj.color)
    hits.update(binding(model, scorer, seeds, source.data.clip_frames, size, cells))
    model.train()
    return {f"acc_{k}": round(float(np.mean(v)), 4) for k, v in hits.items() if v}


def _token_hits(scores: torch.Tensor, targets: torch.Tensor, about: torch.Tensor, words) -> list[bool]:
    """Per token about an object (``about`` 1): is its best-scoring word of `words` one of its targets?
    scores, targets (…, W); about (…) — one clip's tokens or a batch's."""
    idx = [WORDS.index(w) for w in words]
    pred = scores[..., idx].argmax(-1)
    return (targets[..., idx].gather(-1, pred[..., None])[..., 0] > 0)[about == 1].tolist()


@torch.no_grad()
def binding(model, scorer: WordScorer, seeds: list[int], frames: int, size: int,
            cells: tuple[int, int]) -> dict[str, list[bool]]:
    """Can one attribute be read where another is, as a question like "what colour is the star?"
    needs? On ``count`` clips of 1–4 objects, per object: the token that scores its shape highest,
    read for its colour in that frame (``bind_color``) and its motion (``bind_motion``); the token
    that scores its colour highest, read for its shape (``bind_shape``)."""
    from videollm.data.synth import make_clip

    hits: dict[str, list[bool]] = {"bind_color": [], "bind_shape": [], "bind_motion": []}
    per_frame = cells[0] * cells[1]
    for s in seeds:
        clip = make_clip(s + 1, frames, size, "count")
        tok = scorer.token_scores(model.get_video_features(_pixels([clip.frames], size)))[0]  # (K, W)

        def read(k, words):
            return words[int(tok[k, [WORDS.index(w) for w in words]].argmax())]

        for obj in clip.spec.objects:
            k = int(tok[:, WORDS.index(obj.shape)].argmax())
            hits["bind_color"].append(read(k, COLOR_WORDS) == obj.color_at(k // per_frame))
            hits["bind_motion"].append(read(k, MOTION_WORDS) in object_words(obj, 0, False)[2:])
            k = int(tok[:, WORDS.index(obj.color)].argmax())
            hits["bind_shape"].append(read(k, SHAPE_WORDS) == obj.shape)
    return hits


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def _stem_frames(source: ClipSource, seeds: list[int], cells: tuple[int, int], min_cover: float, gap: int = 0):
    """One frame per seed and its dense targets: a random frame of a short synthetic clip, or (one
    seed in 8) a frame of a bundled real clip, which is all background. With ``gap`` > 0 (an
    encoder with a motion stem) each sample is the frame ``gap`` before it and the frame, and the
    targets are the second's. Returns pixels (B, 3, 1 or 2, S, S), targets (B, k, W), about (B, k)."""
    from videollm.data.synth import render

    frames, targets, about = [], [], []
    k = cells[0] * cells[1]
    for s in seeds:
        rng = np.random.default_rng([s, 3])
        if rng.random() < 1 / 8:
            src = source.real[int(rng.integers(len(source.real)))]
            t = int(rng.integers(min(gap, len(src) - 1), len(src)))
            frames.append(src[[max(t - gap, 0), t] if gap else [t]])
            targets.append(torch.zeros(k, len(WORDS)))
            about.append(torch.zeros(k, dtype=torch.int8))
            continue
        spec = source.short_spec(s)
        t = int(rng.integers(min(gap, spec.num_frames - 1), spec.num_frames))
        tg, ab = token_targets(spec, 0, 1, cells, min_cover, frames=[t])
        frames.append(render(spec, [max(t - gap, 0), t] if gap else [t]))
        targets.append(tg)
        about.append(ab)
    return _pixels(frames, source.data.size), torch.stack(targets), torch.stack(about)


class StemHead(torch.nn.Module):
    """Word scores of each token cell straight from a patch stem: the last frame's patch features
    (B, D, T, h, w), max-pooled over the cell's patches (where in the cell the object is does not
    matter), then one linear layer. Only used to warm the stem up; thrown away after."""

    def __init__(self, dim: int, pool: int):
        super().__init__()
        self.pool = pool
        self.linear = torch.nn.Linear(dim, len(WORDS))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(features[:, :, -1], self.pool, self.pool, ceil_mode=True)  # (B, D, kh, kw)
        return self.linear(x.flatten(2).transpose(1, 2))  # (B, k, W)


def _stem_features(emb, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The appearance stem's patch features of the last frame of `pixels` (B, 3, T, S, S), and the
    motion stem's (None without one), each (B, D, 1, h, w): warmed up apart, so that neither
    takes the other's channels."""
    appearance = emb._embed(pixels[:, :, -1:], emb.stem, emb.proj)
    if not emb.motion_gap:
        return appearance, None
    diff = pixels[:, :, -1:] - pixels[:, :, :1]  # the sample's two frames are `gap` apart
    return appearance, emb._embed(diff, emb.motion_stem, emb.motion_proj)


def stem_groups(cfg: GroundConfig, step: int) -> tuple[tuple[str, ...], ...]:
    """The word groups warm-up step `step` trains: shape alone for the first ``stem_shape_first``
    of the steps, then colour and shape."""
    if step < round(cfg.stem_shape_first * cfg.stem_steps):
        return (SHAPE_WORDS,)
    return (COLOR_WORDS, SHAPE_WORDS)


def warm_stem(model, cfg: GroundConfig, source: ClipSource, cells: tuple[int, int]) -> dict[str, float]:
    """The appearance warm-up (``stem_steps`` > 0): train the encoder's patch stem alone, on single
    frames, to name the colour and shape of the object in each token cell (the main objective's
    dense targets and loss without motion, which one frame does not show, read by a `StemHead`).

    Why: the full encoder learns shape very slowly from these clips. On single-object 64 px frames
    with direct shape supervision, 400 steps of 64 frames left the whole nano encoder at chance,
    while its convolutional stem alone (``patch_stem="conv"``) reached 90% in 600 steps and
    99% in 1200, at about 30 ms a step; the linear 16×16 patchify alone reached 48% in 1500. So
    the cheap part learns what things look like first, and the main steps teach the blocks and the
    projector to carry it into the video tokens.

    Colour and shape trained together from the first step leave shape near chance: on the
    multi-object frames, a conv stem 1.5× as wide as nano's got 25% shape held-out in 600 steps
    (22% without the background term), shape alone 45% (57% without the background term), and
    shape alone for 1200 steps 80%. Colour is learned fast and takes the stem's few channels
    first. ``stem_shape_first`` of the steps train shape alone (1200 steps at 0.8: shape 76%,
    colour 71% in that probe; 63% and 55% with nano's stem, as the pipeline's warm-up). Alone, the
    gain did not survive the main steps (150 steps after it: shape 37.5%, as without it, and colour
    83% against 100%; with the stem frozen in the main steps, shape 33% and colour 54%): the blocks
    lose what the stem tells apart. With ``stem_skip`` the projector reads the stem directly, and
    it does survive (150 steps from the same encoder: tokens name shape 62.5% against 29%, the
    needle's shape 83% against 33%, colour 100% both), so the pipeline runs the two together.
    The warm-up was still learning at 1200 steps: at 3000 (with the motion stem, shape first 0.8,
    ~85 ms a step) its held-out cells name shape 82.5% (57.0% at 1200), colour 87.7% (59.0%) and
    motion 84.0% (74.2%), and after 300 main steps the tokens name a single moving object's shape
    95.8% of the time (66.7%). At 5000 warm-up and 420 main steps: cells shape 87.7%, colour
    89.7%, motion 86.0%; tokens shape 100%, direction 83.3% per token (55.7% at 3000 and 300).

    An encoder with a motion stem (``motion_gap`` g > 0, `encoder.layers.PatchEmbed3D`) warms it
    up too, on pairs of frames g apart, to name each cell's motion words from the pair's
    difference; it has its own head and its own loss from the first step, so it takes nothing from
    the appearance stem. Probed from scratch (1200 steps, nano width, shape first 0.8): motion 75%
    of the cells (41% say "still"), shape 60%, colour 54%. One head for both, motion from the first
    step: motion 80%, but shape 42% and colour 48%; motion only in the last 20% of the steps: 39%.
    Returns held-out cell accuracies (``stem_acc_*``)."""
    emb = model.vision_tower.embeddings.patch_embed
    gap = emb.motion_gap
    dim = model.config.vision_config.embed_dim
    head = StemHead(dim, cfg.spatial_pool)
    motion_head = StemHead(dim, cfg.spatial_pool) if gap else torch.nn.Identity()
    opt = torch.optim.AdamW([*emb.parameters(), *head.parameters(), *motion_head.parameters()], lr=cfg.stem_lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _warm_lr(cfg.stem_steps))
    for step in range(cfg.stem_steps):
        seeds = [int(s) for s in np.random.SeedSequence([cfg.seed, 41, step]).generate_state(cfg.stem_batch)]
        pixels, targets, about = _stem_frames(source, seeds, cells, cfg.min_cover, gap)
        appearance, motion = _stem_features(emb, pixels)
        ce_obj, ce_null = dense_loss(head(appearance), targets, about, stem_groups(cfg, step))
        loss = ce_obj + cfg.null_weight * ce_null
        if motion is not None:  # the motion stem learns motion alone, from every step
            ce_obj, ce_null = dense_loss(motion_head(motion), targets, about, (MOTION_WORDS,))
            loss = loss + ce_obj + cfg.null_weight * ce_null
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % max(1, cfg.stem_steps // 10) == 0:
            logger.info("stem step %d loss %.4f", step + 1, float(loss.detach()))
    hits: dict[str, list[bool]] = {}
    with torch.no_grad():
        seeds = [int(s) for s in np.random.SeedSequence([cfg.seed, 43]).generate_state(256)]
        pixels, targets, about = _stem_frames(source, seeds, cells, cfg.min_cover, gap)
        appearance, motion = _stem_features(emb, pixels)
        reads = [("color", COLOR_WORDS, head(appearance)), ("shape", SHAPE_WORDS, head(appearance))]
        if motion is not None:
            reads.append(("motion", MOTION_WORDS, motion_head(motion)))
        for name, group, scores in reads:
            hits[name] = _token_hits(scores, targets, about, group)
    return {f"stem_acc_{k}": round(float(np.mean(v)), 4) for k, v in hits.items() if v}


def _warm_lr(steps: int):
    warm = max(1, steps // 20)
    return lambda i: min(1.0, (i + 1) / warm) * max(0.1, 1.0 - i / max(1, steps))


def _build(cfg: GroundConfig):
    from training.finetune import FinetuneConfig, build_model

    ft = FinetuneConfig(stage=1, llm=cfg.llm, llm_cache_dir=cfg.llm_cache_dir, encoder=cfg.encoder,
                        spatial_pool=cfg.spatial_pool, spatial_merge=cfg.spatial_merge,
                        stem_skip=cfg.stem_skip, seed=cfg.seed)
    ft.data.image_size, ft.data.num_frames = cfg.data.size, cfg.data.clip_frames
    model, tokenizer = build_model(ft)
    model.config.anchor_none_logit = float(cfg.none_logit)  # saved with the init stage 1 reads
    model.requires_grad_(False)
    model.vision_tower.requires_grad_(True)
    model.projector.requires_grad_(True)
    emb = model.get_input_embeddings().weight.detach()
    scorer = WordScorer(word_embeddings(emb, tokenizer), float(emb.norm(dim=-1).mean()), cfg.temperature)
    return model, scorer


def save_init(model, path: Path) -> None:
    """What stage 1's ``init_from`` reads: the VideoLLM config and the encoder + projector weights
    (the LLM is loaded from ``base_llm`` as usual), written atomically."""
    from safetensors.torch import save_file

    from training.checkpoint import atomic_dir

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()
             if k.startswith(("vision_tower.", "projector."))}
    with atomic_dir(path) as tmp:
        model.config.save_pretrained(tmp)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})


def train(cfg: GroundConfig) -> dict[str, Any]:
    from training.checkpoint import MetricsLog, latest_checkpoint, load_checkpoint, save_checkpoint
    from training.finetune import lr_lambda

    cfg.validate()
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_yaml = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    (run_dir / "config.yaml").write_text(config_yaml)
    torch.manual_seed(cfg.seed)
    model, scorer = _build(cfg)
    source = ClipSource(cfg.data)
    params = [{"params": list(model.projector.parameters()), "lr": cfg.lr},
              {"params": list(model.vision_tower.parameters()), "lr": cfg.encoder_lr}]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.warmup_steps, cfg.steps, 0.1))
    trainable = torch.nn.ModuleDict({"vision_tower": model.vision_tower, "projector": model.projector,
                                     "scorer": scorer})
    step = 0
    ckpt = latest_checkpoint(run_dir) if cfg.resume else None
    if ckpt is not None:
        step = load_checkpoint(ckpt, model=trainable, optimizer=optimizer, scheduler=scheduler)["step"]
        logger.info("resumed from %s at step %d", ckpt, step)
    metrics = MetricsLog(run_dir / "metrics.jsonl", resume_step=step if ckpt is not None else None)
    patches = cfg.data.size // model.config.vision_config.patch_size
    cells = model.config.tokens_per_frame_for(patches, patches)  # (kh, kw) video tokens per frame
    if cfg.stem_steps and ckpt is None:  # a resumed run has its warmed stem in the checkpoint
        t0 = time.perf_counter()
        stem = warm_stem(model, cfg, source, cells)
        stem["stem_seconds"] = round(time.perf_counter() - t0, 1)
        (run_dir / "stem.json").write_text(json.dumps(stem, indent=1) + "\n")
        logger.info("stem warm-up: %s", stem)
    n_needle = round(cfg.batch_size * cfg.data.needle_fraction)
    n_short = cfg.batch_size - n_needle
    size = cfg.data.size
    model.train()
    record: dict[str, Any] = {"step": step}
    t_last = time.perf_counter()
    while step < cfg.steps:
        seeds = batch_seeds(cfg.seed, step, cfg.batch_size)
        loss = torch.zeros(())
        parts = {}
        for kind, group, make in (("short", seeds[:n_short], source.short), ("needle", seeds[n_short:], source.needle)):
            if not group:
                continue
            clips = [make(s) for s in group]
            z = model.get_video_features(_pixels([c[0] for c in clips], size))  # (b, K, D_llm)
            tok, norm_pen = scorer.token_scores(z), scorer.norm_penalty(z)  # (b, K, W), ()
            if cfg.objective == "dense":
                targets, about = zip(*(token_targets(c[2].spec, c[3], len(c[0]), cells, cfg.min_cover) for c in clips))
                if z.shape[1] != targets[0].shape[0]:
                    raise UserError(f"dense grounding needs one video token per frame and cell; the projector gave "
                                    f"{z.shape[1]} for {len(clips[0][0])} frames of {cells} cells (temporal pooling?)")
                ce_obj, ce_null = dense_loss(tok, torch.stack(targets), torch.stack(about), none_logit=cfg.none_logit)
                ce = ce_obj + cfg.null_weight * ce_null
                parts[f"ce_null_{kind}"] = float(ce_null.detach())
            else:
                ce = group_loss(tok.amax(dim=1), [c[1] for c in clips])
            loss = loss + (ce + cfg.norm_weight * norm_pen) * len(group) / cfg.batch_size
            parts[f"ce_{kind}"] = float(ce.detach())
            parts[f"norm_{kind}"] = float(norm_pen.detach())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable.parameters(), cfg.grad_clip) if cfg.grad_clip > 0 else None
        optimizer.step()
        lr_used = scheduler.get_last_lr()[0]
        scheduler.step()
        step += 1
        if not math.isfinite(float(loss.detach())):
            raise RuntimeError(f"loss is {float(loss.detach())} at step {step}; lower lr or check the data")
        record = {"step": step, "loss": float(loss.detach()), "lr": lr_used, **parts}
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        if step == cfg.steps:
            record.update(evaluate(model, scorer, source, eval_seeds(cfg.seed, cfg.eval_clips), size, cells,
                                   cfg.min_cover))
        now = time.perf_counter()
        record["sec_per_step"] = round(now - t_last, 3)
        t_last = now
        if step % cfg.log_every == 0 or step == cfg.steps:
            metrics.log(record)
            logger.info("step %d %s", step, {k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()})
        if step % cfg.save_every == 0 or step == cfg.steps:
            save_checkpoint(run_dir, step, model=trainable, optimizer=optimizer, scheduler=scheduler,
                            config_yaml=config_yaml)
    save_init(model, run_dir / "final")
    logger.info("grounded encoder + projector → %s", run_dir / "final")
    return record


def main(argv: list[str] | None = None) -> int:
    cfg = config_from_argv(GroundConfig, "python -m training.ground", __doc__, argv,
                           "encoder=runs/x/pretrain/encoder steps=300")
    train(cfg)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
