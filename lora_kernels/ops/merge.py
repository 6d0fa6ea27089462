"""The ``merge`` family's op: ``merge_lora_(weight!, lora_a, lora_b, scale, backend)``,
``weight += scale * lora_b @ lora_a`` in place (no autograd: merging is not differentiated)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..backends import launcher


@torch.library.custom_op("lora_kernels::merge_lora_", mutates_args=("weight",))
def merge_lora_(weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float, backend: str) -> None:
    args = (weight, lora_a, lora_b, scale)
    launcher(backend, "merge", "merge_", *args)(*args)


@merge_lora_.register_fake
def _(weight, lora_a, lora_b, scale, backend):
    return None
