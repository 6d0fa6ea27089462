"""``fuse`` as a drop-in on every kind of PEFT model PEFT's own tests build: total (never raises,
never warns), idempotent, layers it does not fuse left exactly as PEFT made them (bit for bit),
fused layers that still present themselves as PEFT's (repr, ``get_layer_status``,
``get_model_status``, ``isinstance``), layers added later picked up by the next call; and
``lk.load_adapter`` into an existing adapter name."""

from __future__ import annotations

import copy
import logging
import warnings

import pytest
import torch
from torch import nn

import lora_kernels as lk
from tests.test_checkpoint import assert_unchanged, snapshot
from tests.test_model import tiny_llama

peft = pytest.importorskip("peft")
from peft.tuners.lora.layer import Embedding as PeftLoraEmbedding  # noqa: E402
from peft.tuners.lora.layer import Linear as PeftLoraLinear  # noqa: E402

from lora_kernels.integrations.peft import (  # noqa: E402
    FUSED_CLASSES,
    FusedPeftEmbedding,
    FusedPeftLinear,
    fuse,
    fuse_report,
    unfuse,
)


class Net(nn.Module):
    """Every layer kind PEFT's LoRA tests target: Embedding, Conv1d, Conv2d, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8, padding_idx=0)
        self.conv1 = nn.Conv1d(8, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(1, 2, 3, padding=1)
        self.lin = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        h = self.conv1(h.transpose(1, 2)).transpose(1, 2)
        h = h + self.conv2(h[:, None]).mean(1)
        return self.head(torch.relu(self.lin(h)))


def net_ids():
    return torch.randint(0, 20, (3, 6))


CONFIGS = {
    "conv1d": lambda: peft.LoraConfig(target_modules=["conv1"]),
    "conv2d": lambda: peft.LoraConfig(target_modules=["conv2"]),
    "embedding": lambda: peft.LoraConfig(target_modules=["emb"]),
    "linear": lambda: peft.LoraConfig(target_modules=["lin"], lora_dropout=0.1),
    "all": lambda: peft.LoraConfig(target_modules=["emb", "conv1", "conv2", "lin", "head"]),
    "dora": lambda: peft.LoraConfig(target_modules=["lin", "conv2"], use_dora=True),
    "target_parameters": lambda: peft.LoraConfig(
        target_modules=[], target_parameters=["lin.weight"]
    ),
    "loha": lambda: peft.LoHaConfig(target_modules=["lin", "conv2"]),
    "ia3": lambda: peft.IA3Config(target_modules=["lin"], feedforward_modules=[]),
}


def _randomised(model: nn.Module) -> nn.Module:
    """Every trainable (adapter) tensor made non-zero, so every adapter changes the output."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
    return model


def _peft_net(name: str):
    torch.manual_seed(0)
    return _randomised(peft.get_peft_model(Net(), CONFIGS[name]()))


def _fuse_silently(model):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fuse must never warn (tests assert on warnings)
        return fuse(model)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fuse_is_total_idempotent_and_leaves_the_rest_bit_for_bit(name):
    theirs = _peft_net(name)
    fused = _fuse_silently(copy.deepcopy(theirs))
    report = fuse_report(fused)
    for mod_name, module in fused.named_modules():
        peft_module = theirs.get_submodule(mod_name)
        if mod_name in report["fused"]:
            assert FUSED_CLASSES[type(peft_module)] is type(module)
        else:
            assert type(module) is type(peft_module)  # untouched
    ids = net_ids()
    for model in (fused, theirs):
        model.train()
        torch.manual_seed(1)  # the same dropout masks
        model(ids).square().sum().backward()
        model.eval()
    y_fused, y_theirs = fused(ids), theirs(ids)
    if not report["fused"]:
        assert torch.equal(y_fused, y_theirs)
        assert all(torch.equal(g, _grads(theirs)[n]) for n, g in _grads(fused).items())
    else:
        torch.testing.assert_close(y_fused, y_theirs)
        g_theirs = _grads(theirs)
        for n, g in _grads(fused).items():
            torch.testing.assert_close(g, g_theirs[n], msg=n)
    classes = [type(m) for m in fused.modules()]
    _fuse_silently(fused)  # idempotent
    assert [type(m) for m in fused.modules()] == classes
    assert fused.get_layer_status() == theirs.get_layer_status()
    assert fused.get_model_status() == theirs.get_model_status()
    unfuse(fused)
    assert [type(m) for m in fused.modules()] == [type(m) for m in theirs.modules()]


def test_fused_layers_present_themselves_as_peft_s():
    theirs = _peft_net("all")
    fused = fuse(copy.deepcopy(theirs))
    lin = fused.base_model.model.lin
    emb = fused.base_model.model.emb
    assert type(lin) is FusedPeftLinear and isinstance(lin, peft.tuners.lora.Linear)
    assert type(emb) is FusedPeftEmbedding and isinstance(emb, peft.tuners.lora.Embedding)
    assert repr(lin).startswith("lora.Linear(") and repr(emb).startswith("lora.Embedding(")
    assert repr(lin) == repr(theirs.base_model.model.lin)
    types = {s.name: s.module_type for s in fused.get_layer_status()}
    assert types["model.lin"] == "lora.Linear" and types["model.emb"] == "lora.Embedding"
    report = fuse_report(fused)
    assert sorted(report["fused"]) == ["base_model.model.emb", "base_model.model.head",
                                       "base_model.model.lin"]  # fmt: skip
    assert report["left"] == {
        "base_model.model.conv1": "peft.tuners.lora.layer.Conv1d",
        "base_model.model.conv2": "peft.tuners.lora.layer.Conv2d",
    }
    plain = nn.Sequential(nn.Linear(2, 2))
    assert fuse(plain) is plain and fuse_report(plain) == {"fused": [], "left": {}, "layers": {}}
    with pytest.raises(TypeError, match="expected a PEFT model"):
        fuse("model")


