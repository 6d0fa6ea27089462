"""Adapters cached in RAM and a fixed pool of device slots, from which ``switch_adapter``
(:mod:`lora_kernels.serving.switch`) switches a whole model between them.

The point of LoRA in production: the base model is loaded once, and a model is specialised by
moving an adapter (its small A and B matrices) to the device and adding ``scale * B @ A`` to the
weights, or by running it unmerged beside the base, never by re-reading a fine-tuned model.
The tiers, slowest first::

    disk (PEFT adapter directories)
      -> RAM: AdapterCache, capacity in bytes, LRU eviction, pinned when CUDA is available
      -> device slots: per FusedLoraLinear, stacked lora_a [slots, r_max, K], lora_b
         [slots, N, r_max] and scales [slots]; per FusedLoraExperts (MoE experts adapted through
         target_parameters) and parameter, lora_a [slots, E, r_max, in] and lora_b [slots, E,
         out, r_max]; filled in place on a side stream
      -> the model: switch_adapter merges the adapter into the weights (exact or arithmetic) or
         makes it the active unmerged adapter; unmerged, a model attached to the slots is then
         served from them (lora_kernels.serving.state: later switches are one device write)

MoE expert adapters (PEFT's ``target_parameters``): a key whose module path, stripped of
PEFT's ``base_layer.`` nesting, is a fused-experts module the config's ``target_parameters``
names (``<module>.gate_up_proj`` / ``<module>.down_proj``) holds that parameter's
``ParamWrapper`` factors, ``lora_A [E r, in]`` and ``lora_B [out, r E]``; the cache keeps them in
the per-expert layout ``[E, r, in]`` / ``[E, out, r]`` (an :class:`ExpertAdapterLayer`), the one
the slots and the kernel read, reordered once when cached.

RAM: ``put`` (a state dict) and ``load`` (a PEFT directory, read with
:func:`lora_kernels.models.checkpoint.read_peft_adapter`) copy an adapter in; ``get`` returns it
(a hit) or reads it again from its directory after an eviction (a miss); ``use`` holds it so it is
never evicted. Host copies are pinned only when CUDA is available: pinned pages are what let a
host-to-device copy run asynchronously, and pinning without a GPU only locks RAM.

Device slots (``attach``, ``prefetch``, ``use_slot``): ``serving/slots.py``, mixed into the
cache (one lock for both tiers).

Every method of :class:`AdapterCache` may be called from several threads (one lock; a disk read
runs outside it). ``switch_adapter`` changes a model and is not meant to race with itself on
the same model; it uses the cache only through the methods under "what switch_adapter asks of
the cache".
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch

from ..functional.moe import peft_expert_factors
from ..layers import BASE_ADAPTER, lora_scaling
from ..layers.moe import EXPERT_PARAMS
from ..models.checkpoint import read_peft_adapter, split_peft_key
from ..models.config import LoraConfig
from ..models.experts import expert_key_prefixes
from .slots import (  # noqa: F401  (AdapterLayer, CachedAdapter, SlotTensors: re-exported)
    AdapterLayer,
    CachedAdapter,
    DeviceSlots,
    ExpertAdapterLayer,
    ExpertSlotTensors,
    SlotTensors,
    raise_problems,
)

__all__ = [
    "AdapterCache",
    "AdapterLayer",
    "CacheStats",
    "CachedAdapter",
    "ExpertAdapterLayer",
    "ExpertSlotTensors",
    "MAX_INSTALLED",
    "SlotTensors",
]


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


@dataclass
class _Entry:
    adapter: CachedAdapter
    refs: int = 0


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _check_name(fn: str, name: object) -> None:
    if not isinstance(name, str) or not name or name == BASE_ADAPTER or "." in name:
        raise ValueError(
            f"{fn}: expected name to be a non-empty str without '.', other than "
            f"{BASE_ADAPTER!r}, got {name!r}"
        )


def _targets(path: str, targets: list[str]) -> list[str]:
    """The expert parameters of the module at ``path`` that ``target_parameters`` names (PEFT's
    rule: ``<module>.<param>`` equal to an entry or ending with ``"." + entry``)."""
    return [
        p
        for p in EXPERT_PARAMS
        if f"{path}.{p}" in targets or any(f"{path}.{p}".endswith(f".{t}") for t in targets)
    ]


def _expert_param(path: str, targets) -> tuple[str, str] | str | None:
    """``(module, parameter)`` when a key's module ``path`` is one of PEFT's ``ParamWrapper``
    nest levels of a module ``target_parameters`` adapts (``<module>`` plus one
    ``.base_layer`` per level inside the outermost), None for a dense LoRA module, or why the
    key fits neither."""
    if not targets:
        return None
    depth = 0
    module = path
    while module.endswith(".base_layer"):
        module = module.removesuffix(".base_layer")
        depth += 1
    params = _targets(module, list(targets))
    if not params:
        return f"{path} is not a module target_parameters adapts" if depth else None
    by_depth = {
        len(prefix) // len("base_layer."): p for p, prefix in expert_key_prefixes(params).items()
    }
    if depth not in by_depth:
        return f"PEFT nests {len(params)} ParamWrapper(s) at {module}, not {depth + 1}"
    return module, by_depth[depth]


def _expert_layers(
    cfg: LoraConfig, parts: dict[str, dict[str, dict[str, torch.Tensor]]], problems: list[str]
) -> dict[str, ExpertAdapterLayer]:
    """Each experts module's factors in the per-expert layout (views of the given tensors),
    checked against the config's ranks; what does not fit goes to ``problems``."""
    out = {}
    for module, params in sorted(parts.items()):
        lora_a, lora_b, ranks, alphas, scalings = {}, {}, {}, {}, {}
        num_experts = set()
        for param in EXPERT_PARAMS:
            pair = params.get(param)
            if pair is None:
                continue
            where = f"{module}.{param}"
            if set(pair) != {"lora_A", "lora_B"}:
                problems.append(f"{where}: has {sorted(pair)} but needs both lora_A and lora_B")
                continue
            a, b = pair["lora_A"], pair["lora_B"]
            r, alpha = cfg.rank_and_alpha(where)
            if a.shape[0] % r or b.shape[1] != a.shape[0]:
                problems.append(
                    f"{where}: expected PEFT's lora_A [E*{r}, in] and lora_B [out, E*{r}] "
                    f"(rank {r} from the config), got {list(a.shape)} and {list(b.shape)}"
                )
                continue
            e = a.shape[0] // r
            num_experts.add(e)
            lora_a[param], lora_b[param] = peft_expert_factors(a, b, e)
            ranks[param], alphas[param] = r, float(alpha)
            scalings[param] = lora_scaling(alpha, r, cfg.use_rslora)
        if len(num_experts) > 1:
            problems.append(f"{module}: the parameters' factors disagree on the experts' number")
            continue
        if lora_a:
            out[module] = ExpertAdapterLayer(lora_a, lora_b, ranks, alphas, scalings)
    return out


