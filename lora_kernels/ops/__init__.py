"""``torch.library`` custom ops, one module per kernel family: schemas, fake impls, autograd, and
dispatch to a backend (``lora_kernels.backends``).

Each op takes an already resolved backend name (``"torch"``, ``"triton"`` or ``"cuda"``) and
inputs already validated by ``lora_kernels._checks``. The ops are opaque to ``torch.compile``:
their fake impls give output shapes, and ``register_autograd`` attaches the backward, itself a
custom op, so ``torch.compile(fullgraph=True)`` traces forward and backward without graph breaks.
``_family.define_family`` builds every differentiable family's ops and eager entry from its parts
(``lora_linear``, ``lora_multi``, ``lora_embedding``, ``dora``, ``qlora``); the merge and DoRA's
norms, never differentiated, are plain custom ops.
"""

from .dora import dora_linear_2d
from .lora_embedding import lora_embedding_1d
from .lora_linear import lora_linear_2d
from .lora_multi import lora_linear_multi_2d
from .merge import merge_lora_
from .moe import moe_lora_2d
from .qlora import qlora_linear_2d

__all__ = [
    "dora_linear_2d",
    "lora_embedding_1d",
    "lora_linear_2d",
    "lora_linear_multi_2d",
    "merge_lora_",
    "moe_lora_2d",
    "qlora_linear_2d",
]
