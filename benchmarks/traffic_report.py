"""Memory traffic per kernel family and shape: bytes moved / compulsory bytes, no GPU needed.

Decode (M = 1..16) is memory-bound on every GPU, so ``moved / compulsory`` is its speed relative
to the memory floor. Each row runs one forward launcher of a family under the Triton interpreter
with the CUDA tile configs (``tools/traffic.py``: the tiles and split counts an H100 with 132 SMs
picks, the first candidate of every autotuned launch) and counts every load, store and atomic in
32-byte sectors, per operand, against the bytes the call must move (each operand once, each
output once; for multi-adapter and embedding calls only the adapters and rows the call uses).

Sampling: each launch runs at most ``--sample`` programs (default 8: the first, the last and 6
evenly between, weighted to stand for the whole grid; see ``tools/traffic.py``). Exact where the
interior programs move the same bytes, which holds for every shape here (they divide by the
tiles) except where data picks addresses (4-bit codes, adapter ids: estimates, within 0.1% of
the full count on the shapes checked). Without it a 4096 x 14336 QLoRA decode would take about
20 minutes on 2 cores, and a prefill GEMM hours; ``--sample 0`` counts every program. The
multi-adapter gather decode rows always count every program: only the first K split of their
split GEMM reads lora_b and the bias, so a sample would undercount them.

Not counted: torch work inside a launcher (allocations, ``sort``, ``zero_``), and backward
launches (this report is about the forward, i.e. decode and prefill).

    TRITON_INTERPRET=1 python benchmarks/traffic_report.py            # every row (~20 min, 2 cores)
    TRITON_INTERPRET=1 python benchmarks/traffic_report.py --only qlora --decode-only

Writes ``benchmarks/results/traffic_report.{md,json}`` (or ``--out STEM``) after every row. Each
row is shown beside the same row of ``--before`` (default: ``traffic_before.json`` there, the
numbers before issue 24's decode work; ``--before none`` for none); ``--freeze PATH`` writes this
run's rows, compacted (ratios and per-operand bytes), as such a baseline.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402

from tools import traffic, traffic_cases  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "traffic_report"
# The ratios before issue 24's decode work (a compact copy of a run's JSON, see --freeze):
# every later run shows its rows beside these.
DEFAULT_BEFORE = ROOT / "benchmarks" / "results" / "traffic_before.json"
BIG = [(4096, 4096), (4096, 14336)]


def rows() -> list[dict]:
    """Every (family, call, shape) of the report; ``run(sample)`` returns its Report."""
    out = []

    def add(family, call, shape, run, decode):
        out.append({"family": family, "call": call, "shape": shape, "run": run, "decode": decode})

    for m in (1, 16, 4096):
        for k, n in BIG:
            for r in (16, 64):
                add(
                    "lora_linear", "lora_linear_fwd", {"M": m, "K": k, "N": n, "r": r},
                    lambda s, m=m, k=k, n=n, r=r: traffic_cases.lora_linear(m, k, n, r, sample=s),
                    m <= 16,
                )  # fmt: skip
    multi = [
        (16, 1, "gather"), (16, 8, "gather"), (16, 16, "gather"), (64, 64, "gather"),
        (16, 8, "grouped"), (4096, 1, "grouped"), (4096, 8, "grouped"), (4096, 64, "grouped"),
    ]  # fmt: skip
    for m, distinct, strategy in multi:
        for k, n in BIG if (m, distinct) == (16, 8) else BIG[:1]:
            for r in (16, 64) if (m, distinct, strategy, n) == (16, 8, "gather", 4096) else (16,):
                shape = {"M": m, "K": k, "N": n, "r": r, "distinct": distinct, "pool": 64}
                add(
                    "multi_" + strategy, "lora_linear_multi_fwd", shape,
                    # gather decode splits K and only split 0 reads lora_b and the bias: its
                    # programs differ, so every one is counted (176 at K = N = 4096)
                    lambda s, m=m, k=k, n=n, r=r, d=distinct, st=strategy: traffic_cases.multi(
                        m, k, n, r, distinct=d, pool=64, strategy=st,
                        sample=None if st == "gather" and m <= 16 else s,
                    ),
                    m <= 64,
                )  # fmt: skip
    qlora = [
        (1, "nf4", True, 16), (1, "fp4", True, 16), (1, "nf4", False, 16), (1, "nf4", True, 64),
        (16, "nf4", True, 16), (16, "fp4", True, 16), (4096, "nf4", True, 16),
    ]  # fmt: skip
    for m, quant, nested, r in qlora:
        for k, n in BIG if (m <= 16 and nested and r == 16) else BIG[:1]:
            shape = {"M": m, "K": k, "N": n, "r": r, "quant": quant, "double_quant": nested}
            add(
                f"qlora_{quant}", "qlora_linear_fwd", shape,
                lambda s, m=m, k=k, n=n, r=r, q=quant, nd=nested: traffic_cases.qlora(
                    m, k, n, r, quant=q, nested=nd, sample=s
                ),
                m <= 16,
            )  # fmt: skip
    for m, adapters in ((1, 1), (16, 1), (16, 8), (4096, 1), (4096, 8)):
        shape = {"M": m, "V": 32000, "D": 4096, "r": 16, "adapters": adapters}
        add(
            "embedding", "lora_embedding_fwd", shape,
            lambda s, m=m, a=adapters: traffic_cases.embedding(
                m, 32000, 4096, 16, adapters=a, sample=s
            ),
            m <= 16,
        )  # fmt: skip
    for m in (1, 16, 4096):
        add(
            "dora", "dora_linear_fwd", {"M": m, "K": 4096, "N": 4096, "r": 16},
            lambda s, m=m: traffic_cases.dora(m, 4096, 4096, 16, sample=s),
            m <= 16,
        )  # fmt: skip
    add(
        "dora_norm", "dora_weight_norm", {"K": 4096, "N": 4096, "r": 16},
        lambda s: traffic_cases.dora_norm(4096, 4096, 16, sample=s),
        False,
    )  # fmt: skip
    for (k, n), r in (((4096, 4096), 16), ((4096, 4096), 64), ((4096, 14336), 16)):
        add(
            "merge", "merge_", {"K": k, "N": n, "r": r},
            lambda s, k=k, n=n, r=r: traffic_cases.merge(k, n, r, sample=s),
            False,
        )  # fmt: skip
    return out


def _shape_text(shape: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items())


def _tiles_text(launches: list[dict]) -> str:
    """``kernel MxNxK (R=.., ...; programs)`` per launch, from its BLOCK_* constexprs."""
    parts = []
    for launch in launches:
        meta = {k[6:]: v for k, v in launch["meta"].items() if k.startswith("BLOCK_")}
        main = "x".join(str(meta.pop(d)) for d in "MNK" if d in meta)
        extra = ", ".join(f"{k}={v}" for k, v in meta.items() if k not in ("SIZE", "SIZE2"))
        name = launch["kernel"].strip("_").removesuffix("_kernel")
        inner = "; ".join(p for p in (extra, f"{launch['programs']} programs") if p)
        parts.append(f"{name} {main} ({inner})".replace("  ", " "))
    return "<br>".join(parts)


def _excess_text(report: dict, top: int = 3) -> str:
    """The operands moving the most bytes beyond their compulsory ones."""
    ops = sorted(report["operands"].items(), key=lambda kv: kv[1]["moved"] - kv[1]["compulsory"])[
        ::-1
    ]
    parts = []
    for name, o in ops[:top]:
        excess = o["moved"] - o["compulsory"]
        if excess <= 0.01 * report["compulsory"]:
            break
        times = f"{o['ratio']:.0f}x" if o["ratio"] is not None else "not compulsory"
        parts.append(f"{name} +{excess / 2**20:.2f} MiB ({times})")
    return ", ".join(parts) or "-"


def tile_implied(report: dict, shape: dict) -> int | None:
    """Compulsory bytes plus the re-reads a GEMM's tiling implies: x once per N-block column,
    the weight once per M-block row (``ceil(N / BLOCK_N)`` and ``ceil(M / BLOCK_M)`` reads).
    Taken from the launch that reads the weight in BLOCK_M x BLOCK_N tiles (not a DoRA kernel,
    not the pass that finishes a split-K decode GEMM); None for calls that have none
    (embedding, merge, the DoRA norm)."""
    ops = report["operands"]
    weight = "weight" if "weight" in ops else "qweight" if "qweight" in ops else None
    if weight is None or "x" not in ops:
        return None
    gemms = [
        launch
        for launch in report["launches"]
        if {"BLOCK_M", "BLOCK_N"} <= set(launch["meta"])
        and "dora" not in launch["kernel"]
        and "finish" not in launch["kernel"]
    ]
    if not gemms:
        return None
    meta = gemms[-1]["meta"]
    reads_x = -(-shape["N"] // meta["BLOCK_N"])
    reads_w = -(-shape["M"] // meta["BLOCK_M"])
    w_bytes = sum(
        ops[k]["compulsory"] for k in (weight, "absmax", "code", "absmax2", "code2", "offset")
        if k in ops
    )  # fmt: skip
    return report["compulsory"] + ops["x"]["compulsory"] * (reads_x - 1) + w_bytes * (reads_w - 1)


def _meta(args, seconds: float) -> dict:
    def git(*cmd):
        try:
            return subprocess.run(
                ["git", *cmd], cwd=ROOT, capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    # the report's own files are rewritten while it runs: not a change to the code measured
    status = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results")
    from lora_kernels.bench import device_name

    return {
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool((status or "").strip()),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": device_name("cpu") + ", shared",
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "numpy": np.__version__,
        "model": {
            "sector_bytes": traffic.SECTOR,
            "tile_configs": "CUDA (tools.traffic.count(cuda_configs=True))",
            "sms": traffic.H100_SMS,
            "autotune_candidate": 0,
            "sample_programs_per_launch": args.sample or None,
            "dtype": "float16",
        },
        "argv": sys.argv[1:],
        "seconds": round(seconds, 1),
    }


def _row_key(row: dict) -> tuple:
    return (row["family"], row["call"], json.dumps(row["shape"], sort_keys=True))


def _compact(row: dict) -> dict:
    """A row reduced to what a later run compares with: ratios and per-operand bytes."""
    rep = row["report"]
    keep = ("moved", "raw", "compulsory", "ratio", "raw_ratio")
    return {
        **{k: row[k] for k in ("family", "call", "shape", "decode", "tile_implied")},
        "report": {
            **{k: rep[k] for k in keep},
            "operands": {
                name: {k: o[k] for k in ("moved", "raw", "compulsory", "ratio")}
                for name, o in rep["operands"].items()
            },
        },
    }


def load_before(path: Path | None) -> tuple[dict, dict | None]:
    """``({row key: row}, meta)`` of a baseline JSON (a full or a frozen run), or empty."""
    if path is None or not path.exists():
        return {}, None
    data = json.loads(path.read_text())
    return {_row_key(r): r for r in data["rows"]}, data["meta"]


def _ratio_text(after: float, before: dict | None) -> str:
    if before is None or abs(before["report"]["ratio"] - after) < 5e-4:
        return f"{after:.3f}"
    return f"{after:.3f} (was {before['report']['ratio']:.3f})"


def _markdown(meta: dict, results: list[dict]) -> str:
    lines = [
        "# Memory traffic per kernel (moved / compulsory bytes, 32-byte sectors)",
        "",
        "Written by `benchmarks/traffic_report.py` (the method is in its docstring and in "
        "`tools/traffic.py`). Forward launchers, fp16, CUDA tile configs (H100, 132 SMs, first "
        "autotune candidate), counted under the Triton interpreter; "
        f"{meta['model']['sample_programs_per_launch'] or 'all'} programs per launch counted.",
        "",
        f"Commit `{meta['commit']}`{' (dirty)' if meta['dirty'] else ''}, {meta['date']}, "
        f"{meta['machine']}, torch {meta['torch']}, triton {meta['triton']}."
        + (
            f" Compared with `{meta['before']['path']}` (commit `{meta['before']['commit']}`)."
            if meta.get("before")
            else ""
        ),
        "",
        "## Headline: decode, K = N = 4096 (embedding V = 32000, D = 4096), r = 16",
        "",
        "| kernel | call | M=1 | M=16 | M=64 |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    heads: dict[tuple, dict] = {}
    for res in results:
        s = res["shape"]
        if not res["decode"] or s.get("r") != 16:
            continue
        if (s.get("K"), s.get("N")) != (4096, 4096) and s.get("D") != 4096:
            continue
        if s.get("double_quant") is False or s.get("adapters", 1) != 1:
            continue
        key = (res["family"], res["call"], s.get("distinct"))
        heads.setdefault(key, {})[s["M"]] = res
    for (family, call, distinct), by_m in heads.items():
        label = family + (f" ({distinct} distinct)" if distinct else "")
        cells = " | ".join(
            _ratio_text(by_m[m]["report"]["ratio"], by_m[m].get("before")) if m in by_m else "-"
            for m in (1, 16, 64)
        )
        lines.append(f"| {label} | `{call}` | {cells} |")
    lines.append("")
    families: dict[str, list[dict]] = {}
    for res in results:
        families.setdefault(res["family"], []).append(res)
    any_before = any(res.get("before") for res in results)
    for family, group in families.items():
        lines += [
            f"## {family}",
            "",
            "| shape | tiles | compulsory MiB | moved MiB | moved / compulsory "
            + ("| before " if any_before else "")
            + "| raw / compulsory | moved / tile-implied | largest excess |",
            "| --- | --- | ---: | ---: | ---: "
            + ("| ---: " if any_before else "")
            + "| ---: | ---: | --- |",
        ]
        for res in group:
            rep = res["report"]
            implied = res.get("tile_implied")
            implied_text = f"{rep['moved'] / implied:.3f}" if implied else "-"
            before = res.get("before")
            before_text = ""
            if any_before:
                before_text = f"| {before['report']['ratio']:.3f} " if before else "| - "
            lines.append(
                f"| {_shape_text(res['shape'])} | {_tiles_text(rep['launches'])} "
                f"| {rep['compulsory'] / 2**20:.2f} | {rep['moved'] / 2**20:.2f} "
                f"| **{rep['ratio']:.3f}** {before_text}| {rep['raw_ratio']:.3f} | {implied_text} "
                f"| {_excess_text(rep)} |"
            )
        lines.append("")
    lines += [
        "Moved counts 32 x the distinct sectors each access instruction of each program "
        "touches (masked lanes excluded), so a re-read counts every time; raw counts the "
        "active lanes' bytes. Tile-implied: the compulsory bytes plus x read once per "
        "N-block column and the weight once per M-block row of the GEMM's tile (what "
        "prefill must re-read through L2 at that tile; at decode it adds only x's re-reads). "
        "Per-operand numbers are in the JSON.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    # A sampled launch leaves parts of its outputs unwritten, and a later launch reading them
    # computes on garbage (numpy warns of overflow, invalid values): counts do not depend on it.
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton.runtime.interpreter")
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="path stem (.md, .json)")
    parser.add_argument("--sample", type=int, default=8, help="programs per launch (0: all)")
    parser.add_argument("--only", action="append", help="family prefix (repeatable)")
    parser.add_argument("--decode-only", action="store_true")
    parser.add_argument("--before", default=str(DEFAULT_BEFORE), help="baseline JSON, or none")
    parser.add_argument("--freeze", type=Path, help="also write this run as a compact baseline")
    args = parser.parse_args(argv)
    before_path = None if args.before == "none" else Path(args.before)
    before_rows, before_meta = load_before(before_path)
    if not traffic._interpreting_triton():
        parser.error("set TRITON_INTERPRET=1 (counting runs under the Triton interpreter)")
    todo = [
        r
        for r in rows()
        if (not args.only or any(r["family"].startswith(p) for p in args.only))
        and (r["decode"] or not args.decode_only)
    ]
    start = time.time()
    results = []
    for i, row in enumerate(todo, 1):
        t0 = time.time()
        rep = row["run"](args.sample or None)
        res = {k: row[k] for k in ("family", "call", "shape", "decode")}
        res["report"] = rep.as_dict()
        res["tile_implied"] = tile_implied(res["report"], row["shape"])
        res["seconds"] = round(time.time() - t0, 1)
        res["before"] = before_rows.get(_row_key(res))
        results.append(res)
        print(
            f"[{i}/{len(todo)}] {row['family']} {_shape_text(row['shape'])}: "
            f"{rep.ratio:.3f} ({res['seconds']} s)",
            flush=True,
        )
        meta = _meta(args, time.time() - start)
        if before_meta is not None:
            meta["before"] = {"path": _rel(before_path), "commit": before_meta.get("commit")}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(
            json.dumps({"meta": meta, "rows": results}, indent=1) + "\n"
        )
        args.out.with_suffix(".md").write_text(_markdown(meta, results))
    if args.freeze:
        frozen = {"meta": meta, "rows": [_compact(r) for r in results]}
        args.freeze.write_text(json.dumps(frozen, indent=1) + "\n")
    print(args.out.with_suffix(".md").read_text())
    return 0


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


if __name__ == "__main__":
    raise SystemExit(main())
