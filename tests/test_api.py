"""The public API as a drop-in for torch.nn.utils: argument forms, layouts, complex and mixed
dtypes, the returned tensor, non-finite grads, clip_grads_with_norm_ and clip_grad_value_.
Non-contiguous and complex grads and clip_grad_value_ against torch take the ``backend`` fixture
(every backend, conftest.py); the rest run the CPU backends."""

from __future__ import annotations

import decimal
import fractions
import math
import warnings

import pytest
import torch

import fusedclip
from helpers import (
    CPU_BACKENDS,
    FLOAT_DTYPES,
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
    rand_tensor,
    same_bits,
    scaled_by_returned_norm,
    seeded,
)

ALL_DTYPES = FLOAT_DTYPES + (torch.complex64, torch.complex128)


# --- what `parameters` may be ----------------------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_single_tensor(backend):
    (grad,) = make_grads([(40, 3)], torch.float32, seed=10)
    original = grad.clone()
    (param,) = params_with([grad])
    truth = oracle_norm([original], 2.0)
    total = fusedclip.clip_grad_norm_(param, 0.5 * truth, backend=backend)
    assert_norm_close(total, truth, 1e-5)
    assert_bitwise_equal([param.grad], scaled_by_returned_norm([original], total, 0.5 * truth))
    # get_total_norm takes the grad itself
    assert_norm_close(fusedclip.get_total_norm(original, 1.0, backend=backend),
                      oracle_norm([original], 1.0), 1e-5)


