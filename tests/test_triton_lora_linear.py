"""The single-adapter Triton kernels (``backends.triton.lora_linear``) against the spec.

Every result is compared with ``lora_kernels.reference`` evaluated in fp64 (the exact answer) under
the rule of ``tests/tolerances.py``: the kernel's largest error may be at most twice that of plain
PyTorch doing the same computation in the inputs' own precision (PEFT's recipe: an fp32 adapter
runs the LoRA branch in fp32; S, being fp32, is computed in fp32), plus a per-dtype floor.

On a CUDA machine with ``TRITON_INTERPRET`` unset or 0 the tests run on the GPU (bf16 with real
bf16 dots); elsewhere on CPU tensors under the Triton interpreter, which is slow: shapes are small
but odd (1, 7, 17, 129, 133, 2049) so that every tile edge is ragged. Rather than the full cross
product of dtype x shape x rank x bias, each dtype runs a list of shapes chosen so that ranks 1, 8,
16, 64 and 256 and both forward paths (S fused into the GEMM for M <= 64 and r <= 64, else its own
launch) each appear, with and without bias.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

import torch.nn.functional as F  # noqa: E402

import lora_kernels as lk  # noqa: E402
from lora_kernels import reference  # noqa: E402
from lora_kernels.backends.triton import interpreting  # noqa: E402
from lora_kernels.backends.triton import lora_linear as lk_triton  # noqa: E402
from lora_kernels.backends.triton.lora_linear import lora_linear_bwd, lora_linear_fwd  # noqa: E402
from tests.tolerances import assert_close_to_ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SCALE = 0.75


@pytest.fixture(autouse=True)
def _untimed_configs(monkeypatch):
    """On a GPU, each call's first candidate config: timing every config of every odd test shape
    would spend the run compiling. ``test_autotuned_path`` turns tuning back on."""
    monkeypatch.setenv("LORA_KERNELS_TRITON_AUTOTUNE", "0")


def _make(m, k, n, r, dtype, *, lora_dtype=None, bias=True, x_lora=False):
    """Random inputs scaled so that y, its LoRA term and every gradient are O(1)."""
    lora_dtype = lora_dtype or dtype

    def rand(*shape, std=1.0, dt=dtype):
        return (torch.randn(*shape) * std).to(dt).to(DEVICE)

    return {
        "x": rand(m, k),
        "weight": rand(n, k, std=k**-0.5),
        "bias": rand(n, std=0.5) if bias else None,
        "lora_a": rand(r, k, std=k**-0.5, dt=lora_dtype),
        "lora_b": rand(n, r, std=r**-0.5, dt=lora_dtype),
        "x_lora": rand(m, k) if x_lora else None,
        "dy": rand(m, n),
    }


def _run_kernels(t, **flags):
    y, s = lora_linear_fwd(
        t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], SCALE, t["x_lora"]
    )
    grads = lora_linear_bwd(
        t["dy"], t["x"], t["weight"], t["lora_a"], t["lora_b"], s, SCALE, t["x_lora"], **flags
    )
    return (y, s, *grads)


def _truth(t):
    """The spec in fp64: y, S, dx (base part), dx_lora (LoRA part, None without x_lora), dA, dB."""
    d = {key: None if v is None else v.double() for key, v in t.items()}
    y = reference.lora_linear(
        d["x"], d["weight"], d["bias"], d["lora_a"], d["lora_b"], SCALE, d["x_lora"]
    )
    dx, da, db = reference.lora_linear_backward(
        d["dy"], d["x"], d["weight"], d["lora_a"], d["lora_b"], SCALE, d["x_lora"]
    )
    xl = d["x"] if d["x_lora"] is None else d["x_lora"]
    s = xl @ d["lora_a"].T
    dx_lora = None
    if d["x_lora"] is not None:
        dx_lora = SCALE * (d["dy"] @ d["lora_b"]) @ d["lora_a"]
        dx = dx - dx_lora  # the kernel returns the base branch's part in dx
    return y, s, dx, dx_lora, da, db


def _torch_same_precision(t):
    """Plain PyTorch autograd in the inputs' precision: what the kernel's errors are measured by."""
    x = t["x"].clone().requires_grad_()
    xl = x if t["x_lora"] is None else t["x_lora"].clone().requires_grad_()
    a = t["lora_a"].clone().requires_grad_()
    b = t["lora_b"].clone().requires_grad_()
    # fp32 adapters on a 16-bit base are rounded to the base's dtype for their products, as
    # PEFT computes them under autocast: the precision policy (README "Precision").
    lora = F.linear(F.linear(xl, a.to(x.dtype)), b.to(x.dtype)) * SCALE
    y = F.linear(x, t["weight"], t["bias"]) + lora.to(x.dtype)
    y.backward(t["dy"])
    s = F.linear(xl.detach().float(), a.detach().float())
    if a.dtype != x.dtype:
        s = F.linear(xl.detach(), a.detach().to(x.dtype))
    dx_lora = xl.grad if t["x_lora"] is not None else None
    return y.detach(), s, x.grad, dx_lora, a.grad, b.grad


NAMES = ("y", "s", "dx", "dx_lora", "da", "db")


def _check_all(t, outputs=None):
    """Run the kernels (unless given their outputs) and check every result and its dtype."""
    got = outputs if outputs is not None else _run_kernels(t)
    truth = _truth(t)
    base = _torch_same_precision(t)
    y, s, dx, dx_lora, da, db = got
    assert y.dtype == t["x"].dtype and y.is_contiguous()
    assert s.dtype == torch.float32
    assert dx.dtype == t["x"].dtype
    assert da.dtype == t["lora_a"].dtype and db.dtype == t["lora_b"].dtype
    assert (dx_lora is None) == (t["x_lora"] is None)
    for name, g, tr, bs in zip(NAMES, got, truth, base, strict=True):
        if g is not None:
            assert_close_to_ref(name, g, tr, bs)


# (M, K, N, r, bias): each line says what it adds.
CASES = [
    pytest.param(1, 17, 129, 8, True, id="m1-k17-n129-r8"),  # separate S (N > 2 x 64), 2 blocks
    pytest.param(7, 129, 17, 16, False, id="m7-k129-n17-r16"),  # fused S, ragged K-loop
    pytest.param(7, 1, 7, 64, True, id="m7-k1-n7-r64"),  # largest fused rank, K = 1
    pytest.param(1, 7, 1, 256, True, id="m1-k7-n1-r256"),  # separate S at M = 1, N = 1
    pytest.param(133, 129, 17, 1, True, id="m133-k129-n17-r1"),  # separate S, split reductions
    pytest.param(133, 17, 129, 256, False, id="m133-k17-n129-r256"),  # rank chunks everywhere
    pytest.param(1, 2049, 17, 16, True, id="m1-k2049-n17-r16"),  # long K
]


@pytest.mark.parametrize("m, k, n, r, bias", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_backward(dtype, m, k, n, r, bias):
    _check_all(_make(m, k, n, r, dtype, bias=bias))


def test_wide_n():
    """N = 2049: many output tiles forward, a long reduction for dx, many dy-pass programs."""
    _check_all(_make(133, 17, 2049, 16, torch.bfloat16))


@pytest.mark.parametrize("m", [7, 133])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_x_lora(dtype, m):
    """PEFT dropout: the LoRA branch reads x_lora; dx and dx_lora come back separately."""
    t = _make(m, 129, 17, 16, dtype, x_lora=True)
    outputs = _run_kernels(t)
    _check_all(t, outputs)
    # Together they are the spec's dx (the gradient as if x_lora were x on the LoRA branch).
    d = {key: v.double() for key, v in t.items() if v is not None}
    dx_ref, _, _ = reference.lora_linear_backward(
        d["dy"], d["x"], d["weight"], d["lora_a"], d["lora_b"], SCALE, d["x_lora"]
    )
    base = _torch_same_precision(t)
    assert_close_to_ref("dx + dx_lora", outputs[2] + outputs[3], dx_ref, base[2] + base[3])


@pytest.mark.parametrize("m", [7, 133])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_fp32_adapter_on_16bit_base(dtype, m):
    """PEFT's default: fp32 lora_A/lora_B on a bf16/fp16 layer; dA, dB come back in fp32."""
    _check_all(_make(m, 129, 17, 16, dtype, lora_dtype=torch.float32))


