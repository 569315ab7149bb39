"""The `videollm` console script: the one place that knows every package. A subcommand's module
is imported only when it runs (``videollm --help`` does not load torch); each has ``main(argv) -> int``
and also runs as ``python -m <module>``.
"""

from __future__ import annotations

import importlib
import sys

from encoder.errors import VERBOSE_FLAG, run_cli

# (words, module, one-line help). Two-word commands are groups ("bench scan").
COMMANDS: list[tuple[tuple[str, ...], str, str]] = [
    (("inspect",), "encoder.video_io", "print a video's metadata and the timestamps --frames N would sample"),
    (("encode",), "encoder.encode", "run a VideoMAP / ViT encoder on a video and print shapes and time"),
    (("chat",), "videollm.chat", "ask questions about a video (streams the answer; interactive without a question)"),
    (("demo",), "demo.app", "start the Gradio chat demo (binds 127.0.0.1 unless --host says otherwise)"),
    (("serve",), "demo.serve", "serve the model over an OpenAI-compatible API (/v1/chat/completions)"),
    (("merge-lora",), "videollm.merge", "write a standalone model with the LoRA adapter merged into the LLM"),
    (("pretrain",), "training.pretrain", "pretrain a VideoMAP encoder (masked autoregressive recipe)"),
    (("classify",), "training.classify", "fine-tune / linear-probe an encoder for video classification"),
    (("finetune",), "training.finetune", "align and instruction-tune the VideoLLM (LoRA / QLoRA / DeepSpeed)"),
    (("train-default",), "training.pipeline", "reproduce the embedded default model: pretrain, align, instruction-tune, evaluate, ship"),
    (("data", "synth"), "videollm.data.synth_cli", "write a synthetic video dataset with ground truth and instructions"),
    (("data", "check"), "videollm.data.check_cli", "validate an instruction-data file and name each bad record"),
    (("eval", "qa"), "eval.qa", "multiple-choice video QA (Video-MME, MVBench, EgoSchema, MLVU, LongVideoBench, synthqa)"),
    (("eval", "niah"), "eval.niah", "visual needle-in-a-haystack accuracy grid and heatmap"),
    (("eval", "real"), "eval.real_footage", "real footage: is the subject named, a doubt said, no synthetic shape invented"),
    (("eval", "open"), "eval.open_ended", "open-ended colour/shape/motion answers, their blind baseline and the text-only checks"),
    (("profile", "memory"), "eval.profile_memory", "memory and time of VideoMAP vs ViT encoders across frame counts"),
    (("bench", "scan"), "encoder.bench_scan", "time the selective scan: reference vs fast path (JSON)"),
    (("bench", "chat"), "videollm.bench_chat", "time to first token, tokens/s and peak memory of a chat (JSON)"),
    (("bench", "ablation"), "training.ablation", "pretraining ablation on the synthetic time-dependent task"),
    (("bench", "concepts"), "training.concept_design", "which design carries real-world concepts to unseen footage"),
]


def _usage() -> str:
    return "\n".join(["usage: videollm [--verbose] COMMAND [ARGS…]   (videollm COMMAND --help for details)", "",
                      "--verbose: show library warnings, progress bars and tracebacks (quiet by default)", "",
                      "commands:", *(f"  {' '.join(words):<16} {text}" for words, _, text in COMMANDS)])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = VERBOSE_FLAG in argv
    argv = [a for a in argv if a != VERBOSE_FLAG]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    words, module = next(((w, m) for w, m, _ in sorted(COMMANDS, key=lambda c: -len(c[0]))
                          if tuple(argv[:len(w)]) == w), (None, None))
    if module is None:
        group = [c for c in COMMANDS if c[0][0] == argv[0]]
        hint = f"; '{argv[0]}' takes one of: {', '.join(c[0][1] for c in group)}" if group else ""
        print(f"error: unknown command '{' '.join(argv[:2])}'{hint}\n\n{_usage()}", file=sys.stderr)
        return 2
    rest = argv[len(words):] + ([VERBOSE_FLAG] if verbose else [])
    return run_cli(lambda args: importlib.import_module(module).main(args), rest)


if __name__ == "__main__":
    sys.exit(main())
