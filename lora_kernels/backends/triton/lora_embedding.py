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
fp32 atomics, one adapter at a time, and only for the adapters the block's rows run: a mixed
batch of a few adapters among many slots adds nothing to the others), then scatters ``scale * T``
into A's columns of the block's ids with atomics (ids repeat: the atomics add them up). A's
gradient is therefore sparse in its columns, as ``F.embedding``'s is. Every sum is fp32 and each
gradient is rounded once. Under ``torch.use_deterministic_algorithms(True)`` no float atomics
run: the kernel stores ``scale * T`` per row, PyTorch's deterministic ``index_put_`` (accumulate)
scatters it into A's columns, and dB is one fp32 GEMM of dy with a one-hot expansion of S
(``[M, L * R]``: every adapter's rows in one ordered product).

Ids are never trusted on a GPU (the checks read them on CPU only): a token id outside ``[0, V)``
gives a zero row, no S and no gradient; an adapter id outside ``[0, L)`` acts as -1 (the base
row only), as in the multi-adapter linear kernels. Neither is ever used as an address.

Arguments: the table, the adapters, dy and the outputs are read through their strides; the id
vectors are made contiguous by the launcher (``_args.index_vector``: a decode slice
``input_ids[:, -1:]`` or a column of an id table is copied, a few bytes). One adapter's scale is a
kernel scalar; a mixed batch's scales are the ``[L]`` device tensor the op passes (made contiguous
and fp32 by the same rule, read by the kernel: never on the host), or, for a caller of the
launchers with a list, a device table built once per distinct list and reused, so no step
copies from the host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreting, on_input_device
from ._args import index_vector

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
def _row_ids(ids_ptr, row_ids_ptr, scales_ptr, scale0, offs_m, M, V, L, HAS_ROW_IDS: tl.constexpr):
    """Per row of the block: the token id (-1 when outside [0, V): the row contributes nothing),
    the adapter id clamped to a valid index, whether the row runs an adapter (an adapter id
    outside [0, L) acts as -1) and its scale (0 where it runs none)."""
    in_m = offs_m < M
    ids = tl.load(ids_ptr + offs_m, mask=in_m, other=-1).to(tl.int64)
    ids = tl.where((ids >= 0) & (ids < V), ids, -1)
    if HAS_ROW_IDS:
        aid = tl.load(row_ids_ptr + offs_m, mask=in_m, other=-1).to(tl.int64)
        active = in_m & (ids >= 0) & (aid >= 0) & (aid < L)
        aid = tl.where(active, aid, 0)
        scale = tl.load(scales_ptr + aid, mask=active, other=0.0)
    else:
        aid = tl.zeros_like(offs_m)
        active = in_m & (ids >= 0)
        scale = tl.where(active, scale0, 0.0)
    return ids, aid, active, scale


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
    V,
    L,
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
    # scalars
    scale0,
    # meta-parameters
    HAS_ROW_IDS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    ids, aid, active, scale = _row_ids(
        ids_ptr, row_ids_ptr, scales_ptr, scale0, offs_m, M, V, L, HAS_ROW_IDS
    )
    mask_m = (offs_m < M) & (ids >= 0)  # rows with a token id out of range read nothing
    ids = tl.maximum(ids, 0)
    mask_d = offs_d < D
    mask = mask_m[:, None] & mask_d[None, :]

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
            tl.store(s_ptr + offs_m * stride_sm + k * stride_sr, s_k, mask=offs_m < M)
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    # Rows with a token id out of range loaded nothing: their zeros are stored too.
    tl.store(
        out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & mask_d[None, :]
    )


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
    t_ptr,
    # sizes
    M,
    D,
    R,
    V,
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
    stride_tm,
    stride_tr,
    # scalars
    scale0,
    # meta-parameters
    HAS_ROW_IDS: tl.constexpr,
    NEEDS_DA: tl.constexpr,
    NEEDS_DB: tl.constexpr,
    SCATTER_DA: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """dA and dB of one block of rows for one slice of the rank (see the module docstring).
    ``SCATTER_DA`` adds ``scale * dy @ B`` into A's columns with atomics; without it the rows'
    values go to ``t`` [M, R] (zero for rows that give A nothing) for an ordered scatter."""
    pid_m = tl.program_id(0).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    ids, aid, active, scale = _row_ids(
        ids_ptr, row_ids_ptr, scales_ptr, scale0, offs_m, M, V, L, HAS_ROW_IDS
    )
    s = tl.load(
        s_ptr + offs_m[:, None] * stride_sm + offs_r[None, :] * stride_sr,
        mask=active[:, None] & mask_r[None, :],
        other=0.0,
    )
    s = s * scale[:, None]  # rows that run no adapter and padding M rows are zero from here on

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
                # Only the adapters this block's rows run, lowest first: the others get no
                # atomics (a mixed batch of few adapters among many slots adds nothing to them).
                a = tl.min(tl.where(active, aid, L), axis=0)
                while a < L:
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
                    a = tl.min(tl.where(active & (aid > a), aid, L), axis=0)
            else:
                if tl.max(active.to(tl.int32), axis=0) > 0:
                    part = tl.sum(dy[:, :, None] * s[:, None, :], axis=0)
                    db_ptrs = db_ptr + offs_d[:, None] * stride_dbd + offs_r[None, :] * stride_dbr
                    tl.atomic_add(db_ptrs, part, mask=db_mask)
    if NEEDS_DA:
        keep = active & (ids != PADDING_IDX)
        t = t * scale[:, None]
        if SCATTER_DA:
            da_ptrs = (
                da_ptr
                + aid[:, None] * stride_dal
                + offs_r[None, :] * stride_dar
                + ids[:, None] * stride_dav
            )
            tl.atomic_add(da_ptrs, t, mask=keep[:, None] & mask_r[None, :])
        else:
            t_ptrs = t_ptr + offs_m[:, None] * stride_tm + offs_r[None, :] * stride_tr
            t = tl.where(keep[:, None], t, 0.0)
            tl.store(t_ptrs, t, mask=(offs_m < M)[:, None] & mask_r[None, :])


