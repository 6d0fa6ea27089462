"""What the two adapter state machines share: ``tests/test_stateful.py`` (dense layers) and
``tests/test_moe_stateful.py`` (MoE experts beside a dense layer) drive the same public API
(get_lora_model, delete_adapter, AdapterCache put / evict, switch_adapter, mixed batches) next
to a plain-PyTorch model of the same state, and check the same promises after every step.

:class:`AdapterMachine` holds that plain state, the helpers (snapshot, ``refused``, the switch
and what it does to the plain state) and the invariants; :func:`lifecycle_rules` makes the rules
both machines run, on their own adapter names. Each machine adds its model, its reference
forward, its hooks and the rules only it has (load_adapter, attach, mixed batches, serving).
Every test module imports this one after ``pytest.importorskip("hypothesis")``.
"""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import lora_kernels as lk
from lora_kernels.models.checkpoint import read_peft_adapter
from lora_kernels.serving.cache import AdapterCache

REFUSED = (ValueError, KeyError, RuntimeError, TypeError)
BASE = "__base__"


def machine_settings(max_examples: int, steps: int) -> settings:
    """A fixed budget, derandomized: the same examples on every machine and run."""
    return settings(
        max_examples=max_examples,
        stateful_step_count=steps,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )


class AdapterMachine(RuleBasedStateMachine):
    """The plain state of a LoRA model and the checks on it.

    The plain state: ``own`` (adapters added or loaded into the layers: their weights as the
    machine's ``reference`` reads them), ``cached`` (cache name -> spec), ``installed``
    (adapters switched in from the cache: their weights at install), ``active``, ``merged``,
    ``all_exact`` (every merge so far was exact: unmerged base weights are bit-exact), ``lora``
    (the model has LoRA layers yet). A machine sets ``OWN``, ``CACHED``, ``LAYER_TYPES`` (the
    layer classes whose state a refused call must leave alone) and ``model``, ``base`` (the
    base parameters at the start, by :meth:`base_params` name) and ``x`` (its input), and
    implements the hooks below.
    """

    OWN: tuple[str, ...] = ()
    CACHED: tuple[str, ...] = ()
    LAYER_TYPES: tuple[type, ...] = (lk.FusedLoraLinear,)
    # An evict of an adapter whose slot a served model still holds is refused (RuntimeError)
    # and the adapter stays cached; a machine whose slots are never held that way keeps this
    # False, so that any RuntimeError from evict fails it.
    EVICT_MAY_BE_IN_USE = False

    def __init__(self) -> None:
        super().__init__()
        self.own: dict[str, dict] = {}
        self.cached: dict[str, int] = {}
        self.installed: dict[str, dict] = {}
        self.puts: dict[str, int] = {}  # cache name -> puts so far (a put replaces the adapter)
        self.installed_put: dict[str, int] = {}  # installed name -> the put it came from
        self.active: str | None = None
        self.merged = False
        self.all_exact = True
        self.attached = False
        self.lora = False
        self.cache = AdapterCache(1 << 24)

    # -- hooks ------------------------------------------------------------------------------

    def config(self, spec: int) -> lk.LoraConfig:
        """The LoraConfig that adds an adapter of spec ``spec``."""
        raise NotImplementedError

    def note_converted(self, spec: int) -> None:
        """Note that the layers spec ``spec`` targets are LoRA layers now."""

    def layer_weights(self, name: str) -> dict:
        """Adapter ``name`` as the model's layers hold it, in ``reference``'s form (fp64)."""
        raise NotImplementedError

    def checkpoint(self, spec: int) -> str:
        """The PEFT-layout directory of spec ``spec``."""
        raise NotImplementedError

    def checkpoint_weights(self, spec: int) -> dict:
        """Spec ``spec``'s checkpoint in ``reference``'s form (fp64)."""
        raise NotImplementedError

    def switch_ok(self, name: str | None, use_cache: bool, merged: bool, exact: bool) -> bool:
        """Whether ``switch_adapter`` with these arguments must succeed (else: refused)."""
        raise NotImplementedError

    def reference(self, names: list[str | None]) -> torch.Tensor:
        """Row i of ``x`` through the base plus adapter ``names[i]`` (None: the base), fp64."""
        raise NotImplementedError

    def base_params(self) -> dict[str, torch.Tensor]:
        """The model's base parameters now, by the names of ``base``."""
        raise NotImplementedError

    # -- the plain model --------------------------------------------------------------------

    def adapters(self) -> dict:
        return {**self.own, **self.installed}

    def snapshot(self):
        layers = [
            (p, m.active_adapter, tuple(m.adapter_names), tuple(m.merged_adapters))
            for p, m in self.model.named_modules()
            if isinstance(m, self.LAYER_TYPES)
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
        have = {n for m in self.model.modules() if isinstance(m, self.LAYER_TYPES)
                for n in m.adapter_names}  # fmt: skip
        self.installed = {n: w for n, w in self.installed.items() if n in have}

    def known(self) -> list[tuple[str, bool]]:
        """``(name, use_cache)`` of every adapter a switch can select now."""
        return [(n, False) for n in sorted(self.own)] + [(n, True) for n in sorted(self.cached)]

    def draw_target(self, data) -> tuple[str | None, bool]:
        """Mostly an adapter that exists (so that switches succeed often), sometimes any name."""
        anything = st.tuples(st.sampled_from((None, *self.OWN, *self.CACHED)), st.booleans())
        known = self.known()
        pick = st.sampled_from(known) if known else anything
        return data.draw(st.one_of(pick, pick, pick, anything))

    def switch_to(self, name, use_cache, merged, exact) -> None:
        cache = self.cache if use_cache else None
        call = functools.partial(lk.switch_adapter, self.model, name, cache=cache,
                                 merged=merged, exact=exact)  # fmt: skip
        if not self.switch_ok(name, use_cache, merged, exact):
            self.refused(call)
            return
        call()
        if name is not None and use_cache:
            self.installed[name] = self.checkpoint_weights(self.cached[name])
            self.installed_put[name] = self.puts[name]
        self.observe_installed()
        self.active = name
        self.merged = merged and name is not None
        if self.merged and not exact:
            self.all_exact = False

    def mixed_matches(self, names: list[str]) -> None:
        """A mixed batch (one adapter name per row) equals the plain model row for row."""
        with torch.no_grad(), lk.mixed_batch(self.model, names):
            y = self.model(self.x)
        ref = self.reference([None if n == BASE else n for n in names])
        torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4)

    # -- invariants -------------------------------------------------------------------------

    @invariant()
    def output_matches_the_plain_model(self):
        with torch.no_grad():
            y = self.model(self.x)
        ref = self.reference([self.active] * self.x.shape[0])
        torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4)

    @invariant()
    def unmerged_base_is_the_original(self):
        """Nothing merged: the base weights are the original ones, bit for bit while every merge
        so far was exact (biases always: no merge writes them)."""
        if self.merged or not self.lora:
            return
        now = self.base_params()
        for name, w in self.base.items():
            if self.all_exact or name.endswith("bias"):
                assert torch.equal(now[name], w), name
            else:
                torch.testing.assert_close(now[name], w, rtol=1e-5, atol=1e-5)


