"""ClipOptimizer against clip_grad_norm_ followed by step(), over several steps: torch's fused
Adam, AdamW and SGD (the clip folded into their kernels) and an unfused optimizer (the scale
pass); non-finite norms, a GradScaler, and what the wrapped optimizer owns. A skipped step
against skipping by hand, for every optimizer of torch.optim, fused and not, first step or
later (the state a skipped fused step made is removed), and where fold puts the coefficient."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

import fusedclip
from helpers import clone_all, make_grads, params_with

SHAPES = [(33,), (4, 257), (1,), (20001,), (0,), (5, 6, 7)]

OPTIMIZERS = {
    "adamw-fused": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True),
    "adam-fused": lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True),
    "sgd-momentum-fused": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, fused=True),
    "adamw-foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=True),
    "sgd-plain": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, foreach=False),
}


def _params(seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(dtype)) for s in SHAPES]


def _set_grads(params, seed, bad=None):
    for p, g in zip(params, make_grads(SHAPES, params[0].dtype, seed=seed, scale=2.0)):
        p.grad = g
    if bad is not None:
        params[3].grad[777] = bad


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("norm_type", [2.0, math.inf])
@pytest.mark.parametrize("fold", [True, False], ids=["fold", "scale-pass"])
def test_matches_clip_then_step(name, norm_type, fold):
    if not fold and not name.endswith("fused"):
        pytest.skip("fold=False differs from the default for fused optimizers only")
    ref_params, params = _params(), _params()
    ref_opt = OPTIMIZERS[name](ref_params)
    opt = fusedclip.ClipOptimizer(OPTIMIZERS[name](params), max_norm=1.5, norm_type=norm_type, fold=fold)
    assert opt.fused == name.endswith("fused")
    for step in range(6):
        _set_grads(ref_params, seed=step)
        _set_grads(params, seed=step)
        if step == 3:  # a step that does not clip
            for ps in (ref_params, params):
                for p in ps:
                    p.grad.mul_(1e-4)
        # torch's inf norm refuses the empty tensor, which holds nothing to clip.
        non_empty = [p for p in ref_params if p.numel()]
        ref_total = torch.nn.utils.clip_grad_norm_(non_empty, 1.5, norm_type=norm_type)
        ref_opt.step()
        total = opt.step()
        torch.testing.assert_close(total, ref_total, rtol=1e-5, atol=0)
        for p, r in zip(params, ref_params):
            # g / (1 / c) in the kernel against torch's g * c: rounding apart.
            torch.testing.assert_close(p.grad, r.grad, rtol=1e-6, atol=1e-12)
            torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6)
    for p, r in zip(params, ref_params):
        for key, value in ref_opt.state[r].items():
            torch.testing.assert_close(opt.state[p][key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,fold", [("adamw-fused", True), ("adamw-fused", False),
                                       ("sgd-momentum-fused", True), ("adamw-foreach", True)])
@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_non_finite_norm_skips_the_step(name, fold, bad):
    params = _params()
    opt = fusedclip.ClipOptimizer(OPTIMIZERS[name](params), max_norm=1.0, fold=fold)
    _set_grads(params, seed=0)
    opt.step()
    before = [p.detach().clone() for p in params]
    state_before = {i: {k: v.clone() for k, v in opt.state[p].items()} for i, p in enumerate(params)}
    _set_grads(params, seed=1, bad=bad)
    grads_before = [p.grad.clone() for p in params]
    total = opt.step()
    assert not math.isfinite(float(total))
    for i, p in enumerate(params):
        assert torch.equal(p, before[i])
        for k, v in opt.state[p].items():
            assert torch.equal(v, state_before[i][k]), (k, v, state_before[i][k])
    for p, g in zip(params, grads_before):
        assert torch.equal(p.grad.nan_to_num(), g.nan_to_num())  # not modified
    _set_grads(params, seed=2)  # the next finite step goes ahead
    opt.step()
    assert not torch.equal(params[0], before[0])


# --- a skipped step leaves everything as torch's user who skips it by hand --------------------------

SKIP_SHAPES = [(33,), (4, 257), (1,), (0,), (5, 6, 7)]
# Every optimizer of torch.optim that ClipOptimizer wraps, fused (the skip inside the kernel, through
# found_inf) and not (the step not called): None takes SKIP_SHAPES; Adafactor divides by zero on an
# empty parameter and Muon takes 2-D parameters only.
SKIP_OPTIMIZERS = {
    # fused=True (torch 2.13: SGD, Adam, AdamW, Adagrad; test_every_fused_optimizer_is_covered)
    "sgd-fused": (lambda ps: torch.optim.SGD(ps, lr=0.1, fused=True), None),
    "sgd-momentum-fused": (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, fused=True), None),
    "sgd-dampening-fused": (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, dampening=0.3, weight_decay=0.01,
                                                       fused=True), None),
    "sgd-nesterov-fused": (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.8, nesterov=True, maximize=True,
                                                      fused=True), None),
    "adam-fused": (lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True), None),
    "adam-amsgrad-fused": (lambda ps: torch.optim.Adam(ps, lr=1e-2, amsgrad=True, weight_decay=0.01, fused=True),
                           None),
    "adamw-fused": (lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True), None),
    "adagrad-fused": (lambda ps: torch.optim.Adagrad(ps, lr=0.1, lr_decay=0.01, fused=True), None),
    # not fused
    "sgd": (lambda ps: torch.optim.SGD(ps, lr=0.1, foreach=False), None),
    "sgd-momentum": (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, foreach=False), None),
    "sgd-dampening-foreach": (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, dampening=0.3, foreach=True),
                              None),
    "adam": (lambda ps: torch.optim.Adam(ps, lr=1e-2, foreach=False), None),
    "adamw-foreach": (lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=True), None),
    "adagrad": (lambda ps: torch.optim.Adagrad(ps, lr=0.1, foreach=False), None),
    "rmsprop": (lambda ps: torch.optim.RMSprop(ps, lr=1e-2, momentum=0.5), None),
    "nadam": (lambda ps: torch.optim.NAdam(ps, lr=1e-2), None),
    "radam": (lambda ps: torch.optim.RAdam(ps, lr=1e-2), None),
    "adamax": (lambda ps: torch.optim.Adamax(ps, lr=1e-2), None),
    "adadelta": (lambda ps: torch.optim.Adadelta(ps), None),
    "asgd": (lambda ps: torch.optim.ASGD(ps, lr=1e-2), None),
    "rprop": (lambda ps: torch.optim.Rprop(ps, lr=1e-2), None),
    "adafactor": (lambda ps: torch.optim.Adafactor(ps, lr=1e-2), [(33,), (4, 257), (1,), (5, 6, 7)]),
    "muon": (lambda ps: torch.optim.Muon(ps, lr=1e-2), [(4, 257), (3, 5), (1, 1)]),
}


def _fused_optimizer_classes() -> set[str]:
    """torch.optim's optimizers that take fused=True on CPU parameters."""
    names = set()
    for name in dir(torch.optim):
        cls = getattr(torch.optim, name)
        if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
            continue
        if "fused" not in inspect.signature(cls.__init__).parameters:
            continue
        try:
            cls([torch.nn.Parameter(torch.ones(2))], fused=True)
        except (RuntimeError, ValueError, TypeError):
            continue
        names.add(cls.__name__)
    return names


