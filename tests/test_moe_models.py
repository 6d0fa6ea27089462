"""MoE models with PEFT's ``target_parameters``: tiny Qwen3-MoE, Mixtral, OLMoE and gpt-oss
(from configs) against PEFT's own ``ParamWrapper`` on the same weights: checkpoints both ways,
logits, gradients, merge, mixed batches, and the refusals."""

from __future__ import annotations

import copy

import pytest
import torch

import lora_kernels as lk
from lora_kernels.layers.moe import FusedLoraExperts
from tests.moe_models import EXPERT_TARGETS, tiny_moe_model

peft = pytest.importorskip("peft")

KINDS = ["qwen3_moe", "mixtral", "olmoe", "gpt_oss"]


def _peft_model(base, **kw):
    cfg = dict(r=3, lora_alpha=6, target_modules=["q_proj"], target_parameters=EXPERT_TARGETS,
               init_lora_weights=False)  # fmt: skip
    cfg.update(kw)
    return peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(params=KINDS)
def kind(request):
    return request.param


def test_checkpoints_both_ways_same_logits_and_base_bit_for_bit(kind, tmp_path):
    base = tiny_moe_model(kind)
    ids = torch.randint(0, 97, (2, 9))
    ref = _logits(base, ids)
    pm = _peft_model(base)
    want = _logits(pm, ids)
    pm.save_pretrained(tmp_path / "peft")
    ours = lk.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    layer = ours.model.layers[0].mlp.experts
    assert isinstance(layer, FusedLoraExperts)
    assert layer.adapter_params("default") == ["gate_up_proj", "down_proj"]
    got = _logits(ours, ids)
    assert (want - ref).abs().max() > 1e-2  # the adapter changes the logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    lk.set_adapter(ours, None)
    assert torch.equal(_logits(ours, ids), ref)  # no adapter: the model's own experts
    lk.set_adapter(ours, "default")
    lk.save_adapter(ours, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(_logits(back, ids), got, rtol=1e-5, atol=1e-5)


def test_get_lora_model_trains_like_peft(kind):
    base = tiny_moe_model(kind)
    ids = torch.randint(0, 97, (2, 7))
    pm = _peft_model(base, rank_pattern={"down_proj": 5}, alpha_pattern={"down_proj": 3})
    ours = lk.get_lora_model(
        copy.deepcopy(base),
        lk.LoraConfig(r=3, lora_alpha=6, target_modules=["q_proj"],
                      target_parameters=EXPERT_TARGETS, init_lora_weights=False,
                      rank_pattern={"down_proj": 5}, alpha_pattern={"down_proj": 3}),
    )  # fmt: skip
    layer = ours.model.layers[1].mlp.experts
    assert layer.r["down_proj"]["default"] == 5 and layer.r["gate_up_proj"]["default"] == 3
    peft_state = {k.replace(".default", ""): v for k, v in pm.named_parameters() if "lora_" in k}
    # copy PEFT's factors into ours, by PEFT's checkpoint key
    with torch.no_grad():
        for i in range(2):
            ours_l = ours.model.layers[i]
            pre = f"base_model.model.model.layers.{i}."
            for part in ("lora_A", "lora_B"):
                ex = ours_l.mlp.experts
                getattr(ex, part)["down_proj"]["default"].weight.copy_(
                    peft_state[f"{pre}mlp.experts.{part}.weight"]
                )
                getattr(ex, part)["gate_up_proj"]["default"].weight.copy_(
                    peft_state[f"{pre}mlp.experts.base_layer.{part}.weight"]
                )
                getattr(ours_l.self_attn.q_proj, part)["default"].weight.copy_(
                    peft_state[f"{pre}self_attn.q_proj.{part}.weight"])  # fmt: skip
    ours.train()
    pm.train()
    loss_ours = ours(ids, labels=ids).loss
    loss_peft = pm(ids, labels=ids).loss
    torch.testing.assert_close(loss_ours, loss_peft, rtol=1e-5, atol=1e-6)
    loss_ours.backward()
    loss_peft.backward()
    ex = ours.model.layers[1].mlp.experts
    pw = pm.base_model.model.model.layers[1].mlp.experts
    pairs = [
        (ex.lora_A["down_proj"]["default"].weight, pw.lora_A["default"].weight),
        (ex.lora_B["down_proj"]["default"].weight, pw.lora_B["default"].weight),
        (ex.lora_A["gate_up_proj"]["default"].weight, pw.base_layer.lora_A["default"].weight),
        (ex.lora_B["gate_up_proj"]["default"].weight, pw.base_layer.lora_B["default"].weight),
    ]
    for mine, theirs in pairs:
        assert mine.grad is not None and mine.grad.abs().max() > 0
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-4, atol=1e-6)
    assert not ex.base_layer.gate_up_proj.requires_grad


