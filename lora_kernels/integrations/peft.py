"""Run a PEFT model's LoRA layers on lora_kernels, in place, PEFT's API and behaviour unchanged.

``fuse(peft_model)`` changes the class of every PEFT layer listed in :data:`FUSED_CLASSES` to our
subclass of it, whose ``forward`` runs the kernels when that is exactly what PEFT would compute
and PEFT's own ``forward`` otherwise:

* ``lora.Linear`` -> :class:`FusedPeftLinear`: ``y = base_layer(x) + scaling[a] *
  lora_B[a](lora_A[a](dropout[a](x)))`` in one ``lora_linear`` call, on an ``nn.Linear`` base or
  a transformers ``Conv1D`` (GPT-2, ``fan_in_fan_out``: its ``[in, out]`` weight is read through
  the strides of its transpose, no copy);
* ``lora.Embedding`` -> :class:`FusedPeftEmbedding`: ``y = base_layer(x) + scaling[a] *
  lora_embedding_A[a].T[x] @ lora_embedding_B[a].T`` in one ``lora_embedding`` call.
* ``lora.ParamWrapper`` on the ``gate_up_proj`` / ``down_proj`` of a transformers 5 fused-experts
  module (``target_parameters``) -> :class:`FusedPeftParamWrapper`: the experts with their LoRA
  in one ``moe_lora`` call (the outermost wrapper computes the whole nest), where PEFT adds
  ``delta W`` to every expert's weight on every forward.

The kernels run when: one active adapter present in the layer, vanilla LoRA or DoRA (no other
variant, no ``lora_bias``), a plain base layer without hooks, not merged, adapters enabled, no
extra forward arguments, and dtypes the kernel takes. A mixed ``adapter_names`` batch (a
different adapter per sequence) runs in one ``lora_linear_multi`` / ``lora_embedding_multi`` call
under the same conditions for each adapter it uses (and no dropout in training mode). Everything
else runs PEFT's code, so every PEFT feature keeps its exact behaviour. Nothing else changes:
parameters, state_dict keys, ``repr`` (``lora.Linear(...)``), ``get_layer_status`` /
``get_model_status``, ``isinstance`` checks, ``set_adapter``, ``merge``/``unmerge``,
``merge_and_unload``, ``save_pretrained``, hotswapping, Trainer.

``fuse`` is total and idempotent: on any PEFT model (other tuners, Conv layers, ``nn.Parameter``
targets other than fused experts, no LoRA layer at all) it fuses what the table lists and leaves
every other layer exactly as PEFT made it; layers PEFT creates later (``add_adapter``,
``load_adapter``, ``inject_adapter_in_model``) are fused by the next ``fuse`` call.
:func:`fuse_report` says what is fused and what runs on PEFT's code; ``fuse`` logs it at DEBUG
level and never warns. ``unfuse`` restores PEFT's classes.

A DoRA adapter (PEFT's ``DoraLinearVariant``) runs in one ``lora_kernels.dora_linear`` call under
the same conditions: PEFT's output and gradients (the norm detached, dropout on the whole DoRA
branch), with ``||W||_row^2`` cached on the base layer and no ``[N, K]`` temporary. A mixed batch
with a DoRA adapter stays on PEFT (which refuses it).
PEFT's QLoRA layers (``lora.bnb.Linear4bit``) run on the fused 4-bit kernels (``peft_qlora.py``)
under the same rule.
"""

from __future__ import annotations

import logging
import sys

import torch
from torch import nn

from .._versions import require
from ..functional import (
    dora_linear,
    lora_embedding,
    lora_embedding_multi,
    lora_linear,
    moe_lora,
    peft_expert_factors,
)
from ..layers.base import BASE_ADAPTER, cached_host_tensor, conv1d_class
from ..layers.dora import cached_weight_sq_norm
from ..layers.embedding import adapter_tensor, stack_embedding_adapters
from ..layers.moe import EXPERT_PARAMS, experts_format
from .peft_mixed import mixed_linear_forward

# before PEFT's imports: an old PEFT fails them for want of a newer module, not of PEFT
require("peft", "lora_kernels.integrations.peft")

from peft.tuners.lora.dora import DoraLinearLayer as _DoraLinearLayer  # noqa: E402
from peft.tuners.lora.layer import Embedding as PeftLoraEmbedding  # noqa: E402
from peft.tuners.lora.layer import Linear as PeftLoraLinear  # noqa: E402
from peft.tuners.lora.layer import ParamWrapper as PeftParamWrapper  # noqa: E402
from peft.tuners.lora.variants import DoraLinearVariant as _DoraLinearVariant  # noqa: E402
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402

