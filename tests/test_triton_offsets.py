"""Address arithmetic of the multi-adapter kernels in 64 bits, checked on the compiled IR.

The backward's dx launch reads the weight transposed: the fused kernel's K axis walks the
weight's rows, whose stride is its row length, and ``k * stride`` in int32 wraps once the weight
has 2**31 elements (N = 139264, K = 16384: a large vocabulary head). No test here can allocate
such a weight, so this one looks at what the compiler is given: the launchers' real launches,
captured by the compile gate for sm_90, lowered to Triton IR, in which every integer tensor
product (each one an element offset: ``index * stride``) must be an i64 product.
"""

from __future__ import annotations

import os
import re

import pytest
import torch

triton = pytest.importorskip("triton")

from lora_kernels.backends.triton import compile_gate as gate  # noqa: E402

# A tensor-valued integer multiply of the TTIR and its element type.
_TENSOR_MULI = re.compile(r"= arith\.muli .*: tensor<[0-9x]+x(i\d+)>")
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


def test_every_element_offset_is_a_64_bit_product(multi_launches):
    names = {v.kernel.__name__ for v in multi_launches}
    assert names == set(KERNELS), names
    # the dx launch: the weight read transposed (its K stride is not 1)
    assert any("bwd" in case for v in multi_launches for case in v.cases)
    narrow = {}
    for launch in multi_launches:
        with gate._compiler_mode():
            ttir = launch.build().asm["ttir"]
        widths = _TENSOR_MULI.findall(ttir)
        assert widths, f"{launch.kernel.__name__}: no offset products found in its TTIR"
        bad = [w for w in widths if w != "i64"]
        if bad:
            where = f"{launch.kernel.__name__} ({launch.cases[0]})"
            narrow[where] = f"{len(bad)} of {len(widths)} products in {sorted(set(bad))}"
    assert not narrow, narrow
