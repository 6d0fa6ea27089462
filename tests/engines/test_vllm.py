"""lora_kernels as vLLM's punica wrapper: every method against vLLM's own ``PunicaWrapperCPU`` on
the same random inputs and the same ``LoRAMapping``, both held to an fp64 computation of vLLM's
formulas (each may err at most twice the other's error plus the dtype's floor); the plugin's
entry point, its selection of our wrapper, and its off switch."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch

vllm = pytest.importorskip("vllm")

from vllm.lora.layers import LoRAMapping  # noqa: E402
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU  # noqa: E402

from lora_kernels.integrations import vllm as lk_vllm  # noqa: E402
from tests.tolerances import assert_close_to_ref  # noqa: E402

MAX_LORAS = 4
LORA_INDEX_TO_ID = [3, None, 7, 5]  # slot -> adapter id; slot 1 is free
VOCAB = 50
K, R = 24, 8

# (adapter id per sequence, tokens per sequence); id 0: no adapter
PREFILL = ([7, 0, 3, 7, 5], [5, 1, 9, 3, 2])  # ragged, repeated adapter, a base-only request
DECODE = ([3, 0, 5, 7, 7, 0, 3], [1] * 7)


def _mapping(case, is_prefill):
    ids, lens = case
    index = [a for a, n in zip(ids, lens, strict=True) for _ in range(n)]
    return LoRAMapping(index, tuple(ids) if is_prefill else tuple(index), is_prefill=is_prefill)


def _pair(case, is_prefill):
    """Our wrapper and vLLM's CPU wrapper, both told the same mapping."""
    mapping = _mapping(case, is_prefill)
    wrappers = []
    for cls in (lk_vllm.LoraKernelsPunicaWrapper, PunicaWrapperCPU):
        w = cls(64, 16, "cpu")
        w.update_metadata(mapping, LORA_INDEX_TO_ID, MAX_LORAS, VOCAB)
        wrappers.append(w)
    return wrappers, mapping


def _slots(ids):
    """Slot per row in fp64 reference loops: vLLM's convert_mapping, restated."""
    return [-1 if a == 0 else LORA_INDEX_TO_ID.index(a) for a in ids]


def _stack(rows, cols, dtype):
    w = torch.randn(MAX_LORAS, 1, rows, cols, dtype=dtype) / cols**0.5
    w[1] = float("nan")  # the free slot: no row may read it
    return w


def _ref_linear(y, x, slots, lora_a, lora_b, scale, slices, add_inputs=True):
    out = y.double().clone()
    for i, a in enumerate(slots):
        if a < 0:
            continue
        off = 0
        for a_s, b_s, n in zip(lora_a, lora_b, slices, strict=True):
            s = scale * (x[i].double() @ a_s[a, 0].double().T)
            term = s @ b_s[a, 0].double().T
            out[i, off : off + n] = term + (out[i, off : off + n] if add_inputs else 0)
            off += n
    return out


def _both_close(name, ours, theirs, ref):
    assert_close_to_ref(f"{name} (lora_kernels)", ours, ref, theirs)
    assert_close_to_ref(f"{name} (vLLM CPU)", theirs, ref, ours)


