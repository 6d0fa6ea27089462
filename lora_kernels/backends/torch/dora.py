"""The torch backend of DoRA: the factored row norm, forward and backward with stock PyTorch ops.

Same launcher signatures as ``lora_kernels/backends/triton/dora.py``, so the op layer dispatches
blindly::

    norm = sqrt(||W_n||^2 + 2 s B_n . (W A^T)_n + s^2 B_n (A A^T) B_n^T)      [N] fp32
    g    = magnitude / norm                                                    (the caller)
    lin  = x_in @ W^T + s (x_in A^T) B^T              x_in = x_lora if given, else x
    y    = g * lin + bias + (x - x_lora) @ W^T

Without dropout the output is arranged as PEFT's, ``base + (g - 1) * (base - bias) + g * s
(x A^T) B^T`` with ``base = x W^T + bias`` from ``F.linear``: an adapter at init (g = 1 exactly,
B = 0) is then an exact no-op, bit for bit the base layer's output.

The norm never builds ``W + s B A`` ([N, K]): ``||W||_row^2`` is cached by the caller (the base
is frozen) and ``W A^T`` [N, r] is one skinny GEMM over W. A 16-bit W is upcast a block of rows
at a time (``_BLOCK_BYTES`` of fp32), never whole.

The forward is written with differentiable ops so that, in eager mode, stock autograd runs the
backward in C++ (as the LoRA torch path does); ``dora_linear_bwd`` is the same backward written
out, for the custom op under ``torch.compile``. With dropout the forward is arranged as
``x W^T + b + (g - 1) * lin + s (x_lora A^T) B^T`` (the same value) so that autograd's gradient of
x_lora, ``(g - 1) dy W + s (g dy B) A``, is not the difference of two large products.
"""

from __future__ import annotations

import torch

from ...reference import ILL_CONDITIONED

__all__ = [
    "ILL_CONDITIONED",
    "dora_linear_bwd",
    "dora_linear_fwd",
    "dora_merge_",
    "dora_unmerge_",
    "dora_weight_norm",
    "weight_sq_norm",
]

_BLOCK_BYTES = 512 << 10  # fp32 rows of W upcast at once (as the merge's blocks)


