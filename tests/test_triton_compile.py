"""Ahead-of-time compile gate (CI subset): Triton kernels compiled for sm_80 and sm_90, no GPU.

``tools.compile_gate`` drives the real launchers, captures their launches,
specialises them with Triton's binder and compiles every surviving config with Triton's bundled
ptxas. This file runs the ``QUICK`` matrix (the common training path: bf16 base with fp32
adapters, decode and prefill M, odd K/N; every family: LoRA, multi-adapter, merge, DoRA, QLoRA,
embedding, MoE experts, the serving engines' shrink / expand) in a Triton cache directory of
its own; the whole
matrix is ``python benchmarks/triton_compile_report.py``.
"""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")

from tools import compile_gate as gate  # noqa: E402


@pytest.fixture(scope="module")
def triton_cache(tmp_path_factory):
    """A Triton cache local to this test run, so every variant is really compiled here."""
    old = os.environ.get("TRITON_CACHE_DIR")
    path = tmp_path_factory.mktemp("triton_cache")
    os.environ["TRITON_CACHE_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("TRITON_CACHE_DIR", None)
    else:
        os.environ["TRITON_CACHE_DIR"] = old


def _variants(family, capability, matrix):
    return {
        (v.kernel.__name__, gate._describe_variant(v.kernel, v.specialization), v.config): v
        for v in gate.capture(family, capability, matrix)
    }


def test_launches_are_specialised_like_triton():
    """Divisibility-16 hints and ints equal to 1 as constants, from Triton's own binder."""

    def matrix(m):
        return {
            "lora_linear": {
                "kn": [(4099, 4096)],
                "m": [m],
                "r": [16],
                "dtypes": [("bf16", "bf16")],
                "bias": [False],
                "x_lora": [False],
                "deterministic": [False],
                "needs": [],
            }
        }

    # decode (M <= 16): the split-K GEMM
    variants = gate.capture("lora_linear", 90, matrix(1))
    split = [v for v in variants if v.kernel.__name__ == "_lora_splitk_kernel"]
    assert split, "the decode forward launched no split-K GEMM"
    names = [p.name for p in split[0].kernel.params]
    spec = dict(zip(names, split[0].specialization, strict=True))
    assert spec["M"] == ("constexpr", 1)  # M == 1 is a constant, as on a GPU
    assert spec["N"][0] == "i32" and spec["N"][1] == "D"  # 4096: divisible by 16
    assert spec["K"][0] == "i32" and spec["K"][1] in (None, "")  # 4099: no hint
    assert spec["x_ptr"][0] == "*bf16"
    # above the decode rows, the autotuned GEMM, expanded into every config the launcher's
    # pruning keeps
    variants = gate.capture("lora_linear", 90, matrix(32))
    gemm = [v for v in variants if v.kernel.__name__ == "_lora_gemm_kernel"]
    assert gemm, "the forward launched no GEMM"
    configs = {v.config for v in gemm}
    assert len(configs) >= 2 and all(c.startswith("tuned:") for c in configs)


def test_odd_shapes_take_the_narrow_multi_adapter_tiles():
    """Without divisibility hints (K = 4099) the fused multi-adapter kernel takes BLOCK_K 32 and
    a 16-wide rank chunk: the aligned tiles spilled 600-1,400 B there (capture only). A grouped
    batch of at most 16 rows takes a 16-row tile there: the 64-row one spilled 56-232 B at M = 1
    on sm_80."""

    def fused_configs(k, n, strategy, m=4096):
        matrix = {
            "lora_multi": {
                "kn": [(k, n)], "m": [m], "r": [128], "adapters": 2,
                "dtypes": [("bf16", "fp32")], "id_dtypes": [torch.int64],
                "strategies": [strategy], "ranks": [True],
            }
        }  # fmt: skip
        return {
            v.config
            for v in gate.capture("lora_multi", 90, matrix)
            if v.kernel.__name__ == "_lora_multi_fused_kernel"
        }

    assert fused_configs(4096, 4096, "gather") == {"fixed:M16-N128-K128-R32-w4s3"}
    assert fused_configs(4099, 32001, "gather") == {"fixed:M16-N64-K32-R16-w4s3"}
    # the 128-row tile's expand runs before its K-loop: 16-wide rank chunks there (32 spilled)
    assert fused_configs(4096, 4096, "grouped") == {"fixed:M128-N128-K32-R16-w8s3"}
    assert fused_configs(4099, 32001, "grouped") == {"fixed:M64-N128-K32-R16-w8s3"}
    assert fused_configs(4099, 32001, "grouped", m=1) == {"fixed:M16-N128-K32-R16-w8s3"}
    assert fused_configs(4099, 32001, "grouped", m=16) == {"fixed:M16-N128-K32-R16-w8s3"}
    assert fused_configs(4099, 32001, "grouped", m=17) == {"fixed:M64-N128-K32-R16-w8s3"}


def test_compiling_leaves_the_interpreter_working(triton_cache):
    """The gate compiles in this interpreting process without breaking interpreted kernels."""
    from lora_kernels.backends.triton.merge import merge_

    [variant] = [
        v
        for v in gate.capture("merge", 80, gate.QUICK)
        if "a:bf16" in gate._describe_variant(v.kernel, v.specialization)
    ] or gate.capture("merge", 80, gate.QUICK)[:1]
    [result] = gate.compile_launches("merge", [variant], 80)
    assert result.error is None and result.registers > 0 and result.shared > 0
    w = torch.randn(33, 70, dtype=torch.bfloat16)
    a = torch.randn(5, 70)
    b = torch.randn(33, 5)
    exact = w.double() + 0.5 * (b.double() @ a.double())
    merge_(w, a, b, 0.5)
    # fp32 accumulation then one bf16 rounding: each element is a bf16 neighbour of the exact
    # value (the fp32 sum's order, hence which neighbour near a rounding boundary, is the BLAS
    # kernel's), and all but the rare boundary cases are the exact value rounded. A second
    # rounding (the delta to bf16 before the add) breaks the latter on a large share of them.
    ulp = 2.0 ** (torch.floor(torch.log2(exact.abs().clamp_min(2.0**-126))) - 7)
    assert ((w.double() - exact).abs() <= ulp).all()
    assert (w != exact.to(torch.bfloat16)).sum() <= w.numel() // 100


def test_findings_reject_what_the_issue_names():
    """The checks themselves: spills on 16-bit paths, shared memory, missing tensor cores."""
    ok = gate.Result("f", "k", "v", "c", 80, ["case"], 100, 0, 1024, 1, 8, True)
    assert gate.findings(ok) == []
    spill = gate.Result("f", "k", "v", "c", 80, ["case"], 255, 64, 1024, 1, 8, True)
    assert "spills" in gate.findings(spill)[0]
    smem = gate.Result("f", "k", "v", "c", 80, ["case"], 100, 0, 160 * 1024, 1, 8, True)
    assert "shared memory" in gate.findings(smem)[0]
    no_mma = gate.Result("f", "k", "v", "c", 90, ["case"], 100, 0, 1024, 2, 0, True)
    assert "tensor cores" in gate.findings(no_mma)[0]
    one_fma = gate.Result("f", "k", "v", "c", 90, ["case"], 100, 0, 1024, 2, 8, True, fma_dots=1)
    assert "1 of 2 dots not on tensor cores" in gate.findings(one_fma)[0]
    fp32 = gate.Result("f", "k", "v", "c", 90, ["case"], 255, 64, 1024, 2, 0, False)
    assert gate.findings(fp32) == []
    error = gate.Result("f", "k", "v", "c", 90, ["case"], error="CompilationError: x")
    assert "compile error" in gate.findings(error)[0]


@pytest.mark.parametrize("capability", [80, 90])
def test_quick_matrix_compiles_clean(capability, triton_cache):
    """Every variant of the CI subset compiles, within shared memory, spill-free, on MMA."""
    results = []
    for family in gate.LAUNCHER_MODULES:
        results += gate.compile_launches(
            family, gate.capture(family, capability, gate.QUICK), capability
        )
    assert len(results) >= 15
    assert {r.family for r in results} == set(gate.LAUNCHER_MODULES)  # every family drove launches
    assert all(r.error is None for r in results), [r for r in results if r.error]
    problems = [f for r in results for f in gate.findings(r)]
    assert problems == [], "\n".join(problems)
