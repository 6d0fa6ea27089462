"""The CUDA C++ kernels (csrc/) against ``lora_kernels.reference``, on a GPU.

Every output buffer is poisoned (NaN) before the call and every element is checked written;
inputs are fresh random tensors for each call. The tolerance rule is the suite's
(``tests/tolerances.py``): at most twice the error of stock PyTorch in the same precision
against the fp64 reference, plus a small floor. Also: ids of -1 and out of range, per-adapter
ranks with garbage in the padded slots, CUDA-graph capture and replay equal to eager, merge
within half an ulp of the exact ``W + scale * B @ A`` (one rounding), which shapes the launchers
accept, and the binding's input errors.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lora_kernels import reference as R
from lora_kernels.backends.cuda import build
from lora_kernels.backends.cuda import lora_linear as cuda_linear
from lora_kernels.backends.cuda import lora_multi as cuda_multi
from lora_kernels.backends.cuda import merge as cuda_merge
from tests.tolerances import assert_close_to_ref

pytestmark = pytest.mark.gpu

DEV = "cuda"
DTYPES = [torch.float16, torch.bfloat16]
SCALE = 1.75
NAN = float("nan")


@pytest.fixture(scope="module")
def ops():
    """The registered ops; a build failure on a GPU machine is a failure, not a skip."""
    ops = build.load_extension()
    if ops is None:
        status = build.extension_status()
        if "nvcc not found" in status or "LORA_KERNELS_BUILD_CUDA=0" in status:
            pytest.skip(status)
        pytest.fail(status)
    return ops


def tensor_core_fp32(fn):
    """fn() with TF32 matmuls: the stock computation in the precision of the kernels' S.

    fp16 and bf16 values are exact in TF32, so a TF32 matmul of upcast data is what the kernels
    do for S: exact products summed in fp32 by the tensor cores, whose additions truncate. An
    IEEE fp32 matmul on the CUDA cores rounds each addition and would be the wrong yardstick.
    """
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        return fn()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def rand(*shape, dtype, fan_in=1):
    return (torch.randn(*shape, device=DEV) / fan_in**0.5).to(dtype)


def make_single(m, k, n, r, dtype, bias=True):
    x = rand(m, k, dtype=dtype)
    w = rand(n, k, dtype=dtype, fan_in=k)
    b = rand(n, dtype=dtype) if bias else None
    a = rand(r, k, dtype=dtype, fan_in=k)
    bb = rand(n, r, dtype=dtype, fan_in=r)
    return x, w, b, a, bb


def poisoned(shape, dtype):
    return torch.full(shape, NAN, dtype=dtype, device=DEV)


def call_single(ops, x, w, b, a, bb, scale, x_lora=None):
    y = poisoned((x.shape[0], w.shape[0]), x.dtype)
    s = poisoned((x.shape[0], a.shape[0]), torch.float32)
    ops.lora_linear_out(x, w, b, a, bb, scale, x_lora, y, s)
    return y, s


def check_single(y, s, x, w, b, a, bb, scale, x_lora=None):
    xl = x if x_lora is None else x_lora
    d = lambda t: None if t is None else t.double()  # noqa: E731
    ref64 = R.lora_linear(d(x), d(w), d(b), d(a), d(bb), scale, d(x_lora))
    base = F.linear(x, w, b) + scale * ((xl @ a.T) @ bb.T)
    assert_close_to_ref("y", y, ref64, base)
    s64 = xl.double() @ a.double().T
    assert_close_to_ref("s", s, s64, tensor_core_fp32(lambda: xl.float() @ a.float().T))


# (K, N): K is a multiple of 8 (the kernels' vector width); N takes every odd size. K = 8 is
# less than one 32-wide chunk, 136 and 1032 end in a partial chunk.
SHAPES = [(8, 1), (136, 7), (1032, 17), (4096, 129), (520, 2049)]
ROWS = [1, 7, 8, 16, 17, 33, 64]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("r", [1, 16, 256])
@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_linear_matches_reference(ops, dtype, m, k, n, r, bias):
    x, w, b, a, bb = make_single(m, k, n, r, dtype, bias)
    assert cuda_linear.supports_lora_linear_fwd(x, w, b, a, bb, SCALE)
    y, s = call_single(ops, x, w, b, a, bb, SCALE)
    check_single(y, s, x, w, b, a, bb, SCALE)


@pytest.mark.parametrize("r", [8, 64])
@pytest.mark.parametrize("m", [2, 32])
@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_linear_other_ranks_and_real_sizes(ops, dtype, m, r):
    x, w, b, a, bb = make_single(m, 4096, 4096, r, dtype)
    check_single(*call_single(ops, x, w, b, a, bb, -0.5), x, w, b, a, bb, -0.5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_linear_dropout_input(ops, dtype):
    """x_lora (PEFT's dropout output) feeds the LoRA branch only."""
    x, w, b, a, bb = make_single(5, 264, 40, 8, dtype)
    x_lora = F.dropout(x, p=0.5, training=True)
    y, s = call_single(ops, x, w, b, a, bb, SCALE, x_lora)
    check_single(y, s, x, w, b, a, bb, SCALE, x_lora)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_linear_strided_rows(ops, dtype):
    """Row strides other than K (views into wider buffers) are read through the strides."""
    m, k, n, r = 9, 136, 33, 16
    x = rand(m, k + 24, dtype=dtype)[:, :k]
    w = rand(n, k + 8, dtype=dtype, fan_in=k)[:, :k]
    a = rand(r, k + 16, dtype=dtype, fan_in=k)[:, :k]
    bb = rand(n, r + 3, dtype=dtype, fan_in=r)[:, :r]
    b = rand(n, dtype=dtype)
    assert cuda_linear.supports_lora_linear_fwd(x, w, b, a, bb, SCALE)
    y = poisoned((m, n + 5), dtype)[:, :n]
    s = poisoned((m, r), torch.float32)
    ops.lora_linear_out(x, w, b, a, bb, SCALE, None, y, s)
    check_single(y, s, x, w, b, a, bb, SCALE)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_linear_fresh_inputs_each_call(ops, dtype):
    """Two calls in a row with new data: nothing carries over from the first."""
    for _ in range(2):
        x, w, b, a, bb = make_single(3, 264, 72, 16, dtype)
        check_single(*call_single(ops, x, w, b, a, bb, SCALE), x, w, b, a, bb, SCALE)


def test_launcher_matches_raw_op_and_public_api(ops):
    import lora_kernels as lk

    x, w, b, a, bb = make_single(4, 264, 72, 16, torch.bfloat16)
    y, s = cuda_linear.lora_linear_fwd(x, w, b, a, bb, SCALE)
    y_raw, s_raw = call_single(ops, x, w, b, a, bb, SCALE)
    assert torch.equal(y, y_raw) and torch.equal(s, s_raw)
    assert torch.equal(lk.lora_linear(x, w, b, a, bb, SCALE, backend="cuda"), y)


# ---------------------------------------------------------------------------------------------
# multi-adapter
# ---------------------------------------------------------------------------------------------


def make_ids(m, num_adapters, popularity):
    if popularity == "distinct":
        return torch.arange(m, device=DEV) % num_adapters
    if popularity == "identical":
        return torch.full((m,), num_adapters - 1, device=DEV)
    # "mixed": base rows (-1) and ids out of range on both sides, which mean base only too.
    ids = torch.randint(0, num_adapters, (m,), device=DEV)
    specials = torch.tensor([-1, num_adapters, -7, num_adapters + 100], device=DEV)
    ids[::2] = specials[torch.arange(0, m, 2, device=DEV) % 4]
    return ids


def check_multi(y, s, x, w, b, a, bb, scales, ids, ranks):
    """Reference: out-of-range ids are -1, padded rank slots are zeros."""
    num_adapters, r_max = a.shape[0], a.shape[1]
    valid = (ids >= 0) & (ids < num_adapters)
    ids_ref = torch.where(valid, ids, torch.full_like(ids, -1))
    rk = ranks if ranks is not None else torch.full((num_adapters,), r_max, device=DEV)
    keep = torch.arange(r_max, device=DEV)[None, :] < rk[:, None]  # [L, r]
    a0 = a.double() * keep[:, :, None]
    b0 = bb.double() * keep[:, None, :]
    d = lambda t: None if t is None else t.double()  # noqa: E731
    ref64 = R.lora_linear_multi(d(x), d(w), d(b), a0, b0, scales.double(), ids_ref)

    # Stock PyTorch in the same precision: gather each row's adapter, two batched products.
    safe = ids_ref.clamp(min=0)
    a_rows = a * keep[:, :, None].to(a.dtype)
    b_rows = bb * keep[:, None, :].to(bb.dtype)
    s_lp = torch.bmm(x[:, None, :], a_rows[safe].transpose(1, 2))  # [M, 1, r]
    lora = torch.bmm(s_lp, b_rows[safe].transpose(1, 2))[:, 0]  # [M, N]
    lora = lora * scales[safe].to(x.dtype)[:, None] * valid[:, None].to(x.dtype)
    assert_close_to_ref("y", y, ref64, F.linear(x, w, b) + lora)

    s64 = torch.einsum("mk,mrk->mr", x.double(), a0[safe]) * valid[:, None]
    s32 = tensor_core_fp32(
        lambda: torch.bmm(x.float()[:, None, :], a_rows.float()[safe].transpose(1, 2))[:, 0]
    )
    assert_close_to_ref("s", s, s64, s32 * valid[:, None])
    assert torch.all(s[~valid] == 0), "rows with no adapter must get s = 0"


def call_multi(ops, x, w, b, a, bb, scales, ids, ranks):
    m, n, r = x.shape[0], w.shape[0], a.shape[1]
    y = poisoned((m, n), x.dtype)
    s = poisoned((m, r), torch.float32)
    ranks32 = None if ranks is None else ranks.to(torch.int32)
    ops.lora_linear_multi_out(x, w, b, a, bb, scales, ids.to(torch.int32), ranks32, y, s)
    return y, s


@pytest.mark.parametrize("ranked", [False, True])
@pytest.mark.parametrize("popularity", ["distinct", "identical", "mixed"])
@pytest.mark.parametrize("num_adapters", [1, 3, 8])
@pytest.mark.parametrize(
    "m,k,n,r", [(1, 8, 7, 16), (7, 136, 129, 16), (33, 1032, 17, 64), (64, 520, 2049, 8)]
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_multi_matches_reference(ops, dtype, m, k, n, r, num_adapters, popularity, ranked):
    x = rand(m, k, dtype=dtype)
    w = rand(n, k, dtype=dtype, fan_in=k)
    b = rand(n, dtype=dtype)
    a = rand(num_adapters, r, k, dtype=dtype, fan_in=k)
    bb = rand(num_adapters, n, r, dtype=dtype, fan_in=r)
    scales = torch.rand(num_adapters, device=DEV) * 2 + 0.25
    ids = make_ids(m, num_adapters, popularity)
    # Mixed ranks 1..r; the padded slots hold garbage the kernels must not read.
    ranks = torch.randint(1, r + 1, (num_adapters,), device=DEV) if ranked else None
    assert cuda_multi.supports_lora_linear_multi_fwd(x, w, b, a, bb, scales, ids, ranks)
    y, s = call_multi(ops, x, w, b, a, bb, scales, ids, ranks)
    check_multi(y, s, x, w, b, a, bb, scales, ids, ranks)


@pytest.mark.parametrize("dtype", DTYPES)
def test_multi_launcher_int64_ids_and_base_rows(ops, dtype):
    """The launcher takes int64 ids (clamped, never wrapped into range); -1 rows equal the base."""
    m, k, n, r, num_adapters = 6, 264, 40, 16, 2
    x = rand(m, k, dtype=dtype)
    w = rand(n, k, dtype=dtype, fan_in=k)
    a = rand(num_adapters, r, k, dtype=dtype, fan_in=k)
    bb = rand(num_adapters, n, r, dtype=dtype, fan_in=r)
    scales = torch.tensor([0.5, 2.0], device=DEV)
    ids = torch.tensor([-1, 0, 1, 2**32, -(2**33), 1], device=DEV, dtype=torch.int64)
    y, s = cuda_multi.lora_linear_multi_fwd(x, w, None, a, bb, scales, ids)
    check_multi(y, s, x, w, None, a, bb, scales, ids, None)
    base, _ = cuda_linear.lora_linear_fwd(x, w, None, a[0], bb[0] * 0, 1.0)
    for i in (0, 3, 4):
        assert torch.equal(y[i], base[i])


# ---------------------------------------------------------------------------------------------
# CUDA graphs
# ---------------------------------------------------------------------------------------------


def _capture(fn):
    """Warm up on a side stream (as torch recommends), then capture fn() in a graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


@pytest.mark.parametrize("m", [1, 8, 24])
@pytest.mark.parametrize("dtype", DTYPES)
def test_graph_replay_equals_eager_single(ops, dtype, m):
    static = make_single(m, 1032, 257, 16, dtype)
    graph, (y_g, s_g) = _capture(lambda: cuda_linear.lora_linear_fwd(*static, SCALE))
    for _ in range(2):
        for dst, src in zip(static, make_single(m, 1032, 257, 16, dtype), strict=True):
            dst.copy_(src)
        graph.replay()
        y, s = cuda_linear.lora_linear_fwd(*static, SCALE)
        assert torch.equal(y_g, y) and torch.equal(s_g, s)
        check_single(y_g, s_g, *static, SCALE)


@pytest.mark.parametrize("dtype", DTYPES)
def test_graph_replay_equals_eager_multi(ops, dtype):
    m, k, n, r, num_adapters = 8, 1032, 257, 16, 4

    def fresh():
        return (
            rand(m, k, dtype=dtype),
            rand(n, k, dtype=dtype, fan_in=k),
            rand(n, dtype=dtype),
            rand(num_adapters, r, k, dtype=dtype, fan_in=k),
            rand(num_adapters, n, r, dtype=dtype, fan_in=r),
            torch.rand(num_adapters, device=DEV) + 0.5,
            make_ids(m, num_adapters, "mixed").to(torch.int32),
        )

    static = fresh()
    graph, (y_g, s_g) = _capture(lambda: cuda_multi.lora_linear_multi_fwd(*static))
    for _ in range(2):
        for dst, src in zip(static, fresh(), strict=True):
            dst.copy_(src)
        graph.replay()
        y, s = cuda_multi.lora_linear_multi_fwd(*static)
        assert torch.equal(y_g, y) and torch.equal(s_g, s)
        check_multi(y_g, s_g, *static, None)


# ---------------------------------------------------------------------------------------------
# merge
# ---------------------------------------------------------------------------------------------

_MANTISSA_BITS = {torch.float16: 11, torch.bfloat16: 8, torch.float32: 24}
_MIN_SPACING = {torch.float16: 2.0**-24, torch.bfloat16: 2.0**-133, torch.float32: 2.0**-149}


def ulp(x: torch.Tensor) -> torch.Tensor:
    """Spacing above |x| in x's dtype, in float64."""
    _, exp = torch.frexp(x.double().abs())
    spacing = torch.ldexp(torch.ones_like(x, dtype=torch.float64), exp - _MANTISSA_BITS[x.dtype])
    return spacing.clamp(min=_MIN_SPACING[x.dtype])


def assert_single_rounding(out, w, a, b, scale):
    """|out - exact| <= half an ulp of out, plus the error bound of the fp32 sum itself."""
    exact = w.double() + scale * (b.double() @ a.double())
    r = a.shape[0]
    fp32_err = (r + 2) * 2.0**-24 * abs(scale) * (b.double().abs() @ a.double().abs())
    fp32_err = fp32_err + 2.0**-24 * w.double().abs()
    err = (out.double() - exact).abs()
    bound = 0.5 * ulp(out) + fp32_err
    assert torch.isfinite(out).all()
    assert (err <= bound).all(), f"error up to {(err / bound).max().item():.3f}x the bound"
    if out.dtype != torch.float32 and out.numel() >= 1000:
        # Correctly rounded but where the fp32 sum sits within its own error of a tie (a few
        # per thousand at most for fp16 and rank 256); a second rounding would miss far more.
        same = (out == exact.to(out.dtype)).double().mean().item()
        assert same > 0.99, f"only {same:.4f} of the elements are correctly rounded"


@pytest.mark.parametrize("scale", [0.37, -1.5])
@pytest.mark.parametrize(
    "n,k,r",
    [(1, 8, 1), (7, 16, 7), (17, 136, 16), (129, 1032, 17), (2049, 264, 64), (64, 4096, 256)],
)
@pytest.mark.parametrize("dtype", [*DTYPES, torch.float32])
def test_merge_single_rounding(ops, dtype, n, k, r, scale):
    w = torch.randn(n, k, device=DEV).to(dtype)
    a = (torch.randn(r, k, device=DEV) / r**0.25).to(dtype)
    b = (torch.randn(n, r, device=DEV) / r**0.25).to(dtype)
    assert cuda_merge.supports_merge_(w, a, b, scale)
    out = w.clone()
    assert cuda_merge.merge_(out, a, b, scale) is out
    assert_single_rounding(out, w, a, b, scale)


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float32])
def test_merge_strided_weight_and_public_api(ops, dtype):
    import lora_kernels as lk

    n, k, r = 100, 264, 12
    big = torch.randn(n, k + 16, device=DEV).to(dtype)
    w = big[:, 8 : 8 + k]  # 16-byte aligned rows with stride k + 16
    a = (torch.randn(r, k, device=DEV) / r**0.25).to(dtype)
    b = (torch.randn(n, r, device=DEV) / r**0.25).to(dtype)
    before = big.clone()
    cuda_merge.merge_(w, a, b, 0.8)
    assert_single_rounding(w, before[:, 8 : 8 + k], a, b, 0.8)
    assert torch.equal(big[:, :8], before[:, :8]) and torch.equal(
        big[:, 8 + k :], before[:, 8 + k :]
    )
    again = before[:, 8 : 8 + k].clone()
    lk.merge_lora_(again, a, b, 0.8, backend="cuda")
    assert torch.equal(again, w)


