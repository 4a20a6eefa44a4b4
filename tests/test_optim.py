"""ClipOptimizer against clip_grad_norm_ followed by step(), over several steps: torch's fused
Adam, AdamW and SGD (the clip folded into their kernels) and an unfused optimizer (the scale
pass); non-finite norms, a GradScaler, and what the wrapped optimizer owns."""

from __future__ import annotations

import math

import pytest
import torch

import fusedclip
from helpers import clone_all, make_grads, params_with

SHAPES = [(33,), (4, 257), (1,), (20001,), (0,), (5, 6, 7)]

OPTIMIZERS = {
    "adamw-fused": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True),
    "adam-fused": lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True),
    "sgd-momentum-fused": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, fused=True),
    "adamw-foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=True),
    "sgd-plain": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, foreach=False),
}


def _params(seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(dtype)) for s in SHAPES]


def _set_grads(params, seed, bad=None):
    for p, g in zip(params, make_grads(SHAPES, params[0].dtype, seed=seed, scale=2.0)):
        p.grad = g
    if bad is not None:
        params[3].grad[777] = bad


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("norm_type", [2.0, math.inf])
@pytest.mark.parametrize("fold", [True, False], ids=["fold", "scale-pass"])
def test_matches_clip_then_step(name, norm_type, fold):
    if not fold and not name.endswith("fused"):
        pytest.skip("fold=False differs from the default for fused optimizers only")
    ref_params, params = _params(), _params()
    ref_opt = OPTIMIZERS[name](ref_params)
    opt = fusedclip.ClipOptimizer(OPTIMIZERS[name](params), max_norm=1.5, norm_type=norm_type, fold=fold)
    assert opt.fused == name.endswith("fused")
    for step in range(6):
        _set_grads(ref_params, seed=step)
        _set_grads(params, seed=step)
        if step == 3:  # a step that does not clip
            for ps in (ref_params, params):
                for p in ps:
                    p.grad.mul_(1e-4)
        # torch's inf norm refuses the empty tensor, which holds nothing to clip.
        non_empty = [p for p in ref_params if p.numel()]
        ref_total = torch.nn.utils.clip_grad_norm_(non_empty, 1.5, norm_type=norm_type)
        ref_opt.step()
        total = opt.step()
        torch.testing.assert_close(total, ref_total, rtol=1e-5, atol=0)
        for p, r in zip(params, ref_params):
            # g / (1 / c) in the kernel against torch's g * c: rounding apart.
            torch.testing.assert_close(p.grad, r.grad, rtol=1e-6, atol=1e-12)
            torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6)
    for p, r in zip(params, ref_params):
        for key, value in ref_opt.state[r].items():
            torch.testing.assert_close(opt.state[p][key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,fold", [("adamw-fused", True), ("adamw-fused", False),
                                       ("sgd-momentum-fused", True), ("adamw-foreach", True)])
@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_non_finite_norm_skips_the_step(name, fold, bad):
    params = _params()
    opt = fusedclip.ClipOptimizer(OPTIMIZERS[name](params), max_norm=1.0, fold=fold)
    _set_grads(params, seed=0)
    opt.step()
    before = [p.detach().clone() for p in params]
    state_before = {i: {k: v.clone() for k, v in opt.state[p].items()} for i, p in enumerate(params)}
    _set_grads(params, seed=1, bad=bad)
    grads_before = [p.grad.clone() for p in params]
    total = opt.step()
    assert not math.isfinite(float(total))
    for i, p in enumerate(params):
        assert torch.equal(p, before[i])
        for k, v in opt.state[p].items():
            assert torch.equal(v, state_before[i][k]), (k, v, state_before[i][k])
    for p, g in zip(params, grads_before):
        assert torch.equal(p.grad.nan_to_num(), g.nan_to_num())  # not modified
    _set_grads(params, seed=2)  # the next finite step goes ahead
    opt.step()
    assert not torch.equal(params[0], before[0])


@pytest.mark.parametrize("name,fold", [("adamw-fused", True), ("adamw-fused", False), ("sgd-plain", True)])
def test_grad_scaler_steps_a_clip_optimizer(name, fold):
    """scaler.step(ClipOptimizer): the same result as scaler.unscale_ + clip + scaler.step."""
    ref_params, params = _params(), _params()
    ref_opt = OPTIMIZERS[name](ref_params)
    opt = fusedclip.ClipOptimizer(OPTIMIZERS[name](params), max_norm=1.0, fold=fold)
    ref_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    for step, bad in enumerate([None, None, math.inf, None]):
        for ps, sc in ((ref_params, ref_scaler), (params, scaler)):
            sc.scale(torch.ones(()))
            _set_grads(ps, seed=step, bad=bad)
            for p in ps:
                p.grad.mul_(sc.get_scale())
        ref_scaler.unscale_(ref_opt)
        torch.nn.utils.clip_grad_norm_(ref_params, 1.0)
        ref_scaler.step(ref_opt)
        ref_scaler.update()
        scaler.step(opt)
        scaler.update()
        assert scaler.get_scale() == ref_scaler.get_scale()
        for p, r in zip(params, ref_params):
            torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6)


