"""The CUDA C++ backend (csrc/): launchers with the signatures of the Triton ones they stand in for.

The dispatch (``backends.serving_backend``) asks ``supports_<name>(*args)`` with a launcher's own
arguments and runs the Triton launcher where the answer is no; there is no CUDA backward. What
the CUDA kernels serve (every tensor on one GPU of compute capability >= 8.0, in x's dtype):

``lora_linear_fwd``
    fp16/bf16, x [M, K] with M <= 64 (decode), K % 8 == 0, 1 <= r <= 256; the rows of x,
    x_lora, weight and lora_a unit-stride and 16-byte aligned (row strides multiples of 8),
    lora_b and bias unit-stride in their last dimension.
``lora_linear_multi_fwd``
    the same, with lora_a [L, r, K], lora_b [L, N, r], scales [L], row_ids [M] and ranks [L]
    (any float / integer dtype, on x's device; converted to fp32 / int32 on the device).
``merge_``
    fp16/bf16 with K % 8 == 0 and 16-byte aligned weight rows, or fp32 with K % 4 == 0 and
    16-byte aligned weight and lora_a rows; any rank.

The ``supports_*`` functions look at shapes, dtypes, strides and the device first, and only then
load the extension (``backends.cuda.build``; the first load may compile it).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..._constants import MAX_RANK
from . import build

MAX_ROWS = 64  # rows of x the decode kernels serve (csrc: kMaxDecodeRows)
VEC = 8  # fp16/bf16 elements per 16-byte vector load (csrc: kVecElems)
HALF_DTYPES = (torch.float16, torch.bfloat16)
INT32_MAX = 2**31 - 1


def available() -> bool:
    """Whether the compiled extension loads (``build.extension_status()`` says why not)."""
    return build.load_extension() is not None


def extension_ops():
    ops = build.load_extension()
    if ops is None:
        raise RuntimeError(f"lora_kernels CUDA extension: {build.extension_status()}")
    return ops


def on_ampere_or_newer(t: Tensor) -> bool:
    return t.is_cuda and torch.cuda.get_device_capability(t.device) >= (8, 0)


def vector_rows(t: Tensor, vec: int = VEC) -> bool:
    """Unit last stride, other strides multiples of ``vec`` elements, 16-byte aligned start."""
    return (
        t.stride(-1) == 1 and all(s % vec == 0 for s in t.stride()[:-1]) and t.data_ptr() % 16 == 0
    )


def unit_last_stride(t: Tensor) -> bool:
    return t.numel() == 0 or t.stride(-1) == 1


def same_dtype_device(x: Tensor, *tensors: Tensor | None) -> bool:
    """Every given tensor has x's dtype and device."""
    return all(t.dtype == x.dtype and t.device == x.device for t in tensors if t is not None)


def decode_shapes_ok(x, weight, bias, lora_a, lora_b, x_lora, r: int, n_lead: tuple) -> bool:
    """Checks shared by the single- and multi-adapter forward (lora_a is [..., r, K])."""
    if not (x.dim() == 2 and weight.dim() == 2 and x.dtype in HALF_DTYPES):
        return False
    m, k = x.shape
    n = weight.shape[0]
    if not (m <= MAX_ROWS and k % VEC == 0 and 1 <= r <= MAX_RANK):
        return False
    if k > INT32_MAX or n > INT32_MAX or weight.shape[1] != k or lora_a.shape[-1] != k:
        return False
    if tuple(lora_b.shape) != (*n_lead, n, r):
        return False
    if bias is not None and (tuple(bias.shape) != (n,) or not unit_last_stride(bias)):
        return False
    if x_lora is not None and (x_lora.shape != x.shape or not vector_rows(x_lora)):
        return False
    if not same_dtype_device(x, weight, bias, lora_a, lora_b, x_lora):
        return False
    return (
        vector_rows(x) and vector_rows(weight) and vector_rows(lora_a) and unit_last_stride(lora_b)
    )
