"""Run a PEFT model's LoRA Linear layers on lora_kernels, in place, with PEFT's API unchanged.

``fuse(peft_model)`` changes the class of every ``peft.tuners.lora.layer.Linear`` in the model to
:class:`FusedPeftLinear`, a subclass whose ``forward`` computes

    y = base_layer(x) + scaling[a] * lora_B[a](lora_A[a](dropout[a](x)))     a: active adapter

in one ``lora_kernels.lora_linear`` call when that is exactly what PEFT would compute: one active
adapter present in the layer, vanilla LoRA (no DoRA or other variant, no ``lora_bias``), a plain
``nn.Linear`` base layer without hooks, ``fan_in_fan_out=False``, not merged, adapters enabled,
no extra forward arguments, and dtypes the kernel takes. Anything else runs PEFT's own forward,
so every PEFT feature keeps its exact behaviour. Nothing else changes: parameters, state_dict
keys, ``set_adapter``, ``merge``/``unmerge``, ``merge_and_unload``, ``save_pretrained``,
hotswapping, Trainer. Mixed ``adapter_names`` batches run PEFT's own per-adapter code.

Layers PEFT creates after ``fuse`` (an adapter added for new target modules) are plain PEFT layers
until ``fuse`` is called again. ``unfuse`` restores PEFT's class.
"""

from __future__ import annotations

import torch
from torch import nn

try:
    from peft.tuners.lora.layer import Linear as PeftLoraLinear
except ImportError as e:  # pragma: no cover - exercised only without peft installed
    raise ImportError(
        "lora_kernels.integrations.peft needs the peft package: pip install 'lora_kernels[peft]'"
    ) from e

from ..functional import lora_linear

__all__ = ["FusedPeftLinear", "fuse", "unfuse"]


class FusedPeftLinear(PeftLoraLinear):
    """PEFT's LoRA ``Linear`` whose forward runs the fused kernel where it computes PEFT's math.

    Instances are made by :func:`fuse` (a class swap), never constructed directly.
    """

    lora_kernels_backend = "auto"

    def _fused_adapter(self, x: torch.Tensor, args: tuple, kwargs: dict) -> str | None:
        """The adapter to run on the kernel, or None when PEFT's own forward must run."""
        if args or kwargs or self.disable_adapters or self.merged or self.fan_in_fan_out:
            return None
        active = [a for a in self.active_adapters if a in self.lora_A]
        if len(active) != 1:
            return None
        name = active[0]
        if name in self.lora_variant or self.lora_bias.get(name, False):
            return None
        base = self.base_layer
        lora_a, lora_b = self.lora_A[name], self.lora_B[name]
        if type(base) is not nn.Linear or base._forward_hooks or base._forward_pre_hooks:
            return None
        if type(lora_a) is not nn.Linear or type(lora_b) is not nn.Linear:
            return None
        if lora_a.bias is not None or lora_b.bias is not None:
            return None
        dropout = self.lora_dropout[name]
        if type(dropout) not in (nn.Dropout, nn.Identity):
            return None
        w = base.weight
        if not x.is_floating_point() or x.dtype != w.dtype or x.device != w.device:
            return None
        if base.bias is not None and base.bias.dtype != w.dtype:
            return None
        a, b = lora_a.weight, lora_b.weight
        if a.dtype not in (w.dtype, torch.float32) or b.dtype != a.dtype or a.device != w.device:
            return None
        return name

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = self._fused_adapter(x, args, kwargs)
        if name is None:
            return super().forward(x, *args, **kwargs)
        base = self.base_layer
        dropout = self.lora_dropout[name]
        x_lora = dropout(x) if isinstance(dropout, nn.Dropout) and dropout.training else None
        return lora_linear(
            x,
            base.weight,
            base.bias,
            self.lora_A[name].weight,
            self.lora_B[name].weight,
            self.scaling[name],
            x_lora=x_lora,
            backend=self.lora_kernels_backend,
        )


def _check_module(fn: str, model: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: expected a PEFT model (an nn.Module), got {type(model).__name__}")


def fuse(peft_model: nn.Module, *, backend: str = "auto") -> nn.Module:
    """Make every PEFT LoRA ``Linear`` of ``peft_model`` run on lora_kernels; returns the model.

    In place and reversible (:func:`unfuse`). ``backend`` is passed to ``lora_linear``.
    Subclasses of PEFT's ``Linear`` (quantised layers and the like) are left alone.
    Raises ``ValueError`` when the model has no PEFT LoRA ``Linear`` layer.
    """
    fn = "lora_kernels.integrations.peft.fuse"
    _check_module(fn, peft_model)
    layers = [m for m in peft_model.modules() if type(m) in (PeftLoraLinear, FusedPeftLinear)]
    if not layers:
        raise ValueError(
            f"{fn}: found no peft.tuners.lora.layer.Linear in the model; "
            "is it a PEFT LoRA model (get_peft_model / PeftModel.from_pretrained)?"
        )
    for m in layers:
        m.__class__ = FusedPeftLinear
        m.lora_kernels_backend = backend
    return peft_model


def unfuse(peft_model: nn.Module) -> nn.Module:
    """Give every layer :func:`fuse` changed PEFT's own class back; returns the model."""
    _check_module("lora_kernels.integrations.peft.unfuse", peft_model)
    for m in peft_model.modules():
        if type(m) is FusedPeftLinear:
            m.__class__ = PeftLoraLinear
            del m.lora_kernels_backend
    return peft_model
