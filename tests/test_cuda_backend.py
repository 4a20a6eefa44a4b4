"""CUDA: how backend "cuda" is chosen and refused (everywhere), what runs CUDA tensors under
backends "auto" and "torch", no host sync on any GPU backend, and what the CUDA kernels of
csrc/cuda/ alone do: the single-launch clip against the two-launch path, bit for bit, a CPU
coefficient, CUDA-graph capture and replay. The marker ``cuda`` skips a case without a GPU (CUDA
is queried at test setup only, see conftest.py, never at import).

The operator contracts the CUDA kernels share with the other backends (the float64 oracle, bitwise
scaled grads given the returned norm, poisoned memory around every tensor, tables past one
launch's capacity, opcheck) run in test_ops.py, the public API's in test_norms.py and test_api.py,
over the ``backend`` fixture; the nvcc compile checks are in test_cuda_compile.py.

compute-sanitizer on the small cases (run on a GPU machine):
  compute-sanitizer --tool memcheck  python -m pytest -q -p no:cacheprovider -m cuda tests/test_ops.py tests/test_cuda_backend.py -k "not many and not graph"
  compute-sanitizer --tool racecheck python -m pytest -q -p no:cacheprovider -m cuda tests/test_ops.py tests/test_cuda_backend.py -k "not many and not graph"
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

import fusedclip
from fusedclip import _backends, _ops
from helpers import (
    CUDA_CHUNK,
    FLOAT_DTYPES,
    Backend,
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
    poisoned_buffer,
    scaled_by_returned_norm,
)

CUDA_BUILT = fusedclip.backend_status()["cuda"] is None
needs_cuda_kernels = pytest.mark.skipif(not CUDA_BUILT, reason="fusedclip._C was built without its CUDA kernels")

CUDA = Backend("cuda", torch.device("cuda"))
SHAPES = [(33,), (0,), (4, 257), (1,), (70001,), (2, 0, 3), (5, 6, 7), (2 * CUDA_CHUNK + 3,)]
STAT_NORM_TYPES = (1.0, 2.0, 3.5, 0.5, math.inf, -math.inf, 0.0, -2.0)


# --- how backend "cuda" is chosen and refused (everywhere) -------------------------------------------


def test_backend_status_says_why_cuda_is_missing():
    reason = fusedclip.backend_status()["cuda"]
    assert (reason is None) == (_backends._C_CUDA is not None)
    assert ("cuda" in fusedclip.available_backends()) == CUDA_BUILT
    if not CUDA_BUILT:
        assert "CUDA" in reason
        grads = make_grads([(4,)], torch.float32)
        originals = clone_all(grads)
        with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
            fusedclip.clip_grad_norm_(params_with(grads), 0.01, backend="cuda")
        assert_bitwise_equal(grads, originals)


@needs_cuda_kernels
def test_cuda_backend_refuses_cpu_tensors():
    grads = make_grads([(4,)], torch.float32)
    originals = clone_all(grads)
    with pytest.raises(ValueError, match="backend 'cuda' runs CUDA tensors only"):
        fusedclip.clip_grad_norm_(params_with(grads), 0.01, backend="cuda")
    assert_bitwise_equal(grads, originals)


@pytest.mark.cuda
def test_cpu_backend_refuses_cuda_tensors():
    grads = CUDA.on(make_grads([(10,)], torch.float32, seed=85))
    with pytest.raises(ValueError, match="backend 'cpu' runs CPU tensors only"):
        fusedclip.clip_grad_norm_(params_with(grads), 1.0, backend="cpu")


def test_auto_takes_cuda_for_cuda_devices_when_built():
    """The CUDA kernels when built, else Triton, else torch."""
    triton_available = fusedclip.backend_status()["triton"] is None
    expected = "cuda" if CUDA_BUILT else ("triton" if triton_available else "torch")
    assert _backends.resolve_backend("auto", torch.device("cuda", 0)) == expected
    assert _backends.resolve_backend("auto", torch.device("cpu")) in ("cpu", "torch")


@pytest.mark.cuda
@needs_cuda_kernels
def test_kernels_run_on_this_gpu_and_auto_takes_them():
    assert _backends._C_CUDA.kernels_run_on(torch.cuda.current_device())
    assert _backends.resolve_backend("auto", torch.device("cuda")) == "cuda"


def test_gpu_backend_is_resolved_per_device_not_for_the_cpu(monkeypatch):
    # Naming a GPU backend is checked against the grads' own device, not the CPU's: their device
    # decides (here a meta device, which the cuda backend refuses with the grads' device named).
    monkeypatch.setattr(_backends, "_CUDA_ERROR", None)
    grads = [torch.randn(4, device="meta")]
    for call in (
        lambda: fusedclip.clip_grad_norm_(params_with(grads), 0.01, backend="cuda"),
        lambda: fusedclip.clip_grad_value_(params_with(grads), 0.01, backend="cuda"),
        lambda: fusedclip.clip_grads_with_norm_(params_with(grads), 0.01, torch.tensor(1.0), backend="cuda"),
    ):
        with pytest.raises(ValueError, match="gradients are on meta"):
            call()


# --- CUDA tensors under backends "auto" and "torch" ------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.5, math.inf, -math.inf, 0.0], ids=norm_id)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_auto_and_torch_on_cuda_tensors_match_oracle(backend, dtype, norm_type):
    originals = make_grads([(37,), (0,), (8, 129), (70001,), (1,)], dtype, seed=80)
    grads = CUDA.on(originals)
    truth = oracle_norm(originals, norm_type)
    tol = norm_rtol(1e-5, norm_type, dtype)
    total = fusedclip.clip_grad_norm_(params_with(grads), 0.5 * truth, norm_type, backend=backend)
    assert total.device == grads[0].device and total.dtype == expected_dtype([dtype])
    assert_norm_close(total.cpu(), truth, tol)
    assert_scaled_like_oracle(cpu(grads), originals, truth, 0.5 * truth, tol)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_auto_and_torch_on_cuda_tensors_write_nothing_without_clipping(backend):
    originals = make_grads([(37,), (0,), (8, 129), (70001,), (1,)], torch.bfloat16, seed=81)
    grads = CUDA.on(originals)
    fusedclip.clip_grad_norm_(params_with(grads), 1e9, backend=backend)
    assert_bitwise_equal(cpu(grads), originals)


@pytest.mark.cuda
def test_mixed_cpu_and_cuda_result_on_first_device():
    on_cpu = make_grads([(300,), (0,)], torch.float32, seed=83)
    gpu = CUDA.on(make_grads([(70,), (5, 5)], torch.float32, seed=84))
    truth = oracle_norm(on_cpu + cpu(gpu), 2.0)
    for grads in (on_cpu + gpu, gpu + on_cpu):
        total = fusedclip.get_total_norm(grads)
        assert total.device == grads[0].device
        assert_norm_close(total.cpu(), truth, 1e-5)
    originals = cpu(clone_all(gpu + on_cpu))
    total = fusedclip.clip_grad_norm_(params_with(gpu + on_cpu), 0.5 * truth)
    assert total.device == gpu[0].device
    assert_scaled_like_oracle(cpu(gpu + on_cpu), originals, truth, 0.5 * truth, 1e-5)


# --- the CUDA kernels' two launch paths ------------------------------------------------------------


class single_launch:
    """Within the block, the fused clip uses the single launch for every size (True) or never."""

    def __init__(self, enabled: bool):
        self.limit = 2**62 if enabled else 0

    def __enter__(self):
        self.previous = _backends._C_CUDA.single_launch_max_bytes()
        _backends._C_CUDA.set_single_launch_max_bytes(self.limit)

    def __exit__(self, *exc):
        _backends._C_CUDA.set_single_launch_max_bytes(self.previous)


# --- no host sync, on every GPU backend --------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("backend, single", [("auto", None), ("cuda", False), ("cuda", True), ("triton", None)],
                         ids=["auto", "cuda-two-launch", "cuda-single-launch", "triton"])
def test_no_host_sync(backend, single):
    if backend == "cuda" and not CUDA_BUILT:
        pytest.skip("fusedclip._C was built without its CUDA kernels")
    grads = CUDA.on(make_grads(SHAPES, [torch.float32, torch.bfloat16] * 4, seed=161))
    params = params_with(grads)
    name = _backends.resolve_backend(backend, grads[0].device)
    with contextlib.nullcontext() if single is None else single_launch(single):
        fusedclip.clip_grad_norm_(params, 0.1, backend=backend)  # warm-up outside the check
        torch.cuda.synchronize()
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            fusedclip.clip_grad_norm_(params, 0.1, backend=backend)
            fusedclip.clip_grad_norm_(params, 0.1, 3.0, backend=backend)
            fusedclip.clip_grads_with_norm_(params, 0.1, fusedclip.get_total_norm(grads, backend=backend),
                                            backend=backend)
            fusedclip.clip_grad_value_(params, 0.01, backend=backend)
            _ops.run("multi_tensor_norm", name, grads, 2.0, True)
        finally:
            torch.cuda.set_sync_debug_mode(previous)


# --- what the CUDA kernels alone do ------------------------------------------------------------------

LAUNCH_SHAPES = [(3,), (70001,), (0,), (1 << 20,), (257, 3)]
LAUNCH_CASES = {  # (shapes, dtypes)
    "float32": (LAUNCH_SHAPES, torch.float32),
    "float64": (LAUNCH_SHAPES, torch.float64),
    "float16": (LAUNCH_SHAPES, torch.float16),
    "bfloat16": (LAUNCH_SHAPES, torch.bfloat16),
    "float32+bfloat16": (SHAPES, [torch.float32, torch.bfloat16] * 4),
}


@pytest.mark.cuda
@needs_cuda_kernels
@pytest.mark.parametrize("norm_type", STAT_NORM_TYPES, ids=norm_id)
@pytest.mark.parametrize("case", sorted(LAUNCH_CASES))
def test_single_launch_equals_two_launches(case, norm_type):
    """Each path of the fused clip meets the oracle, both give the same bits, and neither writes
    anything when there is nothing to clip."""
    shapes, dtypes = LAUNCH_CASES[case]
    originals = make_grads(shapes, dtypes, seed=154)
    truth = oracle_norm(originals, norm_type)
    results = []
    for single in (False, True):
        grads = CUDA.on(originals)
        with single_launch(single):
            total = _ops.run("clip_grad_norm_", "cuda", grads, 0.5 * truth, norm_type)
        assert total.dtype == expected_dtype([g.dtype for g in originals]), single
        assert_norm_close(total.cpu(), truth, norm_rtol(1e-5, norm_type))
        assert_bitwise_equal(cpu(grads), scaled_by_returned_norm(originals, total.cpu(), 0.5 * truth))
        results.append((total.cpu(), cpu(grads)))
    assert_bitwise_equal([results[0][0]], [results[1][0]])
    assert_bitwise_equal(results[0][1], results[1][1])
    for single in (False, True):  # no clipping: nothing written either way
        grads = CUDA.on(originals)
        with single_launch(single):
            _ops.run("clip_grad_norm_", "cuda", grads, 1e30, norm_type)
        assert_bitwise_equal(cpu(grads), originals)


BOUNDARY_SIZES = [1, 7, 8, 9, 15, 16, 17, 31, 32, 33, 1023, CUDA_CHUNK - 1, CUDA_CHUNK, CUDA_CHUNK + 1,
                  2 * CUDA_CHUNK + 1]


@pytest.mark.cuda
@needs_cuda_kernels
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_no_write_outside_each_tensor_on_either_launch_path(dtype):
    for single in (False, True):
        poisoned = poisoned_buffer(BOUNDARY_SIZES, dtype, seed=159, device=CUDA.device)
        with single_launch(single):
            assert not _ops.run("clip_grad_norm_", "cuda", poisoned.tensors(), 0.01, 2.0).isnan()
        assert poisoned.poison_intact(), f"a write landed outside a tensor (single launch: {single})"


@pytest.mark.cuda
@needs_cuda_kernels
@pytest.mark.parametrize("dtype", list(FLOAT_DTYPES) + [torch.complex64, torch.complex128])
def test_scale_takes_a_cpu_coefficient(dtype):
    """A coefficient on the CPU is taken too (the contract's own is on the tensors' device, in
    test_ops.py): >= 1 writes nothing."""
    originals = make_grads(SHAPES, dtype, seed=150)
    grads = CUDA.on(originals)
    for coef in (1.0, 1.5, math.inf):
        _ops.run("multi_tensor_scale_", "cuda", grads, torch.tensor(coef))
        assert_bitwise_equal(cpu(grads), originals)


@pytest.mark.cuda
@needs_cuda_kernels
@pytest.mark.parametrize("single", [False, True], ids=["two-launch", "single-launch"])
@pytest.mark.parametrize("count", [5, 2000], ids=["5-tensors", "2000-tensors-many-launches"])
def test_graph_capture_and_replay(single, count):
    shapes = SHAPES if count == 5 else [(7,)] * count
    originals = make_grads(shapes, torch.float32, seed=162)
    grads = CUDA.on(originals)
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
        assert_bitwise_equal(cpu(grads), scaled_by_returned_norm(new, total.cpu(), max_norm))
