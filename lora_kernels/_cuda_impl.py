"""CUDA C++ launchers (csrc/), with the signatures of the Triton launchers they stand in for.

The op layer (``ops.launcher``) asks ``supports_<name>(*args)`` with a launcher's own arguments
and runs the Triton launcher where the answer is no; there is no CUDA backward. What the CUDA
kernels serve (every tensor on one GPU of compute capability >= 8.0, in x's dtype):

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
load the extension (``lora_kernels._jit``; the first load may compile it).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _jit

__all__ = [
    "MAX_RANK",
    "MAX_ROWS",
    "available",
    "lora_linear_fwd",
    "lora_linear_multi_fwd",
    "merge_",
    "supports_lora_linear_fwd",
    "supports_lora_linear_multi_fwd",
    "supports_merge_",
]

MAX_ROWS = 64  # rows of x the decode kernels serve (csrc: kMaxDecodeRows)
MAX_RANK = 256  # csrc: kMaxRank
_VEC = 8  # fp16/bf16 elements per 16-byte vector load (csrc: kVecElems)
_HALF_DTYPES = (torch.float16, torch.bfloat16)
# The fp16/bf16 merge grid has one block row per 64 rows of W, at most 65535 of them.
_MAX_MERGE_ROWS_HALF = 65535 * 64
_INT32_MAX = 2**31 - 1


def available() -> bool:
    """Whether the compiled extension loads (``_jit.extension_status()`` says why not)."""
    return _jit.load_extension() is not None


def _ops():
    ops = _jit.load_extension()
    if ops is None:
        raise RuntimeError(f"lora_kernels CUDA extension: {_jit.extension_status()}")
    return ops


def _on_ampere_or_newer(t: Tensor) -> bool:
    return t.is_cuda and torch.cuda.get_device_capability(t.device) >= (8, 0)


def _vector_rows(t: Tensor, vec: int = _VEC) -> bool:
    """Unit last stride, other strides multiples of ``vec`` elements, 16-byte aligned start."""
    return (
        t.stride(-1) == 1 and all(s % vec == 0 for s in t.stride()[:-1]) and t.data_ptr() % 16 == 0
    )


def _unit_last_stride(t: Tensor) -> bool:
    return t.numel() == 0 or t.stride(-1) == 1


def _with(x: Tensor, *tensors: Tensor | None) -> bool:
    """Every given tensor has x's dtype and device."""
    return all(t.dtype == x.dtype and t.device == x.device for t in tensors if t is not None)


def _decode_shapes_ok(x, weight, bias, lora_a, lora_b, x_lora, r: int, n_lead: tuple) -> bool:
    """Checks shared by the single- and multi-adapter forward (lora_a is [..., r, K])."""
    if not (x.dim() == 2 and weight.dim() == 2 and x.dtype in _HALF_DTYPES):
        return False
    m, k = x.shape
    n = weight.shape[0]
    if not (m <= MAX_ROWS and k % _VEC == 0 and 1 <= r <= MAX_RANK):
        return False
    if k > _INT32_MAX or n > _INT32_MAX or weight.shape[1] != k or lora_a.shape[-1] != k:
        return False
    if tuple(lora_b.shape) != (*n_lead, n, r):
        return False
    if bias is not None and (tuple(bias.shape) != (n,) or not _unit_last_stride(bias)):
        return False
    if x_lora is not None and (x_lora.shape != x.shape or not _vector_rows(x_lora)):
        return False
    if not _with(x, weight, bias, lora_a, lora_b, x_lora):
        return False
    return (
        _vector_rows(x)
        and _vector_rows(weight)
        and _vector_rows(lora_a)
        and _unit_last_stride(lora_b)
    )


def supports_lora_linear_fwd(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float,
    x_lora: Tensor | None = None,
) -> bool:
    """Whether :func:`lora_linear_fwd` serves these arguments (see the module docstring)."""
    if not (_on_ampere_or_newer(x) and lora_a.dim() == 2 and lora_b.dim() == 2):
        return False
    if not _decode_shapes_ok(x, weight, bias, lora_a, lora_b, x_lora, lora_a.shape[0], ()):
        return False
    return available()


