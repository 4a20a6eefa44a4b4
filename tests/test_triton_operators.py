"""Backend "triton": the operators of AGC, per-tensor clipping, gradient health and AMP
(multi_tensor_unscale_norm, multi_tensor_agc_, multi_tensor_scale_per_tensor_,
clip_grad_norm_with_norms_, monitor_update_), against backend "cpu" (the C++ kernels) and the
float64 oracle; the features on them; and the Triton tables' own rules (alignment, CUDA-graph
lifetimes, programs in any order).

Run as tests/test_triton.py runs: without a GPU the kernels run in Triton's interpreter on CPU
tensors (marker ``triton_interpreter``), in the TRITON_INTERPRET=1 subprocess of
test_triton.py::test_interpreted_suite; on a
machine with a GPU the same cases run on CUDA tensors, compiled (marker ``cuda``).
"""

from __future__ import annotations

import gc
import math
import random
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import fusedclip
from fusedclip import _ops, reference
from helpers import (
    INTERPRETED,
    TRITON_CHUNK as CHUNK,
    assert_bitwise_equal,
    assert_norm_close,
    clone_all,
    cpu,
    make_grads,
    norm_id,
    norm_rtol,
    oracle_norm,
    oracle_statistic,
    rand_tensor,
    scaled_by_returned_norm,
    seeded,
)

ALL_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64, torch.complex128]
_IN_SUBPROCESS = "runs in the TRITON_INTERPRET=1 subprocess of test_triton.py::test_interpreted_suite"


@pytest.fixture(params=[
    pytest.param("cpu", marks=[pytest.mark.triton_interpreter, pytest.mark.skipif(not INTERPRETED, reason=_IN_SUBPROCESS)],
                 id="cpu-interpreted"),
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(INTERPRETED, reason="the interpreter takes CPU tensors only")],
                 id="cuda"),
])
def device(request) -> torch.device:
    return torch.device(request.param)


def on(device: torch.device, tensors):
    """Copies on device (new tensors on the CPU too, so the originals stay as they were)."""
    return [t.to(device, copy=True) for t in tensors]


def _stat_rtol(dtype, norm_type) -> float:
    if dtype in (torch.float64, torch.complex128):
        return 1e-12
    return 1e-5 if norm_type in (0.0, 1.0, 2.0) or math.isinf(norm_type) else 1e-4


pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

TRITON = torch.ops.fusedclip_triton
CPU = torch.ops.fusedclip
NEW_OPERATORS = ("multi_tensor_unscale_norm", "multi_tensor_agc_", "multi_tensor_scale_per_tensor_",
                 "clip_grad_norm_with_norms_", "monitor_update_")
# Odd sizes, zero-size tensors at the start, middle and end, sizes on both sides of a chunk.
SHAPES = [(0,), (37,), (8, 129), (CHUNK - 1,), (1,), (3, 0), (CHUNK + 1,), (5, 7), (0, 4)]
NORM_TYPES = (2.0, 1.0, 3.5, -2.0, math.inf, -math.inf, 0.0)


def test_operator_table_has_triton_kernels():
    for op in NEW_OPERATORS:
        assert "triton" in _ops.NATIVE_BACKENDS[op]
        assert _ops.KERNELS[op]["triton"].op is getattr(TRITON, op)
        assert _ops.operator_table()[op]["triton"] == "kernel"


def copied(args, device) -> list:
    """args with every tensor and list of tensors copied to device (new tensors on the CPU too)."""
    return [on(device, a) if isinstance(a, list) else a.to(device, copy=True) if isinstance(a, torch.Tensor)
            else a for a in args]


def both(op: str, device, *args):
    """((op on backend "triton" with args copied to device, the args it ran on), (the same on
    backend "cpu" with args copied))."""
    ours, theirs = copied(args, device), copied(args, torch.device("cpu"))
    return (getattr(TRITON, op)(*ours), ours), (getattr(CPU, op)(*theirs), theirs)


