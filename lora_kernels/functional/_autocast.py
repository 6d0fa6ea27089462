"""Autocast for the functional entry points: the kernels take one dtype, as ``F.linear`` does."""

from __future__ import annotations

import torch


def autocast_inputs(x: torch.Tensor, *tensors):
    """Cast floating inputs to the autocast dtype when autocast is on, as ``F.linear`` would."""
    dev = x.device.type
    if dev not in ("cuda", "cpu") or not torch.is_autocast_enabled(dev):
        return (x, *tensors)
    dtype = torch.get_autocast_dtype(dev)
    return tuple(None if t is None else t.to(dtype) for t in (x, *tensors))
