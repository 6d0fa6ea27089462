"""Rounding as a GPU rounds, for kernels that also run under Triton's interpreter.

Triton 3.9's interpreter converts fp32 to bf16 by truncation, where a GPU rounds to nearest even;
the bias of truncation adds up in long sums (a DoRA magnitude gradient, say) and would make the
interpreter tests judge numerics a GPU never produces. These helpers round on the bits instead;
kernels call them only under a constexpr flag that is set when interpreting, so compiled kernels
keep the hardware conversion.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def round_to_bf16(x):
    """fp32 -> bf16, round to nearest even, done on the bits (NaN stays a quiet NaN)."""
    bits = x.to(tl.uint32, bitcast=True)
    # Adding 0x7FFF plus the lowest kept bit carries into the kept half exactly when the dropped
    # half is above one half, or equal to it with an odd kept half; a carry out of the mantissa
    # steps the exponent, and the largest finite values round up to inf, as they should.
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    quiet_nan = (bits >> 16) | 0x40
    kept = tl.where(x != x, quiet_nan, rounded)
    return kept.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def interpreted_round(x, DTYPE: tl.constexpr):
    """``x`` rounded to ``DTYPE`` to nearest even and widened to fp32: the operand of an
    interpreted dot (the interpreter's bf16 ``tl.dot`` is broken, so dots there run in fp32 on
    values rounded as a GPU rounds them)."""
    if DTYPE == tl.bfloat16:  # noqa: SIM300 - DTYPE is the constexpr parameter
        return round_to_bf16(x.to(tl.float32)).to(tl.float32)
    return x.to(DTYPE).to(tl.float32)
