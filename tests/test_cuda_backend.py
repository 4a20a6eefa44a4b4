"""Backend "cuda": the CUDA kernels of csrc/cuda/ on CUDA tensors (marker `cuda`: skipped without a
GPU, or when fusedclip._C was built without its CUDA kernels), and, everywhere, how the backend is
chosen and refused.

The same oracle as the CPU suite: float64 norms of the concatenated grads, bitwise scaled grads
given the returned norm, poisoned memory around every tensor. Also: no host sync
(set_sync_debug_mode("error")), CUDA-graph capture and replay, tables past one launch's capacity,
and the single-launch clip against the two-launch path, bit for bit.

compute-sanitizer on the small cases (run on a GPU machine):
  compute-sanitizer --tool memcheck  python -m pytest -q -p no:cacheprovider tests/test_cuda_backend.py -k "not many and not graph"
  compute-sanitizer --tool racecheck python -m pytest -q -p no:cacheprovider tests/test_cuda_backend.py -k "not many and not graph"
"""

from __future__ import annotations

import math

import pytest
import torch

import fusedclip
from fusedclip import _backends, _ops
from conftest import (
    assert_bitwise_equal,
    assert_norm_close,
    assert_scaled_like_oracle,
    clone_all,
    expected_dtype,
    make_grads,
    norm_id,
    norm_rtol,
    oracle_norm,
    oracle_statistic,
    params_with,
    rand_tensor,
    scaled_by_coef,
    scaled_by_returned_norm,
    seeded,
)

ops = torch.ops.fusedclip
CUDA_BUILT = _backends._CUDA_ERROR is None

SHAPES = [(33,), (0,), (4, 257), (1,), (70001,), (2, 0, 3), (5, 6, 7), (131075,)]
STAT_NORM_TYPES = (1.0, 2.0, 3.5, 0.5, math.inf, -math.inf, 0.0, -2.0)
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


# --- on a GPU ------------------------------------------------------------------------------------

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not CUDA_BUILT, reason="fusedclip._C has no CUDA kernels")]


def _cuda(tensors):
    return [t.to("cuda") for t in tensors]


def _cpu(tensors):
    return [t.cpu() for t in tensors]


class single_launch:
    """Within the block, the fused clip uses the single launch for every size (True) or never."""

    def __init__(self, enabled: bool):
        self.limit = 2**62 if enabled else 0

    def __enter__(self):
        self.previous = _backends._C.cuda_single_launch_max_bytes()
        _backends._C.set_cuda_single_launch_max_bytes(self.limit)

    def __exit__(self, *exc):
        _backends._C.set_cuda_single_launch_max_bytes(self.previous)


def test_kernels_run_on_this_gpu_and_auto_takes_them():
    assert _backends._C.cuda_kernels_run_on(torch.cuda.current_device())
    assert _backends.resolve_backend("auto", torch.device("cuda")) == "cuda"


@pytest.mark.parametrize("norm_type", STAT_NORM_TYPES, ids=norm_id)
@pytest.mark.parametrize("dtype", DTYPES + [torch.complex64])
def test_statistics_total_and_per_tensor(dtype, norm_type):
    grads = make_grads(SHAPES, dtype, seed=145)
    grads[0][::5] = 0
    originals = clone_all(grads)
    grads = _cuda(grads)
    total, per = _ops.multi_tensor_norm("cuda", grads, norm_type, per_tensor=True)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert total.dtype == per.dtype == acc and total.device == grads[0].device and per.shape == (len(grads),)
    rtol = 1e-12 if acc == torch.float64 else (1e-5 if norm_type in (0.0, 1.0, 2.0) else 1e-4)
    expected = [oracle_statistic(g, norm_type) for g in originals]
    for i, (value, want) in enumerate(zip(per.tolist(), expected)):
        assert value == pytest.approx(want, rel=rtol, abs=0), (i, value, want)
    combined = {math.inf: max, -math.inf: min}.get(norm_type, sum)(expected)
    assert float(total) == pytest.approx(combined, rel=rtol, abs=0)
    assert_bitwise_equal(_cpu(grads), originals)
    total2, per2 = _ops.multi_tensor_norm("cuda", grads, norm_type)
    assert per2.numel() == 0 and torch.equal(total2, total)


