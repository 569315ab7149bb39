"""Selective scan (Mamba's S6 recurrence), three implementations behind one signature.

For channel d and state n, with ``Δ = softplus(delta + delta_bias)`` if asked::

    h_t = exp(Δ_t · A) ⊙ h_{t-1} + Δ_t · B_t · u_t
    y_t = <C_t, h_t> + D · u_t            then   y ⊙ silu(z)

The signature and semantics are those of mamba-ssm's ``selective_scan_fn``:
``u, delta: (b, d, l)``, ``A: (d, n)``, ``B, C: (b, n, l)`` or grouped ``(b, g, n, l)`` (channel
d reads group ``d // (d / g)``) or time-invariant ``(d, n)``; ``D: (d,)``, ``z: (b, d, l)``,
``delta_bias: (d,)``. Returns ``y: (b, d, l)`` and, with ``return_last_state``, ``h_l: (b, d, n)``.

- `selective_scan_ref`: the sequential fp32 loop, the readable definition (parity tests).
- `selective_scan_cpu`: a C++ kernel JIT-built with `torch.utils.cpp_extension` (see
  ``csrc/selective_scan.cpp``), the default on CPU.
- mamba-ssm's CUDA kernel when it imports and the tensors are on CUDA.

`selective_scan` picks one by a single explicit condition and logs a fallback once.

One direction of a Mamba mixer around the scan (causal conv → SiLU → x_proj → dt_proj → scan) has
the same three forms: `selective_ssm_ref` (the parts in sequence), `selective_ssm_cpu` (the same
numbers on the kernel, with a backward that recomputes the conv output and Δ instead of keeping
three (b, e, l) activations, as mamba-ssm's ``mamba_inner_fn``), and the dispatcher `selective_ssm`.

The bidirectional mixer (the block's pre-norm → in_proj → both directions → average → out_proj) is
`bimamba`; a training step on the kernel keeps only the block's input and the scans' tile-start
states for the backward (`_BiMambaCPU`) and recomputes the rest there.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from encoder.native import load_extension

log = logging.getLogger(__name__)

try:  # Optional CUDA extra; it cannot import on machines without CUDA.
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _mamba_selective_scan_fn
except Exception:  # noqa: BLE001 - ImportError, or a CUDA/ABI error raised while importing
    _mamba_selective_scan_fn = None

try:  # Optional CUDA extra, as above.
    from causal_conv1d import causal_conv1d_fn as _cuda_causal_conv1d_fn
except Exception:  # noqa: BLE001
    _cuda_causal_conv1d_fn = None


def _expand_bc(X: torch.Tensor, b: int, d: int, l: int) -> torch.Tensor:
    """B or C in any accepted layout → grouped ``(b, g, n, l)``."""
    if X.dim() == 2:  # time-invariant (d, n): one group per channel
        return X.t().reshape(1, d, 1, X.shape[1]).transpose(2, 3).expand(b, d, X.shape[1], l)
    if X.dim() == 3:  # (b, n, l)
        return X.unsqueeze(1)
    if X.dim() == 4:
        return X
    raise ValueError(f"B/C must be (d, n), (b, n, l) or (b, g, n, l); got shape {tuple(X.shape)}")


def _check(u, delta, A, B, C):
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"u and delta must both be (b, d, l); got {tuple(u.shape)} and {tuple(delta.shape)}")
    b, d, l = u.shape
    if A.dim() != 2 or A.shape[0] != d:
        raise ValueError(f"A must be (d={d}, n); got {tuple(A.shape)}")
    if A.is_complex():
        raise NotImplementedError("complex A is not supported (VideoMAP uses real S4D init)")
    for name, X in (("B", B), ("C", C)):
        g = _expand_bc(X, b, d, l).shape[1]
        if d % g:
            raise ValueError(f"{name} has {g} groups, which does not divide d={d}")


def _prepare_delta(delta, delta_bias, delta_softplus):
    delta = delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)
    return delta


def _finish(y, u, D, z, out_dtype):
    if D is not None:
        y = y + u.float() * D.float()[None, :, None]
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(out_dtype)


def _flip_time(fn, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
    """`fn` run on the time-reversed sequence, its output put back in time order."""
    def flip(X):
        return X if X is None or X.dim() == 2 else X.flip(-1)  # (d, n) B/C have no time axis

    out = fn(flip(u), flip(delta), A, flip(B), flip(C), D=D, z=flip(z), delta_bias=delta_bias,
             delta_softplus=delta_softplus, return_last_state=return_last_state)
    return (out[0].flip(-1), out[1]) if return_last_state else out.flip(-1)


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, *, reverse=False):
    """The definition: a sequential loop over time in fp32.

    u, delta: r(b d l); A: r(d n); B, C: r(d n) | r(b n l) | r(b g n l); D, delta_bias: r(d); z: r(b d l)
    ``reverse``: scan from the last step to the first (the output stays in time order).
    """
    if reverse:
        return _flip_time(selective_scan_ref, u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                          return_last_state)
    _check(u, delta, A, B, C)
    out_dtype = u.dtype
    b, d, l = u.shape
    n = A.shape[1]
    delta = _prepare_delta(delta, delta_bias, delta_softplus)
    Bg, Cg = _expand_bc(B.float(), b, d, l), _expand_bc(C.float(), b, d, l)
    # Each channel reads its group's B/C: one group broadcasts as (b, 1, n, l); several are
    # repeated out to (b, d, n, l).
    Bd = Bg.repeat_interleave(d // Bg.shape[1], dim=1) if Bg.shape[1] not in (1, d) else Bg
    Cd = Cg.repeat_interleave(d // Cg.shape[1], dim=1) if Cg.shape[1] not in (1, d) else Cg
    A = A.float()
    uf = u.float()
    h = uf.new_zeros(b, d, n)
    ys = []
    # unbind once, not index per step: indexing a slice per step makes autograd allocate a full
    # zero gradient for every step, which turns the backward quadratic.
    for u_t, dt_t, B_t, C_t in zip(uf.unbind(2), delta.unbind(2), Bd.unbind(3), Cd.unbind(3)):
        h = torch.exp(dt_t[:, :, None] * A) * h + (dt_t * u_t)[:, :, None] * B_t  # (b, d, n)
        ys.append((h * C_t).sum(-1))  # (b, d)
    y = _finish(torch.stack(ys, dim=2), u, D, z, out_dtype)  # (b, d, l)
    return (y, h) if return_last_state else y


# ---------------------------------------------------------------------------------------------
# Fast CPU path: C++ kernel, JIT-built on first use (about a minute), then cached by torch.

_CPU_EXT = None
_CPU_EXT_ERROR: str | None = None
_LOGGED: set[str] = set()


def _log_once(key: str, msg: str, *args) -> None:
    if key not in _LOGGED:
        _LOGGED.add(key)
        log.warning(msg, *args)


def load_cpu_kernel():
    """Build (first time) and load the C++ scan kernel; returns None if it cannot be built."""
    global _CPU_EXT, _CPU_EXT_ERROR
    if _CPU_EXT is None and _CPU_EXT_ERROR is None:
        _CPU_EXT, _CPU_EXT_ERROR = load_extension(Path(__file__).with_name("csrc") / "selective_scan.cpp",
                                                  "videomap_selective_scan_cpu",
                                                  "the CPU scan kernel (about 40 s)")
    return _CPU_EXT


class _ScanCPU(torch.autograd.Function):
    """The fused kernel: Δ = softplus(delta + delta_bias), the recurrence, D·u and the silu(z) gate
    in one pass, forward and backward. All tensors fp32 in mamba-ssm's logical layouts, any strides
    (transposed and broadcast views are read in place): u, delta, z (b, d, l); A (d, n);
    B, C (b, g, n, l); D, delta_bias (d,). Returns out (b, d, l) and the last state (b, d, n)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus, reverse):
        out, last, states = _CPU_EXT.fwd(u, delta, A, B, C, D, z, delta_bias, softplus, reverse,
                                         any(ctx.needs_input_grad))
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, states)
        ctx.softplus, ctx.reverse = softplus, reverse
        return out, last

    @staticmethod
    def backward(ctx, dout, dlast):
        u, delta, A, B, C, D, z, delta_bias, states = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(u)
        du, ddelta, dA, dB, dC, dD, dz, dbias, _ = _CPU_EXT.bwd(
            u, delta, A, B, C, D, z, delta_bias, ctx.softplus, ctx.reverse, states, dout, dlast, False)
        return du, ddelta, dA, dB, dC, dD, dz, dbias, None, None


