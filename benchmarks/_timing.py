"""Timing and set-up helpers shared by the CUDA-kernel benchmarks (bench_cuda, bench_merge)."""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from pathlib import Path

import torch


def time_call(fn, cuda: bool, quick: bool) -> dict:
    """Median and 20/80 percentiles of one call, in microseconds.

    On CUDA: ``triton.testing.do_bench`` (it clears the L2 cache before each call); on CPU: a
    wall-clock loop of at least 5 calls and 0.2 s (quick) or 1 s.
    """
    if cuda:
        from triton.testing import do_bench

        rep = 30 if quick else 100
        p50, p20, p80 = do_bench(fn, warmup=10, rep=rep, quantiles=[0.5, 0.2, 0.8])
        return {"median_us": p50 * 1e3, "p20_us": p20 * 1e3, "p80_us": p80 * 1e3}
    fn()
    samples = []
    t_end = time.perf_counter() + (0.2 if quick else 1.0)
    while len(samples) < 5 or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    q = statistics.quantiles(samples, n=5)
    return {
        "median_us": statistics.median(samples) * 1e6,
        "p20_us": q[0] * 1e6,
        "p80_us": q[3] * 1e6,
    }


def copy_bandwidth(device: torch.device, cuda: bool, quick: bool) -> float:
    """Bytes read + written per second by a large device copy."""
    numel = (1 << 29) if cuda else (1 << 26)  # 1 GiB of bf16 on a GPU, 128 MiB on a CPU
    src = torch.empty(numel, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    t = time_call(lambda: dst.copy_(src), cuda, quick)["median_us"] * 1e-6
    return 2 * src.numel() * src.element_size() / t


def slug(name: str) -> str:
    """A provider's name as a JSON key."""
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower()


def setup(doc: str, argv: list[str] | None):
    """Parse ``--out``/``--quick``, seed, and pick the device: ``(args, cuda, device, name)``."""
    parser = argparse.ArgumentParser(description=doc.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, help="JSON path (default: benchmarks/results/)")
    parser.add_argument("--quick", action="store_true", help="shorter timing runs")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    return args, cuda, device, name


def report(result: dict, table: str, missing: dict, out: Path) -> None:
    """Print the table and what was not measured, and write ``result`` as JSON to ``out``."""
    bandwidth = result["copy_bandwidth_GBps"]
    print(f"{result['device']}: copy bandwidth {bandwidth:.0f} GB/s (read + write)")
    print(table)
    for name, why in missing.items():
        print(f"{name}: not measured ({why})")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
