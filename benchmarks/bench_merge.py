"""In-place merge ``W += scale * B @ A``: CUDA C++ against Triton, torch ``addmm_`` and a copy.

A merge reads and writes W once; B @ A is a rank-r product computed on the fly, so the figure of
merit is the bandwidth counting W's bytes twice (read + write), as a share of the copy bandwidth
measured in the same run (``dst.copy_(src)``, read + write). The issue's target (one H200, bf16):
a 4096 x 4096 merge at >= 80 % of copy bandwidth.

Providers: ``cuda`` (lora_kernels.backends.cuda.merge.merge_), ``triton``
(lora_kernels.backends.triton.merge, when present), ``torch_addmm``
(``W.addmm_(B, A, alpha=scale)``: cuBLAS, which rounds the product to W's dtype before the add,
so it is the speed reference, not an exact merge). CUDA times are medians of
``triton.testing.do_bench`` (L2 cleared before every call); on a CPU only the torch path runs,
timed with ``Timer.blocked_autorange`` (``lora_kernels.bench.time_call``).

    python benchmarks/bench_merge.py [--out PATH] [--quick]

Prints a table and writes JSON (device, date, versions, copy bandwidth, rows).
"""

from __future__ import annotations

import datetime
import functools
import importlib
import sys
from pathlib import Path

import torch
from _timing import copy_bandwidth, report, setup, slug, time_us

RESULTS = Path(__file__).resolve().parent / "results"
# (N, K, r): square attention projections, the MLP's up and down projections, higher ranks.
SHAPES = [(4096, 4096, 16), (14336, 4096, 16), (4096, 14336, 16), (4096, 4096, 64)]
CPU_SHAPES = [(1024, 1024, 16), (4096, 4096, 16)]
DTYPE = torch.bfloat16
# Small enough that thousands of timed merges leave W's magnitude where it was.
SCALE = 1e-3


def _providers(cuda: bool):
    """name -> merge_(weight, lora_a, lora_b, scale), and the reason for each one missing."""
    found, missing = {}, {}
    if cuda:
        from lora_kernels.backends.cuda import build
        from lora_kernels.backends.cuda import lora_linear as cuda_linear
        from lora_kernels.backends.cuda import merge as cuda_merge

        if cuda_linear.available():
            found["cuda"] = cuda_merge.merge_
        else:
            missing["cuda"] = build.extension_status()
        try:
            found["triton"] = importlib.import_module("lora_kernels.backends.triton.merge").merge_
        except Exception as exc:  # the Triton backend is optional
            missing["triton"] = f"{type(exc).__name__}: {exc}"
    else:
        missing["cuda"] = missing["triton"] = "no CUDA device"
    found["torch_addmm"] = lambda w, a, b, s: w.addmm_(b, a, alpha=s)
    return found, missing


def bench(device, cuda, quick, copy_bw, providers) -> list[dict]:
    rows = []
    for n, k, r in SHAPES if cuda else CPU_SHAPES:
        w = torch.randn(n, k, device=device, dtype=DTYPE)
        a = torch.randn(r, k, device=device, dtype=DTYPE) / r**0.5
        b = torch.randn(n, r, device=device, dtype=DTYPE) / r**0.5
        moved = 2 * w.numel() * w.element_size()
        row = {"N": n, "K": k, "r": r, "dtype": str(DTYPE)}
        for name, fn in providers.items():
            t = time_us(functools.partial(fn, w, a, b, SCALE), cuda, quick)
            bw = moved / (t["median_us"] * 1e-6)
            row[name] = {**t, "GBps": bw / 1e9, "pct_copy_bw": 100 * bw / copy_bw}
        if "cuda" in row and (n, k) == (4096, 4096):
            row["meets_target"] = row["cuda"]["pct_copy_bw"] >= 80
        rows.append(row)
    return rows


def _table(rows: list[dict], names: list[str]) -> str:
    head = f"{'N':>6} {'K':>6} {'r':>4} " + " ".join(f"{n:>22}" for n in names)
    lines = [head, "-" * len(head)]
    for row in rows:
        cells = []
        for name in names:
            t = row.get(name)
            cells.append(
                f"{t['median_us']:9.1f}us {t['pct_copy_bw']:5.1f}%BW" if t else f"{'-':>22}"
            )
        lines.append(f"{row['N']:>6} {row['K']:>6} {row['r']:>4} " + " ".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args, cuda, device, device_name = setup(__doc__, argv)
    providers, missing = _providers(cuda)
    copy_bw = copy_bandwidth(device, cuda, args.quick)
    rows = bench(device, cuda, args.quick, copy_bw, providers)

    from lora_kernels.backends.cuda import build

    result = {
        "benchmark": "bench_merge",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cuda_extension": build.extension_status(),
        "copy_bandwidth_GBps": copy_bw / 1e9,
        "scale": SCALE,
        "missing_providers": missing,
        "rows": rows,
    }
    out = args.out or RESULTS / f"bench_merge_{slug(device_name)}.json"
    report(result, _table(rows, list(providers)), missing, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
