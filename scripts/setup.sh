#!/usr/bin/env bash
# Installs what fusedclip needs on a fresh machine with Python 3.9+, then builds it in place.
# Sourced by scripts/test.sh and scripts/bench.sh. TORCH_SPEC picks the torch to install when none
# is present (default: torch==2.13.0); an installed torch >= 2.6 is kept.
set -euo pipefail
PYTHON="${PYTHON:-python3}"
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  "$PYTHON" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
"$PYTHON" -m pip install -q "setuptools>=64" wheel ninja
# --no-build-isolation: build against the torch installed above instead of downloading another.
# The constraint pins that torch, so no extra's dependency can replace it. The `integration` extra
# (Accelerate, Lightning, transformers) is optional: when it cannot be installed, its tests skip.
# scripts/constraints.txt pins the framework versions the suite was last green with
# (scripts/test-newest.sh tries the newest releases).
TORCH_CONSTRAINT="$(mktemp)"
"$PYTHON" -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > "$TORCH_CONSTRAINT"
if "$PYTHON" -m pip install -q --no-build-isolation -c "$TORCH_CONSTRAINT" -c scripts/constraints.txt \
    -e ".[test,bench,integration]"; then
  # timm without its torchvision dependency (its others come with the integration extra): PyPI's
  # torchvision is built against a CUDA torch and does not load beside a CPU-only one.
  "$PYTHON" -m pip install -q --no-deps -c "$TORCH_CONSTRAINT" -c scripts/constraints.txt timm \
    || echo "setup: timm could not be installed; tests/test_timm.py will skip" >&2
else
  echo "setup: the 'integration' extra could not be installed; tests/test_frameworks.py, test_hf_trainer.py and test_timm.py will skip" >&2
  "$PYTHON" -m pip install -q --no-build-isolation -c "$TORCH_CONSTRAINT" -e ".[test,bench]"
fi
rm -f "$TORCH_CONSTRAINT"
