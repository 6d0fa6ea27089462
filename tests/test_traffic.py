"""The memory-traffic counter (tools/traffic.py): exact on kernels whose traffic is known, and
able to count every kernel family end to end (tools/traffic_cases.py) at tiny shapes."""

from __future__ import annotations

import math

import pytest
import torch

from lora_kernels.backends.triton import interpreting

pytestmark = pytest.mark.skipif(not interpreting(), reason="counts under the Triton interpreter")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from tools import traffic, traffic_cases  # noqa: E402


@triton.jit
def _copy_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask), mask=mask)


@triton.jit
def _strided_sum_kernel(x_ptr, out_ptr, stride, BLOCK: tl.constexpr, EVERY: tl.constexpr):
    """Sums BLOCK elements ``stride`` apart, loading only every EVERY-th lane."""
    offs = tl.arange(0, BLOCK)
    vals = tl.load(x_ptr + offs * stride, mask=offs % EVERY == 0, other=0.0)
    tl.store(out_ptr, tl.sum(vals.to(tl.float32), axis=0))


@triton.jit
def _reload_kernel(x_ptr, out_ptr, BLOCK: tl.constexpr):
    """Every program loads the same tile twice and adds it atomically into out."""
    offs = tl.arange(0, BLOCK)
    a = tl.load(x_ptr + offs)
    b = tl.load(x_ptr + offs)
    tl.atomic_add(out_ptr + offs, a + b)


def _copy(x, block=128, **kw):
    y = torch.full_like(x, float("nan"))  # what no program writes stays NaN
    with traffic.count(**kw) as t:
        _copy_kernel[(triton.cdiv(x.numel(), block),)](x, y, x.numel(), BLOCK=block)
    return y, t


@pytest.mark.parametrize("n", [1, 7, 133, 2049])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_copy_moves_each_operand_once(n, dtype):
    x = torch.randn(n).to(dtype)
    y, t = _copy(x)
    assert torch.equal(x, y)
    rep = t.report({"x": x, "y": y})
    nbytes = n * x.element_size()
    assert rep.operands["x"].loaded == nbytes and rep.operands["x"].stored == 0
    assert rep.operands["y"].stored == nbytes and rep.operands["y"].loaded == 0
    assert rep.raw == 2 * nbytes
    # torch's CPU allocations are 64-byte aligned: a contiguous run of b bytes is ceil(b / 32)
    # sectors, however the BLOCK lanes of the last program are masked
    assert rep.operands["x"].load_sectors == math.ceil(nbytes / 32)
    assert rep.moved == 2 * 32 * math.ceil(nbytes / 32)
    assert rep.compulsory == 2 * nbytes
    assert rep.ratio == pytest.approx(rep.moved / (2 * nbytes))
    assert rep.launches[0]["grid"] == [triton.cdiv(n, 128), 1, 1]
    assert rep.launches[0]["meta"] == {"BLOCK": 128}


def test_masked_lanes_are_not_counted():
    # one program of 1024 lanes over 10 elements: 1014 lanes masked off
    x = torch.randn(10)
    y, t = _copy(x, block=1024)
    rep = t.report({"x": x, "y": y})
    assert rep.raw == 2 * 40
    assert rep.moved == 2 * 64


@pytest.mark.parametrize(
    ("stride", "every", "lanes", "sectors"),
    [
        (1, 1, 64, 8),  # 64 fp32 in a row: 256 bytes, 8 sectors
        (1, 2, 32, 8),  # every other lane: half the bytes, every sector still touched
        (1, 8, 8, 8),  # one fp32 per sector
        (1, 16, 4, 4),  # one per two sectors
        (2, 1, 64, 16),  # stride 2: the lanes span 512 bytes
        (64, 1, 64, 64),  # a column of a row-major [64, 64] fp32 matrix: a sector per element
    ],
)
def test_strided_load_touches_the_sectors_it_should(stride, every, lanes, sectors):
    x = torch.randn(64 * 64)
    out = torch.empty(1)
    with traffic.count() as t:
        _strided_sum_kernel[(1,)](x, out, stride, BLOCK=64, EVERY=every)
    want = x[: 64 * stride : stride][::every].sum()
    torch.testing.assert_close(out[0], want, rtol=1e-5, atol=1e-5)
    xr = t.report({"x": x, "out": out}).operands["x"]
    assert xr.loaded == 4 * lanes
    assert xr.load_sectors == sectors


