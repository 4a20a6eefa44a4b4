"""The operator layer: one table maps each (operator, backend) to its kernel.

Every operator is called as ``<operator>(backend, ...)`` with a backend already resolved for the
tensors' device (fusedclip/_backends.py: resolve_backend). The C++ operators are
``torch.ops.fusedclip.*``, whose schemas are in csrc/fusedclip.cpp; the Triton ones
``torch.ops.fusedclip_triton.*`` with the same schemas (fusedclip/triton/ops.py). Both are
called straight in eager mode and through torch.ops where torch traces (fusedclip/_eager.py);
fusedclip/fakes.py has their fake kernels for torch.compile.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fusedclip import fakes, reference
from fusedclip._eager import EagerOperator
from fusedclip._backends import _C, _CUDA_ERROR, _TRITON_ERROR, _triton, backend_status

__all__ = [
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

# --- the operators, by backend --------------------------------------------------------------------

# The backends with a kernel of their own for each operator. On a backend missing from an
# operator's row the operator runs its pure-PyTorch kernel (reference.py) on that backend's
# device: operator_table() says so, and `python -m fusedclip info` prints it.
NATIVE_BACKENDS: dict[str, tuple[str, ...]] = {
    "multi_tensor_norm": ("cpu", "cuda", "triton", "torch"),
    "multi_tensor_scale_": ("cpu", "cuda", "triton", "torch"),
    "multi_tensor_clamp_": ("cpu", "cuda", "triton", "torch"),
    "clip_grad_norm_": ("cpu", "cuda", "triton", "torch"),
    "multi_tensor_agc_": ("cpu", "cuda", "triton", "torch"),
    "multi_tensor_scale_per_tensor_": ("cpu", "cuda", "triton", "torch"),
    "clip_grad_norm_with_norms_": ("cpu", "cuda", "triton", "torch"),
    "multi_tensor_unscale_norm": ("cpu", "cuda", "triton", "torch"),
    "monitor_update_": ("cpu", "cuda", "triton", "torch"),
}


def _cpp_operator(op: str):
    """A C++ operator as fusedclip calls it: fusedclip._C.direct.<op> in eager mode (see
    fusedclip/_eager.py), torch.ops.fusedclip.<op> where torch traces, or where no direct
    call exists (monitor_update_, whose arguments are a few tensors, not a list)."""
    torch_op = getattr(torch.ops.fusedclip, op)
    direct = getattr(_C.direct, op, None)
    return torch_op if direct is None else EagerOperator(torch_op, direct)


def _kernel_table() -> dict[str, dict[str, object]]:
    """KERNELS[operator][backend]: what runs the operator on each backend that can run here."""
    kernels = {"torch": lambda op: getattr(reference, op)}
    if _C is not None:  # the C++ operators (csrc/fusedclip.cpp), CPU and CUDA kernels alike
        kernels["cpu"] = _cpp_operator
    if _CUDA_ERROR is None:
        kernels["cuda"] = _cpp_operator
    if _TRITON_ERROR is None:
        kernels["triton"] = lambda op: getattr(_triton.ops, op)  # EagerOperators too
    return {
        op: {b: (kernel if b in native else kernels["torch"])(op) for b, kernel in kernels.items()}
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
