"""Multi-adapter batches: what does a different adapter per row cost?

Providers, on the same rows, weights and ids:

* ``lora_linear_multi``  ``lk.lora_linear_multi`` (backend auto: torch on CPU, Triton on CUDA;
  plus ``lora_linear_multi[cuda]`` where the CUDA extension is built)
* ``PEFT loop``          PEFT's own ``lora.Linear`` forward with ``adapter_names``: the base GEMM,
  then a Python loop over the adapters present, one sub-batch each (needs peft)
* ``gather+bmm``         every row gathers its adapter's A and B, then two ``bmm`` (skipped where
  the gathered copies would pass ``--gather-max-gib``)
* ``single fused``       ``lk.lora_linear`` with one adapter for every row: the cost of LoRA
  without the mixing, the bar for ``lora_linear_multi``
* ``base``               ``F.linear``: no adapter at all

Axes: batch "popularity" (distinct, uniform, zipf, identical, skewed, all -1), rows 1..4096,
adapters L in {1, 8, 32, 128}, ranks 8..128 (each a sweep around a decode and a prefill point)
and the issue's two targets (bf16, K = N = 4096): decode, 64 rows each with its own rank-16
adapter, multi <= 1.15x single and >= 5x faster than PEFT; prefill, 4096 rows over 8 adapters,
multi <= 1.10x single.

Timing: on CUDA ``triton.testing.do_bench`` (median with 20th/80th percentiles, L2 flushed); on
CPU the package's round-robin timer (``lora_kernels.bench``). ``--backward`` times forward +
backward (gradients of x and of the adapter weights) instead of the forward.

    python benchmarks/bench_multi.py --quick                  # CPU, < 1 minute
    python benchmarks/bench_multi.py --out benchmarks/results/multi_h200.json   # GPU, < 1.5 min

Writes a table to stdout, and with ``--out`` the JSON rows (with the device and versions) and a
PNG plot beside it (when matplotlib is installed).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import lora_kernels as lk
from lora_kernels.bench import (
    device_name,
    in_units,
    time_call,
    time_side_by_side,
    timing_rows,
    write_results,
)
from lora_kernels.models.config import lora_scaling

POPULARITIES = ["distinct", "uniform", "zipf", "identical", "skewed", "all_base"]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def adapter_ids(popularity: str, m: int, num_adapters: int, gen: torch.Generator) -> torch.Tensor:
    """Each row's adapter for a batch popularity; -1 = base layer only."""
    if popularity == "distinct":  # as many different adapters as possible
        return torch.randperm(max(m, num_adapters), generator=gen)[:m] % num_adapters
    if popularity == "uniform":
        return torch.randint(0, num_adapters, (m,), generator=gen)
    if popularity == "zipf":  # a few popular adapters and a long tail (exponent 1.5)
        weights = 1.0 / torch.arange(1, num_adapters + 1, dtype=torch.float64) ** 1.5
        return torch.multinomial(weights, m, replacement=True, generator=gen)
    if popularity == "identical":
        return torch.zeros(m, dtype=torch.int64)
    if popularity == "skewed":  # one adapter for 3/4 of the rows, the rest uniform
        ids = torch.randint(0, num_adapters, (m,), generator=gen)
        ids[torch.rand(m, generator=gen) < 0.75] = 0
        return ids
    if popularity == "all_base":
        return torch.full((m,), -1, dtype=torch.int64)
    raise ValueError(f"unknown popularity {popularity!r}")


