"""Command line: ``python -m fusedclip info`` and ``python -m fusedclip bench``."""

from __future__ import annotations

import argparse
import platform
import sys

import torch

import fusedclip
from fusedclip import _backends, _ops
from fusedclip.bench.harness import WORKLOADS


def info() -> int:
    """Prints versions, build flags and the backends available, with why any is not."""
    print(f"fusedclip  {fusedclip.__version__}")
    print(f"torch      {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    print(f"python     {platform.python_version()} on {platform.platform()}")
    print(f"threads    {torch.get_num_threads()} (torch intra-op)")
    if _backends._C is not None:
        print(f"_C         CPU kernels for {_backends._C.cpu_isa} (the widest this CPU runs: "
              f"{_backends._C.widest_cpu_isa}; FUSEDCLIP_CPU_ISA chooses a lower one)")
    if _backends._C_CUDA is not None:
        print(f"_C_cuda    CUDA kernels, built with CUDA runtime {_backends._C_CUDA.cuda_version}")
    print("backends:")
    for name, reason in _backends.backend_status().items():
        print(f"  {name:<7} {'available' if reason is None else 'unavailable: ' + reason}")
    table = _ops.operator_table()
    backends = list(next(iter(table.values())))
    print("operators (kernel: the backend's own; torch: reference.py runs it on that backend's device):")
    print(f"  {'':<32}" + "".join(f"{b:<13}" for b in backends))
    for op, row in table.items():
        print(f"  {op:<32}" + "".join(f"{row[b]:<13}" for b in backends))
    return 0


def parser() -> argparse.ArgumentParser:
    """The command line's parser (scripts/gpu.sh's benchmark command is checked against it)."""
    parser = argparse.ArgumentParser(prog="python -m fusedclip", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions, build flags and available backends")
    bench = commands.add_parser("bench", help="time fusedclip against torch on this machine")
    bench.add_argument("--device", help="cpu or cuda (default: the best device present)")
    bench.add_argument("--workloads", nargs="+", choices=list(WORKLOADS),
                       help="default: all")
    bench.add_argument("--backends", nargs="+", choices=fusedclip.BACKENDS,
                       help="fusedclip's backends, timed side by side (default: on a GPU every GPU "
                            "backend available, else the one 'auto' picks)")
    bench.add_argument("--training", nargs="*", choices=["amp", "adamw"],
                       help="training-step benchmarks (default: all; none with an empty list)")
    bench.add_argument("--repeats", type=int, default=15, help="timed repetitions per mode")
    bench.add_argument("--output", default=None,
                       help="folder for JSON, Markdown and PNG (default: none, the tables are printed only; "
                            "scripts/bench.sh passes benchmarks/results)")
    bench.add_argument("--health", action=argparse.BooleanOptionalAction, default=True,
                       help="also time AGC and GradientMonitor (fusedclip/bench/health.py)")
    bench.add_argument("--launches", action=argparse.BooleanOptionalAction, default=True,
                       help="on a GPU, also time backend cuda's single launch against two launches")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "info":
        return info()
    from fusedclip import bench as bench_module

    return bench_module.main(args)


if __name__ == "__main__":
    sys.exit(main())
