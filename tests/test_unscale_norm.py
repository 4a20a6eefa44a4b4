"""The operator fusedclip::multi_tensor_unscale_norm (for GradScaler): opcheck, the statistic of
x * inv_scale against a float64 oracle, and found_inf against torch's unscale_ check."""

from __future__ import annotations

import math

import pytest
import torch

from fusedclip import _backends, _ops
from helpers import CPU_BACKENDS, make_grads, norm_id, oracle_statistic

ops = torch.ops.fusedclip

SHAPES = [(33,), (0,), (4, 257), (1,), (70001,), (5, 6, 7)]
NORM_TYPES = (1.0, 2.0, 3.5, math.inf, -math.inf, 0.0)


def _unscaled_like_torch(grads, inv_scale):
    """The grads torch's unscale_ leaves (x * inv_scale, rounded to the product dtype)."""
    out = []
    for g in grads:
        copy = g.clone().float() if g.dtype in (torch.float16, torch.bfloat16) else g.clone()
        torch._amp_foreach_non_finite_check_and_unscale_([copy], torch.zeros(()), inv_scale)
        out.append(copy)
    return out


def _oracle_statistic(grads, norm_type) -> float:
    stats = [oracle_statistic(g, norm_type) for g in grads]
    if norm_type == math.inf:
        return max(stats)
    if norm_type == -math.inf:
        return min(stats)
    return sum(stats)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_opcheck(dtype):
    grads = make_grads(SHAPES, dtype, seed=70, scale=512.0)
    torch.library.opcheck(ops.multi_tensor_unscale_norm.default, (grads, torch.tensor(2.0**-9), 2.0))
    torch.library.opcheck(ops.multi_tensor_unscale_norm.default, (grads, torch.tensor(2.0**-9), math.inf))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("norm_type", NORM_TYPES, ids=norm_id)
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.float64, 1e-10), (torch.bfloat16, 1e-5)])
def test_statistic_of_unscaled(backend, norm_type, dtype, rtol):
    grads = make_grads(SHAPES, dtype, seed=71, scale=3000.0)
    inv_scale = torch.tensor(1 / 3000.0)  # not a power of two: the product rounds
    statistic, found_inf = _ops.multi_tensor_unscale_norm(backend, grads, inv_scale, norm_type)
    expected = _oracle_statistic(_unscaled_like_torch(grads, inv_scale), norm_type)
    rtol = rtol if norm_type in (1.0, 2.0, 0.0) or math.isinf(norm_type) else max(rtol, 1e-4)
    assert statistic.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert math.isclose(float(statistic), expected, rel_tol=rtol)
    assert found_inf.dtype == torch.float32 and found_inf.shape == () and float(found_inf) == 0.0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("where", [(0, 0), (2, 5), (2, 1027), (4, 0), (4, 70000), (5, 209)],
                         ids=lambda w: f"t{w[0]}-i{w[1]}")
def test_found_inf_is_exact(backend, bad, dtype, where):
    """One non-finite element anywhere (vector body or scalar tail) sets found_inf, as torch does."""
    grads = make_grads(SHAPES, dtype, seed=72)
    tensor, index = where
    grads[tensor].view(-1)[index] = bad
    statistic, found_inf = _ops.multi_tensor_unscale_norm(backend, grads, torch.tensor(0.5), 2.0)
    assert float(found_inf) == 1.0
    assert not math.isfinite(float(statistic))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_finite_values_whose_product_overflows_are_not_found(backend):
    """torch checks x itself: a finite x times an inv_scale above 1 may overflow, but is finite."""
    grads = [torch.full((100,), 3e38), torch.randn(7)]
    found_torch = torch.zeros(())
    torch._amp_foreach_non_finite_check_and_unscale_([g.clone() for g in grads], found_torch, torch.tensor(4.0))
    _, found_inf = _ops.multi_tensor_unscale_norm(backend, grads, torch.tensor(4.0), 2.0)
    assert float(found_inf) == float(found_torch) == 0.0


def test_reads_only():
    grads = make_grads(SHAPES, torch.float32, seed=73)
    before = [g.clone() for g in grads]
    versions = [g._version for g in grads]
    ops.multi_tensor_unscale_norm(grads, torch.tensor(0.25), 2.0)
    assert all(torch.equal(a, b) for a, b in zip(grads, before))
    assert [g._version for g in grads] == versions


def test_bad_inv_scale_raises():
    with pytest.raises(ValueError, match="inv_scale must be a one-element float tensor"):
        ops.multi_tensor_unscale_norm([torch.randn(3)], torch.ones(2), 2.0)
    with pytest.raises(TypeError, match="inv_scale must be a one-element float tensor"):
        ops.multi_tensor_unscale_norm([torch.randn(3)], torch.tensor(1), 2.0)
    with pytest.raises(ValueError, match="norm_type must not be nan"):
        ops.multi_tensor_unscale_norm([torch.randn(3)], torch.tensor(1.0), math.nan)
