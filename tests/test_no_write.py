"""No write when the coefficient is 1: every function and feature that scales gradients leaves
them untouched, not merely equal, on a step that does not clip.

Multiplying by 1.0 keeps every bit, so values alone cannot tell a skipped write from a performed
one: these tests read the gradients' version counters, which every in-place write bumps. Backends
"cpu" and "torch" decide on the host (a CPU coefficient is read for free), so on them a step that
does not clip leaves the counters as they were, and a step that clips bumps them. Backends
"triton" and "cuda" decide on the device and call their in-place operator through the dispatcher,
which bumps the counter whether or not the kernel writes: on them only the values are checked.
"""

from __future__ import annotations

import pytest
import torch

import fusedclip
from helpers import make_grads, params_with

SHAPES = [(33,), (4, 257), (0,), (1,), (3, 5, 7)]
HOST_DECIDED = ("cpu", "torch")


def _params(backend, seed=0):
    grads = [g.to(backend.device) for g in make_grads(SHAPES, torch.float32, seed=seed, scale=0.5)]
    return params_with(grads)


def _versions(params) -> list[int]:
    return [p.grad._version for p in params]


def _snapshot(params) -> list[torch.Tensor]:
    return [p.grad.clone() for p in params]


def _global_norm(params) -> float:
    return float(torch.cat([p.grad.double().flatten() for p in params]).norm())


def _clip_norm(params, max_norm, backend):
    fusedclip.clip_grad_norm_(params, max_norm, backend=backend.name)


def _clip_with_float_norm(params, max_norm, backend):
    total = torch.tensor(_global_norm(params), device=backend.device)
    fusedclip.clip_grads_with_norm_(params, max_norm, total, backend=backend.name)


def _clip_with_tensor_max_norm(params, max_norm, backend):
    total = fusedclip.get_total_norm([p.grad for p in params], backend=backend.name)
    fusedclip.clip_grads_with_norm_(params, torch.tensor(max_norm, device=backend.device), total,
                                    backend=backend.name)


def _clip_with_norms(params, max_norm, backend):
    fusedclip.clip_grad_norm_with_norms_(params, max_norm, backend=backend.name)


def _monitor(params, max_norm, backend):
    named = [(f"p{i}", p) for i, p in enumerate(params)]
    fusedclip.GradientMonitor(named, backend=backend.name).clip_grad_norm_(max_norm)


def _clip_optimizer(fold):
    def step(params, max_norm, backend):
        # Learning rate 0 and fused SGD: the optimizer's own step writes no gradient, so only
        # the clip can bump the counters.
        sgd = torch.optim.SGD(params, lr=0.0, fused=fold is not None)
        opt = fusedclip.ClipOptimizer(sgd, max_norm, fold=bool(fold), backend=backend.name)
        opt.step()
    return step


def _per_tensor_clip(params, max_norm, backend):
    # A bound per tensor: the largest tensor norm against max_norm decides clip or not.
    fusedclip.PerTensorClip(max_norm / 4, backend=backend.name)(params)


def _zclip(params, max_norm, backend):
    fusedclip.ZClip(max_grad_norm=max_norm, backend=backend.name)(params)


SCALERS = {
    "clip_grad_norm_": _clip_norm,
    "clip_grads_with_norm_": _clip_with_float_norm,
    "clip_grads_with_norm_-tensor-max-norm": _clip_with_tensor_max_norm,
    "clip_grad_norm_with_norms_": _clip_with_norms,
    "GradientMonitor.clip_grad_norm_": _monitor,
    "ClipOptimizer-scale-pass": _clip_optimizer(fold=False),
    "ClipOptimizer-unfused": _clip_optimizer(fold=None),
    "PerTensorClip": _per_tensor_clip,
    "ZClip": _zclip,
}


@pytest.mark.parametrize("name", SCALERS)
def test_a_step_that_does_not_clip_writes_nothing(backend, name):
    params = _params(backend)
    before, versions = _snapshot(params), _versions(params)
    # max_norm far above the norm: the coefficient clamps to exactly 1.
    SCALERS[name](params, 1e6 * _global_norm(params), backend)
    for p, b in zip(params, before):
        assert torch.equal(p.grad, b), name
    if backend.name in HOST_DECIDED:
        assert _versions(params) == versions, f"{name} wrote gradients it did not clip"


@pytest.mark.parametrize("name", SCALERS)
def test_a_step_that_clips_writes_every_non_empty_gradient(backend, name):
    """The counterpart: the same calls do write when they clip, so the check above can fail."""
    params = _params(backend)
    before, versions = _snapshot(params), _versions(params)
    SCALERS[name](params, 1e-3 * _global_norm(params), backend)
    changed = [not torch.equal(p.grad, b) for p, b in zip(params, before)]
    assert changed == [p.numel() > 0 for p in params], name
    if backend.name in HOST_DECIDED:
        bumped = [after > v for after, v in zip(_versions(params), versions)]
        assert all(b for b, p in zip(bumped, params) if p.numel() > 0), name
