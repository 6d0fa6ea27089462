"""Ahead-of-time compile gate: every Triton kernel x config, compiled for real NVIDIA targets.

No GPU is needed. The real launchers run on CPU tensors of realistic shapes with their kernel
launches captured instead of executed; each captured launch is specialised exactly as a real
launch would be (Triton's own binder: 16-byte-aligned pointers and ints divisible by 16 get the
divisibility hint, ints equal to 1 become constants), an autotuned launch is expanded into the
configs its own ``early_config_prune`` keeps, and every distinct variant is compiled with
``triton.compile`` for ``GPUTarget("cuda", 80, 32)`` and ``GPUTarget("cuda", 90, 32)`` with
Triton's bundled ptxas. From each cubin build we read:

* registers and spill bytes from the ptxas ``-v`` log,
* shared memory from the compiled metadata,
* whether every dot became a tensor-core one (an MMA layout in the TTGIR, ``mma`` / ``wgmma``
  instructions in the PTX).

The launchers' modules are loaded a second time as private "GPU twins" with Triton's interpreter
switched off while their ``@triton.jit`` decorators run, so the twin's kernels are real
``JITFunction`` objects even in a process where ``TRITON_INTERPRET=1`` (the test suite) and the
package's own modules keep running under the interpreter. In a twin, ``interpreting()`` answers
False (the launchers take their CUDA paths: CUDA configs, no interpreter workarounds) and the
"SM count" is the target's.

What this proves, and what it does not: every kernel the launchers can issue for the driven
shapes compiles for sm_80 and sm_90, within shared memory, without spills on the 16-bit paths,
with tensor-core dots. It does not run anything: numerics, speed, races and the launch itself
(driver, grid limits, device selection) need a GPU (``tests/test_cuda.py``).

Edit ``LAUNCHER_MODULES`` when a kernel family moves or is added, and ``TWIN_DEPENDENCIES``
when its launchers import another family's (lora_delta runs lora_multi's shrink and device
functions: its twin imports lora_multi's twin, whose launches are captured with its own).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import io
import itertools
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable

import torch

# Kernel families whose launchers the gate drives: short name -> module path. One line to edit
# when a family moves.
LAUNCHER_MODULES = {
    "lora_linear": "lora_kernels.backends.triton.lora_linear",
    "lora_multi": "lora_kernels.backends.triton.lora_multi",
    "merge": "lora_kernels.backends.triton.merge",
    "dora": "lora_kernels.backends.triton.dora",
    "qlora": "lora_kernels.backends.triton.qlora",
    "lora_embedding": "lora_kernels.backends.triton.lora_embedding",
    "moe": "lora_kernels.backends.triton.moe",
    "lora_delta": "lora_kernels.backends.triton.lora_delta",
}
# Families whose launcher module imports another family's launchers and device functions: the
# twin imports that family's twin (compiled kernels, captured launches), not the package's own.
TWIN_DEPENDENCIES = {"lora_delta": ("lora_multi",)}

# Per-block shared memory a kernel may use (opt-in maximum) and the SM count of the reference
# GPU of each target (A100, H100/H200).
TARGETS = {
    80: {"smem_limit": 163 * 1024, "sms": 108},
    90: {"smem_limit": 227 * 1024, "sms": 132},
}
# Headroom below the limit: what Triton's own scratch and a future Triton version may add.
SMEM_HEADROOM = 8 * 1024


# --------------------------------------------------------------------------------------------
# GPU twins of the launcher modules
# --------------------------------------------------------------------------------------------


# Modules of device functions that launcher modules import (``from ._rounding import ...``):
# a twin must see compiled-mode copies of them, not the interpreted ones this process made.
# In import order: ``_segment`` imports ``_rounding``.
SHARED_DEVICE_MODULES = (
    "lora_kernels.backends.triton._rounding",
    "lora_kernels.backends.triton._lora_product",
    "lora_kernels.backends.triton._segment",
)


def _exec_compiled(path: str, name: str):
    """Execute the module at import path ``path`` afresh, as ``name``, with the interpreter off."""
    spec = importlib.util.find_spec(path)
    twin_spec = importlib.util.spec_from_file_location(name, spec.origin)
    module = importlib.util.module_from_spec(twin_spec)
    module.__package__ = path.rpartition(".")[0]
    twin_spec.loader.exec_module(module)
    return module


def _load_twin(family: str, sms: int):
    """A private copy of the family's module whose kernels are compiled, not interpreted."""
    import triton

    path = LAUNCHER_MODULES[family]
    deps = {LAUNCHER_MODULES[d]: _load_twin(d, sms) for d in TWIN_DEPENDENCIES.get(family, ())}
    saved = {p: sys.modules.get(p) for p in (*SHARED_DEVICE_MODULES, *deps)}
    with triton.knobs.runtime.scope():
        triton.knobs.runtime.interpret = False
        try:
            for p in SHARED_DEVICE_MODULES:
                sys.modules[p] = _exec_compiled(p, p)
            sys.modules.update(deps)
            module = _exec_compiled(path, f"{path}__aot_twin_{sms}")
        finally:
            for p, m in saved.items():
                if m is None:
                    sys.modules.pop(p, None)
                else:
                    sys.modules[p] = m
    # The launchers take their CUDA paths, sized for the target's GPU. Their input checks, which
    # accept CPU tensors only under the interpreter, still do (the driven tensors are CPU ones).
    module.interpreting = _checks_only
    if hasattr(module, "_target_programs"):
        module._target_programs = lambda device: 2 * sms
    if hasattr(module, "_sm_count"):
        module._sm_count = lambda device_index: sms
    if hasattr(module, "_autotune_enabled"):
        module._autotune_enabled = lambda: True
    module._aot_dependencies = list(deps.values())
    return module


