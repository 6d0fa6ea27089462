"""vLLM on lora_kernels: a punica wrapper (vLLM's seam for LoRA kernels) and the plugin that
selects it.

vLLM's LoRA layers run their base layer, then hand the output ``y`` to a *punica wrapper* that adds
every row's adapter term in place. :class:`LoraKernelsPunicaWrapper` is that wrapper on this
package's kernels (``lora_kernels.ops.lora_delta``: our multi-adapter shrink and expand, the
Triton kernels of ``lora_multi`` on CUDA, the torch backend on CPU), with vLLM's own semantics
(vLLM 0.34, ``vllm/lora/punica_wrapper/punica_base.py``)::

    add_shrink:      y[s][i] = scale * x[i] @ lora_a[s][a, 0].T            (0 where a = -1)
    add_expand:      y[i, off_s : off_s + n_s] += x[s][i] @ lora_b[s][a, 0].T  (a = -1: untouched)
    add_lora_linear: shrink into an fp32 buffer, then expand, for 1 to 3 slices (qkv, gate_up)
    add_lora_embedding: y[i] += x[i] @ lora_b[a, 0].T
    add_lora_logits / apply_lora_full_linear: the same per request (``sampler_indices``)

with ``a`` each token's slot in vLLM's stacks (``lora_a_stacked [max_loras, 1, r, in]``,
``lora_b_stacked [max_loras, 1, out, r]``) from ``update_metadata``'s ``LoRAMapping``, -1 for
tokens of requests without an adapter. Prefill and decode are the same calls: the kernels pick
their strategy from the shape (no look at the ids), so no step reads device values on the host
and nothing is sized by the data: decode steps can be captured in CUDA graphs. Prefill needs no
segment metadata either, so ``update_metadata`` skips vLLM's ``compute_meta`` (which reads the
ids on the host).

The plugin: vLLM calls every ``vllm.general_plugins`` entry point in each of its processes
before it builds a model, and picks the punica wrapper class by name from
``current_platform.get_punica_wrapper()`` (``punica_selector.py``). :func:`register` (this
package's entry point) points that method of the CUDA or CPU platform at our wrapper. A platform
plugin (``vllm.platform_plugins``) would have to replace the whole platform to change one method.
``LORA_KERNELS_VLLM=0`` turns the plugin off (vLLM's own wrapper then runs), as does vLLM's
``VLLM_PLUGINS`` list when it leaves out ``lora_kernels``.

Opt-in, ``LORA_KERNELS_VLLM_FUSED=1``: the base GEMM and the adapter terms of vLLM's linear LoRA
layers in one kernel (``lora_kernels.lora_linear_multi``, the package's core op: ``y`` is written
once, never read back). vLLM's layers compute their base output in
``BaseLinearLayerWithLoRA._apply_sync`` and hand it to the wrapper; :func:`register` then
replaces that one method (no class is copied) with :func:`fused_apply_sync`, which fuses where it
computes exactly what vLLM would (an unquantized base, one tensor-parallel rank, our wrapper, 2-D
activations whose dtype is the weight's) and calls vLLM's own method everywhere else. A layer of
several output slices (qkv, gate_up) runs one fused launch per slice on its rows of the weight.

The fused-MoE methods (``add_lora_fused_moe``, ``add_lora_w13``, ``add_lora_w2``) wait for the
package's MoE kernels and raise ``NotImplementedError``: serve MoE models with LoRA with
``LORA_KERNELS_VLLM=0``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from vllm.lora.punica_wrapper.punica_base import PunicaWrapperBase

from .. import envs
from ..functional import lora_linear_multi
from ..ops.lora_delta import lora_expand_, lora_shrink_

__all__ = ["QUALNAME", "LoraKernelsPunicaWrapper", "enabled", "fused_apply_sync", "register"]

logger = logging.getLogger(__name__)

QUALNAME = "lora_kernels.integrations.vllm.LoraKernelsPunicaWrapper"
ENV_SWITCH = "LORA_KERNELS_VLLM"


def enabled() -> bool:
    """Whether the plugin is on: ``LORA_KERNELS_VLLM`` unset or not one of ``0``,
    ``false``, ``off``, ``no``
    (``lora_kernels.envs`` reads it, with every variable of the package)."""
    return envs.vllm_plugin()


def _stack(w: torch.Tensor) -> torch.Tensor:
    """vLLM's ``[max_loras, 1, rows, cols]`` stack as the ``[L, rows, cols]`` view our ops take."""
    return w[:, 0] if w.dim() == 4 else w