CASES = {"prefill": (PREFILL, True), "decode": (DECODE, False)}
SLICES = {"1 slice": (40,), "3 slices (qkv)": (32, 16, 16)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("slices", SLICES)
@pytest.mark.parametrize("add_inputs", [True, False])
def test_add_lora_linear(dtype, case, slices, add_inputs):
    """``add_inputs=False`` (vLLM's dual-stream path, CUDA only in vLLM) is held against vLLM's
    own two halves with the same flag: its CPU wrapper's add_lora_linear does not take it."""
    (ours, theirs), mapping = _pair(*CASES[case])
    widths = SLICES[slices]
    m = len(mapping.index_mapping)
    x = torch.randn(m, K, dtype=dtype)
    lora_a = tuple(_stack(R, K, dtype) for _ in widths)
    lora_b = tuple(_stack(n, R, dtype) for n in widths)
    y0 = torch.randn(m, sum(widths), dtype=dtype)
    results = []
    y = y0.clone()
    ours.add_lora_linear(y, x, lora_a, lora_b, 0.5, widths, add_inputs=add_inputs)
    results.append(y)
    y = y0.clone()
    if add_inputs:
        theirs.add_lora_linear(y, x, lora_a, lora_b, 0.5, widths)
    else:
        buf = torch.zeros(len(widths), m, R)
        theirs.add_shrink(buf, x, lora_a, 0.5)
        theirs.add_expand(y, buf, lora_b, widths, add_inputs=False)
    results.append(y)
    slots = _slots(mapping.index_mapping)
    ref = _ref_linear(y0, x, slots, lora_a, lora_b, 0.5, widths, add_inputs)
    _both_close("add_lora_linear", *results, ref)
    base_rows = torch.tensor([a < 0 for a in slots])
    assert torch.equal(results[0][base_rows], y0[base_rows])  # rows of no adapter: untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES)
def test_add_shrink_then_add_expand_with_offset(dtype, case):
    """The two halves that the tensor-parallel layers call on their own, into a stacked fp32
    buffer and at an output offset (a rank's shard of a row-parallel output)."""
    (ours, theirs), mapping = _pair(*CASES[case])
    widths, offset = (12, 20), 7
    m = len(mapping.index_mapping)
    x = torch.randn(m, K, dtype=dtype)
    lora_a = tuple(_stack(R, K, dtype) for _ in widths)
    lora_b = tuple(_stack(n, R, dtype) for n in widths)
    y0 = torch.randn(m, offset + sum(widths) + 3, dtype=dtype)
    buffers, outs = [], []
    for w in (ours, theirs):
        buf = torch.zeros(len(widths), m, R)
        w.add_shrink(buf, x, lora_a, 2.0)
        y = y0.clone()
        w.add_expand(y, buf, lora_b, widths, offset_start=offset)
        buffers.append(buf)
        outs.append(y)
    slots = _slots(mapping.index_mapping)
    ref_buf = torch.zeros(len(widths), m, R, dtype=torch.float64)
    for i, a in enumerate(slots):
        for s in range(len(widths)):
            if a >= 0:
                ref_buf[s, i] = 2.0 * (x[i].double() @ lora_a[s][a, 0].double().T)
    _both_close("add_shrink", *buffers, ref_buf)
    ref_y = y0.double().clone()
    view = ref_y[:, offset : offset + sum(widths)]
    view.copy_(_ref_linear(view, x, slots, lora_a, lora_b, 2.0, widths))
    _both_close("add_expand", *outs, ref_y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES)
def test_add_lora_embedding(dtype, case):
    (ours, theirs), mapping = _pair(*CASES[case])
    m, dim = len(mapping.index_mapping), 36
    x = torch.randn(m, R, dtype=dtype)  # each token's row of its adapter's embedding A
    lora_b = _stack(dim, R, dtype)
    y0 = torch.randn(m, dim, dtype=dtype)
    outs = []
    for w in (ours, theirs):
        y = y0.clone()
        w.add_lora_embedding(y, x, lora_b, add_inputs=True)
        outs.append(y)
    ref = y0.double().clone()
    for i, a in enumerate(_slots(mapping.index_mapping)):
        if a >= 0:
            ref[i] += x[i].double() @ lora_b[a, 0].double().T
    _both_close("add_lora_embedding", *outs, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES)
def test_add_lora_logits(dtype, case):
    """One adapter per request (the sampler's indices), logits wider than nothing else."""
    (ours, theirs), mapping = _pair(*CASES[case])
    rows = len(mapping.prompt_mapping)
    x = torch.randn(rows, K, dtype=dtype)
    lora_a, lora_b = _stack(R, K, dtype), _stack(VOCAB, R, dtype)
    y0 = torch.randn(rows, VOCAB, dtype=dtype)
    outs = []
    for w in (ours, theirs):
        y = y0.clone()
        w.add_lora_logits(y, x, lora_a, lora_b, 0.25)
        outs.append(y)
    ref = _ref_linear(y0, x, _slots(mapping.prompt_mapping), (lora_a,), (lora_b,), 0.25, (VOCAB,))
    _both_close("add_lora_logits", *outs, ref)


@pytest.mark.parametrize("case", CASES)
def test_apply_lora_full_linear(case):
    """A request whose adapter has a classifier head of its own gets it; others keep y."""
    (ours, theirs), mapping = _pair(*CASES[case])
    rows, labels = len(mapping.prompt_mapping), 6
    x = torch.randn(rows, K)
    weight = _stack(labels, K, torch.float32)
    bias = torch.randn(MAX_LORAS, labels)
    enabled = torch.tensor([True, False, True, False])
    y0 = torch.randn(rows, labels)
    outs = []
    for w in (ours, theirs):
        y = y0.clone()
        w.apply_lora_full_linear(y, x, weight, bias, enabled)
        outs.append(y)
    ref = y0.double().clone()
    for i, a in enumerate(_slots(mapping.prompt_mapping)):
        if a >= 0 and enabled[a]:
            ref[i] = x[i].double() @ weight[a, 0].double().T + bias[a].double()
    _both_close("apply_lora_full_linear", *outs, ref)


def test_all_abstract_methods_are_implemented():
    assert not getattr(lk_vllm.LoraKernelsPunicaWrapper, "__abstractmethods__", set())


def test_entry_point_is_found():
    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    ours = [ep for ep in eps if ep.name == "lora_kernels"]
    assert [ep.value for ep in ours] == ["lora_kernels.integrations.vllm:register"]
    assert ours[0].load() is lk_vllm.register


@pytest.fixture
def platform_cls():
    """The current platform's class, with its own get_punica_wrapper restored afterwards."""
    from vllm.platforms import current_platform

    cls = type(current_platform)
    saved = cls.__dict__["get_punica_wrapper"]  # the CPU platform defines its own
    yield cls
    cls.get_punica_wrapper = saved


def test_plugin_selects_our_wrapper(platform_cls, monkeypatch):
    from vllm.lora.punica_wrapper import get_punica_wrapper

    monkeypatch.delenv("LORA_KERNELS_VLLM", raising=False)
    assert platform_cls.get_punica_wrapper().endswith("PunicaWrapperCPU")
    import vllm.plugins

    monkeypatch.setattr(vllm.plugins, "plugins_loaded", False)
    vllm.plugins.load_general_plugins()  # what every vLLM process does before building a model
    assert platform_cls.get_punica_wrapper() == lk_vllm.QUALNAME
    wrapper = get_punica_wrapper(64, 16, "cpu", lora_config=None)
    assert type(wrapper) is lk_vllm.LoraKernelsPunicaWrapper
    lk_vllm.register()  # again: vLLM may load plugins more than once
    assert platform_cls.get_punica_wrapper() == lk_vllm.QUALNAME


@pytest.mark.parametrize("value", ["0", "false", "off"])
def test_off_switch(platform_cls, monkeypatch, value):
    monkeypatch.setenv("LORA_KERNELS_VLLM", value)
    lk_vllm.register()
    assert platform_cls.get_punica_wrapper().endswith("PunicaWrapperCPU")


def _lora_layer(widths, dtype, wrapper):
    """A vLLM linear LoRA layer as its LoRA model manager leaves it (weights set, mapping set),
    built around a plain base layer: constructing vLLM's parallel layers needs a distributed
    context, and ``_apply_sync`` reads only these attributes."""
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    base = torch.nn.Module()
    base.weight = torch.nn.Parameter(torch.randn(sum(widths), K, dtype=dtype), False)
    base.bias = torch.nn.Parameter(torch.randn(sum(widths), dtype=dtype), False)
    base.quant_method = UnquantizedLinearMethod()
    base.cpu_linear = torch.nn.functional.linear  # what vLLM's CPU weight loading installs
    layer = BaseLinearLayerWithLoRA.__new__(BaseLinearLayerWithLoRA)
    torch.nn.Module.__init__(layer)
    layer.base_layer = base
    layer.tp_size, layer.n_slices, layer.output_slices = 1, len(widths), tuple(widths)
    layer.lora_a_stacked = tuple(_stack(R, K, dtype) for _ in widths)
    layer.lora_b_stacked = tuple(_stack(n, R, dtype) for n in widths)
    for t in (*layer.lora_a_stacked, *layer.lora_b_stacked):
        t[1] = 0.0  # the base path multiplies every slot's weights: no NaN here
    layer.punica_wrapper = wrapper
    return layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("slices", SLICES)
def test_fused_base_and_lora_path(dtype, case, slices, monkeypatch, platform_cls):
    """LORA_KERNELS_VLLM_FUSED=1: one kernel per slice for base + LoRA, against vLLM's own
    _apply_sync (base GEMM, then PunicaWrapperCPU) on the same layer."""
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA

    stock = BaseLinearLayerWithLoRA._apply_sync
    monkeypatch.setenv("LORA_KERNELS_VLLM_FUSED", "1")
    monkeypatch.setattr(BaseLinearLayerWithLoRA, "_apply_sync", stock)
    lk_vllm.register()
    assert BaseLinearLayerWithLoRA._apply_sync is lk_vllm.fused_apply_sync
    (ours, theirs), mapping = _pair(*CASES[case])
    widths = SLICES[slices]
    layer = _lora_layer(widths, dtype, ours)
    x = torch.randn(len(mapping.index_mapping), K, dtype=dtype)
    assert lk_vllm._fusable(layer, x)  # the fused launches run, not the fallback
    fused = layer._apply_sync(x, layer.base_layer.bias)
    layer.punica_wrapper = theirs  # not our wrapper: vLLM's own method runs
    assert not lk_vllm._fusable(layer, x)
    reference = layer._apply_sync(x, layer.base_layer.bias)
    base = x.double() @ layer.base_layer.weight.double().T + layer.base_layer.bias.double()
    slots = _slots(mapping.index_mapping)
    ref = _ref_linear(base, x, slots, layer.lora_a_stacked, layer.lora_b_stacked, 1.0, widths)
    _both_close("fused _apply_sync", fused, reference, ref)
