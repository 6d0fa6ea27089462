"""DoRA at init is an exact no-op: B = 0 and magnitude = ||W||_row make ``g = 1`` exactly, and the
output must then be the base layer's, bit for bit, as PEFT's is (PEFT's own
``test_lora_use_dora_linear`` asserts it with ``allclose`` defaults, which a base GEMM rounded
differently fails on outputs near zero). Checked on the torch backend (the CPU path ``auto``
picks), through ``fuse`` and through ``get_lora_model``."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lora_kernels as lk

peft = pytest.importorskip("peft")
from lora_kernels.integrations.peft import fuse  # noqa: E402


class _Net(nn.Module):
    """PEFT's test model's linear part (1000 x 1000 with bias: large enough that the BLAS blocks
    its sum and adds the bias inside the GEMM)."""

    def __init__(self, k=1000, n=1000):
        super().__init__()
        self.linear = nn.Linear(k, n)

    def forward(self, x):
        return self.linear(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_peft_dora_at_init_is_the_base_output(dtype):
    """(In 16 bits PEFT's own magnitude is rounded to the weight's dtype, so g = 1 holds for
    neither PEFT nor the kernels: there the fused layer matches PEFT within tolerance, as the
    DoRA tests check.)"""
    model = _Net().to(dtype).eval()
    data = torch.rand(10, 1000).to(dtype)
    with torch.no_grad():
        base = model(data)
        cfg = peft.LoraConfig(target_modules=["linear"], use_dora=True)
        pm = peft.get_peft_model(copy.deepcopy(model), cfg)
        assert torch.equal(pm(data), base)  # PEFT's own: exact
        fuse(pm, backend="torch")
        layer = pm.base_model.model.linear
        assert type(layer).__name__ == "FusedPeftLinear"
        assert torch.equal(pm(data), base)
        with pm.disable_adapter():
            assert torch.equal(pm(data), base)


@pytest.mark.parametrize("bias", [True, False])
def test_lora_model_dora_at_init_is_the_base_output(bias):
    model = nn.Sequential(nn.Linear(1000, 133, bias=bias), nn.Linear(133, 7, bias=bias)).eval()
    data = torch.rand(10, 1000)
    with torch.no_grad():
        base = model(data)
        cfg = lk.LoraConfig(r=4, target_modules=["0", "1"], use_dora=True)
        lm = lk.get_lora_model(copy.deepcopy(model), cfg)
        assert torch.equal(lm(data), base)


def test_dora_still_changes_the_output_once_b_is_not_zero():
    """The same arrangement with a trained B: the DoRA output, not the base one."""
    model = _Net(70, 33).eval()
    data = torch.rand(5, 70)
    cfg = peft.LoraConfig(target_modules=["linear"], use_dora=True)
    pm = peft.get_peft_model(copy.deepcopy(model), cfg)
    with torch.no_grad():
        pm.base_model.model.linear.lora_B["default"].weight.normal_()
        ref = pm(data)
        fuse(pm, backend="torch")
        out = pm(data)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, model(data))
