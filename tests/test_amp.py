"""Fused unscale + clip with a torch.amp.GradScaler, against torch's scaler.unscale_ followed by
torch.nn.utils.clip_grad_norm_: gradients, norms, the scaler's state, scale updates and skipped
steps, on CPU (torch.amp.GradScaler("cpu"))."""

from __future__ import annotations

import math

import pytest
import torch
from torch.amp.grad_scaler import OptState

import fusedclip
from helpers import CPU_BACKENDS, make_grads

SHAPES = [(33,), (4, 257), (1,), (70001,), (0,), (5, 6, 7)]


def _setup(init_scale=2.0**12, shapes=SHAPES, dtype=torch.float32, seed=0):
    """Twin (params, SGD optimizer, scaler): one for torch's sequence, one for fusedclip's."""
    twins = []
    for _ in range(2):
        gen = torch.Generator().manual_seed(seed)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(dtype)) for s in shapes]
        opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
        scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=2)
        twins.append((params, opt, scaler))
    return twins


def _set_scaled_grads(params, scaler, seed, bad=None):
    """grads = true grads * the scaler's scale (as scaler.scale(loss).backward() leaves them)."""
    grads = make_grads([p.shape for p in params], params[0].dtype, seed=seed, scale=3.0)
    scaler.scale(torch.ones(()))  # what scaler.scale(loss) does first: initialise the scale
    scale = scaler.get_scale()
    for p, g in zip(params, grads):
        p.grad = g * scale
    if bad is not None:
        params[3].grad[1234] = bad


def _torch_step(params, opt, scaler, max_norm):
    scaler.unscale_(opt)
    total = torch.nn.utils.clip_grad_norm_(params, max_norm)
    grads = [p.grad.clone() for p in params]
    found = {d: t.clone() for d, t in scaler._per_optimizer_states[id(opt)]["found_inf_per_device"].items()}
    scaler.step(opt)
    scaler.update()
    return total, grads, found


def _fused_step(params, opt, scaler, max_norm, backend="auto"):
    total = fusedclip.clip_grad_norm_(params, max_norm, grad_scaler=scaler, optimizer=opt, backend=backend)
    state = scaler._per_optimizer_states[id(opt)]
    assert state["stage"] is OptState.UNSCALED
    grads = [p.grad.clone() for p in params]
    found = {d: t.clone() for d, t in state["found_inf_per_device"].items()}
    scaler.step(opt)
    scaler.update()
    return total, grads, found


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("init_scale", [2.0**12, 0.25], ids=["scale-4096", "scale-below-1"])
def test_matches_unscale_then_clip_over_steps(backend, init_scale):
    (tp, topt, tscaler), (fp, fopt, fscaler) = _setup(init_scale)
    # Steps that clip, do not clip, and hold inf or nan (skipped, scale backed off).
    plan = [(1.0, None), (1e4, None), (0.5, math.inf), (2.0, None), (1.0, math.nan), (0.3, None), (1.0, None)]
    scales = set()
    for step, (max_norm, bad) in enumerate(plan):
        _set_scaled_grads(tp, tscaler, seed=step, bad=bad)
        _set_scaled_grads(fp, fscaler, seed=step, bad=bad)
        t_total, t_grads, t_found = _torch_step(tp, topt, tscaler, max_norm)
        f_total, f_grads, f_found = _fused_step(fp, fopt, fscaler, max_norm, backend)
        assert f_total.dtype == t_total.dtype
        if bad is None:
            torch.testing.assert_close(f_total, t_total, rtol=1e-5, atol=0)
            for f, t in zip(f_grads, t_grads):
                # x * (inv_scale * c) against torch's (x * inv_scale) * c: a few ulps apart.
                torch.testing.assert_close(f, t, rtol=1e-6, atol=1e-30)
        else:
            assert not math.isfinite(float(f_total)) and not math.isfinite(float(t_total))
        assert {d: float(v) for d, v in f_found.items()} == {d: float(v) for d, v in t_found.items()}
        assert all(v.dtype == torch.float32 for v in f_found.values())
        assert fscaler.get_scale() == tscaler.get_scale(), f"step {step}"
        scales.add(fscaler.get_scale())
        for f, t in zip(fp, tp):
            torch.testing.assert_close(f, t, rtol=1e-5, atol=1e-6)
    assert len(scales) >= 3  # the scale moved: grew, and backed off on inf/nan


def test_skipped_step_leaves_parameters():
    (_, _, _), (params, opt, scaler) = _setup()
    _set_scaled_grads(params, scaler, seed=1, bad=math.inf)
    before = [p.detach().clone() for p in params]
    fusedclip.clip_grad_norm_(params, 1.0, grad_scaler=scaler, optimizer=opt)
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(params, before))
    assert scaler.get_scale() == 2.0**11


def test_subset_of_parameters_clipped_rest_unscaled():
    """Grads of the optimizer outside `parameters` are unscaled (and checked), not clipped."""
    (tp, topt, tscaler), (fp, fopt, fscaler) = _setup()
    _set_scaled_grads(tp, tscaler, seed=3)
    _set_scaled_grads(fp, fscaler, seed=3)
    tscaler.unscale_(topt)
    t_total = torch.nn.utils.clip_grad_norm_(tp[:3], 0.5)
    f_total = fusedclip.clip_grad_norm_(fp[:3], 0.5, grad_scaler=fscaler, optimizer=fopt)
    torch.testing.assert_close(f_total, t_total, rtol=1e-5, atol=0)
    for f, t in zip(fp, tp):
        torch.testing.assert_close(f.grad, t.grad, rtol=1e-6, atol=1e-30)
    # An inf outside the clipped subset is found too.
    fscaler.update()
    _set_scaled_grads(fp, fscaler, seed=4)
    fp[5].grad[1, 2, 3] = math.inf
    fusedclip.clip_grad_norm_(fp[:3], 0.5, grad_scaler=fscaler, optimizer=fopt)
    assert float(fscaler._per_optimizer_states[id(fopt)]["found_inf_per_device"][torch.device("cpu")]) == 1.0