# ---------------------------------------------------------------------------------------------
# what the launchers accept, and the binding's errors
# ---------------------------------------------------------------------------------------------


def test_supports_rejects_what_the_kernels_do_not_serve(ops):
    x, w, b, a, bb = make_single(4, 136, 24, 8, torch.bfloat16)
    sup = cuda_linear.supports_lora_linear_fwd
    assert sup(x, w, b, a, bb, SCALE)
    assert not sup(*make_single(4, 2049, 24, 8, torch.bfloat16), SCALE)  # K % 8
    assert not sup(*make_single(65, 136, 24, 8, torch.bfloat16), SCALE)  # M > 64
    assert not sup(*make_single(4, 136, 24, 257, torch.bfloat16), SCALE)  # r > 256
    assert not sup(*make_single(4, 136, 24, 8, torch.float32), SCALE)  # fp32
    assert not sup(x, w, b, a.float(), bb.float(), SCALE)  # fp32 adapter on bf16
    assert not sup(rand(4, 144, dtype=torch.bfloat16)[:, 1:137], w, b, a, bb, SCALE)  # alignment
    assert not sup(x.cpu(), w.cpu(), b.cpu(), a.cpu(), bb.cpu(), SCALE)
    wm = torch.randn(64, 2049, device=DEV, dtype=torch.bfloat16)
    am = torch.randn(4, 2049, device=DEV, dtype=torch.bfloat16)
    assert not cuda_merge.supports_merge_(wm, am, torch.randn_like(wm[:, :4]), 1.0)