def selective_scan_cpu(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, *, reverse=False):
    """The C++ kernel; same signature and results as `selective_scan_ref`. ``reverse`` runs the
    recurrence from the last step to the first without flipping anything in memory."""
    _check(u, delta, A, B, C)
    if load_cpu_kernel() is None:
        raise RuntimeError(f"the CPU selective-scan kernel could not be built: {_CPU_EXT_ERROR}")
    b, d, l = u.shape

    def f32(t):
        return None if t is None else t.float()

    out, last = _ScanCPU.apply(
        u.float(), delta.float(), A.float(),
        _expand_bc(B.float(), b, d, l), _expand_bc(C.float(), b, d, l),  # views, no copies
        f32(D), f32(z), f32(delta_bias), bool(delta_softplus), bool(reverse),
    )
    out = out.to(u.dtype)
    return (out, last) if return_last_state else out


# ---------------------------------------------------------------------------------------------
# Depthwise causal conv1d (the mixer's short conv before the scan)


def causal_conv1d_ref(x, weight, bias=None, activation=None, *, reverse=False):
    """x: r(b d l); weight: r(d k); bias: r(d). Output[t] sees inputs t-k+1 … t only (``reverse``:
    t … t+k-1, the causal conv of the time-flipped sequence, flipped back). Padding is the conv's
    own, so no padded copy of x is made (or kept for the backward)."""
    k, l = weight.shape[-1], x.shape[-1]
    if reverse:  # cross-correlation with the flipped kernel over the window starting at t
        y = F.conv1d(x, weight.flip(-1).unsqueeze(1), bias, padding=k - 1, groups=weight.shape[0])[..., k - 1:]
    else:
        y = F.conv1d(x, weight.unsqueeze(1), bias, padding=k - 1, groups=weight.shape[0])[..., :l]
    if activation in ("silu", "swish"):
        y = F.silu(y)
    elif activation is not None:
        raise ValueError(f"activation must be None, 'silu' or 'swish'; got {activation!r}")
    return y


