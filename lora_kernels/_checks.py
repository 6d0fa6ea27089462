"""Every input check, run once before dispatch: the functional API, the layers and the checkpoint
code call these; the backends' launchers trust what passed them.

Every message names the function, the argument, and the expected and actual shape, dtype or
device, so a user can fix the call without reading our source. All checks run before any kernel
launch or weight update.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ._constants import KERNEL_DTYPES

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

_SCALES_CACHE_SIZE = 64
_scales_cache: dict[tuple, torch.Tensor] = {}


def reads_values(device: torch.device) -> bool:
    """Whether a check may read tensor values on the host: on CPU in eager mode only (on CUDA a
    read synchronises with the device; under ``torch.compile`` it breaks the graph). The
    kernels treat out-of-range ids as "no adapter", so skipping the read is safe."""
    return device.type == "cpu" and not torch.compiler.is_compiling()


def _scales_tensor(values: list[float], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``values`` as a ``[L]`` tensor on ``device``, made once per distinct list (a few recent
    ones kept): a list of scales copied to the device on every call would be a blocking copy in
    every decode step, and one a CUDA graph cannot capture. Under ``torch.compile`` the tensor
    is a constant of the graph: made there, never looked up."""
    if torch.compiler.is_compiling():
        return torch.tensor(values, dtype=dtype, device=device)
    key = (tuple(values), dtype, device, torch.is_inference_mode_enabled())
    t = _scales_cache.pop(key, None)
    if t is None:
        t = torch.tensor(values, dtype=dtype, device=device)
        while len(_scales_cache) >= _SCALES_CACHE_SIZE:
            _scales_cache.pop(next(iter(_scales_cache)))
    _scales_cache[key] = t  # most recent last
    return t


