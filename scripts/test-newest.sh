#!/usr/bin/env bash
# The framework tests (Accelerate, Lightning, Hugging Face Trainer, timm) against the newest
# releases of the frameworks, where scripts/test.sh runs them with the versions pinned in
# scripts/constraints.txt. Arguments go to pytest.
#
# The set-up of scripts/setup.sh runs first (the pinned environment and fusedclip's build). The
# newest releases then go into a virtual environment of their own, build/newest-venv, which sees
# this Python's packages (torch, fusedclip, the test tools) behind its own: the pinned environment
# is left as it is. torch is pinned to the installed one, timm is installed without torchvision
# (see scripts/setup.sh). When these tests pass, the pins can move: set scripts/constraints.txt to
# the versions printed below.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"

VENV="build/newest-venv"
if [ ! -x "$VENV/bin/python" ]; then
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
fi
# This Python's site directories, after the venv's own (site.addsitedir also runs their .pth files:
# fusedclip's editable install).
PARENT_SITES="$("$PYTHON" -c 'import os, site; print(repr([p for p in site.getsitepackages() + [site.getusersitepackages()] if os.path.isdir(p)]))')"
"$VENV/bin/python" - "$PARENT_SITES" <<'EOF'
import ast, os, sys, sysconfig
parents = ast.literal_eval(sys.argv[1])
pth = os.path.join(sysconfig.get_paths()["purelib"], "_fusedclip_parent_site.pth")
with open(pth, "w") as f:
    f.write("import site; " + "; ".join(f"site.addsitedir({p!r})" for p in parents) + "\n")
EOF

TORCH_PIN="$VENV/torch-constraint.txt"
"$PYTHON" -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > "$TORCH_PIN"
# eager: the frameworks' dependencies too (lightning-utilities, torchmetrics, ...), not only those
# the pinned environment does not satisfy.
"$VENV/bin/python" -m pip install -q --upgrade --upgrade-strategy eager -c "$TORCH_PIN" \
  accelerate transformers lightning huggingface-hub tokenizers safetensors
"$VENV/bin/python" -m pip install -q --upgrade --no-deps timm

echo "test-newest: the frameworks' newest releases:"
"$VENV/bin/python" - <<'EOF'
import importlib.metadata as metadata
for name in ("accelerate", "transformers", "huggingface-hub", "tokenizers", "safetensors", "lightning",
             "pytorch-lightning", "lightning-utilities", "torchmetrics", "timm", "torch"):
    try:
        print(f"  {name}=={metadata.version(name)}")
    except metadata.PackageNotFoundError:
        print(f"  {name}: not installed")
EOF
"$VENV/bin/python" -m pytest -q -p no:cacheprovider \
  tests/test_frameworks.py tests/test_hf_trainer.py tests/test_timm.py "$@"
