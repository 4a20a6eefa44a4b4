"""timm's ``dispatch_clip_grad``, on fusedclip's kernels."""

from __future__ import annotations

from typing import Optional, Union

from torch import Tensor

from fusedclip import clip
from fusedclip.adaptive import AGC

__all__ = ["dispatch_clip_grad"]

_MODES = ("norm", "value", "agc")


def dispatch_clip_grad(
    parameters: clip.TensorOrTensors,
    value: float,
    mode: str = "norm",
    norm_type: Union[float, str] = 2.0,
) -> Optional[Tensor]:
    """Clips gradients as timm's ``timm.utils.dispatch_clip_grad`` does.

    Args:
        parameters: a tensor or an iterable of tensors whose ``.grad`` is clipped.
        value: ``max_norm`` (mode "norm"), ``clip_value`` (mode "value") or the clip factor
            lambda of adaptive gradient clipping (mode "agc").
        mode: "norm" (:func:`fusedclip.clip_grad_norm_`), "value"
            (:func:`fusedclip.clip_grad_value_`) or "agc" (:class:`fusedclip.AGC` with
            ``clip_factor=value`` and its default eps).
        norm_type: the norm of mode "norm"; mode "agc" takes the 2-norm only.

    Returns:
        The global norm before clipping in modes "norm" and "agc" (timm returns nothing), None
        in mode "value".
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if mode == "norm":
        return clip.clip_grad_norm_(parameters, value, norm_type=norm_type)
    if mode == "value":
        clip.clip_grad_value_(parameters, value)
        return None
    if float(norm_type) != 2.0:
        raise ValueError(f"mode 'agc' uses unit-wise 2-norms; norm_type must be 2.0, got {norm_type!r}")
    return AGC(clip_factor=value)(parameters)
