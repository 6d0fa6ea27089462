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
dense machine) so that each stays within its time budget; the rules, helpers and invariants the
two share are ``tests/stateful_rules.py``'s. Fixed budget, derandomized.
"""

from __future__ import annotations

import functools
import tempfile

import pytest
import torch
import torch.nn.functional as F
from torch import nn

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import initialize, precondition, rule  # noqa: E402

import lora_kernels as lk  # noqa: E402
from lora_kernels.layers.moe import FusedLoraExperts  # noqa: E402
from lora_kernels.serving.state import serving_state  # noqa: E402
from tests.stateful_rules import lifecycle_rules, machine_settings  # noqa: E402

OWN = ("a", "b")
CACHED = ("k", "m")
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


class MoeAdapterStateMachine(lifecycle_rules(OWN, CACHED, len(SPECS))):
    """The MoE machine: a dense ``q_proj`` and the experts, adapters on both or on the experts
    only, one spec of a rank above the slots' (refused when installed into them)."""

    LAYER_TYPES = (lk.FusedLoraLinear, FusedLoraExperts)

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
        hidden = ex.gate_up_proj.shape[2]
        self.x = torch.randn(TOKENS, hidden, generator=torch.Generator().manual_seed(9))

    # -- hooks of the shared rules ----------------------------------------------------------

    def config(self, spec):
        return _config(spec)

    def layer_weights(self, name):
        return _weights(self.model, name)

    def checkpoint(self, spec):
        return _checkpoints()[spec]

    def checkpoint_weights(self, spec):
        return _checkpoint_weights(spec)

    def switch_ok(self, name, use_cache, merged, exact):
        if name is not None and use_cache:
            spec = self.cached.get(name)
            # a rank above the slots' is refused when the adapter is (re)installed into them
            fresh = name not in self.installed or self.installed_put[name] != self.puts[name]
            return name in self.cached and not (
                self.attached and SPECS[spec][0] > MAX_RANK and fresh
            )
        if name is not None:
            return name in self.own
        return True

    def base_params(self):
        return _base_params(self.model)

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

    # -- rules of this machine --------------------------------------------------------------

    @initialize(cached=st.integers(0, len(SPECS) - 1), attach=st.booleans())
    def start(self, cached, attach):
        """Every run starts with adapter 'a' on both layer kinds and one adapter cached."""
        self.add_adapter("a", 0)
        self.cache_put("k", cached)
        if attach:
            self.attach(2)

    @precondition(lambda self: not self.merged)
    @rule(name=st.sampled_from(OWN), spec=st.integers(0, len(SPECS) - 1))
    def load_adapter(self, name, spec):
        if name in self.own:  # into an existing name: only with the same targets and ranks
            return
        lk.load_adapter(self.model, _checkpoints()[spec], name)
        self.own[name] = _checkpoint_weights(spec)
        self.active = name

    @precondition(lambda self: not self.attached and not self.installed)
    @rule(num_slots=st.integers(1, 3))
    def attach(self, num_slots):
        self.cache.attach(self.model, num_slots=num_slots, max_rank=MAX_RANK)
        self.attached = True

    @rule(data=st.data(), merged=st.booleans(), exact=st.booleans())
    def switch(self, data, merged, exact):
        self.switch_to(*self.draw_target(data), merged, exact and merged)

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
            self.mixed_matches(names)

    @precondition(lambda self: not self.merged and self.adapters())
    @rule(data=st.data(), slots_only=st.booleans())
    def mixed(self, data, slots_only):
        # slots_only: adapters installed from the cache (all in slots when attached), so that a
        # served model takes the batch from its serving state
        pool = sorted(self.installed) if slots_only and self.installed else sorted(self.adapters())
        choices = ["__base__", *pool]
        names = data.draw(st.lists(st.sampled_from(choices), min_size=TOKENS, max_size=TOKENS))
        self.mixed_matches(names)


MoeAdapterStateMachine.TestCase.settings = machine_settings(max_examples=30, steps=15)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny ops: on a shared machine intra-op threads only add contention (the experts'
    index_add_ went from under a millisecond to 150 ms under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


test_moe_adapter_state_machine = MoeAdapterStateMachine.TestCase
