"""``videollm profile memory``: peak memory and time of VideoMAP vs ViT encoders across frame counts.

    videollm profile memory --encoders videomap-tiny,vit-tiny,vit-tiny-frame \\
        --frames 8,16,32,64,128,256 --mode infer,train --out out/profile --time-limit 120 \\
        [--checkpointing off,on]

Every point (encoder, mode, frames) runs in a FRESH subprocess
(``python -m eval.profile_memory --point JSON``) so one point's allocations never inflate the
next one's peak, and a point that runs out of memory kills only itself.

What a point measures:

- CPU: ``baseline_rss_mb`` = resident memory after imports, model build and the input tensor
  (read from ``/proc/self/statm``); ``peak_rss_mb`` = ``ru_maxrss`` after the timed runs;
  ``delta_mb = peak - baseline`` is what the forward (and backward) added: activations, attention
  buffers, gradients. The input (B=1, 3, T, S, S) is allocated before the baseline, since it is the
  same for every encoder. CUDA: ``torch.cuda.max_memory_allocated`` (``cuda_peak_mb``).
- ``time_s`` (after an untimed one-frame warm-up): wall time of one forward under ``no_grad`` (``infer``) or forward + backward of
  ``mean(last_hidden_state²)`` (``train``); the median of up to 3 runs, fewer when a run is slow.
- ``--checkpointing on``: training points with activation checkpointing per block (each block keeps
  its input and recomputes the rest in the backward: Hugging Face's
  ``activation_checkpointing_enable()``, non-reentrant), a series of its own (``<encoder> ckpt``)
  compared with the other encoders' checkpointed series. Inference has nothing to checkpoint.
- ``--with-llm smollm2``: the encoder output goes through the VideoLLM projector (2×2 spatial
  pooling → K = T·49 tokens at 224 px) and those K embeddings prefill the LLM (no text tokens), so
  time and memory are the end-to-end video cost. The LLM is frozen; in ``train`` mode gradients
  flow back through it to the encoder.

A series (encoder, mode) stops at the first point that fails: ``oom`` (killed by a signal or
MemoryError), ``timeout`` (over ``--time-limit`` seconds) or ``error``; larger frame counts are
recorded as ``skipped``. Results: ``profile.csv`` (appended point by point; a rerun with the same
``--out`` reuses the points that finished and retries the others, e.g. with a longer
``--time-limit``), ``profile.png`` (log-log memory and time vs frames),
``profile.md`` (a table and the measured crossover frame counts), ``profile.json`` (the rows).
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from encoder.errors import UserError, run_cli
from encoder.build import build_encoder, parse_encoder_name
from videollm.configuration_videollm import VideoLLMConfig
from videollm.frame_budget import current_rss_mb, peak_rss_mb
from videollm.llm import default_cache_dir, load_llm
from videollm.projectors import build_projector

FIELDS = ["encoder", "mode", "checkpointing", "frames", "size", "with_llm", "status", "tokens", "llm_tokens", "params_m",
          "baseline_rss_mb", "peak_rss_mb", "delta_mb", "cuda_peak_mb", "time_s", "runs", "note"]
MODES = ("infer", "train")
CHECKPOINTING = ("off", "on")


def check_encoder_name(name: str) -> None:
    """Only preset names are profiled: ``videomap-<preset>``, ``vit-<preset>`` (joint attention) or
    ``vit-<preset>-frame`` (per-frame attention)."""
    if parse_encoder_name(name) is None or "-" not in name:
        raise UserError(f"unknown encoder '{name}'; use videomap-<preset>, vit-<preset> (joint attention) "
                        "or vit-<preset>-frame (per-frame attention)")


# ---------------------------------------------------------------------------------------------
# One point (runs in its own process)
# ---------------------------------------------------------------------------------------------


def run_point(encoder: str, frames: int, mode: str, size: int = 224, with_llm: str | None = None,
              max_runs: int = 3, llm_cache_dir: str | None = None, checkpointing: str = "off") -> dict:
    """Measure one point in this process; returns a row of `FIELDS`."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = build_encoder(encoder, num_frames=frames, img_size=size).to(device)
    model.train(mode == "train")
    if checkpointing == "on":
        model.activation_checkpointing_enable()
    params = sum(p.numel() for p in model.parameters())
    projector = llm = None
    note = ""
    llm_tokens = 0
    if with_llm:
        llm, _ = load_llm(with_llm, cache_dir=llm_cache_dir or default_cache_dir())
        llm.to(device).requires_grad_(False)
        cfg = VideoLLMConfig(vision_config=model.config.to_dict(), text_config=llm.config.to_dict())
        projector = build_projector(cfg.projector_type, cfg.projector_config, model.config.embed_dim,
                                    llm.config.hidden_size).to(device)
        llm_tokens = cfg.num_video_tokens(frames, size, size)
        note = f"LLM {with_llm} prefilled with the projector's {llm_tokens} video embeddings (no text)"
    pixel_values = torch.randn(1, 3, frames, size, size, device=device)  # (B, 3, T, S, S)
    tokens = 1 + frames * (size // model.config.patch_size) ** 2

    def step(x):
        with torch.set_grad_enabled(mode == "train"):
            out = model(x)
            h = out.last_hidden_state
            if llm is not None:
                embeds = projector(h, tuple(out.grid))  # (1, K, D_llm)
                h = llm(inputs_embeds=embeds, use_cache=False).logits[:, -1]
        if mode == "train":
            h.float().pow(2).mean().backward()
            model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    # Warm-up on one frame: loads the scan kernel, initialises the thread pools and allocator, so
    # neither the timed runs nor the baseline include one-time costs.
    step(pixel_values[:, :, :1])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    baseline = current_rss_mb()
    times = []
    for _ in range(max_runs):
        t0 = time.perf_counter()
        step(pixel_values)
        times.append(time.perf_counter() - t0)
        if sum(times) > 20:  # slow points: one or two runs are enough
            break
    times.sort()
    peak = peak_rss_mb()
    return {
        "encoder": encoder, "mode": mode, "checkpointing": checkpointing, "frames": frames, "size": size,
        "with_llm": with_llm or "", "status": "ok", "tokens": tokens, "llm_tokens": llm_tokens, "params_m": round(params / 1e6, 3),
        "baseline_rss_mb": round(baseline, 1), "peak_rss_mb": round(peak, 1),
        "delta_mb": round(max(peak - baseline, 0.0), 1),
        "cuda_peak_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if device.type == "cuda" else "",
        "time_s": round(times[len(times) // 2], 4), "runs": len(times), "note": note,
    }


def measure_in_subprocess(point: dict, time_limit: float) -> dict:
    """Run one point with ``python -m eval.profile_memory --point …``; classify failures."""
    cmd = [sys.executable, "-m", "eval.profile_memory", "--point", json.dumps(point)]
    base = {**{k: "" for k in FIELDS}, "encoder": point["encoder"], "mode": point["mode"],
            "checkpointing": point.get("checkpointing", "off"), "frames": point["frames"], "size": point["size"], "with_llm": point.get("with_llm") or ""}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=time_limit)
    except subprocess.TimeoutExpired:
        return {**base, "status": "timeout", "note": f"over the {time_limit:g} s limit"}
    if proc.returncode == 0:
        for line in reversed(proc.stdout.splitlines()):
            if line.startswith("{"):
                return json.loads(line)
    tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1][:200]
    oom = proc.returncode < 0 or "MemoryError" in proc.stderr or "DefaultCPUAllocator" in proc.stderr
    status = "oom" if oom else "error"
    note = f"rc={proc.returncode} after {time.perf_counter() - t0:.0f} s: {tail}"
    return {**base, "status": status, "note": note}


# ---------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------


def _ckpt(row: dict) -> str:
    return row.get("checkpointing") or "off"  # rows written before the column existed: off


def _key(row: dict) -> tuple:
    return (row["encoder"], row["mode"], _ckpt(row), int(row["frames"]), int(row["size"]),
            row.get("with_llm") or "")


def _series(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """(series name, mode) -> its rows by frame count; the name is the encoder's, with `` ckpt``
    when it ran with activation checkpointing."""
    out: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        out.setdefault((r["encoder"] + (" ckpt" if _ckpt(r) == "on" else ""), r["mode"]), []).append(r)
    for v in out.values():
        v.sort(key=lambda r: int(r["frames"]))
    return out


def crossovers(rows: list[dict]) -> list[str]:
    """For each mode and each joint-attention ViT: the smallest frame count from which VideoMAP is
    cheaper (time, memory), judged on frame counts where both finished or the ViT failed. A
    checkpointed series is compared with checkpointed ones only."""
    lines = []
    series = _series(rows)
    for mode in MODES:
        maps = [e for (e, m) in series if m == mode and e.startswith("videomap")]
        vits = [e for (e, m) in series if m == mode and e.startswith("vit") and not e.split()[0].endswith("-frame")]
        for a in maps:
            for b in vits:
                if a.endswith(" ckpt") != b.endswith(" ckpt"):
                    continue
                A = {int(r["frames"]): r for r in series[(a, mode)]}
                B = {int(r["frames"]): r for r in series[(b, mode)]}
                for metric, unit in (("time_s", "time"), ("delta_mb", "memory")):
                    found, tail = None, ""
                    for f in sorted(set(A) & set(B)):
                        ra, rb = A[f], B[f]
                        if ra["status"] != "ok":
                            if rb["status"] != "ok" and found:  # both failed: no evidence either way
                                tail = (f" (at {f} frames both stopped: {a} {ra['status']}, "
                                        f"{b} {rb['status']})")
                            else:
                                found = None
                            break
                        if rb["status"] != "ok" or float(ra[metric]) < float(rb[metric]):
                            found = found or f
                        else:
                            found = None  # must stay cheaper from there on
                    where = f"from {found} frames on{tail}" if found else "not within the measured range"
                    lines.append(f"- {mode}, {unit}: {a} cheaper than {b} {where}")
    return lines


def markdown_table(rows: list[dict]) -> str:
    cuda = any(r.get("cuda_peak_mb") not in ("", None) for r in rows)
    head = ("| encoder | mode | frames | tokens | status | time (s) | Δ peak RSS (MB) | baseline RSS (MB) |"
            + (" CUDA peak (MB) |" if cuda else ""))
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for (enc, mode), rs in _series(rows).items():
        for r in rs:
            cells = [enc, mode, str(r["frames"]), str(r.get("tokens") or ""), r["status"],
                     str(r.get("time_s") or ""), str(r.get("delta_mb") or ""), str(r.get("baseline_rss_mb") or "")]
            if cuda:
                cells.append(str(r.get("cuda_peak_mb") or ""))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for (enc, mode), rs in _series(rows).items():
        ok = [r for r in rs if r["status"] == "ok"]
        if not ok:
            continue
        x = [int(r["frames"]) for r in ok]
        style = "-" if mode == "infer" else (":" if enc.endswith(" ckpt") else "--")
        for ax, metric in zip(axes, ("delta_mb", "time_s")):
            line, = ax.plot(x, [max(float(r[metric]), 1e-3) for r in ok], style, marker="o", label=f"{enc} {mode}")
            failed = [r for r in rs if r["status"] in ("oom", "timeout", "error")]
            if failed:  # mark where the series stopped
                ax.plot([int(failed[0]["frames"])], [max(float(ok[-1][metric]), 1e-3)], "x",
                        color=line.get_color(), markersize=10)
    for ax, label in zip(axes, ("peak RSS above baseline (MB)", "wall time per step (s)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("frames")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    if axes[1].get_legend_handles_labels()[0]:
        axes[1].legend(fontsize=8)
    fig.suptitle("VideoMAP vs ViT: memory and time vs frames (× = series stopped: OOM/time limit)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _typed(row: dict) -> dict:
    """A row as JSON values: numbers as numbers (CSV gives strings), blanks as null."""
    def value(v):
        if v in ("", None):
            return None
        if isinstance(v, str):
            for cast in (int, float):
                try:
                    return cast(v)
                except ValueError:
                    pass
        return v
    return {k: (row.get(k) or "" if k in ("encoder", "mode", "status", "note", "with_llm") else value(row.get(k)))
            for k in FIELDS} | {"checkpointing": _ckpt(row)}


def write_reports(rows: list[dict], out: Path) -> None:
    plot(rows, out / "profile.png")
    (out / "profile.json").write_text(json.dumps([_typed(r) for r in rows], indent=1) + "\n", encoding="utf-8")
    notes = sorted({r["note"] for r in rows if r.get("note") and r["status"] == "ok"})
    text = ["# Encoder memory/time profile", "", markdown_table(rows), "", "## Crossover", "",
            *crossovers(rows), ""]
    if notes:
        text += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    (out / "profile.md").write_text("\n".join(text), encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def _ints(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{what} must be comma-separated integers; got '{text}'") from None
    if not values or min(values) < 1:
        raise UserError(f"{what} must be positive integers; got '{text}'")
    return sorted(set(values))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="videollm profile memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--encoders", default="videomap-tiny,vit-tiny,vit-tiny-frame")
    p.add_argument("--frames", default="8,16,32,64,128,256")
    p.add_argument("--mode", default="infer,train", help="infer, train or both (comma-separated)")
    p.add_argument("--out", help="output folder (profile.csv, profile.png, profile.md)")
    p.add_argument("--size", type=int, default=224, help="frame side in pixels (default 224)")
    p.add_argument("--time-limit", type=float, default=300.0, help="seconds per point before giving up")
    p.add_argument("--with-llm", help="also prefill this LLM (e.g. smollm2) with the projected video tokens")
    p.add_argument("--checkpointing", default="off",
                   help="activation checkpointing per block in training points: off, on or both (off,on)")
    p.add_argument("--point", help=argparse.SUPPRESS)  # internal: measure one point, print a JSON line
    args = p.parse_args(argv)

    if args.point:
        point = json.loads(args.point)
        print(json.dumps(run_point(**point)), flush=True)
        return 0
    if not args.out:
        raise UserError("--out is required")
    encoders = [e for e in args.encoders.split(",") if e]
    for e in encoders:
        check_encoder_name(e)
    modes = [m for m in args.mode.split(",") if m]
    if not modes or any(m not in MODES for m in modes):
        raise UserError(f"--mode takes infer, train or both; got '{args.mode}'")
    ckpts = [c for c in args.checkpointing.split(",") if c]
    if not ckpts or any(c not in CHECKPOINTING for c in ckpts):
        raise UserError(f"--checkpointing takes off, on or both (off,on); got '{args.checkpointing}'")
    # (encoder, mode, checkpointing) series; inference has no backward, so nothing to checkpoint.
    runs = [(e, m, c) for e in encoders for m in modes for c in ckpts if not (m == "infer" and c == "on")]
    frames = _ints(args.frames, "--frames")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "profile.csv"
    rows: list[dict] = []
    if csv_path.is_file():  # reuse finished points; failed/skipped ones are measured again
        with csv_path.open() as f:
            rows = [r for r in csv.DictReader(f) if r["status"] == "ok"]
    done = {_key(r): r for r in rows}
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows({k: r.get(k, "") for k in FIELDS} for r in rows)
        f.flush()
        for encoder, mode, ckpt in runs:
            stopped = None
            for n in frames:
                point = {"encoder": encoder, "frames": n, "mode": mode, "size": args.size,
                         "with_llm": args.with_llm, "checkpointing": ckpt}
                key = _key(point)
                row = done.get(key)
                if row is None:
                    if stopped:
                        row = {**{k: "" for k in FIELDS}, **point, "with_llm": args.with_llm or "",
                               "status": "skipped", "note": f"series stopped at {stopped}"}
                    else:
                        row = measure_in_subprocess(point, args.time_limit)
                    writer.writerow({k: row.get(k, "") for k in FIELDS})
                    f.flush()
                    rows.append(row)
                    done[key] = row
                if row["status"] != "ok" and not stopped:
                    stopped = f"{n} frames ({row['status']})"
                print(json.dumps({k: row.get(k) for k in ("encoder", "mode", "checkpointing", "frames", "status",
                                                        "time_s", "delta_mb")}), flush=True)
    wanted = {(e, m, c, n, args.size, args.with_llm or "") for e, m, c in runs for n in frames}
    write_reports([r for r in rows if _key(r) in wanted], out)
    print(f"wrote {csv_path}, {out / 'profile.json'}, {out / 'profile.png'}, {out / 'profile.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
