"""benchmarks/gpu_check.sh, checked on a CPU: its time budget, its step order, and a dry run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"


def _steps():
    """(name, cap) of every step and benchmark, in the order the script runs them."""
    text = SCRIPT.read_text()
    return [
        (m.group(2), int(m.group(3)))
        for m in re.finditer(r"^\s*(step|bench) (\w+) (\d+)\b", text, re.M)
    ]


def test_caps_fit_the_deadline():
    """Each name once (the dry-run and real build share one name), caps within 8 minutes."""
    text = SCRIPT.read_text()
    deadline = int(re.search(r"GPU_CHECK_SECONDS:-(\d+)", text).group(1))
    assert deadline <= 480
    caps = dict(_steps())
    assert sum(caps.values()) <= deadline, caps


def test_install_first_then_triton_tests_before_the_build():
    names = list(dict.fromkeys(name for name, _ in _steps()))
    assert names[0] == "install"
    assert names.index("tests_triton") < names.index("build") < names.index("tests_gpu")
    assert "pip install --no-build-isolation --no-deps -e ." in SCRIPT.read_text().replace(
        '"${INSTALL_ARGS[@]}"', ""
    ).replace("(-m pip install", "pip install").replace(" -e .)", " -e .")


@pytest.mark.slow
def test_dry_run(tmp_path):
    """Every step runs (pytest collects, benchmarks print --help, pip --dry-run) and the
    summary and env.json come out, with the toolchain recorded."""
    env = {**os.environ, "GPU_CHECK_DRY_RUN": "1", "PYTHON": sys.executable, "OUT": str(tmp_path)}
    proc = subprocess.run(
        ["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=400
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["dry_run"] is True
    steps = {s["step"]: s for s in summary["steps"]}
    log = (tmp_path / "gpu_check.log").read_text()
    for name in ("install", "env", "tests_triton", "build", "tests_gpu"):
        assert steps[name]["status"] == "ok", (name, log[-3000:])
    for name in (
        "bench_cuda", "bench_merge", "bench_lora_linear", "bench_multi", "bench_qlora", "bench_moe",
        "bench_serving",
    ):  # fmt: skip
        assert steps[name]["status"] in ("ok", "absent"), (name, log[-3000:])
    info = json.loads((tmp_path / "env.json").read_text())
    for key in ("gcc", "ninja", "python_headers", "nvcc_cuda", "nvcc_matches_torch_cuda"):
        assert key in info
    assert summary["total_seconds"] < 470
