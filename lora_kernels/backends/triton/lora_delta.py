"""The Triton backend of the ``lora_delta`` family (the LoRA term alone, shapes and semantics in
``backends/torch/lora_delta.py``), built on the ``lora_multi`` kernels:

* shrink: ``lora_multi``'s shrink kernels (one row per program for decode batches, tiles of rows
  sorted by adapter for prefill), then one element-wise pass that applies each row's scale;
* expand: ``lora_multi``'s fused kernel with an empty base GEMM (K = 0: the base loop runs no
  step), so it computes ``s @ lora_b[a].T`` with the same gather / grouped epilogue, into a
  temporary that is then added to (or, for ``add_inputs=False``, written over) the rows of y that
  have an adapter.

The expand therefore rounds twice (the term to y's dtype, then the sum) and keeps an ``[M, N]``
temporary; a kernel that loads y into its fp32 accumulator would do neither. Nothing here reads
the ids on the host or sizes a tensor by their values: a decode step stays capturable in a CUDA
graph.
"""

from __future__ import annotations

import torch

from . import on_input_device
from ._args import index_vector
from .lora_multi import _fused, _shrink, _sort_rows, choose_strategy


@on_input_device
def lora_shrink_(out, x, lora_a, row_ids, scales, ranks=None):
    # the kernels index ids and ranks by position (the one rule: backends/triton/_args.py)
    row_ids, scales, ranks = index_vector(row_ids), index_vector(scales), index_vector(ranks)
    num_adapters, r_max, _ = lora_a.shape
    strategy = choose_strategy(x.shape[0], num_adapters)
    sorted_rows = _sort_rows(row_ids) if strategy == "grouped" else None
    s = _shrink(
        x, lora_a, lora_a.stride(), row_ids, sorted_rows, ranks, num_adapters, r_max, strategy
    )
    valid = (row_ids >= 0) & (row_ids < num_adapters)
    row_scale = torch.where(valid, scales[row_ids.long().clamp(0, num_adapters - 1)], 0.0)
    torch.mul(s, row_scale[:, None], out=s)
    out.copy_(s)
    return out


@on_input_device
def lora_expand_(y, s, lora_b, row_ids, ranks=None, add_inputs=True):
    row_ids, ranks = index_vector(row_ids), index_vector(ranks)
    m, n = y.shape
    num_adapters = lora_b.shape[0]
    strategy = choose_strategy(m, num_adapters)
    sorted_rows = _sort_rows(row_ids) if strategy == "grouped" else None
    ones = torch.ones(num_adapters, dtype=torch.float32, device=y.device)
    term = torch.empty((m, n), dtype=y.dtype, device=y.device)
    # K = 0 views that point into live tensors: the base loop never loads through them
    no_x = y[:, :0]
    no_w = lora_b[0, :, :0]
    _fused(
        no_x, no_w, (no_w.stride(0), no_w.stride(1)), None, s, lora_b, lora_b.stride(), ones,
        row_ids, sorted_rows, ranks, term, strategy,
    )  # fmt: skip
    valid = ((row_ids >= 0) & (row_ids < num_adapters))[:, None]
    if add_inputs:
        y.add_(term)  # rows with no adapter add exact zeros
    else:
        y.copy_(torch.where(valid, term, y))
    return y
