"""Every argument of the Triton ``lora_linear``, ``lora_linear_multi`` and ``merge_lora_`` read
through its strides: strided, transposed, offset and expanded views through the public API.

Each case replaces one argument by a view of the same values with another memory layout and
compares the Triton backend with the torch backend on plain contiguous copies, under the rule of
``tests/tolerances.py`` (fp64 truth from the torch backend in fp64). Forward and every gradient:
the gradient of each view is the kernel's own output for it, before autograd sums it into the
view's base. The views:

* ``strided``: every dimension has twice its contiguous stride (for a vector that is the column
  of a two-column table, ``table[:, 0]``); the skipped elements hold other values (for ids, valid
  ids of other adapters; for ranks, zero), so a contiguous read gives a wrong answer.
* ``transposed``: the last two dimensions swapped in memory (``t.T.contiguous().T``).
* ``offset``: the values start 3 elements into their storage (``storage_offset() == 3``).
* ``expanded``: stride 0 along the first dimension (``torch.tensor(0.5).expand(N)`` for a bias).
"""

from __future__ import annotations

import pytest
import torch

import lora_kernels as lk
from lora_kernels.backends.triton import HAS_TRITON, interpreting
from tests.tolerances import assert_close_to_ref

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="needs triton")

if HAS_TRITON:
    from lora_kernels.backends.triton import lora_multi as _triton_multi

DEVICE = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
DTYPE = torch.float16
KINDS = ["strided", "transposed", "offset", "expanded"]


def _filler(t: torch.Tensor) -> torch.Tensor:
    """Values for the storage a view skips: large random values (integers: ``view_as`` fills
    ``int_filler``)."""
    if t.is_floating_point():
        return (torch.randn(t.shape, device=t.device) * 100).to(t.dtype)
    return torch.zeros_like(t)


def view_as(kind: str, t: torch.Tensor, *, int_filler: int = 0, grad: bool = True) -> torch.Tensor:
    """A tensor equal to ``t`` (``expanded``: equal to ``t``'s first slice repeated) laid out as
    ``kind`` says. The result is a view of a fresh base; floating views are non-leaf tensors that
    keep their gradient (``view.grad``)."""
    t = t.detach()
    floating = grad and t.is_floating_point()
    if kind == "strided":
        base = _filler(torch.empty([2 * d for d in t.shape], dtype=t.dtype, device=t.device))
        if not t.is_floating_point():
            base.fill_(int_filler)
        base[tuple(slice(None, None, 2) for _ in t.shape)] = t
        base.requires_grad_(floating)
        view = base[tuple(slice(None, None, 2) for _ in t.shape)]
    elif kind == "transposed":
        assert t.dim() >= 2
        base = t.transpose(-1, -2).contiguous().requires_grad_(floating)
        view = base.transpose(-1, -2)
    elif kind == "offset":
        base = _filler(torch.empty(t.numel() + 3, dtype=t.dtype, device=t.device))
        if not t.is_floating_point():
            base.fill_(int_filler)
        base[3:] = t.flatten()
        base.requires_grad_(floating)
        view = base[3:].view(t.shape)
        assert view.storage_offset() == 3
    elif kind == "expanded":
        base = t[0].clone().requires_grad_(floating)
        view = base.expand(t.shape)
        assert view.stride(0) == 0
    else:
        raise ValueError(kind)
    if floating:
        view.retain_grad()
    return view


# Floating arguments that take no gradient.
NO_GRAD = {"scales"}


def _plain(name: str, t: torch.Tensor | None, dtype=None) -> torch.Tensor | None:
    """A contiguous leaf copy of ``t``'s values (floating ones in ``dtype``, with a grad unless
    ``name`` takes none)."""
    if t is None:
        return None
    c = t.detach().clone(memory_format=torch.contiguous_format)
    if c.is_floating_point():
        c = c.to(dtype or c.dtype).requires_grad_(name not in NO_GRAD)
    return c


def _run(fn, args: dict, dy: torch.Tensor, backend: str):
    """``fn(**args, backend=backend)``, its backward for ``dy``, and each floating arg's grad."""
    y = fn(**args, backend=backend)
    y.backward(dy.to(y.dtype))
    grads = {name: v.grad for name, v in args.items() if name not in NO_GRAD and v is not None}
    grads = {name: g for name, g in grads.items() if args[name].is_floating_point()}
    return y.detach(), grads


