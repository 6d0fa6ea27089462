"""``torch.library`` custom ops: schemas, fake impls, autograd, and dispatch to a backend.

Each op takes an already resolved backend name (``"torch"``, ``"triton"`` or ``"cuda"``, see
``_backend.py``) and inputs already validated by ``functional.py``. The ops are opaque to
``torch.compile``: their fake impls give output shapes, and ``register_autograd`` attaches the
backward, itself a custom op, so ``torch.compile(fullgraph=True)`` traces forward and backward
without graph breaks.

Ops (namespace ``lora_kernels``):

* ``lora_linear_fwd(x[M,K], weight[N,K], bias?, lora_a[r,K], lora_b[N,r], scale, x_lora?, backend)
  -> (y[M,N], s[M,r] fp32)``; ``s = x_lora @ lora_a.T`` is kept for the backward and is not
  differentiable.
* ``lora_linear_bwd(dy, x, weight, lora_a, lora_b, s, scale, x_lora?, needs_dx, needs_da,
  needs_db, backend) -> (dx, dx_lora, da, db)``; a gradient that is not needed comes back as an
  empty tensor.
* ``merge_lora_(weight!, lora_a, lora_b, scale, backend)``: ``weight += scale * lora_b @ lora_a``.
* ``lora_linear_multi_fwd(x[M,K], weight[N,K], bias?, lora_a[L,R,K], lora_b[L,N,R], scales[L],
  row_ids[M], ranks[L]?, backend) -> (y[M,N], s[M,R])``: a different adapter per row (id -1 or
  out of range: base only); ``s`` (fp32, fp64 for fp64 inputs) is kept for the backward.
* ``lora_linear_multi_bwd(dy, x, weight, lora_a, lora_b, scales, row_ids, s, ranks?, needs_dx,
  needs_da, needs_db, backend) -> (dx, da[L,R,K], db[L,N,R])``; not needed: an empty tensor.
  ``scales``, ``row_ids`` and ``ranks`` are not differentiable.
"""

from __future__ import annotations

import functools
import importlib

import torch
from torch import Tensor

# Where each backend keeps the launchers of each kernel family. Launchers of one family share
# their signatures across backends, so dispatch is a lookup.
_MODULES = {
    ("torch", "lora_linear"): "lora_kernels._torch_impl",
    ("triton", "lora_linear"): "lora_kernels.triton.lora_linear",
    ("cuda", "lora_linear"): "lora_kernels._cuda_impl",
    ("torch", "merge"): "lora_kernels._torch_impl",
    ("triton", "merge"): "lora_kernels.triton.merge",
    ("cuda", "merge"): "lora_kernels._cuda_impl",
    ("torch", "lora_multi"): "lora_kernels._torch_multi",
    ("triton", "lora_multi"): "lora_kernels.triton.lora_multi",
    ("cuda", "lora_multi"): "lora_kernels._cuda_impl",
}


def launcher(backend: str, family: str, name: str, *args, **kwargs):
    """The function ``name`` of ``backend`` for ``family``.

    The CUDA extension serves a subset of shapes and no backward: where its module has no
    ``name``, or its ``supports_<name>(*args)`` says no, the Triton launcher runs instead.
    """
    if backend == "cuda":
        mod = importlib.import_module(_MODULES[("cuda", family)])
        fn = getattr(mod, name, None)
        supports = getattr(mod, f"supports_{name}", None)
        if fn is not None and (supports is None or supports(*args, **kwargs)):
            return fn
        backend = "triton"
    return _resolved(backend, family, name)


@functools.cache
def _resolved(backend: str, family: str, name: str):
    # Imported on first use (a backend's module may need Triton), then a dict hit per call.
    return getattr(importlib.import_module(_MODULES[(backend, family)]), name)


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


# --------------------------------------------------------------------------------------------
# single-adapter LoRA linear
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("lora_kernels::lora_linear_fwd", mutates_args=())
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
    args = (x, weight, bias, lora_a, lora_b, scale, x_lora)
    y, s = launcher(backend, "lora_linear", "lora_linear_fwd", *args)(*args)
    return y, s


@lora_linear_fwd.register_fake
def _(x, weight, bias, lora_a, lora_b, scale, x_lora, backend):
    torch._check(x.dim() == 2, lambda: f"x must be 2-D here, got {x.dim()}-D")
    torch._check(weight.shape[1] == x.shape[1], lambda: "weight and x disagree in K")
    y = x.new_empty((x.shape[0], weight.shape[0]))
    s = x.new_empty((x.shape[0], lora_a.shape[0]), dtype=torch.float32)
    return y, s


def _run_bwd(
    dy, x, weight, lora_a, lora_b, s, scale, x_lora, needs_dx, needs_da, needs_db, backend
):
    """The backward launchers, called directly; a gradient that is not needed is None."""
    fn = launcher(backend, "lora_linear", "lora_linear_bwd")
    return fn(
        dy, x, weight, lora_a, lora_b, s, scale, x_lora,
        needs_dx=needs_dx, needs_da=needs_da, needs_db=needs_db,
    )  # fmt: skip


