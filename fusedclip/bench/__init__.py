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
from typing import Callable, Optional, Sequence

import torch

import fusedclip
from fusedclip import _backends
from fusedclip.bench import health, training
from fusedclip.bench.harness import (
    TORCH,
    WORKLOADS,
    BandwidthProbe,
    back_to_back_seconds,
    Workload,
    best_device,
    device_name,
    device_slug,
    gpt2_small_shapes,
    interleave,
    make_parameters,
    relative_difference,
    synchronize,
)

__all__ = ["WORKLOADS", "Workload", "make_parameters", "run", "target_rows", "main"]


def run(
    device: torch.device,
    workload_names: Optional[list[str]] = None,
    repeats: int = 15,
    warmup: int = 3,
    log: Callable[[str], None] = print,
    backends: Sequence[str] = ("auto",),
) -> dict:
    """Runs every workload in both modes, timing each of fusedclip's ``backends`` ("auto": the
    one it picks for the device) and torch interleaved on the same gradients; one row per
    backend, each with the same torch time. Returns the results as a JSON-ready dict."""
    names = workload_names or list(WORKLOADS)
    backends = list(dict.fromkeys(_backends.resolve_backend(b, device) for b in backends))
    rows: list[dict] = []
    errors: list[dict] = []
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
            working = [b for b in backends if _runs(b, params, workload, errors, log)]
            if not working:
                del params, grads, probe
                continue
            norm = float(TORCH["get_total_norm"](grads).float())
            diffs = {b: relative_difference(fusedclip.get_total_norm(grads, backend=b), TORCH["get_total_norm"](grads))
                     for b in working}
            for mode, max_norm in (("clip", norm * 1e-3), ("noclip", norm * 1e3)):
                # Before every timed call the gradients are rewritten, untimed, as backward would
                # have just written them: doubled in "clip" mode (exact in every dtype), so each
                # call scales them by about 1/2 instead of settling at a norm that no longer clips;
                # multiplied by 1 in "noclip" mode, so both modes start from the same cache state.
                refresh = 2.0 if mode == "clip" else 1.0
                first_sample = len(probe.samples["read"])
                times = interleave(_clip_calls(params, max_norm, working), device, repeats, warmup,
                                   before=lambda _: torch._foreach_mul_(grads, refresh), between=probe.sample)
                back_to_back = {}
                if not workload.bandwidth_bound:
                    # Almost no bytes: the host's cost per call, measured without a sync per call.
                    # No refresh can run between such calls, so a clipping call takes max_norm 0
                    # (every call scales, by 0), and the gradients are put back afterwards.
                    saved = [g.clone() for g in grads]
                    calls = _clip_calls(params, 0.0 if mode == "clip" else max_norm, working)
                    back_to_back = {b: back_to_back_seconds(fn, device) for b, fn in calls.items()}
                    torch._foreach_copy_(grads, saved)
                moved = 3 * n_bytes if mode == "clip" else n_bytes
                ms_torch = statistics.median(times[BASELINE]) * 1e3
                # The floor at the bandwidth measured between this row's own timings.
                read_bw = probe.median("read", first_sample)
                rmw_bw = probe.median("rmw", first_sample)
                copy_bw = probe.median("copy", first_sample)
                floor_s = n_bytes / read_bw + (2 * n_bytes / rmw_bw if mode == "clip" else 0.0)
                for b in working:
                    ms_ours = statistics.median(times[b]) * 1e3
                    row = {
                        "workload": workload.label,
                        "backend": b,
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
                        "copy_GBps": copy_bw / 1e9,
                        "percent_of_floor": 100 * floor_s * 1e3 / ms_ours if workload.bandwidth_bound else None,
                        # The bytes the call must move over its time, against the copy probe's
                        # bandwidth (bytes read + written by a device-to-device copy).
                        "percent_of_copy": (100 * moved / ms_ours / 1e6 / (copy_bw / 1e9)
                                            if workload.bandwidth_bound else None),
                        "back_to_back_us": back_to_back[b] * 1e6 if back_to_back else None,
                        "torch_back_to_back_us": back_to_back[BASELINE] * 1e6 if back_to_back else None,
                        "norm_relative_difference": diffs[b],
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
        "backends": backends,
        "results": rows,
        "errors": errors,
    }


def _runs(backend: str, params: list[torch.nn.Parameter], workload: Workload, errors: list[dict],
          log: Callable[[str], None]) -> bool:
    """Whether one clip of the workload on the backend runs (it halves the gradients); when it
    raises, the error is recorded and the backend is left out of this workload, so that one
    backend's failure leaves the others' rows."""
    try:
        norm = fusedclip.get_total_norm([p.grad for p in params], backend=backend)
        fusedclip.clip_grad_norm_(params, float(norm) / 2, backend=backend)
        synchronize(params[0].device)
        return True
    except Exception as error:  # noqa: BLE001 -- recorded, printed, and the command fails at the end
        errors.append({"workload": workload.label, "backend": backend, "error": f"{type(error).__name__}: {error}"})
        log(f"{workload.label:<20} backend {backend} FAILED, left out: {errors[-1]['error']}")
        return False


