"""The operators' contracts, written once and run on every backend (the ``backend`` fixture,
conftest.py: cpu, torch, triton, cuda) through fusedclip._ops: opcheck, the statistic before the
root, per-tensor statistics, the in-place primitives, the fused clip, nan and inf, zero-size,
shared, non-contiguous and mixed-dtype tensors, poisoned memory around every tensor, bitwise
repeatability and version counters. Then what the backends share: fake kernels, the operator
table, the Triton schemas.

The contracts of the five other operators (unscale norm, AGC, per-tensor scale, clip with norms,
monitor update) are in test_operator_contracts.py. What one backend alone does (Triton's table
cache, the CUDA kernels' single launch, graphs) is in test_triton.py, test_cuda_backend.py,
test_triton_operators.py and test_cuda_operators.py."""

from __future__ import annotations

import math

import pytest
import torch

import fusedclip
from fusedclip import _backends, _ops
from helpers import (
    CPU_CHUNK,
    CUDA_CHUNK,
    TRITON_CHUNK,
    assert_bitwise_equal,
    assert_norm_close,
    assert_scaled_like_oracle,
    clone_all,
    count_aten,
    cpu,
    expected_dtype,
    make_grads,
    norm_id,
    norm_rtol,
    operator_of,
    oracle_norm,
    oracle_statistic,
    params_with,
    poisoned_buffer,
    rand_tensor,
    scaled_by_coef,
    scaled_by_returned_norm,
    seeded,
)

from fusedclip.numerics import accumulate_dtype

ops = torch.ops.fusedclip

FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
ALL_DTYPES = FLOATS + [torch.complex64, torch.complex128]
STAT_NORM_TYPES = (1.0, 2.0, 3.5, 0.5, math.inf, -math.inf, 0.0, -2.0)

# Odd sizes, zero-size tensors, and sizes on both sides of every backend's chunk: the CPU's
# (70001: three chunks), the CUDA kernels' (131075: three) and Triton's (16383, 16384, 16385).
SHAPES = [(33,), (0,), (4, 257), (1,), (70001,), (2, 0, 3), (5, 6, 7), (2 * CUDA_CHUNK + 3,),
          (37,), (8, 129), (TRITON_CHUNK - 1,), (TRITON_CHUNK,), (3, 0), (TRITON_CHUNK + 1,), (5, 7)]
assert 2 * CPU_CHUNK < 70001 < 3 * CPU_CHUNK


def _stat_rtol(dtype, norm_type) -> float:
    """A statistic against the float64 oracle: float64 accumulation, or float32 (general p looser)."""
    if dtype in (torch.float64, torch.complex128):
        return 1e-12
    return 1e-5 if norm_type in (0.0, 1.0, 2.0) or math.isinf(norm_type) else 1e-4


# --- opcheck -----------------------------------------------------------------------------------------


def _operator(backend, name):
    """The backend's operator for name (its OpOverload), for opcheck (helpers.operator_of)."""
    return operator_of(backend, name)


OPCHECK_MIXES = {
    "float32+bfloat16+float16": [torch.float32, torch.bfloat16, torch.float32, torch.float16, torch.float32],
    "with-float64": [torch.float32, torch.bfloat16, torch.float64, torch.float16, torch.float32],
}


