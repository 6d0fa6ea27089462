"""The spec: LoRA linear, its gradients, merge, the multi-adapter forward and Embedding LoRA in
plain PyTorch.

Every backend (Triton, CUDA, the fast torch path) is tested against these functions. They favour
clarity over speed: inputs are upcast to fp32 (fp64 stays fp64), every product accumulates in that
precision, and the result is rounded once to the input dtype.

Shapes follow ``nn.Linear`` and PEFT::

    x        [M, K]       (any leading dims for the single-adapter functions: [..., K])
    weight   [N, K]       base weight W0
    bias     [N] or None
    lora_a   [r, K]       PEFT ``lora_A.weight``
    lora_b   [N, r]       PEFT ``lora_B.weight``
    scale    float        lora_alpha / r  (lora_alpha / sqrt(r) with rsLoRA)

    y  = x @ weight.T + bias + scale * (x @ lora_a.T) @ lora_b.T
    S  = x @ lora_a.T                                   [M, r]
    dx = dy @ weight + scale * (dy @ lora_b) @ lora_a
    dA = scale * (dy @ lora_b).T @ x                    [r, K]
    dB = scale * dy.T @ S                               [N, r]
"""

from __future__ import annotations

import torch

__all__ = [
    "lora_embedding",
    "lora_embedding_backward",
    "lora_embedding_multi",
    "lora_linear",
    "lora_linear_backward",
    "lora_linear_multi",
    "lora_linear_multi_backward",
    "merge_lora",
    "unmerge_lora",
    "ILL_CONDITIONED",
    "dora_weight_norm",
    "dora_weight_norm_factored",
    "dora_linear",
    "dora_linear_backward",
    "merge_dora",
    "unmerge_dora",
    "dequantize_4bit",
    "qlora_linear",
    "qlora_linear_backward",
    "moe_activation",
    "moe_lora",
]


def _acc_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """fp64 when any input is fp64 (gradcheck), fp32 otherwise."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    x_lora: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = x @ weight.T + bias + scale * (x_lora @ lora_a.T) @ lora_b.T``.

    ``x_lora`` is the input of the LoRA branch (PEFT applies dropout there only); it defaults to
    ``x``. x: [..., K] -> y: [..., N] in x's dtype.
    """
    acc = _acc_dtype(x, weight, lora_a, lora_b)
    xf = x.to(acc)
    xl = xf if x_lora is None else x_lora.to(acc)
    y = xf @ weight.to(acc).T
    if bias is not None:
        y = y + bias.to(acc)
    y = y + scale * ((xl @ lora_a.to(acc).T) @ lora_b.to(acc).T)
    return y.to(x.dtype)


def lora_linear_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    x_lora: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dx, d_lora_a, d_lora_b)`` of :func:`lora_linear` for the upstream ``dy``.

    With ``x_lora`` given (dropout), ``dx`` is the gradient through both branches taken as if
    ``x_lora`` were ``x``'s value on the LoRA branch: the caller chains the LoRA part through its
    mask. Each result is rounded once to its tensor's dtype.
    """
    acc = _acc_dtype(dy, x, weight, lora_a, lora_b)
    k = x.shape[-1]
    n = weight.shape[0]
    dyf = dy.reshape(-1, n).to(acc)
    xf = x.reshape(-1, k).to(acc)
    xl = xf if x_lora is None else x_lora.reshape(-1, k).to(acc)
    a = lora_a.to(acc)
    b = lora_b.to(acc)
    dyb = dyf @ b  # [M, r]
    dx = dyf @ weight.to(acc) + scale * (dyb @ a)
    da = scale * (dyb.T @ xl)
    db = scale * (dyf.T @ (xl @ a.T))
    return (
        dx.reshape(x.shape).to(x.dtype),
        da.to(lora_a.dtype),
        db.to(lora_b.dtype),
    )


def _multi_rows(x: torch.Tensor, adapter_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten x to [M, K] and expand per-sequence ids ([B] for x [B, T, K]) to per-row ids [M]."""
    if x.dim() == 3:
        rows = adapter_ids.long().repeat_interleave(x.shape[1])
        return x.reshape(-1, x.shape[-1]), rows
    return x, adapter_ids.long()


