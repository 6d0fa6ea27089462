"""Exact merge and unmerge: the base weight comes back bit for bit after any number of switches.

Arithmetic cannot undo a merge in a 16-bit dtype: ``W' = round(W + d)`` loses the low bits of
``W`` wherever ``W + d`` lands in a coarser binade than ``W`` (``|W|`` small next to ``d``, or
``W + d`` crossing a power of two) and at rounding ties, so ``round(W' - d) != W`` there, and
every merge/unmerge pair of PEFT's naive bf16 add/subtract (two roundings each way) moves the base
further. :func:`exact_merge_` keeps a sparse record of exactly the elements the subtraction would
not round back, and :func:`exact_unmerge_` subtracts and then writes those elements back.

The scheme, one block of rows at a time (at most ``BLOCK_BYTES`` of weight, so the temporaries
are two blocks, never ``[N, K]``):

* merge: copy the block, merge it in place (``merge_lora_``: fp32, one rounding), unmerge a
  scratch copy of the merged block exactly as :func:`exact_unmerge_` will (the same launch on the
  same shapes, strides and pointer alignment with the same backend, hence the same fp32 delta and
  the same rounding), and record
  every element whose trial differs bitwise from the original: its position in the block (int32)
  and its original value. A block whose record would outweigh the block is copied whole instead.
* unmerge: the same launch with ``-scale`` on each block, then the recorded values written back.

Why this record rather than a pristine copy of the base in (pinned) CPU RAM: the copy costs the
whole model's size again and a full host-to-device copy per unmerge (PCIe, ~50 GB/s), where the
record costs ``(4 + itemsize) * f`` bytes per weight element, ``f`` the fraction of elements that
do not round back, and stays on the weight's device, so unmerge runs at memory bandwidth.
``f`` grows with the delta's size relative to the weight's; the measured table (bf16, a rank-16
delta) is in ``benchmarks/results/exact_merge_record.md``.

Trained adapters change a weight by a few percent of its size, so the record is a small fraction
of a copy of the merged layers, against 100% for the pristine copy. Time: an exact merge
is about three passes over the weight (copy, merge, trial unmerge, compare: ~3-4x a plain
merge); an exact unmerge is one plain unmerge plus a scatter of ``f`` of the elements.

What exactness rests on: the backend computes the same fp32 delta for the same inputs and shapes
(fixed tiles and reduction order: the Triton kernel has no autotuning and no atomics; the torch
path calls the same BLAS routine on the same shapes), the same backend runs both ways (the
record keeps it), and the adapter does not change while merged: :func:`exact_unmerge_` compares
a checksum of ``lora_a``/``lora_b`` with the one taken at merge and refuses, weight untouched,
when they differ.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .._checks import check_merge_inputs
from ..backends import resolve_backend
from ..functional.lora import merge_lora_

__all__ = [
    "BLOCK_BYTES",
    "ExactMergeRecord",
    "check_exact_unmerge",
    "exact_merge_",
    "exact_unmerge_",
]

BLOCK_BYTES = 8 << 20
"""Rows of the weight handled at once by the exact scheme: at most this many bytes of weight."""

_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns as integers (NaN payloads, signed zeros and all)."""
    return t.view(_BITS[t.element_size()])


def _checksum(t: torch.Tensor) -> int:
    """The sum of the bit patterns: one pass, no temporary. A change to any one element changes
    it; changes to many elements (an optimizer step) leave it equal only by a coincidence
    among ~2^16 * sqrt(numel) possible sums."""
    return int(_bits(t.detach()).sum(dtype=torch.int64))


@dataclass
class ExactMergeRecord:
    """What :func:`exact_unmerge_` needs to give the weight back bit for bit.

    ``sparse[i] = (positions, values)``: the row-major positions (int32) in block ``i`` of the
    elements whose subtraction does not round back, and their original values; ``dense[i]``: the
    whole original block ``i`` where that is smaller. Blocks are ``block_rows`` rows each.
    """

    shape: tuple[int, int]
    dtype: torch.dtype
    block_rows: int
    backend: str
    scale: float
    checksum: tuple[int, int]
    sparse: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    dense: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def num_recorded(self) -> int:
        """Elements the record restores (a block copied whole counts all its elements)."""
        return sum(p.numel() for p, _ in self.sparse.values()) + sum(
            d.numel() for d in self.dense.values()
        )

    @property
    def fraction(self) -> float:
        """``num_recorded`` over the weight's element count."""
        numel = self.shape[0] * self.shape[1]
        return self.num_recorded / numel if numel else 0.0

    @property
    def nbytes(self) -> int:
        """Memory the record holds, on the weight's device."""
        sparse = sum(
            p.numel() * p.element_size() + v.numel() * v.element_size()
            for p, v in self.sparse.values()
        )
        return sparse + sum(d.numel() * d.element_size() for d in self.dense.values())


