"""The public API: torch.nn.utils' clipping functions, fused.

Each function takes torch's arguments and keeps torch's semantics (a tensor, a list or a
generator; ``None`` grads skipped; mixed dtypes and devices; the result on the first grad's
device), with these deliberate differences:

* Norms of fp16/bf16 grads accumulate in float32 and are returned as float32, so a norm above
  65504 is not ``inf`` and does not zero every gradient.
* ``norm_type=0`` counts nonzero elements (torch counts tensors that have a nonzero element).
* Bad arguments (negative or nan ``max_norm``, nan ``norm_type``, negative or nan
  ``clip_value``, sparse or non-float grads, non-tensor parameters) raise before anything is
  modified.
* Gradients are not written when the clip coefficient is 1.

How a call runs: the grads of one device go to one backend (see fusedclip/_ops.py). When every
grad is on the CPU, the C++ library reads the grads itself and runs the operator on the whole
list, validating it before writing anything (a Python loop over 10,000 parameters costs more
than the kernels). Anything it does not take (other devices, tensor subclasses, torch.compile)
or refuses goes the general path below: group the grads by device, validate each in Python
(raising a precise error), and run each device with its own backend.
"""

from __future__ import annotations

import numbers
import types
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Optional, Union

import torch
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import guard_scalar

from fusedclip import _ops, reference

__all__ = ["clip_grad_norm_", "get_total_norm", "clip_grads_with_norm_", "clip_grad_value_"]

TensorOrTensors = Union[Tensor, Iterable[Tensor]]
# A torch.distributed ProcessGroup or a sequence of them (not imported: see fusedclip.distributed).
ProcessGroups = Union[Any, Sequence[Any]]

_GRAD_DTYPES = (
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.complex64,
    torch.complex128,
)
_FOREACH_DEVICE_TYPES = ("cpu", "cuda", "xpu")


# --- arguments ----------------------------------------------------------------------------------


def _as_list(items: TensorOrTensors, warn_if_empty_generator: bool = False) -> list:
    if isinstance(items, Tensor):
        return [items]
    is_generator = isinstance(items, types.GeneratorType)
    items = list(items)
    if warn_if_empty_generator and is_generator and not items:
        warnings.warn(
            "`parameters` is an empty generator, no gradient clipping will occur.", stacklevel=3
        )
    return items


def _grads_of(parameters: list) -> list[Tensor]:
    """The defined grads of parameters, each read once."""
    return [g for g in _param_grads(parameters) if g is not None]


def _param_grads(parameters: list) -> list[Optional[Tensor]]:
    """parameters[i].grad for every i (None included), each read once."""
    try:
        # One .grad read per parameter (each costs ~100 ns: 1 ms at 10,000 parameters), and no
        # `(g := p.grad)`, which torch.compile cannot trace in a comprehension.
        return [p.grad for p in parameters]
    except AttributeError:
        for i, p in enumerate(parameters):
            if not isinstance(p, Tensor):
                raise TypeError(
                    f"parameters[{i}] must be a torch.Tensor, got {type(p).__name__}"
                ) from None
        raise


def _non_negative(value: Union[float, Tensor], name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, Tensor)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if isinstance(value, Tensor) and (value.numel() != 1 or value.is_complex()):
        raise TypeError(f"{name} must be a real number or a one-element real tensor")
    value = float(value)  # a device tensor syncs here, as in torch
    # `not value >= 0` is true for nan and for negatives; unlike math.isnan it traces when
    # torch.compile makes a float argument symbolic (a max_norm that changes between calls).
    if not value >= 0:
        raise ValueError(f"{name} must be a non-negative number, got {value}")
    return value


def _max_norm(value: Union[float, Tensor]) -> Union[float, Tensor]:
    """max_norm as a float, or as a 0-d tensor when given as a tensor.

    A tensor is checked without a host sync: read on the CPU (free) in eager mode, else checked
    where it lives (``torch._assert_async``: on a GPU the device raises, asynchronously), so
    torch.compile traces it without a guard on its value. Its coefficient is torch's true
    division ``max_norm / (norm + 1e-6)`` (see reference.clip_coefficient), so the fused
    operators, whose max_norm is a float, do not run it. A float under torch.compile stays
    symbolic (a schedule that changes it every step compiles twice, as torch's does).
    """
    if not isinstance(value, Tensor):
        return _non_negative(value, "max_norm")
    if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
        raise TypeError("max_norm must be a real number or a one-element real tensor")
    value = value.reshape(())
    if value.device.type == "cpu" and not torch.compiler.is_compiling():
        _non_negative(value, "max_norm")
    else:  # nan fails `>= 0` too
        torch._assert_async(value >= 0, "max_norm must be a non-negative number")
    return value


