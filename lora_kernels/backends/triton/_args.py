"""How the Triton launchers hand tensors to their kernels: the one rule, in one place.

Every matrix argument (``[M, K]`` activations, weights, adapters, gradients) is read through the
strides its launcher passes, so transposed, sliced, offset and expanded views cost nothing. Vector
arguments (token and adapter ids, per-adapter scales, bias, DoRA's gain and norms, the 4-bit
format's absmax and code tables) are indexed at unit stride by the kernels: the launcher passes
them through :func:`unit_stride`, which returns a unit-stride vector as it is and copies any other
(a strided column of a table, a stride-0 ``expand``) once per call. Those copies are a few KB, a
device-side copy (capture-safe), and only for inputs that are not unit-stride already.
"""

from __future__ import annotations

import torch

__all__ = ["unit_stride"]


def unit_stride(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` flattened to a unit-stride 1-D tensor (``t`` itself when it already is one); None
    passes through. Meant for vectors and small tables that the kernels index as flat arrays."""
    if t is None:
        return None
    if t.dim() != 1:
        t = t.reshape(-1)
    if t.numel() <= 1 or t.stride(0) == 1:
        return t
    return t.contiguous()
