"""A stateful property test of MoE expert adapters (``FusedLoraExperts``, PEFT's
``target_parameters``) beside a dense LoRA layer: a hypothesis ``RuleBasedStateMachine`` drives a
tiny Qwen3-MoE experts block through get_lora_model (add), load_adapter, delete_adapter,
AdapterCache put / evict / attach, switch_adapter (merged, unmerged, exact, from the cache or the
layers' own) and mixed batches, next to a plain-PyTorch model of the same state: the base
weights (fp64), each adapter's per-expert A, B and scales, and which adapter is active.

After every step: the block's output equals the plain model's (fp32 tolerance; merged weights
are rounded once), the base parameters are the original ones bit for bit whenever nothing is
merged and every merge so far was exact, and a refused call leaves the parameters, the adapters
and the active adapter exactly as they were. Kept apart from ``tests/test_stateful.py`` (the
dense machine) so that each stays within its time budget. Fixed budget, derandomized.
"""

from __future__ import annotations

import functools
import tempfile

import pytest
import torch
import torch.nn.functional as F
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
from lora_kernels.layers.moe import FusedLoraExperts  # noqa: E402
from lora_kernels.models.checkpoint import read_peft_adapter  # noqa: E402
from lora_kernels.serving.cache import AdapterCache  # noqa: E402
from lora_kernels.serving.state import serving_state  # noqa: E402

OWN = ("a", "b")
CACHED = ("k", "m")
REFUSED = (ValueError, KeyError, RuntimeError, TypeError)
GU, DOWN = "mlp.experts.gate_up_proj", "mlp.experts.down_proj"
# (r, lora_alpha, dense q_proj targeted, expert parameters) of the adapters the rules use; the
# last has rank 5, more than the slots' max_rank
SPECS = ((2, 3.0, True, (GU, DOWN)), (3, 6.0, False, (DOWN,)), (5, 4.0, True, (GU,)))
MAX_RANK = 4
TOKENS = 5


