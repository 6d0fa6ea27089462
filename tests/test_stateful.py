"""A stateful property test of the adapter API: a hypothesis ``RuleBasedStateMachine`` drives a
small model through get_lora_model (add), load_adapter, delete_adapter, AdapterCache put / evict
/ attach, switch_adapter (merged, unmerged, exact, from the cache or the layers' own), mixed
batches and merge_and_unload, next to a plain-PyTorch model of the same state: the base weights
(fp64), each adapter's A, B and scale, and which adapter is active.

After every step: the model's output equals the plain model's (fp32 tolerance; the merged
weights are rounded once), a model with nothing merged has its original base weights bit for bit
while every merge so far was exact, and a call that is refused leaves the weights, the
adapters and the active adapter exactly as they were. Fixed budget, derandomized: the same
examples on every machine and run.
"""

from __future__ import annotations

import copy
import functools
import tempfile

import pytest
import torch
from torch import nn

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import (  # noqa: E402
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

import lora_kernels as lk  # noqa: E402
from lora_kernels.models.checkpoint import read_peft_adapter  # noqa: E402
from lora_kernels.serving.cache import AdapterCache  # noqa: E402

PATHS = ("0", "2")
DIMS = {"0": (6, 7), "2": (7, 5)}  # in, out
OWN = ("a", "b", "c")
CACHED = ("k", "m", "n")
REFUSED = (ValueError, KeyError, RuntimeError, TypeError)
# (r, lora_alpha, targets) of the adapters the rules add, load and cache
SPECS = ((2, 3.0, PATHS), (5, 4.0, ("2",)), (3, 6.0, ("0",)))


def _base() -> nn.Module:
    g = torch.Generator().manual_seed(7)
    model = nn.Sequential(nn.Linear(6, 7), nn.ReLU(), nn.Linear(7, 5))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


@functools.cache
def _checkpoints() -> list[str]:
    """One PEFT-layout directory per spec, random non-zero A and B (kept for the process)."""
    root = tempfile.mkdtemp(prefix="lk-stateful-")
    paths = []
    for i, (r, alpha, targets) in enumerate(SPECS):
        donor = lk.get_lora_model(_base(), lk.LoraConfig(r=r, lora_alpha=alpha,
                                                         target_modules=list(targets)))  # fmt: skip
        with torch.no_grad():
            g = torch.Generator().manual_seed(100 + i)
            for name, p in donor.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.4)
        path = f"{root}/spec{i}"
        lk.save_adapter(donor, path)
        paths.append(path)
    return paths


def _layer_weights(model, name) -> dict:
    """``{path: (A, B, scale)}`` of adapter ``name`` as the model's layers hold it (fp64)."""
    out = {}
    for path, m in model.named_modules():
        if isinstance(m, lk.FusedLoraLinear) and name in m.lora_A:
            a = m.lora_A[name].weight.detach().double().clone()
            b = m.lora_B[name].weight.detach().double().clone()
            out[path] = (a, b, m.scaling[name])
    return out


def _checkpoint_weights(i: int) -> dict:
    config, tensors = read_peft_adapter(_checkpoints()[i])
    r, alpha, targets = SPECS[i]
    return {
        p: (
            tensors[f"base_model.model.{p}.lora_A.weight"].double(),
            tensors[f"base_model.model.{p}.lora_B.weight"].double(),
            alpha / r,
        )
        for p in targets
    }


class AdapterStateMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.model = _base()
        self.base = {p: (self.model[int(p)].weight.detach().clone(),
                         self.model[int(p)].bias.detach().clone()) for p in PATHS}  # fmt: skip
        self.own: dict[str, dict] = {}  # adapters added / loaded into the layers
        self.cached: dict[str, int] = {}  # cache name -> spec
        self.installed: dict[str, dict] = {}  # installed from the cache: weights at install
        self.active: str | None = None
        self.merged = False
        self.all_exact = True  # every merge so far was exact: unmerged weights are bit-exact
        self.attached = False
        self.lora = False  # the model has been converted (get_lora_model / load_adapter)
        self.converted: set[str] = set()  # paths that are FusedLoraLinear layers
        self.cache = AdapterCache(1 << 24)
        self.x = torch.randn(4, 6, generator=torch.Generator().manual_seed(3))

    # -- the plain model --------------------------------------------------------------------

    def adapters(self) -> dict:
        return {**self.own, **self.installed}

    def reference(self, names: list[str | None]) -> torch.Tensor:
        """Row i through the base layers plus adapter ``names[i]`` (None: the base), fp64."""
        rows = []
        for i, name in enumerate(names):
            h = self.x[i : i + 1].double()
            weights = self.adapters().get(name, {}) if name is not None else {}
            for j, p in enumerate(PATHS):
                w, b = self.base[p]
                y = h @ w.double().T + b.double()
                if p in weights:
                    a, bb, s = weights[p]
                    y = y + s * (h @ a.T) @ bb.T
                h = torch.relu(y) if j == 0 else y
            rows.append(h)
        return torch.cat(rows)

    def snapshot(self):
        layers = [
            (p, m.active_adapter, tuple(m.adapter_names), tuple(m.merged_adapters))
            for p, m in self.model.named_modules()
            if isinstance(m, lk.FusedLoraLinear)
        ]
        return {k: v.clone() for k, v in self.model.state_dict().items()}, layers

    def refused(self, call, *args, **kwargs) -> None:
        """``call`` must raise one of REFUSED and change nothing."""
        before = self.snapshot()
        with pytest.raises(REFUSED):
            call(*args, **kwargs)
        sd, layers = self.snapshot()
        assert layers == before[1]
        assert sd.keys() == before[0].keys()
        assert all(torch.equal(sd[k], before[0][k]) for k in sd)

    def observe_installed(self) -> None:
        """Installs the cache gave back (slot reuse, the copy limit) are no longer there."""
        have = {n for m in self.model.modules() if isinstance(m, lk.FusedLoraLinear)
                for n in m.adapter_names}  # fmt: skip
        self.installed = {n: w for n, w in self.installed.items() if n in have}

    # -- rules ------------------------------------------------------------------------------

    @initialize(spec=st.integers(0, len(SPECS) - 1), cached=st.integers(0, len(SPECS) - 1))
    def start(self, spec, cached):
        """Every run starts from a converted model with one adapter, and one in the cache."""
        self.add_adapter("a", spec)
        self.cache_put("k", cached)

    @precondition(lambda self: not self.merged)
    @rule(name=st.sampled_from(OWN), spec=st.integers(0, len(SPECS) - 1))
    def add_adapter(self, name, spec):
        r, alpha, targets = SPECS[spec]
        cfg = lk.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets),
                            init_lora_weights=False)  # fmt: skip
        if name in self.own:
            self.refused(lk.get_lora_model, self.model, cfg, name)
            return
        lk.get_lora_model(self.model, cfg, name)
        self.lora = True
        self.converted |= set(targets)
        self.own[name] = _layer_weights(self.model, name)
        self.active = name

    @precondition(lambda self: not self.merged)
    @rule(name=st.sampled_from(OWN), spec=st.integers(0, len(SPECS) - 1))
    def load_adapter(self, name, spec):
        path = _checkpoints()[spec]
        if name in self.own and set(self.own[name]) != set(SPECS[spec][2]):
            self.refused(lk.load_adapter, self.model, path, name)
            return
        if name in self.own and any(
            self.own[name][p][0].shape[0] != SPECS[spec][0] for p in self.own[name]
        ):
            self.refused(lk.load_adapter, self.model, path, name)
            return
        keep_scale = {p: w[2] for p, w in self.own.get(name, {}).items()}
        lk.load_adapter(self.model, path, name)
        self.lora = True
        self.converted |= set(SPECS[spec][2])
        weights = _checkpoint_weights(spec)
        # into an existing name the weights are replaced and its config (scaling) stays
        self.own[name] = {p: (a, b, keep_scale.get(p, s)) for p, (a, b, s) in weights.items()}
        self.active = name

    @precondition(lambda self: not self.merged and self.lora)
    @rule(name=st.sampled_from(OWN))
    def delete_adapter(self, name):
        if name not in self.own:
            self.refused(lk.delete_adapter, self.model, name)
            return
        lk.delete_adapter(self.model, name)
        del self.own[name]
        if self.active == name:
            self.active = self.model.active_lora_adapter  # the first remaining one, or None
            assert self.active is None or self.active in self.adapters()

    @rule(name=st.sampled_from(CACHED), spec=st.integers(0, len(SPECS) - 1))
    def cache_put(self, name, spec):
        config, tensors = read_peft_adapter(_checkpoints()[spec])
        self.cache.put(name, tensors, config)
        self.cached[name] = spec

    @rule(name=st.sampled_from(CACHED))
    def cache_evict(self, name):
        if name not in self.cached:
            with pytest.raises(KeyError):
                self.cache.evict(name)
            return
        try:
            self.cache.evict(name)
        except RuntimeError:  # in use (a held slot): stays cached
            return
        del self.cached[name]

    @precondition(lambda self: self.lora and not self.attached and not self.installed)
    @rule()
    def attach(self):
        self.cache.attach(self.model, num_slots=2, max_rank=8)
        self.attached = True

    @precondition(lambda self: self.lora)
    @rule(data=st.data(), merged=st.booleans(), exact=st.booleans())
    def switch(self, data, merged, exact):
        # mostly an adapter that exists (so that switches succeed often), sometimes any name
        known = [(n, False) for n in sorted(self.own)] + [(n, True) for n in sorted(self.cached)]
        anything = st.tuples(st.sampled_from((None, *OWN, *CACHED)), st.booleans())
        pick = st.sampled_from(known) if known else anything
        name, use_cache = data.draw(st.one_of(pick, pick, pick, anything))
        self.switch_to(name, use_cache, merged, exact)

    def switch_to(self, name, use_cache, merged, exact):
        cache = self.cache if use_cache else None
        call = functools.partial(lk.switch_adapter, self.model, name, cache=cache,
                                 merged=merged, exact=exact)  # fmt: skip
        ok = not (exact and not merged)
        if name is not None and use_cache:
            # a cached adapter fits when every layer it targets is one of ours
            ok = ok and name in self.cached and set(SPECS[self.cached[name]][2]) <= self.converted
        elif name is not None:
            ok = ok and name in self.own
        if not ok:
            self.refused(call)
            return
        call()
        if name is not None and use_cache:
            self.installed[name] = _checkpoint_weights(self.cached[name])
        self.observe_installed()
        self.active = name
        self.merged = merged and name is not None
        if self.merged and not exact:
            self.all_exact = False

    @precondition(lambda self: self.own or self.cached)
    @rule(data=st.data(), then_merged=st.booleans())
    def switch_exact_and_away(self, data, then_merged):
        """An exact merged switch to an adapter that exists, then a switch to another (merged
        or not): what the exact merge promises is checked by the invariants after each."""
        known = [(n, False) for n in sorted(self.own)] + [(n, True) for n in sorted(self.cached)]
        name, use_cache = data.draw(st.sampled_from(known))
        self.switch_to(name, use_cache, merged=True, exact=True)
        self.output_matches_the_plain_model()
        other, other_cache = data.draw(st.sampled_from([*known, (None, False)]))
        self.switch_to(other, other_cache, merged=then_merged, exact=then_merged)
        self.unmerged_base_is_the_original()

    @precondition(lambda self: self.lora and not self.merged)
    @rule(data=st.data())
    def mixed(self, data):
        choices = ["__base__", *sorted(self.adapters())]
        names = data.draw(st.lists(st.sampled_from(choices), min_size=4, max_size=4))
        if not self.adapters():  # every adapter deleted: refused
            self.refused(lk.mixed_batch(self.model, names).__enter__)
            return
        with torch.no_grad(), lk.mixed_batch(self.model, names):
            y = self.model(self.x)
        ref = self.reference([None if n == "__base__" else n for n in names])
        torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4)

    @precondition(lambda self: self.lora)
    @rule()
    def merge_and_unload(self):
        if not self.adapters():  # every adapter deleted: nothing to merge, refused
            self.refused(lk.merge_and_unload, self.model)
            return
        plain = lk.merge_and_unload(copy.deepcopy(self.model))
        assert not any(isinstance(m, lk.FusedLoraLinear) for m in plain.modules())
        with torch.no_grad():
            y = plain(self.x)
        torch.testing.assert_close(y.double(), self.reference([self.active] * 4), rtol=1e-4,
                                   atol=1e-4)  # fmt: skip

    # -- invariants -------------------------------------------------------------------------

    @invariant()
    def output_matches_the_plain_model(self):
        with torch.no_grad():
            y = self.model(self.x)
        ref = self.reference([self.active] * 4)
        torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4)

    @invariant()
    def unmerged_base_is_the_original(self):
        if self.merged or not self.lora:
            return
        for p in PATHS:
            w = self.model[int(p)].weight
            if self.all_exact:
                assert torch.equal(w, self.base[p][0])
            else:
                torch.testing.assert_close(w, self.base[p][0], rtol=1e-5, atol=1e-5)
            assert torch.equal(self.model[int(p)].bias, self.base[p][1])


AdapterStateMachine.TestCase.settings = settings(
    max_examples=40,
    stateful_step_count=20,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_adapter_state_machine = AdapterStateMachine.TestCase
