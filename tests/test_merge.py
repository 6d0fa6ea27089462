"""merge_lora_ / unmerge_lora_ on every backend here: within half an ulp of the exact
``W + scale * B @ A`` (one rounding), parity with the reference, odd sizes and ranks, strides,
fp32 adapters on 16-bit weights, and the errors bad input gets."""

from __future__ import annotations

import pytest
import torch

import lora_kernels as lk
from lora_kernels import reference as R
from lora_kernels.backends.triton import HAS_TRITON, interpreting

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_RUNS = HAS_TRITON and (DEVICE == "cuda" or interpreting())
BACKENDS = ["torch"] + (["triton"] if TRITON_RUNS else [])
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
SCALE = 0.37


def make(n, k, r, dtype, lora_dtype=None):
    """A weight and an adapter whose delta is comparable to the weight (many binade changes)."""
    lora_dtype = lora_dtype or dtype
    w = torch.randn(n, k, device=DEVICE).to(dtype)
    a = (torch.randn(r, k, device=DEVICE) / r**0.25).to(lora_dtype)
    b = (torch.randn(n, r, device=DEVICE) / r**0.25).to(lora_dtype)
    return w, a, b


def exact_merge(w, a, b, scale):
    return w.double() + scale * (b.double() @ a.double())


def ulp(x: torch.Tensor) -> torch.Tensor:
    """Spacing from |x| to the next larger value of x's dtype, in float64."""
    mag = x.abs()
    return (torch.nextafter(mag, torch.full_like(mag, float("inf"))) - mag).double()


def fp32_slack(w, a, b, scale):
    """Worst-case error of the fp32 sum ``w + scale * b @ a`` (a dot of length r, then the add)."""
    r = a.shape[0]
    delta = abs(scale) * (b.double().abs() @ a.double().abs())
    return (r + 2) * 2.0**-24 * delta + 2.0**-24 * w.double().abs()


def single_rounding_bound(out, w, a, b, scale):
    """Half an ulp of the result, plus the fp32 sum's own error."""
    return 0.5 * ulp(out) + fp32_slack(w, a, b, scale)


def assert_single_rounding(out, w, a, b, scale):
    exact = exact_merge(w, a, b, scale)
    err = (out.double() - exact).abs()
    bound = single_rounding_bound(out, w, a, b, scale)
    worst = (err / bound).max().item() if err.numel() else 0.0
    assert (err <= bound).all(), f"error up to {worst:.3f}x of half an ulp plus the fp32 bound"
    if out.dtype != torch.float32 and out.numel() >= 1000:
        # Correct rounding except where the fp32 delta sits within its own error of a tie.
        same = (out == exact.to(out.dtype)).double().mean().item()
        assert same > 0.995, f"only {same:.4f} of the elements are the correctly rounded value"


# ---------------------------------------------------------------------------------------------
# accuracy
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "n,k,r", [(1, 1, 1), (7, 17, 7), (17, 129, 16), (33, 2049, 17), (129, 133, 133)]
)
def test_merge_within_half_an_ulp(backend, dtype, n, k, r):
    w, a, b = make(n, k, r, dtype)
    out = lk.merge_lora_(w.clone(), a, b, SCALE, backend=backend)
    assert out.dtype == dtype and out.shape == (n, k)
    assert_single_rounding(out, w, a, b, SCALE)
    if dtype != torch.float32:
        # The reference rounds once from fp32 too: equal but for fp32 near-ties.
        ref = R.merge_lora(w, a, b, SCALE)
        assert (out == ref).double().mean().item() > 0.99


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_two_roundings_miss_the_bound_that_the_merge_meets(backend, dtype):
    """The test above can fail: PEFT's way (delta rounded to the weight's dtype, then added)
    misses half an ulp on many elements where the merge meets it everywhere."""
    w, a, b = make(64, 96, 8, dtype)
    exact = exact_merge(w, a, b, SCALE)
    out = lk.merge_lora_(w.clone(), a, b, SCALE, backend=backend)
    twice = w + (SCALE * (b @ a))
    assert ((out.double() - exact).abs() <= single_rounding_bound(out, w, a, b, SCALE)).all()
    misses = ((twice.double() - exact).abs() > single_rounding_bound(twice, w, a, b, SCALE)).sum()
    assert misses > 0.01 * w.numel()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("r", [1, 33, 256])
