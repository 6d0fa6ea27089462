"""Device functions that the multi-adapter (``lora_multi``) and MoE (``moe``) kernels share.

``rounded_dot`` is the precision policy of both families' dots (operands rounded to the
activations' dtype, fp32 accumulation); ``segment_outer`` is the reduction behind their dA and dB:
``p[rows].T @ q[rows]`` over one segment of rows of a sorted order, the rows of one adapter (or
one (adapter, expert) pair). Triton inlines both into each kernel, so a kernel compiles as if
they were written in it. The compile gate compiles them with each family's kernels
(``SHARED_DEVICE_MODULES`` in tools/compile_gate.py).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._rounding import interpreted_round


@triton.jit
def rounded_dot(
    a, b, acc, DOT_DTYPE: tl.constexpr, UPCAST_DOTS: tl.constexpr, PRECISION: tl.constexpr
):
    """``acc + a @ b`` with both operands rounded to DOT_DTYPE (a tensor-core dot for 16 bits);
    UPCAST_DOTS (interpreter, bf16) then widens the rounded operands to fp32."""
    if UPCAST_DOTS:  # rounded as a GPU rounds, then widened (``_rounding.py``)
        return tl.dot(
            interpreted_round(a, DOT_DTYPE), interpreted_round(b, DOT_DTYPE), acc,
            input_precision=PRECISION,
        )  # fmt: skip
    return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=PRECISION)


@triton.jit
def segment_outer(
    p_ptr, q_ptr, order_ptr, start, end, p_offs, q_offs, p_lim, q_lim,
    stride_pm, stride_pp, stride_qm, stride_qq,
    DOT_DTYPE: tl.constexpr, UPCAST_DOTS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
):  # fmt: skip
    """``sum over rows = order[start:end] of p[row, p_offs].T q[row, q_offs]``, a
    [BLOCK_P, BLOCK_Q] fp32 tile, ``BLOCK_M`` rows a step; columns from ``p_lim`` / ``q_lim``
    on (past an adapter's rank, or the matrix) read as zeros. Unscaled: the caller multiplies by
    the segment's scale once the sum is complete."""
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        pos = m0 + tl.arange(0, BLOCK_M)
        pos_mask = pos < end
        rows = tl.load(order_ptr + pos, mask=pos_mask, other=0).to(tl.int64)
        pt = tl.load(
            p_ptr + rows[:, None] * stride_pm + p_offs[None, :] * stride_pp,
            mask=pos_mask[:, None] & (p_offs < p_lim)[None, :],
            other=0.0,
        )
        qt = tl.load(
            q_ptr + rows[:, None] * stride_qm + q_offs[None, :] * stride_qq,
            mask=pos_mask[:, None] & (q_offs < q_lim)[None, :],
            other=0.0,
        )
        acc = rounded_dot(tl.trans(pt), qt, acc, DOT_DTYPE, UPCAST_DOTS, PRECISION)
    return acc
