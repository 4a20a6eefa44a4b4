"""Host time per call of backend "triton" at 1,000 contiguous CPU tensors, kernel launches left
out, under Triton's interpreter (no GPU needed): what a call costs besides its kernels.

    PYTHONPATH=$PWD python benchmarks/triton_host_cost.py
"""

import os
import time

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402

import fusedclip  # noqa: E402
from fusedclip.triton import launch, tables  # noqa: E402


def best_us(fn, calls: int = 200, repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def main() -> None:
    launch.run_kernel = lambda *args, **kwargs: None  # the kernels are left out
    grads = [torch.randn(100 + i % 7) for i in range(1000)]
    params = [torch.nn.Parameter(torch.empty_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g
    device = grads[0].device

    def body():
        operands = tables.operands_of(grads, "clip_grad_norm_", True)
        _, _, _, coef = launch.norm(operands, device, 2.0, False, 1.0)
        launch.transform(grads, "clip_grad_norm_", None, coef, operands=operands)

    def miss():
        tables._cache.clear()
        torch.ops.fusedclip_triton.clip_grad_norm_(grads, 1.0, 2.0)

    rows = [
        ("operator body, cache hit", body, 200),
        ("torch.ops.fusedclip_triton.clip_grad_norm_, hit",
         lambda: torch.ops.fusedclip_triton.clip_grad_norm_(grads, 1.0, 2.0), 200),
        ("torch.ops.fusedclip_triton.multi_tensor_norm, hit",
         lambda: torch.ops.fusedclip_triton.multi_tensor_norm(grads, 2.0), 200),
        ("fusedclip.clip_grad_norm_(backend='triton'), hit",
         lambda: fusedclip.clip_grad_norm_(params, 1.0, backend="triton"), 200),
        ("torch.ops.fusedclip_triton.clip_grad_norm_, miss", miss, 20),
    ]
    for name, fn, calls in rows:
        print(f"{name:55s} {best_us(fn, calls):8.0f} us")


if __name__ == "__main__":
    main()
