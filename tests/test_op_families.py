"""The shared op templates (``tests/op_templates.py``: opcheck, reference parity with gradients,
``torch.compile(fullgraph=True)``) over every kernel family and backend."""

from __future__ import annotations

import pytest
import torch

import lora_kernels as lk
from lora_kernels import reference as R
from lora_kernels.backends.triton import HAS_TRITON
from tests.op_templates import (
    OpCase,
    OpFamily,
    check_compile_fullgraph,
    check_opcheck,
    check_reference_parity,
)

BACKENDS = ("torch",) + (("triton",) if HAS_TRITON else ())
OPS = torch.ops.lora_kernels
M, K, N, R_ = 7, 13, 11, 3  # odd on purpose


def _leaf(*shape, dtype=torch.float32, grad=True, scale=1.0):
    return (torch.randn(*shape, dtype=dtype) * scale).requires_grad_(grad)


def _detached(args: tuple) -> tuple:
    return tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)


def lora_linear_case(backend: str, dtype: torch.dtype) -> OpCase:
    x, w, b = _leaf(M, K, dtype=dtype), _leaf(N, K, dtype=dtype, grad=False), _leaf(N, dtype=dtype)
    a, bb = _leaf(R_, K, dtype=dtype), _leaf(N, R_, dtype=dtype)
    scale = 0.75

    def entry(x, w, b, a, bb):
        return lk.lora_linear(x, w, b, a, bb, scale, backend=backend)

    def reference(x, w, b, a, bb):
        return R.lora_linear(x, w, b, a, bb, scale)

    def op_calls():
        fwd = (x, w, b, a, bb, scale, None, backend)
        _, s = OPS.lora_linear_fwd(*_detached(fwd))
        dy = torch.randn(M, N, dtype=dtype)
        bwd = (dy, *_detached((x, w, a, bb)), s, scale, None, True, True, True, backend)
        return [(OPS.lora_linear_fwd, fwd), (OPS.lora_linear_bwd, bwd)]

    return OpCase(entry, (x, w, b, a, bb), reference, op_calls, ("x", "w", "bias", "A", "B"))


def lora_multi_case(backend: str, dtype: torch.dtype) -> OpCase:
    adapters = 3
    x, w, b = _leaf(M, K, dtype=dtype), _leaf(N, K, dtype=dtype, grad=False), _leaf(N, dtype=dtype)
    a, bb = _leaf(adapters, R_, K, dtype=dtype), _leaf(adapters, N, R_, dtype=dtype)
    scales = torch.tensor([0.5, 1.25, 2.0])
    ids = torch.tensor([0, 2, -1, 1, 2, 0, -1], dtype=torch.int32)

    def entry(x, w, b, a, bb):
        return lk.lora_linear_multi(x, w, b, a, bb, scales, ids, backend=backend)

    def reference(x, w, b, a, bb):
        return R.lora_linear_multi(x, w, b, a, bb, scales.to(x.dtype), ids)

    def op_calls():
        fwd = (x, w, b, a, bb, scales, ids, None, backend)
        _, s = OPS.lora_linear_multi_fwd(*_detached(fwd))
        dy = torch.randn(M, N, dtype=dtype)
        bwd = (dy, *_detached((x, w, a, bb)), scales, ids, s, None, True, True, True, backend)
        return [(OPS.lora_linear_multi_fwd, fwd), (OPS.lora_linear_multi_bwd, bwd)]

    return OpCase(entry, (x, w, b, a, bb), reference, op_calls, ("x", "w", "bias", "A", "B"))


def lora_embedding_case(backend: str, dtype: torch.dtype) -> OpCase:
    vocab = 17
    ids = torch.tensor([3, 0, 16, 3, 9, 5, 11])
    w = _leaf(vocab, N, dtype=dtype, grad=False)
    a, bb = _leaf(R_, vocab, dtype=dtype), _leaf(N, R_, dtype=dtype)
    scale = 1.5

    def entry(w, a, bb):
        return lk.lora_embedding(ids, w, a, bb, scale, backend=backend)

    def reference(w, a, bb):
        return R.lora_embedding(ids, w, a, bb, scale)

    def op_calls():
        fwd = (ids, w, a[None], bb[None], None, scale, None, -1, backend)
        _, s = OPS.lora_embedding_fwd(*_detached(fwd))
        dy = torch.randn(ids.numel(), N, dtype=dtype)
        a2, b2 = a.detach()[None], bb.detach()[None]
        bwd = (dy, ids, w, a2, b2, None, scale, None, s, -1, True, True, backend)
        # a mixed batch: the scales travel as a tensor, one adapter id per row (-1: base only)
        a3 = torch.cat([a2, -a2]).requires_grad_()
        b3 = torch.cat([b2, 2 * b2]).requires_grad_()
        scales = torch.tensor([scale, -0.75])
        rows = torch.tensor([1, 0, -1, 1, 0, 1, 0], dtype=torch.int32)
        fwd_m = (ids, w.detach(), a3, b3, scales, 0.0, rows, 5, backend)
        _, s_m = OPS.lora_embedding_fwd(*_detached(fwd_m))
        a3d, b3d = a3.detach(), b3.detach()
        bwd_m = (dy, ids, w.detach(), a3d, b3d, scales, 0.0, rows, s_m, 5, True, True, backend)
        return [
            (OPS.lora_embedding_fwd, fwd),
            (OPS.lora_embedding_bwd, bwd),
            (OPS.lora_embedding_fwd, fwd_m),
            (OPS.lora_embedding_bwd, bwd_m),
        ]

    return OpCase(entry, (w, a, bb), reference, op_calls, ("weight", "A", "B"))


