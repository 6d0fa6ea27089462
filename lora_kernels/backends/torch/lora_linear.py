"""The torch backend of the ``lora_linear`` family, in stock PyTorch ops.

Used on CPU (and for float64, and wherever Triton is missing), with the family's launcher
signatures (``lora_kernels.backends.LoraLinearLaunchers``).

Forward: the small LoRA product ``scale * (x A^T) B^T (+ bias)`` is written into the output buffer
first and the base GEMM accumulates into it (``addmm`` with beta=1), so there is no ``[M, N]``
temporary and no second pass over the output; the backward builds dx the same way. On CPUs that is
faster than adding the LoRA term to the finished output: the small GEMMs run slower right after a
large one (``benchmarks/results/torch_backend_cpu.md``). The GEMMs run in the input dtype as PyTorch
does (fp32 accumulation inside the BLAS), so low precision results round after each GEMM rather than
once; the Triton and CUDA kernels round once.
"""

from __future__ import annotations

import torch


def lora_linear_fwd(x, weight, bias, lora_a, lora_b, scale, x_lora=None):
    xl = x if x_lora is None else x_lora
    ldt = lora_a.dtype
    s = (xl if ldt == x.dtype else xl.to(ldt)) @ lora_a.T
    # The small LoRA product first, then the base GEMM accumulates into it (beta=1): measured
    # faster on CPUs than adding the LoRA term to the finished output.
    if ldt == x.dtype and bias is not None:
        y = torch.addmm(bias, s, lora_b.T, alpha=scale)
    else:
        y = torch.mm(s, lora_b.T).mul_(scale).to(x.dtype)
        if bias is not None:
            y.add_(bias)
    y = y.addmm_(x, weight.T)  # in place: no copy of the [M, N] LoRA term into a new buffer
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
    # scale * dy @ B, [M, r]: scaled once here, so dA and the dx term need no pass of their own
    dyb = torch.mm(dyl, lora_b).mul_(scale) if (needs_dx or needs_da) else None
    dx = dx_lora = da = db = None
    if needs_da:
        da = torch.mm(dyb.T, xl.to(ldt))
    if needs_db:
        db = torch.mm(dyl.T, s.to(ldt)).mul_(scale)
    if needs_dx:
        lora_term = torch.mm(dyb, lora_a).to(dy.dtype)
        if x_lora is None:  # the base GEMM accumulates into the LoRA term (beta=1)
            dx = lora_term.addmm_(dy, weight)
        else:
            dx, dx_lora = dy @ weight, lora_term
    return dx, dx_lora, da, db
