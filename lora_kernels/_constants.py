"""Constants every tier shares, defined below all of them: what the kernel backends take (the
input checks and backend resolution both read it) and PEFT's name for "no adapter"."""

import torch

# What the Triton and CUDA kernels take (float64 runs on the torch backend only).
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The largest LoRA rank the kernels serve (Triton's rank blocks, csrc's kMaxRank).
MAX_RANK = 256

BASE_ADAPTER = "__base__"
"""The name that selects no adapter in ``adapter_names`` (PEFT's convention)."""
