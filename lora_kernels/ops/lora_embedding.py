"""The ``lora_embedding`` family's ops (namespace ``lora_kernels``): PEFT's ``lora.Embedding``.

* ``lora_embedding_fwd(ids[M], weight[V,D], lora_a[L,R,V], lora_b[L,D,R], scales[L]?, scale,
  row_ids[M]?, padding_idx, backend) -> (y[M,D], s[M,R] fp32)``; ``s = lora_a[a].T[ids]`` is kept
  for the backward and is not differentiable.
* ``lora_embedding_bwd(dy, ids, weight, lora_a, lora_b, scales?, scale, row_ids?, s, padding_idx,
  needs_da, needs_db, backend) -> (da, db)``; a gradient that is not needed comes back empty.

One adapter (``row_ids`` None) takes its scale as the host float ``scale`` (``scales`` None); a
mixed batch takes ``scales`` as a device tensor (fp32, fp64 for an fp64 table) and ``scale`` is
unused. A mixed batch's scales never pass through the host: a CUDA tensor of scales is read by
the kernels, so a decode step has no synchronisation (list scales become that tensor once per
distinct list, in ``_checks``).

The base table's gradient (when it trains) is the gather's: ``dy`` rows added into the rows of
``ids``, padding rows skipped, the same on every backend.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..backends import launcher
from ._family import define_family, empty_if_none

FAMILY = "lora_embedding"


def _launcher_scales(scales, scale):
    """What the launchers take: the mixed batch's ``[L]`` tensor, or one adapter's float."""
    return [scale] if scales is None else scales


def _launch_fwd(ids, weight, lora_a, lora_b, scales, scale, row_ids, padding_idx, backend):
    args = (ids, weight, lora_a, lora_b, _launcher_scales(scales, scale), row_ids, padding_idx)
    return launcher(backend, FAMILY, "lora_embedding_fwd", *args)(*args)


def _launch_bwd(
    dy, ids, weight, lora_a, lora_b, scales, scale, row_ids, s, padding_idx, needs_da, needs_db,
    backend,
):  # fmt: skip
    fn = launcher(backend, FAMILY, "lora_embedding_bwd")
    return fn(
        dy, ids, weight, lora_a, lora_b, _launcher_scales(scales, scale), row_ids, s, padding_idx,
        needs_da=needs_da, needs_db=needs_db,
    )  # fmt: skip


def lora_embedding_fwd(
    ids: Tensor,
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scales: Tensor | None,
    scale: float,
    row_ids: Tensor | None,
    padding_idx: int,
    backend: str,
) -> tuple[Tensor, Tensor]:
    return _launch_fwd(ids, weight, lora_a, lora_b, scales, scale, row_ids, padding_idx, backend)


def _fwd_fake(ids, weight, lora_a, lora_b, scales, scale, row_ids, padding_idx, backend):
    torch._check(ids.dim() == 1, lambda: f"ids must be 1-D here, got {ids.dim()}-D")
    if scales is not None:
        torch._check(
            scales.dim() == 1 and scales.shape[0] == lora_a.shape[0],
            lambda: f"scales must be [{lora_a.shape[0]}], got {list(scales.shape)}",
        )
    y = weight.new_empty((ids.shape[0], weight.shape[1]))
    s = weight.new_empty((ids.shape[0], lora_a.shape[1]), dtype=torch.float32)
    return y, s


def lora_embedding_bwd(
    dy: Tensor,
    ids: Tensor,
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scales: Tensor | None,
    scale: float,
    row_ids: Tensor | None,
    s: Tensor,
    padding_idx: int,
    needs_da: bool,
    needs_db: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    grads = _launch_bwd(
        dy, ids, weight, lora_a, lora_b, scales, scale, row_ids, s, padding_idx, needs_da,
        needs_db, backend,
    )  # fmt: skip
    return empty_if_none(grads, (lora_a, lora_b))


def _bwd_fake(dy, ids, weight, lora_a, lora_b, scales, scale, row_ids, s, padding_idx, needs_da,
              needs_db, backend):  # fmt: skip
    da = torch.empty_like(lora_a) if needs_da else lora_a.new_empty(0)
    db = torch.empty_like(lora_b) if needs_db else lora_b.new_empty(0)
    return da, db


def _setup_context(ctx, inputs, output):
    ids, weight, lora_a, lora_b, scales, scale, row_ids, padding_idx, backend = inputs
    _, s = output
    ctx.mark_non_differentiable(s)
    ctx.save_for_backward(ids, weight, lora_a, lora_b, s, row_ids, scales)
    ctx.scale = scale
    ctx.padding_idx = padding_idx
    ctx.backend = backend


def _backward(ctx, dy, _ds):
    ids, weight, lora_a, lora_b, s, row_ids, scales = ctx.saved_tensors
    _, need_w, need_a, need_b = ctx.needs_input_grad[:4]
    dy = dy.contiguous()
    da = db = dw = None
    if need_a or need_b:
        da, db = ctx.run_bwd(
            dy, ids, weight, lora_a, lora_b, scales, ctx.scale, row_ids, s, ctx.padding_idx,
            need_a, need_b, ctx.backend,
        )  # fmt: skip
        da = da if need_a else None
        db = db if need_b else None
    if need_w:
        rows = dy.to(weight.dtype)
        if ctx.padding_idx >= 0:
            rows = rows * (ids != ctx.padding_idx)[:, None].to(rows.dtype)
        dw = torch.zeros_like(weight).index_add_(0, ids, rows)
    return None, dw, da, db, None, None, None, None, None


# ``y [M, D]`` for validated inputs ``(ids [M] int64, weight, lora_a [L, R, V], lora_b [L, D, R],
# scales [L] or None, scale, row_ids, padding_idx, backend)``. Every backend runs its own backward
# launcher (the torch one writes A's gradient in one pass, where stock autograd of the gather
# makes three).
lora_embedding_1d = define_family(
    "lora_embedding",
    fwd=lora_embedding_fwd,
    fwd_fake=_fwd_fake,
    bwd=lora_embedding_bwd,
    bwd_fake=_bwd_fake,
    launch_fwd=_launch_fwd,
    launch_bwd=_launch_bwd,
    setup_context=_setup_context,
    backward=_backward,
)
