"""torch.compile(fullgraph=True) traces fusedclip's clipping (the C++ and Triton operators through
their fake kernels, backend "torch" as plain torch code) and gives eager's results. Compiling is
slow on a small CPU machine: few tests."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import fusedclip
from helpers import assert_bitwise_equal, clone_all, cpu, make_grads, params_with

# torch.compile itself uses deprecated torch.jit helpers
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_clip_grad_norm_compiles_fullgraph(backend):
    """Each backend's operators trace as graph nodes (their fake kernels), without a host read
    (fullgraph), and give eager's bits: clip_grad_norm_ and clip_grads_with_norm_."""
    if backend.name == "torch":
        pytest.skip("backend 'torch' is traced into the graph as torch code, not called as an operator: "
                    "inductor's reductions need not be eager's bits (test_backend_torch_compiles_fullgraph)")

    def clip(params, max_norm, norm_type):
        return fusedclip.clip_grad_norm_(params, max_norm, norm_type, backend=backend.name)

    grads = backend.on(make_grads([(64, 3), (0,), (1000,), (7,)],
                                  [torch.float32, torch.float32, torch.bfloat16, torch.float32], seed=60))
    eager_params, compiled_params = params_with(clone_all(grads)), params_with(clone_all(grads))
    compiled = torch.compile(clip, fullgraph=True)
    # clips, does not, then other norm types: max_norm and norm_type change between calls, which
    # makes them symbolic floats in the recompiled graph
    for max_norm, norm_type in ((0.5, 2.0), (1e6, 2.0), (0.3, 1.0), (0.2, 3.0), (0.1, "inf")):
        expected = clip(eager_params, max_norm, norm_type)
        total = compiled(compiled_params, max_norm, norm_type)
        assert total.dtype == expected.dtype and torch.equal(total, expected)
        assert_bitwise_equal(cpu(p.grad for p in compiled_params), cpu(p.grad for p in eager_params))
    scale = torch.compile(lambda ps, n: fusedclip.clip_grads_with_norm_(ps, 0.1, n, backend=backend.name),
                          fullgraph=True)
    scale(compiled_params, backend.tensor(7.0))
    fusedclip.clip_grads_with_norm_(eager_params, 0.1, backend.tensor(7.0), backend=backend.name)
    assert_bitwise_equal(cpu(p.grad for p in compiled_params), cpu(p.grad for p in eager_params))


