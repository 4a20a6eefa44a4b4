"""A ``__torch_dispatch__`` tensor-subclass grad among plain grads, against torch.nn.utils.

torch's clipping runs a subclass grad tensor by tensor (no foreach), so each op reaches the
subclass's ``__torch_dispatch__`` with that grad alone, and an op whose other argument is a
subclass (the coefficient of a subclass norm) is the subclass's to run. TwoTensor
(torch.testing._internal.two_tensor), which runs every op once on each of its two components, is
the subclass here: its norm is TwoTensor(norm with a, norm with b), and a plain grad multiplied by
a TwoTensor coefficient is multiplied by both components, in torch too.

fusedclip's multi-tensor operators take a list: a subclass grad in a list with plain grads made
the subclass run the operator once per component on the whole list, so the fused norm-and-scale
clipped the plain grads twice with two coefficients. Each subclass grad now takes the general
path in a group of its own (fusedclip/_core.py group_by_device), so fusedclip gives torch's
results. DTensor, the subclass fusedclip reduces over its mesh, is tested in test_distributed.py.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing._internal.two_tensor import TwoTensor

import fusedclip
from helpers import make_grads, params_with, seeded

BACKENDS = ("auto", "cpu", "torch")
POSITIONS = ("first", "middle", "last")
# max_norm between the norms with the two components (component a does not clip, b does), and
# below both (two different coefficients)
MAX_NORMS = {"one_clips": 12.0, "both_clip": 0.5}
RTOL = 2e-6  # fusedclip's norms are float32-rounded sums in float64, torch's float32 reductions


def _two_tensor(seed: int) -> TwoTensor:
    gen = seeded(seed)
    a = torch.randn(5, 3, generator=gen)
    b = torch.randn(5, 3, generator=gen) * 8.0
    return TwoTensor(a, b)


def _grads(position: str, seed: int = 3) -> list[torch.Tensor]:
    """Plain float32 grads (norm about 5.5) with a TwoTensor grad (norms 3.7 and 30) inserted."""
    grads = make_grads([(40,), (6, 7), (11,)], torch.float32, seed=seed)
    index = {"first": 0, "middle": 2, "last": len(grads)}[position]
    grads.insert(index, _two_tensor(seed + 1))
    return grads


def _clone(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    return [TwoTensor(g.a.clone(), g.b.clone()) if isinstance(g, TwoTensor) else g.clone() for g in grads]


def _components(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (t.a, t.b) if isinstance(t, TwoTensor) else (t, t)


def _assert_like(actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL) -> None:
    """The same type (TwoTensor or plain) and, component by component, the same values."""
    assert type(actual) is type(expected), (type(actual), type(expected))
    for a, e in zip(_components(actual), _components(expected)):
        torch.testing.assert_close(a, e, rtol=rtol, atol=1e-7)


def _assert_all_like(actual: list[torch.Tensor], expected: list[torch.Tensor], rtol: float = RTOL) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        _assert_like(a, e, rtol)


def _per_tensor_norms(grads: list[torch.Tensor]) -> torch.Tensor:
    """What torch would give per tensor: its vector_norm of each, stacked."""
    return torch.stack([torch.linalg.vector_norm(g) for g in grads])


@pytest.mark.parametrize("case", MAX_NORMS)
@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_grad_norm_(backend, position, case):
    grads, expected = _grads(position), _grads(position)
    total_torch = torch.nn.utils.clip_grad_norm_(params_with(expected), MAX_NORMS[case])
    total = fusedclip.clip_grad_norm_(params_with(grads), MAX_NORMS[case], backend=backend)
    _assert_like(total, total_torch)
    _assert_all_like(grads, expected)


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_get_total_norm(backend, position):
    grads = _grads(position)
    originals = _clone(grads)
    _assert_like(fusedclip.get_total_norm(grads, backend=backend), torch.nn.utils.get_total_norm(grads))
    _assert_all_like(grads, originals, rtol=0)


@pytest.mark.parametrize("total_kind", ["plain", "two_tensor"])
@pytest.mark.parametrize("case", MAX_NORMS)
@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_grads_with_norm_(backend, position, case, total_kind):
    grads, expected = _grads(position), _grads(position)
    total = torch.nn.utils.get_total_norm(grads)  # a TwoTensor
    if total_kind == "plain":
        total = total.b.clone()
    torch.nn.utils.clip_grads_with_norm_(params_with(expected), MAX_NORMS[case], total)
    fusedclip.clip_grads_with_norm_(params_with(grads), MAX_NORMS[case], total, backend=backend)
    _assert_all_like(grads, expected)


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_grad_value_(backend, position):
    grads, expected = _grads(position), _grads(position)
    torch.nn.utils.clip_grad_value_(params_with(expected), 0.7)
    fusedclip.clip_grad_value_(params_with(grads), 0.7, backend=backend)
    _assert_all_like(grads, expected, rtol=0)
    # each grad clamped once, as torch clamps it (TwoTensor's own version counter aside)
    for g, e in zip(grads, expected):
        if not isinstance(g, TwoTensor):
            assert g._version == e._version


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_get_norms(backend, position):
    grads = _grads(position)
    originals = _clone(grads)
    total, per = fusedclip.get_norms(grads, backend=backend)
    _assert_like(total, torch.nn.utils.get_total_norm(originals))
    _assert_like(per, _per_tensor_norms(originals))
    _assert_all_like(grads, originals, rtol=0)


@pytest.mark.parametrize("case", MAX_NORMS)
@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_grad_norm_with_norms_(backend, position, case):
    grads, expected = _grads(position), _grads(position)
    per_torch = _per_tensor_norms(expected)
    params = params_with(grads)
    params.insert(1, torch.nn.Parameter(torch.randn(4)))  # a parameter without a grad: norm 0
    per_torch = torch.cat([per_torch[:1], torch.zeros(1), per_torch[1:]])
    total_torch = torch.nn.utils.clip_grad_norm_(params_with(expected), MAX_NORMS[case])
    total, per = fusedclip.clip_grad_norm_with_norms_(params, MAX_NORMS[case], backend=backend)
    _assert_like(total, total_torch)
    _assert_like(per, per_torch)
    _assert_all_like(grads, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_subclass_grads_only(backend):
    """Two TwoTensor grads and nothing else: each component clipped by its own coefficient."""
    grads = [_two_tensor(7), _two_tensor(8)]
    expected = _clone(grads)
    total_torch = torch.nn.utils.clip_grad_norm_(params_with(expected), 12.0)
    total = fusedclip.clip_grad_norm_(params_with(grads), 12.0, backend=backend)
    _assert_like(total, total_torch)
    _assert_all_like(grads, expected)
