"""The one route of the public API: the grads are read in Python, and a list of plain tensors goes
to one operator call on the first grad's device (fusedclip._core.run_as_one_group), which checks
every tensor before writing; what it refuses or does not take goes to the general path, which
groups by device and names what it refuses. Backend "triton"'s operators take the same route.

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
from fusedclip import _backends, _core, _ops

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


# --- what the one-group route takes -----------------------------------------------------------------


def test_grads_of_reads_the_defined_grads_in_order():
    grads = [torch.randn(3), torch.randn(2, 2, dtype=torch.float64), torch.randn(4).to(torch.bfloat16)]
    params = params_of(grads)
    params.insert(1, torch.nn.Parameter(torch.randn(5)))  # no grad: skipped
    collected = _core.grads_of(params)
    assert len(collected) == 3 and all(c is g for c, g in zip(collected, grads))
    with pytest.raises(TypeError, match=r"parameters\[1\] must be a torch.Tensor"):
        _core.grads_of([params[0], object()])


@pytest.fixture(params=["native", "python"])
def readers(request, monkeypatch):
    """grads_of and plain_tensors as fusedclip._C runs them, and as Python runs them (without the
    native library, and under torch.compile): both must give the same answers."""
    if request.param == "python":
        monkeypatch.setattr(_backends, "_C", None)
    return request.param


class _GradProperty(torch.Tensor):
    """A tensor subclass whose .grad is a Python property that empties the list being read."""

    victims: list = []

    @property
    def grad(self):
        _GradProperty.victims.clear()
        return torch.ones(2)


def test_grads_of_reads_as_python_reads(readers):
    grads = [torch.randn(3), torch.randn(2).to(torch.bfloat16)]
    params = params_of(grads)
    params.insert(0, torch.nn.Parameter(torch.randn(5)))  # no grad: skipped
    params.append(torch.randn(4))  # a plain tensor without grad
    collected = _core.grads_of(params)
    assert len(collected) == 2 and all(c is g for c, g in zip(collected, grads))
    assert _core.grads_of([]) == []
    assert _core.grads_of([torch.nn.Parameter(torch.randn(1))]) == []
    # A non-leaf tensor's .grad warns, once per read, as torch's attribute does.
    non_leaf = torch.randn(3, requires_grad=True) * 2
    with pytest.warns(UserWarning, match="not a leaf Tensor"):
        assert _core.grads_of([non_leaf]) == []
    with pytest.raises(TypeError, match=r"parameters\[2\] must be a torch.Tensor, got str"):
        _core.grads_of([params[1], params[2], "w"])
    # An instance __dict__ entry does not shadow torch's grad (a data descriptor), in C or Python.
    shadowed = params_of([torch.randn(2)])[0]
    shadowed.__dict__["grad"] = "not the grad"
    assert _core.grads_of([shadowed])[0] is shadowed.grad
    # A .grad that runs Python and changes the list under the read.
    victims = [torch.randn(2).as_subclass(_GradProperty) for _ in range(4)]
    _GradProperty.victims = victims
    collected = _core.grads_of(victims)
    assert len(collected) == 1 and torch.equal(collected[0], torch.ones(2))


def test_plain_tensors_as_python_asks(readers):
    plain = [torch.randn(3), torch.nn.Parameter(torch.randn(2))]
    with torch.inference_mode():
        frozen = torch.randn(3)
    subclass = torch.randn(3).as_subclass(_GradProperty)
    assert _core.plain_tensors(plain, writable=True)
    assert _core.plain_tensors([], writable=True)
    assert not _core.plain_tensors(plain + [subclass], writable=False)
    assert _core.plain_tensors(plain + [frozen], writable=False)  # read, not written
    assert not _core.plain_tensors(plain + [frozen], writable=True)
    assert not _core.plain_tensors([frozen] + plain, writable=True)


def test_one_group_is_the_list_itself_on_the_first_grads_device():
    grads = [torch.randn(3), torch.randn(4, dtype=torch.float64)]
    device, backend, group = _core.one_group(grads, None, "auto", writes=True)
    assert device.type == "cpu" and backend == "cpu" and group is grads
    with pytest.raises(RuntimeError, match="foreach=True was passed"):
        _core.one_group([torch.randn(3, device="meta")], True, "auto", writes=True)


@pytest.mark.parametrize("case", ["subclass", "inference", "backend torch", "no grads"])
def test_what_it_does_not_take(case):
    """Each is left to the general path (None): a subclass (a group of its own), an inference
    tensor to write (the stable ABI cannot ask), backend "torch" (whose kernels do not check)."""
    backend = "auto"
    if case == "subclass":  # a subclass that dispatches to Python, as DTensor does
        from torch.testing._internal.two_tensor import TwoTensor

        grads = [torch.randn(3), TwoTensor(torch.randn(3), torch.randn(3))]
    elif case == "inference":
        with torch.inference_mode():
            grads = [torch.randn(3)]
        assert _core.one_group(grads, None, backend, writes=False) is not None  # read: fine
    elif case == "backend torch":
        grads, backend = [torch.randn(3)], "torch"
    else:
        grads = []
    assert _core.one_group(grads, None, backend, writes=True) is None


@pytest.mark.parametrize("case", ["two devices", "conjugated", "negated", "expanded", "int grad", "sparse"])
def test_what_the_operators_refuse_goes_to_the_general_path(case):
    """The operator refuses before writing (a TypeError or ValueError from its checks, the
    dispatcher's refusal of a lazily conjugated tensor in a list to write, or no kernel for a
    sparse tensor): run_as_one_group returns None and nothing is written."""
    grads = [torch.randn(5)]
    if case == "two devices":
        grads.append(torch.randn(3, device="meta"))
    elif case == "conjugated":
        grads.append(torch.randn(3, dtype=torch.complex64).conj())
    elif case == "negated":
        grads.append(torch._neg_view(torch.randn(3)))
    elif case == "expanded":
        grads.append(torch.randn(1).expand(4))
    elif case == "int grad":
        grads.append(torch.ones(3, dtype=torch.int32))
    else:
        grads.append(torch.randn(3).to_sparse())
    before = grads[0].clone()
    version = grads[0]._version
    result = _core.run_as_one_group(grads, None, "auto", True,
                                    lambda group: _ops.run("multi_tensor_scale_", group[1], group[2], torch.tensor(0.5)))
    assert result is None
    assert torch.equal(grads[0], before) and grads[0]._version == version


def test_public_calls_make_one_operator_call_and_never_the_general_path(monkeypatch):
    grads = [torch.randn(50 + i) for i in range(40)] + [torch.randn(7, dtype=torch.float64)]
    expected = [g.clone() for g in grads]
    params = params_of(grads)
    monkeypatch.setattr(_core, "group_by_device", lambda *a, **k: pytest.fail("the general path ran"))
    total = fusedclip.clip_grad_norm_(params, 1.0)
    reference = torch.nn.utils.clip_grad_norm_(params_of(expected), 1.0)
    torch.testing.assert_close(total.double(), reference.double())
    torch.testing.assert_close(grads, expected)
    fusedclip.clip_grad_value_(params, 0.01)
    assert max(float(g.abs().max()) for g in grads) <= 0.01
    fusedclip.clip_grads_with_norm_(params, 0.001, torch.tensor(0.1))
    fusedclip.get_total_norm(grads)
    fusedclip.get_norms(grads)
    fusedclip.clip_grad_norm_with_norms_(params, 0.1)


# --- version counters: what a native kernel wrote, bumped by fusedclip.operators.call ---------------


def test_versions_are_bumped_exactly_for_what_the_cpu_kernels_wrote():
    grads = [torch.randn(40) for _ in range(3)]
    versions = [g._version for g in grads]
    _ops.run("clip_grad_norm_", "cpu", grads, 1e9, 2.0)  # the coefficient is 1: nothing written
    _ops.run("multi_tensor_scale_", "cpu", grads, torch.tensor(1.0))
    assert [g._version for g in grads] == versions
    _ops.run("clip_grad_norm_", "cpu", grads, 1e-3, 2.0)
    assert [g._version for g in grads] == [v + 1 for v in versions]
    _ops.run("multi_tensor_scale_per_tensor_", "cpu", grads, torch.tensor([1.0, 0.5, 2.0]))
    assert [g._version for g in grads] == [versions[0] + 1, versions[1] + 2, versions[2] + 1]
    _ops.run("multi_tensor_clamp_", "cpu", grads, -1.0, 1.0)
    assert [g._version for g in grads] == [versions[0] + 2, versions[1] + 3, versions[2] + 2]


def test_without_host_decisions_every_tensor_a_call_may_write_is_bumped(monkeypatch):
    """As on a GPU, whose kernels decide on the device: every tensor is bumped."""
    monkeypatch.setattr(fusedclip.operators, "DECIDE_WRITES_ON_HOST", False)
    grads = [torch.randn(40) for _ in range(3)]
    versions = [g._version for g in grads]
    _ops.run("clip_grad_norm_", "cpu", grads, 1e9, 2.0)
    assert [g._version for g in grads] == [v + 1 for v in versions]


# --- backend "triton" through the one-group route ------------------------------------------------------


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
    operator call for the grads, never the general path's Python loop; the results are torch's."""
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
def test_triton_operators_run_through_torch_ops():
    grads = [torch.randn(30) for _ in range(5)]
    with OpLog() as log:
        _ops.run("clip_grad_norm_", "triton", grads, 1.0, 2.0)
    assert "fusedclip_triton.clip_grad_norm_.default" in log.ops
    versions = [g._version for g in grads]
    _ops.run("multi_tensor_scale_", "triton", grads, torch.tensor(0.5))
    assert [g._version for g in grads] == [v + 1 for v in versions]


