"""timm through fusedclip.patch_timm(): NativeScaler(clip_grad=..., clip_mode=...) in modes "norm",
"value" and "agc", timm.utils.dispatch_clip_grad and adaptive_clip_grad, on a timm model.

Each clipped step is compared with the same step on timm's own functions, spies on fusedclip's
functions show that fusedclip did the clipping, and unpatch_timm() must restore every binding.
timm is an optional test dependency (scripts/setup.sh installs it); without it these tests skip.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

import pytest
import torch

import fusedclip
import fusedclip.adaptive
import fusedclip.clip
from torchvision_stand_ins import torchvision_is_real, torchvision_stand_ins

def _import_timm() -> types.ModuleType:
    """Imports timm, or skips the module.

    timm imports torchvision at import time (FrozenBatchNorm2d in timm.layers and timm.utils,
    datasets and transforms in timm.data), though its clipping code, NativeScaler and the models
    built here never use it. PyPI's torchvision is built against a CUDA torch and does not load
    beside a CPU-only torch, so scripts/setup.sh installs timm without it. Where torchvision is
    not installed, stand-ins for those modules exist only while timm is imported; they are out
    of ``sys.modules`` again before any test runs.
    """
    if importlib.util.find_spec("timm") is None:
        pytest.skip("timm is not installed (scripts/setup.sh installs it)", allow_module_level=True)
    if "timm" in sys.modules or torchvision_is_real():
        try:
            import timm.utils
        except Exception as exc:  # a torchvision that does not load raises RuntimeError
            pytest.skip(f"timm does not import: {exc}", allow_module_level=True)
        return timm
    with torchvision_stand_ins():
        try:
            import timm.utils
        except Exception as exc:  # a timm that imports more of torchvision, or lacks a dependency
            pytest.skip(f"timm does not import without torchvision: {exc!r}", allow_module_level=True)
    return timm


timm = _import_timm()
from timm.models import model_parameters  # noqa: E402
from timm.utils import NativeScaler  # noqa: E402

import timm.utils.agc  # noqa: E402
import timm.utils.clip_grad  # noqa: E402
import timm.utils.cuda  # noqa: E402

TIMM_ADAPTIVE_CLIP_GRAD = timm.utils.agc.adaptive_clip_grad
TIMM_DISPATCH_CLIP_GRAD = timm.utils.clip_grad.dispatch_clip_grad
# Where timm binds them by name (module, attribute); patch_timm() finds these and any others.
KNOWN_BINDINGS = {
    ("timm.utils", "adaptive_clip_grad"),
    ("timm.utils", "dispatch_clip_grad"),
    ("timm.utils.agc", "adaptive_clip_grad"),
    ("timm.utils.clip_grad", "adaptive_clip_grad"),
    ("timm.utils.clip_grad", "dispatch_clip_grad"),
    ("timm.utils.cuda", "dispatch_clip_grad"),
}


@pytest.fixture(autouse=True)
def _timm_unpatched():
    assert not fusedclip.is_timm_patched()
    yield
    fusedclip.unpatch_timm()


def _timm_bindings() -> dict[tuple[str, str], object]:
    """Every attribute of an imported timm module that is timm's or fusedclip's clip function."""
    functions = {
        id(f) for f in (TIMM_ADAPTIVE_CLIP_GRAD, TIMM_DISPATCH_CLIP_GRAD, *fusedclip.patch._TIMM_REPLACEMENTS.values())
    }
    return {
        (module_name, attr): value
        for module_name, module in list(sys.modules.items())
        if module_name == "timm" or module_name.startswith("timm.")
        for attr, value in list(vars(module).items())
        if id(value) in functions
    }


class Spy:
    """Records the calls of a function or method replaced for the test's duration."""

    def __init__(self, monkeypatch, owner, name: str, record):
        self.calls = []
        original = getattr(owner, name)

        def spied(*args, **kwargs):
            self.calls.append(record(*args, **kwargs))
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, spied)


