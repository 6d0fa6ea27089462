"""Every argument of the ``lora_delta`` ops as a non-contiguous view: transposed, strided,
offset into its storage, expanded (stride 0); the outputs as a column slice of a wider tensor, a
row-strided view, a transposed one and an offset one.

Each case gives the values the contiguous call gets, and the result must match both that call
and the fp64 formula of ``ops/lora_delta.py``; rows with no adapter (id -1) keep their bits, and
so does every element of a wider buffer outside the written view. Backends: Triton (under the
interpreter, fp32) and torch through the public ops (fp32: the ops take 16- and 32-bit tensors),
and the torch launcher itself in fp64.
"""

from __future__ import annotations

import pytest
import torch

from lora_kernels.backends import available_backends
from lora_kernels.backends.torch import lora_delta as torch_delta
from lora_kernels.backends.triton import interpreting
from lora_kernels.ops.lora_delta import lora_expand_, lora_shrink_
from tests.tolerances import assert_close_to_ref

L, R, K, N = 3, 8, 33, 20

BACKENDS = ["torch", "torch64"] + (
    ["triton"] if interpreting() and "triton" in available_backends() else []
)
# the ways an input can hold the same values; "expanded" needs values equal along one axis,
# which the case builds before the view
INPUT_VIEWS = ["transposed", "strided", "offset", "expanded"]
VECTOR_VIEWS = ["strided", "offset", "expanded"]
OUTPUT_VIEWS = ["column_slice", "row_strided", "transposed", "offset"]


def _dtype(backend):
    return torch.float64 if backend == "torch64" else torch.float32


def _shrink(backend, out, x, lora_a, ids, scales, ranks):
    if backend == "torch64":
        torch_delta.lora_shrink_(out, x, lora_a, ids, scales, ranks)
    else:
        lora_shrink_(out, x, lora_a, ids, scales, ranks, backend=backend)


def _expand(backend, y, s, lora_b, ids, ranks, add_inputs):
    if backend == "torch64":
        torch_delta.lora_expand_(y, s, lora_b, ids, ranks, add_inputs)
    else:
        lora_expand_(y, s, lora_b, ids, ranks, add_inputs=add_inputs, backend=backend)


def _view(t: torch.Tensor, kind: str) -> torch.Tensor:
    """``t``'s values in another layout (``expanded``: ``t`` must be constant along dim 0)."""
    if kind == "transposed":  # last two dims swapped in memory (column-major matrices)
        *lead, a, b = t.shape
        strides = [a * b * int(torch.tensor(lead[i + 1 :]).prod()) for i in range(len(lead))]
        out = torch.empty_strided(t.shape, (*strides, 1, a), dtype=t.dtype)
        return out.copy_(t)
    if kind == "strided":  # every other element of the last dim of a wider buffer
        buf = torch.full((*t.shape[:-1], 2 * t.shape[-1] + 1), float("nan")).to(t.dtype)
        if not t.dtype.is_floating_point:
            buf.fill_(12345)
        buf[..., 1::2][..., : t.shape[-1]] = t
        return buf[..., 1::2][..., : t.shape[-1]]
    if kind == "offset":
        buf = torch.zeros(t.numel() + 5, dtype=t.dtype)
        buf[5:] = t.flatten()
        return buf[5:].view(t.shape)
    if kind == "expanded":
        assert (t == t[:1]).all()
        first = t[:1].clone()  # stride 0 along dim 0 even when it has one element
        return first.as_strided(t.shape, (0, *first.stride()[1:]))
    raise AssertionError(kind)


def _ids(m, kind):
    if kind == "expanded":  # one adapter for every row (stride 0 ids must still be read right)
        return torch.full((m,), 1, dtype=torch.int64)
    ids = torch.randint(-1, L, (m,))
    ids[0] = -1
    if m > 2:
        ids[1:4] = torch.tensor([0, 2, 1])  # every adapter present
    return ids


def _shrink64(x, lora_a, ids, scales, ranks):
    out = torch.zeros(x.shape[0], R, dtype=torch.float64)
    for i, a in enumerate(ids.tolist()):
        if 0 <= a < L:
            r = R if ranks is None else int(ranks[a])
            out[i, :r] = scales[a].double() * (x[i].double() @ lora_a[a, :r].double().T)
    return out


