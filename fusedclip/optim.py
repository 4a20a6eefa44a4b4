"""Clipping folded into the optimizer step.

``ClipOptimizer(torch.optim.AdamW(params, fused=True), max_norm=1.0)`` clips the gradients to a
global norm of ``max_norm`` and steps, in one read of the gradients plus the optimizer's own
kernel: torch's fused optimizers (Adam, AdamW, SGD, Adagrad with ``fused=True``) divide each
gradient by a ``grad_scale`` tensor and skip the step when a ``found_inf`` tensor is nonzero
(the inputs a GradScaler uses), so the clip coefficient :math:`c` goes in as
``grad_scale = 1 / c`` and no separate scale pass over the gradients is needed. Other
optimizers get fusedclip's scale pass, then their own step.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor

from fusedclip import _ops, clip, reference

__all__ = ["ClipOptimizer"]


class ClipOptimizer(torch.optim.Optimizer):
    r"""Wraps an optimizer so that ``step()`` clips the global gradient norm, then steps.

    .. math::
        N = \|g\|_p, \qquad c = \min\Big(\frac{\mathrm{max\_norm}}{N + 10^{-6}}, 1\Big), \qquad
        \text{step with } g \cdot c

    over the gradients of every parameter of the wrapped optimizer. With a fused optimizer
    (``fused=True``) :math:`g \cdot c` is computed inside its kernel as ``g / (1 / c)``, which
    differs from torch's ``g * c`` by rounding only; the gradients left in ``.grad`` are the
    clipped ones either way, as after ``clip_grad_norm_`` and ``step()``.

    Differences from ``clip_grad_norm_(params, max_norm)`` followed by ``optimizer.step()``:

    * ``step()`` returns the total norm before clipping (a 0-dim tensor), not the closure's loss.
      A closure, if given, runs once before the norm is taken.
    * When the norm is inf or nan the step is skipped: parameters, optimizer state and step counts
      stay as they were, and the gradients are not modified (torch would step with nan or zeroed
      gradients and write nan into the parameters). The fused path skips inside the kernel with
      no host sync; the unfused path reads the norm on the host to decide.
    * ``GradScaler``: ``scaler.step(clip_optimizer)`` works. With a fused optimizer the scaler
      hands over its scale and found_inf (``_step_supports_amp_scaling``), and the norm is taken
      of the unscaled gradients in the same read; the scale and the clip coefficient are applied
      together in the optimizer's kernel and its found_inf is combined with a non-finite norm. With
      any other optimizer the scaler unscales first, as usual.

    ``param_groups``, ``state``, ``defaults``, ``zero_grad``, ``state_dict``,
    ``load_state_dict`` and ``add_param_group`` are the wrapped optimizer's; learning-rate
    schedulers take a ClipOptimizer. Step hooks registered on the wrapped optimizer run inside
    its step, after the norm is taken.

    Args:
        optimizer: the optimizer to wrap.
        max_norm: the largest global norm allowed; a non-negative number.
        norm_type: p of the norm, any number or ``'inf'``; not nan.
        backend: fusedclip's backend for the norm and the unfused scale pass.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        max_norm: float,
        norm_type: Union[float, str] = 2.0,
        *,
        backend: str = "auto",
    ):
        # Optimizer.__init__ is not called: param_groups, state and defaults are the wrapped
        # optimizer's own objects, not copies.
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, ClipOptimizer):
            raise TypeError("optimizer is already a ClipOptimizer")
        self.optimizer = optimizer
        self.max_norm = clip._non_negative(max_norm, "max_norm")
        self.norm_type = clip._norm_type(norm_type)
        _ops.resolve_backend(backend, torch.device("cpu"))  # raises for an unknown name
        self.backend = backend

    # --- what the wrapped optimizer owns ---------------------------------------------------------

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> dict:
        return self.optimizer.state

    @state.setter
    def state(self, value: dict) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    @property
    def folded(self) -> bool:
        """True when the clip coefficient is applied inside the optimizer's kernel."""
        return bool(getattr(self.optimizer, "_step_supports_amp_scaling", False))

    @property
    def _step_supports_amp_scaling(self) -> bool:
        # A GradScaler then passes grad_scale and found_inf to step() instead of unscaling.
        return self.folded

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def __repr__(self) -> str:
        return (
            f"ClipOptimizer(max_norm={self.max_norm}, norm_type={self.norm_type}, "
            f"folded={self.folded}, optimizer={self.optimizer!r})"
        )

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    # --- the step ---------------------------------------------------------------------------------

    def step(self, closure: Optional[Callable[[], Any]] = None) -> Tensor:  # type: ignore[override]
        """Runs the closure if given, clips, and steps; returns the total norm before clipping."""
        if closure is not None:
            with torch.enable_grad():
                closure()
        # Set by GradScaler.step for optimizers that support amp scaling (see the class doc).
        scaler_scale: Optional[Tensor] = getattr(self, "grad_scale", None)
        scaler_found_inf: Optional[Tensor] = getattr(self, "found_inf", None)
        with torch.no_grad():
            grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
            if self.folded:
                total = self._folded_step(grads, scaler_scale, scaler_found_inf)
            else:
                total = self._unfolded_step(grads)
        return total

    def _folded_step(
        self, grads: list[Tensor], scaler_scale: Optional[Tensor], scaler_found_inf: Optional[Tensor]
    ) -> Tensor:
        if not grads:
            self.optimizer.step()
            return torch.tensor(0.0)
        if scaler_scale is None:
            total = clip.get_total_norm(grads, self.norm_type, backend=self.backend)
            found_inf = None
        else:
            total, found_inf = _unscaled_norm(grads, scaler_scale, self.norm_type, self.backend)
        coef = reference.clip_coefficient(total, self.max_norm).float()
        # The kernel divides by grad_scale: g / (s / c) = (g / s) * c. A zero coefficient (an inf
        # norm, or max_norm 0) gives an infinite grad_scale, hence zero gradients, as torch's
        # g * 0; an inf or nan norm skips the step anyway.
        grad_scale: Optional[Tensor] = coef.reciprocal()
        if scaler_scale is not None:
            grad_scale = grad_scale * scaler_scale.to(device=grad_scale.device, dtype=torch.float32)
        elif coef.device.type == "cpu" and bool(coef >= 1.0):
            # Nothing to scale (reading a CPU tensor is no sync): without grad_scale the kernel
            # does not write the gradients back.
            grad_scale = None
        non_finite = (~torch.isfinite(total)).to(torch.float32)
        for extra in (found_inf, scaler_found_inf):
            if extra is not None:
                non_finite = torch.maximum(non_finite, extra.to(device=non_finite.device, dtype=torch.float32))
        self.optimizer.grad_scale = grad_scale
        self.optimizer.found_inf = non_finite
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.grad_scale
            del self.optimizer.found_inf
        return total

    def _unfolded_step(self, grads: list[Tensor]) -> Tensor:
        if not grads:
            self.optimizer.step()
            return torch.tensor(0.0)
        total = clip.get_total_norm(grads, self.norm_type, backend=self.backend)
        if not bool(torch.isfinite(total)):  # a host sync on a GPU: the step is skipped or not
            return total
        clip.clip_grads_with_norm_(
            [p for group in self.param_groups for p in group["params"]],
            self.max_norm,
            total,
            backend=self.backend,
        )
        self.optimizer.step()
        return total


def _unscaled_norm(
    grads: list[Tensor], scale: Tensor, norm_type: float, backend: str
) -> tuple[Tensor, Tensor]:
    """The norm of grads / scale and whether any grad is inf or nan, in one read per device."""
    inv_scale = scale.double().reciprocal().float()  # as GradScaler.unscale_ computes it
    groups = clip._group_by_device(grads, None, backend, writes=False)
    statistics, found = [], []
    for device, group_backend, ts in groups:
        statistic, found_inf = _ops.multi_tensor_unscale_norm(group_backend, ts, inv_scale.to(device), norm_type)
        statistics.append(statistic)
        found.append(found_inf.to(groups[0][0]))
    empty = not any(t.numel() for t in grads)
    total = clip._norm_from_statistics(statistics, groups[0][0], empty, norm_type)
    return total, torch.stack(found).amax()
