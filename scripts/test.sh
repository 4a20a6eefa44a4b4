#!/usr/bin/env bash
# Set-up, the whole test suite, then the wheel installed beside two torch versions (the README's
# test command; CI runs it). FUSEDCLIP_TEST_WHEELS=0 leaves the wheel out (a quick local run).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
"$PYTHON" -m fusedclip info
"$PYTHON" -m pytest -q -p no:cacheprovider tests "$@"
if [ "${FUSEDCLIP_TEST_WHEELS:-1}" != 0 ]; then
  PYTHON="$PYTHON" bash scripts/test-wheels.sh
fi
