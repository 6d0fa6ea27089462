"""A stateful property test of the adapter API: a hypothesis ``RuleBasedStateMachine`` drives a
small model through get_lora_model (add), load_adapter, delete_adapter, AdapterCache put / evict
/ attach, switch_adapter (merged, unmerged, exact, from the cache or the layers' own), mixed
batches and merge_and_unload, next to a plain-PyTorch model of the same state: the base weights
(fp64), each adapter's A, B and scale, and which adapter is active.

After every step: the model's output equals the plain model's (fp32 tolerance; the merged
weights are rounded once), a model with nothing merged has its original base weights bit for bit
while every merge so far was exact, and a call that is refused leaves the weights, the
adapters and the active adapter exactly as they were. Fixed budget, derandomized: the same
examples on every machine and run. The rules, helpers and invariants it shares with the MoE
machine (``tests/test_moe_stateful.py``) are ``tests/stateful_rules.py``'s.
"""

from __future__ import annotations

import copy
import functools
import tempfile

import pytest
import torch
from torch import nn

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import initialize, precondition, rule  # noqa: E402

import lora_kernels as lk  # noqa: E402
from lora_kernels.models.checkpoint import read_peft_adapter  # noqa: E402
from tests.stateful_rules import lifecycle_rules, machine_settings  # noqa: E402

PATHS = ("0", "2")
DIMS = {"0": (6, 7), "2": (7, 5)}  # in, out
OWN = ("a", "b", "c")
CACHED = ("k", "m", "n")
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


class AdapterStateMachine(lifecycle_rules(OWN, CACHED, len(SPECS))):
    """The dense machine: two ``nn.Linear`` layers that the specs target in part, so that a
    cached adapter fits only once every layer it targets is a LoRA layer (``converted``)."""

    EVICT_MAY_BE_IN_USE = True

    def __init__(self):
        super().__init__()
        self.model = _base()
        self.base = {f"{p}.{kind}": getattr(self.model[int(p)], kind).detach().clone()
                     for p in PATHS for kind in ("weight", "bias")}  # fmt: skip
        self.converted: set[str] = set()  # paths that are FusedLoraLinear layers
        self.x = torch.randn(4, 6, generator=torch.Generator().manual_seed(3))

    # -- hooks of the shared rules ----------------------------------------------------------

    def config(self, spec):
        r, alpha, targets = SPECS[spec]
        return lk.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets),
                             init_lora_weights=False)  # fmt: skip

    def note_converted(self, spec):
        self.converted |= set(SPECS[spec][2])

    def layer_weights(self, name):
        return _layer_weights(self.model, name)

    def checkpoint(self, spec):
        return _checkpoints()[spec]

    def checkpoint_weights(self, spec):
        return _checkpoint_weights(spec)

    def switch_ok(self, name, use_cache, merged, exact):
        ok = not (exact and not merged)
        if name is not None and use_cache:
            # a cached adapter fits when every layer it targets is one of ours
            return ok and name in self.cached and set(SPECS[self.cached[name]][2]) <= self.converted
        if name is not None:
            return ok and name in self.own
        return ok

    def base_params(self):
        return {f"{p}.{kind}": getattr(self.model[int(p)], kind) for p in PATHS
                for kind in ("weight", "bias")}  # fmt: skip

    def reference(self, names: list[str | None]) -> torch.Tensor:
        """Row i through the base layers plus adapter ``names[i]`` (None: the base), fp64."""
        rows = []
        for i, name in enumerate(names):
            h = self.x[i : i + 1].double()
            weights = self.adapters().get(name, {}) if name is not None else {}
            for j, p in enumerate(PATHS):
                w, b = self.base[f"{p}.weight"], self.base[f"{p}.bias"]
                y = h @ w.double().T + b.double()
                if p in weights:
                    a, bb, s = weights[p]
                    y = y + s * (h @ a.T) @ bb.T
                h = torch.relu(y) if j == 0 else y
            rows.append(h)
        return torch.cat(rows)

    # -- rules of this machine --------------------------------------------------------------

    @initialize(spec=st.integers(0, len(SPECS) - 1), cached=st.integers(0, len(SPECS) - 1))
    def start(self, spec, cached):
        """Every run starts from a converted model with one adapter, and one in the cache."""
        self.add_adapter("a", spec)
        self.cache_put("k", cached)

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

    @precondition(lambda self: self.lora and not self.attached and not self.installed)
    @rule()
    def attach(self):
        self.cache.attach(self.model, num_slots=2, max_rank=8)
        self.attached = True

    @precondition(lambda self: self.lora)
    @rule(data=st.data(), merged=st.booleans(), exact=st.booleans())
    def switch(self, data, merged, exact):
        self.switch_to(*self.draw_target(data), merged, exact)

    @precondition(lambda self: self.lora and not self.merged)
    @rule(data=st.data())
    def mixed(self, data):
        choices = ["__base__", *sorted(self.adapters())]
        names = data.draw(st.lists(st.sampled_from(choices), min_size=4, max_size=4))
        if not self.adapters():  # every adapter deleted: refused
            self.refused(lk.mixed_batch(self.model, names).__enter__)
            return
        self.mixed_matches(names)

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


AdapterStateMachine.TestCase.settings = machine_settings(max_examples=40, steps=20)
test_adapter_state_machine = AdapterStateMachine.TestCase
