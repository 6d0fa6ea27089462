"""FusedLoraLinear: nn.Linear compatibility, adapters, init, dropout, merge, and parity with PEFT's
own lora.Linear on the same weights."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import lora_kernels as lk
from lora_kernels import reference as R
from tests.optional import optional
from tests.tolerances import assert_close_to_ref

peft = optional("peft")


def peft_twin(layer: lk.FusedLoraLinear, name: str = "default") -> peft.tuners.lora.Linear:
    """PEFT's lora.Linear with a copy of ``layer``'s base and adapter weights."""
    base = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    base = base.to(layer.weight.dtype)
    base.load_state_dict(
        {"weight": layer.weight.detach().clone()}
        | ({"bias": layer.bias.detach().clone()} if layer.bias is not None else {})
    )
    cfg = peft.LoraConfig(
        r=layer.r[name],
        lora_alpha=layer.lora_alpha[name],
        use_rslora=layer.use_rslora[name],
        lora_dropout=layer.lora_dropout[name].p if hasattr(layer.lora_dropout[name], "p") else 0.0,
    )
    twin = peft.tuners.lora.Linear(
        base, name, config=cfg, r=layer.r[name], lora_alpha=layer.lora_alpha[name]
    )
    twin = twin.to(layer.weight.dtype)
    with torch.no_grad():
        twin.lora_A[name].weight.copy_(layer.lora_A[name].weight)
        twin.lora_B[name].weight.copy_(layer.lora_B[name].weight)
    return twin


def randomise_adapter(layer, name="default"):
    with torch.no_grad():
        layer.lora_A[name].weight.normal_(0, 0.3)
        layer.lora_B[name].weight.normal_(0, 0.3)


def test_is_an_nn_linear_with_unchanged_base_keys():
    layer = lk.FusedLoraLinear(20, 12, r=4)
    assert isinstance(layer, nn.Linear)
    keys = set(layer.state_dict())
    assert {"weight", "bias"} <= keys
    assert {"lora_A.default.weight", "lora_B.default.weight"} <= keys
    assert layer.lora_A["default"].weight.shape == (4, 20)
    assert layer.lora_B["default"].weight.shape == (12, 4)
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.lora_A["default"].weight.requires_grad


def test_from_linear_shares_the_weight():
    lin = nn.Linear(16, 8)
    layer = lk.FusedLoraLinear.from_linear(lin, r=2, lora_alpha=4)
    assert layer.weight is lin.weight and layer.bias is lin.bias
    assert layer.weight.data_ptr() == lin.weight.data_ptr()
    x = torch.randn(3, 16)
    torch.testing.assert_close(layer(x), lin(x))  # B starts at zero
    assert layer.scaling["default"] == 2.0
    with pytest.raises(TypeError, match="expected linear to be an nn.Linear, got Conv1d"):
        lk.FusedLoraLinear.from_linear(nn.Conv1d(2, 2, 1))


def test_init_true_kaiming_uniform_and_zero_b():
    layer = lk.FusedLoraLinear(400, 30, r=64)
    a = layer.lora_A["default"].weight
    bound = 1 / math.sqrt(400)  # kaiming-uniform with a=sqrt(5) on fan_in = 400
    assert a.abs().max() <= bound and a.abs().max() > 0.95 * bound
    assert torch.equal(layer.lora_B["default"].weight, torch.zeros(30, 64))


def test_init_gaussian_and_false():
    layer = lk.FusedLoraLinear(300, 40, r=16, init_lora_weights="gaussian")
    std = layer.lora_A["default"].weight.std().item()
    assert abs(std - 1 / 16) < 0.1 / 16
    assert torch.equal(layer.lora_B["default"].weight, torch.zeros(40, 16))
    layer = lk.FusedLoraLinear(30, 40, r=4, init_lora_weights=False)
    assert layer.lora_B["default"].weight.abs().sum() > 0
    with pytest.raises(ValueError, match="init_lora_weights"):
        lk.FusedLoraLinear(3, 4, r=2, init_lora_weights="pissa")


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_peft_forward_and_grads(rslora, bias, dtype):
    layer = lk.FusedLoraLinear(
        33, 17, bias=bias, r=8, lora_alpha=16, use_rslora=rslora, dtype=dtype
    )
    randomise_adapter(layer)
    twin = peft_twin(layer)
    assert twin.scaling["default"] == layer.scaling["default"]
    assert layer.scaling["default"] == (16 / math.sqrt(8) if rslora else 2.0)
    x = torch.randn(2, 7, 33, dtype=dtype)
    y, y_peft = layer(x), twin(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_peft.backward(dy)
    # Both against fp64: our error may be at most ~2x PEFT's own in the same dtype.
    f64 = lambda t: None if t is None else t.detach().double()
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    args = (f64(layer.weight), f64(a), f64(b), layer.scaling["default"])
    y64 = R.lora_linear(f64(x), args[0], f64(layer.bias), *args[1:])
    _, da64, db64 = R.lora_linear_backward(f64(dy), f64(x), *args)
    assert_close_to_ref("y", y, y64, y_peft)
    assert_close_to_ref("dA", a.grad, da64, twin.lora_A["default"].weight.grad)
    assert_close_to_ref("dB", b.grad, db64, twin.lora_B["default"].weight.grad)


def test_merged_weight_matches_peft_and_forward_agrees():
    layer = lk.FusedLoraLinear(48, 20, r=4, lora_alpha=8)
    randomise_adapter(layer)
    twin = peft_twin(layer)
    x = torch.randn(5, 48)
    y_unmerged = layer(x)
    w0 = layer.weight.detach().clone()
    layer.merge()
    twin.merge()
    assert layer.merged and layer.merged_adapters == ["default"]
    torch.testing.assert_close(layer.weight, twin.base_layer.weight, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(layer(x), y_unmerged, atol=1e-5, rtol=1e-5)
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.weight, w0, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(layer(x), y_unmerged, atol=1e-5, rtol=1e-5)


def test_dropout_uses_one_mask_for_forward_and_backward():
    k, n, rows, p = 512, 3, 64, 0.25
    layer = lk.FusedLoraLinear(k, n, bias=False, r=1, lora_alpha=1, lora_dropout=p)
    with torch.no_grad():
        layer.weight.zero_()
        layer.lora_A["default"].weight.fill_(1.0)
        layer.lora_B["default"].weight.fill_(1.0)
    x = torch.ones(rows, k)
    layer.train()
    y = layer(x)  # every output = kept_count / (1 - p) of that row
    kept = y[:, 0] * (1 - p)
    assert torch.allclose(kept, kept.round(), atol=1e-3)
    assert abs(kept.mean().item() / k - (1 - p)) < 0.02  # dropout statistics
    assert torch.equal(y[:, 0], y[:, 1])  # one mask per row, shared by every output
    y.sum().backward()
    # dA[0, j] = sum over rows and outputs of x_dropped[row, j]: the same mask, summed.
    grad_a = layer.lora_A["default"].weight.grad
    torch.testing.assert_close(grad_a.sum() * (1 - p) / n, kept.sum(), rtol=1e-4, atol=1e-2)
    layer.eval()
    torch.testing.assert_close(layer(x), torch.full((rows, n), float(k)))


def test_dropout_matches_peft_with_the_same_rng():
    layer = lk.FusedLoraLinear(40, 12, r=4, lora_alpha=8, lora_dropout=0.3)
    randomise_adapter(layer)
    twin = peft_twin(layer)
    layer.train()
    twin.train()
    x = torch.randn(6, 40)
    torch.manual_seed(7)
    y = layer(x)
    torch.manual_seed(7)
    y_peft = twin(x)
    torch.testing.assert_close(y, y_peft, atol=1e-5, rtol=1e-5)


def test_several_adapters():
    layer = lk.FusedLoraLinear(24, 10, r=4, lora_alpha=4)
    layer.add_adapter("other", r=2, lora_alpha=8)
    assert layer.adapter_names == ["default", "other"]
    assert layer.active_adapter == "default"
    randomise_adapter(layer)
    randomise_adapter(layer, "other")
    x = torch.randn(3, 24)
    base = nn.functional.linear(x, layer.weight, layer.bias)
    y_default = layer(x)
    layer.set_adapter("other")
    y_other = layer(x)
    expected = base + 4.0 * (x @ layer.lora_A["other"].weight.T) @ layer.lora_B["other"].weight.T
    torch.testing.assert_close(y_other, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(y_default, y_other)
    layer.set_adapter(None)
    torch.testing.assert_close(layer(x), base)
    layer.set_adapter("other")
    layer.delete_adapter("other")
    assert layer.adapter_names == ["default"] and layer.active_adapter == "default"
    assert "other" not in layer.scaling and "lora_A.other.weight" not in layer.state_dict()


def test_adapter_errors_leave_the_layer_unchanged():
    layer = lk.FusedLoraLinear(8, 4, r=2)
    randomise_adapter(layer)
    before = copy.deepcopy(layer.state_dict())
    with pytest.raises(ValueError, match=r"unknown adapter 'nope'; this layer has \['default'\]"):
        layer.set_adapter("nope")
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        layer.delete_adapter("nope")
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        layer.merge("nope")
    with pytest.raises(ValueError, match="already exists"):
        layer.add_adapter("default", 2, 2)
    with pytest.raises(ValueError, match="expected r to be a positive int, got 0"):
        layer.add_adapter("z", 0, 2)
    with pytest.raises(ValueError, match="__base__"):
        layer.add_adapter("__base__", 2, 2)
    with pytest.raises(ValueError, match="lora_dropout"):
        layer.add_adapter("z", 2, 2, lora_dropout=1.5)
    layer.add_adapter("second", 2, 2)
    layer.merge()
    with pytest.raises(RuntimeError, match="unmerge"):
        layer.set_adapter("second")
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    with pytest.raises(RuntimeError, match="merged into the weight"):
        layer.delete_adapter("default")
    layer.unmerge()
    layer.delete_adapter("second")
    after = layer.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        torch.testing.assert_close(before[key], after[key], atol=1e-6, rtol=1e-6)
    assert layer.active_adapter == "default"


class _MLP(nn.Module):
    def __init__(self, make_linear):
        super().__init__()
        self.fc1 = make_linear(nn.Linear(16, 32))
        self.fc2 = make_linear(nn.Linear(32, 4))

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_training_loss_falls_exactly_as_with_peft():
    torch.manual_seed(3)
    plain = _MLP(lambda lin: lin)
    ours = copy.deepcopy(plain)
    ours.fc1 = lk.FusedLoraLinear.from_linear(ours.fc1, r=4, lora_alpha=8)
    ours.fc2 = lk.FusedLoraLinear.from_linear(ours.fc2, r=4, lora_alpha=8)
    theirs = copy.deepcopy(plain)
    cfg = peft.LoraConfig(r=4, lora_alpha=8)
    theirs.fc1 = peft.tuners.lora.Linear(theirs.fc1, "default", config=cfg, r=4, lora_alpha=8)
    theirs.fc2 = peft.tuners.lora.Linear(theirs.fc2, "default", config=cfg, r=4, lora_alpha=8)
    for name in ("fc1", "fc2"):
        with torch.no_grad():
            getattr(theirs, name).lora_A["default"].weight.copy_(
                getattr(ours, name).lora_A["default"].weight
            )
        getattr(theirs, name).base_layer.weight.requires_grad_(False)
        getattr(theirs, name).base_layer.bias.requires_grad_(False)
    x = torch.randn(64, 16)
    target = (x[:, :4] * 2).sin()
    losses = {}
    for label, model in (("ours", ours), ("peft", theirs)):
        params = [p for p in model.parameters() if p.requires_grad]
        assert len(params) == 4
        opt = torch.optim.Adam(params, lr=2e-2)
        run = []
        for _ in range(40):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), target)
            loss.backward()
            opt.step()
            run.append(loss.item())
        losses[label] = run
    assert losses["ours"][-1] < 0.5 * losses["ours"][0]
    for a, b in zip(losses["ours"], losses["peft"], strict=True):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(b))
