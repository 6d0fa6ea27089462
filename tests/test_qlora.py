"""QLoRA: LoRA on a bitsandbytes 4-bit (NF4 / FP4) base, against bitsandbytes, the spec and PEFT.

* Dequantization: ``reference.dequantize_4bit``, ``lora_kernels.dequantize_4bit`` (torch path)
  and the Triton kernels' in-tile dequantization (read back through ``x = I``, ``scale = 0``,
  which makes the GEMM exact) equal bitsandbytes' generic implementation
  (``bitsandbytes.backends.default.ops``), the oracle, value for value (``torch.equal``: FP4's
  zero code may come back as -0.0). bitsandbytes' native CPU dequantization is not the oracle:
  on AVX-512 CPUs it takes another path that disagrees with the generic one (e.g. blocks that
  span rows), so a test that used it would depend on the machine; where the native result
  differs it is reported as a warning, never asserted.
* Forward and gradients of both backends against ``reference.qlora_linear`` in fp64 under the
  rule of ``tests/tolerances.py`` (baseline: stock PyTorch in the inputs' dtype on the same
  dequantized weight, which is what bitsandbytes + PEFT compute).
* The layer, ``get_lora_model`` and ``fuse`` against PEFT's ``lora.bnb.Linear4bit`` on CPU:
  outputs, gradients and a few training steps, and a tiny Llama quantized with bitsandbytes.
* Bad inputs raise clear errors; the ops pass ``opcheck`` and compile with ``fullgraph=True``.

The Triton kernels run on CPU under the interpreter here (small, odd shapes); on a GPU on CUDA.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import warnings

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as bnbF  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from bitsandbytes.backends.default import ops as bnb_generic  # noqa: E402
from torch import nn  # noqa: E402

import lora_kernels as lk  # noqa: E402
from lora_kernels import reference  # noqa: E402
from lora_kernels.backends.triton import HAS_TRITON, interpreting  # noqa: E402
from tests.tolerances import assert_close_to_ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
BACKENDS = ["torch"] + (["triton"] if HAS_TRITON and (DEVICE == "cuda" or interpreting()) else [])
SCALE = 0.75


@pytest.fixture(autouse=True)
def _on_device():
    """Tensors and modules the tests create land on DEVICE (a no-op on CPU)."""
    with torch.device(DEVICE):
        yield


def _quantize(n, k, *, quant_type="nf4", blocksize=64, nested=False, dtype=torch.float32):
    w = torch.randn(n, k, dtype=dtype, device=DEVICE)
    return bnbF.quantize_4bit(
        w, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type
    )


def _ref_dequant(q, st, dtype):
    kw = {}
    if st.nested:
        kw = {
            "absmax2": st.state2.absmax,
            "code2": st.state2.code,
            "offset": st.offset,
            "blocksize2": st.state2.blocksize,
        }
    return reference.dequantize_4bit(
        q, st.absmax, st.code, st.blocksize, tuple(st.shape), dtype, **kw
    )


# ------------------------------------------------------------------------------------------------
# dequantization
# ------------------------------------------------------------------------------------------------


def _bnb_dequant(q, st, dtype=None):
    """bitsandbytes' generic dequantization of ``(q, st)`` to ``dtype`` (default: the original
    weight's), the same on every CPU and GPU; where ``bnbF.dequantize_4bit`` (the native kernel
    this machine dispatches to) disagrees, say so in a warning: a fact about bitsandbytes."""
    dtype = dtype or st.dtype
    absmax = st.absmax
    if st.nested:
        s2 = st.state2
        absmax = bnb_generic._dequantize_blockwise_compute(
            absmax.reshape(-1), s2.absmax, s2.code, s2.blocksize, torch.float32
        )
        absmax = absmax + st.offset
    out = bnb_generic._dequantize_4bit_compute(
        q.view(torch.uint8).reshape(-1), absmax.float(), st.code, st.blocksize, st.shape, dtype
    )
    native = bnbF.dequantize_4bit(q, st).to(dtype)
    if not torch.equal(native, out):
        diff = (native.double() - out.double()).abs().max().item()
        warnings.warn(
            f"bitsandbytes' native dequantize_4bit differs from its generic implementation by "
            f"up to {diff:.3g} (shape {tuple(st.shape)}, blocksize {st.blocksize}, "
            f"{st.quant_type}, nested={st.nested}, {dtype})",
            stacklevel=2,
        )
    return out


@pytest.fixture
def _eager_oracle():
    """bitsandbytes' generic dequantization (odd K) is wrapped in torch.compile: one compile per
    shape and blocksize would spend the test budget compiling; the eager op is the same math."""
    with torch.compiler.set_stance("force_eager"):
        yield


@pytest.mark.usefixtures("_eager_oracle")
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("shape", [(33, 64), (64, 130), (7, 133), (1, 1)])
def test_dequantize_equals_bitsandbytes(quant_type, blocksize, nested, shape):
    q, st = _quantize(*shape, quant_type=quant_type, blocksize=blocksize, nested=nested)
    oracle = _bnb_dequant(q, st)  # fp32
    assert torch.equal(_ref_dequant(q, st, torch.float32), oracle)
    assert torch.equal(lk.dequantize_4bit(q, st), oracle)
    for dtype in (torch.bfloat16, torch.float16):
        # bitsandbytes dequantizes to a 16-bit dtype by rounding its fp32 value once
        assert torch.equal(lk.dequantize_4bit(q, st, dtype), oracle.to(dtype))
        assert torch.equal(_ref_dequant(q, st, dtype), oracle.to(dtype))


@pytest.mark.usefixtures("_eager_oracle")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dequantize_from_16bit_weights(dtype):
    """quant_state.dtype is the original weight's; the oracle dequantizes to it."""
    q, st = _quantize(40, 96, dtype=dtype, nested=True)
    assert torch.equal(lk.dequantize_4bit(q, st), _bnb_dequant(q, st))


