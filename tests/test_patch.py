"""patch_torch / unpatch_torch and dispatch_clip_grad."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.utils.clip_grad

import fusedclip
from helpers import OpsSpy, make_grads, params_with

NAMES = ("clip_grad_norm_", "clip_grad_value_", "get_total_norm", "clip_grads_with_norm_")
MODULES = (torch.nn.utils, torch.nn.utils.clip_grad)
# torch 2.13's clip_grad module names get_total_norm and clip_grads_with_norm_ with a leading
# underscore; torch.nn.utils exports all four.
PATCHED = [(m, n) for m in MODULES for n in NAMES if hasattr(m, n)]


@pytest.fixture
def originals():
    saved = {(m, n): getattr(m, n) for m, n in PATCHED}
    yield saved
    fusedclip.unpatch_torch()
    assert all(getattr(m, n) is f for (m, n), f in saved.items())


def test_patch_and_unpatch_restore_the_exact_originals(originals):
    fusedclip.patch_torch()
    fusedclip.patch_torch()  # idempotent
    assert fusedclip.is_torch_patched()
    assert len(PATCHED) >= 6
    for module, name in PATCHED:
        assert getattr(module, name) is getattr(fusedclip, name)
    fusedclip.unpatch_torch()
    fusedclip.unpatch_torch()
    assert not fusedclip.is_torch_patched()
    assert all(getattr(m, n) is f for (m, n), f in originals.items())


def test_context_manager(originals):
    with fusedclip.patch_torch():
        assert torch.nn.utils.clip_grad_norm_ is fusedclip.clip_grad_norm_
    assert torch.nn.utils.clip_grad_norm_ is originals[(torch.nn.utils, "clip_grad_norm_")]
    # A block entered while patched leaves torch patched.
    fusedclip.patch_torch()
    with fusedclip.patch_torch():
        pass
    assert fusedclip.is_torch_patched()
    # An exception inside the block still unpatches.
    fusedclip.unpatch_torch()
    with pytest.raises(KeyError):
        with fusedclip.patch_torch():
            raise KeyError("x")
    assert not fusedclip.is_torch_patched()


def test_patched_calls_run_fusedclip(originals, monkeypatch):
    norm_spy = OpsSpy(monkeypatch, "clip_grad_norm_")
    clamp_spy = OpsSpy(monkeypatch, "multi_tensor_clamp_")
    grads = make_grads([(100,), (7, 3)], torch.float32, seed=1, scale=4.0)
    params = params_with([g.clone() for g in grads])
    ref = params_with([g.clone() for g in grads])
    expected = torch.nn.utils.clip_grad_norm_(ref, 1.0)
    with fusedclip.patch_torch():
        total = torch.nn.utils.clip_grad_norm_(params, 1.0)
        torch.nn.utils.clip_grad.clip_grad_value_(params, 0.01)
    torch.nn.utils.clip_grad_value_(ref, 0.01)
    assert norm_spy.calls == 1 and clamp_spy.calls == 1
    torch.testing.assert_close(total, expected, rtol=1e-6, atol=0)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-6, atol=0)


def test_fusedclip_never_calls_the_patched_functions(originals, monkeypatch):
    """With torch's functions replaced by ones that fail, fusedclip still runs every path."""
    def forbidden(*args, **kwargs):
        raise AssertionError("torch's clipping function was called")

    for module, name in PATCHED:
        monkeypatch.setattr(module, name, forbidden)
    for private in ("_get_total_norm", "_clip_grads_with_norm_"):
        if hasattr(torch.nn.utils.clip_grad, private):
            monkeypatch.setattr(torch.nn.utils.clip_grad, private, forbidden)
    params = params_with(make_grads([(10,), (3, 3)], torch.float32, seed=2))
    for backend in ("cpu", "torch"):
        fusedclip.clip_grad_norm_(params, 0.1, backend=backend)
        fusedclip.clip_grad_value_(params, 0.1, backend=backend)
        total = fusedclip.get_total_norm([p.grad for p in params], backend=backend)
        fusedclip.clip_grads_with_norm_(params, 0.1, total, backend=backend)
        fusedclip.dispatch_clip_grad(params, 0.1, mode="norm")
    opt = fusedclip.ClipOptimizer(torch.optim.AdamW(params, fused=True), max_norm=0.1)
    opt.step()
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(torch.ones(()))
    inner = torch.optim.SGD(params, lr=0.1)
    fusedclip.clip_grad_norm_(params, 0.1, grad_scaler=scaler, optimizer=inner)
    monkeypatch.undo()


# --- dispatch_clip_grad ------------------------------------------------------------------------


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
def test_dispatch_norm(norm_type):
    grads = make_grads([(50,), (4, 4)], torch.float32, seed=3, scale=2.0)
    params, ref = params_with([g.clone() for g in grads]), params_with([g.clone() for g in grads])
    total = fusedclip.dispatch_clip_grad(params, 0.5, mode="norm", norm_type=norm_type)
    expected = torch.nn.utils.clip_grad_norm_(ref, 0.5, norm_type=norm_type)
    torch.testing.assert_close(total, expected, rtol=1e-6, atol=0)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-6, atol=0)


def test_dispatch_value():
    grads = make_grads([(50,), (4, 4)], torch.float32, seed=4, scale=2.0)
    params, ref = params_with([g.clone() for g in grads]), params_with([g.clone() for g in grads])
    assert fusedclip.dispatch_clip_grad(params, 0.3, mode="value") is None
    torch.nn.utils.clip_grad_value_(ref, 0.3)
    for p, r in zip(params, ref):
        assert torch.equal(p.grad, r.grad)


def test_dispatch_bad_mode():
    params = params_with(make_grads([(5,)], torch.float32, seed=5))
    before = params[0].grad.clone()
    with pytest.raises(ValueError, match="mode must be one of"):
        fusedclip.dispatch_clip_grad(params, 0.3, mode="nrom")
    assert torch.equal(params[0].grad, before)


def test_dispatch_agc():
    grads = make_grads([(6, 5), (5,)], torch.float32, seed=7, scale=10.0)
    params = params_with([g.clone() for g in grads])
    expected = params_with([g.clone() for g in grads])
    for p, e in zip(params, expected):
        with torch.no_grad():
            w = torch.randn(p.shape, generator=torch.Generator().manual_seed(8))
            p.copy_(w)
            e.copy_(w)
    total = fusedclip.dispatch_clip_grad(params, 0.01, mode="agc")
    expected_total = fusedclip.AGC(clip_factor=0.01)(expected)
    assert torch.equal(total, expected_total)
    for p, e in zip(params, expected):
        assert torch.equal(p.grad, e.grad)
    assert any(not torch.equal(p.grad, g) for p, g in zip(params, grads))  # something was clipped
    with pytest.raises(ValueError, match="norm_type must be 2.0"):
        fusedclip.dispatch_clip_grad(params, 0.01, mode="agc", norm_type=1.0)
