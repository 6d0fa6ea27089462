"""Benchmark timing, the one helper the CLI and every script in ``benchmarks/`` use, and the quick
layer benchmark behind ``lora-kernels bench``.

Every timing returns seconds as ``{"median_s", "p20_s", "p80_s", "n"}`` (``in_units`` renames
them for a table in ms or us):

* ``time_side_by_side``: providers timed in one run: each round calls every provider once, in an
  order shuffled per round, so slow drifts of the machine (frequency, other processes) and the
  cache state left by the previous call hit them alike. On CUDA each call is timed with CUDA
  events after a synchronise; on CPU with ``time.perf_counter``.
* ``time_call``: one callable. On CUDA ``triton.testing.do_bench`` (it clears the L2 cache before
  each call); on CPU a wall-clock loop of at least ``min_calls`` calls and ``seconds``.
* ``time_calls``: ``fn(i)`` for ``i in range(rounds)``, each call synchronised on both sides:
  for steps that mix host and device work (reading a file, switching an adapter).
"""

from __future__ import annotations

import copy
import platform
import random
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from .layers import FusedLoraLinear

__all__ = [
    "bench_layers",
    "device_name",
    "format_table",
    "in_units",
    "summarise",
    "time_call",
    "time_calls",
    "time_side_by_side",
]


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = (line.split(":", 1)[1] for line in f if line.startswith("model name"))
            model = next(names).strip()
    except (OSError, StopIteration):
        pass
    return f"CPU {model} ({torch.get_num_threads()} threads)"


def summarise(samples: list[float]) -> dict[str, float]:
    """Median, 20th and 80th percentiles (seconds) and the count of ``samples``."""
    q = statistics.quantiles(samples, n=5) if len(samples) > 1 else [samples[0]] * 4
    return {
        "median_s": statistics.median(samples),
        "p20_s": q[0],
        "p80_s": q[3],
        "n": len(samples),
    }


def in_units(timing: dict[str, float], unit: str) -> dict[str, float]:
    """``{"median_s", "p20_s", "p80_s"}`` as ``{"median_<unit>", ...}`` (unit ``ms`` or ``us``)."""
    factor = {"s": 1.0, "ms": 1e3, "us": 1e6}[unit]
    return {f"{k}_{unit}": timing[f"{k}_s"] * factor for k in ("median", "p20", "p80")}


def _time_once(fn: Callable[[], object], cuda: bool) -> float:
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_call(
    fn: Callable[[], object],
    *,
    cuda: bool = False,
    seconds: float = 1.0,
    min_calls: int = 5,
    warmup_ms: int = 10,
    rep_ms: int = 100,
) -> dict[str, float]:
    """Seconds per call of ``fn``: ``do_bench(warmup=warmup_ms, rep=rep_ms)`` on CUDA, else at
    least ``min_calls`` timed calls and ``seconds`` of them after one warm-up call."""
    if cuda:
        from triton.testing import do_bench

        p50, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return {"median_s": p50 * 1e-3, "p20_s": p20 * 1e-3, "p80_s": p80 * 1e-3, "n": 0}
    fn()
    samples: list[float] = []
    t_end = time.perf_counter() + seconds
    while len(samples) < min_calls or time.perf_counter() < t_end:
        samples.append(_time_once(fn, cuda=False))
    return summarise(samples)


