"""The benchmarks' one timing loop (fusedclip.bench.harness.interleave): rotation and counts."""

from __future__ import annotations

import torch

from fusedclip.bench import harness


def test_interleave_rotates_the_order_and_drops_the_warmup():
    order, events = [], []
    calls = {name: (lambda n=name: order.append(n)) for name in ("a", "b", "c")}
    times = harness.interleave(calls, torch.device("cpu"), repeats=4, warmup=2,
                               before=lambda name: events.append(("before", name)),
                               after=lambda: events.append(("after",)),
                               between=lambda: events.append(("between",)))
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert {name: len(ts) for name, ts in times.items()} == {"a": 4, "b": 4, "c": 4}
    assert all(t >= 0 for ts in times.values() for t in ts)
    assert events[:4] == [("before", "a"), ("after",), ("before", "b"), ("after",)]
    assert events.count(("between",)) == 6


def test_torch_baselines_are_torchs_own_functions():
    """The baselines are torch's functions even while fusedclip patches torch.nn.utils."""
    import fusedclip

    with fusedclip.patch_torch():
        assert harness.TORCH["clip_grad_norm_"].__module__.startswith("torch.")
        assert harness.TORCH["clip_grad_norm_"] is not torch.nn.utils.clip_grad_norm_


def test_host_cost_script_ends_with_its_json_rows():
    """benchmarks/host_cost.py runs without a GPU and its last line is a JSON object of its rows
    (triton_api_us among them), as CI and the GPU job read it."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "host_cost.py"), "--params", "20"],
                            capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", "")))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(result.stdout.strip().splitlines()[-1])
    assert rows["params"] == 20
    for key in ("triton_api_us", "triton_operator_us", "collect_us", "cpu_api_us", "torch_cpu_us"):
        assert rows[key] > 0, (key, rows)