@pytest.mark.parametrize("form", ["list", "tuple", "generator", "parameters()"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_iterable_forms(backend, form):
    grads = make_grads([(30,), (4, 5), (0,), (9,)], torch.float32, seed=11)
    originals = clone_all(grads)
    module = torch.nn.Module()
    for i, p in enumerate(params_with(grads)):
        module.register_parameter(f"p{i}", p)
    params = list(module.parameters())
    parameters = {
        "list": params,
        "tuple": tuple(params),
        "generator": (p for p in params),
        "parameters()": module.parameters(),
    }[form]
    truth = oracle_norm(originals, 2.0)
    total = fusedclip.clip_grad_norm_(parameters, 0.5 * truth, backend=backend)
    assert_norm_close(total, truth, 1e-5)
    assert_bitwise_equal([p.grad for p in params],
                         scaled_by_returned_norm(originals, total, 0.5 * truth))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_none_grads_are_skipped(backend):
    grads = make_grads([(30,), (7, 2), (5,)], torch.float32, seed=12)
    originals = clone_all(grads)
    params = params_with([None, grads[0], None, grads[1], grads[2], None])
    without = [params[0].detach().clone(), params[2].detach().clone()]
    truth = oracle_norm(originals, 2.0)
    total = fusedclip.clip_grad_norm_(params, 0.5 * truth, backend=backend)
    assert_norm_close(total, truth, 1e-5)
    assert_bitwise_equal(grads, scaled_by_returned_norm(originals, total, 0.5 * truth))
    assert params[0].grad is None and params[2].grad is None and params[5].grad is None
    assert_bitwise_equal([params[0].detach(), params[2].detach()], without)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_no_grads_returns_zero_and_touches_nothing(backend):
    params = params_with([None, None])
    values = clone_all(p.detach() for p in params)
    expected = torch.nn.utils.clip_grad_norm_(params_with([None]), 1.0)
    for parameters in (params, [], params[0]):
        total = fusedclip.clip_grad_norm_(parameters, 1.0, backend=backend)
        assert same_bits(total, torch.tensor(0.0)) and same_bits(total, expected)
        assert total.device == torch.device("cpu")
    assert all(p.grad is None for p in params)
    assert_bitwise_equal([p.detach() for p in params], values)
    assert same_bits(fusedclip.get_total_norm([], backend=backend), torch.tensor(0.0))
    assert fusedclip.clip_grads_with_norm_(params, 1.0, torch.tensor(5.0), backend=backend) is None
    assert fusedclip.clip_grad_value_(params, 1.0, backend=backend) is None
    assert all(p.grad is None for p in params)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_generator_warns_like_torch(backend):
    message = "`parameters` is an empty generator, no gradient clipping will occur."
    with pytest.warns(UserWarning, match="empty generator") as record:
        total = fusedclip.clip_grad_norm_((p for p in []), 1.0, backend=backend)
    assert any(str(w.message) == message for w in record)
    assert same_bits(total, torch.tensor(0.0))
    with warnings.catch_warnings(record=True) as theirs:
        warnings.simplefilter("always")
        torch.nn.utils.clip_grad_norm_((p for p in []), 1.0)
    if theirs:  # torch 2.6 does not warn here; later versions do, with the same words
        assert message in [str(w.message) for w in theirs]
    # an empty list is not a generator: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fusedclip.clip_grad_norm_([], 1.0, backend=backend)


# --- layouts ----------------------------------------------------------------------------------


def _non_contiguous_grads(dtype, seed, device="cpu"):
    """Views into buffers whose other elements are poison (nan): a kernel that reads or writes
    outside a view's elements is caught by the norm (nan) or by the poison changing."""
    gen = seeded(seed)
    buffers, grads = [], []

    def view_of(shape, make_view):
        base = torch.full(shape, float("nan"), dtype=dtype, device=device)
        view = make_view(base)
        view.copy_(rand_tensor(view.shape, dtype, gen))
        buffers.append(base)
        grads.append(view)

    view_of((64, 33), lambda b: b.t())  # transposed: dense, no poison
    view_of((1000,), lambda b: b[::2])  # a step of 2
    view_of((40, 90), lambda b: b[:, 5:80:3])  # step 3, rows with gaps
    view_of((6, 7, 8), lambda b: b.permute(2, 0, 1))  # permuted: dense
    view_of((2, 70000), lambda b: b[:, ::2])  # non-dense, longer than a chunk
    view_of((10, 10), lambda b: b[1:9, 2:7])  # a window
    return buffers, grads


@pytest.mark.parametrize("dtype", FLOAT_DTYPES + (torch.complex64,))
def test_non_contiguous_grads_scaled_in_place(backend, dtype):
    buffers, grads = _non_contiguous_grads(dtype, seed=13, device=backend.device)
    assert not all(g.is_contiguous() for g in grads)
    originals = [g.cpu().clone() for g in grads]  # clone keeps values (not the poison)
    strides = [g.stride() for g in grads]
    pointers = [g.data_ptr() for g in grads]
    poison_masks = []
    for base, g in zip(buffers, grads):
        mask = torch.ones(base.shape, dtype=torch.bool)
        # mark the view's elements in the base: write zeros through a bool view of the same shape
        marker = torch.ones_like(base, dtype=torch.bool)
        mask_view = marker.as_strided(g.shape, g.stride(), g.storage_offset() - base.storage_offset())
        mask_view.fill_(False)
        poison_masks.append(marker)
    truth = oracle_norm(originals, 2.0)
    total = fusedclip.clip_grad_norm_(params_with(grads), 0.5 * truth, backend=backend.name)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert_norm_close(total.cpu(), truth, tol)
    assert [g.stride() for g in grads] == strides and [g.data_ptr() for g in grads] == pointers
    assert_bitwise_equal(cpu(grads), scaled_by_returned_norm(originals, total.cpu(), 0.5 * truth))
    assert_scaled_like_oracle(cpu(grads), originals, truth, 0.5 * truth, tol)
    for base, poison in zip(buffers, poison_masks):
        assert base[poison].isnan().all(), "an element outside a view was written"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_channels_last_grad(backend):
    grad = rand_tensor((4, 3, 5, 6), torch.float32, seeded(14)).to(memory_format=torch.channels_last)
    original, stride = grad.clone(), grad.stride()
    truth = oracle_norm([original], 2.0)
    total = fusedclip.clip_grad_norm_(params_with([grad]), 0.5 * truth, backend=backend)
    assert grad.stride() == stride
    assert_bitwise_equal([grad], scaled_by_returned_norm([original], total, 0.5 * truth))


# --- complex and mixed dtypes ---------------------------------------------------------------------


@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.5, math.inf, -math.inf, 0.0], ids=norm_id)
@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_complex_grads(backend, dtype, norm_type):
    originals = make_grads([(300,), (0,), (5, 7), (1,)], dtype, seed=15)
    originals[0][::7] = 0  # exact zeros: the 0-norm counts |z| != 0
    grads = backend.on(originals)
    truth = oracle_norm(originals, norm_type)
    tol = norm_rtol(1e-10 if dtype == torch.complex128 else 1e-5, norm_type, dtype)
    assert_norm_close(fusedclip.get_total_norm(grads, norm_type, backend=backend.name).cpu(), truth, tol)
    total = fusedclip.clip_grad_norm_(params_with(grads), 0.5 * truth, norm_type, backend=backend.name)
    assert total.dtype == expected_dtype([dtype]) and not total.is_complex()
    assert_norm_close(total.cpu(), truth, tol)
    assert_bitwise_equal(cpu(grads), scaled_by_returned_norm(originals, total.cpu(), 0.5 * truth))
    assert_scaled_like_oracle(cpu(grads), originals, truth, 0.5 * truth, tol)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_complex_agrees_with_torch(backend):
    grads = make_grads([(100,), (3, 4)], torch.complex64, seed=16)
    ours, theirs = params_with(clone_all(grads)), params_with(clone_all(grads))
    n_ours = fusedclip.clip_grad_norm_(ours, 1.0, backend=backend)
    n_theirs = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    assert n_ours.dtype == n_theirs.dtype
    torch.testing.assert_close(n_ours, n_theirs, rtol=1e-5, atol=0)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)


