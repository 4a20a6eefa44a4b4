"""What the public API and the features share: argument checks, grad collection and grouping,
the one-group route, and the norm of grouped grads.

clip.py (the public functions), amp, distributed, ddp, health, adaptive and optim build on this
module; it imports only the backends (_backends), the operator layer (_ops), the numeric rules
(numerics) and the pure-PyTorch kernels (reference), so nothing here reaches back up
(tests/test_layering.py).

How a call runs: the grads of one device go to one backend (see fusedclip/_ops.py), by one
route. The grads are read in Python; when they are plain tensors, they go to the operators as one
list on the first grad's device (:func:`run_as_one_group`), and the native operators validate
every tensor before writing anything (a Python loop over 10,000 grads costs more than the
kernels). Anything they refuse (grads on several devices, an expanded or sparse grad) or do not
take (tensor subclasses, torch.compile, backend "torch") goes the general path:
:func:`group_by_device` validates each grad in Python (raising a precise error) and groups them by
device, each device with its own backend, and each tensor-subclass grad in a group of its own
(:func:`group_key`).
"""

from __future__ import annotations

import numbers
import sys
import types
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Optional, Union

import torch
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import guard_scalar

from fusedclip import _backends, _ops, numerics, reference

# The grads of one device and the backend that runs them.
Group = tuple[torch.device, str, list[Tensor]]

TensorOrTensors = Union[Tensor, Iterable[Tensor]]
# A torch.distributed ProcessGroup or a sequence of them (not imported: see fusedclip.distributed).
ProcessGroups = Union[Any, Sequence[Any]]

GRAD_DTYPES = (
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.complex64,
    torch.complex128,
)
FOREACH_DEVICE_TYPES = ("cpu", "cuda", "xpu")


# --- arguments ----------------------------------------------------------------------------------


def as_list(items: TensorOrTensors, warn_if_empty_generator: bool = False) -> list:
    if isinstance(items, Tensor):
        return [items]
    is_generator = isinstance(items, types.GeneratorType)
    items = list(items)
    if warn_if_empty_generator and is_generator and not items:
        warnings.warn(
            "`parameters` is an empty generator, no gradient clipping will occur.", stacklevel=3
        )
    return items


def grads_of(parameters: list) -> list[Tensor]:
    """The defined grads of parameters, each read once.

    Read by fusedclip._C where it loaded (the same attribute reads in a C loop, with the None
    filter in the same pass: ~53 ns a parameter against ~85 in Python), except under
    torch.compile, which traces the Python."""
    if _backends._C is not None and not torch.compiler.is_compiling():
        try:
            return _backends._C.grads_of(parameters)
        except AttributeError:
            _refuse_non_tensors(parameters)
            raise
    grads = param_grads(parameters)
    # A scan of the types in C (~20 ns a grad) before a Python filter (~30 ns a grad) that most
    # steps do not need.
    if type(None) in set(map(type, grads)):
        return [g for g in grads if g is not None]
    return grads


def param_grads(parameters: list) -> list[Optional[Tensor]]:
    """parameters[i].grad for every i (None included), each read once."""
    try:
        # One .grad read per parameter (each costs ~60 ns: 0.6 ms at 10,000 parameters), and no
        # `(g := p.grad)`, which torch.compile cannot trace in a comprehension.
        return [p.grad for p in parameters]
    except AttributeError:
        _refuse_non_tensors(parameters)
        raise


def _refuse_non_tensors(parameters: list) -> None:
    """Raises the TypeError naming the first parameter that is not a tensor, if any."""
    for i, p in enumerate(parameters):
        if not isinstance(p, Tensor):
            raise TypeError(f"parameters[{i}] must be a torch.Tensor, got {type(p).__name__}") from None


