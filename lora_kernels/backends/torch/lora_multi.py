"""The torch backend of multi-adapter LoRA: a different adapter per row, with stock PyTorch ops.

Used on CPU (and for float64, and wherever Triton is missing), with the family's launcher
signatures (``lora_kernels.backends.LoraMultiLaunchers``). Stacks and ids::

    x [M, K], weight [N, K], bias [N] or None, lora_a [L, r_max, K], lora_b [L, N, r_max],
    scales [L] float32, row_ids [M] (-1 or any id outside [0, L): base layer only),
    ranks [L] int32 or None (adapter a uses the first ranks[a] of its r_max slots)

    y[i] = x[i] @ weight.T + bias + scales[a] * (x[i] @ lora_a[a].T) @ lora_b[a].T,  a = row_ids[i]

The base GEMM is one ``addmm`` over all rows in the input dtype; the LoRA terms run in fp32 (they
are ``r / N`` of the work) and are rounded once when added to their rows; ``s`` is kept in fp32
(fp64 for fp64 inputs) for the backward.
Two ways to compute the LoRA terms, chosen per call from the ids (this is the CPU path, where
reading the ids costs no device synchronisation):

* ``segment``: sort the rows by adapter and run two small GEMMs per adapter that some row uses.
  A Python loop over *distinct adapters* (never over rows); each step is ~2 GEMMs on a contiguous
  block, so its overhead (~40 us) is paid once per adapter, not per row.
* ``gather``: gather every row's adapter weights (``lora_a[ids]``, ``lora_b[ids]``) and run
  batched mat-vecs with ``bmm``. One call whatever the number of adapters, but it copies
  ``r_max * (K + N)`` weights per row.

``gather`` wins only on small scattered batches and loses badly once rows share adapters
(``benchmarks/results/torch_backend_cpu.md`` has the measurements). So it runs only when rows hardly
share adapters (at most ``_GATHER_ROWS_PER_ADAPTER`` rows per used adapter on average) and its
copies are small (``_GATHER_MAX_ELEMENTS`` weights), i.e. small decode batches; ``segment``
otherwise.

Off the CPU (this path forced on CUDA, or float64 there) reading the ids would synchronise the
host with the device on every call, so the ids are never read there: every row gathers its
adapter's weights (``gather`` over all rows, in chunks of at most ``_GATHER_MAX_ELEMENTS`` gathered
weights; rows with no adapter get a zero term), the same ops whatever the ids.
"""

from __future__ import annotations

import torch

_GATHER_ROWS_PER_ADAPTER = 1.5
_GATHER_MAX_ELEMENTS = 1 << 21


def _reads_ids(device: torch.device) -> bool:
    """Whether the ids may be read on the host to plan the call (on CPU: free; elsewhere a
    synchronisation, never done)."""
    return device.type == "cpu"


def _dense_rows(row_ids: torch.Tensor, num_adapters: int, scales: torch.Tensor):
    """``(adapters, valid, row_scales)`` for every row, from device ops only: each row's adapter
    (0 where it has none, masked out by ``valid``) and its scale (0 where it has none)."""
    ids = row_ids.long()
    valid = (ids >= 0) & (ids < num_adapters)
    adapters = torch.where(valid, ids, 0)
    row_scales = torch.where(valid, scales[adapters], 0.0)
    return adapters, valid, row_scales