def _checks_only() -> bool:
    """``interpreting()`` of a twin: True for its input checks (``_check*``), else False."""
    return sys._getframe(1).f_code.co_name.startswith("_check")


# --------------------------------------------------------------------------------------------
# Compiling in a process that interprets
# --------------------------------------------------------------------------------------------
#
# With TRITON_INTERPRET=1 set when Triton was imported, three things stand between a kernel and
# the compiler: the knob itself (the code generator reads it for constexpr functions), Triton's
# own library functions (``tl.max``, ``tl.cdiv``...) being InterpretedFunction objects, and the
# interpreter's patches of ``triton.language`` (a device-function call outside a kernel patches
# it for good). ``_compiler_mode`` sets all three right for the duration of a compile and puts
# everything back afterwards, so interpreter tests before and after are unaffected.


def _lang_objects() -> list:
    import triton.language as tl

    objs = [tl, tl.core, tl.math, tl.standard, tl.tensor, tl.dtype]
    objs += [
        getattr(tl.core, n) for n in ("tensor_descriptor_base", "condition") if hasattr(tl.core, n)
    ]
    return objs


def _from_interpreter(value) -> bool:
    func = getattr(value, "func", value)  # functools.partial
    code = getattr(func, "__code__", None)
    return code is not None and code.co_filename.endswith(os.path.join("runtime", "interpreter.py"))


# The language as it is before any interpreter patch (taken at import; patches skipped).
_LANG_BASELINE = {
    id(obj): {k: v for k, v in vars(obj).items() if not _from_interpreter(v)}
    for obj in _lang_objects()
}
_JIT_TWINS: dict[int, object] = {}


def _jit_twin(fn):
    """A JITFunction of an InterpretedFunction's Python function (cached)."""
    from triton.runtime.jit import JITFunction

    twin = _JIT_TWINS.get(id(fn))
    if twin is None:
        twin = JITFunction(fn.fn, noinline=getattr(fn, "noinline", None))
        _JIT_TWINS[id(fn)] = twin
    return twin


@contextlib.contextmanager
def _compiler_mode():
    import triton
    from triton.runtime.interpreter import InterpretedFunction

    modules = [m for name, m in list(sys.modules.items()) if name.startswith("triton.language")]
    objs = _lang_objects() + [m for m in modules if m not in _lang_objects()]
    saved = [(obj, dict(vars(obj))) for obj in objs]
    try:
        for obj in objs:
            base = _LANG_BASELINE.get(id(obj), {})
            for key, value in list(vars(obj).items()):
                if _from_interpreter(value) and key in base:
                    setattr(obj, key, base[key])
                elif isinstance(value, InterpretedFunction):
                    setattr(obj, key, _jit_twin(value))
        with triton.knobs.runtime.scope():
            triton.knobs.runtime.interpret = False
            yield
    finally:
        for obj, before in saved:
            now = vars(obj)
            for key in [k for k in now if k not in before]:
                delattr(obj, key)
            for key, value in before.items():
                if now.get(key, _MISSING) is not value:
                    setattr(obj, key, value)


_MISSING = object()


# --------------------------------------------------------------------------------------------
# Capture
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Launch:
    """One distinct kernel variant the launchers issued, specialised for one target.

    The tensors are not kept: the binder's specialization is taken when the launch is captured.
    """

    kernel: object  # triton JITFunction
    specialization: list
    build: Callable  # () -> triton CompiledKernel
    cases: list[str]  # the driven calls that issued it
    config: str  # the autotune config ("tuned:...") or the fixed launch meta ("fixed:...")
    unguarded: bool = False  # launched outside ``device_guard`` (on whatever device is current)


def _config_name(kwargs: dict) -> str:
    keys = [
        k for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_P", "BLOCK_Q", "BLOCK_R") if k in kwargs
    ]
    parts = [f"{k.removeprefix('BLOCK_')}{kwargs[k]}" for k in keys]
    parts.append(f"w{kwargs.get('num_warps', 4)}s{kwargs.get('num_stages', 3)}")
    return "-".join(parts)