def test_every_fused_optimizer_is_covered():
    """The fused optimizers of the torch installed all have a case in SKIP_OPTIMIZERS."""
    covered = {type(make([torch.nn.Parameter(torch.ones(2))])).__name__
               for name, (make, _) in SKIP_OPTIMIZERS.items() if name.endswith("-fused")}
    found = _fused_optimizer_classes()
    assert {"SGD", "Adam", "AdamW", "Adagrad"} <= found
    assert found <= covered, found - covered


def _skip_params(shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).float()) for s in shapes]


def _skip_grads(params, step, bad):
    """The step's grads: drawn, 1e-4 of that on step 3 (a step that does not clip), and bad in the
    second parameter's first element when given."""
    shapes = [tuple(p.shape) for p in params]
    for p, g in zip(params, make_grads(shapes, torch.float32, seed=100 + step, scale=2.0)):
        g = g.to(p.device)
        p.grad = g * 1e-4 if step == 3 else g
    if bad is not None:
        params[1].grad.view(-1)[0] = bad


def _assert_same_state(opt, ref_opt, params, ref_params, rtol=1e-5, atol=1e-6):
    """The same parameters have state (no entry where torch has none), with the same keys, the
    same step counts and close tensors. Reads with `in` and get: indexing the state (a
    defaultdict) would make an entry."""
    for i, (p, r) in enumerate(zip(params, ref_params)):
        assert (p in opt.state) == (r in ref_opt.state), (i, dict(opt.state.get(p, {})))
        if r not in ref_opt.state:
            continue
        state, ref_state = opt.state[p], ref_opt.state[r]
        assert state.keys() == ref_state.keys(), (i, state.keys(), ref_state.keys())
        for key, expected in ref_state.items():
            actual = state[key]
            if key == "step" or not torch.is_tensor(expected) or not expected.is_floating_point():
                assert torch.equal(torch.as_tensor(actual), torch.as_tensor(expected)), (i, key, actual, expected)
            else:  # atol at the tensor's scale: RMSprop's momentum buffer cancels to near 0 in places
                scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
                torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * scale, msg=f"{i} {key}")


