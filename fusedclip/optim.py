"""Clipping folded into the optimizer step.

``ClipOptimizer(torch.optim.AdamW(params, fused=True), max_norm=1.0)`` clips the gradients to a
global norm of ``max_norm`` and steps. torch's fused optimizers (Adam, AdamW, SGD, Adagrad with
``fused=True``) divide each gradient by a ``grad_scale`` tensor and skip the step when a
``found_inf`` tensor is nonzero, inside their kernel (the inputs a GradScaler uses). Folding the
clip coefficient :math:`c` in as ``grad_scale = 1 / c`` leaves one read of the gradients (the
norm) and no scale pass, but the kernel then writes every gradient back; fusedclip's scale pass
writes nothing on a step that does not clip. ``fold="auto"`` (the default) folds where the
coefficient can be read without a host sync (CPU), and takes the scale pass elsewhere (see the
class's docstring for the bytes). found_inf skips a fused step on a non-finite norm either way.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from fusedclip import _backends, _core, _ops, clip, distributed, numerics

__all__ = ["ClipOptimizer"]


class ClipOptimizer(torch.optim.Optimizer):
    r"""Wraps an optimizer so that ``step()`` clips the global gradient norm, then steps.

    .. math::
        N = \|g\|_p, \qquad c = \min\Big(\frac{\mathrm{max\_norm}}{N + 10^{-6}}, 1\Big), \qquad
        \text{step with } g \cdot c

    over the gradients of every parameter of the wrapped optimizer. Folded into a fused
    optimizer (``fused=True``), :math:`g \cdot c` is computed inside its kernel as
    ``g / (1 / c)``, which differs from torch's ``g * c`` by rounding only; the gradients left in
    ``.grad`` are the clipped ones either way, as after ``clip_grad_norm_`` and ``step()``.

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
    schedulers take a ClipOptimizer. Step hooks registered on a ClipOptimizer
    (``register_step_pre_hook``, ``register_step_post_hook``) run around its ``step()``, the clip
    included, exactly as torch's optimizers run them; those registered on the wrapped optimizer
    run inside it, after the norm is taken; torch's global optimizer hooks run around both. State-dict hooks (``register_state_dict_pre_hook``, ...) are
    registered on the wrapped optimizer, whose state dict this is, and receive it. As with
    torch's optimizers, pickling or copying a ClipOptimizer keeps neither kind of hook, nor a
    learning-rate scheduler's wrapper of ``step``.

    DTensor gradients (FSDP2, tensor parallelism) are clipped by their global norm over their
    meshes, as ``clip_grad_norm_`` clips them, and ``step()`` returns that norm as a replicated
    DTensor. With a ``GradScaler`` and DTensor gradients, call ``scaler.unscale_(optimizer)``
    before ``scaler.step(optimizer)``: the unscaled norm is otherwise taken in the same read as
    found_inf, which is not reduced across ranks here.

    **A skipped step and the state it made.** torch's fused optimizers make a parameter's state
    on its first step before their kernel reads found_inf: fused SGD with momentum makes the
    momentum buffer with ``empty_like`` (uninitialised memory, which the next step would read
    as the previous momentum), and fused Adam, AdamW and Adagrad make zeros and a step count of
    0. Neither is what a user who skipped the step by hand would have: no state at all, so that
    the next step is a first step (SGD's first step copies the gradient into the buffer, which
    no buffer value can reproduce when ``dampening`` is not 0). So a fused step that made state
    is followed by one host read of found_inf (a sync on a GPU) and, when the step was skipped,
    the entries and keys it made are removed. Only a step that makes state pays it: the first
    step of each parameter, nothing after. Under CUDA graph capture, where no host read is
    possible, the state that step made is zeroed on the device instead (where found_inf is
    set), which is what no state means for Adam, AdamW, Adagrad and SGD without dampening; with
    dampening, take the first step before capturing, as torch asks for its own state anyway.

    **fold: the bytes.** Per parameter and step, counting the gradient's traffic only (the
    optimizer's own reads and writes of the parameter and its state are the same either way),
    with ``G`` the gradient's size (4 bytes fp32, 2 bf16):

    =====================================  ==========================  ==========================
    path                                   step that clips             step that does not clip
    =====================================  ==========================  ==========================
    scale pass (``fold=False``)            norm G, scale 2G, step G:   norm G, step G: 2G
                                           4G                          (the scale writes nothing)
    fold, grad_scale always passed (GPU)   norm G, step G, write-back  3G (the kernel writes back
                                           G: 3G                       whatever grad_scale is)
    fold, grad_scale None at c = 1 (CPU)   3G                          2G
    torch: ``clip_grad_norm_``, step()     4G                          4G (it multiplies by 1)
    =====================================  ==========================  ==========================

    fp32 gradients: 16/8 bytes for the scale pass against 12/12 for the fold on a GPU; bf16:
    8/4 against 6/6. Passing no grad_scale when nothing clips needs the coefficient on the host:
    free for CPU tensors, a sync for GPU tensors, so on a GPU the fold gains G on a clipping step
    and loses G on every other one (against a fused AdamW step's own 6G: the parameter and two
    moments, each read and written), and pays off only when more than half of the steps clip.
    ``fold="auto"`` therefore folds where the coefficient reads for free (CPU: never worse,
    3G/2G) and takes the scale pass on a GPU (4G/2G), on the premise that most steps do not clip
    (a long run, where the clip guards against spikes). A run that clips most of its steps (a
    small ``max_norm``) saves G a step with ``fold=True``. ``python -m fusedclip bench --training
    adamw`` times the four cases on the device at hand and prints the share of clipping steps
    above which the fold is the faster.

    Args:
        optimizer: the optimizer to wrap.
        max_norm: the largest global norm allowed; a non-negative number.
        norm_type: p of the norm, any number or ``'inf'``; not nan.
        fold: with a fused optimizer, apply the coefficient through its grad_scale (True) or
            with fusedclip's scale pass before the step (False: the gradients then round
            exactly as clip_grad_norm_ rounds them); ``"auto"`` (the default): True where the
            coefficient is on the CPU and no gradient is float64, False elsewhere (the bytes
            above). torch's fused kernels take a float32 grad_scale, so a fold reaches float64
            gradients with float32's precision of the coefficient (5e-8 relative). A
            GradScaler's step always folds: its scale goes through grad_scale, and the kernel
            writes the gradients back, anyway.
        backend: fusedclip's backend for the norm and the scale pass.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        max_norm: float,
        norm_type: Union[float, str] = 2.0,
        *,
        fold: Union[bool, str] = "auto",
        backend: str = "auto",
    ):
        # Optimizer.__init__ is not called: param_groups, state and defaults are the wrapped
        # optimizer's own objects, not copies.
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, ClipOptimizer):
            raise TypeError("optimizer is already a ClipOptimizer")
        self.optimizer = optimizer
        self.max_norm = _core.non_negative(max_norm, "max_norm")
        self.norm_type = _core.norm_type(norm_type)
        _backends.check_backend_name(backend)
        # Raises, with the reason, for a backend that cannot run the parameters' devices.
        devices = {p.device for group in optimizer.param_groups for p in group["params"]}
        for device in sorted(devices, key=str):
            _backends.resolve_backend(backend, device)
        self.backend = backend
        if not (isinstance(fold, bool) or (isinstance(fold, str) and fold == "auto")):
            raise TypeError(f"fold must be True, False or 'auto', got {fold!r}")
        self.fold = fold
        self._init_step_hooks()

    def _init_step_hooks(self) -> None:
        # torch.optim.Optimizer's names: its register_step_pre_hook and register_step_post_hook
        # add to these; step() runs them.
        self._optimizer_step_pre_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._optimizer_step_post_hooks: OrderedDict[int, Callable] = OrderedDict()

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
    def fused(self) -> bool:
        """True when the wrapped optimizer's kernel takes grad_scale and found_inf (fused=True)."""
        return bool(getattr(self.optimizer, "_step_supports_amp_scaling", False))

    @property
    def _step_supports_amp_scaling(self) -> bool:
        # A GradScaler then passes grad_scale and found_inf to step() instead of unscaling.
        return self.fused

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
            f"fold={self.fold}, optimizer={self.optimizer!r})"
        )

    def register_state_dict_pre_hook(self, hook: Callable, prepend: bool = False) -> RemovableHandle:
        return self.optimizer.register_state_dict_pre_hook(hook, prepend)

    def register_state_dict_post_hook(self, hook: Callable, prepend: bool = False) -> RemovableHandle:
        return self.optimizer.register_state_dict_post_hook(hook, prepend)

    def register_load_state_dict_pre_hook(self, hook: Callable, prepend: bool = False) -> RemovableHandle:
        return self.optimizer.register_load_state_dict_pre_hook(hook, prepend)

    def register_load_state_dict_post_hook(self, hook: Callable, prepend: bool = False) -> RemovableHandle:
        return self.optimizer.register_load_state_dict_post_hook(hook, prepend)

    def __getstate__(self) -> dict[str, Any]:
        # As torch.optim.Optimizer: no hooks, and no learning-rate scheduler's wrapper of step (an
        # instance attribute that holds a weak reference to this object, not to a copy).
        skipped = ("step", "_opt_called", "_optimizer_step_pre_hooks", "_optimizer_step_post_hooks")
        return {k: v for k, v in self.__dict__.items() if k not in skipped}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_step_hooks()

    # --- the step ---------------------------------------------------------------------------------

    @torch.optim.Optimizer.profile_hook_step  # the step hooks, as torch's optimizers run them
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
            if not grads:
                self.optimizer.step()
                return torch.tensor(0.0)
            if scaler_scale is not None and distributed.has_dtensor(grads):
                # GradScaler removes these after a step that returns: a refused one leaves none.
                self.__dict__.pop("grad_scale", None)
                self.__dict__.pop("found_inf", None)
                raise TypeError(
                    "ClipOptimizer with DTensor gradients: call scaler.unscale_(optimizer) before "
                    "scaler.step(optimizer) (the norm of the scaled DTensor gradients is not "
                    "taken in the unscale's read)"
                )
            if scaler_scale is None:
                total = clip.get_total_norm(grads, self.norm_type, backend=self.backend)
                found_inf = None
            else:
                total, found_inf = _unscaled_norm(grads, scaler_scale, self.norm_type, self.backend)
            norm = distributed.as_tensor(total)  # a DTensor norm (DTensor grads), whole
            coef = numerics.clip_coefficient(norm, self.max_norm)
            if not self.fused:
                # A host read of the norm (a sync on a GPU) decides whether to step at all.
                if bool(torch.isfinite(norm)):
                    clip.scale_grads_(grads, coef, None, self.backend)
                    self.optimizer.step()
                return total
            non_finite = (~torch.isfinite(norm)).to(torch.float32)
            for extra in (found_inf, scaler_found_inf):
                if extra is not None:
                    non_finite = torch.maximum(non_finite, extra.to(device=non_finite.device, dtype=torch.float32))
            if scaler_scale is not None or self._folds(coef.device, grads):
                grad_scale = _grad_scale(coef, scaler_scale)
            else:
                # The scale pass; coefficient 1 (nothing written) when the step will be skipped.
                safe_coef = torch.where(non_finite > 0, torch.ones_like(coef), coef)
                clip.scale_grads_(grads, safe_coef, None, self.backend)
                grad_scale = None
            self._fused_step(grad_scale, non_finite)
        return total

    def _folds(self, device: torch.device, grads: list[Tensor]) -> bool:
        """Whether the coefficient goes through the fused kernel's grad_scale (see the class's
        docstring): fold=True or False as given; "auto" where the coefficient reads for free and
        no gradient is float64 (the kernels' grad_scale is float32)."""
        if self.fold != "auto":
            return bool(self.fold)
        return _auto_folds(device) and not any(g.dtype in numerics.FLOAT64_DTYPES for g in grads)

    def _fused_step(self, grad_scale: Optional[Tensor], found_inf: Tensor) -> None:
        """The wrapped fused optimizer's step, dividing by grad_scale and skipped on found_inf;
        the state a skipped step made is then removed (see the class's docstring).

        Whether the step made state is told by the sizes of the state's entries before and
        after, a look at each entry's length (tens of nanoseconds a parameter, no tensor read):
        dicts keep insertion order, so the entries the step made come after the old ones, and
        the keys it added to an old entry after that entry's old keys.
        """
        state = self.optimizer.state
        entries_before = len(state)
        sizes_before = list(map(len, state.values()))
        self.optimizer.grad_scale = grad_scale
        self.optimizer.found_inf = found_inf
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.grad_scale
            del self.optimizer.found_inf
        if len(state) != entries_before or list(map(len, state.values())) != sizes_before:
            _forget_state_of_a_skipped_step(state, entries_before, sizes_before, found_inf)