def _check_scalar_tensor(value: Tensor, name: str) -> None:
    """A one-element real tensor (bool and integer included, as torch's float() reads them) that
    holds a value: not a meta tensor."""
    if value.numel() != 1 or value.is_complex():
        raise TypeError(f"{name} must be a real number or a one-element real tensor")
    if value.is_meta:
        raise ValueError(f"{name} is a meta tensor, which holds no value")


def as_float(value: Any, name: str) -> float:
    """float(value), as torch reads max_norm and clip_value: a real number (bool included), a
    numeric string (" 1e-3 ", "inf"), a Decimal, anything with __float__, a one-element real
    tensor (a device tensor syncs here, as in torch); refused with the argument's name
    otherwise (complex numbers included: float() refuses them)."""
    if isinstance(value, Tensor):
        _check_scalar_tensor(value, name)
    elif isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{name} must be a number, got {value!r}") from None
    elif not isinstance(value, numbers.Real) and not hasattr(type(value), "__float__"):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    try:
        return float(value)
    except OverflowError:  # an int past float's range
        raise ValueError(f"{name} is too large for a float, got {value!r}") from None
    except (TypeError, ValueError) as error:  # a __float__ that refuses (a numpy array of two)
        raise type(error)(f"{name} must be a real number, got {type(value).__name__}: {error}") from None


def non_negative(value: Any, name: str) -> float:
    value = as_float(value, name)
    # `not value >= 0` is true for nan and for negatives; unlike math.isnan it traces when
    # torch.compile makes a float argument symbolic (a max_norm that changes between calls).
    if not value >= 0:
        raise ValueError(f"{name} must be a non-negative number, got {value}")
    return value


def max_norm(value: Union[float, Tensor]) -> Union[float, Tensor]:
    """max_norm as a float, or as a 0-d tensor when given as a tensor.

    A tensor is checked without a host sync (_non_negative_tensor). Its coefficient, computed on the
    device from the tensor (numerics.clip_coefficient: torch's bits, as if read as a float),
    runs outside the fused operators, whose max_norm is a float. A float under torch.compile
    stays symbolic (a schedule that changes it every step compiles twice, as torch's does).
    """
    if not isinstance(value, Tensor):
        return non_negative(value, "max_norm")
    return _non_negative_tensor(value, "max_norm")


def _non_negative_tensor(value: Tensor, name: str) -> Tensor:
    """A one-element tensor argument as a 0-d tensor, checked non-negative without a host sync:
    read on the CPU (free) in eager mode, else checked where it lives (``torch._assert_async``;
    on a GPU the device raises, asynchronously), which torch.compile traces without a guard on
    its value."""
    _check_scalar_tensor(value, name)
    value = value.reshape(())
    if value.device.type == "cpu" and not torch.compiler.is_compiling():
        non_negative(value, name)
    else:  # nan fails `>= 0` too
        torch._assert_async(value >= 0, f"{name} must be a non-negative number")
    return value


def clip_value(value: Union[float, Tensor]) -> float:
    """clip_value as a float, read as torch reads it (``float()``).

    A tensor under torch.compile is checked as a tensor max_norm is (where it lives) and read as a
    symbolic float, as torch's ``float(clip_value)`` traces: a Python check of its value would be
    a guard on data the graph cannot know.
    """
    if isinstance(value, Tensor) and torch.compiler.is_compiling():
        return float(_non_negative_tensor(value, "clip_value"))
    return non_negative(value, "clip_value")


def norm_type(norm_type: Union[float, str]) -> float:
    if isinstance(norm_type, Tensor) and norm_type.is_meta:
        raise ValueError("norm_type is a meta tensor, which holds no value")
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


def check_foreach(foreach: Optional[bool], device: torch.device) -> None:
    if foreach and device.type not in FOREACH_DEVICE_TYPES:
        raise RuntimeError(
            f"foreach=True was passed, but can't use the foreach API on {device.type} tensors"
        )


