"""The torch backend of the ``merge`` family: ``weight += scale * lora_b @ lora_a`` in place.

``W += scale * B @ A`` one block of rows at a time, each block computed in fp32 and rounded
once, so the extra memory is one block (``_MERGE_BLOCK_BYTES``), never an ``[N, K]`` fp32 copy.
"""

from __future__ import annotations

import torch

# An fp32 block that stays in L2, faster than larger blocks
# (benchmarks/results/torch_backend_cpu.md).
_MERGE_BLOCK_BYTES = 512 << 10


def merge_(weight, lora_a, lora_b, scale):
    """``weight += scale * lora_b @ lora_a`` in place, block by block, fp32, one rounding."""
    n, k = weight.shape
    rows = max(1, _MERGE_BLOCK_BYTES // max(1, 4 * k))
    a = lora_a.float()
    for start in range(0, n, rows):
        w = weight[start : start + rows]
        b = lora_b[start : start + rows].float()
        if weight.dtype == torch.float32 or weight.dtype == torch.float64:
            w.addmm_(b.to(weight.dtype), a.to(weight.dtype), alpha=scale)
        else:
            w.copy_(torch.addmm(w.float(), b, a, alpha=scale))
    return weight
