"""The ``lora_delta`` ops (the LoRA term alone, shrink then expand into an existing output) on the
torch and Triton backends against an fp64 computation of the same formula."""

from __future__ import annotations

import pytest
import torch

from lora_kernels.backends import available_backends
from lora_kernels.backends.triton import interpreting
from lora_kernels.ops.lora_delta import lora_expand_, lora_shrink_
from tests.tolerances import assert_close_to_ref

# CPU tensors: Triton under its interpreter; on a GPU the CUDA tests below run Triton
BACKENDS = ["torch"] + (["triton"] if interpreting() and "triton" in available_backends() else [])


def _ids(m: int, num_adapters: int) -> torch.Tensor:
    ids = torch.randint(-1, num_adapters, (m,))
    ids[0] = -1  # always one row with no adapter
    return ids


def _shrink64(x, lora_a, ids, scales, ranks):
    out = torch.zeros(x.shape[0], lora_a.shape[1], dtype=torch.float64)
    for i, a in enumerate(ids.tolist()):
        if 0 <= a < lora_a.shape[0]:
            r = lora_a.shape[1] if ranks is None else int(ranks[a])
            out[i, :r] = scales[a].double() * (x[i].double() @ lora_a[a, :r].double().T)
    return out


def _expand64(y, s, lora_b, ids, ranks, add_inputs):
    out = y.double().clone()
    for i, a in enumerate(ids.tolist()):
        if 0 <= a < lora_b.shape[0]:
            r = lora_b.shape[2] if ranks is None else int(ranks[a])
            term = s[i, :r].double() @ lora_b[a, :, :r].double().T
            out[i] = term + (out[i] if add_inputs else 0)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 7, 70])
@pytest.mark.parametrize("with_ranks", [False, True])
def test_shrink(backend, dtype, m, with_ranks):
    num_adapters, r, k = 3, 8, 33
    x = torch.randn(m, k, dtype=dtype)
    lora_a = torch.randn(num_adapters, r, k, dtype=dtype)
    ids = _ids(m, num_adapters)
    scales = torch.rand(num_adapters) + 0.5
    ranks = torch.tensor([8, 3, 5], dtype=torch.int32) if with_ranks else None
    buffer = torch.full((2, m, r), float("nan"))  # a stacked buffer, written through a view
    lora_shrink_(buffer[1], x, lora_a, ids, scales, ranks, backend=backend)
    ref = _shrink64(x, lora_a, ids, scales, ranks)
    baseline = _shrink64(x, lora_a, ids, scales, ranks).float()
    assert_close_to_ref("shrink", buffer[1], ref, baseline)
    assert torch.isnan(buffer[0]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 7, 70])
@pytest.mark.parametrize("add_inputs", [True, False])
def test_expand_into_a_column_slice(backend, dtype, m, add_inputs):
    num_adapters, r, n, width, offset = 3, 8, 19, 45, 13
    y = torch.randn(m, width, dtype=dtype)
    s = torch.randn(m, r)
    lora_b = torch.randn(num_adapters, n, r, dtype=dtype)
    ids = _ids(m, num_adapters)
    ranks = torch.tensor([8, 2, 6], dtype=torch.int32)
    before = y.clone()
    lora_expand_(
        y[:, offset : offset + n], s, lora_b, ids, ranks, add_inputs=add_inputs, backend=backend
    )
    ref = _expand64(before[:, offset : offset + n], s, lora_b, ids, ranks, add_inputs)
    baseline = ref.to(dtype)  # the fp64 sum rounded once: the best a dtype result can be
    assert_close_to_ref("expand", y[:, offset : offset + n], ref, baseline)
    # columns outside the slice and rows with no adapter are untouched, bit for bit
    assert torch.equal(y[:, :offset], before[:, :offset])
    assert torch.equal(y[:, offset + n :], before[:, offset + n :])
    none = ids < 0
    assert torch.equal(y[none], before[none])


@pytest.mark.parametrize("op", ["shrink", "expand"])
def test_torch_backend_off_the_cpu_never_reads_the_ids(op, monkeypatch):
    """The id-blind path (what the torch backend runs on CUDA) gives the same result; the
    grouped path it replaces is made to fail if it runs."""
    from lora_kernels.backends.torch import lora_delta as torch_delta

    monkeypatch.setattr(torch_delta, "_reads_ids", lambda device: False)
    monkeypatch.setattr(torch_delta, "_plan", None)
    m, num_adapters, r, k, n = 9, 3, 8, 20, 11
    ids = _ids(m, num_adapters)
    ranks = torch.tensor([8, 3, 5], dtype=torch.int32)
    if op == "shrink":
        x = torch.randn(m, k)
        lora_a = torch.randn(num_adapters, r, k)
        lora_a[0] = float("nan")  # rows of no adapter gather slot 0: it must not leak
        ids[ids == 0] = 1
        scales = torch.rand(num_adapters) + 0.5
        out = torch.empty(m, r)
        lora_shrink_(out, x, lora_a, ids, scales, ranks, backend="torch")
        ref = _shrink64(x, lora_a, ids, scales, ranks)
        assert_close_to_ref("dense shrink", out, ref, ref.float())
    else:
        y = torch.randn(m, n)
        s = torch.randn(m, r)
        lora_b = torch.randn(num_adapters, n, r)
        before = y.clone()
        lora_expand_(y, s, lora_b, ids, ranks, add_inputs=False, backend="torch")
        ref = _expand64(before, s, lora_b, ids, ranks, False)
        assert_close_to_ref("dense expand", y, ref, ref.float())
        assert torch.equal(y[ids < 0], before[ids < 0])


