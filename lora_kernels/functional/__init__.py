"""The functional front door: one module per kernel family, each entry point validating its
inputs (``lora_kernels._checks``), resolving the backend (``lora_kernels.backends``) and calling
its family's op (``lora_kernels.ops``).

``lora``: ``lora_linear``, ``merge_lora_``, ``unmerge_lora_``; ``multi``: ``lora_linear_multi``;
``embedding``: ``lora_embedding``, ``lora_embedding_multi``; ``dora``: ``dora_linear``,
``dora_weight_norm``, ``merge_dora_``, ``unmerge_dora_``; ``qlora``: ``qlora_linear``,
``dequantize_4bit``; ``moe``: ``moe_lora`` (LoRA on a mixture-of-experts layer's experts) and
PEFT's expert factor layout (``peft_expert_factors``, ``peft_expert_weights``).
"""

from ..backends import available_backends
from .dora import dora_linear, dora_weight_norm, merge_dora_, unmerge_dora_, weight_sq_norm
from .embedding import lora_embedding, lora_embedding_multi
from .lora import lora_linear, merge_lora_, unmerge_lora_
from .moe import moe_lora, peft_expert_factors, peft_expert_weights
from .multi import lora_linear_multi
from .qlora import Quant4bit, as_quant4bit, dequantize_4bit, qlora_linear

__all__ = [
    "Quant4bit",
    "as_quant4bit",
    "available_backends",
    "dequantize_4bit",
    "dora_linear",
    "dora_weight_norm",
    "lora_embedding",
    "lora_embedding_multi",
    "lora_linear",
    "lora_linear_multi",
    "merge_dora_",
    "merge_lora_",
    "moe_lora",
    "peft_expert_factors",
    "peft_expert_weights",
    "qlora_linear",
    "unmerge_dora_",
    "unmerge_lora_",
    "weight_sq_norm",
]
