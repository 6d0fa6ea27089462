"""QLoRA layer (4-bit NF4 base + LoRA, r=16): lora_kernels' fused layer against bitsandbytes + PEFT.

Providers, on the same quantized weight and the same adapter:

* ``bnb+PEFT``: PEFT's ``lora.bnb.Linear4bit`` over ``bitsandbytes.nn.Linear4bit`` (double-quantized
  NF4, blocksize 64): bitsandbytes dequantizes W, multiplies, then PEFT runs the LoRA branch.
* ``lora_kernels``: the same layer after ``lora_kernels.integrations.peft.fuse`` (one
  ``qlora_linear`` call: on a GPU the Triton kernel dequantizes W tiles inside the GEMM; on a CPU
  the torch path dequantizes, then multiplies).
* ``dense GEMM`` (GPU only): ``F.linear`` with a dense bf16 weight of the same shape, no LoRA:
  cuBLAS, the prefill yardstick.

Modes: ``fwd`` (inference, no autograd) and ``fwd+bwd`` (x and the adapter need gradients; the
base is frozen). On a GPU: decode (M = 1, 4, 16) and prefill (M = 4096) at 4096x4096 and
4096x14336 in bf16, with the bandwidth of the 4-bit bytes read by a forward (packed weight +
block maxima) as a share of the device copy bandwidth measured in the same run (targets: decode
>= 3x bnb+PEFT and >= 70 % of HBM bandwidth; prefill <= 1.2x the dense GEMM); times are medians
of ``triton.testing.do_bench`` (L2 cleared before every call). On a CPU: smaller shapes in fp32,
providers timed round-robin (``lora_kernels.bench.time_side_by_side``).

    python benchmarks/bench_qlora.py [--out PATH] [--quick]

Prints a table and writes JSON (device, date, versions, copy bandwidth, rows).
"""

from __future__ import annotations

import copy
import datetime
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from _timing import copy_bandwidth, report, setup, time_us

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_kernels.bench import device_name, time_side_by_side  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
R = 16
# (K, N) and the batch rows M of each mode
GPU_SHAPES = [(4096, 4096), (4096, 14336)]
GPU_M = {"fwd": [1, 4, 16, 4096], "fwd+bwd": [16, 4096]}
CPU_SHAPES = [(1024, 1024), (1024, 3584)]
CPU_M = {"fwd": [1, 16, 256], "fwd+bwd": [16, 256]}


def _layers(k: int, n: int, dtype: torch.dtype, device: torch.device):
    """(PEFT's lora.bnb.Linear4bit, the same layer fused, the dense weight) for one shape."""
    import bitsandbytes as bnb
    import peft
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

    from lora_kernels.integrations.peft import fuse

    base = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=dtype, quant_type="nf4")
    base.weight.data.normal_(0, k**-0.5)  # still the dense weight: quantized on the move
    base = base.to(device)
    cfg = peft.LoraConfig(r=R, lora_alpha=2 * R, target_modules=["x"])
    theirs = PeftLinear4bit(base, "default", config=cfg, r=R, lora_alpha=2 * R).to(device)
    with torch.no_grad():
        theirs.lora_B["default"].weight.normal_(0, 0.02)
    ours = copy.deepcopy(theirs)
    holder = torch.nn.Module()
    holder.layer = ours
    fuse(holder)
    dense = bnb.functional.dequantize_4bit(base.weight, base.weight.quant_state).to(dtype)
    return theirs, ours, dense


def _weight_bytes(layer) -> int:
    """Bytes of the 4-bit weight a forward reads: packed nibbles and block maxima."""
    state = layer.base_layer.weight.quant_state
    total = layer.base_layer.weight.numel() * layer.base_layer.weight.element_size()
    total += state.absmax.numel() * state.absmax.element_size()
    if state.nested:
        total += state.state2.absmax.numel() * 4 + state.code.numel() * 4
    return total


def _calls(layer, x, dy, mode):
    params = [p for p in layer.parameters() if p.requires_grad]

    def fwd():
        with torch.no_grad():
            return layer(x)

    def fwd_bwd():
        for p in params:
            p.grad = None
        xg = x.detach().requires_grad_()
        layer(xg).backward(dy)

    return fwd if mode == "fwd" else fwd_bwd


