"""Adaptive clipping (fusedclip.AGC, AutoClip, ZClip, PerTensorClip), each against a plain float64
implementation of the same formula written here. The operators behind it (multi_tensor_agc_,
multi_tensor_scale_per_tensor_) have their contracts in test_operator_contracts.py, which uses
agc_case and reference_agc from here."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

import fusedclip
from fusedclip import _backends
from helpers import (CPU_BACKENDS, ULP, assert_bitwise_equal, clone_all, make_grads, oracle_norm, params_with,
                      rand_tensor, seeded)

ops = torch.ops.fusedclip

# --- plain implementations of the formulas ------------------------------------------------------


def unitwise_norm(x: torch.Tensor) -> torch.Tensor:
    """timm's unitwise_norm, in float64: per row for ndim > 1, else the whole tensor."""
    x = x.double()
    if x.ndim <= 1:
        return x.norm(2)
    return x.norm(2, dim=tuple(range(1, x.ndim)), keepdim=True)


def reference_agc(params, clip_factor, eps):
    """timm's adaptive_clip_grad loop in float64; returns the clipped grads (float64)."""
    out = []
    for p in params:
        g = p.grad.double()
        max_norm = unitwise_norm(p.detach()).clamp(min=eps) * clip_factor
        g_norm = unitwise_norm(g)
        clipped = g * (max_norm / g_norm.clamp(min=1e-6))
        out.append(torch.where(g_norm < max_norm, g, clipped))
    return out


def agc_case(dtype, seed=0):
    """Parameters whose units clip (gradient 10x the limit) or not (1e-3x), far from the boundary,
    with a zero row (the limit is then clip_factor * eps) and units larger than a 32K chunk."""
    gen = seeded(seed)
    shapes = [(7,), (5, 9), (3, 4, 5), (0,), (1,), (2, 70000), (3000, 3), (), (6, 0)]
    params = []
    for shape in shapes:
        w = torch.randn(shape, generator=gen, dtype=torch.float64)
        if len(shape) > 1 and shape[0] > 1 and w.numel():
            w[1] = 0.0
        rows = shape[0] if len(shape) > 1 else 1
        unit_scale = torch.where(torch.rand(rows, generator=gen) < 0.5, 10.0, 1e-3).double()
        g = torch.randn(shape, generator=gen, dtype=torch.float64)
        if w.numel():
            # the gradient of each unit scaled relative to its limit clip_factor * max(||w||, eps)
            limit = (unitwise_norm(w).clamp(min=1e-3) * 0.01).reshape(-1)
            g_norm = unitwise_norm(g).reshape(-1)
            factor = (unit_scale * limit / g_norm).reshape((rows,) + (1,) * (len(shape) - 1) if len(shape) > 1 else ())
            g = g * factor
        p = torch.nn.Parameter(w.to(dtype))
        p.grad = g.to(dtype)
        params.append(p)
    return params


def assert_close_to(actual, expected_f64, dtype):
    tol = max(2 * ULP[dtype], 1e-5)
    torch.testing.assert_close(actual.double(), expected_f64.to(dtype).double(), rtol=tol, atol=1e-30)


