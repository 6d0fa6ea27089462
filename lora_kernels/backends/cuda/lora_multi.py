"""The CUDA C++ backend of the ``lora_multi`` family (see ``lora_kernels.backends.cuda``)."""

from __future__ import annotations

import torch
from torch import Tensor

from . import INT32_MAX, available, decode_shapes_ok, extension_ops, on_ampere_or_newer


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
    if not (on_ampere_or_newer(x) and lora_a.dim() == 3 and lora_b.dim() == 3):
        return False
    num_adapters, r = lora_a.shape[0], lora_a.shape[1]
    if num_adapters < 1 or num_adapters > INT32_MAX:
        return False
    if not decode_shapes_ok(x, weight, bias, lora_a, lora_b, None, r, (num_adapters,)):
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
    extension_ops().lora_linear_multi_out(
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
