"""``FusedLoraEmbedding``: a drop-in ``nn.Embedding`` with named LoRA adapters, PEFT's
``lora.Embedding`` on the ``lora_embedding`` kernels.

It subclasses ``nn.Embedding``, so the table's state_dict key (``weight``) is unchanged. Adapters
use PEFT's names and layout: ``lora_embedding_A[name]`` ``[r, num_embeddings]`` and
``lora_embedding_B[name]`` ``[embedding_dim, r]`` (``nn.ParameterDict``), with ``scaling``,
``r``, ``lora_alpha`` beside them::

    y = weight[ids] + scaling[a] * lora_embedding_A[a].T[ids] @ lora_embedding_B[a].T

As in PEFT, the adapter starts as A = 0, B ~ N(0, 1) (the layer equals the base), dropout is not
applied to an embedding's LoRA branch, ``padding_idx`` rows give A no gradient, and ``merge()``
folds ``scaling * (B @ A).T`` into the table. Adapters train; the table is frozen.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..functional.embedding import lora_embedding, lora_embedding_multi
from .base import LoraLayer

__all__ = ["FusedLoraEmbedding"]


def adapter_tensor(table: nn.ParameterDict, name: str) -> nn.Parameter:
    """``table[name]`` without ``ParameterDict.__getitem__``'s attribute lookup (about 10 us a
    call on a CPU: visible on a decode-sized forward, which reads four of them)."""
    return table._parameters[name]


def unsupported_embedding_options(embedding: nn.Embedding) -> list[str]:
    """The ``nn.Embedding`` options the kernels do not reproduce (PEFT passes them to its A lookup:
    ``max_norm`` renormalises A in place, the others change the gradient's form)."""
    found = []
    if embedding.max_norm is not None:
        found.append(f"max_norm={embedding.max_norm}")
    if embedding.scale_grad_by_freq:
        found.append("scale_grad_by_freq=True")
    if embedding.sparse:
        found.append("sparse=True")
    return found


class FusedLoraEmbedding(LoraLayer, nn.Embedding):
    """``nn.Embedding`` plus named LoRA adapters (PEFT's ``lora.Embedding`` layout), computed by
    the fused gather + low-rank kernel. Build one with :meth:`from_embedding`, or construct it with
    ``nn.Embedding``'s arguments and ``r``, ``lora_alpha``, ``use_rslora``, ``init_lora_weights``
    (``True``/``"gaussian"``: A zeros, B normal, as PEFT; ``False``: both normal),
    ``adapter_name`` and ``backend``."""

    adapter_tables = ("lora_embedding_A", "lora_embedding_B")
    layer_name = "FusedLoraEmbedding"
    base_noun = "table"

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        *,
        r: int = 8,
        lora_alpha: float = 8,
        use_rslora: bool = False,
        init_lora_weights: bool | str = True,
        adapter_name: str = "default",
        device=None,
        dtype=None,
        backend: str = "auto",
    ) -> None:
        super().__init__(
            num_embeddings, embedding_dim, padding_idx=padding_idx, device=device, dtype=dtype
        )
        self._init_lora_state(backend)
        if r:
            self.add_adapter(
                adapter_name, r, lora_alpha, use_rslora=use_rslora,
                init_lora_weights=init_lora_weights,
            )  # fmt: skip

    def _init_lora_state(self, backend: str) -> None:
        self.weight.requires_grad_(False)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self._init_adapter_state(backend)

    @classmethod
    def from_embedding(
        cls,
        embedding: nn.Embedding,
        *,
        r: int = 8,
        lora_alpha: float = 8,
        use_rslora: bool = False,
        init_lora_weights: bool | str = True,
        adapter_name: str = "default",
        backend: str = "auto",
    ) -> FusedLoraEmbedding:
        """A ``FusedLoraEmbedding`` sharing ``embedding``'s table (no copy; frozen)."""
        fn = "FusedLoraEmbedding.from_embedding"
        if not isinstance(embedding, nn.Embedding):
            raise TypeError(
                f"{fn}: expected embedding to be an nn.Embedding, got {type(embedding).__name__}"
            )
        bad = unsupported_embedding_options(embedding)
        if bad:
            raise ValueError(f"{fn}: the kernels do not compute an embedding with {', '.join(bad)}")
        layer = cls(
            embedding.num_embeddings,
            embedding.embedding_dim,
            padding_idx=embedding.padding_idx,
            r=0,
            device="meta",
            dtype=embedding.weight.dtype,
            backend=backend,
        )
        layer._adopt_base(embedding, backend)
        if r:
            layer.add_adapter(
                adapter_name, r, lora_alpha, use_rslora=use_rslora,
                init_lora_weights=init_lora_weights,
            )  # fmt: skip
        return layer

    # ------------------------------------------------------------------------------------
    # adapters
    # ------------------------------------------------------------------------------------

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        """The trainable tensors of adapter ``name``: ``[lora_embedding_A, lora_embedding_B]``."""
        return [self.lora_embedding_A[name], self.lora_embedding_B[name]]

    def add_adapter(
        self,
        name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: bool | str = True,
    ) -> None:
        """Add adapter ``name`` (rank ``r``); the first one added becomes active. ``lora_dropout``
        is accepted for symmetry with ``FusedLoraLinear`` and, as in PEFT, not applied."""
        self._check_new_adapter(name, r, init_lora_weights)
        kw = {"device": self.weight.device, "dtype": self.weight.dtype}
        a = torch.empty(r, self.num_embeddings, **kw)
        b = torch.empty(self.embedding_dim, r, **kw)
        with torch.no_grad():
            if init_lora_weights is False:
                a.normal_()
            else:
                a.zero_()
            b.normal_()
        self.lora_embedding_A[name] = nn.Parameter(a)
        self.lora_embedding_B[name] = nn.Parameter(b)
        self._register_adapter(name, r, lora_alpha, use_rslora)

    # ------------------------------------------------------------------------------------
    # merge
    # ------------------------------------------------------------------------------------

    def _merge_operands(self, name: str):
        """``(weight, a, b)`` with ``weight += scale * b @ a`` the merge: the table ``[V, D]``
        gets ``scale * (B A)^T = scale * A^T B^T`` (transposed views, no copy)."""
        return (
            self.weight.data,
            self.lora_embedding_B[name].data.T,
            self.lora_embedding_A[name].data.T,
        )

    # ------------------------------------------------------------------------------------
    # forward
    # ------------------------------------------------------------------------------------

    def forward(self, ids: torch.Tensor, adapter_names: list[str] | None = None) -> torch.Tensor:
        """``ids [...] -> [..., embedding_dim]`` with the active adapter; ``adapter_names`` (one
        per row of 1-D ids or per sequence of 2-D ids, ``"__base__"`` for none) runs a mixed
        batch, each adapter getting the gradient of its own rows."""
        if adapter_names is not None:
            return self._mixed_batch_forward(ids, adapter_names)
        name = self._active_adapter
        if name is None or self.merged:
            return F.embedding(ids, self.weight, self.padding_idx)
        return lora_embedding(
            ids,
            self.weight,
            adapter_tensor(self.lora_embedding_A, name),
            adapter_tensor(self.lora_embedding_B, name),
            self.scaling[name],
            padding_idx=self.padding_idx,
            backend=self.backend,
        )

    def _mixed_batch_forward(self, ids: torch.Tensor, adapter_names: list[str]) -> torch.Tensor:
        used = self._check_adapter_names(
            adapter_names,
            ids.shape[0] if ids.dim() in (1, 2) else -1,
            "row of 1-D ids or per sequence of 2-D ids, i.e. "
            f"{ids.shape[0] if ids.dim() else 0} names for ids of shape {list(ids.shape)}",
        )
        if not used:
            return F.embedding(ids, self.weight, self.padding_idx)
        lora_a, lora_b = stack_embedding_adapters(
            [self.lora_embedding_A[n] for n in used], [self.lora_embedding_B[n] for n in used]
        )
        index = {n: i for i, n in enumerate(used)}
        adapter_ids = self._row_ids([index.get(n, -1) for n in adapter_names], ids.device)
        return lora_embedding_multi(
            ids,
            self.weight,
            lora_a,
            lora_b,
            [self.scaling[n] for n in used],
            adapter_ids,
            padding_idx=self.padding_idx,
            backend=self.backend,
        )

    def to_base_module(self) -> nn.Module:
        """An ``nn.Embedding`` sharing this layer's (possibly merged) table: what
        ``merge_and_unload`` puts back in the model."""
        with torch.device("meta"):
            plain = nn.Embedding(
                self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx
            )
        plain.weight = self.weight
        return plain

    def extra_repr(self) -> str:
        adapters = self._adapters_repr()
        return f"{super().extra_repr()}, adapters=[{adapters}], active={self._active_adapter!r}"


def stack_embedding_adapters(a_list, b_list):
    """``lora_a [L, r_max, V]`` and ``lora_b [L, D, r_max]`` of the adapters' A ``[r, V]`` and
    B ``[D, r]``, zero-padded to the largest rank, inside autograd (each adapter's tensors get
    the gradient of its own rows)."""
    r_max = max(a.shape[0] for a in a_list)
    dtypes = {t.dtype for t in (*a_list, *b_list)}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    lora_a = torch.stack([F.pad(a.to(dtype), (0, 0, 0, r_max - a.shape[0])) for a in a_list])
    lora_b = torch.stack([F.pad(b.to(dtype), (0, r_max - b.shape[1])) for b in b_list])
    return lora_a, lora_b