def fmt_shape(shape: Sequence[int | str]) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def check_tensor(fn: str, name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: expected {name} to be a torch.Tensor, got {type(t).__name__}")
    return t


def check_shape(fn: str, name: str, t: torch.Tensor, expected: Sequence[int | str]) -> None:
    """``expected`` may hold ints or descriptive strings (e.g. "r") for free dimensions."""
    ok = t.dim() == len(expected) and all(
        not isinstance(e, int) or s == e for s, e in zip(t.shape, expected, strict=False)
    )
    if not ok:
        raise ValueError(
            f"{fn}: expected {name} of shape {fmt_shape(expected)}, got {fmt_shape(t.shape)}"
        )


def check_float(fn: str, name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{fn}: expected {name} of a floating dtype (float16, bfloat16, float32, float64), "
            f"got {t.dtype}"
        )


def check_dtype(fn: str, name: str, t: torch.Tensor, allowed: Sequence[torch.dtype]) -> None:
    if t.dtype not in allowed:
        want = " or ".join(str(d) for d in dict.fromkeys(allowed))
        raise TypeError(f"{fn}: expected {name} of dtype {want}, got {t.dtype}")


def check_device(fn: str, name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{fn}: expected {name} on device {device} (where x is), got {t.device}")


def check_scale(fn: str, name: str, scale: object) -> float:
    if isinstance(scale, torch.Tensor) and scale.numel() == 1:
        scale = scale.item()
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{fn}: expected {name} to be a float, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"{fn}: expected a finite {name}, got {scale}")
    return float(scale)


def check_base_inputs(
    fn: str,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    x_shape: str = "[..., K]",
) -> tuple[int, int]:
    """Validate ``x [..., K]``, ``weight [N, K]`` and ``bias [N] | None``; returns ``(K, N)``."""
    check_tensor(fn, "x", x)
    check_tensor(fn, "weight", weight)
    check_float(fn, "x", x)
    if x.dim() < 1:
        raise ValueError(f"{fn}: expected x of shape {x_shape}, got a 0-dim tensor")
    k = x.shape[-1]
    if weight.dim() != 2:
        raise ValueError(f"{fn}: expected weight of shape [N, {k}], got {fmt_shape(weight.shape)}")
    n = weight.shape[0]
    check_shape(fn, "weight", weight, [n, k])
    check_dtype(fn, "weight", weight, [x.dtype])
    check_device(fn, "weight", weight, x.device)
    if bias is not None:
        check_tensor(fn, "bias", bias)
        check_shape(fn, "bias", bias, [n])
        check_dtype(fn, "bias", bias, [x.dtype])
        check_device(fn, "bias", bias, x.device)
    return k, n


def _well_formed(x, weight, bias, lora_a, lora_b, scale, x_lora) -> bool:
    """The common, valid call in a few comparisons; anything else goes through the checks that
    name the offending argument (they are the spec; this only skips them when all is well)."""
    try:
        k = x.shape[-1]
        n, r = lora_b.shape
        dev, dt = x.device, x.dtype
        return (
            dt in FLOAT_DTYPES
            and weight.shape == (n, k)
            and lora_a.shape == (r, k)
            and r >= 1
            and weight.dtype == dt
            and lora_a.dtype in (dt, torch.float32)
            and lora_b.dtype == lora_a.dtype
            and weight.device == dev
            and lora_a.device == dev
            and lora_b.device == dev
            and (bias is None or (bias.shape == (n,) and bias.dtype == dt and bias.device == dev))
            and x_lora is None
            and type(scale) is float
            and math.isfinite(scale)
            and isinstance(x, torch.Tensor)
            and isinstance(weight, torch.Tensor)
            and isinstance(lora_a, torch.Tensor)
            and isinstance(lora_b, torch.Tensor)
            and (bias is None or isinstance(bias, torch.Tensor))
        )
    except (AttributeError, TypeError, ValueError, IndexError):
        return False


def check_lora_linear_inputs(
    fn: str,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: object,
    x_lora: torch.Tensor | None = None,
) -> float:
    """Validate the single-adapter inputs; returns ``scale`` as a Python float."""
    if _well_formed(x, weight, bias, lora_a, lora_b, scale, x_lora):
        return float(scale)
    k, n = check_base_inputs(fn, x, weight, bias)
    check_tensor(fn, "lora_a", lora_a)
    check_tensor(fn, "lora_b", lora_b)
    if lora_a.dim() != 2 or lora_a.shape[0] < 1:
        raise ValueError(
            f"{fn}: expected lora_a of shape [r, {k}] with r >= 1, got {fmt_shape(lora_a.shape)}"
        )
    r = lora_a.shape[0]
    check_shape(fn, "lora_a", lora_a, [r, k])
    check_shape(fn, "lora_b", lora_b, [n, r])
    check_dtype(fn, "lora_a", lora_a, [x.dtype, torch.float32])
    check_dtype(fn, "lora_b", lora_b, [lora_a.dtype])
    check_device(fn, "lora_a", lora_a, x.device)
    check_device(fn, "lora_b", lora_b, x.device)
    if x_lora is not None:
        check_tensor(fn, "x_lora", x_lora)
        check_shape(fn, "x_lora", x_lora, list(x.shape))
        check_dtype(fn, "x_lora", x_lora, [x.dtype])
        check_device(fn, "x_lora", x_lora, x.device)
    return check_scale(fn, "scale", scale)


def check_lora_multi_inputs(fn, x, weight, bias, lora_a, lora_b, scales, adapter_ids, ranks):
    """Validate the multi-adapter inputs; returns ``(scales, ranks)`` as the op takes them.

    Values (ids and ranks in range, finite scales) are checked on CPU tensors in eager mode only:
    on CUDA that would synchronise with the host, and under ``torch.compile`` it would break the
    graph (the kernels treat an id outside ``[0, L)`` as -1 and never read out of bounds).
    """
    if isinstance(x, torch.Tensor) and x.dim() not in (2, 3):
        raise ValueError(f"{fn}: expected x of shape [M, K] or [B, T, K], got {fmt_shape(x.shape)}")
    k, n = check_base_inputs(fn, x, weight, bias, "[M, K] or [B, T, K]")
    check_tensor(fn, "lora_a", lora_a)
    check_tensor(fn, "lora_b", lora_b)
    if lora_a.dim() != 3 or lora_a.shape[0] < 1 or lora_a.shape[1] < 1:
        raise ValueError(
            f"{fn}: expected lora_a of shape [L, r_max, {k}] with L >= 1 and r_max >= 1, "
            f"got {fmt_shape(lora_a.shape)}"
        )
    num_adapters, r_max = lora_a.shape[:2]
    check_shape(fn, "lora_a", lora_a, [num_adapters, r_max, k])
    check_shape(fn, "lora_b", lora_b, [num_adapters, n, r_max])
    check_dtype(fn, "lora_a", lora_a, [x.dtype, torch.float32])
    check_dtype(fn, "lora_b", lora_b, [lora_a.dtype])
    check_device(fn, "lora_a", lora_a, x.device)
    check_device(fn, "lora_b", lora_b, x.device)
    check_values = reads_values(x.device)

    scale_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if isinstance(scales, torch.Tensor):
        if not scales.is_floating_point():
            raise TypeError(f"{fn}: expected scales of a floating dtype, got {scales.dtype}")
        check_device(fn, "scales", scales, x.device)
        scales = scales.detach()
    elif isinstance(scales, (list, tuple)):
        values = [check_scale(fn, f"scales[{i}]", v) for i, v in enumerate(scales)]
        scales = _scales_tensor(values, scale_dtype, x.device)
    else:
        raise TypeError(
            f"{fn}: expected scales to be a tensor or a list of floats, got {type(scales).__name__}"
        )
    if scales.dim() != 1 or scales.shape[0] != num_adapters:
        raise ValueError(
            f"{fn}: expected scales of shape [{num_adapters}] (one per adapter of lora_a "
            f"{fmt_shape(lora_a.shape)}), got {fmt_shape(scales.shape)}"
        )
    if check_values and not torch.isfinite(scales).all():
        raise ValueError(f"{fn}: expected finite scales, got {scales.tolist()}")

    check_adapter_ids(
        fn,
        adapter_ids,
        x.shape[0],
        f"x {fmt_shape(x.shape)}",
        "row" if x.dim() == 2 else "sequence",
        num_adapters,
        f"-1: no adapter; {num_adapters} adapters in lora_a",
        x.device,
    )

    if ranks is not None:
        check_tensor(fn, "ranks", ranks)
        check_dtype(fn, "ranks", ranks, [torch.int32, torch.int64])
        check_shape(fn, "ranks", ranks, [num_adapters])
        check_device(fn, "ranks", ranks, x.device)
        if check_values and ((ranks < 0) | (ranks > r_max)).any():
            raise ValueError(f"{fn}: expected ranks in [0, {r_max}], got {ranks.tolist()}")
        ranks = ranks.to(torch.int32)
    return scales.to(scale_dtype), ranks


def check_merge_inputs(fn: str, weight, lora_a, lora_b, scale) -> float:
    """Validate ``weight [N, K]``, ``lora_a [r, K]``, ``lora_b [N, r]``; returns ``scale``."""
    check_tensor(fn, "weight", weight)
    check_tensor(fn, "lora_a", lora_a)
    check_tensor(fn, "lora_b", lora_b)
    if weight.dim() != 2:
        raise ValueError(f"{fn}: expected weight of shape [N, K], got {list(weight.shape)}")
    n, k = weight.shape
    if lora_a.dim() != 2 or lora_a.shape[0] < 1:
        raise ValueError(f"{fn}: expected lora_a of shape [r, {k}], got {list(lora_a.shape)}")
    r = lora_a.shape[0]
    check_shape(fn, "lora_a", lora_a, [r, k])
    check_shape(fn, "lora_b", lora_b, [n, r])
    for name, t in (("lora_a", lora_a), ("lora_b", lora_b)):
        if t.device != weight.device:
            raise ValueError(
                f"{fn}: expected {name} on device {weight.device} (where weight is), got {t.device}"
            )
        if not t.is_floating_point():
            raise TypeError(f"{fn}: expected {name} of a floating dtype, got {t.dtype}")
    if not weight.is_floating_point():
        raise TypeError(f"{fn}: expected weight of a floating dtype, got {weight.dtype}")
    return check_scale(fn, "scale", scale)


# --------------------------------------------------------------------------------------------
# DoRA: the magnitude and the cached norms, [N] vectors beside the LoRA inputs
# --------------------------------------------------------------------------------------------


def check_vector(fn: str, name: str, t, n: int, dtypes, device) -> None:
    """``t`` is a tensor of shape ``[n]``, one of ``dtypes``, on ``device``."""
    check_tensor(fn, name, t)
    check_shape(fn, name, t, [n])
    check_dtype(fn, name, t, dtypes)
    if t.device != device:
        raise ValueError(f"{fn}: expected {name} on device {device}, got {t.device}")


def norm_dtypes(weight: torch.Tensor) -> tuple[torch.dtype, ...]:
    """The dtype of DoRA's row norms of ``weight``: fp32, fp64 for an fp64 weight."""
    return (torch.float64,) if weight.dtype == torch.float64 else (torch.float32,)


def check_dora_weight(fn: str, weight) -> None:
    """``weight [N, K]`` of a floating dtype, the operand of ``weight_sq_norm``."""
    check_tensor(fn, "weight", weight)
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(
            f"{fn}: expected weight of shape [N, K] and a floating dtype, got "
            f"{list(weight.shape)} {weight.dtype}"
        )


def check_dora_norm_inputs(fn: str, weight, lora_a, lora_b, scale, weight_sq_norm) -> float:
    """``weight [N, K]``, ``lora_a [r, K]``, ``lora_b [N, r]`` and a cached ``weight_sq_norm [N]``
    (or None); returns ``scale``."""
    scale = check_merge_inputs(fn, weight, lora_a, lora_b, scale)
    if weight_sq_norm is not None:
        n = weight.shape[0]
        check_vector(fn, "weight_sq_norm", weight_sq_norm, n, norm_dtypes(weight), weight.device)
    return scale


def check_dora_linear_inputs(
    fn: str,
    x,
    weight,
    bias,
    lora_a,
    lora_b,
    magnitude,
    scale,
    x_lora=None,
    weight_sq_norm=None,
    weight_norm=None,
) -> float:
    """The LoRA linear's inputs plus ``magnitude [N]`` (x's dtype, float32 or lora_a's) and the
    cached norms ``[N]`` (fp32, fp64 for fp64; or None); returns ``scale``."""
    scale = check_lora_linear_inputs(fn, x, weight, bias, lora_a, lora_b, scale, x_lora)
    n = weight.shape[0]
    check_vector(fn, "magnitude", magnitude, n, (x.dtype, torch.float32, lora_a.dtype), x.device)
    for name, t in (("weight_sq_norm", weight_sq_norm), ("weight_norm", weight_norm)):
        if t is not None:
            check_vector(fn, name, t, n, norm_dtypes(weight), x.device)
    return scale


def check_dora_merge_inputs(
    fn: str, weight, lora_a, lora_b, magnitude, scale, weight_norm
) -> float:
    """The merge's inputs plus ``magnitude [N]`` and, to unmerge, the ``weight_norm [N]`` the merge
    returned (None to merge); returns ``scale``."""
    scale = check_merge_inputs(fn, weight, lora_a, lora_b, scale)
    n = weight.shape[0]
    allowed = (weight.dtype, torch.float32, lora_a.dtype)
    check_vector(fn, "magnitude", magnitude, n, allowed, weight.device)
    if weight_norm is not None:
        check_vector(fn, "weight_norm", weight_norm, n, norm_dtypes(weight), weight.device)
    return scale


# --------------------------------------------------------------------------------------------
# QLoRA: bitsandbytes' 4-bit storage (packed bytes + quant_state), read by attribute
# --------------------------------------------------------------------------------------------


def check_quant_state(fn: str, quant_state: object) -> None:
    """``quant_state`` reads as bitsandbytes' ``QuantState`` of a 2-D NF4/FP4 weight in the
    standard packing (its fields are checked by :func:`check_quant4bit` once gathered)."""
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


def check_quant4bit(fn: str, q) -> None:
    """The fields of a ``Quant4bit`` (``functional.qlora``): block sizes, table and block maxima
    of the sizes the weight's shape implies, dtypes as bitsandbytes stores them."""
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
    if q.absmax2 is not None:
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


def check_qweight(fn: str, qweight: object, q, device: torch.device) -> None:
    """``qweight`` holds the packed bytes of ``q``'s weight, contiguous, on ``device`` with every
    tensor of ``q``."""
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


def check_qlora_linear_inputs(fn: str, x, qweight, q, bias, lora_a, lora_b, scale, x_lora) -> float:
    """``x [..., K]`` for ``q``'s 4-bit weight ``[N, K]``, its packed bytes, and the LoRA inputs as
    the dense linear takes them; returns ``scale``."""
    check_tensor(fn, "x", x)
    check_float(fn, "x", x)
    n, k = q.shape
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(
            f"{fn}: expected x of shape [..., {k}] (in_features of the 4-bit weight, "
            f"quant_state.shape = {fmt_shape(q.shape)}), got {fmt_shape(x.shape)}"
        )
    check_qweight(fn, qweight, q, x.device)
    # The LoRA arguments are checked as the dense op checks them, against a stand-in weight of
    # the right shape, dtype and device (a stride-0 view: no memory).
    stand_in = x.new_empty((1, 1)).expand(n, k)
    return check_lora_linear_inputs(fn, x, stand_in, bias, lora_a, lora_b, scale, x_lora)


INDEX_DTYPES = (torch.int32, torch.int64)


def check_adapter_ids(
    fn: str,
    adapter_ids: object,
    rows: int,
    of: str,
    per: str,
    num_adapters: int,
    none_means: str,
    device: torch.device,
    where: str = " (where x is)",
) -> None:
    """A mixed batch's adapter ids: int32/int64, ``[rows]`` (one id per ``per`` of ``of``), on
    ``device``, and each in ``[-1, num_adapters)`` where the values may be read on the host
    (``reads_values``; the kernels treat an id out of range as -1)."""
    check_tensor(fn, "adapter_ids", adapter_ids)
    check_dtype(fn, "adapter_ids", adapter_ids, INDEX_DTYPES)
    if adapter_ids.dim() != 1 or adapter_ids.shape[0] != rows:
        raise ValueError(
            f"{fn}: expected adapter_ids of shape [{rows}] (one id per {per} of {of}), got "
            f"{fmt_shape(adapter_ids.shape)}"
        )
    if adapter_ids.device != device:
        raise ValueError(
            f"{fn}: expected adapter_ids on device {device}{where}, got {adapter_ids.device}"
        )
    if reads_values(device):
        bad = ((adapter_ids < -1) | (adapter_ids >= num_adapters)).nonzero().flatten()
        if bad.numel():
            shown = bad[:8].tolist()
            raise ValueError(
                f"{fn}: expected adapter_ids in [-1, {num_adapters}) ({none_means}), got "
                f"{adapter_ids[shown].tolist()} at {per}s {shown}"
            )


def _check_ids(fn: str, ids, num_embeddings: int, device) -> None:
    check_tensor(fn, "ids", ids)
    check_dtype(fn, "ids", ids, INDEX_DTYPES)
    if ids.device != device:
        raise ValueError(
            f"{fn}: expected ids on device {device} (where weight is), got {ids.device}"
        )
    _check_id_values(fn, ids, num_embeddings)


def _check_id_values(fn: str, ids, num_embeddings: int) -> None:
    """Ids in range, on CPU tensors in eager mode (on CUDA it would synchronise)."""
    if ids.numel() and reads_values(ids.device):
        low, high = torch.aminmax(ids)
        low, high = int(low), int(high)
        if low < 0 or high >= num_embeddings:
            raise ValueError(
                f"{fn}: expected ids in [0, {num_embeddings}) (weight has {num_embeddings} rows), "
                f"got values in [{low}, {high}]"
            )


def _check_padding_idx(fn: str, padding_idx, num_embeddings: int) -> int:
    """``nn.Embedding``'s rule: None, or an index in [-V, V) (negative counts from the end);
    returned as a row index, -1 meaning none."""
    if padding_idx is None:
        return -1
    if isinstance(padding_idx, bool) or not isinstance(padding_idx, int):
        raise TypeError(f"{fn}: expected padding_idx to be None or an int, got {padding_idx!r}")
    if not -num_embeddings <= padding_idx < num_embeddings:
        raise ValueError(
            f"{fn}: expected padding_idx in [-{num_embeddings}, {num_embeddings}), "
            f"got {padding_idx}"
        )
    return padding_idx % num_embeddings


def _check_embedding_table(fn: str, weight) -> tuple[int, int]:
    check_tensor(fn, "weight", weight)
    check_float(fn, "weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"{fn}: expected weight of shape [V, D], got {fmt_shape(weight.shape)}")
    return weight.shape[0], weight.shape[1]


def _embedding_well_formed(ids, weight, lora_a, lora_b, scale, padding_idx) -> bool:
    """The common, valid single-adapter embedding call in a few comparisons (the checks below
    are the spec; this only skips them when all is well, as ``_well_formed`` does for linear)."""
    try:
        v, d = weight.shape
        r = lora_a.shape[0]
        dev = weight.device
        return (
            type(scale) is float
            and math.isfinite(scale)
            and ids.dtype in INDEX_DTYPES
            and weight.dtype in FLOAT_DTYPES
            and lora_a.shape == (r, v)
            and lora_b.shape == (d, r)
            and r >= 1
            and lora_a.dtype in (weight.dtype, torch.float32)
            and lora_b.dtype == lora_a.dtype
            and ids.device == dev
            and lora_a.device == dev
            and lora_b.device == dev
            and (padding_idx is None or (type(padding_idx) is int and 0 <= padding_idx < v))
            and isinstance(ids, torch.Tensor)
            and isinstance(lora_a, torch.Tensor)
            and isinstance(lora_b, torch.Tensor)
        )
    except (AttributeError, TypeError, ValueError):
        return False


def check_lora_embedding_inputs(fn, ids, weight, lora_a, lora_b, scale, padding_idx):
    """Validate ``ids [...]``, ``weight [V, D]``, ``lora_a [r, V]`` (PEFT ``lora_embedding_A``),
    ``lora_b [D, r]`` (``lora_embedding_B``); returns ``(scale, padding_idx)`` (-1: none)."""
    if _embedding_well_formed(ids, weight, lora_a, lora_b, scale, padding_idx):
        _check_id_values(fn, ids, weight.shape[0])
        return scale, -1 if padding_idx is None else padding_idx
    v, d = _check_embedding_table(fn, weight)
    _check_ids(fn, ids, v, weight.device)
    check_tensor(fn, "lora_a", lora_a)
    check_tensor(fn, "lora_b", lora_b)
    if lora_a.dim() != 2 or lora_a.shape[0] < 1:
        raise ValueError(
            f"{fn}: expected lora_a of shape [r, {v}] with r >= 1, got {fmt_shape(lora_a.shape)}"
        )
    r = lora_a.shape[0]
    check_shape(fn, "lora_a", lora_a, [r, v])
    check_shape(fn, "lora_b", lora_b, [d, r])
    check_dtype(fn, "lora_a", lora_a, [weight.dtype, torch.float32])
    check_dtype(fn, "lora_b", lora_b, [lora_a.dtype])
    for name, t in (("lora_a", lora_a), ("lora_b", lora_b)):
        if t.device != weight.device:
            raise ValueError(
                f"{fn}: expected {name} on device {weight.device} (where weight is), got {t.device}"
            )
    return check_scale(fn, "scale", scale), _check_padding_idx(fn, padding_idx, v)


def _embedding_scales(fn, scales, num: int, weight) -> torch.Tensor:
    """The mixed embedding batch's ``scales`` as a ``[num]`` tensor on weight's device."""
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    if isinstance(scales, torch.Tensor):
        if scales.dim() != 1 or scales.shape[0] != num:
            raise ValueError(
                f"{fn}: expected scales to hold {num} floats (one per adapter), got a tensor of "
                f"shape {fmt_shape(scales.shape)}"
            )
        if scales.dtype == torch.bool or scales.is_complex():
            raise TypeError(f"{fn}: expected scales of a real dtype, got {scales.dtype}")
        scales = scales.detach()
        on_host = scales.device.type == "cpu"
        if scales.device != weight.device and not on_host:
            raise ValueError(
                f"{fn}: expected scales on device {weight.device} (where weight is), got "
                f"{scales.device}"
            )
        if on_host and (weight.device.type != "cpu" or reads_values(weight.device)):
            # a CPU tensor's values cost no synchronisation to read
            values = [check_scale(fn, f"scales[{i}]", v) for i, v in enumerate(scales.tolist())]
            if scales.device != weight.device:
                return _scales_tensor(values, dtype, weight.device)
        return scales.to(dtype)
    if not isinstance(scales, (list, tuple)) or len(scales) != num:
        raise ValueError(
            f"{fn}: expected scales to hold {num} floats (one per adapter), got {scales!r}"
        )
    values = [check_scale(fn, f"scales[{i}]", v) for i, v in enumerate(scales)]
    return _scales_tensor(values, dtype, weight.device)


def check_lora_embedding_multi_inputs(
    fn, ids, weight, lora_a, lora_b, scales, adapter_ids, padding_idx
):
    """Validate the multi-adapter embedding inputs: ``ids [M]`` with ``adapter_ids [M]`` or
    ``ids [B, T]`` with ``adapter_ids [B]``, ``lora_a [L, r_max, V]``, ``lora_b [L, D, r_max]``,
    ``scales`` (L floats: a list or a ``[L]`` tensor); returns ``(scales, padding_idx)`` with
    ``scales`` a ``[L]`` tensor on weight's device (fp32; fp64 for an fp64 table).

    A tensor on weight's device is used as it is (its values are checked where they may be read,
    ``reads_values``: a CUDA tensor is never read back, so a decode step does not synchronise); a
    CPU tensor for a table elsewhere, like a list, becomes a device tensor once per distinct list
    (``_scales_tensor``)."""
    v, d = _check_embedding_table(fn, weight)
    _check_ids(fn, ids, v, weight.device)
    if ids.dim() not in (1, 2):
        raise ValueError(f"{fn}: expected ids of shape [M] or [B, T], got {fmt_shape(ids.shape)}")
    check_tensor(fn, "lora_a", lora_a)
    check_tensor(fn, "lora_b", lora_b)
    if lora_a.dim() != 3 or lora_a.shape[0] < 1 or lora_a.shape[1] < 1:
        raise ValueError(
            f"{fn}: expected lora_a of shape [L, r_max, {v}] with L >= 1 and r_max >= 1, "
            f"got {fmt_shape(lora_a.shape)}"
        )
    num, r = lora_a.shape[:2]
    check_shape(fn, "lora_a", lora_a, [num, r, v])
    check_shape(fn, "lora_b", lora_b, [num, d, r])
    check_dtype(fn, "lora_a", lora_a, [weight.dtype, torch.float32])
    check_dtype(fn, "lora_b", lora_b, [lora_a.dtype])
    for name, t in (("lora_a", lora_a), ("lora_b", lora_b)):
        if t.device != weight.device:
            raise ValueError(
                f"{fn}: expected {name} on device {weight.device} (where weight is), got {t.device}"
            )
    scales = _embedding_scales(fn, scales, num, weight)
    check_adapter_ids(
        fn,
        adapter_ids,
        ids.shape[0],
        f"ids {fmt_shape(ids.shape)}",
        "row" if ids.dim() == 1 else "sequence",
        num,
        "-1: no adapter",
        weight.device,
        where="",
    )
    return scales, _check_padding_idx(fn, padding_idx, v)


MOE_ACTIVATIONS = ("silu", "swiglu_oai")


def _check_moe_factor_pair(fn, names, a, b, lead, num_experts, n_in, n_out, x):
    """``a [*lead, E, r, n_in]`` and ``b [*lead, E, n_out, r]`` (``lead`` is ``[]`` or ``[L]``);
    returns r. Both None: no LoRA on this projection."""
    name_a, name_b = names
    if a is None and b is None:
        return 0
    if (a is None) != (b is None):
        given, missing = (name_a, name_b) if b is None else (name_b, name_a)
        raise ValueError(f"{fn}: {given} was given without {missing}: pass both or neither")
    check_tensor(fn, name_a, a)
    check_tensor(fn, name_b, b)
    want_dims = len(lead) + 3
    if a.dim() != want_dims or a.shape[-2] < 1:
        raise ValueError(
            f"{fn}: expected {name_a} of shape {fmt_shape([*lead, num_experts, 'r', n_in])} with "
            f"r >= 1, got {fmt_shape(a.shape)}"
        )
    r = a.shape[-2]
    check_shape(fn, name_a, a, [*lead, num_experts, r, n_in])
    check_shape(fn, name_b, b, [*lead, num_experts, n_out, r])
    check_dtype(fn, name_a, a, [x.dtype, torch.float32])
    check_dtype(fn, name_b, b, [a.dtype])
    check_device(fn, name_a, a, x.device)
    check_device(fn, name_b, b, x.device)
    return r


def check_moe_lora_inputs(
    fn, x, top_k_ids, top_k_weights, w_gate_up, w_down, factors, scale, adapter_ids, biases,
    activation,
):  # fmt: skip
    """Validate a mixture-of-experts LoRA call (``w_gate_up [E, 2I, H]``, ``w_down [E, H, I]``
    already in the [out, in] orientation); returns ``(L, scales [L])``.

    ``factors`` is ``(lora_a_gate_up, lora_b_gate_up, lora_a_down, lora_b_down)``, each
    ``[E, ...]`` for one adapter or ``[L, E, ...]`` with ``adapter_ids [T]``. Adapter ids are
    checked on CPU tensors in eager mode only, as for ``lora_linear_multi``. Expert ids are not
    checked: one outside ``[0, E)`` contributes nothing (expert parallelism's sentinels).
    """
    check_tensor(fn, "x", x)
    check_float(fn, "x", x)
    if x.dim() != 2:
        raise ValueError(f"{fn}: expected x of shape [T, H], got {fmt_shape(x.shape)}")
    t, hidden = x.shape
    check_tensor(fn, "top_k_ids", top_k_ids)
    check_dtype(fn, "top_k_ids", top_k_ids, [torch.int32, torch.int64])
    if top_k_ids.dim() != 2 or top_k_ids.shape[0] != t or top_k_ids.shape[1] < 1:
        raise ValueError(
            f"{fn}: expected top_k_ids of shape [{t}, k] (k >= 1 experts per token of x "
            f"{fmt_shape(x.shape)}), got {fmt_shape(top_k_ids.shape)}"
        )
    k = top_k_ids.shape[1]
    check_device(fn, "top_k_ids", top_k_ids, x.device)
    check_tensor(fn, "top_k_weights", top_k_weights)
    check_float(fn, "top_k_weights", top_k_weights)
    check_shape(fn, "top_k_weights", top_k_weights, [t, k])
    check_device(fn, "top_k_weights", top_k_weights, x.device)
    check_tensor(fn, "w_gate_up", w_gate_up)
    check_tensor(fn, "w_down", w_down)
    if w_gate_up.dim() != 3 or w_gate_up.shape[2] != hidden or w_gate_up.shape[1] % 2:
        raise ValueError(
            f"{fn}: expected w_gate_up of shape [E, 2I, {hidden}] (gate and up stacked), got "
            f"{fmt_shape(w_gate_up.shape)}"
        )
    num_experts, n_gu, _ = w_gate_up.shape
    n_i = n_gu // 2
    check_shape(fn, "w_down", w_down, [num_experts, hidden, n_i])
    for name, w in (("w_gate_up", w_gate_up), ("w_down", w_down)):
        check_dtype(fn, name, w, [x.dtype])
        check_device(fn, name, w, x.device)
    for name, bias, n in (("bias_gate_up", biases[0], n_gu), ("bias_down", biases[1], hidden)):
        if bias is not None:
            check_tensor(fn, name, bias)
            check_shape(fn, name, bias, [num_experts, n])
            check_dtype(fn, name, bias, [x.dtype])
            check_device(fn, name, bias, x.device)
    if activation not in MOE_ACTIVATIONS:
        raise ValueError(f"{fn}: activation must be 'silu' or 'swiglu_oai', got {activation!r}")

    a_gu, b_gu, a_d, b_d = factors
    given = next((f for f in factors if f is not None), None)
    multi = adapter_ids is not None
    lead = ["L"] if multi else []
    if multi and isinstance(given, torch.Tensor) and given.dim() == 4:
        lead = [given.shape[0]]
    _check_moe_factor_pair(
        fn, ("lora_a_gate_up", "lora_b_gate_up"), a_gu, b_gu, lead, num_experts, hidden, n_gu, x
    )
    _check_moe_factor_pair(
        fn, ("lora_a_down", "lora_b_down"), a_d, b_d, lead, num_experts, n_i, hidden, x
    )
    num_adapters = lead[0] if multi and isinstance(lead[0], int) else 1
    check_values = reads_values(x.device)

    scale_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if isinstance(scale, torch.Tensor):
        if not scale.is_floating_point():
            raise TypeError(f"{fn}: expected scale of a floating dtype, got {scale.dtype}")
        check_device(fn, "scale", scale, x.device)
        scales = scale.detach().reshape(-1)
    elif isinstance(scale, (list, tuple)):
        vals = [check_scale(fn, f"scale[{i}]", v) for i, v in enumerate(scale)]
        scales = _scales_tensor(vals, scale_dtype, x.device)
    else:
        scales = _scales_tensor([check_scale(fn, "scale", scale)], scale_dtype, x.device)
    if scales.shape[0] != num_adapters:
        raise ValueError(
            f"{fn}: expected scale with {num_adapters} value(s) (one per adapter), got "
            f"{fmt_shape(scales.shape)}"
        )
    if check_values and not torch.isfinite(scales).all():
        raise ValueError(f"{fn}: expected finite scale, got {scales.tolist()}")

    if multi:
        check_adapter_ids(
            fn,
            adapter_ids,
            t,
            f"x {fmt_shape(x.shape)}",
            "token",
            num_adapters,
            "-1: base experts",
            x.device,
        )
    return num_adapters, scales.to(scale_dtype)


def _check_rows(fn: str, row_ids, m: int, device, ranks, num_adapters: int) -> None:
    """The ``row_ids [M]`` and ``ranks [L]`` of the ``lora_delta`` ops (an id outside ``[0, L)``
    means no adapter there, so ids are not read: checking them would synchronise on CUDA)."""
    check_tensor(fn, "row_ids", row_ids)
    check_dtype(fn, "row_ids", row_ids, [torch.int32, torch.int64])
    check_shape(fn, "row_ids", row_ids, [m])
    check_device(fn, "row_ids", row_ids, device)
    if ranks is not None:
        check_tensor(fn, "ranks", ranks)
        check_dtype(fn, "ranks", ranks, [torch.int32])
        check_shape(fn, "ranks", ranks, [num_adapters])
        check_device(fn, "ranks", ranks, device)


def check_lora_shrink_inputs(fn: str, out, x, lora_a, row_ids, scales, ranks) -> None:
    """``out [M, R]``, ``x [M, K]``, ``lora_a [L, R, K]``, ``scales [L]`` float32."""
    check_tensor(fn, "x", x)
    if x.dim() != 2:
        raise ValueError(f"{fn}: expected x of shape [M, K], got {fmt_shape(x.shape)}")
    m, k = x.shape
    check_tensor(fn, "lora_a", lora_a)
    if lora_a.dim() != 3:
        raise ValueError(
            f"{fn}: expected lora_a of shape [L, R, {k}], got {fmt_shape(lora_a.shape)}"
        )
    num_adapters, r = lora_a.shape[:2]
    check_shape(fn, "lora_a", lora_a, [num_adapters, r, k])
    check_tensor(fn, "out", out)
    check_shape(fn, "out", out, [m, r])
    check_dtype(fn, "x", x, KERNEL_DTYPES)
    check_dtype(fn, "lora_a", lora_a, KERNEL_DTYPES)
    check_dtype(fn, "out", out, FLOAT_DTYPES)
    check_tensor(fn, "scales", scales)
    check_dtype(fn, "scales", scales, [torch.float32])
    check_shape(fn, "scales", scales, [num_adapters])
    for name, t in (("lora_a", lora_a), ("out", out), ("scales", scales)):
        check_device(fn, name, t, x.device)
    _check_rows(fn, row_ids, m, x.device, ranks, num_adapters)


def check_lora_expand_inputs(fn: str, y, s, lora_b, row_ids, ranks) -> None:
    """``y [M, N]``, ``s [M, R]``, ``lora_b [L, N, R]``."""
    check_tensor(fn, "y", y)
    if y.dim() != 2:
        raise ValueError(f"{fn}: expected y of shape [M, N], got {fmt_shape(y.shape)}")
    m, n = y.shape
    check_tensor(fn, "lora_b", lora_b)
    if lora_b.dim() != 3:
        raise ValueError(
            f"{fn}: expected lora_b of shape [L, {n}, R], got {fmt_shape(lora_b.shape)}"
        )
    num_adapters, _, r = lora_b.shape
    check_shape(fn, "lora_b", lora_b, [num_adapters, n, r])
    check_tensor(fn, "s", s)
    check_shape(fn, "s", s, [m, r])
    check_dtype(fn, "y", y, KERNEL_DTYPES)
    check_dtype(fn, "lora_b", lora_b, KERNEL_DTYPES)
    check_dtype(fn, "s", s, [torch.float32, y.dtype])
    for name, t in (("lora_b", lora_b), ("s", s)):
        check_device(fn, name, t, y.device)
    _check_rows(fn, row_ids, m, y.device, ranks, num_adapters)


def check_vllm_fused_moe_lora_inputs(
    fn, y, x, lora_a_stacked, lora_b_stacked, topk_weights, per_pair_x, offset
) -> tuple[int, int]:
    """vLLM's fused-MoE LoRA call: ``y [M, k, N_out]``, ``topk_weights [M, k]``, ``x [M, K]``
    (``[M k, K]`` with ``per_pair_x``: w2's input is one row per (token, slot) pair), ``S``
    slices of ``lora_a [L, E, R, K]`` and ``lora_b [L, E, N, R']`` (``R' = R``, or the full rank
    of a fully-sharded shrink), the slices written at ``y[..., offset + s N : offset + (s+1) N]``.
    Returns ``(M, k)``. Ids and expert ids are not read (that would synchronise on CUDA)."""
    check_tensor(fn, "topk_weights", topk_weights)
    if topk_weights.dim() != 2:
        raise ValueError(
            f"{fn}: expected topk_weights of shape [M, top_k], got {fmt_shape(topk_weights.shape)}"
        )
    m, top_k = topk_weights.shape
    check_tensor(fn, "y", y)
    if y.dim() != 3 or tuple(y.shape[:2]) != (m, top_k):
        raise ValueError(f"{fn}: expected y of shape [{m}, {top_k}, N], got {fmt_shape(y.shape)}")
    check_tensor(fn, "x", x)
    rows = m * top_k if per_pair_x else m
    if x.dim() != 2 or x.shape[0] != rows:
        raise ValueError(
            f"{fn}: expected x of shape [{rows}, K] (one row per "
            f"{'(token, slot) pair' if per_pair_x else 'token'}), got {fmt_shape(x.shape)}"
        )
    if not lora_a_stacked or len(lora_a_stacked) != len(lora_b_stacked):
        raise ValueError(
            f"{fn}: expected as many lora_a ({len(lora_a_stacked)}) as lora_b "
            f"({len(lora_b_stacked)}) stacks, at least one"
        )
    check_dtype(fn, "y", y, KERNEL_DTYPES)
    check_dtype(fn, "x", x, KERNEL_DTYPES)
    for name, t in (("topk_weights", topk_weights), ("x", x)):
        check_device(fn, name, t, y.device)
    lead = None
    for s, (a, b) in enumerate(zip(lora_a_stacked, lora_b_stacked, strict=True)):
        for name, t in ((f"lora_a_stacked[{s}]", a), (f"lora_b_stacked[{s}]", b)):
            check_tensor(fn, name, t)
            if t.dim() != 4:
                raise ValueError(
                    f"{fn}: expected {name} of shape [max_loras, E, rows, cols], got "
                    f"{fmt_shape(t.shape)}"
                )
            check_dtype(fn, name, t, KERNEL_DTYPES)
            check_device(fn, name, t, y.device)
        lead = lead or [a.shape[0], a.shape[1]]
        check_shape(fn, f"lora_a_stacked[{s}]", a, [*lead, a.shape[2], x.shape[1]])
        check_shape(fn, f"lora_b_stacked[{s}]", b, [*lead, lora_b_stacked[0].shape[2], b.shape[3]])
    width = len(lora_b_stacked) * lora_b_stacked[0].shape[2]
    if offset < 0 or offset + width > y.shape[2]:
        raise ValueError(
            f"{fn}: the slices' {width} columns from offset {offset} do not fit y's {y.shape[2]}"
        )
    return m, top_k
