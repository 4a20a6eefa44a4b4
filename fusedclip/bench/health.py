"""Benchmark of the gradient-health features (``python -m fusedclip bench``, suite "health").

Two comparisons on GPT-2 small's 148 parameter shapes (and the monitor also on 4,096 small
tensors), each pair interleaved in the same run, alternating which goes first, medians of
``repeats``:

* **AGC**: ``fusedclip.AGC`` (one fused pass: the parameters read once, the gradients read once
  and the clipped units rewritten from the cache) against a timm-style per-parameter loop of the
  same math (unit-wise norms of parameter and gradient, a clamp, a division, a ``torch.where``
  and a copy back: about six kernels and two temporaries per parameter).
* **GradientMonitor overhead**: ``monitor.clip_grad_norm_`` (clip, per-parameter norms from the
  same read, on-device statistics and flags) against a plain ``fusedclip.clip_grad_norm_``.

Before every timed call the gradients are doubled, untimed, so that every call really clips (the
same refresh as the clipping benchmark's "clip" mode); "noclip" rows leave them as they are with
a max_norm far above the norm.
"""

from __future__ import annotations

import statistics
from typing import Callable

import torch

import fusedclip
from fusedclip.bench.harness import WORKLOADS, Workload, interleave, make_parameters

__all__ = ["run", "timm_style_agc", "markdown_table", "HEADER"]


def _unitwise_norm(x: torch.Tensor) -> torch.Tensor:
    if x.ndim <= 1:
        return x.norm(2.0)
    return x.norm(2.0, dim=tuple(range(1, x.ndim)), keepdim=True)


def timm_style_agc(parameters, clip_factor: float = 0.01, eps: float = 1e-3) -> None:
    """AGC as timm's utils/agc.py computes it: a Python loop over parameters."""
    with torch.no_grad():
        for p in parameters:
            if p.grad is None:
                continue
            weights, grad = p.detach(), p.grad.detach()
            max_norm = _unitwise_norm(weights).clamp_(min=eps).mul_(clip_factor)
            grad_norm = _unitwise_norm(grad)
            clipped = grad * (max_norm / grad_norm.clamp(min=1e-6))
            grad.copy_(torch.where(grad_norm < max_norm, grad, clipped))


def _medians(ours: Callable, theirs: Callable, refresh: Callable, device, repeats: int, warmup: int):
    """Median seconds of ours and theirs, interleaved, refresh() untimed before each call."""
    times = interleave({"ours": ours, "theirs": theirs}, device, repeats, warmup, before=lambda _: refresh())
    return statistics.median(times["ours"]), statistics.median(times["theirs"])


def _workload(name: str, dtype: torch.dtype) -> Workload:
    return next(w for w in WORKLOADS[name]() if w.dtype == dtype)


def run(device: torch.device, repeats: int = 15, warmup: int = 3, log: Callable[[str], None] = print) -> list[dict]:
    rows = []

    def add(row: dict) -> None:
        rows.append(row)
        log(f"{row['benchmark']:<34} {row['workload']:<20} {row['mode']:<7} {row['fusedclip_ms']:>10.3f} "
            f"{row['baseline_ms']:>11.3f} {row['ratio']:>7.2f}x {row['overhead_percent']:>9}")

    # AGC: parameters of realistic size (std 0.02) so that the units clip.
    workload = _workload("gpt2-124m", torch.float32)
    params = make_parameters(workload, device)
    generator = torch.Generator().manual_seed(1)
    for p in params:
        p.data.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    grads = [p.grad for p in params]
    agc = fusedclip.AGC(clip_factor=0.01)
    ours, theirs = _medians(lambda: agc(params), lambda: timm_style_agc(params, 0.01),
                                lambda: torch._foreach_mul_(grads, 2.0), device, repeats, warmup)
    add({"benchmark": "AGC vs timm-style loop", "workload": workload.label, "mode": "clip",
         "fusedclip_ms": ours * 1e3, "baseline_ms": theirs * 1e3, "ratio": theirs / ours, "overhead_percent": "-"})
    del params, grads

    # GradientMonitor on top of the plain fused clip.
    for name in ("gpt2-124m", "many-small"):
        workload = _workload(name, torch.float32)
        params = make_parameters(workload, device)
        grads = [p.grad for p in params]
        norm = float(fusedclip.get_total_norm(grads))
        monitor = fusedclip.GradientMonitor([(f"p{i}", p) for i, p in enumerate(params)])
        for mode, max_norm, refresh in (("clip", norm * 1e-3, 2.0), ("noclip", norm * 1e3, 1.0)):
            ours, theirs = _medians(
                lambda: monitor.clip_grad_norm_(max_norm),
                lambda: fusedclip.clip_grad_norm_(params, max_norm),
                lambda: torch._foreach_mul_(grads, refresh), device, repeats, warmup)
            add({"benchmark": "GradientMonitor vs clip_grad_norm_", "workload": workload.label, "mode": mode,
                 "fusedclip_ms": ours * 1e3, "baseline_ms": theirs * 1e3, "ratio": theirs / ours,
                 "overhead_percent": f"{100 * (ours - theirs) / theirs:+.1f}%"})
        del params, grads, monitor
    return rows


HEADER = (f"{'benchmark':<34} {'workload':<20} {'mode':<7} {'fused ms':>10} {'baseline ms':>11} "
          f"{'ratio':>8} {'overhead':>9}")


def markdown_table(rows: list[dict]) -> str:
    lines = ["| benchmark | workload | mode | fusedclip ms | baseline ms | baseline / fusedclip | overhead |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['benchmark']} | {r['workload']} | {r['mode']} | {r['fusedclip_ms']:.2f} | "
                     f"{r['baseline_ms']:.2f} | {r['ratio']:.2f}x | {r['overhead_percent']} |")
    return "\n".join(lines)
