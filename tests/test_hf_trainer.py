"""Hugging Face Trainer with fusedclip, on CPU, with a tiny GPT-2 built from a config (nothing is
downloaded): Trainer(max_grad_norm=...) through fusedclip.patch_torch() (Trainer clips through
Accelerate's clip_grad_norm_), and Trainer(optimizers=(ClipOptimizer(...), scheduler),
max_grad_norm=0), which clips inside the optimizer step instead.

transformers is an optional test dependency (the `integration` extra); without it these tests
skip. Each run is compared with the same run on torch's own clipping.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import fusedclip
from fusedclip import _backends, _ops

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
    """Trainer clips with Accelerator.clip_grad_norm_, which calls torch.nn.utils.clip_grad_norm_:
    patch_torch() makes that fusedclip's, with Trainer's max_grad_norm."""
    fused = Recorder(monkeypatch, _ops, "clip_grad_norm_of_params", lambda params, max_norm, norm_type: max_norm)
    ref, ref_norms = _train(tmp_path / "torch", MAX_NORM)
    assert fused.calls == []
    with fusedclip.patch_torch():
        model, norms = _train(tmp_path / "fusedclip", MAX_NORM)
    assert not fusedclip.is_torch_patched()
    assert fused.calls == [MAX_NORM] * STEPS  # once per step, with the max_norm given
    assert len(norms) == STEPS and min(ref_norms) > MAX_NORM  # every step clips
    assert norms == pytest.approx(ref_norms, rel=1e-5)
    _assert_same_parameters(model, ref)


def test_trainer_with_clip_optimizer(monkeypatch, tmp_path):
    """ClipOptimizer clips once per step inside its step(); with max_grad_norm=0, Trainer's own
    clip does not run (Trainer still takes the norm for its log, with max_norm=inf: no clip)."""
    torch_clip = Recorder(monkeypatch, torch.nn.utils, "clip_grad_norm_",
                          lambda parameters, max_norm, norm_type=2.0, **kw: max_norm)
    ref, ref_norms = _train(tmp_path / "torch", MAX_NORM)
    assert torch_clip.calls == [MAX_NORM] * STEPS
    torch_clip.calls.clear()

    steps = Recorder(monkeypatch, fusedclip.ClipOptimizer, "step", lambda self, closure=None: self.max_norm)
    fused = Recorder(monkeypatch, _ops, "clip_grad_norm_of_params", lambda params, max_norm, norm_type: max_norm)
    model, norms = _train(
        tmp_path / "clip_optimizer", 0.0,
        optimizer=lambda m: fusedclip.ClipOptimizer(torch.optim.SGD(m.parameters(), lr=LR, fused=True), MAX_NORM),
    )
    assert steps.calls == [MAX_NORM] * STEPS  # the clip, once per step, inside ClipOptimizer
    assert all(math.isinf(max_norm) for max_norm in torch_clip.calls)  # Trainer only measured
    assert len(torch_clip.calls) == STEPS
    assert fused.calls == []  # fusedclip.clip_grad_norm_ did not run either
    assert min(ref_norms) > MAX_NORM
    assert norms == pytest.approx(ref_norms, rel=1e-5)  # the norms before clipping
    _assert_same_parameters(model, ref)


def test_clip_optimizer_under_patch_torch_clips_once(monkeypatch, tmp_path):
    """With patch_torch() as well, Trainer's norm for its log runs fusedclip's clip_grad_norm_
    with max_norm=inf, which does not write the gradients; the clip is still ClipOptimizer's."""
    fused = Recorder(monkeypatch, _ops, "clip_grad_norm_of_params", lambda params, max_norm, norm_type: max_norm)
    steps = Recorder(monkeypatch, fusedclip.ClipOptimizer, "step", lambda self, closure=None: self.max_norm)
    ref, _ = _train(tmp_path / "torch", MAX_NORM)
    with fusedclip.patch_torch():
        model, _ = _train(
            tmp_path / "clip_optimizer", 0.0,
            optimizer=lambda m: fusedclip.ClipOptimizer(torch.optim.SGD(m.parameters(), lr=LR), MAX_NORM),
        )
    assert steps.calls == [MAX_NORM] * STEPS
    assert len(fused.calls) == STEPS and all(math.isinf(max_norm) for max_norm in fused.calls)
    _assert_same_parameters(model, ref)
