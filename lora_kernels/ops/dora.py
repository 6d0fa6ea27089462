"""The ``dora`` family's ops (namespace ``lora_kernels``): schemas, fake impls, autograd.

Built as ``ops/lora_linear.py`` is, by ``define_family`` (dispatch through ``backends.launcher``;
the CUDA backend has no DoRA module, so a call resolved to it runs Triton's): each op takes a
resolved backend name and validated inputs (see ``lora_kernels/functional/dora.py``); the backward
is itself a custom op, so ``torch.compile(fullgraph=True)`` traces forward and backward without
graph breaks. The two norms are not differentiated (PEFT detaches the norm): plain custom ops, as
the merge is. Ops (namespace ``lora_kernels``):

* ``dora_weight_sq_norm(weight[N,K], backend) -> [N]``: ``||W_n||^2`` (fp32; fp64 for fp64).
* ``dora_weight_norm(weight, lora_a[r,K], lora_b[N,r], scale, w_sq[N], backend) -> [N]``:
  ``||W + scale * B A||_row`` from the factored form; not differentiable (PEFT detaches it).
* ``dora_linear_fwd(x[M,K], weight, bias?, lora_a, lora_b, magnitude[N], weight_norm[N], scale,
  x_lora?, backend) -> (y[M,N], lin[M,N], s[M,r])``: ``y = g * lin + bias + (x - x_lora) W^T``,
  ``g = magnitude / weight_norm``; ``lin`` and ``s`` are kept for the backward.
* ``dora_linear_bwd(dy, x, weight, lora_a, lora_b, magnitude, weight_norm, s, lin, scale, x_lora?,
  needs_dx, needs_da, needs_db, needs_dm, backend) -> (dx, dx_lora, da, db, dm)``; a gradient
  that is not needed comes back as an empty tensor.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..backends import launcher
from ._family import define_family, empty_if_none

FAMILY = "dora"


def _acc(*tensors: Tensor | None) -> torch.dtype:
    return (
        torch.float64
        if any(t is not None and t.dtype == torch.float64 for t in tensors)
        else (torch.float32)
    )


def _gain(magnitude: Tensor, weight_norm: Tensor) -> Tensor:
    """``g = magnitude / weight_norm`` in fp32 (fp64 for fp64)."""
    acc = _acc(magnitude, weight_norm)
    return magnitude.to(acc) / weight_norm.to(acc)


# --------------------------------------------------------------------------------------------
# the norm
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("lora_kernels::dora_weight_sq_norm", mutates_args=())
def dora_weight_sq_norm(weight: Tensor, backend: str) -> Tensor:
    return launcher(backend, FAMILY, "weight_sq_norm")(weight)


@dora_weight_sq_norm.register_fake
def _(weight, backend):
    torch._check(weight.dim() == 2, lambda: f"weight must be 2-D, got {weight.dim()}-D")
    return weight.new_empty((weight.shape[0],), dtype=_acc(weight))


@torch.library.custom_op("lora_kernels::dora_weight_norm", mutates_args=())
def dora_weight_norm(
    weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float, w_sq: Tensor, backend: str
) -> Tensor:
    return launcher(backend, FAMILY, "dora_weight_norm")(weight, lora_a, lora_b, scale, w_sq)


@dora_weight_norm.register_fake
def _(weight, lora_a, lora_b, scale, w_sq, backend):
    torch._check(weight.dim() == 2, lambda: f"weight must be 2-D, got {weight.dim()}-D")
    torch._check(lora_a.shape[1] == weight.shape[1], lambda: "lora_a and weight disagree in K")
    torch._check(lora_b.shape[0] == weight.shape[0], lambda: "lora_b and weight disagree in N")
    torch._check(lora_b.shape[1] == lora_a.shape[0], lambda: "lora_a and lora_b disagree in r")
    torch._check(w_sq.shape[0] == weight.shape[0], lambda: "w_sq and weight disagree in N")
    return weight.new_empty((weight.shape[0],), dtype=_acc(weight, lora_a, lora_b))


# --------------------------------------------------------------------------------------------
# forward / backward
# --------------------------------------------------------------------------------------------


def _launch_fwd(x, weight, bias, lora_a, lora_b, magnitude, weight_norm, scale, x_lora, backend):
    g = _gain(magnitude, weight_norm)
    return launcher(backend, FAMILY, "dora_linear_fwd")(
        x, weight, bias, lora_a, lora_b, scale, x_lora, g
    )


def _launch_bwd(dy, x, weight, lora_a, lora_b, magnitude, weight_norm, s, lin, scale, x_lora,
                needs_dx, needs_da, needs_db, needs_dm, backend):  # fmt: skip
    """The backward launchers, called directly; a gradient that is not needed is None."""
    g = _gain(magnitude, weight_norm)
    dx, dx_lora, da, db, dm = launcher(backend, FAMILY, "dora_linear_bwd")(
        dy, x, weight, lora_a, lora_b, s, lin, g, weight_norm.to(g.dtype), scale, x_lora,
        needs_dx=needs_dx, needs_da=needs_da, needs_db=needs_db, needs_dm=needs_dm,
    )  # fmt: skip
    if dm is not None:
        dm = dm.to(magnitude.dtype)
    return dx, dx_lora, da, db, dm


def dora_linear_fwd(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    magnitude: Tensor,
    weight_norm: Tensor,
    scale: float,
    x_lora: Tensor | None,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    return _launch_fwd(
        x, weight, bias, lora_a, lora_b, magnitude, weight_norm, scale, x_lora, backend
    )


def _fwd_fake(x, weight, bias, lora_a, lora_b, magnitude, weight_norm, scale, x_lora, backend):
    torch._check(x.dim() == 2, lambda: f"x must be 2-D here, got {x.dim()}-D")
    torch._check(weight.shape[1] == x.shape[1], lambda: "weight and x disagree in K")
    torch._check(magnitude.shape[0] == weight.shape[0], lambda: "magnitude and weight disagree")
    torch._check(weight_norm.shape[0] == weight.shape[0], lambda: "weight_norm and weight disagree")
    y = x.new_empty((x.shape[0], weight.shape[0]))
    lin = x.new_empty((x.shape[0], weight.shape[0]))
    s = x.new_empty((x.shape[0], lora_a.shape[0]), dtype=_acc(x, lora_a))
    return y, lin, s


def dora_linear_bwd(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    magnitude: Tensor,
    weight_norm: Tensor,
    s: Tensor,
    lin: Tensor,
    scale: float,
    x_lora: Tensor | None,
    needs_dx: bool,
    needs_da: bool,
    needs_db: bool,
    needs_dm: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = _launch_bwd(
        dy, x, weight, lora_a, lora_b, magnitude, weight_norm, s, lin, scale, x_lora,
        needs_dx, needs_da, needs_db, needs_dm, backend,
    )  # fmt: skip
    return empty_if_none(grads, (x, x, lora_a, lora_b, magnitude))


def _bwd_fake(dy, x, weight, lora_a, lora_b, magnitude, weight_norm, s, lin, scale, x_lora,
              needs_dx, needs_da, needs_db, needs_dm, backend):  # fmt: skip
    dx = torch.empty_like(x) if needs_dx else x.new_empty(0)
    dx_lora = torch.empty_like(x) if (needs_dx and x_lora is not None) else x.new_empty(0)
    da = torch.empty_like(lora_a) if needs_da else lora_a.new_empty(0)
    db = torch.empty_like(lora_b) if needs_db else lora_b.new_empty(0)
    dm = torch.empty_like(magnitude) if needs_dm else magnitude.new_empty(0)
    return dx, dx_lora, da, db, dm


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, magnitude, weight_norm, scale, x_lora, backend = inputs
    _, lin, s = output
    ctx.mark_non_differentiable(lin, s)
    # With dropout the backward reads x_lora, never x (unless the base weight trains).
    keep_x = x_lora is None or weight.requires_grad
    ctx.save_for_backward(
        x if keep_x else None, weight, lora_a, lora_b, magnitude, weight_norm, s, lin, x_lora
    )
    ctx.scale = scale
    ctx.backend = backend


def _backward(ctx, dy, _dlin, _ds):
    x, weight, lora_a, lora_b, magnitude, weight_norm, s, lin, x_lora = ctx.saved_tensors
    if x is None:
        x = x_lora
    need_x, need_w, need_bias, need_a, need_b, need_m, _, _, need_xl, _ = ctx.needs_input_grad
    dy = dy.contiguous()
    needs_dx = need_x or need_xl
    dx = dx_lora = da = db = dm = dw = dbias = None
    if needs_dx or need_a or need_b or need_m:
        dx, dx_lora, da, db, dm = ctx.run_bwd(
            dy, x, weight, lora_a, lora_b, magnitude, weight_norm, s, lin, ctx.scale, x_lora,
            needs_dx, need_a, need_b, need_m, ctx.backend,
        )  # fmt: skip
        dx = dx if need_x else None
        dx_lora = dx_lora if (x_lora is not None and need_xl) else None
        da = da if need_a else None
        db = db if need_b else None
        dm = dm if need_m else None
    if need_w:  # the norm is a constant: W's gradient comes through lin and the dropout term
        g = _gain(magnitude, weight_norm)
        dyg = (dy * g).to(dy.dtype)
        if x_lora is None:
            dw = (dyg.T @ x).to(weight.dtype)
        else:
            dw = (dyg.T @ x_lora + dy.T @ (x - x_lora)).to(weight.dtype)
    if need_bias:
        dbias = dy.sum(0)
    return dx, dw, dbias, da, db, dm, None, None, dx_lora, None


# ``y [M, N]`` for validated 2-D inputs ``(x, weight, bias, lora_a, lora_b, magnitude,
# weight_norm, scale, x_lora, backend)`` and a detached ``weight_norm``. As for LoRA, the torch
# backend's forward is built of differentiable ops: in eager mode stock autograd runs its backward
# in C++ nodes; the Triton kernels need the Function.
dora_linear_2d = define_family(
    "dora_linear",
    fwd=dora_linear_fwd,
    fwd_fake=_fwd_fake,
    bwd=dora_linear_bwd,
    bwd_fake=_bwd_fake,
    launch_fwd=_launch_fwd,
    launch_bwd=_launch_bwd,
    setup_context=_setup_context,
    backward=_backward,
    stock_autograd_on_torch=True,
)
