"""Benchmarks of the training integrations, run by ``python -m fusedclip bench``.

* "amp": a GradScaler step's unscale + clip, fusedclip's fused path
  (``clip_grad_norm_(..., grad_scaler=, optimizer=)``: one read, one read-write) against
  ``scaler.unscale_(opt)`` + torch's ``clip_grad_norm_`` (read-write, read, read-write), on
  float32 gradients (as a GradScaler keeps them) scaled by 2**16, in a step that clips.
* "adamw": ``ClipOptimizer(AdamW(fused=True))``'s step against torch's ``clip_grad_norm_``
  followed by the same fused AdamW step, in the four cases that decide ClipOptimizer's ``fold``:
  a step that clips and one that does not, each with the clip coefficient folded into the AdamW
  kernel (``fold=True``: no scale pass, but the kernel writes every gradient back whenever it
  gets a grad_scale, which on a GPU is every step) and with fusedclip's scale pass
  (``fold=False``: read and write on a clipping step, nothing written otherwise). The row that
  ``fold="auto"`` takes on the device is marked "(auto)", and the fraction of clipping steps
  above which ``fold=True`` is the faster is printed below the rows (``fold_break_even``).

Both use the GPT-2 small gradient shapes and time torch and fusedclip back to back in alternating
order on the same tensors; before every timed call the gradients are restored, untimed, from a
copy of what backward left.
"""

from __future__ import annotations

import statistics
from typing import Callable, Optional

import torch

import fusedclip
from fusedclip import optim
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
    # A step that clips (the fold's target) and one that does not (torch multiplies by 1). In each,
    # torch and ClipOptimizer with the coefficient folded into the kernel and with fusedclip's
    # scale pass before the step are timed in one interleaved loop (each its own AdamW state over
    # the same parameters), so that the fold and the scale pass meet the same machine.
    for mode, max_norm, target in (("clip", norm * 1e-3, 1.15), ("noclip", norm * 1e3, None)):
        torch_adamw = torch.optim.AdamW(params, lr=1e-6, fused=True)
        clip_adamws = {fold: fusedclip.ClipOptimizer(torch.optim.AdamW(params, lr=1e-6, fused=True), max_norm,
                                                     fold=fold) for fold in (True, False)}

        def theirs() -> None:
            _torch_clip_grad_norm_(params, max_norm)
            torch_adamw.step()

        calls = {"torch": theirs, **{f"fold={fold}": opt.step for fold, opt in clip_adamws.items()}}
        times = harness.interleave(calls, device, repeats, warmup,
                                   before=lambda _: torch._foreach_copy_(grads, backward_grads))
        for fold in (True, False):
            auto = " (auto)" if optim._auto_folds(device) == fold else ""
            rows.append(_row(f"{mode} + fused AdamW, fold={fold}{auto}", "clip_grad_norm_ + AdamW(fused=True).step",
                             times[f"fold={fold}"], times["torch"], target if fold else None, mode=mode, fold=fold))
        del torch_adamw, clip_adamws, calls
    return rows


def fold_break_even(rows: list[dict]) -> Optional[float]:
    """The fraction of steps that clip above which fold=True is the faster, from the medians of
    the four "adamw" rows: with a fraction f of clipping steps, folding gains f * (scale pass -
    fold on a clipping step) and loses (1 - f) * (fold - scale pass on a step that does not clip).
    0.0 when folding loses nothing on a step that does not clip (on a CPU, where the fold passes
    no grad_scale then), 1.0 when it gains nothing on a clipping step; None without the rows."""
    ms = {(r["mode"], r["fold"]): r["fusedclip_ms"] for r in rows if "fold" in r}
    if len(ms) != 4:
        return None
    loss = max(ms["noclip", True] - ms["noclip", False], 0.0)
    gain = max(ms["clip", False] - ms["clip", True], 0.0)
    if loss == 0.0:
        return 0.0
    return loss / (loss + gain)


def _break_even_line(rows: list[dict]) -> Optional[str]:
    f = fold_break_even(rows)
    if f is None:
        return None
    if f == 0.0:
        verdict = "fold=True is never the slower here: it loses nothing on a step that does not clip"
    elif f == 1.0:
        verdict = "fold=True is never the faster here: it gains nothing on a clipping step"
    else:
        verdict = f"fold=True is the faster when more than {100 * f:.0f}% of steps clip"
    return f"{verdict} (medians; fold=\"auto\", the default, folds on a CPU and takes the scale pass on a GPU)"


def _row(name: str, baseline: str, t_ours: list[float], t_theirs: list[float], target: Optional[float],
         **case) -> dict:
    """Medians, and the ratio of the fastest calls too: on a machine shared with other work the
    fastest call is the one least disturbed. case: what the row varies (mode, fold)."""
    ms_ours, ms_theirs = statistics.median(t_ours) * 1e3, statistics.median(t_theirs) * 1e3
    return {
        **case,
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
    line = _break_even_line(rows)
    if line is not None:
        log(line)
    return rows


HEADER = (f"{'training step':<44} {'fusedclip ms':>12} {'torch ms':>10} {'ratio':>7} "
          f"{'fastest':>8} {'target':>7}")


def format_row(row: dict) -> str:
    return (
        f"{row['benchmark']:<44} {row['fusedclip_ms']:>12.2f} {row['torch_ms']:>10.2f} "
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
    line = _break_even_line(rows)
    if line is not None:
        lines += ["", line]
    return "\n".join(lines)


def _target(row: dict) -> str:
    return "-" if row["target"] is None else f"{row['target']:.2f}x"
