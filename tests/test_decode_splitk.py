"""The split-K decode GEMM of ``backends.triton.lora_linear`` (M <= 16) against the spec.

Decode shapes (M 1, 7, 16) run a skinny shrink for S, then ``_lora_splitk_kernel`` (fp32 partials
of ``x @ weight.T`` over K splits) and ``_lora_splitk_finish_kernel`` (the partials, the LoRA
expand and the bias, rounded once). Under the interpreter the launcher takes a 16-program "GPU",
so the odd sizes here (K 2049, N 133) run several N tiles and several K splits; a spy on the
split kernel checks that they did, so a launcher that stopped splitting would fail here.
Tolerances are ``tests/tolerances.py``'s rule, as in ``tests/test_triton_lora_linear.py``, whose
helpers (inputs, fp64 truth, same-precision PyTorch) these tests share; the backward runs too, to
show that the forward's new path leaves the gradients right.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

import triton  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from lora_kernels.backends.triton import lora_linear as lk_triton  # noqa: E402
from tests.test_triton_lora_linear import (  # noqa: E402
    DTYPES,
    SCALE,
    _check_all,
    _deterministic_twice,
    _make,
    _torch_same_precision,
    _truth,
)
from tests.tolerances import assert_close_to_ref  # noqa: E402


class _SplitSpy:
    """Stands in for ``_lora_splitk_kernel``: records each launch's grid and ATOMIC flag."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.launches = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((tuple(grid), kwargs["ATOMIC"]))
            return self.kernel[grid](*args, **kwargs)

        return launch

    @property
    def splits(self):
        return [grid[1] for grid, _ in self.launches]


@pytest.fixture
def spy(monkeypatch):
    recorder = _SplitSpy(lk_triton._lora_splitk_kernel)
    monkeypatch.setattr(lk_triton, "_lora_splitk_kernel", recorder)
    return recorder


# (M, K, N, r, bias, splits > 1)
CASES = [
    pytest.param(1, 2049, 133, 16, True, True, id="m1-k2049-n133-r16"),
    pytest.param(7, 2049, 133, 64, False, True, id="m7-k2049-n133-r64"),
    pytest.param(16, 2049, 133, 7, True, True, id="m16-k2049-n133-r7"),
    pytest.param(16, 1025, 300, 256, False, True, id="m16-k1025-n300-r256"),
    pytest.param(7, 133, 2049, 40, True, False, id="m7-k133-n2049-r40-one-split"),
]


@pytest.mark.parametrize("m, k, n, r, bias, split", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_forward_backward(spy, dtype, m, k, n, r, bias, split):
    _check_all(_make(m, k, n, r, dtype, bias=bias))
    (splits,) = spy.splits
    assert (splits > 1) == split, spy.launches


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_decode_fp32_adapters(spy, dtype):
    """PEFT's default on a 16-bit base: fp32 lora_A / lora_B, rounded to 16 bits for the dots."""
    _check_all(_make(16, 2049, 133, 16, dtype, lora_dtype=torch.float32))
    assert spy.splits[0] > 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_decode_strided(spy, dtype):
    """Conv1D's transposed weight ([K, N] in memory), column-major x, a sliced dy and an
    expanded bias: all read through their strides on the split path."""
    t = _make(7, 2049, 133, 16, dtype)
    t["weight"] = t["weight"].t().contiguous().t()  # what fan_in_fan_out layers pass
    t["x"] = t["x"].t().contiguous().t()
    t["dy"] = torch.cat([t["dy"], t["dy"]], dim=1)[:, ::2]
    t["bias"] = torch.tensor(0.5, dtype=dtype, device=t["x"].device).expand(133)
    assert t["weight"].stride() == (1, 133) and not t["x"].is_contiguous()
    _check_all(t)
    assert spy.splits[0] > 1


def test_decode_x_lora(spy):
    """PEFT dropout: S comes from x_lora, the base product from x."""
    t = _make(16, 2049, 133, 16, torch.float16, x_lora=True)
    _check_all(t)
    assert spy.splits[0] > 1


def test_decode_deterministic_mode(spy):
    """Deterministic algorithms: no atomics, the splits added in a fixed order, the same bits on
    every call, and right; the default mode adds the splits with atomics."""
    t = _make(16, 2049, 133, 16, torch.bfloat16)
    _check_all(t, _deterministic_twice(t))
    assert [atomic for _, atomic in spy.launches] == [False, False]
    assert all(s > 1 for s in spy.splits)
    lk_triton.lora_linear_fwd(t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], SCALE)
    assert spy.launches[-1][1] is True


