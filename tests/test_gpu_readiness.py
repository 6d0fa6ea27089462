"""GPU-path defects checked without a GPU: launch inspection, build decisions, id caching."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
_JIT = runpy.run_path(str(ROOT / "lora_kernels" / "backends" / "cuda" / "build.py"))


# ---- CUDA build: PTX for newer GPUs, nvcc / torch CUDA mismatch ----------------------------


def test_default_archs_ship_ptx_of_the_newest():
    flags = _JIT["gencode_flags"](_JIT["DEFAULT_ARCHS"])
    assert "-gencode=arch=compute_80,code=sm_80" in flags
    assert "-gencode=arch=compute_90,code=sm_90" in flags
    # PTX (code=compute_XX) of the newest arch only: a newer GPU JIT-compiles it at load.
    ptx = [f for f in flags if ",code=compute_" in f]
    assert ptx == ["-gencode=arch=compute_90,code=compute_90"]


@pytest.mark.parametrize(
    ("mode", "torch_cuda", "nvcc", "build", "reason"),
    [
        ("auto", "12.4", "12.6", True, None),
        ("auto", "12.4", "11.8", False, "nvcc is CUDA 11.8 but torch was built with CUDA 12.4"),
        ("1", "12.4", "13.0", False, "nvcc is CUDA 13.0"),
        ("auto", None, "12.4", False, "no CUDA"),
        ("auto", "12.4", None, False, "nvcc was not found"),
        ("0", "12.4", "12.4", False, "LORA_KERNELS_BUILD_CUDA=0"),
    ],
)
def test_cuda_build_decision(mode, torch_cuda, nvcc, build, reason):
    got_build, got_reason = _JIT["cuda_build_decision"](mode, torch_cuda, nvcc)
    assert got_build is build
    if reason is None:
        assert got_reason is None
    else:
        assert reason in got_reason


def test_setup_skips_on_mismatch_in_auto_and_fails_in_1(monkeypatch, capsys):
    """setup.py's own logic with a mismatched nvcc: auto installs without the extension."""
    setup_src = (ROOT / "setup.py").read_text()
    assert '_JIT["cuda_build_decision"]' in setup_src and "_skip(mode, reason)" in setup_src
    namespace = {"__name__": "setup_under_test", "__file__": str(ROOT / "setup.py")}
    # Run setup.py's definitions only (not its final setup() call).
    body = setup_src.split("\n_extension, _build_ext = _cuda_extension()")[0]
    exec(compile(body, str(ROOT / "setup.py"), "exec"), namespace)
    cpp_ext = pytest.importorskip("torch.utils.cpp_extension")
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(cpp_ext, "CUDA_HOME", "/opt/cuda-11.8")
    namespace["_JIT"] = {**namespace["_JIT"], "nvcc_cuda_version": lambda home: "11.8"}
    monkeypatch.setenv("LORA_KERNELS_BUILD_CUDA", "auto")
    assert namespace["_cuda_extension"]() == (None, None)
    assert "nvcc is CUDA 11.8 but torch was built with CUDA 12.4" in capsys.readouterr().out
    monkeypatch.setenv("LORA_KERNELS_BUILD_CUDA", "1")
    with pytest.raises(RuntimeError, match="LORA_KERNELS_BUILD_CUDA=1, but nvcc is CUDA 11.8"):
        namespace["_cuda_extension"]()


# ---- Triton launches: device guard, deterministic dB-only backward -------------------------

triton = pytest.importorskip("triton")
from tools import compile_gate as gate  # noqa: E402

_ONE_LAYER = {
    "kn": [(4096, 4096)],
    "m": [16, 4096],
    "r": [16],
    "dtypes": [("bf16", "bf16")],
    "bias": [True],
    "x_lora": [False],
    "deterministic": [False],
    "needs": ["xab", "b"],
}


@pytest.mark.parametrize("family", ["lora_linear", "lora_multi", "merge"])
def test_every_triton_launch_is_device_guarded(family):
    """Triton launches on the current device: each launcher must make its tensors' current."""
    matrix = {
        "lora_linear": _ONE_LAYER,
        "lora_multi": {**gate.QUICK["lora_multi"], "dtypes": [("bf16", "bf16")]},
        "merge": gate.QUICK["merge"],
    }
    variants = gate.capture(family, 90, matrix)
    assert variants
    assert not [v.cases[0] for v in variants if v.unguarded]


def test_device_guard_selects_the_tensors_device():
    from lora_kernels.backends.triton import device_guard

    assert type(device_guard(torch.empty(1))).__name__ == "nullcontext"
    guard = device_guard(torch.empty(1, device="meta"))
    assert type(guard).__name__ == "nullcontext"
    if hasattr(torch.cuda, "device"):
        fake = type("T", (), {"device": torch.device("cuda", 1)})()
        guard = device_guard(fake)
        assert isinstance(guard, torch.cuda.device) and guard.idx == 1


@pytest.mark.parametrize("needs", ["b", "ab", "xab", "xa"])
def test_deterministic_backward_uses_no_atomics(needs):
    """Under torch.use_deterministic_algorithms no launch splits a reduction with atomics,
    whichever gradients are needed (the dB-only branch included)."""
    matrix = {"lora_linear": {**_ONE_LAYER, "deterministic": [True], "needs": [needs]}}
    bwd = [v for v in gate.capture("lora_linear", 90, matrix) if v.cases[0].startswith("bwd")]
    assert bwd
    for v in bwd:
        names = [p.name for p in v.kernel.params]
        spec = dict(zip(names, v.specialization, strict=True))
        for flag in ("ATOMIC_OUT", "HAS_OUT2"):
            if flag in spec:
                assert spec[flag] == ("constexpr", False), (flag, v.cases[0])


# ---- FusedLoraLinear(adapter_names=...): ids built once per distinct list ------------------


def test_mixed_batch_ids_are_built_once(monkeypatch):
    import lora_kernels.layers.linear as lk_nn

    layer = lk_nn.FusedLoraLinear(16, 8, backend="torch")
    for name in ("a", "b"):
        layer.add_adapter(name, r=4, lora_alpha=8)
        torch.nn.init.normal_(layer.lora_B[name].weight)
    seen = []
    real = lk_nn.lora_linear_multi

    def spy(*args, **kwargs):
        seen.append(args[6])
        return real(*args, **kwargs)

    monkeypatch.setattr(lk_nn, "lora_linear_multi", spy)
    x = torch.randn(3, 16)
    names = ["a", "__base__", "b"]
    with torch.no_grad():
        y1 = layer(x, adapter_names=names)
        y2 = layer(x, adapter_names=list(names))
        y3 = layer(x, adapter_names=["b", "a", "b"])
    assert seen[0] is seen[1]  # the same tensor: no new host-to-device copy
    assert seen[2] is not seen[0] and seen[2].tolist() != seen[0].tolist()
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    # each row still gets its own adapter
    for row, name in enumerate(["b", "a", "b"]):
        with torch.no_grad():
            layer.set_adapter(name)
            torch.testing.assert_close(y3[row], layer(x[row : row + 1])[0])
