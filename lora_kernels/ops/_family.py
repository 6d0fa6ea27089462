"""One helper that turns a kernel family's parts into its registered ops and eager entry point.

Every differentiable family (``lora_linear``, ``lora_multi``, ``lora_embedding``, ``dora``,
``qlora``, and any new one) gives:

* ``fwd`` and ``bwd``: the op bodies, annotated so ``torch.library`` infers the schemas. Both end
  in ``backend: str`` and call the backend's launchers; ``fwd`` returns the output first, then
  what the backward keeps (not differentiable); ``bwd`` returns empty tensors for the gradients
  that are not needed (an op cannot return None);
* their fake impls (shapes only, ``torch._check`` for what the compiler may assume);
* ``launch_fwd(*fwd_args)`` and ``launch_bwd(*bwd_args)``: the launchers called directly (what
  the op bodies call), the backward's None where a gradient is not needed;
* ``setup_context(ctx, inputs, output)`` and ``backward(ctx, *grads)``, as ``register_autograd``
  takes them. The backward calls ``ctx.run_bwd(*bwd_args)``: the backward op under
  ``torch.compile`` (opaque to the compiler), the launchers directly in eager mode.

:func:`define_family` registers both ops, attaches the autograd formula, and builds the eager
twin, a ``torch.autograd.Function`` with the same launchers and the same backward that skips the
custom-op dispatcher's per-call cost (tens of microseconds, visible at decode sizes). Its result
is the family's entry point for validated 2-D inputs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["base_grads", "define_family", "empty_if_none", "needs_autograd"]


def empty_if_none(grads, likes) -> tuple[Tensor, ...]:
    """Op outputs cannot be None: an empty tensor (of ``like``'s dtype and device) stands in."""
    pairs = zip(grads, likes, strict=True)
    return tuple(like.new_empty(0) if g is None else g for g, like in pairs)


def base_grads(dy: Tensor, x: Tensor, weight: Tensor, need_w: bool, need_bias: bool):
    """The base layer's ``(dweight, dbias)`` (None where not needed): every family's y holds
    ``x @ weight.T + bias``, whatever its LoRA term."""
    dw = (dy.T @ x).to(weight.dtype) if need_w else None
    dbias = dy.sum(0) if need_bias else None
    return dw, dbias


def needs_autograd(*tensors: Tensor | None) -> bool:
    """Whether a call must record autograd history (inference skips the Function's cost)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def define_family(
    name: str,
    *,
    fwd: Callable,
    fwd_fake: Callable,
    bwd: Callable,
    bwd_fake: Callable,
    launch_fwd: Callable,
    launch_bwd: Callable,
    setup_context: Callable,
    backward: Callable,
    stock_autograd_on_torch: bool = False,
) -> Callable[..., Tensor]:
    """Register ``lora_kernels::{name}_fwd`` and ``lora_kernels::{name}_bwd`` (``name`` is the
    ops' name, e.g. ``"lora_linear_multi"`` for the ``lora_multi`` family) and return the entry
    point.

    The entry point takes the forward op's arguments (tensors first, ``backend`` last) and
    returns the op's first output: the custom op under ``torch.compile``; the launchers with no
    autograd Function when no gradient is needed, or when ``stock_autograd_on_torch`` and the
    torch backend runs (its launchers are built of differentiable ops, so stock autograd runs the
    backward in C++ nodes); the eager twin Function otherwise.
    """
    fwd_op = torch.library.custom_op(f"lora_kernels::{name}_fwd", fwd, mutates_args=())
    fwd_op.register_fake(fwd_fake)
    bwd_op = torch.library.custom_op(f"lora_kernels::{name}_bwd", bwd, mutates_args=())
    bwd_op.register_fake(bwd_fake)

    def op_setup_context(ctx, inputs, output):
        setup_context(ctx, inputs, output)
        ctx.run_bwd = bwd_op

    fwd_op.register_autograd(backward, setup_context=op_setup_context)

    def twin_forward(ctx, *args):
        output = launch_fwd(*args)
        setup_context(ctx, args, output)
        ctx.run_bwd = launch_bwd
        return output

    def twin_backward(ctx, *grads):
        return backward(ctx, *grads)

    # Made by ``type`` so that the class has the family's name when autograd derives its graph
    # node from it: ``{name}_eagerBackward`` in profiles and ``grad_fn``, one name per family.
    eager_twin = type(
        f"{name}_eager",
        (torch.autograd.Function,),
        {
            "forward": staticmethod(twin_forward),
            "backward": staticmethod(twin_backward),
            "__module__": __name__,
            "__qualname__": f"{name}_eager",
        },
    )

    def entry(*args) -> Tensor:
        if torch.compiler.is_compiling():
            return fwd_op(*args)[0]
        tensors = [a for a in args if isinstance(a, Tensor)]
        if not needs_autograd(*tensors) or (stock_autograd_on_torch and args[-1] == "torch"):
            return launch_fwd(*args)[0]
        return eager_twin.apply(*args)[0]

    entry.__name__ = f"{name}_2d"
    entry.fwd_op = fwd_op
    entry.bwd_op = bwd_op
    entry.eager = eager_twin
    return entry
