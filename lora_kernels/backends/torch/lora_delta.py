"""The torch backend of the ``lora_delta`` family: the LoRA term alone, in two steps, for engines
whose base GEMM runs elsewhere (vLLM's punica seam, SGLang's LoRA backends)::

    shrink:  out[i, :r_a] = scales[a] * x[i] @ lora_a[a, :r_a].T     (0 past r_a and for id -1)
    expand:  y[i] += s[i, :r_a] @ lora_b[a, :, :r_a].T                  (id -1: row untouched)

    x [M, K], lora_a [L, R, K], lora_b [L, N, R], s / out [M, R] float32, y [M, N],
    scales [L] float32, row_ids [M] (-1 or any id outside [0, L): no adapter), ranks [L] or None

``a = row_ids[i]``, ``r_a = ranks[a]`` (R without ranks). Products run in fp32 (float64 for
float64 tensors); the expand rounds once, when it writes y. With ``add_inputs=False`` the expand
writes ``s @ lora_b.T`` over the rows that have an adapter and leaves the others as they are
(vLLM's rule for its dual-stream path).

On CPU the rows are grouped by adapter as in ``lora_multi`` (``_plan``: a loop over the adapters
some row uses, never over rows), since reading the ids there costs nothing. Off the CPU (this path
forced on CUDA, or a classifier head wider than the kernels' largest rank) the ids are never read
on the host: every row gathers its adapter's weights, in chunks, the same ops whatever the ids.
"""

from __future__ import annotations

import torch

from .lora_multi import _chunks, _dense_rows, _plan, _rank_mask, _reads_ids, _segments


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def lora_shrink_(out, x, lora_a, row_ids, scales, ranks=None):
    """``out`` (``[M, R]``, written in place, any float dtype) per the module docstring."""
    num_adapters, r_max, k = lora_a.shape
    acc = _acc_dtype(out)
    scales = scales.to(device=x.device, dtype=acc)
    if not _reads_ids(x.device):
        adapters, valid, row_scales = _dense_rows(row_ids, num_adapters, scales)
        for rows in _chunks(x.shape[0], r_max, k, 0):
            a = adapters[rows]
            sa = torch.bmm(lora_a[a].to(acc), x[rows].to(acc).unsqueeze(2)).squeeze(2)
            mask = _rank_mask(ranks, a, r_max)
            if mask is not None:
                sa = sa * mask
            # where, not a product: a free slot's weights may hold anything, NaN included
            out[rows] = torch.where(valid[rows, None], sa * row_scales[rows, None], 0.0).to(
                out.dtype
            )
        return out
    out.zero_()
    _, rows, _, counts = _plan(row_ids, num_adapters, r_max, k, 0)
    for a, idx, r in _segments(rows, counts, ranks, r_max):
        sa = x.index_select(0, idx).to(acc) @ lora_a[a, :r].to(acc).T
        out[idx, :r] = sa.mul_(scales[a]).to(out.dtype)
    return out


def lora_expand_(y, s, lora_b, row_ids, ranks=None, add_inputs=True):
    """``y`` (``[M, N]``, in place; may be a column slice of a wider output) per the module
    docstring."""
    num_adapters, n, r_max = lora_b.shape
    acc = _acc_dtype(y)
    if not _reads_ids(y.device):
        ones = torch.ones(num_adapters, dtype=acc, device=y.device)
        adapters, valid, _ = _dense_rows(row_ids, num_adapters, ones)
        for rows in _chunks(y.shape[0], r_max, 0, n):
            a = adapters[rows]
            sa = s[rows].to(acc)
            mask = _rank_mask(ranks, a, r_max)
            if mask is not None:
                sa = sa * mask
            term = torch.bmm(lora_b[a].to(acc), sa.unsqueeze(2)).squeeze(2)
            cur = y[rows]
            new = term + cur.to(acc) if add_inputs else term
            y[rows] = torch.where(valid[rows, None], new.to(y.dtype), cur)
        return y
    _, rows, _, counts = _plan(row_ids, num_adapters, r_max, 0, n)
    for a, idx, r in _segments(rows, counts, ranks, r_max):
        term = s.index_select(0, idx)[:, :r].to(acc) @ lora_b[a, :, :r].to(acc).T
        if add_inputs:
            term += y.index_select(0, idx).to(acc)
        y[idx] = term.to(y.dtype)
    return y
