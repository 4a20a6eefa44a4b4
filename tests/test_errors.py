"""Bad input: a clear Python exception, raised before any gradient is modified."""

from __future__ import annotations

import math

import pytest
import torch

import fusedclip
from helpers import CPU_BACKENDS, assert_bitwise_equal, clone_all, make_grads, params_with

AUTO_AND_BACKENDS = ("auto",) + CPU_BACKENDS


def _grads(seed=30, dtype=torch.float32):
    grads = make_grads([(200,), (0,), (9, 11), (70001,)], dtype, seed=seed, scale=5.0)
    grads[0][3] = float("nan")  # nan positions must survive a refused call too
    return grads


def _refused(call, grads, exc, match):
    """call() raises exc matching match, and every grad keeps its bits."""
    originals = clone_all(grads)
    with pytest.raises(exc, match=match):
        call()
    assert_bitwise_equal(grads, originals)


@pytest.mark.parametrize("max_norm", [-1.0, -1e-30, float("nan"), -math.inf, torch.tensor(-2.0)],
                         ids=["-1", "-1e-30", "nan", "-inf", "tensor(-2)"])
@pytest.mark.parametrize("backend", AUTO_AND_BACKENDS)
def test_bad_max_norm(backend, max_norm):
    grads = _grads()
    params = params_with(grads)
    _refused(lambda: fusedclip.clip_grad_norm_(params, max_norm, backend=backend), grads,
             ValueError, "max_norm must be a non-negative number")
    _refused(lambda: fusedclip.clip_grads_with_norm_(params, max_norm, torch.tensor(1e6),
                                                     backend=backend),
             grads, ValueError, "max_norm must be a non-negative number")


# What torch reads with float() (a bool, a numeric string, a bool tensor) is accepted: test_api.py.
@pytest.mark.parametrize("max_norm", [None, torch.ones(2), [1.0], 1 + 0j, torch.tensor(1 + 0j)],
                         ids=["None", "2-elem", "list", "complex", "complex-tensor"])
@pytest.mark.parametrize("backend", AUTO_AND_BACKENDS)
def test_max_norm_not_a_number(backend, max_norm):
    grads = _grads()
    _refused(lambda: fusedclip.clip_grad_norm_(params_with(grads), max_norm, backend=backend), grads,
             TypeError, "max_norm must be a real number")
    _refused(lambda: fusedclip.clip_grad_value_(params_with(grads), max_norm, backend=backend), grads,
             TypeError, "clip_value must be a real number")


@pytest.mark.parametrize("backend", AUTO_AND_BACKENDS)
def test_max_norm_string_not_a_number(backend):
    """torch's float("abc") raises ValueError: so does fusedclip, naming the argument."""
    grads = _grads()
    _refused(lambda: fusedclip.clip_grad_norm_(params_with(grads), "abc", backend=backend), grads,
             ValueError, "max_norm must be a number, got 'abc'")
    _refused(lambda: fusedclip.clip_grads_with_norm_(params_with(grads), "1,5", torch.tensor(3.0),
                                                     backend=backend),
             grads, ValueError, "max_norm must be a number, got '1,5'")
    _refused(lambda: fusedclip.clip_grad_value_(params_with(grads), "", backend=backend), grads,
             ValueError, "clip_value must be a number, got ''")


@pytest.mark.parametrize("backend", AUTO_AND_BACKENDS)
def test_meta_max_norm_or_clip_value_refused(backend):
    """A meta tensor holds no value (torch fails reading it: RuntimeError or NotImplementedError)."""
    grads = _grads()
    meta = torch.tensor(1.0, device="meta")
    _refused(lambda: fusedclip.clip_grad_norm_(params_with(grads), meta, backend=backend), grads,
             ValueError, "max_norm is a meta tensor")
    _refused(lambda: fusedclip.clip_grads_with_norm_(params_with(grads), meta, torch.tensor(3.0),
                                                     backend=backend),
             grads, ValueError, "max_norm is a meta tensor")
    _refused(lambda: fusedclip.clip_grad_value_(params_with(grads), meta, backend=backend), grads,
             ValueError, "clip_value is a meta tensor")
    _refused(lambda: fusedclip.clip_grad_norm_with_norms_(params_with(grads), meta, backend=backend), grads,
             ValueError, "max_norm is a meta tensor")
    _refused(lambda: fusedclip.clip_grad_norm_(params_with(grads), 1.0, meta, backend=backend), grads,
             ValueError, "norm_type is a meta tensor")


