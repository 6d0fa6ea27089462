"""The torch backend of the ``lora_embedding`` family (PEFT's ``lora.Embedding``), in stock ops.

Launcher signatures: ``lora_kernels.backends.LoraEmbeddingLaunchers``. The adapters come stacked,
``lora_a [L, R, V]`` and ``lora_b [L, D, R]``, with ``row_ids`` None (every row runs adapter 0)
or one adapter per row (-1: the base embedding only).

Forward, one adapter: two gathers (``E[ids]`` and ``S = A^T[ids]``) and one ``addmm`` that adds
``scale * S B^T`` into the gathered rows, where PEFT writes the LoRA product, its scaled copy and
the sum as three ``[M, D]`` tensors. Backward (:func:`lora_embedding_bwd`): ``T = scale * dy B``
scattered into the M columns of a zeroed ``[r, V]`` gradient of A (``padding_idx`` rows skipped,
as ``nn.Embedding`` skips them), one pass over A's size where the stock gather backward makes
three (fill a ``[V, r]`` buffer, then autograd's transposed copy); ``dB = scale * dy^T S``.

``scales``: one adapter's float in a sequence, or a mixed batch's ``[L]`` tensor (or sequence).
Off the CPU a tensor of scales is never read on the host in the forward: each adapter's term is
scaled by a device op, in fp32 (the scale is not rounded to a 16-bit adapter dtype). The
backward, which looks up each adapter's rows on the host anyway, reads the scales there too.
"""

from __future__ import annotations

import torch


def _host_scales(scales) -> list[float]:
    """The scales as host floats (a tensor: read back, a synchronisation off the CPU)."""
    return scales.tolist() if isinstance(scales, torch.Tensor) else [float(v) for v in scales]


def _reads_ids(device: torch.device) -> bool:
    """Whether the adapter ids may be read on the host (on CPU: free; elsewhere a sync)."""
    return device.type == "cpu"


def lora_embedding_fwd(ids, weight, lora_a, lora_b, scales, row_ids=None, padding_idx=-1):
    # padding_idx only changes gradients, which lora_embedding_bwd computes: the forward is two
    # plain gathers (aten's embedding, without F.embedding's Python wrapper: decode-sized calls
    # are Python-bound on a CPU).
    adt = lora_a.dtype
    base = torch.embedding(weight, ids)
    if adt != weight.dtype:
        base = base.to(adt)
    if row_ids is None:
        s = torch.embedding(lora_a[0].T, ids)
        y = torch.addmm(base, s, lora_b[0].T, alpha=_host_scales(scales[:1])[0])
    else:
        aid = row_ids.long()
        s = lora_a.transpose(1, 2)[aid.clamp(min=0), ids]
        s = s * (aid >= 0)[:, None].to(adt)
        y = base
        if _reads_ids(ids.device):
            for a, scale in enumerate(_host_scales(scales)):
                rows = (aid == a).nonzero().squeeze(1)
                if rows.numel():
                    y = y.index_add(0, rows, s[rows] @ lora_b[a].T, alpha=scale)
        else:
            # Off the CPU neither each adapter's rows nor the scales are read on the host (a
            # synchronisation each): every adapter's term is computed for all rows, scaled by
            # a device op in fp32 (fp64 for fp64) and kept where it applies (decode-sized
            # batches), the sum rounded once.
            acc = torch.promote_types(adt, torch.float32)
            y = base.to(acc)
            for a in range(lora_a.shape[0]):
                term = torch.mm(s, lora_b[a].T).to(acc).mul_(scales[a])
                y = y + torch.where((aid == a)[:, None], term, 0.0)
    if y.dtype != weight.dtype:
        y = y.to(weight.dtype)
    return y, s if s.dtype == torch.float32 else s.float()


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
    num = lora_a.shape[0]
    dyl = dy.to(adt)
    sl = s.to(adt)
    keep = ids != padding_idx if padding_idx >= 0 else None
    scales = _host_scales(scales)
    da = db = None
    if needs_da:
        # Straight into A's [r, V] layout: one zero fill and a scatter of M columns, where the
        # gather's stock backward fills a [V, r] buffer that autograd then copies transposed.
        da = torch.zeros(lora_a.shape, dtype=adt, device=dy.device)
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
                mine = keep if rows is None else keep[rows]
                t, g_ids = t[mine], g_ids[mine]
            da[a].index_add_(1, g_ids, t.T)
        if needs_db:
            g_s = sl if rows is None else sl[rows]
            db[a] = torch.mm(g_dy.T, g_s).mul_(scales[a])
    return da, db
