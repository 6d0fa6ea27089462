"""The device tier of ``AdapterCache``: a fixed pool of slots per attached model.

Per ``FusedLoraLinear`` of the model, stacked ``lora_a [slots, r_max, K]``, ``lora_b [slots, N,
r_max]``, ``scales [slots]`` and ``ranks [slots]``; per ``FusedLoraExperts`` (MoE experts,
``target_parameters``) and adapted parameter, ``lora_a [slots, E, r_max, in]`` and ``lora_b
[slots, E, out, r_max]`` (the per-expert layout ``moe_lora`` reads with ``adapter_ids`` = slots,
contiguous, in the parameter's dtype) and one ``scales [slots]``; all allocated once by
``attach`` and only ever written in place, so CUDA graphs and the multi-adapter kernels
(``lora_linear_multi`` / ``moe_lora`` with ``adapter_ids`` = slot indices) keep valid pointers.
``prefetch`` starts an adapter's copy into a slot on a side stream and records an event; whoever
uses the slot makes its own stream wait for the event (no host synchronisation), and a slot is
refilled only after the streams that used it are done with it. Slots are reused least recently
used first, never while held. On a CPU the same calls copy synchronously.

:class:`DeviceSlots` is mixed into ``AdapterCache`` (``serving/cache.py``), the RAM tier, and
uses three things of it: ``_lock`` (one lock for both tiers), ``_count(**deltas)`` (its
counters) and ``_acquire(fn, name, hold)`` (an adapter from RAM, read from disk on a miss).
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from ..layers import FusedLoraLinear
from ..layers.moe import EXPERT_PARAMS, FusedLoraExperts
from ..models.config import LoraConfig
from ..models.experts import expert_layers
from ..models.model import lora_layers

__all__ = [
    "AdapterLayer",
    "CachedAdapter",
    "DeviceSlots",
    "ExpertAdapterLayer",
    "ExpertSlotTensors",
    "SlotTensors",
    "servable_layers",
]


def raise_problems(what: str, problems: list[str]) -> None:
    """A ``ValueError`` ``"<what>: <problem>; <problem>; ..."`` (the first 8) if there are any."""
    if problems:
        shown = "; ".join(problems[:8]) + ("; ..." if len(problems) > 8 else "")
        raise ValueError(f"{what}: {shown}")


@dataclass(frozen=True)
class AdapterLayer:
    """One adapted module of a cached adapter: ``lora_a [r, in]``, ``lora_b [out, r]``."""

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    lora_alpha: float
    scaling: float

    @property
    def r(self) -> int:
        return self.lora_a.shape[0]


@dataclass(frozen=True)
class ExpertAdapterLayer:
    """One adapted fused-experts module of a cached adapter, per adapted parameter
    (``gate_up_proj``, ``down_proj``): ``lora_a [E, r, in]`` and ``lora_b [E, out, r]``, the
    per-expert layout of the slots and of ``moe_lora`` (contiguous; PEFT's ``[E r, in]`` /
    ``[out, r E]`` checkpoint tensors reordered once when cached), with rank, alpha and scaling."""

    lora_a: dict[str, torch.Tensor]
    lora_b: dict[str, torch.Tensor]
    r: dict[str, int]
    lora_alpha: dict[str, float]
    scaling: dict[str, float]

    @property
    def num_experts(self) -> int:
        return next(iter(self.lora_a.values())).shape[0]

    @property
    def params(self) -> list[str]:
        """The adapted parameters, inner to outer (``EXPERT_PARAMS`` order)."""
        return [p for p in EXPERT_PARAMS if p in self.lora_a]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for d in (self.lora_a, self.lora_b) for t in d.values())


@dataclass(frozen=True)
class CachedAdapter:
    """An adapter held by an :class:`AdapterCache`: its config and, per module path, its
    tensors (host memory, never changed after they are cached): ``layers`` the dense LoRA
    modules', ``experts`` the fused-experts modules' (``target_parameters``)."""

    name: str
    config: LoraConfig
    layers: dict[str, AdapterLayer]
    nbytes: int
    source: str | None
    experts: dict[str, ExpertAdapterLayer] = field(default_factory=dict)


class SlotTensors(NamedTuple):
    """One layer's device slots, stacked (see ``AdapterCache.slot_tensors``)."""

    lora_a: torch.Tensor  # [slots, r_max, in], zero past each adapter's rank
    lora_b: torch.Tensor  # [slots, out, r_max]
    scales: torch.Tensor  # [slots] float32, 0 where the slot's adapter skips the layer
    ranks: torch.Tensor  # [slots] int32, each slot's true rank (0: skips the layer)