def _raises(match, fn, *args):
    with pytest.raises(RuntimeError, match=match):
        fn(*args)


def test_binding_errors_name_the_argument(ops):
    m, k, n, r = 4, 136, 24, 8
    x, w, b, a, bb = make_single(m, k, n, r, torch.bfloat16)
    y = poisoned((m, n), x.dtype)
    s = poisoned((m, r), torch.float32)
    op = ops.lora_linear_out
    _raises(
        r"expected lora_b of shape \[24, 8\], got \[24, 7\]",
        op,
        x,
        w,
        b,
        a,
        bb[:, :7],
        1.0,
        None,
        y,
        s,
    )
    _raises(
        r"expected weight of dtype BFloat16, got Half", op, x, w.half(), b, a, bb, 1.0, None, y, s
    )
    _raises(r"expected weight on a CUDA device, got cpu", op, x, w.cpu(), b, a, bb, 1.0, None, y, s)
    _raises(
        r"expected x on a CUDA device, got cpu",
        op,
        x.cpu(),
        w.cpu(),
        b.cpu(),
        a.cpu(),
        bb.cpu(),
        1.0,
        None,
        y.cpu(),
        s.cpu(),
    )
    _raises(
        r"expected at most 64 rows of x",
        op,
        rand(65, k, dtype=x.dtype),
        w,
        b,
        a,
        bb,
        1.0,
        None,
        y,
        s,
    )
    _raises(
        r"expected a rank between 1 and 256, got 257",
        op,
        x,
        w,
        b,
        rand(257, k, dtype=x.dtype),
        bb,
        1.0,
        None,
        y,
        s,
    )
    _raises(r"multiple of 8, got 12", op, x[:, :12], w[:, :12], b, a[:, :12], bb, 1.0, None, y, s)
    _raises(
        r"expected x to start 16-byte aligned",
        op,
        rand(m, k + 8, dtype=x.dtype)[:, 1 : k + 1],
        w,
        b,
        a,
        bb,
        1.0,
        None,
        y,
        s,
    )
    _raises(
        r"expected s of dtype Float, got BFloat16", op, x, w, b, a, bb, 1.0, None, y, s.bfloat16()
    )
    _raises(
        r"expected y of shape \[4, 24\], got \[4, 23\]", op, x, w, b, a, bb, 1.0, None, y[:, :23], s
    )
    assert torch.isnan(y).all() and torch.isnan(s).all(), "a refused call wrote to its outputs"

    la = a[None].expand(2, r, k).contiguous()
    lb = bb[None].expand(2, n, r).contiguous()
    scales = torch.ones(2, device=DEV)
    ids = torch.zeros(m, device=DEV, dtype=torch.int32)
    mop = ops.lora_linear_multi_out
    _raises(
        r"expected row_ids of dtype Int, got Long",
        mop,
        x,
        w,
        b,
        la,
        lb,
        scales,
        ids.long(),
        None,
        y,
        s,
    )
    _raises(
        r"expected scales of shape \[2\], got \[3\]",
        mop,
        x,
        w,
        b,
        la,
        lb,
        torch.ones(3, device=DEV),
        ids,
        None,
        y,
        s,
    )
    _raises(
        r"expected lora_b of shape \[2, 24, 8\]", mop, x, w, b, la, lb[:1], scales, ids, None, y, s
    )
    _raises(r"expected ranks of dtype Int", mop, x, w, b, la, lb, scales, ids, scales, y, s)

    wm = torch.randn(16, 20, device=DEV, dtype=torch.bfloat16)
    before = wm.clone()
    _raises(r"multiple of 8 for BFloat16, got 20", ops.merge_, wm, a[:, :20], bb[:16], 1.0)
    _raises(
        r"expected lora_b of shape \[24, 8\], got \[24, 4\]",
        ops.merge_,
        w.clone(),
        a,
        bb[:, :4],
        1.0,
    )
    assert torch.equal(wm, before)


