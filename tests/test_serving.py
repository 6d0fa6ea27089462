"""Serving from device slots (lora_kernels.serving): one model-level state that every layer reads.

Against the old per-layer path and PEFT: outputs after slot switches (both step flavours, back and
forth), mixed batches by names and by id tensors against per-adapter runs, what makes a layer
leave the state and what brings it back, bad input refused before the state changes, a switch
that visits no layer, and a step that neither reads device values on the host nor allocates by
the ids' content (the property CUDA-graph replay needs; the graph itself is in test_cuda.py).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import lora_kernels as lk
from lora_kernels.backends.torch import lora_linear as torch_linear
from lora_kernels.backends.torch import lora_multi as torch_multi
from lora_kernels.models.model import LoraConfig, get_lora_model, mixed_batch
from lora_kernels.serving.cache import AdapterCache
from lora_kernels.serving.state import adapter_slot_ids, serving_state
from lora_kernels.serving.switch import release_adapters, switch_adapter
from tests.helpers import TinyBlocks
from tests.tolerances import assert_close_to_ref

DIM, HIDDEN = 24, 40
TARGETS = ["q", "up", "down"]
ADAPTERS = (("x", 2, TARGETS), ("y", 8, TARGETS), ("z", 16, ["up"]))


def Tiny() -> nn.Module:  # noqa: N802 - reads as the model class it builds
    return TinyBlocks(DIM, HIDDEN)


def random_adapter(model, r, targets):
    sd = {}
    for path, m in model.named_modules():
        if isinstance(m, lk.FusedLoraLinear) and path.rsplit(".", 1)[-1] in targets:
            sd[f"base_model.model.{path}.lora_A.weight"] = torch.randn(r, m.in_features) / 3
            sd[f"base_model.model.{path}.lora_B.weight"] = torch.randn(m.out_features, r) / 3
    return sd, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets))


def layers_of(model):
    return [m for m in model.modules() if isinstance(m, lk.FusedLoraLinear)]


@pytest.fixture
def served():
    """A model served from 3 slots with adapters x (r 2), y (r 8), z (r 16, 'up' only) installed,
    and a float64 twin holding the same adapters as its own (the old per-layer path)."""
    model = get_lora_model(Tiny(), LoraConfig(r=4, target_modules=TARGETS))
    cache = AdapterCache(1 << 22)
    for name, r, targets in ADAPTERS:
        cache.put(name, *random_adapter(model, r, targets))
    cache.attach(model, num_slots=3, max_rank=16)
    for name, _, _ in ADAPTERS:
        switch_adapter(model, name, cache=cache)
    twin = copy.deepcopy(model)
    return model, cache, twin


def old_path(twin, name, x, dtype=torch.float32):
    """The twin (plain adapters, per-layer switch, lora_linear) with ``name`` active."""
    twin = copy.deepcopy(twin).to(dtype)
    switch_adapter(twin, name)
    with torch.no_grad():
        return twin(x.to(dtype))


def check(name, actual, twin, adapter, x):
    ref = old_path(twin, adapter, x, torch.float64)
    assert_close_to_ref(name, actual, ref, old_path(twin, adapter, x))


# ---------------------------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("graph_safe", [False, True])
def test_slot_switches_give_the_old_outputs_back_and_forth(served, graph_safe):
    model, cache, twin = served
    state = serving_state(model)
    assert state.synced and all(m._serving is not None for m in layers_of(model))
    state.graph_safe = graph_safe
    x = torch.randn(5, DIM)
    for name in ["x", "y", None, "z", "x", "z", "__base__", "y", "y"]:
        switch_adapter(model, name, cache=cache)
        with torch.no_grad():
            y = model(x)
        want = None if name == "__base__" else name
        if graph_safe:
            check(f"slot {name}", y, twin, want, x)
        else:  # the layer's own fused path on the slot views: the old path, bit for bit
            assert torch.equal(y, old_path(twin, want, x))
        up, q = model.blocks[0]["up"], model.blocks[0]["q"]
        assert up.active_adapter == want and model.active_lora_adapter == want
        assert q.active_adapter == (None if want == "z" else want)  # z adapts "up" only
        assert state.active_slot.tolist() == [-1 if want is None else state.slots[want]]


@pytest.mark.parametrize("shape", [(DIM,), (2, 3, DIM), (4097, DIM)])
def test_graph_safe_single_adapter_steps_take_any_shape(served, shape):
    """1-D x, 3-D x, and more rows than the preallocated buffer of the active slot."""
    model, cache, twin = served
    serving_state(model).graph_safe = True
    switch_adapter(model, "y", cache=cache)
    x = torch.randn(shape)
    with torch.no_grad():
        check(f"x {list(shape)}", model(x), twin, "y", x)


def test_a_slot_switch_visits_no_layer(served, monkeypatch):
    """Neither a switch nor a mixed batch of a served model visits a layer or walks the model
    (the first mixed batch after a switch through the per-layer path looks for wrappers once)."""
    model, cache, _ = served
    with mixed_batch(model, ["x"]):
        pass

    def forbidden(*args, **kwargs):
        raise AssertionError("a served switch visited a layer")

    for method in ("set_adapter", "add_adapter", "delete_adapter", "merge", "unmerge"):
        monkeypatch.setattr(lk.FusedLoraLinear, method, forbidden)
    monkeypatch.setattr("lora_kernels.serving.switch.lora_layers", forbidden)
    monkeypatch.setattr(nn.Module, "named_modules", forbidden)
    monkeypatch.setattr("lora_kernels.models.model._named_modules", forbidden)
    moved = cache.stats.bytes_to_device
    for name in ["y", "x", None, "z", "x"]:
        switch_adapter(model, name, cache=cache)
        assert model.active_lora_adapter == name
        with mixed_batch(model, ["x", "__base__", "z"]), torch.no_grad():
            model(torch.randn(3, DIM))
        with mixed_batch(model, torch.tensor([2, 1])), torch.no_grad():
            model(torch.randn(2, DIM))
    assert cache.stats.bytes_to_device == moved
    monkeypatch.undo()
    assert model.blocks[1]["down"].active_adapter == "x"


@pytest.mark.parametrize("graph_safe", [False, True])
@pytest.mark.parametrize("dims", [2, 3])
def test_mixed_batch_through_the_state_equals_each_adapter_alone(served, graph_safe, dims):
    model, cache, twin = served
    serving_state(model).graph_safe = graph_safe
    names = ["y", "__base__", "z", "x", "y", "z", "x"]
    x = torch.randn(len(names), DIM) if dims == 2 else torch.randn(len(names), 3, DIM)
    switch_adapter(model, "z", cache=cache)
    with torch.no_grad(), mixed_batch(model, names):
        # no per-layer hook: the layers read the rows' slots from the state
        assert not any(m._forward_pre_hooks for m in layers_of(model))
        y = model(x)
        ids = adapter_slot_ids(model, names)
    with torch.no_grad(), mixed_batch(model, ids):
        y_ids = model(x)
    assert torch.equal(y, y_ids)
    for i, name in enumerate(names):
        want = None if name == "__base__" else name
        check(f"row {i} ({name})", y[i : i + 1], twin, want, x[i : i + 1])
    # After the block: back to the active adapter, for any batch size.
    with torch.no_grad():
        check("after the block", model(x[:2]), twin, "z", x[:2])
    assert serving_state(model).mixed_rows is None


def test_the_state_works_in_and_out_of_inference_mode():
    """Engaged under torch.inference_mode, then switched and batched outside it (and back)."""
    model = get_lora_model(Tiny(), LoraConfig(r=4, target_modules=TARGETS))
    cache = AdapterCache(1 << 22)
    for name, r, targets in ADAPTERS:
        cache.put(name, *random_adapter(model, r, targets))
    cache.attach(model, num_slots=3, max_rank=16)
    x = torch.randn(300, DIM)  # more rows than the id buffer holds: it grows
    with torch.inference_mode():
        switch_adapter(model, "x", cache=cache)
        switch_adapter(model, "y", cache=cache)
    switch_adapter(model, "x", cache=cache)
    with torch.no_grad(), mixed_batch(model, ["y", "x"] * 150):
        outside = model(x)
    with torch.inference_mode(), mixed_batch(model, ["y", "x"] * 150):
        inside = model(x)
        switch_adapter(model, "z", cache=cache)
    assert torch.equal(inside, outside)
    assert model.blocks[0]["up"].active_adapter == "z"


def test_ids_name_slots_filled_by_prefetch_alone():
    """A switch to the base through the cache serves the model; an id tensor then selects any
    filled slot, installed or not (the caller keeps the slots it names filled)."""
    model = get_lora_model(Tiny(), LoraConfig(r=4, target_modules=TARGETS))
    cache = AdapterCache(1 << 22)
    for name, r, targets in ADAPTERS:
        cache.put(name, *random_adapter(model, r, targets))
    cache.attach(model, num_slots=3, max_rank=16)
    slot = {name: cache.prefetch(name) for name, _, _ in ADAPTERS}
    switch_adapter(model, None, cache=cache)
    assert serving_state(model).synced and serving_state(model).slots == {}
    names = ["z", "x", "__base__", "y"]
    ids = torch.tensor([slot.get(n, -1) for n in names], dtype=torch.int32)
    x = torch.randn(len(names), DIM)
    with torch.no_grad(), mixed_batch(model, ids):
        y = model(x)
    for name, _, _ in ADAPTERS:  # now installed, by names
        switch_adapter(model, name, cache=cache)
    with torch.no_grad(), mixed_batch(model, names):
        assert torch.equal(model(x), y)


def test_nested_mixed_batches_restore_the_outer_ids(served):
    model, _, _ = served
    x = torch.randn(3, DIM)
    with torch.no_grad(), mixed_batch(model, ["x", "y", "z"]):
        outer = model(x)
        with mixed_batch(model, ["z", "z"]):
            model(x[:2])
        assert torch.equal(model(x), outer)


def test_names_outside_the_slots_take_the_per_layer_path(served):
    """The model's own adapter ("default") is not in a slot: the names go to every layer."""
    model, _, _ = served
    with torch.no_grad():
        for m in layers_of(model):
            nn.init.normal_(m.lora_B["default"].weight, std=0.3)
    twin = copy.deepcopy(model)
    names = ["default", "y", "__base__"]
    x = torch.randn(3, DIM)
    with torch.no_grad(), mixed_batch(model, names):
        assert all(m._forward_pre_hooks for m in layers_of(model))
        y = model(x)
    for i, name in enumerate(names):
        want = None if name == "__base__" else name
        check(f"row {i}", y[i : i + 1], twin, want, x[i : i + 1])


