"""Gradient health: per-tensor norms from the pass that computes the global norm, and a monitor.

:func:`get_norms` and :func:`clip_grad_norm_with_norms_` return the norm of every tensor along
with the global norm, from the same single read of the gradients (the operators reduce each
tensor's statistic on the way to the total). :class:`GradientMonitor` records them every step,
keeps its statistics on the device, and flags exploding and vanishing parameters; nothing on its
per-step path reads a device value on the host. Reading results (``summary``, ``exploding``,
``history``, TensorBoard logging) synchronises, and happens only when asked.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from typing import Any, Optional, Union

import torch
from torch import Tensor

from fusedclip import _backends, _core, _ops, numerics

__all__ = ["get_norms", "clip_grad_norm_with_norms_", "GradientMonitor"]

# --- per-parameter norms ---------------------------------------------------------------------------


def _per_parameter(per_grad: Tensor, has_grad: list[bool]) -> Tensor:
    """Per-grad norms spread over the parameters; a parameter without a gradient gets 0."""
    if all(has_grad):
        return per_grad
    index = torch.tensor([i for i, present in enumerate(has_grad) if present])
    out = per_grad.new_zeros(len(has_grad))
    out[index.to(out.device)] = per_grad
    return out


# --- public functions -----------------------------------------------------------------------------


def get_norms(
    tensors: Union[Tensor, Iterable[Tensor]], norm_type: Union[float, str] = 2.0, *, backend: str = "auto"
) -> tuple[Tensor, Tensor]:
    r"""The global norm of ``tensors`` and the norm of each, from one read of every tensor.

    The global norm is :func:`fusedclip.get_total_norm`'s (all tensors viewed as one vector);
    entry :math:`i` of the second result is :math:`\|t_i\|_p` (0 for a tensor with no elements).
    Both are in the global norm's dtype (float32, float64 when any tensor is float64) on the
    first tensor's device; no host sync.

    Returns:
        ``(total, per_tensor)``; ``(tensor(0.), tensor([]))`` when there are no tensors.
    """
    with torch.no_grad():
        norm_type = _core.norm_type(norm_type)
        tensors = _core.as_list(tensors)
        if not tensors:
            return torch.tensor(0.0), torch.zeros(0)
        return _core.run_grouped(tensors, backend, False, lambda groups: _core.norms_of_groups(groups, tensors, norm_type))


def _clip_with_norms(params: list, max_norm: float, norm_type: float, backend: str) -> tuple[Tensor, Tensor]:
    param_grads = _core.param_grads(params)  # read once: the norms are reported against these
    grads = [g for g in param_grads if g is not None]
    if not grads:
        return torch.tensor(0.0), torch.zeros(len(params))
    result = _core.run_as_one_group(
        grads, None, backend, True, lambda group: _ops.run("clip_grad_norm_with_norms_", group[1], group[2], max_norm, norm_type))
    if result is not None:
        return result[0], _per_parameter(result[1], [g is not None for g in param_grads])
    groups = _core.group_by_device(grads, None, backend, writes=True)
    if len(groups) == 1:
        _, group_backend, ts = groups[0]
        total, per = _ops.run("clip_grad_norm_with_norms_", group_backend, ts, max_norm, norm_type)
    else:
        total, per = _core.norms_of_groups(groups, grads, norm_type)
        _core.scale_groups(groups, numerics.clip_coefficient(total, max_norm))
    return total, _per_parameter(per, [g is not None for g in param_grads])


def clip_grad_norm_with_norms_(
    parameters: Union[Tensor, Iterable[Tensor]],
    max_norm: float,
    norm_type: Union[float, str] = 2.0,
    *,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    r""":func:`fusedclip.clip_grad_norm_`, also returning each parameter's gradient norm.

    Scales every gradient by :math:`\min(\mathrm{max\_norm} / (N + 10^{-6}), 1)` where
    :math:`N = \|g\|_p` is the global norm, exactly as ``clip_grad_norm_`` does, and returns
    ``(N, per_parameter)``: entry :math:`i` is the norm of parameter :math:`i`'s gradient before
    clipping (0 when it has none). The per-parameter norms come from the same read of the
    gradients as :math:`N`; no host sync.
    """
    with torch.no_grad():
        max_norm = _core.non_negative(max_norm, "max_norm")
        norm_type = _core.norm_type(norm_type)
        params = _core.as_list(parameters, warn_if_empty_generator=True)
        return _clip_with_norms(params, max_norm, norm_type, backend)


# --- the monitor ----------------------------------------------------------------------------------


class GradientMonitor:
    r"""Records gradient norms every step and flags exploding and vanishing parameters.

    Each step (:meth:`clip_grad_norm_`, :meth:`observe` or :meth:`record`) stores the global norm
    :math:`N_t` and every parameter's norm :math:`n_{i,t}` on the device, and updates, per
    parameter, without a host sync:

    * mean :math:`\mu_i` and variance :math:`\sigma_i^2` of its norm: exact over its first
      ``warmup_steps`` finite norms, then exponential moving averages,
      :math:`\mu \leftarrow \alpha\mu + (1-\alpha)n`,
      :math:`\sigma^2 \leftarrow \alpha\sigma^2 + (1-\alpha)(n - \mu)^2` (ZClip's update); a
      non-finite norm leaves them unchanged;
    * **exploding** when :math:`n` is nan or inf, above ``explode_threshold`` (if given), or,
      after the warm-up, when :math:`z = (n - \mu) / \sqrt{\sigma^2 + 10^{-12}} > z\_threshold`, with
      :math:`\mu, \sigma` from before this step;
    * **vanishing** when :math:`n <` ``vanish_eps`` for ``vanish_steps`` consecutive steps.

    Reading anything (:meth:`summary`, :meth:`exploding`, :meth:`vanishing`, :meth:`history`,
    :meth:`log`, :meth:`flush`) copies to the host and synchronises. With a ``writer`` (a
    ``torch.utils.tensorboard.SummaryWriter``), :meth:`log` writes the scalars of every step since
    the last log (one sync), by itself at each step that is a multiple of ``log_every``: the global
    norm, each parameter's norm (``log_per_parameter``), the counts of exploding and vanishing
    parameters, and a histogram of the per-parameter norms. The steps after the last multiple are
    written by :meth:`flush`, :meth:`close` or leaving a ``with`` block; no step is written twice.

    Records are numbered ``global_step + 1``, ``global_step + 2``, ... (their TensorBoard step), so
    a resumed run that passes the :attr:`step` it saved logs the steps of an uninterrupted run; its
    statistics start afresh, with a new warm-up.

    Args:
        named_parameters: a module, or ``(name, parameter)`` pairs such as
            ``model.named_parameters()``; parameters that do not require grad are left out.
        norm_type: p of every norm.
        explode_threshold: a norm above it flags the parameter (off when None).
        z_threshold, alpha, warmup_steps: the z-score spike test.
        vanish_eps, vanish_steps: the vanishing test.
        history_size: steps kept for :meth:`history` and logging.
        writer, log_every, log_per_parameter: TensorBoard logging. The writer stays the
            caller's: the monitor flushes it but never closes it.
        global_step: steps taken before this monitor (a resumed run's saved ``step``).
        backend: as in :func:`fusedclip.clip_grad_norm_`.

    Attributes:
        step: the number of the last recorded step (``global_step`` before the first).

    Example::

        with GradientMonitor(model, writer=writer, global_step=checkpoint["step"]) as monitor:
            for batch in loader:
                ...
                monitor.clip_grad_norm_(1.0)
        checkpoint["step"] = monitor.step
    """

    def __init__(
        self,
        named_parameters: Union[torch.nn.Module, Iterable[tuple[str, Tensor]]],
        *,
        norm_type: Union[float, str] = 2.0,
        explode_threshold: Optional[float] = None,
        z_threshold: float = 3.0,
        alpha: float = 0.97,
        warmup_steps: int = 25,
        vanish_eps: float = 1e-8,
        vanish_steps: int = 10,
        history_size: int = 10_000,
        writer: Any = None,
        log_every: int = 100,
        log_per_parameter: bool = True,
        global_step: int = 0,
        backend: str = "auto",
    ):
        if isinstance(named_parameters, torch.nn.Module):
            named_parameters = named_parameters.named_parameters()
        pairs = []
        seen: set[str] = set()
        for item in named_parameters:
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
                    and isinstance(item[1], Tensor)):
                raise TypeError("named_parameters must be a module or yield (name, parameter) pairs, "
                                f"such as model.named_parameters(); got an item of type {type(item).__name__}")
            # One name, one TensorBoard tag and one row of summary(): a name given twice would log
            # two parameters under one tag. (Tied weights appear once in named_parameters(), and
            # under their distinct names with remove_duplicate=False.)
            if item[0] in seen:
                raise ValueError(f"named_parameters gives the name {item[0]!r} twice; names must be unique")
            seen.add(item[0])
            if item[1].requires_grad:
                pairs.append(item)
        if not pairs:
            raise ValueError("named_parameters holds no parameter that requires grad")
        if explode_threshold is not None:
            explode_threshold = _core.non_negative(explode_threshold, "explode_threshold")
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"alpha must be in [0, 1), got {alpha}")
        for name, value in (("warmup_steps", warmup_steps), ("vanish_steps", vanish_steps),
                            ("history_size", history_size), ("log_every", log_every)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(global_step, bool) or not isinstance(global_step, int) or global_step < 0:
            raise ValueError(f"global_step must be a non-negative int, got {global_step!r}")
        self.names = [name for name, _ in pairs]
        self.params = [p for _, p in pairs]
        self.norm_type = _core.norm_type(norm_type)
        self.explode_threshold = explode_threshold
        self.z_threshold = _core.non_negative(z_threshold, "z_threshold")
        self.alpha = alpha
        self.warmup_steps = warmup_steps
        self.vanish_eps = _core.non_negative(vanish_eps, "vanish_eps")
        self.vanish_steps = vanish_steps
        self.writer = writer
        self.log_every = log_every
        self.log_per_parameter = log_per_parameter
        _backends.check_backend_name(backend)
        self.backend = backend
        self.step = global_step  # the last recorded step's number: global_step + steps recorded
        # (step, total, per-parameter norms, exploding flags, vanishing flags), device tensors; the
        # flags are None for steps recorded without a writer (log() is their only reader)
        self._history: deque = deque(maxlen=history_size)
        self._logged_through = global_step  # the last step written to the writer
        self._state: Optional[dict[str, Tensor]] = None
        self._update_backend = "torch"  # of monitor_update_, chosen with the state's device

    # --- per step ---------------------------------------------------------------------------

    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        """:func:`fusedclip.clip_grad_norm_` on the monitored parameters, recording the norms of
        the same read; returns the global norm before clipping."""
        max_norm = _core.non_negative(max_norm, "max_norm")
        with torch.no_grad():
            total, per = _clip_with_norms(self.params, max_norm, self.norm_type, self.backend)
            self._record(total, per)  # float32 or float64, contiguous: recorded as they are
        return total

    def observe(self) -> Tensor:
        """Records the gradient norms without clipping; returns the global norm."""
        with torch.no_grad():
            has_grad = [p.grad is not None for p in self.params]
            grads = [p.grad for p in self.params if p.grad is not None]
            total, per = get_norms(grads, self.norm_type, backend=self.backend)
            if grads:
                per = _per_parameter(per, has_grad)
            else:
                per = torch.zeros(len(self.params))
        self.record(total, per)
        return total

    def record(self, total_norm: Tensor, per_parameter: Tensor) -> None:
        """Records one step's norms computed elsewhere: the global norm and one norm per
        monitored parameter (in ``names`` order)."""
        if not isinstance(per_parameter, Tensor) or per_parameter.shape != (len(self.names),):
            raise ValueError(
                f"per_parameter must be a tensor of shape ({len(self.names)},), got "
                f"{getattr(per_parameter, 'shape', type(per_parameter).__name__)}"
            )
        if not isinstance(total_norm, Tensor) or total_norm.numel() != 1:
            raise ValueError("total_norm must be a one-element tensor")
        with torch.no_grad():
            dtype = torch.float64 if per_parameter.dtype == torch.float64 else torch.float32
            self._record(total_norm.detach(), per_parameter.detach().to(dtype).contiguous())

    def _record(self, total_norm: Tensor, norms: Tensor) -> None:
        """record() of checked norms: contiguous, float32 or float64, detached."""
        self._update(norms)
        self.step += 1
        # Each step's flags are kept only for log(), the one reader of them (a copy: the state's
        # flags are overwritten in place every step).
        flags = (None, None)
        if self.writer is not None:
            flags = (self._state["exploding"].clone(), self._state["vanishing"].clone())
        self._history.append((self.step, total_norm.reshape(()), norms) + flags)
        if self.writer is not None and self.step % self.log_every == 0:
            self.log()

    def _backend_of_update(self, device: torch.device) -> str:
        """The clip's backend for the device where it has a kernel of monitor_update_ ("cpu", the
        C++ one; "triton"), else "torch" (the same math in ATen ops, on any device)."""
        try:
            backend = _backends.resolve_backend(self.backend, device)
        except (RuntimeError, ValueError):  # a backend for another device: the norms came from elsewhere
            return "torch"
        return backend if backend in _ops.NATIVE_BACKENDS["monitor_update_"] else "torch"

    def _update(self, norms: Tensor) -> None:
        """One step of the statistics and flags: one fused operator where the backend has one (the
        C++ kernel of reference.monitor_update_ on CPU, Triton's), the reference's ops elsewhere."""
        if self._state is None or self._state["mean"].device != norms.device:
            # One tensor each: the operator updates them in place.
            def zeros(dtype: torch.dtype) -> Tensor:
                return torch.zeros(norms.shape, dtype=dtype, device=norms.device)

            self._state = {"mean": zeros(norms.dtype), "var": zeros(norms.dtype), "count": zeros(torch.int64),
                           "below": zeros(torch.int64), "explosions": zeros(torch.int64),
                           "exploding": zeros(torch.bool), "vanishing": zeros(torch.bool)}
            self._update_backend = self._backend_of_update(norms.device)
        s = self._state
        if s["mean"].dtype != norms.dtype:  # float32 and float64 steps: the statistics go float64
            s["mean"], s["var"] = s["mean"].double(), s["var"].double()
            norms = norms.double()
        _ops.run(
            "monitor_update_", self._update_backend, norms, s["mean"], s["var"], s["count"], s["below"],
            s["explosions"], s["exploding"], s["vanishing"], self.alpha, self.warmup_steps, self.z_threshold,
            self.explode_threshold, self.vanish_eps, self.vanish_steps)

    # --- reading (synchronises) ---------------------------------------------------------------

    def _flagged(self, key: str) -> list[str]:
        if self._state is None:
            return []
        return [name for name, flag in zip(self.names, self._state[key].tolist()) if flag]

    def exploding(self) -> list[str]:
        """Names of the parameters flagged exploding at the last step."""
        return self._flagged("exploding")

    def vanishing(self) -> list[str]:
        """Names of the parameters flagged vanishing at the last step."""
        return self._flagged("vanishing")

    def history(self) -> dict[str, Any]:
        """The recorded steps (at most ``history_size``) on the host: ``step`` (list of ints),
        ``total`` (float64 tensor, steps), ``per_parameter`` (steps x parameters), ``names``."""
        if not self._history:
            return {"step": [], "total": torch.zeros(0, dtype=torch.float64),
                    "per_parameter": torch.zeros(0, len(self.names), dtype=torch.float64), "names": self.names}
        steps, totals, pers, _, _ = zip(*self._history)
        return {
            "step": list(steps),
            "total": torch.stack([t.double().cpu() for t in totals]),
            "per_parameter": torch.stack([p.double().cpu() for p in pers]),
            "names": list(self.names),
        }

    def summary(self, top: Optional[int] = None) -> str:
        """A table of every parameter's last norm, running mean and std, steps flagged exploding,
        consecutive steps below ``vanish_eps`` and current flags; with ``top``, only the ``top``
        largest last norms."""
        if self._state is None:
            return "GradientMonitor: no step recorded"
        s = self._state
        last = self._history[-1][2].tolist()
        rows = list(zip(self.names, last, s["mean"].tolist(), s["var"].sqrt().tolist(),
                        s["explosions"].tolist(), s["below"].tolist(), s["exploding"].tolist(),
                        s["vanishing"].tolist()))
        if top is not None:
            rows = sorted(rows, key=lambda r: -r[1] if not math.isnan(r[1]) else -math.inf)[:top]
        width = max(len("parameter"), *(len(r[0]) for r in rows))
        lines = [
            f"GradientMonitor: {self.step} steps, last global norm {float(self._history[-1][1]):.4g}",
            f"{'parameter':<{width}} {'norm':>10} {'mean':>10} {'std':>10} {'exploded':>8} "
            f"{'below eps':>9}  flags",
        ]
        for name, norm, mean, std, explosions, below, exploding, vanishing in rows:
            flags = " ".join(flag for flag, on in (("EXPLODING", exploding), ("VANISHING", vanishing)) if on)
            lines.append(f"{name:<{width}} {norm:>10.4g} {mean:>10.4g} {std:>10.4g} {explosions:>8d} "
                         f"{below:>9d}  {flags}")
        return "\n".join(lines)

    def log(self) -> None:
        """Writes every step recorded since the last log to ``writer`` (one sync)."""
        if self.writer is None:
            raise ValueError("GradientMonitor was created without a writer")
        pending = [entry for entry in self._history if entry[0] > self._logged_through]
        if not pending:
            return
        steps, totals, pers, exploding, vanishing = zip(*pending)
        totals = torch.stack(list(totals)).double().cpu().tolist()
        pers = torch.stack(list(pers)).double().cpu()
        # Flag counts of the steps recorded while a writer was set (only those keep their flags).
        flagged = [k for k, flags in enumerate(exploding) if flags is not None]
        counts = {}
        if flagged:
            pairs = torch.stack([torch.stack([exploding[k], vanishing[k]]) for k in flagged]).sum(2).cpu().tolist()
            counts = dict(zip(flagged, pairs))
        for k, step in enumerate(steps):
            self.writer.add_scalar("grad_norm/total", totals[k], step)
            if k in counts:
                self.writer.add_scalar("grad_health/exploding", counts[k][0], step)
                self.writer.add_scalar("grad_health/vanishing", counts[k][1], step)
            finite = pers[k][pers[k].isfinite()]
            if finite.numel():
                self.writer.add_histogram("grad_norm/per_parameter", finite, step)
            if self.log_per_parameter:
                for name, value in zip(self.names, pers[k].tolist()):
                    self.writer.add_scalar(f"grad_norm/{name}", value, step)
        self._logged_through = steps[-1]

    def flush(self) -> None:
        """Writes every step not yet written (those since the last multiple of ``log_every``, of
        the last ``history_size`` kept) and flushes ``writer``; without a writer, does nothing."""
        if self.writer is None:
            return
        self.log()
        self.writer.flush()

    def close(self) -> None:
        """:meth:`flush`. The writer is the caller's and stays open; the monitor can record on
        (the next steps wait for the next log or flush)."""
        self.flush()

    def __enter__(self) -> GradientMonitor:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        """Calls :meth:`close`, also when the block raised: the steps up to the error are written."""
        self.close()
