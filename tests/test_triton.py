"""Backend "triton": the operators and the public API on the Triton kernels.

Without a GPU the kernels run in Triton's interpreter on CPU tensors, which needs
TRITON_INTERPRET=1 in the environment before triton is imported. A plain ``pytest tests`` run
therefore runs this file's CPU cases in a subprocess started with the variable
(test_interpreted_suite, which fails when any of them fails); in that subprocess they run
directly. On a machine with a GPU the same cases run on CUDA tensors, compiled (marker ``cuda``).

triton is a test dependency: without it this file fails to import, it is never skipped.
"""

from __future__ import annotations

import collections
import gc
import math
import os
import subprocess
import sys

import pytest
import torch
import triton  # noqa: F401  (a test dependency: missing, the suite fails here)

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

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

DEVICES = [
    pytest.param(
        "cpu",
        marks=pytest.mark.skipif(
            not INTERPRETED, reason="runs in the TRITON_INTERPRET=1 subprocess of test_interpreted_suite"
        ),
        id="cpu-interpreted",
    ),
    pytest.param(
        "cuda",
        marks=[pytest.mark.cuda,
               pytest.mark.skipif(INTERPRETED, reason="the interpreter takes CPU tensors only")],
        id="cuda",
    ),
]


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


def on(device: torch.device, tensors):
    """Copies on device (new tensors on the CPU too, so the originals stay as they were)."""
    return [t.to(device, copy=True) for t in tensors]


def cpu(tensors):
    return [t.cpu() for t in tensors]


CHUNK = 16384  # fusedclip/triton/tables.py's CHUNK
FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
ALL_DTYPES = FLOATS + [torch.complex64, torch.complex128]
STAT_NORM_TYPES = (2.0, 1.0, 3.5, 0.5, -2.0, math.inf, -math.inf, 0.0)
# Odd sizes, zero-size tensors, and sizes on both sides of a chunk.
SHAPES = [(37,), (0,), (8, 129), (CHUNK - 1,), (CHUNK,), (1,), (3, 0), (CHUNK + 1,), (5, 7)]


def _stat_rtol(dtype, norm_type) -> float:
    if dtype in (torch.float64, torch.complex128):
        return 1e-12
    return 1e-5 if norm_type in (0.0, 1.0, 2.0) or math.isinf(norm_type) else 1e-4


# --- the subprocess ---------------------------------------------------------------------------------


def run_interpreted(path: str) -> None:
    """Runs the CPU cases of the test file at path in a subprocess started with
    TRITON_INTERPRET=1 (it must be set before triton is imported, which this process has done
    already); fails when any of them fails."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not cuda", os.path.abspath(path)],
        env=env, capture_output=True, text=True, timeout=1200,
    )
    assert result.returncode == 0, f"{result.stdout[-20000:]}\n{result.stderr[-5000:]}"
    assert " passed" in result.stdout and " failed" not in result.stdout, result.stdout[-2000:]


@pytest.mark.skipif(INTERPRETED, reason="this is the subprocess")
def test_interpreted_suite():
    """This file's CPU cases under TRITON_INTERPRET=1."""
    run_interpreted(__file__)


def test_backend_status_and_resolution():
    assert fusedclip.backend_status()["triton"] is None
    assert "triton" in fusedclip.available_backends()
    assert _backends.resolve_backend("auto", torch.device("cpu")) == "cpu"
    if INTERPRETED:
        assert _backends.resolve_backend("triton", torch.device("cpu")) == "triton"
    else:
        with pytest.raises(ValueError, match="backend 'triton' cannot run these gradients.*"
                                             "TRITON_INTERPRET=1"):
            fusedclip.get_total_norm([torch.randn(3)], backend="triton")


