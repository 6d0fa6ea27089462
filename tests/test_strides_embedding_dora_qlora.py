"""Every argument of the embedding, DoRA and QLoRA kernels read through its strides.

Each argument in turn is handed to the public function (``lk.lora_embedding``,
``lk.lora_embedding_multi``, ``lk.dora_linear``, ``lk.qlora_linear``) as a strided, transposed
(a column of a table for vectors), offset (``storage_offset``) or expanded view of the same
values; the Triton backend's output and gradients (with respect to the argument as passed) must
match the torch backend under the rule of ``tests/tolerances.py``: fp64 torch backend as the
reference, fp32 torch backend on contiguous inputs as the baseline. A kernel that reads a view as
if it were contiguous reads other values, far outside that bound.
"""

from __future__ import annotations

import pytest
import torch

import lora_kernels as lk
from lora_kernels.backends.triton import HAS_TRITON, interpreting
from lora_kernels.functional import Quant4bit
from tests.tolerances import assert_close_to_ref

pytestmark = pytest.mark.skipif(
    not (HAS_TRITON and interpreting()), reason="needs the Triton interpreter (CPU tensors)"
)

KINDS = ("strided", "transposed", "offset", "expanded")
SCALE = 0.75


def _layout(value: torch.Tensor, kind: str) -> torch.Tensor:
    """``value``'s values in the layout ``kind`` (a view into a bigger buffer, except for
    "contiguous"); for "expanded" ``value`` must be constant along its first dimension."""
    if kind == "contiguous":
        return value.clone()
    if kind == "expanded":
        return value[:1].clone().expand(value.shape)
    if kind == "offset":
        buf = torch.full((value.numel() + 5,), 7, dtype=value.dtype)
        buf[5:] = value.reshape(-1)
        return buf[5:].view(value.shape)
    if kind == "strided":
        buf = torch.full((*value.shape[:-1], 2 * value.shape[-1]), 7, dtype=value.dtype)
        buf[..., ::2] = value
        return buf[..., ::2]
    assert kind == "transposed"
    if value.dim() == 1:  # a column of a row-major table
        buf = torch.full((value.shape[0], 3), 7, dtype=value.dtype)
        buf[:, 1] = value
        return buf[:, 1]
    return value.transpose(-1, -2).contiguous().transpose(-1, -2)


def _run(call, base, grads, arg, kind, backend, dtype, dy):
    """``call(args)`` with ``arg`` laid out as ``kind``: the output and the gradient of every
    argument named in ``grads`` (with respect to the tensor as passed)."""
    args = {}
    for name, value in base.items():
        if isinstance(value, torch.Tensor):
            value = value.to(dtype) if value.is_floating_point() else value
            t = _layout(value, kind if name == arg else "contiguous")
            if name in grads:
                t.requires_grad_()
            value = t
        args[name] = value
    y = call(args, backend)
    y.backward(dy.to(y.dtype))
    return y, {name: args[name].grad for name in grads}


def _check(call, make, grads, arg, kind, dy_shape):
    base = make(arg if kind == "expanded" else None)
    dy = torch.randn(dy_shape, dtype=torch.float64)
    y, g = _run(call, base, grads, arg, kind, "triton", torch.float32, dy)
    y64, g64 = _run(call, base, grads, arg, kind, "torch", torch.float64, dy)
    y32, g32 = _run(call, base, grads, None, "contiguous", "torch", torch.float32, dy)
    assert_close_to_ref("y", y, y64, y32)
    for name in grads:
        assert g[name] is not None, f"no gradient for {name}"
        assert_close_to_ref(f"d{name}", g[name], g64[name], g32[name])


def _const_first_dim(values: dict, arg: str | None) -> dict:
    """The inputs, with ``arg`` made constant along its first dimension (so that it can be
    passed expanded)."""
    if arg is not None:
        v = values[arg]
        values[arg] = v[:1].expand_as(v).clone()
    return values


# ------------------------------------------------------------------------------------------------
# embedding
# ------------------------------------------------------------------------------------------------

