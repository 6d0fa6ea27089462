"""lora_kernels.bench: the CPU timer, and the one result schema every benchmark writes."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from lora_kernels import bench


def test_time_call_on_cpu_uses_blocked_autorange():
    x = torch.randn(64, 64)
    t = bench.time_call(lambda: x @ x, seconds=0.05, min_calls=3)
    assert 0 < t["p20_s"] <= t["median_s"] <= t["p80_s"]
    assert t["n"] >= 1  # blocks of calls, each timed as one


def test_time_call_keeps_the_callers_thread_count(monkeypatch):
    seen = []
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    real = torch.utils.benchmark.Timer.__init__

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("num_threads"))
        real(self, *args, **kwargs)

    monkeypatch.setattr(torch.utils.benchmark.Timer, "__init__", spy)
    bench.time_call(lambda: None, seconds=0.01)
    assert seen == [3]


def test_timing_rows_finds_nested_timings_in_seconds():
    details = {
        "rows": [
            {"kind": "single", "M": 1, "cuda": {"median_us": 5.0, "p20_us": 4.0, "p80_us": 6.0}},
            {"kind": "multi", "M": 64, "torch": {"median_ms": 2.0, "p20_ms": 1.0, "p80_ms": 3.0}},
        ],
        "flat": [{"provider": "ours", "mode": "fwd", "median_s": 0.5, "p20_s": 0.4, "p80_s": 0.6}],
        "copy_bandwidth_GBps": 12.0,
    }
    rows = bench.timing_rows(details)
    assert [(r["case"], r["provider"]) for r in rows] == [
        ("rows/kind=single M=1", "cuda"),
        ("rows/kind=multi M=64", "torch"),
        ("mode=fwd", "ours"),
    ]
    assert rows[0]["median_s"] == pytest.approx(5e-6) and rows[1]["p80_s"] == pytest.approx(3e-3)
    assert rows[2]["mode"] == "fwd" and rows[2]["median_s"] == 0.5


def test_write_results_one_schema_json_and_csv(tmp_path):
    rows = [
        {"case": "M=7", "provider": "a", "median_s": 1e-3, "p20_s": 9e-4, "p80_s": 2e-3, "n": 5},
        {"case": "M=7", "provider": "b", "median_s": 2e-3, "extra": "x"},
    ]
    json_path, csv_path = bench.write_results(
        tmp_path / "r.json", "demo_bench", rows, details={"bandwidth": 3}
    )
    doc = json.loads(json_path.read_text())
    assert doc["schema"] == bench.SCHEMA and doc["benchmark"] == "demo_bench"
    assert doc["details"] == {"bandwidth": 3}
    env = doc["env"]
    assert env["machine"].startswith("CPU") and "torch=" in env["versions"] and env["commit"]
    for row in doc["rows"]:
        assert row["benchmark"] == "demo_bench"
        assert (row["commit"], row["machine"], row["versions"]) == (
            env["commit"], env["machine"], env["versions"]
        )  # fmt: skip
    with open(csv_path, newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["provider"] for r in table] == ["a", "b"]
    assert table[1]["extra"] == "x" and table[0]["extra"] == ""


def test_write_results_refuses_a_row_without_its_keys(tmp_path):
    with pytest.raises(ValueError, match=r"lacks \['median_s'\]"):
        bench.write_results(tmp_path / "r.json", "x", [{"case": "c", "provider": "p"}])
