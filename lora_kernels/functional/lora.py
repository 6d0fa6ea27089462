"""Fused LoRA linear and merge: ``lora_linear``, ``merge_lora_``, ``unmerge_lora_``.

Each function validates its inputs (``_checks.py``: errors name the argument and the expected and
actual shape, dtype or device, raised before any kernel runs), resolves the backend
(``backends``) and calls its family's op (``ops``).
"""

from __future__ import annotations

import torch

from .. import ops
from .._checks import check_lora_linear_inputs, check_merge_inputs
from ..backends import resolve_backend
from ._autocast import autocast_inputs

__all__ = ["lora_linear", "merge_lora_", "unmerge_lora_"]


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
    x, weight, bias, lora_a, lora_b, x_lora = autocast_inputs(
        x, weight, bias, lora_a, lora_b, x_lora
    )
    be = resolve_backend(backend, x, lora_a.shape[0])
    if x.dim() == 2:  # no reshape: each one is a node more in the autograd graph
        return ops.lora_linear_2d(x, weight, bias, lora_a, lora_b, scale, x_lora, be)
    lead = x.shape[:-1]
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    xl2 = None if x_lora is None else x_lora.reshape(-1, k)
    y = ops.lora_linear_2d(x2, weight, bias, lora_a, lora_b, scale, xl2, be)
    return y.reshape(*lead, weight.shape[0])


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