def _auto_folds(device: torch.device) -> bool:
    """What fold="auto" does with a coefficient on this device: fold where it reads for free."""
    return _reads_without_sync(device)


def _reads_without_sync(device: torch.device) -> bool:
    """Whether reading a tensor of this device on the host costs no device sync."""
    return device.type == "cpu"


def _capturing(device: torch.device) -> bool:
    """Whether the current CUDA stream is being captured into a graph (no host read allowed)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _forget_state_of_a_skipped_step(state: dict, entries_before: int, sizes_before: list[int],
                                    found_inf: Tensor) -> None:
    """After a fused step that made optimizer state: when found_inf says the step was skipped,
    removes the entries it made and the keys it added, so that the next step is the parameters'
    first, as if this one had never been called. One host read of found_inf (a sync on a GPU),
    on such a step only; under CUDA graph capture the made tensors are zeroed on the device
    where found_inf is set (the class's docstring says when that is the same)."""
    items = list(state.items())
    new_params = [p for p, _ in items[entries_before:]]
    added = [(entry, list(entry)[size:]) for (_, entry), size in zip(items, sizes_before) if len(entry) > size]
    if not _capturing(found_inf.device):
        if bool(found_inf):  # the host read
            for p in new_params:
                del state[p]
            for entry, keys in added:
                for key in keys:
                    del entry[key]
        return
    skipped = found_inf > 0
    made = [v for p in new_params for v in state[p].values()] + [entry[k] for entry, keys in added for k in keys]
    for t in made:
        if isinstance(t, Tensor):
            t.masked_fill_(skipped.to(t.device), 0)


def _grad_scale(coef: Tensor, scaler_scale: Optional[Tensor]) -> Optional[Tensor]:
    """The grad_scale a fused kernel divides by: g / (s / c) = (g / s) * c.

    A zero coefficient (an inf norm, or max_norm 0) gives an infinite grad_scale, hence zero
    gradients, as torch's g * 0; an inf or nan norm skips the step anyway. None (nothing to
    divide, and the kernel then does not write the gradients back) when there is no scaler and
    a CPU coefficient is 1: reading it is no sync.
    """
    coef = coef.float()
    if scaler_scale is None:
        if _reads_without_sync(coef.device) and bool(coef >= 1.0):
            return None
        return coef.reciprocal()
    return coef.reciprocal() * scaler_scale.to(device=coef.device, dtype=torch.float32)


def _unscaled_norm(
    grads: list[Tensor], scale: Tensor, norm_type: float, backend: str
) -> tuple[Tensor, Tensor]:
    """The norm of grads / scale and whether any grad is inf or nan, in one read per device."""
    inv_scale = scale.double().reciprocal().float()  # as GradScaler.unscale_ computes it
    groups = _core.group_by_device(grads, None, backend, writes=False)
    statistics, found = [], []
    for device, group_backend, ts in groups:
        statistic, found_inf = _ops.run("multi_tensor_unscale_norm", group_backend, ts, inv_scale.to(device), norm_type)
        statistics.append(statistic)
        found.append(found_inf.to(groups[0][0]))
    empty = not any(t.numel() for t in grads)
    total = _core.norm_from_statistics(statistics, groups[0][0], empty, norm_type)
    return total, torch.stack(found).amax()