class _Capture:
    """Replaces ``run`` on every JITFunction / Autotuner of a twin module with a recorder.

    Each recorded launch is specialised for ``capability`` on the spot and deduplicated: the
    launches of a matrix repeat the same few variants many times.
    """

    def __init__(self, module, capability: int):
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.jit import JITFunction

        self.capability = capability
        self.variants: dict[tuple, Launch] = {}
        self.launches = 0
        self.case = ""
        self.guard_depth = 0
        # the module's own kernels and those of the twins it imports
        values = [v for m in (module, *module._aot_dependencies) for v in vars(m).values()]
        values += [v for d in values if isinstance(d, dict) for v in d.values()]  # tables
        for value in values:
            if isinstance(value, Autotuner):
                value.run = self._autotuned(value)
            elif isinstance(value, JITFunction):
                value.run = self._plain(value)

    def _record(self, kernel, args, kwargs, config):
        kwargs = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
        self.launches += 1
        specialization, options, build = _specialise(kernel, args, kwargs, self.capability)
        key = (kernel, repr(specialization), repr(options))
        if key not in self.variants:
            self.variants[key] = Launch(kernel, specialization, build, [], config)
        self.variants[key].cases.append(self.case)
        self.variants[key].unguarded |= self.guard_depth == 0

    @contextlib.contextmanager
    def guard(self, tensor):
        """Stands in for ``device_guard``: counts the launches made inside it."""
        self.guard_depth += 1
        try:
            yield
        finally:
            self.guard_depth -= 1

    def _plain(self, kernel):
        def run(*args, grid, warmup, **kwargs):
            self._record(kernel, args, kwargs, "fixed:" + _config_name(kwargs))

        return run

    def _autotuned(self, tuner):
        def run(*args, **kwargs):
            # The autotuner's own pruning, as a real first call would apply it.
            tuner.nargs = dict(zip(tuner.arg_names, args, strict=False))
            meta = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
            configs = tuner.prune_configs(meta)
            tuner.nargs = None
            for config in configs:
                full = {**meta, **config.all_kwargs()}
                self._record(tuner.fn, args, full, "tuned:" + _config_name(full))

        return run


# --------------------------------------------------------------------------------------------
# Compile
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    family: str
    kernel: str
    variant: str  # the constexpr flags and dtypes that distinguish this compile
    config: str
    target: int
    cases: list[str]
    registers: int | None = None
    spill_bytes: int | None = None  # spill stores + loads, bytes
    shared: int | None = None
    dots: int = 0  # tl.dot count in the TTIR (0: the kernel has no dot)
    mma: int = 0  # tensor-core instructions in the PTX
    sixteen_bit: bool = False  # a 16-bit operand anywhere in the signature
    error: str | None = None
    unguarded: bool = False
    fma_dots: int = 0  # dots left on CUDA cores (no MMA layout in the TTGIR)


_PTXAS_RE = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads.*?"
    r"Used (\d+) registers",
    re.S,
)


def _ptxas_usage(log: str) -> tuple[int, int] | None:
    """(registers, spill store + load bytes) from a ptxas ``-v`` log of one kernel."""
    match = _PTXAS_RE.search(log)
    if match is None:
        return None
    return int(match.group(4)), int(match.group(2)) + int(match.group(3))


def _run_ptxas(ptx: str, capability: int) -> str:
    """The ``-v`` log of Triton's bundled ptxas on ``ptx`` (when the cubin came from cache)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    ptxas = get_ptxas(capability).path
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        arch = sm_arch_from_capability(capability)
        proc = subprocess.run(
            [ptxas, "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", src, "-o", src + ".o"],
            capture_output=True,
            text=True,
            check=True,
        )
    return proc.stderr


def _describe_variant(kernel, specialization) -> str:
    """Constexprs and non-pointer dtypes of a compile, short, for the report."""
    parts = []
    for param, (kind, value) in zip(kernel.params, specialization, strict=True):
        if kind == "constexpr":
            if param.name.startswith("BLOCK_") or param.name == "GROUP_M":
                continue
            parts.append(f"{param.name}={getattr(value, 'name', value)}")
        elif kind.startswith("*"):
            parts.append(f"{param.name.removesuffix('_ptr')}:{kind[1:]}")
    return " ".join(parts)


@functools.cache
def _binder(kernel, capability: int):
    """(target, backend, binder) of ``kernel`` for ``cuda:capability`` (exec'd once)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    return target, backend, create_function_from_signature(kernel.signature, kernel.params, backend)


def _specialise(kernel, args, kwargs, capability: int):
    """(specialization, options, build) of one launch for ``cuda:capability``.

    As ``JITFunction.run`` does it: Triton's binder for the target's backend, then
    ``_pack_args``; ``build()`` compiles.
    """
    import triton
    from triton.compiler import ASTSource

    target, backend, binder = _binder(kernel, capability)
    kwargs = dict(kwargs)
    kwargs.setdefault("debug", False)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(
        backend, kwargs, bound, specialization, options
    )
    src = ASTSource(kernel, signature, constexprs, attrs)
    build = lambda: triton.compile(src, target=target, options=options.__dict__)
    return specialization, options, build


def compile_launches(
    family: str, launches: Iterable[Launch], capability: int, progress: Callable | None = None
) -> list[Result]:
    """Compile each distinct variant of ``launches`` for ``cuda:capability``."""
    import triton

    results = []
    for launch in launches:
        specialization = launch.specialization
        sixteen = any(
            kind in ("*fp16", "*bf16") for kind, _ in specialization if isinstance(kind, str)
        )
        result = Result(
            family=family,
            kernel=launch.kernel.__name__,
            variant=_describe_variant(launch.kernel, specialization),
            config=launch.config,
            target=capability,
            cases=launch.cases,
            sixteen_bit=sixteen,
            unguarded=launch.unguarded,
        )
        results.append(result)
        log = io.StringIO()
        try:
            with _compiler_mode(), triton.knobs.nvidia.scope(), contextlib.redirect_stdout(log):
                triton.knobs.nvidia.dump_ptxas_log = True
                compiled = launch.build()
        except Exception as exc:  # noqa: BLE001 - every failure is a gate finding
            result.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1:]}"
            continue
        usage = _ptxas_usage(log.getvalue()) or _ptxas_usage(
            _run_ptxas(compiled.asm["ptx"], capability)
        )
        result.registers, result.spill_bytes = usage
        result.shared = compiled.metadata.shared
        result.dots = compiled.asm["ttir"].count("tt.dot ")
        ptx = compiled.asm["ptx"]
        result.fma_dots = sum(
            1
            for line in compiled.asm["ttgir"].splitlines()
            if "= tt.dot " in line and "#mma" not in line.rsplit("->", 1)[-1]
        )
        result.mma = len(re.findall(r"\b(?:mma|wgmma\.mma_async)\.sync|\bwgmma\.mma_async", ptx))
        if progress is not None:
            progress(result)
    return results


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


