"""Adapter bookkeeping shared by every LoRA layer (PEFT's ``LoraLayer``, once).

``AdapterState`` is what every layer kind keeps beside its adapters' tensors, experts included
(``layers/moe.py``, whose ranks and scales are per parameter): the ``use_rslora`` register of
its adapters, the active adapter (its own, a model's ``SharedActive`` or a serving state's),
add / set / delete with their checks, the merge loop (arithmetic or exact) around the layer's
own merge of one adapter, and the checks and cached id tensors of mixed batches
(``adapter_names``, PEFT's semantics, ``"__base__"`` for none).

A dense layer class is ``LoraLayer`` (one ``B @ A`` per adapter on one base tensor, with flat
``scaling`` / ``r`` / ``lora_alpha`` dicts) plus a torch base module (``nn.Linear``,
``nn.Embedding``): it names the dicts that hold each adapter's tensors (``adapter_tables``),
says how a merge reads its operands (``_merge_operands``) and adds its forward.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from .._constants import BASE_ADAPTER
from ..functional.lora import merge_lora_
from ..serving.exact_merge import exact_merge_, exact_unmerge_

__all__ = [
    "BASE_ADAPTER",
    "INIT_MODES",
    "AdapterState",
    "LoraLayer",
    "SharedActive",
    "conv1d_class",
    "init_lora_factors",
    "lora_scaling",
    "weight_state",
]

INIT_MODES = (True, False, "gaussian")
"""``init_lora_weights`` values every layer takes (PEFT's names)."""

# Distinct host lists (ids, ranks, scales) whose tensors a layer keeps (cached_host_tensor).
_ROW_IDS_CACHE_SIZE = 16


def cached_host_tensor(
    owner: object, values: list, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """``torch.tensor(values, dtype, device)``, built once per distinct values, dtype and device
    and kept on ``owner`` (a layer): ids, ranks and scales of a mixed batch.

    Building them on every call is a blocking host-to-device copy, which also cannot be captured
    in a CUDA graph; a cached tensor is reused by a replayed decode step. A few recent lists are
    kept (the key is the values themselves, so a cached tensor is never stale).
    """
    cache = owner.__dict__.setdefault("_row_ids_cache", {})
    # A tensor made under inference_mode cannot be saved for a later backward: separate key.
    key = (tuple(values), dtype, device, torch.is_inference_mode_enabled())
    t = cache.pop(key, None)
    if t is None:
        t = torch.tensor(values, dtype=dtype, device=device)
        while len(cache) >= _ROW_IDS_CACHE_SIZE:
            cache.pop(next(iter(cache)))
    cache[key] = t  # most recent last
    return t


def lora_scaling(lora_alpha: float, r: int, use_rslora: bool = False) -> float:
    """The factor on an adapter's ``B @ A``: ``lora_alpha / r``, or ``lora_alpha / sqrt(r)``
    with rank-stabilised LoRA (rsLoRA), as PEFT computes it."""
    return lora_alpha / (math.sqrt(r) if use_rslora else r)


def init_lora_factors(lora_a: nn.Linear, lora_b: nn.Linear, r: int, init_lora_weights) -> None:
    """PEFT's init of a new adapter's factors, in place: ``True``, A kaiming-uniform (a=sqrt(5))
    and B zeros (the layer starts equal to its base); ``"gaussian"``, A normal with std ``1/r``
    and B zeros; ``False``, both keep ``nn.Linear``'s default init (the adapter starts
    non-zero)."""
    with torch.no_grad():
        if init_lora_weights is True:
            nn.init.kaiming_uniform_(lora_a.weight, a=math.sqrt(5))
            nn.init.zeros_(lora_b.weight)
        elif init_lora_weights == "gaussian":
            nn.init.normal_(lora_a.weight, std=1.0 / r)
            nn.init.zeros_(lora_b.weight)


@functools.cache
def conv1d_class():
    """transformers' ``Conv1D`` (GPT-2), or None without transformers (looked up once: the
    layers ask on every forward)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def weight_state(module) -> tuple:
    """What tells whether ``module.weight`` changed, without reading its values: its storage
    (replaced by ``.to()`` or a new parameter) and its version counter (bumped by every in-place
    write)."""
    w = module.weight
    return (w.data_ptr(), w.device, w.dtype, w._version)


class SharedActive:
    """One model's active adapter, read by each of its layers that follows it: an unmerged
    ``switch_adapter(model, name)`` without a cache is one write here, whatever the number of
    layers (a layer without adapter ``name`` runs its base, as a per-layer switch would set).

    ``names``: the adapters such a switch may select (the layers' own, when the state was set
    up); ``synced``: every layer of the model follows this state and none is merged. Any change
    a layer makes by itself clears ``synced``; ``switch_adapter`` then visits every layer and
    sets the state up again.
    """

    __slots__ = ("name", "names", "synced")

    def __init__(self) -> None:
        self.name: str | None = None
        self.names: frozenset[str] = frozenset()
        self.synced = False


class AdapterState:
    """What every LoRA layer kind (dense, embedding, experts) keeps about its adapters beyond
    their tensors, and what the model-level code (``lora_kernels.serving``) reads and writes on
    each: the active adapter (the layer's own, a model's ``SharedActive`` it follows, or a
    serving state's), the merged adapters, add / set / delete checks and the merge loop.

    ``use_rslora`` (a dict keyed by adapter name, whatever the layer kind keys its ranks and
    scales by) is the register of the adapters a layer has. A subclass sets ``layer_name`` (for
    messages) and ``base_noun`` (what a merge changes), keeps ``adapter_names`` in its tables'
    order, and implements ``_remove_adapter(name)``, ``_merge_adapter(name, exact)`` and
    ``_unmerge_adapter(name)``.
    """

    layer_name = "LoraLayer"
    base_noun = "weight"
    # Serving from an AdapterCache's device slots (lora_kernels.serving.state): while set, the
    # model-level state, not _active_adapter, says which adapter (or slot per row) runs. Layers
    # that are never served keep this class default.
    _serving = None

    def _init_switch_state(self, backend: str) -> None:
        self.use_rslora: dict[str, bool] = {}
        self.merged_adapters: list[str] = []
        # merge(exact=True) keeps, per merged adapter, what unmerge() needs to restore the weight.
        self._exact_records: dict[str, object] = {}
        self._active_adapter: str | None = None
        self.backend = backend

    # ------------------------------------------------------------------------------------
    # state
    # ------------------------------------------------------------------------------------

    @property
    def active_adapter(self) -> str | None:
        """The adapter the forward applies (None: base layer only)."""
        if self._serving is not None:
            return self._serving.active_adapter(self)
        return self._active_adapter

    @property
    def _active_adapter(self) -> str | None:
        # The layer's own choice, or, while it follows its model's SharedActive, the model's
        # adapter if this layer has it (what a per-layer switch would have set).
        d = self.__dict__
        shared = d.get("_shared_active")
        if shared is None:
            return d.get("_own_active")
        name = shared.name
        return name if name in d["use_rslora"] else None

    @_active_adapter.setter
    def _active_adapter(self, name: str | None) -> None:
        # Any choice the layer makes by itself (set_adapter, merge, delete, serving) ends its
        # following of the model: the model's next switch must visit every layer again.
        d = self.__dict__
        shared = d.pop("_shared_active", None)
        if shared is not None:
            shared.synced = False
        d["_own_active"] = name

    def _follow(self, shared: SharedActive) -> None:
        """Read the active adapter from ``shared`` from now on (``switch_adapter`` calls it)."""
        self.__dict__["_shared_active"] = shared

    def _unsync_shared(self) -> None:
        shared = self.__dict__.get("_shared_active")
        if shared is not None:
            shared.synced = False

    def _leave_serving(self) -> None:
        """Stop reading the model's serving state, keeping the adapter it selected as this
        layer's own; called before anything that changes the layer's adapter by itself."""
        serving = self._serving
        if serving is not None:
            self._active_adapter = serving.active_adapter(self)
            self._serving = None
            serving.leave()

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def _check_known(self, fn: str, name: str) -> None:
        if name not in self.use_rslora:
            raise ValueError(
                f"{self.layer_name}.{fn}: unknown adapter {name!r}; this layer has "
                f"{self.adapter_names}"
            )

    # ------------------------------------------------------------------------------------
    # add / set / delete
    # ------------------------------------------------------------------------------------

    def _check_new_name(self, name: str, init_lora_weights) -> None:
        """The checks of a new adapter's name and init mode, before anything is created."""
        fn = f"{self.layer_name}.add_adapter"
        if not isinstance(name, str) or not name or name == BASE_ADAPTER or "." in name:
            raise ValueError(
                f"{fn}: expected name to be a non-empty str without '.', other than "
                f"{BASE_ADAPTER!r}, got {name!r}"
            )
        if name in self.use_rslora:
            raise ValueError(f"{fn}: adapter {name!r} already exists; delete_adapter it first")
        if init_lora_weights not in INIT_MODES:
            raise ValueError(
                f"{fn}: expected init_lora_weights in (True, False, 'gaussian'), "
                f"got {init_lora_weights!r}"
            )

    def _check_rank(self, r: int, what: str = "r") -> None:
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(
                f"{self.layer_name}.add_adapter: expected {what} to be a positive int, got {r!r}"
            )

    def _register_name(self, name: str, use_rslora: bool) -> None:
        """Enter adapter ``name`` in the register (its tensors, ranks and scales are in place);
        the first adapter becomes the active one."""
        self._unsync_shared()  # the model's set of adapter names changed
        self.use_rslora[name] = bool(use_rslora)
        if self._active_adapter is None:
            self._active_adapter = name

    def set_adapter(self, name: str | None) -> None:
        """Make ``name`` the active adapter (None: base only); the layer must not be merged."""
        if name is not None:
            self._check_known("set_adapter", name)
        self._leave_serving()
        if self.merged and name != self._active_adapter:
            raise RuntimeError(
                f"{self.layer_name}.set_adapter: the layer is merged with "
                f"{self.merged_adapters}; unmerge() before switching adapters"
            )
        self._active_adapter = name

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name``; if it was active, ``_active_after_delete()`` becomes active."""
        self._check_known("delete_adapter", name)
        self._leave_serving()
        self._unsync_shared()
        if name in self.merged_adapters:
            raise RuntimeError(
                f"{self.layer_name}.delete_adapter: adapter {name!r} is merged into the "
                f"{self.base_noun}; unmerge() first"
            )
        self._remove_adapter(name)
        del self.use_rslora[name]
        if self._active_adapter == name:
            self._active_adapter = self._active_after_delete()

    def _remove_adapter(self, name: str) -> None:
        """Drop adapter ``name``'s tensors, ranks and scales (the register entry goes after)."""
        raise NotImplementedError

    def _active_after_delete(self) -> str | None:
        """The adapter that becomes active when the active one is deleted: the first left."""
        return next(iter(self.adapter_names), None)

    # ------------------------------------------------------------------------------------
    # merge
    # ------------------------------------------------------------------------------------

    def merge(self, adapter_name: str | None = None, exact: bool = False) -> None:
        """Fold ``adapter_name`` (default: the active adapter) into the base weight in place.

        ``merge_lora_`` computes ``W + scaling * B @ A`` in fp32 and rounds each element once.
        ``exact=False`` (PEFT's behaviour): ``unmerge()`` subtracts the delta again, which in a
        16-bit dtype leaves the weight within an ulp or so of the original, and the errors of
        repeated merge/unmerge pairs add up. ``exact=True``: ``unmerge()`` restores the weight
        bit for bit, after any number of switches, at the cost of a record of the elements whose
        subtraction would not round back (``lora_kernels.serving.exact_merge``: a few percent of
        the weight's size for trained adapters, on its device) and about 3x the merge time. The
        adapter must not change while merged (``unmerge()`` refuses, weight untouched, if it did).
        """
        name = self.active_adapter if adapter_name is None else adapter_name
        if name is None:
            raise ValueError(f"{self.layer_name}.merge: no adapter to merge (no active adapter)")
        self._check_known("merge", name)
        if name in self.merged_adapters:
            raise RuntimeError(f"{self.layer_name}.merge: adapter {name!r} is already merged")
        self._leave_serving()
        self._merge_adapter(name, exact)
        self.merged_adapters.append(name)
        self._active_adapter = name

    def _merge_adapter(self, name: str, exact: bool) -> None:
        """Fold one adapter into the weight (``merge``'s checks done)."""
        raise NotImplementedError

    def _check_unmerge(self) -> None:
        """Hook: raise, weight untouched, when a merged adapter cannot be taken out again."""

    def unmerge(self) -> None:
        """Take every merged adapter out of the base weight again (in reverse order); one merged
        with ``exact=True`` gives back the weight it was merged into, bit for bit."""
        self._check_unmerge()
        while self.merged_adapters:
            self._unmerge_adapter(self.merged_adapters[-1])
            self.merged_adapters.pop()

    def _unmerge_adapter(self, name: str) -> None:
        """Take one merged adapter out of the weight again (its exact record, if any, used)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------
    # mixed batches
    # ------------------------------------------------------------------------------------

    def _check_adapter_names(self, adapter_names, rows: int, what: str) -> list[str]:
        """Check a mixed batch's ``adapter_names`` (``rows`` of them, one per ``what``; ``rows``
        < 0: no count fits); returns the adapters it uses, in first-use order (``"__base__"``
        left out)."""
        fn = f"{self.layer_name}.forward"
        if self.merged:
            raise RuntimeError(
                f"{fn}: adapter_names cannot be used while {self.merged_adapters} is merged into "
                f"the {self.base_noun}; unmerge() first"
            )
        if not isinstance(adapter_names, (list, tuple)) or not all(
            isinstance(n, str) for n in adapter_names
        ):
            raise TypeError(
                f"{fn}: expected adapter_names to be a list of str, got {adapter_names!r}"
            )
        if rows < 0 or len(adapter_names) != rows:
            raise ValueError(
                f"{fn}: expected one adapter name per {what}, got {len(adapter_names)}"
            )
        known = self.use_rslora
        unknown = sorted({n for n in adapter_names if n != BASE_ADAPTER and n not in known})
        if unknown:
            raise ValueError(
                f"{fn}: unknown adapter names {unknown}; this layer has {self.adapter_names} "
                f"(and {BASE_ADAPTER!r} for none)"
            )
        return list(dict.fromkeys(n for n in adapter_names if n != BASE_ADAPTER))

    def _row_ids(self, ids: list[int], device: torch.device) -> torch.Tensor:
        """The int32 id tensor of a batch, built once per distinct id list and device (see
        :func:`cached_host_tensor`)."""
        return cached_host_tensor(self, ids, torch.int32, device)


class LoraLayer(AdapterState):
    """The adapter bookkeeping of a LoRA layer with one ``B @ A`` per adapter on one base
    tensor; mixed in before the torch base module.

    Subclasses set ``adapter_tables`` (the attribute names of the dicts holding each adapter's
    tensors; the first orders ``adapter_names``), ``layer_name`` (for messages) and
    ``base_noun`` (what a merge changes: "weight", "table"), and implement
    ``_merge_operands(name) -> (weight, a, b)`` with the merge ``weight += scaling * b @ a``.
    """

    adapter_tables: tuple[str, ...] = ()

    def _init_adapter_state(self, backend: str) -> None:
        self.scaling: dict[str, float] = {}
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self._init_switch_state(backend)

    def _adopt_base(self, base, backend: str) -> None:
        """Take ``base``'s weight (and bias, where the layer has one) in place of the meta
        tensors the layer was built with, shared, then start an empty adapter state: the body
        of every ``from_<module>`` constructor."""
        self.weight = base.weight
        if hasattr(self, "bias"):  # nn.Embedding has none
            self.bias = base.bias
        self._init_lora_state(backend)

    @property
    def adapter_names(self) -> list[str]:
        return list(getattr(self, self.adapter_tables[0]).keys())

    def _check_new_adapter(self, name: str, r: int, init_lora_weights) -> None:
        """The checks every ``add_adapter`` runs before it creates anything."""
        self._check_new_name(name, init_lora_weights)
        self._check_rank(r)

    def _register_adapter(self, name: str, r: int, lora_alpha: float, use_rslora: bool) -> None:
        """Record adapter ``name``'s rank and scaling (its tensors are already in the tables);
        the first adapter becomes the active one."""
        self.r[name] = r
        self.lora_alpha[name] = lora_alpha
        self.scaling[name] = lora_scaling(lora_alpha, r, use_rslora)
        self._register_name(name, use_rslora)

    def _remove_adapter(self, name: str) -> None:
        for attr in self.adapter_tables:
            table = getattr(self, attr)
            if name in table:
                del table[name]
        for table in (self.scaling, self.r, self.lora_alpha):
            del table[name]

    # ------------------------------------------------------------------------------------
    # merge
    # ------------------------------------------------------------------------------------

    def _merge_operands(self, name: str):
        raise NotImplementedError

    def _merge_adapter(self, name: str, exact: bool) -> None:
        w, a, b = self._merge_operands(name)
        if exact:
            self._exact_records[name] = exact_merge_(
                w, a, b, self.scaling[name], backend=self.backend
            )
        else:
            merge_lora_(w, a, b, self.scaling[name], backend=self.backend)

    def _unmerge_adapter(self, name: str) -> None:
        w, a, b = self._merge_operands(name)
        record = self._exact_records.pop(name, None)
        if record is not None:
            exact_unmerge_(w, a, b, self.scaling[name], record)
        else:
            merge_lora_(w, a, b, -self.scaling[name], backend=self.backend)

    def _adapters_repr(self, extra=lambda name: "") -> str:
        return ", ".join(
            f"{n}(r={self.r[n]}, alpha={self.lora_alpha[n]}{extra(n)})" for n in self.adapter_names
        )