@pytest.mark.parametrize("name", SKIP_OPTIMIZERS)
@pytest.mark.parametrize("fold", [True, False], ids=["fold", "scale-pass"])
@pytest.mark.parametrize("bad_step", [0, 2], ids=["first-step", "later-step"])
@pytest.mark.parametrize("bad", [math.inf, math.nan], ids=["inf", "nan"])
def test_skipped_step_then_finite_steps_match_skipping_by_hand(name, fold, bad_step, bad):
    """A non-finite norm on the first step (no optimizer state yet) or a later one, then finite
    steps: parameters, gradients, optimizer state (its entries, keys and step counts) after every
    step equal those of clip_grad_norm_ + step() where the user skips the non-finite step by hand
    (never calls step). torch's fused SGD with momentum makes its momentum buffers with
    empty_like before its kernel reads found_inf, and the fused Adam, AdamW and Adagrad make
    their state (zeros, step 0) too: a skipped step must not leave either behind."""
    make, shapes = SKIP_OPTIMIZERS[name]
    if not fold and not name.endswith("-fused"):
        pytest.skip("fold=False differs from the default for fused optimizers only")
    shapes = shapes or SKIP_SHAPES
    ref_params, params = _skip_params(shapes), _skip_params(shapes)
    try:
        ref_opt = make(ref_params)
    except AttributeError:  # Muon and Adafactor are newer than the oldest torch fusedclip loads on
        pytest.skip(f"torch {torch.__version__} has no {name}")
    opt = fusedclip.ClipOptimizer(make(params), max_norm=1.5, fold=fold)
    assert opt.fused == name.endswith("-fused")
    for step in range(6):
        this_bad = bad if step == bad_step else None
        _skip_grads(params, step, this_bad)
        _skip_grads(ref_params, step, this_bad)
        total = opt.step()
        if this_bad is None:
            torch.nn.utils.clip_grad_norm_([p for p in ref_params if p.numel()], 1.5)
            ref_opt.step()
        else:
            assert not math.isfinite(float(total))
        for i, (p, r) in enumerate(zip(params, ref_params)):
            torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6, msg=f"step {step}, parameter {i}")
            torch.testing.assert_close(p.grad, r.grad, rtol=1e-6, atol=1e-12, equal_nan=True,
                                       msg=f"step {step}, grad {i}")
        _assert_same_state(opt, ref_opt, params, ref_params)


def test_only_a_step_that_makes_state_looks_at_found_inf(monkeypatch):
    """The host read of found_inf (a sync on a GPU) happens on a step that made optimizer state
    only: the first step of each parameter, skipped or not, and nothing after."""
    calls = []
    real = fusedclip.optim._forget_state_of_a_skipped_step
    monkeypatch.setattr(fusedclip.optim, "_forget_state_of_a_skipped_step",
                        lambda *args: (calls.append(len(args[0])), real(*args))[1])
    params = _skip_params(SKIP_SHAPES)
    opt = fusedclip.ClipOptimizer(torch.optim.AdamW(params[:3], lr=1e-2, fused=True), max_norm=1.0)
    for step, bad in enumerate([math.nan, None, None, math.inf, None]):
        _skip_grads(params, step, bad)
        opt.step()
    opt.add_param_group({"params": params[3:]})  # the new parameters' first step makes state
    for step in range(5, 7):
        _skip_grads(params, step, None)
        opt.step()
    # Entries after each such step: 3 made and removed (skipped), 3 made, 3 + 2 made.
    assert calls == [3, 3, 5]