@pytest.mark.parametrize("count", [110, 1500, 5000])
def test_many_tensors_past_one_launch(count):
    # A launch's table holds about 1,500 tensors: 5000 take four launches.
    gen = seeded(147 + count)
    sizes = torch.randint(0, 60, (count,), generator=gen).tolist()
    grads = [rand_tensor((n,), torch.float32, gen) for n in sizes]
    for norm_type in (2.0, -math.inf, math.inf):
        total, per = _ops.multi_tensor_norm("cuda", _cuda(grads), norm_type, per_tensor=True)
        expected = torch.tensor([oracle_statistic(g, norm_type) for g in grads], dtype=torch.float64)
        torch.testing.assert_close(per.cpu().double(), expected, rtol=1e-5, atol=0)
    originals = clone_all(grads)
    on_device = _cuda(grads)
    truth = oracle_norm(originals, 2.0)
    total = _ops.clip_grad_norm_("cuda", on_device, 0.5 * truth, 2.0)
    assert float(total) == pytest.approx(truth, rel=1e-5)
    assert_bitwise_equal(_cpu(on_device), scaled_by_returned_norm(originals, total.cpu(), 0.5 * truth))


def test_nan_propagates_through_every_statistic():
    for norm_type in (2.0, 1.0, 3.5, math.inf, -math.inf):
        for position in (0, 31, 32, 40000, 70000):
            grads = make_grads([(70001,), (5,)], torch.float32, seed=148)
            grads[0][position] = float("nan")
            total, per = _ops.multi_tensor_norm("cuda", _cuda(grads), norm_type, per_tensor=True)
            assert total.isnan() and per[0].isnan() and not per[1].isnan(), (norm_type, position)


@pytest.mark.parametrize("dtype", DTYPES + [torch.complex64, torch.complex128])
def test_scale(dtype):
    originals = make_grads(SHAPES, dtype, seed=150)
    grads = _cuda(originals)
    for coef in (1.0, 1.5, math.inf):
        for where in ("cpu", "cuda"):
            _ops.multi_tensor_scale_("cuda", grads, torch.tensor(coef, device=where))
            assert_bitwise_equal(_cpu(grads), originals)
    for coef_dtype in (torch.float32, torch.float64, torch.bfloat16):
        grads = _cuda(originals)
        coef = torch.tensor(0.3721, dtype=coef_dtype)
        _ops.multi_tensor_scale_("cuda", grads, coef.cuda())
        assert_bitwise_equal(_cpu(grads), scaled_by_coef(originals, coef.double()))


def test_scale_nan_coef_writes_nan():
    grads = _cuda(make_grads([(40,), (0,), (3, 3)], torch.float32, seed=151))
    _ops.multi_tensor_scale_("cuda", grads, torch.tensor(float("nan"), device="cuda"))
    assert all(g.isnan().all() for g in grads)


@pytest.mark.parametrize("dtype", DTYPES)
def test_clamp(dtype):
    originals = make_grads(SHAPES, dtype, seed=152, scale=2.0)
    originals[4][::7] = float("nan")
    grads = _cuda(originals)
    _ops.multi_tensor_clamp_("cuda", grads, -0.25, 1.5)
    assert_bitwise_equal(_cpu(grads), [g.clone().clamp_(-0.25, 1.5) for g in originals], any_nan=True)


@pytest.mark.parametrize("single", [False, True], ids=["two-launch", "single-launch"])
@pytest.mark.parametrize("norm_type", STAT_NORM_TYPES, ids=norm_id)
def test_fused_clip(norm_type, single):
    originals = make_grads(SHAPES, [torch.float32, torch.bfloat16] * 4, seed=153)
    grads = _cuda(originals)
    truth = oracle_norm(originals, norm_type)
    with single_launch(single):
        total = _ops.clip_grad_norm_("cuda", grads, 0.5 * truth, norm_type)
    rtol = 1e-5 if norm_type in (0.0, 1.0, 2.0) or math.isinf(norm_type) else 1e-4
    assert total.dtype == torch.float32 and float(total) == pytest.approx(truth, rel=rtol)
    assert_bitwise_equal(_cpu(grads), scaled_by_returned_norm(originals, total.cpu(), 0.5 * truth))


