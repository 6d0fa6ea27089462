"""Multi-adapter LoRA linear in Triton: every row of the batch with its own adapter, one pass.

Shapes (``L`` adapters stacked and zero-padded to the largest rank ``R = r_max``)::

    x [M, K], weight [N, K], bias [N] or None, lora_a [L, R, K], lora_b [L, N, R],
    scales [L] float32, row_ids [M] int32/int64 (-1: base layer only), ranks [L] int32 or None

    s[i] = x[i] @ lora_a[a].T                                       a = row_ids[i]   [M, R] fp32
    y[i] = x[i] @ weight.T + bias + scales[a] * s[i] @ lora_b[a].T
    dx[i] = dy[i] @ weight + scales[a] * (dy[i] @ lora_b[a]) @ lora_a[a]
    dA[a] = scales[a] * sum_{i: ids[i] = a} (dy[i] @ lora_b[a]).T x[i]        [R, K]
    dB[a] = scales[a] * sum_{i: ids[i] = a} dy[i].T s[i]                       [N, R]

Forward = two launches: a *shrink* kernel writes ``s`` (kept for the backward), then one kernel
computes the base GEMM tile ``x W^T + bias`` and adds the LoRA *expand* term ``scale * s B^T`` to
the fp32 accumulator before the single rounding to the output: ``y`` is written once, never
read back. The backward reuses both kernels (the shrink of ``dy`` against ``lora_b``, and the
fused kernel with ``weight`` and ``lora_a`` read transposed for ``dx``) plus a segmented
reduction for ``dA`` and ``dB`` over each adapter's rows. That reduction gives each adapter
several programs, each over a slice of its rows, added with fp32 atomics (``segment_splits``,
sized by M alone): one adapter holding every row of a 32k-row batch is 32 programs of 1k rows,
not one of 32k. Under ``torch.use_deterministic_algorithms(True)`` one program per adapter.

Two strategies, chosen from the shape alone (``choose_strategy``; no look at the ids):

* ``gather`` (BGMV-like, decode: few rows, many distinct adapters). Rows stay in their order; the
  shrink runs one program per row, reading that row's adapter; the fused kernel's LoRA term is
  one tensor-core dot per adapter present in its row tile (the rows of other adapters masked),
  as in ``grouped`` but over unsorted rows: each present adapter's ``lora_b`` slice is read once
  per tile, in full 32-byte sectors from rank 16 on.
* ``grouped`` (SGMV-like, prefill: many rows per adapter). The rows are sorted by adapter on the
  device (``torch.sort``, stable); tiles of consecutive sorted rows then hold one adapter, or a
  few at segment edges, and the LoRA products are tensor-core dots per adapter present in the
  tile (rows of other adapters masked). The loop visits the ids present only, each step jumping
  to the next larger id in the tile: a tile holding slots 0 and 1000 of a serving stack makes two
  trips and reads two adapters, not 1001. Tiles are never padded per adapter, so the base GEMM
  runs on full tiles whatever the popularity.

Memory traffic of a gather decode step (``python -m tools.traffic_cases multi --m 16 --k 4096
--n 4096 --r 16 --distinct D --strategy gather --sample 8``: CUDA tiles, fp16, moved / compulsory
bytes in 32-byte sectors; 2-core CPU VM, the count does not depend on the machine):

| M, distinct adapters | per-row epilogue | per-adapter dot, 16x128 | split-K, 16x256 |
| --- | ---: | ---: | ---: |
| 16, 1 | 1.310 | 1.182 | 1.189 |
| 16, 8 | 1.294 | 1.147 | 1.155 |
| 16, 16 | 1.278 | 1.111 | 1.119 |
| 64, 64 | 3.781 | 3.289 | 3.289 (no split above 16 rows) |

Before: a 16x64 fused tile whose epilogue gathered each row's ``lora_b`` on CUDA cores in rank
chunks of 8 (16 of a sector's 32 bytes: ``lora_b`` moved 2x) and x re-read by each of the 64 N
tiles (65x x, 8.5 MB at M = 16). After: the per-adapter dot above (``lora_b`` 1.0x) and 16x128
tiles (x 33x, 4.3 MB), but only 32 CTAs at N = 4096 on a GPU of 132 SMs.

Split-K decode (M <= 16, as ``lora_linear``'s decode): the fused kernel runs on a grid of
(N tiles) x (K splits), each program an fp32 partial of ``x W^T`` over its K slice; split 0 alone
adds the per-adapter expand (``s`` from the shrink launch) and the bias, so each is in the sum
once. Partials go by atomics into a zeroed [M, N] fp32 buffer, or, under
``torch.use_deterministic_algorithms(True)``, each split into its own slice of [splits, M, N];
``_lora_multi_splitk_finish_kernel`` adds them in split order and rounds once into ``y``. The
split count (``gather_splits``) fills one wave of SMs, is at most the K tiles, and keeps the
partials within 1/16 of the weight's bytes; the grid depends on the shapes only. 256-wide N
tiles halve x's re-reads (17x, 2.2 MB), which pays for the partials (2.4 MB with their read
back: 16 x 8 = 128 CTAs at K = N = 4096), so the counts above (all programs counted, ``--sample
160``) stay within 0.01 of the unsplit 128-wide tile while the grid grows from 32 to 128 CTAs.
The atomic buffer's zero fill (M * N * 4 bytes, a memset the counter does not see) adds 0.008.
What is left: x once per N tile, and, when rows share an adapter, ``lora_a`` once per row in the
shrink (16x, 2 MB, for one adapter at M = 16); M = 64 still reads the weight once per 16-row
tile (4x). A shrink that reads each present adapter's ``lora_a`` once, and one tile over all
rows for M <= 64, are the known next steps; not done yet.

``gather`` is used when ``M <= 64``, or ``M <= 1024`` with fewer than 8 rows per adapter on
average (``M < 8 L``): there a grouped tile would span many adapters and repeat its dots for each.
These thresholds and the block sizes are first guesses for a Hopper GPU, to be tuned there.

Rows whose id is outside ``[0, L)`` (-1, and any out-of-range id) are the base layer only: every
kernel masks them by ``0 <= id < L`` before any adapter address is formed, so they never read out
of bounds, load no adapter weights, skip the shrink loop, get ``s = 0`` and no gradient. (The
functional layer raises on out-of-range ids for CPU tensors; on CUDA, checking would need a
device-host synchronisation.) Padded rank slots past ``ranks[a]`` are skipped: not loaded, ``s``
and the gradients there are zero. Nothing here synchronises with the host or sizes an output by
the data (grids depend on M, N, K, R, L only), so a decode step can be captured in a CUDA graph.

Precision (the package's policy, README "Precision"): fp32 accumulators everywhere, and every
dot on the activations' dtype. For fp16/bf16 activations each dot's operands are rounded to that
dtype and multiplied on tensor cores: the base GEMM, and the LoRA products, whose fp32
intermediates (``s``, ``dy @ lora_b``) and fp32 adapters (PEFT's default on a 16-bit base) are
rounded right before their dot; this is what PEFT computes under autocast, and the tests compare
against that (tests/test_multi.py). Each scale multiplies ``s @ B^T`` after its dot (PEFT scales
after lora_B): ``s * scale`` rounded to fp16 could overflow where ``s`` does not. The gather
shrink's CUDA-core products use the same rounded operands as grouped's dots (and both expands
are the same per-adapter dot), so the two
strategies differ only in the order of their fp32 sums and a row's result does not depend on the
batch around it beyond that (tests/test_triton_numerics.py states and checks the bound).
fp32 layers multiply in fp32 (``input_precision="ieee"``), or in TF32 when
``torch.backends.cuda.matmul.allow_tf32`` says so, PyTorch's own rule. Under the Triton
interpreter, bf16 dot operands are rounded to bf16 and then upcast to fp32 (``tl.dot`` on bf16
is wrong in triton 3.9's interpreter). Element offsets are int64 (a transposed weight of 2**31
elements would wrap int32 offsets).
No autotuning: configs come from a small table, so the first call of a CUDA graph capture
launches exactly what the warm-up compiled.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import interpreting, on_input_device
from ._args import index_vector, vector_stride
from ._rounding import interpreted_round
from ._segment import rounded_dot, segment_outer

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}

# ``gather`` for decode-sized batches, see the module docstring.
_GATHER_MAX_ROWS = 64
_GATHER_MAX_ROWS_MANY_ADAPTERS = 1024
_GROUPED_MIN_ROWS_PER_ADAPTER = 8


def choose_strategy(m: int, num_adapters: int) -> str:
    """``"gather"`` or ``"grouped"`` for a batch of ``m`` rows over ``num_adapters`` adapters."""
    if m <= _GATHER_MAX_ROWS:
        return "gather"
    if m <= _GATHER_MAX_ROWS_MANY_ADAPTERS and m < _GROUPED_MIN_ROWS_PER_ADAPTER * num_adapters:
        return "gather"
    return "grouped"


def _dot_dtype(act_dtype: torch.dtype, lora_dtype: torch.dtype):
    """The dtype both operands of a dot are rounded to: the activations' (see Precision in the
    module docstring). ``lora_dtype`` does not change it: fp32 adapters on a 16-bit base are
    rounded to the base's dtype for their dots, as PEFT computes them under autocast."""
    del lora_dtype
    return _TL_DTYPES[act_dtype]


