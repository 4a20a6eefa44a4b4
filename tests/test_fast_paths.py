"""The fast paths of the public API: one C++ call collects and checks the grads of one device
(``fusedclip._C.grads_on_one_device``) and the backend's operator runs on them, without the
Python loop of the general path; backend "triton"'s operators run eagerly without the
dispatcher, through it under a dispatch mode.

The Triton cases run in Triton's interpreter (marker ``triton_interpreter``): in the
TRITON_INTERPRET=1 subprocess of tests/test_triton.py (test_interpreted_suite), skipped in the
plain run.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fusedclip
from fusedclip import _backends, _core

pytestmark = pytest.mark.skipif(_backends._C is None, reason="fusedclip._C is not built")

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
_IN_SUBPROCESS = "runs in the TRITON_INTERPRET=1 subprocess of test_triton.py::test_interpreted_suite"


def params_of(grads):
    params = []
    for g in grads:
        p = torch.nn.Parameter(torch.empty(g.shape, dtype=g.dtype, device=g.device))
        p.grad = g
        params.append(p)
    return params


def collect(params, writes=True, real_only=False):
    return _backends._C.grads_on_one_device(params, writes, real_only)


# --- the C++ collection ---------------------------------------------------------------------------


def test_collects_the_defined_grads_in_order():
    grads = [torch.randn(3), torch.randn(2, 2, dtype=torch.float64), torch.randn(4).to(torch.bfloat16)]
    params = params_of(grads)
    params.insert(1, torch.nn.Parameter(torch.randn(5)))  # no grad: skipped
    collected = collect(params)
    assert len(collected) == 3 and all(c is g for c, g in zip(collected, grads))


@pytest.mark.parametrize("case", ["two devices", "subclass", "conjugated", "expanded", "inference",
                                  "int grad", "not a tensor", "complex, real only", "no grads"])
def test_what_it_does_not_take(case):
    """Each is left to the general path (None), which groups or says why."""
    real_only = False
    if case == "two devices":
        params = params_of([torch.randn(3), torch.randn(3, device="meta")])
    elif case == "subclass":  # a subclass that dispatches to Python, as DTensor does
        from torch.testing._internal.two_tensor import TwoTensor

        params = params_of([torch.randn(3)])
        params[0].grad = TwoTensor(torch.randn(3), torch.randn(3))
    elif case == "conjugated":
        params = params_of([torch.randn(3, dtype=torch.complex64).conj()])
    elif case == "expanded":
        params = params_of([torch.randn(1).expand(4)])
    elif case == "inference":
        with torch.inference_mode():
            g = torch.randn(3)
        params = params_of([g])
    elif case == "int grad":
        params = [torch.nn.Parameter(torch.randn(3))]
        params[0].grad = torch.randn(3)
        params[0].grad.data = torch.ones(3, dtype=torch.int32)
    elif case == "not a tensor":
        params = params_of([torch.randn(3)]) + [object()]
    elif case == "complex, real only":
        params, real_only = params_of([torch.randn(3, dtype=torch.complex64)]), True
    else:
        params = [torch.nn.Parameter(torch.randn(3))]
    if case == "int grad" and params[0].grad.dtype != torch.int32:
        pytest.skip("torch refuses an int grad on a float parameter")
    assert collect(params, writes=True, real_only=real_only) is None


def test_read_only_collection_takes_what_writes_may_not():
    params = params_of([torch.randn(1).expand(4)])
    assert collect(params, writes=True) is None
    assert len(collect(params, writes=False)) == 1


def test_one_device_group_resolves_the_backend_and_checks_foreach():
    params = params_of([torch.randn(3, device="meta")])
    device, backend, grads = _core.one_device_group(params, None, "auto", writes=True)
    assert device.type == "meta" and backend == "torch" and len(grads) == 1
    with pytest.raises(RuntimeError, match="foreach=True was passed"):
        _core.one_device_group(params, True, "auto", writes=True)


def test_bump_versions():
    tensors = [torch.randn(2) for _ in range(3)]
    before = [t._version for t in tensors]
    _backends._C.bump_versions(tensors)
    assert [t._version for t in tensors] == [v + 1 for v in before]
    with pytest.raises(TypeError, match="item 1 is not a tensor"):
        _backends._C.bump_versions([tensors[0], 3])


# --- backend "triton" through the fast path ----------------------------------------------------------


class OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.triton_interpreter
@pytest.mark.skipif(not INTERPRETED, reason=_IN_SUBPROCESS)
def test_triton_public_calls_skip_the_python_checks(monkeypatch):
    """clip_grad_norm_, clip_grad_value_ and clip_grads_with_norm_ on backend "triton" make one
    C++ call for the grads, never the general path's Python loop; the results are torch's."""
    grads = [torch.randn(50 + i) for i in range(40)]
    expected = [g.clone() for g in grads]
    params = params_of(grads)

    def general_path(*args, **kwargs):
        raise AssertionError("the general path ran")

    monkeypatch.setattr(_core, "group_by_device", general_path)
    versions = [g._version for g in grads]
    total = fusedclip.clip_grad_norm_(params, 1.0, backend="triton")
    reference = torch.nn.utils.clip_grad_norm_(params_of(expected), 1.0)
    torch.testing.assert_close(total, reference)
    torch.testing.assert_close(grads, expected)
    assert all(g._version > v for g, v in zip(grads, versions))
    fusedclip.clip_grad_value_(params, 0.01, backend="triton")
    assert max(float(g.abs().max()) for g in grads) <= 0.01
    fusedclip.clip_grads_with_norm_(params, 0.001, torch.tensor(0.1), backend="triton")
    assert max(float(g.abs().max()) for g in grads) <= 0.01 * 0.001 / 0.1 * (1 + 1e-5)


@pytest.mark.triton_interpreter
@pytest.mark.skipif(not INTERPRETED, reason=_IN_SUBPROCESS)
def test_triton_operators_run_eagerly_and_through_torch_ops_under_a_mode():
    from fusedclip import _ops

    grads = [torch.randn(30) for _ in range(5)]
    with OpLog() as log:
        _ops.clip_grad_norm_("triton", grads, 1.0, 2.0)
    assert "fusedclip_triton.clip_grad_norm_.default" in log.ops
    versions = [g._version for g in grads]
    _ops.multi_tensor_scale_("triton", grads, torch.tensor(0.5))
    assert [g._version for g in grads] == [v + 1 for v in versions]


@pytest.mark.triton_interpreter
@pytest.mark.skipif(not INTERPRETED, reason=_IN_SUBPROCESS)
def test_triton_refusals_leave_the_general_path_to_explain():
    """A grad the C++ collection does not take goes the general path, which names it."""
    grads = [torch.randn(4), torch.randn(1).expand(3)]
    params = params_of(grads)
    before = [g.clone() for g in grads]
    with pytest.raises(ValueError, match="gradient 1 has internally overlapping memory"):
        fusedclip.clip_grad_norm_(params, 1e-3, backend="triton")
    torch.testing.assert_close(grads, before)


# --- the general path's grouping --------------------------------------------------------------------


def test_group_by_device_takes_one_device_in_one_call(monkeypatch):
    """Grads the operators take, on one device, are one group without the Python checks; the
    others get them (and their precise errors)."""
    grads = [torch.randn(3), torch.randn(4, dtype=torch.float64)]
    monkeypatch.setattr(_core, "check_writable", lambda i, g: pytest.fail("the Python checks ran"))
    [(device, backend, group)] = _core.group_by_device(grads, None, "auto", writes=True)
    assert device.type == "cpu" and backend in ("cpu", "torch") and group is grads
    monkeypatch.undo()
    with pytest.raises(ValueError, match="gradient 1 has internally overlapping memory"):
        _core.group_by_device([torch.randn(3), torch.randn(1).expand(3)], None, "auto", writes=True)
    mixed = _core.group_by_device([torch.randn(3), torch.randn(3, device="meta")], None, "auto", writes=True)
    assert [d.type for d, _, _ in mixed] == ["cpu", "meta"]


# --- the C++ operators called straight ------------------------------------------------------------


def test_cpu_operators_are_called_straight_in_eager_mode():
    """Eager calls of backend "cpu" go to fusedclip._C.direct (no Python argument parser, no
    autograd fallback); the results and version bumps are torch.ops.fusedclip's."""
    from fusedclip import _ops
    from fusedclip._eager import EagerOperator

    for name, row in _ops.KERNELS.items():
        if name != "monitor_update_":
            assert isinstance(row["cpu"], EagerOperator) and row["cpu"].eager is getattr(_backends._C.direct, name)
    grads = [torch.randn(40) * 3 for _ in range(4)] + [torch.randn(7, dtype=torch.float64)]
    twins = [g.clone() for g in grads]
    versions = [g._version for g in grads]
    total = _ops.clip_grad_norm_("cpu", grads, 1.0, 2.0)
    expected = torch.ops.fusedclip.clip_grad_norm_(twins, 1.0, 2.0)
    assert torch.equal(total, expected) and all(torch.equal(a, b) for a, b in zip(grads, twins))
    assert all(g._version > v for g, v in zip(grads, versions))
    statistic, per = _ops.multi_tensor_norm("cpu", grads, 3.0, True)
    expected_statistic, expected_per = torch.ops.fusedclip.multi_tensor_norm(grads, 3.0, True)
    assert torch.equal(statistic, expected_statistic) and torch.equal(per, expected_per)
    with pytest.raises(TypeError, match="item 1 of the list is not a tensor"):
        _ops.multi_tensor_norm("cpu", [grads[0], 1.0], 2.0)


