"""QLoRA decode (M <= 16, even K): the wide-tile, split-K path of the Triton backend.

``qlora_linear_fwd`` runs the shrink, the decode kernel over ``(M tiles, N tiles, K splits)``
and, when it splits K (or the rank block is too wide for the decode kernel's epilogue), the
fixed-order reduction that adds the fp32 partials, the LoRA expand and the bias. Checked here
against ``reference.qlora_linear`` (fp64) under the rule of ``tests/tolerances.py``: NF4 and FP4,
double quantization on and off, fp16 and bf16, M in {1, 7, 16}, odd N, ranks 7 and 16 (and one
rank block over the epilogue's), bias on and off; that the split path really runs with several
splits (the launches are recorded); that deterministic mode gives the same bits call after call
and launches no atomics; and that the backward (dx) of a decode-sized call still matches.

Under the interpreter the planner sees 16-wide tiles and a GPU of ``_INTERPRET_SMS`` SMs, so
these small shapes take several N tiles and K splits.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("bitsandbytes")

import lora_kernels as lk  # noqa: E402
from lora_kernels import reference  # noqa: E402
from lora_kernels.backends.triton import HAS_TRITON, interpreting  # noqa: E402
from tests.test_qlora import DEVICE, SCALE, _inputs, _ref_dequant, _stock  # noqa: E402
from tests.tolerances import assert_close_to_ref  # noqa: E402

pytestmark = pytest.mark.skipif(
    not (HAS_TRITON and (DEVICE == "cuda" or interpreting())), reason="needs the Triton backend"
)


@pytest.fixture(autouse=True)
def _on_device():
    with torch.device(DEVICE):
        yield


class _Recorder:
    """Stands in for a ``@triton.jit`` kernel: records each launch's grid, then launches."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.grids = []

    def __getitem__(self, grid):
        self.grids.append(tuple(grid))
        return self.kernel[grid]


@pytest.fixture
def launches(monkeypatch):
    from lora_kernels.backends.triton import qlora as tq

    rec = {
        "decode": _Recorder(tq._qlora_decode_kernel),
        "reduce": _Recorder(tq._qlora_split_reduce_kernel),
    }
    monkeypatch.setattr(tq, "_qlora_decode_kernel", rec["decode"])
    monkeypatch.setattr(tq, "_qlora_split_reduce_kernel", rec["reduce"])
    return rec


def _d(v):
    return None if v is None else v.double()


def _check_forward(m, n, k, r, bias, quant, dtype):
    t = _inputs(m, n, k, r, dtype, bias, quant)
    w = _ref_dequant(t["q"], t["st"], dtype)
    y = lk.qlora_linear(t["x"], t["q"], t["st"], t["bias"], t["a"], t["b"], SCALE,
                        backend="triton")  # fmt: skip
    ref = reference.qlora_linear(_d(t["x"]), _d(w), _d(t["bias"]), _d(t["a"]), _d(t["b"]), SCALE)
    assert_close_to_ref("y", y, ref, _stock(t, w))
    return t, w, y