def test_fp32_adapter_on_a_half_weight(backend, dtype, r):
    w, a, b = make(40, 70, r, dtype, lora_dtype=torch.float32)
    out = lk.merge_lora_(w.clone(), a, b, SCALE, backend=backend)
    assert_single_rounding(out, w, a, b, SCALE)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_adapter_dtypes(backend):
    w, a, b = make(20, 50, 5, torch.bfloat16)
    out = lk.merge_lora_(w.clone(), a.float(), b, SCALE, backend=backend)
    assert_single_rounding(out, w, a, b, SCALE)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_operands(backend):
    """Transposed / sliced views: the kernel walks strides, no hidden contiguous copies."""
    n, k, r = 37, 45, 9
    w_t = torch.randn(k, n, device=DEVICE).to(torch.float16)
    w = w_t.T  # [n, k], column-major
    a = torch.randn(k, 2 * r, device=DEVICE).to(torch.float16).T[::2]  # [r, k], strided
    b = torch.randn(r, n, device=DEVICE).to(torch.float16).T  # [n, r]
    original = w.clone()
    out = lk.merge_lora_(w, a, b, SCALE, backend=backend)
    assert out.data_ptr() == w_t.data_ptr() and out.stride() == (1, n)
    assert_single_rounding(out, original, a, b, SCALE)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unmerge_is_merge_with_minus_scale(backend):
    w, a, b = make(33, 65, 17, torch.bfloat16)
    merged = lk.merge_lora_(w.clone(), a, b, SCALE, backend=backend)
    back = lk.unmerge_lora_(merged.clone(), a, b, SCALE, backend=backend)
    assert_single_rounding(back, merged, a, b, -SCALE)
    assert torch.equal(back, lk.merge_lora_(merged.clone(), a, b, -SCALE, backend=backend))


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", BACKENDS)
def test_special_values_propagate(backend):
    w = torch.tensor([[float("nan"), float("inf"), -float("inf"), 3.0e38, 1.0, -0.0]])
    w = w.to(torch.bfloat16).to(DEVICE)
    a = torch.ones(1, 6, device=DEVICE)
    b = torch.full((1, 1), 1e38, device=DEVICE)
    out = lk.merge_lora_(w.clone(), a, b, 1.0, backend=backend)
    expect = R.merge_lora(w, a, b, 1.0)
    assert torch.equal(out.isnan(), expect.isnan())
    assert torch.equal(out[~out.isnan()], expect[~expect.isnan()])


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(not TRITON_RUNS, reason="triton cannot run here")
def test_triton_backend_names_the_bad_argument():
    """The launchers trust their inputs: the functional layer's checks stop a bad call first."""
    w, a, b = make(8, 16, 4, torch.float16)
    cases = [
        ((w[0], a, b), ValueError, r"weight of shape \[N, K\], got \[16\]"),
        ((w, a[:, :3], b), ValueError, r"lora_a of shape \[4, 16\], got \[4, 3\]"),
        ((w, a, b[:5]), ValueError, r"lora_b of shape \[8, 4\], got \[5, 4\]"),
        ((w, a.double(), b), ValueError, r"float32 operands, got torch.float64"),
        ((w.to(torch.int32), a, b), TypeError, r"weight of a floating dtype, got torch.int32"),
    ]
    for args, exc, match in cases:
        before = [t.clone() for t in args]
        with pytest.raises(exc, match=match):
            lk.merge_lora_(*args, 1.0, backend="triton")
        assert all(torch.equal(x, y) for x, y in zip(before, args, strict=True))


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    w, a, b = make(4, 8, 2, torch.float16)
    if DEVICE == "cuda":
        w, a, b = w.cpu(), a.cpu(), b.cpu()
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        lk.merge_lora_(w, a, b, 1.0, backend="triton")
