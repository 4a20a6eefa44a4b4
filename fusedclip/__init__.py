"""fusedclip: torch.nn.utils' gradient clipping, fused and sync-free.

Switch by changing one import::

    from fusedclip import clip_grad_norm_
    total_norm = clip_grad_norm_(model.parameters(), max_norm=1.0)

Importing fusedclip never initialises CUDA and never fails because the C++ library is missing:
it logs once and uses the pure-PyTorch backend.
"""

from fusedclip._backends import BACKENDS, backend_status
from fusedclip.adaptive import AGC, AutoClip, PerTensorClip, ZClip
from fusedclip.clip import clip_grad_norm_, clip_grad_value_, clip_grads_with_norm_, get_total_norm
from fusedclip.health import GradientMonitor, clip_grad_norm_with_norms_, get_norms
from fusedclip.timm_compat import dispatch_clip_grad
from fusedclip.optim import ClipOptimizer
from fusedclip.patch import is_timm_patched, is_torch_patched, patch_timm, patch_torch, unpatch_timm, unpatch_torch

__version__ = "0.1.0"

__all__ = [
    # torch.nn.utils' four, drop-in
    "clip_grad_norm_", "get_total_norm", "clip_grads_with_norm_", "clip_grad_value_",
    # per-tensor norms and the health monitor
    "get_norms", "clip_grad_norm_with_norms_", "GradientMonitor",
    # more clippers, and the optimizer wrapper
    "AGC", "AutoClip", "ZClip", "PerTensorClip", "dispatch_clip_grad", "ClipOptimizer",
    # replacing torch's and timm's functions in place
    "patch_torch", "unpatch_torch", "is_torch_patched", "patch_timm", "unpatch_timm", "is_timm_patched",
    # the backends
    "available_backends", "BACKENDS",
]


def available_backends() -> list[str]:
    """The backends that can run here (besides "auto"), fastest first."""
    return [name for name, reason in backend_status().items() if reason is None]
