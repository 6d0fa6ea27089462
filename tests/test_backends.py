"""Backend folders and dispatch: every family's module in every backend follows its protocol,
one table says which module implements a family on a backend, and the one place that picks a
launcher (``backends.launcher``) says what it picked (``last_dispatch``, a one-time debug log)."""

from __future__ import annotations

import importlib
import inspect
import logging
import pkgutil
import threading

import pytest
import torch

import lora_kernels as lk
from lora_kernels import backends
from lora_kernels.backends.triton import HAS_TRITON, interpreting

FAMILIES = ("lora_linear", "lora_multi", "merge", "lora_embedding", "dora", "qlora")
KERNEL_BACKENDS = ("torch", "triton")


def _protocol_methods(protocol) -> dict[str, inspect.Signature]:
    names = [n for n, v in vars(protocol).items() if inspect.isfunction(v) and n[0] != "_"]
    return {n: inspect.signature(getattr(protocol, n)) for n in names}


def _params(sig: inspect.Signature) -> list[tuple[str, object]]:
    return [(p.name, p.kind) for p in sig.parameters.values() if p.name != "self"]


def test_every_family_has_a_protocol_and_a_torch_and_triton_module():
    assert set(FAMILIES) <= set(backends.PROTOCOLS)
    assert tuple(backends.PROTOCOLS) == backends.FAMILIES
    assert {f for f, _ in backends.IMPLEMENTATIONS} == set(backends.PROTOCOLS)
    for family in backends.FAMILIES:
        assert _protocol_methods(backends.PROTOCOLS[family]), family
        for be in KERNEL_BACKENDS:
            assert (family, be) in backends.IMPLEMENTATIONS, (family, be)
    assert {be for _, be in backends.IMPLEMENTATIONS} <= set(backends.BACKENDS)


@pytest.mark.parametrize("backend", backends.BACKENDS)
def test_the_table_lists_every_family_module_of_a_backend_folder(backend):
    """No module a string could reach that the table does not name, and no row without its
    module: a family module added to a folder must be registered to be dispatched."""
    package = importlib.import_module(f"lora_kernels.backends.{backend}")
    modules = {m.name for m in pkgutil.iter_modules(package.__path__) if m.name[0] != "_"}
    modules.discard("build")  # backends/cuda/build.py: the extension's build, not a family
    listed = {f for f, be in backends.IMPLEMENTATIONS if be == backend}
    assert modules - listed == set(), "family modules missing from backends.IMPLEMENTATIONS"
    assert listed - modules == set(), "backends.IMPLEMENTATIONS rows without a module"
    for family in listed:
        assert backends.IMPLEMENTATIONS[(family, backend)] == f"{package.__name__}.{family}"


