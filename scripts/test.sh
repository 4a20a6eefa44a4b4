#!/usr/bin/env bash
# Set-up and the whole test suite (the README's test command; CI runs it).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
"$PYTHON" -m fusedclip info
"$PYTHON" -m pytest -q -p no:cacheprovider tests "$@"
