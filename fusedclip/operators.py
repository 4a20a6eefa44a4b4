"""The operators: each one's schema, fake kernel and the tensors it writes, in one place.

Every backend runs these nine operators with these semantics:

* ``fusedclip::<op>``: the native kernels register for it (``STABLE_TORCH_LIBRARY_IMPL`` in
  csrc/cpu/ for CPU tensors, csrc/cuda/ for CUDA tensors); :func:`define` defines the library
  from these schemas before the native libraries load (fusedclip/_backends.py).
* ``fusedclip_triton::<op>``: the Triton kernels, defined from the same schemas
  (fusedclip/triton/ops.py), in a namespace of their own so that they never clash with the CUDA
  kernels for CUDA tensors.
* backend "torch": fusedclip/reference.py, one function per operator, which defines the math.

A native kernel refuses its input (before writing anything) with a RuntimeError whose message
starts with a marker naming the exception it stands for (csrc/stable.h): :func:`call` raises that
TypeError or ValueError instead, so the refusals are the same whatever torch's version. Native
kernels do not bump version counters (the stable ABI has no call for it): :func:`call` bumps what
:data:`WRITES` says the call wrote.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from fusedclip import numerics

__all__ = ["OPERATORS", "Operator", "define", "call", "refusal_of", "NAMES"]


# --- fake kernels: shapes and dtypes only, for torch.compile and opcheck ---------------------------


def _check_one_device(tensors: list[Tensor], op: str) -> None:
    """The operators take the tensors of one device. A list mixing CPU and meta tensors is
    dispatched to the Meta kernel (these fakes) by the dispatcher, which would otherwise return an
    uninitialised norm and write nothing; refusing it sends the caller to its per-device path,
    which raises as torch does. A TypeError, as the native operators refuse a tensor before
    writing."""
    device = tensors[0].device
    for i, t in enumerate(tensors):
        if t.device != device:
            raise TypeError(
                f"fusedclip.{op}: all tensors must be on one device, but tensor 0 is on {device} "
                f"and tensor {i} on {t.device}"
            )


def _fake_norm(tensors, norm_type, per_tensor=False):
    _check_one_device(tensors, "multi_tensor_norm")
    acc = numerics.accumulate_dtype(tensors)
    count = len(tensors) if per_tensor else 0
    return tensors[0].new_empty((), dtype=acc), tensors[0].new_empty((count,), dtype=acc)


def _fake_in_place(op: str):
    def fake(tensors, *args):
        _check_one_device(tensors, op)

    return fake


def _fake_clip(tensors, max_norm, norm_type):
    _check_one_device(tensors, "clip_grad_norm_")
    return tensors[0].new_empty((), dtype=numerics.accumulate_dtype(tensors))


def _fake_two_norms(op: str):
    def fake(tensors, *args):
        _check_one_device(tensors, op)
        acc = numerics.accumulate_dtype(tensors)
        return tensors[0].new_empty((), dtype=acc), tensors[0].new_empty((len(tensors),), dtype=acc)

    return fake


def _fake_unscale_norm(tensors, inv_scale, norm_type):
    _check_one_device(tensors, "multi_tensor_unscale_norm")
    statistic = tensors[0].new_empty((), dtype=numerics.accumulate_dtype(tensors))
    return statistic, tensors[0].new_empty((), dtype=torch.float32)


def _fake_monitor(*args):
    return None


# --- what each call wrote ---------------------------------------------------------------------------
# (args, result, exact) -> the tensors to bump. exact: the kernel's choice is known on the host (a
# CPU coefficient); otherwise (a GPU decides on the device) every tensor the call may write.


def _all_tensors(args, result, exact) -> list[Tensor]:
    return args[0]


def _scaled_by_coef(args, result, exact) -> list[Tensor]:
    tensors, coef = args
    return tensors if not exact or not float(coef) >= 1.0 else []


def _scaled_per_tensor(args, result, exact) -> list[Tensor]:
    tensors, coefs = args
    if not exact:
        return tensors
    kept = coefs >= 1.0  # nan is written
    if not kept.any():  # one tensor op each, before a Python loop over every tensor
        return tensors
    if kept.all():
        return []
    return [t for t, k in zip(tensors, kept.tolist()) if not k]


def _clipped(args, result, exact) -> list[Tensor]:
    tensors, max_norm = args[0], args[1]
    total = result if isinstance(result, Tensor) else result[0]
    if not exact:
        return tensors
    return tensors if numerics.coefficient_below_one(float(total), total.dtype, max_norm) else []


def _monitor_state(args, result, exact) -> list[Tensor]:
    return list(args[1:8])


@dataclass(frozen=True)
class Operator:
    """One operator: its schema (after the name), its fake kernel, and which tensors a call wrote."""

    schema: str
    fake: Callable
    writes: Optional[Callable[[tuple, Any, bool], list[Tensor]]] = None


OPERATORS: dict[str, Operator] = {
    # The statistic of the p-norm before its root, over the concatenation of all tensors:
    # sum |x|^p (finite p != 0), max |x| (p = inf), min |x| (p = -inf), count of x != 0 (p = 0).
    # Accumulated in float32 (float64 when any tensor is float64 or complex128), which is also the
    # dtype of both results. The second result holds the per-tensor statistics when per_tensor is
    # true and is empty otherwise. The statistic of no elements is the reduction's identity (0, or
    # +inf for p = -inf), so statistics of disjoint shards combine exactly.
    "multi_tensor_norm": Operator(
        "(Tensor[] tensors, float norm_type, bool per_tensor=False) -> (Tensor, Tensor)", _fake_norm),
    # tensors *= coef in place, coef a 0-dim float tensor on the tensors' device, applied in float32
    # (float64 for float64 tensors). Writes nothing when coef >= 1.
    "multi_tensor_scale_": Operator(
        "(Tensor(a!)[] tensors, Tensor coef) -> ()", _fake_in_place("multi_tensor_scale_"), _scaled_by_coef),
    # tensors = min(max(tensors, min), max) in place, one pass; nan stays nan.
    "multi_tensor_clamp_": Operator(
        "(Tensor(a!)[] tensors, float min, float max) -> ()", _fake_in_place("multi_tensor_clamp_"), _all_tensors),
    # Norm, coefficient min(max_norm / (norm + 1e-6), 1) and scale in one call; returns the norm.
    "clip_grad_norm_": Operator(
        "(Tensor(a!)[] tensors, float max_norm, float norm_type) -> Tensor", _fake_clip, _clipped),
    # Unit-wise adaptive gradient clipping (AGC) in place. Units are the rows (slices along dim 0)
    # of each tensor with more than one dimension, else the whole tensor. Per unit:
    # W* = clip_factor * max(||param||_2, eps); when not ||grad||_2 < W*, grad *= W* /
    # max(||grad||_2, 1e-6). grads[i] and params[i] have the same shape. Returns the sum of squares
    # of the gradients before clipping, in total and per tensor, accumulated as multi_tensor_norm.
    "multi_tensor_agc_": Operator(
        "(Tensor(a!)[] grads, Tensor[] params, float clip_factor, float eps) -> (Tensor, Tensor)",
        _fake_two_norms("multi_tensor_agc_"), _all_tensors),
    # tensors[i] *= coefs[i] in place, coefs a 1-dim float tensor on the tensors' device with one
    # coefficient per tensor, applied as multi_tensor_scale_ applies its coef; tensor i is not
    # written when coefs[i] >= 1.
    "multi_tensor_scale_per_tensor_": Operator(
        "(Tensor(a!)[] tensors, Tensor coefs) -> ()", _fake_in_place("multi_tensor_scale_per_tensor_"),
        _scaled_per_tensor),
    # clip_grad_norm_ that also returns each tensor's norm before clipping (0 for a tensor with no
    # elements), from the same read; both results in the dtype of multi_tensor_norm's.
    "clip_grad_norm_with_norms_": Operator(
        "(Tensor(a!)[] tensors, float max_norm, float norm_type) -> (Tensor, Tensor)",
        _fake_two_norms("clip_grad_norm_with_norms_"), _clipped),
    # For a GradScaler: the statistic of multi_tensor_norm over x * inv_scale (inv_scale a
    # one-element float tensor on the tensors' device, the product in float32, float64 for float64
    # tensors) and found_inf, a 0-dim float32 tensor: 1 when any element is inf or nan, else 0.
    "multi_tensor_unscale_norm": Operator(
        "(Tensor[] tensors, Tensor inv_scale, float norm_type) -> (Tensor, Tensor)", _fake_unscale_norm),
    # GradientMonitor's per-step update (fusedclip.reference.monitor_update_ defines the math): per
    # entry of norms (float32 or float64, one norm per parameter), updates in place the running
    # mean and var (norms' dtype), the int64 counts of finite norms (count), of consecutive norms
    # below vanish_eps (below) and of steps flagged exploding (explosions), and writes this step's
    # flags into exploding and vanishing (bool).
    "monitor_update_": Operator(
        "(Tensor norms, Tensor(a!) mean, Tensor(b!) var, Tensor(c!) count, Tensor(d!) below, "
        "Tensor(e!) explosions, Tensor(f!) exploding, Tensor(g!) vanishing, float alpha, int warmup_steps, "
        "float z_threshold, float? explode_threshold, float vanish_eps, int vanish_steps) -> ()",
        _fake_monitor, _monitor_state),
}

NAMES = tuple(OPERATORS)

# Not a clipping operator: fusedclip::tensor_spans reads what backend "triton" keys its cached
# operands on (fusedclip/triton/tables.py key_of), two int64 words per tensor; its one kernel is
# csrc/cpu/tensor_spans.cpp, for tensors of every device.
TENSOR_SPANS_SCHEMA = "tensor_spans(Tensor[] tensors) -> Tensor"


def define(namespace: str) -> torch.library.Library:
    """Defines every operator as ``namespace::<name>`` with its fake kernel, and
    ``namespace::tensor_spans``; returns the library, which the caller keeps (the definitions
    last as long as it does)."""
    library = torch.library.Library(namespace, "DEF")
    for name, operator in OPERATORS.items():
        library.define(name + operator.schema)
        torch.library.register_fake(f"{namespace}::{name}", operator.fake, lib=library)
    library.define(TENSOR_SPANS_SCHEMA)
    return library


# --- calling an operator ----------------------------------------------------------------------------

_REFUSAL = re.compile(r"\[fusedclip (TypeError|ValueError)\] (.*)", re.DOTALL)
_REFUSAL_TYPES = {"TypeError": TypeError, "ValueError": ValueError}


def refusal_of(error: RuntimeError) -> Optional[Exception]:
    """The TypeError or ValueError a native kernel's refusal stands for (csrc/stable.h), with its
    message; None for any other error."""
    match = _REFUSAL.search(str(error))
    if match is None:
        return None
    message = match.group(2).split("\nException raised from")[0].strip()
    return _REFUSAL_TYPES[match.group(1)](message)


# Whether a CPU kernel's writes are read on the host (free for CPU tensors) to bump only what it
# wrote; tests turn it off to run the CPU path as a GPU runs (no tensor read on the host).
DECIDE_WRITES_ON_HOST = True


def call(op: Callable, name: str, args: tuple, exact_writes: bool) -> Any:
    """op(*args), an operator through the dispatcher: its refusal raised as the TypeError or
    ValueError it stands for, and the version counters of what it wrote bumped (exact_writes: the
    kernel's choice is known on the host, so tensors it did not write keep their version)."""
    try:
        result = op(*args)
    except RuntimeError as error:
        refusal = refusal_of(error)
        if refusal is None:
            raise
        raise refusal from None
    writes = OPERATORS[name].writes
    if writes is not None and not torch.compiler.is_compiling():
        written = writes(args, result, exact_writes and DECIDE_WRITES_ON_HOST)
        if written:
            torch._C._increment_version(written)
    return result