@pytest.mark.skipif(
    not hasattr(torch._dynamo.config, "trace_autograd_ops"),
    reason="dynamo cannot trace .backward() in this torch",
)
def test_training_step_compiles_fullgraph():
    """forward, backward, clip, optimizer step (plain SGD: torch.optim's step itself breaks the
    graph on purpose); backward needs dynamo's trace_autograd_ops."""
    torch.manual_seed(61)
    eager = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    compiled_model = copy.deepcopy(eager)
    x = torch.randn(5, 8)

    def step(model, x):
        loss = model(x).square().sum()
        loss.backward()
        total = fusedclip.clip_grad_norm_(model.parameters(), 0.5)
        with torch.no_grad():
            for p in model.parameters():
                p.sub_(0.1 * p.grad)
        return loss.detach(), total

    with torch._dynamo.config.patch(trace_autograd_ops=True):
        compiled = torch.compile(step, fullgraph=True)
        for _ in range(2):
            for model in (eager, compiled_model):
                for p in model.parameters():
                    p.grad = None
            loss, total = step(eager, x)
            c_loss, c_total = compiled(compiled_model, x)
            assert float(total) > 0.5  # the step clipped
            torch.testing.assert_close(c_loss, loss, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(c_total, total, rtol=1e-5, atol=0)
            for p, q in zip(compiled_model.parameters(), eager.parameters()):
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def _counting_backend():
    """A torch.compile backend that counts compiles (graphs) and runs them as traced."""
    compiles = []

    def backend(gm, example_inputs):
        compiles.append(gm)
        return gm.forward

    return backend, compiles


@pytest.mark.parametrize("api", ["fusedclip", "torch"])
def test_max_norm_schedule_compiles_at_most_twice(api):
    """A float max_norm that changes every call (a schedule): as torch, one compile with the
    first value, one with max_norm symbolic, then no more, and eager's results."""
    clip_fn = fusedclip.clip_grad_norm_ if api == "fusedclip" else torch.nn.utils.clip_grad_norm_

    def clip(params, max_norm):
        return clip_fn(params, max_norm)

    grads = make_grads([(64, 3), (1000,), (7,)], [torch.float32, torch.bfloat16, torch.float32], seed=62)
    eager_params, compiled_params = params_with(clone_all(grads)), params_with(clone_all(grads))
    backend, compiles = _counting_backend()
    compiled = torch.compile(clip, backend=backend, fullgraph=True)
    for step in range(12):
        max_norm = 2.0 * 0.8**step  # clips from the start, more each step
        expected = clip(eager_params, max_norm)
        total = compiled(compiled_params, max_norm)
        assert torch.equal(total, expected)
        assert_bitwise_equal([p.grad for p in compiled_params], [p.grad for p in eager_params])
    assert len(compiles) <= 2, len(compiles)


@pytest.mark.parametrize("api", ["fusedclip", "torch"])
def test_tensor_max_norm_compiles_once(api):
    """A tensor max_norm is traced (no host read of it, no guard on its value): one compile for
    every value, the results of eager."""
    clip_fn = fusedclip.clip_grad_norm_ if api == "fusedclip" else torch.nn.utils.clip_grad_norm_

    def clip(params, max_norm):
        return clip_fn(params, max_norm)

    grads = make_grads([(33, 5), (100,)], torch.float32, seed=63)
    eager_params, compiled_params = params_with(clone_all(grads)), params_with(clone_all(grads))
    backend, compiles = _counting_backend()
    compiled = torch.compile(clip, backend=backend, fullgraph=True)
    for step in range(5):
        max_norm = torch.tensor(3.0 * 0.7**step)
        expected = clip(eager_params, max_norm)
        total = compiled(compiled_params, max_norm)
        assert torch.equal(total, expected)
        assert_bitwise_equal([p.grad for p in compiled_params], [p.grad for p in eager_params])
    assert len(compiles) == 1, len(compiles)


def test_compiled_negative_tensor_max_norm_raises_before_any_write():
    """The check of a tensor max_norm is traced (on the device), ahead of the scale."""
    grads = make_grads([(20, 3), (9,)], torch.float32, seed=64)
    params = params_with(clone_all(grads))
    compiled = torch.compile(lambda ps, m: fusedclip.clip_grad_norm_(ps, m), fullgraph=True)
    compiled(params_with(clone_all(grads)), torch.tensor(0.5))
    for bad in (-1.0, math.nan):
        with pytest.raises(RuntimeError, match="max_norm must be a non-negative number"):
            compiled(params, torch.tensor(bad))
        assert_bitwise_equal([p.grad for p in params], grads)


def _view_grads(flat_size: int = 24 + 9 + 5):
    """Grads that are views: slices of one flat buffer, as DDP's gradient_as_bucket_view and
    flat-buffer trainers make them, and a transposed view."""
    generator = torch.Generator().manual_seed(67)
    flat = torch.randn(flat_size, generator=generator) * 3
    return [flat[:24].view(6, 4), flat[24:33], flat[33:], (torch.randn(4, 6, generator=generator) * 3).t()]


def _params_with_view_grads():
    params = []
    for g in _view_grads():
        p = torch.nn.Parameter(torch.zeros(g.shape))
        p.grad = g
        params.append(p)
    return params


@pytest.mark.parametrize("api", ["clip_grad_norm_", "clip_grads_with_norm_", "clip_grad_value_"])
def test_view_grads_compile_fullgraph(api):
    """Dynamo cannot read the strides of a view read from .grad; the compiled call leaves a view's
    check to the operators and gives eager's bits, views' strides kept."""
    calls = {
        "clip_grad_norm_": lambda ps: fusedclip.clip_grad_norm_(ps, 0.5),
        "clip_grads_with_norm_": lambda ps: fusedclip.clip_grads_with_norm_(ps, 0.5, torch.tensor(9.0)),
        "clip_grad_value_": lambda ps: fusedclip.clip_grad_value_(ps, 1.0),
    }
    eager, traced = _params_with_view_grads(), _params_with_view_grads()
    expected = calls[api](eager)
    result = torch.compile(calls[api], fullgraph=True)(traced)
    if expected is not None:
        assert torch.equal(result, expected)
    assert_bitwise_equal([p.grad for p in traced], [p.grad for p in eager])
    assert [p.grad.stride() for p in traced] == [g.stride() for g in _view_grads()]
    assert not torch.equal(traced[0].grad, _view_grads()[0])  # it clipped


def test_compiled_clip_of_an_expanded_grad_raises_before_any_write():
    """An expanded grad (a view with a zero stride) is refused at run time (by inductor's
    functionalized write-back, or by the operator), before any grad is written."""
    params = params_with([torch.randn(5) * 3, torch.randn(4)])
    params[1].grad = torch.randn(1).mul(3).expand(4)
    before = [p.grad.clone() for p in params]
    compiled = torch.compile(lambda ps: fusedclip.clip_grad_norm_(ps, 0.5), fullgraph=True)
    with pytest.raises(RuntimeError, match="overlapping memory|single memory location"):
        compiled(params)
    assert_bitwise_equal([p.grad for p in params], before)


def test_clip_value_schedule_compiles_at_most_twice():
    """clip_grad_value_ with a clip_value that changes every call compiles as torch's does."""
    grads = make_grads([(64, 3), (100,)], torch.float32, seed=65, scale=3.0)
    backend, compiles = _counting_backend()
    compiled = torch.compile(lambda ps, v: fusedclip.clip_grad_value_(ps, v), backend=backend, fullgraph=True)
    for step in range(12):
        value = 2.0 * 0.8**step
        eager, traced = params_with(clone_all(grads)), params_with(clone_all(grads))
        fusedclip.clip_grad_value_(eager, value)
        compiled(traced, value)
        assert_bitwise_equal([p.grad for p in traced], [p.grad for p in eager])
    assert len(compiles) <= 2, len(compiles)


def test_tensor_clip_value_compiles_fullgraph():
    """A 0-d tensor clip_value (read as torch reads it, float()) traces without a guard on its
    value, as torch's clip_grad_value_ does; a negative or nan one is refused before any write."""
    grads = make_grads([(20, 3), (9,)], torch.float32, seed=68, scale=3.0)
    compiled = torch.compile(lambda ps, v: fusedclip.clip_grad_value_(ps, v), fullgraph=True)
    for value in (1.5, 0.25):
        eager, traced = params_with(clone_all(grads)), params_with(clone_all(grads))
        fusedclip.clip_grad_value_(eager, torch.tensor(value))
        compiled(traced, torch.tensor(value))
        assert_bitwise_equal([p.grad for p in traced], [p.grad for p in eager])
    params = params_with(clone_all(grads))
    for bad in (-1.0, math.nan):
        with pytest.raises(RuntimeError, match="clip_value must be a non-negative number"):
            compiled(params, torch.tensor(bad))
        assert_bitwise_equal([p.grad for p in params], grads)


def test_backend_torch_compiles_fullgraph():
    """Backend "torch" (what CUDA tensors without kernels run) traces without a host read."""
    grads = make_grads([(33, 5), (100,)], torch.float32, seed=66, scale=3.0)
    eager, traced = params_with(clone_all(grads)), params_with(clone_all(grads))
    compiled = torch.compile(lambda ps, m: fusedclip.clip_grad_norm_(ps, m, backend="torch"), fullgraph=True)
    for max_norm in (0.5, 1e6):
        expected = fusedclip.clip_grad_norm_(eager, max_norm, backend="torch")
        assert torch.equal(compiled(traced, max_norm), expected)
        assert_bitwise_equal([p.grad for p in traced], [p.grad for p in eager])
    scale = torch.compile(lambda ps, n: fusedclip.clip_grads_with_norm_(ps, 0.1, n, backend="torch"),
                          fullgraph=True)
    scale(traced, torch.tensor(7.0))
    fusedclip.clip_grads_with_norm_(eager, 0.1, torch.tensor(7.0), backend="torch")
    assert_bitwise_equal([p.grad for p in traced], [p.grad for p in eager])


@pytest.mark.cuda
def test_schedules_compile_with_inductor_on_cuda_without_a_host_sync():
    """On CUDA tensors, under Inductor (auto's backend): a float max_norm schedule compiles at
    most twice, a tensor max_norm once; both give eager's bits, and once compiled a call with a
    tensor max_norm reads nothing back to the host."""
    from torch._dynamo.testing import CompileCounterWithBackend

    grads = [g.cuda() for g in make_grads([(64, 3), (1000,), (7,)], [torch.float32, torch.bfloat16, torch.float32],
                                          seed=67)]
    for max_norms, most in (([2.0 * 0.8**step for step in range(8)], 2),
                            ([torch.tensor(3.0 * 0.7**step, device="cuda") for step in range(5)], 1)):
        torch._dynamo.reset()
        counter = CompileCounterWithBackend("inductor")
        compiled = torch.compile(lambda ps, m: fusedclip.clip_grad_norm_(ps, m), backend=counter, fullgraph=True)
        eager_params, compiled_params = params_with(clone_all(grads)), params_with(clone_all(grads))
        for i, max_norm in enumerate(max_norms):
            expected = fusedclip.clip_grad_norm_(eager_params, max_norm)
            if i >= 2 and isinstance(max_norm, torch.Tensor):
                previous = torch.cuda.get_sync_debug_mode()
                torch.cuda.set_sync_debug_mode("error")
                try:
                    total = compiled(compiled_params, max_norm)
                finally:
                    torch.cuda.set_sync_debug_mode(previous)
            else:
                total = compiled(compiled_params, max_norm)
            assert torch.equal(total, expected), i
            assert_bitwise_equal(cpu(p.grad for p in compiled_params), cpu(p.grad for p in eager_params))
        assert counter.frame_count <= most, counter.frame_count


def test_auto_on_cuda_resolves_under_fullgraph(monkeypatch):
    """Resolving "auto" for a CUDA device asks _C_cuda whether its kernels run on the GPU: that C
    call must not break a fullgraph trace (it broke every torch.compile of backend "auto" on CUDA
    tensors). Here _C_cuda's answer comes from a C builtin that dynamo cannot trace (os.isatty)."""
    import os
    import types

    from fusedclip import _backends

    monkeypatch.setattr(_backends, "_C_CUDA", types.SimpleNamespace(kernels_run_on=os.isatty))
    monkeypatch.setattr(_backends, "_KERNELS_RUN_ON", {})
    compiled = torch.compile(lambda x: x + 1 if _backends._cuda_kernels_run_on(0) else x - 1, fullgraph=True)
    expected = torch.ones(2) + (1 if os.isatty(0) else -1)
    assert torch.equal(compiled(torch.ones(2)), expected)