@pytest.mark.parametrize("m", [7, 133])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_contiguous(dtype, m):
    """x column-major, dy a strided slice, weight transposed in memory: all read through strides."""
    t = _make(m, 129, 17, 8, dtype)
    t["x"] = t["x"].t().contiguous().t()
    t["dy"] = torch.cat([t["dy"], t["dy"]], dim=1)[:, ::2]
    t["weight"] = t["weight"].t().contiguous().t()
    assert not t["x"].is_contiguous() and not t["dy"].is_contiguous()
    _check_all(t)


def test_empty_batch():
    """M = 0: empty y, S and dx; zero dA and dB."""
    t = _make(0, 17, 9, 4, torch.bfloat16)
    y, s, dx, dx_lora, da, db = _run_kernels(t)
    assert y.shape == (0, 9) and s.shape == (0, 4) and dx.shape == (0, 17)
    assert dx_lora is None
    assert da.shape == (4, 17) and db.shape == (9, 4)
    assert not da.any() and not db.any()


@pytest.mark.parametrize(
    "needs",
    [
        {"needs_dx": True, "needs_da": False, "needs_db": False},
        {"needs_dx": False, "needs_da": True, "needs_db": False},
        {"needs_dx": False, "needs_da": False, "needs_db": True},
        {"needs_dx": False, "needs_da": True, "needs_db": True},
    ],
    ids=["dx", "da", "db", "da+db"],
)
@pytest.mark.parametrize("x_lora", [False, True], ids=["x", "x_lora"])
def test_needs_flags(needs, x_lora):
    """Only the requested gradients come back, and they are right on their own."""
    t = _make(133, 17, 33, 8, torch.bfloat16, x_lora=x_lora)
    y, s = lora_linear_fwd(
        t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], SCALE, t["x_lora"]
    )
    dx, dx_lora, da, db = lora_linear_bwd(
        t["dy"], t["x"], t["weight"], t["lora_a"], t["lora_b"], s, SCALE, t["x_lora"], **needs
    )
    truth = _truth(t)
    base = _torch_same_precision(t)
    wanted = {
        "dx": needs["needs_dx"],
        "dx_lora": needs["needs_dx"] and x_lora,
        "da": needs["needs_da"],
        "db": needs["needs_db"],
    }
    for i, (name, got) in enumerate(zip(NAMES[2:], (dx, dx_lora, da, db), strict=True), start=2):
        assert (got is not None) == wanted[name], name
        if got is not None:
            assert_close_to_ref(name, got, truth[i], base[i])


