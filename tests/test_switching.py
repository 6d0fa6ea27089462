"""Exact merge/unmerge (bit for bit after any number of switches), how far the arithmetic modes
drift, and switching a whole model between adapters: merged and unmerged, from a cache or from
the model's own adapters, back to base, and refusals that leave the model exactly as it was."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lora_kernels as lk
from lora_kernels import reference as R
from lora_kernels.backends.triton import HAS_TRITON, interpreting
from lora_kernels.models.model import LoraConfig, get_lora_model
from lora_kernels.serving.cache import AdapterCache
from lora_kernels.serving.exact_merge import ExactMergeRecord, exact_merge_, exact_unmerge_
from lora_kernels.serving.switch import release_adapters, switch_adapter
from tests.helpers import TinyBlocks
from tests.tolerances import assert_close_to_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_RUNS = HAS_TRITON and (DEVICE == "cuda" or interpreting())
HALF = [torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _one_thread():
    """These tests run many small ops; on a shared 2-core machine, intra-op threads only add
    contention (a [256, 256] clone goes from 10 us to 10 ms under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(bits(a), bits(b))


def trained_like(n, k, r, dtype, rho=0.05, w_std=0.02):
    """A weight ~ N(0, w_std) and an adapter whose delta is about ``rho`` of it elementwise."""
    w = (torch.randn(n, k, device=DEVICE) * w_std).to(dtype)
    a = torch.randn(r, k, device=DEVICE) / k**0.5
    b = torch.randn(n, r, device=DEVICE) / r**0.5
    scale = 2.0
    b = b * (rho * w_std / scale)
    return w, a.to(dtype), b.to(dtype), scale


def layer_with_adapters(n, k, ranks, dtype, rho=0.05, backend="auto"):
    layer = lk.FusedLoraLinear(k, n, r=0, dtype=dtype, device=DEVICE, backend=backend)
    with torch.no_grad():
        layer.weight.normal_(0, 0.02)
        for i, r in enumerate(ranks):
            name = f"ad{i}"
            layer.add_adapter(name, r, lora_alpha=2 * r, init_lora_weights=False)
            layer.lora_B[name].weight.normal_(0, rho * 0.02 / 2)
    return layer


# ---------------------------------------------------------------------------------------------
# exact merge / unmerge
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", HALF)
def test_exact_mode_is_bit_identical_after_many_switches(dtype):
    """120 switches among 3 adapters of ranks 4, 16 and 64, one of them large next to the
    weight (many elements change binade): the base comes back bit for bit every time."""
    layer = layer_with_adapters(96, 160, [4, 16, 64], dtype)
    with torch.no_grad():
        layer.lora_B["ad2"].weight.mul_(20)
    base = layer.weight.detach().clone()
    order = torch.randint(0, 3, (120,)).tolist()
    x = torch.randn(5, 160, device=DEVICE).to(dtype)
    for step, i in enumerate(order):
        name = f"ad{i}"
        layer.set_adapter(name)
        y_unmerged = layer(x)
        layer.merge(name, exact=True)
        assert not same_bits(layer.weight, base)
        if step % 40 == 0:
            # The merged forward is the same function as the unmerged one, within tolerance.
            ref = R.lora_linear(
                x.double(), base.double(), layer.bias.double(),
                layer.lora_A[name].weight.double(), layer.lora_B[name].weight.double(),
                layer.scaling[name],
            )  # fmt: skip
            assert_close_to_ref("merged forward", layer(x), ref, y_unmerged)
        layer.unmerge()
        assert same_bits(layer.weight, base), f"switch {step} ({name}) did not restore the base"
    assert not layer._exact_records


@pytest.mark.skipif(not TRITON_RUNS, reason="triton cannot run here")
@pytest.mark.parametrize("dtype", HALF)
def test_exact_mode_on_the_triton_backend(dtype):
    layer = layer_with_adapters(33, 70, [3, 17, 40], dtype, rho=0.3, backend="triton")
    base = layer.weight.detach().clone()
    for i in [0, 1, 2, 1, 0, 2]:
        layer.merge(f"ad{i}", exact=True)
        layer.unmerge()
        assert same_bits(layer.weight, base)


@pytest.mark.parametrize("dtype", [*HALF, torch.float32])
def test_exact_merge_gives_the_same_merged_weight_as_the_plain_merge(dtype):
    w, a, b, scale = trained_like(130, 70, 8, dtype, rho=0.5)
    plain = lk.merge_lora_(w.clone(), a, b, scale)
    exact = w.clone()
    record = exact_merge_(exact, a, b, scale)
    assert same_bits(exact, plain)
    assert isinstance(record, ExactMergeRecord) and record.num_recorded > 0
    exact_unmerge_(exact, a, b, scale, record)
    assert same_bits(exact, w)


def test_record_holds_only_the_elements_that_do_not_round_back():
    w, a, b, scale = trained_like(200, 256, 16, torch.bfloat16, rho=0.01)
    record = exact_merge_(w.clone(), a, b, scale)
    merged = lk.merge_lora_(w.clone(), a, b, scale)
    naive_back = lk.unmerge_lora_(merged.clone(), a, b, scale)
    wrong = (bits(naive_back) != bits(w)).sum().item()
    assert record.num_recorded == wrong > 0
    assert record.fraction == pytest.approx(wrong / w.numel())
    assert record.fraction < 0.05  # a ~1% delta: a small record
    assert record.nbytes == wrong * (4 + 2)  # int32 position + bf16 value
    assert not record.dense


def test_blocks_whose_record_outweighs_them_are_copied_whole(monkeypatch):
    """A delta far larger than the weight: most elements do not round back."""
    monkeypatch.setattr(
        "lora_kernels.serving.exact_merge.BLOCK_BYTES", 64 * 40 * 2
    )  # 64-row blocks
    w, a, b, scale = trained_like(150, 40, 4, torch.float16, rho=50.0)
    w_before = w.clone()
    record = exact_merge_(w, a, b, scale)
    assert record.block_rows == 64 and record.dense
    assert record.nbytes <= w.numel() * w.element_size()
    exact_unmerge_(w, a, b, scale, record)
    assert same_bits(w, w_before)


def test_exact_mode_on_a_transposed_weight():
    w, a, b, scale = trained_like(70, 50, 4, torch.bfloat16, rho=0.5)
    w_t = w.T.contiguous().T  # [70, 50] with column-major strides
    record = exact_merge_(w_t, a, b, scale)
    assert record.num_recorded > 0 and w_t.stride() == (1, 70)
    exact_unmerge_(w_t, a, b, scale, record)
    assert same_bits(w_t, w)


def test_the_trial_unmerge_runs_on_a_twin_of_the_block():
    """Same values, strides and pointer alignment modulo 256 bytes as the weight block, so a
    kernel specialised on alignment runs the same code on the trial and on the unmerge."""
    from lora_kernels.serving.exact_merge import _twin

    w = torch.randn(10, 7, device=DEVICE).to(torch.bfloat16)
    for start in range(5):
        block = w[start:]
        twin = _twin(block)
        assert same_bits(twin, block) and twin.stride() == block.stride()
        assert (twin.data_ptr() - block.data_ptr()) % 256 == 0
        assert twin.data_ptr() != block.data_ptr()


def test_zero_adapter_needs_no_record():
    w, a, b, scale = trained_like(20, 30, 4, torch.bfloat16)
    record = exact_merge_(w.clone(), a, torch.zeros_like(b), scale)
    assert record.num_recorded == 0 and record.nbytes == 0


def test_stacked_exact_merges_unmerge_in_reverse_order():
    layer = layer_with_adapters(48, 64, [4, 8], torch.bfloat16, rho=0.5)
    base = layer.weight.detach().clone()
    layer.merge("ad0", exact=True)
    layer.merge("ad1", exact=True)
    assert layer.merged_adapters == ["ad0", "ad1"]
    layer.unmerge()
    assert same_bits(layer.weight, base)


def test_exact_unmerge_refuses_when_the_adapter_changed():
    layer = layer_with_adapters(32, 48, [4], torch.bfloat16, rho=0.5)
    layer.merge("ad0", exact=True)
    merged = layer.weight.detach().clone()
    with torch.no_grad():
        layer.lora_B["ad0"].weight[3, 1] += 0.5
    with pytest.raises(ValueError, match="changed since the merge"):
        layer.unmerge()
    assert same_bits(layer.weight, merged) and layer.merged_adapters == ["ad0"]


def test_exact_unmerge_checks_its_arguments():
    w, a, b, scale = trained_like(20, 30, 4, torch.bfloat16)
    record = exact_merge_(w, a, b, scale)
    merged = w.clone()
    with pytest.raises(ValueError, match="made with scale 2.0, got 3.0"):
        exact_unmerge_(w, a, b, 3.0, record)
    with pytest.raises(ValueError, match=r"record is for a weight of shape \[20, 30\]"):
        exact_unmerge_(w[:10], a, b[:10], scale, record)
    with pytest.raises(TypeError, match="ExactMergeRecord"):
        exact_unmerge_(w, a, b, scale, object())
    assert same_bits(w, merged)


def _switch_many(mode, w0, adapters, switches):
    w = w0.clone()
    for i in range(switches):
        a, b, scale = adapters[i % len(adapters)]
        if mode == "naive":  # PEFT: the delta rounded to the weight's dtype, added, subtracted
            delta = (b @ a) * scale
            w += delta
            w -= delta
        elif mode == "arithmetic":
            lk.merge_lora_(w, a, b, scale)
            lk.unmerge_lora_(w, a, b, scale)
        else:
            record = exact_merge_(w, a, b, scale)
            exact_unmerge_(w, a, b, scale, record)
    return w


@pytest.mark.slow
@pytest.mark.parametrize("dtype", HALF)
def test_drift_after_1000_switches(dtype):
    """1000 merge+unmerge pairs among 3 adapters (deltas ~5% of the weight): the exact mode
    does not move the base at all; single-rounding arithmetic drifts, less than PEFT's naive
    add/subtract. (benchmarks/bench_switch.py prints the same table for a whole model.)"""
    w0 = (torch.randn(96, 96, device=DEVICE) * 0.02).to(dtype)
    adapters = []
    for r in (4, 8, 16):
        _, a, b, scale = trained_like(96, 96, r, dtype, rho=0.05)
        adapters.append((a, b, scale))
    drift = {}
    for mode in ("naive", "arithmetic", "exact"):
        w = _switch_many(mode, w0, adapters, 1000)
        rms = (w.double() - w0.double()).pow(2).mean().sqrt() / w0.double().pow(2).mean().sqrt()
        changed = (bits(w) != bits(w0)).double().mean().item()
        drift[mode] = (rms.item(), changed)
    assert drift["exact"] == (0.0, 0.0)
    assert drift["arithmetic"][1] > 0.005, drift  # the drift the exact mode exists to avoid
    assert drift["arithmetic"][0] < drift["naive"][0], drift


# ---------------------------------------------------------------------------------------------
# switching a model
# ---------------------------------------------------------------------------------------------


TARGETS = ["q", "up", "down"]


def tiny_model(dtype=torch.bfloat16):
    model = TinyBlocks().to(DEVICE, dtype)
    return get_lora_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))


