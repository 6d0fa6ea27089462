"""lora_kernels: fused LoRA matmul kernels for PyTorch.

``y = x @ W.T + bias + scale * (x @ A.T) @ B.T`` forward and backward in one pass (Triton, CUDA
C++, and a PyTorch reference that is the spec), a drop-in ``nn.Linear`` with named adapters, and
merge/unmerge in place, batches where every row uses its own adapter, exact adapter switching
from a RAM cache, and PEFT-compatible checkpoints. See the README for the tour.
"""

from . import ops  # noqa: F401  (registers the torch.library ops)
from .backends import last_dispatch
from .functional import (
    available_backends,
    dequantize_4bit,
    dora_linear,
    dora_weight_norm,
    lora_embedding,
    lora_embedding_multi,
    lora_linear,
    lora_linear_multi,
    merge_dora_,
    merge_lora_,
    moe_lora,
    peft_expert_factors,
    peft_expert_weights,
    qlora_linear,
    unmerge_dora_,
    unmerge_lora_,
)
from .layers import FusedLoraEmbedding, FusedLoraExperts, FusedLoraLinear, FusedLoraLinear4bit
from .models.checkpoint import load_adapter, save_adapter
from .models.config import LoraConfig
from .models.model import (
    delete_adapter,
    get_lora_model,
    merge_and_unload,
    mixed_batch,
    print_trainable_parameters,
    set_adapter,
    trainable_parameters,
)
from .serving.cache import AdapterCache
from .serving.switch import release_adapters, switch_adapter

__version__ = "0.1.0"

__all__ = [
    "AdapterCache",
    "FusedLoraEmbedding",
    "FusedLoraExperts",
    "FusedLoraLinear",
    "FusedLoraLinear4bit",
    "LoraConfig",
    "delete_adapter",
    "merge_and_unload",
    "mixed_batch",
    "set_adapter",
    "trainable_parameters",
    "get_lora_model",
    "load_adapter",
    "print_trainable_parameters",
    "release_adapters",
    "save_adapter",
    "switch_adapter",
    "available_backends",
    "last_dispatch",
    "lora_embedding",
    "lora_embedding_multi",
    "lora_linear",
    "lora_linear_multi",
    "merge_lora_",
    "unmerge_lora_",
    "dora_linear",
    "dora_weight_norm",
    "merge_dora_",
    "unmerge_dora_",
    "dequantize_4bit",
    "qlora_linear",
    "moe_lora",
    "peft_expert_factors",
    "peft_expert_weights",
]
