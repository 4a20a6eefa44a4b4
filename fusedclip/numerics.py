"""The numeric rules that every backend follows, in one place (Python's side; the C++ and CUDA
kernels' are in csrc/numerics.h, and tests/test_numerics.py checks that they agree).

* The statistic before the root: the sum of |x|^p (a count for p = 0), the max for inf, the min
  for -inf (:class:`NormKind`, :func:`norm_kind`); accumulated in float32 for fp16, bf16 and
  float32, in float64 when any tensor is float64 (:func:`accumulate_dtype`); the statistic of no
  elements is the identity of its reduction (:func:`statistic_identity`); partial statistics
  combine in a fixed order, float64 for sums (:func:`combine_statistics`).
* The norm from the statistic: the p-th root for finite p other than 0 and 1
  (:func:`total_norm_from_statistic`).
* A norm whose sum left its accumulator's range while the true norm fits is taken again of
  x / pivot, pivot = max|x| for p > 0, min|x| for p < 0 (:func:`norm_out_of_range`,
  :func:`pivot_norm_type`, :func:`rescale_decided_on_host`, :func:`rescaled_norm`).
* The clip coefficient ``min(max_norm / (norm + CLIP_EPS), 1)`` computed as torch computes it
  (:func:`clip_coefficient`).
* A tensor written in place has no two elements that share memory (:func:`internal_overlap`;
  csrc/tensor_checks.cpp's no_internal_overlap).
"""

from __future__ import annotations

import enum
import math
from array import array as _array
from typing import Union

import torch
from torch import Tensor

__all__ = [
    "CLIP_EPS",
    "FLOAT64_DTYPES",
    "NormKind",
    "SUM_KINDS",
    "norm_kind",
    "accumulate_dtype",
    "statistic_identity",
    "combine_statistics",
    "total_norm_from_statistic",
    "norm_out_of_range",
    "pivot_norm_type",
    "rescale_decided_on_host",
    "rescaled_norm",
    "clip_coefficient",
    "internal_overlap",
]

CLIP_EPS = 1e-6  # torch's: the coefficient is max_norm / (norm + 1e-6)


class NormKind(enum.IntEnum):
    """The statistic a norm type reduces (the Triton kernels' KIND takes these values)."""

    SQUARE_SUM = 0  # p = 2
    ABS_SUM = 1  # p = 1
    POWER_SUM = 2  # any other finite p
    MAX = 3  # inf
    MIN = 4  # -inf
    COUNT = 5  # p = 0: the count of nonzero elements


# The statistics that are sums of |x|^p, which can leave their accumulator's range while every |x|
# is finite.
SUM_KINDS = (NormKind.SQUARE_SUM, NormKind.ABS_SUM, NormKind.POWER_SUM)


def norm_kind(norm_type: float) -> NormKind:
    if norm_type == 2.0:
        return NormKind.SQUARE_SUM
    if norm_type == 1.0:
        return NormKind.ABS_SUM
    if norm_type == 0.0:
        return NormKind.COUNT
    if norm_type == math.inf:
        return NormKind.MAX
    if norm_type == -math.inf:
        return NormKind.MIN
    return NormKind.POWER_SUM


FLOAT64_DTYPES = (torch.float64, torch.complex128)


def accumulate_dtype(tensors: list[Tensor]) -> torch.dtype:
    """float64 when any tensor is float64 or complex128, else float32."""
    return torch.float64 if any(t.dtype in FLOAT64_DTYPES for t in tensors) else torch.float32


def statistic_identity(norm_type: float) -> float:
    """The statistic of no elements: +inf for the -inf norm (a min), 0 otherwise."""
    return math.inf if norm_type == -math.inf else 0.0


def combine_statistics(stats: Tensor, norm_type: float) -> Tensor:
    """Reduces per-tensor statistics (in list order, float64 for sums) to one statistic."""
    if norm_type == math.inf:
        return stats.amax()  # amax propagates nan
    if norm_type == -math.inf:
        return stats.amin()
    return stats.double().sum().to(stats.dtype)


def total_norm_from_statistic(statistic: Tensor, norm_type: float, empty: bool) -> Tensor:
    """The norm from its statistic: the p-th root for finite p other than 0 and 1.

    The root is taken in float64 and rounded once to the statistic's dtype: the correctly
    rounded square root (ATen's float32 sqrt of a scalar is 1 ulp off for some values, 75 among
    them), and the p-th root as the Triton kernels take it. The same ATen ops as the C++ fused op
    (csrc/cpu/kernels.h), so both give the same bits. norm_type is compared, not passed to
    math.isinf, which torch.compile cannot trace when the norm type is a symbolic float.
    """
    if empty:  # the norm of no elements is 0 whatever p, as for no tensors at all
        return torch.zeros_like(statistic)
    if norm_type == 2.0:
        return statistic.double().sqrt().to(statistic.dtype)
    if norm_type in (0.0, 1.0) or norm_type in (math.inf, -math.inf):
        return statistic
    if torch.compiler.is_compiling():
        return torch.ops.fusedclip.pth_root(statistic, norm_type)
    return _pth_root_of(statistic, norm_type)


def _pth_root_of(statistic: Tensor, norm_type: float) -> Tensor:
    return statistic.double().pow(1.0 / norm_type).to(statistic.dtype)


@torch.library.custom_op("fusedclip::pth_root", mutates_args=())
def _pth_root(statistic: Tensor, norm_type: float) -> Tensor:
    """statistic ** (1 / norm_type) by ATen, which torch.compile keeps as it is: Inductor's own
    pow differs from ATen's in the last bit for a third of float32 scalars, and a compiled norm
    should have eager's bits."""
    return _pth_root_of(statistic, norm_type)


