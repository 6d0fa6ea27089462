"""lora_kernels' fused-MoE punica methods against an fp64 restatement of vLLM 0.34's Triton
semantics (vLLM's ``PunicaWrapperCPU`` raises on every MoE method, so it cannot be the oracle).
The rules, from ``vllm/lora/ops/triton_ops/fused_moe_lora_op.py``: a pair (token t, slot j) is
skipped when its adapter slot is -1, >= max_loras or has ``adapter_enabled == 0``, or its expert
is -1 (``_fused_moe_lora_kernel``'s early returns); w13 reads ``x[t]`` (``token_mapping_factor``
= top_k), w2 reads row ``t k + j`` and multiplies by ``topk_weights[t, j]``
(``MUL_ROUTED_WEIGHT``); slice s goes to columns ``offset + s N`` (``_fused_moe_lora_expand``);
``add_inputs=False`` stores the term, skipped pairs are never stored. The expert map and the
shared-factor stride-0 expand come from ``punica_gpu.py`` and ``lora_experts_mixin.py``."""

from __future__ import annotations

import types

import pytest
import torch

vllm = pytest.importorskip("vllm")

from vllm.lora.layers import LoRAMapping  # noqa: E402

from lora_kernels.integrations import vllm as lk_vllm  # noqa: E402
from tests.tolerances import assert_close_to_ref  # noqa: E402

MAX_LORAS = 4
LORA_INDEX_TO_ID = [3, None, 7, 5]  # slot 1 free; slot 3 (id 5) holds no MoE factors
ENABLED = [1, 0, 1, 0, 0]  # adapter_enabled (max_loras + 1 long); slot 3: finite weights, off
E, H, INTER, R, TOP_K = 5, 24, 16, 8, 2
PREFILL = ([7, 0, 3, 7, 5], [5, 1, 9, 3, 2])
DECODE = ([3, 0, 5, 7, 7, 0, 3], [1] * 7)
CASES = {"prefill": (PREFILL, True), "decode": (DECODE, False)}


def _wrapper(case, is_prefill):
    ids, lens = case
    index = [a for a, n in zip(ids, lens, strict=True) for _ in range(n)]
    mapping = LoRAMapping(index, tuple(ids) if is_prefill else tuple(index), is_prefill=is_prefill)
    w = lk_vllm.LoraKernelsPunicaWrapper(64, 16, "cpu")
    w.update_metadata(mapping, LORA_INDEX_TO_ID, MAX_LORAS, 50)
    slots = [-1 if a == 0 else LORA_INDEX_TO_ID.index(a) for a in index]
    return w, slots


def _stack(experts, rows, cols, dtype):
    w = torch.randn(MAX_LORAS, experts, rows, cols, dtype=dtype) / cols**0.5
    w[1] = float("nan")  # the free slot: no pair may read it
    return w


def _routing(m, num_experts=E):
    topk_ids = torch.stack([torch.randperm(num_experts)[:TOP_K] for _ in range(m)]).int()
    topk_weights = torch.softmax(torch.randn(m, TOP_K), -1)
    return topk_ids, topk_weights


def _ref(y0, x, slots, experts, lora_a, lora_b, weights, per_pair, offset=0, add_inputs=True):
    """fp64, pair by pair, per the module docstring's rules."""
    out = y0.double().clone()
    live = torch.zeros(y0.shape[:2], dtype=torch.bool)
    for t in range(y0.shape[0]):
        for j in range(TOP_K):
            a, e = slots[t], int(experts[t, j])
            if a < 0 or a >= MAX_LORAS or not ENABLED[a] or e < 0:
                continue
            live[t, j] = True
            row = x[t * TOP_K + j] if per_pair else x[t]
            for s, (la, lb) in enumerate(zip(lora_a, lora_b, strict=True)):
                ea = 0 if la.shape[1] == 1 else e
                eb = 0 if lb.shape[1] == 1 else e
                term = (row.double() @ la[a, ea].double().T) @ lb[a, eb].double().T
                if weights is not None:
                    term = term * float(weights[t, j])
                n = lb.shape[2]
                cols = slice(offset + s * n, offset + (s + 1) * n)
                out[t, j, cols] = term + (out[t, j, cols] if add_inputs else 0)
    return out, live


