"""DoRA: the factored norm, dora_linear forward and backward against the reference and PEFT's DoRA
layer, the layer (merge, exact unmerge, mixed batches), PEFT checkpoints and fuse(), the ops."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lora_kernels as lk
from lora_kernels import reference as R
from lora_kernels.backends.triton import HAS_TRITON
from tests.optional import optional
from tests.tolerances import assert_close_to_ref

peft = optional("peft")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make(m_shape, k, n, r, dtype, bias=True, lora_dtype=None, device=DEVICE):
    """Random inputs with every part non-zero; the magnitude is near the row norm (as after
    training), so ``g`` is near but not equal to 1."""
    lora_dtype = lora_dtype or dtype
    x = torch.randn(*m_shape, k, dtype=dtype, device=device)
    w = torch.randn(n, k, dtype=dtype, device=device) / k**0.5
    b = torch.randn(n, dtype=dtype, device=device) if bias else None
    a = torch.randn(r, k, dtype=lora_dtype, device=device) / k**0.5
    bb = torch.randn(n, r, dtype=lora_dtype, device=device) / r**0.5
    m = (1.0 + 0.3 * torch.rand(n, device=device)).to(lora_dtype)
    return x, w, b, a, bb, m


def _f64(*ts):
    return [None if t is None else t.detach().double() for t in ts]


def stock_dora(x, w, b, a, bb, m, scale, x_lora=None, round_lora=False):
    """DoRA in stock PyTorch in the inputs' own dtypes, PEFT's way (the dense [N, K] sum): the
    baseline of the tolerance rule. ``round_lora``: fp32 adapters on a 16-bit base are rounded to
    the base's dtype for the LoRA products, as the Triton kernels do (README "Precision"); the norm
    stays in the adapters' precision, as the norm kernel computes it."""
    dense = w + scale * (bb @ a).to(w.dtype)
    norm = torch.linalg.vector_norm(dense, dim=1).detach()
    g = m / norm.to(m.dtype)
    xl = x if x_lora is None else x_lora
    lora_a, lora_b = (a.to(x.dtype), bb.to(x.dtype)) if round_lora else (a, bb)
    lora = (xl.to(lora_a.dtype) @ lora_a.T) @ lora_b.T
    lin = xl @ w.T + scale * lora.to(x.dtype)
    y = (g * lin).to(x.dtype)
    if b is not None:
        y = y + b
    if x_lora is not None:
        y = y + (x - x_lora) @ w.T
    return y


def check_dora(backend, m_shape, k, n, r, dtype, bias=True, lora_dtype=None, dropout=False):
    x, w, b, a, bb, m = make(m_shape, k, n, r, dtype, bias, lora_dtype)
    scale = 0.75
    xl = F.dropout(x, 0.3) if dropout else None
    leaves = [t for t in (x, a, bb, m, xl) if t is not None]
    for t in leaves:
        t.requires_grad_(True)
    y = lk.dora_linear(x, w, b, a, bb, m, scale, x_lora=xl, backend=backend)
    dy = torch.randn_like(y)
    y.backward(dy)

    x64, w64, b64, a64, bb64, m64, xl64, dy64 = _f64(x, w, b, a, bb, m, xl, dy)
    y64 = R.dora_linear(x64, w64, b64, a64, bb64, m64, scale, xl64)
    g64 = R.dora_linear_backward(dy64, x64, w64, a64, bb64, m64, scale, xl64)

    base = [t.detach().clone().requires_grad_(True) for t in leaves]
    xs, as_, bs, ms = base[:4]
    xls = base[4] if dropout else None
    round_lora = backend == "triton" and a.dtype != x.dtype
    y_base = stock_dora(xs, w, b, as_, bs, ms, scale, xls, round_lora)
    y_base.backward(dy)

    assert y.dtype == x.dtype and y.shape == (*m_shape, n)
    assert_close_to_ref("y", y, y64, y_base)
    assert_close_to_ref("dx", x.grad, g64[0], xs.grad)
    if dropout:
        assert_close_to_ref("dx_lora", xl.grad, g64[1], xls.grad)
    assert_close_to_ref("dA", a.grad, g64[2], as_.grad)
    assert_close_to_ref("dB", bb.grad, g64[3], bs.grad)
    assert_close_to_ref("dm", m.grad, g64[4], ms.grad)


