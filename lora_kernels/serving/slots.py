"""The device tier of ``AdapterCache``: a fixed pool of slots per attached model.

Per ``FusedLoraLinear`` of the model, stacked ``lora_a [slots, r_max, K]``, ``lora_b [slots, N,
r_max]``, ``scales [slots]`` and ``ranks [slots]``, allocated once by ``attach`` and only ever
written in place, so CUDA graphs and the multi-adapter kernels (``lora_linear_multi`` with
``adapter_ids`` = slot indices) keep valid pointers. ``prefetch`` starts an adapter's copy into a
slot on a side stream and records an event; whoever uses the slot makes its own stream wait for
the event (no host synchronisation), and a slot is refilled only after the streams that used it
are done with it. Slots are reused least recently used first, never while held. On a CPU the
same calls copy synchronously.

:class:`DeviceSlots` is mixed into ``AdapterCache`` (``serving/cache.py``), the RAM tier, and
uses three things of it: ``_lock`` (one lock for both tiers), ``_count(**deltas)`` (its
counters) and ``_acquire(fn, name, hold)`` (an adapter from RAM, read from disk on a miss).
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from ..layers import FusedLoraLinear
from ..models.config import LoraConfig
from ..models.model import lora_layers

__all__ = ["AdapterLayer", "CachedAdapter", "DeviceSlots", "SlotTensors"]


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
class CachedAdapter:
    """An adapter held by an :class:`AdapterCache`: its config and, per module path, its
    tensors (host memory, never changed after they are cached)."""

    name: str
    config: LoraConfig
    layers: dict[str, AdapterLayer]
    nbytes: int
    source: str | None


class SlotTensors(NamedTuple):
    """One layer's device slots, stacked (see ``AdapterCache.slot_tensors``)."""

    lora_a: torch.Tensor  # [slots, r_max, in], zero past each adapter's rank
    lora_b: torch.Tensor  # [slots, out, r_max]
    scales: torch.Tensor  # [slots] float32, 0 where the slot's adapter skips the layer
    ranks: torch.Tensor  # [slots] int32, each slot's true rank (0: skips the layer)


def _unservable(layer: nn.Module) -> str | None:
    """Why ``layer`` cannot read its adapters from device slots (None: it can). Slots hold
    stacked ``lora_A [in]`` / ``lora_B [out]`` in the weight's dtype for ``lora_linear_multi``:
    an embedding's adapters are ``[r, V]`` tables of another kernel, a 4-bit weight's dtype is
    its packed bytes."""
    if not isinstance(layer, FusedLoraLinear):
        return f"a {type(layer).__name__}"
    if not layer.weight.is_floating_point():
        return f"a {type(layer).__name__} with a {layer.weight.dtype} (quantized) weight"
    return None


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


class DeviceSlots:
    """The device slots of ``AdapterCache`` (see the module docstring)."""

    _pool: _Pool | None = None
    _model_layers: dict[str, FusedLoraLinear]

    # ------------------------------------------------------------------------------------
    # device slots
    # ------------------------------------------------------------------------------------

    def attach(self, model: nn.Module, *, num_slots: int, max_rank: int = 64) -> None:
        """Allocate ``num_slots`` device slots for every ``FusedLoraLinear`` of ``model``.

        Per layer: ``lora_a [num_slots, max_rank, in]`` and ``lora_b [num_slots, out, max_rank]``
        on the layer's device in its weight's dtype (zero-padded past each adapter's rank), and
        ``scales [num_slots]`` float32. Memory: ``num_slots * max_rank * (in + out)`` elements
        per layer. Replaces the pool of a previously attached model, unless a slot is held.
        """
        fn = "AdapterCache.attach"
        for arg, value in (("num_slots", num_slots), ("max_rank", max_rank)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{fn}: expected {arg} to be a positive int, got {value!r}")
        layers = dict(lora_layers(model))
        if not layers:
            raise ValueError(f"{fn}: the model has no FusedLoraLinear layers")
        unserved = [f"{p} ({why})" for p, m in layers.items() if (why := _unservable(m))]
        if unserved:
            raise ValueError(
                f"{fn}: device slots serve FusedLoraLinear layers on a 16/32-bit weight; the "
                f"model also has {', '.join(unserved[:4])}"
                + (f" and {len(unserved) - 4} more" if len(unserved) > 4 else "")
                + ". Use switch_adapter(model, name, cache=cache) without attach (the cache "
                "then installs device copies); nothing was allocated"
            )
        devices = {m.weight.device for m in layers.values()}
        if len(devices) != 1:
            raise ValueError(f"{fn}: the model's layers are on several devices: {devices}")
        (device,) = devices
        with self._lock:
            if self._pool is not None and any(self._pool.refs):
                raise RuntimeError(f"{fn}: slots of the attached model are in use")
            lora_a, lora_b, scales, ranks = {}, {}, {}, {}
            for path, m in layers.items():
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
        the adapter in its slot. The same tensors for the attached model's lifetime."""
        with self._lock:
            if self._pool is None:
                raise RuntimeError("AdapterCache.slot_tensors: no model attached (call attach)")
            if path not in self._pool.lora_a:
                raise KeyError(f"AdapterCache.slot_tensors: no FusedLoraLinear at {path!r}")
            pool = self._pool
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
        raise_problems(f"{fn}: adapter {adapter.name!r} does not fit the slots", problems)

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

    def has_slots_for(self, layers: Mapping[str, FusedLoraLinear]) -> bool:
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
