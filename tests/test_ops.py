"""The operators themselves (torch.ops.fusedclip.*, and fusedclip._ops by backend): opcheck, the
statistic before the root, per-tensor statistics, and the in-place primitives."""

from __future__ import annotations

import math

import pytest
import torch

import fusedclip
from fusedclip import _backends, _ops
from conftest import (
    BACKENDS,
    assert_bitwise_equal,
    clone_all,
    make_grads,
    norm_id,
    oracle_norm,
    oracle_statistic,
    rand_tensor,
    scaled_by_coef,
    seeded,
)

ops = torch.ops.fusedclip

SHAPES = [(33,), (0,), (4, 257), (1,), (70001,), (2, 0, 3), (5, 6, 7)]
STAT_NORM_TYPES = (1.0, 2.0, 3.5, 0.5, math.inf, -math.inf, 0.0, -2.0)


def _opcheck(op, args):
    torch.library.opcheck(op, args)


# --- opcheck -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("per_tensor", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_opcheck_multi_tensor_norm(dtype, per_tensor):
    grads = make_grads(SHAPES[:5], dtype, seed=40)
    _opcheck(ops.multi_tensor_norm.default, (grads, 2.0, per_tensor))
    _opcheck(ops.multi_tensor_norm.default, (grads, math.inf, per_tensor))


def test_opcheck_multi_tensor_norm_mixed_dtypes():
    grads = make_grads(SHAPES[:4], [torch.float16, torch.float32, torch.complex64, torch.float64], seed=41)
    _opcheck(ops.multi_tensor_norm.default, (grads, 3.5, True))


@pytest.mark.parametrize("coef", [0.37, 1.0, 1.5], ids=["lt1", "eq1", "gt1"])
def test_opcheck_multi_tensor_scale_(coef):
    grads = make_grads(SHAPES[:5], [torch.float32, torch.float16, torch.float32, torch.bfloat16,
                                    torch.float64], seed=42)
    _opcheck(ops.multi_tensor_scale_.default, (grads, torch.tensor(coef)))


def test_opcheck_multi_tensor_clamp_():
    grads = make_grads(SHAPES[:5], torch.float32, seed=43, scale=3.0)
    _opcheck(ops.multi_tensor_clamp_.default, (grads, -0.5, 0.75))


@pytest.mark.parametrize("max_norm", [0.1, 1e6], ids=["clips", "no-clip"])
def test_opcheck_clip_grad_norm_(max_norm):
    grads = make_grads(SHAPES[:5], [torch.float32, torch.bfloat16, torch.float32, torch.float16,
                                    torch.float32], seed=44)
    _opcheck(ops.clip_grad_norm_.default, (grads, max_norm, 2.0))


# --- the statistic before the root, total and per tensor -------------------------------------------


@pytest.mark.parametrize("norm_type", STAT_NORM_TYPES, ids=norm_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16,
                                   torch.complex64])
@pytest.mark.parametrize("backend", BACKENDS)
def test_statistics_total_and_per_tensor(backend, dtype, norm_type):
    grads = make_grads(SHAPES, dtype, seed=45)
    grads[0][::5] = 0  # exact zeros for the 0-norm (and an infinite |x|^-2)
    originals = clone_all(grads)
    total, per = _ops.multi_tensor_norm(backend, grads, norm_type, per_tensor=True)
    acc = torch.float64 if dtype in (torch.float64, torch.complex128) else torch.float32
    assert total.dtype == per.dtype == acc and total.shape == () and per.shape == (len(grads),)
    rtol = 1e-12 if acc == torch.float64 else (1e-5 if norm_type in (0.0, 1.0, 2.0) else 1e-4)
    expected = [oracle_statistic(g, norm_type) for g in grads]
    # every element of the per-tensor output is checked: nothing may be left unwritten
    for i, (value, want) in enumerate(zip(per.tolist(), expected)):
        assert value == pytest.approx(want, rel=rtol, abs=0), (i, value, want)
    combined = {math.inf: max, -math.inf: min}.get(norm_type, sum)(expected)
    assert float(total) == pytest.approx(combined, rel=rtol, abs=0)
    assert_bitwise_equal(grads, originals)
    # without per_tensor the second result is empty and the total the same bits
    total2, per2 = _ops.multi_tensor_norm(backend, grads, norm_type)
    assert per2.numel() == 0 and torch.equal(total2, total)


@pytest.mark.parametrize("backend", BACKENDS)
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
        total, _ = _ops.multi_tensor_norm(backend, grads, norm_type)
        assert float(total) == pytest.approx(want, rel=1e-12), norm_type