def causal_conv1d(x, weight, bias=None, activation=None, *, reverse=False):
    """causal-conv1d's ``causal_conv1d_fn`` on CUDA when it imports, else the PyTorch conv.
    ``reverse`` (keyword only): the anti-causal conv a backward-direction scan needs."""
    if x.is_cuda and _cuda_causal_conv1d_fn is not None:
        if reverse:
            return _cuda_causal_conv1d_fn(x.flip(-1), weight, bias, activation=activation).flip(-1)
        return _cuda_causal_conv1d_fn(x, weight, bias, activation=activation)
    return causal_conv1d_ref(x, weight, bias, activation, reverse=reverse)


# ---------------------------------------------------------------------------------------------
# One direction of a Mamba mixer, fused: conv → SiLU → x_proj → dt_proj → scan


def weight_times(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A Linear's weight applied along dim 1 of x: (O, I) @ (B, I, L) -> (B, O, L).

    As a batched matmul over a broadcast weight, so x is neither transposed nor copied, and the
    backward keeps x itself (``weight @ x`` would fold x into a (B·L, I) copy and keep that)."""
    return torch.bmm(weight.expand(x.shape[0], -1, -1), x)


def ssm_scan_inputs(x, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, d_state, reverse, conv_fn):
    """The scan's inputs from the direction's input x (b, e, l): u = silu(conv(x)) (b, e, l),
    delta (b, e, l) before dt_proj's bias, and B, C (b, s, l), views of x_proj's output."""
    u = conv_fn(x, conv_weight, conv_bias, activation="silu", reverse=reverse)  # (b, e, l)
    x_dbl = weight_times(x_proj_weight, u)  # (r + 2s, e) @ (b, e, l) -> (b, r + 2s, l)
    dt, B, C = x_dbl.split([dt_proj_weight.shape[1], d_state, d_state], dim=1)  # (b, r, l), (b, s, l) ×2
    delta = weight_times(dt_proj_weight, dt)  # (e, r) @ (b, r, l) -> (b, e, l)
    return u, delta, B, C


def _ssm_composed(scan_fn, conv_fn, x, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, A, D, z,
                  delta_bias, delta_softplus, reverse):
    u, delta, B, C = ssm_scan_inputs(x, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, A.shape[1],
                                      reverse, conv_fn)
    return scan_fn(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                   reverse=reverse)


def selective_ssm_ref(x, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, A, D=None, z=None,
                      delta_bias=None, delta_softplus=True, *, reverse=False):
    """The definition, from the reference parts: every intermediate is an autograd node, so the
    backward keeps the conv output, u, delta (each (b, e, l)) and the scan's own saved tensors.

    x, z: r(b e l); conv_weight: r(e k); conv_bias: r(e); x_proj_weight: r((r + 2s) e);
    dt_proj_weight: r(e r); A: r(e s); D, delta_bias: r(e). Returns y: r(b e l).
    ``reverse``: the backward direction of a bidirectional mixer (anti-causal conv, reversed scan).
    """
    return _ssm_composed(selective_scan_ref, causal_conv1d_ref, x, conv_weight, conv_bias, x_proj_weight,
                         dt_proj_weight, A, D, z, delta_bias, delta_softplus, reverse)


def _check_ssm(x, conv_weight, x_proj_weight, dt_proj_weight, A):
    if x.dim() != 3:
        raise ValueError(f"x must be (b, e, l); got {tuple(x.shape)}")
    e, s, r, k = x.shape[1], A.shape[-1], dt_proj_weight.shape[-1], conv_weight.shape[-1]
    for name, t, shape in (("A", A, (e, s)), ("conv_weight", conv_weight, (e, k)),
                           ("dt_proj_weight", dt_proj_weight, (e, r)), ("x_proj_weight", x_proj_weight, (r + 2 * s, e))):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must be {shape} (e={e}, s={s}, r={r}, k={k}); got {tuple(t.shape)}")


class _SSMCPU(torch.autograd.Function):
    """`selective_ssm_ref` on the C++ kernel, keeping for the backward only what it was given
    (x and z are usually views of the mixer's in_proj output, which is kept anyway) and the
    kernel's tile-start states; the conv output, u, delta, B and C are recomputed in the backward
    (mamba-ssm's ``mamba_inner_fn`` recomputes the conv output and delta the same way,
    ``checkpoint_lvl=1``). The recompute is a conv and two thin matmuls; the scan itself is not
    run again (its backward recomputes the states from the saved tile starts)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx, x, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, A, D, z, delta_bias,
                softplus, reverse, save):
        u, delta, B, C = ssm_scan_inputs(x, conv_weight, conv_bias, x_proj_weight, dt_proj_weight,
                                          A.shape[1], reverse, causal_conv1d_ref)
        out, _, states = _CPU_EXT.fwd(u.float(), delta.float(), A, B.float().unsqueeze(1),
                                      C.float().unsqueeze(1), D, z, delta_bias, softplus, reverse, save)
        ctx.save_for_backward(x, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, A, D, z, delta_bias,
                              states)
        ctx.softplus, ctx.reverse = softplus, reverse
        return out.to(u.dtype)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, dout):
        x, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, A, D, z, delta_bias, states = ctx.saved_tensors
        # Recompute the scan's inputs with a graph back to the tensors that need gradients.
        needs = ctx.needs_input_grad[:5]
        leaves = [t.detach().requires_grad_(n) if t is not None else None
                  for t, n in zip((x, conv_weight, conv_bias, x_proj_weight, dt_proj_weight), needs)]
        with torch.enable_grad():
            u, delta, B, C = ssm_scan_inputs(*leaves, A.shape[1], ctx.reverse, causal_conv1d_ref)
        du, ddelta, dA, dB, dC, dD, dz, dbias, _ = _CPU_EXT.bwd(
            u.detach().float(), delta.detach().float(), A, B.detach().float().unsqueeze(1),
            C.detach().float().unsqueeze(1), D, z, delta_bias, ctx.softplus, ctx.reverse, states,
            dout.float(), None, False)
        grads = [None] * 5
        wanted = [i for i, n in enumerate(needs) if n]
        pairs = [(t, g.to(t.dtype)) for t, g in ((u, du), (delta, ddelta), (B, dB.squeeze(1)), (C, dC.squeeze(1)))
                 if t.requires_grad]
        if wanted and pairs:
            # B and C are views of one x_proj output: their gradients meet there.
            got = torch.autograd.grad([t for t, _ in pairs], [leaves[i] for i in wanted], [g for _, g in pairs],
                                      allow_unused=True)
            for i, g in zip(wanted, got):
                grads[i] = g
        return (*grads, dA, dD, dz, dbias, None, None, None)


