"""Memory traffic of Triton launches, counted under Triton's interpreter (``TRITON_INTERPRET=1``).

Decode-sized LoRA GEMMs are bound by memory bandwidth: their time is the bytes they move divided
by the bandwidth, so ``moved / compulsory`` decides their speed and can be measured without a
GPU. This module counts, for every launch run inside :func:`count`, what each ``tl.load``,
``tl.store`` and atomic moves:

* only the lanes a mask keeps (masked-off lanes move nothing on a GPU);
* in 32-byte sectors, the unit in which L2 serves an SM: per access instruction of one program,
  the number of distinct 32-byte sectors its active lanes touch (so a [16, 128] fp16 tile whose
  15 masked rows are off costs 8 sectors, a column of a row-major matrix one sector per element);
* also in raw bytes (active lanes x element size), which shows half-used sectors;
* attributed per operand: every address is mapped to the torch storage that holds it, named by
  the ``operands`` given to :meth:`Counter.report` (``x``, ``weight``, ``lora_a``, ...), or, for
  storages the caller did not name (temporaries a launcher allocates), by the kernel arguments
  that pointed at it (``tmp(_lora_skinny_kernel.out_ptr)``).

Re-reads count every time: a tile of ``lora_a`` loaded by each of 64 N-block programs is 64
loads, even though L2 may serve most of them; that is the point (decode streams the weight, so
any operand re-read per tile adds to the bytes that cross L2). Atomics count once per sector
(the read-modify-write happens in L2). Work done by torch inside a launcher (``torch.zeros``,
``sort``, ``copy_``) is not a Triton access and is not counted.

Compulsory bytes are what the op must move at least: each input read once, each output written
once (an in-place operand both); :func:`compulsory` builds them from tensors, and one helper per
kernel family (``compulsory_lora_linear``, ``compulsory_multi``, ``compulsory_qlora``,
``compulsory_embedding``, ``compulsory_dora``, ``compulsory_merge``) gives them for a call,
counting only what the call uses (the adapters present in a multi-adapter batch, the embedding
rows looked up). ``tools/traffic_cases.py`` builds each family's inputs at a shape and reports.

CUDA tile configs: the launchers pick small tiles under the interpreter and other tiles (and
split counts sized by the SM count) on CUDA. ``count(cuda_configs=True)`` (the default) makes
them pick the CUDA ones, without touching kernel code, by patching for the duration of the
block, in every loaded ``lora_kernels.backends.triton.*`` module:

* ``interpreting`` -> ``False`` (every launcher's interpreter-vs-CUDA switch; it also turns off
  the interpreter-only bf16 dot upcast, so bf16 results are wrong there, the traffic is not);
* ``_sm_count`` -> ``sms`` (132, an H100 SXM) and ``_target_programs`` (the skinny kernel's split
  target, two waves of SMs on CUDA, where it asks ``device.type``) -> ``2 * sms``;
* ``triton.autotune``: instead of timing, each autotuned launch takes the ``config``-th config
  left after the kernel's own pruning (0: the first, the choice the launchers make with
  ``LORA_KERNELS_TRITON_AUTOTUNE=0``; a GPU's timing may pick another, which ``config=i``
  counts).

A launcher stays visible to this switch when it decides interpreter-vs-CUDA tiles with the
``interpreting`` its module imports from ``lora_kernels.backends.triton`` and takes the SM count
from a module-level ``_sm_count(device_index)``; a test on ``device.type`` (CPU tensors here)
hides its CUDA branch, as ``_target_programs`` would without its patch.

Sampling: the interpreter runs programs one by one (a 4096 x 4096 QLoRA decode takes minutes,
a prefill GEMM hours), so ``count(sample=P)`` runs at most P programs of each launch: the first
and the last program of the grid, counted once each, and P - 2 programs evenly spaced between
them, each standing for ``(programs - 2) / (P - 2)`` programs. Exact where the interior programs
move the same bytes (every tile of a GEMM whose sizes divide by the tiles but the first, which
may store extra outputs such as S, and the last, which holds the ragged edge), an estimate where
addresses depend on data (4-bit codes, adapter ids). The outputs of a sampled launch are not
computed: use it for traffic only.

Usage::

    from tools import traffic

    with traffic.count() as t:          # TRITON_INTERPRET=1 set before triton was imported
        y, s = lora_linear_fwd(x, weight, bias, lora_a, lora_b, scale)
    rep = t.report(
        operands={"x": x, "weight": weight, "bias": bias, "lora_a": lora_a, "lora_b": lora_b,
                  "y": y, "s": s},
        compulsory=traffic.compulsory_lora_linear(x, weight, bias, lora_a, lora_b, y, s),
    )
    rep.ratio                    # moved sector bytes / compulsory bytes
    rep.operands["lora_a"].moved  # 32 * sectors touched for lora_a, over all launches
    print(rep.table())           # markdown, one row per operand
    rep.as_dict()                # JSON-ready
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import math
import pkgutil
import sys

import numpy as np
import torch

SECTOR = 32
H100_SMS = 132

# Counter columns, per (launch, storage).
_LOAD, _STORE, _ATOMIC = 0, 1, 2
_KINDS = ("load", "store", "atomic")

__all__ = [
    "SECTOR",
    "Counter",
    "Launch",
    "OperandTraffic",
    "Report",
    "compulsory",
    "compulsory_dora",
    "compulsory_embedding",
    "compulsory_lora_linear",
    "compulsory_merge",
    "compulsory_multi",
    "compulsory_qlora",
    "count",
    "cuda_configs",
    "distinct_bytes",
]


def _interpreter():
    from triton.runtime import interpreter

    return interpreter


# --------------------------------------------------------------------------------------------
# Counting
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Launch:
    """One kernel launch: its grid, constexprs and per-storage counts.

    ``counts[ptr]`` is a float array [3 kinds, 2]: (raw bytes, sectors) for load, store,
    atomic, each program's counts weighted by the programs it stands for when sampled.
    """

    kernel: str
    grid: tuple[int, int, int]
    programs: int
    counted: int
    meta: dict
    arg_names: dict[int, list[str]]
    counts: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)

    def summary(self) -> dict:
        return {
            "kernel": self.kernel,
            "grid": list(self.grid),
            "programs": self.programs,
            "counted_programs": self.counted,
            "meta": self.meta,
        }


class _Regions:
    """Sorted storage extents of one launch, for address -> storage lookups."""

    def __init__(self, extents: dict[int, int]):
        ptrs = sorted(extents)
        self.starts = np.array(ptrs, dtype=np.uint64)
        self.ends = np.array([p + extents[p] for p in ptrs], dtype=np.uint64)
        self.ptrs = ptrs

    def split(self, addrs: np.ndarray):
        """Yield (storage ptr or 0, addresses of that storage)."""
        if len(self.ptrs) == 0:
            yield 0, addrs
            return
        lo, hi = addrs.min(), addrs.max()
        i = int(np.searchsorted(self.starts, lo, side="right")) - 1
        if i >= 0 and hi < self.ends[i]:
            yield self.ptrs[i], addrs
            return
        idx = np.searchsorted(self.starts, addrs, side="right").astype(np.int64) - 1
        inside = idx >= 0
        inside[inside] = addrs[inside] < self.ends[idx[inside]]
        if (~inside).any():
            yield 0, addrs[~inside]
        for j in np.unique(idx[inside]):
            yield self.ptrs[int(j)], addrs[inside & (idx == j)]


def _sectors(addrs: np.ndarray, itemsize: int) -> int:
    first = addrs // SECTOR
    if itemsize > 1 and ((addrs % SECTOR) + itemsize > SECTOR).any():
        last = (addrs + (itemsize - 1)) // SECTOR
        return int(np.unique(np.concatenate([first, last])).size)
    return int(np.unique(first).size)


class Counter:
    """What :func:`count` yields: the launches run in its block and their counts."""

    def __init__(self):
        self.launches: list[Launch] = []
        # Storages seen are kept alive, so no two of them share an address within a counter.
        self._keep: dict[int, torch.UntypedStorage] = {}
        self._launch: Launch | None = None
        self._regions: _Regions | None = None
        self._weight = 1.0  # programs the running one stands for (sampling)

    # -- called by the patched interpreter --------------------------------------------------

    def _begin(self, kernel, grid, counted, args: dict, constexprs) -> None:
        extents: dict[int, int] = {}
        arg_names: dict[int, list[str]] = {}
        for name, arg in args.items():
            if not hasattr(arg, "data_ptr"):
                continue
            base = getattr(arg, "base", arg) if not isinstance(arg, torch.Tensor) else arg
            storage = base.untyped_storage()
            ptr = storage.data_ptr()
            self._keep.setdefault(ptr, storage)
            extents[ptr] = max(extents.get(ptr, 0), storage.nbytes())
            arg_names.setdefault(ptr, []).append(name)
        meta = {
            k: args[k]
            for k in constexprs
            if k in args and isinstance(args[k], (bool, int, float, str)) and args[k] is not None
        }
        programs = grid[0] * grid[1] * grid[2]
        self._launch = Launch(kernel, tuple(grid), programs, counted, meta, arg_names)
        self._regions = _Regions(extents)

    def _end(self) -> None:
        if self._launch is not None:
            self.launches.append(self._launch)
        self._launch = None
        self._regions = None

    def _record(self, kind: int, ptrs, mask) -> None:
        if self._launch is None:
            return
        addrs = np.asarray(ptrs.data)
        if mask is not None:
            keep = np.broadcast_to(np.asarray(mask.data, dtype=bool), addrs.shape)
            addrs = addrs[keep]
        else:
            addrs = addrs.reshape(-1)
        if addrs.size == 0:
            return
        addrs = addrs.astype(np.uint64, copy=False)
        itemsize = max(1, ptrs.get_element_ty().primitive_bitwidth // 8)
        counts = self._launch.counts
        for ptr, sub in self._regions.split(addrs):
            arr = counts.get(ptr)
            if arr is None:
                arr = counts[ptr] = np.zeros((3, 2), dtype=np.float64)
            arr[kind, 0] += self._weight * sub.size * itemsize
            arr[kind, 1] += self._weight * _sectors(sub, itemsize)

    # -- results ------------------------------------------------------------------------------

    def report(
        self,
        operands: dict[str, torch.Tensor | None] | None = None,
        compulsory: dict[str, int] | None = None,
    ) -> Report:
        """Per-operand traffic of every launch counted.

        ``operands`` names tensors (None entries are skipped); a storage that two of them share
        is credited to the first. ``compulsory`` maps names to the bytes the op must move for
        them (default: each named operand's distinct bytes once); a name there that is not an
        operand (a tensor the launcher builds itself) gets a row of its own with nothing moved,
        its traffic showing under the temporary's ``tmp(...)`` row.
        """
        operands = {k: v for k, v in (operands or {}).items() if v is not None}
        if compulsory is None:
            compulsory = {k: distinct_bytes(v) for k, v in operands.items()}
        by_ptr: dict[int, str] = {}
        for name, tensor in operands.items():
            by_ptr.setdefault(tensor.untyped_storage().data_ptr(), name)
        temp_names: dict[int, set[str]] = {}
        for launch in self.launches:
            for ptr, names in launch.arg_names.items():
                if ptr not in by_ptr:
                    temp_names.setdefault(ptr, set()).update(f"{launch.kernel}.{n}" for n in names)

        totals: dict[str, np.ndarray] = {}
        for launch in self.launches:
            for ptr, arr in launch.counts.items():
                if ptr in by_ptr:
                    name = by_ptr[ptr]
                elif ptr == 0:
                    name = "unmapped"
                else:
                    name = "tmp(" + ",".join(sorted(temp_names.get(ptr, {"?"}))) + ")"
                totals.setdefault(name, np.zeros((3, 2)))
                totals[name] += arr

        rows: dict[str, OperandTraffic] = {}
        named = [*operands, *(c for c in compulsory if c not in operands)]
        for name in [*named, *sorted(set(totals) - set(named))]:
            arr = totals.get(name, np.zeros((3, 2)))
            rows[name] = OperandTraffic(
                name=name,
                loaded=round(arr[_LOAD, 0]),
                load_sectors=round(arr[_LOAD, 1]),
                stored=round(arr[_STORE, 0]),
                store_sectors=round(arr[_STORE, 1]),
                atomic=round(arr[_ATOMIC, 0]),
                atomic_sectors=round(arr[_ATOMIC, 1]),
                compulsory=int(compulsory.get(name, 0)),
            )
        return Report(operands=rows, launches=[launch.summary() for launch in self.launches])


@dataclasses.dataclass
class OperandTraffic:
    """One operand's traffic over all launches: raw bytes of the active lanes and 32-byte
    sectors, per access kind, and the bytes the op must move for it."""

    name: str
    loaded: int
    load_sectors: int
    stored: int
    store_sectors: int
    atomic: int
    atomic_sectors: int
    compulsory: int

    @property
    def sectors(self) -> int:
        return self.load_sectors + self.store_sectors + self.atomic_sectors

    @property
    def moved(self) -> int:
        """Bytes moved in whole sectors: ``32 * sectors``."""
        return SECTOR * self.sectors

    @property
    def raw(self) -> int:
        """Bytes of the active lanes."""
        return self.loaded + self.stored + self.atomic

    @property
    def ratio(self) -> float:
        """``moved / compulsory`` (inf when nothing is compulsory but something moved)."""
        return _ratio(self.moved, self.compulsory)

    def as_dict(self) -> dict:
        return {
            **dataclasses.asdict(self),
            "moved": self.moved,
            "raw": self.raw,
            "ratio": _finite(self.ratio),
        }


@dataclasses.dataclass
class Report:
    """Traffic of a counted call, per operand (named ones first, then temporaries)."""

    operands: dict[str, OperandTraffic]
    launches: list[dict]

    @property
    def moved(self) -> int:
        return sum(o.moved for o in self.operands.values())

    @property
    def raw(self) -> int:
        return sum(o.raw for o in self.operands.values())

    @property
    def compulsory(self) -> int:
        return sum(o.compulsory for o in self.operands.values())

    @property
    def ratio(self) -> float:
        """Moved sector bytes over compulsory bytes: the decode-speed number."""
        return _ratio(self.moved, self.compulsory)

    @property
    def raw_ratio(self) -> float:
        return _ratio(self.raw, self.compulsory)

    def table(self) -> str:
        """Markdown: one row per operand, then the total."""
        head = (
            "| operand | compulsory B | moved B (sectors) | raw B | moved / compulsory |\n"
            "| --- | ---: | ---: | ---: | ---: |\n"
        )
        lines = [
            f"| {o.name} | {o.compulsory:,} | {o.moved:,} | {o.raw:,} | {_fmt_ratio(o.ratio)} |"
            for o in self.operands.values()
        ]
        lines.append(
            f"| **total** | {self.compulsory:,} | {self.moved:,} | {self.raw:,} "
            f"| **{_fmt_ratio(self.ratio)}** |"
        )
        return head + "\n".join(lines) + "\n"

    def as_dict(self) -> dict:
        return {
            "moved": self.moved,
            "raw": self.raw,
            "compulsory": self.compulsory,
            "ratio": _finite(self.ratio),
            "raw_ratio": _finite(self.raw_ratio),
            "operands": {k: v.as_dict() for k, v in self.operands.items()},
            "launches": self.launches,
        }


def _ratio(num: float, den: float) -> float:
    if den == 0:
        return 0.0 if num == 0 else math.inf
    return num / den


def _finite(value: float) -> float | None:
    return None if math.isinf(value) else round(value, 4)


def _fmt_ratio(value: float) -> str:
    return "-" if math.isinf(value) else f"{value:.3f}"


# --------------------------------------------------------------------------------------------
# Interpreter patches
# --------------------------------------------------------------------------------------------

_ACTIVE: list[Counter] = []


def _program_indices(grid: tuple[int, int, int], sample: int | None) -> list[tuple]:
    """``[(x, y, z, weight)]``: the programs to run and how many programs each stands for."""
    gx, gy, gz = grid
    total = gx * gy * gz
    if sample is None or total <= sample:
        picked = [(i, 1.0) for i in range(total)]
    else:
        inner = sorted({1 + round(i * (total - 3) / (sample - 3)) for i in range(sample - 2)})
        weight = (total - 2) / len(inner)
        picked = [(0, 1.0), *((i, weight) for i in inner), (total - 1, 1.0)]
    return [(i // (gy * gz), (i // gz) % gy, i % gz, w) for i, w in picked]


def _grid_executor_call(sample):
    """A replacement for ``GridExecutor.__call__`` (triton 3.9): the same steps, plus the launch
    bookkeeping and a subset of programs when sampling."""
    interp = _interpreter()

    def call(self, *args_dev, **kwargs):
        counter = _ACTIVE[-1]
        argspec = inspect.getfullargspec(self.fn)
        kwargs = {k: v for k, v in kwargs.items() if k in argspec.args or k in argspec.kwonlyargs}
        args_hst, kwargs_hst = self._init_args_hst(args_dev, kwargs)
        for hook in self.pre_run_hooks:
            hook(*args_hst, **kwargs_hst)
        patch_scope = interp._patch_lang(self.fn)
        try:
            raw = inspect.getcallargs(self.fn, *args_hst, **kwargs_hst)
            args = {
                name: arg if name in self.constexprs else interp._implicit_cvt(arg)
                for name, arg in raw.items()
            }
            grid = self.grid(args) if callable(self.grid) else self.grid
            grid = tuple(grid) + (1,) * (3 - len(grid))
            programs = _program_indices(grid, sample)
            counter._begin(self.fn.__name__, grid, len(programs), raw, self.constexprs)
            interp.interpreter_builder.set_grid_dim(*grid)
            try:
                for x, y, z, weight in programs:
                    counter._weight = weight
                    interp.interpreter_builder.set_grid_idx(x, y, z)
                    self.fn(**args)
            except Exception as e:
                from triton.runtime.errors import InterpreterError

                raise InterpreterError(repr(e)) from e
        finally:
            counter._end()
            patch_scope.restore()
        self._restore_args_dev(args_dev, args_hst, kwargs, kwargs_hst)

    return call


def _builder_patches():
    interp = _interpreter()
    builder = interp.InterpreterBuilder
    orig_load = builder.create_masked_load
    orig_store = builder.create_masked_store
    orig_rmw = builder.create_atomic_rmw
    orig_cas = builder.create_atomic_cas

    def create_masked_load(self, ptrs, mask, other, cache_policy, is_volatile):
        _ACTIVE[-1]._record(_LOAD, ptrs, mask)
        return orig_load(self, ptrs, mask, other, cache_policy, is_volatile)

    def create_masked_store(self, ptrs, value, mask, cache_policy):
        _ACTIVE[-1]._record(_STORE, ptrs, mask)
        return orig_store(self, ptrs, value, mask, cache_policy)

    def create_atomic_rmw(self, rmw_op, ptr, val, mask, sem, scope):
        _ACTIVE[-1]._record(_ATOMIC, ptr, mask)
        return orig_rmw(self, rmw_op, ptr, val, mask, sem, scope)

    def create_atomic_cas(self, ptr, cmp, val, sem, scope):
        _ACTIVE[-1]._record(_ATOMIC, ptr, None)
        return orig_cas(self, ptr, cmp, val, sem, scope)

    return [
        (builder, "create_masked_load", create_masked_load),
        (builder, "create_masked_store", create_masked_store),
        (builder, "create_atomic_rmw", create_atomic_rmw),
        (builder, "create_atomic_cas", create_atomic_cas),
    ]


@contextlib.contextmanager
def _patched(patches):
    saved = []
    try:
        for obj, name, value in patches:
            saved.append((obj, name, obj.__dict__.get(name, _MISSING)))
            setattr(obj, name, value)
        yield
    finally:
        for obj, name, old in reversed(saved):
            if old is _MISSING:
                delattr(obj, name)
            else:
                setattr(obj, name, old)


_MISSING = object()


def _triton_kernel_modules():
    """Every module of ``lora_kernels.backends.triton`` (imported here if it was not)."""
    import lora_kernels.backends.triton as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        name = f"{pkg.__name__}.{info.name}"
        if name not in sys.modules:
            with contextlib.suppress(ImportError):
                importlib.import_module(name)
    prefix = pkg.__name__ + "."
    return [m for name, m in sorted(sys.modules.items()) if name.startswith(prefix) and m]


def _autotune_first(config: int):
    def run(self, *args, **kwargs):
        self.nargs = dict(zip(self.arg_names, args, strict=False))
        pruned = self.prune_configs(kwargs) if len(self.configs) > 1 else self.configs
        chosen = pruned[min(config, len(pruned) - 1)]
        self.best_config = chosen
        if chosen.pre_hook is not None:
            chosen.pre_hook({**self.nargs, **kwargs, **chosen.all_kwargs()})
        try:
            return self.fn.run(*args, **kwargs, **chosen.all_kwargs())
        finally:
            self.nargs = None

    return run


def _cuda_config_patches(sms: int, config: int):
    from triton.runtime.autotuner import Autotuner

    patches = [(Autotuner, "run", _autotune_first(config))]
    for module in _triton_kernel_modules():
        if callable(getattr(module, "interpreting", None)):
            patches.append((module, "interpreting", lambda: False))
        if callable(getattr(module, "_sm_count", None)):
            patches.append((module, "_sm_count", lambda *_: sms))
        if callable(getattr(module, "_target_programs", None)):
            patches.append((module, "_target_programs", lambda *_: 2 * sms))
    return patches


@contextlib.contextmanager
def cuda_configs(sms: int = H100_SMS, config: int = 0):
    """Make the Triton launchers pick their CUDA tiles under the interpreter (see the module
    docstring), without counting. ``count`` applies it by default."""
    with _patched(_cuda_config_patches(sms, config)):
        yield


@contextlib.contextmanager
def count(
    *, cuda_configs: bool = True, sms: int = H100_SMS, config: int = 0, sample: int | None = None
):
    """Count the memory traffic of every Triton launch run inside the block.

    ``cuda_configs``: the launchers pick their CUDA tiles (module docstring), as a GPU with
    ``sms`` SMs would, taking the ``config``-th candidate of each autotuned launch.
    ``sample``: run at most that many programs per launch (>= 3: the first, the last and
    some between) and weight them (outputs are then not computed). Yields a
    :class:`Counter`; call its ``report`` after (or inside) the block.
    """
    interp = _interpreter()
    if not _interpreting_triton():
        raise RuntimeError("tools.traffic.count needs TRITON_INTERPRET=1 before triton is imported")
    if _ACTIVE:
        raise RuntimeError("tools.traffic.count blocks do not nest")
    if sample is not None and sample < 3:
        raise ValueError(f"sample must be None or >= 3 programs, got {sample}")
    counter = Counter()
    patches = [
        (interp.GridExecutor, "__call__", _grid_executor_call(sample)),
        *_builder_patches(),
    ]
    if cuda_configs:
        patches += _cuda_config_patches(sms, config)
    _ACTIVE.append(counter)
    try:
        with _patched(patches):
            yield counter
    finally:
        _ACTIVE.pop()


def _interpreting_triton() -> bool:
    from triton import knobs

    return bool(knobs.runtime.interpret)


# --------------------------------------------------------------------------------------------
# Compulsory bytes
# --------------------------------------------------------------------------------------------


def distinct_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a view addresses (an expanded dimension counts once)."""
    n = 1
    for size, stride in zip(t.shape, t.stride(), strict=True):
        if stride != 0:
            n *= size
    return 0 if t.numel() == 0 else n * t.element_size()


def _nbytes(value) -> int:
    if value is None:
        return 0
    if isinstance(value, torch.Tensor):
        return distinct_bytes(value)
    return int(value)


def compulsory(reads: dict | None = None, writes: dict | None = None) -> dict[str, int]:
    """``{name: bytes}``: each read operand once, each written operand once (both for an
    operand in both). Values are tensors (their distinct bytes), byte counts, or None."""
    out: dict[str, int] = {}
    for group in (reads or {}, writes or {}):
        for name, value in group.items():
            if value is not None:
                out[name] = out.get(name, 0) + _nbytes(value)
    return out


def compulsory_lora_linear(x, weight, bias, lora_a, lora_b, y, s=None) -> dict[str, int]:
    """``y = x W^T + b + scale (x A^T) B^T`` (and S = x A^T, saved for the backward)."""
    return compulsory(
        reads={"x": x, "weight": weight, "bias": bias, "lora_a": lora_a, "lora_b": lora_b},
        writes={"y": y, "s": s},
    )


def _adapters_used(adapter_ids: torch.Tensor, num_adapters: int) -> list[int]:
    ids = adapter_ids.reshape(-1).tolist()
    return sorted({int(a) for a in ids if 0 <= a < num_adapters})


def compulsory_multi(
    x, weight, bias, lora_a, lora_b, scales, adapter_ids, y, s=None, ranks=None
) -> dict[str, int]:
    """Multi-adapter linear: lora_a [L, R, K], lora_b [L, N, R]; only the adapters present in
    ``adapter_ids`` must be read (their first ``ranks[a]`` rank slots, all R without ranks),
    and their scales."""
    num_adapters, r_max, k = lora_a.shape
    n = lora_b.shape[1]
    used = _adapters_used(adapter_ids, num_adapters)
    rank_list = ranks.tolist() if ranks is not None else [r_max] * num_adapters
    slots = sum(min(int(rank_list[a]), r_max) for a in used)
    return compulsory(
        reads={
            "x": x,
            "weight": weight,
            "bias": bias,
            "lora_a": slots * k * lora_a.element_size(),
            "lora_b": slots * n * lora_b.element_size(),
            "scales": len(used) * scales.element_size(),
            "adapter_ids": adapter_ids,
            "ranks": None if ranks is None else len(used) * ranks.element_size(),
        },
        writes={"y": y, "s": s},
    )


def compulsory_qlora(
    x, qweight, absmax, code, absmax2, code2, offset, bias, lora_a, lora_b, y, s=None
) -> dict[str, int]:
    """QLoRA linear over bitsandbytes' 4-bit weight: the packed bytes, the block maxima (and
    their second-level quantization), the 16-entry code table, each once."""
    return compulsory(
        reads={
            "x": x,
            "qweight": qweight,
            "absmax": absmax,
            "code": code,
            "absmax2": absmax2,
            "code2": code2,
            "offset": offset,
            "bias": bias,
            "lora_a": lora_a,
            "lora_b": lora_b,
        },
        writes={"y": y, "s": s},
    )


def compulsory_embedding(ids, weight, lora_a, lora_b, scales, row_ids, y, s=None):
    """Embedding with adapters: weight [V, D], lora_a [L, R, V], lora_b [L, D, R]. What must be
    read: the rows of ``weight`` looked up, for each distinct (adapter, token) pair its R values
    of lora_a, lora_b of each adapter present, the ids (and per-row adapter ids)."""
    num_adapters, r, v = lora_a.shape
    d = weight.shape[1]
    tokens = ids.reshape(-1).tolist()
    rows = row_ids.reshape(-1).tolist() if row_ids is not None else [0] * len(tokens)
    looked_up = {t for t in tokens if 0 <= t < v}
    pairs = {
        (a, t) for a, t in zip(rows, tokens, strict=True) if 0 <= a < num_adapters and 0 <= t < v
    }
    adapters = {a for a, _ in pairs}
    return compulsory(
        reads={
            "ids": ids,
            "row_ids": row_ids,
            "weight": len(looked_up) * d * weight.element_size(),
            "lora_a": len(pairs) * r * lora_a.element_size(),
            "lora_b": len(adapters) * d * r * lora_b.element_size(),
            "scales": len(adapters) * 4,
        },
        writes={"y": y, "s": s},
    )


def compulsory_dora(x, weight, bias, lora_a, lora_b, g, y, lin=None, s=None):
    """DoRA forward: the LoRA linear's operands plus the per-row factor ``g`` [N]; ``lin`` and
    ``s`` are outputs saved for the backward."""
    return compulsory(
        reads={
            "x": x,
            "weight": weight,
            "bias": bias,
            "lora_a": lora_a,
            "lora_b": lora_b,
            "g": g,
        },
        writes={"y": y, "lin": lin, "s": s},
    )


def compulsory_merge(weight, lora_a, lora_b) -> dict[str, int]:
    """``weight += scale * lora_b @ lora_a`` in place: weight read and written once."""
    return compulsory(
        reads={"weight": weight, "lora_a": lora_a, "lora_b": lora_b}, writes={"weight": weight}
    )