@pytest.mark.parametrize("name", ["sgd-momentum-fused", "sgd-nesterov-fused", "adam-fused", "adam-amsgrad-fused",
                                  "adamw-fused"])
def test_under_capture_a_skipped_first_step_leaves_zeroed_state(monkeypatch, name):
    """Where no host read is allowed (CUDA graph capture, played here by _capturing), the state
    a skipped first step made stays, zeroed on the device: the steps after it then equal
    skipping by hand for Adam, AdamW and SGD without dampening."""
    monkeypatch.setattr(fusedclip.optim, "_capturing", lambda device: True)
    make, _ = SKIP_OPTIMIZERS[name]
    ref_params, params = _skip_params(SKIP_SHAPES), _skip_params(SKIP_SHAPES)
    ref_opt = make(ref_params)
    opt = fusedclip.ClipOptimizer(make(params), max_norm=1.5)
    _skip_grads(params, 0, math.nan)
    opt.step()
    assert all(p in opt.state for p in params)
    assert all(torch.equal(v, torch.zeros_like(v)) for p in params for v in opt.state[p].values())
    for step in range(1, 5):
        _skip_grads(params, step, None)
        _skip_grads(ref_params, step, None)
        opt.step()
        torch.nn.utils.clip_grad_norm_([p for p in ref_params if p.numel()], 1.5)
        ref_opt.step()
        for p, r in zip(params, ref_params):
            torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6)
    _assert_same_state(opt, ref_opt, params, ref_params)


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["adamw-fused", "sgd-momentum-fused", "sgd-dampening-fused"])
@pytest.mark.parametrize("fold", [True, False, "auto"])
def test_cuda_skipped_first_step_then_steps_without_a_host_sync(name, fold):
    """On CUDA: a non-finite first step leaves no state (the one host read, on the step that made
    state), the steps after it equal skipping by hand, and once the state exists a step, clipping
    or not, skipped or not, reads nothing back to the host."""
    make, _ = SKIP_OPTIMIZERS[name]
    ref_params, params = _skip_params(SKIP_SHAPES), _skip_params(SKIP_SHAPES)
    ref_params = [torch.nn.Parameter(p.detach().cuda()) for p in ref_params]
    params = [torch.nn.Parameter(p.detach().cuda()) for p in params]
    ref_opt = make(ref_params)
    opt = fusedclip.ClipOptimizer(make(params), max_norm=1.5, fold=fold)
    for step, bad in enumerate([math.nan, None, None, None, math.inf, None]):
        for ps in (params, ref_params):
            _skip_grads(ps, step, bad)
        checked = step >= 2
        if checked:
            torch.cuda.synchronize()
            previous = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            if checked:
                torch.cuda.set_sync_debug_mode(previous)
        if bad is None:
            torch.nn.utils.clip_grad_norm_([p for p in ref_params if p.numel()], 1.5)
            ref_opt.step()
        if step == 0:
            assert not any(p in opt.state for p in params)
        for p, r in zip(params, ref_params):
            torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6)
    _assert_same_state(opt, ref_opt, params, ref_params)


@pytest.mark.parametrize("name,fold", [("adamw-fused", True), ("adamw-fused", False), ("sgd-plain", True)])
def test_grad_scaler_steps_a_clip_optimizer(name, fold):
    """scaler.step(ClipOptimizer): the same result as scaler.unscale_ + clip + scaler.step."""
    ref_params, params = _params(), _params()
    ref_opt = OPTIMIZERS[name](ref_params)
    opt = fusedclip.ClipOptimizer(OPTIMIZERS[name](params), max_norm=1.0, fold=fold)
    ref_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    for step, bad in enumerate([None, None, math.inf, None]):
        for ps, sc in ((ref_params, ref_scaler), (params, scaler)):
            sc.scale(torch.ones(()))
            _set_grads(ps, seed=step, bad=bad)
            for p in ps:
                p.grad.mul_(sc.get_scale())
        ref_scaler.unscale_(ref_opt)
        torch.nn.utils.clip_grad_norm_(ref_params, 1.0)
        ref_scaler.step(ref_opt)
        ref_scaler.update()
        scaler.step(opt)
        scaler.update()
        assert scaler.get_scale() == ref_scaler.get_scale()
        for p, r in zip(params, ref_params):
            torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["sgd-momentum-fused", "sgd-dampening-fused", "adam-fused", "adamw-fused"])
