"""Backend "triton": Triton kernels of the fusedclip operators (``torch.ops.fusedclip_triton``).

Compiled by Triton for CUDA tensors; for CPU tensors the same kernels run in Triton's
interpreter (slow: for tests). Importing this package imports triton, and raises ImportError
when triton is not installed (fusedclip/_ops.py then reports the backend unavailable).
"""

from fusedclip.triton.ops import (
    clip_grad_norm_,
    multi_tensor_clamp_,
    multi_tensor_norm,
    multi_tensor_scale_,
)

__all__ = ["multi_tensor_norm", "multi_tensor_scale_", "multi_tensor_clamp_", "clip_grad_norm_"]
