"""Model-level adapter state for serving: one small set of device tensors per model that every
``FusedLoraLinear`` reads, so that switching the whole model is one write, whatever its size.

A model whose adapters sit in an :class:`~lora_kernels.cache.AdapterCache`'s device slots
(``cache.attach(model, ...)`` then ``switch_adapter(model, name, cache=cache)``) is *engaged*:
each of its layers holds a :class:`SlotBinding` (its own slot stacks and a reference to the
model's :class:`ServingState`) and reads from the state which slot its rows use::

    y[i] = x[i] @ W.T + bias + scales[s] * (x[i] @ lora_a[s].T) @ lora_b[s].T,  s = slot of row i

A ``FusedLoraExperts`` (MoE experts) holds an :class:`ExpertSlotBinding` instead and runs
``moe_lora`` over its ``[slots, E, ...]`` stacks with the same per-token slots (``adapter_ids``),
so one state serves the dense and the expert layers of a model alike.

* ``switch_adapter(model, name, cache=cache)`` (unmerged, to an adapter already installed in a
  slot, or to the base) writes the active slot into the state: one ``fill_`` of a small int32
  device tensor and a few host assignments. No layer is visited.
* ``mixed_batch(model, names)`` (every name slot-resident) or ``mixed_batch(model, ids)`` (an
  int tensor of slot indices, -1 = base) copies the per-row slots into a preallocated device
  buffer once; every layer reads a view of it.

Two ways to run a step, ``ServingState.graph_safe``:

* ``True`` (the default on CUDA): every layer runs ``lora_linear_multi`` over its slot stacks
  with ids read from device tensors only (the active slot repeated in a preallocated buffer, or
  the mixed-batch buffer). Nothing in a step reads a device value on the host or allocates by
  the ids' content, so a step captured in a CUDA graph replays correctly after any switch that
  stays within installed adapters and after any new ids are written (same batch shape).
* ``False`` (the default on CPU, where there are no graphs): a single-adapter step runs the
  layer's own fused path on the active adapter (its weights are views into the slot), the
  fastest path there; mixed batches read the device buffer as above.

Adapters not yet in a slot go through the cache as before (``switch_adapter``'s first switch to
an adapter installs it: side-stream copies, prefetch). Anything that changes a layer's adapter
outside these calls (``layer.set_adapter``, ``merge``, ``delete_adapter``, ``set_adapter(model,
...)``, a merged switch) makes that layer leave the state, keeping the adapter the state gave it;
the next ``switch_adapter`` through the cache engages every layer again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_base_inputs
from .._constants import BASE_ADAPTER
from ..backends import resolve_backend
from ..functional._autocast import autocast_inputs
from ..functional.lora import lora_linear
from ..ops import lora_linear_multi_2d

__all__ = [
    "ExpertSlotBinding",
    "ServingState",
    "SlotBinding",
    "adapter_slot_ids",
    "serving_state",
]

_ATTR = "_lora_kernels_serving"
DEFAULT_ROWS = 256
"""Rows (sequences) of a mixed batch the id buffer holds before it must grow."""
SINGLE_ROWS = 4096
"""Rows of a single-adapter step served from the preallocated buffer of the active slot; a
step with more rows (a long prefill flattened to 2-D) gets a fresh ``[rows]`` tensor."""


def _none() -> None:
    return None


class ServingState:
    """Which device slot each row of a model's batch uses, on the model's device.

    Attributes:
        device: where the slot stacks and these tensors live.
        active_ids: ``[SINGLE_ROWS]`` int32, every entry the active slot (-1: the base model);
            ``active_ids[:1]`` is the active slot as a one-element tensor.
        row_ids: ``[capacity]`` int32, the per-row (per-sequence) slots of a mixed batch; the
            first ``mixed_rows`` are live inside ``mixed_batch``.
        active_name: the active adapter's name (None: the base), a host-side mirror.
        mixed_rows: the number of ids of the current mixed batch; None outside ``mixed_batch``.
        slots: the adapters installed in slots, name -> slot (set when the model is engaged).
        graph_safe: run single-adapter steps on device ids too (see the module docstring).
        synced: every layer of the model follows this state (cleared when one leaves it).
    """

    def __init__(self, device: torch.device, rows: int = DEFAULT_ROWS) -> None:
        self.device = torch.device(device)
        self.active_ids = self._ids(SINGLE_ROWS)
        self.row_ids = self._ids(rows)
        self.active_name: str | None = None
        self.mixed_rows: int | None = None
        self.slots: dict[str, int] = {}
        self.num_slots = 0
        self.graph_safe = self.device.type == "cuda"
        self.synced = False
        self.cache = None
        self.wrappers: list | None = None  # the model's ModulesToSaveWrappers (mixed_batch)
        self._pool_token: object | None = None

    def _ids(self, size: int) -> torch.Tensor:
        # Never an inference tensor (made under torch.inference_mode): those cannot be written
        # outside it, and switches and batches may come from either side.
        with torch.inference_mode(False):
            return torch.full((size,), -1, dtype=torch.int32, device=self.device)

    # Copies and pickles of a model start without serving state (the slots stay with the cache).
    def __deepcopy__(self, memo) -> None:
        return None

    def __reduce__(self):
        return (_none, ())

    @property
    def active_slot(self) -> torch.Tensor:
        """The active slot as a one-element int32 device tensor (a view: it follows switches)."""
        return self.active_ids[:1]

    def pool_is(self, cache) -> bool:
        """The state was engaged with ``cache``'s current slot pool (not re-attached since)."""
        if cache is not self.cache or self._pool_token is None:
            return False
        return cache.pool_token() is self._pool_token

    def set_active(self, name: str | None, slot: int) -> None:
        """Make ``slot`` (holding adapter ``name``; -1 and None: the base) the active one: one
        in-place device write, no synchronisation."""
        self.active_ids.fill_(slot)
        self.active_name = name

    def single_ids(self, rows: int) -> torch.Tensor:
        if rows <= self.active_ids.shape[0]:
            return self.active_ids[:rows]
        return self.active_slot.expand(rows).contiguous()

    # ------------------------------------------------------------------------------------
    # mixed batches
    # ------------------------------------------------------------------------------------

    def ids_of_names(self, names: Sequence[str], base: str) -> list[int] | None:
        """The slot of each name (``base``: -1), or None if one of them is not in a slot."""
        slots = self.slots
        ids = []
        for n in names:
            if n == base:
                ids.append(-1)
            elif n in slots:
                ids.append(slots[n])
            else:
                return None
        return ids

    def check_ids(self, fn: str, ids) -> torch.Tensor:
        """``ids`` (a list of slots, or an int tensor) as a tensor ready to copy into the buffer;
        raises before anything changes if it is not a 1-D int32/int64 tensor on the state's
        device with values in ``[-1, num_slots)`` (values are checked on CPU only: on CUDA that
        would synchronise, and the kernels treat an id outside that range as -1)."""
        if not isinstance(ids, torch.Tensor):
            if self.device.type != "cuda":
                return torch.tensor(ids, dtype=torch.int32, device=self.device)
            # From pinned memory the copy is queued without the host waiting for the stream;
            # the host allocator keeps the block until the copy has run.
            host = torch.tensor(ids, dtype=torch.int32, pin_memory=True)
            return host.to(self.device, non_blocking=True)
        if ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(
                f"{fn}: expected adapter ids of dtype torch.int32 or torch.int64, got {ids.dtype}"
            )
        if ids.dim() != 1:
            raise ValueError(
                f"{fn}: expected adapter ids of shape [rows] (one slot per row or sequence), got "
                f"{list(ids.shape)}"
            )
        if ids.device != self.device:
            raise ValueError(
                f"{fn}: expected adapter ids on {self.device} (where the model's slots are), got "
                f"{ids.device}"
            )
        if ids.device.type == "cpu" and ids.numel():
            lo, hi = int(ids.min()), int(ids.max())
            if lo < -1 or hi >= self.num_slots:
                raise ValueError(
                    f"{fn}: expected adapter ids in [-1, {self.num_slots}) (slots of the cache; "
                    f"-1: the base model), got values from {lo} to {hi}"
                )
        return ids

    @contextlib.contextmanager
    def mixed(self, ids: torch.Tensor) -> Iterator[None]:
        """Within the block, row (sequence) i of every step uses slot ``ids[i]``; ``ids`` comes
        from ``check_ids``. Nested blocks restore the outer ids on exit."""
        rows = ids.shape[0]
        outer = self.mixed_rows
        saved = self.row_ids[:outer].clone() if outer else None
        if rows > self.row_ids.shape[0]:
            # A new buffer: graphs captured on the old one must be captured again.
            self.row_ids = self._ids(max(rows, 2 * self.row_ids.shape[0]))
        self.row_ids[:rows].copy_(ids)
        self.mixed_rows = rows
        try:
            yield
        finally:
            self.mixed_rows = outer
            if saved is not None:
                self.row_ids[:outer].copy_(saved)


