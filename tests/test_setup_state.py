"""scripts/setup.sh on a re-run: it skips the pip installs and the build of fusedclip._C when
nothing they read changed (the stamps of scripts/setup_state.py), builds again when a source
changes and installs again when the project's metadata, the pins or the environment change.

Checked on a copy of the scripts in a temporary tree, with a stand-in Python that records and
skips pip and setup.py (it runs the rest, scripts/setup_state.py included, on this Python): no
package is installed and nothing is compiled."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXT = "_C.abi3.so"  # setup.py builds a limited-API library


def _load_setup_state():
    spec = importlib.util.spec_from_file_location("setup_state", os.path.join(ROOT, "scripts", "setup_state.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


setup_state = _load_setup_state()


@pytest.fixture
def tree(tmp_path):
    """A project tree: the scripts, pyproject.toml, setup.py, csrc/ and a built fusedclip._C, with a
    site directory where fusedclip is installed (editable) from it."""
    root = tmp_path / "project"
    (root / "scripts").mkdir(parents=True)
    for name in ("setup.sh", "setup_state.py"):
        shutil.copy(os.path.join(ROOT, "scripts", name), root / "scripts" / name)
    for name in ("pyproject.toml", "setup.py"):
        shutil.copy(os.path.join(ROOT, name), root / name)
    pytest_version = setup_state.installed_version("pytest")
    (root / "scripts" / "constraints.txt").write_text(
        f"pytest=={pytest_version}\nno-such-package-fusedclip==1.0\n"
        'pytest==0.1; python_version < "3"\n'  # a marker that does not hold: ignored
    )
    (root / "csrc" / "cpu").mkdir(parents=True)
    (root / "csrc" / "ops.cpp").write_text("int ops;\n")
    (root / "csrc" / "cpu" / "kernels.h").write_text("int kernels;\n")
    (root / "fusedclip").mkdir()
    (root / "fusedclip" / EXT).write_text("built\n")
    site = tmp_path / "site"
    info = site / "fusedclip-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fusedclip\nVersion: 0.1.0\n")
    (info / "direct_url.json").write_text(json.dumps({"dir_info": {"editable": True}, "url": root.as_uri()}))
    return root


def test_build_stamp_follows_the_sources_the_environment_and_the_library(tree, monkeypatch):
    root = str(tree)
    assert setup_state.stale("build", root, env={}) == "no build stamp yet"
    setup_state.record("build", root, env={})
    assert setup_state.stale("build", root, env={}) is None
    os.utime(tree / "csrc" / "ops.cpp")  # touched, not changed: still up to date
    assert setup_state.stale("build", root, env={}) is None
    (tree / "csrc" / "cpu" / "kernels.h").write_text("int kernels2;\n")  # a header changed
    assert setup_state.stale("build", root, env={}) == "its input files changed"
    setup_state.record("build", root, env={})
    (tree / "csrc" / "cpu" / "new.cpp").write_text("int added;\n")  # a source added
    assert setup_state.stale("build", root, env={}) == "its input files changed"
    setup_state.record("build", root, env={})
    assert setup_state.stale("build", root, env={"FUSEDCLIP_DEBUG": "1"}) == (
        "the build's environment variables changed")
    (tree / "fusedclip" / EXT).write_text("built by another build\n")
    assert setup_state.stale("build", root, env={}) == "fusedclip._C is missing or was replaced"
    setup_state.record("build", root, env={})
    (tree / "fusedclip" / EXT).unlink()
    assert setup_state.stale("build", root, env={}) == "fusedclip._C is missing or was replaced"


def test_install_stamp_follows_the_metadata_the_pins_and_the_install(tree, monkeypatch):
    root = str(tree)
    setup_state.record("install", root)
    # fusedclip is installed from the real checkout, not from this tree
    assert setup_state.stale("install", root) == "fusedclip is not installed (editable) from this tree"
    monkeypatch.syspath_prepend(str(tree.parent / "site"))
    assert setup_state.stale("install", root) is None
    (tree / "scripts" / "constraints.txt").write_text("pytest==0.1\n")  # a new pin
    assert setup_state.stale("install", root) == "its input files changed"
    setup_state.record("install", root)
    assert setup_state.stale("install", root).startswith("pytest ")  # installed at another version
    (tree / "scripts" / "constraints.txt").write_text("")
    setup_state.record("install", root)
    assert setup_state.stale("install", root) is None
    with open(tree / "pyproject.toml", "a") as f:
        f.write("\n# a change\n")
    assert setup_state.stale("install", root) == "its input files changed"
    setup_state.record("install", root)
    monkeypatch.setattr(setup_state, "installed_version", lambda name: "9.9" if name == "torch" else None)
    assert setup_state.stale("install", root) == "another torch"


def test_a_broken_stamp_is_stale(tree):
    path = setup_state.stamp_path("build", str(tree))
    os.makedirs(os.path.dirname(path))
    with open(path, "w") as f:
        f.write("{not json")
    assert setup_state.stale("build", str(tree), env={}) == "no build stamp yet"


# --- scripts/setup.sh itself, with a stand-in Python ---------------------------------------------

STAND_IN = """#!/usr/bin/env bash
# Records each call; pip and setup.py are recorded and skipped (pip's editable install and setup.py
# build_ext write the library, as the real ones do), the rest runs on the real Python.
echo "$*" >> "$CALLS"
if [ "$1 $2" = "-m pip" ] && [ -n "${FAIL_PIP_WITH:-}" ]; then
  case "$*" in *"$FAIL_PIP_WITH"*) exit 1 ;; esac