def test_import_without_triton():
    code = """
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ImportError("triton is hidden by the test")
sys.meta_path.insert(0, _Block())
import torch, fusedclip
reason = fusedclip.backend_status()["triton"]
assert reason is not None and "hidden by the test" in reason, reason
assert "triton" not in fusedclip.available_backends()
try:
    fusedclip.get_total_norm([torch.randn(3)], backend="triton")
except RuntimeError as error:
    assert "backend 'triton' is not available" in str(error), error
else:
    raise AssertionError("backend='triton' did not raise")
print(float(fusedclip.get_total_norm([torch.ones(4)])))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=dict(os.environ), timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "2.0"


# --- operators ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm_type", STAT_NORM_TYPES, ids=norm_id)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_statistics_total_and_per_tensor(device, dtype, norm_type):
    grads = make_grads(SHAPES, dtype, seed=1)
    grads[0][::5] = 0  # exact zeros: the 0-norm, and |0|^-2 = inf
    originals = clone_all(grads)
    total, per = torch.ops.fusedclip_triton.multi_tensor_norm(on(device, grads), norm_type, True)
    acc = expected_dtype([dtype])
    assert total.dtype == per.dtype == acc and total.shape == () and per.shape == (len(grads),)
    assert total.device.type == device.type
    rtol = _stat_rtol(dtype, norm_type)
    expected = [oracle_statistic(g, norm_type) for g in originals]
    for i, (value, want) in enumerate(zip(per.tolist(), expected)):
        assert value == pytest.approx(want, rel=rtol, abs=0), (i, value, want)
    combined = {math.inf: max, -math.inf: min}.get(norm_type, sum)(expected)
    assert float(total) == pytest.approx(combined, rel=rtol, abs=0)
    total2, per2 = torch.ops.fusedclip_triton.multi_tensor_norm(on(device, grads), norm_type, False)
    assert per2.numel() == 0 and torch.equal(total2, total)  # the same bits without per_tensor
    assert_bitwise_equal(grads, originals)


@pytest.mark.parametrize("norm_type", STAT_NORM_TYPES, ids=norm_id)
def test_statistic_of_no_elements_is_the_identity(device, norm_type):
    grads = on(device, [torch.empty(0), torch.empty(3, 0), torch.empty(0, dtype=torch.float16)])
    total, per = torch.ops.fusedclip_triton.multi_tensor_norm(grads, norm_type, True)
    identity = math.inf if norm_type == -math.inf else 0.0
    assert float(total) == identity and per.tolist() == [identity] * 3
    total = torch.ops.fusedclip_triton.clip_grad_norm_(grads, 1.0, norm_type)
    assert float(total) == 0.0


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_scale(device, dtype):
    grads = on(device, make_grads(SHAPES, dtype, seed=2))
    originals = clone_all(grads)
    for coef in (1.0, 1.5, math.inf):  # coef >= 1: nothing is written
        torch.ops.fusedclip_triton.multi_tensor_scale_(grads, torch.tensor(coef, device=device))
        assert_bitwise_equal(cpu(grads), cpu(originals))
    for coef in (torch.tensor(0.3721), torch.tensor(0.3721, dtype=torch.float64)):
        torch.ops.fusedclip_triton.multi_tensor_scale_(grads, coef.to(device))
        # a float64 coefficient is rounded to float32 for all but float64 grads
        assert_bitwise_equal(cpu(grads), scaled_by_coef(cpu(originals), coef.float()
                                                        if dtype not in (torch.float64, torch.complex128)
                                                        else coef))
        grads = clone_all(originals)
    torch.ops.fusedclip_triton.multi_tensor_scale_(grads, torch.tensor(float("nan"), device=device))
    assert all(g.isnan().all() for g in grads)


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_clamp(device, dtype):
    grads = make_grads(SHAPES, dtype, seed=3, scale=2.0)
    grads[2][::7] = float("nan")
    grads[4][::3] = float("inf")
    expected = [g.clone().clamp_(-0.25, 1.5) for g in grads]
    grads = on(device, grads)
    torch.ops.fusedclip_triton.multi_tensor_clamp_(grads, -0.25, 1.5)
    assert_bitwise_equal(cpu(grads), expected, any_nan=True)


@pytest.mark.parametrize("norm_type", STAT_NORM_TYPES, ids=norm_id)
def test_fused_clip_op_mixed_dtypes(device, norm_type):
    """Four dtypes in one call: four norm launches sharing one ticket counter, then four scales."""
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.complex64] * 2
    grads = make_grads(SHAPES + [(40,)], dtypes, seed=4)
    originals = clone_all(grads)
    truth = oracle_norm(originals, norm_type)
    grads = on(device, grads)
    total = torch.ops.fusedclip_triton.clip_grad_norm_(grads, 0.5 * truth, norm_type)
    assert total.dtype == torch.float64
    assert_norm_close(total.cpu(), truth, norm_rtol(1e-5, norm_type, torch.float32))
    assert_bitwise_equal(cpu(grads), scaled_by_returned_norm(originals, total.cpu(), 0.5 * truth))


def test_opcheck(device):
    grads = on(device, make_grads(SHAPES[:5], [torch.float32, torch.bfloat16, torch.float64,
                                               torch.float16, torch.float32], seed=5))
    ops = torch.ops.fusedclip_triton
    for per_tensor in (False, True):
        torch.library.opcheck(ops.multi_tensor_norm.default, (grads, 2.0, per_tensor))
        torch.library.opcheck(ops.multi_tensor_norm.default, (grads, -math.inf, per_tensor))
    for coef in (0.37, 1.5):
        torch.library.opcheck(ops.multi_tensor_scale_.default, (grads, torch.tensor(coef, device=device)))
    torch.library.opcheck(ops.multi_tensor_clamp_.default, (grads, -0.5, 0.75))
    for max_norm in (0.1, 1e6):
        torch.library.opcheck(ops.clip_grad_norm_.default, (grads, max_norm, 2.0))


def test_no_access_outside_each_tensor(device):
    """Tensors carved from one nan-filled buffer with gaps: reading past a tensor makes a norm
    nan, writing past it changes a gap. Sizes straddle the block and the chunk."""
    sizes = [1, 17, 2047, 2048, 2049, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 3]
    gap = 19
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        buffer = torch.full((sum(n + gap for n in sizes) + gap,), float("nan"), dtype=dtype)
        inside = torch.zeros(buffer.numel(), dtype=torch.bool)
        gen, offset, values = seeded(6), gap, []
        for n in sizes:
            buffer[offset:offset + n] = rand_tensor((n,), dtype, gen, scale=3.0)
            inside[offset:offset + n] = True
            values.append(buffer[offset:offset + n].clone())
            offset += n + gap
        buffer = buffer.to(device)
        tensors, offset = [], gap
        for n in sizes:
            tensors.append(buffer[offset:offset + n])
            offset += n + gap
        for norm_type in (2.0, math.inf, -math.inf, 0.0):
            total, per = torch.ops.fusedclip_triton.multi_tensor_norm(tensors, norm_type, True)
            assert not total.isnan() and not per.isnan().any(), (dtype, norm_type)
        torch.ops.fusedclip_triton.multi_tensor_scale_(tensors, torch.tensor(0.43, device=device))
        torch.ops.fusedclip_triton.multi_tensor_clamp_(tensors, -0.5, 0.5)
        torch.ops.fusedclip_triton.clip_grad_norm_(tensors, 0.01, 2.0)
        assert buffer.cpu()[~inside].isnan().all(), f"{dtype}: a kernel wrote outside a tensor"
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        scaled = [(v.to(acc) * torch.tensor(0.43).to(acc)).to(dtype).clamp(-0.5, 0.5) for v in values]
        assert not any(t.isnan().any() for t in tensors)
        truth = oracle_norm(scaled, 2.0)
        assert oracle_norm(cpu(tensors), 2.0) == pytest.approx(min(truth, 0.01), rel=1e-2)


@pytest.mark.parametrize("count", [1, 110, 111, 771])
def test_many_tensors(device, count):
    gen = seeded(7 + count)
    sizes = torch.randint(0, 60, (count,), generator=gen).tolist()
    grads = [rand_tensor((n,), torch.float32, gen) for n in sizes]
    total, per = torch.ops.fusedclip_triton.multi_tensor_norm(on(device, grads), 2.0, True)
    expected = torch.tensor([oracle_statistic(g, 2.0) for g in grads], dtype=torch.float64)
    torch.testing.assert_close(per.cpu().double(), expected, rtol=1e-5, atol=0)
    truth = oracle_norm(grads, 2.0)
    params = params_with(on(device, grads))
    total = fusedclip.clip_grad_norm_(params, 0.5 * truth, backend="triton")
    assert_norm_close(total.cpu(), truth, 1e-5)
    assert_scaled_like_oracle(cpu([p.grad for p in params]), grads, truth, 0.5 * truth, 1e-5)


def test_more_chunks_than_the_final_reduction_block(device):
    """1,100 chunks: the last program's reduction loops over its 1,024 lanes twice."""
    grads = make_grads([(3,)] * 1100, torch.float32, seed=8)
    for norm_type in (2.0, -math.inf):
        total, _ = torch.ops.fusedclip_triton.multi_tensor_norm(on(device, grads), norm_type)
        assert_norm_close(total.cpu(), oracle_norm(grads, norm_type) ** (2 if norm_type == 2.0 else 1), 1e-5)