def _dot_flags(act_dtype: torch.dtype) -> dict:
    """Constexprs of ``rounded_dot``: the interpreter's bf16 upcast, and TF32 for fp32 layers only
    where ``torch.backends.cuda.matmul.allow_tf32`` allows it (PyTorch's own rule)."""
    tf32 = act_dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    return {
        "UPCAST_DOTS": interpreting() and act_dtype == torch.bfloat16,
        "PRECISION": "tf32" if tf32 else "ieee",
    }


def _divisible(*values: int) -> bool:
    """Every size and stride a multiple of 16: what Triton's divisibility hint needs to vectorise
    a tile's loads (and pipeline them through shared memory). Without it (K = 4099, rank 7)
    every element is loaded and addressed on its own, and the tiles that fit in registers on
    aligned shapes spill (the compile gate measured 600-1,400 B); such calls take the narrower
    ``_ODD_*`` configs."""
    return all(v % 16 == 0 for v in values if v != 1)


# Fused-kernel tiles (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), keyed by strategy,
# for grouped by M >= 2048, and for gather by M <= 16 (the split-K decode: ``lora_linear``'s
# decode tile, 256 wide, 32 deep, 8 warps, 4 stages; fp32 layers keep 128 columns, and the
# deterministic split takes 3 stages and 16-wide rank chunks: its per-split store spilled
# 16-32 B there with 4 stages or 32-wide chunks, bf16 with fp32 adapters); grouped batches of
# at most 16 rows (a caller's forced strategy) take "grouped_decode": on odd shapes the 64-row
# tile sat at 255 registers and spilled 56-232 B at M = 1 on sm_80, 16 rows do not (the other
# rows are masked either way), and 128 columns read x as often as the 64-row tile did. The
# compile gate holds each to zero spills on sm_80 and sm_90 for 16-bit layers and fp32 adapters
# on them, aligned and odd shapes, ranks 7 to 200.
_FUSED_CONFIGS = {
    "gather": (16, 128, 128, 4, 3),
    "gather_decode": (16, 256, 32, 8, 4),
    "grouped": (64, 128, 64, 8, 3),
    "grouped_decode": (64, 128, 64, 8, 3),
    "grouped_tall": (128, 128, 32, 8, 3),
}
_ODD_FUSED_CONFIGS = {
    "gather": (16, 64, 32, 4, 3),
    "gather_decode": (16, 64, 32, 4, 3),
    "grouped": (64, 128, 32, 8, 3),
    "grouped_decode": (16, 128, 32, 8, 3),
    "grouped_tall": (64, 128, 32, 8, 3),
}

