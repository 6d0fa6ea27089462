"""DoRA layer: ours vs PEFT's, and vs our LoRA, time and peak memory of forward + backward.

Providers, each one layer ``[M, K] -> [M, N]`` with the same base weight and adapter weights:

* ``PEFT DoRA``          PEFT's ``lora.Linear`` with ``use_dora=True`` (builds ``W + s B A``,
  ``[N, K]``, every step to take its row norms)
* ``PEFT DoRA + fuse``   the same layer after ``lora_kernels.integrations.peft.fuse``
* ``ours DoRA``          ``FusedLoraLinear(use_dora=True)``: the factored norm, no ``[N, K]``
* ``ours LoRA``          ``FusedLoraLinear``: plain LoRA, the cost DoRA is measured against
* ``PEFT LoRA``          PEFT's plain ``lora.Linear``, for context

Modes: ``fwd+bwd`` (training: the input and the adapter train, the base is frozen; dropout 0;
each step ends with an in-place write to every trainable parameter, as an optimizer step, so
nothing cached from the adapter's previous values is reused) and ``forward`` (inference,
``torch.no_grad``, the same weights every call: our layer computes the DoRA norm once). Times
are medians over rounds with every provider called once per round in a shuffled order
(``lora_kernels.bench.time_side_by_side``).

Peak memory (CPU): each provider's training step runs once more in a fresh process with
``MALLOC_MMAP_THRESHOLD_=65536`` (every large tensor is its own mapping, returned on free), and the
growth of the process's resident high-water mark over that step (``/proc/self/clear_refs``) is
reported: everything the step allocates at its peak, including temporaries, beyond the layer,
its input and the upstream gradient. On CUDA: ``torch.cuda.max_memory_allocated`` over the step.

    OMP_NUM_THREADS=2 python -m benchmarks.bench_dora        # M=512, K=N=2048, r=16, fp32
    python -m benchmarks.bench_dora --quick --m 64 --k 256 --n 256 --out /tmp/dora.json

Writes a table to stdout, JSON to ``--out`` (default:
``benchmarks/results/bench_dora_<device>.json``, the shared schema of
``lora_kernels.bench.write_results``, and a CSV) and, with matplotlib, a PNG beside it.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from lora_kernels import FusedLoraLinear
from lora_kernels.bench import device_name, time_side_by_side, write_results

PROVIDERS = ["PEFT DoRA", "PEFT DoRA + fuse", "ours DoRA", "ours LoRA", "PEFT LoRA"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build(name: str, args, device, dtype) -> nn.Module:
    """Provider ``name``'s layer; every provider gets the same base and adapter weights."""
    import peft

    torch.manual_seed(0)
    base = nn.Linear(args.k, args.n, device=device, dtype=dtype)
    dora = "DoRA" in name
    cfg = peft.LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=["0"], use_dora=dora)
    theirs = peft.get_peft_model(nn.Sequential(copy.deepcopy(base)), cfg).base_model.model[0]
    with torch.no_grad():  # trained-looking adapter: B non-zero, magnitude off the row norm
        theirs.lora_B["default"].weight.normal_(0, 0.02)
        if dora:
            theirs.lora_magnitude_vector["default"].weight.mul_(1.02)
    if name.startswith("PEFT"):
        if name.endswith("fuse"):
            from lora_kernels.integrations.peft import fuse

            fuse(theirs)
        return theirs
    ours = FusedLoraLinear.from_linear(base, r=args.r, lora_alpha=2 * args.r, use_dora=dora)
    state = {k.replace("base_layer.", ""): v for k, v in theirs.state_dict().items()}
    ours.load_state_dict(state)
    return ours


def step_fn(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor):
    trainable = [p for p in layer.parameters() if p.requires_grad]

    def step():
        layer(x).backward(dy)
        x.grad = None
        with torch.no_grad():
            for p in trainable:
                p.grad = None
                p.add_(0.0)  # as an optimizer step would: the adapter changed, no cached norm

    return step


def inputs(args, device, dtype):
    torch.manual_seed(1)
    x = torch.randn(args.m, args.k, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(args.m, args.n, device=device, dtype=dtype)
    return x, dy


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def measure_peak(name: str, args, device, dtype) -> int:
    """Bytes the training step of ``name`` needs at its peak, beyond what exists before it."""
    layer = build(name, args, device, dtype).train()
    x, dy = inputs(args, device, dtype)
    step = step_fn(layer, x, dy)
    step()  # warm: caches (our ||W||^2, PEFT's nothing) and lazy imports are in place
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the resident high-water mark to the current RSS
    before = _status_bytes("VmRSS")
    step()
    return _status_bytes("VmHWM") - before


def peak_in_subprocess(name: str, argv: list[str]) -> int | None:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, "-m", "benchmarks.bench_dora", *argv, "--memory-of", name]
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        print(f"{name}: memory run failed: {out.stderr.strip()[-400:]}", file=sys.stderr)
        return None
    return int(out.stdout.strip().splitlines()[-1])


