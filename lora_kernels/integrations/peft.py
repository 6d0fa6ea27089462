"""Run a PEFT model's LoRA Linear layers on lora_kernels, in place, with PEFT's API unchanged.

``fuse(peft_model)`` changes the class of every ``peft.tuners.lora.layer.Linear`` in the model to
:class:`FusedPeftLinear`, a subclass whose ``forward`` computes

    y = base_layer(x) + scaling[a] * lora_B[a](lora_A[a](dropout[a](x)))     a: active adapter

in one ``lora_kernels.lora_linear`` call when that is exactly what PEFT would compute: one active
adapter present in the layer, vanilla LoRA or DoRA (no other variant, no ``lora_bias``), a plain
``nn.Linear`` base layer without hooks, ``fan_in_fan_out=False``, not merged, adapters enabled,
no extra forward arguments, and dtypes the kernel takes. Anything else runs PEFT's own forward,
so every PEFT feature keeps its exact behaviour. Nothing else changes: parameters, state_dict
keys, ``set_adapter``, ``merge``/``unmerge``, ``merge_and_unload``, ``save_pretrained``,
hotswapping, Trainer. A mixed ``adapter_names`` batch (a different adapter per sequence) runs in
one ``lora_kernels.lora_linear_multi`` call under the same conditions for each adapter it uses
(and no dropout in training mode); otherwise PEFT's per-adapter loop runs it.

A DoRA adapter (PEFT's ``DoraLinearVariant``) runs in one ``lora_kernels.dora_linear`` call under
the same conditions: PEFT's output and gradients (the norm detached, dropout on the whole DoRA
branch), with ``||W||_row^2`` cached on the base layer and no ``[N, K]`` temporary. A mixed batch
with a DoRA adapter stays on PEFT (which refuses it).

Layers PEFT creates after ``fuse`` (an adapter added for new target modules) are plain PEFT layers
until ``fuse`` is called again. ``unfuse`` restores PEFT's class.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

try:
    from peft.tuners.lora.dora import DoraLinearLayer as _DoraLinearLayer
    from peft.tuners.lora.layer import Linear as PeftLoraLinear
    from peft.tuners.lora.variants import DoraLinearVariant as _DoraLinearVariant
except ImportError as e:  # pragma: no cover - exercised only without peft installed
    raise ImportError(
        "lora_kernels.integrations.peft needs the peft package: pip install 'lora_kernels[peft]'"
    ) from e

from .._dora_layer import cached_weight_sq_norm
from ..dora import dora_linear
from ..functional import lora_linear, lora_linear_multi
from ..nn import BASE_ADAPTER

__all__ = ["FusedPeftLinear", "fuse", "unfuse"]


class FusedPeftLinear(PeftLoraLinear):
    """PEFT's LoRA ``Linear`` whose forward runs the fused kernel where it computes PEFT's math.

    Instances are made by :func:`fuse` (a class swap), never constructed directly.
    """

    lora_kernels_backend = "auto"

    def _plain_layer(self, x: torch.Tensor) -> bool:
        """Whether the base layer is one the kernel can replace for input ``x``."""
        if self.disable_adapters or self.merged or self.fan_in_fan_out:
            return False
        base = self.base_layer
        if type(base) is not nn.Linear or base._forward_hooks or base._forward_pre_hooks:
            return False
        w = base.weight
        if not x.is_floating_point() or x.dtype != w.dtype or x.device != w.device:
            return False
        return base.bias is None or base.bias.dtype == w.dtype

    def _vanilla(
        self, name: str, x: torch.Tensor, training_dropout_ok: bool, dora_ok: bool = False
    ) -> bool:
        """Whether adapter ``name`` is plain LoRA (or, with ``dora_ok``, PEFT's DoRA on a
        ``Linear``) in a form the kernel takes."""
        if self.lora_bias.get(name, False):
            return False
        if name in self.lora_variant and not (dora_ok and self._plain_dora(name, x)):
            return False
        lora_a, lora_b = self.lora_A[name], self.lora_B[name]
        if type(lora_a) is not nn.Linear or type(lora_b) is not nn.Linear:
            return False
        if lora_a.bias is not None or lora_b.bias is not None:
            return False
        dropout = self.lora_dropout[name]
        if type(dropout) is nn.Dropout:
            if dropout.training and dropout.p > 0 and not training_dropout_ok:
                return False
        elif type(dropout) is not nn.Identity:
            return False
        a, b = lora_a.weight, lora_b.weight
        return a.dtype in (x.dtype, torch.float32) and b.dtype == a.dtype and a.device == x.device

    def _plain_dora(self, name: str, x: torch.Tensor) -> bool:
        """Whether adapter ``name`` is PEFT's DoRA for Linear layers, with its magnitude."""
        variant = self.lora_variant[name]
        if type(variant) is not _DoraLinearVariant and variant is not _DoraLinearVariant:
            return False
        if name not in self.lora_magnitude_vector:
            return False
        dora = self.lora_magnitude_vector[name]
        if type(dora) is not _DoraLinearLayer or dora.fan_in_fan_out:
            return False
        m = dora.weight
        return m.device == x.device and m.dtype in (x.dtype, torch.float32)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        names = kwargs.get("adapter_names")
        if not args and set(kwargs) <= {"adapter_names"} and self._plain_layer(x):
            if names is None:
                active = [a for a in self.active_adapters if a in self.lora_A]
                if len(active) == 1 and self._vanilla(
                    active[0], x, training_dropout_ok=True, dora_ok=True
                ):
                    return self._single(x, active[0])
            elif isinstance(names, (list, tuple)) and x.dim() >= 2 and len(names) == len(x):
                used = [n for n in dict.fromkeys(names) if n in self.lora_A]
                same_dtype = len({self.lora_A[n].weight.dtype for n in used}) == 1
                if (
                    used
                    and same_dtype
                    and all(self._vanilla(n, x, training_dropout_ok=False) for n in used)
                ):
                    return self._mixed(x, list(names), used)
        return super().forward(x, *args, **kwargs)

    def _single(self, x: torch.Tensor, name: str) -> torch.Tensor:
        base = self.base_layer
        dropout = self.lora_dropout[name]
        x_lora = dropout(x) if isinstance(dropout, nn.Dropout) and dropout.training else None
        if name in self.lora_variant:  # DoRA (checked by _plain_dora)
            return dora_linear(
                x,
                base.weight,
                base.bias,
                self.lora_A[name].weight,
                self.lora_B[name].weight,
                self.lora_magnitude_vector[name].weight,
                self.scaling[name],
                x_lora=x_lora,
                weight_sq_norm=cached_weight_sq_norm(base, self.lora_kernels_backend),
                backend=self.lora_kernels_backend,
            )
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

    def _mixed(self, x: torch.Tensor, names: list[str], used: list[str]) -> torch.Tensor:
        """PEFT's ``_mixed_batch_forward`` in one call: row (or sequence) i runs adapter
        ``names[i]``; ``"__base__"`` and adapters this layer lacks run the base layer only."""
        a_w = [self.lora_A[n].weight for n in used]
        b_w = [self.lora_B[n].weight for n in used]
        r_max = max(w.shape[0] for w in a_w)
        # Zero-padded to the largest rank inside autograd, so each adapter's weights get the
        # gradient of their own rows.
        lora_a = torch.stack([F.pad(w, (0, 0, 0, r_max - w.shape[0])) for w in a_w])
        lora_b = torch.stack([F.pad(w, (0, r_max - w.shape[1])) for w in b_w])
        ranks = torch.tensor([w.shape[0] for w in a_w], dtype=torch.int32, device=x.device)
        index = {n: i for i, n in enumerate(used)}
        ids = torch.tensor(
            [index.get(n, -1) if n != BASE_ADAPTER else -1 for n in names],
            dtype=torch.int32,
            device=x.device,
        )
        x3 = x if x.dim() <= 3 else x.reshape(x.shape[0], -1, x.shape[-1])
        y = lora_linear_multi(
            x3,
            self.base_layer.weight,
            self.base_layer.bias,
            lora_a,
            lora_b,
            [self.scaling[n] for n in used],
            ids,
            ranks=ranks,
            backend=self.lora_kernels_backend,
        )
        return y.reshape(*x.shape[:-1], y.shape[-1])