# Gather decode split over K (M <= _SPLIT_MAX_M): fp32 partials of each [16, BLOCK_N] tile,
# added by atomics (_SPLIT_ATOMIC) or stored per split and summed in order (_SPLIT_STORE, the
# deterministic mode), then rounded once by the finish pass.
_SPLIT_NONE: tl.constexpr = tl.constexpr(0)
_SPLIT_ATOMIC: tl.constexpr = tl.constexpr(1)
_SPLIT_STORE: tl.constexpr = tl.constexpr(2)
_SPLIT_MAX_M = 16
# The partials move splits * M * N * 4 bytes: at most 1/_SPLIT_REDUCTION_SHARE of the weight's.
_SPLIT_REDUCTION_SHARE = 16
# Under the interpreter a small "SM count", so that the tests' shapes really split.
_INTERP_SPLIT_PROGRAMS = 16
_FINISH_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 128}

# dA/dB reduction: rows one program reduces before the adapter's rows are split among several
# (their fp32 partial sums added with atomics), and the most programs one adapter gets.
_SEGMENT_ROWS_PER_SPLIT = 1024
_SEGMENT_MAX_SPLITS = 32
# Under the interpreter: few rows, so that the tests' batches reach the split (atomic) path.
_INTERP_SEGMENT_ROWS_PER_SPLIT = 32

# Rank chunk of the grouped expand: its [BLOCK_M, R] and [R, BLOCK_N] tiles sit beside the big
# accumulator; 64 spilled 16-1,400 B at rank 128 (both targets), 32 does not, but in the 128-row
# tile (the expand runs before the K-loop, its pointers beside the accumulator) 32 spilled 40 B
# on sm_90 at rank 128: that tile takes 16.
_EXPAND_MAX_R = 32


def _rank_block(r_max: int) -> int:
    """Rank slots per step: a power of two, >= 16 for ``tl.dot``, at most 64 (ranks loop on)."""
    return max(16, min(triton.next_power_of_2(r_max), 64))


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _rounded(a, DOT_DTYPE: tl.constexpr, UPCAST_DOTS: tl.constexpr):
    """``a`` rounded to DOT_DTYPE and widened to fp32: the operand a tensor-core dot would see,
    for the products the gather kernels form on CUDA cores (each then exact in fp32, so gather
    and grouped differ only in the order of their fp32 sums)."""
    if UPCAST_DOTS:
        return interpreted_round(a, DOT_DTYPE)
    return a.to(DOT_DTYPE).to(tl.float32)


