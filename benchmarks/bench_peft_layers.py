"""GPT-2's Conv1D and Embedding LoRA: our kernels against PEFT's own layers, forward and
forward+backward, on the same weights.

Providers, per layer kind:

* Conv1D (``fan_in_fan_out``, weight ``[in, out]``): the bare transformers ``Conv1D``, PEFT's
  ``lora.Linear`` on it, the same PEFT layer after ``fuse`` (``FusedPeftLinear``), and
  ``FusedLoraLinear.from_linear(conv1d)`` (what ``get_lora_model`` builds);
* Embedding: the bare ``nn.Embedding``, PEFT's ``lora.Embedding``, the same after ``fuse``
  (``FusedPeftEmbedding``), and ``FusedLoraEmbedding`` (what ``get_lora_model`` builds).

Forward runs under ``no_grad``; forward+backward computes the adapter's gradients (and the
input's, for Conv1D: a layer inside a network). Providers are timed side by side
(``lora_kernels.bench.time_side_by_side``: round-robin in a shuffled order, median and p20/p80),
and the table gives each one's time relative to PEFT's layer (below 1: faster than PEFT).

    python benchmarks/bench_peft_layers.py [--rounds N] [--quick] [--out PATH]

Shapes are GPT-2 small's (hidden 768, c_attn 768 -> 2304, c_fc 768 -> 3072, vocabulary 50257),
r = 16, fp32 on a CPU (bf16 on a GPU), at a prefill-sized and a decode-sized token count.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import sys
from pathlib import Path

import peft
import torch
from peft.tuners.lora.layer import Embedding as PeftEmbedding
from peft.tuners.lora.layer import Linear as PeftLinear
from torch import nn
from transformers.pytorch_utils import Conv1D

from lora_kernels.bench import device_name, time_side_by_side, timing_rows, write_results
from lora_kernels.integrations.peft import fuse
from lora_kernels.layers.embedding import FusedLoraEmbedding
from lora_kernels.layers.linear import FusedLoraLinear

RESULTS = Path(__file__).resolve().parent / "results"
R = 16
CONV1D_SHAPES = [(512, 768, 2304), (512, 768, 3072), (16, 768, 2304)]  # (tokens, in, out)
EMBEDDING_SHAPES = [(512, 50257, 768), (16, 50257, 768)]  # (tokens, vocabulary, dim)


def _conv1d_layers(k: int, n: int, dtype, device) -> dict[str, nn.Module]:
    base = Conv1D(n, k).to(device=device, dtype=dtype).requires_grad_(False)
    cfg = peft.LoraConfig(r=R, lora_alpha=2 * R, fan_in_fan_out=True)
    theirs = PeftLinear(copy.deepcopy(base), "default", cfg, r=R, lora_alpha=2 * R,
                        is_target_conv_1d_layer=True).to(device=device, dtype=dtype)  # fmt: skip
    with torch.no_grad():
        theirs.lora_B["default"].weight.normal_(0, 0.02)
    fused = fuse(copy.deepcopy(theirs))
    ours = FusedLoraLinear.from_linear(copy.deepcopy(base), r=R, lora_alpha=2 * R)
    with torch.no_grad():
        ours.lora_A["default"].weight.copy_(theirs.lora_A["default"].weight)
        ours.lora_B["default"].weight.copy_(theirs.lora_B["default"].weight)
    return {"base only": base, "PEFT": theirs, "PEFT + fuse": fused, "ours": ours}


def _embedding_layers(v: int, d: int, dtype, device) -> dict[str, nn.Module]:
    base = nn.Embedding(v, d, device=device, dtype=dtype).requires_grad_(False)
    cfg = peft.LoraConfig(r=R, lora_alpha=2 * R)
    theirs = PeftEmbedding(copy.deepcopy(base), "default", cfg, r=R, lora_alpha=2 * R)
    theirs = theirs.to(device=device, dtype=dtype)
    with torch.no_grad():
        theirs.lora_embedding_A["default"].normal_(0, 0.02)
    fused = fuse(copy.deepcopy(theirs))
    ours = FusedLoraEmbedding.from_embedding(copy.deepcopy(base), r=R, lora_alpha=2 * R)
    with torch.no_grad():
        ours.lora_embedding_A["default"].copy_(theirs.lora_embedding_A["default"])
        ours.lora_embedding_B["default"].copy_(theirs.lora_embedding_B["default"])
    return {"base only": base, "PEFT": theirs, "PEFT + fuse": fused, "ours": ours}


def _modes(layers: dict[str, nn.Module], x: torch.Tensor, dy: torch.Tensor):
    def fwd(layer):
        def run():
            with torch.no_grad():
                layer(x)

        return run

    def fwd_bwd(layer):
        def run():
            layer(x).backward(dy)

        return run

    def bare_fwd_bwd(layer):  # the bare layer has nothing to train: the input's gradient only
        def run():
            if x.requires_grad:
                layer(x).backward(dy)
            else:
                layer(x)

        return run

    yield "forward", {name: fwd(layer) for name, layer in layers.items()}
    yield (
        "forward+backward",
        {
            name: (bare_fwd_bwd if name == "base only" else fwd_bwd)(layer)
            for name, layer in layers.items()
        },
    )


def bench(device, dtype, rounds: int, min_seconds: float, kinds=("Conv1D", "Embedding")):
    cuda = device.type == "cuda"
    rows = []
    cases = [("Conv1D", s) for s in CONV1D_SHAPES] + [("Embedding", s) for s in EMBEDDING_SHAPES]
    cases = [c for c in cases if c[0] in kinds]
    for kind, (m, k, n) in cases:
        torch.manual_seed(0)
        if kind == "Conv1D":
            layers = _conv1d_layers(k, n, dtype, device)
            x = torch.randn(m, k, device=device, dtype=dtype, requires_grad=True)
        else:
            layers = _embedding_layers(k, n, dtype, device)
            x = torch.randint(0, k, (m,), device=device)
        dy = torch.randn(m, n, device=device, dtype=dtype)
        for mode, providers in _modes(layers, x, dy):
            timings = time_side_by_side(
                providers, cuda=cuda, rounds=rounds, min_seconds=min_seconds
            )
            peft_t = timings["PEFT"]["median_s"]
            for name, t in timings.items():
                rows.append(
                    {
                        "layer": kind,
                        "mode": mode,
                        "provider": name,
                        "tokens": m,
                        "in": k,
                        "out": n,
                        "r": R,
                        "dtype": str(dtype).replace("torch.", ""),
                        **t,
                        "vs_peft": t["median_s"] / peft_t,
                    }
                )
    return rows


def format_table(rows: list[dict]) -> str:
    head = (
        f"{'layer':<10} {'mode':<17} {'tokens,in,out':<18} {'provider':<12} "
        f"{'median':>10} {'p20-p80':>19} {'x PEFT':>7}"
    )
    lines = [head, "-" * len(head)]
    for row in rows:
        shape = f"{row['tokens']},{row['in']},{row['out']}"
        spread = f"{row['p20_s'] * 1e3:.3f}-{row['p80_s'] * 1e3:.3f} ms"
        lines.append(
            f"{row['layer']:<10} {row['mode']:<17} {shape:<18} {row['provider']:<12} "
            f"{row['median_s'] * 1e3:>7.3f} ms {spread:>19} {row['vs_peft']:>7.3f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=100, help="timed rounds per mode and shape")
    parser.add_argument("--quick", action="store_true", help="10 rounds: a smoke run")
    parser.add_argument("--out", type=Path, default=None, help="JSON output path")
    parser.add_argument(
        "--layers", nargs="+", choices=["Conv1D", "Embedding"], default=["Conv1D", "Embedding"]
    )
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    rounds = 10 if args.quick else args.rounds
    rows = bench(device, dtype, rounds, 0.0, args.layers)
    name = device_name(device)
    print(f"{name}, torch {torch.__version__}, peft {peft.__version__}, r={R}, {rounds} rounds")
    print(format_table(rows))
    slowest = max(
        (r for r in rows if r["provider"] in ("ours", "PEFT + fuse")), key=lambda r: r["vs_peft"]
    )
    print(
        f"slowest against PEFT: {slowest['provider']} {slowest['layer']} {slowest['mode']} "
        f"tokens={slowest['tokens']}: {slowest['vs_peft']:.3f}x PEFT's time"
    )
    result = {
        "benchmark": "bench_peft_layers",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": name,
        "torch": torch.__version__,
        "peft": peft.__version__,
        "rounds": rounds,
        "rows": rows,
    }
    out = args.out or RESULTS / ("peft_layers_gpu.json" if cuda else "peft_layers_cpu.json")
    paths = write_results(
        out, "bench_peft_layers", timing_rows(rows), device=device, details=result
    )
    print(f"wrote {paths[0]} and {paths[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
