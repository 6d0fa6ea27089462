"""AdapterCache: capacity and LRU eviction, adapters in use never evicted, hits/misses and the
other statistics, loading what PEFT's save_pretrained writes, device slots (reuse, in-place
refills, the multi-adapter kernel on them) and concurrent use from threads."""

from __future__ import annotations

import copy
import random
import threading

import pytest
import torch
from torch import nn

import lora_kernels as lk
from lora_kernels import reference as R
from lora_kernels.models.model import LoraConfig, get_lora_model
from lora_kernels.serving.cache import AdapterCache
from lora_kernels.serving.switch import switch_adapter
from tests.helpers import TinyBlocks

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DIM, HIDDEN = 24, 40
TARGETS = ["q", "up", "down"]


@pytest.fixture(autouse=True)
def _one_thread():
    """Many small ops: on a shared 2-core machine intra-op threads only add contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def Tiny() -> nn.Module:  # noqa: N802 - reads as the model class it builds
    return TinyBlocks(DIM, HIDDEN)


def shapes():
    """(module path, in, out) of every targeted linear of Tiny."""
    dims = {"q": (DIM, DIM), "up": (DIM, HIDDEN), "down": (HIDDEN, DIM)}
    return [(f"blocks.{i}.{t}", *dims[t]) for i in range(2) for t in TARGETS]


def state_dict(r, targets=TARGETS, dtype=torch.float32):
    sd = {}
    for path, k, n in shapes():
        if path.rsplit(".", 1)[-1] in targets:
            sd[f"base_model.model.{path}.lora_A.weight"] = torch.randn(r, k, dtype=dtype)
            sd[f"base_model.model.{path}.lora_B.weight"] = torch.randn(n, r, dtype=dtype)
    return sd


def nbytes_of(sd, dtype=None):
    return sum(t.numel() * (dtype or t.dtype).itemsize for t in sd.values())


def config(r, alpha=None, targets=TARGETS):
    return LoraConfig(r=r, lora_alpha=alpha or 2 * r, target_modules=list(targets))


# ---------------------------------------------------------------------------------------------
# RAM tier
# ---------------------------------------------------------------------------------------------


def test_put_copies_and_keys_by_module_path():
    sd = state_dict(4)
    cache = AdapterCache(1 << 20, dtype=torch.bfloat16)
    adapter = cache.put("a", sd, config(4, 12))
    assert adapter.nbytes == nbytes_of(sd, torch.bfloat16) == cache.nbytes
    lay = adapter.layers["blocks.1.up"]
    assert lay.r == 4 and lay.scaling == 3.0 and lay.lora_alpha == 12
    assert lay.lora_a.dtype == torch.bfloat16
    assert torch.equal(lay.lora_a, sd["base_model.model.blocks.1.up.lora_A.weight"].bfloat16())
    before = lay.lora_a.clone()
    sd["base_model.model.blocks.1.up.lora_A.weight"].add_(1)
    assert torch.equal(lay.lora_a, before)  # the cache owns a copy
    assert lay.lora_a.is_pinned() == cache.pin_memory == torch.cuda.is_available()
    # A PEFT model's own state-dict spelling works too.
    own = {
        k.removeprefix("base_model.model.").replace(".weight", ".x.weight"): v
        for k, v in sd.items()
    }
    assert cache.put("b", own, config(4)).layers.keys() == adapter.layers.keys()


def test_put_refuses_what_it_cannot_hold_and_changes_nothing():
    cache = AdapterCache(1 << 20)
    cache.put("keep", state_dict(2), config(2))
    stats, names = cache.stats, cache.names()
    bad = state_dict(4)
    bad["base_model.model.blocks.0.q.bias"] = torch.zeros(DIM)
    with pytest.raises(ValueError, match=r"'base_model.model.blocks.0.q.bias' is not a LoRA A/B"):
        cache.put("x", bad, config(4))
    bad = state_dict(4)
    del bad["base_model.model.blocks.0.q.lora_B.weight"]
    with pytest.raises(ValueError, match=r"blocks.0.q: has \['lora_A'\] but needs both"):
        cache.put("x", bad, config(4))
    with pytest.raises(ValueError, match="the config gives rank 8, the tensors rank 4"):
        cache.put("x", state_dict(4), config(8))
    with pytest.raises(ValueError, match="use_dora"):
        cache.put("x", state_dict(4), {"r": 4, "lora_alpha": 8, "use_dora": True})
    with pytest.raises(ValueError, match="non-empty str without '.'"):
        cache.put("a.b", state_dict(4), config(4))
    with pytest.raises(ValueError, match=r"takes 0.0 MiB, more than the cache's capacity"):
        AdapterCache(100).put("x", state_dict(4), config(4))
    assert cache.names() == names and cache.stats == stats


def test_capacity_and_lru_eviction():
    size = nbytes_of(state_dict(4))
    cache = AdapterCache(3 * size + size // 2)
    for name in "abc":
        cache.put(name, state_dict(4), config(4))
    assert cache.names() == ["a", "b", "c"]
    cache.get("a")  # now the most recently used
    cache.put("d", state_dict(4), config(4))
    assert cache.names() == ["c", "a", "d"] and cache.stats.evictions == 1
    cache.put("e", state_dict(8), config(8))  # twice the size: two go
    assert cache.names() == ["d", "e"] and cache.stats.evictions == 3
    assert cache.nbytes <= cache.capacity_bytes
    cache.evict("d")
    assert cache.names() == ["e"] and cache.nbytes == 2 * size


def test_adapters_in_use_are_never_evicted():
    size = nbytes_of(state_dict(4))
    cache = AdapterCache(2 * size)
    cache.put("a", state_dict(4), config(4))
    cache.put("b", state_dict(4), config(4))
    with cache.use("a") as held:
        assert held is cache.get("a")
        cache.get("b")
        cache.put("c", state_dict(4), config(4))  # evicts b (least recently used not in use)...
        assert cache.names() == ["a", "c"]
        with cache.use("c"):
            # ... and now nothing can go.
            with pytest.raises(RuntimeError, match="no room for adapter 'd'"):
                cache.put("d", state_dict(4), config(4))
            with pytest.raises(RuntimeError, match="'a' is in use"):
                cache.evict("a")
            with pytest.raises(RuntimeError, match="'c' is in use and cannot be replaced"):
                cache.put("c", state_dict(4), config(4))
        assert cache.names() == ["a", "c"]
    cache.put("d", state_dict(4), config(4))
    assert cache.names() == ["c", "d"]


def test_hits_misses_and_unknown_names():
    cache = AdapterCache(1 << 20)
    cache.put("a", state_dict(2), config(2))
    cache.get("a")
    with cache.use("a"):
        pass
    with pytest.raises(KeyError, match="'zz' is not cached and has no directory"):
        cache.get("zz")
    stats = cache.stats
    assert (stats.hits, stats.misses, stats.disk_reads) == (2, 1, 0)


# ---------------------------------------------------------------------------------------------
# PEFT directories
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def peft_dir(tmp_path_factory):
    """A directory written by PEFT's save_pretrained (rank/alpha patterns, rsLoRA), the PEFT
    model that wrote it, and the base weights it was made from."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(1)
    base = Tiny()
    base_state = copy.deepcopy(base.state_dict())
    cfg = peft.LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=TARGETS,
        rank_pattern={"up": 4},
        alpha_pattern={"down": 3},
        use_rslora=True,
        init_lora_weights=False,
    )
    peft_model = peft.get_peft_model(base, cfg)
    path = tmp_path_factory.mktemp("adapters") / "sql"
    peft_model.save_pretrained(path)
    return path, peft_model, base_state


