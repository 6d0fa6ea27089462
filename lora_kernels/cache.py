"""Adapters cached in RAM, a fixed pool of device slots, and switching a whole model between them.

The point of LoRA in production: the base model is loaded once, and a model is specialised by
moving an adapter (its small A and B matrices) to the device and adding ``scale * B @ A`` to the
weights, or by running it unmerged beside the base, never by re-reading a fine-tuned model.
The tiers, slowest first::

    disk (PEFT adapter directories)
      -> RAM: AdapterCache, capacity in bytes, LRU eviction, pinned when CUDA is available
      -> device slots: per FusedLoraLinear, stacked lora_a [slots, r_max, K], lora_b
         [slots, N, r_max] and scales [slots], filled in place on a side stream
      -> the model: switch_adapter merges the adapter into the weights (exact or arithmetic) or
         makes it the active unmerged adapter

RAM: ``put`` (a state dict) and ``load`` (a PEFT directory, read with
:func:`lora_kernels.checkpoint.read_peft_adapter`) copy an adapter in; ``get`` returns it (a hit)
or reads it again from its directory after an eviction (a miss); ``use`` holds it so that it is
never evicted. Host copies are pinned only when CUDA is available: pinned pages are what let a
host-to-device copy run asynchronously, and pinning without a GPU only locks RAM.

Device slots (``attach``): one pool per model, allocated once and only ever written in place,
so CUDA graphs and the multi-adapter kernels (``lora_linear_multi`` with ``adapter_ids`` = slot
indices, see ``slot_tensors``) keep valid pointers. ``prefetch`` starts an adapter's copy into a
slot on a side stream and records an event; whoever uses the slot makes its own stream wait for
the event (no host synchronisation), and a slot is refilled only after the streams that used it
are done with it. Slots are reused least recently used first, never while held (``use_slot``, or
installed in a model by ``switch_adapter``). On a CPU the same calls copy synchronously.

Every method of :class:`AdapterCache` may be called from several threads (one lock; a disk read
runs outside it). :func:`switch_adapter` changes a model and is not meant to race with itself on
the same model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from .checkpoint import read_peft_adapter, split_peft_key
from .model import LoraConfig
from .nn import BASE_ADAPTER, FusedLoraLinear
from .switching import check_exact_unmerge

__all__ = [
    "AdapterCache",
    "AdapterLayer",
    "CacheStats",
    "CachedAdapter",
    "MAX_INSTALLED",
    "SlotTensors",
    "release_adapters",
    "switch_adapter",
]


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


@dataclass(frozen=True)
class CacheStats:
    """Counters since the cache was made (a snapshot: ``AdapterCache.stats``).

    hits / misses: ``get``-like lookups that found the adapter in RAM / had to read it from disk
    (or failed); disk_reads and bytes_read: adapter directories read; evictions: adapters
    dropped from RAM to make room; slot_hits / slot_misses: requests for a device slot that
    found the adapter there / copied it in; slot_evictions: slots taken from another adapter;
    bytes_to_device: bytes copied from RAM to a device (slots and model installs).
    """

    hits: int = 0
    misses: int = 0
    disk_reads: int = 0
    bytes_read: int = 0
    evictions: int = 0
    slot_hits: int = 0
    slot_misses: int = 0
    slot_evictions: int = 0
    bytes_to_device: int = 0


class SlotTensors(NamedTuple):
    """One layer's device slots, stacked (see ``AdapterCache.slot_tensors``)."""

    lora_a: torch.Tensor  # [slots, r_max, in], zero past each adapter's rank
    lora_b: torch.Tensor  # [slots, out, r_max]
    scales: torch.Tensor  # [slots] float32, 0 where the slot's adapter skips the layer
    ranks: torch.Tensor  # [slots] int32, each slot's true rank (0: skips the layer)


@dataclass
class _Entry:
    adapter: CachedAdapter
    refs: int = 0


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
    generation: list[int]  # bumped at every refill: installs of an older fill are stale
    refs: list[int]
    lru: OrderedDict  # slot -> None, least recently used first
    events: list[torch.cuda.Event | None]
    stream: torch.cuda.Stream | None


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _check_name(fn: str, name: object) -> None:
    if not isinstance(name, str) or not name or name == BASE_ADAPTER or "." in name:
        raise ValueError(
            f"{fn}: expected name to be a non-empty str without '.', other than "
            f"{BASE_ADAPTER!r}, got {name!r}"
        )


