"""DoRA as a mixin of ``FusedLoraLinear``: the magnitude module, the forward, merge and unmerge.

A DoRA adapter is a LoRA adapter plus ``layer.lora_magnitude_vector[name].weight`` ``[N]``, PEFT's
layout and state_dict key (``lora_magnitude_vector.<name>.weight``), initialised to the row norms
of ``W + scaling * B A`` so the layer starts equal to the base. ``||W||_row^2`` is cached per
weight (the base is frozen; the cache follows the weight's storage and version counter).

Merge folds ``g = m / ||W + s B A||_row`` in: ``W' = g[:, None] * (W + s B A)``; the norm is kept,
since the merged weight no longer holds it, and unmerge computes ``W'/g - s B A`` (PEFT does the
same). ``exact=True`` records the elements whose unmerge would not round back, as
``lora_kernels.serving.exact_merge`` does for LoRA, so unmerge restores the weight bit for bit.
:class:`DoraMixin` hooks this into the merge loop of ``LoraLayer`` (``layers/base.py``).

Mixed batches (``adapter_names``): rows of plain LoRA adapters run in one
``lora_linear_multi`` call as before; each DoRA adapter's rows then run through ``dora_linear`` on
their own (one call per DoRA adapter of the batch) and replace the base rows of that output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..backends import launcher, resolve_backend
from ..functional.dora import (
    dora_linear,
    dora_weight_norm,
    merge_dora_,
    unmerge_dora_,
    weight_sq_norm,
)
from ..serving.exact_merge import _bits, _block_rows, _checksum, _twin
from .base import cached_host_tensor, weight_state

__all__ = ["DoraMagnitude", "DoraMerge", "DoraMixin", "cached_weight_sq_norm"]


class DoraMagnitude(nn.Module):
    """Holds one DoRA adapter's magnitude as ``.weight`` ``[out_features]`` (PEFT's key)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)

    def extra_repr(self) -> str:
        return f"out_features={self.weight.shape[0]}"


@dataclass
class DoraMerge:
    """What unmerging a DoRA adapter needs: the norm at merge time and, for ``exact=True``, the
    original values of the elements whose unmerge does not round back (per block of rows)."""

    norm: torch.Tensor
    exact: bool
    block_rows: int = 0
    checksum: tuple[int, int, int] = (0, 0, 0)
    sparse: dict | None = None
    dense: dict | None = None


def cached_weight_sq_norm(linear: nn.Linear, backend: str) -> torch.Tensor:
    """``||W||_row^2`` of ``linear.weight``, kept on ``linear`` and recomputed only when the
    weight changed (new storage, device or dtype, or an in-place write)."""
    state = weight_state(linear)
    cache = linear.__dict__.get("_dora_w_sq")
    if cache is None or cache[0] != state:
        with torch.no_grad():
            cache = (state, weight_sq_norm(linear.weight, backend=backend))
        linear.__dict__["_dora_w_sq"] = cache
    return cache[1]


def _state(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), t.device, t.dtype, t._version)


