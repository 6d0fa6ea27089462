"""The package's layout, drawn from its imports (``tools/import_layers.py``): no import circles,
no import that points up DESIGN.md's tiers, at the module and the package grain."""

import pytest

from tools import import_layers


@pytest.mark.parametrize("grain", ["module", "package"])
def test_no_import_circles_and_none_points_up(grain):
    found = import_layers.layout(grain)
    assert found["circles"] == []
    assert found["up_imports"] == []


def test_every_module_is_a_room_with_a_tier():
    found = import_layers.layout("module")
    assert "lora_kernels.layers.base" in found["floor_of"]
    # the bottom tier imports nothing of the package
    for bottom in ("lora_kernels.envs", "lora_kernels._constants", "lora_kernels.reference"):
        assert found["floor_of"][bottom] == 0


def test_the_drawing_sees_a_circle(tmp_path, monkeypatch):
    """The checker itself: a two-module circle and an up-import are found."""
    pkg = tmp_path / "lora_kernels"
    (pkg / "layers").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "envs.py").write_text("from .layers import a\n")
    (pkg / "layers" / "__init__.py").write_text("")
    (pkg / "layers" / "a.py").write_text("from . import b\n")
    (pkg / "layers" / "b.py").write_text("def f():\n    from . import a\n")
    monkeypatch.setattr(import_layers, "ROOT", tmp_path)
    found = import_layers.layout("module")
    assert found["circles"] == [["lora_kernels.layers.a", "lora_kernels.layers.b"]]
    assert ("lora_kernels.envs", "lora_kernels.layers.a") in found["up_imports"]
