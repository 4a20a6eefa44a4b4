"""The backends: defines the operators, loads the native libraries and Triton, says which
backends can run here, and picks the backend of each device.

Backends:
  "cpu"    C++ kernels in fusedclip._C (csrc/cpu/), for CPU tensors.
  "cuda"   CUDA kernels in fusedclip._C_cuda (csrc/cuda/), for CUDA tensors, where it was built
           and torch has CUDA.
  "triton" Triton kernels (fusedclip/triton/), for CUDA tensors; for CPU tensors in a process
           started with TRITON_INTERPRET=1 (Triton's interpreter: slow, for tests).
  "torch"  pure PyTorch (fusedclip/reference.py), any device, nothing compiled.

The native libraries are built on PyTorch's stable ABI for torch 2.10 and newer. Loading fails
softly: on an older torch, or without a library (not built, or refused by the loader), the backend
is reported unavailable with the reason (backend_status), ``import fusedclip`` warns once, and
"auto" takes another.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import logging
import os
from typing import Optional

import torch

from fusedclip import operators

__all__ = ["BACKENDS", "backend_status", "check_backend_name", "resolve_backend", "MIN_TORCH"]

logger = logging.getLogger("fusedclip")

BACKENDS = ("auto", "cpu", "cuda", "triton", "torch")

# The oldest torch whose stable ABI the native libraries call (setup.py's TORCH_TARGET_VERSION).
MIN_TORCH = (2, 10)

# The operators' definitions (fusedclip::<op>), kept alive for as long as the process runs: the
# native libraries register kernels for them when they load.
_LIBRARY = operators.define("fusedclip")


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def _native_error(module: str, error: BaseException) -> str:
    """Why fusedclip.<module> did not load, and what to do: not built at all, or built but refused."""
    package = os.path.dirname(os.path.abspath(__file__))
    built = [name for name in sorted(os.listdir(package))
             if any(name == module + suffix for suffix in importlib.machinery.EXTENSION_SUFFIXES)]
    if not built:
        how = ("build it from the source tree with `FUSEDCLIP_CUDA=1 pip install --no-build-isolation -e .` "
               "(nvcc needed)" if module == "_C_cuda" else
               "install the wheel (`pip install fusedclip`) or build from the source tree with "
               "`pip install --no-build-isolation -e .`")
        return f"fusedclip.{module} is not built (no compiled library in {package}); {how}"
    return (f"fusedclip.{module} ({built[0]}) could not be loaded under torch {torch.__version__}: {error}; "
            "reinstall the wheel, or rebuild from the source tree with `pip install --no-build-isolation -e .`")


def _load(module: str) -> tuple[Optional[object], Optional[str]]:
    """(the native library, None), or (None, why it is not available)."""
    if _torch_version() < MIN_TORCH:
        return None, (f"the native libraries need torch {MIN_TORCH[0]}.{MIN_TORCH[1]} or newer "
                      f"(its stable ABI), this is torch {torch.__version__}")
    try:
        return importlib.import_module(f"fusedclip.{module}"), None
    except (ImportError, OSError) as error:
        return None, _native_error(module, error)


_C, _C_ERROR = _load("_C")  # importing it registers the CPU kernels
if _C_ERROR is not None:
    logger.warning("%s. Meanwhile CPU tensors use the pure-PyTorch backend ('torch'), CUDA tensors "
                   "'triton' where Triton imports, else 'torch'", _C_ERROR)
elif _C.cpu_isa_request_ignored:
    logger.warning("FUSEDCLIP_CPU_ISA=%r names no instruction set this CPU and build can run (%s at most); the "
                   "CPU kernels use %s", os.environ.get("FUSEDCLIP_CPU_ISA"), _C.widest_cpu_isa, _C.cpu_isa)

if torch.version.cuda is None:
    _C_CUDA, _CUDA_ERROR = None, "this torch has no CUDA"
else:
    _C_CUDA, _CUDA_ERROR = _load("_C_cuda")  # importing it registers the CUDA kernels


_KERNELS_RUN_ON: dict[int, bool] = {}  # by GPU index: _cuda_kernels_run_on's answers


# A constant to torch.compile: dynamo calls it while tracing, instead of tracing into the
# library (which it cannot, so "auto" on CUDA tensors broke every fullgraph compile).
@torch.compiler.assume_constant_result
def _cuda_kernels_run_on(index: Optional[int]) -> bool:
    """Whether the CUDA kernels were built for the GPU's architecture (TORCH_CUDA_ARCH_LIST at
    build time); a GPU they were not built for takes another backend under "auto"."""
    index = torch.cuda.current_device() if index is None else index
    if index not in _KERNELS_RUN_ON:
        _KERNELS_RUN_ON[index] = bool(_C_CUDA.kernels_run_on(index))
    return _KERNELS_RUN_ON[index]


try:
    from fusedclip import triton as _triton

    _TRITON_ERROR: Optional[str] = None
except ImportError as error:  # triton not installed (it is optional)
    _triton = None
    _TRITON_ERROR = f"triton could not be imported ({error})"


def backend_status() -> dict[str, Optional[str]]:
    """For each backend, None when it is available, else the reason it is not."""
    return {"cpu": _C_ERROR, "cuda": _CUDA_ERROR, "triton": _TRITON_ERROR, "torch": None}


def _triton_runs(device: torch.device) -> bool:
    return _TRITON_ERROR is None and _triton.tables.device_supported(device) is None


def check_backend_name(backend: str) -> None:
    """Raises ValueError unless backend is one of BACKENDS (for a check before the devices are
    known; resolve_backend then says whether it runs them)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def resolve_backend(requested: str, device: torch.device) -> str:
    """The backend that runs tensors on ``device``, given the ``backend`` argument.

    "auto" takes the FUSEDCLIP_BACKEND environment variable when it is set, else the fastest
    backend available for the device.
    """
    if requested == "auto":
        requested = os.environ.get("FUSEDCLIP_BACKEND", "auto") or "auto"
        if requested not in BACKENDS:
            raise ValueError(f"FUSEDCLIP_BACKEND must be one of {BACKENDS}, got {requested!r}")
        if requested == "auto":
            if device.type == "cpu" and _C is not None:
                return "cpu"
            # Between the GPU backends, auto is to take the one measured faster on the device;
            # until a GPU has measured them, the CUDA kernels come first.
            if device.type == "cuda" and _CUDA_ERROR is None and _cuda_kernels_run_on(device.index):
                return "cuda"
            if device.type == "cuda" and _triton_runs(device):
                return "triton"
            return "torch"
    check_backend_name(requested)
    if requested == "torch":
        return "torch"
    reason = backend_status()[requested]
    if reason is not None:
        raise RuntimeError(f"backend {requested!r} is not available: {reason}")
    reason = _device_refusal(requested, device)
    if reason is not None:
        raise ValueError(f"backend {requested!r} {reason}")
    return requested


def _device_refusal(backend: str, device: torch.device) -> Optional[str]:
    """Why an available native backend cannot run tensors on device; None when it can."""
    if backend == "triton":
        reason = _triton.tables.device_supported(device)
        return None if reason is None else f"cannot run these gradients: {reason}"
    if device.type != backend:  # "cpu" and "cuda" run the tensors of their own device type
        return f"runs {backend.upper()} tensors only, but gradients are on {device}"
    return None