def main(argv: list[str] | None = None) -> None:
    args, cuda, device, _ = setup(__doc__, argv)
    dtype = torch.bfloat16 if cuda else torch.float32
    shapes = GPU_SHAPES if cuda else CPU_SHAPES
    modes = GPU_M if cuda else CPU_M
    missing: dict[str, str] = {}
    try:
        import bitsandbytes  # noqa: F401
        import peft  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"bench_qlora needs bitsandbytes and peft: {e}") from e
    bandwidth = copy_bandwidth(device, cuda, args.quick)
    rows = []
    table_rows: list[dict] = []  # the shared schema's rows: one per provider and case
    for k, n in shapes:
        theirs, ours, dense = _layers(k, n, dtype, device)
        nbytes = _weight_bytes(ours)
        for mode, ms in modes.items():
            for m in ms:
                x = torch.randn(m, k, dtype=dtype, device=device)
                dy = torch.randn(m, n, dtype=dtype, device=device)
                providers = {
                    "bnb+PEFT": _calls(theirs, x, dy, mode),
                    "lora_kernels": _calls(ours, x, dy, mode),
                }
                if cuda and mode == "fwd":
                    providers["dense GEMM"] = lambda x=x, w=dense: F.linear(x, w)
                if cuda:
                    timed = {
                        name: {k: v * 1e-6 for k, v in time_us(fn, True, args.quick).items()}
                        for name, fn in providers.items()
                    }
                    timed = {
                        name: {k.replace("_us", "_s"): v for k, v in t.items()}
                        for name, t in timed.items()
                    }
                else:
                    rounds = 5 if args.quick else 15
                    timed = time_side_by_side(providers, rounds=rounds, warmup=2)
                times = {name: t["median_s"] * 1e6 for name, t in timed.items()}
                case = f"{mode} M={m} K={k} N={n} r={R} {str(dtype).replace('torch.', '')}"
                table_rows += [{"case": case, "provider": nm, **t} for nm, t in timed.items()]
                row = {"mode": mode, "M": m, "K": k, "N": n, "r": R, "dtype": str(dtype)}
                row.update({f"{name}_us": round(t, 1) for name, t in times.items()})
                row["speedup_vs_bnb_peft"] = round(times["bnb+PEFT"] / times["lora_kernels"], 3)
                if mode == "fwd":
                    gbps = nbytes / (times["lora_kernels"] * 1e-6) / 1e9
                    row["weight_GBps"] = round(gbps, 1)
                    row["weight_bw_share_of_copy"] = round(gbps * 1e9 / bandwidth, 3)
                if "dense GEMM" in times:
                    row["vs_dense_gemm"] = round(times["lora_kernels"] / times["dense GEMM"], 3)
                rows.append(row)
                print(row, flush=True)
    if not cuda:
        missing["dense GEMM, GPU decode/prefill rows"] = "no CUDA device in this run"
    header = (
        f"{'mode':8} {'M':>5} {'K':>5} {'N':>6} {'bnb+PEFT us':>12} {'ours us':>10} "
        f"{'speedup':>8} {'W GB/s':>8} {'vs dense':>8}"
    )
    lines = [header]
    for row in rows:
        lines.append(
            f"{row['mode']:8} {row['M']:5d} {row['K']:5d} {row['N']:6d} "
            f"{row['bnb+PEFT_us']:12.1f} {row['lora_kernels_us']:10.1f} "
            f"{row['speedup_vs_bnb_peft']:8.2f} {row.get('weight_GBps', float('nan')):8.1f} "
            f"{row.get('vs_dense_gemm', float('nan')):8.2f}"
        )
    import bitsandbytes
    import peft

    result = {
        "benchmark": "bench_qlora",
        "device": device_name(device),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "peft": peft.__version__,
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "quick": args.quick,
        # other processes share a CI machine: the 1-minute load average at the end of the run
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "copy_bandwidth_GBps": bandwidth / 1e9,
        "rows": rows,
    }
    out = args.out or RESULTS / f"qlora_{'cuda' if cuda else 'cpu'}.json"
    report(result, "\n".join(lines), missing, out, rows=table_rows)


if __name__ == "__main__":
    main()
