"""What scripts/setup.sh did last, so that a re-run on an unchanged tree skips it.

Two stamps under build/setup-state/, each a JSON file written after its step succeeded:

- ``install``: the pip installs (build tools, ``pip install -e .[...]``, timm). Stale when
  pyproject.toml, setup.py, scripts/constraints.txt or scripts/setup.sh changed, with another
  Python or torch, when fusedclip is no longer installed (editable) from this tree, or when a
  package pinned in scripts/constraints.txt is installed at another version.
- ``build``: fusedclip._C. Stale when a file under csrc/ or setup.py changed (by content), with
  another Python or torch, when an environment variable that the build reads changed, or when the
  built library is missing or is not the one the stamp saw (replaced by another build).

Usage (with the Python that setup.sh installs into; run from anywhere):
  python scripts/setup_state.py check install|build   exit 0 when up to date, else 1 and the reason
  python scripts/setup_state.py record install|build  after the step succeeded
  python scripts/setup_state.py forget                 removes both stamps
Python 3.10+, standard library only (pip's vendored ``packaging`` reads the constraints' markers).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = ("install", "build")

# What the install step reads, and what the build reads (besides csrc/).
INSTALL_INPUTS = ("pyproject.toml", "setup.py", "scripts/constraints.txt", "scripts/setup.sh")
BUILD_INPUTS = ("setup.py",)
# The environment of a build: setup.py's variables, torch.utils.cpp_extension's (where CUDA is, how
# many jobs do not change the result), the compiler's.
BUILD_ENV = ("FUSEDCLIP_DEBUG", "FUSEDCLIP_CUDA", "TORCH_CUDA_ARCH_LIST", "CUDA_HOME", "CUDA_PATH",
             "CC", "CXX", "CFLAGS", "CXXFLAGS", "CPPFLAGS", "LDFLAGS")


def stamp_path(kind: str, root: str = ROOT) -> str:
    return os.path.join(root, "build", "setup-state", kind + ".json")


def _hash_files(root: str, paths) -> str:
    digest = hashlib.sha256()
    for rel in paths:
        digest.update(rel.encode() + b"\0")
        try:
            with open(os.path.join(root, rel), "rb") as f:
                digest.update(hashlib.sha256(f.read()).digest())
        except FileNotFoundError:
            digest.update(b"(missing)")
    return digest.hexdigest()


def _tree(root: str, folder: str) -> list:
    """Every file under root/folder, as sorted paths relative to root."""
    found = []
    for parent, dirs, files in os.walk(os.path.join(root, folder)):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        found += [os.path.relpath(os.path.join(parent, f), root) for f in files]
    return sorted(found)


def installed_version(name: str) -> Optional[str]:
    import importlib.metadata as metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def installed_from(name: str) -> Optional[str]:
    """The project directory an editable install of `name` points to, else None."""
    import importlib.metadata as metadata
    from urllib.parse import unquote, urlparse

    try:
        text = metadata.distribution(name).read_text("direct_url.json")
    except metadata.PackageNotFoundError:
        return None
    try:
        info = json.loads(text or "")
    except ValueError:
        return None
    if not info.get("dir_info", {}).get("editable"):
        return None
    url = urlparse(info.get("url", ""))
    return os.path.realpath(unquote(url.path)) if url.scheme == "file" else None


def _python() -> str:
    return f"{os.path.realpath(sys.executable)} {sys.prefix} {sys.version}"


def _ext_path(root: str) -> str:
    """fusedclip._C as setup.py builds it: a limited-API (abi3) library."""
    return os.path.join(root, "fusedclip", "_C.abi3.so")


def state(kind: str, root: str = ROOT, env=None) -> dict:
    """What a stamp of `kind` records now."""
    env = os.environ if env is None else env
    torch = installed_version("torch")
    if kind == "install":
        return {"inputs": _hash_files(root, INSTALL_INPUTS), "python": _python(), "torch": torch}
    ext = _ext_path(root)
    try:
        st = os.stat(ext)
        library = [os.path.basename(ext), st.st_size, st.st_mtime_ns]
    except FileNotFoundError:
        library = None
    return {
        "inputs": _hash_files(root, list(BUILD_INPUTS) + _tree(root, "csrc")),
        "python": _python(),
        "torch": torch,
        "env": {name: env.get(name) for name in BUILD_ENV},
        "library": library,
    }


def _pins(root: str) -> list:
    """(name, version) of each pin of scripts/constraints.txt whose marker holds here."""
    try:
        from packaging.markers import Marker
    except ImportError:
        from pip._vendor.packaging.markers import Marker
    pins = []
    try:
        with open(os.path.join(root, "scripts", "constraints.txt")) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return pins
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if "==" not in line:
            continue
        requirement, _, marker = line.partition(";")
        if marker.strip() and not Marker(marker.strip()).evaluate():
            continue
        name, _, version = requirement.partition("==")
        pins.append((name.strip(), version.strip()))
    return pins


def stale(kind: str, root: str = ROOT, env=None) -> Optional[str]:
    """Why the last `kind` step must run again, or None when it is up to date."""
    try:
        with open(stamp_path(kind, root)) as f:
            recorded = json.load(f)
    except (FileNotFoundError, ValueError):
        return f"no {kind} stamp yet"
    now = state(kind, root, env)
    for key, value in now.items():
        if recorded.get(key) != value:
            return {
                "inputs": "its input files changed",
                "python": "another Python",
                "torch": "another torch",
                "env": "the build's environment variables changed",
                "library": "fusedclip._C is missing or was replaced",
            }[key]
    if kind == "install":
        if installed_from("fusedclip") != os.path.realpath(root):
            return "fusedclip is not installed (editable) from this tree"
        for name, version in _pins(root):
            found = installed_version(name)
            if found is not None and found != version:
                return f"{name} {found} is installed, scripts/constraints.txt pins {version}"
    return None


def record(kind: str, root: str = ROOT, env=None) -> None:
    path = stamp_path(kind, root)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(state(kind, root, env), f, indent=1)
    os.replace(path + ".tmp", path)


def forget(root: str = ROOT) -> None:
    for kind in KINDS:
        try:
            os.remove(stamp_path(kind, root))
        except FileNotFoundError:
            pass


def main(argv: list) -> int:
    if argv[:1] == ["forget"] and len(argv) == 1:
        forget()
        return 0
    if len(argv) != 2 or argv[0] not in ("check", "record") or argv[1] not in KINDS:
        print(__doc__, file=sys.stderr)
        return 2
    command, kind = argv
    if command == "record":
        record(kind)
        return 0
    reason = stale(kind)
    if reason is not None:
        print(reason)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
