"""`videollm bench scan`: forward+backward time of the reference scan vs the dispatched fast path,
and of one Mamba direction (conv → x_proj → dt_proj → scan) in parts vs fused.

Prints one JSON line. Errors are measured against the reference on the same inputs:
``max_abs_err`` is the largest |y_fast − y_ref|; ``max_grad_err`` is, over all inputs, the largest
|g_fast − g_ref| divided by that gradient's largest |g_ref| (gradients of A sum over b·l terms and
have a scale of their own, so an absolute figure would not compare across inputs).

``ssm``: one mixer direction of width e = ``--dim`` on the kernel, its parts in sequence
(``parts``: what autograd keeps by itself) vs `selective_ssm_cpu` (``fused``: recomputes the conv
output and Δ in the backward); ``*_fwd_ms`` the forward alone (with autograd recording),
``*_ms`` forward + backward, ``*_saved_mb`` what the forward keeps for the backward beyond its
inputs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from encoder.errors import run_cli
from encoder.scan import _pick_impl, _ssm_composed, causal_conv1d_ref, selective_scan_cpu, selective_scan_ref, selective_ssm_cpu


def make_inputs(b: int, d: int, n: int, l: int, seed: int = 0):
    """Inputs shaped like a Mamba layer's: softplus'd delta with Mamba's dt bias, S4D-real A."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(b, d, l, generator=g)
    delta = torch.randn(b, d, l, generator=g) * 0.5
    dt = torch.exp(torch.rand(d, generator=g) * (torch.log(torch.tensor(0.1)) - torch.log(torch.tensor(1e-3)))
                   + torch.log(torch.tensor(1e-3)))
    delta_bias = dt + torch.log(-torch.expm1(-dt))  # inverse softplus
    A = -torch.arange(1, n + 1, dtype=torch.float32).repeat(d, 1)
    B = torch.randn(b, n, l, generator=g)
    C = torch.randn(b, n, l, generator=g)
    D = torch.ones(d)
    z = torch.randn(b, d, l, generator=g)
    return dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias)


def run_once(fn, inputs, dy):
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    t0 = time.perf_counter()
    y = fn(leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"], D=leaves["D"],
           z=leaves["z"], delta_bias=leaves["delta_bias"], delta_softplus=True)
    y.backward(dy)
    seconds = time.perf_counter() - t0
    return seconds, y.detach(), {k: v.grad for k, v in leaves.items()}


def make_ssm_inputs(b: int, e: int, n: int, l: int, seed: int = 0):
    """One direction's input x (b, e, l) and parameters, at a Mamba layer's scales (dt rank e/32)."""
    g = torch.Generator().manual_seed(seed)
    r = max(1, e // 32)
    base = make_inputs(b, e, n, l, seed)
    return dict(x=torch.randn(b, e, l, generator=g), z=base["z"], conv_weight=torch.randn(e, 4, generator=g) * 0.3,
                conv_bias=torch.zeros(e), x_proj_weight=torch.randn(r + 2 * n, e, generator=g) * e ** -0.5,
                dt_proj_weight=torch.randn(e, r, generator=g) * r ** -0.5, A=base["A"], D=base["D"],
                delta_bias=base["delta_bias"])


def ssm_parts(x, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, A, D, z, delta_bias):
    return _ssm_composed(selective_scan_cpu, causal_conv1d_ref, x, conv_weight, conv_bias, x_proj_weight,
                         dt_proj_weight, A, D, z, delta_bias, True, False)


def ssm_fused(x, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, A, D, z, delta_bias):
    return selective_ssm_cpu(x, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, A, D=D, z=z,
                             delta_bias=delta_bias)


def run_ssm_once(fn, inputs, dy):
    """(forward seconds, forward + backward seconds, MB kept for the backward beyond the inputs)."""
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    given = {v.untyped_storage().data_ptr() for v in leaves.values()}
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn(**leaves)
    t1 = time.perf_counter()
    y.backward(dy)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t0, sum(v for k, v in kept.items() if k not in given) / 2**20


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="videollm bench scan", description=__doc__)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--state", type=int, default=16)
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each (median reported)")
    args = p.parse_args(argv)

    inputs = make_inputs(args.batch, args.dim, args.state, args.length)
    dy = torch.randn(args.batch, args.dim, args.length, generator=torch.Generator().manual_seed(1))
    fast = _pick_impl("cpu")
    run_once(fast, inputs, dy)  # warm-up (builds the kernel on first use)
    ref_times, fast_times = [], []
    for _ in range(args.repeats):
        t, y_ref, g_ref = run_once(selective_scan_ref, inputs, dy)
        ref_times.append(t)
        t, y_fast, g_fast = run_once(fast, inputs, dy)
        fast_times.append(t)
    ref_ms, fast_ms = 1e3 * statistics.median(ref_times), 1e3 * statistics.median(fast_times)
    grad_err = max(((g_fast[k] - g_ref[k]).abs().max() / g_ref[k].abs().max().clamp_min(1e-12)).item()
                   for k in g_ref)

    ssm_inputs = make_ssm_inputs(args.batch, args.dim, args.state, args.length)
    ssm = {}
    for name, fn in (("parts", ssm_parts), ("fused", ssm_fused)):
        run_ssm_once(fn, ssm_inputs, dy)  # warm-up
        runs = [run_ssm_once(fn, ssm_inputs, dy) for _ in range(args.repeats)]
        ssm[f"{name}_fwd_ms"] = round(1e3 * statistics.median(r[0] for r in runs), 1)
        ssm[f"{name}_ms"] = round(1e3 * statistics.median(r[1] for r in runs), 1)
        ssm[f"{name}_saved_mb"] = round(runs[0][2], 2)
    print(json.dumps({
        "shape": {"b": args.batch, "d": args.dim, "n": args.state, "l": args.length},
        "impl": fast.__name__,
        "threads": torch.get_num_threads(),
        "ref_ms": round(ref_ms, 1),
        "fast_ms": round(fast_ms, 1),
        "speedup": round(ref_ms / fast_ms, 1),
        "max_abs_err": (y_fast - y_ref).abs().max().item(),
        "max_grad_err": grad_err,
        "ssm": ssm,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
