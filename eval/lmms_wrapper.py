"""lmms-eval (PyPI ``lmms-eval``) model class for our VideoLLM, and an offline synthetic-QA task.

Two commands::

    # 1. write the offline task (YAML + utils + docs.jsonl + mp4 videos) into a folder
    python -m eval.lmms_wrapper prepare --out /tmp/vm_tasks --n 20 --seed 0
    # 2. run lmms-eval with our model registered as "videomap_llm"; the rest are lmms-eval's flags
    python -m eval.lmms_wrapper run --model videomap_llm --model_args pretrained=runs/sft,max_frames_num=16 \\
        --tasks videomap_synthqa --include_path /tmp/vm_tasks --batch_size 1 --limit 4 --output_path out/lmms

``run`` registers `VideoMAPLLM` in lmms-eval's model registry (``lmms_eval.models.MODEL_REGISTRY_V2``)
and hands the remaining arguments to lmms-eval's own CLI, so every lmms-eval task (Video-MME,
MVBench, … from the Hub, when you have network) works the same way. A package can instead expose
`lmms_manifest` under the ``lmms_eval.models`` entry-point group; then plain ``lmms-eval --model
videomap_llm`` finds it.

`VideoMAPLLM` implements lmms-eval's "simple" model API: ``generate_until`` (greedy, cut at the
``until`` strings) and ``loglikelihood`` (sum of log-probabilities of the continuation tokens after
the chat-templated context, and whether greedy decoding would produce them). Visuals: the first
video path of a document (uniformly sampled to ``max_frames_num`` frames), or a list of PIL images
taken as frames.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

from encoder.errors import UserError, run_cli
from encoder.video_io import read_video
from eval.qa import VideoLLMAnswerer, uniform_frames
from videollm.chat import continuation_logprobs, generate_stream
from videollm.data.synth import resize_frames

TASK_DIR = Path(__file__).resolve().parent / "lmms_tasks"
MODEL_ID = "videomap_llm"

try:  # lmms-eval is optional; the class is only defined when it imports
    from lmms_eval.api.model import lmms as _LMMBase
except ImportError:  # pragma: no cover - exercised when lmms-eval is absent
    _LMMBase = None


def lmms_manifest():
    """Entry point payload for the ``lmms_eval.models`` group (a `ModelManifest`)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path="eval.lmms_wrapper.VideoMAPLLM")


if _LMMBase is not None:

    class VideoMAPLLM(_LMMBase):
        """lmms-eval model: ``--model_args pretrained=DIR|default,max_frames_num=16,max_new_tokens=16``."""

        is_simple = True

        def __init__(self, pretrained: str = "default", max_frames_num: int = 16, max_new_tokens: int = 16,
                     batch_size: int = 1, device: str = "cpu", **kwargs):
            super().__init__()
            if int(batch_size) != 1:
                raise ValueError("VideoMAPLLM runs one request at a time; use --batch_size 1")
            self.num_frames = int(max_frames_num)
            self.max_new_tokens = int(max_new_tokens)
            self.answerer = VideoLLMAnswerer(pretrained, max_new_tokens=self.max_new_tokens,
                                             num_frames=self.num_frames)
            self.model, self.processor = self.answerer.model, self.answerer.processor
            self.batch_size_per_gpu = 1

        # ---- inputs ---------------------------------------------------------------------------

        def _frames(self, visuals) -> np.ndarray | None:
            """uint8 (T, H, W, 3) from a document's visuals, or None for text only."""
            if visuals is None:
                return None
            if not isinstance(visuals, (list, tuple)):
                visuals = [visuals]
            visuals = [v for v in visuals if v is not None]
            if not visuals:
                return None
            first = visuals[0]
            if isinstance(first, (str, Path)):
                return read_video(first, self.num_frames).frames
            if isinstance(first, np.ndarray) and first.ndim == 4:
                return uniform_frames(first, self.num_frames)
            images = [np.asarray(v.convert("RGB")) for v in visuals]  # PIL images as frames
            h, w = images[0].shape[:2]
            return np.concatenate([resize_frames(im[None], h, w) for im in images]).astype(np.uint8)

        def _doc_frames(self, doc_to_visual, doc_id, task, split):
            return self._frames(doc_to_visual(self.task_dict[task][split][doc_id]))

        # ---- lmms API -------------------------------------------------------------------------

        def generate_until(self, requests) -> list[str]:
            out = []
            for context, gen_kwargs, doc_to_visual, doc_id, task, split in [r.args for r in requests]:
                frames = self._doc_frames(doc_to_visual, doc_id, task, split)
                gen_kwargs = dict(gen_kwargs or {})
                until = gen_kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                max_new = int(gen_kwargs.get("max_new_tokens", self.max_new_tokens))
                temperature = float(gen_kwargs.get("temperature", 0.0) or 0.0)
                text = "".join(generate_stream(self.model, self.processor, frames,
                                               [{"role": "user", "content": context}],
                                               max_new_tokens=max_new, temperature=temperature))
                for stop in until:
                    if stop and stop in text:
                        text = text.split(stop)[0]
                out.append(text.strip())
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), out[-1])
            return out

        def loglikelihood(self, requests) -> list[tuple[float, bool]]:
            results = []
            for context, target, doc_to_visual, doc_id, task, split in [r.args for r in requests]:
                doc = self.task_dict[task][split][doc_id]
                continuation = target if isinstance(target, str) else target(doc)
                frames = self._frames(doc_to_visual(doc))
                results += continuation_logprobs(self.model, self.processor, frames,
                                                 [{"role": "user", "content": context}], [continuation])
                self.cache_hook.add_partial("loglikelihood", (context, continuation), results[-1])
            return results

        def generate_until_multi_round(self, requests) -> list[str]:
            raise NotImplementedError("VideoMAPLLM does not implement multi-round generation")


