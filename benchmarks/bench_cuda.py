"""Decode-size LoRA linear: the CUDA C++ kernel against Triton, naive PyTorch and cuBLAS base-only.

    y = x @ W.T + bias + scale * (x @ A.T) @ B.T,   x [M, K], W [N, K], r = 16, bf16

With M <= 64 the layer is a stream of W from memory, so the figure of merit is the bandwidth
achieved counting W's bytes only, as a share of the copy bandwidth measured in the same run
(``dst.copy_(src)``, read + write). The issue's targets (one H200): >= 85 % of copy bandwidth,
<= 1.05x the time of cuBLAS base-only ``x @ W.T + bias``, >= 1.5x faster than naive PyTorch
(three GEMMs and an add). One multi-adapter row too: 64 rows, each with its own rank-16 adapter,
against the single-adapter kernel on the same rows (target <= 1.15x).

Providers: ``cuda`` (lora_kernels.backends.cuda), ``triton`` (the launchers of
lora_kernels.backends.triton),
``torch_naive``, ``cublas_base``. CUDA times are medians of ``triton.testing.do_bench``, which
clears the L2 cache before every call (a decode step meets W cold: one layer's W never stays in
L2 across the model); on CPU (no CUDA, no Triton) the torch rows are timed with
``torch.utils.benchmark.Timer.blocked_autorange`` (``lora_kernels.bench.time_call``).

    python benchmarks/bench_cuda.py [--out PATH] [--quick]

Prints a table and writes JSON (device, date, versions, copy bandwidth, rows).
"""

from __future__ import annotations

import datetime
import functools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from _timing import copy_bandwidth, report, setup, slug, time_us

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = [(4096, 4096), (4096, 14336)]  # (K, N)
ROWS = [1, 8, 32]
RANK = 16
DTYPE = torch.bfloat16


def _providers(device: torch.device, cuda: bool):
    """name -> launcher with the lora_linear_fwd signature, or the reason it is missing."""
    found, missing = {}, {}
    if cuda:
        from lora_kernels.backends.cuda import build
        from lora_kernels.backends.cuda import lora_linear as cuda_linear

        if cuda_linear.available():
            found["cuda"] = cuda_linear.lora_linear_fwd
        else:
            missing["cuda"] = build.extension_status()
        try:
            from lora_kernels.backends.triton.lora_linear import lora_linear_fwd as triton_fwd

            found["triton"] = triton_fwd
        except Exception as exc:  # the Triton backend is optional
            missing["triton"] = f"{type(exc).__name__}: {exc}"
    else:
        missing["cuda"] = missing["triton"] = "no CUDA device"
    found["torch_naive"] = lambda x, w, b, a, bb, s: F.linear(x, w, b) + s * ((x @ a.T) @ bb.T)
    found["cublas_base"] = lambda x, w, b, a, bb, s: F.linear(x, w, b)
    return found, missing


def bench_single(device, cuda, quick, copy_bw, providers) -> list[dict]:
    rows = []
    for k, n in SHAPES:
        w = torch.randn(n, k, device=device, dtype=DTYPE) / k**0.5
        bias = torch.randn(n, device=device, dtype=DTYPE)
        a = torch.randn(RANK, k, device=device, dtype=DTYPE) / k**0.5
        b = torch.randn(n, RANK, device=device, dtype=DTYPE) / RANK**0.5
        w_bytes = w.numel() * w.element_size()
        for m in ROWS:
            x = torch.randn(m, k, device=device, dtype=DTYPE)
            row = {"kind": "single", "M": m, "K": k, "N": n, "r": RANK, "dtype": str(DTYPE)}
            for name, fn in providers.items():
                t = time_us(functools.partial(fn, x, w, bias, a, b, 2.0), cuda, quick)
                bw = w_bytes / (t["median_us"] * 1e-6)
                row[name] = {**t, "W_GBps": bw / 1e9, "pct_copy_bw": 100 * bw / copy_bw}
            if "cuda" in row:
                t_cuda = row["cuda"]["median_us"]
                row["cuda_vs_cublas_base"] = t_cuda / row["cublas_base"]["median_us"]
                row["naive_vs_cuda_speedup"] = row["torch_naive"]["median_us"] / t_cuda
                row["meets_targets"] = (
                    row["cuda"]["pct_copy_bw"] >= 85
                    and row["cuda_vs_cublas_base"] <= 1.05
                    and row["naive_vs_cuda_speedup"] >= 1.5
                )
            rows.append(row)
    return rows


