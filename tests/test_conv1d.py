"""transformers ``Conv1D`` (GPT-2, PEFT's ``fan_in_fan_out=True``) on the kernels: the [in, out]
weight read through strides (no copy), forward and backward against PEFT's ``lora.Linear`` on the
same weights, merge/unmerge, GPT-2 from a config in ``get_lora_model`` and ``fuse`` (outputs,
gradients, two training steps equal to PEFT's), checkpoints both ways, and ``lm_head`` with tied
embeddings as PEFT handles it."""

from __future__ import annotations

import copy

import pytest
import torch

import lora_kernels as lk
from lora_kernels import reference as ref
from lora_kernels.backends.triton import HAS_TRITON, interpreting
from lora_kernels.layers.linear import FusedLoraLinear
from tests.test_model import logits
from tests.tolerances import assert_close_to_ref

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft.tuners.lora.layer import Linear as PeftLoraLinear  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

from lora_kernels.integrations import peft as integration  # noqa: E402
from lora_kernels.integrations.peft import FusedPeftLinear, fuse  # noqa: E402

# CPU tensors: Triton runs them under its interpreter only (a GPU run tests the torch path here)
BACKENDS = ["torch"] + (["triton"] if HAS_TRITON and interpreting() else [])
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]


def tiny_gpt2(seed: int = 0):
    """GPT2LMHeadModel from a config (no download): hidden 16, 2 layers, lm_head tied to wte."""
    cfg = transformers.GPT2Config(
        n_embd=16, n_layer=2, n_head=2, vocab_size=37, n_positions=32, bos_token_id=0,
        eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(cfg).eval()


def gpt2_ids(shape=(2, 9)):
    return torch.randint(0, 37, shape)


def randomise_lora(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)


def copy_lora(src, dst):
    """Copy the LoRA tensors of a PEFT model into ours (or back), key by key."""
    strip = {
        k.removeprefix("base_model.model.").replace(".default", ""): v
        for k, v in src.state_dict().items()
        if "lora_" in k
    }
    with torch.no_grad():
        for k, v in dst.state_dict(keep_vars=True).items():
            key = k.removeprefix("base_model.model.").replace(".default", "")
            if "lora_" in k:
                v.copy_(strip[key])


# ------------------------------------------------------------------------------------------
# the layer
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_reads_the_conv1d_weight_in_place_and_matches_the_spec(backend, dtype):
    conv = Conv1D(33, 17).to(dtype)  # nf=33 outputs, nx=17 inputs: weight [17, 33]
    with torch.no_grad():
        conv.bias.normal_()
    layer = FusedLoraLinear.from_linear(conv, r=7, lora_alpha=5, init_lora_weights=False)
    layer.backend = backend
    assert layer.fan_in_fan_out and layer.weight is conv.weight
    assert (layer.in_features, layer.out_features) == (17, 33)
    assert list(layer.state_dict()) == ["weight", "bias", *list(layer.state_dict())[2:]]
    x = torch.randn(2, 5, 17, dtype=dtype, requires_grad=True)
    y = layer(x)
    w_nk = conv.weight.detach().T
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    args64 = (w_nk.double(), conv.bias.detach().double(), a.double(), b.double(), 1 / 1.4)
    ref64 = ref.lora_linear(x.detach().double(), *args64)
    with torch.no_grad():
        stock = conv(x) + (x @ a.T @ b.T) * (5 / 7)
    assert_close_to_ref("y", y, ref64, stock)
    dy = torch.randn_like(y)
    y.backward(dy)
    dx64, da64, db64 = ref.lora_linear_backward(
        dy.double(), x.detach().double(), w_nk.double(), a.double(), b.double(), 5 / 7
    )
    x2 = x.detach().clone().requires_grad_()
    a2, b2 = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    (((conv(x2) + (x2 @ a2.T @ b2.T) * (5 / 7)) * dy).sum()).backward()
    assert_close_to_ref("dx", x.grad, dx64, x2.grad)
    assert_close_to_ref("dA", a.grad, da64, a2.grad)
    assert_close_to_ref("dB", b.grad, db64, b2.grad)
    assert conv.weight.grad is None  # frozen, and never copied


def test_layer_matches_peft_forward_gradients_and_merge():
    conv = Conv1D(24, 10)
    theirs = PeftLoraLinear(
        copy.deepcopy(conv), "default", peft.LoraConfig(r=3, lora_alpha=6, fan_in_fan_out=True),
        r=3, lora_alpha=6, is_target_conv_1d_layer=True,
    )  # fmt: skip
    ours = FusedLoraLinear.from_linear(conv, r=3, lora_alpha=6, init_lora_weights=False)
    with torch.no_grad():
        theirs.lora_A["default"].weight.copy_(ours.lora_A["default"].weight)
        theirs.lora_B["default"].weight.copy_(ours.lora_B["default"].weight)
    x = torch.randn(4, 10)
    y_ours, y_theirs = ours(x), theirs(x)
    torch.testing.assert_close(y_ours, y_theirs)
    y_ours.sum().backward()
    y_theirs.sum().backward()
    for part in ("lora_A", "lora_B"):
        torch.testing.assert_close(
            getattr(ours, part)["default"].weight.grad,
            getattr(theirs, part)["default"].weight.grad,
        )
    before = conv.weight.detach().clone()
    ours.merge()
    theirs.merge()
    torch.testing.assert_close(ours.weight, theirs.base_layer.weight)
    torch.testing.assert_close(ours(x), y_theirs.detach())
    ours.unmerge()
    torch.testing.assert_close(ours.weight, before)
    start = ours.weight.detach().clone()
    ours.merge(exact=True)
    ours.unmerge()
    assert torch.equal(ours.weight, start)  # exact: bit for bit
    ours.add_adapter("two", 2, 4, init_lora_weights=False)
    ours.merge()
    ours.swap_merged("two")  # one pass over the [in, out] storage
    expected = ref.merge_lora(
        before.T, ours.lora_A["two"].weight.detach(), ours.lora_B["two"].weight.detach(), 2.0
    ).T
    torch.testing.assert_close(ours.weight, expected)


# ------------------------------------------------------------------------------------------
# GPT-2 from a config
# ------------------------------------------------------------------------------------------


def _pair(targets=GPT2_TARGETS, **kw):
    theirs = peft.get_peft_model(
        tiny_gpt2(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, **kw)
    )
    randomise_lora(theirs)
    ours = lk.get_lora_model(
        tiny_gpt2(), lk.LoraConfig(r=4, lora_alpha=8, target_modules=targets, **kw)
    )
    copy_lora(theirs, ours)
    return ours, theirs.eval()


def _train_two_steps(model, ids):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    model.train()
    for _ in range(2):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("kind", ["get_lora_model", "fuse"])
def test_gpt2_trains_two_steps_like_peft(kind, monkeypatch):
    calls = []
    real = integration.lora_linear
    monkeypatch.setattr(
        integration, "lora_linear", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    ours, theirs = _pair(lora_dropout=0.0)
    if kind == "fuse":
        ours = fuse(copy.deepcopy(theirs))
        layers = [m for m in ours.modules() if isinstance(m, PeftLoraLinear)]
        assert len(layers) == 8 and all(type(m) is FusedPeftLinear for m in layers)
    else:
        assert all(
            m.fan_in_fan_out for m in ours.modules() if isinstance(m, FusedLoraLinear)
        ) and isinstance(ours.transformer.h[0].attn.c_attn, FusedLoraLinear)
    ids = gpt2_ids()
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids))
    torch.manual_seed(1)
    ours_losses = _train_two_steps(ours, ids)
    torch.manual_seed(1)
    theirs_losses = _train_two_steps(theirs, ids)
    assert ours_losses[1] < ours_losses[0]  # it learns
    torch.testing.assert_close(ours_losses, theirs_losses, rtol=1e-5, atol=1e-6)
    theirs_lora = {
        k.removeprefix("base_model.model."): v
        for k, v in theirs.state_dict().items()
        if "lora_" in k
    }
    ours_lora = {
        k.removeprefix("base_model.model."): v for k, v in ours.state_dict().items() if "lora_" in k
    }
    for key, value in theirs_lora.items():
        torch.testing.assert_close(ours_lora[key], value, rtol=1e-4, atol=1e-5, msg=key)
    if kind == "fuse":
        assert len(calls) == 8 * 3  # every Conv1D layer on the kernel, each forward


