"""Backends: which one computes a call, and the launcher that runs it.

Every backend is a folder (``torch/``, ``triton/``, ``cuda/``) with one module per kernel family
(``lora_linear``, ``lora_multi``, ``merge``, ``lora_embedding``, ``dora``, ``qlora``, ``moe``); the
modules of one family share the launcher signatures written down below as ``Protocol`` classes
(:data:`PROTOCOLS`). :data:`IMPLEMENTATIONS` is the one table of which module implements a family
on a backend, and :func:`launcher` the one place that picks a launcher: it records what it picked
(:func:`last_dispatch`) and logs each new pick once at DEBUG level (logger
``lora_kernels.backends``). Launchers trust their inputs: every check runs once, before dispatch,
in ``lora_kernels._checks`` (the C++ binding keeps its own checks for raw ``torch.ops`` calls). A
new kernel family is a module in each backend folder, its rows in :data:`IMPLEMENTATIONS`, a
protocol here and an op module in ``lora_kernels.ops`` built by ``define_family``.

``backend="auto"`` (:func:`resolve_backend`) picks, in order:

* ``LORA_KERNELS_BACKEND`` when set (``cuda``, ``triton``, ``torch`` or ``auto``);
* the torch path for CPU tensors (auto never picks the Triton interpreter, whatever
  ``TRITON_INTERPRET`` says: it is for tests, and orders of magnitude slower);
* Triton for CUDA tensors when Triton imports and the call is one it serves (fp16/bf16/fp32,
  rank <= 256); the torch path otherwise.

The CUDA C++ kernels are used only when asked for by name until a GPU has measured them faster
than Triton for a shape (see the README's backend table). They serve a subset of calls (decode
shapes, forward only, no DoRA, QLoRA or embedding kernels): :func:`serving_backend` says, per
launcher call, whether ``"cuda"`` runs it or hands it to Triton. A backend asked for by name that
cannot serve the call raises a ``ValueError`` that says why, before any kernel runs.
"""

from __future__ import annotations

import functools
import importlib
import logging
import threading
from collections.abc import Callable
from typing import NamedTuple, Protocol

# Not ``import torch``: importing the ``backends.torch`` subpackage rebinds the name ``torch`` in
# this package's namespace to that subpackage.
import torch as _torch
from torch import Tensor

from .. import envs
from .._constants import KERNEL_DTYPES, MAX_RANK
from .triton import HAS_TRITON, TRITON_PROBLEM, interpreting

BACKENDS = ("cuda", "triton", "torch")

logger = logging.getLogger(__name__)
_DEBUG = logging.DEBUG


# --------------------------------------------------------------------------------------------
# The launcher signatures of each kernel family (every backend module of a family follows them)
# --------------------------------------------------------------------------------------------


class LoraLinearLaunchers(Protocol):
    """``backends.<backend>.lora_linear``: ``y = x W^T + bias + scale (x_lora A^T) B^T``.

    ``lora_linear_fwd(x[M,K], weight[N,K], bias[N]?, lora_a[r,K], lora_b[N,r], scale,
    x_lora[M,K]?) -> (y[M,N], s[M,r] fp32)``;
    ``lora_linear_bwd(dy, x, weight, lora_a, lora_b, s, scale, x_lora?, *, needs_dx, needs_da,
    needs_db) -> (dx?, dx_lora?, da?, db?)`` (None where not needed).
    """

    def lora_linear_fwd(
        self,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        lora_a: Tensor,
        lora_b: Tensor,
        scale: float,
        x_lora: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]: ...

    def lora_linear_bwd(
        self,
        dy: Tensor,
        x: Tensor,
        weight: Tensor,
        lora_a: Tensor,
        lora_b: Tensor,
        s: Tensor,
        scale: float,
        x_lora: Tensor | None = None,
        *,
        needs_dx: bool = True,
        needs_da: bool = True,
        needs_db: bool = True,
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]: ...