def _twin(w: torch.Tensor) -> torch.Tensor:
    """A copy of ``w`` with its strides and its data pointer's alignment modulo 256 bytes.

    Kernels are specialised on pointer alignment (Triton on 16 bytes, vectorised loads on more);
    a trial run on a twin of a weight block thus takes the very code path the block will.
    """
    if not w.is_contiguous():
        return w.clone()
    size = w.element_size()
    buf = torch.empty(w.numel() + 256 // size, dtype=w.dtype, device=w.device)
    start = ((w.data_ptr() - buf.data_ptr()) % 256) // size
    return buf[start : start + w.numel()].view(w.shape).copy_(w)


def _block_rows(n: int, k: int, itemsize: int) -> int:
    return max(1, min(n, BLOCK_BYTES // max(1, k * itemsize)))


def exact_merge_(
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    *,
    backend: str = "auto",
) -> ExactMergeRecord:
    """In place: ``weight += scale * lora_b @ lora_a`` exactly as :func:`merge_lora_` computes it,
    and the record that lets :func:`exact_unmerge_` restore ``weight`` bit for bit.

    Args:
        weight: ``[N, K]``, float16, bfloat16, float32 or float64; changed in place.
        lora_a: ``[r, K]``; lora_b: ``[N, r]``; on weight's device.
        scale: the adapter's scaling.
        backend: as :func:`merge_lora_`; resolved once and kept in the record.

    Returns:
        An :class:`ExactMergeRecord` on weight's device (see the module docstring for its size).
    """
    fn = "exact_merge_"
    scale = check_merge_inputs(fn, weight, lora_a, lora_b, scale)
    be = resolve_backend(backend, weight, lora_a.shape[0])
    n, k = weight.shape
    itemsize = weight.element_size()
    rows = _block_rows(n, k, itemsize)
    record = ExactMergeRecord(
        shape=(n, k),
        dtype=weight.dtype,
        block_rows=rows,
        backend=be,
        scale=scale,
        checksum=(_checksum(lora_a), _checksum(lora_b)),
    )
    with torch.no_grad():
        for i, start in enumerate(range(0, n, rows)):
            w = weight[start : start + rows]
            b = lora_b[start : start + rows]
            original = w.clone()
            merge_lora_(w, lora_a, b, scale, backend=be)
            trial = _twin(w)
            merge_lora_(trial, lora_a, b, -scale, backend=be)
            positions = (_bits(trial) != _bits(original)).flatten().nonzero().squeeze(1)
            if positions.numel() == 0:
                continue
            if positions.numel() * (4 + itemsize) >= original.numel() * itemsize:
                record.dense[i] = original
            else:
                record.sparse[i] = (positions.int(), original.flatten()[positions])
    return record


def check_exact_unmerge(
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    record: ExactMergeRecord,
    *,
    fn: str = "check_exact_unmerge",
) -> float:
    """Raise unless :func:`exact_unmerge_` can restore ``weight`` with these arguments; returns
    ``scale`` as a float. Changes nothing: callers check every layer before unmerging any."""
    scale = check_merge_inputs(fn, weight, lora_a, lora_b, scale)
    if not isinstance(record, ExactMergeRecord):
        raise TypeError(f"{fn}: expected record to be an ExactMergeRecord, got {type(record)}")
    if tuple(weight.shape) != record.shape or weight.dtype != record.dtype:
        raise ValueError(
            f"{fn}: the record is for a weight of shape {list(record.shape)} and dtype "
            f"{record.dtype}, got {list(weight.shape)} {weight.dtype}"
        )
    if scale != record.scale:
        raise ValueError(f"{fn}: the record was made with scale {record.scale}, got {scale}")
    if (_checksum(lora_a), _checksum(lora_b)) != record.checksum:
        raise ValueError(
            f"{fn}: lora_a/lora_b are not the tensors merged with exact=True (they changed since "
            "the merge), so the weight cannot be restored exactly; it is left merged"
        )
    return scale


def exact_unmerge_(
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    record: ExactMergeRecord,
) -> torch.Tensor:
    """In place: undo :func:`exact_merge_` with the same adapter, bit for bit; returns ``weight``.

    Raises ``ValueError`` (weight untouched) when ``weight``, ``scale`` or the adapter is not the
    one the record was made for, or the adapter changed since the merge.
    """
    scale = check_exact_unmerge(weight, lora_a, lora_b, scale, record, fn="exact_unmerge_")
    n, k = record.shape
    rows = record.block_rows
    with torch.no_grad():
        for i, start in enumerate(range(0, n, rows)):
            w = weight[start : start + rows]
            if i in record.dense:
                w.copy_(record.dense[i])
                continue
            merge_lora_(w, lora_a, lora_b[start : start + rows], -scale, backend=record.backend)
            if i in record.sparse:
                positions, values = record.sparse[i]
                positions = positions.to(w.device).long()
                w[positions // k, positions % k] = values.to(w.device)
    return weight