def test_grad_scaler_inf_on_the_first_step_leaves_no_state(name):
    """A GradScaler whose scale overflows the first steps (as its default 2**16 often does):
    scaler.step(ClipOptimizer(fused)) skips inside the kernel, and the state that skipped step
    made is removed, so the run equals the same optimizer unfused, which the scaler skips by
    not calling step() at all."""
    make, _ = SKIP_OPTIMIZERS[name]
    ref_params, params = _skip_params(SKIP_SHAPES), _skip_params(SKIP_SHAPES)
    ref_opt = make(ref_params)
    for group in ref_opt.param_groups:  # the same optimizer, unfused
        group["fused"], group["foreach"] = False, False
    ref_opt._step_supports_amp_scaling = False
    opt = fusedclip.ClipOptimizer(make(params), max_norm=1.5)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1) for _ in range(2)]
    for step, bad in enumerate([math.inf, None, math.nan, None, None]):
        for ps, sc in ((ref_params, scalers[0]), (params, scalers[1])):
            sc.scale(torch.ones(()))
            _skip_grads(ps, step, bad)
            for p in ps:
                p.grad.mul_(sc.get_scale())
        scalers[0].unscale_(ref_opt)
        torch.nn.utils.clip_grad_norm_([p for p in ref_params if p.numel()], 1.5)
        scalers[0].step(ref_opt)
        scalers[1].step(opt)
        for sc in scalers:
            sc.update()
        assert scalers[1].get_scale() == scalers[0].get_scale()
        for p, r in zip(params, ref_params):
            torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6)
        _assert_same_state(opt, ref_opt, params, ref_params)


def test_passthrough_of_the_wrapped_optimizer():
    params = _params()
    inner = torch.optim.AdamW(params, lr=1e-2, fused=True)
    opt = fusedclip.ClipOptimizer(inner, max_norm=1.0)
    assert opt.param_groups is inner.param_groups and opt.state is inner.state
    assert opt.defaults is inner.defaults
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    _set_grads(params, seed=0)
    opt.step()
    scheduler.step()
    assert inner.param_groups[0]["lr"] == pytest.approx(5e-3)
    saved = opt.state_dict()
    assert saved["state"][0]["step"] == 1
    opt.zero_grad()
    assert all(p.grad is None for p in params)
    other = fusedclip.ClipOptimizer(torch.optim.AdamW(_params(), lr=1.0, fused=True), max_norm=1.0)
    other.load_state_dict(saved)
    torch.testing.assert_close(other.state[other.param_groups[0]["params"][1]]["exp_avg"],
                               inner.state[params[1]]["exp_avg"])
    extra = torch.nn.Parameter(torch.randn(4))
    opt.add_param_group({"params": [extra]})
    assert inner.param_groups[-1]["params"] == [extra]
    assert "ClipOptimizer(max_norm=1.0" in repr(opt)


def test_closure_runs_before_the_norm():
    params = _params()
    opt = fusedclip.ClipOptimizer(torch.optim.SGD(params, lr=0.1, fused=True), max_norm=0.5)

    def closure():
        opt.zero_grad()
        loss = sum((p * p).sum() for p in params)
        loss.backward()
        return loss

    expected_total = torch.linalg.vector_norm(torch.cat([2 * p.detach().flatten() for p in params]))
    total = opt.step(closure)
    torch.testing.assert_close(total, expected_total, rtol=1e-5, atol=0)
    # The grads the closure made, clipped to max_norm.
    grads_norm = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in params]))
    assert float(grads_norm) == pytest.approx(0.5, rel=1e-5)