class LoraMultiLaunchers(Protocol):
    """``backends.<backend>.lora_multi``: a different adapter per row (id -1: base only).

    ``lora_linear_multi_fwd(x[M,K], weight[N,K], bias[N]?, lora_a[L,R,K], lora_b[L,N,R],
    scales[L], row_ids[M], ranks[L]?) -> (y[M,N], s[M,R])``;
    ``lora_linear_multi_bwd(dy, x, weight, lora_a, lora_b, scales, row_ids, s, ranks?, *,
    needs_dx, needs_da, needs_db) -> (dx?, da?, db?)``.
    """

    def lora_linear_multi_fwd(
        self,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        lora_a: Tensor,
        lora_b: Tensor,
        scales: Tensor,
        row_ids: Tensor,
        ranks: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]: ...

    def lora_linear_multi_bwd(
        self,
        dy: Tensor,
        x: Tensor,
        weight: Tensor,
        lora_a: Tensor,
        lora_b: Tensor,
        scales: Tensor,
        row_ids: Tensor,
        s: Tensor,
        ranks: Tensor | None = None,
        *,
        needs_dx: bool = True,
        needs_da: bool = True,
        needs_db: bool = True,
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]: ...


class LoraEmbeddingLaunchers(Protocol):
    """``backends.<backend>.lora_embedding``: PEFT's ``lora.Embedding``, one adapter per row.

    ``lora_embedding_fwd(ids[M] int64, weight[V,D], lora_a[L,R,V], lora_b[L,D,R], scales (a
    ``[L]`` device tensor, read by device ops only, or L floats; one adapter: its float in a
    list), row_ids[M]? (None: adapter 0 everywhere; -1: base only), padding_idx (-1: none))
    -> (y[M,D] weight.dtype, s[M,R] fp32)`` with ``s = lora_a[a].T[ids]``;
    ``lora_embedding_bwd(dy, ids, weight, lora_a, lora_b, scales, row_ids?, s, padding_idx, *,
    needs_da, needs_db) -> (da[L,R,V]?, db[L,D,R]?)`` (rows with id ``padding_idx`` give A no
    gradient).
    """

    def lora_embedding_fwd(
        self,
        ids: Tensor,
        weight: Tensor,
        lora_a: Tensor,
        lora_b: Tensor,
        scales: Tensor | list[float],
        row_ids: Tensor | None = None,
        padding_idx: int = -1,
    ) -> tuple[Tensor, Tensor]: ...

    def lora_embedding_bwd(
        self,
        dy: Tensor,
        ids: Tensor,
        weight: Tensor,
        lora_a: Tensor,
        lora_b: Tensor,
        scales: Tensor | list[float],
        row_ids: Tensor | None,
        s: Tensor,
        padding_idx: int = -1,
        *,
        needs_da: bool = True,
        needs_db: bool = True,
    ) -> tuple[Tensor | None, Tensor | None]: ...


class MoeLoraLaunchers(Protocol):
    """``backends.<backend>.moe``: LoRA on both projections of a mixture-of-experts layer (see
    ``backends.torch.moe`` for the shapes and the formula).

    ``moe_lora_fwd(x[T,H], top_k_ids[T,k], top_k_weights[T,k], w_gu[E,2I,H], bias_gu[E,2I]?,
    a_gu[L,E,r,H]?, b_gu[L,E,2I,r]?, w_d[E,H,I], bias_d[E,H]?, a_d[L,E,r',I]?, b_d[L,E,H,r']?,
    scales[L], token_ids[T]?, activation, swiglu_alpha, swiglu_limit, keep_out) -> (y[T,H],
    g[Tk,2I], s_gu[Tk,r] fp32, s_d[Tk,r'] fp32, o[Tk,H] (empty unless keep_out))``, the saved
    tensors in the backend's own pair order;
    ``moe_lora_bwd(dy, x, top_k_ids, top_k_weights, w_gu, a_gu?, b_gu?, w_d, a_d?, b_d?, scales,
    token_ids?, g, s_gu, s_d, o, activation, swiglu_alpha, swiglu_limit, *, needs_dx, needs_dw,
    needs_lora_gu, needs_lora_d) -> (dx?, dw[T,k]?, da_gu?, db_gu?, da_d?, db_d?)``.
    """

    def moe_lora_fwd(
        self,
        x: Tensor,
        top_k_ids: Tensor,
        top_k_weights: Tensor,
        w_gu: Tensor,
        bias_gu: Tensor | None,
        a_gu: Tensor | None,
        b_gu: Tensor | None,
        w_d: Tensor,
        bias_d: Tensor | None,
        a_d: Tensor | None,
        b_d: Tensor | None,
        scales: Tensor,
        token_ids: Tensor | None = None,
        activation: str = "silu",
        swiglu_alpha: float = 1.702,
        swiglu_limit: float = 7.0,
        keep_out: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]: ...

    def moe_lora_bwd(
        self,
        dy: Tensor,
        x: Tensor,
        top_k_ids: Tensor,
        top_k_weights: Tensor,
        w_gu: Tensor,
        a_gu: Tensor | None,
        b_gu: Tensor | None,
        w_d: Tensor,
        a_d: Tensor | None,
        b_d: Tensor | None,
        scales: Tensor,
        token_ids: Tensor | None,
        g: Tensor,
        s_gu: Tensor,
        s_d: Tensor,
        o: Tensor,
        activation: str = "silu",
        swiglu_alpha: float = 1.702,
        swiglu_limit: float = 7.0,
        *,
        needs_dx: bool = True,
        needs_dw: bool = True,
        needs_lora_gu: bool = True,
        needs_lora_d: bool = True,
    ) -> tuple[Tensor | None, ...]: ...


