"""Embedding LoRA in Triton (PEFT's ``lora.Embedding``): forward and backward, one or many adapters.

Formula and shapes (launcher signatures: ``lora_kernels.backends.LoraEmbeddingLaunchers``)::

    ids [M], weight [V, D], lora_a [L, R, V], lora_b [L, D, R], scales [L], a = row_ids[i] (or 0)
    S[i]  = lora_a[a][:, ids[i]]                                     [M, R]  fp32, saved
    y[i]  = weight[ids[i]] + scales[a] * lora_b[a] @ S[i]            [M, D]  weight.dtype
    dA[a][:, v] += scales[a] * dy[i] @ lora_b[a]   for ids[i] = v != padding_idx
    dB[a]       += scales[a] * dy[i]^T S[i]

The forward is one gather kernel: each program takes a block of rows and of D, gathers the table
rows and, rank by rank, the A entry of each row and B's column, and adds the low-rank term to
the gathered rows in fp32 before the single rounding store; neither ``E[ids]`` nor the LoRA term
is written on its own. The work is a gather (memory-bound), and the rank loop reads B's column
``[BLOCK_D]`` (per row when rows use different adapters), so no ``tl.dot`` shape constraint (16)
applies and the same code serves one adapter and a mixed batch.

The backward is one kernel per block of rows and slice of the rank: it streams dy over D once
per slice, building both ``T = dy @ B`` ([BLOCK_M, BLOCK_R], in registers) and this block's
``dy^T S`` partial of dB (added with
fp32 atomics, one adapter at a time), then scatters ``scale * T`` into A's columns of the block's
ids with atomics (ids repeat: the atomics add them up). A's gradient is therefore sparse in its
columns, as ``F.embedding``'s is. Every sum is fp32 and each gradient is rounded once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreting, on_input_device

__all__ = ["lora_embedding_fwd", "lora_embedding_bwd"]

_INTERP_BLOCKS = (16, 16)  # (BLOCK_M, BLOCK_D) under the interpreter: few, cheap programs
# The forward's [BLOCK_M, BLOCK_D] gather of B (a pointer per element with mixed adapters):
# 32 x 128 spilled 80 B on sm_90 (compile gate); 16 x 128 does not.
_CUDA_BLOCKS = (16, 128)
# The backward keeps [BLOCK_M, BLOCK_D, BLOCK_R] products and B's gathered pointers live; its
# grid splits the rank into BLOCK_R slices (dy is read once per slice). 16 x 32 x r (whole
# rank) spilled 900 B at rank 16; 16 x 8 x 16 is spill-free at every rank.
_CUDA_BWD_BLOCKS = (16, 8)
_CUDA_BWD_MAX_R = 16
_INTERP_BWD_MAX_R = 8  # small enough that the tests' ranks take several slices


@triton.jit
def _lora_embedding_fwd_kernel(
    # pointers
    ids_ptr,
    row_ids_ptr,
    w_ptr,
    a_ptr,
    b_ptr,
    scales_ptr,
    out_ptr,
    s_ptr,
    # sizes
    M,
    D,
    R,
    # strides
    stride_wv,
    stride_wd,
    stride_al,
    stride_ar,
    stride_av,
    stride_bl,
    stride_bd,
    stride_br,
    stride_om,
    stride_od,
    stride_sm,
    stride_sr,
    # meta-parameters
    HAS_ROW_IDS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_m = offs_m < M
    mask_d = offs_d < D
    mask = mask_m[:, None] & mask_d[None, :]
    ids = tl.load(ids_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    if HAS_ROW_IDS:
        aid = tl.load(row_ids_ptr + offs_m, mask=mask_m, other=-1).to(tl.int64)
    else:
        aid = tl.zeros((BLOCK_M,), dtype=tl.int64)
    active = mask_m & (aid >= 0)
    aid = tl.maximum(aid, 0)
    scale = tl.load(scales_ptr + aid, mask=active, other=0.0)

    acc = tl.load(
        w_ptr + ids[:, None] * stride_wv + offs_d[None, :] * stride_wd, mask=mask, other=0.0
    ).to(tl.float32)
    a_row = a_ptr + aid * stride_al + ids * stride_av
    b_tile = b_ptr + aid[:, None] * stride_bl + offs_d[None, :] * stride_bd
    for k in range(0, R):
        s_k = tl.load(a_row + k * stride_ar, mask=active, other=0.0).to(tl.float32)
        if HAS_ROW_IDS:
            b_k = tl.load(b_tile + k * stride_br, mask=mask & active[:, None], other=0.0)
        else:  # one adapter: B's column is the same for every row
            b_k = tl.load(b_ptr + offs_d * stride_bd + k * stride_br, mask=mask_d, other=0.0)[
                None, :
            ]
        acc += (scale * s_k)[:, None] * b_k.to(tl.float32)
        if pid_d == 0:
            tl.store(s_ptr + offs_m * stride_sm + k * stride_sr, s_k, mask=mask_m)
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lora_embedding_bwd_kernel(
    # pointers
    dy_ptr,
    ids_ptr,
    row_ids_ptr,
    b_ptr,
    s_ptr,
    scales_ptr,
    da_ptr,
    db_ptr,
    # sizes
    M,
    D,
    R,
    L,
    PADDING_IDX,
    # strides
    stride_dym,
    stride_dyd,
    stride_bl,
    stride_bd,
    stride_br,
    stride_sm,
    stride_sr,
    stride_dal,
    stride_dar,
    stride_dav,
    stride_dbl,
    stride_dbd,
    stride_dbr,
    # meta-parameters
    HAS_ROW_IDS: tl.constexpr,
    NEEDS_DA: tl.constexpr,
    NEEDS_DB: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_r = offs_r < R
    ids = tl.load(ids_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    if HAS_ROW_IDS:
        aid = tl.load(row_ids_ptr + offs_m, mask=mask_m, other=-1).to(tl.int64)
    else:
        aid = tl.zeros((BLOCK_M,), dtype=tl.int64)
    active = mask_m & (aid >= 0)
    aid = tl.maximum(aid, 0)
    scale = tl.load(scales_ptr + aid, mask=active, other=0.0)
    s = tl.load(
        s_ptr + offs_m[:, None] * stride_sm + offs_r[None, :] * stride_sr,
        mask=active[:, None] & mask_r[None, :],
        other=0.0,
    )
    s = s * scale[:, None]  # rows of other adapters and padding M rows are zero from here on

    t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        dy = tl.load(
            dy_ptr + offs_m[:, None] * stride_dym + offs_d[None, :] * stride_dyd,
            mask=active[:, None] & mask_d[None, :],
            other=0.0,
        ).to(tl.float32)
        if NEEDS_DA:
            b_mask = active[:, None, None] & mask_d[None, :, None] & mask_r[None, None, :]
            b = tl.load(
                b_ptr
                + aid[:, None, None] * stride_bl
                + offs_d[None, :, None] * stride_bd
                + offs_r[None, None, :] * stride_br,
                mask=b_mask,
                other=0.0,
            ).to(tl.float32)
            t += tl.sum(dy[:, :, None] * b, axis=1)
        if NEEDS_DB:
            db_mask = mask_d[:, None] & mask_r[None, :]
            if HAS_ROW_IDS:
                for a in range(0, L):
                    mine = (aid == a) & active
                    part = tl.sum(
                        tl.where(mine[:, None, None], dy[:, :, None] * s[:, None, :], 0.0), axis=0
                    )
                    db_ptrs = (
                        db_ptr
                        + a * stride_dbl
                        + offs_d[:, None] * stride_dbd
                        + offs_r[None, :] * stride_dbr
                    )
                    tl.atomic_add(db_ptrs, part, mask=db_mask)
            else:
                part = tl.sum(dy[:, :, None] * s[:, None, :], axis=0)
                db_ptrs = db_ptr + offs_d[:, None] * stride_dbd + offs_r[None, :] * stride_dbr
                tl.atomic_add(db_ptrs, part, mask=db_mask)
    if NEEDS_DA:
        keep = active & (ids != PADDING_IDX)
        da_ptrs = (
            da_ptr
            + aid[:, None] * stride_dal
            + offs_r[None, :] * stride_dar
            + ids[:, None] * stride_dav
        )
        tl.atomic_add(da_ptrs, t * scale[:, None], mask=keep[:, None] & mask_r[None, :])


def _rank_block(r: int) -> int:
    return max(2, triton.next_power_of_2(r))


@on_input_device
def lora_embedding_fwd(ids, weight, lora_a, lora_b, scales, row_ids=None, padding_idx=-1):
    """``y [M, D]`` in weight's dtype and ``S [M, R]`` fp32 (see the module docstring). Inputs
    are trusted (``lora_kernels._checks`` validated them); any strides."""
    m = ids.shape[0]
    d = weight.shape[1]
    num, r, _ = lora_a.shape
    y = torch.empty((m, d), dtype=weight.dtype, device=weight.device)
    s = torch.empty((m, r), dtype=torch.float32, device=weight.device)
    if m == 0:
        return y, s
    scales_t = torch.tensor(scales, dtype=torch.float32, device=weight.device)
    block_m, block_d = _INTERP_BLOCKS if interpreting() else _CUDA_BLOCKS
    grid = (triton.cdiv(m, block_m), max(1, triton.cdiv(d, block_d)))
    _lora_embedding_fwd_kernel[grid](
        ids, row_ids if row_ids is not None else ids, weight, lora_a, lora_b, scales_t, y, s,
        m, d, r,
        weight.stride(0), weight.stride(1),
        lora_a.stride(0), lora_a.stride(1), lora_a.stride(2),
        lora_b.stride(0), lora_b.stride(1), lora_b.stride(2),
        y.stride(0), y.stride(1), s.stride(0), s.stride(1),
        HAS_ROW_IDS=row_ids is not None,
        BLOCK_M=block_m,
        BLOCK_D=block_d,
    )  # fmt: skip
    return y, s


@on_input_device
def lora_embedding_bwd(
    dy,
    ids,
    weight,
    lora_a,
    lora_b,
    scales,
    row_ids,
    s,
    padding_idx=-1,
    *,
    needs_da=True,
    needs_db=True,
):
    """``(dA [L, R, V], dB [L, D, R])`` in the adapters' dtype (None where not needed)."""
    m, d = dy.shape
    num, r, v = lora_a.shape
    dev = dy.device
    da32 = torch.zeros((num, r, v), dtype=torch.float32, device=dev) if needs_da else None
    db32 = torch.zeros((num, d, r), dtype=torch.float32, device=dev) if needs_db else None
    if m and (needs_da or needs_db):
        scales_t = torch.tensor(scales, dtype=torch.float32, device=dev)
        block_m, block_d = _INTERP_BLOCKS if interpreting() else _CUDA_BWD_BLOCKS
        da_t = da32 if da32 is not None else s
        db_t = db32 if db32 is not None else s
        da_strides = (da_t.stride(0), da_t.stride(1), da_t.stride(2)) if needs_da else (0, 0, 0)
        db_strides = (db_t.stride(0), db_t.stride(1), db_t.stride(2)) if needs_db else (0, 0, 0)
        block_r = min(_rank_block(r), _INTERP_BWD_MAX_R if interpreting() else _CUDA_BWD_MAX_R)
        _lora_embedding_bwd_kernel[(triton.cdiv(m, block_m), triton.cdiv(r, block_r))](
            dy, ids, row_ids if row_ids is not None else ids, lora_b, s, scales_t, da_t, db_t,
            m, d, r, num, padding_idx,
            dy.stride(0), dy.stride(1),
            lora_b.stride(0), lora_b.stride(1), lora_b.stride(2),
            s.stride(0), s.stride(1),
            *da_strides, *db_strides,
            HAS_ROW_IDS=row_ids is not None,
            NEEDS_DA=needs_da,
            NEEDS_DB=needs_db,
            BLOCK_M=block_m,
            BLOCK_D=block_d,
            BLOCK_R=block_r,
        )  # fmt: skip
    da = da32.to(lora_a.dtype) if needs_da else None
    db = db32.to(lora_b.dtype) if needs_db else None
    return da, db