# ---------------------------------------------------------------------------------------------
# a model served from device slots (lora_kernels.serving): one graph across switches and ids
# ---------------------------------------------------------------------------------------------


class _Blocks(torch.nn.Module):
    def __init__(self, dim=64, hidden=96):
        super().__init__()
        self.blocks = torch.nn.ModuleList(
            torch.nn.ModuleDict(
                {"up": torch.nn.Linear(dim, hidden), "down": torch.nn.Linear(hidden, dim)}
            )
            for _ in range(2)
        )

    def forward(self, x):
        for block in self.blocks:
            x = x + block["down"](torch.relu(block["up"](x)))
        return x


def _served_blocks(dtype):
    """Four adapters in a cache with three slots; a, b, c installed (slots filled), d not yet."""
    import lora_kernels as lk
    from lora_kernels.serving.switch import switch_adapter

    model = _Blocks().to(DEV, dtype)
    lk.get_lora_model(model, lk.LoraConfig(r=4, target_modules=["up", "down"]))
    cache = lk.AdapterCache(1 << 24, dtype=dtype)
    for name, r in (("a", 4), ("b", 8), ("c", 16), ("d", 8)):
        sd = {}
        for path, m in model.named_modules():
            if isinstance(m, lk.FusedLoraLinear):
                sd[f"base_model.model.{path}.lora_A.weight"] = torch.randn(r, m.in_features) / 8
                sd[f"base_model.model.{path}.lora_B.weight"] = torch.randn(m.out_features, r) / 8
        cache.put(name, sd, lk.LoraConfig(r=r, lora_alpha=r, target_modules=["up", "down"]))
    cache.attach(model, num_slots=3, max_rank=16)
    for name in ("a", "b", "c"):
        switch_adapter(model, name, cache=cache)
    return model, cache


