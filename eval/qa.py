"""``videollm eval qa``: multiple-choice video QA accuracy on a benchmark, resumable.

    videollm eval qa --benchmark videomme --data ~/data/Video-MME --model runs/sft --out out/vmme --frames 32
    videollm eval qa --benchmark synthqa --seed 1 --n 200 --model runs/sft --out out/synth-heldout

Per question: sample ``--frames`` frames, prompt in the benchmarks' style (question, ``A. …``
option lines, "Answer with the option's letter from the given choices directly."), decode
greedily, read the letter with `eval.answer.extract_letter` (no letter = wrong).

``--scoring likelihood`` asks the question alone (no options, no instruction) and picks the option
whose text the model finds most likely as its reply: the sum of the text's token log-probabilities
divided by its length in UTF-8 bytes (lm-evaluation-harness's ``acc_norm``, the usual way to score
multiple choice for small LMs, which often cannot map an answer they know to its option letter).
It measures what the model knows apart from the letter; the generated-letter figure is what a
user sees.

Outputs in ``--out``: ``samples.jsonl`` (one line per question, appended and flushed as it is
answered), ``results.json`` (``accuracy`` as a fraction, per-category breakdowns, n, model,
benchmark, frames) and ``summary.md``. A rerun with the same ``--out`` skips the ids already in
``samples.jsonl``, so an interrupted run resumes where it stopped.

The model sits behind one function, ``answer_fn(frames (T, H, W, 3) uint8, prompt) -> reply``;
`run_qa` takes any such function (tests pass a fake one), `VideoLLMAnswerer` is the real one.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from encoder.errors import UserError, run_cli
from encoder.video_io import read_video
from eval.answer import extract_letter
from eval.benchmarks import BENCHMARKS, MCSample, load_benchmark
from videollm.chat import continuation_logprobs, generate_stream
from videollm.data.prompts import LETTERS, format_mc
from videollm.modeling_videollm import load_videollm

SCORINGS = ("generate", "likelihood")

AnswerFn = Callable[[np.ndarray, str], str]  # (frames, prompt) → reply
ScoreFn = Callable[[np.ndarray, str, list[str]], list[float]]  # (frames, question, options) → a score per option


def build_prompt(sample: MCSample) -> str:
    """The sample's multiple-choice prompt (`videollm.data.prompts.format_mc`)."""
    return format_mc(sample.question, sample.options)


def uniform_frames(frames: np.ndarray, num_frames: int) -> np.ndarray:
    """num_frames frames spread evenly over (T, H, W, 3) (repeats when T < num_frames)."""
    idx = np.linspace(0, len(frames) - 1, num_frames).round().astype(int)
    return frames[idx]


def load_frames(sample: MCSample, num_frames: int) -> np.ndarray:
    """The sample's video as uint8 (num_frames, H, W, 3): in-memory frames, a folder of images
    (MVBench's frame tasks) or a video file (start/end seconds respected)."""
    if sample.frames is not None:
        return uniform_frames(sample.frames, num_frames)
    path = Path(sample.video)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if not files:
            raise UserError(f"frame folder '{path}' has no .jpg/.png images")
        idx = np.linspace(0, len(files) - 1, num_frames).round().astype(int)
        return np.stack([np.asarray(Image.open(files[i]).convert("RGB")) for i in idx])
    return read_video(path, num_frames, start=sample.start, end=sample.end).frames


# ---------------------------------------------------------------------------------------------
# The runner
# ---------------------------------------------------------------------------------------------


def _read_done(path: Path, wanted: set[str]) -> list[dict]:
    """Records already in samples.jsonl for ids we still want; rewrites the file without a torn
    last line (a run killed mid-write) or records of other ids."""
    if not path.is_file():
        return []
    done, seen = [], set()
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("id") in wanted and record["id"] not in seen:
            done.append(record)
            seen.add(record["id"])
    path.write_text("".join(json.dumps(r) + "\n" for r in done), encoding="utf-8")
    return done


def score(records: list[dict]) -> dict:
    """Overall and per-category accuracy of answered records."""
    n = len(records)
    correct = sum(bool(r["correct"]) for r in records)
    breakdowns: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for r in records:
        for key, value in r.get("categories", {}).items():
            cell = breakdowns[key][str(value)]
            cell[0] += bool(r["correct"])
            cell[1] += 1
    per_category = {
        key: {value: {"accuracy": c / t, "correct": c, "n": t} for value, (c, t) in sorted(cells.items())}
        for key, cells in breakdowns.items()
    }
    return {
        "accuracy": correct / n if n else 0.0,
        "correct": correct,
        "n": n,
        "unparsed": sum(r["pred"] is None for r in records),
        "errors": sum(bool(r.get("error")) for r in records),
        "per_category": per_category,
    }