def test_every_instruction_of_every_program_counts_and_atomics_are_their_own_kind():
    x = torch.randn(64)
    out = torch.zeros(64)
    with traffic.count() as t:
        _reload_kernel[(3,)](x, out, BLOCK=64)
    torch.testing.assert_close(out, 6 * x)
    rep = t.report({"x": x, "out": out})
    # 3 programs x 2 loads x 256 bytes; 3 x 1 atomic of 256 bytes
    assert rep.operands["x"].loaded == 3 * 2 * 256
    assert rep.operands["x"].load_sectors == 3 * 2 * 8
    assert (rep.operands["out"].atomic, rep.operands["out"].atomic_sectors) == (3 * 256, 3 * 8)
    assert rep.operands["out"].stored == rep.operands["out"].loaded == 0


def test_unnamed_storages_are_named_by_the_kernel_arguments():
    x = torch.randn(100)
    y, t = _copy(x)
    rep = t.report({"x": x})
    assert rep.operands["tmp(_copy_kernel.y_ptr)"].stored == 400
    # a view of a named operand is that operand
    rep = t.report({"x": x[10:20], "y": y})
    assert rep.operands["x"].loaded == 400


def test_compulsory_names_without_an_operand_get_a_row():
    x = torch.randn(100)
    y, t = _copy(x)
    rep = t.report({"x": x, "y": y}, {"x": 400, "y": 400, "table": 64})
    assert rep.operands["table"].compulsory == 64 and rep.operands["table"].moved == 0
    assert rep.compulsory == 864


@pytest.mark.parametrize("n", [64 * 128, 64 * 128 - 5])
def test_sampling_counts_uniform_programs_exactly(n):
    x = torch.randn(n)
    _, full = _copy(x)
    y, sampled = _copy(x, sample=8)
    assert sampled.launches[0].counted == 8 and sampled.launches[0].programs == 64
    assert torch.isnan(y).any()  # a sampled launch computes only its sampled programs
    a = full.report({"x": x}).operands["x"]
    b = sampled.report({"x": x}).operands["x"]
    # the first and last programs (the ragged one) count once, the uniform interior is scaled
    assert (a.loaded, a.load_sectors) == (b.loaded, b.load_sectors)


def test_sampling_runs_the_first_and_last_programs():
    assert traffic._program_indices((10, 1, 1), 4) == [
        (0, 0, 0, 1.0), (1, 0, 0, 4.0), (8, 0, 0, 4.0), (9, 0, 0, 1.0),
    ]  # fmt: skip
    assert [p[:3] for p in traffic._program_indices((2, 3, 1), None)] == [
        (0, 0, 0), (0, 1, 0), (0, 2, 0), (1, 0, 0), (1, 1, 0), (1, 2, 0),
    ]  # fmt: skip
    picked = traffic._program_indices((5, 7, 3), 9)
    assert len(picked) == 9 and sum(w for *_, w in picked) == pytest.approx(5 * 7 * 3)
    with pytest.raises(ValueError, match="sample"), traffic.count(sample=2):
        pass


def test_count_restores_the_interpreter_and_the_launchers():
    from triton.runtime import interpreter
    from triton.runtime.autotuner import Autotuner

    from lora_kernels.backends.triton import lora_linear

    before = (
        interpreter.GridExecutor.__call__,
        interpreter.InterpreterBuilder.create_masked_load,
        Autotuner.run,
        lora_linear.interpreting,
    )
    with pytest.raises(RuntimeError, match="boom"), traffic.count():
        assert lora_linear.interpreting() is False
        raise RuntimeError("boom")
    after = (
        interpreter.GridExecutor.__call__,
        interpreter.InterpreterBuilder.create_masked_load,
        Autotuner.run,
        lora_linear.interpreting,
    )
    assert before == after
    assert lora_linear.interpreting() is True
    with pytest.raises(RuntimeError, match="nest"), traffic.count(), traffic.count():
        pass


