"""How the Triton launchers hand tensors to their kernels: the one rule for strides.

Every tensor argument of every kernel is either read through its strides or made contiguous
here, by the launcher, before the launch:

* matrices and adapter stacks (x, weight, lora_a, lora_b, dy, S, outputs) go to the kernel with
  their strides, whatever they are (transposed, sliced, expanded with stride 0, offset into their
  storage): copying a weight or an activation would cost as much as the kernel;
* bias-like vectors of the output's width go with their stride (``vector_stride``): an expanded
  bias (``torch.tensor(0.5).expand(N)``, stride 0) then costs nothing;
* index and per-adapter vectors (adapter ids, scales, ranks: M or L elements) are made contiguous
  (``index_vector``): one tiny copy when a caller passes a column of a table (``table[:, 0]``),
  none otherwise, and the kernels index them by position.

Tensors passed in place of an absent argument (a pointer a kernel never dereferences) need no
care.
"""

from __future__ import annotations

import torch


def index_vector(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` (1-D: adapter ids, scales, ranks) as a contiguous tensor; None stays None."""
    return None if t is None else t.contiguous()


def vector_stride(t: torch.Tensor | None) -> int:
    """The element stride of the 1-D ``t`` a kernel reads as ``ptr + i * stride`` (0 for None,
    whose pointer is never read)."""
    return 0 if t is None else t.stride(0)
