"""Adaptive clipping on the fused kernels: AGC, AutoClip, ZClip and per-tensor clipping.

Each clipper is an object called once per optimizer step, after backward and before
``optimizer.step()``::

    clipper = fusedclip.ZClip()
    total_norm = clipper(model.parameters())   # the global norm before clipping

Every clipper keeps its state in tensors on the gradients' device and updates it with tensor
operations (``torch.where``, never a Python ``if`` on a value), so a call never waits for the
device. A step whose global norm is nan or inf leaves the state unchanged and, for AutoClip and
ZClip, writes nothing (the caller, or a GradScaler, skips that step; the returned norm says so).
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from typing import Optional, Union

import torch
from torch import Tensor

from fusedclip import _core, _ops, clip, distributed, numerics, reference

__all__ = ["AGC", "AutoClip", "ZClip", "PerTensorClip"]

Parameters = Union[Tensor, Iterable[Tensor]]

_REAL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _grads(parameters: Parameters) -> list[Tensor]:
    return _core.grads_of(_core.as_list(parameters, warn_if_empty_generator=True))


class _GlobalNormClipper:
    """A clipper that scales every grad by a coefficient of the global norm N and a state kept on
    the device: a subclass gives ``_coefficient(N) -> (coef, new state)`` and ``_STATE``, the
    names of the state's attributes in that order.

    A call stores the new state only once the grads are scaled, so a call that raises leaves the
    clipper as it was.
    """

    _STATE: tuple[str, ...] = ()
    norm_type: float
    backend: str

    def _coefficient(self, total: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        raise NotImplementedError

    def __call__(self, parameters: Parameters) -> Tensor:
        with torch.no_grad():
            grads = _grads(parameters)
            if not grads:
                return torch.tensor(0.0)

            def run(groups: list[_core.Group]):
                total = _core.total_norm(groups, self.norm_type)
                coef, state = self._coefficient(total)
                _core.scale_groups(groups, coef)
                return total, state

            if distributed.has_dtensor(grads):
                # The global norm over the grads' meshes, a replicated DTensor as clip_grad_norm_
                # returns it; the state is kept as a plain tensor.
                total = clip.get_total_norm(grads, self.norm_type, backend=self.backend)
                coef, state = self._coefficient(distributed.as_tensor(total))
                clip.scale_grads_(grads, coef, None, self.backend)
            else:
                total, state = _core.run_grouped(grads, self.backend, True, run)
            for name, value in zip(self._STATE, state):
                setattr(self, name, value)
            return total


class AGC:
    r"""Adaptive gradient clipping, unit-wise (Brock et al. 2021; timm's ``adaptive_clip_grad``).

    For every unit :math:`i` (a row, i.e. a slice along dim 0, of a parameter with more than one
    dimension, else the whole parameter), with :math:`W_i` the parameter and :math:`G_i` its
    gradient:

    .. math::
        W^*_i = \lambda \max(\|W_i\|_2, \epsilon), \qquad
        G_i \leftarrow G_i \cdot \frac{W^*_i}{\max(\|G_i\|_2, 10^{-6})}
        \quad \text{unless } \|G_i\|_2 < W^*_i

    with :math:`\lambda` = ``clip_factor`` (default 0.01) and :math:`\epsilon` = ``eps``
    (default 1e-3). On the CPU one fused pass reads every parameter once and every gradient once
    and rewrites, from the cache, only the units that clip (timm runs about six kernels and two
    temporaries per parameter). Stateless; a nan gradient unit becomes nan, as in timm. A
    parameter and its gradient may differ in dtype (a tensor's ``grad_dtype``): each is read in
    its own.

    Args:
        clip_factor: :math:`\lambda`, non-negative.
        eps: :math:`\epsilon`, non-negative.
        exclude: parameters (tensors) or parameter names left unclipped, such as the classifier
            head; names apply when the clipper is called with ``model.named_parameters()``.
        backend: as in :func:`fusedclip.clip_grad_norm_`.

    Calling it with parameters, or ``(name, parameter)`` pairs, clips their gradients and
    returns the global 2-norm of all their gradients (excluded ones included) before clipping,
    from the same read.
    """

    def __init__(self, clip_factor: float = 0.01, eps: float = 1e-3, *,
                 exclude: Iterable[Union[Tensor, str]] = (), backend: str = "auto"):
        self.clip_factor = _core.non_negative(clip_factor, "clip_factor")
        self.eps = _core.non_negative(eps, "eps")
        exclude = [exclude] if isinstance(exclude, (Tensor, str)) else list(exclude)
        for i, item in enumerate(exclude):
            if not isinstance(item, (Tensor, str)):
                raise TypeError(f"exclude[{i}] must be a tensor or a parameter name, got {type(item).__name__}")
        self._excluded_ids = {id(item) for item in exclude if isinstance(item, Tensor)}
        self._excluded_names = {item for item in exclude if isinstance(item, str)}
        self.backend = backend

    def _split(self, parameters) -> tuple[list[tuple[Tensor, Tensor]], list[Tensor]]:
        """(grad, param) pairs to clip, and the excluded grads."""
        pairs, excluded = [], []
        for i, item in enumerate(_core.as_list(parameters)):
            name = None
            if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
                name, item = item
            if not isinstance(item, Tensor):
                raise TypeError(
                    f"parameters[{i}] must be a torch.Tensor or a (name, tensor) pair, got {type(item).__name__}"
                )
            if item.grad is None:
                continue
            if id(item) in self._excluded_ids or name in self._excluded_names:
                excluded.append(item.grad)
            else:
                pairs.append((item.grad, item))
        return pairs, excluded

    @staticmethod
    def _check_params(pairs: list[tuple[Tensor, Tensor]]) -> None:
        """Refuses, before any gradient is written, every pair the kernels cannot clip (as the
        C++ operator does). A parameter may have another real dtype than its gradient."""
        for i, (g, p) in enumerate(pairs):
            if g.is_complex():
                raise TypeError(f"gradient {i} is complex; AGC is defined for real tensors")
            if p.dtype not in _REAL_DTYPES:
                raise TypeError(f"parameter {i} has dtype {p.dtype}; expected float32, float64, float16 or bfloat16")
            if p.shape != g.shape or p.device != g.device:
                raise ValueError(f"parameter {i} ({tuple(p.shape)} on {p.device}) and its gradient "
                                 f"({tuple(g.shape)} on {g.device}) differ in shape or device")

    def _clip(self, pairs: list[tuple[Tensor, Tensor]]) -> Tensor:
        """Clips every pair; returns the sum of squares of the gradients before clipping."""
        grads = [g for g, _ in pairs]
        params = [p for _, p in pairs]
        # The operators validate everything before writing; when they refuse, the general path
        # below says why, or regroups.
        result = _core.run_as_one_group(
            grads, None, self.backend, True,
            lambda group: _ops.run("multi_tensor_agc_", group[1], group[2], params, self.clip_factor, self.eps))
        if result is not None:
            return result[0]
        groups = _core.group_by_device(grads, None, self.backend, writes=True)
        self._check_params(pairs)
        statistics = []
        for device, backend, ts in groups:
            group_params = [p for g, p in pairs if g.device == device]
            statistic, _ = _ops.run("multi_tensor_agc_", backend, ts, group_params, self.clip_factor, self.eps)
            statistics.append(statistic)
        first = statistics[0]
        if len(statistics) == 1:
            return first
        return torch.stack([s.to(first.device, torch.float64) for s in statistics]).sum()

    def __call__(self, parameters: Union[Parameters, Iterable[tuple[str, Tensor]]]) -> Tensor:
        with torch.no_grad():
            pairs, excluded = self._split(parameters)
            # The excluded grads are only read; first, so that a refusal leaves everything as it was.
            excluded_norm = clip.get_total_norm(excluded, backend=self.backend) if excluded else None
            if not pairs:
                return excluded_norm if excluded_norm is not None else torch.tensor(0.0)
            square_sum = self._clip(pairs)
            if excluded_norm is not None:
                square_sum = square_sum + excluded_norm.to(square_sum.device, square_sum.dtype).square()
            return square_sum.sqrt()


class AutoClip(_GlobalNormClipper):
    r"""AutoClip (Seetharaman et al. 2020): clip at a percentile of the history of norms.

    Each call appends the global norm :math:`N_t` to a history of the last ``history_size``
    finite norms (a ring buffer on the device), takes its ``percentile``-th percentile
    :math:`\tau_t` (linear interpolation, as ``numpy.percentile``; the current norm included)
    and scales every gradient by :math:`\min(\tau_t / (N_t + 10^{-6}), 1)`, torch's coefficient.
    A non-finite :math:`N_t` is not added and nothing is written. Default percentile 10.

    ``threshold`` holds the last :math:`\tau_t` (a device tensor).
    """

    _STATE = ("history", "next_slot", "threshold")

    def __init__(self, percentile: float = 10.0, history_size: int = 1000, norm_type: Union[float, str] = 2.0,
                 *, backend: str = "auto"):
        if isinstance(percentile, bool) or not isinstance(percentile, numbers.Real) or not 0 <= percentile <= 100:
            raise ValueError(f"percentile must be a number in [0, 100], got {percentile!r}")
        self.percentile = float(percentile)
        self.history_size = _positive_int(history_size, "history_size")
        self.norm_type = _core.norm_type(norm_type)
        self.backend = backend
        self.history: Optional[Tensor] = None  # float64, nan where not yet filled
        self.next_slot: Optional[Tensor] = None
        self.threshold: Optional[Tensor] = None

    def _coefficient(self, total: Tensor):
        device = total.device
        history, next_slot = self.history, self.next_slot
        if history is None or history.device != device:
            history = torch.full((self.history_size,), float("nan"), dtype=torch.float64, device=device)
            next_slot = torch.zeros((), dtype=torch.int64, device=device)
        norm = total.double()
        finite = norm.isfinite()
        slot = torch.arange(self.history_size, device=device) == next_slot
        history = torch.where(slot & finite, norm, history)
        next_slot = torch.where(finite, (next_slot + 1) % self.history_size, next_slot)
        threshold = torch.nanquantile(history, self.percentile / 100.0)
        coef = torch.where(finite, numerics.clip_coefficient(norm, threshold), 1.0)
        return coef, (history, next_slot, threshold)


class ZClip(_GlobalNormClipper):
    r"""ZClip (Kumar et al. 2025): clip spikes of the global norm by their EMA z-score.

    Warm-up: the first ``warmup_steps`` finite norms are collected (and clipped only to
    ``max_grad_norm``, when given); then :math:`\mu` and :math:`\sigma^2` are their mean and
    population variance. After it, for each norm :math:`N`:

    .. math::
        z = \frac{N - \mu}{\sigma + \epsilon}, \qquad
        c = \begin{cases} \mathrm{clip\_factor}\,\big(\mu + z_{thr}^2\,\sigma / z\big) & z > z_{thr}\\
                          N & \text{otherwise}\end{cases}

    the limit is :math:`L = \min(c, \mathrm{max\_grad\_norm})` (just :math:`c` without one), and
    when :math:`N > L` every gradient is scaled by :math:`L / (N + 10^{-6})`. Then
    :math:`\mu \leftarrow \alpha\mu + (1-\alpha)c`,
    :math:`\sigma^2 \leftarrow \alpha\sigma^2 + (1-\alpha)(c - \mu)^2` (with the new
    :math:`\mu`), skipped on spikes when ``skip_update_on_spike``. A non-finite :math:`N`
    updates nothing and writes nothing (the reference implementation's statistics become nan
    forever). Defaults as the reference: alpha 0.97, z_thresh 2.5, eps 1e-6, 25 warm-up steps.

    ``mean``, ``var`` and ``warmup_count`` are device tensors.
    """

    _STATE = ("buffer", "warmup_count", "mean", "var")

    def __init__(self, alpha: float = 0.97, z_thresh: float = 2.5, max_grad_norm: Optional[float] = None,
                 eps: float = 1e-6, warmup_steps: int = 25, clip_factor: float = 1.0,
                 skip_update_on_spike: bool = False, norm_type: Union[float, str] = 2.0, *,
                 backend: str = "auto"):
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0 <= alpha < 1:
            raise ValueError(f"alpha must be a number in [0, 1), got {alpha!r}")
        self.alpha = float(alpha)
        self.z_thresh = _core.non_negative(z_thresh, "z_thresh")
        if self.z_thresh == 0:
            raise ValueError("z_thresh must be positive")
        self.max_grad_norm = None if max_grad_norm is None else _core.non_negative(max_grad_norm, "max_grad_norm")
        self.eps = _core.non_negative(eps, "eps")
        self.warmup_steps = _positive_int(warmup_steps, "warmup_steps")
        self.clip_factor = _core.non_negative(clip_factor, "clip_factor")
        self.skip_update_on_spike = bool(skip_update_on_spike)
        self.norm_type = _core.norm_type(norm_type)
        self.backend = backend
        self.buffer: Optional[Tensor] = None
        self.warmup_count: Optional[Tensor] = None
        self.mean: Optional[Tensor] = None
        self.var: Optional[Tensor] = None

    def _coefficient(self, total: Tensor):
        device = total.device
        if self.buffer is None or self.buffer.device != device:
            zero = torch.zeros((), dtype=torch.float64, device=device)
            buffer, count, mean, var = (torch.zeros(self.warmup_steps, dtype=torch.float64, device=device),
                                        torch.zeros((), dtype=torch.int64, device=device), zero, zero)
        else:
            buffer, count, mean, var = self.buffer, self.warmup_count, self.mean, self.var
        norm = total.double()
        finite = norm.isfinite()
        warm = count >= self.warmup_steps
        std = var.sqrt()
        z = (norm - mean) / (std + self.eps)
        spike = warm & (z > self.z_thresh)
        adaptive = (mean + self.z_thresh**2 * std / z) * self.clip_factor
        clip_value = torch.where(spike, adaptive, norm)
        limit = clip_value if self.max_grad_norm is None else clip_value.clamp(max=self.max_grad_norm)
        coef = torch.where(finite & (norm > limit), limit / (norm + numerics.CLIP_EPS), 1.0)
        # Warm-up: collect finite norms; the step that fills the buffer sets mean and variance.
        collect = finite & ~warm
        buffer = torch.where(collect & (torch.arange(self.warmup_steps, device=device) == count), norm, buffer)
        count = count + collect
        completes = collect & (count == self.warmup_steps)
        # After it: the EMAs of the effective norm.
        update = finite & warm
        if self.skip_update_on_spike:
            update = update & ~spike
        ema_mean = self.alpha * mean + (1 - self.alpha) * clip_value
        ema_var = self.alpha * var + (1 - self.alpha) * (clip_value - ema_mean).square()
        mean = torch.where(completes, buffer.mean(), torch.where(update, ema_mean, mean))
        var = torch.where(completes, buffer.var(unbiased=False), torch.where(update, ema_var, var))
        return coef, (buffer, count, mean, var)


class PerTensorClip:
    r"""Clips every gradient to its own norm of at most ``max_norm`` (tf.clip_by_norm per tensor).

    Each gradient :math:`g_t` is scaled by :math:`\min(\mathrm{max\_norm} / (\|g_t\|_p + 10^{-6}), 1)`
    (torch's coefficient, per tensor; tf.clip_by_norm's :math:`c / \max(\|g_t\|, c)` up to the
    :math:`10^{-6}`), and gradients whose coefficient is 1 are not written. One read of every
    gradient gives the per-tensor norms and the global norm; one multi-tensor pass scales, each
    tensor by its own coefficient read from the device. Stateless; returns the global norm before
    clipping.
    """

    def __init__(self, max_norm: float, norm_type: Union[float, str] = 2.0, *, backend: str = "auto"):
        self.max_norm = _core.non_negative(max_norm, "max_norm")
        self.norm_type = _core.norm_type(norm_type)
        self.backend = backend

    def __call__(self, parameters: Parameters) -> Tensor:
        with torch.no_grad():
            grads = _grads(parameters)
            if not grads:
                return torch.tensor(0.0)
            return _core.run_grouped(grads, self.backend, True, self._clip_groups)

    def _clip_groups(self, groups: list[_core.Group]) -> Tensor:
        statistics, coefs = [], []
        for _, backend, ts in groups:
            statistic, per_statistic = _ops.run("multi_tensor_norm", backend, ts, self.norm_type, True)
            statistics.append(statistic)
            norms = reference.per_tensor_norms(per_statistic, ts, self.norm_type)
            coefs.append(numerics.clip_coefficient(norms, self.max_norm))
        total = _core.norm_of_group_statistics(groups, statistics, self.norm_type)
        for (_, backend, ts), coef in zip(groups, coefs):
            _ops.run("multi_tensor_scale_per_tensor_", backend, ts, coef)
        return total
