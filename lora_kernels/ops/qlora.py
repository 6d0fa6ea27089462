"""The ``qlora`` family's ops (namespace ``lora_kernels``): the LoRA linear on a 4-bit base.

Built as ``ops/lora_linear.py`` is, by ``define_family``: each op takes an already resolved
backend (``"torch"`` or ``"triton"``; the CUDA backend has no 4-bit module, so a call resolved to
it runs Triton's) and inputs already validated (``lora_kernels/functional/qlora.py``); fake impls
give the output shapes, ``register_autograd`` attaches the backward (itself a custom op), so
``torch.compile(fullgraph=True)`` traces forward and backward without graph breaks.

The 4-bit weight travels as bitsandbytes stores it: ``qweight`` (packed bytes, uint8),
``absmax`` (fp32, or uint8 when nested), ``code`` (fp32 [16]), and for double quantization
``absmax2`` (fp32), ``code2`` (fp32 [256]) and ``offset`` (fp32, one element); ``blocksize``,
``blocksize2`` and ``n`` (out_features) are ints. None of them gets a gradient: the base is frozen.

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

from ..backends import launcher
from ._family import define_family, empty_if_none

FAMILY = "qlora"


def _launch_fwd(x, qweight, absmax, code, absmax2, code2, offset, blocksize, blocksize2, n, bias,
                lora_a, lora_b, scale, x_lora, backend):  # fmt: skip
    return launcher(backend, FAMILY, "qlora_linear_fwd")(
        x, qweight, absmax, code, absmax2, code2, offset, blocksize, blocksize2, n, bias,
        lora_a, lora_b, scale, x_lora,
    )  # fmt: skip


def _launch_bwd(dy, x, qweight, absmax, code, absmax2, code2, offset, blocksize, blocksize2,
                lora_a, lora_b, s, scale, x_lora, needs_dx, needs_da, needs_db,
                backend):  # fmt: skip
    """The backward launchers, called directly; a gradient that is not needed is None."""
    return launcher(backend, FAMILY, "qlora_linear_bwd")(
        dy, x, qweight, absmax, code, absmax2, code2, offset, blocksize, blocksize2,
        lora_a, lora_b, s, scale, x_lora,
        needs_dx=needs_dx, needs_da=needs_da, needs_db=needs_db,
    )  # fmt: skip


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
    return _launch_fwd(
        x, qweight, absmax, code, absmax2, code2, offset, blocksize, blocksize2, n, bias,
        lora_a, lora_b, scale, x_lora, backend,
    )  # fmt: skip


def _fwd_fake(x, qweight, absmax, code, absmax2, code2, offset, blocksize, blocksize2, n, bias,
              lora_a, lora_b, scale, x_lora, backend):  # fmt: skip
    torch._check(x.dim() == 2, lambda: f"x must be 2-D here, got {x.dim()}-D")
    torch._check(lora_a.shape[1] == x.shape[1], lambda: "lora_a and x disagree in K")
    torch._check(lora_b.shape[0] == n, lambda: "lora_b and the 4-bit weight disagree in N")
    torch._check(qweight.dtype == torch.uint8, lambda: "qweight must be uint8 here")
    y = x.new_empty((x.shape[0], n))
    s = x.new_empty((x.shape[0], lora_a.shape[0]), dtype=torch.float32)
    return y, s


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
    grads = _launch_bwd(
        dy, x, qweight, absmax, code, absmax2, code2, offset, blocksize, blocksize2,
        lora_a, lora_b, s, scale, x_lora, needs_dx, needs_da, needs_db, backend,
    )  # fmt: skip
    return empty_if_none(grads, (x, x, lora_a, lora_b))


def _bwd_fake(dy, x, qweight, absmax, code, absmax2, code2, offset, blocksize, blocksize2, lora_a,
              lora_b, s, scale, x_lora, needs_dx, needs_da, needs_db, backend):  # fmt: skip
    torch._check(dy.shape[0] == x.shape[0], lambda: "dy and x disagree in M")
    dx = torch.empty_like(x) if needs_dx else x.new_empty(0)
    dx_lora = torch.empty_like(x) if (needs_dx and x_lora is not None) else x.new_empty(0)
    da = torch.empty_like(lora_a) if needs_da else lora_a.new_empty(0)
    db = torch.empty_like(lora_b) if needs_db else lora_b.new_empty(0)
    return dx, dx_lora, da, db


def _setup_context(ctx, inputs, output):
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
        dx, dx_lora, da, db = ctx.run_bwd(
            dy, x, qweight, absmax, code, absmax2, code2, offset, ctx.blocksize, ctx.blocksize2,
            lora_a, lora_b, s, ctx.scale, x_lora, needs_dx, need_a, need_b, ctx.backend,
        )  # fmt: skip
        dx = dx if need_x else None
        dx_lora = dx_lora if (x_lora is not None and need_xl) else None
        da = da if need_a else None
        db = db if need_b else None
    if need_bias:
        dbias = dy.sum(0)
    return (dx, None, None, None, None, None, None, None, None, None, dbias, da, db, None,
            dx_lora, None)  # fmt: skip


# ``y [M, n]`` for validated 2-D inputs (the ``qlora_linear_fwd`` arguments). Every backend runs
# through the Function, the torch one included: stock autograd of its dequantize-then-multiply
# forward would keep the dequantized 16-bit weight alive until the backward, the memory QLoRA is
# there to save (its backward launcher dequantizes again instead, as bitsandbytes does).
qlora_linear_2d = define_family(
    "qlora_linear",
    fwd=qlora_linear_fwd,
    fwd_fake=_fwd_fake,
    bwd=qlora_linear_bwd,
    bwd_fake=_bwd_fake,
    launch_fwd=_launch_fwd,
    launch_bwd=_launch_bwd,
    setup_context=_setup_context,
    backward=_backward,
)