def test_many_adapters_in_one_mixed_batch():
    """50 rank-16 adapters, each in its own slot, random rows: each row is its adapter's."""
    model = get_lora_model(Tiny(), LoraConfig(r=4, target_modules=TARGETS))
    cache = AdapterCache(1 << 26)
    names = [f"a{i}" for i in range(50)]
    for name in names:
        cache.put(name, *random_adapter(model, 16, TARGETS))
    cache.attach(model, num_slots=len(names), max_rank=16)
    for name in names:
        switch_adapter(model, name, cache=cache)
    twin = copy.deepcopy(model)
    rows = [names[i] for i in torch.randint(0, len(names), (64,)).tolist()]
    x = torch.randn(len(rows), DIM)
    with torch.no_grad(), mixed_batch(model, rows):
        y = model(x)
    for i in (0, 17, 63):
        check(f"row {i}", y[i : i + 1], twin, rows[i], x[i : i + 1])
    assert serving_state(model).num_slots == 50


def test_slot_switches_match_peft(tmp_path):
    peft = pytest.importorskip("peft")
    from tests.helpers import randomise, tiny_llama, token_ids

    targets = ["q_proj", "v_proj", "down_proj"]
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets)
    peft_model = peft.get_peft_model(tiny_llama(), config, adapter_name="a")
    peft_model.add_adapter("b", config)
    randomise(peft_model)
    peft_model.save_pretrained(tmp_path)
    model = get_lora_model(tiny_llama(), LoraConfig(r=2, target_modules=targets))
    cache = AdapterCache(1 << 22)
    cache.load("a", tmp_path / "a")
    cache.load("b", tmp_path / "b")
    cache.attach(model, num_slots=2, max_rank=8)
    ids = token_ids(shape=(3, 5))
    peft_model.eval()
    peft64 = copy.deepcopy(peft_model).double()
    with torch.no_grad():
        for name in ("a", "b", "a"):
            switch_adapter(model, name, cache=cache)
            peft_model.set_adapter(name)
            peft64.set_adapter(name)
            assert_close_to_ref(name, model(ids).logits, peft64(ids).logits, peft_model(ids).logits)
        names = ["b", "a", "b"]
        with mixed_batch(model, names):
            assert not any(m._forward_pre_hooks for m in layers_of(model))
            y = model(ids).logits
        ref = peft64(ids, adapter_names=names).logits
        assert_close_to_ref("mixed", y, ref, peft_model(ids, adapter_names=names).logits)