def _check_module(fn: str, model: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: expected a PEFT model (an nn.Module), got {type(model).__name__}")


def _qlora():
    """The QLoRA half (``_peft_qlora``), imported only when bitsandbytes is loaded: a model with
    PEFT's 4-bit layers has loaded it; otherwise there are none to fuse."""
    if "bitsandbytes" not in sys.modules:
        return None
    try:
        from . import _peft_qlora
    except ImportError:  # a PEFT without bitsandbytes 4-bit support
        return None
    return _peft_qlora


def fuse(peft_model: nn.Module, *, backend: str = "auto") -> nn.Module:
    """Make every PEFT LoRA ``Linear`` of ``peft_model`` run on lora_kernels; returns the model.

    In place and reversible (:func:`unfuse`). ``backend`` is passed to ``lora_linear``.
    PEFT's QLoRA layers (``lora.bnb.Linear4bit``) run on the fused 4-bit kernels
    (``_peft_qlora.py``); other subclasses of PEFT's ``Linear`` (8-bit and other quantised
    layers and the like) are left alone.
    Raises ``ValueError`` when the model has no PEFT LoRA ``Linear`` layer.
    """
    fn = "lora_kernels.integrations.peft.fuse"
    _check_module(fn, peft_model)
    layers = [m for m in peft_model.modules() if type(m) in (PeftLoraLinear, FusedPeftLinear)]
    qlora = _qlora()
    layers_4bit = [] if qlora is None else qlora.peft_4bit_layers(peft_model)
    if not layers and not layers_4bit:
        raise ValueError(
            f"{fn}: found no peft.tuners.lora.layer.Linear in the model; "
            "is it a PEFT LoRA model (get_peft_model / PeftModel.from_pretrained)?"
        )
    for m in layers:
        m.__class__ = FusedPeftLinear
        m.lora_kernels_backend = backend
    if layers_4bit:
        qlora.fuse_4bit(layers_4bit, backend)
    return peft_model


def unfuse(peft_model: nn.Module) -> nn.Module:
    """Give every layer :func:`fuse` changed PEFT's own class back; returns the model."""
    _check_module("lora_kernels.integrations.peft.unfuse", peft_model)
    for m in peft_model.modules():
        if type(m) is FusedPeftLinear:
            m.__class__ = PeftLoraLinear
            del m.lora_kernels_backend
    qlora = _qlora()
    if qlora is not None:
        qlora.unfuse_4bit(peft_model)
    return peft_model