@pytest.mark.parametrize("family", backends.FAMILIES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_backend_modules_follow_the_family_protocol(backend, family):
    if backend == "triton" and not HAS_TRITON:
        pytest.skip("triton is not installed")
    mod = backends.backend_module(backend, family)
    methods = _protocol_methods(backends.PROTOCOLS[family])
    for name, want in methods.items():
        fn = getattr(mod, name, None)
        assert callable(fn), f"{mod.__name__} has no launcher {name}"
        got = _params(inspect.signature(fn))
        # A backend may take extra keyword-only tuning arguments after the protocol's own.
        assert got[: len(_params(want))] == _params(want), (backend, family, name)
        extra = got[len(_params(want)) :]
        assert all(kind is inspect.Parameter.KEYWORD_ONLY for _, kind in extra), (family, name)


@pytest.mark.parametrize("family", sorted(f for f, be in backends.IMPLEMENTATIONS if be == "cuda"))
def test_cuda_modules_follow_the_protocol_where_they_serve(family):
    """The CUDA backend serves a subset (no backward): what it has keeps the signature, and every
    launcher has a ``supports_`` twin with the same arguments."""
    mod = backends.backend_module("cuda", family)
    served = 0
    for name, want in _protocol_methods(backends.PROTOCOLS[family]).items():
        fn = getattr(mod, name, None)
        if fn is None:
            continue
        served += 1
        assert _params(inspect.signature(fn)) == _params(want), (family, name)
        supports = getattr(mod, f"supports_{name}")
        assert _params(inspect.signature(supports)) == _params(want), (family, name)
    assert served >= 1


def test_dispatch_is_by_the_table():
    assert backends.backend_module("torch", "merge").__name__ == "lora_kernels.backends.torch.merge"
    fn = backends.launcher("torch", "lora_linear", "lora_linear_fwd")
    assert fn is backends.backend_module("torch", "lora_linear").lora_linear_fwd
    with pytest.raises(LookupError, match="no cuda implementation of the dora kernel family"):
        backends.backend_module("cuda", "dora")


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
    # Families the extension has no kernels for.
    for family, name in (("dora", "dora_linear_fwd"), ("qlora", "qlora_linear_fwd"),
                         ("lora_embedding", "lora_embedding_fwd")):  # fmt: skip
        assert backends.serving_backend("cuda", family, name) == "triton"
    # Other backends serve every call they are given.
    for be in KERNEL_BACKENDS:
        assert backends.serving_backend(be, "lora_linear", "lora_linear_fwd", *args) == be


def test_cuda_serves_a_supported_call(monkeypatch):
    """Where ``supports_<name>`` says yes, the CUDA launcher is the one dispatched."""
    mod = backends.backend_module("cuda", "lora_linear")
    monkeypatch.setattr(mod, "supports_lora_linear_fwd", lambda *args: True)
    assert backends.serving_backend("cuda", "lora_linear", "lora_linear_fwd") == "cuda"
    assert backends.launcher("cuda", "lora_linear", "lora_linear_fwd") is mod.lora_linear_fwd
    assert lk.last_dispatch() == ("lora_linear", "lora_linear_fwd", "cuda", "cuda")


def test_last_dispatch_names_what_ran_in_this_thread():
    x = torch.randn(3, 12, requires_grad=True)
    w, a, b = torch.randn(10, 12), torch.randn(4, 12), torch.randn(10, 4)
    lk.lora_linear(x, w, None, a, b, 0.5, backend="torch")
    got = lk.last_dispatch()
    assert got == backends.Dispatch("lora_linear", "lora_linear_fwd", "torch", "torch")
    assert (got.family, got.launcher, got.backend) == ("lora_linear", "lora_linear_fwd", "torch")
    m = torch.rand(10)
    lk.dora_linear(x, w, None, a, b, m, 0.5, backend="torch")
    assert lk.last_dispatch() == ("dora", "dora_linear_fwd", "torch", "torch")
    lk.merge_lora_(w.clone(), a, b, 0.5)
    assert lk.last_dispatch() == ("merge", "merge_", "torch", "torch")

    seen = []
    thread = threading.Thread(target=lambda: seen.append(lk.last_dispatch()))
    thread.start()
    thread.join()
    assert seen == [None]  # another thread has dispatched nothing


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_a_hand_over_is_recorded_and_logged_once_with_its_reason(monkeypatch, caplog):
    monkeypatch.setattr(backends, "_LOGGED", set())
    with caplog.at_level(logging.DEBUG, logger="lora_kernels.backends"):
        for _ in range(3):
            fn = backends.launcher("cuda", "dora", "weight_sq_norm")
            backends.launcher("torch", "lora_linear", "lora_linear_fwd")
        backends.launcher("torch", "lora_linear", "lora_linear_bwd")
    assert fn is backends.backend_module("triton", "dora").weight_sq_norm
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "dora.weight_sq_norm asked of cuda runs on triton (lora_kernels.backends.triton.dora): "
        "the CUDA extension has no dora kernels",
        "lora_linear.lora_linear_fwd runs on torch (lora_kernels.backends.torch.lora_linear)",
        "lora_linear.lora_linear_bwd runs on torch (lora_kernels.backends.torch.lora_linear)",
    ]
    assert all(r.levelno == logging.DEBUG for r in caplog.records)
    backends.launcher("cuda", "dora", "weight_sq_norm")
    assert lk.last_dispatch() == ("dora", "weight_sq_norm", "triton", "cuda")


def test_nothing_is_logged_unless_debug_is_on(monkeypatch, caplog):
    monkeypatch.setattr(backends, "_LOGGED", set())
    with caplog.at_level(logging.INFO, logger="lora_kernels.backends"):
        backends.launcher("torch", "merge", "merge_")
    assert caplog.records == []
    # ... and a pick first made while debug was off is still logged once it is on
    with caplog.at_level(logging.DEBUG, logger="lora_kernels.backends"):
        backends.launcher("torch", "merge", "merge_")
    assert [r.getMessage() for r in caplog.records] == [
        "merge.merge_ runs on torch (lora_kernels.backends.torch.merge)"
    ]


def test_kernel_backends_refuse_float64_adapter_factors():
    w = torch.randn(8, 16, dtype=torch.float16)
    a = torch.randn(4, 16, dtype=torch.float64)
    assert backends.resolve_backend("auto", w, 4, a) == "torch"
    if HAS_TRITON and interpreting():  # CPU tensors reach the dtype check only then
        with pytest.raises(ValueError, match="float32 operands, got torch.float64"):
            backends.resolve_backend("triton", w, 4, a)