class MergeLaunchers(Protocol):
    """``backends.<backend>.merge``: ``merge_(weight[N,K], lora_a[r,K], lora_b[N,r], scale)``,
    ``weight += scale * lora_b @ lora_a`` in place (fp32 sum, one rounding); returns weight."""

    def merge_(self, weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float) -> Tensor: ...


class DoraLaunchers(Protocol):
    """``backends.<backend>.dora``: PEFT's DoRA, ``y = g * lin + bias + (x - x_lora) W^T`` with
    ``lin = x_lora W^T + scale (x_lora A^T) B^T`` and ``g = magnitude / ||W + scale B A||_row``.

    ``weight_sq_norm(weight[N,K]) -> [N]`` (``||W_n||^2``); ``dora_weight_norm(weight, lora_a[r,K],
    lora_b[N,r], scale, w_sq[N]) -> [N]`` (the factored row norm); ``dora_linear_fwd(x[M,K],
    weight, bias?, lora_a, lora_b, scale, x_lora?, g[N]) -> (y[M,N], lin[M,N], s[M,r])``;
    ``dora_linear_bwd(dy, x, weight, lora_a, lora_b, s, lin, g, weight_norm, scale, x_lora?, *,
    needs_dx, needs_da, needs_db, needs_dm) -> (dx?, dx_lora?, da?, db?, dm?)``;
    ``dora_merge_(weight, lora_a, lora_b, scale, g)``: ``W = g (W + scale B A)`` in place and
    ``dora_unmerge_`` its inverse. Norms, ``g`` and ``dm`` are fp32 (fp64 for fp64 inputs).
    """

    def weight_sq_norm(self, weight: Tensor) -> Tensor: ...

    def dora_weight_norm(
        self, weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float, w_sq: Tensor
    ) -> Tensor: ...

    def dora_linear_fwd(
        self,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        lora_a: Tensor,
        lora_b: Tensor,
        scale: float,
        x_lora: Tensor | None,
        g: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]: ...

    def dora_linear_bwd(
        self,
        dy: Tensor,
        x: Tensor,
        weight: Tensor,
        lora_a: Tensor,
        lora_b: Tensor,
        s: Tensor,
        lin: Tensor,
        g: Tensor,
        weight_norm: Tensor,
        scale: float,
        x_lora: Tensor | None = None,
        *,
        needs_dx: bool = True,
        needs_da: bool = True,
        needs_db: bool = True,
        needs_dm: bool = True,
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None, Tensor | None]: ...

    def dora_merge_(
        self, weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float, g: Tensor
    ) -> Tensor: ...

    def dora_unmerge_(
        self, weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float, g: Tensor
    ) -> Tensor: ...


