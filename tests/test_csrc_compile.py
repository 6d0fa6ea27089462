"""Compile checks of the CUDA C++ sources; no GPU needed.

Every torch-free translation unit ``csrc/*.cu`` is compiled with nvcc for sm_80 and sm_90, with
the flags torch's build adds (``__CUDA_NO_HALF_OPERATORS__`` and friends) and ``-Xptxas -v``.
A compile error fails, and so does any kernel for which ptxas reports a register spill or a
stack frame (local memory: a register array indexed at run time, or a spill by another name).
The torch binding is syntax-checked with the host compiler against torch's headers (the CPU
wheel ships the c10/cuda ones). Skipped only where nvcc (or, for the binding, a C++ compiler
or the headers) is missing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from lora_kernels import _jit

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
ARCHS = ("80", "90")
KERNEL_FILES = sorted(CSRC.glob("*.cu"))
# What torch.utils.cpp_extension adds to every nvcc command of an extension build.
TORCH_NVCC_FLAGS = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
]
TORCH_INCLUDE = re.compile(r'^\s*#\s*include\s*[<"](torch|ATen|c10)/', re.M)
# ptxas -v, per kernel: "Compiling entry function 'NAME' for 'sm_90'", then "Function
# properties for NAME" with "S bytes stack frame, A bytes spill stores, B bytes spill loads".
ENTRY = re.compile(r"Compiling entry function '(?P<name>[^']+)' for '(?P<arch>sm_\w+)'")
PROPS = re.compile(
    r"Function properties for (?P<name>\S+)\s*\n\s*(?P<stack>\d+) bytes stack frame, "
    r"(?P<stores>\d+) bytes spill stores, (?P<loads>\d+) bytes spill loads"
)


def _nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _compile(nvcc: str, source: Path, arch: str, out_dir: Path) -> subprocess.CompletedProcess:
    cmd = [
        nvcc,
        "-c",
        "-std=c++17",  # the oldest standard torch builds extensions with
        *_jit.NVCC_FLAGS,
        *TORCH_NVCC_FLAGS,
        f"-I{CSRC / 'include'}",
        "-Xptxas",
        "-v",
        f"-gencode=arch=compute_{arch},code=sm_{arch}",
        str(source),
        "-o",
        str(out_dir / f"{source.stem}.sm_{arch}.o"),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[tuple[str, str], subprocess.CompletedProcess]:
    """nvcc output for every (file, arch), compiled in parallel once per test session."""
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (CUDA_HOME, CUDA_PATH, PATH)")
    out_dir = tmp_path_factory.mktemp("nvcc")
    jobs = [(source, arch) for source in KERNEL_FILES for arch in ARCHS]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        results = pool.map(lambda job: _compile(nvcc, *job, out_dir), jobs)
        return {
            (source.name, arch): proc for (source, arch), proc in zip(jobs, results, strict=True)
        }


def test_kernel_sources_are_torch_free():
    assert KERNEL_FILES, "no csrc/*.cu found"
    for path in [*KERNEL_FILES, *sorted((CSRC / "include").rglob("*"))]:
        if path.is_file():
            assert not TORCH_INCLUDE.search(path.read_text()), f"{path} includes a torch header"
    assert TORCH_INCLUDE.search((CSRC / "binding.cpp").read_text())


def test_every_source_is_built():
    """The translation units that setup.py and the JIT build compile are exactly what is here."""
    built = set(_jit.SOURCES)
    present = {p.name for p in CSRC.iterdir() if p.suffix in (".cu", ".cpp")}
    assert built == present


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", [p.name for p in KERNEL_FILES])
def test_compiles_without_spills(compiled, source, arch):
    proc = compiled[(source, arch)]
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"nvcc failed on {source} for sm_{arch}:\n{log}"
    entries = [m["name"] for m in ENTRY.finditer(log) if m["arch"] == f"sm_{arch}"]
    assert entries, f"ptxas reported no kernel for {source} sm_{arch}:\n{log}"
    props = {m["name"]: m for m in PROPS.finditer(log)}
    bad = []
    for name in entries:
        assert name in props, f"no 'Function properties' line for {name}:\n{log}"
        p = props[name]
        if int(p["stores"]) or int(p["loads"]) or int(p["stack"]):
            bad.append(
                f"{name}: {p['stack']} B stack, {p['stores']} B spill stores, "
                f"{p['loads']} B spill loads"
            )
    assert not bad, f"{source} sm_{arch} uses local memory:\n" + "\n".join(bad)


def _cuda_include_dir(nvcc: str) -> Path | None:
    """The directory of cuda_runtime_api.h, as nvcc itself passes it (-I in its dry run)."""
    proc = subprocess.run(
        [nvcc, "--dryrun", "-c", "-x", "cu", "-", "-o", os.devnull],
        input="",
        capture_output=True,
        text=True,
        timeout=60,
    )
    for match in re.finditer(r'-I"?([^"\s]+)"?', proc.stdout + proc.stderr):
        path = Path(match.group(1))
        if (path / "cuda_runtime_api.h").is_file():
            return path
    return None


def test_binding_syntax():
    """The torch binding parses and its op registrations type-check (no CUDA torch needed)."""
    import torch.utils.cpp_extension as cpp_extension

    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    nvcc = _nvcc()
    if cxx is None or nvcc is None:
        pytest.skip("needs a C++ compiler and nvcc (for the CUDA runtime headers)")
    torch_includes = [Path(p) for p in cpp_extension.include_paths()]
    if not any((p / "c10" / "cuda" / "CUDAGuard.h").is_file() for p in torch_includes):
        pytest.skip("this torch ships no c10/cuda headers")
    cuda_include = _cuda_include_dir(nvcc)
    if cuda_include is None:
        pytest.skip("cuda_runtime_api.h not found")
    cmd = [
        cxx,
        "-std=c++20",
        "-fsyntax-only",
        "-Werror=return-type",
        # CPU wheels lack the configure-generated c10/cuda/impl/cuda_cmake_macros.h.
        "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
        "-DLORA_KERNELS_PYTHON_MODULE",
        f"-I{CSRC / 'include'}",
        *[f"-isystem{p}" for p in torch_includes],
        f"-isystem{cuda_include}",
        f"-isystem{sysconfig.get_path('include')}",
        str(CSRC / "binding.cpp"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
