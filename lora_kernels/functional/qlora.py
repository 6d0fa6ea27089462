"""LoRA on a 4-bit (bitsandbytes NF4 / FP4) base weight: the functional entry points.

    y = x @ W.T + bias + scale * (x_lora @ lora_a.T) @ lora_b.T,    W = dequantize(qweight)

``W`` stays in bitsandbytes' storage (``quantize_4bit``'s packed bytes, block maxima, optional
double quantization), read as stored: no repacking, no conversion call. The Triton kernels
dequantize W tiles inside the GEMM's K-loop; the torch path (CPU) dequantizes W, then multiplies.
W is rounded to x's dtype before the product, exactly as bitsandbytes' own 4-bit matmul does, so
the only differences from ``Linear4bit`` + PEFT are in how the products accumulate (fp32, one
rounding here).

``quant_state`` is bitsandbytes' ``QuantState`` (``Linear4bit.weight.quant_state``), read by its
attributes only: this module never imports bitsandbytes. :class:`Quant4bit` is the same
information as a plain tuple.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .. import ops
from .._checks import check_qlora_linear_inputs, check_quant4bit, check_quant_state, check_qweight
from ..backends import launcher, resolve_backend

__all__ = ["Quant4bit", "as_quant4bit", "dequantize_4bit", "qlora_linear"]


class Quant4bit(NamedTuple):
    """Everything but the packed bytes that bitsandbytes' 4-bit format needs (see
    ``reference.dequantize_4bit`` for how the fields combine)."""

    absmax: torch.Tensor  # fp32 [blocks], or uint8 [blocks] with double quantization
    code: torch.Tensor  # fp32 [16]: the NF4 or FP4 table
    blocksize: int
    shape: tuple[int, int]  # (out_features N, in_features K)
    absmax2: torch.Tensor | None = None  # fp32 [ceil(blocks / blocksize2)] (nested only)
    code2: torch.Tensor | None = None  # fp32 [256] (nested only)
    offset: torch.Tensor | None = None  # fp32, one element (nested only)
    blocksize2: int = 256
    quant_type: str | None = None  # "nf4" / "fp4", informative

    @property
    def nested(self) -> bool:
        return self.absmax2 is not None


def as_quant4bit(fn: str, quant_state: object) -> Quant4bit:
    """A :class:`Quant4bit` from bitsandbytes' ``QuantState`` (or a ``Quant4bit``), checked."""
    if isinstance(quant_state, Quant4bit):
        q = quant_state
    else:
        check_quant_state(fn, quant_state)
        shape = quant_state.shape
        state2 = getattr(quant_state, "state2", None)
        nested = state2 is not None
        q = Quant4bit(
            absmax=quant_state.absmax,
            code=quant_state.code,
            blocksize=quant_state.blocksize,
            shape=(int(shape[0]), int(shape[1])),
            absmax2=state2.absmax if nested else None,
            code2=state2.code if nested else None,
            offset=quant_state.offset if nested else None,
            blocksize2=state2.blocksize if nested else 256,
            quant_type=getattr(quant_state, "quant_type", None),
        )
    check_quant4bit(fn, q)
    return q


def _flat_args(qweight: torch.Tensor, q: Quant4bit) -> tuple:
    offset = None if q.offset is None else q.offset.reshape(1)
    return (
        qweight.reshape(-1).view(torch.uint8),
        q.absmax.reshape(-1),
        q.code,
        q.absmax2,
        q.code2,
        offset,
        q.blocksize,
        q.blocksize2,
    )


def dequantize_4bit(
    qweight: torch.Tensor, quant_state: object, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``W [N, K]`` from bitsandbytes' packed 4-bit ``qweight`` and its ``quant_state``, in
    ``dtype`` (default: ``quant_state.dtype``, else float32). Computed in fp32 and rounded once:
    the values bitsandbytes' ``dequantize_4bit`` returns."""
    fn = "lora_kernels.dequantize_4bit"
    q = as_quant4bit(fn, quant_state)
    check_qweight(fn, qweight, q, qweight.device)
    if dtype is None:
        dtype = getattr(quant_state, "dtype", None) or torch.float32
    n, k = q.shape
    return launcher("torch", "qlora", "dequantize_4bit")(*_flat_args(qweight, q), n, k, dtype)


def qlora_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    quant_state: object,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    *,
    x_lora: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``y = x @ W.T + bias + scale * (x_lora @ lora_a.T) @ lora_b.T`` with ``W`` 4-bit.

    Args:
        x: [..., K], float16 / bfloat16 / float32 (float64 on the torch backend).
        qweight: bitsandbytes' packed 4-bit weight (``Linear4bit.weight``: ``ceil(N*K/2)``
            bytes, any shape and storage dtype), frozen.
        quant_state: its ``QuantState`` (``Linear4bit.weight.quant_state``) or a ``Quant4bit``.
        bias: [N] in x's dtype, or None.
        lora_a: [r, K], lora_b: [N, r], in x's dtype or float32 (both the same).
        scale: ``lora_alpha / r`` (or ``/ sqrt(r)``).
        x_lora: the LoRA branch's input (PEFT's dropout), x's shape; default x.
        backend: ``"auto"``, ``"triton"``, ``"cuda"`` (runs Triton: this family has no CUDA
            C++ kernel) or ``"torch"``.

    Returns:
        y [..., N] in x's dtype. Gradients flow to x, x_lora, bias, lora_a and lora_b.
    """
    fn = "lora_kernels.qlora_linear"
    q = as_quant4bit(fn, quant_state)
    scale = check_qlora_linear_inputs(fn, x, qweight, q, bias, lora_a, lora_b, scale, x_lora)
    n, k = q.shape
    # No CUDA C++ kernel for this family: the dispatch hands "cuda" to Triton (serving_backend).
    resolved = resolve_backend(backend, x, lora_a.shape[0])
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    xl2 = None if x_lora is None else x_lora.reshape(-1, k)
    y = ops.qlora_linear_2d(
        x2, *_flat_args(qweight, q), n, bias, lora_a, lora_b, scale, xl2, resolved
    )
    return y.reshape(*lead, n)
