"""MoE expert adapters (``FusedLoraExperts``, PEFT's ``target_parameters``) served from an
``AdapterCache``: put/load/evict, device slots in the experts' own shapes and dtypes, and
``switch_adapter`` merged (arithmetic and exact), unmerged, served from the slots and in mixed
batches, with dense LoRA layers in the same model; outputs against PEFT's model of the same
adapter, exact switches bit for bit, refusals that change nothing."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lora_kernels as lk
from lora_kernels.layers.moe import FusedLoraExperts
from lora_kernels.serving.cache import AdapterCache
from lora_kernels.serving.state import adapter_slot_ids, serving_state
from lora_kernels.serving.switch import release_adapters, switch_adapter
from tests.moe_models import EXPERT_TARGETS, tiny_moe_model

peft = pytest.importorskip("peft")

# Adapter name -> PEFT config fields: different ranks, one with a down projection of its own
# rank and alpha (its scaling differs from gate-up's), one on the experts' down_proj only.
ADAPTERS = {
    "a": dict(r=3, lora_alpha=6),
    "b": dict(r=2, lora_alpha=3, rank_pattern={"down_proj": 4}, alpha_pattern={"down_proj": 2}),
    "c": dict(r=4, lora_alpha=4, target_parameters=["mlp.experts.down_proj"]),
}
TOL = dict(rtol=1e-5, atol=1e-5)  # fp32 model, same kernels' sums as PEFT's within rounding


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _peft_config(**kw):
    cfg = dict(target_modules=["q_proj"], target_parameters=EXPERT_TARGETS,
               init_lora_weights=False)  # fmt: skip
    cfg.update(kw)
    return peft.LoraConfig(**cfg)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module", params=["qwen3_moe", "gpt_oss"])
def world(request, tmp_path_factory):
    """A tiny MoE model, PEFT's logits of each adapter on it, and the adapters' directories."""
    base = tiny_moe_model(request.param)
    ids = torch.randint(0, 97, (3, 5), generator=torch.Generator().manual_seed(1))
    want = {None: _logits(base, ids)}
    dirs = {}
    for i, (name, kw) in enumerate(ADAPTERS.items()):
        torch.manual_seed(10 + i)
        pm = peft.get_peft_model(copy.deepcopy(base), _peft_config(**kw))
        with torch.no_grad():  # B too: PEFT's init_lora_weights=False leaves it small
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.normal_(0.0, 0.3)
        want[name] = _logits(pm, ids)
        dirs[name] = tmp_path_factory.mktemp(f"{request.param}_{name}")
        pm.save_pretrained(dirs[name])
    return base, ids, want, dirs


def _served_model(world):
    """Our model of the same base with the layers every adapter needs (its own adapter
    'own'), and a cache holding the three adapters."""
    base, _, _, dirs = world
    model = lk.get_lora_model(
        copy.deepcopy(base),
        lk.LoraConfig(r=2, target_modules=["q_proj"], target_parameters=EXPERT_TARGETS),
        "own",
    )
    cache = AdapterCache(1 << 24)
    for name, path in dirs.items():
        cache.load(name, path)
    return model, cache


def _experts(model):
    return [m for m in model.modules() if isinstance(m, FusedLoraExperts)]


def _bits(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _same_bits(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def _layer_state(model):
    return {
        n: (m.active_adapter, list(m.merged_adapters), tuple(m.adapter_names))
        for n, m in model.named_modules()
        if isinstance(m, (lk.FusedLoraLinear, FusedLoraExperts))
    }


# ---------------------------------------------------------------------------------------------
# the RAM tier
# ---------------------------------------------------------------------------------------------


def test_cache_holds_expert_adapters_in_the_per_expert_layout(world):
    base, _, _, dirs = world
    cache = AdapterCache(1 << 24)
    cache.load("b", dirs["b"])
    adapter = cache.get("b")
    path = "model.layers.0.mlp.experts"
    lay = adapter.experts[path]
    e = base.model.layers[0].mlp.experts.gate_up_proj.shape[0]
    assert lay.params == ["gate_up_proj", "down_proj"]
    assert lay.r == {"gate_up_proj": 2, "down_proj": 4}
    assert lay.scaling == {"gate_up_proj": 1.5, "down_proj": 0.5}
    # PEFT's [E r, in] / [out, r E] on disk, per expert [E, r, in] / [E, out, r] in the cache
    from safetensors.torch import load_file

    raw = load_file(dirs["b"] / "adapter_model.safetensors")
    key = f"base_model.model.{path}.base_layer.lora_B.weight"  # gate_up_proj: the inner wrapper
    a_gu, b_gu = lk.functional.moe.peft_expert_factors(
        raw[key.replace("lora_B", "lora_A")], raw[key], e
    )
    assert torch.equal(lay.lora_a["gate_up_proj"], a_gu)
    assert torch.equal(lay.lora_b["gate_up_proj"], b_gu)
    assert lay.lora_b["gate_up_proj"].is_contiguous()
    assert "model.layers.0.self_attn.q_proj" in adapter.layers
    assert adapter.nbytes == sum(t.nbytes for t in raw.values())
    # put from PEFT's in-memory state dict keys (".default.weight") gives the same adapter
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), dirs["b"])
    sd = {k: v for k, v in pm.state_dict().items() if "lora_" in k}
    again = cache.put("b2", sd, adapter.config)
    assert again.experts.keys() == adapter.experts.keys()
    assert torch.equal(again.experts[path].lora_b["down_proj"], lay.lora_b["down_proj"])
    assert cache.nbytes == 2 * adapter.nbytes
    cache.evict("b2")
    assert cache.names() == ["b"] and cache.nbytes == adapter.nbytes


def test_cache_refuses_expert_tensors_that_do_not_fit_the_config(world):
    _, _, _, dirs = world
    cache = AdapterCache(1 << 24)
    from safetensors.torch import load_file

    raw = load_file(dirs["c"] / "adapter_model.safetensors")
    cfg = lk.LoraConfig(
        r=4,
        target_modules=["q_proj"],
        target_parameters=["mlp.experts.down_proj"],
        rank_pattern={"down_proj": 5},  # 4 E rows are no multiple of 5
    )
    with pytest.raises(ValueError, match=r"down_proj: expected PEFT's lora_A \[E\*5, in\]"):
        cache.put("c", raw, cfg)
    bad = dict(raw)
    bad["base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight"] = raw[
        "base_model.model.model.layers.0.mlp.experts.lora_A.weight"
    ]
    cfg = lk.LoraConfig(r=4, target_modules=["q_proj"], target_parameters=["mlp.experts.down_proj"])
    with pytest.raises(ValueError, match="nests 1 ParamWrapper"):
        cache.put("c", bad, cfg)
    assert len(cache) == 0 and cache.nbytes == 0


# ---------------------------------------------------------------------------------------------
# switch_adapter
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("slots", [False, True])
def test_switches_match_peft_merged_unmerged_and_exact(world, slots):
    _, ids, want, _ = world
    model, cache = _served_model(world)
    if slots:
        cache.attach(model, num_slots=2, max_rank=4)
    base_bits = _bits(model)
    for step, name in enumerate(["a", "b", "c", None, "b", "a", "c", "a"]):
        switch_adapter(model, name, cache=cache)
        torch.testing.assert_close(_logits(model, ids), want[name], **TOL)
        assert model.active_lora_adapter == name
        exact = step % 2 == 0
        switch_adapter(model, name, cache=cache, merged=True, exact=exact)
        for layer in _experts(model):
            assert layer.merged_adapters == ([] if name is None else [name])
        torch.testing.assert_close(_logits(model, ids), want[name], rtol=1e-4, atol=1e-4)
    switch_adapter(model, "b", cache=cache, merged=True, exact=True)
    switch_adapter(model, "c", cache=cache, merged=True, exact=True)
    switch_adapter(model, None, cache=cache)
    release_adapters(model)
    # arithmetic merges came before: the base is back within rounding (bit for bit: below)
    after = _bits(model)
    assert after.keys() == base_bits.keys()
    for n, w in base_bits.items():
        torch.testing.assert_close(after[n], w, rtol=1e-5, atol=1e-5)
    assert all(m.adapter_names == ["own"] for m in _experts(model))


def test_exact_switches_restore_every_expert_parameter_bit_for_bit(world):
    _, ids, want, _ = world
    model, cache = _served_model(world)
    before = _bits(model)
    for name in ["a", "c", "b", "a", "b", "c"] * 3:
        switch_adapter(model, name, cache=cache, merged=True, exact=True)
    torch.testing.assert_close(_logits(model, ids), want["c"], rtol=1e-4, atol=1e-4)
    switch_adapter(model, None, cache=cache)
    release_adapters(model)
    _same_bits(_bits(model), before)
    torch.testing.assert_close(_logits(model, ids), want[None], **TOL)


def test_switch_among_the_models_own_expert_adapters_without_a_cache(world, tmp_path):
    base, ids, want, dirs = world
    model = lk.load_adapter(copy.deepcopy(base), dirs["a"], "a")
    lk.load_adapter(model, dirs["b"], "b")
    before = _bits(model)
    for name in ["a", "b", None, "a"]:
        switch_adapter(model, name)
        torch.testing.assert_close(_logits(model, ids), want[name], **TOL)
    switch_adapter(model, "b", merged=True, exact=True)
    torch.testing.assert_close(_logits(model, ids), want["b"], rtol=1e-4, atol=1e-4)
    switch_adapter(model, "a")
    _same_bits(_bits(model), before)
    torch.testing.assert_close(_logits(model, ids), want["a"], **TOL)


def test_flat_switches_touch_no_experts_layer(world, monkeypatch):
    _, ids, want, _ = world
    model, cache = _served_model(world)
    cache.attach(model, num_slots=3, max_rank=4)
    for name in ("a", "b", "c"):
        switch_adapter(model, name, cache=cache)  # installs each into a slot

    def forbidden(*a, **k):
        raise AssertionError("a served switch visited a layer")

    for method in ("set_adapter", "add_adapter", "delete_adapter", "merge", "unmerge"):
        monkeypatch.setattr(FusedLoraExperts, method, forbidden)
        monkeypatch.setattr(lk.FusedLoraLinear, method, forbidden)
    monkeypatch.setattr("lora_kernels.serving.switch.lora_layers", forbidden)
    monkeypatch.setattr("lora_kernels.serving.switch.expert_layers", forbidden)
    monkeypatch.setattr(nn.Module, "named_modules", forbidden)
    for name in ["b", None, "c", "a"]:
        switch_adapter(model, name, cache=cache)
        torch.testing.assert_close(_logits(model, ids), want[name], **TOL)
    monkeypatch.undo()
    # the model's own adapters, without a cache: one write to its SharedActive after one walk
    model2 = _served_model(world)[0]
    switch_adapter(model2, None)
    switch_adapter(model2, "own")
    monkeypatch.setattr(FusedLoraExperts, "set_adapter", forbidden)
    monkeypatch.setattr("lora_kernels.serving.switch.expert_layers", forbidden)
    monkeypatch.setattr(nn.Module, "named_modules", forbidden)
    switch_adapter(model2, None)
    switch_adapter(model2, "own")
    monkeypatch.undo()
    assert all(m.active_adapter == "own" for m in _experts(model2))
    switch_adapter(model2, None)
    assert all(m.active_adapter is None for m in _experts(model2))
    torch.testing.assert_close(_logits(model2, ids), want[None], **TOL)


@pytest.mark.parametrize("graph_safe", [False, True])
def test_served_single_and_mixed_batches_match_each_adapter_alone(world, graph_safe):
    _, ids, want, _ = world
    model, cache = _served_model(world)
    cache.attach(model, num_slots=3, max_rank=4)
    for name in ("a", "b", "c"):
        switch_adapter(model, name, cache=cache)
    state = serving_state(model)
    state.graph_safe = graph_safe
    for layer in _experts(model):
        assert type(layer._serving).__name__ == "ExpertSlotBinding"
    for name in ("b", None, "a", "c"):
        switch_adapter(model, name, cache=cache)
        torch.testing.assert_close(_logits(model, ids), want[name], **TOL)
    rows = ["c", "__base__", "a"]
    with lk.mixed_batch(model, rows):
        got = _logits(model, ids)
    slot_ids = adapter_slot_ids(model, ["b", "a", "b"])
    with lk.mixed_batch(model, slot_ids):
        got_ids = _logits(model, ids)
    for i, name in enumerate(rows):
        torch.testing.assert_close(got[i], want[None if name == "__base__" else name][i], **TOL)
    for i, name in enumerate(["b", "a", "b"]):
        torch.testing.assert_close(got_ids[i], want[name][i], **TOL)


def test_slots_take_the_experts_shapes_and_dtypes(world):
    base, _, _, _ = world
    model = lk.get_lora_model(
        copy.deepcopy(base).to(torch.bfloat16),
        lk.LoraConfig(r=2, target_modules=["q_proj"], target_parameters=EXPERT_TARGETS),
    )
    cache = AdapterCache(1 << 24)
    cache.attach(model, num_slots=2, max_rank=5)
    layer = model.model.layers[1].mlp.experts
    t = cache.slot_tensors("model.layers.1.mlp.experts")
    e = layer.num_experts
    for param, (a, b) in zip(
        ("gate_up_proj", "down_proj"), ((t[0], t[1]), (t[2], t[3])), strict=True
    ):
        n_in, n_out = layer.features(param)
        assert a.shape == (2, e, 5, n_in) and b.shape == (2, e, n_out, 5)
        assert a.dtype == b.dtype == getattr(layer.base_layer, param).dtype == torch.bfloat16
        assert a.is_contiguous() and b.is_contiguous()
    assert t.scales.dtype == torch.float32 and t.scales.shape == (2,)
    # slots only for the parameters the layer's adapters adapt
    only_down = lk.get_lora_model(
        copy.deepcopy(base),
        lk.LoraConfig(r=2, target_modules=["q_proj"], target_parameters=["mlp.experts.down_proj"]),
    )
    cache.attach(only_down, num_slots=1, max_rank=4)
    t = cache.slot_tensors("model.layers.0.mlp.experts")
    assert t.lora_a_gate_up is None and t.lora_a_down is not None


def test_refused_switches_leave_the_model_and_the_cache_as_they_were(world):
    base, ids, want, dirs = world
    model, cache = _served_model(world)
    cache.attach(model, num_slots=2, max_rank=3)  # "b" has a down_proj of rank 4, "c" rank 4
    switch_adapter(model, "a", cache=cache, merged=True, exact=True)
    snap, state, owners = _bits(model), _layer_state(model), cache.slot_owners()
    with pytest.raises(ValueError, match=r"down_proj: rank 4 > the slots' max_rank 3"):
        switch_adapter(model, "b", cache=cache)
    # an adapter of a model with other experts: refused on shapes
    other = tiny_moe_model("mixtral")
    pm = peft.get_peft_model(other, _peft_config(r=2, lora_alpha=2))
    pm.save_pretrained(dirs["a"].parent / "mixtral_adapter")
    cache.load("m", dirs["a"].parent / "mixtral_adapter")
    with pytest.raises(ValueError, match="does not fit"):
        switch_adapter(model, "m", cache=cache)
    # an exact merge whose factors changed since: refused before any layer is unmerged
    layer = model.model.layers[1].mlp.experts
    factor = layer.lora_B["down_proj"]["a"].weight
    kept = factor[0, 0].item()
    with torch.no_grad():
        factor[0, 0] = kept + 1.0
    with pytest.raises(ValueError, match="not the tensors merged with exact=True"):
        switch_adapter(model, None, cache=cache)
    with torch.no_grad():
        factor[0, 0] = kept
    _same_bits(_bits(model), snap)
    assert _layer_state(model) == state and cache.slot_owners() == owners
    switch_adapter(model, None, cache=cache)
    torch.testing.assert_close(_logits(model, ids), want[None], **TOL)