def _norm_type(norm_type: Union[float, str]) -> float:
    try:
        value = float(norm_type)
    except (TypeError, ValueError):
        raise ValueError(f"norm_type must be a number or 'inf', got {norm_type!r}") from None
    if value != value:  # nan; math.isnan does not trace when torch.compile makes it symbolic
        raise ValueError("norm_type must not be nan")
    if torch.compiler.is_compiling():
        # The norm type picks the kernel and the root: one graph per norm type (as torch's
        # vector_norm), where a norm type that changed would otherwise become a symbolic float.
        value = guard_scalar(value)
    return value


def _check_foreach(foreach: Optional[bool], device: torch.device) -> None:
    if foreach and device.type not in _FOREACH_DEVICE_TYPES:
        raise RuntimeError(
            f"foreach=True was passed, but can't use the foreach API on {device.type} tensors"
        )


def _check_writable(i: int, g: Tensor) -> None:
    """Raises if gradient i cannot be modified in place, before any gradient is."""
    if torch.compiler.is_compiling():
        # Dynamo cannot put these checks' Python bools in a graph; a zero stride on a dimension
        # of size > 1 is the overlap of an expanded tensor, and the operators check again at run
        # time, before writing.
        if any(stride == 0 and size > 1 for size, stride in zip(g.shape, g.stride())):
            raise ValueError(f"gradient {i} has internally overlapping memory (an expanded tensor)")
        return
    if torch._debug_has_internal_overlap(g) == 1:
        raise ValueError(
            f"gradient {i} has internally overlapping memory (an expanded tensor) and cannot be "
            "modified in place"
        )
    if g.is_conj() or g.is_neg():
        raise ValueError(
            f"gradient {i} is a lazily conjugated or negated view and cannot be modified in "
            "place; call .resolve_conj() / .resolve_neg() on it first"
        )
    if g.is_inference() and not torch.is_inference_mode_enabled():
        raise RuntimeError(
            f"gradient {i} is an inference tensor, which cannot be modified in place outside "
            "torch.inference_mode()"
        )


def _group_by_device(
    grads: list, foreach: Optional[bool], backend: str, writes: bool
) -> list[tuple[torch.device, str, list[Tensor]]]:
    """Validates every grad and groups them by device, in first-seen order, with a backend each."""
    groups: dict[torch.device, list[Tensor]] = {}
    for i, g in enumerate(grads):
        if not isinstance(g, Tensor):
            raise TypeError(f"gradient {i} must be a torch.Tensor, got {type(g).__name__}")
        if g.layout != torch.strided:
            raise TypeError(
                f"gradient {i} has layout {g.layout}; fusedclip clips dense gradients only "
                "(convert sparse gradients with .to_dense())"
            )
        if g.dtype not in _GRAD_DTYPES:
            raise TypeError(
                f"gradient {i} has dtype {g.dtype}; expected float32, float64, float16, "
                "bfloat16 or complex"
            )
        if writes:
            _check_writable(i, g)
        groups.setdefault(g.device, []).append(g)
    for device in groups:
        _check_foreach(foreach, device)
    return [(device, _ops.resolve_backend(backend, device), ts) for device, ts in groups.items()]


def _cpu_fast_path(backend: str) -> bool:
    """True when CPU grads go to the C++ operators straight, validated there, not in Python."""
    if torch.compiler.is_compiling():
        return False  # trace the general path: its checks cost nothing at run time there
    try:
        return _ops.resolve_backend(backend, torch.device("cpu")) == "cpu"
    except ValueError:  # a GPU backend: the general path resolves it per device (and says why not)
        return False


# What the C++ operators raise when they refuse a list, before writing anything: their own
# checks (csrc/cpu/tensor_table.cpp) raise TypeError or ValueError, the dispatcher raises
# NotImplementedError for a tensor it has no kernel for (a sparse grad).
_REFUSALS = (TypeError, ValueError, NotImplementedError)


def _on_cpu_grads(entry: Callable, *args, writes: bool = True):
    """entry(*args), a C++ entry point of backend "cpu"; None when it refused the grads.

    A refusal comes before anything is written; the general path then says why, or regroups.
    Any other error of an entry that writes (an allocation that failed) may come after writes
    began, and propagates: running the pass again would apply it twice. An entry that only
    reads (writes=False) writes nothing whatever fails, so any RuntimeError is taken as a refusal
    too (a non-tensor item fails in torch's argument parser). Entries return None (or False)
    themselves when they do not take the list (see _ops).
    """
    try:
        return entry(*args)
    except _REFUSALS:
        return None
    except RuntimeError:
        if writes:
            raise
        return None


