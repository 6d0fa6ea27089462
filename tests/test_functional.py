"""lora_linear / merge_lora_ through the public API: parity with the reference, gradients,
backend selection, and the errors bad input gets."""

from __future__ import annotations

import pytest
import torch

import lora_kernels as lk
from lora_kernels import reference as R
from lora_kernels.backends.triton import HAS_TRITON
from tests.tolerances import assert_close_to_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch"] + (["triton"] if HAS_TRITON else [])


def make(m_shape, k, n, r, dtype, bias=True, lora_dtype=None, device=DEVICE):
    lora_dtype = lora_dtype or dtype
    x = torch.randn(*m_shape, k, dtype=dtype, device=device)
    w = torch.randn(n, k, dtype=dtype, device=device) / k**0.5
    b = torch.randn(n, dtype=dtype, device=device) if bias else None
    a = torch.randn(r, k, dtype=lora_dtype, device=device) / k**0.5
    bb = torch.randn(n, r, dtype=lora_dtype, device=device) / r**0.5
    return x, w, b, a, bb


def _torch_same_dtype(x, w, b, a, bb, scale):
    """Stock PyTorch LoRA in the activations' dtype: the baseline for the tolerance rule. fp32
    adapters on a 16-bit base are rounded to the base's dtype for their products, as PEFT
    computes them under autocast (the precision policy, README "Precision")."""
    y = x @ w.T + (b if b is not None else 0)
    return y + scale * ((x @ a.to(x.dtype).T) @ bb.to(x.dtype).T).to(y.dtype)


def _f64(*ts):
    return [None if t is None else t.detach().double() for t in ts]