def test_load_a_peft_saved_adapter(peft_dir):
    path, peft_model, _ = peft_dir
    cache = AdapterCache(1 << 20)
    cache.load("sql", path)
    adapter = cache.get("sql")
    assert adapter.source == str(path)
    peft_layers = {
        n.removeprefix("base_model.model."): m
        for n, m in peft_model.named_modules()
        if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})
    }
    assert adapter.layers.keys() == peft_layers.keys()
    for path_, lay in adapter.layers.items():
        m = peft_layers[path_]
        assert torch.equal(lay.lora_a, m.lora_A["default"].weight)
        assert torch.equal(lay.lora_b, m.lora_B["default"].weight)
        assert lay.scaling == pytest.approx(m.scaling["default"], rel=1e-12)
    assert adapter.layers["blocks.0.up"].r == 4
    stats = cache.stats
    assert (stats.disk_reads, stats.bytes_read) == (1, adapter.nbytes)


def test_a_switched_model_computes_what_peft_computes(peft_dir):
    path, peft_model, base_state = peft_dir
    model = Tiny()
    model.load_state_dict(base_state)
    get_lora_model(model, LoraConfig(r=2, target_modules=TARGETS))
    cache = AdapterCache(1 << 20)
    cache.load("sql", path)
    x = torch.randn(5, DIM)
    with torch.no_grad():
        expect = peft_model(x)
        switch_adapter(model, "sql", cache=cache)
        torch.testing.assert_close(model(x), expect, rtol=1e-5, atol=1e-5)
        switch_adapter(model, "sql", cache=cache, merged=True)
        torch.testing.assert_close(model(x), expect, rtol=1e-5, atol=1e-5)