__all__ = [
    "FUSED_CLASSES",
    "FusedPeftEmbedding",
    "FusedPeftLinear",
    "FusedPeftParamWrapper",
    "fuse",
    "fuse_report",
    "unfuse",
]

logger = logging.getLogger(__name__)

_INDEX_DTYPES = (torch.int32, torch.int64)


def _no_hooks(module: nn.Module) -> bool:
    return not (module._forward_hooks or module._forward_pre_hooks)


class _FusedPeftLayer:
    """What every fused PEFT layer shares: the backend :func:`fuse` chose, and PEFT's own class
    name in ``repr`` (PEFT's ``get_layer_status`` reads ``module_type`` from it)."""

    lora_kernels_backend = "auto"

    def _get_name(self) -> str:
        return _PEFT_CLASS[type(self)].__name__


class FusedPeftLinear(_FusedPeftLayer, PeftLoraLinear):
    """PEFT's LoRA ``Linear`` whose forward runs the fused kernel where it computes PEFT's math.

    Instances are made by :func:`fuse` (a class swap), never constructed directly.
    """

    def _base_weight(self, x: torch.Tensor) -> torch.Tensor | None:
        """The base layer's weight as ``[out, in]`` when the kernel can replace the base layer for
        input ``x`` (an ``nn.Linear``, or a transformers ``Conv1D`` read through the transpose's
        strides), else None. PEFT's forward is the same for both layouts: ``fan_in_fan_out``
        only matters to its merge."""
        if self.disable_adapters or self.merged:
            return None
        base = self.base_layer
        if not _no_hooks(base):
            return None
        if type(base) is nn.Linear:
            w = base.weight
        elif type(base) is conv1d_class():
            w = base.weight.T
        else:
            return None
        if not x.is_floating_point() or x.dtype != w.dtype or x.device != w.device:
            return None
        if base.bias is not None and base.bias.dtype != w.dtype:
            return None
        return w

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
        w = self._base_weight(x) if not args and set(kwargs) <= {"adapter_names"} else None
        if w is not None:
            if names is None:
                active = [a for a in self.active_adapters if a in self.lora_A]
                if len(active) == 1 and self._vanilla(
                    active[0], x, training_dropout_ok=True, dora_ok=True
                ):
                    return self._single(x, w, active[0])
            elif isinstance(names, (list, tuple)) and x.dim() >= 2 and len(names) == len(x):
                used = [n for n in dict.fromkeys(names) if n in self.lora_A]
                same_dtype = len({self.lora_A[n].weight.dtype for n in used}) == 1
                if (
                    used
                    and same_dtype
                    and all(self._vanilla(n, x, training_dropout_ok=False) for n in used)
                ):
                    return self._mixed(x, w, list(names), used)
        return super().forward(x, *args, **kwargs)

    def _single(self, x: torch.Tensor, w: torch.Tensor, name: str) -> torch.Tensor:
        dropout = self.lora_dropout[name]
        x_lora = dropout(x) if isinstance(dropout, nn.Dropout) and dropout.training else None
        if name in self.lora_variant:  # DoRA (checked by _plain_dora)
            return dora_linear(
                x,
                w,
                self.base_layer.bias,
                self.lora_A[name].weight,
                self.lora_B[name].weight,
                self.lora_magnitude_vector[name].weight,
                self.scaling[name],
                x_lora=x_lora,
                weight_sq_norm=cached_weight_sq_norm(self.base_layer, self.lora_kernels_backend),
                backend=self.lora_kernels_backend,
            )
        return lora_linear(
            x,
            w,
            self.base_layer.bias,
            self.lora_A[name].weight,
            self.lora_B[name].weight,
            self.scaling[name],
            x_lora=x_lora,
            backend=self.lora_kernels_backend,
        )

    def _mixed(
        self, x: torch.Tensor, w: torch.Tensor, names: list[str], used: list[str]
    ) -> torch.Tensor:
        return mixed_linear_forward(self, x, w, self.base_layer.bias, names, used)