def test_several_param_groups():
    (tp, _, tscaler), (fp, _, fscaler) = _setup()
    topt = torch.optim.SGD([{"params": tp[:2]}, {"params": tp[2:], "lr": 0.01}], lr=0.1)
    fopt = torch.optim.SGD([{"params": fp[:2]}, {"params": fp[2:], "lr": 0.01}], lr=0.1)
    _set_scaled_grads(tp, tscaler, seed=5)
    _set_scaled_grads(fp, fscaler, seed=5)
    t_total, t_grads, _ = _torch_step(tp, topt, tscaler, 0.7)
    f_total, f_grads, _ = _fused_step(fp, fopt, fscaler, 0.7)
    torch.testing.assert_close(f_total, t_total, rtol=1e-5, atol=0)
    for f, t in zip(f_grads, t_grads):
        torch.testing.assert_close(f, t, rtol=1e-6, atol=1e-30)


def test_disabled_scaler_clips_only():
    grads = make_grads([(10,), (3, 4)], torch.float32, seed=8, scale=5.0)
    params, ref = [], []
    for g in grads:
        params.append(torch.nn.Parameter(torch.zeros_like(g)))
        params[-1].grad = g.clone()
        ref.append(torch.nn.Parameter(torch.zeros_like(g)))
        ref[-1].grad = g.clone()
    expected_total = torch.nn.utils.clip_grad_norm_(ref, 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    opt = torch.optim.SGD(params, lr=0.1)
    total = fusedclip.clip_grad_norm_(params, 1.0, grad_scaler=scaler, optimizer=opt)
    torch.testing.assert_close(total, expected_total, rtol=1e-6, atol=0)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-6, atol=0)


def _bad_call_leaves_grads(params, call, error, match):
    before = [None if p.grad is None else p.grad.clone() for p in params]
    with pytest.raises(error, match=match):
        call()
    for p, b in zip(params, before):
        assert (p.grad is None and b is None) or torch.equal(p.grad, b)


def test_errors_before_anything_is_modified():
    (_, _, _), (params, opt, scaler) = _setup()
    _set_scaled_grads(params, scaler, seed=6)
    clip = fusedclip.clip_grad_norm_
    _bad_call_leaves_grads(params, lambda: clip(params, 1.0, grad_scaler=scaler), ValueError, "needs optimizer")
    # optimizer= alone is not a grad_scaler=None: it is the scaler's argument, and the scaler is missing
    _bad_call_leaves_grads(params, lambda: clip(params, 1.0, optimizer=opt), ValueError,
                           "optimizer= is the optimizer of grad_scaler=, which is missing")
    _bad_call_leaves_grads(params, lambda: clip(params, 1.0, grad_scaler=None, optimizer=opt), ValueError,
                           "optimizer= is the optimizer of grad_scaler=, which is missing")
    _bad_call_leaves_grads(params, lambda: clip(params, 1.0, grad_scaler=object(), optimizer=opt), TypeError,
                           "grad_scaler must be a torch.amp.GradScaler")
    _bad_call_leaves_grads(params, lambda: clip(params, 1.0, error_if_nonfinite=True, grad_scaler=scaler,
                                                optimizer=opt), ValueError, "error_if_nonfinite")
    _bad_call_leaves_grads(params, lambda: clip(params, -1.0, grad_scaler=scaler, optimizer=opt), ValueError,
                           "max_norm")
    stranger = torch.nn.Parameter(torch.randn(3))
    stranger.grad = torch.randn(3)
    _bad_call_leaves_grads(params, lambda: clip(params + [stranger], 1.0, grad_scaler=scaler, optimizer=opt),
                           ValueError, "must belong to `optimizer`")
    # Nothing above touched the scaler: unscale_ still runs.
    assert scaler._per_optimizer_states[id(opt)]["stage"] is OptState.READY


def test_second_call_raises_as_unscale_does():
    (_, _, _), (params, opt, scaler) = _setup()
    _set_scaled_grads(params, scaler, seed=7)
    fusedclip.clip_grad_norm_(params, 1.0, grad_scaler=scaler, optimizer=opt)
    _bad_call_leaves_grads(params, lambda: fusedclip.clip_grad_norm_(params, 1.0, grad_scaler=scaler, optimizer=opt),
                           RuntimeError, "unscale_\\(\\) has already been called")
    with pytest.raises(RuntimeError, match="already been called"):
        scaler.unscale_(opt)  # and torch's own unscale_ sees the stage we set
    scaler.step(opt)
    _bad_call_leaves_grads(params, lambda: fusedclip.clip_grad_norm_(params, 1.0, grad_scaler=scaler, optimizer=opt),
                           RuntimeError, "after step")


def test_fp16_grads_refused_as_torch_does():
    params = [torch.nn.Parameter(torch.randn(8, dtype=torch.float16))]
    params[0].grad = torch.randn(8, dtype=torch.float16)
    opt = torch.optim.SGD(params, lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(torch.ones(()))  # initialises the scale
    _bad_call_leaves_grads(params, lambda: fusedclip.clip_grad_norm_(params, 1.0, grad_scaler=scaler, optimizer=opt),
                           ValueError, "Attempting to unscale FP16 gradients")
