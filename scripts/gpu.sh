#!/usr/bin/env bash
# The GPU job, for a lent machine with an NVIDIA GPU, nvcc, ninja, compute-sanitizer and a python3
# holding a CUDA torch, triton, pytest, pytest-xdist and pytest-timeout; nothing is downloaded.
#
#   bash scripts/gpu.sh [--dry-run] CALL...
#
# Each CALL is sized to be one call of the device machine, under 5 minutes on a 16-core H200:
#   tests      the `cuda`-marked tests (backends "cuda" and "triton" on CUDA tensors, NCCL, graphs,
#              no host sync, torch.compile) and the rest of tests/test_triton*.py, 8 workers, a
#              per-test timeout, every failure reported (no -x); the CPU suite is left to CI
#   sanitizer  compute-sanitizer memcheck (PYTORCH_NO_CUDA_MEMORY_CACHING=1) on the tests chosen
#              below, and racecheck on two
#   bench      python -m fusedclip bench --device cuda, trimmed: the GPU workloads, both GPU backends
#              side by side, the single launch against two, the training steps, 9 repeats
#   all        the three in a row, for a machine without the lease's limits
#   check      the machine check alone
# Every call first checks the machine, in seconds, and stops at the first thing missing with one
# line "gpu.sh: STOP: ...". It then builds fusedclip._C and fusedclip._C_cuda (ninja, MAX_JOBS=16,
# TORCH_CUDA_ARCH_LIST=9.0), unless build/gpu.stamp says that an earlier call on this same machine
# (still warm) built these very sources with this torch; a fresh machine builds again.
#
# Every command runs under `timeout`, with the smaller of its own limit and what is left of the
# call's budget (BUDGET_S below: 250 s for tests, 150 for sanitizer, 170 for bench); a command
# with under 10 s left is not started, and says so. --dry-run prints each command with its limit, and the files the calls write, and runs
# nothing. Files go to $OUT (default gpu-results/), at most 8 for all calls together, named
# DATE-DEVICE-* after the GPU (e.g. 2026-12-02-nvidia-h200-gpu-tests.log). Exits with the first
# failing command's status.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
OUT="${OUT:-gpu-results}"
# Each call's budget in seconds: 250 + 150 + 170 = 570, so that `all` fits one 600-s command of
# a lease (one start, one build: a machine goes back 30 s after a call, and a fresh one builds
# again), and each call alone fits 5 minutes; CALL_BUDGET_S sets one budget for every call.
declare -A BUDGET_S=([check]=60 [tests]=250 [sanitizer]=150 [bench]=170)
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# memcheck: multi-launch tables (5,000 tensors; the 32/256/1532 tiers and past them), unaligned
# tails (tensors carved from one poisoned buffer at odd offsets), both launch paths of the clip
# (two launches and the cooperative single launch), AGC, the monitor, the unscale, and the Triton
# kernels on the same poisoned buffer.
MEMCHECK_TESTS=(
  "tests/test_ops.py::test_no_access_outside_each_tensor[cuda-torch.float32]"
  "tests/test_ops.py::test_no_access_outside_each_tensor[cuda-torch.bfloat16]"
  "tests/test_cuda_backend.py::test_no_write_outside_each_tensor_on_either_launch_path[dtype0]"
  "tests/test_cuda_backend.py::test_single_launch_equals_two_launches[float32+bfloat16-p=2]"
  "tests/test_cuda_operators.py::test_clip_with_norms_single_launch_equals_two_launches[p=inf]"
  "tests/test_operator_contracts.py::test_agc_matches_cpu[cuda-bfloat16-mixed]"
  "tests/test_operator_contracts.py::test_monitor_update_is_the_cpu_bitwise[cuda-defaults-torch.float32]"
  "tests/test_operator_contracts.py::test_unscale_norm_matches_cpu_and_oracle[cuda-torch.float16-p=2]"
  "tests/test_ops.py::test_no_access_outside_each_tensor[triton-torch.float32]"
  # last: thousands of allocations each without the caching allocator, so that a run cut at its
  # limit has reported the others
  "tests/test_cuda_operators.py::test_per_tensor_statistics_at_every_tier[3100]"
  "tests/test_ops.py::test_per_tensor_statistics_many_tensors[cuda-5000]"
)
# racecheck (shared memory): the cooperative single launch with its grid-wide combine, and the
# norm's block reductions over every table tier.
RACECHECK_TESTS=(
  "tests/test_cuda_backend.py::test_single_launch_equals_two_launches[float32-p=2]"
  "tests/test_cuda_operators.py::test_per_tensor_statistics_at_every_tier[3100]"
)
# -v: a line per test as it ends, so that a run stopped at its limit still says what passed and failed.
# --continue-on-collection-errors: a module that fails to import (that machine has timm,
# transformers, lightning) costs its own tests, not the run's.
PYTEST=("$PYTHON" -m pytest -v -p no:cacheprovider -rfEs --timeout 120 --continue-on-collection-errors)
BENCH=("$PYTHON" -m fusedclip bench --device cuda --workloads gpt2-124m llama-1b many-small tiny-10k host-1k
       --training amp adamw --no-health --repeats 9 --output "$OUT")

