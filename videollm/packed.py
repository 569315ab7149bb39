"""The LLM's linear layers in the GGUF's own blocks for decoding: the same weights in a fifth of the bytes.

Decoding a token reads every weight of the LLM once for one activation row, so on a CPU its speed
is the speed at which weights stream from memory. The default LLM ships as a GGUF (Q4_1 blocks for
the layers, Q8_0 for the embedding) and is dequantized to fp32 to train and to prefill. `pack_weight`
finds those blocks again from the fp32 weight and keeps them only where they give back every weight
bit for bit, so `PackedLinear` multiplies by exactly the model's weights; a row that is not a block
dequantization (the added ``<video>`` embedding row, weights a full fine-tune changed) stays dense.

`PackedLinear` replaces an ``nn.Linear`` or a peft LoRA ``Linear`` (its adapter kept unmerged as a
rank-r side path, so the weights stay the GGUF's) for inference:

- up to `DECODE_ROWS` rows of input (a decoding step): the C++ kernel ``csrc/packed_linear.cpp``
  on the blocks, LoRA in the same call;
- more rows (prefill, scoring) or no kernel: `F.linear` on the dense weight with the adapter merged
  into it, `PackedLinear.forward_ref`, the reference the kernel is tested against. Merged, a LoRA
  layer's prefill is one GEMM where the side path took two more and a scaled add. The merge is in
  place (the blocks keep the base weights), into a copy for a weight another module shares (tied
  embeddings).

`pack_language_model(llm)` swaps them in; `load_videollm` does it for inference loads.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from encoder import native

BLOCK = 32
Q4_1, Q8_0 = 0, 1  # the kernel's `kind`
DECODE_ROWS = 4  # inputs with more rows than this are a prefill: dense GEMM is faster there
MAX_DENSE_ROWS = 0.01  # keep a layer dense if more than this share of its rows is not in blocks


def load_kernel():
    """The C++ kernel, or None (logged once) if it cannot be built here."""
    return native.load_kernel(Path(__file__).with_name("csrc") / "packed_linear.cpp", "videollm_packed_linear",
                              "the LLM's packed-weight kernel (about 30 s)",
                              "packed-weight kernel unavailable ({why}); decoding uses the dense weights")


@dataclass
class Packed:
    """A weight (N, K) as row-major blocks (N, K/32 · bytes) uint8 of `kind` (Q4_1: 20 bytes a block,
    Q8_0: 34); `dense_rows` are rows whose blocks are zero (they add nothing) and that are computed
    from the dense weight instead."""

    kind: int
    blocks: torch.Tensor
    dense_rows: torch.Tensor


def _fp16(x: torch.Tensor) -> torch.Tensor:
    return x.half().float()


def _half_bytes(x: torch.Tensor) -> torch.Tensor:
    return x.half().contiguous().view(torch.uint8).view(*x.shape, 2)


def pack_weight_ref(weight: torch.Tensor, kind: int) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (N, K) fp32 → (blocks (N, K/32 · bytes) uint8, exact (N,) bool), in PyTorch: the
    reference of the kernel's ``pack``. GGUF's quantizers set m = min, d = (max − min)/15 (Q4_1) and
    d = max|w|/127 (Q8_0), so d and m are read off the dequantized weights; a row is exact when
    d·q (+ m), computed in fp32 as transformers' GGUF loader does, gives back each of its weights.
    Rows that are not exact get all-zero blocks."""
    N, K = weight.shape
    wb = weight.detach().reshape(N, K // BLOCK, BLOCK)  # (N, nb, 32)
    if kind == Q4_1:
        m = wb.amin(-1)  # (N, nb)
        d = _fp16((wb.amax(-1) - m) / 15)
        q = torch.where(d[..., None] > 0, ((wb - m[..., None]) / d[..., None]).round(), torch.zeros_like(wb))
        q = q.clamp(0, 15)
        exact = ((d[..., None] * q + m[..., None]) == wb).all(-1) & (_fp16(m) == m)
        q = q.to(torch.uint8)
        codes = q[..., :16] | (q[..., 16:] << 4)  # (N, nb, 16): byte j holds elements j and j+16
        blocks = torch.cat([_half_bytes(d), _half_bytes(m), codes], -1)  # (N, nb, 20)
    else:
        d = _fp16(wb.abs().amax(-1) / 127)
        q = torch.where(d[..., None] > 0, (wb / d[..., None]).round(), torch.zeros_like(wb)).clamp(-127, 127)
        exact = ((q * d[..., None]) == wb).all(-1)
        blocks = torch.cat([_half_bytes(d), q.to(torch.int8).view(torch.uint8)], -1)  # (N, nb, 34)
    exact = exact.all(-1)
    blocks[~exact] = 0
    return blocks.reshape(N, -1), exact


def pack_weight(weight: torch.Tensor, ext) -> Packed | None:
    """The weight's Q4_1 or Q8_0 blocks (the kernel's ``pack``) if all but `MAX_DENSE_ROWS` of its
    rows are exactly such blocks, else None."""
    if weight.dim() != 2 or weight.dtype != torch.float32 or weight.shape[1] % BLOCK:
        return None
    weight = weight.detach().contiguous()
    for kind in (Q4_1, Q8_0):
        if ext.pack(weight[:256], kind)[1].float().mean() < 1 - MAX_DENSE_ROWS:
            continue  # a sample of rows decides cheaply which format it can be
        blocks, exact = ext.pack(weight, kind)
        if exact.float().mean() >= 1 - MAX_DENSE_ROWS:
            return Packed(kind, blocks, (~exact).nonzero().flatten())
    return None


class PackedLinear(nn.Module):
    """``y = x Wᵀ + b (+ s·(x Aᵀ) Bᵀ)`` with W also held as blocks for decoding (see the module doc).
    weight (N, K) is the dense layer's own tensor, not copied: an adapter is merged into it in place,
    or into a copy if it is `shared` with another module; ext: `load_kernel()`; lora_a (r, K), lora_b (N, r)."""

    def __init__(self, weight: nn.Parameter, bias, packed: Packed, ext, lora_a=None, lora_b=None, scale: float = 1.0,
                 shared: bool = False):
        super().__init__()
        # The blocks' own weights: the kernel adds the adapter as its side path.
        self.register_buffer("dense_weight", weight.detach()[packed.dense_rows].clone(), persistent=False)
        if lora_a is not None:  # the dense path's weight becomes W + s·B·A (as peft merges it)
            if shared:  # another module reads this weight (tied embeddings): merged into a copy
                weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
            # in place otherwise: a copy would double the LLM's dense weights
            weight.data.addmm_(lora_b.detach().float(), lora_a.detach().float(), alpha=float(scale))
        self.weight, self.bias = weight, bias
        self.kind, self.scale = packed.kind, float(scale)
        self.register_buffer("blocks", ext.interleave(packed.blocks, packed.kind), persistent=False)
        self.register_buffer("dense_rows", packed.dense_rows, persistent=False)
        self.register_buffer("lora_a", None if lora_a is None else lora_a.detach().float().contiguous(), persistent=False)
        self.register_buffer("lora_b", None if lora_b is None else lora_b.detach().float().contiguous(), persistent=False)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        # Read once here: a decoding step calls ~200 of these layers, a lookup each would show.
        self.ext = ext
        self.has_dense_rows = len(packed.dense_rows) > 0
        empty = weight.new_empty(0, 0)
        self._lora_a = empty if lora_a is None else self.lora_a
        self._lora_b = empty if lora_b is None else self.lora_b

    def extra_repr(self) -> str:
        kind = {Q4_1: "Q4_1", Q8_0: "Q8_0"}[self.kind]
        lora = f", lora r={self.lora_a.shape[0]}" if self.lora_a is not None else ""
        return f"{self.in_features} → {self.out_features}, {kind}, {len(self.dense_rows)} dense rows{lora}"

    def forward_ref(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)  # the adapter is merged into `weight`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows > DECODE_ROWS or x.dtype != torch.float32 or x.requires_grad:
            return self.forward_ref(x)
        x2 = x.reshape(rows, self.in_features).contiguous()  # (M, K)
        y = self.ext.linear(x2, self.blocks, self.kind, self.out_features, self._lora_a, self._lora_b,
                            self.scale)  # (M, N)
        if self.has_dense_rows:
            y[:, self.dense_rows] += F.linear(x2, self.dense_weight)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)


