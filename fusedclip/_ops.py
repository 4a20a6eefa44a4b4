"""The operator layer: loads the C++ library, registers fake kernels, picks a backend per device.

Backends:
  "cpu"    C++ kernels in fusedclip._C (csrc/cpu/), for CPU tensors.
  "cuda"   CUDA kernels in fusedclip._C (csrc/cuda/), for CUDA tensors, when _C was built with them.
  "triton" Triton kernels (fusedclip/triton/), for CUDA tensors; for CPU tensors in a process
           started with TRITON_INTERPRET=1 (Triton's interpreter: slow, for tests).
  "torch"  pure PyTorch (fusedclip/reference.py), any device, nothing compiled.

Every primitive is called as ``<primitive>(backend, ...)``; "auto" is resolved per device by
:func:`resolve_backend` before that. The C++ operators are ``torch.ops.fusedclip.*``, whose
schemas are in csrc/fusedclip.cpp; their fake kernels below let torch.compile trace them.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Optional

import torch
from torch import Tensor

from fusedclip import fakes, reference

__all__ = [
    "BACKENDS",
    "backend_status",
    "resolve_backend",
    "multi_tensor_norm",
    "multi_tensor_scale_",
    "multi_tensor_clamp_",
    "clip_grad_norm_",
    "multi_tensor_agc_",
    "multi_tensor_scale_per_tensor_",
    "clip_grad_norm_with_norms_",
    "multi_tensor_unscale_norm",
    "monitor_update_",
    "NATIVE_BACKENDS",
    "KERNELS",
    "operator_table",
]

logger = logging.getLogger("fusedclip")

BACKENDS = ("auto", "cpu", "cuda", "triton", "torch")

try:
    from fusedclip import _C  # noqa: F401  (loading it registers the operators)

    _C_ERROR: Optional[str] = None
except (ImportError, OSError) as error:  # not built, or built against another torch
    _C = None
    _C_ERROR = f"fusedclip._C could not be loaded ({error})"
    logger.warning("%s; using the pure-PyTorch backend", _C_ERROR)

if _C is None:
    _CUDA_ERROR: Optional[str] = _C_ERROR
elif not getattr(_C, "cuda_kernels", False):
    _CUDA_ERROR = (
        "fusedclip._C was built without its CUDA kernels (they need a torch with CUDA and nvcc "
        "at build time)"
    )
else:
    _CUDA_ERROR = None


@functools.lru_cache(maxsize=None)
def _cuda_kernels_run_on(index: Optional[int]) -> bool:
    """Whether the CUDA kernels were built for the GPU's architecture (TORCH_CUDA_ARCH_LIST at
    build time); a GPU they were not built for takes another backend under "auto"."""
    return _C.cuda_kernels_run_on(torch.cuda.current_device() if index is None else index)


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
    return _TRITON_ERROR is None and _triton.ops.device_supported(device) is None


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
    if requested == "cpu":
        if _C_ERROR is not None:
            raise RuntimeError(f"backend 'cpu' is not available: {_C_ERROR}")
        if device.type != "cpu":
            raise ValueError(f"backend 'cpu' runs CPU tensors only, but gradients are on {device}")
        return "cpu"
    if requested == "cuda":
        if _CUDA_ERROR is not None:
            raise RuntimeError(f"backend 'cuda' is not available: {_CUDA_ERROR}")
        if device.type != "cuda":
            raise ValueError(f"backend 'cuda' runs CUDA tensors only, but gradients are on {device}")
        return "cuda"
    if requested == "triton":
        if _TRITON_ERROR is not None:
            raise RuntimeError(f"backend 'triton' is not available: {_TRITON_ERROR}")
        reason = _triton.ops.device_supported(device)
        if reason is not None:
            raise ValueError(f"backend 'triton' cannot run these gradients: {reason}")
        return "triton"
    check_backend_name(requested)  # what is left: "torch", or a name that is no backend
    return "torch"


# --- the operators, by backend --------------------------------------------------------------------

# The backends with a kernel of their own for each operator. On a backend missing from an
# operator's row the operator runs its pure-PyTorch kernel (reference.py) on that backend's
# device: operator_table() says so, and `python -m fusedclip info` prints it.
NATIVE_BACKENDS: dict[str, tuple[str, ...]] = {
    "multi_tensor_norm": ("cpu", "cuda", "triton", "torch"),
    "multi_tensor_scale_": ("cpu", "cuda", "triton", "torch"),
    "multi_tensor_clamp_": ("cpu", "cuda", "triton", "torch"),
    "clip_grad_norm_": ("cpu", "cuda", "triton", "torch"),
    "multi_tensor_agc_": ("cpu", "torch"),
    "multi_tensor_scale_per_tensor_": ("cpu", "torch"),
    "clip_grad_norm_with_norms_": ("cpu", "torch"),
    "multi_tensor_unscale_norm": ("cpu", "torch"),
    "monitor_update_": ("cpu", "torch"),
}


def _kernel_table() -> dict[str, dict[str, object]]:
    """KERNELS[operator][backend]: what runs the operator on each backend that can run here."""
    namespaces = {"torch": reference}
    if _C is not None:  # the C++ operators (csrc/fusedclip.cpp), CPU and CUDA kernels alike
        namespaces["cpu"] = torch.ops.fusedclip
    if _CUDA_ERROR is None:
        namespaces["cuda"] = torch.ops.fusedclip
    if _TRITON_ERROR is None:
        namespaces["triton"] = torch.ops.fusedclip_triton
    return {
        op: {b: getattr(namespaces[b] if b in native else reference, op) for b in namespaces}
        for op, native in NATIVE_BACKENDS.items()
    }


KERNELS = _kernel_table()


def operator_table() -> dict[str, dict[str, str]]:
    """For each operator and backend: "kernel" (its own), "torch" (reference.py runs it on that
    backend's device) or "unavailable" (the backend cannot run here, see backend_status)."""
    status = backend_status()
    return {
        op: {
            b: "unavailable" if status[b] is not None else ("kernel" if b in native else "torch")
            for b in status
        }
        for op, native in NATIVE_BACKENDS.items()
    }


def multi_tensor_norm(
    backend: str, tensors: list[Tensor], norm_type: float, per_tensor: bool = False
) -> tuple[Tensor, Tensor]:
    """The norm statistic before the root (and per tensor when asked); see csrc/fusedclip.cpp."""
    return KERNELS["multi_tensor_norm"][backend](tensors, norm_type, per_tensor)


def multi_tensor_scale_(backend: str, tensors: list[Tensor], coef: Tensor) -> None:
    """tensors *= coef in place; nothing is written when coef >= 1."""
    KERNELS["multi_tensor_scale_"][backend](tensors, coef)


def multi_tensor_clamp_(backend: str, tensors: list[Tensor], lo: float, hi: float) -> None:
    """tensors = clamp(tensors, lo, hi) in place, in one pass."""
    KERNELS["multi_tensor_clamp_"][backend](tensors, lo, hi)


def clip_grad_norm_(backend: str, tensors: list[Tensor], max_norm: float, norm_type: float) -> Tensor:
    """Norm, coefficient and scale of tensors on one device in one call; returns the norm."""
    return KERNELS["clip_grad_norm_"][backend](tensors, max_norm, norm_type)


def multi_tensor_agc_(
    backend: str, grads: list[Tensor], params: list[Tensor], clip_factor: float, eps: float
) -> tuple[Tensor, Tensor]:
    """Unit-wise adaptive gradient clipping in place; returns the pre-clip sums of squares."""
    return KERNELS["multi_tensor_agc_"][backend](grads, params, clip_factor, eps)


def multi_tensor_scale_per_tensor_(backend: str, tensors: list[Tensor], coefs: Tensor) -> None:
    """tensors[i] *= coefs[i] in place; tensor i is not written when coefs[i] >= 1."""
    KERNELS["multi_tensor_scale_per_tensor_"][backend](tensors, coefs)


def clip_grad_norm_with_norms_(
    backend: str, tensors: list[Tensor], max_norm: float, norm_type: float
) -> tuple[Tensor, Tensor]:
    """clip_grad_norm_ of tensors on one device, also returning the per-tensor norms."""
    return KERNELS["clip_grad_norm_with_norms_"][backend](tensors, max_norm, norm_type)


def multi_tensor_unscale_norm(
    backend: str, tensors: list[Tensor], inv_scale: Tensor, norm_type: float
) -> tuple[Tensor, Tensor]:
    """The statistic of tensors * inv_scale and found_inf, in one read; see csrc/fusedclip.cpp."""
    return KERNELS["multi_tensor_unscale_norm"][backend](tensors, inv_scale, norm_type)


def monitor_update_(backend: str, norms: Tensor, mean: Tensor, var: Tensor, count: Tensor, below: Tensor,
                    explosions: Tensor, exploding: Tensor, vanishing: Tensor, alpha: float, warmup_steps: int,
                    z_threshold: float, explode_threshold: Optional[float], vanish_eps: float,
                    vanish_steps: int) -> None:
    """GradientMonitor's per-step update, in place; see reference.monitor_update_."""
    KERNELS["monitor_update_"][backend](norms, mean, var, count, below, explosions, exploding, vanishing, alpha,
                                        warmup_steps, z_threshold, explode_threshold, vanish_eps, vanish_steps)


# --- entry points that take parameters (backend "cpu") ----------------------------------------
# They read the grads in C++ (see csrc/python_module.cpp); each returns None / False when it did
# not run (a parameter that is not exactly a Tensor or Parameter, or no grads), and raises,
# before anything is modified, where the operator refuses the grads (another device, a bad dtype).


def clip_grad_norm_of_params(params: list, max_norm: float, norm_type: float) -> Optional[Tensor]:
    return _C.clip_grad_norm_of(params, max_norm, norm_type)


def scale_grads_of_params_(params: list, coef: Tensor) -> bool:
    return _C.scale_grads_of(params, coef)


def clamp_grads_of_params_(params: list, lo: float, hi: float) -> bool:
    return _C.clamp_grads_of(params, lo, hi)


def clip_grad_norm_with_norms_of_params(
    params: list, max_norm: float, norm_type: float
) -> Optional[tuple[Tensor, Tensor]]:
    """(total norm, one norm per parameter, 0 where it has no grad)."""
    return _C.clip_grad_norm_with_norms_of(params, max_norm, norm_type)


# --- fake kernels (fusedclip/fakes.py, one per schema) -----------------------------------------

if _C is not None:
    fakes.register("fusedclip", fakes.FAKES)
