"""PEFT's ``_mixed_batch_forward`` of a LoRA linear layer in one ``lora_linear_multi`` call:
shared by the fused PEFT layers on a plain base (``peft.py``) and on a 4-bit base
(``peft_qlora.py``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..functional import lora_linear_multi
from ..layers.base import BASE_ADAPTER, cached_host_tensor

__all__ = ["mixed_linear_forward"]


def mixed_linear_forward(
    layer: nn.Module,
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    names: list[str],
    used: list[str],
) -> torch.Tensor:
    """PEFT's ``_mixed_batch_forward`` of a LoRA linear ``layer`` (plain or 4-bit, whose base is
    ``x @ w.T + bias``) in one ``lora_linear_multi`` call: row (or sequence) i runs adapter
    ``names[i]``; ``"__base__"`` and adapters the layer lacks run the base only. ``used``: the
    layer's adapters the batch names, in order of first use.

    The ids, ranks and scales are host lists made into device tensors once per distinct value
    (kept on the layer), so a decode step that repeats its batch copies nothing from the host.
    """
    a_w = [layer.lora_A[n].weight for n in used]
    b_w = [layer.lora_B[n].weight for n in used]
    ranks = [t.shape[0] for t in a_w]
    r_max = max(ranks)
    # Zero-padded to the largest rank inside autograd, so each adapter's weights get the
    # gradient of their own rows.
    lora_a = torch.stack([F.pad(t, (0, 0, 0, r_max - t.shape[0])) for t in a_w])
    lora_b = torch.stack([F.pad(t, (0, r_max - t.shape[1])) for t in b_w])
    index = {n: i for i, n in enumerate(used)}
    ids = [index.get(n, -1) if n != BASE_ADAPTER else -1 for n in names]
    scale_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x3 = x if x.dim() <= 3 else x.reshape(x.shape[0], -1, x.shape[-1])
    y = lora_linear_multi(
        x3,
        w,
        bias,
        lora_a,
        lora_b,
        cached_host_tensor(layer, [layer.scaling[n] for n in used], scale_dtype, x.device),
        cached_host_tensor(layer, ids, torch.int32, x.device),
        ranks=cached_host_tensor(layer, ranks, torch.int32, x.device),
        backend=layer.lora_kernels_backend,
    )
    return y.reshape(*x.shape[:-1], y.shape[-1])