def random_adapter(model, r, alpha, targets=TARGETS, rho=0.2, dtype=torch.float32):
    """A PEFT-keyed state dict for ``model``'s FusedLoraLinear layers named in ``targets``."""
    sd = {}
    for path, m in model.named_modules():
        if isinstance(m, lk.FusedLoraLinear) and path.rsplit(".", 1)[-1] in targets:
            a = torch.randn(r, m.in_features) / m.in_features**0.5
            b = torch.randn(m.out_features, r) * rho * 0.2 / (alpha / r)
            sd[f"base_model.model.{path}.lora_A.weight"] = a.to(dtype)
            sd[f"base_model.model.{path}.lora_B.weight"] = b.to(dtype)
    return sd, LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets))


def snapshot(model):
    """Every weight's bits, every layer's active and merged adapters and installed names."""
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    layers = {
        p: (m.active_adapter, list(m.merged_adapters), tuple(m.adapter_names))
        for p, m in model.named_modules()
        if isinstance(m, lk.FusedLoraLinear)
    }
    return weights, layers


def assert_unchanged(model, snap):
    weights, layers = snapshot(model)
    assert weights.keys() == snap[0].keys()
    for name, w in weights.items():
        assert same_bits(w, snap[0][name]), f"{name} changed"
    assert layers == snap[1]


