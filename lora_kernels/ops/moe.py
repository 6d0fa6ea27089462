"""The ``moe`` family's ops (namespace ``lora_kernels``): LoRA on both projections of a
mixture-of-experts layer (see ``lora_kernels.backends.torch.moe`` for the shapes).

* ``moe_lora_fwd(x[T,H], top_k_ids[T,k], top_k_weights[T,k], w_gu[E,2I,H], bias_gu?, a_gu?,
  b_gu?, w_d[E,H,I], bias_d?, a_d?, b_d?, scales[L], token_ids[T]?, activation, swiglu_alpha,
  swiglu_limit, keep_out, backend) -> (y[T,H], g[Tk,2I], s_gu, s_d, o)``: ``g``, ``s_*`` and ``o``
  are kept for the backward (``o`` only with ``keep_out``: the router weights need a gradient).
* ``moe_lora_bwd(dy, x, top_k_ids, top_k_weights, w_gu, a_gu?, b_gu?, w_d, a_d?, b_d?, scales,
  token_ids?, g, s_gu, s_d, o, activation, swiglu_alpha, swiglu_limit, needs_dx, needs_dw,
  needs_lora_gu, needs_lora_d, backend) -> (dx, dw[T,k], da_gu, db_gu, da_d, db_d)``; not
  needed: an empty tensor.

Differentiable: ``x``, ``top_k_weights`` and the four LoRA factors. The base experts (weights and
biases) are frozen: ``lora_kernels.functional.moe_lora`` refuses them with ``requires_grad``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..backends import launcher
from ._family import define_family, empty_if_none

FAMILY = "moe"


def _launch_fwd(
    x, top_k_ids, top_k_weights, w_gu, bias_gu, a_gu, b_gu, w_d, bias_d, a_d, b_d, scales,
    token_ids, activation, swiglu_alpha, swiglu_limit, keep_out, backend,
):  # fmt: skip
    args = (
        x, top_k_ids, top_k_weights, w_gu, bias_gu, a_gu, b_gu, w_d, bias_d, a_d, b_d, scales,
        token_ids, activation, swiglu_alpha, swiglu_limit, keep_out,
    )  # fmt: skip
    return launcher(backend, FAMILY, "moe_lora_fwd", *args)(*args)


def _launch_bwd(
    dy, x, top_k_ids, top_k_weights, w_gu, a_gu, b_gu, w_d, a_d, b_d, scales, token_ids, g,
    s_gu, s_d, o, activation, swiglu_alpha, swiglu_limit, needs_dx, needs_dw, needs_lora_gu,
    needs_lora_d, backend,
):  # fmt: skip
    """The backward launchers, called directly; a gradient not needed is None."""
    fn = launcher(backend, FAMILY, "moe_lora_bwd")
    return fn(
        dy, x, top_k_ids, top_k_weights, w_gu, a_gu, b_gu, w_d, a_d, b_d, scales, token_ids, g,
        s_gu, s_d, o, activation, swiglu_alpha, swiglu_limit,
        needs_dx=needs_dx, needs_dw=needs_dw, needs_lora_gu=needs_lora_gu,
        needs_lora_d=needs_lora_d,
    )  # fmt: skip


def moe_lora_fwd(
    x: Tensor,
    top_k_ids: Tensor,
    top_k_weights: Tensor,
    w_gu: Tensor,
    bias_gu: Tensor | None,
    a_gu: Tensor | None,
    b_gu: Tensor | None,
    w_d: Tensor,
    bias_d: Tensor | None,
    a_d: Tensor | None,
    b_d: Tensor | None,
    scales: Tensor,
    token_ids: Tensor | None,
    activation: str,
    swiglu_alpha: float,
    swiglu_limit: float,
    keep_out: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _launch_fwd(
        x, top_k_ids, top_k_weights, w_gu, bias_gu, a_gu, b_gu, w_d, bias_d, a_d, b_d, scales,
        token_ids, activation, swiglu_alpha, swiglu_limit, keep_out, backend,
    )  # fmt: skip


def _fwd_fake(
    x, top_k_ids, top_k_weights, w_gu, bias_gu, a_gu, b_gu, w_d, bias_d, a_d, b_d, scales,
    token_ids, activation, swiglu_alpha, swiglu_limit, keep_out, backend,
):  # fmt: skip
    torch._check(x.dim() == 2, lambda: f"x must be 2-D here, got {x.dim()}-D")
    torch._check(w_gu.shape[2] == x.shape[1], lambda: "w_gate_up and x disagree in H")
    torch._check(top_k_ids.shape[0] == x.shape[0], lambda: "top_k_ids and x disagree in T")
    p = x.shape[0] * top_k_ids.shape[1]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.new_empty(x.shape)
    g = x.new_empty((p, w_gu.shape[1]))
    s_gu = x.new_empty((p, a_gu.shape[2]), dtype=acc) if a_gu is not None else x.new_empty(0)
    s_d = x.new_empty((p, a_d.shape[2]), dtype=acc) if a_d is not None else x.new_empty(0)
    o = x.new_empty((p, x.shape[1])) if keep_out else x.new_empty(0)
    return y, g, s_gu, s_d, o


def moe_lora_bwd(
    dy: Tensor,
    x: Tensor,
    top_k_ids: Tensor,
    top_k_weights: Tensor,
    w_gu: Tensor,
    a_gu: Tensor | None,
    b_gu: Tensor | None,
    w_d: Tensor,
    a_d: Tensor | None,
    b_d: Tensor | None,
    scales: Tensor,
    token_ids: Tensor | None,
    g: Tensor,
    s_gu: Tensor,
    s_d: Tensor,
    o: Tensor,
    activation: str,
    swiglu_alpha: float,
    swiglu_limit: float,
    needs_dx: bool,
    needs_dw: bool,
    needs_lora_gu: bool,
    needs_lora_d: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = _launch_bwd(
        dy, x, top_k_ids, top_k_weights, w_gu, a_gu, b_gu, w_d, a_d, b_d, scales, token_ids, g,
        s_gu, s_d, o, activation, swiglu_alpha, swiglu_limit, needs_dx, needs_dw, needs_lora_gu,
        needs_lora_d, backend,
    )  # fmt: skip
    likes = (x, top_k_weights, x, x, x, x)
    return empty_if_none(grads, likes)


def _bwd_fake(
    dy, x, top_k_ids, top_k_weights, w_gu, a_gu, b_gu, w_d, a_d, b_d, scales, token_ids, g,
    s_gu, s_d, o, activation, swiglu_alpha, swiglu_limit, needs_dx, needs_dw, needs_lora_gu,
    needs_lora_d, backend,
):  # fmt: skip
    def like(t, need):
        return t.new_empty(t.shape) if need and t is not None else x.new_empty(0)

    return (
        like(x, needs_dx),
        like(top_k_weights, needs_dw),
        like(a_gu, needs_lora_gu),
        like(b_gu, needs_lora_gu),
        like(a_d, needs_lora_d),
        like(b_d, needs_lora_d),
    )


def _setup_context(ctx, inputs, output):
    (x, top_k_ids, top_k_weights, w_gu, _bias_gu, a_gu, b_gu, w_d, _bias_d, a_d, b_d, scales,
     token_ids, activation, swiglu_alpha, swiglu_limit, _keep_out, backend) = inputs  # fmt: skip
    _, g, s_gu, s_d, o = output
    ctx.mark_non_differentiable(g, s_gu, s_d, o)
    # Only ``y`` carries a gradient: without this autograd would fill a zero gradient as large
    # as each saved output (``g`` is [T k, 2I]) for every backward.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(
        x, top_k_ids, top_k_weights, w_gu, a_gu, b_gu, w_d, a_d, b_d, scales, token_ids, g,
        s_gu, s_d, o,
    )  # fmt: skip
    ctx.act = (activation, swiglu_alpha, swiglu_limit)
    ctx.backend = backend


def _backward(ctx, dy, *_saved_grads):
    (x, top_k_ids, top_k_weights, w_gu, a_gu, b_gu, w_d, a_d, b_d, scales, token_ids, g, s_gu,
     s_d, o) = ctx.saved_tensors  # fmt: skip
    need = ctx.needs_input_grad
    need_x, need_w = need[0], need[2]
    need_gu = need[5] or need[6]
    need_d = need[9] or need[10]
    grads = [None] * 18
    if dy is None or not (need_x or need_w or need_gu or need_d):
        return tuple(grads)
    dx, dw, da_gu, db_gu, da_d, db_d = ctx.run_bwd(
        dy.contiguous(), x, top_k_ids, top_k_weights, w_gu, a_gu, b_gu, w_d, a_d, b_d, scales,
        token_ids, g, s_gu, s_d, o, *ctx.act, need_x, need_w, need_gu, need_d, ctx.backend,
    )  # fmt: skip
    grads[0] = dx if need_x else None
    grads[2] = dw if need_w else None
    grads[5] = da_gu if need[5] else None
    grads[6] = db_gu if need[6] else None
    grads[9] = da_d if need[9] else None
    grads[10] = db_d if need[10] else None
    return tuple(grads)


# ``y [T, H]`` for validated inputs ``(x, top_k_ids, top_k_weights, w_gu, bias_gu, a_gu, b_gu,
# w_d, bias_d, a_d, b_d, scales, token_ids, activation, swiglu_alpha, swiglu_limit, keep_out,
# backend)``.
moe_lora_2d = define_family(
    "moe_lora",
    fwd=moe_lora_fwd,
    fwd_fake=_fwd_fake,
    bwd=moe_lora_bwd,
    bwd_fake=_bwd_fake,
    launch_fwd=_launch_fwd,
    launch_bwd=_launch_bwd,
    setup_context=_setup_context,
    backward=_backward,
)
