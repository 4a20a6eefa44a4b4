"""The backends: loads the C++ library and Triton, says which backends can run here, and picks
the backend of each device.

Backends:
  "cpu"    C++ kernels in fusedclip._C (csrc/cpu/), for CPU tensors.
  "cuda"   CUDA kernels in fusedclip._C (csrc/cuda/), for CUDA tensors, when _C was built with them.
  "triton" Triton kernels (fusedclip/triton/), for CUDA tensors; for CPU tensors in a process
           started with TRITON_INTERPRET=1 (Triton's interpreter: slow, for tests).
  "torch"  pure PyTorch (fusedclip/reference.py), any device, nothing compiled.

Loading fails softly: without _C (not built, or built against another torch) or without triton,
the backend is reported unavailable with the reason (backend_status) and "auto" takes another.
"""

from __future__ import annotations

import importlib.machinery
import logging
import os
from typing import Optional

import torch

__all__ = ["BACKENDS", "backend_status", "check_backend_name", "resolve_backend"]

logger = logging.getLogger("fusedclip")

BACKENDS = ("auto", "cpu", "cuda", "triton", "torch")



def _c_error(error: BaseException) -> str:
    """Why fusedclip._C did not load, and what to do: not built at all, or built but refused (most
    often built against another torch)."""
    package = os.path.dirname(os.path.abspath(__file__))
    built = [name for name in sorted(os.listdir(package))
             if any(name == "_C" + suffix for suffix in importlib.machinery.EXTENSION_SUFFIXES)]
    if not built:
        return (f"fusedclip._C is not built (no compiled extension in {package}); build it from the "
                "source tree with `pip install --no-build-isolation -e .`, against the torch installed")
    return (f"fusedclip._C ({built[0]}) could not be loaded ({error}); it was most likely built against "
            f"another torch than this one ({torch.__version__}): rebuild it with "
            "`pip install --no-build-isolation -e .`")


try:
    from fusedclip import _C  # noqa: F401  (loading it registers the operators)

    _C_ERROR: Optional[str] = None
except (ImportError, OSError) as error:  # not built, or built against another torch
    _C = None
    _C_ERROR = _c_error(error)
    logger.warning("%s. Meanwhile CPU tensors use the pure-PyTorch backend ('torch'), CUDA tensors "
                   "'triton' where Triton imports, else 'torch'", _C_ERROR)

if _C is None:
    _CUDA_ERROR: Optional[str] = _C_ERROR
elif not getattr(_C, "cuda_kernels", False):
    _CUDA_ERROR = (
        "fusedclip._C was built without its CUDA kernels (they need a torch with CUDA and nvcc "
        "at build time)"
    )
else:
    _CUDA_ERROR = None


_KERNELS_RUN_ON: dict[int, bool] = {}  # by GPU index: _cuda_kernels_run_on's answers


# A constant to torch.compile: dynamo calls it while tracing, instead of tracing into _C (which
# it cannot, so "auto" on CUDA tensors broke every fullgraph compile).
@torch.compiler.assume_constant_result
def _cuda_kernels_run_on(index: Optional[int]) -> bool:
    """Whether the CUDA kernels were built for the GPU's architecture (TORCH_CUDA_ARCH_LIST at
    build time); a GPU they were not built for takes another backend under "auto"."""
    index = torch.cuda.current_device() if index is None else index
    if index not in _KERNELS_RUN_ON:
        _KERNELS_RUN_ON[index] = bool(_C.cuda_kernels_run_on(index))
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