def assert_base_weights_unchanged(model, snap):
    weights = snapshot(model)[0]
    for name, w in snap[0].items():
        assert same_bits(weights[name], w), f"{name} changed"


def as_base(snap):
    """``snap`` with every layer running no adapter (what a switch to the base leaves)."""
    return snap[0], {p: (None, [], names) for p, (_, _, names) in snap[1].items()}


@pytest.fixture
def cached():
    """A model and a cache of three adapters (ranks 2, 8, 16; the last targets 'up' only)."""
    model = tiny_model()
    cache = AdapterCache(1 << 20)
    for name, r, targets in (("x", 2, TARGETS), ("y", 8, TARGETS), ("z", 16, ["up"])):
        sd, config = random_adapter(model, r, 2 * r, targets)
        cache.put(name, sd, config)
    return model, cache


def _unmerged_outputs(model, cache, x):
    out = {}
    for name in ("x", "y", "z", None):
        switch_adapter(model, name, cache=cache)
        out[name] = model(x)
    return out


@pytest.mark.parametrize("use_slots", [False, True])
def test_switch_between_cached_adapters_merged_and_unmerged(cached, use_slots):
    model, cache = cached
    if use_slots:
        cache.attach(model, num_slots=2, max_rank=16)
    base = snapshot(model)
    x = torch.randn(3, 24, device=DEVICE).to(torch.bfloat16)
    unmerged = _unmerged_outputs(model, cache, x)
    # Unmerged switches touch no base weight; the base model runs no adapter.
    assert_base_weights_unchanged(model, base)
    assert all(v[0] is None for v in snapshot(model)[1].values())
    assert not torch.equal(unmerged["x"], unmerged["y"])

    for step, name in enumerate(["x", "y", "z", "y", "x", None, "z", "x"]):
        exact = step % 2 == 0
        switch_adapter(model, name, cache=cache, merged=True, exact=exact)
        layers = [m for m in model.modules() if isinstance(m, lk.FusedLoraLinear)]
        if name is None:
            assert all(m.active_adapter is None and not m.merged for m in layers)
            continue
        targeted = [m for m in layers if name in m.lora_A]
        assert targeted and all(m.merged_adapters == [name] for m in targeted)
        assert all(m.active_adapter is None and not m.merged for m in layers if m not in targeted)
        ref = unmerged[name].double()
        assert_close_to_ref(f"merged {name}", model(x), ref, unmerged[name])
        assert model.active_lora_adapter == name and name in model.lora_configs
    switch_adapter(model, None, cache=cache, merged=True)
    release_adapters(model)
    assert "x" not in model.lora_configs
    # Half of the merged switches were arithmetic: the names are back, the bits need not be.
    assert snapshot(model)[1] == as_base(base)[1]


