"""Write the result tables of docs/*.md from the JSON result files beside them.

A table in a page sits between two markers, and only the lines between them are rewritten:

    <!-- table: ablation_result -->
    | arm | … |
    <!-- /table -->

    python docs/tables.py           # rewrite every marked table from docs/*.json
    python docs/tables.py --check   # exit 1 and name the tables that differ from their JSON

Each JSON file holds measured results with the command that made them; to update a table, put
the new numbers in its JSON (never in the page) and run this script.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
MARKED = re.compile(r"(<!-- table: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /table -->)", re.S)


def load(name: str) -> dict:
    return json.loads((DOCS / name).read_text(encoding="utf-8"))


def rows(header: list[str], body: list[list[str]], align: list[str] | None = None) -> str:
    """A markdown table; `align` holds '---' or '---:' per column."""
    align = align or ["---"] * len(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines) + "\n"


def pm(v: list[float]) -> str:
    """[mean, std] as 'mean ± std' (one decimal, as measured)."""
    return f"{v[0]:.1f} ± {v[1]:.1f}"


# ---------------------------------------------------------------------------------------------
# docs/ablation.json


def ablation_old() -> str:
    d = load("ablation.json")["old_setting"]
    return rows([f"arm (old setting, 3 seeds, {d['minutes']} min)", "fine-tune top-1 (%)", "linear-probe top-1 (%)"],
                [[a["arm"], pm(a["finetune_top1"]), pm(a["linear_top1"])] for a in d["arms"]])


def ablation_pilots() -> str:
    body = []
    for r in load("ablation.json")["pilots"]["rows"]:
        top1 = pm(r["scratch_finetune_top1"]) if isinstance(r["scratch_finetune_top1"], list) \
            else f"{r['scratch_finetune_top1']:.1f}"
        cells = [r["setting"], f"{top1} %",
                 "—" if r["final_train_loss"] is None else f"{r['final_train_loss']:.2f}",
                 "—" if r["wall_min"] is None else f"{r['wall_min']:.1f} min"]
        if r.get("chosen"):  # the setting that became the default budget
            cells = [f"**{c}**" if i < 3 else c for i, c in enumerate(cells)]
        body.append(cells)
    return rows(["setting (32 px, 8 frames, patch 8 unless said)", "scratch fine-tune top-1", "final train loss", "wall"],
                body)


def ablation_result() -> str:
    arms = load("ablation.json")["result"]["arms"]
    return rows(["arm", "encoder", "pretraining", "fine-tune top-1 (%)", "linear-probe top-1 (%)", "final pretrain loss"],
                [[a["arm"], a["encoder"], a["pretraining"], pm(a["finetune_top1"]), pm(a["linear_top1"]),
                  "—" if a["pretrain_loss"] is None else f"{a['pretrain_loss']:.3f}"] for a in arms])


def ablation_seeds() -> str:
    arms = load("ablation.json")["result"]["arms"]
    n = len(arms[0]["per_seed_finetune_linear_top1"])
    return rows(["arm", *[f"seed {i}: fine-tune / linear (%)" for i in range(n)]],
                [[a["arm"], *[f"{ft:.1f} / {lp:.1f}" for ft, lp in a["per_seed_finetune_linear_top1"]]]
                 for a in arms])


def pretraining_ablation() -> str:
    s = load("pretraining_ablation.json")["summary"]
    fr = ["1%", "10%", "100%"]

    def cell(e: dict | None) -> str:
        return "—" if e is None else f"{100 * e['mean']:.1f} ± {100 * e['std']:.1f}" + ("" if e["n"] == 3 else f" (n={e['n']})")

    return rows(["arm", *[f"fine-tune {f}" for f in fr], *[f"probe {f}" for f in fr]],
                [[arm, *[cell(per.get(f, {}).get(k)) for k in ("finetune_top1", "linear_top1") for f in fr]]
                 for arm, per in s.items()])


def pretraining_comparisons() -> str:
    c = load("pretraining_ablation.json")["comparisons"]
    return rows(["at 10 % labels", "fine-tune: points (pooled σ)", "probe: points (pooled σ)"],
                [[name.replace("-", " − "), *[f"{d[k]['points']:+.1f} ({d[k]['in_pooled_stds']:+.2f} σ)"
                                               for k in ("finetune_top1", "linear_top1")]] for name, d in c.items()])


# ---------------------------------------------------------------------------------------------
# docs/profile_cpu.json


def _cell(r: dict | None) -> str:
    if r is None:
        return ""
    if r["status"] == "ok":
        return f"{r['time_s']} / {r['delta_mb']:,}"
    return r.get("note") or r["status"]


def _profile_table(part: dict, series: list[tuple[str, str]], heads: list[str], tokens_head: str) -> str:
    by = {(r["encoder"], r["mode"], r["frames"]): r for r in part["rows"]}
    frames = sorted({r["frames"] for r in part["rows"]})
    tokens = {r["frames"]: r["tokens"] for r in part["rows"]}
    body = [[str(f), f"{tokens[f]:,}", *[_cell(by.get((e, m, f))) for e, m in series]] for f in frames]
    return rows(["frames", tokens_head, *heads], body, ["---:", "---:", *["---"] * len(series)])


NAMES = {"videomap-tiny": "VideoMAP-tiny", "vit-tiny": "ViT-tiny joint", "vit-tiny-frame": "ViT-tiny per-frame"}


def profile_encoders() -> str:
    series = [(e, m) for m in ("infer", "train") for e in NAMES]
    return _profile_table(load("profile_cpu.json")["encoders"], series, [f"{NAMES[e]} {m}" for e, m in series],
                          "tokens")


def profile_with_llm() -> str:
    series = [(e, "infer") for e in NAMES]
    return _profile_table(load("profile_cpu.json")["with_llm"], series, [f"{NAMES[e]} + LLM" for e, _ in series],
                          "LLM tokens")


def profile_lean_train() -> str:
    """Training steps after the lean Mamba backward (docs/profile_lean_train.json), VideoMAP and the
    joint ViT measured in the same run, next to VideoMAP before it (docs/profile_cpu.json)."""
    new = {(r["encoder"], r["frames"]): r for r in load("profile_lean_train.json")["rows"]}
    old = {r["frames"]: r for r in load("profile_cpu.json")["encoders"]["rows"]
           if r["encoder"] == "videomap-tiny" and r["mode"] == "train"}
    body = []
    for f in sorted({f for _, f in new}):
        vm, vit = new.get(("videomap-tiny", f)), new.get(("vit-tiny", f))
        ratio = (f"{vm['delta_mb'] / vit['delta_mb']:.2f}" if vm and vit and vm["status"] == vit["status"] == "ok"
                 else "")
        body.append([str(f), f"{(vm or vit)['tokens']:,}" if (vm or vit).get("tokens") else "", _cell(old.get(f)),
                     _cell(vm), _cell(vit), ratio])
    return rows(["frames", "tokens", "VideoMAP-tiny before", "VideoMAP-tiny lean", "ViT-tiny joint",
                 "VideoMAP / ViT memory"], body, ["---:", "---:", "---", "---", "---", "---:"])


# ---------------------------------------------------------------------------------------------
# docs/niah_long.json


def niah_long() -> str:
    d = load("niah_long.json")
    n = d["needles"]
    depth_heads = [f"depth {x:g}" for x in d["depths"]]
    body = [[str(r["frames"]), f"{r['video_tokens']:,}", "answered",
             *[f"{c}/{n}" for c in r["correct"]], f"{100 * sum(r['correct']) / (n * len(r['correct'])):.1f}%"]
            for r in d["rows"]]
    body += [[str(r["frames"]), "", "named by its own tokens (`--readout`)",
              *[f"{c}/{n}" for c in r["named"]], f"{100 * sum(r['named']) / (n * len(r['named'])):.1f}%"]
             for r in d["readout"]]
    return rows(["frames", "video tokens", "needles", *depth_heads, "all"], body,
                ["---:", "---:", "---", *["---:"] * len(depth_heads), "---:"])


def niah_budget() -> str:
    """V-NIAH with the shipped 1,024-token budget (docs/niah_budget.json): the validation choice
    between averaging and the named merge, then the test grid on new needles."""
    d = load("niah_budget.json")
    depths = d["depths"]

    def pct(correct, n):
        return f"{100 * sum(correct) / (n * len(correct)):.1f}%"

    v = d["validation"]
    body = [[f"validation (seed {v['seed']}, {v['needles']} needles)", str(v["frames"]), f"{a['video_tokens']:,}",
             a["temporal_merge"], *[f"{c}/{v['needles']}" for c in a["correct"]], pct(a["correct"], v["needles"])]
            for a in v["arms"]]
    t = d["test"]
    body += [[f"test (seed {t['seed']}, {r['needles']} needles)", str(r["frames"]), f"{r['video_tokens']:,}",
              r["temporal_merge"], *[f"{c}/{r['needles']}" for c in r["correct"]], pct(r["correct"], r["needles"])]
             for r in t["rows"]]
    heads = [f"depth {x:g}" for x in depths]
    return rows(["split", "frames", "video tokens", "merge", *heads, "all"], body,
                ["---", "---:", "---:", "---", *["---:"] * len(heads), "---:"])


def bench_chat() -> str:
    """`videollm bench chat` runs (docs/bench_chat.json): ours and the bare base LLM in the same run."""
    body = []
    for r in load("bench_chat.json")["runs"]:
        bare = r["bare"]
        runs = r.get("time_to_first_token_runs_s")
        ttft = f"{r['time_to_first_token_s']:.2f}" + (f" ({min(runs):.2f}–{max(runs):.2f})" if runs else "")
        body.append([str(r["frames"]), f"{r['video_tokens']:,}", ttft,
                     f"{r['decode_s']:.2f} / {r['encode_s']:.2f}", f"{r['tokens_per_s']:.1f}",
                     f"{bare['tokens_per_s']:.1f} ({', '.join(f'{k} {v:.1f}' for k, v in bare['by_attention'].items())})",
                     f"{r['decode_speedup']:.2f}×", f"{r['peak_rss_mb']:,.0f}",
                     f"{r['next_turn']['time_to_first_token_s']:.2f} ({r['next_turn']['prompt_tokens']:,} tokens)"
                     if "next_turn" in r else "–"])
    return rows(["frames", "video tokens", "TTFT (s): median (range)", "reading / encoding (s)", "tokens/s", "bare SmolLM2 tokens/s",
                 "speed-up", "peak RSS (MB)", "next turn TTFT (s)"], body,
                ["---:", "---:", "---:", "---:", "---:", "---", "---:", "---:", "---:"])


TABLES = {f.__name__: f for f in (ablation_old, ablation_pilots, ablation_result, ablation_seeds, pretraining_ablation,
                                  pretraining_comparisons, profile_encoders, profile_with_llm, profile_lean_train,
                                  niah_long, niah_budget, bench_chat)}


def render(text: str, page: str = "") -> str:
    """`text` with every marked table rewritten from its JSON."""
    def one(m: re.Match) -> str:
        name = m["name"]
        if name not in TABLES:
            raise SystemExit(f"{page}: unknown table {name!r} (known: {', '.join(TABLES)})")
        return m.group(1) + TABLES[name]() + m.group(4)
    return MARKED.sub(one, text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table differs from its JSON")
    args = ap.parse_args(argv)
    stale = []
    for page in sorted(DOCS.glob("*.md")):
        text = page.read_text(encoding="utf-8")
        new = render(text, page.name)
        if new != text:
            stale.append(page.name)
            if not args.check:
                page.write_text(new, encoding="utf-8")
    if args.check and stale:
        print(f"tables differ from their JSON in: {', '.join(stale)} (run python docs/tables.py)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