def check_forward_backward(backend, m_shape, k, n, r, dtype, bias=True, lora_dtype=None):
    x, w, b, a, bb = make(m_shape, k, n, r, dtype, bias, lora_dtype)
    scale = 0.75
    for t in (x, a, bb):
        t.requires_grad_(True)
    y = lk.lora_linear(x, w, b, a, bb, scale, backend=backend)
    dy = torch.randn_like(y)
    y.backward(dy)

    x64, w64, b64, a64, bb64, dy64 = _f64(x, w, b, a, bb, dy)
    y64 = R.lora_linear(x64, w64, b64, a64, bb64, scale)
    g64 = R.lora_linear_backward(dy64, x64, w64, a64, bb64, scale)

    xs, as_, bs = (t.detach().clone().requires_grad_(True) for t in (x, a, bb))
    y_base = _torch_same_dtype(xs, w, b, as_, bs, scale)
    y_base.backward(dy)

    assert y.dtype == x.dtype and y.shape == (*m_shape, n)
    assert_close_to_ref("y", y, y64, y_base)
    assert_close_to_ref("dx", x.grad, g64[0], xs.grad)
    assert_close_to_ref("dA", a.grad, g64[1], as_.grad)
    assert_close_to_ref("dB", bb.grad, g64[2], bs.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("r", [1, 8, 16, 64, 256])
@pytest.mark.parametrize("m_shape", [(1,), (7,), (133,), (3, 5)])
@pytest.mark.parametrize("kn", [(1, 17), (17, 1), (129, 65), (2049, 33)])
@pytest.mark.parametrize("bias", [True, False])
def test_torch_backend_matches_reference(dtype, r, m_shape, kn, bias):
    check_forward_backward("torch", m_shape, *kn, r, dtype, bias)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize(
    "dtype,m_shape,kn,r,bias",
    [
        (torch.float32, (7,), (17, 33), 8, True),
        (torch.float16, (3, 5), (129, 17), 16, False),
        (torch.bfloat16, (1,), (33, 129), 1, True),
    ],
)
def test_triton_backend_through_the_api(dtype, m_shape, kn, r, bias):
    check_forward_backward("triton", m_shape, *kn, r, dtype, bias)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fp32_adapter_on_half_base(backend, dtype):
    check_forward_backward(backend, (7,), 33, 17, 8, dtype, True, lora_dtype=torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_x(backend):
    x, w, b, a, bb = make((9,), 40, 24, 8, torch.float32)
    x_t = torch.randn(40, 9, device=DEVICE).T  # a transposed view: strides (1, 9)
    x_slice = torch.randn(2, 9, 80, device=DEVICE)[:, :, ::2]  # 3-D, inner stride 2
    for xin in (x_t, x_slice):
        assert not xin.is_contiguous()
        y = lk.lora_linear(xin, w, b, a, bb, 0.5, backend=backend)
        ref = R.lora_linear(xin.contiguous(), w, b, a, bb, 0.5)
        torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_x_lora_branch_gets_its_own_gradient(backend):
    x, w, b, a, bb = make((11,), 24, 16, 4, torch.float32)
    xl = torch.randn_like(x)
    for t in (x, xl, a, bb):
        t.requires_grad_(True)
    y = lk.lora_linear(x, w, b, a, bb, 2.0, x_lora=xl, backend=backend)
    dy = torch.randn_like(y)
    y.backward(dy)
    with torch.no_grad():
        ref = x @ w.T + b + 2.0 * (xl @ a.T) @ bb.T
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, dy @ w, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(xl.grad, 2.0 * (dy @ bb) @ a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.grad, 2.0 * (dy @ bb).T @ xl.detach(), atol=1e-5, rtol=1e-5)


def test_gradcheck_fp64_torch_path():
    x, w, b, a, bb = make((3, 2), 5, 4, 3, torch.float64)
    xl = torch.randn_like(x)
    for t in (x, w, b, a, bb, xl):
        t.requires_grad_(True)
    fn = lambda x, w, b, a, bb: lk.lora_linear(x, w, b, a, bb, 0.7, backend="torch")
    assert torch.autograd.gradcheck(fn, (x, w, b, a, bb))
    fn_l = lambda x, a, bb, xl: lk.lora_linear(x, w, b, a, bb, 0.7, x_lora=xl, backend="torch")
    assert torch.autograd.gradcheck(fn_l, (x, a, bb, xl))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    x, w, b, a, bb = make((0,), 16, 8, 4, torch.float32)
    x.requires_grad_(True)
    a.requires_grad_(True)
    y = lk.lora_linear(x, w, b, a, bb, 1.0, backend=backend)
    assert y.shape == (0, 8)
    y.sum().backward()
    assert x.grad.shape == (0, 16)
    assert torch.equal(a.grad, torch.zeros_like(a))


# ---------------------------------------------------------------------------------------------
# merge
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("nk", [(1, 1), (17, 129), (300, 2049)])
def test_merge_rounds_once(dtype, nk):
    n, k = nk
    w = torch.randn(n, k, dtype=dtype, device=DEVICE)
    a = torch.randn(8, k, dtype=dtype, device=DEVICE)
    b = torch.randn(n, 8, dtype=dtype, device=DEVICE)
    exact = w.double() + 0.3 * (b.double() @ a.double())
    out = lk.merge_lora_(w.clone(), a, b, 0.3, backend="torch")
    # Half an ulp of the result's dtype, plus the fp32 product's own error (far below an ulp).
    ulp = (exact.to(dtype).double().abs() * torch.finfo(dtype).eps).clamp_min(
        torch.finfo(dtype).tiny
    )
    fp32_err = 8 * 2.0**-24 * (0.3 * (b.double().abs() @ a.double().abs()) + w.double().abs())
    assert ((out.double() - exact).abs() <= 0.5 * ulp + fp32_err).all()
    # A delta rounded to the weight's dtype before the add (two roundings) misses that bound.
    twice = w + (0.3 * (b.float() @ a.float())).to(dtype)
    assert n * k < 100 or ((twice.double() - exact).abs() > 0.5 * ulp + fp32_err).any()


def test_merge_fp32_matches_reference():
    w = torch.randn(70, 129, device=DEVICE)
    a, b = torch.randn(8, 129, device=DEVICE), torch.randn(70, 8, device=DEVICE)
    out = lk.merge_lora_(w.clone(), a, b, 0.3, backend="torch")
    torch.testing.assert_close(out, R.merge_lora(w, a, b, 0.3), atol=1e-5, rtol=1e-5)


def test_unmerge_inverts_merge_in_fp32():
    w = torch.randn(64, 48)
    a, b = torch.randn(4, 48), torch.randn(64, 4)
    w0 = w.clone()
    lk.merge_lora_(w, a, b, 0.5)
    assert not torch.equal(w, w0)
    lk.unmerge_lora_(w, a, b, 0.5)
    torch.testing.assert_close(w, w0, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# backends
# ---------------------------------------------------------------------------------------------


def test_available_backends_always_has_torch():
    found = lk.available_backends()
    assert found[-1] == "torch"
    assert set(found) <= {"cuda", "triton", "torch"}


def test_auto_never_picks_the_interpreter(monkeypatch):
    from lora_kernels.backends import resolve_backend

    monkeypatch.delenv("LORA_KERNELS_BACKEND", raising=False)
    assert resolve_backend("auto", torch.zeros(1, 4), 8) == "torch"


def test_env_override(monkeypatch):
    from lora_kernels.backends import resolve_backend

    monkeypatch.setenv("LORA_KERNELS_BACKEND", "torch")
    assert resolve_backend("auto", torch.zeros(1, 4), 8) == "torch"
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="LORA_KERNELS_BACKEND"):
        resolve_backend("auto", torch.zeros(1, 4), 8)


def test_unknown_backend_is_refused():
    x, w, b, a, bb = make((2,), 8, 4, 2, torch.float32)
    with pytest.raises(ValueError, match="backend must be one of"):
        lk.lora_linear(x, w, b, a, bb, 1.0, backend="cudnn")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only check")
def test_cuda_backend_on_cpu_tensors_is_refused():
    x, w, b, a, bb = make((2,), 8, 4, 2, torch.float32)
    with pytest.raises(ValueError, match="backend='cuda'.*CUDA tensors"):
        lk.lora_linear(x, w, b, a, bb, 1.0, backend="cuda")


def test_triton_refuses_float64_and_huge_rank():
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    x, w, b, a, bb = make((2,), 8, 4, 2, torch.float64)
    with pytest.raises(ValueError, match="float64"):
        lk.lora_linear(x, w, b, a, bb, 1.0, backend="triton")
    x, w, b, a, bb = make((2,), 8, 4, 300, torch.float32)
    with pytest.raises(ValueError, match="rank 300"):
        lk.lora_linear(x, w, b, a, bb, 1.0, backend="triton")


# ---------------------------------------------------------------------------------------------
# bad input: every error names the argument and the expected and actual values
# ---------------------------------------------------------------------------------------------

K, N, RANK = 16, 12, 4


def _good():
    x, w, b, a, bb = make((3,), K, N, RANK, torch.float32)
    return {"x": x, "weight": w, "bias": b, "lora_a": a, "lora_b": bb, "scale": 0.5}


BAD = [
    ("weight", lambda: torch.randn(N, K + 1), r"weight of shape \[12, 16\], got \[12, 17\]"),
    ("bias", lambda: torch.randn(N + 1), r"bias of shape \[12\], got \[13\]"),
    ("lora_a", lambda: torch.randn(RANK, K - 1), r"lora_a of shape \[4, 16\], got \[4, 15\]"),
    ("lora_b", lambda: torch.randn(N, RANK + 1), r"lora_b of shape \[12, 4\], got \[12, 5\]"),
    ("lora_a", lambda: torch.randn(0, K), r"lora_a of shape \[r, 16\] with r >= 1, got \[0, 16\]"),
    ("weight", lambda: torch.randn(N, K, dtype=torch.float16), r"weight of dtype torch.float32"),
    ("lora_b", lambda: torch.randn(N, RANK, dtype=torch.float64), r"lora_b of dtype"),
    ("x", lambda: torch.randint(0, 3, (3, K)), r"x of a floating dtype"),
    ("weight", lambda: torch.randn(N, K, device="meta"), r"weight on device"),
    ("scale", lambda: "0.5", r"scale to be a float, got str"),
    ("scale", lambda: float("nan"), r"finite scale"),
    ("lora_a", lambda: [[1.0]], r"lora_a to be a torch.Tensor, got list"),
]


@pytest.mark.parametrize(
    "arg,bad,message", BAD, ids=[f"{a}-{i}" for i, (a, _, _) in enumerate(BAD)]
)
def test_bad_input_names_the_argument(arg, bad, message):
    kwargs = _good()
    kwargs[arg] = bad()
    with pytest.raises((ValueError, TypeError), match=message):
        lk.lora_linear(**kwargs)


def test_merge_bad_input_leaves_weight_untouched():
    w = torch.randn(N, K)
    w0 = w.clone()
    with pytest.raises(ValueError, match=r"lora_b of shape \[12, 4\], got \[11, 4\]"):
        lk.merge_lora_(w, torch.randn(RANK, K), torch.randn(N - 1, RANK), 1.0)
    with pytest.raises(ValueError, match=r"lora_a of shape \[4, 16\], got \[4, 15\]"):
        lk.unmerge_lora_(w, torch.randn(RANK, K - 1), torch.randn(N, RANK), 1.0)
    assert torch.equal(w, w0)