class FusedPeftEmbedding(_FusedPeftLayer, PeftLoraEmbedding):
    """PEFT's LoRA ``Embedding`` whose forward runs the fused gather + low-rank kernel where it
    computes PEFT's math. Made by :func:`fuse` (a class swap), never constructed directly."""

    def _table(self, x: torch.Tensor) -> torch.Tensor | None:
        """The base table when the kernel can replace PEFT's forward for ids ``x``, else None."""
        if self._disable_adapters or self.merged_adapters or self.tp_layer is not None:
            return None
        base = self.base_layer
        if type(base) is not nn.Embedding or base._forward_hooks or base._forward_pre_hooks:
            return None
        # what the kernel does not reproduce; embed_scale: PEFT scales the LoRA term by it
        if base.max_norm is not None or base.scale_grad_by_freq or base.sparse:
            return None
        if "embed_scale" in base.__dict__ or "embed_scale" in base._buffers:
            return None
        if "embed_scale" in base._parameters:
            return None
        w = base.weight
        if x.dtype not in _INDEX_DTYPES or x.device != w.device or not w.is_floating_point():
            return None
        return w

    def _vanilla(self, name: str, w: torch.Tensor) -> bool:
        if name in self.lora_variant or self.input_fns.get(name) or self.output_fns.get(name):
            return False
        a = adapter_tensor(self.lora_embedding_A, name)
        b = adapter_tensor(self.lora_embedding_B, name)
        return a.dtype in (w.dtype, torch.float32) and b.dtype == a.dtype and a.device == w.device

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        names = kwargs.get("adapter_names")
        w = self._table(x) if not args and set(kwargs) <= {"adapter_names"} else None
        if w is not None:
            if names is None:
                active = [a for a in self.active_adapters if a in self.lora_embedding_A]
                if len(active) == 1 and self._vanilla(active[0], w):
                    name = active[0]
                    return lora_embedding(
                        x,
                        w,
                        adapter_tensor(self.lora_embedding_A, name),
                        adapter_tensor(self.lora_embedding_B, name),
                        self.scaling[name],
                        padding_idx=self.base_layer.padding_idx,
                        backend=self.lora_kernels_backend,
                    )
            elif isinstance(names, (list, tuple)) and x.dim() in (1, 2) and len(names) == len(x):
                used = [n for n in dict.fromkeys(names) if n in self.lora_embedding_A]
                if (
                    used
                    and len({self.lora_embedding_A[n].dtype for n in used}) == 1
                    and all(self._vanilla(n, w) for n in used)
                ):
                    return self._mixed(x, w, list(names), used)
        return super().forward(x, *args, **kwargs)

    def _mixed(self, x, w, names: list[str], used: list[str]) -> torch.Tensor:
        """PEFT's ``_mixed_batch_forward`` in one call; ``"__base__"`` and adapters this layer
        lacks get the base table only."""
        lora_a, lora_b = stack_embedding_adapters(
            [self.lora_embedding_A[n] for n in used], [self.lora_embedding_B[n] for n in used]
        )
        index = {n: i for i, n in enumerate(used)}
        ids = [index.get(n, -1) if n != BASE_ADAPTER else -1 for n in names]
        ids = cached_host_tensor(self, ids, torch.int32, x.device)
        return lora_embedding_multi(
            x,
            w,
            lora_a,
            lora_b,
            [self.scaling[n] for n in used],
            ids,
            padding_idx=self.base_layer.padding_idx,
            backend=self.lora_kernels_backend,
        )


