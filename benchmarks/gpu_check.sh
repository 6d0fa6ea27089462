#!/usr/bin/env bash
# Everything that needs a GPU, in one run of at most 8 minutes, from the repository root:
#
#   1. install        pip install --no-build-isolation --no-deps -e . (the benchmarks import
#                     lora_kernels; --no-deps keeps the machine's torch)
#   2. env.json       nvidia-smi, device properties, versions, and the build toolchain: gcc,
#                     Python headers, ninja, nvcc against torch's CUDA version
#   3. Triton tests   every family's kernel tests and the strided-argument tests (lora_linear,
#                     multi, merge, embedding, DoRA, QLoRA, MoE, lora_delta), then switching and
#                     cache, with TRITON_INTERPRET=0, the ones present (never run on a GPU: first)
#   4. build          the CUDA extension, just in time, for the GPU present
#                     (lora_kernels.backends.cuda.build)
#   5. tests          pytest -m gpu (tests/test_cuda.py and every other GPU-marked test)
#   6. benchmarks     bench_cuda, bench_merge, bench_lora_linear, bench_multi, bench_qlora (decode
#                     vs bitsandbytes' 4-bit GEMV), bench_moe, bench_serving
#
# Results go to $OUT, or to the directory given as $1 when OUT is unset: at most 8 files, no
# subdirectories: gpu_check.log (every step's output), env.json, summary.json (each step's exit
# code, seconds and status) and one JSON per benchmark. A failing step does not stop the run.
# Every step has a cap, and the caps add up to the deadline (470 s: 8 minutes less a margin),
# so no step is cut for want of time; a step with no time left is recorded as skipped. No
# network is needed.
#
# GPU_CHECK_DRY_RUN=1 checks the script itself on any machine (tests/test_gpu_check.py): every
# step runs, but pytest only collects, benchmarks only print their --help, the install is a pip
# --dry-run, and the build is not attempted.
#
#   bash benchmarks/gpu_check.sh [OUTDIR]
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-${1:-gpu_check_out}}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
LOG="$OUT/gpu_check.log"
STEPS="$(mktemp)"
SCRATCH="$(mktemp -d)"
: >"$LOG"

DEADLINE=${GPU_CHECK_SECONDS:-470}  # 8 minutes, less a margin for the summary
DRY_RUN=${GPU_CHECK_DRY_RUN:-0}
PYTHON=${PYTHON:-python3}
export TRITON_INTERPRET=0
# The checkout itself, should the install step fail: every step still imports this lora_kernels.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export LORA_KERNELS_CACHE_DIR="${LORA_KERNELS_CACHE_DIR:-$SCRATCH/jit-cache}"

PYTEST_ARGS=(-q -p no:cacheprovider -rfE --durations=10 --continue-on-collection-errors)
if "$PYTHON" -c "import pytest_timeout" 2>/dev/null; then
  PYTEST_ARGS+=(--timeout=120)
fi
if [[ $DRY_RUN == 1 ]]; then
  PYTEST_ARGS+=(--collect-only)
fi

# step NAME CAP_SECONDS COMMAND...: run with a timeout of min(CAP, time left), log, record.
step() {
  local name=$1 cap=$2
  shift 2
  local left=$((DEADLINE - SECONDS))
  local limit=$((cap < left ? cap : left))
  if ((limit < 15)); then
    printf '%s\t%s\t%s\t%s\n' "$name" "" 0 skipped >>"$STEPS"
    echo "=== $name: skipped (no time left)" >>"$LOG"
    return
  fi
  echo "=== $name (cap ${cap}s, timeout ${limit}s): $*" >>"$LOG"
  local start=$SECONDS rc status
  timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124 | 137) status=timeout ;;
    *) status=failed ;;
  esac
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" "$status" >>"$STEPS"
  echo "=== $name: $status (exit $rc, $((SECONDS - start))s)" >>"$LOG"
}

# bench NAME CAP [ARGS...]: benchmarks/NAME.py, when present, writing its JSON into a scratch
# directory (with any plot it makes beside it); only the JSON is copied to $OUT/NAME.json.
bench() {
  local name=$1 cap=$2
  shift 2
  local script="benchmarks/$name.py"
  if [[ ! -f $script ]]; then
    printf '%s\t%s\t%s\t%s\n' "$name" "" 0 absent >>"$STEPS"
    return
  fi
  mkdir -p "$SCRATCH/$name"
  if [[ $DRY_RUN == 1 ]]; then
    step "$name" "$cap" "$PYTHON" "$script" --help
    return
  fi
  step "$name" "$cap" "$PYTHON" "$script" --out "$SCRATCH/$name/$name.json" "$@"
  if [[ -f $SCRATCH/$name/$name.json ]]; then
    cp "$SCRATCH/$name/$name.json" "$OUT/$name.json"
  fi
}

# The caps below add up to DEADLINE (checked by tests/test_gpu_check.py).
INSTALL_ARGS=(-m pip install --no-build-isolation --no-deps -e .)
if [[ $DRY_RUN == 1 ]]; then
  INSTALL_ARGS+=(--dry-run)
