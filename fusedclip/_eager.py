"""How fusedclip calls its operators: straight in eager mode, through ``torch.ops`` when torch
is tracing.

Through ``torch.ops``, a list of 1,000 tensors is parsed by the Python argument parser and, for
an in-place operator, boxed through autograd's fallback: ~0.1-0.3 ms of host time per call, more
than the kernels of a small model. In eager mode fusedclip calls the kernels straight (the C++
ones below the autograd keys, as its C++ entry points do; the Triton ones in Python), each
bumping the version counters of what it writes. torch.compile and dispatch modes (fake tensors,
functionalization, an op counter) see only what goes through the dispatcher, so there the call
goes through ``torch.ops``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

__all__ = ["EagerOperator"]


class EagerOperator:
    """``eager(*args)`` in eager mode, ``op(*args)`` under torch.compile or a dispatch mode."""

    def __init__(self, op: Callable, eager: Callable):
        self.op = op
        self.eager = eager

    def __call__(self, *args):
        if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
            return self.op(*args)
        return self.eager(*args)