class ExpertSlotTensors(NamedTuple):
    """One ``FusedLoraExperts``'s device slots: per projection ``[slots, E, r_max, in]`` and
    ``[slots, E, out, r_max]`` (None where the slots do not adapt it), ``scales [slots]``
    float32 (the gate-up scaling; a down projection scaled otherwise has the ratio in its B)."""

    lora_a_gate_up: torch.Tensor | None
    lora_b_gate_up: torch.Tensor | None
    lora_a_down: torch.Tensor | None
    lora_b_down: torch.Tensor | None
    scales: torch.Tensor


def servable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every LoRA layer a switch or the slots handle: the model's ``FusedLoraLinear`` /
    ``FusedLoraEmbedding`` layers, then its ``FusedLoraExperts`` (looked for only on a model
    that ``get_lora_model`` marked ``has_lora_experts``: a dense model is not walked twice)."""
    layers = dict(lora_layers(model))
    if model.__dict__.get("has_lora_experts"):
        layers.update(expert_layers(model))
    return layers


def expert_slot_params(layer: FusedLoraExperts) -> list[str]:
    """The parameters ``attach`` gives slots to: those any adapter of the layer adapts (both
    when it has none), so the slots cost nothing for a projection no adapter touches."""
    used = [p for p in EXPERT_PARAMS if layer.r[p]]
    return used or list(EXPERT_PARAMS)


def _unservable(layer: nn.Module) -> str | None:
    """Why ``layer`` cannot read its adapters from device slots (None: it can). Slots hold
    stacked ``lora_A [in]`` / ``lora_B [out]`` in the weight's dtype for ``lora_linear_multi``:
    an embedding's adapters are ``[r, V]`` tables of another kernel, a 4-bit weight's dtype is
    its packed bytes."""
    if isinstance(layer, FusedLoraExperts):
        for p in EXPERT_PARAMS:
            w = getattr(layer.base_layer, p)
            if not w.is_floating_point():
                return f"a FusedLoraExperts with a {w.dtype} (quantized) {p}"
        return None
    if not isinstance(layer, FusedLoraLinear):
        return f"a {type(layer).__name__}"
    if not layer.weight.is_floating_point():
        return f"a {type(layer).__name__} with a {layer.weight.dtype} (quantized) weight"
    return None


def _device(layer: nn.Module) -> torch.device:
    if isinstance(layer, FusedLoraExperts):
        return layer.base_layer.gate_up_proj.device
    return layer.weight.device


@dataclass
class _Pool:
    """The device slots of one model: per module path, stacked adapter tensors."""

    lora_a: dict[str, torch.Tensor]  # [slots, r_max, in]
    lora_b: dict[str, torch.Tensor]  # [slots, out, r_max]
    scales: dict[str, torch.Tensor]  # [slots] float32
    ranks: dict[str, torch.Tensor]  # [slots] int32, 0 where the adapter skips the layer
    max_rank: int
    owner: list[str | None]  # adapter name per slot
    source: list[CachedAdapter | None]  # the cached object each slot was filled from
    refs: list[int]
    lru: OrderedDict  # slot -> None, least recently used first
    events: list[torch.cuda.Event | None]
    stream: torch.cuda.Stream | None
    # per FusedLoraExperts path: {param: (lora_a [slots, E, r_max, in], lora_b [slots, E, out,
    # r_max])} and scales [slots] float32
    experts: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    expert_scales: dict[str, torch.Tensor] = field(default_factory=dict)


class DeviceSlots:
    """The device slots of ``AdapterCache`` (see the module docstring)."""

    _pool: _Pool | None = None
    _model_layers: dict[str, nn.Module]

    # ------------------------------------------------------------------------------------
    # device slots
    # ------------------------------------------------------------------------------------

    def attach(self, model: nn.Module, *, num_slots: int, max_rank: int = 64) -> None:
        """Allocate ``num_slots`` device slots for every ``FusedLoraLinear`` and
        ``FusedLoraExperts`` of ``model``.

        Per ``FusedLoraLinear``: ``lora_a [num_slots, max_rank, in]`` and ``lora_b [num_slots,
        out, max_rank]`` on the layer's device in its weight's dtype (zero-padded past each
        adapter's rank), and ``scales [num_slots]`` float32. Memory: ``num_slots * max_rank *
        (in + out)`` elements per layer. Per ``FusedLoraExperts`` (E experts), for each
        parameter some adapter of the layer adapts (both if none): ``lora_a [num_slots, E,
        max_rank, in]`` and ``lora_b [num_slots, E, out, max_rank]`` in that parameter's dtype,
        ``num_slots * E * max_rank * (in + out)`` elements; cached adapters that adapt another
        parameter of the layer do not fit the slots. Replaces the pool of a previously attached
        model, unless a slot is held.
        """
        fn = "AdapterCache.attach"
        for arg, value in (("num_slots", num_slots), ("max_rank", max_rank)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{fn}: expected {arg} to be a positive int, got {value!r}")
        layers = servable_layers(model)
        if not layers:
            raise ValueError(f"{fn}: the model has no FusedLoraLinear layers")
        unserved = [f"{p} ({why})" for p, m in layers.items() if (why := _unservable(m))]
        if unserved:
            raise ValueError(
                f"{fn}: device slots serve FusedLoraLinear and FusedLoraExperts layers on "
                "16/32-bit weights; the "
                f"model also has {', '.join(unserved[:4])}"
                + (f" and {len(unserved) - 4} more" if len(unserved) > 4 else "")
                + ". Use switch_adapter(model, name, cache=cache) without attach (the cache "
                "then installs device copies); nothing was allocated"
            )
        devices = {_device(m) for m in layers.values()}
        if len(devices) != 1:
            raise ValueError(f"{fn}: the model's layers are on several devices: {devices}")
        (device,) = devices
        with self._lock:
            if self._pool is not None and any(self._pool.refs):
                raise RuntimeError(f"{fn}: slots of the attached model are in use")
            lora_a, lora_b, scales, ranks = {}, {}, {}, {}
            experts, expert_scales = {}, {}
            for path, m in layers.items():
                if isinstance(m, FusedLoraExperts):
                    experts[path] = {}
                    for param in expert_slot_params(m):
                        n_in, n_out = m.features(param)
                        w = getattr(m.base_layer, param)
                        kw = {"dtype": w.dtype, "device": device}
                        experts[path][param] = (
                            torch.zeros(num_slots, m.num_experts, max_rank, n_in, **kw),
                            torch.zeros(num_slots, m.num_experts, n_out, max_rank, **kw),
                        )
                    expert_scales[path] = torch.zeros(num_slots, dtype=torch.float32, device=device)
                    continue
                kw = {"dtype": m.weight.dtype, "device": device}
                lora_a[path] = torch.zeros(num_slots, max_rank, m.in_features, **kw)
                lora_b[path] = torch.zeros(num_slots, m.out_features, max_rank, **kw)
                scales[path] = torch.zeros(num_slots, dtype=torch.float32, device=device)
                ranks[path] = torch.zeros(num_slots, dtype=torch.int32, device=device)
            cuda = device.type == "cuda"
            self._pool = _Pool(
                lora_a=lora_a,
                lora_b=lora_b,
                scales=scales,
                ranks=ranks,
                max_rank=max_rank,
                owner=[None] * num_slots,
                source=[None] * num_slots,
                refs=[0] * num_slots,
                lru=OrderedDict((s, None) for s in range(num_slots)),
                events=[None] * num_slots,
                stream=torch.cuda.Stream(device) if cuda else None,
                experts=experts,
                expert_scales=expert_scales,
            )
            self._model_layers = layers

    @property
    def num_slots(self) -> int:
        with self._lock:
            return 0 if self._pool is None else len(self._pool.owner)

    def slot_owners(self) -> list[str | None]:
        """The adapter in each slot (None: empty)."""
        with self._lock:
            return [] if self._pool is None else list(self._pool.owner)

    def slot_tensors(self, path: str) -> SlotTensors:
        """The stacked slots of the layer at module path ``path``: ``lora_linear_multi(x,
        weight, bias, t.lora_a, t.lora_b, t.scales, slot_ids, ranks=t.ranks)`` runs each row with
        the adapter in its slot; for a ``FusedLoraExperts``, an :class:`ExpertSlotTensors` that
        ``moe_lora`` takes as ``[L, E, ...]`` stacks with ``adapter_ids`` = slots. The same
        tensors for the attached model's lifetime."""
        with self._lock:
            if self._pool is None:
                raise RuntimeError("AdapterCache.slot_tensors: no model attached (call attach)")
            pool = self._pool
            if path in pool.experts:
                stacks = pool.experts[path]
                none = (None, None)
                return ExpertSlotTensors(
                    *stacks.get("gate_up_proj", none),
                    *stacks.get("down_proj", none),
                    pool.expert_scales[path],
                )
            if path not in pool.lora_a:
                raise KeyError(f"AdapterCache.slot_tensors: no FusedLoraLinear at {path!r}")
            return SlotTensors(
                pool.lora_a[path], pool.lora_b[path], pool.scales[path], pool.ranks[path]
            )

    def _check_fits_pool(self, fn: str, adapter: CachedAdapter) -> None:
        pool = self._pool
        problems = []
        for path, lay in adapter.layers.items():
            if path not in pool.lora_a:
                problems.append(f"{path}: not a FusedLoraLinear of the attached model")
                continue
            _, out, _ = pool.lora_b[path].shape
            k = pool.lora_a[path].shape[2]
            if lay.r > pool.max_rank:
                problems.append(f"{path}: rank {lay.r} > the slots' max_rank {pool.max_rank}")
            if lay.lora_a.shape[1] != k or lay.lora_b.shape[0] != out:
                problems.append(
                    f"{path}: expected lora_A [r, {k}] and lora_B [{out}, r], got "
                    f"{list(lay.lora_a.shape)} and {list(lay.lora_b.shape)}"
                )
        for path, lay in adapter.experts.items():
            stacks = pool.experts.get(path)
            if stacks is None:
                problems.append(f"{path}: not a FusedLoraExperts of the attached model")
                continue
            for param in lay.params:
                if param not in stacks:
                    problems.append(
                        f"{path}.{param}: the slots adapt only {sorted(stacks)} of this layer "
                        "(attach gives slots to the parameters its adapters adapt)"
                    )
                    continue
                sa, sb = stacks[param]
                _, e, _, n_in = sa.shape
                n_out = sb.shape[2]
                r = lay.r[param]
                if r > pool.max_rank:
                    problems.append(
                        f"{path}.{param}: rank {r} > the slots' max_rank {pool.max_rank}"
                    )
                want_a, want_b = [e, r, n_in], [e, n_out, r]
                got_a, got_b = list(lay.lora_a[param].shape), list(lay.lora_b[param].shape)
                if got_a != want_a or got_b != want_b:
                    problems.append(
                        f"{path}.{param}: expected per-expert lora_A {want_a} and lora_B "
                        f"{want_b}, got {got_a} and {got_b}"
                    )
        raise_problems(f"{fn}: adapter {adapter.name!r} does not fit the slots", problems)

    def _fill_expert_slots(self, slot: int, adapter: CachedAdapter) -> int:
        """Copy ``adapter``'s expert factors into ``slot`` (zeros where it adapts nothing);
        returns the bytes moved. A down projection whose scaling differs from the gate-up's
        gets the ratio folded into its B, as ``FusedLoraExperts`` does for one call."""
        pool = self._pool
        moved = 0
        for path, stacks in pool.experts.items():
            lay = adapter.experts.get(path)
            scale = 0.0
            if lay is not None:
                scale = lay.scaling.get("gate_up_proj", lay.scaling.get("down_proj", 0.0))
            for param, (sa, sb) in stacks.items():
                if lay is None or param not in lay.lora_a:
                    sa[slot].zero_()
                    sb[slot].zero_()
                    continue
                r = lay.r[param]
                sa[slot, :, :r].copy_(lay.lora_a[param], non_blocking=True)
                sa[slot, :, r:].zero_()
                sb[slot, :, :, :r].copy_(lay.lora_b[param], non_blocking=True)
                sb[slot, :, :, r:].zero_()
                ratio = lay.scaling[param] / scale if scale else 1.0
                if ratio != 1.0:
                    sb[slot].mul_(ratio)
                moved += lay.lora_a[param].nbytes + lay.lora_b[param].nbytes
            pool.expert_scales[path][slot].fill_(scale)
        return moved

    def _fill_slot(self, slot: int, adapter: CachedAdapter) -> None:
        """Copy ``adapter`` into ``slot`` of every layer (zeros where it has no module)."""
        pool = self._pool
        stream = pool.stream
        ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
        if stream is not None:
            # Kernels already queued on the compute stream may still read the old contents.
            stream.wait_stream(torch.cuda.current_stream(stream.device))
        moved = 0
        with ctx, torch.no_grad():
            for path, pa in pool.lora_a.items():
                pb = pool.lora_b[path]
                lay = adapter.layers.get(path)
                if lay is None:
                    pa[slot].zero_()
                    pb[slot].zero_()
                    pool.scales[path][slot].fill_(0.0)
                    pool.ranks[path][slot].fill_(0)
                    continue
                r = lay.r
                pa[slot, :r].copy_(lay.lora_a, non_blocking=True)
                pa[slot, r:].zero_()
                pb[slot, :, :r].copy_(lay.lora_b, non_blocking=True)
                pb[slot, :, r:].zero_()
                pool.scales[path][slot].fill_(lay.scaling)
                pool.ranks[path][slot].fill_(r)
                moved += lay.lora_a.nbytes + lay.lora_b.nbytes
            moved += self._fill_expert_slots(slot, adapter)
            if stream is not None:
                event = torch.cuda.Event()
                event.record(stream)
                pool.events[slot] = event
        pool.owner[slot] = adapter.name
        pool.source[slot] = adapter
        self._count(slot_misses=1, bytes_to_device=moved)

    def _slot_for(self, fn: str, adapter: CachedAdapter) -> int:
        """The slot holding ``adapter`` (filled now if needed). Holds the lock."""
        if self._pool is None:
            raise RuntimeError(f"{fn}: no model attached (call attach first)")
        pool = self._pool
        name = adapter.name
        if name in pool.owner:
            slot = pool.owner.index(name)
            if pool.source[slot] is adapter:
                pool.lru.move_to_end(slot)
                self._count(slot_hits=1)
                return slot
            if pool.refs[slot]:
                raise RuntimeError(
                    f"{fn}: adapter {name!r} changed in the cache while its slot {slot} is in use"
                )
        else:
            free = [s for s in pool.lru if pool.owner[s] is None]
            idle = [s for s in pool.lru if pool.refs[s] == 0]
            if not free and not idle:
                raise RuntimeError(
                    f"{fn}: all {len(pool.owner)} slots are in use ({pool.owner}); release one "
                    "or attach with more slots"
                )
            slot = (free or idle)[0]
        self._check_fits_pool(fn, adapter)
        if pool.owner[slot] is not None:
            self._count(slot_evictions=1)
        self._fill_slot(slot, adapter)
        pool.lru.move_to_end(slot)
        return slot

    def prefetch(self, name: str) -> int | None:
        """Bring ``name`` into RAM (from disk if needed) and, with a model attached, start its
        copy into a device slot without waiting for it; returns the slot (None: no pool)."""
        adapter = self._acquire("AdapterCache.prefetch", name, hold=False)
        with self._lock:
            if self._pool is None:
                return None
            return self._slot_for("AdapterCache.prefetch", adapter)

    # ------------------------------------------------------------------------------------
    # what switch_adapter asks of the cache (lora_kernels.serving.switch)
    # ------------------------------------------------------------------------------------

    def hold_slot(self, fn: str, adapter: CachedAdapter) -> int:
        """Fill (if needed) and hold ``adapter``'s slot, and make the current stream wait for
        its copy; returns the slot. ``release_slot`` gives it back."""
        with self._lock:
            slot = self._slot_for(fn, adapter)
            pool = self._pool
            pool.refs[slot] += 1
            event = pool.events[slot]
            stream = pool.stream
        if event is not None:
            torch.cuda.current_stream(stream.device).wait_event(event)
        return slot

    def release_slot(self, slot: int) -> None:
        with self._lock:
            if self._pool is not None and self._pool.refs[slot] > 0:
                self._pool.refs[slot] -= 1

    @contextlib.contextmanager
    def use_slot(self, name: str) -> Iterator[int]:
        """``with cache.use_slot(name) as slot:`` ``name`` sits in ``slot`` (copy complete as
        seen from the current stream) and the slot is not refilled inside the block."""
        fn = "AdapterCache.use_slot"
        slot = self.hold_slot(fn, self._acquire(fn, name, hold=False))
        try:
            yield slot
        finally:
            self.release_slot(slot)

    def pool_token(self) -> object | None:
        """An object that is the same exactly as long as the attached pool is (None: none);
        the serving state compares it to know the slots it reads are still the cache's."""
        with self._lock:
            return self._pool

    def has_slots_for(self, layers: Mapping[str, nn.Module]) -> bool:
        """The cache is attached to exactly these layers (``attach``), so adapters can be
        installed as views into its slots."""
        with self._lock:
            return self._pool is not None and self._model_layers == layers

    def check_fits_slots(self, fn: str, adapter: CachedAdapter) -> None:
        """Raise a ``ValueError`` unless ``adapter`` fits the attached model's slots."""
        with self._lock:
            self._check_fits_pool(fn, adapter)

    def slot_available(self, name: str, mine: Sequence[int] | None = None) -> bool:
        """A slot for adapter ``name`` is free now (it already sits in one, or one is held by
        no one), or would be once the holds counted per slot in ``mine`` are given back."""
        with self._lock:
            pool = self._pool
            mine = [0] * len(pool.refs) if mine is None else mine
            return name in pool.owner or any(
                held == own for held, own in zip(pool.refs, mine, strict=True)
            )