@pytest.mark.parametrize("norm_type", STAT_NORM_TYPES, ids=norm_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_statistic_of_no_elements_is_the_identity(backend, norm_type):
    grads = [torch.empty(0), torch.empty(3, 0), torch.empty(0, dtype=torch.float16)]
    total, per = _ops.multi_tensor_norm(backend, grads, norm_type, per_tensor=True)
    identity = math.inf if norm_type == -math.inf else 0.0
    assert float(total) == identity and per.tolist() == [identity] * 3


@pytest.mark.parametrize("count", [110, 111, 771, 5000])
@pytest.mark.parametrize("backend", BACKENDS)
def test_per_tensor_statistics_many_tensors(backend, count):
    gen = seeded(47 + count)
    sizes = torch.randint(0, 60, (count,), generator=gen).tolist()
    grads = [rand_tensor((n,), torch.float32, gen) for n in sizes]
    for norm_type in (2.0, -math.inf):
        total, per = _ops.multi_tensor_norm(backend, grads, norm_type, per_tensor=True)
        expected = torch.tensor([oracle_statistic(g, norm_type) for g in grads], dtype=torch.float64)
        torch.testing.assert_close(per.double(), expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_propagates_through_every_statistic(backend):
    for norm_type in (2.0, 1.0, 3.5, math.inf, -math.inf):
        for position in (0, 31, 32, 40000):  # the vector body, its tail and a later chunk
            grads = make_grads([(70001,), (5,)], torch.float32, seed=48)
            grads[0][position] = float("nan")
            total, per = _ops.multi_tensor_norm(backend, grads, norm_type, per_tensor=True)
            assert total.isnan() and per[0].isnan() and not per[1].isnan(), (norm_type, position)
    grads = make_grads([(100,)], torch.float32, seed=49)
    grads[0][5] = float("nan")
    total, _ = _ops.multi_tensor_norm(backend, grads, 0.0)  # nan != 0: counted
    assert float(total) == float(torch.count_nonzero(grads[0]))


# --- the in-place primitives ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16,
                                   torch.complex64, torch.complex128])
@pytest.mark.parametrize("backend", BACKENDS)
def test_multi_tensor_scale_(backend, dtype):
    grads = make_grads(SHAPES, dtype, seed=50)
    originals = clone_all(grads)
    for coef in (1.0, 1.5, math.inf):  # coef >= 1: nothing is written
        _ops.multi_tensor_scale_(backend, grads, torch.tensor(coef))
        assert_bitwise_equal(grads, originals)
    coef = torch.tensor(0.3721)
    _ops.multi_tensor_scale_(backend, grads, coef)
    assert_bitwise_equal(grads, scaled_by_coef(originals, coef))


