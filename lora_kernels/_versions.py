"""Minimum versions of the optional dependencies, checked where they are first needed.

A bare ``try: import peft / except ImportError`` tells the user of an old PEFT that PEFT is
missing (the module it lacks is a newer one); :func:`require` says which version was found, which
one is needed and why. The minimums are those of ``pyproject.toml``'s extras (kept in step by
``tests/test_versions.py``):

* ``peft >= 0.19``: ``fuse`` builds on PEFT's LoRA variants API (``peft.tuners.lora.variants``,
  new in 0.16) and reads the LoRA ``Embedding``'s ``tp_layer`` / ``input_fns`` (new in 0.19).
* ``transformers >= 4.45``: ``transformers.pytorch_utils.Conv1D`` and the ``Auto*`` classes the
  demo loads; older releases predate torch 2.4, this package's own floor.
* ``bitsandbytes >= 0.46``: the first release whose 4-bit quantize / dequantize run on CPU tensors
  (its ``backends/default`` ops), which the 4-bit layer's lossy merge and any CPU run need.
"""

from __future__ import annotations

import importlib.metadata

from packaging.version import InvalidVersion, Version

__all__ = ["MINIMUM", "installed_version", "require"]

# distribution -> (minimum version, the extra that installs it, why that version)
MINIMUM: dict[str, tuple[str, str, str]] = {
    "peft": ("0.19", "peft", "the LoRA variants API and the Embedding layer's TP hooks"),
    "transformers": ("4.45", "peft", "transformers.pytorch_utils.Conv1D and the Auto* classes"),
    "bitsandbytes": ("0.46", "qlora", "4-bit quantize / dequantize on CPU tensors"),
}


def installed_version(dist: str) -> str | None:
    """The installed version of distribution ``dist``, or None when it is not installed."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def require(dist: str, feature: str, *, extra: str | None = None) -> None:
    """Raise ``ImportError`` unless ``dist`` is installed at :data:`MINIMUM`'s version or newer.

    ``feature`` names what needs it (the start of the message); ``extra`` overrides the extra
    named in the pip line (the demo's is ``demo``). Pre-releases of the minimum count as it.
    """
    minimum, default_extra, why = MINIMUM[dist]
    pip = f"pip install 'lora_kernels[{extra or default_extra}]'"
    found = installed_version(dist)
    if found is None:
        raise ImportError(f"{feature} needs the {dist} package (>= {minimum}): {pip}")
    try:
        ok = Version(found).release >= Version(minimum).release
    except InvalidVersion:  # a local build with an odd version string: let the import decide
        return
    if not ok:
        raise ImportError(
            f"{feature} needs {dist} >= {minimum} ({why}); found {dist} {found}: "
            f"pip install -U '{dist}>={minimum}'"
        )
