"""Hugging Face Trainer with fusedclip, on CPU, with a tiny GPT-2 built from a config (nothing is
downloaded): Trainer(max_grad_norm=...) through fusedclip.patch_torch() (Trainer clips through
Accelerate's clip_grad_norm_, which calls torch.nn.utils.clip_grad_norm_ before Accelerate 1.16,
get_total_norm then clip_grads_with_norm_ from 1.16 on), and Trainer(optimizers=(ClipOptimizer(...),
scheduler), max_grad_norm=0), which clips inside the optimizer step instead.

transformers is an optional test dependency (the `integration` extra); without it these tests
skip. Each run is compared with the same run on torch's own clipping, and a ClipRoute
(tests/clip_route.py) tells which of torch's functions and fusedclip's operators took the norms and
scaled the gradients, whichever route the installed versions take.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch

import fusedclip
from clip_route import FUSEDCLIP, TORCH, ClipRoute

transformers = pytest.importorskip("transformers", reason="transformers is not installed (extra 'integration')")

STEPS = 3
MAX_NORM = 0.2
LR = 0.5


def _model():
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=1, n_head=2, n_embd=16, vocab_size=64, n_positions=16,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config)


def _dataset(n=8, length=12):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (n, length), generator=gen)
    return [{"input_ids": row, "labels": row} for row in ids]


def _train(tmp_path, max_grad_norm, optimizer=None):
    """STEPS steps of Trainer; returns the model and the grad norms Trainer logged."""
    model = _model()
    opt = optimizer(model) if optimizer else torch.optim.SGD(model.parameters(), lr=LR)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=STEPS,
        per_device_train_batch_size=2, max_grad_norm=max_grad_norm, logging_steps=1,
        save_strategy="no", disable_tqdm=True, seed=0,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_dataset(), optimizers=(opt, scheduler))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    return model, [entry["grad_norm"] for entry in trainer.state.log_history if "grad_norm" in entry]


class Recorder:
    """Records the arguments of each call of a function replaced for the test's duration."""

    def __init__(self, monkeypatch, owner, name: str, record):
        self.calls = []
        original = getattr(owner, name)

        def recorded(*args, **kwargs):
            self.calls.append(record(*args, **kwargs))
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, recorded)


def _assert_same_parameters(model, ref):
    for p, r in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6)


def test_trainer_max_grad_norm_through_patch_torch(monkeypatch, tmp_path):
    """Trainer clips with Accelerator.clip_grad_norm_, which calls torch.nn.utils' clipping
    functions: patch_torch() makes them fusedclip's, with Trainer's max_grad_norm."""
    route = ClipRoute(monkeypatch)
    ref, ref_norms = _train(tmp_path / "torch", MAX_NORM)
    assert route.of(FUSEDCLIP) == []
    assert route.norms(TORCH) == STEPS and route.writes(TORCH) == STEPS  # once per step
    assert route.max_norms(TORCH) == [MAX_NORM] * STEPS  # with the max_norm given
    route.clear()
    with fusedclip.patch_torch():
        model, norms = _train(tmp_path / "fusedclip", MAX_NORM)
    assert not fusedclip.is_torch_patched()
    assert route.of(TORCH) == []  # fusedclip took every norm and did every clip
    assert route.norms(FUSEDCLIP) == STEPS and route.writes(FUSEDCLIP) == STEPS
    assert len(norms) == STEPS and min(ref_norms) > MAX_NORM  # every step clips
    assert norms == pytest.approx(ref_norms, rel=1e-5)
    _assert_same_parameters(model, ref)  # hence the max_norm fusedclip clipped with


def test_trainer_with_clip_optimizer(monkeypatch, tmp_path):
    """ClipOptimizer clips once per step inside its step(); with max_grad_norm=0, Trainer's own
    clip does not run (Trainer still takes the norm for its log, with max_norm=inf: no clip)."""
    route = ClipRoute(monkeypatch)
    ref, ref_norms = _train(tmp_path / "torch", MAX_NORM)
    assert route.writes(TORCH) == STEPS and route.max_norms(TORCH) == [MAX_NORM] * STEPS
    route.clear()

    steps = Recorder(monkeypatch, fusedclip.ClipOptimizer, "step", lambda self, closure=None: self.max_norm)
    model, norms = _train(
        tmp_path / "clip_optimizer", 0.0,
        optimizer=lambda m: fusedclip.ClipOptimizer(torch.optim.SGD(m.parameters(), lr=LR, fused=True), MAX_NORM),
    )
    assert steps.calls == [MAX_NORM] * STEPS  # the clip, once per step, inside ClipOptimizer
    # Trainer only measured, with torch's functions: a norm per step, no write.
    assert route.norms(TORCH) == STEPS and route.writes(TORCH) == 0
    assert all(math.isinf(max_norm) for max_norm in route.max_norms(TORCH))
    # fusedclip's operators ran in ClipOptimizer alone: its norm, once per step, and no scale pass
    # (over a fused SGD, ClipOptimizer folds the coefficient into the step's grad_scale).
    assert route.norms(FUSEDCLIP) == STEPS and route.writes(FUSEDCLIP) == 0
    assert min(ref_norms) > MAX_NORM
    assert norms == pytest.approx(ref_norms, rel=1e-5)  # the norms before clipping
    _assert_same_parameters(model, ref)


def test_clip_optimizer_under_patch_torch_clips_once(monkeypatch, tmp_path):
    """With patch_torch() as well, Trainer's norm for its log runs fusedclip's functions with
    max_norm=inf, which do not write the gradients; the clip is still ClipOptimizer's alone."""
    steps = Recorder(monkeypatch, fusedclip.ClipOptimizer, "step", lambda self, closure=None: self.max_norm)
    ref, _ = _train(tmp_path / "torch", MAX_NORM)
    route = ClipRoute(monkeypatch)
    with fusedclip.patch_torch():
        model, _ = _train(
            tmp_path / "clip_optimizer", 0.0,
            optimizer=lambda m: fusedclip.ClipOptimizer(torch.optim.SGD(m.parameters(), lr=LR), MAX_NORM),
        )
    assert steps.calls == [MAX_NORM] * STEPS
    assert route.of(TORCH) == []
    # Per step: Trainer's norm and ClipOptimizer's, one scale (ClipOptimizer's).
    assert route.norms(FUSEDCLIP) == 2 * STEPS and route.writes(FUSEDCLIP) == STEPS
    assert all(math.isinf(max_norm) for max_norm in route.max_norms(FUSEDCLIP))
    _assert_same_parameters(model, ref)