@pytest.mark.parametrize("where", range(4))
def test_zero_size_tensor_at_every_position(device, where):
    grads = make_grads([(50,), (CHUNK + 7,), (9, 3)], torch.bfloat16, seed=9)
    grads.insert(where, torch.empty(0, 4, dtype=torch.bfloat16))
    originals = clone_all(grads)
    for norm_type in (2.0, math.inf, -math.inf, 0.0):
        total, per = torch.ops.fusedclip_triton.multi_tensor_norm(on(device, grads), norm_type, True)
        assert per.tolist()[where] == (math.inf if norm_type == -math.inf else 0.0)
        assert_norm_close(total.cpu(), sum(oracle_statistic(g, norm_type) for g in originals)
                          if math.isfinite(norm_type) else oracle_norm(originals, norm_type), 1e-5)
    truth = oracle_norm(originals, 2.0)
    grads = on(device, grads)
    fusedclip.clip_grad_norm_(params_with(grads), 0.5 * truth, backend="triton")
    assert_scaled_like_oracle(cpu(grads), originals, truth, 0.5 * truth, 1e-5)


def test_nan_and_inf(device):
    for norm_type in (2.0, 1.0, 3.5, math.inf, -math.inf):
        for position in (0, 2047, 2048, CHUNK + 5):  # a block, the next, the next chunk
            grads = make_grads([(CHUNK + 9,), (5,)], torch.float32, seed=10)
            grads[0][position] = float("nan")
            total, per = torch.ops.fusedclip_triton.multi_tensor_norm(on(device, grads), norm_type, True)
            assert total.isnan() and per[0].isnan() and not per[1].isnan(), (norm_type, position)
    grads = make_grads([(100,), (7,)], torch.float32, seed=11)
    grads[1][3] = float("inf")
    for norm_type, want in ((2.0, math.inf), (math.inf, math.inf), (1.0, math.inf)):
        assert float(fusedclip.get_total_norm(on(device, grads), norm_type, backend="triton")) == want
    grads[0][5] = float("nan")
    total, _ = torch.ops.fusedclip_triton.multi_tensor_norm(on(device, grads), 0.0)
    assert float(total) == float(torch.count_nonzero(torch.cat(grads)))  # nan != 0: counted


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_bitwise_repeatable(device, dtype):
    grads = on(device, make_grads(SHAPES + [(3 * CHUNK + 11,)], dtype, seed=12))
    for norm_type in (2.0, 3.5, math.inf, 0.0):
        first, per = torch.ops.fusedclip_triton.multi_tensor_norm(grads, norm_type, True)
        for _ in range(2):
            again, per_again = torch.ops.fusedclip_triton.multi_tensor_norm(clone_all(grads), norm_type, True)
            assert torch.equal(first, again) and torch.equal(per, per_again)
    a, b = clone_all(grads), clone_all(grads)
    ta = torch.ops.fusedclip_triton.clip_grad_norm_(a, 0.1, 2.0)
    tb = torch.ops.fusedclip_triton.clip_grad_norm_(b, 0.1, 2.0)
    assert torch.equal(ta, tb)
    assert_bitwise_equal(cpu(a), cpu(b))


# --- the public API on backend "triton" -----------------------------------------------------------


