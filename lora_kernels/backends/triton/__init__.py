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
