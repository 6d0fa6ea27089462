"""DoRA inside ``FusedLoraLinear``: the magnitude module, the forward, merge and unmerge.

A DoRA adapter is a LoRA adapter plus ``layer.lora_magnitude_vector[name].weight`` ``[N]``, PEFT's
layout and state_dict key (``lora_magnitude_vector.<name>.weight``), initialised to the row norms
of ``W + scaling * B A`` so the layer starts equal to the base. ``||W||_row^2`` is cached per
weight (the base is frozen; the cache follows the weight's storage and version counter).

Merge folds ``g = m / ||W + s B A||_row`` in: ``W' = g[:, None] * (W + s B A)``; the norm is kept,
since the merged weight no longer holds it, and unmerge computes ``W'/g - s B A`` (PEFT does the
same). ``exact=True`` records the elements whose unmerge would not round back, as
``lora_kernels.exact_merge`` does for LoRA, so unmerge restores the weight bit for bit.

Mixed batches (``adapter_names``): rows of plain LoRA adapters run in one
``lora_linear_multi`` call as before; each DoRA adapter's rows then run through ``dora_linear`` on
their own (one call per DoRA adapter of the batch) and replace the base rows of that output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .backends import launcher, resolve_backend
from .dora import dora_linear, dora_weight_norm, merge_dora_, unmerge_dora_, weight_sq_norm
from .exact_merge import _bits, _block_rows, _checksum, _twin

__all__ = ["DoraMagnitude", "DoraMerge"]


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


def _adapter(layer, name: str):
    return (
        layer.lora_A[name].weight,
        layer.lora_B[name].weight,
        layer.lora_magnitude_vector[name].weight,
        layer.scaling[name],
    )


def _detached(layer, name: str):
    a, b, m, scale = _adapter(layer, name)
    return a.detach(), b.detach(), m.detach(), scale


def cached_weight_sq_norm(linear: nn.Linear, backend: str) -> torch.Tensor:
    """``||W||_row^2`` of ``linear.weight``, kept on ``linear`` and recomputed only when the
    weight changed (new storage, device or dtype, or an in-place write)."""
    from .nn import _weight_state

    state = _weight_state(linear)
    cache = linear.__dict__.get("_dora_w_sq")
    if cache is None or cache[0] != state:
        with torch.no_grad():
            cache = (state, weight_sq_norm(linear.weight, backend=backend))
        linear.__dict__["_dora_w_sq"] = cache
    return cache[1]


def _state(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), t.device, t.dtype, t._version)


def cached_weight_norm(layer, name: str) -> torch.Tensor:
    """``||W + scaling * B A||_row`` of adapter ``name``, recomputed only when W, A, B or the
    scaling changed since the last call: in training every optimizer step changes A and B (one
    pass over W per step, as PEFT's DoRA), in inference the norm is computed once. The cache
    holds the tensors themselves (compared by identity and version counter), so a replaced or
    re-created adapter never meets a stale entry."""
    w, a, b = layer.weight, layer.lora_A[name].weight, layer.lora_B[name].weight
    # identity, plus storage/device/dtype/version (``module.to()`` swaps ``.data`` in place)
    key = (w, a, b, _state(w), _state(a), _state(b), layer.scaling[name])
    cache = layer.__dict__.setdefault("_dora_norms", {})
    hit = cache.get(name)
    same = hit is not None and all(x is y for x, y in zip(hit[0][:3], key[:3], strict=True))
    if same and hit[0][3:] == key[3:]:
        return hit[1]
    norm = dora_weight_norm(
        w.detach(),
        a.detach(),
        b.detach(),
        layer.scaling[name],
        weight_sq_norm=cached_weight_sq_norm(layer, layer.backend),
        backend=layer.backend,
    )
    cache[name] = (key, norm)
    return norm


def init_magnitude(layer, name: str) -> DoraMagnitude:
    """The magnitude of adapter ``name`` at creation: ``||W + scaling * B A||_row``, in the
    adapter's dtype (PEFT's initialisation)."""
    layer.__dict__.get("_dora_norms", {}).pop(name, None)
    a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
    norm = dora_weight_norm(
        layer.weight.detach(), a.detach(), b.detach(), layer.scaling[name], backend=layer.backend
    )
    return DoraMagnitude(norm.to(a.dtype))


def forward(layer, x: torch.Tensor, name: str) -> torch.Tensor:
    """``layer(x)`` with DoRA adapter ``name`` active (dropout on the DoRA branch in training)."""
    a, b, m, scale = _adapter(layer, name)
    dropout = layer.lora_dropout[name]
    x_lora = dropout(x) if (layer.training and isinstance(dropout, nn.Dropout)) else None
    return dora_linear(
        x,
        layer.weight,
        layer.bias,
        a,
        b,
        m,
        scale,
        x_lora=x_lora,
        weight_norm=None if torch.compiler.is_compiling() else cached_weight_norm(layer, name),
        weight_sq_norm=cached_weight_sq_norm(layer, layer.backend),
        backend=layer.backend,
    )


def mixed_forward(layer, x: torch.Tensor, y: torch.Tensor, adapter_names: list[str]):
    """``y`` (the plain LoRA rows done, DoRA rows at the base output) with each DoRA adapter's
    rows (sequences) replaced by that adapter's output."""
    for name in dict.fromkeys(adapter_names):
        if name not in layer.lora_magnitude_vector:
            continue
        rows = torch.tensor([i for i, n in enumerate(adapter_names) if n == name], device=x.device)
        y = y.index_copy(0, rows, forward(layer, x.index_select(0, rows), name))
    return y