@pytest.mark.parametrize("norm_type", (2.0, 1.0, 3.5, -2.0, math.inf, -math.inf, 0.0, "inf"), ids=norm_id)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_clip_grad_norm_matches_oracle(device, dtype, norm_type):
    grads = make_grads(SHAPES, dtype, seed=13)
    originals = clone_all(grads)
    truth = oracle_norm(originals, norm_type)
    grads = on(device, grads)
    pointers = [g.data_ptr() for g in grads]
    params = params_with(grads)
    total = fusedclip.clip_grad_norm_(params, 0.3 * truth, norm_type, backend="triton")
    tol = norm_rtol(1e-5, norm_type, dtype)
    assert total.dtype == expected_dtype([dtype]) and total.device == grads[0].device
    assert_norm_close(total.cpu(), truth, tol)
    assert [p.grad.data_ptr() for p in params] == pointers
    assert_bitwise_equal(cpu(grads), scaled_by_returned_norm(originals, total.cpu(), 0.3 * truth))
    assert_scaled_like_oracle(cpu(grads), originals, truth, 0.3 * truth, tol)
    total = fusedclip.get_total_norm(grads, norm_type, backend="triton")
    assert_norm_close(total.cpu(), oracle_norm(cpu(grads), norm_type), tol)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128], ids=str)
def test_complex_grads(device, dtype):
    grads = make_grads([(30,), (0,), (4, 5)], dtype, seed=14)
    originals = clone_all(grads)
    truth = oracle_norm(originals, 2.0)
    grads = on(device, grads)
    total = fusedclip.clip_grad_norm_(params_with(grads), 0.5 * truth, backend="triton")
    assert_norm_close(total.cpu(), truth, 1e-5 if dtype == torch.complex64 else 1e-10)
    assert_bitwise_equal(cpu(grads), scaled_by_returned_norm(originals, total.cpu(), 0.5 * truth))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_contiguous_grads(device, dtype):
    """A transposed and a strided grad: read through contiguous copies, scaled and clamped in
    copies written back, strides and storage kept."""
    base = on(device, make_grads([(30, 41), (CHUNK + 5,)], dtype, seed=15))
    grads = [base[0].t(), base[1][::3], on(device, make_grads([(6,)], dtype, seed=16))[0]]
    originals = clone_all(grads)
    strides = [g.stride() for g in grads]
    truth = oracle_norm(cpu(originals), 2.0)
    total = fusedclip.clip_grad_norm_(params_with(grads), 0.5 * truth, backend="triton")
    assert [g.stride() for g in grads] == strides
    assert_norm_close(total.cpu(), truth, 1e-5)
    assert_bitwise_equal(cpu(grads), scaled_by_returned_norm(cpu(originals), total.cpu(), 0.5 * truth))
    expected = [g.cpu().clamp(-0.01, 0.02) for g in grads]
    torch.ops.fusedclip_triton.multi_tensor_clamp_(grads, -0.01, 0.02)
    assert_bitwise_equal(cpu(grads), expected)


@pytest.mark.parametrize("layout", ["channels_last", "transposed"])
def test_dense_non_contiguous_grads_are_spans(device, layout):
    """A grad that fills its memory exactly once (channels_last, transposed) is one flat span:
    never copied, its table cached, left bit for bit when nothing is clipped, and clipped in
    place when it is."""
    from fusedclip.triton import tables as triton_tables

    base = on(device, make_grads([(3, 5, 4, 7), (CHUNK + 9, 3)], torch.float32, seed=40))
    if layout == "channels_last":
        grads = [base[0].to(memory_format=torch.channels_last), base[1].t().contiguous().t()]
    else:
        grads = [base[0].permute(3, 1, 0, 2), base[1].t()]
    assert not any(g.is_contiguous() for g in grads)
    operands = triton_tables.prepare(grads, "test", writes=True)
    assert not operands.write_back and not operands.temporaries
    originals = clone_all(grads)
    truth = oracle_norm(cpu(originals), 2.0)
    total = fusedclip.clip_grad_norm_(params_with(grads), 2.0 * truth, backend="triton")
    assert_norm_close(total.cpu(), truth, 1e-5)
    assert_bitwise_equal(cpu(grads), cpu(originals))
    cached = len(triton_tables._cache)
    total = fusedclip.clip_grad_norm_(params_with(grads), 0.5 * truth, backend="triton")
    assert len(triton_tables._cache) == cached  # the same list: a hit
    assert_bitwise_equal(cpu(grads), scaled_by_returned_norm(cpu(originals), total.cpu(), 0.5 * truth))


def test_strided_grads_copied_once_and_values_kept_when_not_clipped(device, monkeypatch):
    """A truly strided grad goes through one contiguous copy per clip (the norm reads what the
    scale writes); when nothing is clipped the copy written back holds the same bits."""
    base = on(device, make_grads([(3 * CHUNK + 6,)], torch.bfloat16, seed=41))[0]
    grads = [base[::3], on(device, make_grads([(100,)], torch.bfloat16, seed=42))[0]]
    originals = clone_all(grads)
    whole = base.clone()
    truth = oracle_norm(cpu(originals), 2.0)
    copies = []
    contiguous = torch.Tensor.contiguous
    monkeypatch.setattr(torch.Tensor, "contiguous",
                        lambda self, *a, **k: copies.append(self) or contiguous(self, *a, **k))
    torch.ops.fusedclip_triton.clip_grad_norm_(grads, 2.0 * truth, 2.0)
    assert len(copies) == 1
    assert_bitwise_equal(cpu([base]), cpu([whole]))
    total = torch.ops.fusedclip_triton.clip_grad_norm_(grads, 0.5 * truth, 2.0)
    assert_bitwise_equal(cpu(grads), scaled_by_returned_norm(cpu(originals), total.cpu(), 0.5 * truth))
    assert_bitwise_equal(cpu([base[1::3], base[2::3]]), cpu([whole[1::3], whole[2::3]]))


