"""Fake kernels of the operators: shapes and dtypes only, for torch.compile and opcheck.

One per schema (csrc/fusedclip.cpp), registered for the C++ operators (``fusedclip::``, by
fusedclip/_ops.py) and, for the Triton backend, which defines every one with the same schema, for
``fusedclip_triton::`` (by fusedclip/triton/ops.py; tests/test_ops.py checks that the schemas match).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from fusedclip import numerics

__all__ = ["FAKES", "register"]


def _check_one_device(tensors: list[Tensor], op: str) -> None:
    """The operators take the tensors of one device. A list mixing CPU and meta tensors is
    dispatched to the Meta kernel (these fake impls) by the dispatcher, which would otherwise
    return an uninitialised norm and write nothing; refusing it sends clip.py to its per-device
    path, which raises as torch does. A TypeError, as the C++ operators refuse a tensor before
    writing: the Python layer falls back only on TypeError and ValueError."""
    device = tensors[0].device
    for i, t in enumerate(tensors):
        if t.device != device:
            raise TypeError(
                f"fusedclip.{op}: all tensors must be on one device, but tensor 0 is on {device} "
                f"and tensor {i} on {t.device}"
            )


def multi_tensor_norm(tensors, norm_type, per_tensor=False):
    _check_one_device(tensors, "multi_tensor_norm")
    acc = numerics.accumulate_dtype(tensors)
    count = len(tensors) if per_tensor else 0
    return tensors[0].new_empty((), dtype=acc), tensors[0].new_empty((count,), dtype=acc)


def multi_tensor_scale_(tensors, coef):
    _check_one_device(tensors, "multi_tensor_scale_")


def multi_tensor_clamp_(tensors, min, max):  # noqa: A002 (the schema's names)
    _check_one_device(tensors, "multi_tensor_clamp_")


def clip_grad_norm_(tensors, max_norm, norm_type):
    _check_one_device(tensors, "clip_grad_norm_")
    return tensors[0].new_empty((), dtype=numerics.accumulate_dtype(tensors))


def multi_tensor_agc_(grads, params, clip_factor, eps):
    _check_one_device(grads, "multi_tensor_agc_")
    acc = numerics.accumulate_dtype(grads)
    return grads[0].new_empty((), dtype=acc), grads[0].new_empty((len(grads),), dtype=acc)


def multi_tensor_scale_per_tensor_(tensors, coefs):
    _check_one_device(tensors, "multi_tensor_scale_per_tensor_")


def clip_grad_norm_with_norms_(tensors, max_norm, norm_type):
    _check_one_device(tensors, "clip_grad_norm_with_norms_")
    acc = numerics.accumulate_dtype(tensors)
    return tensors[0].new_empty((), dtype=acc), tensors[0].new_empty((len(tensors),), dtype=acc)


def multi_tensor_unscale_norm(tensors, inv_scale, norm_type):
    _check_one_device(tensors, "multi_tensor_unscale_norm")
    statistic = tensors[0].new_empty((), dtype=numerics.accumulate_dtype(tensors))
    return statistic, tensors[0].new_empty((), dtype=torch.float32)


def monitor_update_(norms, mean, var, count, below, explosions, exploding, vanishing, alpha, warmup_steps,
                    z_threshold, explode_threshold, vanish_eps, vanish_steps):
    return None


FAKES = {
    fn.__name__: fn
    for fn in (multi_tensor_norm, multi_tensor_scale_, multi_tensor_clamp_, clip_grad_norm_, multi_tensor_agc_,
               multi_tensor_scale_per_tensor_, clip_grad_norm_with_norms_, multi_tensor_unscale_norm,
               monitor_update_)
}


def register(namespace: str, names: Iterable[str]) -> None:
    """Registers the fake kernels of these operators for ``namespace::<name>``."""
    for name in names:
        torch.library.register_fake(f"{namespace}::{name}")(FAKES[name])