def test_exact_switches_restore_the_whole_model_bit_for_bit(cached):
    model, cache = cached
    base = snapshot(model)
    for name in ["x", "z", "y", "x", "y", "z"] * 20:
        switch_adapter(model, name, cache=cache, merged=True, exact=True)
    switch_adapter(model, None)
    release_adapters(model)
    assert_unchanged(model, as_base(base))


def test_installed_adapters_stay_and_switching_back_copies_nothing(cached):
    model, cache = cached
    layer = model.blocks[0]["up"]
    for name in ("x", "y", "z"):
        switch_adapter(model, name, cache=cache)
    modules = {n: layer.lora_A[n] for n in ("x", "y", "z")}
    moved = cache.stats.bytes_to_device
    for name in ("x", "z", "y", "x"):
        switch_adapter(model, name, cache=cache, merged=name == "z")
        assert layer.active_adapter == name
    assert cache.stats.bytes_to_device == moved
    assert all(layer.lora_A[n] is m for n, m in modules.items())
    # An adapter replaced in the cache is installed again on the next switch to it.
    sd, config = random_adapter(model, 3, 3)
    cache.put("x", sd, config)
    switch_adapter(model, "x", cache=cache)
    assert layer.lora_A["x"] is not modules["x"] and layer.r["x"] == 3


