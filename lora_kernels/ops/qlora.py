"""``torch.library`` custom ops of the 4-bit-base (QLoRA) LoRA linear.

Same conventions as ``ops.py``: each op takes an already resolved backend (``"torch"`` or
``"triton"``) and inputs already validated (``qlora.py``); fake impls give the output shapes,
``register_autograd`` attaches the backward (itself a custom op), so ``torch.compile(
fullgraph=True)`` traces forward and backward without graph breaks. In eager mode an autograd
Function runs the same launchers without the dispatcher's per-call cost.

The 4-bit weight travels as bitsandbytes stores it: ``qweight`` (packed bytes, uint8),
``absmax`` (fp32, or uint8 when nested), ``code`` (fp32 [16]), and for double quantization
``absmax2`` (fp32), ``code2`` (fp32 [256]) and ``offset`` (fp32, one element); ``blocksize``,
``blocksize2`` and ``n`` (out_features) are ints. None of them gets a gradient: the base is frozen.

Ops (namespace ``lora_kernels``):

* ``qlora_linear_fwd(x[M,K], qweight, absmax, code, absmax2?, code2?, offset?, blocksize,
  blocksize2, n, bias?, lora_a[r,K], lora_b[n,r], scale, x_lora?, backend)
  -> (y[M,n], s[M,r] fp32)``
* ``qlora_linear_bwd(dy, x, qweight, absmax, code, absmax2?, code2?, offset?, blocksize,
  blocksize2, lora_a, lora_b, s, scale, x_lora?, needs_dx, needs_da, needs_db, backend)
  -> (dx, dx_lora, da, db)``; a gradient that is not needed comes back as an empty tensor.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import backends

FAMILY = "qlora"


def launcher(backend: str, name: str):
    """The launcher ``name`` of this family on ``backend`` (``backends.launcher``; the CUDA
    extension has no 4-bit module, so a call resolved to ``"cuda"`` runs Triton's)."""
    return backends.launcher(backend, FAMILY, name)


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


@torch.library.custom_op("lora_kernels::qlora_linear_fwd", mutates_args=())
def qlora_linear_fwd(
    x: Tensor,
    qweight: Tensor,
    absmax: Tensor,
    code: Tensor,
    absmax2: Tensor | None,
    code2: Tensor | None,
    offset: Tensor | None,
    blocksize: int,
    blocksize2: int,
    n: int,
    bias: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float,
    x_lora: Tensor | None,
    backend: str,
) -> tuple[Tensor, Tensor]:
    args = (x, qweight, absmax, code, absmax2, code2, offset, blocksize, blocksize2, n)
    return launcher(backend, "qlora_linear_fwd")(*args, bias, lora_a, lora_b, scale, x_lora)


@qlora_linear_fwd.register_fake
def _(x, qweight, absmax, code, absmax2, code2, offset, blocksize, blocksize2, n, bias, lora_a,
      lora_b, scale, x_lora, backend):  # fmt: skip
    torch._check(x.dim() == 2, lambda: f"x must be 2-D here, got {x.dim()}-D")
    torch._check(lora_a.shape[1] == x.shape[1], lambda: "lora_a and x disagree in K")
    torch._check(lora_b.shape[0] == n, lambda: "lora_b and the 4-bit weight disagree in N")
    torch._check(qweight.dtype == torch.uint8, lambda: "qweight must be uint8 here")
    y = x.new_empty((x.shape[0], n))
    s = x.new_empty((x.shape[0], lora_a.shape[0]), dtype=torch.float32)
    return y, s


def _run_bwd(dy, x, quant, lora_a, lora_b, s, scale, x_lora, needs, backend):
    """The backward launchers, called directly; a gradient that is not needed is None."""
    needs_dx, needs_da, needs_db = needs
    return launcher(backend, "qlora_linear_bwd")(
        dy, x, *quant, lora_a, lora_b, s, scale, x_lora,
        needs_dx=needs_dx, needs_da=needs_da, needs_db=needs_db,
    )  # fmt: skip


@torch.library.custom_op("lora_kernels::qlora_linear_bwd", mutates_args=())
def qlora_linear_bwd(
    dy: Tensor,
    x: Tensor,
    qweight: Tensor,
    absmax: Tensor,
    code: Tensor,
    absmax2: Tensor | None,
    code2: Tensor | None,
    offset: Tensor | None,
    blocksize: int,
    blocksize2: int,
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
    quant = (qweight, absmax, code, absmax2, code2, offset, blocksize, blocksize2)
    needs = (needs_dx, needs_da, needs_db)
    dx, dx_lora, da, db = _run_bwd(dy, x, quant, lora_a, lora_b, s, scale, x_lora, needs, backend)
    return (
        _empty(x) if dx is None else dx,
        _empty(x) if dx_lora is None else dx_lora,
        _empty(lora_a) if da is None else da,
        _empty(lora_b) if db is None else db,
    )


@qlora_linear_bwd.register_fake
def _(dy, x, qweight, absmax, code, absmax2, code2, offset, blocksize, blocksize2, lora_a, lora_b,
      s, scale, x_lora, needs_dx, needs_da, needs_db, backend):  # fmt: skip
    torch._check(dy.shape[0] == x.shape[0], lambda: "dy and x disagree in M")
    dx = torch.empty_like(x) if needs_dx else _empty(x)
    dx_lora = torch.empty_like(x) if (needs_dx and x_lora is not None) else _empty(x)
    da = torch.empty_like(lora_a) if needs_da else _empty(lora_a)
    db = torch.empty_like(lora_b) if needs_db else _empty(lora_b)
    return dx, dx_lora, da, db


def _setup(ctx, inputs, output):
    (x, qweight, absmax, code, absmax2, code2, offset, blocksize, blocksize2, _n, _bias,
     lora_a, lora_b, scale, x_lora, backend) = inputs  # fmt: skip
    _, s = output
    ctx.mark_non_differentiable(s)
    # With dropout the backward reads x_lora only: keeping x too would hold one more activation
    # per layer than PEFT does.
    ctx.save_for_backward(
        x if x_lora is None else None, qweight, absmax, code, absmax2, code2, offset,
        lora_a, lora_b, s, x_lora,
    )  # fmt: skip
    ctx.blocksize = blocksize
    ctx.blocksize2 = blocksize2
    ctx.scale = scale
    ctx.backend = backend
    ctx.direct = False


def _backward(ctx, dy, _ds):
    (x, qweight, absmax, code, absmax2, code2, offset,
     lora_a, lora_b, s, x_lora) = ctx.saved_tensors  # fmt: skip
    if x is None:
        x = x_lora
    g = ctx.needs_input_grad
    need_x, need_bias, need_a, need_b, need_xl = g[0], g[10], g[11], g[12], g[14]
    dy = dy.contiguous()
    needs_dx = need_x or need_xl
    dx = dx_lora = da = db = dbias = None
    if needs_dx or need_a or need_b:
        if ctx.direct:
            quant = (qweight, absmax, code, absmax2, code2, offset, ctx.blocksize, ctx.blocksize2)
            dx, dx_lora, da, db = _run_bwd(
                dy, x, quant, lora_a, lora_b, s, ctx.scale, x_lora,
                (needs_dx, need_a, need_b), ctx.backend,
            )  # fmt: skip
        else:
            dx, dx_lora, da, db = torch.ops.lora_kernels.qlora_linear_bwd(
                dy, x, qweight, absmax, code, absmax2, code2, offset, ctx.blocksize,
                ctx.blocksize2, lora_a, lora_b, s, ctx.scale, x_lora, needs_dx, need_a, need_b,
                ctx.backend,
            )  # fmt: skip
        dx = dx if need_x else None
        dx_lora = dx_lora if (x_lora is not None and need_xl) else None
        da = da if need_a else None
        db = db if need_b else None
    if need_bias:
        dbias = dy.sum(0)
    return (dx, None, None, None, None, None, None, None, None, None, dbias, da, db, None,
            dx_lora, None)  # fmt: skip


qlora_linear_fwd.register_autograd(_backward, setup_context=_setup)


class _QLoraLinearFunction(torch.autograd.Function):
    """The eager twin of the ``qlora_linear_fwd`` op: same launchers, same backward."""

    @staticmethod
    def forward(ctx, *inputs):
        backend = inputs[-1]
        y, s = launcher(backend, "qlora_linear_fwd")(*inputs[:-1])
        _setup(ctx, inputs, (y, s))
        ctx.direct = True
        return y, s

    @staticmethod
    def backward(ctx, dy, ds):
        return _backward(ctx, dy, ds)


def qlora_linear_2d(*inputs) -> Tensor:
    """``y [M, N]`` for validated 2-D inputs (the ``qlora_linear_fwd`` arguments): the custom op
    under ``torch.compile``, the autograd Function in eager mode when something needs a gradient,
    the launcher alone for inference."""
    if torch.compiler.is_compiling():
        y, _ = torch.ops.lora_kernels.qlora_linear_fwd(*inputs)
        return y
    x, bias, lora_a, lora_b, x_lora = inputs[0], inputs[10], inputs[11], inputs[12], inputs[14]
    if not (
        torch.is_grad_enabled()
        and any(t is not None and t.requires_grad for t in (x, bias, lora_a, lora_b, x_lora))
    ):
        return launcher(inputs[-1], "qlora_linear_fwd")(*inputs[:-1])[0]
    y, _ = _QLoraLinearFunction.apply(*inputs)
    return y
