"""Embedding LoRA (PEFT's ``lora.Embedding``): the ``lora_embedding`` kernels against the spec in
``reference.py`` (forward and gradients, odd sizes, every dtype, both backends), the ops,
``FusedLoraEmbedding`` against PEFT's layer on the same weights, and embedding targets in
``get_lora_model``, checkpoints (both ways), mixed batches and ``fuse``."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lora_kernels as lk
from lora_kernels import reference as ref
from lora_kernels.backends.triton import HAS_TRITON, interpreting
from lora_kernels.functional import lora_embedding, lora_embedding_multi
from lora_kernels.layers.embedding import FusedLoraEmbedding
from tests.optional import optional
from tests.test_model import logits, peft_model_of, tiny_llama, token_ids
from tests.tolerances import assert_close_to_ref

peft = optional("peft")


# CPU tensors: Triton runs them under its interpreter only (a GPU run tests the torch path here)
BACKENDS = ["torch"] + (["triton"] if HAS_TRITON and interpreting() else [])
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _stock(ids, w, a, b, scale):
    """What PEFT's ``lora.Embedding`` computes, in the inputs' own dtype (the baseline)."""
    base = F.embedding(ids, w)
    return (base + (F.embedding(ids, a.T) @ b.T) * scale).to(w.dtype)


def _inputs(v, d, r, m, dtype, *, pad=None, lora_fp32=False):
    w = torch.randn(v, d, dtype=dtype)
    adt = torch.float32 if lora_fp32 else dtype
    a = torch.randn(r, v, dtype=adt).requires_grad_()
    b = torch.randn(d, r, dtype=adt).requires_grad_()
    ids = torch.randint(0, v, (m,))
    if pad is not None and m > 1:
        ids[::3] = pad  # padding rows among the others, repeated ids too
    return ids, w, a, b


# ------------------------------------------------------------------------------------------
# kernels against the spec
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("v", "d", "r", "m"), [(1, 1, 1, 1), (7, 133, 7, 9), (133, 7, 16, 33), (61, 48, 3, 7)]
)
def test_forward_and_gradients_match_the_spec(backend, dtype, v, d, r, m):
    pad = v // 2 if v > 1 else None
    ids, w, a, b = _inputs(v, d, r, m, dtype, pad=pad)
    scale = 0.75
    y = lora_embedding(ids, w, a, b, scale, padding_idx=pad, backend=backend)
    ref64 = ref.lora_embedding(ids, w.double(), a.double(), b.double(), scale)
    assert_close_to_ref("y", y, ref64, _stock(ids, w, a.detach(), b.detach(), scale))
    dy = torch.randn_like(y)
    y.backward(dy)
    da64, db64 = ref.lora_embedding_backward(dy.double(), ids, a.double(), b.double(), scale, pad)
    # stock baseline: the same gradients through PEFT's ops in the dtype
    a2, b2 = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    base = F.embedding(ids, w)
    ((base + (F.embedding(ids, a2.T, pad) @ b2.T) * scale) * dy).sum().backward()
    assert_close_to_ref("dA", a.grad, da64, a2.grad)
    assert_close_to_ref("dB", b.grad, db64, b2.grad)
    if pad is not None:
        assert torch.all(a.grad[:, pad] == 0)  # padding rows give A no gradient
    unseen = sorted(set(range(v)) - set(ids.tolist()))
    assert torch.all(a.grad[:, unseen] == 0)  # sparse in A's columns


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_adapters_on_a_half_table_and_a_trainable_table(backend):
    ids, w, a, b = _inputs(29, 24, 4, 13, torch.bfloat16, pad=3, lora_fp32=True)
    w.requires_grad_()
    y = lora_embedding(ids, w, a, b, 2.0, padding_idx=3, backend=backend)
    assert y.dtype == torch.bfloat16
    ref64 = ref.lora_embedding(ids, w.double(), a.double(), b.double(), 2.0)
    assert_close_to_ref("y", y, ref64, _stock(ids, w.detach(), a.detach(), b.detach(), 2.0))
    y.float().sum().backward()
    expected = torch.zeros(29, 24, dtype=torch.bfloat16).index_add_(
        0, ids[ids != 3], torch.ones(int((ids != 3).sum()), 24, dtype=torch.bfloat16)
    )
    assert torch.equal(w.grad, expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_sequence", [False, True])
def test_multi_adapter_rows_forward_and_gradients(backend, per_sequence):
    v, d, num, r_max = 37, 21, 3, 5
    w = torch.randn(v, d)
    ranks = [5, 2, 3]
    a = torch.zeros(num, r_max, v)
    b = torch.zeros(num, d, r_max)
    for i, r in enumerate(ranks):
        a[i, :r] = torch.randn(r, v)
        b[i, :, :r] = torch.randn(d, r)
    a.requires_grad_()
    b.requires_grad_()
    scales = [0.5, 2.0, 1.25]
    if per_sequence:
        ids = torch.randint(0, v, (4, 6))
        adapter_ids = torch.tensor([2, -1, 0, 2])
        rows = adapter_ids.repeat_interleave(6)
    else:
        ids = torch.randint(0, v, (11,))
        adapter_ids = torch.tensor([0, 1, -1, 2, 1, 0, 0, -1, 2, 2, 1])
        rows = adapter_ids
    ids[..., 0] = 4
    y = lora_embedding_multi(ids, w, a, b, scales, adapter_ids, padding_idx=4, backend=backend)
    expected = ref.lora_embedding_multi(
        ids, w.double(), a.double(), b.double(), torch.tensor(scales), adapter_ids
    )
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(y)
    y.backward(dy)
    flat, dyf = ids.reshape(-1), dy.reshape(-1, d).double()
    for i in range(num):
        mine = rows == i
        da, db = ref.lora_embedding_backward(
            dyf[mine], flat[mine], a[i].double(), b[i].double(), scales[i], 4
        )
        torch.testing.assert_close(a.grad[i].double(), da, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b.grad[i].double(), db, rtol=1e-5, atol=1e-5)


class _AtomicLanes:
    """Counts the lanes of every atomic the Triton interpreter runs (masked lanes excluded)."""

    def __init__(self, monkeypatch):
        from triton.runtime import interpreter

        builder = interpreter.interpreter_builder
        original = builder.create_atomic_rmw
        self.lanes = 0

        def counting(op, ptr, val, mask, sem, scope):
            self.lanes += int(mask.data.sum())
            return original(op, ptr, val, mask, sem, scope)

        monkeypatch.setattr(builder, "create_atomic_rmw", counting)


def _triton_embedding():
    from lora_kernels.backends.triton import lora_embedding as launchers

    return launchers


def _mixed_adapters(v, d, num, r):
    w = torch.randn(v, d)
    a = torch.randn(num, r, v)
    b = torch.randn(num, d, r)
    return w, a, b, [0.5 + i for i in range(num)]


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs the Triton interpreter")
def test_triton_masks_ids_out_of_range():
    """What the checks cannot see on a GPU: a token id outside [0, V) gives a zero row and no
    gradient, an adapter id outside [0, L) acts as -1; no atomic lands for them."""
    launchers = _triton_embedding()
    v, d, num, r = 13, 10, 3, 4
    w, a, b, scales = _mixed_adapters(v, d, num, r)
    ids = torch.tensor([2, v, 5, -3, 7, 2, v + 40, 1])
    rows = torch.tensor([0, 1, 3, 2, 7, 1, 0, -1], dtype=torch.int32)
    # NaNs in the memory the output is likely to reuse: rows the kernel leaves unwritten show.
    junk = torch.full((ids.shape[0], d), float("nan"))
    del junk
    y, s = launchers.lora_embedding_fwd(ids, w, a, b, scales, rows)
    dy = torch.randn(ids.shape[0], d)
    da, db = launchers.lora_embedding_bwd(dy, ids, w, a, b, scales, rows, s)
    good = (ids >= 0) & (ids < v)
    runs = good & (rows >= 0) & (rows < num)
    clean_rows = torch.where(runs, rows, -1)[good]
    y_ref = ref.lora_embedding_multi(
        ids[good], w.double(), a.double(), b.double(), torch.tensor(scales), clean_rows
    )
    torch.testing.assert_close(y[good].double(), y_ref, rtol=1e-5, atol=1e-5)
    assert torch.all(y[~good] == 0) and torch.all(s[~runs] == 0)
    for i in range(num):
        mine = runs & (rows == i)
        da_i, db_i = ref.lora_embedding_backward(
            dy[mine].double(), ids[mine], a[i].double(), b[i].double(), scales[i]
        )
        torch.testing.assert_close(da[i].double(), da_i, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(db[i].double(), db_i, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs the Triton interpreter")
def test_triton_backward_skips_absent_adapters_and_bad_rows(monkeypatch):
    """dB atomics only for the adapters a block's rows run: a batch on one adapter among eight
    adds exactly as many lanes as the same batch with that adapter alone; rows with bad ids add
    none."""
    launchers = _triton_embedding()
    v, d, r, m = 11, 9, 3, 7
    w, a, b, _ = _mixed_adapters(v, d, 8, r)
    ids = torch.randint(0, v, (m,))
    dy = torch.randn(m, d)
    counter = _AtomicLanes(monkeypatch)

    def lanes(a_, b_, scales, rows, ids_=ids):
        _, s = launchers.lora_embedding_fwd(ids_, w, a_, b_, scales, rows)
        counter.lanes = 0
        launchers.lora_embedding_bwd(dy, ids_, w, a_, b_, scales, rows, s)
        return counter.lanes

    alone = lanes(a[5:6], b[5:6], [1.5], torch.zeros(m, dtype=torch.int32))
    among = lanes(a, b, [1.0] * 8, torch.full((m,), 5, dtype=torch.int32))
    assert alone == among > 0
    bad = torch.full((m,), v + 3)
    assert lanes(a, b, [1.0] * 8, torch.full((m,), 5, dtype=torch.int32), bad) == 0
    assert lanes(a, b, [1.0] * 8, torch.full((m,), 9, dtype=torch.int32)) == 0


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs the Triton interpreter")
@pytest.mark.parametrize("multi", [False, True])
def test_triton_backward_in_deterministic_mode_uses_no_atomics(monkeypatch, multi):
    v, d, r, m = 17, 12, 5, 19
    ids = torch.randint(0, v, (m,))
    ids[::4] = 3  # repeated ids (their A columns add up), some of them padding
    w = torch.randn(v, d)
    a = torch.randn(2, r, v, requires_grad=True)
    b = torch.randn(2, d, r, requires_grad=True)
    rows = torch.randint(-1, 2, (m,), dtype=torch.int32)
    dy = torch.randn(m, d)

    def grads(backend):
        a.grad = b.grad = None
        if multi:
            y = lora_embedding_multi(ids, w, a, b, [0.5, -2.0], rows, padding_idx=3,
                                     backend=backend)  # fmt: skip
        else:
            y = lora_embedding(ids, w, a[0], b[0], 0.5, padding_idx=3, backend=backend)
        y.backward(dy)
        return a.grad.clone(), b.grad.clone()

    expected = grads("torch")
    counter = _AtomicLanes(monkeypatch)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        got = grads("triton")
    finally:
        torch.use_deterministic_algorithms(prev)
    assert counter.lanes == 0
    for name, g, e in zip(("dA", "dB"), got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs the Triton interpreter")
def test_triton_launchers_build_no_tensor_from_host_scales_per_call(monkeypatch):
    """One adapter passes its scale as a kernel scalar; a mixed batch's scales table is built
    once and reused, so a decode step copies nothing from the host."""
    launchers = _triton_embedding()
    w, a, b, scales = _mixed_adapters(9, 6, 3, 2)
    ids = torch.randint(0, 9, (5,))
    rows = torch.tensor([0, 2, -1, 1, 2], dtype=torch.int32)
    _, s = launchers.lora_embedding_fwd(ids, w, a, b, scales, rows)  # warm-up builds the table
    calls = []
    real = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *x, **k: calls.append(x) or real(*x, **k))
    for row_ids, a_, b_, sc in ((rows, a, b, scales), (None, a[:1], b[:1], [0.5])):
        _, s = launchers.lora_embedding_fwd(ids, w, a_, b_, sc, row_ids)
        launchers.lora_embedding_bwd(torch.randn(5, 6), ids, w, a_, b_, sc, row_ids, s)
    assert calls == []


def test_bad_inputs_are_refused_clearly():
    ids, w, a, b = _inputs(10, 6, 2, 4, torch.float32)
    cases = [
        (
            (ids.float(), w, a, b, 1.0),
            TypeError,
            "expected ids of dtype torch.int32 or torch.int64",
        ),
        ((ids + 10, w, a, b, 1.0), ValueError, r"expected ids in \[0, 10\)"),
        (
            (ids, w, a[:, :5], b, 1.0),
            ValueError,
            r"expected lora_a of shape \[2, 10\], got \[2, 5\]",
        ),
        ((ids, w, a, b[:5], 1.0), ValueError, r"expected lora_b of shape \[6, 2\], got \[5, 2\]"),
        ((ids, w, a.half(), b.half(), 1.0), TypeError, "expected lora_a of dtype"),
        ((ids, w, a, b, float("nan")), ValueError, "expected a finite scale"),
        ((ids, w[0], a, b, 1.0), ValueError, r"expected weight of shape \[V, D\]"),
    ]
    for args, kind, match in cases:
        with pytest.raises(kind, match=match):
            lora_embedding(*args)
    with pytest.raises(ValueError, match=r"expected padding_idx in \[-10, 10\)"):
        lora_embedding(ids, w, a, b, 1.0, padding_idx=10)
    with pytest.raises(ValueError, match=r"expected adapter_ids of shape \[4\]"):
        lora_embedding_multi(ids, w, a[None], b[None], [1.0], torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"expected adapter_ids in \[-1, 1\)"):
        lora_embedding_multi(ids, w, a[None], b[None], [1.0], torch.full((4,), 1))
    zeros = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="expected scales to hold 1 floats"):
        lora_embedding_multi(ids, w, a[None], b[None], [1.0, 2.0], zeros)
    # the same messages for scales given as a tensor
    with pytest.raises(ValueError, match="expected scales to hold 1 floats"):
        lora_embedding_multi(ids, w, a[None], b[None], torch.tensor([1.0, 2.0]), zeros)
    with pytest.raises(ValueError, match=r"expected a finite scales\[0\]"):
        lora_embedding_multi(ids, w, a[None], b[None], torch.tensor([float("nan")]), zeros)
    with pytest.raises(TypeError, match="expected scales of a real dtype"):
        lora_embedding_multi(ids, w, a[None], b[None], torch.tensor([True]), zeros)


@pytest.mark.parametrize(("backend", "multi"), [(b, b != "torch") for b in BACKENDS])
def test_opcheck(backend, multi):
    ids, w, a, b = _inputs(12, 10, 3, 7, torch.float32, pad=2)
    a3, b3 = a.detach()[None].repeat(2, 1, 1), b.detach()[None].repeat(2, 1, 1)
    a3.requires_grad_()
    b3.requires_grad_()
    rows = torch.tensor([0, 1, -1, 1, 0, 0, 1], dtype=torch.int32) if multi else None
    scales = torch.tensor([0.5, 1.5]) if multi else None
    a_in, b_in = (a3, b3) if multi else (a3[:1], b3[:1])
    op = torch.ops.lora_kernels
    fwd = (ids, w, a_in, b_in, scales, 0.5, rows, 2, backend)
    torch.library.opcheck(op.lora_embedding_fwd, fwd)
    dy = torch.randn(7, 10)
    s = torch.randn(7, 3)
    args = (dy, ids, w, a_in.detach(), b_in.detach(), scales, 0.5, rows, s, 2, True, True, backend)
    torch.library.opcheck(op.lora_embedding_bwd, args)


def test_compile_fullgraph_forward_backward():
    layer = FusedLoraEmbedding(19, 12, padding_idx=0, r=3, init_lora_weights=False)
    ids = torch.randint(0, 19, (2, 5))

    def step(ids):
        return layer(ids).square().sum()

    loss = torch.compile(step, fullgraph=True, backend="aot_eager")(ids)
    loss.backward()
    got = layer.lora_embedding_A["default"].grad.clone()
    layer.zero_grad()
    step(ids).backward()
    torch.testing.assert_close(got, layer.lora_embedding_A["default"].grad)


# ------------------------------------------------------------------------------------------
# FusedLoraEmbedding against PEFT's lora.Embedding on the same weights
# ------------------------------------------------------------------------------------------


def _peft_embedding_pair(num=40, dim=16, r=4, alpha=8, padding_idx=None, **kw):
    base = nn.Embedding(num, dim, padding_idx=padding_idx)
    theirs = peft.tuners.lora.layer.Embedding(
        copy.deepcopy(base), "default", peft.LoraConfig(r=r, lora_alpha=alpha, **kw), r, alpha
    )
    ours = FusedLoraEmbedding.from_embedding(
        base, r=r, lora_alpha=alpha, use_rslora=kw.get("use_rslora", False)
    )
    with torch.no_grad():
        ours.lora_embedding_A["default"].normal_()
        ours.lora_embedding_B["default"].normal_()
        theirs.lora_embedding_A["default"].copy_(ours.lora_embedding_A["default"])
        theirs.lora_embedding_B["default"].copy_(ours.lora_embedding_B["default"])
    return ours, theirs


@pytest.mark.parametrize("use_rslora", [False, True])
def test_layer_matches_peft_forward_gradients_and_merge(use_rslora):
    ours, theirs = _peft_embedding_pair(padding_idx=1, use_rslora=use_rslora)
    assert ours.scaling == theirs.scaling
    ids = torch.randint(0, 40, (3, 9))
    ids[:, 0] = 1
    y_ours, y_theirs = ours(ids), theirs(ids)
    torch.testing.assert_close(y_ours, y_theirs)
    dy = torch.randn_like(y_ours)
    y_ours.backward(dy)
    y_theirs.backward(dy)
    for part in ("lora_embedding_A", "lora_embedding_B"):
        torch.testing.assert_close(
            getattr(ours, part)["default"].grad, getattr(theirs, part)["default"].grad
        )
    ours.merge()
    theirs.merge()
    torch.testing.assert_close(ours.weight, theirs.base_layer.weight)
    torch.testing.assert_close(ours(ids), y_theirs.detach())
    ours.unmerge()
    theirs.unmerge()
    torch.testing.assert_close(ours.weight, theirs.base_layer.weight)


def test_layer_init_exact_merge_and_adapter_management():
    base = nn.Embedding(30, 8).to(torch.bfloat16)
    layer = FusedLoraEmbedding.from_embedding(base, r=2)
    assert layer.weight is base.weight and not layer.weight.requires_grad
    a = layer.lora_embedding_A["default"]
    assert torch.all(a == 0) and layer.lora_embedding_B["default"].std() > 0.5  # PEFT's init
    ids = torch.randint(0, 30, (4, 3))
    assert torch.equal(layer(ids), base(ids))
    layer.add_adapter("two", 3, 6, init_lora_weights=False)
    before = layer.weight.detach().clone()
    layer.set_adapter("two")
    y = layer(ids)
    layer.merge(exact=True)
    assert_close_to_ref(
        "merged",
        layer(ids),
        ref.lora_embedding(
            ids,
            before.double(),
            layer.lora_embedding_A["two"].double(),
            layer.lora_embedding_B["two"].double(),
            2.0,
        ),
        y,
    )
    with pytest.raises(RuntimeError, match="unmerge"):
        layer.set_adapter("default")
    layer.unmerge()
    assert torch.equal(layer.weight, before)  # bit for bit
    layer.delete_adapter("two")
    assert layer.adapter_names == ["default"] and layer.active_adapter == "default"
    with pytest.raises(ValueError, match="unknown adapter 'two'"):
        layer.set_adapter("two")
    with pytest.raises(ValueError, match="max_norm=1.0"):
        FusedLoraEmbedding.from_embedding(nn.Embedding(5, 2, max_norm=1.0))


def test_layer_mixed_batch_matches_peft_adapter_names():
    ours, theirs = _peft_embedding_pair()
    theirs.update_layer("two", 2, 5, peft.LoraConfig(r=2, lora_alpha=5))
    ours.add_adapter("two", 2, 5, init_lora_weights=False)
    with torch.no_grad():
        theirs.lora_embedding_A["two"].copy_(ours.lora_embedding_A["two"])
        theirs.lora_embedding_B["two"].copy_(ours.lora_embedding_B["two"])
    ids = torch.randint(0, 40, (4, 6))
    names = ["two", "__base__", "default", "two"]
    torch.testing.assert_close(ours(ids, adapter_names=names), theirs(ids, adapter_names=names))
    with pytest.raises(ValueError, match="unknown adapter names"):
        ours(ids, adapter_names=["x"] * 4)


# ------------------------------------------------------------------------------------------
# models: get_lora_model, checkpoints both ways, mixed batches, fuse
# ------------------------------------------------------------------------------------------

EMB_TARGETS = ["embed_tokens", "q_proj"]


def _trained_peft_llama():
    model = peft_model_of(tiny_llama(), r=4, lora_alpha=8, target_modules=EMB_TARGETS)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    return model.eval()


def test_embed_tokens_target_both_ways_with_peft(tmp_path):
    theirs = _trained_peft_llama()
    theirs.save_pretrained(tmp_path / "peft")
    ours = lk.load_adapter(tiny_llama(), tmp_path / "peft")
    assert isinstance(ours.model.embed_tokens, FusedLoraEmbedding)
    ids = token_ids()
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids))
    lk.save_adapter(ours, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours")
    torch.testing.assert_close(logits(back, ids), logits(ours, ids))
    # PEFT writes the embedding table beside the adapter when embed_tokens is a target; so do we
    from safetensors.torch import load_file

    keys = set(load_file(tmp_path / "ours" / "adapter_model.safetensors"))
    assert keys == set(load_file(tmp_path / "peft" / "adapter_model.safetensors"))


def test_embed_tokens_training_gradients_and_mixed_batch_match_peft():
    theirs = _trained_peft_llama()
    ours = lk.get_lora_model(
        tiny_llama(), lk.LoraConfig(r=4, lora_alpha=8, target_modules=EMB_TARGETS)
    )
    with torch.no_grad():
        theirs_state = {
            k.removeprefix("base_model.model.").replace(".default", ""): v
            for k, v in theirs.state_dict().items()
            if "lora_" in k
        }
        for name, p in ours.named_parameters():
            key = name.replace(".default", "")
            if key in theirs_state:
                p.copy_(theirs_state[key])
    ids = token_ids()
    for model in (ours, theirs):
        model.train()
        model(ids, labels=ids).loss.backward()
    got = {n.replace(".default", ""): p.grad for n, p in ours.named_parameters() if p.requires_grad}
    want = {
        n.removeprefix("base_model.model.").replace(".default", ""): p.grad
        for n, p in theirs.named_parameters()
        if p.requires_grad
    }
    assert set(got) == set(want) and any("lora_embedding_A" in n for n in got)
    for name in got:
        torch.testing.assert_close(got[name], want[name], msg=name)
    # a second adapter, and a batch mixing both (PEFT's adapter_names)
    theirs.eval().add_adapter("two", peft.LoraConfig(r=2, target_modules=["embed_tokens"]))
    lk.get_lora_model(ours.eval(), lk.LoraConfig(r=2, target_modules=["embed_tokens"]), "two")
    with torch.no_grad():
        emb = theirs.base_model.model.model.embed_tokens
        emb.lora_embedding_A["two"].copy_(ours.model.embed_tokens.lora_embedding_A["two"])
        emb.lora_embedding_B["two"].copy_(ours.model.embed_tokens.lora_embedding_B["two"])
    names = ["two", "default"]
    with torch.no_grad(), lk.mixed_batch(ours, names):
        mixed = ours(ids).logits
    with torch.no_grad():
        expected = theirs(ids, adapter_names=names).logits
    torch.testing.assert_close(mixed, expected)


def test_fuse_runs_peft_embeddings_on_the_kernel(monkeypatch):
    integration = pytest.importorskip("lora_kernels.integrations.peft", exc_type=ImportError)
    calls = []
    real = integration.lora_embedding
    monkeypatch.setattr(
        integration, "lora_embedding", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    theirs = _trained_peft_llama()
    fused = integration.fuse(copy.deepcopy(theirs))
    emb = fused.base_model.model.model.embed_tokens
    assert type(emb) is integration.FusedPeftEmbedding
    assert isinstance(emb, peft.tuners.lora.layer.Embedding)
    assert repr(emb).startswith("lora.Embedding(")
    ids = token_ids()
    torch.testing.assert_close(logits(fused, ids), logits(theirs, ids))
    assert calls == [1]
    for model in (fused, theirs):
        model.train()
        model(ids, labels=ids).loss.backward()
    a_f = emb.lora_embedding_A["default"].grad
    a_t = theirs.base_model.model.model.embed_tokens.lora_embedding_A["default"].grad
    torch.testing.assert_close(a_f, a_t)