def lifecycle_rules(own: tuple[str, ...], cached: tuple[str, ...], n_specs: int) -> type:
    """An :class:`AdapterMachine` with the rules both machines run: add and delete an adapter
    of ``own``, put and evict one of ``cached`` (any of ``n_specs`` specs), a merged switch
    followed by a switch away, and two unmerged switches among the own adapters."""
    spec = st.integers(0, n_specs - 1)

    class LifecycleRules(AdapterMachine):
        OWN = own
        CACHED = cached

        @precondition(lambda self: not self.merged)
        @rule(name=st.sampled_from(own), spec=spec)
        def add_adapter(self, name, spec):
            cfg = self.config(spec)
            if name in self.own:
                self.refused(lk.get_lora_model, self.model, cfg, name)
                return
            lk.get_lora_model(self.model, cfg, name)
            self.lora = True
            self.note_converted(spec)
            self.own[name] = self.layer_weights(name)
            self.active = name

        @precondition(lambda self: not self.merged and self.lora)
        @rule(name=st.sampled_from(own))
        def delete_adapter(self, name):
            if name not in self.own:
                self.refused(lk.delete_adapter, self.model, name)
                return
            lk.delete_adapter(self.model, name)
            del self.own[name]
            if self.active == name:
                self.active = self.model.active_lora_adapter  # the first remaining one, or None
                assert self.active is None or self.active in self.adapters()

        @rule(name=st.sampled_from(cached), spec=spec)
        def cache_put(self, name, spec):
            config, tensors = read_peft_adapter(self.checkpoint(spec))
            self.cache.put(name, tensors, config)
            self.cached[name] = spec
            self.puts[name] = self.puts.get(name, 0) + 1

        @rule(name=st.sampled_from(cached))
        def cache_evict(self, name):
            if name not in self.cached:
                with pytest.raises(KeyError):
                    self.cache.evict(name)
                return
            try:
                self.cache.evict(name)
            except RuntimeError:  # in use (a held slot): stays cached
                if not self.EVICT_MAY_BE_IN_USE:
                    raise
                return
            del self.cached[name]

        @precondition(lambda self: self.own or self.cached)
        @rule(data=st.data(), exact=st.booleans(), then_merged=st.booleans())
        def switch_merged_and_away(self, data, exact, then_merged):
            """A merged switch (exact or arithmetic) to an adapter that exists, then a switch to
            another (merged or not): what the merge promises (the weights back bit for bit, or
            within rounding) is checked by the invariants after each."""
            known = self.known()
            name, use_cache = data.draw(st.sampled_from(known))
            self.switch_to(name, use_cache, merged=True, exact=exact)
            self.output_matches_the_plain_model()
            other, other_cache = data.draw(st.sampled_from([*known, (None, False)]))
            self.switch_to(other, other_cache, merged=then_merged, exact=then_merged)
            self.unmerged_base_is_the_original()

        @precondition(lambda self: self.lora and self.own)
        @rule(data=st.data())
        def switch_own_twice(self, data):
            """Two unmerged switches among the layers' own adapters (no cache): the first visits
            every layer and leaves them following the model's ``SharedActive``, the second is
            one write there, which a layer without that adapter must read as its base."""
            choices = [*sorted(self.own), None]
            for _ in range(2):
                self.switch_to(data.draw(st.sampled_from(choices)), False, merged=False,
                               exact=False)  # fmt: skip
                self.output_matches_the_plain_model()

    return LifecycleRules
