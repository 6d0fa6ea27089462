"""PEFT-layout checkpoints both ways: PEFT's save_pretrained loads into our model with PEFT's
outputs, PeftModel.from_pretrained loads ours with our outputs, and bad checkpoints are refused
with the model unchanged."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from lora_kernels.layers.linear import FusedLoraLinear
from lora_kernels.models.checkpoint import (
    load_adapter,
    read_peft_adapter,
    save_adapter,
    split_peft_key,
)
from lora_kernels.models.model import LoraConfig, get_lora_model, lora_layers, set_adapter
from tests.helpers import (
    assert_same_model_output,
    logits,
    peft_model_of,
    randomise,
    tiny_bert_classifier,
    tiny_llama,
    token_ids,
)
from tests.optional import optional
from tests.tolerances import assert_close_to_ref

peft = optional("peft")
from safetensors.torch import load_file, save_file  # noqa: E402

LLAMA_CASES = [
    {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    {
        "r": 4,
        "lora_alpha": 16,
        "target_modules": "all-linear",
        "rank_pattern": {"down_proj": 2, r"layers\.1\.self_attn\.k_proj": 7},
        "alpha_pattern": {"o_proj": 3},
        "use_rslora": True,
    },
    {"r": 3, "target_modules": ["up_proj", "o_proj"], "layers_to_transform": [1]},
]


def snapshot(model):
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        [type(m) for m in model.modules()],
    )


def assert_unchanged(model, snap):
    state, types = snap
    now = model.state_dict()
    assert set(now) == set(state)
    assert all(torch.equal(now[k], state[k]) for k in state)
    assert [type(m) for m in model.modules()] == types


# ------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------


def test_split_peft_key():
    assert split_peft_key("base_model.model.a.b.lora_A.weight") == ("a.b", "lora_A")
    assert split_peft_key("base_model.model.model.layers.0.q.lora_B.weight") == (
        "model.layers.0.q",
        "lora_B",
    )
    assert split_peft_key("base_model.model.a.lora_A.default.weight") == ("a", "lora_A")
    assert split_peft_key("a.b.lora_B.weight") == ("a.b", "lora_B")
    for bad in ("base_model.model.a.weight", "base_model.model.a.lora_A.x.y.weight", "lora_A"):
        with pytest.raises(ValueError, match="split_peft_key: expected a key like"):
            split_peft_key(bad)


def test_read_peft_adapter_safetensors_bin_and_errors(tmp_path):
    theirs = peft_model_of(tiny_llama(), r=2, target_modules=["q_proj"])
    randomise(theirs)
    theirs.save_pretrained(tmp_path / "st")
    config, tensors = read_peft_adapter(tmp_path / "st")
    assert config["peft_type"] == "LORA" and config["r"] == 2
    assert sorted(tensors) == sorted(
        f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_{p}.weight"
        for i in (0, 1)
        for p in "AB"
    )
    theirs.save_pretrained(tmp_path / "bin", safe_serialization=False)
    config_bin, tensors_bin = read_peft_adapter(tmp_path / "bin")
    assert config_bin == config and all(torch.equal(tensors_bin[k], tensors[k]) for k in tensors)
    with pytest.raises(FileNotFoundError, match="expected path to be an adapter directory"):
        read_peft_adapter(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no adapter_config.json"):
        read_peft_adapter(tmp_path / "empty")
    (tmp_path / "empty" / "adapter_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="neither adapter_model.safetensors nor"):
        read_peft_adapter(tmp_path / "empty")
    (tmp_path / "empty" / "adapter_config.json").write_text("{oops")
    with pytest.raises(ValueError, match="is not valid JSON"):
        read_peft_adapter(tmp_path / "empty")


# ------------------------------------------------------------------------------------------
# PEFT -> us, us -> PEFT
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", LLAMA_CASES)
def test_peft_save_loads_into_plain_model_with_peft_logits(tmp_path, kwargs):
    base = tiny_llama()
    theirs = peft_model_of(base, **kwargs)
    randomise(theirs)
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(copy.deepcopy(base), tmp_path)
    ids = token_ids()
    assert_same_model_output("logits", ours, theirs, ids)
    assert all(not p.requires_grad for p in ours.parameters())  # PEFT's is_trainable=False
    assert ours.lora_configs["default"].inference_mode


@pytest.mark.parametrize("kwargs", LLAMA_CASES)
def test_our_save_loads_into_peft_with_our_logits(tmp_path, kwargs):
    base = tiny_llama()
    ours = get_lora_model(copy.deepcopy(base), LoraConfig(**kwargs))
    randomise(ours)
    save_adapter(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["inference_mode"] is True
    keys = load_file(str(tmp_path / "adapter_model.safetensors")).keys()
    assert all(k.startswith("base_model.model.model.layers.") for k in keys)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    ids = token_ids()
    ref64 = logits(copy.deepcopy(ours).double(), ids).double()
    assert_close_to_ref("logits", logits(theirs, ids), ref64, logits(ours, ids))
    again = load_adapter(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(logits(again, ids), logits(ours, ids), rtol=0, atol=0)


def test_biases_and_modules_to_save_both_ways(tmp_path):
    bert = tiny_bert_classifier()
    ids = token_ids(50, (3, 6))
    for bias in ("all", "lora_only"):
        kwargs = {"r": 2, "target_modules": ["query", "value"], "bias": bias}
        theirs = peft_model_of(bert, task_type="SEQ_CLS", **kwargs)
        randomise(theirs)
        with torch.no_grad():  # trained biases and head differ from the base model's
            for name, p in theirs.named_parameters():
                if p.requires_grad and "lora_" not in name:
                    p.add_(torch.randn_like(p))
        theirs.save_pretrained(tmp_path / f"peft_{bias}")
        ours = load_adapter(copy.deepcopy(bert), tmp_path / f"peft_{bias}")
        assert ours.lora_configs["default"].task_type == "SEQ_CLS"
        assert_same_model_output(f"peft -> ours, bias={bias}", ours, theirs, ids)
        save_adapter(ours, tmp_path / f"ours_{bias}")
        back = peft.PeftModel.from_pretrained(copy.deepcopy(bert), tmp_path / f"ours_{bias}")
        torch.testing.assert_close(logits(back, ids), logits(theirs, ids), rtol=0, atol=0)


def test_load_adds_a_second_adapter_to_a_converted_model(tmp_path):
    base = tiny_llama()
    theirs = peft_model_of(base, r=2, target_modules=["v_proj", "gate_proj"])
    randomise(theirs)
    theirs.save_pretrained(tmp_path)
    ours = get_lora_model(copy.deepcopy(base), LoraConfig(r=3, target_modules=["q_proj"]))
    randomise(ours)
    ids = token_ids()
    first = logits(ours, ids)
    load_adapter(ours, tmp_path, "peft", is_trainable=True)
    assert ours.active_lora_adapter == "peft"
    assert ours.model.layers[0].self_attn.v_proj.lora_A["peft"].weight.requires_grad
    assert_same_model_output("second adapter", ours, theirs, ids)
    set_adapter(ours, "default")
    torch.testing.assert_close(logits(ours, ids), first)


def test_tensors_are_cast_to_the_model_dtype(tmp_path):
    base = tiny_llama()
    theirs = peft_model_of(base, r=2, target_modules=["q_proj"])
    randomise(theirs)
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(copy.deepcopy(base).to(torch.bfloat16), tmp_path)
    layer = ours.model.layers[1].self_attn.q_proj
    assert isinstance(layer, FusedLoraLinear)
    assert layer.lora_A["default"].weight.dtype == torch.bfloat16
    ref = theirs.base_model.model.model.layers[1].self_attn.q_proj.lora_A["default"].weight
    torch.testing.assert_close(layer.lora_A["default"].weight.float(), ref, rtol=1e-2, atol=0)


# ------------------------------------------------------------------------------------------
# refusals: one clear error, model unchanged
# ------------------------------------------------------------------------------------------


def write_broken(tmp_path, edit_tensors=None, edit_config=None):
    theirs = peft_model_of(tiny_llama(), r=2, target_modules=["q_proj", "v_proj"])
    theirs.save_pretrained(tmp_path)
    st = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(st))
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, str(st))
    cfg_file = tmp_path / "adapter_config.json"
    config = json.loads(cfg_file.read_text())
    if edit_config:
        edit_config(config)
    cfg_file.write_text(json.dumps(config))
    return tmp_path


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


def _drop_and_add(t):
    del t[f"{Q0}.lora_A.weight"]
    t["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"] = torch.zeros(2, 32)


def _reshape(t):
    t[f"{Q0}.lora_B.weight"] = torch.zeros(32, 3)


def _int_tensor(t):
    t[f"{Q0}.lora_B.weight"] = torch.zeros(32, 2, dtype=torch.int32)


def _dora(c):
    c["use_dora"] = True


def _rank(c):
    c["r"] = 4


@pytest.mark.parametrize(
    "edit_tensors, edit_config, match",
    [
        (_drop_and_add, None, r"missing keys \['.*q_proj\.lora_A\.weight'\]; unexpected keys"),
        (_reshape, None, r"q_proj\.lora_B\.weight: expected \[32, 2\], got \[32, 3\]"),
        (_int_tensor, None, r"non-floating tensors"),
        (None, _dora, r"missing keys \[.*q_proj\.lora_magnitude_vector'"),
        (None, _rank, r"mis-shaped tensors \[.*expected \[4, 32\], got \[2, 32\]"),
    ],
)
def test_bad_checkpoints_are_refused_and_the_model_is_unchanged(
    tmp_path, edit_tensors, edit_config, match
):
    path = write_broken(tmp_path, edit_tensors, edit_config)
    for model in (
        tiny_llama(),
        get_lora_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]), "other"),
    ):
        snap = snapshot(model)
        configs = dict(getattr(model, "lora_configs", {}))
        with pytest.raises(ValueError, match=match):
            load_adapter(model, path)
        assert_unchanged(model, snap)
        assert getattr(model, "lora_configs", {}) == configs


def test_load_into_an_existing_adapter_replaces_its_weights_and_save_refuses_an_unknown_one(
    tmp_path,
):
    trained = get_lora_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    randomise(trained)
    save_adapter(trained, tmp_path)
    # PEFT's flow: build with the config, then load the trained weights into that adapter.
    model = get_lora_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    layer = model.model.layers[0].self_attn.q_proj
    a_before = layer.lora_A["default"].weight
    load_adapter(model, tmp_path)
    assert layer.lora_A["default"].weight is a_before  # in place
    ids = token_ids()
    torch.testing.assert_close(logits(model, ids), logits(trained, ids), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"has no adapter 'nope' \(it has \['default'\]\)"):
        save_adapter(model, tmp_path / "x", "nope")
    assert len(list(lora_layers(model))) == 2
