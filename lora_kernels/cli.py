"""The ``lora-kernels`` command: ``info``, ``bench`` and ``demo``.

lora-kernels info                 versions, backends, devices, the CUDA extension's state
lora-kernels bench [--json PATH]  base vs naive LoRA vs PEFT vs FusedLoraLinear here (+ CSV)
lora-kernels demo [--quick]       fine-tune two adapters on a real model, offline, and switch
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys

import torch


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def info() -> dict:
    from . import __version__, envs
    from .backends import available_backends

    try:
        from .backends.cuda import build

        ext = build.extension_status()
    except ImportError:
        ext = "unavailable: this install has no CUDA extension loader"
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [
            f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())
        ]
    return {
        "lora_kernels": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda or "none (CPU build)",
        "triton": _version("triton"),
        "peft": _version("peft"),
        "transformers": _version("transformers"),
        "backends": available_backends(),
        "cuda_extension": ext,
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
        "devices": devices,
        **{name: value or "(unset)" for name, value in envs.describe().items()},
    }


def _cmd_info(args) -> int:
    data = info()
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    width = max(len(k) for k in data)
    for key, value in data.items():
        if isinstance(value, list):
            value = ", ".join(value)
        print(f"{key:<{width}}  {value}")
    return 0


_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _cmd_bench(args) -> int:
    from .bench import bench_layers, device_name, format_table, write_results

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    shapes = args.shape or ["512,1024,1024,16", "16,2048,2048,16"]
    rows = []
    for spec in shapes:
        m, k, n, r = (int(v) for v in spec.split(","))
        rows += bench_layers(
            m, k, n, r, dtype=_DTYPES[args.dtype], device=device, rounds=args.rounds
        )
    print(f"device: {device_name(device)}; torch {torch.__version__}; median of {args.rounds}")
    print(format_table(rows))
    if args.json:
        json_path, csv_path = write_results(
            args.json, "cli_bench", rows, device=device, details={"info": info()}
        )
        print(f"wrote {json_path} and {csv_path}")
    return 0


def _cmd_demo(args, rest: list[str]) -> int:
    from . import demo

    return demo.main(rest) or 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lora-kernels", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="versions, backends, devices")
    p_info.add_argument("--json", action="store_true", help="print JSON")
    p_bench = sub.add_parser("bench", help="quick layer benchmark on this device")
    p_bench.add_argument(
        "--shape", action="append", help="M,K,N,r (repeatable; default two shapes)"
    )
    p_bench.add_argument("--dtype", choices=sorted(_DTYPES), default="fp32")
    p_bench.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    p_bench.add_argument("--rounds", type=int, default=30, help="timed rounds per provider")
    p_bench.add_argument("--json", default=None, help="also write the rows to this JSON file")
    sub.add_parser(
        "demo",
        help="fine-tune two adapters on a real model and switch (offline)",
        add_help=False,  # --help reaches the demo's own parser
    )
    args, rest = parser.parse_known_args(argv)
    if args.command == "demo":
        return _cmd_demo(args, rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return {"info": _cmd_info, "bench": _cmd_bench}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
