"""The contracts of the operators of AGC, per-tensor clipping, gradient health and AMP
(multi_tensor_unscale_norm, clip_grad_norm_with_norms_, multi_tensor_scale_per_tensor_,
multi_tensor_agc_, monitor_update_), written once and run on every backend (the ``backend``
fixture, conftest.py: cpu, torch, triton, cuda) through fusedclip._ops. Each backend is compared
with backend "cpu" (torch.ops.fusedclip, the C++ kernels, on CPU copies of the same tensors) and
with the float64 oracles: dtypes, zero-size tensors at every position, sizes on both sides of
every backend's chunk, strided and shared tensors, nan and inf, many tensors, opcheck, version
counters, bitwise repeatability, refusals that leave every tensor alone, and fewer ATen operators
than tensors.

The first four operators' contracts are in test_ops.py. What one backend alone does (Triton's
tables, alignment, graph lifetimes, programs in any order; the CUDA kernels' table tiers, launch
paths, graph capture, huge tensors, no host sync) is in test_triton_operators.py and
test_cuda_operators.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._pytree import tree_leaves

from fusedclip import _ops, reference
from helpers import (
    CPU_CHUNK,
    CUDA_CHUNK,
    TRITON_CHUNK,
    ULP,
    assert_bitwise_equal,
    assert_norm_close,
    clone_all,
    count_aten,
    cpu,
    expected_dtype,
    make_grads,
    monitor_state,
    norm_id,
    norm_rtol,
    operator_of,
    oracle_norm,
    oracle_statistic,
    rand_tensor,
    scaled_by_coef,
    scaled_by_returned_norm,
    seeded,
)
from test_adaptive import agc_case, assert_close_to, reference_agc

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

CPU = torch.ops.fusedclip
ALL_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64, torch.complex128]
FLOATS = ALL_DTYPES[:4]
NORM_TYPES = (2.0, 1.0, 3.5, 0.5, -2.0, math.inf, -math.inf, 0.0)

# Odd sizes; zero-size tensors first, in the middle and last; sizes on both sides of Triton's
# chunk (16384) and the CUDA kernels' (65536); 70001: three CPU chunks, two CUDA chunks.
SHAPES = [(0,), (37,), (8, 129), (TRITON_CHUNK - 1,), (1,), (3, 0), (TRITON_CHUNK + 1,), (5, 6, 7),
          (CUDA_CHUNK - 1,), (2, 0, 3), (70001,), (0, 4)]
EMPTY = [i for i, s in enumerate(SHAPES) if 0 in s]
assert 2 * CPU_CHUNK < 70001 < 3 * CPU_CHUNK
INTERPRETER_SKIP = ("Triton's interpreter runs one program per chunk (about 5 ms each): counts past 1,000 run on "
                    "CUDA tensors")


def _interpreted(backend) -> bool:
    return backend.name == "triton" and backend.device.type == "cpu"


def copied(args, device) -> list:
    """args with every tensor and list of tensors copied to device (new tensors on the CPU too)."""
    return [[t.to(device, copy=True) for t in a] if isinstance(a, list)
            else a.to(device, copy=True) if isinstance(a, torch.Tensor) else a for a in args]


def both(backend, name: str, *args):
    """((name on the backend with args copied to its device, the args it ran on), (the same on
    backend "cpu", torch.ops.fusedclip, with args copied to the CPU))."""
    ours, theirs = copied(args, backend.device), copied(args, torch.device("cpu"))
    return (_ops.run(name, backend.name, *ours), ours), (getattr(CPU, name)(*theirs), theirs)


def assert_close_values(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    """Same dtype and shape; values within rtol, inf and nan where expected."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, (actual, expected)
    torch.testing.assert_close(actual.cpu(), expected, rtol=rtol, atol=0, equal_nan=True)


def _stat_rtol(dtype, norm_type) -> float:
    """A statistic: float64 accumulation, or float32 (general p looser)."""
    if dtype in (torch.float64, torch.complex128):
        return 1e-12
    return 1e-5 if norm_type in (0.0, 1.0, 2.0) or math.isinf(norm_type) else 1e-4




def _refuses(backend):
    if backend.name == "torch":
        pytest.skip("backend 'torch' (reference.py) relies on its callers' checks; the operators check themselves")


# --- multi_tensor_unscale_norm -----------------------------------------------------------------------


def unscaled_oracle(grads, inv_scale: torch.Tensor, norm_type) -> float:
    """The float64 statistic of the concatenation of grads * inv_scale."""
    per = [oracle_statistic(g.to(torch.complex128 if g.is_complex() else torch.float64) * float(inv_scale),
                            norm_type) for g in grads]
    return {math.inf: max, -math.inf: min}.get(norm_type, sum)(per)


def unscaled_like_torch(grads, inv_scale):
    """The grads torch's unscale_ leaves (x * inv_scale, rounded to the product dtype)."""
    out = []
    for g in grads:
        copy = g.clone().float() if g.dtype in (torch.float16, torch.bfloat16) else g.clone()
        torch._amp_foreach_non_finite_check_and_unscale_([copy], torch.zeros(()), inv_scale)
        out.append(copy)
    return out


@pytest.mark.parametrize("norm_type", NORM_TYPES, ids=norm_id)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_unscale_norm_matches_cpu_and_oracle(backend, dtype, norm_type):
    grads = make_grads(SHAPES, dtype, seed=101, scale=3000.0)
    grads[1][::5] = 0  # exact zeros: the 0-norm
    rtol = _stat_rtol(dtype, norm_type)
    for inv_scale in (torch.tensor(1 / 3000.0), torch.tensor(1 / 3000.0, dtype=torch.float64)):  # the product rounds
        ((statistic, found), ran), ((cpu_statistic, cpu_found), _) = both(
            backend, "multi_tensor_unscale_norm", grads, inv_scale, norm_type)
        assert statistic.dtype == expected_dtype([dtype]) and statistic.shape == ()
        assert found.shape == () and found.dtype == torch.float32 and float(found) == float(cpu_found) == 0.0
        assert statistic.device == found.device == backend.device
        assert_close_values(statistic, cpu_statistic, rtol)
        assert float(statistic) == pytest.approx(unscaled_oracle(grads, inv_scale, norm_type), rel=rtol, abs=0)
        if not dtype.is_complex and inv_scale.dtype == torch.float32:
            like_torch = [oracle_statistic(g, norm_type) for g in unscaled_like_torch(grads, inv_scale)]
            want = {math.inf: max, -math.inf: min}.get(norm_type, sum)(like_torch)
            assert float(statistic) == pytest.approx(want, rel=max(rtol, 1e-10), abs=0)
        assert_bitwise_equal(cpu(ran[0]), grads)  # read only