# ---------------------------------------------------------------------------------------------
# Offline task data and the launcher
# ---------------------------------------------------------------------------------------------


def prepare_task(out: str | Path, n: int = 20, seed: int = 0, num_frames: int = 16, size: int = 64) -> Path:
    """Copy the task template (YAML files, utils.py) to `out` and write ``synthqa/docs.jsonl`` and
    the mp4 videos it points to. Returns `out`."""
    from encoder.video_io import write_video
    from eval.benchmarks import load_synthqa

    out = Path(out)
    (out / "synthqa" / "videos").mkdir(parents=True, exist_ok=True)
    for file in TASK_DIR.iterdir():
        if file.suffix in (".yaml", ".py"):
            shutil.copy2(file, out / file.name)
    lines = []
    for s in load_synthqa(seed=seed, n=n, num_frames=num_frames, size=size):
        rel = f"synthqa/videos/{s.id}.mp4"
        write_video(out / rel, s.frames, fps=8.0)
        lines.append(json.dumps({"id": s.id, "video": rel, "question": s.question, "options": s.options,
                                 "answer": s.answer, **s.categories}))
    (out / "synthqa" / "docs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def run_lmms_eval(argv: list[str]) -> int:
    """lmms-eval's CLI with `VideoMAPLLM` registered as ``videomap_llm``."""
    try:
        from lmms_eval.cli.dispatch import main as lmms_main
        from lmms_eval.models import MODEL_REGISTRY_V2
    except ImportError as err:
        raise UserError(f"lmms-eval is not installed ({err}); see docs/eval.md for the install lines") from None
    MODEL_REGISTRY_V2.register_manifest(lmms_manifest(), overwrite=True)
    saved = sys.argv
    sys.argv = ["lmms-eval", *argv]
    try:
        lmms_main()
    except SystemExit as exit_:
        return int(exit_.code or 0)
    finally:
        sys.argv = saved
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["run"]:
        return run_lmms_eval(argv[1:])
    p = argparse.ArgumentParser(prog="python -m eval.lmms_wrapper",
                                description="prepare: write the offline videomap_synthqa task; "
                                            "run …: lmms-eval with our model registered")
    sub = p.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="write the task folder (YAML, utils, docs.jsonl, videos)")
    prep.add_argument("--out", required=True)
    prep.add_argument("--n", type=int, default=20)
    prep.add_argument("--seed", type=int, default=0)
    prep.add_argument("--num-frames", type=int, default=16)
    prep.add_argument("--size", type=int, default=64)
    sub.add_parser("run", help="run lmms-eval (all further arguments are lmms-eval's)")
    args = p.parse_args(argv)
    out = prepare_task(args.out, n=args.n, seed=args.seed, num_frames=args.num_frames, size=args.size)
    print(f"wrote the videomap_synthqa task to {out}; pass --include_path {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