V, D, R, M = 23, 19, 5, 11


def _embedding_inputs(arg):
    return _const_first_dim(
        {
            "ids": torch.randint(0, V, (M,)),
            "weight": torch.randn(V, D, dtype=torch.float64),
            "lora_a": torch.randn(R, V, dtype=torch.float64),
            "lora_b": torch.randn(D, R, dtype=torch.float64),
        },
        arg,
    )


def _embedding(args, backend):
    return lk.lora_embedding(
        args["ids"], args["weight"], args["lora_a"], args["lora_b"], SCALE, backend=backend
    )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arg", ["ids", "weight", "lora_a", "lora_b"])
def test_embedding_reads_every_argument_through_its_strides(arg, kind):
    grads = ("weight", "lora_a", "lora_b")
    _check(_embedding, _embedding_inputs, grads, arg, kind, (M, D))


def test_embedding_of_the_decode_slice():
    """``input_ids[:, -1:]``: one token per sequence, a [B, 1] view with row stride T."""
    ids = torch.randint(0, V, (M, 6))
    base = _embedding_inputs(None)
    out = {}
    for backend in ("triton", "torch"):
        w, a, b = (base[n].float() for n in ("weight", "lora_a", "lora_b"))
        out[backend] = lk.lora_embedding(ids[:, -1:], w, a, b, SCALE, backend=backend)
    ref = lk.lora_embedding(
        ids[:, -1:].contiguous(), *(base[n] for n in ("weight", "lora_a", "lora_b")), SCALE,
        backend="torch",
    )  # fmt: skip
    assert_close_to_ref("y", out["triton"], ref, out["torch"])


L = 3


def _multi_inputs(arg):
    return _const_first_dim(
        {
            "ids": torch.randint(0, V, (M,)),
            "weight": torch.randn(V, D, dtype=torch.float64),
            "lora_a": torch.randn(L, R, V, dtype=torch.float64),
            "lora_b": torch.randn(L, D, R, dtype=torch.float64),
            "scales": torch.tensor([0.5, -1.25, 2.0], dtype=torch.float64),
            "adapter_ids": torch.randint(-1, L, (M,), dtype=torch.int32),
        },
        arg,
    )


def _multi(args, backend):
    return lk.lora_embedding_multi(
        args["ids"], args["weight"], args["lora_a"], args["lora_b"], args["scales"],
        args["adapter_ids"], backend=backend,
    )  # fmt: skip


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arg", ["ids", "adapter_ids", "scales", "weight", "lora_a", "lora_b"])
def test_embedding_multi_reads_every_argument_through_its_strides(arg, kind):
    grads = ("weight", "lora_a", "lora_b")
    _check(_multi, _multi_inputs, grads, arg, kind, (M, D))


# ------------------------------------------------------------------------------------------------
# DoRA
# ------------------------------------------------------------------------------------------------

DM, DK, DN, DR = 5, 19, 13, 3


def _dora_inputs(arg):
    x = torch.randn(DM, DK, dtype=torch.float64)
    w = torch.randn(DN, DK, dtype=torch.float64) / DK**0.5
    values = {
        "x": x,
        "weight": w,
        "bias": torch.randn(DN, dtype=torch.float64),
        "lora_a": torch.randn(DR, DK, dtype=torch.float64) / DK**0.5,
        "lora_b": torch.randn(DN, DR, dtype=torch.float64) / DR**0.5,
        "magnitude": 1.0 + 0.3 * torch.rand(DN, dtype=torch.float64),
        "x_lora": x * (torch.rand_like(x) > 0.3),
    }
    values = _const_first_dim(values, arg if arg in values else None)
    if arg in ("weight_sq_norm", "weight_norm"):  # cached norms: the values the op computes
        wd = values["weight"]
        values["weight_sq_norm"] = (wd * wd).sum(1)
        if arg == "weight_norm":
            dense = wd + SCALE * values["lora_b"] @ values["lora_a"]
            values["weight_norm"] = torch.linalg.vector_norm(dense, dim=1)
    return values