def test_evicted_adapters_come_back_from_disk(peft_dir):
    path = peft_dir[0]
    cache = AdapterCache(1 << 20)
    cache.load("sql", path, lazy=True)
    assert "sql" not in cache and cache.stats.disk_reads == 0
    first = cache.get("sql")  # a miss: read now
    cache.evict("sql")
    again = cache.get("sql")  # a miss again
    cache.get("sql")  # a hit
    assert again is not first
    assert torch.equal(again.layers["blocks.1.q"].lora_a, first.layers["blocks.1.q"].lora_a)
    stats = cache.stats
    assert (stats.hits, stats.misses, stats.disk_reads) == (1, 2, 2)
    with pytest.raises(FileNotFoundError, match="expected path to be an adapter directory"):
        cache.load("x", path / "nope")


# ---------------------------------------------------------------------------------------------
# device slots
# ---------------------------------------------------------------------------------------------


def lora_model(dtype=torch.float32):
    model = Tiny().to(DEVICE, dtype)
    return get_lora_model(model, LoraConfig(r=2, target_modules=TARGETS))


def test_slots_are_filled_in_place_and_reused_lru():
    model = lora_model()
    cache = AdapterCache(1 << 20)
    for name, r in (("a", 2), ("b", 8), ("c", 16), ("d", 4)):
        cache.put(name, state_dict(r, TARGETS if name != "d" else ["up"]), config(r))
    cache.attach(model, num_slots=2, max_rank=16)
    tensors = cache.slot_tensors("blocks.0.up")
    ptrs = [t.data_ptr() for t in tensors]
    assert tensors.lora_a.shape == (2, 16, DIM) and tensors.lora_b.shape == (2, HIDDEN, 16)

    assert cache.prefetch("a") == 0 and cache.prefetch("b") == 1
    assert cache.prefetch("a") == 0  # a hit; b is now the least recently used
    assert cache.prefetch("c") == 1 and cache.slot_owners() == ["a", "c"]
    with cache.use_slot("c") as slot_c:
        assert slot_c == 1
        assert cache.prefetch("d") == 0  # a is taken, c is held
        with cache.use_slot("d"), pytest.raises(RuntimeError, match="all 2 slots are in use"):
            cache.prefetch("a")
        # d targets "up" only: the other layers' slot 0 are zero, with rank and scale 0.
        q = cache.slot_tensors("blocks.0.q")
        assert not q.lora_a[0].any() and not q.lora_b[0].any()
        assert q.scales[0] == 0 and q.ranks[0] == 0
    up = cache.slot_tensors("blocks.0.up")
    d = cache.get("d").layers["blocks.0.up"]
    assert torch.equal(up.lora_a[0, :4], d.lora_a) and not up.lora_a[0, 4:].any()
    assert torch.equal(up.lora_b[0, :, :4], d.lora_b) and not up.lora_b[0, :, 4:].any()
    assert up.scales[0].item() == d.scaling and up.ranks[0].item() == 4
    assert [t.data_ptr() for t in cache.slot_tensors("blocks.0.up")] == ptrs
    stats = cache.stats
    assert (stats.slot_hits, stats.slot_misses, stats.slot_evictions) == (3, 4, 2)
    expected = sum(nbytes_of(state_dict(r, t)) for r, t in ((2, TARGETS), (8, TARGETS),
                   (16, TARGETS), (4, ["up"])))  # fmt: skip
    assert stats.bytes_to_device == expected


