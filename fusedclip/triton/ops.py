"""Launchers and operators of backend "triton": ``torch.ops.fusedclip_triton.*``.

The operators have the schemas and semantics of fusedclip/operators.py (defined from its schemas,
not typed again here), in their own namespace so that they never clash with the CUDA kernels
registered for ``fusedclip::``.

A call builds (or finds in a cache) one device table of int64 describing every chunk of every
tensor (tables.py), then launches one kernel per dtype present (launch.py): the norm
of 10,000 float32 tensors is one launch, plus one for the per-tensor statistics when asked. The
fused clip is one norm launch and one scale launch per dtype, with the coefficient passed from
one to the other in device memory: no host sync anywhere. AGC has a table of its own (rows of
tensors, tables.build_agc_table) and launches of its own (_agc, here); GradientMonitor's update
is one element-wise launch, in its operator.

The operators are defined with ``torch.library.Library`` (one kernel for every device, fake
kernels for torch.compile and opcheck), not as triton_ops: a triton_op's body must be
traceable with fake tensors (that is how torch.compile sees its kernels), and a table of raw
addresses cannot be built from fake tensors, which have none. With fake kernels,
torch.compile(fullgraph=True) puts them in its graph as single nodes, as it does the C++
operators. As the C++ operators, they bump no version counter: fusedclip.operators.call bumps
every tensor a call may write (which ones a per-tensor scale leaves alone is known only on the
device), in one call, where an ADInplaceOrView kernel in Python would add a second crossing of
the dispatcher (~60 us at 1,000 tensors). Each kernel refuses bad input with the TypeError or
ValueError itself, before writing.
"""


from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from fusedclip import numerics, operators
from fusedclip.triton import kernels, launch
from fusedclip.triton.launch import BLOCK, FINAL_BLOCK, NormResults, accumulate, bits, norm, transform
from fusedclip.triton.tables import TRITON_DTYPES, AgcOperands, agc_operands_of, check, operands_of, prepare

MONITOR_BLOCK = 1024  # entries per program of GradientMonitor's update

__all__ = ["multi_tensor_norm", "multi_tensor_scale_", "multi_tensor_clamp_", "clip_grad_norm_",
           "multi_tensor_agc_", "multi_tensor_scale_per_tensor_", "clip_grad_norm_with_norms_",
           "multi_tensor_unscale_norm", "monitor_update_"]


def _check_norm_type(norm_type: float) -> None:
    if math.isnan(norm_type):
        raise ValueError("fusedclip_triton: norm_type must not be nan")


def _check_float(t: Tensor, op: str, name: str, device: torch.device, one_element: bool = True) -> None:
    """t is a float tensor on device (with one element unless told otherwise)."""
    # As the C++ operators (csrc/tensor_checks.h check_scalar): a wrong size is a ValueError, a
    # wrong dtype or device a TypeError.
    if not t.is_floating_point():
        raise TypeError(f"fusedclip_triton.{op}: {name} must be a {'one-element ' if one_element else ''}"
                        f"float tensor, got dtype {t.dtype}")
    if one_element and t.numel() != 1:
        raise ValueError(f"fusedclip_triton.{op}: {name} must be a one-element float tensor, got shape "
                         f"{tuple(t.shape)}")
    if t.device != device:
        raise TypeError(f"fusedclip_triton.{op}: {name} is on {t.device}, the tensors on {device}")


# --- operators --------------------------------------------------------------------------------------

_library = torch.library.Library("fusedclip_triton", "DEF")


def _operator(kernel):
    """Defines ``fusedclip_triton::<name>`` (the decorated function's name, the schema of
    fusedclip/operators.py) with the function as its kernel for every device and the operator's
    fake kernel."""
    name = kernel.__name__
    _library.define(name + operators.OPERATORS[name].schema)
    _library.impl(name, kernel, "CompositeExplicitAutograd")
    torch.library.register_fake(f"fusedclip_triton::{name}", operators.OPERATORS[name].fake, lib=_library)
    return kernel


@_operator
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
    statistic, per, _, _, _ = norm(operands, tensors[0].device, norm_type, per_tensor, None)
    return statistic, per


