"""LoRA layers: drop-in subclasses of the torch modules they wrap, sharing one adapter
bookkeeping (``base.AdapterState``; ``base.LoraLayer`` for the one-tensor layers).

``FusedLoraLinear`` (``nn.Linear`` and transformers' ``Conv1D``, DoRA through ``dora.DoraMixin``),
``FusedLoraLinear4bit`` (bitsandbytes ``Linear4bit``), ``FusedLoraEmbedding`` (``nn.Embedding``),
``FusedLoraExperts`` (transformers 5 fused experts, PEFT's ``target_parameters``);
:func:`lora_layer_class` picks the class for a base module.
"""

from torch import nn

from .base import BASE_ADAPTER, LoraLayer, lora_scaling
from .embedding import FusedLoraEmbedding
from .linear import FusedLoraLinear
from .linear_4bit import FusedLoraLinear4bit
from .moe import FusedLoraExperts

__all__ = [
    "BASE_ADAPTER",
    "FusedLoraEmbedding",
    "FusedLoraExperts",
    "FusedLoraLinear",
    "FusedLoraLinear4bit",
    "LoraLayer",
    "lora_layer_class",
    "lora_scaling",
]


def lora_layer_class(module: nn.Module) -> type[LoraLayer] | None:
    """The LoRA layer class that wraps ``module`` (None: no layer of ours does)."""
    if FusedLoraLinear4bit.wraps(module):
        return FusedLoraLinear4bit
    if isinstance(module, nn.Embedding):
        return FusedLoraEmbedding
    from .base import conv1d_class

    conv1d = conv1d_class()
    if isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d)):
        return FusedLoraLinear
    return None