# --- AGC ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_agc_clipper_non_contiguous_and_mixed_dtypes(backend):
    params = agc_case(torch.float32, seed=7)[:3]
    params[1].grad = params[1].grad.t().contiguous().t()  # same values, column-major
    params.append(torch.nn.Parameter(torch.randn(4, 6, dtype=torch.float64)))
    params[-1].grad = torch.randn(4, 6, dtype=torch.float64)
    originals = [p.grad.clone() for p in params]
    expected = reference_agc(params, 0.05, 1e-2)
    total = fusedclip.AGC(clip_factor=0.05, eps=1e-2, backend=backend)(params)
    assert total.dtype == torch.float64
    assert float(total) == pytest.approx(oracle_norm(originals, 2.0), rel=1e-6)
    for p, e in zip(params, expected):
        assert_close_to(p.grad, e, p.grad.dtype)
    assert params[1].grad.stride() == (1, 5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_agc_exclude_by_tensor_and_by_name(backend):
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    model(torch.randn(5, 8, generator=seeded(8))).pow(2).sum().mul(100).backward()
    head = model[2].weight
    for exclude, call_with in (([head], model.parameters), (["2.weight"], model.named_parameters)):
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        params = list(model.parameters())
        expected = reference_agc(params, 0.01, 1e-3)
        total = fusedclip.AGC(exclude=exclude, backend=backend)(call_with())
        assert float(total) == pytest.approx(oracle_norm(list(grads.values()), 2.0), rel=1e-6)
        assert torch.equal(head.grad, grads["2.weight"])  # excluded: untouched
        for (name, p), e in zip(model.named_parameters(), expected):
            if name != "2.weight":
                assert_close_to(p.grad, e, torch.float32)
        for name, p in model.named_parameters():  # restore for the next case
            p.grad = grads[name]


def test_agc_nan_unit_becomes_nan_others_clip():
    params = agc_case(torch.float32, seed=9)[1:3]
    params[0].grad[2, 3] = float("nan")
    expected = reference_agc(params, 0.01, 1e-3)
    total = fusedclip.AGC()(params)
    assert total.isnan()
    assert params[0].grad[2].isnan().all() and not params[0].grad[[0, 1, 3, 4]].isnan().any()
    assert_close_to(params[0].grad[[0, 1, 3, 4]], expected[0][[0, 1, 3, 4]], torch.float32)
    assert_close_to(params[1].grad, expected[1], torch.float32)


def test_agc_as_timm_dispatch_calls_it():
    params = agc_case(torch.float32, seed=10)[:3]
    expected = reference_agc(params, 0.02, 1e-3)
    fusedclip.AGC(clip_factor=0.02)(iter(params))
    for p, e in zip(params, expected):
        assert_close_to(p.grad, e, torch.float32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_agc_refuses_before_writing(backend):
    params = agc_case(torch.float32, seed=11)[:3]
    bad = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))
    bad.grad = torch.randn(3, dtype=torch.complex64)
    originals = [p.grad.clone() for p in params]
    with pytest.raises(TypeError, match="complex"):
        fusedclip.AGC(backend=backend)(params + [bad])
    with pytest.raises(TypeError, match=r"parameters\[3\]"):
        fusedclip.AGC(backend=backend)(params + ["not a tensor"])
    assert_bitwise_equal([p.grad for p in params], originals)
    for kwargs in ({"clip_factor": -0.1}, {"clip_factor": float("nan")}, {"eps": -1.0}):
        with pytest.raises(ValueError):
            fusedclip.AGC(**kwargs)
    with pytest.raises(TypeError, match="exclude"):
        fusedclip.AGC(exclude=[3])


def shared_grad_case(case: str, dtype, seed=12):
    """Parameters whose gradients share memory, and the tensor that holds all of it.

    Every unit clips on its first occurrence (gradients about 100x their limit). "twice": the
    same gradient for two parameters, the second's limit half the first's in some rows (they clip
    again) and twice it in the others (they do not). The views: the second parameter's limits
    are small enough that its units clip after the first's have.
    """
    gen = seeded(seed)
    if case in ("twice", "twice_contiguous"):
        g = rand_tensor((6, 5), dtype, gen, 10.0)
        g = g.t() if case == "twice" else g.t().contiguous()
        w1 = rand_tensor(g.shape, dtype, gen)
        row_scale = torch.tensor([0.5, 2.0, 0.5, 2.0, 0.5], dtype=torch.float64).reshape(-1, 1)
        w2 = (w1.double() * row_scale).to(dtype)
        return [(g, w1), (g, w2)], g
    base = rand_tensor((4, 10), dtype, gen, 10.0)
    view = {"transpose": base.t(), "transpose_first": base.t(), "strided": base[:, ::2],
            "rows": base[1:]}[case]
    w_base = rand_tensor(base.shape, dtype, gen)
    w_view = rand_tensor(view.shape, dtype, gen, 0.01)
    pairs = [(base, w_base), (view, w_view)]
    return (pairs[::-1] if case == "transpose_first" else pairs), base


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", ["twice", "transpose", "transpose_first", "strided", "twice_contiguous", "rows"])
def test_agc_shared_grads_clip_in_list_order(case, dtype):
    """Each occurrence of shared memory is clipped in list order, as the per-tensor loop of
    backend "torch" does: a later occurrence sees the earlier clips."""
    results = {}
    for backend in ("cpu", "torch"):
        pairs, storage = shared_grad_case(case, dtype)
        original = storage.clone()
        params = []
        for g, w in pairs:
            p = torch.nn.Parameter(w)
            p.grad = g
            params.append(p)
        total = fusedclip.AGC(clip_factor=0.1, backend=backend)(params)
        assert not torch.equal(storage, original)
        results[backend] = (total, storage)
    (cpu_total, cpu_grads), (torch_total, torch_grads) = results["cpu"], results["torch"]
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(cpu_grads, torch_grads, rtol=rtol, atol=0)
    torch.testing.assert_close(cpu_total, torch_total, rtol=rtol, atol=0)


