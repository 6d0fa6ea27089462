"""``FusedLoraLinear``: a drop-in ``nn.Linear`` with named LoRA adapters on fused kernels.

It subclasses ``nn.Linear``, so the base layer's state_dict keys (``weight``, ``bias``) are
unchanged and code that reads ``in_features``/``weight`` keeps working. Adapters live in
``lora_A[name]`` / ``lora_B[name]`` (bias-free ``nn.Linear`` inside ``nn.ModuleDict``, PEFT's
layout and key names), with ``scaling[name]``, ``r[name]``, ``lora_alpha[name]`` and
``lora_dropout[name]`` beside them::

    y = x @ W.T + b + scaling[a] * lora_B[a](lora_A[a](dropout[a](x)))      a = active_adapter

The base weight and bias are frozen; the active adapter trains. ``merge()`` folds the adapter into
``W`` (``merge_lora_``: fp32, one rounding, no ``[N, K]`` temporary) and the forward then runs the
plain GEMM; ``unmerge()`` takes it out again.

``from_linear`` also takes a transformers ``Conv1D`` (GPT-2's layers, PEFT's
``fan_in_fan_out=True``): the layer then keeps the Conv1D's ``[in, out]`` weight as it is (same
state_dict key and storage) and the kernels read its ``[out, in]`` transpose through strides, no
copy; merges go into the ``[in, out]`` storage as ``scaling * A^T B^T``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..functional.lora import lora_linear, merge_lora_
from ..functional.multi import lora_linear_multi
from .base import (
    BASE_ADAPTER,
    LoraLayer,
    cached_host_tensor,
    conv1d_class,
    init_lora_factors,
    weight_state,
)
from .dora import DoraMixin

__all__ = ["FusedLoraLinear"]


class FusedLoraLinear(DoraMixin, LoraLayer, nn.Linear):
    """``nn.Linear`` plus named LoRA adapters, computed by one fused kernel.

    Args:
        in_features, out_features, bias, device, dtype: as ``nn.Linear``.
        r: rank of the first adapter; 0 creates the layer without an adapter.
        lora_alpha: the adapter's scaling is ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with
            ``use_rslora``).
        lora_dropout: dropout probability on the LoRA branch's input (PEFT semantics: the base
            path sees the undropped input).
        init_lora_weights: ``True`` (A kaiming-uniform with a=sqrt(5), B zeros: the layer starts
            equal to the base), ``"gaussian"`` (A normal with std 1/r, B zeros) or ``False``
            (``nn.Linear``'s default init for both: the adapter starts non-zero).
        use_dora: DoRA (PEFT's ``use_dora``): the adapter also gets a trainable magnitude
            ``lora_magnitude_vector[name].weight`` [out_features] (see ``layers/dora.py``).
        adapter_name: name of the first adapter.
        backend: kernel backend for every call (``"auto"``, ``"cuda"``, ``"triton"``, ``"torch"``).
    """

    adapter_tables = ("lora_A", "lora_B", "lora_dropout", "lora_magnitude_vector")
    layer_name = "FusedLoraLinear"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: bool | str = True,
        adapter_name: str = "default",
        device=None,
        dtype=None,
        backend: str = "auto",
        use_dora: bool = False,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_lora_state(backend)
        if r:
            self.add_adapter(
                adapter_name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, use_dora
            )

    def _init_lora_state(self, backend: str) -> None:
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self._init_adapter_state(backend)
        self._init_dora_state()
        # True when ``weight`` is a transformers Conv1D's [in, out] tensor (see from_linear)
        self.fan_in_fan_out = False
        # mixed batches: every adapter stacked, and what it was stacked from (_cached_stacks)
        self._multi_stack: dict | None = None

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: bool | str = True,
        adapter_name: str = "default",
        backend: str = "auto",
        use_dora: bool = False,
    ) -> FusedLoraLinear:
        """A ``FusedLoraLinear`` that shares ``linear``'s weight and bias (no copy; both frozen).

        A bitsandbytes 4-bit ``Linear4bit`` gives a ``FusedLoraLinear4bit``
        (``layers/linear_4bit.py``: every subclass whose ``wraps(linear)`` says yes takes over).
        ``linear`` may be a transformers ``Conv1D``, whose weight is ``[in, out]``: the layer then
        has ``fan_in_fan_out=True`` and reads that weight through its transpose's strides."""
        if cls is FusedLoraLinear:
            for sub in cls.__subclasses__():
                if sub.wraps(linear):
                    if use_dora:
                        raise ValueError(
                            f"FusedLoraLinear.from_linear: DoRA on a {type(linear).__name__} base "
                            "is not supported; use_dora=True needs a dense nn.Linear or Conv1D "
                            "weight"
                        )
                    return sub.from_linear(
                        linear, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                        use_rslora=use_rslora, init_lora_weights=init_lora_weights,
                        adapter_name=adapter_name, backend=backend,
                    )  # fmt: skip
        conv1d = conv1d_class()
        is_conv1d = conv1d is not None and isinstance(linear, conv1d)
        if not isinstance(linear, nn.Linear) and not is_conv1d:
            raise TypeError(
                f"FusedLoraLinear.from_linear: expected linear to be an nn.Linear, got "
                f"{type(linear).__name__} (a transformers Conv1D is taken too)"
            )
        in_features, out_features = (
            (linear.nx, linear.nf) if is_conv1d else (linear.in_features, linear.out_features)
        )
        layer = cls(
            in_features,
            out_features,
            bias=linear.bias is not None,
            r=0,
            device="meta",
            dtype=linear.weight.dtype,
            backend=backend,
        )
        layer._adopt_base(linear, backend)
        layer.fan_in_fan_out = is_conv1d
        if r:
            layer.add_adapter(
                adapter_name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, use_dora
            )
        return layer

    @classmethod
    def wraps(cls, module: nn.Module) -> bool:
        """Whether ``from_linear`` hands ``module`` to this subclass (``FusedLoraLinear`` itself
        takes the dense bases: ``nn.Linear`` and transformers' ``Conv1D``)."""
        return False

    # ------------------------------------------------------------------------------------
    # adapters
    # ------------------------------------------------------------------------------------

    @property
    def base_weight(self) -> torch.Tensor:
        """The base weight as ``[out, in]`` (a transposed view for a Conv1D's ``[in, out]``)."""
        return self.weight.T if self.fan_in_fan_out else self.weight

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        """The trainable tensors of adapter ``name``: ``[lora_A.weight, lora_B.weight]``, and the
        DoRA magnitude when it has one."""
        params = [self.lora_A[name].weight, self.lora_B[name].weight]
        if name in self.lora_magnitude_vector:
            params.append(self.lora_magnitude_vector[name].weight)
        return params

    def _merge_operands(self, name: str):
        """``(weight, a, b)`` such that the merge is ``weight += scaling * b @ a`` on the stored
        weight: ``(W, A, B)``, or ``(W, B^T, A^T)`` for a Conv1D's ``[in, out]`` W (views)."""
        a = self.lora_A[name].weight.data
        b = self.lora_B[name].weight.data
        return (self.weight.data, b.T, a.T) if self.fan_in_fan_out else (self.weight.data, a, b)

    def add_adapter(
        self,
        name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: bool | str = True,
        use_dora: bool = False,
    ) -> None:
        """Add adapter ``name`` (rank ``r``; ``use_dora``: with a DoRA magnitude). The first
        adapter added becomes the active one."""
        fn = "FusedLoraLinear.add_adapter"
        self._check_new_adapter(name, r, init_lora_weights)
        if use_dora and self.fan_in_fan_out:
            raise ValueError(
                f"{fn}: use_dora=True needs an [out, in] weight; this layer wraps a Conv1D "
                "(fan_in_fan_out=True): run such a model through PEFT and fuse() instead"
            )
        if not 0.0 <= float(lora_dropout) < 1.0:
            raise ValueError(f"{fn}: expected lora_dropout in [0, 1), got {lora_dropout!r}")
        if not isinstance(use_dora, bool):
            raise TypeError(f"{fn}: expected use_dora to be a bool, got {use_dora!r}")
        kw = self._adapter_factory_kwargs()
        lora_a = nn.Linear(self.in_features, r, bias=False, **kw)
        lora_b = nn.Linear(r, self.out_features, bias=False, **kw)
        init_lora_factors(lora_a, lora_b, r, init_lora_weights)
        self.lora_A[name] = lora_a
        self.lora_B[name] = lora_b
        self.lora_dropout[name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self._register_adapter(name, r, lora_alpha, use_rslora)
        if use_dora:
            self.lora_magnitude_vector[name] = self._dora_init_magnitude(name)

    def _adapter_factory_kwargs(self) -> dict:
        """Device and dtype of new adapter weights: the base weight's."""
        return {"device": self.weight.device, "dtype": self.weight.dtype}

    def _dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The base weight as a dense [out, in] tensor for a product in ``dtype`` (``base_weight``
        here; a quantized subclass dequantizes)."""
        return self.base_weight

    def to_base_module(self) -> nn.Module:
        """A plain module holding this layer's (possibly merged) base weight and bias, shared:
        what ``merge_and_unload`` puts back in the model."""
        with torch.device("meta"):
            if self.fan_in_fan_out:  # the transformers Conv1D it was
                plain = conv1d_class()(self.out_features, self.in_features)
            else:
                plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        plain.weight = self.weight
        plain.bias = self.bias
        return plain

    def swap_merged(self, adapter_name: str) -> None:
        """Replace the one adapter merged with ``exact=False`` by ``adapter_name``, in one pass.

        ``W += scaling[new] * B_new @ A_new - scaling[old] * B_old @ A_old`` as one merge of the
        two adapters side by side (rank r_new + r_old, fp32, one rounding): half the passes over
        W of ``unmerge()`` then ``merge()``, and one rounding instead of two.
        """
        fn = "FusedLoraLinear.swap_merged"
        self._check_known("swap_merged", adapter_name)
        if len(self.merged_adapters) != 1 or self.merged_adapters[0] in self._exact_records:
            raise RuntimeError(
                f"{fn}: needs exactly one adapter merged with exact=False, "
                f"the layer has {self.merged_adapters}"
            )
        old = self.merged_adapters[0]
        if old == adapter_name:
            return
        if old in self.lora_magnitude_vector or adapter_name in self.lora_magnitude_vector:
            self.unmerge()  # DoRA rescales rows: no single additive pass
            self.merge(adapter_name)
            return
        pairs = ((adapter_name, 1.0), (old, -1.0))
        a = torch.cat([self.lora_A[n].weight.detach().float() for n, _ in pairs])
        b = torch.cat(
            [self.lora_B[n].weight.detach().float() * (sgn * self.scaling[n]) for n, sgn in pairs],
            dim=1,
        )
        if self.fan_in_fan_out:
            a, b = b.T, a.T
        merge_lora_(self.weight.data, a, b, 1.0, backend=self.backend)
        self.merged_adapters = [adapter_name]
        self._active_adapter = adapter_name

    # ------------------------------------------------------------------------------------
    # forward
    # ------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, adapter_names: list[str] | None = None) -> torch.Tensor:
        """``x [..., in_features] -> [..., out_features]`` with the active adapter.

        ``adapter_names`` (one name per row of a 2-D x, or per sequence of a 3-D x;
        ``"__base__"`` = no adapter) runs a mixed batch with a different adapter per row.
        """
        if adapter_names is not None:
            return self._mixed_batch_forward(x, adapter_names)
        if self._serving is not None:
            return self._serving.forward(self, x)
        name = self._active_adapter
        if name is None or self.merged:
            return F.linear(x, self.base_weight, self.bias)
        if name in self.lora_magnitude_vector:
            return self._dora_forward(x, name)
        dropout = self.lora_dropout[name]
        x_lora = dropout(x) if (self.training and isinstance(dropout, nn.Dropout)) else None
        return lora_linear(
            x,
            self.base_weight,
            self.bias,
            self.lora_A[name].weight,
            self.lora_B[name].weight,
            self.scaling[name],
            x_lora=x_lora,
            backend=self.backend,
        )

    def _mixed_batch_forward(self, x: torch.Tensor, adapter_names: list[str]) -> torch.Tensor:
        """A batch whose rows (2-D x) or sequences (x of 3 or more dims) use different adapters,
        in one ``lora_linear_multi`` call; ``"__base__"`` = no adapter (PEFT's semantics).

        Inference reads a cached stack of every adapter (``_cached_stacks``). When an adapter of
        the batch trains (grad enabled, its weights require grad), the adapters of the batch are
        stacked inside autograd on every call instead, so each one's ``lora_A``/``lora_B``
        weight gets the gradient of its own rows through ``torch.stack``. Training with
        ``lora_dropout`` applies each row's adapter's dropout to the LoRA input only, at the
        cost of a second base GEMM (``y = multi(x_drop) + (x - x_drop) @ W.T``).
        """
        used = self._check_adapter_names(
            adapter_names,
            x.shape[0] if x.dim() >= 2 else -1,
            "row of x (2-D) or per sequence (3-D and up), i.e. "
            f"{x.shape[0] if x.dim() else 0} names for x of shape {list(x.shape)}",
        )
        dora = [n for n in adapter_names if n in self.lora_magnitude_vector]
        if dora:  # DoRA rows: base rows here, then their adapter's own pass (layers/dora.py)
            lora_names = [BASE_ADAPTER if n in dora else n for n in adapter_names]
            y = self._mixed_batch_forward(x, lora_names)
            return self._dora_mixed_forward(x, y, adapter_names)
        if not used:
            return F.linear(x, self._dense_weight(x.dtype), self.bias)
        needs_grad = torch.is_grad_enabled() and any(
            self.lora_A[n].weight.requires_grad or self.lora_B[n].weight.requires_grad for n in used
        )
        if needs_grad:
            names = used
            lora_a, lora_b, scales, ranks = self._stack_adapters(names)
        else:
            names, lora_a, lora_b, scales, ranks = self._cached_stacks(used)
        index = {n: i for i, n in enumerate(names)}
        ids = [index.get(n, -1) for n in adapter_names]
        ids_t = self._row_ids(ids, x.device)
        x3 = x if x.dim() <= 3 else x.reshape(x.shape[0], -1, x.shape[-1])
        x_lora = self._mixed_dropout(x3, names, ids) if self.training else None
        weight = self._dense_weight(x.dtype)
        y = lora_linear_multi(
            x3 if x_lora is None else x_lora,
            weight,
            self.bias,
            lora_a,
            lora_b,
            scales,
            ids_t,
            ranks=ranks,
            backend=self.backend,
        )
        if x_lora is not None:
            y = y + F.linear(x3 - x_lora, weight)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _mixed_dropout(self, x: torch.Tensor, names: list[str], ids: list[int]):
        """``x`` with each row (sequence) dropped out by its adapter's ``lora_dropout``, or None
        when no adapter of the batch has dropout."""
        probs = [
            self.lora_dropout[n].p if isinstance(self.lora_dropout[n], nn.Dropout) else 0.0
            for n in names
        ]
        if not any(probs):
            return None
        p = torch.tensor([probs[i] if i >= 0 else 0.0 for i in ids], device=x.device)
        keep = (1.0 - p).to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
        return x * (torch.rand_like(x) < keep).to(x.dtype) / keep

    def _stack_adapters(self, names: list[str]):
        """``lora_a [L, r_max, K]`` and ``lora_b [L, N, r_max]`` (zero-padded), ``scales [L]``
        and ``ranks [L]`` (None when every rank is r_max) of adapters ``names``, in that order.
        Differentiable: built with ``F.pad`` and ``torch.stack``."""
        a_w = [self.lora_A[n].weight for n in names]
        b_w = [self.lora_B[n].weight for n in names]
        ranks = [w.shape[0] for w in a_w]
        r_max = max(ranks)
        dtypes = {w.dtype for w in a_w + b_w}
        dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
        lora_a = torch.stack([F.pad(w.to(dtype), (0, 0, 0, r_max - w.shape[0])) for w in a_w])
        lora_b = torch.stack([F.pad(w.to(dtype), (0, r_max - w.shape[1])) for w in b_w])
        device = self.weight.device
        scales = cached_host_tensor(self, [self.scaling[n] for n in names], torch.float64, device)
        rank_t = None
        if min(ranks) < r_max:
            rank_t = cached_host_tensor(self, ranks, torch.int32, device)
        return lora_a, lora_b, scales, rank_t

    def _adapter_state(self, name: str) -> tuple:
        return (
            self.scaling[name],
            weight_state(self.lora_A[name]),
            weight_state(self.lora_B[name]),
        )

    def _cached_stacks(self, used: list[str]):
        """``(names, lora_a, lora_b, scales, ranks)`` of every adapter, stacked once and again
        only when adapters were added or removed, or an adapter of this batch (``used``) changed
        since: in place (an optimizer step, a load), by a new weight or a new scaling. Only the
        batch's adapters are checked, O(distinct adapters) per call: a stale slice of an adapter
        no row reads does no harm, and is caught the first time a batch uses it."""
        names = tuple(self.lora_A.keys())
        inference = torch.is_inference_mode_enabled()  # inference tensors stay in inference mode
        cache = self._multi_stack
        if (
            cache is None
            or cache["names"] != names
            or cache["inference"] != inference
            or any(cache["states"][n] != self._adapter_state(n) for n in used)
        ):
            with torch.no_grad():
                stacks = self._stack_adapters(list(names))
            cache = {
                "names": names,
                "inference": inference,
                "states": {n: self._adapter_state(n) for n in names},
                "stacks": (list(names), *stacks),
            }
            self._multi_stack = cache
        return cache["stacks"]

    def extra_repr(self) -> str:
        adapters = self._adapters_repr(
            lambda n: ", dora" if n in self.lora_magnitude_vector else ""
        )
        fan = ", fan_in_fan_out=True" if self.fan_in_fan_out else ""
        return f"{super().extra_repr()}{fan}, adapters=[{adapters}], active={self.active_adapter!r}"
