"""The functional front door of mixture-of-experts LoRA: ``moe_lora`` (LoRA on both projections
of a transformers 5 fused-experts module, forward and backward grouped by expert) and the
conversions between PEFT's ``target_parameters`` factor layout and the per-expert stacks the op
takes.

PEFT's ``ParamWrapper`` on a 3-D parameter ``[E, out, in]`` (``[E, in, out]`` when the experts
module says ``is_transposed``, gpt-oss) keeps one ``lora_A.weight [E r, in]`` and one
``lora_B.weight [out, r E]``: A stacks the experts' rank blocks (expert e owns rows
``e r .. e r + r``), B interleaves them (expert e owns columns ``e, e + E, e + 2E, ...``), and
``delta W[e] = scaling * B_e A_e`` in the ``[out, in]`` orientation. :func:`peft_expert_factors`
turns the pair into ``a [E, r, in]`` and ``b [E, out, r]`` views (no copy; gradients flow back to
PEFT's tensors).
"""

from __future__ import annotations

import weakref

import torch

from .. import ops
from .._checks import check_moe_lora_inputs
from ..backends import resolve_backend
from ._autocast import autocast_inputs

__all__ = ["moe_lora", "peft_expert_factors", "peft_expert_weights"]

# On a CPU with autograd recording the factors, copy PEFT's interleaved B expert-major once a
# call has this many (token, slot) pairs per expert (most experts hit): below it, the hit
# experts' strided reads cost less than the copy (64 experts, top-8: strided at 1-4 tokens,
# copied from 16).
_CONTIGUOUS_PAIRS_PER_EXPERT = 2

# Expert-major copies of interleaved factors for calls that record no graph through them
# (inference, decode): ``(id(root), geometry) -> (weakref(root), version, copy)``, dropped with
# the root tensor. A copy is reused while the factor's version counter is unchanged (every
# in-place write through the tensor or a view of it, an optimizer step included, bumps it).
_EXPERT_MAJOR_CACHE: dict = {}


def _dense_experts(f: torch.Tensor) -> bool:
    """Whether each expert's matrix of ``f [L, E, m, n]`` has a unit stride (a GEMM reads it
    as it is): per-expert stacks do, PEFT's interleaved B (experts on the unit stride) not."""
    return f.stride(-1) == 1 or f.stride(-2) == 1


def _expert_major_copy(f: torch.Tensor) -> torch.Tensor:
    """``f [L, E, m, n]`` copied with each expert's ``[m, n]`` block contiguous. PEFT's
    interleaved B (``[1, m, n, E]`` in memory) goes through a 2-D transpose, about 4x faster on
    a CPU than the strided copy ``contiguous()`` makes of the 4-D view."""
    lead, e, m, n = f.shape
    inner = f.movedim(1, -1)
    if lead == 1 and inner.is_contiguous():
        return inner.reshape(m * n, e).t().contiguous().view(1, e, m, n)
    return f.contiguous()


def _expert_major_cached(f: torch.Tensor) -> torch.Tensor:
    """:func:`_expert_major_copy` of ``f``, made once per version of ``f``'s values."""
    if f.is_inference() or torch.compiler.is_compiling():
        return _expert_major_copy(f)
    root = f if f._base is None else f._base
    geometry = (
        f.data_ptr(), tuple(f.shape), f.stride(), f.dtype, torch.is_inference_mode_enabled()
    )  # fmt: skip
    key = (id(root), geometry)
    hit = _EXPERT_MAJOR_CACHE.get(key)
    if hit is not None and hit[0]() is root and hit[1] == f._version:
        return hit[2]
    copy = _expert_major_copy(f.detach())
    if hit is None:
        weakref.finalize(root, _EXPERT_MAJOR_CACHE.pop, key, None)
    _EXPERT_MAJOR_CACHE[key] = (weakref.ref(root), f._version, copy)
    return copy


