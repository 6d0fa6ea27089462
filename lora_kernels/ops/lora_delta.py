"""The ``lora_delta`` family's ops (namespace ``lora_kernels``): the LoRA term alone, added into an
output that a serving engine's own base GEMM already wrote.

* ``lora_shrink_(out[M,R], x[M,K], lora_a[L,R,K], row_ids[M], scales[L], ranks[L]?, backend)``:
  ``out[i, :r_a] = scales[a] * x[i] @ lora_a[a, :r_a].T``, zeros elsewhere (``a = row_ids[i]``,
  -1 or out of range: no adapter);
* ``lora_expand_(y[M,N], s[M,R], lora_b[L,N,R], row_ids[M], ranks[L]?, add_inputs, backend)``:
  ``y[i] += s[i, :r_a] @ lora_b[a, :, :r_a].T`` for the rows with an adapter (``add_inputs=False``:
  written over them); other rows untouched.

Both mutate their first argument and return nothing, so ``torch.compile`` (vLLM compiles its
models with ``fullgraph=True``) traces them as opaque in-place ops. Inference only: an engine's
adapters are frozen, and the training families (``lora_linear``, ``lora_multi``) keep autograd.
Eager calls skip the dispatcher and call the launchers, as ``_family.define_family`` does.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_lora_expand_inputs, check_lora_shrink_inputs
from ..backends import launcher, resolve_backend

FAMILY = "lora_delta"

__all__ = ["lora_expand_", "lora_shrink_"]


@torch.library.custom_op("lora_kernels::lora_shrink_", mutates_args=("out",))
def _shrink_op(
    out: Tensor,
    x: Tensor,
    lora_a: Tensor,
    row_ids: Tensor,
    scales: Tensor,
    ranks: Tensor | None,
    backend: str,
) -> None:
    launcher(backend, FAMILY, "lora_shrink_")(out, x, lora_a, row_ids, scales, ranks)


@torch.library.custom_op("lora_kernels::lora_expand_", mutates_args=("y",))
def _expand_op(
    y: Tensor,
    s: Tensor,
    lora_b: Tensor,
    row_ids: Tensor,
    ranks: Tensor | None,
    add_inputs: bool,
    backend: str,
) -> None:
    launcher(backend, FAMILY, "lora_expand_")(y, s, lora_b, row_ids, ranks, add_inputs)


@_shrink_op.register_fake
def _(out, x, lora_a, row_ids, scales, ranks, backend):
    torch._check(out.shape[0] == x.shape[0], lambda: "out and x disagree in M")


@_expand_op.register_fake
def _(y, s, lora_b, row_ids, ranks, add_inputs, backend):
    torch._check(y.shape[0] == s.shape[0], lambda: "y and s disagree in M")


def lora_shrink_(
    out: Tensor,
    x: Tensor,
    lora_a: Tensor,
    row_ids: Tensor,
    scales: Tensor,
    ranks: Tensor | None = None,
    *,
    backend: str = "auto",
) -> Tensor:
    """In place: ``out[i, :r_a] = scales[a] * x[i] @ lora_a[a, :r_a].T``, zeros past ``r_a`` and
    in rows with no adapter; returns ``out``.

    Args:
        out: ``[M, R]`` float32 (or x's dtype), any strides (a slice of a stacked buffer).
        x: ``[M, K]``; lora_a: ``[L, R, K]`` (any strides, e.g. vLLM's ``[L, 1, R, K]`` stack
            indexed ``[:, 0]``), float16, bfloat16 or float32.
        row_ids: ``[M]`` int32/int64, the adapter of each row; -1 (or out of ``[0, L)``): none.
        scales: ``[L]`` float32, each adapter's scaling.
        ranks: ``[L]`` int32, each adapter's true rank (slots past it are neither read nor
            written), or None for R everywhere.
    """
    check_lora_shrink_inputs("lora_shrink_", out, x, lora_a, row_ids, scales, ranks)
    be = resolve_backend(backend, x, lora_a.shape[1], lora_a)
    if torch.compiler.is_compiling():
        _shrink_op(out, x, lora_a, row_ids, scales, ranks, be)
    else:
        launcher(be, FAMILY, "lora_shrink_")(out, x, lora_a, row_ids, scales, ranks)
    return out


def lora_expand_(
    y: Tensor,
    s: Tensor,
    lora_b: Tensor,
    row_ids: Tensor,
    ranks: Tensor | None = None,
    *,
    add_inputs: bool = True,
    backend: str = "auto",
) -> Tensor:
    """In place: ``y[i] += s[i, :r_a] @ lora_b[a, :, :r_a].T`` for every row with an adapter
    (``add_inputs=False``: ``=``); other rows untouched; returns ``y``.

    Args:
        y: ``[M, N]``, any strides (a column slice of a fused qkv output); its dtype is the
            output's, the sum is fp32 and rounded there.
        s: ``[M, R]``, the shrink's output (float32 or y's dtype).
        lora_b: ``[L, N, R]``, any strides; row_ids, ranks: as in :func:`lora_shrink_`.
    """
    check_lora_expand_inputs("lora_expand_", y, s, lora_b, row_ids, ranks)
    be = resolve_backend(backend, y, lora_b.shape[2], lora_b)
    if torch.compiler.is_compiling():
        _expand_op(y, s, lora_b, row_ids, ranks, add_inputs, be)
    else:
        launcher(be, FAMILY, "lora_expand_")(y, s, lora_b, row_ids, ranks, add_inputs)
    return y
