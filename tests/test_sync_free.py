"""A decode step of every family reads no device value on the host and copies nothing from the
host, call after call: no ``.item()`` / ``.tolist()`` / ``bool(tensor)``, no tensor built from a
Python list, no ``aten::_local_scalar_dense``. On CUDA each of those is a synchronisation or a
blocking copy, and none can be captured in a CUDA graph.

This machine has no GPU, so the steps run on CPU tensors on the path CUDA takes: the checks'
value reads (CPU-only by design, ``_checks.reads_values``) are switched off as on CUDA, and the
torch backend's multi-adapter and embedding fallbacks take their id-blind paths (``_reads_ids``),
which is what they run off the CPU. Each step runs once to warm the layers' caches of small
host-made tensors (ids, ranks, scales: built once per distinct batch), then once traced.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import lora_kernels as lk
from lora_kernels import _checks
from lora_kernels import reference as R
from lora_kernels.backends.torch import lora_embedding as torch_embedding
from lora_kernels.backends.torch import lora_multi as torch_multi

K, N, V = 24, 17, 31
FORBIDDEN_OPS = ("_local_scalar_dense", "lift_fresh", "nonzero", "unique", "item")
HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "numpy", "cpu")
HOST_MAKERS = ("tensor", "as_tensor", "from_numpy")


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def cuda_like(monkeypatch):
    """Returns ``trace(step)``: the forbidden ops and host calls one call of ``step`` makes."""
    monkeypatch.setattr(_checks, "reads_values", lambda device: False)
    monkeypatch.setattr(torch_multi, "_reads_ids", lambda device: False)
    monkeypatch.setattr(torch_embedding, "_reads_ids", lambda device: False)
    calls = []
    counting = [False]

    def counted(name, fn):
        def call(*args, **kwargs):
            if counting[0]:
                calls.append(name)
            return fn(*args, **kwargs)

        return call

    for name in HOST_MAKERS:
        monkeypatch.setattr(torch, name, counted(f"torch.{name}", getattr(torch, name)))
    for name in HOST_READS:
        method = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, counted(f"Tensor.{name}", method))

    def trace(step):
        step()  # warm-up: caches of ids / ranks / scales fill here
        del calls[:]
        mode = _Ops()
        counting[0] = True
        try:
            with mode:
                step()
        finally:
            counting[0] = False
        bad = [op for op in mode.ops if any(f in op for f in FORBIDDEN_OPS)]
        return bad + list(calls)

    return trace


def _randomise(module):
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora" in name:
                p.normal_(0, 0.3)


def _layer(**kw):
    layer = lk.FusedLoraLinear(K, N, r=4, lora_alpha=8, backend="torch", **kw)
    layer.add_adapter("two", 7, 5, **({"use_dora": True} if kw.get("use_dora") else {}))
    _randomise(layer)
    return layer.eval()


NAMES = ["default", "__base__", "two", "default"]


@pytest.mark.parametrize("use_dora", [False, True])
def test_linear_decode_steps(cuda_like, use_dora):
    layer = _layer(use_dora=use_dora)
    x = torch.randn(4, K)
    with torch.no_grad():
        assert cuda_like(lambda: layer(x)) == []
        assert cuda_like(lambda: layer(x, adapter_names=NAMES)) == []
        assert cuda_like(lambda: layer(x[:, None], adapter_names=NAMES)) == []  # [B, 1, K]


def test_embedding_decode_steps(cuda_like):
    layer = lk.FusedLoraEmbedding(V, N, r=4, lora_alpha=8, init_lora_weights=False,
                                  backend="torch")  # fmt: skip
    layer.add_adapter("two", 7, 5, init_lora_weights=False)
    ids = torch.randint(0, V, (4, 1))
    with torch.no_grad():
        assert cuda_like(lambda: layer(ids)) == []
        assert cuda_like(lambda: layer(ids, adapter_names=NAMES)) == []


def test_qlora_decode_steps(cuda_like):
    bnb = pytest.importorskip("bitsandbytes")
    base = bnb.nn.Linear4bit(K, N, compute_dtype=torch.float32, quant_type="nf4")
    base.weight = bnb.nn.Params4bit(torch.randn(N, K), requires_grad=False, quant_type="nf4")
    base = base.to("cpu")
    layer = lk.FusedLoraLinear.from_linear(base, r=4, lora_alpha=8, backend="torch")
    layer.add_adapter("two", 7, 5)
    _randomise(layer)
    layer.eval()
    x = torch.randn(4, K)
    with torch.no_grad():
        assert cuda_like(lambda: layer(x)) == []
        assert cuda_like(lambda: layer(x, adapter_names=NAMES)) == []


def test_fused_peft_decode_steps(cuda_like):
    peft = pytest.importorskip("peft")
    from lora_kernels.integrations.peft import fuse

    model = nn.Sequential(nn.Embedding(V, K), nn.Linear(K, N))
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["0", "1"]))
    pm.add_adapter("two", peft.LoraConfig(r=7, lora_alpha=5, target_modules=["0", "1"]))
    _randomise(pm)
    fuse(pm.eval(), backend="torch")
    ids = torch.randint(0, V, (4, 1))
    with torch.no_grad():
        assert cuda_like(lambda: pm(ids, adapter_names=NAMES)) == []


def test_torch_multi_id_blind_path_equals_the_planned_one(monkeypatch):
    """The fallback's id-blind path (off the CPU) computes what the planned one does, forward
    and backward, ids out of range included (they act as -1), and reads no id on the host."""
    m, r_max, adapters = 9, 6, 3
    x = torch.randn(m, K, requires_grad=True)
    w, b = torch.randn(N, K), torch.randn(N)
    lora_a = torch.randn(adapters, r_max, K, requires_grad=True)
    lora_b = torch.randn(adapters, N, r_max, requires_grad=True)
    scales = torch.tensor([0.5, 2.0, -1.25])
    ranks = torch.tensor([6, 2, 5], dtype=torch.int32)
    ids = torch.tensor([0, 2, -1, 1, 1, 7, 0, 2, -3], dtype=torch.int32)

    def run():
        y, s = torch_multi.lora_linear_multi_fwd(x, w, b, lora_a, lora_b, scales, ids, ranks)
        dy = torch.linspace(-1, 1, m * N).reshape(m, N)
        grads = torch_multi.lora_linear_multi_bwd(dy, x, w, lora_a, lora_b, scales, ids, s, ranks)
        return (y, s, *grads)

    planned = run()
    monkeypatch.setattr(torch_multi, "_reads_ids", lambda device: False)
    reads = []
    for name in HOST_READS:
        method = getattr(torch.Tensor, name)

        def call(*args, _m=method, _n=name, **kwargs):
            reads.append(_n)
            return _m(*args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, call)
    mode = _Ops()
    with mode:
        blind = run()
    monkeypatch.undo()
    assert reads == []
    assert not [op for op in mode.ops if any(f in op for f in FORBIDDEN_OPS)]
    for got, want in zip(blind, planned, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the ids' content changes no op: another batch runs the same op sequence
    monkeypatch.setattr(torch_multi, "_reads_ids", lambda device: False)
    ids.copy_(torch.tensor([-1] * m, dtype=torch.int32))
    again = _Ops()
    with again:
        run()
    assert again.ops == mode.ops


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_moe_decode_steps(cuda_like, monkeypatch, backend):
    """A decode step of the fused-experts layer, one adapter and a mixed batch: above the
    backend, the checks, the adapter ids and the scales are built once (on CUDA each would be a
    blocking copy per step). The torch backend plans its expert blocks from one host read of
    the counts (what it is built for: the CPU), so for it the op is stubbed and only the layer,
    the functional front door and the checks are traced; the Triton launchers run as well."""
    pytest.importorskip("transformers")
    from lora_kernels import ops
    from lora_kernels.backends.triton import interpreting
    from lora_kernels.layers.moe import FusedLoraExperts
    from tests.moe_models import tiny_moe_model

    if backend == "triton" and not interpreting():
        pytest.skip("runs the Triton launchers under the interpreter")
    experts = tiny_moe_model("qwen3_moe").model.layers[0].mlp.experts
    layer = FusedLoraExperts(experts, backend=backend)
    both = ("gate_up_proj", "down_proj")
    layer.add_adapter("default", dict.fromkeys(both, 4), dict.fromkeys(both, 8),
                      init_lora_weights=False)  # fmt: skip
    layer.add_adapter("two", {"gate_up_proj": 3}, {"gate_up_proj": 5}, init_lora_weights=False)
    if backend == "torch":
        monkeypatch.setattr(ops, "moe_lora_2d", lambda x, *args: torch.zeros_like(x))
    t = 4
    x = torch.randn(t, experts.gate_up_proj.shape[-1])
    top_k = torch.randint(0, experts.num_experts, (t, 2))
    weights = torch.rand(t, 2)
    with torch.no_grad():
        assert cuda_like(lambda: layer(x, top_k, weights)) == []
        assert cuda_like(lambda: layer(x, top_k, weights, adapter_names=NAMES)) == []
        assert cuda_like(lambda: layer(x, top_k, weights, adapter_names=NAMES[:2])) == []


def test_list_scales_are_copied_to_the_device_once(cuda_like):
    """``lora_linear_multi`` with scales as a list (what the layers pass): the list becomes a
    device tensor once, not on every call."""
    x, w = torch.randn(4, K), torch.randn(N, K)
    a, b = torch.randn(2, 3, K), torch.randn(2, N, 3)
    ids = torch.tensor([1, -1, 0, 1], dtype=torch.int32)
    step = lambda: lk.lora_linear_multi(x, w, None, a, b, [0.5, 1.5], ids, backend="torch")  # noqa: E731
    assert cuda_like(step) == []
    ref = copy.deepcopy(step())
    torch.testing.assert_close(
        lk.lora_linear_multi(x, w, None, a, b, torch.tensor([0.5, 1.5]), ids, backend="torch"),
        ref,
    )


@pytest.mark.parametrize("as_tensor", [False, True])
def test_torch_embedding_id_blind_forward_equals_the_planned_one(monkeypatch, as_tensor):
    from lora_kernels.backends.torch.lora_embedding import lora_embedding_fwd

    ids = torch.randint(0, V, (9,))
    weight = torch.randn(V, N)
    lora_a, lora_b = torch.randn(3, 5, V), torch.randn(3, N, 5)
    row_ids = torch.tensor([0, 2, -1, 1, 1, 0, -1, 2, 2], dtype=torch.int32)
    scales = [0.5, 2.0, -1.5]
    scales = torch.tensor(scales) if as_tensor else scales
    planned = lora_embedding_fwd(ids, weight, lora_a, lora_b, scales, row_ids)
    monkeypatch.setattr(torch_embedding, "_reads_ids", lambda device: False)
    blind = lora_embedding_fwd(ids, weight, lora_a, lora_b, scales, row_ids)
    for got, want in zip(blind, planned, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_embedding_multi_tensor_scales_are_never_read_on_the_host(cuda_like, dtype):
    """``lora_embedding_multi`` with its scales as a device tensor (what a server keeps per
    slot): neither the checks nor the torch backend's id-blind forward read them on the host
    (once they were read back with ``.tolist()``, a synchronisation per decode step); the result
    is the reference's, and the list form's."""
    weight = torch.randn(V, N, dtype=dtype)
    lora_a = (0.3 * torch.randn(3, 5, V)).to(dtype)
    lora_b = (0.3 * torch.randn(3, N, 5)).to(dtype)
    ids = torch.randint(0, V, (4, 1))
    adapter_ids = torch.tensor([2, -1, 0, 2], dtype=torch.int32)
    scales = torch.tensor([0.5, 7 / 3, -1.25])

    def step(sc=scales):
        return lk.lora_embedding_multi(ids, weight, lora_a, lora_b, sc, adapter_ids,
                                       backend="torch")  # fmt: skip

    with torch.no_grad():
        assert cuda_like(step) == []
        got = step()
        from_list = step(scales.tolist())
    want = R.lora_embedding_multi(
        ids, weight.double(), lora_a.double(), lora_b.double(), scales.double(), adapter_ids
    )
    tol = {torch.float32: 1e-5, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    torch.testing.assert_close(from_list, got, rtol=tol, atol=tol)


@pytest.mark.parametrize("deterministic", [False, True])
def test_triton_multi_gather_split_decode_is_sync_free(monkeypatch, deterministic):
    """The Triton gather decode launcher split over K (the torch backend is what the tests above
    drive): no device value read on the host, no tensor built from host data, in both reduction
    modes (atomics into a zeroed buffer, per-split partials), and the split did run."""
    triton_multi = pytest.importorskip("lora_kernels.backends.triton.lora_multi")
    from lora_kernels.backends.triton import interpreting

    if not interpreting():
        pytest.skip("the interpreter's split plan")
    plans = []
    real = triton_multi.gather_splits
    monkeypatch.setattr(
        triton_multi, "gather_splits", lambda *a: plans.append(real(*a)) or plans[-1]
    )
    m, k, n, num_adapters, r = 5, 1000, 70, 3, 16
    x = torch.randn(m, k, dtype=torch.float16)
    w = (torch.randn(n, k) / k**0.5).half()
    b = torch.randn(n, dtype=torch.float16)
    lora_a = torch.randn(num_adapters, r, k, dtype=torch.float16) / k**0.5
    lora_b = torch.randn(num_adapters, n, r, dtype=torch.float16) / r**0.5
    scales = torch.rand(num_adapters) + 0.5
    ids = torch.tensor([0, -1, 2, 5, 1])
    args = (x, w, b, lora_a, lora_b, scales, ids)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        triton_multi.lora_linear_multi_fwd(*args, strategy="gather")  # warm the jit cache
        with monkeypatch.context() as patch, _Ops() as ops:
            for name in HOST_READS:
                patch.setattr(torch.Tensor, name, _no_host(name))
            for name in HOST_MAKERS:
                patch.setattr(torch, name, _no_host(name))
            triton_multi.lora_linear_multi_fwd(*args, strategy="gather")
    finally:
        torch.use_deterministic_algorithms(previous)
    assert not [op for op in ops.ops if any(f in op for f in FORBIDDEN_OPS)], ops.ops
    assert plans and all(splits >= 2 for splits, _ in plans), plans


def _no_host(name):
    def forbidden(*_args, **_kwargs):
        raise AssertionError(f"a decode step called {name} (a host read or a host-built tensor)")

    return forbidden