@torch.library.custom_op("lora_kernels::lora_linear_bwd", mutates_args=())
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
    dx, dx_lora, da, db = _run_bwd(
        dy, x, weight, lora_a, lora_b, s, scale, x_lora, needs_dx, needs_da, needs_db, backend
    )
    return (
        _empty(x) if dx is None else dx,
        _empty(x) if dx_lora is None else dx_lora,
        _empty(lora_a) if da is None else da,
        _empty(lora_b) if db is None else db,
    )


@lora_linear_bwd.register_fake
def _(dy, x, weight, lora_a, lora_b, s, scale, x_lora, needs_dx, needs_da, needs_db, backend):
    dx = torch.empty_like(x) if needs_dx else _empty(x)
    dx_lora = torch.empty_like(x) if (needs_dx and x_lora is not None) else _empty(x)
    da = torch.empty_like(lora_a) if needs_da else _empty(lora_a)
    db = torch.empty_like(lora_b) if needs_db else _empty(lora_b)
    return dx, dx_lora, da, db


def _lora_linear_setup(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scale, x_lora, backend = inputs
    _, s = output
    ctx.mark_non_differentiable(s)
    # With dropout the backward reads x_lora, never x (unless the base weight trains): keeping x
    # as well would hold one more activation per layer than PEFT does.
    keep_x = x_lora is None or weight.requires_grad
    ctx.save_for_backward(x if keep_x else None, weight, lora_a, lora_b, s, x_lora)
    ctx.scale = scale
    ctx.backend = backend
    ctx.direct = False


def _lora_linear_backward(ctx, dy, _ds):
    x, weight, lora_a, lora_b, s, x_lora = ctx.saved_tensors
    if x is None:  # not kept (see setup): the launchers read only x_lora, of x's shape
        x = x_lora
    need_x, need_w, need_bias, need_a, need_b, _, need_x_lora, _ = ctx.needs_input_grad
    dy = dy.contiguous()
    needs_dx = need_x or need_x_lora
    dx = dx_lora = da = db = dw = dbias = None
    if needs_dx or need_a or need_b:
        run = _run_bwd if ctx.direct else torch.ops.lora_kernels.lora_linear_bwd
        dx, dx_lora, da, db = run(
            dy, x, weight, lora_a, lora_b, s, ctx.scale, x_lora,
            needs_dx, need_a, need_b, ctx.backend,
        )  # fmt: skip
        dx = dx if need_x else None
        dx_lora = dx_lora if (x_lora is not None and need_x_lora) else None
        da = da if need_a else None
        db = db if need_b else None
    if need_w:
        dw = (dy.T @ x).to(weight.dtype)
    if need_bias:
        dbias = dy.sum(0)
    return dx, dw, dbias, da, db, None, dx_lora, None


lora_linear_fwd.register_autograd(_lora_linear_backward, setup_context=_lora_linear_setup)


def _needs_autograd(*tensors: Tensor | None) -> bool:
    """Whether a call must record autograd history (inference skips the Function's cost)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class _LoraLinearFunction(torch.autograd.Function):
    """The eager twin of the ``lora_linear_fwd`` op: same launchers, same backward, without the
    custom-op dispatcher's per-call cost (tens of microseconds, visible at decode sizes)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale, x_lora, backend):
        args = (x, weight, bias, lora_a, lora_b, scale, x_lora)
        y, s = launcher(backend, "lora_linear", "lora_linear_fwd", *args)(*args)
        _lora_linear_setup(ctx, (*args, backend), (y, s))
        ctx.direct = True
        return y, s

    @staticmethod
    def backward(ctx, dy, ds):
        return _lora_linear_backward(ctx, dy, ds)


def lora_linear_2d(x, weight, bias, lora_a, lora_b, scale, x_lora, backend) -> Tensor:
    """``y [M, N]`` for validated 2-D inputs: the custom op under ``torch.compile`` (opaque to the
    compiler, with its fake impl), the autograd Function in eager mode."""
    if torch.compiler.is_compiling():
        y, _ = torch.ops.lora_kernels.lora_linear_fwd(
            x, weight, bias, lora_a, lora_b, scale, x_lora, backend
        )
        return y
    args = (x, weight, bias, lora_a, lora_b, scale, x_lora)
    if backend == "torch" or not _needs_autograd(x, weight, bias, lora_a, lora_b, x_lora):
        # The torch launcher is built of differentiable ops: in eager mode stock autograd runs its
        # backward in C++ nodes, measured 100-250 us per layer cheaper on a 2-core CPU than the
        # Python Function (the kernels of the other backends need the Function).
        return launcher(backend, "lora_linear", "lora_linear_fwd", *args)(*args)[0]
    y, _ = _LoraLinearFunction.apply(*args, backend)
    return y


# --------------------------------------------------------------------------------------------
# merge / unmerge
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("lora_kernels::merge_lora_", mutates_args=("weight",))
def merge_lora_(weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float, backend: str) -> None:
    args = (weight, lora_a, lora_b, scale)
    launcher(backend, "merge", "merge_", *args)(*args)


@merge_lora_.register_fake
def _(weight, lora_a, lora_b, scale, backend):
    return None


# --------------------------------------------------------------------------------------------
# multi-adapter LoRA linear (a different adapter per row)
# --------------------------------------------------------------------------------------------


def _multi_s_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@torch.library.custom_op("lora_kernels::lora_linear_multi_fwd", mutates_args=())
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
    args = (x, weight, bias, lora_a, lora_b, scales, row_ids, ranks)
    y, s = launcher(backend, "lora_multi", "lora_linear_multi_fwd", *args)(*args)
    return y, s


@lora_linear_multi_fwd.register_fake
def _(x, weight, bias, lora_a, lora_b, scales, row_ids, ranks, backend):
    torch._check(x.dim() == 2, lambda: f"x must be 2-D here, got {x.dim()}-D")
    torch._check(weight.shape[1] == x.shape[1], lambda: "weight and x disagree in K")
    torch._check(row_ids.shape[0] == x.shape[0], lambda: "row_ids and x disagree in M")
    y = x.new_empty((x.shape[0], weight.shape[0]))
    s = x.new_empty((x.shape[0], lora_a.shape[1]), dtype=_multi_s_dtype(x))
    return y, s


def _run_multi_bwd(
    dy, x, weight, lora_a, lora_b, scales, row_ids, s, ranks, needs_dx, needs_da, needs_db, backend
):
    """The multi-adapter backward launchers, called directly; a gradient not needed is None."""
    fn = launcher(backend, "lora_multi", "lora_linear_multi_bwd")
    return fn(
        dy, x, weight, lora_a, lora_b, scales, row_ids, s, ranks,
        needs_dx=needs_dx, needs_da=needs_da, needs_db=needs_db,
    )  # fmt: skip


@torch.library.custom_op("lora_kernels::lora_linear_multi_bwd", mutates_args=())
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
    dx, da, db = _run_multi_bwd(
        dy, x, weight, lora_a, lora_b, scales, row_ids, s, ranks,
        needs_dx, needs_da, needs_db, backend,
    )  # fmt: skip
    return (
        _empty(x) if dx is None else dx,
        _empty(lora_a) if da is None else da,
        _empty(lora_b) if db is None else db,
    )


@lora_linear_multi_bwd.register_fake
def _(dy, x, weight, lora_a, lora_b, scales, row_ids, s, ranks, needs_dx, needs_da, needs_db,
      backend):  # fmt: skip
    dx = x.new_empty(x.shape) if needs_dx else _empty(x)
    da = lora_a.new_empty(lora_a.shape) if needs_da else _empty(lora_a)
    db = lora_b.new_empty(lora_b.shape) if needs_db else _empty(lora_b)
    return dx, da, db


def _lora_linear_multi_setup(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scales, row_ids, ranks, backend = inputs
    _, s = output
    ctx.mark_non_differentiable(s)
    ctx.save_for_backward(x, weight, lora_a, lora_b, scales, row_ids, s, ranks)
    ctx.backend = backend
    ctx.direct = False


def _lora_linear_multi_backward(ctx, dy, _ds):
    x, weight, lora_a, lora_b, scales, row_ids, s, ranks = ctx.saved_tensors
    need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
    dy = dy.contiguous()
    dx = da = db = dw = dbias = None
    if need_x or need_a or need_b:
        run = _run_multi_bwd if ctx.direct else torch.ops.lora_kernels.lora_linear_multi_bwd
        dx, da, db = run(
            dy, x, weight, lora_a, lora_b, scales, row_ids, s, ranks,
            need_x, need_a, need_b, ctx.backend,
        )  # fmt: skip
        dx = dx if need_x else None
        da = da if need_a else None
        db = db if need_b else None
    if need_w:
        dw = (dy.T @ x).to(weight.dtype)
    if need_bias:
        dbias = dy.sum(0)
    return dx, dw, dbias, da, db, None, None, None, None


lora_linear_multi_fwd.register_autograd(
    _lora_linear_multi_backward, setup_context=_lora_linear_multi_setup
)


class _LoraLinearMultiFunction(torch.autograd.Function):
    """The eager twin of the ``lora_linear_multi_fwd`` op (as ``_LoraLinearFunction``)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scales, row_ids, ranks, backend):
        args = (x, weight, bias, lora_a, lora_b, scales, row_ids, ranks)
        y, s = launcher(backend, "lora_multi", "lora_linear_multi_fwd", *args)(*args)
        _lora_linear_multi_setup(ctx, (*args, backend), (y, s))
        ctx.direct = True
        return y, s

    @staticmethod
    def backward(ctx, dy, ds):
        return _lora_linear_multi_backward(ctx, dy, ds)


def lora_linear_multi_2d(x, weight, bias, lora_a, lora_b, scales, row_ids, ranks, backend):
    """``y [M, N]`` for validated 2-D inputs with per-row ids: the custom op under
    ``torch.compile``, the autograd Function in eager mode."""
    args = (x, weight, bias, lora_a, lora_b, scales, row_ids, ranks, backend)
    if torch.compiler.is_compiling():
        y, _ = torch.ops.lora_kernels.lora_linear_multi_fwd(*args)
    else:
        y, _ = _LoraLinearMultiFunction.apply(*args)
    return y
