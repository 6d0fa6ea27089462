"""LoRA linear on a 4-bit (NF4 / FP4) base weight in Triton, forward and backward.

Formula and shapes (the spec is ``reference.qlora_linear``)::

    x [M, K], x_lora [M, K] or x, lora_a [r, K], lora_b [N, r], bias [N] or None
    W [N, K] = dequantize(qweight, absmax, code (, absmax2, code2, offset))   never materialised
    S  = x_lora @ lora_a.T                                      [M, r]  fp32, kept for backward
    y  = x @ W.T + bias + scale * S @ lora_b.T                  [M, N]  x.dtype
    dx = dy @ W + scale * (dy @ lora_b) @ lora_a                [M, K]  (dx_lora apart with dropout)
    dA = scale * (dy @ lora_b).T @ x_lora,  dB = scale * dy.T @ S      (stock GEMMs: tiny)

The weight is read as bitsandbytes stores it (``quantize_4bit``): element ``i = n * K + k`` is the
nibble ``qweight[i // 2] >> 4`` (even i) or ``& 0xF`` (odd i), an index into the 16-entry fp32
``code``, times the fp32 ``absmax[i // BLOCKSIZE]``; with double quantization that maximum is
itself ``code2[absmax[j]] * absmax2[j // BLOCKSIZE2] + offset``. No repacking: the flat index
makes odd K (a byte straddling two rows) and partial blocks come out right without special cases.

Decode (M <= 16, even K) is memory-bound: its time is the bytes it moves, so it is built to move
each operand once. ``_qlora_shrink_kernel`` computes ``S = x_lora @ lora_a.T`` (x_lora and lora_a
read once; K split over a few programs whose fp32 partials add with atomics, one program under
deterministic mode). ``_qlora_decode_kernel`` streams the weight over a grid of (M tiles, N
tiles, K splits): each program owns [16, BLOCK_N] of y over one split of K (whole quantization
blocks of every row), loads each packed byte of its rows once (K tiles of 64 columns, 32 bytes:
one sector per row) and splits it in registers into the even and odd columns of W, which
multiply the even and odd columns of the x tile (split in registers as well); the 16 code
entries are scalars of the program, picked by a select tree on the nibble's bits; the block
maxima (with double quantization their code2/absmax2 decoding) are loaded and decoded once per
row and chunk of blocks into a [BLOCK_N, CHUNK_BLOCKS] register table, from which each K tile
takes its one or two columns. With one split and a rank block up to 64 the epilogue adds
``scale * S @ lora_b.T`` (S precomputed: a few bytes, not lora_a per N tile) and the bias and
writes y; otherwise the programs store fp32 partials [splits, M, N] and
``_qlora_split_reduce_kernel`` adds them in split order (no atomics: the same bits on every run,
deterministic mode included), then the LoRA expand and the bias, once per output.

Why wide tiles and splits (``_decode_plan``): on top of each operand once, a decode moves x once
per N tile, ``(n_tiles - 1) * M * K * 2`` bytes (the weight is half a byte per element, so at M =
16 a 32-wide tile reads as many x bytes as weight bytes), and, when split, ``2 * splits * M * N
* 4`` bytes of fp32 workspace. The plan takes the width (64 or 128) and split count that move
the fewest bytes among those giving at least three quarters of a wave of programs. Both excess
terms grow with M at fixed programs P = n_tiles * splits, and their product is fixed by P, so
the excess cannot go below ``16 * M / sqrt(N * K / P)`` of the weight bytes (x: ``4 M /
BLOCK_N``, workspace: ``16 M / (K / splits)``): at K = N = 4096, M = 16 and P = 128 that is 0.71,
and <= 1.20 at M = 16 would need 10-14 programs on 132 SMs. Bytes moved over the compulsory bytes
(each operand read once, each output written once), counted by ``tools/traffic.py`` in 32-byte
sectors with the CUDA tile configs (132 SMs), fp16, r = 16, double quantization, blocksize 64
(``python -m tools.traffic_cases qlora --m M --k K --n N --r 16 --quant Q --sample 8``; 2-core
CPU VM, shared)::

    M   K x N          quant   fused fwd     shrink + decode      wide + split-K (this)
                               16x32x32      16x32x64, no split   plan: tile, splits, programs
    1   4096 x 4096    NF4     7.199         1.149                1.083   64, 2, 128
    1   4096 x 14336   NF4     7.282         1.151                1.076   64, 1, 224
    1   14336 x 4096   NF4     7.446         1.152                1.099   64, 2, 128
    16  4096 x 4096    NF4     8.732         2.871                1.807   128, 4, 128
    16  4096 x 14336   NF4                                        1.590   128, 1, 112
    16  14336 x 4096   NF4                                        1.664   128, 4, 128

FP4 moves the same bytes (the codes change, not the addresses: 1.091 / 1.734 for both at
M = 1 / 16, K = N = 4096, with the 16-block chunks of commit 4c54c42, which also gave M = 2:
1.135, M = 4: 1.222, M = 8: 1.396 there; the 8-block chunks that the sm_80 gate asked for add
about 0.07 at M = 16).

What remains: x per N tile (above), the workspace, the uint8 block maxima of the 128-wide tile
read four times (an 8-block chunk is a quarter sector per row: 16 and 32 blocks spill; the plan
counts these bytes too, so M = 1 takes the 64-wide tile) and the 1 KB code2 table gathered once
per chunk. The 1.20 target holds to M = 2-3 at these shapes;
from M = 4 it needs fewer programs than SMs (a wave with most SMs idle), which this plan does not
trade for bytes. Odd K (a byte straddling two rows) and prefill take ``_qlora_fwd_kernel``.

``_qlora_fwd_kernel``: one launch, one pass over K. Each program owns a [BLOCK_M, BLOCK_N] tile of
y; in its K-loop it loads the x tile once, dequantizes the matching [BLOCK_N, BLOCK_K] tile of W
in registers (fp32, rounded once to x's dtype: the weight bitsandbytes' matmul multiplies by) and
accumulates ``x @ W.T`` in fp32; the same x tile (or x_lora's) also accumulates S against a
[BLOCK_R, BLOCK_K] slice of lora_a. After the loop the LoRA term ``scale * S @ lora_b.T`` goes
into the same fp32 accumulator, the bias too, and y is rounded once. The weight streams from HBM
at half a byte per element (plus 4 bytes of absmax per block, or 1 byte nested); lora_a is re-read
by every N-tile program, from L2 (r * K elements), which is what a separate shrink launch would
avoid at decode sizes, for the price of a second launch. The programs of the first N-tile column
store S.

``_qlora_dx_kernel``: the same structure transposed, for ``dx = dy @ W``: programs own [BLOCK_M,
BLOCK_K] tiles of dx and loop over N, dequantizing W tiles [BLOCK_N, BLOCK_K] in the same
orientation, while ``dy @ lora_b`` accumulates beside; ``scale * (dy @ lora_b) @ lora_a`` is added
at the end (or stored as dx_lora when PEFT's dropout feeds the LoRA branch another input).

Triton 3.9's interpreter returns garbage for ``tl.dot`` on bf16 operands and truncates fp32 to
bf16, so under the interpreter (and only there) ``INTERPRET`` upcasts dot operands to fp32 and
rounds bf16 conversions to nearest even on the bits, as a GPU converts.

Precision (the package's policy, README "Precision"): every dot multiplies in the activations'
dtype with fp32 accumulation. On a 16-bit layer the LoRA operands (fp32 adapters, PEFT's QLoRA
default, and the fp32 ``S`` and ``dy @ lora_b``) are rounded to that dtype right before their
tensor-core dot, as PEFT computes them under autocast; fp32 layers use ``"ieee"`` dots, or TF32
where ``torch.backends.cuda.matmul.allow_tf32`` allows it. The nested absmax is
decoded with fp contraction off, so ``code2 * absmax2 + offset`` rounds twice as bitsandbytes'
does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import envs
from . import interpreting, on_input_device
from ._args import index_vector, vector_stride
from ._rounding import round_to_bf16

# ------------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------------


@triton.jit
def _dequant_tile(
    # pointers
    qw_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr,
    # the tile: rows n [BN], columns k [BK] of W [N, K]
    offs_n, offs_k, K, mask,
    # meta-parameters
    BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
):  # fmt: skip
    """fp32 W[offs_n, offs_k] from bitsandbytes' packed bytes (zero where masked)."""
    idx = offs_n.to(tl.int64)[:, None] * K + offs_k[None, :]
    packed = tl.load(qw_ptr + (idx >> 1), mask=mask, other=0).to(tl.int32)
    nibble = tl.where((idx & 1) == 0, packed >> 4, packed & 0xF)
    value = tl.load(code_ptr + nibble)
    block = idx // BLOCKSIZE
    if NESTED:
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale2 = tl.load(absmax2_ptr + block // BLOCKSIZE2, mask=mask, other=0.0)
        amax = tl.load(code2_ptr + q) * scale2 + tl.load(offset_ptr)
    else:
        amax = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return tl.where(mask, value * amax, 0.0)


@triton.jit
def _cast(v, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """``v.to(dtype)``, rounding to nearest even: the interpreter truncates fp32 to bf16, so there
    the rounding is done on the bits (``_rounding.py``; a GPU rounds to nearest even itself)."""
    if INTERPRET and dtype == tl.bfloat16 and v.dtype == tl.float32:
        return round_to_bf16(v)
    return v.to(dtype)


@triton.jit
def _dot(a, b, acc, INTERPRET: tl.constexpr, PRECISION: tl.constexpr):
    if INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _qlora_fwd_kernel(
    # pointers
    x_ptr, xl_ptr, qw_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr,
    bias_ptr, a_ptr, b_ptr, y_ptr, s_ptr,
    # sizes
    M, N, K, R, m_bucket,
    # strides
    stride_xm, stride_xk, stride_xlm, stride_xlk, stride_ar, stride_ak, stride_bn, stride_br,
    stride_ym, stride_yn, stride_sm, stride_sr, stride_bias,
    # scalars
    scale,
    # meta-parameters
    BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_XL: tl.constexpr, INTERPRET: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    m_ok = offs_m < M
    n_ok = offs_n < N
    r_ok = offs_r < R
    x_dtype = x_ptr.dtype.element_ty

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    s_acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        xm = m_ok[:, None] & k_ok[None, :]
        x_tile = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=xm, other=0.0
        )
        w = _dequant_tile(
            qw_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr,
            offs_n, offs_k, K, n_ok[:, None] & k_ok[None, :],
            BLOCKSIZE, BLOCKSIZE2, NESTED,
        )  # fmt: skip
        acc = _dot(x_tile, tl.trans(_cast(w, x_dtype, INTERPRET)), acc, INTERPRET, PRECISION)
        if HAS_XL:
            xl_tile = tl.load(
                xl_ptr + offs_m[:, None] * stride_xlm + offs_k[None, :] * stride_xlk,
                mask=xm,
                other=0.0,
            )
        else:
            xl_tile = x_tile
        a_tile = tl.load(
            a_ptr + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak,
            mask=k_ok[:, None] & r_ok[None, :],
            other=0.0,
        )  # [BLOCK_K, BLOCK_R]
        s_acc = _dot(xl_tile, _cast(a_tile, x_dtype, INTERPRET), s_acc, INTERPRET, PRECISION)

    b_tile = tl.load(
        b_ptr + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn,
        mask=r_ok[:, None] & n_ok[None, :],
        other=0.0,
    )  # [BLOCK_R, BLOCK_N]
    s_dot = _cast(s_acc * scale, x_dtype, INTERPRET)
    acc = _dot(s_dot, _cast(b_tile, x_dtype, INTERPRET), acc, INTERPRET, PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n * stride_bias, mask=n_ok, other=0.0).to(tl.float32)[
            None, :
        ]
    tl.store(
        y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
        _cast(acc, y_ptr.dtype.element_ty, INTERPRET),
        mask=m_ok[:, None] & n_ok[None, :],
    )
    if pid_n == 0:
        tl.store(
            s_ptr + offs_m[:, None] * stride_sm + offs_r[None, :] * stride_sr,
            s_acc,
            mask=m_ok[:, None] & r_ok[None, :],
        )


@triton.jit
def _qlora_dx_kernel(
    # pointers
    dy_ptr, qw_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr,
    a_ptr, b_ptr, dx_ptr, dxl_ptr,
    # sizes
    M, N, K, R, m_bucket,
    # strides
    stride_dym, stride_dyn, stride_ar, stride_ak, stride_bn, stride_br,
    stride_dxm, stride_dxk, stride_dxlm, stride_dxlk,
    # scalars
    scale,
    # meta-parameters
    BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
    SPLIT_LORA: tl.constexpr, INTERPRET: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    m_ok = offs_m < M
    k_ok = offs_k < K
    r_ok = offs_r < R
    dy_dtype = dy_ptr.dtype.element_ty

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    u_acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        dy_tile = tl.load(
            dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
            mask=m_ok[:, None] & n_ok[None, :],
            other=0.0,
        )
        w = _dequant_tile(
            qw_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr,
            offs_n, offs_k, K, n_ok[:, None] & k_ok[None, :],
            BLOCKSIZE, BLOCKSIZE2, NESTED,
        )  # fmt: skip
        acc = _dot(dy_tile, _cast(w, dy_dtype, INTERPRET), acc, INTERPRET, PRECISION)
        b_tile = tl.load(
            b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
            mask=n_ok[:, None] & r_ok[None, :],
            other=0.0,
        )  # [BLOCK_N, BLOCK_R]
        u_acc = _dot(dy_tile, _cast(b_tile, dy_dtype, INTERPRET), u_acc, INTERPRET, PRECISION)

    a_tile = _cast(
        tl.load(
            a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
            mask=r_ok[:, None] & k_ok[None, :],
            other=0.0,
        ),
        dy_dtype,
        INTERPRET,
    )  # [BLOCK_R, BLOCK_K]
    u = _cast(u_acc * scale, dy_dtype, INTERPRET)
    out_mask = m_ok[:, None] & k_ok[None, :]
    if SPLIT_LORA:
        lora = _dot(u, a_tile, tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32), INTERPRET, PRECISION)
        tl.store(
            dxl_ptr + offs_m[:, None] * stride_dxlm + offs_k[None, :] * stride_dxlk,
            _cast(lora, dxl_ptr.dtype.element_ty, INTERPRET),
            mask=out_mask,
        )
    else:
        acc = _dot(u, a_tile, acc, INTERPRET, PRECISION)
    tl.store(
        dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk,
        _cast(acc, dx_ptr.dtype.element_ty, INTERPRET),
        mask=out_mask,
    )


@triton.jit
def _qlora_shrink_kernel(
    # pointers
    x_ptr, a_ptr, s_ptr,
    # sizes
    M, K, R, k_per_split,
    # strides
    stride_xm, stride_xk, stride_ar, stride_ak, stride_sm, stride_sr,
    # meta-parameters
    ATOMIC: tl.constexpr, INTERPRET: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """``S = x @ lora_a.T`` (fp32) over one split of K: stored, or added with atomics into a
    zeroed S when K is split. x and lora_a are each read once over the grid."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    m_ok = offs_m < M
    r_ok = offs_r < R
    x_dtype = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    k_start = pid_k * k_per_split
    k_end = min(k_start + k_per_split, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < k_end
        x_tile = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=m_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        a_tile = tl.load(
            a_ptr + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak,
            mask=k_ok[:, None] & r_ok[None, :],
            other=0.0,
        )  # [BLOCK_K, BLOCK_R]
        acc = _dot(x_tile, _cast(a_tile, x_dtype, INTERPRET), acc, INTERPRET, PRECISION)
    s_ptrs = s_ptr + offs_m[:, None] * stride_sm + offs_r[None, :] * stride_sr
    s_mask = m_ok[:, None] & r_ok[None, :]
    if ATOMIC:
        tl.atomic_add(s_ptrs, acc, mask=s_mask, sem="relaxed")
    else:
        tl.store(s_ptrs, acc, mask=s_mask)


@triton.jit
def _lookup16(nibble, c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15):
    """``code[nibble]`` from the 16 entries held as scalars: a select tree over the nibble's
    bits (15 selects), no memory access per weight."""
    b0 = (nibble & 1) != 0
    b1 = (nibble & 2) != 0
    b2 = (nibble & 4) != 0
    b3 = (nibble & 8) != 0
    q0 = tl.where(b1, tl.where(b0, c3, c2), tl.where(b0, c1, c0))
    q1 = tl.where(b1, tl.where(b0, c7, c6), tl.where(b0, c5, c4))
    q2 = tl.where(b1, tl.where(b0, c11, c10), tl.where(b0, c9, c8))
    q3 = tl.where(b1, tl.where(b0, c15, c14), tl.where(b0, c13, c12))
    return tl.where(b3, tl.where(b2, q3, q2), tl.where(b2, q1, q0))


@triton.jit
def _dequant_nibble(
    nibble, ok, amax, c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15
):
    """``code[nibble] * amax`` where ``ok``, else 0: one 4-bit weight of a packed byte decoded
    (``_lookup16``) and scaled by its block maximum; the decode kernel applies it to the byte's
    high nibble (the even column) and its low nibble (the odd one)."""
    return tl.where(
        ok,
        _lookup16(nibble, c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15)
        * amax,
        0.0,
    )


@triton.jit
def _column(table, cols, c):
    """``table[i, c[i]]`` for a register table [BN, C] and per-row columns c [BN] (exact: one
    term of the sum is non-zero)."""
    return tl.sum(tl.where(cols[None, :] == c[:, None], table, 0.0), axis=1)


@triton.jit
def _qlora_decode_kernel(
    # pointers
    x_ptr, qw_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr,
    bias_ptr, b_ptr, s_ptr, y_ptr, ws_ptr,
    # sizes
    M, N, K, R, m_bucket, k_per_split,
    # strides
    stride_xm, stride_xk, stride_bn, stride_br, stride_sm, stride_sr, stride_ym, stride_yn,
    stride_bias, stride_wss, stride_wsm,
    # scalars
    scale,
    # meta-parameters
    BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
    HAS_BIAS: tl.constexpr, INTERPRET: tl.constexpr, PRECISION: tl.constexpr,
    CHUNK_BLOCKS: tl.constexpr, CHUNK_K: tl.constexpr, PARTIAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """``y = x @ W.T + bias + scale * S @ lora_b.T`` for even K, S precomputed (the shrink);
    with PARTIAL only ``x[:, ks] @ W[:, ks].T`` over this program's split ks of K (grid axis 2,
    ``k_per_split`` columns, a multiple of BLOCKSIZE), stored in fp32 to ``ws[split]`` for
    ``_qlora_split_reduce_kernel``.

    Each packed byte is loaded once and split in registers into its two 4-bit values, the even
    and odd columns of W, which multiply the even and odd columns of the x tile (split in
    registers too). The 16 code entries are scalars of the program; the block maxima of the
    program's rows are loaded and decoded CHUNK_BLOCKS blocks per row at a time (one 32-byte
    sector of uint8 absmax per row) and picked per K tile from registers. BLOCK_K <= BLOCKSIZE,
    so a row's K tile spans at most two quantization blocks.
    """
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    pid_k = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, BLOCK_K // 2)  # byte j of a row's K tile holds columns 2j and 2j + 1
    offs_c = tl.arange(0, CHUNK_BLOCKS)
    m_ok = offs_m < M
    n_ok = offs_n < N
    x_dtype = x_ptr.dtype.element_ty

    code_vec = tl.load(code_ptr + tl.arange(0, 16))
    idx16 = tl.arange(0, 16)
    c0 = tl.sum(tl.where(idx16 == 0, code_vec, 0.0), axis=0)
    c1 = tl.sum(tl.where(idx16 == 1, code_vec, 0.0), axis=0)
    c2 = tl.sum(tl.where(idx16 == 2, code_vec, 0.0), axis=0)
    c3 = tl.sum(tl.where(idx16 == 3, code_vec, 0.0), axis=0)
    c4 = tl.sum(tl.where(idx16 == 4, code_vec, 0.0), axis=0)
    c5 = tl.sum(tl.where(idx16 == 5, code_vec, 0.0), axis=0)
    c6 = tl.sum(tl.where(idx16 == 6, code_vec, 0.0), axis=0)
    c7 = tl.sum(tl.where(idx16 == 7, code_vec, 0.0), axis=0)
    c8 = tl.sum(tl.where(idx16 == 8, code_vec, 0.0), axis=0)
    c9 = tl.sum(tl.where(idx16 == 9, code_vec, 0.0), axis=0)
    c10 = tl.sum(tl.where(idx16 == 10, code_vec, 0.0), axis=0)
    c11 = tl.sum(tl.where(idx16 == 11, code_vec, 0.0), axis=0)
    c12 = tl.sum(tl.where(idx16 == 12, code_vec, 0.0), axis=0)
    c13 = tl.sum(tl.where(idx16 == 13, code_vec, 0.0), axis=0)
    c14 = tl.sum(tl.where(idx16 == 14, code_vec, 0.0), axis=0)
    c15 = tl.sum(tl.where(idx16 == 15, code_vec, 0.0), axis=0)
    if NESTED:
        offset = tl.load(offset_ptr)

    row0 = offs_n.to(tl.int64) * K  # flat index of each row's first element
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # A split starts on a block boundary of every row (k_per_split is a multiple of BLOCKSIZE),
    # so its chunks straddle blocks as the chunks from column 0 do.
    k_start = pid_k * k_per_split
    k_end = min(k_start + k_per_split, K)
    for ks in range(k_start, k_end, CHUNK_K):
        chunk_end = min(ks + CHUNK_K, k_end)
        # The block maxima this chunk of K touches (CHUNK_K columns: CHUNK_BLOCKS blocks, or one
        # fewer where rows start inside a block), from each row's first, within the chunk.
        base = (row0 + ks) // BLOCKSIZE
        blk = base[:, None] + offs_c[None, :]
        blk_ok = n_ok[:, None] & (blk * BLOCKSIZE < row0[:, None] + chunk_end)
        if NESTED:
            q = tl.load(absmax_ptr + blk, mask=blk_ok, other=0).to(tl.int32)
            scale2 = tl.load(absmax2_ptr + blk // BLOCKSIZE2, mask=blk_ok, other=0.0)
            amax = tl.load(code2_ptr + q, mask=blk_ok, other=0.0) * scale2 + offset
        else:
            amax = tl.load(absmax_ptr + blk, mask=blk_ok, other=0.0)
        for k0 in range(ks, chunk_end, BLOCK_K):
            first = (row0 + k0) // BLOCKSIZE  # the tile's first block, per row
            amax0 = _column(amax, offs_c, first - base)
            amax1 = _column(amax, offs_c, first + 1 - base)
            col = k0 + 2 * offs_j  # the even column of each byte
            w_ok = n_ok[:, None] & (col < K)[None, :]
            flat = row0[:, None] + col[None, :]
            packed = tl.load(qw_ptr + (flat >> 1), mask=w_ok, other=0).to(tl.int32)
            amax_e = tl.where((flat // BLOCKSIZE) == first[:, None], amax0[:, None], amax1[:, None])
            w_even = _dequant_nibble(packed >> 4, w_ok, amax_e, c0, c1, c2, c3, c4, c5, c6, c7,
                                     c8, c9, c10, c11, c12, c13, c14, c15)  # fmt: skip
            w_odd = _dequant_nibble(packed & 0xF, w_ok, amax_e, c0, c1, c2, c3, c4, c5, c6, c7,
                                    c8, c9, c10, c11, c12, c13, c14, c15)  # fmt: skip
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x_tile = tl.load(
                x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                mask=m_ok[:, None] & (offs_k < K)[None, :],
                other=0.0,
            )
            x_even, x_odd = tl.split(tl.reshape(x_tile, (BLOCK_M, BLOCK_K // 2, 2)))
            acc = _dot(x_even, tl.trans(_cast(w_even, x_dtype, INTERPRET)), acc, INTERPRET,
                       PRECISION)  # fmt: skip
            acc = _dot(x_odd, tl.trans(_cast(w_odd, x_dtype, INTERPRET)), acc, INTERPRET,
                       PRECISION)  # fmt: skip

    if PARTIAL:
        tl.store(
            ws_ptr + pid_k * stride_wss + offs_m[:, None] * stride_wsm + offs_n[None, :],
            acc,
            mask=m_ok[:, None] & n_ok[None, :],
        )
    else:
        _lora_epilogue(
            acc, bias_ptr, b_ptr, s_ptr, y_ptr, offs_m, offs_n, M, N, R,
            stride_bn, stride_br, stride_sm, stride_sr, stride_ym, stride_yn, stride_bias, scale,
            HAS_BIAS, INTERPRET, PRECISION, BLOCK_R,
        )  # fmt: skip


@triton.jit
def _lora_epilogue(
    acc, bias_ptr, b_ptr, s_ptr, y_ptr, offs_m, offs_n, M, N, R,
    stride_bn, stride_br, stride_sm, stride_sr, stride_ym, stride_yn, stride_bias, scale,
    HAS_BIAS: tl.constexpr, INTERPRET: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
):  # fmt: skip
    """``y[offs_m, offs_n] = acc + scale * S @ lora_b.T + bias``: the LoRA expand into the same
    fp32 accumulator, then the bias, rounded once to y's dtype (the activations', every dot's)."""
    y_dtype = y_ptr.dtype.element_ty
    offs_r = tl.arange(0, BLOCK_R)
    m_ok = offs_m < M
    n_ok = offs_n < N
    r_ok = offs_r < R
    s_tile = tl.load(
        s_ptr + offs_m[:, None] * stride_sm + offs_r[None, :] * stride_sr,
        mask=m_ok[:, None] & r_ok[None, :],
        other=0.0,
    )
    b_tile = tl.load(
        b_ptr + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn,
        mask=r_ok[:, None] & n_ok[None, :],
        other=0.0,
    )  # [BLOCK_R, BLOCK_N]
    s_dot = _cast(s_tile * scale, y_dtype, INTERPRET)
    acc = _dot(s_dot, _cast(b_tile, y_dtype, INTERPRET), acc, INTERPRET, PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n * stride_bias, mask=n_ok, other=0.0).to(tl.float32)[
            None, :
        ]
    tl.store(
        y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
        _cast(acc, y_dtype, INTERPRET),
        mask=m_ok[:, None] & n_ok[None, :],
    )


@triton.jit
def _qlora_split_reduce_kernel(
    # pointers
    ws_ptr, bias_ptr, b_ptr, s_ptr, y_ptr,
    # sizes
    M, N, R, splits,
    # strides
    stride_wss, stride_wsm, stride_bn, stride_br, stride_sm, stride_sr, stride_ym, stride_yn,
    stride_bias,
    # scalars
    scale,
    # meta-parameters
    HAS_BIAS: tl.constexpr, INTERPRET: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """``y = sum over splits of ws[split] + scale * S @ lora_b.T + bias``: the decode kernel's
    fp32 partials added in split order (the same bits on every run: no atomics), then the LoRA
    expand and the bias, once per output element."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    ptrs = ws_ptr + offs_m[:, None] * stride_wsm + offs_n[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for split in range(0, splits):
        acc += tl.load(ptrs + split * stride_wss, mask=mask, other=0.0)
    _lora_epilogue(
        acc, bias_ptr, b_ptr, s_ptr, y_ptr, offs_m, offs_n, M, N, R,
        stride_bn, stride_br, stride_sm, stride_sr, stride_ym, stride_yn, stride_bias, scale,
        HAS_BIAS, INTERPRET, PRECISION, BLOCK_R,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------
# launch configuration
# ------------------------------------------------------------------------------------------------

# Under the interpreter: one small config, smaller than the odd test sizes so that tiles straddle
# every edge.
_INTERPRET_META = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32}


# Tiles (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) by (kernel, decode, rank class).
# Decode (M <= 16) streams the weight: narrow tiles give enough programs to cover the SMs
# without split-K; prefill wants bigger tiles. Dequantizing a tile gathers per element (packed
# byte, code entry, block maximum, each with its own address), so the dequantized tile must stay
# small: the compile gate (tests/test_triton_compile.py, benchmarks/triton_compile_report.py)
# measured 0.5-7 KB of spills and up to 256 KiB of shared memory for 64-128-deep K tiles and
# 64 x 128 W tiles, on both targets; every tile below is spill-free on sm_80 and sm_90 for
# 16-bit layers (fp32 adapters included), aligned and odd K/N, at ranks 7, 16, 40, 64, 100, 128
# and 200. Rank classes (``_rank_class``): "narrow" up to 32; "wide", a multiple of 16 over 32
# with BLOCK_R 64 or 128 (an fp32 [BLOCK_M, BLOCK_R] LoRA accumulator beside the main one: at
# decode the 16 x 64 x 32 dx tile spilled 12 B on sm_90 at rank 64); "odd", the other ranks over
# 32 and BLOCK_R 256: with no divisibility hint on R and the rank strides, the 4-warp decode
# tiles spilled 20-2,488 B at ranks 100 and 200 and the 64 x 64 prefill tile 192 B at 200, while
# 8 warps and 2 stages, which are spill-free there, spill 12-16 B at the aligned 64 and 128.
_CONFIGS = {
    ("fwd", True, "narrow"): [(16, 32, 32, 4, 3), (16, 32, 32, 4, 4)],
    ("fwd", True, "wide"): [(16, 32, 32, 4, 3), (16, 32, 32, 4, 4)],
    ("fwd", True, "odd"): [(16, 32, 32, 8, 2)],
    ("fwd", False, "narrow"): [(64, 32, 32, 4, 3), (128, 64, 32, 8, 2)],
    # 64 x 64 x 32 sat at 255 registers and spilled 8 B at rank 64 (fp16, odd K/N, sm_80): a
    # 16-deep K tile halves the dequantized W tile, the output tile (the reuse) is the same
    ("fwd", False, "wide"): [(64, 64, 16, 8, 2), (64, 32, 32, 8, 2)],
    ("fwd", False, "odd"): [(64, 32, 32, 8, 2)],
    # no 16 x 64 x 32: it spilled 56 B at rank 7 (odd K/N, sm_90; a rank that is not a multiple
    # of 16 gives no divisibility hint on R or on the rank strides)
    ("dx", True, "narrow"): [(16, 32, 32, 4, 3), (16, 32, 64, 4, 2)],
    ("dx", True, "wide"): [(16, 32, 32, 4, 3), (16, 32, 64, 4, 2)],
    # 16 x 32 x 64 on 8 warps spilled 8 B at rank 100 (fp16, sm_90)
    ("dx", True, "odd"): [(16, 32, 32, 8, 2)],
    ("dx", False, "narrow"): [(64, 32, 32, 4, 3), (64, 64, 32, 8, 2)],
    ("dx", False, "wide"): [(64, 32, 32, 8, 2), (32, 64, 32, 8, 2)],
    # 64 x 32 x 32 spilled 8 B at rank 200 (bf16 with fp32 adapters, sm_80; 3 stages 56 B at
    # 256): a 16-wide dx tile
    ("dx", False, "odd"): [(64, 32, 16, 8, 2), (32, 64, 32, 8, 2)],
}
_WIDE_RANK = 32


def _rank_class(r: int, block_r: int) -> str:
    """Which of ``_CONFIGS``' lists a rank takes (see there)."""
    if block_r <= _WIDE_RANK:
        return "narrow"
    return "wide" if r % 16 == 0 and block_r <= 128 else "odd"


def _configs(kernel_name: str, decode: bool, rank_class: str) -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
        for m, n, k, w, s in _CONFIGS[(kernel_name, decode, rank_class)]
    ]


# The decode kernel (even K, M <= 16): 16-row M tiles, K tiles of at most one quantization block
# (64 columns: 32 packed bytes, one sector, per row), and per N-tile width the block maxima per
# row decoded at a time (a [BLOCK_N, CHUNK_BLOCKS] fp32 register table) and the (num_warps,
# num_stages) the autotuner picks from. ``_decode_plan`` picks the width and the K splits from
# the bytes they move (module docstring). The compile gate (sm_90, bf16, r = 16): 64 x 32
# blocks on 8 warps 184 registers, no spill (on 4 warps 32 B of spills); 128 x 32 blocks 255
# registers and 68 B of spills, 128 x 16 blocks spill-free on sm_90 but 12-24 B on sm_80 (r 16
# and 64), 128 x 8 blocks 186 / 223 registers, no spill (its uint8 block maxima come in quarter
# sectors: read 4 times over); 256 wide spilled 344-2,048 B on 8 and 16 warps with 8 blocks, and
# would need twice the splits to fill the SMs, which moves as many workspace bytes as it saves
# x bytes.
_DECODE_TILES = {64: (32, [(8, 3)]), 128: (8, [(8, 3), (8, 2)])}
_DECODE_BLOCK_M = 16
_DECODE_SPLITS = (1, 2, 4, 8, 16)
# The LoRA expand runs in the decode kernel's epilogue up to this rank block, above it in the
# split reduction's (narrower N tiles: a [BLOCK_R, BLOCK_N] lora_b tile per program).
_DECODE_EPILOGUE_MAX_R = 64
_REDUCE_TILE = 8192  # lora_b elements per reduction program: BLOCK_N = _REDUCE_TILE / BLOCK_R
_DECODE_MAX_BLOCK_K = 64
_INTERPRET_CHUNK_BLOCKS = 2  # small, so the tests' odd sizes take several chunks
# Under the interpreter the planner sees 16-wide tiles and a GPU of 4 SMs, so that the tests' odd
# sizes take several N tiles and K splits.
_INTERPRET_DECODE_TILES = (16,)
_INTERPRET_SMS = 8
_CPU_SMS = 132
# The shrink before the decode kernel: [16, 128] x tiles, K split so that the launch has enough
# programs to stream lora_a at bandwidth (each split adds its partial S with fp32 atomics).
_SHRINK_BLOCK_K = 128
# ... at most this many lora_a elements a K tile: at BLOCK_R 128 and 256, 128-deep tiles spilled
# 8-52 B (sm_90) and needed 264 KiB of shared memory at 256.
_SHRINK_TILE = 8192
_SHRINK_K_PER_SPLIT = 512
_INTERPRET_SHRINK = {"BLOCK_M": 16, "BLOCK_K": 32, "K_PER_SPLIT": 64}


def _autotune_enabled() -> bool:
    """``LORA_KERNELS_TRITON_AUTOTUNE=0`` takes each call's first config untimed (as the LoRA
    GEMM does)."""
    return envs.triton_autotune()


def _tuning_bench(kernel_call, quantiles):
    """Short timing runs: two or three configs, each a sub-ms kernel."""
    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


def _decode_configs(block_n: int) -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_N": block_n}, num_warps=w, num_stages=st)
        for w, st in _DECODE_TILES[block_n][1]
    ]