class QLoraLaunchers(Protocol):
    """``backends.<backend>.qlora``: ``y = x W^T + bias + scale (x_lora A^T) B^T`` with W the
    4-bit weight as bitsandbytes stores it (``qweight`` packed bytes, ``absmax``, ``code``, and
    for double quantization ``absmax2``, ``code2``, ``offset``; see ``ops/qlora.py``).

    ``qlora_linear_fwd(x[M,K], qweight, absmax, code, absmax2?, code2?, offset?, blocksize,
    blocksize2, n, bias[n]?, lora_a[r,K], lora_b[n,r], scale, x_lora?) -> (y[M,n], s[M,r] fp32)``;
    ``qlora_linear_bwd(dy, x, qweight, absmax, code, absmax2?, code2?, offset?, blocksize,
    blocksize2, lora_a, lora_b, s, scale, x_lora?, *, needs_dx, needs_da, needs_db) -> (dx?,
    dx_lora?, da?, db?)``. The torch module also holds ``dequantize_4bit`` (``lk.dequantize_4bit``).
    """

    def qlora_linear_fwd(
        self,
        x: Tensor,
        qweight: Tensor,
        absmax: Tensor,
        code: Tensor,
        absmax2: Tensor | None,
        code2: Tensor | None,
        offset: Tensor | None,
        blocksize: int,
        blocksize2: int,
        n: int,
        bias: Tensor | None,
        lora_a: Tensor,
        lora_b: Tensor,
        scale: float,
        x_lora: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]: ...

    def qlora_linear_bwd(
        self,
        dy: Tensor,
        x: Tensor,
        qweight: Tensor,
        absmax: Tensor,
        code: Tensor,
        absmax2: Tensor | None,
        code2: Tensor | None,
        offset: Tensor | None,
        blocksize: int,
        blocksize2: int,
        lora_a: Tensor,
        lora_b: Tensor,
        s: Tensor,
        scale: float,
        x_lora: Tensor | None = None,
        *,
        needs_dx: bool = True,
        needs_da: bool = True,
        needs_db: bool = True,
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]: ...


# The launcher protocol of every kernel family.
class LoraDeltaLaunchers(Protocol):
    """``backends.<backend>.lora_delta``: the LoRA term alone, into outputs a serving engine's
    own base GEMM wrote (in place, inference only).

    ``lora_shrink_(out[M,R], x[M,K], lora_a[L,R,K], row_ids[M], scales[L], ranks[L]?)``:
    ``out[i, :r_a] = scales[a] x[i] lora_a[a, :r_a]^T``, zeros elsewhere;
    ``lora_expand_(y[M,N], s[M,R], lora_b[L,N,R], row_ids[M], ranks[L]?, add_inputs)``:
    ``y[i] += s[i, :r_a] lora_b[a, :, :r_a]^T`` (``=`` without add_inputs) for rows with an
    adapter, other rows untouched.
    """

    def lora_shrink_(
        self,
        out: Tensor,
        x: Tensor,
        lora_a: Tensor,
        row_ids: Tensor,
        scales: Tensor,
        ranks: Tensor | None = None,
    ) -> Tensor: ...

    def lora_expand_(
        self,
        y: Tensor,
        s: Tensor,
        lora_b: Tensor,
        row_ids: Tensor,
        ranks: Tensor | None = None,
        add_inputs: bool = True,
    ) -> Tensor: ...


PROTOCOLS: dict[str, type] = {
    "lora_linear": LoraLinearLaunchers,
    "lora_multi": LoraMultiLaunchers,
    "merge": MergeLaunchers,
    "lora_embedding": LoraEmbeddingLaunchers,
    "dora": DoraLaunchers,
    "qlora": QLoraLaunchers,
    "moe": MoeLoraLaunchers,
    "lora_delta": LoraDeltaLaunchers,
}

FAMILIES = tuple(PROTOCOLS)

