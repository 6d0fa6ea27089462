"""lora_kernels.integrations.peft: a PeftModel's LoRA Linear layers on our kernels, outputs and
gradients equal to PEFT's own, and PEFT's API (set_adapter, adapter_names, merge, save) intact."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tests.helpers import (
    assert_same_model_output,
    logits,
    peft_model_of,
    randomise,
    tiny_llama,
    token_ids,
)

peft = pytest.importorskip("peft")
from peft.tuners.lora.layer import Linear as PeftLoraLinear  # noqa: E402

from lora_kernels.integrations import peft as integration  # noqa: E402
from lora_kernels.integrations import peft_mixed  # noqa: E402
from lora_kernels.integrations.peft import FusedPeftLinear, fuse, unfuse  # noqa: E402

TARGETS = ["q_proj", "v_proj", "up_proj"]


@pytest.fixture
def kernel_calls(monkeypatch):
    """Records the fused-kernel calls ("single" or "multi"), so a test can tell the fast path
    from PEFT's fallback."""
    calls = []

    def counting(kind, real):
        def call(*args, **kwargs):
            calls.append(kind)
            return real(*args, **kwargs)

        return call

    monkeypatch.setattr(integration, "lora_linear", counting("single", integration.lora_linear))
    monkeypatch.setattr(
        peft_mixed, "lora_linear_multi", counting("multi", peft_mixed.lora_linear_multi)
    )
    return calls


def two_adapter_peft_model():
    base = tiny_llama()
    model = peft_model_of(base, r=4, lora_alpha=8, target_modules=TARGETS)
    second = peft.LoraConfig(r=2, lora_alpha=5, target_modules=["q_proj", "o_proj"])
    model.add_adapter("two", second)
    randomise(model)
    return model.eval()


def test_fuse_swaps_classes_in_place_and_unfuse_restores():
    model = two_adapter_peft_model()
    keys = list(model.state_dict())
    assert fuse(model) is model
    layers = [m for m in model.modules() if isinstance(m, PeftLoraLinear)]
    assert len(layers) == 8 and all(type(m) is FusedPeftLinear for m in layers)
    assert list(model.state_dict()) == keys
    assert unfuse(model) is model
    assert all(type(m) is PeftLoraLinear for m in layers)
    plain = tiny_llama()
    assert fuse(plain) is plain  # total: nothing to fuse is no error (tests/test_peft_compat.py)
    with pytest.raises(TypeError, match="expected a PEFT model"):
        fuse("model")


def test_outputs_and_gradients_equal_peft_s(kernel_calls):
    reference = two_adapter_peft_model()
    fused = fuse(copy.deepcopy(reference))
    ids = token_ids()
    assert_same_model_output("active default", fused, reference, ids)
    assert len(kernel_calls) == 6  # 3 targets x 2 layers, none fell back
    for model in (fused, reference):
        model.train()
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
    ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    got = {n: p.grad for n, p in fused.named_parameters() if p.requires_grad}
    assert set(got) == set(ref_grads) and len(got) == 12
    for name, g in got.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_dropout_in_training_draws_the_same_mask_as_peft(kernel_calls):
    base = tiny_llama()
    reference = peft_model_of(base, r=4, lora_dropout=0.3, target_modules=TARGETS)
    randomise(reference)
    fused = fuse(copy.deepcopy(reference)).train()
    reference.train()
    ids = token_ids()
    torch.manual_seed(7)
    y_ref = reference(ids).logits
    torch.manual_seed(7)
    y = fused(ids).logits
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.manual_seed(8)
    assert not torch.allclose(fused(ids).logits, y_ref, atol=1e-3)  # the mask is really applied
    assert len(kernel_calls) == 12


def test_set_adapter_disable_and_merge_follow_peft(kernel_calls):
    reference = two_adapter_peft_model()
    fused = fuse(copy.deepcopy(reference))
    ids = token_ids()
    for model in (reference, fused):
        model.set_adapter("two")
    assert_same_model_output("set_adapter two", fused, reference, ids)
    assert len(kernel_calls) == 4  # q_proj, o_proj x 2 layers; v_proj/up_proj lack "two"
    with fused.disable_adapter():
        torch.testing.assert_close(logits(fused, ids), logits(fused.get_base_model(), ids))
    calls = len(kernel_calls)
    fused.merge_adapter()
    merged = logits(fused, ids)
    assert len(kernel_calls) == calls  # merged layers run the base GEMM on PEFT's path
    torch.testing.assert_close(merged, logits(reference, ids), rtol=1e-5, atol=1e-5)
    fused.unmerge_adapter()
    assert_same_model_output("after unmerge", fused, reference, ids)
    unloaded = fused.merge_and_unload()
    assert not any(isinstance(m, PeftLoraLinear) for m in unloaded.modules())
    torch.testing.assert_close(logits(unloaded, ids), merged, rtol=1e-5, atol=1e-5)


