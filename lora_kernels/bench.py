"""Benchmark timing and result files, the one helper the CLI and every script in ``benchmarks/``
use, and the quick layer benchmark behind ``lora-kernels bench``.

Every timing returns seconds as ``{"median_s", "p20_s", "p80_s", "n"}`` (``in_units`` renames
them for a table in ms or us):

* ``time_call``: one callable. On CUDA ``triton.testing.do_bench`` (CUDA events, the L2 cache
  cleared before each call); on CPU ``torch.utils.benchmark.Timer.blocked_autorange`` (blocks of
  calls sized to the timer's resolution, at the caller's thread count); ``n`` is the number of
  blocks on CPU and 0 on CUDA (do_bench does not report it).
* ``time_side_by_side``: providers timed in one run: each round calls every provider once, in an
  order shuffled per round, so slow drifts of the machine (frequency, other processes) and the
  cache state left by the previous call hit them alike: the right tool for ratios. On CUDA each
  call is timed with CUDA events after the L2 cache is cleared, as do_bench does; on CPU with
  ``time.perf_counter``.
* ``time_calls``: ``fn(i)`` for ``i in range(rounds)``, each call synchronised on both sides:
  for steps that mix host and device work (reading a file, switching an adapter).

Results: ``write_results`` writes one schema for every benchmark, JSON and CSV side by side:
``{"schema", "benchmark", "env", "rows", "details"}`` where every row carries ``benchmark``,
``case``, ``provider``, ``median_s``, ``p20_s``, ``p80_s``, ``n`` and the run's ``commit``,
``machine`` and ``versions`` (``environment()``), and ``details`` keeps what a script measures
besides times (bandwidths, memory, drift) in its own layout.
"""

from __future__ import annotations

import copy
import csv
import datetime
import importlib.metadata
import json
import platform
import random
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from .layers import FusedLoraLinear

__all__ = [
    "SCHEMA",
    "bench_layers",
    "device_name",
    "environment",
    "format_table",
    "in_units",
    "summarise",
    "time_call",
    "time_calls",
    "time_side_by_side",
    "timing_rows",
    "write_results",
]

SCHEMA = "lora_kernels.bench/1"
_VERSIONED = ("lora_kernels", "torch", "triton", "peft", "transformers", "bitsandbytes")
_L2_FLUSH_BYTES = 256 << 20  # larger than any current GPU's L2 (H100: 50 MiB, B200: 126 MiB)


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


def _l2_flusher(cuda: bool) -> Callable[[], None]:
    if not cuda:
        return lambda: None
    buffer = torch.empty(_L2_FLUSH_BYTES, dtype=torch.int8, device="cuda")
    return buffer.zero_


def _time_once(fn: Callable[[], object], cuda: bool, flush: Callable[[], None]) -> float:
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        flush()
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
    """Seconds per call of ``fn``: ``do_bench(warmup=warmup_ms, rep=rep_ms)`` on CUDA, else
    ``Timer.blocked_autorange(min_run_time=seconds)`` after one warm-up call, its blocks'
    per-call times summarised (at least ``min_calls`` calls in all)."""
    if cuda:
        from triton.testing import do_bench

        p50, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return {"median_s": p50 * 1e-3, "p20_s": p20 * 1e-3, "p80_s": p80 * 1e-3, "n": 0}
    from torch.utils.benchmark import Timer

    fn()
    # Timer defaults to one thread; time at the thread count the caller set
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    measurement = timer.blocked_autorange(min_run_time=seconds)
    while measurement.number_per_run * len(measurement.times) < min_calls:
        measurement = timer.blocked_autorange(min_run_time=2 * seconds)
        seconds *= 2
    return summarise(list(measurement.times))


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
    flush = _l2_flusher(cuda)
    samples: dict[str, list[float]] = {name: [] for name in providers}
    t_end = time.perf_counter() + min_seconds
    done = 0
    order = list(providers)
    shuffle = random.Random(0).shuffle
    while done < rounds or time.perf_counter() < t_end:
        shuffle(order)  # what ran just before changes what is in the caches: vary it
        for name in order:
            samples[name].append(_time_once(providers[name], cuda, flush))
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
                    "case": f"{mode} M={m} K={k} N={n} r={r} {str(dtype).replace('torch.', '')}",
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


# ---------------------------------------------------------------------------------------------
# result files: one schema for every benchmark
# ---------------------------------------------------------------------------------------------


