"""The op test templates, written once: every kernel family is checked by the same three tests.

* ``check_opcheck``: ``torch.library.opcheck`` on each of the family's ops (schema, fake impl,
  autograd registration, ``aot_dispatch``), with the arguments its entry point really passes;
* ``check_reference_parity``: the entry point's output and every gradient against
  ``lora_kernels.reference`` in float64, within ``tests/tolerances.py``'s rule (at most a small
  multiple of stock PyTorch's error in the same dtype);
* ``check_compile_fullgraph``: ``torch.compile(fullgraph=True)`` of a forward + backward step
  gives the eager output and gradients (no graph break anywhere in the family's path).

A family joins by one :class:`OpFamily` whose ``make(backend, dtype)`` builds a fresh
:class:`OpCase` on random inputs (odd sizes, never zeros); ``tests/test_op_families.py`` lists
them and parametrises the three templates over families x backends. A family's own test file
keeps what only it has (its layouts, padding rules, error messages).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from tests.tolerances import assert_close_to_ref

__all__ = [
    "OpCase",
    "OpFamily",
    "check_compile_fullgraph",
    "check_opcheck",
    "check_reference_parity",
]


@dataclass
class OpCase:
    """One family's call on fresh inputs.

    ``entry(*inputs)``: the public, differentiable entry point (its backend bound);
    ``reference(*inputs)``: the spec, called on float64 copies for the truth and on the inputs
    themselves for stock PyTorch's error; ``op_calls()``: ``(op, args)`` pairs for opcheck.
    Inputs that require grad are the ones whose gradients are checked."""

    entry: Callable[..., torch.Tensor]
    inputs: tuple
    reference: Callable[..., torch.Tensor]
    op_calls: Callable[[], list[tuple[object, tuple]]]
    names: tuple[str, ...]  # one per input, for messages


@dataclass(frozen=True)
class OpFamily:
    name: str
    make: Callable[[str, torch.dtype], OpCase]
    backends: tuple[str, ...]


def _to64(value):
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.detach().double().requires_grad_(value.requires_grad)
    return value


def _fresh(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone().requires_grad_(value.requires_grad)
    return value


def _grads(fn, inputs: tuple, dy: torch.Tensor) -> tuple[torch.Tensor, list]:
    leaves = [_fresh(v) for v in inputs]
    y = fn(*leaves)
    y.backward(dy.to(y.dtype))
    return y.detach(), [v.grad for v in leaves if isinstance(v, torch.Tensor) and v.requires_grad]


def check_opcheck(case: OpCase) -> None:
    calls = case.op_calls()
    assert calls, "a family has at least one op"
    for op, args in calls:
        torch.library.opcheck(op, args)


def check_reference_parity(case: OpCase) -> None:
    y = case.entry(*[_fresh(v) for v in case.inputs])
    dy = torch.randn(y.shape, dtype=torch.float64)
    got, got_grads = _grads(case.entry, case.inputs, dy)
    ref, ref_grads = _grads(case.reference, tuple(_to64(v) for v in case.inputs), dy)
    base, base_grads = _grads(case.reference, case.inputs, dy)
    assert_close_to_ref("y", got, ref, base)
    names = [
        n
        for n, v in zip(case.names, case.inputs, strict=True)
        if isinstance(v, torch.Tensor) and v.requires_grad
    ]
    assert len(got_grads) == len(ref_grads) == len(names)
    for name, g, r, b in zip(names, got_grads, ref_grads, base_grads, strict=True):
        assert g is not None, f"no gradient for {name}"
        assert_close_to_ref(f"d{name}", g, r, b)


def check_compile_fullgraph(case: OpCase) -> None:
    torch._dynamo.reset()  # each case's closure is new code to dynamo: no recompile budget spent
    dy = torch.randn(case.entry(*[_fresh(v) for v in case.inputs]).shape)
    compiled = torch.compile(case.entry, fullgraph=True, backend="aot_eager")
    got, got_grads = _grads(compiled, case.inputs, dy)
    want, want_grads = _grads(case.entry, case.inputs, dy)
    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w)
