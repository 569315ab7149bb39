"""Real footage: does the model name what it sees, hedge in words when it cannot, and never describe
the synthetic world there?

    videollm eval real [--model DIR] --out runs/real                       # our held-out split
    videollm eval real --model DIR --inputs cat.jpg street.mp4 --subjects subjects.json --out runs/team

Each input is a video or a photo (a photo becomes a slow zoom, `photo_clip`). Two questions each, one
conversation apiece: "What is in this video?" and "What color is the shape?" (there is none). Per
input: the replies, the synthetic-world words in them (`SYNTHETIC_WORDS`: the generator's colours and
shapes, "background"), whether the subject reply hedges (`HEDGE_MARKERS`) and, when subject words are
known, whether it names one. The split ``heldout`` is ours (`videollm.data.real.HELDOUT`, never trained
on): camera clips of each source, whose subject words are those of the ImageNet classifier's top-5
classes on the clip at 224 px (what an ImageNet model can name). ``--subjects`` maps an input's file
name to its words ({"cat.jpg": ["cat", "tabby"]}). Writes ``real.json``; prints the summary.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from encoder.concepts import clip_concepts
from encoder.errors import UserError, run_cli
from encoder.files import atomic_write_text
from encoder.teacher import imagenet_lemmas
from encoder.video_io import read_video
from videollm.chat import generate_stream
from videollm.data.real import HELDOUT, SHAPE_QUESTIONS, camera_clip, load_source
from videollm.data.synth import COLORS, SHAPES
from videollm.modeling_videollm import load_videollm

SUBJECT_QUESTION = "What is in this video?"
SYNTHETIC_WORDS = (*COLORS, "gray", "grey", *SHAPES, "background")
HEDGE_MARKERS = ("can't make out", "cannot make out", "not sure", "can't tell", "cannot tell")
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
RESULT_FILE = "real.json"


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def synthetic_words(reply: str) -> list[str]:
    """The synthetic world's words in a reply (plurals too: "circles")."""
    found = words(reply)
    return [w for w in SYNTHETIC_WORDS if w in found or w + "s" in found]


def names_subject(reply: str, subject: list[str]) -> bool:
    """Does the reply contain one of the subject's words (a word, or all words of a phrase; a plural too)?"""
    found = words(reply)
    found |= {w[:-1] for w in found if w.endswith("s")}
    return any(words(s) and words(s) <= found for s in subject)


def photo_clip(image: np.ndarray, num_frames: int, size: int = 256) -> np.ndarray:
    """(T, size, size, 3) uint8: a slow centred zoom from the whole square crop to 85 % of it."""
    H, W = image.shape[:2]
    side = min(H, W)
    out = []
    for k in range(num_frames):
        s = side * (1 - 0.15 * k / max(1, num_frames - 1))
        y, x = (H - s) / 2, (W - s) / 2
        crop = Image.fromarray(image[int(y):int(y + s), int(x):int(x + s)]).resize((size, size), Image.BILINEAR)
        out.append(np.asarray(crop))
    return np.stack(out)


def read_input(path: Path, num_frames: int) -> np.ndarray:
    if not path.is_file():
        raise UserError(f"{path}: no such file (give videos or photos)")
    if path.suffix.lower() in PHOTO_SUFFIXES:
        try:
            return photo_clip(np.asarray(Image.open(path).convert("RGB")), num_frames)
        except OSError as err:
            raise UserError(f"{path}: not a readable photo ({err})") from None
    return read_video(path, num_frames).frames


def reference_subject(frames: np.ndarray, k: int = 5) -> list[str]:
    """What an ImageNet model can name in a clip: the lemmas of the classifier's top-k classes at
    224 px, read on 4 frames."""
    probs = clip_concepts(frames, 224)
    lemmas = imagenet_lemmas()
    return [lemma for c in probs.topk(k).indices.tolist() for lemma in lemmas[c]]


def heldout_inputs(clips_per_source: int, num_frames: int, seed: int = 0) -> list[tuple[str, np.ndarray]]:
    """Camera clips of our held-out sources (never trained on)."""
    out = []
    for name in HELDOUT:
        for i in range(clips_per_source):
            rng = np.random.default_rng([seed, 19, HELDOUT.index(name), i])
            out.append((f"{name}#{i}", camera_clip(load_source(name), num_frames, rng, 256)))
    return out


def evaluate(model, processor, inputs: list[tuple[str, np.ndarray]], subjects: dict[str, list[str]],
             max_new_tokens: int = 24) -> dict:
    def ask(frames, question):
        return "".join(generate_stream(model, processor, frames, [{"role": "user", "content": question}],
                                       max_new_tokens=max_new_tokens, temperature=0.0)).strip()

    rows = []
    for i, (name, frames) in enumerate(inputs):
        subject_reply = ask(frames, SUBJECT_QUESTION)
        shape_question = SHAPE_QUESTIONS[i % len(SHAPE_QUESTIONS)]
        shape_reply = ask(frames, shape_question)
        row = {"input": name, "subject_reply": subject_reply, "shape_question": shape_question,
               "shape_reply": shape_reply, "synthetic_words": sorted(set(synthetic_words(subject_reply))
                                                                     | set(synthetic_words(shape_reply))),
               "hedged": any(m in subject_reply.lower() for m in HEDGE_MARKERS)}
        if name in subjects:
            row["subject_words"] = subjects[name]
            row["named"] = names_subject(subject_reply, subjects[name])
        rows.append(row)
    named = [r["named"] for r in rows if "named" in r]
    return {"n": len(rows), "with_synthetic_words": sum(bool(r["synthetic_words"]) for r in rows),
            "named": sum(named), "named_of": len(named), "hedged": sum(r["hedged"] for r in rows),
            "named_or_hedged": sum(r.get("named", False) or r["hedged"] for r in rows), "samples": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="videollm eval real", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default", help="a saved VideoLLM directory (default: the embedded default model)")
    p.add_argument("--inputs", nargs="*", help="videos or photos (default: our held-out split)")
    p.add_argument("--subjects", help="JSON {file name: [subject words]} for --inputs")
    p.add_argument("--clips", type=int, default=4, help="held-out split: camera clips per source")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--out", required=True, help=f"output folder ({RESULT_FILE})")
    args = p.parse_args(argv)
    if args.frames < 1 or args.clips < 1:
        raise UserError(f"--frames and --clips must be >= 1; got {args.frames}, {args.clips}")
    if args.inputs:
        inputs = [(Path(x).name, read_input(Path(x), args.frames)) for x in args.inputs]
        subjects = {}
        if args.subjects:
            try:
                subjects = json.loads(Path(args.subjects).read_text())
            except (OSError, json.JSONDecodeError) as err:
                raise UserError(f"--subjects {args.subjects}: not a readable JSON file ({err})") from None
    else:
        inputs = heldout_inputs(args.clips, args.frames)
        subjects = {name: reference_subject(frames) for name, frames in inputs}
    model, processor = load_videollm(args.model, num_frames=args.frames)
    result = evaluate(model, processor, inputs, subjects, args.max_new_tokens)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / RESULT_FILE, json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