fi
if [ "$1 $2" = "-m pip" ]; then
  case " $* " in *" -e "*) echo "built by pip" > "fusedclip/{ext}" ;; esac
  exit 0
fi
if [ "$1" = setup.py ]; then
  echo "built by setup.py" > "fusedclip/{ext}"
  exit 0
fi
exec {python} "$@"
"""


def _setup_sh(tree, tmp_path, env=None) -> list:
    """Runs the tree's scripts/setup.sh with the stand-in Python; the calls it made to pip and
    setup.py (as "pip ..." and "setup.py ...")."""
    stand_in = tmp_path / "python"
    stand_in.write_text(STAND_IN.replace("{ext}", EXT).replace("{python}", sys.executable))
    stand_in.chmod(0o755)
    calls = tmp_path / "calls.log"
    calls.write_text("")
    environ = dict(os.environ, PYTHON=str(stand_in), CALLS=str(calls),
                   PYTHONPATH=str(tmp_path / "site"), **(env or {}))
    result = subprocess.run(["bash", str(tree / "scripts" / "setup.sh")], capture_output=True, text=True,
                            timeout=120, cwd=str(tmp_path), env=environ)
    assert result.returncode == 0, result.stdout + result.stderr
    ran = []
    for line in calls.read_text().splitlines():
        if line.startswith("-m pip "):
            ran.append("pip " + line[len("-m pip "):])
        elif line.startswith("setup.py "):
            ran.append(line)
    return ran


def test_setup_sh_skips_what_is_up_to_date(tree, tmp_path):
    first = _setup_sh(tree, tmp_path)
    assert any(" -e .[test,bench,integration]" in call for call in first), first  # installs (and builds)
    assert not any(call.startswith("setup.py") for call in first), first  # pip's install built it
    assert _setup_sh(tree, tmp_path) == []  # nothing changed: nothing runs

    (tree / "csrc" / "ops.cpp").write_text("int ops2;\n")
    again = _setup_sh(tree, tmp_path)
    assert again == ["setup.py -q build_ext --inplace"]  # a source changed: the build alone
    assert _setup_sh(tree, tmp_path) == []
    assert _setup_sh(tree, tmp_path, env={"FUSEDCLIP_DEBUG": "1"}) == ["setup.py -q build_ext --inplace"]

    (tree / "scripts" / "constraints.txt").write_text("")
    installs = _setup_sh(tree, tmp_path, env={"FUSEDCLIP_DEBUG": "1"})
    assert any(" -e .[test,bench,integration]" in call for call in installs), installs
    assert _setup_sh(tree, tmp_path, env={"FUSEDCLIP_DEBUG": "1"}) == []


@pytest.mark.parametrize("failing", ["integration]", "timm"])
def test_setup_sh_tries_an_optional_install_again_after_it_failed(tree, tmp_path, failing):
    """An integration extra or timm that could not be installed (a network failure) is not
    recorded as installed: the next run tries again, and once it succeeds nothing runs."""
    first = _setup_sh(tree, tmp_path, env={"FAIL_PIP_WITH": failing})
    assert any(failing in call for call in first), first
    again = _setup_sh(tree, tmp_path)
    assert any(" -e .[test,bench,integration]" in call for call in again), again
    assert _setup_sh(tree, tmp_path) == []


def test_setup_sh_builds_in_a_kept_folder(tree, tmp_path):
    """pip's editable build and setup.py's keep their object files in build/temp of the tree (a
    distutils configuration given by DIST_EXTRA_CONFIG), so that ninja recompiles only what
    changed; the configuration is given to those commands only."""
    _setup_sh(tree, tmp_path)
    config = (tree / "build" / "setup-state" / "distutils.cfg").read_text()
    for section in ("[build_ext]", "[BuildExtension]"):  # the command's name, its class's name
        assert f"{section}\nbuild_temp = {tree / 'build' / 'temp'}\n" in config
    script = (tree / "scripts" / "setup.sh").read_text()
    assert "export DIST_EXTRA_CONFIG" not in script
