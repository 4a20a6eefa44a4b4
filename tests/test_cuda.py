"""CUDA tests: skipped cleanly without a GPU (the `cuda` marker; CUDA is queried only at test
setup, see conftest.py, never at import)."""

from __future__ import annotations

import math

import pytest
import torch

import fusedclip
from conftest import (
    FLOAT_DTYPES,
    assert_bitwise_equal,
    assert_norm_close,
    assert_scaled_like_oracle,
    clone_all,
    expected_dtype,
    make_grads,
    norm_id,
    norm_rtol,
    oracle_norm,
    params_with,
)

pytestmark = pytest.mark.cuda

SHAPES = [(37,), (0,), (8, 129), (70001,), (1,)]


def _cuda(grads):
    return [g.to("cuda") for g in grads]


@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.5, math.inf, -math.inf, 0.0], ids=norm_id)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_cuda_norm_and_clip_match_oracle(backend, dtype, norm_type):
    grads = _cuda(make_grads(SHAPES, dtype, seed=80))
    originals = clone_all(grads)
    truth = oracle_norm([g.cpu() for g in originals], norm_type)
    tol = norm_rtol(1e-5, norm_type, dtype)
    total = fusedclip.clip_grad_norm_(params_with(grads), 0.5 * truth, norm_type, backend=backend)
    assert total.device == grads[0].device and total.dtype == expected_dtype([dtype])
    assert_norm_close(total.cpu(), truth, tol)
    assert_scaled_like_oracle([g.cpu() for g in grads], [g.cpu() for g in originals], truth,
                              0.5 * truth, tol)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_cuda_no_clip_writes_nothing(backend):
    grads = _cuda(make_grads(SHAPES, torch.bfloat16, seed=81))
    originals = clone_all(grads)
    fusedclip.clip_grad_norm_(params_with(grads), 1e9, backend=backend)
    assert_bitwise_equal([g.cpu() for g in grads], [g.cpu() for g in originals])


def test_cuda_clip_grad_norm_is_sync_free():
    grads = _cuda(make_grads(SHAPES, torch.float32, seed=82))
    params = params_with(grads)
    fusedclip.clip_grad_norm_(params, 0.1)  # warm-up outside the check
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fusedclip.clip_grad_norm_(params, 0.1)
        fusedclip.clip_grads_with_norm_(params, 0.1, fusedclip.get_total_norm(grads))
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def test_mixed_cpu_and_cuda_result_on_first_device():
    cpu = make_grads([(300,), (0,)], torch.float32, seed=83)
    gpu = _cuda(make_grads([(70,), (5, 5)], torch.float32, seed=84))
    truth = oracle_norm(cpu + [g.cpu() for g in gpu], 2.0)
    for grads in (cpu + gpu, gpu + cpu):
        total = fusedclip.get_total_norm(grads)
        assert total.device == grads[0].device
        assert_norm_close(total.cpu(), truth, 1e-5)
    originals = clone_all(gpu + cpu)
    total = fusedclip.clip_grad_norm_(params_with(gpu + cpu), 0.5 * truth)
    assert total.device == gpu[0].device
    assert_scaled_like_oracle([g.cpu() for g in gpu + cpu], [g.cpu() for g in originals], truth,
                              0.5 * truth, 1e-5)


def test_cpu_backend_refuses_cuda_tensors():
    grads = _cuda(make_grads([(10,)], torch.float32, seed=85))
    with pytest.raises(ValueError, match="backend 'cpu' runs CPU tensors only"):
        fusedclip.clip_grad_norm_(params_with(grads), 1.0, backend="cpu")