def test_mixed_dtypes_accumulate_each_chunk_in_its_own_dtype(device):
    """float32 chunks accumulate in float32 even when a float64 tensor makes the output float64,
    as the CPU backend does: 1 + 2^-24 (the sum of squares of [1, 2^-12]) rounds to 1 in
    float32 (a tie, to even), and would stay 1 + 2^-24 in float64."""
    grads = [torch.tensor([1.0, 2.0**-12]), torch.zeros(3, dtype=torch.float64)]
    cpu_statistic, _ = torch.ops.fusedclip.multi_tensor_norm(clone_all(grads), 2.0, False)
    statistic, _ = torch.ops.fusedclip_triton.multi_tensor_norm(on(device, grads), 2.0, False)
    assert statistic.dtype == torch.float64
    assert float(statistic) == float(cpu_statistic) == 1.0
    dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.float16] * 3
    grads = make_grads([(CHUNK + 77,), (500,), (3000,), (CHUNK - 3,)] * 3, dtypes, seed=43)
    for norm_type in (2.0, 1.0, 3.0):
        cpu_statistic, _ = torch.ops.fusedclip.multi_tensor_norm(clone_all(grads), norm_type, False)
        statistic, _ = torch.ops.fusedclip_triton.multi_tensor_norm(on(device, grads), norm_type, False)
        assert float(statistic) == pytest.approx(float(cpu_statistic), rel=1e-6, abs=0)


@pytest.mark.parametrize("norm_type", [3.5, 0.5, -1.5, 1.25])
def test_general_p_matches_float64_oracle(device, norm_type):
    """|x|^p and the root in float64 (pow): float64 data within 1e-13 of the float64 oracle, and
    float32 data (subnormals included) within float32's own rounding."""
    grads = make_grads([(CHUNK + 5,), (300,)], torch.float64, seed=44, scale=3.0)
    truth = oracle_norm(grads, norm_type)
    total = torch.ops.fusedclip_triton.clip_grad_norm_(on(device, grads), 1e300, norm_type)
    assert float(total) == pytest.approx(truth, rel=1e-13, abs=0)
    grads = make_grads([(CHUNK + 5,), (300,)], torch.float32, seed=46)
    if 0 < norm_type < 1:  # sums of |x|^p of subnormals (|x| ~ 1e-39) stay normal floats
        grads.append(make_grads([(2000,)], torch.float32, seed=45)[0] * 1e-39)
    per_truth = [oracle_statistic(g, norm_type) for g in grads]
    _, per = torch.ops.fusedclip_triton.multi_tensor_norm(on(device, grads), norm_type, True)
    for value, want in zip(per.tolist(), per_truth):
        assert value == pytest.approx(want, rel=2e-7, abs=0)
    total = torch.ops.fusedclip_triton.clip_grad_norm_(on(device, grads), 1e30, norm_type)
    assert float(total) == pytest.approx(oracle_norm(grads, norm_type), rel=2e-7, abs=0)


def test_clip_grad_value(device):
    grads = make_grads(SHAPES, torch.float16, seed=17, scale=3.0)
    theirs = params_with(clone_all(grads))
    torch.nn.utils.clip_grad_value_(theirs, 0.7)
    ours = params_with(on(device, grads))
    fusedclip.clip_grad_value_(ours, 0.7, backend="triton")
    assert_bitwise_equal(cpu([p.grad for p in ours]), [p.grad for p in theirs])


def test_grads_sharing_memory_scaled_once_per_occurrence(device):
    g = on(device, make_grads([(50,)], torch.float32, seed=18))[0]
    view = g[10:20]
    ours = [g, g, view]
    theirs = [t.cpu().clone() for t in (g,)]
    expected = theirs[0]
    coef = torch.tensor(0.5)
    expected.mul_(coef)
    expected.mul_(coef)
    expected[10:20].mul_(coef)
    torch.ops.fusedclip_triton.multi_tensor_scale_(ours, coef.to(device))
    assert_bitwise_equal([g.cpu()], [expected])


def test_table_cache_follows_addresses(device):
    """A list seen before reuses its table; new tensors at other addresses get their own."""
    from fusedclip.triton import tables as triton_tables

    grads = on(device, make_grads([(100,), (CHUNK + 1,)], torch.float32, seed=19))
    first = float(fusedclip.get_total_norm(grads, backend="triton"))
    cached = len(triton_tables._cache)
    assert float(fusedclip.get_total_norm(grads, backend="triton")) == first
    assert len(triton_tables._cache) == cached
    for seed in range(3):
        other = on(device, make_grads([(100,), (CHUNK + 1,)], torch.float32, seed=20 + seed))
        assert_norm_close(fusedclip.get_total_norm(other, backend="triton").cpu(),
                          oracle_norm(cpu(other), 2.0), 1e-5)


def test_cache_hit_skips_checks_and_table(device, monkeypatch):
    """A list seen before takes its operands from the cache: nothing is checked or built."""
    from fusedclip.triton import tables as triton_tables

    # An empty cache: a table depends only on addresses, sizes and dtypes, so an earlier test's
    # list at the same (reused) addresses would otherwise make the last call below a hit.
    monkeypatch.setattr(triton_tables, "_cache", collections.OrderedDict())
    grads = on(device, make_grads([(100,), (CHUNK + 1,), (7, 3)], torch.float32, seed=47))
    first = torch.ops.fusedclip_triton.multi_tensor_norm(grads, 2.0)[0]

    def refuse(*args, **kwargs):
        raise AssertionError("operands built on a cache hit")

    monkeypatch.setattr(triton_tables, "prepare", refuse)
    assert torch.equal(torch.ops.fusedclip_triton.multi_tensor_norm(grads, 2.0)[0], first)
    with pytest.raises(AssertionError, match="cache hit"):  # another list: a miss
        torch.ops.fusedclip_triton.multi_tensor_norm(grads[:2], 2.0)