# ---------------------------------------------------------------------------------------------
# leaving the state, and coming back
# ---------------------------------------------------------------------------------------------


def test_release_restores_plain_layers(served):
    model, cache, twin = served
    x = torch.randn(4, DIM)
    switch_adapter(model, None, cache=cache)
    release_adapters(model)
    assert all(m._serving is None for m in layers_of(model))
    assert not serving_state(model).synced
    assert all(m.adapter_names == ["default"] for m in layers_of(model))
    assert cache._pool.refs == [0, 0, 0]
    with torch.no_grad():
        assert torch.equal(model(x), old_path(twin, None, x))
    with pytest.raises(ValueError, match="not served from device slots"):
        adapter_slot_ids(model, ["x"])
    switch_adapter(model, "y", cache=cache)  # installed again, served again
    assert serving_state(model).synced and model.blocks[0]["q"].active_adapter == "y"


def test_a_layer_changed_by_hand_leaves_and_the_next_switch_brings_it_back(served, monkeypatch):
    model, cache, twin = served
    x = torch.randn(4, DIM)
    switch_adapter(model, "x", cache=cache)
    q = model.blocks[1]["q"]
    q.set_adapter("y")  # this layer only
    state = serving_state(model)
    assert q._serving is None and not state.synced
    assert q.active_adapter == "y" and model.blocks[0]["q"].active_adapter == "x"
    ids = torch.zeros(4, dtype=torch.int32)
    with pytest.raises(ValueError, match="need a model served from"), mixed_batch(model, ids):
        pass
    calls = []
    monkeypatch.setattr("lora_kernels.serving.switch._apply_switch", lambda *a: calls.append(a))
    switch_adapter(model, "x", cache=cache)
    assert len(calls) == 1  # the per-layer path, not the one write
    monkeypatch.undo()
    switch_adapter(model, "x", cache=cache)
    assert state.synced and q.active_adapter == "x"
    with torch.no_grad():
        assert torch.equal(model(x), old_path(twin, "x", x))