def _rank_block(r: int) -> int:
    return max(2, triton.next_power_of_2(r))


# Per-adapter scales as a device vector, built once per (scales, device) and reused: a host copy
# in every forward and backward would cost a synchronising transfer per decode step and break
# CUDA-graph capture (the first call with new scales must run outside a capture, as autotuning).
_SCALE_TABLES: dict[tuple, torch.Tensor] = {}
_SCALE_TABLES_MAX = 256


def _scale_table(scales, device: torch.device) -> torch.Tensor:
    key = (tuple(float(v) for v in scales), device)
    table = _SCALE_TABLES.get(key)
    if table is None:
        if len(_SCALE_TABLES) >= _SCALE_TABLES_MAX:
            _SCALE_TABLES.pop(next(iter(_SCALE_TABLES)))
        table = torch.tensor(key[0], dtype=torch.float32, device=device)
        _SCALE_TABLES[key] = table
    return table


def _scale_args(scales, row_ids, device):
    """``(scales_ptr, scale0)``: one adapter takes its scale as a kernel scalar (no tensor at
    all; a tensor here is read on the host); a mixed batch reads its ``[L]`` tensor through the
    ``_args`` rule, or the cached table of a list."""
    if row_ids is None:
        return None, float(scales[0])
    if isinstance(scales, torch.Tensor):
        return index_vector(scales.to(torch.float32)), 0.0
    return _scale_table(scales, device), 0.0


@on_input_device
def lora_embedding_fwd(ids, weight, lora_a, lora_b, scales, row_ids=None, padding_idx=-1):
    """``y [M, D]`` in weight's dtype and ``S [M, R]`` fp32 (see the module docstring).

    Inputs are trusted (``lora_kernels._checks`` validated them on CPU); any strides. Ids the
    checks cannot see on a GPU are masked, never dereferenced: a token id outside ``[0, V)``
    gives a zero row (and no gradient), an adapter id outside ``[0, L)`` acts as -1 (the base
    row only).
    """
    m = ids.shape[0]
    v, d = weight.shape
    num, r, _ = lora_a.shape
    y = torch.empty((m, d), dtype=weight.dtype, device=weight.device)
    s = torch.empty((m, r), dtype=torch.float32, device=weight.device)
    if m == 0:
        return y, s
    ids, row_ids = index_vector(ids), index_vector(row_ids)
    scales_t, scale0 = _scale_args(scales, row_ids, weight.device)
    block_m, block_d = _INTERP_BLOCKS if interpreting() else _CUDA_BLOCKS
    grid = (triton.cdiv(m, block_m), max(1, triton.cdiv(d, block_d)))
    _lora_embedding_fwd_kernel[grid](
        ids, row_ids if row_ids is not None else ids, weight, lora_a, lora_b,
        scales_t if scales_t is not None else s, y, s,
        m, d, r, v, num,
        weight.stride(0), weight.stride(1),
        lora_a.stride(0), lora_a.stride(1), lora_a.stride(2),
        lora_b.stride(0), lora_b.stride(1), lora_b.stride(2),
        y.stride(0), y.stride(1), s.stride(0), s.stride(1),
        scale0,
        HAS_ROW_IDS=row_ids is not None,
        BLOCK_M=block_m,
        BLOCK_D=block_d,
    )  # fmt: skip
    return y, s