def test_cpu_operators_go_through_torch_ops_under_a_dispatch_mode():
    from fusedclip import _ops

    grads = [torch.randn(10) for _ in range(3)]
    with OpLog() as log:
        _ops.multi_tensor_scale_("cpu", grads, torch.tensor(0.5))
    assert "fusedclip.multi_tensor_scale_.default" in log.ops


def test_reference_multiply_is_one_foreach_per_dtype():
    """amp's unscale factor on a device (reference.multiply_): one ATen op per coefficient
    dtype, not one per tensor, with the bits of a per-tensor mul_."""
    from fusedclip import reference

    grads = [torch.randn(20).to(dtype) for dtype in (torch.float16, torch.bfloat16, torch.float32) * 10]
    grads += [torch.randn(5, dtype=torch.float64), torch.randn(4, dtype=torch.complex64), torch.empty(0)]
    expected = [g.clone() for g in grads]
    coef = torch.tensor(0.3712345)
    for e in expected:
        if e.numel():
            real = torch.view_as_real(e) if e.is_complex() else e
            real.mul_(coef.to(torch.float64 if real.dtype == torch.float64 else torch.float32))
    with OpLog() as log:
        reference.multiply_(grads, coef)
    assert len([op for op in log.ops if "mul" in op]) <= 2, log.ops
    assert len(log.ops) < len(grads) / 4, log.ops
    assert all(torch.equal(g, e) for g, e in zip(grads, expected))