@triton.jit
def _expand_present_adapters(
    acc, a, aid, valid, n_mask, s_rows, b_cols, r_range, ranks_ptr, R, L,
    stride_sr, stride_bl, stride_br,
    HAS_RANKS: tl.constexpr, DOT_DTYPE: tl.constexpr, UPCAST_DOTS: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """``acc + s[m, :r_a] @ b[a, n, :r_a].T`` summed over the adapters present in a row tile,
    each row taking only its own adapter's term (``aid [BLOCK_M]`` the rows' ids, ``valid`` the
    rows with an adapter in ``[0, L)``): one tensor-core dot per adapter and rank chunk, each
    present adapter's ``lora_b`` slice read once per tile. ``a`` is the first adapter to visit
    (the smallest id present, or ``L`` for none); each trip jumps to the next larger id present,
    so the rows need not be sorted. ``s_rows [BLOCK_M, 1]`` and ``b_cols [1, BLOCK_N]`` are the
    int64 row and column pointers, ``r_range`` the rank chunk's int32 offsets (see the caller
    for why the addresses are split so). The expand of ``_lora_multi_fused_kernel`` and of
    ``lora_delta``'s in-place kernel.
    """
    while a < L:
        mine = valid & (aid == a)
        r_lim = R
        if HAS_RANKS:
            r_lim = tl.minimum(tl.load(ranks_ptr + a), R)
        b_adapter = b_cols + a * stride_bl
        for r0 in range(0, r_lim, BLOCK_R):
            r_step = tl.cast(r0, tl.int64)
            r_mask = (r0 + r_range) < r_lim
            st = tl.load(
                s_rows + r_step * stride_sr + r_range[None, :] * stride_sr,
                mask=mine[:, None] & r_mask[None, :],
                other=0.0,
            )
            bt = tl.load(
                b_adapter + r_step * stride_br + r_range[:, None] * stride_br,
                mask=n_mask[None, :] & r_mask[:, None],
                other=0.0,
            )
            acc = rounded_dot(st, bt, acc, DOT_DTYPE, UPCAST_DOTS, PRECISION)
        a = tl.min(tl.where(valid & (aid > a), aid, L))
    return acc


@triton.jit
def _lora_shrink_gather_kernel(
    # pointers
    x_ptr,
    w_ptr,
    ids_ptr,
    ranks_ptr,
    out_ptr,
    # sizes
    K,
    R,
    L,
    # strides
    stride_xm,
    stride_xk,
    stride_wl,
    stride_wr,
    stride_wk,
    stride_om,
    stride_or,
    # meta-parameters
    HAS_RANKS: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    UPCAST_DOTS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out[m, r] = sum_k x[m, k] * w[ids[m], r, k]: one row per program (a batched mat-vec),
    both operands rounded to DOT_DTYPE as the grouped kernel's dot rounds them."""
    row = tl.program_id(0).to(tl.int64)
    pid_r = tl.program_id(1).to(tl.int64)
    r_offs = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    a = tl.load(ids_ptr + row).to(tl.int64)
    valid = (a >= 0) & (a < L)
    a = tl.where(valid, a, 0)  # a safe address for rows with no adapter; their loop is empty
    r_lim = R
    if HAS_RANKS:
        r_lim = tl.minimum(tl.load(ranks_ptr + a), R)
    r_lim = tl.where(valid, r_lim, 0)
    # rows with no adapter, and rank blocks past this adapter's rank, skip the loop: s = 0
    k_end = tl.where(pid_r * BLOCK_R < r_lim, K, 0)
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    # addresses = a scalar int64 base (row, adapter, rank block, K step) plus int32 offsets
    # within the tile (see _lora_multi_fused_kernel)
    k_range = tl.arange(0, BLOCK_K)
    x_row = x_ptr + row * stride_xm
    w_block = w_ptr + a * stride_wl + (pid_r * BLOCK_R) * stride_wr
    w_tile = tl.arange(0, BLOCK_R)[:, None] * stride_wr + k_range[None, :] * stride_wk
    for k0 in range(0, k_end, BLOCK_K):
        k_step = tl.cast(k0, tl.int64)
        k_mask = (k0 + k_range) < K
        xk = tl.load(x_row + k_step * stride_xk + k_range * stride_xk, mask=k_mask, other=0.0)
        w = tl.load(
            w_block + k_step * stride_wk + w_tile,
            mask=(r_offs < r_lim)[:, None] & k_mask[None, :],
            other=0.0,
        )
        xr = _rounded(xk, DOT_DTYPE, UPCAST_DOTS)
        acc += tl.sum(_rounded(w, DOT_DTYPE, UPCAST_DOTS) * xr[None, :], axis=1)
    tl.store(out_ptr + row * stride_om + r_offs * stride_or, acc, mask=r_offs < R)


@triton.jit
def _lora_shrink_grouped_kernel(
    # pointers
    x_ptr,
    w_ptr,
    sorted_ids_ptr,
    order_ptr,
    ranks_ptr,
    out_ptr,
    # sizes
    M,
    K,
    R,
    L,
    # strides
    stride_xm,
    stride_xk,
    stride_wl,
    stride_wr,
    stride_wk,
    stride_om,
    stride_or,
    # meta-parameters
    HAS_RANKS: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    UPCAST_DOTS: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out[m, r] = sum_k x[m, k] * w[ids[m], r, k] on a tile of rows sorted by adapter."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_r = tl.program_id(1).to(tl.int64)
    pos = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    in_range = pos < M
    rows = tl.load(order_ptr + pos, mask=in_range, other=0).to(tl.int64)
    aid = tl.load(sorted_ids_ptr + pos, mask=in_range, other=-1).to(tl.int64)
    valid = in_range & (aid >= 0) & (aid < L)
    no_adapter = in_range & ((aid < 0) | (aid >= L))
    r_offs = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    out_rows = out_ptr + rows[:, None] * stride_om + r_offs[None, :] * stride_or
    r_in = (r_offs < R)[None, :]
    zeros = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    tl.store(out_rows, zeros, mask=no_adapter[:, None] & r_in)
    # addresses = int64 row pointers or a scalar int64 base (adapter, rank block, K step) plus
    # int32 offsets within the tile: int64 tile offsets, or pointer tiles carried through the
    # loops, spilled up to 1.5 KB at rank 100 on sm_90 (see _lora_multi_fused_kernel)
    k_range = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rows[:, None] * stride_xm
    x_tile = k_range[None, :] * stride_xk
    # kept as two vectors, so that the [BLOCK_K, BLOCK_R] offsets are formed per step rather
    # than held through the loop (held, they spilled 48 B at rank 128 on sm_80)
    w_k = k_range[:, None] * stride_wk
    w_r = tl.arange(0, BLOCK_R)[None, :] * stride_wr
    # one trip per adapter present in the tile (ids are sorted, but a tile holding slots 0 and
    # 1000 must not walk the slots in between): each step jumps to the next larger id present
    a = tl.min(tl.where(valid, aid, L))
    while a < L:
        mine = valid & (aid == a)
        r_lim = R
        if HAS_RANKS:
            r_lim = tl.minimum(tl.load(ranks_ptr + a), R)
        k_end = tl.where(pid_r * BLOCK_R < r_lim, K, 0)
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        w_block = w_ptr + a * stride_wl + (pid_r * BLOCK_R) * stride_wr
        for k0 in range(0, k_end, BLOCK_K):
            k_step = tl.cast(k0, tl.int64)
            k_mask = (k0 + k_range) < K
            xt = tl.load(
                x_rows + k_step * stride_xk + x_tile,
                mask=mine[:, None] & k_mask[None, :],
                other=0.0,
            )
            wt = tl.load(
                (w_block + k_step * stride_wk + w_k) + w_r,
                mask=(r_offs < r_lim)[None, :] & k_mask[:, None],
                other=0.0,
            )
            acc = rounded_dot(xt, wt, acc, DOT_DTYPE, UPCAST_DOTS, PRECISION)
        tl.store(out_rows, acc, mask=mine[:, None] & r_in)
        a = tl.min(tl.where(valid & (aid > a), aid, L))


@triton.jit
def _lora_multi_fused_kernel(
    # pointers
    x_ptr,
    w_ptr,
    bias_ptr,
    s_ptr,
    b_ptr,
    scales_ptr,
    ids_ptr,
    order_ptr,
    ranks_ptr,
    y_ptr,
    ws_ptr,
    # sizes
    M,
    N,
    K,
    R,
    L,
    k_per_split,  # a multiple of BLOCK_K (SPLIT only), so no tile straddles two splits
    # strides
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_sm,
    stride_sr,
    stride_bl,
    stride_bn,
    stride_br,
    stride_ym,
    stride_yn,
    stride_bias,
    stride_wss,
    stride_wsm,
    stride_wsn,
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    HAS_RANKS: tl.constexpr,
    GROUPED: tl.constexpr,
    SPLIT: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    UPCAST_DOTS: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """y[m] = x[m] @ w.T + bias + scales[a] * s[m] @ b[a].T,  a = ids[m] (if 0 <= a < L).

    ``GROUPED``: tile rows are ``order[pos]`` and ``ids`` are sorted (ids[pos] is the id of row
    order[pos]); otherwise rows are ``pos`` themselves. ``s`` and ``y`` are indexed by row.

    Every element offset is formed in int64 (``k_range``, ``r_range``, and the row and column
    indices, which come from int64 program ids): the backward reads the weight transposed
    (``stride_wk`` = the weight's row length), and ``k * stride_wk`` in int32 wraps once the
    weight has 2**31 elements (N = 139264, K = 16384). ``scales[a]`` multiplies ``s @ b.T``
    after the dot, as PEFT scales after lora_B: ``s`` rounded to 16 bits before the dot is
    ``s``, never ``s * scale``, which can overflow fp16 where PEFT does not.

    ``SPLIT`` (gather decode, split-K): program (tile, j) reduces K over ``[j * k_per_split,
    (j + 1) * k_per_split)`` into an fp32 partial; split 0 alone adds the LoRA term and the bias,
    so each is in the sum exactly once. ``_SPLIT_ATOMIC`` adds the partial into ``ws[0]``
    (zeroed), ``_SPLIT_STORE`` stores it to ``ws[j]`` for the fixed-order sum of
    ``_lora_multi_splitk_finish_kernel``; ``y`` is then written by that pass, not here.
    """
    # program id -> tile, in groups of GROUP_M row tiles so that neighbours share W in L2
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_pid_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = (first_m + (pid % width) % size_m).to(tl.int64)
    pid_n = ((pid % width) // size_m).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    k_start = pid_s * 0
    k_stop = K
    if SPLIT != _SPLIT_NONE:
        k_start = pid_s * k_per_split
        k_stop = tl.minimum(k_start + k_per_split, K)
    first_split = pid_s == 0

    pos = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    in_range = pos < M
    rows = tl.load(order_ptr + pos, mask=in_range, other=0).to(tl.int64) if GROUPED else pos
    aid = tl.load(ids_ptr + pos, mask=in_range, other=-1).to(tl.int64)
    valid = in_range & (aid >= 0) & (aid < L)
    n_offs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n_offs < N
    k_range = tl.arange(0, BLOCK_K).to(tl.int64)

    # The LoRA term first, straight into the accumulator, then scaled per row (each row holds
    # its own adapter's s @ b.T only: rows of other adapters are masked to zero); the base GEMM
    # then adds to it. Both strategies run it: one tensor-core dot per adapter present in the
    # tile, each present adapter's lora_b slice read once per tile (gather rows are unsorted,
    # which the jump to the next larger id present does not need). One [BLOCK_M, BLOCK_N]
    # accumulator live at a time, no second one for the term to be scaled after its dot
    # (scaling s first could overflow fp16).
    a_safe = tl.where(valid, aid, 0)
    scale = tl.load(scales_ptr + a_safe, mask=valid, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # addresses = int64 row / column pointers and a scalar int64 rank step, plus int32
    # offsets within the rank chunk: int64 chunk offsets spilled 24 B in dx, pointer tiles
    # carried through the loops 120-168 B at ranks 7 and 100 (odd shapes, sm_80)
    r_range = tl.arange(0, BLOCK_R)
    s_rows = s_ptr + rows[:, None] * stride_sm
    b_cols = b_ptr + n_offs[None, :] * stride_bn
    # one trip per adapter present in the tile, as in the grouped shrink (split 0 only)
    a = tl.min(tl.where(valid, aid, L))
    a = tl.where(first_split, a, L)
    acc = _expand_present_adapters(
        acc, a, aid, valid, n_mask, s_rows, b_cols, r_range, ranks_ptr, R, L,
        stride_sr, stride_bl, stride_br,
        HAS_RANKS, DOT_DTYPE, UPCAST_DOTS, PRECISION, BLOCK_R,
    )  # fmt: skip
    acc = acc * scale[:, None]

    # base GEMM; the tile pointers advance by BLOCK_K * stride (in range while a stride is
    # below 2**26), their int64 offsets are formed once
    x_ptrs = x_ptr + rows[:, None] * stride_xm + (k_start + k_range)[None, :] * stride_xk
    w_ptrs = w_ptr + n_offs[None, :] * stride_wn + (k_start + k_range)[:, None] * stride_wk
    for k0 in range(k_start, k_stop, BLOCK_K):
        k_mask = (k0 + k_range) < K
        xt = tl.load(x_ptrs, mask=in_range[:, None] & k_mask[None, :], other=0.0)
        wt = tl.load(w_ptrs, mask=n_mask[None, :] & k_mask[:, None], other=0.0)
        acc = rounded_dot(xt, wt, acc, DOT_DTYPE, UPCAST_DOTS, PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    if HAS_BIAS:
        bias = tl.load(
            bias_ptr + n_offs * stride_bias, mask=n_mask & (n_offs * 0 + pid_s == 0), other=0.0
        )
        acc += bias.to(tl.float32)[None, :]

    out_mask = in_range[:, None] & n_mask[None, :]
    if SPLIT == _SPLIT_NONE:
        tl.store(
            y_ptr + rows[:, None] * stride_ym + n_offs[None, :] * stride_yn,
            acc.to(y_ptr.dtype.element_ty),
            mask=out_mask,
        )
    else:
        ws_ptrs = ws_ptr + rows[:, None] * stride_wsm + n_offs[None, :] * stride_wsn
        if SPLIT == _SPLIT_ATOMIC:
            tl.atomic_add(ws_ptrs, acc, mask=out_mask, sem="relaxed")
        else:
            tl.store(ws_ptrs + pid_s * stride_wss, acc, mask=out_mask)


@triton.jit
def _lora_multi_splitk_finish_kernel(
    # pointers
    ws_ptr,
    y_ptr,
    # sizes
    M,
    N,
    splits,  # the partials in ws to add: 1 after atomics, the split count otherwise
    # strides
    stride_wss,
    stride_wsm,
    stride_wsn,
    stride_ym,
    stride_yn,
    # meta-parameters
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """``y = sum_j ws[j]`` rounded once to y's dtype, the splits added in index order (without
    atomics the same bits every call)."""
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    ws_ptrs = ws_ptr + offs_m[:, None] * stride_wsm + offs_n[None, :] * stride_wsn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(0, splits):
        acc += tl.load(ws_ptrs, mask=mask, other=0.0)
        ws_ptrs += stride_wss
    tl.store(
        y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
        acc.to(y_ptr.dtype.element_ty),
        mask=mask,
    )


@triton.jit
def _lora_segment_outer_kernel(
    # pointers
    p_ptr,
    q_ptr,
    order_ptr,
    bounds_ptr,
    scales_ptr,
    ranks_ptr,
    out_ptr,
    # sizes
    P,
    Q,
    SPLITS,  # programs per adapter, each over its own slice of the adapter's rows
    # strides
    stride_pm,
    stride_pp,
    stride_qm,
    stride_qq,
    stride_ol,
    stride_op,
    stride_oq,
    # meta-parameters
    HAS_RANKS: tl.constexpr,
    ATOMIC_OUT: tl.constexpr,
    RANK_ON_P: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    UPCAST_DOTS: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_Q: tl.constexpr,
):
    """out[a] = scales[a] * p[rows_a].T @ q[rows_a], rows_a = order[bounds[a]:bounds[a + 1]].

    dA is (p, q) = (dy @ lora_b, x) with the rank on p; dB is (dy, s) with the rank on q. Slots
    past the adapter's rank, and adapters no row used, get zeros.

    SPLITS programs share each adapter, each reducing an equal slice of its rows, so that one
    popular adapter is not one long loop; ATOMIC_OUT (SPLITS > 1) then adds their fp32 partial
    sums into a zeroed fp32 ``out``.
    """
    a = tl.program_id(0).to(tl.int64) // SPLITS
    split = tl.program_id(0).to(tl.int64) % SPLITS
    p_offs = tl.program_id(1).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    q_offs = tl.program_id(2).to(tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    seg_start = tl.load(bounds_ptr + a)
    seg_end = tl.load(bounds_ptr + a + 1)
    chunk = tl.cdiv(seg_end - seg_start, SPLITS)
    start = tl.minimum(seg_start + split * chunk, seg_end)
    end = tl.minimum(start + chunk, seg_end)
    p_lim = P
    q_lim = Q
    if HAS_RANKS:
        if RANK_ON_P:
            p_lim = tl.minimum(tl.load(ranks_ptr + a), P)
        else:
            q_lim = tl.minimum(tl.load(ranks_ptr + a), Q)
    # a block wholly past the rank reduces nothing
    skip = (tl.program_id(1) * BLOCK_P >= p_lim) | (tl.program_id(2) * BLOCK_Q >= q_lim)
    end = tl.where(skip, start, end)
    acc = segment_outer(
        p_ptr, q_ptr, order_ptr, start, end, p_offs, q_offs, p_lim, q_lim,
        stride_pm, stride_pp, stride_qm, stride_qq,
        DOT_DTYPE, UPCAST_DOTS, PRECISION, BLOCK_M, BLOCK_P, BLOCK_Q,
    )  # fmt: skip
    acc = acc * tl.load(scales_ptr + a)
    out_ptrs = out_ptr + a * stride_ol + p_offs[:, None] * stride_op + q_offs[None, :] * stride_oq
    out_mask = (p_offs < P)[:, None] & (q_offs < Q)[None, :]
    if ATOMIC_OUT:
        # a split with no rows adds nothing (the buffer starts at zero)
        nonempty = (q_offs * 0 + (end - start)) > 0
        tl.atomic_add(out_ptrs, acc, mask=out_mask & nonempty[None, :], sem="relaxed")
    else:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------


def _sort_rows(row_ids: torch.Tensor):
    """(sorted ids, order): the rows grouped by adapter, on the device, without a sync."""
    return torch.sort(row_ids, stable=True)


def _shrink(x, w, w_strides, row_ids, sorted_rows, ranks, num_adapters, r_max, strategy):
    """``out [M, r_max] fp32``, ``out[m] = x[m] @ w[ids[m]].T`` for ``w`` seen as [L, R, K]."""
    m, k = x.shape
    out = torch.empty((m, r_max), dtype=torch.float32, device=x.device)
    if m == 0 or r_max == 0:
        return out
    ranks_arg = ranks if ranks is not None else row_ids
    aligned = _divisible(k, r_max, x.stride(0), *w_strides)
    if strategy == "gather":
        block_r = min(triton.next_power_of_2(r_max), 64)
        # one [BLOCK_R, BLOCK_K] adapter tile per program: at most 4,096 elements (2,048 on odd
        # shapes, whose loads are not vectorised; rank 128 spilled with 64 x 128 there)
        block_k = min(128, 4096 // block_r) if aligned else min(64, 2048 // block_r)
        grid = (m, triton.cdiv(r_max, block_r))
        _lora_shrink_gather_kernel[grid](
            x, w, row_ids, ranks_arg, out,
            k, r_max, num_adapters,
            x.stride(0), x.stride(1), *w_strides, out.stride(0), out.stride(1),
            HAS_RANKS=ranks is not None,
            DOT_DTYPE=_dot_dtype(x.dtype, w.dtype),
            UPCAST_DOTS=_dot_flags(x.dtype)["UPCAST_DOTS"],
            BLOCK_R=block_r,
            BLOCK_K=block_k,
            # ptxas stopped the dx shrink (dy [1, 4096] @ lora_b, rank 40, fp16) at 64 registers
            # and spilled 8 B on sm_90; with an explicit ceiling it spills at no rank (27-128)
            maxnreg=None if interpreting() else 255,
        )  # fmt: skip
        return out
    sorted_ids, order = sorted_rows
    block_m = 64 if m >= 64 else 16
    # 32-rank blocks on odd shapes (their loads are not vectorised): 64 spilled 16 B at rank
    # 128 on sm_80 once the loop visits only the ids present, 480-600 B at rank 40 (sm_90)
    block_r = _rank_block(r_max) if aligned else min(_rank_block(r_max), 32)
    grid = (triton.cdiv(m, block_m), triton.cdiv(r_max, block_r))
    _lora_shrink_grouped_kernel[grid](
        x, w, sorted_ids, order, ranks_arg, out,
        m, k, r_max, num_adapters,
        x.stride(0), x.stride(1), *w_strides, out.stride(0), out.stride(1),
        HAS_RANKS=ranks is not None,
        DOT_DTYPE=_dot_dtype(x.dtype, w.dtype),
        **_dot_flags(x.dtype),
        BLOCK_M=block_m,
        BLOCK_R=block_r,
        BLOCK_K=64 if aligned else 32,
        num_warps=4,
    )  # fmt: skip
    return out


def _fused(
    x, w, w_strides, bias, s, b, b_strides, scales, row_ids, sorted_rows, ranks, out, strategy
):
    """``out = x @ w.T + bias + scales[a] * s @ b[a].T``, ``w`` seen as [N, K] and ``b`` as
    [L, N, R] through the given strides."""
    m, k = x.shape
    n = out.shape[1]
    num_adapters = b.shape[0]
    r_max = s.shape[1]
    if m == 0 or n == 0:
        return out
    grouped = strategy == "grouped"
    ids, order = sorted_rows if grouped else (row_ids, row_ids)
    split_k = not grouped and m <= _SPLIT_MAX_M
    key = "gather_decode" if split_k else "gather"
    if grouped:
        key = "grouped_tall" if m >= 2048 else "grouped_decode" if m <= 16 else "grouped"
    aligned = _divisible(k, n, x.stride(0), *w_strides, s.stride(0), *b_strides, out.stride(0))
    table = _FUSED_CONFIGS if aligned else _ODD_FUSED_CONFIGS
    block_m, block_n, block_k, warps, stages = table[key]
    if x.dtype == torch.float32:
        block_k, stages = 32, 2  # fp32 tiles are twice the bytes: keep shared memory in budget
        if split_k:  # and an fp32 dot's operands twice the registers: the 128-wide tile
            block_n, warps = min(block_n, 128), 4
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    splits, k_per_split = 1, k
    if split_k:
        splits, k_per_split = gather_splits(m, n, k, w.element_size(), tiles, block_k, x.device)
    deterministic = torch.are_deterministic_algorithms_enabled()
    split_mode = 0 if splits == 1 else (2 if deterministic else 1)
    rank_chunk = _EXPAND_MAX_R if aligned and key != "grouped_tall" else 16
    if split_mode == 2:
        stages, rank_chunk = min(stages, 3), 16
    ws = out  # unused without a split
    if split_mode == 1:
        ws = torch.zeros((1, m, n), dtype=torch.float32, device=x.device)
    elif split_mode == 2:
        ws = torch.empty((splits, m, n), dtype=torch.float32, device=x.device)
    ws_strides = (ws.stride(0), ws.stride(1), ws.stride(2)) if split_mode else (0, 0, 0)
    # the per-split store at M = 1 (bf16, fp32 adapters): ptxas stopped at 128 registers and
    # spilled 8-16 B on sm_90, the 16-row grouped tile's dx (K = N = 4096, rank 7, fp16) at 80
    # and 12 B on sm_80; with an explicit ceiling (8 warps allow 255) they spill none
    ceiling = (split_mode == 2 or key == "grouped_decode") and not interpreting()
    _lora_multi_fused_kernel[(tiles, splits)](
        x, w, bias if bias is not None else x, s, b, scales, ids, order,
        ranks if ranks is not None else row_ids, out, ws,
        m, n, k, r_max, num_adapters, k_per_split,
        x.stride(0), x.stride(1), *w_strides, s.stride(0), s.stride(1), *b_strides,
        out.stride(0), out.stride(1), vector_stride(bias), *ws_strides,
        HAS_BIAS=bias is not None,
        HAS_RANKS=ranks is not None,
        GROUPED=grouped,
        SPLIT=split_mode,
        DOT_DTYPE=_dot_dtype(x.dtype, b.dtype),
        **_dot_flags(x.dtype),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        BLOCK_R=min(_rank_block(r_max), rank_chunk),
        GROUP_M=8,
        num_warps=warps,
        num_stages=stages,
        maxnreg=255 if ceiling else None,
    )  # fmt: skip
    if split_mode:
        fm, fn = _FINISH_BLOCKS["BLOCK_M"], _FINISH_BLOCKS["BLOCK_N"]
        _lora_multi_splitk_finish_kernel[(triton.cdiv(m, fm), triton.cdiv(n, fn))](
            ws, out,
            m, n, 1 if split_mode == 1 else splits,
            *ws_strides, out.stride(0), out.stride(1),
            **_FINISH_BLOCKS,
            num_warps=4,
        )  # fmt: skip
    return out


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _split_programs(device: torch.device) -> int:
    """Programs the split gather decode aims for: one wave of SMs (each streams its own slice
    of the weight; a second, partial wave would only wait for the first)."""
    if interpreting():
        return _INTERP_SPLIT_PROGRAMS
    index = 0
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
    return _sm_count(index)


def gather_splits(m: int, n: int, k: int, w_bytes: int, tiles: int, block_k: int, device):
    """(splits, k_per_split) of the gather decode: enough K splits that ``tiles`` output tiles
    fill one wave, at most the K tiles, and the fp32 partials within 1/_SPLIT_REDUCTION_SHARE of
    the weight's bytes (``w_bytes`` a weight element). Fixed by the shapes (capture-safe)."""
    k_blocks = triton.cdiv(k, block_k)
    splits = _split_programs(device) // max(1, tiles)
    splits = min(splits, k_blocks, (k * w_bytes) // (4 * _SPLIT_REDUCTION_SHARE * max(1, m)))
    splits = max(1, splits)
    k_per_split = triton.cdiv(k_blocks, splits) * block_k
    return max(1, triton.cdiv(k, k_per_split)), k_per_split


def segment_splits(m: int, deterministic: bool) -> int:
    """Programs per adapter in the dA/dB reduction of an ``m``-row batch: enough that no program
    walks more than about ``_SEGMENT_ROWS_PER_SPLIT`` rows of one adapter even when every row
    has the same one (at most ``_SEGMENT_MAX_SPLITS``). Fixed by ``m``, never by the ids (no
    host synchronisation); splits of adapters with fewer rows find theirs empty and return.
    Deterministic mode keeps one program per adapter (no atomics)."""
    if deterministic:
        return 1
    rows = _INTERP_SEGMENT_ROWS_PER_SPLIT if interpreting() else _SEGMENT_ROWS_PER_SPLIT
    return max(1, min(_SEGMENT_MAX_SPLITS, triton.cdiv(m, rows)))


def _segment_outer(p, q, order, bounds, scales, ranks, out, rank_on_p, dot_dtype):
    """``out[a] = scales[a] * p[rows_a].T @ q[rows_a]`` for every adapter a (see the kernel)."""
    num_adapters, size_p, size_q = out.shape
    if out.numel() == 0:
        return out
    block_p = _rank_block(size_p) if rank_on_p else 64
    block_q = 64 if rank_on_p else _rank_block(size_q)
    splits = segment_splits(p.shape[0], torch.are_deterministic_algorithms_enabled())
    target = out
    if splits > 1:
        target = torch.zeros(out.shape, dtype=torch.float32, device=out.device)
    grid = (num_adapters * splits, triton.cdiv(size_p, block_p), triton.cdiv(size_q, block_q))
    _lora_segment_outer_kernel[grid](
        p, q, order, bounds, scales, ranks if ranks is not None else bounds, target,
        size_p, size_q, splits,
        p.stride(0), p.stride(1), q.stride(0), q.stride(1),
        target.stride(0), target.stride(1), target.stride(2),
        HAS_RANKS=ranks is not None,
        ATOMIC_OUT=splits > 1,
        RANK_ON_P=rank_on_p,
        DOT_DTYPE=dot_dtype,
        **_dot_flags(q.dtype if rank_on_p else p.dtype),  # the activations: x (dA), dy (dB)
        BLOCK_M=32,
        BLOCK_P=block_p,
        BLOCK_Q=block_q,
        num_warps=4,
    )  # fmt: skip
    if target is not out:
        out.copy_(target)
    return out


@on_input_device
def lora_linear_multi_fwd(
    x, weight, bias, lora_a, lora_b, scales, row_ids, ranks=None, *, strategy="auto"
):
    """``(y [M, N] in x.dtype, s [M, r_max] float32)``; ``s`` rows with no adapter are zeros.

    ``strategy`` is ``"gather"``, ``"grouped"`` or ``"auto"`` (``choose_strategy``). Every
    argument may have any strides (``_args``).
    """
    scales, row_ids, ranks = (index_vector(t) for t in (scales, row_ids, ranks))
    m = x.shape[0]
    num_adapters, r_max, _ = lora_a.shape
    n = weight.shape[0]
    if strategy == "auto":
        strategy = choose_strategy(m, num_adapters)
    sorted_rows = _sort_rows(row_ids) if strategy == "grouped" else None
    s = _shrink(
        x, lora_a, lora_a.stride(), row_ids, sorted_rows, ranks, num_adapters, r_max, strategy
    )
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    _fused(
        x, weight, weight.stride(), bias, s, lora_b, lora_b.stride(), scales, row_ids,
        sorted_rows, ranks, y, strategy,
    )  # fmt: skip
    return y, s


@on_input_device
def lora_linear_multi_bwd(
    dy,
    x,
    weight,
    lora_a,
    lora_b,
    scales,
    row_ids,
    s,
    ranks=None,
    *,
    needs_dx=True,
    needs_da=True,
    needs_db=True,
    strategy="auto",
):
    """``(dx [M, K], da [L, r_max, K], db [L, N, r_max])``, None where not needed.

    Each adapter's gradient sums exactly the rows that used it (zeros for an adapter no row used,
    and for the padded slots past ``ranks``); rows with no adapter get ``dy @ weight`` only.
    """
    scales, row_ids, ranks = (index_vector(t) for t in (scales, row_ids, ranks))
    m, k = x.shape
    num_adapters, r_max, _ = lora_a.shape
    if strategy == "auto":
        strategy = choose_strategy(m, num_adapters)
    sorted_rows = None
    if strategy == "grouped" or needs_da or needs_db:
        sorted_rows = _sort_rows(row_ids)
    # t = dy @ lora_b[a], the shrink of dy against lora_b read as [L, R, N]
    t = None
    if needs_dx or needs_da:
        b_as_rnk = (lora_b.stride(0), lora_b.stride(2), lora_b.stride(1))
        t = _shrink(
            dy, lora_b, b_as_rnk, row_ids, sorted_rows, ranks, num_adapters, r_max, strategy
        )
    dx = da = db = None
    if needs_dx:
        dx = torch.empty_like(x, memory_format=torch.contiguous_format)
        # dx = dy @ weight + scales[a] * t @ lora_a[a]: the forward kernel with weight read as
        # [K, N] and lora_a as [L, K, R]
        w_as_kn = (weight.stride(1), weight.stride(0))
        a_as_lkr = (lora_a.stride(0), lora_a.stride(2), lora_a.stride(1))
        _fused(
            dy, weight, w_as_kn, None, t, lora_a, a_as_lkr, scales, row_ids, sorted_rows, ranks,
            dx, strategy,
        )  # fmt: skip
    if needs_da or needs_db:
        sorted_ids, order = sorted_rows
        bounds = torch.searchsorted(
            sorted_ids,
            torch.arange(num_adapters + 1, device=x.device, dtype=sorted_ids.dtype),
        )
        if needs_da:
            da = torch.empty(lora_a.shape, dtype=lora_a.dtype, device=x.device)
            dot_dtype = _dot_dtype(x.dtype, lora_a.dtype)
            _segment_outer(t, x, order, bounds, scales, ranks, da, True, dot_dtype)
        if needs_db:
            db = torch.empty(lora_b.shape, dtype=lora_b.dtype, device=x.device)
            dot_dtype = _dot_dtype(dy.dtype, lora_b.dtype)
            _segment_outer(dy, s, order, bounds, scales, ranks, db, False, dot_dtype)
    return dx, da, db