MIXES = {
    "fp32+bf16+fp16": [torch.float32, torch.bfloat16, torch.float16, torch.float32],
    "fp16+bf16": [torch.float16, torch.bfloat16, torch.float16],
    "fp32+fp64": [torch.float32, torch.float64, torch.float32],
    "bf16+fp64": [torch.bfloat16, torch.float64],
    "c64+fp16": [torch.complex64, torch.float16],
    "c128+fp32": [torch.complex128, torch.float32],
    "all": [torch.float16, torch.float32, torch.bfloat16, torch.float64, torch.complex64],
}


@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.5, math.inf, -math.inf, 0.0], ids=norm_id)
@pytest.mark.parametrize("mix", sorted(MIXES))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_mixed_dtypes(backend, mix, norm_type):
    dtypes = MIXES[mix]
    shapes = [(70 + 31 * i, 3) if i % 2 else (257 * (i + 1),) for i in range(len(dtypes))]
    grads = make_grads(shapes, dtypes, seed=17)
    originals = clone_all(grads)
    truth = oracle_norm(originals, norm_type)
    tol = norm_rtol(1e-5, norm_type)
    total = fusedclip.get_total_norm(grads, norm_type, backend=backend)
    assert total.dtype == expected_dtype(dtypes)
    assert_norm_close(total, truth, tol)
    total = fusedclip.clip_grad_norm_(params_with(grads), 0.5 * truth, norm_type, backend=backend)
    assert total.dtype == expected_dtype(dtypes)
    assert_norm_close(total, truth, tol)
    assert_bitwise_equal(grads, scaled_by_returned_norm(originals, total, 0.5 * truth))
    assert_scaled_like_oracle(grads, originals, truth, 0.5 * truth, tol)