def check_writable(i: int, g: Tensor) -> None:
    """Raises if gradient i cannot be modified in place, before any gradient is."""
    if torch.compiler.is_compiling():
        # Dynamo cannot put these checks' Python bools in a graph; a zero stride on a dimension
        # of size > 1 is the overlap of an expanded tensor, and the operators check again at run
        # time, before writing. Dynamo cannot read the strides of a view read from .grad (a
        # bucket view of DDP, a transposed grad): a view's check is left to the operators.
        if g._base is not None:
            return
        if g.numel() > 0 and any(stride == 0 and size > 1 for size, stride in zip(g.shape, g.stride())):
            raise ValueError(f"gradient {i} has internally overlapping memory (an expanded tensor)")
        return
    if numerics.internal_overlap(g):
        raise ValueError(
            f"gradient {i} has internally overlapping memory (elements that share memory: an "
            "expanded tensor, an as_strided view) and cannot be modified in place; clone it first"
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


def group_by_device(
    grads: list, foreach: Optional[bool], backend: str, writes: bool
) -> list[Group]:
    """Validates every grad and groups them by device, in first-seen order, with a backend each
    (a tensor-subclass grad alone: see group_key).

    Every grad is checked here in Python, which names what it refuses."""
    groups: dict[Any, list[Tensor]] = {}
    dtensor = dtensor_type()
    for i, g in enumerate(grads):
        if not isinstance(g, Tensor):
            raise TypeError(f"gradient {i} must be a torch.Tensor, got {type(g).__name__}")
        if dtensor is not None and isinstance(g, dtensor):
            # The four functions, AutoClip, ZClip and ClipOptimizer take DTensor grads through
            # fusedclip.distributed before grouping; a per-tensor norm would need a reduction of
            # each tensor's statistic over its mesh.
            raise TypeError(
                f"gradient {i} is a DTensor, which this function does not take: per-tensor norms "
                "(get_norms, clip_grad_norm_with_norms_, PerTensorClip, AGC, GradientMonitor) are "
                "not reduced across a mesh; clip_grad_norm_, get_total_norm, clip_grads_with_norm_, "
                "clip_grad_value_, AutoClip, ZClip and ClipOptimizer take DTensor grads"
            )
        if g.layout != torch.strided:
            raise TypeError(
                f"gradient {i} has layout {g.layout}; fusedclip clips dense gradients only "
                "(convert sparse gradients with .to_dense())"
            )
        if g.dtype not in GRAD_DTYPES:
            raise TypeError(
                f"gradient {i} has dtype {g.dtype}; expected float32, float64, float16, "
                "bfloat16 or complex"
            )
        if writes:
            check_writable(i, g)
        groups.setdefault(group_key(i, g), []).append(g)
    result = []
    for ts in groups.values():
        device = ts[0].device
        check_foreach(foreach, device)
        result.append((device, _backends.resolve_backend(backend, device), ts))
    return result


def dtensor_type() -> Optional[type]:
    """DTensor, when torch.distributed.tensor has been imported (no DTensor exists before)."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def is_dispatch_subclass(t: Tensor) -> bool:
    """Whether t is a tensor subclass with a ``__torch_dispatch__`` of its own (TwoTensor, DTensor,
    ...): every op that t enters runs the subclass's Python, which may run it once per component
    on every tensor of the op's lists (TwoTensor does). A plain Tensor or Parameter, or a
    subclass with only ``__torch_function__``, is not one. Read from the type, which
    torch.compile knows without a guard on the tensor."""
    cls = type(t)
    return cls is not Tensor and cls is not torch.nn.Parameter and (
        cls.__torch_dispatch__ is not torch._C._disabled_torch_dispatch_impl
    )


def group_key(i: int, g: Tensor) -> Any:
    """The group of grad i in group_by_device: its device, or a group of its own for a
    dispatch subclass. An operator given a subclass grad in a list with plain grads may be
    redispatched by the subclass with the whole list once per component (TwoTensor: the plain
    grads scaled twice, by two coefficients); alone in its list, the subclass runs each operator
    on its own grad only, as torch's clipping runs it (tensor by tensor, no foreach)."""
    return ("subclass", i) if is_dispatch_subclass(g) else g.device


# What the operators raise when they refuse a list, before writing anything: their own checks
# (fusedclip.operators.call turns a native refusal into TypeError or ValueError), the dispatcher's
# NotImplementedError for a tensor it has no kernel for (a sparse grad).
REFUSALS = (TypeError, ValueError, NotImplementedError)

# The types of the grads the one-group route takes: a tensor subclass goes to group_key.
_PLAIN_TYPES = frozenset((Tensor, torch.nn.Parameter))


def _refused_by_dispatcher(error: RuntimeError) -> bool:
    """Whether torch's dispatcher refused the call before any kernel ran: a lazily conjugated or
    negated tensor in a list an operator writes."""
    return "mutable TensorLists with" in str(error)


_is_inference = Tensor.is_inference


def plain_tensors(tensors: list, writable: bool) -> bool:
    """Whether every tensor is a plain Tensor or Parameter (no subclass: group_key) and, when
    writable, none is an inference tensor, which may not be written outside inference mode and
    which the stable ABI cannot recognise. Asked of fusedclip._C where it loaded (~40 ns a
    tensor to write, 5 to read), else in Python (~90 and 20)."""
    if _backends._C is not None and type(tensors) is list:
        return _backends._C.plain_tensors(tensors, writable)
    return set(map(type, tensors)) <= _PLAIN_TYPES and not (writable and any(map(_is_inference, tensors)))


def one_group(tensors: list, foreach: Optional[bool], backend: str, writes: bool) -> Optional[Group]:
    """The tensors as one group on the first one's device, with its backend, when the operators
    can be given them as they are: a non-empty list of plain tensors (plain_tensors) going to a
    native backend, which checks every tensor itself before writing. None otherwise, and under
    torch.compile, which traces the general path (its checks cost nothing at run time there)."""
    if not tensors or torch.compiler.is_compiling():
        return None
    if not plain_tensors(tensors, writes and not torch.is_inference_mode_enabled()):
        return None
    device = tensors[0].device
    check_foreach(foreach, device)
    group_backend = _backends.resolve_backend(backend, device)
    return None if group_backend == "torch" else (device, group_backend, tensors)


def run_as_one_group(tensors: list, foreach: Optional[bool], backend: str, writes: bool,
                     fn: Callable[[Group], Any]):
    """fn(group) with the tensors as one group (see one_group); None when they are not one, or when
    the operators refuse them. fn must write only in its last operator call and return something
    other than None: a refusal comes before anything is written, and the caller then takes the
    general path, which raises the precise error or regroups. Any other error propagates: writes
    may have begun, and running the pass again would apply it twice."""
    group = one_group(tensors, foreach, backend, writes)
    if group is None:
        return None
    try:
        return fn(group)
    except REFUSALS:
        return None
    except RuntimeError as error:
        if _refused_by_dispatcher(error):
            return None
        raise


# --- norms ----------------------------------------------------------------------------------------


def group_statistics(groups: list[Group], norm_type: float) -> list[Tensor]:
    """The norm statistic (before the root) of each group, on its own device."""
    return [_ops.run("multi_tensor_norm", backend, ts, norm_type)[0] for _, backend, ts in groups]


def combined_statistic(statistics: list[Tensor], first_device: torch.device, norm_type: float) -> Tensor:
    """One statistic from the statistics of several devices' grads, on first_device."""
    if len(statistics) == 1:
        return statistics[0]
    acc = numerics.accumulate_dtype(statistics)
    stacked = torch.stack([s.to(device=first_device, dtype=acc) for s in statistics])
    return numerics.combine_statistics(stacked, norm_type)


def statistic(groups: list[Group], norm_type: float) -> Tensor:
    """The norm statistic (before the root) over every group, on the first group's device."""
    return combined_statistic(group_statistics(groups, norm_type), groups[0][0], norm_type)


def norm_from_statistics(
    statistics: list[Tensor], first_device: torch.device, empty: bool, norm_type: float
) -> Tensor:
    """The global norm from the statistics of each device's grads, on first_device."""
    statistic = combined_statistic(statistics, first_device, norm_type)
    return numerics.total_norm_from_statistic(statistic, norm_type, empty)


def norm_of_group_statistics(
    groups: list[Group], statistics: list[Tensor], norm_type: float
) -> Tensor:
    """The global norm from one norm statistic per group, on the first group's device; taken
    again when its sum left the accumulator's range (numerics.norm_out_of_range), where deciding
    it is free (numerics.rescale_decided_on_host: every group on the CPU)."""
    empty = not any(t.numel() for _, _, ts in groups for t in ts)
    total = norm_from_statistics(statistics, groups[0][0], empty, norm_type)
    if all(device.type == "cpu" for device, _, _ in groups):
        # A second read after an overflow only: backend "torch"'s kernels serve every backend.
        total = reference.rescaled_if_overflowed([t for _, _, ts in groups for t in ts], total, norm_type)
    return total


def total_norm(groups: list[Group], norm_type: float) -> Tensor:
    """The global norm over every group, on the first group's device."""
    return norm_of_group_statistics(groups, group_statistics(groups, norm_type), norm_type)


def raise_if_nonfinite(total_norm: Tensor, norm_type: float) -> None:
    if torch.logical_or(total_norm.isnan(), total_norm.isinf()):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is "
            "non-finite, so it cannot be clipped. To disable this error and scale the gradients "
            "by the non-finite norm anyway, set `error_if_nonfinite=False`"
        )


