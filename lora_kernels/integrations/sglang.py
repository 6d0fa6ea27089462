"""SGLang on lora_kernels: a LoRA backend (SGLang's seam for LoRA kernels) registered as
``"lora_kernels"``, selected with ``--lora-backend lora_kernels``.

SGLang's LoRA layers run their base layer and call the backend for the adapter terms, on SGLang's
memory pool layout (SGLang 0.5.23, ``sglang/srt/lora/backend/base_backend.py`` and
``torch_backend.py``)::

    run_lora_a_sgemm(x [s, K], A [L, c*R, K], stack_num=c) -> [s, c*R]:
        out[i, :c*r_a] = scalings[a] * x[i] @ A[a, :c*r_a].T      (zeros past c*r_a)
    run_lora_b_sgemm(x [s, c*R], B [L, N, R], offsets) -> base_output (+)= per slice j:
        out[i, o_j:o_j+1] += x[i, j*r_a:(j+1)*r_a] @ B[a, o_j:o_j+1, :r_a].T
    run_qkv_lora / run_gate_up_lora: the two in a row, c = 3 / 2 output slices

where ``a`` is the pool slot of token i's request and ``r_a = lora_ranks[a]``: the pool packs an
adapter's stacked slices at its own rank (slice j in rows ``j*r_a .. (j+1)*r_a`` of A), and a
request without an adapter sits in a slot of rank 0, which adds nothing. The scaling is applied
in the A pass, as SGLang's torch backend does, so each call matches it on its own.

The work runs on ``lora_kernels.ops.lora_delta`` (the ``lora_multi`` Triton kernels on CUDA, the
torch backend on CPU), one row id per token, prepared once per batch in
:meth:`LoraKernelsLoRABackend.prepare_lora_batch` from the host-side lists SGLang passes (one
host-to-device copy; nothing reads device values back). Decode CUDA graphs read persistent
buffers that each batch refills, padded rows with id -1. The stacked slices of B, read at each
adapter's own rank, are gathered into place per row on the device.

Registration: SGLang calls every ``sglang.srt.plugins`` entry point in each process before it
parses arguments or builds a model; :func:`register` (this package's entry point) adds the
backend to ``sglang.srt.lora.backend.lora_registry`` and ``"lora_kernels"`` to the choices of
``--lora-backend`` (a fixed list in SGLang's argument table). ``LORA_KERNELS_SGLANG=0`` turns it
off (SGLang's ``SGLANG_PLUGINS`` list, leaving ``lora_kernels`` out, does too).

Not here: the embedding and LM-head LoRA (``run_lora_a_embedding`` is a gather, done with torch
indexing), the fused-MoE LoRA, DP attention and prefill CUDA graphs (the base class refuses
them), and a fused base + LoRA ``forward_with_base`` (the base class's, base GEMM then the
adapter terms, runs).
"""

from __future__ import annotations

import logging
import typing
from typing import Any

import torch
from sglang.srt.lora.backend.base_backend import BaseLoRABackend
from sglang.srt.lora.utils import LoRABatchInfo, generate_sequence_lengths

from .. import envs
from ..ops.lora_delta import lora_expand_, lora_shrink_

__all__ = ["BACKEND_NAME", "LoraKernelsLoRABackend", "enabled", "register"]

logger = logging.getLogger(__name__)

BACKEND_NAME = "lora_kernels"
ENV_SWITCH = "LORA_KERNELS_SGLANG"


def enabled() -> bool:
    """Whether the plugin is on: ``LORA_KERNELS_SGLANG`` unset or not one of ``0``,
    ``false``, ``off``, ``no``
    (``lora_kernels.envs`` reads it, with every variable of the package)."""
    return envs.sglang_plugin()


def _offsets(output_offset_cpu) -> list[int]:
    if isinstance(output_offset_cpu, torch.Tensor):
        return [int(v) for v in output_offset_cpu.tolist()]
    return [int(v) for v in output_offset_cpu]


