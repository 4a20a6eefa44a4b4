"""Which clipping code a framework's clip ran through, whichever of torch's functions it calls.

Frameworks clip through torch.nn.utils: clip_grad_norm_ (Lightning; Accelerate before 1.16), or
get_total_norm then clip_grads_with_norm_ (Accelerate 1.16 and later, hence Hugging Face
Trainer). fusedclip.patch_torch() replaces all of them, so a test of a framework must not assume
one route: ClipRoute records the calls of torch's own clipping functions and of fusedclip's
operator layer (fusedclip._ops, where every clip of fusedclip ends), and tells how many norms each
took and how many times each wrote the gradients.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import fusedclip.patch
from helpers import operator, patch_operator

TORCH = "torch"
FUSEDCLIP = "fusedclip"

# name -> (takes a norm of the grads, the position of its max_norm argument or None). A call with
# a max_norm writes the grads when it is finite (max_norm=inf only measures); fusedclip's scales
# by a coefficient computed before (_SCALES) write them always.
_TORCH_FUNCTIONS = {
    "clip_grad_norm_": (True, 1),
    "get_total_norm": (True, None),
    "clip_grads_with_norm_": (False, 1),  # (parameters, max_norm, total_norm)
}
_FUSED_FUNCTIONS = {
    "clip_grad_norm_": (True, 2),  # (backend, tensors, max_norm, norm_type)
    "clip_grad_norm_with_norms_": (True, 2),
    "multi_tensor_norm": (True, None),
    "multi_tensor_unscale_norm": (True, None),
    "multi_tensor_scale_": (False, None),
}
_SCALES = ("multi_tensor_scale_",)


class Call(NamedTuple):
    layer: str  # TORCH or FUSEDCLIP
    name: str
    norm: bool  # it took a norm of the grads
    writes: bool  # it scaled the grads
    max_norm: Optional[float]  # the max_norm it was given, if any


class ClipRoute:
    """Records every call of torch's clipping functions and of fusedclip's norm and scale
    operators, for the test's duration (monkeypatch). torch's functions stay recorded across
    patch_torch()/unpatch_torch(): unpatch puts the recording ones back."""

    def __init__(self, monkeypatch):
        self.calls: list[Call] = []
        for (module, name), original in list(fusedclip.patch.TORCH_FUNCTIONS.items()):
            if name in _TORCH_FUNCTIONS:
                recording = self._recording(TORCH, name, *_TORCH_FUNCTIONS[name], original)
                monkeypatch.setitem(fusedclip.patch.TORCH_FUNCTIONS, (module, name), recording)
                if not fusedclip.is_torch_patched():
                    monkeypatch.setattr(module, name, recording)
        for name, (norm, max_norm_at) in _FUSED_FUNCTIONS.items():
            patch_operator(monkeypatch, name, self._recording(FUSEDCLIP, name, norm, max_norm_at, operator(name)))

    def _recording(self, layer: str, name: str, norm: bool, max_norm_at: Optional[int], original: Callable):
        def recorded(*args, **kwargs):
            max_norm = None
            if max_norm_at is not None:
                max_norm = float(args[max_norm_at] if len(args) > max_norm_at else kwargs["max_norm"])
            writes = name in _SCALES if max_norm is None else not math.isinf(max_norm)
            self.calls.append(Call(layer, name, norm, writes, max_norm))
            return original(*args, **kwargs)

        return recorded

    def clear(self) -> None:
        self.calls.clear()

    def of(self, layer: str) -> list[Call]:
        return [call for call in self.calls if call.layer == layer]

    def norms(self, layer: str) -> int:
        """How many norms of the gradients `layer` took."""
        return sum(call.norm for call in self.of(layer))

    def writes(self, layer: str) -> int:
        """How many calls of `layer` scaled the gradients."""
        return sum(call.writes for call in self.of(layer))

    def max_norms(self, layer: str) -> list[float]:
        """The max_norm of each call of `layer` that was given one, in order."""
        return [call.max_norm for call in self.of(layer) if call.max_norm is not None]