@pytest.mark.parametrize("backend", AUTO_AND_BACKENDS)
def test_meta_total_norm_refused_for_grads_elsewhere(backend):
    """torch fails with NotImplementedError ("Cannot copy out of meta tensor") when it brings the
    coefficient to the grads' device; fusedclip names total_norm before anything is written. Meta
    grads take a meta norm, as in torch."""
    grads = _grads()
    params = params_with(grads) + params_with([torch.empty(4, device="meta")])
    meta = torch.tensor(5.0, device="meta")
    _refused(lambda: fusedclip.clip_grads_with_norm_(params, 1.0, meta, backend=backend), grads,
             ValueError, "total_norm is a meta tensor")
    _refused(lambda: fusedclip.clip_grads_with_norm_(params[:2], 1.0, meta.reshape(1), backend=backend),
             grads, ValueError, "total_norm is a meta tensor")
    if backend != "cpu":  # backend "cpu" runs CPU tensors only
        fusedclip.clip_grads_with_norm_(params[-1:], 1.0, meta, backend=backend)


@pytest.mark.parametrize("norm_type, match", [
    (float("nan"), "norm_type must not be nan"),
    ("nan", "norm_type must not be nan"),
    ("fro", "norm_type must be a number or 'inf'"),
    ("two", "norm_type must be a number or 'inf'"),
    (None, "norm_type must be a number or 'inf'"),
])
@pytest.mark.parametrize("backend", AUTO_AND_BACKENDS)
def test_bad_norm_type(backend, norm_type, match):
    grads = _grads()
    _refused(lambda: fusedclip.clip_grad_norm_(params_with(grads), 1.0, norm_type, backend=backend),
             grads, ValueError, match)
    _refused(lambda: fusedclip.get_total_norm(grads, norm_type, backend=backend),
             grads, ValueError, match)


@pytest.mark.parametrize("clip_value", [-0.5, float("nan"), -math.inf], ids=["-0.5", "nan", "-inf"])
@pytest.mark.parametrize("backend", AUTO_AND_BACKENDS)
def test_bad_clip_value(backend, clip_value):
    grads = _grads()
    _refused(lambda: fusedclip.clip_grad_value_(params_with(grads), clip_value, backend=backend),
             grads, ValueError, "clip_value must be a non-negative number")


@pytest.mark.parametrize("position", [0, 1, 3])
@pytest.mark.parametrize("backend", AUTO_AND_BACKENDS)
def test_sparse_grads_refused_dense_unchanged(backend, position):
    grads = _grads()
    indices = torch.tensor([[0, 2, 5], [1, 1, 3]])
    sparse = torch.sparse_coo_tensor(indices, torch.tensor([3.0, -4.0, 12.0]), (7, 4),
                                     check_invariants=True)
    grads.insert(position, sparse)
    params = params_with(grads)
    match = "layout torch.sparse_coo"
    _refused(lambda: fusedclip.clip_grad_norm_(params, 0.01, backend=backend), grads, TypeError, match)
    _refused(lambda: fusedclip.clip_grad_value_(params, 0.01, backend=backend), grads, TypeError, match)
    _refused(lambda: fusedclip.clip_grads_with_norm_(params, 0.01, torch.tensor(100.0),
                                                     backend=backend), grads, TypeError, match)
    _refused(lambda: fusedclip.get_total_norm(grads, backend=backend), grads, TypeError, match)