def _expert_layout(f: torch.Tensor | None, pairs: int) -> torch.Tensor | None:
    """The factor stack ``f [L, E, m, n]`` as the kernels read it best.

    PEFT's B interleaves the experts (expert e owns every E-th column), so one expert's slice is
    spread over the whole tensor: reading it per hit expert reads all of B each time. On a GPU
    one contiguous copy per call (the tiles would otherwise load it uncoalesced). On a CPU, a
    call that records no graph through ``f`` reads a cached expert-major copy (decode then
    reads only the hit experts' factors, no copy per call); one that does copies expert-major
    per call when most experts are hit (autograd takes the gradient back through the copy) and
    reads the strided slices otherwise.
    """
    if f is None:
        return None
    if f.device.type != "cpu":
        return f.contiguous()
    if _dense_experts(f):
        return f
    if not (torch.is_grad_enabled() and f.requires_grad):
        return _expert_major_cached(f)
    if pairs >= _CONTIGUOUS_PAIRS_PER_EXPERT * f.shape[1]:
        return _expert_major_copy(f)
    return f


def peft_expert_factors(
    lora_a: torch.Tensor, lora_b: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a [E, r, in], b [E, out, r])`` views of PEFT's ``lora_A.weight [E r, in]`` and
    ``lora_B.weight [out, r E]`` for one 3-D expert parameter."""
    a = lora_a.reshape(num_experts, -1, lora_a.shape[-1])
    b = lora_b.reshape(lora_b.shape[0], -1, num_experts).permute(2, 0, 1)
    return a, b


def peft_expert_weights(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of :func:`peft_expert_factors`: PEFT's ``(lora_A.weight [E r, in],
    lora_B.weight [out, r E])`` from ``a [E, r, in]`` and ``b [E, out, r]`` (new tensors)."""
    num_experts, r, n_in = a.shape
    lora_a = a.reshape(num_experts * r, n_in).clone()
    lora_b = b.permute(1, 2, 0).reshape(b.shape[1], r * num_experts).clone()
    return lora_a, lora_b