@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.5, math.inf, 0.0], ids=norm_id)
@pytest.mark.parametrize("dtype", DTYPES)
def test_single_launch_equals_two_launches(dtype, norm_type):
    originals = make_grads([(3,), (70001,), (0,), (1 << 20,), (257, 3)], dtype, seed=154)
    results = []
    for single in (False, True):
        grads = _cuda(originals)
        with single_launch(single):
            total = _ops.clip_grad_norm_("cuda", grads, 0.01, norm_type)
        results.append((total.cpu(), _cpu(grads)))
    assert_bitwise_equal([results[0][0]], [results[1][0]])
    assert_bitwise_equal(results[0][1], results[1][1])
    for single in (False, True):  # no clipping: nothing written either way
        grads = _cuda(originals)
        with single_launch(single):
            _ops.clip_grad_norm_("cuda", grads, 1e30, norm_type)
        assert_bitwise_equal(_cpu(grads), originals)


@pytest.mark.parametrize("norm_type", [2.0, math.inf, 0.0], ids=norm_id)
@pytest.mark.parametrize("dtype", DTYPES)
def test_public_api_matches_oracle(dtype, norm_type):
    originals = make_grads(SHAPES, dtype, seed=155)
    grads = _cuda(originals)
    truth = oracle_norm(originals, norm_type)
    tol = norm_rtol(1e-5, norm_type, dtype)
    total = fusedclip.clip_grad_norm_(params_with(grads), 0.5 * truth, norm_type, backend="cuda")
    assert total.device == grads[0].device and total.dtype == expected_dtype([dtype])
    assert_norm_close(total.cpu(), truth, tol)
    assert_scaled_like_oracle(_cpu(grads), originals, truth, 0.5 * truth, tol)
    assert_norm_close(fusedclip.get_total_norm(_cuda(originals), norm_type, backend="cuda").cpu(), truth, tol)
    grads = _cuda(originals)
    fusedclip.clip_grad_value_(params_with(grads), 0.25, backend="cuda")  # exact in every dtype
    assert_bitwise_equal(_cpu(grads), [g.clone().clamp_(-0.25, 0.25) for g in originals])


def test_non_contiguous_complex_and_shared_grads():
    base = rand_tensor((64, 33), torch.float32, seeded(156))
    complex_grad = rand_tensor((17, 5), torch.complex64, seeded(157))
    shared = rand_tensor((300,), torch.float32, seeded(158))

    def grads_of(b, c, s):  # a transposed view, a strided view of the same memory, complex, s twice
        return [b.t(), b[:, ::2], c, s, s]

    truth = oracle_norm(grads_of(base, complex_grad, shared), 2.0)
    on_device = [base.cuda(), complex_grad.cuda(), shared.cuda()]
    total = _ops.clip_grad_norm_("cuda", grads_of(*on_device), 0.5 * truth, 2.0)
    assert float(total) == pytest.approx(truth, rel=1e-5)
    # torch's order: tensor by tensor, so shared bytes are scaled once per occurrence
    coef = ((total.cpu() + 1e-6).reciprocal() * (0.5 * truth)).clamp(max=1.0)
    expected = [base.clone(), complex_grad.clone(), shared.clone()]
    for g in grads_of(*expected):
        real = torch.view_as_real(g) if g.is_complex() else g
        real.copy_(real * coef)
    assert_bitwise_equal(_cpu(on_device), expected)


BOUNDARY_SIZES = [1, 7, 8, 9, 15, 16, 17, 31, 32, 33, 1023, 65535, 65536, 65537, 131073]