@pytest.mark.parametrize("bad", [3.0, "weight", None, [torch.ones(2)]], ids=["float", "str", "None", "list"])
@pytest.mark.parametrize("backend", AUTO_AND_BACKENDS)
def test_non_tensor_parameters(backend, bad):
    grads = _grads()
    params = params_with(grads)
    params.insert(2, bad)
    match = r"parameters\[2\] must be a torch.Tensor"
    _refused(lambda: fusedclip.clip_grad_norm_(params, 0.01, backend=backend), grads, TypeError, match)
    _refused(lambda: fusedclip.clip_grad_value_(params, 0.01, backend=backend), grads, TypeError, match)
    _refused(lambda: fusedclip.clip_grads_with_norm_(params, 0.01, torch.tensor(1e3), backend=backend),
             grads, TypeError, match)


@pytest.mark.parametrize("bad", [3.0, "g"], ids=["float", "str"])
@pytest.mark.parametrize("backend", AUTO_AND_BACKENDS)
def test_non_tensor_in_get_total_norm(backend, bad):
    grads = _grads()
    _refused(lambda: fusedclip.get_total_norm(grads[:2] + [bad] + grads[2:], backend=backend),
             grads, TypeError, r"gradient 2 must be a torch.Tensor")


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool])
@pytest.mark.parametrize("backend", AUTO_AND_BACKENDS)
def test_integer_tensors_refused(backend, dtype):
    grads = _grads()
    tensors = grads[:1] + [torch.arange(12).reshape(3, 4).to(dtype)] + grads[1:]
    _refused(lambda: fusedclip.get_total_norm(tensors, backend=backend), grads, TypeError,
             f"gradient 1 has dtype {dtype}")


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
@pytest.mark.parametrize("backend", AUTO_AND_BACKENDS)
def test_complex_grads_refused_by_clip_grad_value(backend, dtype):
    grads = _grads()
    grads.insert(1, make_grads([(10,)], dtype, seed=31)[0])
    _refused(lambda: fusedclip.clip_grad_value_(params_with(grads), 0.01, backend=backend), grads,
             TypeError, "clip_grad_value_ does not support complex gradients")


def test_unknown_backend():
    grads = _grads()
    match = "backend must be one of"
    for call in (
        lambda: fusedclip.clip_grad_norm_(params_with(grads), 0.01, backend="cuda-fast"),
        lambda: fusedclip.get_total_norm(grads, backend="Torch"),
        lambda: fusedclip.clip_grad_value_(params_with(grads), 0.01, backend=""),
        lambda: fusedclip.clip_grads_with_norm_(params_with(grads), 0.01, torch.tensor(9.0),
                                                backend="tritons"),
    ):
        _refused(call, grads, ValueError, match)


def test_cpu_backend_refuses_other_devices():
    grads = [torch.empty(5, device="meta"), torch.empty(3, 2, device="meta")]
    match = "backend 'cpu' runs CPU tensors only"
    with pytest.raises(ValueError, match=match):
        fusedclip.clip_grad_norm_(params_with(grads), 1.0, backend="cpu")
    with pytest.raises(ValueError, match=match):
        fusedclip.get_total_norm(grads, backend="cpu")
    with pytest.raises(ValueError, match=match):
        fusedclip.clip_grad_value_(params_with(grads), 1.0, backend="cpu")


@pytest.mark.parametrize("op", ["clip_grad_norm_", "get_total_norm", "clip_grad_value_",
                                "clip_grads_with_norm_"])
