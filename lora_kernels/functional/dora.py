"""DoRA (weight-decomposed LoRA, PEFT's ``use_dora=True``) at nearly the cost of LoRA.

    norm = ||weight + scale * lora_b @ lora_a||_row        [N], a constant for autograd (PEFT)
    y    = (magnitude / norm) * (x @ weight.T + scale * (x @ lora_a.T) @ lora_b.T) + bias

The norm is computed from ``||W_n||^2 + 2 s B_n . (W A^T)_n + s^2 B_n (A A^T) B_n^T`` (one pass
over W, like a LoRA shrink over N rows; ``||W||_row^2`` cached by the caller since the base is
frozen), never from the ``[N, K]`` sum PEFT builds every step. The forward is the fused LoRA
kernel plus a per-column scale; the backward is the fused LoRA backward on ``dy * g`` plus
``d_magnitude = sum_rows(dy * lin) / norm``. Every function validates its inputs (errors name the
argument, expected and actual shape, dtype or device, raised before any kernel runs) and resolves
the backend as ``lora_linear`` does.
"""

from __future__ import annotations

import torch

from .. import ops
from .._checks import (
    check_dora_linear_inputs,
    check_dora_merge_inputs,
    check_dora_norm_inputs,
    check_dora_weight,
)
from ..backends import launcher, resolve_backend
from ._autocast import autocast_inputs

__all__ = ["dora_linear", "dora_weight_norm", "merge_dora_", "unmerge_dora_", "weight_sq_norm"]