def findings(result: Result) -> list[str]:
    """What the gate rejects in one compiled variant (empty: it passes)."""
    where = f"{result.kernel} [{result.variant}] {result.config} sm_{result.target}"
    if result.error is not None:
        return [f"{where}: compile error {result.error}"]
    out = []
    if result.unguarded:
        out.append(f"{where}: launched outside device_guard (runs on the current device)")
    limit = TARGETS[result.target]["smem_limit"] - SMEM_HEADROOM
    if result.shared > limit:
        out.append(f"{where}: {result.shared} B shared memory, over {limit} B")
    if result.sixteen_bit and result.spill_bytes:
        out.append(f"{where}: {result.spill_bytes} B of register spills on a 16-bit path")
    if result.sixteen_bit and result.dots and (result.fma_dots or not result.mma):
        out.append(
            f"{where}: {result.fma_dots or result.dots} of {result.dots} dots not on tensor"
            " cores (no MMA layout in the TTGIR / no mma in the PTX)"
        )
    return out


# --------------------------------------------------------------------------------------------
# Drivers: the shapes each family's launchers are called with
# --------------------------------------------------------------------------------------------

_DT = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _t(*shape, dtype):
    """A CPU tensor the launchers accept; never read (launches are captured, not run)."""
    return torch.empty(shape, dtype=dtype)


@contextlib.contextmanager
def _deterministic(on: bool):
    """torch's deterministic mode set to ``on`` for the launches inside (the launchers read it
    to pick their ordered, atomic-free variants), restored after."""
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(on)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev)


def _gemm_grid(matrix: dict):
    """``(k, n, m, r, dt, adt)`` over the kn, m, r and dtypes axes of a GEMM family's matrix,
    in that nesting order (the report lists the variants in it)."""
    axes = (matrix["kn"], matrix["m"], matrix["r"], matrix["dtypes"])
    for (k, n), m, r, (dt, adt) in itertools.product(*axes):
        yield k, n, m, r, dt, adt


def drive_lora_linear(twin, cap: _Capture, matrix: dict) -> None:
    for k, n, m, r, dt, adt in _gemm_grid(matrix):
        xd, ad = _DT[dt], _DT[adt]
        for bias_on, xl_on in itertools.product(matrix["bias"], matrix["x_lora"]):
            x = _t(m, k, dtype=xd)
            w = _t(n, k, dtype=xd)
            bias = _t(n, dtype=xd) if bias_on else None
            a = _t(r, k, dtype=ad)
            b = _t(n, r, dtype=ad)
            xl = _t(m, k, dtype=xd) if xl_on else None
            tag = f"M{m} K{k} N{n} r{r} {dt}/{adt} bias{int(bias_on)} xl{int(xl_on)}"
            s = torch.empty((m, r), dtype=torch.float32)
            dy = _t(m, n, dtype=xd)
            for det in matrix["deterministic"]:
                # deterministic decode: split partials summed in order
                with _deterministic(det):
                    cap.case = f"fwd det{int(det)} " + tag
                    twin.lora_linear_fwd(x, w, bias, a, b, 2.0, xl)
                    for needs in matrix["needs"]:
                        cap.case = f"bwd det{int(det)} needs{needs} " + tag
                        twin.lora_linear_bwd(
                            dy, x, w, a, b, s, 2.0, xl,
                            needs_dx="x" in needs, needs_da="a" in needs, needs_db="b" in needs,
                        )  # fmt: skip