class DoraMixin:
    """DoRA for ``FusedLoraLinear``: adapters with a ``lora_magnitude_vector[name]`` take these
    paths in the forward, the mixed batch and the merge loop; the others never reach them."""

    def _init_dora_state(self) -> None:
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA adapters only (PEFT's name)
        self._dora_merges: dict = {}  # merged DoRA adapter -> what unmerge needs

    def _merge_adapter(self, name: str, exact: bool) -> None:
        """A DoRA adapter merges as ``W = g * (W + scaling * B @ A)``, into an unmerged weight
        only (its norm is that of the unmerged weight)."""
        if name not in self.lora_magnitude_vector:
            super()._merge_adapter(name, exact)
            return
        if self.merged_adapters:
            raise RuntimeError(
                f"{self.layer_name}.merge: DoRA adapter {name!r} merges into an unmerged "
                f"weight only; {self.merged_adapters} is merged, unmerge() first"
            )
        self._dora_merges[name] = self._dora_merge_record(name, exact)

    def _check_unmerge(self) -> None:
        super()._check_unmerge()
        for name, record in self._dora_merges.items():
            self._dora_check_unmerge(name, record)

    def _unmerge_adapter(self, name: str) -> None:
        if name in self._dora_merges:
            self._dora_unmerge_record(name, self._dora_merges.pop(name))
        else:
            super()._unmerge_adapter(name)

    def _dora_adapter(self, name: str):
        return (
            self.lora_A[name].weight,
            self.lora_B[name].weight,
            self.lora_magnitude_vector[name].weight,
            self.scaling[name],
        )

    def _dora_detached(self, name: str):
        a, b, m, scale = self._dora_adapter(name)
        return a.detach(), b.detach(), m.detach(), scale

    def _dora_norm(self, name: str) -> torch.Tensor:
        """``||W + scaling * B A||_row`` of adapter ``name``, recomputed only when W, A, B or the
        scaling changed since the last call: in training every optimizer step changes A and B (one
        pass over W per step, as PEFT's DoRA), in inference the norm is computed once. The cache
        holds the tensors themselves (compared by identity and version counter), so a replaced or
        re-created adapter never meets a stale entry."""
        w, a, b = self.weight, self.lora_A[name].weight, self.lora_B[name].weight
        # identity, plus storage/device/dtype/version (``module.to()`` swaps ``.data`` in place)
        key = (w, a, b, _state(w), _state(a), _state(b), self.scaling[name])
        cache = self.__dict__.setdefault("_dora_norms", {})
        hit = cache.get(name)
        same = hit is not None and all(x is y for x, y in zip(hit[0][:3], key[:3], strict=True))
        if same and hit[0][3:] == key[3:]:
            return hit[1]
        norm = dora_weight_norm(
            w.detach(),
            a.detach(),
            b.detach(),
            self.scaling[name],
            weight_sq_norm=cached_weight_sq_norm(self, self.backend),
            backend=self.backend,
        )
        cache[name] = (key, norm)
        return norm

    def _dora_init_magnitude(self, name: str) -> DoraMagnitude:
        """The magnitude of adapter ``name`` at creation: ``||W + scaling * B A||_row``, in the
        adapter's dtype (PEFT's initialisation)."""
        self.__dict__.get("_dora_norms", {}).pop(name, None)
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        norm = dora_weight_norm(
            self.weight.detach(), a.detach(), b.detach(), self.scaling[name], backend=self.backend
        )
        return DoraMagnitude(norm.to(a.dtype))

    def _dora_forward(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """The layer's output with DoRA adapter ``name`` active (dropout on the DoRA branch in
        training)."""
        a, b, m, scale = self._dora_adapter(name)
        dropout = self.lora_dropout[name]
        x_lora = dropout(x) if (self.training and isinstance(dropout, nn.Dropout)) else None
        return dora_linear(
            x,
            self.weight,
            self.bias,
            a,
            b,
            m,
            scale,
            x_lora=x_lora,
            weight_norm=None if torch.compiler.is_compiling() else self._dora_norm(name),
            weight_sq_norm=cached_weight_sq_norm(self, self.backend),
            backend=self.backend,
        )

    def _dora_mixed_forward(self, x: torch.Tensor, y: torch.Tensor, adapter_names: list[str]):
        """``y`` (the plain LoRA rows done, DoRA rows at the base output) with each DoRA adapter's
        rows (sequences) replaced by that adapter's output."""
        for name in dict.fromkeys(adapter_names):
            if name not in self.lora_magnitude_vector:
                continue
            # built once per distinct batch (kept on the layer): no copy from the host per step
            rows = [i for i, n in enumerate(adapter_names) if n == name]
            rows = cached_host_tensor(self, rows, torch.int64, x.device)
            y = y.index_copy(0, rows, self._dora_forward(x.index_select(0, rows), name))
        return y

    def _dora_merge_record(self, name: str, exact: bool) -> DoraMerge:
        """Fold DoRA adapter ``name`` into ``self.weight`` in place; returns what unmerge needs."""
        a, b, m, scale = self._dora_detached(name)
        weight = self.weight.data
        if not exact:
            norm = merge_dora_(weight, a, b, m, scale, backend=self.backend)
            return DoraMerge(norm=norm, exact=False)
        norm = dora_weight_norm(weight, a, b, scale, backend=self.backend)
        n, k = weight.shape
        rows = _block_rows(n, k, weight.element_size())
        record = DoraMerge(
            norm=norm,
            exact=True,
            block_rows=rows,
            checksum=(_checksum(a), _checksum(b), _checksum(m)),
            sparse={},
            dense={},
        )
        itemsize = weight.element_size()
        with torch.no_grad():
            for i, start in enumerate(range(0, n, rows)):
                sl = slice(start, start + rows)
                w = weight[sl]
                original = w.clone()
                self._dora_merge_block(w, a, b[sl], m[sl], scale, norm[sl])
                trial = _twin(w)
                unmerge_dora_(trial, a, b[sl], m[sl], scale, norm[sl], backend=self.backend)
                positions = (_bits(trial) != _bits(original)).flatten().nonzero().squeeze(1)
                if positions.numel() == 0:
                    continue
                if positions.numel() * (4 + itemsize) >= original.numel() * itemsize:
                    record.dense[i] = original
                else:
                    record.sparse[i] = (positions.int(), original.flatten()[positions])
        return record

    def _dora_merge_block(self, w, a, b, m, scale, norm) -> None:
        be = resolve_backend(self.backend, w, a.shape[0])
        launcher(be, "dora", "dora_merge_")(w, a, b, scale, m.to(norm.dtype) / norm)

    def _dora_check_unmerge(self, name: str, record: DoraMerge) -> None:
        """Raise (weight untouched) when an exact record no longer matches the adapter."""
        if not record.exact:
            return
        a, b, m, _ = self._dora_adapter(name)
        if (_checksum(a), _checksum(b), _checksum(m)) != record.checksum:
            raise ValueError(
                f"{self.layer_name}.unmerge: DoRA adapter {name!r} changed since it was merged "
                "with exact=True, so the weight cannot be restored exactly; it is left merged"
            )

    def _dora_unmerge_record(self, name: str, record: DoraMerge) -> None:
        """Take DoRA adapter ``name`` out of ``self.weight`` (bit for bit for an exact record)."""
        a, b, m, scale = self._dora_detached(name)
        weight = self.weight.data
        if not record.exact:
            unmerge_dora_(weight, a, b, m, scale, record.norm, backend=self.backend)
            return
        n, k = weight.shape
        rows = record.block_rows
        with torch.no_grad():
            for i, start in enumerate(range(0, n, rows)):
                sl = slice(start, start + rows)
                w = weight[sl]
                if i in record.dense:
                    w.copy_(record.dense[i])
                    continue
                unmerge_dora_(w, a, b[sl], m[sl], scale, record.norm[sl], backend=self.backend)
                if i in record.sparse:
                    positions, values = record.sparse[i]
                    positions = positions.long()
                    w[positions // k, positions % k] = values