def _spies(monkeypatch) -> dict[str, Spy]:
    """Spies on fusedclip's clip_grad_norm_ and clip_grad_value_ (called by attribute by
    fusedclip.timm_compat) and AGC, recording the clip value each was given."""
    return {
        "norm": Spy(monkeypatch, fusedclip.clip, "clip_grad_norm_",
                    lambda parameters, max_norm, norm_type=2.0, **kw: (max_norm, norm_type)),
        "value": Spy(monkeypatch, fusedclip.clip, "clip_grad_value_",
                     lambda parameters, clip_value, **kw: clip_value),
        "agc": Spy(monkeypatch, fusedclip.adaptive.AGC, "__call__",
                   lambda self, parameters: (self.clip_factor, self.eps)),
    }


def _data():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, 32, 32, generator=gen), torch.randint(0, 5, (4,), generator=gen)


def _scaler_step(clip_grad, clip_mode, patched):
    """One NativeScaler step of a tiny timm NFNet: the gradients after clipping, the parameters
    after the SGD step."""
    torch.manual_seed(0)
    model = timm.create_model("test_nfnet", pretrained=False, num_classes=5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = NativeScaler(device="cpu")
    x, y = _data()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    with fusedclip.patch_timm() if patched else contextlib.nullcontext():
        # As timm's train.py does: the classifier head is left out of AGC.
        parameters = model_parameters(model, exclude_head=clip_mode == "agc")
        scaler(loss, opt, clip_grad=clip_grad, clip_mode=clip_mode, parameters=parameters)
    grads = [p.grad.clone() for p in model.parameters()]
    return grads, [p.detach().clone() for p in model.parameters()]


def test_patch_timm_rebinds_every_binding_and_unpatch_restores_them():
    before = _timm_bindings()
    assert KNOWN_BINDINGS <= set(before)
    assert TIMM_DISPATCH_CLIP_GRAD.__module__ == "timm.utils.clip_grad"
    assert TIMM_ADAPTIVE_CLIP_GRAD.__module__ == "timm.utils.agc"

    fusedclip.patch_timm()
    fusedclip.patch_timm()  # idempotent
    assert fusedclip.is_timm_patched()
    patched = _timm_bindings()
    assert set(patched) == set(before)
    replacements = fusedclip.patch._TIMM_REPLACEMENTS
    for (module_name, attr), value in patched.items():
        original = before[(module_name, attr)]
        name = "adaptive_clip_grad" if original is TIMM_ADAPTIVE_CLIP_GRAD else "dispatch_clip_grad"
        assert value is replacements[name], (module_name, attr)
    assert timm.utils.cuda.dispatch_clip_grad is not TIMM_DISPATCH_CLIP_GRAD  # NativeScaler's
    assert not fusedclip.is_torch_patched()  # independent of patch_torch

    fusedclip.unpatch_timm()
    fusedclip.unpatch_timm()
    assert not fusedclip.is_timm_patched()
    after = _timm_bindings()
    assert after.keys() == before.keys()
    assert all(after[key] is before[key] for key in before)


def test_patch_timm_context_manager():
    with fusedclip.patch_timm():
        assert timm.utils.dispatch_clip_grad is not TIMM_DISPATCH_CLIP_GRAD
    assert timm.utils.dispatch_clip_grad is TIMM_DISPATCH_CLIP_GRAD
    # A block entered while patched leaves timm patched.
    fusedclip.patch_timm()
    with fusedclip.patch_timm():
        pass
    assert fusedclip.is_timm_patched()
    fusedclip.unpatch_timm()
    # An exception inside the block still unpatches.
    with pytest.raises(KeyError):
        with fusedclip.patch_timm():
            raise KeyError("x")
    assert not fusedclip.is_timm_patched()
    assert timm.utils.agc.adaptive_clip_grad is TIMM_ADAPTIVE_CLIP_GRAD


@pytest.mark.parametrize("clip_mode, clip_grad", [("norm", 0.5), ("value", 0.01), ("agc", 0.01)])
def test_native_scaler_clips_with_fusedclip(monkeypatch, clip_mode, clip_grad):
    spies = _spies(monkeypatch)
    unclipped, _ = _scaler_step(None, clip_mode, patched=False)
    ref_grads, ref_params = _scaler_step(clip_grad, clip_mode, patched=False)
    assert all(not spy.calls for spy in spies.values())  # timm's own functions ran
    grads, params = _scaler_step(clip_grad, clip_mode, patched=True)
    assert not fusedclip.is_timm_patched()

    expected = {"norm": (clip_grad, 2.0), "value": clip_grad, "agc": (clip_grad, 1e-3)}[clip_mode]
    assert spies[clip_mode].calls == [expected]
    assert all(not spy.calls for mode, spy in spies.items() if mode != clip_mode)
    assert any(not torch.equal(r, u) for r, u in zip(ref_grads, unclipped))  # the step clips
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)
    for p, r in zip(params, ref_params):
        torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-7)