def test_attaching_slots_turns_installed_copies_into_slot_views(cached):
    model, cache = cached
    switch_adapter(model, "x", cache=cache)
    cache.attach(model, num_slots=2, max_rank=16)
    switch_adapter(model, "x", cache=cache)
    slot = cache.slot_owners().index("x")
    view = cache.slot_tensors("blocks.0.q").lora_a[slot]
    assert model.blocks[0]["q"].lora_A["x"].weight.data_ptr() == view.data_ptr()
    assert cache._pool.refs[slot] == 1


def test_at_most_max_installed_copies_stay(cached, monkeypatch):
    model, cache = cached
    monkeypatch.setattr("lora_kernels.serving.cache.MAX_INSTALLED", 2)
    for name in ("x", "y", "z"):
        switch_adapter(model, name, cache=cache)
    assert model.blocks[0]["up"].adapter_names == ["default", "y", "z"]  # x went first
    switch_adapter(model, "y", cache=cache)
    switch_adapter(model, "x", cache=cache)
    assert model.blocks[0]["up"].adapter_names == ["default", "y", "x"]


def test_one_slot_is_enough_to_switch(cached):
    """Inactive installs give their slot back when another adapter needs it."""
    model, cache = cached
    cache.attach(model, num_slots=1, max_rank=16)
    for name in ("x", "y", "z", "x"):
        switch_adapter(model, name, cache=cache, merged=True, exact=True)
        assert cache.slot_owners() == [name]
        assert model.blocks[0]["up"].adapter_names == ["default", name]
    before = snapshot(model)
    with cache.use_slot("x"), pytest.raises(RuntimeError, match="held elsewhere"):
        switch_adapter(model, "y", cache=cache)
    assert_unchanged(model, before)
    switch_adapter(model, None)
    release_adapters(model)
    assert cache._pool.refs == [0]


def test_a_copied_model_keeps_its_adapters_as_plain_ones(cached):
    model, cache = cached
    switch_adapter(model, "y", cache=cache)
    twin = copy.deepcopy(model)
    assert twin.blocks[0]["q"].adapter_names == ["default", "y"]
    with pytest.raises(ValueError, match="already have an adapter named 'y'"):
        switch_adapter(twin, "y", cache=cache)
    switch_adapter(twin, "y")  # its own adapter now
    with pytest.raises(ValueError, match="merged with an installed adapter"):
        switch_adapter(model, "y", cache=cache, merged=True)
        release_adapters(model)


def test_switch_among_the_models_own_adapters_without_a_cache():
    model = tiny_model()
    get_lora_model(model, LoraConfig(r=8, lora_alpha=4, target_modules=["q"]), "second")
    for m in model.modules():
        if isinstance(m, lk.FusedLoraLinear):
            for name in m.adapter_names:
                nn.init.normal_(m.lora_B[name].weight, std=0.05)
    x = torch.randn(4, 24, device=DEVICE).to(torch.bfloat16)
    base = snapshot(model)
    switch_adapter(model, "second")
    y_second = model(x)
    switch_adapter(model, "default", merged=True, exact=True)
    switch_adapter(model, "second", merged=True)
    assert_close_to_ref("merged second", model(x), y_second.double(), y_second)
    q = model.blocks[0]["q"]
    assert q.merged_adapters == ["second"] and model.blocks[0]["up"].active_adapter is None
    switch_adapter(model, "__base__")
    assert snapshot(model)[1] == as_base(base)[1]
    with pytest.raises(ValueError, match=r"no layer of the model has adapter 'nope'"):
        switch_adapter(model, "nope")