@pytest.mark.usefixtures("_eager_oracle")
@pytest.mark.skipif("triton" not in BACKENDS, reason="needs triton (GPU or interpreter)")
@pytest.mark.parametrize(
    ("quant_type", "dtype", "blocksize", "nested", "shape"),
    [
        ("nf4", torch.bfloat16, 64, True, (37, 70)),
        ("fp4", torch.float32, 64, True, (37, 70)),
        ("nf4", torch.float16, 32, False, (17, 33)),
        ("fp4", torch.bfloat16, 128, False, (17, 33)),
    ],
)
def test_triton_dequantizes_in_kernel_bit_exact(quant_type, dtype, blocksize, nested, shape):
    """With x = I and scale = 0 the forward's output is W.T itself, rounded once to dtype: the
    in-kernel dequantization (odd K: bytes straddle rows) equals bitsandbytes' value for value."""
    n, k = shape
    q, st = _quantize(n, k, quant_type=quant_type, blocksize=blocksize, nested=nested)
    x = torch.eye(k, dtype=dtype, device=DEVICE)
    a = torch.randn(4, k, dtype=dtype, device=DEVICE)
    b = torch.randn(n, 4, dtype=dtype, device=DEVICE)
    y = lk.qlora_linear(x, q, st, None, a, b, 0.0, backend="triton")
    assert torch.equal(y, _bnb_dequant(q, st, torch.float32).to(dtype).T)


@pytest.mark.usefixtures("_eager_oracle")
@pytest.mark.skipif("triton" not in BACKENDS, reason="needs triton (GPU or interpreter)")
@pytest.mark.parametrize(
    ("quant_type", "dtype", "blocksize", "nested", "shape"),
    [
        ("nf4", torch.bfloat16, 64, True, (37, 70)),  # rows start inside blocks
        ("fp4", torch.float32, 64, True, (19, 256)),  # aligned rows, several absmax chunks
        ("nf4", torch.float16, 32, False, (17, 130)),
        ("fp4", torch.bfloat16, 128, False, (9, 258)),
    ],
)
def test_triton_decode_dequantizes_bit_exact(quant_type, dtype, blocksize, nested, shape):
    """The decode kernel (M <= 16, even K: each byte split in registers, block maxima picked
    from a per-row table): with x = 16 rows of I and scale = 0 its output is those rows of W.T,
    value for value bitsandbytes' dequantization."""
    n, k = shape
    q, st = _quantize(n, k, quant_type=quant_type, blocksize=blocksize, nested=nested)
    w_t = _bnb_dequant(q, st, torch.float32).to(dtype).T
    eye = torch.eye(k, dtype=dtype, device=DEVICE)
    a = torch.randn(4, k, dtype=dtype, device=DEVICE)
    b = torch.randn(n, 4, dtype=dtype, device=DEVICE)
    for i0 in range(0, k, 16):
        y = lk.qlora_linear(eye[i0 : i0 + 16], q, st, None, a, b, 0.0, backend="triton")
        assert torch.equal(y, w_t[i0 : i0 + 16]), f"rows {i0}.."