@pytest.mark.parametrize(
    "dtypes",
    [[torch.float32], [torch.float64], [torch.float32, torch.float64], [torch.float32, torch.float16],
     [torch.complex64], [torch.complex128], [torch.float16, torch.bfloat16]],
    ids=lambda ds: "+".join(str(d).split(".")[1] for d in ds),
)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_returned_dtype_is_torchs_unless_all_low_precision(backend, dtypes):
    grads = make_grads([(10,)] * len(dtypes), dtypes, seed=18)
    ours = fusedclip.get_total_norm(grads, backend=backend)
    theirs = torch.nn.utils.get_total_norm(grads)
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape == ()
    assert ours.device == theirs.device


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_all_low_precision_returns_float32_not_torchs_dtype(dtype):
    grads = make_grads([(10,), (3,)], dtype, seed=19)
    assert torch.nn.utils.get_total_norm(grads).dtype == dtype
    assert fusedclip.get_total_norm(grads).dtype == torch.float32


# --- devices: only "meta" exists besides the CPU here -----------------------------------------------


@pytest.mark.parametrize("norm_type", [2.0, math.inf, 0.0], ids=norm_id)
def test_meta_grads_give_a_meta_norm(norm_type):
    grads = [torch.empty(5, 3, device="meta"), torch.empty(0, device="meta"),
             torch.empty(7, device="meta", dtype=torch.float64)]
    total = fusedclip.get_total_norm(grads, norm_type)
    assert total.device.type == "meta" and total.dtype == torch.float64 and total.shape == ()
    total = fusedclip.clip_grad_norm_(params_with(grads), 1.0, norm_type)
    assert total.device.type == "meta" and total.dtype == torch.float64


def test_result_on_first_grads_device():
    """Mixed devices: the result lands on the first grad's device (meta first; a meta norm cannot
    be copied to the CPU, in torch either, so the other order is not testable without a GPU)."""
    grads = [torch.empty(4, device="meta"), rand_tensor((6,), torch.float32, seeded(20))]
    total = fusedclip.get_total_norm(grads)
    assert total.device.type == "meta" and total.dtype == torch.float32
    assert total.device == torch.nn.utils.get_total_norm(grads).device


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_scale_and_clamp_cpu_and_meta_grads(backend):
    """Writes run per device: the CPU grads of a CPU+meta list are scaled and clamped."""
    grads = make_grads([(50,), (7, 3)], torch.float32, seed=20, scale=3.0)
    originals = clone_all(grads)
    params = params_with(grads) + params_with([torch.empty(4, device="meta")])
    total = torch.tensor(oracle_norm(originals, 2.0), dtype=torch.float32)
    fusedclip.clip_grads_with_norm_(params, 0.5, total, backend=backend)
    assert_bitwise_equal(grads, scaled_by_returned_norm(originals, total, 0.5))
    clamped = [g.clone().clamp_(-0.01, 0.01) for g in grads]
    fusedclip.clip_grad_value_(params, 0.01, backend=backend)
    assert_bitwise_equal(grads, clamped)


# --- no clipping: nothing written -------------------------------------------------------------------


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, 0.5], ids=norm_id)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_grads_unchanged_when_not_clipping(backend, dtype, norm_type):
    grads = make_grads([(300,), (0,), (4, 9), (70000,)], dtype, seed=21)
    grads[1 if dtype.is_complex else 2].view(-1)[:3] = -0.0  # x * 1.0 keeps -0, but check bits
    originals = clone_all(grads)
    truth = oracle_norm(originals, norm_type)
    for max_norm in (2 * truth, 1.5 * truth):
        total = fusedclip.clip_grad_norm_(params_with(grads), max_norm, norm_type, backend=backend)
        assert_norm_close(total, truth, norm_rtol(1e-5, norm_type, dtype))
        assert_bitwise_equal(grads, originals)
        fusedclip.clip_grads_with_norm_(params_with(grads), max_norm, total, backend=backend)
        assert_bitwise_equal(grads, originals)


# --- non-finite grads ---------------------------------------------------------------------------


def _with(value, dtype=torch.float32, seed=22):
    grads = make_grads([(100,), (0,), (30, 2)], dtype, seed=seed)
    grads[2][7, 1] = value
    return grads


