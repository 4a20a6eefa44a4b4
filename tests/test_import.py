"""Import hygiene (in fresh interpreters): no CUDA initialisation, a soft fallback when the C++
library cannot be loaded; and backend selection through FUSEDCLIP_BACKEND."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fusedclip
from fusedclip import _backends
from helpers import make_grads, operator, oracle_norm, params_with, patch_operator


def _run(code: str, env: dict | None = None, cwd: str | None = None) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "FUSEDCLIP_BACKEND"}
    environ.update(env or {})
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=environ,
        timeout=300,
        cwd=cwd,
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


def test_import_does_not_initialise_cuda():
    result = _run(
        """
        import torch
        import fusedclip
        assert not torch.cuda.is_initialized(), "import initialised CUDA"
        p = torch.nn.Parameter(torch.randn(10))
        p.grad = torch.randn(10)
        fusedclip.clip_grad_norm_([p], 0.1)
        fusedclip.clip_grad_value_([p], 0.1)
        fusedclip.available_backends()
        assert not torch.cuda.is_initialized(), "a CPU call initialised CUDA"
        print("ok")
        """
    )
    assert result.stdout.strip().endswith("ok")


BLOCK_C = """
import importlib.abc, sys

class _BlockC(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "fusedclip._C":
            raise ImportError("fusedclip._C is hidden by the test")
        return None

sys.meta_path.insert(0, _BlockC())
"""


def test_import_without_the_cpp_library():
    result = _run(
        BLOCK_C
        + """
import logging, math
logging.basicConfig(level=logging.WARNING)
import torch
import fusedclip
from fusedclip import _backends

assert _backends._C is None and "hidden by the test" in _backends._C_ERROR
available = fusedclip.available_backends()
assert "cpu" not in available and available[-1] == "torch", available
assert fusedclip.backend_status()["cpu"] is not None

gen = torch.Generator().manual_seed(0)
grads = [torch.randn(300, generator=gen), torch.randn(0), torch.randn(7, 5, generator=gen)]
truth = float(torch.cat([g.double().flatten() for g in grads]).norm())
params = []
for g in grads:
    p = torch.nn.Parameter(torch.empty_like(g)); p.grad = g.clone(); params.append(p)
total = fusedclip.clip_grad_norm_(params, 0.5 * truth)            # auto -> torch
assert math.isclose(float(total), truth, rel_tol=1e-5), (float(total), truth)
after = float(torch.cat([p.grad.double().flatten() for p in params]).norm())
assert math.isclose(after, 0.5 * truth, rel_tol=1e-5), (after, truth)
fusedclip.clip_grad_norm_(params, 1.0, backend="torch")
fusedclip.clip_grad_value_(params, 0.01)
assert all(float(p.grad.abs().max()) <= 0.01 for p in params if p.grad.numel())

for call in (lambda: fusedclip.clip_grad_norm_(params, 1.0, backend="cpu"),
             lambda: fusedclip.get_total_norm(grads, backend="cpu")):
    try:
        call()
    except RuntimeError as error:
        assert "backend 'cpu' is not available" in str(error), error
        assert "hidden by the test" in str(error), error
    else:
        raise AssertionError("backend='cpu' did not raise")
print("ok")
"""
    )
    assert result.stdout.strip().endswith("ok")
    # the fallback is logged once, with the reason
    assert result.stderr.count("could not be loaded") == 1, result.stderr
    assert "CPU tensors use the pure-PyTorch backend" in result.stderr


def test_env_backend_cpu_without_the_cpp_library_raises():
    _run(
        BLOCK_C
        + """
import torch, fusedclip
try:
    fusedclip.get_total_norm([torch.randn(3)])
except RuntimeError as error:
    assert "backend 'cpu' is not available" in str(error)
else:
    raise AssertionError("FUSEDCLIP_BACKEND=cpu did not raise without _C")
""",
        env={"FUSEDCLIP_BACKEND": "cpu"},
    )


# --- FUSEDCLIP_BACKEND (read at call time) -----------------------------------------------------------


def _spy_backend(monkeypatch):
    """Records the backend each fused clip_grad_norm_ call runs with."""
    seen = []
    real = operator("clip_grad_norm_")

    def spy(backend, tensors, max_norm, norm_type):
        seen.append(backend)
        return real(backend, tensors, max_norm, norm_type)

    patch_operator(monkeypatch, "clip_grad_norm_", spy)
    return seen


@pytest.mark.parametrize("value, expected", [("torch", "torch"), ("cpu", "cpu"), ("auto", "cpu"),
                                             ("", "cpu"), (None, "cpu")])
def test_env_selects_the_backend_for_auto(monkeypatch, value, expected):
    if value is not None:
        monkeypatch.setenv("FUSEDCLIP_BACKEND", value)
    assert _backends.resolve_backend("auto", torch.device("cpu")) == expected
    seen = _spy_backend(monkeypatch)
    grads = make_grads([(40,), (3, 3)], torch.float32, seed=70)
    truth = oracle_norm(grads, 2.0)
    total = fusedclip.clip_grad_norm_(params_with(grads), 0.5 * truth)
    assert seen == [expected]
    assert float(total) == pytest.approx(truth, rel=1e-5)
    assert oracle_norm(grads, 2.0) == pytest.approx(0.5 * truth, rel=1e-5)


def test_env_does_not_override_an_explicit_backend(monkeypatch):
    monkeypatch.setenv("FUSEDCLIP_BACKEND", "torch")
    seen = _spy_backend(monkeypatch)
    fusedclip.clip_grad_norm_(params_with(make_grads([(5,)], torch.float32, seed=71)), 1.0,
                              backend="cpu")
    assert seen == ["cpu"]


def test_env_torch_on_meta_and_auto_on_meta(monkeypatch):
    assert _backends.resolve_backend("auto", torch.device("meta")) == "torch"
    monkeypatch.setenv("FUSEDCLIP_BACKEND", "torch")
    assert _backends.resolve_backend("auto", torch.device("meta")) == "torch"


@pytest.mark.parametrize("value", ["gpu", "CPU", "triton-fast", " torch"])
def test_env_invalid_value_raises(monkeypatch, value):
    monkeypatch.setenv("FUSEDCLIP_BACKEND", value)
    grads = make_grads([(40,), (3, 3)], torch.float32, seed=72)
    originals = [g.clone() for g in grads]
    with pytest.raises(ValueError, match="FUSEDCLIP_BACKEND must be one of"):
        fusedclip.clip_grad_norm_(params_with(grads), 0.01)
    with pytest.raises(ValueError, match="FUSEDCLIP_BACKEND must be one of"):
        fusedclip.get_total_norm(grads)
    assert all(torch.equal(g, o) for g, o in zip(grads, originals))


def test_public_names():
    for name in ("clip_grad_norm_", "get_total_norm", "clip_grads_with_norm_", "clip_grad_value_",
                 "available_backends", "BACKENDS"):
        assert hasattr(fusedclip, name)
    assert set(fusedclip.available_backends()) <= set(fusedclip.BACKENDS)
    assert "torch" in fusedclip.available_backends()


def _package_copy(tmp_path, extension: bytes | None):
    """A copy of the fusedclip package without its compiled _C, or with a broken one in its place."""
    import shutil

    package = os.path.dirname(fusedclip.__file__)
    copy = tmp_path / "fusedclip"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("_C*", "__pycache__"))
    if extension is not None:
        import importlib.machinery

        (copy / ("_C" + importlib.machinery.EXTENSION_SUFFIXES[0])).write_bytes(extension)
    return str(tmp_path)


@pytest.mark.parametrize("case", ["not-built", "unloadable"])
def test_warning_says_why_c_did_not_load_and_what_to_do(tmp_path, case):
    """Without _C the warning says whether it is missing or refused (another torch), how to build
    it, and which backends run instead, once; not an import error's internals."""
    root = _package_copy(tmp_path, None if case == "not-built" else b"not an ELF file")
    result = _run(
        """
        import logging, sys
        logging.basicConfig(level=logging.WARNING)
        # Only the copy: an editable install's finder would map fusedclip._C to the source tree's.
        sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]
        import torch, fusedclip
        from fusedclip import _backends
        assert _backends._C is None
        assert fusedclip.get_total_norm([torch.ones(4)]).item() == 2.0
        print("ok")
        """,
        env={"PYTHONPATH": root},
        cwd=root,  # `python -c` looks in its working directory first
    )
    assert result.stdout.strip().endswith("ok")
    warning = result.stderr
    assert warning.count("fusedclip._C") == 1, warning
    assert "partially initialized" not in warning and "circular import" not in warning, warning
    assert "pip install --no-build-isolation -e ." in warning, warning
    assert "CPU tensors use the pure-PyTorch backend ('torch')" in warning, warning
    if case == "not-built":
        assert "fusedclip._C is not built" in warning, warning
    else:
        assert f"could not be loaded under torch {torch.__version__}" in warning, warning
