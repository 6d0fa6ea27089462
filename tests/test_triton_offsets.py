"""Address arithmetic of the multi-adapter kernels in 64 bits, checked on the compiled IR.

The backward's dx launch reads the weight transposed: the fused kernel's K axis walks the
weight's rows, whose stride is its row length, and ``k * stride`` in int32 wraps once the weight
has 2**31 elements (N = 139264, K = 16384: a large vocabulary head). No test here can allocate
such a weight, so this one looks at what the compiler is given: the launchers' real launches,
captured by the compile gate for sm_90, lowered to Triton IR, in which every element offset
whose index grows with the problem (a K or N position, a row: anything computed from a program
id or a loop variable) must be an int64 product. Offsets within a tile (``tl.arange`` times a
stride) may stay int32; the loops advance their pointers instead.
"""

from __future__ import annotations

import os
import re

import pytest
import torch

triton = pytest.importorskip("triton")

from tools import compile_gate as gate  # noqa: E402

# One SSA definition of the TTIR: its name (``%x`` or ``%x:3``), its op and the rest of the line.
_DEF = re.compile(r"^\s*(%[\w.]+)(?::\d+)?\s*=\s*([\w.]+)(.*)$")
_TENSOR_I32 = re.compile(r": tensor<[0-9x]+xi32>")


def _unbounded_i32_products(ttir: str) -> list[str]:
    """The int32 tensor products of ``ttir`` that depend on a program id or on a loop's
    induction or carried value: an element offset whose index grows with the problem (a K or N
    position, a row), where int32 can wrap. Products of ``tl.arange`` ranges by strides (tile
    extents, at most a few hundred) are bounded and allowed."""
    defs: dict[str, list[str]] = {}
    unbounded: set[str] = set()
    products = []
    for line in ttir.splitlines():
        if "scf.for " in line:
            unbounded.update(re.findall(r"scf\.for (%[\w.]+) =", line))
        if "scf.for " in line or "scf.while " in line:
            unbounded.update(re.findall(r"(%[\w.]+) = %", line.split(" = ", 1)[1]))
        if line.lstrip().startswith("^bb"):
            unbounded.update(re.findall(r"(%[\w.]+):", line))
        found = _DEF.match(line)
        if found is None:
            continue
        name, op, rest = found.groups()
        defs[name] = re.findall(r"%[\w.]+", rest.split(" loc(")[0])
        if op == "tt.get_program_id":
            unbounded.add(name)
        if op == "arith.muli" and _TENSOR_I32.search(rest):
            products.append((name, line.strip()))

    def reaches(name, seen):
        if name in unbounded:
            return True
        seen.add(name)
        return any(reaches(o, seen) for o in defs.get(name, ()) if o not in seen)

    return [line for name, line in products if reaches(name, set())]


KERNELS = ("_lora_multi_fused_kernel", "_lora_shrink_gather_kernel", "_lora_shrink_grouped_kernel")


@pytest.fixture(scope="module")
def multi_launches(tmp_path_factory):
    """Every launch of one decode-sized forward and backward, per strategy (sm_90)."""
    old = os.environ.get("TRITON_CACHE_DIR")
    os.environ["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton_cache"))
    matrix = {
        "lora_multi": {
            "kn": [(4096, 4096)],
            "m": [16],
            "r": [16],
            "adapters": 4,
            "dtypes": [("fp16", "fp16")],
            "id_dtypes": [torch.int32],
            "strategies": ["gather", "grouped"],
            "ranks": [True],
        }
    }
    try:
        yield [v for v in gate.capture("lora_multi", 90, matrix) if v.kernel.__name__ in KERNELS]
    finally:
        if old is None:
            os.environ.pop("TRITON_CACHE_DIR", None)
        else:
            os.environ["TRITON_CACHE_DIR"] = old


def test_offsets_that_grow_with_the_problem_are_64_bit(multi_launches):
    names = {v.kernel.__name__ for v in multi_launches}
    assert names == set(KERNELS), names
    # the dx launch: the weight read transposed (its K stride is not 1)
    assert any("bwd" in case for v in multi_launches for case in v.cases)
    narrow = {}
    for launch in multi_launches:
        with gate._compiler_mode():
            ttir = launch.build().asm["ttir"]
        assert "arith.muli" in ttir, f"{launch.kernel.__name__}: no products in its TTIR"
        bad = _unbounded_i32_products(ttir)
        if bad:
            narrow[f"{launch.kernel.__name__} ({launch.cases[0]})"] = bad
    assert not narrow, narrow


def test_the_check_finds_an_int32_loop_offset():
    """The analysis on a hand-written fragment: ``(k0 + arange) * stride`` in int32 is found,
    ``arange * stride`` and an int64 product are not."""
    ttir = """
    tt.func public @k(%w_ptr: !tt.ptr<f16>, %stride_wk: i32) {
      %r = tt.make_range {end = 64 : i32, start = 0 : i32} : tensor<64xi32> loc(#l)
      %s = tt.splat %stride_wk : i32 -> tensor<64xi32> loc(#l)
      %ok = arith.muli %r, %s : tensor<64xi32> loc(#l)
      %w:1 = scf.for %k0 = %c0_i32 to %K step %c64_i32 iter_args(%acc = %z) -> (f32) : i32 {
        %k0s = tt.splat %k0 : i32 -> tensor<64xi32> loc(#l)
        %koffs = arith.addi %k0s, %r : tensor<64xi32> loc(#l)
        %bad = arith.muli %koffs, %s : tensor<64xi32> loc(#l)
        %k64 = arith.extsi %koffs : tensor<64xi32> to tensor<64xi64> loc(#l)
        %wide = arith.muli %k64, %k64 : tensor<64xi64> loc(#l)
      }
    }
    """
    found = _unbounded_i32_products(ttir)
    assert len(found) == 1 and found[0].startswith("%bad"), found
