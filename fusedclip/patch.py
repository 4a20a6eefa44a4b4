"""One-line adoption: torch's and timm's clipping functions replaced by fusedclip's.

``fusedclip.patch_torch()`` rebinds clip_grad_norm_, clip_grad_value_, get_total_norm and
clip_grads_with_norm_ in ``torch.nn.utils`` and in ``torch.nn.utils.clip_grad``, so training code
and frameworks that call ``torch.nn.utils.clip_grad_norm_(...)`` (Hugging Face Accelerate and
Trainer, PyTorch Lightning, most training loops) run fusedclip's kernels unmodified.
``fusedclip.unpatch_torch()`` puts the originals back; ``with fusedclip.patch_torch(): ...``
patches for the block only.

``fusedclip.patch_timm()`` does the same for timm's ``dispatch_clip_grad`` and
``adaptive_clip_grad`` in every timm module that binds them (``NativeScaler(clip_grad=...)``,
timm's train script), and ``fusedclip.unpatch_timm()`` undoes it.

Code that bound a name before the patch (``from torch.nn.utils import clip_grad_norm_`` at import
time, outside timm) keeps the original function: call the patch before importing such code.
fusedclip itself never calls the functions it replaces, so there is no recursion.
"""

from __future__ import annotations

import sys
import types
from typing import Callable, Optional, Union

import torch.nn.utils
import torch.nn.utils.clip_grad

from fusedclip import clip, timm_compat
from fusedclip.adaptive import AGC

__all__ = [
    "patch_torch",
    "unpatch_torch",
    "is_torch_patched",
    "patch_timm",
    "unpatch_timm",
    "is_timm_patched",
    "TORCH_FUNCTIONS",
]

_MODULES: tuple[types.ModuleType, ...] = (torch.nn.utils, torch.nn.utils.clip_grad)

_REPLACEMENTS: dict[str, Callable] = {
    "clip_grad_norm_": clip.clip_grad_norm_,
    "clip_grad_value_": clip.clip_grad_value_,
    "get_total_norm": clip.get_total_norm,
    "clip_grads_with_norm_": clip.clip_grads_with_norm_,
}

# torch's own functions, taken when fusedclip is imported (before any patch), by module and name.
# The benchmarks call these, so they measure torch even while torch is patched.
TORCH_FUNCTIONS: dict[tuple[types.ModuleType, str], Callable] = {
    (module, name): getattr(module, name)
    for module in _MODULES
    for name in _REPLACEMENTS
    if hasattr(module, name)
}


class _Patch:
    """What patch_torch() and patch_timm() return: as a context manager, undoes its own patch."""

    def __init__(self, patched_here: bool, unpatch: Callable[[], None]):
        self._patched_here = patched_here
        self._unpatch = unpatch

    def __enter__(self) -> "_Patch":
        return self

    def __exit__(self, *exc_info) -> None:
        # A block entered while already patched leaves the patch in place.
        if self._patched_here:
            self._unpatch()


# --- torch -------------------------------------------------------------------------------------


def is_torch_patched() -> bool:
    """True while torch.nn.utils.clip_grad_norm_ is fusedclip's."""
    return torch.nn.utils.clip_grad_norm_ is _REPLACEMENTS["clip_grad_norm_"]


def patch_torch() -> _Patch:
    """Replaces torch's clipping functions with fusedclip's (idempotent).

    Returns a handle that also works as a context manager: ``with fusedclip.patch_torch():``
    restores torch's functions at the end of the block, unless torch was patched before it.
    """
    patched_here = not is_torch_patched()
    for module, name in TORCH_FUNCTIONS:
        setattr(module, name, _REPLACEMENTS[name])
    return _Patch(patched_here, unpatch_torch)


def unpatch_torch() -> None:
    """Puts torch's own clipping functions back (idempotent)."""
    for (module, name), original in TORCH_FUNCTIONS.items():
        setattr(module, name, original)


# --- timm --------------------------------------------------------------------------------------
# timm defines adaptive_clip_grad in timm.utils.agc and dispatch_clip_grad in timm.utils.clip_grad,
# and imports them by name into timm.utils.clip_grad (adaptive_clip_grad), timm.utils.cuda
# (dispatch_clip_grad, which NativeScaler and ApexScaler call) and timm.utils (both; timm's
# train.py calls ``utils.dispatch_clip_grad``). patch_timm() finds the bindings by identity in
# every imported timm module, so an alias or a module of another timm version is covered too.

# timm's own functions by name, taken by the first patch_timm() (fusedclip never imports timm
# on its own).
_timm_originals: dict[str, Callable] = {}


