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

The fused-MoE methods (vLLM's ``TritonExperts`` call them through ``LoRAExpertsMixin``):
``add_lora_w13`` adds the gate / up terms into ``intermediate_cache1 [M, k, S I]`` before the
activation, ``add_lora_w2`` the down term, times the router weight, into ``intermediate_cache3
[M, k, H]`` before the sum over slots; for every (token t, slot j) pair with a live adapter slot
a (``adapter_enabled[a]``) and expert e (``expert_map[topk_ids[t, j]]``, -1: another rank's)::

    w13: y[t, j, s I : (s+1) I] += (x[t] @ w13_a[s][a, e].T) @ w13_b[s][a, e].T
    w2:  y[t, j] += topk_weights[t, j] * (h[t k + j] @ w2_a[a, e].T) @ w2_b[a, e].T

vLLM's GPU wrapper first sorts the pairs by (adapter, expert) into padded blocks
(``moe_lora_align_block_size``, a CUDA op) for its grouped kernels. Ours need no sort: each
stack ``[max_loras, E, rows, cols]`` is viewed as ``[max_loras E, rows, cols]`` and every pair
indexed by ``a E + e`` (by ``a`` alone for the expert-shared factors of
``enable_moe_shared_loras``), so each slice is one ``lora_shrink_`` and one ``lora_expand_``
launch over the M k pairs, the same multi-adapter kernels as the linear layers. ``add_lora_w13``
hands ``add_lora_w2`` vLLM's unsorted ("naive") layout; ``add_lora_fused_moe`` also takes the
sorted one, and ``moe_lora_align_block_size`` builds it in torch ops for callers that ask. No
step reads the ids on the host (vLLM's wrapper reads a no-LoRA flag and the active-adapter
count), and every buffer is sized by the shapes.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from vllm.lora.punica_wrapper.punica_base import PunicaWrapperBase

from .. import envs
from .._checks import check_vllm_fused_moe_lora_inputs
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

    # ------------------------------------------------------------------------------------- MoE

    def _moe_token_ids(self, num_tokens: int, token_lora_mapping) -> torch.Tensor:
        """Each token's slot: the one passed (expert parallelism's per-rank map) or ours."""
        return self._token_ids(num_tokens) if token_lora_mapping is None else token_lora_mapping

    def moe_lora_align_block_size(
        self,
        topk_ids: torch.Tensor,
        num_tokens: int,
        block_size: int,
        num_experts: int,
        max_loras: int,
        adapter_enabled: torch.Tensor,
        expert_map: torch.Tensor | None = None,
        pad_sorted_ids: bool = False,
        naive_block_assignment: bool = False,
        token_lora_mapping: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """vLLM's per-adapter expert sort of the (token, slot) pairs, on the device in torch ops
        (see :func:`moe_align_pairs`); returns ``(token_lora_mapping, sorted_token_ids,
        expert_ids, num_tokens_post_padded)`` as ``PunicaWrapperGPU`` does.

        :meth:`add_lora_w13` does not call it: our kernels take the pairs unsorted (vLLM's
        "naive" layout), so the sort is kept for callers of this public method."""
        tlm = self._moe_token_ids(num_tokens, token_lora_mapping)
        sorted_ids, expert_ids, num_post_pad = moe_align_pairs(
            topk_ids, tlm, block_size, num_experts, max_loras, adapter_enabled, expert_map,
            pad_sorted_ids=pad_sorted_ids, naive=naive_block_assignment,
        )  # fmt: skip
        return tlm, sorted_ids, expert_ids, num_post_pad

    def add_lora_fused_moe(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        lora_a_stacked: tuple[torch.Tensor, ...],
        lora_b_stacked: tuple[torch.Tensor, ...],
        topk_weights: torch.Tensor,
        sorted_token_ids: torch.Tensor | None,
        expert_ids: torch.Tensor,
        num_tokens_post_padded: torch.Tensor | None,
        max_lora_rank: int,
        top_k_num: int,
        shrink_config,
        expand_config,
        adapter_enabled: torch.Tensor,
        mul_routed_weight=False,
        fully_sharded: bool = False,
        offset: int = 0,
        token_lora_mapping: torch.Tensor | None = None,
        add_inputs: bool = True,
    ) -> None:
        """For every (token t, slot k) pair p = t k_num + k whose adapter slot a and expert e
        are live (vLLM's ``_fused_moe_lora_kernel``: a in [0, max_loras), adapter_enabled[a],
        e != -1)::

            y[t, k, off + s N : off + (s+1) N] += w * (x_p @ lora_a[s][a, e].T) @ lora_b[s][a, e].T

        ``x_p = x[t]`` for w13 (``x [M, K]``), ``x[p]`` with ``mul_routed_weight`` (w2's
        ``x [M k, I]``), ``w = topk_weights[t, k]`` with ``mul_routed_weight``, else 1;
        ``add_inputs=False`` writes the term over the live pairs. Other pairs are untouched. The
        pairs come sorted (``sorted_token_ids [L, EM]``, ``expert_ids [L, EM / block]``,
        ``num_tokens_post_padded [L]`` of :meth:`moe_lora_align_block_size`) or as they are
        (``sorted_token_ids`` None, ``expert_ids [M k]``)."""
        del max_lora_rank, top_k_num, expand_config  # read from the shapes, as vLLM asserts
        m, top_k = check_vllm_fused_moe_lora_inputs(
            "add_lora_fused_moe", y, x, lora_a_stacked, lora_b_stacked, topk_weights,
            bool(mul_routed_weight), offset,
        )  # fmt: skip
        if fully_sharded and not add_inputs:
            raise ValueError("add_lora_fused_moe: add_inputs=False with fully_sharded=True")
        num_loras, num_experts = lora_a_stacked[0].shape[:2]
        pairs = m * top_k
        if pairs == 0:
            return
        tlm = self._moe_token_ids(m, token_lora_mapping)[:m]
        if sorted_token_ids is None:
            pair_lora = tlm.long()[:, None].expand(m, top_k).reshape(pairs)
            pair_expert = expert_ids.reshape(-1).long()
        else:
            block = int(shrink_config.get("BLOCK_SIZE_M", 64))
            pair_lora, pair_expert = unsort_pairs(
                sorted_token_ids, expert_ids, num_tokens_post_padded, tlm, pairs, block
            )
        slot_ids, flat_ids = _pair_ids(
            pair_lora, pair_expert, adapter_enabled, num_loras, num_experts
        )
        # w13 reads each token once per slot: repeat its rows (an [M k, K] copy sized by the
        # shapes) so each slice's shrink is one launch over the pairs
        xp = x if mul_routed_weight else x[:, None].expand(m, top_k, x.shape[1]).reshape(pairs, -1)
        rank = lora_a_stacked[0].shape[2]
        s = torch.empty((len(lora_a_stacked), pairs, rank), dtype=torch.float32, device=x.device)
        ones = self._scale_tensor(num_loras * num_experts, 1.0, x.device)
        for j, lora_a in enumerate(lora_a_stacked):
            w, ids = _expert_stack(lora_a, slot_ids, flat_ids)
            lora_shrink_(s[j], xp, w, ids, ones[: w.shape[0]])
        if fully_sharded:
            s = _gather_rank_shards(s, lora_b_stacked[0].shape[3])
        if mul_routed_weight:
            s.mul_(topk_weights.reshape(1, pairs, 1).to(torch.float32))
        n = lora_b_stacked[0].shape[2]
        for j, lora_b in enumerate(lora_b_stacked):
            w, ids = _expert_stack(lora_b, slot_ids, flat_ids)
            cols = slice(offset + j * n, offset + (j + 1) * n)
            yv = _pair_rows(y)
            if yv is not None:
                lora_expand_(yv[:, cols], s[j], w, ids, add_inputs=add_inputs)
                continue
            s3, ids3 = s[j].view(m, top_k, -1), ids.view(m, top_k)
            for k in range(top_k):  # y's slots are not one row stride apart
                lora_expand_(y[:, k, cols], s3[:, k], w, ids3[:, k], add_inputs=add_inputs)

    def add_lora_w13(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        lora_a_stacked: tuple[torch.Tensor, ...],
        lora_b_stacked: tuple[torch.Tensor, ...],
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        expert_map: torch.Tensor | None,
        w1: torch.Tensor,
        w2: torch.Tensor,
        num_tokens: int,
        top_k_num: int,
        max_loras: int,
        adapter_enabled: torch.Tensor,
        local_num_experts: int,
        top_k: int,
        num_slices: int,
        fully_sharded: bool,
        use_tuned_config: bool,
        add_inputs: bool = True,
        token_lora_mapping: torch.Tensor | None = None,
    ) -> tuple[None, torch.Tensor, None, torch.Tensor]:
        """The gate / up LoRA terms into ``y`` (vLLM's ``intermediate_cache1 [M, k, S I]``)
        before the activation: slice s of pair (t, k) gets ``(x[t] @ A_s[a, e].T) @ B_s[a, e].T``
        with ``e = expert_map[topk_ids[t, k]]`` (``topk_ids`` itself without a map).

        Returns ``(None, expert_ids [M k], None, token_lora_mapping)``, vLLM's unsorted layout,
        which :meth:`add_lora_w2` takes back: the pairs are never sorted on the host."""
        del w1, w2, num_tokens, top_k_num, max_loras, local_num_experts, top_k, num_slices
        del use_tuned_config
        pair_expert = topk_ids.reshape(-1)
        if expert_map is not None:  # global -> this rank's experts, -1 for the others'
            pair_expert = expert_map[pair_expert.long()]
        tlm = self._moe_token_ids(topk_weights.shape[0], token_lora_mapping)
        self.add_lora_fused_moe(
            y.view(-1, topk_ids.shape[1], y.shape[-1]), x, lora_a_stacked, lora_b_stacked,
            topk_weights, None, pair_expert, None, lora_a_stacked[0].shape[-2],
            topk_ids.shape[1], {}, {}, adapter_enabled, fully_sharded=fully_sharded,
            token_lora_mapping=tlm, add_inputs=add_inputs,
        )  # fmt: skip
        return None, pair_expert, None, tlm

    def add_lora_w2(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        lora_a_stacked: tuple[torch.Tensor, ...],
        lora_b_stacked: tuple[torch.Tensor, ...],
        topk_weights: torch.Tensor,
        sorted_token_ids_lora: torch.Tensor | None,
        expert_ids_lora: torch.Tensor | None,
        num_tokens_post_padded_lora: torch.Tensor | None,
        token_lora_mapping: torch.Tensor | None,
        num_tokens: int,
        w1: torch.Tensor,
        w2: torch.Tensor,
        top_k_num: int,
        max_loras: int,
        adapter_enabled: torch.Tensor,
        top_k: int,
        fully_sharded: bool,
        tp_rank: int,
        use_tuned_config: bool,
        add_inputs: bool = True,
    ) -> None:
        """The down LoRA term into ``y`` (``intermediate_cache3 [M, k, H]``) before the sum over
        slots: ``y[t, k] += topk_weights[t, k] * (x[p] @ A[a, e].T) @ B[a, e].T`` with
        ``x [M k, I]`` the activation's output; the routing is :meth:`add_lora_w13`'s return
        (or vLLM's sorted layout, ``expert_ids [L, blocks]``). A fully-sharded rank writes its
        shard at ``tp_rank * H_shard``."""
        del num_tokens, w1, w2, top_k_num, top_k, use_tuned_config
        offset = lora_b_stacked[0].shape[-2] * tp_rank if fully_sharded else 0
        sorted_ids, eids = sorted_token_ids_lora, expert_ids_lora
        if sorted_ids is not None:
            sorted_ids, eids = sorted_ids.view(max_loras, -1), eids.view(max_loras, -1)
        self.add_lora_fused_moe(
            y, x, lora_a_stacked, lora_b_stacked, topk_weights, sorted_ids, eids,
            num_tokens_post_padded_lora, lora_a_stacked[0].shape[-2], topk_weights.shape[1],
            {}, {}, adapter_enabled, True, fully_sharded=fully_sharded, offset=offset,
            token_lora_mapping=token_lora_mapping, add_inputs=add_inputs,
        )  # fmt: skip


def _pair_ids(pair_lora, pair_expert, adapter_enabled, num_loras: int, num_experts: int):
    """Each pair's slot and ``slot * E + expert`` (its row in an ``[L E, ...]`` view of a
    stack), -1 where vLLM's kernel skips the pair (``_fused_moe_lora_kernel``: slot -1 or
    >= max_loras, ``adapter_enabled[slot] == 0``, expert -1); an expert outside ``[0, E)`` is
    skipped too, where vLLM would read past the stack."""
    a = pair_lora.long()
    e = pair_expert.long()
    in_range = (a >= 0) & (a < num_loras) & (e >= 0) & (e < num_experts)
    enabled = adapter_enabled[a.clamp(0, adapter_enabled.shape[0] - 1)] != 0
    live = in_range & enabled
    slot_ids = torch.where(live, a, -1)
    return slot_ids, torch.where(live, a * num_experts + e, -1)


def _expert_stack(w: torch.Tensor, slot_ids, flat_ids):
    """A ``[L, E, rows, cols]`` stack as the ``[L', rows, cols]`` our ops take, with the ids
    that index it: a stack shared by the experts (expert dim 1, or vLLM's stride-0 expand of
    ``enable_moe_shared_loras``) by slot, otherwise ``[L E, ...]`` by ``slot * E + e`` (a view;
    a copy only for strides that no view can flatten)."""
    if w.shape[1] == 1 or w.stride(1) == 0:
        return w[:, 0], slot_ids
    return w.reshape(-1, *w.shape[2:]), flat_ids


def _pair_rows(y: torch.Tensor) -> torch.Tensor | None:
    """``y [M, k, N]`` as ``[M k, N]`` rows when its slots are one row stride apart."""
    if y.shape[1] == 1:
        return y[:, 0]
    if y.shape[0] == 1:
        return y[0]
    return y.flatten(0, 1) if y.stride(0) == y.shape[1] * y.stride(1) else None


def _gather_rank_shards(s: torch.Tensor, full_rank: int) -> torch.Tensor:
    """Fully-sharded LoRA: each tensor-parallel rank shrank with its rows of A; the shrink is
    summed over ranks when B takes this rank's width, else gathered along the rank (vLLM's
    ``_fused_moe_lora``)."""
    from vllm.distributed import (
        tensor_model_parallel_all_gather,
        tensor_model_parallel_all_reduce,
    )

    if s.shape[-1] == full_rank:
        return tensor_model_parallel_all_reduce(s)
    return tensor_model_parallel_all_gather(s)


def moe_align_pairs(
    topk_ids: torch.Tensor,
    token_lora_mapping: torch.Tensor,
    block_size: int,
    num_experts: int,
    max_loras: int,
    adapter_enabled: torch.Tensor,
    expert_map: torch.Tensor | None = None,
    *,
    pad_sorted_ids: bool = False,
    naive: bool = False,
):
    """vLLM's ``moe_lora_align_block_size`` (``PunicaWrapperGPU``; the sizes are its, the op is
    its CUDA ``moe_lora_align_block_size``) in sync-free torch ops. For each live slot l (one
    some token maps to, with ``adapter_enabled[l]``): its pairs p = t k + j grouped by expert in
    ascending order (a stable sort, pair order within an expert), each expert's group padded to
    a multiple of ``block_size`` with the sentinel ``M k``::

        sorted_token_ids [L EM]   row l: the pairs, then padding   (EM: vLLM's bound)
        expert_ids [L ceil(EM / block)]   each block's expert (through expert_map), -1 past them
        num_tokens_post_padded [L]        row l's padded length (0 for a slot with no pairs)

    With ``naive`` (vLLM's few-tokens case): ``(None, topk_ids flat, None)``, through
    ``expert_map`` where one is given."""
    pairs = topk_ids.numel()
    top_k = topk_ids.shape[-1] if topk_ids.dim() > 1 else 1
    device = topk_ids.device
    if naive:
        flat = topk_ids.reshape(-1)
        return None, (flat if expert_map is None else expert_map[flat.long()]).int(), None
    sort_experts = expert_map.numel() if expert_map is not None else num_experts
    em = pairs + sort_experts * (block_size - 1)
    if pad_sorted_ids:
        em = -(-em // block_size) * block_size
    if pairs < sort_experts:
        em = pairs * block_size
    blocks = -(-em // block_size)
    lora = token_lora_mapping[: pairs // top_k].long()[:, None].expand(-1, top_k).reshape(-1)
    expert = topk_ids.reshape(-1).long()
    enabled = adapter_enabled[lora.clamp(0, adapter_enabled.shape[0] - 1)] != 0
    live = (lora >= 0) & (lora < max_loras) & enabled & (expert >= 0) & (expert < sort_experts)
    key = torch.where(live, lora * sort_experts + expert, max_loras * sort_experts)
    counts = torch.zeros(max_loras * sort_experts + 1, dtype=torch.long, device=device)
    counts.scatter_add_(0, key, torch.ones_like(key))
    counts = counts[:-1].view(max_loras, sort_experts)
    padded = (counts + block_size - 1) // block_size * block_size
    ends = padded.cumsum(1)  # row l: expert e's padded group ends at ends[l, e]
    num_post_pad = ends[:, -1]
    # rank of each pair within its (slot, expert) group, from a stable sort by key
    order = torch.sort(key, stable=True).indices
    group_start = torch.cumsum(counts.flatten(), 0) - counts.flatten()
    sorted_key = key[order]
    rank = (
        torch.arange(pairs, device=device)
        - torch.cat((group_start, group_start.new_tensor([pairs])))[sorted_key]
    )
    row = torch.where(live[order], sorted_key // sort_experts, max_loras)
    col = (ends - padded).flatten()[sorted_key.clamp(max=max_loras * sort_experts - 1)] + rank
    dest = torch.where(row < max_loras, row * em + col, max_loras * em)
    sorted_ids = torch.full((max_loras * em + 1,), pairs, dtype=torch.int32, device=device)
    sorted_ids.scatter_(0, dest, order.int())
    starts = torch.arange(blocks, device=device) * block_size
    block_expert = torch.searchsorted(ends, starts.expand(max_loras, -1).contiguous(), right=True)
    in_rows = starts[None, :] < num_post_pad[:, None]
    block_expert = block_expert.clamp(max=sort_experts - 1)
    if expert_map is not None:
        block_expert = expert_map[block_expert].long()
    expert_ids = torch.where(in_rows, block_expert, -1).int().flatten()
    return sorted_ids[:-1], expert_ids, num_post_pad.int()


def unsort_pairs(sorted_token_ids, expert_ids, num_tokens_post_padded, token_lora_mapping,
                 pairs: int, block_size: int):  # fmt: skip
    """Each pair's slot and expert back from vLLM's sorted layout, as its kernel reads it
    (``_get_token_offs`` / ``_get_expert_id`` of ``fused_moe_lora_op.py``): in row l (only the
    slots some token maps to: vLLM's ``lora_ids``), position j below
    ``num_tokens_post_padded[l]`` holds pair ``sorted_token_ids[l, j]`` (the sentinel ``>=
    pairs``: padding) of expert ``expert_ids[l, j // block_size]``. Pairs in no row: -1."""
    num_loras, em = sorted_token_ids.shape
    device = sorted_token_ids.device
    tlm = token_lora_mapping.long()
    active = torch.zeros(num_loras + 1, dtype=torch.bool, device=device)
    active[torch.where((tlm >= 0) & (tlm < num_loras), tlm, num_loras)] = True
    pos = torch.arange(em, device=device)
    eids = expert_ids.view(num_loras, -1)
    blk = (pos // block_size).clamp(max=eids.shape[1] - 1)
    ids = sorted_token_ids.long()
    live = active[:num_loras, None] & (pos[None, :] < num_tokens_post_padded.long()[:, None])
    live &= (ids >= 0) & (ids < pairs)
    dest = torch.where(live, ids, pairs).flatten()
    rows = torch.arange(num_loras, device=device)[:, None].expand(num_loras, em)
    pair_lora = torch.full((pairs + 1,), -1, dtype=torch.long, device=device)
    pair_expert = torch.full((pairs + 1,), -1, dtype=torch.long, device=device)
    pair_lora.scatter_(0, dest, torch.where(live, rows, -1).flatten())
    pair_expert.scatter_(0, dest, torch.where(live, eids[:, blk].long(), -1).flatten())
    return pair_lora[:pairs], pair_expert[:pairs]


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