@pytest.mark.parametrize("dtype", DTYPES)
def test_served_decode_step_replays_across_switches_and_ids(dtype):
    """A decode step captured once, replayed after one-write switches, after a switch that
    fills a slot, and with new ids written into the mixed-batch buffer: each replay == eager."""
    from lora_kernels.models.model import mixed_batch
    from lora_kernels.serving.state import serving_state
    from lora_kernels.serving.switch import switch_adapter

    model, cache = _served_blocks(dtype)
    assert serving_state(model).graph_safe
    static_x = rand(6, 64, dtype=dtype)

    def step():
        with torch.no_grad():
            return model(static_x)

    def replay_equals_eager(graph, out):
        static_x.copy_(rand(6, 64, dtype=dtype))
        graph.replay()
        assert torch.equal(out, step())

    switch_adapter(model, "a", cache=cache)
    graph, out = _capture(step)
    for name in ("b", None, "c", "d", "a", "d"):  # "d" fills a slot: the per-layer path once
        switch_adapter(model, name, cache=cache)
        replay_equals_eager(graph, out)

    slots = cache.slot_owners()
    with mixed_batch(model, torch.tensor([0, 1, 2, -1, 1, 0], dtype=torch.int32, device=DEV)):
        graph_mixed, out_mixed = _capture(step)
    for _ in range(3):
        ids = torch.randint(-1, 3, (6,), dtype=torch.int32, device=DEV)
        with mixed_batch(model, ids):
            replay_equals_eager(graph_mixed, out_mixed)
            names = ["__base__" if i < 0 else slots[i] for i in ids.tolist()]
            got = out_mixed.clone()
        with mixed_batch(model, names):  # by names, through the same state: the same slots
            assert torch.equal(got, step())


