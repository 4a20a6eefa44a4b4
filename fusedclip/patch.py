"""One-line adoption: torch.nn.utils' clipping functions replaced by fusedclip's.

``fusedclip.patch_torch()`` rebinds clip_grad_norm_, clip_grad_value_, get_total_norm and
clip_grads_with_norm_ in ``torch.nn.utils`` and in ``torch.nn.utils.clip_grad``, so training code
and frameworks that call ``torch.nn.utils.clip_grad_norm_(...)`` (Hugging Face Accelerate,
PyTorch Lightning, most training loops) run fusedclip's kernels unmodified.
``fusedclip.unpatch_torch()`` puts the originals back; ``with fusedclip.patch_torch(): ...``
patches for the block only.

Code that bound a name before the patch (``from torch.nn.utils import clip_grad_norm_`` at import
time) keeps torch's function: call patch_torch() before importing such code. fusedclip itself
never calls the functions it replaces, so there is no recursion.
"""

from __future__ import annotations

import types
from typing import Callable

import torch.nn.utils
import torch.nn.utils.clip_grad

from fusedclip import clip

__all__ = ["patch_torch", "unpatch_torch", "is_torch_patched", "TORCH_FUNCTIONS"]

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


def is_torch_patched() -> bool:
    """True while torch.nn.utils.clip_grad_norm_ is fusedclip's."""
    return torch.nn.utils.clip_grad_norm_ is _REPLACEMENTS["clip_grad_norm_"]


class _Patch:
    """What patch_torch() returns: used as a context manager, it undoes its own patch on exit."""

    def __init__(self, patched_here: bool):
        self._patched_here = patched_here

    def __enter__(self) -> "_Patch":
        return self

    def __exit__(self, *exc_info) -> None:
        # A block entered while torch was already patched leaves it patched.
        if self._patched_here:
            unpatch_torch()


def patch_torch() -> _Patch:
    """Replaces torch's clipping functions with fusedclip's (idempotent).

    Returns a handle that also works as a context manager: ``with fusedclip.patch_torch():``
    restores torch's functions at the end of the block, unless torch was patched before it.
    """
    patched_here = not is_torch_patched()
    for module, name in TORCH_FUNCTIONS:
        setattr(module, name, _REPLACEMENTS[name])
    return _Patch(patched_here)


def unpatch_torch() -> None:
    """Puts torch's own clipping functions back (idempotent)."""
    for (module, name), original in TORCH_FUNCTIONS.items():
        setattr(module, name, original)