def time_calls(
    fn: Callable[[int], object],
    rounds: int,
    *,
    warmup: int = 1,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Seconds of ``fn(i)`` for ``i in range(rounds)`` after ``warmup`` calls (``fn(-1)``, ...),
    with ``device`` synchronised before and after each timed call when it is a CUDA device."""
    cuda = device is not None and torch.device(device).type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    for i in range(warmup):
        fn(i - warmup)
    samples = []
    for i in range(rounds):
        sync()
        t0 = time.perf_counter()
        fn(i)
        sync()
        samples.append(time.perf_counter() - t0)
    return summarise(samples)


def time_side_by_side(
    providers: dict[str, Callable[[], object]],
    *,
    cuda: bool = False,
    warmup: int = 3,
    rounds: int = 30,
    min_seconds: float = 0.0,
) -> dict[str, dict[str, float]]:
    """Median, p20 and p80 seconds per call of each provider, measured round-robin."""
    for fn in providers.values():
        for _ in range(warmup):
            fn()
    if cuda:
        torch.cuda.synchronize()
    samples: dict[str, list[float]] = {name: [] for name in providers}
    t_end = time.perf_counter() + min_seconds
    done = 0
    order = list(providers)
    shuffle = random.Random(0).shuffle
    while done < rounds or time.perf_counter() < t_end:
        shuffle(order)  # what ran just before changes what is in the caches: vary it
        for name in order:
            samples[name].append(_time_once(providers[name], cuda))
        done += 1
    return {name: summarise(s) for name, s in samples.items()}


def _make_layers(k: int, n: int, r: int, dtype: torch.dtype, device: torch.device):
    base = nn.Linear(k, n, device=device, dtype=dtype)
    base.weight.requires_grad_(False)
    base.bias.requires_grad_(False)
    ours = FusedLoraLinear.from_linear(copy.deepcopy(base), r=r, lora_alpha=2 * r)
    with torch.no_grad():
        ours.lora_B["default"].weight.normal_(0, 0.02)
    a = ours.lora_A["default"].weight.detach().clone().requires_grad_(True)
    b = ours.lora_B["default"].weight.detach().clone().requires_grad_(True)
    scale = ours.scaling["default"]

    def naive(x):
        return base(x) + scale * ((x @ a.T) @ b.T)

    layers = {"nn.Linear (base only)": base, "naive torch LoRA": naive}
    try:
        import peft
        from peft.tuners.lora import Linear as PeftLinear

        cfg = peft.LoraConfig(r=r, lora_alpha=2 * r)
        theirs = PeftLinear(copy.deepcopy(base), "default", config=cfg, r=r, lora_alpha=2 * r)
        theirs = theirs.to(device=device, dtype=dtype)
        with torch.no_grad():
            theirs.lora_A["default"].weight.copy_(a)
            theirs.lora_B["default"].weight.copy_(b)
        layers["PEFT lora.Linear"] = theirs
    except Exception:  # peft missing or incompatible: the table simply has no PEFT row
        pass
    layers["FusedLoraLinear"] = ours
    return layers


def bench_layers(
    m: int,
    k: int,
    n: int,
    r: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    rounds: int = 30,
    min_seconds: float = 0.0,
) -> list[dict]:
    """Forward and forward+backward (grad of x and of the adapter) of each layer at one shape."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    layers = _make_layers(k, n, r, dtype, device)
    x = torch.randn(m, k, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(m, n, device=device, dtype=dtype)

    def fwd(layer):
        def run():
            with torch.no_grad():
                layer(x)

        return run

    def fwd_bwd(layer):
        def run():
            layer(x).backward(dy)

        return run

    rows = []
    for mode, wrap in (("forward", fwd), ("forward+backward", fwd_bwd)):
        timings = time_side_by_side(
            {name: wrap(layer) for name, layer in layers.items()},
            cuda=cuda,
            rounds=rounds,
            min_seconds=min_seconds,
        )
        base_t = timings["nn.Linear (base only)"]["median_s"]
        for name, t in timings.items():
            rows.append(
                {
                    "mode": mode,
                    "provider": name,
                    "M": m,
                    "K": k,
                    "N": n,
                    "r": r,
                    "dtype": str(dtype).replace("torch.", ""),
                    **t,
                    "vs_base": t["median_s"] / base_t,
                }
            )
    return rows


def format_table(rows: list[dict]) -> str:
    head = (
        f"{'mode':<17} {'provider':<22} {'shape (M,K,N,r)':<22} "
        f"{'median':>10} {'p20-p80':>19} {'x base':>7}"
    )
    lines = [head, "-" * len(head)]
    for row in rows:
        shape = f"{row['M']},{row['K']},{row['N']},{row['r']} {row['dtype']}"
        spread = f"{row['p20_s'] * 1e3:.3f}-{row['p80_s'] * 1e3:.3f} ms"
        lines.append(
            f"{row['mode']:<17} {row['provider']:<22} {shape:<22} "
            f"{row['median_s'] * 1e3:>7.3f} ms {spread:>19} {row['vs_base']:>7.3f}"
        )
    return "\n".join(lines)
