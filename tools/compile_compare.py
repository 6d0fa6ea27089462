"""Compare two compile-gate reports of the same matrix, variant by variant.

``benchmarks/triton_compile_report.py --out NAME`` writes ``NAME.json``: one row per kernel x
config x target variant, in the order the drivers first launch them. Run once before and once
after a change to the kernels' source that should not change what they compile to (a loop moved
into a device function, a helper shared by two families). This tool then lists every variant
whose registers, spill bytes or shared memory moved. For each such variant it also gives the
CTAs per SM those numbers allow on the target. A move that keeps every variant spill-free, with
the same shared memory and the same CTAs per SM, keeps each kernel's occupancy. ptxas can move
its register count by a few for unrelated reasons (the inlined function's debug line labels);
such a move is harmless.

    python -m tools.compile_compare BEFORE.json AFTER.json [BEFORE2.json AFTER2.json ...]

The exit status is 1 where anything else differs:
- the two reports list different variants;
- a variant is rejected or spills after the change;
- its shared memory moves;
- its CTAs per SM move.

Otherwise the exit status is 0.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

# Per-SM limits of the compile targets (A100 for sm_80, H100/H200 for sm_90): the register file,
# registers allocated per warp in units of 256, resident warps and CTAs, and shared memory (each
# CTA also takes 1 KB the runtime reserves).
REGISTER_FILE = 65536
REGISTER_UNIT = 256
MAX_WARPS = 64
MAX_CTAS = 32
SMEM_PER_SM = {"sm_80": 164 * 1024, "sm_90": 228 * 1024}
SMEM_RESERVED = 1024

FIELDS = ("registers", "spill_bytes", "shared_bytes")


def warps(row: dict) -> int:
    """The warps per CTA of a report row, from its config (``...-w8s3``)."""
    return int(re.search(r"-w(\d+)s\d+$", row["config"]).group(1))


def ctas_per_sm(row: dict) -> int:
    """How many CTAs of the variant fit on one SM: the least of what its registers, warps and
    shared memory allow."""
    w = warps(row)
    per_warp = -(-max(row["registers"], 1) * 32 // REGISTER_UNIT) * REGISTER_UNIT
    by_registers = REGISTER_FILE // (w * per_warp)
    by_smem = SMEM_PER_SM[row["target"]] // (row["shared_bytes"] + SMEM_RESERVED)
    return min(by_registers, MAX_WARPS // w, MAX_CTAS, by_smem)


def _key(row: dict) -> tuple:
    return (row["kernel"], row["variant"], row["config"], row["target"], row["example_case"])


def compare(before: list[dict], after: list[dict]) -> tuple[list[dict], list[str]]:
    """``(moved, problems)``: one entry per variant whose registers, spills or shared memory
    moved (with the CTAs per SM before and after), and every difference beyond a register move
    that keeps the occupancy."""
    if [_key(r) for r in before] != [_key(r) for r in after]:
        return [], ["the reports list different variants (not the same matrix or drivers)"]
    moved, problems = [], []
    for b, a in zip(before, after, strict=True):
        name = f"{a['kernel']} {a['config']} {a['target']} ({a['example_case']})"
        if a["error"] or a["findings"] or a["spill_bytes"]:
            problems.append(f"{name}: {a['error'] or a['findings'] or 'spills'}")
        if any(b[f] != a[f] for f in FIELDS):
            entry = {f: (b[f], a[f]) for f in FIELDS}
            entry.update(name=name, ctas_per_sm=(ctas_per_sm(b), ctas_per_sm(a)))
            moved.append(entry)
            if b["shared_bytes"] != a["shared_bytes"]:
                problems.append(f"{name}: shared memory {b['shared_bytes']} -> {a['shared_bytes']}")
            if entry["ctas_per_sm"][0] != entry["ctas_per_sm"][1]:
                problems.append(f"{name}: CTAs per SM {entry['ctas_per_sm']}")
    return moved, problems


def main(argv: list[str]) -> int:
    if not argv or len(argv) % 2:
        print(__doc__.split("\n\n")[2], file=sys.stderr)
        return 2
    total, n_moved, status = 0, 0, 0
    print("| variant | registers | spill B | shared B | CTAs/SM |\n|---|---|---|---|---|")
    for before_path, after_path in zip(argv[::2], argv[1::2], strict=True):
        before = json.loads(Path(before_path).read_text())["rows"]
        after = json.loads(Path(after_path).read_text())["rows"]
        moved, problems = compare(before, after)
        total += len(after)
        n_moved += len(moved)
        for m in moved:
            cells = [f"{m[f][0]} -> {m[f][1]}" for f in FIELDS]
            ctas = m["ctas_per_sm"]
            print(f"| {m['name']} | " + " | ".join(cells) + f" | {ctas[0]} -> {ctas[1]} |")
        for p in problems:
            print(f"{after_path}: {p}", file=sys.stderr)
        status = status or int(bool(problems))
    print(f"\n{total} variants compared, {n_moved} moved; exit status {status}")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
