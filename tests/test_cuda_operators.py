"""The CUDA kernels of multi_tensor_unscale_norm, multi_tensor_agc_, multi_tensor_scale_per_tensor_,
clip_grad_norm_with_norms_ and monitor_update_ (csrc/cuda/), and the per-tensor statistics, table
tiers and float64 general-p sums they share with the norm: against the CPU kernels (the same
numerics) and float64 oracles, bitwise run to run, without a host sync.

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
from helpers import ULP, assert_bitwise_equal, clone_all, make_grads, norm_id, oracle_statistic, rand_tensor, seeded
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


@pytest.mark.parametrize("norm_type", NORM_TYPES, ids=norm_id)
@pytest.mark.parametrize("dtype", DTYPES + [torch.complex64])
def test_unscale_norm_matches_cpu(dtype, norm_type):
    grads = make_grads(SHAPES, dtype, seed=220, scale=3000.0)
    inv_scale = torch.tensor(1 / 3000.0)
    want, want_found = ops.multi_tensor_unscale_norm(grads, inv_scale, norm_type)
    for scale in (inv_scale, inv_scale.cuda(), inv_scale.double().cuda()):
        got, found = ops.multi_tensor_unscale_norm(_cuda(grads), scale, norm_type)
        assert got.device.type == "cuda" and got.dtype == want.dtype and found.dtype == torch.float32
        _assert_values_close(got, want, _rtol(dtype, norm_type))
        assert float(found) == float(want_found) == 0.0


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("where", [(1, 0), (2, 5), (4, CHUNK), (6, 17 * CHUNK + 4), (7, 0)],
                         ids=lambda w: f"t{w[0]}-i{w[1]}")
def test_unscale_norm_found_inf(bad, dtype, where):
    grads = make_grads(SHAPES, dtype, seed=221)
    grads[where[0]].view(-1)[where[1]] = bad
    statistic, found = ops.multi_tensor_unscale_norm(_cuda(grads), torch.tensor(0.5, device="cuda"), 2.0)
    assert float(found) == 1.0 and not math.isfinite(float(statistic))


def test_unscale_norm_finite_overflow_is_not_found_and_reads_only():
    grads = _cuda([torch.full((100,), 3e38), torch.randn(7)])
    before, versions = clone_all(grads), [g._version for g in grads]
    statistic, found = ops.multi_tensor_unscale_norm(grads, torch.tensor(4.0, device="cuda"), 2.0)
    assert float(found) == 0.0 and float(statistic) == math.inf
    assert_bitwise_equal(grads, before)
    assert [g._version for g in grads] == versions


def test_unscale_norm_across_launches():
    """5000 tensors take four launches: the flag and the statistic of every launch are combined."""
    gen = seeded(222)
    grads = [rand_tensor((int(n),), torch.float16, gen) for n in torch.randint(0, 50, (5000,), generator=gen)]
    grads[4321] = rand_tensor((10,), torch.float16, gen)
    grads[4321][3] = math.inf
    want, want_found = ops.multi_tensor_unscale_norm(grads, torch.tensor(0.125), 1.0)
    got, found = ops.multi_tensor_unscale_norm(_cuda(grads), torch.tensor(0.125, device="cuda"), 1.0)
    assert float(found) == float(want_found)
    _assert_values_close(got, want, 1e-5)


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


# --- multi_tensor_scale_per_tensor_ -------------------------------------------------------------


@pytest.mark.parametrize("count", [5, 40, 300, 1600])
@pytest.mark.parametrize("dtype", DTYPES + [torch.complex64])
def test_scale_per_tensor_is_bitwise_the_reference(dtype, count):
    """Coefficients below 1, at 1, above 1 and nan; lists at every tier and past one table (the
    coefficient of tensor i of the second table is coefs[first_tensor + i])."""
    gen = seeded(240 + count)
    grads = [rand_tensor((int(n),), dtype, gen) for n in torch.randint(0, 3000, (count,), generator=gen)]
    grads[1] = rand_tensor((2 * CHUNK + 9,), dtype, gen)
    coefs = torch.rand(count, generator=gen, dtype=torch.float64) * 1.5
    coefs[::5] = 1.0
    coefs[3] = math.nan
    expected = [_scaled(g, c) if float(c) < 1.0 or math.isnan(float(c)) else g.clone()
                for g, c in zip(grads, coefs.float())]
    on_gpu = _cuda(grads)
    ops.multi_tensor_scale_per_tensor_(on_gpu, coefs.float().cuda())
    assert_bitwise_equal(_cpu(on_gpu), expected, any_nan=True)


def _scaled(g, coef):
    real = torch.view_as_real(g) if g.is_complex() else g
    acc = torch.float64 if real.dtype == torch.float64 else torch.float32
    out = (real.to(acc) * coef.to(acc)).to(real.dtype)
    return torch.view_as_complex(out) if g.is_complex() else out


def _aliased_grads(device, seed):
    """A gradient twice, a strided view of it, a transposed one: shared and non-dense memory."""
    gen = seeded(seed)
    base = rand_tensor((40, 6000), torch.float32, gen).to(device)
    other = rand_tensor((4100, 3), torch.float32, gen).to(device)
    return [base, base[:, ::2], other.t(), base], (base, other)


def test_scale_per_tensor_strided_coefs_shared_and_non_dense_grads():
    """Through shared memory in list order, as torch's per-tensor loop (and the CPU kernel)."""
    coefs = torch.tensor([0.5, 9.0, 0.25, 0.0, 0.75, 0.0, 0.125, 0.0])[::2]  # strided: 0.5, 0.25, 0.75, 0.125
    want_list, want = _aliased_grads("cpu", 250)
    ops.multi_tensor_scale_per_tensor_(want_list, coefs.contiguous())
    got_list, got = _aliased_grads("cuda", 250)
    ops.multi_tensor_scale_per_tensor_(got_list, coefs.cuda())
    assert_bitwise_equal(_cpu(got), list(want))