def _expand64(y, s, lora_b, ids, ranks, add_inputs):
    out = y.double().clone()
    for i, a in enumerate(ids.tolist()):
        if 0 <= a < L:
            r = R if ranks is None else int(ranks[a])
            term = s[i, :r].double() @ lora_b[a, :, :r].double().T
            out[i] = term + (out[i] if add_inputs else 0)
    return out


def _output(shape, dtype, kind):
    """(buffer, view of ``shape`` into it) with random values; the rest of the buffer is the
    part that must keep its bits."""
    m, n = shape
    if kind == "column_slice":
        buf = torch.randn(m, n + 13, dtype=dtype)
        return buf, buf[:, 5 : 5 + n]
    if kind == "row_strided":
        buf = torch.randn(2 * m + 1, n, dtype=dtype)
        return buf, buf[1::2][:m]
    if kind == "transposed":
        buf = torch.randn(n, m, dtype=dtype)
        return buf, buf.T
    if kind == "offset":
        buf = torch.randn(m * n + 7, dtype=dtype)
        return buf, buf[7:].view(m, n)
    raise AssertionError(kind)


def _shrink_cases():
    cases = [(arg, kind) for arg in ("x", "lora_a") for kind in INPUT_VIEWS]
    cases += [(arg, kind) for arg in ("row_ids", "scales", "ranks") for kind in VECTOR_VIEWS]
    return cases + [("out", kind) for kind in OUTPUT_VIEWS]


