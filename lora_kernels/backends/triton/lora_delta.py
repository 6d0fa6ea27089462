"""The Triton backend of the ``lora_delta`` family (the LoRA term alone, shapes and semantics in
``backends/torch/lora_delta.py``), built on the ``lora_multi`` kernels:

* shrink: ``lora_multi``'s shrink kernels (one row per program for decode batches, tiles of rows
  sorted by adapter for prefill), then one element-wise pass that applies each row's scale;
* expand: ``_lora_expand_inplace_kernel`` below, the LoRA half of ``lora_multi``'s fused kernel
  (same tiles, same gather / grouped row order, one dot per adapter present in a tile) with the
  base GEMM replaced by y itself: each tile of y is read through its strides into the fp32
  accumulator (``add_inputs``), ``s @ lora_b[a].T`` is added there, and the sum is rounded once
  and stored back, only in rows that have an adapter (the others are neither read nor written,
  so they keep their bits). No ``[M, N]`` temporary, one rounding.

Nothing here reads the ids on the host or sizes a tensor by their values: a decode step stays
capturable in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreting, on_input_device
from ._args import index_vector
from ._rounding import round_to_bf16
from .lora_multi import (
    _EXPAND_MAX_R,
    _FUSED_CONFIGS,
    _ODD_FUSED_CONFIGS,
    _divisible,
    _dot_dtype,
    _dot_flags,
    _expand_present_adapters,
    _rank_block,
    _shrink,
    _sort_rows,
    choose_strategy,
)


@triton.jit
def _lora_expand_inplace_kernel(
    # pointers
    s_ptr,
    b_ptr,
    ids_ptr,
    order_ptr,
    ranks_ptr,
    y_ptr,
    # sizes
    M,
    N,
    R,
    L,
    # strides
    stride_sm,
    stride_sr,
    stride_bl,
    stride_bn,
    stride_br,
    stride_ym,
    stride_yn,
    # meta-parameters
    ADD_INPUTS: tl.constexpr,
    HAS_RANKS: tl.constexpr,
    GROUPED: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    UPCAST_DOTS: tl.constexpr,
    PRECISION: tl.constexpr,
    ROUND_ON_BITS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """y[m] = (y[m] if ADD_INPUTS else 0) + s[m, :r_a] @ b[a, :, :r_a].T for the rows with an
    adapter (a = ids[m] in [0, L)), summed in fp32 and rounded once; other rows untouched.

    ``GROUPED``: tile rows are ``order[pos]`` and ``ids`` are sorted, as in ``lora_multi``'s
    fused kernel, whose int64 offsets this takes and whose LoRA loop it runs
    (``_expand_present_adapters``). ``ROUND_ON_BITS`` (interpreter, bf16 y): the store rounds to
    nearest even as a GPU does (``_rounding.py``), not by the interpreter's truncation.
    """
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_pid_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = (first_m + (pid % width) % size_m).to(tl.int64)
    pid_n = ((pid % width) // size_m).to(tl.int64)

    pos = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    in_range = pos < M
    rows = tl.load(order_ptr + pos, mask=in_range, other=0).to(tl.int64) if GROUPED else pos
    aid = tl.load(ids_ptr + pos, mask=in_range, other=-1).to(tl.int64)
    valid = in_range & (aid >= 0) & (aid < L)
    n_offs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n_offs < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    r_range = tl.arange(0, BLOCK_R)
    s_rows = s_ptr + rows[:, None] * stride_sm
    b_cols = b_ptr + n_offs[None, :] * stride_bn
    a = tl.min(tl.where(valid, aid, L))
    acc = _expand_present_adapters(
        acc, a, aid, valid, n_mask, s_rows, b_cols, r_range, ranks_ptr, R, L,
        stride_sr, stride_bl, stride_br,
        HAS_RANKS, DOT_DTYPE, UPCAST_DOTS, PRECISION, BLOCK_R,
    )  # fmt: skip
    # y's tile pointers formed only now: held through the rank loop they spilled 76-80 B on
    # odd shapes (fp16, sm_80, the compile gate)
    y_ptrs = y_ptr + rows[:, None] * stride_ym + n_offs[None, :] * stride_yn
    tile_mask = valid[:, None] & n_mask[None, :]
    if ADD_INPUTS:
        acc += tl.load(y_ptrs, mask=tile_mask, other=0.0).to(tl.float32)
    if ROUND_ON_BITS:
        tl.store(y_ptrs, round_to_bf16(acc), mask=tile_mask)
    else:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=tile_mask)


@on_input_device
def lora_shrink_(out, x, lora_a, row_ids, scales, ranks=None):
    # the kernels index ids and ranks by position (the one rule: backends/triton/_args.py)
    row_ids, scales, ranks = index_vector(row_ids), index_vector(scales), index_vector(ranks)
    num_adapters, r_max, _ = lora_a.shape
    strategy = choose_strategy(x.shape[0], num_adapters)
    sorted_rows = _sort_rows(row_ids) if strategy == "grouped" else None
    s = _shrink(
        x, lora_a, lora_a.stride(), row_ids, sorted_rows, ranks, num_adapters, r_max, strategy
    )
    valid = (row_ids >= 0) & (row_ids < num_adapters)
    row_scale = torch.where(valid, scales[row_ids.long().clamp(0, num_adapters - 1)], 0.0)
    torch.mul(s, row_scale[:, None], out=s)
    out.copy_(s)
    return out


@on_input_device
def lora_expand_(y, s, lora_b, row_ids, ranks=None, add_inputs=True):
    row_ids, ranks = index_vector(row_ids), index_vector(ranks)
    m, n = y.shape
    num_adapters, _, r_max = lora_b.shape
    if m == 0 or n == 0:
        return y
    strategy = choose_strategy(m, num_adapters)
    grouped = strategy == "grouped"
    ids, order = _sort_rows(row_ids) if grouped else (row_ids, row_ids)
    key = ("grouped_tall" if m >= 2048 else "grouped") if grouped else "gather"
    b_strides = lora_b.stride()
    aligned = _divisible(n, s.stride(0), *b_strides, y.stride(0))
    block_m, block_n, _, warps, stages = (_FUSED_CONFIGS if aligned else _ODD_FUSED_CONFIGS)[key]
    # An explicit register ceiling (what the warps allow) on every CUDA launch: without one
    # ptxas stopped the odd grouped tiles below at 128 registers on sm_80 (8 B of spills) and
    # the aligned 16 x 128 gather tile at 80 on sm_90 (M = 16, fp16, no add_inputs: 8 B); with
    # it no variant of the compile gate's matrix spills (ranks 7-200: 82-255 registers).
    maxnreg = None if interpreting() else 255
    if not aligned and lora_b.element_size() > y.element_size():
        # fp32 adapters on a 16-bit y, unvectorised loads: the fused kernel's odd tiles spilled
        # 8-80 B here (compile gate, sm_80 and sm_90); half the columns per thread do not.
        block_n, warps = min(block_n, 64), 8
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    upcast = interpreting() and y.dtype == torch.bfloat16
    _lora_expand_inplace_kernel[grid](
        s, lora_b, ids, order, ranks if ranks is not None else row_ids, y,
        m, n, r_max, num_adapters,
        s.stride(0), s.stride(1), *b_strides, y.stride(0), y.stride(1),
        ADD_INPUTS=add_inputs,
        HAS_RANKS=ranks is not None,
        GROUPED=grouped,
        DOT_DTYPE=_dot_dtype(y.dtype, lora_b.dtype),
        PRECISION=_dot_flags(y.dtype)["PRECISION"],
        # this module's own interpreting(): lora_multi's answers for that module, which the
        # compile gate's twin of this one does not switch off
        UPCAST_DOTS=upcast,
        ROUND_ON_BITS=upcast,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_R=min(_rank_block(r_max), _EXPAND_MAX_R if aligned and key != "grouped_tall" else 16),
        GROUP_M=8,
        num_warps=warps,
        num_stages=stages,
        maxnreg=maxnreg,
    )  # fmt: skip
    return y
