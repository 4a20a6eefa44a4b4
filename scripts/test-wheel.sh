#!/usr/bin/env bash
# Installs a built wheel into one or more pythons (each with its own torch) and runs tests against
# the installed package, not the source tree.
#
#   bash scripts/test-wheel.sh WHEEL VENV_PYTHON...
#   e.g. bash scripts/test-wheel.sh dist/fusedclip-*.whl \
#            /work/venvs/torch2130/bin/python /work/venvs/torch2141/bin/python
#
# Environment:
#   FUSEDCLIP_WHEEL_TESTS  the files of tests/ to run (default: "test_ops.py test_errors.py test_api.py")
#
# Each python gets the wheel with --no-deps (its own torch stays) and runs pytest in a temporary
# directory that holds a copy of tests/ (conftest.py and helpers.py come with it) and of
# pyproject.toml (the pytest markers): nothing there can import the repository's fusedclip/. Every
# python is tried; the exit status is non-zero if any failed.
set -euo pipefail

if [ $# -lt 2 ]; then
    echo "usage: bash scripts/test-wheel.sh WHEEL VENV_PYTHON..." >&2
    exit 2
fi
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WHEEL=$(realpath "$1")
shift
[ -f "$WHEEL" ] || { echo "test-wheel.sh: no wheel at $WHEEL" >&2; exit 2; }
read -r -a TESTS <<<"${FUSEDCLIP_WHEEL_TESTS:-test_ops.py test_errors.py test_api.py}"

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cp -r "$ROOT/tests" "$WORK/tests"
find "$WORK/tests" -name __pycache__ -prune -exec rm -rf {} +
cp "$ROOT/pyproject.toml" "$WORK/"
in_work() { (cd "$WORK" && "$@"); }

status=0
for PY in "$@"; do
    echo "== $PY"
    # --no-index: a local wheel without dependencies needs no index, and the time is the install's.
    start=$(date +%s.%N)
    if ! "$PY" -m pip install -q --no-index --no-deps --force-reinstall "$WHEEL"; then
        echo "FAILED: pip install into $PY" >&2; status=1; continue
    fi
    awk -v s="$start" -v e="$(date +%s.%N)" \
        'BEGIN { t = e - s; printf "pip install: %.1f s (target < 10 s)%s\n", t, (t < 10 ? "" : " SLOW") }'

    if ! where=$(in_work "$PY" -c 'import torch, fusedclip; print(fusedclip.__file__); print("torch", torch.__version__)'); then
        echo "FAILED: import fusedclip under $PY" >&2; status=1; continue
    fi
    echo "$where"
    case "$(head -n 1 <<<"$where")" in
        "$ROOT"/fusedclip/*) echo "FAILED: fusedclip was imported from the repository, not the wheel" >&2
                   status=1; continue ;;
    esac
    in_work "$PY" -m pytest -q -p no:cacheprovider --rootdir "$WORK" "${TESTS[@]/#/tests/}" \
        || { echo "FAILED: tests under $PY" >&2; status=1; }
done
exit "$status"
