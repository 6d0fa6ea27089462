"""The CUDA C++ backend of the ``merge`` family (see ``lora_kernels.backends.cuda``)."""

from __future__ import annotations

import torch
from torch import Tensor

from . import (
    HALF_DTYPES,
    INT32_MAX,
    VEC,
    available,
    extension_ops,
    on_ampere_or_newer,
    same_dtype_device,
    unit_last_stride,
    vector_rows,
)

# The fp16/bf16 merge grid has one block row per 64 rows of W, at most 65535 of them.
_MAX_MERGE_ROWS_HALF = 65535 * 64


def supports_merge_(weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float) -> bool:
    """Whether :func:`merge_` serves these arguments (see the module docstring)."""
    if not (on_ampere_or_newer(weight) and weight.dim() == 2 and lora_a.dim() == 2):
        return False
    if weight.dtype not in (*HALF_DTYPES, torch.float32):
        return False
    if not same_dtype_device(weight, lora_a, lora_b):
        return False
    n, k = weight.shape
    r = lora_a.shape[0]
    if tuple(lora_a.shape) != (r, k) or tuple(lora_b.shape) != (n, r):
        return False
    if max(n, k, r) > INT32_MAX:
        return False
    if weight.dtype == torch.float32:
        ok = k % 4 == 0 and vector_rows(weight, 4) and vector_rows(lora_a, 4)
    else:
        ok = k % VEC == 0 and n <= _MAX_MERGE_ROWS_HALF and vector_rows(weight)
        ok = ok and unit_last_stride(lora_a)
    if not (ok and unit_last_stride(lora_b)):
        return False
    return available()


def merge_(weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float) -> Tensor:
    """In place: ``weight += scale * lora_b @ lora_a`` (unmerge: ``-scale``); returns weight.

    weight [N, K], lora_a [r, K], lora_b [N, r], one dtype (fp16, bf16 or fp32) on one GPU. Each
    element is ``round(w + scale * sum_j b[n, j] a[j, k])`` with the sum and the add in fp32,
    rounded once; no [N, K] temporary. Bad input raises before the weight is touched.
    """
    extension_ops().merge_(weight, lora_a, lora_b, float(scale))
    return weight
