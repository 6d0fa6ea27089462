"""lora_kernels as an SGLang LoRA backend: every kernel method against SGLang's own torch backend
(``torch_native``) on the same random pool and batch, both held to an fp64 computation of the
formulas (each may err at most twice the other's error plus the dtype's floor); decode CUDA-graph
metadata; registration by entry point, by name, on the command line, and the off switch."""

from __future__ import annotations

import importlib.metadata
import types

import pytest
import torch

sglang = pytest.importorskip("sglang")

from sglang.srt.lora.backend import lora_registry  # noqa: E402
from sglang.srt.lora.backend.torch_backend import (  # noqa: E402
    TorchNativeLoRABackend,
    TorchNativeLoRABatchInfo,
)
from sglang.srt.model_executor.forward_batch_info import ForwardMode  # noqa: E402

from lora_kernels.integrations import sglang as lk_sglang  # noqa: E402
from tests.tolerances import assert_close_to_ref  # noqa: E402

MAX_LORAS = 4
RANKS = [8, 0, 5, 3]  # slot 1 has rank 0: SGLang's slot for requests without an adapter
SCALINGS = [0.5, 0.0, 2.0, 1.25]
K, R_MAX = 24, 8

# (slot per request, tokens per request)
PREFILL = ([2, 1, 0, 0, 3, 2], [5, 2, 9, 1, 4, 3])  # ragged, a base-only request, repeats
DECODE = ([0, 1, 3, 2, 2, 1, 0], [1] * 7)
CASES = {"prefill": (PREFILL, ForwardMode.EXTEND), "decode": (DECODE, ForwardMode.DECODE)}


def _forward_batch(case, mode):
    slots, lens = case
    return types.SimpleNamespace(
        forward_mode=mode,
        batch_size=len(slots),
        extend_seq_lens=torch.tensor(lens, dtype=torch.int32),
        extend_seq_lens_cpu=list(lens),
        extend_num_tokens=sum(lens),
    )


def _torch_native_batch(case):
    """What TorchNativeLoRABackend.prepare_lora_batch builds outside CUDA graphs (it pins host
    memory, which needs a GPU): consecutive requests of one slot merged into a segment."""
    slots, lens = case
    merged: list[list[int]] = []
    for a, n in zip(slots, lens, strict=True):
        if merged and merged[-1][0] == a:
            merged[-1][1] += n
        else:
            merged.append([a, n])
    w = torch.tensor([a for a, _ in merged], dtype=torch.int32)
    seg = torch.tensor([n for _, n in merged], dtype=torch.int32)
    indptr = torch.zeros(len(merged) + 1, dtype=torch.int32)
    indptr[1:] = torch.cumsum(seg, 0)
    ranks = torch.tensor(RANKS, dtype=torch.int32)
    scal = torch.tensor(SCALINGS, dtype=torch.float32)
    return TorchNativeLoRABatchInfo(
        use_cuda_graph=False, bs=len(slots), num_segments=len(merged), seg_indptr=indptr,
        weight_indices=w, lora_ranks=ranks, scalings=scal, max_len=int(seg.max()),
        seg_lens=seg, lora_ranks_cpu=ranks, seg_indptr_cpu=indptr, seg_lens_cpu=seg,
        weight_indices_cpu=w, scalings_cpu=scal,
    )  # fmt: skip


def _pair(case_name):
    case, mode = CASES[case_name]
    ours = lk_sglang.LoraKernelsLoRABackend(MAX_LORAS, torch.device("cpu"))
    ours.prepare_lora_batch(_forward_batch(case, mode), case[0], RANKS, SCALINGS, False)
    theirs = TorchNativeLoRABackend(MAX_LORAS, torch.device("cpu"))
    theirs.batch_info = _torch_native_batch(case)
    token_slots = [a for a, n in zip(*case, strict=True) for _ in range(n)]
    return ours, theirs, token_slots


def _pool_a(c, dtype):
    """The pool's stacked A: slice j of slot a in rows j*r_a .. (j+1)*r_a; the rows past c*r_a
    hold another adapter's leftovers, which no kernel may read."""
    return torch.randn(MAX_LORAS, c * R_MAX, K, dtype=dtype) / K**0.5


