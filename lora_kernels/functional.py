"""The functional API: ``lora_linear``, ``merge_lora_``, ``unmerge_lora_``.

Each function validates its inputs (errors name the argument and the expected and actual shape,
dtype or device, raised before any kernel runs), resolves the backend (see ``_backend.py``) and
calls the custom op of ``ops.py``.
"""

from __future__ import annotations

import torch

from . import ops
from ._backend import available_backends, resolve_backend
from ._checks import check_lora_linear_inputs, check_scale, check_shape, check_tensor

__all__ = ["available_backends", "lora_linear", "merge_lora_", "unmerge_lora_"]


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
    lead = x.shape[:-1]
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    xl2 = None if x_lora is None else x_lora.reshape(-1, k)
    y = ops.lora_linear_2d(x2, weight, bias, lora_a, lora_b, scale, xl2, be)
    return y.reshape(*lead, weight.shape[0])


def _check_merge(fn: str, weight, lora_a, lora_b, scale) -> float:
    check_tensor(fn, "weight", weight)
    check_tensor(fn, "lora_a", lora_a)
    check_tensor(fn, "lora_b", lora_b)
    if weight.dim() != 2:
        raise ValueError(f"{fn}: expected weight of shape [N, K], got {list(weight.shape)}")
    n, k = weight.shape
    if lora_a.dim() != 2 or lora_a.shape[0] < 1:
        raise ValueError(f"{fn}: expected lora_a of shape [r, {k}], got {list(lora_a.shape)}")
    r = lora_a.shape[0]
    check_shape(fn, "lora_a", lora_a, [r, k])
    check_shape(fn, "lora_b", lora_b, [n, r])
    for name, t in (("lora_a", lora_a), ("lora_b", lora_b)):
        if t.device != weight.device:
            raise ValueError(
                f"{fn}: expected {name} on device {weight.device} (where weight is), got {t.device}"
            )
        if not t.is_floating_point():
            raise TypeError(f"{fn}: expected {name} of a floating dtype, got {t.dtype}")
    if not weight.is_floating_point():
        raise TypeError(f"{fn}: expected weight of a floating dtype, got {weight.dtype}")
    return check_scale(fn, "scale", scale)


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
    scale = _check_merge("merge_lora_", weight, lora_a, lora_b, scale)
    be = resolve_backend(backend, weight, lora_a.shape[0])
    with torch.no_grad():
        torch.ops.lora_kernels.merge_lora_(weight, lora_a, lora_b, scale, be)
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
    scale = _check_merge("unmerge_lora_", weight, lora_a, lora_b, scale)
    return merge_lora_(weight, lora_a, lora_b, -scale, backend=backend)