def _chunks(m: int, r_max: int, k: int, n: int):
    rows = max(1, _GATHER_MAX_ELEMENTS // max(1, r_max * (k + n)))
    for start in range(0, m, rows):
        yield slice(start, min(m, start + rows))


def _plan(row_ids: torch.Tensor, num_adapters: int, r_max: int, k: int, n: int):
    """Group the rows by adapter and pick the strategy.

    Returns ``(strategy, rows, adapters, counts)``: the rows with a valid id sorted by adapter
    (stable, so each adapter's rows keep their order), their ids, and the number of rows of each
    adapter as a list.
    """
    ids = row_ids.long()
    valid = (ids >= 0) & (ids < num_adapters)
    key = torch.where(valid, ids, num_adapters)
    sorted_key, order = torch.sort(key, stable=True)
    counts = torch.bincount(sorted_key, minlength=num_adapters + 1).tolist()[:num_adapters]
    used = sum(1 for c in counts if c)
    n_valid = sum(counts)
    gather = (
        n_valid <= _GATHER_ROWS_PER_ADAPTER * used
        and n_valid * r_max * (k + n) <= _GATHER_MAX_ELEMENTS
    )
    strategy = "gather" if gather else "segment"
    return strategy, order[:n_valid], sorted_key[:n_valid], counts


def _segments(rows: torch.Tensor, counts: list[int], ranks: torch.Tensor | None, r_max: int):
    """``(adapter, its rows, its rank)`` for each adapter with rows and a non-zero rank, from the
    rows sorted by adapter and the per-adapter row counts of ``_plan``. Only adapters with rows
    cost more than a skipped list entry: a stack may hold a thousand adapters (device slots)."""
    rank_of = None if ranks is None else ranks.tolist()
    start = 0
    for a, c in enumerate(counts):
        if not c:
            continue
        idx = rows[start : start + c]
        start += c
        r = r_max if rank_of is None else min(max(rank_of[a], 0), r_max)
        if r:
            yield a, idx, r


def _rank_mask(ranks: torch.Tensor | None, adapters: torch.Tensor, r_max: int):
    """[n, r_max] float mask of the slots each row's adapter really uses (None: all of them)."""
    if ranks is None:
        return None
    slots = torch.arange(r_max, device=adapters.device)
    return (slots < ranks.to(adapters.device).long()[adapters].unsqueeze(1)).float()


def lora_linear_multi_fwd(x, weight, bias, lora_a, lora_b, scales, row_ids, ranks=None):
    """``(y [M, N] in x.dtype, s [M, r_max])``; ``s`` rows with no adapter are zeros.

    ``s`` is float32 (float64 for float64 inputs, so that gradcheck sees exact gradients).
    """
    m, k = x.shape
    num_adapters, r_max, _ = lora_a.shape
    n = weight.shape[0]
    y = torch.addmm(bias, x, weight.T) if bias is not None else x @ weight.T
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    s = torch.zeros((m, r_max), dtype=acc, device=x.device)
    if not _reads_ids(x.device):
        scales = scales.to(device=x.device, dtype=acc)
        adapters, valid, row_scales = _dense_rows(row_ids, num_adapters, scales)
        mask = _rank_mask(ranks, adapters, r_max)
        for rows in _chunks(m, r_max, k, n):
            ad = adapters[rows]
            sa = torch.bmm(lora_a[ad].to(acc), x[rows].to(acc).unsqueeze(2)).squeeze(2)
            if mask is not None:
                sa.mul_(mask[rows])
            sa = torch.where(valid[rows, None], sa, 0.0)
            term = torch.bmm(lora_b[ad].to(acc), (sa * row_scales[rows, None]).unsqueeze(2))
            y[rows] += term.squeeze(2).to(y.dtype)
            s[rows] = sa
        return y, s
    strategy, rows, adapters, counts = _plan(row_ids, num_adapters, r_max, k, n)
    if rows.numel() == 0:
        return y, s
    scales = scales.to(device=x.device, dtype=acc)
    if strategy == "gather":
        xa = x.index_select(0, rows).to(acc)
        sa = torch.bmm(lora_a[adapters].to(acc), xa.unsqueeze(2)).squeeze(2)  # [n, r]
        mask = _rank_mask(ranks, adapters, r_max)
        if mask is not None:
            sa.mul_(mask)
        term = torch.bmm(lora_b[adapters].to(acc), (sa * scales[adapters, None]).unsqueeze(2))
        y.index_add_(0, rows, term.squeeze(2).to(y.dtype))
        s.index_copy_(0, rows, sa)
        return y, s
    for a, idx, r in _segments(rows, counts, ranks, r_max):
        sa = x.index_select(0, idx).to(acc) @ lora_a[a, :r].to(acc).T  # [c, r]
        term = (sa @ lora_b[a, :, :r].to(acc).T).mul_(scales[a])
        y.index_add_(0, idx, term.to(y.dtype))
        s[idx, :r] = sa
    return y, s


def lora_linear_multi_bwd(
    dy,
    x,
    weight,
    lora_a,
    lora_b,
    scales,
    row_ids,
    s,
    ranks=None,
    *,
    needs_dx=True,
    needs_da=True,
    needs_db=True,
):
    """``(dx [M, K], da [L, r_max, K], db [L, N, r_max])``, None where not needed.

    Each adapter's gradient sums exactly the rows that used it (zeros for an adapter no row used,
    and for the padded slots past ``ranks``); rows with no adapter get ``dy @ weight`` only.
    """
    k = x.shape[1]
    num_adapters, r_max, _ = lora_a.shape
    n = weight.shape[0]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    dx = dy @ weight if needs_dx else None
    da = torch.zeros(lora_a.shape, dtype=lora_a.dtype, device=x.device) if needs_da else None
    db = torch.zeros(lora_b.shape, dtype=lora_b.dtype, device=x.device) if needs_db else None
    if not (needs_dx or needs_da or needs_db):
        return dx, da, db
    if not _reads_ids(x.device):
        _dense_bwd(dy, x, lora_a, lora_b, scales, row_ids, s, ranks, dx, da, db, acc)
        return dx, da, db
    strategy, rows, adapters, counts = _plan(row_ids, num_adapters, r_max, k, n)
    if rows.numel() == 0:
        return dx, da, db
    scales = scales.to(device=x.device, dtype=acc)
    if strategy == "gather":
        dya = dy.index_select(0, rows).to(acc)
        sc = scales[adapters, None]
        ga = lora_a[adapters].to(acc)  # [n, r, K]
        t = torch.bmm(dya.unsqueeze(1), lora_b[adapters].to(acc)).squeeze(1)  # [n, r]
        mask = _rank_mask(ranks, adapters, r_max)
        if mask is not None:
            t.mul_(mask)
        t.mul_(sc)
        if needs_dx:
            dx.index_add_(0, rows, torch.bmm(t.unsqueeze(1), ga).squeeze(1).to(dx.dtype))
        if needs_da:
            xa = x.index_select(0, rows).to(acc)
            grad = torch.zeros(lora_a.shape, dtype=acc, device=x.device)
            grad.index_add_(0, adapters, t.unsqueeze(2) * xa.unsqueeze(1))
            da.copy_(grad)
        if needs_db:
            sa = s.index_select(0, rows).to(acc)
            if mask is not None:
                sa.mul_(mask)
            grad = torch.zeros(lora_b.shape, dtype=acc, device=x.device)
            grad.index_add_(0, adapters, (dya * sc).unsqueeze(2) * sa.unsqueeze(1))
            db.copy_(grad)
        return dx, da, db
    for a, idx, r in _segments(rows, counts, ranks, r_max):
        sc = scales[a]
        dya = dy.index_select(0, idx).to(acc)
        if needs_dx or needs_da:
            t = (dya @ lora_b[a, :, :r].to(acc)).mul_(sc)  # [c, r], scaled once here
        if needs_dx:
            dx.index_add_(0, idx, (t @ lora_a[a, :r].to(acc)).to(dx.dtype))
        if needs_da:
            da[a, :r] = t.T @ x.index_select(0, idx).to(acc)
        if needs_db:
            db[a, :, :r] = (dya.T @ s.index_select(0, idx)[:, :r].to(acc)).mul_(sc)
    return dx, da, db


def _dense_bwd(dy, x, lora_a, lora_b, scales, row_ids, s, ranks, dx, da, db, acc):
    """The backward of the dense (id-blind) forward into ``dx``/``da``/``db`` (None: not
    needed): every row gathers its adapter's weights, rows with no adapter add zeros."""
    m, k = x.shape
    num_adapters, r_max, _ = lora_a.shape
    n = lora_b.shape[1]
    scales = scales.to(device=x.device, dtype=acc)
    adapters, valid, row_scales = _dense_rows(row_ids, num_adapters, scales)
    mask = _rank_mask(ranks, adapters, r_max)
    grad_a = torch.zeros(lora_a.shape, dtype=acc, device=x.device) if da is not None else None
    grad_b = torch.zeros(lora_b.shape, dtype=acc, device=x.device) if db is not None else None
    for rows in _chunks(m, r_max, k, n):
        ad = adapters[rows]
        ok = valid[rows, None]
        sc = row_scales[rows, None]
        dya = dy[rows].to(acc)
        if dx is not None or grad_a is not None:
            t = torch.bmm(dya.unsqueeze(1), lora_b[ad].to(acc)).squeeze(1)  # [c, r]
            if mask is not None:
                t.mul_(mask[rows])
            t = torch.where(ok, t * sc, 0.0)
            if dx is not None:
                dx[rows] += torch.bmm(t.unsqueeze(1), lora_a[ad].to(acc)).squeeze(1).to(dx.dtype)
            if grad_a is not None:
                grad_a.index_add_(0, ad, t.unsqueeze(2) * x[rows].to(acc).unsqueeze(1))
        if grad_b is not None:
            sa = s[rows].to(acc)
            if mask is not None:
                sa = sa * mask[rows]
            grad_b.index_add_(0, ad, torch.where(ok, dya * sc, 0.0).unsqueeze(2) * sa.unsqueeze(1))
    if da is not None:
        da.copy_(grad_a)
    if db is not None:
        db.copy_(grad_b)