def test_clip_optimizer_takes_each_backend(backend):
    """ClipOptimizer accepts every backend for parameters it runs (and clips with it), as
    clip_grad_norm_ with backend "torch" does."""
    grads = backend.on(make_grads([(30,), (4, 5)], torch.float32, seed=22, scale=3.0))
    params, expected = params_with(clone_all(grads)), params_with(clone_all(grads))
    opt = fusedclip.ClipOptimizer(torch.optim.SGD(params, lr=0.0), 0.5, backend=backend.name)
    total = opt.step()
    expected_total = fusedclip.clip_grad_norm_(expected, 0.5, backend="torch")
    torch.testing.assert_close(total, expected_total, rtol=1e-5, atol=0)
    for p, q in zip(params, expected):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)


def test_bad_arguments():
    params = _params()
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        fusedclip.ClipOptimizer(params, max_norm=1.0)
    inner = torch.optim.SGD(params, lr=0.1)
    with pytest.raises(ValueError, match="max_norm"):
        fusedclip.ClipOptimizer(inner, max_norm=-1.0)
    with pytest.raises(ValueError, match="norm_type"):
        fusedclip.ClipOptimizer(inner, max_norm=1.0, norm_type=math.nan)
    with pytest.raises(ValueError, match="backend"):
        fusedclip.ClipOptimizer(inner, max_norm=1.0, backend="nope")
    for fold in (None, 1, "yes"):
        with pytest.raises(TypeError, match="fold must be True, False or 'auto'"):
            fusedclip.ClipOptimizer(inner, max_norm=1.0, fold=fold)
    with pytest.raises(TypeError, match="already a ClipOptimizer"):
        fusedclip.ClipOptimizer(fusedclip.ClipOptimizer(inner, max_norm=1.0), max_norm=1.0)


@pytest.mark.parametrize("fold", [True, False, "auto"])
@pytest.mark.parametrize("on_gpu", [False, True], ids=["cpu", "as-on-a-gpu"])
@pytest.mark.parametrize("clips", [True, False], ids=["clips", "does-not-clip"])
def test_fold_decides_where_the_coefficient_goes(monkeypatch, fold, on_gpu, clips):
    """fold=True hands 1/c to the kernel; False scales first; "auto" (the default) folds where the
    coefficient reads without a sync (CPU) and scales first elsewhere. Without a sync to tell c = 1,
    a fold passes 1/c even on a step that does not clip (the kernel then writes every gradient
    back); on the CPU it passes None then. A GPU is played by _reads_without_sync."""
    if on_gpu:
        monkeypatch.setattr(fusedclip.optim, "_reads_without_sync", lambda device: False)
    params = _params()
    inner = torch.optim.AdamW(params, lr=1e-2, fused=True)
    seen = []
    original_step = inner.step

    def recording_step(*args, **kwargs):
        seen.append((getattr(inner, "grad_scale", None), getattr(inner, "found_inf", None)))
        return original_step(*args, **kwargs)

    inner.step = recording_step
    max_norm = 0.1 if clips else 1e6
    opt = fusedclip.ClipOptimizer(inner, max_norm=max_norm, fold=fold)
    assert fusedclip.ClipOptimizer(torch.optim.AdamW(_params(), fused=True), 1.0).fold == "auto"
    _set_grads(params, seed=9)
    grads = [p.grad.clone() for p in params]
    total = opt.step()
    (grad_scale, found_inf), = seen
    assert found_inf is not None and float(found_inf) == 0.0
    folds = fold is True or (fold == "auto" and not on_gpu)
    if folds and (clips or on_gpu):
        expected = (total + 1e-6) / max_norm if clips else torch.tensor(1.0)
        torch.testing.assert_close(grad_scale, expected, rtol=1e-6, atol=0)
    else:
        assert grad_scale is None
    if not clips:
        assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))


