"""Triton kernels, one module per kernel family.

Importing this package never fails: ``HAS_TRITON`` says whether Triton itself imported. Triton
runs CUDA tensors natively, and CPU tensors only under its interpreter (``TRITON_INTERPRET=1``,
set before ``triton`` is first imported).
"""

from __future__ import annotations

import os

try:
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the machine
    HAS_TRITON = False


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def device_guard(tensor):
    """A context that makes ``tensor``'s CUDA device current (a no-op for other devices).

    Triton launches on the current device and its current stream, not on the device of the
    arguments: a layer on ``cuda:1`` (``device_map="auto"``) called while ``cuda:0`` is current
    would run on the wrong device. The C++ binding guards the same way.
    """
    import contextlib

    import torch

    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


def on_input_device(fn):
    """Decorator: run a launcher under ``device_guard`` of its first tensor argument."""
    import functools

    import torch

    @functools.wraps(fn)
    def launcher(*args, **kwargs):
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if first is None:
            return fn(*args, **kwargs)
        with device_guard(first):
            return fn(*args, **kwargs)

    return launcher