@_pth_root.register_fake
def _(statistic: Tensor, norm_type: float) -> Tensor:
    return torch.empty_like(statistic)


def norm_out_of_range(norm: float, norm_type: float) -> bool:
    """Whether a norm taken from its sum of |x|^p may be wrong only because the sum left its
    accumulator's range, so that it is taken again of x / pivot (:func:`rescaled_norm`): a norm
    of inf or 0, from a sum that overflowed (x^2 of a float32 x above 1.8e19) or underflowed to 0
    (every x^2 below float32's smallest number; for p < 0, the other way round). Both are also
    true norms: an inf or nan element keeps its inf or nan, and a norm of 0 stays where the pivot
    is 0 (every element 0 for p > 0, one of them for p < 0). csrc/numerics.h's
    norm_out_of_range."""
    return norm_kind(norm_type) in SUM_KINDS and (math.isinf(norm) or norm == 0)


def pivot_norm_type(norm_type: float) -> float:
    """The norm type whose norm is the pivot: max|x| (inf) for p > 0, min|x| (-inf) for p < 0.
    Each |x / pivot|^p is then at most 1 and the pivot's own is 1, so their sum lies in [1, n]."""
    return math.inf if norm_type > 0 else -math.inf


def rescale_decided_on_host(total: Tensor, norm_type: float) -> bool:
    """Whether to take a norm (or any of a vector of norms) again (:func:`norm_out_of_range`),
    read on the host only where that is free: a CPU tensor, eagerly; not under torch.compile,
    where it would break the graph."""
    if norm_kind(norm_type) not in SUM_KINDS or total.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    if total.dim() == 0:
        return norm_out_of_range(total.item(), norm_type)  # a microsecond; ATen's isinf().any() takes two ops
    return bool((total.isinf() | (total == 0)).any())  # norm_out_of_range's rule


def rescaled_norm(pivot: Tensor, scaled_statistic: Tensor, norm_type: float, dtype: torch.dtype) -> Tensor:
    """pivot * scaled_statistic^(1/p), in float64, rounded once to dtype: the norm of x from the
    pivot (:func:`pivot_norm_type`, finite and nonzero) and the statistic of x / pivot
    (csrc/numerics.h's rescaled_norm)."""
    pivot, scaled = pivot.double(), scaled_statistic.double()
    if norm_type == 1.0:
        root = scaled
    elif norm_type == 2.0:
        root = scaled.sqrt()
    else:
        root = scaled.pow(1.0 / norm_type)
    return (pivot * root).to(dtype)


def clip_coefficient(total_norm: Tensor, max_norm: Union[float, Tensor]) -> Tensor:
    """min(max_norm / (total_norm + 1e-6), 1), computed as torch computes it (bitwise).

    torch's ``max_norm / (total_norm + 1e-6)`` is ``reciprocal() * max_norm``
    (Tensor.__rtruediv__). torch reads a tensor max_norm as a float first, and a tensor times a
    float multiplies in the tensor's compute dtype (float32 for float16 and bfloat16) and rounds
    the product once. Here a 0-d tensor in that compute dtype multiplies as that float does,
    without a host read, and the product is rounded to the norm's dtype.
    """
    reciprocal = (total_norm + CLIP_EPS).reciprocal()
    if isinstance(max_norm, Tensor):
        compute_dtype = torch.promote_types(total_norm.dtype, torch.float32)
        coef = (reciprocal.to(compute_dtype) * max_norm.to(compute_dtype)).to(total_norm.dtype)
    else:
        coef = reciprocal * max_norm
    return coef.clamp(max=1.0)


def _float32(value: float) -> float:
    """value rounded to float32 (to nearest even; inf past float32's range), as a Python float."""
    return _array("f", (value,))[0]


def coefficient_below_one(total: float, dtype: torch.dtype, max_norm: float) -> bool:
    """Whether the clip coefficient of a norm ``total`` of dtype float32 or float64 is below 1 (or
    nan): whether a fused clip on the host writes (csrc/numerics.h's clip_coefficient, same
    roundings; each float32 operation taken in float64 then rounded, which gives float32's own
    result for +, * and /)."""
    if dtype == torch.float64:
        coef = max_norm * (1.0 / (total + CLIP_EPS))
    else:
        f32 = _float32
        coef = f32(f32(max_norm) * f32(1.0 / f32(total + f32(CLIP_EPS))))
    return not coef >= 1.0


def internal_overlap(t: Tensor) -> bool:
    """Whether two elements of t share memory, so that writing each element once has no single
    result: torch's in-place ops refuse a zero stride (an expanded tensor) and scale an element
    that appears k times k times; every backend refuses both. An empty tensor overlaps nothing,
    whatever its strides; a dense one neither. Sorted by stride, dimensions that each step past
    the farthest offset of the ones before cannot overlap (slices, transposes); a layout that
    fails this (an as_strided view) is decided exactly, from its elements' offsets."""
    if t.numel() == 0 or t.is_contiguous():
        return False
    by_stride = sorted((stride, size) for size, stride in zip(t.shape, t.stride()) if size > 1)
    reach = 0  # the farthest offset of the dimensions before
    separated = True
    for stride, size in by_stride:
        separated = separated and stride > reach
        reach += stride * (size - 1)
    if separated:
        return False
    # The elements' own offsets (numel of them, on the host), not a mark per location they reach.
    offsets = torch.zeros(t.shape, dtype=torch.int64)
    for d, (size, stride) in enumerate(zip(t.shape, t.stride())):
        offsets += torch.arange(size).mul_(stride).view([size if k == d else 1 for k in range(t.dim())])
    return offsets.unique().numel() < t.numel()