def test_unscale_norm_reads_only(backend):
    grads = backend.on(make_grads(SHAPES, torch.float32, seed=73))
    before, versions = clone_all(cpu(grads)), [g._version for g in grads]
    _ops.run("multi_tensor_unscale_norm", backend.name, grads, backend.tensor(0.25), 2.0)
    assert_bitwise_equal(cpu(grads), before)
    assert [g._version for g in grads] == versions


FOUND_SHAPES = [(CUDA_CHUNK + 5,), (3000,), (0,), (10,), (41,), (5, 6, 7)]
# The first element; the vector body and tail; the elements past each backend's chunk.
FOUND_AT = [(0, 0), (0, TRITON_CHUNK + 3), (0, CPU_CHUNK), (0, CUDA_CHUNK + 2), (1, 1027), (1, 2047), (3, 9), (4, 40),
            (5, 209)]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("dtype", FLOATS + ["mixed"], ids=str)
def test_unscale_norm_found_inf(backend, dtype, bad):
    """found_inf is 1 for an inf or nan anywhere (any chunk, dtype and launch), as the CPU says,
    whatever the norm makes of it (an inf does not change the min)."""
    dtypes = [torch.float32, torch.bfloat16, torch.float64, torch.float16, torch.float32, torch.bfloat16] \
        if dtype == "mixed" else dtype
    for tensor, position in FOUND_AT:
        grads = make_grads(FOUND_SHAPES, dtypes, seed=102)
        grads[tensor].view(-1)[position] = bad
        for norm_type in (2.0, -math.inf, 0.0):
            ((statistic, found), _), ((cpu_statistic, cpu_found), _) = both(
                backend, "multi_tensor_unscale_norm", grads, torch.tensor(0.5, dtype=torch.float64), norm_type)
            assert float(found) == float(cpu_found) == 1.0, (tensor, position, norm_type)
            assert_close_values(statistic, cpu_statistic, 1e-5)
            if norm_type == 2.0:
                assert not math.isfinite(float(statistic))


def test_unscale_norm_finite_overflow_and_zero_scale(backend):
    """A finite x whose product overflows is not counted (torch checks x itself), a zero scale
    neither (an empty list has found_inf 0 too: the next test)."""
    grads = make_grads([(100,), (TRITON_CHUNK + 1,)], torch.float32, seed=103)
    grads[0][:7] = 3e38
    for inv_scale in (torch.tensor(4.0), torch.tensor(3e38), torch.tensor(0.0)):
        found_torch = torch.zeros(())
        torch._amp_foreach_non_finite_check_and_unscale_(clone_all(grads), found_torch, inv_scale)
        ((statistic, found), _), ((cpu_statistic, cpu_found), _) = both(
            backend, "multi_tensor_unscale_norm", grads, inv_scale, 2.0)
        assert float(found) == float(cpu_found) == float(found_torch) == 0.0
        assert torch.equal(statistic.cpu(), cpu_statistic)
        assert math.isinf(float(statistic)) == (float(inv_scale) != 0.0)


def test_unscale_norm_of_no_tensors(backend):
    statistic, found = _ops.run("multi_tensor_unscale_norm", backend.name, [], backend.tensor(0.5), -math.inf)
    assert float(statistic) == math.inf and float(found) == 0.0


# --- clip_grad_norm_with_norms_ ---------------------------------------------------------------------


@pytest.mark.parametrize("norm_type", NORM_TYPES, ids=norm_id)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_clip_with_norms_matches_cpu_and_oracle(backend, dtype, norm_type):
    grads = make_grads(SHAPES, dtype, seed=104)
    truth = oracle_norm(grads, norm_type)
    rtol = norm_rtol(1e-5, norm_type, dtype)
    for max_norm in (0.3 * truth, 2.0 * truth + 1.0):  # clips; does not
        ((total, per), ran), ((cpu_total, cpu_per), _) = both(
            backend, "clip_grad_norm_with_norms_", grads, max_norm, norm_type)
        assert total.dtype == per.dtype == expected_dtype([dtype]) and per.shape == (len(grads),)
        assert total.device == per.device == backend.device
        assert_close_values(total, cpu_total, rtol)
        assert_close_values(per, cpu_per, rtol)
        assert_norm_close(total.cpu(), truth, rtol)
        for i, (value, g) in enumerate(zip(per.tolist(), grads)):
            assert value == pytest.approx(oracle_norm([g], norm_type), rel=rtol, abs=0), i
        assert all(per.tolist()[i] == 0.0 for i in EMPTY)  # no elements: norm 0 for every p
        # The grads as the fused clip scales them: the coefficient of the returned norm, bit for bit.
        assert_bitwise_equal(cpu(ran[0]), scaled_by_returned_norm(grads, total.cpu(), max_norm))