needs_grad_dtype = pytest.mark.skipif(not hasattr(torch.Tensor, "grad_dtype"),
                                      reason="a gradient of another dtype needs Tensor.grad_dtype")


def params_with_grad_dtypes(dtype_pairs, seed):
    """agc_case's parameters and gradients (units 10x or 1e-3x their limit) rounded to the given
    (parameter dtype, gradient dtype) pairs; torch allows them to differ once grad_dtype is None."""
    params = []
    for source, (param_dtype, grad_dtype) in zip(agc_case(torch.float64, seed), dtype_pairs):
        p = torch.nn.Parameter(source.detach().to(param_dtype))
        p.grad_dtype = None
        p.grad = source.grad.to(grad_dtype)
        params.append(p)
    return params


MIXED_DTYPE_PAIRS = [(torch.float32, torch.float32), (torch.float64, torch.float32), (torch.float32, torch.bfloat16),
                     (torch.bfloat16, torch.float64), (torch.float16, torch.float32), (torch.float64, torch.float16),
                     (torch.float32, torch.float64)]


@needs_grad_dtype
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_agc_parameter_and_gradient_dtypes_may_differ(backend):
    """Each tensor is read in its own dtype (the kernel's rule): both backends clip as timm's loop
    does, the float64 parameter of a float32 gradient included."""
    params = params_with_grad_dtypes(MIXED_DTYPE_PAIRS, seed=13)
    originals = [p.grad.clone() for p in params]
    expected = reference_agc(params, 0.01, 1e-3)
    total = fusedclip.AGC(backend=backend)(params)
    assert float(total) == pytest.approx(oracle_norm(originals, 2.0), rel=1e-5)
    for p, o, e in zip(params, originals, expected):
        assert p.grad.dtype == o.dtype
        assert_close_to(p.grad, e, p.grad.dtype)


@needs_grad_dtype
@pytest.mark.parametrize("bad_dtype", [torch.int32, torch.complex64])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_agc_refused_parameter_leaves_every_gradient_alone(backend, bad_dtype):
    """A parameter the kernels cannot read, after pairs of differing dtypes, is refused by index
    and dtype before any gradient is written."""
    params = params_with_grad_dtypes(MIXED_DTYPE_PAIRS[:3], seed=14)
    bad = torch.zeros(4, dtype=bad_dtype)
    bad.grad_dtype = None
    bad.grad = torch.randn(4, generator=seeded(15))
    grads = [p.grad for p in params] + [bad.grad]
    originals = clone_all(grads)
    with pytest.raises(TypeError, match=rf"parameter 3 has dtype {bad_dtype}"):
        fusedclip.AGC(backend=backend)(params + [bad])
    assert_bitwise_equal(grads, originals)


def test_agc_no_grads():
    p = torch.nn.Parameter(torch.randn(3))
    assert float(fusedclip.AGC()([p])) == 0.0


# --- AutoClip -----------------------------------------------------------------------------------