@pytest.mark.parametrize("dtype", DTYPES)
def test_no_access_outside_each_tensor(dtype):
    gap = 19
    total_len = sum(n + gap for n in BOUNDARY_SIZES) + gap
    buffer = torch.full((total_len,), float("nan"), dtype=dtype)
    gen = seeded(159)
    in_tensor = torch.zeros(total_len, dtype=torch.bool)
    views, offset = [], gap
    for n in BOUNDARY_SIZES:
        buffer[offset:offset + n] = rand_tensor((n,), dtype, gen, scale=3.0)
        in_tensor[offset:offset + n] = True
        views.append((offset, n))
        offset += n + gap
    device_buffer = buffer.cuda()
    tensors = [device_buffer[o:o + n] for o, n in views]
    originals = [buffer[o:o + n].clone() for o, n in views]
    for norm_type in (2.0, 1.0, 3.5, math.inf, -math.inf, 0.0):
        total, per = _ops.multi_tensor_norm("cuda", tensors, norm_type, per_tensor=True)
        assert not total.isnan() and not per.isnan().any(), norm_type
    _ops.multi_tensor_scale_("cuda", tensors, torch.tensor(0.43, device="cuda"))
    assert device_buffer.cpu()[~in_tensor].isnan().all(), "scale wrote outside a tensor"
    assert_bitwise_equal(_cpu(tensors), scaled_by_coef(originals, torch.tensor(0.43)))
    _ops.multi_tensor_clamp_("cuda", tensors, -0.5, 0.5)
    for single in (False, True):
        with single_launch(single):
            assert not _ops.clip_grad_norm_("cuda", tensors, 0.01, 2.0).isnan()
    assert device_buffer.cpu()[~in_tensor].isnan().all(), "a write landed outside a tensor"


def test_opcheck_on_cuda_tensors():
    grads = _cuda(make_grads(SHAPES[:5], [torch.float32, torch.bfloat16, torch.float32, torch.float16,
                                          torch.float64], seed=160))
    torch.library.opcheck(ops.multi_tensor_norm.default, (grads, 2.0, True))
    torch.library.opcheck(ops.multi_tensor_scale_.default, (grads, torch.tensor(0.5, device="cuda")))
    torch.library.opcheck(ops.multi_tensor_clamp_.default, (grads, -0.5, 0.75))
    torch.library.opcheck(ops.clip_grad_norm_.default, (grads, 0.1, 2.0))


@pytest.mark.parametrize("single", [False, True], ids=["two-launch", "single-launch"])
def test_no_host_sync(single):
    grads = _cuda(make_grads(SHAPES, torch.float32, seed=161))
    params = params_with(grads)
    with single_launch(single):
        fusedclip.clip_grad_norm_(params, 0.1, backend="cuda")  # warm-up outside the check
        torch.cuda.synchronize()
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            fusedclip.clip_grad_norm_(params, 0.1, backend="cuda")
            fusedclip.clip_grad_norm_(params, 0.1, 3.0, backend="cuda")
            fusedclip.clip_grads_with_norm_(params, 0.1, fusedclip.get_total_norm(grads, backend="cuda"),
                                            backend="cuda")
            fusedclip.clip_grad_value_(params, 0.01, backend="cuda")
            _ops.multi_tensor_norm("cuda", grads, 2.0, per_tensor=True)
        finally:
            torch.cuda.set_sync_debug_mode(previous)


@pytest.mark.parametrize("single", [False, True], ids=["two-launch", "single-launch"])
@pytest.mark.parametrize("count", [5, 2000], ids=["5-tensors", "2000-tensors-many-launches"])
def test_graph_capture_and_replay(single, count):
    shapes = SHAPES if count == 5 else [(7,)] * count
    originals = make_grads(shapes, torch.float32, seed=162)
    grads = _cuda(originals)
    params = params_with(grads)
    max_norm = 0.25 * oracle_norm(originals, 2.0)
    with single_launch(single):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fusedclip.clip_grad_norm_(params, max_norm, backend="cuda")  # warm-up on a side stream
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            total = fusedclip.clip_grad_norm_(params, max_norm, backend="cuda")
    for step in range(3):  # new grads each step, written into the captured tensors
        new = make_grads(shapes, torch.float32, seed=163 + step)
        for g, n in zip(grads, new):
            g.copy_(n)
        graph.replay()
        torch.cuda.synchronize()
        truth = oracle_norm(new, 2.0)
        assert float(total) == pytest.approx(truth, rel=1e-5)
        assert_bitwise_equal(_cpu(grads), scaled_by_returned_norm(new, total.cpu(), max_norm))

