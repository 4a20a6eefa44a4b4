"""Unmodified framework code through fusedclip.patch_torch(): Hugging Face Accelerate's
Accelerator.clip_grad_norm_ and PyTorch Lightning's Trainer(gradient_clip_val=...), on CPU.

Both are optional test dependencies (the `integration` extra); without them these tests skip and
say why. Each run is compared with the same run on torch's own clipping, and a ClipRoute
(tests/clip_route.py) shows that fusedclip took the norm and scaled the gradients, not torch,
whichever of torch's functions the framework calls (Accelerate 1.16 calls get_total_norm and
clip_grads_with_norm_, earlier versions and Lightning clip_grad_norm_)."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch

import fusedclip
from clip_route import FUSEDCLIP, TORCH, ClipRoute


def _data(seed=0, n=64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=gen)
    y = x @ torch.randn(8, 1, generator=gen) * 10 + torch.randn(n, 1, generator=gen)
    return x, y


def _model(seed=1):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def _assert_clipped_by(route: ClipRoute, layer: str, steps: int, max_norm: float) -> None:
    """Each step took one norm of the grads and scaled them once, all in `layer` (torch's own
    functions or fusedclip's operators), and nothing ran in the other; torch's functions, where
    they ran, were given the framework's max_norm."""
    other = FUSEDCLIP if layer == TORCH else TORCH
    assert route.of(other) == [], route.calls
    assert route.norms(layer) == steps and route.writes(layer) == steps, route.calls
    if layer == TORCH:
        assert route.max_norms(TORCH) == [max_norm] * steps


def test_accelerate_clip_grad_norm_through_the_patch(monkeypatch):
    accelerate = pytest.importorskip("accelerate", reason="accelerate is not installed (extra 'integration')")
    x, y = _data()

    def train(patched: bool):
        accelerator = accelerate.Accelerator(cpu=True)
        model = _model()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        model, opt = accelerator.prepare(model, opt)
        norms = []
        with fusedclip.patch_torch() if patched else contextlib.nullcontext():
            for step in range(4):
                opt.zero_grad()
                loss = torch.nn.functional.mse_loss(model(x[step::4]), y[step::4])
                accelerator.backward(loss)
                norms.append(accelerator.clip_grad_norm_(model.parameters(), 0.5))
                opt.step()
        return norms, [p.detach().clone() for p in model.parameters()]

    route = ClipRoute(monkeypatch)
    ref_norms, ref_params = train(patched=False)
    _assert_clipped_by(route, TORCH, steps=4, max_norm=0.5)
    route.clear()
    norms, params = train(patched=True)
    _assert_clipped_by(route, FUSEDCLIP, steps=4, max_norm=0.5)
    assert not fusedclip.is_torch_patched()
    for n, r in zip(norms, ref_norms):
        torch.testing.assert_close(n, r, rtol=1e-5, atol=0)
    assert float(ref_norms[0]) > 0.5  # the runs clip
    for p, r in zip(params, ref_params):
        torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6)


def test_lightning_gradient_clip_val_through_the_patch(monkeypatch, tmp_path):
    lightning = pytest.importorskip("lightning", reason="lightning is not installed (extra 'integration')")
    x, y = _data(n=48)

    class Regression(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _model()
            self.norms = []

        def training_step(self, batch, batch_idx):
            inputs, targets = batch
            return torch.nn.functional.mse_loss(self.net(inputs), targets)

        def on_before_optimizer_step(self, optimizer):
            grads = [p.grad for p in self.parameters() if p.grad is not None]
            self.norms.append(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    def train(patched: bool):
        module = Regression()
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=12, shuffle=False)
        trainer = lightning.Trainer(
            accelerator="cpu", devices=1, max_steps=4, gradient_clip_val=0.5,
            gradient_clip_algorithm="norm", logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Lightning's advice on num_workers and the like
            with fusedclip.patch_torch() if patched else contextlib.nullcontext():
                trainer.fit(module, loader)
        return module

    route = ClipRoute(monkeypatch)
    ref = train(patched=False)
    _assert_clipped_by(route, TORCH, steps=4, max_norm=0.5)
    route.clear()
    ours = train(patched=True)
    _assert_clipped_by(route, FUSEDCLIP, steps=4, max_norm=0.5)
    assert not fusedclip.is_torch_patched()
    # on_before_optimizer_step runs before Lightning clips: the unclipped norms, which clip.
    assert min(float(n) for n in ref.norms) > 0.5
    for n, r in zip(ours.norms, ref.norms):
        torch.testing.assert_close(n, r, rtol=1e-5, atol=0)
    for p, r in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6)
