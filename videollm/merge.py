"""``videollm merge-lora --model DIR --out DIR``: fold a LoRA adapter into the LLM and write a
standalone checkpoint that loads without peft or the base-LLM reference (``--model default`` too)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from encoder.errors import UserError, run_cli
from encoder.files import atomic_dir
from videollm.modeling_videollm import ADAPTER_DIR, load_videollm, resolve_model_dir, save_videollm


def parse_args(argv):
    p = argparse.ArgumentParser(prog="videollm merge-lora", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a saved VideoLLM with a LoRA adapter, or 'default'")
    p.add_argument("--out", required=True, help="output directory (must not exist, or be empty)")
    p.add_argument("--cache-dir", help="LLM cache (default: $VIDEOMAP_LLM_CACHE or ~/.cache/videomap-llm/llm)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    src, out = resolve_model_dir(args.model), Path(args.out).expanduser()
    if out.exists() and any(out.iterdir()):
        raise UserError(f"output directory '{out}' exists and is not empty")
    model, processor = load_videollm(src, cache_dir=args.cache_dir, pack=False)
    if not (src / ADAPTER_DIR).is_dir():
        print(f"note: '{src}' has no LoRA adapter; writing a copy", file=sys.stderr)
    model.merge_lora()
    with atomic_dir(out) as tmp:
        save_videollm(model, processor, tmp)
    print(f"wrote merged model to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
