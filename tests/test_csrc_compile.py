"""Compile checks of the CUDA C++ sources; no GPU needed.

Every torch-free translation unit ``csrc/*.cu`` is compiled with nvcc for sm_80 and sm_90, with
the flags torch's build adds (``__CUDA_NO_HALF_OPERATORS__`` and friends) and ``-Xptxas -v``.
A compile error fails, and so does any kernel for which ptxas reports a register spill or a
stack frame (local memory: a register array indexed at run time, or a spill by another name).
The torch binding is syntax-checked with the host compiler against torch's headers (the CPU
wheel ships the c10/cuda ones), and then built for real against stand-ins for the c10/cuda
pieces and the launchers, so that its op schemas, every input check and the parameters it hands
to the launchers are exercised on CPU tensors. Skipped only where nvcc (or, for the binding, a
C++ compiler or the headers) is missing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from lora_kernels.backends.cuda import build

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
        *build.NVCC_FLAGS,
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
    built = set(build.SOURCES)
    present = {p.name for p in CSRC.iterdir() if p.suffix in (".cu", ".cpp")}
    assert built == present


@pytest.mark.slow
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


@pytest.mark.slow
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


# ---------------------------------------------------------------------------------------------
# The binding built on CPU: schemas, input checks, and the parameters handed to the launchers
# ---------------------------------------------------------------------------------------------

# Stand-ins for the c10/cuda headers the binding includes (shadowing torch's, found first on the
# include path): a device guard and a stream that do nothing, the launch status check.
# Stand-ins for the c10/cuda headers the binding includes (shadowing torch's, found first on the
# include path): a device guard and a stream that do nothing, the launch status check; and
# launchers that record their parameters, with an op that returns the last record.
STUBS = Path(__file__).resolve().parent / "csrc_stubs"

LINEAR_FIELDS = [
    *["kind", "x", "x_lora", "weight", "bias", "lora_a", "lora_b", "scales", "row_ids", "ranks"],
    *["y", "s", "m", "n", "k", "r", "num_adapters", "ldx", "ldx_lora", "ldw", "lda", "ldb"],
    *["ldy", "a_adapter_stride", "b_adapter_stride", "scale", "dtype"],
]
MERGE_FIELDS = ["kind", "weight", "lora_a", "lora_b", "n", "k", "r", "ldw", "lda", "ldb"]
MERGE_FIELDS += ["scale", "dtype"]


def _build_cpu_binding(build_dir: Path, cuda_include: str) -> None:
    """The binding, with tensors on the CPU standing in for CUDA ones, and the stand-ins of
    tests/csrc_stubs."""
    import torch.utils.cpp_extension as cpp_extension

    source = (CSRC / "binding.cpp").read_text()
    # The one change to the binding: its "is this a CUDA tensor" test accepts CPU tensors.
    assert source.count(".is_cuda()") >= 3
    (build_dir / "binding_cpu.cpp").write_text(source.replace(".is_cuda()", ".is_cpu()"))
    cpp_extension.load(
        name="lora_kernels_binding_check",
        sources=[str(build_dir / "binding_cpu.cpp"), str(STUBS / "stub_launchers.cpp")],
        extra_include_paths=[str(STUBS / "include"), str(CSRC / "include"), cuda_include],
        build_directory=str(build_dir),
        is_python_module=False,
    )


def _binding_cases() -> list[str]:
    """Every check of the binding, on CPU tensors; returns the failures."""
    import torch

    ops = torch.ops.lora_kernels_cuda
    failures = []

    def rand(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape).to(dtype)

    def expect_error(pattern, fn, *args):
        try:
            fn(*args)
        except RuntimeError as exc:
            if not re.search(pattern, str(exc)):
                failures.append(f"expected /{pattern}/, got: {str(exc).splitlines()[0]}")
            return
        failures.append(f"expected /{pattern}/, got no error")

    def expect_launch(fields, want, fn, *args):
        fn(*args)
        got = dict(zip(fields, torch.ops.lora_kernels_stub.last_launch(), strict=True))
        for key, value in want.items():
            if got[key] != value:
                failures.append(f"{fn}: {key} = {got[key]}, expected {value}")

    def ptr(t):
        return 0 if t is None else t.data_ptr()

    m, k, n, r = 4, 136, 24, 8
    # Views into wider buffers: every row stride differs from the row length.
    x = rand(m, k + 8)[:, :k]
    w = rand(n, k + 16)[:, :k]
    b = rand(n)
    a = rand(r, k + 24)[:, :k]
    bb = rand(n, r + 3)[:, :r]
    y = rand(m, n + 5)[:, :n]
    s = torch.empty(m, r)
    op = ops.lora_linear_out
    linear = dict(m=m, n=n, k=k, r=r, ldx=k + 8, ldw=k + 16, lda=k + 24, ldb=r + 3, ldy=n + 5)
    common = dict(x=ptr(x), weight=ptr(w), lora_a=ptr(a), lora_b=ptr(bb), y=ptr(y), s=ptr(s))
    expect_launch(
        LINEAR_FIELDS,
        {**linear, **common, "kind": 1, "bias": ptr(b), "x_lora": ptr(x), "ldx_lora": k + 8,
         "num_adapters": 1, "scales": 0, "row_ids": 0, "ranks": 0, "scale": 1.5, "dtype": 1},
        op, x, w, b, a, bb, 1.5, None, y, s,
    )  # fmt: skip
    xl = rand(m, k + 32, dtype=torch.float16)[:, :k]
    expect_launch(
        LINEAR_FIELDS,
        {"kind": 1, "bias": 0, "x_lora": ptr(xl), "ldx_lora": k + 32, "dtype": 0},
        op, x.half(), w.half(), None, a.half(), bb.half(), 1.0, xl, y.half(), s,
    )  # fmt: skip
    expect_error(
        r"expected lora_b of shape \[24, 8\], got \[24, 7\]",
        op,
        x,
        w,
        b,
        a,
        bb[:, :7],
        1.0,
        None,
        y,
        s,
    )
    expect_error(
        r"expected weight of dtype BFloat16, got Half", op, x, w.half(), b, a, bb, 1.0, None, y, s
    )
    expect_error(
        r"expected bias of shape \[24\], got \[23\]", op, x, w, b[:23], a, bb, 1.0, None, y, s
    )
    expect_error(
        r"expected at most 64 rows of x \(the decode kernels\), got 65",
        op,
        rand(65, k),
        w,
        b,
        a,
        bb,
        1.0,
        None,
        y,
        s,
    )
    expect_error(
        r"expected a rank between 1 and 256, got 257",
        op,
        x,
        w,
        b,
        rand(257, k),
        bb,
        1.0,
        None,
        y,
        s,
    )
    expect_error(
        r"to be a multiple of 8, got 12",
        op,
        x[:, :12],
        w[:, :12],
        b,
        a[:, :12],
        bb,
        1.0,
        None,
        y,
        s,
    )
    expect_error(
        r"expected x to start 16-byte aligned",
        op,
        rand(m, k + 8)[:, 1 : k + 1],
        w,
        b,
        a,
        bb,
        1.0,
        None,
        y,
        s,
    )
    expect_error(
        r"expected the strides of weight to be multiples of 8",
        op,
        x,
        rand(n, k + 1)[:, :k],
        b,
        a,
        bb,
        1.0,
        None,
        y,
        s,
    )
    expect_error(
        r"expected lora_a to have unit stride", op, x, w, b, rand(k, r).t(), bb, 1.0, None, y, s
    )
    expect_error(
        r"expected x_lora of shape \[4, 136\], got \[3, 136\]", op, x, w, b, a, bb, 1.0, x[:3], y, s
    )
    expect_error(
        r"expected x of dtype float16 or bfloat16, got Float",
        op,
        x.float(),
        w,
        b,
        a,
        bb,
        1.0,
        None,
        y,
        s,
    )
    expect_error(
        r"expected s of dtype Float, got BFloat16", op, x, w, b, a, bb, 1.0, None, y, s.bfloat16()
    )
    expect_error(
        r"expected s to be contiguous", op, x, w, b, a, bb, 1.0, None, y, torch.empty(r, m).t()
    )
    expect_error(
        r"expected y of shape \[4, 24\], got \[4, 23\]", op, x, w, b, a, bb, 1.0, None, y[:, :23], s
    )

    num_adapters = 3
    la = rand(num_adapters, r + 8, k + 8)[:, :r, :k]
    lb = rand(num_adapters, n, r + 1)[:, :, :r]
    scales = torch.rand(num_adapters)
    ids = torch.zeros(m, dtype=torch.int32)
    ranks = torch.ones(num_adapters, dtype=torch.int32)
    mop = ops.lora_linear_multi_out
    expect_launch(
        LINEAR_FIELDS,
        {**linear, **common, "kind": 2, "lora_a": ptr(la), "lora_b": ptr(lb), "lda": k + 8,
         "ldb": r + 1, "a_adapter_stride": (r + 8) * (k + 8), "b_adapter_stride": n * (r + 1),
         "num_adapters": num_adapters, "scales": ptr(scales), "row_ids": ptr(ids),
         "ranks": ptr(ranks), "bias": 0, "dtype": 1},
        mop, x, w, None, la, lb, scales, ids, ranks, y, s,
    )  # fmt: skip
    expect_launch(
        LINEAR_FIELDS, {"kind": 2, "ranks": 0}, mop, x, w, b, la, lb, scales, ids, None, y, s
    )
    expect_error(
        r"expected lora_a to be 3-D \[L, r, K\], got shape \[8, 136\]",
        mop,
        x,
        w,
        b,
        a,
        lb,
        scales,
        ids,
        None,
        y,
        s,
    )
    expect_error(
        r"expected lora_b of shape \[3, 24, 8\], got \[1, 24, 8\]",
        mop,
        x,
        w,
        b,
        la,
        lb[:1],
        scales,
        ids,
        None,
        y,
        s,
    )
    expect_error(
        r"expected scales of shape \[3\], got \[2\]",
        mop,
        x,
        w,
        b,
        la,
        lb,
        scales[:2],
        ids,
        None,
        y,
        s,
    )
    expect_error(
        r"expected scales of dtype Float, got Double",
        mop,
        x,
        w,
        b,
        la,
        lb,
        scales.double(),
        ids,
        None,
        y,
        s,
    )
    expect_error(
        r"expected row_ids of dtype Int, got Long",
        mop,
        x,
        w,
        b,
        la,
        lb,
        scales,
        ids.long(),
        None,
        y,
        s,
    )
    expect_error(
        r"expected row_ids of shape \[4\], got \[5\]",
        mop,
        x,
        w,
        b,
        la,
        lb,
        scales,
        torch.zeros(5, dtype=torch.int32),
        None,
        y,
        s,
    )
    expect_error(
        r"expected ranks of dtype Int, got Float", mop, x, w, b, la, lb, scales, ids, scales, y, s
    )
    expect_error(
        r"expected the strides of lora_a to be multiples of 8",
        mop,
        x,
        w,
        b,
        rand(num_adapters, r, k + 1)[:, :, :k],
        lb,
        scales,
        ids,
        None,
        y,
        s,
    )

    wm = rand(n, k + 8)[:, :k]
    expect_launch(
        MERGE_FIELDS,
        {"kind": 3, "weight": ptr(wm), "lora_a": ptr(a), "lora_b": ptr(bb), "n": n, "k": k,
         "r": r, "ldw": k + 8, "lda": k + 24, "ldb": r + 3, "scale": -0.5, "dtype": 1},
        ops.merge_, wm, a, bb, -0.5,
    )  # fmt: skip
    w32 = torch.randn(n, 20)
    expect_launch(
        MERGE_FIELDS,
        {"kind": 3, "k": 20, "dtype": 2},
        ops.merge_,
        w32,
        torch.randn(r, 20),
        torch.randn(n, r),
        1.0,
    )
    expect_error(
        r"multiple of 8 for BFloat16, got 20", ops.merge_, w32.bfloat16(), a[:, :20], bb, 1.0
    )
    expect_error(
        r"multiple of 4 for Float, got 18",
        ops.merge_,
        torch.randn(n, 18),
        torch.randn(r, 18),
        torch.randn(n, r),
        1.0,
    )
    expect_error(
        r"expected lora_b of shape \[24, 8\], got \[24, 4\]",
        ops.merge_,
        w.clone(),
        a,
        bb[:, :4],
        1.0,
    )
    expect_error(
        r"expected lora_a of dtype Float, got BFloat16",
        ops.merge_,
        torch.randn(n, k),
        a,
        bb.float(),
        1.0,
    )
    expect_error(
        r"expected weight of dtype float16, bfloat16 or float32, got Double",
        ops.merge_,
        w.double(),
        a.double(),
        bb.double(),
        1.0,
    )

    # The Python launchers over these ops: outputs they allocate, conversions they make.
    from lora_kernels.backends.cuda import build
    from lora_kernels.backends.cuda import lora_linear as cuda_linear
    from lora_kernels.backends.cuda import lora_multi as cuda_multi
    from lora_kernels.backends.cuda import merge as cuda_merge

    build.load_extension = lambda: ops  # this process only
    y1, s1 = cuda_linear.lora_linear_fwd(x, w, b, a, bb, 2.0)
    got = dict(zip(LINEAR_FIELDS, torch.ops.lora_kernels_stub.last_launch(), strict=True))
    if (y1.shape, y1.dtype, s1.shape, s1.dtype) != ((m, n), x.dtype, (m, r), torch.float32):
        failures.append(f"lora_linear_fwd returned {y1.shape} {y1.dtype}, {s1.shape} {s1.dtype}")
    if (got["y"], got["s"], got["scale"]) != (y1.data_ptr(), s1.data_ptr(), 2.0):
        failures.append("lora_linear_fwd did not launch into the tensors it returned")
    # int64 ids far out of range, fp64 scales, int64 ranks: converted on the device, not refused.
    ids64 = torch.tensor([0, -1, 2**40, -(2**40)])
    y2, s2 = cuda_multi.lora_linear_multi_fwd(x, w, b, la, lb, scales.double(), ids64, ranks.long())
    if (y2.shape, s2.shape, s2.dtype) != ((m, n), (m, r), torch.float32):
        failures.append(f"lora_linear_multi_fwd returned {y2.shape}, {s2.shape} {s2.dtype}")
    if cuda_merge.merge_(wm, a, bb, 1.0) is not wm:
        failures.append("merge_ does not return its weight")
    return failures


def _run_binding_checks(build_dir: str, cuda_include: str) -> None:
    """Entry point of the subprocess (a process of its own: the namespace is registered once)."""
    _build_cpu_binding(Path(build_dir), cuda_include)
    failures = _binding_cases()
    print(json.dumps(failures, indent=2))
    raise SystemExit(1 if failures else 0)


@pytest.mark.slow
def test_binding_checks_on_cpu(tmp_path):
    """Schemas register, every bad input gets its message, strides and pointers reach the launch."""
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    nvcc = _nvcc()
    if cxx is None or nvcc is None:
        pytest.skip("needs a C++ compiler and nvcc (for the CUDA runtime headers)")
    import torch.utils.cpp_extension as cpp_extension

    if not cpp_extension.is_ninja_available():
        pytest.skip("torch's extension build needs ninja")
    cuda_include = _cuda_include_dir(nvcc)
    if cuda_include is None:
        pytest.skip("cuda_runtime_api.h not found")
    code = "import sys; from tests.test_csrc_compile import _run_binding_checks; "
    code += "_run_binding_checks(*sys.argv[1:])"
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path), str(cuda_include)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