def test_cpu_backend_refuses_a_mixed_list_before_writing(op):
    grads = _grads()
    params = params_with(grads) + params_with([torch.empty(4, device="meta")])
    call = {
        "clip_grad_norm_": lambda: fusedclip.clip_grad_norm_(params, 0.01, backend="cpu"),
        "get_total_norm": lambda: fusedclip.get_total_norm([p.grad for p in params], backend="cpu"),
        "clip_grad_value_": lambda: fusedclip.clip_grad_value_(params, 0.01, backend="cpu"),
        "clip_grads_with_norm_": lambda: fusedclip.clip_grads_with_norm_(
            params, 0.01, torch.tensor(1e3), backend="cpu"),
    }[op]
    _refused(call, grads, ValueError, "backend 'cpu' runs CPU tensors only")


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_cpu_then_meta_norm_raises_like_torch(backend):
    """A norm of CPU and meta grads, CPU first, cannot be brought to the CPU: torch raises
    NotImplementedError, and so must fusedclip -- never return an uninitialised norm from the
    Meta kernel that the dispatcher picks for a mixed list."""
    grads = _grads()
    params = params_with(grads) + params_with([torch.empty(4, device="meta")])
    with pytest.raises(NotImplementedError, match="meta"):
        torch.nn.utils.clip_grad_norm_(params_with(clone_all(grads)) + params[-1:], 0.01)
    _refused(lambda: fusedclip.clip_grad_norm_(params, 0.01, backend=backend), grads,
             NotImplementedError, "meta")
    _refused(lambda: fusedclip.get_total_norm([p.grad for p in params], backend=backend), grads,
             NotImplementedError, "meta")


@pytest.mark.parametrize("op", ["multi_tensor_norm", "multi_tensor_scale_", "multi_tensor_clamp_",
                                "clip_grad_norm_"])
def test_operators_refuse_mixed_devices(op):
    grads = _grads()
    tensors = grads + [torch.empty(4, device="meta")]
    args = {
        "multi_tensor_norm": (tensors, 2.0, True),
        "multi_tensor_scale_": (tensors, torch.tensor(0.5)),
        "multi_tensor_clamp_": (tensors, -0.1, 0.1),
        "clip_grad_norm_": (tensors, 0.01, 2.0),
    }[op]
    _refused(lambda: getattr(torch.ops.fusedclip, op)(*args), grads, TypeError,
             "all tensors must be on one device")


def test_foreach_true_on_meta_raises_like_torch():
    message = "foreach=True was passed, but can't use the foreach API on meta tensors"
    grads = [torch.empty(5, device="meta")]
    with pytest.raises(RuntimeError, match=message):
        torch.nn.utils.clip_grad_norm_(params_with(grads), 1.0, foreach=True)
    with pytest.raises(RuntimeError, match=message):
        fusedclip.clip_grad_norm_(params_with(grads), 1.0, foreach=True)
    with pytest.raises(RuntimeError, match=message):
        fusedclip.get_total_norm(grads, foreach=True)
    with pytest.raises(RuntimeError, match=message):
        fusedclip.clip_grad_value_(params_with(grads), 1.0, foreach=True)
    # foreach=False and None take any device, as in torch
    fusedclip.get_total_norm(grads, foreach=False)
    fusedclip.get_total_norm(grads, foreach=None)


@pytest.mark.parametrize("foreach", [None, True, False])
@pytest.mark.parametrize("backend", AUTO_AND_BACKENDS)
def test_foreach_is_accepted_on_cpu(backend, foreach):
    grads = _grads()
    grads[0][3] = 1.0
    originals = clone_all(grads)
    fusedclip.clip_grad_norm_(params_with(grads), 1e6, foreach=foreach, backend=backend)
    assert_bitwise_equal(grads, originals)


def _overlapping_view():
    """A (4, 3) view of 10 elements whose rows overlap: elements 2 to 7 each appear twice (torch
    scales them twice in place, the kernels' dense copy once: no defined result)."""
    return torch.arange(1.0, 11.0).as_strided((4, 3), (2, 1))


