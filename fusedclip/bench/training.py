"""Benchmarks of the training integrations, run by ``python -m fusedclip bench``.

* "amp": a GradScaler step's unscale + clip, fusedclip's fused path
  (``clip_grad_norm_(..., grad_scaler=, optimizer=)``: one read, one read-write) against
  ``scaler.unscale_(opt)`` + torch's ``clip_grad_norm_`` (read-write, read, read-write), on
  float32 gradients (as a GradScaler keeps them) scaled by 2**16, in a step that clips.
* "adamw": ``ClipOptimizer(AdamW(fused=True))``'s step (the clip coefficient folded into the
  AdamW kernel, and with ``fold=False`` the scale pass instead) against torch's ``clip_grad_norm_`` followed by the
  same fused AdamW step.

Both use the GPT-2 small gradient shapes and time torch and fusedclip back to back in alternating
order on the same tensors; before every timed call the gradients are restored, untimed, from a
copy of what backward left.
"""

from __future__ import annotations

import statistics
from typing import Callable, Optional

import torch

import fusedclip
from fusedclip.bench import harness

__all__ = ["BENCHMARKS", "run", "format_row", "markdown_table"]

# torch's own clip_grad_norm_, even when torch is patched.
_torch_clip_grad_norm_ = harness.TORCH["clip_grad_norm_"]


def _interleaved(
    ours: Callable[[], object],
    theirs: Callable[[], object],
    before: Callable[[], None],
    after: Callable[[], None],
    device: torch.device,
    repeats: int,
    warmup: int,
) -> tuple[list[float], list[float]]:
    """Seconds of each timed call of ours and theirs (harness.interleave), each preceded by
    before() and followed by after()."""
    times = harness.interleave({"ours": ours, "theirs": theirs}, device, repeats, warmup,
                               before=lambda _: before(), after=after)
    return times["ours"], times["theirs"]


def _gpt2_parameters(device: torch.device) -> list[torch.nn.Parameter]:
    return harness.make_parameters(harness.Workload("gpt2-124m", torch.float32, harness.gpt2_small_shapes()), device)


def amp_unscale_clip(device: torch.device, repeats: int, warmup: int) -> list[dict]:
    params = _gpt2_parameters(device)
    grads = [p.grad for p in params]
    max_norm = float(harness.TORCH["get_total_norm"](grads)) * 1e-3  # every step clips
    scale = 2.0**16
    scaled = [g * scale for g in grads]
    optimizer = torch.optim.SGD(params, lr=0.0)  # owns the grads for the scaler; never stepped
    scaler = torch.amp.GradScaler(device.type, init_scale=scale, growth_interval=10**9)
    scaler.scale(torch.ones((), device=device))  # what scaler.scale(loss) does first

    def theirs() -> None:
        scaler.unscale_(optimizer)
        _torch_clip_grad_norm_(params, max_norm)

    def ours() -> None:
        fusedclip.clip_grad_norm_(params, max_norm, grad_scaler=scaler, optimizer=optimizer)

    t_ours, t_theirs = _interleaved(
        ours, theirs, lambda: torch._foreach_copy_(grads, scaled), scaler.update, device, repeats, warmup
    )
    return [_row("unscale+clip (GradScaler)", "scaler.unscale_ + clip_grad_norm_", t_ours, t_theirs, 1.4)]


def folded_adamw_step(device: torch.device, repeats: int, warmup: int) -> list[dict]:
    params = _gpt2_parameters(device)
    grads = [p.grad for p in params]
    backward_grads = [g.clone() for g in grads]
    norm = float(harness.TORCH["get_total_norm"](grads))
    rows = []
    # A step that clips (the target), with the coefficient folded into the kernel (the default)
    # and with fusedclip's scale pass before the step (fold=False); and a step that does not
    # clip, where fusedclip writes nothing and torch multiplies by 1.
    variants = (("clip", "", True, norm * 1e-3, 1.15), ("clip", ", fold=False", False, norm * 1e-3, None),
                ("noclip", "", True, norm * 1e3, None))
    for mode, label, fold, max_norm, target in variants:
        torch_adamw = torch.optim.AdamW(params, lr=1e-6, fused=True)
        clip_adamw = fusedclip.ClipOptimizer(torch.optim.AdamW(params, lr=1e-6, fused=True), max_norm, fold=fold)

        def theirs() -> None:
            _torch_clip_grad_norm_(params, max_norm)
            torch_adamw.step()

        t_ours, t_theirs = _interleaved(
            clip_adamw.step, theirs, lambda: torch._foreach_copy_(grads, backward_grads), lambda: None,
            device, repeats, warmup,
        )
        rows.append(_row(f"{mode} + fused AdamW{label}", "clip_grad_norm_ + AdamW(fused=True).step",
                         t_ours, t_theirs, target))
        del torch_adamw, clip_adamw
    return rows


def _row(name: str, baseline: str, t_ours: list[float], t_theirs: list[float], target: Optional[float]) -> dict:
    """Medians, and the ratio of the fastest calls too: on a machine shared with other work the
    fastest call is the one least disturbed."""
    ms_ours, ms_theirs = statistics.median(t_ours) * 1e3, statistics.median(t_theirs) * 1e3
    return {
        "benchmark": name,
        "baseline": baseline,
        "workload": "gpt2-124m float32",
        "fusedclip_ms": ms_ours,
        "torch_ms": ms_theirs,
        "speedup": ms_theirs / ms_ours,
        "speedup_of_fastest": min(t_theirs) / min(t_ours),
        "target": target,
    }


BENCHMARKS: dict[str, Callable[[torch.device, int, int], list[dict]]] = {
    "amp": amp_unscale_clip,
    "adamw": folded_adamw_step,
}


def run(
    device: torch.device,
    names: Optional[list[str]] = None,
    repeats: int = 15,
    warmup: int = 3,
    log: Callable[[str], None] = print,
) -> list[dict]:
    rows = []
    for name in BENCHMARKS if names is None else names:
        for row in BENCHMARKS[name](device, repeats, warmup):
            log(format_row(row))
            rows.append(row)
    return rows


HEADER = (f"{'training step':<32} {'fusedclip ms':>12} {'torch ms':>10} {'ratio':>7} "
          f"{'fastest':>8} {'target':>7}")


def format_row(row: dict) -> str:
    return (
        f"{row['benchmark']:<32} {row['fusedclip_ms']:>12.2f} {row['torch_ms']:>10.2f} "
        f"{row['speedup']:>6.2f}x {row['speedup_of_fastest']:>7.2f}x {_target(row):>7}"
    )


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| training step (gpt2-124m float32) | against | fusedclip ms | torch ms | ratio of medians "
        "| ratio of fastest | target |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['benchmark']} | {r['baseline']} | {r['fusedclip_ms']:.2f} | {r['torch_ms']:.2f} "
            f"| {r['speedup']:.2f}x | {r['speedup_of_fastest']:.2f}x | {_target(r)} |"
        )
    return "\n".join(lines)


def _target(row: dict) -> str:
    return "-" if row["target"] is None else f"{row['target']:.2f}x"
