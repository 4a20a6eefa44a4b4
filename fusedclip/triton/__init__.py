"""Backend "triton": Triton kernels of the fusedclip operators (``torch.ops.fusedclip_triton``).

Compiled by Triton for CUDA tensors; for CPU tensors the same kernels run in Triton's
interpreter (slow: for tests). Importing this package imports triton, and raises ImportError
when triton is not installed (fusedclip/_ops.py then reports the backend unavailable).
"""

from fusedclip.triton.ops import (
    clip_grad_norm_,
    clip_grad_norm_with_norms_,
    monitor_update_,
    multi_tensor_agc_,
    multi_tensor_clamp_,
    multi_tensor_norm,
    multi_tensor_scale_,
    multi_tensor_scale_per_tensor_,
    multi_tensor_unscale_norm,
)

__all__ = ["multi_tensor_norm", "multi_tensor_scale_", "multi_tensor_clamp_", "clip_grad_norm_",
           "multi_tensor_agc_", "multi_tensor_scale_per_tensor_", "clip_grad_norm_with_norms_",
           "multi_tensor_unscale_norm", "monitor_update_"]
