"""The functional API: ``lora_linear``, ``lora_linear_multi``, ``lora_embedding``,
``lora_embedding_multi``, ``merge_lora_``, ``unmerge_lora_``.

Each function validates its inputs (``_checks.py``: errors name the argument and the expected and
actual shape, dtype or device, raised before any kernel runs), resolves the backend
(``backends``) and calls its family's op (``ops``).
"""

from __future__ import annotations

import torch

from . import ops
from ._checks import (
    check_lora_embedding_inputs,
    check_lora_embedding_multi_inputs,
    check_lora_linear_inputs,
    check_lora_multi_inputs,
    check_merge_inputs,
)
from .backends import available_backends, resolve_backend

__all__ = [
    "available_backends",
    "lora_embedding",
    "lora_embedding_multi",
    "lora_linear",
    "lora_linear_multi",
    "merge_lora_",
    "unmerge_lora_",
]


def _autocast(x: torch.Tensor, *tensors):
    """Cast floating inputs to the autocast dtype when autocast is on, as ``F.linear`` would."""
    dev = x.device.type
    if dev not in ("cuda", "cpu") or not torch.is_autocast_enabled(dev):
        return (x, *tensors)
    dtype = torch.get_autocast_dtype(dev)
    return tuple(None if t is None else t.to(dtype) for t in (x, *tensors))


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    *,
    x_lora: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Fused LoRA linear: ``y = x @ weight.T + bias + scale * (x_lora @ lora_a.T) @ lora_b.T``.

    Args:
        x: ``[..., K]`` input, float16, bfloat16, float32 (float64 on the torch backend).
        weight: ``[N, K]`` base weight (``nn.Linear.weight``), x's dtype and device.
        bias: ``[N]`` or None.
        lora_a: ``[r, K]`` (PEFT ``lora_A.weight``), x's dtype or float32.
        lora_b: ``[N, r]`` (PEFT ``lora_B.weight``), lora_a's dtype.
        scale: ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA).
        x_lora: the LoRA branch's input when it differs from x (PEFT's dropout applies there
            only), same shape as x; gradients flow to it. None means x.
        backend: ``"auto"``, ``"cuda"``, ``"triton"`` or ``"torch"`` (see ``available_backends``).

    Returns:
        ``[..., N]`` in x's dtype. Differentiable in x, weight, bias, lora_a, lora_b and x_lora.
    """
    fn = "lora_linear"
    scale = check_lora_linear_inputs(fn, x, weight, bias, lora_a, lora_b, scale, x_lora)
    x, weight, bias, lora_a, lora_b, x_lora = _autocast(x, weight, bias, lora_a, lora_b, x_lora)
    be = resolve_backend(backend, x, lora_a.shape[0])
    if x.dim() == 2:  # no reshape: each one is a node more in the autograd graph
        return ops.lora_linear_2d(x, weight, bias, lora_a, lora_b, scale, x_lora, be)
    lead = x.shape[:-1]
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    xl2 = None if x_lora is None else x_lora.reshape(-1, k)
    y = ops.lora_linear_2d(x2, weight, bias, lora_a, lora_b, scale, xl2, be)
    return y.reshape(*lead, weight.shape[0])


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
    x, weight, bias, lora_a, lora_b = _autocast(x, weight, bias, lora_a, lora_b)
    be = resolve_backend(backend, x, lora_a.shape[1])
    if x.dim() == 3:  # one id per sequence -> one per row, on the device
        batch, seq = x.shape[:2]
        row_ids = adapter_ids[:, None].expand(batch, seq).reshape(-1)
    else:
        row_ids = adapter_ids
    x2 = x.reshape(-1, x.shape[-1])
    y = ops.lora_linear_multi_2d(x2, weight, bias, lora_a, lora_b, scales, row_ids, ranks, be)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def merge_lora_(
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """In place: ``weight += scale * lora_b @ lora_a``; returns ``weight``.

    The product is computed tile by tile in fp32 and each element of ``weight`` is rounded once,
    so the result is within 0.5 ulp of the exact sum; extra memory is one tile, never ``[N, K]``.

    Args:
        weight: ``[N, K]``, any floating dtype; changed in place (no autograd history).
        lora_a: ``[r, K]``; lora_b: ``[N, r]``; on weight's device.
        scale: the adapter's scaling.
    """
    scale = check_merge_inputs("merge_lora_", weight, lora_a, lora_b, scale)
    be = resolve_backend(backend, weight, lora_a.shape[0], lora_a, lora_b)
    with torch.no_grad():
        ops.merge_lora_(weight, lora_a, lora_b, scale, be)
    return weight


def unmerge_lora_(
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """In place: ``weight -= scale * lora_b @ lora_a`` (the inverse of :func:`merge_lora_` up to
    rounding; ``FusedLoraLinear.merge(exact=True)`` restores bit for bit); returns ``weight``."""
    scale = check_merge_inputs("unmerge_lora_", weight, lora_a, lora_b, scale)
    return merge_lora_(weight, lora_a, lora_b, -scale, backend=backend)


def lora_embedding(
    ids: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    *,
    padding_idx: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Embedding LoRA (PEFT's ``lora.Embedding``): ``y = weight[ids] + scale * lora_a.T[ids] @
    lora_b.T``, a gather of the table and of A's columns plus one low-rank product.

    Args:
        ids: integer ids (int32/int64) of any shape, each in ``[0, V)``.
        weight: ``[V, D]`` the base table (``nn.Embedding.weight``).
        lora_a: ``[r, V]`` (PEFT ``lora_embedding_A``), weight's dtype or float32.
        lora_b: ``[D, r]`` (PEFT ``lora_embedding_B``), lora_a's dtype.
        scale: ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA).
        padding_idx: rows with this id give lora_a (and weight) no gradient, as in
            ``nn.Embedding``; their value still counts.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.

    Returns:
        ``[*ids.shape, D]`` in weight's dtype. Differentiable in weight, lora_a (only the
        columns of the ids seen get a gradient) and lora_b.
    """
    fn = "lora_embedding"
    scale, pad = check_lora_embedding_inputs(fn, ids, weight, lora_a, lora_b, scale, padding_idx)
    be = resolve_backend(backend, weight, lora_a.shape[0], lora_a)
    flat = ids if ids.dim() == 1 and ids.dtype == torch.int64 else ids.reshape(-1).long()
    y = ops.lora_embedding_1d(
        flat, weight, lora_a.unsqueeze(0), lora_b.unsqueeze(0), [scale], None, pad, be
    )
    return y if ids.dim() == 1 else y.reshape(*ids.shape, weight.shape[1])


