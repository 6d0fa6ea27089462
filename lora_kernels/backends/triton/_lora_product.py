"""The product tile of a merge, as a device function the LoRA merge (``merge.py``) and the DoRA
merge (``dora.py``) share: ``B[rows] @ A[:, cols]`` over the rank in ``BLOCK_R`` chunks, in fp32.

Triton inlines it into each kernel, so each compiles as if the loop were written in it. The
compile gate compiles it with each family's twin (``SHARED_DEVICE_MODULES`` in
tools/compile_gate.py).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def lora_product_tile(
    a_ptr, b_ptr, offs_n, offs_k, mask_n, mask_k, R,
    stride_ar, stride_ak, stride_bn, stride_br,
    FP32_OPERANDS: tl.constexpr, UPCAST_DOTS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """``b[offs_n, :R] @ a[:R, offs_k]``, a [BLOCK_N, BLOCK_K] fp32 tile (unscaled).

    Masked rank columns load as zeros, so a rank below the chunk adds nothing. Two 16-bit
    operands of one dtype multiply on tensor cores as they are (exact products in fp32);
    FP32_OPERANDS (fp32 or mixed adapters) upcasts both and multiplies in 3xTF32; UPCAST_DOTS
    (the interpreter, whose bf16 dot is broken) multiplies the upcast operands in fp32.
    """
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        mask_r = (r0 + offs_r) < R
        b_ptrs = b_ptr + offs_n[:, None] * stride_bn + (r0 + offs_r)[None, :] * stride_br
        a_ptrs = a_ptr + (r0 + offs_r)[:, None] * stride_ar + offs_k[None, :] * stride_ak
        b_tile = tl.load(b_ptrs, mask=mask_n[:, None] & mask_r[None, :], other=0.0)
        a_tile = tl.load(a_ptrs, mask=mask_r[:, None] & mask_k[None, :], other=0.0)
        if UPCAST_DOTS:
            acc = tl.dot(b_tile.to(tl.float32), a_tile.to(tl.float32), acc, input_precision="ieee")
        elif FP32_OPERANDS:
            acc = tl.dot(
                b_tile.to(tl.float32), a_tile.to(tl.float32), acc, input_precision="tf32x3"
            )
        else:
            acc = tl.dot(b_tile, a_tile, acc)
    return acc