@pytest.mark.parametrize("backend", AUTO_AND_BACKENDS)
@pytest.mark.parametrize("view", ["expanded", "as_strided"])
def test_grads_whose_elements_share_memory_refused(backend, view):
    grads = _grads()
    grads[0][3] = 1.0
    grads.insert(1, torch.randn(1, 5).expand(4, 5) if view == "expanded" else _overlapping_view())
    for call in (lambda: fusedclip.clip_grad_norm_(params_with(grads), 1e-3, backend=backend),
                 lambda: fusedclip.clip_grad_value_(params_with(grads), 1e-3, backend=backend),
                 lambda: fusedclip.clip_grads_with_norm_(params_with(grads), 1e-3, torch.tensor(7.0), backend=backend)):
        _refused(call, grads, ValueError, "gradient 1 has internally overlapping memory")
    # reading one is fine, as torch reads it
    total = fusedclip.get_total_norm(grads, backend=backend)
    torch.testing.assert_close(total, torch.nn.utils.get_total_norm([g.clone() for g in grads]), rtol=1e-6, atol=0)


def test_overlap_rule_is_exact_on_every_small_layout():
    """numerics.internal_overlap, and the C++ kernels' refusal, against the offsets themselves:
    every layout of sizes 1 to 3 and strides 0 to 4 in two dimensions, and some in three."""
    import itertools

    layouts = [(sizes, strides) for sizes in itertools.product((1, 2, 3), repeat=2)
               for strides in itertools.product(range(5), repeat=2)]
    layouts += [((2, 3, 2), strides) for strides in itertools.product((1, 2, 3, 5), repeat=3)]
    native = fusedclip._backends._C is not None
    for sizes, strides in layouts:
        offsets = [sum(i * s for i, s in zip(index, strides)) for index in itertools.product(*map(range, sizes))]
        overlaps = len(set(offsets)) < len(offsets)
        view = torch.arange(1.0, max(offsets) + 2).as_strided(sizes, strides)
        assert fusedclip.numerics.internal_overlap(view) == overlaps, (sizes, strides)
        if native:
            try:
                fusedclip._ops.run("multi_tensor_scale_", "cpu", [view], torch.tensor(0.5))
                refused = False
            except ValueError:
                refused = True
            assert refused == overlaps, (sizes, strides)


@pytest.mark.parametrize("backend", AUTO_AND_BACKENDS)
def test_interleaved_layout_without_shared_memory_is_scaled_in_place(backend):
    """Offsets 2i + 3j (i < 3, j < 2) are all distinct although the stride of 3 steps inside the
    reach of the stride of 2: not refused, and scaled as torch scales it."""
    ours, theirs = torch.arange(1.0, 9.0), torch.arange(1.0, 9.0)
    fusedclip.clip_grad_norm_(params_with([ours.as_strided((3, 2), (2, 3))]), 1.0, backend=backend)
    torch.nn.utils.clip_grad_norm_(params_with([theirs.as_strided((3, 2), (2, 3))]), 1.0)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    assert ours[1] == 2.0 and ours[6] == 7.0  # not part of the view


def test_total_norm_must_be_a_tensor():
    grads = _grads()
    _refused(lambda: fusedclip.clip_grads_with_norm_(params_with(grads), 1.0, 5.0), grads,
             TypeError, "total_norm must be a torch.Tensor")


# --- found in review: each refused before any write ----------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_total_norm_must_have_one_element(backend):
    grads = _grads(seed=40)
    _refused(lambda: fusedclip.clip_grads_with_norm_(params_with(grads), 1.0, torch.ones(2),
                                                     backend=backend),
             grads, TypeError, "total_norm must be a one-element")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_conjugated_grad_refused(backend):
    grads = _grads(seed=41)
    z = torch.randn(6, dtype=torch.complex64, generator=torch.Generator().manual_seed(4)).conj()
    params = params_with(grads)
    params.append(torch.nn.Parameter(torch.empty(6, dtype=torch.complex64)))
    params[-1].grad = z
    _refused(lambda: fusedclip.clip_grad_norm_(params, 1e-3, backend=backend), grads,
             ValueError, "conjugated")


