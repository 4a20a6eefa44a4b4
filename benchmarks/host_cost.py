"""Host time per call at 1,000 parameters, kernel launches left out: what a call costs besides
its kernels. Runs without a GPU: backend "triton" under Triton's interpreter (set here, before
triton is imported) on CPU tensors, with its kernel launches replaced by nothing.

    PYTHONPATH=$PWD python benchmarks/host_cost.py [--params 1000] [--json results.json]

Rows (median over 15 repetitions of the mean of a batch of calls, in microseconds):
  triton_api_us            fusedclip.clip_grad_norm_(params, 1.0, backend="triton")
  triton_value_api_us      fusedclip.clip_grad_value_(params, 0.1, backend="triton")
  triton_with_norm_api_us  fusedclip.clip_grads_with_norm_(params, 1.0, norm, backend="triton")
  triton_operator_us       the operator fusedclip calls (fusedclip._ops.run("clip_grad_norm_", "triton", ...))
  triton_dispatcher_us     torch.ops.fusedclip_triton.clip_grad_norm_ (the path torch.compile takes)
  collect_us               the one-group route's collection: grads read, their types and (to
                           write) inference flags scanned (fusedclip._C), the backend resolved;
                           the part of every call before its operator
  python_collect_us        fusedclip's general path for the same list: grads read in Python,
                           checked one by one and grouped
  grads_read_us            fusedclip._core.grads_of(params): every .grad read (fusedclip._C)
  plain_scan_us            fusedclip._core.plain_tensors(grads, writable=True): the types and the
                           inference-tensor scan of a list to write
  cpp_operator_us          a C++ operator called as fusedclip calls it (through the dispatcher,
                           the stable ABI's boxed call, the kernel's checks), with nothing to
                           write: multi_tensor_scale_ by 1 on the CPU; the CUDA library does the
                           same before its launches
  stable_abi_floor_us      the same route to an operator that only reads each tensor's dtype
                           (benchmarks/stable_abi_floor.cpp, built here at run time; --no-floor
                           skips it): what any stable-ABI operator given this list costs
  cpu_api_us               fusedclip.clip_grad_norm_(params, 1.0) on CPU, kernels included
  torch_cpu_us             torch.nn.utils.clip_grad_norm_(params, 1.0) on CPU, kernels included
                           (both with one intra-op thread)
The last line is a JSON object of these rows. Target: triton_api_us <= 150 (goal 50).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402

import fusedclip  # noqa: E402
from fusedclip import _core, _ops  # noqa: E402
from fusedclip.bench.harness import TORCH  # noqa: E402
from fusedclip.triton import launch  # noqa: E402


def median_us(fn, calls: int, repeats: int = 15) -> float:
    """Median over repeats of the mean time of `calls` calls of fn, in microseconds (a busy
    machine's pauses land in a few batches; the median leaves them out)."""
    gc.collect()
    for _ in range(max(calls // 4, 2)):
        fn()
    means = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        means.append((time.perf_counter() - start) / calls)
    return statistics.median(means) * 1e6


def parameters(count: int) -> list[torch.nn.Parameter]:
    params = []
    for i in range(count):
        p = torch.nn.Parameter(torch.empty(100 + i % 7))
        p.grad = torch.randn(p.shape)
        params.append(p)
    return params


def stable_abi_floor():
    """torch.ops.fusedclip_floor.read_dtypes, built from benchmarks/stable_abi_floor.cpp for the
    stable ABI of torch 2.10 (as fusedclip's libraries are)."""
    from torch.utils import cpp_extension

    cpp_extension.load(
        name="fusedclip_floor",
        sources=[str(Path(__file__).with_name("stable_abi_floor.cpp"))],
        extra_cflags=["-O2", "-DTORCH_TARGET_VERSION=0x020a000000000000"],
        is_python_module=False,
    )
    return torch.ops.fusedclip_floor.read_dtypes.default


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=1000)
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--no-floor", dest="floor", action="store_false",
                        help="skip stable_abi_floor_us (it compiles a small extension)")
    args = parser.parse_args()
    # Host cost is one thread's work; one intra-op thread also keeps the rows with kernels from
    # waiting on a busy second core.
    torch.set_num_threads(1)

    params = parameters(args.params)
    grads = [p.grad for p in params]
    norm = torch.tensor(2.0)
    one = torch.tensor(1.0)
    kernels = launch.run_kernel
    launch.run_kernel = lambda *a, **k: None  # the kernels are left out
    try:
        rows = {
            "triton_api_us": (lambda: fusedclip.clip_grad_norm_(params, 1.0, backend="triton"), 200),
            "triton_value_api_us": (lambda: fusedclip.clip_grad_value_(params, 0.1, backend="triton"), 200),
            "triton_with_norm_api_us": (
                lambda: fusedclip.clip_grads_with_norm_(params, 1.0, norm, backend="triton"), 200),
            "triton_operator_us": (lambda: _ops.run("clip_grad_norm_", "triton", grads, 1.0, 2.0), 200),
            "triton_dispatcher_us": (lambda: torch.ops.fusedclip_triton.clip_grad_norm_(grads, 1.0, 2.0), 200),
            "collect_us": (lambda: _core.one_group(_core.grads_of(params), None, "triton", writes=True), 500),
            "python_collect_us": (
                lambda: _core.group_by_device(_core.grads_of(params), None, "triton", writes=True), 100),
            "grads_read_us": (lambda: _core.grads_of(params), 500),
            "plain_scan_us": (lambda: _core.plain_tensors(grads, writable=True), 500),
            "cpp_operator_us": (lambda: _ops.run("multi_tensor_scale_", "cpu", grads, one), 500),
        }
        if args.floor:
            floor = stable_abi_floor()
            rows["stable_abi_floor_us"] = (lambda: floor(grads), 500)
        results = {name: median_us(fn, calls) for name, (fn, calls) in rows.items()}
    finally:
        launch.run_kernel = kernels
    # With the kernels: the whole CPU call, fusedclip's against torch's.
    with torch.no_grad():
        for p in params:
            p.grad.mul_(1e-3)  # below max_norm: nothing is scaled, every call does the same work
    results["cpu_api_us"] = median_us(lambda: fusedclip.clip_grad_norm_(params, 1.0), 100)
    results["torch_cpu_us"] = median_us(lambda: TORCH["clip_grad_norm_"](params, 1.0), 20)

    results = {name: round(value, 1) for name, value in results.items()}
    for name, value in results.items():
        print(f"{name:26s} {value:9.1f} us")
    target = "met" if results["triton_api_us"] <= 150 else "NOT met"
    print(f"target triton_api_us <= 150: {target}")
    results["params"] = args.params
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