@pytest.mark.parametrize("per_tensor", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_opcheck_multi_tensor_norm(backend, dtype, per_tensor):
    op = _operator(backend, "multi_tensor_norm")
    grads = backend.on(make_grads(SHAPES[:5], dtype, seed=40))
    for norm_type in (2.0, math.inf, -math.inf):
        torch.library.opcheck(op, (grads, norm_type, per_tensor))


@pytest.mark.parametrize("per_tensor", [False, True])
def test_opcheck_multi_tensor_norm_mixed_dtypes(backend, per_tensor):
    op = _operator(backend, "multi_tensor_norm")
    for dtypes in ([torch.float16, torch.float32, torch.complex64, torch.float64], OPCHECK_MIXES["with-float64"]):
        grads = backend.on(make_grads(SHAPES[:len(dtypes)], dtypes, seed=41))
        for norm_type in (3.5, 2.0, -math.inf):
            torch.library.opcheck(op, (grads, norm_type, per_tensor))


@pytest.mark.parametrize("coef", [0.37, 1.0, 1.5], ids=["lt1", "eq1", "gt1"])
def test_opcheck_multi_tensor_scale_(backend, coef):
    op = _operator(backend, "multi_tensor_scale_")
    grads = backend.on(make_grads(SHAPES[:5], [torch.float32, torch.float16, torch.float32, torch.bfloat16,
                                               torch.float64], seed=42))
    torch.library.opcheck(op, (grads, backend.tensor(coef)))


def test_opcheck_multi_tensor_clamp_(backend):
    op = _operator(backend, "multi_tensor_clamp_")
    for dtypes in (torch.float32, OPCHECK_MIXES["with-float64"]):
        grads = backend.on(make_grads(SHAPES[:5], dtypes, seed=43, scale=3.0))
        torch.library.opcheck(op, (grads, -0.5, 0.75))


@pytest.mark.parametrize("max_norm", [0.1, 1e6], ids=["clips", "no-clip"])
@pytest.mark.parametrize("mix", sorted(OPCHECK_MIXES))
def test_opcheck_clip_grad_norm_(backend, mix, max_norm):
    op = _operator(backend, "clip_grad_norm_")
    grads = backend.on(make_grads(SHAPES[:5], OPCHECK_MIXES[mix], seed=44))
    torch.library.opcheck(op, (grads, max_norm, 2.0))


# --- the statistic before the root, total and per tensor -------------------------------------------


@pytest.mark.parametrize("norm_type", STAT_NORM_TYPES, ids=norm_id)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_statistics_total_and_per_tensor(backend, dtype, norm_type):
    originals = make_grads(SHAPES, dtype, seed=45)
    originals[0][::5] = 0  # exact zeros for the 0-norm (and an infinite |x|^-2)
    grads = backend.on(originals)
    total, per = _ops.run("multi_tensor_norm", backend.name, grads, norm_type, True)
    acc = expected_dtype([dtype])
    assert total.dtype == per.dtype == acc and total.shape == () and per.shape == (len(grads),)
    assert total.device == per.device == grads[0].device
    rtol = _stat_rtol(dtype, norm_type)
    expected = [oracle_statistic(g, norm_type) for g in originals]
    # every element of the per-tensor output is checked: nothing may be left unwritten
    for i, (value, want) in enumerate(zip(per.tolist(), expected)):
        assert value == pytest.approx(want, rel=rtol, abs=0), (i, value, want)
    combined = {math.inf: max, -math.inf: min}.get(norm_type, sum)(expected)
    assert float(total) == pytest.approx(combined, rel=rtol, abs=0)
    assert_bitwise_equal(cpu(grads), originals)
    # without per_tensor the second result is empty and the total the same bits
    total2, per2 = _ops.run("multi_tensor_norm", backend.name, grads, norm_type)
    assert per2.numel() == 0 and torch.equal(total2, total)


def test_statistic_is_before_the_root(backend):
    grads = make_grads([(100,), (7, 3)], torch.float64, seed=46)
    vector = torch.cat([g.flatten() for g in grads])
    for norm_type, want in [
        (2.0, float(vector.square().sum())),
        (1.0, float(vector.abs().sum())),
        (3.5, float(vector.abs().pow(3.5).sum())),
        (-2.0, float(vector.abs().pow(-2.0).sum())),
        (math.inf, float(vector.abs().max())),
        (-math.inf, float(vector.abs().min())),
        (0.0, float(vector.count_nonzero())),
    ]:
        total, _ = _ops.run("multi_tensor_norm", backend.name, backend.on(grads), norm_type)
        assert float(total) == pytest.approx(want, rel=1e-12), norm_type


@pytest.mark.parametrize("norm_type", STAT_NORM_TYPES, ids=norm_id)
def test_statistic_of_no_elements_is_the_identity(backend, norm_type):
    grads = backend.on([torch.empty(0), torch.empty(3, 0), torch.empty(0, dtype=torch.float16)])
    total, per = _ops.run("multi_tensor_norm", backend.name, grads, norm_type, True)
    identity = math.inf if norm_type == -math.inf else 0.0
    assert float(total) == identity and per.tolist() == [identity] * 3
    total = _ops.run("clip_grad_norm_", backend.name, grads, 1.0, norm_type)
    assert float(total) == 0.0


@pytest.mark.parametrize("count", [1, 110, 111, 771, 1500, 5000])
def test_per_tensor_statistics_many_tensors(backend, count):
    """Up to 5,000 tensors: past one CUDA launch's table (about 1,500 tensors), past the last
    Triton program's final reduction block; then the clip, by the operator and by the API."""
    if backend.name == "triton" and backend.device.type == "cpu" and count > 1000:
        pytest.skip("Triton's interpreter runs one program per chunk (about 5 ms each): counts past "
                    "1,000 run on CUDA tensors")
    gen = seeded(47 + count)
    sizes = torch.randint(0, 60, (count,), generator=gen).tolist()
    grads = [rand_tensor((n,), torch.float32, gen) for n in sizes]
    for norm_type in (2.0, -math.inf, math.inf):
        total, per = _ops.run("multi_tensor_norm", backend.name, backend.on(grads), norm_type, True)
        expected = torch.tensor([oracle_statistic(g, norm_type) for g in grads], dtype=torch.float64)
        torch.testing.assert_close(per.cpu().double(), expected, rtol=1e-5, atol=0)
    truth = oracle_norm(grads, 2.0)
    on_device = backend.on(grads)
    total = _ops.run("clip_grad_norm_", backend.name, on_device, 0.5 * truth, 2.0)
    assert_norm_close(total.cpu(), truth, 1e-5)
    assert_bitwise_equal(cpu(on_device), scaled_by_returned_norm(grads, total.cpu(), 0.5 * truth))
    params = params_with(backend.on(grads))
    total = fusedclip.clip_grad_norm_(params, 0.5 * truth, backend=backend.name)
    assert_norm_close(total.cpu(), truth, 1e-5)
    assert_scaled_like_oracle(cpu([p.grad for p in params]), grads, truth, 0.5 * truth, 1e-5)


def test_nan_and_inf_through_every_statistic(backend):
    # nan in the vector body, its tail, the next block, the next chunk of each backend
    for norm_type in (2.0, 1.0, 3.5, math.inf, -math.inf):
        for position in (0, 31, 32, 2047, 2048, TRITON_CHUNK + 5, 40000, 70000):
            grads = make_grads([(70001,), (5,)], torch.float32, seed=48)
            grads[0][position] = float("nan")
            total, per = _ops.run("multi_tensor_norm", backend.name, backend.on(grads), norm_type, True)
            assert total.isnan() and per[0].isnan() and not per[1].isnan(), (norm_type, position)
    grads = make_grads([(100,), (7,)], torch.float32, seed=49)
    grads[1][3] = float("inf")
    for norm_type, want in ((2.0, math.inf), (math.inf, math.inf), (1.0, math.inf)):
        assert float(fusedclip.get_total_norm(backend.on(grads), norm_type, backend=backend.name)) == want
    grads[0][5] = float("nan")
    total, _ = _ops.run("multi_tensor_norm", backend.name, backend.on(grads), 0.0)
    assert float(total) == float(torch.count_nonzero(torch.cat(grads)))  # nan != 0: counted


@pytest.mark.parametrize("where", range(4))
def test_zero_size_tensor_at_every_position(backend, where):
    grads = make_grads([(50,), (TRITON_CHUNK + 7,), (9, 3)], torch.bfloat16, seed=9)
    grads.insert(where, torch.empty(0, 4, dtype=torch.bfloat16))
    originals = clone_all(grads)
    for norm_type in (2.0, math.inf, -math.inf, 0.0):
        total, per = _ops.run("multi_tensor_norm", backend.name, backend.on(grads), norm_type, True)
        assert per.tolist()[where] == (math.inf if norm_type == -math.inf else 0.0)
        assert_norm_close(total.cpu(), sum(oracle_statistic(g, norm_type) for g in originals)
                          if math.isfinite(norm_type) else oracle_norm(originals, norm_type), 1e-5)
    truth = oracle_norm(originals, 2.0)
    grads = backend.on(grads)
    fusedclip.clip_grad_norm_(params_with(grads), 0.5 * truth, backend=backend.name)
    assert_scaled_like_oracle(cpu(grads), originals, truth, 0.5 * truth, 1e-5)


def test_mixed_dtypes_accumulate_each_chunk_in_its_own_dtype(backend):
    """float32 chunks accumulate in float32 even when a float64 tensor makes the output float64,
    as the CPU backend does: 1 + 2^-24 (the sum of squares of [1, 2^-12]) rounds to 1 in
    float32 (a tie, to even), and would stay 1 + 2^-24 in float64."""
    grads = [torch.tensor([1.0, 2.0**-12]), torch.zeros(3, dtype=torch.float64)]
    cpu_statistic, _ = ops.multi_tensor_norm(clone_all(grads), 2.0, False)
    statistic, _ = _ops.run("multi_tensor_norm", backend.name, backend.on(grads), 2.0, False)
    assert statistic.dtype == torch.float64
    assert float(statistic) == float(cpu_statistic) == 1.0
    dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.float16] * 3
    grads = make_grads([(TRITON_CHUNK + 77,), (500,), (3000,), (TRITON_CHUNK - 3,)] * 3, dtypes, seed=43)
    for norm_type in (2.0, 1.0, 3.0):
        cpu_statistic, _ = ops.multi_tensor_norm(clone_all(grads), norm_type, False)
        statistic, _ = _ops.run("multi_tensor_norm", backend.name, backend.on(grads), norm_type, False)
        assert float(statistic) == pytest.approx(float(cpu_statistic), rel=1e-6, abs=0)