# --------------------------------------------------------------------------------------------
# the norm
# --------------------------------------------------------------------------------------------


# (33, 70, 40): a rank whose Gram matrix the kernel reads in several column slices
@pytest.mark.parametrize(
    "shape", [(1, 1, 1), (7, 133, 3), (133, 7, 16), (65, 2049, 8), (33, 70, 40)]
)
def test_factored_norm_is_the_dense_norm(shape):
    n, k, r = shape
    w, a, b = (torch.randn(n, k), torch.randn(r, k), torch.randn(n, r))
    ref = R.dora_weight_norm(*_f64(w, a, b), 0.3)
    torch.testing.assert_close(R.dora_weight_norm_factored(*_f64(w, a, b), 0.3), ref)
    for backend in ["torch"] + (["triton"] if HAS_TRITON and n * k < 20000 else []):
        for w_sq in (None, lk.functional.dora.weight_sq_norm(w)):
            got = lk.dora_weight_norm(w, a, b, 0.3, weight_sq_norm=w_sq, backend=backend)
            assert got.dtype == torch.float32 and got.shape == (n,)
            torch.testing.assert_close(got.double(), ref, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("r", [7, 40, 100, 200, 256])
def test_norm_at_odd_and_large_ranks_is_the_dense_norm(r):
    """Ranks past one rank chunk of the kernel (its Gram term and its dense fallback run in
    [chunk, chunk] blocks): the factored norm, and the dense fallback on rows the adapter
    nearly cancels, against the spec."""
    n, k, scale = 21, 37, 0.4
    w, a, b = torch.randn(n, k), torch.randn(r, k) / r**0.5, torch.randn(n, r)
    cancelled = w.clone()
    cancelled[::4] = -scale * (b[::4] @ a) + 1e-3 * torch.randn(6, k)
    for weight in (w, cancelled):
        ref = R.dora_weight_norm(*_f64(weight, a, b), scale)
        for backend in BACKENDS:
            for w_sq in (None, lk.functional.dora.weight_sq_norm(weight)):
                got = lk.dora_weight_norm(weight, a, b, scale, weight_sq_norm=w_sq,
                                          backend=backend)  # fmt: skip
                torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_norm_of_a_half_weight_is_fp32_accurate(dtype):
    w = (torch.randn(40, 300) / 300**0.5).to(dtype)
    a, b = torch.randn(4, 300) / 17, torch.randn(40, 4)
    ref = R.dora_weight_norm(*_f64(w, a, b), 0.5)
    backends = ["torch"] + (["triton"] if HAS_TRITON else [])
    for backend in backends:
        got = lk.dora_weight_norm(w, a, b, 0.5, backend=backend)
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# dora_linear against the reference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m_shape", [(1,), (7,), (133,), (3, 5)])
@pytest.mark.parametrize(
    "knr,bias", [((1, 17, 1), True), ((17, 1, 4), False), ((129, 65, 16), True),
                 ((2049, 33, 8), False)],
)  # fmt: skip
def test_torch_backend_matches_reference(dtype, m_shape, knr, bias):
    check_dora("torch", m_shape, *knr, dtype, bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m_shape", [(7,), (2, 9)])
def test_torch_backend_dropout_and_fp32_adapters(dtype, m_shape):
    check_dora("torch", m_shape, 65, 33, 8, dtype, dropout=True)
    if dtype != torch.float32:
        check_dora("torch", m_shape, 65, 33, 8, dtype, lora_dtype=torch.float32)
        check_dora("torch", m_shape, 65, 33, 8, dtype, lora_dtype=torch.float32, dropout=True)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize(
    "dtype,m_shape,knr,bias,lora_dtype,dropout",
    [
        (torch.float32, (7,), (17, 33, 8), True, None, False),
        (torch.float32, (3, 5), (40, 17, 4), False, None, True),
        (torch.float16, (9,), (33, 20, 16), True, None, False),
        (torch.bfloat16, (1,), (33, 40, 1), True, None, False),
        (torch.bfloat16, (6,), (24, 17, 4), True, torch.float32, True),
    ],
)
def test_triton_backend_matches_reference(dtype, m_shape, knr, bias, lora_dtype, dropout):
    check_dora("triton", m_shape, *knr, dtype, bias, lora_dtype, dropout)


@pytest.mark.skipif(not HAS_TRITON, reason="needs the Triton interpreter")
@pytest.mark.parametrize("r", [40, 200])
def test_triton_gradients_at_odd_ranks(r):
    check_dora("triton", (5,), 19, 13, r, torch.float32, True, None, False)


def test_only_the_needed_gradients_and_inference():
    x, w, b, a, bb, m = make((5,), 24, 16, 4, torch.float32)
    m.requires_grad_(True)
    y = lk.dora_linear(x, w, b, a, bb, m, 0.5)
    y.sum().backward()
    assert m.grad is not None and a.grad is None and x.grad is None
    with torch.inference_mode():
        y2 = lk.dora_linear(x, w, b, a, bb, m, 0.5)
    torch.testing.assert_close(y2, y.detach())


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------


def test_bad_inputs_name_the_argument():
    x, w, b, a, bb, m = make((4,), 12, 10, 3, torch.float32)
    with pytest.raises(ValueError, match=r"dora_linear: expected magnitude of shape \[10\], got"):
        lk.dora_linear(x, w, b, a, bb, m[:9], 0.5)
    with pytest.raises(TypeError, match="expected magnitude of dtype"):
        lk.dora_linear(x, w, b, a, bb, m.double(), 0.5)
    with pytest.raises(TypeError, match="expected magnitude to be a torch.Tensor"):
        lk.dora_linear(x, w, b, a, bb, [1.0] * 10, 0.5)
    with pytest.raises(ValueError, match=r"expected weight_sq_norm of shape \[10\]"):
        lk.dora_linear(x, w, b, a, bb, m, 0.5, weight_sq_norm=torch.ones(3))
    with pytest.raises(TypeError, match="expected weight_sq_norm of dtype torch.float32"):
        lk.dora_linear(x, w, b, a, bb, m, 0.5, weight_sq_norm=torch.ones(10).half())
    with pytest.raises(ValueError, match=r"expected lora_b of shape \[10, 3\], got \[10, 2\]"):
        lk.dora_linear(x, w, b, a, bb[:, :2], m, 0.5)
    with pytest.raises(ValueError, match="backend must be one of"):
        lk.dora_linear(x, w, b, a, bb, m, 0.5, backend="nope")
    with pytest.raises(ValueError, match=r"merge_dora_: expected magnitude of shape \[10\]"):
        lk.merge_dora_(w, a, bb, m[:4], 0.5)
    w0 = w.clone()
    with pytest.raises(ValueError, match=r"unmerge_dora_: expected weight_norm of shape \[10\]"):
        lk.unmerge_dora_(w, a, bb, m, 0.5, torch.ones(4))
    assert torch.equal(w, w0)
    with pytest.raises(TypeError, match="expected use_dora to be a bool, got 'yes'"):
        lk.FusedLoraLinear(8, 8, r=2).add_adapter("x", 2, 2, use_dora="yes")


# --------------------------------------------------------------------------------------------
# the layer against PEFT's DoRA layer
# --------------------------------------------------------------------------------------------


def peft_and_ours(k=48, n=40, r=4, dropout=0.0, dtype=torch.float32, bias=True, seed=0):
    """PEFT's DoRA Linear and a FusedLoraLinear(use_dora=True) holding the same weights."""
    torch.manual_seed(seed)
    base = nn.Linear(k, n, bias=bias).to(dtype)
    cfg = peft.LoraConfig(
        r=r,
        lora_alpha=2 * r,
        target_modules=["0"],
        use_dora=True,
        lora_dropout=dropout,
        init_lora_weights=False,
    )
    pm = peft.get_peft_model(nn.Sequential(copy.deepcopy(base)), cfg)
    theirs = pm.base_model.model[0]
    with torch.no_grad():
        theirs.lora_magnitude_vector["default"].weight.mul_(1 + 0.1 * torch.randn(n).to(dtype))
    ours = lk.FusedLoraLinear.from_linear(
        copy.deepcopy(base), r=r, lora_alpha=2 * r, lora_dropout=dropout, use_dora=True
    )
    ours.load_state_dict(
        {k.replace("base_layer.", ""): v for k, v in theirs.state_dict().items()}, strict=True
    )
    return theirs, ours


def test_state_dict_keys_are_peft_s():
    theirs, ours = peft_and_ours()
    assert sorted(k.replace("base_layer.", "") for k in theirs.state_dict()) == sorted(
        ours.state_dict()
    )
    assert "lora_magnitude_vector.default.weight" in ours.state_dict()


@pytest.mark.parametrize("dropout", [0.0, 0.25])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_gradients_equal_peft_s(dropout, bias):
    theirs, ours = peft_and_ours(dropout=dropout, bias=bias)
    theirs.train(), ours.train()
    x = torch.randn(3, 7, 48)
    outs, grads = [], []
    for layer in (theirs, ours):
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(5)  # the same dropout mask for both
        y = layer(xi)
        y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
        outs.append(y)
        grads.append(
            [
                xi.grad,
                layer.lora_A["default"].weight.grad,
                layer.lora_B["default"].weight.grad,
                layer.lora_magnitude_vector["default"].weight.grad,
            ]
        )
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    for name, got, want in zip(["dx", "dA", "dB", "dm"], grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_unmerge_and_exact_mode(dtype):
    theirs, ours = peft_and_ours(dtype=dtype)
    theirs.eval(), ours.eval()
    x = torch.randn(5, 48, dtype=dtype)
    w0 = ours.weight.detach().clone()
    a, b = ours.lora_A["default"].weight, ours.lora_B["default"].weight
    m = ours.lora_magnitude_vector["default"].weight
    y_unmerged = ours(x)
    ours.merge()
    want = R.merge_dora(*_f64(w0, a, b, m), ours.scaling["default"])
    assert_close_to_ref(
        "merged weight", ours.weight, want, R.merge_dora(w0, a, b, m, ours.scaling["default"])
    )
    theirs.merge()
    torch.testing.assert_close(ours.weight, theirs.base_layer.weight, rtol=0.02, atol=0.01)
    assert_close_to_ref("merged forward", ours(x), R.dora_linear(*_f64(x, w0, ours.bias, a, b, m),
                        ours.scaling["default"]), y_unmerged)  # fmt: skip
    ours.unmerge()
    err = (ours.weight.double() - w0.double()).abs().max().item()
    assert err <= (1e-6 if dtype == torch.float32 else 2**-7) * w0.abs().max().item()
    ours.weight.data.copy_(w0)
    for _ in range(3):
        ours.merge(exact=True)
        assert not torch.equal(ours.weight, w0)
        ours.unmerge()
    assert torch.equal(ours.weight, w0)


def test_merge_refusals_and_swaps():
    layer = lk.FusedLoraLinear(16, 12, r=2, init_lora_weights=False, use_dora=True)
    layer.add_adapter("plain", 2, 4, init_lora_weights=False)
    layer.add_adapter("d2", 3, 3, init_lora_weights=False, use_dora=True)
    w0 = layer.weight.clone()
    layer.merge("plain")
    with pytest.raises(RuntimeError, match="DoRA adapter 'd2' merges into an unmerged weight"):
        layer.merge("d2")
    layer.swap_merged("d2")
    assert layer.merged_adapters == ["d2"]
    x = torch.randn(4, 16)
    merged = layer(x)
    layer.unmerge()
    torch.testing.assert_close(layer(x), merged, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.weight, w0, rtol=1e-6, atol=1e-6)
    layer.merge("d2", exact=True)
    with torch.no_grad():
        layer.lora_magnitude_vector["d2"].weight.add_(1.0)
    with pytest.raises(ValueError, match="changed since it was merged with exact=True"):
        layer.unmerge()
    layer.delete_adapter("plain")
    assert "d2" in layer.merged_adapters


def test_mixed_batch_with_dora_adapters_trains_each():
    layer = lk.FusedLoraLinear(20, 12, r=2, init_lora_weights=False, use_dora=True)
    layer.add_adapter("plain", 3, 6, init_lora_weights=False)
    layer.add_adapter("d2", 4, 4, init_lora_weights=False, use_dora=True)
    x = torch.randn(5, 3, 20)
    names = ["d2", "default", "__base__", "plain", "d2"]
    y = layer(x, adapter_names=names)
    for i, name in enumerate(names):
        if name == "__base__":
            want = F.linear(x[i], layer.weight, layer.bias)
        else:
            layer.set_adapter(name)
            want = layer(x[i])
        torch.testing.assert_close(y[i], want, rtol=1e-5, atol=1e-6)
    for p in layer.parameters():
        p.requires_grad_(p is not layer.weight and p is not layer.bias)
    layer(x, adapter_names=names).square().sum().backward()
    for name in ("default", "plain", "d2"):
        assert layer.lora_A[name].weight.grad.abs().sum() > 0
    for name in ("default", "d2"):
        assert layer.lora_magnitude_vector[name].weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------
# model level: config, checkpoints both ways, training curve, fuse()
# --------------------------------------------------------------------------------------------


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(32, 24)
        self.v = nn.Linear(24, 5, bias=False)

    def forward(self, x):
        return self.v(torch.tanh(self.q(x)))


def peft_dora_model(dropout=0.0):
    torch.manual_seed(0)
    base = Tiny()
    cfg = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q", "v"],
        use_dora=True,
        init_lora_weights=False,
        lora_dropout=dropout,
    )
    model = peft.get_peft_model(copy.deepcopy(base), cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "magnitude" in name:
                p.mul_(1 + 0.1 * torch.randn_like(p))
    return base, model


def test_config_round_trip_and_trainable_magnitude():
    cfg = lk.LoraConfig(r=4, target_modules=["q"], use_dora=True)
    d = cfg.to_dict()
    assert d["use_dora"] is True and lk.LoraConfig.from_dict(d) == cfg
    assert peft.LoraConfig(**{k: v for k, v in d.items() if k != "peft_type"}).use_dora
    model = lk.get_lora_model(Tiny(), cfg)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {"q.lora_A.default.weight", "q.lora_B.default.weight",
                     "q.lora_magnitude_vector.default.weight"}  # fmt: skip
    with pytest.raises(TypeError, match="expected use_dora to be a bool"):
        lk.LoraConfig(use_dora="yes")


def test_checkpoints_both_ways(tmp_path):
    base, theirs = peft_dora_model()
    theirs.save_pretrained(tmp_path / "peft")
    ours = lk.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    x = torch.randn(6, 32)
    theirs.eval()
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)
    lk.save_adapter(ours, tmp_path / "ours")
    from safetensors.torch import load_file

    a = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    b = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert sorted(a) == sorted(b) and "base_model.model.q.lora_magnitude_vector" in b
    for key in a:
        assert torch.equal(a[key], b[key]), key
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    torch.testing.assert_close(back(x), theirs(x), rtol=0, atol=0)


def test_training_loss_curve_equals_peft_s():
    base, theirs = peft_dora_model(dropout=0.1)
    ours = lk.get_lora_model(
        copy.deepcopy(base),
        lk.LoraConfig(
            r=4, lora_alpha=8, target_modules=["q", "v"], use_dora=True, lora_dropout=0.1
        ),  # fmt: skip
    )
    state = {
        k.removeprefix("base_model.model.").replace("base_layer.", ""): v
        for k, v in theirs.state_dict().items()
    }
    ours.load_state_dict(state)
    x, target = torch.randn(16, 32), torch.randn(16, 5)
    curves = []
    for model in (theirs, ours):
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        assert len(params) == 6
        opt = torch.optim.AdamW(params, lr=1e-2)
        torch.manual_seed(11)
        losses = []
        for _ in range(40):
            loss = F.mse_loss(model(x), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        curves.append(torch.tensor(losses))
    assert curves[0][-1] < 0.8 * curves[0][0]  # it trains
    torch.testing.assert_close(curves[1], curves[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_fuse_runs_peft_dora_on_our_kernels(monkeypatch, dropout):
    integration = pytest.importorskip("lora_kernels.integrations.peft", exc_type=ImportError)

    calls = []
    real = integration.dora_linear

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(integration, "dora_linear", counting)
    _, theirs = peft_dora_model(dropout)
    fused = integration.fuse(copy.deepcopy(theirs))
    x = torch.randn(3, 4, 32)
    outs = []
    for model in (theirs, fused):
        model.train()
        torch.manual_seed(2)
        y = model(x)
        y.square().sum().backward()
        outs.append(y)
    assert len(calls) == 2
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
    want = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    got = {n: p.grad for n, p in fused.named_parameters() if p.requires_grad}
    assert set(got) == set(want) and len(got) == 6
    for name, g in got.items():
        torch.testing.assert_close(g, want[name], rtol=1e-4, atol=1e-5, msg=name)
    fused.eval()
    fused.merge_adapter()  # PEFT's own merge still works on the fused layers
    theirs.eval()
    torch.testing.assert_close(fused(x), theirs(x), rtol=1e-4, atol=1e-5)


def test_the_cache_refuses_dora_clearly():
    with pytest.raises(ValueError, match="use_dora=True: the cache holds plain LoRA"):
        lk.AdapterCache(1 << 20).put(
            "d", {"base_model.model.q.lora_A.weight": torch.zeros(2, 4)}, {"r": 2, "use_dora": True}
        )


# --------------------------------------------------------------------------------------------
# the ops
# --------------------------------------------------------------------------------------------

BACKENDS = ["torch"] + (["triton"] if HAS_TRITON else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dropout", [False, True])
def test_opcheck(backend, dropout):
    x, w, b, a, bb, m = make((5,), 12, 10, 3, torch.float32)
    for t in (x, a, bb, m):
        t.requires_grad_(True)
    xl = F.dropout(x.detach(), 0.5).requires_grad_(True) if dropout else None
    w_sq = torch.ops.lora_kernels.dora_weight_sq_norm(w, backend)
    torch.library.opcheck(torch.ops.lora_kernels.dora_weight_sq_norm, (w, backend))
    torch.library.opcheck(
        torch.ops.lora_kernels.dora_weight_norm, (w, a.detach(), bb.detach(), 0.5, w_sq, backend)
    )
    norm = torch.ops.lora_kernels.dora_weight_norm(w, a.detach(), bb.detach(), 0.5, w_sq, backend)
    args = (x, w, b, a, bb, m, norm, 0.5, xl, backend)
    torch.library.opcheck(torch.ops.lora_kernels.dora_linear_fwd, args)
    y, lin, s = torch.ops.lora_kernels.dora_linear_fwd(*(t.detach() if isinstance(t, torch.Tensor)
                                                          else t for t in args))  # fmt: skip
    dy = torch.randn_like(y)
    torch.library.opcheck(
        torch.ops.lora_kernels.dora_linear_bwd,
        (dy, x.detach(), w, a.detach(), bb.detach(), m.detach(), norm, s, lin, 0.5,
         None if xl is None else xl.detach(), True, True, False, True, backend),
    )  # fmt: skip


def test_compile_fullgraph_forward_backward():
    layer = lk.FusedLoraLinear(24, 16, r=4, lora_alpha=8, init_lora_weights=False, use_dora=True)
    layer.train()
    x = torch.randn(3, 5, 24, requires_grad=True)

    def step(x):
        return layer(x).square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(x)
    loss.backward()
    got = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters() if p.requires_grad]
    x.grad = None
    layer.zero_grad()
    step(x).backward()
    want = [x.grad] + [p.grad for p in layer.parameters() if p.requires_grad]
    assert len(got) == 4
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_the_adapter_cancels_fall_back_to_the_dense_sum(backend):
    """Where ``W_n ~ -s B_n A`` the factored sum cancels; those rows are recomputed densely."""
    n, k, r, scale = 20, 48, 4, 0.5
    a, b = torch.randn(r, k), torch.randn(n, r)
    w = -scale * (b @ a)
    w[::3] += 1e-3 * torch.randn(7, k)  # nearly cancelled rows ...
    w[1::3] += torch.randn(7, k)  # ... ordinary ones, and exactly cancelled ones (2::3)
    ref = R.dora_weight_norm(*_f64(w, a, b), scale)
    got = lk.dora_weight_norm(w, a, b, scale, backend=backend).double()
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    factored = R.dora_weight_norm_factored(w, a, b, scale).double()
    assert (factored - ref).abs().max() > 100 * (got - ref).abs().max()  # the fallback mattered


def test_dora_refused_where_it_has_no_fused_path():
    """DoRA runs on nn.Linear weights; a Conv1D layer (``fan_in_fan_out``) refuses it up front,
    and get_lora_model refuses a DoRA config that targets one, before the model changes."""
    Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D

    conv = Conv1D(6, 4)
    layer = lk.FusedLoraLinear.from_linear(conv, r=2)
    with pytest.raises(ValueError, match="use_dora=True needs an \\[out, in\\] weight"):
        layer.add_adapter("d", 2, 2, use_dora=True)
    assert layer.adapter_names == ["default"]
    model = nn.Sequential(Conv1D(6, 4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = lk.LoraConfig(r=2, target_modules=["0"], use_dora=True)
    with pytest.raises(ValueError, match="use_dora=True is supported on nn.Linear targets"):
        lk.get_lora_model(model, config)
    assert type(model[0]) is Conv1D
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs triton (GPU or interpreter)")
@pytest.mark.parametrize(
    ("dtype", "lora_dtype"),
    [(torch.float32, torch.float32), (torch.float16, torch.float16),
     (torch.bfloat16, torch.float32)],
)  # fmt: skip
@pytest.mark.parametrize(("n", "k", "r"), [(1, 1, 1), (37, 70, 20), (19, 133, 3)])
def test_triton_merge_and_unmerge_match_the_spec(dtype, lora_dtype, n, k, r):
    """The Triton backend merges with a kernel of its own (one pass over W, rounded once), the
    spec's value within the tolerance rule; unmerge with the merge-time norm restores W."""
    x, w, _, a, bb, m = make((1,), k, n, r, dtype, lora_dtype=lora_dtype)
    scale = 0.75
    w_t, w_s = w.clone(), w.clone()
    norm = lk.merge_dora_(w_t, a, bb, m, scale, backend="triton")
    lk.merge_dora_(w_s, a, bb, m, scale, backend="torch")
    want = R.merge_dora(*_f64(w, a, bb, m), scale)
    assert_close_to_ref("merged", w_t, want, w_s)
    lk.unmerge_dora_(w_t, a, bb, m, scale, norm, backend="triton")
    lk.unmerge_dora_(w_s, a, bb, m, scale, norm, backend="torch")
    back = R.unmerge_dora(*_f64(R.merge_dora(w, a, bb, m, scale), a, bb, m, norm), scale)
    assert_close_to_ref("unmerged", w_t, back, w_s)


def test_triton_launchers_do_not_import_the_torch_backend():
    """The Triton DoRA, QLoRA and embedding launchers stand on their own: shared constants live
    in the spec (``reference.ILL_CONDITIONED``), merges run on Triton's own kernels."""
    import ast
    from pathlib import Path

    import lora_kernels.backends.triton as triton_pkg

    root = Path(triton_pkg.__file__).parent
    for name in ("dora", "qlora", "lora_embedding", "_args"):
        tree = ast.parse((root / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = "." * node.level + (node.module or "")
                assert not target.startswith("..torch"), f"{name}.py imports {target}"
                assert "backends.torch" not in target, f"{name}.py imports {target}"