def test_cuda_configs_pick_the_gpu_tiles():
    cuda = traffic_cases.lora_linear(1, 1024, 300, 8)
    with traffic.cuda_configs():
        from lora_kernels.backends.triton import lora_linear

        assert lora_linear.interpreting() is False
    # decode: the skinny shrink for S, the split-K GEMM, then the pass that adds the splits, the
    # LoRA expand and the bias
    kernels = [la["kernel"] for la in cuda.launches]
    assert kernels == ["_lora_skinny_kernel", "_lora_splitk_kernel", "_lora_splitk_finish_kernel"]
    split = cuda.launches[1]
    # the 16-bit decode tile on a 132-SM GPU, not the interpreter's 16 x 64 one: 2 N tiles, and
    # K split into its 32 K tiles (the SMs would take 66 splits, the K tiles allow 32)
    assert (split["meta"]["BLOCK_M"], split["meta"]["BLOCK_N"]) == (16, 256)
    assert split["grid"] == [2, 32, 1]
    x = torch.randn(1, 64, dtype=torch.float16)
    w = torch.randn(200, 64, dtype=torch.float16)
    a = torch.randn(8, 64, dtype=torch.float16)
    b = torch.randn(200, 8, dtype=torch.float16)
    with traffic.count(cuda_configs=False) as t:
        lora_linear.lora_linear_fwd(x, w, None, a, b, 1.0)
    (split,) = [la for la in t.launches if la.kernel == "_lora_splitk_kernel"]
    assert split.meta["BLOCK_N"] == lora_linear._INTERP_DECODE_META["BLOCK_N"]
    # above the decode rows, the tiled GEMM
    x = torch.randn(17, 64, dtype=torch.float16)
    with traffic.count(cuda_configs=False) as t:
        lora_linear.lora_linear_fwd(x, w, None, a, b, 1.0)
    (gemm,) = [la for la in t.launches if la.kernel == "_lora_gemm_kernel"]
    assert gemm.meta["BLOCK_N"] == lora_linear._INTERP_GEMM_META["BLOCK_N"]


def test_counting_leaves_the_results_right():
    x = torch.randn(3, 40, dtype=torch.float16)
    w = torch.randn(50, 40, dtype=torch.float16) * 0.1
    bias = torch.randn(50, dtype=torch.float16)
    a = torch.randn(8, 40, dtype=torch.float16) * 0.1
    b = torch.randn(50, 8, dtype=torch.float16) * 0.1
    from lora_kernels import reference
    from lora_kernels.backends.triton.lora_linear import lora_linear_fwd

    with traffic.count():
        y, _ = lora_linear_fwd(x, w, bias, a, b, 0.5)
    want = reference.lora_linear(x.double(), w.double(), bias.double(), a.double(), b.double(), 0.5)
    torch.testing.assert_close(y.double(), want, rtol=2e-2, atol=2e-2)


def test_compulsory_counts_what_a_call_uses():
    lora_a = torch.empty(8, 4, 32, dtype=torch.float16)
    lora_b = torch.empty(8, 48, 4, dtype=torch.float16)
    x = torch.empty(3, 32, dtype=torch.float16)
    w = torch.empty(48, 32, dtype=torch.float16)
    y = torch.empty(3, 48, dtype=torch.float16)
    ids = torch.tensor([0, 5, 0], dtype=torch.int32)
    c = traffic.compulsory_multi(x, w, None, lora_a, lora_b, torch.ones(8), ids, y)
    assert c["lora_a"] == 2 * 4 * 32 * 2 and c["lora_b"] == 2 * 48 * 4 * 2
    assert c["scales"] == 2 * 4 and c["adapter_ids"] == 12 and "bias" not in c
    ranks = torch.tensor([1, 2, 3, 4, 1, 2, 3, 4], dtype=torch.int32)
    c = traffic.compulsory_multi(x, w, None, lora_a, lora_b, torch.ones(8), ids, y, ranks=ranks)
    assert c["lora_a"] == (1 + 2) * 32 * 2
    assert traffic.distinct_bytes(torch.tensor(0.5).expand(100)) == 4
    assert traffic.compulsory_merge(w, lora_a[0], lora_b[0])["weight"] == 2 * w.nbytes
    e = traffic.compulsory_embedding(
        torch.tensor([3, 3, 9]), torch.empty(10, 16), torch.empty(2, 4, 10), torch.empty(2, 16, 4),
        [1.0, 1.0], torch.tensor([0, 1, 0]), torch.empty(3, 16),
    )  # fmt: skip
    assert e["weight"] == 2 * 16 * 4 and e["lora_a"] == 3 * 4 * 4 and e["lora_b"] == 2 * 16 * 4 * 4


