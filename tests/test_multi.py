"""Multi-adapter LoRA (a different adapter per row): the torch and Triton launchers against the
reference, over batch popularity, odd sizes, mixed ranks and dtypes, with all gradients.

On a machine without CUDA the Triton kernels run on CPU tensors under the interpreter (set by
conftest.py); with CUDA and ``TRITON_INTERPRET=0`` the same tests run on the GPU.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lora_kernels as lk
from lora_kernels import reference as R
from lora_kernels.backends.torch import lora_multi as _torch_multi
from lora_kernels.backends.triton import HAS_TRITON, interpreting
from tests.tolerances import assert_close_to_ref

if HAS_TRITON:
    from lora_kernels.backends.triton import lora_multi as _triton_multi

ON_GPU = torch.cuda.is_available() and not interpreting()
DEVICE = "cuda" if ON_GPU else "cpu"
POPULARITIES = ["distinct", "uniform", "zipf", "identical", "skewed", "all_base"]

# (launcher module, Triton strategy); both Triton strategies are checked on every shape
IMPLS = ["torch"] + (["triton-gather", "triton-grouped"] if HAS_TRITON else [])


def _launchers(impl):
    if impl == "torch":
        return _torch_multi.lora_linear_multi_fwd, _torch_multi.lora_linear_multi_bwd, {}
    strategy = impl.split("-")[1]
    kw = {"strategy": strategy}
    return _triton_multi.lora_linear_multi_fwd, _triton_multi.lora_linear_multi_bwd, kw


def make_ids(popularity, m, num_adapters, dtype=torch.int64, device=DEVICE):
    """Adapter ids per row for a batch "popularity" (as in punica's benchmarks), -1 = base only."""
    if popularity == "distinct":  # every row its own adapter while there are enough of them
        ids = torch.randperm(max(m, num_adapters))[:m] % num_adapters
    elif popularity == "uniform":  # some rows with no adapter
        ids = torch.randint(-1, num_adapters, (m,))
    elif popularity == "zipf":
        weights = 1.0 / torch.arange(1, num_adapters + 1, dtype=torch.float64) ** 1.5
        ids = torch.multinomial(weights, m, replacement=True)
    elif popularity == "identical":
        ids = torch.full((m,), int(torch.randint(0, num_adapters, ())))
    elif popularity == "skewed":  # one adapter for ~3/4 of the rows, the rest spread, some base
        ids = torch.randint(-1, num_adapters, (m,))
        ids[torch.rand(m) < 0.75] = num_adapters - 1
    elif popularity == "all_base":
        ids = torch.full((m,), -1)
    else:
        raise ValueError(popularity)
    return ids.to(dtype=dtype, device=device)


def make_stacks(m, k, n, num_adapters, r_max, dtype, lora_dtype=None, mixed_ranks=True):
    """x, weight, bias, zero-padded stacks, scales, per-adapter ranks (1..r_max)."""
    lora_dtype = lora_dtype or dtype
    x = torch.randn(m, k, dtype=dtype, device=DEVICE)
    w = (torch.randn(n, k, device=DEVICE) / k**0.5).to(dtype)
    b = torch.randn(n, dtype=dtype, device=DEVICE)
    a = (torch.randn(num_adapters, r_max, k, device=DEVICE) / k**0.5).to(lora_dtype)
    bb = (torch.randn(num_adapters, n, r_max, device=DEVICE) / r_max**0.5).to(lora_dtype)
    scales = (0.5 + 1.5 * torch.rand(num_adapters)).to(DEVICE)
    ranks = torch.full((num_adapters,), r_max, dtype=torch.int32)
    if mixed_ranks:
        ranks = torch.randint(1, r_max + 1, (num_adapters,), dtype=torch.int32)
        ranks[0] = r_max
    for i, r in enumerate(ranks.tolist()):
        a[i, r:] = 0
        bb[i, :, r:] = 0
    return x, w, b, a, bb, scales, ranks.to(DEVICE)


def torch_same_dtype(x, w, b, a, bb, scales, ids):
    """Stock PyTorch in the activations' dtype (gather + bmm, autograd for the gradients): the
    baseline of the tolerance rule. fp32 adapters on a 16-bit base are rounded to the base's
    dtype for their products, as PEFT computes them under autocast: the package's precision
    policy (README "Precision"); their gradients come back in fp32 through the cast."""
    valid = (ids >= 0) & (ids < a.shape[0])
    idc = torch.where(valid, ids, 0).long()
    a, bb = a.to(x.dtype), bb.to(x.dtype)
    s = torch.bmm(a[idc], x.unsqueeze(2))  # [M, r, 1]
    term = torch.bmm(bb[idc], s) * scales[idc].to(a.dtype)[:, None, None]
    term = term.squeeze(2) * valid.to(term.dtype)[:, None]
    return x @ w.T + b + term.to(x.dtype)


def _f64(*ts):
    return [None if t is None else t.detach().double() for t in ts]


def _ref_ids(ids, num_adapters):
    """The reference's ids: every id outside [0, L) is the base layer, as the kernels do."""
    return torch.where((ids >= 0) & (ids < num_adapters), ids, -1).cpu()


def check_multi(impl, m, k, n, num_adapters, r_max, popularity, dtype, *, with_ranks=True,
                ids_dtype=torch.int64, lora_dtype=None, x_view=None):  # fmt: skip
    fwd, bwd, kw = _launchers(impl)
    x, w, b, a, bb, scales, ranks = make_stacks(m, k, n, num_adapters, r_max, dtype, lora_dtype)
    if x_view is not None:
        x = x_view(x)
    ids = make_ids(popularity, m, num_adapters, ids_dtype)
    ranks_arg = ranks if with_ranks else None

    y, s = fwd(x, w, b, a, bb, scales, ids, ranks_arg, **kw)
    dy = torch.randn_like(y)
    dx, da, db = bwd(dy, x, w, a, bb, scales, ids, s, ranks_arg, **kw)

    x64, w64, b64, a64, bb64, sc64, dy64 = _f64(x, w, b, a, bb, scales, dy)
    rid = _ref_ids(ids, num_adapters).to(x64.device)
    y64 = R.lora_linear_multi(x64, w64, b64, a64, bb64, sc64, rid)
    g64 = R.lora_linear_multi_backward(dy64, x64, w64, a64, bb64, sc64, rid)

    xs, as_, bs = (t.detach().clone().requires_grad_(True) for t in (x, a, bb))
    y_base = torch_same_dtype(xs, w, b, as_, bs, scales, ids)
    y_base.backward(dy)

    assert y.dtype == x.dtype and y.shape == (m, n)
    assert s.dtype == torch.float32 and s.shape == (m, r_max)
    assert dx.dtype == x.dtype and da.dtype == a.dtype and db.dtype == bb.dtype
    assert_close_to_ref("y", y, y64, y_base)
    assert_close_to_ref("dx", dx, g64[0], xs.grad)
    assert_close_to_ref("dA", da, g64[1], as_.grad)
    assert_close_to_ref("dB", db, g64[2], bs.grad)
    # s = x @ lora_a[a].T per row, zeros for rows with no adapter
    valid = (rid >= 0).to(s.device)
    s64 = torch.einsum("mk,mrk->mr", x64, a64[rid.clamp(min=0)]) * valid[:, None]
    s_base = s64.float()
    if a.dtype != x.dtype:
        # fp32 adapters on a 16-bit base are rounded to the base's dtype for the shrink (the
        # precision policy): stock PyTorch's s under that policy is x @ a.T in x's dtype.
        a_act = a.to(x.dtype)[rid.clamp(min=0).to(a.device)]
        s_base = torch.bmm(a_act, x.unsqueeze(2)).squeeze(2) * valid[:, None].to(x.dtype)
    assert_close_to_ref("s", s, s64, s_base)
    assert (s[~valid] == 0).all()
    return ids, y, dx


# (m, k, n, L, r_max, popularity, ids dtype): every M, L and popularity of the issue, odd K/N
CASES = [
    (1, 17, 13, 1, 1, "identical", torch.int64),
    (1, 33, 17, 8, 16, "distinct", torch.int32),
    (2, 33, 129, 3, 8, "distinct", torch.int64),
    (3, 129, 17, 8, 64, "uniform", torch.int32),
    (7, 64, 33, 8, 16, "zipf", torch.int64),
    (7, 17, 33, 3, 33, "skewed", torch.int32),
    (16, 17, 129, 3, 5, "skewed", torch.int64),
    (16, 33, 33, 8, 7, "all_base", torch.int32),
    (16, 33, 17, 8, 16, "distinct", torch.int32),
    (133, 33, 17, 8, 12, "zipf", torch.int64),
    (133, 17, 33, 3, 64, "uniform", torch.int32),
    (133, 65, 33, 1, 16, "identical", torch.int64),
]
# (dtype, pass ranks): zero-padded mixed ranks with and without the ranks tensor
DTYPES = [(torch.float32, True), (torch.float16, False), (torch.bfloat16, True)]
# every case x dtype x launcher, less the interpreter's slowest: the decode-shaped gather
# strategy on 133 rows in fp16 (its fp16 path is checked on the smaller batches)
MATRIX = [
    pytest.param(impl, case, dtype, with_ranks, id=f"{impl}-{'-'.join(map(str, case[:6]))}-{dtype}")
    for impl in IMPLS
    for case in CASES
    for dtype, with_ranks in DTYPES
    if not (impl == "triton-gather" and case[0] > 64 and dtype == torch.float16)
]


@pytest.mark.parametrize("impl,case,dtype,with_ranks", MATRIX)
def test_multi_matches_reference(impl, case, dtype, with_ranks):
    m, k, n, num_adapters, r_max, popularity, ids_dtype = case
    check_multi(
        impl, m, k, n, num_adapters, r_max, popularity, dtype,
        with_ranks=with_ranks, ids_dtype=ids_dtype,
    )  # fmt: skip


@pytest.mark.parametrize(
    "m,k,n,dtype",
    [(3, 2049, 17, torch.float32), (16, 17, 2049, torch.float16), (7, 2049, 33, torch.bfloat16)],
)
@pytest.mark.parametrize("impl", IMPLS)
def test_multi_long_k_and_n(impl, m, k, n, dtype):
    check_multi(impl, m, k, n, 3, 16, "uniform", dtype)


@pytest.mark.parametrize("impl", IMPLS)
def test_multi_rank_256_and_fp32_adapters(impl):
    check_multi(impl, 7, 33, 17, 2, 256, "uniform", torch.float32)
    check_multi(impl, 20, 33, 17, 3, 24, "skewed", torch.float16, lora_dtype=torch.float32)


@pytest.mark.parametrize("impl", IMPLS)
def test_multi_strided_x(impl):
    # x as a transposed view and as every other column of a wider tensor
    check_multi(impl, 16, 33, 17, 3, 8, "uniform", torch.float32,
                x_view=lambda x: x.T.contiguous().T)  # fmt: skip
    check_multi(impl, 16, 33, 17, 3, 8, "zipf", torch.float16,
                x_view=lambda x: torch.cat([x, x], 1)[:, ::2])  # fmt: skip


@pytest.mark.parametrize("impl", IMPLS)
def test_base_rows_equal_base_layer(impl):
    """Rows with id -1 (and ids out of range) get exactly the base layer: y, s = 0, dx."""
    fwd, bwd, kw = _launchers(impl)
    m, k, n, num_adapters = 40, 33, 17, 3
    x, w, b, a, bb, scales, ranks = make_stacks(m, k, n, num_adapters, 8, torch.float32)
    ids = make_ids("uniform", m, num_adapters)
    ids[::3] = -1
    ids[1] = num_adapters  # out of range: the kernels treat it as -1, never reading past L
    ids[4] = -7
    base = (ids < 0) | (ids >= num_adapters)
    y, s = fwd(x, w, b, a, bb, scales, ids, ranks, **kw)
    dy = torch.randn_like(y)
    dx, da, db = bwd(dy, x, w, a, bb, scales, ids, s, ranks, **kw)
    y_base = torch.addmm(b, x, w.T)
    if impl == "torch":  # the base GEMM is one addmm over all rows: bitwise equal
        assert torch.equal(y[base], y_base[base])
    assert_close_to_ref("y[base]", y[base], y_base[base].double(), y_base[base])
    assert (s[base] == 0).all()
    dx_base = dy @ w
    assert_close_to_ref("dx[base]", dx[base], dx_base[base].double(), dx_base[base])
    # the same batch with the base rows' ids replaced by -1 gives the same adapter gradients
    ids_clean = torch.where(base, -1, ids)
    _, da2, db2 = bwd(dy, x, w, a, bb, scales, ids_clean, s, ranks, **kw)
    if impl != "triton-grouped":
        # Each adapter reduces its own rows in their batch order (stable sort), in chunks from
        # its segment's start, and t is per row: the base rows' ids change no operation.
        assert torch.equal(da, da2) and torch.equal(db, db2)
    else:
        # The grouped shrink computes t in tiles of sorted rows, and moving an id from L to -1
        # shifts which tile (and which position in it) each row lands in; a dot's rows need
        # not be bitwise independent of their tile position (BLAS under the interpreter, MMA
        # fragments on a GPU). Both runs must then meet the tolerance rule on the same
        # reference: the adapters' gradients of the clean ids.
        x64, w64, a64, bb64, sc64, dy64 = _f64(x, w, a, bb, scales, dy)
        rid = _ref_ids(ids_clean, num_adapters).to(x64.device)
        g64 = R.lora_linear_multi_backward(dy64, x64, w64, a64, bb64, sc64, rid)
        xs, as_, bs = (t.detach().clone().requires_grad_(True) for t in (x, a, bb))
        torch_same_dtype(xs, w, b, as_, bs, scales, ids_clean).backward(dy)
        for grad_name, grads in (("dA", (da, da2)), ("dB", (db, db2))):
            ref64, base = (g64[1], as_.grad) if grad_name == "dA" else (g64[2], bs.grad)
            for tag, grad in zip(("ids", "clean ids"), grads, strict=True):
                assert_close_to_ref(f"{grad_name} ({tag})", grad, ref64, base)


@pytest.mark.parametrize("impl", IMPLS)
def test_ranks_skip_padding(impl):
    """With ``ranks``, whatever sits in the padded slots is never read: y, s, dx as with zero
    padding, and the padded slots' gradients are zero."""
    fwd, bwd, kw = _launchers(impl)
    m, k, n, num_adapters, r_max = 24, 33, 17, 4, 16
    x, w, b, a, bb, scales, ranks = make_stacks(m, k, n, num_adapters, r_max, torch.float32)
    ids = make_ids("uniform", m, num_adapters)
    pad = torch.arange(r_max, device=DEVICE)[None, :] >= ranks[:, None]  # [L, r_max]
    a_junk = torch.where(pad[:, :, None], torch.randn_like(a), a)
    bb_junk = torch.where(pad[:, None, :], torch.randn_like(bb), bb)
    y, s = fwd(x, w, b, a, bb, scales, ids, ranks, **kw)
    y2, s2 = fwd(x, w, b, a_junk, bb_junk, scales, ids, ranks, **kw)
    torch.testing.assert_close(y2, y)
    torch.testing.assert_close(s2, s)
    dy = torch.randn_like(y)
    dx, da, db = bwd(dy, x, w, a, bb, scales, ids, s, ranks, **kw)
    dx2, da2, db2 = bwd(dy, x, w, a_junk, bb_junk, scales, ids, s2, ranks, **kw)
    torch.testing.assert_close(dx2, dx)
    torch.testing.assert_close(da2, da)
    torch.testing.assert_close(db2, db)
    assert (da2[pad] == 0).all() and (db2.transpose(1, 2)[pad] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_unused_adapters_get_zero_gradient_and_flags(impl):
    fwd, bwd, kw = _launchers(impl)
    x, w, b, a, bb, scales, ranks = make_stacks(9, 17, 13, 5, 4, torch.float32)
    ids = torch.tensor([0, 2, 2, -1, 0, 2, -1, 0, 0], device=DEVICE)
    y, s = fwd(x, w, b, a, bb, scales, ids, None, **kw)
    dy = torch.randn_like(y)
    dx, da, db = bwd(dy, x, w, a, bb, scales, ids, s, None, **kw)
    for unused in (1, 3, 4):
        assert (da[unused] == 0).all() and (db[unused] == 0).all()
    only_db = bwd(dy, x, w, a, bb, scales, ids, s, None, needs_dx=False, needs_da=False, **kw)
    assert only_db[0] is None and only_db[1] is None
    torch.testing.assert_close(only_db[2], db)
    only_dx = bwd(dy, x, w, a, bb, scales, ids, s, None, needs_da=False, needs_db=False, **kw)
    assert only_dx[1] is None and only_dx[2] is None
    torch.testing.assert_close(only_dx[0], dx)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_strategy_choice():
    choose = _triton_multi.choose_strategy
    assert choose(1, 1) == "gather"
    assert choose(64, 8) == "gather"  # decode
    assert choose(512, 128) == "gather"  # few rows per adapter
    assert choose(4096, 8) == "grouped"  # prefill
    assert choose(2048, 128) == "grouped"
    assert choose(4096, 128) == "grouped"


@pytest.mark.skipif(not (HAS_TRITON and interpreting()), reason="counts under the interpreter")
def test_gather_decode_reads_each_present_adapters_lora_b_once_in_wide_tiles():
    """The gather forward's expand is one dot per adapter present in the tile (each present
    adapter's lora_b slice read once, full 32-byte sectors at rank 16), in N tiles 256 wide for
    decode (M <= 16): with the former per-row CUDA-core epilogue (rank chunks of 8, half
    sectors) lora_b moved 2x, and 64-wide tiles read x once per 64 columns."""
    from tools import traffic_cases

    rep = traffic_cases.multi(4, 64, 256, 16, distinct=2, pool=4, strategy="gather")
    assert rep.operands["lora_b"].moved == rep.operands["lora_b"].compulsory
    fused = [ln for ln in rep.launches if ln["kernel"] == "_lora_multi_fused_kernel"]
    assert len(fused) == 1 and fused[0]["meta"]["BLOCK_N"] == 256
    # x once in the shrink, then once per N tile: 256 columns in one tile (K = 64 is two K
    # tiles, too few to split on a 132-SM plan once the partials' share is counted)
    assert rep.operands["x"].moved == 2 * rep.operands["x"].compulsory


def _spy_splits(monkeypatch):
    """Record the split count of every gather decode call (the planner's first result)."""
    plans = []
    real = _triton_multi.gather_splits

    def spy(*args):
        out = real(*args)
        plans.append(out[0])
        return out

    monkeypatch.setattr(_triton_multi, "gather_splits", spy)
    return plans


@pytest.mark.skipif(not (HAS_TRITON and interpreting()), reason="the interpreter's split plan")
@pytest.mark.parametrize("deterministic", [False, True])
def test_gather_decode_splits_over_k(monkeypatch, deterministic):
    """The gather decode (M <= 16) splits the base GEMM over K (the interpreter's planner assumes
    few SMs, so these shapes split), with the LoRA term and the bias added once: forward and
    dx and the adapter gradients against the reference, in both reduction modes (atomics,
    per-split partials)."""
    plans = _spy_splits(monkeypatch)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        check_multi("triton-gather", 7, 1000, 70, 3, 16, "uniform", torch.float16)
        check_multi("triton-gather", 5, 611, 33, 2, 7, "skewed", torch.bfloat16,
                    lora_dtype=torch.float32)  # fmt: skip
        check_multi("triton-gather", 4, 512, 256, 4, 16, "distinct", torch.float32)
    finally:
        torch.use_deterministic_algorithms(previous)
    # each call plans its forward, then dx (whose K is the layer's N: the last one splits too)
    assert len(plans) == 6 and min(plans[0::2]) >= 2 and plans[-1] >= 2, plans


@pytest.mark.skipif(not (HAS_TRITON and interpreting()), reason="the interpreter's split plan")
def test_gather_decode_split_is_bitwise_repeatable_and_base_rows_stay_base(monkeypatch):
    """Deterministic mode: no atomics, the partials summed in split order, so two calls give the
    same bits; rows with id -1 or an id >= L get the base layer (and s = 0)."""
    plans = _spy_splits(monkeypatch)
    fwd = _triton_multi.lora_linear_multi_fwd
    x, w, b, a, bb, scales, ranks = make_stacks(9, 1000, 70, 3, 16, torch.float16)
    ids = torch.tensor([0, -1, 2, 3, 1, 0, 7, 2, 1])
    base = (ids < 0) | (ids >= 3)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        y1, s1 = fwd(x, w, b, a, bb, scales, ids, ranks, strategy="gather")
        y2, s2 = fwd(x, w, b, a, bb, scales, ids, ranks, strategy="gather")
    finally:
        torch.use_deterministic_algorithms(previous)
    assert min(plans) >= 2, plans
    assert torch.equal(y1, y2) and torch.equal(s1, s2)
    assert (s1[base] == 0).all()
    y_base = torch.addmm(b.double(), x.double(), w.double().T)
    assert_close_to_ref("y[base]", y1[base], y_base[base], (x @ w.T + b)[base])


@pytest.mark.gpu
@pytest.mark.skipif(not (ON_GPU and HAS_TRITON), reason="needs CUDA and Triton")
def test_decode_forward_in_cuda_graph():
    """The decode forward has no host synchronisation: it captures in a CUDA graph and replays
    equal to eager, with new ids and inputs copied into the captured buffers."""
    fwd = _triton_multi.lora_linear_multi_fwd
    m, k, n, num_adapters = 64, 512, 512, 16
    x, w, b, a, bb, scales, ranks = make_stacks(m, k, n, num_adapters, 16, torch.bfloat16)
    ids = make_ids("uniform", m, num_adapters)
    for strategy in ("gather", "grouped"):
        fwd(x, w, b, a, bb, scales, ids, ranks, strategy=strategy)  # compile outside capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y_graph, s_graph = fwd(x, w, b, a, bb, scales, ids, ranks, strategy=strategy)
        x.copy_(torch.randn_like(x))
        ids.copy_(make_ids("distinct", m, num_adapters))
        graph.replay()
        y_eager, s_eager = fwd(x, w, b, a, bb, scales, ids, ranks, strategy=strategy)
        torch.cuda.synchronize()
        assert torch.equal(y_graph, y_eager) and torch.equal(s_graph, s_eager)


# --------------------------------------------------------------------------------------------
# the public API: lk.lora_linear_multi, the ops, FusedLoraLinear(x, adapter_names=...)
# --------------------------------------------------------------------------------------------

BACKENDS = ["torch"] + (["triton"] if HAS_TRITON else [])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("x_dim", [2, 3])
@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_matches_reference(backend, x_dim, dtype):
    """lk.lora_linear_multi forward and autograd (x, weight, bias, lora_a, lora_b), 2-D x with
    one id per row and 3-D x with one id per sequence."""
    batch, seq, k, n, num_adapters, r_max = 6, 5, 33, 17, 3, 8
    m = batch * seq if x_dim == 2 else batch
    x, w, b, a, bb, scales, ranks = make_stacks(batch * seq, k, n, num_adapters, r_max, dtype)
    if x_dim == 3:
        x = x.reshape(batch, seq, k)
    ids = make_ids("uniform", m, num_adapters, torch.int32)
    leaves = [t.requires_grad_(True) for t in (x, w, b, a, bb)]
    y = lk.lora_linear_multi(x, w, b, a, bb, scales, ids, ranks=ranks, backend=backend)
    dy = torch.randn_like(y)
    y.backward(dy)

    x64, w64, b64, a64, bb64, sc64, dy64 = _f64(x, w, b, a, bb, scales, dy)
    y64 = R.lora_linear_multi(x64, w64, b64, a64, bb64, sc64, ids.cpu())
    dx64, da64, db64 = R.lora_linear_multi_backward(dy64, x64, w64, a64, bb64, sc64, ids.cpu())
    dy2 = dy64.reshape(-1, n)
    dw64, dbias64 = dy2.T @ x64.reshape(-1, k), dy2.sum(0)

    base = [t.detach().clone().requires_grad_(True) for t in leaves]
    rows = ids.long().repeat_interleave(seq) if x_dim == 3 else ids
    y_base = torch_same_dtype(base[0].reshape(-1, k), *base[1:], scales, rows)
    y_base.backward(dy.reshape(-1, n))

    assert y.shape == (*x.shape[:-1], n) and y.dtype == dtype
    assert_close_to_ref("y", y, y64, y_base.reshape(y.shape))
    for name, got, ref, bl in zip(
        ["dx", "dW", "dbias", "dA", "dB"],
        [t.grad for t in leaves],
        [dx64, dw64, dbias64, da64, db64],
        [t.grad for t in base],
        strict=True,
    ):
        assert_close_to_ref(name, got, ref, bl)


def test_functional_gradcheck_float64():
    x, w, b, a, bb, scales, ranks = make_stacks(7, 5, 4, 3, 3, torch.float64)
    ids = torch.tensor([0, 2, -1, 1, 0, 2, 2], device=DEVICE)
    inputs = [t.requires_grad_(True) for t in (x, w, b, a, bb)]

    def f(x, w, b, a, bb):
        return lk.lora_linear_multi(x, w, b, a, bb, scales, ids, ranks=ranks, backend="torch")

    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_multi_ops(backend):
    x, w, b, a, bb, scales, ranks = make_stacks(9, 17, 13, 3, 5, torch.float32)
    ids = torch.tensor([0, 2, -1, 1, 0, 2, 2, -1, 1], dtype=torch.int32, device=DEVICE)
    for t in (x, a, bb):
        t.requires_grad_(True)
    rk = ranks if backend == "torch" else None  # both forms of the optional ranks
    torch.library.opcheck(
        torch.ops.lora_kernels.lora_linear_multi_fwd, (x, w, b, a, bb, scales, ids, rk, backend)
    )
    y, s = torch.ops.lora_kernels.lora_linear_multi_fwd(
        *(t.detach() for t in (x, w, b, a, bb)), scales, ids, ranks, backend
    )
    dy = torch.randn_like(y)
    for needs in [(True, True, True), (False, True, False)]:
        torch.library.opcheck(
            torch.ops.lora_kernels.lora_linear_multi_bwd,
            (dy, x.detach(), w, a.detach(), bb.detach(), scales, ids, s, ranks, *needs, backend),
        )


def test_compile_fullgraph_multi():
    x, w, b, a, bb, scales, ranks = make_stacks(8, 16, 12, 3, 4, torch.float32)
    ids = torch.tensor([0, 1, 2, -1, 1, 1, 0, 2], device=DEVICE)
    a.requires_grad_(True)

    def loss(x, a):
        return lk.lora_linear_multi(x, w, b, a, bb, scales, ids, ranks=ranks).square().sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got = compiled(x, a)
    (ga,) = torch.autograd.grad(got, a)
    want = loss(x, a)
    (wa,) = torch.autograd.grad(want, a)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(ga, wa)


def _bad_inputs():
    """Valid CPU inputs (values are checked on CPU tensors, where that needs no sync)."""
    tensors = make_stacks(4, 8, 6, 3, 2, torch.float32)
    x, w, b, a, bb, scales, ranks = (t.cpu() for t in tensors)
    ids = torch.tensor([0, 1, -1, 2])
    return dict(
        x=x, weight=w, bias=b, lora_a=a, lora_b=bb, scales=scales, adapter_ids=ids, ranks=ranks
    )


BAD_CASES = [
    # (what to change, replacement, error type, words the message must hold)
    (
        "adapter_ids",
        lambda t: torch.tensor([0, 3, -1, 2]),
        ValueError,
        ["adapter_ids", "[-1, 3)", "[3]"],
    ),
    ("adapter_ids", lambda t: torch.tensor([0, 1, -2, 2]), ValueError, ["adapter_ids", "[-2]"]),
    ("adapter_ids", lambda t: t.float(), TypeError, ["adapter_ids", "torch.float32"]),
    ("adapter_ids", lambda t: t[:3], ValueError, ["adapter_ids", "[4]", "[3]"]),
    ("adapter_ids", lambda t: t[:, None], ValueError, ["adapter_ids", "[4, 1]"]),
    ("lora_b", lambda t: t[:2], ValueError, ["lora_b", "[3, 6, 2]", "[2, 6, 2]"]),
    ("lora_a", lambda t: t[:, :, :7], ValueError, ["lora_a", "[3, 2, 8]", "[3, 2, 7]"]),
    ("lora_b", lambda t: t[:, :5], ValueError, ["lora_b", "[3, 6, 2]", "[3, 5, 2]"]),
    ("lora_b", lambda t: t[:, :, :1], ValueError, ["lora_b", "[3, 6, 2]", "[3, 6, 1]"]),
    ("lora_a", lambda t: t[0], ValueError, ["lora_a", "[L, r_max, 8]"]),
    ("lora_a", lambda t: t.half(), TypeError, ["lora_a", "float16"]),
    ("scales", lambda t: t[:2], ValueError, ["scales", "[3]", "[2]"]),
    ("scales", lambda t: [1.0, 2.0], ValueError, ["scales", "[3]", "[2]"]),
    ("scales", lambda t: 0.5, TypeError, ["scales", "float"]),
    (
        "ranks",
        lambda t: torch.tensor([1, 3, 2], dtype=torch.int32),
        ValueError,
        ["ranks", "[0, 2]"],
    ),
    ("ranks", lambda t: t[:2], ValueError, ["ranks", "[3]", "[2]"]),
    ("weight", lambda t: t[:, :7], ValueError, ["weight", "[6, 8]", "[6, 7]"]),
    ("bias", lambda t: t[:5], ValueError, ["bias", "[6]", "[5]"]),
    ("x", lambda t: t[None, None], ValueError, ["x", "[M, K] or [B, T, K]"]),
    ("lora_a", lambda t: t.to("meta"), ValueError, ["lora_a", "meta"]),
    ("adapter_ids", lambda t: t.to("meta"), ValueError, ["adapter_ids", "meta"]),
]


@pytest.mark.parametrize(
    "arg,change,exc,words", BAD_CASES, ids=lambda v: getattr(v, "__name__", None)
)
def test_bad_input_errors(arg, change, exc, words):
    kw = _bad_inputs()
    kw[arg] = change(kw[arg])
    args = [kw.pop(k) for k in ("x", "weight", "bias", "lora_a", "lora_b", "scales", "adapter_ids")]
    with pytest.raises(exc) as info:
        lk.lora_linear_multi(*args, **kw)
    msg = str(info.value)
    assert "lora_linear_multi" in msg
    for word in words:
        assert word in msg, f"{word!r} not in {msg!r}"


def _layers_and_peft(k=16, n=12, backend="torch"):
    """A FusedLoraLinear with adapters "sql" (r=4) and "chat" (r=2, rsLoRA), and a PEFT model
    with the same weights."""
    peft = pytest.importorskip("peft")
    base = nn.Sequential(nn.Linear(k, n)).to(DEVICE)
    cfgs = {
        "sql": peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"], init_lora_weights=False),
        "chat": peft.LoraConfig(
            r=2, lora_alpha=3, target_modules=["0"], init_lora_weights=False, use_rslora=True
        ),
    }
    peft_model = peft.get_peft_model(copy.deepcopy(base), cfgs["sql"], adapter_name="sql")
    peft_model.add_adapter("chat", cfgs["chat"])
    peft_model.eval()
    layer = lk.FusedLoraLinear.from_linear(base[0], r=0, backend=backend)
    peft_linear = peft_model.base_model.model[0]
    for name, cfg in cfgs.items():
        layer.add_adapter(name, cfg.r, cfg.lora_alpha, use_rslora=cfg.use_rslora)
        with torch.no_grad():
            layer.lora_A[name].weight.copy_(peft_linear.lora_A[name].weight)
            layer.lora_B[name].weight.copy_(peft_linear.lora_B[name].weight)
        assert layer.scaling[name] == pytest.approx(peft_linear.scaling[name])
    return layer, peft_model


@pytest.mark.parametrize("x_dim", [2, 3])
@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_mixed_batch_matches_single_adapters_and_peft(backend, x_dim):
    layer, peft_model = _layers_and_peft(backend=backend)
    layer.eval()
    names = ["sql", "chat", "__base__", "chat", "sql", "sql", "__base__"]
    x = torch.randn(len(names), *([3] if x_dim == 3 else []), 16, device=DEVICE)
    with torch.no_grad():
        y = layer(x, adapter_names=names)
        y_peft = peft_model(x, adapter_names=names)
        for name in ("sql", "chat", "__base__"):
            rows = [i for i, n in enumerate(names) if n == name]
            if name == "__base__":
                alone = F.linear(x[rows], layer.weight, layer.bias)
            else:
                layer.set_adapter(name)
                alone = layer(x[rows])
            torch.testing.assert_close(y[rows], alone)
    torch.testing.assert_close(y, y_peft)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_trains_two_adapters_in_one_batch(backend):
    """Each adapter's lora_A/lora_B weights get the gradient of exactly its own rows."""
    layer, _ = _layers_and_peft(backend=backend)
    layer.train()
    names = ["chat", "sql", "sql", "__base__", "chat", "sql"]
    x = torch.randn(len(names), 16, device=DEVICE, requires_grad=True)
    dy = torch.randn(len(names), 12, device=DEVICE)
    layer(x, adapter_names=names).backward(dy)
    got = {n: (layer.lora_A[n].weight.grad, layer.lora_B[n].weight.grad) for n in ("sql", "chat")}
    dx_mixed = x.grad.clone()
    for name in ("sql", "chat"):
        rows = [i for i, n in enumerate(names) if n == name]
        layer.zero_grad()
        layer.set_adapter(name)
        xr = x.detach()[rows].requires_grad_(True)
        layer(xr).backward(dy[rows])
        torch.testing.assert_close(got[name][0], layer.lora_A[name].weight.grad)
        torch.testing.assert_close(got[name][1], layer.lora_B[name].weight.grad)
        torch.testing.assert_close(dx_mixed[rows], xr.grad)
    torch.testing.assert_close(dx_mixed[3], dy[3] @ layer.weight)


@torch.no_grad()
def test_layer_stack_cache_follows_adapter_changes():
    """Inference reuses one stack until an adapter is added, removed or changed in place."""
    layer, _ = _layers_and_peft()
    layer.eval()
    names = ["sql", "chat", "__base__"]
    x = torch.randn(3, 16, device=DEVICE)
    y0 = layer(x, adapter_names=names)
    stack = layer._multi_stack
    assert stack is not None
    layer(x, adapter_names=names)
    assert layer._multi_stack is stack  # nothing changed: no restack
    layer.lora_B["chat"].weight.mul_(2.0)  # in place, as an optimizer step or a load would
    y1 = layer(x, adapter_names=names)
    assert layer._multi_stack is not stack
    torch.testing.assert_close(y1[0], y0[0])
    base = F.linear(x, layer.weight, layer.bias)
    torch.testing.assert_close(y1[1] - base[1], 2 * (y0[1] - base[1]))
    layer.lora_A["sql"].weight.zero_()  # changed while no batch reads it...
    layer(x, adapter_names=["chat", "chat", "__base__"])
    torch.testing.assert_close(layer(x, adapter_names=names)[0], base[0])  # ...caught when used
    layer.add_adapter("new", 8, 16, init_lora_weights=False)
    y2 = layer(x, adapter_names=["new", "chat", "sql"])
    layer.set_adapter("new")
    torch.testing.assert_close(y2[0], layer(x[:1])[0])
    layer.delete_adapter("sql")
    with pytest.raises(ValueError, match=r"unknown adapter names \['sql'\]"):
        layer(x, adapter_names=["sql", "chat", "new"])
    layer(x, adapter_names=["chat", "new", "__base__"])
    assert layer._multi_stack["names"] == ("chat", "new")


def test_layer_stack_from_inference_mode_then_autograd():
    """A stack cached under inference_mode is not reused where autograd must save it."""
    layer, _ = _layers_and_peft()
    layer.requires_grad_(False)
    names = ["sql", "chat"]
    x = torch.randn(2, 16, device=DEVICE)
    with torch.inference_mode():
        y_inf = layer(x, adapter_names=names)
    xg = x.clone().requires_grad_(True)
    y = layer(xg, adapter_names=names)
    y.sum().backward()
    torch.testing.assert_close(y.detach(), y_inf)
    assert xg.grad is not None


def test_layer_mixed_batch_errors():
    layer, _ = _layers_and_peft()
    x = torch.randn(3, 16, device=DEVICE)
    with pytest.raises(ValueError, match=r"unknown adapter names \['nope'\].*'sql'"):
        layer(x, adapter_names=["sql", "nope", "__base__"])
    with pytest.raises(ValueError, match="3 names for x of shape"):
        layer(x, adapter_names=["sql", "chat"])
    with pytest.raises(TypeError, match="list of str"):
        layer(x, adapter_names="sql")
    layer.merge("sql")
    with pytest.raises(RuntimeError, match=r"merged.*unmerge\(\)"):
        layer(x, adapter_names=["sql", "chat", "__base__"])


def test_layer_mixed_batch_dropout_in_training():
    """lora_dropout acts on the LoRA input only, per row's adapter; eval mode has none."""
    layer, _ = _layers_and_peft()
    layer.lora_dropout["sql"] = nn.Dropout(0.5)
    names = ["sql", "__base__", "chat", "sql"]
    x = torch.randn(4, 16, device=DEVICE)
    layer.eval()
    y_eval = layer(x, adapter_names=names)
    layer.train()
    y_train = layer(x, adapter_names=names)
    torch.testing.assert_close(y_train[1:3], y_eval[1:3])  # base row and the dropout-free adapter
    assert not torch.allclose(y_train[0], y_eval[0])