@_operator
def multi_tensor_unscale_norm(tensors: list[Tensor], inv_scale: Tensor, norm_type: float) -> tuple[Tensor, Tensor]:
    """The statistic of tensors * inv_scale (the products rounded to float32, float64 for float64
    tensors, as torch's unscale_ computes them) and found_inf (float32 1. when any element of the
    tensors is inf or nan, else 0.), from one read of every tensor: the norm's launches."""
    _check_norm_type(norm_type)
    if not tensors:
        return torch.tensor(numerics.statistic_identity(norm_type)), torch.tensor(0.0)
    operands = operands_of(tensors, "multi_tensor_unscale_norm", writes=False)
    device = tensors[0].device
    _check_float(inv_scale, "multi_tensor_unscale_norm", "inv_scale", device)
    results = norm(operands, device, norm_type, False, None, inv_scale=inv_scale)
    return results.statistic, results.found_inf


@_operator
def multi_tensor_scale_(tensors: list[Tensor], coef: Tensor) -> None:
    """tensors *= coef in place, in float32 (float64 for float64 tensors), rounded once; coef is
    read on the device, and nothing is written when coef >= 1."""
    if not coef.is_floating_point():
        raise TypeError(f"fusedclip_triton.multi_tensor_scale_: coef must be a one-element float tensor, got "
                        f"dtype {coef.dtype}")
    if coef.numel() != 1:
        raise ValueError(f"fusedclip_triton.multi_tensor_scale_: coef must be a one-element float tensor, got "
                         f"shape {tuple(coef.shape)}")
    if not tensors:
        return
    operands = operands_of(tensors, "multi_tensor_scale_", writes=True)
    if coef.device != tensors[0].device:
        raise TypeError(f"fusedclip_triton.multi_tensor_scale_: coef is on {coef.device}, the "
                           f"tensors on {tensors[0].device}")
    transform(tensors, "multi_tensor_scale_", kernels.scale_chunks, coef, 0, operands=operands,
              PER_TENSOR=False)


@_operator
def multi_tensor_scale_per_tensor_(tensors: list[Tensor], coefs: Tensor) -> None:
    """tensors[i] *= coefs[i] in place, as multi_tensor_scale_ scales by one coefficient: one
    launch per dtype, each chunk reading its tensor's coefficient on the device; a chunk whose
    coefficient is >= 1 reads and writes nothing."""
    op = "multi_tensor_scale_per_tensor_"
    if not coefs.is_floating_point() or coefs.dim() != 1 or coefs.numel() != len(tensors):
        raise ValueError(f"fusedclip_triton.{op}: coefs must be a 1-dim float tensor with one coefficient "
                         f"per tensor ({len(tensors)}), got shape {tuple(coefs.shape)} and dtype {coefs.dtype}")
    if not tensors:
        return
    operands = operands_of(tensors, op, writes=True)
    _check_float(coefs, op, "coefs", tensors[0].device, one_element=False)
    transform(tensors, op, kernels.scale_chunks, coefs, coefs.stride(0), operands=operands,
              args_of=lambda i: (coefs[i], 0), PER_TENSOR=True)


@_operator
def multi_tensor_clamp_(tensors: list[Tensor], min: float, max: float) -> None:  # noqa: A002
    """tensors = min(max(tensors, min), max) in place, one pass; nan stays nan."""
    if not tensors:
        return
    operands = operands_of(tensors, "multi_tensor_clamp_", writes=True)
    if operands.has_complex:
        i = next(i for i, t in enumerate(tensors) if t.is_complex())
        raise TypeError(f"fusedclip_triton.multi_tensor_clamp_: tensor {i} is complex; "
                           "clamping is not defined for complex values")
    transform(tensors, "multi_tensor_clamp_", kernels.clamp_chunks, bits(min), bits(max),
              operands=operands)