# --- the in-place primitives ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_multi_tensor_scale_(backend, dtype):
    originals = make_grads(SHAPES, dtype, seed=50)
    grads = backend.on(originals)
    for coef in (1.0, 1.5, math.inf):  # coef >= 1: nothing is written
        _ops.run("multi_tensor_scale_", backend.name, grads, backend.tensor(coef))
        assert_bitwise_equal(cpu(grads), originals)
    for coef_dtype in (torch.float32, torch.float64, torch.bfloat16):
        grads = backend.on(originals)
        coef = torch.tensor(0.3721, dtype=coef_dtype)
        _ops.run("multi_tensor_scale_", backend.name, grads, coef.to(backend.device))
        # applied in float32 (float64 for float64 grads): a float64 coefficient is rounded first
        assert_bitwise_equal(cpu(grads), scaled_by_coef(originals, coef.double()))
    grads = backend.on(originals)
    _ops.run("multi_tensor_scale_", backend.name, grads, backend.tensor(float("nan")))
    assert all(g.isnan().all() for g in grads)


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_multi_tensor_clamp_(backend, dtype):
    originals = make_grads(SHAPES, dtype, seed=52, scale=2.0)
    originals[4][::7] = float("nan")  # (70001,)
    originals[9][::7] = float("nan")  # (8, 129)
    originals[11][::3] = float("inf")  # (TRITON_CHUNK,)
    expected = [g.clone().clamp_(-0.25, 1.5) for g in originals]
    grads = backend.on(originals)
    _ops.run("multi_tensor_clamp_", backend.name, grads, -0.25, 1.5)
    assert_bitwise_equal(cpu(grads), expected, any_nan=True)  # nan stays nan (its payload may not)