def test_merged_switches_leave_the_state_and_unmerged_ones_come_back(served):
    model, cache, twin = served
    x = torch.randn(4, DIM)
    switch_adapter(model, "y", cache=cache, merged=True, exact=True)
    assert all(m._serving is None for m in layers_of(model))
    with torch.no_grad():
        check("merged y", model(x), twin, "y", x)
    switch_adapter(model, "x", cache=cache)
    assert all(m._serving is not None and not m.merged for m in layers_of(model))
    with torch.no_grad():
        assert torch.equal(model(x), old_path(twin, "x", x))
    lk.set_adapter(model, "default")  # the model-level per-layer switch leaves the state too
    assert not serving_state(model).synced
    assert model.blocks[0]["up"].active_adapter == "default"


def test_a_copied_model_runs_the_active_adapter_as_its_own(served):
    model, cache, twin = served
    switch_adapter(model, "z", cache=cache)
    copied = copy.deepcopy(model)
    assert serving_state(copied) is None
    x = torch.randn(3, DIM)
    with torch.no_grad():
        assert torch.equal(copied(x), model(x))
    switch_adapter(model, "x", cache=cache)
    assert copied.blocks[0]["up"].active_adapter == "z"
    assert all(m._serving is None for m in layers_of(copied))


# ---------------------------------------------------------------------------------------------
# bad input: refused before the state changes
# ---------------------------------------------------------------------------------------------


def _state_of(state):
    return (state.active_ids.clone(), state.row_ids.clone(), state.mixed_rows, state.active_name)


def _same(a, b):
    return torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2:] == b[2:]


@pytest.mark.parametrize(
    "ids, error, message",
    [
        (torch.zeros(3), TypeError, "dtype torch.int32 or torch.int64, got torch.float32"),
        (torch.zeros(3, 1, dtype=torch.int32), ValueError, r"shape \[rows\].*got \[3, 1\]"),
        (torch.zeros(3, dtype=torch.int32, device="meta"), ValueError, "on cpu .* got meta"),
        (torch.tensor([0, 3, -1]), ValueError, r"in \[-1, 3\).*from -1 to 3"),
        (torch.tensor([0, -2]), ValueError, r"in \[-1, 3\).*from -2 to 0"),
    ],
)
def test_bad_ids_are_refused_before_anything_changes(served, ids, error, message):
    model, _, _ = served
    state = serving_state(model)
    with mixed_batch(model, ["x", "y"]):
        before = _state_of(state)
        with pytest.raises(error, match=message), mixed_batch(model, ids):
            pass
        assert _same(_state_of(state), before)