def test_fuse_logs_its_report_at_debug_level(caplog):
    with caplog.at_level(logging.DEBUG, logger="lora_kernels.integrations.peft"):
        fuse(_peft_net("all"))
    assert "3 layers on lora_kernels, 2 left on PEFT's code" in caplog.text
    assert all(r.levelno == logging.DEBUG for r in caplog.records)


def test_a_later_fuse_picks_up_adapters_added_since(tmp_path):
    torch.manual_seed(0)
    base = Net()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=["conv1"]))
    _fuse_silently(theirs)
    assert fuse_report(theirs)["fused"] == []
    # add_adapter for new target modules: PEFT makes plain layers, the next fuse takes them
    theirs.add_adapter("two", peft.LoraConfig(target_modules=["lin", "emb"]))
    lin = theirs.base_model.model.lin
    assert type(lin) is PeftLoraLinear
    _fuse_silently(theirs)
    assert type(lin) is FusedPeftLinear
    assert type(theirs.base_model.model.emb) is FusedPeftEmbedding
    # PEFT's load_adapter of an adapter with other targets
    saved = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=["head"]))
    _randomised(saved).save_pretrained(tmp_path / "head")
    theirs.load_adapter(tmp_path / "head", adapter_name="three")
    head = theirs.base_model.model.head
    assert type(head) is PeftLoraLinear
    reference = copy.deepcopy(theirs)
    _fuse_silently(theirs)
    assert type(head) is FusedPeftLinear
    for model in (theirs, reference):
        model.set_adapter("three")
    ids = net_ids()
    torch.testing.assert_close(theirs(ids), reference(ids))
    # inject_adapter_in_model on a plain model (no PeftModel around it)
    injected = peft.inject_adapter_in_model(peft.LoraConfig(target_modules=["lin"]), Net())
    _randomised(injected)
    plain_copy = copy.deepcopy(injected)
    _fuse_silently(injected)
    assert type(injected.lin) is FusedPeftLinear and type(injected.lin.base_layer) is nn.Linear
    torch.testing.assert_close(injected(ids), plain_copy(ids))


def test_embedding_only_model_and_peft_layer_types_are_covered():
    theirs = _peft_net("embedding").eval()
    fused = fuse(copy.deepcopy(theirs))
    assert type(fused.base_model.model.emb) is FusedPeftEmbedding
    param_wrapper = peft.tuners.lora.layer.ParamWrapper  # MoE experts (tests/test_moe_models.py)
    assert set(FUSED_CLASSES) == {PeftLoraLinear, PeftLoraEmbedding, param_wrapper}
    ids = net_ids()
    with torch.no_grad():
        torch.testing.assert_close(fused(ids), theirs(ids))
        names = ["default", "__base__", "default"]
        torch.testing.assert_close(
            fused(ids, adapter_names=names), theirs(ids, adapter_names=names)
        )


# ------------------------------------------------------------------------------------------
# lk.load_adapter into an existing adapter name
# ------------------------------------------------------------------------------------------


def test_load_into_an_existing_adapter_refuses_a_config_that_does_not_fit(tmp_path):
    source = lk.get_lora_model(
        tiny_llama(), lk.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    lk.save_adapter(source, tmp_path)
    qv, v0, o0 = ["q_proj", "v_proj"], r"\['model\.layers\.0\.self_attn\.v_proj'", r"o_proj'"
    cases = [
        (lk.LoraConfig(r=2, target_modules=qv), r"ranks \[.*r=2 in the model, 4 in the checkpoint"),
        (lk.LoraConfig(r=4, target_modules=["q_proj"]), "the model's adapter lacks " + v0),
        (lk.LoraConfig(r=4, target_modules=[*qv, "o_proj"]), "the checkpoint lacks .*" + o0),
    ]
    for config, match in cases:
        model = lk.get_lora_model(tiny_llama(), config)
        snap = snapshot(model)
        with pytest.raises(ValueError, match="into its existing adapter 'default'") as info:
            lk.load_adapter(model, tmp_path)
        assert info.match(match) and info.match("The model is unchanged")
        assert_unchanged(model, snap)
    model = lk.get_lora_model(tiny_llama(), lk.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    lk.get_lora_model(model, lk.LoraConfig(r=2, target_modules=["q_proj"]), "other")
    model.model.layers[0].self_attn.q_proj.merge("default")
    with pytest.raises(RuntimeError, match="are merged; unmerge them first"):
        lk.load_adapter(model, tmp_path)
    model.model.layers[0].self_attn.q_proj.unmerge()
    lk.load_adapter(model, tmp_path, is_trainable=True)
    assert model.active_lora_adapter == "default"
    layer = model.model.layers[1].self_attn.v_proj
    assert torch.equal(
        layer.lora_B["default"].weight,
        source.model.layers[1].self_attn.v_proj.lora_B["default"].weight,
    )
    assert layer.lora_B["default"].weight.requires_grad
