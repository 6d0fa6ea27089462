"""Mixture-of-experts LoRA in Triton: both expert projections as grouped GEMMs with the LoRA
shrink and expand fused in the same tiles, forward and backward (shapes and formula:
``lora_kernels.backends.torch.moe``).

The (token, slot) pairs are sorted by (expert, adapter) on the device (a stable ``torch.sort``;
counts and offsets by ``searchsorted``, so nothing synchronises with the host and every grid is
sized from the shapes alone). Each expert's pairs are padded to whole ``BLOCK_M`` row blocks, so a
block belongs to one expert: the grid has ``cdiv(P, BLOCK_M) + min(E, P)`` row blocks, an upper
bound on what the experts need; a block past the last expert's runs no loop and stores nothing.

``_moe_grouped_lora_kernel`` computes, for one [BLOCK_M, BLOCK_N] tile of one expert ``e``::

    out[i] = in[src[i]] @ W[e]^T + bias[e] + scale_a * (in[src[i]] @ A[a, e]^T) @ B[a, e]^T

With one adapter and a rank that fits one rank block (``FUSE_SHRINK``), the shrink
``in @ A^T`` rides the base GEMM's K loop: the input tile is loaded once for both dots. With
several adapters the block's rows are sorted by adapter, so its adapters form a contiguous range
and each gets its shrink (a K loop over its rows) and expand; rows of the base experts only
(adapter -1) get neither. The rank-``r`` shrink is written by the tiles of the first column
block (``s``, kept for the backward). ``delta W`` is never formed.

Forward: gate-up tile (rows gathered from x), the activation (elementwise, in torch), down tile,
then the router-weighted sum over each token's ``k`` slots by a gather (deterministic: no atomics).
Backward reuses the kernel with the weights and factors read transposed through their strides:
``dh = dyo W_d[e] + s (dyo B_d) A_d`` (its shrink ``dyo B_d`` is dA_d's left factor), the
activation's backward, ``dx = dg W_gu[e] + s (dg B_gu) A_gu``; then ``_moe_segment_outer_kernel``
reduces each (adapter, expert) segment's rows into ``dA`` and ``dB`` (one program per output
tile, no atomics: deterministic).

Precision follows the package policy (``lora_multi``'s docstring): fp32 accumulators, every dot on
the activations' dtype (tensor cores for 16-bit), the interpreter's bf16 dots on operands rounded
as a GPU rounds and widened to fp32. Block sizes are first guesses, to be tuned on a GPU; the
compile gate holds them spill-free on sm_80 and sm_90.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..torch.moe import activation_bwd, activation_fwd
from . import interpreting, on_input_device
from ._args import index_vector
from ._segment import rounded_dot, segment_outer

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}

# Largest rank whose shrink accumulator rides the base GEMM's K loop (beside the [M, N] one).
_FUSE_MAX_R = 32


def _dot_flags(act_dtype: torch.dtype) -> dict:
    """``DOT_DTYPE`` (the activations'), the interpreter's bf16 upcast, and TF32 for fp32 only
    where ``torch.backends.cuda.matmul.allow_tf32`` allows it (PyTorch's rule)."""
    tf32 = act_dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    return {
        "DOT_DTYPE": _TL_DTYPES[act_dtype],
        "UPCAST_DOTS": interpreting() and act_dtype == torch.bfloat16,
        "PRECISION": "tf32" if tf32 else "ieee",
    }


def _rank_block(r: int) -> int:
    """Rank slots per step: a power of two, >= 16 for ``tl.dot``, at most 64."""
    return max(16, min(triton.next_power_of_2(r), 64))


def _block_m(pairs: int, experts: int, dtype: torch.dtype) -> int:
    """Row block from the mean pairs per hit expert: decode steps give each expert a few rows,
    and padding them to 64 would waste most of every tile. fp32 tiles are twice the registers:
    at most 32 rows (64 spilled 16-900 B on sm_80)."""
    mean = pairs / max(1, min(experts, pairs))
    block = 16 if mean <= 16 else 32 if mean <= 32 else 64
    return min(block, 32) if dtype == torch.float32 else block


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _moe_grouped_lora_kernel(
    # pointers
    in_ptr,
    src_ptr,
    pair_ptr,
    aid_ptr,
    block_expert_ptr,
    w_ptr,
    bias_ptr,
    a_ptr,
    b_ptr,
    scales_ptr,
    s_ptr,
    out_ptr,
    # sizes
    N,
    K,
    R,
    L,
    E,
    # strides
    stride_im,
    stride_ik,
    stride_we,
    stride_wn,
    stride_wk,
    stride_biase,
    stride_biasn,
    stride_al,
    stride_ae,
    stride_ar,
    stride_ak,
    stride_bl,
    stride_be,
    stride_bn,
    stride_br,
    stride_sm,
    stride_sr,
    stride_om,
    stride_on,
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    HAS_LORA: tl.constexpr,
    FUSE_SHRINK: tl.constexpr,
    SRC_GATHER: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    UPCAST_DOTS: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """out[i] = in[src[i]] @ w[e].T + bias[e] + scales[a] * (in[src[i]] @ a[a, e].T) @ b[a, e].T
    for the rows i = pair[pos] of one expert's row block (pair -1: padding); ``a = aid[i]``."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    has_expert = e < E
    e = tl.minimum(e, E - 1)  # blocks past the last expert's: no loop, no store
    pos = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(pair_ptr + pos).to(tl.int64)
    live = tl.where(has_expert, pair, -1) >= 0
    pair = tl.where(live, pair, 0)
    rows = tl.load(src_ptr + pair, mask=live, other=0).to(tl.int64) if SRC_GATHER else pair
    aid = tl.load(aid_ptr + pair, mask=live, other=-1).to(tl.int64)
    n_offs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n_offs < N
    r_offs = tl.arange(0, BLOCK_R)
    k_end = tl.where(has_expert, K, 0)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    s_acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, k_end, BLOCK_K):
        k_offs = k0 + tl.arange(0, BLOCK_K)
        k_mask = k_offs < K
        xt = tl.load(
            in_ptr + rows[:, None] * stride_im + k_offs[None, :] * stride_ik,
            mask=live[:, None] & k_mask[None, :],
            other=0.0,
        )
        wt = tl.load(
            w_ptr + e * stride_we + n_offs[None, :] * stride_wn + k_offs[:, None] * stride_wk,
            mask=n_mask[None, :] & k_mask[:, None],
            other=0.0,
        )
        acc = rounded_dot(xt, wt, acc, DOT_DTYPE, UPCAST_DOTS, PRECISION)
        if FUSE_SHRINK:
            at = tl.load(
                a_ptr + e * stride_ae + r_offs[None, :] * stride_ar + k_offs[:, None] * stride_ak,
                mask=(r_offs < R)[None, :] & k_mask[:, None],
                other=0.0,
            )
            s_acc = rounded_dot(xt, at, s_acc, DOT_DTYPE, UPCAST_DOTS, PRECISION)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + e * stride_biase + n_offs * stride_biasn, mask=n_mask, other=0.0)
        acc += bias.to(tl.float32)[None, :]

    if HAS_LORA:
        if FUSE_SHRINK:  # one adapter (id 0), the whole rank in one block
            mine = live & (aid == 0)
            s_acc = tl.where(mine[:, None], s_acc, 0.0)
            s_rows = s_ptr + pair[:, None] * stride_sm + r_offs[None, :] * stride_sr
            if pid_n == 0:
                tl.store(s_rows, s_acc, mask=live[:, None] & (r_offs < R)[None, :])
            bt = tl.load(
                b_ptr + e * stride_be + n_offs[None, :] * stride_bn + r_offs[:, None] * stride_br,
                mask=n_mask[None, :] & (r_offs < R)[:, None],
                other=0.0,
            )
            acc = rounded_dot(
                s_acc * tl.load(scales_ptr), bt, acc, DOT_DTYPE, UPCAST_DOTS, PRECISION
            )
        else:
            with_adapter = live & (aid >= 0) & (aid < L)
            a_lo = tl.min(tl.where(with_adapter, aid, L))
            a_hi = tl.max(tl.where(with_adapter, aid, -1))
            for a in range(a_lo, a_hi + 1):
                mine = with_adapter & (aid == a)
                scale = tl.load(scales_ptr + a)
                for r0 in range(0, R, BLOCK_R):
                    rr = r0 + r_offs
                    r_mask = rr < R
                    s_tile = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
                    for k0 in range(0, K, BLOCK_K):
                        k_offs = k0 + tl.arange(0, BLOCK_K)
                        k_mask = k_offs < K
                        xt = tl.load(
                            in_ptr + rows[:, None] * stride_im + k_offs[None, :] * stride_ik,
                            mask=mine[:, None] & k_mask[None, :],
                            other=0.0,
                        )
                        at = tl.load(
                            a_ptr + a * stride_al + e * stride_ae + rr[None, :] * stride_ar
                            + k_offs[:, None] * stride_ak,
                            mask=r_mask[None, :] & k_mask[:, None],
                            other=0.0,
                        )  # fmt: skip
                        s_tile = rounded_dot(xt, at, s_tile, DOT_DTYPE, UPCAST_DOTS, PRECISION)
                    s_rows = s_ptr + pair[:, None] * stride_sm + rr[None, :] * stride_sr
                    if pid_n == 0:
                        tl.store(s_rows, s_tile, mask=mine[:, None] & r_mask[None, :])
                    bt = tl.load(
                        b_ptr + a * stride_bl + e * stride_be + n_offs[None, :] * stride_bn
                        + rr[:, None] * stride_br,
                        mask=n_mask[None, :] & r_mask[:, None],
                        other=0.0,
                    )  # fmt: skip
                    acc = rounded_dot(s_tile * scale, bt, acc, DOT_DTYPE, UPCAST_DOTS, PRECISION)

    tl.store(
        out_ptr + pair[:, None] * stride_om + n_offs[None, :] * stride_on,
        acc.to(out_ptr.dtype.element_ty),
        mask=live[:, None] & n_mask[None, :],
    )


@triton.jit
def _moe_segment_outer_kernel(
    # pointers
    p_ptr,
    q_ptr,
    order_ptr,
    bounds_ptr,
    scales_ptr,
    out_ptr,
    # sizes
    P,
    Q,
    # strides
    stride_pm,
    stride_pp,
    stride_qm,
    stride_qq,
    stride_og,
    stride_op,
    stride_oq,
    # meta-parameters
    DOT_DTYPE: tl.constexpr,
    UPCAST_DOTS: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_Q: tl.constexpr,
):
    """out[g] = scales[g] * p[rows_g].T @ q[rows_g], rows_g = order[bounds[g]:bounds[g + 1]]
    (g = adapter * E + expert; a segment no pair used gets zeros)."""
    g = tl.program_id(0).to(tl.int64)
    p_offs = tl.program_id(1).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    q_offs = tl.program_id(2).to(tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    start = tl.load(bounds_ptr + g)
    end = tl.load(bounds_ptr + g + 1)
    acc = segment_outer(
        p_ptr, q_ptr, order_ptr, start, end, p_offs, q_offs, P, Q,
        stride_pm, stride_pp, stride_qm, stride_qq,
        DOT_DTYPE, UPCAST_DOTS, PRECISION, BLOCK_M, BLOCK_P, BLOCK_Q,
    )  # fmt: skip
    acc = acc * tl.load(scales_ptr + g)
    tl.store(
        out_ptr + g * stride_og + p_offs[:, None] * stride_op + q_offs[None, :] * stride_oq,
        acc.to(out_ptr.dtype.element_ty),
        mask=(p_offs < P)[:, None] & (q_offs < Q)[None, :],
    )


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------


class _Plan:
    """The pairs sorted by (expert, adapter) and padded to row blocks, all on the device.

    ``order [P]``: pair index of each sorted position; ``tokens [P]``: its token; ``aid [P]``:
    its adapter (-1: base); ``inv [P]``: the sorted position of each pair; ``valid [P]``: per pair,
    whether its expert is in range; ``pair [n_blocks * BLOCK_M]``: the sorted position at each
    padded row (-1: padding); ``block_expert [n_blocks]`` (E: no expert).
    """

    def __init__(self, top_k_ids, token_ids, num_experts: int, num_adapters: int, block_m: int):
        dev = top_k_ids.device
        k = top_k_ids.shape[1]
        experts = top_k_ids.reshape(-1).long()
        p = experts.shape[0]
        if token_ids is None:
            adapter = torch.zeros_like(experts)
        else:
            ids = token_ids.long().repeat_interleave(k)
            adapter = torch.where((ids >= 0) & (ids < num_adapters), ids, -1)
        self.valid = (experts >= 0) & (experts < num_experts)
        slots = num_adapters + 1  # the base experts' slot last within an expert
        slot = torch.where(adapter >= 0, adapter, num_adapters)
        key = torch.where(self.valid, experts * slots + slot, num_experts * slots)
        sorted_key, self.order = torch.sort(key, stable=True)
        self.tokens = torch.div(self.order, k, rounding_mode="floor")
        sorted_expert = torch.div(sorted_key, slots, rounding_mode="floor")
        sorted_slot = sorted_key - sorted_expert * slots
        self.aid = torch.where(sorted_slot < num_adapters, sorted_slot, -1)
        self.inv = torch.empty_like(self.order)
        self.inv[self.order] = torch.arange(p, device=dev)
        self.sorted_expert = sorted_expert
        # per expert: first sorted position, row count, row blocks
        edges = torch.searchsorted(sorted_expert, torch.arange(num_experts + 1, device=dev))
        counts = edges[1:] - edges[:-1]
        blocks = torch.div(counts + block_m - 1, block_m, rounding_mode="floor")
        block_end = torch.cumsum(blocks, 0)
        self.n_blocks = triton.cdiv(p, block_m) + min(num_experts, p)
        self.block_expert = torch.searchsorted(
            block_end, torch.arange(self.n_blocks, device=dev), right=True
        )
        e_safe = sorted_expert.clamp(max=num_experts - 1)
        within = torch.arange(p, device=dev) - edges[e_safe]
        padded = (block_end - blocks)[e_safe] * block_m + within
        dump = self.n_blocks * block_m  # dropped pairs land in one extra slot, cut off below
        padded = torch.where(sorted_expert < num_experts, padded, dump)
        pair = torch.full((dump + 1,), -1, dtype=torch.int64, device=dev)
        pair[padded] = torch.arange(p, device=dev)
        self.pair = pair[:dump]
        self.block_m = block_m
        self.num_experts = num_experts
        self.num_adapters = num_adapters

    def segments(self):
        """``(order2, bounds [L E + 1])``: the sorted positions regrouped adapter-major, so that
        segment ``g = a E + e`` holds the pairs of adapter ``a`` on expert ``e``."""
        num = self.num_adapters * self.num_experts
        key2 = torch.where(
            (self.aid >= 0) & (self.sorted_expert < self.num_experts),
            self.aid * self.num_experts + self.sorted_expert,
            num,
        )
        sorted_key2, order2 = torch.sort(key2, stable=True)
        bounds = torch.searchsorted(sorted_key2, torch.arange(num + 1, device=key2.device))
        return order2, bounds


def _grouped(plan, inp, src, w, w_strides, bias, a, a_strides, b, b_strides, scales, s, out):
    """One grouped projection: ``out [P, N]`` in sorted pair order, ``s [P, R]`` its shrink;
    ``w`` seen as [E, N, K], ``a`` as [L, E, R, K], ``b`` as [L, E, N, R] (``a`` None: no
    LoRA)."""
    n, k = out.shape[1], inp.shape[1]
    if out.shape[0] == 0 or n == 0:
        return
    has_lora = a is not None
    r = s.shape[1] if has_lora else 1
    fuse = has_lora and plan.num_adapters == 1 and r <= _FUSE_MAX_R
    # the unfused path's shrink loop nests in the adapter loop beside the [M, N] accumulator:
    # rank chunks of 16 and two stages keep it spill-free (rank 64 fp32 spilled 36-60 B, the
    # fp16 multi-adapter backward 16 B, on sm_80)
    block_r = _rank_block(r) if fuse or not has_lora else 16
    unfused = has_lora and not fuse
    stages = 2 if inp.dtype == torch.float32 or unfused else 3
    # the unfused path's nested adapter / rank / K loops beside the [M, N] accumulator spilled
    # 8-72 B at 4 warps (sm_80 and sm_90, 16-bit): 8 warps halve each thread's share; 16-row
    # blocks (where 8 warps spilled too) take a 32-wide N tile instead
    warps = 8 if unfused and plan.block_m >= 32 else 4
    aligned = all(v % 16 == 0 for v in (k, n, inp.stride(0)))
    # the multi-adapter path's shrink loop nested in the adapter loop spilled 24 B at
    # BLOCK_M 32 x BLOCK_K 64 on sm_80 (gathered rows): BLOCK_K 32 there
    block_k = 64 if aligned and inp.dtype != torch.float32 and (fuse or not has_lora) else 32
    block_n = 32 if unfused and plan.block_m < 32 else 64
    grid = (plan.n_blocks, triton.cdiv(n, block_n))
    dummy = out
    _moe_grouped_lora_kernel[grid](
        inp, src if src is not None else plan.pair, plan.pair, plan.aid, plan.block_expert,
        w, bias if bias is not None else dummy, a if has_lora else dummy,
        b if has_lora else dummy, scales, s if has_lora else dummy, out,
        n, k, r, plan.num_adapters, plan.num_experts,
        inp.stride(0), inp.stride(1), *w_strides,
        *(bias.stride() if bias is not None else (0, 0)),
        *(a_strides if has_lora else (0, 0, 0, 0)),
        *(b_strides if has_lora else (0, 0, 0, 0)),
        *(s.stride() if has_lora else (0, 0)),
        out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None,
        HAS_LORA=has_lora,
        FUSE_SHRINK=fuse,
        SRC_GATHER=src is not None,
        **_dot_flags(inp.dtype),
        BLOCK_M=plan.block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        BLOCK_R=block_r,
        num_warps=warps,
        num_stages=stages,
        # ptxas stopped 16-row blocks (and the unfused path) at 128 registers and spilled
        # 8-48 B (sm_80 and sm_90, 16-bit) under every block shape tried; with an explicit
        # ceiling they take up to 232 and spill nothing. Other tiles keep ptxas's own choice.
        maxnreg=255 if unfused or plan.block_m == 16 else None,
    )  # fmt: skip


def _segment_outer(p, q, order2, bounds, scales_per_segment, out, rank_on_p, act_dtype):
    """``out[g] = scales[g] * p[rows_g].T @ q[rows_g]`` over every (adapter, expert) segment."""
    groups, size_p, size_q = out.shape
    if out.numel() == 0:
        return out
    # fp32 operands: 32 wide and rank blocks of at most 32 (64 x 64 spilled 40-84 B on sm_80)
    wide = 32 if act_dtype == torch.float32 else 64
    rank_block = min(_rank_block(size_p if rank_on_p else size_q), wide)
    block_p = rank_block if rank_on_p else wide
    block_q = wide if rank_on_p else rank_block
    grid = (groups, triton.cdiv(size_p, block_p), triton.cdiv(size_q, block_q))
    _moe_segment_outer_kernel[grid](
        p, q, order2, bounds, scales_per_segment, out,
        size_p, size_q,
        p.stride(0), p.stride(1), q.stride(0), q.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        **_dot_flags(act_dtype),
        BLOCK_M=32,
        BLOCK_P=block_p,
        BLOCK_Q=block_q,
        num_warps=4,
    )  # fmt: skip
    return out


def _t_strides(t):
    """Strides of a 4-D factor stack with its last two dims swapped (read transposed)."""
    return (t.stride(0), t.stride(1), t.stride(3), t.stride(2))


def _combine(plan, rows, weights, t, k):
    """``y[t] = sum_j weights[t, j] * rows[pos(t, j)]`` in fp32, by a gather (no atomics)."""
    picked = rows.index_select(0, plan.inv).float()
    w = torch.where(plan.valid, weights.reshape(-1).float(), 0.0)
    picked = torch.where(plan.valid[:, None], picked, 0.0) * w[:, None]
    return picked.view(t, k, -1).sum(1)


def _shrink_buffer(a, p, x):
    """``[P, r]`` fp32 zeros for a projection's shrink (an empty tensor without LoRA)."""
    if a is None:
        return x.new_empty(0)
    return torch.zeros((p, a.shape[2]), dtype=torch.float32, device=x.device)


@on_input_device
def moe_lora_fwd(
    x, top_k_ids, top_k_weights, w_gu, bias_gu, a_gu, b_gu, w_d, bias_d, a_d, b_d, scales,
    token_ids=None, activation="silu", swiglu_alpha=1.702, swiglu_limit=7.0, keep_out=False,
):  # fmt: skip
    """``(y [T, H], g [P, 2I], s_gu [P, r], s_d [P, r'], o [P, H])`` as the torch backend's,
    in this backend's sorted pair order."""
    t, hidden = x.shape
    k = top_k_ids.shape[1]
    p = t * k
    num_experts, n_gu, _ = w_gu.shape
    block_m = _block_m(p, num_experts, x.dtype)
    plan = _Plan(top_k_ids, token_ids, num_experts, scales.shape[0], block_m)
    sc = index_vector(scales.to(device=x.device, dtype=torch.float32))  # read by position
    g = torch.empty((p, n_gu), dtype=x.dtype, device=x.device)
    s_gu = _shrink_buffer(a_gu, p, x)
    s_d = _shrink_buffer(a_d, p, x)
    _grouped(
        plan, x, plan.tokens, w_gu, w_gu.stride(), bias_gu,
        a_gu, None if a_gu is None else a_gu.stride(), b_gu,
        None if b_gu is None else b_gu.stride(), sc, s_gu, g,
    )  # fmt: skip
    h = activation_fwd(g, activation, swiglu_alpha, swiglu_limit).to(x.dtype)
    o = torch.empty((p, hidden), dtype=x.dtype, device=x.device)
    _grouped(
        plan, h, None, w_d, w_d.stride(), bias_d,
        a_d, None if a_d is None else a_d.stride(), b_d,
        None if b_d is None else b_d.stride(), sc, s_d, o,
    )  # fmt: skip
    y = _combine(plan, o, top_k_weights, t, k).to(x.dtype)
    return y, g, s_gu, s_d, (o if keep_out else x.new_empty(0))


@on_input_device
def moe_lora_bwd(
    dy, x, top_k_ids, top_k_weights, w_gu, a_gu, b_gu, w_d, a_d, b_d, scales, token_ids, g,
    s_gu, s_d, o, activation="silu", swiglu_alpha=1.702, swiglu_limit=7.0, *, needs_dx=True,
    needs_dw=True, needs_lora_gu=True, needs_lora_d=True,
):  # fmt: skip
    """``(dx [T, H], dw [T, k], da_gu, db_gu, da_d, db_d)``, None where not needed."""
    t, hidden = x.shape
    k = top_k_ids.shape[1]
    p = t * k
    num_experts = w_gu.shape[0]
    num_adapters = scales.shape[0]
    block_m = _block_m(p, num_experts, x.dtype)
    plan = _Plan(top_k_ids, token_ids, num_experts, num_adapters, block_m)
    sc = index_vector(scales.to(device=x.device, dtype=torch.float32))  # read by position
    lora_gu = needs_lora_gu and a_gu is not None
    lora_d = needs_lora_d and a_d is not None
    dys = dy.index_select(0, plan.tokens)
    dw = None
    if needs_dw:
        pair_dw = (dys.float() * o.float()).sum(1).index_select(0, plan.inv)
        dw = torch.where(plan.valid, pair_dw, 0.0).view(t, k).to(top_k_weights.dtype)
    weights = top_k_weights.reshape(-1).index_select(0, plan.order).float()
    dyo = (dys.float() * weights[:, None]).to(x.dtype)
    need_dg = needs_dx or lora_gu
    t_d = t_gu = dg = None
    if need_dg or lora_d:
        # dh = dyo W_d[e] + s (dyo B_d) A_d: W_d read as [E, I, H], B_d as the shrink, A_d as
        # the expand; the shrink t_d = dyo B_d is dA_d's left factor
        dh = torch.empty((p, w_d.shape[2]), dtype=x.dtype, device=x.device)
        t_d = _shrink_buffer(a_d, p, x)
        w_d_t = (w_d.stride(0), w_d.stride(2), w_d.stride(1))
        _grouped(
            plan, dyo, None, w_d, w_d_t, None,
            b_d, None if b_d is None else _t_strides(b_d), a_d,
            None if a_d is None else _t_strides(a_d), sc, t_d, dh,
        )  # fmt: skip
        if need_dg:
            dg = activation_bwd(g, dh, activation, swiglu_alpha, swiglu_limit).to(x.dtype)
    dx = None
    if need_dg:
        dxs = torch.empty((p, hidden), dtype=x.dtype, device=x.device)
        t_gu = _shrink_buffer(a_gu, p, x)
        w_gu_t = (w_gu.stride(0), w_gu.stride(2), w_gu.stride(1))
        _grouped(
            plan, dg, None, w_gu, w_gu_t, None,
            b_gu, None if b_gu is None else _t_strides(b_gu), a_gu,
            None if a_gu is None else _t_strides(a_gu), sc, t_gu, dxs,
        )  # fmt: skip
        if needs_dx:
            ones = torch.ones_like(top_k_weights, dtype=torch.float32)
            dx = _combine(plan, dxs, ones, t, k).to(x.dtype)
    da_gu = db_gu = da_d = db_d = None
    if lora_gu or lora_d:
        order2, bounds = plan.segments()
        seg_scales = sc.repeat_interleave(num_experts)
        groups = num_adapters * num_experts
        if lora_d:
            h = activation_fwd(g, activation, swiglu_alpha, swiglu_limit).to(x.dtype)
            da_d = torch.empty(a_d.shape, dtype=a_d.dtype, device=x.device)
            db_d = torch.empty(b_d.shape, dtype=b_d.dtype, device=x.device)
            seg = (order2, bounds, seg_scales)
            _segment_outer(t_d, h, *seg, da_d.view(groups, *a_d.shape[2:]), True, x.dtype)
            _segment_outer(dyo, s_d, *seg, db_d.view(groups, *b_d.shape[2:]), False, x.dtype)
        if lora_gu:
            xs = x.index_select(0, plan.tokens)
            da_gu = torch.empty(a_gu.shape, dtype=a_gu.dtype, device=x.device)
            db_gu = torch.empty(b_gu.shape, dtype=b_gu.dtype, device=x.device)
            seg = (order2, bounds, seg_scales)
            _segment_outer(t_gu, xs, *seg, da_gu.view(groups, *a_gu.shape[2:]), True, x.dtype)
            _segment_outer(dg, s_gu, *seg, db_gu.view(groups, *b_gu.shape[2:]), False, x.dtype)
    return dx, dw, da_gu, db_gu, da_d, db_d
