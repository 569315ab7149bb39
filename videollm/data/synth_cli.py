"""``videollm data synth``: write a synthetic video dataset (mp4 + index.csv + QA) to a folder.

Prints one JSON line: ``{"n", "out", "task", "num_classes", "files"}``. See `videollm.data.synth`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from encoder.errors import UserError, run_cli
from videollm.data.synth import TASKS, check_clip_args, clear_synth_dataset, write_synth_dataset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="videollm data synth",
        description="Render N synthetic clips (seeds SEED … SEED+N-1) to DIR/videos/*.mp4 with "
                    "index.csv (path,label), annotations.jsonl and instruct.json (LLaVA-video "
                    "conversations). The same arguments always give the same clips.",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--n", type=int, default=100, help="number of clips (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    parser.add_argument("--frames", type=int, default=16, help="frames per clip (default 16)")
    parser.add_argument("--size", type=int, default=64, help="frame side in pixels (default 64)")
    parser.add_argument("--task", choices=TASKS, default="motion",
                        help="classification task giving the labels (default motion)")
    parser.add_argument("--fps", type=float, default=8.0, help="frame rate of the mp4s (default 8)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a previous dataset in DIR (removes only its own files)")
    args = parser.parse_args(argv)

    if args.n < 1:
        raise UserError(f"--n must be at least 1; got {args.n}")
    if not args.fps > 0:
        raise UserError(f"--fps must be positive; got {args.fps}")
    check_clip_args(args.frames, args.size, args.task)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out '{out}' exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not args.overwrite:
            raise UserError(f"--out '{out}' is not empty; pass --overwrite to replace its dataset "
                            "or choose a new folder")
        clear_synth_dataset(out)
    summary = write_synth_dataset(out, n=args.n, seed=args.seed, num_frames=args.frames,
                                  size=args.size, task=args.task, fps=args.fps)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
