"""What does a LoRA adapter cost on top of the base GEMM, per implementation, forward and training?

    y = x @ W.T + scale * (x @ A.T) @ B.T,   x [M, K], W [N, K], A [r, K], B [N, r], r = 16

Shapes: K = N = 4096 (attention projections of a 7-8B model) and K = 4096, N = 14336 (its MLP up
projection), M in {1, 8, 32} (decode) and {512, 4096} (prefill, training), bf16 and fp16, no bias.

Providers, side by side in one run:

* ``cublas_base``  ``F.linear(x, W)``: the base layer alone, the floor to compare against;
* ``torch_naive``  three GEMMs and an add, with autograd;
* ``peft``         ``peft.tuners.lora.Linear`` (adapter in the base dtype, no dropout), if peft
                   imports;
* ``triton``       this package's Triton launchers called directly
                   (``lora_kernels.backends.triton.lora_linear``: ``lora_linear_fwd`` /
                   ``lora_linear_bwd``);
* ``lk_cuda``      ``lk.lora_linear(..., backend="cuda")``, where that backend is available (its
                   backward runs on Triton through the op layer).

``fwd`` times the forward; ``fwd+bwd`` the forward and the gradients a LoRA fine-tune needs (x, A
and B; W frozen; ``cublas_base``: x only). Times are medians of ``triton.testing.do_bench`` (which
clears L2 before each call) with 20/80 % quantiles. GB/s counts W's bytes only, once per GEMM that
reads it (once forward, twice forward+backward): for small M the layer is a stream of W, so this
is the figure of merit. TFLOP/s counts the layer's useful work: 2MNK + 2Mr(K+N) forward, plus
2MNK + 4Mr(K+N) backward (base only: 2MNK per GEMM).

Without CUDA the script prints a message and exits, unless ``--cpu``: then it times the torch
providers only (``cublas_base`` is then plain ``F.linear``), with ``Timer.blocked_autorange``,
for M <= 32.

    python benchmarks/bench_lora_linear.py [--out PATH] [--cpu] [--dtypes bf16,fp16]
        [--ms 1,8,32,512,4096] [--modes fwd,fwd+bwd] [--budget-s 50]

Prints a table and writes JSON (GPU name, torch/triton/peft versions, date, one record per
measurement). The whole run is kept within ``--budget-s``: once it is spent the remaining rows are
recorded as skipped, most important first (bf16 forward, then bf16 training, then fp16).
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lora_kernels.bench import in_units, time_call, timing_rows, write_results

RANK = 16
ALPHA = 32
SHAPES = [(4096, 4096), (4096, 14336)]  # (K, N)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
PROVIDERS = ["cublas_base", "torch_naive", "peft", "triton", "lk_cuda"]


def _flops(m: int, k: int, n: int, r: int, mode: str, lora: bool) -> float:
    gemm = 2.0 * m * n * k
    if not lora:
        return gemm if mode == "fwd" else 2 * gemm
    fwd = gemm + 2.0 * m * r * (k + n)
    return fwd if mode == "fwd" else fwd + gemm + 4.0 * m * r * (k + n)


def _make_providers(m, k, n, dtype, device, mode, lk_linear, with_triton):
    """name -> zero-argument callable running one forward (and backward) of that provider."""
    scale = ALPHA / RANK
    training = mode == "fwd+bwd"
    x = torch.randn(m, k, device=device, dtype=dtype)
    weight = torch.randn(n, k, device=device, dtype=dtype) * k**-0.5
    lora_a = (torch.randn(RANK, k, device=device, dtype=dtype) * k**-0.5).requires_grad_(training)
    lora_b = (torch.randn(n, RANK, device=device, dtype=dtype) * 0.02).requires_grad_(training)
    dy = torch.randn(m, n, device=device, dtype=dtype)
    x.requires_grad_(training)

    def autograd_step(forward, inputs):
        if not training:
            return forward
        return lambda: torch.autograd.grad(forward(), inputs, dy)

    providers = {
        "cublas_base": autograd_step(lambda: F.linear(x, weight), [x]),
        "torch_naive": autograd_step(
            lambda: F.linear(x, weight) + scale * F.linear(F.linear(x, lora_a), lora_b),
            [x, lora_a, lora_b],
        ),
    }
    try:
        from peft import LoraConfig
        from peft.tuners.lora import Linear as PeftLoraLinear

        base = torch.nn.Linear(k, n, bias=False, device=device, dtype=dtype)
        with torch.no_grad():
            base.weight.copy_(weight)
        base.weight.requires_grad_(False)
        config = LoraConfig(r=RANK, lora_alpha=ALPHA)
        layer = PeftLoraLinear(base, "default", config=config, r=RANK, lora_alpha=ALPHA)
        layer.to(device=device, dtype=dtype)
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(lora_a)
            layer.lora_B["default"].weight.copy_(lora_b)
        params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
        providers["peft"] = autograd_step(lambda: layer(x), [x, *params])
    except ImportError:
        pass
    if with_triton:
        from lora_kernels.backends.triton.lora_linear import lora_linear_bwd, lora_linear_fwd

        xd, ad, bd = x.detach(), lora_a.detach(), lora_b.detach()
        if training:

            def triton_step():
                y, s = lora_linear_fwd(xd, weight, None, ad, bd, scale)
                return lora_linear_bwd(dy, xd, weight, ad, bd, s, scale)

            providers["triton"] = triton_step
        else:
            providers["triton"] = lambda: lora_linear_fwd(xd, weight, None, ad, bd, scale)
    # The package's entry point: its CUDA backend on a GPU that has it, its torch path on a CPU.
    backend = "cuda" if device.type == "cuda" else "torch"
    if lk_linear is not None:
        providers[f"lk_{backend}"] = autograd_step(
            lambda: lk_linear(x, weight, None, lora_a, lora_b, scale, backend=backend),
            [x, lora_a, lora_b],
        )
    return providers


def _lk_entry(backend: str):
    """``lk.lora_linear`` when ``backend`` is available here, else None."""
    try:
        import lora_kernels as lk

        if backend in lk.available_backends():
            return lk.lora_linear
    except Exception as exc:  # the API may be absent or broken: the other rows still run
        print(f"lk_{backend}: unavailable ({type(exc).__name__}: {exc})", file=sys.stderr)
    return None


def _versions() -> dict:
    out = {"torch": torch.__version__, "python": sys.version.split()[0]}
    for name in ("triton", "peft"):
        try:
            out[name] = __import__(name).__version__
        except Exception:
            out[name] = None
    return out


def _header(providers: list[str]) -> str:
    head = f"{'mode':8} {'dtype':5} {'K':>5} {'N':>6} {'M':>5} | "
    head += " ".join(f"{p:>12}" for p in providers)
    head += f" | {'triton GB/s':>11} {'TFLOP/s':>8} {'vs base':>8}"
    return head + "\n" + "-" * len(head)


def _line(record: dict, by_provider: dict[str, dict], providers: list[str]) -> str:
    cells = []
    for p in providers:
        row = by_provider.get(p, {})
        cells.append(f"{row['ms'] * 1e3:>10.1f}us" if "ms" in row else f"{'-':>12}")
    ours = by_provider.get("triton", {})
    extra = f"{'-':>11} {'-':>8} {'-':>8}"
    if "ms" in ours:
        extra = f"{ours['GBps']:>11.0f} {ours['TFLOPs']:>8.1f} {ours['x_base']:>7.2f}x"
    r = record
    head = f"{r['mode']:8} {r['dtype']:5} {r['K']:>5} {r['N']:>6} {r['M']:>5} | "
    return head + " ".join(cells) + " | " + extra


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--cpu", action="store_true", help="time the torch providers on the CPU")
    parser.add_argument("--dtypes", default="bf16,fp16")
    parser.add_argument(
        "--ms", default=None, help="row counts (default 1,8,32,512,4096; CPU 1,8,32)"
    )
    parser.add_argument("--modes", default="fwd,fwd+bwd")
    parser.add_argument("--budget-s", type=float, default=50.0, help="start no shape after this")
    parser.add_argument("--warmup-ms", type=int, default=10)
    parser.add_argument("--rep-ms", type=int, default=30)
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available() and not args.cpu
    if not cuda and not args.cpu:
        print("bench_lora_linear: no CUDA device; skipped (--cpu times the torch providers)")
        return 0
    if cuda:
        from lora_kernels.backends.triton import interpreting

        if interpreting():
            print("bench_lora_linear: TRITON_INTERPRET is on; unset it to time the GPU kernels")
            return 1
    device = torch.device("cuda" if cuda else "cpu")
    ms = [int(v) for v in (args.ms or ("1,8,32,512,4096" if cuda else "1,8,32")).split(",")]
    dtypes = [d for d in args.dtypes.split(",") if d]
    modes = [mode for mode in args.modes.split(",") if mode]
    lk_linear = _lk_entry("cuda" if cuda else "torch")

    meta = {
        "benchmark": "bench_lora_linear",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "versions": _versions(),
        "rank": RANK,
        "timer": (
            f"triton.testing.do_bench warmup={args.warmup_ms}ms rep={args.rep_ms}ms, L2 cleared"
            if cuda
            else "torch.utils.benchmark.Timer.blocked_autorange"
        ),
        "quantiles": "ms = median, ms_p20 / ms_p80",
        "GBps": "W bytes / time; W counted once forward, twice forward+backward",
        "TFLOPs": "useful flops: 2MNK + 2Mr(K+N) fwd; + 2MNK + 4Mr(K+N) bwd (base: 2MNK per GEMM)",
    }
    rows: list[dict] = []
    start = time.perf_counter()
    print(f"bench_lora_linear on {meta['device']}, r={RANK}, times per call", flush=True)

    def write():
        meta["seconds"] = round(time.perf_counter() - start, 1)
        if args.out:
            device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
            details = {"meta": meta, "rows": rows}
            timed = [
                {**r, "median_s": r["ms"] * 1e-3, "p20_s": r["ms_p20"] * 1e-3,
                 "p80_s": r["ms_p80"] * 1e-3}
                for r in rows
                if r.get("ms") is not None
            ]  # fmt: skip
            write_results(
                args.out, "bench_lora_linear", timing_rows(timed), device=device, details=details
            )

    # Most important first, so that a spent budget cuts the least useful rows. Each shape's line
    # is printed and the JSON rewritten as soon as it is measured: a run cut short keeps them.
    providers = None
    skipped = 0
    for dtype_name, mode in [(d, mode) for d in dtypes for mode in modes]:
        dtype = DTYPES[dtype_name]
        for k, n in SHAPES:
            for m in ms:
                record = {"mode": mode, "dtype": dtype_name, "M": m, "K": k, "N": n, "r": RANK}
                if time.perf_counter() - start > args.budget_s:
                    rows.append({**record, "provider": "*", "skipped": "time budget spent"})
                    skipped += 1
                    continue
                fns = _make_providers(m, k, n, dtype, device, mode, lk_linear, with_triton=cuda)
                if providers is None:
                    providers = list(fns)
                    print(_header(providers), flush=True)
                by_provider = {}
                for name, fn in fns.items():
                    row = by_provider[name] = {**record, "provider": name}
                    rows.append(row)
                    try:
                        t = in_units(
                            time_call(
                                fn,
                                cuda=cuda,
                                seconds=0.3,
                                warmup_ms=args.warmup_ms,
                                rep_ms=args.rep_ms,
                            ),
                            "ms",
                        )
                        p50, p20, p80 = t["median_ms"], t["p20_ms"], t["p80_ms"]
                    except Exception as exc:  # one broken provider must not sink the table
                        row["error"] = f"{type(exc).__name__}: {exc}"[:300]
                        print(f"  {name}: {row['error']}", flush=True)
                        continue
                    base = by_provider.get("cublas_base", {}).get("ms")
                    w_bytes = n * k * torch.finfo(dtype).bits // 8 * (1 if mode == "fwd" else 2)
                    flops = _flops(m, k, n, RANK, mode, lora=name != "cublas_base")
                    row.update(
                        ms=p50,
                        ms_p20=p20,
                        ms_p80=p80,
                        GBps=w_bytes / (p50 * 1e-3) / 1e9,
                        TFLOPs=flops / (p50 * 1e-3) / 1e12,
                        x_base=p50 / base if base else None,
                    )
                print(_line(record, by_provider, providers), flush=True)
                del fns
                if cuda:
                    torch.cuda.empty_cache()
                write()
    write()
    print(f"{meta['seconds']} s", end="")
    print(
        f"; {skipped} shape(s) skipped: the {args.budget_s:.0f} s budget was spent"
        if skipped
        else ""
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