def test_decode_empty_k(spy):
    """K = 0: y is the bias plus nothing (S is zero), through one empty split."""
    t = _make(3, 1, 133, 8, torch.float32)
    x, w, a = t["x"][:, :0], t["weight"][:, :0], t["lora_a"][:, :0]
    y, s = lk_triton.lora_linear_fwd(x, w, t["bias"], a, t["lora_b"], SCALE)
    assert torch.equal(y, t["bias"].expand(3, 133)) and not s.any()
    assert spy.splits == [1]


def test_decode_agrees_with_the_tiled_gemm(spy, monkeypatch):
    """The same call through the split path and through the tiled GEMM with its S epilogue (the
    path above M = 16): both within the rule, and close to each other."""
    t = _make(16, 2049, 133, 16, torch.float16)
    args = (t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], SCALE)
    y_split, s_split = lk_triton.lora_linear_fwd(*args)
    monkeypatch.setattr(lk_triton, "_DECODE_MAX_M", 0)
    y_tiled, s_tiled = lk_triton.lora_linear_fwd(*args)
    assert len(spy.launches) == 1 and spy.splits[0] > 1
    truth = _truth(t)
    base = _torch_same_precision(t)
    for y in (y_split, y_tiled):
        assert_close_to_ref("y", y, truth[0], base[0])
    torch.testing.assert_close(s_split, s_tiled)
    assert_close_to_ref("y split vs tiled", y_split, y_tiled.double(), base[0])


@pytest.mark.parametrize(
    "m, k, n, dtype, want",
    [
        (1, 4096, 4096, torch.float16, 8),  # 16 N tiles x 8 = 128 programs
        (16, 4096, 4096, torch.float16, 8),  # 8 x 16 x 4096 x 4 B = 1/16 of the weight
        (16, 4096, 14336, torch.bfloat16, 2),  # 56 N tiles
        (1, 4096, 1024, torch.float16, 32),  # 33 wanted: 4 K tiles a split, 32 splits
        (16, 4096, 1024, torch.float16, 8),  # the reduction budget, not the SMs
        (16, 4096, 4096, torch.float32, 4),  # 128-wide fp32 tiles: 32 N tiles
        (1, 64, 200, torch.float16, 2),  # the K tiles
        (16, 4099, 32001, torch.float16, 1),  # 126 N tiles fill the GPU alone
    ],
)
def test_decode_split_choice_on_a_132_sm_gpu(monkeypatch, m, k, n, dtype, want):
    """The CUDA split count: at most one wave of 132 SMs, fp32 partials within
    1/_DECODE_REDUCTION_SHARE of the weight's bytes, no more splits than K tiles."""
    monkeypatch.setattr(lk_triton, "interpreting", lambda: False)
    monkeypatch.setattr(lk_triton, "_sm_count", lambda index: 132)
    meta = lk_triton._DECODE_META[dtype == torch.float32]
    size = torch.empty(0, dtype=dtype).element_size()
    splits, k_per_split = lk_triton._decode_splits(m, n, k, size, torch.device("cpu"), meta)
    assert splits == want
    assert k_per_split % meta["BLOCK_K"] == 0 and splits == triton.cdiv(k, k_per_split)
    assert triton.cdiv(n, meta["BLOCK_N"]) * splits <= 132
    if splits > 1:
        assert splits * m * n * 4 <= n * k * size / lk_triton._DECODE_REDUCTION_SHARE


class _Ops(TorchDispatchMode):
    """Records every aten op a call dispatches."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _forbidden(*_args, **_kwargs):
    raise AssertionError("a decode step read a device value on the host or built a host tensor")


@pytest.mark.parametrize("deterministic", [False, True])
def test_decode_launcher_is_sync_free(spy, monkeypatch, deterministic):
    """The Triton decode launcher itself (tests/test_sync_free.py drives the torch backend): no
    device value read on the host (``.item()``, ``.tolist()``, ``bool()``, which dispatch as
    ``_local_scalar_dense``) and no tensor built from host data, in both reduction modes; the
    split path did run."""
    t = _make(4, 2049, 133, 16, torch.float16)
    args = (t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], SCALE)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        lk_triton.lora_linear_fwd(*args)  # warm the launcher's caches (SM count, jit)
        with monkeypatch.context() as patch, _Ops() as ops:
            for name in ("item", "tolist", "__bool__"):
                patch.setattr(torch.Tensor, name, _forbidden)
            patch.setattr(torch, "tensor", _forbidden)
            lk_triton.lora_linear_fwd(*args)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert not [op for op in ops.ops if "local_scalar_dense" in op or "nonzero" in op], ops.ops
    assert all(s > 1 for s in spy.splits)
    assert [atomic for _, atomic in spy.launches] == [not deterministic] * 2