def _timm_adaptive_clip_grad(
    parameters: clip.TensorOrTensors,
    clip_factor: float = 0.01,
    eps: float = 1e-3,
    norm_type: Union[float, str] = 2.0,
) -> None:
    """timm's ``adaptive_clip_grad`` on :class:`fusedclip.AGC`; a norm other than 2 runs timm's."""
    if float(norm_type) != 2.0:
        _timm_originals["adaptive_clip_grad"](parameters, clip_factor, eps, norm_type)
        return
    AGC(clip_factor=clip_factor, eps=eps)(parameters)


def _timm_dispatch_clip_grad(
    parameters: clip.TensorOrTensors,
    value: float,
    mode: str = "norm",
    norm_type: Union[float, str] = 2.0,
) -> None:
    """timm's ``dispatch_clip_grad`` on fusedclip; an unknown mode fails as in timm."""
    if mode == "agc":
        _timm_adaptive_clip_grad(parameters, value, norm_type=norm_type)
    elif mode in ("norm", "value"):
        timm_compat.dispatch_clip_grad(parameters, value, mode=mode, norm_type=norm_type)
    else:
        _timm_originals["dispatch_clip_grad"](parameters, value, mode, norm_type)


_TIMM_REPLACEMENTS: dict[str, Callable] = {
    "adaptive_clip_grad": _timm_adaptive_clip_grad,
    "dispatch_clip_grad": _timm_dispatch_clip_grad,
}


def _timm_modules() -> list[types.ModuleType]:
    """The imported modules of timm (timm itself and timm.*)."""
    return [
        module
        for name, module in list(sys.modules.items())
        if (name == "timm" or name.startswith("timm.")) and isinstance(module, types.ModuleType)
    ]


def _rebind(modules: list[types.ModuleType], replace: dict[int, Callable]) -> None:
    """In every module, rebinds each attribute that is one of the keys (by id) to its value."""
    for module in modules:
        for name, value in list(vars(module).items()):
            new = replace.get(id(value))
            if new is not None:
                setattr(module, name, new)


def _timm_clip_grad_module() -> Optional[types.ModuleType]:
    return sys.modules.get("timm.utils.clip_grad")


def is_timm_patched() -> bool:
    """True while ``timm.utils.clip_grad.dispatch_clip_grad`` is fusedclip's (False before timm
    is imported)."""
    module = _timm_clip_grad_module()
    return module is not None and module.dispatch_clip_grad is _timm_dispatch_clip_grad


def patch_timm() -> _Patch:
    """Routes timm's gradient clipping through fusedclip (idempotent; imports ``timm.utils``).

    Rebinds ``dispatch_clip_grad`` and ``adaptive_clip_grad`` in every imported timm module that
    binds them (timm.utils, timm.utils.clip_grad, timm.utils.agc, timm.utils.cuda), so
    ``NativeScaler(...)(loss, opt, clip_grad=..., clip_mode=...)``, ``timm.utils.dispatch_clip_grad``
    and timm's train script clip with fusedclip, with timm's semantics: mode "norm" runs
    :func:`fusedclip.clip_grad_norm_`, "value" :func:`fusedclip.clip_grad_value_`, "agc" (and
    ``adaptive_clip_grad``) :class:`fusedclip.AGC` with timm's ``clip_factor`` and ``eps``. What
    fusedclip does not cover runs timm's own function: AGC with a ``norm_type`` other than 2 (timm
    computes any p-norm per unit; fusedclip's AGC is the 2-norm of the paper), and an unknown mode
    (timm's AssertionError). Both return None, as timm's do.

    A function of its own rather than part of :func:`patch_torch`: fusedclip never imports an
    optional framework by itself, and patching timm from patch_torch only when timm happens to be
    imported already would make the result depend on import order. The two patches are
    independent; patch_torch alone already reaches timm's "norm" and "value" modes (timm calls
    ``torch.nn.utils.clip_grad_norm_`` by attribute), not "agc".

    Returns a handle that also works as a context manager: ``with fusedclip.patch_timm():``
    restores timm's functions at the end of the block, unless timm was patched before it.

    Raises:
        ImportError: timm is not installed.
    """
    import timm.utils.agc  # noqa: F401  (the modules to patch: they import timm.utils)
    import timm.utils.clip_grad
    import timm.utils.cuda  # noqa: F401

    if not _timm_originals:
        _timm_originals["adaptive_clip_grad"] = timm.utils.agc.adaptive_clip_grad
        _timm_originals["dispatch_clip_grad"] = timm.utils.clip_grad.dispatch_clip_grad
    patched_here = not is_timm_patched()
    _rebind(_timm_modules(), {id(_timm_originals[name]): new for name, new in _TIMM_REPLACEMENTS.items()})
    return _Patch(patched_here, unpatch_timm)


def unpatch_timm() -> None:
    """Puts timm's own functions back wherever fusedclip's are bound in timm (idempotent; a no-op
    before the first :func:`patch_timm`)."""
    if _timm_originals:
        _rebind(_timm_modules(), {id(new): _timm_originals[name] for name, new in _TIMM_REPLACEMENTS.items()})
