"""``videollm merge-lora --model DIR --out DIR``: fold a LoRA adapter into the LLM and write a
standalone checkpoint (encoder, projector, merged LLM, tokenizer) that loads without peft or the
base-LLM reference. ``--model default`` merges the shipped model."""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from encoder.errors import UserError, run_cli
from videollm.llm import default_cache_dir
from videollm.modeling_videollm import ADAPTER_DIR, load_videollm, resolve_model_dir, save_videollm


def parse_args(argv):
    p = argparse.ArgumentParser(prog="videollm merge-lora", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a saved VideoLLM with a LoRA adapter, or 'default'")
    p.add_argument("--out", required=True, help="output directory (must not exist, or be empty)")
    p.add_argument("--cache-dir", default=None,
                   help="LLM cache for the base model (default: $VIDEOMAP_LLM_CACHE or ~/.cache/videomap-llm/llm)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    src, out = resolve_model_dir(args.model), Path(args.out).expanduser()
    if out.exists() and any(out.iterdir()):
        raise UserError(f"output directory '{out}' exists and is not empty")
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    model, processor = load_videollm(src, cache_dir=cache_dir)
    if not (src / ADAPTER_DIR).is_dir():
        print(f"note: '{src}' has no LoRA adapter; writing a copy", file=sys.stderr)
    model.merge_lora()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_videollm(model, processor, tmp)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote merged model to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
