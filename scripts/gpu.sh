#!/usr/bin/env bash
# The GPU job, for a machine with an NVIDIA GPU, nvcc and a CUDA torch already installed (nothing is
# downloaded). Stages, in the order given (default: all of them):
#   build      builds fusedclip._C in place with its CUDA kernels (TORCH_CUDA_ARCH_LIST, default 9.0)
#   tests      the whole test suite: the `cuda`-marked tests run here
#   sanitizer  compute-sanitizer memcheck and racecheck over the CUDA backend's small cases
#   bench      python -m fusedclip bench --device cuda
# Logs and benchmark results go to $OUT (default gpu-results/): at most seven files, so that one
# call of a lent device brings them all back. Exits with the first failing stage's status.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
OUT="${OUT:-gpu-results}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0

# run LOG COMMAND...: appends COMMAND's output to $OUT/LOG, prints its tail, records a failure.
run() {
  local log="$OUT/$1"; shift
  echo "== $*" | tee -a "$log"
  "$@" >> "$log" 2>&1
  local rc=$?
  tail -n 12 "$log"
  echo "== exit $rc"
  if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then status=$rc; fi
  return "$rc"
}

sanitized_tests=(-m cuda tests/test_ops.py tests/test_cuda_backend.py -k "cuda and not many and not graph")
stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(build tests sanitizer bench)
for stage in "${stages[@]}"; do
  case "$stage" in
    build)
      run env.log nvidia-smi
      run build.log env FUSEDCLIP_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" \
        MAX_JOBS="${MAX_JOBS:-16}" "$PYTHON" setup.py build_ext --inplace || exit "$status"
      run env.log "$PYTHON" -m fusedclip info ;;
    tests)
      run tests.log "$PYTHON" -m pytest -q -p no:cacheprovider -rs tests ;;
    sanitizer)
      run sanitizer.log compute-sanitizer --tool memcheck --error-exitcode 1 \
        "$PYTHON" -m pytest -q -p no:cacheprovider "${sanitized_tests[@]}"
      run sanitizer.log compute-sanitizer --tool racecheck --error-exitcode 1 \
        "$PYTHON" -m pytest -q -p no:cacheprovider "${sanitized_tests[@]}" ;;
    bench)
      run bench.log "$PYTHON" -m fusedclip bench --device cuda --output "$OUT" ;;
    *)
      echo "unknown stage $stage (build, tests, sanitizer, bench)"; exit 2 ;;
  esac
done
exit "$status"