def drive_lora_multi(twin, cap: _Capture, matrix: dict) -> None:
    num_adapters = matrix["adapters"]
    for k, n, m, r, dt, adt in _gemm_grid(matrix):
        xd, ad = _DT[dt], _DT[adt]
        for id_dtype, strategy, ranks_on in itertools.product(
            matrix["id_dtypes"], matrix["strategies"], matrix["ranks"]
        ):
            x = _t(m, k, dtype=xd)
            w = _t(n, k, dtype=xd)
            a = _t(num_adapters, r, k, dtype=ad)
            b = _t(num_adapters, n, r, dtype=ad)
            scales = torch.ones(num_adapters)
            ids = torch.randint(-1, num_adapters, (m,), dtype=id_dtype)
            ranks = torch.full((num_adapters,), r, dtype=torch.int32) if ranks_on else None
            tag = f"M{m} K{k} N{n} r{r} {dt}/{adt} {id_dtype} {strategy} ranks{int(ranks_on)}"
            # deterministic: the gather decode's split partials are stored per split and
            # summed in order (no atomics)
            for det in matrix.get("deterministic", [False]):
                dtag = tag + (" det1" if det else "")
                with _deterministic(det):
                    cap.case = "fwd " + dtag
                    twin.lora_linear_multi_fwd(
                        x, w, None, a, b, scales, ids, ranks, strategy=strategy
                    )
                    s = torch.empty((m, r), dtype=torch.float32)
                    cap.case = "bwd " + dtag
                    twin.lora_linear_multi_bwd(
                        _t(m, n, dtype=xd), x, w, a, b, scales, ids, s, ranks,
                        strategy=strategy,
                    )  # fmt: skip


def drive_merge(twin, cap: _Capture, matrix: dict) -> None:
    for k, n in matrix["kn"]:
        for r in matrix["r"]:
            for dt, adt in matrix["dtypes"]:
                cap.case = f"merge K{k} N{n} r{r} {dt}/{adt}"
                w = _t(n, k, dtype=_DT[dt])
                twin.merge_(w, _t(r, k, dtype=_DT[adt]), _t(n, r, dtype=_DT[adt]), 2.0)


def drive_dora(twin, cap: _Capture, matrix: dict) -> None:
    # DoRA's own kernels (weight norm, output scale, dy pass); its LoRA GEMMs are lora_linear's
    # launches, driven by that family: stubbed here with outputs of the right shapes.
    def lora_fwd(x, weight, bias, a, b, scale, x_lora=None):
        m = x.shape[0]
        return _t(m, weight.shape[0], dtype=x.dtype), torch.empty((m, a.shape[0]))

    def lora_bwd(dy, x, weight, a, b, s, scale, x_lora=None, **needs):
        return _t(*x.shape, dtype=x.dtype), None, torch.empty_like(a), torch.empty_like(b)

    twin.lora_linear_fwd, twin.lora_linear_bwd = lora_fwd, lora_bwd
    for k, n in matrix["kn"]:
        for r in matrix["r"]:
            for dt, adt in matrix["dtypes"]:
                xd, ad = _DT[dt], _DT[adt]
                w, a, b = _t(n, k, dtype=xd), _t(r, k, dtype=ad), _t(n, r, dtype=ad)
                for has_wsq in (True, False):
                    cap.case = f"norm K{k} N{n} r{r} {dt}/{adt} wsq{int(has_wsq)}"
                    twin.dora_weight_norm(w, a, b, 2.0, torch.ones(n) if has_wsq else None)
                g = torch.ones(n)
                cap.case = f"merge K{k} N{n} r{r} {dt}/{adt}"
                twin.dora_merge_(w, a, b, 2.0, g)
                twin.dora_unmerge_(w, a, b, 2.0, g)
                for m in matrix["m"]:
                    x = _t(m, k, dtype=xd)
                    # the dropout input adds stock GEMMs over the whole weight: small M only
                    for xl_on in [on for on in matrix["x_lora"] if not on or m <= 16]:
                        xl = _t(m, k, dtype=xd) if xl_on else None
                        tag = f"M{m} K{k} N{n} r{r} {dt}/{adt} xl{int(xl_on)}"
                        cap.case = "fwd " + tag
                        twin.dora_linear_fwd(x, w, _t(n, dtype=xd), a, b, 2.0, xl, g)
                        for det in matrix["deterministic"]:
                            cap.case = f"bwd det{int(det)} " + tag
                            with _deterministic(det):
                                twin.dora_linear_bwd(
                                    _t(m, n, dtype=xd), x, w, a, b,
                                    torch.empty((m, r)), _t(m, n, dtype=xd), g, torch.ones(n),
                                    2.0, xl, needs_dx=not xl_on, needs_da=not xl_on,
                                    needs_db=not xl_on,
                                )  # fmt: skip


