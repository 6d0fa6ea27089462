"""``FusedLoraLinear4bit``: LoRA adapters over a bitsandbytes 4-bit (NF4 / FP4) base (QLoRA).

The layer holds the base exactly as ``bitsandbytes.nn.Linear4bit`` does: ``weight`` is the same
``Params4bit`` (packed bytes, its ``quant_state`` beside it), shared, never copied or repacked,
and its state_dict has ``Linear4bit``'s keys (``weight``, ``weight.absmax``, ``weight.quant_map``,
..., ``bias``). Everything else is :class:`~lora_kernels.nn.FusedLoraLinear`'s adapter API
(``lora_A`` / ``lora_B`` ModuleDicts, ``scaling``, add / set / delete adapter, ``adapter_names``
rows), and the forward is one :func:`~lora_kernels.qlora.qlora_linear` call::

    y = (x' @ W.T + b + scaling[a] * lora_B[a](lora_A[a](dropout[a](x')))).to(x.dtype)
    x' = x.to(compute_dtype),  W = dequantize(weight, quant_state) in compute_dtype

``compute_dtype`` is the base layer's (``bnb_4bit_compute_dtype``), or x's dtype when unset, as in
bitsandbytes. New adapters are float32, as PEFT makes them on a 4-bit base.

Merging is PEFT's lossy operation: ``merge()`` dequantizes W, adds ``scaling * B @ A`` in fp32 and
quantizes the sum again with the same settings (bitsandbytes' ``quantize_4bit``); ``unmerge()``
subtracts the same way. Neither gives back the exact weight (``merge(exact=True)`` is refused).
bitsandbytes is imported only there, and by the caller who built the base layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..functional.qlora import as_quant4bit, dequantize_4bit, qlora_linear
from .linear import FusedLoraLinear

__all__ = ["FusedLoraLinear4bit"]


def _is_4bit_linear(module: object) -> bool:
    return isinstance(module, nn.Linear) and hasattr(getattr(module, "weight", None), "quant_state")


def _unpack_cpu_format(layer: nn.Module) -> None:
    """bitsandbytes repacks a CPU weight into an AVX512 layout on its first inference call there;
    the kernels read the standard layout, so put it back (bitsandbytes' own inverse, as its
    ``_save_to_state_dict`` does)."""
    weight = layer.weight
    if getattr(weight.quant_state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(
            weight.data, weight.quant_state
        )


class FusedLoraLinear4bit(FusedLoraLinear):
    """A bitsandbytes ``Linear4bit`` base plus named LoRA adapters on the fused 4-bit kernels.

    Build it with :meth:`from_linear` (or ``FusedLoraLinear.from_linear`` /
    ``get_lora_model``, which come here for a 4-bit base).
    """

    layer_name = "FusedLoraLinear4bit"
    compute_dtype: torch.dtype | None = None

    def __init__(self, *args, **kwargs) -> None:
        # A layer made from sizes would hold no packed weight and no quant_state: it could
        # never run. The base must be a quantized bitsandbytes Linear4bit.
        raise TypeError(
            "FusedLoraLinear4bit cannot be constructed from sizes: its base is a quantized "
            "bitsandbytes Linear4bit (packed weight + quant_state); build it with "
            "FusedLoraLinear4bit.from_linear(linear4bit, r=..., lora_alpha=...) (or "
            "FusedLoraLinear.from_linear / get_lora_model, which come here for a 4-bit base)"
        )

    @classmethod
    def wraps(cls, module: nn.Module) -> bool:
        """A module whose weight carries a bitsandbytes ``quant_state`` (``Linear4bit``)."""
        return hasattr(getattr(module, "weight", None), "quant_state")

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        *,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: bool | str = True,
        adapter_name: str = "default",
        backend: str = "auto",
    ) -> FusedLoraLinear4bit:
        """A layer that shares ``linear``'s 4-bit weight and bias (frozen); ``linear`` is a
        quantized ``bitsandbytes.nn.Linear4bit`` (moved to its device, so quantized)."""
        fn = "FusedLoraLinear4bit.from_linear"
        if not _is_4bit_linear(linear):
            raise TypeError(
                f"{fn}: expected a bitsandbytes Linear4bit (an nn.Linear whose weight has a "
                f"quant_state), got {type(linear).__name__}"
            )
        if linear.weight.quant_state is None:
            raise ValueError(
                f"{fn}: the Linear4bit is not quantized yet (weight.quant_state is None); "
                "bitsandbytes quantizes it when it is moved to a device: call .to(device) first"
            )
        _unpack_cpu_format(linear)
        as_quant4bit(fn, linear.weight.quant_state)  # a clear error now rather than at forward
        layer = cls.__new__(cls)
        FusedLoraLinear.__init__(
            layer,
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            r=0,
            device="meta",
            backend=backend,
        )
        layer._adopt_base(linear, backend)
        layer.compute_dtype = getattr(linear, "compute_dtype", None)
        if r:
            layer.add_adapter(
                adapter_name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights
            )
        return layer

    def add_adapter(
        self,
        name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: bool | str = True,
    ) -> None:
        """Add adapter ``name`` (rank ``r``, float32 weights). No ``use_dora``: DoRA's norm
        needs a dense weight, which a 4-bit base does not keep."""
        super().add_adapter(name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights)

    @property
    def quant_state(self):
        """bitsandbytes' ``QuantState`` of the base weight."""
        return self.weight.quant_state

    def _adapter_factory_kwargs(self) -> dict:
        return {"device": self.weight.device, "dtype": torch.float32}

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        return self.compute_dtype or x.dtype

    def _dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_4bit(self.weight, self.quant_state, dtype)

    def _bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        b = self.bias
        return b if b is None or b.dtype == dtype else b.to(dtype)

    # ------------------------------------------------------------------------------------
    # forward
    # ------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, adapter_names: list[str] | None = None) -> torch.Tensor:
        """``x [..., in_features] -> [..., out_features]`` in x's dtype (see the module doc);
        ``adapter_names`` runs a mixed batch as ``FusedLoraLinear`` does, on the dequantized
        base."""
        cd = self._compute_dtype(x)
        xc = x if x.dtype == cd else x.to(cd)
        if adapter_names is not None:
            y = self._mixed_batch_forward(xc, adapter_names)
            return y.to(x.dtype)
        name = self._active_adapter
        if name is None or self.merged:
            y = F.linear(xc, self._dense_weight(cd), self._bias(cd))
            return y.to(x.dtype)
        dropout = self.lora_dropout[name]
        x_lora = dropout(xc) if (self.training and isinstance(dropout, nn.Dropout)) else None
        y = qlora_linear(
            xc,
            self.weight,
            self.quant_state,
            self._bias(cd),
            self.lora_A[name].weight,
            self.lora_B[name].weight,
            self.scaling[name],
            x_lora=x_lora,
            backend=self.backend,
        )
        return y.to(x.dtype)

    def _mixed_batch_forward(self, x: torch.Tensor, adapter_names: list[str]) -> torch.Tensor:
        # The multi-adapter kernels take a dense weight: dequantized once per call here (no fused
        # 4-bit multi-adapter kernel yet). Their adapters must share x's dtype, and so must the
        # bias: one kept in another dtype (bitsandbytes allows it) runs as a frozen copy.
        bias = self.bias
        if bias is None or bias.dtype == x.dtype:
            return super()._mixed_batch_forward(x, adapter_names)
        self.bias = nn.Parameter(bias.detach().to(x.dtype), requires_grad=False)
        try:
            return super()._mixed_batch_forward(x, adapter_names)
        finally:
            self.bias = bias

    # ------------------------------------------------------------------------------------
    # merge (PEFT's lossy requantization)
    # ------------------------------------------------------------------------------------

    def _requantize_(self, delta_sign: float, name: str) -> None:
        """``weight <- quantize(dequantize(weight) + sign * scaling * B @ A)``, same settings."""
        import bitsandbytes as bnb

        state = self.quant_state
        w = self._dense_weight(torch.float32)
        a = self.lora_A[name].weight.detach().float()
        b = self.lora_B[name].weight.detach().float()
        w.addmm_(b, a, alpha=delta_sign * self.scaling[name])
        if not torch.isfinite(w).all():
            raise ValueError(
                f"FusedLoraLinear4bit.merge: adapter {name!r} gives non-finite merged weights; "
                "the base weight is unchanged"
            )
        old = self.weight
        new = bnb.nn.Params4bit(
            w.to(state.dtype or torch.float32),
            requires_grad=False,
            blocksize=state.blocksize,
            compress_statistics=state.nested,
            quant_type=state.quant_type,
            quant_storage=getattr(old, "quant_storage", torch.uint8),
        )
        self.weight = new.to(old.device)

    def merge(self, adapter_name: str | None = None, exact: bool = False) -> None:
        """Fold ``adapter_name`` (default: the active adapter) into the 4-bit weight, lossily:
        dequantize, add ``scaling * B @ A`` (fp32), quantize again (PEFT's ``merge`` on
        ``Linear4bit``). ``exact=True`` is refused: a 4-bit weight cannot be restored bit for
        bit once requantized."""
        if exact:
            raise ValueError(
                "FusedLoraLinear4bit.merge: exact=True is not possible on a 4-bit base (the "
                "merged weight is quantized again); use exact=False, PEFT's lossy merge, or keep "
                "the adapter unmerged (the fused kernel costs little at any batch size)"
            )
        super().merge(adapter_name)

    def _merge_adapter(self, name: str, exact: bool) -> None:
        self._requantize_(1.0, name)

    def _unmerge_adapter(self, name: str) -> None:
        """Subtract the adapter again (dequantize, subtract, quantize: lossy)."""
        self._requantize_(-1.0, name)

    def swap_merged(self, adapter_name: str) -> None:
        """``unmerge()`` then ``merge(adapter_name)``: two requantizations."""
        self._check_known("swap_merged", adapter_name)
        if self.merged_adapters != [adapter_name]:
            self.unmerge()
            self.merge(adapter_name)

    def to_base_module(self) -> nn.Module:
        """A ``bitsandbytes.nn.Linear4bit`` holding this layer's (possibly merged) 4-bit weight."""
        import bitsandbytes as bnb

        state = self.quant_state
        plain = bnb.nn.Linear4bit(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            compute_dtype=self.compute_dtype,
            compress_statistics=state.nested,
            quant_type=state.quant_type,
            device="meta",
        )
        plain.weight = self.weight
        plain.bias = self.bias
        plain.quant_state = state
        return plain

    # ------------------------------------------------------------------------------------
    # state_dict: Linear4bit's keys
    # ------------------------------------------------------------------------------------

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for key, value in self.quant_state.as_dict(packed=True).items():
            destination[prefix + "weight." + key] = value if keep_vars else value.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):  # fmt: skip
        # The quant_state entries describe the packed weight stored beside them; a load that
        # carries them replaces both (bitsandbytes' from_prequantized), otherwise the weight
        # bytes are copied into the existing packed tensor.
        quant_keys = [
            k for k in state_dict if k.startswith(prefix + "weight.") and k != prefix + "weight"
        ]
        if quant_keys and prefix + "weight" in state_dict:
            from bitsandbytes.nn import Params4bit

            stats = {k[len(prefix + "weight.") :]: state_dict[k] for k in quant_keys}
            old = self.weight
            self.weight = Params4bit.from_prequantized(
                data=state_dict[prefix + "weight"], quantized_stats=stats, device=old.device
            )
            state_dict = {
                k: v
                for k, v in state_dict.items()
                if k not in quant_keys and k != prefix + "weight"
            }
            # the weight was taken whole above: load the rest (bias, adapters) the usual way
            missing_before = set(missing_keys)
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                          missing_keys, unexpected_keys, error_msgs)  # fmt: skip
            missing_keys[:] = [
                k for k in missing_keys if k in missing_before or k != prefix + "weight"
            ]
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)  # fmt: skip