BASELINE = "torch.nn.utils"  # the name of torch's own clip_grad_norm_ among the timed calls


def _clip_calls(params: list[torch.nn.Parameter], max_norm: float, backends: list[str]) -> dict[str, Callable]:
    """torch's clip_grad_norm_ (named "torch.nn.utils") and fusedclip's on each backend (named by
    the backend, "torch" among them: fusedclip's pure-PyTorch backend)."""
    calls: dict[str, Callable] = {BASELINE: lambda: TORCH["clip_grad_norm_"](params, max_norm)}
    for b in backends:
        calls[b] = lambda b=b: fusedclip.clip_grad_norm_(params, max_norm, backend=b)
    return calls


# --- the targets: what each row must reach ----------------------------------------------------------

# (what, workloads, modes, the row's key, the goal, "min" or "max"). The GPU targets of the
# kernels; on a CPU the same rows are printed for reference.
TARGETS: tuple[tuple[str, tuple[str, ...], tuple[str, ...], str, float, str], ...] = (
    ("% of copy bandwidth, clipping", ("gpt2-124m float32", "llama-1b bfloat16"), ("clip",),
     "percent_of_copy", 85.0, "min"),
    ("x torch, not clipping", ("gpt2-124m float32", "gpt2-124m bfloat16", "llama-1b bfloat16"), ("noclip",),
     "speedup", 2.5, "min"),
    ("x torch, many small tensors", ("many-small float32", "many-small float16"), ("clip", "noclip"),
     "speedup", 3.0, "min"),
    ("x torch, 10,000 tensors", ("tiny-10k float32",), ("clip", "noclip"), "speedup", 10.0, "min"),
    ("us per call back to back, 1,000 tensors", ("host-1k float32",), ("clip", "noclip"),
     "back_to_back_us", 150.0, "max"),
)


def target_rows(report: dict) -> list[dict]:
    """Each result row that a target speaks of, with the target, the value and whether it is met."""
    out = []
    for what, workloads, modes, key, goal, sense in TARGETS:
        for r in report["results"]:
            if r["workload"] in workloads and r["mode"] in modes and r.get(key) is not None:
                met = r[key] >= goal if sense == "min" else r[key] <= goal
                out.append({"target": what, "workload": r["workload"], "mode": r["mode"], "backend": r["backend"],
                            "value": r[key], "goal": f"{'>=' if sense == 'min' else '<='} {goal:g}", "met": met})
    return out


def targets_table(rows: list[dict]) -> str:
    lines = ["| target | workload | mode | backend | measured | goal | met |", "|---|---|---|---|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['target']} | {r['workload']} | {r['mode']} | {r['backend']} | {r['value']:.1f} "
                     f"| {r['goal']} | {'yes' if r['met'] else 'no'} |")
    return "\n".join(lines)


# --- backend "cuda": the single-launch clip against two launches -----------------------------------