def test_clip_with_norms_nan_inf_and_no_elements(backend):
    grads = make_grads([(TRITON_CHUNK + 9,), (5,), (0,), (CUDA_CHUNK + 3,)], torch.float32, seed=105)
    grads[0][TRITON_CHUNK + 2] = math.nan
    grads[1][3] = math.inf
    for norm_type in (2.0, math.inf, -math.inf, 3.5):
        ((total, per), _), ((cpu_total, cpu_per), _) = both(backend, "clip_grad_norm_with_norms_", grads, 1.0,
                                                            norm_type)
        assert total.isnan() and per[0].isnan() and per.tolist()[2] == 0.0 and not per[3].isnan()
        assert_close_values(per, cpu_per, 1e-5)
    grads[0][TRITON_CHUNK + 2] = 0.0  # inf alone: an inf norm, and inf * 0 makes the grads nan
    ((total, per), ran), ((cpu_total, _), cpu_ran) = both(backend, "clip_grad_norm_with_norms_", grads, 1.0, 2.0)
    assert float(total) == float(cpu_total) == math.inf and float(per[1]) == math.inf
    assert_bitwise_equal(cpu(ran[0]), cpu_ran[0], any_nan=True)
    empty = backend.on([torch.empty(0), torch.empty(3, 0, dtype=torch.float64)])
    total, per = _ops.run("clip_grad_norm_with_norms_", backend.name, empty, 1.0, -math.inf)
    assert float(total) == 0.0 and per.tolist() == [0.0, 0.0] and per.dtype == torch.float64


# --- multi_tensor_scale_per_tensor_ -----------------------------------------------------------------

COEFS = [0.37, 1.0, 2.5, 0.0, math.nan, 0.9999999, math.inf, 1e-3, -0.5, 0.81, 0.25, 1.0]
assert len(COEFS) == len(SHAPES)


def _grads_for_scale(dtype, seed):
    grads = make_grads(SHAPES, dtype, seed=seed)
    grads[7] = grads[7].transpose(0, 2)  # non-contiguous: scaled in place, strides kept
    return grads