def lora_linear_multi(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scales: torch.Tensor,
    adapter_ids: torch.Tensor,
) -> torch.Tensor:
    """Every row with its own adapter, as a loop over rows (slow on purpose: it is the spec).

    x [M, K] with adapter_ids [M], or x [B, T, K] with adapter_ids [B]; lora_a [L, r_max, K],
    lora_b [L, N, r_max] (zero-padded to the largest rank), scales [L]; an id of -1 means the
    base layer only::

        y[i] = x[i] @ weight.T + bias + scales[a] * (x[i] @ lora_a[a].T) @ lora_b[a].T,  a = ids[i]
    """
    acc = _acc_dtype(x, weight, lora_a, lora_b)
    x2, ids = _multi_rows(x, adapter_ids)
    xf = x2.to(acc)
    y = xf @ weight.to(acc).T
    if bias is not None:
        y = y + bias.to(acc)
    for i in range(xf.shape[0]):
        a = int(ids[i])
        if a < 0:
            continue
        s = xf[i] @ lora_a[a].to(acc).T
        y[i] = y[i] + float(scales[a]) * (s @ lora_b[a].to(acc).T)
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


def lora_linear_multi_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scales: torch.Tensor,
    adapter_ids: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dx, d_lora_a [L, r_max, K], d_lora_b [L, N, r_max])`` of the multi forward.

    Each adapter's gradient comes from exactly the rows that used it; rows with id -1 get the base
    gradient ``dy @ weight`` only.
    """
    acc = _acc_dtype(dy, x, weight, lora_a, lora_b)
    x2, ids = _multi_rows(x, adapter_ids)
    xf = x2.to(acc)
    dyf = dy.reshape(xf.shape[0], -1).to(acc)
    dx = dyf @ weight.to(acc)
    da = torch.zeros(lora_a.shape, dtype=acc, device=x.device)
    db = torch.zeros(lora_b.shape, dtype=acc, device=x.device)
    for i in range(xf.shape[0]):
        a = int(ids[i])
        if a < 0:
            continue
        sc = float(scales[a])
        la = lora_a[a].to(acc)
        lb = lora_b[a].to(acc)
        dyb = dyf[i] @ lb  # [r]
        dx[i] = dx[i] + sc * (dyb @ la)
        da[a] += sc * torch.outer(dyb, xf[i])
        db[a] += sc * torch.outer(dyf[i], xf[i] @ la.T)
    return dx.reshape(x.shape).to(x.dtype), da.to(lora_a.dtype), db.to(lora_b.dtype)


def merge_lora(
    weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float
) -> torch.Tensor:
    """``weight + scale * lora_b @ lora_a`` computed in fp32 and rounded once (out of place)."""
    acc = _acc_dtype(weight, lora_a, lora_b)
    delta = lora_b.to(acc) @ lora_a.to(acc)
    return (weight.to(acc) + scale * delta).to(weight.dtype)


def unmerge_lora(
    weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float
) -> torch.Tensor:
    """``weight - scale * lora_b @ lora_a`` computed in fp32 and rounded once (out of place)."""
    return merge_lora(weight, lora_a, lora_b, -scale)


# --------------------------------------------------------------------------------------------
# DoRA (weight-decomposed LoRA, PEFT's ``use_dora=True``)
# --------------------------------------------------------------------------------------------
#
# magnitude [N] (PEFT ``lora_magnitude_vector[name].weight``) rescales each output feature:
#
#     norm = ||weight + scale * lora_b @ lora_a||_row      [N], a constant for autograd (PEFT
#                                                           detaches it, DoRA paper section 4.3)
#     g    = magnitude / norm                               [N]
#     lin  = x_lora @ weight.T + scale * (x_lora @ lora_a.T) @ lora_b.T          [M, N]
#     y    = g * lin + bias + (x - x_lora) @ weight.T
#
# Without dropout x_lora is x and the last term vanishes: ``y = g * (x W^T + s x A^T B^T) + b``.
# With dropout PEFT feeds the dropped-out input to the whole DoRA branch while the base layer sees
# x, hence the last term (PEFT's ``result + (g - 1) * F.linear(dropout(x), W) + g * lora``).


def dora_weight_norm(
    weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float
) -> torch.Tensor:
    """``||weight + scale * lora_b @ lora_a||`` per row ``[N]``, from the dense sum (the spec)."""
    acc = _acc_dtype(weight, lora_a, lora_b)
    dense = weight.to(acc) + scale * (lora_b.to(acc) @ lora_a.to(acc))
    return torch.linalg.vector_norm(dense, dim=1)


ILL_CONDITIONED = 1.0 / 16
"""The factored norm's cancellation threshold, shared by every backend: a row whose squared norm
is below this share of the sum of its three terms' magnitudes (the adapter nearly cancels the row
of W) loses more than 4 bits of the factored sum to cancellation, so the backends recompute such
rows from ``W_n + s B_n A`` directly. Trained adapters change a row by a few percent, far from it;
degenerate shapes (K = 1) and adversarial weights reach it."""


def dora_weight_norm_factored(
    weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float
) -> torch.Tensor:
    """The same norm without the ``[N, K]`` sum, as the kernels compute it::

        ||W_n + s (BA)_n||^2 = ||W_n||^2 + 2 s B_n . (W A^T)_n + s^2 B_n (A A^T) B_n^T

    ``||W_n||^2`` depends on the frozen base only (callers cache it); ``W A^T`` [N, r] and
    ``A A^T`` [r, r] cost one pass over W. Rounding can take the sum a hair below zero when the
    adapter cancels a row of W; it is clamped there.
    """
    acc = _acc_dtype(weight, lora_a, lora_b)
    w, a, b = weight.to(acc), lora_a.to(acc), lora_b.to(acc)
    w_sq = (w * w).sum(dim=1)
    cross = (b * (w @ a.T)).sum(dim=1)
    quad = ((b @ (a @ a.T)) * b).sum(dim=1)
    return (w_sq + 2.0 * scale * cross + scale * scale * quad).clamp_min(0.0).sqrt()


def dora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    magnitude: torch.Tensor,
    scale: float,
    x_lora: torch.Tensor | None = None,
) -> torch.Tensor:
    """DoRA's output ``y = g * lin + bias + (x - x_lora) @ weight.T`` (see above), x's dtype."""
    acc = _acc_dtype(x, weight, lora_a, lora_b, magnitude)
    xf = x.to(acc)
    xl = xf if x_lora is None else x_lora.to(acc)
    w = weight.to(acc)
    g = magnitude.to(acc) / dora_weight_norm(weight, lora_a, lora_b, scale).to(acc)
    lin = xl @ w.T + scale * ((xl @ lora_a.to(acc).T) @ lora_b.to(acc).T)
    y = g * lin
    if bias is not None:
        y = y + bias.to(acc)
    if x_lora is not None:
        y = y + (xf - xl) @ w.T
    return y.to(x.dtype)


def dora_linear_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    magnitude: torch.Tensor,
    scale: float,
    x_lora: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dx, dx_lora, d_lora_a, d_lora_b, d_magnitude)`` of :func:`dora_linear`.

    The norm is a constant (PEFT's ``weight_norm.detach()``). With ``dyg = dy * g``::

        dm      = sum_rows(dy * lin) / norm
        dA      = scale * (dyg @ B).T @ x_lora        dB = scale * dyg.T @ (x_lora @ A.T)
        x_lora None:   dx = dyg @ W + scale * (dyg @ B) @ A,           dx_lora None
        x_lora given:  dx = dy @ W,   dx_lora = (dyg - dy) @ W + scale * (dyg @ B) @ A
    """
    acc = _acc_dtype(dy, x, weight, lora_a, lora_b, magnitude)
    k = x.shape[-1]
    n = weight.shape[0]
    dyf = dy.reshape(-1, n).to(acc)
    xf = x.reshape(-1, k).to(acc)
    xl = xf if x_lora is None else x_lora.reshape(-1, k).to(acc)
    w, a, b = weight.to(acc), lora_a.to(acc), lora_b.to(acc)
    norm = dora_weight_norm(weight, lora_a, lora_b, scale).to(acc)
    g = magnitude.to(acc) / norm
    lin = xl @ w.T + scale * ((xl @ a.T) @ b.T)
    dm = (dyf * lin).sum(dim=0) / norm
    dyg = dyf * g
    t = dyg @ b
    da = scale * (t.T @ xl)
    db = scale * (dyg.T @ (xl @ a.T))
    lora_dx = scale * (t @ a)
    if x_lora is None:
        dx, dx_lora = dyg @ w + lora_dx, None
    else:
        dx = dyf @ w
        dx_lora = ((dyg - dyf) @ w + lora_dx).reshape(x.shape).to(x.dtype)
    return (
        dx.reshape(x.shape).to(x.dtype),
        dx_lora,
        da.to(lora_a.dtype),
        db.to(lora_b.dtype),
        dm.to(magnitude.dtype),
    )


