"""Open-ended answers and text-only questions: what a model says when no options are offered.

    python -m eval.open_ended --model runs/sft --seed 1001 --n 180 --frames 16 --out out/open

Open-ended: n held-out synthetic clips (tasks cycle motion / order / count, as synthqa's), one
colour, shape or motion question each, answered greedily. A reply is right when it names the
answer in whole words and no other answer of that kind (`open_correct`).

Blind baseline: each question asked again about another clip of the same task, so the question
still makes sense but the video does not answer it. It scores what priors and coincidence get
right; open-ended accuracy shows that the model reads the video only by how far it rises above it.

Text only: `videollm.data.text_replay.TEXT_CHECKS` (held-out factual questions; the first, "What is
the capital of France?", must mention Paris) asked with no video, of the model and, when it has a
LoRA adapter, of its base LLM (the adapter off).

Output: ``open_text.json`` in ``--out`` (accuracies and every question, reply and verdict); one
JSON line of the accuracies on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from encoder.errors import UserError, run_cli
from encoder.files import atomic_write_text
from eval.answer import named_option
from videollm.chat import generate_stream
from videollm.data.synth import OPEN_ANSWERS, TASKS, make_clip
from videollm.data.text_replay import TEXT_CHECKS
from videollm.modeling_videollm import load_videollm

OPEN_CATEGORIES = ("color", "shape", "motion")
RESULT_FILE = "open_text.json"
TEXT_MAX_NEW_TOKENS = 32


def open_samples(seed: int, n: int, num_frames: int, size: int) -> list[dict]:
    """n open-ended colour / shape / motion questions on held-out clips (tasks cycle like synthqa)."""
    clip_seeds = np.random.SeedSequence([seed, 1]).generate_state(n)
    rng = np.random.default_rng([seed, 1])
    samples = []
    for i, s in enumerate(clip_seeds):
        task = TASKS[i % len(TASKS)]
        clip = make_clip(int(s), num_frames, size, task)
        qs = [q for q in clip.qa if q["type"] == "open" and q["category"] in OPEN_CATEGORIES]
        q = qs[int(rng.integers(len(qs)))]
        samples.append({"id": f"open-{seed}-{i}", "task": task, "category": q["category"],
                        "question": q["question"], "answer": q["answer"], "frames": clip.frames})
    return samples


def open_correct(reply: str, answer: str, choices: tuple[str, ...] = ()) -> bool:
    """The reply names the answer and no other of `choices` (the category's possible answers):
    `eval.answer.named_option`, as for MC option texts. Whole words, case and punctuation
    ignored ("up-left" = "up left"); where one answer is part of a longer one the longer wins
    ("moves up-right" names "moves up-right", not "moves up"); two answers ("red or blue") are
    wrong."""
    options = [answer, *(c for c in choices if c != answer)]
    return named_option(reply, options) == 0


def mismatched_clip(i: int, n: int) -> int | None:
    """Index of another of the n open-ended samples with the same task as sample i (tasks cycle
    with period len(TASKS): the next clip of that task, or the previous one at the end), or None
    when there is none."""
    if n <= len(TASKS):
        return None
    return i + len(TASKS) if i + len(TASKS) < n else i - len(TASKS)


def _accuracy(verdicts: list[bool]) -> float | None:
    return sum(verdicts) / len(verdicts) if verdicts else None


def evaluate(model, processor, *, seed: int, n: int, num_frames: int, size: int, max_new_tokens: int) -> dict:
    """Open-ended accuracy (overall, per category, blind baseline) and the text-only checks, in one
    model load. Returns open_text.json's content."""

    def ask(video, question: str, max_tokens: int) -> str:
        pieces = generate_stream(model, processor, video, [{"role": "user", "content": question}],
                                 max_new_tokens=max_tokens, temperature=0.0)
        return "".join(pieces).strip()

    samples = open_samples(seed, n, num_frames, size)
    records = []
    for s in samples:
        reply = ask(s["frames"], s["question"], max_new_tokens)
        records.append({k: v for k, v in s.items() if k != "frames"} |
                       {"reply": reply, "correct": open_correct(reply, s["answer"], OPEN_ANSWERS[s["category"]])})
    for i, r in enumerate(records):  # the blind baseline
        j = mismatched_clip(i, len(samples))
        if j is None:
            break
        reply = ask(samples[j]["frames"], r["question"], max_new_tokens)
        r["blind_reply"], r["blind_correct"] = reply, open_correct(reply, r["answer"], OPEN_ANSWERS[r["category"]])
    per_cat = {}
    for cat in OPEN_CATEGORIES:
        rs = [r for r in records if r["category"] == cat]
        per_cat[cat] = {"accuracy": _accuracy([r["correct"] for r in rs]), "n": len(rs)}
    text = [{"question": q, "answer": a, "reply": ask(None, q, TEXT_MAX_NEW_TOKENS)} for q, a in TEXT_CHECKS]
    if model.has_lora:
        with model.language_model.disable_adapter():
            for t in text:
                t["base_reply"] = ask(None, t["question"], TEXT_MAX_NEW_TOKENS)
    for t in text:
        t["correct"] = t["answer"] in t["reply"].lower()
        if "base_reply" in t:
            t["base_correct"] = t["answer"] in t["base_reply"].lower()
    return {"open_accuracy": _accuracy([r["correct"] for r in records]), "open_n": len(records),
            "open_per_category": per_cat, "open_samples": records,
            "open_blind_accuracy": _accuracy([r["blind_correct"] for r in records if "blind_correct" in r]),
            "text_question": text[0]["question"], "text_reply": text[0]["reply"], "text_ok": text[0]["correct"],
            "text_accuracy": _accuracy([t["correct"] for t in text]), "text_n": len(text),
            "text_base_accuracy": _accuracy([t["base_correct"] for t in text if "base_correct" in t]),
            "text_samples": text}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.open_ended", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default", help="a saved VideoLLM directory (default: the embedded default model)")
    p.add_argument("--seed", type=int, default=1001, help="which held-out set (clip seeds SeedSequence([seed, 1]))")
    p.add_argument("--n", type=int, default=180, help="open-ended questions")
    p.add_argument("--frames", type=int, default=16, help="frames per clip")
    p.add_argument("--size", type=int, help="frame side (default: the processor's image size)")
    p.add_argument("--max-new-tokens", type=int, default=12, help="reply length for the open-ended questions")
    p.add_argument("--out", required=True, help=f"output folder ({RESULT_FILE})")
    args = p.parse_args(argv)
    if args.n < 1 or args.frames < 1:
        raise UserError(f"--n and --frames must be >= 1; got {args.n}, {args.frames}")
    model, processor = load_videollm(args.model)
    result = evaluate(model, processor, seed=args.seed, n=args.n, num_frames=args.frames,
                      size=args.size or int(processor.image_size), max_new_tokens=args.max_new_tokens)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / RESULT_FILE, json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, (list, dict))}))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