def _first_on_cpu(tensors: list) -> bool:
    """Whether the first item is a CPU tensor (else the general path checks every item)."""
    return isinstance(tensors[0], Tensor) and tensors[0].device.type == "cpu"


# --- norms ----------------------------------------------------------------------------------------


def _group_statistics(groups: list[tuple[torch.device, str, list[Tensor]]], norm_type: float) -> list[Tensor]:
    """The norm statistic (before the root) of each group, on its own device."""
    return [_ops.multi_tensor_norm(backend, ts, norm_type)[0] for _, backend, ts in groups]


def _combined_statistic(statistics: list[Tensor], first_device: torch.device, norm_type: float) -> Tensor:
    """One statistic from the statistics of several devices' grads, on first_device."""
    if len(statistics) == 1:
        return statistics[0]
    acc = torch.float64 if any(s.dtype == torch.float64 for s in statistics) else torch.float32
    stacked = torch.stack([s.to(device=first_device, dtype=acc) for s in statistics])
    return reference.combine_statistics(stacked, norm_type)


def _statistic(groups: list[tuple[torch.device, str, list[Tensor]]], norm_type: float) -> Tensor:
    """The norm statistic (before the root) over every group, on the first group's device."""
    return _combined_statistic(_group_statistics(groups, norm_type), groups[0][0], norm_type)


def _norm_from_statistics(
    statistics: list[Tensor], first_device: torch.device, empty: bool, norm_type: float
) -> Tensor:
    """The global norm from the statistics of each device's grads, on first_device."""
    statistic = _combined_statistic(statistics, first_device, norm_type)
    return reference.total_norm_from_statistic(statistic, norm_type, empty)


def _norm_of_group_statistics(
    groups: list[tuple[torch.device, str, list[Tensor]]], statistics: list[Tensor], norm_type: float
) -> Tensor:
    """The global norm from one norm statistic per group, on the first group's device."""
    empty = not any(t.numel() for _, _, ts in groups for t in ts)
    return _norm_from_statistics(statistics, groups[0][0], empty, norm_type)


def _total_norm(groups: list[tuple[torch.device, str, list[Tensor]]], norm_type: float) -> Tensor:
    """The global norm over every group, on the first group's device."""
    return _norm_of_group_statistics(groups, _group_statistics(groups, norm_type), norm_type)


def _is_distributed(grads: list, process_group) -> bool:
    """True when the call goes to fusedclip.distributed: a process group, or DTensor grads."""
    if process_group is not None:
        return True
    from fusedclip import distributed  # imported here: fusedclip.distributed imports clip.py

    return distributed.has_dtensor(grads)


def _raise_if_nonfinite(total_norm: Tensor, norm_type: float) -> None:
    if torch.logical_or(total_norm.isnan(), total_norm.isinf()):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is "
            "non-finite, so it cannot be clipped. To disable this error and scale the gradients "
            "by the non-finite norm anyway, set `error_if_nonfinite=False`"
        )


def _scale_groups(groups: list[tuple[torch.device, str, list[Tensor]]], coef: Tensor) -> None:
    for device, backend, ts in groups:
        _ops.multi_tensor_scale_(backend, ts, coef.to(device))