def test_bad_inputs_name_the_argument():
    x = torch.randn(4, 8)
    lora_a = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match=r"out of shape \[4, 3\], got \[4, 5\]"):
        lora_shrink_(torch.empty(4, 5), x, lora_a, torch.zeros(4, dtype=torch.long), torch.ones(2))
    with pytest.raises(TypeError, match="scales of dtype torch.float32"):
        lora_shrink_(
            torch.empty(4, 3), x, lora_a, torch.zeros(4, dtype=torch.long), torch.ones(2).double()
        )
    with pytest.raises(ValueError, match=r"lora_b of shape \[2, 6, 3\]"):
        lora_expand_(
            torch.empty(4, 6),
            torch.empty(4, 3),
            torch.randn(2, 5, 3),
            torch.zeros(4, dtype=torch.long),
        )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 70, 300])  # gather, gather (many adapters), grouped
def test_triton_on_cuda(dtype, m):
    num_adapters, r, k, n = 3, 16, 256, 192
    dev = "cuda"
    x = torch.randn(m, k, dtype=dtype, device=dev)
    lora_a = torch.randn(num_adapters, r, k, dtype=dtype, device=dev) / k**0.5
    lora_b = torch.randn(num_adapters, n, r, dtype=dtype, device=dev)
    ids = _ids(m, num_adapters).to(dev)
    scales = torch.rand(num_adapters, device=dev) + 0.5
    s = torch.empty(m, r, device=dev)
    lora_shrink_(s, x, lora_a, ids, scales, backend="triton")
    ref_s = _shrink64(x.cpu(), lora_a.cpu(), ids.cpu(), scales.cpu(), None)
    assert_close_to_ref("cuda shrink", s.cpu(), ref_s, ref_s.float())
    y = torch.randn(m, n, dtype=dtype, device=dev)
    before = y.clone()
    lora_expand_(y, s, lora_b, ids, backend="triton")
    ref = _expand64(before.cpu(), s.cpu(), lora_b.cpu(), ids.cpu(), None, True)
    assert_close_to_ref("cuda expand", y.cpu(), ref, ref.to(dtype))


@pytest.mark.gpu
def test_decode_step_captures_in_a_cuda_graph():
    """Shrink then expand, captured once and replayed with other ids: no host sync, no
    allocation that depends on the ids."""
    num_adapters, r, k, n, m = 4, 16, 128, 64, 8
    dev = "cuda"
    x = torch.randn(m, k, dtype=torch.bfloat16, device=dev)
    lora_a = torch.randn(num_adapters, r, k, dtype=torch.bfloat16, device=dev) / k**0.5
    lora_b = torch.randn(num_adapters, n, r, dtype=torch.bfloat16, device=dev)
    scales = torch.ones(num_adapters, device=dev)
    ids = torch.zeros(m, dtype=torch.long, device=dev)
    s = torch.empty(m, r, device=dev)
    y = torch.zeros(m, n, dtype=torch.bfloat16, device=dev)

    def step():
        lora_shrink_(s, x, lora_a, ids, scales, backend="triton")
        lora_expand_(y, s, lora_b, ids, add_inputs=False, backend="triton")

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    new_ids = torch.tensor([3, -1, 0, 2, 2, 1, -1, 0], device=dev)
    ids.copy_(new_ids)
    y.zero_()
    graph.replay()
    torch.cuda.synchronize()
    ref_s = _shrink64(x.cpu(), lora_a.cpu(), new_ids.cpu(), scales.cpu(), None)
    ref = _expand64(torch.zeros(m, n), ref_s.float(), lora_b.cpu(), new_ids.cpu(), None, False)
    assert_close_to_ref("graph replay", y.cpu(), ref, ref.to(torch.bfloat16))


def _small():
    m, num_adapters, r, k, n = 5, 3, 4, 16, 12
    x = torch.randn(m, k)
    lora_a = torch.randn(num_adapters, r, k)
    lora_b = torch.randn(num_adapters, n, r)
    ids = torch.tensor([0, -1, 2, 1, 2])
    return x, lora_a, lora_b, ids, torch.rand(num_adapters) + 0.5


def test_opcheck():
    x, lora_a, lora_b, ids, scales = _small()
    out = torch.empty(x.shape[0], lora_a.shape[1])
    torch.library.opcheck(
        torch.ops.lora_kernels.lora_shrink_, (out, x, lora_a, ids, scales, None, "torch")
    )
    y = torch.randn(x.shape[0], lora_b.shape[1])
    torch.library.opcheck(
        torch.ops.lora_kernels.lora_expand_, (y, out.normal_(), lora_b, ids, None, True, "torch")
    )


def test_compiles_fullgraph():
    """vLLM compiles its models with fullgraph=True: the two ops must trace without a break."""
    x, lora_a, lora_b, ids, scales = _small()

    def delta(y, x):
        s = torch.empty(x.shape[0], lora_a.shape[1])
        lora_shrink_(s, x, lora_a, ids, scales)
        lora_expand_(y, s, lora_b, ids)
        return y

    y0 = torch.randn(x.shape[0], lora_b.shape[1])
    eager = delta(y0.clone(), x)
    compiled = torch.compile(delta, fullgraph=True, backend="aot_eager")(y0.clone(), x)
    torch.testing.assert_close(compiled, eager)
