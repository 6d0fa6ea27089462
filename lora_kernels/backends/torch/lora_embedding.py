"""The torch backend of the ``lora_embedding`` family (PEFT's ``lora.Embedding``), in stock ops.

Launcher signatures: ``lora_kernels.backends.LoraEmbeddingLaunchers``. The adapters come stacked,
``lora_a [L, R, V]`` and ``lora_b [L, D, R]``, with ``row_ids`` None (every row runs adapter 0)
or one adapter per row (-1: the base embedding only).

Forward, one adapter: two gathers (``E[ids]`` and ``S = A^T[ids]``) and one ``addmm`` that adds
``scale * S B^T`` into the gathered rows, where PEFT writes the LoRA product, its scaled copy and
the sum as three ``[M, D]`` tensors. The ops are differentiable, so in eager mode stock autograd
runs the backward (``F.embedding``'s sparse-row gradient into A, with ``padding_idx`` rows
skipped as ``nn.Embedding`` skips them); :func:`lora_embedding_bwd` is the same backward written
out, for the compiled op and the other backends' tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _pad(padding_idx: int) -> int | None:
    return None if padding_idx < 0 else padding_idx


def lora_embedding_fwd(ids, weight, lora_a, lora_b, scales, row_ids=None, padding_idx=-1):
    pad = _pad(padding_idx)
    adt = lora_a.dtype
    base = F.embedding(ids, weight, pad)
    if adt != weight.dtype:
        base = base.to(adt)
    if row_ids is None:
        s = F.embedding(ids, lora_a[0].T, pad)
        y = torch.addmm(base, s, lora_b[0].T, alpha=scales[0])
    else:
        aid = row_ids.long()
        s = lora_a.transpose(1, 2)[aid.clamp(min=0), ids]
        if pad is not None:  # the padding row's value counts, its gradient does not
            s = torch.where((ids == pad)[:, None], s.detach(), s)
        s = s * (aid >= 0)[:, None].to(adt)
        y = base
        for a in range(lora_a.shape[0]):
            rows = (aid == a).nonzero().squeeze(1)
            if rows.numel():
                y = y.index_add(0, rows, s[rows] @ lora_b[a].T, alpha=scales[a])
    return y.to(weight.dtype), s.float()


def lora_embedding_bwd(
    dy,
    ids,
    weight,
    lora_a,
    lora_b,
    scales,
    row_ids,
    s,
    padding_idx=-1,
    *,
    needs_da=True,
    needs_db=True,
):
    adt = lora_a.dtype
    num, r, v = lora_a.shape
    dyl = dy.to(adt)
    sl = s.to(adt)
    keep = ids != padding_idx if padding_idx >= 0 else None
    da = db = None
    if needs_da:
        da_t = torch.zeros((num, v, r), dtype=adt, device=dy.device)
    if needs_db:
        db = torch.zeros(lora_b.shape, dtype=adt, device=dy.device)
    if row_ids is None:
        groups = [(0, None)]
    else:
        aid = row_ids.long()
        groups = [(a, (aid == a).nonzero().squeeze(1)) for a in range(num)]
    for a, rows in groups:
        g_dy = dyl if rows is None else dyl[rows]
        if g_dy.shape[0] == 0:
            continue
        g_ids = ids if rows is None else ids[rows]
        if needs_da:
            t = torch.mm(g_dy, lora_b[a]).mul_(scales[a])
            if keep is not None:
                t = t * (keep if rows is None else keep[rows])[:, None].to(adt)
            da_t[a].index_add_(0, g_ids, t)
        if needs_db:
            g_s = sl if rows is None else sl[rows]
            db[a] = torch.mm(g_dy.T, g_s).mul_(scales[a])
    if needs_da:
        da = da_t.transpose(1, 2).contiguous()
    return da, db