def get_total_norm(
    tensors: TensorOrTensors,
    norm_type: Union[float, str] = 2.0,
    error_if_nonfinite: bool = False,
    foreach: Optional[bool] = None,
    *,
    backend: str = "auto",
    process_group: Optional[ProcessGroups] = None,
) -> Tensor:
    r"""The norm of all ``tensors`` viewed as one vector (torch.nn.utils.get_total_norm).

    .. math::
        \|g\|_p = \Big(\sum_i |g_i|^p\Big)^{1/p}, \qquad
        \|g\|_\infty = \max_i |g_i|, \qquad \|g\|_{-\infty} = \min_i |g_i|, \qquad
        \|g\|_0 = \#\{i : g_i \neq 0\}

    over every element of every tensor, accumulated in float32 (float64 for float64 input).

    Args:
        tensors: a tensor or an iterable of tensors (the gradients themselves).
        norm_type: p, any number or ``'inf'``; not nan.
        error_if_nonfinite: raise ``RuntimeError`` if the norm is nan or inf (a host sync).
        foreach: accepted for compatibility; ``True`` on a device without foreach support
            raises as in torch. fusedclip's kernels are always multi-tensor.
        backend: "auto", "cpu", "cuda", "triton" or "torch" (see :func:`fusedclip.available_backends`).
        process_group: a ``torch.distributed`` process group, or a sequence of them reduced in
            turn, whose ranks hold disjoint parts of the tensors: the norm is the norm of all
            of them (see :mod:`fusedclip.distributed`). Every rank of the group must call,
            also one without tensors. DTensor tensors are reduced over their meshes' Shard
            dimensions without it.

    Returns:
        A 0-dim tensor on the first tensor's device: float32 when every tensor is fp16, bf16 or
        float32 (complex64), float64 when any is float64 (complex128). ``tensor(0.)`` when
        there are no tensors. A replicated DTensor when every tensor is a DTensor of one mesh.
    """
    with torch.no_grad():
        norm_type = _norm_type(norm_type)
        tensors = _as_list(tensors)
        if not tensors and process_group is None:
            return torch.tensor(0.0)
        total = None
        if process_group is None and _first_on_cpu(tensors) and _cpu_fast_path(backend):
            result = _on_cpu_grads(_ops.multi_tensor_norm, "cpu", tensors, norm_type, writes=False)
            if result is not None:
                empty = not any(t.numel() for t in tensors)
                total = reference.total_norm_from_statistic(result[0], norm_type, empty)
        if total is None and _is_distributed(tensors, process_group):
            from fusedclip import distributed

            total = distributed.get_total_norm(tensors, norm_type, foreach, backend, process_group)
        if total is None:
            total = _total_norm(_group_by_device(tensors, foreach, backend, writes=False), norm_type)
        if error_if_nonfinite:
            _raise_if_nonfinite(total, norm_type)
        return total


def clip_grads_with_norm_(
    parameters: TensorOrTensors,
    max_norm: float,
    total_norm: Tensor,
    foreach: Optional[bool] = None,
    *,
    backend: str = "auto",
) -> None:
    r"""Scales the gradients by :math:`\min(\mathrm{max\_norm} / (\mathrm{total\_norm} + 10^{-6}), 1)`.

    torch.nn.utils.clip_grads_with_norm_ with a precomputed ``total_norm`` (a tensor, read
    without a host sync; a DTensor norm is made whole first). Gradients are not written when the
    coefficient is 1; DTensor gradients are scaled shard by shard.
    """
    with torch.no_grad():
        max_norm = _max_norm(max_norm)
        if type(total_norm) is not Tensor and _is_distributed([total_norm], None):
            from fusedclip import distributed

            total_norm = distributed.as_tensor(total_norm)
        if not isinstance(total_norm, Tensor):
            raise TypeError(f"total_norm must be a torch.Tensor, got {type(total_norm).__name__}")
        if total_norm.numel() != 1 or not total_norm.is_floating_point():
            raise TypeError(
                "total_norm must be a one-element floating-point tensor, got shape "
                f"{tuple(total_norm.shape)} and dtype {total_norm.dtype}"
            )
        total_norm = total_norm.reshape(())  # a (1,) norm scales a 0-d grad too
        params = _as_list(parameters)
        coef = reference.clip_coefficient(total_norm, max_norm)
        if coef.device.type == "cpu" and _cpu_fast_path(backend):  # never copy a device scalar
            if _on_cpu_grads(_ops.scale_grads_of_params_, params, coef):
                return
        grads = _grads_of(params)
        if not grads:
            return
        if _is_distributed(grads, None):
            from fusedclip import distributed

            distributed.scale_dtensor_grads_(grads, coef, foreach, backend)
            return
        _scale_groups(_group_by_device(grads, foreach, backend, writes=True), coef)


