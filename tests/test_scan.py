"""Selective scan: the C++ CPU kernel against the sequential reference, and the dispatch contract."""

import importlib
import logging
import sys
import types

import pytest
import torch

from encoder import scan
from encoder.scan import selective_scan, selective_scan_cpu, selective_scan_ref

RTOL, ATOL = 1e-4, 1e-5


def make(b, d, n, l, bc="shared", seed=0, delta_scale=0.5):
    g = torch.Generator().manual_seed(seed)
    shapes = {"shared": (b, n, l), "grouped": (b, 2, n, l), "invariant": (d, n)}[bc]
    return dict(
        u=torch.randn(b, d, l, generator=g),
        delta=torch.rand(b, d, l, generator=g) * delta_scale,
        A=-torch.rand(d, n, generator=g) * 2 - 0.1,
        B=torch.randn(*shapes, generator=g),
        C=torch.randn(*shapes, generator=g),
        D=torch.randn(d, generator=g),
        z=torch.randn(b, d, l, generator=g),
        delta_bias=torch.randn(d, generator=g) * 0.5,
    )


def run(fn, inputs, options, seed=1):
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    kw = {k: leaves[k] for k in ("D", "z", "delta_bias") if options.get(k)}
    out = fn(leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"],
             delta_softplus=options.get("softplus", False), return_last_state=True, **kw)
    y, last = out
    g = torch.Generator().manual_seed(seed)
    loss = (y * torch.randn(y.shape, generator=g)).sum() + (last * torch.randn(last.shape, generator=g)).sum()
    loss.backward()
    grads = {k: v.grad for k, v in leaves.items() if k in ("u", "delta", "A", "B", "C") or options.get(k)}
    return y.detach(), last.detach(), grads


OPTION_SETS = [
    {},
    {"softplus": True, "delta_bias": True},
    {"D": True, "z": True},
    {"softplus": True, "delta_bias": True, "D": True, "z": True},
]


