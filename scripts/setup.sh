#!/usr/bin/env bash
# Installs what fusedclip needs on a fresh machine with Python 3.10+, then builds it in place.
# Sourced by scripts/test.sh and scripts/bench.sh. TORCH_SPEC picks the torch to install when none
# is present (default: torch==2.13.0); an installed torch is kept (the native libraries build and
# load with torch 2.10 or newer).
#
# A re-run skips what is up to date (stamps in build/setup-state/, see scripts/setup_state.py): the
# pip installs run again when pyproject.toml, setup.py, scripts/constraints.txt, this script, the
# Python or torch changed (or fusedclip is no longer installed from this tree, or a pinned package
# is at another version); the native libraries (fusedclip._C, and fusedclip._C_cuda where it is
# built) are built again when a file under csrc/, setup.py, torch or a build variable
# (FUSEDCLIP_DEBUG, FUSEDCLIP_CUDA, TORCH_CUDA_ARCH_LIST, CUDA_HOME, CXX, ...) changed. The object
# files stay in build/temp, where ninja recompiles only the changed sources. `rm -rf build` starts
# over.
set -euo pipefail
PYTHON="${PYTHON:-python3}"
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  "$PYTHON" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi

# Both builds (pip's editable install and setup.py build_ext) put their object files in build/temp
# instead of a temporary folder: a distutils configuration, given to those commands only. The
# section is repeated under the command's class name, torch's BuildExtension: setuptools' editable
# build reinitializes the command and applies the configuration of that name only.
mkdir -p build/setup-state
BUILD_CONFIG="$PWD/build/setup-state/distutils.cfg"
printf '[%s]\nbuild_temp = %s\n' build_ext "$PWD/build/temp" BuildExtension "$PWD/build/temp" > "$BUILD_CONFIG"

if ! reason="$("$PYTHON" scripts/setup_state.py check install)"; then
  echo "setup: installing (${reason:-no state})" >&2
  # setuptools 66+: DIST_EXTRA_CONFIG.
  "$PYTHON" -m pip install -q "setuptools>=66" wheel ninja
  # --no-build-isolation: build against the torch installed above instead of downloading another.
  # The constraint pins that torch, so no extra's dependency can replace it. The `integration`
  # extra (Accelerate, Lightning, transformers) is optional: when it cannot be installed, its
  # tests skip. scripts/constraints.txt pins the framework versions the suite was last green with
  # (scripts/test-newest.sh tries the newest releases).
  complete=1  # 0 when an optional package could not be installed: the next run tries again
  TORCH_CONSTRAINT="$(mktemp)"
  "$PYTHON" -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > "$TORCH_CONSTRAINT"
  if DIST_EXTRA_CONFIG="$BUILD_CONFIG" "$PYTHON" -m pip install -q --no-build-isolation \
      -c "$TORCH_CONSTRAINT" -c scripts/constraints.txt -e ".[test,bench,integration]"; then
    # timm without its torchvision dependency (its others come with the integration extra): PyPI's
    # torchvision is built against a CUDA torch and does not load beside a CPU-only one.
    "$PYTHON" -m pip install -q --no-deps -c "$TORCH_CONSTRAINT" -c scripts/constraints.txt timm \
      || { complete=0; echo "setup: timm could not be installed; tests/test_timm.py will skip" >&2; }
  else
    complete=0
    echo "setup: the 'integration' extra could not be installed; tests/test_frameworks.py, test_hf_trainer.py and test_timm.py will skip" >&2
    DIST_EXTRA_CONFIG="$BUILD_CONFIG" "$PYTHON" -m pip install -q --no-build-isolation \
      -c "$TORCH_CONSTRAINT" -e ".[test,bench]"
  fi
  rm -f "$TORCH_CONSTRAINT"
  if [ "$complete" = 1 ]; then
    "$PYTHON" scripts/setup_state.py record install
  fi
  "$PYTHON" scripts/setup_state.py record build  # the editable install built the native libraries
fi

if ! reason="$("$PYTHON" scripts/setup_state.py check build)"; then
  echo "setup: building fusedclip._C (${reason:-no state})" >&2
  DIST_EXTRA_CONFIG="$BUILD_CONFIG" "$PYTHON" setup.py -q build_ext --inplace
  "$PYTHON" scripts/setup_state.py record build
fi