# ---- Triton launches on the tensors' device (not the current one) ----------------------------


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_triton_launches_run_on_the_tensors_device(monkeypatch):
    """A layer on cuda:1 called while cuda:0 is current (device_map="auto") computes on cuda:1."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    from lora_kernels.backends.triton.lora_linear import lora_linear_fwd
    from lora_kernels.backends.triton.lora_multi import lora_linear_multi_fwd
    from lora_kernels.backends.triton.merge import merge_

    dev = torch.device("cuda", 1)
    x = torch.randn(33, 64, device=dev, dtype=torch.bfloat16)
    w = torch.randn(48, 64, device=dev, dtype=torch.bfloat16) / 8
    a = torch.randn(8, 64, device=dev, dtype=torch.bfloat16) / 8
    b = torch.randn(48, 8, device=dev, dtype=torch.bfloat16)
    with torch.cuda.device(0):
        y, _ = lora_linear_fwd(x, w, None, a, b, 0.5)
        ids = torch.zeros(33, dtype=torch.int32, device=dev)
        ym, _ = lora_linear_multi_fwd(
            x, w, None, a[None], b[None], torch.full((1,), 0.5, device=dev), ids
        )
        w2 = w.clone()
        merge_(w2, a, b, 0.5)
    torch.cuda.synchronize(dev)
    x64, w64, a64, b64 = (t.double() for t in (x, w, a, b))
    ref64 = x64 @ w64.T + 0.5 * (x64 @ a64.T) @ b64.T
    baseline = x @ w.T + 0.5 * (x @ a.T) @ b.T  # stock PyTorch in bf16
    for name, got in (("lora_linear_fwd", y), ("lora_linear_multi_fwd", ym)):
        assert got.device == dev
        assert_close_to_ref(name, got, ref64, baseline)
    merged64 = w64 + 0.5 * b64 @ a64
    assert_close_to_ref(
        "merge_", w2, merged64, (w.float() + 0.5 * b.float() @ a.float()).to(w.dtype)
    )
