"""The torch.library ops: opcheck (schema, fake impl, autograd registration), torch.compile, and
every differentiable family built one way (``define_family``)."""

from __future__ import annotations

import importlib
import pkgutil

import pytest
import torch

import lora_kernels as lk
from lora_kernels import ops, reference
from lora_kernels.backends.triton import HAS_TRITON

BACKENDS = ["torch"] + (["triton"] if HAS_TRITON else [])


def _inputs(m=5, k=12, n=10, r=4, dtype=torch.float32, bias=True, x_lora=False, grad=True):
    x = torch.randn(m, k, dtype=dtype, requires_grad=grad)
    w = torch.randn(n, k, dtype=dtype)
    b = torch.randn(n, dtype=dtype) if bias else None
    a = torch.randn(r, k, dtype=dtype, requires_grad=grad)
    bb = torch.randn(n, r, dtype=dtype, requires_grad=grad)
    xl = torch.randn(m, k, dtype=dtype, requires_grad=grad) if x_lora else None
    return x, w, b, a, bb, xl


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("x_lora", [False, True])
def test_opcheck_lora_linear_fwd(backend, bias, x_lora):
    x, w, b, a, bb, xl = _inputs(bias=bias, x_lora=x_lora)
    torch.library.opcheck(
        torch.ops.lora_kernels.lora_linear_fwd, (x, w, b, a, bb, 0.5, xl, backend)
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("needs", [(True, True, True), (False, True, False), (True, False, True)])
def test_opcheck_lora_linear_bwd(backend, needs):
    x, w, _, a, bb, _ = _inputs(grad=False)
    dy = torch.randn(x.shape[0], w.shape[0])
    s = (x @ a.T).float()
    torch.library.opcheck(
        torch.ops.lora_kernels.lora_linear_bwd,
        (dy, x, w, a, bb, s, 0.5, None, *needs, backend),
    )


def test_opcheck_merge():
    w = torch.randn(10, 12)
    a, b = torch.randn(4, 12), torch.randn(10, 4)
    torch.library.opcheck(torch.ops.lora_kernels.merge_lora_, (w, a, b, 0.25, "torch"))


def test_compile_fullgraph_forward_backward():
    layer = lk.FusedLoraLinear(24, 16, r=4, lora_alpha=8, init_lora_weights=False)
    layer.train()
    x = torch.randn(3, 5, 24, requires_grad=True)

    def step(x):
        return layer(x).square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(x)
    loss.backward()
    got = (x.grad.clone(), layer.lora_A["default"].weight.grad.clone())
    x.grad = None
    layer.zero_grad()
    step(x).backward()
    torch.testing.assert_close(loss, step(x))
    torch.testing.assert_close(got[0], x.grad)
    torch.testing.assert_close(got[1], layer.lora_A["default"].weight.grad)


def test_compile_inductor_forward_backward():
    layer = lk.FusedLoraLinear(16, 8, r=2, init_lora_weights=False)
    x = torch.randn(4, 16, requires_grad=True)
    compiled = torch.compile(lambda x: layer(x).sum(), fullgraph=True)
    compiled(x).backward()
    ref = x.grad.clone()
    x.grad = None
    layer(x).sum().backward()
    torch.testing.assert_close(ref, x.grad)


# --------------------------------------------------------------------------------------------
# Every differentiable family is built one way (ops/_family.py's define_family)
# --------------------------------------------------------------------------------------------

ENTRIES = {
    "lora_linear": ops.lora_linear_2d,
    "lora_linear_multi": ops.lora_linear_multi_2d,
    "lora_embedding": ops.lora_embedding_1d,
    "dora_linear": ops.dora_linear_2d,
    "qlora_linear": ops.qlora_linear_2d,
}


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_every_differentiable_family_is_built_by_define_family(name):
    entry = ENTRIES[name]
    for op, suffix in ((entry.fwd_op, "fwd"), (entry.bwd_op, "bwd")):
        assert isinstance(op, torch._library.custom_ops.CustomOpDef)
        assert op._qualname == f"lora_kernels::{name}_{suffix}"
        assert getattr(torch.ops.lora_kernels, f"{name}_{suffix}") is not None
    assert issubclass(entry.eager, torch.autograd.Function)
    assert entry.eager.__name__ == f"{name}_eager"


@pytest.mark.parametrize("module", sorted(m.name for m in pkgutil.iter_modules(ops.__path__)))
def test_no_op_module_writes_its_own_autograd_function(module):
    mod = importlib.import_module(f"{ops.__name__}.{module}")
    own = [
        v
        for v in vars(mod).values()
        if isinstance(v, type)
        and issubclass(v, torch.autograd.Function)
        and v.__module__ == mod.__name__
    ]
    assert own == []


def _graph_names(t: torch.Tensor) -> set[str]:
    names, todo = set(), [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node.name() in names:
            continue
        names.add(node.name())
        todo.extend(n for n, _ in node.next_functions)
    return names


def _quant4bit(n, k, blocksize=64):
    """A 4-bit weight in bitsandbytes' layout made by hand: random codes and block maxima."""
    q = lk.functional.Quant4bit(
        absmax=torch.rand(-(-n * k // blocksize)) + 0.5,
        code=torch.linspace(-1.0, 1.0, 16),
        blocksize=blocksize,
        shape=(n, k),
    )
    return torch.randint(0, 256, ((n * k + 1) // 2,), dtype=torch.uint8), q


@pytest.mark.parametrize("backend", BACKENDS)
def test_qlora_trains_through_its_function_on_every_backend(backend):
    """QLoRA's eager entry is the family's Function on the torch backend too: stock autograd of
    dequantize-then-multiply would keep the dequantized weight alive until the backward."""
    n, k, r = 12, 20, 4
    qweight, q = _quant4bit(n, k)
    x, a, b = (torch.randn(s, requires_grad=True) for s in ((5, k), (r, k), (n, r)))
    bias = torch.randn(n, requires_grad=True)
    y = lk.qlora_linear(x, qweight, q, bias, a, b, 0.5, backend=backend)
    names = _graph_names(y)
    assert "qlora_linear_eagerBackward" in names
    assert not any(n.startswith(("Addmm", "Mm")) for n in names), names
    y.square().sum().backward()
    w = lk.dequantize_4bit(qweight, q, torch.float32)
    leaves = [t.detach().double().requires_grad_() for t in (x, bias, a, b)]
    ref = reference.lora_linear(leaves[0], w.double(), leaves[1], leaves[2], leaves[3], 0.5)
    ref.square().sum().backward()
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4)
    for got, want in zip((x, bias, a, b), leaves, strict=True):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dora_runs_stock_autograd_on_torch_and_its_function_on_kernels(backend):
    x, w, bias, a, b, _ = _inputs()
    magnitude = torch.rand(w.shape[0]) + 0.5
    magnitude.requires_grad_()
    y = lk.dora_linear(x, w, bias, a, b, magnitude, 0.5, backend=backend)
    names = _graph_names(y)
    assert ("dora_linear_eagerBackward" in names) == (backend != "torch"), names
    y.sum().backward()
    assert magnitude.grad is not None and a.grad is not None
