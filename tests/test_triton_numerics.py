"""Numerics and memory traffic the multi-adapter and single-adapter Triton kernels promise.

* A large scale does not overflow fp16: ``scale * (S @ B.T)`` is scaled after the dot, as PEFT
  scales after lora_B, never ``S * scale`` rounded to 16 bits first.
* The grouped strategy visits only the adapters that have rows in a tile: adapters between them
  (slot ids are sparse in a serving stack) are neither loaded nor computed.
* A row's result does not depend on the batch it is in: gather (small batches) and grouped
  (large ones) round the same operands to the same dtype, so they differ only in the order of
  their fp32 sums; the bound is stated and checked.

Runs under the Triton interpreter on CPU tensors (conftest.py); loads are counted there.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import lora_kernels as lk
from lora_kernels.backends.triton import HAS_TRITON, interpreting
from tests.tolerances import assert_close_to_ref

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="needs triton")

if HAS_TRITON:
    from lora_kernels.backends.triton import lora_multi as _triton_multi

DEVICE = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"


# --------------------------------------------------------------------------------------------
# Large scales
# --------------------------------------------------------------------------------------------

BIG_SCALE = 300.0


def _big_s_inputs(m, k, n, r, num_adapters=None):
    """x @ lora_a.T about 300 per element (300 * 300 = 90,000 > fp16's 65,504), a small lora_b,
    so that the output (about 40) and every PEFT intermediate fit in fp16."""
    lead = () if num_adapters is None else (num_adapters,)
    x = (1 + 0.1 * torch.rand(m, k)).half()
    a = torch.full((*lead, r, k), 300.0 / k) * (1 + 0.1 * torch.rand(*lead, r, k))
    b = 1e-3 * torch.randn(*lead, n, r)
    w = torch.randn(n, k) / k**0.5
    bias = torch.randn(n)
    return [t.half().to(DEVICE) for t in (x, w, bias, a, b)]


@pytest.mark.parametrize("rank", [4, 40], ids=["fused-S", "separate-S"])
def test_lora_linear_large_scale_does_not_overflow(rank):
    x, w, bias, a, b = _big_s_inputs(5, 32, 24, rank)
    x.requires_grad_()
    y = lk.lora_linear(x, w, bias, a, b, BIG_SCALE, backend="triton")
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, dy)
    # PEFT's order in fp16: lora_B(lora_A(x)) * scaling
    xb = x.detach().clone().requires_grad_()
    y_peft = F.linear(xb, w, bias) + F.linear(F.linear(xb, a), b) * BIG_SCALE
    (dx_peft,) = torch.autograd.grad(y_peft, xb, dy)
    x64 = x.detach().double().requires_grad_()
    y64 = F.linear(x64, w.double(), bias.double())
    y64 = y64 + BIG_SCALE * F.linear(F.linear(x64, a.double()), b.double())
    (dx64,) = torch.autograd.grad(y64, x64, dy.double())
    assert torch.isfinite(y_peft).all()
    assert_close_to_ref("y", y.detach(), y64.detach(), y_peft.detach())
    assert_close_to_ref("dx", dx, dx64, dx_peft)


@pytest.mark.parametrize("strategy", ["gather", "grouped"])
def test_lora_linear_multi_large_scale_does_not_overflow(monkeypatch, strategy):
    monkeypatch.setattr(_triton_multi, "choose_strategy", lambda m, num_adapters: strategy)
    num_adapters, r = 2, 8
    x, w, bias, a, b = _big_s_inputs(6, 32, 24, r, num_adapters)
    ids = torch.tensor([1, 0, -1, 1, 1, 0], device=DEVICE)
    scales = torch.tensor([BIG_SCALE, BIG_SCALE / 2], device=DEVICE)
    y = lk.lora_linear_multi(x, w, bias, a, b, scales, ids, backend="triton")
    rows = ids.clamp(min=0)
    on = (ids >= 0)[:, None]

    def lora_term(xx, aa, bb, sc):
        s = torch.einsum("mk,mrk->mr", xx, aa[rows])
        return torch.einsum("mr,mnr->mn", s, bb[rows]) * sc[rows][:, None] * on

    y_peft = F.linear(x, w, bias) + lora_term(x, a, b, scales.half())
    y64 = F.linear(x.double(), w.double(), bias.double())
    y64 = y64 + lora_term(x.double(), a.double(), b.double(), scales.double())
    assert torch.isfinite(y_peft).all()
    assert_close_to_ref("y", y, y64, y_peft)


# --------------------------------------------------------------------------------------------
# Grouped: only the adapters present
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def count_loads(*tensors: torch.Tensor):
    """Bytes the interpreted kernels load from each tensor's storage (masked lanes excluded):
    a list, one entry per tensor, filled when the block exits."""
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    spans = [
        (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes(), t.element_size())
        for t in tensors
    ]
    counts = [0] * len(tensors)
    real = builder.create_masked_load
    # the hook goes on the instance; restoring must remove it, not leave the bound method there,
    # which would shadow every later patch of the class (tools/traffic.py counts through one)
    had_own = "create_masked_load" in vars(builder)

    def counted(ptrs, mask, other, cache_policy, is_volatile):
        addresses = np.asarray(ptrs.data, dtype=np.uint64)[np.asarray(mask.data, dtype=bool)]
        for i, (start, size, width) in enumerate(spans):
            inside = (addresses >= start) & (addresses < start + size)
            counts[i] += int(inside.sum()) * width
        return real(ptrs, mask, other, cache_policy, is_volatile)

    builder.create_masked_load = counted
    try:
        yield counts
    finally:
        if had_own:
            builder.create_masked_load = real
        else:
            del builder.create_masked_load


@pytest.mark.skipif(DEVICE != "cpu", reason="counts the interpreter's loads")
def test_grouped_loads_only_the_adapters_with_rows():
    """Rows of slots 0 and 63 of a 64-slot stack, in one tile: only those two adapters are read
    (the forward's shrink and expand, and the backward's), and the 62 slots between them, filled
    with NaN, leave every output finite."""
    m, k, n, r, num_adapters = 12, 32, 16, 8, 64
    x = torch.randn(m, k, dtype=torch.float16)
    w = (torch.randn(n, k) / k**0.5).half()
    a = (torch.randn(num_adapters, r, k) / k**0.5).half()
    b = (torch.randn(num_adapters, n, r) / r**0.5).half()
    a[1:-1] = float("nan")
    b[1:-1] = float("nan")
    ids = torch.tensor([0, 63] * (m // 2))
    scales = torch.rand(num_adapters) + 0.5
    a.requires_grad_()
    b.requires_grad_()
    x.requires_grad_()
    with count_loads(a, b) as loaded:
        y, _ = _triton_multi.lora_linear_multi_fwd(
            x, w, None, a, b, scales, ids, None, strategy="grouped"
        )
    # each present adapter read at most once per shrink tile and per expand tile (one each
    # here: 12 rows, one row tile; N = 16, one column tile)
    one_adapter = r * k * 2, n * r * 2
    assert loaded == [2 * one_adapter[0], 2 * one_adapter[1]], loaded
    assert torch.isfinite(y).all()
    y_ref, _ = _triton_multi.lora_linear_multi_fwd(
        x, w, None, a.nan_to_num(), b.nan_to_num(), scales, ids, None, strategy="gather"
    )
    torch.testing.assert_close(y, y_ref, rtol=2e-3, atol=2e-3)
    dx, da, db = _triton_multi.lora_linear_multi_bwd(
        torch.randn(m, n, dtype=torch.float16), x, w, a, b, scales, ids,
        torch.zeros(m, r), None, strategy="grouped",
    )  # fmt: skip
    assert torch.isfinite(dx).all()


# --------------------------------------------------------------------------------------------
# Gather and grouped agree
# --------------------------------------------------------------------------------------------


def _ulp(t: torch.Tensor) -> torch.Tensor:
    """The spacing of ``t``'s dtype at each |value| (fp64)."""
    eps = torch.finfo(t.dtype).eps
    tiny = torch.finfo(t.dtype).tiny
    mag = t.double().abs().clamp(min=tiny)
    return torch.exp2(torch.floor(torch.log2(mag))) * eps


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("lora_dtype", ["same", "fp32"])
def test_a_rows_result_does_not_depend_on_its_batch(dtype, lora_dtype):
    """Row 0 alone (gather) and in a batch of 130 rows over 2 adapters (grouped).

    Both strategies round the same operands to ``dtype`` and form exact fp32 products, so:
    ``s`` (fp32) differs by at most the reordering bound of two fp32 sums of K terms,
    ``2 * K * 2**-24 * sum_k |x_k a_k|``; ``y`` (rounded once to ``dtype``) by at most one unit in
    its last place, plus what one ``s`` value rounding to the other side of a ``dtype`` boundary
    can move (``scale * sum_j ulp(s_j) |b_j|``).
    """
    m, k, n, r, num_adapters = 130, 96, 40, 16, 2
    lora_dt = dtype if lora_dtype == "same" else torch.float32
    x = torch.randn(m, k).to(dtype)
    w = (torch.randn(n, k) / k**0.5).to(dtype)
    bias = torch.randn(n).to(dtype)
    a = (torch.randn(num_adapters, r, k) / k**0.5).to(lora_dt)
    b = (torch.randn(num_adapters, n, r) / r**0.5).to(lora_dt)
    scales = torch.tensor([1.5, 0.75])
    ids = torch.randint(0, num_adapters, (m,))
    assert _triton_multi.choose_strategy(1, num_adapters) == "gather"
    assert _triton_multi.choose_strategy(m, num_adapters) == "grouped"
    fwd = _triton_multi.lora_linear_multi_fwd
    y_one, s_one = fwd(x[:1], w, bias, a, b, scales, ids[:1], None)
    y_all, s_all = fwd(x, w, bias, a, b, scales, ids, None)

    aid = int(ids[0])
    x_r = x[0].double()
    a_r = a[aid].to(dtype).double()  # the operands both strategies round to
    s_bound = 2 * k * 2.0**-24 * (x_r.abs() @ a_r.abs().T)
    s_diff = (s_one[0].double() - s_all[0].double()).abs()
    assert (s_diff <= s_bound).all(), (s_diff / s_bound).max()
    s16 = s_all[0].to(dtype)
    b_r = b[aid].to(dtype).double()
    y_bound = _ulp(y_all[0]) + float(scales[aid]) * (b_r.abs() @ _ulp(s16))
    y_diff = (y_one[0].double() - y_all[0].double()).abs()
    assert (y_diff <= y_bound).all(), (y_diff / y_bound).max()


# --------------------------------------------------------------------------------------------
# dA / dB: a popular adapter's rows split among programs
# --------------------------------------------------------------------------------------------


def test_a_popular_adapters_rows_are_split(monkeypatch):
    """On a GPU, 32k rows of one adapter are reduced by programs of at most 1,024 rows each;
    deterministic mode keeps one program per adapter (no atomics)."""
    monkeypatch.setattr(_triton_multi, "interpreting", lambda: False)
    splits = _triton_multi.segment_splits(32768, deterministic=False)
    assert -(-32768 // splits) <= 1024
    assert _triton_multi.segment_splits(32768, deterministic=True) == 1
    assert _triton_multi.segment_splits(16, deterministic=False) == 1


@pytest.mark.parametrize("deterministic", [False, True])
def test_split_reduction_matches_the_reference(deterministic):
    """One adapter with 150 of 160 rows (5 splits under the interpreter), one with the rest,
    one with none: dA and dB within the tolerance rule, zeros for the unused adapter."""
    m, k, n, r, num_adapters = 160, 24, 20, 8, 3
    x = torch.randn(m, k, dtype=torch.float16)
    w = (torch.randn(n, k) / k**0.5).half()
    a = (torch.randn(num_adapters, r, k) / k**0.5).half()
    b = (torch.randn(num_adapters, n, r) / r**0.5).half()
    ids = torch.full((m,), 2)
    ids[torch.randperm(m)[:10]] = 0
    scales = torch.tensor([0.5, 1.0, 2.0])
    dy = torch.randn(m, n, dtype=torch.float16)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        assert _triton_multi.segment_splits(m, deterministic) == (1 if deterministic else 5)
        _, s = _triton_multi.lora_linear_multi_fwd(x, w, None, a, b, scales, ids, None)
        _, da, db = _triton_multi.lora_linear_multi_bwd(
            dy, x, w, a, b, scales, ids, s, None, needs_dx=False
        )
    finally:
        torch.use_deterministic_algorithms(previous)

    def grads(xx, aa, bb, dyy, sc):
        ga, gb = torch.zeros_like(aa), torch.zeros_like(bb)
        for i in range(num_adapters):
            rows = ids == i
            t = dyy[rows] @ bb[i]
            ga[i] = sc[i] * t.T @ xx[rows]
            gb[i] = sc[i] * dyy[rows].T @ (xx[rows] @ aa[i].T)
        return ga, gb

    da64, db64 = grads(x.double(), a.double(), b.double(), dy.double(), scales.double())
    da16, db16 = grads(x, a, b, dy, scales.half())
    assert_close_to_ref("dA", da, da64, da16)
    assert_close_to_ref("dB", db, db64, db16)
    assert not da[1].any() and not db[1].any()