def selective_ssm_cpu(x, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, A, D=None, z=None,
                      delta_bias=None, delta_softplus=True, *, reverse=False):
    """`selective_ssm_ref` fused on the C++ kernel (see `_SSMCPU`): the same forward, and a
    backward that keeps no (b, e, l) tensor of its own."""
    if load_cpu_kernel() is None:
        raise RuntimeError(f"the CPU selective-scan kernel could not be built: {_CPU_EXT_ERROR}")
    _check_ssm(x, conv_weight, x_proj_weight, dt_proj_weight, A)
    tensors = (x, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, A, D, z, delta_bias)
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)

    def f32(t):
        return None if t is None else t.float()

    return _SSMCPU.apply(x, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, A.float(), f32(D), f32(z),
                         f32(delta_bias), bool(delta_softplus), bool(reverse), save)


# ---------------------------------------------------------------------------------------------
# The bidirectional mixer: in_proj → both directions → average → out_proj, lean on the kernel


def bimamba_plan(frames: int | None, length: int):
    """The scans of a bidirectional mixer over its in_proj halves x, z (b, e, l), and how their
    outputs make y. Returns ``(scans, combine)``: ``scans`` is a list of ``(select, direction,
    reverse)`` where ``select(t)`` cuts that scan's (b', e, l') input from a (b, e, l) tensor and
    direction 0 is the forward one, 1 the backward one; ``combine(outs)`` → y (b, e, l), the
    average of the two directions. ``frames`` T: the sequence is [cls, frame 1, …, frame T] (equal
    frame lengths) and the backward direction restarts at every frame (the cls token alone), so no
    output sees a later frame. Each ``select`` is a permutation of positions and ``combine`` puts
    them back, so the gradient of a scan's output is ``select(dy) / 2``."""
    forward = (lambda t: t, 0, False)
    if frames is None:
        return [forward, (lambda t: t, 1, True)], lambda outs: 0.5 * (outs[0] + outs[1])
    n = (length - 1) // frames

    def per_frame(t: torch.Tensor) -> torch.Tensor:  # (b, e, 1 + T·n) → (b·T, e, n)
        b, e = t.shape[:2]
        return t[..., 1:].reshape(b, e, frames, n).transpose(1, 2).reshape(b * frames, e, n)

    def combine(outs: list[torch.Tensor]) -> torch.Tensor:
        bt, e = outs[2].shape[:2]
        back = outs[2].reshape(bt // frames, frames, e, n).transpose(1, 2).reshape(bt // frames, e, frames * n)
        return 0.5 * (outs[0] + torch.cat([outs[1], back], dim=-1))

    return [forward, (lambda t: t[..., :1], 1, True), (per_frame, 1, True)], combine


def _bimamba_xz(norm, h, norm_weight, in_proj_weight):
    """norm → in_proj: (b, l, D) → xz (b, l, 2e)."""
    return F.linear(h if norm is None else norm(h, norm_weight), in_proj_weight)


def _bimamba_scan_inputs(frames, xz, params):
    """Each scan's (u, delta, B, C, z) from xz (b, l, 2e), as `bimamba_plan` cuts them."""
    x, z = xz.transpose(1, 2).chunk(2, dim=1)  # (b, e, l) views
    scans, combine = bimamba_plan(frames, x.shape[-1])
    inputs = []
    for select, d, reverse in scans:
        conv_w, conv_b, x_proj_w, dt_proj_w, A = params[7 * d:7 * d + 5]
        u, delta, B, C = ssm_scan_inputs(select(x), conv_w, conv_b, x_proj_w, dt_proj_w, A.shape[1], reverse,
                                         causal_conv1d_ref)
        inputs.append((u, delta, B, C, select(z)))
    return inputs, scans, combine


class _BiMambaCPU(torch.autograd.Function):
    """`bimamba` on the C++ kernel for a training step, keeping for the backward only the block's
    input h, the kernel's tile-start states (one state per 64 steps) and the weights. The norm, the
    in_proj output x, z (4·D a token), the conv output and Δ are recomputed in the backward (a norm,
    one in_proj matmul and what `_SSMCPU` recomputes anyway), and the gated output y that out_proj
    read (2·D a token) comes back from the scans' backward, which recomputes the states on its way;
    the scans do not run again. ``params``: per direction (forward, backward) conv weight, conv
    bias, x_proj weight, dt_proj weight, A, D, delta_bias, as `SelectiveSSM.parameters_for_scan`
    gives them. Returns out_proj(y) (b, l, D)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx, norm, frames, h, norm_weight, in_proj_weight, out_proj_weight, *params):
        with torch.no_grad():
            xz = _bimamba_xz(norm, h, norm_weight, in_proj_weight)
            inputs, scans, combine = _bimamba_scan_inputs(frames, xz, params)
            outs, states = [], []
            for (u, delta, B, C, z), (_, d, reverse) in zip(inputs, scans):
                A, D, bias = params[7 * d + 4:7 * d + 7]
                out, _, st = _CPU_EXT.fwd(u.float(), delta.float(), A, B.float().unsqueeze(1),
                                          C.float().unsqueeze(1), D, z.float(), bias, True, reverse, True)
                outs.append(out.to(u.dtype))
                states.append(st)
            del inputs, xz
            result = weight_times(out_proj_weight, combine(outs)).transpose(1, 2)  # (b, l, D)
        ctx.norm, ctx.frames = norm, frames
        ctx.save_for_backward(h, norm_weight, in_proj_weight, out_proj_weight, *params, *states)
        return result

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, dresult):
        # One scan at a time, so only one direction's recomputed inputs and gradients are alive at
        # once: each scan's gradient is taken back to xz (accumulated), then once through in_proj and the norm.
        h, norm_weight, in_proj_weight, out_proj_weight, *rest = ctx.saved_tensors
        params, states = rest[:14], rest[14:]  # 7 per direction, then a tile-start state per scan
        needs = ctx.needs_input_grad[2:]  # h, norm weight, in_proj, out_proj, params
        leaves = [t.detach().requires_grad_(n) if t is not None else None
                  for t, n in zip((h, norm_weight, in_proj_weight, None, *params), needs)]
        grads = [None] * len(leaves)
        front = [i for i in range(3) if needs[i]]  # gradients that need d(xz)
        with torch.enable_grad():
            xz = _bimamba_xz(ctx.norm, *leaves[:3])  # (b, l, 2e)
        xz_leaf = xz.detach().requires_grad_(bool(front))
        with torch.enable_grad():
            x, z = xz_leaf.transpose(1, 2).chunk(2, dim=1)  # (b, e, l) views
        scans, _ = bimamba_plan(ctx.frames, x.shape[-1])
        dresult = dresult.transpose(1, 2)  # (b, D, l)
        half_dy = 0.5 * weight_times(out_proj_weight.t().to(dresult.dtype), dresult)  # (b, e, l): each scan's share
        dxz = None

        def add(i, g):
            if g is not None:
                grads[i] = g if grads[i] is None else grads[i] + g

        for (select, d, reverse), st in zip(scans, states):
            conv_w, conv_b, x_proj_w, dt_proj_w, A, D, bias = leaves[4 + 7 * d:4 + 7 * d + 7]
            with torch.enable_grad():
                u, delta, B, C = ssm_scan_inputs(select(x), conv_w, conv_b, x_proj_w, dt_proj_w, A.shape[1], reverse,
                                                 causal_conv1d_ref)
                zi = select(z)
            du, ddelta, dA, dB, dC, dD, dz, dbias, out = _CPU_EXT.bwd(
                u.detach().float(), delta.detach().float(), A.detach(), B.detach().float().unsqueeze(1),
                C.detach().float().unsqueeze(1), D.detach(), zi.detach().float(), bias.detach(), True, reverse, st,
                select(half_dy).float(), None, needs[3])
            if needs[3]:  # out_proj: dW = Σ dresult · yᵀ over positions; y = this scan's out / 2 at its positions
                add(3, 0.5 * torch.einsum("bdl,bel->de", select(dresult).float(), out).to(out_proj_weight.dtype))
            for j, g in ((4, dA), (5, dD), (6, dbias)):  # A, D, delta_bias: from the kernel, not the graph
                if needs[4 + 7 * d + j]:
                    add(4 + 7 * d + j, g)
            pairs = [(t, g) for t, g in ((u, du), (delta, ddelta), (B, dB.squeeze(1)), (C, dC.squeeze(1)), (zi, dz))
                     if t.requires_grad]
            wanted = [i for i in range(4 + 7 * d, 4 + 7 * d + 4) if needs[i]]  # conv, x_proj, dt_proj
            if pairs and (front or wanted):
                got = list(torch.autograd.grad([t for t, _ in pairs], [xz_leaf] * bool(front) + [leaves[i] for i in wanted],
                                               [g.to(t.dtype) for t, g in pairs], allow_unused=True))
                if front and got[0] is not None:
                    dxz = got[0] if dxz is None else dxz + got[0]
                for i, g in zip(wanted, got[bool(front):]):
                    add(i, g)
            del u, delta, B, C, zi, du, ddelta, dz, out, pairs
        if front and dxz is not None:
            got = torch.autograd.grad(xz, [leaves[i] for i in front], dxz, allow_unused=True)
            for i, g in zip(front, got):
                add(i, g)
        return (None, None, *grads)


def bimamba(h, in_proj_weight, out_proj_weight, forward_params, backward_params, *, norm=None, norm_weight=None,
            frames: int | None = None, lean: bool = True):
    """The bidirectional Mamba mixer: x, z = in_proj(norm(h)); y = the average of the forward and
    the backward direction (`selective_ssm` each, gated by silu(z)), cut as `bimamba_plan` says;
    returns out_proj(y). h: (b, l, D) → (b, l, D). ``*_params``: each direction's (conv weight
    (e, k), conv bias, x_proj weight, dt_proj weight, A, D, delta_bias); ``norm(h, norm_weight)``:
    the block's pre-norm, applied here (None: h is normalised already). A training step on the CPU
    kernel runs `_BiMambaCPU`, which keeps only h and the scans' tile-start states for the backward
    (gradients equal to the parts' up to float rounding); otherwise, or with ``lean=False``, the
    parts run in sequence."""
    params = (*forward_params, *backward_params)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in
                                                 (h, in_proj_weight, out_proj_weight, norm_weight, *params))
    if lean and needs_grad and _pick_impl(h.device.type) is selective_scan_cpu:
        return _BiMambaCPU.apply(norm, frames, h, norm_weight, in_proj_weight, out_proj_weight, *params)
    x, z = _bimamba_xz(norm, h, norm_weight, in_proj_weight).transpose(1, 2).chunk(2, dim=1)  # (b, e, l) views
    scans, combine = bimamba_plan(frames, x.shape[-1])
    outs = []
    for select, d, reverse in scans:
        p = params[7 * d:7 * d + 7]
        outs.append(selective_ssm(select(x), *p[:6], z=select(z), delta_bias=p[6], reverse=reverse))
    # out_proj as W @ y keeps y in its layout (a Linear on y.transpose would copy it).
    return weight_times(out_proj_weight, combine(outs)).transpose(1, 2)  # (b, l, D)


# ---------------------------------------------------------------------------------------------
# Dispatch


def _pick_impl(device_type: str):
    """The one condition that picks an implementation for tensors on `device_type`."""
    if device_type == "cuda" and _mamba_selective_scan_fn is not None:
        return _mamba_selective_scan_fn
    if device_type == "cpu":
        if load_cpu_kernel() is not None:
            return selective_scan_cpu
        _log_once("cpu", "selective_scan: C++ CPU kernel unavailable (%s); using the slow reference",
                  _CPU_EXT_ERROR)
        return selective_scan_ref
    _log_once(device_type, "selective_scan: no fast kernel for %s tensors (mamba-ssm %s); using the "
              "slow reference", device_type,
              "not importable" if _mamba_selective_scan_fn is None else "is CUDA-only")
    return selective_scan_ref


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, *, reverse=False):
    """Dispatcher with mamba-ssm's ``selective_scan_fn`` signature (see module docstring), plus
    ``reverse`` (keyword only): scan from the last step to the first, output in time order. The
    CPU kernel does it in place; mamba-ssm gets flipped copies."""
    impl = _pick_impl(u.device.type)
    if reverse and impl is selective_scan_cpu:
        return impl(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                    return_last_state=return_last_state, reverse=True)
    if reverse:
        return _flip_time(impl, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    return impl(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                return_last_state=return_last_state)


def selective_ssm(x, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, A, D=None, z=None,
                  delta_bias=None, delta_softplus=True, *, reverse=False):
    """One direction of a Mamba mixer: y = scan(u = silu(conv(x)), Δ = dt_proj(x_proj(u)_dt),
    B, C = x_proj(u)_B,C) gated by silu(z); shapes as `selective_ssm_ref`. On the CPU kernel the
    fused `selective_ssm_cpu` (same results, a backward that recomputes the conv output and Δ
    instead of keeping them); elsewhere the parts in sequence (`causal_conv1d`, `selective_scan`)."""
    if _pick_impl(x.device.type) is selective_scan_cpu:
        return selective_ssm_cpu(x, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, A, D=D, z=z,
                                 delta_bias=delta_bias, delta_softplus=delta_softplus, reverse=reverse)
    return _ssm_composed(selective_scan, causal_conv1d, x, conv_weight, conv_bias, x_proj_weight,
                         dt_proj_weight, A, D, z, delta_bias, delta_softplus, reverse)
