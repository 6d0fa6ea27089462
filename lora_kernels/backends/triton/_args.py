"""How the Triton launchers hand tensors to their kernels: the one rule for strides, in one place.

Every tensor argument of every kernel is either read through its strides or made unit-stride
here, by the launcher, before the launch:

* matrices and adapter stacks (x, weight, lora_a, lora_b, dy, S, outputs, gradients) go to the
  kernel with their strides, whatever they are (transposed, sliced, expanded with stride 0,
  offset into their storage): copying a weight or an activation would cost as much as the kernel;
* bias-like vectors of the output's width go with their stride where the kernel takes one
  (``vector_stride``; lora_linear, lora_multi): an expanded bias (``torch.tensor(0.5).expand(N)``,
  stride 0) then costs nothing;
* index and per-adapter vectors (token and adapter ids, scales, ranks: M or L elements) are made
  contiguous (``index_vector``): one tiny copy when a caller passes a column of a table
  (``table[:, 0]``), none otherwise, and the kernels index them by position;
* the other vectors and small tables the kernels index as flat arrays (the embedding, DoRA and
  QLoRA families' bias, DoRA's gain and norms, the 4-bit format's absmax and code tables) go
  through ``unit_stride``: returned as they are when unit-stride, else copied once per call (a
  few KB, a device-side copy, capture-safe).

Tensors passed in place of an absent argument (a pointer a kernel never dereferences) need no
care.
"""

from __future__ import annotations

import torch

__all__ = ["index_vector", "unit_stride", "vector_stride"]


def index_vector(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` (1-D: adapter ids, scales, ranks) as a contiguous tensor; None stays None."""
    return None if t is None else t.contiguous()


def vector_stride(t: torch.Tensor | None) -> int:
    """The element stride of the 1-D ``t`` a kernel reads as ``ptr + i * stride`` (0 for None,
    whose pointer is never read)."""
    return 0 if t is None else t.stride(0)


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
