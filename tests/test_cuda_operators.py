"""What the CUDA kernels of multi_tensor_unscale_norm, multi_tensor_agc_, multi_tensor_scale_per_tensor_,
clip_grad_norm_with_norms_ and monitor_update_ (csrc/cuda/) do alone: the per-tensor statistics,
table tiers and float64 general-p sums they share with the norm, huge tensors, the fused clip's
two launch paths, a CPU inv_scale, no host sync, graph capture. Their contracts (against the CPU
kernels and float64 oracles, on every backend) are in test_operator_contracts.py.

Called through torch.ops.fusedclip on CUDA tensors (the dispatcher picks the CUDA kernel whatever
fusedclip._ops.NATIVE_BACKENDS lists). Marker `cuda`: skipped without a GPU, or when fusedclip._C
was built without its CUDA kernels.

compute-sanitizer on a GPU machine:
  compute-sanitizer --tool memcheck  python -m pytest -q -p no:cacheprovider tests/test_cuda_operators.py -k "not huge"
  compute-sanitizer --tool racecheck python -m pytest -q -p no:cacheprovider tests/test_cuda_operators.py -k "not huge"
"""

from __future__ import annotations

import math

import pytest
import torch

from fusedclip import _backends
from helpers import ULP, assert_bitwise_equal, clone_all, make_grads, monitor_state, norm_id, oracle_statistic, rand_tensor, seeded
from test_cuda_backend import single_launch

ops = torch.ops.fusedclip
CUDA_BUILT = _backends._CUDA_ERROR is None

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not CUDA_BUILT, reason="fusedclip._C has no CUDA kernels")]

CHUNK = 1 << 16
# Zero-size tensors first, in the middle and last; sizes around a chunk; a tensor of 17 chunks
# (per-tensor statistics by a warp, not a thread).
SHAPES = [(0,), (33,), (4, 257), (CHUNK - 1,), (CHUNK + 1,), (2, 0, 3), (17 * CHUNK + 5,), (1,), (0,)]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
NORM_TYPES = (2.0, 1.0, 3.5, 0.5, math.inf, -math.inf, 0.0, -2.0)


def _cuda(tensors):
    return [t.to("cuda") for t in tensors]


def _cpu(tensors):
    return [t.cpu() for t in tensors]


def _rtol(dtype, norm_type=2.0):
    if dtype == torch.float64:
        return 1e-12
    return 1e-5 if norm_type in (0.0, 1.0, 2.0) or math.isinf(norm_type) else 1e-4


def _assert_values_close(actual, expected, rtol):
    """Element by element, nan where nan and inf where inf."""
    actual, expected = actual.cpu().double(), expected.cpu().double()
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=0, equal_nan=True)


class no_sync:
    """Within the block, a host-device sync raises (torch.cuda.set_sync_debug_mode)."""

    def __enter__(self):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode("default")


# --- per-tensor statistics, tiers, general p ---------------------------------------------------


