"""Mixture-of-experts LoRA (``lk.moe_lora``): the torch backend (and Triton, interpreted on CPU)
against the spec ``reference.moe_lora`` on odd sizes, both activations, one or several adapters
per batch, with every gradient; PEFT's factor layout; bad inputs."""

from __future__ import annotations

import pytest
import torch

import lora_kernels as lk
from lora_kernels import reference as R
from lora_kernels.backends.torch import moe as torch_moe
from lora_kernels.ops.moe import moe_lora_2d
from tests.tolerances import assert_close_to_ref

GRAD_NAMES = (
    "x",
    "top_k_weights",
    "lora_a_gate_up",
    "lora_b_gate_up",
    "lora_a_down",
    "lora_b_down",
)


def make_problem(t, hidden, inter, experts, k, r, *, adapters=None, dtype=torch.float64,
                 bias=False, r_down=None, lora_dtype=None):  # fmt: skip
    """Random inputs (never zeros) for one call; ``adapters``: None (one adapter, [E, ...]
    factors) or L (``[L, E, ...]`` factors and per-token ids with some -1)."""
    lora_dtype = lora_dtype or dtype
    lead = () if adapters is None else (adapters,)
    r_down = r if r_down is None else r_down
    p = {
        "x": torch.randn(t, hidden, dtype=dtype),
        "top_k_ids": torch.stack([torch.randperm(experts)[:k] for _ in range(t)]),
        "top_k_weights": torch.rand(t, k, dtype=dtype) + 0.1,
        "w_gate_up": torch.randn(experts, 2 * inter, hidden, dtype=dtype) / hidden**0.5,
        "w_down": torch.randn(experts, hidden, inter, dtype=dtype) / inter**0.5,
        "lora_a_gate_up": torch.randn(*lead, experts, r, hidden, dtype=lora_dtype) / hidden**0.5,
        "lora_b_gate_up": torch.randn(*lead, experts, 2 * inter, r, dtype=lora_dtype) / r**0.5,
        "lora_a_down": torch.randn(*lead, experts, r_down, inter, dtype=lora_dtype) / inter**0.5,
        "lora_b_down": torch.randn(*lead, experts, hidden, r_down, dtype=lora_dtype) / r_down**0.5,
    }
    if adapters is None:
        p["scale"] = 0.75
    else:
        p["scale"] = (
            torch.rand(adapters, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
            + 0.5
        )
        p["adapter_ids"] = torch.randint(-1, adapters, (t,))
    if bias:
        p["bias_gate_up"] = torch.randn(experts, 2 * inter, dtype=dtype)
        p["bias_down"] = torch.randn(experts, hidden, dtype=dtype)
    return p


def run_reference(p, activation="silu", **kw):
    """The spec on ``p``'s tensors (any dtype; the reference accumulates in fp32/fp64)."""
    lead_one = "adapter_ids" not in p
    f = [p[n] for n in GRAD_NAMES[2:]]
    if lead_one:
        f = [t.unsqueeze(0) for t in f]
    scales = p["scale"]
    scales = torch.tensor([scales], dtype=torch.float64) if lead_one else scales
    return R.moe_lora(
        p["x"], p["top_k_ids"], p["top_k_weights"], p["w_gate_up"], p["w_down"], *f, scales,
        p.get("adapter_ids"), bias_gate_up=p.get("bias_gate_up"), bias_down=p.get("bias_down"),
        activation=activation, **kw,
    )  # fmt: skip


def run_stock(p, activation="silu", **kw):
    """Stock PyTorch in the inputs' own dtype (the tolerance rule's baseline): every pair's
    expert weights gathered, batched products, no upcast."""
    x, ids, w = p["x"], p["top_k_ids"], p["top_k_weights"]
    t, k = ids.shape
    tok = torch.arange(t).repeat_interleave(k)
    e = ids.reshape(-1)
    lead_one = "adapter_ids" not in p
    aid = torch.zeros(t, dtype=torch.long) if lead_one else p["adapter_ids"].long()
    aid = aid.repeat_interleave(k)
    on = (aid >= 0).to(x.dtype)[:, None]
    a_ = aid.clamp(min=0)
    f = {n: p[n].unsqueeze(0) if lead_one else p[n] for n in GRAD_NAMES[2:]}
    sc = torch.as_tensor(p["scale"], dtype=x.dtype).reshape(-1)[a_][:, None]
    xs = x[tok]
    g = torch.einsum("ph,poh->po", xs, p["w_gate_up"][e])
    if "bias_gate_up" in p:
        g = g + p["bias_gate_up"][e]
    s = torch.einsum("ph,prh->pr", xs, f["lora_a_gate_up"][a_, e].to(x.dtype))
    g = g + on * sc * torch.einsum("pr,por->po", s, f["lora_b_gate_up"][a_, e].to(x.dtype))
    h = R.moe_activation(g, activation, **kw)
    o = torch.einsum("pi,phi->ph", h, p["w_down"][e])
    if "bias_down" in p:
        o = o + p["bias_down"][e]
    s = torch.einsum("pi,pri->pr", h, f["lora_a_down"][a_, e].to(x.dtype))
    o = o + on * sc * torch.einsum("pr,phr->ph", s, f["lora_b_down"][a_, e].to(x.dtype))
    return (o * w.reshape(-1, 1).to(x.dtype)).reshape(t, k, -1).sum(1)


def call(p, backend="torch", activation="silu", **kw):
    args = {n: v for n, v in p.items() if n not in ("x", "top_k_ids", "top_k_weights")}
    return lk.moe_lora(
        p["x"], p["top_k_ids"], p["top_k_weights"], activation=activation, backend=backend,
        **args, **kw,
    )  # fmt: skip


def cast(p, dtype, lora_dtype=None):
    out = {}
    for n, v in p.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and n != "scale":
            out[n] = v.to(lora_dtype or dtype if n.startswith("lora_") else dtype)
        else:
            out[n] = v
    return out


# --------------------------------------------------------------------------------------------
# Forward against the spec
# --------------------------------------------------------------------------------------------

ACTS = [("silu", {}), ("swiglu_oai", {"swiglu_limit": 0.9, "swiglu_alpha": 1.3})]


@pytest.mark.parametrize("t", [1, 7, 33])
@pytest.mark.parametrize("experts,k", [(4, 1), (5, 2), (8, 2)])
@pytest.mark.parametrize("r", [1, 7, 16])
@pytest.mark.parametrize("act", ACTS, ids=[a for a, _ in ACTS])
def test_forward_fp64(t, experts, k, r, act):
    activation, kw = act
    p = make_problem(t, 11, 5, experts, k, r, bias=activation == "swiglu_oai", r_down=max(r - 2, 1))
    y = call(p, activation=activation, **kw)
    torch.testing.assert_close(y, run_reference(p, activation, **kw), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("adapters", [1, 3])
@pytest.mark.parametrize("act", ACTS, ids=[a for a, _ in ACTS])
def test_mixed_adapters_fp64(adapters, act):
    activation, kw = act
    p = make_problem(33, 9, 6, 6, 2, 5, adapters=adapters, bias=activation == "swiglu_oai")
    p["adapter_ids"][:3] = -1
    y = call(p, activation=activation, **kw)
    torch.testing.assert_close(y, run_reference(p, activation, **kw), rtol=1e-10, atol=1e-10)
    # a token with id -1 gets the base experts only
    base = {
        n: v
        for n, v in p.items()
        if not n.startswith("lora_") and n not in ("adapter_ids", "scale")
    }
    y_base = call(base, activation=activation, **kw)
    torch.testing.assert_close(y[:3], y_base[:3], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("act", ACTS, ids=[a for a, _ in ACTS])
def test_forward_low_precision(dtype, act):
    activation, kw = act
    p64 = make_problem(33, 24, 10, 8, 2, 7, adapters=2, bias=activation == "swiglu_oai")
    p = cast(p64, dtype)
    y = call(p, activation=activation, **kw)
    assert y.dtype == dtype
    assert_close_to_ref(
        "y", y, run_reference(p64, activation, **kw), run_stock(p, activation, **kw)
    )


def test_fp32_adapters_on_bf16_experts():
    p64 = make_problem(7, 16, 8, 4, 2, 4)
    p = cast(p64, torch.bfloat16, lora_dtype=torch.float32)
    y = call(p)
    assert y.dtype == torch.bfloat16
    assert_close_to_ref("y", y, run_reference(p64), run_stock(cast(p64, torch.bfloat16)))


def test_transposed_weights_and_lora_on_one_projection():
    p = make_problem(7, 10, 4, 5, 2, 3, bias=True)
    y = call(p, activation="swiglu_oai")
    pt = dict(p, w_gate_up=p["w_gate_up"].transpose(1, 2).contiguous(),
              w_down=p["w_down"].transpose(1, 2).contiguous())  # fmt: skip
    torch.testing.assert_close(call(pt, activation="swiglu_oai", transposed=True), y)
    # LoRA on the down projection only: the same as zero gate-up factors
    q = dict(p, lora_a_gate_up=None, lora_b_gate_up=None)
    z = dict(p, lora_b_gate_up=torch.zeros_like(p["lora_b_gate_up"]))
    torch.testing.assert_close(call(q, activation="swiglu_oai"), call(z, activation="swiglu_oai"))


def test_dropped_expert_ids_contribute_nothing():
    p = make_problem(7, 8, 4, 5, 2, 3)
    p["top_k_ids"][2, 1] = 5  # expert parallelism's sentinel (E)
    y = call(p)
    torch.testing.assert_close(y, run_reference(p), rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------------


def _grads(fn, p, names, seed_dy):
    leaves = {n: p[n].detach().clone().requires_grad_(True) for n in names}
    q = dict(p, **leaves)
    y = fn(q)
    return torch.autograd.grad(y, [leaves[n] for n in names], seed_dy)


@pytest.mark.parametrize("act", ACTS, ids=[a for a, _ in ACTS])
@pytest.mark.parametrize("adapters", [None, 2])
def test_gradcheck_fp64(act, adapters):
    activation, kw = act
    p = make_problem(5, 4, 3, 4, 2, 2, adapters=adapters, bias=activation == "swiglu_oai")
    leaves = [p[n].detach().clone().requires_grad_(True) for n in GRAD_NAMES]

    def f(*ts):
        return call(dict(p, **dict(zip(GRAD_NAMES, ts, strict=True))), activation=activation, **kw)

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("t,experts,k,r", [(1, 4, 1, 1), (7, 5, 2, 7), (33, 8, 2, 16)])
@pytest.mark.parametrize("act", ACTS, ids=[a for a, _ in ACTS])
@pytest.mark.parametrize("adapters", [None, 3])
def test_gradients_match_reference(t, experts, k, r, act, adapters):
    activation, kw = act
    p = make_problem(t, 9, 6, experts, k, r, adapters=adapters, bias=activation == "swiglu_oai")
    dy = torch.randn(t, 9, dtype=torch.float64)
    got = _grads(lambda q: call(q, activation=activation, **kw), p, GRAD_NAMES, dy)
    want = _grads(lambda q: run_reference(q, activation, **kw), p, GRAD_NAMES, dy)
    for name, a, b in zip(GRAD_NAMES, got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_low_precision(dtype):
    p64 = make_problem(33, 16, 8, 6, 2, 4, adapters=2)
    p = cast(p64, dtype)
    dy64 = torch.randn(33, 16, dtype=torch.float64)
    got = _grads(lambda q: call(q), p, GRAD_NAMES, dy64.to(dtype))
    want = _grads(run_reference, p64, GRAD_NAMES, dy64)
    base = _grads(run_stock, p, GRAD_NAMES, dy64.to(dtype))
    for name, a, b, c in zip(GRAD_NAMES, got, want, base, strict=True):
        assert_close_to_ref(f"d{name}", a, b, c)


def test_unhit_experts_and_unused_adapters_get_zero_gradients():
    p = make_problem(7, 8, 4, 8, 1, 3, adapters=3)
    p["top_k_ids"] = torch.randint(0, 4, (7, 1))  # experts 4..7 never chosen
    p["adapter_ids"] = torch.tensor([0, 0, -1, 0, 2, 2, -1])  # adapter 1 unused
    names = GRAD_NAMES[2:]
    grads = _grads(call, p, names, torch.randn(7, 8, dtype=torch.float64))
    for name, g in zip(names, grads, strict=True):
        assert g[:, 4:].abs().max() == 0, name
        assert g[1].abs().max() == 0, name
        assert g[0, :4].abs().max() > 0, name


def test_only_requested_gradients():
    p = make_problem(7, 8, 4, 5, 2, 3)
    a = p["lora_a_down"].requires_grad_(True)
    y = call(p)
    (da,) = torch.autograd.grad(y.sum(), [a])
    want = _grads(run_reference, p, ["lora_a_down"], torch.ones(7, 8, dtype=torch.float64))[0]
    torch.testing.assert_close(da, want)


def test_opcheck():
    p = make_problem(7, 8, 4, 5, 2, 3, adapters=2, dtype=torch.float32)
    f = [p[n].requires_grad_(True) for n in GRAD_NAMES[2:]]
    args = (
        p["x"], p["top_k_ids"], p["top_k_weights"], p["w_gate_up"], None, f[0], f[1],
        p["w_down"], None, f[2], f[3], p["scale"], p["adapter_ids"], "silu", 1.702, 7.0, False,
        "torch",
    )  # fmt: skip
    torch.library.opcheck(moe_lora_2d.fwd_op, args)


# --------------------------------------------------------------------------------------------
# PEFT's factor layout
# --------------------------------------------------------------------------------------------


def test_peft_factor_layout_matches_param_wrapper():
    """``peft_expert_factors`` reads PEFT's stacked A / interleaved B as PEFT's own delta does."""
    peft = pytest.importorskip("peft")
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    cfg = Qwen3MoeConfig(hidden_size=12, moe_intermediate_size=5, num_experts=4)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = Qwen3MoeExperts(cfg)
            torch.nn.init.normal_(self.experts.gate_up_proj)
            torch.nn.init.normal_(self.experts.down_proj)

    cfg_l = peft.LoraConfig(r=3, lora_alpha=6, target_parameters=["experts.gate_up_proj"],
                            init_lora_weights=False)  # fmt: skip
    model = peft.get_peft_model(Block(), cfg_l)
    wrapper = model.base_model.model.experts
    a, b = lk.peft_expert_factors(
        wrapper.lora_A["default"].weight, wrapper.lora_B["default"].weight, 4
    )
    assert a.shape == (4, 3, 12) and b.shape == (4, 10, 3)
    delta = wrapper.get_delta_weight("default")
    torch.testing.assert_close(delta, 2.0 * b @ a)
    la, lb = lk.peft_expert_weights(a, b)
    assert torch.equal(la, wrapper.lora_A["default"].weight)
    assert torch.equal(lb, wrapper.lora_B["default"].weight)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def _bad(p, match, **kw):
    with pytest.raises((ValueError, TypeError), match=match):
        call(p, **kw)


def test_bad_inputs_name_the_argument_and_shapes():
    p = make_problem(7, 8, 4, 5, 2, 3)
    _bad(dict(p, x=p["x"][None]), r"x of shape \[T, H\], got \[1, 7, 8\]")
    _bad(dict(p, top_k_ids=p["top_k_ids"][:3]), r"top_k_ids of shape \[7, k\].*got \[3, 2\]")
    _bad(dict(p, top_k_ids=p["top_k_ids"].float()), r"top_k_ids of dtype")
    _bad(dict(p, top_k_weights=p["top_k_weights"][:, :1]), r"top_k_weights of shape \[7, 2\]")
    _bad(dict(p, w_gate_up=p["w_gate_up"][:, :7]), r"w_gate_up of shape \[E, 2I, 8\].*\[5, 7, 8\]")
    _bad(dict(p, w_down=p["w_down"][:, :, :3]), r"w_down of shape \[5, 8, 4\], got \[5, 8, 3\]")
    _bad(dict(p, w_down=p["w_down"].float()), r"w_down of dtype torch.float64, got torch.float32")
    _bad(
        dict(p, lora_a_gate_up=p["lora_a_gate_up"][:, :, :5]),
        r"lora_a_gate_up of shape \[5, 3, 8\]",
    )
    _bad(
        dict(p, lora_b_down=p["lora_b_down"][:4]),
        r"lora_b_down of shape \[5, 8, 3\], got \[4, 8, 3\]",
    )
    _bad(dict(p, lora_b_gate_up=None), r"lora_a_gate_up was given without lora_b_gate_up")
    _bad(dict(p, bias_down=torch.randn(5, 7, dtype=torch.float64)), r"bias_down of shape \[5, 8\]")
    _bad(p, r"activation must be", activation="gelu")
    _bad(dict(p, scale=[1.0, 2.0]), r"scale with 1 value")
    q = make_problem(7, 8, 4, 5, 2, 3, adapters=2)
    _bad(dict(q, adapter_ids=q["adapter_ids"][:4]), r"adapter_ids of shape \[7\].*got \[4\]")
    _bad(dict(q, adapter_ids=torch.full((7,), 2)), r"adapter_ids in \[-1, 2\)")
    _bad(dict(q, lora_a_gate_up=q["lora_a_gate_up"][0]), r"lora_a_gate_up of shape \[L, 5, r, 8\]")
    w = p["w_gate_up"].clone().requires_grad_(True)
    _bad(dict(p, w_gate_up=w), r"base experts .* must be frozen")


def test_plan_groups_hit_experts_only():
    ids = torch.tensor([[3, 1], [3, 0], [1, 3]])
    order, tokens, bounds = torch_moe.moe_plan(ids, None, 6, 1, 2)
    assert [b[0] for b in bounds] == [0, 1, 3]
    assert tokens.tolist() == [1, 0, 2, 0, 1, 2]
    assert order.tolist() == [3, 1, 4, 0, 2, 5]


# --------------------------------------------------------------------------------------------
# Triton (interpreted on CPU: tiny shapes)
# --------------------------------------------------------------------------------------------

TRITON_CASES = [  # (T, E, k, r, adapters): decode, fused shrink, rank chunks, mixed adapters
    (1, 4, 1, 1, None),
    (9, 5, 2, 7, None),
    (9, 5, 2, 70, None),
    (9, 5, 2, 5, 3),
]


@pytest.mark.skipif("triton" not in lk.available_backends(), reason="needs Triton")
@pytest.mark.parametrize("case", TRITON_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("act", ACTS, ids=[a for a, _ in ACTS])
def test_triton_forward_and_gradients(case, dtype, act):
    t, experts, k, r, adapters = case
    activation, kw = act
    p64 = make_problem(t, 20, 12, experts, k, r, adapters=adapters, bias=activation == "swiglu_oai")
    p = cast(p64, dtype)
    y = call(p, backend="triton", activation=activation, **kw)
    assert y.dtype == dtype
    ref = run_reference(p64, activation, **kw)
    assert_close_to_ref("y", y, ref, run_stock(p, activation, **kw))
    dy64 = torch.randn(t, 20, dtype=torch.float64)
    got = _grads(
        lambda q: call(q, backend="triton", activation=activation, **kw), p, GRAD_NAMES,
        dy64.to(dtype),
    )  # fmt: skip
    want = _grads(lambda q: run_reference(q, activation, **kw), p64, GRAD_NAMES, dy64)
    base = _grads(lambda q: run_stock(q, activation, **kw), p, GRAD_NAMES, dy64.to(dtype))
    for name, a, b, c in zip(GRAD_NAMES, got, want, base, strict=True):
        assert_close_to_ref(f"d{name}", a, b, c)


@pytest.mark.skipif("triton" not in lk.available_backends(), reason="needs Triton")
def test_triton_dropped_pairs_unhit_experts_and_strided_weights():
    p = cast(make_problem(9, 8, 4, 8, 2, 3, adapters=2), torch.float32)
    p["top_k_ids"] = torch.randint(0, 4, (9, 2))
    p["top_k_ids"][3, 0] = 8  # a sentinel: contributes nothing
    p["w_gate_up"] = p["w_gate_up"].transpose(1, 2).contiguous().transpose(1, 2)
    dy = torch.randn(9, 8)
    names = GRAD_NAMES
    got = _grads(lambda q: call(q, backend="triton"), p, names, dy)
    want = _grads(lambda q: call(q, backend="torch"), p, names, dy)
    for name, a, b in zip(names, got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"d{n}: {m}")
    assert got[2][:, 4:].abs().max() == 0  # experts 4..7: no pairs, zero gradients
    torch.testing.assert_close(call(p, backend="triton"), call(p, backend="torch"))