# ------------------------------------------------------------------------------------------------
# forward and gradients against the spec
# ------------------------------------------------------------------------------------------------

# (M, N, K, r, bias, quant settings): odd sizes, decode-like M = 1, a rank above 16
CASES = [
    (1, 7, 133, 1, True, ("nf4", 64, True)),
    (7, 33, 70, 8, False, ("fp4", 32, False)),
    (20, 17, 64, 20, True, ("nf4", 128, True)),
    (5, 19, 130, 20, True, ("nf4", 64, True)),  # decode kernel, a rank above 16
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _inputs(m, n, k, r, dtype, bias, quant, *, lora_dtype=None, x_lora=False):
    qt, bs, nested = quant
    q, st = _quantize(n, k, quant_type=qt, blocksize=bs, nested=nested)
    lora_dtype = lora_dtype or dtype

    def rand(*shape, std=1.0, dt=dtype):
        return (torch.randn(*shape, device=DEVICE) * std).to(dt)

    return {
        "x": rand(m, k),
        "q": q,
        "st": st,
        "bias": rand(n) if bias else None,
        "a": rand(r, k, std=k**-0.5, dt=lora_dtype),
        "b": rand(n, r, std=r**-0.5, dt=lora_dtype),
        "x_lora": rand(m, k) if x_lora else None,
    }


def _stock(t, w):
    """Stock PyTorch in the inputs' dtypes: bitsandbytes' matmul + PEFT's LoRA branch, with
    autograd for the gradients. fp32 adapters on a 16-bit base are rounded to the base's dtype
    for their products, as PEFT computes them under autocast (the precision policy, README
    "Precision"); their gradients come back in fp32 through the cast."""
    x, xl = t["x"], t["x_lora"] if t["x_lora"] is not None else t["x"]
    lora = F.linear(F.linear(xl, t["a"].to(x.dtype)), t["b"].to(x.dtype)) * SCALE
    return F.linear(x, w.to(x.dtype), t["bias"]) + lora.to(x.dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_forward_and_grads_match_reference(backend, dtype, case):
    m, n, k, r, bias, quant = case
    _check_against_reference(_inputs(m, n, k, r, dtype, bias, quant), dtype, backend)


def _check_against_reference(t, dtype, backend, leaves=("x", "a", "b")):
    """``qlora_linear`` on the inputs ``t`` against the fp64 reference (with the stock
    composition's error as the tolerance's yardstick): y, then the gradient of each of
    ``leaves`` (the others get none, so the backward computes only what those need)."""
    w = _ref_dequant(t["q"], t["st"], dtype)  # the weight bitsandbytes multiplies by
    ours = {**t, **{name: t[name].clone().requires_grad_() for name in leaves}}
    stock_leaves = {name: t[name].clone().requires_grad_() for name in leaves}
    y = lk.qlora_linear(
        ours["x"], t["q"], t["st"], t["bias"], ours["a"], ours["b"], SCALE, backend=backend
    )
    d = lambda v: None if v is None else v.double()  # noqa: E731
    ref = reference.qlora_linear(d(t["x"]), d(w), d(t["bias"]), d(t["a"]), d(t["b"]), SCALE)
    stock = _stock({**t, **stock_leaves}, w)
    assert_close_to_ref("y", y, ref, stock)

    dy = torch.randn_like(y)
    y.backward(dy)
    stock.backward(dy)
    grads = reference.qlora_linear_backward(
        dy.double(), d(t["x"]), d(w), d(t["a"]), d(t["b"]), SCALE
    )
    for name, label, grad in zip(("x", "a", "b"), ("dx", "dA", "dB"), grads, strict=True):
        if name in leaves:
            assert_close_to_ref(label, ours[name].grad, grad, stock_leaves[name].grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_adapter_dropout_input_and_bias_grad(backend):
    """PEFT's QLoRA layout: bf16 activations, fp32 adapter weights, a dropout input on the LoRA
    branch, a trainable bias (``bias="lora_only"``)."""
    m, n, k, r = 9, 24, 70, 8
    t = _inputs(m, n, k, r, torch.bfloat16, True, ("nf4", 64, True), lora_dtype=torch.float32,
                x_lora=True)  # fmt: skip
    w = _ref_dequant(t["q"], t["st"], torch.bfloat16)
    names = ("x", "a", "b", "x_lora", "bias")
    ours = {name: t[name].clone().requires_grad_() for name in names}
    stock_leaves = {name: t[name].clone().requires_grad_() for name in names}
    y = lk.qlora_linear(
        ours["x"], t["q"], t["st"], ours["bias"], ours["a"], ours["b"], SCALE,
        x_lora=ours["x_lora"], backend=backend,
    )  # fmt: skip
    stock = _stock({**t, **stock_leaves}, w)
    d = {name: t[name].double() for name in names}
    ref = reference.qlora_linear(
        d["x"], w.double(), d["bias"], d["a"], d["b"], SCALE, x_lora=d["x_lora"]
    )
    assert_close_to_ref("y", y, ref, stock)
    dy = torch.randn_like(y)
    y.backward(dy)
    stock.backward(dy)
    dx_all, da, db = reference.qlora_linear_backward(
        dy.double(), d["x"], w.double(), d["a"], d["b"], SCALE, x_lora=d["x_lora"]
    )
    dx_base = dy.double() @ w.double()
    assert_close_to_ref("dx", ours["x"].grad, dx_base, stock_leaves["x"].grad)
    assert_close_to_ref("dx_lora", ours["x_lora"].grad, dx_all - dx_base,
                        stock_leaves["x_lora"].grad)  # fmt: skip
    assert_close_to_ref("dA", ours["a"].grad, da, stock_leaves["a"].grad)
    assert_close_to_ref("dB", ours["b"].grad, db, stock_leaves["b"].grad)
    assert_close_to_ref("dbias", ours["bias"].grad, dy.double().sum(0), stock_leaves["bias"].grad)


@pytest.mark.skipif(not interpreting(), reason="runs the CUDA configs under the interpreter")
@pytest.mark.parametrize("m", [3, 20])
def test_autotune_switch_takes_the_first_config(m, monkeypatch):
    """``LORA_KERNELS_TRITON_AUTOTUNE=0``: the CUDA launch path (here under the interpreter)
    takes each kernel's first config without the autotuner, for decode and prefill alike; the
    autotuners key on a bucket of M as the LoRA GEMM's do."""
    from triton.runtime.autotuner import Autotuner

    from lora_kernels.backends.triton import qlora as tq

    for tuner in (*tq._TUNED.values(), *tq._DECODE_TUNED.values()):
        assert tuner.keys[0] == "m_bucket"

    def no_tuning(*args, **kwargs):
        raise AssertionError("the autotuner ran")

    monkeypatch.setattr(tq, "interpreting", lambda: False)
    monkeypatch.setenv("LORA_KERNELS_TRITON_AUTOTUNE", "0")
    monkeypatch.setattr(Autotuner, "run", no_tuning)
    t = _inputs(m, 40, 128, 4, torch.float16, True, ("nf4", 64, True))
    w = _ref_dequant(t["q"], t["st"], torch.float16)
    y = lk.qlora_linear(t["x"], t["q"], t["st"], t["bias"], t["a"], t["b"], SCALE,
                        backend="triton")  # fmt: skip
    d = lambda v: v.double()  # noqa: E731
    ref = reference.qlora_linear(d(t["x"]), d(w), d(t["bias"]), d(t["a"]), d(t["b"]), SCALE)
    assert_close_to_ref("y", y, ref, _stock(t, w))


@pytest.mark.skipif(not interpreting(), reason="runs the CUDA configs under the interpreter")
@pytest.mark.parametrize(
    ("kernel", "rank_class", "index"),
    [("fwd", "wide", 0), ("fwd", "wide", 1), ("dx", "odd", 0), ("dx", "odd", 1)],
)
def test_every_prefill_tile_of_the_wide_and_odd_ranks(kernel, rank_class, index, monkeypatch):
    """Each prefill tile the compile gate changed (16-deep fwd K tiles at ranks 48-128, 16-wide
    dx tiles at the odd ranks), run as the CUDA launch path runs it (here under the
    interpreter) on odd sizes: forward and dx against the reference."""
    from lora_kernels.backends.triton import qlora as tq

    tuner = tq._TUNED[(kernel, False, rank_class)]
    monkeypatch.setattr(tuner, "configs", [tuner.configs[index]])
    monkeypatch.setattr(tq, "interpreting", lambda: False)
    monkeypatch.setenv("LORA_KERNELS_TRITON_AUTOTUNE", "0")
    r = 64 if rank_class == "wide" else 40
    t = _inputs(20, 70, 72, r, torch.float16, True, ("nf4", 64, True))
    _check_against_reference(t, torch.float16, "triton", leaves=("x",))


@pytest.mark.skipif(not interpreting(), reason="counts the interpreter's atomics")
def test_decode_shrink_in_deterministic_mode_uses_no_atomics(monkeypatch):
    """The decode path's shrink splits K over programs that add partial S with atomics; under
    ``torch.use_deterministic_algorithms(True)`` one program per row block sums all of K."""
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    original = builder.create_atomic_rmw
    lanes = []

    def counting(op, ptr, val, mask, sem, scope):
        lanes.append(int(mask.data.sum()))
        return original(op, ptr, val, mask, sem, scope)

    monkeypatch.setattr(builder, "create_atomic_rmw", counting)
    t = _inputs(3, 21, 200, 5, torch.float32, True, ("nf4", 64, True))
    w = _ref_dequant(t["q"], t["st"], torch.float32)
    d = lambda v: v.double()  # noqa: E731
    ref = reference.qlora_linear(d(t["x"]), d(w), d(t["bias"]), d(t["a"]), d(t["b"]), SCALE)
    args = (t["x"], t["q"], t["st"], t["bias"], t["a"], t["b"], SCALE)
    y = lk.qlora_linear(*args, backend="triton")
    assert sum(lanes) > 0  # K = 200 takes several splits
    assert_close_to_ref("y", y, ref, _stock(t, w))
    lanes.clear()
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        y_det = lk.qlora_linear(*args, backend="triton")
    finally:
        torch.use_deterministic_algorithms(prev)
    assert lanes == []
    assert_close_to_ref("y", y_det, ref, _stock(t, w))


def test_float64_gradcheck_torch_backend():
    q, st = _quantize(6, 10, nested=True)
    x = torch.randn(3, 10, dtype=torch.float64, requires_grad=True)
    a = torch.randn(2, 10, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, 2, dtype=torch.float64, requires_grad=True)
    fn = lambda x, a, b: lk.qlora_linear(x, q, st, None, a, b, SCALE, backend="torch")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, a, b))


def test_leading_dims_and_quant4bit_tuple():
    q, st = _quantize(12, 20)
    quant = lk.functional.qlora.Quant4bit(st.absmax, st.code, st.blocksize, tuple(st.shape))
    x = torch.randn(2, 3, 20)
    a, b = torch.randn(4, 20), torch.randn(12, 4)
    y = lk.qlora_linear(x, q, quant, None, a, b, SCALE)
    w = bnbF.dequantize_4bit(q, st)
    assert y.shape == (2, 3, 12)
    torch.testing.assert_close(y, x @ w.T + SCALE * (x @ a.T) @ b.T, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# bad inputs
# ------------------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    q, st = _quantize(12, 20, nested=True)
    q2, st2 = _quantize(12, 24)
    x, a, b = torch.randn(3, 20), torch.randn(4, 20), torch.randn(12, 4)
    with pytest.raises(ValueError, match=r"qweight to hold the 120 packed bytes .* \[12, 20\]"):
        lk.qlora_linear(x, q2, st, None, a, b, SCALE)  # quant_state of another weight
    with pytest.raises(ValueError, match=r"expected x of shape \[\.\.\., 24\]"):
        lk.qlora_linear(x, q2, st2, None, a, b, SCALE)
    with pytest.raises(TypeError, match="expected quant_state to be bitsandbytes' QuantState"):
        lk.qlora_linear(x, q, None, None, a, b, SCALE)
    with pytest.raises(TypeError, match="expected x of a floating dtype"):
        lk.qlora_linear(x.to(torch.int32), q, st, None, a, b, SCALE)
    with pytest.raises(TypeError, match=r"expected lora_a of dtype torch.float16 or torch.float32"):
        lk.qlora_linear(x.half(), q, st, None, a.double(), b.double(), SCALE)
    with pytest.raises(ValueError, match=r"expected lora_b of shape \[12, 4\], got \[12, 3\]"):
        lk.qlora_linear(x, q, st, None, a, b[:, :3], SCALE)
    with pytest.raises(ValueError, match=r"expected bias of shape \[12\]"):
        lk.qlora_linear(x, q, st, torch.randn(11), a, b, SCALE)
    broken = copy.copy(st)
    broken.absmax = st.absmax[:-1]
    with pytest.raises(ValueError, match=r"quant_state.absmax of shape \[4\], got \[3\]"):
        lk.qlora_linear(x, q, broken, None, a, b, SCALE)
    broken = copy.copy(st)
    broken.blocksize = 0
    with pytest.raises(ValueError, match="quant_state.blocksize to be a positive int, got 0"):
        lk.dequantize_4bit(q, broken)
    broken = copy.copy(st)
    broken.quant_type = "int4"
    with pytest.raises(ValueError, match="quant_type 'nf4' or 'fp4', got 'int4'"):
        lk.dequantize_4bit(q, broken)
    with pytest.raises(ValueError, match="backend must be one of"):
        lk.qlora_linear(x, q, st, None, a, b, SCALE, backend="cutlass")


# ------------------------------------------------------------------------------------------------
# custom ops
# ------------------------------------------------------------------------------------------------


def _flat(q, st):
    return (
        q.reshape(-1), st.absmax, st.code, st.state2.absmax, st.state2.code, st.offset.reshape(1),
        st.blocksize, st.state2.blocksize,
    )  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    q, st = _quantize(12, 20, nested=True)
    x, a, b = (torch.randn(s, requires_grad=True) for s in ((3, 20), (4, 20), (12, 4)))
    bias = torch.randn(12, requires_grad=True)
    args = (x, *_flat(q, st), 12, bias, a, b, SCALE, None, backend)
    torch.library.opcheck(torch.ops.lora_kernels.qlora_linear_fwd, args)
    dy = torch.randn(3, 12)
    s = (x @ a.T).detach().float()
    bwd = (dy, x.detach(), *_flat(q, st), a.detach(), b.detach(), s, SCALE, None, True, True,
           True, backend)  # fmt: skip
    torch.library.opcheck(torch.ops.lora_kernels.qlora_linear_bwd, bwd)


def test_compile_fullgraph_forward_backward():
    q, st = _quantize(12, 20, nested=True)
    x = torch.randn(3, 20)
    a = torch.randn(4, 20, requires_grad=True)
    b = torch.randn(12, 4, requires_grad=True)

    def step(x):
        return lk.qlora_linear(x, q, st, None, a, b, SCALE, backend="torch").square().sum()

    loss = torch.compile(step, fullgraph=True, backend="aot_eager")(x)
    loss.backward()
    ga, gb = a.grad.clone(), b.grad.clone()
    a.grad = b.grad = None
    step(x).backward()
    torch.testing.assert_close(ga, a.grad)
    torch.testing.assert_close(gb, b.grad)


# ------------------------------------------------------------------------------------------------
# layers: FusedLoraLinear4bit, get_lora_model, fuse, against PEFT's lora.bnb.Linear4bit
# ------------------------------------------------------------------------------------------------


def _linear4bit(k, n, *, bias=True, compute_dtype=torch.float32, quant_type="nf4"):
    dense = nn.Linear(k, n, bias=bias)
    layer = bnb.nn.Linear4bit(k, n, bias=bias, compute_dtype=compute_dtype, quant_type=quant_type)
    layer.load_state_dict(dense.state_dict())
    return layer.to(DEVICE)  # bitsandbytes quantizes on the move


class _Block(nn.Module):
    def __init__(self, k=40, n=24, compute_dtype=torch.float32):
        super().__init__()
        self.q_proj = _linear4bit(k, n, compute_dtype=compute_dtype)
        self.v_proj = _linear4bit(n, k, bias=False, compute_dtype=compute_dtype)

    def forward(self, x):
        return self.v_proj(torch.relu(self.q_proj(x)))


def _peft_model(block, **config):
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False, **config)
    # what transformers records on a model it quantized: PEFT then makes lora.bnb.Linear4bit layers
    block.is_loaded_in_4bit = True
    return peft.get_peft_model(block, cfg)


def test_fused_layer_adapter_api_and_state_dict():
    base = _linear4bit(40, 24)
    layer = lk.FusedLoraLinear.from_linear(base, r=4, lora_alpha=8, init_lora_weights=False)
    assert isinstance(layer, lk.FusedLoraLinear4bit)
    assert layer.weight is base.weight  # shared, never repacked
    assert layer.lora_A["default"].weight.dtype == torch.float32
    layer.add_adapter("other", 6, 12, init_lora_weights=False)
    x = torch.randn(5, 40)
    w = bnbF.dequantize_4bit(base.weight, base.weight.quant_state)
    for name in ("default", "other"):
        layer.set_adapter(name)
        a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
        expect = F.linear(x, w, base.bias) + 2.0 * (x @ a.T) @ b.T
        torch.testing.assert_close(layer(x), expect, rtol=1e-5, atol=1e-5)
    # rows with different adapters in one batch, as PEFT's adapter_names
    names = ["default", "__base__", "other", "default", "other"]
    rows = []
    for i, name in enumerate(names):
        layer.set_adapter(None if name == "__base__" else name)
        rows.append(layer(x[i : i + 1]))
    torch.testing.assert_close(layer(x, adapter_names=names), torch.cat(rows), rtol=1e-5,
                               atol=1e-5)  # fmt: skip
    layer.delete_adapter("other")
    assert layer.adapter_names == ["default"]
    # Linear4bit's state_dict keys, plus the adapters'; a load restores the packed weight
    keys = set(layer.state_dict())
    assert set(base.state_dict()) <= keys
    fresh = lk.FusedLoraLinear.from_linear(_linear4bit(40, 24), r=4, lora_alpha=8)
    fresh.load_state_dict(layer.state_dict())
    layer.set_adapter("default")
    torch.testing.assert_close(fresh(x), layer(x))


def test_merge_is_peft_lossy_requantization_and_exact_is_refused():
    base = _linear4bit(40, 24)
    layer = lk.FusedLoraLinear.from_linear(base, r=4, lora_alpha=8, init_lora_weights=False)
    with pytest.raises(ValueError, match="exact=True is not possible on a 4-bit base"):
        layer.merge(exact=True)
    x = torch.randn(5, 40)
    y = layer(x)
    w = bnbF.dequantize_4bit(base.weight, base.weight.quant_state)
    delta = 2.0 * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    layer.merge()
    assert layer.merged
    requant = bnbF.quantize_4bit(w + delta, blocksize=64, compress_statistics=True,
                                 quant_type="nf4")  # fmt: skip
    torch.testing.assert_close(
        lk.dequantize_4bit(layer.weight, layer.quant_state), bnbF.dequantize_4bit(*requant)
    )
    torch.testing.assert_close(layer(x), F.linear(x, bnbF.dequantize_4bit(*requant), base.bias))
    # the refusals name the 4-bit class, not the 16-bit one whose loop they share
    with pytest.raises(RuntimeError, match=r"^FusedLoraLinear4bit\.merge: adapter 'default' is"):
        layer.merge()
    layer.unmerge()
    assert not layer.merged
    assert (layer(x) - y).abs().max() < 0.5 * y.abs().max()  # lossy, but the same layer
    with pytest.raises(ValueError, match=r"^FusedLoraLinear4bit\.set_adapter: unknown adapter"):
        layer.set_adapter("missing")


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_get_lora_model_matches_peft_qlora(compute_dtype):
    """Same base, same adapter weights: our layers and PEFT's lora.bnb.Linear4bit give the same
    outputs and gradients, and stay together over a few SGD steps."""
    block = _Block(compute_dtype=compute_dtype)
    ours = copy.deepcopy(block)
    peft_model = _peft_model(block, r=4, lora_alpha=8)
    ours = lk.get_lora_model(
        ours, lk.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    assert isinstance(ours.q_proj, lk.FusedLoraLinear4bit)
    for name in ("q_proj", "v_proj"):
        theirs = peft_model.base_model.model.get_submodule(name)
        for table in ("lora_A", "lora_B"):
            getattr(ours.get_submodule(name), table)["default"].weight.data.copy_(
                getattr(theirs, table)["default"].weight.data
            )
    x = torch.randn(6, 40).to(compute_dtype)
    tol = (
        {"rtol": 1e-4, "atol": 1e-4}
        if compute_dtype == torch.float32
        else {"rtol": 0.05, "atol": 0.05}
    )
    params = lambda m: [p for n, p in m.named_parameters() if p.requires_grad]  # noqa: E731
    opt_ours = torch.optim.SGD(params(ours), lr=0.05)
    opt_peft = torch.optim.SGD(params(peft_model), lr=0.05)
    assert len(params(ours)) == len(params(peft_model)) == 4
    for _ in range(3):
        for opt in (opt_ours, opt_peft):
            opt.zero_grad()
        y_ours, y_peft = ours(x), peft_model(x)
        torch.testing.assert_close(y_ours, y_peft, **tol)
        y_ours.float().square().mean().backward()
        y_peft.float().square().mean().backward()
        for p, q in zip(params(ours), params(peft_model), strict=True):
            torch.testing.assert_close(p.grad, q.grad, **tol)
        opt_ours.step()
        opt_peft.step()
    merged = lk.merge_and_unload(ours)
    assert type(merged.q_proj) is bnb.nn.Linear4bit


def _count_kernel_calls(monkeypatch, module, name="qlora_linear"):
    """Count the fused kernel's calls from ``module`` (so a silent fallback to PEFT fails)."""
    calls = {"n": 0}
    kernel = getattr(module, name)

    def counted(*args, **kwargs):
        calls["n"] += 1
        return kernel(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_fuse_matches_peft_qlora_training(compute_dtype, monkeypatch):
    from lora_kernels.integrations import peft_qlora
    from lora_kernels.integrations.peft import fuse, unfuse

    calls = _count_kernel_calls(monkeypatch, peft_qlora)

    model = _peft_model(_Block(compute_dtype=compute_dtype), r=4, lora_alpha=8)
    ref = copy.deepcopy(model)
    fuse(model)
    q_proj = model.base_model.model.q_proj
    assert type(q_proj).__name__ == "FusedPeftLinear4bit"
    assert repr(q_proj).startswith("lora.Linear4bit(")
    x = torch.randn(6, 40).to(compute_dtype)
    tol = (
        {"rtol": 1e-4, "atol": 1e-4}
        if compute_dtype == torch.float32
        else {"rtol": 0.05, "atol": 0.05}
    )
    params = lambda m: [p for p in m.parameters() if p.requires_grad]  # noqa: E731
    opts = [torch.optim.SGD(params(m), lr=0.05) for m in (model, ref)]
    for _ in range(3):
        for opt in opts:
            opt.zero_grad()
        y, y_ref = model(x), ref(x)
        torch.testing.assert_close(y, y_ref, **tol)
        y.float().square().mean().backward()
        y_ref.float().square().mean().backward()
        for p, q in zip(params(model), params(ref), strict=True):
            torch.testing.assert_close(p.grad, q.grad, **tol)
        for opt in opts:
            opt.step()
    assert calls["n"] == 3 * 2  # every forward of both layers ran the fused kernel
    # adapter_names batches run on the kernels too (dequantize + lora_linear_multi), never on
    # bitsandbytes' CPU GEMM; the reference is kept off that GEMM's AVX-512 repacking (which
    # needs N divisible by 32), so it computes the same on every CPU
    mixed = _count_kernel_calls(monkeypatch, peft_qlora, "mixed_linear_forward")
    for m in ref.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    model.eval()
    ref.eval()
    with torch.no_grad():
        names = ["default", "__base__"] * 3
        torch.testing.assert_close(model(x, adapter_names=names), ref(x, adapter_names=names),
                                   **tol)  # fmt: skip
    assert mixed["n"] == 2
    unfuse(model)
    assert type(q_proj).__name__ == "Linear4bit"


def test_fuse_tiny_llama_quantized_with_bitsandbytes(monkeypatch):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from lora_kernels.integrations import peft_qlora
    from lora_kernels.integrations.peft import fuse

    calls = _count_kernel_calls(monkeypatch, peft_qlora)

    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg).eval()
    for name, module in list(model.model.named_modules()):
        if type(module) is nn.Linear:
            q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=False,
                                  compute_dtype=torch.float32, quant_type="nf4")  # fmt: skip
            q.load_state_dict(module.state_dict())
            parent, _, child = name.rpartition(".")
            setattr(model.model.get_submodule(parent), child, q.to(DEVICE))
    model.is_loaded_in_4bit = True  # as transformers' from_pretrained(quantization_config=...)
    config = peft.LoraConfig(target_modules=["q_proj", "v_proj", "up_proj"], r=4,
                             init_lora_weights=False)  # fmt: skip
    model = peft.get_peft_model(model, config)
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        expect = model(ids).logits
        fuse(model)
        fused = [m for m in model.modules() if type(m).__name__ == "FusedPeftLinear4bit"]
        assert len(fused) == 6
        torch.testing.assert_close(model(ids).logits, expect, rtol=1e-4, atol=1e-4)
    assert calls["n"] == 6


def test_fresh_import_skips_bitsandbytes():
    """In a child process: importing the package does not import bitsandbytes. (The kernels'
    builds for sm_80 and sm_90 are checked by the compile gate, tests/test_triton_compile.py.)"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = "import sys, lora_kernels; assert 'bitsandbytes' not in sys.modules, 'imported'"
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