def _ordered_db(dy, s, row_ids, scales_t, scale0, num):
    """dB without atomics (deterministic mode): ``dB[a] = dy^T (scale_a S masked to a's rows)``
    for every adapter as one fp32 GEMM over a one-hot ``[M, L * R]`` expansion of S (no host
    synchronisation, no per-adapter launch)."""
    m, r = s.shape
    dyf = dy.float()
    if row_ids is None:
        return (dyf.T @ s).mul_(scale0).unsqueeze(0)
    aid = row_ids.long()
    onehot = (aid[:, None] == torch.arange(num, device=s.device)[None, :]).float()
    z = (onehot * scales_t[None, :])[:, :, None] * s[:, None, :]
    return (dyf.T @ z.reshape(m, num * r)).view(-1, num, r).permute(1, 0, 2)


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
    """``(dA [L, R, V], dB [L, D, R])`` in the adapters' dtype (None where not needed).

    Under ``torch.use_deterministic_algorithms(True)`` no float atomics run: the kernel writes
    ``scale * dy @ B`` per row and A's columns get them through ``index_put_`` with
    accumulation (PyTorch's deterministic scatter), and dB is one ordered GEMM.
    """
    m, d = dy.shape
    num, r, v = lora_a.shape
    dev = dy.device
    da32 = torch.zeros((num, r, v), dtype=torch.float32, device=dev) if needs_da else None
    db32 = torch.zeros((num, d, r), dtype=torch.float32, device=dev) if needs_db else None
    if m and (needs_da or needs_db):
        ids, row_ids = index_vector(ids), index_vector(row_ids)
        scales_t, scale0 = _scale_args(scales, row_ids, dev)
        deterministic = torch.are_deterministic_algorithms_enabled()
        t = torch.empty((m, r), dtype=torch.float32, device=dev) if deterministic else s
        kernel_db = needs_db and not deterministic
        block_m, block_d = _INTERP_BLOCKS if interpreting() else _CUDA_BWD_BLOCKS
        da_t = da32 if da32 is not None else s
        db_t = db32 if kernel_db else s
        da_strides = (da_t.stride(0), da_t.stride(1), da_t.stride(2)) if needs_da else (0, 0, 0)
        db_strides = (db_t.stride(0), db_t.stride(1), db_t.stride(2)) if kernel_db else (0, 0, 0)
        block_r = min(_rank_block(r), _INTERP_BWD_MAX_R if interpreting() else _CUDA_BWD_MAX_R)
        if needs_da or kernel_db:
            _lora_embedding_bwd_kernel[(triton.cdiv(m, block_m), triton.cdiv(r, block_r))](
                dy, ids, row_ids if row_ids is not None else ids, lora_b, s,
                scales_t if scales_t is not None else s, da_t, db_t, t,
                m, d, r, v, num, padding_idx,
                dy.stride(0), dy.stride(1),
                lora_b.stride(0), lora_b.stride(1), lora_b.stride(2),
                s.stride(0), s.stride(1),
                *da_strides, *db_strides,
                t.stride(0), t.stride(1),
                scale0,
                HAS_ROW_IDS=row_ids is not None,
                NEEDS_DA=needs_da,
                NEEDS_DB=kernel_db,
                SCATTER_DA=not deterministic,
                BLOCK_M=block_m,
                BLOCK_D=block_d,
                BLOCK_R=block_r,
            )  # fmt: skip
        if needs_da and deterministic:
            # Rows that give A nothing hold zeros in t; their indices are clamped into range.
            col = ids.clamp(0, v - 1)
            aid = row_ids.long().clamp(0, num - 1) if row_ids is not None else torch.zeros_like(col)
            rank = torch.arange(r, device=dev)
            da32.index_put_((aid[:, None], rank[None, :], col[:, None]), t, accumulate=True)
        if needs_db and deterministic:
            db32 = _ordered_db(dy, s, row_ids, scales_t, scale0, num)
    da = da32.to(lora_a.dtype) if needs_da else None
    db = db32.to(lora_b.dtype) if needs_db else None
    return da, db