def _commit() -> str:
    """The checkout's commit (``+dirty`` with uncommitted changes), or ``unknown`` outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")  # fmt: skip


def _version(dist: str) -> str:
    if dist == "torch":
        return torch.__version__
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def environment(device: torch.device | str = "cpu") -> dict[str, str]:
    """What a result depends on besides the code: ``commit``, ``machine`` (the device's name, CPU
    model and thread count or GPU), ``host`` (OS and architecture), ``versions`` (one string) and
    the date (UTC)."""
    from . import __version__

    versions = {d: (__version__ if d == "lora_kernels" else _version(d)) for d in _VERSIONED}
    versions["python"] = platform.python_version()
    if torch.version.cuda:
        versions["cuda"] = torch.version.cuda
    return {
        "commit": _commit(),
        "machine": device_name(device),
        "host": f"{platform.system()} {platform.machine()}",
        "versions": " ".join(f"{k}={v}" for k, v in versions.items()),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
    }


_TIME_KEYS = {f"{k}_{u}" for k in ("median", "p20", "p80") for u in ("s", "ms", "us")}


def _seconds(entry: dict) -> dict[str, float] | None:
    for unit, factor in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if f"median_{unit}" in entry:
            return {
                f"{k}_s": entry[f"{k}_{unit}"] * factor
                for k in ("median", "p20", "p80")
                if f"{k}_{unit}" in entry
            }
    return None


def timing_rows(details: object, path: tuple[str, ...] = ()) -> list[dict]:
    """Every timing inside a script's nested result (a dict holding ``median_s``, ``median_ms``
    or ``median_us``) as a row: ``provider`` is its key, ``case`` the keys above it joined by
    ``/``; times in seconds. For scripts whose results are not rows already."""
    rows: list[dict] = []
    if isinstance(details, dict):
        t = _seconds(details)
        if t is not None and "provider" in details:  # a flat row already: keep its columns
            scalars = {
                k: v
                for k, v in details.items()
                if isinstance(v, int | float | str) and k not in _TIME_KEYS
            }
            case = details.get("case") or _label(
                {
                    k: v
                    for k, v in scalars.items()
                    if k not in ("provider", "n") and k not in _TIME_KEYS
                }
            )
            rows.append({**scalars, "case": case or "-", **t})
            return rows
        if t is not None and path:
            case = "/".join(path[:-1]) or "-"
            rows.append({"case": case, "provider": path[-1], **t, "n": details.get("n", "")})
            return rows
        for key, value in details.items():
            rows += timing_rows(value, (*path, str(key)))
    elif isinstance(details, list):
        for i, value in enumerate(details):
            rows += timing_rows(value, (*path, _label(value) or str(i)))
    return rows


def _label(item: object) -> str | None:
    """A list item's name in a row's ``case``: its ``case`` or ``name``, else its scalar fields
    (``M=16 K=4096 ...``)."""
    if not isinstance(item, dict):
        return None
    for key in ("case", "name", "path"):
        if isinstance(item.get(key), str):
            return item[key]
    scalars = [
        f"{k}={v}"
        for k, v in item.items()
        if isinstance(v, int | str) and not isinstance(v, bool) and len(str(v)) <= 24
    ]
    return " ".join(scalars[:8]) or None


def write_results(
    path: str | Path,
    benchmark: str,
    rows: Iterable[dict],
    *,
    device: torch.device | str = "cpu",
    details: object = None,
) -> tuple[Path, Path]:
    """Write ``rows`` (each with ``case``, ``provider`` and times in seconds, any other columns
    too) as ``path`` (JSON, :data:`SCHEMA`) and the same rows as CSV beside it; returns both
    paths. Each row gets ``benchmark`` and :func:`environment`'s ``commit``, ``machine`` and
    ``versions``; ``details`` (the script's own layout) goes into the JSON only."""
    path = Path(path)
    env = environment(device)
    stamp = {k: env[k] for k in ("commit", "machine", "versions")}
    out_rows = []
    for row in rows:
        missing = {"case", "provider", "median_s"} - row.keys()
        if missing:
            raise ValueError(f"write_results: row {row} lacks {sorted(missing)}")
        flat = {k: v for k, v in row.items() if not isinstance(v, dict | list)}
        out_rows.append({"benchmark": benchmark, **flat, **stamp})
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"schema": SCHEMA, "benchmark": benchmark, "env": env, "rows": out_rows}
    if details is not None:
        doc["details"] = details
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    columns: list[str] = []
    for row in out_rows:
        columns += [k for k in row if k not in columns]
    csv_path = path.with_suffix(".csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(out_rows)
    return path, csv_path
