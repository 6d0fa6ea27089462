"""One tolerance rule for every kernel test.

A result computed in a low precision is compared with the fp64 reference. Its error may be at most
``FACTOR`` times the error of the same computation done by stock PyTorch in that precision, plus a
floor from the table below (the floor covers outputs where PyTorch happens to be exact). The rule
scales with K and with the data, where a fixed atol would not.
"""

from __future__ import annotations

import torch

FACTOR = 2.0

# dtype -> absolute floor, relative to the largest magnitude of the reference output.
FLOOR = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}


def assert_close_to_ref(
    name: str, actual: torch.Tensor, ref64: torch.Tensor, baseline: torch.Tensor
) -> None:
    """``actual`` and ``baseline`` (stock PyTorch in the same dtype) against the fp64 ``ref64``."""
    assert actual.shape == ref64.shape, (
        f"{name}: shape {tuple(actual.shape)} != {tuple(ref64.shape)}"
    )
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    a = actual.double()
    err = (a - ref64).abs().max().item() if a.numel() else 0.0
    base_err = (baseline.double() - ref64).abs().max().item() if a.numel() else 0.0
    scale = ref64.abs().max().item() if a.numel() else 0.0
    bound = FACTOR * base_err + FLOOR[actual.dtype] * max(scale, 1.0)
    assert err <= bound, (
        f"{name}: max error {err:.3e} > bound {bound:.3e} "
        f"(torch {actual.dtype} error {base_err:.3e}, |ref| max {scale:.3e})"
    )
