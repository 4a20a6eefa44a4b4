"""Backend "torch": the fusedclip primitives in pure PyTorch.

The operators of fusedclip/operators.py, with the native kernels' numerics: statistics
of rows of 1024 elements accumulated in float32 (float64 for float64 input) by
``torch.linalg.vector_norm``, combined in float64 in order, the coefficient applied in float32
and rounded once. It runs
on any device PyTorch runs on and needs nothing compiled; it is the fallback where ``_C`` is
missing and the path for devices that have no fused kernels yet.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from fusedclip.numerics import (
    FLOAT64_DTYPES,
    accumulate_dtype,
    clip_coefficient,
    combine_statistics,
    pivot_norm_type,
    rescale_decided_on_host,
    rescaled_norm,
    statistic_identity,
    total_norm_from_statistic,
)

__all__ = [
    "multi_tensor_norm",
    "multi_tensor_scale_",
    "multi_tensor_clamp_",
    "multi_tensor_unscale_norm",
    "multiply_",
    "clip_grad_norm_",
    "rescaled_if_overflowed",
    "multi_tensor_agc_",
    "multi_tensor_scale_per_tensor_",
    "per_tensor_norms",
    "clip_grad_norm_with_norms_",
    "monitor_update_",
]

# torch.linalg.vector_norm reduces a long float32 vector with few partial sums: 2**20 equal values
# come out 0.3% off (p=1), 100,000 fp16 values of 300 7e-5 off (p=2). Reducing rows of this many
# elements in float32 and combining the rows in float64, like the C++ kernels' chunks, keeps the
# error near float32 rounding, and is no slower (the rows run in parallel).
_ROW = 1024


def _beyond_float32(norm_type: float) -> bool:
    """A finite p beyond float32's range, which torch's vector_norm takes as float32's inf and
    whose root 1 / p as 0: a norm of 1 for any x."""
    return math.isfinite(norm_type) and abs(norm_type) > torch.finfo(torch.float32).max


def _tensor_statistic(t: Tensor, norm_type: float, acc: torch.dtype) -> Tensor:
    if t.numel() == 0:
        return torch.full((), statistic_identity(norm_type), dtype=acc, device=t.device)
    if t.is_complex():
        t = t.abs()
    if norm_type in (math.inf, -math.inf):
        return torch.linalg.vector_norm(t, norm_type, dtype=acc)  # a max or a min: exact
    if _beyond_float32(norm_type):
        # Each |x|^p is 0, 1 or inf, as in the kernels; the root (float64) and the rescale
        # (rescaled_if_overflowed) then give the limit, max|x| or min|x|.
        return t.abs().to(acc).pow(norm_type).sum()
    flat = t.reshape(-1)
    whole = flat.numel() // _ROW * _ROW
    rows = []
    if whole:
        rows.append(torch.linalg.vector_norm(flat[:whole].view(-1, _ROW), norm_type, dim=1, dtype=acc))
    if whole < flat.numel():
        rows.append(torch.linalg.vector_norm(flat[whole:], norm_type, dtype=acc).reshape(1))
    norms = torch.cat(rows).double()
    if norm_type in (0.0, 1.0):
        return norms.sum().to(acc)  # the statistic is the norm itself: a count or a sum
    return norms.pow(norm_type).sum().to(acc)


def multi_tensor_norm(
    tensors: list[Tensor], norm_type: float, per_tensor: bool = False
) -> tuple[Tensor, Tensor]:
    """The norm statistic before the root; see the schema in fusedclip/operators.py."""
    if not tensors:  # the identity, as the kernels give it
        return torch.tensor(statistic_identity(norm_type)), torch.empty(0)
    acc = accumulate_dtype(tensors)
    # Each tensor accumulates in its own dtype's accumulator (float32 for float32 in a list that
    # also holds float64), as the kernels do; the statistics combine in the list's. An empty
    # tensor's statistic is the identity, so an all-empty list reduces to it too.
    stats: list[Optional[Tensor]] = [None] * len(tensors)
    # A real tensor of less than a row is one row: its statistic is one vector_norm, so those of
    # one dtype take one foreach norm (the same vector_norm per tensor on a CPU) instead of a
    # dozen ops each.
    one_row: dict[torch.dtype, list[int]] = {}
    foreach_norm = not _beyond_float32(norm_type)  # torch's norm takes such a p as inf
    for i, t in enumerate(tensors):
        if foreach_norm and 0 < t.numel() < _ROW and not t.is_complex():
            one_row.setdefault(t.dtype, []).append(i)
        else:
            stats[i] = _tensor_statistic(t, norm_type, accumulate_dtype([t])).to(acc)
    for indices in one_row.values():
        own = accumulate_dtype([tensors[indices[0]]])
        norms = torch.stack(torch._foreach_norm([tensors[i] for i in indices], norm_type, dtype=own))
        if norm_type not in (0.0, 1.0, math.inf, -math.inf):  # as _tensor_statistic computes it
            norms = norms.double().pow(norm_type).to(own)
        for i, value in zip(indices, norms.to(acc).unbind()):
            stats[i] = value
    stacked = torch.stack(stats)
    per = stacked if per_tensor else stacked.new_empty((0,))
    return combine_statistics(stacked, norm_type), per


def multi_tensor_scale_(tensors: list[Tensor], coef: Tensor) -> None:
    """tensors *= coef in place, in float32 (float64 for float64 tensors), rounded once."""
    # Reading a plain CPU tensor is no sync (nor traceable); multiplying by 1 is exact anyway. A
    # subclass coefficient (TwoTensor) holds more than the one value its bool() would read.
    if type(coef) is Tensor and coef.device.type == "cpu" and not torch.compiler.is_compiling() and bool(coef >= 1.0):
        return
    multiply_(tensors, coef)


def multiply_(tensors: list[Tensor], coef: Tensor) -> None:
    """tensors *= coef in place for any coef (no skip), in float32 (float64 for float64 tensors):
    one foreach multiply per coefficient dtype (per device), not one op per tensor."""
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for t in tensors:
        if t.numel() == 0:
            continue
        real = torch.view_as_real(t) if t.is_complex() else t
        # A 0-dim float32 coef: ATen computes fp16/bf16 products in float32 and rounds once.
        coef_dtype = torch.float64 if real.dtype == torch.float64 else torch.float32
        groups.setdefault((real.device, coef_dtype), []).append(real)
    for (device, coef_dtype), group in groups.items():
        torch._foreach_mul_(group, coef.to(device=device, dtype=coef_dtype))


def multi_tensor_unscale_norm(
    tensors: list[Tensor], inv_scale: Tensor, norm_type: float
) -> tuple[Tensor, Tensor]:
    """The statistic of x * inv_scale and found_inf (1. when any x is inf or nan, else 0.).

    The products are computed as torch's unscale_ computes them (float32, float64 for float64
    tensors), here in temporaries; see the schema in fusedclip/operators.py.
    """
    unscaled = []
    for t in tensors:
        wide = t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
        real_dtype = torch.float64 if t.dtype in FLOAT64_DTYPES else torch.float32
        unscaled.append(wide * inv_scale.to(device=t.device, dtype=real_dtype))
    statistic, _ = multi_tensor_norm(unscaled, norm_type)
    if not tensors:
        return statistic, torch.zeros((), dtype=torch.float32, device=inv_scale.device)
    non_finite = torch.stack([~torch.isfinite(t).all() for t in tensors]).any()
    return statistic, non_finite.to(torch.float32)


def multi_tensor_clamp_(tensors: list[Tensor], lo: float, hi: float) -> None:
    """tensors = min(max(tensors, lo), hi) in place, one pass per tensor; nan stays nan.

    The bounds are rounded to each tensor's dtype first (through float32, saturating to inf), as
    the C++ kernels compare in float32: 70000 clamps nothing in float16 instead of raising.
    """
    for t in tensors:
        if t.numel() != 0:
            t.clamp_(min=_bound_in(t.dtype, lo), max=_bound_in(t.dtype, hi))


def _bound_in(dtype: torch.dtype, value: float) -> float:
    if dtype == torch.float64:
        return value
    return float(torch.tensor(value, dtype=torch.float32).to(dtype))


def rescaled_if_overflowed(tensors: list[Tensor], total: Tensor, norm_type: float) -> Tensor:
    """The norm again, of x / pivot, when its sum left the accumulator's range while the true norm
    fits (numerics.rescale_decided_on_host: CPU norms only); else total as it is. A second and a
    third read of the tensors, only then (C++'s is csrc/cpu/kernels.h's rescaled_if_overflowed)."""
    if not rescale_decided_on_host(total, norm_type):
        return total
    pivot = multi_tensor_norm(tensors, pivot_norm_type(norm_type))[0].to(total.dtype)
    inv_scale = pivot.double().reciprocal().to(total.dtype)
    # A pivot of 0 (p < 0 with an element of 0: the norm is 0), inf or nan, or whose reciprocal is
    # beyond float32 (a min|x| below 2.9e-39) leaves the norm as it is.
    if not bool(torch.isfinite(pivot) & (pivot > 0) & torch.isfinite(inv_scale)):
        return total
    scaled, _ = multi_tensor_unscale_norm(tensors, inv_scale, norm_type)
    return rescaled_norm(pivot, scaled, norm_type, total.dtype)


def clip_grad_norm_(tensors: list[Tensor], max_norm: float, norm_type: float) -> Tensor:
    """Norm, coefficient and scale of tensors on one device; returns the norm."""
    statistic, _ = multi_tensor_norm(tensors, norm_type)
    total = total_norm_from_statistic(statistic, norm_type, not any(t.numel() for t in tensors))
    total = rescaled_if_overflowed(tensors, total, norm_type)
    multi_tensor_scale_(tensors, clip_coefficient(total, max_norm))
    return total


def multi_tensor_agc_(
    grads: list[Tensor], params: list[Tensor], clip_factor: float, eps: float
) -> tuple[Tensor, Tensor]:
    """Unit-wise AGC in place; returns the pre-clip sums of squares (total, per tensor).

    See the schema in fusedclip/operators.py. Units are the slices along dim 0 of tensors with more
    than one dimension, else the whole tensor. Multiplies every unit (by 1 where it does not
    clip), so that nothing here reads a device value on the host. A parameter's dtype may differ
    from its gradient's (torch allows it through ``grad_dtype``): each tensor's norm is taken in
    its own accumulation dtype, as the C++ kernel reads it, and the coefficient is applied in the
    gradient's.
    """
    acc = accumulate_dtype(grads)
    device = grads[0].device
    per = []
    for g, p in zip(grads, params):
        if g.numel() == 0:
            per.append(torch.zeros((), dtype=acc, device=device))
            continue
        unit_dims = tuple(range(1, g.dim())) if g.dim() > 1 else None
        grad_norm = torch.linalg.vector_norm(g, 2.0, dim=unit_dims, dtype=accumulate_dtype([g]))
        param_norm = torch.linalg.vector_norm(p, 2.0, dim=unit_dims, dtype=accumulate_dtype([p]))
        max_norm = param_norm.clamp(min=eps) * clip_factor
        coef = torch.where(grad_norm < max_norm, 1.0, max_norm / grad_norm.clamp(min=1e-6))
        coef = coef.to(grad_norm.dtype)
        g.mul_(coef.reshape(coef.shape + (1,) * (g.dim() - coef.dim())))
        per.append(grad_norm.double().square().sum().to(acc))
    stats = torch.stack(per)
    return stats.double().sum().to(acc), stats


def multi_tensor_scale_per_tensor_(tensors: list[Tensor], coefs: Tensor) -> None:
    """tensors[i] *= coefs[i] in place, as multi_tensor_scale_ scales by one coefficient."""
    for t, coef in zip(tensors, coefs.unbind()):
        multi_tensor_scale_([t], coef)


def per_tensor_norms(statistics: Tensor, tensors: list[Tensor], norm_type: float) -> Tensor:
    """Norms from per-tensor statistics; a tensor with no elements has norm 0 for every p (the
    root of the identity is not 0 for p = -inf or p < 0); a norm whose sum left the accumulator's
    range is taken again of its tensor (rescaled_if_overflowed)."""
    norms = total_norm_from_statistic(statistics, norm_type, empty=False)
    if rescale_decided_on_host(norms, norm_type):  # a tensor's sum left its range: that norm again
        norms = torch.stack([rescaled_if_overflowed([t], n, norm_type) for t, n in zip(tensors, norms.unbind())])
    if any(t.numel() == 0 for t in tensors):
        empty = torch.tensor([t.numel() == 0 for t in tensors]).to(norms.device, non_blocking=True)
        norms = torch.where(empty, torch.zeros_like(norms), norms)
    return norms


def clip_grad_norm_with_norms_(tensors: list[Tensor], max_norm: float, norm_type: float) -> tuple[Tensor, Tensor]:
    """clip_grad_norm_ that also returns the per-tensor norms before clipping, from one read."""
    statistic, per_statistic = multi_tensor_norm(tensors, norm_type, per_tensor=True)
    total = total_norm_from_statistic(statistic, norm_type, not any(t.numel() for t in tensors))
    total = rescaled_if_overflowed(tensors, total, norm_type)
    per_tensor = per_tensor_norms(per_statistic, tensors, norm_type)  # may read the tensors again: first
    multi_tensor_scale_(tensors, clip_coefficient(total, max_norm))
    return total, per_tensor


def monitor_update_(
    norms: Tensor,
    mean: Tensor,
    var: Tensor,
    count: Tensor,
    below: Tensor,
    explosions: Tensor,
    exploding: Tensor,
    vanishing: Tensor,
    alpha: float,
    warmup_steps: int,
    z_threshold: float,
    explode_threshold: Optional[float],
    vanish_eps: float,
    vanish_steps: int,
) -> None:
    r"""GradientMonitor's per-step update: the definition of the ``monitor_update_`` operator.

    Per entry, with :math:`n` the norm (float32 or float64), :math:`\mu, \sigma^2` = ``mean``,
    ``var`` (the norms' dtype) and :math:`c` = ``count`` (int64, finite norms seen so far),
    updates ``mean``, ``var``, ``count``, ``below`` and ``explosions`` in place and writes this
    step's flags into ``exploding`` and ``vanishing`` (bool). A non-finite norm changes none of
    :math:`\mu, \sigma^2, c`. Computed in the norms' dtype, every op rounded on its own (the C++
    kernel repeats these ops one by one and matches bitwise).
    """
    finite = norms.isfinite()
    warm = count >= warmup_steps
    deviation = torch.where(finite, norms - mean, 0.0)
    square = deviation.square()
    # z = (n - mu) / sqrt(var + 1e-12) > z_threshold, squared: no sqrt.
    spike = (deviation > 0) & (square > z_threshold**2 * (var + 1e-12))
    explodes = ~finite | (warm & spike)
    if explode_threshold is not None:
        explodes = explodes | (norms > explode_threshold)
    # One update for both phases, with w the weight of the new norm and d = n - mu:
    # mu += w d; var += w (k d^2 - var). Over the warm-up w = 1/(c + 1) and k = 1 - w: Welford's
    # exact mean and population variance. After it w = 1 - alpha and k = (1 - w)^2: ZClip's EMAs
    # (its variance uses n minus the new mean, which is (1 - w) d). A non-finite norm has w = 0
    # (and d = 0).
    weight = torch.where(warm, 1.0 - alpha, (count + 1).to(norms.dtype).reciprocal())
    weight = torch.where(finite, weight, 0.0)
    keep = 1.0 - weight
    new_var = var + weight * (torch.where(warm, keep.square(), keep) * square - var)
    mean.copy_(mean + weight * deviation)
    var.copy_(new_var)
    count.add_(finite)
    below.copy_(torch.where(norms < vanish_eps, below + 1, 0))
    explosions.add_(explodes)
    exploding.copy_(explodes)
    torch.ge(below, vanish_steps, out=vanishing)