def bench_multi(device, cuda, quick, copy_bw) -> list[dict]:
    """64 rows, each its own rank-16 adapter (distinct ids), against single-adapter on the rows."""
    if not cuda:
        return []
    from lora_kernels.backends.cuda import lora_linear as cuda_linear
    from lora_kernels.backends.cuda import lora_multi as cuda_multi

    m = num_adapters = 64
    k = n = 4096
    w = torch.randn(n, k, device=device, dtype=DTYPE) / k**0.5
    bias = torch.randn(n, device=device, dtype=DTYPE)
    a = torch.randn(num_adapters, RANK, k, device=device, dtype=DTYPE) / k**0.5
    b = torch.randn(num_adapters, n, RANK, device=device, dtype=DTYPE) / RANK**0.5
    scales = torch.full((num_adapters,), 2.0, device=device)
    ids = torch.randperm(num_adapters, device=device).to(torch.int32)
    x = torch.randn(m, k, device=device, dtype=DTYPE)
    providers = {}
    if cuda_linear.available():
        providers["cuda_multi"] = lambda: cuda_multi.lora_linear_multi_fwd(
            x, w, bias, a, b, scales, ids
        )
        providers["cuda_single"] = lambda: cuda_linear.lora_linear_fwd(x, w, bias, a[0], b[0], 2.0)
    try:
        from lora_kernels.backends.triton.lora_multi import lora_linear_multi_fwd as triton_multi

        providers["triton_multi"] = lambda: triton_multi(x, w, bias, a, b, scales, ids)
    except Exception:  # the Triton backend is optional
        pass
    row = {"kind": "multi", "M": m, "K": k, "N": n, "r": RANK, "L": num_adapters}
    w_bytes = w.numel() * w.element_size()
    for name, fn in providers.items():
        t = time_us(fn, cuda, quick)
        bw = w_bytes / (t["median_us"] * 1e-6)
        row[name] = {**t, "W_GBps": bw / 1e9, "pct_copy_bw": 100 * bw / copy_bw}
    if "cuda_multi" in row:
        ratio = row["cuda_multi"]["median_us"] / row["cuda_single"]["median_us"]
        row["multi_vs_single"] = ratio
        row["meets_targets"] = ratio <= 1.15
    return [row]


def _table(rows: list[dict], names: list[str]) -> str:
    head = f"{'kind':6} {'M':>3} {'K':>5} {'N':>6} " + " ".join(f"{n:>22}" for n in names)
    lines = [head, "-" * len(head)]
    for row in rows:
        cells = []
        for name in names:
            t = row.get(name)
            cells.append(
                f"{t['median_us']:9.1f}us {t['pct_copy_bw']:5.1f}%BW" if t else f"{'-':>22}"
            )
        lines.append(
            f"{row['kind']:6} {row['M']:>3} {row['K']:>5} {row['N']:>6} " + " ".join(cells)
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args, cuda, device, device_name = setup(__doc__, argv)
    providers, missing = _providers(device, cuda)
    copy_bw = copy_bandwidth(device, cuda, args.quick)
    rows = bench_single(device, cuda, args.quick, copy_bw, providers)
    rows += bench_multi(device, cuda, args.quick, copy_bw)

    from lora_kernels.backends.cuda import build

    result = {
        "benchmark": "bench_cuda",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cuda_extension": build.extension_status(),
        "copy_bandwidth_GBps": copy_bw / 1e9,
        "missing_providers": missing,
        "rows": rows,
    }
    names = list(providers) + ["cuda_multi", "cuda_single", "triton_multi"]
    names = [n for n in names if any(n in row for row in rows)]
    out = args.out or RESULTS / f"bench_cuda_{slug(device_name)}.json"
    report(result, _table(rows, names), missing, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
