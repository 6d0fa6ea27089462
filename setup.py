"""Build script: the pure-Python package, plus the CUDA extension ``lora_kernels._C`` when it can.

The metadata lives in pyproject.toml; this file adds two things:

- ``csrc/`` is copied into the package (``lora_kernels/csrc``) so that an install without the
  compiled extension can still build it just in time (``lora_kernels.backends.cuda.build``).
- ``lora_kernels._C`` is compiled ahead of time when torch has CUDA (``torch.version.cuda``) and
  nvcc is found. A GPU is not needed and never looked for: build machines often have none.

Switches (environment; ``lora_kernels/envs.py`` parses the ``LORA_KERNELS_*`` ones):

- ``LORA_KERNELS_BUILD_CUDA=auto`` (default): build the extension if possible, else skip it
  with a message; ``1``: fail if it cannot be built; ``0``: never build it.
- ``LORA_KERNELS_CUDA_ARCHS`` (default ``"80;90+PTX"``: machine code for sm_80 and sm_90 and
  PTX that newer GPUs compile at load): compute capabilities, turned into ``-gencode`` flags
  (``90a`` and a ``+PTX`` suffix are understood).
- In ``auto`` mode an nvcc whose CUDA major version is not torch's skips the extension with a
  message (torch's build would refuse it and fail the install).
- ``MAX_JOBS`` (parallel compile jobs, read by torch's ninja build) and ``NVCC_THREADS``
  (nvcc's ``--threads``, to compile the architectures of one file in parallel).

pip builds in an isolated environment without torch, where ``auto`` gives the pure-Python
package. To compile the extension, install into an environment that already has torch with
CUDA, without isolation: ``pip install --no-build-isolation .``.
"""

from __future__ import annotations

import runpy
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
# The flag lists are shared with the JIT build; build.py imports nothing heavy at module level.
_JIT = runpy.run_path(str(ROOT / "lora_kernels" / "backends" / "cuda" / "build.py"))


class BuildPyWithKernelSources(build_py):
    """build_py that also ships csrc/ as package data (lora_kernels/csrc) for the JIT build."""

    def run(self):
        super().run()
        if not self.dry_run:
            shutil.copytree(
                ROOT / "csrc", Path(self.build_lib) / "lora_kernels" / "csrc", dirs_exist_ok=True
            )


def _skip(mode: str, reason: str) -> None:
    if mode == "1":
        raise RuntimeError(f"LORA_KERNELS_BUILD_CUDA=1, but {reason}")
    print(f"lora_kernels: installing without the CUDA extension: {reason}")


def _cuda_extension():
    """(extension, build_ext command) for lora_kernels._C, or (None, None)."""
    try:
        mode = _JIT["envs"].build_cuda()
    except ValueError as exc:
        raise RuntimeError(str(exc)) from None
    if mode == "0":
        return None, None
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as exc:
        _skip(
            mode,
            f"torch is not importable here ({exc}); to compile the extension, install "
            "with `pip install --no-build-isolation .` into an environment with torch",
        )
        return None, None
    if torch.version.cuda is None:
        _skip(mode, f"torch {torch.__version__} has no CUDA")
        return None, None
    if CUDA_HOME is None:
        _skip(mode, "nvcc was not found (set CUDA_HOME)")
        return None, None
    # A CUDA major-version mismatch would fail the build itself (and so pip install).
    build, reason = _JIT["cuda_build_decision"](
        mode, torch.version.cuda, _JIT["nvcc_cuda_version"](CUDA_HOME)
    )
    if not build:
        _skip(mode, reason)
        return None, None
    archs = _JIT["envs"].cuda_archs() or _JIT["DEFAULT_ARCHS"]
    nvcc_flags = _JIT["NVCC_FLAGS"] + _JIT["gencode_flags"](archs) + _JIT["nvcc_thread_flags"]()
    extension = CUDAExtension(
        name="lora_kernels._C",
        sources=[f"csrc/{name}" for name in _JIT["SOURCES"]],
        include_dirs=[str(ROOT / "csrc" / "include")],
        define_macros=[("LORA_KERNELS_PYTHON_MODULE", None)],
        extra_compile_args={"cxx": list(_JIT["CXX_FLAGS"]), "nvcc": nvcc_flags},
    )
    return extension, BuildExtension


_extension, _build_ext = _cuda_extension()
_cmdclass = {"build_py": BuildPyWithKernelSources}
if _build_ext is not None:
    _cmdclass["build_ext"] = _build_ext

setup(ext_modules=[_extension] if _extension is not None else [], cmdclass=_cmdclass)