def _ref_a(x, w, c, token_slots):
    out = torch.zeros(x.shape[0], w.shape[1], dtype=torch.float64)
    for i, a in enumerate(token_slots):
        r = RANKS[a]
        out[i, : c * r] = SCALINGS[a] * (x[i].double() @ w[a, : c * r].double().T)
    return out


def _ref_b(s, w, offsets, token_slots, base):
    out = base.double().clone()
    for i, a in enumerate(token_slots):
        r = RANKS[a]
        for j in range(len(offsets) - 1):
            lo, hi = offsets[j], offsets[j + 1]
            out[i, lo:hi] += s[i, j * r : (j + 1) * r].double() @ w[a, lo:hi, :r].double().T
    return out


def _both_close(name, ours, theirs, ref):
    assert_close_to_ref(f"{name} (lora_kernels)", ours, ref, theirs)
    assert_close_to_ref(f"{name} (SGLang torch_native)", theirs, ref, ours)


DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("c", [1, 3])
def test_run_lora_a_sgemm(dtype, case, c):
    ours, theirs, token_slots = _pair(case)
    x = torch.randn(len(token_slots), K, dtype=dtype)
    w = _pool_a(c, dtype)
    outs = [b.run_lora_a_sgemm(x, w, stack_num=c) for b in (ours, theirs)]
    _both_close("run_lora_a_sgemm", *outs, _ref_a(x, w, c, token_slots))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("with_base", [True, False])