def moe_lora(
    x: torch.Tensor,
    top_k_ids: torch.Tensor,
    top_k_weights: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    lora_a_gate_up: torch.Tensor | None = None,
    lora_b_gate_up: torch.Tensor | None = None,
    lora_a_down: torch.Tensor | None = None,
    lora_b_down: torch.Tensor | None = None,
    scale: float | list[float] | torch.Tensor = 1.0,
    *,
    bias_gate_up: torch.Tensor | None = None,
    bias_down: torch.Tensor | None = None,
    adapter_ids: torch.Tensor | None = None,
    activation: str = "silu",
    swiglu_alpha: float = 1.702,
    swiglu_limit: float = 7.0,
    transposed: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """A mixture-of-experts layer's experts with LoRA on both projections, in one grouped pass.

    For each token ``t`` and slot ``j`` (expert ``e = top_k_ids[t, j]``, adapter ``a``)::

        g    = x[t] W_gu[e]^T + b_gu[e] + s_a (x[t] A_gu[a, e]^T) B_gu[a, e]^T     [2I]
        h    = act(g)                                                              [I]
        o    = h W_d[e]^T + b_d[e] + s_a (h A_d[a, e]^T) B_d[a, e]^T               [H]
        y[t] = sum_j top_k_weights[t, j] * o

    The pairs are grouped by expert once; each projection is one grouped GEMM with the LoRA
    shrink and expand on the same rows; ``delta W`` is never formed. The router (top-k choice and
    weights) stays the caller's: this is a drop-in for a transformers 5 experts module's
    ``forward(hidden_states, top_k_index, top_k_weights)`` and for the expert GEMMs of a serving
    engine's fused-MoE method.

    Args:
        x: ``[T, H]`` tokens, float16, bfloat16, float32 (float64 on the torch backend).
        top_k_ids: ``[T, k]`` int32/int64 expert per slot; an id outside ``[0, E)`` contributes
            nothing (expert parallelism's sentinels).
        top_k_weights: ``[T, k]`` router weights (any float dtype); differentiable.
        w_gate_up: ``[E, 2I, H]`` (``[E, H, 2I]`` with ``transposed``), x's dtype; frozen.
        w_down: ``[E, H, I]`` (``[E, I, H]`` with ``transposed``), x's dtype; frozen.
        lora_a_gate_up, lora_b_gate_up: ``[E, r, H]`` and ``[E, 2I, r]`` (one adapter), or
            ``[L, E, r, H]`` and ``[L, E, 2I, r]`` with ``adapter_ids``; x's dtype or float32;
            None for no LoRA on this projection. PEFT's tensors: :func:`peft_expert_factors`.
        lora_a_down, lora_b_down: ``[(L,) E, r', I]`` and ``[(L,) E, H, r']``, or None.
        scale: ``lora_alpha / r``; with ``adapter_ids`` one per adapter (a list or an ``[L]``
            tensor).
        bias_gate_up: ``[E, 2I]`` or None; bias_down: ``[E, H]`` or None (gpt-oss has both).
        adapter_ids: None (one adapter for all tokens) or ``[T]`` int32/int64 in ``[-1, L)``,
            -1: the base experts only. Checked on CPU tensors.
        activation: ``"silu"``: ``silu(gate) * up`` with ``gate, up = g[:I], g[I:]`` (Qwen3-MoE,
            Mixtral, OLMoE); ``"swiglu_oai"``: gpt-oss's clamped SwiGLU with gate and up
            interleaved, ``(clamp(up, -limit, limit) + 1) * gc * sigmoid(alpha * gc)``,
            ``gc = clamp(gate, max=limit)``.
        swiglu_alpha, swiglu_limit: ``"swiglu_oai"``'s constants.
        transposed: the weights are stored ``[E, in, out]`` (transformers' ``is_transposed``).
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.

    Returns:
        ``[T, H]`` in x's dtype. Differentiable in x, top_k_weights and the LoRA factors (the
        factors of an expert no token chose get zero gradients).
    """
    fn = "moe_lora"
    if transposed:
        for name, w in (("w_gate_up", w_gate_up), ("w_down", w_down)):
            if not isinstance(w, torch.Tensor) or w.dim() != 3:
                shape = list(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
                raise ValueError(f"{fn}: expected {name} as a 3-D tensor, got {shape}")
        w_gate_up = w_gate_up.transpose(1, 2)
        w_down = w_down.transpose(1, 2)
    factors = (lora_a_gate_up, lora_b_gate_up, lora_a_down, lora_b_down)
    x, w_gate_up, w_down, bias_gate_up, bias_down, *factors = autocast_inputs(
        x, w_gate_up, w_down, bias_gate_up, bias_down, *factors
    )
    factors = tuple(factors)
    _, scales = check_moe_lora_inputs(
        fn, x, top_k_ids, top_k_weights, w_gate_up, w_down, factors, scale, adapter_ids,
        (bias_gate_up, bias_down), activation,
    )  # fmt: skip
    frozen = (w_gate_up, w_down, bias_gate_up, bias_down)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in frozen):
        raise ValueError(
            f"{fn}: the base experts (w_gate_up, w_down and their biases) must be frozen "
            "(requires_grad=False): the op trains x, top_k_weights and the LoRA factors"
        )
    if adapter_ids is None:
        factors = tuple(None if f is None else f.unsqueeze(0) for f in factors)
    pairs = x.shape[0] * top_k_ids.shape[1]
    factors = tuple(_expert_layout(f, pairs) for f in factors)
    a_gu, b_gu, a_d, b_d = factors
    rank = max(a_gu.shape[2] if a_gu is not None else 1, a_d.shape[2] if a_d is not None else 1)
    lora = tuple(f for f in factors if f is not None)
    be = resolve_backend(backend, x, rank, *lora)
    keep_out = torch.is_grad_enabled() and top_k_weights.requires_grad
    return ops.moe_lora_2d(
        x, top_k_ids, top_k_weights, w_gate_up, bias_gate_up, a_gu, b_gu, w_down, bias_down,
        a_d, b_d, scales, adapter_ids, activation, float(swiglu_alpha), float(swiglu_limit),
        keep_out, be,
    )  # fmt: skip