def test_unmerged_switch_between_slot_resident_adapters_copies_nothing(cached):
    model, cache = cached
    cache.attach(model, num_slots=3, max_rank=16)
    for name in ("x", "y", "z"):
        cache.prefetch(name)
    moved = cache.stats.bytes_to_device
    for name in ("x", "y", "z", "x"):
        switch_adapter(model, name, cache=cache)
        pa = cache.slot_tensors("blocks.0.up").lora_a
        slot = cache.slot_owners().index(name)
        layer = model.blocks[0]["up"]
        assert layer.lora_A[name].weight.data_ptr() == pa[slot].data_ptr()
    assert cache.stats.bytes_to_device == moved


# ---------------------------------------------------------------------------------------------
# atomicity: a refused switch changes nothing
# ---------------------------------------------------------------------------------------------


def _bad_adapters(model):
    good, config = random_adapter(model, 4, 8)
    wrong_shape = dict(good)
    key = "base_model.model.blocks.1.down.lora_B.weight"
    wrong_shape[key] = torch.randn(23, 4)  # out_features is 24
    missing_module = dict(good)
    missing_module["base_model.model.blocks.1.gate.lora_A.weight"] = torch.randn(4, 24)
    missing_module["base_model.model.blocks.1.gate.lora_B.weight"] = torch.randn(24, 4)
    plain_linear = dict(good)
    plain_linear["base_model.model.head.lora_A.weight"] = torch.randn(4, 24)
    plain_linear["base_model.model.head.lora_B.weight"] = torch.randn(10, 4)
    big_rank, big_config = random_adapter(model, 32, 32)
    return [
        ("wrong_shape", wrong_shape, config, r"blocks.1.down: expected lora_A \[4, 40\] and "
         r"lora_B \[24, 4\], got \[4, 40\] and \[23, 4\]"),
        ("missing_module", missing_module, config, "blocks.1.gate: the model has no "
         "FusedLoraLinear there"),
        ("plain_linear", plain_linear, config, "head: the model has no FusedLoraLinear there"),
        ("big_rank", big_rank, big_config, "rank 32 > the slots' max_rank 16"),
    ]  # fmt: skip


@pytest.mark.parametrize("start", ["base", "unmerged", "merged", "exact"])
@pytest.mark.parametrize("bad", ["wrong_shape", "missing_module", "plain_linear", "big_rank"])
def test_a_refused_switch_leaves_the_model_exactly_as_it_was(cached, start, bad):
    model, cache = cached
    cache.attach(model, num_slots=2, max_rank=16)
    _, tensors, config, message = next(c for c in _bad_adapters(model) if c[0] == bad)
    cache.put("bad", tensors, config)
    if start != "base":
        switch_adapter(model, "y", cache=cache, merged=start != "unmerged", exact=start == "exact")
    before = snapshot(model)
    holds = list(cache._pool.refs)
    with pytest.raises(ValueError, match=message):
        switch_adapter(model, "bad", cache=cache, merged=True, exact=True)
    assert_unchanged(model, before)
    assert cache._pool.refs == holds
    # ... and the model still switches afterwards.
    switch_adapter(model, "x", cache=cache, merged=True)
    switch_adapter(model, None)


def test_a_switch_that_cannot_unmerge_exactly_is_refused_first(cached):
    model, cache = cached
    switch_adapter(model, "y", cache=cache, merged=True, exact=True)
    with torch.no_grad():
        model.blocks[1]["q"].lora_A["y"].weight[0, 0] += 1.0
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"blocks.1.q: .*changed since the merge"):
        switch_adapter(model, "x", cache=cache)
    assert_unchanged(model, before)


