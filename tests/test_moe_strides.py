"""``lk.moe_lora`` with every argument given as a non-contiguous view: strided (a slice of a
wider buffer, ``top_k_ids`` a column slice of a wider table), transposed (every stride reversed),
offset into its storage, expanded (stride 0), and PEFT's interleaved B; on the torch backend and
on Triton (interpreted), forward and every gradient, against the same call on contiguous copies
and against ``reference.moe_lora``.

The house rule (``lora_kernels/backends/triton/_args.py``): a launcher reads each argument
through its strides or makes it contiguous. Failed before its fix: Triton read ``scale`` by
position, so a strided scale gave a token the scale of another adapter and an expanded one
(stride 0) read past its single element (``test_views_triton[mixed-scale-strided]``,
``[mixed-scale-expanded]``; now made contiguous by the launcher, ``index_vector``).
"""

from __future__ import annotations

import pytest
import torch

import lora_kernels as lk
from lora_kernels import reference as R
from tests.test_moe import GRAD_NAMES, make_problem

FROZEN = ("w_gate_up", "w_down", "bias_gate_up", "bias_down")
INDEX = ("top_k_ids", "adapter_ids", "scale")
ARGS = GRAD_NAMES + FROZEN + INDEX
KINDS = ("strided", "columns", "transposed", "offset", "expanded")

BACKENDS = ["torch"]
if "triton" in lk.available_backends():
    BACKENDS.append("triton")


def view_of(t: torch.Tensor, kind: str) -> torch.Tensor:
    """A view with ``t``'s values (``expanded``: ``t``'s first slice along dim 0 broadcast) in
    the layout ``kind``, built with differentiable ops so gradients reach ``t``."""
    shape = t.shape
    if kind == "strided":  # every other element of a wider buffer, storage offset 1
        wide = t.new_zeros(*shape[:-1], 2 * shape[-1] + 1)
        wide = wide.index_copy(-1, torch.arange(1, 2 * shape[-1], 2), t)
        return wide[..., 1::2]
    if kind == "columns":  # a column block of a wider table (row stride > width, unit stride)
        wide = t.new_zeros(*shape[:-1], shape[-1] + 5)
        wide = wide.index_copy(-1, torch.arange(2, 2 + shape[-1]), t)
        return wide[..., 2 : 2 + shape[-1]]
    if kind == "transposed":  # every stride reversed (column-major)
        dims = tuple(reversed(range(t.dim())))
        return t.permute(dims).contiguous().permute(dims)
    if kind == "offset":  # contiguous, 5 elements into its storage
        return torch.cat([t.new_zeros(5), t.reshape(-1)])[5:].view(shape)
    if kind == "expanded":
        return t[:1].clone().expand(shape)  # a storage of one slice: stride 0 or nothing
    raise AssertionError(kind)


def problem(adapters, dtype):
    p = make_problem(5, 8, 4, 4, 2, 3, adapters=adapters, dtype=dtype, bias=True)
    scale_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    p["scale"] = torch.as_tensor(p["scale"], dtype=scale_dtype).reshape(-1)
    return p


def run(q, backend):
    args = {n: v for n, v in q.items() if n not in ("x", "top_k_ids", "top_k_weights")}
    return lk.moe_lora(q["x"], q["top_k_ids"], q["top_k_weights"], **args, backend=backend,
                       activation="swiglu_oai", swiglu_limit=0.9)  # fmt: skip


def reference(q):
    """The spec in fp64 on ``q``'s values."""
    lead_one = "adapter_ids" not in q
    f = [q[n].double() for n in GRAD_NAMES[2:]]
    f = [t.unsqueeze(0) for t in f] if lead_one else f
    return R.moe_lora(
        q["x"].double(), q["top_k_ids"], q["top_k_weights"].double(), q["w_gate_up"].double(),
        q["w_down"].double(), *f, q["scale"].double(), q.get("adapter_ids"),
        bias_gate_up=q["bias_gate_up"].double(), bias_down=q["bias_down"].double(),
        activation="swiglu_oai", swiglu_limit=0.9,
    )  # fmt: skip


def with_grads(p, fn, dy, view=None):
    """``fn(q)`` and its gradients w.r.t. the differentiable arguments (fresh leaves); ``view``
    ``(name, kind)``: that argument goes in as ``view_of(leaf, kind)``."""
    leaves = {n: p[n].detach().clone().requires_grad_(True) for n in GRAD_NAMES}
    q = dict(p, **leaves)
    if view is not None:
        name, kind = view
        q[name] = view_of(q[name], kind)
    y = fn(q)
    return y, torch.autograd.grad(y, [leaves[n] for n in GRAD_NAMES], dy.to(y.dtype))


# one adapter has no adapter ids: that argument is viewed in mixed batches only
CASES = [(a, n) for a in (None, 2) for n in ARGS if a is not None or n != "adapter_ids"]
CASE_IDS = [f"{'one' if a is None else 'mixed'}-{n}" for a, n in CASES]


