#!/usr/bin/env bash
# Everything that needs a GPU, in one run of at most 8 minutes, from the repository root:
#
#   1. env.json       nvidia-smi, device properties, versions (python3 is the one with torch)
#   2. build          the CUDA extension, just in time, for the GPU present (lora_kernels.backends.cuda.build)
#   3. tests          pytest -m gpu (tests/test_cuda.py and every other GPU-marked test)
#   4. bench_cuda, bench_merge          the CUDA kernels' benchmarks
#   5. Triton tests   test_triton_lora_linear, test_multi, test_merge, test_switching, test_cache
#                     with TRITON_INTERPRET=0, the ones present
#   6. bench_lora_linear, bench_multi, bench_switch, bench_serving   the other benchmarks
#
# Results go to $OUT, or to the directory given as $1 when OUT is unset: at most 8 files, no
# subdirectories: gpu_check.log (every step's output), env.json, summary.json (each step's exit
# code, seconds and status) and one JSON per benchmark. A failing step does not stop the run.
# Every step has a timeout, cut short so that the whole run ends by the deadline; a step with
# no time left is recorded as skipped. No network is needed.
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
export TRITON_INTERPRET=0
export PYTHONUNBUFFERED=1
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export LORA_KERNELS_CACHE_DIR="${LORA_KERNELS_CACHE_DIR:-$SCRATCH/jit-cache}"

PYTEST_ARGS=(-q -p no:cacheprovider -rfE --durations=10 --continue-on-collection-errors)
if python3 -c "import pytest_timeout" 2>/dev/null; then
  PYTEST_ARGS+=(--timeout=120)
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
  echo "=== $name (timeout ${limit}s): $*" >>"$LOG"
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
  step "$name" "$cap" python3 "$script" --out "$SCRATCH/$name/$name.json" "$@"
  if [[ -f $SCRATCH/$name/$name.json ]]; then
    cp "$SCRATCH/$name/$name.json" "$OUT/$name.json"
  fi
}

step env 30 python3 - "$OUT/env.json" <<'EOF'
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
}
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
for mod in ("triton", "peft", "transformers", "pytest"):
    try:
        env[mod] = __import__(mod).__version__
    except Exception as exc:
        env[mod] = f"not importable: {exc}"
json.dump(env, open(sys.argv[1], "w"), indent=2)
print(json.dumps(env, indent=2))
EOF

# build.py runs on its own here (not through the package's __init__), so that the build is
# reported even if another part of the package fails to import on this machine.
step build 240 python3 -c "
import runpy
status = runpy.run_path('lora_kernels/backends/cuda/build.py')['extension_status']()
print('CUDA extension:', status)
raise SystemExit(0 if status in ('aot', 'jit') else 1)
"

step tests_gpu 150 python3 -m pytest "${PYTEST_ARGS[@]}" -m gpu tests
bench bench_cuda 90 --quick
bench bench_merge 60 --quick

triton_tests=()
for f in tests/test_triton_lora_linear.py tests/test_multi.py tests/test_merge.py tests/test_switching.py tests/test_cache.py; do
  [[ -f $f ]] && triton_tests+=("$f")
done
if ((${#triton_tests[@]})); then
  step tests_triton 150 python3 -m pytest "${PYTEST_ARGS[@]}" "${triton_tests[@]}"
fi

# Each within its cap by its own budget switch, so that it finishes and writes its JSON.
bench bench_lora_linear 60 --budget-s 40
bench bench_multi 60 --max-seconds 40
bench bench_switch 60 --quick
bench bench_serving 60 --quick

python3 - "$STEPS" "$OUT/summary.json" "$SECONDS" <<'EOF'
import json, sys

steps = []
for line in open(sys.argv[1]):
    name, rc, seconds, status = line.rstrip("\n").split("\t")
    exit_code = int(rc) if rc else None
    steps.append({"step": name, "exit_code": exit_code, "seconds": int(seconds), "status": status})
summary = {
    "ok": all(s["status"] in ("ok", "absent") for s in steps),
    "total_seconds": int(sys.argv[3]),
    "steps": steps,
}
json.dump(summary, open(sys.argv[2], "w"), indent=2)
print(json.dumps(summary, indent=2))
EOF
rm -rf "$STEPS" "$SCRATCH"