@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.5, math.inf, -math.inf], ids=norm_id)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=str)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_error_if_nonfinite_raises_before_writing(backend, bad, norm_type):
    if norm_type == -math.inf and not math.isnan(bad):
        pytest.skip("the -inf norm (min |g|) of finite grads and one inf is finite")
    grads = _with(bad)
    originals = clone_all(grads)
    with pytest.raises(RuntimeError, match="non-finite"):
        fusedclip.clip_grad_norm_(params_with(grads), 1.0, norm_type, error_if_nonfinite=True,
                                  backend=backend)
    assert_bitwise_equal(grads, originals)
    with pytest.raises(RuntimeError, match="non-finite"):
        fusedclip.get_total_norm(grads, norm_type, error_if_nonfinite=True, backend=backend)
    # torch raises the same error (without the empty grad: torch refuses it for +-inf norms)
    with pytest.raises(RuntimeError, match="non-finite"):
        torch.nn.utils.clip_grad_norm_(params_with([g.clone() for g in grads if g.numel()]), 1.0,
                                       norm_type, error_if_nonfinite=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_error_if_nonfinite_passes_finite_grads(backend):
    grads = _with(3.0)
    originals = clone_all(grads)
    total = fusedclip.clip_grad_norm_(params_with(grads), 0.1, error_if_nonfinite=True,
                                      backend=backend)
    assert_norm_close(total, oracle_norm(originals, 2.0), 1e-5)
    assert_bitwise_equal(grads, scaled_by_returned_norm(originals, total, 0.1))


@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.5, math.inf, -math.inf], ids=norm_id)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nonfinite_grads_behave_like_torch(backend, dtype, bad, norm_type):
    """nan anywhere: nan norm and nan grads; inf: norm inf, coefficient 0 (finite grads become
    +-0, the inf becomes nan) -- as torch.nn.utils.clip_grad_norm_ does."""
    grads = _with(bad, dtype)
    ours, theirs = params_with(clone_all(grads)), params_with(clone_all(grads))
    theirs = [p for p in theirs if p.grad.numel()]  # torch raises on empty grads for +-inf
    n_ours = fusedclip.clip_grad_norm_(ours, 1.0, norm_type, backend=backend)
    n_theirs = torch.nn.utils.clip_grad_norm_(theirs, 1.0, norm_type)
    assert n_ours.dtype == n_theirs.dtype
    if math.isnan(bad):
        assert n_ours.isnan() and n_theirs.isnan()
    ours = [p for p in ours if p.grad.numel()]
    if n_ours.isfinite():  # the -inf norm with an inf grad: an ordinary clip
        torch.testing.assert_close(n_ours, n_theirs, rtol=2e-5, atol=0)
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a.grad, b.grad, rtol=2e-5, atol=1e-12, equal_nan=True)
    else:
        # the same values exactly, nan in the same places (a nan's sign bit may differ)
        assert same_bits(n_ours, n_theirs) or n_ours.isnan()
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0, equal_nan=True)
        assert all(p.grad.isnan().all() for p in ours) == math.isnan(bad)


# --- clip_grads_with_norm_ and get_total_norm ----------------------------------------------------


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_clip_grads_with_norm_equals_torch(backend, dtype):
    grads = make_grads([(500,), (0,), (13, 17), (1,)], dtype, seed=23)
    ours, theirs = params_with(clone_all(grads)), params_with(clone_all(grads))
    total_norm = torch.nn.utils.get_total_norm(grads)
    for max_norm in (0.3 * float(total_norm), 3.0 * float(total_norm)):
        result = fusedclip.clip_grads_with_norm_(ours, max_norm, total_norm, backend=backend)
        expected = torch.nn.utils.clip_grads_with_norm_(theirs, max_norm, total_norm)
        assert result is None and expected is None
        assert_bitwise_equal([p.grad for p in ours], [p.grad for p in theirs])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_clip_grads_with_norm_float32_total_on_low_precision(backend):
    grads = make_grads([(500,), (7,)], torch.bfloat16, seed=24)
    originals = clone_all(grads)
    total = fusedclip.get_total_norm(grads, backend=backend)
    fusedclip.clip_grads_with_norm_(params_with(grads), 0.2 * float(total), total, backend=backend)
    assert_bitwise_equal(grads, scaled_by_returned_norm(originals, total, 0.2 * float(total)))
    assert_scaled_like_oracle(grads, originals, oracle_norm(originals, 2.0), 0.2 * float(total), 1e-5)