class Block(nn.Module):
    """A dense projection, then a Qwen3-MoE experts module on a fixed routing."""

    def __init__(self) -> None:
        super().__init__()
        from tests.moe_models import tiny_moe_model

        lm = tiny_moe_model("qwen3_moe", seed=3)
        hidden = lm.config.hidden_size
        self.q_proj = nn.Linear(hidden, hidden)
        self.mlp = nn.Module()
        self.mlp.experts = lm.model.layers[0].mlp.experts
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            self.q_proj.weight.copy_(torch.randn(hidden, hidden, generator=g) * 0.3)
        e = self.mlp.experts.gate_up_proj.shape[0]
        self.register_buffer("ids", torch.randint(0, e, (TOKENS, 2), generator=g))
        self.register_buffer("weights", torch.rand(TOKENS, 2, generator=g).softmax(-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp.experts(self.q_proj(x), self.ids, self.weights)


def _config(spec: int) -> lk.LoraConfig:
    r, alpha, dense, params = SPECS[spec]
    return lk.LoraConfig(r=r, lora_alpha=alpha, target_modules=["q_proj"] if dense else [],
                         target_parameters=list(params), init_lora_weights=False)  # fmt: skip


def _weights(model: nn.Module, name: str) -> dict:
    """Adapter ``name`` of ``model``'s layers as the plain model keeps it (fp64): ``{"q": (A,
    B, s), param: (A [E, r, in], B [E, out, r], s)}``."""
    out = {}
    q = model.q_proj
    if isinstance(q, lk.FusedLoraLinear) and name in q.adapter_names:
        out["q"] = (q.lora_A[name].weight.detach().double().clone(),
                    q.lora_B[name].weight.detach().double().clone(), q.scaling[name])  # fmt: skip
    ex = model.mlp.experts
    for param in ex.adapter_params(name):
        a, b = ex.expert_factors(param, name)
        out[param] = (a.detach().double().clone(), b.detach().double().clone(),
                      ex.scaling[param][name])  # fmt: skip
    return out


def _base_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """The block's base parameters, whether or not its layers are LoRA layers yet."""
    ex = model.mlp.experts
    ex = ex.base_layer if isinstance(ex, FusedLoraExperts) else ex
    return {"q.weight": model.q_proj.weight, "q.bias": model.q_proj.bias,
            "gate_up_proj": ex.gate_up_proj, "down_proj": ex.down_proj}  # fmt: skip


@functools.cache
def _checkpoints() -> list[str]:
    """One PEFT-layout directory per spec, random non-zero factors (kept for the process)."""
    root = tempfile.mkdtemp(prefix="lk-moe-stateful-")
    paths = []
    for i in range(len(SPECS)):
        torch.manual_seed(100 + i)
        model = lk.get_lora_model(Block(), _config(i), "x")
        path = f"{root}/{i}"
        lk.save_adapter(model, path, "x")
        paths.append(path)
    return paths


@functools.cache
def _checkpoint_weights(spec: int) -> dict:
    model = lk.load_adapter(Block(), _checkpoints()[spec], "x")
    return _weights(model, "x")


class MoeAdapterStateMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.model = Block()
        ex = self.model.mlp.experts
        self.base = {n: t.detach().clone() for n, t in _base_params(self.model).items()}
        self.plain = {
            "q": (self.model.q_proj.weight.detach().double(), self.model.q_proj.bias.double()),
            "gate_up_proj": ex.gate_up_proj.detach().double(),
            "down_proj": ex.down_proj.detach().double(),
        }
        self.own: dict[str, dict] = {}
        self.cached: dict[str, int] = {}
        self.installed: dict[str, dict] = {}
        self.puts: dict[str, int] = {}  # cache name -> puts so far (a put replaces the adapter)
        self.installed_put: dict[str, int] = {}  # installed name -> the put it came from
        self.active: str | None = None
        self.merged = False
        self.all_exact = True
        self.attached = False
        self.cache = AdapterCache(1 << 24)
        hidden = ex.gate_up_proj.shape[2]
        self.x = torch.randn(TOKENS, hidden, generator=torch.Generator().manual_seed(9))

    # -- the plain model --------------------------------------------------------------------

    def adapters(self) -> dict:
        return {**self.own, **self.installed}

    def reference(self, names: list[str | None]) -> torch.Tensor:
        """Token t through the dense layer and the experts with adapter ``names[t]``, fp64."""
        w_q, b_q = self.plain["q"]
        w_gu, w_d = self.plain["gate_up_proj"], self.plain["down_proj"]
        inter = w_d.shape[2]
        rows = []
        for t, name in enumerate(names):
            lora = self.adapters().get(name, {}) if name is not None else {}
            x = self.x[t].double()
            h = x @ w_q.T + b_q
            if "q" in lora:
                a, b, s = lora["q"]
                h = h + s * (x @ a.T) @ b.T
            y = torch.zeros_like(h)
            for j in range(2):
                e = int(self.model.ids[t, j])
                g = h @ w_gu[e].T
                if "gate_up_proj" in lora:
                    a, b, s = lora["gate_up_proj"]
                    g = g + s * (h @ a[e].T) @ b[e].T
                act = F.silu(g[:inter]) * g[inter:]
                o = act @ w_d[e].T
                if "down_proj" in lora:
                    a, b, s = lora["down_proj"]
                    o = o + s * (act @ a[e].T) @ b[e].T
                y = y + self.model.weights[t, j].double() * o
            rows.append(y)
        return torch.stack(rows)

    def snapshot(self):
        layers = [
            (p, m.active_adapter, tuple(m.adapter_names), tuple(m.merged_adapters))
            for p, m in self.model.named_modules()
            if isinstance(m, (lk.FusedLoraLinear, FusedLoraExperts))
        ]
        return {k: v.clone() for k, v in self.model.state_dict().items()}, layers

    def refused(self, call, *args, **kwargs) -> None:
        """``call`` must raise one of REFUSED and change nothing."""
        before = self.snapshot()
        with pytest.raises(REFUSED):
            call(*args, **kwargs)
        self.assert_unchanged(before)

    def assert_unchanged(self, before) -> None:
        sd, layers = self.snapshot()
        assert layers == before[1]
        assert sd.keys() == before[0].keys()
        assert all(torch.equal(sd[k], before[0][k]) for k in sd)

    def observe_installed(self) -> None:
        """Installs the cache gave back (slot reuse, the copy limit) are no longer there."""
        have = set(self.model.mlp.experts.adapter_names)
        if isinstance(self.model.q_proj, lk.FusedLoraLinear):
            have |= set(self.model.q_proj.adapter_names)
        self.installed = {n: w for n, w in self.installed.items() if n in have}

    # -- rules ------------------------------------------------------------------------------

    @initialize(cached=st.integers(0, len(SPECS) - 1), attach=st.booleans())
    def start(self, cached, attach):
        """Every run starts with adapter 'a' on both layer kinds and one adapter cached."""
        self.add_adapter("a", 0)
        self.cache_put("k", cached)
        if attach:
            self.attach(2)

    @precondition(lambda self: not self.merged)
    @rule(name=st.sampled_from(OWN), spec=st.integers(0, len(SPECS) - 1))
    def add_adapter(self, name, spec):
        if name in self.own:
            self.refused(lk.get_lora_model, self.model, _config(spec), name)
            return
        lk.get_lora_model(self.model, _config(spec), name)
        self.own[name] = _weights(self.model, name)
        self.active = name

    @precondition(lambda self: not self.merged)
    @rule(name=st.sampled_from(OWN), spec=st.integers(0, len(SPECS) - 1))
    def load_adapter(self, name, spec):
        if name in self.own:  # into an existing name: only with the same targets and ranks
            return
        lk.load_adapter(self.model, _checkpoints()[spec], name)
        self.own[name] = _checkpoint_weights(spec)
        self.active = name

    @precondition(lambda self: not self.merged)
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
        self.puts[name] = self.puts.get(name, 0) + 1

    @rule(name=st.sampled_from(CACHED))
    def cache_evict(self, name):
        if name not in self.cached:
            with pytest.raises(KeyError):
                self.cache.evict(name)
            return
        self.cache.evict(name)
        del self.cached[name]

    @precondition(lambda self: not self.attached and not self.installed)
    @rule(num_slots=st.integers(1, 3))
    def attach(self, num_slots):
        self.cache.attach(self.model, num_slots=num_slots, max_rank=MAX_RANK)
        self.attached = True

    @rule(data=st.data(), merged=st.booleans(), exact=st.booleans())
    def switch(self, data, merged, exact):
        known = [(n, False) for n in sorted(self.own)] + [(n, True) for n in sorted(self.cached)]
        anything = st.tuples(st.sampled_from((None, *OWN, *CACHED)), st.booleans())
        pick = st.sampled_from(known) if known else anything
        name, use_cache = data.draw(st.one_of(pick, pick, pick, anything))
        self.switch_to(name, use_cache, merged, exact and merged)

    def switch_to(self, name, use_cache, merged, exact):
        cache = self.cache if use_cache else None
        call = functools.partial(lk.switch_adapter, self.model, name, cache=cache,
                                 merged=merged, exact=exact)  # fmt: skip
        ok = True
        if name is not None and use_cache:
            ok = name in self.cached
            spec = self.cached.get(name)
            # a rank above the slots' is refused when the adapter is (re)installed into them
            fresh = name not in self.installed or self.installed_put[name] != self.puts[name]
            if ok and self.attached and SPECS[spec][0] > MAX_RANK and fresh:
                ok = False
        elif name is not None:
            ok = name in self.own
        if not ok:
            self.refused(call)
            return
        call()
        if name is not None and use_cache:
            self.installed[name] = _checkpoint_weights(self.cached[name])
            self.installed_put[name] = self.puts[name]
        self.observe_installed()
        self.active = name
        self.merged = merged and name is not None
        if self.merged and not exact:
            self.all_exact = False

    @precondition(lambda self: self.own or self.cached)
    @rule(data=st.data(), then_merged=st.booleans())
    def switch_exact_and_away(self, data, then_merged):
        known = [(n, False) for n in sorted(self.own)] + [(n, True) for n in sorted(self.cached)]
        name, use_cache = data.draw(st.sampled_from(known))
        self.switch_to(name, use_cache, merged=True, exact=True)
        self.output_matches_the_plain_model()
        other, other_cache = data.draw(st.sampled_from([*known, (None, False)]))
        self.switch_to(other, other_cache, merged=then_merged, exact=then_merged)
        self.unmerged_base_is_the_original()

    @precondition(lambda self: self.attached and any(SPECS[s][0] <= MAX_RANK
                                                     for s in self.cached.values()))  # fmt: skip
    @rule(data=st.data())
    def serve(self, data):
        """Unmerged switches through the cache to adapters that fit the slots: the model is then
        served from them, single-adapter steps both ways (device ids, CUDA's default, and the
        layer's own path, CPU's), then a mixed batch of slot-resident adapters."""
        fits = sorted(n for n, s in self.cached.items() if SPECS[s][0] <= MAX_RANK)
        for name in data.draw(st.lists(st.sampled_from(fits), min_size=1, max_size=3)):
            self.switch_to(name, True, merged=False, exact=False)
            state = serving_state(self.model)
            assert state is not None and state.synced
            for graph_safe in (True, False):
                state.graph_safe = graph_safe
                self.output_matches_the_plain_model()
        resident = [n for n in self.installed if n in state.slots]
        names = data.draw(st.lists(st.sampled_from(["__base__", *resident]), min_size=TOKENS,
                                   max_size=TOKENS))  # fmt: skip
        for graph_safe in (True, False):
            state.graph_safe = graph_safe
            with torch.no_grad(), lk.mixed_batch(self.model, names):
                y = self.model(self.x)
            ref = self.reference([None if n == "__base__" else n for n in names])
            torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4)

    @precondition(lambda self: not self.merged and self.adapters())
    @rule(data=st.data(), slots_only=st.booleans())
    def mixed(self, data, slots_only):
        # slots_only: adapters installed from the cache (all in slots when attached), so that a
        # served model takes the batch from its serving state
        pool = sorted(self.installed) if slots_only and self.installed else sorted(self.adapters())
        choices = ["__base__", *pool]
        names = data.draw(st.lists(st.sampled_from(choices), min_size=TOKENS, max_size=TOKENS))
        with torch.no_grad(), lk.mixed_batch(self.model, names):
            y = self.model(self.x)
        ref = self.reference([None if n == "__base__" else n for n in names])
        torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4)

    # -- invariants -------------------------------------------------------------------------

    @invariant()
    def output_matches_the_plain_model(self):
        with torch.no_grad():
            y = self.model(self.x)
        torch.testing.assert_close(y.double(), self.reference([self.active] * TOKENS),
                                   rtol=1e-4, atol=1e-4)  # fmt: skip

    @invariant()
    def unmerged_base_is_the_original(self):
        if self.merged:
            return
        now = _base_params(self.model)
        for name, w in self.base.items():
            got = now[name]
            if self.all_exact:
                assert torch.equal(got, w), name
            else:
                torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-5)


MoeAdapterStateMachine.TestCase.settings = settings(
    max_examples=30,
    stateful_step_count=15,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny ops: on a shared machine intra-op threads only add contention (the experts'
    index_add_ went from under a millisecond to 150 ms under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


test_moe_adapter_state_machine = MoeAdapterStateMachine.TestCase