@pytest.mark.parametrize("entry", ["norm", "value", "with_norm"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_inference_tensor_grad_refused_and_versions_untouched(backend, entry):
    grads = _grads(seed=42)
    with torch.inference_mode():
        frozen = torch.randn(5)
    params = params_with(grads)
    params.append(torch.nn.Parameter(torch.empty(5)))
    params[-1].grad = frozen
    versions = [g._version for g in grads]
    calls = {
        "norm": lambda: fusedclip.clip_grad_norm_(params, 1e-3, backend=backend),
        "value": lambda: fusedclip.clip_grad_value_(params, 1e-3, backend=backend),
        "with_norm": lambda: fusedclip.clip_grads_with_norm_(params, 1e-3, torch.tensor(50.0),
                                                             backend=backend),
    }
    _refused(calls[entry], grads, RuntimeError, "inference tensor")
    if backend == "cpu":  # the C++ kernels check every tensor before bumping any version
        assert [g._version for g in grads] == versions


# --- the operators' own checks: ValueError or TypeError, before any write ------------------------
# The Python layer falls back to its general path on these two only (a refusal, nothing written);
# a RuntimeError from an operator means writes may have begun. A native kernel's refusal crosses
# the stable ABI as a RuntimeError with a marker, which fusedclip.operators.call turns into the
# TypeError or ValueError it stands for: the operators are called here as fusedclip calls them.


class _CpuOperators:
    """fusedclip's CPU operators, called as fusedclip calls them (fusedclip._ops: through the
    dispatcher, refusals raised as TypeError or ValueError)."""

    def __getattr__(self, name):
        return fusedclip._ops.KERNELS[name]["cpu"]


def _operator_refusals():
    """(name, call on grads, expected exception, message) for each check an operator makes
    before it writes."""
    ops = _CpuOperators()
    expanded = torch.randn(1, 5).expand(4, 5)
    ints = torch.ones(6, dtype=torch.int32)
    complex_grad = torch.randn(6, dtype=torch.complex64)

    def same_shape_params(grads):
        return [torch.randn_like(g) for g in grads]

    def agc(grads, params=None, clip_factor=0.01, eps=1e-3):
        params = same_shape_params(grads) if params is None else params
        return ops.multi_tensor_agc_(grads, params, clip_factor, eps)

    return [
        ("norm nan norm_type", lambda g: ops.multi_tensor_norm(g, math.nan, False), ValueError, "nan"),
        ("norm int tensor", lambda g: ops.multi_tensor_norm(g + [ints], 2.0, False), TypeError, "dtype"),
        ("scale coef shape", lambda g: ops.multi_tensor_scale_(g, torch.ones(2)), ValueError, "one-element"),
        ("scale int coef", lambda g: ops.multi_tensor_scale_(g, torch.tensor(0)), TypeError, "one-element"),
        ("scale expanded", lambda g: ops.multi_tensor_scale_(g + [expanded], torch.tensor(0.5)), ValueError,
         "internally overlapping"),
        ("scale overlapping view", lambda g: ops.multi_tensor_scale_(g + [_overlapping_view()], torch.tensor(0.5)),
         ValueError, "tensor 4 has internally overlapping"),
        ("clamp complex", lambda g: ops.multi_tensor_clamp_(g + [complex_grad], -0.1, 0.1), TypeError, "complex"),
        ("clip nan norm_type", lambda g: ops.clip_grad_norm_(g, 0.01, math.nan), ValueError, "nan"),
        ("clip int tensor", lambda g: ops.clip_grad_norm_(g + [ints], 0.01, 2.0), TypeError, "dtype"),
        ("clip with norms expanded", lambda g: ops.clip_grad_norm_with_norms_(g + [expanded], 0.01, 2.0),
         ValueError, "internally overlapping"),
        ("agc list lengths", lambda g: agc(g, same_shape_params(g)[1:]), ValueError, "parameters"),
        ("agc clip_factor", lambda g: agc(g, clip_factor=-1.0), ValueError, "clip_factor"),
        ("agc eps", lambda g: agc(g, eps=-1.0), ValueError, "eps"),
        ("agc int parameter", lambda g: agc(g + [torch.randn(6)], same_shape_params(g) + [ints]), TypeError,
         "parameter 4 has dtype"),
        ("agc parameter shape", lambda g: agc(g + [torch.randn(6)], same_shape_params(g) + [torch.randn(3, 2)]),
         ValueError, "shape"),
        ("agc complex gradient", lambda g: agc(g + [complex_grad], same_shape_params(g) + [torch.randn(6)]),
         TypeError, "complex"),
        ("per-tensor scale int coefs", lambda g: ops.multi_tensor_scale_per_tensor_(g, torch.zeros(len(g), dtype=torch.int64)),
         TypeError, "float"),
        ("per-tensor scale coefs shape", lambda g: ops.multi_tensor_scale_per_tensor_(g, torch.full((len(g) + 1,), 0.5)),
         ValueError, "one coefficient per tensor"),
        ("unscale inv_scale shape", lambda g: ops.multi_tensor_unscale_norm(g, torch.ones(2), 2.0), ValueError,
         "inv_scale"),
        ("unscale int inv_scale", lambda g: ops.multi_tensor_unscale_norm(g, torch.tensor(1), 2.0), TypeError,
         "inv_scale"),
        ("clip_grad_value_ complex", lambda g: fusedclip.clip_grad_value_(params_with(g + [complex_grad]), 0.1),
         TypeError, "complex"),
    ]


@pytest.mark.parametrize("case", range(len(_operator_refusals())),
                         ids=[name for name, *_ in _operator_refusals()])
def test_operator_checks_raise_value_or_type_error_before_writing(case):
    _, call, exc, match = _operator_refusals()[case]
    grads = _grads(seed=43)
    _refused(lambda: call(grads), grads, exc, match)


@pytest.mark.skipif(fusedclip._backends._C is None, reason="fusedclip._C is not built")
def test_a_native_refusal_through_torch_ops_is_a_marked_runtime_error():
    """Called straight through torch.ops, a native kernel's refusal is a RuntimeError (the stable
    ABI carries no exception type) whose message starts with the marker of the exception it
    stands for; fusedclip.operators.refusal_of reads it back."""
    grads = _grads(seed=44)
    with pytest.raises(RuntimeError, match=r"\[fusedclip TypeError\] fusedclip.multi_tensor_norm: tensor 4 has dtype") as info:
        torch.ops.fusedclip.multi_tensor_norm(grads + [torch.ones(3, dtype=torch.int32)], 2.0, False)
    refusal = fusedclip.operators.refusal_of(info.value)
    assert type(refusal) is TypeError and str(refusal).startswith("fusedclip.multi_tensor_norm: tensor 4")
    with pytest.raises(RuntimeError) as info:
        torch.ops.fusedclip.multi_tensor_scale_(grads + [torch.randn(1, 5).expand(4, 5)], torch.tensor(0.5))
    assert type(fusedclip.operators.refusal_of(info.value)) is ValueError
    assert fusedclip.operators.refusal_of(RuntimeError("CUDA error: out of memory")) is None


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_an_expanded_tensor_without_elements_is_written_as_torch_writes_it(backend):
    """An empty tensor with a stride-0 dimension of size 2 overlaps nothing (torch writes it in
    place): it is taken, not refused as an expanded tensor."""
    empty = torch.zeros(1, 0, 1).expand(2, 0, 1)
    params = params_with([torch.randn(4) * 10, empty])
    fusedclip.clip_grad_value_(params, 0.5, backend=backend)
    fusedclip.clip_grad_norm_(params, 0.1, backend=backend)
    assert float(params[0].grad.norm()) == pytest.approx(0.1, rel=1e-4)
