"""Benchmark: fusedclip against torch.nn.utils.clip_grad_norm_, interleaved in the same run.

Each workload is a list of parameters with gradients, clipped in two modes: "clip" (max_norm far
below the norm, so every gradient is scaled) and "noclip" (max_norm above it). For every
repetition torch and fusedclip run back to back on the same tensors, in alternating order, and
the memory bandwidth probes run between them, so drift in the machine's speed hits all alike.

The bandwidth floor of a workload is the time the bytes it must move take at the bandwidth
measured in the same run: a clipping step reads every gradient (the norm) and then reads and
writes it (the scale); a step that does not clip only reads it. The probes are torch's own
kernels on one tensor of the same size as the gradients: ``sum`` for reading, in-place ``mul_``
for read-modify-write (and a copy for reference).
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
from typing import Callable, Optional

import torch

import fusedclip
from fusedclip import _backends
from fusedclip.bench import health, training
from fusedclip.bench.harness import (
    TORCH,
    WORKLOADS,
    BandwidthProbe,
    Workload,
    best_device,
    device_name,
    gpt2_small_shapes,
    interleave,
    make_parameters,
    relative_difference,
)

__all__ = ["WORKLOADS", "Workload", "make_parameters", "run", "main"]


def run(
    device: torch.device,
    workload_names: Optional[list[str]] = None,
    repeats: int = 15,
    warmup: int = 3,
    log: Callable[[str], None] = print,
    backend: str = "auto",
) -> dict:
    """Runs every workload in both modes with fusedclip's ``backend`` ("auto": the one it picks
    for the device); returns the results as a JSON-ready dict."""
    names = workload_names or list(WORKLOADS)
    backend = _backends.resolve_backend(backend, device)
    rows = []
    for name in names:
        for workload in WORKLOADS[name]():
            if device.type == "cpu" and not workload.on_cpu_by_default and not workload_names:
                continue
            params = make_parameters(workload, device)
            grads = [p.grad for p in params]
            element_bytes = torch.empty((), dtype=workload.dtype).element_size()
            n_bytes = workload.numel * element_bytes
            probe = BandwidthProbe(device, n_bytes)
            for _ in range(warmup):
                probe.sample()
            norm = float(TORCH["get_total_norm"](grads).float())
            diff = relative_difference(fusedclip.get_total_norm(grads), TORCH["get_total_norm"](grads))
            for mode, max_norm in (("clip", norm * 1e-3), ("noclip", norm * 1e3)):
                # Before every timed call the gradients are rewritten, untimed, as backward would
                # have just written them: doubled in "clip" mode (exact in every dtype), so each
                # call scales them by about 1/2 instead of settling at a norm that no longer clips;
                # multiplied by 1 in "noclip" mode, so both modes start from the same cache state.
                refresh = 2.0 if mode == "clip" else 1.0
                ours = lambda: fusedclip.clip_grad_norm_(params, max_norm, backend=backend)  # noqa: E731
                theirs = lambda: TORCH["clip_grad_norm_"](params, max_norm)  # noqa: E731
                first_sample = len(probe.samples["read"])
                times = interleave({"ours": ours, "torch": theirs}, device, repeats, warmup,
                                   before=lambda _: torch._foreach_mul_(grads, refresh), between=probe.sample)
                t_ours, t_torch = times["ours"], times["torch"]
                moved = 3 * n_bytes if mode == "clip" else n_bytes
                ms_ours, ms_torch = statistics.median(t_ours) * 1e3, statistics.median(t_torch) * 1e3
                # The floor at the bandwidth measured between this row's own timings.
                read_bw = probe.median("read", first_sample)
                rmw_bw = probe.median("rmw", first_sample)
                floor_s = n_bytes / read_bw + (2 * n_bytes / rmw_bw if mode == "clip" else 0.0)
                row = {
                    "workload": workload.label,
                    "backend": backend,
                    "mode": mode,
                    "tensors": len(workload.shapes),
                    "elements": workload.numel,
                    "bytes_moved": moved,
                    "fusedclip_ms": ms_ours,
                    "torch_ms": ms_torch,
                    "speedup": ms_torch / ms_ours,
                    "fusedclip_GBps": moved / ms_ours / 1e6,
                    "torch_GBps": moved / ms_torch / 1e6,
                    "floor_ms": floor_s * 1e3,
                    "read_GBps": read_bw / 1e9,
                    "rmw_GBps": rmw_bw / 1e9,
                    "copy_GBps": probe.median("copy", first_sample) / 1e9,
                    "percent_of_floor": 100 * floor_s * 1e3 / ms_ours if workload.bandwidth_bound else None,
                    "norm_relative_difference": diff,
                }
                rows.append(row)
                log(_format_row(row))
            del params, grads, probe
    return {
        "device": device_name(device),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "fusedclip": fusedclip.__version__,
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "results": rows,
    }


# --- backend "cuda": the single-launch clip against two launches -----------------------------------

# GPT-2 small in fp32 (498 MB, larger than any L2) and 10M fp32 parameters (40 MB, which fit in
# the 50 MB L2 of an H100, so the scale can re-read them from L2).
CUDA_LAUNCH_WORKLOADS: Callable[[], list[Workload]] = lambda: [  # noqa: E731
    Workload("gpt2-124m", torch.float32, gpt2_small_shapes()),
    Workload("l2-10m", torch.float32, ((1000, 1000),) * 10),
]
CUDA_LAUNCH_VARIANTS = ("cuda two-launch", "cuda single-launch", "torch backend", "torch.nn.utils")


def run_cuda_launches(device: torch.device, repeats: int = 15, warmup: int = 3,
                      log: Callable[[str], None] = print) -> list[dict]:
    """Times backend "cuda"'s fused clip as two launches and as one cooperative launch, with
    fusedclip's pure-PyTorch backend and torch.nn.utils beside them, interleaved (the order rotates
    each repetition). Needs fusedclip._C with its CUDA kernels."""
    single_launch_limit = {"cuda two-launch": 0, "cuda single-launch": 2**62}
    previous_limit = _backends._C.cuda_single_launch_max_bytes()
    rows = []
    log(f"{'workload':<20} {'mode':<7} " + " ".join(f"{v + ' ms':>22}" for v in CUDA_LAUNCH_VARIANTS))
    for workload in CUDA_LAUNCH_WORKLOADS():
        params = make_parameters(workload, device)
        grads = [p.grad for p in params]
        norm = float(TORCH["get_total_norm"](grads).float())
        for mode, max_norm in (("clip", norm * 1e-3), ("noclip", norm * 1e3)):
            refresh = 2.0 if mode == "clip" else 1.0  # as in run()
            cuda = lambda: fusedclip.clip_grad_norm_(params, max_norm, backend="cuda")  # noqa: E731
            calls = {
                "cuda two-launch": cuda,  # the two differ by the single-launch limit set below
                "cuda single-launch": cuda,
                "torch backend": lambda: fusedclip.clip_grad_norm_(params, max_norm, backend="torch"),
                "torch.nn.utils": lambda: TORCH["clip_grad_norm_"](params, max_norm),
            }
            def before(name: str) -> None:
                _backends._C.set_cuda_single_launch_max_bytes(single_launch_limit.get(name, previous_limit))
                torch._foreach_mul_(grads, refresh)

            try:
                times = interleave({name: calls[name] for name in CUDA_LAUNCH_VARIANTS}, device, repeats,
                                   warmup, before=before)
            finally:
                _backends._C.set_cuda_single_launch_max_bytes(previous_limit)
            row = {"workload": workload.label, "mode": mode, "tensors": len(workload.shapes),
                   "bytes": workload.numel * 4}
            row.update({f"{name} ms": statistics.median(times[name]) * 1e3 for name in CUDA_LAUNCH_VARIANTS})
            row["single/two-launch"] = row["cuda single-launch ms"] / row["cuda two-launch ms"]
            rows.append(row)
            log(f"{row['workload']:<20} {mode:<7} "
                + " ".join(f"{row[name + ' ms']:>22.3f}" for name in CUDA_LAUNCH_VARIANTS))
        del params, grads
    return rows


def cuda_launches_table(rows: list[dict]) -> str:
    lines = ["| workload | mode | " + " | ".join(f"{v} ms" for v in CUDA_LAUNCH_VARIANTS) + " | single / two |",
             "|---|---|" + "---:|" * (len(CUDA_LAUNCH_VARIANTS) + 1)]
    for r in rows:
        lines.append(f"| {r['workload']} | {r['mode']} | "
                     + " | ".join(f"{r[v + ' ms']:.3f}" for v in CUDA_LAUNCH_VARIANTS)
                     + f" | {r['single/two-launch']:.2f} |")
    return "\n".join(lines)


HEADER = (
    f"{'workload':<20} {'mode':<7} {'backend':<7} {'fusedclip ms':>12} {'torch ms':>10} {'ratio':>7} "
    f"{'GB/s':>7} {'% floor':>8} {'probe r/rmw GB/s':>17} {'norm diff':>10}"
)


def _percent(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.0f}%"


def _format_row(row: dict) -> str:
    return (
        f"{row['workload']:<20} {row['mode']:<7} {row['backend']:<7} {row['fusedclip_ms']:>12.3f} "
        f"{row['torch_ms']:>10.3f} {row['speedup']:>6.2f}x {row['fusedclip_GBps']:>7.1f} "
        f"{_percent(row['percent_of_floor']):>8} {row['read_GBps']:>8.1f}/{row['rmw_GBps']:<8.1f} "
        f"{row['norm_relative_difference']:>10.1e}"
    )


def markdown_table(report: dict) -> str:
    lines = [
        "| workload | mode | backend | fusedclip ms | torch ms | ratio | GB/s | % of floor "
        "| probe read / rmw / copy GB/s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['workload']} | {r['mode']} | {r.get('backend', '-')} | {r['fusedclip_ms']:.2f} "
            f"| {r['torch_ms']:.2f} | {r['speedup']:.2f}x | {r['fusedclip_GBps']:.1f} "
            f"| {_percent(r['percent_of_floor'])} "
            f"| {r['read_GBps']:.1f} / {r['rmw_GBps']:.1f} / {r['copy_GBps']:.1f} |"
        )
    return "\n".join(lines)


def plot(report: dict, path: str) -> bool:
    """A bar chart of the ratios to torch; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = report["results"]
    labels = [f"{r['workload']} {r['mode']} ({r['backend']})" for r in rows]
    y = list(range(len(rows)))[::-1]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 0.45 * len(rows) + 1.5), sharey=True)
    left.barh(y, [r["speedup"] for r in rows], color="tab:blue")
    left.axvline(1.0, color="black", linewidth=0.8)
    left.set_yticks(y, labels, fontsize=8)
    left.set_xlabel("speed-up over torch.nn.utils.clip_grad_norm_")
    right.barh(y, [r["percent_of_floor"] or 0.0 for r in rows], color="tab:green")
    right.axvline(100.0, color="black", linewidth=0.8)
    right.set_xlabel("% of the bandwidth floor (measured in the same run)")
    for i, r in zip(y, rows):
        left.text(r["speedup"], i, f" {r['speedup']:.2f}x", va="center", fontsize=7)
        right.text(r["percent_of_floor"] or 0.0, i, f" {_percent(r['percent_of_floor'])}", va="center", fontsize=7)
    fig.suptitle(f"fusedclip {report['fusedclip']} vs torch {report['torch']}, {report['device']}, "
                 f"{report['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(args) -> int:
    device = torch.device(args.device) if args.device else best_device()
    print(f"fusedclip {fusedclip.__version__}, torch {torch.__version__}, {device_name(device)}, "
          f"{torch.get_num_threads()} threads")
    print(HEADER)
    requested = getattr(args, "backend", "auto")
    backends = [requested]
    if device.type == "cuda" and requested == "auto":
        # Both GPU backends side by side: auto's choice between them is to follow these rows.
        backends = [b for b in ("cuda", "triton") if fusedclip.backend_status()[b] is None] or backends
    report = run(device, args.workloads, repeats=args.repeats, backend=backends[0])
    for other in backends[1:]:
        report["results"] += run(device, args.workloads, repeats=args.repeats, backend=other)["results"]
    if device.type == "cuda" and fusedclip.backend_status()["cuda"] is None:
        print("backend cuda: the single-launch clip against two launches")
        report["cuda_launches"] = run_cuda_launches(device, repeats=args.repeats)
    print("floor: the row's bytes at the probe bandwidth measured during that row (read for the "
          "norm, read-modify-write for the scale)")
    if getattr(args, "health", False):
        print(f"\n{health.HEADER}")
        report["health"] = health.run(device, repeats=args.repeats)
    training_table = _run_training(device, args, report)
    os.makedirs(args.output, exist_ok=True)
    slug = "".join(c if c.isalnum() else "-" for c in report["device"].lower()).strip("-")
    while "--" in slug:
        slug = slug.replace("--", "-")
    stem = os.path.join(args.output, f"{report['date']}-{slug}")
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=2)
    with open(stem + ".md", "w") as f:
        f.write(f"{report['device']}, torch {report['torch']}, {report['threads']} threads, "
                f"{report['date']}\n\n{markdown_table(report)}\n")
        if "cuda_launches" in report:
            f.write(f"\nBackend cuda, single launch against two launches:\n\n"
                    f"{cuda_launches_table(report['cuda_launches'])}\n")
        if "health" in report:
            f.write(f"\n{health.markdown_table(report['health'])}\n")
        f.write(training_table)
    print(f"wrote {stem}.json and {stem}.md")
    if plot(report, stem + ".png"):
        print(f"wrote {stem}.png")
    else:
        print("matplotlib is not installed: no chart (pip install matplotlib)")
    return 0


def _run_training(device: torch.device, args, report: dict) -> str:
    """The training-step benchmarks (fusedclip/training.py), into report["training"];
    returns their Markdown table ("" when none ran)."""
    if args.training == []:
        return ""
    print(training.HEADER)
    report["training"] = training.run(device, args.training, repeats=args.repeats)
    return "\n" + training.markdown_table(report["training"]) + "\n"