def _compare(fn, inputs: dict, dy: torch.Tensor):
    """The Triton backend on ``inputs`` (views included) against the torch backend on contiguous
    copies, in fp64 (truth) and in the inputs' dtype (the tolerance's baseline)."""
    y, grads = _run(fn, inputs, dy, "triton")
    truth = {k: _plain(k, v, torch.float64) for k, v in inputs.items()}
    y64, grads64 = _run(fn, truth, dy, "torch")
    same = {k: _plain(k, v) for k, v in inputs.items()}
    y_base, grads_base = _run(fn, same, dy, "torch")
    assert_close_to_ref("y", y, y64, y_base)
    assert grads.keys() == grads64.keys()
    for name, g in grads.items():
        assert g is not None, name
        assert_close_to_ref(f"d{name}", g, grads64[name], grads_base[name])


# --------------------------------------------------------------------------------------------
# lora_linear
# --------------------------------------------------------------------------------------------

LINEAR_ARGS = ["x", "weight", "bias", "lora_a", "lora_b", "x_lora"]
_VECTORS = {"bias"}


def _linear_cases(names, vectors):
    for name in names:
        for kind in KINDS:
            if kind == "transposed" and name in vectors:
                continue
            yield pytest.param(name, kind, id=f"{name}-{kind}")


def _lora_linear(*, x, weight, bias, lora_a, lora_b, x_lora, backend):
    return lk.lora_linear(x, weight, bias, lora_a, lora_b, 0.75, x_lora=x_lora, backend=backend)


# rank 4: S accumulated inside the GEMM's K-loop; rank 40: S from its own launch
@pytest.mark.parametrize("rank", [4, 40], ids=["fused-S", "separate-S"])
@pytest.mark.parametrize("name, kind", list(_linear_cases(LINEAR_ARGS, _VECTORS)))
def test_lora_linear_reads_every_argument_through_its_strides(name, kind, rank):
    m, k, n = 5, 24, 20
    inputs = {
        "x": torch.randn(m, k),
        "weight": torch.randn(n, k) / k**0.5,
        "bias": torch.randn(n),
        "lora_a": torch.randn(rank, k) / k**0.5,
        "lora_b": torch.randn(n, rank) / rank**0.5,
        "x_lora": torch.randn(m, k),
    }
    inputs = {key: v.to(DTYPE).to(DEVICE) for key, v in inputs.items()}
    inputs = {key: v if key == name else _plain(key, v) for key, v in inputs.items()}
    inputs[name] = view_as(kind, inputs[name])
    _compare(_lora_linear, inputs, torch.randn(m, n, device=DEVICE))


def test_expanded_scalar_bias():
    """The issue's case: a bias that is one value expanded over N (stride 0)."""
    m, k, n, r = 3, 16, 18, 4
    x, w = torch.randn(m, k, dtype=DTYPE), torch.randn(n, k, dtype=DTYPE) / 4
    a, b = torch.randn(r, k, dtype=DTYPE) / 4, torch.randn(n, r, dtype=DTYPE) / 2
    bias = torch.tensor(0.5, dtype=DTYPE).expand(n)
    y = lk.lora_linear(x, w, bias, a, b, 0.75, backend="triton")
    y_torch = lk.lora_linear(x, w, bias.contiguous(), a, b, 0.75, backend="torch")
    torch.testing.assert_close(y, y_torch, rtol=2e-3, atol=2e-3)


# --------------------------------------------------------------------------------------------
# lora_linear_multi
# --------------------------------------------------------------------------------------------

MULTI_ARGS = ["x", "weight", "bias", "lora_a", "lora_b", "scales", "adapter_ids", "ranks"]
_MULTI_VECTORS = {"bias", "scales", "adapter_ids", "ranks"}
NUM_ADAPTERS, R_MAX = 3, 8


