"""``--frames auto``: the most frames whose answer fits a memory budget and the LLM's context.

Answering about T frames costs memory that grows linearly with T: the encoder's activations
(freed block by block at inference), the projector's tokens and the LLM's prefill (its KV cache and
one layer's activations). `measure_frame_cost` runs a saved model's own answer path (encode +
prefill of a question about T random frames) in a fresh process at two frame counts, reads the
process's peak resident memory during that answer, and fits ``peak(T) = base_mb + per_frame_mb · T``
(base: the loaded model and the fixed costs). The fit is kept in the cache folder, so it is
measured once per model and machine (a model folder may ship one as ``frame_cost.json``). `auto_frames` then takes the most frames with ``peak(T) ≤ --max-memory`` whose
video tokens, the prompt and the reply fit the LLM's context.

    videollm chat clip.mp4 "What happens?" --frames auto --max-memory 8GB
    python -m videollm.frame_budget --model DIR        # measure and print the fit (JSON)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import resource
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from encoder.errors import UserError, run_cli
from encoder.files import atomic_write_text
from videollm.llm import default_cache_dir
from videollm.modeling_videollm import load_videollm, resolve_model_dir

COST_FILE = "frame_cost.json"
CALIBRATION_FRAMES = (16, 128)
QUESTION = "Describe the video."
_UNITS = {"": 1, "M": 1, "MB": 1, "MIB": 1, "G": 1024, "GB": 1024, "GIB": 1024}


@dataclass
class FrameCost:
    """peak resident memory (MB) of an answer about T frames ≈ base_mb + per_frame_mb · T."""

    base_mb: float
    per_frame_mb: float
    frames: list[int]
    peak_mb: list[float]

    def peak(self, frames: int) -> float:
        return self.base_mb + self.per_frame_mb * frames


def parse_frames(text: str) -> int | str:
    """argparse type of ``--frames``: a positive integer or ``auto``."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--frames takes a positive integer or 'auto'; got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"--frames must be >= 1; got {value}")
    return value


def parse_memory(text: str) -> float:
    """'8GB', '8 GiB', '6000MB', '6000' (MB) → MB."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text or "")
    unit = m.group(2).upper() if m else None
    if not m or unit not in _UNITS or float(m.group(1)) <= 0:
        raise UserError(f"--max-memory takes a size such as 8GB or 6000MB; got '{text}'")
    return float(m.group(1)) * _UNITS[unit]


def _memory_argument(text: str) -> float:
    try:
        return parse_memory(text)
    except UserError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_arguments(p: argparse.ArgumentParser, default_frames: int) -> None:
    p.add_argument("--frames", type=parse_frames, default=default_frames,
                   help=f"frames sampled uniformly from the video, or 'auto': the most that fit --max-memory "
                        f"and the LLM's context (default {default_frames})")
    p.add_argument("--max-memory", type=_memory_argument, default=None,
                   help="with --frames auto: the memory the answer may use in all, e.g. 8GB (default: 80%% of "
                        "this machine's available memory)")


def _proc_kb(path: str, key: str) -> float | None:
    """The kB value of ``key:`` in a /proc file (meminfo, status), or None where there is none."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key + ":"):
                return float(line.split()[1])
    except OSError:
        pass
    return None


def available_memory_mb() -> float:
    """MemAvailable (Linux) or total physical memory."""
    kb = _proc_kb("/proc/meminfo", "MemAvailable")
    return kb / 1024 if kb is not None else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20


def current_rss_mb() -> float:
    """This process's resident memory now (Linux: /proc/self/statm)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """This process's peak resident memory over its life (``ru_maxrss``: bytes on macOS, KiB elsewhere)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def _reset_peak() -> bool:
    """Reset this process's peak RSS (Linux: VmHWM via clear_refs); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_since_reset_mb() -> float:
    """Peak RSS since `_reset_peak` (VmHWM), or over the process's life where there is no VmHWM."""
    kb = _proc_kb("/proc/self/status", "VmHWM")
    return kb / 1024 if kb is not None else peak_rss_mb()


def measure_point(model_dir: str, frames: int) -> dict:
    """In this process: the peak RSS (MB) while answering (encode + prefill) about `frames` random frames."""
    model, processor = load_videollm(model_dir, num_frames=frames)
    S = processor.image_size
    rng = np.random.default_rng(0)
    clip = processor.load_video(rng.integers(0, 256, (frames, S, S, 3), dtype=np.uint8))
    inputs = processor(QUESTION, video=clip)
    with torch.inference_mode():  # warm-up on one frame: kernels and thread pools, not the answer's cost
        one = processor.load_video(rng.integers(0, 256, (1, S, S, 3), dtype=np.uint8))
        model(**processor(QUESTION, video=one), use_cache=True, logits_to_keep=1)
    loaded = current_rss_mb()
    exact = _reset_peak()
    with torch.inference_mode():
        model(**inputs, use_cache=True, logits_to_keep=1)
    return {"frames": frames, "model_rss_mb": round(loaded, 1), "peak_mb": round(_peak_since_reset_mb(), 1),
            "peak_reset": exact, "prompt_tokens": int(inputs["input_ids"].shape[1])}