def _dora(args, backend):
    return lk.dora_linear(
        args["x"], args["weight"], args["bias"], args["lora_a"], args["lora_b"],
        args["magnitude"], SCALE, x_lora=args.get("x_lora"),
        weight_sq_norm=args.get("weight_sq_norm"), weight_norm=args.get("weight_norm"),
        backend=backend,
    )  # fmt: skip


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "arg",
    ["x", "weight", "bias", "lora_a", "lora_b", "magnitude", "x_lora", "weight_sq_norm",
     "weight_norm"],
)  # fmt: skip
def test_dora_reads_every_argument_through_its_strides(arg, kind):
    if arg in ("weight_sq_norm", "weight_norm") and kind == "expanded":
        pytest.skip("a cached norm is the norm of these weights: not a constant vector")
    grads = ("x", "bias", "lora_a", "lora_b", "magnitude", "x_lora")
    _check(_dora, _dora_inputs, grads, arg, kind, (DM, DN))


# ------------------------------------------------------------------------------------------------
# QLoRA
# ------------------------------------------------------------------------------------------------

QM, QN, QK, QR, QBLOCK, QBLOCK2 = 5, 13, 40, 3, 32, 4


def _qlora_inputs(arg):
    # bitsandbytes' layout, built by hand (the op reads it as such): packed nibbles, NF4-like
    # code, absmax double-quantized through code2 and absmax2.
    blocks = -(-QN * QK // QBLOCK)
    values = {
        "x": torch.randn(QM, QK, dtype=torch.float64),
        "bias": torch.randn(QN, dtype=torch.float64),
        "lora_a": torch.randn(QR, QK, dtype=torch.float64) / QK**0.5,
        "lora_b": torch.randn(QN, QR, dtype=torch.float64) / QR**0.5,
        "x_lora": torch.randn(QM, QK, dtype=torch.float64),
        "qweight": torch.randint(0, 256, ((QN * QK + 1) // 2,), dtype=torch.uint8),
        "code": torch.linspace(-1, 1, 16, dtype=torch.float32),
        "absmax": torch.randint(0, 256, (blocks,), dtype=torch.uint8),
        "absmax2": torch.rand(-(-blocks // QBLOCK2), dtype=torch.float32) + 0.5,
        "code2": torch.linspace(-0.5, 0.5, 256, dtype=torch.float32),
        "offset": torch.tensor([0.25], dtype=torch.float32),
    }
    return _const_first_dim(
        values, arg if arg in ("x", "bias", "lora_a", "lora_b", "x_lora") else None
    )


_QUANT = ("qweight", "code", "absmax", "absmax2", "code2", "offset")


def _qlora(args, backend):
    q = Quant4bit(
        absmax=args["absmax"], code=args["code"].float(), blocksize=QBLOCK, shape=(QN, QK),
        absmax2=args["absmax2"].float(), code2=args["code2"].float(),
        offset=args["offset"].float(), blocksize2=QBLOCK2,
    )  # fmt: skip
    return lk.qlora_linear(
        args["x"], args["qweight"], q, args["bias"], args["lora_a"], args["lora_b"], SCALE,
        x_lora=args["x_lora"], backend=backend,
    )  # fmt: skip


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "arg", ["x", "bias", "lora_a", "lora_b", "x_lora", "code", "absmax", "absmax2", "code2"]
)
def test_qlora_reads_every_argument_through_its_strides(arg, kind):
    if arg in _QUANT and kind == "expanded":
        pytest.skip("the quantization state is not a constant vector")
    grads = ("x", "bias", "lora_a", "lora_b", "x_lora")
    _check(_qlora, _qlora_inputs, grads, arg, kind, (QM, QN))


def test_qlora_packed_weight_at_a_storage_offset():
    _check(_qlora, _qlora_inputs, ("x", "lora_a", "lora_b"), "qweight", "offset", (QM, QN))