def drive_qlora(twin, cap: _Capture, matrix: dict) -> None:
    for k, n in matrix["kn"]:
        for nested in matrix["nested"]:
            blocks = -(-n * k // 64)
            quant = (
                _t(-(-n * k // 2), 1, dtype=torch.uint8),
                _t(blocks, dtype=torch.uint8 if nested else torch.float32),
                _t(16, dtype=torch.float32),
                _t(-(-blocks // 256), dtype=torch.float32) if nested else None,
                _t(256, dtype=torch.float32) if nested else None,
                _t(1, dtype=torch.float32) if nested else None,
                64,
                256,
            )
            for m in matrix["m"]:
                for r in matrix["r"]:
                    for dt, adt in matrix["dtypes"]:
                        xd, ad = _DT[dt], _DT[adt]
                        for xl_on in matrix["x_lora"]:
                            x = _t(m, k, dtype=xd)
                            a, b = _t(r, k, dtype=ad), _t(n, r, dtype=ad)
                            xl = _t(m, k, dtype=xd) if xl_on else None
                            tag = f"M{m} K{k} N{n} r{r} {dt}/{adt} nested{int(nested)}"
                            tag += f" xl{int(xl_on)}"
                            cap.case = "fwd " + tag
                            twin.qlora_linear_fwd(x, *quant, n, _t(n, dtype=xd), a, b, 2.0, xl)
                            cap.case = "bwd " + tag
                            twin.qlora_linear_bwd(
                                _t(m, n, dtype=xd), x, *quant, a, b, torch.empty((m, r)), 2.0,
                                xl, needs_dx=True, needs_da=False, needs_db=False,
                            )  # fmt: skip


def drive_lora_embedding(twin, cap: _Capture, matrix: dict) -> None:
    num = matrix["adapters"]
    for v, d in matrix["vd"]:
        for m in matrix["m"]:
            for r in matrix["r"]:
                for dt, adt in matrix["dtypes"]:
                    for mixed in matrix["row_ids"]:
                        ids = torch.zeros(m, dtype=torch.int64)
                        row_ids = torch.zeros(m, dtype=torch.int64) if mixed else None
                        w = _t(v, d, dtype=_DT[dt])
                        a, b = _t(num, r, v, dtype=_DT[adt]), _t(num, d, r, dtype=_DT[adt])
                        scales = [2.0] * num
                        tag = f"M{m} V{v} D{d} r{r} {dt}/{adt} mixed{int(mixed)}"
                        cap.case = "fwd " + tag
                        twin.lora_embedding_fwd(ids, w, a, b, scales, row_ids, 0)
                        for det in matrix.get("deterministic", [False]):
                            cap.case = f"bwd det{int(det)} " + tag
                            with _deterministic(det):
                                twin.lora_embedding_bwd(
                                    _t(m, d, dtype=_DT[dt]), ids, w, a, b, scales, row_ids,
                                    torch.empty((m, r)), 0,
                                )  # fmt: skip


def drive_moe(twin, cap: _Capture, matrix: dict) -> None:
    for hidden, inter, experts, top_k in matrix["shapes"]:
        for t in matrix["t"]:
            for r in matrix["r"]:
                for adapters in matrix["adapters"]:
                    for dt, adt in matrix["dtypes"]:
                        xd, ad = _DT[dt], _DT[adt]
                        x = _t(t, hidden, dtype=xd)
                        ids = torch.randint(0, experts, (t, top_k))
                        w = torch.rand(t, top_k)
                        w_gu = _t(experts, 2 * inter, hidden, dtype=xd)
                        w_d = _t(experts, hidden, inter, dtype=xd)
                        lead = (adapters, experts)
                        a_gu = _t(*lead, r, hidden, dtype=ad)
                        b_gu = _t(*lead, 2 * inter, r, dtype=ad)
                        a_d = _t(*lead, r, inter, dtype=ad)
                        b_d = _t(*lead, hidden, r, dtype=ad)
                        scales = torch.ones(adapters)
                        token_ids = torch.randint(-1, adapters, (t,)) if adapters > 1 else None
                        tag = f"T{t} H{hidden} I{inter} E{experts} k{top_k} r{r} L{adapters}"
                        tag += f" {dt}/{adt}"
                        cap.case = "fwd " + tag
                        fwd = twin.moe_lora_fwd(
                            x, ids, w, w_gu, None, a_gu, b_gu, w_d, None, a_d, b_d, scales,
                            token_ids, "silu", 1.702, 7.0, True,
                        )  # fmt: skip
                        _, g, s_gu, s_d, o = fwd
                        cap.case = "bwd " + tag
                        twin.moe_lora_bwd(
                            _t(t, hidden, dtype=xd), x, ids, w, w_gu, a_gu, b_gu, w_d, a_d, b_d,
                            scales, token_ids, g, s_gu, s_d, o, "silu", 1.702, 7.0,
                        )  # fmt: skip


def drive_lora_delta(twin, cap: _Capture, matrix: dict) -> None:
    # The serving engines' two halves: lora_shrink_ (lora_multi's shrink kernels, from the
    # lora_multi twin this twin imports) and lora_expand_ (its own in-place expand, into y).
    num_adapters = matrix["adapters"]
    for k, n, m, r, dt, adt in _gemm_grid(matrix):
        xd, ad = _DT[dt], _DT[adt]
        ids = torch.randint(-1, num_adapters, (m,))
        for ranks_on in matrix["ranks"]:
            ranks = torch.full((num_adapters,), r, dtype=torch.int32) if ranks_on else None
            tag = f"M{m} K{k} N{n} r{r} {dt}/{adt} ranks{int(ranks_on)}"
            s = torch.empty((m, r), dtype=torch.float32)
            cap.case = "shrink " + tag
            twin.lora_shrink_(
                s, _t(m, k, dtype=xd), _t(num_adapters, r, k, dtype=ad), ids,
                torch.ones(num_adapters), ranks,
            )  # fmt: skip
            for add in matrix["add_inputs"]:
                cap.case = f"expand add{int(add)} " + tag
                twin.lora_expand_(
                    _t(m, n, dtype=xd), s, _t(num_adapters, n, r, dtype=ad), ids, ranks,
                    add_inputs=add,
                )  # fmt: skip


DRIVERS = {
    "lora_linear": drive_lora_linear,
    "lora_multi": drive_lora_multi,
    "merge": drive_merge,
    "dora": drive_dora,
    "qlora": drive_qlora,
    "lora_embedding": drive_lora_embedding,
    "moe": drive_moe,
    "lora_delta": drive_lora_delta,
}

_DTYPES_ALL = [
    ("fp16", "fp16"),
    ("bf16", "bf16"),
    ("fp32", "fp32"),
    ("fp16", "fp32"),
    ("bf16", "fp32"),
]

# Ranks that are not powers of two, in every family's rank axis of the whole matrix: R and the
# strides it sets (lora_b's rows, S's rows) get no divisibility hint, and the rank tiles are
# padded (7 -> 16, 40 -> 64, 100 -> 128, 200 -> 256, then capped per kernel).
ODD_RANKS = [7, 40, 100, 200]

# The whole matrix (benchmarks/triton_compile_report.py; 1,425 variants before the odd ranks,
# which add about 890 per target, 1,780 in all: a few hours on one core): aligned and odd K/N,
# M 1/16/64/4096, small, large and odd ranks, the common training
# path (fp32 adapters on bf16), fp16 and fp32 layers, deterministic and not, full and dB-only
# backward; merge over every dtype pair. Not the full product of every axis (hours).
FULL = {
    "lora_linear": {
        "kn": [(4096, 14336), (4099, 32001)],
        "m": [1, 16, 64, 4096],
        "r": [16, 64, 128, *ODD_RANKS],
        "dtypes": [("bf16", "fp32"), ("fp16", "fp16"), ("fp32", "fp32")],
        "bias": [True],
        "x_lora": [False],
        "deterministic": [False, True],
        "needs": ["xab", "b"],
    },
    "lora_multi": {
        "kn": [(4096, 4096), (4099, 32001)],
        "m": [1, 4096],
        "r": [16, 128, *ODD_RANKS],
        "adapters": 4,
        "dtypes": [("bf16", "fp32"), ("fp16", "fp16"), ("fp32", "fp32")],
        "id_dtypes": [torch.int64],
        "strategies": ["gather", "grouped"],
        "ranks": [True],
        "deterministic": [False, True],
    },
    "merge": {
        "kn": [(4096, 4096), (4099, 32001)],
        "r": [16, 128, *ODD_RANKS],
        "dtypes": _DTYPES_ALL,
    },
    "dora": {
        "kn": [(4096, 14336), (4099, 32001)],
        "m": [1, 4096],
        "r": [16, 128, *ODD_RANKS],
        "dtypes": [("bf16", "fp32"), ("fp16", "fp16"), ("fp32", "fp32")],
        "x_lora": [False, True],
        "deterministic": [False, True],
    },
    "qlora": {
        "kn": [(4096, 14336), (4099, 32001)],
        "m": [1, 16, 4096],
        "r": [16, 128, *ODD_RANKS],
        "dtypes": [("bf16", "fp32"), ("fp16", "fp16"), ("fp32", "fp32")],
        "nested": [True],
        "x_lora": [False],
    },
    "lora_embedding": {
        "vd": [(32000, 4096), (32001, 4099)],
        "m": [1, 4096],
        "r": [16, 128, *ODD_RANKS],
        "adapters": 2,
        "dtypes": [("bf16", "fp32"), ("fp16", "fp16"), ("fp32", "fp32")],
        "row_ids": [False, True],
        "deterministic": [False, True],
    },
    # Qwen3-30B-A3B-like experts (hidden 2048, intermediate 768, 128 experts, top-8), odd sizes
    "moe": {
        "shapes": [(2048, 768, 128, 8), (2051, 769, 8, 2)],
        "t": [1, 16, 4096],
        "r": [16, 64, *ODD_RANKS],
        "adapters": [1, 4],
        "dtypes": [("bf16", "fp32"), ("fp16", "fp16"), ("fp32", "fp32")],
    },
    # the serving engines' shrink / expand: gather (M 1, 16), grouped (300) and grouped_tall
    "lora_delta": {
        "kn": [(4096, 4096), (4099, 32001)],
        "m": [1, 16, 300, 4096],
        "r": [16, 128, *ODD_RANKS],
        "adapters": 4,
        "dtypes": [("bf16", "fp32"), ("fp16", "fp16"), ("fp32", "fp32")],
        "ranks": [True],
        "add_inputs": [True, False],
    },
}

# The CI subset (tests/test_triton_compile.py, about 60 compiles): the common training path
# (fp32 adapters on a bf16 base: with the precision policy its dots are those of bf16 adapters),
# decode and prefill M, rank 16 and 64 (the largest the decode GEMM fuses, BLOCK_R 64), odd K/N
# (no divisibility hints: the most register-hungry variants); one odd rank, 40, in the
# multi-adapter family (its grouped shrink took a narrower rank block for it): rank 40 in every
# family would add about 70 % to the subset's compile time, over its budget of about 150 s.
QUICK = {
    "lora_linear": {
        "kn": [(4099, 32001)],
        "m": [16, 4096],
        "r": [16, 64],
        "dtypes": [("bf16", "fp32")],
        "bias": [True],
        "x_lora": [False],
        "deterministic": [False],
        "needs": ["xab"],
    },
    "lora_multi": {
        "kn": [(4096, 4096)],
        "m": [4096],
        "r": [16, 40],
        "adapters": 4,
        "dtypes": [("bf16", "fp32")],
        "id_dtypes": [torch.int32],
        "strategies": ["gather", "grouped"],
        "ranks": [True],
    },
    "merge": {
        "kn": [(4096, 4096)],
        "r": [16],
        "dtypes": [("bf16", "fp32")],
    },
    "dora": {
        "kn": [(4099, 32001)],
        "m": [4096],
        "r": [16],
        "dtypes": [("bf16", "fp32")],
        "x_lora": [False],
        "deterministic": [False],
    },
    "qlora": {
        "kn": [(4096, 4096), (4099, 32001)],  # even K: the decode kernel; odd K: the fused one
        "m": [1, 4096],
        "r": [16],
        "dtypes": [("bf16", "fp32")],
        "nested": [True],
        "x_lora": [False],
    },
    "lora_embedding": {
        "vd": [(32001, 4099)],
        "m": [4096],
        "r": [16],
        "adapters": 2,
        "dtypes": [("bf16", "fp32")],
        "row_ids": [True],
    },
    "moe": {
        "shapes": [(2048, 768, 128, 8)],
        "t": [16, 512],
        "r": [16],
        "adapters": [1, 4],
        "dtypes": [("bf16", "fp32")],
    },
    # the grouped expand on odd N, fp32 adapters on bf16 y: the tile that needed maxnreg
    "lora_delta": {
        "kn": [(4099, 32001)],
        "m": [300],
        "r": [16],
        "adapters": 4,
        "dtypes": [("bf16", "fp32")],
        "ranks": [True],
        "add_inputs": [False],
    },
}


def with_axis(matrix: dict, axis: str, values: list) -> dict:
    """``matrix`` with ``axis`` replaced by ``values`` in every family that has it (e.g. the rank
    axis ``"r"`` by ``ODD_RANKS``)."""
    return {
        family: {**axes, axis: list(values)} if axis in axes else axes
        for family, axes in matrix.items()
    }


def capture(family: str, capability: int, matrix: dict) -> list[Launch]:
    """Every launch the family's launchers issue for ``matrix`` on the target's GPU."""
    twin = _load_twin(family, TARGETS[capability]["sms"])
    cap = _Capture(twin, capability)
    # Every launch must run under the launchers' device guard: stand in for it to see that.
    from lora_kernels.backends.triton import on_input_device

    guard_globals = on_input_device.__globals__
    real_guard = guard_globals["device_guard"]
    guard_globals["device_guard"] = cap.guard
    try:
        DRIVERS[family](twin, cap, matrix[family])
    finally:
        guard_globals["device_guard"] = real_guard
    return list(cap.variants.values())


def run_gate(
    matrix: dict,
    capabilities: Iterable[int] = (80, 90),
    families: Iterable[str] | None = None,
    progress: Callable | None = None,
) -> list[Result]:
    """Capture and compile ``matrix`` for each target; the results, pass or fail."""
    results = []
    for capability in capabilities:
        for family in families or LAUNCHER_MODULES:
            launches = capture(family, capability, matrix)
            results += compile_launches(family, launches, capability, progress)
    return results


def main() -> int:  # pragma: no cover - a command-line convenience
    results = run_gate(QUICK, progress=lambda r: print(r, file=sys.stderr))
    bad = [f for r in results for f in findings(r)]
    print("\n".join(bad) or f"{len(results)} variants, all pass")
    return 1 if bad else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