def test_passthrough_of_the_wrapped_optimizer():
    params = _params()
    inner = torch.optim.AdamW(params, lr=1e-2, fused=True)
    opt = fusedclip.ClipOptimizer(inner, max_norm=1.0)
    assert opt.param_groups is inner.param_groups and opt.state is inner.state
    assert opt.defaults is inner.defaults
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    _set_grads(params, seed=0)
    opt.step()
    scheduler.step()
    assert inner.param_groups[0]["lr"] == pytest.approx(5e-3)
    saved = opt.state_dict()
    assert saved["state"][0]["step"] == 1
    opt.zero_grad()
    assert all(p.grad is None for p in params)
    other = fusedclip.ClipOptimizer(torch.optim.AdamW(_params(), lr=1.0, fused=True), max_norm=1.0)
    other.load_state_dict(saved)
    torch.testing.assert_close(other.state[other.param_groups[0]["params"][1]]["exp_avg"],
                               inner.state[params[1]]["exp_avg"])
    extra = torch.nn.Parameter(torch.randn(4))
    opt.add_param_group({"params": [extra]})
    assert inner.param_groups[-1]["params"] == [extra]
    assert "ClipOptimizer(max_norm=1.0" in repr(opt)


def test_closure_runs_before_the_norm():
    params = _params()
    opt = fusedclip.ClipOptimizer(torch.optim.SGD(params, lr=0.1, fused=True), max_norm=0.5)

    def closure():
        opt.zero_grad()
        loss = sum((p * p).sum() for p in params)
        loss.backward()
        return loss

    expected_total = torch.linalg.vector_norm(torch.cat([2 * p.detach().flatten() for p in params]))
    total = opt.step(closure)
    torch.testing.assert_close(total, expected_total, rtol=1e-5, atol=0)
    # The grads the closure made, clipped to max_norm.
    grads_norm = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in params]))
    assert float(grads_norm) == pytest.approx(0.5, rel=1e-5)


def test_clip_optimizer_takes_each_backend(backend):
    """ClipOptimizer accepts every backend for parameters it runs (and clips with it), as
    clip_grad_norm_ with backend "torch" does."""
    grads = backend.on(make_grads([(30,), (4, 5)], torch.float32, seed=22, scale=3.0))
    params, expected = params_with(clone_all(grads)), params_with(clone_all(grads))
    opt = fusedclip.ClipOptimizer(torch.optim.SGD(params, lr=0.0), 0.5, backend=backend.name)
    total = opt.step()
    expected_total = fusedclip.clip_grad_norm_(expected, 0.5, backend="torch")
    torch.testing.assert_close(total, expected_total, rtol=1e-5, atol=0)
    for p, q in zip(params, expected):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)


def test_bad_arguments():
    params = _params()
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        fusedclip.ClipOptimizer(params, max_norm=1.0)
    inner = torch.optim.SGD(params, lr=0.1)
    with pytest.raises(ValueError, match="max_norm"):
        fusedclip.ClipOptimizer(inner, max_norm=-1.0)
    with pytest.raises(ValueError, match="norm_type"):
        fusedclip.ClipOptimizer(inner, max_norm=1.0, norm_type=math.nan)
    with pytest.raises(ValueError, match="backend"):
        fusedclip.ClipOptimizer(inner, max_norm=1.0, backend="nope")
    with pytest.raises(TypeError, match="fold must be True or False"):
        fusedclip.ClipOptimizer(inner, max_norm=1.0, fold=None)
    with pytest.raises(TypeError, match="already a ClipOptimizer"):
        fusedclip.ClipOptimizer(fusedclip.ClipOptimizer(inner, max_norm=1.0), max_norm=1.0)


@pytest.mark.parametrize("fold,expect_grad_scale", [(True, True), (False, False)])
def test_fold_decides_where_the_coefficient_goes(fold, expect_grad_scale):
    """fold=True (the default) hands 1/c to the kernel; False scales first."""
    params = _params()
    inner = torch.optim.AdamW(params, lr=1e-2, fused=True)
    seen = []
    original_step = inner.step

    def recording_step(*args, **kwargs):
        seen.append((getattr(inner, "grad_scale", None), getattr(inner, "found_inf", None)))
        return original_step(*args, **kwargs)

    inner.step = recording_step
    opt = fusedclip.ClipOptimizer(inner, max_norm=0.1, fold=fold)
    _set_grads(params, seed=9)
    total = opt.step()
    (grad_scale, found_inf), = seen
    assert found_inf is not None and float(found_inf) == 0.0
    if expect_grad_scale:
        torch.testing.assert_close(grad_scale, (total + 1e-6) / 0.1, rtol=1e-6, atol=0)
    else:
        assert grad_scale is None