def test_mixed_adapter_names_batch_equals_peft(kernel_calls):
    reference = two_adapter_peft_model()
    fused = fuse(copy.deepcopy(reference))
    ids = token_ids(shape=(3, 5))
    names = ["two", "__base__", "default"]
    with torch.no_grad():
        y_ref = reference(ids, adapter_names=names).logits
        y = fused(ids, adapter_names=names).logits
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    # q_proj (default, two), v_proj, up_proj (default), o_proj (two), in 2 layers: one call each
    assert kernel_calls == ["multi"] * 8
    with torch.no_grad():
        fused.set_adapter("two")
        single = fused(ids).logits
    torch.testing.assert_close(y[0], single[0], rtol=1e-5, atol=1e-5)
    assert kernel_calls[8:] == ["single"] * 4
    fused.merge_adapter()
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when there are merged"):
        fused(ids, adapter_names=names)


def test_save_pretrained_is_unchanged(tmp_path):
    reference = two_adapter_peft_model()
    fused = fuse(copy.deepcopy(reference))
    reference.save_pretrained(tmp_path / "ref")
    fused.save_pretrained(tmp_path / "fused")
    a = (tmp_path / "ref" / "adapter_model.safetensors").read_bytes()
    b = (tmp_path / "fused" / "adapter_model.safetensors").read_bytes()
    assert a == b
    loaded = fuse(peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "fused"))
    ids = token_ids()
    assert_same_model_output("reloaded", loaded, reference, ids)


def test_half_precision_base_with_fp32_adapters(kernel_calls):
    base = tiny_llama().to(torch.bfloat16)
    reference = peft_model_of(base, r=4, target_modules=TARGETS)
    randomise(reference)
    lora_a = reference.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"]
    assert lora_a.weight.dtype == torch.float32  # PEFT's autocast_adapter_dtype
    fused = fuse(copy.deepcopy(reference))
    ids = token_ids()
    ref64 = logits(copy.deepcopy(reference).double(), ids).double()
    y_ref = logits(reference, ids)
    y = logits(fused, ids)
    assert len(kernel_calls) == 6
    # bf16 through a whole model: both round per layer; ours must stay as close to fp64.
    err = (y.double() - ref64).abs().max()
    assert err <= 2 * (y_ref.double() - ref64).abs().max() + 1.6e-2 * ref64.abs().max()


def test_layers_with_hooks_or_other_bases_fall_back(kernel_calls):
    reference = peft_model_of(tiny_llama(), r=2, target_modules=["q_proj"])
    randomise(reference)
    fused = fuse(copy.deepcopy(reference))
    q0 = fused.base_model.model.model.layers[0].self_attn.q_proj
    seen = []
    q0.base_layer.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    ids = token_ids()
    torch.testing.assert_close(logits(fused, ids), logits(reference, ids), rtol=1e-5, atol=1e-5)
    assert seen and len(kernel_calls) == 1  # layer 0 ran PEFT's code so its hook fired
    assert isinstance(q0.base_layer, nn.Linear)


def test_hotswap_and_compiled_hotswap_preparation(tmp_path, kernel_calls):
    from peft.utils.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap

    base = tiny_llama()
    for i, r in enumerate((2, 4)):
        saved = peft_model_of(base, r=r, lora_alpha=2 * r + i, target_modules=TARGETS)
        randomise(saved)
        saved.save_pretrained(tmp_path / f"a{i}")
    model = fuse(peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a0"))
    # pads every adapter to rank 4 and turns the scalings into tensors, as before torch.compile
    prepare_model_for_compiled_hotswap(model, target_rank=4)
    hotswap_adapter(model, str(tmp_path / "a1"), adapter_name="default")
    expected = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a1")
    ids = token_ids()
    assert_same_model_output("hotswapped", model, expected, ids)
    assert kernel_calls == ["single"] * 6