def _close(name, ours, ref, dtype):
    # the stock-precision baseline: the fp64 result rounded once to the dtype
    assert_close_to_ref(name, ours, ref, ref.to(dtype))


def _w13(wrapper, y, x, a, b, topk_ids, topk_weights, expert_map=None, add_inputs=True):
    return wrapper.add_lora_w13(
        y, x, a, b, topk_ids, topk_weights, expert_map, None, None, x.shape[0], TOP_K,
        MAX_LORAS, torch.tensor(ENABLED, dtype=torch.int32), E, TOP_K, len(a), False, False,
        add_inputs=add_inputs,
    )  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("slices", [1, 2], ids=["w1 only", "gate+up"])
@pytest.mark.parametrize("add_inputs", [True, False])
@pytest.mark.parametrize("shared", [False, True], ids=["per-expert", "shared A"])
def test_add_lora_w13_then_w2(dtype, case, slices, add_inputs, shared):
    wrapper, slots = _wrapper(*CASES[case])
    m = len(slots)
    x = torch.randn(m, H, dtype=dtype)
    topk_ids, topk_weights = _routing(m)
    a_experts = 1 if shared else E
    # enable_moe_shared_loras: vLLM's mixin hands a stride-0 expand of the [L, 1, r, H] factor
    a13 = tuple(_stack(a_experts, R, H, dtype).expand(-1, E, -1, -1) for _ in range(slices))
    b13 = tuple(_stack(E, INTER, R, dtype) for _ in range(slices))
    y0 = torch.randn(m, TOP_K, slices * INTER, dtype=dtype)
    y = y0.clone()
    routing = _w13(wrapper, y, x, a13, b13, topk_ids, topk_weights, add_inputs=add_inputs)
    ref, live = _ref(y0, x, slots, topk_ids, a13, b13, None, False, add_inputs=add_inputs)
    _close("add_lora_w13", y, ref, dtype)
    assert torch.equal(y[~live], y0[~live])  # skipped pairs: untouched
    assert live.any() and (~live).any()

    h = torch.randn(m * TOP_K, INTER, dtype=dtype)
    a2 = (_stack(E, R, INTER, dtype),)
    b2 = (_stack(1 if shared else E, H, R, dtype).expand(-1, E, -1, -1),)
    y30 = torch.randn(m, TOP_K, H, dtype=dtype)
    y3 = y30.clone()
    wrapper.add_lora_w2(
        y3, h, a2, b2, topk_weights, *routing, m, None, None, TOP_K, MAX_LORAS,
        torch.tensor(ENABLED, dtype=torch.int32), TOP_K, False, 0, False, add_inputs=add_inputs,
    )  # fmt: skip
    ref3, _ = _ref(y30, h, slots, topk_ids, a2, b2, topk_weights, True, add_inputs=add_inputs)
    _close("add_lora_w2", y3, ref3, dtype)
    assert torch.equal(y3[~live], y30[~live])


