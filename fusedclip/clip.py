"""The public API: torch.nn.utils' clipping functions, fused.

Each function takes torch's arguments and keeps torch's semantics (a tensor, a list or a
generator; ``None`` grads skipped; mixed dtypes and devices; the result on the first grad's
device), with these deliberate differences:

* Norms of fp16/bf16 grads accumulate in float32 and are returned as float32, so a norm above
  65504 is not ``inf`` and does not zero every gradient.
* ``norm_type=0`` counts nonzero elements (torch counts tensors that have a nonzero element).
* Bad arguments (negative or nan ``max_norm``, nan ``norm_type``, negative or nan
  ``clip_value``, sparse or non-float grads, non-tensor parameters) raise before anything is
  modified. ``max_norm`` and ``clip_value`` are read as torch reads them (``float()``: a bool, a
  numeric string, a one-element bool or integer tensor), a bool or integer ``total_norm`` is
  promoted as torch's ``total_norm + 1e-6`` promotes it; a complex or meta one is refused.
* Gradients are not written when the clip coefficient is 1.

How a call runs: the grads are read, then go to one operator call as one list when they are plain
tensors (the native operators validate them before writing), else the general path (grads
validated and grouped by device, each device with its own backend), both in fusedclip/_core.py; process groups and DTensor grads go to fusedclip/distributed.py, a
GradScaler to fusedclip/amp.py.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from fusedclip import _core, _ops, amp, distributed, numerics
from fusedclip._core import ProcessGroups, TensorOrTensors

__all__ = ["clip_grad_norm_", "get_total_norm", "clip_grads_with_norm_", "clip_grad_value_"]


def _is_distributed(grads: list, process_group) -> bool:
    """True when the call goes to fusedclip.distributed: a process group, or DTensor grads."""
    if process_group is not None:
        return True
    return distributed.has_dtensor(grads)


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
        norm_type = _core.norm_type(norm_type)
        tensors = _core.as_list(tensors)
        if not tensors and process_group is None:
            return torch.tensor(0.0)
        total = None
        if process_group is None:
            total = _core.run_as_one_group(tensors, foreach, backend, False,
                                           lambda group: _core.total_norm([group], norm_type))
        if total is None and _is_distributed(tensors, process_group):
            total = distributed.get_total_norm(tensors, norm_type, foreach, backend, process_group)
        if total is None:
            total = _core.total_norm(_core.group_by_device(tensors, foreach, backend, writes=False), norm_type)
        if error_if_nonfinite:
            _core.raise_if_nonfinite(total, norm_type)
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

    torch.nn.utils.clip_grads_with_norm_ with a precomputed ``total_norm`` (a one-element real
    tensor, read without a host sync; a bool or integer one in the default dtype, as torch's
    ``total_norm + 1e-6`` promotes it; a DTensor norm is made whole first; a meta one scales meta
    gradients only). Gradients are not written when the coefficient is 1; DTensor gradients are
    scaled shard by shard; a tensor-subclass gradient is scaled in a list of its own, as torch
    scales it (see fusedclip/_core.py group_key).
    """
    with torch.no_grad():
        max_norm = _core.max_norm(max_norm)
        if type(total_norm) is not Tensor and _is_distributed([total_norm], None):
            total_norm = distributed.as_tensor(total_norm)
        if not isinstance(total_norm, Tensor):
            raise TypeError(f"total_norm must be a torch.Tensor, got {type(total_norm).__name__}")
        if total_norm.numel() != 1 or total_norm.is_complex():
            raise TypeError(
                "total_norm must be a one-element real tensor, got shape "
                f"{tuple(total_norm.shape)} and dtype {total_norm.dtype}"
            )
        total_norm = total_norm.reshape(())  # a (1,) norm scales a 0-d grad too
        if not total_norm.is_floating_point():  # bool or integer: as torch's `total_norm + 1e-6`
            total_norm = total_norm.to(torch.get_default_dtype())
        params = _core.as_list(parameters)
        if total_norm.is_meta:
            _check_meta_total_norm(params)
        coef = numerics.clip_coefficient(total_norm, max_norm)
        scale_grads_(_core.grads_of(params), coef, foreach, backend)