# --- multi_tensor_agc_ ----------------------------------------------------------------------------

# Rows of 1, 3, 33, 4096 (the longest a lane group clips), 4097 (a block per row), 2^16 + 1 (rows
# in pieces: a second launch), 1-D and 0-dim tensors, zero-size ones.
AGC_SHAPES = [(0,), (70000, 1), (500, 3), (40, 33), (20, 4096), (9, 4097), (3, CHUNK + 1), (200001,), (), (6, 0),
              (7, 5, 2)]


def _agc_case(dtype, param_dtypes=None, seed=260):
    """Gradients whose rows clip (10x the limit) or not (1e-3x), far from the boundary."""
    gen = seeded(seed)
    grads, params = [], []
    for i, shape in enumerate(AGC_SHAPES):
        w = torch.randn(shape, generator=gen, dtype=torch.float64)
        g = torch.randn(shape, generator=gen, dtype=torch.float64)
        if w.numel():
            rows = shape[0] if len(shape) > 1 else 1
            unit_dims = tuple(range(1, len(shape))) if len(shape) > 1 else None
            limit = torch.linalg.vector_norm(w, dim=unit_dims).clamp(min=1e-3).reshape(-1) * 0.01
            norm = torch.linalg.vector_norm(g, dim=unit_dims).reshape(-1)
            target = torch.where(torch.rand(rows, generator=gen) < 0.5, 10.0, 1e-3).double() * limit
            g = g * (target / norm).reshape((rows,) + (1,) * (len(shape) - 1) if len(shape) > 1 else ())
        grads.append(g.to(dtype))
        params.append(w.to(param_dtypes[i % len(param_dtypes)] if param_dtypes else dtype))
    return grads, params


def _assert_agc_matches_cpu(grads, params, dtype):
    cpu_grads = clone_all(grads)
    want_total, want_per = ops.multi_tensor_agc_(cpu_grads, params, 0.01, 1e-3)
    gpu_grads = _cuda(grads)
    total, per = ops.multi_tensor_agc_(gpu_grads, _cuda(params), 0.01, 1e-3)
    assert total.dtype == want_total.dtype and per.dtype == want_per.dtype and per.shape == want_per.shape
    _assert_values_close(total, want_total, _rtol(dtype))
    _assert_values_close(per, want_per, _rtol(dtype))
    for i, (a, b) in enumerate(zip(_cpu(gpu_grads), cpu_grads)):
        torch.testing.assert_close(a.double(), b.double(), rtol=4 * ULP[dtype], atol=1e-30, msg=f"grad {i}")
    return gpu_grads


@pytest.mark.parametrize("dtype", DTYPES)
def test_agc_matches_cpu(dtype):
    grads, params = _agc_case(dtype)
    clipped = _assert_agc_matches_cpu(grads, params, dtype)
    assert not all(torch.equal(a, b) for a, b in zip(_cpu(clipped), grads))  # something clipped


def test_agc_parameter_dtypes_differ_from_the_gradients():
    grads, params = _agc_case(torch.bfloat16, [torch.float32, torch.float64, torch.float16, torch.bfloat16], seed=261)
    _assert_agc_matches_cpu(grads, params, torch.bfloat16)


def test_agc_deterministic_and_sync_free():
    grads, params = _agc_case(torch.float32, seed=262)
    runs = []
    for _ in range(2):
        copies, on_gpu = _cuda(grads), _cuda(params)
        with no_sync():
            total, per = ops.multi_tensor_agc_(copies, on_gpu, 0.01, 1e-3)
        runs.append([total, per] + copies)
    assert_bitwise_equal(runs[0], runs[1])