class LoraKernelsPunicaWrapper(PunicaWrapperBase):
    """vLLM's ``PunicaWrapperBase`` on lora_kernels (see the module docstring for the formulas)."""

    def __init__(
        self,
        max_num_batched_tokens: int,
        max_batches: int,
        device: torch.device | str,
        **kwargs: Any,
    ):
        super().__init__(max_num_batched_tokens, max_batches, device)
        self.lora_config = kwargs.get("lora_config")
        # one [L] scale tensor per (L, scale): vLLM passes a Python float, our ops a tensor
        self._scales: dict[tuple[int, float, str], torch.Tensor] = {}

    # ---------------------------------------------------------------------------------- metadata

    def update_metadata(
        self,
        mapping,
        lora_index_to_id: list[int | None],
        max_loras: int,
        vocab_size: int,
        **kwargs: Any,
    ) -> None:
        """vLLM's index tensors from ``mapping``; no prefill segments (see the module docstring)."""
        self.is_prefill = mapping.is_prefill
        self._update_base_metadata(mapping, lora_index_to_id, max_loras, vocab_size)

    def _token_ids(self, num_tokens: int) -> torch.Tensor:
        """Each token's slot (-1: none). The buffer, sliced by the call's row count as vLLM's GPU
        wrapper does, so a padded CUDA-graph batch needs no host-side length."""
        return self._token_lora_indices[:num_tokens]

    def _scale_tensor(self, num_adapters: int, scale: float, device) -> torch.Tensor:
        key = (num_adapters, float(scale), str(device))
        t = self._scales.get(key)
        if t is None:
            t = torch.full((num_adapters,), float(scale), dtype=torch.float32, device=device)
            self._scales[key] = t
        return t

    # ------------------------------------------------------------------------------- the kernels

    def _shrink(self, out, x, lora_a, ids, scale) -> None:
        w = _stack(lora_a)
        scales = self._scale_tensor(w.shape[0], scale, x.device)
        # an output wider than the adapter's rows (vLLM pads classifier heads) keeps its tail
        lora_shrink_(out[:, : w.shape[1]], x, w, ids, scales)

    def add_shrink(
        self,
        y: tuple[torch.Tensor, ...] | torch.Tensor,
        x: torch.Tensor,
        lora_a_stacked: tuple[torch.Tensor, ...],
        scale: float,
        **kwargs: Any,
    ) -> None:
        """``y[s] = scale * x @ lora_a_stacked[s][a, 0].T`` per token (zeros for a = -1).

        ``y``: ``[slices, M, r]`` float32 (or a tuple of ``[M, r]``); ``x``: ``[M, in]``."""
        x = x.view(-1, x.shape[-1])
        ids = self._token_ids(x.shape[0])
        for s, lora_a in enumerate(lora_a_stacked):
            self._shrink(y[s], x, lora_a, ids, scale)

    def add_expand(
        self,
        y: torch.Tensor,
        x: tuple[torch.Tensor, ...] | torch.Tensor,
        lora_b_stacked: tuple[torch.Tensor, ...],
        output_slices: tuple[int, ...],
        offset_start: int = 0,
        add_inputs: bool = True,
        **kwargs: Any,
    ) -> None:
        """``y[:, off_s : off_s + n_s] += x[s] @ lora_b_stacked[s][a, 0].T``, slice after slice
        from ``offset_start``; ``add_inputs=False`` writes the term instead (rows of a = -1 are
        left as they are either way)."""
        y2 = y.view(-1, y.shape[-1])
        ids = self._token_ids(y2.shape[0])
        offset = offset_start
        for s, lora_b in enumerate(lora_b_stacked):
            width = output_slices[s]
            lora_expand_(
                y2[:, offset : offset + width], x[s], _stack(lora_b), ids, add_inputs=add_inputs
            )
            offset += width

    def add_lora_embedding(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        lora_b_stacked: torch.Tensor,
        add_inputs: bool = True,
        **kwargs: Any,
    ) -> None:
        """``y += x @ lora_b_stacked[a, 0].T``: ``x [M, r]`` holds each token's row of its
        adapter's embedding A (vLLM gathers it), ``y [M, dim]`` the base embeddings."""
        lora_b = _stack(lora_b_stacked)
        width = min(lora_b.shape[1], y.shape[-1])
        ids = self._token_ids(y.shape[0])
        lora_expand_(y[:, :width], x, lora_b[:, :width], ids, add_inputs=add_inputs)

    def add_lora_linear(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        lora_a_stacked: tuple[torch.Tensor, ...],
        lora_b_stacked: tuple[torch.Tensor, ...],
        scale: float,
        output_slices: tuple[int, ...],
        *,
        buffer: torch.Tensor | tuple[torch.Tensor, ...] | None = None,
        **kwargs: Any,
    ) -> None:
        """``y[:, slice s] += scale * (x @ lora_a[s][a, 0].T) @ lora_b[s][a, 0].T`` for each of the
        1 to 3 output slices, through an fp32 ``[slices, M, r]`` buffer; ``add_inputs`` in
        ``kwargs`` as in :meth:`add_expand`."""
        if not len(lora_a_stacked) == len(lora_b_stacked) == len(output_slices):
            raise ValueError(
                f"add_lora_linear: expected as many lora_a ({len(lora_a_stacked)}) and lora_b "
                f"({len(lora_b_stacked)}) stacks as output slices ({len(output_slices)})"
            )
        add_inputs = kwargs.pop("add_inputs", True)
        x = x.view(-1, x.shape[-1])
        if buffer is None:
            rank = lora_b_stacked[0].shape[-1]
            buffer = torch.empty(
                (len(output_slices), x.shape[0], rank), dtype=torch.float32, device=x.device
            )
        self.add_shrink(buffer, x, lora_a_stacked, scale)
        self.add_expand(y, buffer, lora_b_stacked, output_slices, add_inputs=add_inputs)

    def add_lora_logits(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        lora_a_stacked: torch.Tensor,
        lora_b_stacked: torch.Tensor,
        scale,
        *,
        buffer: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> None:
        """``y += scale * (x @ lora_a[a, 0].T) @ lora_b[a, 0].T`` with one adapter per request
        (``sampler_indices``): the logits rows, and request-level classifier heads."""
        y2 = y.view(-1, y.shape[-1])
        x = x.view(-1, x.shape[-1])
        ids = self.sampler_indices
        lora_b = _stack(lora_b_stacked)
        if buffer is None:
            buffer = torch.empty(
                (x.shape[0], lora_b.shape[-1]), dtype=torch.float32, device=x.device
            )
        self._shrink(buffer, x, lora_a_stacked, ids, scale)
        width = min(lora_b.shape[1], y2.shape[-1])
        lora_expand_(y2[:, :width], buffer, lora_b[:, :width], ids, add_inputs=True)

    def apply_lora_full_linear(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        weight_stacked: torch.Tensor,
        bias_stacked: torch.Tensor,
        module_enabled: torch.Tensor,
    ) -> None:
        """Rows whose request's adapter brings a whole head of its own (``module_enabled``) get
        ``x @ weight_stacked[a, 0].T + bias_stacked[a]``; the others keep ``y``."""
        ids = self.sampler_indices
        weight = _stack(weight_stacked)
        adapter_y = torch.empty((x.shape[0], weight.shape[1]), dtype=torch.float32, device=x.device)
        self._shrink(adapter_y, x, weight_stacked, ids, 1.0)
        y.copy_(self._select_full_linear_output(y, adapter_y, bias_stacked, module_enabled))

    # ------------------------------------------------------------------------------ MoE (later)

    def _no_moe(self, method: str):
        raise NotImplementedError(
            f"LoraKernelsPunicaWrapper.{method}: lora_kernels has no fused-MoE LoRA kernels yet; "
            f"serve MoE models with LoRA on vLLM's own kernels by setting {ENV_SWITCH}=0"
        )

    def moe_lora_align_block_size(self, *args: Any, **kwargs: Any):
        self._no_moe("moe_lora_align_block_size")

    def add_lora_fused_moe(self, *args: Any, **kwargs: Any):
        self._no_moe("add_lora_fused_moe")

    def add_lora_w13(self, *args: Any, **kwargs: Any):
        self._no_moe("add_lora_w13")

    def add_lora_w2(self, *args: Any, **kwargs: Any):
        self._no_moe("add_lora_w2")


_stock_apply_sync = None  # vLLM's BaseLinearLayerWithLoRA._apply_sync, once register() fuses


def _fusable(layer, x: torch.Tensor) -> bool:
    """Whether one fused launch per slice computes exactly what ``_apply_sync`` computes."""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    base = layer.base_layer
    weight = getattr(base, "weight", None)
    return (
        isinstance(layer.punica_wrapper, LoraKernelsPunicaWrapper)
        and layer.tp_size == 1
        and isinstance(getattr(base, "quant_method", None), UnquantizedLinearMethod)
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 2
        and x.dim() == 2
        and x.dtype == weight.dtype
        and sum(layer.output_slices) == weight.shape[0]
        and layer.lora_a_stacked[0].dtype in (x.dtype, torch.float32)
    )


def fused_apply_sync(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``BaseLinearLayerWithLoRA._apply_sync`` in one kernel per output slice s::

        y[:, s] = x @ W[s].T + bias[s] + (x @ lora_a[s][a, 0].T) @ lora_b[s][a, 0].T

    (vLLM's stacks carry the scaling in lora_b; ``a`` is each token's slot, -1: base only).
    Layers this cannot serve exactly (quantized, tensor-parallel, 3-D inputs) take vLLM's own
    method."""
    if not _fusable(self, x):
        return _stock_apply_sync(self, x, bias)
    wrapper = self.punica_wrapper
    weight = self.base_layer.weight
    ids = wrapper._token_ids(x.shape[0])
    scales = wrapper._scale_tensor(self.lora_a_stacked[0].shape[0], 1.0, x.device)
    outs, offset = [], 0
    for lora_a, lora_b, width in zip(
        self.lora_a_stacked, self.lora_b_stacked, self.output_slices, strict=True
    ):
        rows = slice(offset, offset + width)
        b = None if bias is None else bias[rows]
        outs.append(
            lora_linear_multi(x, weight[rows], b, _stack(lora_a), _stack(lora_b), scales, ids)
        )
        offset += width
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


def _install_fused_path() -> None:
    global _stock_apply_sync
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA

    if BaseLinearLayerWithLoRA._apply_sync is not fused_apply_sync:
        _stock_apply_sync = BaseLinearLayerWithLoRA._apply_sync
        BaseLinearLayerWithLoRA._apply_sync = fused_apply_sync
        logger.info("lora_kernels: vLLM's linear LoRA layers fuse base GEMM and LoRA")


def _punica_wrapper_qualname(cls) -> str:
    return QUALNAME


def register() -> None:
    """The ``vllm.general_plugins`` entry point: make the CUDA or CPU platform's
    ``get_punica_wrapper`` name :class:`LoraKernelsPunicaWrapper`.

    vLLM may call it more than once per process; every call after the first changes nothing. Off
    when ``LORA_KERNELS_VLLM=0``, and on platforms other than CUDA and CPU (ROCm, XPU, TPU keep
    their wrapper: the kernels are not tested there). ``LORA_KERNELS_VLLM_FUSED=1`` also installs
    :func:`fused_apply_sync`.
    """
    if not enabled():
        logger.info("lora_kernels: %s=0, vLLM keeps its own punica wrapper", ENV_SWITCH)
        return
    from vllm.platforms import current_platform

    if not (current_platform.is_cuda() or current_platform.is_cpu()):
        logger.info("lora_kernels: platform %s keeps its punica wrapper", type(current_platform))
        return
    platform_cls = type(current_platform)
    if platform_cls.get_punica_wrapper() != QUALNAME:
        platform_cls.get_punica_wrapper = classmethod(_punica_wrapper_qualname)
        logger.info("lora_kernels: vLLM's LoRA layers run on %s", QUALNAME)
    if envs.vllm_fused():
        _install_fused_path()
