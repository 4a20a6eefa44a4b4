"""Fixtures and hooks of the fusedclip test suite. The helpers (data, the float64 oracle,
assertions, Backend) are plain functions in helpers.py, imported as ``from helpers import ...``.

The ``backend`` fixture runs each operator contract on every backend, as a Backend(name,
device): the tensors of a case must live on ``backend.device``.

- ``cpu`` and ``torch``: CPU tensors, everywhere.
- ``triton``: in a process started with TRITON_INTERPRET=1, CPU tensors in Triton's interpreter
  (marker ``triton_interpreter``); elsewhere CUDA tensors (marker ``cuda``). A plain run without
  a GPU therefore skips it, and test_triton.py::test_interpreted_suite runs every
  ``triton_interpreter`` case of the suite in a subprocess that sets the variable (it must be
  set before triton is imported).
- ``cuda``: CUDA tensors (marker ``cuda``), when fusedclip._C was built with its CUDA kernels.

CUDA is queried at the setup of marked tests only, never at import time.
"""

from __future__ import annotations

import pytest
import torch

from helpers import INTERPRETED, Backend, InterpretedSuite

_CPU = torch.device("cpu")
_CUDA = torch.device("cuda")

_TRITON_NEEDS_CUDA = (
    "backend 'triton' runs CUDA tensors and there is no CUDA device; its cases run on CPU tensors "
    "in Triton's interpreter, in the TRITON_INTERPRET=1 subprocess of "
    "test_triton.py::test_interpreted_suite"
)

_CUDA_NEEDS_CUDA = "backend 'cuda' runs CUDA tensors and there is no CUDA device"


def _triton_param():
    if INTERPRETED:
        return pytest.param(Backend("triton", _CPU), marks=pytest.mark.triton_interpreter, id="triton")
    return pytest.param(Backend("triton", _CUDA), marks=pytest.mark.cuda(reason=_TRITON_NEEDS_CUDA),
                        id="triton")


def _available(backend: Backend) -> Backend:
    from fusedclip import _backends

    reason = _backends.backend_status()[backend.name]
    if reason is None:
        return backend
    if backend.name == "triton":  # a test dependency: missing, the suite fails, it never skips
        pytest.fail(f"backend 'triton' is not available: {reason}")
    pytest.skip(f"backend {backend.name!r} is not available: {reason}")


@pytest.fixture(params=[
    pytest.param(Backend("cpu", _CPU), id="cpu"),
    pytest.param(Backend("torch", _CPU), id="torch"),
    _triton_param(),
    pytest.param(Backend("cuda", _CUDA), marks=pytest.mark.cuda(reason=_CUDA_NEEDS_CUDA), id="cuda"),
])
def backend(request) -> Backend:
    """Each backend, with the device its tensors live on (see the module's docstring)."""
    return _available(request.param)


@pytest.fixture(params=[_triton_param()])
def triton_backend(request) -> Backend:
    """Backend "triton" alone, for its own behaviour (tests/test_triton.py): the same case as the
    ``backend`` fixture's "triton"."""
    return _available(request.param)


@pytest.fixture(autouse=True)
def _no_backend_env(monkeypatch):
    """FUSEDCLIP_BACKEND from the environment must not change what a test checks."""
    monkeypatch.delenv("FUSEDCLIP_BACKEND", raising=False)


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "triton_interpreter: runs backend 'triton' on CPU tensors in Triton's interpreter (set only "
        "in a TRITON_INTERPRET=1 process; test_triton.py::test_interpreted_suite selects them)",
    )


def pytest_runtest_setup(item):
    # Queried at setup of marked tests only, never at import time of a test module.
    marker = item.get_closest_marker("cuda")
    if marker is not None and not torch.cuda.is_available():
        pytest.skip(marker.kwargs.get("reason", "needs a CUDA device"))


def _runs_tests(session) -> bool:
    """Whether the run goes on to run its tests: not a collection only (or a setup plan), and not a
    collection with errors that stops the run."""
    option = session.config.option
    if option.collectonly or getattr(option, "setupplan", False):
        return False
    return not (session.testsfailed and not option.continue_on_collection_errors)


def pytest_collection_finish(session):
    """Starts the interpreted Triton suite's subprocess as soon as this run is known to include
    test_triton.py::test_interpreted_suite and to run tests, so that it runs beside the rest (see
    helpers.py)."""
    if not INTERPRETED and _runs_tests(session) and any(item.name == "test_interpreted_suite"
                                                         for item in session.items):
        InterpretedSuite.start()


def pytest_sessionfinish(session, exitstatus):
    """The interpreted suite's subprocess ends with the run, however the run ends (its end, -x,
    Ctrl-C, an internal error): nothing started here outlives pytest."""
    InterpretedSuite.stop()


def pytest_unconfigure(config):
    InterpretedSuite.stop()
