"""Optional packages (PEFT, transformers) imported by the test that uses them, not by its module.

``peft = optional("peft")`` at the top of a test module keeps ``peft.LoraConfig(...)`` readable in
the tests, yet imports PEFT only when a test first touches it, and skips that test alone when PEFT
is missing (``pytest.importorskip``): the module's kernel and layer tests still run without it.
"""

from __future__ import annotations

import importlib

import pytest

__all__ = ["optional"]


class _Optional:
    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str):
        # pytest's collection probes module globals for its own markers (``_pytestfixturefunction``,
        # ``pytestmark``): those must not import the package, or skip a whole module
        if attr.startswith("_") or attr == "pytestmark":
            raise AttributeError(attr)
        module = pytest.importorskip(self._name, exc_type=ImportError)  # too old counts too
        try:
            return getattr(module, attr)
        except AttributeError:  # a submodule not imported by the package itself
            return importlib.import_module(f"{self._name}.{attr}")

    def __repr__(self) -> str:
        return f"<optional module {self._name!r}>"


def optional(name: str) -> _Optional:
    """``name``, imported on first attribute access; the test that needs it skips without it."""
    return _Optional(name)