dry_run=0
calls=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry_run=1 ;;
    tests|sanitizer|bench|check) calls+=("$arg") ;;
    all) calls+=(tests sanitizer bench) ;;
    *) echo "gpu.sh: unknown argument $arg (--dry-run, tests, sanitizer, bench, all, check)"; exit 2 ;;
  esac
done
[ ${#calls[@]} -gt 0 ] || { echo "usage: bash scripts/gpu.sh [--dry-run] tests|sanitizer|bench|all|check..."; exit 2; }

# The GPU's name as a file name, as fusedclip.bench.harness.device_slug writes it.
if [ "$dry_run" -eq 1 ]; then
  gpu_name="${GPU_NAME:-NVIDIA H200}"
else
  gpu_name="$(nvidia-smi --query-gpu=name --format=csv,noheader -i 0 2>/dev/null | head -n 1)"
fi
slug="$(printf '%s' "${gpu_name:-unknown-gpu}" | tr '[:upper:]' '[:lower:]' | sed -E 's/[^a-z0-9]+/-/g; s/^-+//; s/-+$//')"
stem="$(date +%F)-$slug"
[ "$dry_run" -eq 1 ] || mkdir -p "$OUT"
status=0
written=()  # the files of $OUT, for the dry run's list

stop() { echo "gpu.sh: STOP: $*"; exit 3; }
record() { [[ " ${written[*]} " == *" $1 "* ]] || written+=("$1"); }

# run LIMIT LOG COMMAND...: COMMAND under `timeout`, its output appended to $OUT/LOG, whose tail
# is printed; records the first failure.
run() {
  local limit=$1 log=$2; shift 2
  record "$log"
  if [ "$dry_run" -eq 1 ]; then
    printf '[timeout %ss] ' "$limit"; printf '%q ' "$@"; printf '>> %s\n' "$OUT/$log"
    return 0
  fi
  local left=$(( budget - (SECONDS - call_start) ))
  if [ "$left" -lt 10 ]; then
    echo "gpu.sh: not run, the call's ${budget} s are spent: $*" | tee -a "$OUT/$log"
    [ "$status" -ne 0 ] || status=124
    return 124
  fi
  [ "$limit" -le "$left" ] || limit=$left
  echo "== [timeout ${limit}s] $*" | tee -a "$OUT/$log"
  local began=$SECONDS
  timeout -k 10 "$limit" "$@" >> "$OUT/$log" 2>&1
  local rc=$?
  tail -n 15 "$OUT/$log"
  echo "== exit $rc after $(( SECONDS - began )) s ($(( SECONDS - call_start )) s into the call)" | tee -a "$OUT/$log"
  if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then status=$rc; fi
  return "$rc"
}

# need WHAT COMMAND...: stops the call, naming WHAT, when COMMAND fails.
need() {
  local what=$1; shift
  if [ "$dry_run" -eq 1 ]; then
    printf '[timeout 60s] '; printf '%q ' "$@"; printf '# check: %s\n' "$what"
    return 0
  fi
  timeout 60 "$@" > /dev/null 2>&1 || stop "$what is missing or broken on this machine (checked: $*)"
}

check_machine() {  # $1: the call, for what it needs beyond the rest
  need "nvidia-smi (an NVIDIA driver)" nvidia-smi -L
  need "nvcc (CUDA's compiler)" nvcc --version
  need "ninja" ninja --version
  need "$PYTHON" "$PYTHON" --version
  local module
  for module in torch triton pytest xdist pytest_timeout; do  # found without importing them
    need "the Python package $module" "$PYTHON" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$module') is None)"
  done
  need "a CUDA torch that sees the GPU" "$PYTHON" -c "import torch; assert torch.cuda.is_available()"
  if [ "$1" = sanitizer ]; then need "compute-sanitizer" compute-sanitizer --version; fi
  run 30 machine.log nvidia-smi
  run 30 machine.log "$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'CUDA', torch.version.cuda, \
'triton', triton.__version__, torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0))"
  # where the build will look for CUDA (its libcudart is linked from there)
  run 30 machine.log "$PYTHON" -c "import glob, torch.utils.cpp_extension as e; print('CUDA_HOME', e.CUDA_HOME, \
glob.glob(str(e.CUDA_HOME) + '/lib*/libcudart.so*'))"
}

build() {
  local sources=""
  [ "$dry_run" -eq 1 ] || sources="$( { cat setup.py; find csrc -type f | LC_ALL=C sort | xargs cat; \
    "$PYTHON" -c "import torch; print(torch.__version__)" 2>&1; nvcc --version; } | sha256sum | cut -d' ' -f1)"
  if [ "$dry_run" -eq 0 ] && [ -f build/gpu.stamp ] && [ "$(cat build/gpu.stamp)" = "$sources" ] \
    && "$PYTHON" -c "import fusedclip, fusedclip._C_cuda" > /dev/null 2>&1; then
    echo "== build: reusing this machine's build of these sources (build/gpu.stamp)" | tee -a "$OUT/build.log"
    record build.log
  else
    run 150 build.log env FUSEDCLIP_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 \
      "$PYTHON" setup.py build_ext --inplace || stop "the build failed: $OUT/build.log"
    [ "$dry_run" -eq 1 ] || { mkdir -p build && echo "$sources" > build/gpu.stamp; }
  fi
  run 30 build.log "$PYTHON" -m fusedclip info
}

for call in "${calls[@]}"; do
  call_start=$SECONDS
  budget="${CALL_BUDGET_S:-${BUDGET_S[$call]}}"
  echo "== gpu.sh $call (budget ${budget} s)"
  check_machine "$call"
  [ "$call" = check ] && continue
  build
  case "$call" in
    tests)
      run 220 "$stem-gpu-tests.log" "${PYTEST[@]}" -n 8 --durations 15 -m cuda tests
      run 60 "$stem-gpu-tests.log" "${PYTEST[@]}" -n 4 tests/test_triton.py tests/test_triton_operators.py \
        -m "not cuda" --deselect tests/test_triton.py::test_interpreted_suite ;;
    sanitizer)
      run 140 "$stem-sanitizer.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \
        --error-exitcode 1 --target-processes application-only --print-limit 20 "${PYTEST[@]}" "${MEMCHECK_TESTS[@]}"
      run 80 "$stem-sanitizer.log" compute-sanitizer --tool racecheck --error-exitcode 1 \
        --target-processes application-only --print-limit 20 "${PYTEST[@]}" "${RACECHECK_TESTS[@]}" ;;
    bench)
      run 170 "$stem-bench.log" "${BENCH[@]}"
      record "$stem.json"; record "$stem.md"; record "$stem.png" ;;
  esac
done
if [ "$dry_run" -eq 1 ]; then
  echo "writes: ${written[*]}"
else
  echo "== wrote under $OUT: $(ls "$OUT" | tr '\n' ' ')"
fi
exit "$status"
