"""LoraConfig, PEFT's target matching, get_lora_model and model-level adapter management, each
checked against PEFT itself on a tiny LlamaForCausalLM built from a config."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from torch import nn

from lora_kernels.layers.linear import FusedLoraLinear
from lora_kernels.models.model import (
    LoraConfig,
    ModulesToSaveWrapper,
    delete_adapter,
    get_lora_model,
    lora_layers,
    merge_and_unload,
    mixed_batch,
    print_trainable_parameters,
    set_adapter,
    trainable_parameters,
)
from tests.helpers import (
    assert_same_model_output,
    logits,
    lora_names_of,
    peft_model_of,
    randomise,
    tiny_bert_classifier,
    tiny_llama,
    token_ids,
)
from tests.optional import optional

peft = optional("peft")
transformers = optional("transformers")


# ------------------------------------------------------------------------------------------
# LoraConfig
# ------------------------------------------------------------------------------------------


def test_config_defaults_and_field_names_are_peft_s():
    ours = {f.name: f for f in dataclasses.fields(LoraConfig)}
    theirs = {f.name: f for f in dataclasses.fields(peft.LoraConfig)}
    for name, f in ours.items():
        assert name in theirs, f"{name} is not a PEFT LoraConfig field"
        mine = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        t = theirs[name]
        peft_default = t.default if t.default is not dataclasses.MISSING else t.default_factory()
        assert mine == peft_default, f"{name}: {mine!r} != PEFT's {peft_default!r}"


def test_config_round_trip_and_peft_reads_to_dict():
    cfg = LoraConfig(
        r=4,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj"],
        rank_pattern={"v_proj": 2},
        alpha_pattern={"q_proj": 3},
        layers_to_transform=[1],
        layers_pattern="layers",
        bias="lora_only",
        use_rslora=True,
        modules_to_save=["lm_head"],
    )
    assert LoraConfig.from_dict(cfg.to_dict()) == cfg
    d = cfg.to_dict()
    assert d["peft_type"] == "LORA" and d["use_dora"] is False and d["lora_bias"] is False
    theirs = peft.LoraConfig(**{k: v for k, v in d.items() if k != "peft_type"})
    assert theirs.r == 4 and theirs.rank_pattern == {"v_proj": 2} and theirs.use_rslora


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("lora_bias", True, "lora_bias=True"),
        ("layer_replication", [[0, 1]], "layer_replication"),
        ("alora_invocation_tokens", [1, 2], "alora_invocation_tokens"),
        ("init_lora_weights", "pissa", "rewrote"),
        ("init_lora_weights", "olora", "rewrote"),
        ("some_future_field", 3, "unknown field"),
        ("peft_type", "IA3", "expected peft_type 'LORA'"),
    ],
)
def test_from_dict_refuses_what_changes_the_math(field, value, match):
    d = LoraConfig(target_modules=["q_proj"]).to_dict()
    d[field] = value
    with pytest.raises(ValueError, match=match):
        LoraConfig.from_dict(d)


def test_from_dict_ignores_fields_without_effect():
    d = LoraConfig(target_modules=["q_proj"]).to_dict()
    d.update(
        peft_version="0.99.0",
        eva_config={"rho": 2.0},
        some_future_field=None,
        runtime_config={"ephemeral_gpu_offload": False},
    )
    assert LoraConfig.from_dict(d) == LoraConfig(target_modules=["q_proj"])
    d["init_lora_weights"] = "eva"
    with pytest.raises(ValueError, match="init_lora_weights"):
        LoraConfig.from_dict(d)
    assert LoraConfig.from_dict(d, loading=True).init_lora_weights is True


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"r": 0}, "expected r to be a positive int, got 0"),
        ({"bias": "some"}, "expected bias in"),
        ({"lora_dropout": 1.0}, r"lora_dropout in \[0, 1\)"),
        ({"target_modules": 3}, "expected target_modules to be None, a str or a list"),
        ({"target_modules": ".*", "layers_to_transform": [0]}, "layers_to_transform cannot"),
        ({"layers_pattern": "layers"}, "layers_pattern needs layers_to_transform"),
        ({"rank_pattern": {"q": 0}}, "positive ranks"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        LoraConfig(**kwargs)


# ------------------------------------------------------------------------------------------
# matching: the same modules as PEFT, with the same ranks and scalings
# ------------------------------------------------------------------------------------------

MATCHING_CASES = [
    {"target_modules": ["q_proj", "v_proj"]},
    {"target_modules": ["self_attn.o_proj", "model.layers.1.mlp.up_proj"]},
    {"target_modules": r".*\.layers\.1\..*(gate|down)_proj"},
    {"target_modules": "all-linear"},
    {"target_modules": "all-linear", "exclude_modules": ["k_proj", "mlp.up_proj"]},
    {"target_modules": ["q_proj", "down_proj"], "exclude_modules": r".*layers\.0\.mlp.*"},
    {"target_modules": ["q_proj", "up_proj"], "layers_to_transform": [1]},
    {"target_modules": ["v_proj"], "layers_to_transform": 0, "layers_pattern": "layers"},
    {"target_modules": None},
    {
        "target_modules": ["q_proj", "k_proj", "up_proj"],
        "rank_pattern": {"k_proj": 3, r"layers\.1\.mlp\.up_proj": 5},
        "alpha_pattern": {"q_proj": 7, "up_proj": 2},
        "use_rslora": True,
    },
]


@pytest.mark.parametrize("kwargs", MATCHING_CASES)
def test_targets_ranks_and_scalings_match_peft(kwargs):
    base = tiny_llama()
    theirs = peft_model_of(base, r=4, lora_alpha=8, **kwargs)
    ours = get_lora_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, **kwargs))
    assert lora_names_of(ours) == lora_names_of(theirs)
    for name, layer in lora_layers(ours):
        twin = theirs.base_model.model.get_submodule(name)
        assert layer.r["default"] == twin.r["default"], name
        assert math.isclose(layer.scaling["default"], twin.scaling["default"]), name
    assert trainable_parameters(ours) == theirs.get_nb_trainable_parameters()


def test_all_linear_skips_the_output_head_and_classifier():
    ours = get_lora_model(tiny_llama(), LoraConfig(target_modules="all-linear"))
    names = lora_names_of(ours)
    assert "lm_head" not in names and len(names) == 14
    bert = tiny_bert_classifier()
    theirs = peft_model_of(bert, target_modules="all-linear", task_type="SEQ_CLS")
    ours = get_lora_model(
        copy.deepcopy(bert), LoraConfig(target_modules="all-linear", task_type="SEQ_CLS")
    )
    assert "classifier" not in lora_names_of(ours)
    assert lora_names_of(ours) == lora_names_of(theirs)
    assert isinstance(ours.classifier, ModulesToSaveWrapper)
    assert trainable_parameters(ours) == theirs.get_nb_trainable_parameters()


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_bias_modes_train_what_peft_trains(bias):
    bert = tiny_bert_classifier()
    kwargs = {"target_modules": ["query", "value"], "bias": bias, "modules_to_save": ["pooler"]}
    theirs = peft_model_of(bert, **kwargs)
    ours = get_lora_model(copy.deepcopy(bert), LoraConfig(**kwargs))
    assert trainable_parameters(ours) == theirs.get_nb_trainable_parameters()

    def trainable(model):
        return {
            n.removeprefix("base_model.model.").replace(".base_layer", "")
            for n, p in model.named_parameters()
            if p.requires_grad
        }

    assert trainable(ours) == trainable(theirs)


# ------------------------------------------------------------------------------------------
# get_lora_model
# ------------------------------------------------------------------------------------------


def test_shares_weights_freezes_the_rest_and_matches_peft_outputs_and_grads():
    base = tiny_llama()
    weight = base.model.layers[0].self_attn.q_proj.weight
    kwargs = {"r": 4, "lora_alpha": 6, "target_modules": ["q_proj", "v_proj", "down_proj"]}
    theirs = peft_model_of(base, **kwargs)
    randomise(theirs)
    ours = get_lora_model(base, LoraConfig(**kwargs))
    assert ours is base
    layer = ours.model.layers[0].self_attn.q_proj
    assert isinstance(layer, FusedLoraLinear) and layer.weight is weight
    with torch.no_grad():
        for name, lyr in lora_layers(ours):
            twin = theirs.base_model.model.get_submodule(name)
            lyr.lora_A["default"].weight.copy_(twin.lora_A["default"].weight)
            lyr.lora_B["default"].weight.copy_(twin.lora_B["default"].weight)
    ids = token_ids()
    assert_same_model_output("logits", ours, theirs, ids)
    for model in (ours, theirs):
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
    for name, lyr in lora_layers(ours):
        twin = theirs.base_model.model.get_submodule(name)
        for part in ("lora_A", "lora_B"):
            g = getattr(lyr, part)["default"].weight.grad
            g_ref = getattr(twin, part)["default"].weight.grad
            torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for n, p in ours.named_parameters() if "lora_" not in n)


def test_second_adapter_switch_delete_and_merge_and_unload():
    base = tiny_llama()
    ids = token_ids()
    plain = logits(base, ids)
    model = get_lora_model(base, LoraConfig(r=2, target_modules=["q_proj"]), "one")
    model = get_lora_model(model, LoraConfig(r=3, target_modules=["q_proj", "up_proj"]), "two")
    randomise(model)
    assert model.active_lora_adapter == "two"
    q = model.model.layers[0].self_attn.q_proj
    assert q.adapter_names == ["one", "two"] and q.active_adapter == "two"
    assert q.lora_A["two"].weight.requires_grad and not q.lora_A["one"].weight.requires_grad
    out_two = logits(model, ids)
    set_adapter(model, "one")
    up = model.model.layers[0].mlp.up_proj
    assert q.active_adapter == "one" and up.active_adapter is None
    assert q.lora_A["one"].weight.requires_grad and not q.lora_A["two"].weight.requires_grad
    out_one = logits(model, ids)
    set_adapter(model, None)
    torch.testing.assert_close(logits(model, ids), plain)
    set_adapter(model, "two")
    torch.testing.assert_close(logits(model, ids), out_two)
    with pytest.raises(ValueError, match="unknown adapter 'three'"):
        set_adapter(model, "three")
    with pytest.raises(ValueError, match="already has an adapter named 'one'"):
        get_lora_model(model, LoraConfig(target_modules=["q_proj"]), "one")
    delete_adapter(model, "two")
    assert model.active_lora_adapter == "one" and list(model.lora_configs) == ["one"]
    torch.testing.assert_close(logits(model, ids), out_one)
    merged = merge_and_unload(model)
    assert not list(lora_layers(merged)) and type(merged.model.layers[0].self_attn.q_proj) is (
        nn.Linear
    )
    torch.testing.assert_close(logits(merged, ids), out_one, rtol=1e-5, atol=1e-5)


def test_modules_to_save_get_a_copy_per_adapter():
    bert = tiny_bert_classifier()
    x = token_ids(50, (3, 6))
    before = logits(bert, x)
    cfg = LoraConfig(target_modules=["query"], modules_to_save=["classifier"])
    model = get_lora_model(bert, cfg, "a")
    get_lora_model(model, cfg, "b")
    head = model.classifier
    assert isinstance(head, ModulesToSaveWrapper) and head.out_features == 3
    with torch.no_grad():
        head.modules_to_save["a"].weight.add_(1.0)
    assert torch.equal(logits(model, x), before)  # "b" is active, its copy is untouched
    set_adapter(model, "a")
    assert not torch.equal(logits(model, x), before)
    assert head.modules_to_save["a"].weight.requires_grad
    assert not head.original_module.weight.requires_grad
    assert not head.modules_to_save["b"].weight.requires_grad


def test_mixed_batch_rows_match_single_adapter_runs():
    base = tiny_llama()
    model = get_lora_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), "one")
    get_lora_model(model, LoraConfig(r=4, target_modules=["q_proj", "up_proj"]), "two")
    randomise(model)
    ids = token_ids(shape=(3, 5))
    names = ["two", "__base__", "one"]
    with torch.no_grad(), mixed_batch(model, names):
        mixed = model(ids).logits
    for i, name in enumerate(names):
        set_adapter(model, None if name == "__base__" else name)
        torch.testing.assert_close(mixed[i], logits(model, ids)[i], rtol=1e-5, atol=1e-5)
    with (
        pytest.raises(ValueError, match=r"unknown adapters \['nope'\]"),
        mixed_batch(model, ["nope"]),
    ):
        pass


def test_refusals_leave_the_model_unchanged():
    model = tiny_llama()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    cases = [
        (LoraConfig(target_modules=["nothing_here"]), "matches no nn.Linear"),
        (LoraConfig(target_modules=["q_proj", "norm"]), r"model\.norm \(LlamaRMSNorm\)"),
        (LoraConfig(target_modules=r"model\.layers\.0\.self_attn"), "LlamaAttention"),
    ]
    for cfg, match in cases:
        with pytest.raises(ValueError, match=match):
            get_lora_model(model, cfg)
    with pytest.raises(ValueError, match="'__base__' is reserved"):
        get_lora_model(model, LoraConfig(target_modules=["q_proj"]), "__base__")
    assert not list(lora_layers(model)) and not hasattr(model, "lora_configs")
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="no default for model type None"):
        get_lora_model(nn.Sequential(nn.Linear(2, 2)), LoraConfig())
    with pytest.raises(TypeError, match="already holds PEFT layers"):
        get_lora_model(peft_model_of(tiny_llama(), target_modules=["q_proj"]), LoraConfig())


def test_trainable_parameter_summary(capsys):
    model = get_lora_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    trainable, total = trainable_parameters(model)
    assert trainable == 2 * (2 * 32 + 32 * 2)
    assert total == sum(p.numel() for p in model.parameters())
    print_trainable_parameters(model)
    line = capsys.readouterr().out.strip()
    assert line == (
        f"trainable params: {trainable:,d} || all params: {total:,d} || "
        f"trainable%: {100 * trainable / total:.4f}"
    )
