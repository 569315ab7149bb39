"""``videollm data check``: validate instruction data and name each bad record.

    videollm data check train.jsonl [--video-root DIR] [--decode] [--frames N]
    videollm data check mix.yaml                      # every file of a data mix
    videollm data check vc2.json --import-videochat2 train.json   # convert VideoChat2, then check

Exit status: 0 when every record is valid (a summary is printed), 1 when some are not (one
``record N: problem`` line each, on stdout), 2 for a missing file or bad arguments.
Without ``--decode`` only the existence of each video is checked; ``--decode`` decodes a few
frames of each (honouring start/end), which catches truncated and non-video files.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from encoder.errors import UserError, run_cli
from videollm.data.instruct import MIX_SUFFIXES, check_file, import_videochat2, read_mix, summarize


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="videollm data check", description=__doc__.split("\n\n")[0])
    p.add_argument("file", help="JSON / JSONL instruction file, or a data-mix YAML")
    p.add_argument("--video-root", help="folder the 'video' paths are relative to (default: the file's folder)")
    p.add_argument("--decode", action="store_true", help="decode a few frames of every video")
    p.add_argument("--frames", type=int, default=4, help="frames to decode per video with --decode (default 4)")
    p.add_argument("--import-videochat2", metavar="OUT",
                   help="FILE is in VideoChat2's layout ({video, QA: [{i, q, a}]}); write it as "
                        "LLaVA-video JSON/JSONL to OUT, then check OUT")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    path = Path(args.file)
    if not path.is_file():
        raise UserError(f"data file '{path}' not found")
    if args.frames < 1:
        raise UserError(f"--frames must be >= 1, got {args.frames}")
    if args.import_videochat2:
        out = Path(args.import_videochat2)
        n = import_videochat2(path, out)
        print(f"converted {n} VideoChat2 records → {out}")
        # Relative video paths keep meaning the folder of the original file.
        if args.video_root is None:
            args.video_root = str(path.parent)
        path = out
    if path.suffix in MIX_SUFFIXES:
        if args.video_root:
            raise UserError("a data mix sets video_root per dataset; drop --video-root")
        targets = [(d.path, d.video_root) for d in read_mix(path).datasets]
    else:
        targets = [(path, args.video_root)]
    all_records, bad = [], 0
    for file, root in targets:
        if not Path(file).is_file():
            raise UserError(f"data file '{file}' (listed in '{path}') not found")
        records, problems = check_file(file, root, decode=args.decode, num_frames=args.frames)
        prefix = f"{file}: " if len(targets) > 1 else ""
        for number, problem in problems:
            print(f"{prefix}record {number}: {problem}" if number else f"{prefix}{problem}")
        bad += len({n for n, _ in problems})
        all_records += records
    s = summarize(all_records)
    checked = "decoded" if args.decode else "found"
    if bad:
        print(f"{bad} bad record(s); {s['records']} valid", file=sys.stderr)
        return 1
    print(f"ok: {s['records']} records, {s['turns']} turns ({s['answers']} answers), "
          f"{s['videos']} videos ({checked})" + (f", {s['text_only']} text-only" if s["text_only"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
