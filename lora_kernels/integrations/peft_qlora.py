"""PEFT's QLoRA layers (``peft.tuners.lora.bnb.Linear4bit``) on the fused 4-bit kernels.

:func:`lora_kernels.integrations.peft.fuse` imports this module only when bitsandbytes is loaded
(a model holding 4-bit layers has loaded it), and swaps the class of each such layer to
:class:`FusedPeftLinear4bit`, whose forward computes PEFT's

    result = base_layer(x) + (lora_B[a](lora_A[a](dropout[a](x.to(lora dtype)))) * scaling[a])
             .to(result dtype)

in one ``lora_kernels.qlora_linear`` call, reading the base's packed weight and ``quant_state`` as
bitsandbytes stores them, when that is PEFT's math: one active adapter, vanilla LoRA (no DoRA or
other variant, no ``lora_bias``), a ``bitsandbytes.nn.Linear4bit`` base without hooks, not merged,
adapters enabled, no autocast, x already in the base's compute dtype, adapter weights in x's dtype
or float32, no extra forward arguments. A mixed ``adapter_names`` batch runs under the same
conditions for each adapter it uses (and no dropout in training mode) on the 4-bit weight
dequantized once by ``lora_kernels.dequantize_4bit`` and one ``lora_linear_multi`` call (never
bitsandbytes' CPU GEMM, whose AVX-512 path needs N divisible by its block). Anything else runs
PEFT's own forward; merge, unmerge, save and the rest are PEFT's, untouched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._versions import require
from ..functional.qlora import dequantize_4bit, qlora_linear
from .peft_mixed import mixed_linear_forward

require("bitsandbytes", "lora_kernels.integrations.peft_qlora")

import bitsandbytes as bnb  # noqa: E402
from peft.tuners.lora.bnb import Linear4bit as PeftLoraLinear4bit  # noqa: E402

__all__ = ["FusedPeftLinear4bit", "fuse_4bit", "unfuse_4bit"]


class FusedPeftLinear4bit(PeftLoraLinear4bit):
    """PEFT's ``lora.bnb.Linear4bit`` whose forward runs the fused 4-bit kernel where it computes
    PEFT's math. Made by ``fuse`` (a class swap), never constructed directly."""

    lora_kernels_backend = "auto"

    def _get_name(self) -> str:
        # repr stays PEFT's ("lora.Linear4bit(...)")
        return "Linear4bit"

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype | None:
        """The dtype bitsandbytes computes this call in, or None when the kernel cannot stand in
        for the base layer."""
        if self.disable_adapters or self.merged or not x.is_floating_point():
            return None
        base = self.base_layer
        if not isinstance(base, bnb.nn.Linear4bit) or base._forward_hooks:
            return None
        if base._forward_pre_hooks:
            return None
        state = getattr(base.weight, "quant_state", None)
        if state is None or getattr(state, "packing_format_for_cpu", False):
            return None
        if base.weight.device != x.device or torch.is_autocast_enabled(x.device.type):
            return None
        if not base.compute_type_is_set:  # bitsandbytes fixes it on the first call: so do we
            base.set_compute_type(x)
            base.compute_type_is_set = True
        cd = base.compute_dtype or x.dtype
        return cd if cd == x.dtype else None

    def _vanilla(self, name: str, x: torch.Tensor) -> bool:
        if name in self.lora_variant or self.lora_bias.get(name, False):
            return False
        lora_a, lora_b = self.lora_A[name], self.lora_B[name]
        if type(lora_a) is not nn.Linear or type(lora_b) is not nn.Linear:
            return False
        if lora_a.bias is not None or lora_b.bias is not None:
            return False
        if type(self.lora_dropout[name]) not in (nn.Dropout, nn.Identity):
            return False
        if not getattr(self, "cast_input_dtype_enabled", True):
            return False
        a, b = lora_a.weight, lora_b.weight
        return a.dtype in (x.dtype, torch.float32) and b.dtype == a.dtype and a.device == x.device

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        names = kwargs.get("adapter_names")
        if not args and set(kwargs) <= {"adapter_names"} and self._compute_dtype(x) is not None:
            if names is None:
                active = [a for a in self.active_adapters if a in self.lora_A]
                if len(active) == 1 and self._vanilla(active[0], x):
                    return self._single(x, active[0])
            elif isinstance(names, (list, tuple)) and x.dim() >= 2 and len(names) == len(x):
                used = [n for n in dict.fromkeys(names) if n in self.lora_A]
                if len({self.lora_A[n].weight.dtype for n in used}) <= 1 and all(
                    self._vanilla(n, x) and not self._training_dropout(n) for n in used
                ):
                    return self._mixed(x, list(names), used)
        return super().forward(x, *args, **kwargs)

    def _training_dropout(self, name: str) -> bool:
        dropout = self.lora_dropout[name]
        return isinstance(dropout, nn.Dropout) and dropout.training and dropout.p > 0

    def _mixed(self, x: torch.Tensor, names: list[str], used: list[str]) -> torch.Tensor:
        base = self.base_layer
        w = dequantize_4bit(base.weight, base.weight.quant_state, x.dtype)
        bias = base.bias
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        if not used:  # "__base__" rows (and adapters this layer lacks) only
            return F.linear(x, w, bias)
        return mixed_linear_forward(self, x, w, bias, names, used)

    def _single(self, x: torch.Tensor, name: str) -> torch.Tensor:
        base = self.base_layer
        dropout = self.lora_dropout[name]
        x_lora = dropout(x) if isinstance(dropout, nn.Dropout) and dropout.training else None
        bias = base.bias
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        return qlora_linear(
            x,
            base.weight,
            base.weight.quant_state,
            bias,
            self.lora_A[name].weight,
            self.lora_B[name].weight,
            self.scaling[name],
            x_lora=x_lora,
            backend=self.lora_kernels_backend,
        )


def peft_4bit_layers(model: nn.Module) -> list[nn.Module]:
    """The model's PEFT ``lora.bnb.Linear4bit`` layers (fused or not)."""
    return [m for m in model.modules() if type(m) in (PeftLoraLinear4bit, FusedPeftLinear4bit)]


def fuse_4bit(layers: list[nn.Module], backend: str) -> None:
    for m in layers:
        m.__class__ = FusedPeftLinear4bit
        m.lora_kernels_backend = backend


def unfuse_4bit(model: nn.Module) -> None:
    for m in model.modules():
        if type(m) is FusedPeftLinear4bit:
            m.__class__ = PeftLoraLinear4bit
            del m.lora_kernels_backend
