"""The operator layer: each (operator, backend) to its kernel, all called one way.

Every operator is called as ``run("<operator>", backend, ...)`` with a backend already resolved
for the tensors' device (fusedclip/_backends.py: resolve_backend). Backends "cpu" and "cuda" are
``torch.ops.fusedclip.<op>`` (the dispatcher picks the CPU or CUDA kernel), "triton" is
``torch.ops.fusedclip_triton.<op>``, "torch" is fusedclip/reference.py. The native and Triton
operators go through fusedclip.operators.call: refusals raised as TypeError or ValueError, version
counters bumped for what was written (none of these operators bumps its own). Schemas and fake
kernels: fusedclip/operators.py.
"""

from __future__ import annotations

import torch

from fusedclip import operators, reference
from fusedclip._backends import _C, _C_CUDA, _TRITON_ERROR, backend_status

__all__ = ["run", "NATIVE_BACKENDS", "KERNELS", "operator_table"]


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


def run(name: str, backend: str, *args):
    """Operator `name` on `backend` (resolved for the tensors' device): its kernel there, or its
    pure-PyTorch one where the backend has none. The arguments are the schema's, in its order
    (fusedclip/operators.py, where each operator's semantics are stated beside its schema)."""
    return _kernel(name, backend)(*args)
