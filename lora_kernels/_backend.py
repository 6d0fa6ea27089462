"""Which backend computes a call: ``"cuda"``, ``"triton"`` or ``"torch"``.

``backend="auto"`` picks, in order:

* ``LORA_KERNELS_BACKEND`` when set (``cuda``, ``triton``, ``torch`` or ``auto``);
* the torch path for CPU tensors (auto never picks the Triton interpreter, whatever
  ``TRITON_INTERPRET`` says: it is for tests, and orders of magnitude slower);
* Triton for CUDA tensors when Triton imports and the call is one it serves (fp16/bf16/fp32,
  rank <= 256); the torch path otherwise.

The CUDA C++ kernels are used only when asked for by name until a GPU has measured them faster
than Triton for a shape (see the README's backend table). A backend asked for by name that
cannot serve the call raises a ``ValueError`` that says why, before any kernel runs.
"""

from __future__ import annotations

import os

import torch

from .triton import HAS_TRITON, interpreting

BACKENDS = ("cuda", "triton", "torch")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_TRITON_RANK = 256


def _cuda_extension_loaded() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        from . import _jit
    except ImportError:
        return False
    return _jit.load_extension() is not None


def available_backends() -> list[str]:
    """The backends that can run on this machine, a subset of ``["cuda", "triton", "torch"]``.

    ``"triton"`` needs Triton and either a CUDA device or the interpreter (``TRITON_INTERPRET=1``);
    ``"cuda"`` needs a CUDA device and the compiled extension (ahead of time or just in time).
    """
    found = []
    if _cuda_extension_loaded():
        found.append("cuda")
    if HAS_TRITON and (torch.cuda.is_available() or interpreting()):
        found.append("triton")
    found.append("torch")
    return found


def _why_triton_cannot(x: torch.Tensor, rank: int) -> str | None:
    if not HAS_TRITON:
        return "triton is not installed"
    if x.device.type == "cpu" and not interpreting():
        return (
            "the triton backend runs CUDA tensors; CPU tensors need TRITON_INTERPRET=1 set "
            "before triton is imported"
        )
    if x.device.type not in ("cpu", "cuda"):
        return f"the triton backend runs CUDA tensors, got x on {x.device}"
    if x.dtype not in TRITON_DTYPES:
        return f"the triton backend takes float16, bfloat16 or float32, got x of dtype {x.dtype}"
    if rank > MAX_TRITON_RANK:
        return f"the triton backend takes ranks up to {MAX_TRITON_RANK}, got rank {rank}"
    return None


def _why_cuda_cannot(x: torch.Tensor) -> str | None:
    if x.device.type != "cuda":
        return f"the cuda backend runs CUDA tensors, got x on {x.device}"
    if not _cuda_extension_loaded():
        from . import _jit

        return f"the CUDA extension is not available ({_jit.extension_status()})"
    return None


def resolve_backend(backend: str, x: torch.Tensor, rank: int) -> str:
    """Turn ``backend`` (or ``"auto"``) into the backend that will run, or raise ``ValueError``."""
    if not isinstance(backend, str) or backend not in (*BACKENDS, "auto"):
        raise ValueError(
            f"backend must be one of 'auto', 'cuda', 'triton', 'torch', got {backend!r}"
        )
    if backend == "auto":
        forced = os.environ.get("LORA_KERNELS_BACKEND", "auto").strip().lower() or "auto"
        if forced not in (*BACKENDS, "auto"):
            raise ValueError(
                "LORA_KERNELS_BACKEND must be one of 'auto', 'cuda', 'triton', 'torch', "
                f"got {forced!r}"
            )
        backend = forced
    if backend == "auto":
        if x.device.type == "cuda" and _why_triton_cannot(x, rank) is None:
            return "triton"
        return "torch"
    if backend == "triton":
        why = _why_triton_cannot(x, rank)
        if why is not None:
            raise ValueError(f"backend='triton' cannot run this call: {why}")
    elif backend == "cuda":
        why = _why_cuda_cannot(x) or _why_triton_cannot(x, rank)
        if why is not None:
            raise ValueError(f"backend='cuda' cannot run this call: {why}")
    return backend