def _fingerprint(model_dir: Path) -> str:
    """Changes when the model's files change (names, sizes, mtimes) or torch does."""
    h = hashlib.sha256(f"{model_dir.resolve()}|{torch.__version__}".encode())
    for f in sorted(model_dir.rglob("*")):
        if f.is_file() and f.name != COST_FILE:
            st = f.stat()
            h.update(f"{f.relative_to(model_dir)}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def measure_frame_cost(model_dir, frames=None, timeout: float = 900.0) -> FrameCost:
    """Measure a saved model's `FrameCost`, each frame count (default `CALIBRATION_FRAMES`) in a fresh
    process (no allocator history)."""
    rows = []
    for n in frames or CALIBRATION_FRAMES:
        cmd = [sys.executable, "-m", "videollm.frame_budget", "--point", json.dumps({"model_dir": str(model_dir),
                                                                                     "frames": int(n)})]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise UserError(f"measuring the memory of {n} frames took over {timeout:.0f} s; pass --frames N") from None
        line = next((x for x in reversed(proc.stdout.splitlines()) if x.startswith("{")), None)
        if proc.returncode != 0 or line is None:
            tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1][:300]
            raise UserError(f"measuring the memory of {n} frames failed ({tail}); pass --frames N")
        rows.append(json.loads(line))
    x = np.array([r["frames"] for r in rows], dtype=float)
    y = np.array([r["peak_mb"] for r in rows], dtype=float)
    slope = round(float(max(np.polyfit(x, y, 1)[0], 0.0)), 4) if len(rows) > 1 else 0.0
    # the line through the highest point, rounded up: never under a measured peak
    base = math.ceil(float(np.max(y - slope * x)) * 10) / 10
    return FrameCost(base, slope, [int(v) for v in x], [float(v) for v in y])


def frame_cost(model_dir=None, *, refresh: bool = False) -> FrameCost:
    """The model's `FrameCost`: from the cache (or the model folder's ``frame_cost.json``) if it is
    for these files on this machine, else measured now and kept in the cache."""
    model_dir = resolve_model_dir(model_dir)
    key = _fingerprint(model_dir)
    cached = default_cache_dir().parent / "frame_cost" / f"{key}.json"
    if not refresh:
        for path in (cached, model_dir / COST_FILE):
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if data.get("fingerprint") == key:
                return FrameCost(**{k: data[k] for k in ("base_mb", "per_frame_mb", "frames", "peak_mb")})
    print(f"note: measuring how memory grows with frames for this model (once; frames {', '.join(map(str, CALIBRATION_FRAMES))}) …",
          file=sys.stderr, flush=True)
    cost = measure_frame_cost(model_dir)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cached, json.dumps({**asdict(cost), "fingerprint": key}, indent=1) + "\n")
    except OSError as err:  # a read-only cache: measured again next time
        print(f"note: could not keep the measurement in {cached.parent} ({err.strerror})", file=sys.stderr)
    return cost


def auto_frames(model, processor, cost: FrameCost, max_memory_mb: float | None = None, *,
                max_new_tokens: int = 256, question: str = QUESTION) -> tuple[int, dict]:
    """(frames, why): the most frames with ``cost.peak(T) ≤ max_memory_mb`` (default: 80 % of the
    available memory) whose video tokens + the prompt + the reply fit the LLM's context, and no more
    than the model's ``max_frames`` (the longest clip its evaluation checked) when it states one."""
    budget = max_memory_mb if max_memory_mb is not None else 0.8 * available_memory_mb()
    by_memory = int((budget - cost.base_mb) // cost.per_frame_mb) if cost.per_frame_mb > 0 else 10**9
    S = processor.image_size
    per_frame = processor.config.num_video_tokens(1, S, S)
    text = processor(question, video=None)["input_ids"].shape[1] + 32  # + the time line, roughly
    context = getattr(model.config.text_config, "max_position_embeddings", None) or 10**9
    by_context = (context - text - max_new_tokens) // per_frame
    checked = getattr(model.config, "max_frames", None) or 10**9
    frames = int(min(by_memory, by_context, checked))
    why = {"frames": frames, "max_memory_mb": round(budget), "by_memory": by_memory, "by_context": int(by_context),
           "by_model": checked if checked < 10**9 else None, "prompt_tokens": text,
           "base_mb": cost.base_mb, "per_frame_mb": cost.per_frame_mb, "video_tokens_per_frame": per_frame,
           "context": context}
    if frames < 1:
        raise UserError(f"not even one frame fits: the model needs about {cost.peak(1):.0f} MB for one frame, "
                        f"the budget is {budget:.0f} MB (--max-memory)")
    return frames, why


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m videollm.frame_budget", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="a saved VideoLLM directory (default: the shipped model)")
    p.add_argument("--max-memory", type=parse_memory, default=None, help="also print the frames that fit, e.g. 8GB")
    p.add_argument("--refresh", action="store_true", help="measure again even if a fit is kept")
    p.add_argument("--point", help=argparse.SUPPRESS)  # internal: measure one frame count, print a JSON line
    args = p.parse_args(argv)
    if args.point:
        print(json.dumps(measure_point(**json.loads(args.point))), flush=True)
        return 0
    cost = frame_cost(args.model, refresh=args.refresh)
    model, processor = load_videollm(args.model)
    frames, why = auto_frames(model, processor, cost, args.max_memory)
    print(json.dumps({**why, "measured": {"frames": cost.frames, "peak_mb": cost.peak_mb}}))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
