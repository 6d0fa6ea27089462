"""The torch backend: single-adapter LoRA linear and merge with stock PyTorch ops.

Used on CPU (and for float64, and wherever Triton is missing). It follows the same launcher
signatures as ``lora_kernels/triton/lora_linear.py`` so the op layer dispatches blindly.

Forward: one ``addmm`` for the base, then the LoRA term added in place with ``addmm_`` (no
``[M, N]`` temporary for ``(x A^T) B^T``): on a CPU that is ~1.0-1.06x of the bare ``nn.Linear``.
The GEMMs run in the input dtype as PyTorch does (fp32 accumulation inside the BLAS), so low
precision results round after each GEMM rather than once; the Triton and CUDA kernels round once.

Merge: ``W += scale * B @ A`` one block of rows at a time, each block computed in fp32 and rounded
once, so the extra memory is one block (``_MERGE_BLOCK_BYTES``), never an ``[N, K]`` fp32 copy.
"""

from __future__ import annotations

import torch

_MERGE_BLOCK_BYTES = 8 << 20


def lora_linear_fwd(x, weight, bias, lora_a, lora_b, scale, x_lora=None):
    xl = x if x_lora is None else x_lora
    y = torch.addmm(bias, x, weight.T) if bias is not None else x @ weight.T
    if lora_a.dtype == x.dtype:
        s = xl @ lora_a.T
        y.addmm_(s, lora_b.T, alpha=scale)
    else:  # fp32 adapter on a half base: the LoRA branch runs in the adapter's dtype, as PEFT's
        s = xl.to(lora_a.dtype) @ lora_a.T
        y.add_((s @ lora_b.T).mul_(scale).to(y.dtype))
    return y, s.float()


def lora_linear_bwd(
    dy,
    x,
    weight,
    lora_a,
    lora_b,
    s,
    scale,
    x_lora=None,
    *,
    needs_dx=True,
    needs_da=True,
    needs_db=True,
):
    ldt = lora_a.dtype
    xl = x if x_lora is None else x_lora
    dyl = dy.to(ldt)
    dyb = dyl @ lora_b if (needs_dx or needs_da) else None  # [M, r]
    dx = dx_lora = da = db = None
    if needs_dx:
        dx = dy @ weight
        if x_lora is None and ldt == dx.dtype:
            dx.addmm_(dyb, lora_a, alpha=scale)
        else:
            lora_term = (dyb @ lora_a).mul_(scale).to(dx.dtype)
            if x_lora is None:
                dx.add_(lora_term)
            else:
                dx_lora = lora_term
    if needs_da:
        da = (dyb.T @ xl.to(ldt)).mul_(scale)
    if needs_db:
        db = (dyl.T @ s.to(ldt)).mul_(scale)
    return dx, dx_lora, da, db


def merge_(weight, lora_a, lora_b, scale):
    """``weight += scale * lora_b @ lora_a`` in place, block by block, fp32, one rounding."""
    n, k = weight.shape
    rows = max(1, _MERGE_BLOCK_BYTES // max(1, 4 * k))
    a = lora_a.float()
    for start in range(0, n, rows):
        w = weight[start : start + rows]
        b = lora_b[start : start + rows].float()
        if weight.dtype == torch.float32 or weight.dtype == torch.float64:
            w.addmm_(b.to(weight.dtype), a.to(weight.dtype), alpha=scale)
        else:
            w.copy_(torch.addmm(w.float(), b, a, alpha=scale))
    return weight
