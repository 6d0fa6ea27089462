#!/usr/bin/env bash
# The engines venv: vLLM 0.34 and SGLang 0.5.23 beside lora_kernels, for tests/engines/.
#
#   .ci/engines_setup.sh VENV        (default: ~/.cache/lora_kernels/engines-venv, outside the tree)
#
# Both engines' wheels come from the registry, but not all of their GPU-only dependencies do
# (flashinfer, sglang-kernel, cutlass-dsl, ...), and nothing of them runs without a GPU anyway.
# So each wheel goes in with --no-deps, and beside it the pure-Python packages that their LoRA
# modules, plugin loaders and argument tables import. One venv holds both engines: their pins
# agree on transformers 5.19 and tokenizers 0.23.2; they differ on torch (vLLM 2.14.0, SGLang
# 2.14.1), and torch 2.14.1 is the build this machine keeps on disk. vLLM's compiled ops are never
# loaded here (VLLM_TARGET_DEVICE=cpu: its CPU platform runs torch ops). lora_kernels goes in with
# LORA_KERNELS_BUILD_CUDA=0: torch 2.14 is a CUDA build and nvcc is on the PATH, and the
# extension is not what these tests check.
#
# Idempotent: a venv whose stamp matches this script's package list is left as it is; any other
# venv at that path is completed in place (pip skips what is already there).
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${1:-${XDG_CACHE_HOME:-$HOME/.cache}/lora_kernels/engines-venv}"
python="${LORA_KERNELS_ENGINES_PYTHON:-python3.11}"

ENGINES=(vllm==0.34.0 sglang==0.5.23)
# What `import vllm.lora...`, `vllm.plugins`, `vllm.platforms`, `sglang.srt.lora...`,
# `sglang.srt.plugins` and `sglang.srt.server_args` need, found by importing them in a bare venv.
PURE=(
    "transformers==5.19.0" "tokenizers==0.23.2" numpy packaging psutil regex pyzmq urllib3
    aiohttp requests pillow pybase64 cachetools cbor2 msgspec cloudpickle uvloop py-cpuinfo
    prometheus_client "llguidance>=1.7.6,<1.8" "xgrammar==0.2.8" ipython "torchvision==0.29.1"
    orjson starlette dill "sentencepiece==0.2.1" safetensors tqdm pytest
)
stamp_text="torch==2.14.1 ${ENGINES[*]} ${PURE[*]}"

if [[ -x "$venv/bin/python" && -f "$venv/.engines-stamp" ]] \
    && [[ "$(cat "$venv/.engines-stamp")" == "$stamp_text" ]]; then
    echo "engines venv $venv is up to date"
else
    [[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
    "$venv/bin/python" -m pip install -q torch==2.14.1
    "$venv/bin/python" -m pip install -q --no-deps "${ENGINES[@]}"
    "$venv/bin/python" -m pip install -q "${PURE[@]}"
    echo "$stamp_text" > "$venv/.engines-stamp"
fi
# the project itself, every time (the tree may have changed since the venv was made)
LORA_KERNELS_BUILD_CUDA=0 "$venv/bin/python" -m pip install -q --no-deps --no-build-isolation .
