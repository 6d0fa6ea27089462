"""One traffic case per kernel family: build its inputs at a shape, run its Triton launcher
under :func:`tools.traffic.count` (CUDA tile configs), and report per operand.

Each function returns a :class:`tools.traffic.Report` whose operands carry the launcher's
argument names (x, weight, bias, lora_a, lora_b, y, s, ...). Inputs are fp16 random tensors (the
counts do not depend on the values, except where data picks addresses: adapter ids, token ids,
4-bit codes, which are drawn as a real call would see them).

From a shell (``TRITON_INTERPRET=1`` is set for you)::

    python -m tools.traffic_cases lora_linear --m 1 --k 4096 --n 4096 --r 16
    python -m tools.traffic_cases multi --m 16 --k 4096 --n 4096 --r 16 --distinct 8
    python -m tools.traffic_cases qlora --m 1 --k 4096 --n 4096 --r 16 --quant nf4
    python -m tools.traffic_cases embedding --m 16 --v 32000 --d 4096 --r 16
    python -m tools.traffic_cases dora --m 1 --k 4096 --n 4096 --r 16
    python -m tools.traffic_cases merge --k 4096 --n 4096 --r 16

``--sample P`` counts P programs per launch and scales (see ``tools/traffic.py``); ``--config i``
takes the i-th candidate config of autotuned launches.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from . import traffic  # noqa: E402

DTYPE = torch.float16


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(shape, g, dtype=DTYPE, scale=0.05):
    return (torch.randn(shape, generator=g) * scale).to(dtype)


def lora_linear(m, k, n, r, *, bias=True, dtype=DTYPE, sample=None, config=0, seed=0):
    """Single-adapter forward ``lora_linear_fwd``: y = x W^T + b + s (x A^T) B^T, and S."""
    from lora_kernels.backends.triton.lora_linear import lora_linear_fwd

    g = _gen(seed)
    x = _randn((m, k), g, dtype, 1.0)
    weight = _randn((n, k), g, dtype)
    b = _randn((n,), g, dtype) if bias else None
    lora_a = _randn((r, k), g, dtype)
    lora_b = _randn((n, r), g, dtype)
    with traffic.count(sample=sample, config=config) as t:
        y, s = lora_linear_fwd(x, weight, b, lora_a, lora_b, 0.5)
    ops = {"x": x, "weight": weight, "bias": b, "lora_a": lora_a, "lora_b": lora_b, "y": y, "s": s}
    return t.report(ops, traffic.compulsory_lora_linear(x, weight, b, lora_a, lora_b, y, s))


def adapter_ids(m: int, distinct: int, pool: int) -> torch.Tensor:
    """Row ids of a batch of ``m`` rows over ``distinct`` adapters spread evenly over a pool of
    ``pool`` slots (rows take them round-robin, so every present adapter has rows)."""
    if not 1 <= distinct <= min(m, pool):
        raise ValueError(f"distinct must be in [1, min(m={m}, pool={pool})], got {distinct}")
    slots = [(i * pool) // distinct for i in range(distinct)]
    return torch.tensor([slots[i % distinct] for i in range(m)], dtype=torch.int32)


def multi(
    m, k, n, r, *, distinct=1, pool=64, strategy="auto", dtype=DTYPE, sample=None, config=0, seed=0
):
    """Multi-adapter forward ``lora_linear_multi_fwd`` over a pool of ``pool`` adapters, of
    which ``distinct`` appear in the batch (``adapter_ids``); ``strategy`` gather / grouped /
    auto (the launcher's own choice)."""
    from lora_kernels.backends.triton.lora_multi import lora_linear_multi_fwd

    g = _gen(seed)
    pool = max(pool, distinct)
    x = _randn((m, k), g, dtype, 1.0)
    weight = _randn((n, k), g, dtype)
    b = _randn((n,), g, dtype)
    lora_a = _randn((pool, r, k), g, dtype)
    lora_b = _randn((pool, n, r), g, dtype)
    scales = torch.rand(pool, generator=g, dtype=torch.float32)
    ids = adapter_ids(m, distinct, pool)
    with traffic.count(sample=sample, config=config) as t:
        y, s = lora_linear_multi_fwd(x, weight, b, lora_a, lora_b, scales, ids, strategy=strategy)
    ops = {
        "x": x,
        "weight": weight,
        "bias": b,
        "lora_a": lora_a,
        "lora_b": lora_b,
        "scales": scales,
        "adapter_ids": ids,
        "y": y,
        "s": s,
    }
    want = traffic.compulsory_multi(x, weight, b, lora_a, lora_b, scales, ids, y, s)
    return t.report(ops, want)


# bitsandbytes' NF4 table (its ``get_4bit_type("nf4")``); FP4's is another 16 values, which only
# change the numbers, not the addresses.
_NF4 = [
    -1.0, -0.6961928, -0.5250731, -0.3949175, -0.2844414, -0.1847734, -0.0910500, 0.0,
    0.0795803, 0.1609302, 0.2461123, 0.3379152, 0.4407098, 0.5626170, 0.7229568, 1.0,
]  # fmt: skip
_FP4 = [
    0.0, 0.0052083, 0.6666667, 1.0, 0.3333333, 0.5, 0.1666667, 0.25,
    -0.0, -0.0052083, -0.6666667, -1.0, -0.3333333, -0.5, -0.1666667, -0.25,
]  # fmt: skip


def quantized_weight(n, k, *, quant="nf4", nested=True, blocksize=64, blocksize2=256, seed=0):
    """A bitsandbytes-layout 4-bit weight with random codes: ``(qweight uint8 [N*K/2, 1],
    absmax, code [16], absmax2, code2 [256], offset [1])`` (the last three None unless
    ``nested``, bitsandbytes' ``compress_statistics``)."""
    g = _gen(seed)
    blocks = -(-n * k // blocksize)
    qweight = torch.randint(0, 256, ((n * k + 1) // 2, 1), generator=g, dtype=torch.uint8)
    code = torch.tensor(_NF4 if quant == "nf4" else _FP4, dtype=torch.float32)
    if not nested:
        return qweight, torch.rand(blocks, generator=g) + 0.5, code, None, None, None
    absmax = torch.randint(0, 256, (blocks,), generator=g, dtype=torch.uint8)
    absmax2 = torch.rand(-(-blocks // blocksize2), generator=g) * 0.01
    code2 = torch.linspace(-1, 1, 256)
    offset = torch.tensor([0.03])
    return qweight, absmax, code, absmax2, code2, offset


def qlora(
    m, k, n, r, *, quant="nf4", nested=True, blocksize=64, dtype=DTYPE, sample=None, config=0,
    seed=0,
):  # fmt: skip
    """QLoRA forward ``qlora_linear_fwd`` over a packed NF4/FP4 weight (double-quantized
    block maxima by default, bitsandbytes' QLoRA setting)."""
    from lora_kernels.backends.triton.qlora import qlora_linear_fwd

    g = _gen(seed + 1)
    qweight, absmax, code, absmax2, code2, offset = quantized_weight(
        n, k, quant=quant, nested=nested, blocksize=blocksize, seed=seed
    )
    x = _randn((m, k), g, dtype, 1.0)
    b = _randn((n,), g, dtype)
    lora_a = _randn((r, k), g, dtype)
    lora_b = _randn((n, r), g, dtype)
    with traffic.count(sample=sample, config=config) as t:
        y, s = qlora_linear_fwd(
            x, qweight, absmax, code, absmax2, code2, offset, blocksize, 256, n,
            b, lora_a, lora_b, 0.5,
        )  # fmt: skip
    ops = {
        "x": x,
        "qweight": qweight,
        "absmax": absmax,
        "code": code,
        "absmax2": absmax2,
        "code2": code2,
        "offset": offset,
        "bias": b,
        "lora_a": lora_a,
        "lora_b": lora_b,
        "y": y,
        "s": s,
    }
    want = traffic.compulsory_qlora(
        x, qweight, absmax, code, absmax2, code2, offset, b, lora_a, lora_b, y, s
    )
    return t.report(ops, want)


def embedding(m, v, d, r, *, adapters=1, dtype=DTYPE, sample=None, config=0, seed=0):
    """Embedding forward ``lora_embedding_fwd``: ``m`` random token ids of a [v, d] table,
    rows over ``adapters`` adapters (one adapter: no per-row ids)."""
    from lora_kernels.backends.triton.lora_embedding import lora_embedding_fwd

    g = _gen(seed)
    ids = torch.randint(0, v, (m,), generator=g, dtype=torch.int64)
    weight = _randn((v, d), g, dtype)
    lora_a = _randn((adapters, r, v), g, dtype)
    lora_b = _randn((adapters, d, r), g, dtype)
    scales = [0.5] * adapters
    row_ids = adapter_ids(m, adapters, adapters) if adapters > 1 else None
    with traffic.count(sample=sample, config=config) as t:
        y, s = lora_embedding_fwd(ids, weight, lora_a, lora_b, scales, row_ids)
    ops = {
        "ids": ids,
        "row_ids": row_ids,
        "weight": weight,
        "lora_a": lora_a,
        "lora_b": lora_b,
        "y": y,
        "s": s,
    }
    if isinstance(scales, torch.Tensor):
        ops["scales"] = scales
    want = traffic.compulsory_embedding(ids, weight, lora_a, lora_b, scales, row_ids, y, s)
    return t.report(ops, want)


def dora(m, k, n, r, *, dtype=DTYPE, sample=None, config=0, seed=0):
    """DoRA forward ``dora_linear_fwd``: the LoRA GEMM for ``lin`` then ``y = g * lin + b``."""
    from lora_kernels.backends.triton.dora import dora_linear_fwd

    g = _gen(seed)
    x = _randn((m, k), g, dtype, 1.0)
    weight = _randn((n, k), g, dtype)
    b = _randn((n,), g, dtype)
    lora_a = _randn((r, k), g, dtype)
    lora_b = _randn((n, r), g, dtype)
    gvec = torch.rand(n, generator=g, dtype=torch.float32) + 0.5
    with traffic.count(sample=sample, config=config) as t:
        y, lin, s = dora_linear_fwd(x, weight, b, lora_a, lora_b, 0.5, None, gvec)
    ops = {
        "x": x,
        "weight": weight,
        "bias": b,
        "lora_a": lora_a,
        "lora_b": lora_b,
        "g": gvec,
        "y": y,
        "lin": lin,
        "s": s,
    }
    want = traffic.compulsory_dora(x, weight, b, lora_a, lora_b, gvec, y, lin, s)
    return t.report(ops, want)


def dora_norm(k, n, r, *, dtype=DTYPE, sample=None, config=0, seed=0):
    """DoRA's row norm ``dora_weight_norm`` (one pass over W, ||W||^2 in the same pass)."""
    from lora_kernels.backends.triton.dora import dora_weight_norm

    g = _gen(seed)
    weight = _randn((n, k), g, dtype)
    lora_a = _randn((r, k), g, dtype)
    lora_b = _randn((n, r), g, dtype)
    with traffic.count(sample=sample, config=config) as t:
        norm = dora_weight_norm(weight, lora_a, lora_b, 0.5, None)
    ops = {"weight": weight, "lora_a": lora_a, "lora_b": lora_b, "norm": norm}
    want = traffic.compulsory(
        reads={"weight": weight, "lora_a": lora_a, "lora_b": lora_b}, writes={"norm": norm}
    )
    return t.report(ops, want)


def merge(k, n, r, *, dtype=DTYPE, sample=None, config=0, seed=0):
    """``merge_``: weight += scale * lora_b @ lora_a, in place."""
    from lora_kernels.backends.triton.merge import merge_

    g = _gen(seed)
    weight = _randn((n, k), g, dtype)
    lora_a = _randn((r, k), g, dtype)
    lora_b = _randn((n, r), g, dtype)
    with traffic.count(sample=sample, config=config) as t:
        merge_(weight, lora_a, lora_b, 0.5)
    ops = {"weight": weight, "lora_a": lora_a, "lora_b": lora_b}
    return t.report(ops, traffic.compulsory_merge(weight, lora_a, lora_b))


CASES = {
    "lora_linear": lora_linear,
    "multi": multi,
    "qlora": qlora,
    "embedding": embedding,
    "dora": dora,
    "dora_norm": dora_norm,
    "merge": merge,
}


def main(argv=None) -> None:
    import argparse
    import json

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("case", choices=sorted(CASES))
    for name in ("m", "k", "n", "r", "v", "d", "distinct", "pool", "adapters"):
        p.add_argument(f"--{name}", type=int)
    p.add_argument("--strategy")
    p.add_argument("--quant", choices=["nf4", "fp4"])
    p.add_argument("--no-nested", dest="nested", action="store_false", default=None)
    p.add_argument("--sample", type=int)
    p.add_argument("--config", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    args = vars(p.parse_args(argv))
    case = args.pop("case")
    as_json = args.pop("json")
    fn = CASES[case]
    positional = {
        "lora_linear": "mknr",
        "multi": "mknr",
        "qlora": "mknr",
        "dora": "mknr",
        "embedding": "mvdr",
        "dora_norm": "knr",
        "merge": "knr",
    }[case]
    pos = [args.pop(c) for c in positional]
    if any(v is None for v in pos):
        p.error(f"{case} needs --{' --'.join(positional)}")
    kw = {k: v for k, v in args.items() if v is not None and k not in "mknrvd"}
    rep = fn(*pos, **kw)
    if as_json:
        print(json.dumps(rep.as_dict(), indent=1))
        return
    print(rep.table())
    for launch in rep.launches:
        meta = {k: v for k, v in launch["meta"].items() if k.startswith("BLOCK") or k == "GROUP_M"}
        print(f"{launch['kernel']} grid={launch['grid']} {meta}")


if __name__ == "__main__":
    main()