class SlotBinding:
    """What one ``FusedLoraLinear`` reads while its model is engaged: the model's state and the
    layer's slot stacks (``AdapterCache.slot_tensors``). ``FusedLoraLinear`` calls ``forward``,
    ``active_adapter`` and ``leave``."""

    __slots__ = ("lora_a", "lora_b", "ranks", "scales", "state")

    def __init__(self, state: ServingState, slot_tensors) -> None:
        self.state = state
        self.lora_a, self.lora_b, self.scales, self.ranks = slot_tensors

    def __deepcopy__(self, memo) -> _Detached:
        return _Detached(self.state.active_name)

    def __reduce__(self):
        return (_Detached, (self.state.active_name,))

    def active_adapter(self, layer: nn.Module) -> str | None:
        name = self.state.active_name
        return name if name is not None and name in layer.lora_A else None

    def leave(self) -> None:
        self.state.synced = False

    def forward(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``layer``'s output with the slots the state selects (the layer is not merged)."""
        state = self.state
        fn = "FusedLoraLinear.forward"
        rows = state.mixed_rows
        if rows is None:
            if not state.graph_safe:
                return _active_forward(layer, x, self.active_adapter(layer))
            if x.dim() < 1:
                raise ValueError(f"{fn}: expected x of shape [..., K], got a 0-dim tensor")
            x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
            y = self._multi(fn, layer, x2, state.single_ids(x2.shape[0]))
        else:
            if x.dim() < 2 or x.shape[0] != rows:
                raise ValueError(
                    f"{fn}: mixed_batch gave {rows} adapter ids, one per row of x (2-D) or per "
                    f"sequence (3-D and up), but x has shape {list(x.shape)}"
                )
            x2 = x if x.dim() == 2 else x.reshape(rows, -1, x.shape[-1])
            ids = state.row_ids[:rows]
            if x2.dim() == 3:  # one id per sequence -> one per row (a view when T is 1)
                ids = ids[:, None].expand(rows, x2.shape[1]).reshape(-1)
                x2 = x2.reshape(-1, x2.shape[-1])
            y = self._multi(fn, layer, x2, ids)
        return y.reshape(*x.shape[:-1], layer.out_features)

    def _multi(self, fn: str, layer, x: torch.Tensor, row_ids: torch.Tensor) -> torch.Tensor:
        """``lora_linear_multi`` over the slot stacks for 2-D ``x``. The ids were checked when
        they were written and the stacks are the cache's own, so only what can change between
        steps (x, and the layer against its slots) is checked here: no value is read back."""
        weight, bias = layer.weight, layer.bias
        check_base_inputs(fn, x, weight, bias)
        lora_a, lora_b = self.lora_a, self.lora_b
        if (
            lora_a.device != x.device
            or lora_a.dtype not in (x.dtype, torch.float32)
            or lora_a.shape[2] != x.shape[1]
            or lora_b.shape[1] != weight.shape[0]
        ):
            raise ValueError(
                f"{fn}: the adapter slots (lora_a {lora_a.dtype} {list(lora_a.shape)} on "
                f"{lora_a.device}) do not fit x ({x.dtype} {list(x.shape)} on {x.device}); attach "
                "the cache again after moving or casting the model"
            )
        x, weight, bias, lora_a, lora_b = autocast_inputs(x, weight, bias, lora_a, lora_b)
        scales = self.scales if x.dtype != torch.float64 else self.scales.double()
        be = resolve_backend(layer.backend, x, lora_a.shape[1])
        return lora_linear_multi_2d(
            x, weight, bias, lora_a, lora_b, scales, row_ids, self.ranks, be
        )


class ExpertSlotBinding:
    """What one ``FusedLoraExperts`` reads while its model is engaged: the model's state and the
    layer's slot stacks (an ``ExpertSlotTensors``: ``[slots, E, r_max, in]`` / ``[slots, E, out,
    r_max]`` per adapted projection and ``scales [slots]``). Per token ``t`` with slot ``s``::

        y[t] = sum_j w[t, j] * experts_e(x[t]) with LoRA factors lora_*[s, e],  e = top_k[t, j]
    """

    __slots__ = ("factors", "scales", "state")

    def __init__(self, state: ServingState, slot_tensors) -> None:
        self.state = state
        *factors, self.scales = slot_tensors
        self.factors = tuple(factors)

    def __deepcopy__(self, memo) -> _Detached:
        return _Detached(self.state.active_name)

    def __reduce__(self):
        return (_Detached, (self.state.active_name,))

    def active_adapter(self, layer: nn.Module) -> str | None:
        name = self.state.active_name
        return name if name is not None and name in layer.use_rslora else None

    def leave(self) -> None:
        self.state.synced = False

    def forward(self, layer, x: torch.Tensor, top_k_index, top_k_weights) -> torch.Tensor:
        """``layer``'s output with the slots the state selects (the layer is not merged):
        ``x [T, H]``; in a mixed batch of ``rows`` ids, token ``t`` takes id ``t // (T /
        rows)`` (one id per token, or per sequence of equal length, as ``adapter_names``)."""
        state = self.state
        fn = "FusedLoraExperts.forward"
        rows = state.mixed_rows
        if rows is None:
            if not state.graph_safe:
                return layer._active_forward(
                    x, top_k_index, top_k_weights, self.active_adapter(layer)
                )
            ids = state.single_ids(x.shape[0])
        else:
            if x.dim() != 2 or x.shape[0] % rows:
                raise ValueError(
                    f"{fn}: mixed_batch gave {rows} adapter ids, one per token or per sequence "
                    f"of equal length, but the experts got hidden_states {list(x.shape)}"
                )
            ids = state.row_ids[:rows]
            per = x.shape[0] // rows
            if per != 1:  # one id per sequence -> one per token, on the device
                ids = ids[:, None].expand(rows, per).reshape(-1)
        a = next(f for f in self.factors if f is not None)
        if a.device != x.device or a.dtype not in (x.dtype, torch.float32):
            raise ValueError(
                f"{fn}: the adapter slots ({a.dtype} {list(a.shape)} on {a.device}) do not fit "
                f"hidden_states ({x.dtype} {list(x.shape)} on {x.device}); attach the cache "
                "again after moving or casting the model"
            )
        scales = self.scales if x.dtype != torch.float64 else self.scales.double()
        return layer._call(x, top_k_index, top_k_weights, self.factors, scales, ids)


class _Detached:
    """A copied layer's stand-in for its original's binding: it runs the adapter that was active
    when the copy was made, as its own, from the first call on."""

    __slots__ = ("name",)

    def __init__(self, name: str | None) -> None:
        self.name = name

    def active_adapter(self, layer: nn.Module) -> str | None:
        return self.name if self.name is not None and self.name in layer.use_rslora else None

    def leave(self) -> None:
        pass

    def forward(self, layer: nn.Module, *args) -> torch.Tensor:
        layer._leave_serving()
        return layer.forward(*args)


def _active_forward(layer, x: torch.Tensor, name: str | None) -> torch.Tensor:
    """The layer's own forward with adapter ``name`` active (its weights are slot views)."""
    if name is None:
        return F.linear(x, layer.weight, layer.bias)
    dropout = layer.lora_dropout[name]
    x_lora = dropout(x) if (layer.training and isinstance(dropout, nn.Dropout)) else None
    return lora_linear(
        x,
        layer.weight,
        layer.bias,
        layer.lora_A[name].weight,
        layer.lora_B[name].weight,
        layer.scaling[name],
        x_lora=x_lora,
        backend=layer.backend,
    )


# ----------------------------------------------------------------------------------------------
# model level (called by lora_kernels.switch and lora_kernels.model)
# ----------------------------------------------------------------------------------------------


def serving_state(model: nn.Module) -> ServingState | None:
    """The model's serving state, or None; ``engaged_state`` for one every layer follows."""
    return model.__dict__.get(_ATTR)


def engaged_state(model: nn.Module) -> ServingState | None:
    state = model.__dict__.get(_ATTR)
    return state if state is not None and state.synced else None


def engage(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    cache,
    slots: Mapping[str, int],
    name: str | None,
) -> ServingState:
    """Make every layer of ``layers`` (the model's ``FusedLoraLinear`` and ``FusedLoraExperts``
    layers, attached to ``cache``'s slots, none merged) read the model's state, with ``name``
    active; ``slots``
    maps the adapters installed in slots to their slot. The state's tensors are kept from one
    engagement to the next (graphs captured on them stay valid) unless the device changed."""
    first = layers[next(iter(layers))]
    device = (
        first.weight.device if hasattr(first, "weight") else first.base_layer.gate_up_proj.device
    )
    state = serving_state(model)
    if state is None or state.device != device:
        state = ServingState(device)
        model.__dict__[_ATTR] = state
    state.cache = cache
    state.wrappers = None
    state.slots = dict(slots)
    state.num_slots = cache.num_slots
    state._pool_token = cache.pool_token()
    for path, layer in layers.items():
        tensors = cache.slot_tensors(path)
        binding = SlotBinding if hasattr(tensors, "ranks") else ExpertSlotBinding
        layer._serving = binding(state, tensors)
    state.set_active(name, -1 if name is None else state.slots[name])
    state.synced = True
    return state


def adapter_slot_ids(model: nn.Module, adapter_names: Sequence[str]) -> torch.Tensor:
    """The slot of each adapter of ``adapter_names`` (``"__base__"``: -1) as an int32 tensor on
    the model's device, for ``mixed_batch(model, ids)``: build it once, write it each step."""
    fn = "adapter_slot_ids"
    state = engaged_state(model)
    if state is None:
        raise ValueError(
            f"{fn}: the model is not served from device slots (cache.attach(model, ...), then "
            "switch_adapter(model, name, cache=cache))"
        )
    names = list(adapter_names)
    ids = state.ids_of_names(names, BASE_ADAPTER)
    if ids is None:
        missing = sorted({n for n in names if n != BASE_ADAPTER and n not in state.slots})
        raise ValueError(
            f"{fn}: adapters {missing} are not installed in a slot; installed: "
            f"{sorted(state.slots)} (switch_adapter(model, name, cache=cache) installs one)"
        )
    return state.check_ids(fn, ids)
