"""Total norms (get_total_norm, clip_grad_norm_) against the float64 oracle, on every backend,
dtype and norm type, and the clipping that follows them. The two oracle tests take the
``backend`` fixture (cpu, torch, triton, cuda: conftest.py); the others run the CPU backends."""

from __future__ import annotations

import math

import pytest
import torch

import fusedclip
from helpers import (
    CPU_BACKENDS,
    DTYPE_RTOL,
    NORM_TYPES,
    assert_bitwise_equal,
    assert_norm_close,
    assert_scaled_like_oracle,
    clone_all,
    cpu,
    expected_dtype,
    make_grads,
    norm_id,
    norm_rtol,
    oracle_norm,
    params_with,
    same_bits,
    scaled_by_returned_norm,
)

# Odd sizes, a zero-size tensor in the middle, and one tensor longer than a CPU chunk (32K).
SHAPES = [(37,), (8, 129), (0,), (1,), (3, 0, 5), (70001,), (5, 7, 3)]


@pytest.mark.parametrize("norm_type", NORM_TYPES, ids=norm_id)
@pytest.mark.parametrize("dtype, rtol", DTYPE_RTOL)
def test_get_total_norm_matches_oracle(backend, dtype, rtol, norm_type):
    originals = make_grads(SHAPES, dtype, seed=1)
    grads = backend.on(originals)
    total = fusedclip.get_total_norm(grads, norm_type, backend=backend.name)
    assert isinstance(total, torch.Tensor) and total.dim() == 0
    assert total.dtype == expected_dtype([dtype]) and total.device == grads[0].device
    assert_norm_close(total.cpu(), oracle_norm(originals, norm_type), norm_rtol(rtol, norm_type, dtype))
    assert_bitwise_equal(cpu(grads), originals)  # a norm reads only


@pytest.mark.parametrize("norm_type", NORM_TYPES, ids=norm_id)
@pytest.mark.parametrize("dtype, rtol", DTYPE_RTOL)
def test_clip_grad_norm_matches_oracle(backend, dtype, rtol, norm_type):
    originals = make_grads(SHAPES, dtype, seed=2)
    grads = backend.on(originals)
    pointers = [g.data_ptr() for g in grads]
    params = params_with(grads)
    truth = oracle_norm(originals, norm_type)
    max_norm = 0.3 * truth  # clips
    total = fusedclip.clip_grad_norm_(params, max_norm, norm_type, backend=backend.name)
    tol = norm_rtol(rtol, norm_type, dtype)
    assert total.dim() == 0 and total.dtype == expected_dtype([dtype]) and total.device == grads[0].device
    assert_norm_close(total.cpu(), truth, tol)
    # in place: the same tensors, scaled by torch's coefficient of the returned norm, rounded once
    assert [p.grad.data_ptr() for p in params] == pointers
    assert all(p.grad is g for p, g in zip(params, grads))
    assert_bitwise_equal(cpu(grads), scaled_by_returned_norm(originals, total.cpu(), max_norm))
    assert_scaled_like_oracle(cpu(grads), originals, truth, max_norm, tol)


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, -math.inf, 3.5, "inf"], ids=norm_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_clip_grad_norm_agrees_with_torch(backend, dtype, norm_type):
    # no zero-size grads here: torch.nn.utils raises on them for +-inf (tested against the oracle)
    grads = make_grads([(50, 3), (1000,), (7,)], dtype, seed=3)
    ours, theirs = params_with(clone_all(grads)), params_with(clone_all(grads))
    n_ours = fusedclip.clip_grad_norm_(ours, 0.5, norm_type, backend=backend)
    n_theirs = torch.nn.utils.clip_grad_norm_(theirs, 0.5, norm_type)
    assert type(n_ours) is type(n_theirs)
    assert n_ours.dtype == n_theirs.dtype and n_ours.shape == n_theirs.shape
    assert n_ours.device == n_theirs.device
    rtol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(n_ours, n_theirs, rtol=rtol, atol=0)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=rtol, atol=1e-12)


