"""The oldest Triton the package accepts: stated once, equal in pyproject.toml, checked at import.

An older Triton must not break ``import lora_kernels`` (the torch path still runs); the Triton
backend is then unavailable, and asking for it says which version is there and which is needed.
"""

from __future__ import annotations

import inspect
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import tomllib

from lora_kernels.backends.triton import MIN_TRITON, triton_version_problem

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("version", ["3.0.0", "3.2.0", "3.3.1", "2.3.1"])
def test_older_triton_is_named_with_the_minimum(version):
    problem = triton_version_problem(version)
    assert problem is not None
    assert f"triton {version} is installed" in problem
    assert "triton >= 3.4" in problem


@pytest.mark.parametrize("version", ["3.4.0", "3.9.0", "3.10.0+git1a2b3c", "4.0.0"])
def test_recent_triton_is_accepted(version):
    assert triton_version_problem(version) is None


def test_pyproject_states_the_same_minimum():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    bounds = [d for d in meta["project"]["dependencies"] if d.startswith("triton")]
    assert bounds == ["triton>=3.4; platform_system == 'Linux'"]
    assert MIN_TRITON == (3, 4)


def test_installed_triton_has_what_the_minimum_is_for():
    triton = pytest.importorskip("triton")
    params = inspect.signature(triton.autotune).parameters
    assert "do_bench" in params and "cache_results" in params


def test_import_with_an_old_triton_leaves_the_torch_path_and_names_the_problem():
    """A stand-in ``triton`` module of version 3.2.0: the package imports, the torch backend
    runs, and ``backend="triton"`` raises with both versions in the message."""
    script = textwrap.dedent(
        """
        import sys, types
        old = types.ModuleType("triton")
        old.__version__ = "3.2.0"
        old.language = types.ModuleType("triton.language")
        sys.modules["triton"] = old
        sys.modules["triton.language"] = old.language
        import torch
        import lora_kernels as lk
        assert "triton" not in lk.available_backends(), lk.available_backends()
        x, w = torch.randn(2, 8), torch.randn(4, 8)
        a, b = torch.randn(2, 8), torch.randn(4, 2)
        lk.lora_linear(x, w, None, a, b, 0.5, backend="torch")
        try:
            lk.lora_linear(x, w, None, a, b, 0.5, backend="triton")
        except ValueError as exc:
            print(exc)
        else:
            raise SystemExit("backend='triton' ran on triton 3.2.0")
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "triton 3.2.0 is installed" in done.stdout
    assert "triton >= 3.4" in done.stdout