def _expand_cases():
    """(arg, view, add_inputs): add_inputs=False changes only how y is written."""
    cases = [(arg, kind, True) for arg in ("s", "lora_b") for kind in INPUT_VIEWS]
    cases += [(arg, kind, True) for arg in ("row_ids", "ranks") for kind in VECTOR_VIEWS]
    return cases + [("y", kind, add) for kind in OUTPUT_VIEWS for add in (True, False)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m", [1, 7])
@pytest.mark.parametrize(("arg", "kind"), _shrink_cases())
def test_shrink_views(backend, m, arg, kind):
    dtype = _dtype(backend)
    x = torch.randn(m, K, dtype=dtype)
    lora_a = torch.randn(L, R, K, dtype=dtype)
    ids = _ids(m, kind if arg == "row_ids" else "")
    scales = torch.rand(L) + 0.5
    ranks = torch.tensor([8, 3, 5], dtype=torch.int32)
    if kind == "expanded":  # values constant along dim 0, so the view holds the same values
        x = x[:1].expand(m, K).clone() if arg == "x" else x
        lora_a = lora_a[:1].expand(L, R, K).clone() if arg == "lora_a" else lora_a
        scales = scales[:1].expand(L).clone() if arg == "scales" else scales
        ranks = ranks[1:2].expand(L).clone() if arg == "ranks" else ranks
    args = {"x": x, "lora_a": lora_a, "row_ids": ids, "scales": scales, "ranks": ranks}
    viewed = dict(args)
    if arg != "out":
        viewed[arg] = _view(args[arg], kind)
        assert torch.equal(viewed[arg], args[arg])
        if kind != "offset":
            assert viewed[arg].stride() != args[arg].stride()
    order = ("x", "lora_a", "row_ids", "scales", "ranks")

    dense = torch.empty(m, R, dtype=dtype)
    _shrink(backend, dense, *(args[k] for k in order))
    if arg == "out":
        buf, out = _output((m, R), dtype, kind)
    else:
        buf = torch.randn(2, m, R, dtype=dtype)
        out = buf[1]
    before = buf.clone()
    _shrink(backend, out, *(viewed[k] for k in order))

    ref = _shrink64(x, lora_a, ids, scales, ranks)
    assert_close_to_ref(f"shrink {arg} {kind}", out, ref, ref.to(dtype))
    torch.testing.assert_close(out, dense, rtol=1e-6, atol=1e-6)
    untouched = torch.ones_like(buf, dtype=torch.bool)
    untouched_view = untouched.as_strided(out.shape, out.stride(), out.storage_offset())
    untouched_view.fill_(False)
    assert torch.equal(buf[untouched], before[untouched])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m", [1, 7])
@pytest.mark.parametrize(("arg", "kind", "add_inputs"), _expand_cases())
def test_expand_views(backend, m, arg, kind, add_inputs):
    dtype = _dtype(backend)
    s = torch.randn(m, R, dtype=torch.float32 if dtype == torch.float32 else dtype)
    lora_b = torch.randn(L, N, R, dtype=dtype)
    ids = _ids(m, kind if arg == "row_ids" else "")
    ranks = torch.tensor([8, 2, 6], dtype=torch.int32)
    if kind == "expanded":
        s = s[:1].expand(m, R).clone() if arg == "s" else s
        lora_b = lora_b[:1].expand(L, N, R).clone() if arg == "lora_b" else lora_b
        ranks = ranks[2:3].expand(L).clone() if arg == "ranks" else ranks
    args = {"s": s, "lora_b": lora_b, "row_ids": ids, "ranks": ranks}
    viewed = dict(args)
    if arg != "y":
        viewed[arg] = _view(args[arg], kind)
        assert torch.equal(viewed[arg], args[arg])
        if kind != "offset":
            assert viewed[arg].stride() != args[arg].stride()
    order = ("s", "lora_b", "row_ids", "ranks")

    if arg == "y":
        buf, y = _output((m, N), dtype, kind)
    else:
        buf = torch.randn(m, N, dtype=dtype)
        y = buf
    before = buf.clone()
    y_before = y.clone()
    dense = y.clone()
    _expand(backend, dense, *(args[k] for k in order), add_inputs)
    _expand(backend, y, *(viewed[k] for k in order), add_inputs)

    ref = _expand64(y_before, s, lora_b, ids, ranks, add_inputs)
    assert_close_to_ref(f"expand {arg} {kind}", y, ref, ref.to(dtype))
    torch.testing.assert_close(y, dense, rtol=1e-6, atol=1e-6)
    none = ids < 0
    assert torch.equal(y[none], y_before[none])  # rows with no adapter: bit for bit
    untouched = torch.ones_like(buf, dtype=torch.bool)
    untouched.as_strided(y.shape, y.stride(), y.storage_offset()).fill_(False)
    assert torch.equal(buf[untouched], before[untouched])


_MANTISSA_BITS = {torch.bfloat16: 7, torch.float16: 10}


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch64"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [7, 70])  # gather, grouped
@pytest.mark.parametrize("add_inputs", [True, False])
@pytest.mark.parametrize("fp32_adapters", [False, True])
def test_expand_rounds_once(backend, dtype, m, add_inputs, fp32_adapters):
    """The expand sums ``y + s @ lora_b.T`` in fp32 and rounds once: each element lies within
    half a unit in the last place (of y's dtype) of the fp64 sum, plus the fp32 sum's own error,
    and no further from it than the term rounded to y's dtype and then added (two roundings).

    ``s`` (fp32) holds values of y's dtype: the Triton dots round their operands to it (the
    activations' dtype, ``lora_multi``'s rule), which would otherwise be a second rounding that
    this test does not measure."""
    s = torch.randn(m, R).to(dtype).float()
    lora_b = torch.randn(L, N, R, dtype=dtype)
    if fp32_adapters:  # fp32 storage of y-dtype values (a tile config of its own)
        lora_b = lora_b.float()
    ids = _ids(m, "")
    ranks = torch.tensor([8, 2, 6], dtype=torch.int32)
    buf = torch.randn(m, N + 9, dtype=dtype) * 4
    y = buf[:, 3 : 3 + N]
    before = buf.clone()
    y_before = y.clone()
    _expand(backend, y, s, lora_b, ids, ranks, add_inputs)

    ref = _expand64(y_before, s, lora_b, ids, ranks, add_inputs)
    mag = ref.abs().clamp_min(torch.finfo(dtype).tiny)
    half_ulp = torch.exp2(torch.floor(torch.log2(mag)) - _MANTISSA_BITS[dtype]) / 2
    slack = 1e-5 * ref.abs().max().item()  # the fp32 sum's own error
    err = (y.double() - ref).abs()
    assert (err <= half_ulp + slack).all(), f"max excess {(err - half_ulp).max().item():.3e}"
    term = _expand64(torch.zeros_like(y_before), s, lora_b, ids, ranks, False).to(dtype)
    twice = (y_before.double() + term.double()).to(dtype) if add_inputs else term
    valid = (ids >= 0)[:, None]
    twice_err = torch.where(valid, (twice.double() - ref).abs(), 0.0)
    assert err.max() <= twice_err.max() + slack
    none = ids < 0
    assert torch.equal(y[none], y_before[none])
    assert torch.equal(buf[:, :3], before[:, :3])
    assert torch.equal(buf[:, 3 + N :], before[:, 3 + N :])