# (family, backend) -> the module that implements the family's protocol on that backend, imported
# on first use (a Triton module needs Triton). A pair not listed has no implementation: the CUDA
# extension has no DoRA, QLoRA or embedding kernels, and calls resolved to "cuda" for those
# families run on Triton (:func:`serving_backend`).
IMPLEMENTATIONS: dict[tuple[str, str], str] = {
    ("lora_linear", "torch"): "lora_kernels.backends.torch.lora_linear",
    ("lora_linear", "triton"): "lora_kernels.backends.triton.lora_linear",
    ("lora_linear", "cuda"): "lora_kernels.backends.cuda.lora_linear",
    ("lora_multi", "torch"): "lora_kernels.backends.torch.lora_multi",
    ("lora_multi", "triton"): "lora_kernels.backends.triton.lora_multi",
    ("lora_multi", "cuda"): "lora_kernels.backends.cuda.lora_multi",
    ("merge", "torch"): "lora_kernels.backends.torch.merge",
    ("merge", "triton"): "lora_kernels.backends.triton.merge",
    ("merge", "cuda"): "lora_kernels.backends.cuda.merge",
    ("lora_embedding", "torch"): "lora_kernels.backends.torch.lora_embedding",
    ("lora_embedding", "triton"): "lora_kernels.backends.triton.lora_embedding",
    ("dora", "torch"): "lora_kernels.backends.torch.dora",
    ("dora", "triton"): "lora_kernels.backends.triton.dora",
    ("qlora", "torch"): "lora_kernels.backends.torch.qlora",
    ("qlora", "triton"): "lora_kernels.backends.triton.qlora",
    ("moe", "torch"): "lora_kernels.backends.torch.moe",
    ("moe", "triton"): "lora_kernels.backends.triton.moe",
    ("lora_delta", "torch"): "lora_kernels.backends.torch.lora_delta",
    ("lora_delta", "triton"): "lora_kernels.backends.triton.lora_delta",
}


# --------------------------------------------------------------------------------------------
# Which backends run here, and which one runs a call
# --------------------------------------------------------------------------------------------


def _cuda_extension_loaded() -> bool:
    if not _torch.cuda.is_available():
        return False
    from .cuda import build

    return build.load_extension() is not None


def available_backends() -> list[str]:
    """The backends that can run on this machine, a subset of ``["cuda", "triton", "torch"]``.

    ``"triton"`` needs Triton and either a CUDA device or the interpreter (``TRITON_INTERPRET=1``);
    ``"cuda"`` needs a CUDA device and the compiled extension (ahead of time or just in time).
    """
    found = []
    if _cuda_extension_loaded():
        found.append("cuda")
    if HAS_TRITON and (_torch.cuda.is_available() or interpreting()):
        found.append("triton")
    found.append("torch")
    return found


def _why_triton_cannot(x: Tensor, rank: int, operands: tuple[Tensor, ...] = ()) -> str | None:
    if not HAS_TRITON:
        return TRITON_PROBLEM
    if x.device.type == "cpu" and not interpreting():
        return (
            "the triton backend runs CUDA tensors; CPU tensors need TRITON_INTERPRET=1 set "
            "before triton is imported"
        )
    if x.device.type not in ("cpu", "cuda"):
        return f"the triton backend runs CUDA tensors, got x on {x.device}"
    if x.dtype not in KERNEL_DTYPES:
        return f"the triton backend takes float16, bfloat16 or float32, got x of dtype {x.dtype}"
    for t in operands:
        if t.dtype not in KERNEL_DTYPES:
            return f"the triton backend takes float16, bfloat16 or float32 operands, got {t.dtype}"
    if rank > MAX_RANK:
        return f"the triton backend takes ranks up to {MAX_RANK}, got rank {rank}"
    return None


def _why_cuda_cannot(x: Tensor) -> str | None:
    if x.device.type != "cuda":
        return f"the cuda backend runs CUDA tensors, got x on {x.device}"
    if not _cuda_extension_loaded():
        from .cuda import build

        return f"the CUDA extension is not available ({build.extension_status()})"
    return None


def resolve_backend(backend: str, x: Tensor, rank: int, *operands: Tensor) -> str:
    """Turn ``backend`` (or ``"auto"``) into the backend that will run, or raise ``ValueError``.

    ``x`` decides the device and dtype; ``operands`` are further tensors whose dtypes a kernel
    backend must take as well (merge's adapter factors, which may differ from the weight's)."""
    if not isinstance(backend, str) or backend not in (*BACKENDS, "auto"):
        raise ValueError(
            f"backend must be one of 'auto', 'cuda', 'triton', 'torch', got {backend!r}"
        )
    if backend == "auto":
        backend = envs.backend()
    if backend == "auto":
        if x.device.type == "cuda" and _why_triton_cannot(x, rank, operands) is None:
            return "triton"
        return "torch"
    if backend == "triton":
        why = _why_triton_cannot(x, rank, operands)
        if why is not None:
            raise ValueError(f"backend='triton' cannot run this call: {why}")
    elif backend == "cuda":
        why = _why_cuda_cannot(x) or _why_triton_cannot(x, rank, operands)
        if why is not None:
            raise ValueError(f"backend='cuda' cannot run this call: {why}")
    return backend