def _lora_linear_multi(*, x, weight, bias, lora_a, lora_b, scales, adapter_ids, ranks, backend):
    return lk.lora_linear_multi(
        x, weight, bias, lora_a, lora_b, scales, adapter_ids, ranks=ranks, backend=backend
    )


@pytest.mark.parametrize("strategy", ["gather", "grouped"])
@pytest.mark.parametrize("name, kind", list(_linear_cases(MULTI_ARGS, _MULTI_VECTORS)))
def test_lora_linear_multi_reads_every_argument_through_its_strides(
    monkeypatch, name, kind, strategy
):
    monkeypatch.setattr(_triton_multi, "choose_strategy", lambda m, num_adapters: strategy)
    m, k, n = 7, 24, 20
    ids = torch.tensor([2, 0, -1, 1, 2, 2, 0])
    ranks = torch.tensor([8, 5, 3], dtype=torch.int32)
    lora_a = torch.randn(NUM_ADAPTERS, R_MAX, k) / k**0.5
    lora_b = torch.randn(NUM_ADAPTERS, n, R_MAX) / R_MAX**0.5
    inputs = {
        "x": torch.randn(m, k).to(DTYPE),
        "weight": (torch.randn(n, k) / k**0.5).to(DTYPE),
        "bias": torch.randn(n).to(DTYPE),
        "lora_a": lora_a.to(DTYPE),
        "lora_b": lora_b.to(DTYPE),
        "scales": torch.tensor([0.5, 2.0, 1.25]),
        "adapter_ids": ids,
        "ranks": ranks,
    }
    if kind == "expanded" and name in ("adapter_ids", "ranks", "scales"):
        # the expanded vector repeats its first value: make that one an adapter with rows, and a
        # rank below r_max, so that a wrong read still shows
        inputs["adapter_ids"] = (
            torch.tensor([1, 0, -1, 1, 2, 2, 0]) if name != "adapter_ids" else ids
        )
        inputs["ranks"] = torch.tensor([5, 8, 3], dtype=torch.int32)
    inputs = {key: v.to(DEVICE) for key, v in inputs.items()}
    inputs = {key: v if key == name else _plain(key, v) for key, v in inputs.items()}
    # a skipped id slot holds adapter 1, a skipped rank slot 0: a contiguous read is wrong
    filler = 1 if name == "adapter_ids" else 0
    inputs[name] = view_as(kind, inputs[name], int_filler=filler, grad=name not in NO_GRAD)
    _compare(_lora_linear_multi, inputs, torch.randn(m, n, device=DEVICE))


# --------------------------------------------------------------------------------------------
# merge_lora_
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, kind",
    [
        pytest.param(name, kind, id=f"{name}-{kind}")
        for name in ("weight", "lora_a", "lora_b")
        for kind in KINDS
        # an expanded weight cannot be written in place (its elements share memory)
        if not (name == "weight" and kind == "expanded")
    ],
)
def test_merge_reads_every_argument_through_its_strides(name, kind):
    n, k, r = 20, 36, 5
    t = {
        "weight": torch.randn(n, k, dtype=DTYPE, device=DEVICE),
        "lora_a": torch.randn(r, k, dtype=DTYPE, device=DEVICE),
        "lora_b": torch.randn(n, r, dtype=DTYPE, device=DEVICE),
    }
    view = view_as(kind, t[name], grad=False)
    t[name] = view
    storage = view._base.clone()
    expected = t["weight"].double() + 0.75 * (t["lora_b"].double() @ t["lora_a"].double())
    baseline = lk.merge_lora_(
        t["weight"].clone(), t["lora_a"].clone(), t["lora_b"].clone(), 0.75, backend="torch"
    )
    out = lk.merge_lora_(t["weight"], t["lora_a"], t["lora_b"], 0.75, backend="triton")
    assert out is t["weight"]
    assert_close_to_ref("weight", out, expected, baseline)
    if name == "weight" and kind in ("strided", "offset"):
        # the storage between and before the view's elements is left alone
        outside = torch.ones_like(storage, dtype=torch.bool)
        if kind == "strided":
            outside[::2, ::2] = False
        else:
            outside[3:] = False
        assert torch.equal(view._base[outside], storage[outside])
    elif name != "weight":
        assert torch.equal(view._base, storage)