def test_merge_unmerge_exact_and_merge_and_unload(kind):
    base = tiny_moe_model(kind)
    ids = torch.randint(0, 97, (2, 9))
    model = lk.get_lora_model(
        copy.deepcopy(base),
        lk.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                      target_parameters=EXPERT_TARGETS, init_lora_weights=False),
    )  # fmt: skip
    want = _logits(model, ids)
    layer = model.model.layers[0].mlp.experts
    before = (
        layer.base_layer.gate_up_proj.detach().clone(),
        layer.base_layer.down_proj.detach().clone(),
    )
    layer.merge(exact=True)
    assert layer.merged
    assert not torch.equal(layer.base_layer.gate_up_proj, before[0])
    layer.unmerge()
    assert torch.equal(layer.base_layer.gate_up_proj, before[0])
    assert torch.equal(layer.base_layer.down_proj, before[1])
    lk.merge_and_unload(model)
    assert type(model.model.layers[0].mlp.experts).__name__ != "FusedLoraExperts"
    torch.testing.assert_close(_logits(model, ids), want, rtol=1e-4, atol=1e-4)


def test_mixed_batch_and_two_adapters(kind):
    base = tiny_moe_model(kind)
    ids = torch.randint(0, 97, (3, 6))
    ref = _logits(base, ids)
    make = lambda r: lk.LoraConfig(r=r, lora_alpha=4, target_parameters=EXPERT_TARGETS,  # noqa: E731
                                   target_modules=["q_proj"], init_lora_weights=False)  # fmt: skip
    model = lk.get_lora_model(copy.deepcopy(base), make(2), "a")
    lk.get_lora_model(model, make(5), "b")
    alone = {}
    for name in ("a", "b"):
        lk.set_adapter(model, name)
        alone[name] = _logits(model, ids)
    with lk.mixed_batch(model, ["b", "__base__", "a"]):
        mixed = _logits(model, ids)
    torch.testing.assert_close(mixed[0], alone["b"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[1], ref[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[2], alone["a"][2], rtol=1e-5, atol=1e-5)
    lk.delete_adapter(model, "a")
    assert model.model.layers[0].mlp.experts.adapter_names == ["b"]


def test_refused_up_front():
    base = tiny_moe_model("qwen3_moe")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    for kw, match in [
        ({"use_dora": True}, "DoRA on expert parameters"),
        ({"lora_dropout": 0.1}, "lora_dropout=0.1"),
        ({"target_parameters": ["self_attn.q_proj.weight"]}, "do not adapt.*q_proj"),
        ({"target_parameters": ["mlp.experts.nothing"]}, "matches no parameter"),
    ]:
        cfg = dict(r=2, target_modules=["q_proj"], target_parameters=EXPERT_TARGETS)
        cfg.update(kw)
        with pytest.raises(ValueError, match=match):
            lk.get_lora_model(base, lk.LoraConfig(**cfg))
        assert not any(isinstance(m, FusedLoraExperts) for m in base.modules())
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k])


def test_add_adapter_refuses_a_bad_rank_before_adding_anything():
    """A bad rank on the second parameter is refused before the first one's factors exist."""
    experts = FusedLoraExperts(
        copy.deepcopy(tiny_moe_model("qwen3_moe").model.layers[0].mlp.experts)
    )
    params = {n: p.clone() for n, p in experts.state_dict().items()}
    for bad in (0, -1, 2.0, True):
        ranks = {"gate_up_proj": 2, "down_proj": bad}
        with pytest.raises(ValueError, match="r of down_proj"):
            experts.add_adapter("a", ranks, {"gate_up_proj": 2, "down_proj": 2})
        assert not experts.adapter_params("a") and "a" not in experts.use_rslora
        assert experts.state_dict().keys() == params.keys()
    experts.add_adapter(
        "a", {"gate_up_proj": 2, "down_proj": 3}, {"gate_up_proj": 2, "down_proj": 3}
    )
    assert experts.adapter_params("a") == ["gate_up_proj", "down_proj"]


