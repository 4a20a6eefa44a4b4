"""How backend "cuda" is chosen and refused; runs everywhere (the kernels themselves are tested on
a GPU in tests/test_cuda_backend.py)."""

from __future__ import annotations

import pytest
import torch

import fusedclip
from fusedclip import _backends, _ops
from conftest import assert_bitwise_equal, clone_all, make_grads, params_with

CUDA_BUILT = _backends._C is not None and bool(_backends._C.cuda_kernels)


def test_backend_status_says_why_cuda_is_missing():
    reason = fusedclip.backend_status()["cuda"]
    assert (reason is None) == CUDA_BUILT
    assert ("cuda" in fusedclip.available_backends()) == CUDA_BUILT
    if not CUDA_BUILT:
        assert "CUDA" in reason
        grads = make_grads([(4,)], torch.float32)
        originals = clone_all(grads)
        with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
            fusedclip.clip_grad_norm_(params_with(grads), 0.01, backend="cuda")
        assert_bitwise_equal(grads, originals)


def test_cuda_backend_refuses_cpu_tensors():
    if not CUDA_BUILT:
        pytest.skip("fusedclip._C was built without its CUDA kernels")
    grads = make_grads([(4,)], torch.float32)
    originals = clone_all(grads)
    with pytest.raises(ValueError, match="backend 'cuda' runs CUDA tensors only"):
        fusedclip.clip_grad_norm_(params_with(grads), 0.01, backend="cuda")
    assert_bitwise_equal(grads, originals)


def test_auto_takes_cuda_for_cuda_devices_when_built():
    triton_available = fusedclip.backend_status()["triton"] is None
    expected = "cuda" if CUDA_BUILT else ("triton" if triton_available else "torch")
    assert _backends.resolve_backend("auto", torch.device("cuda", 0)) == expected
    assert _backends.resolve_backend("auto", torch.device("cpu")) in ("cpu", "torch")


def test_gpu_backend_is_resolved_per_device_not_for_the_cpu(monkeypatch):
    # Naming a GPU backend must not be checked against the CPU fast path: the grads' own device
    # decides (here a meta device, which the cuda backend refuses with the grads' device named).
    monkeypatch.setattr(_backends, "_CUDA_ERROR", None)
    grads = [torch.randn(4, device="meta")]
    for call in (
        lambda: fusedclip.clip_grad_norm_(params_with(grads), 0.01, backend="cuda"),
        lambda: fusedclip.clip_grad_value_(params_with(grads), 0.01, backend="cuda"),
        lambda: fusedclip.clip_grads_with_norm_(params_with(grads), 0.01, torch.tensor(1.0), backend="cuda"),
    ):
        with pytest.raises(ValueError, match="gradients are on meta"):
            call()
