"""The ``lora_delta`` ops (the LoRA term alone, shrink then expand into an existing output) on the
torch and Triton backends against an fp64 computation of the same formula."""

from __future__ import annotations

import pytest
import torch

from lora_kernels.backends import available_backends
from lora_kernels.ops.lora_delta import lora_expand_, lora_shrink_
from tests.tolerances import assert_close_to_ref

BACKENDS = [b for b in ("torch", "triton") if b in available_backends()]


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