class AdapterCache(DeviceSlots):
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
        # Counters as a plain dict (``stats`` snapshots them): counting is on the switch path.
        self._counts = dataclasses.asdict(CacheStats())
        self._pool = None  # the device slots (serving/slots.py), once a model is attached
        self._model_layers: dict = {}

    # ------------------------------------------------------------------------------------
    # RAM tier
    # ------------------------------------------------------------------------------------

    def _count(self, **deltas: int) -> None:
        counts = self._counts
        for key, value in deltas.items():
            counts[key] += value

    @property
    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(**self._counts)

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
        if cfg.use_dora:
            raise ValueError(
                f"{fn}: adapter {name!r} has use_dora=True: the cache holds plain LoRA adapters "
                "(lora_A/lora_B) only; load a DoRA adapter with load_adapter"
            )
        # A cached adapter serves inference: its installed weights take no gradients.
        cfg = dataclasses.replace(cfg, inference_mode=True)
        if not isinstance(tensors, Mapping) or not tensors:
            raise ValueError(f"{fn}: adapter {name!r} has no tensors")
        parts: dict[str, dict[str, torch.Tensor]] = {}
        expert_parts: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
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
            expert = _expert_param(path, cfg.target_parameters)
            if expert is None:
                parts.setdefault(path, {})[part] = t
            elif isinstance(expert, str):
                problems.append(f"{key!r}: {expert}")
            else:
                module, param = expert
                expert_parts.setdefault(module, {}).setdefault(param, {})[part] = t
        experts = _expert_layers(cfg, expert_parts, problems)
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
            scaling = lora_scaling(alpha, r, cfg.use_rslora)
            layers[path] = (a, b, float(alpha), float(scaling))
        raise_problems(f"{fn}: adapter {name!r} cannot be cached", problems)
        host = {
            path: AdapterLayer(self._host_copy(a, owned), self._host_copy(b, owned), alpha, sc)
            for path, (a, b, alpha, sc) in layers.items()
        }
        # The per-expert views are copied contiguous (B's experts are interleaved in PEFT's
        # layout): one reorder here, none per slot fill or switch.
        host_experts = {
            path: dataclasses.replace(
                lay,
                lora_a={p: self._host_copy(a, owned) for p, a in lay.lora_a.items()},
                lora_b={p: self._host_copy(b, owned) for p, b in lay.lora_b.items()},
            )
            for path, lay in experts.items()
        }
        nbytes = sum(
            t.numel() * t.element_size() for lay in host.values() for t in (lay.lora_a, lay.lora_b)
        ) + sum(lay.nbytes for lay in host_experts.values())
        return CachedAdapter(name, cfg, host, nbytes, source, host_experts)

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

    def holds(self, name: str, adapter: CachedAdapter) -> bool:
        """``name`` is in RAM as exactly ``adapter`` (neither replaced nor evicted since); if so,
        it counts as a hit and becomes the most recently used, as with ``get``."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is None or entry.adapter is not adapter:
                return False
            self._entries.move_to_end(name)
            self._counts["hits"] += 1
            return True

    def record_device_copy(self, nbytes: int) -> None:
        """Count ``nbytes`` copied from RAM to a device outside the slots (``stats``)."""
        with self._lock:
            self._count(bytes_to_device=nbytes)


MAX_INSTALLED = 4
"""Adapters ``switch_adapter`` keeps installed in a model without device slots (device copies,
least recently used dropped first); with slots, the number of slots bounds them."""
