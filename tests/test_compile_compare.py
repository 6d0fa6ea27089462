"""tools/compile_compare.py: occupancy per variant and what counts as a harmless register move."""

from __future__ import annotations

import json

import pytest

from tools import compile_compare as cc


def _row(registers=128, warps=4, shared=16384, target="sm_90", spill=0, case="fwd M1"):
    return {
        "kernel": "_k", "variant": "x:fp16", "config": f"fixed:M16-N64-w{warps}s3",
        "target": target, "registers": registers, "spill_bytes": spill, "shared_bytes": shared,
        "error": None, "findings": [], "example_case": case,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("row", "ctas"),
    [
        (_row(128, 4, 16384), 4),  # registers: 128 x 32 x 4 = 16384 a CTA, 4 in 65536
        (_row(129, 4, 16384), 3),  # 129 allocates as 136: 17408 a CTA
        (_row(255, 8, 1024), 1),  # 256 x 32 x 8 = 65536: one CTA
        (_row(32, 4, 0), 16),  # warps: 64 / 4
        (_row(32, 1, 0), 32),  # the CTA cap
        (_row(32, 4, 100 * 1024, "sm_80"), 1),  # shared memory: 164 KB an SM on sm_80
        (_row(32, 4, 100 * 1024, "sm_90"), 2),  # and 228 KB on sm_90
    ],
)
def test_ctas_per_sm(row, ctas):
    assert cc.ctas_per_sm(row) == ctas


def test_register_moves_within_one_allocation_are_listed_not_refused():
    before = [_row(244, 4, case="a"), _row(36, 4, case="b"), _row(100, 4, case="c")]
    after = [_row(245, 4, case="a"), _row(38, 4, case="b"), _row(100, 4, case="c")]
    moved, problems = cc.compare(before, after)
    assert problems == []
    assert [m["registers"] for m in moved] == [(244, 245), (36, 38)]
    assert [m["ctas_per_sm"] for m in moved] == [(2, 2), (12, 12)]


@pytest.mark.parametrize(
    ("after", "why"),
    [
        (_row(129), "CTAs per SM"),
        (_row(128, spill=8), "spills"),
        (_row(128, shared=16400), "shared memory"),
        (_row(128, case="other"), "different variants"),
    ],
)
def test_other_changes_are_problems(after, why):
    _, problems = cc.compare([_row(128)], [after])
    assert len(problems) >= 1 and any(why in p for p in problems), problems


def test_main_exit_status(tmp_path, capsys):
    same = tmp_path / "same.json"
    same.write_text(json.dumps({"rows": [_row(128)]}))
    worse = tmp_path / "worse.json"
    worse.write_text(json.dumps({"rows": [_row(129)]}))
    assert cc.main([str(same), str(same)]) == 0
    assert cc.main([str(same), str(worse)]) == 1
    assert cc.main([str(same)]) == 2
    assert "CTAs per SM" in capsys.readouterr().err