def _layers_of(model: nn.Module) -> dict[str, FusedLoraLinear]:
    return {p: m for p, m in model.named_modules() if isinstance(m, FusedLoraLinear)}


class AdapterCache:
    """LoRA adapters in (pinned) RAM with LRU eviction, and a pool of device slots.

    Args:
        capacity_bytes: the most RAM the cached adapters' tensors may take together.
        dtype: store adapters in this dtype (e.g. the model's, so a device copy needs no cast);
            None keeps each tensor's own floating dtype.
        pin_memory: pin the host copies; None pins exactly when CUDA is available.

    Example::

        cache = lk.AdapterCache(2 << 30, dtype=torch.bfloat16)
        cache.load("sql", "adapters/sql")          # a directory PEFT's save_pretrained wrote
        cache.attach(model, num_slots=4, max_rank=64)
        cache.prefetch("sql")                       # RAM -> slot, overlapping compute
        lk.switch_adapter(model, "sql", cache=cache, merged=True, exact=True)
    """

    def __init__(
        self,
        capacity_bytes: int,
        *,
        dtype: torch.dtype | None = None,
        pin_memory: bool | None = None,
    ) -> None:
        fn = "AdapterCache"
        if isinstance(capacity_bytes, bool) or not isinstance(capacity_bytes, int):
            raise TypeError(f"{fn}: expected capacity_bytes to be an int, got {capacity_bytes!r}")
        if capacity_bytes < 1:
            raise ValueError(f"{fn}: expected capacity_bytes >= 1, got {capacity_bytes}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"{fn}: expected dtype to be a floating torch.dtype, got {dtype!r}")
        self.capacity_bytes = capacity_bytes
        self.dtype = dtype
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self._lock = threading.RLock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._sources: dict[str, str] = {}
        self._nbytes = 0
        self._stats = CacheStats()
        self._pool: _Pool | None = None
        self._model_layers: dict[str, FusedLoraLinear] = {}

    # ------------------------------------------------------------------------------------
    # RAM tier
    # ------------------------------------------------------------------------------------

    def _count(self, **deltas: int) -> None:
        self._stats = dataclasses.replace(
            self._stats, **{k: getattr(self._stats, k) + v for k, v in deltas.items()}
        )

    @property
    def stats(self) -> CacheStats:
        with self._lock:
            return self._stats

    @property
    def nbytes(self) -> int:
        """RAM the cached adapters take now."""
        with self._lock:
            return self._nbytes

    def names(self) -> list[str]:
        """The adapters in RAM, least recently used first."""
        with self._lock:
            return list(self._entries)

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def _host_copy(self, t: torch.Tensor, owned: bool) -> torch.Tensor:
        dtype = self.dtype or t.dtype
        if owned and not self.pin_memory and t.dtype == dtype and t.is_contiguous():
            return t
        out = torch.empty(t.shape, dtype=dtype, pin_memory=self.pin_memory)
        return out.copy_(t)

    def _build(
        self,
        fn: str,
        name: str,
        tensors: Mapping[str, torch.Tensor],
        config: LoraConfig | Mapping | None,
        source: str | None,
        owned: bool,
    ) -> CachedAdapter:
        """Check an adapter's keys, shapes and config, and copy it into host memory."""
        _check_name(fn, name)
        if isinstance(config, LoraConfig):
            cfg = config
        elif isinstance(config, Mapping):
            try:
                cfg = LoraConfig.from_dict(dict(config), loading=True)
            except (TypeError, ValueError) as e:
                raise ValueError(f"{fn}: adapter {name!r}: {e}") from None
        else:
            raise TypeError(
                f"{fn}: expected config to be a LoraConfig or PEFT's config dict, got "
                f"{type(config).__name__}"
            )
        # A cached adapter serves inference: its installed weights take no gradients.
        cfg = dataclasses.replace(cfg, inference_mode=True)
        if not isinstance(tensors, Mapping) or not tensors:
            raise ValueError(f"{fn}: adapter {name!r} has no tensors")
        parts: dict[str, dict[str, torch.Tensor]] = {}
        problems = []
        for key, t in tensors.items():
            try:
                path, part = split_peft_key(key)
            except ValueError:
                problems.append(f"{key!r} is not a LoRA A/B weight (the cache holds only those)")
                continue
            if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() != 2:
                what = f"{t.dtype} {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t)
                problems.append(f"{key!r}: expected a 2-D floating tensor, got {what}")
                continue
            parts.setdefault(path, {})[part] = t
        layers = {}
        for path, pair in sorted(parts.items()):
            if set(pair) != {"lora_A", "lora_B"}:
                problems.append(f"{path}: has {sorted(pair)} but needs both lora_A and lora_B")
                continue
            a, b = pair["lora_A"], pair["lora_B"]
            r = a.shape[0]
            if b.shape[1] != r:
                problems.append(
                    f"{path}: lora_A {list(a.shape)} and lora_B {list(b.shape)} disagree in rank"
                )
                continue
            want_r, alpha = cfg.rank_and_alpha(path)
            if want_r != r:
                problems.append(f"{path}: the config gives rank {want_r}, the tensors rank {r}")
                continue
            # The formula of FusedLoraLinear.add_adapter, so slot scales equal layer scalings.
            scaling = alpha / (math.sqrt(r) if cfg.use_rslora else r)
            layers[path] = (a, b, float(alpha), float(scaling))
        if problems:
            shown = "; ".join(problems[:8]) + ("; ..." if len(problems) > 8 else "")
            raise ValueError(f"{fn}: adapter {name!r} cannot be cached: {shown}")
        host = {
            path: AdapterLayer(self._host_copy(a, owned), self._host_copy(b, owned), alpha, sc)
            for path, (a, b, alpha, sc) in layers.items()
        }
        nbytes = sum(
            t.numel() * t.element_size() for lay in host.values() for t in (lay.lora_a, lay.lora_b)
        )
        return CachedAdapter(name, cfg, host, nbytes, source)

    def _insert(self, fn: str, adapter: CachedAdapter) -> None:
        """Make room (LRU, never an adapter in use) and insert; all or nothing. Holds the lock."""
        name = adapter.name
        old = self._entries.get(name)
        if old is not None and old.refs:
            raise RuntimeError(f"{fn}: adapter {name!r} is in use and cannot be replaced")
        freed = old.adapter.nbytes if old is not None else 0
        need = self._nbytes - freed + adapter.nbytes - self.capacity_bytes
        if adapter.nbytes > self.capacity_bytes:
            raise ValueError(
                f"{fn}: adapter {name!r} takes {_fmt_bytes(adapter.nbytes)}, more than the "
                f"cache's capacity of {_fmt_bytes(self.capacity_bytes)}"
            )
        victims = []
        for other, entry in self._entries.items():
            if need <= 0:
                break
            if other != name and entry.refs == 0:
                victims.append(other)
                need -= entry.adapter.nbytes
        if need > 0:
            raise RuntimeError(
                f"{fn}: no room for adapter {name!r} ({_fmt_bytes(adapter.nbytes)}): the "
                f"adapters in use take {_fmt_bytes(self._nbytes - freed)} of "
                f"{_fmt_bytes(self.capacity_bytes)}"
            )
        for other in victims:
            self._nbytes -= self._entries.pop(other).adapter.nbytes
        self._count(evictions=len(victims))
        if old is not None:
            self._nbytes -= self._entries.pop(name).adapter.nbytes
        self._entries[name] = _Entry(adapter)
        self._nbytes += adapter.nbytes

    def put(
        self,
        name: str,
        tensors: Mapping[str, torch.Tensor],
        config: LoraConfig | Mapping,
    ) -> CachedAdapter:
        """Cache an adapter from a state dict (copied; the caller's tensors are not kept).

        ``tensors`` is keyed as PEFT saves (``base_model.model.<module>.lora_A.weight``) or as
        a PEFT model's state dict (``<module>.lora_B.<adapter>.weight``); ``config`` is a
        :class:`LoraConfig` or PEFT's config dict. Replaces an adapter of the same name unless
        it is in use. Evicts least recently used adapters (never one in use) to make room.
        """
        adapter = self._build("AdapterCache.put", name, tensors, config, None, owned=False)
        with self._lock:
            self._insert("AdapterCache.put", adapter)
            self._sources.pop(name, None)
        return adapter

    def _read(self, fn: str, name: str, path: str) -> CachedAdapter:
        config, tensors = read_peft_adapter(path)
        adapter = self._build(fn, name, tensors, config, path, owned=True)
        with self._lock:
            self._count(disk_reads=1, bytes_read=adapter.nbytes)
        return adapter

    def load(self, name: str, path: str | os.PathLike, *, lazy: bool = False) -> None:
        """Cache the PEFT adapter directory ``path`` (``adapter_config.json`` and
        ``adapter_model.safetensors``) as ``name``; it is read again after an eviction.

        ``lazy=True`` only records the directory: the first ``get``/``prefetch`` reads it.
        """
        fn = "AdapterCache.load"
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{fn}: expected path to be an adapter directory, got {path!r}")
        if lazy:
            _check_name(fn, name)
            with self._lock:
                self._sources[name] = path
            return
        adapter = self._read(fn, name, path)
        with self._lock:
            self._insert(fn, adapter)
            self._sources[name] = path

    def _acquire(self, fn: str, name: str, hold: bool) -> CachedAdapter:
        """The adapter, from RAM (a hit) or from its directory (a miss); ``hold`` takes a ref."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is not None:
                self._entries.move_to_end(name)
                self._count(hits=1)
                entry.refs += hold
                return entry.adapter
            self._count(misses=1)
            path = self._sources.get(name)
        if path is None:
            raise KeyError(
                f"{fn}: adapter {name!r} is not cached and has no directory to load it from; "
                f"cached: {self.names()}"
            )
        adapter = self._read(fn, name, path)
        with self._lock:
            # Another thread may have cached it while this one read the directory.
            entry = self._entries.get(name)
            if entry is None:
                self._insert(fn, adapter)
                entry = self._entries[name]
            self._entries.move_to_end(name)
            entry.refs += hold
            return entry.adapter

    def _release(self, name: str) -> None:
        with self._lock:
            entry = self._entries.get(name)
            if entry is not None and entry.refs > 0:
                entry.refs -= 1

    def get(self, name: str) -> CachedAdapter:
        """The cached adapter ``name`` (read from its directory if it was evicted).

        The returned object stays valid, but the cache may evict it; hold it with ``use``.
        """
        return self._acquire("AdapterCache.get", name, hold=False)

    @contextlib.contextmanager
    def use(self, name: str) -> Iterator[CachedAdapter]:
        """``with cache.use(name) as adapter:`` the adapter is not evicted inside the block."""
        adapter = self._acquire("AdapterCache.use", name, hold=True)
        try:
            yield adapter
        finally:
            self._release(name)

    def evict(self, name: str) -> None:
        """Drop ``name`` from RAM (its directory, if any, is kept for a later ``get``)."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                raise KeyError(f"AdapterCache.evict: adapter {name!r} is not in RAM")
            if entry.refs:
                raise RuntimeError(f"AdapterCache.evict: adapter {name!r} is in use")
            self._nbytes -= self._entries.pop(name).adapter.nbytes

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
        layers = _layers_of(model)
        if not layers:
            raise ValueError(f"{fn}: the model has no FusedLoraLinear layers")
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
                generation=[0] * num_slots,
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
        if problems:
            shown = "; ".join(problems[:8]) + ("; ..." if len(problems) > 8 else "")
            raise ValueError(f"{fn}: adapter {adapter.name!r} does not fit the slots: {shown}")

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
        pool.generation[slot] += 1
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

    def _hold_slot(self, fn: str, adapter: CachedAdapter) -> tuple[int, int]:
        """Fill (if needed) and hold ``adapter``'s slot, and make the current stream wait for
        its copy; returns ``(slot, generation)``."""
        with self._lock:
            slot = self._slot_for(fn, adapter)
            pool = self._pool
            pool.refs[slot] += 1
            event = pool.events[slot]
            generation = pool.generation[slot]
            stream = pool.stream
        if event is not None:
            torch.cuda.current_stream(stream.device).wait_event(event)
        return slot, generation

    def _unhold_slot(self, slot: int) -> None:
        with self._lock:
            if self._pool is not None and self._pool.refs[slot] > 0:
                self._pool.refs[slot] -= 1

    @contextlib.contextmanager
    def use_slot(self, name: str) -> Iterator[int]:
        """``with cache.use_slot(name) as slot:`` ``name`` sits in ``slot`` (copy complete as
        seen from the current stream) and the slot is not refilled inside the block."""
        fn = "AdapterCache.use_slot"
        slot, _ = self._hold_slot(fn, self._acquire(fn, name, hold=False))
        try:
            yield slot
        finally:
            self._unhold_slot(slot)


# ----------------------------------------------------------------------------------------------
# switching a model
# ----------------------------------------------------------------------------------------------


MAX_INSTALLED = 4
"""Adapters ``switch_adapter`` keeps installed in a model without device slots (device copies,
least recently used dropped first); with slots, the number of slots bounds them."""


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


def _check_fits_model(
    fn: str, layers: dict[str, FusedLoraLinear], adapter: CachedAdapter, ours: bool
) -> None:
    problems = []
    for path, lay in adapter.layers.items():
        layer = layers.get(path)
        if layer is None:
            problems.append(f"{path}: the model has no FusedLoraLinear there")
            continue
        want_a = [lay.r, layer.in_features]
        want_b = [layer.out_features, lay.r]
        if list(lay.lora_a.shape) != want_a or list(lay.lora_b.shape) != want_b:
            problems.append(
                f"{path}: expected lora_A {want_a} and lora_B {want_b}, got "
                f"{list(lay.lora_a.shape)} and {list(lay.lora_b.shape)}"
            )
    if problems:
        shown = "; ".join(problems[:8]) + ("; ..." if len(problems) > 8 else "")
        raise ValueError(f"{fn}: adapter {adapter.name!r} does not fit the model: {shown}")
    clash = [p for p, m in layers.items() if adapter.name in m.lora_A]
    if clash and not ours:
        raise ValueError(
            f"{fn}: layers {clash[:3]} already have an adapter named {adapter.name!r} that the "
            "cache did not install; delete it or cache the adapter under another name"
        )


def _check_unmergeable(fn: str, layers: dict[str, FusedLoraLinear]) -> None:
    """Every merged layer can be unmerged (exact records still match their adapters)."""
    for path, layer in layers.items():
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
    for path in installed.adapter.layers:
        layer = layers.get(path)
        if layer is not None and name in layer.lora_A:
            layer.delete_adapter(name)
    if installed.slot is not None:
        installed.cache._unhold_slot(installed.slot)


def _install(
    model: nn.Module,
    layers: dict[str, FusedLoraLinear],
    cache: AdapterCache,
    adapter: CachedAdapter,
    slot: int | None,
) -> _Installed:
    """Add ``adapter`` to its layers: views into the held ``slot``, or device copies."""
    moved = 0
    with torch.no_grad():
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
        with cache._lock:
            cache._count(bytes_to_device=moved)
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
    with cache._lock:
        pool = cache._pool
        return adapter.name in pool.owner or any(
            held == mine for held, mine in zip(pool.refs, ours, strict=True)
        )


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
    the merge, if merged: at most ``MAX_INSTALLED`` copies, least recently used dropped first,
    or one per slot (a slot an inactive install holds is given back when another adapter needs
    it). ``release_adapters`` removes them. Without ``cache``, ``name`` must already be an
    adapter of the layers (``get_lora_model``, ``load_adapter``).

    Everything is checked before anything changes: an adapter whose modules are not
    ``FusedLoraLinear`` layers of the model, whose shapes do not match, whose rank exceeds the
    slots', which no layer has, or a merged layer that cannot be unmerged exactly raises a
    ``ValueError`` and leaves every weight, active adapter and installed adapter as it was.
    """
    fn = "switch_adapter"
    if name == BASE_ADAPTER:
        name = None
    if name is not None and not isinstance(name, str):
        raise TypeError(f"{fn}: expected name to be a str or None, got {type(name).__name__}")
    if cache is not None and not isinstance(cache, AdapterCache):
        raise TypeError(f"{fn}: expected cache to be an AdapterCache, got {type(cache).__name__}")
    if exact and not merged:
        raise ValueError(f"{fn}: exact=True applies to merged=True switches only")
    layers = _layers_of(model)
    if not layers:
        raise ValueError(f"{fn}: the model has no FusedLoraLinear layers")
    state = _state(model)

    adapter = None
    install = use_slots = False
    if name is not None and cache is not None:
        adapter = cache.get(name)
        current = state.installed.get(name)
        _check_fits_model(fn, layers, adapter, ours=current is not None)
        with cache._lock:
            use_slots = cache._pool is not None and cache._model_layers == layers
            # Installed again: a first switch to it, a newer adapter of that name in the cache,
            # another cache, or copies made before the cache got slots for this model.
            install = (
                current is None
                or current.adapter is not adapter
                or current.cache is not cache
                or (use_slots and current.slot is None)
            )
            if install and use_slots:
                cache._check_fits_pool(fn, adapter)
        if install and use_slots and not _slot_obtainable(cache, adapter, state):
            raise RuntimeError(
                f"{fn}: every device slot of the cache is held elsewhere; none is free for "
                f"adapter {name!r}"
            )
    elif name is not None:
        if name in state.installed:
            raise ValueError(
                f"{fn}: adapter {name!r} was installed from a cache; pass cache= to switch to it"
            )
        if not any(name in m.lora_A for m in layers.values()):
            have = sorted({n for m in layers.values() for n in m.adapter_names})
            raise ValueError(f"{fn}: no layer of the model has adapter {name!r}; they have {have}")
    _check_unmergeable(fn, layers)

    # Nothing has changed so far; from here on every step is one that the checks cleared.
    # A layer merged (arithmetically) with one adapter that moves to another already there
    # swaps them in one pass over its weight; every other merged layer is unmerged first.
    swap = merged and not exact and name is not None and not install
    swapped = set()
    for path, layer in layers.items():
        if swap and name in layer.lora_A and _swappable(layer):
            layer.swap_merged(name)
            swapped.add(path)
        elif layer.merged:
            layer.unmerge()
    if install:
        if name in state.installed:  # a stale install: the cache holds a newer adapter now
            _uninstall(model, layers, state, name)
        slot = None
        if use_slots:
            # Give back slots that inactive installs hold, least recently used first, until one
            # is free for the new adapter.
            holders = [
                n for n, i in state.installed.items() if i.cache is cache and i.slot is not None
            ]
            while holders and not _slot_free(cache, adapter):
                _uninstall(model, layers, state, holders.pop(0))
            slot, _ = cache._hold_slot(fn, adapter)
        state.installed[name] = _install(model, layers, cache, adapter, slot)
    target = state.installed.get(name)
    if target is not None:
        state.installed.move_to_end(name)
    copies = [n for n, i in state.installed.items() if i.slot is None and n != name]
    excess = len(copies) + (target is not None and target.slot is None) - MAX_INSTALLED
    for victim in copies[: max(0, excess)]:
        _uninstall(model, layers, state, victim)
    for path, layer in layers.items():
        if path in swapped:
            continue
        if name is not None and name in layer.lora_A:
            layer.set_adapter(name)
            if merged:
                layer.merge(name, exact=exact)
        else:
            layer.set_adapter(None)
    if hasattr(model, "active_lora_adapter"):
        model.active_lora_adapter = name


def _swappable(layer: FusedLoraLinear) -> bool:
    """Merged with exactly one adapter, arithmetically (see ``FusedLoraLinear.swap_merged``)."""
    merged = layer.merged_adapters
    return len(merged) == 1 and merged[0] not in layer._exact_records


def _all_adapters(layers: dict[str, FusedLoraLinear]) -> set[str]:
    return {n for m in layers.values() for n in m.adapter_names}


def _slot_free(cache: AdapterCache, adapter: CachedAdapter) -> bool:
    with cache._lock:
        pool = cache._pool
        return adapter.name in pool.owner or any(r == 0 for r in pool.refs)


def release_adapters(model: nn.Module) -> None:
    """Remove every adapter ``switch_adapter`` installed in ``model`` from a cache, and give
    back the device slots they hold. None of them may be merged (switch to the base first)."""
    fn = "release_adapters"
    layers = _layers_of(model)
    state = _state(model)
    merged = [p for p, m in layers.items() if any(n in state.installed for n in m.merged_adapters)]
    if merged:
        raise ValueError(
            f"{fn}: layers {merged[:3]} are merged with an installed adapter; switch to the base "
            "(switch_adapter(model, None)) first"
        )
    running = [m for m in layers.values() if m.active_adapter in state.installed]
    for name in list(state.installed):
        _uninstall(model, layers, state, name)
    for layer in running:
        layer.set_adapter(None)
    if getattr(model, "active_lora_adapter", None) not in (None, *_all_adapters(layers)):
        model.active_lora_adapter = None
