"""Mixed precision: a GradScaler's unscale_ and clip_grad_norm_ fused.

With a ``torch.amp.GradScaler`` the usual step is::

    scaler.unscale_(optimizer)                        # read-write every grad, record inf/nan
    torch.nn.utils.clip_grad_norm_(params, max_norm)  # read every grad, then read-write it

which moves every gradient five times. ``fusedclip.clip_grad_norm_(params, max_norm,
grad_scaler=scaler, optimizer=optimizer)`` reads the scaled gradients once for both the norm of
the unscaled gradients and the inf/nan check (fusedclip::multi_tensor_unscale_norm), then
multiplies them once by ``inv_scale * coef``: three moves. Afterwards the scaler's state for the
optimizer is what ``scaler.unscale_(optimizer)`` leaves (found_inf per device, stage UNSCALED), so
``scaler.step(optimizer)`` and ``scaler.update()`` run unchanged and skip the step on inf/nan.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.amp.grad_scaler import OptState

from fusedclip import _core, _ops, distributed, numerics, reference

__all__ = ["unscale_and_clip_grad_norm_"]


def _optimizer_grads(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """The grads that scaler.unscale_(optimizer) would unscale, checked as it checks them."""
    grads = []
    for group in optimizer.param_groups:
        for param in group["params"]:
            if not isinstance(param, Tensor):
                raise TypeError(f"optimizer parameters must be tensors, got {type(param).__name__}")
            if param.grad is None:
                continue
            if param.grad.dtype == torch.float16:
                raise ValueError("Attempting to unscale FP16 gradients.")  # torch's own message
            grads.append(param.grad)
    return grads


def _check_stage(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> dict:
    """The scaler's state for optimizer, after the checks scaler.unscale_ makes (same errors)."""
    scaler._check_scale_growth_tracker("unscale_")
    state = scaler._per_optimizer_states[id(optimizer)]
    if state["stage"] is OptState.UNSCALED:
        raise RuntimeError(
            "unscale_() has already been called on this optimizer since the last update()."
        )
    if state["stage"] is OptState.STEPPED:
        raise RuntimeError("unscale_() is being called after step().")
    return state


def _unscale_and_check(grads: list[Tensor], found_inf: Tensor, inv_scale: Tensor) -> None:
    """torch's unscale_ of grads that are not clipped: grads *= inv_scale, found_inf |= any inf/nan."""
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for same_dtype in by_dtype.values():
        torch._amp_foreach_non_finite_check_and_unscale_(same_dtype, found_inf, inv_scale)


def _scale_by(backend: str, grads: list[Tensor], factor: Tensor, inv_scale: Tensor) -> None:
    """grads *= factor (= inv_scale * coef) in one read-write.

    multi_tensor_scale_ writes nothing for a coefficient >= 1, which is right for clipping but not
    for an unscale factor above 1 (a loss scale below 1). That case, and devices whose scale pass
    might skip without the host reading the factor, multiply with torch, every element.
    """
    if factor.device.type == "cpu" and not bool(inv_scale > 1.0):
        _ops.run("multi_tensor_scale_", backend, grads, factor)
    else:
        reference.multiply_(grads, factor)