def plot(result: dict, path: Path, device, footer: str | None = None) -> bool:
    names = list(result["providers"])
    times = [result["providers"][n]["fwd+bwd"]["median_s"] * 1e3 for n in names]
    peaks = [(result["providers"][n].get("peak_bytes") or 0) / 2**20 for n in names]
    s = result["shape"]
    title = (
        f"DoRA layer, M={s['m']} K={s['k']} N={s['n']} r={s['r']} {s['dtype']}, {result['device']}"
    )
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import _plot

    if not _plot.available():
        return False
    fig, (ax1, ax2) = _plot.figure(2, width=5.5, height=3.4)
    _plot.bars(
        ax1,
        names,
        times,
        xlabel="ms per forward + backward (median; bars: p20-p80)",
        spread=[
            (p["fwd+bwd"]["p20_s"] * 1e3, p["fwd+bwd"]["p80_s"] * 1e3)
            for p in (result["providers"][n] for n in names)
        ],
        highlight=("PEFT DoRA",),
    )
    _plot.bars(
        ax2,
        names,
        peaks,
        xlabel="peak memory of a step, MiB (dashed: one [N, K] fp32)",
        highlight=("PEFT DoRA",),
    )
    ax2.axvline(result["nk_fp32_bytes"] / 2**20, color="gray", ls="--", lw=1)
    _plot.save(fig, path, title, device=device, footer=footer)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--m", type=int, default=512)
    parser.add_argument("--k", type=int, default=2048)
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--quick", action="store_true", help="10 rounds")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)
    parser.add_argument("--replot", type=Path, help="only redraw the PNG of this result JSON")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if args.replot:
        doc = json.loads(args.replot.read_text())
        result = doc.get("details", doc)  # the shared schema, or a file written before it
        footer = f"replotted from {args.replot.name}; measured on {result['device']}"
        png = args.replot.with_suffix(".png")
        if not plot(result, png, device, footer):
            raise SystemExit("--replot needs matplotlib: pip install 'lora_kernels[bench]'")
        print(f"wrote {png}")
        return 0
    if args.memory_of:
        print(measure_peak(args.memory_of, args, device, dtype))
        return 0

    cuda = device.type == "cuda"
    rounds = 10 if args.quick else args.rounds
    layers = {name: build(name, args, device, dtype) for name in PROVIDERS}
    x, dy = inputs(args, device, dtype)
    with torch.no_grad():  # same weights, same math: outputs must agree before timing
        want = layers["PEFT DoRA"](x)
        for name in ("PEFT DoRA + fuse", "ours DoRA"):
            torch.testing.assert_close(layers[name](x), want, rtol=1e-3, atol=1e-3)
    result = {
        "device": device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "shape": {"m": args.m, "k": args.k, "n": args.n, "r": args.r, "dtype": args.dtype},
        "nk_fp32_bytes": args.n * args.k * 4,
        "rounds": rounds,
        "providers": {name: {} for name in PROVIDERS},
    }
    for layer in layers.values():
        layer.train()
    timed = time_side_by_side(
        {n: step_fn(layer, x, dy) for n, layer in layers.items()}, cuda=cuda, rounds=rounds
    )
    for name, t in timed.items():
        result["providers"][name]["fwd+bwd"] = t
    for layer in layers.values():
        layer.eval()
    x_eval = x.detach()

    def forward(layer):
        def run():
            with torch.no_grad():
                layer(x_eval)

        return run

    timed = time_side_by_side(
        {n: forward(layer) for n, layer in layers.items()}, cuda=cuda, rounds=rounds
    )
    for name, t in timed.items():
        result["providers"][name]["forward"] = t
    del layers
    for name in PROVIDERS:
        if cuda:
            peak = measure_peak(name, args, device, dtype)
        else:
            peak = peak_in_subprocess(name, [a for a in argv if a != "--quick"])
        result["providers"][name]["peak_bytes"] = peak

    ref = result["providers"]["PEFT DoRA"]
    lora = result["providers"]["ours LoRA"]
    print(f"{result['device']}, torch {result['torch']}, {result['threads']} threads")
    s = result["shape"]
    print(f"M={s['m']} K={s['k']} N={s['n']} r={s['r']} {s['dtype']}, median of {rounds} rounds")
    header = (
        f"{'provider':<18} {'fwd+bwd ms':>11} {'vs PEFT DoRA':>13} {'vs our LoRA':>12} "
        f"{'forward ms':>11} {'peak MiB':>9}"
    )
    print(header)
    print("-" * len(header))
    for name, row in result["providers"].items():
        t, f = row["fwd+bwd"]["median_s"], row["forward"]["median_s"]
        row["speedup_vs_peft_dora"] = ref["fwd+bwd"]["median_s"] / t
        row["time_vs_our_lora"] = t / lora["fwd+bwd"]["median_s"]
        peak = row["peak_bytes"]
        peak_s = "n/a" if peak is None else f"{peak / 2**20:.1f}"
        print(
            f"{name:<18} {t * 1e3:>11.2f} {row['speedup_vs_peft_dora']:>12.2f}x "
            f"{row['time_vs_our_lora']:>11.2f}x {f * 1e3:>11.2f} {peak_s:>9}"
        )
    print(f"one [N, K] fp32 temporary: {result['nk_fp32_bytes'] / 2**20:.1f} MiB")
    out = args.out or Path(__file__).parent / "results" / f"bench_dora_{device.type}.json"
    rows = [
        {"case": f"{mode} M={s['m']} K={s['k']} N={s['n']} r={s['r']} {s['dtype']}",
         "provider": name, **row[mode], "peak_bytes": row["peak_bytes"]}
        for name, row in result["providers"].items()
        for mode in ("fwd+bwd", "forward")
    ]  # fmt: skip
    paths = write_results(out, "bench_dora", rows, device=device, details=result)
    print(f"wrote {paths[0]} and {paths[1]}")
    png = out.with_suffix(".png")
    if plot(result, png, device):
        print(f"wrote {png}")
    else:
        print("no matplotlib (pip install 'lora_kernels[bench]'): no plot")
    return 0


if __name__ == "__main__":
    sys.exit(main())