@pytest.mark.parametrize("count", [1, 32, 33, 256, 257, 1532, 1533, 3100])
def test_per_tensor_statistics_at_every_tier(count):
    """Lists at and past each tier's capacity (32, 256, a full table of 1532), tensors of up to
    40 chunks among them: the per-tensor statistics of the parallel combine."""
    gen = seeded(200 + count)
    sizes = torch.randint(0, 3000, (count,), generator=gen)
    sizes[::7] = 0
    sizes[1::50] = 3 * CHUNK + 1
    sizes[count // 2] = 40 * CHUNK + 3
    grads = [rand_tensor((int(n),), torch.float32, gen) for n in sizes]
    for norm_type in (2.0, -math.inf):
        total, per = ops.multi_tensor_norm(_cuda(grads), norm_type, True)
        expected = torch.tensor([oracle_statistic(g, norm_type) for g in grads], dtype=torch.float64)
        _assert_values_close(per, expected, 1e-5)
        combined = float(expected.min()) if norm_type == -math.inf else float(expected.sum())
        assert float(total) == pytest.approx(combined, rel=1e-5)


def test_per_tensor_statistic_of_a_huge_embedding():
    """An embedding of 4,100 chunks (Llama-1B's is about 4,000): one warp combines its partials."""
    gen = seeded(210)
    embedding = rand_tensor((4100 * CHUNK,), torch.bfloat16, gen)
    small = [rand_tensor((n,), torch.bfloat16, gen) for n in (5, 0, 70000)]
    tensors = _cuda([small[0], embedding] + small[1:])
    total, per = ops.multi_tensor_norm(tensors, 2.0, True)
    expected = torch.tensor([oracle_statistic(t.cpu(), 2.0) for t in tensors], dtype=torch.float64)
    _assert_values_close(per, expected, 1e-5)
    again = ops.multi_tensor_norm(tensors, 2.0, True)
    assert_bitwise_equal([total, per], list(again))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_general_p_sums_in_float64(dtype):
    """65536 equal terms |x|^3.5: a float32 running sum would be off by about 1e-5; the float64
    sum, rounded once per chunk, is within an ulp of float32."""
    x = torch.full((CHUNK,), 1.1, dtype=dtype)
    statistic, _ = ops.multi_tensor_norm(_cuda([x]), 3.5, False)
    exact = CHUNK * abs(float(x[0])) ** 3.5
    assert abs(float(statistic) - exact) <= 2 * ULP[torch.float32] * exact


# --- multi_tensor_unscale_norm ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES + [torch.complex64])
def test_unscale_norm_takes_a_cpu_inv_scale(dtype):
    """The CUDA kernel also takes a CPU inv_scale (backend "triton" refuses one on another device)."""
    grads = make_grads(SHAPES, dtype, seed=220, scale=3000.0)
    inv_scale = torch.tensor(1 / 3000.0)
    want, want_found = ops.multi_tensor_unscale_norm(grads, inv_scale, 2.0)
    got, found = ops.multi_tensor_unscale_norm(_cuda(grads), inv_scale, 2.0)
    assert got.device.type == "cuda" and got.dtype == want.dtype and found.dtype == torch.float32
    _assert_values_close(got, want, _rtol(dtype))
    assert float(found) == float(want_found) == 0.0


# --- clip_grad_norm_with_norms_ ------------------------------------------------------------------


@pytest.mark.parametrize("single", [True, False], ids=["single-launch", "two-launches"])
@pytest.mark.parametrize("norm_type", NORM_TYPES, ids=norm_id)
@pytest.mark.parametrize("dtype", DTYPES)
def test_clip_with_norms_matches_cpu(dtype, norm_type, single):
    grads = make_grads(SHAPES, dtype, seed=230)
    on_cpu = clone_all(grads)
    want_total, want_norms = ops.clip_grad_norm_with_norms_(on_cpu, 0.3, norm_type)
    on_gpu = _cuda(grads)
    with single_launch(single):
        total, norms = ops.clip_grad_norm_with_norms_(on_gpu, 0.3, norm_type)
    rtol = _rtol(dtype, norm_type)
    _assert_values_close(total, want_total, rtol)
    _assert_values_close(norms, want_norms, rtol)
    assert float(norms[0]) == float(norms[5]) == 0.0  # no elements: norm 0 for every p
    for a, b in zip(_cpu(on_gpu), on_cpu):
        torch.testing.assert_close(a.double(), b.double(), rtol=max(rtol, 2 * ULP[dtype]), atol=1e-30)


@pytest.mark.parametrize("norm_type", (2.0, 3.5, math.inf), ids=norm_id)
def test_clip_with_norms_single_launch_equals_two_launches(norm_type):
    grads = _cuda(make_grads(SHAPES, torch.bfloat16, seed=231))
    results = []
    for single in (True, False):
        copies = clone_all(grads)
        with single_launch(single):
            total, norms = ops.clip_grad_norm_with_norms_(copies, 0.1, norm_type)
        results.append([total, norms] + copies)
    assert_bitwise_equal(results[0], results[1])


# --- every operator: no sync, graph capture (their contracts: test_operator_contracts.py) ------


def test_no_host_sync():
    grads = _cuda(make_grads(SHAPES, torch.float32, seed=281))
    params = _cuda(make_grads(SHAPES, torch.float32, seed=282))
    coefs = torch.rand(len(grads), device="cuda")
    inv_scale = torch.tensor(0.5, device="cuda")
    norms, state = torch.rand(len(grads), device="cuda"), monitor_state(len(grads), torch.float32, "cuda")
    ops.clip_grad_norm_with_norms_(grads, 0.1, 2.0)  # warm-up outside the check
    with no_sync():
        ops.multi_tensor_unscale_norm(grads, inv_scale, 2.0)
        ops.multi_tensor_unscale_norm(grads, inv_scale, 3.5)
        ops.clip_grad_norm_with_norms_(grads, 0.1, 2.0)
        ops.multi_tensor_scale_per_tensor_(grads, coefs)
        ops.multi_tensor_agc_(grads, params, 0.01, 1e-3)
        ops.monitor_update_(norms, *state, 0.97, 5, 2.7, 50.0, 1e-8, 3)


def test_graph_capture_and_replay():
    grads = _cuda(make_grads(SHAPES, torch.float32, seed=283))
    originals = clone_all(grads)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ops.clip_grad_norm_with_norms_(clone_all(grads), 0.1, 2.0)
    torch.cuda.current_stream().wait_stream(stream)
    inv_scale = torch.tensor(0.5, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        total, norms = ops.clip_grad_norm_with_norms_(grads, 0.1, 2.0)
        _, found = ops.multi_tensor_unscale_norm(grads, inv_scale, 2.0)
    for g, o in zip(grads, originals):
        g.copy_(o)
    graph.replay()
    want_total, want_norms = ops.clip_grad_norm_with_norms_(_cpu(originals), 0.1, 2.0)
    _assert_values_close(total, want_total, 1e-5)
    _assert_values_close(norms, want_norms, 1e-5)
    assert float(found) == 0.0