@pytest.mark.triton_interpreter
@pytest.mark.skipif(not INTERPRETED, reason=_IN_SUBPROCESS)
def test_triton_refusals_leave_the_general_path_to_explain():
    """A grad the operator refuses goes the general path, which names it."""
    grads = [torch.randn(4), torch.randn(1).expand(3)]
    params = params_of(grads)
    before = [g.clone() for g in grads]
    with pytest.raises(ValueError, match="gradient 1 has internally overlapping memory"):
        fusedclip.clip_grad_norm_(params, 1e-3, backend="triton")
    torch.testing.assert_close(grads, before)


# --- the general path's grouping --------------------------------------------------------------------


def test_group_by_device_names_what_it_refuses_and_groups_devices():
    with pytest.raises(ValueError, match="gradient 1 has internally overlapping memory"):
        _core.group_by_device([torch.randn(3), torch.randn(1).expand(3)], None, "auto", writes=True)
    mixed = _core.group_by_device([torch.randn(3), torch.randn(3, device="meta")], None, "auto", writes=True)
    assert [d.type for d, _, _ in mixed] == ["cpu", "meta"]


# --- the operators through the dispatcher -----------------------------------------------------------


def test_cpu_operators_go_through_torch_ops():
    grads = [torch.randn(10) for _ in range(3)]
    with OpLog() as log:
        _ops.run("multi_tensor_scale_", "cpu", grads, torch.tensor(0.5))
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