def scale_groups(groups: list[Group], coef: Tensor) -> None:
    for device, backend, ts in groups:
        _ops.run("multi_tensor_scale_", backend, ts, coef.to(device))


# --- running grouped grads -----------------------------------------------------------------------


def run_grouped(tensors: list[Tensor], backend: str, writes: bool, fn: Callable[[list[Group]], Any]):
    """fn(groups): the tensors as one group when the operators take them (run_as_one_group), else
    validated and grouped by device. fn follows run_as_one_group's rule: it writes only in its last
    operator call and returns something other than None."""
    result = run_as_one_group(tensors, None, backend, writes, lambda group: fn([group]))
    if result is not None:
        return result
    return fn(group_by_device(tensors, None, backend, writes))


def norms_of_groups(groups: list[Group], tensors: list[Tensor], norm_type: float) -> tuple[Tensor, Tensor]:
    """(global norm, per-tensor norms in the order of ``tensors``) in one read of every tensor."""
    statistics, per_group = [], []
    for _, backend, ts in groups:
        statistic, per_statistic = _ops.run("multi_tensor_norm", backend, ts, norm_type, True)
        statistics.append(statistic)
        per_group.append(reference.per_tensor_norms(per_statistic, ts, norm_type))
    total = norm_of_group_statistics(groups, statistics, norm_type)
    if len(groups) == 1:
        return total, per_group[0].to(total.dtype)
    # Groups hold the tensors of each group_key in first-seen order: put them back in order.
    position: dict[Any, list[int]] = {}
    for i, t in enumerate(tensors):
        position.setdefault(group_key(i, t), []).append(i)
    grouped_at = [0] * len(tensors)  # where tensor i's norm is in the groups' concatenation
    for k, i in enumerate(i for indices in position.values() for i in indices):
        grouped_at[i] = k
    # A gather, not a scatter into a plain tensor: a subclass norm (a group of its own) keeps
    # its type, as torch.stack of per-tensor norms keeps it.
    per = torch.cat([p.to(total.device, total.dtype) for p in per_group])
    return total, per[torch.tensor(grouped_at, device=total.device)]
