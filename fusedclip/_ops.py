"""The operator layer: loads the C++ library, registers fake kernels, picks a backend per device.

Backends:
  "cpu"    C++ kernels in fusedclip._C (csrc/cpu/), for CPU tensors.
  "torch"  pure PyTorch (fusedclip/reference.py), any device, nothing compiled.

Every primitive is called as ``<primitive>(backend, ...)``; "auto" is resolved per device by
:func:`resolve_backend` before that. The C++ operators are ``torch.ops.fusedclip.*``, whose
schemas are in csrc/fusedclip.cpp; their fake kernels below let torch.compile trace them.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import torch
from torch import Tensor

from fusedclip import reference

__all__ = [
    "BACKENDS",
    "backend_status",
    "resolve_backend",
    "multi_tensor_norm",
    "multi_tensor_scale_",
    "multi_tensor_clamp_",
    "clip_grad_norm_",
    "multi_tensor_unscale_norm",
]

logger = logging.getLogger("fusedclip")

BACKENDS = ("auto", "cpu", "torch")

try:
    from fusedclip import _C  # noqa: F401  (loading it registers the operators)

    _C_ERROR: Optional[str] = None
except (ImportError, OSError) as error:  # not built, or built against another torch
    _C = None
    _C_ERROR = f"fusedclip._C could not be loaded ({error})"
    logger.warning("%s; using the pure-PyTorch backend", _C_ERROR)


def backend_status() -> dict[str, Optional[str]]:
    """For each backend, None when it is available, else the reason it is not."""
    return {"cpu": _C_ERROR, "torch": None}


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
            return "cpu" if device.type == "cpu" and _C is not None else "torch"
    if requested == "cpu":
        if _C_ERROR is not None:
            raise RuntimeError(f"backend 'cpu' is not available: {_C_ERROR}")
        if device.type != "cpu":
            raise ValueError(f"backend 'cpu' runs CPU tensors only, but gradients are on {device}")
        return "cpu"
    if requested == "torch":
        return "torch"
    raise ValueError(f"backend must be one of {BACKENDS}, got {requested!r}")


# --- the primitives, by backend ----------------------------------------------------------------


def multi_tensor_norm(
    backend: str, tensors: list[Tensor], norm_type: float, per_tensor: bool = False
) -> tuple[Tensor, Tensor]:
    """The norm statistic before the root (and per tensor when asked); see csrc/fusedclip.cpp."""
    if backend == "cpu":
        return torch.ops.fusedclip.multi_tensor_norm(tensors, norm_type, per_tensor)
    return reference.multi_tensor_norm(tensors, norm_type, per_tensor)


def multi_tensor_scale_(backend: str, tensors: list[Tensor], coef: Tensor) -> None:
    """tensors *= coef in place; nothing is written when coef >= 1."""
    if backend == "cpu":
        torch.ops.fusedclip.multi_tensor_scale_(tensors, coef)
    else:
        reference.multi_tensor_scale_(tensors, coef)


def multi_tensor_clamp_(backend: str, tensors: list[Tensor], lo: float, hi: float) -> None:
    """tensors = clamp(tensors, lo, hi) in place, in one pass."""
    if backend == "cpu":
        torch.ops.fusedclip.multi_tensor_clamp_(tensors, lo, hi)
    else:
        reference.multi_tensor_clamp_(tensors, lo, hi)


def clip_grad_norm_(backend: str, tensors: list[Tensor], max_norm: float, norm_type: float) -> Tensor:
    """Norm, coefficient and scale of tensors on one device in one call; returns the norm."""
    if backend == "cpu":
        return torch.ops.fusedclip.clip_grad_norm_(tensors, max_norm, norm_type)
    return reference.clip_grad_norm_(tensors, max_norm, norm_type)


def multi_tensor_unscale_norm(
    backend: str, tensors: list[Tensor], inv_scale: Tensor, norm_type: float
) -> tuple[Tensor, Tensor]:
    """The statistic of tensors * inv_scale and found_inf, in one read; see csrc/fusedclip.cpp."""
    if backend == "cpu":
        return torch.ops.fusedclip.multi_tensor_unscale_norm(tensors, inv_scale, norm_type)
    return reference.multi_tensor_unscale_norm(tensors, inv_scale, norm_type)


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


# --- fake kernels: shapes and dtypes only, for torch.compile and opcheck -----------------------


def _check_one_device(tensors: list[Tensor], op: str) -> None:
    """The operators take the tensors of one device. A list mixing CPU and meta tensors is
    dispatched to the Meta kernel (these fake impls) by the dispatcher, which would otherwise
    return an uninitialised norm and write nothing; refusing it sends clip.py to its per-device
    path, which raises as torch does."""
    device = tensors[0].device
    for i, t in enumerate(tensors):
        if t.device != device:
            raise RuntimeError(
                f"fusedclip.{op}: all tensors must be on one device, but tensor 0 is on {device} "
                f"and tensor {i} on {t.device}"
            )


if _C is not None:

    @torch.library.register_fake("fusedclip::multi_tensor_norm")
    def _multi_tensor_norm_fake(tensors, norm_type, per_tensor=False):
        _check_one_device(tensors, "multi_tensor_norm")
        acc = reference.accumulate_dtype(tensors)
        device = tensors[0].device
        count = len(tensors) if per_tensor else 0
        return tensors[0].new_empty((), dtype=acc, device=device), tensors[0].new_empty(
            (count,), dtype=acc, device=device
        )

    @torch.library.register_fake("fusedclip::multi_tensor_scale_")
    def _multi_tensor_scale_fake(tensors, coef):
        _check_one_device(tensors, "multi_tensor_scale_")
        return None

    @torch.library.register_fake("fusedclip::multi_tensor_clamp_")
    def _multi_tensor_clamp_fake(tensors, lo, hi):
        _check_one_device(tensors, "multi_tensor_clamp_")
        return None

    @torch.library.register_fake("fusedclip::clip_grad_norm_")
    def _clip_grad_norm_fake(tensors, max_norm, norm_type):
        _check_one_device(tensors, "clip_grad_norm_")
        return tensors[0].new_empty((), dtype=reference.accumulate_dtype(tensors))

    @torch.library.register_fake("fusedclip::multi_tensor_unscale_norm")
    def _multi_tensor_unscale_norm_fake(tensors, inv_scale, norm_type):
        _check_one_device(tensors, "multi_tensor_unscale_norm")
        statistic = tensors[0].new_empty((), dtype=reference.accumulate_dtype(tensors))
        return statistic, tensors[0].new_empty((), dtype=torch.float32)