FAMILIES = [
    ("lora_linear", lambda: traffic_cases.lora_linear(1, 64, 96, 8), "weight"),
    ("lora_linear_m16", lambda: traffic_cases.lora_linear(16, 64, 96, 8), "weight"),
    ("multi_gather", lambda: traffic_cases.multi(4, 64, 96, 8, distinct=2, pool=4), "weight"),
    (
        "multi_grouped",
        lambda: traffic_cases.multi(4, 64, 96, 8, distinct=2, pool=4, strategy="grouped"),
        "weight",
    ),
    ("qlora_nf4", lambda: traffic_cases.qlora(1, 64, 64, 8), "qweight"),
    ("qlora_fp4", lambda: traffic_cases.qlora(1, 64, 64, 8, quant="fp4", nested=False), "qweight"),
    ("embedding", lambda: traffic_cases.embedding(4, 50, 96, 8, adapters=2), "weight"),
    ("dora", lambda: traffic_cases.dora(1, 64, 96, 8), "weight"),
    ("dora_norm", lambda: traffic_cases.dora_norm(64, 96, 8), "weight"),
    ("merge", lambda: traffic_cases.merge(64, 96, 8), "weight"),
]


@pytest.mark.parametrize(("name", "case", "main"), FAMILIES, ids=[f[0] for f in FAMILIES])
def test_every_family_can_be_counted(name, case, main):
    rep = case()
    assert rep.launches, name
    assert all(launch["counted_programs"] == launch["programs"] for launch in rep.launches)
    # the weight stream moves at least once (read, and written back by merge), whatever the tiles
    assert rep.operands[main].moved >= rep.operands[main].compulsory > 0
    assert "unmapped" not in rep.operands
    assert rep.ratio >= 1.0
    assert rep.as_dict()["ratio"] == pytest.approx(rep.ratio, abs=1e-4)
    assert "| **total** |" in rep.table()


def test_the_report_script_writes_its_table_and_metadata(tmp_path):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "traffic_report.py"
    spec = importlib.util.spec_from_file_location("traffic_report", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert {r["family"] for r in script.rows()} >= {
        "lora_linear", "multi_gather", "multi_grouped", "qlora_nf4", "qlora_fp4", "embedding",
        "dora", "dora_norm", "merge",
    }  # fmt: skip
    # one small row through the whole script (a table and its JSON)
    script.rows = lambda: [
        {
            "family": "lora_linear",
            "call": "lora_linear_fwd",
            "shape": {"M": 1, "K": 64, "N": 96, "r": 8},
            "run": lambda s: traffic_cases.lora_linear(1, 64, 96, 8, sample=s),
            "decode": True,
        }
    ]
    frozen = tmp_path / "before.json"
    out = ["--out", str(tmp_path / "t"), "--sample", "3"]
    assert script.main([*out, "--before", "none", "--freeze", str(frozen)]) == 0
    assert "| before |" not in (tmp_path / "t.md").read_text()
    assert script.main([*out, "--before", str(frozen)]) == 0
    data = json.loads((tmp_path / "t.json").read_text())
    assert data["rows"][0]["before"]["report"]["ratio"] == data["rows"][0]["report"]["ratio"]
    assert {"commit", "machine", "torch", "triton", "python"} <= set(data["meta"])
    (row,) = data["rows"]
    assert row["report"]["ratio"] > 1 and row["tile_implied"] >= row["report"]["compulsory"]
    md = (tmp_path / "t.md").read_text()
    assert "## lora_linear" in md and "| M=1 K=64 N=96 r=8 | lora_gemm 16x64x128" in md
    assert "| before |" in md
