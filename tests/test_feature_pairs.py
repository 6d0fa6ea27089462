"""Feature pairs that used to crash: each is now served or refused up front, by name, with the
state unchanged."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from torch import nn

import lora_kernels as lk
from lora_kernels.layers.linear_4bit import FusedLoraLinear4bit
from lora_kernels.serving.cache import AdapterCache


class _EmbedAndLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(13, 8)
        self.proj = nn.Linear(8, 6)

    def forward(self, ids):
        return self.proj(self.emb(ids))


def test_attach_refuses_an_embedding_layer_by_name_and_allocates_nothing():
    cfg = lk.LoraConfig(r=2, target_modules=["emb", "proj"])
    model = lk.get_lora_model(_EmbedAndLinear(), cfg)
    cache = AdapterCache(1 << 20)
    with pytest.raises(ValueError, match=r"emb \(a FusedLoraEmbedding\).*without attach"):
        cache.attach(model, num_slots=2, max_rank=4)
    assert cache.num_slots == 0
    # a model with linears only still attaches to the same cache afterwards
    linear_only = lk.get_lora_model(nn.Sequential(nn.Linear(8, 6)),
                                    lk.LoraConfig(r=2, target_modules=["0"]))  # fmt: skip
    cache.attach(linear_only, num_slots=2, max_rank=4)
    assert cache.num_slots == 2


def _linear4bit(k=16, n=8):
    bnb = pytest.importorskip("bitsandbytes")
    base = bnb.nn.Linear4bit(k, n, compute_dtype=torch.float32, quant_type="nf4")
    base.weight = bnb.nn.Params4bit(torch.randn(n, k), requires_grad=False, quant_type="nf4")
    return base.to("cpu")


def test_attach_refuses_a_4bit_layer_by_name():
    model = nn.Sequential(_linear4bit(), nn.ReLU(), nn.Linear(8, 4))
    lk.get_lora_model(model, lk.LoraConfig(r=2, target_modules=["0", "2"]))
    cache = AdapterCache(1 << 20)
    with pytest.raises(ValueError, match=r"0 \(a FusedLoraLinear4bit with a torch.uint8"):
        cache.attach(model, num_slots=2, max_rank=4)
    assert cache.num_slots == 0
    x = torch.randn(3, 16)
    model(x)  # the model still runs


def test_4bit_layer_from_sizes_is_refused_and_add_adapter_has_no_use_dora():
    with pytest.raises(TypeError, match=r"from_linear"):
        FusedLoraLinear4bit(16, 16)
    assert "use_dora" not in inspect.signature(FusedLoraLinear4bit.add_adapter).parameters
    layer = FusedLoraLinear4bit.from_linear(_linear4bit(), r=2)
    with pytest.raises(TypeError, match="use_dora"):
        layer.add_adapter("d", 2, 2, use_dora=True)
    assert layer.adapter_names == ["default"]
    layer.add_adapter("other", 3, 6)
    assert layer(torch.randn(2, 16)).shape == (2, 8)


def test_get_lora_model_takes_peft_lora_config():
    peft = pytest.importorskip("peft")
    base = nn.Sequential(nn.Linear(9, 7), nn.ReLU(), nn.Linear(7, 5))
    fields = {"r": 3, "lora_alpha": 5, "target_modules": ["0", "2"], "use_rslora": True,
              "init_lora_weights": False}  # fmt: skip
    torch.manual_seed(1)
    ours = lk.get_lora_model(copy.deepcopy(base), lk.LoraConfig(**fields))
    torch.manual_seed(1)
    theirs = lk.get_lora_model(copy.deepcopy(base), peft.LoraConfig(**fields))
    assert isinstance(theirs.lora_configs["default"], lk.LoraConfig)
    assert theirs.lora_configs["default"].use_rslora
    x = torch.randn(4, 9)
    torch.testing.assert_close(theirs(x), ours(x), rtol=0, atol=0)
    # a PEFT field that changes the math is refused by name; another tuner's config names its
    # class with its module; the model is unchanged by either
    before = {k: v.clone() for k, v in theirs.state_dict().items()}
    with pytest.raises(ValueError, match="lora_bias=True"):
        lk.get_lora_model(theirs, peft.LoraConfig(target_modules=["0"], lora_bias=True), "b")
    with pytest.raises(TypeError, match=r"got peft\.tuners\.ia3\.config\.IA3Config"):
        lk.get_lora_model(theirs, peft.IA3Config(target_modules=["0"]), "c")
    assert theirs[0].adapter_names == ["default"]
    assert all(torch.equal(before[k], v) for k, v in theirs.state_dict().items())


def test_unmerged_switch_without_cache_is_one_write_after_the_first(monkeypatch):
    """After one switch that visits every layer, an unmerged switch without a cache sets the
    model's state only (no layer's set_adapter runs) and gives the per-layer switch's outputs;
    a layer that changes by itself makes the next switch visit every layer again."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 5))
    lk.get_lora_model(model, lk.LoraConfig(r=2, target_modules=["0", "2", "4"],
                                           init_lora_weights=False))  # fmt: skip
    lk.get_lora_model(model, lk.LoraConfig(r=3, target_modules=["2"], init_lora_weights=False),
                      "b")  # fmt: skip
    twin = copy.deepcopy(model)
    x = torch.randn(3, 6)

    def per_layer(name):  # the old route: every layer's own set_adapter
        for m in twin.modules():
            if isinstance(m, lk.FusedLoraLinear):
                m.set_adapter(name if name in m.lora_A else None)
        return twin(x)

    lk.switch_adapter(model, "default")
    visits = []
    real = lk.FusedLoraLinear.set_adapter
    ours = {id(m) for m in model.modules()}

    def counted(self, n):
        if id(self) in ours:
            visits.append(n)
        return real(self, n)

    monkeypatch.setattr(lk.FusedLoraLinear, "set_adapter", counted)
    for name in ("b", None, "default", "b", "__base__", "b"):
        lk.switch_adapter(model, name)
        want = None if name == "__base__" else name
        assert [m.active_adapter for m in model if isinstance(m, lk.FusedLoraLinear)] == [
            want if want in m.lora_A else None for m in twin if isinstance(m, lk.FusedLoraLinear)
        ]
        torch.testing.assert_close(model(x), per_layer(want), rtol=0, atol=0)
    assert visits == []
    with pytest.raises(ValueError, match="no layer of the model has adapter 'zz'"):
        lk.switch_adapter(model, "zz")
    assert model[2].active_adapter == "b"  # refused: unchanged
    model[0].set_adapter(None)  # a layer changes by itself
    visits.clear()
    lk.switch_adapter(model, "default")
    assert len(visits) == 3 and model[0].active_adapter == "default"
    model[0].delete_adapter("default")  # the adapter set changed: visited again, then flat
    lk.switch_adapter(model, "b")
    visits.clear()
    lk.switch_adapter(model, "default")
    assert visits == [] and model[0].active_adapter is None and model[2].active_adapter == "default"