def lora_linear_fwd(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float,
    x_lora: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``y = x @ weight.T + bias + scale * (x_lora @ lora_a.T) @ lora_b.T`` and ``S``.

    x [M, K], weight [N, K], bias [N] or None, lora_a [r, K], lora_b [N, r], x_lora [M, K] or
    None (the LoRA branch's input, PEFT's dropout output; None means x). Returns ``y`` [M, N] in
    x's dtype (fp32 accumulation, one rounding) and ``S = x_lora @ lora_a.T`` [M, r] fp32.
    Two launches, no host synchronisation (CUDA-graph safe). Bad input raises before any launch.
    """
    y = torch.empty((x.shape[0], weight.shape[0]), dtype=x.dtype, device=x.device)
    s = torch.empty((x.shape[0], lora_a.shape[0]), dtype=torch.float32, device=x.device)
    _ops().lora_linear_out(x, weight, bias, lora_a, lora_b, float(scale), x_lora, y, s)
    return y, s


def supports_lora_linear_multi_fwd(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    scales: Tensor,
    row_ids: Tensor,
    ranks: Tensor | None = None,
) -> bool:
    """Whether :func:`lora_linear_multi_fwd` serves these arguments (see the module docstring)."""
    if not (_on_ampere_or_newer(x) and lora_a.dim() == 3 and lora_b.dim() == 3):
        return False
    num_adapters, r = lora_a.shape[0], lora_a.shape[1]
    if num_adapters < 1 or num_adapters > _INT32_MAX:
        return False
    if not _decode_shapes_ok(x, weight, bias, lora_a, lora_b, None, r, (num_adapters,)):
        return False
    if tuple(scales.shape) != (num_adapters,) or scales.device != x.device:
        return False
    if not scales.dtype.is_floating_point:
        return False
    if tuple(row_ids.shape) != (x.shape[0],) or row_ids.device != x.device:
        return False
    if row_ids.dtype not in (torch.int32, torch.int64):
        return False
    if ranks is not None and (
        tuple(ranks.shape) != (num_adapters,)
        or ranks.device != x.device
        or ranks.dtype not in (torch.int32, torch.int64)
    ):
        return False
    return available()


def lora_linear_multi_fwd(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    scales: Tensor,
    row_ids: Tensor,
    ranks: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Every row with its own adapter (decode batches, M <= 64)::

        y[i] = x[i] @ weight.T + bias + scales[a] * s[i] @ lora_b[a].T,   a = row_ids[i]
        s[i] = x[i] @ lora_a[a, :rank_a].T  (zero past rank_a)

    x [M, K], weight [N, K], bias [N] or None, lora_a [L, r, K], lora_b [L, N, r] (zero-padded
    to the largest rank r), scales [L], row_ids [M] (-1: the base layer only), ranks [L] or None
    (None: every adapter has rank r). Returns ``(y [M, N], s [M, r] fp32)``; rows with no
    adapter get ``s = 0``. Ids outside ``[0, L)`` are treated as -1 on the device, with no host
    synchronisation: they never read out of bounds (a CUDA graph can hold the call).
    """
    num_adapters = lora_a.shape[0]
    if row_ids.dtype != torch.int32:
        # Clamped before narrowing, so that no int64 id wraps around into [0, L).
        row_ids = row_ids.clamp(-1, num_adapters).to(torch.int32)
    if ranks is not None:
        ranks = ranks.clamp(0, lora_a.shape[1]).to(torch.int32).contiguous()
    y = torch.empty((x.shape[0], weight.shape[0]), dtype=x.dtype, device=x.device)
    s = torch.empty((x.shape[0], lora_a.shape[1]), dtype=torch.float32, device=x.device)
    _ops().lora_linear_multi_out(
        x,
        weight,
        bias,
        lora_a,
        lora_b,
        scales.to(torch.float32).contiguous(),
        row_ids.contiguous(),
        ranks,
        y,
        s,
    )
    return y, s


def supports_merge_(weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float) -> bool:
    """Whether :func:`merge_` serves these arguments (see the module docstring)."""
    if not (_on_ampere_or_newer(weight) and weight.dim() == 2 and lora_a.dim() == 2):
        return False
    if weight.dtype not in (*_HALF_DTYPES, torch.float32) or not _with(weight, lora_a, lora_b):
        return False
    n, k = weight.shape
    r = lora_a.shape[0]
    if tuple(lora_a.shape) != (r, k) or tuple(lora_b.shape) != (n, r):
        return False
    if max(n, k, r) > _INT32_MAX:
        return False
    if weight.dtype == torch.float32:
        ok = k % 4 == 0 and _vector_rows(weight, 4) and _vector_rows(lora_a, 4)
    else:
        ok = k % _VEC == 0 and n <= _MAX_MERGE_ROWS_HALF and _vector_rows(weight)
        ok = ok and _unit_last_stride(lora_a)
    if not (ok and _unit_last_stride(lora_b)):
        return False
    return available()


def merge_(weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float) -> Tensor:
    """In place: ``weight += scale * lora_b @ lora_a`` (unmerge: ``-scale``); returns weight.

    weight [N, K], lora_a [r, K], lora_b [N, r], one dtype (fp16, bf16 or fp32) on one GPU. Each
    element is ``round(w + scale * sum_j b[n, j] a[j, k])`` with the sum and the add in fp32,
    rounded once; no [N, K] temporary. Bad input raises before the weight is touched.
    """
    _ops().merge_(weight, lora_a, lora_b, float(scale))
    return weight
