"""The torch.library ops: opcheck (schema, fake impl, autograd registration) and torch.compile."""

from __future__ import annotations

import pytest
import torch

import lora_kernels as lk
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
