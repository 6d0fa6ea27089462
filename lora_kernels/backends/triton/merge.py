"""Merge a LoRA adapter into its base weight in place, in Triton.

Formula and shapes (``r`` is any rank >= 1)::

    weight [N, K]  (float16, bfloat16 or float32)  changed in place
    lora_a [r, K], lora_b [N, r]  (float16, bfloat16 or float32; they need not share a dtype)
    weight[n, k] <- round(weight[n, k] + scale * sum_j lora_b[n, j] * lora_a[j, k])

Unmerging is the same launch with ``-scale``.

Each program owns one ``[BLOCK_N, BLOCK_K]`` tile of the weight. It issues the load of that tile
first, so the memory latency overlaps the product, then computes the tile's slice of
``lora_b @ lora_a`` with ``tl.dot`` over ``r`` in ``BLOCK_R`` chunks into an fp32 accumulator,
adds ``scale`` times it to the fp32 weight and rounds once when it stores. No ``[N, K]`` delta is
ever written: the extra memory is one tile in registers, and the weight is read and written once,
so the merge runs at memory bandwidth. lora_a (``r * K``) and lora_b (``N * r``) are small and
re-read from L2 by the programs that share them; consecutive program ids walk down N, so the
programs in flight share one ``[r, BLOCK_K]`` slice of lora_a.

Precision: two 16-bit operands of the same dtype go to the tensor cores as they are (their
products are exact in fp32); fp32 operands, or a mixed pair (upcast to fp32), use 3xTF32
(``input_precision="tf32x3"``), about fp32 accuracy on tensor cores. Whatever the weight's dtype,
the sum is formed in fp32 and rounded once, so a 16-bit result is within half an ulp of the exact
``weight + scale * lora_b @ lora_a`` (up to the fp32 product's own error, orders of magnitude
smaller). Two workarounds run under Triton 3.9's interpreter, and only there: it returns garbage
for ``tl.dot`` on bf16 operands, so the ``UPCAST_DOTS`` constexpr upcasts them to fp32; and it
rounds fp32 to bf16 by truncation (a GPU rounds to nearest even), so the ``ROUND_BF16_BY_BITS``
constexpr rounds to nearest even with integer operations on the bits.

No autotuning: an autotuner would time the kernel by running it several times, and this kernel
changes its input in place. The GPU tile is fixed; the interpreter uses tiles smaller than the
odd test sizes so that every ragged edge and more than one rank chunk is exercised.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreting, on_input_device
from ._lora_product import lora_product_tile
from ._rounding import round_to_bf16

__all__ = ["merge_"]


# GPU tile: a [64, 64] weight tile and rank chunks of 32. The whole compile matrix
# (benchmarks/triton_compile_report.py) measured [64, 128] tiles with 64-rank chunks spilling
# 392-1,532 B on odd K/N and at rank 128 (both targets); these are spill-free there.
CUDA_META = {"BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 2}
# fp32 (or mixed) adapters keep 3xTF32 (a merge is rounded once into the weight, so it keeps fp32
# accuracy), whose split operands need twice the registers: 8 warps and a 32-deep K tile.
CUDA_META_FP32 = {**CUDA_META, "BLOCK_K": 32, "num_warps": 8}
CUDA_MAX_BLOCK_R = 32
# Interpreter tile: small, so the tests' odd sizes straddle tile edges and ranks above 16 loop.
_INTERP_META = {"BLOCK_N": 32, "BLOCK_K": 64}
_INTERP_MAX_BLOCK_R = 16


@triton.jit
def _merge_kernel(
    # pointers
    w_ptr,
    a_ptr,
    b_ptr,
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
    # scalars
    scale,
    # meta-parameters
    FP32_OPERANDS: tl.constexpr,
    UPCAST_DOTS: tl.constexpr,
    ROUND_BF16_BY_BITS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """``w[tile] = round(w[tile] + scale * b[tile rows] @ a[:, tile cols])`` for one tile.

    FP32_OPERANDS upcasts both lora tiles to fp32 (fp32 or mixed-dtype adapters) and multiplies
    them with 3xTF32; otherwise they share a 16-bit dtype and multiply natively.
    """
    pid_n = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    mask_k = offs_k < K
    mask_w = mask_n[:, None] & mask_k[None, :]

    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk
    w_tile = tl.load(w_ptrs, mask=mask_w, other=0.0)

    acc = lora_product_tile(
        a_ptr, b_ptr, offs_n, offs_k, mask_n, mask_k, R,
        stride_ar, stride_ak, stride_bn, stride_br,
        FP32_OPERANDS, UPCAST_DOTS, BLOCK_N, BLOCK_K, BLOCK_R,
    )  # fmt: skip
    merged = w_tile.to(tl.float32) + acc * scale
    if ROUND_BF16_BY_BITS:
        tl.store(w_ptrs, round_to_bf16(merged), mask=mask_w)
    else:
        tl.store(w_ptrs, merged.to(w_ptr.dtype.element_ty), mask=mask_w)


def tile_launch(
    weight, lora_a, lora_b, upcast: bool, interp_meta: dict, interp_max_r: int, cuda_meta=None
):
    """``(grid, meta)`` of a merge-shaped launch over ``weight [N, K]``'s tiles: the tile (the
    CUDA one by the adapters' dtypes, ``interp_meta`` when ``upcast``, i.e. interpreting), the
    rank chunk, and the constexprs ``FP32_OPERANDS``, ``UPCAST_DOTS``, ``ROUND_BF16_BY_BITS``
    that ``lora_product_tile`` and the store take. ``upcast`` comes from the calling module's
    own ``interpreting()`` (the one the compile gate's twin of that module switches off).
    Shared by ``merge_`` and DoRA's merge, which have their own interpreter tiles; ``cuda_meta``
    replaces the CUDA tile of 16-bit adapters (DoRA's takes more warps)."""
    n, k = weight.shape
    r = lora_a.shape[0]
    fp32_operands = not (lora_a.dtype == lora_b.dtype and lora_a.dtype != torch.float32)
    cuda = cuda_meta if cuda_meta is not None else CUDA_META
    meta = dict(interp_meta if upcast else CUDA_META_FP32 if fp32_operands else cuda)
    max_block_r = interp_max_r if upcast else CUDA_MAX_BLOCK_R
    # tl.dot needs every dimension >= 16: smaller ranks are padded (masked) up to 16.
    meta["BLOCK_R"] = min(max(16, triton.next_power_of_2(r)), max_block_r)
    meta["FP32_OPERANDS"] = fp32_operands
    meta["UPCAST_DOTS"] = upcast
    meta["ROUND_BF16_BY_BITS"] = upcast and weight.dtype == torch.bfloat16
    grid = (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(k, meta["BLOCK_K"]))
    return grid, meta


@on_input_device
def merge_(
    weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float
) -> torch.Tensor:
    """In place: ``weight += scale * lora_b @ lora_a``, fp32 accumulation, one rounding.

    weight [N, K] (fp16, bf16 or fp32, any strides); lora_a [r, K], lora_b [N, r] (fp16, bf16 or
    fp32, any strides, any rank r >= 1) on weight's device. Returns ``weight``. Unmerge is
    ``merge_(weight, lora_a, lora_b, -scale)``.
    """
    n, k = weight.shape
    r = lora_a.shape[0]
    if n == 0 or k == 0:
        return weight
    grid, meta = tile_launch(
        weight, lora_a, lora_b, interpreting(), _INTERP_META, _INTERP_MAX_BLOCK_R
    )
    _merge_kernel[grid](
        weight, lora_a, lora_b,
        n, k, r,
        weight.stride(0), weight.stride(1), lora_a.stride(0), lora_a.stride(1),
        lora_b.stride(0), lora_b.stride(1),
        float(scale),
        **meta,
    )  # fmt: skip
    return weight
