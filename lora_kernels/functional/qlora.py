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

import math
from typing import NamedTuple

import torch

from .._checks import (
    check_device,
    check_dtype,
    check_float,
    check_lora_linear_inputs,
    check_shape,
    check_tensor,
    fmt_shape,
)
from ..backends import resolve_backend
from ..ops.qlora import launcher, qlora_linear_2d

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
        fields = ("absmax", "code", "blocksize", "shape")
        missing = [a for a in fields if not hasattr(quant_state, a)]
        if quant_state is None or missing:
            raise TypeError(
                f"{fn}: expected quant_state to be bitsandbytes' QuantState (the quantized "
                f"weight's .quant_state) or a lora_kernels Quant4bit, got "
                f"{type(quant_state).__name__}"
                + (f" (no {', '.join(missing)})" if quant_state is not None else "")
            )
        if getattr(quant_state, "packing_format_for_cpu", False):
            raise ValueError(
                f"{fn}: quant_state is in bitsandbytes' AVX512 CPU packing "
                "(packing_format_for_cpu); convert it back with "
                "bitsandbytes.functional._convert_weight_packed_for_cpu_inverse first"
            )
        quant_type = getattr(quant_state, "quant_type", None)
        if quant_type not in (None, "nf4", "fp4"):
            raise ValueError(
                f"{fn}: expected quant_state.quant_type 'nf4' or 'fp4', got {quant_type!r}"
            )
        shape = quant_state.shape
        if shape is None or len(shape) != 2:
            raise ValueError(
                f"{fn}: expected quant_state.shape of a 2-D weight [out_features, in_features], "
                f"got {shape!r}"
            )
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
            quant_type=quant_type,
        )
    _check_quant(fn, q)
    return q


def _check_quant(fn: str, q: Quant4bit) -> None:
    for name, value in (("blocksize", q.blocksize), ("blocksize2", q.blocksize2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(
                f"{fn}: expected quant_state.{name} to be a positive int, got {value!r}"
            )
    n, k = q.shape
    if n < 1 or k < 1:
        raise ValueError(f"{fn}: expected a non-empty 4-bit weight, got shape {fmt_shape(q.shape)}")
    blocks = math.ceil(n * k / q.blocksize)
    check_tensor(fn, "quant_state.code", q.code)
    check_shape(fn, "quant_state.code", q.code, [16])
    check_dtype(fn, "quant_state.code", q.code, [torch.float32])
    check_tensor(fn, "quant_state.absmax", q.absmax)
    check_shape(fn, "quant_state.absmax", q.absmax, [blocks])
    if q.nested:
        check_dtype(fn, "quant_state.absmax (double-quantized)", q.absmax, [torch.uint8])
        check_tensor(fn, "quant_state.state2.absmax", q.absmax2)
        check_shape(fn, "quant_state.state2.absmax", q.absmax2, [math.ceil(blocks / q.blocksize2)])
        check_dtype(fn, "quant_state.state2.absmax", q.absmax2, [torch.float32])
        check_tensor(fn, "quant_state.state2.code", q.code2)
        check_shape(fn, "quant_state.state2.code", q.code2, [256])
        check_dtype(fn, "quant_state.state2.code", q.code2, [torch.float32])
        check_tensor(fn, "quant_state.offset", q.offset)
        if q.offset.numel() != 1 or q.offset.dtype != torch.float32:
            raise ValueError(
                f"{fn}: expected quant_state.offset to be one float32 value, got "
                f"{fmt_shape(q.offset.shape)} {q.offset.dtype}"
            )
    else:
        check_dtype(fn, "quant_state.absmax", q.absmax, [torch.float32])


def _check_qweight(fn: str, qweight: object, q: Quant4bit, device: torch.device) -> None:
    check_tensor(fn, "qweight", qweight)
    n, k = q.shape
    want = (n * k + 1) // 2
    got = qweight.numel() * qweight.element_size()
    if got != want or not qweight.is_contiguous():
        raise ValueError(
            f"{fn}: expected qweight to hold the {want} packed bytes of a 4-bit "
            f"[{n}, {k}] weight (contiguous), got {fmt_shape(qweight.shape)} {qweight.dtype} "
            f"({got} bytes{'' if qweight.is_contiguous() else ', not contiguous'}); "
            "does quant_state belong to this weight?"
        )
    check_device(fn, "qweight", qweight, device)
    for name, t in (
        ("quant_state.absmax", q.absmax),
        ("quant_state.code", q.code),
        ("quant_state.state2.absmax", q.absmax2),
        ("quant_state.state2.code", q.code2),
        ("quant_state.offset", q.offset),
    ):
        if t is not None:
            check_device(fn, name, t, device)


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


def _resolve(backend: str, x: torch.Tensor, rank: int) -> str:
    # There is no CUDA C++ kernel for this family: "cuda" runs the Triton kernels.
    resolved = resolve_backend(backend, x, rank)
    return "triton" if resolved == "cuda" else resolved


def dequantize_4bit(
    qweight: torch.Tensor, quant_state: object, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``W [N, K]`` from bitsandbytes' packed 4-bit ``qweight`` and its ``quant_state``, in
    ``dtype`` (default: ``quant_state.dtype``, else float32). Computed in fp32 and rounded once:
    the values bitsandbytes' ``dequantize_4bit`` returns."""
    fn = "lora_kernels.dequantize_4bit"
    q = as_quant4bit(fn, quant_state)
    _check_qweight(fn, qweight, q, qweight.device)
    if dtype is None:
        dtype = getattr(quant_state, "dtype", None) or torch.float32
    n, k = q.shape
    return launcher("torch", "dequantize_4bit")(*_flat_args(qweight, q), n, k, dtype)


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
    check_tensor(fn, "x", x)
    check_float(fn, "x", x)
    n, k = q.shape
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(
            f"{fn}: expected x of shape [..., {k}] (in_features of the 4-bit weight, "
            f"quant_state.shape = {fmt_shape(q.shape)}), got {fmt_shape(x.shape)}"
        )
    _check_qweight(fn, qweight, q, x.device)
    # The LoRA arguments are checked as the dense op checks them, against a stand-in weight of
    # the right shape, dtype and device (a stride-0 view: no memory).
    stand_in = x.new_empty((1, 1)).expand(n, k)
    scale = check_lora_linear_inputs(fn, x, stand_in, bias, lora_a, lora_b, scale, x_lora)
    resolved = _resolve(backend, x, lora_a.shape[0])
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    xl2 = None if x_lora is None else x_lora.reshape(-1, k)
    y = qlora_linear_2d(x2, *_flat_args(qweight, q), n, bias, lora_a, lora_b, scale, xl2, resolved)
    return y.reshape(*lead, n)
