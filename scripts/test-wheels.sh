#!/usr/bin/env bash
# The wheel as users install it: scripts/wheel.sh builds it, then scripts/test-wheel.sh installs it
# into a venv with torch 2.13.0 and one with torch 2.14.1 (a CUDA build, run on the CPU) and runs
# the operator contracts and the API tests against the installed package. scripts/test.sh (the
# README's test command, which CI runs) calls it after the suite.
#
# The venvs are made once, under build/wheel-venvs/ (a fresh clone makes them fresh).
# FUSEDCLIP_WHEEL_TORCHES overrides the torch versions (space-separated).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"

WHEEL_DIR=build/wheel
rm -rf "$WHEEL_DIR"
FUSEDCLIP_BUILD_PYTHON="$PYTHON" bash scripts/wheel.sh "$WHEEL_DIR"
WHEEL=$(ls "$WHEEL_DIR"/fusedclip-*manylinux*.whl)

PYTHONS=()
for version in ${FUSEDCLIP_WHEEL_TORCHES:-2.13.0 2.14.1}; do
  venv="build/wheel-venvs/torch-$version"
  if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import torch, pytest, hypothesis, numpy" 2>/dev/null; then
    echo "test-wheels: making $venv (torch==$version)" >&2
    rm -rf "$venv"
    "$PYTHON" -m venv "$venv"
    "$venv/bin/python" -m pip install -q "torch==$version" pytest hypothesis numpy
  fi
  PYTHONS+=("$PWD/$venv/bin/python")
done

FUSEDCLIP_WHEEL_TESTS="${FUSEDCLIP_WHEEL_TESTS:-test_ops.py test_operator_contracts.py test_errors.py test_api.py test_native_library.py}" \
  bash scripts/test-wheel.sh "$WHEEL" "${PYTHONS[@]}"