def test_in_place_operators_bump_version_counters(device):
    """Autograd sees every in-place write: each written tensor's version counter moves."""
    grads = on(device, make_grads([(10,), (CHUNK + 2,), (0,)], torch.float32, seed=50))
    for op, args in ((torch.ops.fusedclip_triton.clip_grad_norm_, (0.1, 2.0)),
                     (torch.ops.fusedclip_triton.multi_tensor_scale_, (torch.tensor(0.5, device=device),)),
                     (torch.ops.fusedclip_triton.multi_tensor_clamp_, (-0.1, 0.1))):
        versions = [g._version for g in grads]
        op(grads, *args)
        assert all(g._version > v for g, v in zip(grads, versions)), op
    versions = [g._version for g in grads]
    torch.ops.fusedclip_triton.multi_tensor_norm(grads, 2.0)
    assert [g._version for g in grads] == versions


def test_bad_input_raises_before_writing(device):
    grads = on(device, make_grads([(10,), (5,)], torch.float32, seed=21))
    originals = clone_all(grads)
    expanded = torch.randn(1, device=device).expand(4)
    with pytest.raises(RuntimeError, match="internally overlapping"):
        torch.ops.fusedclip_triton.multi_tensor_scale_(grads + [expanded], torch.tensor(0.5, device=device))
    with pytest.raises(RuntimeError, match="complex"):
        torch.ops.fusedclip_triton.multi_tensor_clamp_(grads + [torch.randn(3, dtype=torch.complex64, device=device)], -1.0, 1.0)
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.fusedclip_triton.clip_grad_norm_(grads + [torch.ones(3, dtype=torch.int32, device=device)], 0.1, 2.0)
    with pytest.raises(RuntimeError, match="layout"):  # no address: the cache key refuses it too
        torch.ops.fusedclip_triton.clip_grad_norm_(grads + [torch.ones(3, device=device).to_sparse()], 0.1, 2.0)
    with pytest.raises(RuntimeError, match="norm_type must not be nan"):
        torch.ops.fusedclip_triton.clip_grad_norm_(grads, 0.1, float("nan"))
    with pytest.raises(ValueError, match="max_norm"):
        fusedclip.clip_grad_norm_(params_with(grads), -1.0, backend="triton")
    assert_bitwise_equal(cpu(grads), cpu(originals))


def test_clip_optimizer_takes_backend_triton(device):
    """ClipOptimizer accepts "triton" for parameters the Triton kernels run (and clips with it)."""
    grads = on(device, make_grads([(30,), (4, 5)], torch.float32, seed=22, scale=3.0))
    params, expected = params_with(clone_all(grads)), params_with(clone_all(grads))
    opt = fusedclip.ClipOptimizer(torch.optim.SGD(params, lr=0.0), 0.5, backend="triton")
    total = opt.step()
    expected_total = fusedclip.clip_grad_norm_(expected, 0.5, backend="torch")
    torch.testing.assert_close(total, expected_total, rtol=1e-5, atol=0)
    for p, q in zip(params, expected):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)


def test_compile_fullgraph(device):
    torch._dynamo.reset()

    def clip(params, max_norm):
        return fusedclip.clip_grad_norm_(params, max_norm, backend="triton")

    grads = make_grads([(64, 3), (0,), (1000,), (7,)],
                       [torch.float32, torch.float32, torch.bfloat16, torch.float32], seed=22)
    eager_params = params_with(on(device, clone_all(grads)))
    compiled_params = params_with(on(device, clone_all(grads)))
    compiled = torch.compile(clip, fullgraph=True)
    try:
        for max_norm in (0.5, 1e6, 0.3):
            expected = clip(eager_params, max_norm)
            total = compiled(compiled_params, max_norm)
            assert total.dtype == expected.dtype and torch.equal(total, expected)
            assert_bitwise_equal(cpu([p.grad for p in compiled_params]), cpu([p.grad for p in eager_params]))
    finally:
        torch._dynamo.reset()


# --- CUDA only -------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(INTERPRETED, reason="the interpreter takes CPU tensors only")
def test_auto_picks_cuda_then_triton_for_cuda_tensors():
    """_backends.resolve_backend's rule: the CUDA kernels first when they are built for the GPU,
    else triton."""
    cuda = torch.device("cuda")
    built = _backends._CUDA_ERROR is None and _backends._cuda_kernels_run_on(cuda.index)
    assert _backends.resolve_backend("auto", cuda) == ("cuda" if built else "triton")


@pytest.mark.cuda
@pytest.mark.skipif(INTERPRETED, reason="the interpreter takes CPU tensors only")
def test_clip_is_sync_free():
    grads = on(torch.device("cuda"), make_grads(SHAPES, torch.bfloat16, seed=23))
    params = params_with(grads)
    fusedclip.clip_grad_norm_(params, 0.1, backend="triton")  # warm-up: compiles, caches the table
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fusedclip.clip_grad_norm_(params, 0.1, backend="triton")
        fusedclip.clip_grad_norm_(params, 0.1, 3.0, backend="triton")
        fusedclip.clip_grads_with_norm_(params, 0.1, fusedclip.get_total_norm(grads, backend="triton"),
                                        backend="triton")
        fusedclip.clip_grad_value_(params, 0.01, backend="triton")
    finally:
        torch.cuda.set_sync_debug_mode(previous)