def _acc(*tensors) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _row_blocks(weight: torch.Tensor):
    n, k = weight.shape
    rows = max(1, _BLOCK_BYTES // max(1, 4 * k))
    for start in range(0, n, rows):
        yield start, weight[start : start + rows]


def weight_sq_norm(weight: torch.Tensor) -> torch.Tensor:
    """``||W_n||^2`` per row ``[N]`` in fp32 (fp64 for fp64 weights), a block of rows at a time."""
    acc = _acc(weight)
    if weight.dtype == acc:
        return torch.linalg.vector_norm(weight, dim=1).square()
    out = torch.empty(weight.shape[0], dtype=acc, device=weight.device)
    for start, w in _row_blocks(weight):
        out[start : start + w.shape[0]] = torch.linalg.vector_norm(w.to(acc), dim=1).square()
    return out


def dora_weight_norm(weight, lora_a, lora_b, scale, w_sq):
    """``||W + scale * B A||_row`` ``[N]`` (fp32, fp64 for fp64 inputs) from the factored form;
    ``w_sq`` is :func:`weight_sq_norm` of ``weight``. Not differentiable (PEFT detaches it)."""
    acc = _acc(weight, lora_a, lora_b)
    a = lora_a.detach().to(acc)
    b = lora_b.detach().to(acc)
    if weight.dtype == acc:
        p = torch.nn.functional.linear(weight.detach(), a)  # [N, r]: measured ~1.5x W @ a.T
    else:
        p = torch.empty((weight.shape[0], a.shape[0]), dtype=acc, device=weight.device)
        for start, w in _row_blocks(weight.detach()):
            p[start : start + w.shape[0]] = torch.nn.functional.linear(w.to(acc), a)
    cross = torch.linalg.vecdot(b, p)
    quad = torch.linalg.vecdot(b @ (a @ a.T), b)
    w_sq = w_sq.to(acc)
    sq = w_sq + (2.0 * scale) * cross + (scale * scale) * quad
    terms = w_sq + (2.0 * abs(scale)) * cross.abs() + (scale * scale) * quad.abs()
    bad = (sq < terms * ILL_CONDITIONED).nonzero().squeeze(1)
    if bad.numel():
        dense = torch.addmm(weight.detach()[bad].to(acc), b[bad], a, alpha=scale)
        sq[bad] = torch.linalg.vector_norm(dense, dim=1).square()
    return sq.clamp_min_(0.0).sqrt_()


def _lin(x, weight, lora_a, lora_b, scale):
    """``lin = x @ W^T + scale * (x @ A^T) @ B^T`` (x's dtype) and ``s = x @ A^T`` (the adapter's
    dtype): the LoRA product first, the base GEMM accumulated into it (as
    ``backends.torch.lora_linear``)."""
    ldt = lora_a.dtype
    s = (x if ldt == x.dtype else x.to(ldt)) @ lora_a.T
    lin = torch.mm(s, lora_b.T).mul_(scale).to(x.dtype)
    return lin.addmm_(x, weight.T), s


def dora_linear_fwd(x, weight, bias, lora_a, lora_b, scale, x_lora, g):
    """``(y, lin, s)``: the output, the unscaled ``lin`` (x's dtype, read by the backward for the
    magnitude's gradient) and ``s = x_in @ lora_a.T`` (fp32, fp64 for fp64 adapters). ``g`` is
    ``[N]``, fp32 (fp64 for fp64 inputs)."""
    if x_lora is None:
        # PEFT's arrangement: y = base + (g - 1) * (base - bias) + g * s (x A^T) B^T with
        # base = nn.Linear's own output. An adapter at init (B = 0, magnitude = ||W||_row, so
        # g = 1 exactly) gives back the base output bit for bit, as PEFT does; x W^T + bias
        # computed any other way rounds differently (the BLAS adds the bias inside the GEMM).
        ldt = lora_a.dtype
        s = (x if ldt == x.dtype else x.to(ldt)) @ lora_a.T
        lora_out = torch.mm(s, lora_b.T).mul_(scale)
        base = torch.nn.functional.linear(x, weight, bias)
        base_nb = base if bias is None else base - bias
        lin = base_nb + lora_out.to(x.dtype)
        acc = g.dtype  # fp32 (fp64): a 16-bit output is rescaled there and rounded once
        y = torch.addcmul(base.to(acc), base_nb.to(acc), g - 1.0)
        y.addcmul_(lora_out.to(acc), g)
        return y.to(x.dtype), lin, s.to(g.dtype)
    lin, s = _lin(x_lora, weight, lora_a, lora_b, scale)
    lora_out = torch.mm(s, lora_b.T) * scale
    y = (lin * (g - 1.0) + lora_out).to(x.dtype)
    y = y.addmm_(x, weight.T)
    if bias is not None:
        y = y.add_(bias)
    return y, lin, s.to(g.dtype)


def _column_dot(dy: torch.Tensor, lin: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """``sum_rows(dy * lin)`` ``[N]`` in ``acc``; 16-bit rows are upcast a block at a time."""
    if dy.dtype == acc:
        return (dy * lin).sum(0)
    out = torch.zeros(dy.shape[1], dtype=acc, device=dy.device)
    rows = max(1, _BLOCK_BYTES // max(1, 4 * dy.shape[1]))
    for start in range(0, dy.shape[0], rows):
        out += (dy[start : start + rows].to(acc) * lin[start : start + rows].to(acc)).sum(0)
    return out


def dora_linear_bwd(
    dy,
    x,
    weight,
    lora_a,
    lora_b,
    s,
    lin,
    g,
    weight_norm,
    scale,
    x_lora=None,
    *,
    needs_dx=True,
    needs_da=True,
    needs_db=True,
    needs_dm=True,
):
    """``(dx, dx_lora, da, db, dm)`` of :func:`dora_linear_fwd` for the upstream ``dy``; a
    gradient not needed is None (see ``reference.dora_linear_backward`` for the formulas)."""
    acc = g.dtype
    ldt = lora_a.dtype
    xl = x if x_lora is None else x_lora
    dm = _column_dot(dy, lin, acc) / weight_norm if needs_dm else None
    dyg = (dy * g).to(dy.dtype)
    dyl = dyg.to(ldt)
    t = torch.mm(dyl, lora_b).mul_(scale) if (needs_dx or needs_da) else None  # s * dyg @ B
    dx = dx_lora = da = db = None
    if needs_da:
        da = torch.mm(t.T, xl.to(ldt))
    if needs_db:
        db = torch.mm(dyl.T, s.to(ldt)).mul_(scale)
    if needs_dx:
        lora_term = torch.mm(t, lora_a).to(dy.dtype)
        if x_lora is None:
            dx = lora_term.addmm_(dyg, weight)
        else:
            dx = dy @ weight
            dx_lora = lora_term.addmm_((dy * (g - 1.0)).to(dy.dtype), weight)
    return dx, dx_lora, da, db, dm


def dora_merge_(weight, lora_a, lora_b, scale, g):
    """``weight = g[:, None] * (weight + scale * B A)`` in place, a block of rows at a time in
    fp32 (fp64 for fp64), each element rounded once."""
    acc = _acc(weight, lora_a, lora_b)
    a = lora_a.to(acc)
    for start, w in _row_blocks(weight):
        rows = slice(start, start + w.shape[0])
        merged = torch.addmm(w.to(acc), lora_b[rows].to(acc), a, alpha=scale)
        w.copy_(merged.mul_(g[rows].to(acc)[:, None]))
    return weight


def dora_unmerge_(weight, lora_a, lora_b, scale, g):
    """The inverse of :func:`dora_merge_` for the same ``g``:
    ``weight = weight / g[:, None] - scale * B A`` in place, in fp32 (a 16-bit weight is rounded
    once)."""
    acc = _acc(weight, lora_a, lora_b)
    a = lora_a.to(acc)
    for start, w in _row_blocks(weight):
        rows = slice(start, start + w.shape[0])
        base = torch.div(w.to(acc), g[rows].to(acc)[:, None])
        w.copy_(base.addmm_(lora_b[rows].to(acc), a, alpha=-scale))
    return weight
