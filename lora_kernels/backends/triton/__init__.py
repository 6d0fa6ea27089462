"""Triton kernels, one module per kernel family.

Importing this package never fails: ``HAS_TRITON`` says whether Triton imported and is recent
enough (``MIN_TRITON``), ``TRITON_PROBLEM`` why not (the message a ``backend="triton"`` call
raises). Triton runs CUDA tensors natively, and CPU tensors only under its interpreter
(``TRITON_INTERPRET=1``, set before ``triton`` is first imported).
"""

from __future__ import annotations

import os
import re

# The oldest Triton the kernels run on: 3.4 brought ``triton.autotune(..., cache_results=)``
# (tuning results kept on disk), which the GEMM autotuner passes with ``do_bench=``. Keep it
# equal to the bound in pyproject.toml (a test checks).
MIN_TRITON = (3, 4)


def triton_version_problem(version: str) -> str | None:
    """Why Triton ``version`` cannot run the kernels, or None when it can."""
    found = re.match(r"(\d+)\.(\d+)", version)
    if found is None:
        return f"cannot read the installed triton's version {version!r}"
    if (int(found.group(1)), int(found.group(2))) < MIN_TRITON:
        need = ".".join(map(str, MIN_TRITON))
        return (
            f"triton {version} is installed; the triton backend needs triton >= {need} "
            f"(autotune's do_bench= and cache_results=): pip install 'triton>={need}'"
        )
    return None


try:
    import triton
    import triton.language as tl  # noqa: F401

    TRITON_PROBLEM = triton_version_problem(triton.__version__)
except Exception:  # pragma: no cover - depends on the machine
    TRITON_PROBLEM = "triton is not installed"
# Whether the Triton backend can load; TRITON_PROBLEM says why not.
HAS_TRITON = TRITON_PROBLEM is None


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