FUSED_MIXES = {
    "float32-norm": [torch.float32, torch.bfloat16] * 7 + [torch.float16],
    # four dtypes in one call: four norm passes, one float64 result, then four scales
    "float64-norm": [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.complex64] * 3,
}


@pytest.mark.parametrize("norm_type", STAT_NORM_TYPES, ids=norm_id)
@pytest.mark.parametrize("mix", sorted(FUSED_MIXES))
def test_fused_clip_grad_norm_op(backend, mix, norm_type):
    dtypes = FUSED_MIXES[mix]
    originals = make_grads(SHAPES, dtypes, seed=53)
    assert len(originals) == len(SHAPES)
    truth = oracle_norm(originals, norm_type)
    grads = backend.on(originals)
    total = _ops.run("clip_grad_norm_", backend.name, grads, 0.5 * truth, norm_type)
    assert total.dtype == expected_dtype(dtypes) and total.device == grads[0].device
    assert_norm_close(total.cpu(), truth, norm_rtol(1e-5, norm_type))
    assert_bitwise_equal(cpu(grads), scaled_by_returned_norm(originals, total.cpu(), 0.5 * truth))


def test_scale_and_clamp_agree_bitwise_with_backend_torch(backend):
    grads = make_grads(SHAPES, torch.bfloat16, seed=54, scale=2.0)
    a, b = backend.on(grads), backend.on(grads)
    _ops.run("multi_tensor_scale_", backend.name, a, backend.tensor(0.61))
    _ops.run("multi_tensor_scale_", "torch", b, backend.tensor(0.61))
    assert_bitwise_equal(cpu(a), cpu(b))
    _ops.run("multi_tensor_clamp_", backend.name, a, -0.3, 0.2)
    _ops.run("multi_tensor_clamp_", "torch", b, -0.3, 0.2)
    assert_bitwise_equal(cpu(a), cpu(b))