class ReferenceAutoClip:
    """Seetharaman et al.'s loop, with a bounded history and non-finite norms skipped."""

    def __init__(self, percentile, history_size):
        self.percentile, self.history_size, self.history = percentile, history_size, []

    def __call__(self, grads):
        norm = float(torch.cat([g.double().flatten() for g in grads]).norm())
        if not math.isfinite(norm):
            return norm, [g.clone() for g in grads]
        self.history = (self.history + [norm])[-self.history_size:]
        threshold = float(np.percentile(self.history, self.percentile))
        coef = min(threshold / (norm + 1e-6), 1.0)
        return norm, [(g.double() * coef).to(g.dtype) if coef < 1 else g.clone() for g in grads]


def step_grads(step: int, dtype=torch.float32):
    """A step's gradients: random scale, a spike at step 9, nan at 5 and inf at 12."""
    gen = seeded(100 + step)
    scale = float(torch.empty(()).uniform_(0.5, 2.0, generator=gen)) * (50.0 if step == 9 else 1.0)
    grads = make_grads([(40,), (6, 7), (0,), (300,)], dtype, seed=200 + step, scale=scale)
    if step == 5:
        grads[1][2, 2] = float("nan")
    if step == 12:
        grads[3][7] = float("inf")
    return grads


@pytest.mark.parametrize("percentile", [10.0, 50.0, 100.0])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_autoclip_against_reference(backend, percentile):
    clipper = fusedclip.AutoClip(percentile=percentile, history_size=6, backend=backend)
    reference = ReferenceAutoClip(percentile, 6)
    for step in range(16):
        grads = step_grads(step)
        want_norm, want_grads = reference(grads)
        total = clipper(params_with(grads))
        if math.isfinite(want_norm):
            assert float(total) == pytest.approx(want_norm, rel=1e-6)
            for g, w in zip(grads, want_grads):
                torch.testing.assert_close(g, w, rtol=2e-6, atol=1e-30)
            assert float(clipper.threshold) == pytest.approx(
                float(np.percentile(reference.history, percentile)), rel=1e-6)
        else:
            assert not math.isfinite(float(total))
            assert_bitwise_equal(grads, want_grads, any_nan=True)  # nothing written
    filled = clipper.history[~clipper.history.isnan()]
    assert sorted(filled.tolist()) == pytest.approx(sorted(reference.history), rel=1e-6)


def test_autoclip_bad_arguments():
    for kwargs in ({"percentile": -1}, {"percentile": 101}, {"percentile": float("nan")},
                   {"history_size": 0}, {"history_size": 2.5}, {"norm_type": float("nan")}):
        with pytest.raises(ValueError):
            fusedclip.AutoClip(**kwargs)


# --- ZClip --------------------------------------------------------------------------------------