class FusedPeftParamWrapper(_FusedPeftLayer, PeftParamWrapper):
    """PEFT's ``ParamWrapper`` whose forward runs ``moe_lora`` when it wraps (alone or as the
    outermost of a nest) the expert parameters of a fused-experts module, computing the
    adapted experts without materialising ``W + delta W``.

    Instances are made by :func:`fuse` (a class swap), never constructed directly.
    """

    def _moe_call(self, x, args, kwargs):
        """The ``moe_lora`` arguments for this call, or None where PEFT's forward must run."""
        if kwargs or len(args) != 2 or self.disable_adapters or x.dim() != 2:
            return None
        ids, weights = args
        if not isinstance(ids, torch.Tensor) or ids.dtype not in _INDEX_DTYPES:
            return None
        if not isinstance(weights, torch.Tensor) or not weights.is_floating_point():
            return None
        active = self.active_adapters
        if len(active) != 1:
            return None
        name = active[0]
        chain, module = [], self
        while isinstance(module, PeftParamWrapper):
            if type(module) not in (PeftParamWrapper, FusedPeftParamWrapper):
                return None
            if module.merged or not _no_hooks(module) or module.parameter_name in chain:
                return None
            chain.append(module.parameter_name)
            module = module.base_layer
        experts = module
        if not _no_hooks(experts) or set(chain) - set(EXPERT_PARAMS):
            return None
        try:
            fmt = experts_format(experts)
        except ValueError:
            return None
        if fmt is None or getattr(experts, "parametrizations", None):
            return None
        wrappers = {}
        module = self
        while isinstance(module, PeftParamWrapper):
            wrappers[module.parameter_name] = module
            module = module.base_layer
        weights = [experts.gate_up_proj, experts.down_proj]
        if fmt["bias"]:
            weights += [experts.gate_up_proj_bias, experts.down_proj_bias]
        if any(w.dtype != x.dtype or w.device != x.device for w in weights):
            return None
        if torch.is_grad_enabled() and any(w.requires_grad for w in weights):
            return None
        num_experts = experts.gate_up_proj.shape[0]
        factors, scales = [], []
        for param in EXPERT_PARAMS:
            wrapper = wrappers.get(param)
            if wrapper is None or name not in wrapper.lora_A:
                factors += [None, None]
                continue
            lora_a, lora_b = wrapper.lora_A[name], wrapper.lora_B[name]
            if wrapper.lora_bias.get(name, False) or name in wrapper.lora_variant:
                return None
            if type(lora_a) is not nn.Linear or type(lora_b) is not nn.Linear:
                return None
            if lora_a.bias is not None or lora_b.bias is not None:
                return None
            if type(wrapper.lora_dropout[name]) is not nn.Identity:
                return None
            if lora_a.weight.dtype not in (x.dtype, torch.float32):
                return None
            a, b = peft_expert_factors(lora_a.weight, lora_b.weight, num_experts)
            factors += [a, b.to(lora_a.weight.dtype)]
            scales.append(float(wrapper.scaling[name]))
        if not scales:
            return None
        if len(scales) == 2 and scales[1] != scales[0]:  # one scale per call: B_down carries it
            factors[3] = factors[3] * (scales[1] / scales[0])
        return experts, fmt, factors, scales[0]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        call = self._moe_call(x, args, kwargs)
        if call is None:
            return super().forward(x, *args, **kwargs)
        experts, fmt, factors, scale = call
        return moe_lora(
            x, args[0], args[1], experts.gate_up_proj, experts.down_proj, *factors, scale,
            bias_gate_up=experts.gate_up_proj_bias if fmt["bias"] else None,
            bias_down=experts.down_proj_bias if fmt["bias"] else None,
            activation=fmt["activation"], swiglu_alpha=fmt["swiglu_alpha"],
            swiglu_limit=fmt["swiglu_limit"], transposed=fmt["transposed"],
            backend=self.lora_kernels_backend,
        )  # fmt: skip


# PEFT layer class -> our subclass of it that runs the kernels. ``fuse`` swaps exactly these
# classes (never their subclasses: PEFT's quantised and other specialised layers are classes of
# their own, and each needs an entry of its own here).
FUSED_CLASSES: dict[type, type] = {
    PeftLoraLinear: FusedPeftLinear,
    PeftLoraEmbedding: FusedPeftEmbedding,
    PeftParamWrapper: FusedPeftParamWrapper,
}
_PEFT_CLASS = {fused: peft_cls for peft_cls, fused in FUSED_CLASSES.items()}


