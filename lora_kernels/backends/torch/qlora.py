"""The torch backend of the 4-bit-base (QLoRA) LoRA linear: dequantize, then the LoRA linear.

Used on CPU (and for float64). Same launcher signatures as
``lora_kernels/backends/triton/qlora.py``, so the op layer dispatches blindly. The 4-bit weight is
dequantized to the input's dtype (what bitsandbytes' matmul multiplies by) and handed to the
single-adapter torch launchers; the backward dequantizes it again rather than keeping a 16-bit copy
alive between forward and backward, which would undo the memory QLoRA saves (bitsandbytes does the
same).

Dequantization reads each packed byte once through a 256-entry table of value pairs
``(code[b >> 4], code[b & 0xF])``, each pair stored as one 8-byte word so that one
``index_select`` of 8-byte elements fetches both values (measured 3-6x faster on a CPU than
advanced indexing of a [256, 2] table or a gather per nibble; still 1.5-2x bitsandbytes' C++
CPU kernel), then one multiply by the block maxima, in fp32, rounded once to the target dtype.
Bit for bit what ``reference.dequantize_4bit`` computes.
"""

from __future__ import annotations

import torch

from . import lora_linear as torch_lora_linear


def _pair_table(code: torch.Tensor) -> torch.Tensor:
    """[256] int64: the two fp32 values a packed byte holds (high nibble first in memory), one
    word per byte value."""
    idx = torch.arange(256, device=code.device)
    c = code.float()
    return torch.stack([c[idx >> 4], c[idx & 0xF]], dim=1).view(torch.int64).reshape(256)


def block_absmax(absmax, absmax2, code2, offset, blocksize2):
    """The fp32 maximum of every block: ``absmax`` itself, or its double-quantized decoding
    ``code2[absmax] * absmax2[j // blocksize2] + offset``."""
    if absmax2 is None:
        return absmax.float()
    j = absmax.numel()
    scales = absmax2.float().repeat_interleave(blocksize2)[:j]
    return (code2.float()[absmax.long()] * scales).add_(offset.float())


def dequantize_4bit(qweight, absmax, code, absmax2, code2, offset, blocksize, blocksize2, n, k,
                    dtype):  # fmt: skip
    """W [n, k] in ``dtype`` from the packed bytes (layout: ``reference.dequantize_4bit``)."""
    n_el = n * k
    packed = qweight.reshape(-1).view(torch.uint8)
    w = _pair_table(code).index_select(0, packed.int()).view(torch.float32)
    scales = block_absmax(absmax, absmax2, code2, offset, blocksize2)
    blocks = scales.numel()
    if w.numel() == blocks * blocksize:
        w = w.view(blocks, blocksize).mul_(scales.unsqueeze(1)).reshape(-1)
    else:  # a partial last block, or the pad nibble of an odd element count
        w = w[:n_el].mul_(scales.repeat_interleave(blocksize)[:n_el])
    return w[:n_el].view(n, k).to(dtype)


def qlora_linear_fwd(
    x, qweight, absmax, code, absmax2, code2, offset, blocksize, blocksize2, n,
    bias, lora_a, lora_b, scale, x_lora=None,
):  # fmt: skip
    w = dequantize_4bit(
        qweight, absmax, code, absmax2, code2, offset, blocksize, blocksize2, n, x.shape[1],
        x.dtype,
    )  # fmt: skip
    return torch_lora_linear.lora_linear_fwd(x, w, bias, lora_a, lora_b, scale, x_lora)


def qlora_linear_bwd(
    dy, x, qweight, absmax, code, absmax2, code2, offset, blocksize, blocksize2,
    lora_a, lora_b, s, scale, x_lora=None, *, needs_dx=True, needs_da=True, needs_db=True,
):  # fmt: skip
    n, k = dy.shape[1], x.shape[1]
    if needs_dx:
        w = dequantize_4bit(
            qweight, absmax, code, absmax2, code2, offset, blocksize, blocksize2, n, k, x.dtype
        )
    else:  # the base GEMM is skipped: any [n, k] tensor of x's dtype will do for the shapes
        w = x.new_empty((1, 1)).expand(n, k)
    return torch_lora_linear.lora_linear_bwd(
        dy, x, w, lora_a, lora_b, s, scale, x_lora,
        needs_dx=needs_dx, needs_da=needs_da, needs_db=needs_db,
    )  # fmt: skip