@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.5, math.inf, -math.inf, "inf"], ids=norm_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_get_total_norm_agrees_with_torch(backend, dtype, norm_type):
    grads = make_grads([(500,), (13, 17), (1,)], dtype, seed=25)
    ours = fusedclip.get_total_norm(grads, norm_type, backend=backend)
    theirs = torch.nn.utils.get_total_norm(grads, norm_type)
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=1e-12 if dtype == torch.float64 else 2e-5, atol=0)


# --- clip_grad_value_ -----------------------------------------------------------------------------


@pytest.mark.parametrize("clip_value", [0.0, 0.3, 1.5, 1e4])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_clip_grad_value_equals_torch(backend, dtype, clip_value):
    grads = make_grads([(1000,), (0,), (33, 3), (1,), (70001,)], dtype, seed=26, scale=2.0)
    grads[0][::11] = float("nan")
    grads[2][0, :] = torch.tensor([float("inf"), -float("inf"), -0.0])
    ours, theirs = params_with(backend.on(grads)), params_with(clone_all(grads))
    assert fusedclip.clip_grad_value_(ours, clip_value, backend=backend.name) is None
    torch.nn.utils.clip_grad_value_(theirs, clip_value)
    # bitwise, with nan in the same places (torch's own nan payloads vary with its code path)
    assert_bitwise_equal(cpu(p.grad for p in ours), [p.grad for p in theirs], any_nan=True)
    assert ours[0].grad[::11].isnan().all()  # nan preserved


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_clip_grad_value_non_contiguous(backend, dtype):
    buffers, grads = _non_contiguous_grads(dtype, seed=27, device=backend.device)
    strides, pointers = [g.stride() for g in grads], [g.data_ptr() for g in grads]
    poison = [b.isnan() for b in buffers]  # before: the poison and nothing else is nan
    expected = [g.cpu().clone().clamp_(-0.5, 0.5) for g in grads]
    fusedclip.clip_grad_value_(params_with(grads), 0.5, backend=backend.name)
    assert [g.stride() for g in grads] == strides and [g.data_ptr() for g in grads] == pointers
    assert_bitwise_equal([g.cpu().contiguous() for g in grads], expected)
    for base, mask in zip(buffers, poison):
        assert torch.equal(base.isnan(), mask), "an element outside a view was written"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_clip_grad_value_single_tensor_and_generator(backend):
    (grad,) = make_grads([(64,)], torch.float32, seed=28, scale=3.0)
    expected = grad.clone().clamp_(-1.0, 1.0)
    fusedclip.clip_grad_value_(params_with([grad])[0], 1.0, backend=backend)
    assert_bitwise_equal([grad], [expected])
    grads = make_grads([(64,), (5,)], torch.float32, seed=29, scale=3.0)
    expected = [g.clone().clamp_(-1.0, 1.0) for g in grads]
    fusedclip.clip_grad_value_((p for p in params_with(grads)), 1.0, backend=backend)
    assert_bitwise_equal(grads, expected)


# --- parameters of a Tensor subclass (their grads are plain tensors) --------------------------------


class _TaggedTensor(torch.Tensor):
    """A Tensor subclass parameter: its grad is read as any other's."""


