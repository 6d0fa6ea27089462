"""``switch_adapter``: switch a whole model between adapters, from its own layers or from an
:class:`~lora_kernels.cache.AdapterCache`, and ``release_adapters``.

A switch is planned, then applied (as ``get_lora_model`` is): the plan runs every check and
changes nothing, so a switch that cannot be done leaves the model as it was; the apply only runs
steps the plan cleared. The cache is reached through its small internal API (``hold_slot``,
``release_slot``, ``has_slots_for``, ``slot_available``, ...), never its private fields.

MoE expert adapters (``FusedLoraExperts``, PEFT's ``target_parameters``) switch with the dense
layers of the same model, by the same rules: installed from a cache as device copies (PEFT's
layout in the layer; with slots, the slot holds the per-expert copy the served forward reads),
merged into the 3-D expert parameters (exact mode restores them bit for bit), unmerged through
the model's ``SharedActive`` or served from the slots, one write per switch either way. The one
difference: a merged switch between two adapters unmerges and merges an experts layer (two
passes) where a dense layer swaps in one (``FusedLoraLinear.swap_merged``).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from ..functional.moe import peft_expert_factors
from ..layers import BASE_ADAPTER, FusedLoraLinear
from ..layers.base import SharedActive
from ..layers.moe import FusedLoraExperts
from ..models.experts import expert_layers
from ..models.model import lora_layers
from . import cache as cache_module
from . import state as serving
from .cache import AdapterCache, CachedAdapter, raise_problems
from .exact_merge import check_exact_unmerge

__all__ = ["release_adapters", "switch_adapter"]


@dataclass
class _Installed:
    """An adapter ``switch_adapter`` put into a model's layers from a cache."""

    cache: AdapterCache
    adapter: CachedAdapter
    slot: int | None  # the held slot its weights are views of; None: device copies


class _SwitchState:
    """Per model: the adapters installed from caches, least recently used first.

    Copies and pickles of the model start with an empty state: the installed adapters travel
    as ordinary adapters of the layers, and the slots stay held by the original only.
    """

    def __init__(self) -> None:
        self.installed: OrderedDict[str, _Installed] = OrderedDict()

    def __deepcopy__(self, memo) -> _SwitchState:
        return _SwitchState()

    def __reduce__(self):
        return (_SwitchState, ())


_STATE_ATTR = "_lora_kernels_switch_state"


def _state(model: nn.Module) -> _SwitchState:
    state = model.__dict__.get(_STATE_ATTR)
    if state is None:
        state = model.__dict__[_STATE_ATTR] = _SwitchState()
    return state