def _check_module(fn: str, model: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: expected a PEFT model (an nn.Module), got {type(model).__name__}")


def _qlora():
    """The QLoRA half (``peft_qlora``), imported only when bitsandbytes is loaded: a model with
    PEFT's 4-bit layers has loaded it; otherwise there are none to fuse."""
    if "bitsandbytes" not in sys.modules:
        return None
    try:
        from . import peft_qlora
    except ImportError:  # a PEFT without bitsandbytes 4-bit support
        return None
    return peft_qlora


def fuse(peft_model: nn.Module, *, backend: str = "auto") -> nn.Module:
    """Make the PEFT layers of ``peft_model`` that the kernels compute exactly run on
    lora_kernels (see :data:`FUSED_CLASSES`); returns the model.

    In place, idempotent and reversible (:func:`unfuse`). Never raises for an ``nn.Module``: the
    layers it does not know (other LoRA layer types, other tuners, quantised layers) and whatever
    the model holds besides keep PEFT's classes, untouched. Call it again after adding adapters
    for new target modules to fuse their layers too. ``backend`` is passed to the kernels.
    """
    fn = "lora_kernels.integrations.peft.fuse"
    _check_module(fn, peft_model)
    for module in peft_model.modules():
        fused_cls = FUSED_CLASSES.get(type(module))
        if fused_cls is not None:
            module.__class__ = fused_cls
        if type(module) in _PEFT_CLASS:
            module.lora_kernels_backend = backend
    qlora = _qlora()
    if qlora is not None:  # PEFT's QLoRA layers: their own fused class (peft_qlora.py)
        qlora.fuse_4bit(qlora.peft_4bit_layers(peft_model), backend)
    if logger.isEnabledFor(logging.DEBUG):
        report = fuse_report(peft_model)
        logger.debug(
            "fuse: %d layers on lora_kernels, %d left on PEFT's code %s",
            len(report["fused"]),
            len(report["left"]),
            sorted(set(report["left"].values())),
        )
    return peft_model


def _peft_class(module: nn.Module) -> str:
    """The class of ``module`` as PEFT made it: its own, or the one our fused subclass of it
    stands in for."""
    cls = _PEFT_CLASS.get(type(module)) or next(
        c for c in type(module).__mro__ if not c.__module__.startswith(__package__)
    )
    return f"{cls.__module__}.{cls.__qualname__}"


def _one_active(layer, adapters) -> tuple[str | None, str | None]:
    """The layer's one active adapter, or None and why not."""
    active = [a for a in layer.active_adapters if a in adapters]
    if len(active) == 1:
        return active[0], None
    if not active:
        return None, "no active adapter in this layer"
    return None, f"{len(active)} active adapters {active} (the kernels run one)"


def _lora_adapter_reason(layer, name: str, dtype: torch.dtype, variant_ok: bool) -> str:
    """Why adapter ``name`` of a LoRA Linear (dense or 4-bit) is not one the kernels take: the
    conditions of the layers' ``_vanilla`` in their order (``variant_ok``: no variant, or one
    the layer runs on the kernels)."""
    if layer.lora_bias.get(name, False):
        return f"adapter {name!r} has lora_bias"
    if not variant_ok:
        variant = layer.lora_variant[name]
        cls = variant if isinstance(variant, type) else type(variant)
        if issubclass(cls, _DoraLinearVariant) and isinstance(layer, FusedPeftLinear):
            return (
                f"adapter {name!r} is DoRA with its magnitude on another device or dtype, or on "
                "a fan_in_fan_out base"
            )
        return f"adapter {name!r} is a {cls.__name__}: a variant the kernels do not compute"
    lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
    if type(lora_a) is not nn.Linear or type(lora_b) is not nn.Linear:
        return f"adapter {name!r} has {type(lora_a).__name__} / {type(lora_b).__name__} factors"
    if lora_a.bias is not None or lora_b.bias is not None:
        return f"adapter {name!r} has biased factors"
    dropout = layer.lora_dropout[name]
    if type(dropout) not in (nn.Dropout, nn.Identity):
        return f"adapter {name!r} has a {type(dropout).__name__} dropout"
    if not getattr(layer, "cast_input_dtype_enabled", True):
        return "PEFT's cast_input_dtype is disabled"
    allowed = " or ".join(str(d) for d in dict.fromkeys((dtype, torch.float32)))
    return (
        f"adapter {name!r} has factors of dtype {lora_a.weight.dtype} / {lora_b.weight.dtype} "
        f"(the kernels take {allowed}, both the same)"
    )


def _linear_verdict(layer: FusedPeftLinear) -> tuple[bool, str]:
    if layer.disable_adapters:
        return False, "adapters are disabled"
    if layer.merged:
        return False, "merged: the base layer holds the adapters"
    base = layer.base_layer
    if not _no_hooks(base):
        return False, "the base layer has forward hooks"
    if type(base) is nn.Linear:
        w = base.weight
    elif type(base) is conv1d_class():
        w = base.weight.T
    else:
        return False, f"the base layer is a {type(base).__name__}, not nn.Linear or Conv1D"
    probe = w.new_empty((0, w.shape[1]))  # an input in the base weight's dtype and device
    if layer._base_weight(probe) is None:
        return False, f"the base layer's weight {w.dtype} and bias dtypes are not one float dtype"
    name, why = _one_active(layer, layer.lora_A)
    if name is None:
        return False, why
    if not layer._vanilla(name, probe, training_dropout_ok=True, dora_ok=True):
        variant_ok = name not in layer.lora_variant or layer._plain_dora(name, probe)
        return False, _lora_adapter_reason(layer, name, w.dtype, variant_ok)
    kernel = "dora_linear" if name in layer.lora_variant else "lora_linear"
    return True, f"{kernel}, adapter {name!r}"


def _embedding_verdict(layer: FusedPeftEmbedding) -> tuple[bool, str]:
    if layer._disable_adapters:
        return False, "adapters are disabled"
    if layer.merged_adapters:
        return False, "merged: the base table holds the adapters"
    w = layer.base_layer.weight
    if layer._table(torch.empty(0, dtype=torch.int64, device=w.device)) is None:
        return False, (
            "the base layer is not a plain nn.Embedding (hooks, max_norm, scale_grad_by_freq, "
            "sparse, embed_scale or tensor parallelism)"
        )
    name, why = _one_active(layer, layer.lora_embedding_A)
    if name is None:
        return False, why
    if not layer._vanilla(name, w):
        if name in layer.lora_variant:
            return False, f"adapter {name!r} is a variant the kernels do not compute"
        if layer.input_fns.get(name) or layer.output_fns.get(name):
            return False, f"adapter {name!r} has input or output functions"
        return False, f"adapter {name!r} has factors of a dtype other than {w.dtype} or float32"
    return True, f"lora_embedding, adapter {name!r}"


def _4bit_verdict(qlora, layer) -> tuple[bool, str]:
    if layer.disable_adapters:
        return False, "adapters are disabled"
    if layer.merged:
        return False, "merged: the base layer holds the adapters"
    base = layer.base_layer
    if not isinstance(base, qlora.bnb.nn.Linear4bit):
        return False, f"the base layer is a {type(base).__name__}, not bitsandbytes' Linear4bit"
    if not _no_hooks(base):
        return False, "the base layer has forward hooks"
    state = getattr(base.weight, "quant_state", None)
    if state is None or getattr(state, "packing_format_for_cpu", False):
        return False, "the 4-bit weight has no quant_state in bitsandbytes' standard packing"
    name, why = _one_active(layer, layer.lora_A)
    if name is None:
        return False, why
    dtype = base.compute_dtype or layer.lora_A[name].weight.dtype
    probe = torch.empty((0, base.in_features), dtype=dtype, device=base.weight.device)
    if not layer._vanilla(name, probe):
        return False, _lora_adapter_reason(layer, name, dtype, name not in layer.lora_variant)
    return True, f"qlora_linear, adapter {name!r}"


def _other_reason(qlora, module: nn.Module) -> str:
    from peft.tuners.lora.layer import LoraLayer  # every LoRA layer class of PEFT's

    cls = type(module)
    if cls in FUSED_CLASSES or (qlora is not None and cls is qlora.PeftLoraLinear4bit):
        return "not fused (yet): fuse() swaps its class"
    if isinstance(module, LoraLayer):
        return f"no fused kernel for PEFT's lora.{cls.__name__}"
    parts = cls.__module__.split(".")
    tuner = parts[2] if parts[:2] == ["peft", "tuners"] and len(parts) > 2 else cls.__module__
    return f"{tuner} layer (not LoRA): PEFT's code"


def _param_wrapper_chain(layer: PeftParamWrapper) -> tuple[list, nn.Module]:
    """The nest from ``layer`` inwards (``layer`` first) and the module at its centre."""
    chain, module = [], layer
    while isinstance(module, PeftParamWrapper):
        chain.append(module)
        module = module.base_layer
    return chain, module


def _param_wrapper_reason(layer: FusedPeftParamWrapper, probe: torch.Tensor) -> str:
    """Why ``FusedPeftParamWrapper._moe_call`` leaves a plain call of ``layer`` (the outermost
    wrapper of its nest) to PEFT: its conditions, in their order."""
    if layer.disable_adapters:
        return "adapters are disabled"
    chain, experts = _param_wrapper_chain(layer)
    name, why = _one_active(layer, layer.lora_A)
    if name is None and len(layer.active_adapters) != 1:
        return why
    name = layer.active_adapters[0]
    seen = []
    for wrapper in chain:
        where = f"the ParamWrapper of {wrapper.parameter_name}"
        if type(wrapper) not in (PeftParamWrapper, FusedPeftParamWrapper):
            return f"{where} is a {type(wrapper).__name__}"
        if wrapper.merged:
            return "merged: the experts' parameters hold the adapters"
        if not _no_hooks(wrapper):
            return f"{where} has forward hooks"
        if wrapper.parameter_name in seen:
            return f"{wrapper.parameter_name} is wrapped twice"
        seen.append(wrapper.parameter_name)
    others = sorted(set(seen) - set(EXPERT_PARAMS))
    if others:
        return (
            f"it wraps {others} of a {type(experts).__name__} (moe_lora adapts the "
            f"{' / '.join(EXPERT_PARAMS)} of fused experts)"
        )
    if not _no_hooks(experts):
        return "the experts module has forward hooks"
    try:
        fmt = experts_format(experts)
    except ValueError as e:
        return str(e)
    if fmt is None:
        return f"the base is a {type(experts).__name__}, not a fused-experts module"
    if getattr(experts, "parametrizations", None):
        return "the experts' parameters are parametrized"
    weights = [experts.gate_up_proj, experts.down_proj]
    if fmt["bias"]:
        weights += [experts.gate_up_proj_bias, experts.down_proj_bias]
    if len({(w.dtype, w.device) for w in weights}) != 1:
        return "the experts' weights and biases are not of one dtype and device"
    if torch.is_grad_enabled() and any(w.requires_grad for w in weights):
        return "the experts' parameters require grad (moe_lora trains the LoRA factors only)"
    adapted = [w for w in chain if name in w.lora_A]
    if not adapted:
        return f"adapter {name!r} adapts no parameter of this nest"
    for wrapper in adapted:
        if wrapper.lora_bias.get(name, False):
            return f"adapter {name!r} has lora_bias"
        if name in wrapper.lora_variant:
            return f"adapter {name!r} is a variant the kernels do not compute"
        lora_a, lora_b = wrapper.lora_A[name], wrapper.lora_B[name]
        if type(lora_a) is not nn.Linear or type(lora_b) is not nn.Linear:
            return f"adapter {name!r} has {type(lora_a).__name__} / {type(lora_b).__name__} factors"
        if lora_a.bias is not None or lora_b.bias is not None:
            return f"adapter {name!r} has biased factors"
        if type(wrapper.lora_dropout[name]) is not nn.Identity:
            return f"adapter {name!r} has a {type(wrapper.lora_dropout[name]).__name__} dropout"
        if lora_a.weight.dtype not in (probe.dtype, torch.float32):
            return (
                f"adapter {name!r} has factors of dtype {lora_a.weight.dtype} (the kernels take "
                f"{probe.dtype} or torch.float32)"
            )
    return "PEFT's forward (FusedPeftParamWrapper._moe_call declines the call)"


def _param_wrapper_verdict(layer: FusedPeftParamWrapper) -> tuple[bool, str]:
    """The verdict of a plain call ``layer(hidden_states [T, H], top_k_index, top_k_weights)``
    (what a transformers 5 MoE block makes), asked with an empty call in the experts' dtype
    and device: ``_moe_call`` itself decides, the reason is looked up only when it declines."""
    chain, experts = _param_wrapper_chain(layer)
    w = getattr(experts, "gate_up_proj", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 3:
        params = sorted(m.parameter_name for m in chain)
        return False, (
            f"it wraps {params} of a {type(experts).__name__}, not the 3-D gate_up_proj / "
            "down_proj of fused experts: PEFT's ParamWrapper forward"
        )
    hidden = w.shape[1] if getattr(experts, "is_transposed", False) else w.shape[2]
    probe = w.new_empty((0, hidden))
    ids = torch.empty((0, 1), dtype=torch.int64, device=w.device)
    call = layer._moe_call(probe, (ids, probe.new_empty((0, 1))), {})
    if call is None:
        return False, _param_wrapper_reason(layer, probe)
    name = layer.active_adapters[0]
    params = [m.parameter_name for m in reversed(chain) if name in m.lora_A]
    return True, f"moe_lora ({' + '.join(params)}), adapter {name!r}"


def _nest_verdicts(outer_name: str, outer: PeftParamWrapper) -> dict[str, tuple[bool, str]]:
    """The verdict of every ``ParamWrapper`` of the nest whose outermost is ``outer``, by name.

    A level whose call runs ``moe_lora`` computes every level inside it. A level that runs
    PEFT's forward either parametrizes its parameter around the call of the next level in (it
    is active and not merged: the next level then sees a parametrized experts module and runs
    PEFT's forward as well), or calls the next level plainly (merged, disabled, or no active
    adapter of its own), which then decides for itself as the outermost of what is left."""
    chain = _param_wrapper_chain(outer)[0]
    names = [outer_name + ".base_layer" * i for i in range(len(chain))]
    out = {}
    for i, wrapper in enumerate(chain):
        on_kernels, why = _param_wrapper_verdict(wrapper)
        out[names[i]] = (on_kernels, why)
        inner = names[i + 1 :]
        if on_kernels:
            out.update(
                (n, (True, f"{why}: in the call of the ParamWrapper {names[i]!r}")) for n in inner
            )
            break
        parametrizes = (
            not wrapper.disable_adapters
            and not wrapper.merged
            and any(a in wrapper.lora_A for a in wrapper.active_adapters)
        )
        if parametrizes:
            because = (
                f"the ParamWrapper {names[i]!r} runs PEFT's forward ({why}), which parametrizes "
                f"the experts' {wrapper.parameter_name} around this one"
            )
            out.update((n, (False, because)) for n in inner)
            break
    return out


# fused class -> the verdict of its next plain call: (runs on the kernels, why)
_VERDICTS = {
    FusedPeftLinear: _linear_verdict,
    FusedPeftEmbedding: _embedding_verdict,
    FusedPeftParamWrapper: _param_wrapper_verdict,  # fuse_report asks _nest_verdicts first
}


def fuse_report(peft_model: nn.Module) -> dict:
    """What runs where: the PEFT tuner layers of ``peft_model`` whose class :func:`fuse` swapped
    and those it left to PEFT's code, and per layer what its next plain call runs and why.

    Returns ``{"fused": [name], "left": {name: PEFT class}, "layers": {name: {"peft_class": ...,
    "runs_on": "lora_kernels" or "peft", "why": ...}}}`` (``"per call"`` for a fused class with
    no verdict in ``_VERDICTS``). A ``ParamWrapper`` on MoE experts is judged on the call a
    transformers 5 MoE block makes (hidden states, router ids and weights), a nested one by what
    the levels outside it do (``_nest_verdicts``): ``"moe_lora (gate_up_proj + down_proj),
    adapter 'default'"`` for the outermost, the same "in the call of" it for the one inside.
    ``"why"`` names the kernel and the adapter (``"dora_linear, adapter 'default'"``) or the
    reason PEFT's code runs (``"adapter 'b' has lora_bias"``, ``"no fused kernel for PEFT's
    lora.Conv2d"``). The verdict is the one the fused layer's ``forward`` reaches, asked with
    an input in the base weight's dtype and device and no extra arguments; a call with other
    dtypes, extra keyword arguments, autocast (4-bit) or an ``adapter_names`` batch is decided
    when it is made (see the module docstring).
    """
    _check_module("lora_kernels.integrations.peft.fuse_report", peft_model)
    qlora = _qlora()
    fused_4bit = qlora.FusedPeftLinear4bit if qlora is not None else ()
    fused, left, layers = [], {}, {}
    nested = {}  # verdicts of the ParamWrappers inside a nest, from its outermost (seen first)
    for name, module in peft_model.named_modules():
        if isinstance(module, FusedPeftParamWrapper) and name not in nested:
            nested.update(_nest_verdicts(name, module))
        if type(module) in _PEFT_CLASS or isinstance(module, fused_4bit):
            fused.append(name)
            if name in nested:
                on_kernels, why = nested[name]
            elif isinstance(module, fused_4bit):
                on_kernels, why = _4bit_verdict(qlora, module)
            elif type(module) in _VERDICTS:
                on_kernels, why = _VERDICTS[type(module)](module)
            else:  # a fused class with no verdict of its own: its forward decides each call
                on_kernels, why = None, "fused: its forward decides on each call"
        elif isinstance(module, BaseTunerLayer):
            left[name] = _peft_class(module)
            on_kernels, why = False, _other_reason(qlora, module)
        else:
            continue
        runs_on = "per call" if on_kernels is None else "lora_kernels" if on_kernels else "peft"
        layers[name] = {"peft_class": _peft_class(module), "runs_on": runs_on, "why": why}
    return {"fused": fused, "left": left, "layers": layers}


def unfuse(peft_model: nn.Module) -> nn.Module:
    """Give every layer :func:`fuse` changed PEFT's own class back; returns the model."""
    _check_module("lora_kernels.integrations.peft.unfuse", peft_model)
    for m in peft_model.modules():
        peft_cls = _PEFT_CLASS.get(type(m))
        if peft_cls is not None:
            m.__class__ = peft_cls
            del m.lora_kernels_backend
    qlora = _qlora()
    if qlora is not None:
        qlora.unfuse_4bit(peft_model)
    return peft_model