@pytest.mark.parametrize("entry", ["clip_grad_norm_", "clip_grads_with_norm_", "clip_grad_value_"])
def test_subclass_parameters_take_the_python_path(entry):
    grads = make_grads([(7, 3), (11,)], torch.float32, seed=90)
    originals = clone_all(grads)
    params = params_with(grads)
    tagged = torch.Tensor._make_subclass(_TaggedTensor, torch.empty(5), True)
    tagged.grad = make_grads([(5,)], torch.float32, seed=91)[0]
    params.append(tagged)
    grads.append(tagged.grad)
    originals.append(tagged.grad.clone())
    torch_params = params_with(clone_all(originals))
    truth = oracle_norm(originals, 2.0)
    if entry == "clip_grad_norm_":
        total = fusedclip.clip_grad_norm_(params, 0.25 * truth)
        torch.nn.utils.clip_grad_norm_(torch_params, 0.25 * truth)
        assert float(total) == pytest.approx(truth, rel=1e-5)
    elif entry == "clip_grads_with_norm_":
        fusedclip.clip_grads_with_norm_(params, 0.25 * truth, torch.tensor(truth))
        torch.nn.utils.clip_grads_with_norm_(torch_params, 0.25 * truth, torch.tensor(truth))
    else:
        fusedclip.clip_grad_value_(params, 0.3)
        torch.nn.utils.clip_grad_value_(torch_params, 0.3)
    for ours, theirs in zip(grads, (p.grad for p in torch_params)):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)


def test_in_place_clip_bumps_version_counters():
    # Autograd's view of an in-place write: a grad saved for backward elsewhere must see it.
    grads = make_grads([(64,), (3, 5)], torch.float32, seed=92)
    before = [g._version for g in grads]
    fusedclip.clip_grad_norm_(params_with(grads), 1e-3)
    assert all(g._version > v for g, v in zip(grads, before))
    before = [g._version for g in grads]
    fusedclip.clip_grad_value_(params_with(grads), 1e-4)
    assert all(g._version > v for g, v in zip(grads, before))


# --- grads that share memory: scaled once per occurrence, in list order, as torch does -------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", ["same-grad-twice", "strided-view-of-another"])
def test_grads_sharing_memory_match_torch(backend, layout):
    def build():
        base = torch.randn(64, 1024, generator=torch.Generator().manual_seed(7))
        other = torch.randn(300, generator=torch.Generator().manual_seed(8))
        second = base if layout == "same-grad-twice" else base[:, ::2]
        grads = [base, other, second]
        params = []
        for g in grads:
            p = torch.nn.Parameter(torch.empty(g.shape))
            p.grad = g
            params.append(p)
        return base, other, params

    ours_base, ours_other, ours = build()
    theirs_base, theirs_other, theirs = build()
    total = fusedclip.clip_grad_norm_(ours, 0.5, backend=backend)
    expected = torch.nn.utils.clip_grad_norm_(theirs, 0.5)
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=0)
    # the coefficient may differ in its last bit (norms differ in rounding): compare closely
    torch.testing.assert_close(ours_base, theirs_base, rtol=1e-5, atol=0)
    torch.testing.assert_close(ours_other, theirs_other, rtol=1e-5, atol=0)


def test_torch_backend_clamps_float16_past_its_range_like_cpu():
    grads = [torch.tensor([7e4, -7e4, 3.0]), torch.tensor([1e4, -65504.0, float("inf")]).half()]
    results = {}
    for backend in CPU_BACKENDS:
        copies = [g.clone() for g in grads]
        fusedclip.clip_grad_value_(params_with(copies), 7e4, backend=backend)
        results[backend] = copies
    assert_bitwise_equal(results["torch"], results["cpu"])
    assert float(results["cpu"][1][2]) == math.inf  # 70000 rounds to inf in float16: no clamp


