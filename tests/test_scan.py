"""Selective scan: the C++ CPU kernel against the sequential reference, and the dispatch contract."""

import importlib
import logging
import subprocess
import sys
import types
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from encoder import native, scan
from encoder.layers import rms_norm
from encoder.scan import (bimamba, selective_scan, selective_scan_cpu, selective_scan_ref, selective_ssm, selective_ssm_cpu,
                          selective_ssm_ref)

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


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("bc", ["shared", "grouped", "invariant"])
@pytest.mark.parametrize("options", OPTION_SETS, ids=lambda o: "+".join(o) or "plain")
@pytest.mark.parametrize("shape", [(2, 24, 4, 37), (1, 40, 16, 130)], ids=["d24", "d40-l130"])
def test_cpu_kernel_matches_reference(bc, options, shape, reverse):
    # d=24 and d=40 are not multiples of the kernel's 16-lane blocks; l=130 spans three 64-step
    # recompute chunks of the backward, whose states come from the tile starts the forward kept.
    inputs = make(*shape, bc=bc)
    y_ref, last_ref, g_ref = run(partial(selective_scan_ref, reverse=reverse), inputs, options)
    y, last, g = run(partial(selective_scan_cpu, reverse=reverse), inputs, options)
    torch.testing.assert_close(y, y_ref, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(last, last_ref, rtol=RTOL, atol=ATOL)
    assert g.keys() == g_ref.keys()
    for k in g_ref:
        diff = (g[k] - g_ref[k]).abs().max().item()
        print(f"{bc} {options} reverse={reverse} grad {k}: max diff {diff:.2e}")
        torch.testing.assert_close(g[k], g_ref[k], rtol=RTOL, atol=ATOL, msg=f"grad of {k}")


def saved_bytes(fn):
    """Bytes of the tensors autograd keeps for the backward of `fn()`, by storage, leaving out
    storages that `fn` was given (the caller keeps those anyway); and the output."""
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return kept, out


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_cpu_kernel_backward_gives_back_the_forward_output_on_request(reverse):
    # The lean mixer does not keep out_proj's input: the scans' backward recomputes the states and
    # returns the forward's (gated) output on the way.
    x = make(2, 40, 16, 130)
    kernel = scan.load_cpu_kernel()
    args = (x["u"], x["delta"], x["A"], x["B"].unsqueeze(1), x["C"].unsqueeze(1), x["D"], x["z"], x["delta_bias"],
            True, reverse)
    out, _, states = kernel.fwd(*args, True)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    grads = kernel.bwd(*args, states, dout, None, True)
    torch.testing.assert_close(grads[8], out, rtol=1e-6, atol=1e-6)
    assert kernel.bwd(*args, states, dout, None, False)[8] is None
    for a, b in zip(grads[:8], kernel.bwd(*args, states, dout, None, False)[:8]):  # the gradients do not change
        assert (a is None and b is None) or torch.equal(a, b)


def test_cpu_kernel_keeps_tile_start_states_not_every_state():
    # The backward recomputes the states tile by tile (as mamba-ssm's CUDA kernel does in SRAM):
    # besides its inputs the forward keeps one (n,)-state per channel every 64 steps, not the
    # (b, d, n, l) tensor the reference's loop keeps.
    b, d, n, l = 1, 64, 16, 1024
    inputs = {k: v.requires_grad_(True) for k, v in make(b, d, n, l).items()}
    given = {v.untyped_storage().data_ptr() for v in inputs.values()}
    kw = {k: inputs[k] for k in ("D", "z", "delta_bias")}
    kept, _ = saved_bytes(lambda: selective_scan_cpu(inputs["u"], inputs["delta"], inputs["A"], inputs["B"],
                                                     inputs["C"], delta_softplus=True, **kw))
    own = sum(v for k, v in kept.items() if k not in given)
    assert own == 4 * b * d * n * (l // 64)  # the tile-start states: 1/64 of (b, d, n, l)
    kept_ref, _ = saved_bytes(lambda: selective_scan_ref(inputs["u"], inputs["delta"], inputs["A"], inputs["B"],
                                                         inputs["C"], delta_softplus=True, **kw))
    assert sum(v for k, v in kept_ref.items() if k not in given) > 4 * b * d * n * l


# ---------------------------------------------------------------------------------------------
# One direction of a Mamba mixer, fused (selective_ssm)


def make_ssm(b=2, e=40, l=130, s=16, r=5, k=4, seed=0):
    """A mixer's in_proj output xz (b, l, 2e) and one direction's parameters."""
    g = torch.Generator().manual_seed(seed)
    params = dict(conv_weight=torch.randn(e, k, generator=g) * 0.3, conv_bias=torch.randn(e, generator=g) * 0.1,
                  x_proj_weight=torch.randn(r + 2 * s, e, generator=g) * 0.2,
                  dt_proj_weight=torch.randn(e, r, generator=g) * 0.3, A=-torch.rand(e, s, generator=g) - 0.1,
                  D=torch.randn(e, generator=g), delta_bias=torch.randn(e, generator=g) * 0.5)
    return torch.randn(b, l, 2 * e, generator=g), params


def run_ssm(fn, xz, params, *, reverse, gate=True, softplus=True, use_D=True):
    """fn on x, z = the two halves of xz, as (b, e, l) views (as the mixer passes them);
    returns y and the gradients of a random projection of y."""
    leaves = {"xz": xz.clone().requires_grad_(True), **{k: v.clone().requires_grad_(True) for k, v in params.items()}}
    x, z = leaves["xz"].transpose(1, 2).chunk(2, dim=1)  # (b, e, l) views
    kw = {k: leaves[k] for k in params if k not in ("D",)}
    y = fn(x, **kw, D=leaves["D"] if use_D else None, z=z if gate else None, delta_softplus=softplus,
           reverse=reverse)
    (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
    return y.detach(), {k: v.grad for k, v in leaves.items() if v.grad is not None}


SSM_CASES = [dict(reverse=False), dict(reverse=True), dict(reverse=True, gate=False),
             dict(reverse=False, gate=False, use_D=False)]


@pytest.mark.parametrize("case", SSM_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_fused_ssm_matches_reference_and_the_unfused_kernel_path(case):
    xz, params = make_ssm()
    y_ref, g_ref = run_ssm(selective_ssm_ref, xz, params, **case)
    y, g = run_ssm(selective_ssm_cpu, xz, params, **case)
    torch.testing.assert_close(y, y_ref, rtol=RTOL, atol=ATOL)
    assert g.keys() == g_ref.keys()
    for k in g_ref:
        print(f"{case} grad {k}: max diff {(g[k] - g_ref[k]).abs().max().item():.2e}")
        torch.testing.assert_close(g[k], g_ref[k], rtol=RTOL, atol=ATOL, msg=f"grad of {k}")
    # The same ops as the parts run one after another on the kernel (the mixer's old path), so the
    # same numbers to the bit: fusing changes what is kept, not what is computed.
    unfused = partial(scan._ssm_composed, selective_scan_cpu, scan.causal_conv1d_ref)
    y_parts, g_parts = run_ssm(lambda x, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, A, D, z, delta_bias,
                               delta_softplus, reverse: unfused(x, conv_weight, conv_bias, x_proj_weight,
                                                                dt_proj_weight, A, D, z, delta_bias,
                                                                delta_softplus, reverse), xz, params, **case)
    assert torch.equal(y, y_parts)
    for k in g_parts:
        assert torch.equal(g[k], g_parts[k]), k


def test_fused_ssm_keeps_no_activation_of_its_own():
    # The unfused direction keeps the conv output, u and delta, each (b, e, l); the fused one keeps
    # only what it was given (x, z: views of xz) and the kernel's tile-start states.
    xz, params = make_ssm(b=1, e=64, l=1024)
    leaves = {"xz": xz.requires_grad_(True), **{k: v.requires_grad_(True) for k, v in params.items()}}
    given = {v.untyped_storage().data_ptr() for v in leaves.values()}

    def call(fn):
        x, z = leaves["xz"].transpose(1, 2).chunk(2, dim=1)
        return lambda: fn(x, **{k: v for k, v in params.items()}, z=z, reverse=True)

    kept, _ = saved_bytes(call(selective_ssm_cpu))
    own = sum(v for k, v in kept.items() if k not in given)
    e, l, s = 64, 1024, 16
    assert own <= 4 * e * s * (l // 64) + 4 * e * s  # tile-start states (+ A as given to the kernel)
    kept_parts, _ = saved_bytes(call(partial(scan._ssm_composed, selective_scan_cpu, scan.causal_conv1d_ref,
                                             delta_softplus=True)))
    assert sum(v for k, v in kept_parts.items() if k not in given) >= 3 * 4 * e * l


def test_fused_ssm_without_grad_and_on_partial_grads():
    xz, params = make_ssm(b=1, l=70)
    x, z = xz.transpose(1, 2).chunk(2, dim=1)
    with torch.no_grad():
        y = selective_ssm_cpu(x, **params, z=z)
    torch.testing.assert_close(y, selective_ssm_ref(x, **params, z=z), rtol=RTOL, atol=ATOL)
    # Only dt_proj's weight trains: u, B and C do not depend on it and must not break the backward.
    w = params["dt_proj_weight"].clone().requires_grad_(True)
    kw = {**params, "dt_proj_weight": w}
    selective_ssm_cpu(x, **kw, z=z).sum().backward()
    w_ref = params["dt_proj_weight"].clone().requires_grad_(True)
    selective_ssm_ref(x, **{**params, "dt_proj_weight": w_ref}, z=z).sum().backward()
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------------------------------
# The bidirectional mixer's core (bimamba): norm → in_proj → both directions, lean backward


def make_bimamba(b=2, dim=24, frames=3, n=10, seed=0):
    """A block input h (b, 1 + frames·n, dim), the norm weight, in_proj and both directions' parameters."""
    g = torch.Generator().manual_seed(seed)
    e = 2 * dim
    xz, fwd = make_ssm(b=1, e=e, l=4, seed=seed)
    _, bwd = make_ssm(b=1, e=e, l=4, seed=seed + 1)
    order = ("conv_weight", "conv_bias", "x_proj_weight", "dt_proj_weight", "A", "D", "delta_bias")
    return dict(h=torch.randn(b, 1 + frames * n, dim, generator=g), norm_weight=1 + 0.1 * torch.randn(dim, generator=g),
                in_proj=torch.randn(2 * e, dim, generator=g) * 0.2, out_proj=torch.randn(dim, e, generator=g) * 0.2), \
        [fwd[k] for k in order] + [bwd[k] for k in order]


def bimamba_reference(h, norm_weight, in_proj, out_proj, P, frames):
    """The mixer written out from the reference parts, the backward direction restarted per frame by hand."""
    x, z = (rms_norm(h, norm_weight) @ in_proj.T).transpose(1, 2).chunk(2, dim=1)
    fwd, bwd = P[:7], P[7:]
    y_fwd = selective_ssm_ref(x, *fwd[:6], z=z, delta_bias=fwd[6])
    if frames is None:
        y_bwd = selective_ssm_ref(x, *bwd[:6], z=z, delta_bias=bwd[6], reverse=True)
    else:
        n = (x.shape[-1] - 1) // frames
        cuts = [slice(0, 1)] + [slice(1 + t * n, 1 + (t + 1) * n) for t in range(frames)]
        y_bwd = torch.cat([selective_ssm_ref(x[..., c], *bwd[:6], z=z[..., c], delta_bias=bwd[6], reverse=True)
                           for c in cuts], dim=-1)
    return (0.5 * (y_fwd + y_bwd)).transpose(1, 2) @ out_proj.T


@pytest.mark.parametrize("frames", [None, 3], ids=["whole", "per-frame"])
def test_lean_mixer_matches_the_reference_forward_and_backward(frames):
    # A training step on the kernel runs bimamba's lean autograd function (the backward recomputes
    # the norm, in_proj, conv and Δ); the outputs and every gradient must be the reference's.
    tensors, P = make_bimamba()
    results = []
    for lean in (False, True):
        leaves = [t.clone().requires_grad_(True)
                  for t in (tensors["h"], tensors["norm_weight"], tensors["in_proj"], tensors["out_proj"], *P)]
        h, w, W, O, *p = leaves
        y = (bimamba(h, W, O, p[:7], p[7:], norm=rms_norm, norm_weight=w, frames=frames) if lean
             else bimamba_reference(h, w, W, O, p, frames))
        if lean:
            assert y.grad_fn.name().startswith("_BiMambaCPU")  # the lean path ran, not the parts
        (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
        results.append((y.detach(), [t.grad for t in leaves]))
    (y_ref, g_ref), (y, g) = results
    torch.testing.assert_close(y, y_ref, rtol=RTOL, atol=ATOL)
    for i, (a, b) in enumerate(zip(g, g_ref)):
        assert a is not None and b is not None, i
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL, msg=f"grad {i}")
    with torch.no_grad():  # inference runs the parts on the kernel: the same numbers
        y_inf = bimamba(tensors["h"], tensors["in_proj"], tensors["out_proj"], P[:7], P[7:], norm=rms_norm,
                        norm_weight=tensors["norm_weight"], frames=frames)
    torch.testing.assert_close(y_inf, y_ref, rtol=RTOL, atol=ATOL)


def test_lean_mixer_keeps_only_the_block_input_and_tile_start_states():
    # The fused directions alone keep the in_proj output x, z (2·e a token), the normalised input
    # for in_proj and out_proj's input y (e a token); the lean mixer keeps none of it: the input h
    # and one state per 64 steps per scan.
    dim, frames, n = 32, 4, 255
    tensors, P = make_bimamba(b=1, dim=dim, frames=frames, n=n)
    leaves = [t.requires_grad_(True)
              for t in (tensors["h"], tensors["norm_weight"], tensors["in_proj"], tensors["out_proj"], *P)]
    given = {t.untyped_storage().data_ptr() for t in leaves}
    h, w, W, O, *p = leaves
    kept, _ = saved_bytes(lambda: bimamba(h, W, O, p[:7], p[7:], norm=rms_norm, norm_weight=w))
    own = sum(v for k, v in kept.items() if k not in given)
    e, s, l = 2 * dim, 16, 1 + frames * n
    assert own <= 2 * 4 * e * s * (l // 64 + 1) + 2 * 4 * e * s  # two scans' tile-start states (+ A, D as cast)

    def parts():
        x, z = F.linear(rms_norm(h, w), W).transpose(1, 2).chunk(2, dim=1)
        y = 0.5 * (selective_ssm_cpu(x, *p[:6], z=z, delta_bias=p[6])
                   + selective_ssm_cpu(x, *p[7:13], z=z, delta_bias=p[13], reverse=True))
        return scan.weight_times(O, y)
    kept_parts, _ = saved_bytes(parts)
    assert sum(v for k, v in kept_parts.items() if k not in given) >= 4 * (3 * e + dim) * l


def test_lean_mixer_with_only_some_parameters_trained():
    # A frozen input (the first block of a frozen stem) and only in_proj and the backward direction's
    # dt_proj trained: the gradients that are asked for match, the others are not computed.
    tensors, P = make_bimamba(b=1)
    grads = []
    for lean in (False, True):
        W = tensors["in_proj"].clone().requires_grad_(True)
        O = tensors["out_proj"].clone()
        p = [t.clone() for t in P]
        p[10].requires_grad_(True)  # backward direction's dt_proj weight
        y = (bimamba(tensors["h"], W, O, p[:7], p[7:], norm=rms_norm, norm_weight=tensors["norm_weight"], frames=3)
             if lean else bimamba_reference(tensors["h"], tensors["norm_weight"], W, O, p, 3))
        y.square().sum().backward()
        grads.append((W.grad, p[10].grad, [t.grad for i, t in enumerate(p) if i != 10] + [O.grad]))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=RTOL, atol=ATOL)
    assert all(g is None for g in grads[1][2])


def test_fused_ssm_dispatch_and_shape_errors():
    xz, params = make_ssm(b=1, l=20)
    x, z = xz.transpose(1, 2).chunk(2, dim=1)
    torch.testing.assert_close(selective_ssm(x, **params, z=z), selective_ssm_cpu(x, **params, z=z))
    with pytest.raises(ValueError, match="x_proj_weight must be"):
        selective_ssm_cpu(x, **{**params, "x_proj_weight": params["x_proj_weight"][:-1]})
    with pytest.raises(ValueError, match="A must be"):
        selective_ssm_cpu(x, **{**params, "A": params["A"][:3]})


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


def test_a_kernel_that_cannot_be_built_is_logged_once(monkeypatch, caplog, tmp_path):
    """`encoder.native.load_kernel` (the resize and packed-weight kernels): None, and one warning per
    kernel and reason saying what runs instead."""
    monkeypatch.setattr(native, "load_extension", lambda *a: (None, "no compiler"))
    monkeypatch.setattr(native, "_WARNED", set())
    with caplog.at_level(logging.WARNING, logger="encoder.native"):
        for _ in range(2):
            assert native.load_kernel(tmp_path / "k.cpp", "k", "k", "k unavailable ({why}); the reference runs") is None
    messages = [r.getMessage() for r in caplog.records if "unavailable" in r.getMessage()]
    assert messages == ["k unavailable (no compiler); the reference runs"]


_POOL_SCRIPT = """
import os, time, torch
from encoder.native import release_thread_pool
tasks = lambda: len(os.listdir("/proc/self/task"))
torch.set_num_threads(2)
x = torch.randn(1 << 22)
x.exp()  # a parallel region: this thread's pool of OpenMP workers starts
with_pool = tasks()
release_thread_pool()
deadline = time.monotonic() + 30
while tasks() >= with_pool and time.monotonic() < deadline:
    time.sleep(0.05)
released = tasks()
x.exp()
print(with_pool, released, tasks())
"""


@pytest.mark.skipif(native._GOMP is None, reason="torch's OpenMP runtime here is not libgomp")
def test_release_thread_pool_lets_the_callers_openmp_workers_exit():
    """A chat answer's thread computes with OpenMP workers of its own; the caller's pool must go
    first (`encoder.native.release_thread_pool`). Its workers exit, and its next parallel region
    starts them again. A fresh process: the test runner's own threads keep pools of their own."""
    run = subprocess.run([sys.executable, "-c", _POOL_SCRIPT], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    with_pool, released, again = map(int, run.stdout.split())
    assert released < with_pool and again == with_pool


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