def scale_grads_(grads: list, coef: Tensor, foreach: Optional[bool], backend: str) -> None:
    """grads *= coef in place (coef a 0-dim tensor): plain grads, DTensor grads shard by shard
    (fusedclip.distributed), a tensor-subclass grad in a list of its own. Nothing is written
    where coef is 1 (the operators read it), and nothing at all when a grad is refused."""
    if not grads:
        return
    if _core.run_as_one_group(grads, foreach, backend, True, lambda group: _scale_one_group(group, coef)):
        return
    if _is_distributed(grads, None):
        distributed.scale_dtensor_grads_(grads, coef, foreach, backend)
        return
    _core.scale_groups(_core.group_by_device(grads, foreach, backend, writes=True), coef)


def _scale_one_group(group: _core.Group, coef: Tensor) -> Optional[bool]:
    """Scales the group by coef when coef is on its device (a device scalar is never copied here:
    the general path moves it); None when it is not."""
    device, backend, grads = group
    if coef.device != device:
        return None
    _ops.run("multi_tensor_scale_", backend, grads, coef)
    return True


def _check_meta_total_norm(params: list) -> None:
    """A meta total_norm scales meta grads only (torch fails bringing it to another device)."""
    for g in _core.grads_of(params):
        if isinstance(g, Tensor) and not g.is_meta:
            raise ValueError(
                f"total_norm is a meta tensor, which holds no value, and cannot scale gradients on "
                f"{g.device}"
            )


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
        max_norm: the largest norm allowed; a non-negative number, read as torch reads it
            (``float(max_norm)``: a bool, a numeric string, a one-element tensor; a tensor is
            read on its device, without a host sync).
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
        amp.check_grad_scaler_arguments(grad_scaler, optimizer, error_if_nonfinite)
    if grad_scaler is not None and grad_scaler.is_enabled():  # a disabled scaler: clip only
        if process_group is not None:
            raise ValueError(
                "grad_scaler= cannot be combined with process_group= (not supported yet): call "
                "grad_scaler.unscale_(optimizer), then clip_grad_norm_(..., process_group=...)"
            )
        return amp.unscale_and_clip_grad_norm_(
            parameters, max_norm, norm_type, grad_scaler=grad_scaler, optimizer=optimizer, backend=backend
        )
    with torch.no_grad():
        max_norm = _core.max_norm(max_norm)
        norm_type = _core.norm_type(norm_type)
        params = _core.as_list(parameters, warn_if_empty_generator=True)
        fused = isinstance(max_norm, float) and not error_if_nonfinite  # the fused operators' max_norm
        grads = _core.grads_of(params)
        if process_group is None and fused:
            total = _core.run_as_one_group(
                grads, foreach, backend, True, lambda group: _ops.run("clip_grad_norm_", group[1], group[2], max_norm, norm_type)
            )
            if total is not None:
                return total
        if _is_distributed(grads, process_group):
            return distributed.clip_grad_norm_(
                grads, max_norm, norm_type, error_if_nonfinite, foreach, backend, process_group
            )
        if not grads:
            return torch.tensor(0.0)
        groups = _core.group_by_device(grads, foreach, backend, writes=True)
        if len(groups) == 1 and fused and not torch.compiler.is_compiling():
            _, group_backend, ts = groups[0]
            return _ops.run("clip_grad_norm_", group_backend, ts, max_norm, norm_type)
        total = _core.total_norm(groups, norm_type)
        if error_if_nonfinite:
            _core.raise_if_nonfinite(total, norm_type)
        _core.scale_groups(groups, numerics.clip_coefficient(total, max_norm))
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
    ``clip_value`` must be a non-negative number, read as torch reads it (``float(clip_value)``);
    complex gradients are refused (clamping is not defined for them).
    """
    with torch.no_grad():
        clip_value = _core.clip_value(clip_value)
        grads = _core.grads_of(_core.as_list(parameters))
        if not grads:
            return
        clamp = lambda group: _ops.run("multi_tensor_clamp_", group[1], group[2], -clip_value, clip_value) or True  # noqa: E731
        if _core.run_as_one_group(grads, foreach, backend, True, clamp):
            return
        if _is_distributed(grads, None):  # DTensor grads: clamp their local tensors
            grads = distributed.local_tensors_to_clamp(grads)
        groups = _core.group_by_device(grads, foreach, backend, writes=True)
        for g in (g for _, _, ts in groups for g in ts):
            if g.is_complex():
                raise TypeError("clip_grad_value_ does not support complex gradients")
        # Traced as ATen clamps (which Inductor fuses): the operators' bounds are floats, which a
        # graph guards on, and a clip_value schedule would recompile at every value.
        compiling = torch.compiler.is_compiling()
        for _, group_backend, ts in groups:
            _ops.run("multi_tensor_clamp_", "torch" if compiling else group_backend, ts, -clip_value, clip_value)
