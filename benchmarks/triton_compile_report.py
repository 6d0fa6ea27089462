"""Compile every Triton kernel x config for sm_80 and sm_90 and write the table of resources.

Drives the real launchers over the whole shape matrix of
``tools.compile_gate`` (``--matrix quick`` for the CI subset), compiles each
distinct variant with Triton's bundled ptxas (no GPU needed), and writes
``benchmarks/results/triton_compile_<matrix>.md`` (kernel, variant, config, target, registers, spill
bytes, shared memory, tensor-core instructions, what the gate rejects) and the same rows as JSON.
Exit status 1 when the gate rejects any variant.

    python benchmarks/triton_compile_report.py [--matrix full|quick] [--targets 80,90]

On a machine with several cores, one process per target and then ``--combine`` (the JSON files
of those runs) writes the same table in about half the time.

Uses a fresh Triton cache directory unless TRITON_CACHE_DIR is set (the ptxas log that gives
registers and spills is re-derived from the cached PTX on a cache hit).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _write_md(stem: Path, summary: dict, rows: list[dict]) -> None:
    runs = summary.get("runs", 1)
    lines = [
        f"# Triton ahead-of-time compile report ({summary['matrix']} matrix)",
        "",
        f"{summary['variants']} kernel x config x target variants compiled with triton"
        f" {summary['triton']}'s bundled ptxas in {summary['seconds']} s of compile time"
        f"{f' over {runs} runs' if runs > 1 else ''} (no GPU); {summary['spilling']} spill"
        " (the gate allows spills on fp32 layers only),"
        f" {summary['rejected']} rejected by the gate"
        f"{'' if summary['complete'] else ' (run in progress)'}. Command:"
        f" `python benchmarks/triton_compile_report.py --matrix {summary['matrix']}`.",
        "",
        "| kernel | variant | config | target | registers | spill B | shared B | mma | gate |",
        "|---|---|---|---|---:|---:|---:|---:|---|",
    ]
    for row in sorted(rows, key=lambda r: (r["kernel"], r["variant"], r["config"], r["target"])):
        verdict = "; ".join(f.split(": ", 1)[-1] for f in row["findings"]) or "ok"
        lines.append(
            f"| {row['kernel']} | {row['variant']} | {row['config']} | {row['target']} |"
            f" {row['registers']} | {row['spill_bytes']} | {row['shared_bytes']} |"
            f" {row['mma']} | {verdict} |"
        )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


def _combine(args) -> int:
    """One table from the JSON files of partial runs (e.g. one per target)."""
    parts = [json.loads(Path(f).read_text()) for f in args.combine]
    rows = [row for part in parts for row in part["rows"]]
    first = parts[0]["summary"]
    summary = {
        **first,
        "targets": sorted({t for part in parts for t in part["summary"]["targets"]}),
        "variants": len(rows),
        "rejected": sum(1 for row in rows if row["findings"]),
        "spilling": sum(1 for row in rows if row["spill_bytes"]),
        "seconds": sum(part["summary"]["seconds"] for part in parts),
        "complete": all(part["summary"]["complete"] for part in parts),
        "runs": len(parts),
    }
    stem = (
        Path(args.out)
        if args.out
        else ROOT / "benchmarks" / "results" / (f"triton_compile_{first['matrix']}")
    )
    stem.with_suffix(".json").write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    _write_md(stem, summary, rows)
    print(json.dumps(summary))
    return 1 if summary["rejected"] else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--matrix", choices=("full", "quick"), default="full")
    parser.add_argument("--targets", default="80,90")
    parser.add_argument("--families", default="", help="comma-separated; default all")
    parser.add_argument("--out", default="", help="output stem (default benchmarks/results/...)")
    parser.add_argument("--combine", nargs="+", default=[], help="JSON files of partial runs")
    args = parser.parse_args()
    if args.combine:
        return _combine(args)

    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    cache = None
    if "TRITON_CACHE_DIR" not in os.environ:
        cache = tempfile.TemporaryDirectory(prefix="lora_kernels_aot_")
        os.environ["TRITON_CACHE_DIR"] = cache.name
    sys.path.insert(0, str(ROOT))
    from tools import compile_gate as gate

    matrix = gate.FULL if args.matrix == "full" else gate.QUICK
    families = [f for f in args.families.split(",") if f] or None
    targets = [int(t) for t in args.targets.split(",")]
    start = time.time()
    done = [0]

    def progress(result):
        done[0] += 1
        if done[0] % 25 == 0:
            print(f"{done[0]} variants compiled, {time.time() - start:.0f} s", file=sys.stderr)

    results = []

    def write(complete: bool):
        seconds = time.time() - start
        rows = []
        for r in results:
            rows.append(
                {
                    "family": r.family,
                    "kernel": r.kernel,
                    "variant": r.variant,
                    "config": r.config,
                    "target": f"sm_{r.target}",
                    "registers": r.registers,
                    "spill_bytes": r.spill_bytes,
                    "shared_bytes": r.shared,
                    "dots": r.dots,
                    "mma": r.mma,
                    "sixteen_bit": r.sixteen_bit,
                    "error": r.error,
                    "findings": gate.findings(r),
                    "cases": len(r.cases),
                    "example_case": r.cases[0],
                }
            )
        bad = [row for row in rows if row["findings"]]
        spilling = [row for row in rows if row["spill_bytes"]]
        stem = (
            Path(args.out)
            if args.out
            else ROOT / "benchmarks" / "results" / f"triton_compile_{args.matrix}"
        )
        stem.parent.mkdir(parents=True, exist_ok=True)
        import triton

        summary = {
            "matrix": args.matrix,
            "targets": [f"sm_{t}" for t in targets],
            "variants": len(rows),
            "rejected": len(bad),
            "spilling": len(spilling),
            "seconds": round(seconds),
            "complete": complete,
            "triton": triton.__version__,
        }
        stem.with_suffix(".json").write_text(
            json.dumps({"summary": summary, "rows": rows}, indent=1)
        )
        _write_md(stem, summary, rows)

        return summary, bad

    for capability in targets:
        for family in families or gate.LAUNCHER_MODULES:
            launches = gate.capture(family, capability, matrix)
            results += gate.compile_launches(family, launches, capability, progress)
            summary, bad = write(False)
    summary, bad = write(True)
    print(json.dumps(summary))
    for row in bad:
        print("\n".join(row["findings"]))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