def test_fuse_runs_peft_param_wrappers_on_the_kernels(kind, monkeypatch):
    from lora_kernels.integrations import peft as lk_peft

    base = tiny_moe_model(kind)
    ids = torch.randint(0, 97, (2, 7))
    pm = _peft_model(base, rank_pattern={"down_proj": 2})
    want_logits = pm(ids, labels=ids)
    grads_peft = torch.autograd.grad(
        want_logits.loss, [p for p in pm.parameters() if p.requires_grad]
    )
    calls = []
    real = lk_peft.moe_lora
    monkeypatch.setattr(lk_peft, "moe_lora", lambda *a, **k: calls.append(1) or real(*a, **k))
    lk_peft.fuse(pm)
    wrapper = pm.base_model.model.model.layers[0].mlp.experts
    assert type(wrapper).__name__ == "FusedPeftParamWrapper"
    assert "ParamWrapper" in repr(wrapper)
    got = pm(ids, labels=ids)
    assert len(calls) == 2  # one call per MoE layer: the outer wrapper computes the nest
    torch.testing.assert_close(got.logits, want_logits.logits, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(got.loss, [p for p in pm.parameters() if p.requires_grad])
    for a, b in zip(grads, grads_peft, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    with pm.disable_adapter():  # PEFT's own path, unchanged
        torch.testing.assert_close(_logits(pm, ids), _logits(base, ids))
    assert len(calls) == 2
    lk_peft.unfuse(pm)
    assert type(wrapper).__name__ == "ParamWrapper"


def _each_alone(experts, x, ids, w, names):
    """Token t through adapter ``names[t]`` alone (the single-adapter path)."""
    rows = []
    for t, name in enumerate(names):
        experts.set_adapter(None if name == "__base__" else name)
        rows.append(experts(x[t : t + 1], ids[t : t + 1], w[t : t + 1]))
    return torch.cat(rows)


@pytest.mark.parametrize("kind", ["qwen3_moe", "gpt_oss"])
def test_mixed_stack_cache_follows_every_change(kind):
    """A mixed batch without a graph through the factors reuses its factor stack; any change
    (an in-place write, a new tensor, a scaling, a deleted and re-added adapter) rebuilds it, and
    a call that trains stacks anew (gradients reach each adapter's tensors)."""
    experts = FusedLoraExperts(copy.deepcopy(tiny_moe_model(kind).model.layers[0].mlp.experts))
    torch.manual_seed(3)
    for name, r in (("a", 2), ("b", 5)):
        ranks = {"gate_up_proj": r, "down_proj": r}
        alphas = {"gate_up_proj": 4, "down_proj": 6}  # two scalings: the down B carries a ratio
        experts.add_adapter(name, ranks, alphas, init_lora_weights=False)
        with torch.no_grad():
            for p in experts.adapter_parameters(name):
                p.normal_(0, 0.3)
    t, e, k = 5, experts.num_experts, 2
    x = torch.randn(t, 32)
    ids = torch.stack([torch.randperm(e)[:k] for _ in range(t)])
    w = torch.rand(t, k) + 0.1
    names = ["b", "a", "__base__", "a", "b"]

    def check():
        with torch.no_grad():
            got = experts(x, ids, w, adapter_names=names)
            want = _each_alone(experts, x, ids, w, names)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        return experts.__dict__["_mixed_cache"]

    first = check()
    assert check() is first  # reused
    with torch.no_grad():
        experts.lora_B["down_proj"]["a"].weight.mul_(-2.0)  # in place: the version moves
    second = check()
    assert second is not first
    experts.lora_A["gate_up_proj"]["b"].weight.data = torch.randn_like(
        experts.lora_A["gate_up_proj"]["b"].weight
    )  # a new tensor under the same parameter: the storage moves
    third = check()
    assert third is not second
    experts.scaling["down_proj"]["b"] *= 3.0
    assert check() is not third
    experts.delete_adapter("b")
    assert "_mixed_cache" not in experts.__dict__
    experts.add_adapter("b", {"down_proj": 3}, {"down_proj": 3}, init_lora_weights=False)
    check()
    # a graph through the factors: no cache, gradients reach the adapters' own tensors
    loss = experts(x, ids, w, adapter_names=names).square().sum()
    assert "_mixed_cache" not in experts.__dict__
    loss.backward()
    for name in ("a", "b"):
        for p in experts.adapter_parameters(name):
            assert p.grad is not None and p.grad.abs().sum() > 0
