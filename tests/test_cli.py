"""The lora-kernels command: info and bench (the demo: test_demo.py)."""

from __future__ import annotations

import csv
import json

import pytest

from lora_kernels import cli


def test_info_json(capsys):
    assert cli.main(["info", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["backends"][-1] == "torch"
    assert data["torch"] and data["cuda_extension"]
    assert "cpu" in data["devices"]


def test_bench_writes_every_provider(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = ["bench", "--shape", "5,32,24,4", "--rounds", "3", "--device", "cpu"]
    assert cli.main([*args, "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "FusedLoraLinear" in table and "nn.Linear (base only)" in table
    data = json.loads(out.read_text())
    assert data["schema"] == "lora_kernels.bench/1" and data["benchmark"] == "cli_bench"
    assert data["env"]["date"] and data["env"]["machine"].startswith("CPU")
    providers = {(row["mode"], row["provider"]) for row in data["rows"]}
    for mode in ("forward", "forward+backward"):
        for name in ("nn.Linear (base only)", "naive torch LoRA", "FusedLoraLinear"):
            assert (mode, name) in providers
    for row in data["rows"]:
        assert row["median_s"] > 0 and row["n"] == 3
        assert row["commit"] and row["machine"] == data["env"]["machine"]
        assert "torch=" in row["versions"] and "lora_kernels=" in row["versions"]
    with open(out.with_suffix(".csv"), newline="") as f:
        table_rows = list(csv.DictReader(f))
    assert len(table_rows) == len(data["rows"])
    assert {"benchmark", "case", "provider", "median_s", "commit", "machine"} <= set(table_rows[0])


def test_unknown_arguments_are_refused():
    with pytest.raises(SystemExit):
        cli.main(["info", "--bogus"])
