"""Calls that fail leave every gradient as it was; a failure after writes began is never re-run.

The one-group route (a list of plain grads given to the operator whole) is refused, with a
TypeError or ValueError, before anything is written, and the general path then says why or
regroups. Any other error comes after writes may have begun, and must propagate: running the
pass again would apply it twice.
"""

from __future__ import annotations

import threading

import pytest
import torch
from torch.amp.grad_scaler import OptState

import fusedclip
from fusedclip import _ops, reference
from helpers import (CPU_BACKENDS, assert_bitwise_equal, clone_all, make_grads, operator, oracle_norm, params_with,
                     patch_operator)


def _grads(seed=70):
    return make_grads([(40,), (7, 9), (), (300,)], torch.float32, seed=seed, scale=4.0)


# --- the one-group route: refusal or failure -------------------------------------------------------


def _fails_after_writing(fn):
    """fn's stand-in: halves every grad (a pass that began writing), then fails."""

    def operator(backend, tensors, *args):
        for t in tensors:
            t.mul_(0.5)
        raise RuntimeError("out of memory (a failure after writes began)")

    return operator


@pytest.mark.parametrize("entry, call", [
    ("clip_grad_norm_", lambda ps: fusedclip.clip_grad_norm_(ps, 0.1)),
    ("multi_tensor_scale_", lambda ps: fusedclip.clip_grads_with_norm_(ps, 0.1, torch.tensor(50.0))),
    ("multi_tensor_clamp_", lambda ps: fusedclip.clip_grad_value_(ps, 0.1)),
    ("clip_grad_norm_with_norms_", lambda ps: fusedclip.clip_grad_norm_with_norms_(ps, 0.1)),
])
def test_failure_after_writes_is_not_run_again(monkeypatch, entry, call):
    grads = _grads()
    params = params_with(clone_all(grads))
    patch_operator(monkeypatch, entry, _fails_after_writing(operator(entry)))
    with pytest.raises(RuntimeError, match="a failure after writes began"):
        call(params)
    assert_bitwise_equal([p.grad for p in params], [g * 0.5 for g in grads])  # once, not again


@pytest.mark.parametrize("error", [TypeError, ValueError])
def test_refusal_falls_back_to_the_general_path(monkeypatch, error):
    grads = _grads(seed=71)
    expected = params_with(clone_all(grads))
    total_expected = fusedclip.clip_grad_norm_(expected, 0.1, backend="torch")

    original, calls = operator("clip_grad_norm_"), []

    def refuses_once(*args):  # the one-group route refused; the general path's call runs
        calls.append(args)
        if len(calls) == 1:
            raise error("refused before any write")
        return original(*args)

    patch_operator(monkeypatch, "clip_grad_norm_", refuses_once)
    params = params_with(clone_all(grads))
    total = fusedclip.clip_grad_norm_(params, 0.1)
    torch.testing.assert_close(total, total_expected, rtol=1e-6, atol=0)
    for p, q in zip(params, expected):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0)
    assert len(calls) == 2


@pytest.mark.parametrize("op", ["multi_tensor_scale_", "multi_tensor_clamp_", "clip_grad_norm_",
                                "multi_tensor_norm"])
def test_cpu_operator_refusals_are_type_or_value_errors(op):
    """What the C++ operators refuse before writing raises TypeError or ValueError (as fusedclip
    calls them), the refusal that the one-group route may take back."""
    expanded = torch.randn(1, 5).expand(4, 5)
    call = {
        "multi_tensor_scale_": lambda ts: _ops.run("multi_tensor_scale_", "cpu", ts, torch.tensor(0.5)),
        "multi_tensor_clamp_": lambda ts: _ops.run("multi_tensor_clamp_", "cpu", ts, -0.1, 0.1),
        "clip_grad_norm_": lambda ts: _ops.run("clip_grad_norm_", "cpu", ts, 0.1, 2.0),
        "multi_tensor_norm": lambda ts: _ops.run("multi_tensor_norm", "cpu", ts, 2.0, False),
    }[op]
    with pytest.raises((TypeError, ValueError)):
        call([torch.randn(3), torch.arange(4)])  # an integer tensor
    if op != "multi_tensor_norm":  # reads only: an expanded tensor is fine
        with pytest.raises((TypeError, ValueError), match="overlapping"):
            call([torch.randn(3), expanded])


