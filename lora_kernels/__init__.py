"""lora_kernels: fused LoRA matmul kernels for PyTorch.

``y = x @ W.T + bias + scale * (x @ A.T) @ B.T`` forward and backward in one pass (Triton, CUDA
C++, and a PyTorch reference that is the spec), a drop-in ``nn.Linear`` with named adapters, and
merge/unmerge in place. See the README for the tour.
"""

from . import ops  # noqa: F401  (registers the torch.library ops)
from .functional import (
    available_backends,
    lora_linear,
    lora_linear_multi,
    merge_lora_,
    unmerge_lora_,
)
from .nn import FusedLoraLinear

__version__ = "0.1.0"

__all__ = [
    "FusedLoraLinear",
    "available_backends",
    "lora_linear",
    "lora_linear_multi",
    "merge_lora_",
    "unmerge_lora_",
]
