"""Multi-adapter LoRA linear: ``lora_linear_multi``, a different adapter per row or sequence."""

from __future__ import annotations

import torch

from .. import ops
from .._checks import check_lora_multi_inputs
from ..backends import resolve_backend
from ._autocast import autocast_inputs

__all__ = ["lora_linear_multi"]


def lora_linear_multi(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scales: torch.Tensor | list[float],
    adapter_ids: torch.Tensor,
    *,
    ranks: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """LoRA linear with a different adapter per row (or per sequence), in one pass::

        y[i] = x[i] @ weight.T + bias + scales[a] * (x[i] @ lora_a[a].T) @ lora_b[a].T,  a = ids[i]

    Rows with id -1 get the base layer only. Differentiable in x, weight, bias, lora_a and
    lora_b: each adapter's gradient comes from exactly the rows that used it, so one batch can
    train several adapters at once. On CUDA nothing synchronises with the host (a decode step
    can be captured in a CUDA graph).

    Args:
        x: ``[M, K]`` with one id per row, or ``[B, T, K]`` with one id per sequence.
        weight: ``[N, K]`` base weight; bias: ``[N]`` or None (x's dtype and device).
        lora_a: ``[L, r_max, K]`` the adapters' ``lora_A.weight`` stacked, zero-padded to the
            largest rank; x's dtype or float32.
        lora_b: ``[L, N, r_max]`` the ``lora_B.weight`` stacked, zero-padded; lora_a's dtype.
        scales: ``[L]`` each adapter's scaling (a float tensor on x's device, or a list).
        adapter_ids: ``[M]`` or ``[B]`` int32/int64, each in ``[-1, L)``. Checked on CPU; on
            CUDA an id outside that range is treated as -1.
        ranks: optional ``[L]`` int tensor, each adapter's true rank: the padded slots past it
            are skipped (neither read nor computed).
        backend: ``"auto"``, ``"cuda"``, ``"triton"`` or ``"torch"`` (see ``available_backends``).

    Returns:
        ``[M, N]`` or ``[B, T, N]`` in x's dtype.
    """
    fn = "lora_linear_multi"
    scales, ranks = check_lora_multi_inputs(
        fn, x, weight, bias, lora_a, lora_b, scales, adapter_ids, ranks
    )
    x, weight, bias, lora_a, lora_b = autocast_inputs(x, weight, bias, lora_a, lora_b)
    be = resolve_backend(backend, x, lora_a.shape[1])
    if x.dim() == 3:  # one id per sequence -> one per row, on the device
        batch, seq = x.shape[:2]
        row_ids = adapter_ids[:, None].expand(batch, seq).reshape(-1)
    else:
        row_ids = adapter_ids
    x2 = x.reshape(-1, x.shape[-1])
    y = ops.lora_linear_multi_2d(x2, weight, bias, lora_a, lora_b, scales, row_ids, ranks, be)
    return y.reshape(*x.shape[:-1], weight.shape[0])