def test_gpt2_checkpoints_both_ways_and_merge_and_unload(tmp_path):
    ours, theirs = _pair()
    ids = gpt2_ids()
    theirs.save_pretrained(tmp_path / "peft")
    loaded = lk.load_adapter(tiny_gpt2(), tmp_path / "peft")
    torch.testing.assert_close(logits(loaded, ids), logits(theirs, ids))
    lk.save_adapter(ours, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "ours")
    torch.testing.assert_close(logits(back, ids), logits(ours, ids))
    expected = logits(theirs.merge_and_unload(), ids)
    merged = lk.merge_and_unload(ours)
    assert type(merged.transformer.h[0].attn.c_attn) is Conv1D
    torch.testing.assert_close(logits(merged, ids), expected)


def test_gpt2_tied_lm_head_and_wte_as_peft(tmp_path):
    targets = ["c_attn", "wte", "lm_head"]
    ours, theirs = _pair(targets)
    assert ours.lm_head.weight is ours.transformer.wte.weight  # the tie survives
    ids = gpt2_ids()
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids))
    for model in (ours, theirs):
        model.train()
        model(ids, labels=ids).loss.backward()
    got = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    want = {
        n.removeprefix("base_model.model.").replace(".default", ""): p.grad
        for n, p in theirs.named_parameters()
        if p.requires_grad
    }
    assert {n.replace(".default", "") for n in got} == set(want)
    for name, grad in got.items():
        torch.testing.assert_close(grad, want[name.replace(".default", "")], msg=name)
    # PEFT writes the tied tables beside the adapter (lm_head is a target) and loads them back
    theirs.save_pretrained(tmp_path / "peft")
    loaded = lk.load_adapter(tiny_gpt2(), tmp_path / "peft")
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    torch.testing.assert_close(logits(loaded, ids), logits(theirs.eval(), ids))
    # merging folds both adapters into the one shared table, as PEFT's merge does
    torch.testing.assert_close(
        logits(lk.merge_and_unload(loaded), ids), logits(theirs.merge_and_unload(), ids)
    )