def assert_close_values(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    """Same dtype and shape; values within rtol, inf and nan where expected."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, (actual, expected)
    torch.testing.assert_close(actual.cpu(), expected, rtol=rtol, atol=0, equal_nan=True)


# --- multi_tensor_unscale_norm ---------------------------------------------------------------------------


def unscaled_oracle(grads, inv_scale: torch.Tensor, norm_type) -> float:
    """The float64 statistic of the concatenation of grads * inv_scale."""
    per = [oracle_statistic(g.to(torch.complex128 if g.is_complex() else torch.float64) * float(inv_scale),
                            norm_type) for g in grads]
    return {math.inf: max, -math.inf: min}.get(norm_type, sum)(per)


@pytest.mark.parametrize("norm_type", (2.0, 1.0, 3.5, math.inf, -math.inf, 0.0), ids=norm_id)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_unscale_norm_matches_cpu_and_oracle(device, dtype, norm_type):
    grads = make_grads(SHAPES, dtype, seed=101, scale=300.0)
    grads[1][::5] = 0  # exact zeros: the 0-norm
    inv_scale = torch.tensor(1 / 3)
    ((statistic, found), ran), ((cpu_statistic, cpu_found), _) = both(
        "multi_tensor_unscale_norm", device, grads, inv_scale, norm_type)
    assert found.shape == () and found.dtype == torch.float32 and float(found) == float(cpu_found) == 0.0
    rtol = _stat_rtol(dtype, norm_type)
    assert_close_values(statistic, cpu_statistic, rtol)
    assert float(statistic) == pytest.approx(unscaled_oracle(grads, inv_scale, norm_type), rel=rtol, abs=0)
    assert_bitwise_equal(cpu(ran[0]), grads)  # read only


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_unscale_norm_found_inf(device, bad):
    """found_inf is 1 for an inf or nan anywhere (any chunk, dtype and launch), as the CPU says,
    whatever the norm makes of it (an inf does not change the min)."""
    dtypes = [torch.float32, torch.bfloat16, torch.float64, torch.float16]
    for tensor, position in ((0, 0), (0, CHUNK + 3), (1, 2047), (2, 9), (3, 40)):
        grads = make_grads([(2 * CHUNK + 9,), (3000,), (10,), (41,)], dtypes, seed=102)
        grads[tensor][position] = bad
        for norm_type in (2.0, -math.inf, 0.0):
            ((statistic, found), _), ((cpu_statistic, cpu_found), _) = both(
                "multi_tensor_unscale_norm", device, grads, torch.tensor(0.5, dtype=torch.float64), norm_type)
            assert float(found) == float(cpu_found) == 1.0, (tensor, position, norm_type)
            assert_close_values(statistic, cpu_statistic, 1e-5)
    # A finite x whose product overflows is not counted (torch checks x itself), a zero scale
    # neither; an empty list has found_inf 0 too.
    grads = make_grads([(100,), (CHUNK + 1,)], torch.float32, seed=103)
    for inv_scale in (torch.tensor(3e38), torch.tensor(0.0)):
        ((statistic, found), _), ((cpu_statistic, cpu_found), _) = both(
            "multi_tensor_unscale_norm", device, grads, inv_scale, 2.0)
        assert float(found) == float(cpu_found) == 0.0 and torch.equal(statistic.cpu(), cpu_statistic)
    statistic, found = TRITON.multi_tensor_unscale_norm([], torch.tensor(0.5, device=device), -math.inf)
    assert float(statistic) == math.inf and float(found) == 0.0


# --- clip_grad_norm_with_norms_ --------------------------------------------------------------------------


@pytest.mark.parametrize("norm_type", NORM_TYPES, ids=norm_id)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_clip_with_norms_matches_cpu_and_oracle(device, dtype, norm_type):
    grads = make_grads(SHAPES, dtype, seed=104)
    truth = oracle_norm(grads, norm_type)
    ((total, per), ran), ((cpu_total, cpu_per), _) = both(
        "clip_grad_norm_with_norms_", device, grads, 0.3 * truth, norm_type)
    rtol = norm_rtol(1e-5, norm_type, dtype)
    assert_close_values(total, cpu_total, rtol)
    assert_close_values(per, cpu_per, rtol)
    assert_norm_close(total.cpu(), truth, rtol)
    for i, (value, g) in enumerate(zip(per.tolist(), grads)):  # 0 for a tensor with no elements, whatever p
        assert value == pytest.approx(oracle_norm([g], norm_type), rel=rtol, abs=0), i
    # The grads as the fused clip scales them: the coefficient of the returned norm, bit for bit.
    assert_bitwise_equal(cpu(ran[0]), scaled_by_returned_norm(grads, total.cpu(), 0.3 * truth))


def test_clip_with_norms_nan_inf_and_no_elements(device):
    grads = make_grads([(CHUNK + 9,), (5,), (0,)], torch.float32, seed=105)
    grads[0][CHUNK + 2] = math.nan
    grads[1][3] = math.inf
    for norm_type in (2.0, math.inf, -math.inf):
        ((total, per), _), ((cpu_total, cpu_per), _) = both("clip_grad_norm_with_norms_", device, grads, 1.0, norm_type)
        assert total.isnan() and per[0].isnan() and per.tolist()[2] == 0.0
        assert_close_values(per, cpu_per, 1e-5)
    empty = on(device, [torch.empty(0), torch.empty(3, 0, dtype=torch.float64)])
    total, per = TRITON.clip_grad_norm_with_norms_(empty, 1.0, -math.inf)
    assert float(total) == 0.0 and per.tolist() == [0.0, 0.0] and per.dtype == torch.float64


# --- multi_tensor_scale_per_tensor_ ----------------------------------------------------------------------

COEFS = [0.37, 1.0, 2.5, 0.0, math.nan, 0.9999999, math.inf, 1e-3, -0.5]


@pytest.mark.parametrize("coefs_of", ["float32", "float64-strided", "bfloat16"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_scale_per_tensor_is_the_cpu_bitwise(device, dtype, coefs_of):
    """Each tensor scaled by its own coefficient exactly as the C++ kernel scales it; a tensor
    whose coefficient is >= 1 keeps its bits."""
    grads = make_grads(SHAPES, dtype, seed=106)
    if coefs_of == "float64-strided":
        coefs = torch.zeros(2 * len(COEFS), dtype=torch.float64)[::2]
        coefs.copy_(torch.tensor(COEFS, dtype=torch.float64))
    else:
        coefs = torch.tensor(COEFS, dtype=getattr(torch, coefs_of))
    (_, ran), (_, cpu_ran) = both("multi_tensor_scale_per_tensor_", device, grads, coefs)
    assert_bitwise_equal(cpu(ran[0]), cpu_ran[0], any_nan=True)  # a GPU's nan is canonical
    for i, (g, c) in enumerate(zip(ran[0], COEFS)):
        if c >= 1:
            assert_bitwise_equal(cpu([g]), [grads[i]])


# --- multi_tensor_agc_ -------------------------------------------------------------------------------------

# Units: rows of at most a chunk (many to a piece), rows longer than a chunk (cut in parts), 1-dim
# tensors short and long, a 0-dim one, conv weights, and tensors with no elements.
AGC_SHAPES = [(0,), (7, 33), (CHUNK + 5,), (3, CHUNK + 7), (4, 2, 3, 3), (), (1, 0), (65, 257), (100,), (0, 3)]
AGC_DTYPES = [(torch.float32, torch.float32), (torch.float64, torch.float64), (torch.float16, torch.float16),
              (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.float32, torch.float64)]


def agc_inputs(shapes, dtype, param_dtype, seed):
    """(grads, params): parameter units of scales 1e-2 .. 1e3 against gradients of scale 1, so that
    at clip_factor 0.05 some units clip and some do not."""
    gen = seeded(seed)
    grads = [rand_tensor(s, dtype, gen) for s in shapes]
    params = []
    for s in shapes:
        rows = s[0] if len(s) > 1 else 1
        scale = 10.0 ** (torch.rand(rows, generator=gen, dtype=torch.float64) * 5 - 2)
        scale = scale.reshape((rows,) + (1,) * (len(s) - 1)) if len(s) > 1 else scale.reshape(())
        params.append((rand_tensor(s, torch.float64, gen) * scale).to(param_dtype))
    return grads, params


def assert_agc_like_cpu(device, grads, params, clip_factor=0.05, eps=1e-3, views=None):
    """AGC on backend "triton" against backend "cpu": the sums of squares within float32's
    accumulation error, the grads within 2 ulps (the coefficients of the two backends differ by
    their sums' rounding). views(grads, params), when given, makes the tensors each backend runs
    on from copies of the inputs on its device. Returns the grads of both."""
    runs = []
    for namespace, where in ((TRITON, device), (CPU, torch.device("cpu"))):
        ours = (on(where, grads), on(where, params))
        ours = ours if views is None else views(*ours)
        expected = [float(g.double().square().sum()) for g in ours[0]]
        runs.append((getattr(namespace, "multi_tensor_agc_")(*ours, clip_factor, eps), ours[0]))
    ((total, per), ran), ((cpu_total, cpu_per), cpu_ran) = runs
    rtol = 1e-12 if cpu_total.dtype == torch.float64 else 2e-6
    assert_close_values(total, cpu_total, rtol)
    assert_close_values(per, cpu_per, rtol)
    torch.testing.assert_close(per.cpu().double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=0,
                               equal_nan=True)
    for i, (a, e) in enumerate(zip(cpu(ran), cpu_ran)):
        ulp = {torch.float64: 2.0**-52, torch.float32: 2.0**-23, torch.float16: 2.0**-10}.get(a.dtype, 2.0**-7)
        torch.testing.assert_close(a, e, rtol=2 * ulp + 1e-6, atol=0, equal_nan=True, msg=lambda m: f"grad {i}: {m}")
    return ran, cpu_ran


@pytest.mark.parametrize("dtypes", AGC_DTYPES, ids=lambda d: f"{d[0]}-{d[1]}")
def test_agc_matches_cpu(device, dtypes):
    grads, params = agc_inputs(AGC_SHAPES, *dtypes, seed=107)
    ours, theirs = assert_agc_like_cpu(device, grads, params)
    clipped = [not torch.equal(a, b) for t, g in zip(theirs, grads) if g.numel()
               for a, b in zip(t if g.dim() > 1 else [t], g if g.dim() > 1 else [g])]
    assert any(clipped) and not all(clipped)  # some units clip, some do not


def test_agc_non_contiguous_tensors_and_nan_units(device):
    """Units are rows of the row-major layout: transposed and strided grads and params go
    through contiguous copies (grads copied back, strides kept); a nan unit becomes nan and
    the others clip as they would."""
    grads, params = agc_inputs([(40, 30), (3 * CHUNK,), (5, 6)], torch.float32, torch.float32, seed=108)
    grads[2][1, 4] = math.nan

    def views(g, p):
        return [g[0].t(), g[1][::2], g[2].t()], [p[0].t(), p[1][1::2], p[2].t().contiguous()]

    ours, _ = assert_agc_like_cpu(device, grads, params, clip_factor=0.5, views=views)
    assert [g.stride() for g in ours] == [(1, 30), (2,), (1, 6)]
    assert ours[2][4].isnan().all() and not ours[2][:4].isnan().any()  # row 4 of the transposed view


# --- monitor_update_ ---------------------------------------------------------------------------------------


def monitor_state(size: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """Zeroed (mean, var, count, below, explosions, exploding, vanishing)."""
    return [torch.zeros(size, dtype=d) for d in [dtype] * 2 + [torch.int64] * 3 + [torch.bool] * 2]


@pytest.mark.parametrize("explode_threshold", [None, 3.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_monitor_update_is_the_cpu_bitwise(device, dtype, explode_threshold):
    """Steps of norms (over two programs) with nan, inf, tiny and spiking entries through the
    warm-up and after it: every state tensor bit for bit the C++ kernel's after every step."""
    size = 1500
    ours, theirs = on(device, monitor_state(size, dtype)), monitor_state(size, dtype)
    gen = seeded(111)
    for step in range(7):
        norms = (torch.rand(size, generator=gen, dtype=torch.float64) * 2).to(dtype)
        norms[step::9] = 1e-9
        norms[step + 1::31] = math.nan
        norms[step + 2::37] = math.inf
        norms[step + 3::13] *= 50.0
        args = (0.9, 3, 2.0, explode_threshold, 1e-6, 2)
        TRITON.monitor_update_(norms.to(device), *ours, *args)
        CPU.monitor_update_(norms, *theirs, *args)
        assert_bitwise_equal(cpu(ours), theirs)


# --- what the operators share ---------------------------------------------------------------------------


def small_calls(device, seed: int, count: int = 3):
    """(name, args, written) of each operator on `count` small float32 tensors (rows included),
    written being the tensors it writes."""
    grads = on(device, make_grads([(3, 4)] * count, torch.float32, seed=seed))
    params = on(device, make_grads([(3, 4)] * count, torch.float32, seed=seed + 1, scale=0.01))
    state = on(device, monitor_state(count, torch.float32))
    return [
        ("multi_tensor_unscale_norm", (grads, torch.tensor(0.5, device=device), 2.0), []),
        ("multi_tensor_agc_", (grads, params, 0.01, 1e-3), grads),
        ("multi_tensor_scale_per_tensor_", (grads, torch.linspace(0.1, 1.5, count, device=device)), grads),
        ("clip_grad_norm_with_norms_", (grads, 0.1, 2.0), grads),
        ("monitor_update_", (torch.rand(count, device=device), *state, 0.9, 2, 2.0, 1.0, 1e-6, 2), state),
    ]


def test_version_counters_follow_the_writes(device):
    """Every tensor an operator may write has its version counter bumped (autograd sees the
    write); what it only reads keeps its counter."""
    for name, args, written in small_calls(device, seed=112):
        tensors = [t for t in tree_leaves(list(args)) if isinstance(t, torch.Tensor)]
        versions = {id(t): t._version for t in tensors}
        getattr(TRITON, name)(*args)
        for t in tensors:
            bumped = any(t is w for w in written)
            assert (t._version > versions[id(t)]) == bumped, (name, tuple(t.shape), bumped)


def test_opcheck(device):
    for name, args, _ in small_calls(device, seed=113):
        torch.library.opcheck(getattr(TRITON, name).default, args)


def test_refused_calls_modify_nothing(device):
    """Each bad call raises before anything is written."""
    grads = on(device, make_grads([(10, 3), (CHUNK + 3,)], torch.float32, seed=114))
    params = on(device, make_grads([(10, 3), (CHUNK + 3,)], torch.float32, seed=115))
    state = on(device, monitor_state(4, torch.float32))
    originals = clone_all(grads + state)
    expanded = torch.randn(1, device=device).expand(4)
    half = torch.tensor([0.5, 0.5], device=device)
    complex_grad = torch.randn(3, dtype=torch.complex64, device=device)
    calls = [
        (TRITON.multi_tensor_scale_per_tensor_, (grads, torch.full((3,), 0.5, device=device))),
        (TRITON.multi_tensor_scale_per_tensor_, (grads, torch.ones(2, dtype=torch.int64, device=device))),
        (TRITON.multi_tensor_scale_per_tensor_, (grads + [expanded], torch.full((3,), 0.5, device=device))),
        (TRITON.multi_tensor_scale_per_tensor_, (grads, half.reshape(2, 1))),
        (TRITON.clip_grad_norm_with_norms_, (grads + [torch.ones(3, dtype=torch.int32, device=device)], 0.1, 2.0)),
        (TRITON.clip_grad_norm_with_norms_, (grads + [expanded], 0.1, 2.0)),
        (TRITON.clip_grad_norm_with_norms_, (grads, 0.1, math.nan)),
        (TRITON.multi_tensor_agc_, (grads, params[:1], 0.01, 1e-3)),
        (TRITON.multi_tensor_agc_, (grads, [params[0].t(), params[1]], 0.01, 1e-3)),
        (TRITON.multi_tensor_agc_, (grads + [complex_grad], params + [complex_grad], 0.01, 1e-3)),
        (TRITON.multi_tensor_agc_, (grads, [params[0], params[1].to(torch.int32)], 0.01, 1e-3)),
        (TRITON.multi_tensor_agc_, (grads + [expanded], params + [expanded], 0.01, 1e-3)),
        (TRITON.multi_tensor_agc_, (grads, params, -1.0, 1e-3)),
        (TRITON.multi_tensor_agc_, (grads, params, 0.01, math.nan)),
        (TRITON.multi_tensor_unscale_norm, (grads, half, 2.0)),
        (TRITON.multi_tensor_unscale_norm, (grads, torch.tensor(1, device=device), 2.0)),
        (TRITON.monitor_update_, (torch.rand(4, device=device), *state[:2], state[2].float(), *state[3:], 0.9, 2,
                                  2.0, None, 1e-6, 2)),
        (TRITON.monitor_update_, (torch.rand(5, device=device), *state, 0.9, 2, 2.0, None, 1e-6, 2)),
        (TRITON.monitor_update_, (torch.rand(4, device=device).half(), *state, 0.9, 2, 2.0, None, 1e-6, 2)),
    ]
    for op, args in calls:
        with pytest.raises((RuntimeError, ValueError, TypeError)):
            op(*args)
        assert_bitwise_equal(cpu(grads + state), cpu(originals))


def test_tensors_sharing_memory_run_in_list_order(device):
    """A tensor listed twice and a view of it: scaled, clipped and AGC-clipped once per occurrence
    in list order, as the CPU kernels do."""
    values = make_grads([(6, 4)], torch.float32, seed=116, scale=2.0)[0]
    params = [torch.full((6, 4), 1.0), torch.full((3, 4), 1.0), torch.full((6, 4), 1.0)]
    for name, args in (("multi_tensor_scale_per_tensor_", (torch.tensor([0.5, 0.25, 0.9]),)),
                       ("clip_grad_norm_with_norms_", (1.0, 2.0)), ("multi_tensor_agc_", (params, 0.1, 1e-3))):
        results = []
        for namespace, where in ((TRITON, device), (CPU, torch.device("cpu"))):
            storage = values.to(where, copy=True)
            results.append((storage, getattr(namespace, name)([storage, storage[2:5], storage], *copied(args, where))))
        (storage, out), (cpu_storage, cpu_out) = results
        assert not torch.equal(cpu_storage, values)
        torch.testing.assert_close(storage.cpu(), cpu_storage, rtol=1e-6, atol=0)
        for a, b in zip(tree_leaves(out), tree_leaves(cpu_out)):  # None for the scale
            torch.testing.assert_close(a if a is None else a.cpu(), b, rtol=1e-5, atol=0)


def test_many_small_tensors(device):
    """150 tensors of 0 to 60 elements (many to a chunk, one program each): every operator
    against the CPU."""
    gen = seeded(117)
    shapes = [(int(n),) if k % 3 else (3, int(n) // 3) for k, n in enumerate(torch.randint(0, 60, (150,), generator=gen))]
    grads = [rand_tensor(s, torch.float32, gen) for s in shapes]
    ((statistic, _), _), ((cpu_statistic, _), _) = both("multi_tensor_unscale_norm", device, grads,
                                                        torch.tensor(0.5), 2.0)
    assert_close_values(statistic, cpu_statistic, 1e-5)
    ((total, per), _), ((cpu_total, cpu_per), _) = both("clip_grad_norm_with_norms_", device, grads, 0.5, 2.0)
    assert_close_values(per, cpu_per, 1e-5)
    coefs = torch.rand(len(grads), generator=gen) * 1.5
    (_, ran), (_, cpu_ran) = both("multi_tensor_scale_per_tensor_", device, grads, coefs)
    assert_bitwise_equal(cpu(ran[0]), cpu_ran[0])
    assert_agc_like_cpu(device, *agc_inputs(shapes, torch.float32, torch.float32, seed=118))


# --- the features on backend "triton" ------------------------------------------------------------------------


def feature_params(device, count: int, seed: int):
    """count parameters (matrices and vectors) with grads, on device."""
    gen = seeded(seed)
    shapes = [(3, 5) if k % 2 else (int(n),) for k, n in enumerate(torch.randint(1, 40, (count,), generator=gen))]
    params = []
    for s in shapes:
        p = torch.nn.Parameter(rand_tensor(s, torch.float32, gen).to(device))
        p.grad = rand_tensor(s, torch.float32, gen, scale=3.0).to(device)
        params.append(p)
    return params


def features(count: int):
    """(name, a function of (params, backend) that runs the feature once) for the features on
    the five operators: fusedclip.AGC, GradientMonitor (its clip and its update),
    clip_grad_norm_with_norms_, PerTensorClip, and clip_grad_norm_ with a GradScaler."""
    monitors: dict = {}
    scalers: dict = {}

    def monitor(params, backend):
        if backend not in monitors:
            monitors[backend] = fusedclip.GradientMonitor([(f"p{i}", p) for i, p in enumerate(params)],
                                                          warmup_steps=2, backend=backend)
        return monitors[backend].clip_grad_norm_(0.5)

    def amp(params, backend):
        if backend not in scalers:
            scaler = torch.amp.GradScaler(params[0].device.type, init_scale=4.0)
            scalers[backend] = (torch.optim.SGD(params, lr=0.0), scaler)
            scaler.scale(torch.ones(()))  # initialises the scale, as scaler.scale(loss) does
        opt, scaler = scalers[backend]
        total = fusedclip.clip_grad_norm_(params, 0.5, grad_scaler=scaler, optimizer=opt, backend=backend)
        scaler.update()  # a few ops on the scale (scaler.step(opt) would be the optimizer's ops)
        return total

    return [
        ("AGC", lambda params, backend: fusedclip.AGC(0.05, backend=backend)(params)),
        ("GradientMonitor", monitor),
        ("clip_grad_norm_with_norms_", lambda params, backend: fusedclip.clip_grad_norm_with_norms_(
            params, 0.5, backend=backend)),
        ("PerTensorClip", lambda params, backend: fusedclip.PerTensorClip(0.5, backend=backend)(params)),
        ("clip_grad_norm_(grad_scaler=)", amp),
    ]


@pytest.mark.triton_interpreter
@pytest.mark.skipif(not INTERPRETED, reason="compares with backend 'cpu' on the same (CPU) tensors")
def test_features_on_triton_match_cpu():
    """Each feature twice on backend "triton" and on backend "cpu": the same results and grads."""
    for name, run in features(8):
        results = {}
        for backend in ("triton", "cpu"):
            params = feature_params(torch.device("cpu"), 8, seed=119)
            outputs = [run(params, backend) for _ in range(2)]
            results[backend] = (outputs, [p.grad for p in params])
        for a, b in zip(tree_leaves(results["triton"]), tree_leaves(results["cpu"])):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")


class AtenCount(TorchDispatchMode):
    """Counts the ATen operators a call issues, those inside fusedclip_triton operators included:
    the mode sees such an operator, records it and runs its kernel with the mode still on. A
    Triton launch is no ATen operator: what the interpreter does to launch one (host copies of
    the arguments) is not counted (``paused``, set around launch.run_kernel)."""

    def __init__(self):
        super().__init__()
        self.aten: list[str] = []
        self.triton: list[str] = []
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "fusedclip_triton":
            self.triton.append(func.__name__.split(".")[0])
            tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            key = torch._C.DispatchKey.CUDA if tensors[0].is_cuda else torch._C.DispatchKey.CPU
            with self:
                return func.redispatch(torch._C.DispatchKeySet(key), *args, **kwargs)
        if not self.paused:
            self.aten.append(str(func))
        return func(*args, **kwargs)


def count_aten(monkeypatch, fn) -> AtenCount:
    from fusedclip.triton import launch

    run_kernel = launch.run_kernel
    mode = AtenCount()

    def uncounted(*args, **kwargs):
        mode.paused += 1
        try:
            run_kernel(*args, **kwargs)
        finally:
            mode.paused -= 1

    with monkeypatch.context() as m:
        m.setattr(launch, "run_kernel", uncounted)
        with mode:
            fn()
    return mode


COUNT = 48  # tensors


def test_operators_issue_fewer_aten_ops_than_tensors(device, monkeypatch):
    """Each operator on 48 tensors (GradientMonitor's update: on 48 entries): fewer ATen operators
    than tensors, on the first call (which builds the table) and on the next (from the cache),
    and fewer than reference.py, which backend "triton" ran before (a loop over the tensors; the
    monitor's thirty element-wise ops)."""
    for name, args, _ in small_calls(device, seed=120, count=COUNT):
        counts = [len(count_aten(monkeypatch, lambda: getattr(TRITON, name)(*args)).aten) for _ in range(2)]
        before = len(count_aten(monkeypatch, lambda: getattr(reference, name)(*args)).aten)
        assert max(counts) < min(COUNT, before), (name, counts, before)


@pytest.mark.parametrize("feature", range(5), ids=[name for name, _ in features(1)])
def test_features_issue_fewer_aten_ops_than_tensors(device, monkeypatch, feature):
    """Each feature on 48 parameters with backend "triton": its fusedclip_triton operators run,
    and the whole call issues fewer ATen operators than there are parameters."""
    name, run = features(COUNT)[feature]
    params = feature_params(device, COUNT, seed=121)
    run(params, "triton")  # the tables, the monitor's state
    mode = count_aten(monkeypatch, lambda: run(params, "triton"))
    expected = {"AGC": "multi_tensor_agc_", "GradientMonitor": "monitor_update_",
                "clip_grad_norm_with_norms_": "clip_grad_norm_with_norms_",
                "PerTensorClip": "multi_tensor_scale_per_tensor_",
                "clip_grad_norm_(grad_scaler=)": "multi_tensor_unscale_norm"}[name]
    assert expected in mode.triton, mode.triton
    assert len(mode.aten) < COUNT, (name, len(mode.aten), mode.aten)


# --- the tables ---------------------------------------------------------------------------------------


def test_one_unaligned_tensor_leaves_the_others_aligned():
    """A dtype's tensors that start on 16 bytes are one launch (vector loads), an odd view
    another: the launches cover every chunk once, each chunk's alignment as its launch says."""
    from fusedclip.triton import tables

    buffer = torch.zeros(CHUNK + 100)
    tensors = [torch.zeros(2 * CHUNK + 5), buffer[1:CHUNK + 1], torch.zeros(300),
               torch.zeros(7, dtype=torch.bfloat16), buffer[CHUNK + 8:CHUNK + 20]]
    table = tables.prepare(tensors, "test", writes=False, check_first=False).table
    host = table.table.cpu()
    f32 = {launch.aligned: launch for launch in table.launches if launch.dtype == torch.float32}
    assert set(f32) == {True, False} and f32[True].n_chunks == 5 and f32[False].n_chunks == 1
    covered = sorted(c for launch in table.launches for c in range(launch.first_chunk,
                                                                   launch.first_chunk + launch.n_chunks))
    assert covered == list(range(table.n_chunks))
    for launch in table.launches:
        addresses = host[launch.first_chunk:launch.first_chunk + launch.n_chunks]
        assert bool((addresses % 16 == 0).all()) == launch.aligned


def test_unaligned_tensors_norm_and_scale(device):
    buffer = on(device, make_grads([(3 * CHUNK + 50,)], torch.float32, seed=122))[0]
    grads = [buffer[:CHUNK + 3], buffer[CHUNK + 4:2 * CHUNK + 9], buffer[2 * CHUNK + 12:2 * CHUNK + 40]]
    originals = clone_all(cpu(grads))
    truth = oracle_norm(originals, 2.0)
    total = TRITON.clip_grad_norm_(grads, 0.5 * truth, 2.0)
    assert_norm_close(total.cpu(), truth, 1e-5)
    assert_bitwise_equal(cpu(grads), scaled_by_returned_norm(originals, total.cpu(), 0.5 * truth))


def test_captured_operands_live_as_long_as_their_graph(monkeypatch):
    """The operands a captured graph reads are kept by that graph (weakly keyed), released with
    it; where the graph cannot be known they are kept for the process's life."""
    from fusedclip.triton import tables

    class Graph:
        pass

    class Held:
        pass

    capturing, held = [Graph()], Held()
    monkeypatch.setattr(tables, "_capturing_graph", lambda: capturing[0])
    tables.keep_for_graph(held)
    assert tables.captured_operands(capturing[0]) == [held]
    kept = weakref.ref(held)
    del held
    gc.collect()
    assert kept() is not None
    capturing.clear()  # the graph dies
    gc.collect()
    assert kept() is None
    monkeypatch.setattr(tables, "_capturing_graph", lambda: None)
    monkeypatch.setattr(tables, "_captured_without_graph", [])
    tables.keep_for_graph(Held())
    assert len(tables._captured_without_graph) == 1


def test_staging_regions_for_tables_built_during_capture():
    """Pinned memory is reserved outside any capture (a region at least as large as each table
    built eagerly), taken by tables built during capture, and given back when they die; with
    none large enough, a clear error before anything is captured."""
    from fusedclip.triton import tables

    staging = tables._Staging(lambda n: torch.zeros(n, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="warm-up"):
        staging.take(10)
    staging.reserve(10)
    host = torch.arange(10)
    table, region = tables.staged_copy(host, torch.device("cpu"), staging)
    assert torch.equal(table, host) and torch.equal(region, host) and table.data_ptr() != region.data_ptr()
    rest, _ = staging.take(staging.ARENA - 10)
    with pytest.raises(RuntimeError, match="CUDA graph capture"):
        staging.take(1)
    first = region.data_ptr()
    del table
    gc.collect()
    again, _ = staging.take(10)
    assert again.data_ptr() == first
    staging.reserve(3 * staging.ARENA)
    assert staging.take(3 * staging.ARENA)[0].numel() == 3 * staging.ARENA


@pytest.mark.triton_interpreter
@pytest.mark.skipif(not INTERPRETED, reason="patches the interpreter's grid")
def test_programs_in_any_order_give_the_same_bits(monkeypatch):
    """The interpreter runs programs in id order, so the program that finishes a norm is always
    the last one; here they run in a random order (every launch its own), and every operator
    that takes tickets or sums in a later launch gives the same bits."""
    from triton.runtime import interpreter

    def run_all():
        dtypes = [torch.float32, torch.bfloat16, torch.float64, torch.float32]
        grads = make_grads([(3 * CHUNK + 5,), (2 * CHUNK + 1,), (100,), (CHUNK,)], dtypes, seed=123)
        outputs = [TRITON.multi_tensor_norm(grads, p, True) for p in (2.0, -math.inf)]
        outputs.append(TRITON.multi_tensor_unscale_norm(grads, torch.tensor(0.25), 2.0))
        outputs += [TRITON.clip_grad_norm_with_norms_(grads, 1.0, 2.0), grads]
        agc_grads, agc_params = agc_inputs([(3, CHUNK + 7), (2 * CHUNK + 3,), (9, 40)], torch.float32,
                                           torch.float32, seed=124)
        return outputs + [TRITON.multi_tensor_agc_(agc_grads, agc_params, 0.05, 1e-3), agc_grads]

    expected = run_all()
    builder = interpreter.interpreter_builder
    set_grid_dim, set_grid_idx = builder.set_grid_dim, builder.set_grid_idx
    gen, orders = random.Random(0), []

    def shuffled_dim(nx, ny, nz):
        orders.append(gen.sample(range(nx), nx))
        set_grid_dim(nx, ny, nz)

    monkeypatch.setattr(builder, "set_grid_dim", shuffled_dim)
    monkeypatch.setattr(builder, "set_grid_idx", lambda x, y, z: set_grid_idx(orders[-1][x], y, z))
    got = run_all()
    assert any(order[-1] != len(order) - 1 for order in orders)  # another program finished
    assert_bitwise_equal(tree_leaves(got), tree_leaves(expected))


# --- CUDA only ---------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(INTERPRETED, reason="the interpreter takes CPU tensors only")
def test_operators_are_sync_free():
    cuda = torch.device("cuda")
    for name, args, _ in small_calls(cuda, seed=125, count=40):
        getattr(TRITON, name)(*args)  # compiles, caches the tables
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            getattr(TRITON, name)(*args)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.cuda
@pytest.mark.skipif(INTERPRETED, reason="the interpreter takes CPU tensors only")
def test_operators_in_a_cuda_graph():
    """Each operator captured on tensors never used before (its table built during capture,
    from staging memory) replays as it runs eagerly on other tensors of the same values; the
    graph keeps its operands."""
    from fusedclip.triton import tables

    cuda = torch.device("cuda")
    eager = small_calls(cuda, seed=126, count=5)  # the same values in other tensors
    for (name, args, written), (_, eager_args, eager_written) in zip(small_calls(cuda, seed=126, count=5), eager):
        expected = getattr(TRITON, name)(*eager_args)  # compiles; reserves staging memory
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = getattr(TRITON, name)(*args)
        held = tables.captured_operands(graph) or tables._captured_without_graph
        if name != "monitor_update_":  # the one without a table
            assert held and not any(o is h for o in tables._cache.values() for h in held)
        graph.replay()
        torch.cuda.synchronize()
        assert_bitwise_equal(cpu(written), cpu(eager_written))
        assert_bitwise_equal(cpu(tree_leaves(out)), cpu(tree_leaves(expected)))