# GPT-2 small in fp32 (498 MB, larger than any L2), and 8 fp32 tensors of 8 to 128 MB in all,
# around the 50 MB L2 of an H100 and the 60 MB of an H200: below the L2's size the scale can
# re-read what the norm read from L2, which is where the single launch is to pay. These rows set
# the default of the single-launch limit (today the L2's size, by guess).
CUDA_LAUNCH_WORKLOADS: Callable[[], list[Workload]] = lambda: [  # noqa: E731
    Workload("gpt2-124m", torch.float32, gpt2_small_shapes()),
    *(Workload(f"8 x {mb // 8} MB", torch.float32, ((mb * 2**20 // 32,),) * 8) for mb in (8, 16, 32, 48, 64, 96, 128)),
]
CUDA_LAUNCH_VARIANTS = ("cuda two-launch", "cuda single-launch", "torch backend", "torch.nn.utils")


def run_cuda_launches(device: torch.device, repeats: int = 15, warmup: int = 3,
                      log: Callable[[str], None] = print) -> list[dict]:
    """Times backend "cuda"'s fused clip as two launches and as one cooperative launch, with
    fusedclip's pure-PyTorch backend and torch.nn.utils beside them, interleaved (the order rotates
    each repetition). Needs fusedclip._C_cuda, the CUDA kernels."""
    single_launch_limit = {"cuda two-launch": 0, "cuda single-launch": 2**62}
    previous_limit = _backends._C_CUDA.single_launch_max_bytes()
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
                _backends._C_CUDA.set_single_launch_max_bytes(single_launch_limit.get(name, previous_limit))
                torch._foreach_mul_(grads, refresh)

            try:
                times = interleave({name: calls[name] for name in CUDA_LAUNCH_VARIANTS}, device, repeats,
                                   warmup, before=before)
            finally:
                _backends._C_CUDA.set_single_launch_max_bytes(previous_limit)
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
    f"{'GB/s':>7} {'% floor':>8} {'% copy':>7} {'probe r/rmw GB/s':>17} {'norm diff':>10}"
)


def _percent(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.0f}%"


def _format_row(row: dict) -> str:
    return (
        f"{row['workload']:<20} {row['mode']:<7} {row['backend']:<7} {row['fusedclip_ms']:>12.3f} "
        f"{row['torch_ms']:>10.3f} {row['speedup']:>6.2f}x {row['fusedclip_GBps']:>7.1f} "
        f"{_percent(row['percent_of_floor']):>8} {_percent(row['percent_of_copy']):>7} "
        f"{row['read_GBps']:>8.1f}/{row['rmw_GBps']:<8.1f} "
        f"{row['norm_relative_difference']:>10.1e}"
    )


def markdown_table(report: dict) -> str:
    lines = [
        "| workload | mode | backend | fusedclip ms | torch ms | ratio | GB/s | % of floor | % of copy "
        "| probe read / rmw / copy GB/s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['workload']} | {r['mode']} | {r['backend']} | {r['fusedclip_ms']:.3f} "
            f"| {r['torch_ms']:.3f} | {r['speedup']:.2f}x | {r['fusedclip_GBps']:.1f} "
            f"| {_percent(r['percent_of_floor'])} | {_percent(r.get('percent_of_copy'))} "
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
    """The command: every section in turn, the files rewritten after each, so that a section that
    fails leaves what the earlier ones measured. Returns 1 when a backend failed on a workload."""
    device = torch.device(args.device) if args.device else best_device()
    print(f"fusedclip {fusedclip.__version__}, torch {torch.__version__}, {device_name(device)}, "
          f"{torch.get_num_threads()} threads")
    backends = args.backends or ["auto"]
    if device.type == "cuda" and not args.backends:
        # Both GPU backends side by side: auto's choice between them is to follow these rows.
        backends = [b for b in ("cuda", "triton") if fusedclip.backend_status()[b] is None] or backends
    print(HEADER)
    report = run(device, args.workloads, repeats=args.repeats, backends=backends)
    print("floor: the row's bytes at the probe bandwidth measured during that row (read for the "
          "norm, read-modify-write for the scale); copy: the bytes moved over the time, against the "
          "copy probe's bandwidth")
    stem = None
    if args.output is not None:
        os.makedirs(args.output, exist_ok=True)
        stem = os.path.join(args.output, f"{report['date']}-{device_slug(report['device'])}")
    _save(report, stem)
    if device.type == "cuda" and fusedclip.backend_status()["cuda"] is None and args.launches:
        print("\nbackend cuda: the single-launch clip against two launches")
        report["cuda_launches"] = run_cuda_launches(device, repeats=args.repeats)
        _save(report, stem)
    if args.health:
        print(f"\n{health.HEADER}")
        report["health"] = health.run(device, repeats=args.repeats)
        _save(report, stem)
    if args.training != []:
        print(f"\n{training.HEADER}")
        report["training"] = training.run(device, args.training, repeats=args.repeats)
    _save(report, stem)
    print(f"\ntargets (the GPU kernels' goals; on a CPU for reference):\n{targets_table(report['targets'])}")
    if stem is None:
        print("no files written (--output FOLDER writes JSON, Markdown and a chart)")
    else:
        print(f"wrote {stem}.json and {stem}.md")
        if plot(report, stem + ".png"):
            print(f"wrote {stem}.png")
        else:
            print("matplotlib is not installed: no chart (pip install matplotlib)")
    for error in report["errors"]:
        print(f"FAILED: backend {error['backend']} on {error['workload']}: {error['error']}")
    return 1 if report["errors"] else 0


def _save(report: dict, stem: Optional[str]) -> None:
    """Writes the report as it stands to stem.json and stem.md (nothing when stem is None), its
    targets recomputed."""
    report["targets"] = target_rows(report)
    if stem is None:
        return
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=2)
    with open(stem + ".md", "w") as f:
        f.write(f"{report['device']}, torch {report['torch']}, {report['threads']} threads, "
                f"{report['date']}, medians of {report['repeats']}\n\n{markdown_table(report)}\n")
        if "cuda_launches" in report:
            f.write(f"\nBackend cuda, single launch against two launches:\n\n"
                    f"{cuda_launches_table(report['cuda_launches'])}\n")
        if "health" in report:
            f.write(f"\n{health.markdown_table(report['health'])}\n")
        if "training" in report:
            f.write(f"\n{training.markdown_table(report['training'])}\n")
        f.write(f"\nTargets:\n\n{targets_table(report['targets'])}\n")
        for error in report["errors"]:
            f.write(f"\nFAILED: backend {error['backend']} on {error['workload']}: {error['error']}\n")