def summary_markdown(results: dict) -> str:
    lines = [f"# {results['benchmark']} — {results['model']}", "",
             f"frames: {results['frames']} · scoring: {results.get('scoring', 'generate')} · questions: {results['n']} · "
             f"unparsed replies (scored wrong): {results['unparsed']} · errors: {results['errors']}", "",
             f"**accuracy: {100 * results['accuracy']:.1f}%** ({results['correct']}/{results['n']})", ""]
    for key, cells in results["per_category"].items():
        lines += [f"## by {key}", "", f"| {key} | accuracy | n |", "| --- | ---: | ---: |"]
        lines += [f"| {value} | {100 * c['accuracy']:.1f}% | {c['n']} |" for value, c in cells.items()]
        lines.append("")
    return "\n".join(lines)


def answer_sample(answer_fn: AnswerFn | ScoreFn, frames: np.ndarray, sample: MCSample,
                  scoring: str = "generate") -> tuple[str, str | None, dict]:
    """One question: (reply, the letter it names or None, extra record fields). ``generate``:
    the letter read from ``answer_fn(frames, prompt)``'s reply; ``likelihood``: the best of
    ``answer_fn(frames, question, options)``'s scores (its option text is the reply, the scores go
    to ``option_scores``)."""
    if scoring == "generate":
        reply = answer_fn(frames, build_prompt(sample))
        return reply, extract_letter(reply, sample.options), {}
    scores = [float(x) for x in answer_fn(frames, sample.question, sample.options)]
    best = int(np.argmax(scores))
    return sample.options[best], LETTERS[best], {"option_scores": scores}


