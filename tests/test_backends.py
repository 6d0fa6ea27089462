"""Backend folders and dispatch: every family's module in every backend follows its protocol, and
the CUDA-to-Triton hand-over is decided in one visible place (``backends.serving_backend``)."""

from __future__ import annotations

import inspect

import pytest
import torch

from lora_kernels import backends
from lora_kernels.backends.triton import HAS_TRITON, interpreting

FAMILIES = {
    "lora_linear": backends.LoraLinearLaunchers,
    "lora_multi": backends.LoraMultiLaunchers,
    "merge": backends.MergeLaunchers,
}


def _protocol_methods(protocol) -> dict[str, inspect.Signature]:
    names = [n for n, v in vars(protocol).items() if inspect.isfunction(v) and n[0] != "_"]
    return {n: inspect.signature(getattr(protocol, n)) for n in names}


def _params(sig: inspect.Signature) -> list[tuple[str, object]]:
    return [(p.name, p.kind) for p in sig.parameters.values() if p.name != "self"]


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_backend_modules_follow_the_family_protocol(backend, family):
    if backend == "triton" and not HAS_TRITON:
        pytest.skip("triton is not installed")
    mod = backends.backend_module(backend, family)
    for name, want in _protocol_methods(FAMILIES[family]).items():
        fn = getattr(mod, name)
        got = _params(inspect.signature(fn))
        # A backend may take extra keyword-only tuning arguments after the protocol's own.
        assert got[: len(_params(want))] == _params(want), (backend, family, name)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_cuda_modules_follow_the_protocol_where_they_serve(family):
    """The CUDA backend serves a subset (no backward): what it has keeps the signature, and every
    launcher has a ``supports_`` twin with the same arguments."""
    mod = backends.backend_module("cuda", family)
    served = 0
    for name, want in _protocol_methods(FAMILIES[family]).items():
        fn = getattr(mod, name, None)
        if fn is None:
            continue
        served += 1
        assert _params(inspect.signature(fn)) == _params(want), (family, name)
        supports = getattr(mod, f"supports_{name}")
        assert _params(inspect.signature(supports)) == _params(want), (family, name)
    assert served >= 1


def test_dispatch_is_by_module_name():
    assert backends.backend_module("torch", "merge").__name__ == "lora_kernels.backends.torch.merge"
    fn = backends.launcher("torch", "lora_linear", "lora_linear_fwd")
    assert fn is backends.backend_module("torch", "lora_linear").lora_linear_fwd


def test_cuda_hands_over_to_triton_where_it_does_not_serve():
    x = torch.randn(4, 16, dtype=torch.float16)
    w = torch.randn(8, 16, dtype=torch.float16)
    a = torch.randn(4, 16, dtype=torch.float16)
    b = torch.randn(8, 4, dtype=torch.float16)
    args = (x, w, None, a, b, 1.0, None)
    # No backward launcher in the CUDA backend: Triton runs it.
    assert backends.serving_backend("cuda", "lora_linear", "lora_linear_bwd") == "triton"
    # CPU tensors are never served by the CUDA kernels (they need an sm_80+ GPU).
    assert backends.serving_backend("cuda", "lora_linear", "lora_linear_fwd", *args) == "triton"
    assert backends.serving_backend("cuda", "merge", "merge_", w, a, b, 1.0) == "triton"
    # Other backends serve every call they are given.
    for be in ("torch", "triton"):
        assert backends.serving_backend(be, "lora_linear", "lora_linear_fwd", *args) == be


def test_cuda_serves_a_supported_call(monkeypatch):
    """Where ``supports_<name>`` says yes, the CUDA launcher is the one dispatched."""
    mod = backends.backend_module("cuda", "lora_linear")
    monkeypatch.setattr(mod, "supports_lora_linear_fwd", lambda *args: True)
    assert backends.serving_backend("cuda", "lora_linear", "lora_linear_fwd") == "cuda"
    assert backends.launcher("cuda", "lora_linear", "lora_linear_fwd") is mod.lora_linear_fwd


def test_kernel_backends_refuse_float64_adapter_factors():
    w = torch.randn(8, 16, dtype=torch.float16)
    a = torch.randn(4, 16, dtype=torch.float64)
    assert backends.resolve_backend("auto", w, 4, a) == "torch"
    if HAS_TRITON and interpreting():  # CPU tensors reach the dtype check only then
        with pytest.raises(ValueError, match="float32 operands, got torch.float64"):
            backends.resolve_backend("triton", w, 4, a)
