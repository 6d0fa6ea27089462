"""Every ``LORA_KERNELS_*`` environment variable the package reads, parsed here and nowhere else.

Each is read when asked for (a function call, not an import-time constant), so a process may
change it at run time, as the tests do. ``lora-kernels info`` prints them all (:func:`describe`).
This module imports nothing from the package: ``setup.py`` and the CUDA build load it by path.

=============================== ========= ====================================================
variable                        default   meaning
=============================== ========= ====================================================
``LORA_KERNELS_BACKEND``        ``auto``  the backend of every ``backend="auto"`` call:
                                          ``auto``, ``cuda``, ``triton`` or ``torch``
``LORA_KERNELS_BUILD_CUDA``     ``auto``  build the CUDA extension (install and just in time):
                                          ``auto`` where it can, ``1`` or fail, ``0`` never
``LORA_KERNELS_CUDA_ARCHS``     (unset)   compute capabilities to build for, ``"80;90+PTX"``
                                          style; unset: the build's own default
``LORA_KERNELS_CACHE_DIR``      (unset)   where just-in-time builds go; unset:
                                          ``$XDG_CACHE_HOME/lora_kernels`` or ``~/.cache``
``LORA_KERNELS_TRITON_AUTOTUNE`` ``1``    ``0``: every Triton launch takes its first candidate
                                          config untimed (reproducible, no tuning runs)
``LORA_KERNELS_VLLM``           ``1``     ``0``: the vLLM plugin leaves vLLM's own punica
                                          wrapper in place (docs/serving-engines.md)
``LORA_KERNELS_VLLM_FUSED``     ``0``     ``1``: vLLM's unquantized, unsharded linear LoRA
                                          layers run base GEMM and adapters in one kernel
``LORA_KERNELS_SGLANG``         ``1``     ``0``: the SGLang plugin does not register the
                                          ``lora_kernels`` LoRA backend
=============================== ========= ====================================================
"""

from __future__ import annotations

import os

BACKENDS = ("auto", "cuda", "triton", "torch")

DOCS = {
    "LORA_KERNELS_BACKEND": "backend of every backend='auto' call (auto, cuda, triton, torch)",
    "LORA_KERNELS_BUILD_CUDA": "build the CUDA extension: auto, 1 (or fail), 0 (never)",
    "LORA_KERNELS_CUDA_ARCHS": "compute capabilities to build for, e.g. '80;90+PTX'",
    "LORA_KERNELS_CACHE_DIR": "directory of just-in-time CUDA builds",
    "LORA_KERNELS_TRITON_AUTOTUNE": "0: Triton launches take their first config untimed",
    "LORA_KERNELS_VLLM": "0: the vLLM plugin keeps vLLM's own punica wrapper",
    "LORA_KERNELS_VLLM_FUSED": "1: vLLM linear LoRA layers run base + LoRA in one kernel",
    "LORA_KERNELS_SGLANG": "0: the SGLang plugin does not register its LoRA backend",
}


def _get(name: str, default: str = "") -> str:
    return os.environ.get(name, default).strip()


def backend() -> str:
    """``LORA_KERNELS_BACKEND``, lower-cased; ``ValueError`` for a value that is no backend."""
    value = _get("LORA_KERNELS_BACKEND", "auto").lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(
            f"LORA_KERNELS_BACKEND must be one of 'auto', 'cuda', 'triton', 'torch', got {value!r}"
        )
    return value


def build_cuda() -> str:
    """``LORA_KERNELS_BUILD_CUDA``: ``"auto"``, ``"0"`` or ``"1"``; ``ValueError`` otherwise."""
    value = _get("LORA_KERNELS_BUILD_CUDA", "auto").lower() or "auto"
    if value not in ("auto", "0", "1"):
        raise ValueError(f"LORA_KERNELS_BUILD_CUDA: expected auto, 0 or 1, got {value!r}")
    return value


def cuda_archs() -> str:
    """``LORA_KERNELS_CUDA_ARCHS``, or ``""`` when unset (the build picks its default)."""
    return _get("LORA_KERNELS_CUDA_ARCHS")


def cache_dir() -> str:
    """``LORA_KERNELS_CACHE_DIR``, or ``""`` when unset."""
    return _get("LORA_KERNELS_CACHE_DIR")


def triton_autotune() -> bool:
    """False when ``LORA_KERNELS_TRITON_AUTOTUNE=0``: each launch takes its first config."""
    return _get("LORA_KERNELS_TRITON_AUTOTUNE", "1") != "0"


def _switch(name: str) -> bool:
    """An on/off switch that is on unless set to ``0``, ``false``, ``off`` or ``no``."""
    return _get(name, "1").lower() not in ("0", "false", "off", "no")


def vllm_plugin() -> bool:
    """``LORA_KERNELS_VLLM``: whether the vLLM plugin installs our punica wrapper."""
    return _switch("LORA_KERNELS_VLLM")


def vllm_fused() -> bool:
    """``LORA_KERNELS_VLLM_FUSED=1``: the vLLM plugin also fuses base GEMM and LoRA (opt-in)."""
    return _get("LORA_KERNELS_VLLM_FUSED", "0").lower() in ("1", "true", "on", "yes")


def sglang_plugin() -> bool:
    """``LORA_KERNELS_SGLANG``: whether the SGLang plugin registers the ``lora_kernels`` backend."""
    return _switch("LORA_KERNELS_SGLANG")


def describe() -> dict[str, str | None]:
    """Every variable and its value in this process (None: unset)."""
    return {name: os.environ.get(name) for name in DOCS}