def test_run_lora_b_sgemm(dtype, case, with_base):
    ours, theirs, token_slots = _pair(case)
    m, n = len(token_slots), 30
    s = torch.randn(m, R_MAX, dtype=dtype)
    w = torch.randn(MAX_LORAS, n, R_MAX, dtype=dtype) / R_MAX**0.5
    base = torch.randn(m, n, dtype=dtype)
    offsets = torch.tensor([0, n], dtype=torch.int32)
    outs = []
    for b in (ours, theirs):
        y = base.clone() if with_base else None
        outs.append(b.run_lora_b_sgemm(s, w, offsets, base_output=y))
    ref = _ref_b(s, w, [0, n], token_slots, base if with_base else torch.zeros(m, n))
    _both_close("run_lora_b_sgemm", *outs, ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_run_qkv_lora(dtype, case):
    ours, theirs, token_slots = _pair(case)
    m, q, kv = len(token_slots), 32, 16
    offsets = [0, q, q + kv, q + 2 * kv]
    x = torch.randn(m, K, dtype=dtype)
    wa = _pool_a(3, dtype)
    wb = torch.randn(MAX_LORAS, q + 2 * kv, R_MAX, dtype=dtype) / R_MAX**0.5
    base = torch.randn(m, q + 2 * kv, dtype=dtype)
    off_cpu = torch.tensor(offsets, dtype=torch.int32)
    outs = [
        b.run_qkv_lora(
            x=x, qkv_lora_a=wa, qkv_lora_b=wb, output_offset=off_cpu, output_offset_cpu=off_cpu,
            max_qkv_out_dim=q, base_output=base.clone(),
        )
        for b in (ours, theirs)
    ]  # fmt: skip
    ref = _ref_b(_ref_a(x, wa, 3, token_slots), wb, offsets, token_slots, base)
    _both_close("run_qkv_lora", *outs, ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_run_gate_up_lora(dtype, case):
    ours, theirs, token_slots = _pair(case)
    m, n = len(token_slots), 20
    offsets = [0, n, 2 * n]
    x = torch.randn(m, K, dtype=dtype)
    wa = _pool_a(2, dtype)
    wb = torch.randn(MAX_LORAS, 2 * n, R_MAX, dtype=dtype) / R_MAX**0.5
    base = torch.randn(m, 2 * n, dtype=dtype)
    off_cpu = torch.tensor(offsets, dtype=torch.int32)
    outs = [
        b.run_gate_up_lora(
            x=x, gate_up_lora_a=wa, gate_up_lora_b=wb, output_offset=off_cpu,
            output_offset_cpu=off_cpu, base_output=base.clone(),
        )
        for b in (ours, theirs)
    ]  # fmt: skip
    ref = _ref_b(_ref_a(x, wa, 2, token_slots), wb, offsets, token_slots, base)
    _both_close("run_gate_up_lora", *outs, ref)


@pytest.mark.parametrize("case", CASES)
def test_run_lora_a_embedding(case):
    ours, theirs, token_slots = _pair(case)
    vocab = 40
    ids = torch.randint(0, vocab, (len(token_slots),))
    w = torch.randn(MAX_LORAS, R_MAX, vocab)
    outs = [b.run_lora_a_embedding(ids, w, vocab) for b in (ours, theirs)]
    ref = torch.zeros(len(token_slots), R_MAX, dtype=torch.float64)
    for i, a in enumerate(token_slots):
        r = RANKS[a]
        ref[i, :r] = SCALINGS[a] * w[a, :r, ids[i]].double()
    _both_close("run_lora_a_embedding", *outs, ref)


def test_decode_cuda_graph_metadata_is_refilled_in_place():
    """A captured graph reads the same buffers every step: a smaller batch refills them, and the
    padded rows past it get no adapter."""
    ours = lk_sglang.LoraKernelsLoRABackend(MAX_LORAS, torch.device("cpu"))
    ours.init_decode_cuda_graph_batch_info(max_bs_in_cuda_graph=8, num_tokens_per_req=1)
    buffer = ours.token_ids if ours.token_ids is not None else ours._graph_token_ids
    for slots in (DECODE[0], [3, 2]):
        fb = _forward_batch((slots, [1] * len(slots)), ForwardMode.DECODE)
        ours.prepare_lora_batch(fb, slots, RANKS, SCALINGS, True)
        assert ours.token_ids is buffer and ours.batch_info is ours.cuda_graph_batch_info
        x = torch.randn(8, K)  # the graph's padded batch
        w = _pool_a(1, torch.float32)
        out = ours.run_lora_a_sgemm(x, w)
        padded = slots + [1] * (8 - len(slots))  # rank-0 slot: what the padding must act as
        assert_close_to_ref("graph rows", out, _ref_a(x, w, 1, padded), out)
        assert torch.equal(out[len(slots) :], torch.zeros(8 - len(slots), R_MAX))


def test_entry_point_is_found():
    eps = importlib.metadata.entry_points(group="sglang.srt.plugins")
    ours = [ep for ep in eps if ep.name == "lora_kernels"]
    assert [ep.value for ep in ours] == ["lora_kernels.integrations.sglang:register"]
    assert ours[0].load() is lk_sglang.register


@pytest.fixture
def clean_registry():
    saved = dict(lora_registry.LORA_SUPPORTED_BACKENDS)
    yield
    lora_registry.LORA_SUPPORTED_BACKENDS.clear()
    lora_registry.LORA_SUPPORTED_BACKENDS.update(saved)


def test_plugin_registers_the_backend_and_the_cli_choice(clean_registry, monkeypatch):
    import sglang.srt.plugins as plugins
    from sglang.srt.server_args import prepare_server_args

    monkeypatch.delenv("LORA_KERNELS_SGLANG", raising=False)
    lora_registry.LORA_SUPPORTED_BACKENDS.pop("lora_kernels", None)
    monkeypatch.setattr(plugins, "_plugins_loaded", False)
    plugins.load_plugins()  # what SGLang's processes do before parsing arguments
    cls = lora_registry.get_backend_from_name("lora_kernels")
    assert cls is lk_sglang.LoraKernelsLoRABackend
    args = prepare_server_args(["--model-path", "m", "--lora-backend", "lora_kernels"])
    assert args.lora_backend == "lora_kernels"
    lk_sglang.register()  # again: safe
    assert lora_registry.get_backend_from_name("lora_kernels") is cls


def test_off_switch(clean_registry, monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_SGLANG", "0")
    lora_registry.LORA_SUPPORTED_BACKENDS.pop("lora_kernels", None)
    lk_sglang.register()
    with pytest.raises(ValueError, match="Invalid backend"):
        lora_registry.get_backend_from_name("lora_kernels")