def _lora_parts(module):
    """(base nn.Linear, A, B, scale) of a peft LoRA Linear with one active, unmerged plain adapter, else None."""
    base = getattr(module, "base_layer", None)
    names = getattr(module, "active_adapters", None)
    if not isinstance(base, nn.Linear) or not names or len(names) != 1 or getattr(module, "merged", False):
        return None
    name = names[0]
    if name not in module.lora_A or getattr(module, "use_dora", {}).get(name, False):
        return None
    return base, module.lora_A[name].weight, module.lora_B[name].weight, module.scaling[name]


def pack_language_model(llm: nn.Module) -> dict:
    """Replace the linear layers (LoRA or not) of `llm` whose weights are GGUF blocks by `PackedLinear`,
    in place, for inference. Returns {"packed": n, "dense": n, "bytes": packed bytes}."""
    stats = {"packed": 0, "dense": 0, "bytes": 0}
    ext = load_kernel()
    if ext is None:
        return stats
    targets = []
    for name, module in llm.named_modules():
        parts = _lora_parts(module)
        if parts is None and type(module) is nn.Linear:
            parts = module, None, None, 1.0
        if parts is not None:
            targets.append((name, parts))
    uses = Counter(id(p) for _, p in llm.named_parameters(remove_duplicate=False))  # tied weights count twice
    skip = set()
    for name, (base, lora_a, lora_b, scale) in targets:
        if any(name.startswith(s + ".") for s in skip):
            continue  # the base layer inside a LoRA wrapper already replaced
        if lora_a is not None:
            skip.add(name)
        packed = pack_weight(base.weight, ext)
        if packed is None:
            stats["dense"] += 1
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = llm.get_submodule(parent_name) if parent_name else llm
        setattr(parent, attr, PackedLinear(base.weight, base.bias, packed, ext, lora_a, lora_b, scale,
                                           shared=uses[id(base.weight)] > 1))
        stats["packed"] += 1
        stats["bytes"] += packed.blocks.numel()
    return stats