def test_grads_sharing_memory_scaled_once_per_occurrence(backend):
    g = backend.on(make_grads([(50,)], torch.float32, seed=18))[0]
    expected = g.cpu().clone()
    coef = torch.tensor(0.5)
    expected.mul_(coef)
    expected.mul_(coef)
    expected[10:20].mul_(coef)
    _ops.run("multi_tensor_scale_", backend.name, [g, g, g[10:20]], coef.to(backend.device))
    assert_bitwise_equal([g.cpu()], [expected])


def test_clip_of_non_contiguous_complex_and_shared_grads(backend):
    base = rand_tensor((64, 33), torch.float32, seeded(156))
    complex_grad = rand_tensor((17, 5), torch.complex64, seeded(157))
    shared = rand_tensor((300,), torch.float32, seeded(158))

    def grads_of(b, c, s):  # a transposed view, a strided view of the same memory, complex, s twice
        return [b.t(), b[:, ::2], c, s, s]

    truth = oracle_norm(grads_of(base, complex_grad, shared), 2.0)
    on_device = backend.on([base, complex_grad, shared])
    total = _ops.run("clip_grad_norm_", backend.name, grads_of(*on_device), 0.5 * truth, 2.0)
    assert float(total) == pytest.approx(truth, rel=1e-5)
    # torch's order: tensor by tensor, so shared bytes are scaled once per occurrence
    coef = ((total.cpu() + 1e-6).reciprocal() * (0.5 * truth)).clamp(max=1.0)
    expected = [base.clone(), complex_grad.clone(), shared.clone()]
    for g in grads_of(*expected):
        real = torch.view_as_real(g) if g.is_complex() else g
        real.copy_(real * coef)
    assert_bitwise_equal(cpu(on_device), expected)


def test_in_place_operators_bump_version_counters(backend):
    """Autograd sees every in-place write: each written tensor's version counter moves."""
    grads = backend.on(make_grads([(10,), (TRITON_CHUNK + 2,), (0,)], torch.float32, seed=50))
    for name, args in (("clip_grad_norm_", (0.1, 2.0)),
                       ("multi_tensor_scale_", (backend.tensor(0.5),)),
                       ("multi_tensor_clamp_", (-0.1, 0.1))):
        versions = [g._version for g in grads]
        _ops.run(name, backend.name, grads, *args)
        bumped = [g._version > v for g, v in zip(grads, versions)]
        if backend.name == "torch":  # reference.py leaves a zero-size tensor alone, its counter too
            assert bumped == [True, True, False], name
        else:  # the kernels bump every tensor of the list, zero-size ones included
            assert all(bumped), name
    versions = [g._version for g in grads]
    _ops.run("multi_tensor_norm", backend.name, grads, 2.0)
    assert [g._version for g in grads] == versions


def test_fake_kernels_give_shapes_and_dtypes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        grads = [torch.empty(5), torch.empty(3, 2, dtype=torch.float64), torch.empty(0)]
        total, per = ops.multi_tensor_norm(grads, 2.0, True)
        assert total.shape == () and per.shape == (3,) and total.dtype == torch.float64
        total, per = ops.multi_tensor_norm(grads[:1], 2.0, False)
        assert per.shape == (0,) and total.dtype == torch.float32
        assert ops.clip_grad_norm_(grads, 1.0, 2.0).dtype == torch.float64


