"""Single-adapter fused LoRA linear in Triton: forward and backward.

Formula and shapes (``r`` is any rank 1..256)::

    x [M, K], weight [N, K], bias [N] or None, lora_a [r, K], lora_b [N, r], x_lora [M, K] or x
    S  = x_lora @ lora_a.T                                   [M, r]  fp32, saved for the backward
    y  = x @ weight.T + bias + scale * S @ lora_b.T          [M, N]  x.dtype
    T  = dy @ lora_b                                         [M, r]  fp32
    dx = dy @ weight + scale * T @ lora_a                    [M, K]  (x_lora None)
    dx = dy @ weight,  dx_lora = scale * T @ lora_a                  (x_lora given: PEFT dropout)
    dA = scale * T.T @ x_lora                                [r, K]  lora_a.dtype
    dB = scale * dy.T @ S                                    [N, r]  lora_b.dtype

Four kernels do all of it.

``_lora_gemm_kernel`` is the big GEMM, ``out = x @ w.T (+ bias)``, with the LoRA term added to
its fp32 accumulator before the single rounding store, so neither ``x @ w.T`` nor the LoRA product
is ever written as its own tensor. The forward calls it with ``w = weight`` above the decode rows
(M > 16); the backward calls it for dx with ``w = weight.T`` and ``lora_b = lora_a.T`` (only
strides change). The LoRA term comes in one of two ways, chosen by shape:

* fused shrink (M <= 64, r <= 32 and at most two N blocks): S accumulates in the same K-loop as
  the base product, from the x tile already in registers and a [BLOCK_K, r] slice of lora_a; one
  launch in all. Every N-block program recomputes the same S and re-reads lora_a (r * K) for it:
  r / BLOCK_N more bytes than the weight stream, which bounds a decode step. The traffic count
  (``tools/traffic_cases.py``, CUDA tiles, K = N = 4096, fp16, r = 16, 16x64x128 tile) measured
  1.259x the compulsory bytes at M = 1, lora_a read 64 times; so only narrow layers (N up to
  two blocks, where one launch saved matters more than a second read of lora_a) keep it, at any
  M up to 64. The programs of the first N-block column store S.
* precomputed S (every other shape): a skinny launch computes S first, reading x and lora_a
  once, then the GEMM epilogue reads its [BLOCK_M, r] rows (fp32, r * 4 bytes a row, per N
  block). Once the GEMM is compute bound the recomputation would cost up to r / BLOCK_N of it,
  whereas S on its own is r / N of the GEMM's work. Large ranks also do not fit an
  [BLOCK_M, r] accumulator next to the main one, so the epilogue walks r in BLOCK_R chunks.

Decode (M <= 16, not a narrow fused-shrink layer) is memory bound: its time is the bytes it
moves. After the skinny S launch, ``_lora_splitk_kernel`` computes fp32 partials of x @ w.T on
a grid of (N tiles) x (K splits), and ``_lora_splitk_finish_kernel`` adds them, the LoRA expand
``scale * S @ lora_b.T`` (once) and the bias, and rounds once into y. x is read once per N tile
column whatever the split (M / BLOCK_N of the weight's bytes); the partials cost splits * M * N *
4 bytes of atomics (or stores) plus one read. With P programs over an N x K weight, the excess
P * M * (2 * K_split + 4 * BLOCK_N) bytes is least at BLOCK_N ~ sqrt(N * K / (2P)): 252 at
K = N = 4096 and P = 132, hence 256-wide N tiles and 8 splits (128 programs, one wave of an H100;
the old 16x64 tile gave 64 programs and read x 64 times). The split count fills one wave of SMs
(a second, partial wave would only wait), is at most the K tiles, and keeps the partials within
1/16 of the weight's bytes. Atomics add the partials into a zeroed [M, N] fp32 buffer; under
``torch.use_deterministic_algorithms(True)`` each split stores its own [M, N] slice and the finish
pass adds them in split order (the same bits every call). Counted (``python -m
tools.traffic_cases lora_linear --m M --k 4096 --n N --r R --sample 8``, CUDA tiles, fp16, moved
/ compulsory in 32-byte sectors, the buffer's atomics and read included; the buffer's zero fill,
a memset of M * N * 4 bytes the counter does not see, adds 0.008 at M = 16, N = 4096):

    shape (K = 4096)     before (16x64x128 GEMM)   after (256-wide split-K)   programs
    M=1  N=4096  r=16    1.016                     1.008                      64 -> 16 x 8
    M=1  N=4096  r=64    1.016                     1.009                      64 -> 16 x 8
    M=16 N=4096  r=16    1.250                     1.134 (x 17x, buffer 7 %)  64 -> 16 x 8
    M=16 N=4096  r=64    1.255                     1.139                      64 -> 16 x 8
    M=1  N=14336 r=16    1.016                     1.005                      224 -> 56 x 2
    M=1  N=14336 r=64    1.016                     1.006                      224 -> 56 x 2
    M=16 N=14336 r=16    1.250                     1.087                      224 -> 56 x 2
    M=16 N=14336 r=64    1.254                     1.090                      224 -> 56 x 2

A 128-wide tile would read x twice as often (M = 16: +12.5 % of the weight against +6.25 %);
512-wide ones would need 16 splits to fill the GPU, whose partials cost more than the x they
save. At M = 1, N = 1024 the grid went from 16 programs to 4 x 32.

``_lora_skinny_kernel`` computes the small products, ``out[P, R] = scale * L[P, Q] @ Z[Q, R]``
with R <= 256 and a long reduction over Q: S (L = x_lora, Z = lora_a.T), dB (L = dy.T, Z = S) and
dA.T (L = x_lora.T, Z = T). When the grid over (P, R) blocks would leave most of the GPU idle, Q
is split among programs that add their partial sums with fp32 atomics.

The backward is three launches and reads dy twice, once of them inside the dx GEMM, which has to
read it anyway:

1. one pass over dy: each program holds a [BLOCK_P, BLOCK_Q] tile of dy.T and takes from it both
   its dB partial (tile @ S) and its T partial (tile.T @ lora_b), adding T across N-blocks with
   fp32 atomics (T is tiny: M * r). A separate T launch would read all of dy once more.
2. dx: the GEMM above over dy with the T epilogue (or T @ lora_a into dx_lora).
3. dA from T and x_lora.

Under ``torch.use_deterministic_algorithms(True)`` no atomics are used: no Q split, and T gets a
launch of its own.

Precision (the package's policy, README "Precision"): every product accumulates in fp32 and
each output is rounded once, at its store. A 16-bit layer (fp16/bf16 activations) multiplies on
tensor cores in its own dtype: the base GEMM, and every LoRA product, whose fp32 operands (the
intermediates S and T, and fp32 adapters, PEFT's default on a 16-bit base) are rounded to the
activation dtype right before the dot. That is what PEFT computes under autocast, so the
tolerance rule's stock-PyTorch baseline is that computation (tests/test_triton_lora_linear.py);
S itself, saved for the backward, stays fp32. An fp32 layer uses 3xTF32 dots
(``input_precision="tf32x3"``, about fp32 accuracy). Triton 3.9's interpreter returns garbage
for ``tl.dot`` on bf16 operands, so under the interpreter (and only there) the ``UPCAST_DOTS``
constexpr upcasts the rounded operands to fp32; on a GPU bf16 dots stay bf16.

On CUDA the GEMM is autotuned over a short config list, keyed by a power-of-two bucket of M so
that varying token counts do not retune every step; the first call of each new key times a few
configs (keep it out of CUDA-graph capture, or set ``LORA_KERNELS_TRITON_AUTOTUNE=0`` to take the
first candidate config untimed). The skinny kernel takes fixed tiles and a split count sized to
the SM count. Under the interpreter both use one small fixed config.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ... import envs
from . import interpreting, on_input_device
from ._args import vector_stride
from ._rounding import interpreted_round

__all__ = ["lora_linear_fwd", "lora_linear_bwd"]


# How the GEMM gets its LoRA term.
_LORA_FUSED_SHRINK: tl.constexpr = tl.constexpr(1)
_LORA_FROM_S: tl.constexpr = tl.constexpr(2)

# Largest M and rank for which the GEMM recomputes S in its own K-loop (see the module docstring).
_FUSED_SHRINK_MAX_M = 64
# A [BLOCK_M, 64] S accumulator and a [BLOCK_K, 64] lora_a tile beside the main ones spilled
# 216-260 B in every small-M tile on one target or the other (compile gate, whole matrix): ranks
# 33-64 take the precomputed-S path, whose epilogue walks r in chunks of 32.
_FUSED_SHRINK_MAX_R = 32
# ... and for at most this many N blocks of the small-M tiles' width: each of them reads lora_a
# once more (r / BLOCK_N of the weight's bytes).
_FUSED_SHRINK_MAX_N_BLOCKS = 2
_SMALL_M_BLOCK_N = 64


# --------------------------------------------------------------------------------------------
# Dot helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def _mma(a, b, acc, UPCAST_DOTS: tl.constexpr, ACT: tl.constexpr):
    """``acc + a @ b`` under the precision policy, ``ACT`` being the layer's activation dtype.

    A 16-bit layer rounds both operands to ACT (fp32 intermediates S and T, and fp32 adapters,
    included) and multiplies them on tensor cores with fp32 accumulation, as PEFT computes under
    autocast. An fp32 layer multiplies in 3xTF32 (about fp32 accuracy on tensor cores). Under the
    interpreter, the operands are rounded as a GPU rounds them and upcast to fp32 (its bf16 dot is
    broken; ``_rounding.py``).
    One function rather than nested helpers, because the interpreter pays for every jit call.
    """
    if ACT == tl.float32:  # noqa: SIM300 - ACT is the constexpr parameter
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="tf32x3")
    elif UPCAST_DOTS:
        acc = tl.dot(interpreted_round(a, ACT), interpreted_round(b, ACT), acc)
    else:
        acc = tl.dot(a.to(ACT), b.to(ACT), acc)
    return acc


@triton.jit
def _expand_from_s(
    acc, s_ptr, b_ptr, offs_m, offs_n, offs_r, mask_m, mask_n, R,
    stride_sm, stride_sr, stride_bn, stride_br,
    UPCAST_DOTS: tl.constexpr, ACT: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """``acc + S[offs_m] @ b[offs_n].T`` with S read from ``s_ptr`` in ``BLOCK_R`` rank chunks
    (``offs_r = arange(BLOCK_R)``), each a ``_mma`` under the precision policy of ``ACT``; the
    caller applies the scale once the sum is complete (PEFT scales after lora_B)."""
    for r0 in range(0, R, BLOCK_R):
        mask_r = (r0 + offs_r) < R
        s_ptrs = s_ptr + offs_m[:, None] * stride_sm + (r0 + offs_r)[None, :] * stride_sr
        s_tile = tl.load(s_ptrs, mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        b_ptrs = b_ptr + (r0 + offs_r)[:, None] * stride_br + offs_n[None, :] * stride_bn
        b_tile = tl.load(b_ptrs, mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        acc = _mma(s_tile, b_tile, acc, UPCAST_DOTS, ACT)
    return acc


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _lora_gemm_kernel(
    # pointers
    x_ptr,
    w_ptr,
    bias_ptr,
    xl_ptr,
    a_ptr,
    s_ptr,
    b_ptr,
    out_ptr,
    out_lora_ptr,
    # sizes
    M,
    N,
    K,
    R,
    m_bucket,  # power-of-two bucket of M: the autotuning key, unused in the body
    # strides
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_xlm,
    stride_xlk,
    stride_ar,
    stride_ak,
    stride_sm,
    stride_sr,
    stride_bn,
    stride_br,
    stride_om,
    stride_on,
    stride_olm,
    stride_oln,
    stride_bias,
    # scalars
    scale,
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    LORA_MODE: tl.constexpr,
    HAS_XL: tl.constexpr,
    SPLIT_LORA_OUT: tl.constexpr,
    UPCAST_DOTS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] tile of ``x @ w.T + bias + scale * S @ b.T``.

    LORA_MODE: _LORA_FUSED_SHRINK (S = xl @ a.T accumulated in the K-loop, BLOCK_R >= R; stored
    to s_ptr by the first N-block column) or _LORA_FROM_S (S read from s_ptr in BLOCK_R chunks).
    SPLIT_LORA_OUT writes the LoRA term to out_lora instead of adding it to out.
    """
    # Grouped tile order: GROUP_M row-blocks share each weight column-block while it is in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = (first_pid_m + (pid % num_pid_in_group) % group_size_m).to(tl.int64)
    pid_n = ((pid % num_pid_in_group) // group_size_m).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_n = offs_n < N

    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
    mask_out = mask_m[:, None] & mask_n[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # The LoRA term is scale * (S @ b.T), scaled once its dot is complete: PEFT multiplies by the
    # scale after lora_B, and S * scale rounded to 16 bits for the dot could overflow where S
    # does not. A precomputed S is expanded first, straight into the accumulator the K-loop then
    # adds to: no second [BLOCK_M, BLOCK_N] accumulator live beside the main one (it spilled
    # 312 B in the 128x128 tile on sm_80). A split LoRA term (dx_lora) has its own accumulator
    # after the K-loop instead: expanded first, stored and reset, it spilled 8-40 B in the 16x64
    # decode tile at rank 40 on sm_90.
    if LORA_MODE == _LORA_FROM_S and not SPLIT_LORA_OUT:
        acc = _expand_from_s(
            acc, s_ptr, b_ptr, offs_m, offs_n, offs_r, mask_m, mask_n, R,
            stride_sm, stride_sr, stride_bn, stride_br,
            UPCAST_DOTS, x_ptr.dtype.element_ty, BLOCK_R,
        )  # fmt: skip
        acc = acc * scale
    if LORA_MODE == _LORA_FUSED_SHRINK:
        a_ptrs = a_ptr + offs_k[:, None] * stride_ak + offs_r[None, :] * stride_ar
        s_acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        if HAS_XL:
            xl_ptrs = xl_ptr + offs_m[:, None] * stride_xlm + offs_k[None, :] * stride_xlk

    for k0 in range(0, K, BLOCK_K):
        mask_k = (k0 + offs_k) < K
        x_tile = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w_tile = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = _mma(x_tile, w_tile, acc, UPCAST_DOTS, x_ptr.dtype.element_ty)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
        if LORA_MODE == _LORA_FUSED_SHRINK:
            a_tile = tl.load(a_ptrs, mask=mask_k[:, None] & (offs_r < R)[None, :], other=0.0)
            a_ptrs += BLOCK_K * stride_ak
            if HAS_XL:
                xl_tile = tl.load(xl_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
                xl_ptrs += BLOCK_K * stride_xlk
                s_acc = _mma(xl_tile, a_tile, s_acc, UPCAST_DOTS, x_ptr.dtype.element_ty)
            else:
                s_acc = _mma(x_tile, a_tile, s_acc, UPCAST_DOTS, x_ptr.dtype.element_ty)

    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n * stride_bias, mask=mask_n, other=0.0)
        acc += bias.to(tl.float32)[None, :]

    # A fused S is complete only after the K-loop: its term takes an accumulator of its own
    # (the small-M tiles that fuse it have room: 8 registers a thread at 16x64 with 4 warps).
    if LORA_MODE == _LORA_FUSED_SHRINK:
        mask_r = offs_r < R
        if pid_n == 0:
            s_ptrs = s_ptr + offs_m[:, None] * stride_sm + offs_r[None, :] * stride_sr
            tl.store(s_ptrs, s_acc, mask=mask_m[:, None] & mask_r[None, :])
        b_ptrs = b_ptr + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn
        b_tile = tl.load(b_ptrs, mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        lora_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        lora_acc = _mma(s_acc, b_tile, lora_acc, UPCAST_DOTS, x_ptr.dtype.element_ty) * scale
        if SPLIT_LORA_OUT:
            ol_ptrs = out_lora_ptr + offs_m[:, None] * stride_olm + offs_n[None, :] * stride_oln
            tl.store(ol_ptrs, lora_acc.to(out_lora_ptr.dtype.element_ty), mask=mask_out)
        else:
            acc += lora_acc
    if LORA_MODE == _LORA_FROM_S and SPLIT_LORA_OUT:
        lora_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        lora_acc = _expand_from_s(
            lora_acc, s_ptr, b_ptr, offs_m, offs_n, offs_r, mask_m, mask_n, R,
            stride_sm, stride_sr, stride_bn, stride_br,
            UPCAST_DOTS, x_ptr.dtype.element_ty, BLOCK_R,
        )  # fmt: skip
        ol_ptrs = out_lora_ptr + offs_m[:, None] * stride_olm + offs_n[None, :] * stride_oln
        tl.store(ol_ptrs, (lora_acc * scale).to(out_lora_ptr.dtype.element_ty), mask=mask_out)
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_out)


@triton.jit
def _lora_skinny_kernel(
    # pointers
    l_ptr,
    z_ptr,
    out_ptr,
    z2_ptr,
    out2_ptr,
    # sizes
    P,
    Q,
    R,
    q_per_split,  # a multiple of BLOCK_Q, so no tile straddles two splits
    # strides
    stride_lp,
    stride_lq,
    stride_zq,
    stride_zr,
    stride_op,
    stride_or,
    stride_z2p,
    stride_z2r,
    stride_o2q,
    stride_o2r,
    # scalars
    scale,
    # meta-parameters
    HAS_OUT: tl.constexpr,
    ATOMIC_OUT: tl.constexpr,
    HAS_OUT2: tl.constexpr,
    UPCAST_DOTS: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """One [BLOCK_P, BLOCK_R] tile of ``out = scale * L @ Z`` over one split of Q.

    ATOMIC_OUT adds the partial sum into an fp32 ``out`` (Q split among programs) instead of
    storing it. HAS_OUT2 also adds ``L.T @ Z2`` (Z2 [P, R]) into the fp32 ``out2`` [Q, R] with
    atomics: the programs of every P-block contribute to each of its rows.
    """
    pid_p = tl.program_id(0).to(tl.int64)
    pid_r = tl.program_id(1).to(tl.int64)
    pid_q = tl.program_id(2).to(tl.int64)

    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_q = tl.arange(0, BLOCK_Q)
    mask_p = offs_p < P
    mask_r = offs_r < R
    q_start = pid_q * q_per_split
    q_end = min(q_start + q_per_split, Q)

    acc = tl.zeros((BLOCK_P, BLOCK_R), dtype=tl.float32)
    if HAS_OUT2:
        # The Z2 tile depends on the P- and R-blocks only: load it once for the whole Q loop.
        z2_ptrs = z2_ptr + offs_p[:, None] * stride_z2p + offs_r[None, :] * stride_z2r
        z2_tile = tl.load(z2_ptrs, mask=mask_p[:, None] & mask_r[None, :], other=0.0)

    for q0 in range(q_start, q_end, BLOCK_Q):
        q = q0 + offs_q
        mask_q = q < Q
        l_ptrs = l_ptr + offs_p[:, None] * stride_lp + q[None, :] * stride_lq
        l_tile = tl.load(l_ptrs, mask=mask_p[:, None] & mask_q[None, :], other=0.0)
        if HAS_OUT:
            z_ptrs = z_ptr + q[:, None] * stride_zq + offs_r[None, :] * stride_zr
            z_tile = tl.load(z_ptrs, mask=mask_q[:, None] & mask_r[None, :], other=0.0)
            acc = _mma(l_tile, z_tile, acc, UPCAST_DOTS, l_ptr.dtype.element_ty)
        if HAS_OUT2:
            part = tl.zeros((BLOCK_Q, BLOCK_R), dtype=tl.float32)
            part = _mma(tl.trans(l_tile), z2_tile, part, UPCAST_DOTS, l_ptr.dtype.element_ty)
            o2_ptrs = out2_ptr + q[:, None] * stride_o2q + offs_r[None, :] * stride_o2r
            tl.atomic_add(o2_ptrs, part, mask=mask_q[:, None] & mask_r[None, :], sem="relaxed")

    if HAS_OUT:
        out_ptrs = out_ptr + offs_p[:, None] * stride_op + offs_r[None, :] * stride_or
        mask_out = mask_p[:, None] & mask_r[None, :]
        if ATOMIC_OUT:
            tl.atomic_add(out_ptrs, acc * scale, mask=mask_out, sem="relaxed")
        else:
            tl.store(out_ptrs, (acc * scale).to(out_ptr.dtype.element_ty), mask=mask_out)


@triton.jit
def _lora_splitk_kernel(
    # pointers
    x_ptr,
    w_ptr,
    ws_ptr,
    # sizes
    M,
    N,
    K,
    k_per_split,  # a multiple of BLOCK_K, so no tile straddles two splits
    # strides
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_wss,
    stride_wsm,
    stride_wsn,
    # meta-parameters
    ATOMIC: tl.constexpr,
    UPCAST_DOTS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One split's fp32 partial of ``x @ w.T`` for a [BLOCK_M >= M, BLOCK_N] tile (decode).

    Program (n, s) reduces K over ``[s * k_per_split, (s + 1) * k_per_split)``; ATOMIC adds the
    partial into ``ws[0]`` (zeroed), else stores it to ``ws[s]`` (a fixed-order sum follows).
    """
    pid_n = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    k_start = pid_s * k_per_split
    k_end = min(k_start + k_per_split, K)

    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + (k_start + offs_k)[None, :] * stride_xk
    w_ptrs = w_ptr + (k_start + offs_k)[:, None] * stride_wk + offs_n[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        mask_k = (k0 + offs_k) < K
        x_tile = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w_tile = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = _mma(x_tile, w_tile, acc, UPCAST_DOTS, x_ptr.dtype.element_ty)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    mask_out = mask_m[:, None] & mask_n[None, :]
    ws_ptrs = ws_ptr + offs_m[:, None] * stride_wsm + offs_n[None, :] * stride_wsn
    if ATOMIC:
        tl.atomic_add(ws_ptrs, acc, mask=mask_out, sem="relaxed")
    else:
        tl.store(ws_ptrs + pid_s * stride_wss, acc, mask=mask_out)


@triton.jit
def _lora_splitk_finish_kernel(
    # pointers
    ws_ptr,
    s_ptr,
    b_ptr,
    bias_ptr,
    out_ptr,
    # sizes
    M,
    N,
    R,
    splits,  # the partial sums in ws to add: 1 after atomics, the split count otherwise
    # strides
    stride_wss,
    stride_wsm,
    stride_wsn,
    stride_sm,
    stride_sr,
    stride_bn,
    stride_br,
    stride_om,
    stride_on,
    stride_bias,
    # scalars
    scale,
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    UPCAST_DOTS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """``out = sum_s ws[s] + bias + scale * S @ b.T`` for a [BLOCK_M >= M, BLOCK_N] tile.

    The LoRA expand and the bias are added here, once, in the order of the GEMM epilogue
    (expand first, then the base product), and the sum is rounded once at the store; the splits
    are added in index order, so without atomics the result is the same bits every call.
    """
    pid_n = tl.program_id(0).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask_out = mask_m[:, None] & mask_n[None, :]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _expand_from_s(
        acc, s_ptr, b_ptr, offs_m, offs_n, offs_r, mask_m, mask_n, R,
        stride_sm, stride_sr, stride_bn, stride_br,
        UPCAST_DOTS, out_ptr.dtype.element_ty, BLOCK_R,
    )  # fmt: skip
    acc = acc * scale
    ws_ptrs = ws_ptr + offs_m[:, None] * stride_wsm + offs_n[None, :] * stride_wsn
    for _ in range(0, splits):
        acc += tl.load(ws_ptrs, mask=mask_out, other=0.0)
        ws_ptrs += stride_wss
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n * stride_bias, mask=mask_n, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_out)


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------


def _cfg(block_m, block_n, block_k, warps, stages):
    meta = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8}
    return triton.Config(meta, num_warps=warps, num_stages=stages)


# Keyed by (small M, fp32 layer). Small M streams the weight: narrow N tiles for many programs
# and deep K pipelines. Large M is compute bound: big tiles for tensor-core reuse. fp32 tiles get
# a shorter BLOCK_K. The compile gate (tests/test_triton_compile.py, whole matrix in
# benchmarks/triton_compile_report.py) holds every 16-bit entry to zero spills on sm_80 and sm_90.
# What it measured and these lists answer: on odd K/N (no divisibility hints, e.g. 4099 x 32001)
# the precomputed-S epilogue spilled 1,240 B at 64x128x64 with 4 warps and 184 B at 128x128x64
# (sm_90), and a 128x256 tile 300-2,900 B on both targets; the 64-deep K tiles of 4 warps and the
# 128x256 tile are gone, 8 warps or BLOCK_K 32 are spill-free there. The whole matrix then found
# the 16x32x256 decode tile spilling 8-24 B on sm_90 in the precomputed-S epilogue of dx (weight
# read transposed): 16x64x64 takes its place.
_GEMM_CONFIGS = {
    (True, False): [
        _cfg(16, 64, 128, 4, 4),
        _cfg(16, 64, 64, 4, 4),
        _cfg(32, 64, 128, 4, 4),
        _cfg(64, 64, 64, 4, 4),
    ],
    (False, False): [
        _cfg(64, 128, 32, 4, 4),
        _cfg(64, 128, 64, 8, 3),
        _cfg(128, 128, 32, 8, 3),
    ],
    (True, True): [_cfg(16, 64, 64, 4, 4), _cfg(64, 64, 32, 4, 4)],
    (False, True): [_cfg(64, 128, 32, 4, 4), _cfg(128, 128, 32, 8, 3)],
}


def _gemm_candidates(m_bucket: int, x, a, b, split_lora_out: bool) -> list[triton.Config]:
    """The configs of a call's (M bucket, operand width), of a height M can use."""
    small = m_bucket <= _FUSED_SHRINK_MAX_M
    # The activations' width: fp32 adapters on a 16-bit layer are rounded to 16 bits for their
    # dots (the precision policy), so they keep the 16-bit tiles.
    wide = x.element_size() == 4
    kept = _GEMM_CONFIGS[(small, wide)]
    if split_lora_out:
        kept = [c for c in kept if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 128 * 128]
    if small:
        kept = [c for c in kept if c.kwargs["BLOCK_M"] <= max(16, m_bucket)] or kept
    return kept


def _prune_gemm_configs(configs, named_args, **kwargs):
    candidates = _gemm_candidates(
        named_args["m_bucket"],
        named_args["x_ptr"],
        named_args["a_ptr"],
        named_args["b_ptr"],
        kwargs.get("SPLIT_LORA_OUT", False),
    )
    return [c for c in candidates if c in configs]


def _autotune_enabled() -> bool:
    """``LORA_KERNELS_TRITON_AUTOTUNE=0`` takes each call's first candidate config untimed."""
    return envs.triton_autotune()


def _tuning_bench(kernel_call, quantiles):
    """Shorter timing runs than Triton's default: at most 4 configs, each a sub-ms kernel."""
    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


# Tuning results persist in Triton's cache directory, so a restarted job does not retune.
_lora_gemm_tuned = triton.autotune(
    configs=[c for group in _GEMM_CONFIGS.values() for c in group],
    key=["m_bucket", "N", "K", "R", "LORA_MODE", "HAS_XL", "SPLIT_LORA_OUT", "HAS_BIAS"],
    prune_configs_by={"early_config_prune": _prune_gemm_configs},
    do_bench=_tuning_bench,
    cache_results=True,
)(_lora_gemm_kernel)

# Under the interpreter: one small config, still smaller than the odd test sizes so that tiles
# straddle every ragged edge.
_INTERP_GEMM_META = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 4}
_INTERP_SKINNY_BLOCKS = (64, 64)  # BLOCK_P, BLOCK_Q
_CUDA_SKINNY_BLOCKS = (64, 64)
_CUDA_SKINNY_META = {"num_warps": 4, "num_stages": 3}
# Interpreter "SM count": small, so that the tests reach the Q-split (atomic) path.
_INTERP_TARGET_PROGRAMS = 4


# The split-K decode GEMM (M <= _DECODE_MAX_M; the module docstring has the counts behind the
# tiles), keyed by fp32 layer. A 256-wide N tile halves x's re-reads against 128 (x is read once
# per N tile column: M / BLOCK_N of the weight's bytes). BLOCK_K 32 with 8 warps: the 64-deep
# tile with 4 warps spilled 1,304 B (M = 1) and 11,400 B (M = 16) on sm_90 at odd K / N (no
# divisibility hints, no async copies: the W tiles sit in registers), 0 here on both targets;
# the 32-deep rows are still whole sectors (64 bytes). An fp32 layer's 3xTF32 dots keep a
# 128-wide tile.
_DECODE_MAX_M = 16
_DECODE_META = {
    False: {"BLOCK_M": 16, "BLOCK_N": 256, "BLOCK_K": 32, "num_warps": 8, "num_stages": 4},
    True: {"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 32, "num_warps": 4, "num_stages": 3},
}
# The finish pass: 128-wide tiles (32 programs at N = 4096, each reading S once: r * M * 4 bytes).
# It has no K-loop accumulator beside its rank chunks, so 32-wide chunks stay spill-free at odd
# ranks too (compile gate, r 7 to 200, both targets).
_DECODE_FINISH_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 128}
_DECODE_FINISH_LAUNCH = {"num_warps": 4, "num_stages": 2}
# Under the interpreter: narrow tiles and a small "SM count", so that the odd test sizes get
# several N tiles and several K splits.
_INTERP_DECODE_META = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64}
_INTERP_DECODE_PROGRAMS = 16
# The split reduction moves splits * M * N * 4 bytes (fp32 partials): at most 1/16 of the
# weight's bytes, however few programs that leaves.
_DECODE_REDUCTION_SHARE = 16

# R-chunk of the precomputed-S epilogue on CUDA: its S and lora_b tiles (and the hi/lo halves)
# sit next to the big accumulator, so keep them small.
_CUDA_EPILOGUE_MAX_R = 32
# ... and 16 for a rank that is not a multiple of 16 (no divisibility hint on S's and lora_b's
# rank strides): the 32-wide chunk spilled 56 B in the 64x128x32 4-warp tile at rank 40 (bf16
# layer, fp32 adapters, sm_90).
_CUDA_EPILOGUE_ODD_MAX_R = 16
_SKINNY_MAX_R = 64
_SKINNY_ODD_MAX_R = 32


def _rank_pad(r: int) -> int:
    """Rank padded to a power of two >= 16, the smallest tl.dot dimension."""
    return max(16, triton.next_power_of_2(r))


def _epilogue_max_r(r: int) -> int:
    """The R-chunk of a precomputed S's epilogue on CUDA (see _CUDA_EPILOGUE_ODD_MAX_R)."""
    return _CUDA_EPILOGUE_MAX_R if r % 16 == 0 else _CUDA_EPILOGUE_ODD_MAX_R


def _use_fused_shrink(m: int, r: int, n: int) -> bool:
    """Recompute S inside the GEMM's K-loop (one launch) rather than in its own launch: only
    where few N blocks would re-read lora_a for it (the module docstring has the counts)."""
    narrow = n <= _FUSED_SHRINK_MAX_N_BLOCKS * _SMALL_M_BLOCK_N
    return m <= _FUSED_SHRINK_MAX_M and r <= _FUSED_SHRINK_MAX_R and narrow


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _target_programs(device: torch.device) -> int:
    """Programs the skinny kernel aims for before it splits its reduction: two waves of SMs."""
    if device.type != "cuda" or interpreting():
        return _INTERP_TARGET_PROGRAMS
    index = device.index if device.index is not None else torch.cuda.current_device()
    return 2 * _sm_count(index)


def _decode_programs(device: torch.device) -> int:
    """Programs the split-K decode GEMM aims for: one wave of SMs (each streams its own slice
    of the weight; a second partial wave would only wait for the first)."""
    if interpreting():
        return _INTERP_DECODE_PROGRAMS
    index = 0
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
    return _sm_count(index)


def _decode_splits(m: int, n: int, k: int, w_bytes: int, device, meta) -> tuple[int, int]:
    """(splits, k_per_split) of the decode GEMM: enough K splits to fill the GPU, no more than
    the K tiles, and no more than keep the fp32 partials within 1/_DECODE_REDUCTION_SHARE of the
    weight's bytes (``w_bytes`` a weight element)."""
    block_k = meta["BLOCK_K"]
    k_blocks = triton.cdiv(k, block_k)
    n_tiles = triton.cdiv(n, meta["BLOCK_N"])
    splits = _decode_programs(device) // n_tiles
    splits = min(splits, k_blocks, (k * w_bytes) // (4 * _DECODE_REDUCTION_SHARE * m))
    splits = max(1, splits)
    k_per_split = max(1, triton.cdiv(k_blocks, splits)) * block_k
    return max(1, triton.cdiv(k, k_per_split)), k_per_split


# --------------------------------------------------------------------------------------------
# Launch helpers
# --------------------------------------------------------------------------------------------


def _launch_decode(x, w, bias, s, b, out, scale, *, deterministic: bool) -> None:
    """``out = x @ w.T + bias + scale * s @ b.T`` for M <= _DECODE_MAX_M, split over K.

    x [M, K], w [N, K], bias [N] or None, s [M, R] fp32, b [N, R], out [M, N], any strides.
    Two launches: the split GEMM's fp32 partials (atomics into one zeroed [M, N] buffer, or,
    ``deterministic``, each split into its own slice of [splits, M, N]), then one pass that adds
    them with the LoRA expand and the bias and rounds into ``out``. The buffer's size depends
    on the shapes only (capture-safe), and nothing is read back to the host.
    """
    m, k = x.shape
    n = w.shape[0]
    r = b.shape[1]
    upcast = interpreting()
    meta = _INTERP_DECODE_META if upcast else _DECODE_META[x.element_size() == 4]
    splits, k_per_split = _decode_splits(m, n, k, w.element_size(), x.device, meta)
    atomic = splits > 1 and not deterministic
    if atomic:
        ws = torch.zeros((1, m, n), dtype=torch.float32, device=x.device)
    else:
        ws = torch.empty((splits, m, n), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(n, meta["BLOCK_N"]), splits)
    _lora_splitk_kernel[grid](
        x, w, ws,
        m, n, k, k_per_split,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1),
        ws.stride(0), ws.stride(1), ws.stride(2),
        ATOMIC=atomic,
        UPCAST_DOTS=upcast,
        **meta,
    )  # fmt: skip
    block_r = min(_rank_pad(r), _SKINNY_MAX_R if upcast else _CUDA_EPILOGUE_MAX_R)
    _lora_splitk_finish_kernel[(triton.cdiv(n, _DECODE_FINISH_BLOCKS["BLOCK_N"]),)](
        ws, s, b, bias if bias is not None else out, out,
        m, n, r, 1 if atomic else splits,
        ws.stride(0), ws.stride(1), ws.stride(2), s.stride(0), s.stride(1),
        b.stride(0), b.stride(1), out.stride(0), out.stride(1), vector_stride(bias),
        float(scale),
        HAS_BIAS=bias is not None,
        UPCAST_DOTS=upcast,
        BLOCK_R=block_r,
        **_DECODE_FINISH_BLOCKS,
        **({} if upcast else _DECODE_FINISH_LAUNCH),
    )  # fmt: skip


def _launch_gemm(x, w, bias, xl, a, s, b, out, out_lora, scale, lora_mode) -> None:
    """``out = x @ w.T (+ bias)`` plus the LoRA term of ``lora_mode`` (see _lora_gemm_kernel).

    x [M, K], w [N, K], bias [N], xl [M, K], a [R, K], s [M, R] fp32, b [N, R], out and
    out_lora [M, N], any strides; what the mode does not read may be None.
    """
    m, k = x.shape
    n = w.shape[0]
    r = b.shape[1]
    upcast = interpreting()
    if lora_mode == _LORA_FUSED_SHRINK.value:
        block_r = _rank_pad(r)
    else:
        block_r = min(_rank_pad(r), _SKINNY_MAX_R if upcast else _epilogue_max_r(r))
    # Tuned once per power of two of M (capped): token counts vary from call to call.
    m_bucket = min(triton.next_power_of_2(m), 4096)
    # Pointers a mode never dereferences still need a tensor to pass.
    bias_t = bias if bias is not None else out
    xl_t = xl if xl is not None else x
    a_t = a if a is not None else b
    s_t = s if s is not None else out
    ol_t = out_lora if out_lora is not None else out
    args = (
        x, w, bias_t, xl_t, a_t, s_t, b, out, ol_t,
        m, n, k, r, m_bucket,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1),
        xl_t.stride(0), xl_t.stride(1), a_t.stride(0), a_t.stride(1),
        s_t.stride(0), s_t.stride(1), b.stride(0), b.stride(1),
        out.stride(0), out.stride(1), ol_t.stride(0), ol_t.stride(1), vector_stride(bias),
        float(scale),
    )  # fmt: skip
    flags = {
        "HAS_BIAS": bias is not None,
        "LORA_MODE": lora_mode,
        "HAS_XL": xl is not None,
        "SPLIT_LORA_OUT": out_lora is not None,
        "UPCAST_DOTS": upcast,
        "BLOCK_R": block_r,
    }
    if upcast:
        meta = _INTERP_GEMM_META
        grid = (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
        _lora_gemm_kernel[grid](*args, **flags, **meta)
        return

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    if _autotune_enabled():
        _lora_gemm_tuned[grid](*args, **flags)
        return
    config = _gemm_candidates(m_bucket, x, a_t, b, out_lora is not None)[0]
    meta = {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}
    _lora_gemm_kernel[grid(meta)](*args, **flags, **meta)


def _launch_skinny(l_mat, z, out, scale, *, z2=None, out2=None, deterministic=False) -> None:
    """``out = scale * l_mat @ z`` and ``out2 += l_mat.T @ z2``, reduced over l_mat's columns.

    l_mat [P, Q], z [Q, R], out [P, R] (any dtype, any strides; None when only out2 is wanted),
    z2 [P, R], out2 a zeroed fp32 [Q, R]. ``deterministic`` keeps each reduction in one program
    (no atomics on ``out``; out2, always added with atomics, is then not to be used).
    """
    p, q = l_mat.shape
    r = (z if z is not None else z2).shape[1]
    if q == 0:
        if out is not None:
            out.zero_()
        return
    if p == 0:
        return
    upcast = interpreting()
    block_p, block_q = _INTERP_SKINNY_BLOCKS if upcast else _CUDA_SKINNY_BLOCKS
    # a rank that is not a multiple of 16 (no hint on the rank strides): 64-wide rank tiles
    # spilled 204-2,292 B at rank 40 (sm_90)
    block_r = min(_rank_pad(r), _SKINNY_MAX_R if r % 16 == 0 else _SKINNY_ODD_MAX_R)
    tiles = triton.cdiv(p, block_p) * triton.cdiv(r, block_r)
    q_blocks = triton.cdiv(q, block_q)
    # Splitting Q costs out2 nothing (each split owns its rows of it) and out one atomic add per
    # element and split.
    splits = 1
    if not deterministic:
        splits = max(1, min(q_blocks, _target_programs(l_mat.device) // tiles))
    q_per_split = triton.cdiv(q_blocks, splits) * block_q
    splits = triton.cdiv(q, q_per_split)

    # A split reduction adds fp32 partial sums: straight into an fp32 output, else into a buffer
    # that is rounded into the output once at the end.
    target = out
    if out is not None and splits > 1:
        if out.dtype == torch.float32:
            out.zero_()
        else:
            target = torch.zeros(out.shape, dtype=torch.float32, device=out.device)
    out_t = target if target is not None else l_mat
    z_t = z if z is not None else l_mat
    z2_t = z2 if z2 is not None else l_mat
    out2_t = out2 if out2 is not None else l_mat
    grid = (triton.cdiv(p, block_p), triton.cdiv(r, block_r), splits)
    _lora_skinny_kernel[grid](
        l_mat, z_t, out_t, z2_t, out2_t,
        p, q, r, q_per_split,
        l_mat.stride(0), l_mat.stride(1), z_t.stride(0), z_t.stride(1),
        out_t.stride(0), out_t.stride(1), z2_t.stride(0), z2_t.stride(1),
        out2_t.stride(0), out2_t.stride(1),
        float(scale),
        HAS_OUT=out is not None,
        ATOMIC_OUT=splits > 1,
        HAS_OUT2=out2 is not None,
        UPCAST_DOTS=upcast,
        BLOCK_P=block_p,
        BLOCK_Q=block_q,
        BLOCK_R=block_r,
        **({} if upcast else _CUDA_SKINNY_META),
    )  # fmt: skip
    if target is not out:
        out.copy_(target)


# --------------------------------------------------------------------------------------------
# Public launchers
# --------------------------------------------------------------------------------------------


@on_input_device
def lora_linear_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    x_lora: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``y = x @ weight.T + bias + scale * (x_lora @ lora_a.T) @ lora_b.T`` and ``S``.

    x [M, K] (any strides), weight [N, K], bias [N] or None (x's dtype, fp32/fp16/bf16),
    lora_a [r, K], lora_b [N, r] (x's dtype or fp32), 1 <= r <= 256, x_lora [M, K] or None: the
    LoRA branch's input (PEFT's dropout output), None meaning x.

    Returns ``y`` [M, N] contiguous in x.dtype and ``S = x_lora @ lora_a.T`` [M, r] float32,
    saved for :func:`lora_linear_bwd`. The inputs are trusted (``lora_kernels._checks`` validated
    them before dispatch).
    """
    m, k = x.shape
    n, r = lora_b.shape

    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    s = torch.empty((m, r), dtype=torch.float32, device=x.device)
    if m == 0:
        return y, s
    if n > 0 and _use_fused_shrink(m, r, n):
        _launch_gemm(x, weight, bias, x_lora, lora_a, s, lora_b, y, None, scale,
                     _LORA_FUSED_SHRINK.value)  # fmt: skip
        return y, s
    xl = x if x_lora is None else x_lora
    _launch_skinny(
        xl, lora_a.t(), s, 1.0, deterministic=torch.are_deterministic_algorithms_enabled()
    )
    if n > 0 and m <= _DECODE_MAX_M:
        _launch_decode(x, weight, bias, s, lora_b, y, scale,
                       deterministic=torch.are_deterministic_algorithms_enabled())  # fmt: skip
    elif n > 0:
        _launch_gemm(x, weight, bias, None, None, s, lora_b, y, None, scale, _LORA_FROM_S.value)
    return y, s


@on_input_device
def lora_linear_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    s: torch.Tensor,
    scale: float,
    x_lora: torch.Tensor | None = None,
    *,
    needs_dx: bool = True,
    needs_da: bool = True,
    needs_db: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of :func:`lora_linear_fwd` for the upstream ``dy`` [M, N] (any strides).

    ``s`` is the float32 [M, r] the forward returned. With ``T = dy @ lora_b``::

        x_lora None:   dx = dy @ weight + scale * T @ lora_a,   dx_lora = None
        x_lora given:  dx = dy @ weight,   dx_lora = scale * T @ lora_a
                       (the caller chains dx_lora through its dropout mask into x's gradient)
        da = scale * T.T @ x_lora     [r, K] in lora_a.dtype
        db = scale * dy.T @ s         [N, r] in lora_b.dtype

    Returns ``(dx, dx_lora, da, db)``; dx and dx_lora are None unless ``needs_dx``, da unless
    ``needs_da``, db unless ``needs_db``.
    """
    m, k = x.shape
    n, r = lora_b.shape

    dev = x.device
    dx = torch.empty((m, k), dtype=x.dtype, device=dev) if needs_dx else None
    dx_lora = None
    if needs_dx and x_lora is not None:
        dx_lora = torch.empty((m, k), dtype=x_lora.dtype, device=dev)
    da = torch.empty((r, k), dtype=lora_a.dtype, device=dev) if needs_da else None
    db = torch.empty((n, r), dtype=lora_b.dtype, device=dev) if needs_db else None
    if m == 0:
        for grad in (da, db):
            if grad is not None:
                grad.zero_()
        return dx, dx_lora, da, db

    deterministic = torch.are_deterministic_algorithms_enabled()
    t = None
    if needs_dx or needs_da:
        t = torch.zeros((m, r), dtype=torch.float32, device=dev)
    # 1. dB and T from one pass over dy (T added across N-blocks with atomics).
    if deterministic:
        # No atomics: T and dB each reduce in single programs, in launches of their own.
        if t is not None:
            _launch_skinny(dy, lora_b, t, 1.0, deterministic=True)
        if needs_db:
            _launch_skinny(dy.t(), s, db, scale, deterministic=True)
    elif needs_db or t is not None:
        _launch_skinny(dy.t(), s if needs_db else None, db, scale,
                       z2=lora_b if t is not None else None, out2=t)  # fmt: skip
    # 2. dx: the base GEMM over dy with T @ lora_a in its epilogue.
    if needs_dx:
        _launch_gemm(dy, weight.t(), None, None, None, t, lora_a.t(), dx, dx_lora, scale,
                     _LORA_FROM_S.value)  # fmt: skip
    # 3. dA from T and the LoRA branch's input.
    if needs_da:
        xl = x if x_lora is None else x_lora
        _launch_skinny(xl.t(), t, da.t(), scale, deterministic=deterministic)
    return dx, dx_lora, da, db