@pytest.mark.cuda
@pytest.mark.skipif(INTERPRETED, reason="the interpreter takes CPU tensors only")
def test_clip_in_a_cuda_graph():
    source = make_grads(SHAPES, torch.float32, seed=24)
    grads = on(torch.device("cuda"), source)
    params = params_with(grads)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up off the default stream, as capture requires
            fusedclip.clip_grad_norm_(params, 0.1, backend="triton")
    torch.cuda.current_stream().wait_stream(stream)
    from fusedclip.triton import tables as triton_tables

    warmed = list(triton_tables._cache.values())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        total = fusedclip.clip_grad_norm_(params, 0.1, backend="triton")
    held = triton_tables.captured_operands(graph) or triton_tables._captured_without_graph
    assert any(held[-1] is o for o in warmed)  # the warm-up's table
    for seed in range(triton_tables._CACHE_SIZE + 4):  # evicts it from the cache; reuses memory
        other = on(torch.device("cuda"), make_grads([(100,), (CHUNK + 3,)], torch.float32, seed=200 + seed))
        fusedclip.get_total_norm(other, backend="triton")
    for scale in (1.0, 3.0, 1e-9):  # clips, clips, does not clip
        inputs = [s * scale for s in source]
        for g, s in zip(grads, inputs):
            g.copy_(s)
        graph.replay()
        torch.cuda.synchronize()
        truth = oracle_norm(inputs, 2.0)
        assert_norm_close(total.cpu(), truth, 1e-5)
        assert_bitwise_equal(cpu(grads), scaled_by_returned_norm(inputs, total.cpu(), 0.1))


@pytest.mark.cuda
@pytest.mark.skipif(INTERPRETED, reason="the interpreter takes CPU tensors only")
def test_cuda_graph_tables_outlive_the_cache():
    """A graph captured on grads never used before builds their table during capture (copied
    at each replay from staging memory reserved before the capture): kept apart (the cache is
    untouched), kept by the graph, it still replays correctly after the cache has turned over,
    and its staging region is given back with the graph."""
    from fusedclip.triton import tables as triton_tables

    cuda = torch.device("cuda")
    source = make_grads(SHAPES, torch.float32, seed=48)
    warm_up = on(cuda, source)  # kept alive: the grads below cannot take their addresses
    fusedclip.clip_grad_norm_(params_with(warm_up), 0.1, backend="triton")  # compiles, reserves staging
    torch.cuda.synchronize()
    grads = on(cuda, source)
    params = params_with(grads)
    cached = dict(triton_tables._cache)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        total = fusedclip.clip_grad_norm_(params, 0.1, backend="triton")
    assert triton_tables._cache.keys() == cached.keys()
    held = triton_tables.captured_operands(graph) or triton_tables._captured_without_graph[-1:]
    assert len(held) == 1 and not any(held[0] is o for o in cached.values())  # built during capture
    region = held[0].table.host_copy
    assert region.is_pinned() and any(region.data_ptr() >= a.data_ptr() and
                                      region.data_ptr() < a.data_ptr() + a.numel() * 8
                                      for a in triton_tables._staging._arenas)
    for seed in range(triton_tables._CACHE_SIZE + 4):  # evicts every entry; reuses freed memory
        other = on(cuda, make_grads([(100,), (CHUNK + 3,)], torch.float32, seed=100 + seed))
        fusedclip.get_total_norm(other, backend="triton")
    for scale in (1.0, 1e-9):  # clips, does not clip
        inputs = [s * scale for s in source]
        for g, s in zip(grads, inputs):
            g.copy_(s)
        graph.replay()
        torch.cuda.synchronize()
        assert_norm_close(total.cpu(), oracle_norm(inputs, 2.0), 1e-5)
        assert_bitwise_equal(cpu(grads), scaled_by_returned_norm(inputs, total.cpu(), 0.1))
    if triton_tables.captured_operands(graph):  # a torch that names the capturing graph
        free = len(triton_tables._staging._free)
        del graph, held, region
        gc.collect()
        assert len(triton_tables._staging._free) == free + 1


@pytest.mark.cuda
@pytest.mark.skipif(INTERPRETED, reason="the interpreter takes CPU tensors only")
def test_tables_are_per_stream():
    """The first use of a list on another stream builds that stream's own table (ordered after
    its own copy), and gives the same result."""
    from fusedclip.triton import tables as triton_tables

    grads = on(torch.device("cuda"), make_grads(SHAPES, torch.float32, seed=49))
    first = fusedclip.get_total_norm(grads, backend="triton")
    cached = len(triton_tables._cache)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        second = fusedclip.get_total_norm(grads, backend="triton")
    torch.cuda.current_stream().wait_stream(stream)
    assert len(triton_tables._cache) == min(cached + 1, triton_tables._CACHE_SIZE)
    assert torch.equal(first, second)


# The kernels' size arguments (never specialized) and their int64 arguments besides float64 bits.
SIZE_ARGS = ("n_chunks", "first_chunk", "n_tensors", "index", "n_partials", "coef_stride", "n_pieces",
             "first_piece", "n_parts", "n_long", "n", "warmup_steps", "vanish_steps")
INT64_ARGS = ("warmup_steps", "vanish_steps")


def _all_kernels():
    from fusedclip.triton import kernels

    return (kernels.norm_chunks, kernels.per_tensor, kernels.scale_chunks, kernels.clamp_chunks,
            kernels.agc_pieces, kernels.agc_long_rows, kernels.monitor_update)


