"""Grounding: align the video tokens with the LLM's own word embeddings, without running the LLM.

    python -m training.ground --config training/configs/ground_nano.yaml \\
        encoder=runs/x/pretrain/encoder output_dir=runs/x/ground
    → output_dir/final (a VideoLLM: encoder + projector, the LLM by reference: stage 1's ``init_from``)

Why: a fresh projector's tokens mean nothing to the LLM, and stages 1 and 2 pay a pass through the
whole LLM per example to learn which direction is "red"; here the synthetic ground truth teaches it
at the encoder's cost. Stage 1's ``word_anchor`` (`videollm.projectors.WordAnchorProjector`, its
``anchor_none_logit`` = this ``none_logit``) then turns each token into the mix of its words.

Objective ``dense`` (the default), per video token k (a frame × a cell of the pooled grid):

    z_k  = projector(encoder(clip))_k                 video tokens, k = 1…K      (K, D_llm)
    e_w  = mean input embedding of " w"'s sub-tokens, minus the mean over WORDS   (W, D_llm)
    s_kw = τ · cos(z_k, e_w)                           token k's score for word w
    loss = Σ_groups mean_k CE(softmax(s_k,group ∪ {none: none_logit}), target_k,group)
           + λ · mean_k (‖z_k‖ / ē − 1)²

Groups: colours, shapes, motions; targets: `token_targets`. Words are centred because words of one
kind lie close together (every colour near "colour") and the difference is what must be told
apart; ē (the mean norm of the LLM's embedding rows) keeps tokens at the scale of words. ``objective:
mil`` is a per-clip multiple-instance loss instead (each word of the clip scored by its best token).

Real-world concepts (``concepts: true``): the encoder gets a concept stem (`encoder.concepts`) if it has
none, and every token also learns the concepts of its frame, read in the stem's code space: a real
frame's = the stem's classifier's top 5 (the rest "none"), a synthetic frame's = "none". For
``data.real_fraction`` of a batch the clips are camera moves over our training split of real sources
(`videollm.data.real.TRAIN`), ``random_concepts`` of them with made-up concept mixtures
(`encoder.concepts.random_concepts`): what carries the pass-through to every class. Frames then come
at the stem's ``concept_size`` px.

Clips come from seeds (step, index), so a resumed run sees the same ones: the three synthetic tasks
and, for ``needle_fraction`` of a batch, ``haystack_frames`` bundled real frames with a one-frame
needle shape. ``stem_steps`` > 0 first warms up the patch stem alone (`warm_stem`, ``stem.json``).
Logged: the loss and, on ``eval_clips`` held-out clips, the accuracies of `evaluate` and `binding`.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from encoder.build import add_concept_stem, build_encoder
from encoder.concepts import classify_frames, nearest_concept_frame, random_concepts
from encoder.errors import UserError, run_cli
from encoder.transforms import frames_to_tensor
from training.config import check, config_from_argv, in_range, one_of
from training.recipe import (Engine, Micro, OptimConfig, Recipe, RecipeConfig, exit_code, lr_schedule, param_groups,
                             run)
from videollm.configuration_videollm import SPATIAL_MERGES
from videollm.data.haystack import insert_needle, real_clips, segment_haystack
from videollm.data.real import TRAIN as REAL_TRAIN
from videollm.data.real import camera_clip, load_source
from videollm.data.synth import (COLORS, DIRECTIONS, SHAPES, TASKS, make_clip, make_needle, render, sample_spec,
                                 trajectory, visible_coverage)
from videollm.modeling_videollm import build_videollm, save_videollm, word_embedding_rows

logger = logging.getLogger("training.ground")

# The generator's own vocabulary. A motion names its words: "up-left" is both "up" and "left";
# the non-directional motions are named as in the captions ("stays still", "bounces", …).
_MOTION_TO_WORDS = {"static": ("still",), "bounce": ("bounces",), "grow": ("grows",), "shrink": ("shrinks",)}
COLOR_WORDS = tuple(COLORS)
SHAPE_WORDS = tuple(SHAPES)
MOTION_WORDS = tuple(d for d in DIRECTIONS if "-" not in d) + tuple(w for ws in _MOTION_TO_WORDS.values() for w in ws)
WORDS = COLOR_WORDS + SHAPE_WORDS + MOTION_WORDS
WORD_GROUPS = {"colors": COLOR_WORDS, "shapes": SHAPE_WORDS, "motions": MOTION_WORDS}
GROUPS = tuple(WORD_GROUPS.values())


@dataclass
class GroundData:
    num_frames: int = 16  # frames of a short synthetic clip
    size: int = 64  # frame side in px
    needle_fraction: float = 0.25  # share of each batch that is a real-video haystack with a needle
    haystack_frames: int = 64
    real_fraction: float = 0.0  # with concepts: share of each batch that is a camera clip of a real source


@dataclass
class GroundOptim(OptimConfig):
    lr: float = 1.0e-3  # the projector's peak lr
    encoder_lr: float = 5.0e-4  # the encoder's peak lr
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1


@dataclass
class GroundConfig(RecipeConfig):
    output_dir: str = "runs/ground"
    steps: int = 300
    batch_size: int = 16  # clips per step (short clips + needle haystacks)
    log_every: int = 10
    encoder: str = "nano"  # a pretrained encoder dir (or a preset: random init)
    llm: str = "smollm2"  # only its input embeddings are used
    llm_cache_dir: str | None = None
    spatial_pool: int = 2
    spatial_merge: str = "avg"  # how the projector merges a pooled window: avg | concat
    stem_skip: bool = False  # the projector also reads the patch stem
    objective: str = "dense"  # "dense": per-token targets from the rendered objects; "mil": per-clip words
    temperature: float = 15.0  # τ: cosine → logit scale
    norm_weight: float = 0.1  # λ
    null_weight: float = 0.5  # dense: weight of the background tokens' "nothing" loss
    # dense: the logit of each group's "none" class; above 0 a background token can stay silent, which
    # centred word keys barely allow at 0. Stage 1's anchor_none_logit should be the same.
    none_logit: float = 0.0
    min_cover: float = 12.0  # dense: pixels of an object a token's cell must show to be about it
    stem_steps: int = 0  # appearance warm-up of the encoder's patch stem before the main steps (0: none)
    stem_batch: int = 64  # frames per warm-up step
    stem_lr: float = 1.0e-3
    stem_shape_first: float = 0.0  # share of the warm-up steps that train shape alone before colour joins
    eval_clips: int = 48
    concepts: bool = False  # ground real-world concepts too (see the module docstring)
    concept_frames: int = 4  # a stem added here: frames per clip its classifier reads …
    concept_size: int = 128  # … at this side (px); the clips are fed at it
    random_concepts: float = 0.5  # share of the real clips given made-up concept mixtures
    concept_weight: float = 1.0
    data: GroundData = field(default_factory=GroundData)
    optim: GroundOptim = field(default_factory=GroundOptim)

    def validate(self) -> None:
        super().validate()
        if self.data.needle_fraction + self.data.real_fraction > 1:
            raise UserError("data.needle_fraction + data.real_fraction must be at most 1")
        check(self, {"data.needle_fraction": in_range(0, 1), "data.real_fraction": in_range(0, 1),
                     "random_concepts": in_range(0, 1), "concept_frames": in_range(1), "concept_size": in_range(32),
                     "stem_steps": in_range(0), "stem_batch": in_range(1),
                     "stem_shape_first": in_range(0, 1), "spatial_merge": one_of(*SPATIAL_MERGES),
                     "objective": one_of("dense", "mil"), "data.haystack_frames": in_range(2),
                     "none_logit": in_range()})


def word_embeddings(llm_embeddings: torch.Tensor, tokenizer) -> torch.Tensor:
    """(W, D): the LLM's embedding of each of `WORDS`."""
    return word_embedding_rows(llm_embeddings, tokenizer, WORDS)


