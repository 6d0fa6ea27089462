"""Embedding LoRA (PEFT's ``lora.Embedding``): ``lora_embedding``, ``lora_embedding_multi``."""

from __future__ import annotations

import torch

from .. import ops
from .._checks import check_lora_embedding_inputs, check_lora_embedding_multi_inputs
from ..backends import resolve_backend

__all__ = ["lora_embedding", "lora_embedding_multi"]


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
        flat, weight, lora_a.unsqueeze(0), lora_b.unsqueeze(0), None, scale, None, pad, be
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
    ``lora_embedding_A`` / ``lora_embedding_B`` stacked and zero-padded to the largest rank;
    ``scales`` ``[L]``: a tensor on the table's device is read by the kernels, never on the host
    (a decode step does not synchronise), and a list becomes such a tensor once per distinct list.
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
    y = ops.lora_embedding_1d(ids.reshape(-1).long(), weight, lora_a, lora_b, scales, 0.0,
                              row_ids, pad, be)  # fmt: skip
    return y.reshape(*ids.shape, weight.shape[1])