def sweep(quick: bool) -> list[dict]:
    """The configurations: (sweep name, popularity, rows, L, rank)."""
    if quick:
        decode, prefill = 64, 1024
        rows_axis, l_axis, r_axis = [1, 16, 256, 1024], [1, 32], [8, 64]
        targets = []
    else:
        decode, prefill = 64, 4096
        rows_axis, l_axis, r_axis = [1, 4, 16, 64, 256, 1024, 4096], [1, 8, 32, 128], [8, 32, 128]
        targets = [
            ("target decode", "distinct", 64, 64, 16),
            ("target prefill", "uniform", 4096, 8, 16),
        ]
    # most wanted first: a run cut short by --max-seconds still has the targets and the decode
    configs = list(targets)
    configs += [("popularity", p, decode, 32, 16) for p in POPULARITIES]
    configs += [("rows", "uniform", m, 8, 16) for m in rows_axis]
    if not quick:
        configs += [("popularity", p, prefill, 32, 16) for p in POPULARITIES]
    configs += [("adapters", "uniform", prefill // 4, n, 16) for n in l_axis]
    configs += [("rank", "uniform", prefill // 4, 8, r) for r in r_axis]
    keys = ["sweep", "popularity", "rows", "L", "r"]
    return [dict(zip(keys, c, strict=True)) for c in configs]


def _peft_layer(base: nn.Linear, a: torch.Tensor, b: torch.Tensor, alpha: float):
    """PEFT's lora.Linear over ``base`` with adapters a0..a{L-1} holding ``a``/``b``."""
    try:
        import peft
        from peft.tuners.lora import Linear as PeftLinear
    except ImportError:
        return None
    num_adapters, r, _ = a.shape
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, init_lora_weights=False)
    layer = PeftLinear(copy.deepcopy(base), "a0", config=cfg, r=r, lora_alpha=alpha)
    for i in range(1, num_adapters):
        layer.update_layer(f"a{i}", r, alpha, config=cfg)
    layer = layer.to(device=a.device, dtype=a.dtype).eval()
    with torch.no_grad():
        for i in range(num_adapters):
            layer.lora_A[f"a{i}"].weight.copy_(a[i])
            layer.lora_B[f"a{i}"].weight.copy_(b[i])
    return layer


def providers(cfg, k, n, dtype, device, backward, gather_max_bytes):
    """name -> zero-argument callable, all on the same data; and the problem's FLOPs/bytes."""
    gen = torch.Generator().manual_seed(0)
    m, num_adapters, r = cfg["rows"], cfg["L"], cfg["r"]
    alpha = 2.0 * r
    scale = lora_scaling(alpha, r)
    base = nn.Linear(k, n, device=device, dtype=dtype).requires_grad_(False)
    x = torch.randn(m, k, dtype=dtype, device=device, requires_grad=backward)
    a = (torch.randn(num_adapters, r, k, device=device) / math.sqrt(k)).to(dtype)
    b = (torch.randn(num_adapters, n, r, device=device) * 0.02).to(dtype)
    a.requires_grad_(backward)
    b.requires_grad_(backward)
    scales = torch.full((num_adapters,), scale, device=device)
    ids_cpu = adapter_ids(cfg["popularity"], m, num_adapters, gen)
    ids = ids_cpu.to(device)
    dy = torch.randn(m, n, dtype=dtype, device=device)
    w, bias = base.weight, base.bias

    def run(fwd):
        if not backward:

            def call():
                with torch.no_grad():
                    fwd()

            return call

        def call():
            fwd().backward(dy)

        return call

    out = {
        "base": run(lambda: F.linear(x, w, bias)),
        "single fused": run(lambda: lk.lora_linear(x, w, bias, a[0], b[0], scale)),
        "lora_linear_multi": run(lambda: lk.lora_linear_multi(x, w, bias, a, b, scales, ids)),
    }
    if "cuda" in lk.available_backends() and x.is_cuda:
        out["lora_linear_multi[cuda]"] = run(
            lambda: lk.lora_linear_multi(x, w, bias, a, b, scales, ids, backend="cuda")
        )
    peft_layer = None if backward else _peft_layer(base, a.detach(), b.detach(), alpha)
    if peft_layer is not None:
        names = ["__base__" if i < 0 else f"a{i}" for i in ids_cpu.tolist()]
        out["PEFT loop"] = run(lambda: peft_layer(x, adapter_names=names))
    if m * r * (k + n) * x.element_size() <= gather_max_bytes:
        valid = (ids >= 0).to(dtype)[:, None]
        idc = ids.clamp(min=0)

        def gather_bmm():
            s = torch.bmm(a[idc], x.unsqueeze(2))  # [M, r, 1]
            lora = torch.bmm(b[idc], s).squeeze(2) * (scale * valid)
            return F.linear(x, w, bias) + lora

        out["gather+bmm"] = run(gather_bmm)

    used = ids_cpu[ids_cpu >= 0]
    distinct = int(used.unique().numel())
    flops = 2 * m * n * k + 2 * used.numel() * r * (k + n)
    moved = (n * k + m * k + m * n + distinct * r * (k + n)) * x.element_size()
    return out, {"flops": flops, "bytes": moved, "distinct_adapters": distinct}


def time_all(fns: dict, cuda: bool, rounds: int) -> dict:
    if cuda:
        return {
            n: in_units(time_call(f, cuda=True, warmup_ms=5, rep_ms=25), "ms")
            for n, f in fns.items()
        }
    return {
        n: in_units(t, "ms") for n, t in time_side_by_side(fns, warmup=1, rounds=rounds).items()
    }


COLUMNS = ["base", "single fused", "lora_linear_multi", "lora_linear_multi[cuda]", "PEFT loop",
           "gather+bmm"]  # fmt: skip


def format_table(rows: list[dict]) -> str:
    present = [c for c in COLUMNS if any(c in row["ms"] for row in rows)]
    head = f"{'sweep':<15}{'popularity':<11}{'rows':>6}{'L':>5}{'r':>5} "
    head += "".join(f"{c[:17]:>18}" for c in present)
    head += f"{'multi/single':>14}{'PEFT/multi':>12}{'TFLOP/s':>9}{'GB/s':>8}"
    lines = [head, "-" * len(head)]
    for row in rows:
        ms = row["ms"]
        line = (
            f"{row['sweep']:<15}{row['popularity']:<11}{row['rows']:>6}{row['L']:>5}{row['r']:>5} "
        )
        line += "".join(
            f"{ms[c]['median_ms']:>15.3f} ms" if c in ms else f"{'-':>18}" for c in present
        )
        multi = ms["lora_linear_multi"]["median_ms"]
        line += f"{multi / ms['single fused']['median_ms']:>14.2f}"
        line += (
            f"{ms['PEFT loop']['median_ms'] / multi:>12.2f}" if "PEFT loop" in ms else f"{'-':>12}"
        )
        line += f"{row['flops'] / multi / 1e9:>9.2f}{row['bytes'] / multi / 1e6:>8.0f}"
        lines.append(line)
    return "\n".join(lines)


def plot(rows: list[dict], path: str, title: str, device) -> bool:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _plot

    if not _plot.available():
        return False
    sweeps = [s for s in ("rows", "adapters", "rank") if any(r["sweep"] == s for r in rows)]
    pops = [r for r in rows if r["sweep"] == "popularity"]
    fig, axes = _plot.figure(len(sweeps) + 1, width=5, height=4)
    axis_key = {"rows": ("rows", "rows in the batch (M)"), "adapters": ("L", "adapters (L)"),
                "rank": ("r", "rank (r)")}  # fmt: skip
    for ax, s in zip(axes, sweeps, strict=False):
        sel = [r for r in rows if r["sweep"] == s]
        key, label = axis_key[s]
        series = {c: [r["ms"].get(c, {}).get("median_ms") for r in sel] for c in COLUMNS}
        series = {c: ys for c, ys in series.items() if any(y is not None for y in ys)}
        _plot.lines(ax, [r[key] for r in sel], series, xlabel=label,
                    ylabel="ms per call (median)", logx=True, logy=True,
                    title=f"{s} sweep ({sel[0]['popularity']} adapters)")  # fmt: skip
    ax = axes[-1]
    labels = [f"{r['popularity']}\n{r['rows']} rows" for r in pops]
    width = 0.8 / len(COLUMNS)
    for j, c in enumerate(COLUMNS):
        if pops and all(c in r["ms"] for r in pops):
            ax.bar([i + j * width for i in range(len(pops))],
                   [r["ms"][c]["median_ms"] for r in pops], width, label=c)  # fmt: skip
    ax.set_xticks([i + 0.4 for i in range(len(pops))], labels, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("ms per call (median)")
    ax.set_xlabel("adapter popularity in the batch")
    ax.set_title(f"popularity (L={pops[0]['L']}, r={pops[0]['r']})" if pops else "popularity")
    ax.legend(fontsize=7)
    _plot.save(fig, path, title, device=device)
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small sweep (CPU: under a minute)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="default: bf16 on CUDA, fp32 on CPU")  # fmt: skip
    p.add_argument("--k", type=int, default=None, help="in_features (default 4096; quick 1024)")
    p.add_argument("--n", type=int, default=None, help="out_features (default: K)")
    p.add_argument("--backward", action="store_true", help="time forward + backward")
    p.add_argument("--rounds", type=int, default=7, help="CPU: timed rounds per provider")
    p.add_argument("--gather-max-gib", type=float, default=2.0,
                   help="skip gather+bmm where its gathered copies pass this size")  # fmt: skip
    p.add_argument("--max-seconds", type=float, default=80.0,
                   help="skip the configurations left once this much time has passed")  # fmt: skip
    p.add_argument("--out", default=None, help="write the rows to this JSON file (and a PNG)")
    args = p.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    dtype = DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    k = args.k or (1024 if args.quick else 4096)
    n = args.n or k
    torch.manual_seed(0)
    t_start = time.perf_counter()
    rows, skipped = [], []
    for cfg in sweep(args.quick):
        if time.perf_counter() - t_start > args.max_seconds:
            skipped.append(cfg)
            continue
        fns, work = providers(
            cfg, k, n, dtype, device, args.backward, int(args.gather_max_gib * 2**30)
        )
        rows.append({**cfg, **work, "ms": time_all(fns, cuda, args.rounds)})
        if cuda:
            torch.cuda.empty_cache()
    elapsed = time.perf_counter() - t_start
    mode = "forward+backward" if args.backward else "forward"
    title = f"{mode}, K={k}, N={n}, {str(dtype)[6:]}, {device_name(device)}"
    print(title)
    print(format_table(rows))
    cut = f"; {len(skipped)} configurations skipped (--max-seconds)" if skipped else ""
    print(f"({elapsed:.0f} s{cut})")
    if args.out:
        meta = {
            "device": device_name(device),
            "torch": torch.__version__,
            "lora_kernels": lk.__version__,
            "python": platform.python_version(),
            "mode": mode,
            "dtype": str(dtype)[6:],
            "K": k,
            "N": n,
            "backends": lk.available_backends(),
            "argv": sys.argv[1:],
            "torch_threads": torch.get_num_threads(),
            "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
            "seconds": elapsed,
        }
        details = {"meta": meta, "rows": rows, "skipped": skipped}
        paths = write_results(
            args.out, "bench_multi", timing_rows(rows), device=device, details=details
        )
        png = os.path.splitext(args.out)[0] + ".png"
        if plot(rows, png, title, device):
            print(f"wrote {paths[0]}, {paths[1]} and {png}")
        else:
            print(f"wrote {paths[0]} and {paths[1]} (no matplotlib: no plot)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