def clip_words(spec) -> set[str]:
    """The words of a `SynthSpec`: every object's colours (also those it turns into), shape, motion."""
    words = set()
    for obj in spec.objects:
        words.update(object_words(obj, 0, spec.task == "needle"), [obj.color], (new for _, new in obj.color_changes))
    unknown = words - set(WORDS)
    if unknown:
        raise ValueError(f"no grounding word for {sorted(unknown)}; extend training.ground.WORDS")
    return words


def group_loss(scores: torch.Tensor, word_sets: list[set[str]]) -> torch.Tensor:
    """The ``mil`` loss: mean over clips and groups of the cross-entropy of the group's clip scores
    against uniform over its words in the clip (none there, e.g. a needle's motion: skipped)."""
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
    """The words for `obj` in frame t: its colour then, its shape, its motion's (not a needle's)."""
    words = [obj.color_at(t), obj.shape]
    if not needle:
        words += _MOTION_TO_WORDS.get(obj.motion, tuple(obj.motion.split("-")))
    return words


def token_targets(spec, at: int, num_frames: int, cells: tuple[int, int], min_cover: float,
                  frames: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets for the tokens of a `num_frames`-frame video whose frames ``[at, at + spec.num_frames)``
    are `spec` rendered (the rest shows no object), one per frame and cell of the ``cells`` = (kh, kw)
    grid, frame-major as the projector orders them; with `frames` (spec frame indices) only those.
    A token is about the object whose centre is in its cell and of which at least ``min_cover``
    pixels show there (after occlusion; of two, the one that shows more). A cell showing part of an
    object without its centre gets no target (which shape a corner belongs to is not knowable
    there); any other cell is background. Returns targets (K, W) float, 1 at the words
    (`object_words`) of the token's object, and about (K,) int8: 1 object, 0 background, -1 none."""
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
    """Per-token cross-entropy within each word group plus a "no word" class of logit ``none_logit``:
    object tokens → uniform over its words in the group (none there, e.g. a needle's motion: skipped),
    background tokens → "no word". token_scores, targets (B, K, W); about (B, K) as `token_targets`'s.
    Returns (object-token CE, background CE)."""
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
    """Seeded clips: ``short`` (a synthetic task) and ``needle`` (a real-video haystack, a one-frame needle),
    each (frames uint8 (T, S, S, 3), words, the `SynthClip` drawn, the video frame where it starts)."""

    def __init__(self, data: GroundData, feed_size: int | None = None):
        """feed_size: the side clips are fed to the model at (default: data.size, the side they are drawn at)."""
        self.data = data
        self.real = real_clips(data.size)
        self.feed_size = feed_size or data.size

    def camera(self, seed: int):
        """A camera move over one of the training real sources (no object, no words)."""
        rng = np.random.default_rng([seed, 4])
        name = REAL_TRAIN[int(rng.integers(len(REAL_TRAIN)))]
        return camera_clip(load_source(name), self.data.num_frames, rng, self.feed_size), set(), None, 0

    def short(self, seed: int):
        clip = make_clip(seed, self.data.num_frames, self.data.size, self._task(seed))
        return clip.frames, clip_words(clip.spec), clip, 0

    def short_spec(self, seed: int):
        """The spec of ``short(seed)``'s clip, not rendered."""
        return sample_spec(np.random.default_rng(int(seed)), self.data.num_frames, self.data.size, self._task(seed))

    @staticmethod
    def _task(seed: int) -> str:
        return TASKS[int(np.random.default_rng([seed, 1]).integers(len(TASKS)))]

    def needle(self, seed: int):
        rng = np.random.default_rng([seed, 2])
        haystack = segment_haystack(rng, self.data.haystack_frames, self.real, lengths=(8, 32), source_first=True)
        needle = make_needle(seed, num_frames=1, size=self.data.size)
        video, (start, _) = insert_needle(haystack, needle.frames, float(rng.uniform(0, 1)))
        return video, clip_words(needle.spec), needle, start


def batch_seeds(seed: int, step: int, n: int, micro: int = 0) -> list[int]:
    """Clip seeds of micro-batch `micro` of step `step` (0-based); never `eval_seeds`'s."""
    return _seeds(n, seed, 31, step, *([micro] if micro else []))


def eval_seeds(seed: int, n: int) -> list[int]:
    return _seeds(n, seed, 37)


def _seeds(n: int, *keys: int) -> list[int]:
    return [int(s) for s in np.random.SeedSequence(list(keys)).generate_state(n)]


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


def no_targets(num_frames: int, cells: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """`token_targets` of a clip with no object: every token is background."""
    k = num_frames * cells[0] * cells[1]
    return torch.zeros(k, len(WORDS)), torch.zeros(k, dtype=torch.int8)


def concept_targets(probs: torch.Tensor, synthetic: torch.Tensor, per_frame: int) -> torch.Tensor:
    """(B, T, C) the frames' concepts → (B, T·k, C + 1) token targets: the top 5 and the rest as the
    last class, "none"; the tokens of a synthetic clip (`synthetic` (B,) bool): "none"."""
    q = probs.new_zeros(*probs.shape[:-1], probs.shape[-1] + 1)
    v, i = probs.topk(5, -1)
    q.scatter_(-1, i, v)
    q[..., -1] = (1 - v.sum(-1)).clamp(min=0)
    q[synthetic] = 0
    q[synthetic, :, -1] = 1
    return q.repeat_interleave(per_frame, dim=1)


def concept_loss(projector, out, synthetic: bool, none_logit: float) -> torch.Tensor:
    """Soft cross-entropy of each video token's concepts (the pooled concept logits and "none") against
    `concept_targets` of the concepts that went into the encoder."""
    s = projector.pool(out.concept_logits, tuple(out.grid), reduce="mean")  # (B, K, C)
    s = torch.cat([s, s.new_full((*s.shape[:-1], 1), none_logit)], -1)
    probs = out.concept_probs.to(s.dtype)
    q = concept_targets(probs, torch.full(probs.shape[:1], synthetic, device=probs.device), s.shape[1] // probs.shape[1])
    return -(q * s.log_softmax(-1)).sum(-1).mean()


@torch.no_grad()
def evaluate_concepts(model, source: ClipSource, seeds: list[int], none_logit: float) -> dict[str, float]:
    """On camera clips of the training real sources: does a clip's strongest concept agree with the
    classifier's top 1 (``concept_top1``)? On synthetic clips: the share of tokens where "none" wins
    (``concept_none_synthetic``)."""
    model.eval()
    hits, silent = [], []
    for s in seeds[: max(1, len(seeds) // 2)]:
        for kind in ("camera", "short"):
            frames = getattr(source, kind)(s)[0]
            _, out = model.encode_video(_pixels([frames], source.feed_size))
            w = model.projector.pool(out.concept_logits, tuple(out.grid), reduce="mean")[0]  # (K, C)
            p = torch.cat([w, w.new_full((w.shape[0], 1), none_logit)], -1).softmax(-1)
            if kind == "camera":
                hits.append(bool(p[:, :-1].mean(0).argmax() == out.concept_probs[0].mean(0).argmax()))
            else:
                silent.append(float((p[:, -1] >= p[:, :-1].max(-1).values).float().mean()))
    model.train()
    return {"acc_concept_top1": round(float(np.mean(hits)), 4), "concept_none_synthetic": round(float(np.mean(silent)), 4)}


def _pixels(frames: list[np.ndarray], size: int) -> torch.Tensor:
    return torch.stack([frames_to_tensor(f, size) for f in frames])  # (B, 3, T, S, S)


@torch.no_grad()
def evaluate(model, scorer: WordScorer, source: ClipSource, seeds: list[int], size: int,
             cells: tuple[int, int], min_cover: float = 12.0) -> dict[str, float]:
    """Top-1 word accuracy within each group, read off the clip's best token, for the motion task's
    moving object and the needle; and per token about the moving object, its motion words
    (``motion_token``) and plain direction (``direction_token``)."""
    model.eval()
    hits: dict[str, list[bool]] = {"color": [], "shape": [], "direction": [], "needle_shape": [], "needle_color": [],
                                   "motion_token": [], "direction_token": []}
    plain = ("left", "right", "up", "down")  # the four plain directions: one word each
    for i, s in enumerate(seeds):
        moving = i % 2 == 0
        if moving:
            clip = make_clip(s, source.data.num_frames, size, "motion", distractors=0)
            frames = clip.frames
        else:
            frames, _, clip, _ = source.needle(s)
        obj = clip.spec.objects[0]
        scores = scorer.token_scores(model.get_video_features(_pixels([frames], source.feed_size)))[0]  # (K, W)
        tok = scores.amax(dim=0)  # (W,): the clip's best token for each word

        def best(words):
            return words[int(tok[[WORDS.index(w) for w in words]].argmax())]

        prefix = "" if moving else "needle_"
        hits[prefix + "color"].append(best(COLOR_WORDS) == obj.color)
        hits[prefix + "shape"].append(best(SHAPE_WORDS) == obj.shape)
        if moving:
            if "-" not in obj.motion:
                hits["direction"].append(best(plain) == obj.motion)
            targets, about = token_targets(clip.spec, 0, len(frames), cells, min_cover)
            hits["motion_token"] += _token_hits(scores, targets, about, MOTION_WORDS)
            if obj.motion in MOTION_WORDS:
                hits["direction_token"] += _token_hits(scores, targets, about, plain)
    hits.update(binding(model, scorer, seeds, source.data.num_frames, size, cells, source.feed_size))
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
            cells: tuple[int, int], feed_size: int | None = None) -> dict[str, list[bool]]:
    """Can one attribute be read where another is ("what colour is the star?")? On ``count`` clips,
    per object: the token scoring its shape highest, read for its colour in that frame
    (``bind_color``) and its motion (``bind_motion``); the one scoring its colour highest, read for
    its shape (``bind_shape``)."""
    hits: dict[str, list[bool]] = {"bind_color": [], "bind_shape": [], "bind_motion": []}
    per_frame = cells[0] * cells[1]
    for s in seeds:
        clip = make_clip(s + 1, frames, size, "count")
        tok = scorer.token_scores(model.get_video_features(_pixels([clip.frames], feed_size or size)))[0]  # (K, W)

        def read(k, words):
            return words[int(tok[k, [WORDS.index(w) for w in words]].argmax())]

        for obj in clip.spec.objects:
            k = int(tok[:, WORDS.index(obj.shape)].argmax())
            hits["bind_color"].append(read(k, COLOR_WORDS) == obj.color_at(k // per_frame))
            hits["bind_motion"].append(read(k, MOTION_WORDS) in object_words(obj, 0, False)[2:])
            k = int(tok[:, WORDS.index(obj.color)].argmax())
            hits["bind_shape"].append(read(k, SHAPE_WORDS) == obj.shape)
    return hits


def _stem_frames(source: ClipSource, seeds: list[int], cells: tuple[int, int], min_cover: float, gap: int = 0):
    """One frame per seed and its dense targets: a random frame of a short synthetic clip, or (one
    seed in 8) of a bundled real clip (all background). With ``gap`` > 0 (a motion stem) a sample is
    the frame ``gap`` before and the frame. Returns pixels (B, 3, 1|2, S, S), targets (B, k, W),
    about (B, k)."""
    frames, targets, about = [], [], []
    k = cells[0] * cells[1]
    for s in seeds:
        rng = np.random.default_rng([s, 3])
        if rng.random() < 1 / 8:
            src = source.real[int(rng.integers(len(source.real)))]
            t = int(rng.integers(min(gap, len(src) - 1), len(src)))
            frames.append(src[[max(t - gap, 0), t] if gap else [t]])
            tg, ab = torch.zeros(k, len(WORDS)), torch.zeros(k, dtype=torch.int8)
        else:
            spec = source.short_spec(s)
            t = int(rng.integers(min(gap, spec.num_frames - 1), spec.num_frames))
            tg, ab = token_targets(spec, 0, 1, cells, min_cover, frames=[t])
            frames.append(render(spec, [max(t - gap, 0), t] if gap else [t]))
        targets.append(tg)
        about.append(ab)
    return _pixels(frames, source.data.size), torch.stack(targets), torch.stack(about)


class StemHead(torch.nn.Module):
    """Word scores of each token cell from a patch stem (used by the warm-up only): the last
    frame's patch features (B, D, T, h, w) max-pooled over the cell, then one linear layer."""

    def __init__(self, dim: int, pool: int):
        super().__init__()
        self.pool = pool
        self.linear = torch.nn.Linear(dim, len(WORDS))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(features[:, :, -1], self.pool, self.pool, ceil_mode=True)  # (B, D, kh, kw)
        return self.linear(x.flatten(2).transpose(1, 2))  # (B, k, W)


def _stem_features(emb, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The appearance stem's patch features of the last frame of `pixels` (B, 3, T, S, S) and the
    motion stem's (None without one), each (B, D, 1, h, w); apart, so neither takes the other's channels."""
    appearance = emb.appearance_features(pixels[:, :, -1:])
    if not emb.motion_gap:
        return appearance, None
    diff = pixels[:, :, -1:] - pixels[:, :, :1]  # the sample's two frames are `gap` apart
    return appearance, emb.motion_features(diff)


def stem_groups(cfg: GroundConfig, step: int) -> tuple[tuple[str, ...], ...]:
    """The word groups warm-up step `step` trains: shape alone during ``stem_shape_first``, then both."""
    if step < round(cfg.stem_shape_first * cfg.stem_steps):
        return (SHAPE_WORDS,)
    return (COLOR_WORDS, SHAPE_WORDS)


def warm_stem(model, cfg: GroundConfig, source: ClipSource, cells: tuple[int, int]) -> dict[str, float]:
    """Train the encoder's patch stem alone, on single frames, to name the colour and shape of the
    object in each token cell (the dense loss, read by a `StemHead`); returns held-out accuracies.
    Why: the full encoder learns shape slowly from these clips, its convolutional stem alone quickly
    and cheaply; the main steps then carry what the stem tells apart into the tokens (with
    ``stem_skip`` the projector reads the stem directly). Colour, learned fast, would take the
    stem's few channels first, so ``stem_shape_first`` of the steps train shape alone. A motion stem
    (``motion_gap`` g > 0) warms up too, on frame pairs g apart, with its own head and loss."""
    emb = model.vision_tower.embeddings.patch_embed
    gap = emb.motion_gap
    dim = model.config.vision_config.embed_dim
    head = StemHead(dim, cfg.spatial_pool)
    motion_head = StemHead(dim, cfg.spatial_pool) if gap else torch.nn.Identity()
    opt = torch.optim.AdamW([*emb.parameters(), *head.parameters(), *motion_head.parameters()], lr=cfg.stem_lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule(max(1, cfg.stem_steps // 20), cfg.stem_steps, 0.1))
    for step in range(cfg.stem_steps):
        pixels, targets, about = _stem_frames(source, _seeds(cfg.stem_batch, cfg.seed, 41, step), cells,
                                              cfg.min_cover, gap)
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
    with torch.no_grad():
        pixels, targets, about = _stem_frames(source, _seeds(256, cfg.seed, 43), cells, cfg.min_cover, gap)
        appearance, motion = _stem_features(emb, pixels)
        reads = {"color": (COLOR_WORDS, head(appearance)), "shape": (SHAPE_WORDS, head(appearance))}
        if motion is not None:
            reads["motion"] = (MOTION_WORDS, motion_head(motion))
        hits = {name: _token_hits(scores, targets, about, group) for name, (group, scores) in reads.items()}
    return {f"stem_acc_{k}": round(float(np.mean(v)), 4) for k, v in hits.items() if v}


class VideoPath(torch.nn.Module):
    """A VideoLLM's video path (encoder + projector) as a module whose forward is `encode_video`:
    data parallel (DDP) synchronises the gradients of what runs through the forward of the module it
    wraps, and grounding never runs the LLM's forward."""

    def __init__(self, videollm):
        super().__init__()
        self.videollm = videollm

    def forward(self, pixel_values, concept_probs=None):
        return self.videollm.encode_video(pixel_values, concept_probs)


class Ground(Recipe):
    name = "ground"

    def setup(self, engine: Engine):
        cfg = self.cfg
        projector = {"type": "mlp", "spatial_pool": cfg.spatial_pool, "spatial_merge": cfg.spatial_merge,
                     "stem_skip": cfg.stem_skip}
        encoder = cfg.encoder
        if cfg.concepts:
            encoder = add_concept_stem(build_encoder(cfg.encoder, num_frames=cfg.data.num_frames, img_size=cfg.data.size),
                                       cfg.concept_frames, cfg.concept_size)
        self.size = encoder.config.concept_size if cfg.concepts else cfg.data.size  # the side clips are fed at
        model, self.processor = build_videollm(cfg.llm, encoder, num_frames=cfg.data.num_frames,
                                               image_size=self.size, projector=projector,
                                               cache_dir=cfg.llm_cache_dir, seed=cfg.seed)
        model.requires_grad_(False)  # the LLM stays frozen
        model.vision_tower.requires_grad_(True)
        model.projector.requires_grad_(True)
        emb = model.get_input_embeddings().weight.detach()
        self.scorer = WordScorer(word_embeddings(emb, self.processor.tokenizer), float(emb.norm(dim=-1).mean()),
                                 cfg.temperature).to(engine.device)
        self.source = ClipSource(cfg.data, self.size)
        patches = cfg.data.size // model.config.vision_config.patch_size
        self.cells = model.config.projector_config.tokens_per_frame_for(patches, patches)  # (kh, kw) tokens per frame
        model.train()
        return VideoPath(model)

    def param_groups(self, model):
        return param_groups(model, self.optim.lr, self.optim.weight_decay,
                            {"videollm.vision_tower.": self.optim.encoder_lr})

    def before_steps(self, model, resumed: bool) -> None:
        cfg = self.cfg
        if cfg.stem_steps and not resumed:  # a resumed run has its warmed stem in the checkpoint
            t0 = time.perf_counter()
            stem = warm_stem(self.engine.unwrap(model).videollm, cfg, self.source, self.cells)
            stem["stem_seconds"] = round(time.perf_counter() - t0, 1)
            if self.engine.is_main:
                (Path(cfg.output_dir) / "stem.json").write_text(json.dumps(stem, indent=1) + "\n")
            logger.info("stem warm-up: %s", stem)
        model.train()

    def loss(self, model, step: int, micro: int) -> Micro:
        cfg = self.cfg
        n_needle = round(cfg.batch_size * cfg.data.needle_fraction)
        n_real = round(cfg.batch_size * cfg.data.real_fraction) if cfg.concepts else 0
        n_short = cfg.batch_size - n_needle - n_real
        # The step's global batch, this process's share of it (one process: the whole batch, as before).
        engine = self.engine
        seeds = batch_seeds(cfg.seed, step - 1, cfg.batch_size * engine.world, micro)
        seeds = seeds[engine.rank * cfg.batch_size:(engine.rank + 1) * cfg.batch_size]
        device = self.engine.device
        loss = torch.zeros((), device=device)
        parts = {}
        for kind, group, make in (("short", seeds[:n_short], self.source.short),
                                  ("needle", seeds[n_short:n_short + n_needle], self.source.needle),
                                  ("real", seeds[n_short + n_needle:], self.source.camera)):
            if not group:
                continue
            clips = [make(s) for s in group]
            pixels = _pixels([c[0] for c in clips], self.size)
            given = None
            if kind == "real" and cfg.random_concepts:  # made-up concepts for some: the pass-through for every class
                g = torch.Generator().manual_seed(int(group[0]))
                made_up = torch.rand(len(group), generator=g) < cfg.random_concepts
                if made_up.any():
                    given = classify_frames(pixels, cfg.concept_frames, self.size)
                    given = given.index_select(1, nearest_concept_frame(len(clips[0][0]), cfg.concept_frames))
                    given[made_up] = random_concepts(int(made_up.sum()), len(clips[0][0]), g)
            z, out = model(pixels.to(device), None if given is None else given.to(device))  # (b, K, D_llm)
            if cfg.concepts:
                ce_concept = concept_loss(self.engine.unwrap(model).videollm.projector, out, kind == "short",
                                          cfg.none_logit)
                loss = loss + cfg.concept_weight * ce_concept * len(group) / cfg.batch_size
                parts[f"ce_concept_{kind}"] = float(ce_concept.detach())
            tok, norm_pen = self.scorer.token_scores(z), self.scorer.norm_penalty(z)  # (b, K, W), ()
            if cfg.objective == "dense":
                targets, about = zip(*(token_targets(c[2].spec, c[3], len(c[0]), self.cells, cfg.min_cover)
                                       if c[2] is not None else no_targets(len(c[0]), self.cells) for c in clips))
                if z.shape[1] != targets[0].shape[0]:
                    raise UserError(f"dense grounding needs one video token per frame and cell; the projector gave "
                                    f"{z.shape[1]} for {len(clips[0][0])} frames of {self.cells} cells (temporal pooling?)")
                ce_obj, ce_null = dense_loss(tok, torch.stack(targets).to(device), torch.stack(about).to(device),
                                             none_logit=cfg.none_logit)
                ce = ce_obj + cfg.null_weight * ce_null
                parts[f"ce_null_{kind}"] = float(ce_null.detach())
            else:
                ce = group_loss(tok.amax(dim=1), [c[1] for c in clips])
            loss = loss + (ce + cfg.norm_weight * norm_pen) * len(group) / cfg.batch_size
            parts[f"ce_{kind}"] = float(ce.detach())
            parts[f"norm_{kind}"] = float(norm_pen.detach())
        return Micro(loss, parts, samples=cfg.batch_size)

    def evaluate(self, model, step: int) -> dict:
        model = self.engine.unwrap(model).videollm
        seeds = eval_seeds(self.cfg.seed, self.cfg.eval_clips)
        metrics = evaluate(model, self.scorer, self.source, seeds, self.cfg.data.size, self.cells, self.cfg.min_cover)
        if self.cfg.concepts:
            metrics.update(evaluate_concepts(model, self.source, seeds, self.cfg.none_logit))
        return metrics

    def save_final(self, model, directory: Path) -> None:
        save_videollm(model.videollm, self.processor, directory)


def train(cfg: GroundConfig) -> dict[str, Any]:
    """Run (or resume) grounding: the last metrics record and ``final``, the VideoLLM's folder."""
    return run(Ground(cfg))


def main(argv: list[str] | None = None) -> int:
    cfg = config_from_argv(GroundConfig, "python -m training.ground", __doc__, argv,
                           "encoder=runs/x/pretrain/encoder steps=300")
    return exit_code(train(cfg))


if __name__ == "__main__":
    sys.exit(run_cli(main))