def test_multi_adapter_kernel_runs_on_the_slots():
    model = lora_model()
    cache = AdapterCache(1 << 20)
    for name, r in (("a", 3), ("b", 8)):
        cache.put(name, state_dict(r), config(r, alpha=5))
    cache.attach(model, num_slots=3, max_rank=8)
    slots = [cache.prefetch("a"), cache.prefetch("b")]
    layer = model.blocks[1]["down"]
    t = cache.slot_tensors("blocks.1.down")
    x = torch.randn(4, HIDDEN, device=DEVICE)
    ids = torch.tensor([slots[1], -1, slots[0], slots[1]], device=DEVICE)
    y = lk.lora_linear_multi(x, layer.weight, layer.bias, t.lora_a, t.lora_b, t.scales, ids,
                             ranks=t.ranks)  # fmt: skip
    for row, name in zip(range(4), ["b", None, "a", "b"], strict=True):
        if name is None:
            expect = R.lora_linear(x[row], layer.weight, layer.bias, t.lora_a[0, :1] * 0,
                                   t.lora_b[0, :, :1], 0.0)  # fmt: skip
        else:
            lay = cache.get(name).layers["blocks.1.down"]
            expect = R.lora_linear(x[row], layer.weight, layer.bias, lay.lora_a, lay.lora_b,
                                   lay.scaling)  # fmt: skip
        torch.testing.assert_close(y[row], expect, rtol=1e-5, atol=1e-5)


def test_attach_and_prefetch_errors():
    model = lora_model()
    cache = AdapterCache(1 << 20)
    cache.put("big", state_dict(32), config(32))
    with pytest.raises(RuntimeError, match="no model attached"):
        cache.slot_tensors("blocks.0.q")
    assert cache.prefetch("big") is None  # no pool: only RAM
    with pytest.raises(ValueError, match="no FusedLoraLinear layers"):
        cache.attach(nn.Linear(2, 2), num_slots=1)
    with pytest.raises(ValueError, match="expected num_slots to be a positive int"):
        cache.attach(model, num_slots=0)
    cache.attach(model, num_slots=1, max_rank=16)
    with pytest.raises(ValueError, match="rank 32 > the slots' max_rank 16"):
        cache.prefetch("big")
    assert cache.slot_owners() == [None]


# ---------------------------------------------------------------------------------------------
# threads
# ---------------------------------------------------------------------------------------------


def test_concurrent_get_put_use_and_slots_from_threads():
    """Four threads put, get, hold, evict and fill slots at random. Nothing held is evicted or
    refilled under its holder, the byte count stays exact and within capacity, and every
    lookup is counted once."""
    model = lora_model()
    sizes = {f"n{i}": 2 + 2 * (i % 3) for i in range(6)}
    sds = {name: state_dict(r) for name, r in sizes.items()}
    cap = 3 * nbytes_of(sds["n5"])
    cache = AdapterCache(cap)
    cache.attach(model, num_slots=3, max_rank=8)
    lookups = [0] * 4
    failures = []

    def worker(tid):
        rng = random.Random(tid)
        for _ in range(150):
            name = rng.choice(list(sizes))
            op = rng.random()
            try:
                if op < 0.3:
                    cache.put(name, sds[name], config(sizes[name]))
                elif op < 0.55:
                    lookups[tid] += 1
                    with cache.use(name) as adapter:
                        assert name in cache  # held: cannot have been evicted
                        assert adapter.name == name
                elif op < 0.75:
                    lookups[tid] += 1
                    with cache.use_slot(name) as slot:
                        key = "base_model.model.blocks.0.up.lora_A.weight"
                        a = cache.slot_tensors("blocks.0.up").lora_a[slot, : sizes[name]]
                        assert cache.slot_owners()[slot] == name
                        assert torch.equal(a, sds[name][key])
                elif op < 0.85:
                    cache.evict(name)
                else:
                    lookups[tid] += 1
                    cache.get(name)
            except (KeyError, RuntimeError):
                pass  # not cached / evicted, or all room or slots held by other threads
            except Exception as e:  # noqa: BLE001 - report anything else from the thread
                failures.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures
    stats = cache.stats
    assert stats.hits + stats.misses == sum(lookups)
    assert min(stats.hits, stats.evictions, stats.slot_hits, stats.slot_evictions) > 0, stats
    entries = cache._entries
    assert cache.nbytes == sum(e.adapter.nbytes for e in entries.values()) <= cap
    assert all(e.refs == 0 for e in entries.values()) and cache._pool.refs == [0, 0, 0]