def merge(layer, name: str, exact: bool) -> DoraMerge:
    """Fold DoRA adapter ``name`` into ``layer.weight`` in place; returns what unmerge needs."""
    a, b, m, scale = _detached(layer, name)
    weight = layer.weight.data
    if not exact:
        norm = merge_dora_(weight, a, b, m, scale, backend=layer.backend)
        return DoraMerge(norm=norm, exact=False)
    norm = dora_weight_norm(weight, a, b, scale, backend=layer.backend)
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
            _merge_block(layer, w, a, b[sl], m[sl], scale, norm[sl])
            trial = _twin(w)
            unmerge_dora_(trial, a, b[sl], m[sl], scale, norm[sl], backend=layer.backend)
            positions = (_bits(trial) != _bits(original)).flatten().nonzero().squeeze(1)
            if positions.numel() == 0:
                continue
            if positions.numel() * (4 + itemsize) >= original.numel() * itemsize:
                record.dense[i] = original
            else:
                record.sparse[i] = (positions.int(), original.flatten()[positions])
    return record


def _merge_block(layer, w, a, b, m, scale, norm) -> None:
    be = resolve_backend(layer.backend, w, a.shape[0])
    launcher(be, "dora", "dora_merge_")(w, a, b, scale, m.to(norm.dtype) / norm)


def check_unmerge(layer, name: str, record: DoraMerge) -> None:
    """Raise (weight untouched) when an exact record no longer matches the adapter."""
    if not record.exact:
        return
    a, b, m, _ = _adapter(layer, name)
    if (_checksum(a), _checksum(b), _checksum(m)) != record.checksum:
        raise ValueError(
            f"FusedLoraLinear.unmerge: DoRA adapter {name!r} changed since it was merged with "
            "exact=True, so the weight cannot be restored exactly; it is left merged"
        )


def unmerge(layer, name: str, record: DoraMerge) -> None:
    """Take DoRA adapter ``name`` out of ``layer.weight`` (bit for bit for an exact record)."""
    a, b, m, scale = _detached(layer, name)
    weight = layer.weight.data
    if not record.exact:
        unmerge_dora_(weight, a, b, m, scale, record.norm, backend=layer.backend)
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
            unmerge_dora_(w, a, b[sl], m[sl], scale, record.norm[sl], backend=layer.backend)
            if i in record.sparse:
                positions, values = record.sparse[i]
                positions = positions.long()
                w[positions // k, positions % k] = values