def _clip(tensors: list[Tensor], max_norm: float, norm_type: float, op: str, per_tensor: bool) -> NormResults:
    """The fused clip: the norm (per-tensor norms too when asked), then the scale by the
    coefficient the norm's last program wrote; one norm and one scale launch per dtype."""
    _check_norm_type(norm_type)
    operands = operands_of(tensors, op, writes=True)
    # The norm reads what the scale writes (strided grads copied once); complex grads are read
    # as |z|, temporaries of their own.
    read = operands
    if operands.has_complex:
        dense = tensors if operands.dense is None else operands.dense
        read = prepare(dense, op, writes=False, check_first=False)
    results = norm(read, tensors[0].device, norm_type, per_tensor, max_norm, roots=per_tensor)
    transform(tensors, op, kernels.scale_chunks, results.coef, 0, operands=operands, PER_TENSOR=False)
    return results


@_operator
def clip_grad_norm_(tensors: list[Tensor], max_norm: float, norm_type: float) -> Tensor:
    """Norm, coefficient min(max_norm / (norm + 1e-6), 1) and scale, in one norm launch and one
    scale launch per dtype, with no host sync; returns the norm."""
    if not tensors:
        _check_norm_type(norm_type)
        return torch.tensor(0.0)
    return _clip(tensors, max_norm, norm_type, "clip_grad_norm_", False).total


@_operator
def clip_grad_norm_with_norms_(tensors: list[Tensor], max_norm: float, norm_type: float) -> tuple[Tensor, Tensor]:
    """clip_grad_norm_, also returning each tensor's norm before clipping (0 for a tensor with no
    elements) from the same read: the per-tensor statistics and their roots are one more launch."""
    if not tensors:
        _check_norm_type(norm_type)
        return torch.tensor(0.0), torch.empty(0)
    results = _clip(tensors, max_norm, norm_type, "clip_grad_norm_with_norms_", True)
    return results.total, results.per


def _agc(operands: AgcOperands, device: torch.device, out: torch.dtype, clip_factor: float,
         eps: float) -> tuple[Tensor, Tensor]:
    """Unit-wise AGC of the operands' gradients in place; returns the sums of squares of the
    gradients before clipping (total, per tensor) in ``out``.

    One agc_pieces launch per (grad dtype, param dtype, alignment) measures every unit and clips
    those of whole rows; rows longer than a chunk then take two more launches, one for their
    coefficients (agc_long_rows) and one scale per launch that holds such rows (scale_chunks,
    one coefficient per row); last, one launch sums the units per tensor and in total."""
    t = operands.table
    per = torch.empty((t.n_tensors,), dtype=out, device=device)
    total = torch.empty((), dtype=out, device=device)
    if t.n_pieces == 0:
        per.zero_()
        total.zero_()
        return total, per
    unit_sq = torch.empty((t.n_units,), dtype=torch.float64, device=device)
    parts = torch.empty((max(1, 2 * t.n_parts),), dtype=torch.float64, device=device)
    factors = bits(clip_factor), bits(eps)
    for batch in t.launches:
        launch.run_kernel(
            kernels.agc_pieces, device, batch.n_chunks,
            t.table, t.n_pieces, batch.first_chunk, unit_sq, parts, t.n_parts, *factors,
            DTYPE=TRITON_DTYPES[batch.dtype], ACC=accumulate(batch.dtype),
            PDTYPE=TRITON_DTYPES[batch.param_dtype], PACC=accumulate(batch.param_dtype),
            ALIGNED=batch.aligned, BLOCK=BLOCK,
        )
    if t.n_long:
        coefs = torch.empty((t.n_long,), dtype=torch.float64, device=device)
        launch.run_kernel(kernels.agc_long_rows, device, t.n_long, t.table, 6 * t.n_pieces, t.n_long,
                          unit_sq, parts, t.n_parts, coefs, *factors, BLOCK=FINAL_BLOCK)
        for batch in t.long_launches:
            launch.run_kernel(
                kernels.scale_chunks, device, batch.n_chunks,
                t.table, t.n_pieces, batch.first_chunk, coefs, 1,
                DTYPE=TRITON_DTYPES[batch.dtype], ACC=accumulate(batch.dtype),
                ALIGNED=batch.aligned, BLOCK=BLOCK, PER_TENSOR=True,
            )
    launch.run_kernel(
        kernels.per_tensor, device, t.n_tensors,
        t.table, 6 * t.n_pieces + 4 * t.n_long, t.n_tensors, unit_sq, t.n_units, per, total, 0,
        KIND=kernels.SQUARE_SUM, ACC=TRITON_DTYPES[out], ROOT=False, TOTAL=True, BLOCK=FINAL_BLOCK,
    )
    for original, dense in operands.write_back:
        original.copy_(dense)
    return total, per