class ReferenceZClip:
    """bluorion-com/ZClip's z-score mode (adaptive scaling) in float64, with non-finite norms
    skipped and the coefficient limit / (N + 1e-6) applied when N > limit."""

    def __init__(self, alpha, z_thresh, max_grad_norm, eps, warmup_steps, clip_factor, skip_update_on_spike):
        self.alpha, self.z_thresh, self.max_grad_norm = alpha, z_thresh, max_grad_norm
        self.eps, self.warmup_steps, self.clip_factor = eps, warmup_steps, clip_factor
        self.skip = skip_update_on_spike
        self.buffer, self.mean, self.var = [], None, None

    def __call__(self, grads):
        norm = float(torch.cat([g.double().flatten() for g in grads]).norm())
        if not math.isfinite(norm):
            return norm, [g.clone() for g in grads]
        spike = False
        clip_value = norm
        if self.mean is None:
            self.buffer.append(norm)
            if len(self.buffer) == self.warmup_steps:
                self.mean = sum(self.buffer) / len(self.buffer)
                self.var = sum((x - self.mean) ** 2 for x in self.buffer) / len(self.buffer)
                warm_now = False
            limit = norm if self.max_grad_norm is None else min(norm, self.max_grad_norm)
        else:
            std = self.var ** 0.5
            z = (norm - self.mean) / (std + self.eps)
            if z > self.z_thresh:
                spike = True
                clip_value = (self.mean + self.z_thresh * std / (z / self.z_thresh)) * self.clip_factor
            limit = clip_value if self.max_grad_norm is None else min(clip_value, self.max_grad_norm)
            if not (spike and self.skip):
                self.mean = self.alpha * self.mean + (1 - self.alpha) * clip_value
                self.var = self.alpha * self.var + (1 - self.alpha) * (clip_value - self.mean) ** 2
        coef = limit / (norm + 1e-6) if norm > limit else 1.0
        return norm, [(g.double() * coef).to(g.dtype) if coef < 1 else g.clone() for g in grads]


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"max_grad_norm": 2.0}, {"skip_update_on_spike": True, "clip_factor": 0.8, "z_thresh": 1.5}],
    ids=["defaults", "max_grad_norm", "skip-on-spike"],
)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_zclip_against_reference(backend, kwargs):
    settings = dict(alpha=0.97, z_thresh=2.5, max_grad_norm=None, eps=1e-6, warmup_steps=4,
                    clip_factor=1.0, skip_update_on_spike=False)
    settings.update(kwargs)
    clipper = fusedclip.ZClip(**settings, backend=backend)
    reference = ReferenceZClip(**settings)
    clipped_spike = False
    for step in range(16):
        grads = step_grads(step)
        originals = clone_all(grads)
        want_norm, want_grads = reference(grads)
        total = clipper(params_with(grads))
        if math.isfinite(want_norm):
            assert float(total) == pytest.approx(want_norm, rel=1e-6)
            for g, w in zip(grads, want_grads):
                torch.testing.assert_close(g, w, rtol=2e-6, atol=1e-30)
        else:
            assert_bitwise_equal(grads, originals, any_nan=True)  # nothing written
        if reference.mean is not None:
            assert float(clipper.mean) == pytest.approx(reference.mean, rel=1e-6)
            assert float(clipper.var) == pytest.approx(reference.var, rel=1e-5)
        if step == 9:
            clipped_spike = oracle_norm(grads, 2.0) < 0.5 * want_norm
    assert clipped_spike, "the spike at step 9 was not clipped"


def test_zclip_bad_arguments():
    for kwargs in ({"alpha": 1.0}, {"alpha": -0.1}, {"z_thresh": 0.0}, {"z_thresh": -1.0},
                   {"warmup_steps": 0}, {"max_grad_norm": -1.0}, {"eps": float("nan")},
                   {"clip_factor": -1.0}):
        with pytest.raises(ValueError):
            fusedclip.ZClip(**kwargs)


@pytest.mark.parametrize("clipper_type", ["zclip", "autoclip", "per_tensor", "agc"])
def test_refused_call_leaves_grads_and_state_alone(clipper_type):
    clipper = {"zclip": lambda: fusedclip.ZClip(warmup_steps=2), "autoclip": fusedclip.AutoClip,
               "per_tensor": lambda: fusedclip.PerTensorClip(0.1), "agc": fusedclip.AGC}[clipper_type]()
    for step in range(3):
        clipper(params_with(step_grads(step)))
    state = {k: v.clone() for k, v in vars(clipper).items() if isinstance(v, torch.Tensor)}
    grads = step_grads(3)
    params = params_with(grads)
    sparse = torch.nn.Parameter(torch.zeros(4))
    sparse.grad = torch.zeros(4).to_sparse()
    originals = clone_all(grads)
    with pytest.raises(TypeError):
        clipper(params + [sparse])
    assert_bitwise_equal(grads, originals)
    for k, v in vars(clipper).items():
        if isinstance(v, torch.Tensor):
            assert_bitwise_equal([v], [state[k]], any_nan=True)