def test_bad_names_and_switches_change_nothing(served):
    model, cache, _ = served
    state = serving_state(model)
    switch_adapter(model, "y", cache=cache)
    before = _state_of(state)
    unknown = pytest.raises(ValueError, match=r"unknown adapters \['nope'\]")
    with unknown, mixed_batch(model, ["x", "nope"]):
        pass
    with pytest.raises(KeyError, match="'nope' is not cached"):
        switch_adapter(model, "nope", cache=cache)
    with pytest.raises(TypeError, match="expected name to be a str"):
        switch_adapter(model, 3, cache=cache)
    with pytest.raises(ValueError, match="exact=True applies to merged=True"):
        switch_adapter(model, "x", cache=cache, exact=True)
    with pytest.raises(ValueError, match=r"adapters \['default'\] are not installed in a slot"):
        adapter_slot_ids(model, ["x", "default"])
    assert _same(_state_of(state), before) and state.synced
    with mixed_batch(model, ["x", "y"]), pytest.raises(ValueError, match="gave 2 adapter ids"):
        model(torch.randn(3, DIM))


# ---------------------------------------------------------------------------------------------
# a step: no host synchronisation, nothing allocated by the ids' content
# ---------------------------------------------------------------------------------------------


class _Trace(TorchDispatchMode):
    """Every aten op run outside the kernel launchers, with its output shapes."""

    def __init__(self, inside):
        super().__init__()
        self.inside = inside
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.inside[0]:
            shapes = [tuple(t.shape) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
            self.ops.append((str(func), tuple(shapes)))
        return out


def test_a_step_neither_syncs_nor_allocates_by_content(served, monkeypatch):
    """Everything a step runs above the kernels (the layers, the state, the checks) reads no
    device value on the host, builds no tensor from host data, and runs the same ops with the
    same shapes whatever the ids; the kernel gets the state's own id buffers. On CPU the torch
    backend's kernel itself reads the ids (there are no graphs there); Triton's does not."""
    model, cache, _ = served
    state = serving_state(model)
    state.graph_safe = True
    inside = [False]
    unexpected = []
    seen_ids = []

    def kernel(fn):
        def run(*args, **kwargs):
            seen_ids.append(args[6].data_ptr())
            inside[0] = True
            try:
                return fn(*args, **kwargs)
            finally:
                inside[0] = False

        return run

    counting = [False]

    def counted(name, fn):
        def call(*args, **kwargs):
            if counting[0] and not inside[0]:
                unexpected.append(name)
            return fn(*args, **kwargs)

        return call

    ids_a = torch.tensor([0, 2, -1, 1], dtype=torch.int32)
    ids_b = torch.tensor([1, 1, 0, -1], dtype=torch.int32)
    multi = torch_multi.lora_linear_multi_fwd
    monkeypatch.setattr(torch_multi, "lora_linear_multi_fwd", kernel(multi))
    single = torch_linear.lora_linear_fwd
    monkeypatch.setattr(torch_linear, "lora_linear_fwd", counted("lora_linear", single))
    for name in ("tensor", "as_tensor", "from_numpy", "nonzero", "unique"):
        monkeypatch.setattr(torch, name, counted(f"torch.{name}", getattr(torch, name)))
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero", "cpu", "numpy"):
        method = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, counted(f"Tensor.{name}", method))

    x = torch.randn(4, 1, DIM)  # a decode step: one token per sequence

    def step():
        trace = _Trace(inside)
        counting[0] = True
        try:
            with torch.no_grad(), trace:
                model(x)
        finally:
            counting[0] = False
        return trace.ops

    traces = []
    with mixed_batch(model, ids_a):
        traces.append(step())
        buffer = state.row_ids.data_ptr()
    with mixed_batch(model, ids_b):
        traces.append(step())
    switch_adapter(model, "z", cache=cache)
    traces.append(step())
    switch_adapter(model, "x", cache=cache)
    traces.append(step())
    assert unexpected == []
    assert traces[0] == traces[1] and traces[2] == traces[3]
    forbidden = ("_local_scalar_dense", "nonzero", "lift_fresh", "_to_copy", "unique")
    assert not [op for t in traces for op, _ in t if any(f in op for f in forbidden)]
    assert set(seen_ids[: 2 * 6]) == {buffer}
    assert set(seen_ids[2 * 6 :]) == {state.active_ids.data_ptr()}