# Sizes straddling every vector width, Triton's block (2,048) and every backend's chunk.
BOUNDARY_SIZES = sorted({1, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 1023, 2047, 2048, 2049}
                        | {c + d for c in (TRITON_CHUNK, CPU_CHUNK, CUDA_CHUNK) for d in (-1, 0, 1)}
                        | {2 * TRITON_CHUNK + 3, 2 * CUDA_CHUNK + 1})


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_no_access_outside_each_tensor(backend, dtype):
    """Contiguous tensors carved from one nan-filled buffer with gaps between them: a kernel
    that reads past a tensor's end makes the norm nan, one that writes past it changes a gap."""
    poisoned = poisoned_buffer(BOUNDARY_SIZES, dtype, seed=55, device=backend.device)
    tensors = poisoned.tensors()
    originals = clone_all(cpu(tensors))
    for norm_type in (2.0, 1.0, 3.5, math.inf, -math.inf, 0.0):
        total, per = _ops.run("multi_tensor_norm", backend.name, tensors, norm_type, True)
        assert not total.isnan() and not per.isnan().any(), norm_type
        expected = [oracle_statistic(t, norm_type) for t in originals]
        rtol = 1e-5 if norm_type in (0.0, 1.0, 2.0) or math.isinf(norm_type) else 1e-4
        for value, want in zip(per.tolist(), expected):
            assert value == pytest.approx(want, rel=rtol)
    _ops.run("multi_tensor_scale_", backend.name, tensors, backend.tensor(0.43))
    assert poisoned.poison_intact(), "scale wrote outside a tensor"
    # the float32 coefficient, widened for float64 tensors
    scaled = scaled_by_coef(originals, torch.tensor(0.43))
    assert_bitwise_equal(cpu(tensors), scaled)
    _ops.run("multi_tensor_clamp_", backend.name, tensors, -0.5, 0.5)
    assert poisoned.poison_intact(), "clamp wrote outside a tensor"
    clamped = [t.clamp(-0.5, 0.5) for t in scaled]
    assert_bitwise_equal(cpu(tensors), clamped)
    total = _ops.run("clip_grad_norm_", backend.name, tensors, 0.01, 2.0)
    assert not total.isnan()
    assert poisoned.poison_intact(), "clip_grad_norm_ wrote outside a tensor"
    assert_norm_close(total.cpu(), oracle_norm(clamped, 2.0), 1e-5)
    assert_bitwise_equal(cpu(tensors), scaled_by_returned_norm(clamped, total.cpu(), 0.01))


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, 3.0])
def test_norm_bits_do_not_depend_on_memory_order(backend, norm_type):
    # The kernels walk tensors allocated last-first backwards; the partials and their order of
    # combination are the same, so the bits are too.
    values = [torch.randn(n, generator=torch.Generator().manual_seed(n)) for n in (70001, 3, 40000, 999)]
    forward = backend.on(values)
    backward = [None] * len(values)
    for i in reversed(range(len(values))):
        backward[i] = values[i].to(backend.device, copy=True)
    a, _ = _ops.run("multi_tensor_norm", backend.name, forward, norm_type)
    b, _ = _ops.run("multi_tensor_norm", backend.name, backward, norm_type)
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_bitwise_repeatable(backend, dtype):
    grads = backend.on(make_grads(SHAPES + [(3 * TRITON_CHUNK + 11,)], dtype, seed=12))
    for norm_type in (2.0, 3.5, math.inf, 0.0):
        first, per = _ops.run("multi_tensor_norm", backend.name, grads, norm_type, True)
        for _ in range(2):
            again, per_again = _ops.run("multi_tensor_norm", backend.name, clone_all(grads), norm_type, True)
            assert torch.equal(first, again) and torch.equal(per, per_again)
    a, b = clone_all(grads), clone_all(grads)
    ta = _ops.run("clip_grad_norm_", backend.name, a, 0.1, 2.0)
    tb = _ops.run("clip_grad_norm_", backend.name, b, 0.1, 2.0)
    assert torch.equal(ta, tb)
    assert_bitwise_equal(cpu(a), cpu(b))