def _no_pruned_rows(fn: str, kwargs: dict) -> None:
    if kwargs.get("pruned_batch_info") is not None:
        raise NotImplementedError(
            f"{fn}: the lora_kernels backend has no LM-head LoRA (pruned_batch_info); serve "
            "adapters that target lm_head with another --lora-backend"
        )


class LoraKernelsLoRABackend(BaseLoRABackend):
    """SGLang's ``BaseLoRABackend`` on lora_kernels (formulas in the module docstring)."""

    name = BACKEND_NAME

    def __init__(self, max_loras_per_batch: int, device: torch.device, **kwargs: Any):
        super().__init__(max_loras_per_batch, device)
        self.token_ids: torch.Tensor | None = None  # [tokens] int32, the pool slot or -1
        self.cuda_graph_batch_info: LoRABatchInfo | None = None
        self._graph_token_ids: torch.Tensor | None = None

    # ---------------------------------------------------------------------------- batch metadata

    def init_decode_cuda_graph_batch_info(self, max_bs_in_cuda_graph: int, num_tokens_per_req: int):
        """Persistent metadata that every decode batch refills (a captured graph reads these)."""
        tokens = max_bs_in_cuda_graph * num_tokens_per_req
        with torch.device(self.device):
            self._graph_token_ids = torch.full((tokens,), -1, dtype=torch.int32)
            self.cuda_graph_batch_info = LoRABatchInfo(
                use_cuda_graph=True,
                bs=max_bs_in_cuda_graph,
                num_segments=max_bs_in_cuda_graph,
                seg_lens=torch.full((max_bs_in_cuda_graph,), num_tokens_per_req, dtype=torch.int32),
                seg_indptr=torch.arange(0, tokens + 1, num_tokens_per_req, dtype=torch.int32),
                weight_indices=torch.zeros(max_bs_in_cuda_graph, dtype=torch.int32),
                lora_ranks=torch.zeros(self.max_loras_per_batch, dtype=torch.int32),
                scalings=torch.zeros(self.max_loras_per_batch, dtype=torch.float32),
                max_len=num_tokens_per_req,
                permutation=None,
            )

    def prepare_lora_batch(
        self,
        forward_batch,
        weight_indices: list[int],
        lora_ranks: list[int],
        scalings: list[float],
        use_cuda_graph: bool,
        use_prefill_cuda_graph: bool = False,
    ):
        """One slot per request (``weight_indices``), the pool's ranks and scalings: every
        token's slot id, on the host, then copied to the device once."""
        if use_prefill_cuda_graph:
            raise NotImplementedError(
                "the lora_kernels backend does not capture prefill CUDA graphs"
            )
        seq_lens = generate_sequence_lengths(forward_batch, device="cpu").to(torch.int32)
        slots = torch.tensor(weight_indices, dtype=torch.int32)
        ranks = torch.tensor(lora_ranks, dtype=torch.int32)
        token_slots = torch.repeat_interleave(slots, seq_lens)
        # a slot of rank 0 (the pool's "no adapter") adds nothing: id -1 skips it outright
        has_rank = ranks[token_slots.long()] > 0 if token_slots.numel() else token_slots.bool()
        token_ids = torch.where(has_rank, token_slots, -1).to(torch.int32)
        seg_indptr = torch.zeros(len(seq_lens) + 1, dtype=torch.int32)
        seg_indptr[1:] = torch.cumsum(seq_lens, 0)
        scale_t = torch.tensor(scalings, dtype=torch.float32)
        device = self.device
        if use_cuda_graph:
            if self.cuda_graph_batch_info is None:
                raise RuntimeError("init_decode_cuda_graph_batch_info was not called")
            info = self.cuda_graph_batch_info
            info.bs = forward_batch.batch_size
            info.num_segments = len(weight_indices)
            self._graph_token_ids.fill_(-1)
            self._graph_token_ids[: token_ids.numel()].copy_(token_ids, non_blocking=True)
            info.weight_indices[: slots.numel()].copy_(slots, non_blocking=True)
            self.token_ids = self._graph_token_ids
        else:
            info = LoRABatchInfo(
                use_cuda_graph=False,
                bs=forward_batch.batch_size,
                num_segments=len(weight_indices),
                seg_lens=seq_lens.to(device, non_blocking=True),
                seg_indptr=seg_indptr.to(device, non_blocking=True),
                weight_indices=slots.to(device, non_blocking=True),
                lora_ranks=torch.zeros(self.max_loras_per_batch, dtype=torch.int32, device=device),
                scalings=torch.zeros(self.max_loras_per_batch, dtype=torch.float32, device=device),
                max_len=int(seq_lens.max()) if seq_lens.numel() else 0,
                permutation=None,
                expected_tokens=int(token_ids.numel()),
            )
            self.token_ids = token_ids.to(device, non_blocking=True)
        info.lora_ranks[: ranks.numel()].copy_(ranks, non_blocking=True)
        info.scalings[: scale_t.numel()].copy_(scale_t, non_blocking=True)
        self.batch_info = self._add_moe_lora_info(forward_batch, info)

    def _ids(self, num_tokens: int) -> torch.Tensor:
        if self.token_ids is None:
            raise RuntimeError("prepare_lora_batch must run before the LoRA kernels")
        return self.token_ids[:num_tokens]

    # ------------------------------------------------------------------------------- the kernels

    def run_lora_a_sgemm(
        self, x: torch.Tensor, weights: torch.Tensor, stack_num: int = 1, *args, **kwargs
    ) -> torch.Tensor:
        """``[s, c*R]`` in x's dtype: each token's stacked A product at its adapter's rank,
        scaled."""
        _no_pruned_rows("run_lora_a_sgemm", kwargs)
        info = self.batch_info
        out = torch.empty((x.shape[0], weights.shape[1]), dtype=x.dtype, device=x.device)
        if weights.numel() == 0:
            return out.zero_()
        num_adapters = weights.shape[0]
        ranks = (info.lora_ranks[:num_adapters] * stack_num).to(torch.int32)
        lora_shrink_(out, x, weights, self._ids(x.shape[0]), info.scalings[:num_adapters], ranks)
        return out

    def run_lora_b_sgemm(
        self,
        x: torch.Tensor,
        weights: torch.Tensor,
        output_offset_cpu=None,
        base_output: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        """``base_output`` (zeros when None) plus each slice's B product, slice j of x read at
        columns ``j*r_a .. (j+1)*r_a`` of its token's adapter rank ``r_a``."""
        _no_pruned_rows("run_lora_b_sgemm", kwargs)
        num_adapters, out_dim, r_max = weights.shape
        offsets = [0, out_dim] if output_offset_cpu is None else _offsets(output_offset_cpu)
        m = x.shape[0]
        out = base_output
        if out is None:
            out = torch.zeros((m, offsets[-1]), dtype=x.dtype, device=x.device)
        if weights.numel() == 0 or m == 0:
            return out
        info = self.batch_info
        ids = self._ids(m)
        ranks = info.lora_ranks[:num_adapters].to(torch.int32)
        num_slices = len(offsets) - 1
        if num_slices > 1:
            row_rank = ranks[ids.long().clamp(min=0)].long()[:, None]
            cols = torch.arange(r_max, device=x.device)[None, :]
        for j in range(num_slices):
            lo, hi = offsets[j], offsets[j + 1]
            s = x
            if num_slices > 1:  # slice j of this row sits at columns j*r_a onward
                s = x.gather(1, (j * row_rank + cols).clamp(max=x.shape[1] - 1))
            lora_expand_(out[:, lo:hi], s, weights[:, lo:hi], ids, ranks, add_inputs=True)
        return out

    def run_qkv_lora(
        self,
        x: torch.Tensor,
        qkv_lora_a: torch.Tensor,
        qkv_lora_b: torch.Tensor | tuple[torch.Tensor, ...],
        output_offset: torch.Tensor | None = None,
        output_offset_cpu=None,
        max_qkv_out_dim: int | None = None,
        base_output: torch.Tensor | None = None,
        n_slices: int = 3,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        if not isinstance(qkv_lora_b, torch.Tensor):
            raise NotImplementedError(
                "run_qkv_lora: the lora_kernels backend takes qkv_lora_b as one stacked tensor "
                "[L, q + 2 * kv, r], as SGLang's memory pool holds it"
            )
        a_out = self.run_lora_a_sgemm(x, qkv_lora_a, n_slices)
        return self.run_lora_b_sgemm(a_out, qkv_lora_b, output_offset_cpu, base_output)

    def run_gate_up_lora(
        self,
        x: torch.Tensor,
        gate_up_lora_a: torch.Tensor,
        gate_up_lora_b: torch.Tensor | tuple[torch.Tensor, ...],
        output_offset_cpu=None,
        base_output: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        if not isinstance(gate_up_lora_b, torch.Tensor):
            raise NotImplementedError(
                "run_gate_up_lora: the lora_kernels backend takes gate_up_lora_b as one stacked "
                "tensor [L, 2 * out, r], as SGLang's memory pool holds it"
            )
        if output_offset_cpu is None:
            half = gate_up_lora_b.shape[1] // 2
            output_offset_cpu = [0, half, 2 * half]
        num_slices = len(_offsets(output_offset_cpu)) - 1
        a_out = self.run_lora_a_sgemm(x, gate_up_lora_a, num_slices)
        return self.run_lora_b_sgemm(a_out, gate_up_lora_b, output_offset_cpu, base_output)

    def run_lora_a_embedding(
        self,
        input_ids: torch.Tensor,
        weights: torch.Tensor,
        vocab_size: int,
        extra_embeddings: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        """``[s, R]`` in the weights' dtype: ``scalings[a] * weights[a, :r_a, input_ids[i]]``
        (a gather, no product), zeros past ``r_a`` and for tokens with no adapter."""
        if extra_embeddings is not None:
            raise NotImplementedError(
                "run_lora_a_embedding: the lora_kernels backend has no extra (added) tokens"
            )
        num_adapters, r_max, _ = weights.shape
        info = self.batch_info
        ids = self._ids(input_ids.shape[0]).long()
        valid = ids >= 0
        slot = ids.clamp(min=0)
        rows = weights[slot, :, input_ids.long()]  # [s, R]
        rank_mask = (
            torch.arange(r_max, device=weights.device)[None, :]
            < (info.lora_ranks[:num_adapters].long()[slot][:, None])
        )
        scale = torch.where(valid, info.scalings[:num_adapters][slot], 0.0)
        return (rows.float() * rank_mask * scale[:, None]).to(weights.dtype)


def _create_backend():
    return LoraKernelsLoRABackend


def _add_cli_choice() -> None:
    """Add ``"lora_kernels"`` to the ``--lora-backend`` choices. SGLang lists them in its argument
    table (``sglang.srt.arg_groups.fields.lora.Lora``), and ``ServerArgs``, from whose fields the
    parser is built, holds its own copy of that field's metadata: both lists get the name."""
    from sglang.srt.arg_groups.fields.lora import Lora
    from sglang.srt.server_args import ServerArgs

    for table in (Lora, ServerArgs):
        hint = typing.get_type_hints(table, include_extras=True).get("lora_backend")
        for meta in getattr(hint, "__metadata__", ()):
            choices = getattr(meta, "choices", None)
            if isinstance(choices, list) and BACKEND_NAME not in choices:
                choices.append(BACKEND_NAME)


def register() -> None:
    """The ``sglang.srt.plugins`` entry point: register the backend as ``"lora_kernels"`` and
    make ``--lora-backend lora_kernels`` parse. Safe to call more than once; a no-op when
    ``LORA_KERNELS_SGLANG=0``."""
    if not enabled():
        logger.info("lora_kernels: %s=0, the SGLang backend is not registered", ENV_SWITCH)
        return
    from sglang.srt.lora.backend import lora_registry

    lora_registry.register_lora_backend(BACKEND_NAME)(_create_backend)
    _add_cli_choice()