@pytest.mark.skipif(INTERPRETED, reason="reads the compiled kernels' parameters")
def test_kernel_scalars_compile_one_variant():
    """Sizes and float64 bit patterns never specialize a kernel (an int 1 or a multiple of 16
    would), and the bits are typed int64 whatever their value (0.0's bits would be int32)."""
    for fn in _all_kernels():
        for param in fn.params:
            if param.name in SIZE_ARGS or param.name.endswith("_bits"):
                assert param.do_not_specialize, (fn, param.name)
            if param.name.endswith("_bits") or param.name in INT64_ARGS:
                assert param.annotation_type == "i64", (fn, param.name)


# --- compiled for a GPU, without one ------------------------------------------------------------------


@pytest.mark.skipif(INTERPRETED, reason="compiles the kernels; the interpreter has no compiler")
@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
def test_kernels_compile_for_sm90():
    """Every kernel compiles (Triton's own ptxas, no GPU needed) for an H100's sm_90 in the
    variants the launchers use; whole blocks of aligned bf16 are loaded and stored 16 bytes at a
    time (the norm, its unscaled form, the scales, AGC's rows); general p takes float64 pow; and
    GradientMonitor's update, compiled as launch.monitor compiles it, has no fused multiply-add
    (which it would have with fusion on)."""
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fusedclip.triton import kernels

    fixed = {"table": "*i64", "partials": "*fp64", "ticket": "*i32", "inv_scale": "*fp32", "found_inf": "*fp32",
             "unit_sq": "*fp64", "parts": "*fp64", "coefs": "*fp64", "count": "*i64", "below": "*i64",
             "explosions": "*i64", "exploding": "*i1", "vanishing": "*i1"}

    def compile_kernel(fn, acc, fp_fusion=True, **constexprs):
        signature = {}
        for name in fn.arg_names:
            if name in constexprs:
                signature[name] = "constexpr"
            elif name.endswith("_bits") or name in INT64_ARGS:
                signature[name] = "i64"
            elif name in fixed:
                signature[name] = fixed[name]
            elif name in ("statistic", "total_norm", "coef", "out", "norms", "mean", "var"):
                signature[name] = "*fp64" if acc == tl.float64 else "*fp32"
            else:
                assert name in SIZE_ARGS, name
                signature[name] = "i32"
        source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
        options = {"num_warps": 8, "enable_fp_fusion": fp_fusion}
        return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)

    for dtype in (tl.float32, tl.float64, tl.float16, tl.bfloat16):
        acc = tl.float64 if dtype == tl.float64 else tl.float32
        for aligned in (False, True):
            vector = dtype == tl.bfloat16 and aligned
            for per_tensor in (False, True):
                compiled = compile_kernel(kernels.scale_chunks, acc, DTYPE=dtype, ACC=acc, ALIGNED=aligned,
                                          BLOCK=2048, PER_TENSOR=per_tensor)
                assert not vector or "st.global.v4.b32" in compiled.asm["ptx"], per_tensor
            compiled = compile_kernel(kernels.clamp_chunks, acc, DTYPE=dtype, ACC=acc, ALIGNED=aligned, BLOCK=2048)
            assert not vector or "st.global.v4.b32" in compiled.asm["ptx"]
            for pdtype in {dtype, tl.float32}:  # a parameter may have another dtype than its grad
                pacc = tl.float64 if pdtype == tl.float64 else tl.float32
                compiled = compile_kernel(kernels.agc_pieces, acc, DTYPE=dtype, ACC=acc, PDTYPE=pdtype, PACC=pacc,
                                          ALIGNED=aligned, BLOCK=2048)
                if vector:
                    assert "ld.global.v4.b32" in compiled.asm["ptx"] and "st.global.v4.b32" in compiled.asm["ptx"]
        for out in {acc, tl.float64}:  # a float64 tensor in the list makes the output float64
            for kind in range(6):
                for unscale in (False, True) if out == acc else (False,):  # unscaled: one output dtype
                    norm = compile_kernel(kernels.norm_chunks, out, DTYPE=dtype, ACC=acc, OUT=out,
                                          KIND=kind, FINISH=not unscale, UNSCALE=unscale, ALIGNED=True,
                                          BLOCK=2048, FINAL_BLOCK=1024)
                    if dtype == tl.bfloat16:
                        assert "ld.global.v4.b32" in norm.asm["ptx"], (kind, unscale)
                    if kind == kernels.POWER_SUM.value:  # |x|^p and the root: float64 pow
                        assert "__nv_pow" in norm.asm["llir"] and "lg2.approx" not in norm.asm["ptx"]
    for acc in (tl.float32, tl.float64):
        for kind in range(6):
            for root in (False, True):
                compile_kernel(kernels.per_tensor, acc, KIND=kind, ACC=acc, ROOT=root, TOTAL=False, BLOCK=1024)
        compile_kernel(kernels.per_tensor, acc, KIND=kernels.SQUARE_SUM.value, ACC=acc, ROOT=False, TOTAL=True,
                       BLOCK=1024)  # AGC's sums
        for has_explode in (False, True):
            monitor = compile_kernel(kernels.monitor_update, acc, fp_fusion=False, T=acc, HAS_EXPLODE=has_explode,
                                     BLOCK=1024)
            assert "fma.rn" not in monitor.asm["ptx"], has_explode
        fused = compile_kernel(kernels.monitor_update, acc, T=acc, HAS_EXPLODE=True, BLOCK=1024)
        assert "fma.rn" in fused.asm["ptx"]  # the check above can fail
    compile_kernel(kernels.agc_long_rows, tl.float64, BLOCK=1024)
