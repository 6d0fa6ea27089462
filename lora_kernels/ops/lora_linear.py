"""The ``lora_linear`` family's ops (namespace ``lora_kernels``).

* ``lora_linear_fwd(x[M,K], weight[N,K], bias?, lora_a[r,K], lora_b[N,r], scale, x_lora?, backend)
  -> (y[M,N], s[M,r] fp32)``; ``s = x_lora @ lora_a.T`` is kept for the backward and is not
  differentiable.
* ``lora_linear_bwd(dy, x, weight, lora_a, lora_b, s, scale, x_lora?, needs_dx, needs_da,
  needs_db, backend) -> (dx, dx_lora, da, db)``; a gradient that is not needed comes back as an
  empty tensor.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..backends import launcher
from ._family import base_grads, define_family, empty_if_none

FAMILY = "lora_linear"


def _launch_fwd(x, weight, bias, lora_a, lora_b, scale, x_lora, backend):
    args = (x, weight, bias, lora_a, lora_b, scale, x_lora)
    return launcher(backend, FAMILY, "lora_linear_fwd", *args)(*args)


def _launch_bwd(
    dy, x, weight, lora_a, lora_b, s, scale, x_lora, needs_dx, needs_da, needs_db, backend
):
    """The backward launchers, called directly; a gradient that is not needed is None."""
    fn = launcher(backend, FAMILY, "lora_linear_bwd")
    return fn(
        dy, x, weight, lora_a, lora_b, s, scale, x_lora,
        needs_dx=needs_dx, needs_da=needs_da, needs_db=needs_db,
    )  # fmt: skip


def lora_linear_fwd(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float,
    x_lora: Tensor | None,
    backend: str,
) -> tuple[Tensor, Tensor]:
    return _launch_fwd(x, weight, bias, lora_a, lora_b, scale, x_lora, backend)


def _fwd_fake(x, weight, bias, lora_a, lora_b, scale, x_lora, backend):
    torch._check(x.dim() == 2, lambda: f"x must be 2-D here, got {x.dim()}-D")
    torch._check(weight.shape[1] == x.shape[1], lambda: "weight and x disagree in K")
    y = x.new_empty((x.shape[0], weight.shape[0]))
    s = x.new_empty((x.shape[0], lora_a.shape[0]), dtype=torch.float32)
    return y, s


def lora_linear_bwd(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    s: Tensor,
    scale: float,
    x_lora: Tensor | None,
    needs_dx: bool,
    needs_da: bool,
    needs_db: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    grads = _launch_bwd(
        dy, x, weight, lora_a, lora_b, s, scale, x_lora, needs_dx, needs_da, needs_db, backend
    )
    return empty_if_none(grads, (x, x, lora_a, lora_b))


def _bwd_fake(dy, x, weight, lora_a, lora_b, s, scale, x_lora, needs_dx, needs_da, needs_db,
              backend):  # fmt: skip
    dx = torch.empty_like(x) if needs_dx else x.new_empty(0)
    dx_lora = torch.empty_like(x) if (needs_dx and x_lora is not None) else x.new_empty(0)
    da = torch.empty_like(lora_a) if needs_da else lora_a.new_empty(0)
    db = torch.empty_like(lora_b) if needs_db else lora_b.new_empty(0)
    return dx, dx_lora, da, db


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scale, x_lora, backend = inputs
    _, s = output
    ctx.mark_non_differentiable(s)
    # With dropout the backward reads x_lora, never x (unless the base weight trains): keeping x
    # as well would hold one more activation per layer than PEFT does.
    keep_x = x_lora is None or weight.requires_grad
    ctx.save_for_backward(x if keep_x else None, weight, lora_a, lora_b, s, x_lora)
    ctx.scale = scale
    ctx.backend = backend


def _backward(ctx, dy, _ds):
    x, weight, lora_a, lora_b, s, x_lora = ctx.saved_tensors
    if x is None:  # not kept (see setup): the launchers read only x_lora, of x's shape
        x = x_lora
    need_x, need_w, need_bias, need_a, need_b, _, need_x_lora, _ = ctx.needs_input_grad
    dy = dy.contiguous()
    needs_dx = need_x or need_x_lora
    dx = dx_lora = da = db = None
    if needs_dx or need_a or need_b:
        dx, dx_lora, da, db = ctx.run_bwd(
            dy, x, weight, lora_a, lora_b, s, ctx.scale, x_lora,
            needs_dx, need_a, need_b, ctx.backend,
        )  # fmt: skip
        dx = dx if need_x else None
        dx_lora = dx_lora if (x_lora is not None and need_x_lora) else None
        da = da if need_a else None
        db = db if need_b else None
    dw, dbias = base_grads(dy, x, weight, need_w, need_bias)
    return dx, dw, dbias, da, db, None, dx_lora, None


# ``y [M, N]`` for validated 2-D inputs ``(x, weight, bias, lora_a, lora_b, scale, x_lora,
# backend)``. The torch backend's launchers are differentiable ops: in eager mode stock autograd
# runs their backward in C++ nodes, cheaper per layer than the Python Function (measurements in
# benchmarks/results/torch_backend_cpu.md); the kernels of the other backends need the Function.
lora_linear_2d = define_family(
    "lora_linear",
    fwd=lora_linear_fwd,
    fwd_fake=_fwd_fake,
    bwd=lora_linear_bwd,
    bwd_fake=_bwd_fake,
    launch_fwd=_launch_fwd,
    launch_bwd=_launch_bwd,
    setup_context=_setup_context,
    backward=_backward,
    stock_autograd_on_torch=True,
)
