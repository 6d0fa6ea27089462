"""``fuse_report``: per PEFT layer, whether its next call runs on lora_kernels (which kernel, which
adapter) or on PEFT's code, and why; each verdict checked against what the layer's forward then
dispatches (``lk.last_dispatch`` in a thread of its own)."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

import lora_kernels as lk

peft = pytest.importorskip("peft")
from lora_kernels.integrations.peft import fuse, fuse_report, unfuse  # noqa: E402
from tests.test_peft_compat import CONFIGS, _peft_net  # noqa: E402

KERNEL_FAMILY = {"lora_linear": "lora_linear", "dora_linear": "dora", "lora_embedding":
                 "lora_embedding", "qlora_linear": "qlora"}  # fmt: skip


class Net(nn.Module):
    """One layer per verdict: plain LoRA, DoRA, an Embedding, lora_bias, a Conv2d, another tuner."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.lin = nn.Linear(8, 8)
        self.dora = nn.Linear(8, 8)
        self.biased = nn.Linear(8, 8)
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.other = nn.Linear(8, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        h = self.lin(h) + self.dora(h) + self.biased(h)
        h = h + self.conv(h[:, None]).mean(1)
        return self.other(h)


def _mixed_model():
    """A PEFT mixed model: LoRA (emb, lin, conv), DoRA (dora), lora_bias (biased), LoHa (other),
    all four adapters active."""
    torch.manual_seed(0)
    model = peft.get_peft_model(
        Net(), peft.LoraConfig(target_modules=["emb", "lin", "conv"]), mixed=True
    )
    model.add_adapter("dora", peft.LoraConfig(target_modules=["dora"], use_dora=True))
    model.add_adapter("biased", peft.LoraConfig(target_modules=["biased"], lora_bias=True))
    model.add_adapter("loha", peft.LoHaConfig(target_modules=["other"]))
    model.set_adapter(["default", "dora", "biased", "loha"])
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
    return model


def _dispatched(layer: nn.Module, x: torch.Tensor):
    """What ``layer(x)`` dispatched to the kernels, from a thread that has dispatched nothing
    before (None: no kernel ran)."""
    seen = []

    def run():
        layer(x)
        seen.append(lk.last_dispatch())

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert len(seen) == 1, "the layer's forward raised"
    return seen[0]


def _input_for(layer: nn.Module) -> torch.Tensor:
    base = layer.get_base_layer()
    if isinstance(base, nn.Embedding):
        return torch.randint(0, base.num_embeddings, (2, 5))
    if isinstance(base, nn.Conv2d):
        return torch.randn(2, base.in_channels, 5, 8)
    if isinstance(base, nn.Conv1d):
        return torch.randn(2, base.in_channels, 6)
    return torch.randn(2, 5, base.in_features, dtype=getattr(base, "compute_dtype", None))


def _assert_verdicts_hold(model, report) -> None:
    for name, entry in report["layers"].items():
        layer = model.get_submodule(name)
        if entry["runs_on"] == "per call":
            continue
        got = _dispatched(layer, _input_for(layer))
        if entry["runs_on"] == "peft":
            assert got is None, (name, entry, got)
        else:
            kernel = entry["why"].split(",")[0]
            assert got is not None and got.family == KERNEL_FAMILY[kernel], (name, entry, got)
            assert got.launcher.endswith("_fwd"), got


def test_says_per_layer_what_runs_where_and_why():
    model = fuse(_mixed_model())
    report = fuse_report(model)
    prefix = "base_model.model."
    layers = {n.removeprefix(prefix): (e["runs_on"], e["why"]) for n, e in report["layers"].items()}
    assert layers == {
        "emb": ("lora_kernels", "lora_embedding, adapter 'default'"),
        "lin": ("lora_kernels", "lora_linear, adapter 'default'"),
        "dora": ("lora_kernels", "dora_linear, adapter 'dora'"),
        "biased": ("peft", "adapter 'biased' has lora_bias"),
        "conv": ("peft", "no fused kernel for PEFT's lora.Conv2d"),
        "other": ("peft", "loha layer (not LoRA): PEFT's code"),
    }
    classes = {n.removeprefix(prefix): e["peft_class"] for n, e in report["layers"].items()}
    assert classes["lin"] == "peft.tuners.lora.layer.Linear"  # PEFT's class, not our subclass
    assert classes["other"] == "peft.tuners.loha.layer.Linear"
    # the class-level summary, as before
    assert sorted(report["fused"]) == [prefix + n for n in ("biased", "dora", "emb", "lin")]
    assert report["left"] == {
        prefix + "conv": "peft.tuners.lora.layer.Conv2d",
        prefix + "other": "peft.tuners.loha.layer.Linear",
    }
    _assert_verdicts_hold(model, report)


def test_verdicts_follow_the_layers_state():
    model = fuse(_mixed_model())
    lin = model.base_model.model.lin
    model.base_model.model.dora.merge()
    model.base_model.model.emb.merge()
    lin.lora_A["default"].to(torch.float64)  # factors of a dtype the kernels do not take
    lin.lora_B["default"].to(torch.float64)
    report = fuse_report(model)
    why = {n.rsplit(".", 1)[1]: e["why"] for n, e in report["layers"].items()}
    assert why["dora"] == "merged: the base layer holds the adapters"
    assert why["emb"] == "merged: the base table holds the adapters"
    assert why["lin"] == (
        "adapter 'default' has factors of dtype torch.float64 / torch.float64 (the kernels take "
        "torch.float32, both the same)"
    )
    assert all(e["runs_on"] == "peft" for n, e in report["layers"].items())
    _assert_verdicts_hold(model, report)

    lin.lora_A["default"].to(torch.float32)
    lin.lora_B["default"].to(torch.float32)
    model.base_model.model.dora.unmerge()
    model.base_model.model.emb.unmerge()
    model.add_adapter("second", peft.LoraConfig(target_modules=["lin"]))
    lin.set_adapter(["default", "second"])
    report = fuse_report(model)
    entry = report["layers"]["base_model.model.lin"]
    assert entry == {
        "peft_class": "peft.tuners.lora.layer.Linear",
        "runs_on": "peft",
        "why": "2 active adapters ['default', 'second'] (the kernels run one)",
    }
    assert report["layers"]["base_model.model.dora"]["runs_on"] == "lora_kernels"  # unmerged
    _assert_verdicts_hold(model, report)


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_every_tuner_layer_of_peft_s_test_models_gets_a_verdict_that_holds(config):
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = fuse(_peft_net(config))
    report = fuse_report(model)
    tuner_layers = [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    assert sorted(report["layers"]) == sorted(tuner_layers)
    assert all(e["why"] for e in report["layers"].values())
    _assert_verdicts_hold(model, report)


def test_before_fuse_and_after_unfuse_everything_is_peft_s():
    model = _mixed_model()
    for report in (fuse_report(model), fuse_report(unfuse(fuse(model)))):
        assert report["fused"] == []
        assert {e["runs_on"] for e in report["layers"].values()} == {"peft"}
        assert report["layers"]["base_model.model.lin"]["why"] == (
            "not fused (yet): fuse() swaps its class"
        )
        _assert_verdicts_hold(model, report)
    assert fuse_report(nn.Linear(2, 2)) == {"fused": [], "left": {}, "layers": {}}


def test_4bit_layers_are_reported():
    bnb = pytest.importorskip("bitsandbytes")

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj = bnb.nn.Linear4bit(16, 24, compute_dtype=torch.float32)
            self.v_proj = bnb.nn.Linear4bit(24, 16, compute_dtype=torch.float32)

        def forward(self, x):
            return self.v_proj(self.q_proj(x))

    torch.manual_seed(0)
    block = Block()
    for m in (block.q_proj, block.v_proj):
        m.load_state_dict(nn.Linear(m.in_features, m.out_features).state_dict())
    block = block.to("cpu")  # bitsandbytes quantizes on the move
    block.is_loaded_in_4bit = True  # what transformers records: PEFT makes lora.bnb layers
    model = peft.get_peft_model(block, peft.LoraConfig(target_modules=["q_proj"]))
    model.add_adapter("dora", peft.LoraConfig(target_modules=["v_proj"], use_dora=True))
    model.base_model.set_adapter(["default", "dora"])
    report = fuse_report(fuse(model))
    got = {n.rsplit(".", 1)[1]: (e["peft_class"], e["runs_on"], e["why"])
           for n, e in report["layers"].items()}  # fmt: skip
    assert got == {
        "q_proj": ("peft.tuners.lora.bnb.Linear4bit", "lora_kernels", "qlora_linear, adapter "
                   "'default'"),
        "v_proj": ("peft.tuners.lora.bnb.Linear4bit", "peft", "adapter 'dora' is a "
                   "DoraLinearVariant: a variant the kernels do not compute"),
    }  # fmt: skip
    _assert_verdicts_hold(model, report)


def test_a_fused_class_without_a_verdict_is_reported_as_deciding_per_call(monkeypatch):
    from lora_kernels.integrations import peft as lk_peft

    class FusedLater(lk_peft.FusedPeftLinear):
        """Stands for a fused class added to FUSED_CLASSES without a verdict in _VERDICTS."""

    monkeypatch.setitem(lk_peft._PEFT_CLASS, FusedLater, peft.tuners.lora.layer.Linear)
    model = fuse(_mixed_model())
    model.base_model.model.lin.__class__ = FusedLater
    entry = fuse_report(model)["layers"]["base_model.model.lin"]
    assert entry == {
        "peft_class": "peft.tuners.lora.layer.Linear",
        "runs_on": "per call",
        "why": "fused: its forward decides on each call",
    }


def _moe_peft_model(targets):
    import copy

    from tests.moe_models import tiny_moe_model

    base = tiny_moe_model("qwen3_moe")
    config = peft.LoraConfig(r=2, target_modules=["q_proj"], target_parameters=targets)
    return fuse(peft.get_peft_model(copy.deepcopy(base), config))


def _moe_dispatched(wrapper: nn.Module):
    """What a call of the experts' outermost ParamWrapper, as a MoE block makes it, dispatched."""
    chain = wrapper
    while isinstance(chain, peft.tuners.lora.layer.ParamWrapper):
        chain = chain.base_layer
    num_experts, _, hidden = chain.gate_up_proj.shape
    x = torch.randn(5, hidden)
    ids = torch.randint(0, num_experts, (5, 2))
    weights = torch.rand(5, 2).softmax(-1)
    seen = []

    def run():
        wrapper(x, ids, weights)
        seen.append(lk.last_dispatch())

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert len(seen) == 1, "the wrapper's forward raised"
    return seen[0]


def test_moe_param_wrappers_say_which_kernel_runs_the_nest_and_why_not():
    model = _moe_peft_model(["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    outer_name = "base_model.model.model.layers.0.mlp.experts"
    outer = model.get_submodule(outer_name)
    cls = "peft.tuners.lora.layer.ParamWrapper"

    def check(outer_verdict, inner_verdict):
        layers = fuse_report(model)["layers"]
        assert layers[outer_name] == {"peft_class": cls, "runs_on": outer_verdict[0],
                                      "why": outer_verdict[1]}  # fmt: skip
        assert layers[outer_name + ".base_layer"] == {
            "peft_class": cls, "runs_on": inner_verdict[0], "why": inner_verdict[1]
        }  # fmt: skip
        # the nest's call (what the MoE block makes) runs moe_lora exactly when a level says so
        got = _moe_dispatched(outer)
        if "lora_kernels" in (outer_verdict[0], inner_verdict[0]):
            assert got is not None and got.family == "moe" and got.launcher.endswith("_fwd")
        else:
            assert got is None, (outer_verdict, inner_verdict, got)

    on = "moe_lora (gate_up_proj + down_proj), adapter 'default'"
    in_outer = ("lora_kernels", f"{on}: in the call of the ParamWrapper {outer_name!r}")
    check(("lora_kernels", on), in_outer)

    def around(why):
        return ("peft", f"the ParamWrapper {outer_name!r} runs PEFT's forward ({why}), which "
                "parametrizes the experts' down_proj around this one")  # fmt: skip

    handle = outer.register_forward_hook(lambda *a: None)
    why = "the ParamWrapper of down_proj has forward hooks"
    check(("peft", why), around(why))
    handle.remove()

    experts = outer.base_layer.base_layer
    experts.gate_up_proj.requires_grad_(True)
    why = "the experts' parameters require grad (moe_lora trains the LoRA factors only)"
    check(("peft", why), around(why))
    experts.gate_up_proj.requires_grad_(False)

    # merged, PEFT's forward calls the inner wrapper plainly: it runs its own projection
    outer.merge()
    check(
        ("peft", "merged: the experts' parameters hold the adapters"),
        ("lora_kernels", "moe_lora (gate_up_proj), adapter 'default'"),
    )
    outer.unmerge()
    outer.base_layer.merge()
    why = "merged: the experts' parameters hold the adapters"
    check(("peft", why), around(why))
    outer.base_layer.unmerge()

    with model.disable_adapter():
        check(("peft", "adapters are disabled"), ("peft", "adapters are disabled"))
    check(("lora_kernels", on), in_outer)


def test_a_single_moe_param_wrapper_names_its_projection():
    model = _moe_peft_model(["mlp.experts.down_proj"])
    name = "base_model.model.model.layers.1.mlp.experts"
    entry = fuse_report(model)["layers"][name]
    assert entry["runs_on"] == "lora_kernels"
    assert entry["why"] == "moe_lora (down_proj), adapter 'default'"
    assert _moe_dispatched(model.get_submodule(name)).family == "moe"