# One autotuner per (kernel, decode, rank class) and one per decode tile width, keyed like the
# LoRA GEMM: a power-of-two bucket of M (token counts vary from call to call), the problem size
# and the variant's flags. Results persist in Triton's cache directory.
_KEY = ["m_bucket", "N", "K", "BLOCK_R", "NESTED"]
_TUNED = {
    key: triton.autotune(
        configs=_configs(*key),
        key=_KEY + (["HAS_BIAS", "HAS_XL"] if key[0] == "fwd" else ["SPLIT_LORA"]),
        do_bench=_tuning_bench,
        cache_results=True,
    )(_qlora_fwd_kernel if key[0] == "fwd" else _qlora_dx_kernel)
    for key in _CONFIGS
}
_DECODE_TUNED = {
    block_n: triton.autotune(
        configs=_decode_configs(block_n),
        key=[*_KEY, "HAS_BIAS", "BLOCK_K", "PARTIAL", "k_per_split"],
        do_bench=_tuning_bench,
        cache_results=True,
    )(_qlora_decode_kernel)
    for block_n in _DECODE_TILES
}


def _sm_count(device_index: int | None) -> int:
    if device_index is None:  # the CUDA tiles driven on CPU tensors (tests, tools): an H100's
        return _CPU_SMS
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _decode_plan(m, n, k, blocksize, block_r, x_bytes, absmax_bytes, sms, widths):
    """``(block_n, splits, k_per_split, partial)`` for the decode kernel.

    Per call the decode moves, on top of each operand once, ``(n_tiles - 1) * M * K`` elements of
    x (every N tile reads all of x) and, when it stores partials, ``2 * splits * M * N`` fp32 of
    workspace (written once, read once by the reduction): wide tiles cut the first, few splits
    the second, and both together cut the programs. Among the (width, splits) that give at least
    three quarters of a wave (``sms`` programs), the one that moves the fewest bytes; when none
    does, the one with the most programs. Splits are whole quantization blocks of every row.
    """
    m_tiles = triton.cdiv(m, _DECODE_BLOCK_M)
    target = max(1, (3 * sms) // 4)
    best = None
    for block_n, chunk in widths.items():
        n_tiles = triton.cdiv(n, block_n)
        for want in _DECODE_SPLITS:
            per_split = triton.cdiv(triton.cdiv(k, want), blocksize) * blocksize
            splits = triton.cdiv(k, per_split)
            partial = splits > 1 or block_r > _DECODE_EPILOGUE_MAX_R
            moved = (n_tiles - 1) * m * k * x_bytes + (2 * splits * m * n * 4 if partial else 0)
            # block maxima: whole sectors per row and chunk (a short chunk re-reads its sector)
            blocks = per_split // blocksize
            sectors = triton.cdiv(min(chunk, blocks) * absmax_bytes, 32)
            moved += n * splits * triton.cdiv(blocks, chunk) * sectors * 32
            programs = m_tiles * n_tiles * splits
            rank = (0, moved, programs) if programs >= target else (1, -programs, moved)
            if best is None or rank < best[0]:
                best = (rank, (block_n, splits, per_split, partial))
    return best[1]


def _m_bucket(m: int) -> int:
    return min(triton.next_power_of_2(m), 4096)


def _precision(x_dtype: torch.dtype) -> str:
    """``input_precision`` of every dot: 16-bit dots are tensor-core dots whatever it says; fp32
    layers multiply in IEEE fp32, or TF32 where ``torch.backends.cuda.matmul.allow_tf32`` allows
    it (PyTorch's own rule)."""
    tf32 = x_dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    return "tf32" if tf32 else "ieee"


def _quant_args(qweight, absmax, code, absmax2, code2, offset):
    """The format's tensors as the kernels index them: flat, unit stride."""
    nested = absmax2 is not None
    if not nested:  # unused pointers: any tensor of the right device will do
        absmax2, code2, offset = absmax, code, absmax
    flat = (index_vector(t.reshape(-1)) for t in (absmax, code, absmax2, code2, offset))
    return (qweight.reshape(-1).view(torch.uint8), *flat), nested


def _launch(kernel_name, grid_fn, m, r, args, meta):
    meta = dict(meta)
    # Two roundings in the nested absmax decode, as bitsandbytes: no fused multiply-add.
    meta["enable_fp_fusion"] = False
    if interpreting():
        kernel = {"fwd": _qlora_fwd_kernel, "dx": _qlora_dx_kernel}[kernel_name]
        meta.update(_INTERPRET_META)
        kernel[grid_fn(meta)](*args, **meta)
        return
    decode = m <= 16
    tuned = _TUNED[(kernel_name, decode, _rank_class(r, meta["BLOCK_R"]))]
    if _autotune_enabled():
        tuned[grid_fn](*args, **meta)
        return
    config = tuned.configs[0]
    meta.update(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
    tuned.fn[grid_fn(meta)](*args, **meta)


def _shrink(xl, lora_a, s, precision, block_r):
    """``s = xl @ lora_a.T`` (fp32) in one launch: x_lora and lora_a read once."""
    m, k = xl.shape
    r = lora_a.shape[0]
    interp = interpreting()
    if interp:
        block_m, block_k, per_split = (_INTERPRET_SHRINK[n] for n in _INTERPRET_SHRINK)
    else:
        block_m, block_k, per_split = 16, _SHRINK_BLOCK_K, _SHRINK_K_PER_SPLIT
        block_k = min(block_k, _SHRINK_TILE // block_r)
    splits = 1 if torch.are_deterministic_algorithms_enabled() else triton.cdiv(k, per_split)
    per_split = triton.cdiv(triton.cdiv(k, splits), block_k) * block_k
    splits = triton.cdiv(k, per_split)
    if splits > 1:
        s.zero_()
    _qlora_shrink_kernel[(triton.cdiv(m, block_m), splits)](
        xl, lora_a, s,
        m, k, r, per_split,
        xl.stride(0), xl.stride(1), lora_a.stride(0), lora_a.stride(1), s.stride(0), s.stride(1),
        ATOMIC=splits > 1, INTERPRET=interp, PRECISION=precision,
        BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=block_r,
        num_warps=4,
    )  # fmt: skip


def _decode_fwd(x, quant, bias, lora_b, s, y, scale, meta):
    """The decode forward (even K): shrink already in s; one pass over the packed weight, split
    over K into fp32 partials that ``_qlora_split_reduce_kernel`` adds (with the LoRA expand and
    the bias) when ``_decode_plan`` says so."""
    m, k = x.shape
    n = y.shape[1]
    r = s.shape[1]
    interp = interpreting()
    meta = dict(meta)
    meta.pop("HAS_XL")
    meta["enable_fp_fusion"] = False
    meta["BLOCK_K"] = min(_DECODE_MAX_BLOCK_K, meta["BLOCKSIZE"])
    if interp:
        sms = _INTERPRET_SMS
        widths = dict.fromkeys(_INTERPRET_DECODE_TILES, _INTERPRET_CHUNK_BLOCKS)
    else:
        index = None
        if x.device.type == "cuda":
            index = x.device.index if x.device.index is not None else torch.cuda.current_device()
        sms, widths = _sm_count(index), {bn: chunk for bn, (chunk, _) in _DECODE_TILES.items()}
    block_n, splits, per_split, partial = _decode_plan(
        m,
        n,
        k,
        meta["BLOCKSIZE"],
        meta["BLOCK_R"],
        x.element_size(),
        quant[1].element_size(),
        sms,
        widths,
    )
    meta["PARTIAL"] = partial
    chunk_blocks = _INTERPRET_CHUNK_BLOCKS if interp else _DECODE_TILES[block_n][0]
    # Rows that start inside a block (K not a multiple of the block size) spread a chunk of whole
    # blocks' columns over one block more: their chunks are one block shorter.
    meta["CHUNK_BLOCKS"] = chunk_blocks
    meta["CHUNK_K"] = (chunk_blocks - (k % meta["BLOCKSIZE"] != 0)) * meta["BLOCKSIZE"]
    meta["BLOCK_M"] = _DECODE_BLOCK_M
    ws = torch.empty((splits, m, n), device=x.device, dtype=torch.float32) if partial else s
    ws_strides = (ws.stride(0), ws.stride(1)) if partial else (0, 0)
    args = (
        x, *quant, x if bias is None else bias, lora_b, s, y, ws,
        m, n, k, r, _m_bucket(m), per_split,
        x.stride(0), x.stride(1), lora_b.stride(0), lora_b.stride(1),
        s.stride(0), s.stride(1), y.stride(0), y.stride(1), vector_stride(bias), *ws_strides,
        float(scale),
    )  # fmt: skip
    grid = (triton.cdiv(m, _DECODE_BLOCK_M), triton.cdiv(n, block_n), splits)
    if interp:
        _qlora_decode_kernel[grid](*args, **meta, BLOCK_N=block_n)
    elif _autotune_enabled():
        _DECODE_TUNED[block_n][grid](*args, **meta)
    else:
        config = _DECODE_TUNED[block_n].configs[0]
        meta.update(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
        _qlora_decode_kernel[grid](*args, **meta)
    if not partial:
        return
    reduce_n = _INTERPRET_DECODE_TILES[0] if interp else min(128, _REDUCE_TILE // meta["BLOCK_R"])
    _qlora_split_reduce_kernel[(triton.cdiv(m, _DECODE_BLOCK_M), triton.cdiv(n, reduce_n))](
        ws, x if bias is None else bias, lora_b, s, y,
        m, n, r, splits,
        ws.stride(0), ws.stride(1), lora_b.stride(0), lora_b.stride(1), s.stride(0), s.stride(1),
        y.stride(0), y.stride(1), vector_stride(bias),
        float(scale),
        HAS_BIAS=meta["HAS_BIAS"], INTERPRET=interp, PRECISION=meta["PRECISION"],
        BLOCK_M=_DECODE_BLOCK_M, BLOCK_N=reduce_n, BLOCK_R=meta["BLOCK_R"],
        num_warps=4,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------
# launchers (same signatures as backends/torch/qlora.py)
# ------------------------------------------------------------------------------------------------


@on_input_device
def qlora_linear_fwd(
    x, qweight, absmax, code, absmax2, code2, offset, blocksize, blocksize2, n,
    bias, lora_a, lora_b, scale, x_lora=None,
):  # fmt: skip
    m, k = x.shape
    r = lora_a.shape[0]
    y = x.new_empty((m, n))
    s = x.new_empty((m, r), dtype=torch.float32)
    if m == 0:
        return y, s
    quant, nested = _quant_args(qweight, absmax, code, absmax2, code2, offset)
    xl = x if x_lora is None else x_lora
    args = (
        x, xl, *quant, x if bias is None else bias, lora_a, lora_b, y, s,
        m, n, k, r, _m_bucket(m),
        x.stride(0), x.stride(1), xl.stride(0), xl.stride(1), lora_a.stride(0), lora_a.stride(1),
        lora_b.stride(0), lora_b.stride(1), y.stride(0), y.stride(1), s.stride(0), s.stride(1),
        vector_stride(bias),
        float(scale),
    )  # fmt: skip
    meta = {
        "BLOCKSIZE": blocksize,
        "BLOCKSIZE2": blocksize2,
        "NESTED": nested,
        "HAS_BIAS": bias is not None,
        "HAS_XL": x_lora is not None,
        "INTERPRET": interpreting(),
        "PRECISION": _precision(x.dtype),
        "BLOCK_R": max(16, triton.next_power_of_2(r)),
    }

    if m <= 16 and k % 2 == 0:
        # Decode: the shrink once (x_lora and lora_a read once, not per N tile), then one pass
        # over the packed weight that reads each byte once.
        _shrink(xl, lora_a, s, meta["PRECISION"], meta["BLOCK_R"])
        _decode_fwd(x, quant, bias, lora_b, s, y, scale, meta)
        return y, s

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))

    _launch("fwd", grid, m, r, args, meta)
    return y, s


@on_input_device
def qlora_linear_bwd(
    dy, x, qweight, absmax, code, absmax2, code2, offset, blocksize, blocksize2,
    lora_a, lora_b, s, scale, x_lora=None, *, needs_dx=True, needs_da=True, needs_db=True,
):  # fmt: skip
    m, k = x.shape
    n = dy.shape[1]
    r = lora_a.shape[0]
    dx = dx_lora = da = db = None
    if needs_da or needs_db:
        # dA and dB are rank-sized GEMMs (r * K and N * r outputs) that never touch the weight:
        # stock PyTorch GEMMs in the adapters' dtype, scale applied once to the [M, r] factor.
        ldt = lora_a.dtype
        dyl = dy.to(ldt)
        if needs_da:
            xl = x if x_lora is None else x_lora
            da = torch.mm(torch.mm(dyl, lora_b).mul_(scale).T, xl.to(ldt))
        if needs_db:
            db = torch.mm(dyl.T, s.to(ldt)).mul_(scale)
    if needs_dx:
        dx = x.new_empty((m, k))
        dx_lora = x.new_empty((m, k)) if x_lora is not None else dx
        if m > 0:
            quant, nested = _quant_args(qweight, absmax, code, absmax2, code2, offset)
            args = (
                dy, *quant, lora_a, lora_b, dx, dx_lora,
                m, n, k, r, _m_bucket(m),
                dy.stride(0), dy.stride(1), lora_a.stride(0), lora_a.stride(1),
                lora_b.stride(0), lora_b.stride(1), dx.stride(0), dx.stride(1),
                dx_lora.stride(0), dx_lora.stride(1),
                float(scale),
            )  # fmt: skip
            meta = {
                "BLOCKSIZE": blocksize,
                "BLOCKSIZE2": blocksize2,
                "NESTED": nested,
                "SPLIT_LORA": x_lora is not None,
                "INTERPRET": interpreting(),
                "PRECISION": _precision(x.dtype),
                "BLOCK_R": max(16, triton.next_power_of_2(r)),
            }

            def grid(meta):
                return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(k, meta["BLOCK_K"]))

            _launch("dx", grid, m, r, args, meta)
        if x_lora is None:
            dx_lora = None
    return dx, dx_lora, da, db
