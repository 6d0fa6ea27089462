"""Minimum versions of the optional dependencies: clear messages for a missing or an old package
(the version faked with monkeypatch), and the same minimums as pyproject.toml's extras."""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import pytest

from lora_kernels import _versions
from lora_kernels._versions import MINIMUM, require


def _fake_version(monkeypatch, versions: dict[str, str | None]) -> None:
    real = _versions.installed_version
    monkeypatch.setattr(
        _versions, "installed_version", lambda d: versions[d] if d in versions else real(d)
    )


def test_missing_package_names_the_extra(monkeypatch):
    _fake_version(monkeypatch, {"peft": None})
    with pytest.raises(ImportError) as e:
        require("peft", "some feature")
    assert (
        str(e.value)
        == "some feature needs the peft package (>= 0.19): pip install 'lora_kernels[peft]'"
    )


def test_old_package_names_found_needed_and_why(monkeypatch):
    _fake_version(monkeypatch, {"peft": "0.13.2"})
    with pytest.raises(ImportError) as e:
        require("peft", "lora_kernels.integrations.peft")
    msg = str(e.value)
    assert "needs peft >= 0.19" in msg and "found peft 0.13.2" in msg
    assert "LoRA variants API" in msg and "pip install -U 'peft>=0.19'" in msg
    assert "needs the peft package" not in msg  # the old false message


@pytest.mark.parametrize(
    "found", ["0.19.0", "0.19.0.dev0", "0.19.0rc1", "0.21.2", "1.0", "0.19.0+local"]
)
def test_minimum_or_newer_passes(monkeypatch, found):
    _fake_version(monkeypatch, {"peft": found})
    require("peft", "x")


@pytest.mark.parametrize(
    ("dist", "found"), [("bitsandbytes", "0.45.5"), ("transformers", "4.44.2"), ("peft", "0.18.1")]
)
def test_each_minimum_is_enforced(monkeypatch, dist, found):
    _fake_version(monkeypatch, {dist: found})
    with pytest.raises(ImportError, match=rf"needs {dist} >= {re.escape(MINIMUM[dist][0])}"):
        require(dist, "x")


def test_an_unparsable_version_is_left_to_the_import(monkeypatch):
    _fake_version(monkeypatch, {"peft": "not-a-version"})
    require("peft", "x")


def test_integration_refuses_an_old_peft_before_importing_it(monkeypatch):
    pytest.importorskip("peft")
    _fake_version(monkeypatch, {"peft": "0.15.2"})
    monkeypatch.delitem(sys.modules, "lora_kernels.integrations.peft", raising=False)
    with pytest.raises(ImportError, match=r"lora_kernels.integrations.peft needs peft >= 0.19"):
        importlib.import_module("lora_kernels.integrations.peft")


def test_qlora_integration_refuses_an_old_bitsandbytes(monkeypatch):
    pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    _fake_version(monkeypatch, {"bitsandbytes": "0.45.0"})
    monkeypatch.delitem(sys.modules, "lora_kernels.integrations.peft_qlora", raising=False)
    with pytest.raises(ImportError, match=r"peft_qlora needs bitsandbytes >= 0.46"):
        importlib.import_module("lora_kernels.integrations.peft_qlora")


def test_pyproject_extras_state_the_same_minimums():
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    for dist, (minimum, extra, _) in MINIMUM.items():
        line = next(ln for ln in text.splitlines() if ln.startswith(f"{extra} = ["))
        assert f'"{dist}>={minimum}"' in line, (dist, line)
        for pin in re.findall(rf'"{dist}([<>=!~]=?)([0-9.]+)"', text):
            if pin[0] == ">=":
                assert pin[1] == minimum, (dist, pin)


def test_installed_versions_meet_the_minimums():
    for dist in MINIMUM:
        if _versions.installed_version(dist) is not None:
            require(dist, "this environment")


def test_one_version_source_and_the_license_file():
    """pyproject reads the version from ``lora_kernels.__version__`` (no second copy), and the
    LICENSE file is the Apache-2.0 text its ``license`` field names."""
    import lora_kernels

    root = Path(__file__).resolve().parents[1]
    text = (root / "pyproject.toml").read_text()
    project = text.split("\n[project]\n", 1)[1].split("\n[", 1)[0]
    assert 'dynamic = ["version"]' in project and not re.search(r"^version\s*=", project, re.M)
    assert 'version = { attr = "lora_kernels.__version__" }' in text
    assert re.fullmatch(r"\d+\.\d+\.\d+", lora_kernels.__version__)
    assert 'license = "Apache-2.0"' in text
    license_text = (root / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text