def test_agc_non_contiguous_and_shared_gradients():
    """Rows of non-contiguous gradients (row-major temporaries, written back) and gradients that
    share memory (clipped one at a time in list order), as the CPU kernel clips them."""
    gen = seeded(263)
    params = [rand_tensor(shape, torch.float32, gen) * 0.01 for shape in ((40, 6000), (40, 3000), (3, 4100), (40, 6000))]
    want_list, want = _aliased_grads("cpu", 264)
    want_total, want_per = ops.multi_tensor_agc_(want_list, params, 0.01, 1e-3)
    got_list, got = _aliased_grads("cuda", 264)
    total, per = ops.multi_tensor_agc_(got_list, _cuda(params), 0.01, 1e-3)
    _assert_values_close(total, want_total, 1e-5)
    _assert_values_close(per, want_per, 1e-5)
    for a, b in zip(_cpu(got), want):
        torch.testing.assert_close(a, b, rtol=4 * ULP[torch.float32], atol=1e-30)


def test_agc_many_tensors_past_one_table():
    gen = seeded(264)
    grads = [rand_tensor((int(r), 7), torch.float16, gen) for r in torch.randint(0, 20, (2000,), generator=gen)]
    params = [rand_tensor(g.shape, torch.float16, gen) * 0.05 for g in grads]
    _assert_agc_matches_cpu(grads, params, torch.float16)


# --- monitor_update_ ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("explode_threshold", [None, 50.0])
def test_monitor_update_is_bitwise_the_cpu_kernel(dtype, explode_threshold):
    size = 1031
    gen = seeded(270)
    cpu_state = [torch.zeros(size, dtype=dtype), torch.zeros(size, dtype=dtype)] + [
        torch.zeros(size, dtype=torch.int64) for _ in range(3)] + [torch.zeros(size, dtype=torch.bool) for _ in range(2)]
    gpu_state = _cuda(cpu_state)
    scale = torch.rand(size, generator=gen, dtype=torch.float64) * 10
    for step in range(60):
        norms = scale * (1 + 0.1 * torch.randn(size, generator=gen, dtype=torch.float64)).abs()
        kind = torch.randint(0, 40, (size,), generator=gen)
        norms[kind == 0] *= 1e3
        norms[kind == 1] = 0.0
        norms[kind == 2] = 1e-9
        norms[kind == 3] = math.nan
        norms[kind == 4] = math.inf
        norms[:3] = 0.0  # always vanishing
        norms = norms.to(dtype)
        settings = (0.97, 5, 2.7, explode_threshold, 1e-8, 3)
        ops.monitor_update_(norms, *cpu_state, *settings)
        with no_sync():
            ops.monitor_update_(norms.cuda(), *gpu_state, *settings)
    for a, b in zip(_cpu(gpu_state), cpu_state):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert int(cpu_state[4].sum()) > 0 and int(cpu_state[6].sum()) > 0


# --- every operator: opcheck, no sync, graph capture --------------------------------------------


def test_opcheck_on_cuda_tensors():
    grads, params = _agc_case(torch.float32, seed=280)
    grads, params = _cuda(grads[:5]), _cuda(params[:5])
    torch.library.opcheck(ops.multi_tensor_agc_.default, (grads, params, 0.01, 1e-3))
    torch.library.opcheck(ops.multi_tensor_scale_per_tensor_.default,
                          (grads, torch.tensor([0.5, 2.0, 0.1, 1.0, 0.3], device="cuda")))
    torch.library.opcheck(ops.clip_grad_norm_with_norms_.default, (grads, 0.1, 2.0))
    torch.library.opcheck(ops.multi_tensor_unscale_norm.default, (grads, torch.tensor(0.5, device="cuda"), 2.0))


def test_no_host_sync():
    grads = _cuda(make_grads(SHAPES, torch.float32, seed=281))
    params = _cuda(make_grads(SHAPES, torch.float32, seed=282))
    coefs = torch.rand(len(grads), device="cuda")
    inv_scale = torch.tensor(0.5, device="cuda")
    ops.clip_grad_norm_with_norms_(grads, 0.1, 2.0)  # warm-up outside the check
    with no_sync():
        ops.multi_tensor_unscale_norm(grads, inv_scale, 2.0)
        ops.multi_tensor_unscale_norm(grads, inv_scale, 3.5)
        ops.clip_grad_norm_with_norms_(grads, 0.1, 2.0)
        ops.multi_tensor_scale_per_tensor_(grads, coefs)
        ops.multi_tensor_agc_(grads, params, 0.01, 1e-3)


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
