"""The CUDA C++ backend of the ``lora_linear`` family (see ``lora_kernels.backends.cuda``)."""

from __future__ import annotations

import torch
from torch import Tensor

from . import available, decode_shapes_ok, extension_ops, on_ampere_or_newer


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
    if not (on_ampere_or_newer(x) and lora_a.dim() == 2 and lora_b.dim() == 2):
        return False
    if not decode_shapes_ok(x, weight, bias, lora_a, lora_b, x_lora, lora_a.shape[0], ()):
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
    extension_ops().lora_linear_out(x, weight, bias, lora_a, lora_b, float(scale), x_lora, y, s)
    return y, s
