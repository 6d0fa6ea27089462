"""DoRA in Triton: the factored row norm, and the forward and backward around the fused LoRA GEMM.

Formula and shapes (``r`` up to 256, s = scale, m = magnitude [N])::

    norm = sqrt(||W_n||^2 + 2 s B_n . (W A^T)_n + s^2 B_n (A A^T) B_n^T)     [N] fp32
    g    = m / norm                                                          [N] fp32 (the caller)
    lin  = x_in @ W^T + s (x_in @ A^T) @ B^T        [M, N]   x_in = x_lora if given, else x
    y    = g * lin + bias + (x - x_lora) @ W^T
    dm   = sum_rows(dy * lin) / norm,   then the LoRA backward of lin with dy * g

``_dora_norm_kernel`` makes one pass over W: each program owns BLOCK_N rows, accumulates the
[BLOCK_N, r] tile of ``W A^T`` in fp32 over K (a LoRA shrink over N rows) and, when the caller has
no cached ``||W||^2`` yet, the rows' squared norms from the same W tiles; its epilogue combines
them with the rows of B and the [r, r] Gram matrix ``A A^T`` (computed once outside: r*r*K
flops), read in [64, 32] blocks so that no [r, r] or [BLOCK_N, r] x [r, 32] operand is ever
held in registers (rank chunks: spill-free up to r = 256). ``W + s B A`` ([N, K]) is never
formed, which is what makes PEFT's DoRA slow and memory-hungry. A block holding a row that the
adapter nearly cancels (the factored sum would lose bits to cancellation; ``ILL_CONDITIONED``)
makes a second pass summing ``(W + s B A)^2`` for its rows (``B A`` one rank chunk at a time),
without a host synchronisation.

The forward is the fused LoRA GEMM of ``lora_kernels/backends/triton/lora_linear.py`` for ``lin``
followed by ``_dora_scale_kernel`` (``y = g * lin + bias``, one elementwise pass); ``lin`` is kept
for the magnitude's gradient. The backward runs ``_dora_dy_kernel`` (one pass over dy and lin:
writes ``dy * g`` and reduces ``dy * lin`` over rows into dm) and then the LoRA backward on ``dy *
g``.

With dropout (x_lora given) the LoRA backward runs on ``(g - 1) * dy`` and the rank-r terms of
``dy`` itself are added after, so the gradient of x_lora, ``(g - 1) dy W + s (g dy B) A``, is never
the difference of two large products; dx is ``dy W``. That is two full GEMMs in the backward, as
PEFT does.

Precision: fp32 accumulation throughout, 3xTF32 dots on a GPU for the norm's products. Under the
Triton interpreter every dot runs in fp32 (its bf16 dot is broken).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ...reference import ILL_CONDITIONED
from . import interpreting, on_input_device
from . import merge as merge_tiles
from ._args import vector_stride
from ._lora_product import lora_product_tile
from ._rounding import round_to_bf16
from .lora_linear import lora_linear_bwd, lora_linear_fwd

__all__ = [
    "dora_linear_bwd",
    "dora_linear_fwd",
    "dora_merge_",
    "dora_unmerge_",
    "dora_weight_norm",
    "weight_sq_norm",
]


@triton.jit
def _dora_norm_kernel(
    # pointers
    w_ptr,
    a_ptr,
    b_ptr,
    gram_ptr,
    wsq_ptr,
    norm_ptr,
    # sizes
    N,
    K,
    R,
    # strides
    stride_wn,
    stride_wk,
    stride_ar,
    stride_ak,
    stride_bn,
    stride_br,
    stride_wsq,
    # scalars
    scale,
    ILL_CONDITIONED,
    # meta-parameters
    HAS_WSQ: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    RANK_CHUNK: tl.constexpr,
    GRAM_COLS: tl.constexpr,
):
    """``norm`` for BLOCK_N rows; without HAS_WSQ also stores their ``||W_n||^2`` in wsq.

    Only the ``[BLOCK_N, BLOCK_R]`` accumulator of ``W A^T`` spans the whole rank; everything
    after it works on rank chunks: the quadratic term is ``sum_j (sum_i B_i G_ij) . B_j`` over
    ``[RANK_CHUNK, GRAM_COLS]`` blocks of the Gram matrix (i: RANK_CHUNK ranks of B's rows, j:
    GRAM_COLS), and the second pass forms ``B A`` one rank chunk at a time. Holding the whole
    ``[BLOCK_R, BLOCK_R]`` Gram matrix (or B beside a ``[BLOCK_R, GRAM_COLS]`` slice of it)
    spilled at rank 256."""
    pid = tl.program_id(0).to(tl.int64)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    offs_c = tl.arange(0, RANK_CHUNK)
    offs_j = tl.arange(0, GRAM_COLS)
    mask_n = offs_n < N
    mask_r = offs_r < R

    p = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    wsq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        mask_k = k < K
        w_ptrs = w_ptr + offs_n[:, None] * stride_wn + k[None, :] * stride_wk
        w = tl.load(w_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        # A^T tile [BLOCK_K, BLOCK_R]: the padded ranks load as zeros
        a_ptrs = a_ptr + k[:, None] * stride_ak + offs_r[None, :] * stride_ar
        a = tl.load(a_ptrs, mask=mask_k[:, None] & mask_r[None, :], other=0.0).to(tl.float32)
        p = tl.dot(w, a, p, input_precision=DOT_PRECISION)
        if not HAS_WSQ:
            wsq += tl.sum(w * w, axis=1)

    b_ptrs = b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br
    b = tl.load(b_ptrs, mask=mask_n[:, None] & mask_r[None, :], other=0.0).to(tl.float32)
    cross = tl.sum(b * p, axis=1)
    # The Gram matrix is zero-padded to [BLOCK_R, BLOCK_R]: its blocks load unmasked, and the
    # chunks of B past R load as zeros.
    quad = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for j0 in range(0, BLOCK_R, GRAM_COLS):
        cols = j0 + offs_j
        bg = tl.zeros((BLOCK_N, GRAM_COLS), dtype=tl.float32)  # (B G)[:, cols]
        for i0 in range(0, BLOCK_R, RANK_CHUNK):
            rows = i0 + offs_c
            b_rows = tl.load(
                b_ptr + offs_n[:, None] * stride_bn + rows[None, :] * stride_br,
                mask=mask_n[:, None] & (rows < R)[None, :],
                other=0.0,
            ).to(tl.float32)
            gram = tl.load(gram_ptr + rows[:, None] * BLOCK_R + cols[None, :])
            bg = tl.dot(b_rows, gram, bg, input_precision=DOT_PRECISION)
        b_cols = tl.load(
            b_ptr + offs_n[:, None] * stride_bn + cols[None, :] * stride_br,
            mask=mask_n[:, None] & (cols < R)[None, :],
            other=0.0,
        ).to(tl.float32)
        quad += tl.sum(bg * b_cols, axis=1)
    if HAS_WSQ:
        wsq = tl.load(wsq_ptr + offs_n * stride_wsq, mask=mask_n, other=0.0)
    else:
        tl.store(wsq_ptr + offs_n * stride_wsq, wsq, mask=mask_n)
    sq = wsq + (2.0 * scale) * cross + (scale * scale) * quad
    terms = wsq + (2.0 * tl.abs(scale)) * tl.abs(cross) + (scale * scale) * tl.abs(quad)
    bad = (sq < terms * ILL_CONDITIONED) & mask_n
    if tl.max(bad.to(tl.int32), axis=0) > 0:
        # The adapter nearly cancels a row of W: a second pass over this block's rows sums the
        # squares of W + s B A itself (rare; see ILL_CONDITIONED in reference.py).
        dsq = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs_k
            mask_k = k < K
            w_ptrs = w_ptr + offs_n[:, None] * stride_wn + k[None, :] * stride_wk
            w = tl.load(w_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
            ba = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
            for i0 in range(0, BLOCK_R, RANK_CHUNK):
                rows = i0 + offs_c
                mask_c = rows < R
                b_rows = tl.load(
                    b_ptr + offs_n[:, None] * stride_bn + rows[None, :] * stride_br,
                    mask=mask_n[:, None] & mask_c[None, :],
                    other=0.0,
                ).to(tl.float32)
                a_ptrs = a_ptr + rows[:, None] * stride_ar + k[None, :] * stride_ak
                a = tl.load(a_ptrs, mask=mask_c[:, None] & mask_k[None, :], other=0.0)
                ba = tl.dot(b_rows, a.to(tl.float32), ba, input_precision=DOT_PRECISION)
            d = w + scale * ba
            dsq += tl.sum(d * d, axis=1)
        sq = tl.where(bad, dsq, sq)
    tl.store(norm_ptr + offs_n, tl.sqrt(tl.maximum(sq, 0.0)), mask=mask_n)


@triton.jit
def _dora_scale_kernel(
    # pointers
    lin_ptr,
    g_ptr,
    bias_ptr,
    y_ptr,
    # sizes
    M,
    N,
    # strides
    stride_lm,
    stride_ln,
    stride_ym,
    stride_yn,
    stride_g,
    stride_bias,
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """``y = g * lin + bias`` on one [BLOCK_M, BLOCK_N] tile, in fp32, rounded once."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    mask = (offs_m < M)[:, None] & mask_n[None, :]
    lin = tl.load(lin_ptr + offs_m[:, None] * stride_lm + offs_n[None, :] * stride_ln, mask=mask)
    g = tl.load(g_ptr + offs_n * stride_g, mask=mask_n, other=0.0)
    y = lin.to(tl.float32) * g[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n * stride_bias, mask=mask_n, other=0.0)
        y += bias.to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dora_dy_kernel(
    # pointers
    dy_ptr,
    lin_ptr,
    g_ptr,
    norm_ptr,
    dyg_ptr,
    dm_ptr,
    # sizes
    M,
    N,
    rows_per_split,  # a multiple of BLOCK_M
    # strides
    stride_dym,
    stride_dyn,
    stride_lm,
    stride_ln,
    stride_om,
    stride_on,
    stride_g,
    stride_norm,
    # meta-parameters
    G_SHIFT: tl.constexpr,
    HAS_DM: tl.constexpr,
    ATOMIC_DM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One pass over dy for BLOCK_N columns and one split of the rows: ``dyg = dy * (g - G_SHIFT)``
    and ``dm += sum_rows(dy * lin) / norm`` (added with atomics when the rows are split)."""
    pid_n = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    g = tl.load(g_ptr + offs_n * stride_g, mask=mask_n, other=0.0) - G_SHIFT
    dm = tl.zeros((BLOCK_N,), dtype=tl.float32)
    m_start = pid_m * rows_per_split
    m_end = min(m_start + rows_per_split, M)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask = (offs_m < m_end)[:, None] & mask_n[None, :]
        dy_ptrs = dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn
        dy = tl.load(dy_ptrs, mask=mask, other=0.0).to(tl.float32)
        out_ptrs = dyg_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
        tl.store(out_ptrs, (dy * g[None, :]).to(dyg_ptr.dtype.element_ty), mask=mask)
        if HAS_DM:
            lin_ptrs = lin_ptr + offs_m[:, None] * stride_lm + offs_n[None, :] * stride_ln
            lin = tl.load(lin_ptrs, mask=mask, other=0.0).to(tl.float32)
            dm += tl.sum(dy * lin, axis=0)
    if HAS_DM:
        dm = dm / tl.load(norm_ptr + offs_n * stride_norm, mask=mask_n, other=1.0)
        if ATOMIC_DM:
            tl.atomic_add(dm_ptr + offs_n, dm, mask=mask_n, sem="relaxed")
        else:
            tl.store(dm_ptr + offs_n, dm, mask=mask_n)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _rank_block(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


# Norm kernel tiles (BLOCK_N, BLOCK_K, num_warps) by rank above 16: the [BLOCK_N, BLOCK_R]
# accumulator of W A^T spans the whole rank; the Gram term and the dense fallback work in
# [_RANK_CHUNK, _GRAM_COLS] blocks. The compile gate measured, at rank 128 with 64-row tiles,
# 2-80 KB of spills; BLOCK_K 64 spilled 264 B even at rank 16 (odd K, ||W||^2 in the same
# pass); 64-row tiles at BLOCK_R 64 spilled 268-520 B at rank 40 on sm_80 (odd R: no
# divisibility hint), 16-row tiles on 8 warps do not. Before the rank chunks, BLOCK_R 256 (the
# whole Gram matrix's rows beside B) spilled 104-552 B at ranks 200 and 256 on both targets.
_NORM_TILES = {False: (64, 32, 4), True: (16, 32, 8)}
_GRAM_COLS = 32
_RANK_CHUNK = 64
# dy-pass tiles (BLOCK_M, BLOCK_N, num_warps)
_DY_TILES = (32, 64, 4)  # 32 x 128 spilled 48-112 B at M = 1 (odd N)


@on_input_device
def weight_sq_norm(weight: torch.Tensor) -> torch.Tensor:
    """``||W_n||^2`` per row ``[N]`` fp32: one reduction, run once per frozen weight."""
    return torch.linalg.vector_norm(weight, dim=1, dtype=torch.float32).square()


@on_input_device
def dora_weight_norm(weight, lora_a, lora_b, scale, w_sq):
    """``||W + scale * B A||_row`` ``[N]`` fp32 in one pass over W (see the module docstring).

    weight [N, K], lora_a [r, K], lora_b [N, r] (any strides, fp32/fp16/bf16), w_sq [N] fp32
    (:func:`weight_sq_norm`) or None to compute it in the same pass.
    """
    n, k = weight.shape
    r = lora_a.shape[0]
    block_r = _rank_block(r)
    a32 = lora_a.detach().float()
    gram = torch.zeros((block_r, block_r), dtype=torch.float32, device=weight.device)
    gram[:r, :r] = a32 @ a32.T
    norm = torch.empty(n, dtype=torch.float32, device=weight.device)
    has_wsq = w_sq is not None
    wsq = w_sq.float() if has_wsq else torch.empty_like(norm)
    if n == 0:
        return norm
    interp = interpreting()
    block_n, block_k, warps = (16, 32, 4) if interp else _NORM_TILES[block_r > 16]
    _dora_norm_kernel[(triton.cdiv(n, block_n),)](
        weight, lora_a, lora_b, gram, wsq, norm,
        n, k, r,
        weight.stride(0), weight.stride(1), lora_a.stride(0), lora_a.stride(1),
        lora_b.stride(0), lora_b.stride(1), vector_stride(wsq),
        float(scale), ILL_CONDITIONED,
        HAS_WSQ=has_wsq, DOT_PRECISION="ieee" if interp else "tf32x3",
        BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=block_r,
        RANK_CHUNK=min(block_r, 32 if interp else _RANK_CHUNK),
        GRAM_COLS=min(block_r, 16 if interp else _GRAM_COLS),
        num_warps=warps,
        # sm_80, BLOCK_R 16 (r7 bf16+fp32, wsq given) and 128 (r128 fp16, no wsq): ptxas stopped
        # at 168 and 128 registers and spilled 16 and 32 B; with an explicit ceiling they take
        # 192 and 149 and spill nothing. BLOCK_R 64 and 256 keep ptxas's own choice.
        maxnreg=255 if not interp and block_r in (16, 128) else None,
    )  # fmt: skip
    return norm


def _blocks_2d(interp: bool) -> tuple[int, int]:
    return (16, 32) if interp else (32, 128)


@on_input_device
def dora_linear_fwd(x, weight, bias, lora_a, lora_b, scale, x_lora, g):
    """``(y, lin, s)``: DoRA's output, the unscaled ``lin`` (x's dtype) and ``s = x_in @ A^T``
    (fp32) for x [M, K] and g [N] fp32; the LoRA GEMM of ``triton/lora_linear.py`` gives lin."""
    x_in = x if x_lora is None else x_lora
    lin, s = lora_linear_fwd(x_in, weight, None, lora_a, lora_b, scale)
    m, n = lin.shape
    y = torch.empty_like(lin)
    if m and n:
        block_m, block_n = _blocks_2d(interpreting())
        _dora_scale_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, block_n))](
            lin, g, bias, y,
            m, n,
            lin.stride(0), lin.stride(1), y.stride(0), y.stride(1),
            vector_stride(g), vector_stride(bias),
            HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n,
        )  # fmt: skip
    if x_lora is not None:
        y.addmm_(x - x_lora, weight.T)
    return y, lin, s


def _dy_pass(dy, lin, g, norm, shift: int, needs_dm: bool):
    """``(dy * (g - shift), dm or None)`` in one pass over dy (and lin for dm)."""
    m, n = dy.shape
    out = torch.empty_like(dy)
    dm = torch.zeros(n, dtype=torch.float32, device=dy.device) if needs_dm else None
    if m == 0 or n == 0:
        return out, dm
    interp = interpreting()
    block_m, block_n, warps = (*_blocks_2d(interp), 4) if interp else _DY_TILES
    n_blocks = triton.cdiv(n, block_n)
    splits = 1
    if not interp and not torch.are_deterministic_algorithms_enabled():
        sms = _sm_count(dy.device.index if dy.device.index is not None else 0)
        splits = max(1, min(triton.cdiv(m, block_m), (4 * sms) // n_blocks))
    rows = triton.cdiv(triton.cdiv(m, splits), block_m) * block_m
    splits = triton.cdiv(m, rows)
    _dora_dy_kernel[(n_blocks, splits)](
        dy, lin, g, norm, out, dm,
        m, n, rows,
        dy.stride(0), dy.stride(1), lin.stride(0), lin.stride(1), out.stride(0), out.stride(1),
        vector_stride(g), vector_stride(norm),
        G_SHIFT=shift, HAS_DM=needs_dm, ATOMIC_DM=splits > 1, BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=warps,
    )  # fmt: skip
    return out, dm


@on_input_device
def dora_linear_bwd(
    dy,
    x,
    weight,
    lora_a,
    lora_b,
    s,
    lin,
    g,
    weight_norm,
    scale,
    x_lora=None,
    *,
    needs_dx=True,
    needs_da=True,
    needs_db=True,
    needs_dm=True,
):
    """``(dx, dx_lora, da, db, dm)`` of :func:`dora_linear_fwd`; a gradient not needed is None.
    dm is fp32 (the caller casts it to the magnitude's dtype)."""
    needs_lora = needs_dx or needs_da or needs_db
    if x_lora is None:
        dyg, dm = _dy_pass(dy, lin, g, weight_norm, 0, needs_dm)
        dx = da = db = None
        if needs_lora:
            dx, _, da, db = lora_linear_bwd(
                dyg, x, weight, lora_a, lora_b, s, scale,
                needs_dx=needs_dx, needs_da=needs_da, needs_db=needs_db,
            )  # fmt: skip
        return dx, None, da, db, dm
    # Dropout: the LoRA backward of lin on (g - 1) dy, plus the rank-r terms of dy itself.
    dyd, dm = _dy_pass(dy, lin, g, weight_norm, 1, needs_dm)
    dx = dx_lora = da = db = None
    if needs_lora:
        dx_lora, _, da, db = lora_linear_bwd(
            dyd, x_lora, weight, lora_a, lora_b, s, scale,
            needs_dx=needs_dx, needs_da=needs_da, needs_db=needs_db,
        )  # fmt: skip
    ldt = lora_a.dtype
    if needs_dx or needs_da:
        t = (dy.to(ldt) @ lora_b).float().mul_(scale)  # s * dy @ B  [M, r]
    if needs_dx:
        dx_lora += (t @ lora_a.float()).to(dx_lora.dtype)
        dx = dy @ weight
    if needs_da:
        da += (t.T @ x_lora.float()).to(ldt)
    if needs_db:
        db += (dy.T.to(ldt) @ s.to(ldt)).mul_(scale)
    return dx, dx_lora, da, db, dm


# Merge tiles: those of the LoRA merge (``merge.tile_launch``, spill-free there at every rank):
# a [64, 64] weight tile and rank chunks of 32; fp32 or mixed adapters keep 3xTF32 with a 32-deep
# K tile on 8 warps. 16-bit adapters take 8 warps too: the magnitude's extra terms (the divide by
# g of the unmerge) put the 4-warp tile at 255 registers and 40 B of spills at rank 40 on sm_80
# (8 B on sm_90, fp16, odd K/N); on 8 warps it takes at most 165, no spill (compile gate). The
# interpreter's tile is smaller than the tests' odd sizes.
_MERGE_META = {**merge_tiles.CUDA_META, "num_warps": 8}
_INTERP_MERGE_META = {"BLOCK_N": 16, "BLOCK_K": 32}
_INTERP_MERGE_MAX_R = 16


@triton.jit
def _dora_merge_kernel(
    # pointers
    w_ptr,
    a_ptr,
    b_ptr,
    g_ptr,
    # sizes
    N,
    K,
    R,
    # strides
    stride_wn,
    stride_wk,
    stride_ar,
    stride_ak,
    stride_bn,
    stride_br,
    stride_g,
    # scalars
    scale,
    # meta-parameters
    UNMERGE: tl.constexpr,
    FP32_OPERANDS: tl.constexpr,
    UPCAST_DOTS: tl.constexpr,
    ROUND_BF16_BY_BITS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """One [BLOCK_N, BLOCK_K] tile of W, in place: ``g * (W + scale * B A)`` (merge) or
    ``W / g - scale * B A`` (unmerge), formed in fp32 and rounded once."""
    pid_n = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    mask_k = offs_k < K
    mask_w = mask_n[:, None] & mask_k[None, :]
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk
    w = tl.load(w_ptrs, mask=mask_w, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs_n * stride_g, mask=mask_n, other=1.0).to(tl.float32)

    acc = lora_product_tile(
        a_ptr, b_ptr, offs_n, offs_k, mask_n, mask_k, R,
        stride_ar, stride_ak, stride_bn, stride_br,
        FP32_OPERANDS, UPCAST_DOTS, BLOCK_N, BLOCK_K, BLOCK_R,
    )  # fmt: skip
    out = w / g[:, None] - scale * acc if UNMERGE else (w + scale * acc) * g[:, None]
    if ROUND_BF16_BY_BITS:
        tl.store(w_ptrs, round_to_bf16(out), mask=mask_w)
    else:
        tl.store(w_ptrs, out.to(w_ptr.dtype.element_ty), mask=mask_w)


def _dora_merge(weight, lora_a, lora_b, scale, g, unmerge: bool):
    n, k = weight.shape
    r = lora_a.shape[0]
    if n == 0 or k == 0:
        return weight
    grid, meta = merge_tiles.tile_launch(
        weight,
        lora_a,
        lora_b,
        interpreting(),
        _INTERP_MERGE_META,
        _INTERP_MERGE_MAX_R,
        cuda_meta=_MERGE_META,
    )
    _dora_merge_kernel[grid](
        weight, lora_a, lora_b, g,
        n, k, r,
        weight.stride(0), weight.stride(1), lora_a.stride(0), lora_a.stride(1),
        lora_b.stride(0), lora_b.stride(1), vector_stride(g),
        float(scale),
        UNMERGE=unmerge,
        **meta,
    )  # fmt: skip
    return weight


@on_input_device
def dora_merge_(weight, lora_a, lora_b, scale, g):
    """``weight = g[:, None] * (weight + scale * B A)`` in place: one pass over W, fp32 sums,
    each element rounded once; weight [N, K] and the adapters in any strides, g [N] fp32."""
    return _dora_merge(weight, lora_a, lora_b, scale, g, unmerge=False)


@on_input_device
def dora_unmerge_(weight, lora_a, lora_b, scale, g):
    """``weight = weight / g[:, None] - scale * B A`` in place (the inverse of
    :func:`dora_merge_` for the same g), fp32, rounded once."""
    return _dora_merge(weight, lora_a, lora_b, scale, g, unmerge=True)