@pytest.mark.parametrize("case", CASES)
def test_expert_map_skips_other_ranks_experts(case):
    """Expert parallelism: topk_ids are global (8 experts), this rank holds 3..7 as local 0..4."""
    wrapper, slots = _wrapper(*CASES[case])
    m = len(slots)
    x = torch.randn(m, H)
    topk_ids, topk_weights = _routing(m, 8)
    expert_map = torch.tensor([-1, -1, -1, 0, 1, 2, 3, 4], dtype=torch.int32)
    a13 = (_stack(E, R, H, torch.float32),)
    b13 = (_stack(E, INTER, R, torch.float32),)
    y0 = torch.randn(m, TOP_K, INTER)
    y = y0.clone()
    _, pair_expert, _, _ = _w13(wrapper, y, x, a13, b13, topk_ids, topk_weights, expert_map)
    local = expert_map[topk_ids.long()]
    assert torch.equal(pair_expert.view(m, TOP_K).int(), local)
    ref, live = _ref(y0, x, slots, local, a13, b13, None, False)
    _close("add_lora_w13 (expert map)", y, ref, torch.float32)
    assert torch.equal(y[~live], y0[~live])


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("block", [1, 4, 16])
@pytest.mark.parametrize("ep", [False, True], ids=["all experts", "expert map"])
def test_align_block_size_layout_and_sorted_path(case, block, ep):
    """moe_lora_align_block_size's layout (vLLM's, read as its kernel reads it), and
    add_lora_fused_moe on it gives what the unsorted layout gives."""
    wrapper, slots = _wrapper(*CASES[case])
    m = len(slots)
    num_global = 8 if ep else E
    topk_ids, topk_weights = _routing(m, num_global)
    expert_map = torch.tensor([-1, -1, -1, 0, 1, 2, 3, 4], dtype=torch.int32) if ep else None
    enabled = torch.tensor(ENABLED, dtype=torch.int32)
    tlm, sorted_ids, expert_ids, ntpp = wrapper.moe_lora_align_block_size(
        topk_ids, m, block, E, MAX_LORAS, enabled, expert_map, pad_sorted_ids=True
    )
    sorted_ids, expert_ids = sorted_ids.view(MAX_LORAS, -1), expert_ids.view(MAX_LORAS, -1)
    pairs = m * TOP_K
    assert sorted_ids.shape[1] % block == 0 and sorted_ids.dtype == torch.int32
    local = topk_ids.long() if expert_map is None else expert_map[topk_ids.long()].long()
    seen = set()
    for lora in range(MAX_LORAS):
        n = int(ntpp[lora])
        assert n % block == 0
        assert (sorted_ids[lora, n:] == pairs).all() and (
            expert_ids[lora, n // block :] == -1
        ).all()
        for pos in range(n):
            p = int(sorted_ids[lora, pos])
            if p == pairs:
                continue
            assert slots[p // TOP_K] == lora and ENABLED[lora]
            assert int(expert_ids[lora, pos // block]) == int(local.view(-1)[p])
            seen.add(p)
    want = {p for p in range(pairs) if slots[p // TOP_K] >= 0 and ENABLED[slots[p // TOP_K]]}
    assert seen == want  # every live pair once (its block may be another rank's expert: -1)

    x = torch.randn(m, H)
    a13 = (_stack(E, R, H, torch.float32), _stack(E, R, H, torch.float32))
    b13 = (_stack(E, INTER, R, torch.float32), _stack(E, INTER, R, torch.float32))
    y0 = torch.randn(m, TOP_K, 2 * INTER)
    outs = []
    for layout in ((sorted_ids, expert_ids, ntpp), (None, local.reshape(-1), None)):
        y = y0.clone()
        wrapper.add_lora_fused_moe(
            y, x, a13, b13, topk_weights, layout[0], layout[1], layout[2], R, TOP_K,
            {"BLOCK_SIZE_M": block}, {"BLOCK_SIZE_M": block}, enabled, token_lora_mapping=tlm,
        )  # fmt: skip
        outs.append(y)
    ref, _ = _ref(y0, x, slots, local, a13, b13, None, False)
    _close("add_lora_fused_moe (sorted)", outs[0], ref, torch.float32)
    _close("add_lora_fused_moe (unsorted)", outs[1], ref, torch.float32)


def test_fully_sharded_w2_writes_its_shard(monkeypatch):
    """fully_sharded: the shrink is summed over ranks (vLLM's all_reduce, here one rank) and
    rank tp_rank writes columns tp_rank * H_shard onwards; the others stay as they are."""
    import vllm.distributed

    monkeypatch.setattr(vllm.distributed, "tensor_model_parallel_all_reduce", lambda t: t)
    wrapper, slots = _wrapper(*CASES["prefill"])
    m = len(slots)
    topk_ids, topk_weights = _routing(m)
    h = torch.randn(m * TOP_K, INTER)
    a2 = (_stack(E, R, INTER, torch.float32),)
    b2 = (_stack(E, H // 2, R, torch.float32),)
    y0 = torch.randn(m, TOP_K, H)
    y = y0.clone()
    wrapper.add_lora_w2(
        y, h, a2, b2, topk_weights, None, topk_ids.reshape(-1), None, None, m, None, None,
        TOP_K, MAX_LORAS, torch.tensor(ENABLED, dtype=torch.int32), TOP_K, True, 1, False,
    )  # fmt: skip
    ref, _ = _ref(y0, h, slots, topk_ids, a2, b2, topk_weights, True, offset=H // 2)
    _close("add_lora_w2 (fully sharded, rank 1)", y, ref, torch.float32)
    assert torch.equal(y[..., : H // 2], y0[..., : H // 2])


def test_bad_shapes_are_named():
    wrapper, slots = _wrapper(*CASES["decode"])
    m = len(slots)
    topk_ids, topk_weights = _routing(m)
    a = (_stack(E, R, H, torch.float32),)
    b = (_stack(E, INTER, R, torch.float32),)
    with pytest.raises(ValueError, match=r"expected x of shape \[7, K\]"):
        _w13(wrapper, torch.randn(m, TOP_K, INTER), torch.randn(m + 1, H), a, b, topk_ids,
             topk_weights)  # fmt: skip
    with pytest.raises(ValueError, match="do not fit y's"):
        _w13(wrapper, torch.randn(m, TOP_K, INTER - 1), torch.randn(m, H), a, b, topk_ids,
             topk_weights)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("shared", [False, True], ids=["per-expert", "shared loras"])
def test_moe_layer_through_vllms_lora_code(dtype, case, shared):
    """A whole MoE block with LoRA on gate, up and down: vLLM's FusedMoEWithLoRA makes and
    fills the stacks (create_lora_weights, set_lora) and vLLM's LoRAExpertsMixin calls our
    wrapper (apply_w13_lora / apply_w2_lora, as TritonExperts.apply does), around a torch base
    MoE; against fp64 per-expert formulas. TritonExperts itself and the MoE runner need a GPU
    (Triton kernels, a distributed context) and are not built here."""
    from vllm.config.lora import LoRAConfig
    from vllm.lora.layers.fused_moe import FusedMoEWithLoRA
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.model_executor.layers.fused_moe.experts.lora_context import MoELoRAContext
    from vllm.model_executor.layers.fused_moe.experts.lora_experts_mixin import (
        LoRAExpertsMixin,
    )

    wrapper, slots = _wrapper(*CASES[case])
    m = len(slots)
    layer = FusedMoEWithLoRA.__new__(FusedMoEWithLoRA)
    torch.nn.Module.__init__(layer)
    layer.moe_config = types.SimpleNamespace(
        hidden_dim=H, num_local_experts=E, intermediate_size_per_partition=INTER,
        intermediate_size_per_partition_unpadded=None,
        moe_parallel_config=types.SimpleNamespace(use_ep=False, tp_size=1, tp_rank=0),
    )  # fmt: skip
    layer.tp_size, layer.tp_rank, layer.device, layer._w13_slices = 1, 0, "cpu", 2
    config = LoRAConfig(max_lora_rank=R, max_loras=MAX_LORAS, lora_dtype=dtype)
    config.enable_moe_shared_loras = shared
    layer.create_lora_weights(MAX_LORAS, config)
    factors = {}
    for slot in (0, 2):  # slots 1 and 3 hold no MoE factors (adapter_enabled 0)
        ea = 1 if shared else E
        w1a, w3a = (torch.randn(ea, R, H, dtype=dtype) / H**0.5 for _ in range(2))
        w2a = torch.randn(E, R, INTER, dtype=dtype) / INTER**0.5
        w1b, w3b = (torch.randn(E, INTER, R, dtype=dtype) / R**0.5 for _ in range(2))
        w2b = torch.randn(ea, H, R, dtype=dtype) / R**0.5
        layer.set_lora(slot, [w1a, w2a, w3a], [w1b, w2b, w3b])
        factors[slot] = (w1a, w3a, w2a, w1b, w3b, w2b)
    experts = LoRAExpertsMixin()
    experts.moe_config = types.SimpleNamespace(activation=MoEActivation.SILU)
    ctx = MoELoRAContext(
        w13_lora_a_stacked=layer.w13_lora_a_stacked, w13_lora_b_stacked=layer.w13_lora_b_stacked,
        w2_lora_a_stacked=layer.w2_lora_a_stacked, w2_lora_b_stacked=layer.w2_lora_b_stacked,
        adapter_enabled=layer.adapter_enabled, max_loras=MAX_LORAS, top_k=TOP_K,
        w13_num_slices=2, fully_sharded=False, tp_rank=0, tp_size=1, local_num_experts=E,
        punica_wrapper=wrapper, use_tuned_config=False, enable_moe_shared_loras=shared,
    )  # fmt: skip

    x = torch.randn(m, H, dtype=dtype)
    topk_ids, topk_weights = _routing(m)
    w1 = torch.randn(E, 2 * INTER, H, dtype=dtype) / H**0.5
    w2 = torch.randn(E, H, INTER, dtype=dtype) / INTER**0.5
    # TritonExperts.apply's steps, with torch GEMMs for the base experts
    cache1 = torch.einsum("th,tjnh->tjn", x, w1[topk_ids.long()])
    routing = experts.apply_w13_lora(
        ctx, y=cache1, x=x, topk_ids=topk_ids, topk_weights=topk_weights, expert_map=None,
        w1=w1, w2=w2, num_tokens=m, top_k_num=TOP_K,
    )  # fmt: skip
    gate, up = cache1.view(m * TOP_K, 2 * INTER).chunk(2, -1)
    cache2 = torch.nn.functional.silu(gate) * up
    cache3 = torch.einsum("pi,phi->ph", cache2, w2[topk_ids.reshape(-1).long()])
    cache3 = (cache3.view(m, TOP_K, H) * topk_weights[..., None].to(dtype)).contiguous()
    experts.apply_w2_lora(
        ctx, y=cache3, x=cache2, topk_weights=topk_weights, sorted_token_ids_lora=routing[0],
        expert_ids_lora=routing[1], num_tokens_post_padded_lora=routing[2],
        token_lora_mapping=routing[3], num_tokens=m, w1=w1, w2=w2, top_k_num=TOP_K,
    )  # fmt: skip
    out = cache3.sum(1)

    def block(dt):
        """The block token by token in ``dt`` (fp64: the reference; the layer's dtype: what
        stock PyTorch gets in that precision)."""
        res = torch.zeros(m, H, dtype=dt)
        for t in range(m):
            for j in range(TOP_K):
                e, a = int(topk_ids[t, j]), slots[t]
                xt = x[t].to(dt)
                g = xt @ w1[e, :INTER].to(dt).T
                u = xt @ w1[e, INTER:].to(dt).T
                lora = a >= 0 and a in factors
                if lora:
                    w1a, w3a, w2a, w1b, w3b, w2b = (f.to(dt) for f in factors[a])
                    ea = 0 if shared else e
                    g = g + (xt @ w1a[ea].T) @ w1b[e].T
                    u = u + (xt @ w3a[ea].T) @ w3b[e].T
                hid = torch.nn.functional.silu(g) * u
                d = hid @ w2[e].to(dt).T
                if lora:
                    d = d + (hid @ w2a[e].T) @ w2b[0 if shared else e].T
                res[t] += topk_weights[t, j].to(dt) * d
        return res

    assert_close_to_ref("MoE block with LoRA", out, block(torch.float64), block(dtype))