def dora_linear_case(backend: str, dtype: torch.dtype) -> OpCase:
    x, w, b = _leaf(M, K, dtype=dtype), _leaf(N, K, dtype=dtype, grad=False), _leaf(N, dtype=dtype)
    a, bb = _leaf(R_, K, dtype=dtype), _leaf(N, R_, dtype=dtype)
    magnitude = (torch.rand(N, dtype=dtype) + 0.5).requires_grad_(True)
    scale = 0.5

    def entry(x, w, b, a, bb, m):
        return lk.dora_linear(x, w, b, a, bb, m, scale, backend=backend)

    def reference(x, w, b, a, bb, m):
        # R.dora_linear's output, the norm held constant in the backward (PEFT's rule, and the
        # kernels': R.dora_linear_backward)
        g = m / R.dora_weight_norm(w, a, bb, scale).detach().to(m.dtype)
        return g * R.lora_linear(x, w, None, a, bb, scale) + b

    def op_calls():
        w_sq = OPS.dora_weight_sq_norm(w, backend)
        norm = OPS.dora_weight_norm(w, a.detach(), bb.detach(), scale, w_sq, backend)
        fwd = (x, w, b, a, bb, magnitude, norm, scale, None, backend)
        y, lin, s = OPS.dora_linear_fwd(*_detached(fwd))
        bwd = (torch.randn_like(y), *_detached((x, w, a, bb, magnitude)), norm, s, lin, scale,
               None, True, True, True, True, backend)  # fmt: skip
        return [
            (OPS.dora_weight_sq_norm, (w, backend)),
            (OPS.dora_weight_norm, (w, a.detach(), bb.detach(), scale, w_sq, backend)),
            (OPS.dora_linear_fwd, fwd),
            (OPS.dora_linear_bwd, bwd),
        ]

    inputs = (x, w, b, a, bb, magnitude)
    return OpCase(entry, inputs, reference, op_calls, ("x", "w", "bias", "A", "B", "magnitude"))


def moe_lora_case(backend: str, dtype: torch.dtype) -> OpCase:
    t, hidden, inter, experts, k = 7, 13, 5, 4, 2
    x = _leaf(t, hidden, dtype=dtype)
    ids = torch.stack([torch.randperm(experts)[:k] for _ in range(t)])
    weights = (torch.rand(t, k, dtype=dtype) + 0.1).requires_grad_(True)
    w_gu = _leaf(experts, 2 * inter, hidden, dtype=dtype, grad=False, scale=0.3)
    w_d = _leaf(experts, hidden, inter, dtype=dtype, grad=False, scale=0.3)
    a_gu, b_gu = _leaf(experts, R_, hidden, dtype=dtype), _leaf(experts, 2 * inter, R_, dtype=dtype)
    a_d, b_d = _leaf(experts, R_, inter, dtype=dtype), _leaf(experts, hidden, R_, dtype=dtype)
    scale = 0.75

    def entry(x, weights, a_gu, b_gu, a_d, b_d):
        return lk.moe_lora(x, ids, weights, w_gu, w_d, a_gu, b_gu, a_d, b_d, scale,
                           backend=backend)  # fmt: skip

    def reference(x, weights, a_gu, b_gu, a_d, b_d):
        f = [v[None] for v in (a_gu, b_gu, a_d, b_d)]
        scales = torch.tensor([scale], dtype=x.dtype)
        return R.moe_lora(x, ids, weights, w_gu.to(x.dtype), w_d.to(x.dtype), *f, scales)

    def op_calls():
        scales = torch.tensor([scale])
        f = _detached(tuple(v[None] for v in (a_gu, b_gu, a_d, b_d)))
        fwd = (x, ids, weights, w_gu, None, f[0], f[1], w_d, None, f[2], f[3], scales, None,
               "silu", 1.702, 7.0, True, backend)  # fmt: skip
        _, g, s_gu, s_d, o = OPS.moe_lora_fwd(*_detached(fwd))
        bwd = (torch.randn(t, hidden, dtype=dtype), *_detached((x, ids, weights, w_gu)), f[0],
               f[1], w_d, f[2], f[3], scales, None, g, s_gu, s_d, o, "silu", 1.702, 7.0, True,
               True, True, True, backend)  # fmt: skip
        return [(OPS.moe_lora_fwd, fwd), (OPS.moe_lora_bwd, bwd)]

    inputs = (x, weights, a_gu, b_gu, a_d, b_d)
    return OpCase(
        entry, inputs, reference, op_calls, ("x", "weights", "A_gu", "B_gu", "A_d", "B_d")
    )


FAMILIES = [
    OpFamily("lora_linear", lora_linear_case, BACKENDS),
    OpFamily("lora_linear_multi", lora_multi_case, BACKENDS),
    OpFamily("lora_embedding", lora_embedding_case, BACKENDS),
    OpFamily("dora_linear", dora_linear_case, BACKENDS),
    OpFamily("moe_lora", moe_lora_case, BACKENDS),
]
CASES = [(f, b) for f in FAMILIES for b in f.backends]
IDS = [f"{f.name}-{b}" for f, b in CASES]


@pytest.mark.parametrize(("family", "backend"), CASES, ids=IDS)
def test_opcheck(family, backend):
    check_opcheck(family.make(backend, torch.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("family", "backend"), CASES, ids=IDS)
def test_reference_parity(family, backend, dtype):
    check_reference_parity(family.make(backend, dtype))


@pytest.mark.parametrize(("family", "backend"), CASES, ids=IDS)
def test_compile_fullgraph(family, backend):
    check_compile_fullgraph(family.make(backend, torch.float32))