def clip_grad_norm_(
    parameters: TensorOrTensors,
    max_norm: float,
    norm_type: Union[float, str] = 2.0,
    error_if_nonfinite: bool = False,
    foreach: Optional[bool] = None,
    *,
    backend: str = "auto",
    process_group: Optional[ProcessGroups] = None,
    grad_scaler: Optional[torch.amp.GradScaler] = None,
    optimizer: Optional[torch.optim.Optimizer] = None,
) -> Tensor:
    r"""Clips the gradients of ``parameters`` to a global norm of at most ``max_norm``.

    torch.nn.utils.clip_grad_norm_: computes :math:`N = \|g\|_p` over all gradients viewed as
    one vector (see :func:`get_total_norm`), then scales every gradient in place by

    .. math::
        c = \min\Big(\frac{\mathrm{max\_norm}}{N + 10^{-6}},\ 1\Big)

    computed in the norm's dtype, applied in float32 (float64 for float64 grads) and rounded
    once. When :math:`c = 1` nothing is written. On one device the norm, the coefficient and the
    scale run in one operator call with no host sync.

    Args:
        parameters: a tensor or an iterable of tensors whose ``.grad`` is clipped (``None``
            grads are skipped).
        max_norm: the largest norm allowed; a non-negative number.
        norm_type: p, any number or ``'inf'``; not nan. ``0`` counts nonzero elements.
        error_if_nonfinite: raise ``RuntimeError``, before scaling, if the norm is nan or inf.
        foreach: accepted for compatibility (see :func:`get_total_norm`).
        backend: "auto", "cpu", "cuda", "triton" or "torch".
        process_group: the norm is taken over the grads of every rank of this group (or of
            these groups, in turn), each holding disjoint parts; see :func:`get_total_norm`.
        grad_scaler, optimizer: with a ``torch.amp.GradScaler`` and the optimizer it steps, the
            gradients are unscaled and clipped in one pass, leaving the scaler as
            ``grad_scaler.unscale_(optimizer)`` does (see fusedclip/amp.py); do not call
            ``unscale_`` first. ``error_if_nonfinite`` must then be False.

    Returns:
        The total norm before clipping (see :func:`get_total_norm` for its dtype and device).
    """
    if grad_scaler is not None or optimizer is not None:
        from fusedclip import amp  # amp imports this module

        amp.check_grad_scaler_arguments(grad_scaler, optimizer, error_if_nonfinite)
        if process_group is not None:
            raise ValueError(
                "grad_scaler= cannot be combined with process_group= (not supported yet): call "
                "grad_scaler.unscale_(optimizer), then clip_grad_norm_(..., process_group=...)"
            )
        return amp.unscale_and_clip_grad_norm_(
            parameters, max_norm, norm_type, grad_scaler=grad_scaler, optimizer=optimizer, backend=backend
        )
    with torch.no_grad():
        max_norm = _max_norm(max_norm)
        norm_type = _norm_type(norm_type)
        params = _as_list(parameters, warn_if_empty_generator=True)
        fused = isinstance(max_norm, float) and not error_if_nonfinite  # the fused operators' max_norm
        if process_group is None and fused and _cpu_fast_path(backend):
            total = _on_cpu_grads(_ops.clip_grad_norm_of_params, params, max_norm, norm_type)
            if total is not None:
                return total
        grads = _grads_of(params)
        if _is_distributed(grads, process_group):
            from fusedclip import distributed

            return distributed.clip_grad_norm_(
                grads, max_norm, norm_type, error_if_nonfinite, foreach, backend, process_group
            )
        if not grads:
            return torch.tensor(0.0)
        groups = _group_by_device(grads, foreach, backend, writes=True)
        if len(groups) == 1 and fused and not torch.compiler.is_compiling():
            _, group_backend, ts = groups[0]
            return _ops.clip_grad_norm_(group_backend, ts, max_norm, norm_type)
        total = _total_norm(groups, norm_type)
        if error_if_nonfinite:
            _raise_if_nonfinite(total, norm_type)
        _scale_groups(groups, reference.clip_coefficient(total, max_norm))
        return total


def clip_grad_value_(
    parameters: TensorOrTensors,
    clip_value: float,
    foreach: Optional[bool] = None,
    *,
    backend: str = "auto",
) -> None:
    r"""Clamps every gradient element to :math:`[-\mathrm{clip\_value}, \mathrm{clip\_value}]`.

    torch.nn.utils.clip_grad_value_, in one read-write pass (torch makes two); nan stays nan.
    ``clip_value`` must be a non-negative number; complex gradients are refused (clamping is not
    defined for them).
    """
    with torch.no_grad():
        clip_value = _non_negative(clip_value, "clip_value")
        params = _as_list(parameters)
        if _cpu_fast_path(backend):
            if _on_cpu_grads(_ops.clamp_grads_of_params_, params, -clip_value, clip_value):
                return
        grads = _grads_of(params)
        if not grads:
            return
        if _is_distributed(grads, None):  # DTensor grads: clamp their local tensors
            from fusedclip import distributed

            grads = distributed.local_tensors_to_clamp(grads)
        groups = _group_by_device(grads, foreach, backend, writes=True)
        for g in (g for _, _, ts in groups for g in ts):
            if g.is_complex():
                raise TypeError("clip_grad_value_ does not support complex gradients")
        for _, group_backend, ts in groups:
            _ops.multi_tensor_clamp_(group_backend, ts, -clip_value, clip_value)
