"""An unmerged ``switch_adapter(model, name)`` without a cache, against the number of layers.

The adapters come from ``get_lora_model`` (two of them, rank 4, on every layer of a stack of
16 x 16 ``nn.Linear``); the switch alternates between them. Before the model-level active
adapter (``layers.base.SharedActive``) every such switch visited every layer; now a switch after
the first is one write. Also timed: the first switch after a layer changed by itself
(``set_adapter`` on one layer), which visits every layer again.

    python benchmarks/bench_unmerged_switch.py [--layers 8 64 512] [--rounds 400] [--out PATH]

Prints a table and writes JSON (default ``benchmarks/results/bench_unmerged_switch_cpu.json``)
with the commit and the machine. Timings: ``lora_kernels.bench.time_calls`` (median, p20, p80).
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import torch
from torch import nn

import lora_kernels as lk
from lora_kernels.bench import device_name, time_calls

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = r"layers\.\d+"


class Stack(nn.Module):
    def __init__(self, layers: int, dim: int = 16) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def bench(count: int, rounds: int) -> dict:
    torch.manual_seed(0)
    model = Stack(count)
    for name in ("a", "b"):
        lk.get_lora_model(model, lk.LoraConfig(r=4, target_modules=TARGETS), name)
    names = ("a", "b")

    def switch(i):
        lk.switch_adapter(model, names[i % 2])

    steady = time_calls(switch, rounds, warmup=8)
    first = model.layers[0]

    def after_layer_change(i):
        first.set_adapter(names[i % 2])  # a layer changes by itself: the next switch visits all
        lk.switch_adapter(model, names[(i + 1) % 2])

    revisit = time_calls(after_layer_change, max(20, rounds // 8), warmup=2)
    return {"layers": count, "switch": steady, "after_a_layer_changed": revisit}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, nargs="+", default=[8, 64, 512])
    p.add_argument("--rounds", type=int, default=400)
    p.add_argument("--out", type=Path, default=RESULTS / "bench_unmerged_switch_cpu.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = []
    print(f"{'layers':>6}  {'switch median':>14}  {'after a layer changed':>22}")
    for count in args.layers:
        row = bench(count, args.rounds)
        rows.append(row)
        print(
            f"{count:>6}  {row['switch']['median_s'] * 1e6:>11.1f} us  "
            f"{row['after_a_layer_changed']['median_s'] * 1e6:>19.1f} us",
            flush=True,
        )
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    record = {"commit": commit, "machine": device_name("cpu"), "threads": 1, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