@pytest.mark.parametrize("fused", [True, False], ids=["fused-S", "separate-S"])
@pytest.mark.parametrize("m", [7, 133])
def test_both_forward_paths(monkeypatch, fused, m):
    """Either way of computing S is right at any M (the shape only picks the faster one)."""
    monkeypatch.setattr(lk_triton, "_use_fused_shrink", lambda m, r, n: fused)
    _check_all(_make(m, 129, 17, 16, torch.bfloat16, x_lora=True))


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="the interpreter never autotunes")
@pytest.mark.parametrize("m", [7, 133])
def test_autotuned_path(monkeypatch, m):
    monkeypatch.setenv("LORA_KERNELS_TRITON_AUTOTUNE", "1")
    _check_all(_make(m, 129, 17, 16, torch.bfloat16, x_lora=True))


def _candidates(m_bucket, dtype, lora_dtype=None, split=False):
    x = torch.empty(0, dtype=dtype)
    a = torch.empty(0, dtype=lora_dtype or dtype)
    found = lk_triton._gemm_candidates(m_bucket, x, a, a, split)
    return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) for c in found]


def test_gemm_config_candidates():
    """The configs the GPU tunes over: tiles no taller than M needs, short K tiles for fp32
    layers, no 128x256 tile next to a second accumulator; all of them known to the tuner."""
    assert {bm for bm, _, _ in _candidates(1, torch.bfloat16)} == {16}
    assert {bm for bm, _, _ in _candidates(32, torch.bfloat16)} == {16, 32}
    assert min(bm for bm, _, _ in _candidates(4096, torch.float16)) >= 64
    assert (128, 128, 32) in _candidates(4096, torch.bfloat16)
    assert all(bm * bn <= 128 * 128 for bm, bn, _ in _candidates(4096, torch.bfloat16, split=True))
    for m_bucket in (1, 64, 4096):
        assert all(bk <= 64 for _, _, bk in _candidates(m_bucket, torch.float32))
        # fp32 adapters on a 16-bit base: rounded to 16 bits for the dots, 16-bit tiles
        mixed = _candidates(m_bucket, torch.bfloat16, torch.float32)
        assert mixed == _candidates(m_bucket, torch.bfloat16)
    tuned = lk_triton._lora_gemm_tuned.configs
    assert all(c in tuned for group in lk_triton._GEMM_CONFIGS.values() for c in group)