QUANTS = [("nf4", 64, True), ("fp4", 64, False), ("nf4", 128, False), ("fp4", 32, True)]
# (M, N, K, r, bias): odd N, even K (the decode kernel's), K over several blocks and splits
SHAPES = [
    (1, 37, 256, 7, True),
    (7, 21, 192, 16, False),
    (16, 33, 130, 7, False),  # rows start inside blocks
    (16, 5, 512, 16, True),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("quant", QUANTS, ids=lambda q: f"{q[0]}-bs{q[1]}-nested{int(q[2])}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}-N{}-K{}-r{}-bias{}".format(*s))
def test_decode_matches_reference(shape, quant, dtype, launches):
    m, n, k, r, bias = shape
    _check_forward(m, n, k, r, bias, quant, dtype)
    (grid,) = launches["decode"].grids
    assert grid[0] == 1  # one 16-row tile: the decode path, not the prefill kernel


def test_split_path_runs_with_several_splits(launches):
    """K = 512 in blocks of 64 over a 16-wide N = 21 (two tiles): the planner splits K so that
    the grid fills the interpreter's SMs, the reduction runs, and the result is right."""
    from lora_kernels.backends.triton import qlora as tq

    _check_forward(3, 21, 512, 16, True, ("nf4", 64, True), torch.float16)
    (grid,) = launches["decode"].grids
    assert grid[1] == 2 and grid[2] > 1, grid
    assert grid[1] * grid[2] >= (3 * tq._INTERPRET_SMS) // 4
    assert len(launches["reduce"].grids) == 1


def test_unsplit_path_writes_y_itself(launches):
    """Enough N tiles to fill the SMs without splitting K, a rank block the decode kernel's
    epilogue holds: one launch writes y, no reduction."""
    _check_forward(2, 150, 128, 7, True, ("fp4", 64, False), torch.float16)
    (grid,) = launches["decode"].grids
    assert grid[2] == 1
    assert launches["reduce"].grids == []


def test_wide_rank_takes_the_reduction_epilogue(launches):
    """A rank block over ``_DECODE_EPILOGUE_MAX_R`` (r = 70: BLOCK_R 128) adds the LoRA expand in
    the reduction, with narrower N tiles, even without a K split."""
    _check_forward(5, 150, 64, 70, True, ("nf4", 64, True), torch.float16)
    assert launches["decode"].grids[0][2] == 1
    assert len(launches["reduce"].grids) == 1


@pytest.mark.skipif(not interpreting(), reason="counts the interpreter's atomics")
def test_deterministic_mode_is_bitwise_repeatable_and_atomic_free(monkeypatch, launches):
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    original = builder.create_atomic_rmw
    atomics = []

    def counting(op, ptr, val, mask, sem, scope):
        atomics.append(op)
        return original(op, ptr, val, mask, sem, scope)

    monkeypatch.setattr(builder, "create_atomic_rmw", counting)
    t = _inputs(4, 21, 512, 7, torch.bfloat16, True, ("nf4", 64, True))
    args = (t["x"], t["q"], t["st"], t["bias"], t["a"], t["b"], SCALE)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first = lk.qlora_linear(*args, backend="triton")
        second = lk.qlora_linear(*args, backend="triton")
    finally:
        torch.use_deterministic_algorithms(prev)
    assert atomics == []
    assert all(grid[2] > 1 for grid in launches["decode"].grids)  # split, yet no atomics
    assert torch.equal(first, second)
    w = _ref_dequant(t["q"], t["st"], torch.bfloat16)
    ref = reference.qlora_linear(_d(t["x"]), _d(w), _d(t["bias"]), _d(t["a"]), _d(t["b"]), SCALE)
    assert_close_to_ref("y", first, ref, _stock(t, w))


@pytest.mark.parametrize("quant", [("nf4", 64, True), ("fp4", 32, False)])
def test_decode_backward_matches_reference(quant):
    """The backward of a decode-sized call: dx from the dx kernel, dA / dB from S, which the
    decode path's shrink stored."""
    t = _inputs(7, 37, 192, 7, torch.float16, True, quant)
    w = _ref_dequant(t["q"], t["st"], torch.float16)
    leaves = {name: t[name].clone().requires_grad_() for name in ("x", "a", "b")}
    y = lk.qlora_linear(leaves["x"], t["q"], t["st"], t["bias"], leaves["a"], leaves["b"],
                        SCALE, backend="triton")  # fmt: skip
    sl = {name: t[name].clone().requires_grad_() for name in ("x", "a", "b")}
    stock = _stock({**t, **sl}, w)
    dy = torch.randn_like(y)
    y.backward(dy)
    stock.backward(dy)
    dx, da, db = reference.qlora_linear_backward(
        dy.double(), _d(t["x"]), _d(w), _d(t["a"]), _d(t["b"]), SCALE
    )
    assert_close_to_ref("dx", leaves["x"].grad, dx, sl["x"].grad)
    assert_close_to_ref("dA", leaves["a"].grad, da, sl["a"].grad)
    assert_close_to_ref("dB", leaves["b"].grad, db, sl["b"].grad)
