"""pytest-benchmark suite over the workloads of ``python -m fusedclip bench``.

    python -m pytest benchmarks --benchmark-group-by=param:workload,param:mode

Not part of the test run (tests/ is); each case times one implementation, so compare the
groups' rows. ``python -m fusedclip bench`` interleaves both in one run and is the reference.
"""

import pytest
import torch

import fusedclip
from fusedclip.bench.harness import WORKLOADS, make_parameters

CASES = [w for name in WORKLOADS for w in WORKLOADS[name]() if w.on_cpu_by_default]
IMPLEMENTATIONS = {"fusedclip": fusedclip.clip_grad_norm_, "torch": torch.nn.utils.clip_grad_norm_}


@pytest.fixture(scope="module", params=CASES, ids=lambda w: w.label.replace(" ", "-"))
def workload(request):
    params = make_parameters(request.param, torch.device("cpu"))
    norm = float(torch.nn.utils.get_total_norm([p.grad for p in params]).float())
    return request.param, params, norm


@pytest.mark.parametrize("mode", ["clip", "noclip"])
@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
def test_clip_grad_norm(benchmark, workload, mode, implementation):
    spec, params, norm = workload
    grads = [p.grad for p in params]
    max_norm = norm * 1e-3 if mode == "clip" else norm * 1e3
    refresh = 2.0 if mode == "clip" else 1.0  # see fusedclip/bench/__init__.py: every call clips
    clip = IMPLEMENTATIONS[implementation]
    benchmark.extra_info.update(workload=spec.label, mode=mode, elements=spec.numel)

    def rewrite_grads():  # untimed, before every round; returns None (pedantic reads it as args)
        torch._foreach_mul_(grads, refresh)

    benchmark.pedantic(
        clip,
        args=(params, max_norm),
        setup=rewrite_grads,
        rounds=10,
        warmup_rounds=2,
    )
