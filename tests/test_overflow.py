"""A norm whose sum of |x|^p overflows its float32 accumulator while every |x| is finite.

torch returns a finite norm for one element of 1e20 (its norm of one element is |x|) and zeroes
nothing; a float32 sum of squares overflows there (1e40). fusedclip takes such a norm again of
x / max|x| on CPU tensors (backends "cpu" and "torch", where reading the norm is free), for every
length: the norm is finite wherever the true norm fits in its dtype. A negative p is taken again of
x / min|x| when its sum underflows to 0 (a root of inf) or overflows (a root of 0 while no element
is 0). Backends that decide on a
device ("cuda", "triton") would need a host sync for it and keep the overflowed inf.
"""

from __future__ import annotations

import math

import pytest
import torch

import fusedclip
from helpers import CPU_BACKENDS, params_with

# (values of the grads, norm_type): torch's own finite cases first, then longer lists.
CASES = [
    pytest.param([[1e20]], 2.0, id="one-element-1e20"),
    pytest.param([[300.0]], 1e6, id="one-element-p=1e6"),
    pytest.param([[-3e30]], 3.0, id="one-element-p=3"),
    pytest.param([[1e20] * 3, [2.5e19, -1.0], []], 2.0, id="three-tensors"),
    pytest.param([[], [7e19] * 1000, [1e-3] * 5, []], 2.0, id="long-with-empties"),
    pytest.param([[1e13] * 40000], 3.5, id="p=3.5-many"),
    # p < 0: each |x|^p underflows to 0, and the root of a zero sum is inf
    pytest.param([[1e25] * 3, [4e25]], -2.0, id="p=-2-sum-underflows"),
    pytest.param([[3.0, 4.0]], -400.0, id="p=-400-sum-underflows"),
    pytest.param([[3.0, 4.0]], -1e39, id="p=-1e39-beyond-float32"),
    pytest.param([[3.0, 4.0]], 1e39, id="p=1e39-beyond-float32"),
]

# Sums whose root is 0 though no element is: p < 0 whose sum overflows (the |x|^p of a small |x|),
# p > 0 whose sum underflows. The norms are below 1, and a max_norm of 1 clips nothing.
SMALL_NORM_CASES = [
    pytest.param([[1e-3, 1e3]], -20.0, id="p=-20-sum-overflows"),
    pytest.param([[1e-20] * 3], -2.0, id="p=-2-sum-overflows"),
    pytest.param([[2e-20, 5.0], [], [1e-19]], -3.0, id="p=-3-sum-overflows-with-empty"),
    # p > 0 whose |x|^p all underflow to 0
    pytest.param([[0.5, -0.25]], 1e39, id="p=1e39-below-one"),
    pytest.param([[1e-30] * 3, [-2e-30]], 2.0, id="p=2-sum-underflows"),
    pytest.param([[1e-8] * 5], 6.0, id="p=6-sum-underflows"),
]


def _oracle(values, norm_type) -> float:
    """The norm relative to max|x| (p > 0) or min|x| (p < 0), whose terms are at most 1."""
    flat = [abs(v) for vs in values for v in vs]
    pivot = max(flat) if norm_type > 0 else min(flat)
    if pivot == 0:
        return 0.0
    return pivot * math.fsum((v / pivot) ** norm_type for v in flat) ** (1.0 / norm_type)


