#!/usr/bin/env bash
# Run tests/engines/ in the engines venv (.ci/engines_setup.sh VENV first): the vLLM and SGLang
# conformance tests. They must run here, so a skip is a failure: pytest's -rs summary lists
# every skip, and any makes this script exit non-zero.
#
#   .ci/engines_test.sh VENV         (default: ~/.cache/lora_kernels/engines-venv, outside the tree)
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${1:-${XDG_CACHE_HOME:-$HOME/.cache}/lora_kernels/engines-venv}"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
# vLLM's CPU platform (torch ops): the only one this machine can run
export VLLM_TARGET_DEVICE=cpu
"$venv/bin/python" -m pytest -q -p no:cacheprovider -rs tests/engines 2>&1 | tee "$log"
if grep -qE "^SKIPPED|[0-9]+ skipped" "$log"; then
    echo "engines_test: tests were skipped; in the engines venv every engine test must run" >&2
    exit 1
fi