def unscale_and_clip_grad_norm_(
    parameters: _core.TensorOrTensors,
    max_norm: float,
    norm_type: float = 2.0,
    *,
    grad_scaler: torch.amp.GradScaler,
    optimizer: torch.optim.Optimizer,
    backend: str = "auto",
) -> Tensor:
    r"""``grad_scaler.unscale_(optimizer)`` then ``clip_grad_norm_(parameters, max_norm)``, fused.

    With :math:`s` the scaler's scale and :math:`x` the scaled gradients of ``parameters``:

    .. math::
        N = \|x \cdot s^{-1}\|_p, \qquad c = \min\Big(\frac{\mathrm{max\_norm}}{N + 10^{-6}}, 1\Big),
        \qquad x \leftarrow x \cdot (s^{-1} c)

    :math:`x \cdot s^{-1}` enters the norm rounded to float32 (float64 for float64 grads), as
    torch's unscale_ leaves float32 grads; the gradients are multiplied once by
    :math:`s^{-1} c` (torch multiplies by :math:`s^{-1}`, then by :math:`c`: a few ulps apart). found_inf is 1 when
    any gradient of the optimizer holds inf or nan. Gradients of the optimizer that are not in
    ``parameters`` are unscaled by torch, not clipped, as the unfused sequence does.

    Called through :func:`fusedclip.clip_grad_norm_` with ``grad_scaler=`` and ``optimizer=`` (which
    clips only, for a disabled scaler).

    Returns:
        The total norm of the unscaled gradients before clipping (inf or nan when any is).
    """
    with torch.no_grad():
        max_norm = _core.non_negative(max_norm, "max_norm")
        norm_type = _core.norm_type(norm_type)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        state = _check_stage(grad_scaler, optimizer)
        optimizer_grads = _optimizer_grads(optimizer)
        if distributed.has_dtensor(optimizer_grads):
            raise ValueError(
                "grad_scaler= does not take DTensor gradients (FSDP2, tensor parallel) yet: call "
                "grad_scaler.unscale_(optimizer), then fusedclip.clip_grad_norm_"
            )
        clipped = _core.grads_of(_core.as_list(parameters, warn_if_empty_generator=True))
        clipped_ids = {id(g) for g in clipped}
        if len(clipped_ids) != len(clipped) or not clipped_ids <= {id(g) for g in optimizer_grads}:
            raise ValueError(
                "every gradient of `parameters` must belong to `optimizer`, once: the scaler "
                "unscales the optimizer's gradients"
            )
        groups = _core.group_by_device(optimizer_grads, None, backend, writes=True)
        for i, g in enumerate(optimizer_grads):  # checked before anything is unscaled
            if g.is_complex() and id(g) not in clipped_ids:
                raise TypeError(
                    f"gradient {i} of optimizer is complex ({g.dtype}) and not in `parameters`: "
                    "the scaler's unscale (torch._amp_foreach_non_finite_check_and_unscale_) "
                    "does not take complex gradients"
                )

        scale = grad_scaler._scale
        # As torch's unscale_: the reciprocal in float64, rounded once to float32.
        inv_scale = scale.double().reciprocal().float()
        found_inf_per_device: dict[torch.device, Tensor] = {}
        to_clip_per_group = []  # (backend, the group's clipped grads)
        statistics = []  # the statistic of each device's clipped grads
        first_device, empty = None, True
        for device, group_backend, grads in groups:
            device_inv_scale = inv_scale.to(device)
            to_clip = [g for g in grads if id(g) in clipped_ids]
            others = [g for g in grads if id(g) not in clipped_ids]
            if to_clip:
                statistic, found_inf = _ops.run(
                    "multi_tensor_unscale_norm", group_backend, to_clip, device_inv_scale, norm_type)
                statistics.append(statistic)
                to_clip_per_group.append((group_backend, to_clip))
                first_device = first_device or device
                empty = empty and not any(g.numel() for g in to_clip)
            else:
                found_inf = torch.zeros((), dtype=torch.float32, device=device)
            if others:
                _unscale_and_check(others, found_inf, device_inv_scale)
            found_inf_per_device[device] = found_inf

        if not statistics:
            total = torch.tensor(0.0)
        else:
            total = _core.norm_from_statistics(statistics, first_device, empty, norm_type)
            coef = numerics.clip_coefficient(total, max_norm)
            factor = coef * inv_scale.to(device=coef.device, dtype=coef.dtype)
            for group_backend, to_clip in to_clip_per_group:
                _scale_by(group_backend, to_clip, factor.to(to_clip[0].device), inv_scale)
        state["found_inf_per_device"] = found_inf_per_device
        state["stage"] = OptState.UNSCALED
        return total


def check_grad_scaler_arguments(
    grad_scaler: Optional[torch.amp.GradScaler],
    optimizer: Optional[torch.optim.Optimizer],
    error_if_nonfinite: bool,
) -> None:
    """The checks of clip_grad_norm_'s grad_scaler= and optimizer= arguments."""
    if grad_scaler is None:  # so optimizer= was given: it has no use without the scaler
        raise ValueError(
            "optimizer= is the optimizer of grad_scaler=, which is missing: pass grad_scaler= (the "
            "torch.amp.GradScaler that scaled the loss) too, or leave optimizer= out to clip only"
        )
    if not isinstance(grad_scaler, torch.amp.GradScaler):
        raise TypeError(f"grad_scaler must be a torch.amp.GradScaler, got {type(grad_scaler).__name__}")
    if optimizer is None:
        raise ValueError("grad_scaler= needs optimizer=, the optimizer whose gradients it unscales")
    if error_if_nonfinite:
        raise ValueError(
            "error_if_nonfinite=True cannot be combined with grad_scaler=: inf/nan gradients are "
            "the scaler's to handle (it skips the step and lowers the scale)"
        )