@pytest.mark.parametrize("bc", ["shared", "grouped", "invariant"])
@pytest.mark.parametrize("options", OPTION_SETS, ids=lambda o: "+".join(o) or "plain")
@pytest.mark.parametrize("shape", [(2, 24, 4, 37), (1, 40, 16, 130)], ids=["d24", "d40-l130"])
def test_cpu_kernel_matches_reference(bc, options, shape):
    # d=24 and d=40 are not multiples of the kernel's 16-lane blocks; l=130 spans three 64-step
    # recompute chunks of the backward.
    inputs = make(*shape, bc=bc)
    y_ref, last_ref, g_ref = run(selective_scan_ref, inputs, options)
    y, last, g = run(selective_scan_cpu, inputs, options)
    torch.testing.assert_close(y, y_ref, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(last, last_ref, rtol=RTOL, atol=ATOL)
    assert g.keys() == g_ref.keys()
    for k in g_ref:
        diff = (g[k] - g_ref[k]).abs().max().item()
        print(f"{bc} {options} grad {k}: max diff {diff:.2e}")
        torch.testing.assert_close(g[k], g_ref[k], rtol=RTOL, atol=ATOL, msg=f"grad of {k}")


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_cpu_kernel_reads_strided_views_in_place(reverse):
    # A Mamba mixer holds its activations as (b, l, d) and its B/C as columns of x_proj's output:
    # the kernel takes those views as they are (no copies) and must agree with the reference.
    # n=20 spans two 16-lane reduction groups; the loss y.sum() hands backward a broadcast (stride-0)
    # gradient. `reverse` (the bidirectional mixer's backward direction) reads every time axis
    # backwards in the kernel; the reference flips copies.
    b, d, n, l, r = 2, 40, 20, 70, 3
    g = torch.Generator().manual_seed(3)
    leaves = {
        "u": torch.randn(b, l, d, generator=g), "delta": torch.rand(b, l, d, generator=g),
        "z": torch.randn(b, l, d, generator=g), "xdbl": torch.randn(b, l, r + 2 * n, generator=g),
        "A": -torch.rand(n, d, generator=g) - 0.1, "D": torch.randn(d, generator=g),
        "delta_bias": torch.randn(d, generator=g) * 0.5,
    }

    def go(fn):
        x = {k: v.clone().requires_grad_(True) for k, v in leaves.items()}
        views = dict(u=x["u"].transpose(1, 2), delta=x["delta"].transpose(1, 2), A=x["A"].t(),
                     B=x["xdbl"][..., r:r + n].transpose(1, 2), C=x["xdbl"][..., r + n:].transpose(1, 2))
        assert not views["u"].is_contiguous() and not views["B"].is_contiguous()
        y, last = fn(**views, D=x["D"], z=x["z"].transpose(1, 2), delta_bias=x["delta_bias"],
                     delta_softplus=True, return_last_state=True, reverse=reverse)
        (y.sum() + last.square().sum()).backward()
        return y.detach(), {k: v.grad for k, v in x.items()}

    y_ref, g_ref = go(selective_scan_ref)
    y, grads = go(selective_scan_cpu)
    torch.testing.assert_close(y, y_ref, rtol=RTOL, atol=ATOL)
    if reverse:  # the reference's reverse is the plain scan of the flipped sequence
        plain = selective_scan_ref(leaves["u"].transpose(1, 2).flip(-1), leaves["delta"].transpose(1, 2).flip(-1),
                                   leaves["A"].t(), leaves["xdbl"][..., r:r + n].transpose(1, 2).flip(-1),
                                   leaves["xdbl"][..., r + n:].transpose(1, 2).flip(-1), D=leaves["D"],
                                   z=leaves["z"].transpose(1, 2).flip(-1), delta_bias=leaves["delta_bias"],
                                   delta_softplus=True).flip(-1)
        torch.testing.assert_close(y_ref, plain)
        assert not torch.allclose(y_ref, go(lambda *a, reverse, **k: selective_scan_ref(*a, **k))[0])
    for k in g_ref:
        torch.testing.assert_close(grads[k], g_ref[k], rtol=RTOL, atol=ATOL, msg=f"grad of {k}")


def test_output_dtype_follows_u_and_last_state_optional():
    inputs = make(1, 16, 4, 20)
    y = selective_scan(inputs["u"].double(), inputs["delta"], inputs["A"], inputs["B"], inputs["C"])
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float64
    y16 = selective_scan(inputs["u"].bfloat16(), inputs["delta"], inputs["A"], inputs["B"], inputs["C"])
    assert y16.dtype == torch.bfloat16


def test_long_sequence_and_large_decay_stay_finite():
    # l = 16384 with delta·|A| up to ~1e3: exp underflows to exactly 0, as in the reference;
    # nothing may overflow to inf or nan. Compare on a window (the reference is slow at this length).
    b, d, n, l = 1, 16, 16, 16384
    g = torch.Generator().manual_seed(0)
    u = torch.randn(b, d, l, generator=g)
    delta = torch.rand(b, d, l, generator=g) * 60
    delta[..., ::7] = 1e-4  # mix of long and short memory
    A = -torch.rand(d, n, generator=g) * 16
    B, C = torch.randn(b, n, l, generator=g), torch.randn(b, n, l, generator=g)
    leaves = [t.clone().requires_grad_(True) for t in (u, delta, A, B, C)]
    y, last = selective_scan_cpu(*leaves, return_last_state=True)
    y.square().mean().backward()
    assert torch.isfinite(y).all() and torch.isfinite(last).all()
    assert all(torch.isfinite(t.grad).all() for t in leaves)
    w = slice(l - 300, l)  # states are forgotten within a step here, so a window reproduces the tail
    y_ref = selective_scan_ref(u[..., w], delta[..., w], A, B[..., w], C[..., w])
    torch.testing.assert_close(y[..., 50 + l - 300:].detach(), y_ref[..., 50:], rtol=RTOL, atol=ATOL)


def test_no_grad_forward_matches():
    inputs = make(2, 32, 8, 50)
    with torch.no_grad():
        y = selective_scan_cpu(inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"])
    y_ref = selective_scan_ref(inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"])
    torch.testing.assert_close(y, y_ref, rtol=RTOL, atol=ATOL)


def test_bad_shapes_raise_clear_errors():
    inputs = make(1, 8, 4, 10)
    with pytest.raises(ValueError, match="A must be"):
        selective_scan(inputs["u"], inputs["delta"], inputs["A"][:4], inputs["B"], inputs["C"])
    with pytest.raises(ValueError, match="does not divide"):
        selective_scan(inputs["u"], inputs["delta"], inputs["A"], torch.randn(1, 3, 4, 10), inputs["C"])
    with pytest.raises(ValueError, match="u and delta"):
        selective_scan(inputs["u"], inputs["delta"][..., :5], inputs["A"], inputs["B"], inputs["C"])


def test_cpu_dispatch_uses_kernel():
    assert scan._pick_impl("cpu") is selective_scan_cpu


def test_fallback_is_logged_once(monkeypatch, caplog):
    monkeypatch.setattr(scan, "_CPU_EXT", None)
    monkeypatch.setattr(scan, "_CPU_EXT_ERROR", "no compiler")
    monkeypatch.setattr(scan, "_LOGGED", set())
    with caplog.at_level(logging.WARNING, logger="encoder.scan"):
        assert scan._pick_impl("cpu") is selective_scan_ref
        assert scan._pick_impl("cpu") is selective_scan_ref
    messages = [r.getMessage() for r in caplog.records if "kernel unavailable" in r.getMessage()]
    assert len(messages) == 1 and "no compiler" in messages[0]


def _reload_scan_with(monkeypatch, module):
    """Re-import encoder.scan with `mamba_ssm.ops.selective_scan_interface` replaced by `module`."""
    for name in ("mamba_ssm", "mamba_ssm.ops"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "mamba_ssm.ops.selective_scan_interface", module)
    monkeypatch.delitem(sys.modules, "encoder.scan")
    return importlib.import_module("encoder.scan")


def test_cuda_dispatch_contract_with_stand_in_module(monkeypatch):
    calls = []

    def fake_selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                               delta_softplus=False, return_last_state=False):
        calls.append(dict(D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                          return_last_state=return_last_state))
        return "from-mamba"

    stand_in = types.ModuleType("mamba_ssm.ops.selective_scan_interface")
    stand_in.selective_scan_fn = fake_selective_scan_fn
    try:
        mod = _reload_scan_with(monkeypatch, stand_in)
        assert mod._mamba_selective_scan_fn is fake_selective_scan_fn
        impl = mod._pick_impl("cuda")
        assert impl is fake_selective_scan_fn
        assert mod._pick_impl("cpu") is mod.selective_scan_cpu  # CPU tensors never go to mamba-ssm
        # The dispatcher forwards every option by keyword, unchanged.
        x = torch.zeros(1, 2, 3)
        out = impl(x, x, torch.zeros(2, 1), x, x, D="D", z="z", delta_bias="bias", delta_softplus=True,
                   return_last_state=True)
        assert out == "from-mamba"
        assert calls[-1] == dict(D="D", z="z", delta_bias="bias", delta_softplus=True, return_last_state=True)
    finally:
        monkeypatch.undo()
        importlib.reload(scan)


def test_cuda_import_failure_is_guarded(monkeypatch):
    broken = types.ModuleType("mamba_ssm.ops.selective_scan_interface")

    def _raise(name):
        raise ImportError("libcudart.so: cannot open shared object file")

    broken.__getattr__ = _raise
    try:
        mod = _reload_scan_with(monkeypatch, broken)
        assert mod._mamba_selective_scan_fn is None
        assert mod._pick_impl("cuda") is mod.selective_scan_ref
    finally:
        monkeypatch.undo()
        importlib.reload(scan)