def _params_with_grads(seed=3):
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in [(6, 4, 3, 3), (6,), (5, 12), ()]:
        p = torch.nn.Parameter(torch.randn(shape, generator=gen))
        p.grad = torch.randn(shape, generator=gen) * 5
        params.append(p)
    return params


def _clip_both(clip, patched):
    params = _params_with_grads()
    with fusedclip.patch_timm() if patched else contextlib.nullcontext():
        result = clip(params)
    return result, [p.grad for p in params]


@pytest.mark.parametrize("case", [
    "dispatch_norm_inf", "dispatch_agc", "adaptive_clip_grad_eps", "adaptive_clip_grad_p1", "dispatch_agc_p3",
])
def test_timm_functions_called_directly(monkeypatch, case):
    """timm.utils' functions as a script calls them, with timm's keywords; AGC of a norm other than
    2 runs timm's own."""
    clip, mode, expected = {
        "dispatch_norm_inf": (lambda ps: timm.utils.dispatch_clip_grad(ps, value=1.0, mode="norm", norm_type="inf"),
                              "norm", (1.0, "inf")),
        "dispatch_agc": (lambda ps: timm.utils.dispatch_clip_grad(ps, value=0.05, mode="agc"), "agc", (0.05, 1e-3)),
        "adaptive_clip_grad_eps": (lambda ps: timm.utils.adaptive_clip_grad(ps, clip_factor=0.02, eps=0.5),
                                   "agc", (0.02, 0.5)),
        "adaptive_clip_grad_p1": (lambda ps: timm.utils.adaptive_clip_grad(ps, 0.02, norm_type=1.0), None, None),
        "dispatch_agc_p3": (lambda ps: timm.utils.dispatch_clip_grad(ps, 0.05, mode="agc", norm_type=3.0), None, None),
    }[case]
    spies = _spies(monkeypatch)
    ref_result, ref_grads = _clip_both(clip, patched=False)
    assert all(not spy.calls for spy in spies.values())
    result, grads = _clip_both(clip, patched=True)
    assert result is None and ref_result is None  # timm's functions return nothing
    for m, spy in spies.items():
        assert spy.calls == ([expected] if m == mode else []), m
    assert any(not torch.equal(g, p.grad) for g, p in zip(ref_grads, _params_with_grads()))  # clips
    for g, r in zip(grads, ref_grads):
        if mode is None:
            assert torch.equal(g, r)  # timm's own function ran
        else:
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)


def test_unknown_mode_fails_as_in_timm():
    params = _params_with_grads()
    before = [p.grad.clone() for p in params]
    with fusedclip.patch_timm():
        with pytest.raises(AssertionError, match="Unknown clip mode"):
            timm.utils.dispatch_clip_grad(params, 1.0, mode="nrom")
    assert all(torch.equal(p.grad, b) for p, b in zip(params, before))
