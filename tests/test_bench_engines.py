"""benchmarks/bench_engines.py is GPU-only: without CUDA (or without the engine) it says why and
exits 2, before it builds anything."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location(
        "bench_engines", ROOT / "benchmarks" / "bench_engines.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_refuses_without_cuda(monkeypatch, capsys):
    bench = _load()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["--engine", "vllm", "--adapters", "2"]) == bench.REFUSED
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_refuses_without_the_engine(monkeypatch, capsys):
    bench = _load()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        bench.importlib.util, "find_spec", lambda name: None if name == "sglang" else real(name)
    )
    assert bench.main(["--engine", "sglang"]) == bench.REFUSED
    assert "needs sglang installed" in capsys.readouterr().err


def test_arguments():
    args = _load().parse_args(["--engine", "both", "--rank", "16", "--adapters", "8"])
    assert (args.engine, args.rank, args.adapters, args.worker) == ("both", 16, 8, None)