def _grads(values, dtype):
    return [torch.tensor(vs, dtype=dtype) for vs in values]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("values,norm_type", CASES + SMALL_NORM_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_finite_where_the_truth_fits(backend, values, norm_type, dtype):
    grads = _grads(values, dtype)
    truth = _oracle([g.double().tolist() for g in grads], norm_type)
    assert math.isfinite(truth) and 0 < truth < torch.finfo(torch.float32).max
    rtol = 1e-5 if dtype == torch.float32 else 1e-3
    total = fusedclip.get_total_norm(grads, norm_type, error_if_nonfinite=True, backend=backend)
    assert total.dtype == torch.float32
    assert math.isclose(float(total), truth, rel_tol=rtol), (float(total), truth)
    total, per_tensor = fusedclip.get_norms(grads, norm_type, backend=backend)
    assert math.isclose(float(total), truth, rel_tol=rtol)
    _assert_per_tensor(per_tensor, grads, norm_type, rtol)


def _assert_per_tensor(per_tensor, grads, norm_type, rtol):
    """Each tensor's norm against its own oracle (0 for an empty tensor)."""
    assert per_tensor.shape == (len(grads),)
    for norm, g in zip(per_tensor.tolist(), grads):
        expected = _oracle([g.double().tolist()], norm_type) if g.numel() else 0.0
        assert math.isclose(norm, expected, rel_tol=rtol), (norm, expected)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("values,norm_type", CASES)
@pytest.mark.parametrize("clip", ["clip_grad_norm_", "clip_grad_norm_with_norms_", "get_total_norm+clip_grads_with_norm_"])
def test_clip_scales_to_max_norm_instead_of_zeroing(backend, values, norm_type, clip):
    grads = _grads(values, torch.float32)
    params = params_with([g.clone() for g in grads])
    if clip == "clip_grad_norm_":
        total = fusedclip.clip_grad_norm_(params, 1.0, norm_type, error_if_nonfinite=True, backend=backend)
    elif clip == "clip_grad_norm_with_norms_":
        total, per_tensor = fusedclip.clip_grad_norm_with_norms_(params, 1.0, norm_type, backend=backend)
        _assert_per_tensor(per_tensor, grads, norm_type, 1e-5)
    else:
        total = fusedclip.get_total_norm([p.grad for p in params], norm_type, backend=backend)
        fusedclip.clip_grads_with_norm_(params, 1.0, total, backend=backend)
    assert math.isfinite(float(total))
    clipped = [p.grad.double().tolist() for p in params]
    assert math.isclose(_oracle(clipped, norm_type), 1.0, rel_tol=1e-4)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_agrees_with_torch_where_torch_is_finite(backend):
    """torch's finite overflow cases (one element) give torch's norm and torch's clipped grad."""
    for value, norm_type in ((1e20, 2.0), (300.0, 1e6), (-2e25, 2.0), (1e30, 4.0)):
        ours, theirs = params_with([torch.tensor(value)]), params_with([torch.tensor(value)])
        total = fusedclip.clip_grad_norm_(ours, 1.0, norm_type, backend=backend)
        expected = torch.nn.utils.clip_grad_norm_(theirs, 1.0, norm_type)
        assert torch.isfinite(expected)
        torch.testing.assert_close(total, expected, rtol=1e-6, atol=0)
        torch.testing.assert_close(ours[0].grad, theirs[0].grad, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("norm_type", [2.0, 3.5, -2.0, -3.5])
def test_error_if_nonfinite_raises_only_for_a_non_finite_norm(backend, norm_type):
    """PyTorch's own error_if_nonfinite test expects a raise for float64 grads of 2e200, whose sum
    of |x|^p overflows (p > 0) or underflows to 0 (p < 0) and whose norm torch returns as inf. The
    true norm fits in float64: fusedclip returns it, raises nothing, and clips to max_norm."""
    values = [[2e200] * 10]
    truth = _oracle(values, norm_type)
    theirs = params_with(_grads(values, torch.float64))
    with pytest.raises(RuntimeError, match="non-finite"):
        torch.nn.utils.clip_grad_norm_(theirs, 1.0, norm_type, error_if_nonfinite=True)
    ours = params_with(_grads(values, torch.float64))
    total = fusedclip.clip_grad_norm_(ours, 1.0, norm_type, error_if_nonfinite=True, backend=backend)
    assert math.isclose(float(total), truth, rel_tol=1e-12), (float(total), truth)
    assert math.isclose(_oracle([ours[0].grad.tolist()], norm_type), 1.0, rel_tol=1e-12)
    # a nan norm still raises, before any write
    ours = params_with(_grads([[2e200, math.nan]], torch.float64))
    with pytest.raises(RuntimeError, match="non-finite"):
        fusedclip.clip_grad_norm_(ours, 1.0, norm_type, error_if_nonfinite=True, backend=backend)
    assert ours[0].grad[0].item() == 2e200 and math.isnan(ours[0].grad[1].item())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_finite_elements_and_norms_beyond_float32_stay_non_finite(backend):
    cases = [
        ([[1e20, math.inf], [1.0]], 2.0, math.inf),
        ([[1e20, math.nan], [1.0]], 2.0, math.nan),
        ([[3e38] * 4], 2.0, math.inf),  # the true norm, 6e38, is beyond float32
        ([[3e38, 3e38]], 1.0, math.inf),
    ]
    for values, norm_type, expected in cases:
        total = fusedclip.get_total_norm(_grads(values, torch.float32), norm_type, backend=backend)
        if math.isnan(expected):
            assert math.isnan(float(total)), values
        else:
            assert float(total) == expected, values
    # p < 0: an element of 0 makes the norm 0 (its |x|^p is inf), an all-inf list makes it inf
    for values, expected in (([[1e-20, 0.0], [1e-3]], 0.0), ([[math.inf, -math.inf]], math.inf)):
        for norm_type in (-2.0, -3.5):
            total, per_tensor = fusedclip.get_norms(_grads(values, torch.float32), norm_type, backend=backend)
            assert float(total) == expected, (values, norm_type)
            assert float(per_tensor[0]) == expected, (values, norm_type)
    # float64 grads hold the same norm
    total = fusedclip.get_total_norm(_grads([[3e38] * 4], torch.float64), 2.0, backend=backend)
    assert math.isclose(float(total), 6e38, rel_tol=1e-12)
    total = fusedclip.get_total_norm(_grads([[1e200] * 3], torch.float64), 2.0, backend=backend)
    assert math.isclose(float(total), 1e200 * math.sqrt(3), rel_tol=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("values,norm_type", CASES + SMALL_NORM_CASES)
def test_per_tensor_clip_and_monitor_see_the_rescaled_norms(backend, values, norm_type):
    """PerTensorClip scales each gradient to max_norm instead of zeroing it; GradientMonitor
    records the finite per-parameter norms."""
    grads = _grads(values, torch.float32)
    params = params_with([g.clone() for g in grads])
    fusedclip.PerTensorClip(1.0, norm_type, backend=backend)(params)
    for p, g in zip(params, grads):
        if g.numel():
            expected = min(1.0, 1.0 / _oracle([g.double().tolist()], norm_type))
            assert math.isclose(_oracle([p.grad.double().tolist()], norm_type),
                                expected * _oracle([g.double().tolist()], norm_type), rel_tol=1e-4)
    params = params_with([g.clone() for g in grads])
    monitor = fusedclip.GradientMonitor([(f"p{i}", p) for i, p in enumerate(params)], norm_type=norm_type,
                                        backend=backend)
    monitor.observe()
    _assert_per_tensor(monitor.history()["per_parameter"][-1], grads, norm_type, 1e-5)
    assert monitor.exploding() == [], monitor.exploding()


def test_compiled_call_keeps_the_overflowed_inf():
    """The documented exception: a compiled call makes no host decision, so it returns the
    overflowed norm as inf (as torch does), where eager takes it again."""
    grads = _grads([[1e20] * 3], torch.float32)
    compiled = torch.compile(lambda gs: fusedclip.get_total_norm(gs), fullgraph=True, backend="eager")
    assert float(compiled(grads)) == math.inf
    assert math.isclose(float(fusedclip.get_total_norm(grads)), 1e20 * math.sqrt(3), rel_tol=1e-6)