def test_switch_argument_errors(cached):
    model, cache = cached
    with pytest.raises(ValueError, match="exact=True applies to merged=True"):
        switch_adapter(model, "x", cache=cache, exact=True)
    with pytest.raises(ValueError, match="no FusedLoraLinear layers"):
        switch_adapter(nn.Linear(3, 3), None)
    with pytest.raises(KeyError, match="'nope' is not cached"):
        switch_adapter(model, "nope", cache=cache)
    switch_adapter(model, "x", cache=cache)
    with pytest.raises(ValueError, match="installed from a cache; pass cache="):
        switch_adapter(model, "x")
    model.blocks[0]["q"].add_adapter("y", 2, 2)
    with pytest.raises(ValueError, match="already have an adapter named 'y'"):
        switch_adapter(model, "y", cache=cache)


# ---------------------------------------------------------------------------------------------
# arithmetic merged switches swap adapters in one pass
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", HALF)
def test_swap_merged_is_one_rounding_of_the_new_merge(dtype):
    layer = layer_with_adapters(96, 80, [4, 16], dtype)
    w0 = layer.weight.detach().clone()
    layer.merge("ad0")
    layer.swap_merged("ad1")
    assert layer.merged_adapters == ["ad1"] and layer.active_adapter == "ad1"
    # One rounding of (W0 merged with ad0) + d1 - d0, computed in fp32.
    w_ad0 = R.merge_lora(w0, layer.lora_A["ad0"].weight, layer.lora_B["ad0"].weight, 2.0)
    d = (
        layer.scaling["ad1"]
        * layer.lora_B["ad1"].weight.double()
        @ layer.lora_A["ad1"].weight.double()
        - layer.scaling["ad0"]
        * layer.lora_B["ad0"].weight.double()
        @ layer.lora_A["ad0"].weight.double()
    )
    exact = w_ad0.double() + d
    ulp = exact.to(dtype).double().abs() * torch.finfo(dtype).eps + torch.finfo(dtype).tiny
    assert ((layer.weight.double() - exact).abs() <= 0.5 * ulp + 1e-6 * exact.abs()).all()
    # And the layer computes what the unmerged new adapter computes.
    x = torch.randn(5, 80, device=DEVICE, dtype=dtype)
    merged_out = layer(x)
    layer.unmerge()
    layer.set_adapter("ad1")
    assert_close_to_ref("swapped", merged_out, layer(x).double(), layer(x))


def test_swap_merged_refuses_exact_merges_and_leaves_the_weight():
    layer = layer_with_adapters(32, 24, [2, 3], torch.bfloat16)
    layer.merge("ad0", exact=True)
    before = layer.weight.detach().clone()
    with pytest.raises(RuntimeError, match="exactly one adapter merged with exact=False"):
        layer.swap_merged("ad1")
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        layer.swap_merged("nope")
    assert same_bits(layer.weight.detach(), before) and layer.merged_adapters == ["ad0"]


def test_arithmetic_merged_switch_makes_one_pass_per_layer(monkeypatch):
    import lora_kernels.layers.base as lk_base
    import lora_kernels.layers.linear as lk_nn

    model = nn.Sequential(nn.Linear(40, 48), nn.ReLU(), nn.Linear(48, 16)).to(DEVICE)
    model = get_lora_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"]), "a")
    get_lora_model(model, LoraConfig(r=8, lora_alpha=8, target_modules=["0", "2"]), "b")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, lk.FusedLoraLinear):
                for name in ("a", "b"):
                    m.lora_B[name].weight.normal_(0, 0.1)
    x = torch.randn(3, 40, device=DEVICE)
    unmerged = {}
    for name in ("a", "b"):
        switch_adapter(model, name)
        unmerged[name] = model(x)
    switch_adapter(model, "a", merged=True)
    calls = []
    # every pass over a layer's weight is a merge_lora_ call (an unmerge is one with -scale)
    for module in (lk_nn, lk_base):
        real = module.merge_lora_
        counted = lambda *a, _f=real, **k: calls.append("merge_lora_") or _f(*a, **k)
        monkeypatch.setattr(module, "merge_lora_", counted)
    for step in range(6):
        name = "ab"[(step + 1) % 2]
        switch_adapter(model, name, merged=True)
        torch.testing.assert_close(model(x), unmerged[name], atol=1e-4, rtol=1e-4)
    assert calls == ["merge_lora_"] * (6 * 2)  # one merge per layer per switch, no unmerge