fi
step install 40 "$PYTHON" "${INSTALL_ARGS[@]}"

step env 20 "$PYTHON" - "$OUT/env.json" <<'EOF'
import datetime, json, platform, subprocess, sys


def run(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception as exc:
        return f"error: {exc}"


env = {
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "python": sys.version,
    "platform": platform.platform(),
    "git_commit": run(["git", "rev-parse", "HEAD"]),
    "nvidia_smi": run([
        "nvidia-smi",
        "--query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit",
        "--format=csv",
    ]),
    "nvcc": run(["nvcc", "--version"]).splitlines()[-2:],
    "gcc": run(["gcc", "--version"]).splitlines()[:1],
    "ninja": run(["ninja", "--version"]),
}
# The extension's build needs Python's headers, ninja and an nvcc whose CUDA major version is
# torch's (setup.py skips the extension otherwise, lora_kernels.backends.cuda.build reports it).
import os, re, sysconfig

include = sysconfig.get_paths().get("include") or ""
env["python_headers"] = include if os.path.isfile(os.path.join(include, "Python.h")) else "missing"
nvcc_release = re.search(r"release (\d+)\.(\d+)", " ".join(env["nvcc"]))
env["nvcc_cuda"] = ".".join(nvcc_release.groups()) if nvcc_release else None
try:
    import torch

    env["torch"] = torch.__version__
    env["torch_cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env["device"] = {
            "name": p.name,
            "capability": f"{p.major}.{p.minor}",
            "multiprocessors": p.multi_processor_count,
            "memory_GiB": round(p.total_memory / 2**30, 1),
            "l2_MiB": round(getattr(p, "L2_cache_size", 0) / 2**20, 1),
        }
except Exception as exc:
    env["torch"] = f"error: {exc}"
torch_cuda = env.get("torch_cuda")
env["nvcc_matches_torch_cuda"] = (
    None
    if not (torch_cuda and env["nvcc_cuda"])
    else torch_cuda.split(".")[0] == env["nvcc_cuda"].split(".")[0]
)
for mod in ("triton", "peft", "transformers", "pytest"):
    try:
        env[mod] = __import__(mod).__version__
    except Exception as exc:
        env[mod] = f"not importable: {exc}"
json.dump(env, open(sys.argv[1], "w"), indent=2)
print(json.dumps(env, indent=2))
EOF

triton_tests=()
for f in tests/test_triton_lora_linear.py tests/test_multi.py tests/test_merge.py \
  tests/test_embedding.py tests/test_dora.py tests/test_qlora.py tests/test_moe.py \
  tests/test_lora_delta.py tests/test_triton_strides.py tests/test_strides_embedding_dora_qlora.py \
  tests/test_switching.py tests/test_cache.py; do
  [[ -f $f ]] && triton_tests+=("$f")
done
if ((${#triton_tests[@]})); then
  step tests_triton 170 "$PYTHON" -m pytest "${PYTEST_ARGS[@]}" "${triton_tests[@]}"
fi

# build.py runs on its own here (not through the package's __init__), so that the build is
# reported even if another part of the package fails to import on this machine.
if [[ $DRY_RUN == 1 ]]; then
  step build 70 "$PYTHON" -c "import runpy; runpy.run_path('lora_kernels/backends/cuda/build.py')"
else
  step build 70 "$PYTHON" -c "
import runpy
status = runpy.run_path('lora_kernels/backends/cuda/build.py')['extension_status']()
print('CUDA extension:', status)
raise SystemExit(0 if status in ('aot', 'jit') else 1)
"
fi

step tests_gpu 60 "$PYTHON" -m pytest "${PYTEST_ARGS[@]}" -m gpu tests
# Each within its cap by its own budget switch, so that it finishes and writes its JSON.
bench bench_cuda 15 --quick
bench bench_merge 15 --quick
bench bench_lora_linear 20 --budget-s 12
bench bench_multi 15 --max-seconds 10
bench bench_qlora 15 --quick
bench bench_moe 15 --quick
bench bench_serving 15 --quick

"$PYTHON" - "$STEPS" "$OUT/summary.json" "$SECONDS" "$DRY_RUN" <<'EOF'
import json, sys

steps = []
for line in open(sys.argv[1]):
    name, rc, seconds, status = line.rstrip("\n").split("\t")
    exit_code = int(rc) if rc else None
    steps.append({"step": name, "exit_code": exit_code, "seconds": int(seconds), "status": status})
summary = {
    "ok": all(s["status"] in ("ok", "absent") for s in steps),
    "total_seconds": int(sys.argv[3]),
    "dry_run": sys.argv[4] == "1",
    "steps": steps,
}
json.dump(summary, open(sys.argv[2], "w"), indent=2)
print(json.dumps(summary, indent=2))
EOF
rm -rf "$STEPS" "$SCRATCH"
