"""The operator layer: each (operator, backend) to its kernel, all called one way.

Every operator is called as ``<operator>(backend, ...)`` with a backend already resolved for the
tensors' device (fusedclip/_backends.py: resolve_backend). Backends "cpu" and "cuda" are
``torch.ops.fusedclip.<op>`` (the dispatcher picks the CPU or CUDA kernel), "triton" is
``torch.ops.fusedclip_triton.<op>``, "torch" is fusedclip/reference.py. The native and Triton
operators go through fusedclip.operators.call: refusals raised as TypeError or ValueError, version
counters bumped for what was written (none of these operators bumps its own). Schemas and fake
kernels: fusedclip/operators.py.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fusedclip import operators, reference
from fusedclip._backends import _C, _C_CUDA, _TRITON_ERROR, backend_status

__all__ = list(operators.NAMES) + ["NATIVE_BACKENDS", "KERNELS", "operator_table"]


def _has_kernel(name: str, dispatch_key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"fusedclip::{name}", dispatch_key)


def _native_backends(name: str) -> tuple[str, ...]:
    """The backends with a kernel of their own for the operator here: read from the dispatcher
    (what the native libraries registered) and the Triton library, never listed by hand."""
    backends = []
    if _C is not None and _has_kernel(name, "CPU"):
        backends.append("cpu")
    if _C_CUDA is not None and _has_kernel(name, "CUDA"):
        backends.append("cuda")
    if _TRITON_ERROR is None and hasattr(torch.ops.fusedclip_triton, name):
        backends.append("triton")
    return tuple(backends) + ("torch",)


# The backends with a kernel of their own for each operator. On a backend missing from an
# operator's row the operator runs its pure-PyTorch kernel (reference.py) on that backend's device:
# operator_table() says so, and `python -m fusedclip info` prints it.
NATIVE_BACKENDS: dict[str, tuple[str, ...]] = {name: _native_backends(name) for name in operators.NAMES}


def _dispatched(namespace: str, name: str, exact_writes: bool):
    op = getattr(getattr(torch.ops, namespace), name).default
    return lambda *args: operators.call(op, name, args, exact_writes)


def _kernels_of(name: str) -> dict[str, object]:
    native = NATIVE_BACKENDS[name]
    kernels = {"torch": getattr(reference, name)}
    if "cpu" in native:  # a CPU kernel decides its writes on the host
        kernels["cpu"] = _dispatched("fusedclip", name, exact_writes=True)
    if "cuda" in native:
        kernels["cuda"] = _dispatched("fusedclip", name, exact_writes=False)
    if "triton" in native:  # decides on the device, as CUDA does
        kernels["triton"] = _dispatched("fusedclip_triton", name, exact_writes=False)
    return kernels


# KERNELS[operator][backend]: what runs the operator on each backend that can run here.
KERNELS = {name: _kernels_of(name) for name in operators.NAMES}


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


def _kernel(name: str, backend: str):
    kernels = KERNELS[name]
    return kernels.get(backend, kernels["torch"])


def multi_tensor_norm(
    backend: str, tensors: list[Tensor], norm_type: float, per_tensor: bool = False
) -> tuple[Tensor, Tensor]:
    """The norm statistic before the root (and per tensor when asked); see fusedclip/operators.py."""
    return _kernel("multi_tensor_norm", backend)(tensors, norm_type, per_tensor)


def multi_tensor_scale_(backend: str, tensors: list[Tensor], coef: Tensor) -> None:
    """tensors *= coef in place; nothing is written when coef >= 1."""
    _kernel("multi_tensor_scale_", backend)(tensors, coef)


def multi_tensor_clamp_(backend: str, tensors: list[Tensor], lo: float, hi: float) -> None:
    """tensors = clamp(tensors, lo, hi) in place, in one pass."""
    _kernel("multi_tensor_clamp_", backend)(tensors, lo, hi)


def clip_grad_norm_(backend: str, tensors: list[Tensor], max_norm: float, norm_type: float) -> Tensor:
    """Norm, coefficient and scale of tensors on one device in one call; returns the norm."""
    return _kernel("clip_grad_norm_", backend)(tensors, max_norm, norm_type)


def multi_tensor_agc_(
    backend: str, grads: list[Tensor], params: list[Tensor], clip_factor: float, eps: float
) -> tuple[Tensor, Tensor]:
    """Unit-wise adaptive gradient clipping in place; returns the pre-clip sums of squares."""
    return _kernel("multi_tensor_agc_", backend)(grads, params, clip_factor, eps)


def multi_tensor_scale_per_tensor_(backend: str, tensors: list[Tensor], coefs: Tensor) -> None:
    """tensors[i] *= coefs[i] in place; tensor i is not written when coefs[i] >= 1."""
    _kernel("multi_tensor_scale_per_tensor_", backend)(tensors, coefs)


def clip_grad_norm_with_norms_(
    backend: str, tensors: list[Tensor], max_norm: float, norm_type: float
) -> tuple[Tensor, Tensor]:
    """clip_grad_norm_ of tensors on one device, also returning the per-tensor norms."""
    return _kernel("clip_grad_norm_with_norms_", backend)(tensors, max_norm, norm_type)


def multi_tensor_unscale_norm(
    backend: str, tensors: list[Tensor], inv_scale: Tensor, norm_type: float
) -> tuple[Tensor, Tensor]:
    """The statistic of tensors * inv_scale and found_inf, in one read; see fusedclip/operators.py."""
    return _kernel("multi_tensor_unscale_norm", backend)(tensors, inv_scale, norm_type)


def monitor_update_(backend: str, norms: Tensor, mean: Tensor, var: Tensor, count: Tensor, below: Tensor,
                    explosions: Tensor, exploding: Tensor, vanishing: Tensor, alpha: float, warmup_steps: int,
                    z_threshold: float, explode_threshold: Optional[float], vanish_eps: float,
                    vanish_steps: int) -> None:
    """GradientMonitor's per-step update, in place; see reference.monitor_update_."""
    _kernel("monitor_update_", backend)(norms, mean, var, count, below, explosions, exploding, vanishing, alpha,
                                        warmup_steps, z_threshold, explode_threshold, vanish_eps, vanish_steps)