def lora_embedding_multi(
    ids: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scales: torch.Tensor | list[float],
    adapter_ids: torch.Tensor,
    *,
    padding_idx: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Embedding LoRA with a different adapter per row (or per sequence)::

        y[i] = weight[ids[i]] + scales[a] * lora_a[a].T[ids[i]] @ lora_b[a].T,  a = adapter_ids[i]

    ids ``[M]`` with adapter_ids ``[M]``, or ``[B, T]`` with adapter_ids ``[B]``; id -1: the base
    table only. lora_a ``[L, r_max, V]`` and lora_b ``[L, D, r_max]`` are the adapters' PEFT
    ``lora_embedding_A`` / ``lora_embedding_B`` stacked and zero-padded to the largest rank.
    Differentiable like :func:`lora_embedding`: each adapter gets the gradient of its own rows.
    """
    fn = "lora_embedding_multi"
    scales, pad = check_lora_embedding_multi_inputs(
        fn, ids, weight, lora_a, lora_b, scales, adapter_ids, padding_idx
    )
    be = resolve_backend(backend, weight, lora_a.shape[1], lora_a)
    row_ids = adapter_ids.to(torch.int32)
    if ids.dim() == 2:
        row_ids = row_ids[:, None].expand(ids.shape).reshape(-1)
    y = ops.lora_embedding_1d(ids.reshape(-1).long(), weight, lora_a, lora_b, scales, row_ids,
                              pad, be)  # fmt: skip
    return y.reshape(*ids.shape, weight.shape[1])