def weight_sq_norm(weight: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """``||weight_n||^2`` per row, ``[N]`` fp32 (fp64 for fp64): what :func:`dora_linear` and
    :func:`dora_weight_norm` take as ``weight_sq_norm`` to skip it on every call (cache it while
    the base weight does not change)."""
    check_dora_weight("weight_sq_norm", weight)
    be = resolve_backend(backend, weight, 1)
    with torch.no_grad():
        return torch.ops.lora_kernels.dora_weight_sq_norm(weight, be)


def dora_weight_norm(
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    *,
    weight_sq_norm: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``||weight + scale * lora_b @ lora_a||`` per row, ``[N]`` fp32 (fp64 for fp64), detached.

    Args:
        weight: ``[N, K]``; lora_a: ``[r, K]``; lora_b: ``[N, r]`` (on weight's device).
        scale: the adapter's scaling.
        weight_sq_norm: ``[N]`` cached ``||weight_n||^2`` (:func:`weight_sq_norm`), or None.
    """
    fn = "dora_weight_norm"
    scale = check_dora_norm_inputs(fn, weight, lora_a, lora_b, scale, weight_sq_norm)
    be = resolve_backend(backend, weight, lora_a.shape[0])
    with torch.no_grad():
        if weight_sq_norm is None:
            weight_sq_norm = torch.ops.lora_kernels.dora_weight_sq_norm(weight, be)
        return torch.ops.lora_kernels.dora_weight_norm(
            weight, lora_a, lora_b, scale, weight_sq_norm, be
        )


def dora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    magnitude: torch.Tensor,
    scale: float,
    *,
    x_lora: torch.Tensor | None = None,
    weight_sq_norm: torch.Tensor | None = None,
    weight_norm: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """DoRA linear, PEFT's ``use_dora=True`` forward::

        g = magnitude / ||weight + scale * lora_b @ lora_a||_row     (the norm is detached)
        y = g * (x_lora @ weight.T + scale * (x_lora @ lora_a.T) @ lora_b.T) + bias
            + (x - x_lora) @ weight.T

    Without ``x_lora`` (no dropout) that is ``g * (x W^T + s x A^T B^T) + bias``; with it, PEFT's
    dropout semantics: the base layer sees x, the whole DoRA branch the dropped-out input.

    Args:
        x: ``[..., K]``; weight: ``[N, K]``; bias: ``[N]`` or None (x's dtype and device).
        lora_a: ``[r, K]``; lora_b: ``[N, r]``: x's dtype or float32.
        magnitude: ``[N]`` (PEFT ``lora_magnitude_vector[name].weight``), x's dtype or float32.
        scale: ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA).
        x_lora: dropout's output, x's shape, or None.
        weight_sq_norm: ``[N]`` fp32 (fp64 for fp64) cached ``||weight_n||^2``, or None.
        weight_norm: ``[N]`` fp32 (fp64 for fp64) ``||weight + scale * lora_b @ lora_a||_row``
            when the caller holds it for exactly these weights (:func:`dora_weight_norm`), or
            None to compute it (one pass over weight).
        backend: ``"auto"``, ``"cuda"``, ``"triton"`` or ``"torch"``.

    Returns:
        ``[..., N]`` in x's dtype; differentiable in x, weight, bias, lora_a, lora_b, magnitude
        and x_lora.
    """
    scale = check_dora_linear_inputs(
        "dora_linear", x, weight, bias, lora_a, lora_b, magnitude, scale, x_lora,
        weight_sq_norm, weight_norm,
    )  # fmt: skip
    n = weight.shape[0]
    x, weight, bias, lora_a, lora_b, x_lora = autocast_inputs(
        x, weight, bias, lora_a, lora_b, x_lora
    )
    be = resolve_backend(backend, x, lora_a.shape[0])
    norm = weight_norm
    if norm is None:
        with torch.no_grad():
            w_sq = weight_sq_norm
            if w_sq is None:
                w_sq = torch.ops.lora_kernels.dora_weight_sq_norm(weight.detach(), be)
            norm = torch.ops.lora_kernels.dora_weight_norm(
                weight.detach(), lora_a.detach(), lora_b.detach(), scale, w_sq, be
            )
    norm = norm.detach()
    if x.dim() == 2:
        return ops.dora_linear_2d(
            x, weight, bias, lora_a, lora_b, magnitude, norm, scale, x_lora, be
        )
    lead, k = x.shape[:-1], x.shape[-1]
    xl2 = None if x_lora is None else x_lora.reshape(-1, k)
    y = ops.dora_linear_2d(
        x.reshape(-1, k), weight, bias, lora_a, lora_b, magnitude, norm, scale, xl2, be
    )
    return y.reshape(*lead, n)


def merge_dora_(
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    magnitude: torch.Tensor,
    scale: float,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """In place: ``weight = g[:, None] * (weight + scale * lora_b @ lora_a)``, ``g = magnitude /
    norm`` with the norm of the unmerged weight; a block of rows at a time in fp32, each element
    rounded once (no ``[N, K]`` temporary).

    Returns the ``[N]`` norm used (fp32): :func:`unmerge_dora_` needs it, since the merged weight
    no longer holds it (PEFT caches it the same way).
    """
    scale = check_dora_merge_inputs("merge_dora_", weight, lora_a, lora_b, magnitude, scale, None)
    be = resolve_backend(backend, weight, lora_a.shape[0])
    with torch.no_grad():
        norm = dora_weight_norm(weight, lora_a, lora_b, scale, backend=be)
        g = magnitude.detach().to(norm.dtype) / norm
        launcher(be, "dora", "dora_merge_")(weight, lora_a.detach(), lora_b.detach(), scale, g)
    return norm


def unmerge_dora_(
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    magnitude: torch.Tensor,
    scale: float,
    weight_norm: torch.Tensor,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """In place: ``weight = weight / g[:, None] - scale * lora_b @ lora_a`` with ``g = magnitude /
    weight_norm`` (the norm :func:`merge_dora_` returned); fp32 blocks. Returns ``weight``."""
    scale = check_dora_merge_inputs(
        "unmerge_dora_", weight, lora_a, lora_b, magnitude, scale, weight_norm
    )
    be = resolve_backend(backend, weight, lora_a.shape[0])
    with torch.no_grad():
        g = magnitude.detach().to(weight_norm.dtype) / weight_norm
        launcher(be, "dora", "dora_unmerge_")(weight, lora_a.detach(), lora_b.detach(), scale, g)
    return weight