# --- what the backends share ------------------------------------------------------------------------


def test_operator_table_says_what_runs_each_operator():
    """Every (operator, backend) that can run here has one kernel: the backend's own where the
    table says "kernel", reference.py's where it says "torch" (no silent fallback elsewhere)."""
    from fusedclip import reference

    table = _ops.operator_table()
    assert set(table) == set(_ops.NATIVE_BACKENDS) == set(_ops.KERNELS)
    status = _backends.backend_status()
    for op, row in table.items():
        for backend, what in row.items():
            if status[backend] is not None:
                assert what == "unavailable" and backend not in _ops.KERNELS[op], (op, backend)
                continue
            kernel = _ops.KERNELS[op][backend]
            if what == "torch" or backend == "torch":
                assert kernel is getattr(reference, op), (op, backend)
            else:
                assert kernel is not getattr(reference, op) and what == "kernel", (op, backend)


def test_every_namespace_has_the_schemas_of_fusedclip_operators():
    """Both namespaces are defined from fusedclip/operators.py, each schema written once there:
    the native kernels register for fusedclip::, the Triton ones define fusedclip_triton::."""
    from fusedclip import operators

    namespaces = [torch.ops.fusedclip]
    if fusedclip.backend_status()["triton"] is None:
        namespaces.append(torch.ops.fusedclip_triton)
    for name, operator in operators.OPERATORS.items():
        for namespace in namespaces:
            schema = str(getattr(namespace, name).default._schema)
            assert schema.split("::", 1)[1] == name + operator.schema, (namespace, name)


def test_native_backends_are_read_from_the_registered_kernels():
    """NATIVE_BACKENDS is derived: the dispatcher's CPU and CUDA kernels, the Triton library."""
    for name, backends in _ops.NATIVE_BACKENDS.items():
        assert ("cpu" in backends) == (_backends._C is not None)
        assert ("cuda" in backends) == (_backends._C_CUDA is not None)
        assert backends[-1] == "torch"


@pytest.mark.parametrize("norm_type", [2.0, 1.0, 0.0, 3.5, -2.0, math.inf, -math.inf], ids=norm_id)
def test_backend_torch_norm_of_many_small_tensors_is_a_few_ops_per_dtype(monkeypatch, norm_type):
    """Backend "torch" (reference.py, the fallback of devices without kernels) reduces tensors of
    less than a row with one foreach norm per dtype, not a dozen ops per tensor (1,000 such
    tensors took it 30 ms on CPU against torch's 5): the same ATen op count for 40 tensors as
    for 400, and per tensor the statistic of the row-by-row path (bitwise, but for the float64
    power of general p)."""
    from fusedclip import reference

    def grads(count):
        shapes = [(n % 37 + 1,) for n in range(count)] + [(3000,), (0,), (1023,), (1024,)]
        dtypes = [torch.float32, torch.bfloat16, torch.float64] * (len(shapes) // 3 + 1)
        return make_grads(shapes, dtypes[:len(shapes)], seed=170)

    counts = []
    for count in (40, 400, None):
        # None: one dtype, every tensor under a row (the foreach norm's result is the statistics)
        tensors = grads(count) if count else make_grads([(n % 37 + 1,) for n in range(50)], torch.bfloat16, seed=171)
        mode = count_aten(monkeypatch, lambda: reference.multi_tensor_norm(tensors, norm_type, per_tensor=True))
        counts.append(len(mode.aten))
        total, per = reference.multi_tensor_norm(tensors, norm_type, per_tensor=True)
        acc = total.dtype
        one_by_one = torch.stack([reference._tensor_statistic(t, norm_type, accumulate_dtype([t])).to(acc)
                                  for t in tensors])
        if norm_type in (0.0, 1.0, 2.0, math.inf, -math.inf):
            assert_bitwise_equal([per], [one_by_one])
        else:  # |x|^p of many norms at once: a vectorised float64 pow, within an ulp of one at a time
            torch.testing.assert_close(per, one_by_one, rtol=1e-15, atol=0)
    assert counts[0] == counts[1] < 60 and counts[2] < 20, counts
