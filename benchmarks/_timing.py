"""Set-up and report helpers shared by the kernel benchmarks (bench_cuda, bench_merge,
bench_qlora); the timing and the result files are ``lora_kernels.bench``'s."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

from lora_kernels import bench


def time_us(fn, cuda: bool, quick: bool) -> dict:
    """``lora_kernels.bench.time_call`` in microseconds, 0.2 s (quick) or 1 s of calls on a CPU."""
    t = bench.time_call(fn, cuda=cuda, seconds=0.2 if quick else 1.0, rep_ms=30 if quick else 100)
    return bench.in_units(t, "us")


def copy_bandwidth(device: torch.device, cuda: bool, quick: bool) -> float:
    """Bytes read + written per second by a large device copy."""
    numel = (1 << 29) if cuda else (1 << 26)  # 1 GiB of bf16 on a GPU, 128 MiB on a CPU
    src = torch.empty(numel, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    t = time_us(lambda: dst.copy_(src), cuda, quick)["median_us"] * 1e-6
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


def report(result: dict, table: str, missing: dict, out: Path, rows: list | None = None) -> None:
    """Print the table and what was not measured, and write ``result`` in the shared schema
    (``lora_kernels.bench.write_results``): ``rows``, or else the timings found in ``result``,
    as rows; all of ``result`` as details."""
    bandwidth = result["copy_bandwidth_GBps"]
    print(f"{result['device']}: copy bandwidth {bandwidth:.0f} GB/s (read + write)")
    print(table)
    for name, why in missing.items():
        print(f"{name}: not measured ({why})")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = bench.timing_rows(result) if rows is None else rows
    paths = bench.write_results(out, result["benchmark"], rows, device=device, details=result)
    print(f"wrote {paths[0]} and {paths[1]}")
