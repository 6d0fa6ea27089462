"""Shared test setup: the Triton interpreter on machines without CUDA, a fixed seed per test,
and one tolerance rule for every kernel test."""

from __future__ import annotations

import os

import torch

# Triton reads TRITON_INTERPRET when it is first imported, and ``import lora_kernels`` imports it:
# set it before any test module is collected. A GPU run sets TRITON_INTERPRET=0 itself.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