def _switch_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers a switch handles (``slots.servable_layers``: dense, then experts layers on a
    model ``get_lora_model`` marked ``has_lora_experts``), walked once per planned switch."""
    layers = dict(lora_layers(model))
    if model.__dict__.get("has_lora_experts"):
        layers.update(expert_layers(model))
    return layers


def _has(layer: nn.Module, name: str) -> bool:
    """``layer`` (dense or experts) has adapter ``name`` (every layer keys use_rslora by it)."""
    return name in layer.use_rslora


def _check_fits_model(
    fn: str, layers: dict[str, nn.Module], adapter: CachedAdapter, ours: bool
) -> None:
    problems = []
    for path, lay in adapter.experts.items():
        layer = layers.get(path)
        if not isinstance(layer, FusedLoraExperts):
            problems.append(f"{path}: the model has no FusedLoraExperts there")
            continue
        for param in lay.params:
            n_in, n_out = layer.features(param)
            e = layer.num_experts
            want_a, want_b = [e, lay.r[param], n_in], [e, n_out, lay.r[param]]
            got_a, got_b = list(lay.lora_a[param].shape), list(lay.lora_b[param].shape)
            if got_a != want_a or got_b != want_b:
                problems.append(
                    f"{path}.{param}: expected per-expert lora_A {want_a} and lora_B {want_b}, "
                    f"got {got_a} and {got_b}"
                )
    for path, lay in adapter.layers.items():
        layer = layers.get(path)
        if not isinstance(layer, FusedLoraLinear):
            problems.append(f"{path}: the model has no FusedLoraLinear there")
            continue
        want_a = [lay.r, layer.in_features]
        want_b = [layer.out_features, lay.r]
        if list(lay.lora_a.shape) != want_a or list(lay.lora_b.shape) != want_b:
            problems.append(
                f"{path}: expected lora_A {want_a} and lora_B {want_b}, got "
                f"{list(lay.lora_a.shape)} and {list(lay.lora_b.shape)}"
            )
    raise_problems(f"{fn}: adapter {adapter.name!r} does not fit the model", problems)
    clash = [p for p, m in layers.items() if _has(m, adapter.name)]
    if clash and not ours:
        raise ValueError(
            f"{fn}: layers {clash[:3]} already have an adapter named {adapter.name!r} that the "
            "cache did not install; delete it or cache the adapter under another name"
        )


def _check_unmergeable(fn: str, layers: dict[str, nn.Module]) -> None:
    """Every merged layer can be unmerged (exact records still match their adapters)."""
    for path, layer in layers.items():
        if isinstance(layer, FusedLoraExperts):
            try:
                layer._check_unmerge(fn)
            except ValueError as e:
                raise ValueError(f"{path}: {e}") from None
            continue
        for name in layer.merged_adapters:
            record = layer._exact_records.get(name)
            if record is None:
                continue
            try:
                check_exact_unmerge(
                    *layer._merge_operands(name),
                    layer.scaling[name],
                    record,
                    fn=fn,
                )
            except (TypeError, ValueError) as e:
                raise ValueError(f"{path}: {e}") from None


def _uninstall(
    model: nn.Module, layers: dict[str, FusedLoraLinear], state: _SwitchState, name: str
) -> None:
    """Remove an installed adapter from its layers (none of them may be merged with it)."""
    installed = state.installed.pop(name)
    configs = getattr(model, "lora_configs", None)
    if isinstance(configs, dict) and configs.get(name) is installed.adapter.config:
        del configs[name]
    for path in [*installed.adapter.layers, *installed.adapter.experts]:
        layer = layers.get(path)
        if layer is not None and _has(layer, name):
            layer.delete_adapter(name)
    if installed.slot is not None:
        installed.cache.release_slot(installed.slot)


def _install(
    model: nn.Module,
    layers: dict[str, FusedLoraLinear],
    cache: AdapterCache,
    adapter: CachedAdapter,
    slot: int | None,
) -> _Installed:
    """Add ``adapter`` to its layers: views into the held ``slot``, or device copies (always
    copies for experts layers: their PEFT layout is no view of the per-expert slots)."""
    moved = 0
    with torch.no_grad():
        for path, lay in adapter.experts.items():
            layer = layers[path]
            layer.add_adapter(
                adapter.name,
                dict(lay.r),
                dict(lay.lora_alpha),
                use_rslora=adapter.config.use_rslora,
                init_lora_weights=False,
            )
            for param in lay.params:
                mod_a = layer.lora_A[param][adapter.name]
                mod_b = layer.lora_B[param][adapter.name]
                mod_a.weight.requires_grad_(False)
                mod_b.weight.requires_grad_(False)
                a, b = peft_expert_factors(mod_a.weight, mod_b.weight, layer.num_experts)
                a.copy_(lay.lora_a[param], non_blocking=True)
                b.copy_(lay.lora_b[param], non_blocking=True)
                moved += lay.lora_a[param].nbytes + lay.lora_b[param].nbytes
        for path, lay in adapter.layers.items():
            layer = layers[path]
            layer.add_adapter(
                adapter.name,
                lay.r,
                lay.lora_alpha,
                use_rslora=adapter.config.use_rslora,
                init_lora_weights=False,
            )
            mod_a = layer.lora_A[adapter.name]
            mod_b = layer.lora_B[adapter.name]
            if slot is not None:
                pa, pb, _, _ = cache.slot_tensors(path)
                mod_a.weight = nn.Parameter(pa[slot, : lay.r], requires_grad=False)
                mod_b.weight = nn.Parameter(pb[slot, :, : lay.r], requires_grad=False)
            else:
                mod_a.weight.requires_grad_(False).copy_(lay.lora_a, non_blocking=True)
                mod_b.weight.requires_grad_(False).copy_(lay.lora_b, non_blocking=True)
                moved += lay.lora_a.nbytes + lay.lora_b.nbytes
    if moved:
        cache.record_device_copy(moved)
    # Models made by get_lora_model keep their adapters' configs: list this one there too, so
    # that mixed_batch and save_adapter know it.
    configs = getattr(model, "lora_configs", None)
    if isinstance(configs, dict):
        configs[adapter.name] = adapter.config
    return _Installed(cache, adapter, slot)


def _slot_obtainable(cache: AdapterCache, adapter: CachedAdapter, state: _SwitchState) -> bool:
    """A slot for ``adapter`` is free now, or will be once this model's installs give theirs
    back (a slot also held by anyone else stays taken)."""
    ours = [0] * cache.num_slots
    for i in state.installed.values():
        if i.cache is cache and i.slot is not None:
            ours[i.slot] += 1
    return cache.slot_available(adapter.name, ours)


@dataclass
class _SwitchPlan:
    """What ``switch_adapter`` will do, decided (and checked) before anything changes."""

    name: str | None
    layers: dict[str, nn.Module]  # FusedLoraLinear / FusedLoraEmbedding / FusedLoraExperts
    state: _SwitchState
    cache: AdapterCache | None
    adapter: CachedAdapter | None  # from the cache; None: the layers' own adapter, or the base
    install: bool  # put ``adapter`` into the layers (a first switch to it, or a stale install)
    use_slots: bool  # install as views into the cache's device slots
    serve: bool  # afterwards, every layer reads the model's serving state (lora_kernels.serving)
    merged: bool
    exact: bool


def _plan_switch(
    fn: str,
    model: nn.Module,
    name: str | None,
    cache: AdapterCache | None,
    merged: bool,
    exact: bool,
) -> _SwitchPlan:
    """Every check of ``switch_adapter``; changes nothing."""
    if name == BASE_ADAPTER:
        name = None
    if name is not None and not isinstance(name, str):
        raise TypeError(f"{fn}: expected name to be a str or None, got {type(name).__name__}")
    if cache is not None and not isinstance(cache, AdapterCache):
        raise TypeError(f"{fn}: expected cache to be an AdapterCache, got {type(cache).__name__}")
    if exact and not merged:
        raise ValueError(f"{fn}: exact=True applies to merged=True switches only")
    layers = _switch_layers(model)
    if not layers:
        raise ValueError(f"{fn}: the model has no FusedLoraLinear layers")
    state = _state(model)

    adapter = None
    install = use_slots = False
    if name is not None and cache is not None:
        adapter = cache.get(name)
        current = state.installed.get(name)
        _check_fits_model(fn, layers, adapter, ours=current is not None)
        use_slots = cache.has_slots_for(layers)
        # Installed again: a first switch to it, a newer adapter of that name in the cache,
        # another cache, or copies made before the cache got slots for this model.
        install = (
            current is None
            or current.adapter is not adapter
            or current.cache is not cache
            or (use_slots and current.slot is None)
        )
        if install and use_slots:
            cache.check_fits_slots(fn, adapter)
            if not _slot_obtainable(cache, adapter, state):
                raise RuntimeError(
                    f"{fn}: every device slot of the cache is held elsewhere; none is free for "
                    f"adapter {name!r}"
                )
    elif name is not None:
        if name in state.installed:
            raise ValueError(
                f"{fn}: adapter {name!r} was installed from a cache; pass cache= to switch to it"
            )
        if not any(_has(m, name) for m in layers.values()):
            have = sorted({n for m in layers.values() for n in m.adapter_names})
            raise ValueError(f"{fn}: no layer of the model has adapter {name!r}; they have {have}")
    _check_unmergeable(fn, layers)
    # Unmerged switches to an adapter in a slot, or to the base with the slots' cache, leave the
    # model served from the slots: later switches like them are one write (_switch_served).
    serve = not merged and cache is not None and cache.has_slots_for(layers)
    serve = serve and (name is None or use_slots)
    return _SwitchPlan(
        name, layers, state, cache, adapter, install, use_slots, serve, merged, exact
    )


def _apply_switch(fn: str, model: nn.Module, plan: _SwitchPlan) -> None:
    """Carry out a plan of ``_plan_switch``: every step here is one that its checks cleared."""
    name, layers, state, cache = plan.name, plan.layers, plan.state, plan.cache
    # A layer merged (arithmetically) with one adapter that moves to another already there
    # swaps them in one pass over its weight; every other merged layer is unmerged first.
    swap = plan.merged and not plan.exact and name is not None and not plan.install
    swapped = set()
    for path, layer in layers.items():
        if swap and _has(layer, name) and _swappable(layer):
            layer.swap_merged(name)
            swapped.add(path)
        elif layer.merged:
            layer.unmerge()
    if plan.install:
        if name in state.installed:  # a stale install: the cache holds a newer adapter now
            _uninstall(model, layers, state, name)
        slot = None
        if plan.use_slots:
            # Give back slots that inactive installs hold, least recently used first, until one
            # is free for the new adapter.
            holders = [
                n for n, i in state.installed.items() if i.cache is cache and i.slot is not None
            ]
            while holders and not cache.slot_available(name):
                _uninstall(model, layers, state, holders.pop(0))
            slot = cache.hold_slot(fn, plan.adapter)
        state.installed[name] = _install(model, layers, cache, plan.adapter, slot)
    target = state.installed.get(name)
    if target is not None:
        state.installed.move_to_end(name)
    copies = [n for n, i in state.installed.items() if i.slot is None and n != name]
    limit = cache_module.MAX_INSTALLED
    excess = len(copies) + (target is not None and target.slot is None) - limit
    for victim in copies[: max(0, excess)]:
        _uninstall(model, layers, state, victim)
    for path, layer in layers.items():
        if path in swapped:
            continue
        if name is not None and _has(layer, name):
            layer.set_adapter(name)
            if plan.merged:
                layer.merge(name, exact=plan.exact)
        else:
            layer.set_adapter(None)
    if not plan.merged and not plan.serve:
        _share_active(model, layers, state, name)
    if plan.serve:
        slots = {
            n: i.slot for n, i in state.installed.items() if i.cache is cache and i.slot is not None
        }
        serving.engage(model, layers, cache, slots, name)
    if hasattr(model, "active_lora_adapter"):
        model.active_lora_adapter = name


_ACTIVE_ATTR = "_lora_kernels_active"


def _share_active(model: nn.Module, layers, state: _SwitchState, name: str | None) -> None:
    """After an unmerged switch that visited every layer: make each layer follow one
    model-level ``SharedActive``, so the next such switch is one write (``_switch_shared``)."""
    shared = model.__dict__.get(_ACTIVE_ATTR)
    if shared is None:
        shared = model.__dict__[_ACTIVE_ATTR] = SharedActive()
    shared.name = name
    # adapters installed from a cache need cache= (the plan says so): not switchable here
    shared.names = frozenset(n for m in layers.values() for n in m.use_rslora) - set(
        state.installed
    )
    for layer in layers.values():
        layer._follow(shared)
    shared.synced = True


def _switch_shared(model: nn.Module, name: str | None) -> bool:
    """An unmerged switch without a cache of a model whose layers all follow its
    ``SharedActive`` (none merged, none changed by itself since): one write; False (nothing
    done) when the switch needs the plan."""
    shared = model.__dict__.get(_ACTIVE_ATTR)
    if shared is None or not shared.synced:
        return False
    if name == BASE_ADAPTER:
        name = None
    if name is not None and (not isinstance(name, str) or name not in shared.names):
        return False
    shared.name = name
    if "active_lora_adapter" in model.__dict__:  # a plain attribute: skip Module.__setattr__
        model.__dict__["active_lora_adapter"] = name
    return True


def _switch_served(model: nn.Module, name: str | None, cache: AdapterCache | None) -> bool:
    """Switch a model that every layer serves from its cache's slots to an adapter installed in
    a slot (or to the base) by one write to its serving state, touching no layer; False (and
    nothing done) when the switch needs more than that, which ``_plan_switch`` then handles."""
    served = serving.engaged_state(model)
    if served is None or (cache is not None and not served.pool_is(cache)):
        return False
    if name == BASE_ADAPTER or name is None:
        name = None
        served.set_active(None, -1)
    else:
        if cache is None or not isinstance(name, str):
            return False
        installed = _state(model).installed.get(name)
        if installed is None or installed.slot is None or installed.cache is not cache:
            return False
        # Evicted from RAM, or replaced by a newer adapter of that name: the plan handles it.
        if not cache.holds(name, installed.adapter):
            return False
        served.set_active(name, installed.slot)
        _state(model).installed.move_to_end(name)
    if "active_lora_adapter" in model.__dict__:  # a plain attribute: skip Module.__setattr__
        model.__dict__["active_lora_adapter"] = name
    return True


def switch_adapter(
    model: nn.Module,
    name: str | None,
    *,
    cache: AdapterCache | None = None,
    merged: bool = False,
    exact: bool = False,
) -> None:
    """Switch every ``FusedLoraLinear`` of ``model`` to adapter ``name`` in one call.

    Whatever the model ran before (the base, another adapter merged or unmerged) is undone
    first: merged layers are unmerged (bit for bit where they were merged with ``exact=True``).
    Then:

    * ``name=None`` (or ``"__base__"``): the base model, no adapter active.
    * ``merged=False``: the adapter becomes the active one of the layers it targets (the others
      run their base weight); no weight is touched.
    * ``merged=True``: the adapter is added into the weights of the layers it targets
      (``exact=True``: so that the next switch restores them bit for bit; see
      ``FusedLoraLinear.merge``) and the forward runs the plain GEMM.

    With ``cache``, the adapter comes from the cache and is installed in the layers under
    ``name``: as views into its device slot when the cache is attached to this model
    (``AdapterCache.attach``), else as copies on the layers' device. Installed adapters stay
    (inactive) after the model switches away, so switching back to one is a pointer change plus
    the merge, if merged: at most ``lora_kernels.cache.MAX_INSTALLED`` copies, least recently
    used dropped first, or one per slot (a slot an inactive install holds is given back when
    another adapter needs it). ``release_adapters`` removes them. Without ``cache``, ``name``
    must already be an adapter of the layers (``get_lora_model``, ``load_adapter``).

    An unmerged switch without a cache, after one that visited every layer, is one write to
    a model-level state every layer reads (``layers.base.SharedActive``), flat in the number
    of layers, until a layer changes by itself (``set_adapter``, ``merge``, an adapter added or
    deleted): the next switch then visits every layer again.

    An unmerged switch of a model served from the cache's device slots (``cache.attach``, then
    a first ``switch_adapter(model, name, cache=cache)``) to an adapter already in a slot, or to
    the base, writes the model's serving state once (``lora_kernels.serving``): its cost does not
    grow with the number of layers, and a CUDA graph captured before it stays valid.

    Everything is checked before anything changes: an adapter whose modules are not
    ``FusedLoraLinear`` layers of the model, whose shapes do not match, whose rank exceeds the
    slots', which no layer has, or a merged layer that cannot be unmerged exactly raises a
    ``ValueError`` and leaves every weight, active adapter and installed adapter as it was.
    """
    fn = "switch_adapter"
    if not merged and not exact:
        if _switch_served(model, name, cache):
            return
        if cache is None and _switch_shared(model, name):
            return
    _apply_switch(fn, model, _plan_switch(fn, model, name, cache, merged, exact))


def _swappable(layer: nn.Module) -> bool:
    """Merged with exactly one adapter, arithmetically (see ``FusedLoraLinear.swap_merged``)."""
    if not isinstance(layer, FusedLoraLinear):
        return False
    merged = layer.merged_adapters
    return len(merged) == 1 and merged[0] not in layer._exact_records


def _all_adapters(layers: dict[str, nn.Module]) -> set[str]:
    return {n for m in layers.values() for n in m.adapter_names}


def release_adapters(model: nn.Module) -> None:
    """Remove every adapter ``switch_adapter`` installed in ``model`` from a cache, and give
    back the device slots they hold. None of them may be merged (switch to the base first)."""
    fn = "release_adapters"
    layers = _switch_layers(model)
    state = _state(model)
    merged = [p for p, m in layers.items() if any(n in state.installed for n in m.merged_adapters)]
    if merged:
        raise ValueError(
            f"{fn}: layers {merged[:3]} are merged with an installed adapter; switch to the base "
            "(switch_adapter(model, None)) first"
        )
    running = [m for m in layers.values() if m.active_adapter in state.installed]
    for layer in layers.values():  # plain layers again, the adapter they ran kept
        layer._leave_serving()
    for name in list(state.installed):
        _uninstall(model, layers, state, name)
    for layer in running:
        layer.set_adapter(None)
    if getattr(model, "active_lora_adapter", None) not in (None, *_all_adapters(layers)):
        model.active_lora_adapter = None
