"""Launchers and operators of backend "triton": ``torch.ops.fusedclip_triton.*``.

The four operators have the schemas and semantics of the C++ library's (csrc/fusedclip.cpp), in
their own namespace so that they never clash with kernels registered for ``fusedclip::``.

A call builds (or finds in a cache) one device table of int64 describing every chunk of every
tensor (tables.py), then launches one kernel per dtype present (launch.py): the norm
of 10,000 float32 tensors is one launch, plus one for the per-tensor statistics when asked. The
fused clip is one norm launch and one scale launch per dtype, with the coefficient passed from
one to the other in device memory: no host sync anywhere.

The operators are defined with ``torch.library.Library`` (one kernel for every device, fake
kernels for torch.compile and opcheck, and an ADInplaceOrView kernel that bumps the written
tensors' version counters in one call), not as triton_ops: a triton_op's body must be
traceable with fake tensors (that is how torch.compile sees its kernels), and a table of raw
addresses cannot be built from fake tensors, which have none. With fake kernels,
torch.compile(fullgraph=True) puts them in its graph as single nodes, as it does the C++
operators. (``torch.library.custom_op`` would bump version counters one tensor at a time in
Python: ~0.35 ms at 1,000 tensors.)
"""


from __future__ import annotations

import math

import torch
from torch import Tensor

from fusedclip import fakes, numerics
from fusedclip._eager import EagerOperator
from fusedclip.triton import kernels
from fusedclip.triton.launch import bits, norm, transform
from fusedclip.triton.tables import operands_of, prepare

__all__ = ["multi_tensor_norm", "multi_tensor_scale_", "multi_tensor_clamp_", "clip_grad_norm_"]


def _check_norm_type(norm_type: float) -> None:
    if math.isnan(norm_type):
        raise RuntimeError("fusedclip_triton: norm_type must not be nan")


# --- operators --------------------------------------------------------------------------------------

_library = torch.library.Library("fusedclip_triton", "DEF")

try:
    from fusedclip._C import bump_versions as _bump_versions  # ~5 ns a tensor
except (ImportError, OSError):  # not built
    _bump_versions = None


def _operator(schema: str, mutates: bool = False):
    """Defines ``fusedclip_triton::<schema>`` with the decorated function as its kernel for every
    device, and returns it as fusedclip calls it (fusedclip/_eager.py: the kernel straight in eager
    mode). An in-place operator (its first argument the list it writes) bumps the version
    counters of that list in one C++ call before running: what a ``custom_op`` does one tensor at
    a time in Python (~0.35 ms at 1,000 tensors)."""

    def define(kernel):
        name = schema.split("(")[0]
        _library.define(schema)
        _library.impl(name, kernel, "CompositeExplicitAutograd")
        op = getattr(torch.ops.fusedclip_triton, name)
        if mutates:
            below = torch._C._after_ADInplaceOrView_keyset
            bump = _bump_versions or torch._C._increment_version

            def bump_versions(keyset, tensors, *args):
                bump(tensors)
                return op.default.redispatch(keyset & below, tensors, *args)

            _library.impl(name, bump_versions, "ADInplaceOrView", with_keyset=True)
        if _bump_versions is None:  # not built: every call goes through torch.ops
            return EagerOperator(op, op)
        if not mutates:
            return EagerOperator(op, kernel)

        def bump_and_run(tensors, *args):
            _bump_versions(tensors)
            return kernel(tensors, *args)

        return EagerOperator(op, bump_and_run)

    return define


@_operator("multi_tensor_norm(Tensor[] tensors, float norm_type, bool per_tensor=False) -> (Tensor, Tensor)")
def multi_tensor_norm(
    tensors: list[Tensor], norm_type: float, per_tensor: bool = False
) -> tuple[Tensor, Tensor]:
    r"""The statistic of the p-norm before its root over all tensors as one vector
    (:math:`\sum |x|^p`, :math:`\max |x|`, :math:`\min |x|` or the count of nonzeros), in
    float32 (float64 when any tensor is float64), and per tensor when ``per_tensor``."""
    _check_norm_type(norm_type)
    if not tensors:
        identity = numerics.statistic_identity(norm_type)
        return torch.tensor(identity), torch.empty(0)
    operands = operands_of(tensors, "multi_tensor_norm", writes=False)
    statistic, per, _, _ = norm(operands, tensors[0].device, norm_type, per_tensor, None)
    return statistic, per


@_operator("multi_tensor_scale_(Tensor(a!)[] tensors, Tensor coef) -> ()", mutates=True)
def multi_tensor_scale_(tensors: list[Tensor], coef: Tensor) -> None:
    """tensors *= coef in place, in float32 (float64 for float64 tensors), rounded once; coef is
    read on the device, and nothing is written when coef >= 1."""
    if coef.numel() != 1 or not coef.is_floating_point():
        raise RuntimeError("fusedclip_triton.multi_tensor_scale_: coef must be a one-element float "
                           f"tensor, got shape {tuple(coef.shape)} and dtype {coef.dtype}")
    if not tensors:
        return
    operands = operands_of(tensors, "multi_tensor_scale_", writes=True)
    if coef.device != tensors[0].device:
        raise RuntimeError(f"fusedclip_triton.multi_tensor_scale_: coef is on {coef.device}, the "
                           f"tensors on {tensors[0].device}")
    transform(tensors, "multi_tensor_scale_", kernels.scale_chunks, coef, operands=operands)


@_operator("multi_tensor_clamp_(Tensor(a!)[] tensors, float min, float max) -> ()", mutates=True)
def multi_tensor_clamp_(tensors: list[Tensor], min: float, max: float) -> None:  # noqa: A002
    """tensors = min(max(tensors, min), max) in place, one pass; nan stays nan."""
    if not tensors:
        return
    operands = operands_of(tensors, "multi_tensor_clamp_", writes=True)
    if operands.has_complex:
        i = next(i for i, t in enumerate(tensors) if t.is_complex())
        raise RuntimeError(f"fusedclip_triton.multi_tensor_clamp_: tensor {i} is complex; "
                           "clamping is not defined for complex values")
    transform(tensors, "multi_tensor_clamp_", kernels.clamp_chunks, bits(min), bits(max),
               operands=operands)


@_operator("clip_grad_norm_(Tensor(a!)[] tensors, float max_norm, float norm_type) -> Tensor", mutates=True)
def clip_grad_norm_(tensors: list[Tensor], max_norm: float, norm_type: float) -> Tensor:
    """Norm, coefficient min(max_norm / (norm + 1e-6), 1) and scale, in one norm launch and one
    scale launch per dtype, with no host sync; returns the norm."""
    _check_norm_type(norm_type)
    if not tensors:
        return torch.tensor(0.0)
    operands = operands_of(tensors, "clip_grad_norm_", writes=True)
    # The norm reads what the scale writes (strided grads copied once); complex grads are read
    # as |z|, temporaries of their own.
    read = operands
    if operands.has_complex:
        dense = tensors if operands.dense is None else operands.dense
        read = prepare(dense, "clip_grad_norm_", writes=False, check=False)
    _, _, total, coef = norm(read, tensors[0].device, norm_type, False, max_norm)
    transform(tensors, "clip_grad_norm_", kernels.scale_chunks, coef, operands=operands)
    return total


# --- fake kernels: shapes and dtypes, for torch.compile and opcheck -------------------------------


fakes.register("fusedclip_triton", ("multi_tensor_norm", "multi_tensor_scale_", "multi_tensor_clamp_",
                                    "clip_grad_norm_"))