@pytest.mark.parametrize("coefs_of", ["float32", "float64-strided", "bfloat16"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_scale_per_tensor_is_the_cpu_bitwise(backend, dtype, coefs_of):
    """Each tensor scaled by its own coefficient exactly as the C++ kernel scales it (applied as
    multi_tensor_scale_ applies its coef); a tensor whose coefficient is >= 1 keeps its bits."""
    grads = _grads_for_scale(dtype, seed=106)
    if coefs_of == "float64-strided":
        coefs = torch.zeros(2 * len(COEFS), dtype=torch.float64)[::2]
        coefs.copy_(torch.tensor(COEFS, dtype=torch.float64))
    else:
        coefs = torch.tensor(COEFS, dtype=getattr(torch, coefs_of))
    (_, ran), (_, cpu_ran) = both(backend, "multi_tensor_scale_per_tensor_", grads, coefs)
    assert_bitwise_equal(cpu(ran[0]), cpu_ran[0], any_nan=True)  # a GPU's nan is canonical
    assert ran[0][7].stride() == grads[7].stride()
    for i, (g, o, c) in enumerate(zip(cpu(ran[0]), grads, coefs.tolist())):
        if c >= 1:
            assert_bitwise_equal([g], [o])  # not written
        else:
            assert_bitwise_equal([g], scaled_by_coef([o], torch.tensor(c, dtype=coefs.dtype)), any_nan=True)


def _aliased_grads(device, seed):
    """A gradient twice, a strided view of it, a transposed one: shared and non-dense memory."""
    gen = seeded(seed)
    base = rand_tensor((40, 6000), torch.float32, gen).to(device)
    other = rand_tensor((4100, 3), torch.float32, gen).to(device)
    return [base, base[:, ::2], other.t(), base], (base, other)


def test_scale_per_tensor_strided_coefs_shared_and_non_dense_grads(backend):
    """Through shared memory in list order, as torch's per-tensor loop (and the CPU kernel); a
    tensor listed twice and a view of it scaled once per occurrence."""
    coefs = torch.tensor([0.5, 9.0, 0.25, 0.0, 0.75, 0.0, 0.125, 0.0])[::2]  # strided: 0.5, 0.25, 0.75, 0.125
    want_list, want = _aliased_grads("cpu", 250)
    CPU.multi_tensor_scale_per_tensor_(want_list, coefs.contiguous())
    got_list, got = _aliased_grads(backend.device, 250)
    _ops.run("multi_tensor_scale_per_tensor_", backend.name, got_list, coefs.to(backend.device))
    assert_bitwise_equal(cpu(got), list(want))
    values = make_grads([(6, 4)], torch.float32, seed=116, scale=2.0)[0]
    storage = backend.on([values])[0]
    _ops.run("multi_tensor_scale_per_tensor_", backend.name, [storage, storage[2:5], storage],
                                        backend.tensor([0.5, 0.25, 0.9]))
    expected = values.clone()
    for view, c in ((expected, 0.5), (expected[2:5], 0.25), (expected, 0.9)):
        view.copy_(scaled_by_coef([view], torch.tensor(c))[0])
    assert_bitwise_equal(cpu([storage]), [expected])


@pytest.mark.parametrize("count", [5, 40, 300, 1600])
@pytest.mark.parametrize("dtype", FLOATS + [torch.complex64], ids=str)
def test_scale_per_tensor_many_tensors(backend, dtype, count):
    """Coefficients below 1, at 1, above 1 and nan; lists at every CUDA tier and past one table
    (the coefficient of tensor i of the second table is coefs[first_tensor + i])."""
    if _interpreted(backend) and count > 1000:
        pytest.skip(INTERPRETER_SKIP)
    gen = seeded(240 + count)
    grads = [rand_tensor((int(n),), dtype, gen) for n in torch.randint(0, 3000, (count,), generator=gen)]
    grads[1] = rand_tensor((2 * CUDA_CHUNK + 9,), dtype, gen)
    coefs = torch.rand(count, generator=gen, dtype=torch.float64) * 1.5
    coefs[::5] = 1.0
    coefs[3] = math.nan
    coefs = coefs.float()
    expected = [scaled_by_coef([g], c)[0] if float(c) < 1.0 or math.isnan(float(c)) else g.clone()
                for g, c in zip(grads, coefs)]
    on_device = backend.on(grads)
    _ops.run("multi_tensor_scale_per_tensor_", backend.name, on_device, coefs.to(backend.device))
    assert_bitwise_equal(cpu(on_device), expected, any_nan=True)


# --- multi_tensor_agc_ --------------------------------------------------------------------------------

# Units: rows of at most a chunk (many to a piece), rows longer than Triton's chunk (cut in parts)
# and than the CUDA kernels' (a second launch), a 1-dim unit longer than a CUDA chunk; rows of 1, 3, 33, 4096 (the longest a CUDA lane
# group clips) and 4097 (a block per row); 1-dim tensors short and long, a 0-dim one, conv
# weights, and tensors with no elements first, in the middle and last.
AGC_SHAPES = [(0,), (7, 33), (TRITON_CHUNK + 5,), (3, TRITON_CHUNK + 7), (4, 2, 3, 3), (), (1, 0), (65, 257),
              (100,), (300, 1), (500, 3), (6, 4096), (5, 4097), (2, CUDA_CHUNK + 1), (CUDA_CHUNK + 7,), (7, 5, 2),
              (0, 3)]
AGC_DTYPES = {"float32": (torch.float32, torch.float32), "float64": (torch.float64, torch.float64),
              "float16": (torch.float16, torch.float16), "bfloat16": (torch.bfloat16, torch.bfloat16),
              "bfloat16-float32": (torch.bfloat16, torch.float32), "float32-float64": (torch.float32, torch.float64),
              "bfloat16-mixed": (torch.bfloat16, [torch.float32, torch.float64, torch.float16, torch.bfloat16])}


def agc_inputs(shapes, dtype, param_dtypes, seed):
    """(grads, params): parameter units of scales 1e-2 .. 1e3 against gradients of scale 1, so that
    at clip_factor 0.05 some units clip and some do not. param_dtypes: one dtype or a cycle."""
    gen = seeded(seed)
    grads = [rand_tensor(s, dtype, gen) for s in shapes]
    cycle = param_dtypes if isinstance(param_dtypes, list) else [param_dtypes]
    params = []
    for i, s in enumerate(shapes):
        rows = s[0] if len(s) > 1 else 1
        scale = 10.0 ** (torch.rand(rows, generator=gen, dtype=torch.float64) * 5 - 2)
        scale = scale.reshape((rows,) + (1,) * (len(s) - 1)) if len(s) > 1 else scale.reshape(())
        params.append((rand_tensor(s, torch.float64, gen) * scale).to(cycle[i % len(cycle)]))
    return grads, params


def _agc_grad_rtol(backend, dtype) -> float:
    """AGC's grads against backend "cpu": 2 ulps (4 for the CUDA kernels), 2e-6 at least for
    backend "torch" (its coefficients from unit sums of float32 error, as against the oracle in
    test_agc_against_timm_loop; on agc_case's units, 2e-6 there)."""
    rtol = (4 if backend.name == "cuda" else 2) * ULP[dtype] + 1e-6
    return max(rtol, 1e-5) if backend.name == "torch" else rtol


def assert_agc_like_cpu(backend, grads, params, clip_factor=0.05, eps=1e-3, views=None):
    """AGC on the backend against backend "cpu": the sums of squares within float32's
    accumulation error (and of the float64 oracle), the grads within 2 ulps (4 for the CUDA
    kernels: the coefficients of two backends differ by their sums' rounding; _agc_grad_rtol). views(grads,
    params), when given, makes the tensors each backend runs on from copies of the inputs on its
    device. Returns the grads of both."""
    runs = []
    for run, where in ((lambda *a: _ops.run("multi_tensor_agc_", backend.name, *a), backend.device),
                       (CPU.multi_tensor_agc_, torch.device("cpu"))):
        ours = copied([grads, params], where)
        ours = ours if views is None else views(*ours)
        expected = [float(g.double().square().sum()) for g in ours[0]]
        runs.append((run(*ours, clip_factor, eps), ours[0]))
    ((total, per), ran), ((cpu_total, cpu_per), cpu_ran) = runs
    assert total.dtype == per.dtype == expected_dtype([g.dtype for g in grads]) and per.shape == (len(grads),)
    # float32 sums in another order: 2e-6 for tensors of up to three Triton chunks; 1e-5 (the
    # oracle's tolerance) past them, where float32's error of a long sum grows, and for backend
    # "torch", which sums a unit in one torch.linalg.vector_norm.
    def sums_rtol(numel):
        if cpu_total.dtype == torch.float64:
            return 1e-12
        return 1e-5 if backend.name == "torch" or numel > 3 * TRITON_CHUNK + 21 else 2e-6

    assert_close_values(total, cpu_total, max(sums_rtol(g.numel()) for g in grads))
    assert per.dtype == cpu_per.dtype and per.shape == cpu_per.shape
    for i, (a, e, g) in enumerate(zip(per.cpu(), cpu_per, grads)):
        torch.testing.assert_close(a, e, rtol=sums_rtol(g.numel()), atol=0, equal_nan=True, msg=lambda m: f"{i}: {m}")
    torch.testing.assert_close(per.cpu().double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=0,
                               equal_nan=True)
    for i, (a, e) in enumerate(zip(cpu(ran), cpu_ran)):
        torch.testing.assert_close(a, e, rtol=_agc_grad_rtol(backend, a.dtype), atol=0, equal_nan=True,
                                   msg=lambda m: f"grad {i}: {m}")
    return ran, cpu_ran


@pytest.mark.parametrize("dtypes", sorted(AGC_DTYPES))
def test_agc_matches_cpu(backend, dtypes):
    grads, params = agc_inputs(AGC_SHAPES, *AGC_DTYPES[dtypes], seed=107)
    ours, theirs = assert_agc_like_cpu(backend, grads, params)
    clipped = [not torch.equal(a, b) for t, g in zip(theirs, grads) if g.numel()
               for a, b in zip(t if g.dim() > 1 else [t], g if g.dim() > 1 else [g])]
    assert any(clipped) and not all(clipped)  # some units clip, some do not


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_agc_against_timm_loop(backend, dtype):
    """Against timm's adaptive_clip_grad loop in float64 (test_adaptive.py): the pre-clip sums of
    squares, the clipped grads, and the units that do not clip left exactly as they were. In
    Triton's interpreter float32 and bfloat16 only (about 17 s each; the other dtypes meet the
    C++ kernel in test_agc_matches_cpu)."""
    if _interpreted(backend) and dtype in (torch.float16, torch.float64):
        pytest.skip("Triton's interpreter: float32 and bfloat16 only (see the docstring)")
    params = agc_case(dtype, seed=5)
    originals = [p.grad.clone() for p in params]
    expected = reference_agc(params, 0.01, 1e-3)
    grads = backend.on(originals)
    total, per = _ops.run("multi_tensor_agc_", backend.name, grads, backend.on([p.detach() for p in params]), 0.01, 1e-3)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert total.dtype == per.dtype == acc and per.shape == (len(params),)
    want_per = [float(o.double().square().sum()) for o in originals]
    rtol = 1e-10 if dtype == torch.float64 else 1e-5
    for i, (value, want) in enumerate(zip(per.tolist(), want_per)):
        assert value == pytest.approx(want, rel=rtol, abs=1e-30), i
    assert float(total) == pytest.approx(sum(want_per), rel=rtol)
    grads = cpu(grads)
    for g, e in zip(grads, expected):
        assert_close_to(g, e, dtype)
    if dtype == torch.float32:  # the backend against the C++ kernel
        cpu_grads = clone_all(originals)
        CPU.multi_tensor_agc_(cpu_grads, [p.detach() for p in params], 0.01, 1e-3)
        for g, c in zip(grads, cpu_grads):
            torch.testing.assert_close(g, c, rtol=2e-6, atol=0)
    kept_somewhere = False
    for g, o, e in zip(grads, originals, expected):
        if g.dim() > 1 and g.numel():
            kept = (e == o.double()).flatten(1).all(1)
            kept_somewhere |= bool(kept.any())
            assert_bitwise_equal([g[kept]], [o[kept]])
    assert kept_somewhere


def test_agc_non_contiguous_tensors_and_nan_units(backend):
    """Units are rows of the row-major layout: transposed and strided grads and params go
    through contiguous copies (grads copied back, strides kept); a nan unit becomes nan and
    the others clip as they would."""
    grads, params = agc_inputs([(40, 30), (3 * TRITON_CHUNK,), (5, 6)], torch.float32, torch.float32, seed=108)
    grads[2][1, 4] = math.nan

    def views(g, p):
        return [g[0].t(), g[1][::2], g[2].t()], [p[0].t(), p[1][1::2], p[2].t().contiguous()]

    ours, _ = assert_agc_like_cpu(backend, grads, params, clip_factor=0.5, views=views)
    assert [g.stride() for g in ours] == [(1, 30), (2,), (1, 6)]
    assert ours[2][4].isnan().all() and not ours[2][:4].isnan().any()  # row 4 of the transposed view


def test_agc_shared_and_non_dense_gradients(backend):
    """Rows of non-contiguous gradients (row-major temporaries, written back) and gradients that
    share memory (clipped one at a time in list order, a later occurrence seeing the earlier
    clips), as the CPU kernel clips them."""
    gen = seeded(263)
    params = [rand_tensor(shape, torch.float32, gen) * 0.01 for shape in ((40, 6000), (40, 3000), (3, 4100), (40, 6000))]
    want_list, want = _aliased_grads("cpu", 264)
    want_total, want_per = CPU.multi_tensor_agc_(want_list, params, 0.01, 1e-3)
    got_list, got = _aliased_grads(backend.device, 264)
    total, per = _ops.run("multi_tensor_agc_", backend.name, got_list, backend.on(params), 0.01, 1e-3)
    assert_close_values(total, want_total, 1e-5)
    assert_close_values(per, want_per, 1e-5)
    for a, b in zip(cpu(got), want):
        # A unit's coefficient comes from its sum of squares, whose float32 rounding follows each
        # backend's (and each CPU instruction set's) order: a few ulps apart.
        torch.testing.assert_close(a, b, rtol=_agc_grad_rtol(backend, torch.float32), atol=1e-30)
    # a tensor listed twice and a view of it
    values = make_grads([(6, 4)], torch.float32, seed=116, scale=2.0)[0]
    units = [torch.full((6, 4), 1.0), torch.full((3, 4), 1.0), torch.full((6, 4), 1.0)]
    results = []
    for run, where in ((lambda *a: _ops.run("multi_tensor_agc_", backend.name, *a), backend.device),
                       (CPU.multi_tensor_agc_, torch.device("cpu"))):
        storage = values.to(where, copy=True)
        results.append((storage, run([storage, storage[2:5], storage], copied([units], where)[0], 0.1, 1e-3)))
    (storage, out), (cpu_storage, cpu_out) = results
    assert not torch.equal(cpu_storage, values)
    torch.testing.assert_close(storage.cpu(), cpu_storage, rtol=1e-6, atol=0)
    for a, b in zip(out, cpu_out):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=0)


# --- monitor_update_ ----------------------------------------------------------------------------------


def norm_steps(steps, size, dtype, seed):
    """Per step, norms around a per-entry scale with spikes, zeros, tiny values, nan and inf."""
    gen = seeded(seed)
    scale = torch.rand(size, generator=gen, dtype=torch.float64) * 10
    for _ in range(steps):
        norms = scale * (1 + 0.1 * torch.randn(size, generator=gen, dtype=torch.float64)).abs()
        kind = torch.randint(0, 40, (size,), generator=gen)
        norms[kind == 0] = norms[kind == 0] * 1e3
        norms[kind == 1] = 0.0
        norms[kind == 2] = 1e-9
        norms[kind == 3] = float("nan")
        norms[kind == 4] = float("inf")
        norms[:3] = 0.0  # always vanishing
        yield norms.to(dtype)


MONITOR_SETTINGS = {
    "defaults": dict(alpha=0.97, warmup_steps=25, z_threshold=3.0, explode_threshold=None, vanish_eps=1e-8,
                     vanish_steps=10),
    "short-warmup": dict(alpha=0.9, warmup_steps=4, z_threshold=2.7, explode_threshold=50.0, vanish_eps=1e-7,
                         vanish_steps=3),
    "edge": dict(alpha=0.0, warmup_steps=1, z_threshold=0.0, explode_threshold=0.3, vanish_eps=1e-30, vanish_steps=1),
    "warmup-3": dict(alpha=0.9, warmup_steps=3, z_threshold=2.0, explode_threshold=None, vanish_eps=1e-6,
                     vanish_steps=2),
    "warmup-5": dict(alpha=0.97, warmup_steps=5, z_threshold=2.7, explode_threshold=50.0, vanish_eps=1e-8,
                     vanish_steps=3),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("settings", sorted(MONITOR_SETTINGS))
def test_monitor_update_is_the_cpu_bitwise(backend, dtype, settings):
    """Steps of norms (1,500 entries: over two Triton programs) with nan, inf, zero, tiny and
    spiking entries through the warm-up and after it: every state tensor bit for bit the C++
    kernel's after every step (backend "torch" is reference.monitor_update_, the definition)."""
    size, args = 1500, tuple(MONITOR_SETTINGS[settings].values())
    ours, theirs = backend.on(monitor_state(size, dtype)), monitor_state(size, dtype)
    flags = {"exploding": 0, "vanishing": 0}
    for norms in norm_steps(60, size, dtype, seed=21):
        _ops.run("monitor_update_", backend.name, norms.to(backend.device), *ours, *args)
        CPU.monitor_update_(norms, *theirs, *args)
        assert_bitwise_equal(cpu(ours), theirs)  # the state holds no nan
        flags["exploding"] += int(theirs[5].sum())
        flags["vanishing"] += int(theirs[6].sum())
    assert flags["exploding"] > 0 and flags["vanishing"] > 0 and int(theirs[2].min()) > 0


# --- what the five operators share ---------------------------------------------------------------------


def small_calls(device, seed: int, count: int = 3):
    """(name, args, written) of each of the five operators (an entry here gives an operator the
    shared tests below and those of test_triton_operators.py) on `count` small float32 tensors (rows
    included), written being the tensors it writes."""
    grads = [t.to(device) for t in make_grads([(3, 4)] * count, torch.float32, seed=seed)]
    params = [t.to(device) for t in make_grads([(3, 4)] * count, torch.float32, seed=seed + 1, scale=0.01)]
    state = monitor_state(count, torch.float32, device)
    return [
        ("multi_tensor_unscale_norm", (grads, torch.tensor(0.5, device=device), 2.0), []),
        ("multi_tensor_agc_", (grads, params, 0.01, 1e-3), grads),
        ("multi_tensor_scale_per_tensor_", (grads, torch.linspace(0.1, 1.5, count, device=device)), grads),
        ("clip_grad_norm_with_norms_", (grads, 0.1, 2.0), grads),
        ("monitor_update_", (torch.rand(count, device=device), *state, 0.9, 2, 2.0, 1.0, 1e-6, 2), state),
    ]


def test_opcheck(backend):
    for name, args, _ in small_calls(backend.device, seed=113):
        torch.library.opcheck(operator_of(backend, name), args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_opcheck_by_dtype(backend, dtype):
    device = backend.device
    grads = backend.on(make_grads(SHAPES[:6], dtype, seed=70, scale=512.0))
    for norm_type in (2.0, math.inf):
        torch.library.opcheck(operator_of(backend, "multi_tensor_unscale_norm"),
                              (grads, torch.tensor(2.0**-9, device=device), norm_type))
    params = agc_case(dtype, seed=1)[:5]
    torch.library.opcheck(operator_of(backend, "multi_tensor_agc_"),
                          (backend.on([p.grad for p in params]), backend.on([p.detach() for p in params]), 0.01, 1e-3))
    norms = next(norm_steps(1, 37, torch.float64 if dtype == torch.float64 else torch.float32, seed=22))
    state = backend.on(monitor_state(37, norms.dtype))
    state[2].fill_(5)  # past the warm-up: the EMA branch
    torch.library.opcheck(operator_of(backend, "monitor_update_"),
                          (norms.to(device), *state, 0.97, 3, 3.0, 2.0, 1e-8, 10))
    torch.library.opcheck(operator_of(backend, "monitor_update_"),
                          (norms.to(device), *backend.on(monitor_state(37, norms.dtype)), 0.9, 3, 3.0, None, 1e-8, 2))


def test_opcheck_mixed_dtypes(backend):
    grads = backend.on(make_grads(SHAPES[:5], [torch.float32, torch.bfloat16, torch.float32, torch.float16,
                                               torch.float32], seed=6))
    for max_norm in (0.1, 1e6):  # clips; does not
        torch.library.opcheck(operator_of(backend, "clip_grad_norm_with_norms_"), (grads, max_norm, 2.0))
    grads = backend.on(make_grads([(33,), (4, 257), (0,), (70001,)], [torch.float32, torch.bfloat16, torch.float32,
                                                                      torch.float16], seed=2))
    for coefs in ([0.5, 1.0, 2.0, 0.25], [1.0, 1.0, 1.0, 1.0]):
        torch.library.opcheck(operator_of(backend, "multi_tensor_scale_per_tensor_"), (grads, backend.tensor(coefs)))


FIVE = [name for name, _, _ in small_calls("cpu", seed=0, count=1)]


@pytest.mark.parametrize("name", FIVE)
def test_version_counters_follow_the_writes(backend, name):
    """Every tensor an operator writes has its version counter bumped (autograd sees the write);
    what it only reads keeps its counter. The GPU kernels bump every tensor they may write (which
    ones a per-tensor scale leaves alone is known only on the device); backends "cpu" and "torch"
    may leave the counter of a tensor they did not write alone."""
    [(_, args, written)] = [call for call in small_calls(backend.device, seed=112) if call[0] == name]
    tensors = [t for t in tree_leaves(list(args)) if isinstance(t, torch.Tensor)]
    versions = {id(t): t._version for t in tensors}
    before = {id(t): t.clone() for t in tensors}
    _ops.run(name, backend.name, *args)
    for i, t in enumerate(tensors):
        bumped, may_write = t._version > versions[id(t)], any(t is w for w in written)
        if not may_write:
            assert not bumped, (name, i, tuple(t.shape))
        elif backend.name in ("cpu", "torch") and torch.equal(t, before[id(t)]):
            continue  # not written
        else:
            assert bumped, (name, i, tuple(t.shape))


def test_bitwise_repeatable(backend):
    """Each operator twice on copies of the same tensors: the same bits, results and writes."""
    grads, params = agc_inputs(AGC_SHAPES[:10], torch.float32, torch.float32, seed=262)
    coefs = torch.rand(len(grads), generator=seeded(263)) * 1.5
    calls = [("multi_tensor_unscale_norm", (grads, torch.tensor(0.3), 3.5)),
             ("multi_tensor_unscale_norm", (grads, torch.tensor(0.3), 2.0)),
             ("clip_grad_norm_with_norms_", (grads, 0.1, 2.0)),
             ("clip_grad_norm_with_norms_", (grads, 0.1, 3.5)),
             ("multi_tensor_scale_per_tensor_", (grads, coefs)),
             ("multi_tensor_agc_", (grads, params, 0.01, 1e-3))]
    for name, args in calls:
        runs = []
        for _ in range(2):
            ours = copied(args, backend.device)
            out = _ops.run(name, backend.name, *ours)
            runs.append([t for t in tree_leaves([out, ours[0]]) if isinstance(t, torch.Tensor)])
        assert_bitwise_equal(cpu(runs[0]), cpu(runs[1])), name


@pytest.mark.parametrize("count", [150, 2000, 5000])
def test_many_tensors(backend, count):
    """150 tensors of 0 to 60 elements (many to a chunk, one Triton program each), 2,000 and
    5,000 (past one CUDA table: several launches, their flags and statistics combined): every
    operator against the CPU."""
    if _interpreted(backend) and count > 1000:
        pytest.skip(INTERPRETER_SKIP)
    gen = seeded(117 + count)
    shapes = [(int(n),) if k % 3 else (3, int(n) // 3) for k, n in enumerate(torch.randint(0, 60, (count,), generator=gen))]
    grads = [rand_tensor(s, torch.float16 if count == 5000 else torch.float32, gen) for s in shapes]
    ((statistic, found), _), ((cpu_statistic, cpu_found), _) = both(
        backend, "multi_tensor_unscale_norm", grads, torch.tensor(0.125), 1.0)
    assert float(found) == float(cpu_found) == 0.0
    assert_close_values(statistic, cpu_statistic, 1e-5)
    bad = clone_all(grads)
    bad[count * 6 // 7] = rand_tensor((10,), bad[0].dtype, gen)
    bad[count * 6 // 7][3] = math.inf
    ((statistic, found), _), ((cpu_statistic, cpu_found), _) = both(
        backend, "multi_tensor_unscale_norm", bad, torch.tensor(0.125), 1.0)
    assert float(found) == float(cpu_found) == 1.0
    assert_close_values(statistic, cpu_statistic, 1e-5)
    ((total, per), ran), ((cpu_total, cpu_per), _) = both(backend, "clip_grad_norm_with_norms_", grads, 0.5, 2.0)
    assert_close_values(total, cpu_total, 1e-5)
    assert_close_values(per, cpu_per, 1e-5)
    assert_bitwise_equal(cpu(ran[0]), scaled_by_returned_norm(grads, total.cpu(), 0.5))
    coefs = torch.rand(len(grads), generator=gen) * 1.5
    (_, ran), (_, cpu_ran) = both(backend, "multi_tensor_scale_per_tensor_", grads, coefs)
    assert_bitwise_equal(cpu(ran[0]), cpu_ran[0])
    assert_agc_like_cpu(backend, *agc_inputs(shapes, grads[0].dtype, grads[0].dtype, seed=118))


def test_long_tensors(backend):
    """A tensor of 17 CUDA chunks (its per-tensor statistic combined by a warp, not a thread) and
    one of 69 Triton chunks among small ones: the per-tensor norms, the unscaled statistic and
    found_inf at its last chunks."""
    shapes = [(0,), (33,), (17 * CUDA_CHUNK + 5,), (1,), (0,)]
    for dtype in (torch.float32,) if _interpreted(backend) else (torch.float32, torch.bfloat16):
        grads = make_grads(shapes, dtype, seed=230)
        for norm_type in (2.0, 3.5, -math.inf):
            rtol = _stat_rtol(dtype, norm_type)
            ((total, per), ran), ((cpu_total, cpu_per), _) = both(
                backend, "clip_grad_norm_with_norms_", grads, 0.3, norm_type)
            assert_close_values(total, cpu_total, rtol)
            assert_close_values(per, cpu_per, rtol)
            assert_bitwise_equal(cpu(ran[0]), scaled_by_returned_norm(grads, total.cpu(), 0.3))
            ((statistic, found), _), ((cpu_statistic, _), _) = both(
                backend, "multi_tensor_unscale_norm", grads, torch.tensor(1 / 3000.0), norm_type)
            assert_close_values(statistic, cpu_statistic, rtol) and float(found) == 0.0
        for bad in (math.inf, -math.inf, math.nan):
            bad_grads = clone_all(grads)
            bad_grads[2][17 * CUDA_CHUNK + 4] = bad
            (statistic, found), = [both(backend, "multi_tensor_unscale_norm", bad_grads, torch.tensor(0.5), 2.0)[0][0]]
            assert float(found) == 1.0 and not math.isfinite(float(statistic))


def test_refused_calls_modify_nothing(backend):
    """Each bad call raises before anything is written."""
    _refuses(backend)
    device = backend.device
    grads = backend.on(make_grads([(10, 3), (TRITON_CHUNK + 3,)], torch.float32, seed=114))
    params = backend.on(make_grads([(10, 3), (TRITON_CHUNK + 3,)], torch.float32, seed=115))
    state = backend.on(monitor_state(4, torch.float32))
    originals = clone_all(cpu(grads + state))
    expanded = torch.randn(1, device=device).expand(4)
    half = torch.tensor([0.5, 0.5], device=device)
    complex_grad = torch.randn(3, dtype=torch.complex64, device=device)
    norms = torch.rand(4, device=device)
    settings = (0.9, 2, 2.0, None, 1e-6, 2)
    calls = [
        ("multi_tensor_scale_per_tensor_", (grads, torch.full((3,), 0.5, device=device))),
        ("multi_tensor_scale_per_tensor_", (grads, torch.full((1,), 0.5, device=device))),
        ("multi_tensor_scale_per_tensor_", (grads, torch.ones(2, dtype=torch.int64, device=device))),
        ("multi_tensor_scale_per_tensor_", (grads + [expanded], torch.full((3,), 0.5, device=device))),
        ("multi_tensor_scale_per_tensor_", (grads, half.reshape(2, 1))),
        ("multi_tensor_scale_per_tensor_", (grads, half.reshape(1, 2))),
        ("clip_grad_norm_with_norms_", (grads + [torch.ones(3, dtype=torch.int32, device=device)], 0.1, 2.0)),
        ("clip_grad_norm_with_norms_", (grads + [expanded], 0.1, 2.0)),
        ("clip_grad_norm_with_norms_", (grads, 0.1, math.nan)),
        ("multi_tensor_agc_", (grads, params[:1], 0.01, 1e-3)),
        ("multi_tensor_agc_", (grads, [params[0].t(), params[1]], 0.01, 1e-3)),
        ("multi_tensor_agc_", (grads + [complex_grad], params + [complex_grad], 0.01, 1e-3)),
        ("multi_tensor_agc_", (grads, [params[0], params[1].to(torch.int32)], 0.01, 1e-3)),
        ("multi_tensor_agc_", (grads + [expanded], params + [expanded], 0.01, 1e-3)),
        ("multi_tensor_agc_", (grads, params, -1.0, 1e-3)),
        ("multi_tensor_agc_", (grads, params, 0.01, math.nan)),
        ("multi_tensor_unscale_norm", (grads, half, 2.0)),
        ("multi_tensor_unscale_norm", (grads, torch.tensor(1, device=device), 2.0)),
        ("multi_tensor_unscale_norm", (grads, torch.tensor(1.0, device=device), math.nan)),
        ("monitor_update_", (norms, *state[:2], state[2].float(), *state[3:], *settings)),
        ("monitor_update_", (torch.rand(5, device=device), *state, *settings)),
        ("monitor_update_", (norms.half(), *state, *settings)),
    ]
    for name, args in calls:
        with pytest.raises((RuntimeError, ValueError, TypeError)):
            _ops.run(name, backend.name, *args)
        assert_bitwise_equal(cpu(grads + state), originals), name


@pytest.mark.parametrize("name, args, exc, match", [
    ("multi_tensor_unscale_norm", lambda d: ([torch.randn(3, device=d)], torch.ones(2, device=d), 2.0), ValueError,
     "inv_scale must be a one-element float tensor"),
    ("multi_tensor_unscale_norm", lambda d: ([torch.randn(3, device=d)], torch.tensor(1, device=d), 2.0), TypeError,
     "inv_scale must be a one-element float tensor"),
    ("multi_tensor_unscale_norm", lambda d: ([torch.randn(3, device=d)], torch.tensor(1.0, device=d), math.nan),
     ValueError, "norm_type must not be nan"),
], ids=["two-elements", "int", "nan-norm"])
def test_refusals_say_why(backend, name, args, exc, match):
    _refuses(backend)
    with pytest.raises(exc, match=match):
        _ops.run(name, backend.name, *args(backend.device))


@pytest.mark.parametrize("field, bad, exc, match", [
    (0, lambda: torch.zeros(5, dtype=torch.float64), TypeError, "mean"),
    (1, lambda: torch.zeros(4), ValueError, "var"),
    (2, lambda: torch.zeros(5, dtype=torch.int32), TypeError, "count"),
    (4, lambda: torch.zeros(10, dtype=torch.int64)[::2], ValueError, "explosions"),
    (6, lambda: torch.zeros(5, dtype=torch.uint8), TypeError, "vanishing"),
    (None, None, TypeError, "norms"),
], ids=["mean-dtype", "var-size", "count-dtype", "explosions-strided", "vanishing-dtype", "norms-float16"])
def test_monitor_update_refuses_before_writing(backend, field, bad, exc, match):
    _refuses(backend)
    args = (0.97, 3, 3.0, None, 1e-8, 10)
    norms = backend.tensor([1.0] * 5)
    state = monitor_state(5, torch.float32)
    if field is None:
        norms, state = norms.half(), monitor_state(5, torch.float16)
    else:
        state[field] = bad()
    state = [t.to(backend.device) for t in state]  # .to keeps the strided view strided on the CPU
    originals = clone_all(cpu(state))
    with pytest.raises(exc, match=match):
        _ops.run("monitor_update_", backend.name, norms, *state, *args)
    assert all(torch.equal(a, b) for a, b in zip(cpu(state), originals))


COUNT = 48  # tensors


def test_operators_issue_fewer_aten_ops_than_tensors(backend, monkeypatch):
    """Each operator on 48 tensors (GradientMonitor's update: on 48 entries): fewer ATen operators
    than tensors, on the first call (which builds any table) and on the next (from a cache), and
    fewer than reference.py (a loop over the tensors; the monitor's thirty element-wise ops)."""
    if backend.name == "torch":
        pytest.skip("backend 'torch' is reference.py: the loop the kernels are counted against")
    for name, args, _ in small_calls(backend.device, seed=120, count=COUNT):
        modes = [count_aten(monkeypatch, lambda: _ops.run(name, backend.name, *args)) for _ in range(2)]
        assert all(name in mode.fused for mode in modes), (name, [mode.fused for mode in modes])
        counts = [len(mode.aten) for mode in modes]
        before = len(count_aten(monkeypatch, lambda: getattr(reference, name)(*args)).aten)
        assert max(counts) < min(COUNT, before), (name, counts, before)