def test_step_hooks_run_around_the_clip_and_state_dict_hooks_on_the_wrapped_optimizer():
    """torch.optim.Optimizer's hook registrations work on a ClipOptimizer: its step hooks around
    its step (the clip included), given the ClipOptimizer and the arguments as torch gives them; a
    pre-hook may replace the arguments; removing a handle stops its hook; torch's global hooks
    run too. State-dict hooks go to the wrapped optimizer."""
    params = _params()
    inner = torch.optim.SGD(params, lr=0.1)
    opt = fusedclip.ClipOptimizer(inner, max_norm=0.5)
    seen = []

    def pre(optimizer, args, kwargs):
        seen.append(("pre", optimizer, float(torch.linalg.vector_norm(params[3].grad))))

    def post(optimizer, args, kwargs):
        seen.append(("post", optimizer, float(torch.linalg.vector_norm(params[3].grad))))

    handles = [opt.register_step_pre_hook(pre), opt.register_step_post_hook(post)]
    _set_grads(params, seed=1)
    before = float(torch.linalg.vector_norm(params[3].grad))
    opt.step()
    assert [(kind, o) for kind, o, _ in seen] == [("pre", opt), ("post", opt)]
    assert seen[0][2] == before and seen[1][2] < before  # the clip ran between them
    for handle in handles:
        handle.remove()
    seen.clear()
    _set_grads(params, seed=2)
    opt.step()
    assert seen == []

    closures = []

    def with_a_closure(optimizer, args, kwargs):
        assert args == (optimizer,)  # as torch gives them: the optimizer, then step's arguments
        return (optimizer, lambda: closures.append(1)), {}

    opt.register_step_pre_hook(with_a_closure)
    _set_grads(params, seed=3)
    opt.step()
    assert closures == [1]
    handle = opt.register_step_pre_hook(lambda o, args, kwargs: "not a tuple")
    with pytest.raises(RuntimeError, match="must return None or a tuple"):
        opt.step()
    handle.remove()
    stepped = []
    from torch.optim.optimizer import register_optimizer_step_post_hook

    handle = register_optimizer_step_post_hook(lambda o, args, kwargs: stepped.append(o))
    try:
        opt.step()
    finally:
        handle.remove()
    assert stepped == [inner, opt]  # the wrapped optimizer's step, inside the ClipOptimizer's

    keys = []
    opt.register_state_dict_post_hook(lambda o, sd: keys.append((o, sorted(sd))))
    opt.register_load_state_dict_pre_hook(lambda o, sd: keys.append((o, "load")))
    saved = opt.state_dict()
    opt.load_state_dict(saved)
    assert keys == [(inner, ["param_groups", "state"]), (inner, "load")]


@pytest.mark.parametrize("fused", [False, True])
def test_pickle_and_deepcopy_with_a_scheduler(fused):
    """A learning-rate scheduler wraps step() on the instance, with a weak reference to the
    object: a copy leaves the wrapper out, as torch's optimizers do, and steps itself."""
    import copy
    import pickle

    model = torch.nn.Linear(4, 2)
    opt = fusedclip.ClipOptimizer(torch.optim.AdamW(model.parameters(), lr=0.1, fused=fused), 1.0)
    opt.register_step_post_hook(lambda *a: None)
    torch.optim.lr_scheduler.StepLR(opt, 1)
    for copied in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        before = model.weight.detach().clone()
        for p in copied.param_groups[0]["params"]:
            p.grad = torch.ones_like(p)
        copied.step()
        assert torch.equal(model.weight, before)  # the original did not move
        assert not torch.equal(copied.param_groups[0]["params"][0], before)
        assert copied._optimizer_step_post_hooks == {}


@pytest.mark.parametrize("name", ["adamw-fused", "sgd-momentum-fused"])
def test_float64_gradients_are_not_folded_by_default(name):
    """torch's fused kernels take a float32 grad_scale: "auto" scales float64 gradients in float64
    instead, as clip_grad_norm_ does; fold=True still folds (float32's precision of c)."""
    ref_params, params, folded_params = (_params(dtype=torch.float64) for _ in range(3))
    ref_opt = OPTIMIZERS[name](ref_params)
    opt = fusedclip.ClipOptimizer(OPTIMIZERS[name](params), max_norm=0.7)
    folded = fusedclip.ClipOptimizer(OPTIMIZERS[name](folded_params), max_norm=0.7, fold=True)
    for ps in (ref_params, params, folded_params):
        _set_grads(ps, seed=5)
    torch.nn.utils.clip_grad_norm_(ref_params, 0.7)
    ref_opt.step()
    opt.step()
    folded.step()
    for p, f, r in zip(params, folded_params, ref_params):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-15, atol=0)
        torch.testing.assert_close(f.grad, r.grad, rtol=1e-7, atol=0)
