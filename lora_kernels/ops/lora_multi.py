"""The ``lora_multi`` family's ops (namespace ``lora_kernels``): a different adapter per row.

* ``lora_linear_multi_fwd(x[M,K], weight[N,K], bias?, lora_a[L,R,K], lora_b[L,N,R], scales[L],
  row_ids[M], ranks[L]?, backend) -> (y[M,N], s[M,R])``: id -1 or out of range: base only; ``s``
  (fp32, fp64 for fp64 inputs) is kept for the backward.
* ``lora_linear_multi_bwd(dy, x, weight, lora_a, lora_b, scales, row_ids, s, ranks?, needs_dx,
  needs_da, needs_db, backend) -> (dx, da[L,R,K], db[L,N,R])``; not needed: an empty tensor.
  ``scales``, ``row_ids`` and ``ranks`` are not differentiable.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..backends import launcher
from ._family import base_grads, define_family, empty_if_none

FAMILY = "lora_multi"


def _launch_fwd(x, weight, bias, lora_a, lora_b, scales, row_ids, ranks, backend):
    args = (x, weight, bias, lora_a, lora_b, scales, row_ids, ranks)
    return launcher(backend, FAMILY, "lora_linear_multi_fwd", *args)(*args)


def _launch_bwd(
    dy, x, weight, lora_a, lora_b, scales, row_ids, s, ranks, needs_dx, needs_da, needs_db, backend
):
    """The backward launchers, called directly; a gradient not needed is None."""
    fn = launcher(backend, FAMILY, "lora_linear_multi_bwd")
    return fn(
        dy, x, weight, lora_a, lora_b, scales, row_ids, s, ranks,
        needs_dx=needs_dx, needs_da=needs_da, needs_db=needs_db,
    )  # fmt: skip


def lora_linear_multi_fwd(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    scales: Tensor,
    row_ids: Tensor,
    ranks: Tensor | None,
    backend: str,
) -> tuple[Tensor, Tensor]:
    return _launch_fwd(x, weight, bias, lora_a, lora_b, scales, row_ids, ranks, backend)


def _fwd_fake(x, weight, bias, lora_a, lora_b, scales, row_ids, ranks, backend):
    torch._check(x.dim() == 2, lambda: f"x must be 2-D here, got {x.dim()}-D")
    torch._check(weight.shape[1] == x.shape[1], lambda: "weight and x disagree in K")
    torch._check(row_ids.shape[0] == x.shape[0], lambda: "row_ids and x disagree in M")
    y = x.new_empty((x.shape[0], weight.shape[0]))
    s_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    s = x.new_empty((x.shape[0], lora_a.shape[1]), dtype=s_dtype)
    return y, s


def lora_linear_multi_bwd(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scales: Tensor,
    row_ids: Tensor,
    s: Tensor,
    ranks: Tensor | None,
    needs_dx: bool,
    needs_da: bool,
    needs_db: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    grads = _launch_bwd(
        dy, x, weight, lora_a, lora_b, scales, row_ids, s, ranks,
        needs_dx, needs_da, needs_db, backend,
    )  # fmt: skip
    return empty_if_none(grads, (x, lora_a, lora_b))


def _bwd_fake(dy, x, weight, lora_a, lora_b, scales, row_ids, s, ranks, needs_dx, needs_da,
              needs_db, backend):  # fmt: skip
    dx = x.new_empty(x.shape) if needs_dx else x.new_empty(0)
    da = lora_a.new_empty(lora_a.shape) if needs_da else lora_a.new_empty(0)
    db = lora_b.new_empty(lora_b.shape) if needs_db else lora_b.new_empty(0)
    return dx, da, db


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scales, row_ids, ranks, backend = inputs
    _, s = output
    ctx.mark_non_differentiable(s)
    ctx.save_for_backward(x, weight, lora_a, lora_b, scales, row_ids, s, ranks)
    ctx.backend = backend


def _backward(ctx, dy, _ds):
    x, weight, lora_a, lora_b, scales, row_ids, s, ranks = ctx.saved_tensors
    need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
    dy = dy.contiguous()
    dx = da = db = None
    if need_x or need_a or need_b:
        dx, da, db = ctx.run_bwd(
            dy, x, weight, lora_a, lora_b, scales, row_ids, s, ranks,
            need_x, need_a, need_b, ctx.backend,
        )  # fmt: skip
        dx = dx if need_x else None
        da = da if need_a else None
        db = db if need_b else None
    dw, dbias = base_grads(dy, x, weight, need_w, need_bias)
    return dx, dw, dbias, da, db, None, None, None, None


# ``y [M, N]`` for validated 2-D inputs ``(x, weight, bias, lora_a, lora_b, scales, row_ids,
# ranks, backend)`` with one adapter id per row.
lora_linear_multi_2d = define_family(
    "lora_linear_multi",
    fwd=lora_linear_multi_fwd,
    fwd_fake=_fwd_fake,
    bwd=lora_linear_multi_bwd,
    bwd_fake=_bwd_fake,
    launch_fwd=_launch_fwd,
    launch_bwd=_launch_bwd,
    setup_context=_setup_context,
    backward=_backward,
)