def run_qa(samples: list[MCSample], answer_fn: AnswerFn | ScoreFn, out_dir: str | Path, *, num_frames: int,
           meta: dict | None = None, log=print, scoring: str = "generate") -> dict:
    """Answer every sample not yet in ``out_dir/samples.jsonl``, then write results and summary.

    scoring and what `answer_fn` is: see `answer_sample`.
    meta: extra fields for results.json (model, benchmark, …). Returns the results dict.
    A video that cannot be read is recorded with its error and scored wrong.
    """
    if scoring not in SCORINGS:
        raise UserError(f"scoring must be one of {SCORINGS}; got {scoring!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jsonl = out_dir / "samples.jsonl"
    ids = [s.id for s in samples]
    if len(set(ids)) != len(ids):
        raise UserError("sample ids are not unique; resuming would be ambiguous")
    done = _read_done(jsonl, set(ids))
    other = {r.get("scoring", "generate") for r in done} - {scoring}
    if other:
        raise UserError(f"{jsonl} holds answers scored by {sorted(other)[0]!r}, not {scoring!r}; "
                        "give this run another --out")
    done_ids = {r["id"] for r in done}
    todo = [s for s in samples if s.id not in done_ids]
    if done:
        log(f"resuming: {len(done)} of {len(samples)} already answered in {jsonl}")
    records = list(done)
    start = time.perf_counter()
    with jsonl.open("a", encoding="utf-8") as f:
        for i, sample in enumerate(todo):
            reply, pred, extra = "", None, {}
            try:
                reply, pred, extra = answer_sample(answer_fn, load_frames(sample, num_frames), sample, scoring)
            except UserError as err:  # unreadable video: wrong, with the reason kept
                extra = {"error": str(err)}
            record = {"id": sample.id, "question": sample.question, "options": sample.options,
                      "answer": sample.answer, "reply": reply, "pred": pred, "correct": pred == sample.answer,
                      "categories": sample.categories, "scoring": scoring, **extra}
            f.write(json.dumps(record) + "\n")
            f.flush()
            records.append(record)
            if (i + 1) % 10 == 0 or i + 1 == len(todo):
                acc = sum(r["correct"] for r in records) / len(records)
                log(f"[{len(records)}/{len(samples)}] accuracy so far {acc:.3f} "
                    f"({(time.perf_counter() - start) / (i + 1):.2f} s/question)")
    order = {sid: k for k, sid in enumerate(ids)}
    records.sort(key=lambda r: order[r["id"]])
    results = {**(meta or {}), "frames": num_frames, "scoring": scoring, **score(records)}
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (out_dir / "summary.md").write_text(summary_markdown({"model": "?", "benchmark": "?", **results}) + "\n",
                                        encoding="utf-8")
    return results


# ---------------------------------------------------------------------------------------------
# The model behind answer_fn
# ---------------------------------------------------------------------------------------------


class VideoLLMAnswerer:
    """``answer_fn`` for a saved VideoLLM (or the default one): `videollm.modeling_videollm.load_videollm`
    + `videollm.chat.generate_stream` with greedy decoding, the path chat and the demo answer
    through (processor → ``model.generate``). Frames are passed in memory, no temporary files.

    model: a saved VideoLLM directory, or None / "default" for the default model.
    """

    def __init__(self, model: str | Path | None = None, max_new_tokens: int = 16, num_frames: int | None = None,
                 max_video_tokens: int | None = None):
        self.model, self.processor = load_videollm(model or None, num_frames=num_frames,
                                                   max_video_tokens=max_video_tokens)
        self.size = int(self.processor.image_size)
        self.max_new_tokens = max_new_tokens

    def __call__(self, frames: np.ndarray, prompt: str) -> str:
        pieces = generate_stream(self.model, self.processor, frames, [{"role": "user", "content": prompt}],
                                 max_new_tokens=self.max_new_tokens, temperature=0.0)
        return "".join(pieces).strip()

    def option_scores(self, frames: np.ndarray, question: str, options: list[str]) -> list[float]:
        """``ScoreFn``: per option, the log-probability of its text as the reply to the question,
        per UTF-8 byte (see the module doc)."""
        logprobs = continuation_logprobs(self.model, self.processor, frames,
                                         [{"role": "user", "content": question}], options)
        return [lp / max(1, len(o.strip().encode("utf-8"))) for (lp, _), o in zip(logprobs, options)]


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="videollm eval qa", description=__doc__.split("\n\n")[0])
    p.add_argument("--benchmark", required=True, choices=BENCHMARKS)
    p.add_argument("--data", help="the benchmark's local folder or annotation file (not for synthqa)")
    p.add_argument("--model", default="default",
                   help="a saved VideoLLM directory (default: the embedded default model)")
    p.add_argument("--out", required=True, help="output folder (reused to resume)")
    p.add_argument("--frames", type=int, default=16, help="frames sampled per video (default 16)")
    p.add_argument("--limit", type=int, help="only the first N questions")
    p.add_argument("--video-root", help="folder of the videos, if not where the layout puts them")
    p.add_argument("--seed", type=int, default=0, help="synthqa: which set (another seed = held out)")
    p.add_argument("--n", type=int, default=50, help="synthqa: number of questions (default 50)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--scoring", choices=SCORINGS, default="generate",
                   help="generate: the letter of the greedy reply (default); likelihood: the option "
                        "whose text is most likely as the reply to the bare question")
    p.add_argument("--skip-missing", action="store_true", help="drop questions whose video is missing")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.frames < 1:
        raise UserError(f"--frames must be >= 1; got {args.frames}")
    samples = load_benchmark(args.benchmark, args.data, args.video_root, seed=args.seed, n=args.n)
    if args.limit is not None:
        samples = samples[: args.limit]
    missing = [s for s in samples if s.frames is None and not Path(s.video).exists()]
    if missing and not args.skip_missing:
        raise UserError(f"{len(missing)} of {len(samples)} videos are missing, e.g. '{missing[0].video}'; "
                        "point --video-root at the videos, or pass --skip-missing")
    missing_ids = {s.id for s in missing}
    samples = [s for s in samples if s.id not in missing_ids]
    if not samples:
        raise UserError("no questions to answer")
    answerer = VideoLLMAnswerer(args.model, max_new_tokens=args.max_new_tokens, num_frames=args.frames)
    meta = {"benchmark": args.benchmark, "model": str(args.model), "data": args.data,
            "skipped_missing": len(missing)}
    if args.benchmark == "synthqa":
        meta.update(seed=args.seed)
    fn = answerer if args.scoring == "generate" else answerer.option_scores
    results = run_qa(samples, fn, args.out, num_frames=args.frames, meta=meta,
                     log=lambda m: print(m, file=sys.stderr), scoring=args.scoring)
    print(json.dumps({k: results[k] for k in ("benchmark", "scoring", "accuracy", "correct", "n", "unparsed",
                                              "frames")}))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