@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.5, 0.5, math.inf, -math.inf, 0.0, -2.0], ids=norm_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_cpu_backend_is_bitwise_reproducible(dtype, norm_type):
    """Same bits run to run and whatever the thread count (chunking depends on sizes only)."""
    grads = make_grads([(70001,), (13,), (0,), (40000, 2), (999,)], dtype, seed=4)
    threads = torch.get_num_threads()
    results = []
    try:
        for n_threads in (threads, threads, 1, max(2, threads)):
            torch.set_num_threads(n_threads)
            params = params_with(clone_all(grads))
            total = fusedclip.clip_grad_norm_(params, 0.1, norm_type, backend="cpu")
            stat = fusedclip.get_total_norm(grads, norm_type, backend="cpu")
            results.append((total, stat, [p.grad for p in params]))
    finally:
        torch.set_num_threads(threads)
    first_total, first_stat, first_grads = results[0]
    for total, stat, scaled in results[1:]:
        assert same_bits(total, first_total) and same_bits(stat, first_total)
        assert_bitwise_equal(scaled, first_grads)


# --- the documented differences from torch ---------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fp16_norm_above_65504_is_finite_and_grads_are_clipped(backend):
    grads = [torch.full((100_000,), 300.0, dtype=torch.float16)]
    params = params_with(grads)
    total = fusedclip.clip_grad_norm_(params, 1.0, backend=backend)
    assert total.dtype == torch.float32 and torch.isfinite(total)
    assert float(total) == pytest.approx(300.0 * math.sqrt(100_000), rel=1e-5)  # ~94868.33
    scaled = params[0].grad
    assert torch.isfinite(scaled).all() and (scaled != 0).all()
    assert oracle_norm([scaled], 2.0) == pytest.approx(1.0, rel=2e-3)  # fp16 rounding of 300/94868


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_low_precision_norm_is_float32(backend, dtype):
    """torch returns the norm of bf16 grads in bf16 (7.0625 for 7.0711); fusedclip in float32."""
    grads = make_grads([(50,), (0,), (1,)], dtype, seed=5)
    total = fusedclip.get_total_norm(grads, backend=backend)
    assert total.dtype == torch.float32
    assert_norm_close(total, oracle_norm(grads, 2.0), 1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_norm_type_zero_counts_elements(backend):
    gen = torch.Generator().manual_seed(6)
    grads = []
    for n in (100, 0, 57, 1, 2000):
        g = torch.randn(n, generator=gen)
        g[torch.rand(n, generator=gen) < 0.4] = 0.0
        grads.append(g)
    grads.append(torch.tensor([float("nan"), 0.0]))  # nan != 0 is counted, as torch counts it
    total = fusedclip.get_total_norm(grads, 0, backend=backend)
    expected = sum(int(torch.count_nonzero(g)) for g in grads)
    assert float(total) == expected == oracle_norm(grads, 0)
    assert float(total) != len(grads)


# --- tensor counts and sizes ---------------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 110, 111, 771, 5000, 10_000])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_tensor_counts(backend, count):
    gen = torch.Generator().manual_seed(count)
    sizes = torch.randint(0, 40, (count,), generator=gen).tolist()
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    grads = make_grads([(n,) for n in sizes], [dtypes[i % 3] for i in range(count)], seed=count)
    originals = clone_all(grads)
    truth = oracle_norm(originals, 2.0)
    assert_norm_close(fusedclip.get_total_norm(grads, math.inf, backend=backend),
                      oracle_norm(grads, math.inf), 0)
    total = fusedclip.clip_grad_norm_(params_with(grads), 0.25 * truth, backend=backend)
    assert_norm_close(total, truth, 1e-5)
    assert_bitwise_equal(grads, scaled_by_returned_norm(originals, total, 0.25 * truth))


@pytest.mark.parametrize("numel", [0, 1, 1023, 65537, 2**20 + 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_tensor_sizes(backend, dtype, numel):
    grads = make_grads([(numel,), (5,)], dtype, seed=numel)
    originals = clone_all(grads)
    for norm_type in (2.0, 1.0, math.inf, -math.inf):
        assert_norm_close(fusedclip.get_total_norm(grads, norm_type, backend=backend),
                          oracle_norm(grads, norm_type), 1e-5)
    truth = oracle_norm(grads, 2.0)
    total = fusedclip.clip_grad_norm_(params_with(grads), 0.5 * truth, backend=backend)
    assert_norm_close(total, truth, 1e-5)
    assert_bitwise_equal(grads, scaled_by_returned_norm(originals, total, 0.5 * truth))
    assert_scaled_like_oracle(grads, originals, truth, 0.5 * truth, 1e-5)


# --- zero-size tensors --------------------------------------------------------------------------


ZERO_POSITIONS = {
    "start": [(0,), (300,), (17, 3), (1,)],
    "middle": [(300,), (0, 4), (17, 3), (0,), (1,)],
    "end": [(300,), (17, 3), (1,), (0,)],
    "everywhere": [(0,), (300,), (0, 0), (17, 3), (0,), (1,), (2, 0)],
    "long": [(0,), (40000,), (0,), (33000,), (0,)],  # empty tensors at chunk boundaries
}


@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.5, math.inf, -math.inf, 0.0, -2.0], ids=norm_id)
@pytest.mark.parametrize("where", sorted(ZERO_POSITIONS))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_zero_size_tensors(backend, where, norm_type):
    # torch.nn.utils raises for inf/-inf norms here; fusedclip must not
    grads = make_grads(ZERO_POSITIONS[where], torch.float32, seed=7)
    originals = clone_all(grads)
    truth = oracle_norm(grads, norm_type)
    tol = norm_rtol(1e-5, norm_type)
    assert_norm_close(fusedclip.get_total_norm(grads, norm_type, backend=backend), truth, tol)
    total = fusedclip.clip_grad_norm_(params_with(grads), 0.5 * truth, norm_type, backend=backend)
    assert_norm_close(total, truth, tol)
    assert_bitwise_equal(grads, scaled_by_returned_norm(originals, total, 0.5 * truth))


@pytest.mark.parametrize("norm_type", NORM_TYPES, ids=norm_id)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_all_empty_grads_give_zero(backend, norm_type):
    grads = [torch.empty(0), torch.empty(3, 0), torch.empty(0, dtype=torch.bfloat16)]
    total = fusedclip.get_total_norm(grads, norm_type, backend=backend)
    assert total.dtype == torch.float32 and float(total) == 0.0
    total = fusedclip.clip_grad_norm_(params_with(grads), 1.0, norm_type, backend=backend)
    assert float(total) == 0.0 and all(g.numel() == 0 for g in grads)


CONSTANT_CASES = {
    "fp32-0.7-x2**20": (torch.full((2**20 + 3,), 0.7), (1.0, 2.0, 3.5, 0.5, -2.0)),
    "bf16-0.7-x2**20": (torch.full((2**20 + 3,), 0.7, dtype=torch.bfloat16), (1.0, 2.0, 3.5, -2.0)),
    "fp16-300-x100000": (torch.full((100_000,), 300.0, dtype=torch.float16), (2.0, 3.5, 0.5)),
}


@pytest.mark.parametrize("case", sorted(CONSTANT_CASES))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_long_constant_tensors_accumulate_accurately(backend, case):
    """Equal values are the worst case of a float32 running sum (the error grows with its length);
    per-chunk partials must keep it near float32 rounding."""
    grad, norm_types = CONSTANT_CASES[case]
    for norm_type in norm_types:
        total = fusedclip.get_total_norm(grad, norm_type, backend=backend)
        # 1024 equal float32 additions per accumulator round the same way each time: ~1e-5
        assert_norm_close(total, oracle_norm([grad], norm_type), norm_rtol(3e-5, norm_type))


@pytest.mark.parametrize("norm_type", [-2.0, -0.5, -math.inf], ids=norm_id)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_negative_norm_types_with_an_exact_zero(backend, norm_type):
    """|0|^p is inf for p < 0, so the norm is 0, as torch.linalg.vector_norm says; then the
    coefficient is 1 and nothing is written."""
    grads = make_grads([(100,), (0,), (9,)], torch.float32, seed=8)
    grads[2][4] = 0.0
    originals = clone_all(grads)
    assert oracle_norm(grads, norm_type) == 0.0
    total = fusedclip.clip_grad_norm_(params_with(grads), 0.1, norm_type, backend=backend)
    assert float(total) == 0.0
    assert_bitwise_equal(grads, originals)