# --- arguments that torch reads with float(): accepted, with torch's results ------------------------
# torch reads max_norm and clip_value with float(), so it takes a bool, a numeric string, a
# Decimal and a one-element bool or integer tensor; and computes `max_norm / (total_norm + 1e-6)`,
# which takes an integer or bool total_norm (promoted to the default dtype). fusedclip takes the
# same, with torch's bits: a call with such an argument gives what the call with float(value)
# gives, and clip_grads_with_norm_ and clip_grad_value_ give torch's bits.

TORCH_READS_AS_FLOAT = [True, False, "1.0", " 0.25 ", "1e-3", "inf", decimal.Decimal("0.5"),
                        fractions.Fraction(1, 3), torch.tensor(True), torch.tensor(2), torch.tensor(False)]
TORCH_READS_AS_FLOAT_IDS = ["True", "False", "str", "str-spaces", "str-exp", "str-inf", "Decimal",
                            "Fraction", "tensor-True", "tensor-int", "tensor-False"]


def _torch_like_grads(dtype=torch.float32, seed=60):
    return make_grads([(300,), (0,), (7, 9), (1,)], dtype, seed=seed, scale=2.0)


@pytest.mark.parametrize("max_norm", TORCH_READS_AS_FLOAT, ids=TORCH_READS_AS_FLOAT_IDS)
@pytest.mark.parametrize("backend", ("auto",) + CPU_BACKENDS)
def test_max_norm_read_as_torch_reads_it(backend, max_norm):
    as_float = float(max_norm)
    grads, expected = _torch_like_grads(), _torch_like_grads()
    total = fusedclip.clip_grad_norm_(params_with(grads), max_norm, backend=backend)
    expected_total = fusedclip.clip_grad_norm_(params_with(expected), as_float, backend=backend)
    assert_bitwise_equal([total] + grads, [expected_total] + expected)
    # clip_grads_with_norm_: torch's own bits
    grads, theirs = _torch_like_grads(), _torch_like_grads()
    norm = torch.tensor(31.25)
    fusedclip.clip_grads_with_norm_(params_with(grads), max_norm, norm, backend=backend)
    torch.nn.utils.clip_grads_with_norm_(params_with(theirs), max_norm, norm)
    assert_bitwise_equal(grads, theirs)


@pytest.mark.parametrize("clip_value", [True, "0.5", " 1e-1", decimal.Decimal("0.3"), torch.tensor(True),
                                        torch.tensor(1)],
                         ids=["True", "str", "str-exp", "Decimal", "tensor-True", "tensor-int"])
@pytest.mark.parametrize("backend", ("auto",) + CPU_BACKENDS)
def test_clip_value_read_as_torch_reads_it(backend, clip_value):
    grads, theirs = _torch_like_grads(), _torch_like_grads()
    fusedclip.clip_grad_value_(params_with(grads), clip_value, backend=backend)
    torch.nn.utils.clip_grad_value_(params_with(theirs), clip_value)
    assert_bitwise_equal(grads, theirs)


@pytest.mark.parametrize("total_norm", [torch.tensor(5), torch.tensor(True), torch.tensor(False),
                                        torch.tensor(7, dtype=torch.int8), torch.tensor(200, dtype=torch.uint8),
                                        torch.tensor([3], dtype=torch.int32)],
                         ids=["int64", "True", "False", "int8", "uint8", "int32-1elem"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ("auto",) + CPU_BACKENDS)
def test_integer_or_bool_total_norm_as_torch(backend, dtype, total_norm):
    """torch's `max_norm / (total_norm + 1e-6)` promotes an integer or bool norm to the default
    dtype (float32); fusedclip scales by that coefficient, bit for bit. (A (1,)-shaped norm, which
    torch refuses, scales as its 0-dim value, as for a floating-point norm.)"""
    grads, theirs = _torch_like_grads(dtype), _torch_like_grads(dtype)
    fusedclip.clip_grads_with_norm_(params_with(grads), 2.5, total_norm, backend=backend)
    torch.nn.utils.clip_grads_with_norm_(params_with(theirs), 2.5, total_norm.reshape(()))
    assert_bitwise_equal(grads, theirs)