@_operator
def multi_tensor_agc_(grads: list[Tensor], params: list[Tensor], clip_factor: float, eps: float) -> tuple[Tensor, Tensor]:
    """Unit-wise AGC in place (_agc: one launch per dtype that clips every row of at most a
    chunk where it is read, and three more when rows are longer); returns the sums of squares of
    the gradients before clipping, in total and per tensor. Gradients that share memory are
    clipped one tensor at a time in list order, as torch's loop clips them."""
    op = "multi_tensor_agc_"
    if not clip_factor >= 0 or not eps >= 0:
        raise ValueError(f"fusedclip_triton.{op}: clip_factor and eps must be >= 0, got {clip_factor} and {eps}")
    out = numerics.accumulate_dtype(grads)
    if not grads:
        if params:
            raise ValueError(f"fusedclip_triton.{op}: got 0 gradients but {len(params)} parameters")
        return torch.zeros((), dtype=out), torch.zeros(0, dtype=out)
    device = grads[0].device
    operands = agc_operands_of(grads, params, op)
    if not operands.shares_memory:
        return _agc(operands, device, out, clip_factor, eps)
    per = torch.cat([_agc(agc_operands_of([g], [p], op), device, out, clip_factor, eps)[1]
                     for g, p in zip(grads, params)])
    return numerics.combine_statistics(per, 2.0), per


@_operator
def monitor_update_(norms: Tensor, mean: Tensor, var: Tensor, count: Tensor, below: Tensor, explosions: Tensor,
                    exploding: Tensor, vanishing: Tensor, alpha: float, warmup_steps: int, z_threshold: float,
                    explode_threshold: Optional[float], vanish_eps: float, vanish_steps: int) -> None:
    """GradientMonitor's per-step update (fusedclip.reference.monitor_update_ defines it), in one
    element-wise launch; the same bits as the CPU kernel."""
    op = "monitor_update_"
    if norms.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"fusedclip_triton.{op}: norms must be float32 or float64, got {norms.dtype}")
    if norms.dim() != 1:
        raise ValueError(f"fusedclip_triton.{op}: norms must be 1-dim, got shape {tuple(norms.shape)}")
    state = [mean, var, count, below, explosions, exploding, vanishing]
    dtypes = [norms.dtype] * 2 + [torch.int64] * 3 + [torch.bool] * 2
    names = ["mean", "var", "count", "below", "explosions", "exploding", "vanishing"]
    check([norms], op, False, dtypes=(norms.dtype,), name="norms")
    for t, dtype, name in zip([norms] + state, [norms.dtype] + dtypes, ["norms"] + names):
        if t.dtype != dtype or t.device != norms.device:
            raise TypeError(f"fusedclip_triton.{op}: {name} must be a {dtype} tensor on {norms.device}, got "
                            f"{t.dtype} on {t.device}")
        if t.shape != norms.shape or not t.is_contiguous():
            raise ValueError(f"fusedclip_triton.{op}: {name} must be a contiguous 1-dim tensor of size "
                             f"{norms.numel()}, got shape {tuple(t.shape)} and strides {t.stride()}")
    n = norms.numel()
    if n:  # one launch, compiled without fused multiply-adds: the CPU kernel and the reference round every op
        launch.run_kernel(
            kernels.monitor_update, norms.device, -(-n // MONITOR_BLOCK), norms, *state, n,
            bits(1.0 - alpha), bits(z_threshold * z_threshold),
            bits(0.0 if explode_threshold is None else explode_threshold), bits(vanish_eps), warmup_steps,
            vanish_steps, T=TRITON_DTYPES[norms.dtype], HAS_EXPLODE=explode_threshold is not None,
            BLOCK=MONITOR_BLOCK, enable_fp_fusion=False,
        )

