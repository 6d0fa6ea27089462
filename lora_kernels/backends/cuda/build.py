"""Find the compiled CUDA extension: the ahead-of-time build, or a just-in-time build of csrc/.

``load_extension()`` returns ``torch.ops.lora_kernels_cuda`` (the registered ops) or None, and
never raises: it imports ``lora_kernels._C`` when ``setup.py`` built it, and otherwise compiles
the sources shipped with the package with ``torch.utils.cpp_extension.load`` (ninja), once, into
a cache directory (``$LORA_KERNELS_CACHE_DIR``, else ``$XDG_CACHE_HOME/lora_kernels``, else
``~/.cache/lora_kernels``), keyed by the torch, CUDA and Python versions and the target
architectures. ``extension_status()`` says which one is in use, or why none is.

Switches (environment):

- ``LORA_KERNELS_BUILD_CUDA=0``: never compile at run time (an ahead-of-time build still loads).
- ``LORA_KERNELS_CUDA_ARCHS``: ``"80;90"``-style list of compute capabilities to build for
  (``90a``, ``100a`` and a ``+PTX`` suffix are understood). The JIT build defaults to the GPUs
  it can see, ``setup.py`` to ``"80;90+PTX"``.
- ``MAX_JOBS`` (ninja's parallel jobs) and ``NVCC_THREADS`` (nvcc's ``--threads``).

This module imports nothing heavy at import time: ``setup.py`` reads its flag lists without
importing torch.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
import threading
from pathlib import Path

__all__ = [
    "CXX_FLAGS",
    "DEFAULT_ARCHS",
    "NVCC_FLAGS",
    "SOURCES",
    "cuda_build_decision",
    "csrc_dir",
    "extension_status",
    "gencode_flags",
    "load_extension",
    "nvcc_cuda_version",
    "nvcc_thread_flags",
]

# Machine code for A100 and H100, plus PTX of the newest, which the driver of a newer GPU
# (Blackwell and later) compiles on first load: without it the extension would not run there.
DEFAULT_ARCHS = "80;90+PTX"
# Translation units, relative to csrc/: the torch-free kernels and the torch binding.
SOURCES = ("lora_linear.cu", "merge.cu", "binding.cpp")
CXX_FLAGS = ["-O3"]
# No --use_fast_math: it flushes fp32 denormals, and these kernels have no division or
# transcendental to speed up. -lineinfo maps profiler samples back to source lines.
NVCC_FLAGS = ["-O3", "-lineinfo"]
# The ops' namespace, as registered by csrc/binding.cpp.
OPS_NAMESPACE = "lora_kernels_cuda"
_JIT_NAME = "lora_kernels_cuda_jit"


def _load_envs():
    """``lora_kernels.envs``, also when ``setup.py`` runs this file on its own (no package)."""
    path = Path(__file__).resolve().parents[2] / "envs.py"
    spec = importlib.util.spec_from_file_location("_lora_kernels_envs", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


envs = _load_envs()

_lock = threading.Lock()
_state: tuple[object | None, str] | None = None


def gencode_flags(archs: str) -> list[str]:
    """``"80;90"`` -> ``-gencode`` flags with machine code for each; ``"90+PTX"`` adds PTX too."""
    flags = []
    for item in archs.replace(",", ";").replace(" ", ";").split(";"):
        item = item.strip().lower()
        if not item:
            continue
        ptx = item.endswith("+ptx")
        num = item.removesuffix("+ptx").replace(".", "")
        if not (num[:-1].isdigit() if num.endswith("a") else num.isdigit()):
            raise ValueError(
                f"LORA_KERNELS_CUDA_ARCHS: expected entries like 80 or 90a, got {item!r}"
            )
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    if not flags:
        raise ValueError(f"LORA_KERNELS_CUDA_ARCHS: no architecture in {archs!r}")
    return flags


def nvcc_cuda_version(cuda_home: str | None) -> str | None:
    """``"12.4"`` from ``<cuda_home>/bin/nvcc --version``, or None when it cannot be run."""
    import re
    import subprocess

    if not cuda_home:
        return None
    try:
        out = subprocess.run(
            [os.path.join(cuda_home, "bin", "nvcc"), "--version"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+)\.(\d+)", out)
    return f"{match.group(1)}.{match.group(2)}" if match else None


def cuda_build_decision(mode: str, torch_cuda: str | None, nvcc_cuda: str | None):
    """``(build, reason)``: whether ``setup.py`` compiles the extension, and why not.

    ``mode`` is ``LORA_KERNELS_BUILD_CUDA`` (``auto``, ``0``, ``1``). An nvcc whose CUDA major
    version differs from torch's cannot build an extension for it (torch's build refuses): in
    ``auto`` mode that skips the extension with the reason, so that ``pip install`` still
    succeeds (the Triton and torch backends work without it); ``1`` makes the caller fail.
    """
    if mode == "0":
        return False, "LORA_KERNELS_BUILD_CUDA=0"
    if torch_cuda is None:
        return False, "this torch has no CUDA"
    if nvcc_cuda is None:
        return False, "nvcc was not found or did not run (set CUDA_HOME)"
    if torch_cuda.split(".")[0] != nvcc_cuda.split(".")[0]:
        return False, (
            f"nvcc is CUDA {nvcc_cuda} but torch was built with CUDA {torch_cuda}: install an "
            f"nvcc of CUDA {torch_cuda.split('.')[0]}.x (or point CUDA_HOME at one)"
        )
    return True, None


def nvcc_thread_flags() -> list[str]:
    """``--threads N`` from ``NVCC_THREADS`` (nvcc compiles the architectures in parallel)."""
    threads = os.environ.get("NVCC_THREADS", "").strip()
    return ["--threads", threads] if threads else []


def csrc_dir() -> Path | None:
    """The kernel sources: shipped inside the package (wheel), or beside it (source checkout)."""
    package = Path(__file__).resolve().parents[2]  # lora_kernels/
    for candidate in (package / "csrc", package.parent / "csrc"):
        if all((candidate / name).is_file() for name in SOURCES):
            return candidate
    return None


def load_extension():
    """``torch.ops.lora_kernels_cuda`` once the extension is loaded, else None (see the status)."""
    global _state
    with _lock:
        if _state is None:
            try:
                _state = _load()
            except Exception as exc:  # never raise at import or at first use
                _state = (None, f"unavailable: {type(exc).__name__}: {exc}")
        return _state[0]


def extension_status() -> str:
    """``"aot"``, ``"jit"`` or ``"unavailable: <reason>"``; loads (and may build) on first call."""
    load_extension()
    assert _state is not None
    return _state[1]


def _load() -> tuple[object | None, str]:
    try:
        import torch
    except Exception as exc:
        return None, f"unavailable: torch does not import ({exc})"
    if torch.version.cuda is None:
        return None, "unavailable: this torch build has no CUDA"

    aot_error = ""
    try:
        importlib.import_module("lora_kernels._C")
        return getattr(torch.ops, OPS_NAMESPACE), "aot"
    except ModuleNotFoundError:
        pass
    except Exception as exc:  # e.g. built against another torch: try a fresh JIT build
        aot_error = f" (the ahead-of-time build failed to load: {exc})"

    if envs.build_cuda() == "0":
        return None, f"unavailable: no ahead-of-time build and LORA_KERNELS_BUILD_CUDA=0{aot_error}"
    return _jit_build(torch, aot_error)


def _jit_archs(torch) -> str:
    archs = envs.cuda_archs()
    if archs:
        return archs
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(count)})
        return ";".join(f"{major}{minor}" for major, minor in caps if major >= 8) or DEFAULT_ARCHS
    return DEFAULT_ARCHS


def _cache_root() -> Path:
    explicit = envs.cache_dir()
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "lora_kernels"


def _jit_build(torch, aot_error: str) -> tuple[object | None, str]:
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        return None, f"unavailable: nvcc not found (set CUDA_HOME){aot_error}"
    src = csrc_dir()
    if src is None:
        return None, f"unavailable: the csrc/ sources are not installed{aot_error}"
    archs = _jit_archs(torch)
    nvcc_flags = NVCC_FLAGS + gencode_flags(archs) + nvcc_thread_flags()
    # One directory per toolchain and flag set: a stale build for another torch is never reused
    # (torch itself rebuilds when the sources change).
    key = hashlib.sha256(
        "|".join([torch.__version__, str(torch.version.cuda), sys.version, *nvcc_flags]).encode()
    ).hexdigest()[:16]
    build_dir = _cache_root() / f"torch{torch.__version__}-{key}"
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        cpp_extension.load(
            name=_JIT_NAME,
            sources=[str(src / name) for name in SOURCES],
            extra_cflags=CXX_FLAGS,
            extra_cuda_cflags=nvcc_flags,
            extra_include_paths=[str(src / "include")],
            build_directory=str(build_dir),
            is_python_module=False,
            verbose=False,
        )
    except Exception as exc:
        lines = str(exc).strip().splitlines()
        detail = lines[0] if lines else type(exc).__name__
        return None, f"unavailable: JIT build failed ({detail}){aot_error}"
    return getattr(torch.ops, OPS_NAMESPACE), "jit"
