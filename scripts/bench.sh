#!/usr/bin/env bash
# Set-up and the main job: fusedclip against torch on this machine's best device (the README's
# benchmark command). Results go to benchmarks/results/ as JSON, Markdown and PNG.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
"$PYTHON" -m fusedclip info
"$PYTHON" -m fusedclip bench --output benchmarks/results "$@"  # a later --output wins