@pytest.mark.parametrize("backend", BACKENDS)
def test_multi_tensor_scale_nan_coef_writes_nan(backend):
    grads = make_grads([(40,), (0,), (3, 3)], torch.float32, seed=51)
    _ops.multi_tensor_scale_(backend, grads, torch.tensor(float("nan")))
    assert all(g.isnan().all() for g in grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_multi_tensor_clamp_(backend, dtype):
    grads = make_grads(SHAPES, dtype, seed=52, scale=2.0)
    grads[4][::7] = float("nan")
    expected = [g.clone().clamp_(-0.25, 1.5) for g in grads]
    _ops.multi_tensor_clamp_(backend, grads, -0.25, 1.5)
    assert_bitwise_equal(grads, expected, any_nan=True)  # nan stays nan (its payload may not)


@pytest.mark.parametrize("norm_type", STAT_NORM_TYPES, ids=norm_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_clip_grad_norm_op(backend, norm_type):
    grads = make_grads(SHAPES, [torch.float32, torch.bfloat16] * 3 + [torch.float16], seed=53)
    originals = clone_all(grads)
    truth = oracle_norm(originals, norm_type)
    total = _ops.clip_grad_norm_(backend, grads, 0.5 * truth, norm_type)
    rtol = 1e-5 if norm_type in (0.0, 1.0, 2.0) or math.isinf(norm_type) else 1e-4
    assert total.dtype == torch.float32 and float(total) == pytest.approx(truth, rel=rtol)
    coef = ((total + 1e-6).reciprocal() * (0.5 * truth)).clamp(max=1.0)
    assert_bitwise_equal(grads, [(g.float() * coef).to(g.dtype) for g in originals])


def test_backends_agree_bitwise_on_scale_and_clamp():
    grads = make_grads(SHAPES, torch.bfloat16, seed=54, scale=2.0)
    a, b = clone_all(grads), clone_all(grads)
    _ops.multi_tensor_scale_("cpu", a, torch.tensor(0.61))
    _ops.multi_tensor_scale_("torch", b, torch.tensor(0.61))
    assert_bitwise_equal(a, b)
    _ops.multi_tensor_clamp_("cpu", a, -0.3, 0.2)
    _ops.multi_tensor_clamp_("torch", b, -0.3, 0.2)
    assert_bitwise_equal(a, b)


def test_fake_kernels_give_shapes_and_dtypes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        grads = [torch.empty(5), torch.empty(3, 2, dtype=torch.float64), torch.empty(0)]
        total, per = ops.multi_tensor_norm(grads, 2.0, True)
        assert total.shape == () and per.shape == (3,) and total.dtype == torch.float64
        total, per = ops.multi_tensor_norm(grads[:1], 2.0, False)
        assert per.shape == (0,) and total.dtype == torch.float32
        assert ops.clip_grad_norm_(grads, 1.0, 2.0).dtype == torch.float64


BOUNDARY_SIZES = [1, 7, 15, 16, 17, 31, 32, 33, 63, 64, 65, 1023, 32767, 32768, 32769, 65537]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_no_access_outside_each_tensor(backend, dtype):
    """Contiguous tensors carved from one nan-filled buffer with gaps between them: a vector
    loop that reads past a tensor's end makes the norm nan, one that writes past it changes a
    gap. Sizes straddle every vector width and the 32K-element chunk."""
    gap = 19
    total_len = sum(n + gap for n in BOUNDARY_SIZES) + gap
    buffer = torch.full((total_len,), float("nan"), dtype=dtype)
    gen = seeded(55)
    tensors, offset = [], gap
    in_tensor = torch.zeros(total_len, dtype=torch.bool)
    for n in BOUNDARY_SIZES:
        view = buffer[offset:offset + n]
        view.copy_(rand_tensor((n,), dtype, gen, scale=3.0))
        in_tensor[offset:offset + n] = True
        tensors.append(view)
        offset += n + gap
    originals = clone_all(tensors)
    for norm_type in (2.0, 1.0, 3.5, math.inf, -math.inf, 0.0):
        total, per = _ops.multi_tensor_norm(backend, tensors, norm_type, per_tensor=True)
        assert not total.isnan() and not per.isnan().any(), norm_type
        expected = [oracle_statistic(t, norm_type) for t in originals]
        rtol = 1e-5 if norm_type in (0.0, 1.0, 2.0) or math.isinf(norm_type) else 1e-4
        for value, want in zip(per.tolist(), expected):
            assert value == pytest.approx(want, rel=rtol)
    _ops.multi_tensor_scale_(backend, tensors, torch.tensor(0.43))
    assert buffer[~in_tensor].isnan().all(), "scale wrote outside a tensor"
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    coef = torch.tensor(0.43).to(acc)  # the float32 coefficient, widened for float64 tensors
    assert_bitwise_equal(tensors, [(t.to(acc) * coef).to(dtype) for t in originals])
    _ops.multi_tensor_clamp_(backend, tensors, -0.5, 0.5)
    assert buffer[~in_tensor].isnan().all(), "clamp wrote outside a tensor"
    total = _ops.clip_grad_norm_(backend, tensors, 0.01, 2.0)
    assert not total.isnan()
    assert buffer[~in_tensor].isnan().all(), "clip_grad_norm_ wrote outside a tensor"


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, 3.0])
def test_norm_bits_do_not_depend_on_memory_order(norm_type):
    # The kernels walk tensors allocated last-first backwards; the partials and their order of
    # combination are the same, so the bits are too.
    values = [torch.randn(n, generator=torch.Generator().manual_seed(n)) for n in (70001, 3, 40000, 999)]
    forward = [v.clone() for v in values]
    backward = [None] * len(values)
    for i in reversed(range(len(values))):
        backward[i] = values[i].clone()
    a, _ = torch.ops.fusedclip.multi_tensor_norm(forward, norm_type)
    b, _ = torch.ops.fusedclip.multi_tensor_norm(backward, norm_type)
    assert torch.equal(a, b)


def test_operator_table_says_what_runs_each_operator():
    """Every (operator, backend) that can run here has one kernel: the backend's own where the
    table says "kernel", reference.py's where it says "torch" (no silent fallback elsewhere)."""
    from fusedclip import _ops, reference

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


def test_triton_schemas_are_the_cpp_schemas():
    """The Triton backend's operators have the C++ operators' schemas, so one fake kernel each
    (fusedclip/fakes.py) serves both namespaces."""
    pytest.importorskip("triton")
    import fusedclip.triton  # noqa: F401  (registers torch.ops.fusedclip_triton)
    from fusedclip import fakes

    for name in ("multi_tensor_norm", "multi_tensor_scale_", "multi_tensor_clamp_", "clip_grad_norm_"):
        cpp = getattr(torch.ops.fusedclip, name).default._schema
        triton = getattr(torch.ops.fusedclip_triton, name).default._schema
        assert str(cpp).replace("fusedclip::", "") == str(triton).replace("fusedclip_triton::", ""), name
        assert name in fakes.FAKES