# --- per-tensor clip ------------------------------------------------------------------------------


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, 3.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_per_tensor_clip_against_reference(backend, dtype, norm_type):
    grads = make_grads([(40,), (6, 7), (0,), (300,), (70001,), (3,)], dtype, seed=12)
    grads[5].mul_(1e-3)  # below max_norm: not written
    originals = clone_all(grads)
    max_norm = 1.5
    total = fusedclip.PerTensorClip(max_norm, norm_type, backend=backend)(params_with(grads))
    assert float(total) == pytest.approx(oracle_norm(originals, norm_type), rel=1e-5)
    for g, o in zip(grads, originals):
        norm = oracle_norm([o], norm_type)
        coef = min(max_norm / (norm + 1e-6), 1.0)
        if coef == 1.0:
            assert_bitwise_equal([g], [o])
        else:
            torch.testing.assert_close(g.double(), (o.double() * coef).to(dtype).double(),
                                       rtol=max(2 * ULP[dtype], 1e-5), atol=0)
            assert oracle_norm([g], norm_type) == pytest.approx(max_norm, rel=max(4 * ULP[dtype], 1e-5))


def test_per_tensor_clip_bad_arguments():
    for max_norm in (-1.0, float("nan")):
        with pytest.raises(ValueError):
            fusedclip.PerTensorClip(max_norm)
    with pytest.raises(ValueError):
        fusedclip.PerTensorClip(1.0, norm_type=float("nan"))


# --- no host read on the per-step path ----------------------------------------------------------


def test_clippers_never_read_a_tensor_on_the_host(monkeypatch):
    """The per-step path of every clipper and of the monitor never turns a tensor into a Python
    value (which on a GPU is a sync): every such conversion raises during the calls."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    clippers = [fusedclip.AGC(exclude=[model[2].weight]), fusedclip.AutoClip(), fusedclip.ZClip(warmup_steps=2),
                fusedclip.PerTensorClip(0.1)]
    monitor = fusedclip.GradientMonitor(model, warmup_steps=2)

    def refuse(*args, **kwargs):
        raise AssertionError("a tensor was read on the host")

    for step in range(4):
        model.zero_grad()
        model(torch.randn(5, 8, generator=seeded(step))).pow(2).sum().backward()
        with monkeypatch.context() as m:
            for method in ("__bool__", "item", "tolist", "__float__", "__int__"):
                m.setattr(torch.Tensor, method, refuse)
            # As on a GPU: whether an overflowed norm is taken again is read on the host only for
            # CPU norms, where it is free (numerics.rescale_decided_on_host).
            m.setattr(fusedclip.reference, "rescale_decided_on_host", lambda total, norm_type: False)
            # And which tensors a CPU kernel wrote (fusedclip.operators.call): all it may write.
            m.setattr(fusedclip.operators, "DECIDE_WRITES_ON_HOST", False)
            for clipper in clippers:
                clipper(model.parameters())
            monitor.clip_grad_norm_(1.0)
            monitor.observe()
    assert monitor.step == 8


@pytest.mark.cuda
def test_clippers_and_monitor_on_cuda_match_cpu_without_sync():
    """On a GPU (the pure-PyTorch backend until fused kernels land): the same results as on the
    CPU, and no host-device sync on the per-step path."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    cpu_model, cuda_model = model, copy.deepcopy(model).cuda()
    x = torch.randn(5, 8, generator=seeded(1))

    def make():
        return ([fusedclip.AGC(exclude=["2.weight"]), fusedclip.AutoClip(), fusedclip.ZClip(warmup_steps=2),
                 fusedclip.PerTensorClip(0.1)])

    runs = {}
    for device, m in (("cpu", cpu_model), ("cuda", cuda_model)):
        clippers, monitor, totals = make(), fusedclip.GradientMonitor(m, warmup_steps=2), []
        for step in range(4):
            m.zero_grad()
            m(x.to(device)).pow(2).sum().mul(10 * (step + 1)).backward()
            if device == "cuda":
                torch.cuda.set_sync_debug_mode("error")
            try:
                for clipper in clippers:
                    args = m.named_parameters() if isinstance(clipper, fusedclip.AGC) else m.parameters()
                    totals.append(clipper(args))
                totals.append(monitor.clip_grad_norm_(1.0))
            finally:
                torch.cuda.set_sync_debug_mode("default")
        runs[device] = ([t.cpu() for t in totals], [p.grad.cpu() for p in m.parameters()])
    for a, b in zip(runs["cpu"][0], runs["cuda"][0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    for a, b in zip(runs["cpu"][1], runs["cuda"][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