def check_view(backend, adapters, name, kind):
    """The call with ``name`` as a ``kind`` view against the same values contiguous, and
    against the spec."""
    dtype = torch.float64 if backend == "torch" else torch.float32
    p = problem(adapters, dtype)
    if name == "adapter_ids" and kind == "expanded":
        p[name][0] = 1  # every token then on adapter 1 (-1 would leave the factors unused)
    if kind == "expanded":  # the values an expanded view holds: the first slice, broadcast
        p[name] = p[name][:1].expand(p[name].shape).contiguous()
    dy = torch.randn(5, 8, dtype=torch.float64)
    y, got = with_grads(p, lambda q: run(q, backend), dy, view=(name, kind))
    y0, want = with_grads(p, lambda q: run(q, backend), dy)
    yr, ref = with_grads(p, reference, dy)
    if dtype == torch.float64:
        same, spec = {"rtol": 1e-10, "atol": 1e-12}, {"rtol": 1e-9, "atol": 1e-10}
    else:  # the same kernel on the same values, its sums in another order at most
        same, spec = {"rtol": 1e-5, "atol": 1e-6}, {"rtol": 2e-4, "atol": 2e-5}
    tag = f"({name} {kind}, {backend})"
    torch.testing.assert_close(y, y0, **same, msg=lambda m: f"y {tag}: {m}")
    torch.testing.assert_close(y.double(), yr, **spec, msg=lambda m: f"y vs spec {tag}: {m}")
    for n, a, b, c in zip(GRAD_NAMES, got, want, ref, strict=True):
        if kind == "expanded" and n == name:
            # the leaf's first slice is broadcast: it gets the sum over dim 0, the rest nothing
            b = torch.cat([b.sum(0, keepdim=True), torch.zeros_like(b[1:])])
            c = torch.cat([c.sum(0, keepdim=True), torch.zeros_like(c[1:])])
        torch.testing.assert_close(a, b, **same, msg=lambda m, n=n: f"d{n} {tag}: {m}")
        torch.testing.assert_close(
            a.double(), c.double(), **spec, msg=lambda m, n=n: f"d{n} vs spec {tag}: {m}"
        )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("adapters", "name"), CASES, ids=CASE_IDS)
def test_views_torch(adapters, name, kind):
    check_view("torch", adapters, name, kind)


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs Triton")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("adapters", "name"), CASES, ids=CASE_IDS)
def test_views_triton(adapters, name, kind):
    check_view("triton", adapters, name, kind)


# --------------------------------------------------------------------------------------------
# PEFT's interleaved factors (experts on the unit stride) and the CPU path's layout cache
# --------------------------------------------------------------------------------------------

FACTORS = GRAD_NAMES[2:]


def interleaved(t: torch.Tensor) -> torch.Tensor:
    """``t [..., E, m, n]`` laid out as PEFT's ``lora_B [out, r E]``: the expert dim innermost."""
    return t.movedim(-3, -1).contiguous().movedim(-1, -3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("t", [1, 5])  # 1: fewer pairs than experts (strided reads); 5: a copy
@pytest.mark.parametrize("adapters", [None, 2], ids=["one", "mixed"])
def test_interleaved_factors(backend, t, adapters):
    dtype = torch.float64 if backend == "torch" else torch.float32
    p = make_problem(t, 8, 4, 4, 2, 3, adapters=adapters, dtype=dtype, bias=True)
    dy = torch.randn(t, 8, dtype=dtype)
    leaves = {n: p[n].detach().clone().requires_grad_(True) for n in GRAD_NAMES}
    views = {n: interleaved(leaves[n]) if n in FACTORS else leaves[n] for n in GRAD_NAMES}
    assert views["lora_b_down"].stride(-3) == 1
    y = run(dict(p, **views), backend)
    got = torch.autograd.grad(y, list(leaves.values()), dy)
    y0, want = with_grads(p, lambda q: run(q, backend), dy)
    same = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {}
    torch.testing.assert_close(y, y0, **same)
    for n, a, b in zip(GRAD_NAMES, got, want, strict=True):
        torch.testing.assert_close(a, b, **same, msg=lambda m, n=n: f"d{n}: {m}")
    with torch.no_grad():  # the cached expert-major copy
        torch.testing.assert_close(run(dict(p, **views), backend), y0, **same)
        torch.testing.assert_close(run(dict(p, **views), backend), y0, **same)


def test_layout_cache_sees_every_write():
    """The no-grad path reuses an expert-major copy of an interleaved factor only while the
    factor's values are unchanged: in-place writes, optimizer steps, a new storage."""
    p = make_problem(3, 8, 4, 4, 2, 3, dtype=torch.float32)
    b = torch.nn.Parameter(interleaved(p["lora_b_gate_up"]).detach())
    p["lora_b_gate_up"] = b

    def check():
        with torch.no_grad():
            got = run(p, "torch")
        q = dict(p, lora_b_gate_up=b.detach().contiguous())
        torch.testing.assert_close(got, run(q, "torch"), rtol=1e-6, atol=1e-6)

    check()
    with torch.no_grad():
        b.mul_(2.0)  # in place on the parameter
    check()
    with torch.no_grad():
        b[1].add_(1.0)  # through a view
    check()
    opt = torch.optim.AdamW([b], lr=0.5)
    b.grad = torch.randn_like(b)
    opt.step()
    check()
    with torch.no_grad():
        b.data = interleaved(torch.randn(b.shape))  # a new storage
    check()
    with torch.inference_mode():
        got = run(p, "torch")
    torch.testing.assert_close(got, run(dict(p, lora_b_gate_up=b.detach().contiguous()), "torch"))