def _deterministic_twice(t):
    """The kernels' outputs on ``t`` with deterministic algorithms on, run twice: both runs give
    the same bits (checked here); returns the first."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first = _run_kernels(t)
        second = _run_kernels(t)
    finally:
        torch.use_deterministic_algorithms(previous)
    for name, a, b in zip(NAMES, first, second, strict=True):
        if a is not None:
            assert torch.equal(a, b), name
    return first


def test_deterministic_mode():
    """With deterministic algorithms on, no atomics: the same bits twice, and right."""
    t = _make(133, 129, 33, 8, torch.bfloat16)
    _check_all(t, _deterministic_twice(t))


def _bad(m=5, k=8, n=6, r=4, dtype=torch.float32):
    return _make(m, k, n, r, dtype)


@pytest.mark.parametrize(
    "change, error, words",
    [
        (lambda t: t.update(lora_b=t["lora_b"][:, :3]), ValueError, ["lora_b", "[6, 4]", "[6, 3]"]),
        (lambda t: t.update(lora_a=t["lora_a"][:, :7]), ValueError, ["lora_a", "[4, 8]", "[4, 7]"]),
        (lambda t: t.update(weight=t["weight"][:5]), ValueError, ["bias", "[5]", "[6]"]),
        (lambda t: t.update(bias=t["bias"][:2]), ValueError, ["bias", "[6]", "[2]"]),
        (lambda t: t.update(x_lora=t["x"][:4]), ValueError, ["x_lora", "[5, 8]", "[4, 8]"]),
        (lambda t: t.update(lora_a=t["lora_a"].half()), TypeError, ["lora_a", "torch.float16"]),
        (lambda t: t.update(weight=t["weight"].half()), TypeError, ["weight", "torch.float16"]),
        (lambda t: t.update(x=t["x"].int()), TypeError, ["x", "torch.int32"]),
        (
            lambda t: t.update(lora_a=t["lora_a"][:0], lora_b=t["lora_b"][:, :0]),
            ValueError,
            ["lora_a", "r >= 1", "[0, 8]"],
        ),
    ],
    ids=[
        "lora_b",
        "lora_a",
        "weight",
        "bias",
        "x_lora",
        "lora-dtype",
        "w-dtype",
        "x-int",
        "r0",
    ],
)
def test_triton_backend_rejects_bad_input(change, error, words):
    """The launchers trust their inputs: the functional layer's checks stop a bad call first."""
    t = _bad()
    change(t)
    with pytest.raises(error) as info:
        lk.lora_linear(
            t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], SCALE,
            x_lora=t["x_lora"], backend="triton",
        )  # fmt: skip
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_rank_above_256_rejected():
    t = _bad(r=257)
    with pytest.raises(ValueError, match="ranks up to 256, got rank 257"):
        lk.lora_linear(t["x"], t["weight"], None, t["lora_a"], t["lora_b"], SCALE, backend="triton")


@pytest.mark.skipif(DEVICE != "cpu", reason="needs CPU tensors")
def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    t = _bad()
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        lk.lora_linear(
            t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], SCALE, backend="triton"
        )


# The GPU code path (bf16 dots, 3xTF32, atomics, every autotuned config), specialised as a real
# launch and compiled for sm_80 and sm_90, is tests/test_triton_compile.py's gate.