# --------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------


class Dispatch(NamedTuple):
    """One pick of :func:`launcher`: launcher ``launcher`` of ``family`` ran on ``backend``;
    ``requested`` is the backend the op was called with (``"cuda"`` hands the calls it does not
    serve to ``"triton"``)."""

    family: str
    launcher: str
    backend: str
    requested: str


_LAST = threading.local()
_LOGGED: set[tuple[str, str, str, str]] = set()


def last_dispatch() -> Dispatch | None:
    """The last launcher :func:`launcher` picked in this thread (``lora_kernels.last_dispatch``),
    or None before the first. Under ``torch.compile`` the ops run their launchers when the graph
    runs, so it names those too; the backward of CUDA tensors runs in autograd's own device
    threads, and is recorded there."""
    picked = getattr(_LAST, "dispatch", None)
    return None if picked is None else Dispatch(*picked)


def _log_once(picked: tuple[str, str, str, str]) -> None:
    if picked in _LOGGED:
        return
    _LOGGED.add(picked)
    family, name, backend, requested = picked
    where = IMPLEMENTATIONS[(family, backend)]
    if backend == requested:
        logger.debug("%s.%s runs on %s (%s)", family, name, backend, where)
    else:
        why = _cuda_handover_reason(family, name)
        logger.debug(
            "%s.%s asked of %s runs on %s (%s): %s", family, name, requested, backend, where, why
        )


@functools.cache
def backend_module(backend: str, family: str):
    """The module of ``family``'s launchers on ``backend`` (:data:`IMPLEMENTATIONS`), imported on
    first use; ``LookupError`` where that backend has none."""
    path = IMPLEMENTATIONS.get((family, backend))
    if path is None:
        raise LookupError(
            f"no {backend} implementation of the {family} kernel family "
            "(lora_kernels.backends.IMPLEMENTATIONS)"
        )
    return importlib.import_module(path)


def _cuda_handover_reason(family: str, name: str) -> str:
    if (family, "cuda") not in IMPLEMENTATIONS:
        return f"the CUDA extension has no {family} kernels"
    if getattr(backend_module("cuda", family), name, None) is None:
        return f"the CUDA extension has no {name} launcher"
    return f"supports_{name} declined the call (see lora_kernels.backends.cuda)"


def serving_backend(backend: str, family: str, name: str, *args, **kwargs) -> str:
    """The backend that runs launcher ``name`` of ``family`` on these arguments.

    ``"cuda"`` serves only the families it has a module for in :data:`IMPLEMENTATIONS`, the calls
    that module has a launcher for (no backward) and whose ``supports_<name>(*args)`` says yes
    (decode shapes, aligned rows, see ``backends.cuda``); every other call resolved to ``"cuda"``
    runs on Triton. Other backends serve every call.
    """
    if backend != "cuda":
        return backend
    if (family, "cuda") not in IMPLEMENTATIONS:
        return "triton"
    mod = backend_module("cuda", family)
    fn = getattr(mod, name, None)
    supports = getattr(mod, f"supports_{name}", None)
    if fn is not None and (supports is None or supports(*args, **kwargs)):
        return "cuda"
    return "triton"


def launcher(backend: str, family: str, name: str, *args, **kwargs) -> Callable:
    """The launcher ``name`` of ``family`` that runs ``args`` on ``backend`` (see
    :func:`serving_backend` for the CUDA-to-Triton hand-over): the one place that picks a
    launcher. The pick is kept for :func:`last_dispatch`, and each distinct pick is logged once
    at DEBUG level (logger ``lora_kernels.backends``) while that level is enabled."""
    requested = backend
    if backend == "cuda":
        backend = serving_backend(backend, family, name, *args, **kwargs)
    fn = getattr(backend_module(backend, family), name)
    # A plain tuple: every kernel call passes here, a Dispatch is built only when asked for.
    _LAST.dispatch = picked = (family, name, backend, requested)
    if logger.isEnabledFor(_DEBUG):
        _log_once(picked)
    return fn