# --- clip_grads_with_norm_ -----------------------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_one_element_norm_that_is_not_0d(backend):
    """A norm of shape (1,) scales every grad as the same norm of shape () (0-d grads too)."""
    grads = _grads(seed=72)
    params, expected = params_with(clone_all(grads)), params_with(clone_all(grads))
    fusedclip.clip_grads_with_norm_(expected, 1.0, torch.tensor(7.0), backend=backend)
    fusedclip.clip_grads_with_norm_(params, 1.0, torch.tensor([7.0]), backend=backend)
    assert_bitwise_equal([p.grad for p in params], [p.grad for p in expected])
    fusedclip.clip_grads_with_norm_(params, torch.tensor([1.0]), torch.tensor([[7.0]]), backend=backend)
    fusedclip.clip_grads_with_norm_(expected, 1.0, torch.tensor(7.0), backend=backend)
    for p, q in zip(params, expected):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0)


# --- grad_scaler: everything checked before the first write ---------------------------------------


def test_grad_scaler_refuses_what_it_cannot_unscale_before_any_write():
    """The optimizer holds grads outside `parameters` that the unscale cannot take (complex):
    refused before anything is unscaled, the scaler still ready (a retry unscales once)."""
    clipped = torch.nn.Parameter(torch.randn(6))
    other = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))  # unscaled, not clipped
    complex_param = torch.nn.Parameter(torch.randn(4, dtype=torch.complex64))
    params = [clipped, other, complex_param]
    opt = torch.optim.SGD(params, lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(torch.ones(()))
    for i, p in enumerate(params):
        p.grad = make_grads([p.shape], p.dtype, seed=73 + i)[0] * 1000.0
    before = clone_all(p.grad for p in params)
    with pytest.raises(TypeError, match="complex"):
        fusedclip.clip_grad_norm_([clipped], 1.0, grad_scaler=scaler, optimizer=opt)
    assert_bitwise_equal([p.grad for p in params], before)
    assert scaler._per_optimizer_states[id(opt)]["stage"] is OptState.READY


# --- clip_grad_norm_with_norms_ reads each grad once ----------------------------------------------


def test_with_norms_reads_each_grad_once(monkeypatch):
    """A grad assigned (by another thread) while the operator runs changes neither the norms
    nor where they are reported: the parameters' grads are read once, before."""
    grads = _grads(seed=74)
    params = params_with(clone_all(grads) + [None])  # a parameter without a grad: norm 0
    expected_per = [oracle_norm([g], 2.0) for g in grads] + [0.0]
    lib = torch.library.Library("fusedclip", "IMPL")
    with pytest.warns(UserWarning):  # overriding the C++ kernel for this test
        lib.impl("clip_grad_norm_with_norms_", _assigning_kernel(params), "CPU")
    try:
        total, per = fusedclip.clip_grad_norm_with_norms_(params, 1e6)
    finally:
        lib._destroy()
    assert per.shape == (len(params),)
    for got, want in zip(per.tolist(), expected_per):
        assert got == pytest.approx(want, rel=1e-5)


def _assigning_kernel(params):
    """The CPU kernel of clip_grad_norm_with_norms_ that also drops params[0]'s grad midway."""

    def kernel(tensors, max_norm, norm_type):
        result = reference.clip_grad_norm_with_norms_(tensors, max_norm, norm_type)
        params[0].grad = None
        return result

    return kernel


def test_with_norms_general_path_reads_each_grad_once(monkeypatch):
    grads = _grads(seed=75)
    params = params_with(clone_all(grads) + [None])
    real = operator("clip_grad_norm_with_norms_")

    def assigning(backend, tensors, max_norm, norm_type):
        result = real(backend, tensors, max_norm, norm_type)
        params[0].grad = None
        return result

    patch_operator(monkeypatch, "clip_grad_norm_with_norms_", assigning)
    total, per = fusedclip.clip_grad_norm_with_norms_(params, 1e6, backend="torch")
    assert per[-1] == 0.0
    for got, g in zip(per.tolist(), grads):
        assert got == pytest.approx(oracle_norm([g], 2.0), rel=1e-5)


# --- messages that name the argument --------------------------------------------------------------


@pytest.mark.parametrize("fn", [fusedclip.get_total_norm, fusedclip.get_norms])
@pytest.mark.parametrize("bad", ["g", 3.0, None])
def test_non_tensor_first_item_named(fn, bad):
    with pytest.raises(TypeError, match=r"gradient 0 must be a torch.Tensor"):
        fn([bad, torch.randn(3)])


@pytest.mark.parametrize("bad, match", [
    ({}, r"process_group must be a torch.distributed.ProcessGroup or a sequence of them, got dict"),
    (3, r"process_group must be a torch.distributed.ProcessGroup or a sequence of them, got int"),
    ("world", r"process_group must be a torch.distributed.ProcessGroup or a sequence of them, got str"),
    ([], r"process_group must name at least one group"),
    ([3], r"process_group\[0\] must be a torch.distributed.ProcessGroup, got int"),
])
@pytest.mark.parametrize("has_grads", [True, False])
def test_bad_process_group_named(bad, match, has_grads):
    grads = _grads(seed=76) if has_grads else []
    params = params_with(clone_all(grads))
    with pytest.raises((TypeError, ValueError), match=match):
        fusedclip.get_total_norm(grads, process_group=bad)
    with pytest.raises((TypeError, ValueError), match=match):
        fusedclip.clip_grad_norm_(params, 0.1, process_group=bad)
    assert_bitwise_equal([p.grad for p in params], grads)


# --- ClipOptimizer takes every backend valid for its parameters ----------------------------------


@pytest.mark.parametrize("backend", ["auto", "cpu", "torch"])
def test_clip_optimizer_backends_for_cpu_parameters(backend):
    params = params_with(clone_all(_grads(seed=77)))
    opt = fusedclip.ClipOptimizer(torch.optim.SGD(params, lr=0.1), 0.1, backend=backend)
    assert opt.backend == backend
    opt.step()


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_clip_optimizer_gpu_backends_refused_with_the_reason_for_cpu_parameters(backend):
    """A GPU backend is accepted for parameters it can run, and refused, with the reason, for
    CPU parameters (here: none of this machine's parameters can run on it)."""
    params = params_with(clone_all(_grads(seed=78)))
    with pytest.raises((ValueError, RuntimeError), match=f"backend '{backend}'"):
        fusedclip.ClipOptimizer(torch.optim.SGD(params, lr=0.1), 0.1, backend=backend)


@pytest.mark.parametrize("clipper", [
    lambda: fusedclip.PerTensorClip(0.1), lambda: fusedclip.AutoClip(), lambda: fusedclip.ZClip(),
    lambda: fusedclip.AGC(),
], ids=["per_tensor", "autoclip", "zclip", "agc"])
@pytest.mark.parametrize("view", ["conj", "neg"])
def test_clippers_name_a_lazily_conjugated_or_negated_grad(clipper, view):
    """Such a grad meets torch's dispatch before the C++ checks: the general path names it."""
    complex_grad = torch.randn(5, dtype=torch.complex64)
    lazy = complex_grad.conj() if view == "conj" else complex_grad.conj().imag
    assert lazy.is_conj() or lazy.is_neg()
    params = params_with([torch.randn(6, 2), lazy])
    before = [p.grad.resolve_conj().resolve_neg().clone() for p in params]
    with pytest.raises(ValueError, match="lazily conjugated or negated"):
        clipper()(params)
    for p, b in zip(params, before):
        assert torch.equal(p.grad.resolve_conj().resolve_neg(), b)


def test_gradient_monitor_refuses_an_unknown_backend_when_made():
    model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="backend must be one of"):
        fusedclip.GradientMonitor(model, backend="CPU")