def merge_dora(
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    magnitude: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """The merged weight ``g[:, None] * (weight + scale * lora_b @ lora_a)``, ``g = m / norm`` with
    the norm of the unmerged weight; fp32 (fp64 stays fp64), rounded once (out of place)."""
    acc = _acc_dtype(weight, lora_a, lora_b, magnitude)
    dense = weight.to(acc) + scale * (lora_b.to(acc) @ lora_a.to(acc))
    g = magnitude.to(acc) / torch.linalg.vector_norm(dense, dim=1)
    return (g[:, None] * dense).to(weight.dtype)


def unmerge_dora(
    merged: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    magnitude: torch.Tensor,
    weight_norm: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """The inverse of :func:`merge_dora`: ``merged / g[:, None] - scale * lora_b @ lora_a`` with
    ``g = magnitude / weight_norm``, ``weight_norm`` the norm taken at merge time (the merged
    weight no longer holds it); fp32, rounded once (out of place)."""
    acc = _acc_dtype(merged, lora_a, lora_b, magnitude)
    g = magnitude.to(acc) / weight_norm.to(acc)
    delta = scale * (lora_b.to(acc) @ lora_a.to(acc))
    return (merged.to(acc) / g[:, None] - delta).to(merged.dtype)


# ------------------------------------------------------------------------------------------------
# 4-bit base weight (QLoRA): bitsandbytes' NF4 / FP4 format
# ------------------------------------------------------------------------------------------------
#
# The weight W [N, K] is stored as bitsandbytes' ``quantize_4bit`` writes it: element i of W
# flattened row-major (i = n * K + k) is the 4-bit index
#
#     q[i] = qweight[i // 2] >> 4      for even i,   qweight[i // 2] & 0xF   for odd i
#
# into a 16-entry table ``code`` (NF4 or FP4, fp32), scaled by the fp32 maximum of its block of
# ``blocksize`` elements:
#
#     W[i] = code[q[i]] * absmax[i // blocksize]                       (fp32, one rounding)
#
# With double quantization (``compress_statistics=True``, "nested") the block maxima are stored as
# uint8 indices into a 256-entry table ``code2``, with an fp32 scale per ``blocksize2`` of them and
# one fp32 offset:
#
#     absmax[j] = code2[absmax_q[j]] * absmax2[j // blocksize2] + offset    (fp32, two roundings)
#
# The GEMM runs on W rounded once to the input's dtype, which is what bitsandbytes' own 4-bit
# matmul multiplies by. Every later product follows the LoRA spec above.


def _nested_absmax(
    absmax_q: torch.Tensor,
    absmax2: torch.Tensor,
    code2: torch.Tensor,
    offset: torch.Tensor | float,
    blocksize2: int,
) -> torch.Tensor:
    """The fp32 block maxima of a double-quantized weight (see the comment above)."""
    idx = absmax_q.reshape(-1).long()
    scales = absmax2.float().repeat_interleave(blocksize2)[: idx.numel()]
    out = code2.float()[idx] * scales
    return out + torch.as_tensor(offset, dtype=torch.float32, device=out.device)


def dequantize_4bit(
    qweight: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    shape: tuple[int, int],
    dtype: torch.dtype = torch.float32,
    *,
    absmax2: torch.Tensor | None = None,
    code2: torch.Tensor | None = None,
    offset: torch.Tensor | float | None = None,
    blocksize2: int = 256,
) -> torch.Tensor:
    """W [N, K] from bitsandbytes' packed 4-bit bytes, element by element as the comment says.

    qweight: the packed bytes, any shape and storage dtype (read as ``ceil(N*K/2)`` uint8);
    absmax: fp32 [ceil(N*K/blocksize)], or uint8 of that length when ``absmax2`` is given
    (nested); code: fp32 [16]. Computed in fp32 and rounded once to ``dtype``.
    """
    n_el = int(shape[0]) * int(shape[1])
    packed = qweight.reshape(-1).view(torch.uint8).long()
    q = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[:n_el]
    if absmax2 is not None:
        scales = _nested_absmax(absmax, absmax2, code2, offset, blocksize2)
    else:
        scales = absmax.reshape(-1).float()
    per_element = scales.repeat_interleave(blocksize)[:n_el]
    w = code.float()[q] * per_element
    return w.reshape(int(shape[0]), int(shape[1])).to(dtype)


def qlora_linear(
    x: torch.Tensor,
    weight_4bit: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    x_lora: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`lora_linear` on a 4-bit base: ``weight_4bit`` is :func:`dequantize_4bit`'s result
    in x's dtype (the weight bitsandbytes multiplies by); every product accumulates in fp32."""
    return lora_linear(x, weight_4bit.to(x.dtype), bias, lora_a, lora_b, scale, x_lora)


def qlora_linear_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight_4bit: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    x_lora: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, d_lora_a, d_lora_b)`` of :func:`qlora_linear`: ``dx = dy @ W + scale * (dy @ B) @ A``
    with W the dequantized weight in x's dtype; the 4-bit base itself gets no gradient."""
    return lora_linear_backward(dy, x, weight_4bit.to(x.dtype), lora_a, lora_b, scale, x_lora)


# ------------------------------------------------------------------------------------------------
# Embedding LoRA (PEFT's ``lora.Embedding``)
# ------------------------------------------------------------------------------------------------
#
#     ids      [M]         integer token ids in [0, V)
#     weight   [V, D]      base embedding table E
#     lora_a   [r, V]      PEFT ``lora_embedding_A``
#     lora_b   [D, r]      PEFT ``lora_embedding_B``
#
#     S  = lora_a.T[ids]                                  [M, r]   (a gather, no matmul)
#     y  = weight[ids] + scale * S @ lora_b.T             [M, D]
#     dA[:, v] = scale * sum_{i: ids[i] = v, v != padding_idx} (dy[i] @ lora_b)     (sparse columns)
#     dB = scale * dy.T @ S                               [D, r]
#     merge:  weight += scale * (lora_b @ lora_a).T = scale * lora_a.T @ lora_b.T


def lora_embedding(
    ids: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """``y = weight[ids] + scale * lora_a.T[ids] @ lora_b.T``; ids of any shape -> [*ids.shape, D].

    The result is in the wider of weight's and the adapter's dtype rounded to weight's dtype, as
    PEFT's ``lora.Embedding`` returns it."""
    acc = _acc_dtype(weight, lora_a, lora_b)
    flat = ids.reshape(-1).long()
    y = weight.to(acc)[flat] + scale * (lora_a.to(acc).T[flat] @ lora_b.to(acc).T)
    return y.to(weight.dtype).reshape(*ids.shape, weight.shape[1])


def lora_embedding_backward(
    dy: torch.Tensor,
    ids: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    padding_idx: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients ``(d_lora_a [r, V], d_lora_b [D, r])`` of :func:`lora_embedding`, row by row.

    Rows whose id is ``padding_idx`` give lora_a no gradient (``nn.Embedding``'s rule, which PEFT
    applies to the A lookup); they still reach lora_b through their (non-zero) S."""
    acc = _acc_dtype(dy, lora_a, lora_b)
    flat = ids.reshape(-1).long()
    dyf = dy.reshape(flat.shape[0], lora_b.shape[0]).to(acc)
    a = lora_a.to(acc)
    b = lora_b.to(acc)
    da = torch.zeros(a.shape, dtype=acc, device=a.device)
    for i in range(flat.shape[0]):
        v = int(flat[i])
        if padding_idx is not None and v == padding_idx:
            continue
        da[:, v] += scale * (dyf[i] @ b)
    db = scale * (dyf.T @ a.T[flat])
    return da.to(lora_a.dtype), db.to(lora_b.dtype)


def lora_embedding_multi(
    ids: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scales: torch.Tensor,
    adapter_ids: torch.Tensor,
) -> torch.Tensor:
    """Every row (or sequence) with its own adapter, as a loop over rows.

    ids [M] with adapter_ids [M], or ids [B, T] with adapter_ids [B]; lora_a [L, r_max, V],
    lora_b [L, D, r_max] (zero-padded), scales [L]; id -1: the base embedding only."""
    acc = _acc_dtype(weight, lora_a, lora_b)
    flat = ids.reshape(-1).long()
    rows = adapter_ids.long()
    if ids.dim() == 2:
        rows = rows.repeat_interleave(ids.shape[1])
    y = weight.to(acc)[flat]
    for i in range(flat.shape[0]):
        a = int(rows[i])
        if a < 0:
            continue
        s = lora_a[a].to(acc)[:, flat[i]]
        y[i] = y[i] + float(scales[a]) * (lora_b[a].to(acc) @ s)
    return y.to(weight.dtype).reshape(*ids.shape, weight.shape[1])


# --------------------------------------------------------------------------------------------
# Mixture-of-experts LoRA (LoRA on transformers 5's fused experts, PEFT ``target_parameters``)
# --------------------------------------------------------------------------------------------


def moe_activation(
    g: torch.Tensor, activation: str, swiglu_alpha: float = 1.702, swiglu_limit: float = 7.0
) -> torch.Tensor:
    """``h [..., I]`` from the gate-up projection's output ``g [..., 2I]``.

    * ``"silu"`` (Qwen3-MoE, Mixtral, OLMoE): ``gate, up = g[..., :I], g[..., I:]``,
      ``h = silu(gate) * up``;
    * ``"swiglu_oai"`` (gpt-oss): gate and up interleaved, ``gate, up = g[..., 0::2],
      g[..., 1::2]``, clamped (``gate <= limit``, ``|up| <= limit``), and
      ``h = (up + 1) * gate * sigmoid(alpha * gate)``.
    """
    if activation == "silu":
        gate, up = g.chunk(2, dim=-1)
        return torch.nn.functional.silu(gate) * up
    if activation == "swiglu_oai":
        gate = g[..., 0::2].clamp(max=swiglu_limit)
        up = g[..., 1::2].clamp(min=-swiglu_limit, max=swiglu_limit)
        return (up + 1) * (gate * torch.sigmoid(gate * swiglu_alpha))
    raise ValueError(f"activation must be 'silu' or 'swiglu_oai', got {activation!r}")


def moe_lora(
    x: torch.Tensor,
    top_k_ids: torch.Tensor,
    top_k_weights: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    lora_a_gate_up: torch.Tensor | None,
    lora_b_gate_up: torch.Tensor | None,
    lora_a_down: torch.Tensor | None,
    lora_b_down: torch.Tensor | None,
    scales: torch.Tensor,
    adapter_ids: torch.Tensor | None = None,
    *,
    bias_gate_up: torch.Tensor | None = None,
    bias_down: torch.Tensor | None = None,
    activation: str = "silu",
    swiglu_alpha: float = 1.702,
    swiglu_limit: float = 7.0,
) -> torch.Tensor:
    """A mixture-of-experts layer with LoRA on both expert projections, one (token, slot) pair
    at a time (slow on purpose: it is the spec). Differentiable in every float input, so autograd
    on it gives the reference gradients.

    Shapes (``T`` tokens, ``k`` experts per token, ``E`` experts, ``L`` adapters)::

        x [T, H]; top_k_ids [T, k] (ids outside [0, E) contribute nothing); top_k_weights [T, k]
        w_gate_up [E, 2I, H], bias_gate_up [E, 2I] or None; w_down [E, H, I], bias_down [E, H]
        lora_a_gate_up [L, E, r, H], lora_b_gate_up [L, E, 2I, r]   (None: no LoRA there)
        lora_a_down [L, E, r', I], lora_b_down [L, E, H, r']; scales [L]
        adapter_ids [T] (None: adapter 0 everywhere; -1: the base experts only)

    For each pair (t, j) with expert ``e = top_k_ids[t, j]`` and adapter ``a``::

        g   = x[t] W_gu[e]^T + b_gu[e] + s_a (x[t] A_gu[a, e]^T) B_gu[a, e]^T     [2I]
        h   = act(g)                                                              [I]
        o   = h W_d[e]^T + b_d[e] + s_a (h A_d[a, e]^T) B_d[a, e]^T               [H]
        y[t] = sum_j top_k_weights[t, j] * o
    """
    acc = _acc_dtype(x, w_gate_up, w_down, lora_a_gate_up, lora_a_down)
    num_experts = w_gate_up.shape[0]
    xf = x.to(acc)
    rows = []
    for t in range(x.shape[0]):
        a = 0 if adapter_ids is None else int(adapter_ids[t])
        yt = torch.zeros(x.shape[1], dtype=acc, device=x.device)
        for j in range(top_k_ids.shape[1]):
            e = int(top_k_ids[t, j])
            if not 0 <= e < num_experts:
                continue
            g = w_gate_up[e].to(acc) @ xf[t]
            if bias_gate_up is not None:
                g = g + bias_gate_up[e].to(acc)
            if a >= 0 and lora_a_gate_up is not None:
                s = lora_a_gate_up[a, e].to(acc) @ xf[t]
                g = g + scales[a].to(acc) * (lora_b_gate_up[a, e].to(acc) @ s)
            h = moe_activation(g, activation, swiglu_alpha, swiglu_limit)
            o = w_down[e].to(acc) @ h
            if bias_down is not None:
                o = o + bias_down[e].to(acc)
            if a >= 0 and lora_a_down is not None:
                s = lora_a_down[a, e].to(acc) @ h
                o = o + scales[a].to(acc) * (lora_b_down[a, e].to(acc) @ s)
            yt = yt + top_k_weights[t, j].to(acc) * o
        rows.append(yt)
    if not rows:
        return x.new_zeros(x.shape)
    return torch.stack(rows).to(x.dtype)
